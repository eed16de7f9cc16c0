"""The one registration with transformers: cheap, deferred and idempotent.

:func:`register` (called by ``import hf_efficient``) imports neither torch nor transformers. It asks,
through ``wrapt`` post-import hooks, to be called when transformers' Auto modules load, and then

* registers the package's configs with ``AutoConfig`` (the ``efficient-<type>`` configs of
  :mod:`hf_efficient.integrations.configurations`, ``linear-lm`` and ``attention_sampling``);
* registers the model classes with their Auto heads *by name* (:class:`DeferredClass`): the
  modules that define them (which need transformers' whole model stack) load the first time an Auto
  class picks one, e.g. ``AutoModel.from_pretrained`` of a saved efficient checkpoint;
* registers the attention-sampling image processor with ``AutoImageProcessor``.

So ``AutoModel.from_pretrained(folder)`` works after a bare ``import hf_efficient`` whatever the
order of imports, while importing the package costs almost nothing. A hook may run while
transformers is still importing other modules, which is why it only imports configuration modules
and never a modeling module. The attention functions (``attn_implementation="hf_efficient_<kind>"``)
are registered by the code that builds efficient models: ``patch_model``, ``efficient_config`` and the
efficient classes' ``__init__``.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

import wrapt

__all__ = ["AUTO_HEAD_MAPPINGS", "BASE_CONFIG_MODULES", "DeferredClass", "register"]

# Auto class name -> name of transformers' mapping (in modeling_auto) of model_type -> class name.
AUTO_HEAD_MAPPINGS: dict[str, str] = {
    "AutoModel": "MODEL_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForImageClassification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForQuestionAnswering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "AutoModelForMultipleChoice": "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
}

_LINEAR_LM = "hf_efficient.models.linear_lm"
_VISION = "hf_efficient.vision.attention_sampling"
_registered = False


class DeferredClass:
    """A model class named in an Auto mapping before its module is imported.

    An Auto class calls ``from_pretrained`` / ``_from_config`` on what its mapping holds; every
    attribute read here imports ``module`` and forwards to the real class, so the model built is an
    instance of the real class. ``config_class`` and ``__name__`` answer without importing.
    """

    def __init__(self, module: str, name: str, config_class: type) -> None:
        self.__module_name = module
        self.__name__ = self.__qualname__ = name
        self.config_class = config_class

    def load(self) -> type:
        """The real class (imports its module)."""
        return getattr(importlib.import_module(self.__module_name), self.__name__)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_DeferredClass__"):  # unset private state: never forwarded
            raise AttributeError(attr)
        return getattr(self.load(), attr)

    def __call__(self, *args, **kwargs):
        return self.load()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<deferred class {self.__module_name}.{self.__name__}>"


def _config_classes() -> list[type]:
    from .integrations.configurations import CONFIG_CLASSES
    from .models.linear_lm.configuration_linear_lm import LinearLMConfig
    from .vision.attention_sampling.configuration_attention_sampling import AttentionSamplingConfig

    return [*CONFIG_CLASSES.values(), LinearLMConfig, AttentionSamplingConfig]


def _deferred_models(auto_module) -> list[tuple[str, type, DeferredClass]]:
    """``(auto class name, config class, deferred model class)`` for every model class of the package."""
    from .integrations.configurations import CONFIG_CLASSES, MODEL_CLASS_NAMES
    from .models.linear_lm.configuration_linear_lm import LinearLMConfig
    from .vision.attention_sampling.configuration_attention_sampling import AttentionSamplingConfig

    out = []
    heads = {auto: getattr(auto_module, mapping) for auto, mapping in AUTO_HEAD_MAPPINGS.items()}
    for model_type, names in MODEL_CLASS_NAMES.items():
        config_class = CONFIG_CLASSES[model_type]
        for name in names:
            base = name.removeprefix("Efficient")
            for auto, mapping in heads.items():
                if mapping.get(model_type) == base:
                    out.append((auto, config_class, DeferredClass("hf_efficient.integrations.architectures", name,
                                                                  config_class)))
                    break
    modeling_lm = f"{_LINEAR_LM}.modeling_linear_lm"
    out.append(("AutoModel", LinearLMConfig, DeferredClass(modeling_lm, "LinearLMModel", LinearLMConfig)))
    out.append(("AutoModelForCausalLM", LinearLMConfig,
                DeferredClass(modeling_lm, "LinearLMForCausalLM", LinearLMConfig)))
    out.append(("AutoModelForImageClassification", AttentionSamplingConfig,
                DeferredClass(f"{_VISION}.modeling_attention_sampling", "AttentionSamplingForImageClassification",
                              AttentionSamplingConfig)))
    return out


def _register_configs(configuration_auto) -> None:
    for config_class in _config_classes():
        configuration_auto.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)


def _register_models(modeling_auto) -> None:
    # patch_model and efficient_config register the real classes later (architectures.register_auto_classes)
    for auto, config_class, deferred in _deferred_models(modeling_auto):
        getattr(modeling_auto, auto).register(config_class, deferred, exist_ok=True)


def _register_processors(image_processing_auto) -> None:
    from .vision.attention_sampling.configuration_attention_sampling import AttentionSamplingConfig
    from .vision.attention_sampling.processing_attention_sampling import AttentionSamplingImageProcessor

    image_processing_auto.AutoImageProcessor.register(
        AttentionSamplingConfig,
        image_processor_classes={"pil": AttentionSamplingImageProcessor,
                                 "torchvision": AttentionSamplingImageProcessor},
        exist_ok=True,
    )


# The transformers modules of the base configs of ``integrations.configurations``. A config class's
# decorator loads the Auto modules *while that class is being defined* (``from transformers import
# LlamaConfig`` first thing), so the configs step fails until that module has finished: its own
# post-import hook then runs the step again.
BASE_CONFIG_MODULES = tuple(
    f"transformers.models.{name}.configuration_{name}"
    for name in ("bert", "roberta", "distilbert", "electra", "modernbert", "vit", "gpt2", "gpt_neox", "llama",
                 "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "cohere2")
)
_CONFIGURATION_AUTO = "transformers.models.auto.configuration_auto"
_MODELING_AUTO = "transformers.models.auto.modeling_auto"
_IMAGE_PROCESSING_AUTO = "transformers.models.auto.image_processing_auto"
_WATCHED = (_CONFIGURATION_AUTO, _MODELING_AUTO, _IMAGE_PROCESSING_AUTO, *BASE_CONFIG_MODULES)
_done: set[str] = set()
_busy = False


def _loaded(name: str, current=None):
    """The module ``name`` if it is imported and has finished executing (or is ``current``, the module
    whose post-import hook is running: its code has run), else None."""
    module = sys.modules.get(name)
    if module is None:
        return None
    if module is not current and getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None
    return module


def _sync(_module=None) -> None:
    """Register whatever the Auto modules loaded so far allow; called by each post-import hook.

    Loading a transformers config class can itself import ``modeling_auto`` (its docstring decorator
    reads the Auto mappings), which fires another hook inside this one: that inner call returns at
    once and this call finishes the job. When a step cannot run yet because transformers is halfway
    through importing an Auto module or a base config module (``from transformers import LlamaConfig``
    loads the Auto modules while ``LlamaConfig`` is being defined), that module's own hook runs it again.
    """
    global _busy
    if _busy:
        return
    _busy = True
    try:
        for step, needs in ((_register_configs, _CONFIGURATION_AUTO), (_register_models, _MODELING_AUTO),
                            (_register_processors, _IMAGE_PROCESSING_AUTO)):
            module = _loaded(needs, _module)
            if step.__name__ in _done or module is None:
                continue
            try:
                step(module)
            except (ImportError, AttributeError) as exc:
                if any(_loaded(name, _module) is None and name in sys.modules for name in _WATCHED):
                    continue  # a watched module is still being imported: its own hook retries
                _warn(step, exc)
            except Exception as exc:  # a hook must never break the user's import of transformers
                _warn(step, exc)
            else:
                _done.add(step.__name__)
    finally:
        _busy = False


def _warn(step, exc: Exception) -> None:
    warnings.warn(f"hf_efficient could not register with transformers ({step.__name__}): {exc!r}; "
                  "hf_efficient.integrations.register() registers everything explicitly", stacklevel=3)


def register() -> None:
    """Register the package with transformers' Auto classes as soon as they load (at once if they
    already have). Idempotent; ``import hf_efficient`` calls it."""
    global _registered
    if _registered:
        return
    _registered = True
    for name in _WATCHED:
        wrapt.register_post_import_hook(_sync, name)
