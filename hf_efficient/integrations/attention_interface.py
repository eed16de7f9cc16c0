"""Every attention kind of the registry as a transformers attention implementation.

Each kind ``k`` is registered twice, under the name ``hf_efficient_<k>`` (dashes become
underscores, e.g. ``hf_efficient_improved_clustered``):

* with ``AttentionInterface``: the function transformers calls from inside each attention module;
* with ``AttentionMaskInterface``: :func:`efficient_mask`, which hands the attention function the
  2-D padding mask ``(batch, kv_len)`` (True = real token) instead of a 4-D bias. Without it
  transformers would pass ``attention_mask=None`` and padding would silently leak into the output.

Masks that the kinds cannot honour (packed sequences, sliding windows, chunked attention, custom
``or``/``and`` mask functions, 4-D masks built by the caller) raise ``ValueError``; they are never
approximated silently. Layers that ``patch_model`` keeps softmax run transformers' own SDPA
function on the 4-D mask rebuilt from the 2-D one.

This file imports only torch, transformers and the registry, so it can be copied next to a saved
checkpoint as remote code.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..attention.registry import attention_kind_names, get_attention_kind

__all__ = [
    "IMPLEMENTATION_PREFIX",
    "LAYER_ATTRIBUTE",
    "LayerAttention",
    "efficient_mask",
    "implementation_name",
    "kind_from_implementation",
    "register_with_transformers",
]

IMPLEMENTATION_PREFIX = "hf_efficient_"
# Attribute that patch_model sets on each attention module: a LayerAttention (kind None = softmax).
LAYER_ATTRIBUTE = "hf_efficient_attention"
# Attribute holding the name of the config key that lists the per-layer choice.
CONFIG_KEY = "hf_efficient"


@dataclass
class LayerAttention:
    """The attention one layer runs: ``kind`` None means softmax (SDPA); ``params`` is the kind's
    validated parameter dataclass."""

    kind: str | None
    params: Any = None

    def to_dict(self) -> dict:
        params = dataclasses.asdict(self.params) if self.params is not None else None
        return {"kind": self.kind, "params": params}

    @staticmethod
    def from_dict(data: dict) -> LayerAttention:
        kind = data.get("kind")
        if kind is None:
            return LayerAttention(None)
        return LayerAttention(kind, get_attention_kind(kind).make_params(**(data.get("params") or {})))


def implementation_name(kind: str) -> str:
    """The ``attn_implementation`` string of a kind, e.g. ``"improved-clustered"`` ->
    ``"hf_efficient_improved_clustered"`` (no ``sdpa``/``flash``/``flex``/``/`` in it, which
    transformers would treat specially)."""
    return IMPLEMENTATION_PREFIX + get_attention_kind(kind).name.replace("-", "_")


def kind_from_implementation(implementation: str | None) -> str | None:
    """Inverse of :func:`implementation_name`; None for implementations that are not ours."""
    if not implementation or not implementation.startswith(IMPLEMENTATION_PREFIX):
        return None
    for name in attention_kind_names():
        if implementation_name(name) == implementation:
            return name
    return None


# --------------------------------------------------------------------------- mask function
_UNSUPPORTED_MASK = (
    "hf_efficient attention kinds honour only full (bidirectional or causal) attention with a 2-D "
    "padding mask; got {what}. Use attention_mask (batch, seq) padding instead of packed sequences, "
    "disable sliding windows/chunked attention (e.g. config.use_sliding_window=False), or keep the "
    "affected layers softmax."
)


def efficient_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """``AttentionMaskInterface`` function of every kind.

    Returns the boolean padding mask ``(batch, kv_length)`` (True = real key), or None when
    nothing is padded. Causality is not encoded here: the attention function reads
    ``module.is_causal``. Anything beyond padding + causal/bidirectional raises ``ValueError``.
    """
    if mask_function is not causal_mask_function and mask_function is not bidirectional_mask_function:
        name = getattr(mask_function, "__name__", type(mask_function).__name__)
        raise ValueError(
            _UNSUPPORTED_MASK.format(
                what=f"a mask built from {name!r} (packed sequences, sliding window, chunked or custom mask)"
            )
        )
    if kv_offset != 0:
        raise ValueError(_UNSUPPORTED_MASK.format(what=f"a key window starting at offset {kv_offset}"))
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    if mask.shape != (batch_size, kv_length):
        raise ValueError(
            f"hf_efficient: the padding mask has shape {tuple(attention_mask.shape)} but the keys are "
            f"(batch={batch_size}, kv_len={kv_length}); static caches longer than the input are not supported"
        )
    if bool(mask.all()):
        return None
    return mask


# --------------------------------------------------------------------------- attention function
def _softmax_fallback(module, query, key, value, padding, dropout, scaling, causal, **kwargs):
    """Transformers' SDPA on the 4-D boolean mask that the 2-D padding mask stands for."""
    q_len, kv_len = query.shape[2], key.shape[2]
    mask4d = None
    if padding is not None or (causal and q_len != kv_len):
        mask4d = sdpa_mask(
            batch_size=query.shape[0],
            q_length=q_len,
            kv_length=kv_len,
            q_offset=kv_len - q_len,  # the queries are the last q_len positions (cache or not)
            mask_function=causal_mask_function if causal else bidirectional_mask_function,
            attention_mask=padding,
            allow_is_causal_skip=False,
            device=query.device,
        )
    return sdpa_attention_forward(
        module, query, key, value, mask4d, dropout=dropout, scaling=scaling, is_causal=causal and mask4d is None
    )


def _layer_for(module, default_kind: str) -> LayerAttention:
    layer = getattr(module, LAYER_ATTRIBUTE, None)
    if layer is not None:
        return layer
    config = getattr(module, "config", None)
    if config is not None and getattr(config, CONFIG_KEY, None):
        # A patched model's attention module that patch_model did not select (e.g. cross-attention).
        return LayerAttention(None)
    # attn_implementation="hf_efficient_<kind>" set by hand: the kind with its default parameters.
    kind = get_attention_kind(default_kind)
    layer = LayerAttention(kind.name, kind.make_params())
    return layer


_warned_dropout = False


def make_attention_function(kind_name: str):
    """The ``AttentionInterface`` function for ``kind_name`` (used by layers without a per-layer choice).

    Signature of transformers' attention functions: q ``(batch, heads, q_len, dim)``, k/v
    ``(batch, kv_heads, kv_len, dim)`` with ``heads`` a multiple of ``kv_heads`` (grouped-query
    attention), returns ``(batch, q_len, heads, dim_v)`` and None for the weights.
    """

    def attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        global _warned_dropout
        layer = _layer_for(module, kind_name)
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
        if kwargs.get("sliding_window") is not None:
            raise ValueError(_UNSUPPORTED_MASK.format(what=f"sliding_window={kwargs['sliding_window']}"))
        for extra in ("softcap", "position_bias", "s_aux"):  # logit changes the kinds cannot reproduce
            if kwargs.get(extra) is not None and layer.kind is not None:
                raise ValueError(f"hf_efficient attention kind {layer.kind!r} cannot apply {extra!r} to attention "
                                 "logits; keep this model's layers softmax")
        if kwargs.get("output_attentions"):
            raise ValueError("hf_efficient attention kinds do not form attention weights: output_attentions=True "
                             "is not supported")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
            if layer.kind is None:
                return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, is_causal=is_causal, **kwargs)
            shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
            raise ValueError(
                f"hf_efficient attention kind {layer.kind!r} got a prepared attention mask of shape {shape}; it "
                "honours only a 2-D (batch, seq) padding mask. Pass the usual attention_mask instead of a 4-D one."
            )
        q_len, kv_len = query.shape[2], key.shape[2]
        padding = attention_mask[:, -kv_len:].to(torch.bool) if attention_mask is not None else None
        if layer.kind is None:
            return _softmax_fallback(module, query, key, value, padding, dropout, scaling, causal)

        kind = get_attention_kind(layer.kind)
        if key.shape[1] != query.shape[1]:
            if query.shape[1] % key.shape[1]:
                raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads "
                                 f"({key.shape[1]})")
            groups = query.shape[1] // key.shape[1]
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        if dropout > 0 and module.training and not _warned_dropout:
            warnings.warn("hf_efficient attention kinds have no attention matrix to drop out; attention dropout "
                          "is not applied (hidden-state dropout still is)", stacklevel=2)
            _warned_dropout = True

        # One query (decoding) sees every cached key, so causality is moot; fewer queries than keys
        # with causality (prefill after a prefix) is handled by padding the queries at the front.
        causal = causal and q_len > 1
        if causal and not kind.supports_causal:
            raise ValueError(f"attention kind {kind.name!r} does not support causal attention")
        query_padding = padding[:, -q_len:] if padding is not None and q_len == kv_len else None
        front = kv_len - q_len if causal else 0
        if front > 0:
            query = torch.cat([query.new_zeros(*query.shape[:2], front, query.shape[3]), query], dim=2)
            query_padding = torch.ones(query.shape[0], kv_len, dtype=torch.bool, device=query.device)
            query_padding[:, :front] = False
            if padding is not None:
                query_padding &= padding
        out = kind.forward(
            query,
            key,
            value,
            layer.params,
            causal=causal,
            key_padding_mask=padding,
            query_padding_mask=query_padding,
            scale=scaling,
            module=module,
        )
        if front > 0:
            out = out[:, :, front:]
        return out.transpose(1, 2).contiguous(), None

    attention_forward.__name__ = f"{implementation_name(kind_name)}_forward"
    return attention_forward


def register_with_transformers() -> list[str]:
    """Register every kind of the registry with ``AttentionInterface`` and ``AttentionMaskInterface``.

    Idempotent; call it again after registering a new kind. Returns the implementation names.
    """
    names = []
    for kind in attention_kind_names():
        name = implementation_name(kind)
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, make_attention_function(kind))
        if name not in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, efficient_mask)
        names.append(name)
    return names
