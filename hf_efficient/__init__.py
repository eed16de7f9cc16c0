"""hf_efficient: linear, clustered and sampled attention plus importance-sampled training for the
Hugging Face ecosystem.

Importing the package is cheap: the public names below load their modules on first use, and the one
registration with transformers (:func:`register`, called here) only asks to be told when
transformers' Auto classes load (see :mod:`hf_efficient.registration`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

from .registration import register

__version__ = "0.1.0"

__getattr__, __dir__, _lazy_all = lazy_loader.attach(
    __name__,
    submodules=["attention", "decoding", "integrations", "kernels", "models", "training", "vision"],
    submod_attrs={
        "assets": ["AssetMissingError"],
        "attention.registry": ["AttentionKind", "attention_kind_names", "get_attention_kind",
                               "register_attention_kind"],
        "attention.feature_maps": ["FEATURE_MAPS", "EluFeatureMap", "FavorFeatureMap", "FeatureMap",
                                   "HedgehogFeatureMap", "ReluFeatureMap", "get_feature_map"],
        "attention.local": ["LocalAttentionParams", "LocalState", "local_attention", "local_attention_reference"],
        "attention.linear": ["LinearAttentionParams", "LinearAttentionState", "linear_attention",
                             "linear_attention_reference", "linear_attention_step"],
        "attention.clustered": ["ClusteredAttentionParams", "ImprovedClusteredAttentionParams",
                                "clustered_attention", "improved_clustered_attention"],
        "attention.window_linear": ["WindowLinearParams", "WindowLinearState", "window_linear_attention"],
        "decoding": ["DecodeLinear", "place_for_decoding"],
        "integrations.patch": ["patch_model", "unpatch_model"],
        "integrations.configs": ["efficient_config"],
        "integrations.export": ["push_to_hub"],
        "integrations.cache": ["LinearAttentionCache"],
        "models.linear_lm": ["LinearLMConfig", "LinearLMForCausalLM", "LinearLMModel"],
        "training.importance_sampling": ["ImportanceSamplingCallback", "ImportanceSamplingConfig",
                                         "ImportanceSamplingTrainer"],
        "training.linearize": ["LinearizeConfig", "linearize"],
        "vision.attention_sampling": ["AttentionSamplingConfig", "AttentionSamplingForImageClassification",
                                      "AttentionSamplingImageProcessor"],
        "vision.megamnist": ["make_megamnist"],
    },
)
__all__ = ["__version__", "register", *_lazy_all]

if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .assets import AssetMissingError  # noqa: F401
    from .attention.clustered import (  # noqa: F401
        ClusteredAttentionParams,
        ImprovedClusteredAttentionParams,
        clustered_attention,
        improved_clustered_attention,
    )
    from .attention.feature_maps import (  # noqa: F401
        FEATURE_MAPS,
        EluFeatureMap,
        FavorFeatureMap,
        FeatureMap,
        HedgehogFeatureMap,
        ReluFeatureMap,
        get_feature_map,
    )
    from .attention.linear import (  # noqa: F401
        LinearAttentionParams,
        LinearAttentionState,
        linear_attention,
        linear_attention_reference,
        linear_attention_step,
    )
    from .attention.local import (  # noqa: F401
        LocalAttentionParams,
        LocalState,
        local_attention,
        local_attention_reference,
    )
    from .attention.registry import (  # noqa: F401
        AttentionKind,
        attention_kind_names,
        get_attention_kind,
        register_attention_kind,
    )
    from .attention.window_linear import WindowLinearParams, WindowLinearState, window_linear_attention  # noqa: F401
    from .decoding import DecodeLinear, place_for_decoding  # noqa: F401
    from .integrations.cache import LinearAttentionCache  # noqa: F401
    from .integrations.configs import efficient_config  # noqa: F401
    from .integrations.export import push_to_hub  # noqa: F401
    from .integrations.patch import patch_model, unpatch_model  # noqa: F401
    from .models.linear_lm import LinearLMConfig, LinearLMForCausalLM, LinearLMModel  # noqa: F401
    from .training.importance_sampling import (  # noqa: F401
        ImportanceSamplingCallback,
        ImportanceSamplingConfig,
        ImportanceSamplingTrainer,
    )
    from .training.linearize import LinearizeConfig, linearize  # noqa: F401
    from .vision.attention_sampling import (  # noqa: F401
        AttentionSamplingConfig,
        AttentionSamplingForImageClassification,
        AttentionSamplingImageProcessor,
    )
    from .vision.megamnist import make_megamnist  # noqa: F401

register()  # the one registration with transformers: cheap, idempotent (see hf_efficient.registration)
