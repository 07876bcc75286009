"""Masking secret values: every text castiron captures is masked before it is written or shown.

Owns :class:`Redactor` (the resolved secret values of one process, and the masking of text,
bytes and JSON values with ``***``) and :class:`StreamRedactor` (the same for a byte stream cut
into arbitrary chunks, for instance output). A value is masked wherever it appears, also inside
longer text; a multi-line value is masked whole and line by line. Values shorter than
:data:`MIN_LENGTH` characters are not masked: they would match ordinary text (digits of a
port, letters of a digest) and mangle what is kept without hiding anything worth hiding.

It knows nothing of castiron; it imports only the standard library.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MASK = "***"
"""What a secret value is replaced with."""

MIN_LENGTH = 4
"""Shorter values are not masked (see the module docstring)."""


def _candidates(value: str) -> set[str]:
    found = {value} if len(value) >= MIN_LENGTH else set()
    if "\n" in value:
        found |= {line.strip() for line in value.splitlines() if len(line.strip()) >= MIN_LENGTH}
    return found


class Redactor:
    """The secret values known to this process; masks them in what it is given.

    Values are only ever added (a value resolved once stays masked for the life of the
    process). An empty redactor returns its input unchanged.
    """

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values: set[str] = set()
        self._text: re.Pattern[str] | None = None
        self._bytes: re.Pattern[bytes] | None = None
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        """Mask ``values`` from now on."""
        new: set[str] = set()
        for text in values:
            new |= _candidates(text)
        if new <= self._values:
            return
        self._values |= new
        # Longest first: a value that contains another is masked whole.
        ordered = sorted(self._values, key=lambda v: (-len(v), v))
        self._text = re.compile("|".join(re.escape(v) for v in ordered))
        self._bytes = re.compile(b"|".join(re.escape(v.encode()) for v in ordered))

    @property
    def values(self) -> frozenset[str]:
        """What is masked."""
        return frozenset(self._values)

    def __bool__(self) -> bool:
        return bool(self._values)

    def text(self, text: str) -> str:
        """``text`` with every secret value replaced by ``***``."""
        if self._text is None or not text:
            return text
        return self._text.sub(MASK, text)

    def data(self, data: bytes) -> bytes:
        """``data`` (UTF-8 or not) with every secret value's UTF-8 bytes replaced by ``***``."""
        if self._bytes is None or not data:
            return data
        return self._bytes.sub(MASK.encode(), data)

    def json(self, value: Any) -> Any:
        """A copy of the JSON value ``value`` with every string (keys too) masked."""
        if self._text is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.json(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.json(v) for v in value]
        return value

    def stream(self) -> StreamRedactor:
        """A masker for one byte stream (see :class:`StreamRedactor`)."""
        return StreamRedactor(self)


class StreamRedactor:
    """Masks a byte stream that arrives in chunks cut anywhere, even inside a secret value.

    :meth:`feed` returns what can be written now: everything but a tail that could be the
    start of a secret value (held until more bytes show what it is); :meth:`flush` returns the
    rest at the end of the stream.
    """

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._values = sorted((v.encode() for v in redactor.values), key=len, reverse=True)
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        """Mask ``chunk`` (after what was held back); returns the bytes safe to write."""
        buffer = self._buffer + chunk
        if not self._values:
            self._buffer = b""
            return buffer
        cut = len(buffer) - self._held_back(buffer)
        out: list[bytes] = []
        pos = 0
        for start, end in self._spans(buffer):
            if start >= cut:
                break
            if end > cut:  # a whole value across the cut: keep it for the next round
                cut = start
                break
            out += (buffer[pos:start], MASK.encode())
            pos = end
        out.append(buffer[pos:cut])
        self._buffer = buffer[cut:]
        return b"".join(out)

    def _spans(self, data: bytes) -> list[tuple[int, int]]:
        """Where values occur, as a regular expression of the values (longest first) would
        find them: leftmost first, the longest at one start, never overlapping. ``find`` per
        value is several times faster than a regular expression over a stream."""
        hits: list[tuple[int, int]] = []
        for value in self._values:
            at = data.find(value)
            while at != -1:
                hits.append((at, -len(value)))
                at = data.find(value, at + 1)
        hits.sort()
        spans: list[tuple[int, int]] = []
        pos = 0
        for start, negative in hits:
            if start >= pos:
                spans.append((start, start - negative))
                pos = start - negative
        return spans

    def flush(self) -> bytes:
        """The masked rest of the stream."""
        rest, self._buffer = self._buffer, b""
        return self._redactor.data(rest)

    def _held_back(self, buffer: bytes) -> int:
        longest = 0
        for value in self._values:
            for size in range(min(len(value) - 1, len(buffer)), longest, -1):
                if buffer.endswith(value[:size]):
                    longest = size
                    break
        return longest


__all__ = ["MASK", "MIN_LENGTH", "Redactor", "StreamRedactor"]
