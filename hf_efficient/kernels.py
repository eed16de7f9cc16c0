"""The optional compiled kernels, seen from the package: ``hf_efficient.kernels.available()``.

The kernels live in the ``kernels/`` folder of the project, installed as ``hf_efficient_kernels``;
this module re-exports its dispatcher (which decides, per call, between a compiled kernel and the
PyTorch reference; see ``hf_efficient_kernels.dispatch``).
"""

from hf_efficient_kernels.dispatch import *  # noqa: F403
from hf_efficient_kernels.dispatch import __all__  # noqa: F401
