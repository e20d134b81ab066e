"""Token ids of text files, cut to a length, for capturing and fitting (the CLI's and benchmarks' input)."""

from __future__ import annotations

import os

import torch

from ..errors import MaskValueError


def read_text(path: str | os.PathLike) -> str:
    """The text of a file, refused with a MaskError naming the path when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        raise MaskValueError(f"no text file at {os.fspath(path)!r}") from None
    except IsADirectoryError:
        raise MaskValueError(f"{os.fspath(path)!r} is a folder; give a text file") from None
    except OSError as e:
        raise MaskValueError(f"cannot read {os.fspath(path)!r}: {e.strerror or e}") from None


def text_ids(tok, path: str | os.PathLike, length: int, *, exact: bool = True) -> torch.Tensor:
    """The first ``length`` token ids ``[L]`` of a file. ``exact``: a shorter file is an error (fits
    compare texts of one length); otherwise all its tokens are used.

        >>> class Tok:                                   # any tokenizer returning input_ids
        ...     def __call__(self, text, return_tensors=None):
        ...         return type("E", (), {"input_ids": torch.tensor([[ord(c) for c in text]])})()
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"; _ = p.write_text("hello")
        >>> text_ids(Tok(), p, 3).tolist()
        [104, 101, 108]
    """
    text = read_text(path)
    ids = tok(text, return_tensors="pt").input_ids[0]
    if len(ids) < 2:
        raise MaskValueError(f"{os.fspath(path)!r} has {len(ids)} tokens; give a longer text")
    if len(ids) < length and exact:
        raise MaskValueError(f"{os.fspath(path)!r} has {len(ids)} tokens, fewer than --length {length}; "
                             f"give a longer text or a smaller --length")
    return ids[:length]


__all__ = ["read_text", "text_ids"]
