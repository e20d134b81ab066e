"""The ``attnmask`` command: a thin shell over the public API.

Subcommands: ``demo``, ``render``, ``show``, ``stats``, ``export``, ``bench``.
Each parses its arguments, calls one library function and prints or writes
the result; all figures come from the library. Bad input of any kind gives
exactly one line on stderr naming the problem and exit status 2, with no
traceback.

    $ attnmask show "causal & sliding(16)" --length 64
    $ attnmask stats "causal & (sliding(4096) | sink(4))" --length 1048576 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Iterator, Sequence

from .errors import DenseTooLargeError, MaskError, MaskSyntaxError, MaskValueError

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """Bad command-line input; carries the one line to print."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line instead of usage + message + exit."""

    def error(self, message: str):  # noqa: D102 - argparse API
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _length(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def _inches(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of inches, got {text!r}") from None
    if not 0.5 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be between 0.5 and 100 inches, got {text}")
    return value


def _formatter(prog: str) -> argparse.RawDescriptionHelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add_shape(p: argparse.ArgumentParser, *, kv: bool = True, block: bool = True,
               block_help: str = "tile size in tokens", many: bool = False) -> None:
    if many:
        p.add_argument("expr", metavar="EXPR", nargs="+",
                       help="mask expression(s), e.g. 'causal & sliding(256)'; several are drawn side by side")
    else:
        p.add_argument("expr", metavar="EXPR", help="mask expression, e.g. 'causal & sliding(256)'")
    p.add_argument("--length", "-n", type=_length, required=True, metavar="N",
                   help="number of queries (and keys unless --kv-length)")
    if kv:
        p.add_argument("--kv-length", type=_length, default=None, metavar="N",
                       help="number of keys (default: --length)")
        p.add_argument("--q-offset", type=_integer, default=None, metavar="P",
                       help="position of the first query (default: kv-length - length)")
    if block:
        p.add_argument("--block-size", "-b", type=_length, default=None, metavar="B", help=block_help)


DEMO_EPILOG = """examples:
  attnmask demo                       # writes signature.png and shows the mask here
  attnmask demo -o docs/signature.svg
"""
RENDER_EPILOG = """examples:
  attnmask render "causal - (rows(36, 64, 8) - diagonal)" --length 64 -o signature.png
  attnmask render "causal & (sliding(4096) | sink(4))" --length 1048576 -o million.png
  attnmask render "causal & (sliding(4096) | sink(4))" --length 1048576 --scale log -o million.png
  attnmask render "document(300, 500, 224)" --length 1024 -o docs.svg --title "packed documents"
  attnmask render "causal & sliding(64)" --length 16 --kv-length 512 -o decode.pdf
  attnmask render causal "causal & sliding(16)" "chunked(16)" --length 64 -o heads.png   # side by side
"""
SHOW_EPILOG = """examples:
  attnmask show "causal & sliding(16)" --length 64
  attnmask show "causal & (sliding(4096) | sink(4))" --length 1048576 --width 60
  NO_COLOR=1 attnmask show causal --length 32      # plain characters: # + . and space
"""
STATS_EPILOG = """examples:
  attnmask stats "causal & sliding(4096)" --length 131072
  attnmask stats "causal & (sliding(4096) | sink(4))" --length 1048576 --layers 32 --json
  attnmask stats "causal & sliding(1024)" --length 65536 --head-dim 64 --heads 8 --plot cost.png
"""
EXPORT_EPILOG = """examples:
  attnmask export "causal & sliding(256)" --length 4096 -o mask.npy
  python -c "import numpy; print(numpy.load('mask.npy').shape)"      # (4096, 4096), dtype bool
"""
BENCH_EPILOG = """examples:
  attnmask bench --masks sliding,causal --lengths 4096 --no-flex --no-extras
  attnmask bench --lengths 4k,8k,16k --results results.md --plot bench.png

Runs benchmarks/harness.py of the source checkout; writes files only where asked.
"""
MAIN_EPILOG = """examples:
  attnmask demo
  attnmask show "causal & (sliding(8) | sink(2))" --length 48
  attnmask render "causal & (sliding(4096) | sink(4))" --length 1048576 -o million.png
  attnmask stats "causal & sliding(4096)" --length 131072 --layers 32 --json
  attnmask export "causal" --length 1024 -o causal.npy

mask language: full none causal diagonal band(l, r) sliding(w) sink(n) prefix_lm(p) chunked(c)
  dilated(w, d) strided(s) document(n1, n2, ...) rows(a, b, s) cols(a, b, s) window2d(w, h, kw, kh),
  with | & - ~ and ( ).
"""


def build_parser(with_bench: bool = False) -> argparse.ArgumentParser:
    """The argument parser; ``with_bench`` imports the benchmark's own options."""
    from .version import __version__
    parser = _Parser(prog="attnmask", formatter_class=_formatter, epilog=MAIN_EPILOG,
                     description="Describe, see, measure and run attention masks.")
    parser.add_argument("--version", action="version", version=f"attnmask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("demo", help="draw the signature picture", epilog=DEMO_EPILOG,
                       formatter_class=_formatter,
                       description="Render the picture the project started from "
                                   "(causal - (rows(36, 64, 8) - diagonal) at length 64) and show it here.")
    p.add_argument("-o", "--output", default="signature.png", metavar="PATH",
                   help="where to write the picture (.png, .svg or .pdf; default signature.png)")
    p.add_argument("--dpi", type=_length, default=100)

    p = sub.add_parser("render", help="draw a mask's heatmap to PNG, SVG or PDF", epilog=RENDER_EPILOG,
                       formatter_class=_formatter,
                       description="Token-level heatmap up to --token-limit positions a side, exact "
                                   "block-level heatmap (fraction attended per tile) beyond.")
    _add_shape(p, block_help="tile size of a block-level picture (default: at most ~1024 cells a side)",
               many=True)
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="output file: .png, .svg or .pdf")
    p.add_argument("--title", default=None)
    p.add_argument("--dpi", type=_length, default=100)
    p.add_argument("--size", type=_inches, nargs=2, default=None, metavar=("W", "H"), help="figure size in inches")
    p.add_argument("--token-limit", type=_length, default=2048, metavar="T",
                   help="largest side drawn one cell per token (default 2048)")
    p.add_argument("--no-annotate", action="store_true", help="leave density and attended pairs out")
    p.add_argument("--scale", choices=("linear", "log"), default="linear",
                   help="colour scale of block-level cells; log keeps sparse tiles visible (default linear)")

    p = sub.add_parser("show", help="show a mask's heatmap in the terminal", epilog=SHOW_EPILOG,
                       formatter_class=_formatter,
                       description="The heatmap downsampled to the terminal width, in colour on a colour "
                                   "terminal (NO_COLOR respected), with density and attended pairs.")
    _add_shape(p, block=False)
    p.add_argument("--width", type=_length, default=None, metavar="W",
                   help="characters per line (default: terminal width, at most 96)")
    color = p.add_mutually_exclusive_group()
    color.add_argument("--color", dest="color", action="store_const", const=True, default=None,
                       help="force colour")
    color.add_argument("--no-color", dest="color", action="store_const", const=False, help="plain characters")

    p = sub.add_parser("stats", help="exact figures: pairs, density, tiles, FLOPs, reach", epilog=STATS_EPILOG,
                       formatter_class=_formatter,
                       description="Exact statistics of a mask, computed from its structure (no dense "
                                   "matrix): fine at a million tokens.")
    _add_shape(p, kv=False, block_help="tile size for full/partial/empty counts (default 128)")
    p.add_argument("--layers", type=_length, default=1, metavar="L", help="layers stacked (default 1)")
    p.add_argument("--head-dim", type=_length, default=128, metavar="D", help="head dimension (default 128)")
    p.add_argument("--heads", type=_length, default=1, metavar="H", help="number of heads (default 1)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="also draw the analysis picture (.png/.svg/.pdf)")

    p = sub.add_parser("export", help="write the dense bool mask as .npy", epilog=EXPORT_EPILOG,
                       formatter_class=_formatter,
                       description="Write the exact dense bool matrix [length, kv-length] with numpy. "
                                   "Refused above the dense limit (2**30 cells).")
    _add_shape(p, block=False)
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="output file ending in .npy")

    bench_help = "side-by-side attention benchmark"
    if with_bench:
        bench = load_bench_harness()
        p = sub.add_parser("bench", help=bench_help, formatter_class=_formatter, epilog=BENCH_EPILOG,
                           description="Time attnmask against SDPA (dense mask, is_causal) and FlexAttention "
                                       "side by side, in one process, and report the ratios.")
        bench.add_arguments(p)
    else:
        # Registered without importing the benchmark, so the other commands stay fast.
        p = sub.add_parser("bench", help=bench_help, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def _progress(message: str) -> Iterator[None]:
    """A rich spinner on stderr while something slow runs (only on a terminal)."""
    from rich.console import Console
    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(message):
        yield


def _mask(expr: str):
    from .language import parse
    return parse(expr)


def cmd_demo(args) -> int:
    from .render import SIGNATURE
    from .render import render_signature
    from .terminal import show
    with _progress("drawing the signature picture"):
        render_signature(args.output, dpi=args.dpi)
    print(show(SIGNATURE, 64))
    print(f"wrote {args.output}")
    return 0


def cmd_render(args) -> int:
    from .render import check_path, render
    check_path(args.output)  # refuse a bad extension before any work
    masks = [_mask(e) for e in args.expr]
    with _progress(f"rendering {args.length:,} positions"):
        render(masks if len(masks) > 1 else masks[0], args.length, kv_length=args.kv_length, q_offset=args.q_offset, block_size=args.block_size,
               title=args.title, figsize=tuple(args.size) if args.size else None, dpi=args.dpi,
               annotate=not args.no_annotate, token_limit=args.token_limit, path=args.output,
               scale=args.scale)
    print(f"wrote {args.output}")
    return 0


def cmd_show(args) -> int:
    from .terminal import show
    text = show(_mask(args.expr), args.length, kv_length=args.kv_length, q_offset=args.q_offset,
                width=args.width, color=args.color)
    print(text)
    return 0


def cmd_stats(args) -> int:
    if args.plot is not None:
        from .render import check_path
        check_path(args.plot)
    mask = _mask(args.expr)
    try:
        from . import analysis as am
    except ImportError as err:
        raise MaskValueError(f"stats needs attnmask.analysis, which cannot be imported here ({err})") from None
    kwargs = {"layers": args.layers, "head_dim": args.head_dim, "heads": args.heads}
    if args.block_size is not None:
        kwargs["block_size"] = args.block_size
    with _progress("analysing"):
        report = am.analyze(mask, args.length, **kwargs)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(str(report))
    if args.plot is not None:
        with _progress("drawing the analysis"):
            am.plot_analysis(mask, args.length, layers=args.layers, path=args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_export(args) -> int:
    import numpy as np
    from .masks import DEFAULT_DENSE_LIMIT
    if not str(args.output).lower().endswith(".npy"):
        raise MaskValueError(f"export writes numpy .npy files; the output must end in .npy, got {args.output!r}")
    mask = _mask(args.expr)
    try:
        dense = mask.to_dense(args.length, args.kv_length, q_offset=args.q_offset, limit=DEFAULT_DENSE_LIMIT)
    except DenseTooLargeError as err:
        raise DenseTooLargeError(f"{err}; on the command line use `attnmask stats` for exact figures or "
                                 f"`attnmask render` for a block-level picture") from None
    np.save(args.output, dense.numpy())
    print(f"wrote {args.output}: bool [{dense.shape[0]}, {dense.shape[1]}], "
          f"{int(dense.sum()):,} attended pairs")
    return 0


def load_bench_harness():
    """The benchmark harness, benchmarks/harness.py of the source checkout this package runs from.

    It is not part of the installed package (it times competitors, draws plots and
    writes results files); from an installation without the repository there is
    nothing to run, and the error says where it looked.
    """
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "harness.py"
    if not path.is_file():
        raise MaskValueError(f"attnmask bench runs benchmarks/harness.py of a source checkout, not found at {path}; "
                             f"clone the attnmask repository and run it from there (pip install -e .)")
    spec = importlib.util.spec_from_file_location("attnmask_bench_harness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # dataclasses in it look their module up
    spec.loader.exec_module(module)
    return module


def cmd_bench(args) -> int:
    result = load_bench_harness().run_from_args(args)
    return int(result) if isinstance(result, int) else 0


COMMANDS = {"demo": cmd_demo, "render": cmd_render, "show": cmd_show, "stats": cmd_stats,
            "export": cmd_export, "bench": cmd_bench}


def _one_line(err: BaseException) -> str:
    if isinstance(err, MaskSyntaxError):
        line = err.one_line()
        if err.text is not None and err.position is not None and len(err.text) <= 200:
            # The caret, kept on the same line: the text with '^' inserted where the problem is
            # ('^' is not part of the language, so it cannot be mistaken for the input).
            line += f", marked ^: {err.text[:err.position]}^{err.text[err.position:]}"
        return line
    return " ".join(str(err).split())  # any multi-line message folded onto one line


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``attnmask`` command; returns the exit status.

        >>> from attnmask.cli import main
        >>> main(["show", "causal", "--length", "4", "--no-color", "--width", "10"])  # doctest: +ELLIPSIS
        +----+
        ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    with_bench = bool(argv) and argv[0] == "bench"
    try:
        try:
            parser = build_parser(with_bench=with_bench)
        except ImportError as err:
            raise UsageError(f"attnmask bench: the benchmark is not available here ({err})") from None
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # --help and --version end here; report their status, don't exit
            return int(done.code or 0)
        if args.command is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        return COMMANDS[args.command](args)
    except UsageError as err:
        print(str(err), file=sys.stderr)
    except MaskError as err:
        print(f"attnmask: error: {_one_line(err)}", file=sys.stderr)
    except OSError as err:  # an output path that cannot be written is bad input too
        where = f" {err.filename!r}" if getattr(err, "filename", None) else ""
        print(f"attnmask: error: cannot write{where}: {err.strerror or err}", file=sys.stderr)
    except RecursionError:
        # The parser limits nesting itself; this only guards the CLI contract (one line, no traceback).
        print("attnmask: error: the expression is nested too deeply to parse; use fewer parentheses",
              file=sys.stderr)
    except KeyboardInterrupt:
        print("attnmask: interrupted", file=sys.stderr)
        return 130
    return EXIT_BAD_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
