"""The one place that decides which implementation of a kernel op runs.

Order of precedence: the per-call ``implementation=`` argument, then the ``HF_EFFICIENT_KERNELS``
environment variable, then automatic choice. Accepted values for both:

* ``"auto"`` (default): the compiled kernel when it exists for the tensors' device and dtype and can
  be built/imported here, otherwise the PyTorch reference;
* ``"reference"``: always the PyTorch reference (``causal_linear_chunked``);
* ``"kernel"``: the compiled kernel, raising a ``RuntimeError`` that says why if it is unavailable.

:func:`available` reports what this machine can run, and why not.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = [
    "ENV_VAR",
    "IMPLEMENTATIONS",
    "available",
    "causal_linear",
    "causal_linear_normalized",
    "select_implementation",
]

ENV_VAR = "HF_EFFICIENT_KERNELS"
IMPLEMENTATIONS = ("auto", "reference", "kernel")
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _requested(implementation: str | None) -> str:
    if implementation is None:
        value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"{ENV_VAR}={value!r} is not understood; accepted: {', '.join(IMPLEMENTATIONS)}")
        return value
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not understood; accepted: {', '.join(IMPLEMENTATIONS)}")
    return implementation


def _cpu_kernel() -> tuple[bool, str | None]:
    from .cpu import build_error, load_extension

    return load_extension() is not None, build_error()


def _triton_kernel() -> tuple[bool, str | None]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    return True, None


def available(build: bool = True) -> dict:
    """What can run here.

    Args:
        build: build (or load from cache) the CPU kernel to answer; with False, report only whether it
            was already loaded in this process.

    Returns:
        ``{"cpu": bool, "cpu_error": str | None, "cuda": bool, "cuda_error": str | None,
        "forced": str}`` where ``forced`` is the value of ``HF_EFFICIENT_KERNELS`` (``"auto"`` if unset).
    """
    if build:
        cpu, cpu_error = _cpu_kernel()
    else:
        from .cpu import loader

        cpu = loader._module is not None
        cpu_error = loader.build_error() or (None if loader._tried else "not built yet")
    cuda, cuda_error = _triton_kernel()
    return {"cpu": cpu, "cpu_error": cpu_error, "cuda": cuda, "cuda_error": cuda_error, "forced": _requested(None)}


def select_implementation(phi_q: torch.Tensor, implementation: str | None = None) -> str:
    """``"kernel"`` or ``"reference"``: what :func:`causal_linear` would run for this input."""
    wanted = _requested(implementation)
    if wanted == "reference":
        return "reference"
    reason = None
    if phi_q.dtype not in _KERNEL_DTYPES:
        reason = f"dtype {phi_q.dtype} has no kernel (accepted: float32, float64, bfloat16, float16)"
    elif phi_q.device.type == "cpu":
        ok, err = _cpu_kernel()
        reason = None if ok else f"the CPU kernel could not be built: {err}"
    elif phi_q.device.type == "cuda":
        ok, err = _triton_kernel()
        reason = None if ok else err
    else:
        reason = f"no kernel for device {phi_q.device.type}"
    if reason is None:
        return "kernel"
    if wanted == "kernel":
        raise RuntimeError(f"causal_linear: implementation='kernel' was requested but {reason}")
    return "reference"


def causal_linear(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int = 64,
    initial: torch.Tensor | None = None,
    *,
    implementation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention on features, through the fastest available implementation.

    Same contract as ``hf_efficient.attention.linear.causal_linear_chunked``: ``y_i = sum_{j <= i}
    (phi_q_i . phi_k_j) v_j`` (plus ``phi_q_i^T initial``).

    Args:
        phi_q, phi_k: ``(batch, heads, n, m)`` features.
        v: ``(batch, heads, n, e)``.
        chunk_size: chunk length (the reference's block size; the kernel picks its own blocking).
        initial: optional ``(batch, heads, m, e)`` state of earlier tokens.
        implementation: ``"auto"``, ``"reference"`` or ``"kernel"``; None reads ``HF_EFFICIENT_KERNELS``.

    Returns:
        y ``(batch, heads, n, e)`` and the final state ``(batch, heads, m, e)``.
    """
    _check(phi_q, phi_k, v, initial, extra_cols=0)
    if select_implementation(phi_q, implementation) == "kernel":
        from .ops import causal_linear_op

        if initial is not None:
            initial = initial.to(phi_q.dtype)
        return causal_linear_op(phi_q, phi_k, v, initial)
    from hf_efficient.attention.linear import causal_linear_chunked

    return causal_linear_chunked(phi_q, phi_k, v, chunk_size, initial)


def causal_linear_normalized(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    eps: float = 1e-6,
    initial: torch.Tensor | None = None,
    chunk_size: int = 64,
    *,
    implementation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention with its normaliser: ``out_i = num_i / (den_i + eps)``.

    ``num_i = sum_{j <= i} (phi_q_i . phi_k_j) v_j``, ``den_i = sum_{j <= i} phi_q_i . phi_k_j``. The kernel
    fuses the normaliser (no ``(batch, heads, n, d_v + 1)`` tensor, no separate division pass); the
    reference appends a column of ones to v and divides afterwards.

    Args:
        phi_q, phi_k: ``(batch, heads, n, m)`` features.
        v: ``(batch, heads, n, d_v)``.
        eps: added to the denominator.
        initial: optional packed ``(batch, heads, m, d_v + 1)`` state (k_sum as the last column).
        chunk_size, implementation: as in :func:`causal_linear`.

    Returns:
        out ``(batch, heads, n, d_v)`` in v's dtype and the final packed state ``(batch, heads, m, d_v + 1)``.
    """
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"causal_linear_normalized: eps must be a positive number, got {eps!r}")
    _check(phi_q, phi_k, v, initial, extra_cols=1, name="causal_linear_normalized")
    if select_implementation(phi_q, implementation) == "kernel":
        from .ops import causal_linear_normalized_op

        if initial is not None:
            initial = initial.to(phi_q.dtype)
        out, state, _ = causal_linear_normalized_op(phi_q, phi_k, v, initial, float(eps))
        return out, state
    from hf_efficient.attention.linear import causal_linear_normalized_reference

    return causal_linear_normalized_reference(phi_q, phi_k, v, eps, initial, chunk_size)


def _check(phi_q, phi_k, v, initial, extra_cols: int, name: str = "causal_linear") -> None:
    """Shapes, dtypes and types; the state has v's columns plus ``extra_cols`` (the fused normaliser)."""
    for label, t in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: {label} must be (batch, heads, n, dim), got shape {tuple(t.shape)}")
    if phi_q.shape != phi_k.shape or phi_q.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"{name}: expected phi_q, phi_k (batch, heads, n, m) and v (batch, heads, n, e), got "
            f"{tuple(phi_q.shape)}, {tuple(phi_k.shape)}, {tuple(v.shape)}"
        )
    if not (phi_q.dtype == phi_k.dtype == v.dtype):
        raise ValueError(
            f"{name}: phi_q, phi_k, v must share a dtype, got {phi_q.dtype}, {phi_k.dtype}, {v.dtype}"
        )
    b, h, _, m = phi_q.shape
    state_cols = v.shape[-1] + extra_cols
    if initial is not None and tuple(initial.shape) != (b, h, m, state_cols):
        raise ValueError(
            f"{name}: initial must be (batch, heads, m, {state_cols}) = {(b, h, m, state_cols)}, "
            f"got {tuple(initial.shape)}"
        )
