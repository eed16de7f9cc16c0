"""``patch_model`` / ``unpatch_model``: put a registered attention kind inside a pretrained model.

The model keeps its weights and modules. What changes:

* each self-attention module gets a :class:`LayerAttention` (kind + parameters, or softmax) in
  the attribute ``hf_efficient_attention``, and, for learnable feature maps, a trainable
  ``hf_efficient_feature_map`` submodule (so it trains, saves and loads with the model);
* ``config._attn_implementation`` becomes ``hf_efficient_<kind>`` and ``config.hf_efficient``
  records the per-layer choice as JSON, so ``save_pretrained`` / ``from_pretrained`` round-trip;
* the config and model classes become their ``efficient-<model_type>`` subclasses (see
  :mod:`.configs`), so a saved checkpoint loads back patched through the Auto classes.

Attention modules are found through a small table of self-attention classes per architecture;
an architecture outside the table is tried when it routes attention through transformers'
``AttentionInterface`` (its modules call ``ALL_ATTENTION_FUNCTIONS``), and refused otherwise.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ..attention.feature_maps import FEATURE_MAPS
from ..attention.registry import get_attention_kind
from .attention_interface import (
    CONFIG_KEY,
    LAYER_ATTRIBUTE,
    LayerAttention,
    implementation_name,
    register_with_transformers,
)

__all__ = ["SELF_ATTENTION_CLASSES", "attention_modules", "is_patched", "patch_model", "plan_layers", "unpatch_model"]

FEATURE_MAP_ATTRIBUTE = "hf_efficient_feature_map"

# model_type -> names of the self-attention classes that patch_model replaces the attention of.
SELF_ATTENTION_CLASSES: dict[str, tuple[str, ...]] = {
    "bert": ("BertSelfAttention",),
    "roberta": ("RobertaSelfAttention",),
    "distilbert": ("DistilBertSelfAttention",),
    "gpt2": ("GPT2Attention",),
    "llama": ("LlamaAttention",),
    "qwen2": ("Qwen2Attention",),
    "vit": ("ViTAttention",),
}

_ROUTES_CACHE: dict[type, bool] = {}


def _routes_through_interface(cls: type) -> bool:
    """Whether a module class calls transformers' attention interface in its forward."""
    if cls not in _ROUTES_CACHE:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _ROUTES_CACHE[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return _ROUTES_CACHE[cls]


def _base_model_type(config) -> str:
    return getattr(config, "base_model_type", None) or config.model_type


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules of a model, in layer order, as ``(qualified name, module)``.

    Raises ``ValueError`` for a model whose attention does not go through transformers'
    ``AttentionInterface``, naming the architectures that are supported.
    """
    config = getattr(model, "config", None)
    if config is None or not isinstance(model, nn.Module):
        raise TypeError(f"patch_model needs a transformers PreTrainedModel, got {type(model).__name__}")
    model_type = _base_model_type(config)
    names = SELF_ATTENTION_CLASSES.get(model_type)
    found = []
    for qualified, module in model.named_modules():
        cls = type(module)
        if names is not None:
            selected = cls.__name__ in names
        else:  # an architecture outside the table: any attention module that uses the interface
            selected = _routes_through_interface(cls) and "Cross" not in cls.__name__
        if selected and not getattr(module, "is_cross_attention", False):
            found.append((qualified, module))
    if not found or not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"cannot patch {type(model).__name__} (model_type {model_type!r}): its attention does not go through "
            "transformers' AttentionInterface. Supported: "
            f"{', '.join(sorted(SELF_ATTENTION_CLASSES))}, and other architectures whose attention modules call "
            "ALL_ATTENTION_FUNCTIONS"
        )
    return found


def _layer_indices(spec: Iterable[int] | None, num_layers: int, what: str) -> set[int]:
    if spec is None:
        return set()
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Iterable):
        raise TypeError(f"{what} must be a list of layer indices, got {spec!r}")
    out = set()
    for i in spec:
        if not isinstance(i, int) or isinstance(i, bool) or not -num_layers <= i < num_layers:
            raise ValueError(f"{what}: layer index {i!r} is not an int in [-{num_layers}, {num_layers})")
        out.add(i % num_layers)
    return out


def plan_layers(
    num_layers: int,
    kind: str,
    *,
    layers: Iterable[int] | None = None,
    softmax_layers: Iterable[int] | None = None,
    keep_softmax_first: int = 0,
    keep_softmax_last: int = 0,
    layer_params: Mapping[int, Mapping[str, Any]] | None = None,
    **params: Any,
) -> list[LayerAttention]:
    """The attention of each of ``num_layers`` layers.

    Args:
        kind: registry name of the attention kind.
        layers: indices of the layers that get ``kind`` (default: all); the others stay softmax.
        softmax_layers: indices kept softmax (negative indices count from the end).
        keep_softmax_first, keep_softmax_last: keep this many first/last layers softmax.
        layer_params: per-layer overrides of ``params``, ``{layer_index: {name: value}}``.
        params: the kind's parameters for every patched layer.
    """
    kind_obj = get_attention_kind(kind)
    for name, value in (("keep_softmax_first", keep_softmax_first), ("keep_softmax_last", keep_softmax_last)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    chosen = _layer_indices(layers, num_layers, "layers") if layers is not None else set(range(num_layers))
    softmax = _layer_indices(softmax_layers, num_layers, "softmax_layers")
    softmax |= set(range(min(keep_softmax_first, num_layers)))
    softmax |= set(range(max(0, num_layers - keep_softmax_last), num_layers))
    overrides = {}
    for i, extra in (layer_params or {}).items():
        (index,) = _layer_indices([i], num_layers, "layer_params")
        if not isinstance(extra, Mapping):
            raise TypeError(f"layer_params[{i}] must be a dict of parameters, got {type(extra).__name__}")
        overrides[index] = dict(extra)
    kind_obj.make_params(**params)  # validates once, even when every layer stays softmax
    plan = []
    for i in range(num_layers):
        if i in chosen and i not in softmax:
            plan.append(LayerAttention(kind_obj.name, kind_obj.make_params(**{**params, **overrides.get(i, {})})))
        else:
            plan.append(LayerAttention(None))
    return plan


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


def _attach(module: nn.Module, layer: LayerAttention, config) -> None:
    setattr(module, LAYER_ATTRIBUTE, layer)
    if FEATURE_MAP_ATTRIBUTE in module._modules:
        delattr(module, FEATURE_MAP_ATTRIBUTE)
    name = getattr(layer.params, "feature_map", None)
    if isinstance(name, str) and name in FEATURE_MAPS:
        heads, head_dim = _heads_and_dim(module, config)
        fmap = FEATURE_MAPS[name](head_dim, heads)
        # Only learnable maps live on the module (stateless and seeded maps are rebuilt on demand).
        if any(True for _ in fmap.parameters()):
            ref = next(module.parameters(), None)
            if ref is not None:
                fmap = fmap.to(device=ref.device)
            module.add_module(FEATURE_MAP_ATTRIBUTE, fmap)


def apply_layers(model: nn.Module, plan: list[LayerAttention]) -> None:
    """Attach a per-layer plan to the model's attention modules (no config or class changes)."""
    modules = attention_modules(model)
    if len(plan) != len(modules):
        raise ValueError(f"the attention plan has {len(plan)} layers but the model has {len(modules)} attention layers")
    layer_types = getattr(model.config, "layer_types", None)
    for i, ((qualified, module), layer) in enumerate(zip(modules, plan, strict=True)):
        if layer.kind is not None and layer_types is not None and i < len(layer_types):
            if layer_types[i] not in ("full_attention", "attention"):
                raise ValueError(
                    f"layer {i} ({qualified}) uses {layer_types[i]!r}, which hf_efficient kinds cannot honour; keep it "
                    "softmax (softmax_layers=[...]) or disable it in the config (e.g. use_sliding_window=False)"
                )
        if layer.kind is not None and getattr(module, "is_causal", False):
            if not get_attention_kind(layer.kind).supports_causal:
                raise ValueError(
                    f"attention kind {layer.kind!r} has no causal form, but layer {i} ({qualified}) is causal; "
                    "use a kind that supports causal attention (e.g. 'linear') for this model"
                )
    for (_, module), layer in zip(modules, plan, strict=True):
        _attach(module, layer, model.config)


def _set_implementation(model: nn.Module, implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # pragma: no cover - every PreTrainedModel has it
        model.config._attn_implementation = implementation


def is_patched(model: nn.Module) -> bool:
    """Whether ``patch_model`` (or an efficient config) put hf_efficient attention in this model."""
    return bool(getattr(getattr(model, "config", None), CONFIG_KEY, None))


def patch_model(
    model: nn.Module,
    kind: str = "linear",
    *,
    layers: Iterable[int] | None = None,
    softmax_layers: Iterable[int] | None = None,
    keep_softmax_first: int = 0,
    keep_softmax_last: int = 0,
    layer_params: Mapping[int, Mapping[str, Any]] | None = None,
    **params: Any,
) -> nn.Module:
    """Replace softmax attention by the registered attention ``kind``; returns the same model.

    Example: ``patch_model(model, "improved-clustered", clusters=25, topk=32, keep_softmax_first=1)``.

    Args:
        model: a transformers ``PreTrainedModel`` (BERT, RoBERTa, DistilBERT, GPT-2, Llama, Qwen2,
            ViT, or another architecture whose attention uses ``AttentionInterface``).
        kind: registry name (see ``hf_efficient.attention_kind_names()``).
        layers, softmax_layers, keep_softmax_first, keep_softmax_last, layer_params: per-layer
            choice, see :func:`plan_layers`.
        params: the kind's parameters (``kind.params_class`` fields).

    The attention modules receive q/k/v ``(batch, heads, seq, dim)`` as before; only the function
    that mixes them changes. Patching a patched model first undoes the previous patch.
    """
    from .configs import as_efficient_config, register_auto_classes  # configs imports this module

    register_with_transformers()
    if is_patched(model):
        unpatch_model(model)
    modules = attention_modules(model)
    plan = plan_layers(
        len(modules),
        kind,
        layers=layers,
        softmax_layers=softmax_layers,
        keep_softmax_first=keep_softmax_first,
        keep_softmax_last=keep_softmax_last,
        layer_params=layer_params,
        **params,
    )
    config = model.config
    base_type = _base_model_type(config)
    classes = register_auto_classes(base_type)  # refuses unknown model types before anything changes
    original = {
        "config_class": type(config),
        "model_class": type(model),
        "attn_implementation": config._attn_implementation,
        "model_type": config.__dict__.get("model_type"),
    }
    apply_layers(model, plan)
    kind_name = get_attention_kind(kind).name
    setattr(config, CONFIG_KEY, describe_plan(kind_name, plan, config._attn_implementation))
    _set_implementation(model, implementation_name(kind_name))
    as_efficient_config(config, classes.config_class)
    model_class = classes.model_class_for(type(model))
    if model_class is not None:
        model.__class__ = model_class
    model._hf_efficient_original = original
    return model


def describe_plan(kind: str, plan: list[LayerAttention], base_attn_implementation: str | None) -> dict:
    """The JSON record stored in ``config.hf_efficient``."""
    return {
        "kind": kind,
        "layers": [layer.to_dict() for layer in plan],
        "base_attn_implementation": base_attn_implementation or "sdpa",
    }


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`: softmax attention, the original classes and config; returns the model.

    Learnable feature maps are removed with the patch. A model that is not patched is returned as is.
    """
    if not is_patched(model):
        return model
    config = model.config
    record = getattr(config, CONFIG_KEY)
    original = getattr(model, "_hf_efficient_original", None) or {}
    for _, module in model.named_modules():
        if hasattr(module, LAYER_ATTRIBUTE):
            delattr(module, LAYER_ATTRIBUTE)
        if FEATURE_MAP_ATTRIBUTE in module._modules:
            delattr(module, FEATURE_MAP_ATTRIBUTE)
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
    _set_implementation(model, original.get("attn_implementation") or record.get("base_attn_implementation", "sdpa"))
    if hasattr(model, "_hf_efficient_original"):
        del model._hf_efficient_original
    return model
