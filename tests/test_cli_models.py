"""attnmask inspect and fit end to end on a small random Llama saved to a folder (no download), and their
one-line errors."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import attnmask as am
from attnmask.cli import main

TEXT = "def f(x):\n    return x + 1\n\n" * 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=1, show_progress=False)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture()
def texts(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"t{i}.py"
        p.write_text(f"# text {i}\n" + TEXT)
        paths.append(str(p))
    return paths


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_fit_then_inspect_with_the_plan(model_dir, texts, tmp_path, capsys):
    plan_path, plot = tmp_path / "plan.json", tmp_path / "plan.png"
    code, out, err = run(capsys, "fit", "--model", model_dir, "--text", texts[0], texts[1], "--held-out", texts[2],
                         "--keep", "0.9", "--length", "64", "-o", plan_path, "--plot", plot)
    assert code == 0, err
    assert "mean density" in out and "held out t2.py: plan kept mean" in out and f"wrote {plan_path}" in out
    plan = am.MaskPlan.from_json(plan_path)
    assert (plan.n_layers, plan.n_heads) == (2, 4) and plan.meta["texts"] == ["t0.py", "t1.py"]
    assert plan.meta["keep"] == 0.9 and all(f["kept_worst_text"] >= 0.9 for l in plan.figures for f in l)
    assert mpimg.imread(plot).shape[0] > 100

    heads = tmp_path / "heads.png"
    code, out, err = run(capsys, "inspect", "--model", model_dir, "--text", texts[2], "--layer", "1", "--length",
                         "64", "--plan", plan_path, "--heads", "0,3", "--window", "16:64", "-o", heads,
                         "--overview", tmp_path / "o.png", "--census", tmp_path / "c.png")
    assert code == 0, err
    assert f"wrote {heads}" in out and "head types:" in out
    assert mpimg.imread(heads).shape[1] > 300


@pytest.mark.parametrize("argv, message", [
    (["fit", "--model", "{model}", "--text", "missing.py", "-o", "p.json"], "no text file at 'missing.py'"),
    (["fit", "--model", "{model}", "--text", "{t0}", "-o", "p.txt"], "-o must end in .json"),
    (["fit", "--model", "{model}", "--text", "{t0}", "--keep", "1.5", "-o", "p.json"], "share in (0, 1]"),
    (["fit", "--model", "{model}", "--text", "{t0}", "--length", "100000", "-o", "p.json"], "fewer than --length"),
    (["fit", "--model", "nowhere/model", "--text", "{t0}", "-o", "p.json"], "no model at 'nowhere/model'"),
    (["inspect", "--model", "{model}", "--text", "{t0}", "-o", "h.png"], "give --layer L"),
    (["inspect", "--model", "{model}", "--text", "{t0}", "--layer", "7", "-o", "h.png"], "layers 0..1"),
    (["inspect", "--model", "{model}", "--text", "{t0}", "--layer", "0", "-o", "h.gif"], "extension"),
    (["inspect", "--model", "{model}", "--text", "{t0}", "--layer", "0", "--heads", "9", "-o", "h.png"],
     "heads 0..3"),
    (["inspect", "--model", "{model}", "--text", "{t0}", "--layer", "0", "--window", "9:3", "-o", "h.png"],
     "START < STOP"),
    (["inspect", "--model", "{model}", "--text", "{t0}"], "needs something to draw"),
])
def test_model_commands_bad_input_is_one_line(model_dir, texts, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(model=model_dir, t0=texts[0]) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
