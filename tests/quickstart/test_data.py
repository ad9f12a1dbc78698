"""The quickstart's generated data: no held-out number in any training text; the records are right."""

from __future__ import annotations

import re

import pytest

from cllama_deploy.quickstart import data
from cllama_deploy.quickstart.numerals import held_out_numbers, to_chinese, train_numbers

NUMBERS = train_numbers(1000)


def _all_training_text() -> list[str]:
    return (data.base_tokenizer_lines(en_lines=300, zh_lines=30, seed=1) + data.zh_tokenizer_lines(300, seed=2)
            + data.base_lines(NUMBERS, en_lines=200, zh_lines=20, passes=1, seed=3)
            + data.pt_lines(NUMBERS, zh_lines=200, passes=1, seed=4))


def test_no_held_out_number_in_training_text():
    texts = _all_training_text()
    data.check_no_held_out(texts)  # the run's own check
    for line in texts:
        for m in re.finditer(r"\d+", line):
            assert int(m.group()) % 17 != 0, line
    # and no held-out number's reading either (a reading is next to its digits, which are checked above,
    # but a year's or a sentence's reading must not be one either)
    held_readings = {to_chinese(n) for n in held_out_numbers(1000) if n >= 17}
    joined = "\n".join(texts)
    for reading in held_readings:
        for m in re.finditer(re.escape(reading), joined):
            before = joined[m.start() - 1] if m.start() else ""
            after = joined[m.end()] if m.end() < len(joined) else ""
            # part of a longer reading (三百四 in 三百四十一) is fine; a whole held-out reading is not
            assert before in "零一二三四五六七八九十百千" or after in "零一二三四五六七八九十百千", reading


def test_check_no_held_out_catches_a_leak():
    with pytest.raises(AssertionError, match="held-out"):
        data.check_no_held_out(["fine 12", "数字34读作三十四。"])
    assert data.has_held_out("x1700y") and not data.has_held_out("x1701y 2026")


def test_sft_records_and_weighting():
    records = data.sft_records(NUMBERS, passes=2, seed=5)
    assert all(r["output"] == to_chinese(int(r["instruction"][1:-7])) and r["input"] == "" for r in records)
    counts = {}
    for r in records:
        counts[r["output"]] = counts.get(r["output"], 0) + 1
    assert counts[to_chinese(5)] == 2 * data.REPEATS_BY_DIGITS[1]
    assert counts[to_chinese(123)] == 2 * data.REPEATS_BY_DIGITS[3]
    assert not any(int(r["instruction"][1:-7]) % 17 == 0 for r in records)


def test_held_out_text_only_has_held_out_numbers():
    lines = data.pt_lines(held_out_numbers(1000), zh_lines=50, passes=1, seed=6, held_out=True)
    nums = [int(m.group()) for line in lines for m in re.finditer(r"\d+", line)]
    assert nums and all(n % 17 == 0 for n in nums)


def test_generation_is_reproducible():
    assert data.base_lines(NUMBERS[:50], en_lines=5, zh_lines=5, passes=1, seed=3) == \
        data.base_lines(NUMBERS[:50], en_lines=5, zh_lines=5, passes=1, seed=3)
