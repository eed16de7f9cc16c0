"""C++ (OpenMP) kernels, compiled on first use; see :mod:`hf_efficient_kernels.cpu.loader`."""

from .loader import (
    build_error,
    clustered_build_error,
    decode_build_error,
    decode_calls,
    load_clustered_extension,
    load_decode_extension,
    load_extension,
)

__all__ = ["build_error", "clustered_build_error", "decode_build_error", "decode_calls", "load_clustered_extension",
           "load_decode_extension", "load_extension"]
