"""Triton kernels (CUDA; or the CPU with ``TRITON_INTERPRET=1``). Importing this package does not import
triton; :mod:`hf_efficient_kernels.triton.causal_linear` does."""
