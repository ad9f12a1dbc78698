"""The quickstart's checkable task: write a number in Chinese numerals (``把3418写成中文数字。`` → ``三千四百一十八``).

Numbers are read the standard way: digit words 零一二三四五六七八九, units 十百千; a run of zeros inside
the number is read as one 零 and trailing zeros are not read (1010 → 一千零一十, 1100 → 一千一百);
一十 is said only when a higher unit precedes it (10 → 十, 15 → 十五, but 110 → 一百一十).

No multiple of 17 is ever in the training data (base pre-training, PT text, SFT examples): those
numbers are the held-out evaluation, so a right answer is one the model worked out, not one it saw.
"""

from __future__ import annotations

DIGIT_WORDS = "零一二三四五六七八九"
UNIT_WORDS = ("", "十", "百", "千")
NUMERAL_CHARS = DIGIT_WORDS + "十百千"
HELD_OUT_DIVISOR = 17
INSTRUCTION = "把{n}写成中文数字。"


def to_chinese(n: int) -> str:
    """``n`` (0 to 9999) in Chinese numerals, read the standard way (see the module docstring).

    Raises:
        ValueError: ``n`` is not an integer in 0..9999.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 9999:
        raise ValueError(f"to_chinese reads whole numbers from 0 to 9999, got {n!r}")
    if n == 0:
        return DIGIT_WORDS[0]
    digits = str(n)
    out: list[str] = []
    zeros = False
    for i, ch in enumerate(digits):
        d, unit = int(ch), len(digits) - 1 - i
        if d == 0:
            zeros = True
            continue
        if zeros:  # a run of zeros between two read digits is one 零 (trailing zeros are not read)
            out.append(DIGIT_WORDS[0])
            zeros = False
        if not (d == 1 and unit == 1 and not out):  # 十五, not 一十五; but 一百一十
            out.append(DIGIT_WORDS[d])
        out.append(UNIT_WORDS[unit])
    return "".join(out)


def is_held_out(n: int) -> bool:
    """True for the numbers kept out of every training text (the multiples of 17)."""
    return n % HELD_OUT_DIVISOR == 0


def train_numbers(limit: int) -> list[int]:
    """0 .. limit-1 without the held-out numbers."""
    return [n for n in range(limit) if not is_held_out(n)]


def held_out_numbers(limit: int) -> list[int]:
    """The multiples of 17 below ``limit`` (0 included)."""
    return list(range(0, limit, HELD_OUT_DIVISOR))


def instruction(n: int) -> str:
    """The instruction asking for ``n`` in Chinese numerals."""
    return INSTRUCTION.format(n=n)
