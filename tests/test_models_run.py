"""Running transformers models through attnmask (models.apply, MaskCache), on small random Llama
models built from LlamaConfig: no downloads. References are independent of attnmask's attention code:
transformers' eager attention, and an eager-style function with an additive mask from Mask.to_dense."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402

import attnmask as am  # noqa: E402
from attnmask import models  # noqa: E402
from attnmask.models import attention as attention_mod  # noqa: E402

VOCAB = 96


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def make_model(heads=4, kv_heads=2, layers=2, seed=0, impl="eager"):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      attn_implementation=impl)
    model = LlamaForCausalLM(cfg).eval()
    return model


def twin(model, impl=None):
    """A copy with its own config (configs are shared objects in transformers)."""
    other = LlamaForCausalLM(copy.deepcopy(model.config)).eval()
    other.load_state_dict(model.state_dict())
    if impl is not None:
        other.set_attn_implementation(impl)
    return other


# -- an independent dense reference: eager attention with an additive mask from Mask.to_dense ----------

_REF_PLANS: dict[int, am.MaskPlan] = {}


def _reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    plan = _REF_PLANS[id(module.config)]
    B, H, Lq, D = query.shape
    Lk = key.shape[2]
    rep = H // key.shape[1]
    k = key.repeat_interleave(rep, 1)
    v = value.repeat_interleave(rep, 1)
    dense = torch.stack([m.to_dense(Lq, Lk) for m in plan.layer(module.layer_idx)])      # [H, Lq, Lk]
    bias = torch.zeros(dense.shape, dtype=torch.float32).masked_fill(~dense, float("-inf"))
    scores = torch.matmul(query.float(), k.float().transpose(2, 3)) * scaling + bias
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)       # rows with no key: zeros
    out = torch.matmul(weights, v.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights


AttentionInterface.register("attnmask_test_reference", _reference_attention)


def reference(model, plan):
    ref = twin(model, "attnmask_test_reference")
    cfg = ref.config
    _REF_PLANS[id(cfg)] = am.MaskPlan.uniform(plan, cfg.num_hidden_layers, cfg.num_attention_heads) \
        if not isinstance(plan, am.MaskPlan) else plan
    return ref


def ids_of(batch, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


# -- causal plan == eager ------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_causal_plan_equals_eager_single_and_padded(kv_heads):
    eager = make_model(kv_heads=kv_heads)
    model = twin(eager)
    plan = models.apply(model, "causal")
    assert (plan.n_layers, plan.n_heads) == (2, 4)
    ids = ids_of(2, 37)
    with torch.no_grad():
        assert (eager(ids).logits - model(ids).logits).abs().max() < 1e-5
        # left padding, positions counted per sequence (as generate does)
        att = torch.ones(2, 37, dtype=torch.long)
        att[0, :9] = 0
        pos = (att.cumsum(1) - 1).clamp(min=0)
        a = eager(ids, attention_mask=att, position_ids=pos).logits
        b = model(ids, attention_mask=att, position_ids=pos).logits
        assert (a - b)[att.bool()].abs().max() < 1e-5
        # ... and the batch equals its sequences run one by one
        assert (b[0, 9:] - model(ids[0:1, 9:]).logits[0]).abs().max() < 1e-5
        assert (b[1] - model(ids[1:2]).logits[0]).abs().max() < 1e-5
        # right padding
        att = torch.ones(2, 37, dtype=torch.long)
        att[1, 25:] = 0
        a = eager(ids, attention_mask=att).logits
        b = model(ids, attention_mask=att).logits
        assert (a - b)[att.bool()].abs().max() < 1e-5
        assert (b[1, :25] - model(ids[1:2, :25]).logits[0]).abs().max() < 1e-5


def test_without_the_mask_hook_padding_would_matter():
    # The check above can fail: ignoring the padding changes the real tokens' logits a lot.
    eager = make_model()
    ids = ids_of(2, 30)
    att = torch.ones(2, 30, dtype=torch.long)
    att[0, :8] = 0
    with torch.no_grad():
        a = eager(ids, attention_mask=att).logits
        b = eager(ids).logits
    assert (a - b)[att.bool()].abs().max() > 1e-2


# -- per-head plans == dense per-head reference ------------------------------------------------------

PER_HEAD = ["causal", "causal & sliding(5)", "causal & (sliding(3) | sink(2))", "causal & chunked(8)"]


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_per_head_plan_equals_dense_reference(kv_heads):
    base = make_model(kv_heads=kv_heads, seed=3)
    layer0 = [am.parse(t) for t in PER_HEAD]
    layer1 = [am.parse(t) for t in reversed(PER_HEAD)]
    plan = am.MaskPlan((tuple(layer0), tuple(layer1)))
    model = twin(base)
    models.apply(model, plan)
    ref = reference(base, plan)
    ids = ids_of(1, 45, seed=4)
    with torch.no_grad():
        out, want = model(ids).logits, ref(ids).logits
        assert (out - want).abs().max() < 1e-5
        # the plan matters: plain causal gives other logits
        assert (want - base(ids).logits).abs().max() > 1e-3


def test_output_attentions_are_real_weights():
    base = make_model(seed=5)
    model = twin(base)
    plan = am.MaskPlan((tuple(am.parse(t) for t in PER_HEAD),) * 2)
    models.apply(model, plan)
    ref = reference(base, plan)
    ids = ids_of(1, 20, seed=6)
    with torch.no_grad():
        got = model(ids, output_attentions=True)
        want = ref(ids, output_attentions=True)
        plain = model(ids).logits
    assert len(got.attentions) == 2
    for g, w in zip(got.attentions, want.attentions):
        assert g.shape == (1, 4, 20, 20)
        assert (g - w).abs().max() < 1e-6
        assert torch.allclose(g.sum(-1), torch.ones(1, 4, 20))
    assert (got.logits - plain).abs().max() < 1e-5


def test_output_attentions_refused_above_the_bound(monkeypatch):
    model = twin(make_model())
    models.apply(model, "causal")
    monkeypatch.setattr(attention_mod, "WEIGHTS_MAX_CELLS", 1000)
    with torch.no_grad(), pytest.raises(am.MaskError, match="output_attentions=True would build"):
        model(ids_of(1, 40), output_attentions=True)


# -- the mask-aware cache --------------------------------------------------------------------------------

@pytest.mark.parametrize("mask,bound", [("causal & (sliding(8) | sink(2))", 10), ("causal & chunked(16)", 16),
                                        ("causal", None)])
def test_generate_with_mask_cache_equals_full_cache(mask, bound):
    model = twin(make_model(seed=7))
    models.apply(model, mask)
    ids = ids_of(1, 40, seed=8)
    with torch.no_grad():
        full = model.generate(ids, max_new_tokens=24, do_sample=False)          # DynamicCache: every key
        cache = models.MaskCache(model)
        thin = model.generate(ids, max_new_tokens=24, do_sample=False, cache=cache)
    assert torch.equal(full, thin)
    kept = cache.kept()
    if bound is None:
        assert kept == [[63, 63], [63, 63]]
    else:
        assert max(max(layer) for layer in kept) <= bound
        dynamic = 2 * 2 * 2 * 63 * 16 * 4          # layers x (k, v) x kv heads x tokens x head dim x fp32
        assert models.cache_bytes(cache) < dynamic * (bound + 1) / 63


def test_mask_cache_decode_logits_match_full_cache():
    # Exactness beyond argmax: logits of each decode step agree with the full cache.
    model = twin(make_model(seed=9))
    models.apply(model, "causal & (sliding(6) | sink(3))")
    ids = ids_of(1, 30, seed=10)
    full, thin = transformers.DynamicCache(config=model.config), models.MaskCache(model)
    with torch.no_grad():
        a = model(ids, cache=full).logits
        b = model(ids, cache=thin).logits
        assert (a - b).abs().max() < 1e-5
        for step in range(8):
            nxt = a[:, -1:].argmax(-1)
            a = model(nxt, cache=full).logits
            b = model(nxt, cache=thin).logits
            assert (a - b).abs().max() < 1e-5
    assert thin.kept()[0] == [8, 8]       # w - 1 + s between steps


def test_mask_cache_per_head_groups_and_left_padding():
    model = twin(make_model(seed=11))
    plan = am.MaskPlan((tuple(am.parse(t) for t in ["causal & sliding(4)", "causal & sliding(4)",
                                                   "causal", "causal & chunked(8)"]),) * 2)
    models.apply(model, plan)
    ids = ids_of(2, 26, seed=12)
    att = torch.ones(2, 26, dtype=torch.long)
    att[1, :5] = 0
    with torch.no_grad():
        full = model.generate(ids, attention_mask=att, max_new_tokens=10, do_sample=False)
        cache = models.MaskCache(model)
        thin = model.generate(ids, attention_mask=att, max_new_tokens=10, do_sample=False, cache=cache)
        solo = model.generate(ids[1:, 5:], max_new_tokens=10, do_sample=False)
    assert torch.equal(full, thin)
    assert torch.equal(thin[1, 26:], solo[0, 21:])
    kv0, kv1 = cache.kept()[0]
    assert kv0 <= 4 and kv1 == 26 + 9   # the causal + chunked group keeps every token (pads included)


def test_retained_keeps_every_key_a_later_query_attends():
    from attnmask.models.cache import retained
    texts = ["causal & (sliding(5) | sink(3))", "causal & chunked(7)", "causal & document(5, 9, 4)",
             "causal & dilated(3, 2)", "band(2, 1)", "causal - (rows(10, 20, 3) - diagonal)",
             "causal & (cols(2, 9, 3) | sliding(2))", "causal & strided(3)", "diagonal", "prefix_lm(6)"]
    L = 40
    for text in texts:
        m = am.parse(text)
        dense = m.to_dense(L)
        for t in range(1, L):
            need = dense[t:, :t].any(0)
            keep = retained(m, torch.arange(t), torch.tensor(t))
            assert not (need & ~keep).any(), (text, t)
    # and it is tight where it should be
    m = am.parse("causal & (sliding(5) | sink(3))")
    assert int(retained(m, torch.arange(30), torch.tensor(30)).sum()) == 4 + 3


# -- training: gradients, dtype, refusals -----------------------------------------------------------------

def test_gradients_match_dense_reference():
    base = make_model(seed=13)
    plan = am.MaskPlan((tuple(am.parse(t) for t in PER_HEAD),) * 2)
    model = twin(base)
    models.apply(model, plan)
    ref = reference(base, plan)
    model.train()
    ref.train()
    ids = ids_of(2, 33, seed=14)
    model(ids, labels=ids, use_cache=False).loss.backward()
    ref(ids, labels=ids, use_cache=False).loss.backward()
    worst = 0.0
    # Each parameter's error against its own gradient's size, floored at 1e-3 of the model's
    # largest gradient: a parameter whose reference gradient is exactly zero is then measured
    # against the numbers of this model, not against ~0 (fp32 noise of ~1e-7 would fail).
    unit = 1e-3 * max(float(q.grad.abs().max()) for q in ref.parameters())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        scale = max(float(q.grad.abs().max()), unit)
        worst = max(worst, float((p.grad - q.grad).abs().max()) / scale)
    assert worst < 1e-4


def test_bf16_close_to_fp32_as_eager_bf16_is():
    eager = make_model(seed=15)
    model = twin(eager)
    models.apply(model, "causal")
    ids = ids_of(1, 50, seed=16)
    with torch.no_grad():
        exact = eager(ids).logits
        eager16 = twin(eager).to(torch.bfloat16)(ids).logits.float()
        ours16 = model.to(torch.bfloat16)(ids).logits.float()
    ours_err = (ours16 - exact).abs().max()
    eager_err = (eager16 - exact).abs().max()
    assert ours_err <= 2 * eager_err + 1e-3


def test_refusals_are_clear():
    model = twin(make_model())
    with pytest.raises(am.MaskError, match="the plan is 3 layers"):
        models.apply(model, am.MaskPlan.uniform("causal", 3, 4))
    with pytest.raises(am.MaskError, match="per-head list needs 4"):
        models.apply(model, ["causal", "causal"])
    with pytest.raises(am.MaskError, match="runs no attnmask plan"):
        models.MaskCache(model)
    models.apply(model, "causal & sliding(4)")
    ids = ids_of(2, 12)
    gappy = torch.ones(2, 12, dtype=torch.long)
    gappy[0, 5] = 0
    with torch.no_grad(), pytest.raises(am.MaskError, match="has gaps"):
        model(ids, attention_mask=gappy)
    for mod in attention_mod.attention_modules(model):
        mod.attention_dropout = 0.1
    model.train()
    with pytest.raises(am.MaskError, match="dropout"):
        model(ids, use_cache=False)
    model.eval()           # eval: no dropout, so it runs
    with torch.no_grad():
        model(ids)
    cache = models.MaskCache(model)
    with torch.no_grad():
        model(ids_of(1, 12), cache=cache)
    with pytest.raises(am.MaskError, match="cannot be cropped"):
        cache.crop(-2)
    model.set_attn_implementation("eager")
    with torch.no_grad(), pytest.raises(am.MaskError, match="works only with the attnmask"):
        model(ids_of(1, 3), cache=cache)


# -- evaluate and the command line -------------------------------------------------------------------------

def test_evaluate_reports_quality_and_cost():
    model = make_model(seed=17)
    texts = [("a", ids_of(1, 60, seed=18)[0]), ("b", ids_of(1, 40, seed=19)[0].tolist())]
    lines = []
    report = models.evaluate(model, "causal & (sliding(8) | sink(2))", texts, length=48, timing_length=64,
                             decode_tokens=3, repeats=1, progress=lines.append)
    assert [t.name for t in report.texts] == ["a", "b"] and [t.tokens for t in report.texts] == [48, 40]
    assert lines and any("plan" in line for line in lines)
    # quality figures are what a direct computation gives
    with torch.no_grad():
        ids = texts[0][1][:48][None]
        model.set_attn_implementation("sdpa")
        dense = model(ids).logits[0, :-1]
        models.apply(model, "causal & (sliding(8) | sink(2))")
        mine = model(ids).logits[0, :-1]
    want = torch.nn.functional.cross_entropy(mine, ids[0, 1:])
    assert abs(report.texts[0].loss_plan - float(want)) < 1e-5
    agree = float((dense.argmax(-1) == mine.argmax(-1)).float().mean())
    assert abs(report.texts[0].top1_agreement - agree) < 1e-9
    assert report.texts[0].top1_agreement < 1.0         # the window changes predictions of a random model
    # cost: the MaskCache holds (w - 1 + s) keys of each of the 64 + 3 tokens, positions included
    assert report.timing["length"] == 64 and report.timing["prefill_s"]["plan"] > 0
    kv = report.kv_bytes
    assert kv["dense"] == 2 * 2 * 2 * 67 * 16 * 4
    assert kv["plan"] == 2 * (2 * 2 * 9 * 16 * 4 + 9 * 8)
    assert "top-1 agreement" in report.table() and "KV cache" in report.table()
    assert model.config._attn_implementation == "attnmask"


def test_evaluate_refuses_strings_without_a_tokenizer():
    with pytest.raises(am.MaskError, match="no tokenizer"):
        models.evaluate(make_model(), "causal", ["some text"], timing=False)


def test_cli_eval_errors_are_one_line(capsys, tmp_path):
    from attnmask.cli import main
    text = tmp_path / "t.txt"
    text.write_text("hello")
    cases = [(["eval", "--model", "smollm2", "--mask", "causal &", "--text", str(text)], "expected"),
             (["eval", "--model", "smollm2", "--mask", "causal", "--text", str(tmp_path / "missing.txt")],
              "no text file"),
             (["eval", "--model", str(tmp_path / "nowhere"), "--mask", "causal", "--text", str(text)], "no model at"),
             (["eval", "--model", "smollm2", "--plan", str(tmp_path / "p.json"), "--text", str(text)],
              "no plan file"),
             (["eval", "--model", "smollm2", "--text", str(text)], "--plan --mask is required")]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (argv, err)


def test_padded_batch_gradients_equal_sequences_run_one_by_one():
    model = twin(make_model(seed=21))
    models.apply(model, "causal & (sliding(6) | sink(2))")
    model.train()
    ids = ids_of(2, 20, seed=22)
    att = torch.ones(2, 20, dtype=torch.long)
    att[0, :6] = 0
    pos = (att.cumsum(1) - 1).clamp(min=0)
    logits = model(ids, attention_mask=att, position_ids=pos, use_cache=False).logits
    loss = sum(torch.nn.functional.cross_entropy(logits[b, att[b].bool()][:-1], ids[b, att[b].bool()][1:],
                                                 reduction="sum") for b in range(2))
    loss.backward()
    batched = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    one = sum(torch.nn.functional.cross_entropy(model(x, use_cache=False).logits[0, :-1], x[0, 1:], reduction="sum")
              for x in (ids[0:1, 6:], ids[1:2]))
    one.backward()
    assert abs(loss.item() - one.item()) < 1e-4
    for g, p in zip(batched, model.parameters()):
        assert (g - p.grad).abs().max() <= 1e-4 * p.grad.abs().max().clamp_min(1e-12)


def test_evaluate_resolves_data_dependent_heads_per_text():
    model = make_model(seed=23)
    spec = {"family": "top_columns", "window": 4, "sink": 1, "columns": 2, "last_queries": 8}
    base = am.causal & (am.sliding(4) | am.sink(1))
    plan = am.MaskPlan(((base, am.causal, base, am.causal), (am.causal,) * 4),
                       dynamic=((spec, None, spec, None), (None,) * 4))
    with pytest.raises(am.MaskError, match="data-dependent"):
        models.apply(twin(model), plan)
    ids = ids_of(1, 40, seed=24)[0]
    report = models.evaluate(model, plan, [ids])
    assert report.timing is None                       # no cost figures: the columns depend on the prompt
    maps = models.capture(model, ids[None])
    resolved = am.MaskPlan(tuple(plan.resolve(i, maps[i][0, :, -8:]) for i in range(2)))
    assert "cols(" in str(resolved.layer(0)[0])
    models.apply(model, resolved)
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:])
    assert abs(report.texts[0].loss_plan - float(want)) < 1e-5
