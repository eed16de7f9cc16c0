"""``torch.library`` custom ops over the compiled kernels.

``hf_efficient::causal_linear(phi_q, phi_k, v, initial, chunk) -> (y, state)``,
``hf_efficient::causal_linear_normalized(phi_q, phi_k, v, initial, eps, chunk) -> (out, state, den)`` and
their backwards are registered with fake (meta) implementations and autograd, so they trace under ``torch.compile`` and
pass ``torch.library.opcheck``. The CPU implementation is the C++ kernel of :mod:`kernels.cpu`; CUDA
tensors go to the Triton kernel of :mod:`kernels.triton`. Callers normally go through
:func:`kernels.dispatch.causal_linear`, which checks availability first and falls back to PyTorch.
"""

from __future__ import annotations

import torch

from .cpu import build_error, load_extension

__all__ = [
    "causal_linear_backward_op",
    "causal_linear_normalized_backward_op",
    "causal_linear_normalized_op",
    "causal_linear_op",
]

DEFAULT_CHUNK = 64


def _cpu_module():
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"hf_efficient::causal_linear: the CPU kernel could not be built: {build_error()}")
    return ext


@torch.library.custom_op("hf_efficient::causal_linear", mutates_args=())
def causal_linear_op(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    initial: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal sum ``y_i = sum_{j <= i} (phi_q_i . phi_k_j) v_j + phi_q_i^T initial``.

    Args:
        phi_q, phi_k: ``(batch, heads, n, m)`` features.
        v: ``(batch, heads, n, e)``.
        initial: optional ``(batch, heads, m, e)`` state of earlier tokens.
        chunk: tokens per block inside the kernel (a speed knob; the result does not depend on it).

    Returns:
        y ``(batch, heads, n, e)`` and the final state ``(batch, heads, m, e)``, in the input dtype,
        accumulated in float32 (float64 for float64 inputs).
    """
    if phi_q.device.type == "cuda":
        from .triton.causal_linear import triton_causal_linear_forward

        return triton_causal_linear_forward(phi_q, phi_k, v, initial)
    y, state = _cpu_module().causal_linear_forward(phi_q, phi_k, v, initial, chunk)
    return y, state


@causal_linear_op.register_fake
def _(phi_q, phi_k, v, initial=None, chunk=DEFAULT_CHUNK):
    b, h, n, m = phi_q.shape
    e = v.shape[-1]
    return v.new_empty(b, h, n, e), v.new_empty(b, h, m, e)


@torch.library.custom_op("hf_efficient::causal_linear_backward", mutates_args=())
def causal_linear_backward_op(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    initial: torch.Tensor | None,
    grad_y: torch.Tensor,
    grad_state: torch.Tensor | None,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`causal_linear_op` w.r.t. phi_q, phi_k, v and initial.

    ``grad_state`` may be None (the final state was not used). The initial-state gradient is all
    zeros, shape ``(batch, heads, m, e)``, when ``initial`` is None (custom ops cannot return None).
    """
    if phi_q.device.type == "cuda":
        from .triton.causal_linear import triton_causal_linear_backward

        return triton_causal_linear_backward(phi_q, phi_k, v, initial, grad_y, grad_state)
    dq, dk, dv, dinit = _cpu_module().causal_linear_backward(phi_q, phi_k, v, initial, grad_y, grad_state, chunk)
    return dq, dk, dv, dinit


@causal_linear_backward_op.register_fake
def _(phi_q, phi_k, v, initial, grad_y, grad_state, chunk=DEFAULT_CHUNK):
    b, h, _, m = phi_q.shape
    return (torch.empty_like(phi_q), torch.empty_like(phi_k), torch.empty_like(v),
            v.new_empty(b, h, m, v.shape[-1]))


def _setup_context(ctx, inputs, output):
    phi_q, phi_k, v, initial, chunk = inputs
    ctx.save_for_backward(phi_q, phi_k, v, initial)
    ctx.chunk = chunk
    ctx.has_initial = initial is not None


def _backward(ctx, grad_y, grad_state):
    phi_q, phi_k, v, initial = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(v)
    dq, dk, dv, dinit = causal_linear_backward_op(phi_q, phi_k, v, initial, grad_y, grad_state, ctx.chunk)
    return dq, dk, dv, (dinit if ctx.has_initial else None), None


causal_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- normalised variant
def _with_ones(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


@torch.library.custom_op("hf_efficient::causal_linear_normalized", mutates_args=())
def causal_linear_normalized_op(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    initial: torch.Tensor | None = None,
    eps: float = 1e-6,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal linear attention with the normaliser fused in: ``out_i = num_i / (den_i + eps)``.

    ``num_i = sum_{j <= i} (phi_q_i . phi_k_j) v_j`` and ``den_i = sum_{j <= i} phi_q_i . phi_k_j`` (plus
    the initial state's share). The column of ones that carries the normaliser is added while the
    kernel loads v, so no ``(batch, heads, n, d_v + 1)`` tensor is built.

    Args:
        phi_q, phi_k: ``(batch, heads, n, m)`` features.
        v: ``(batch, heads, n, d_v)`` values.
        initial: optional ``(batch, heads, m, d_v + 1)`` packed state (k_sum as the last column).

    Returns:
        out ``(batch, heads, n, d_v)``, the final packed state ``(batch, heads, m, d_v + 1)`` and the
        denominators ``(batch, heads, n)`` in the accumulation dtype (float64 for float64 inputs, else
        float32), returned for the backward; they carry no gradient.
    """
    if phi_q.device.type == "cuda":
        from .triton.causal_linear import triton_causal_linear_forward

        y, state = triton_causal_linear_forward(phi_q, phi_k, _with_ones(v), initial)
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        den = y[..., -1].to(acc)
        return (y[..., :-1].to(acc) / (den[..., None] + eps)).to(v.dtype), state, den
    out, state, den = _cpu_module().causal_linear_normalized_forward(phi_q, phi_k, v, initial, eps, chunk)
    return out, state, den


@causal_linear_normalized_op.register_fake
def _(phi_q, phi_k, v, initial=None, eps=1e-6, chunk=DEFAULT_CHUNK):
    b, h, n, m = phi_q.shape
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    return torch.empty_like(v), v.new_empty(b, h, m, v.shape[-1] + 1), v.new_empty(b, h, n, dtype=acc)


@torch.library.custom_op("hf_efficient::causal_linear_normalized_backward", mutates_args=())
def causal_linear_normalized_backward_op(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    initial: torch.Tensor | None,
    out: torch.Tensor,
    den: torch.Tensor,
    grad_out: torch.Tensor,
    grad_state: torch.Tensor | None,
    eps: float = 1e-6,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`causal_linear_normalized_op` w.r.t. phi_q, phi_k, v and initial (always returned)."""
    if phi_q.device.type == "cuda":
        from .triton.causal_linear import triton_causal_linear_backward

        inv = 1.0 / (den[..., None] + eps)
        g = grad_out.to(den.dtype) * inv
        grad_y = torch.cat([g, -(g * out.to(den.dtype)).sum(-1, keepdim=True)], dim=-1).to(v.dtype)
        dq, dk, dv, dinit = triton_causal_linear_backward(phi_q, phi_k, _with_ones(v), initial, grad_y, grad_state)
        return dq, dk, dv[..., :-1].contiguous(), dinit
    dq, dk, dv, dinit = _cpu_module().causal_linear_normalized_backward(
        phi_q, phi_k, v, initial, out, den, grad_out, grad_state, eps, chunk
    )
    return dq, dk, dv, dinit


@causal_linear_normalized_backward_op.register_fake
def _(phi_q, phi_k, v, initial, out, den, grad_out, grad_state, eps=1e-6, chunk=DEFAULT_CHUNK):
    b, h, _, m = phi_q.shape
    return (torch.empty_like(phi_q), torch.empty_like(phi_k), torch.empty_like(v),
            v.new_empty(b, h, m, v.shape[-1] + 1))


def _setup_normalized(ctx, inputs, output):
    phi_q, phi_k, v, initial, eps, chunk = inputs
    out, _, den = output
    ctx.save_for_backward(phi_q, phi_k, v, initial, out, den)
    ctx.eps, ctx.chunk, ctx.has_initial = eps, chunk, initial is not None
    ctx.mark_non_differentiable(den)


def _backward_normalized(ctx, grad_out, grad_state, _grad_den):
    phi_q, phi_k, v, initial, out, den = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dinit = causal_linear_normalized_backward_op(
        phi_q, phi_k, v, initial, out, den, grad_out, grad_state, ctx.eps, ctx.chunk
    )
    return dq, dk, dv, (dinit if ctx.has_initial else None), None, None


causal_linear_normalized_op.register_autograd(_backward_normalized, setup_context=_setup_normalized)
