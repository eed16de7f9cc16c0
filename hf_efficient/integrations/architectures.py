"""The efficient model classes, declared one by one (the third step of patching).

Every architecture ``patch_model`` accepts has a config class ``Efficient<Config>`` (declared in
:mod:`.configurations`, ``model_type = "efficient-<type>"``) and here one model class per Auto head,
each a plain subclass of :class:`~.fused_layers.DecodingModelMixin` (:class:`~.models.EfficientModelMixin`
with the package's decoding fast path) and of the transformers class.
``patch_model`` turns a model into the class of the same name here, so a patched model pickles,
deep-copies and crosses process boundaries like any transformers model, and a reader finds the class
it reports.

Adding an architecture: its self-attention class names in ``surgery.SELF_ATTENTION_CLASSES``, its
config class and the names of its model classes in :mod:`.configurations`, its model classes below,
and a tiny random config in the tests (masks, padding, save/load, remote code). Classes declared in
another module join with :func:`add_architecture`.

Importing this module registers nothing: :func:`register_auto_classes` does (``patch_model`` and
``efficient_config`` call it; :mod:`hf_efficient.registration` registers the same classes by name
as soon as transformers' Auto classes load).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import transformers
from transformers import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLMHeadModel,
    BertModel,
    Cohere2ForCausalLM,
    Cohere2Model,
    DistilBertForMaskedLM,
    DistilBertForMultipleChoice,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
    DistilBertModel,
    ElectraForCausalLM,
    ElectraForMaskedLM,
    ElectraForMultipleChoice,
    ElectraForQuestionAnswering,
    ElectraForSequenceClassification,
    ElectraForTokenClassification,
    ElectraModel,
    Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    Gemma2ForTokenClassification,
    Gemma2Model,
    Gemma3ForCausalLM,
    Gemma3TextForSequenceClassification,
    Gemma3TextModel,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPTNeoXForCausalLM,
    GPTNeoXForQuestionAnswering,
    GPTNeoXForSequenceClassification,
    GPTNeoXForTokenClassification,
    GPTNeoXModel,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    MistralForCausalLM,
    MistralForQuestionAnswering,
    MistralForSequenceClassification,
    MistralForTokenClassification,
    MistralModel,
    ModernBertForMaskedLM,
    ModernBertForMultipleChoice,
    ModernBertForQuestionAnswering,
    ModernBertForSequenceClassification,
    ModernBertForTokenClassification,
    ModernBertModel,
    Phi3ForCausalLM,
    Phi3ForSequenceClassification,
    Phi3ForTokenClassification,
    Phi3Model,
    Qwen2ForCausalLM,
    Qwen2ForQuestionAnswering,
    Qwen2ForSequenceClassification,
    Qwen2ForTokenClassification,
    Qwen2Model,
    Qwen3ForCausalLM,
    Qwen3ForQuestionAnswering,
    Qwen3ForSequenceClassification,
    Qwen3ForTokenClassification,
    Qwen3Model,
    RobertaForCausalLM,
    RobertaForMaskedLM,
    RobertaForMultipleChoice,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
    ViTForImageClassification,
    ViTModel,
)

from .attention_interface import register_with_transformers
from .configurations import (
    CONFIG_CLASSES,
    MODEL_CLASS_NAMES,
    EfficientBertConfig,
    EfficientCohere2Config,
    EfficientConfigMixin,
    EfficientDistilBertConfig,
    EfficientElectraConfig,
    EfficientGemma2Config,
    EfficientGemma3TextConfig,
    EfficientGPT2Config,
    EfficientGPTNeoXConfig,
    EfficientLlamaConfig,
    EfficientMistralConfig,
    EfficientModernBertConfig,
    EfficientPhi3Config,
    EfficientQwen2Config,
    EfficientQwen3Config,
    EfficientRobertaConfig,
    EfficientViTConfig,
)
from .export import auto_class_name
from .fused_layers import DecodingModelMixin, FusedCausalLMMixin, FusedModelMixin
from .models import EfficientModelMixin
from .surgery import SELF_ATTENTION_CLASSES

__all__ = ["ARCHITECTURES", "add_architecture", "efficient_class", "register_auto_classes", "supported_model_classes"]


# -------------------- BERT (and sentence encoders such as all-MiniLM-L6-v2)
class EfficientBertModel(DecodingModelMixin, BertModel):
    config_class = EfficientBertConfig


class EfficientBertForSequenceClassification(DecodingModelMixin, BertForSequenceClassification):
    config_class = EfficientBertConfig


class EfficientBertForMaskedLM(DecodingModelMixin, BertForMaskedLM):
    config_class = EfficientBertConfig


class EfficientBertForTokenClassification(DecodingModelMixin, BertForTokenClassification):
    config_class = EfficientBertConfig


class EfficientBertLMHeadModel(DecodingModelMixin, BertLMHeadModel):
    config_class = EfficientBertConfig


class EfficientBertForQuestionAnswering(DecodingModelMixin, BertForQuestionAnswering):
    config_class = EfficientBertConfig


class EfficientBertForMultipleChoice(DecodingModelMixin, BertForMultipleChoice):
    config_class = EfficientBertConfig


# -------------------- RoBERTa
class EfficientRobertaModel(DecodingModelMixin, RobertaModel):
    config_class = EfficientRobertaConfig


class EfficientRobertaForSequenceClassification(DecodingModelMixin, RobertaForSequenceClassification):
    config_class = EfficientRobertaConfig


class EfficientRobertaForMaskedLM(DecodingModelMixin, RobertaForMaskedLM):
    config_class = EfficientRobertaConfig


class EfficientRobertaForTokenClassification(DecodingModelMixin, RobertaForTokenClassification):
    config_class = EfficientRobertaConfig


class EfficientRobertaForCausalLM(DecodingModelMixin, RobertaForCausalLM):
    config_class = EfficientRobertaConfig


class EfficientRobertaForQuestionAnswering(DecodingModelMixin, RobertaForQuestionAnswering):
    config_class = EfficientRobertaConfig


class EfficientRobertaForMultipleChoice(DecodingModelMixin, RobertaForMultipleChoice):
    config_class = EfficientRobertaConfig


# -------------------- DistilBERT
class EfficientDistilBertModel(DecodingModelMixin, DistilBertModel):
    config_class = EfficientDistilBertConfig


class EfficientDistilBertForSequenceClassification(DecodingModelMixin, DistilBertForSequenceClassification):
    config_class = EfficientDistilBertConfig


class EfficientDistilBertForMaskedLM(DecodingModelMixin, DistilBertForMaskedLM):
    config_class = EfficientDistilBertConfig


class EfficientDistilBertForTokenClassification(DecodingModelMixin, DistilBertForTokenClassification):
    config_class = EfficientDistilBertConfig


class EfficientDistilBertForQuestionAnswering(DecodingModelMixin, DistilBertForQuestionAnswering):
    config_class = EfficientDistilBertConfig


class EfficientDistilBertForMultipleChoice(DecodingModelMixin, DistilBertForMultipleChoice):
    config_class = EfficientDistilBertConfig


# -------------------- ELECTRA
class EfficientElectraModel(DecodingModelMixin, ElectraModel):
    config_class = EfficientElectraConfig


class EfficientElectraForSequenceClassification(DecodingModelMixin, ElectraForSequenceClassification):
    config_class = EfficientElectraConfig


class EfficientElectraForMaskedLM(DecodingModelMixin, ElectraForMaskedLM):
    config_class = EfficientElectraConfig


class EfficientElectraForTokenClassification(DecodingModelMixin, ElectraForTokenClassification):
    config_class = EfficientElectraConfig


class EfficientElectraForCausalLM(DecodingModelMixin, ElectraForCausalLM):
    config_class = EfficientElectraConfig


class EfficientElectraForQuestionAnswering(DecodingModelMixin, ElectraForQuestionAnswering):
    config_class = EfficientElectraConfig


class EfficientElectraForMultipleChoice(DecodingModelMixin, ElectraForMultipleChoice):
    config_class = EfficientElectraConfig


# -------------------- ModernBERT: full and sliding-window layers
class EfficientModernBertModel(DecodingModelMixin, ModernBertModel):
    config_class = EfficientModernBertConfig


class EfficientModernBertForSequenceClassification(DecodingModelMixin, ModernBertForSequenceClassification):
    config_class = EfficientModernBertConfig


class EfficientModernBertForMaskedLM(DecodingModelMixin, ModernBertForMaskedLM):
    config_class = EfficientModernBertConfig


class EfficientModernBertForTokenClassification(DecodingModelMixin, ModernBertForTokenClassification):
    config_class = EfficientModernBertConfig


class EfficientModernBertForQuestionAnswering(DecodingModelMixin, ModernBertForQuestionAnswering):
    config_class = EfficientModernBertConfig


class EfficientModernBertForMultipleChoice(DecodingModelMixin, ModernBertForMultipleChoice):
    config_class = EfficientModernBertConfig


# -------------------- ViT
class EfficientViTModel(DecodingModelMixin, ViTModel):
    config_class = EfficientViTConfig


class EfficientViTForImageClassification(DecodingModelMixin, ViTForImageClassification):
    config_class = EfficientViTConfig


# -------------------- GPT-2
class EfficientGPT2Model(DecodingModelMixin, GPT2Model):
    config_class = EfficientGPT2Config


class EfficientGPT2ForSequenceClassification(DecodingModelMixin, GPT2ForSequenceClassification):
    config_class = EfficientGPT2Config


class EfficientGPT2ForTokenClassification(DecodingModelMixin, GPT2ForTokenClassification):
    config_class = EfficientGPT2Config


class EfficientGPT2LMHeadModel(DecodingModelMixin, GPT2LMHeadModel):
    config_class = EfficientGPT2Config


class EfficientGPT2ForQuestionAnswering(DecodingModelMixin, GPT2ForQuestionAnswering):
    config_class = EfficientGPT2Config


# -------------------- GPT-NeoX / Pythia
class EfficientGPTNeoXModel(DecodingModelMixin, GPTNeoXModel):
    config_class = EfficientGPTNeoXConfig


class EfficientGPTNeoXForSequenceClassification(DecodingModelMixin, GPTNeoXForSequenceClassification):
    config_class = EfficientGPTNeoXConfig


class EfficientGPTNeoXForTokenClassification(DecodingModelMixin, GPTNeoXForTokenClassification):
    config_class = EfficientGPTNeoXConfig


class EfficientGPTNeoXForCausalLM(DecodingModelMixin, GPTNeoXForCausalLM):
    config_class = EfficientGPTNeoXConfig


class EfficientGPTNeoXForQuestionAnswering(DecodingModelMixin, GPTNeoXForQuestionAnswering):
    config_class = EfficientGPTNeoXConfig


# -------------------- Llama (and SmolLM2)
class EfficientLlamaModel(DecodingModelMixin, FusedModelMixin, LlamaModel):
    config_class = EfficientLlamaConfig


class EfficientLlamaForSequenceClassification(DecodingModelMixin, LlamaForSequenceClassification):
    config_class = EfficientLlamaConfig


class EfficientLlamaForTokenClassification(DecodingModelMixin, LlamaForTokenClassification):
    config_class = EfficientLlamaConfig


class EfficientLlamaForCausalLM(DecodingModelMixin, FusedCausalLMMixin, LlamaForCausalLM):
    config_class = EfficientLlamaConfig


class EfficientLlamaForQuestionAnswering(DecodingModelMixin, LlamaForQuestionAnswering):
    config_class = EfficientLlamaConfig


# -------------------- Mistral: sliding-window layers
class EfficientMistralModel(DecodingModelMixin, FusedModelMixin, MistralModel):
    config_class = EfficientMistralConfig


class EfficientMistralForSequenceClassification(DecodingModelMixin, MistralForSequenceClassification):
    config_class = EfficientMistralConfig


class EfficientMistralForTokenClassification(DecodingModelMixin, MistralForTokenClassification):
    config_class = EfficientMistralConfig


class EfficientMistralForCausalLM(DecodingModelMixin, FusedCausalLMMixin, MistralForCausalLM):
    config_class = EfficientMistralConfig


class EfficientMistralForQuestionAnswering(DecodingModelMixin, MistralForQuestionAnswering):
    config_class = EfficientMistralConfig


# -------------------- Qwen2
class EfficientQwen2Model(DecodingModelMixin, FusedModelMixin, Qwen2Model):
    config_class = EfficientQwen2Config


class EfficientQwen2ForSequenceClassification(DecodingModelMixin, Qwen2ForSequenceClassification):
    config_class = EfficientQwen2Config


class EfficientQwen2ForTokenClassification(DecodingModelMixin, Qwen2ForTokenClassification):
    config_class = EfficientQwen2Config


class EfficientQwen2ForCausalLM(DecodingModelMixin, FusedCausalLMMixin, Qwen2ForCausalLM):
    config_class = EfficientQwen2Config


class EfficientQwen2ForQuestionAnswering(DecodingModelMixin, Qwen2ForQuestionAnswering):
    config_class = EfficientQwen2Config


# -------------------- Qwen3
class EfficientQwen3Model(DecodingModelMixin, Qwen3Model):
    config_class = EfficientQwen3Config


class EfficientQwen3ForSequenceClassification(DecodingModelMixin, Qwen3ForSequenceClassification):
    config_class = EfficientQwen3Config


class EfficientQwen3ForTokenClassification(DecodingModelMixin, Qwen3ForTokenClassification):
    config_class = EfficientQwen3Config


class EfficientQwen3ForCausalLM(DecodingModelMixin, Qwen3ForCausalLM):
    config_class = EfficientQwen3Config


class EfficientQwen3ForQuestionAnswering(DecodingModelMixin, Qwen3ForQuestionAnswering):
    config_class = EfficientQwen3Config


# -------------------- Phi-3
class EfficientPhi3Model(DecodingModelMixin, Phi3Model):
    config_class = EfficientPhi3Config


class EfficientPhi3ForSequenceClassification(DecodingModelMixin, Phi3ForSequenceClassification):
    config_class = EfficientPhi3Config


class EfficientPhi3ForTokenClassification(DecodingModelMixin, Phi3ForTokenClassification):
    config_class = EfficientPhi3Config


class EfficientPhi3ForCausalLM(DecodingModelMixin, Phi3ForCausalLM):
    config_class = EfficientPhi3Config


# -------------------- Gemma 2: sliding and full layers, soft-capped logits
class EfficientGemma2Model(DecodingModelMixin, Gemma2Model):
    config_class = EfficientGemma2Config


class EfficientGemma2ForSequenceClassification(DecodingModelMixin, Gemma2ForSequenceClassification):
    config_class = EfficientGemma2Config


class EfficientGemma2ForTokenClassification(DecodingModelMixin, Gemma2ForTokenClassification):
    config_class = EfficientGemma2Config


class EfficientGemma2ForCausalLM(DecodingModelMixin, Gemma2ForCausalLM):
    config_class = EfficientGemma2Config


# -------------------- Gemma 3 (text): 5 sliding : 1 full
class EfficientGemma3TextModel(DecodingModelMixin, Gemma3TextModel):
    config_class = EfficientGemma3TextConfig


class EfficientGemma3TextForSequenceClassification(DecodingModelMixin, Gemma3TextForSequenceClassification):
    config_class = EfficientGemma3TextConfig


class EfficientGemma3ForCausalLM(DecodingModelMixin, Gemma3ForCausalLM):
    config_class = EfficientGemma3TextConfig


# -------------------- Cohere2: sliding and full layers
class EfficientCohere2Model(DecodingModelMixin, Cohere2Model):
    config_class = EfficientCohere2Config


class EfficientCohere2ForCausalLM(DecodingModelMixin, Cohere2ForCausalLM):
    config_class = EfficientCohere2Config


# model_type -> (config class, model classes): what register_auto_classes registers.
ARCHITECTURES: dict[str, tuple[type, tuple[type, ...]]] = {
    model_type: (CONFIG_CLASSES[model_type], tuple(globals()[name] for name in names))
    for model_type, names in MODEL_CLASS_NAMES.items()
}


def _by_base_class() -> dict[type, type]:
    out = {}
    for config_class, model_classes in ARCHITECTURES.values():
        for cls in (config_class, *model_classes):
            out[cls.hf_efficient_base_class] = cls
    return out


def efficient_class(base_class: type) -> type | None:
    """The efficient class of a transformers config or model class (itself if already efficient),
    or None when there is none."""
    if isinstance(getattr(base_class, "__dict__", {}).get("hf_efficient_base_class"), type):
        return base_class
    return _by_base_class().get(base_class)


def supported_model_classes(model_type: str) -> list[str]:
    """Names of the transformers model classes that have an efficient class, for error messages."""
    entry = ARCHITECTURES.get(model_type)
    return [cls.hf_efficient_base_class.__name__ for cls in entry[1]] if entry else []


def add_architecture(config_class: type, *model_classes: type, attention_classes: Sequence[str]) -> None:
    """Make another architecture patchable: static classes declared outside this module (subclasses
    of the mixins, like the ones above) and the names of its self-attention classes, whose forward
    must call transformers' attention interface. Registers them with the Auto classes.

    Example::

        class EfficientOlmoConfig(EfficientConfigMixin, OlmoConfig):
            model_type = "efficient-olmo"

        class EfficientOlmoForCausalLM(EfficientModelMixin, OlmoForCausalLM):
            config_class = EfficientOlmoConfig

        add_architecture(EfficientOlmoConfig, EfficientOlmoForCausalLM, attention_classes=["OlmoAttention"])
    """
    if not (isinstance(config_class, type) and issubclass(config_class, EfficientConfigMixin)):
        raise TypeError(f"add_architecture needs an EfficientConfigMixin subclass, got {config_class!r}")
    for cls in model_classes:
        if not (isinstance(cls, type) and issubclass(cls, EfficientModelMixin)) or cls.config_class is not config_class:
            raise TypeError(f"{cls!r} must subclass EfficientModelMixin with config_class = {config_class.__name__}")
    if isinstance(attention_classes, str) or not attention_classes:
        raise TypeError(f"attention_classes must be a list of class names, got {attention_classes!r}")
    model_type = config_class.base_model_type
    if config_class.model_type != f"efficient-{model_type}":
        raise ValueError(f"{config_class.__name__}.model_type must be 'efficient-{model_type}', got "
                         f"{config_class.model_type!r}")
    SELF_ATTENTION_CLASSES[model_type] = tuple(attention_classes)
    ARCHITECTURES[model_type] = (config_class, tuple(model_classes))
    register_auto_classes(model_type)


def register_auto_classes(model_type: str | None = None) -> None:
    """Register the efficient classes of ``model_type`` (default: every architecture) with
    ``AutoConfig`` and the Auto head of each model class. Idempotent."""
    types = list(ARCHITECTURES) if model_type is None else [model_type]
    for name in types:
        if name not in ARCHITECTURES:
            raise ValueError(f"no efficient classes for model_type {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
        config_class, model_classes = ARCHITECTURES[name]
        transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for cls in model_classes:
            auto_name = auto_class_name(cls)
            if auto_name is not None:
                getattr(transformers, auto_name).register(config_class, cls, exist_ok=True)


def register() -> None:
    """Register every attention kind with transformers' attention and mask interfaces and every
    efficient class with the Auto classes, now. Idempotent; call it again after registering a new kind."""
    register_with_transformers()
    register_auto_classes()


def register_all() -> None:
    """Deprecated name of :func:`register`."""
    warnings.warn("hf_efficient.integrations.register_all is deprecated; use register()", DeprecationWarning,
                  stacklevel=2)
    register()
