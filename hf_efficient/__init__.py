"""hf_efficient: linear, clustered and sampled attention plus importance-sampled training for the
Hugging Face ecosystem.

Importing the package registers every attention kind with the registry, then, in one explicit
call (:func:`hf_efficient.integrations.register`), with transformers' attention and mask
interfaces and the efficient model classes with the Auto classes.
"""

from .assets import AssetMissingError
from .attention import (
    FEATURE_MAPS,
    AttentionKind,
    ClusteredAttentionParams,
    EluFeatureMap,
    FavorFeatureMap,
    FeatureMap,
    HedgehogFeatureMap,
    ImprovedClusteredAttentionParams,
    LinearAttentionParams,
    LinearAttentionState,
    ReluFeatureMap,
    WindowLinearParams,
    WindowLinearState,
    attention_kind_names,
    clustered_attention,
    get_attention_kind,
    get_feature_map,
    improved_clustered_attention,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
    register_attention_kind,
    window_linear_attention,
)
from .integrations import LinearAttentionCache, efficient_config, patch_model, push_to_hub, register, unpatch_model
from .models.linear_lm import LinearLMConfig, LinearLMForCausalLM, LinearLMModel
from .training import (
    ImportanceSamplingCallback,
    ImportanceSamplingConfig,
    ImportanceSamplingTrainer,
)
from .training.linearize import LinearizeConfig, linearize
from .vision import (
    AttentionSamplingConfig,
    AttentionSamplingForImageClassification,
    AttentionSamplingImageProcessor,
    make_megamnist,
)

__version__ = "0.1.0"

register()  # the one registration with transformers (idempotent)

__all__ = [
    "AttentionSamplingConfig",
    "AttentionSamplingForImageClassification",
    "AttentionSamplingImageProcessor",
    "make_megamnist",
    "improved_clustered_attention",
    "clustered_attention",
    "ImprovedClusteredAttentionParams",
    "ClusteredAttentionParams",
    "FEATURE_MAPS",
    "AssetMissingError",
    "AttentionKind",
    "EluFeatureMap",
    "FavorFeatureMap",
    "FeatureMap",
    "HedgehogFeatureMap",
    "ImportanceSamplingCallback",
    "ImportanceSamplingConfig",
    "ImportanceSamplingTrainer",
    "LinearAttentionCache",
    "LinearAttentionParams",
    "LinearAttentionState",
    "LinearLMConfig",
    "LinearLMForCausalLM",
    "LinearLMModel",
    "LinearizeConfig",
    "ReluFeatureMap",
    "__version__",
    "attention_kind_names",
    "efficient_config",
    "get_attention_kind",
    "get_feature_map",
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_step",
    "linearize",
    "window_linear_attention",
    "WindowLinearParams",
    "WindowLinearState",
    "patch_model",
    "push_to_hub",
    "register_attention_kind",
    "unpatch_model",
]
