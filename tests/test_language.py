"""The mask language: text round trips, canonical printing, precedence, errors, fuzzing.

Held to PRODUCT.md: ``am.parse(str(m)) == m`` for every mask; ``str`` uses the
fewest parentheses Python's precedence allows; ``| & - ~`` bind exactly as in
Python, binary operators associate to the left, spaces are free; errors say
what and where (``.position`` and a caret) and suggest the nearest name; and
any string whatsoever gives a Mask or a MaskError, quickly, without evaluating
code and without RecursionError.
"""

from __future__ import annotations

import builtins
import random
import re
import signal
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import attnmask as am
from attnmask.language import suggest_name
from strategies import build, full_text, mask_specs, masks

a, b, c = am.causal, am.sliding(4), am.sink(2)
MAX = 2**31 - 1   # the largest parameter the library accepts

# ---------------------------------------------------------------------------
# round trips and canonical text
# ---------------------------------------------------------------------------


@given(masks())
def test_round_trip_through_text(mask):
    text = str(mask)
    back = am.parse(text)
    assert back == mask and hash(back) == hash(mask)
    assert str(back) == text   # canonical: printing is a fixed point


@given(mask_specs())
def test_python_operators_mirror_the_language(spec):
    # The fully parenthesised text states exactly how Python combined the parts.
    assert am.parse(full_text(spec)) == build(spec)


CANONICAL = [
    (a & (b | c), "causal & (sliding(4) | sink(2))"),
    ((a & b) | c, "causal & sliding(4) | sink(2)"),
    (a | (b & c), "causal | sliding(4) & sink(2)"),
    (a - (b - c), "causal - (sliding(4) - sink(2))"),
    ((a - b) - c, "causal - sliding(4) - sink(2)"),
    (a | (b | c), "causal | (sliding(4) | sink(2))"),
    ((a | b) | c, "causal | sliding(4) | sink(2)"),
    (a & (b & c), "causal & (sliding(4) & sink(2))"),
    (a & (b - c), "causal & sliding(4) - sink(2)"),
    ((a & b) - c, "(causal & sliding(4)) - sink(2)"),
    ((a | b) - c, "(causal | sliding(4)) - sink(2)"),
    (~(a | b), "~(causal | sliding(4))"),
    (~(a & b), "~(causal & sliding(4))"),
    (~(a - b), "~(causal - sliding(4))"),
    (~a & ~b, "~causal & ~sliding(4)"),
    (~~a, "~~causal"),
    (a - ~b, "causal - ~sliding(4)"),
    (~a - b, "~causal - sliding(4)"),
    (am.rows(3), "rows(3)"),
    (am.rows(3, 4, 1), "rows(3)"),
    (am.rows(3, 7), "rows(3, 7)"),
    (am.rows(3, 7, 1), "rows(3, 7)"),
    (am.cols(3, 7, 2), "cols(3, 7, 2)"),
    (am.document(5, 1, 3), "document(5, 1, 3)"),
    (am.band(0, 3), "band(0, 3)"),
    (am.dilated(4, 2), "dilated(4, 2)"),
    (am.full | am.none & am.diagonal, "full | none & diagonal"),
    (am.causal - (am.rows(36, 64, 8) - am.diagonal), am.SIGNATURE),
]


@pytest.mark.parametrize("mask,text", CANONICAL, ids=[t for _, t in CANONICAL])
def test_canonical_text(mask, text):
    assert str(mask) == text
    assert am.parse(text) == mask


def _grouping_paren_pairs(text: str) -> list[tuple[int, int]]:
    """(open, close) indices of parentheses that group, not those of a primitive's call."""
    pairs, stack = [], []
    for i, ch in enumerate(text):
        if ch == "(":
            stack.append((i, i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_")))
        elif ch == ")":
            j, is_call = stack.pop()
            if not is_call:
                pairs.append((j, i))
    return pairs


@given(masks())
def test_str_uses_the_fewest_parentheses(mask):
    # Every grouping pair is necessary: without it the text means another tree.
    text = str(mask)
    for i, j in _grouping_paren_pairs(text):
        stripped = text[:i] + text[i + 1:j] + text[j + 1:]
        try:
            other = am.parse(stripped)
        except am.MaskError:
            continue
        assert other != mask, f"parentheses at {i}..{j} of {text!r} are redundant"


def test_fewest_parentheses_check_is_not_vacuous():
    pairs = _grouping_paren_pairs("~(causal | sliding(4)) & (sink(2) - diagonal)")
    assert pairs == [(1, 21), (25, 44)]


# ---------------------------------------------------------------------------
# precedence, associativity, whitespace
# ---------------------------------------------------------------------------

PRECEDENCE = [
    ("causal | sliding(4) & sink(2)", a | (b & c)),
    ("causal & sliding(4) | sink(2)", (a & b) | c),
    ("causal & sliding(4) - sink(2)", a & (b - c)),
    ("causal - sliding(4) & sink(2)", (a - b) & c),
    ("causal | sliding(4) - sink(2)", a | (b - c)),
    ("~causal - sliding(4)", (~a) - b),
    ("~causal & sliding(4)", (~a) & b),
    ("~causal | sliding(4)", (~a) | b),
    ("causal - ~sliding(4)", a - (~b)),
    ("~~causal", ~(~a)),
    ("causal - sliding(4) - sink(2)", (a - b) - c),
    ("causal | sliding(4) | sink(2)", (a | b) | c),
    ("causal & sliding(4) & sink(2)", (a & b) & c),
    ("causal - (sliding(4) - sink(2))", a - (b - c)),
    ("((causal))", a),
    ("~(causal)", ~a),
    ("causal&(sliding(4)|sink(2))", a & (b | c)),
    ("  causal &\n( sliding ( 4 ) |\tsink(2) )  ", a & (b | c)),
    ("\r\ncausal\r\n", a),
    ("rows(3, 4, 1)", am.rows(3)),
    ("document(007, 0010)", am.document(7, 10)),
]


@pytest.mark.parametrize("text,mask", PRECEDENCE, ids=[repr(t) for t, _ in PRECEDENCE])
def test_precedence_and_associativity(text, mask):
    assert am.parse(text) == mask


_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|[|&\-~(),]")


@given(masks(), st.randoms(use_true_random=False))
def test_spaces_are_free(mask, rnd):
    tokens = _TOKEN.findall(str(mask))
    assert "".join(tokens) == str(mask).replace(" ", "")
    # Two names or two numbers cannot touch, the rest may be glued or spaced at will.
    out = []
    for i, tok in enumerate(tokens):
        if i:
            glue = tok[0].isalnum() and tokens[i - 1][-1].isalnum()
            out.append(rnd.choice([" ", "\t", "\n", "  ", " \r\n "]) if glue or rnd.random() < 0.5 else "")
        out.append(tok)
    assert am.parse("".join(out)) == mask


# ---------------------------------------------------------------------------
# errors: what and where
# ---------------------------------------------------------------------------

MISSPELLINGS = [("casual", "causal"), ("slidng", "sliding"), ("Causal", "causal"), ("sliding_window", "sliding"),
                ("documnet", "document"), ("prefixlm", "prefix_lm"), ("chunk", "chunked"), ("dilate", "dilated"),
                ("strided_", "strided"), ("bnad", "band"), ("rowz", "rows"), ("colls", "cols"),
                ("sinks", "sink"), ("diagnoal", "diagonal"), ("ful", "full"), ("nONE", "none")]


@pytest.mark.parametrize("wrong,right", MISSPELLINGS)
def test_misspelling_suggests_nearest_name(wrong, right):
    assert suggest_name(wrong) == right
    text = f"causal & {wrong}(3)"
    with pytest.raises(am.MaskSyntaxError) as info:
        am.parse(text)
    err = info.value
    assert f"did you mean '{right}'" in str(err)
    assert err.position == 9


def test_unknown_name_without_near_match_lists_primitives():
    with pytest.raises(am.MaskSyntaxError) as info:
        am.parse("xyzzyq")
    assert "causal" in str(info.value) and "sliding" in str(info.value)


SYNTAX = [
    ("", 0), ("   ", 3), ("causal &", 8), ("causal & & sink(2)", 9), ("(causal", 7), ("causal)", 6),
    ("causal sliding(3)", 7), ("sliding(3", 9), ("sliding(x)", 8), ("causal ^ sink(1)", 7),
    ("| causal", 0), ("()", 1), ("sliding(1)(2)", 10), ("causal.__class__", 6), ("sliding(1.5)", 9),
    ("3", 0), ("sliding(3,)", 10), ("sliding(--3)", 9), ("causal ~ full", 7), ("-causal", 0),
    ("causal | <mine>", 9), ("sliding(\u0663)", 8), ("caus\u00e9l", 4),
]


@pytest.mark.parametrize("text,position", SYNTAX, ids=[repr(t) for t, _ in SYNTAX])
def test_syntax_error_position_and_caret(text, position):
    with pytest.raises(am.MaskSyntaxError) as info:
        am.parse(text)
    err = info.value
    assert err.position == position, str(err)
    lines = str(err).split("\n")
    assert len(lines) == 3 and f"position {position}" in lines[0]
    caret = lines[2].index("^")
    assert lines[2].strip() == "^"
    if position < len(text):   # the caret stands under the offending character
        assert lines[1][caret] == text[position]
    else:                      # or just past the end of the text
        assert caret == len(lines[1])
    assert "\n" not in err.one_line() and str(position) in err.one_line()


def test_caret_for_long_text_is_windowed():
    text = "causal | " * 2000 + "sliding(0x1)"
    with pytest.raises(am.MaskSyntaxError) as info:
        am.parse(text)
    lines = str(info.value).split("\n")
    assert info.value.position == text.index("x1")
    assert len(lines[1]) < 120 and lines[1][lines[2].index("^")] == "x"


VALUE_ERRORS = [
    ("sliding(0)", ["sliding(w) needs w >= 1, got w=0"]),
    ("causal & band(-1, 2)", ["band(l, r) needs l >= 0, got l=-1"]),
    ("rows(5, 2)", ["rows(", "b >= a", "b=2"]),
    ("cols(1, 2, 0)", ["cols(", "s >= 1", "s=0"]),
    ("document(3, 0)", ["document(", "n2=0"]),
    ("document()", ["document(", "at least 1"]),
    ("sliding(" + "9" * 5000 + ")", ["too large"]),
    ("sliding(2147483648)", ["too large", "2147483648"]),
    ("causal(1)", ["causal", "no parameters"]),
    # Arity from text: the parser must turn these into MaskErrors, not TypeErrors.
    ("sliding()", ["sliding("]),
    ("sliding(1, 2)", ["sliding("]),
    ("band(1)", ["band("]),
    ("dilated(1, 2, 3)", ["dilated("]),
    ("rows(1, 2, 3, 4)", ["rows("]),
    ("cols()", ["cols("]),
]


@pytest.mark.parametrize("text,parts", VALUE_ERRORS, ids=[t[:30] for t, _ in VALUE_ERRORS])
def test_value_error_messages(text, parts):
    with pytest.raises(am.MaskError) as info:
        am.parse(text)
    for part in parts:
        assert part in str(info.value), f"{part!r} missing from {str(info.value)!r}"


EDGE_CALLS = [("rows", (MAX,)), ("cols", (MAX,)), ("rows", (MAX, MAX)), ("cols", (0, MAX, MAX)),
              ("sliding", (MAX,)), ("band", (MAX, MAX)), ("dilated", (MAX, MAX)), ("document", (MAX, MAX)),
              ("sliding", (MAX + 1,)), ("rows", (MAX + 1,)), ("sink", (0,)), ("rows", (0, 0))]


@pytest.mark.parametrize("name,args", EDGE_CALLS, ids=[f"{n}{a}" for n, a in EDGE_CALLS])
def test_text_and_python_agree_at_the_edges(name, args):
    # The same call written as text or in Python is the same mask, or the same refusal.
    def outcome(make):
        try:
            return make()
        except am.MaskValueError:
            return "MaskValueError"
    from_text = outcome(lambda: am.parse(f"{name}({', '.join(map(str, args))})"))
    from_python = outcome(lambda: getattr(am, name)(*args))
    assert from_text == from_python


def test_primitive_without_parameters_says_how_to_call_it():
    with pytest.raises(am.MaskSyntaxError) as info:
        am.parse("causal & sliding")
    assert "sliding(w)" in str(info.value) and info.value.position == 9


@pytest.mark.parametrize("value", [None, 3, b"causal", ["causal"], am.causal])
def test_parse_needs_a_string(value):
    with pytest.raises(am.MaskError):
        am.parse(value)


def test_errors_are_value_errors():
    for cls in (am.MaskSyntaxError, am.MaskValueError, am.DenseTooLargeError):
        assert issubclass(cls, am.MaskError) and issubclass(cls, ValueError)


# ---------------------------------------------------------------------------
# fuzzing: only ever a Mask or a MaskError, quickly
# ---------------------------------------------------------------------------

class _Hang(BaseException):
    """Raised by the timer; a BaseException so nothing in the parser can swallow it."""


class _Evaluated(BaseException):
    """Raised if the parser calls eval, exec or compile."""


_FORBIDDEN = ("eval", "exec", "compile")


def _outcome(text, watchdog: float = 120.0):
    """parse(text): the Mask or the MaskError (anything else fails the test).

    Speed is not measured here (benchmarks/bench_parse.py times the giants; the
    linear-time guarantee is checked by counting work, below). The CPU-time
    watchdog only turns a parser that never returns into a failure instead of a
    stuck suite; it is far above any real parse (the 10^6-character inputs take
    well under a second).
    """
    def on_alarm(signum, frame):
        raise _Hang()

    def forbidden(*args, **kwargs):
        raise _Evaluated()
    saved = {name: getattr(builtins, name) for name in _FORBIDDEN}
    old = signal.signal(signal.SIGPROF, on_alarm)
    failure = None
    try:
        # While parsing, evaluating or compiling any code is an error.
        for name in _FORBIDDEN:
            setattr(builtins, name, forbidden)
        signal.setitimer(signal.ITIMER_PROF, watchdog)
        result = am.parse(text)
    except am.MaskError as err:
        result = err
    except _Hang:
        failure = f"parse did not return (> {watchdog} s of CPU)"
    except _Evaluated:
        failure = "parse called eval/exec/compile"
    except BaseException as err:   # noqa: BLE001 - anything else is the bug we look for
        failure = f"parse raised {type(err).__name__}: {str(err)[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)
        for name, fn in saved.items():
            setattr(builtins, name, fn)
    if failure:
        pytest.fail(f"{failure} on {text[:60]!r} ({len(text)} chars)")
    if isinstance(result, am.MaskSyntaxError):
        assert result.position is not None and 0 <= result.position <= len(text)
        assert "^" in str(result)
    else:
        assert isinstance(result, (am.Mask, am.MaskError))
    return result


N = 10**5
ADVERSARIAL = {
    "import": "__import__('os').system('ls')",
    "attribute": "causal.__class__",
    "dunder name": "__class__",
    "call of a call": "sliding(1)(2)",
    "lambda": "lambda: causal",
    "eval": "eval('causal')",
    "statement": "causal; import os",
    "conditional": "causal if 1 else full",
    "subscript": "causal[0]",
    "list": "[causal]",
    "keyword arg": "sliding(w=3)",
    "float": "sliding(1e3)",
    "hex": "sliding(0x10)",
    "underscore int": "sliding(1_000)",
    "plus sign": "sliding(+3)",
    "unary minus mask": "-causal",
    "fullwidth": "\uff43\uff41\uff55\uff53\uff41\uff4c",
    "arabic digit": "sliding(\u0663)",
    "zero width": "causal\u200b",
    "nul": "causal\x00",
    "escape": "\x1b[31mcausal",
    "bom": "\ufeffcausal",
    "surrogate": "causal | \ud800",
    "emoji": "causal & \U0001f600",
    "form feed": "causal\x0c| full",
    "empty": "",
    "whitespace": " \t\n\r ",
    "open": "(",
    "close": ")",
    "trailing op": "causal |",
    "leading op": "& causal",
    "double op": "causal || full",
    "unbalanced": "((causal)",
    "unbalanced 2": "(causal))",
    "comma": "causal, full",
    "empty args comma": "sliding(,)",
    "huge number": "sliding(" + "9" * 5000 + ")",
    "huge zeros": "sliding(" + "0" * 5000 + "3)",
    "huge negative": "band(-" + "9" * 5000 + ", 1)",
    "megabyte number": "sliding(" + "1" * 10**6 + ")",
    "long spaces": "causal" + " " * 10**6,
    "long name": "c" * 10**6,
    "many args": "document(" + ", ".join(["1"] * N) + ")",
    "nest 150": "(" * 150 + "causal" + ")" * 150,
    "nest 190": "(" * 190 + "causal" + ")" * 190,
    "nest 199": "(" * 199 + "causal" + ")" * 199,
    "nest 200": "(" * 200 + "causal" + ")" * 200,
    "nest 201": "(" * 201 + "causal" + ")" * 201,
    "nest 1e5": "(" * N + "causal" + ")" * N,
    "nest 1e5 unclosed": "(" * N,
    "closes 1e5": ")" * N,
    "not-nest 1e5": "~(" * N + "causal" + ")" * N,
    "tilde 1e5": "~" * N + "causal",
    "tilde 200": "~" * 200 + "causal",
    "or chain 1e5": " | ".join(["causal"] * N),
    "and chain 1e5": " & ".join(["causal"] * N),
    "sub chain 1e5": " - ".join(["causal"] * N),
    "mixed chain 1e5": " | ".join(["causal & sliding(3)"] * (N // 2)),
    "right nest 1e5": "causal | (" * N + "full" + ")" * N,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_input(name):
    _outcome(ADVERSARIAL[name])


def test_valid_giants_parse_to_masks():
    # Long but legal inputs are masks, not errors.
    doc = _outcome("document(" + ", ".join(["1"] * N) + ")")
    assert isinstance(doc, am.Mask) and len(str(doc)) > N
    spaced = _outcome("causal" + " " * 10**6)
    assert spaced == am.causal
    nest = _outcome("(" * 50 + "causal" + ")" * 50)
    assert nest == am.causal


# ---------------------------------------------------------------------------
# linear time, by counting work (deterministic: no clock)
# ---------------------------------------------------------------------------

#: The adversarial families of ADVERSARIAL as functions of a size n.
SCALED = {
    "spaces": lambda n: "causal" + " " * n,
    "long name": lambda n: "c" * n,
    "long number": lambda n: "sliding(" + "1" * n + ")",
    "many args": lambda n: "document(" + ", ".join(["1"] * n) + ")",
    "nest": lambda n: "(" * n + "causal" + ")" * n,
    "unclosed": lambda n: "(" * n,
    "closes": lambda n: ")" * n,
    "tildes": lambda n: "~" * n + "causal",
    "not-nest": lambda n: "~(" * n + "causal" + ")" * n,
    "or chain": lambda n: " | ".join(["causal"] * n),
    "and chain": lambda n: " & ".join(["causal"] * n),
    "sub chain": lambda n: " - ".join(["causal"] * n),
    "mixed chain": lambda n: " | ".join(["causal & sliding(3)"] * n),
    "right nest": lambda n: "causal | (" * n + "full" + ")" * n,
    "bad tail": lambda n: " | ".join(["causal"] * n) + " | ^",
}
_PACKAGE = str(Path(am.__file__).resolve().parent)


def _work(text: str) -> int:
    """The parser's work on ``text``: Python lines run inside the package, plus every element put
    into an operator's tuple of parts (tuple building is C code that line counting does not see;
    folding a chain pair by pair would copy its growing tuple each time)."""
    from attnmask.masks import _Chain
    lines = 0
    placed = 0

    def local(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename.startswith(_PACKAGE) else None

    original = _Chain.__dict__["chain"]

    def counting_chain(cls, parts):
        nonlocal placed
        out = original.__func__(cls, parts)
        placed += len(out.parts)
        return out
    _Chain.chain = classmethod(counting_chain)
    sys.settrace(tracer)
    try:
        try:
            am.parse(text)
        except am.MaskError:
            pass
    finally:
        sys.settrace(None)
        _Chain.chain = original
    return lines + placed


def _growth(make) -> float:
    """How much the work grows when the input grows 4x (4 or less: linear)."""
    return _work(make(2000)) / max(1, _work(make(500)))


@pytest.mark.parametrize("name", list(SCALED))
def test_parsing_work_grows_linearly_with_the_input(name):
    assert _growth(SCALED[name]) <= 4.4, f"{name}: 4x the input costs {_growth(SCALED[name]):.1f}x the work"


def test_the_work_count_sees_a_quadratic_parser(monkeypatch):
    # Folding `a | b | c ...` pair by pair (what the parser avoids) copies the growing tuple each time.
    from attnmask.language import _Parser
    from attnmask.masks import Union

    def folding_expr(self):
        m = self.and_()
        while self.peek().kind == "|":
            self.take()
            m = Union.of(m, self.and_())
        return m
    assert _growth(SCALED["or chain"]) <= 4.4
    monkeypatch.setattr(_Parser, "expr", folding_expr)
    assert _growth(SCALED["or chain"]) > 8


def _deepest(step) -> am.Mask:
    """Apply ``step`` until the library refuses to nest deeper; the last accepted mask."""
    m = am.causal
    for _ in range(10_000):
        try:
            m = step(m)
        except am.MaskError:
            return m
    raise AssertionError("the library accepted a mask nested 10,000 levels deep")


DEEPEST = {
    "difference, right": lambda m: am.causal - m,
    "complement": lambda m: ~m,
    "complement of union": lambda m: ~(m | am.diagonal),
    "and of or": lambda m: am.sink(1) & (am.diagonal | m),
    "or of and, right": lambda m: am.diagonal | am.sink(2) & m,
}


@pytest.mark.parametrize("name", list(DEEPEST))
def test_round_trip_of_the_deepest_masks(name):
    # Every mask the library lets you build must come back from its text.
    mask = _deepest(DEEPEST[name])
    back = _outcome(str(mask))
    assert back == mask, f"{str(mask)[:80]}... came back as {back!r}"[:300]


_SOUP = ["causal", "sliding", "rows", "document", "full", "none", "band", "dilated", "(", ")", ",", "|", "&",
         "-", "~", "0", "1", "3", "-1", "2147483648", "99999999999999999999", " ", "\t", "x", "__import__",
         ".", "'", "\x00", "\u00e9", "\u0663", "lambda", "(" * 50, "~" * 50, "<m>"]


@given(st.lists(st.sampled_from(_SOUP), max_size=40).map("".join))
def test_fuzz_token_soup(text):
    _outcome(text)


@given(st.text(max_size=60))
def test_fuzz_random_unicode(text):
    _outcome(text)


@given(st.text(alphabet=st.characters(codec="ascii"), max_size=60))
def test_fuzz_random_ascii_and_controls(text):
    _outcome(text)


@given(masks(), st.randoms(use_true_random=False))
def test_fuzz_mutations_of_valid_text(mask, rnd):
    text = str(mask)
    for _ in range(5):
        i = rnd.randrange(len(text) + 1)
        op = rnd.choice(["delete", "insert", "replace", "duplicate"])
        ch = rnd.choice("()|&-~,0123456789 xs_\x00\u00e9")
        if op == "delete":
            text = text[:i] + text[i + 1:]
        elif op == "insert":
            text = text[:i] + ch + text[i:]
        elif op == "replace":
            text = text[:i] + ch + text[i + 1:]
        else:
            text = text[:i] + text[i:i + 8] + text[i:]
        _outcome(text)


def test_fuzz_random_bytes_decoded():
    rnd = random.Random(1234)
    for _ in range(300):
        raw = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 80)))
        _outcome(raw.decode("latin-1"))


def test_caret_counts_terminal_columns_of_wide_characters():
    # Two columns per wide character before the position, none for a combining mark.
    err = am.MaskSyntaxError("bad", "日本 ?", 3)
    line, caret = str(err).splitlines()[1:]
    assert caret.index("^") == line.index("?") + 2           # "日本" is 4 columns, 2 characters
    err = am.MaskSyntaxError("bad", "e\u0301 ?", 3)            # e + combining acute: one column
    assert str(err).splitlines()[2].index("^") == 2 + 2
