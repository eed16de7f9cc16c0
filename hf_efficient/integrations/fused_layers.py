"""Decoder blocks that decode a token in one compiled call when their attention keeps a recurrent state.

A decoder patched with ``linear`` or ``window-linear`` decodes in O(1) per token, so at batch 1 a step is bound by
reading the weights once, plus the Python of transformers' modules: on a 6-layer, 512-wide Llama about 1.5 ms a
token before any attention runs, half the time the weights take to read. ``EfficientLlamaDecoderLayer`` (and the
Mistral and Qwen2 ones, which share the layout) run such a step through ``decoder_block_step`` (RMSNorm, q/k/v
with biases, rotary, the kind's recurrent step with grouped-query heads, o, SwiGLU MLP, residuals), and keep the
cache layer's state as the module path would.

Everything else is the transformers layer unchanged: training, prefill, gradients, masks with padding, hooks
(``output_hidden_states`` and probes), adapters or other projection classes, learned feature maps, softmax layers,
non-float32 or non-CPU tensors all take ``super().forward``. ``patch_model`` switches a patched decoder's layers to
these static classes (and ``unpatch_model`` back); they pickle and save like the originals.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm

from hf_efficient_kernels import dispatch

from ..attention.linear import LinearAttentionState
from ..attention.window_linear import WindowLinearState
from ..decoding import (
    DecodeLinear,
    as_decode_linear,
    hooked,
    kernels_turned_off,
    place_for_decoding,
    plain_linear,
    swap_classes,
)
from .cache import LinearAttentionCache, RecurrentStateLayer
from .models import EfficientModelMixin
from .plan import CONFIG_KEY, plan_from_record
from .surgery import FEATURE_MAP_ATTRIBUTE, LAYER_ATTRIBUTE

__all__ = [
    "DecodingModelMixin",
    "EfficientLlamaDecoderLayer",
    "EfficientMistralDecoderLayer",
    "EfficientQwen2DecoderLayer",
    "FusedDecodeMixin",
    "fuse_decoder_layers",
    "prepare_for_decoding",
    "undo_decoding_preparation",
    "unfuse_decoder_layers",
]

_KINDS = ("linear", "window-linear")
_NORMS = (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm)
_ACTIVATIONS = (SiLUActivation, nn.SiLU)
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _linear_state(state) -> bool:
    return isinstance(state, LinearAttentionState) and state.key_shift is None


def fused_step(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """The block's output ``(batch, 1, hidden)`` for one new token per row through ``decoder_block_step``, with the
    cache layer's state advanced; None when the module path must run (see the module docstring)."""
    if torch.is_grad_enabled() or kwargs.get("attention_mask") is not None:
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    rotary = kwargs.get("position_embeddings")
    if not isinstance(cache, LinearAttentionCache) or rotary is None:
        return None
    # submodules and parameters through _modules/_parameters: nn.Module.__getattr__ is the slow path
    sub = layer._modules
    attn, mlp, norm1, norm2 = sub["self_attn"], sub["mlp"], sub["input_layernorm"], sub["post_attention_layernorm"]
    plan = attn.__dict__.get(LAYER_ATTRIBUTE)
    if (plan is None or plan.kind not in _KINDS or getattr(plan.params, "feature_map", None) not in ("elu", "relu")
            or attn.__dict__.get(FEATURE_MAP_ATTRIBUTE) is not None or FEATURE_MAP_ATTRIBUTE in attn._modules):
        return None
    index = attn.layer_idx
    cache_layer = cache.layers[index] if 0 <= index < len(cache.layers) else None
    if type(cache_layer) is not RecurrentStateLayer or cache_layer.kind != plan.kind or cache_layer._unread:
        return None
    state = cache_layer.state
    a, m = attn._modules, mlp._modules
    projections = [a[name] for name in _PROJECTIONS] + [m[name] for name in _MLP]
    for p in projections:
        if type(p) is not DecodeLinear:
            return None
    if (type(norm1) not in _NORMS or type(norm2) is not type(norm1) or norm1.variance_epsilon != norm2.variance_epsilon
            or type(m.get("act_fn", mlp.__dict__.get("act_fn"))) not in _ACTIVATIONS
            or hooked((layer, attn, mlp, norm1, norm2, *projections))):
        return None
    head_dim = attn.head_dim
    heads = projections[0]._parameters["weight"].shape[0] // head_dim
    kv_heads = projections[1]._parameters["weight"].shape[0] // head_dim
    # a state of another shape (another model's cache) goes to the module path, which names what does not fit
    want = (x.shape[0], heads, head_dim)
    if plan.kind == "linear":
        if not _linear_state(state) or tuple(state.k_sum.shape) != want:
            return None
        window, tensors = 0, {"kv": state.kv, "k_sum": state.k_sum}
    else:
        if (not isinstance(state, WindowLinearState) or state.window != plan.params.window
                or state.keys.dim() != 4 or (state.keys.shape[0], state.keys.shape[1], state.keys.shape[3]) != want
                or (state.linear is not None and (not _linear_state(state.linear)
                                                  or tuple(state.linear.k_sum.shape) != want))):
            return None
        window = plan.params.window
        # a prefill leaves slices of its keys; after the first compiled step the buffer is contiguous already
        tensors = {"keys": state.keys.contiguous(), "values": state.values.contiguous(),
                   "key_mask": state.mask.contiguous()}
        if state.linear is not None:
            tensors.update(kv=state.linear.kv, k_sum=state.linear.k_sum)
    weights = (norm1._parameters["weight"], *(p._parameters["weight"] for p in projections[:4]),
               norm2._parameters["weight"], *(p._parameters["weight"] for p in projections[4:]))
    biases = tuple(p._parameters["bias"] for p in projections)
    kernel = dispatch.decoder_block_step_kernel(
        x, weights, biases, tuple(rotary), tensors, heads, kv_heads, head_dim, plan.params.feature_map, window,
        attn.scaling, plan.params.eps, norm1.variance_epsilon)
    if kernel is None:
        return None
    out, packed, *window_state = kernel()
    linear = LinearAttentionState.unpack(packed) if packed.numel() else None
    if window:
        keys, values, mask = window_state
        cache_layer.commit(WindowLinearState(linear, keys, values, mask, window), x)
    else:
        cache_layer.commit(linear, x)
    return out


class FusedDecodeMixin:
    """Put in front of a transformers decoder-layer class: decoding steps that :func:`fused_step` takes run compiled,
    everything else is the layer's own ``forward``."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if not args and hidden_states.dim() == 3 and hidden_states.shape[1] == 1:
            out = fused_step(self, hidden_states, kwargs)
            if out is not None:
                return out
        return super().forward(hidden_states, *args, **kwargs)


class EfficientLlamaDecoderLayer(FusedDecodeMixin, LlamaDecoderLayer):
    pass


class EfficientMistralDecoderLayer(FusedDecodeMixin, MistralDecoderLayer):
    pass


class EfficientQwen2DecoderLayer(FusedDecodeMixin, Qwen2DecoderLayer):
    pass


_FUSED = {LlamaDecoderLayer: EfficientLlamaDecoderLayer, MistralDecoderLayer: EfficientMistralDecoderLayer,
          Qwen2DecoderLayer: EfficientQwen2DecoderLayer}
_PLAIN = {fused: plain for plain, fused in _FUSED.items()}


def fuse_decoder_layers(model: nn.Module) -> int:
    """Switch ``model``'s Llama, Mistral and Qwen2 decoder layers (exactly those classes) to their fused classes in
    place (the same objects, parameters and hooks); returns how many."""
    return len(swap_classes(model, _FUSED))


def unfuse_decoder_layers(model: nn.Module) -> int:
    """Undo :func:`fuse_decoder_layers`; returns how many layers were switched back."""
    return len(swap_classes(model, _PLAIN))


def prepare_for_decoding(model: nn.Module, place: bool = True) -> bool:
    """Give a patched model whose replaced layers all decode from a recurrent state the decoding fast path: plain
    ``nn.Linear`` layers become :class:`~hf_efficient.decoding.DecodeLinear`, Llama-layout decoder layers their
    fused classes, and with ``place`` the linear weights move onto huge pages (CPU, kernels not turned off). Returns
    whether the model decodes from a state (nothing is changed otherwise). Idempotent."""
    record = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not record or not isinstance(model, EfficientModelMixin) or not model._decodes_from_state(
            plan_from_record(record)):
        return False
    as_decode_linear(model)
    fuse_decoder_layers(model)
    if place and not kernels_turned_off():
        place_for_decoding(model)
    return True


def undo_decoding_preparation(model: nn.Module) -> None:
    """The module classes :func:`prepare_for_decoding` changed, back to transformers' (weights stay where they are)."""
    plain_linear(model)
    unfuse_decoder_layers(model)


class DecodingModelMixin(EfficientModelMixin):
    """:class:`~.models.EfficientModelMixin` with the package's decoding fast path (:func:`prepare_for_decoding`);
    the package's efficient model classes use it, remote code (which has no kernels) the plain mixin."""

    def _prepare_decoding(self, place: bool) -> None:
        prepare_for_decoding(self, place=place)
