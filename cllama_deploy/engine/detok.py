"""UTF-8-safe incremental detokenization with stop strings.

A token's bytes may end in the middle of a character (SentencePiece byte fallback emits Chinese
characters as ``<0xE4><0xB8><0xAD>``). :class:`TextAssembler` keeps incomplete byte sequences until
the character is complete, so a stream never carries split bytes or a spurious U+FFFD. Bytes that can
never form a character are replaced by U+FFFD exactly as ``bytes.decode("utf-8", "replace")`` does on
the whole output: Python's incremental UTF-8 decoder gives the same result for any split of the input,
so the concatenated stream equals the non-streamed text.

Stop strings are matched on the decoded text. Text that could be the beginning of a stop string is
held back until it is known not to be one, so a stop string is never partly streamed; the text is cut
before the stop string, as OpenAI does.
"""

from __future__ import annotations

import codecs
from typing import Iterable


class TextAssembler:
    """Turns a sequence of token byte pieces into emit-ready text, watching for stop strings.

    Call :meth:`push` with each token's bytes; it returns the text that is safe to emit now (possibly
    empty). After a stop string appears, :attr:`stopped` is True and nothing more is accepted. Call
    :meth:`finish` once at the end to flush held-back text (invalid trailing bytes become U+FFFD).
    """

    def __init__(self, stops: Iterable[str] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = sorted({s for s in stops if s}, key=len)
        self._pending = ""
        self.stopped = False
        self.stop_string: str | None = None

    def push(self, piece: bytes) -> str:
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece, final=False)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._pending
        if not text:
            return ""
        if self._stops:
            cut = -1
            for stop in self._stops:
                i = text.find(stop)
                if i >= 0 and (cut < 0 or i < cut):
                    cut, self.stop_string = i, stop
            if cut >= 0:
                self.stopped = True
                self._pending = ""
                return text[:cut]
            if not final:
                keep = self._held_suffix(text)
                if keep:
                    self._pending = text[-keep:]
                    return text[:-keep]
        self._pending = ""
        return text

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            n = min(len(stop) - 1, len(text))
            while n > best:
                if stop.startswith(text[-n:]):
                    best = n
                    break
                n -= 1
        return best


def decode_all(pieces: Iterable[bytes]) -> str:
    """The non-streamed reference: all bytes at once, invalid sequences replaced."""
    return b"".join(pieces).decode("utf-8", errors="replace")
