"""The efficient config classes, and the names of the model classes of each architecture.

Every architecture ``patch_model`` accepts has a config class ``Efficient<Config>`` here, with
``model_type = "efficient-<type>"``; its model classes are declared in :mod:`.architectures`.
This module imports only transformers' configuration classes (no model code), so the Auto
registration of :mod:`hf_efficient.registration` can load it while transformers is still importing
(once the base config modules it names in ``BASE_CONFIG_MODULES`` have finished).
"""

from __future__ import annotations

import importlib

from transformers import (
    BertConfig,
    Cohere2Config,
    DistilBertConfig,
    ElectraConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    ModernBertConfig,
    Phi3Config,
    PretrainedConfig,  # noqa: E402  (kept apart: the base of every config)
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
    ViTConfig,
)

__all__ = ["CONFIG_CLASSES", "MODEL_CLASS_NAMES", "EfficientConfigMixin"]


class EfficientConfigMixin:
    """Mixed in front of a transformers config class. The subclass sets ``model_type``."""

    hf_efficient_base_class: type
    base_model_type: str

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        base = next(b for b in cls.__mro__[1:]
                    if issubclass(b, PretrainedConfig) and not issubclass(b, EfficientConfigMixin))
        cls.hf_efficient_base_class = base
        cls.base_model_type = base.model_type

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload this config with an hf_efficient model card (see ``export.push_to_hub``)."""
        # Imported here, not above: this module must stay loadable while transformers is still
        # importing its model stack (see the module docstring), and export needs that stack.
        export = importlib.import_module(f"{__package__}.export")
        return export.push_to_hub(self, repo_id, **kwargs)


class EfficientBertConfig(EfficientConfigMixin, BertConfig):
    model_type = "efficient-bert"


class EfficientRobertaConfig(EfficientConfigMixin, RobertaConfig):
    model_type = "efficient-roberta"


class EfficientDistilBertConfig(EfficientConfigMixin, DistilBertConfig):
    model_type = "efficient-distilbert"


class EfficientElectraConfig(EfficientConfigMixin, ElectraConfig):
    model_type = "efficient-electra"


class EfficientModernBertConfig(EfficientConfigMixin, ModernBertConfig):
    model_type = "efficient-modernbert"


class EfficientViTConfig(EfficientConfigMixin, ViTConfig):
    model_type = "efficient-vit"


class EfficientGPT2Config(EfficientConfigMixin, GPT2Config):
    model_type = "efficient-gpt2"


class EfficientGPTNeoXConfig(EfficientConfigMixin, GPTNeoXConfig):
    model_type = "efficient-gpt_neox"


class EfficientLlamaConfig(EfficientConfigMixin, LlamaConfig):
    model_type = "efficient-llama"


class EfficientMistralConfig(EfficientConfigMixin, MistralConfig):
    model_type = "efficient-mistral"


class EfficientQwen2Config(EfficientConfigMixin, Qwen2Config):
    model_type = "efficient-qwen2"


class EfficientQwen3Config(EfficientConfigMixin, Qwen3Config):
    model_type = "efficient-qwen3"


class EfficientPhi3Config(EfficientConfigMixin, Phi3Config):
    model_type = "efficient-phi3"


class EfficientGemma2Config(EfficientConfigMixin, Gemma2Config):
    model_type = "efficient-gemma2"


class EfficientGemma3TextConfig(EfficientConfigMixin, Gemma3TextConfig):
    model_type = "efficient-gemma3_text"


class EfficientCohere2Config(EfficientConfigMixin, Cohere2Config):
    model_type = "efficient-cohere2"


# model_type -> its efficient config class
CONFIG_CLASSES: dict[str, type] = {
    "bert": EfficientBertConfig,
    "roberta": EfficientRobertaConfig,
    "distilbert": EfficientDistilBertConfig,
    "electra": EfficientElectraConfig,
    "modernbert": EfficientModernBertConfig,
    "vit": EfficientViTConfig,
    "gpt2": EfficientGPT2Config,
    "gpt_neox": EfficientGPTNeoXConfig,
    "llama": EfficientLlamaConfig,
    "mistral": EfficientMistralConfig,
    "qwen2": EfficientQwen2Config,
    "qwen3": EfficientQwen3Config,
    "phi3": EfficientPhi3Config,
    "gemma2": EfficientGemma2Config,
    "gemma3_text": EfficientGemma3TextConfig,
    "cohere2": EfficientCohere2Config,
}

# model_type -> the efficient model classes declared in .architectures, one per Auto head
MODEL_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "bert": (
        "EfficientBertModel",
        "EfficientBertForSequenceClassification",
        "EfficientBertForMaskedLM",
        "EfficientBertForTokenClassification",
        "EfficientBertLMHeadModel",
        "EfficientBertForQuestionAnswering",
        "EfficientBertForMultipleChoice",
    ),
    "roberta": (
        "EfficientRobertaModel",
        "EfficientRobertaForSequenceClassification",
        "EfficientRobertaForMaskedLM",
        "EfficientRobertaForTokenClassification",
        "EfficientRobertaForCausalLM",
        "EfficientRobertaForQuestionAnswering",
        "EfficientRobertaForMultipleChoice",
    ),
    "distilbert": (
        "EfficientDistilBertModel",
        "EfficientDistilBertForSequenceClassification",
        "EfficientDistilBertForMaskedLM",
        "EfficientDistilBertForTokenClassification",
        "EfficientDistilBertForQuestionAnswering",
        "EfficientDistilBertForMultipleChoice",
    ),
    "electra": (
        "EfficientElectraModel",
        "EfficientElectraForSequenceClassification",
        "EfficientElectraForMaskedLM",
        "EfficientElectraForTokenClassification",
        "EfficientElectraForCausalLM",
        "EfficientElectraForQuestionAnswering",
        "EfficientElectraForMultipleChoice",
    ),
    "modernbert": (
        "EfficientModernBertModel",
        "EfficientModernBertForSequenceClassification",
        "EfficientModernBertForMaskedLM",
        "EfficientModernBertForTokenClassification",
        "EfficientModernBertForQuestionAnswering",
        "EfficientModernBertForMultipleChoice",
    ),
    "vit": (
        "EfficientViTModel",
        "EfficientViTForImageClassification",
    ),
    "gpt2": (
        "EfficientGPT2Model",
        "EfficientGPT2ForSequenceClassification",
        "EfficientGPT2ForTokenClassification",
        "EfficientGPT2LMHeadModel",
        "EfficientGPT2ForQuestionAnswering",
    ),
    "gpt_neox": (
        "EfficientGPTNeoXModel",
        "EfficientGPTNeoXForSequenceClassification",
        "EfficientGPTNeoXForTokenClassification",
        "EfficientGPTNeoXForCausalLM",
        "EfficientGPTNeoXForQuestionAnswering",
    ),
    "llama": (
        "EfficientLlamaModel",
        "EfficientLlamaForSequenceClassification",
        "EfficientLlamaForTokenClassification",
        "EfficientLlamaForCausalLM",
        "EfficientLlamaForQuestionAnswering",
    ),
    "mistral": (
        "EfficientMistralModel",
        "EfficientMistralForSequenceClassification",
        "EfficientMistralForTokenClassification",
        "EfficientMistralForCausalLM",
        "EfficientMistralForQuestionAnswering",
    ),
    "qwen2": (
        "EfficientQwen2Model",
        "EfficientQwen2ForSequenceClassification",
        "EfficientQwen2ForTokenClassification",
        "EfficientQwen2ForCausalLM",
        "EfficientQwen2ForQuestionAnswering",
    ),
    "qwen3": (
        "EfficientQwen3Model",
        "EfficientQwen3ForSequenceClassification",
        "EfficientQwen3ForTokenClassification",
        "EfficientQwen3ForCausalLM",
        "EfficientQwen3ForQuestionAnswering",
    ),
    "phi3": (
        "EfficientPhi3Model",
        "EfficientPhi3ForSequenceClassification",
        "EfficientPhi3ForTokenClassification",
        "EfficientPhi3ForCausalLM",
    ),
    "gemma2": (
        "EfficientGemma2Model",
        "EfficientGemma2ForSequenceClassification",
        "EfficientGemma2ForTokenClassification",
        "EfficientGemma2ForCausalLM",
    ),
    "gemma3_text": (
        "EfficientGemma3TextModel",
        "EfficientGemma3TextForSequenceClassification",
        "EfficientGemma3ForCausalLM",
    ),
    "cohere2": (
        "EfficientCohere2Model",
        "EfficientCohere2ForCausalLM",
    ),
}
