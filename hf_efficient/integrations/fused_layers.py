"""Decoder blocks that decode a token in one compiled call when their attention keeps a recurrent state.

A decoder patched with ``linear`` or ``window-linear`` decodes in O(1) per token, so at batch 1 a step is bound by
reading the weights once, plus the Python of transformers' modules: on a 6-layer, 512-wide Llama about 1.5 ms a
token before any attention runs, half the time the weights take to read. ``EfficientLlamaDecoderLayer`` (and the
Mistral and Qwen2 ones, which share the layout) run such a step through ``decoder_block_step`` (RMSNorm, q/k/v
with biases, rotary, the kind's recurrent step with grouped-query heads, o, SwiGLU MLP, residuals), and keep the
cache layer's state as the module path would. Around the blocks, transformers' model-level ``forward`` costs
another 0.3 ms a token (mask building, output capture, a call per layer): ``FusedLlamaModel`` (and the Mistral and
Qwen2 ones) run a decoding step as embedding, rotary module, the compiled blocks and the final norm, when every
block would take its compiled step (:func:`fused_model_step`); the package's Llama, Mistral and Qwen2 causal LMs
call that step and their head without transformers' ``forward`` around them (:class:`FusedCausalLMMixin`). The
blocks, the final norm and the head then run as one compiled call (``decoder_stack_step``), and the cache keeps
the new states only once every block has run.

Everything else is the transformers layer unchanged: training, prefill, gradients, masks with padding, hooks
(``output_hidden_states`` and probes), adapters or other projection classes, learned feature maps, softmax layers,
non-float32 or non-CPU tensors all take ``super().forward``. ``patch_model`` switches a patched decoder's layers and
base model to these static classes (and ``unpatch_model`` back); they pickle and save like the originals.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.mistral.modeling_mistral import (
    MistralDecoderLayer,
    MistralModel,
    MistralRMSNorm,
    MistralRotaryEmbedding,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2Model, Qwen2RMSNorm, Qwen2RotaryEmbedding

from hf_efficient_kernels import dispatch

try:
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
except ImportError:  # a transformers without that registry finds the recordable outputs otherwise
    _CAN_RECORD_REGISTRY = None

from ..attention.linear import LinearAttentionState
from ..attention.window_linear import WindowLinearState
from ..decoding import (
    BlockStep,
    DecodeLinear,
    as_decode_linear,
    hooked,
    kernels_turned_off,
    norm_arguments,
    place_for_decoding,
    plain_linear,
    rms_norm_step,
    run_block_steps,
    swap_classes,
)
from .cache import LinearAttentionCache, RecurrentStateLayer, WindowRing
from .models import EfficientModelMixin
from .plan import CONFIG_KEY, plan_from_record
from .surgery import FEATURE_MAP_ATTRIBUTE, LAYER_ATTRIBUTE

__all__ = [
    "DecodingModelMixin",
    "EfficientLlamaDecoderLayer",
    "EfficientMistralDecoderLayer",
    "EfficientQwen2DecoderLayer",
    "FusedCausalLMMixin",
    "FusedDecodeMixin",
    "FusedLlamaModel",
    "FusedMistralModel",
    "FusedModelMixin",
    "FusedQwen2Model",
    "fuse_decoder_layers",
    "prepare_for_decoding",
    "undo_decoding_preparation",
    "unfuse_decoder_layers",
]

_KINDS = ("linear", "window-linear")
_NORMS = (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm)
_ROTARIES = (LlamaRotaryEmbedding, MistralRotaryEmbedding, Qwen2RotaryEmbedding)
_ACTIVATIONS = (SiLUActivation, nn.SiLU)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Window keys or values ``(batch, heads, r, d)`` as the block kernel reads them: each row contiguous and the
    rows of a head one after another (a prefill's slices of its keys and the compiled step's own buffers are; the
    batch and head strides may be anything), else a contiguous copy."""
    r, d = t.shape[-2], t.shape[-1]
    if (d <= 1 or t.stride(-1) == 1) and (r <= 1 or t.stride(-2) == d):
        return t  # Tensor.contiguous() costs a dispatch even when it changes nothing
    return t.contiguous()


def _mask_rows(t: torch.Tensor) -> torch.Tensor:
    """A window mask ``(batch, r)`` with each row contiguous (any batch stride), else a contiguous copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


_RING_LOCK = threading.Lock()


def _claim_next_row(ring: WindowRing) -> bool:
    """Whether the step may write its new key into row ``ring.end`` of the window buffers in place: no other state
    has written past this one and the buffers have the room. The row is claimed at once (the frontier moves past
    it), under a lock: another layer holding a copy of the same state in this model step, or another thread
    continuing a copy of the cache, then finds the row taken and copies the window instead. A claimed row whose
    step does not run is only a row left unused."""
    with _RING_LOCK:
        if ring.frontier[0] != ring.end or ring.end >= ring.capacity:
            return False
        ring.frontier[0] = ring.end + 1
        return True


def _linear_state(state) -> bool:
    return isinstance(state, LinearAttentionState) and state.key_shift is None


def fused_step(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """The block's output ``(batch, 1, hidden)`` for one new token per row through ``decoder_block_step``, with the
    cache layer's state advanced; None when the module path must run (see the module docstring)."""
    step = block_step(layer, x, kwargs)
    return None if step is None else step.run()


def block_step(layer: nn.Module, x: torch.Tensor, kwargs: dict, implementation: str | None = None
               ) -> BlockStep | None:
    """What :func:`fused_step` checks, without running anything: the block's :class:`BlockStep` for an input of
    x's shape, dtype and device, or None when the module path must run. ``implementation``: the kernels' setting
    read once for a whole model step (None: read it here)."""
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
    layers = cache.layers
    cache_layer = layers[index] if 0 <= index < len(layers) else None
    if (type(cache_layer) is not RecurrentStateLayer or cache_layer.kind != plan.kind
            or not cache_layer.continues_in_float32()):
        return None
    state = cache_layer.state
    a, m = attn._modules, mlp._modules
    projections = (a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"], m["gate_proj"], m["up_proj"], m["down_proj"])
    for p in projections:  # weights and biases set as plain tensors (not parameters) take the modules
        if type(p) is not DecodeLinear or "weight" not in p._parameters or "bias" not in p._parameters:
            return None
    act = m.get("act_fn", mlp.__dict__.get("act_fn"))
    if (type(norm1) not in _NORMS or type(norm2) is not type(norm1) or norm1.variance_epsilon != norm2.variance_epsilon
            or norm1._parameters.get("weight") is None or norm2._parameters.get("weight") is None
            or type(act) not in _ACTIVATIONS or hooked((layer, attn, mlp, norm1, norm2, act, *projections))):
        return None
    q, k, v, o, gate, up, down = (p._parameters for p in projections)
    head_dim = attn.head_dim
    heads = q["weight"].shape[0] // head_dim
    kv_heads = k["weight"].shape[0] // head_dim
    # a state of another shape (another model's cache) goes to the module path, which names what does not fit
    want = (x.shape[0], heads, head_dim)
    ring, append = None, False
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
        ring = cache_layer.window_ring()
        if ring is not None:  # the compiled step's own buffers: whole rows, as the kernel reads them
            tensors = {"keys": state.keys, "values": state.values, "key_mask": state.mask}
            append = _claim_next_row(ring)
        else:  # a prefill's slices of its keys have whole rows too; anything else is copied
            tensors = {"keys": _rows(state.keys), "values": _rows(state.values), "key_mask": _mask_rows(state.mask)}
        if state.linear is not None:
            tensors["kv"], tensors["k_sum"] = state.linear.kv, state.linear.k_sum
    weights = (norm1._parameters["weight"], q["weight"], k["weight"], v["weight"], o["weight"],
               norm2._parameters["weight"], gate["weight"], up["weight"], down["weight"])
    biases = (q["bias"], k["bias"], v["bias"], o["bias"], gate["bias"], up["bias"], down["bias"])
    kernel = dispatch.decoder_block_step_kernel(
        x, weights, biases, rotary, tensors, heads, kv_heads, head_dim, plan.params.feature_map, window,
        attn.scaling, plan.params.eps, norm1.variance_epsilon, append=append, implementation=implementation)
    if kernel is None:
        return None

    def commit(state: list[torch.Tensor]) -> None:
        kv, k_sum, *window_state = state
        linear = LinearAttentionState(kv, k_sum) if kv.numel() else None
        # the state's batch, dtype and device were checked above, and the kernel checks its input like x
        if not window:
            cache_layer.commit_token(linear)
            return
        keys, values, mask = window_state
        new = WindowLinearState(linear, keys, values, mask, window)
        if window == 1:  # nothing buffered: no ring
            cache_layer.commit_token(new)
        elif append:  # the new key went into row `end`, claimed (the frontier moved past it) when the step was built
            cache_layer.commit_token(new, WindowRing(new, ring.frontier, ring.end + 1, ring.capacity))
        else:  # new buffers, this state's view at their front
            rows = keys.shape[2]
            cache_layer.commit_token(new, WindowRing(new, [rows], rows, keys.stride(1) // head_dim))

    return BlockStep(kernel, commit)


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


# the arguments a decoding step of the model passes (generate() and the task heads); any other takes the modules
_STEP_ARGUMENTS = frozenset({"input_ids", "attention_mask", "position_ids", "cache", "past_key_values",
                             "inputs_embeds", "use_cache", "output_attentions", "output_hidden_states", "return_dict"})


def _flag(model: nn.Module, kwargs: dict, name: str, default: bool):
    """An ``output_*``/``return_dict``/``use_cache`` argument as transformers reads it: the argument, else the
    config's value."""
    return kwargs[name] if name in kwargs else getattr(model.config, name, default)


def fused_model_step(model: nn.Module, input_ids: torch.Tensor | None, kwargs: dict):
    """A Llama-layout base model's decoding step (one new token per row) with every block run by
    :func:`block_step`: the embedding, the rotary module and the final norm run as modules (their hooks too), the
    mask building, output capture and per-layer calls of transformers' ``forward`` are skipped. Gives
    ``BaseModelOutputWithPast`` or None, with nothing run, when ``forward`` must: any block that would take its
    modules, gradients, a padding mask (or a mask that does not cover the cache and the new token), hidden states
    or attentions asked for, a tuple asked for, a cache that is not a ``LinearAttentionCache``, other arguments."""
    out = _decoding_step(model, input_ids, kwargs)
    return None if out is None else BaseModelOutputWithPast(last_hidden_state=out[0], cache=out[1])


def _decoding_step(model: nn.Module, input_ids: torch.Tensor | None, kwargs: dict, head: nn.Module | None = None
                   ) -> tuple[torch.Tensor, LinearAttentionCache] | None:
    """:func:`fused_model_step`'s last hidden state and cache, without the output object; with ``head`` (the causal
    LM's head), its logits instead of the hidden state. The blocks, the final norm and the head run in one compiled
    call (``decoder_stack_kernel``) where the norm and the head are ones the kernels compute (not hooked, float32
    weights), else those two as modules after it."""
    if torch.is_grad_enabled() or not kwargs.keys() <= _STEP_ARGUMENTS:
        return None
    if "cache" in kwargs and "past_key_values" in kwargs:
        return None  # transformers names the clash
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    embeds = kwargs.get("inputs_embeds")
    if (not isinstance(cache, LinearAttentionCache) or (input_ids is None) == (embeds is None)
            or _flag(model, kwargs, "use_cache", True) is False or _flag(model, kwargs, "return_dict", True) is False
            or _flag(model, kwargs, "output_attentions", False) or _flag(model, kwargs, "output_hidden_states", False)):
        return None
    given = input_ids if embeds is None else embeds
    if not isinstance(given, torch.Tensor) or given.dim() != (2 if embeds is None else 3) or given.shape[1] != 1:
        return None
    batch, past = given.shape[0], cache.get_seq_length()
    mask = kwargs.get("attention_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and tuple(mask.shape) == (batch, past + 1)
                                 and bool(mask.all())):
        return None
    sub = model._modules
    layers = list(sub["layers"]._modules.values())[: model.config.num_hidden_layers]
    if not layers or any(type(layer) not in _FUSED_LAYERS for layer in layers):
        return None
    implementation = dispatch._requested(None)  # read once for the whole step, not once a block
    if implementation == "reference":
        return None
    hidden = sub["embed_tokens"](input_ids) if embeds is None else embeds
    shared = {"cache": cache, "position_embeddings": _rotary_embeddings(
        sub["rotary_emb"], hidden, kwargs.get("position_ids"), past, implementation)}
    steps = []
    for layer in layers:  # every block checked before any runs: a step is all compiled or all modules
        step = block_step(layer, hidden, shared, implementation)
        if step is None:
            return None
        steps.append(step)
    norm = sub["norm"]
    norm_args = (norm_arguments(norm, norm._parameters.get("weight"), norm.variance_epsilon)
                 if type(norm) in _NORMS else None)
    hidden, headed = run_block_steps(hidden, steps, norm_args, lambda h: _final_norm(norm, h, implementation), head,
                                     implementation)
    if head is not None and not headed:
        hidden = head(hidden)
    return hidden, cache


def fused_lm_step(model: nn.Module, input_ids: torch.Tensor | None, kwargs: dict, logits_to_keep=0):
    """A Llama-layout causal LM's decoding step with its base model's step taken by :func:`fused_model_step`: the
    base model's step and the head (in the blocks' compiled call, or as a module call when it has hooks or is not a
    plain linear layer), without transformers' ``forward`` around them (its decorators and the base model's call
    cost a tenth of a small model's Python per token). ``kwargs``: the
    base model's arguments (``return_dict`` too). Gives ``CausalLMOutputWithPast`` or None, with nothing run, when
    ``forward`` must: a tuple asked for, a ``logits_to_keep`` that is not a non-negative int (one position per row:
    any such value keeps it), a base model with hooks or of a class whose ``forward`` is not the fused one, or
    anything :func:`fused_model_step` leaves to the modules (``past_key_values``, transformers' deprecated name,
    among the arguments it does not take)."""
    wants_dict = kwargs.get("return_dict")
    if wants_dict is None:  # transformers' forward reads the config then
        wants_dict = getattr(model.config, "return_dict", True)
    if type(logits_to_keep) is not int or logits_to_keep < 0 or not wants_dict or "past_key_values" in kwargs:
        return None
    sub = model._modules
    base, head = sub.get("model"), sub.get("lm_head")
    if head is None or type(base).forward is not FusedModelMixin.forward or hooked((base,)):
        return None
    kwargs.pop("return_dict", None)
    out = _decoding_step(base, input_ids, kwargs, head)
    return None if out is None else CausalLMOutputWithPast(logits=out[0], cache=out[1])


def _rotary_embeddings(rotary: nn.Module, hidden: torch.Tensor, positions: torch.Tensor | None, past: int = 0,
                       implementation: str | None = None):
    """``rotary(hidden, position_ids=positions)`` (``positions`` None: the one position ``past`` for every row):
    for transformers' own rotary modules of a fixed frequency table (not the dynamic or longrope kinds, which
    update it from the positions), without hooks, on float32, the same arithmetic without the module's call and
    its casts to the same dtype (for one position, in one compiled call: ``rotary_cos_sin_kernel``).
    ``implementation``: the kernels' setting (None: read it)."""
    inv_freq = rotary._buffers.get("inv_freq") if type(rotary) in _ROTARIES else None
    kind = rotary.__dict__.get("rope_type")
    if (inv_freq is None or not isinstance(kind, str) or "dynamic" in kind or kind == "longrope"
            or hidden.dtype != torch.float32 or inv_freq.dtype != torch.float32 or inv_freq.device != hidden.device
            or hooked((rotary,))):
        if positions is None:
            positions = torch.full((1, 1), past, dtype=torch.long, device=hidden.device)
        return rotary(hidden, position_ids=positions)
    scaling = rotary.attention_scaling
    if positions is None:  # the same float32 products as the position tensor's, without building it
        kernel = dispatch.rotary_cos_sin_kernel(inv_freq, past, scaling, implementation=implementation)
        if kernel is not None:
            return tuple(kernel())
        freqs = (inv_freq * float(past)).view(1, 1, -1)
    else:
        freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scaling != 1.0:  # a product with 1.0 changes nothing
        cos, sin = cos * scaling, sin * scaling
    return cos, sin


def _final_norm(norm: nn.Module, hidden: torch.Tensor, implementation: str | None = None) -> torch.Tensor:
    """``norm(hidden)``; a transformers RMSNorm through :func:`~hf_efficient.decoding.rms_norm_step` (its module
    runs five ops, a twentieth of a small model's decoding step)."""
    if type(norm) not in _NORMS:
        return norm(hidden)
    return rms_norm_step(norm, hidden, norm._parameters.get("weight"), norm.variance_epsilon, implementation)


class FusedModelMixin:
    """Put in front of a transformers Llama-layout base model class: decoding steps that :func:`fused_model_step`
    takes skip the model-level Python of ``forward``; everything else is the model's own ``forward``."""

    def forward(self, input_ids: torch.Tensor | None = None, *args, **kwargs):
        if not args:
            out = fused_model_step(self, input_ids, kwargs)
            if out is not None:
                return out
        return super().forward(input_ids, *args, **kwargs)

    def __setstate__(self, state):
        super().__setstate__(state)
        _register_outputs(self)  # unpickled in a process that never built or switched a model of this class


class FusedCausalLMMixin:
    """Put in front of a transformers Llama-layout causal LM class: decoding steps that :func:`fused_lm_step` takes
    skip transformers' ``forward`` around the base model's compiled step; everything else is the model's own
    ``forward``, given the arguments as they came. ``forward`` has the parameters of transformers' (``generate()``
    reads them to choose what to pass, the positions of left-padded rows among them)."""

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs):
        given = {name: value for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids),
                                                 ("cache", cache), ("inputs_embeds", inputs_embeds),
                                                 ("use_cache", use_cache)) if value is not None}
        if labels is None and kwargs.keys() <= _STEP_ARGUMENTS:
            out = fused_lm_step(self, input_ids, {**given, **kwargs}, logits_to_keep)
            if out is not None:
                return out
        # only what was given: a cache=None next to the deprecated past_key_values would replace it
        return super().forward(input_ids=input_ids, labels=labels, logits_to_keep=logits_to_keep, **given, **kwargs)


def _register_outputs(module: nn.Module) -> None:
    """transformers looks up the outputs a model can record (``output_hidden_states``) by the name of its class,
    registered when a model is built: a base model switched to (or unpickled as) a class of its own registers as it
    would have."""
    if _CAN_RECORD_REGISTRY is not None:
        _CAN_RECORD_REGISTRY[module] = module._can_record_outputs


_FUSED_LAYERS = frozenset({EfficientLlamaDecoderLayer, EfficientMistralDecoderLayer, EfficientQwen2DecoderLayer})


class FusedLlamaModel(FusedModelMixin, LlamaModel):
    pass


class FusedMistralModel(FusedModelMixin, MistralModel):
    pass


class FusedQwen2Model(FusedModelMixin, Qwen2Model):
    pass


_FUSED = {LlamaDecoderLayer: EfficientLlamaDecoderLayer, MistralDecoderLayer: EfficientMistralDecoderLayer,
          Qwen2DecoderLayer: EfficientQwen2DecoderLayer, LlamaModel: FusedLlamaModel, MistralModel: FusedMistralModel,
          Qwen2Model: FusedQwen2Model}
_PLAIN = {fused: plain for plain, fused in _FUSED.items()}
_BASE_MODELS = frozenset({LlamaModel, MistralModel, Qwen2Model, FusedLlamaModel, FusedMistralModel, FusedQwen2Model})


def _swap(model: nn.Module, classes: dict[type, type]) -> int:
    names = swap_classes(model, classes)
    for module in model.modules():
        if type(module) in _BASE_MODELS:
            _register_outputs(module)
    return len(names)


def fuse_decoder_layers(model: nn.Module) -> int:
    """Switch ``model``'s Llama, Mistral and Qwen2 decoder layers and base models (exactly those classes) to their
    fused classes in place (the same objects, parameters and hooks); returns how many modules were switched."""
    return _swap(model, _FUSED)


def unfuse_decoder_layers(model: nn.Module) -> int:
    """Undo :func:`fuse_decoder_layers`; returns how many modules were switched back."""
    return _swap(model, _PLAIN)


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
