"""``torch.library`` custom ops over the compiled kernels.

``hf_efficient::causal_linear(phi_q, phi_k, v, initial, chunk) -> (y, state)`` and its backward are
registered with fake (meta) implementations and autograd, so they trace under ``torch.compile`` and
pass ``torch.library.opcheck``. The CPU implementation is the C++ kernel of :mod:`kernels.cpu`; CUDA
tensors go to the Triton kernel of :mod:`kernels.triton`. Callers normally go through
:func:`kernels.dispatch.causal_linear`, which checks availability first and falls back to PyTorch.
"""

from __future__ import annotations

import torch

from .cpu import build_error, load_extension

__all__ = ["causal_linear_backward_op", "causal_linear_op"]

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
