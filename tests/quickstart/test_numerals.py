"""The quickstart's task: numbers in Chinese numerals, and the held-out split (multiples of 17)."""

from __future__ import annotations

import pytest

from cllama_deploy.quickstart.numerals import (
    DIGIT_WORDS, NUMERAL_CHARS, held_out_numbers, instruction, is_held_out, to_chinese, train_numbers)

# issue 11's examples, read the standard way
ISSUE_EXAMPLES = {
    0: "零", 10: "十", 15: "十五", 20: "二十", 101: "一百零一", 110: "一百一十", 1001: "一千零一",
    1010: "一千零一十", 1100: "一千一百", 2005: "二千零五", 9999: "九千九百九十九",
}


@pytest.mark.parametrize("n, reading", sorted(ISSUE_EXAMPLES.items()))
def test_issue_examples(n, reading):
    assert to_chinese(n) == reading


@pytest.mark.parametrize("n, reading", [
    (1, "一"), (9, "九"), (11, "十一"), (19, "十九"), (100, "一百"), (111, "一百一十一"), (1000, "一千"),
    (1011, "一千零一十一"), (1101, "一千一百零一"), (3418, "三千四百一十八"), (7000, "七千"), (9090, "九千零九十"),
    (9909, "九千九百零九"), (17, "十七"), (986, "九百八十六"),
])
def test_more_readings(n, reading):
    assert to_chinese(n) == reading


def _value(reading: str) -> int:
    """Read a numeral back (to check to_chinese over the whole range): digit * unit, 零 skipped."""
    units = {"十": 10, "百": 100, "千": 1000}
    total, digit = 0, None
    for ch in reading:
        if ch in units:
            total += (1 if digit is None else digit) * units[ch]
            digit = None
        elif ch != "零" or len(reading) == 1:
            digit = DIGIT_WORDS.index(ch)
    return total + (digit or 0)


def test_every_number_reads_back_and_follows_the_rules():
    seen = set()
    for n in range(10000):
        r = to_chinese(n)
        assert set(r) <= set(NUMERAL_CHARS), r
        assert _value(r) == n, (n, r)
        assert not r.startswith("一十"), r          # 一十 only after a higher unit
        assert "零零" not in r and (n == 0 or not r.endswith("零")), r  # one 零 per run, trailing zeros silent
        seen.add(r)
    assert len(seen) == 10000


@pytest.mark.parametrize("bad", [-1, 10000, 3.0, "12", True])
def test_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="0 to 9999"):
        to_chinese(bad)


def test_held_out_split():
    held = held_out_numbers(1000)
    assert held[:3] == [0, 17, 34] and held[-1] == 986 and len(held) == 59
    assert all(is_held_out(n) for n in held)
    train = train_numbers(1000)
    assert not set(train) & set(held) and len(train) + len(held) == 1000
    assert len(held_out_numbers(10000)) == 589
    assert instruction(3418) == "把3418写成中文数字。"
