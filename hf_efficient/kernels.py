"""The optional compiled kernels, seen from the package: ``hf_efficient.kernels.available()``.

The kernels live in the ``kernels/`` folder of the project, installed as ``hf_efficient_kernels``,
whose dispatcher only decides whether a kernel runs (``*_kernel`` functions return it or None). This
module adds the operations themselves, compiled kernel where one runs, else the PyTorch path of
:mod:`hf_efficient.attention`; ``implementation=`` (``"auto"``, ``"reference"``, ``"kernel"``) or the
``HF_EFFICIENT_KERNELS`` environment variable chooses.
"""

from hf_efficient_kernels.dispatch import *  # noqa: F403
from hf_efficient_kernels.dispatch import __all__ as _dispatch_all

from .attention.clustered import centroid_topk, cluster_broadcast, cluster_mean, clustered_topk
from .attention.clustered import kmeans as hamming_kmeans
from .attention.linear import causal_linear, causal_linear_feature_map, causal_linear_normalized

__all__ = [*_dispatch_all, "causal_linear", "causal_linear_feature_map", "causal_linear_normalized", "centroid_topk",
           "cluster_broadcast", "cluster_mean", "clustered_topk", "hamming_kmeans"]
