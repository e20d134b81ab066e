"""What a plan costs and buys on a real model: quality against dense, prefill and decode time
against SDPA, KV-cache bytes against transformers' DynamicCache, side by side in one process.

Quality, per text (truncated to ``length`` tokens): next-token loss and perplexity with
SDPA (dense causal) and with the plan, and top-1 agreement (share of positions where
the plan's most likely next token is the dense model's). Cost, on one prompt of
``timing_length`` tokens: prefill time (end to end and inside attention), decode
time per token, and the KV cache held after decoding, for SDPA + DynamicCache and
for the plan + :class:`~attnmask.models.MaskCache`; the two take turns, best of
``repeats`` for prefill, median over steps for decode.

    >>> from attnmask import models                                               # doctest: +SKIP
    >>> model, tok = models.load("smollm2")                                        # doctest: +SKIP
    >>> report = models.evaluate(model, "causal & (sliding(512) | sink(4))", [text], tokenizer=tok)  # doctest: +SKIP
    >>> print(report.table())                                                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import MaskValueError
from ..plan import MaskPlan, as_plan
from .attention import IMPLEMENTATION, apply
from .capture import model_shape
from .cache import MaskCache, cache_bytes

__all__ = ["evaluate", "EvalReport", "TextResult", "plan_density", "resolve_for_input"]

DENSE = "sdpa"


@dataclass
class TextResult:
    name: str
    tokens: int
    density: float                  # the plan's attended pairs / causal pairs at this text's length
    loss_dense: float
    loss_plan: float
    top1_agreement: float

    @property
    def ppl_dense(self) -> float:
        return math.exp(self.loss_dense)

    @property
    def ppl_plan(self) -> float:
        return math.exp(self.loss_plan)


@dataclass
class EvalReport:
    """Figures of :func:`evaluate`; ``table()`` for people, ``to_dict()`` / ``write()`` for files."""

    plan: str                       # the mask text (uniform plans) or a summary
    density: float                  # attended pairs / causal pairs, mean over texts, layers and heads
    length: int
    texts: list = field(default_factory=list)
    timing: dict | None = None      # prefill / attention / decode figures (seconds, ms per token)
    kv_bytes: dict | None = None    # bytes held after prefill + decode: dense, plan
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["texts"] = [dict(asdict(t), ppl_dense=t.ppl_dense, ppl_plan=t.ppl_plan) for t in self.texts]
        return out

    def table(self) -> str:
        lines = [f"plan: {self.plan}  (density {self.density:.3f} of causal)",
                 "",
                 "| text | tokens | density | loss dense | loss plan | delta | ppl dense | ppl plan | top-1 agreement |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for t in self.texts:
            lines.append(f"| {t.name} | {t.tokens} | {t.density:.3f} | {t.loss_dense:.4f} | {t.loss_plan:.4f} | "
                         f"{t.loss_plan - t.loss_dense:+.4f} | {t.ppl_dense:.2f} | {t.ppl_plan:.2f} | "
                         f"{t.top1_agreement:.3f} |")
        if self.timing:
            tm = self.timing
            lines += ["", f"cost at a {tm['length']}-token prompt ({tm['repeats']} repeats, SDPA and the plan "
                          f"taking turns):", "",
                      "| | SDPA + DynamicCache | plan + MaskCache | plan / SDPA |", "|---|---:|---:|---:|"]
            rows = [("prefill, end to end (s)", "prefill_s"), ("prefill, inside attention (s)", "attention_s"),
                    ("decode (ms / token)", "decode_ms")]
            for label, key in rows:
                d, p = tm[key]["dense"], tm[key]["plan"]
                lines.append(f"| {label} | {d:.3f} | {p:.3f} | {p / d:.3f} |")
            if self.kv_bytes:
                d, p = self.kv_bytes["dense"], self.kv_bytes["plan"]
                lines.append(f"| KV cache after decoding (MB) | {d / 2**20:.2f} | {p / 2**20:.2f} | {p / d:.4f} |")
        return "\n".join(lines)

    def write(self, path: str | os.PathLike) -> None:
        """``.json``: the figures; anything else: the table as Markdown."""
        text = json.dumps(self.to_dict(), indent=1) if str(path).endswith(".json") else self.table()
        with open(path, "w") as f:
            f.write(text + "\n")


def plan_density(plan: MaskPlan, length: int) -> float:
    """Attended pairs / causal pairs at ``length``, averaged over layers and heads."""
    causal = length * (length + 1) / 2
    pairs = {m: m.compile(length).attended_pairs() for m in plan.distinct()}
    total = sum(pairs[m] for layer in plan.masks for m in layer)
    return total / (causal * plan.n_layers * plan.n_heads)


def resolve_for_input(model, plan: MaskPlan, ids: torch.Tensor) -> MaskPlan:
    """A plan with data-dependent heads made concrete for one input ``[L]``.

    Each ``top_columns`` head gets the key columns that the dense model's last
    queries of this input weigh most (MInference's rule: chosen from the prompt
    itself); static plans come back unchanged.
    """
    dynamic = getattr(plan, "dynamic", None)
    if not dynamic:
        return plan
    from .capture import capture
    last = max(int(d["last_queries"]) for layer in dynamic for d in layer if d)
    chosen = [i for i, layer in enumerate(dynamic) if any(layer)]
    maps = capture(model, ids[None], layers=chosen)
    masks = tuple(plan.resolve(i, maps[i][0, :, -last:]) if i in maps else plan.layer(i)
                  for i in range(plan.n_layers))
    return MaskPlan(masks, meta=dict(plan.meta, resolved_for_input=True))


def _describe(plan: MaskPlan) -> str:
    distinct = plan.distinct()
    if len(distinct) == 1:
        return str(next(iter(distinct)))
    name = plan.meta.get("name") or plan.meta.get("source") or "per-head plan"
    return f"{name} ({len(distinct)} distinct masks over {plan.n_layers} x {plan.n_heads} heads)"


# -- helpers ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _attention_timer(names: Sequence[str]):
    """Time spent inside the named transformers attention functions (wall time; synchronised on CUDA)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    spent = [0.0]
    saved = {n: ALL_ATTENTION_FUNCTIONS._global_mapping[n] for n in names}

    def timed(fn):
        def run(module, query, *args, **kwargs):
            if query.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(module, query, *args, **kwargs)
            if query.is_cuda:
                torch.cuda.synchronize()
            spent[0] += time.perf_counter() - t0
            return out
        return run

    for n, fn in saved.items():
        AttentionInterface.register(n, timed(fn))
    try:
        yield spent
    finally:
        for n, fn in saved.items():
            AttentionInterface.register(n, fn)


def _token_ids(texts, tokenizer, length: int) -> list[tuple[str, torch.Tensor]]:
    out = []
    for i, t in enumerate(texts):
        name = f"text {i + 1}"
        if isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], str):
            name, t = t
        if isinstance(t, str):
            if tokenizer is None:
                raise MaskValueError("texts are strings but no tokenizer was given; pass tokenizer=tok "
                                     "(models.load returns (model, tok)) or give token ids")
            ids = torch.tensor(tokenizer(t)["input_ids"], dtype=torch.int64)
        else:
            ids = torch.as_tensor(t, dtype=torch.int64).reshape(-1)
        if ids.numel() < 2:
            raise MaskValueError(f"{name} has {ids.numel()} tokens; at least 2 are needed for a next-token loss")
        out.append((name, ids[:length]))
    if not out:
        raise MaskValueError("evaluate needs at least one text")
    return out


def _use(model, impl: str, plan: MaskPlan) -> None:
    if impl == DENSE:
        model.set_attn_implementation(DENSE)
    else:
        apply(model, plan)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _greedy_run(model, ids: torch.Tensor, cache, decode_tokens: int, attention_names) -> tuple[float, float, list]:
    """Prefill ``ids`` into ``cache``, then decode greedily; (prefill s, attention s in prefill, step times)."""
    with _attention_timer(attention_names) as spent:
        _sync(ids.device)
        t0 = time.perf_counter()
        out = model(ids, cache=cache, logits_to_keep=1)
        _sync(ids.device)
        prefill = time.perf_counter() - t0
        attention = spent[0]
    steps = []
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(decode_tokens):
        t0 = time.perf_counter()
        out = model(nxt, cache=cache)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(ids.device)
        steps.append(time.perf_counter() - t0)
    return prefill, attention, steps


# -- the evaluation -----------------------------------------------------------------------------------

def evaluate(model, plan, texts: Sequence, *, tokenizer=None, length: int = 1024, timing_length: int | None = None,
             decode_tokens: int = 16, repeats: int = 2, timing: bool = True,
             progress: Callable[[str], None] | None = None) -> EvalReport:
    """Loss, perplexity and top-1 agreement of ``model`` with ``plan`` against dense (SDPA), and
    prefill / decode time and KV-cache bytes against SDPA with transformers' DynamicCache.

    ``plan``: a MaskPlan, a mask (text or Mask) for every head, or a per-head list.
    ``texts``: strings (with ``tokenizer``), token-id sequences, or ``(name, text)`` pairs;
    each is cut to ``length`` tokens. The cost figures use a prompt of
    ``timing_length`` tokens (default ``length``) built from the texts' tokens
    (repeated if they are shorter). ``progress`` receives one line per step.
    A plan with data-dependent heads is made concrete per text
    (:func:`resolve_for_input`) and gets no cost figures. The model is left
    running the plan (static plans). Returns an :class:`EvalReport`.
    """
    layers, heads, _ = model_shape(model)
    plan = as_plan(plan, layers, heads)
    say = progress or (lambda message: None)
    device = next(model.parameters()).device
    items = _token_ids(texts, tokenizer, length)
    was_training = model.training
    model.eval()
    dynamic = bool(getattr(plan, "dynamic", None))
    report = EvalReport(plan=_describe(plan), density=float("nan"), length=max(len(ids) for _, ids in items))
    try:
        with torch.no_grad():
            for i, (name, ids) in enumerate(items):
                x = ids[None].to(device)
                say(f"{name} ({len(ids)} tokens): dense")
                _use(model, DENSE, plan)
                dense = model(x, use_cache=False).logits[0, :-1].float()
                if dynamic:
                    say(f"{name}: resolving the data-dependent heads from this input's attention")
                text_plan = resolve_for_input(model, plan, ids.to(device))
                say(f"{name} ({len(ids)} tokens): plan")
                _use(model, IMPLEMENTATION, text_plan)
                mine = model(x, use_cache=False).logits[0, :-1].float()
                target = x[0, 1:]
                report.texts.append(TextResult(
                    name=name, tokens=len(ids), density=plan_density(text_plan, len(ids)),
                    loss_dense=float(torch.nn.functional.cross_entropy(dense, target)),
                    loss_plan=float(torch.nn.functional.cross_entropy(mine, target)),
                    top1_agreement=float((dense.argmax(-1) == mine.argmax(-1)).float().mean())))
                del dense, mine
            report.density = sum(t.density for t in report.texts) / len(report.texts)
            if timing and dynamic:
                say("no cost figures for a plan with data-dependent heads (their columns depend on the prompt)")
            elif timing:
                report.timing, report.kv_bytes = _cost(model, plan, items, timing_length or length,
                                                       decode_tokens, repeats, device, say)
    finally:
        if not dynamic:
            _use(model, IMPLEMENTATION, plan)
        model.train(was_training)
    report.meta = _meta(model)
    return report


def _cost(model, plan, items, L: int, decode_tokens: int, repeats: int, device, say):
    from transformers import DynamicCache
    pool = torch.cat([ids for _, ids in items])
    prompt = pool.repeat(math.ceil(L / len(pool)))[:L][None].to(device)
    figures = {"dense": {"prefill": [], "attention": [], "steps": []},
               "plan": {"prefill": [], "attention": [], "steps": []}}
    kv = {}
    for r in range(repeats):
        for kind in ("dense", "plan"):
            say(f"cost at {L} tokens, repeat {r + 1}/{repeats}: {'SDPA' if kind == 'dense' else 'plan'}")
            if kind == "dense":
                _use(model, DENSE, plan)
                cache, names = DynamicCache(config=model.config), [DENSE]
            else:
                _use(model, IMPLEMENTATION, plan)
                cache, names = MaskCache(model), [IMPLEMENTATION]
            prefill, attention, steps = _greedy_run(model, prompt, cache, decode_tokens, names)
            f = figures[kind]
            f["prefill"].append(prefill)
            f["attention"].append(attention)
            f["steps"].extend(steps[1:] if len(steps) > 1 else steps)   # the first step warms caches
            kv[kind] = cache_bytes(cache)
            del cache
    timing = {"length": L, "repeats": repeats, "decode_tokens": decode_tokens,
              "prefill_s": {k: min(v["prefill"]) for k, v in figures.items()},
              "attention_s": {k: min(v["attention"]) for k, v in figures.items()},
              "decode_ms": {k: 1000 * statistics.median(v["steps"]) if v["steps"] else float("nan")
                            for k, v in figures.items()},
              "all_prefill_s": {k: v["prefill"] for k, v in figures.items()}}
    return timing, kv


def _meta(model) -> dict:
    import transformers
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"model": getattr(model.config, "_name_or_path", type(model).__name__) or type(model).__name__,
            "dtype": str(next(model.parameters()).dtype), "device": str(next(model.parameters()).device),
            "torch": torch.__version__, "transformers": transformers.__version__, "cpu": cpu,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
