"""Path patterns in gitignore style, for ``image.exclude``, ``image.layers`` and
``image.allow_secrets``.

Owns the glob grammar: ``*`` (any run of characters but ``/``), ``?``, ``[a-z]`` classes,
``**`` (any number of directories), a trailing ``/`` (directories only), a leading or inner
``/`` (anchored to the context root, otherwise the pattern matches at any depth) and a leading
``!`` (negation: re-include). Paths are POSIX, relative to the context root, without a leading
``/``. Knows nothing of files on disk.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from castiron.errors import ImageError


@dataclass(frozen=True)
class PathPattern:
    """One compiled pattern."""

    text: str
    negated: bool
    dir_only: bool
    regex: re.Pattern[str]

    def matches(self, path: str, is_dir: bool) -> bool:
        """True when the pattern (ignoring negation) matches ``path`` itself."""
        if self.dir_only and not is_dir:
            return False
        return self.regex.fullmatch(path) is not None

    def covers(self, path: str, is_dir: bool) -> bool:
        """True when the pattern matches ``path`` or one of its parent directories."""
        if self.matches(path, is_dir):
            return True
        parts = path.split("/")
        return any(self.matches("/".join(parts[:i]), True) for i in range(1, len(parts)))


def _translate(body: str) -> str:
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c == "*":
            if body.startswith("**", i):
                at_start = i == 0 or body[i - 1] == "/"
                at_end = i + 2 == n or body[i + 2] == "/"
                if at_start and at_end:
                    if i + 2 == n:
                        out.append(".*")
                        i += 2
                    else:
                        out.append("(?:[^/]*/)*")
                        i += 3
                    continue
                out.append("[^/]*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = body.find(
                "]", i + 2 if body.startswith("[!", i) or body.startswith("[^", i) else i + 1
            )
            if j == -1:
                out.append(re.escape(c))
            else:
                inner = body[i + 1 : j]
                if inner[:1] in ("!", "^"):
                    inner = "^" + inner[1:]
                out.append("[" + inner.replace("\\", "\\\\") + "]")
                i = j + 1
                continue
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(body[i + 1]))
            i += 2
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def compile_pattern(text: str, where: str = "pattern") -> PathPattern:
    """Compile one gitignore-style pattern.

    Raises:
        ImageError: naming ``where`` for an empty or unusable pattern.
    """
    body = text.strip()
    negated = body.startswith("!")
    if negated or body.startswith("\\!"):
        body = body[1:]
    dir_only = body.endswith("/")
    body = body.rstrip("/")
    anchored = "/" in body
    body = body.lstrip("/")
    while body.startswith("./"):
        body = body[2:]
    if not body:
        raise ImageError(f"{where}: {text!r} is not a usable pattern")
    regex = _translate(body)
    if not anchored:
        regex = "(?:[^/]*/)*" + regex
    try:
        compiled = re.compile(regex, re.DOTALL)
    except re.error as exc:
        raise ImageError(f"{where}: {text!r} is not a valid pattern ({exc})") from None
    return PathPattern(text=text, negated=negated, dir_only=dir_only, regex=compiled)


@dataclass(frozen=True)
class PatternSet:
    """An ordered list of patterns with gitignore semantics (the last match wins)."""

    patterns: tuple[PathPattern, ...]
    _any_file: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _any_dir: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # One alternation per kind rejects the common "no pattern matches" case in one call.
        files = [p.regex.pattern for p in self.patterns if not p.dir_only]
        dirs = [p.regex.pattern for p in self.patterns]
        if files:
            object.__setattr__(
                self, "_any_file", re.compile("|".join(f"(?:{r})" for r in files), re.DOTALL)
            )
        if dirs:
            object.__setattr__(
                self, "_any_dir", re.compile("|".join(f"(?:{r})" for r in dirs), re.DOTALL)
            )

    @classmethod
    def of(cls, texts: Iterable[str], where: str = "pattern") -> PatternSet:
        """Compile ``texts`` in order.

        Raises:
            ImageError: for a bad pattern, naming ``where`` and its index.
        """
        return cls(tuple(compile_pattern(t, f"{where}[{i}]") for i, t in enumerate(texts)))

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def excluded(self, path: str, is_dir: bool) -> bool:
        """True when the last pattern that matches ``path`` is not a negation."""
        quick = self._any_dir if is_dir else self._any_file
        if quick is None or quick.fullmatch(path) is None:
            return False
        result = False
        for p in self.patterns:
            if p.matches(path, is_dir):
                result = not p.negated
        return result

    def first_covering(self, path: str) -> int | None:
        """Index of the first non-negated pattern covering the file ``path``, unless a later
        negation re-includes it; ``None`` when no pattern claims it."""
        for i, p in enumerate(self.patterns):
            if not p.negated and p.covers(path, False):
                if any(q.negated and q.covers(path, False) for q in self.patterns[i + 1 :]):
                    continue
                return i
        return None


__all__ = ["PathPattern", "PatternSet", "compile_pattern"]
