"""Every attention kind of the registry as a transformers attention implementation.

Each kind ``k`` is registered under the name ``hf_efficient_<k>`` (dashes become underscores, e.g.
``hf_efficient_improved_clustered``) twice:

* with ``AttentionInterface``: :func:`efficient_attention_forward`, which transformers calls from
  inside every attention module. It reads the module's plan entry (set by ``patch_model``): a
  replaced layer runs its kind, a kept layer runs the model's own implementation (its
  ``base_attn_implementation``: ``sdpa``, ``eager`` with soft-capping, ...) unchanged;
* with ``AttentionMaskInterface``: :func:`efficient_mask`. For full causal/bidirectional layers it
  hands the attention function the 2-D padding mask ``(batch, kv_len)`` (True = real token), which
  the kinds honour; every other mask (sliding windows, packed sequences, custom overlays) is built
  by the model's own mask function, exactly as without hf_efficient, for the layers that keep
  softmax. A replaced layer that receives such a mask refuses it, except a sliding layer replaced
  by a windowed kind, which reads its padding from the mask's diagonal.

A recurrent cache layer (:mod:`.cache`) reaches the attention function through the keyword
argument :data:`CACHE_KWARG`, which it adds to the attention module's keyword arguments in
``cache.update(..., kwargs=kwargs)`` (the channel transformers' paged cache uses).

Masks and logit changes a kind cannot honour (packed sequences, custom 4-D masks, soft-capping,
sinks, relative position bias) raise ``ValueError``; they are never approximated silently.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..attention.registry import attention_kind_names, get_attention_kind
from .plan import CONFIG_KEY, LayerAttention
from .surgery import FEATURE_MAP_ATTRIBUTE, LAYER_ATTRIBUTE, is_learnable_feature_map, layer_attention

__all__ = [
    "CACHE_KWARG",
    "IMPLEMENTATION_PREFIX",
    "LAYER_ATTRIBUTE",
    "efficient_attention_forward",
    "efficient_mask",
    "implementation_name",
    "kind_from_implementation",
    "register_with_transformers",
]

IMPLEMENTATION_PREFIX = "hf_efficient_"
# Keyword argument through which a recurrent cache layer reaches the attention function.
CACHE_KWARG = "hf_efficient_cache_layer"


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


def _base_implementation(config) -> str:
    record = getattr(config, CONFIG_KEY, None) or {}
    base = record.get("base_attn_implementation") if isinstance(record, dict) else None
    return base if isinstance(base, str) and not base.startswith(IMPLEMENTATION_PREFIX) else "sdpa"


# --------------------------------------------------------------------------- mask function
def efficient_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """``AttentionMaskInterface`` function of every kind.

    Full causal/bidirectional masks: the boolean padding mask ``(batch, kv_length)`` (True = real
    key), or None when nothing is padded; causality is read from the module by the attention
    function. Any other mask (sliding window, packed sequences, custom overlays): the mask the
    model's own implementation would build, for the layers that keep softmax.
    """
    if mask_function is not causal_mask_function and mask_function is not bidirectional_mask_function:
        base = _base_implementation(kwargs.get("config"))
        return ALL_MASK_ATTENTION_FUNCTIONS[base](
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, **kwargs,
        )
    if kv_offset != 0 or int(q_offset) + q_length != kv_length:
        raise ValueError(
            f"hf_efficient attention needs the keys to be exactly the past and current tokens, but the cache presents "
            f"{kv_length} key slots for {q_length} new tokens after {int(q_offset)} (offset {kv_offset}). Static or "
            "pre-allocated caches are not supported: use the default cache (or LinearAttentionCache)"
        )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"hf_efficient: expected a 2-D (batch, seq) padding mask, got shape "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    if mask.shape != (batch_size, kv_length):
        raise ValueError(
            f"hf_efficient: the padding mask has shape {tuple(attention_mask.shape)} but the keys are "
            f"(batch={batch_size}, kv_len={kv_length}); pass an attention_mask covering the past and current tokens"
        )
    if bool(mask.all()):
        return None
    return mask


# --------------------------------------------------------------------------- softmax layers
def _base_function(module: torch.nn.Module, base: str) -> Callable:
    if base == "eager":  # each modeling file has its own eager function (soft-capping, sinks, ...)
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
        base = "sdpa"
    return ALL_ATTENTION_FUNCTIONS[base]


def _softmax(module, query, key, value, attention_mask, dropout, scaling, is_causal, layer, kwargs):
    """A kept layer: the model's own implementation, with the mask it would have built."""
    base = _base_implementation(module.config)
    mask = attention_mask
    if layer.is_global and (attention_mask is None or (isinstance(attention_mask, torch.Tensor)
                                                       and attention_mask.dim() == 2)):
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
        q_len, kv_len = query.shape[2], key.shape[2]
        mask = ALL_MASK_ATTENTION_FUNCTIONS[base](
            batch_size=query.shape[0], q_length=q_len, kv_length=kv_len,
            q_offset=kv_len - q_len,  # the queries are the last q_len of the keys' positions
            kv_offset=0,
            mask_function=causal_mask_function if causal else bidirectional_mask_function,
            attention_mask=attention_mask, allow_is_causal_skip=True, dtype=query.dtype, config=module.config,
            use_vmap=False, device=query.device,
        )
    if is_causal is not None:
        kwargs["is_causal"] = is_causal
    return _base_function(module, base)(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


# --------------------------------------------------------------------------- replaced layers
def _padding(attention_mask, layer: LayerAttention, q_len: int, kv_len: int, recurrent: bool) -> torch.Tensor | None:
    """The key padding mask ``(batch, kv_len)`` (True = real key) of a replaced layer, or None."""
    if attention_mask is None:
        return None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        padding = attention_mask[:, -kv_len:].to(torch.bool)
        if padding.shape[1] != kv_len:
            raise ValueError(f"hf_efficient: the padding mask covers {attention_mask.shape[1]} tokens but the layer "
                             f"has {kv_len} keys")
    elif (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and not layer.is_global
          and (recurrent or q_len == kv_len)):
        # A sliding layer replaced by a windowed kind gets the model's sliding mask; a key is real
        # iff the query at its own position may see it (the diagonal of the new tokens' block).
        diagonal = attention_mask[:, 0, :, -q_len:].diagonal(dim1=-2, dim2=-1)
        padding = diagonal if diagonal.dtype == torch.bool else diagonal == 0
    else:
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise ValueError(
            f"hf_efficient attention kind {layer.kind!r} got a prepared attention mask of shape {shape}; it honours "
            "only a 2-D (batch, seq) padding mask with causal or bidirectional attention. Pass the usual "
            "attention_mask instead of a 4-D one, and padding instead of packed sequences (position_ids restarting "
            "inside a row)"
        )
    return None if bool(padding.all()) else padding


_warned_dropout = False


def _check_kwargs(module, layer: LayerAttention, kwargs: dict) -> None:
    if kwargs.get("output_attentions"):
        raise ValueError("hf_efficient attention kinds do not form attention weights: output_attentions=True is not "
                         "supported")
    record = getattr(module.config, CONFIG_KEY, None) or {}
    if kwargs.get("softcap") is not None and not record.get("ignore_logit_softcap"):
        raise ValueError(f"hf_efficient attention kind {layer.kind!r} cannot apply soft-capping to attention logits "
                         f"(softcap={kwargs['softcap']}); patch with ignore_logit_softcap=True to accept that")
    for extra in ("position_bias", "s_aux"):
        if kwargs.get(extra) is not None:
            raise ValueError(f"hf_efficient attention kind {layer.kind!r} cannot apply {extra!r} to attention logits; "
                             "keep this model's layers softmax")
    if kwargs.get("sliding_window") is not None and layer.is_global:
        raise ValueError(f"a full-attention layer replaced by {layer.kind!r} was asked for sliding_window="
                         f"{kwargs['sliding_window']}; the layer types of the config and the plan disagree")


def _efficient(module, layer, query, key, value, attention_mask, dropout, scaling, is_causal, cache_layer, kwargs):
    global _warned_dropout
    _check_kwargs(module, layer, kwargs)
    kind = get_attention_kind(layer.kind)
    q_len, kv_len = query.shape[2], key.shape[2]
    padding = _padding(attention_mask, layer, q_len, kv_len, cache_layer is not None)
    if key.shape[1] != query.shape[1]:  # grouped-query attention: every query head gets its key/value head
        if query.shape[1] % key.shape[1]:
            raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})")
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if dropout > 0 and module.training and not _warned_dropout:
        warnings.warn("hf_efficient attention kinds have no attention matrix to drop out; attention dropout is not "
                      "applied (hidden-state dropout still is)", stacklevel=3)
        _warned_dropout = True
    feature_name = getattr(layer.params, "feature_map", None)
    if (isinstance(feature_name, str) and is_learnable_feature_map(feature_name)
            and getattr(module, FEATURE_MAP_ATTRIBUTE, None) is None):
        raise ValueError(f"layer {getattr(module, 'layer_idx', '?')} needs its learned {feature_name!r} feature map, "
                         "but the module has none: load efficient checkpoints through the Auto classes or patch_model")

    if cache_layer is not None:  # decoding from a recurrent state: the keys are the new tokens only
        if getattr(cache_layer, "kind", None) != layer.kind:
            raise ValueError(f"a layer of kind {layer.kind!r} got a {type(cache_layer).__name__} in its cache; build "
                             "the cache with LinearAttentionCache(config=model.config)")
        out = cache_layer.attend_with(layer.params, query, key, value, module=module, key_padding_mask=padding,
                                      scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    # One query (decoding over cached keys) sees every key, so causality is moot; fewer queries than
    # keys with causality (prefill after a prefix) puts the queries at the last positions.
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False)) and q_len > 1
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
    out = kind.forward(query, key, value, layer.params, causal=causal, key_padding_mask=padding,
                       query_padding_mask=query_padding, scale=scaling, module=module)
    if front > 0:
        out = out[:, :, front:]
    return out.transpose(1, 2).contiguous(), None


def efficient_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``AttentionInterface`` function of every kind.

    Signature of transformers' attention functions: q ``(batch, heads, q_len, dim)``, k/v
    ``(batch, kv_heads, kv_len, dim)`` with ``heads`` a multiple of ``kv_heads`` (grouped-query
    attention); returns ``(batch, q_len, heads, dim_v)`` and the attention weights (None for the
    kinds, which never form them).
    """
    layer = layer_attention(module)
    if layer is None:
        raise ValueError(
            f"{type(module).__name__} runs attn_implementation={module.config._attn_implementation!r} but its model "
            "was not patched by hf_efficient, so the choice and its parameters would not be recorded in the config or "
            "saved. Use hf_efficient.patch_model(model, kind, ...) or load with "
            "config=hf_efficient.efficient_config(config, kind, ...)"
        )
    cache_layer = kwargs.pop(CACHE_KWARG, None)
    if layer.kind is None:
        if cache_layer is not None:
            raise ValueError("a softmax layer received a recurrent cache layer; build the cache with "
                             "LinearAttentionCache(config=model.config)")
        return _softmax(module, query, key, value, attention_mask, dropout, scaling, is_causal, layer, kwargs)
    return _efficient(module, layer, query, key, value, attention_mask, dropout, scaling, is_causal, cache_layer,
                      kwargs)


def register_with_transformers() -> list[str]:
    """Register every kind of the registry with ``AttentionInterface`` and ``AttentionMaskInterface``.

    Idempotent (a name already registered is left alone, e.g. by a checkpoint's remote-code copy of
    this module); call it again after registering a new kind. Returns the implementation names.
    """
    names = []
    for kind in attention_kind_names():
        name = implementation_name(kind)
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, efficient_attention_forward)
        if name not in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, efficient_mask)
        names.append(name)
    return names
