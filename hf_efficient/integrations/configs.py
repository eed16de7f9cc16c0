"""``efficient_config``: choose the attention in a config, then load pretrained weights through the Auto classes.

``AutoModelForSequenceClassification.from_pretrained(path, config=efficient_config(config, "linear"))``
builds the static efficient class of the architecture (see :mod:`.architectures`), which applies
the plan at the end of ``__init__``, so the pretrained weights load into patched layers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from transformers import PretrainedConfig

from .architectures import ARCHITECTURES, efficient_class, register_auto_classes
from .attention_interface import implementation_name, register_with_transformers
from .export import auto_class_name
from .patch import as_efficient_config
from .plan import CONFIG_KEY, describe_plan, plan_layers
from .surgery import REFUSED_ARCHITECTURES, SELF_ATTENTION_CLASSES, base_model_type

__all__ = ["EfficientClasses", "efficient_classes", "efficient_config"]


def efficient_config(
    base_config: PretrainedConfig,
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
) -> PretrainedConfig:
    """A copy of ``base_config`` as an ``efficient-<model_type>`` config that selects attention ``kind``.

    Arguments as in :func:`hf_efficient.patch_model`. The result loads pretrained weights with
    efficient attention: ``AutoModelForSequenceClassification.from_pretrained(path, config=config)``.
    """
    if not isinstance(base_config, PretrainedConfig):
        raise TypeError(f"efficient_config needs a transformers config, got {type(base_config).__name__}")
    base_type = base_model_type(base_config)
    if base_type in REFUSED_ARCHITECTURES or base_type not in SELF_ATTENTION_CLASSES:
        reason = REFUSED_ARCHITECTURES.get(base_type, "hf_efficient does not support it")
        raise ValueError(f"cannot make an efficient {base_type!r} config: {reason}. Supported: "
                         f"{', '.join(sorted(SELF_ATTENTION_CLASSES))}")
    config_class = efficient_class(type(base_config))  # itself for an efficient config
    if config_class is None:
        raise ValueError(f"no efficient config class for {type(base_config).__name__}")
    plan = plan_layers(base_config, kind, layers=layers, softmax_layers=softmax_layers,
                       keep_softmax_first=keep_softmax_first, keep_softmax_last=keep_softmax_last,
                       layer_params=layer_params, sliding=sliding, sliding_params=sliding_params, **params)
    register_with_transformers()
    register_auto_classes(base_type)
    previous = getattr(base_config, CONFIG_KEY, None) or {}
    base_implementation = previous.get("base_attn_implementation")
    if base_implementation is None and not str(base_config._attn_implementation or "").startswith("hf_efficient_"):
        base_implementation = base_config._attn_implementation  # None: the model's default, decided at init
    config = copy.deepcopy(base_config)
    as_efficient_config(config, config_class)
    record = describe_plan(kind, plan, base_implementation, sliding=sliding,
                           ignore_logit_softcap=ignore_logit_softcap)
    setattr(config, CONFIG_KEY, record)
    config._attn_implementation = implementation_name(record["kind"])
    return config


@dataclass
class EfficientClasses:
    """The efficient config class and model classes of one base architecture (Auto class name -> class)."""

    base_model_type: str
    config_class: type
    models: dict[str, type] = field(default_factory=dict)

    def model_class_for(self, base_class: type) -> type | None:
        """The efficient class of a transformers model class of this architecture, or None."""
        return efficient_class(base_class)


def efficient_classes(model_type: str) -> EfficientClasses:
    """The static efficient classes of a base ``model_type`` such as ``"bert"``."""
    model_type = model_type.removeprefix("efficient-")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"no efficient classes for model_type {model_type!r}; known: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    config_class, model_classes = ARCHITECTURES[model_type]
    models = {}
    for cls in model_classes:
        auto_name = auto_class_name(cls)
        if auto_name is not None:
            models.setdefault(auto_name, cls)
    return EfficientClasses(model_type, config_class, models)
