"""Attention sampling (Katharopoulos & Fleuret, ICML 2019): config, image processor and classifier.

Importing this package registers them with ``AutoConfig``, ``AutoImageProcessor`` and
``AutoModelForImageClassification`` under the model type ``"attention_sampling"``, and marks them for
remote code: ``save_pretrained`` copies their (self-contained) source files next to the weights and
writes an ``auto_map``, so a process without hf_efficient loads the folder with
``trust_remote_code=True``.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from .configuration_attention_sampling import AttentionSamplingConfig
from .modeling_attention_sampling import (
    AttentionSamplingForImageClassification,
    AttentionSamplingOutput,
    AttentionSamplingPreTrainedModel,
    build_attention_cnn,
    build_feature_cnn,
)
from .processing_attention_sampling import AttentionSamplingImageProcessor
from .sampling import (
    attention_distribution,
    expectation,
    expectation_weights,
    extract_patches,
    negative_entropy,
    nested_expectation_weights,
    patch_top_left,
    sample_with_replacement,
    sample_without_replacement,
)

AutoConfig.register(AttentionSamplingConfig.model_type, AttentionSamplingConfig, exist_ok=True)
AutoModelForImageClassification.register(
    AttentionSamplingConfig, AttentionSamplingForImageClassification, exist_ok=True
)
AutoImageProcessor.register(
    AttentionSamplingConfig,
    image_processor_classes={"pil": AttentionSamplingImageProcessor, "torchvision": AttentionSamplingImageProcessor},
    exist_ok=True,
)
AttentionSamplingConfig.register_for_auto_class("AutoConfig")
AttentionSamplingForImageClassification.register_for_auto_class("AutoModelForImageClassification")
AttentionSamplingImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "AttentionSamplingConfig",
    "AttentionSamplingForImageClassification",
    "AttentionSamplingImageProcessor",
    "AttentionSamplingOutput",
    "AttentionSamplingPreTrainedModel",
    "attention_distribution",
    "build_attention_cnn",
    "build_feature_cnn",
    "expectation",
    "expectation_weights",
    "extract_patches",
    "negative_entropy",
    "nested_expectation_weights",
    "patch_top_left",
    "sample_with_replacement",
    "sample_without_replacement",
]
