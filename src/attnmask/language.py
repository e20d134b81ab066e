"""The mask language: a tokenizer and recursive-descent parser.

Grammar (loosest first, exactly as Python binds these operators)::

    expr    := and_ ('|' and_)*
    and_    := sub ('&' sub)*
    sub     := unary ('-' unary)*
    unary   := '~' unary | atom
    atom    := NAME [ '(' [arg (',' arg)*] ')' ] | '(' expr ')'
    arg     := ['-'] INT

Nothing is evaluated: names are looked up in the primitive table and nowhere
else. Depth is counted explicitly, so no input can exhaust Python's stack,
and every failure is a MaskSyntaxError (where) or MaskValueError (which rule).
"""

from __future__ import annotations

import difflib

from .errors import MaskError, MaskSyntaxError, MaskValueError
from .masks import MAX_DEPTH, MAX_PARAM, Complement, Difference, Intersection, Mask, Union
from .primitives import lookup, names

_MAX_DIGITS = 12  # anything longer is over MAX_PARAM; never build huge ints


def suggest_name(name: str) -> str | None:
    """The nearest primitive name to a misspelling, if any is close."""
    close = difflib.get_close_matches(name.lower(), names(), n=1, cutoff=0.5)
    return close[0] if close else None


class _Token:
    __slots__ = ("kind", "text", "pos")

    def __init__(self, kind: str, text: str, pos: int):
        self.kind, self.text, self.pos = kind, text, pos


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
        elif ch in "|&-~(),":
            tokens.append(_Token(ch, ch, i))
            i += 1
        elif ch.isascii() and ch.isdigit():
            j = i
            while j < n and text[j].isascii() and text[j].isdigit():
                j += 1
            tokens.append(_Token("INT", text[i:j], i))
            i = j
        elif ch.isascii() and (ch.isalpha() or ch == "_"):
            j = i
            while j < n and text[j].isascii() and (text[j].isalnum() or text[j] == "_"):
                j += 1
            tokens.append(_Token("NAME", text[i:j], i))
            i = j
        else:
            shown = repr(ch)
            hint = ""
            if ch == "^":
                hint = "; the language has | & - ~ only"
            elif ch in "+*/%<>=!.[]{}:;'\"":
                hint = "; the language has primitives, | & - ~ and parentheses only"
            raise MaskSyntaxError(f"unexpected character {shown}{hint}", text, i)
    tokens.append(_Token("END", "", n))
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    # -- helpers --
    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def error(self, message: str, tok: _Token) -> MaskSyntaxError:
        return MaskSyntaxError(message, self.text, tok.pos)

    def describe(self, tok: _Token) -> str:
        return "end of text" if tok.kind == "END" else repr(tok.text)

    def enter(self, tok: _Token):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"expression nests more than {MAX_DEPTH} levels deep", tok)

    def build(self, fn, tok: _Token, *args) -> Mask:
        try:
            return fn(*args)
        except MaskSyntaxError:
            raise
        except MaskError as e:
            raise MaskValueError(f"{e} (at position {tok.pos})") from None

    # -- grammar --
    def parse(self) -> Mask:
        if self.peek().kind == "END":
            raise self.error("empty mask expression; try e.g. 'causal & sliding(256)'", self.peek())
        m = self.expr()
        tok = self.peek()
        if tok.kind != "END":
            if tok.kind == ")":
                raise self.error("unmatched ')'", tok)
            raise self.error(f"expected an operator (| & -) or end of text, got {self.describe(tok)}", tok)
        return m

    # Chains are collected first and built once: folding `a | b | c ...` pair by
    # pair would copy the growing tuple each time (quadratic on long inputs).
    def expr(self) -> Mask:
        parts = [self.and_()]
        tok = self.peek()
        while self.peek().kind == "|":
            self.take()
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else self.build(Union.chain, tok, parts)

    def and_(self) -> Mask:
        parts = [self.sub()]
        tok = self.peek()
        while self.peek().kind == "&":
            self.take()
            parts.append(self.sub())
        return parts[0] if len(parts) == 1 else self.build(Intersection.chain, tok, parts)

    def sub(self) -> Mask:
        m = self.unary()
        while self.peek().kind == "-":
            tok = self.take()
            m = self.build(Difference, tok, m, self.unary())
        return m

    def unary(self) -> Mask:
        # '~~~~x' is iterative here so a long run of '~' cannot recurse deeply.
        nots = []
        while self.peek().kind == "~":
            nots.append(self.take())
            if len(nots) > MAX_DEPTH:
                raise self.error(f"expression nests more than {MAX_DEPTH} levels deep", nots[-1])
        m = self.atom()
        for tok in reversed(nots):
            m = self.build(Complement, tok, m)
        return m

    def atom(self) -> Mask:
        tok = self.take()
        if tok.kind == "(":
            self.enter(tok)
            if self.peek().kind == ")":
                raise self.error("empty parentheses", self.peek())
            m = self.expr()
            close = self.take()
            if close.kind != ")":
                raise self.error(f"expected ')' to close the '(' at position {tok.pos}, "
                                 f"got {self.describe(close)}", close)
            self.depth -= 1
            return m
        if tok.kind == "NAME":
            return self.primitive(tok)
        if tok.kind == "INT":
            raise self.error(f"expected a mask, got the number {tok.text}; numbers go inside a "
                             f"primitive, e.g. sliding({tok.text})", tok)
        if tok.kind == "END":
            raise self.error("expression ends where a mask was expected", tok)
        raise self.error(f"expected a mask (a primitive or '('), got {self.describe(tok)}", tok)

    def primitive(self, tok: _Token) -> Mask:
        name = tok.text
        kind = lookup(name)
        if kind is None:
            hint = suggest_name(name)
            msg = f"unknown name {name!r}"
            msg += f"; did you mean {hint!r}?" if hint else f"; the primitives are {', '.join(names())}"
            raise self.error(msg, tok)
        has_call = self.peek().kind == "("
        if not has_call:
            if kind.max_args == 0:
                return kind.make()
            raise self.error(f"{name} needs parameters: {kind.signature}", tok)
        open_tok = self.take()
        args: list[int] = []
        if self.peek().kind != ")":
            while True:
                args.append(self.integer())
                sep = self.take()
                if sep.kind == ")":
                    break
                if sep.kind != ",":
                    raise self.error(f"expected ',' or ')' in the parameters of {name}, got {self.describe(sep)}", sep)
        else:
            self.take()
        if kind.max_args == 0:
            raise self.error(f"{name} takes no parameters; write {name} without parentheses", open_tok)
        # The kind checks the number of parameters with a MaskValueError.
        return self.build(kind.make, tok, *args)

    def integer(self) -> int:
        tok = self.take()
        sign = 1
        if tok.kind == "-":
            sign = -1
            tok = self.take()
        if tok.kind != "INT":
            raise self.error(f"expected a whole number, got {self.describe(tok)}", tok)
        digits = tok.text.lstrip("0") or "0"
        if len(digits) > _MAX_DIGITS:
            raise MaskValueError(f"number {tok.text[:20]}{'...' if len(tok.text) > 20 else ''} is too large "
                                 f"(limit {MAX_PARAM}) (at position {tok.pos})")
        return sign * int(digits)


def parse(text: str) -> Mask:
    """Parse mask text into a :class:`Mask`; never evaluates code.

        >>> import attnmask as am
        >>> am.parse("causal & (sliding(4096) | sink(4))") == am.causal & (am.sliding(4096) | am.sink(4))
        True
        >>> am.parse("casual")
        Traceback (most recent call last):
        ...
        attnmask.errors.MaskSyntaxError: unknown name 'casual'; did you mean 'causal'? (at position 0)
          casual
          ^
    """
    if not isinstance(text, str):
        raise MaskValueError(f"parse() needs a string, got {type(text).__name__}")
    return _Parser(text).parse()


def as_mask(mask: "Mask | str", who: str | None = None) -> Mask:
    """A Mask from a Mask or its text (parsed); anything else is a MaskValueError.

    Every public entry point that takes "a mask" accepts both; ``who`` names
    it in the error.

        >>> import attnmask as am
        >>> as_mask("causal & sliding(4)") == am.causal & am.sliding(4)
        True
    """
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, str):
        return parse(mask)
    need = f"{who} needs" if who else "expected"
    raise MaskValueError(f"{need} a Mask or mask text, got {type(mask).__name__}; "
                         f"pass e.g. am.causal or 'causal & sliding(256)'")
