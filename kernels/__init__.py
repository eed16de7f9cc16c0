"""Fast paths for hf_efficient: compiled CPU kernels and Triton GPU kernels, never the only path.

Everything here has a PyTorch reference in :mod:`hf_efficient.attention`; :mod:`hf_efficient_kernels.dispatch`
chooses between them (``HF_EFFICIENT_KERNELS=reference`` forces the reference) and
:func:`available` says what this machine can run.
"""

from .dispatch import *  # noqa: F403  (the dispatcher is the public face of the kernels)
from .dispatch import __all__  # noqa: F401
