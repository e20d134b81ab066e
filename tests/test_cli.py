"""The attnmask command: every subcommand in-process, the console script in a subprocess, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest

import attnmask as am
from attnmask.cli import main

YELLOW = np.array(matplotlib.colormaps["viridis"](1.0)[:3])
PURPLE = np.array(matplotlib.colormaps["viridis"](0.0)[:3])


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_writes_the_signature_and_shows_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    path = tmp_path / "sig.png"
    code, out, err = run(capsys, "demo", "-o", str(path))
    assert code == 0 and err == ""
    img = mpimg.imread(path)[..., :3]
    near = lambda c: (np.abs(img - c).max(-1) < 3 / 255).mean()  # noqa: E731
    # both viridis ends cover a large share of the picture (about half the 64 x 64 cells each)
    assert near(YELLOW) > 0.2 and near(PURPLE) > 0.2
    assert "1,888 attended pairs" in out                      # the signature mask, counted in the terminal
    assert int(am.parse(am.SIGNATURE).to_dense(64).sum()) == 1888
    assert f"wrote {path}" in out
    assert out.count("|") >= 2 * 32   # the plain-character picture framed by '|'


def test_demo_default_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "demo")
    assert code == 0 and (tmp_path / "signature.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("ext, magic", [("png", b"\x89PNG"), ("svg", b"<?xml"), ("pdf", b"%PDF")])
def test_render_formats(tmp_path, capsys, ext, magic):
    path = tmp_path / f"m.{ext}"
    code, out, err = run(capsys, "render", "causal & sliding(8)", "--length", "32", "-o", str(path),
                         "--title", "window")
    assert code == 0 and err == "" and path.read_bytes()[:len(magic)] == magic


def test_render_several_masks_side_by_side(tmp_path, capsys):
    path = tmp_path / "heads.png"
    code, _, err = run(capsys, "render", "causal", "full", "--length", "16", "--size", "8", "4",
                       "--dpi", "50", "--no-annotate", "-o", str(path))
    assert code == 0 and err == ""
    img = mpimg.imread(path)[..., :3]
    h, w = img.shape[:2]
    # the upper-right quarter of the left panel is masked (purple), of the right panel attended (yellow)
    assert np.abs(img[int(h * 0.3), int(w * 0.38)] - PURPLE).max() < 3 / 255
    assert np.abs(img[int(h * 0.3), int(w * 0.88)] - YELLOW).max() < 3 / 255


def test_render_block_level_picture_matches_layout(tmp_path, capsys):
    path = tmp_path / "big.png"
    code, _, err = run(capsys, "render", "causal & (sliding(512) | sink(4))", "--length", "65536",
                       "--block-size", "512", "--size", "4", "4", "--dpi", "100", "-o", str(path))
    assert code == 0 and err == ""
    img = mpimg.imread(path)[..., :3]
    # the top-right corner of the heatmap area is the masked future: dark purple
    h, w = img.shape[:2]
    assert (np.abs(img[int(h * 0.2), int(w * 0.6)] - PURPLE).max()) < 3 / 255


def test_show_plain_and_kv_length(capsys, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    code, out, err = run(capsys, "show", "causal", "--length", "4", "--width", "20")
    assert code == 0 and err == ""
    assert out.splitlines()[:4] == ["+----+", "|#+  |", "|###+|", "+----+"]  # capsys is no tty: plain text
    assert "density 62.50%" in out and "10 attended pairs" in out
    code, out, _ = run(capsys, "show", "sliding(2)", "--length", "2", "--kv-length", "4", "--width", "10")
    assert code == 0 and "4 attended pairs" in out   # queries at positions 2, 3 see keys (1, 2) and (2, 3)
    code, out, _ = run(capsys, "show", "causal", "--length", "8", "--color", "--width", "10")
    assert code == 0 and "\x1b[38;2;" in out
    code, out, _ = run(capsys, "show", "causal & (sliding(4096) | sink(4))", "--length", "1048576",
                       "--width", "40")
    assert code == 0 and "density 0.39%" in out


def test_export_writes_the_dense_mask(tmp_path, capsys):
    path = tmp_path / "m.npy"
    code, out, err = run(capsys, "export", "document(5, 7) & causal", "--length", "16", "-o", str(path))
    assert code == 0 and err == ""
    got = np.load(path)
    assert got.dtype == np.bool_ and got.shape == (16, 16)
    np.testing.assert_array_equal(got, am.parse("document(5, 7) & causal").to_dense(16).numpy())
    path2 = tmp_path / "d.npy"
    code, _, _ = run(capsys, "export", "sliding(3)", "--length", "4", "--kv-length", "9", "--q-offset", "2",
                     "-o", str(path2))
    np.testing.assert_array_equal(np.load(path2), am.sliding(3).to_dense(4, 9, q_offset=2).numpy())


def test_stats_json_and_table(tmp_path, capsys):
    expr = "causal & (sliding(300) | sink(4))"
    code, out, err = run(capsys, "stats", expr, "--length", "5000", "--block-size", "64", "--json")
    assert code == 0
    data = json.loads(out)
    layout = am.parse(expr).compile(5000, block_size=64)
    assert data["attended_pairs"] == layout.attended_pairs()
    assert data["density"] == pytest.approx(layout.density)
    assert (data["blocks_full"], data["blocks_partial"], data["blocks_empty"]) == \
        (layout.blocks_full, layout.blocks_partial, layout.blocks_empty)
    code, out, err = run(capsys, "stats", expr, "--length", "5000", "--layers", "4")
    assert code == 0 and f"{layout.attended_pairs():,}" in out.replace("_", ",")
    plot = tmp_path / "a.png"
    code, out, err = run(capsys, "stats", expr, "--length", "5000", "--plot", str(plot))
    assert code == 0 and plot.read_bytes()[:4] == b"\x89PNG"


def test_bench_help(capsys):
    code, out, _ = run(capsys, "bench", "--help")
    assert code == 0 and "usage: attnmask bench" in out and "attnmask bench --masks" in out
    code, out, err = run(capsys, "bench", "--masks", "slidng", "--lengths", "256", "--no-flex", "--no-extras")
    assert code == 2 and err.count("\n") == 1 and "slidng" in err and "Traceback" not in err


def test_bench_backward_mode_runs(capsys):
    code, out, err = run(capsys, "bench", "--mode", "backward", "--masks", "sliding", "--lengths", "256",
                         "--no-flex", "--no-extras", "--repeats", "1", "--results", "", "--plot", "")
    assert code == 0, err
    assert "attention backward" in out and "sliding" in out


BAD_INPUT = [
    (["show", "casual", "--length", "8"], "did you mean 'causal'"),
    (["render", "causal & (sliding(4)", "--length", "8", "-o", "x.png"], "marked ^: causal & (sliding(4)^"),
    (["show", "causal & & full", "--length", "8"], "position 9"),
    (["show", "sliding(0)", "--length", "8"], "sliding(w) needs w >= 1, got w=0"),
    (["show", "dilated(2, -1)", "--length", "8"], "position"),
    (["show", "causal", "--length", "-5"], "--length/-n: must be >= 1, got -5"),
    (["show", "causal", "--length", "0"], "must be >= 1, got 0"),
    (["show", "causal", "--length", "ten"], "must be a whole number, got 'ten'"),
    (["export", "causal", "--length", "8", "--kv-length", "-1", "-o", "x.npy"], "--kv-length: must be >= 1"),
    (["export", "causal", "--length", "65536", "-o", "big.npy"], "over the limit of 1,073,741,824"),
    (["export", "causal", "--length", "8", "-o", "mask.txt"], "must end in .npy"),
    (["render", "causal", "--length", "8", "-o", "out.jpg"], "extension must be one of .png, .svg, .pdf"),
    (["demo", "-o", "sig.gif"], "extension must be one of"),
    (["render", "causal", "--length", "8", "-o", "no/such/dir/out.png"], "cannot write"),
    (["show", "causal"], "required: --length"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["stats", "causl", "--length", "8"], "did you mean 'causal'"),
    (["stats", "causal", "--length", "8", "--plot", "a.bmp"], "extension must be one of"),
    (["render", "causal", "--length", "8", "--size", "0", "0", "-o", "x.png"], "between 0.5 and 100 inches"),
    (["show", "(" * 3000 + "causal" + ")" * 3000, "--length", "8"], "nest"),   # the parser's depth limit or the CLI guard
]


@pytest.mark.parametrize("argv, needle", BAD_INPUT, ids=[" ".join(a)[:40] for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.endswith("\n") and err.count("\n") == 1, err   # exactly one line
    assert needle in err
    assert "Traceback" not in err and out == ""
    assert not list(tmp_path.iterdir())   # nothing written on refusal


def test_oversized_export_names_the_alternatives(tmp_path, capsys):
    code, _, err = run(capsys, "export", "causal", "--length", "40000", "-o", str(tmp_path / "m.npy"))
    assert code == 2 and "attnmask stats" in err and "attnmask render" in err and "1,600,000,000" in err


@pytest.mark.parametrize("command", ["demo", "render", "show", "stats", "export", "bench"])
def test_help_of_every_subcommand_has_examples(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert "examples:" in out and f"attnmask {command} " in out.split("examples:")[1]


def test_top_level_help_and_no_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "examples:" in out and "sliding(w)" in out
    code, out, _ = run(capsys)
    assert code == 2 and "COMMAND" in out


def _console_script() -> list[str]:
    exe = shutil.which("attnmask")
    return [exe] if exe else [sys.executable, "-m", "attnmask.cli"]


def test_console_script_subprocess(tmp_path):
    env = dict(os.environ, NO_COLOR="1")
    ok = subprocess.run(_console_script() + ["show", "causal & sliding(4)", "--length", "16", "--width", "30"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and ok.stderr == ""
    assert "\x1b" not in ok.stdout and "|#" in ok.stdout and "58 attended pairs" in ok.stdout
    bad = subprocess.run(_console_script() + ["show", "casual & sliding(4)", "--length", "16"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "did you mean 'causal'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_version_says_whether_the_fused_kernel_runs(capsys, monkeypatch):
    """--version names the dtypes the fused CPU kernel runs here, or why it is off."""
    from attnmask.engines import fused
    st = fused.status()
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith(f"attnmask {am.__version__} (fused CPU kernel: ")
    runs = [name for name in ("float32", "bfloat16") if st[name]]
    assert (", ".join(runs) if runs else "off") in out
    assert (st["threads"] in out) == bool(runs)
    monkeypatch.setenv("ATTNMASK_KERNEL", "0")
    code, out, _ = run(capsys, "--version")
    assert code == 0 and "fused CPU kernel: off; disabled by ATTNMASK_KERNEL=0" in out
