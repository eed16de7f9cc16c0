"""The maths: one module per attention kind, each with its naive reference beside the fast path.

Importing this package registers every kind in :mod:`hf_efficient.attention.registry`.
"""

from .clustered import (
    ClusteredAttentionParams,
    ImprovedClusteredAttentionParams,
    clustered_attention,
    clustered_attention_reference,
    improved_clustered_attention,
)
from .feature_maps import (
    FEATURE_MAPS,
    EluFeatureMap,
    FavorFeatureMap,
    FeatureMap,
    HedgehogFeatureMap,
    ReluFeatureMap,
    get_feature_map,
)
from .linear import (
    LinearAttentionParams,
    LinearAttentionState,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
)
from .local import LocalAttentionParams, LocalState, local_attention, local_attention_reference
from .registry import AttentionKind, attention_kind_names, get_attention_kind, register_attention_kind
from .window_linear import (
    WindowLinearParams,
    WindowLinearState,
    window_linear_attention,
    window_linear_attention_reference,
    window_linear_weights,
)

__all__ = [
    "FEATURE_MAPS",
    "AttentionKind",
    "ClusteredAttentionParams",
    "ImprovedClusteredAttentionParams",
    "clustered_attention",
    "clustered_attention_reference",
    "improved_clustered_attention",
    "EluFeatureMap",
    "FavorFeatureMap",
    "FeatureMap",
    "HedgehogFeatureMap",
    "LinearAttentionParams",
    "LinearAttentionState",
    "LocalAttentionParams",
    "LocalState",
    "ReluFeatureMap",
    "attention_kind_names",
    "get_attention_kind",
    "get_feature_map",
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_step",
    "local_attention",
    "local_attention_reference",
    "register_attention_kind",
    "WindowLinearParams",
    "WindowLinearState",
    "window_linear_attention",
    "window_linear_attention_reference",
    "window_linear_weights",
]
