"""models.capture against eager output_attentions on a small random Llama (no download)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnmask as am
from attnmask import models
from attnmask.models.capture import capture


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg).eval()


def eager(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask, output_attentions=True).attentions


def test_capture_equals_eager_with_gqa_and_padding(llama):
    ids = torch.randint(0, 97, (3, 37))
    pad = torch.ones(3, 37, dtype=torch.long)
    pad[1, :9] = 0                  # left padding
    pad[2, 30:] = 0                 # right padding
    ref = eager(llama, ids, pad)
    maps = capture(llama, ids, attention_mask=pad, chunk_bytes=4096)   # many row chunks
    assert sorted(maps) == [0, 1, 2]
    for layer in range(3):
        assert maps[layer].shape == (3, 6, 37, 37) and maps[layer].dtype == torch.float32
        assert (maps[layer] - ref[layer]).abs().max() <= 1e-6
    # padded keys get no weight; each query row is a distribution
    assert float(maps[2][1, :, 9:, :9].abs().max()) == 0.0
    assert torch.allclose(maps[0].sum(-1), torch.ones(3, 6, 37), atol=1e-5)
    assert llama.config._attn_implementation == "eager"      # switched back


def test_capture_chosen_layers_stops_early_and_restores(llama):
    ids = torch.randint(0, 97, (1, 20))
    ref = eager(llama, ids)
    maps = capture(llama, ids[0], layers=[1, -3])
    assert sorted(maps) == [0, 1]
    assert (maps[1] - ref[1]).abs().max() <= 1e-6
    before = llama.config._attn_implementation
    with pytest.raises(am.MaskError, match="layers 0..2"):
        capture(llama, ids, layers=[3])
    with pytest.raises(am.MaskError, match="max_bytes"):
        capture(llama, ids, max_bytes=1000)
    assert llama.config._attn_implementation == before


def test_capture_keeps_the_model_dtype(llama):
    model = llama.to(torch.bfloat16)
    try:
        ids = torch.randint(0, 97, (1, 24))
        ref = eager(model, ids)
        maps = capture(model, ids, layers=2)
        assert maps[2].dtype == torch.bfloat16
        assert (maps[2].float() - ref[2].float()).abs().max() <= 1e-2
    finally:
        llama.to(torch.float32)


def test_fit_on_captured_maps_runs_end_to_end(llama):
    ids = torch.randint(0, 97, (2, 64))
    texts = [capture(llama, ids[i]) for i in range(2)]
    plan = am.fit(texts, keep=0.9)
    assert (plan.n_layers, plan.n_heads) == (3, 6)
    kept = am.plan_coverage(plan, texts[0])
    assert float(kept.min()) >= 0.9 - 1e-9      # kept on a calibration text, by construction


def test_load_refuses_missing_paths(tmp_path):
    with pytest.raises(am.MaskError, match="no model at"):
        models.load(tmp_path / "nothing")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(am.MaskError, match="not a .gguf"):
        models.load(tmp_path / "weights.bin")
