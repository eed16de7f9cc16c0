"""Apply a plan to a model's modules (the second step of patching), and undo it.

Each self-attention module of the model gets its :class:`~.plan.LayerAttention` in the attribute
``hf_efficient_attention`` and, for a learnable feature map (``hedgehog``), a trainable
``hf_efficient_feature_map`` submodule, so the map trains, saves and loads with the model.
Nothing else about the module changes: it still projects q/k/v and calls transformers'
attention interface, where :mod:`.attention_interface` reads the attribute.

Attention modules are found through a table of self-attention classes per architecture (as PEFT
targets modules by name). An architecture outside the table is refused: each one in it is tested
for masks, padding, grouped-query attention and save/load.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Sequence

from torch import nn

from ..attention.feature_maps import FEATURE_MAPS
from ..attention.registry import get_attention_kind
from .plan import CONFIG_KEY, LayerAttention

__all__ = [
    "FEATURE_MAP_ATTRIBUTE",
    "LAYER_ATTRIBUTE",
    "REFUSED_ARCHITECTURES",
    "SELF_ATTENTION_CLASSES",
    "apply_plan",
    "attention_modules",
    "base_model_type",
    "is_learnable_feature_map",
    "layer_attention",
    "remove_plan",
    "shares_kwargs_with_cache",
]

# Attribute that holds each attention module's LayerAttention (kind None = softmax).
LAYER_ATTRIBUTE = "hf_efficient_attention"
# Submodule that holds a learnable feature map.
FEATURE_MAP_ATTRIBUTE = "hf_efficient_feature_map"

# model_type -> names of the self-attention classes whose attention patch_model replaces.
SELF_ATTENTION_CLASSES: dict[str, tuple[str, ...]] = {
    "bert": ("BertSelfAttention",),
    "roberta": ("RobertaSelfAttention",),
    "distilbert": ("DistilBertSelfAttention",),
    "electra": ("ElectraSelfAttention",),
    "modernbert": ("ModernBertAttention",),
    "gpt2": ("GPT2Attention",),
    "gpt_neox": ("GPTNeoXAttention",),
    "llama": ("LlamaAttention",),
    "mistral": ("MistralAttention",),
    "qwen2": ("Qwen2Attention",),
    "qwen3": ("Qwen3Attention",),
    "phi3": ("Phi3Attention",),
    "gemma2": ("Gemma2Attention",),
    "gemma3_text": ("Gemma3Attention",),
    "cohere2": ("Cohere2Attention",),
    "vit": ("ViTAttention",),
}

# Architectures whose attention does something no kind can reproduce: model_type -> why.
REFUSED_ARCHITECTURES: dict[str, str] = {
    "gpt_oss": "its attention adds a learned 'sink' logit per head (s_aux) to every softmax, which linear and "
               "clustered attention cannot reproduce",
    "t5": "its attention adds a learned relative position bias to the logits",
    "mt5": "its attention adds a learned relative position bias to the logits",
    "deberta": "its disentangled attention adds relative position terms to the logits",
    "deberta-v2": "its disentangled attention adds relative position terms to the logits",
}


def base_model_type(config) -> str:
    """The transformers model_type of a config, also for an ``efficient-<type>`` config."""
    return getattr(config, "base_model_type", None) or config.model_type


def _supported() -> str:
    return ", ".join(sorted(SELF_ATTENTION_CLASSES))


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules of a model, in layer order, as ``(qualified name, module)``.

    Raises ``TypeError`` for something that is not a transformers model and ``ValueError`` for an
    architecture outside :data:`SELF_ATTENTION_CLASSES`, naming the supported ones.
    """
    config = getattr(model, "config", None)
    if config is None or not isinstance(model, nn.Module) or not hasattr(config, "model_type"):
        raise TypeError(f"patch_model needs a transformers PreTrainedModel, got {type(model).__name__}")
    model_type = base_model_type(config)
    if model_type in REFUSED_ARCHITECTURES:
        raise ValueError(f"cannot patch {type(model).__name__} (model_type {model_type!r}): "
                         f"{REFUSED_ARCHITECTURES[model_type]}. Supported: {_supported()}")
    names = SELF_ATTENTION_CLASSES.get(model_type)
    if names is None:
        raise ValueError(
            f"cannot patch {type(model).__name__} (model_type {model_type!r}): hf_efficient supports the architectures "
            f"whose masks, padding and save/load it tests. Supported: {_supported()}"
        )
    found = [
        (qualified, module)
        for qualified, module in model.named_modules()
        if type(module).__name__ in names and not getattr(module, "is_cross_attention", False)
    ]
    if not found or not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"cannot patch {type(model).__name__}: no attention module of {', '.join(names)} goes through "
                         f"transformers' AttentionInterface. Supported: {_supported()}")
    return found


@functools.cache
def is_learnable_feature_map(name: str) -> bool:
    """Whether the registry's feature map ``name`` has trainable parameters (lives on the module)."""
    return any(True for _ in FEATURE_MAPS[name](8, 1).parameters())


@functools.cache
def shares_kwargs_with_cache(module_class: type) -> bool:
    """Whether an attention class hands its keyword arguments to ``cache.update(..., kwargs=kwargs)``,
    the channel through which a cache layer reaches the attention function (as transformers' paged
    cache does). GPT-NeoX, for one, does not: a recurrent cache cannot serve it."""
    try:
        source = inspect.getsource(module_class.forward)
    except (OSError, TypeError):
        return False
    return "kwargs=kwargs" in source


def _heads_and_dim(module: nn.Module, config) -> tuple[int, int]:
    heads = (
        getattr(module, "num_heads", None)
        or getattr(module, "num_attention_heads", None)
        or getattr(config, "num_attention_heads", None)
    )
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    if head_dim is None:
        head_dim = config.hidden_size // heads
    return int(heads), int(head_dim)


def _check(model: nn.Module, modules, plan: Sequence[LayerAttention], ignore_logit_softcap: bool) -> None:
    if len(plan) != len(modules):
        raise ValueError(f"the attention plan has {len(plan)} layers but the model has {len(modules)} attention layers")
    config = model.config
    softcap = getattr(config, "attn_logit_softcapping", None)
    for i, ((qualified, module), layer) in enumerate(zip(modules, plan, strict=True)):
        if layer.kind is None:
            continue
        kind = get_attention_kind(layer.kind)
        windowed = "window" in {f.name for f in dataclasses.fields(kind.params_class)}
        if windowed and not getattr(module, "is_causal", False):
            raise ValueError(f"layer {i} ({qualified}) attends in both directions, but {layer.kind!r} is a causal "
                             "sliding window; keep this layer softmax, or use a bidirectional kind (e.g. 'linear')")
        if getattr(module, "is_causal", False) and not kind.supports_causal:
            raise ValueError(f"attention kind {layer.kind!r} has no causal form, but layer {i} ({qualified}) is "
                             "causal; use a kind that supports causal attention (e.g. 'linear') for this model")
        if softcap is not None and not ignore_logit_softcap:
            raise ValueError(
                f"{type(model).__name__} caps its attention logits (attn_logit_softcapping={softcap}), which "
                f"{layer.kind!r} cannot apply. Keep the full-attention layers softmax, or pass "
                "ignore_logit_softcap=True to replace them anyway (the cap then no longer limits those layers; kept "
                "layers still apply it)"
            )
        if isinstance(getattr(module, "sinks", None), nn.Parameter):
            raise ValueError(f"layer {i} ({qualified}) adds learned attention-sink logits, which {layer.kind!r} cannot "
                             "reproduce")


def _attach(module: nn.Module, layer: LayerAttention, config) -> None:
    setattr(module, LAYER_ATTRIBUTE, layer)
    if FEATURE_MAP_ATTRIBUTE in module._modules:
        delattr(module, FEATURE_MAP_ATTRIBUTE)
    name = getattr(layer.params, "feature_map", None)
    if isinstance(name, str) and name in FEATURE_MAPS and is_learnable_feature_map(name):
        heads, head_dim = _heads_and_dim(module, config)
        fmap = FEATURE_MAPS[name](head_dim, heads)
        ref = next(module.parameters(), None)
        if ref is not None:
            fmap = fmap.to(device=ref.device)
        module.add_module(FEATURE_MAP_ATTRIBUTE, fmap)


def apply_plan(model: nn.Module, plan: Sequence[LayerAttention], *, ignore_logit_softcap: bool = False) -> None:
    """Attach a per-layer plan to the model's attention modules (no config or class changes).

    Checks everything first (layer count, causal support, soft-capped logits, attention sinks), so
    a refused plan changes nothing.
    """
    modules = attention_modules(model)
    _check(model, modules, plan, ignore_logit_softcap)
    for (_, module), layer in zip(modules, plan, strict=True):
        _attach(module, layer, model.config)


def remove_plan(model: nn.Module) -> None:
    """Remove every per-layer attribute and learnable feature map that :func:`apply_plan` added."""
    for _, module in model.named_modules():
        if hasattr(module, LAYER_ATTRIBUTE):
            delattr(module, LAYER_ATTRIBUTE)
        if FEATURE_MAP_ATTRIBUTE in module._modules:
            delattr(module, FEATURE_MAP_ATTRIBUTE)


def layer_attention(module: nn.Module) -> LayerAttention | None:
    """The attention a module runs: its plan entry; softmax for a module of a patched model that the
    plan did not select (e.g. cross-attention); None for a module of a model that was never patched."""
    layer = getattr(module, LAYER_ATTRIBUTE, None)
    if layer is not None:
        return layer
    config = getattr(module, "config", None)
    if config is not None and getattr(config, CONFIG_KEY, None):
        return LayerAttention(None)
    return None
