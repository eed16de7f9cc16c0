"""C++ (OpenMP) kernels, compiled on first use; see :mod:`kernels.cpu.loader`."""

from .loader import build_error, load_extension

__all__ = ["build_error", "load_extension"]
