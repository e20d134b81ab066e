"""Capture a transformers model's attention weights, layer by layer, head by head, with bounded memory.

``capture(model, input_ids)`` runs the model once through an attention function
registered under transformers' own ``AttentionInterface`` (and the eager mask
through ``AttentionMaskInterface``, so padding is kept exactly as eager has
it). Each chosen layer's weights are computed from the layer's own query and
key states (after RoPE, as eager sees them) in row chunks of bounded size and
written into one preallocated ``[B, H, Lq, Lk]`` tensor per layer; layers that
are not chosen are computed in the same chunks without keeping anything, and
the forward stops after the last chosen layer. The arithmetic is eager's
(``softmax(QK^T * scale + mask)`` in float32, cast to the model's dtype, GQA by
repeating keys), so the result equals ``output_attentions=True`` of the eager
model.

The model's attention implementation is switched for the call and restored
afterwards, also when the call fails.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from ..errors import MaskValueError

IMPLEMENTATION = "attnmask_capture"
CHUNK_BYTES = 32 << 20          # temporaries per row chunk: scores and weights in float32
DEFAULT_MAX_BYTES = 8 << 30     # the captured weights themselves; beyond, choose fewer layers


class _Recorder:
    """State of one capture call, read by the registered attention function."""

    def __init__(self, layers: set[int], last: int, out: dict, dtype, chunk_bytes: int):
        self.layers, self.last, self.out, self.dtype, self.chunk_bytes = layers, last, out, dtype, chunk_bytes


_ACTIVE: list[_Recorder] = []   # a stack: the attention function serves the innermost capture


class _Done(Exception):
    """Raised after the last chosen layer: the rest of the forward is not needed."""


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An eager attention that also records the weights of the chosen layers.

    query [B, H, Lq, D], key/value [B, Hkv, Lk, D], attention_mask additive [B, 1, Lq, Lk] or None.
    """
    rec = _ACTIVE[-1]
    layer = int(getattr(module, "layer_idx", -1))
    b, h, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    groups = h // hkv
    if scaling is None:
        scaling = d ** -0.5
    # GQA as eager does it: every query head reads its group's key/value head
    k_rep = key[:, :, None].expand(b, hkv, groups, lk, d).reshape(b, h, lk, d) if groups > 1 else key
    v_rep = value[:, :, None].expand(b, hkv, groups, lk, -1).reshape(b, h, lk, -1) if groups > 1 else value
    out = torch.empty(b, h, lq, v_rep.shape[-1], dtype=query.dtype, device=query.device)
    keep = rec.out.get(layer) if layer in rec.layers else None
    rows = max(1, rec.chunk_bytes // max(1, b * h * lk * 8))
    for i in range(0, lq, rows):
        j = min(lq, i + rows)
        scores = torch.matmul(query[:, :, i:j], k_rep.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, i:j, :lk]
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if keep is not None:
            keep[:, :, i:j].copy_(weights)
        out[:, :, i:j] = torch.matmul(weights, v_rep)
    if layer == rec.last:
        raise _Done
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask
    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(IMPLEMENTATION, _capture_attention)
        AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


@contextlib.contextmanager
def _implementation(model, name: str) -> Iterator[None]:
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def model_shape(model) -> tuple[int, int, int]:
    """(layers, query heads, key/value heads) from the model's config."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    heads = cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, getattr(cfg, "num_key_value_heads", None) or heads


def _chosen_layers(layers: Iterable[int] | int | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):
        layers = [layers]
    chosen = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise MaskValueError(f"the model has layers 0..{n_layers - 1}, got layer {layer!r}")
        chosen.append(layer % n_layers)
    if not chosen:
        raise MaskValueError("layers is empty; give at least one layer index, or None for all")
    return sorted(set(chosen))


def capture(model, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
            layers: Iterable[int] | int | None = None, dtype: torch.dtype | None = None,
            max_bytes: int = DEFAULT_MAX_BYTES, chunk_bytes: int = CHUNK_BYTES) -> dict[int, torch.Tensor]:
    """Attention weights of a transformers model: ``{layer: [B, H, Lq, Lk]}``.

    ``input_ids`` is ``[B, L]`` (or ``[L]``); ``attention_mask`` the tokenizer's
    padding mask ``[B, L]``. ``layers`` chooses layers (default all); the
    forward stops after the last one. Weights come in the model's dtype unless
    ``dtype`` is given; each row is eager's softmax, so the result equals
    ``output_attentions=True`` of the model run with ``attn_implementation="eager"``.
    Temporaries are bounded by ``chunk_bytes`` per row chunk; the result
    itself (``B * H * Lq * Lk`` per layer) is refused above ``max_bytes``.

        >>> import torch, transformers
        >>> from attnmask import models
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> model = transformers.LlamaForCausalLM(cfg).eval()
        >>> maps = models.capture(model, torch.randint(0, 64, (1, 16)))
        >>> sorted(maps), tuple(maps[1].shape)
        ([0, 1], (1, 4, 16, 16))
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2):
        raise MaskValueError(f"input_ids must be a [B, L] or [L] tensor of token ids, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
    n_layers, n_heads, _ = model_shape(model)
    chosen = _chosen_layers(layers, n_layers)
    b, length = input_ids.shape
    param = next(model.parameters())
    dtype = dtype or param.dtype
    per_layer = b * n_heads * length * length * torch.empty((), dtype=dtype).element_size()
    if per_layer * len(chosen) > max_bytes:
        raise MaskValueError(
            f"capturing {len(chosen)} layers of [{b}, {n_heads}, {length}, {length}] weights needs "
            f"{per_layer * len(chosen) / 2**30:.1f} GiB, over max_bytes={max_bytes / 2**30:.1f} GiB; "
            f"choose fewer layers (layers=[...]), a shorter text, or raise max_bytes")
    _register()
    out = {layer: torch.empty(b, n_heads, length, length, dtype=dtype, device=param.device) for layer in chosen}
    rec = _Recorder(set(chosen), chosen[-1], out, dtype, chunk_bytes)
    _ACTIVE.append(rec)
    try:
        with _implementation(model, IMPLEMENTATION), torch.no_grad():
            try:
                model(input_ids=input_ids.to(param.device),
                      attention_mask=None if attention_mask is None else attention_mask.to(param.device),
                      use_cache=False)
            except _Done:
                pass
    finally:
        _ACTIVE.pop()
    return out


__all__ = ["capture", "model_shape"]
