"""Fast paths for hf_efficient: compiled CPU kernels and Triton GPU kernels, never the only path.

Everything here has a PyTorch reference in :mod:`hf_efficient.attention`; :mod:`hf_efficient_kernels.dispatch`
chooses between them (``HF_EFFICIENT_KERNELS=reference`` forces the reference) and
:func:`available` says what this machine can run.
"""

from .dispatch import (
    CLUSTERED_OPS,
    ENV_VAR,
    available,
    causal_linear,
    causal_linear_normalized,
    centroid_topk,
    cluster_broadcast,
    cluster_mean,
    clustered_topk,
    hamming_kmeans,
    select_clustered_implementation,
    select_implementation,
)

__all__ = [
    "CLUSTERED_OPS",
    "ENV_VAR",
    "available",
    "causal_linear",
    "causal_linear_normalized",
    "centroid_topk",
    "cluster_broadcast",
    "cluster_mean",
    "clustered_topk",
    "hamming_kmeans",
    "select_clustered_implementation",
    "select_implementation",
]
