"""Triton kernels for causal linear attention on CUDA tensors (forward and backward).

Same contract as ``hf_efficient_kernels.ops.causal_linear_op``: features ``phi_q, phi_k`` ``(batch, heads, n, m)``,
values ``v`` ``(batch, heads, n, e)``, optional initial state ``(batch, heads, m, e)``; returns
``y (batch, heads, n, e)`` and the final state ``(batch, heads, m, e)``.

One program per (batch, head) walks the sequence in chunks of ``BLOCK_C`` tokens and keeps the m x e
state in registers, in float32 whatever the input dtype (inputs are upcast before every ``tl.dot``,
which also keeps the Triton CPU interpreter right: its 16-bit ``tl.dot`` is not). Feature and value
sizes are padded to powers of two (at least 16, the smallest ``tl.dot``) with masked loads, so the
odd ``e = d_v + 1`` costs lanes but no special case.

These run only where ``triton`` is installed: on a CUDA GPU, or on the CPU with ``TRITON_INTERPRET=1``
(slow; for tests on tiny shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_causal_linear_backward", "triton_causal_linear_forward"]


@triton.jit
def _forward_kernel(Q, K, V, INIT, Y, STATE, n, m, e,
                    HAS_INIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_E: tl.constexpr):
    bh = tl.program_id(0)
    q_base = Q + bh * n * m
    k_base = K + bh * n * m
    v_base = V + bh * n * e
    y_base = Y + bh * n * e
    rc = tl.arange(0, BLOCK_C)
    rm = tl.arange(0, BLOCK_M)
    re = tl.arange(0, BLOCK_E)
    state_mask = (rm[:, None] < m) & (re[None, :] < e)
    if HAS_INIT:
        state = tl.load(INIT + bh * m * e + rm[:, None] * e + re[None, :], mask=state_mask, other=0.0)
        state = state.to(tl.float32)
    else:
        state = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    causal = rc[:, None] >= rc[None, :]
    for t0 in range(0, n, BLOCK_C):
        rows = t0 + rc
        qk_mask = (rows[:, None] < n) & (rm[None, :] < m)
        v_mask = (rows[:, None] < n) & (re[None, :] < e)
        q = tl.load(q_base + rows[:, None] * m + rm[None, :], mask=qk_mask, other=0.0).to(tl.float32)
        k = tl.load(k_base + rows[:, None] * m + rm[None, :], mask=qk_mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + rows[:, None] * e + re[None, :], mask=v_mask, other=0.0).to(tl.float32)
        scores = tl.where(causal, tl.dot(q, tl.trans(k)), 0.0)
        y = tl.dot(q, state) + tl.dot(scores, v)
        state += tl.dot(tl.trans(k), v)
        tl.store(y_base + rows[:, None] * e + re[None, :], y.to(Y.dtype.element_ty), mask=v_mask)
    tl.store(STATE + bh * m * e + rm[:, None] * e + re[None, :], state.to(STATE.dtype.element_ty),
             mask=state_mask)


@triton.jit
def _backward_dq_kernel(K, V, INIT, GY, DQ, n, m, e,
                        HAS_INIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_E: tl.constexpr):
    # dq_i = S_i g_i, S_i the state after token i: a forward walk.
    bh = tl.program_id(0)
    rc = tl.arange(0, BLOCK_C)
    rm = tl.arange(0, BLOCK_M)
    re = tl.arange(0, BLOCK_E)
    state_mask = (rm[:, None] < m) & (re[None, :] < e)
    if HAS_INIT:
        state = tl.load(INIT + bh * m * e + rm[:, None] * e + re[None, :], mask=state_mask, other=0.0)
        state = state.to(tl.float32)
    else:
        state = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    causal = rc[:, None] >= rc[None, :]
    for t0 in range(0, n, BLOCK_C):
        rows = t0 + rc
        k_mask = (rows[:, None] < n) & (rm[None, :] < m)
        v_mask = (rows[:, None] < n) & (re[None, :] < e)
        k = tl.load(K + bh * n * m + rows[:, None] * m + rm[None, :], mask=k_mask, other=0.0).to(tl.float32)
        v = tl.load(V + bh * n * e + rows[:, None] * e + re[None, :], mask=v_mask, other=0.0).to(tl.float32)
        g = tl.load(GY + bh * n * e + rows[:, None] * e + re[None, :], mask=v_mask, other=0.0).to(tl.float32)
        gv = tl.where(causal, tl.dot(g, tl.trans(v)), 0.0)  # (i, j) = g_i . v_j for j <= i
        dq = tl.dot(g, tl.trans(state)) + tl.dot(gv, k)
        state += tl.dot(tl.trans(k), v)
        tl.store(DQ + bh * n * m + rows[:, None] * m + rm[None, :], dq.to(DQ.dtype.element_ty), mask=k_mask)


@triton.jit
def _backward_dkv_kernel(Q, K, V, GY, GS, DK, DV, DINIT, n, m, e,
                         HAS_GS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_E: tl.constexpr):
    # R = dS_final + sum_{i >= j} q_i g_i^T; dk_j = R v_j (+ in-chunk terms), dv_j = R^T k_j (+ ...).
    bh = tl.program_id(0)
    rc = tl.arange(0, BLOCK_C)
    rm = tl.arange(0, BLOCK_M)
    re = tl.arange(0, BLOCK_E)
    state_mask = (rm[:, None] < m) & (re[None, :] < e)
    if HAS_GS:
        r = tl.load(GS + bh * m * e + rm[:, None] * e + re[None, :], mask=state_mask, other=0.0).to(tl.float32)
    else:
        r = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    later = rc[:, None] <= rc[None, :]  # (j, i): i >= j
    n_chunks = tl.cdiv(n, BLOCK_C)
    for c in range(0, n_chunks):
        t0 = (n_chunks - 1 - c) * BLOCK_C
        rows = t0 + rc
        qk_mask = (rows[:, None] < n) & (rm[None, :] < m)
        v_mask = (rows[:, None] < n) & (re[None, :] < e)
        q = tl.load(Q + bh * n * m + rows[:, None] * m + rm[None, :], mask=qk_mask, other=0.0).to(tl.float32)
        k = tl.load(K + bh * n * m + rows[:, None] * m + rm[None, :], mask=qk_mask, other=0.0).to(tl.float32)
        v = tl.load(V + bh * n * e + rows[:, None] * e + re[None, :], mask=v_mask, other=0.0).to(tl.float32)
        g = tl.load(GY + bh * n * e + rows[:, None] * e + re[None, :], mask=v_mask, other=0.0).to(tl.float32)
        vg = tl.where(later, tl.dot(v, tl.trans(g)), 0.0)  # (j, i) = v_j . g_i for i >= j
        kq = tl.where(later, tl.dot(k, tl.trans(q)), 0.0)  # (j, i) = k_j . q_i for i >= j
        dk = tl.dot(v, tl.trans(r)) + tl.dot(vg, q)
        dv = tl.dot(k, r) + tl.dot(kq, g)
        r += tl.dot(tl.trans(q), g)
        tl.store(DK + bh * n * m + rows[:, None] * m + rm[None, :], dk.to(DK.dtype.element_ty), mask=qk_mask)
        tl.store(DV + bh * n * e + rows[:, None] * e + re[None, :], dv.to(DV.dtype.element_ty), mask=v_mask)
    tl.store(DINIT + bh * m * e + rm[:, None] * e + re[None, :], r.to(DINIT.dtype.element_ty), mask=state_mask)


def _blocks(m: int, e: int) -> tuple[int, int, int]:
    block_m = max(16, triton.next_power_of_2(m))
    block_e = max(16, triton.next_power_of_2(e))
    # Smaller chunks when the state is large, to stay within registers.
    block_c = 64 if block_m * block_e <= 64 * 128 else 32
    return block_c, block_m, block_e


def triton_causal_linear_forward(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, initial: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention forward; shapes as in the module docstring."""
    phi_q, phi_k, v = phi_q.contiguous(), phi_k.contiguous(), v.contiguous()
    b, h, n, m = phi_q.shape
    e = v.shape[-1]
    y = torch.empty_like(v)
    state = v.new_empty(b, h, m, e)
    init = initial.to(v.dtype).contiguous() if initial is not None else state  # dummy pointer when absent
    block_c, block_m, block_e = _blocks(m, e)
    _forward_kernel[(b * h,)](phi_q, phi_k, v, init, y, state, n, m, e, HAS_INIT=initial is not None,
                              BLOCK_C=block_c, BLOCK_M=block_m, BLOCK_E=block_e)
    return y, state


def triton_causal_linear_backward(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    initial: torch.Tensor | None,
    grad_y: torch.Tensor,
    grad_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. phi_q, phi_k, v and the initial state (always returned)."""
    phi_q, phi_k, v = phi_q.contiguous(), phi_k.contiguous(), v.contiguous()
    grad_y = grad_y.to(v.dtype).contiguous()
    b, h, n, m = phi_q.shape
    e = v.shape[-1]
    dq, dk, dv = torch.empty_like(phi_q), torch.empty_like(phi_k), torch.empty_like(v)
    dinit = v.new_empty(b, h, m, e)
    init = initial.to(v.dtype).contiguous() if initial is not None else dinit
    gs = grad_state.to(v.dtype).contiguous() if grad_state is not None else dinit
    block_c, block_m, block_e = _blocks(m, e)
    _backward_dq_kernel[(b * h,)](phi_k, v, init, grad_y, dq, n, m, e, HAS_INIT=initial is not None,
                                  BLOCK_C=block_c, BLOCK_M=block_m, BLOCK_E=block_e)
    _backward_dkv_kernel[(b * h,)](phi_q, phi_k, v, grad_y, gs, dk, dv, dinit, n, m, e,
                                   HAS_GS=grad_state is not None, BLOCK_C=block_c, BLOCK_M=block_m,
                                   BLOCK_E=block_e)
    return dq, dk, dv, dinit
