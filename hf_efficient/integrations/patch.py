"""``patch_model`` / ``unpatch_model``: put a registered attention kind inside a pretrained model.

The model keeps its weights and modules. Patching is the chain of this package's steps:

1. :mod:`.plan`: which kind each layer gets (hybrid models: the full-attention layers; the
   sliding-window layers stay softmax unless ``sliding=`` names a windowed kind);
2. :mod:`.surgery`: each attention module gets its plan entry (and a trainable feature map when
   the kind learns one);
3. :mod:`.architectures`: the config and model become their static ``Efficient*`` classes, with
   ``config.hf_efficient`` recording the plan and ``config._attn_implementation`` set to
   ``hf_efficient_<kind>``, so ``save_pretrained`` / ``from_pretrained`` round-trip.

``unpatch_model`` undoes all three, bit for bit.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from .architectures import efficient_class, supported_model_classes
from .attention_interface import implementation_name, register_with_transformers
from .fused_layers import prepare_for_decoding, undo_decoding_preparation
from .plan import CONFIG_KEY, describe_plan, plan_layers, summarize_plan
from .surgery import FEATURE_MAP_ATTRIBUTE, apply_plan, attention_modules, base_model_type, remove_plan

# FEATURE_MAP_ATTRIBUTE and attention_modules live in .surgery; also importable from here.
__all__ = ["FEATURE_MAP_ATTRIBUTE", "attention_modules", "is_patched", "patch_model", "unpatch_model"]

logger = logging.getLogger("hf_efficient")


def is_patched(model: nn.Module) -> bool:
    """Whether ``patch_model`` (or an efficient config) put hf_efficient attention in this model."""
    return bool(getattr(getattr(model, "config", None), CONFIG_KEY, None))


def _set_implementation(model: nn.Module, implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # pragma: no cover - every PreTrainedModel has it
        model.config._attn_implementation = implementation


def _register_output_capture(model: nn.Module) -> None:
    """Let ``output_hidden_states`` / ``output_attentions`` work after the model's class was swapped.

    transformers collects those outputs through hooks looked up by the model's class, registered when a
    model of that class is built; a class the instance was switched to (the ``Efficient*`` class, or the
    base class on unpatching a model that was built efficient) may never have been built, and the model
    would then silently return None for them.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # pragma: no cover - transformers without hook-based output capture
        return
    recordable = getattr(model, "_can_record_outputs", None)
    if recordable and not _CAN_RECORD_REGISTRY.get(model):
        _CAN_RECORD_REGISTRY[model] = recordable


def _own_config(model: nn.Module):
    """Give the model (and its submodules) a copy of its config before the patch changes it; return it.

    transformers models keep a reference to the config they were built from, so two models built from one
    config object share it: changing it in place would mark the other model as patched as well (its
    ``save_pretrained`` would then write a checkpoint that reloads with this model's attention).
    """
    memo: dict = {}
    config = copy.deepcopy(model.config, memo)  # memo: id of every original (sub-)config -> its copy
    for module in model.modules():
        old = module.__dict__.get("config")
        if old is not None and id(old) in memo:
            module.config = memo[id(old)]
    return config


def as_efficient_config(config, config_class: type) -> None:
    """Turn ``config`` into an instance of ``config_class`` (a subclass of its class) in place."""
    config.__class__ = config_class
    # A config read from JSON may carry the base model_type as an instance attribute; the class's wins.
    config.__dict__.pop("model_type", None)


def patch_model(
    model: nn.Module,
    kind: str = "linear",
    *,
    layers: Iterable[int] | None = None,
    softmax_layers: Iterable[int] | None = None,
    keep_softmax_first: int = 0,
    keep_softmax_last: int = 0,
    layer_params: Mapping[int, Mapping[str, Any]] | None = None,
    sliding: str | None = None,
    sliding_params: Mapping[str, Any] | None = None,
    ignore_logit_softcap: bool = False,
    **params: Any,
) -> nn.Module:
    """Replace softmax attention by the registered attention ``kind``; returns the same model.

    Example: ``patch_model(model, "improved-clustered", clusters=25, topk=32, keep_softmax_first=1)``.

    Args:
        model: a transformers model of a supported architecture (BERT, RoBERTa, DistilBERT, ELECTRA,
            ModernBERT, ViT, GPT-2, GPT-NeoX, Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3,
            Cohere2; see ``surgery.SELF_ATTENTION_CLASSES``).
        kind: registry name (see ``hf_efficient.attention_kind_names()``) for the full-attention layers.
        layers, softmax_layers, keep_softmax_first, keep_softmax_last, layer_params: per-layer
            choice, see :func:`~.plan.plan_layers`.
        sliding: kind for the sliding-window layers of a hybrid model (default None: they keep
            their softmax attention and window); it must honour a window (``"window-linear"``).
        sliding_params: parameters of the ``sliding`` kind (``window`` defaults to the model's).
        ignore_logit_softcap: replace layers of a model that soft-caps attention logits (Gemma 2)
            although the kinds cannot apply the cap; refused otherwise.
        params: the kind's parameters (``kind.params_class`` fields).

    The attention modules receive q/k/v ``(batch, heads, seq, dim)`` as before; only the function
    that mixes them changes. Patching a patched model first undoes the previous patch. The plan
    (which layers were replaced, which kept) is logged at INFO level and recorded in
    ``model.config.hf_efficient``.
    """
    if is_patched(model):
        unpatch_model(model)
    modules = attention_modules(model)  # refuses unsupported architectures before anything changes
    config = model.config
    config_class, model_class = efficient_class(type(config)), efficient_class(type(model))
    if config_class is None or model_class is None:
        raise ValueError(
            f"cannot patch {type(model).__name__}: hf_efficient has no efficient class for it. Supported "
            f"{base_model_type(config)!r} classes: {', '.join(supported_model_classes(base_model_type(config)))}"
        )
    plan = plan_layers(config, kind, layers=layers, softmax_layers=softmax_layers,
                       keep_softmax_first=keep_softmax_first, keep_softmax_last=keep_softmax_last,
                       layer_params=layer_params, sliding=sliding, sliding_params=sliding_params, **params)
    if len(plan) != len(modules):
        raise ValueError(f"the config lists {len(plan)} attention layers but {type(model).__name__} has {len(modules)}")
    register_with_transformers()
    config = _own_config(model)  # the plan is written into this model's copy only
    apply_plan(model, plan, ignore_logit_softcap=ignore_logit_softcap)  # checks everything before changing
    original = {
        "config_class": type(config),
        "model_class": type(model),
        "attn_implementation": config._attn_implementation,
        "model_type": config.__dict__.get("model_type"),
    }
    record = describe_plan(kind, plan, config._attn_implementation or "sdpa", sliding=sliding,
                           ignore_logit_softcap=ignore_logit_softcap)
    setattr(config, CONFIG_KEY, record)
    _set_implementation(model, implementation_name(record["kind"]))
    as_efficient_config(config, config_class)
    model.__class__ = model_class
    _register_output_capture(model)
    model._hf_efficient_original = original
    # a constant-state decoder is bound by reading its weights: the decoding fast path (compiled blocks, weights
    # back to back on huge pages; the same parameters and checkpoints), see .fused_layers
    prepare_for_decoding(model)
    logger.info("hf_efficient: patched %s: %s", type(model).__name__, summarize_plan(plan))
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`: softmax attention, the original classes and config; returns the model.

    Learnable feature maps are removed with the patch. A model that is not patched is returned as is.
    """
    if not is_patched(model):
        return model
    config = model.config
    record = getattr(config, CONFIG_KEY)
    original = getattr(model, "_hf_efficient_original", None) or {}
    remove_plan(model)
    delattr(config, CONFIG_KEY)
    config_class = original.get("config_class")
    model_class = original.get("model_class")
    if config_class is None or model_class is None:  # built as an efficient model: step to its base
        config_class = getattr(type(config), "hf_efficient_base_class", type(config))
        model_class = getattr(type(model), "hf_efficient_base_class", type(model))
    config.__class__ = config_class
    config.__dict__.pop("model_type", None)  # a config read from JSON may carry "efficient-..." here
    if original.get("model_type") is not None:
        config.__dict__["model_type"] = original["model_type"]
    model.__class__ = model_class
    undo_decoding_preparation(model)
    _register_output_capture(model)
    _set_implementation(model, original.get("attn_implementation") or record.get("base_attn_implementation")
                        or "sdpa")
    if hasattr(model, "_hf_efficient_original"):
        del model._hf_efficient_original
    return model
