"""Triton kernels for the clustered-attention ops on CUDA tensors.

Same contracts as the functions of :mod:`hf_efficient_kernels.dispatch` (and their PyTorch references in
``hf_efficient.attention.hashing`` / ``hf_efficient.attention.clustered``):

* :func:`triton_hamming_kmeans`: Lloyd's k-means in Hamming space, bool codes ``(s, n, n_bits)`` ->
  int64 ``(s, n)``. The assignment kernel scores a block of queries against a block of centres with one
  ``tl.dot`` of +-1 signs (agreements are small integers, exact in float32 and in tf32), keeps the first
  best centre on ties; the vote kernel adds each member's signs to its cluster with atomics (integer sums,
  so the order of the additions does not matter). Start, tie rules, empty clusters and the early stop
  are those of ``hashing.hamming_kmeans``, so the assignments are identical.
* :func:`triton_cluster_mean` ``(b, h, n, d) -> (b, h, C, d)`` and :func:`triton_cluster_broadcast`
  ``(b, h, C, e) -> (b, h, n, e)``: segment sums by cluster id (float32 atomics) and the gather back;
  each one's backward is the other one.
* :func:`triton_clustered_topk`: each query's softmax over its cluster's top keys, forward and backward
  (one program per query; gradients of k and v are scattered with float32 atomics).

Shapes and dtypes are checked by the dispatcher (:mod:`hf_efficient_kernels.dispatch`); the wrappers here
check that cluster ids lie in ``[-1, C)`` and key indices in ``[0, n_k)`` (a wrong index would make the
kernels write outside their outputs; the check costs one synchronisation). Every kernel accumulates in
float32 whatever the input dtype (float32, bfloat16, float16). They run only where ``triton`` is installed:
on a CUDA GPU, or on the CPU with ``TRITON_INTERPRET=1`` (slow; tests on tiny shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "TRITON_DTYPES",
    "triton_cluster_broadcast",
    "triton_cluster_mean",
    "triton_clustered_topk",
    "triton_hamming_kmeans",
]

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pow2(x: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(int(x)))


def _check_range(index: torch.Tensor, low: int, high: int, name: str, label: str) -> None:
    if index.numel() == 0:
        return
    lo, hi = (int(z) for z in torch.aminmax(index))
    if lo < low or hi >= high:
        raise ValueError(f"{name}: {label} must lie in [{low}, {high}), got values in [{lo}, {hi}]")


# --------------------------------------------------------------------------- Hamming k-means
@triton.jit
def _assign_kernel(BITS, CENT, OUT, BEST, n, n_bits, c,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr):
    # Nearest centre = the one that agrees on most bits: agreement = signs . centre with +-1 entries.
    seq = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = tl.arange(0, BLOCK_C)
    rb = tl.arange(0, BLOCK_B)
    row_ok = rows < n
    best = tl.full((BLOCK_N,), -1.0e9, dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_N,), dtype=tl.int64)
    for c0 in range(0, c, BLOCK_C):
        cols = c0 + rc
        agree = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for b0 in range(0, n_bits, BLOCK_B):
            bcol = b0 + rb
            x_mask = row_ok[:, None] & (bcol[None, :] < n_bits)
            x = tl.load(BITS + (seq * n + rows[:, None]) * n_bits + bcol[None, :], mask=x_mask, other=0)
            sign = tl.where(x_mask, x.to(tl.float32) * 2.0 - 1.0, 0.0)  # padded bits: 0, they add nothing
            c_mask = (cols[:, None] < c) & (bcol[None, :] < n_bits)
            cent = tl.load(CENT + (seq * c + cols[:, None]) * n_bits + bcol[None, :], mask=c_mask, other=0.0)
            agree += tl.dot(sign, tl.trans(cent))
        agree = tl.where(cols[None, :] < c, agree, -1.0e9)
        top = tl.max(agree, axis=1)
        # the first column holding the maximum: the lowest centre index among ties
        first = tl.min(tl.where(agree == top[:, None], cols[None, :], c + BLOCK_C), axis=1)
        better = top > best  # strictly: an equal score in a later block keeps the earlier centre
        best = tl.where(better, top, best)
        best_idx = tl.where(better, first.to(tl.int64), best_idx)
    tl.store(OUT + seq * n + rows, best_idx, mask=row_ok)
    tl.store(BEST + seq * n + rows, best, mask=row_ok)  # agreement with that centre, for re-seeding


@triton.jit
def _vote_kernel(BITS, VALID, ASSIGN, VOTES, COUNT, n, n_bits, c,
                 BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    # votes[seq, cluster, bit] += +-1 of each real member; count[seq, cluster] += 1.
    seq = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, BLOCK_B)
    row_ok = rows < n
    real = tl.load(VALID + seq * n + rows, mask=row_ok, other=0) != 0
    member = row_ok & real
    a = tl.load(ASSIGN + seq * n + rows, mask=member, other=0)
    member = member & (a >= 0) & (a < c)  # never address outside the vote table, whatever ASSIGN holds
    a = tl.where(member, a, 0)
    tl.atomic_add(COUNT + seq * c + a, tl.full((BLOCK_N,), 1.0, dtype=tl.float32), mask=member)
    for b0 in range(0, n_bits, BLOCK_B):
        bcol = b0 + rb
        m = member[:, None] & (bcol[None, :] < n_bits)
        x = tl.load(BITS + (seq * n + rows[:, None]) * n_bits + bcol[None, :], mask=m, other=0)
        tl.atomic_add(VOTES + (seq * c + a[:, None]) * n_bits + bcol[None, :], x.to(tl.float32) * 2.0 - 1.0, mask=m)


def _nearest(bits_u8: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre ``(s, n)`` int64 and the agreement with it ``(s, n)`` float32."""
    s, n, n_bits = bits_u8.shape
    c = centres.shape[1]
    out = torch.empty(s, n, dtype=torch.long, device=bits_u8.device)
    best = torch.empty(s, n, dtype=torch.float32, device=bits_u8.device)
    block_n, block_c, block_b = 32, 16, min(64, _pow2(n_bits))
    if out.numel() == 0:
        return out, best
    _assign_kernel[(s, triton.cdiv(n, block_n))](bits_u8, centres, out, best, n, n_bits, c,
                                                 BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_B=block_b)
    return out, best


def _lloyd(bits: torch.Tensor, valid: torch.Tensor, n_real: torch.Tensor, clusters: int, iterations: int):
    from hf_efficient.attention.hashing import farthest_first_centres, reseed_empty_centres

    s, n, n_bits = bits.shape
    bits_u8 = bits.contiguous().view(torch.uint8)
    valid_u8 = valid.contiguous().view(torch.uint8)
    # the same start and re-seeding as the reference (shared PyTorch code on +-1 signs)
    signs = bits.float() * 2 - 1  # (s, n, n_bits)
    centres = farthest_first_centres(signs, valid, clusters).contiguous()  # (s, C, n_bits), +-1
    assign, agree = _nearest(bits_u8, centres)
    block_n, block_b = 32, min(64, _pow2(n_bits))
    for _ in range(iterations):
        votes = torch.zeros(s, clusters, n_bits, dtype=torch.float32, device=bits.device)
        count = torch.zeros(s, clusters, dtype=torch.float32, device=bits.device)
        _vote_kernel[(s, triton.cdiv(n, block_n))](bits_u8, valid_u8, assign, votes, count, n, n_bits, clusters,
                                                   BLOCK_N=block_n, BLOCK_B=block_b)
        # majority bit (a tie gives 0, i.e. -1); an empty cluster is re-seeded
        majority = torch.where(votes > 0, 1.0, -1.0)
        centres = torch.where(count[..., None] > 0, majority, centres)
        centres = reseed_empty_centres(signs, valid, agree, count == 0, centres, n_bits).contiguous()
        new, agree = _nearest(bits_u8, centres)
        if torch.equal(new[valid], assign[valid]):
            break
        assign = new
    return assign


@torch.no_grad()
def triton_hamming_kmeans(bits: torch.Tensor, valid: torch.Tensor, clusters: int, iterations: int) -> torch.Tensor:
    """Hamming k-means, identical to ``hf_efficient.attention.hashing.hamming_kmeans``.

    Args:
        bits: bool ``(s, n, n_bits)`` codes (s = batch x heads sequences); valid: bool ``(s, n)``.
        clusters: C >= 1; iterations: Lloyd rounds after the first assignment (early stop at a fixed point).

    Returns:
        int64 ``(s, n)`` in ``[0, C)``, -1 for padded queries.
    """
    n_real = valid.sum(dim=1)
    assign = valid.long().cumsum(dim=1) - 1  # at most C real queries: each its own cluster, in rank order
    todo = (n_real > clusters).nonzero().flatten()
    if todo.numel():
        assign[todo] = _lloyd(bits[todo], valid[todo], n_real[todo], clusters, iterations)
    return assign.masked_fill(~valid, -1)


# --------------------------------------------------------------------------- cluster sum / broadcast
@triton.jit
def _cluster_sum_kernel(X, ASSIGN, SUMS, COUNT, n, d, c,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    row_ok = rows < n
    a = tl.load(ASSIGN + bh * n + rows, mask=row_ok, other=-1)
    # the host checks the range; out-of-range rows are still never addressed here
    member = row_ok & (a >= 0) & (a < c)
    a = tl.where(member, a, 0)
    tl.atomic_add(COUNT + bh * c + a, tl.full((BLOCK_N,), 1.0, dtype=tl.float32), mask=member)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + rd
        m = member[:, None] & (cols[None, :] < d)
        x = tl.load(X + (bh * n + rows[:, None]) * d + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tl.atomic_add(SUMS + (bh * c + a[:, None]) * d + cols[None, :], x, mask=m)


@triton.jit
def _cluster_gather_kernel(Y, ASSIGN, COUNT, OUT, n, e, c,
                           DIVIDE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    re = tl.arange(0, BLOCK_E)
    row_ok = rows < n
    a = tl.load(ASSIGN + bh * n + rows, mask=row_ok, other=-1)
    # the host checks the range; out-of-range rows are still never addressed here
    member = row_ok & (a >= 0) & (a < c)
    a = tl.where(member, a, 0)
    if DIVIDE:
        size = tl.load(COUNT + bh * c + a, mask=member, other=1.0)
        size = tl.maximum(size, 1.0)
    for e0 in range(0, e, BLOCK_E):
        cols = e0 + re
        m = member[:, None] & (cols[None, :] < e)
        y = tl.load(Y + (bh * c + a[:, None]) * e + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if DIVIDE:
            y = y / size[:, None]
        tl.store(OUT + (bh * n + rows[:, None]) * e + cols[None, :], y.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & (cols[None, :] < e))


def _cluster_sums(x: torch.Tensor, assign: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 sums ``(b, h, C, d)`` and member counts ``(b, h, C)``."""
    x, assign = x.contiguous(), assign.contiguous()
    b, h, n, d = x.shape
    sums = torch.zeros(b, h, clusters, d, dtype=torch.float32, device=x.device)
    count = torch.zeros(b, h, clusters, dtype=torch.float32, device=x.device)
    block_n, block_d = 32, min(128, _pow2(d))
    if x.numel() == 0:
        return sums, count
    _cluster_sum_kernel[(b * h, triton.cdiv(n, block_n))](x, assign, sums, count, n, d, clusters,
                                                          BLOCK_N=block_n, BLOCK_D=block_d)
    return sums, count


def _cluster_gather(y: torch.Tensor, assign: torch.Tensor, count: torch.Tensor | None, dtype: torch.dtype):
    y, assign = y.contiguous(), assign.contiguous()
    b, h, c, e = y.shape
    n = assign.shape[2]
    out = torch.empty(b, h, n, e, dtype=dtype, device=y.device)
    block_n, block_e = 32, min(128, _pow2(e))
    if out.numel() == 0:
        return out
    _cluster_gather_kernel[(b * h, triton.cdiv(n, block_n))](
        y, assign, count if count is not None else y, out, n, e, c,
        DIVIDE=count is not None, BLOCK_N=block_n, BLOCK_E=block_e)
    return out


class _ClusterMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, assign, clusters):
        sums, count = _cluster_sums(x, assign, clusters)
        ctx.save_for_backward(assign, count)
        ctx.dtype = x.dtype
        return (sums / count.clamp(min=1)[..., None]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        assign, count = ctx.saved_tensors
        # adjoint of the mean: every member receives its cluster's gradient divided by the cluster size
        return _cluster_gather(grad, assign, count, ctx.dtype), None, None


class _ClusterBroadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, assign):
        ctx.save_for_backward(assign)
        ctx.clusters, ctx.dtype = y.shape[2], y.dtype
        return _cluster_gather(y, assign, None, y.dtype)

    @staticmethod
    def backward(ctx, grad):
        (assign,) = ctx.saved_tensors
        sums, _ = _cluster_sums(grad, assign, ctx.clusters)  # adjoint of the broadcast: the sum over members
        return sums.to(ctx.dtype), None


def triton_cluster_mean(x: torch.Tensor, assign: torch.Tensor, clusters: int) -> torch.Tensor:
    """Mean of each cluster's member rows, differentiable in x.

    Args:
        x: ``(batch, heads, n, d)``; assign: int64 ``(batch, heads, n)`` in ``[0, C)``, -1 = left out.
        clusters: C.

    Returns:
        ``(batch, heads, C, d)`` in x's dtype; an empty cluster is zero.
    """
    _check_range(assign, -1, clusters, "cluster_mean", "assign")
    return _ClusterMean.apply(x, assign, clusters)


def triton_cluster_broadcast(y: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Each query's cluster row, differentiable in y: ``(batch, heads, C, e)`` -> ``(batch, heads, n, e)``;
    rows where ``assign`` is -1 are zero."""
    _check_range(assign, -1, y.shape[2], "cluster_broadcast", "assign")
    return _ClusterBroadcast.apply(y, assign)


# --------------------------------------------------------------------------- top-k products
@triton.jit
def _topk_rows(TOP, KEYOK, ASSIGN, pid, bh, batch, n_k, c, t,
               HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
    # key indices of this query's cluster, which slots exist, and which hold real keys (none for a padded query)
    a = tl.load(ASSIGN + pid)
    rt = tl.arange(0, BLOCK_T)
    a = tl.zeros((BLOCK_T,), dtype=tl.int64) + a  # as a block: the interpreter rejects scalar-made masks
    slot = (rt < t) & (a >= 0) & (a < c)
    a = tl.where(slot, a, 0)
    idx = tl.load(TOP + (bh * c + a) * t + rt, mask=slot, other=0)
    # the host checks the range; an out-of-range key index is still never addressed here
    slot = slot & (idx >= 0) & (idx < n_k)
    idx = tl.where(slot, idx, 0)
    ok = slot
    if HAS_MASK:
        ok = ok & (tl.load(KEYOK + batch * n_k + idx, mask=slot, other=0) != 0)
    return idx, slot, ok


@triton.jit
def _topk_forward_kernel(Q, K, V, ASSIGN, TOP, KEYOK, OUT, W, heads, n, n_k, d, e, c, t, scale,
                         HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_E: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # flat (batch, head, query)
    bh = pid // n
    idx, slot, ok = _topk_rows(TOP, KEYOK, ASSIGN, pid, bh, bh // heads, n_k, c, t, HAS_MASK, BLOCK_T)
    rt = tl.arange(0, BLOCK_T)
    rd = tl.arange(0, BLOCK_D)
    re = tl.arange(0, BLOCK_E)
    q = tl.load(Q + pid * d + rd, mask=rd < d, other=0.0).to(tl.float32)
    k = tl.load(K + (bh * n_k + idx[:, None]) * d + rd[None, :], mask=slot[:, None] & (rd[None, :] < d),
                other=0.0).to(tl.float32)
    scores = tl.where(ok, tl.sum(k * q[None, :], axis=1) * scale, -1.0e30)
    p = tl.where(ok, tl.exp(scores - tl.max(scores, axis=0)), 0.0)
    total = tl.sum(p, axis=0)
    w = p / tl.where(total > 0, total, 1.0)  # no real key: all weights zero, output zero
    v = tl.load(V + (bh * n_k + idx[:, None]) * e + re[None, :], mask=ok[:, None] & (re[None, :] < e),
                other=0.0).to(tl.float32)
    out = tl.sum(w[:, None] * v, axis=0)
    tl.store(OUT + pid * e + re, out.to(OUT.dtype.element_ty), mask=re < e)
    tl.store(W + pid * t + rt, w, mask=rt < t)


@triton.jit
def _topk_backward_kernel(Q, K, V, ASSIGN, TOP, KEYOK, W, GOUT, DQ, DK, DV, heads, n, n_k, d, e, c, t, scale,
                          HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_E: tl.constexpr):
    # ds_j = w_j (g . v_j - sum_l w_l g . v_l); dq = scale sum_j ds_j k_j; dk_j += scale ds_j q; dv_j += w_j g
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // n
    idx, slot, ok = _topk_rows(TOP, KEYOK, ASSIGN, pid, bh, bh // heads, n_k, c, t, HAS_MASK, BLOCK_T)
    rt = tl.arange(0, BLOCK_T)
    rd = tl.arange(0, BLOCK_D)
    re = tl.arange(0, BLOCK_E)
    w = tl.where(ok, tl.load(W + pid * t + rt, mask=rt < t, other=0.0), 0.0)
    g = tl.load(GOUT + pid * e + re, mask=re < e, other=0.0).to(tl.float32)
    kv_e = ok[:, None] & (re[None, :] < e)
    kv_d = ok[:, None] & (rd[None, :] < d)
    v = tl.load(V + (bh * n_k + idx[:, None]) * e + re[None, :], mask=kv_e, other=0.0).to(tl.float32)
    k = tl.load(K + (bh * n_k + idx[:, None]) * d + rd[None, :], mask=kv_d, other=0.0).to(tl.float32)
    q = tl.load(Q + pid * d + rd, mask=rd < d, other=0.0).to(tl.float32)
    gv = tl.sum(v * g[None, :], axis=1)
    ds = w * (gv - tl.sum(w * gv, axis=0))
    dq = tl.sum(ds[:, None] * k, axis=0) * scale
    tl.store(DQ + pid * d + rd, dq.to(DQ.dtype.element_ty), mask=rd < d)
    tl.atomic_add(DK + (bh * n_k + idx[:, None]) * d + rd[None, :], (ds * scale)[:, None] * q[None, :], mask=kv_d)
    tl.atomic_add(DV + (bh * n_k + idx[:, None]) * e + re[None, :], w[:, None] * g[None, :], mask=kv_e)


def _topk_blocks(t: int, d: int, e: int) -> tuple[int, int, int]:
    return _pow2(t, 2), _pow2(d, 2), _pow2(e, 2)


def _key_ok(key_mask: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if key_mask is None:
        return like, False  # a dummy pointer, never read
    return key_mask.contiguous().view(torch.uint8), True


class _ClusteredTopk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, assign, top, key_mask, scale):
        q, k, v, assign, top = (x.contiguous() for x in (q, k, v, assign, top))
        b, h, n, d = q.shape
        n_k, e, c, t = k.shape[2], v.shape[-1], top.shape[2], top.shape[3]
        out = torch.empty(b, h, n, e, dtype=q.dtype, device=q.device)
        w = torch.empty(b, h, n, t, dtype=torch.float32, device=q.device)
        keyok, has_mask = _key_ok(key_mask, assign)
        block_t, block_d, block_e = _topk_blocks(t, d, e)
        if b * h * n:
            _topk_forward_kernel[(b * h * n,)](q, k, v, assign, top, keyok, out, w, h, n, n_k, d, e, c, t,
                                               float(scale), HAS_MASK=has_mask, BLOCK_T=block_t, BLOCK_D=block_d,
                                               BLOCK_E=block_e)
        ctx.save_for_backward(q, k, v, assign, top, w, key_mask if key_mask is not None else None)
        ctx.scale, ctx.has_mask = float(scale), key_mask is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, assign, top, w, key_mask = ctx.saved_tensors
        b, h, n, d = q.shape
        n_k, e, c, t = k.shape[2], v.shape[-1], top.shape[2], top.shape[3]
        grad_out = grad_out.contiguous()
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        keyok, has_mask = _key_ok(key_mask, assign)
        block_t, block_d, block_e = _topk_blocks(t, d, e)
        if b * h * n:
            _topk_backward_kernel[(b * h * n,)](q, k, v, assign, top, keyok, w, grad_out, dq, dk, dv, h, n, n_k, d,
                                                e, c, t, ctx.scale, HAS_MASK=has_mask, BLOCK_T=block_t,
                                                BLOCK_D=block_d, BLOCK_E=block_e)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def triton_clustered_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    assign: torch.Tensor,
    top: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Each query's softmax attention over its cluster's top keys, differentiable in q, k and v.

    ``out_i = sum_j softmax_j(scale q_i . k_{top[c_i, j]}) v_{top[c_i, j]}`` over the real keys among them.

    Args:
        q: ``(batch, heads, n, d)``; k: ``(batch, heads, n_k, d)``; v: ``(batch, heads, n_k, e)``.
        assign: int64 ``(batch, heads, n)`` in ``[0, C)``, -1 = padded query (zero output).
        top: int64 ``(batch, heads, C, t)`` key indices in ``[0, n_k)``.
        key_mask: optional bool ``(batch, n_k)``, True = real key.
        scale: multiplies q . k.

    Returns:
        ``(batch, heads, n, e)`` in q's dtype.
    """
    _check_range(assign, -1, top.shape[2], "clustered_topk", "assign")
    _check_range(top, 0, k.shape[2], "clustered_topk", "top")
    return _ClusteredTopk.apply(q, k, v, assign, top, key_mask, scale)
