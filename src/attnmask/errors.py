"""The one error root of attnmask.

Every error raised on bad input is a :class:`MaskError`, which is a
``ValueError``, so ``except ValueError`` callers keep working. Subclasses let a
caller tell syntax problems (where in the text) from bad values (which rule).
"""

from __future__ import annotations


class MaskError(ValueError):
    """Root of every error attnmask raises on bad input."""


def _columns(ch: str) -> int:
    """Terminal columns a printable character takes (0 for combining marks, 2 for wide ones)."""
    import unicodedata
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


class MaskSyntaxError(MaskError):
    """The text of a mask expression cannot be parsed.

    ``position`` is the 0-based character offset of the problem in ``text``;
    ``str(err)`` shows the text with a caret under that position.
    """

    def __init__(self, message: str, text: str | None = None, position: int | None = None):
        self.message = message
        self.text = text
        self.position = position
        super().__init__(self._render())

    def _render(self) -> str:
        if self.text is None or self.position is None:
            return self.message
        text, pos = self.text, self.position
        # Show a window of at most ~70 characters around the problem so that a
        # megabyte of input still gives a readable, one-screen message.
        start = max(0, pos - 40)
        end = min(len(text), pos + 30)
        shown = text[start:end]
        shown = "".join(ch if ch.isprintable() else "?" for ch in shown)
        prefix = "..." if start > 0 else ""
        suffix = "..." if end < len(text) else ""
        # Pad by display width: a wide character (CJK, most emoji) takes two terminal columns.
        caret = " " * (len(prefix) + sum(_columns(ch) for ch in shown[:pos - start])) + "^"
        return f"{self.message} (at position {pos})\n  {prefix}{shown}{suffix}\n  {caret}"

    def one_line(self) -> str:
        """The message without the caret drawing, for one-line reports."""
        if self.position is None:
            return self.message
        return f"{self.message} (at position {self.position})"


class MaskValueError(MaskError):
    """A parameter, length or option has a value outside its rule."""


class DenseTooLargeError(MaskError):
    """A dense result would exceed the allowed number of cells."""


class LayoutTooLargeError(MaskError):
    """A block layout would need more pieces than the compiler allows (a pattern
    that repeats faster than the block size, at a large length)."""
