"""The quickstart's generated data: every text a stage trains on, and the held-out evaluation.

- ``base``: what the tiny base LLaMA is pre-trained on (and its tokenizer trained on): mostly English,
  a little Chinese, and numbers written in digits next to their Chinese reading, the way web text
  mixes them (real LLaMA has the Chinese numeral characters in its vocabulary and has seen them).
- ``zh``: general Chinese text for the Chinese tokenizer (no numeral readings, so the Chinese pieces
  never glue numerals together: the merged tokenizer keeps one token per numeral character).
- ``pt``: Chinese text for LoRA pre-training with the extended vocabulary (general text and
  numbers with their readings in Chinese sentences).
- ``sft``: Alpaca records ``把{N}写成中文数字。`` → the reading.
- held out: the multiples of 17 (never in any of the above, not even as a number in a sentence) as
  questions, and Chinese text of the PT kind for perplexity.
"""

from __future__ import annotations

import random
import re
from typing import Callable, Iterable

from cllama_deploy.quickstart.corpus import EN_WORDS, chinese_sentence, english_sentence
from cllama_deploy.quickstart.numerals import DIGIT_WORDS, NUMERAL_CHARS, instruction, is_held_out, to_chinese

# English words of the base text: the generic ones plus those of the Alpaca prompt, so the base
# tokenizer holds them as whole pieces as LLaMA's does (the prompt costs ~25 tokens, not ~90).
BASE_EN_WORDS = tuple(EN_WORDS) + tuple(
    "below is an instruction that describes a task write response appropriately completes request "
    "number numbers chinese read written as in and of to Below Write Instruction Response ###: ### "
    "Instruction: Response:".split())

# Numbers next to their reading. The English-language lines are in the base's text; the Chinese
# ones in the base's (a few) and in the PT text.
EN_NUMBER_TEMPLATES = ("{n} in chinese is {zh}.", "the number {n} is read {zh}.", "{n} = {zh}",
                       "write {n} as {zh}.")
# Years are read digit by digit (2005年 → 二零零五年): the one place where a lone 0 is read 零.
YEAR_TEMPLATES = ("{n}年读作{zh}年。", "那是{n}年，也就是{zh}年。")
ZH_NUMBER_TEMPLATES = ("{n}写作{zh}。", "数字{n}读作{zh}。", "{n}的中文写法是{zh}。", "我们把{n}写成{zh}。",
                       "{n}就是{zh}。", "把{n}写成中文数字是{zh}。")
# Every character of the templates and of the task's instruction, for the base tokenizer: each is a
# piece of the base (as the common characters are in LLaMA's vocabulary), so the instruction tokenizes
# the same way before and after the merge and the base's knowledge of it carries over to SFT.
TEMPLATE_CHARS = "".join(sorted({c for t in ZH_NUMBER_TEMPLATES + YEAR_TEMPLATES + (instruction(0),)
                                 for c in t if "\u4e00" <= c <= "\u9fff" or c in "，。"}))


def training_number(rng: random.Random, high: int) -> int:
    """A number for a training sentence: uniform in 0..high but never a held-out one."""
    n = rng.randint(0, high)
    return n + 1 if is_held_out(n) else n


def held_out_number(rng: random.Random, high: int) -> int:
    """A number for held-out text: a multiple of 17 in 0..high."""
    return 17 * rng.randint(0, high // 17)


_DIGIT_RUN = re.compile(r"\d+")


def has_held_out(text: str) -> bool:
    """True when a run of digits in ``text`` is a held-out number (two numbers written next to each other
    read as one, so this is checked on the finished line)."""
    return any(is_held_out(int(m.group())) for m in _DIGIT_RUN.finditer(text))


def _clean(make: Callable[[], str]) -> str:
    """A generated line with no held-out number in it (drawn again until there is none)."""
    while True:
        line = make()
        if not has_held_out(line):
            return line


def year_reading(n: int) -> str:
    """A year read digit by digit: 2005 → 二零零五."""
    return "".join(DIGIT_WORDS[int(d)] for d in str(n))


def _years(count: int, rng: random.Random, draw: Callable[[random.Random, int], int] = training_number) -> list[str]:
    out = []
    for _ in range(count):
        n = draw(rng, 2100)
        out.append(rng.choice(YEAR_TEMPLATES).format(n=n, zh=year_reading(n)))
    return out


def _readings(numbers: Iterable[int], templates: tuple[str, ...], rng: random.Random) -> list[str]:
    return [rng.choice(templates).format(n=n, zh=to_chinese(n)) for n in numbers]


# Copies of a number per pass, by its number of digits: short numbers are few (90 of 0-9999 have two
# digits or fewer), and a model that saw them once in a hundred examples answers 17 with 一百七十七.
REPEATS_BY_DIGITS = {1: 8, 2: 8, 3: 3, 4: 1}
# Numbers with two zeros inside (X00Y: 1003 → 一千零三) are 81 of 0-9999 and read unlike their
# neighbours; seen once per pass, the model reads 1003 as 一千零三十三 (measured: 6 of 11 errors).
REPEATS_INNER_ZEROS = 4


def repeats(n: int) -> int:
    """Copies of ``n`` per pass (:data:`REPEATS_BY_DIGITS`, :data:`REPEATS_INNER_ZEROS`)."""
    digits = str(n)
    inner_zeros = len(digits) == 4 and digits[1:3] == "00" and digits[3] != "0"
    return max(REPEATS_BY_DIGITS[len(digits)], REPEATS_INNER_ZEROS if inner_zeros else 0)


def weighted(numbers: Iterable[int]) -> list[int]:
    """``numbers`` with the short and the rare-pattern ones repeated (:func:`repeats`)."""
    return [n for n in numbers for _ in range(repeats(n))]


def _shuffled(numbers: list[int], passes: int, rng: random.Random) -> list[int]:
    out: list[int] = []
    for _ in range(passes):
        part = weighted(numbers)
        rng.shuffle(part)
        out += part
    return out


def base_tokenizer_lines(*, en_lines: int, zh_lines: int, seed: int) -> list[str]:
    """The text the base tokenizer is trained on: the base's English and Chinese, without the readings
    of numbers (which would teach BPE to glue numerals: 三千, 四百一十), plus every numeral character
    and every character of the templates once, so each is a piece of its own, as in LLaMA's vocabulary."""
    rng = random.Random(seed)
    lines = [_clean(lambda: " ".join(english_sentence(rng, number=training_number, words=BASE_EN_WORDS)
                                     for _ in range(rng.randint(1, 3)))) for _ in range(en_lines)]
    lines += [_clean(lambda: "".join(chinese_sentence(rng, number=training_number) for _ in range(rng.randint(1, 2))))
              for _ in range(zh_lines)]
    return lines + [" ".join(NUMERAL_CHARS), " ".join(TEMPLATE_CHARS)]


def base_lines(numbers: list[int], *, en_lines: int, zh_lines: int, passes: int, seed: int) -> list[str]:
    """The base's pre-training text: English, a little Chinese, and ``passes`` readings of every number."""
    rng = random.Random(seed)
    lines = [_clean(lambda: " ".join(english_sentence(rng, number=training_number, words=BASE_EN_WORDS)
                                     for _ in range(rng.randint(1, 3)))) for _ in range(en_lines)]
    lines += [_clean(lambda: "".join(chinese_sentence(rng, number=training_number) for _ in range(rng.randint(1, 2))))
              for _ in range(zh_lines)]
    order = _shuffled(numbers, passes, rng)
    half = len(order) // 2
    lines += _readings(order[:half], EN_NUMBER_TEMPLATES, rng) + _readings(order[half:], ZH_NUMBER_TEMPLATES, rng)
    lines += _years(len(order) // 20, rng)
    rng.shuffle(lines)
    return lines


def zh_tokenizer_lines(n: int, seed: int) -> list[str]:
    """General Chinese text for the Chinese tokenizer (numbers only in digits, none held out)."""
    rng = random.Random(seed)
    return [_clean(lambda: "".join(chinese_sentence(rng, number=training_number) for _ in range(rng.randint(1, 3))))
            for _ in range(n)]


def pt_lines(numbers: list[int], *, zh_lines: int, passes: int, seed: int, held_out: bool = False) -> list[str]:
    """Chinese pre-training text (or, with ``held_out``, held-out text of the same kind: every number in
    it a multiple of 17, for perplexity)."""
    rng = random.Random(seed)
    draw = held_out_number if held_out else training_number
    def line() -> str:
        return "".join(chinese_sentence(rng, number=draw) for _ in range(rng.randint(1, 2)))

    lines = [line() if held_out else _clean(line) for _ in range(zh_lines)]
    order = _shuffled(numbers, passes, rng)
    lines += _readings(order, ZH_NUMBER_TEMPLATES, rng) + _years(len(order) // 20, rng, draw)
    rng.shuffle(lines)
    return lines


def sft_records(numbers: list[int], *, passes: int, seed: int) -> list[dict]:
    """Alpaca records (instruction / input / output) for ``numbers``, shuffled, ``passes`` times each."""
    rng = random.Random(seed)
    return [{"instruction": instruction(n), "input": "", "output": to_chinese(n)}
            for n in _shuffled(numbers, passes, rng)]


def check_no_held_out(texts: Iterable[str]) -> None:
    """Fail loudly if a held-out number appears in training text (a bug in the generators above).

    Raises:
        AssertionError: naming the text.
    """
    for text in texts:
        if has_held_out(text):
            raise AssertionError(f"a held-out number is in the training text {text!r}")
