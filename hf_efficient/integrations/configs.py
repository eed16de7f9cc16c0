"""Efficient configs and models: ``efficient-<model_type>`` classes registered with the Auto classes.

For a base architecture such as BERT this builds

* ``EfficientBertConfig(BertConfig)`` with ``model_type = "efficient-bert"``; its ``hf_efficient``
  entry (JSON) holds the attention kind and the per-layer parameters;
* ``EfficientBertModel(BertModel)``, ``EfficientBertForSequenceClassification(...)``, ... one per
  Auto head the base architecture has; each patches itself at the end of ``__init__``, so
  ``AutoModelForX.from_pretrained(base_checkpoint, config=efficient_config(...))`` loads the
  pretrained weights into a model with efficient attention.

Importing ``hf_efficient`` registers the classes of the architectures in
:data:`REGISTERED_AT_IMPORT`; others are built and registered on first use. This file imports only
torch, transformers and its siblings, so it is also shipped as remote code.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import transformers
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import modeling_auto

from ..attention.feature_maps import FeatureMap
from ..attention.registry import get_attention_kind
from .attention_interface import CONFIG_KEY, LayerAttention, implementation_name, register_with_transformers

__all__ = [
    "AUTO_HEADS",
    "REGISTERED_AT_IMPORT",
    "EfficientClasses",
    "EfficientModelMixin",
    "efficient_classes",
    "efficient_config",
    "register_auto_classes",
]

# Auto class name -> transformers' mapping of model_type -> base class name.
AUTO_HEADS: dict[str, Mapping[str, Any]] = {
    "AutoModel": modeling_auto.MODEL_MAPPING_NAMES,
    "AutoModelForSequenceClassification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForMaskedLM": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    "AutoModelForTokenClassification": modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "AutoModelForImageClassification": modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForQuestionAnswering": modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
}

REGISTERED_AT_IMPORT = ("bert", "roberta", "distilbert", "gpt2", "llama", "qwen2", "vit")

PREFIX = "efficient-"


def _class_name(model_type: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in model_type.replace("_", "-").split("-"))


class EfficientModelMixin:
    """Mixed in front of a transformers model class: applies ``config.hf_efficient`` after the base
    ``__init__`` and writes remote code next to the weights on ``save_pretrained``."""

    hf_efficient_base_class: type

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_efficient_config(self)

    def _init_weights(self, module):
        # Learnable feature maps are not known to the base class: give them their own initial values
        # (from_pretrained allocates missing weights uninitialised).
        if isinstance(module, FeatureMap):
            reset_feature_map(module)
            return
        super()._init_weights(module)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # Every patched layer recurrent (linear kinds): generate() decodes from a constant-size state
        # unless the caller chose a cache or none.
        if (
            model_kwargs.get("cache") is None
            and model_kwargs.get("past_key_values") is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None
        ):
            try:
                from .cache import LinearAttentionCache

                model_kwargs["cache"] = LinearAttentionCache.from_model(self)
                return None
            except ImportError:  # remote code shipped without the cache: the default cache is still exact
                pass
            except ValueError:  # a patched layer without a recurrent form: transformers' default cache
                pass
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        from .export import write_remote_code

        out = super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(self, save_directory)
        return out

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload weights, config, remote code and an hf_efficient model card (see ``export.push_to_hub``)."""
        from .export import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)


class EfficientConfigMixin:
    """Mixed in front of a transformers config class: ``push_to_hub`` writes an hf_efficient model card."""

    def push_to_hub(self, repo_id: str, **kwargs):
        from .export import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)


def reset_feature_map(fmap) -> None:
    """Put a learnable feature map back to its initial values (a fresh map of the same shape)."""
    import torch

    if hasattr(fmap, "reset_parameters"):
        fmap.reset_parameters()
        return
    if all(hasattr(fmap, a) for a in ("num_heads", "head_dim", "half")):  # hedgehog
        fresh = type(fmap)(fmap.num_heads, fmap.head_dim, fmap.half)
        own = dict(fmap.named_parameters())
        with torch.no_grad():
            for name, tensor in fresh.named_parameters():
                own[name].copy_(tensor.to(own[name].device))


@dataclass
class EfficientClasses:
    """The efficient config class and model classes of one base architecture."""

    base_model_type: str
    config_class: type
    models: dict[str, type] = field(default_factory=dict)  # Auto class name -> efficient model class
    _by_base: dict[type, type] = field(default_factory=dict)

    def model_class_for(self, base_class: type) -> type:
        """The efficient subclass of any model class of this architecture (built on demand)."""
        if getattr(base_class, "hf_efficient_base_class", None) is not None:
            return base_class
        if base_class not in self._by_base:
            name = f"Efficient{base_class.__name__}"
            self._by_base[base_class] = type(
                name,
                (EfficientModelMixin, base_class),
                {"config_class": self.config_class, "hf_efficient_base_class": base_class, "__module__": __name__},
            )
        return self._by_base[base_class]


def _config_class_of(model_type: str) -> type:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except KeyError:
        raise ValueError(f"unknown base model_type {model_type!r}: transformers has no config class for it") from None


@functools.cache
def efficient_classes(model_type: str) -> EfficientClasses:
    """Build (once) the efficient config and model classes of a base ``model_type`` such as ``"bert"``."""
    if model_type.startswith(PREFIX):
        model_type = model_type[len(PREFIX) :]
    base_config = _config_class_of(model_type)
    config_class = type(
        f"Efficient{base_config.__name__}",
        (EfficientConfigMixin, base_config),
        {
            "model_type": PREFIX + model_type,
            "base_model_type": model_type,
            "hf_efficient_base_class": base_config,
            "__module__": __name__,
        },
    )
    classes = EfficientClasses(model_type, config_class)
    for auto_name, mapping in AUTO_HEADS.items():
        base_name = mapping.get(model_type)
        if not isinstance(base_name, str):
            continue
        base = getattr(transformers, base_name, None)
        if base is None:
            continue
        classes.models[auto_name] = classes.model_class_for(base)
    return classes


def register_auto_classes(model_type: str) -> EfficientClasses:
    """Register the efficient classes of ``model_type`` with ``AutoConfig`` and every Auto head."""
    classes = efficient_classes(model_type)
    AutoConfig.register(classes.config_class.model_type, classes.config_class, exist_ok=True)
    for auto_name, model_class in classes.models.items():
        getattr(transformers, auto_name).register(classes.config_class, model_class, exist_ok=True)
    return classes


def as_efficient_config(config: PretrainedConfig, config_class: type) -> None:
    """Turn ``config`` into an instance of ``config_class`` (a subclass of its class) in place."""
    config.__class__ = config_class
    # A config read from JSON may carry the base model_type as an instance attribute; the class's wins.
    config.__dict__.pop("model_type", None)


def apply_efficient_config(model) -> None:
    """Patch ``model`` from ``model.config.hf_efficient`` (used by the efficient classes' ``__init__``)."""
    from .patch import apply_layers

    register_with_transformers()
    record = getattr(model.config, CONFIG_KEY, None)
    if not record:
        raise ValueError(
            f"{type(model).__name__} needs a config made by hf_efficient.efficient_config (config.{CONFIG_KEY} is "
            "missing)"
        )
    plan = [LayerAttention.from_dict(layer) for layer in record["layers"]]
    apply_layers(model, plan)
    model.config._attn_implementation = implementation_name(record["kind"])


def efficient_config(
    base_config: PretrainedConfig,
    kind: str = "linear",
    *,
    layers: Iterable[int] | None = None,
    softmax_layers: Iterable[int] | None = None,
    keep_softmax_first: int = 0,
    keep_softmax_last: int = 0,
    layer_params: Mapping[int, Mapping[str, Any]] | None = None,
    **params: Any,
) -> PretrainedConfig:
    """A copy of ``base_config`` as an ``efficient-<model_type>`` config that selects attention ``kind``.

    Arguments as in :func:`hf_efficient.patch_model`. The result loads pretrained weights with
    efficient attention: ``AutoModelForSequenceClassification.from_pretrained(path, config=config)``.
    """
    from .patch import describe_plan, plan_layers

    if not isinstance(base_config, PretrainedConfig):
        raise TypeError(f"efficient_config needs a transformers config, got {type(base_config).__name__}")
    base_type = getattr(base_config, "base_model_type", None) or base_config.model_type
    classes = register_auto_classes(base_type)
    register_with_transformers()
    num_layers = getattr(base_config, "num_hidden_layers", None)
    if not isinstance(num_layers, int):
        raise ValueError(f"cannot tell how many attention layers a {base_type!r} config has (no num_hidden_layers)")
    plan = plan_layers(
        num_layers,
        kind,
        layers=layers,
        softmax_layers=softmax_layers,
        keep_softmax_first=keep_softmax_first,
        keep_softmax_last=keep_softmax_last,
        layer_params=layer_params,
        **params,
    )
    config = copy.deepcopy(base_config)
    base_impl = getattr(base_config, CONFIG_KEY, None) or {}
    as_efficient_config(config, classes.config_class)
    record = describe_plan(get_attention_kind(kind).name, plan, base_impl.get("base_attn_implementation"))
    setattr(config, CONFIG_KEY, record)
    return config
