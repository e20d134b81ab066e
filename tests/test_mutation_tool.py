"""tools/mutation_run.py runs the selected tests on the unmutated code before any mutant."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tool(monkeypatch):
    spec = importlib.util.spec_from_file_location("mutation_run", ROOT / "tools" / "mutation_run.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mutation_run", mod)        # its dataclasses look themselves up there
    spec.loader.exec_module(mod)
    return mod


class _Probed(Exception):
    pass


def _run(tool, monkeypatch, tmp_path, body: str, capsys):
    # One tiny target (engines/dense.py, whose sites are few) held by one tiny test file; the probe
    # (the first step after the baseline) raises, so nothing heavy runs.
    test = tmp_path / "test_tiny.py"
    test.write_text(f"def test_tiny():\n    {body}\n")
    monkeypatch.setattr(tool, "targets", lambda: {"engines/dense.py": [str(test)]})
    monkeypatch.setattr(tool, "NAMED", [])

    def probe(src_dir, timeout=300):
        raise _Probed()
    monkeypatch.setattr(tool, "probe", probe)
    ran = []
    real = tool.run_tests
    monkeypatch.setattr(tool, "run_tests", lambda *a: ran.append(a[1]) or real(*a))
    try:
        code = tool.main(["--sample", "1", "--only", "engines/dense.py"])
    except _Probed:
        code = "probed"
    return code, ran, capsys.readouterr().err


def test_a_failing_baseline_stops_the_run_before_any_mutant(tool, monkeypatch, tmp_path, capsys):
    code, ran, err = _run(tool, monkeypatch, tmp_path, "assert False", capsys)
    assert code == 2 and len(ran) == 1                    # the baseline only: no mutant was tested
    assert "fail on the unmutated code" in err and "test_tiny.py" in err


def test_a_passing_baseline_lets_the_run_go_on(tool, monkeypatch, tmp_path, capsys):
    code, ran, err = _run(tool, monkeypatch, tmp_path, "assert True", capsys)
    assert code == "probed" and len(ran) == 1 and err == ""
