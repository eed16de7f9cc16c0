"""``torch.library`` custom ops over the compiled kernels.

``hf_efficient::causal_linear(phi_q, phi_k, v, initial, chunk) -> (y, state)``,
``hf_efficient::causal_linear_normalized(phi_q, phi_k, v, initial, eps, chunk) -> (out, state, den)`` and
their backwards are registered with fake (meta) implementations and autograd, so they trace under ``torch.compile`` and
pass ``torch.library.opcheck``. The clustered-attention ops (``hamming_kmeans``, ``cluster_sum``,
``cluster_gather``, ``clustered_topk``, ``centroid_topk``) have a CPU kernel only
(:mod:`hf_efficient_kernels.cpu`, ``clustered.cpp``). For causal linear attention the CPU implementation is the
C++ kernel of :mod:`hf_efficient_kernels.cpu`; CUDA tensors go to the Triton kernel of
:mod:`hf_efficient_kernels.triton`. Callers normally go through :mod:`hf_efficient_kernels.dispatch`
(``causal_linear`` and the clustered functions), which checks availability first and falls back to PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu import build_error, load_extension

__all__ = [
    "FUSED_FEATURES",
    "causal_linear_backward_op",
    "causal_linear_fused_backward_op",
    "causal_linear_fused_op",
    "centroid_topk_op",
    "cluster_gather_op",
    "cluster_sum_op",
    "clustered_topk_backward_op",
    "clustered_topk_op",
    "hamming_kmeans_op",
    "improved_topk_op",
    "linear_fused_backward_op",
    "linear_fused_op",
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
        chunk: tokens per block of the backward on the CPU (a speed knob; the result does not depend on it).
            The CPU forward runs the recurrence token by token and sizes its own blocks by cache.

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


# --------------------------------------------------------------------------- built-in feature map fused in
FUSED_FEATURES = {"elu": 1, "relu": 2}


@torch.library.custom_op("hf_efficient::causal_linear_fused", mutates_args=())
def causal_linear_fused_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial: torch.Tensor | None = None,
    eps: float = 1e-6,
    chunk: int = DEFAULT_CHUNK,
    feature: int = 1,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`causal_linear_normalized_op` on ``phi(q)``, ``phi(k)`` with phi applied inside the kernel.

    ``feature``: 1 = elu(x) + 1, 2 = relu(x) (:data:`FUSED_FEATURES`). The features are computed on each
    chunk as it is loaded, so no ``(batch, heads, n, d)`` feature tensor is built, and the backward
    recomputes them. CPU only.

    Args:
        q, k: ``(batch, heads, n, d)`` raw queries and keys; v: ``(batch, heads, n, d_v)``.
        initial: optional packed ``(batch, heads, d, d_v + 1)`` state.
        key_mask: optional ``(batch, n)`` bool, False = padded key (zero features, no gradient).

    Returns:
        out ``(batch, heads, n, d_v)``, the packed state ``(batch, heads, d, d_v + 1)`` and the
        denominators ``(batch, heads, n)`` (float32, float64 for float64 inputs; no gradient).
    """
    out, state, den = _cpu_module().causal_linear_fused_forward(q, k, v, initial, eps, chunk, feature, key_mask)
    return out, state, den


@causal_linear_fused_op.register_fake
def _(q, k, v, initial=None, eps=1e-6, chunk=DEFAULT_CHUNK, feature=1, key_mask=None):
    b, h, n, m = q.shape
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    return torch.empty_like(v), v.new_empty(b, h, m, v.shape[-1] + 1), v.new_empty(b, h, n, dtype=acc)


@torch.library.custom_op("hf_efficient::causal_linear_fused_backward", mutates_args=())
def causal_linear_fused_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial: torch.Tensor | None,
    out: torch.Tensor,
    den: torch.Tensor,
    grad_out: torch.Tensor,
    grad_state: torch.Tensor | None,
    eps: float = 1e-6,
    chunk: int = DEFAULT_CHUNK,
    feature: int = 1,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`causal_linear_fused_op` w.r.t. the raw q, k, v and initial (always returned)."""
    dq, dk, dv, dinit = _cpu_module().causal_linear_fused_backward(
        q, k, v, initial, out, den, grad_out, grad_state, eps, chunk, feature, key_mask
    )
    return dq, dk, dv, dinit


@causal_linear_fused_backward_op.register_fake
def _(q, k, v, initial, out, den, grad_out, grad_state, eps=1e-6, chunk=DEFAULT_CHUNK, feature=1, key_mask=None):
    b, h, _, m = q.shape
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), v.new_empty(b, h, m, v.shape[-1] + 1)


def _setup_fused(ctx, inputs, output):
    q, k, v, initial, eps, chunk, feature, key_mask = inputs
    out, _, den = output
    ctx.save_for_backward(q, k, v, initial, out, den, key_mask)
    ctx.eps, ctx.chunk, ctx.feature, ctx.has_initial = eps, chunk, feature, initial is not None
    ctx.mark_non_differentiable(den)


def _backward_fused(ctx, grad_out, grad_state, _grad_den):
    q, k, v, initial, out, den, key_mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dinit = causal_linear_fused_backward_op(
        q, k, v, initial, out, den, grad_out, grad_state, ctx.eps, ctx.chunk, ctx.feature, key_mask
    )
    return dq, dk, dv, (dinit if ctx.has_initial else None), None, None, None, None


causal_linear_fused_op.register_autograd(_backward_fused, setup_context=_setup_fused)


# --------------------------------------------------------------------------- clustered attention
def _clustered_module():
    from .cpu import clustered_build_error, load_clustered_extension

    ext = load_clustered_extension()
    if ext is None:
        raise RuntimeError(f"hf_efficient clustered ops: the CPU kernel could not be built: {clustered_build_error()}")
    return ext


@torch.library.custom_op("hf_efficient::hamming_kmeans", mutates_args=())
def hamming_kmeans_op(bits: torch.Tensor, valid: torch.Tensor, clusters: int, iterations: int) -> torch.Tensor:
    """Lloyd's k-means in Hamming space on popcounts; same result as ``hashing.hamming_kmeans``.

    Args:
        bits: bool ``(s, n, n_bits)`` codes (s = batch x heads sequences), packed into 64-bit words inside.
        valid: bool ``(s, n)``, True = real query.
        clusters, iterations: as in ``hashing.hamming_kmeans``.

    Returns:
        int64 ``(s, n)``: cluster in ``[0, clusters)``, -1 for padded queries.
    """
    return _clustered_module().hamming_kmeans(bits, valid, clusters, iterations)


@hamming_kmeans_op.register_fake
def _(bits, valid, clusters, iterations):
    return bits.new_empty(bits.shape[:2], dtype=torch.long)


@torch.library.custom_op("hf_efficient::cluster_sum", mutates_args=())
def cluster_sum_op(x: torch.Tensor, assign: torch.Tensor, clusters: int, mean: bool) -> torch.Tensor:
    """Per-cluster sum (or mean, with ``mean``) of rows: ``(b, h, n, d)`` -> ``(b, h, clusters, d)``.

    ``assign`` is int64 ``(b, h, n)`` in ``[0, clusters)``; rows with -1 are left out; an empty cluster is zero.
    """
    return _clustered_module().cluster_sum(x, assign, clusters, mean)


@cluster_sum_op.register_fake
def _(x, assign, clusters, mean):
    return x.new_empty(x.shape[0], x.shape[1], clusters, x.shape[3])


@torch.library.custom_op("hf_efficient::cluster_gather", mutates_args=())
def cluster_gather_op(y: torch.Tensor, assign: torch.Tensor, divide: bool) -> torch.Tensor:
    """Each query's cluster row: ``(b, h, C, e)`` -> ``(b, h, n, e)``, divided by the cluster size with
    ``divide``; zero rows where ``assign`` is -1."""
    return _clustered_module().cluster_gather(y, assign, divide)


@cluster_gather_op.register_fake
def _(y, assign, divide):
    return y.new_empty(y.shape[0], y.shape[1], assign.shape[2], y.shape[3])


# The sum over members and the broadcast to members are each other's adjoints (the mean pairs with
# the broadcast divided by the cluster size).
def _setup_sum(ctx, inputs, output):
    _, assign, _, mean = inputs
    ctx.save_for_backward(assign)
    ctx.mean = mean


def _backward_sum(ctx, grad):
    (assign,) = ctx.saved_tensors
    return cluster_gather_op(grad.contiguous(), assign, ctx.mean), None, None, None


def _setup_gather(ctx, inputs, output):
    y, assign, divide = inputs
    ctx.save_for_backward(assign)
    ctx.clusters, ctx.divide = y.shape[2], divide


def _backward_gather(ctx, grad):
    (assign,) = ctx.saved_tensors
    return cluster_sum_op(grad.contiguous(), assign, ctx.clusters, ctx.divide), None, None


cluster_sum_op.register_autograd(_backward_sum, setup_context=_setup_sum)
cluster_gather_op.register_autograd(_backward_gather, setup_context=_setup_gather)


@torch.library.custom_op("hf_efficient::clustered_topk", mutates_args=())
def clustered_topk_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    assign: torch.Tensor,
    top: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of each query over its cluster's top keys: ``out_i = sum_j w_ij v_{top[c_i, j]}``.

    Args:
        q: ``(b, h, n, d)``; k: ``(b, h, n_k, d)``; v: ``(b, h, n_k, e)``.
        assign: int64 ``(b, h, n)`` cluster of each query (-1: padded, zero output).
        top: int64 ``(b, h, C, t)`` key indices of each cluster.
        key_mask: optional bool ``(b, n_k)``; False keys get zero weight.
        scale: multiplies q . k before the softmax.

    Returns:
        out ``(b, h, n, e)`` in q's dtype and the weights ``(b, h, n, t)`` in the accumulation dtype
        (float32, float64 for float64 inputs), kept for the backward; they carry no gradient.
    """
    out, w = _clustered_module().clustered_topk_forward(q, k, v, assign, top, key_mask, scale)
    return out, w


@clustered_topk_op.register_fake
def _(q, k, v, assign, top, key_mask, scale):
    b, h, n, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(b, h, n, v.shape[-1]), q.new_empty(b, h, n, top.shape[-1], dtype=acc)


@torch.library.custom_op("hf_efficient::clustered_topk_backward", mutates_args=())
def clustered_topk_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    assign: torch.Tensor,
    top: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`clustered_topk_op` w.r.t. q, k and v (from its saved weights)."""
    dq, dk, dv = _clustered_module().clustered_topk_backward(q, k, v, assign, top, weights, grad_out, scale)
    return dq, dk, dv


@clustered_topk_backward_op.register_fake
def _(q, k, v, assign, top, weights, grad_out, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_topk(ctx, inputs, output):
    q, k, v, assign, top, _, scale = inputs
    ctx.save_for_backward(q, k, v, assign, top, output[1])
    ctx.scale = scale
    ctx.mark_non_differentiable(output[1])


def _backward_topk(ctx, grad_out, _grad_weights):
    q, k, v, assign, top, weights = ctx.saved_tensors
    if grad_out is None:
        grad_out = q.new_zeros(*q.shape[:3], v.shape[-1])
    dq, dk, dv = clustered_topk_backward_op(q, k, v, assign, top, weights, grad_out, ctx.scale)
    return dq, dk, dv, None, None, None, None


clustered_topk_op.register_autograd(_backward_topk, setup_context=_setup_topk)


@torch.library.custom_op("hf_efficient::centroid_topk", mutates_args=())
def centroid_topk_op(
    cent: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, scale: float, t: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The centroid half of improved clustered attention, fused; forward only (no autograd).

    With ``p_c = softmax(scale * cent_c . k)`` over the real keys: the indices of the ``t`` largest
    weights ``(b, h, C, t)`` (in no particular order), their mass ``(b, h, C)`` and
    ``rest_c = sum_{j not in top} p_cj v_j`` ``(b, h, C, e)``, without a ``(b, h, C, n_k)`` tensor.
    """
    top, mass, rest = _clustered_module().centroid_topk(cent, k, v, key_mask, scale, t)
    return top, mass, rest


@centroid_topk_op.register_fake
def _(cent, k, v, key_mask, scale, t):
    b, h, c, _ = cent.shape
    return cent.new_empty(b, h, c, t, dtype=torch.long), cent.new_empty(b, h, c), cent.new_empty(b, h, c, v.shape[-1])


@torch.library.custom_op("hf_efficient::improved_topk", mutates_args=())
def improved_topk_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    assign: torch.Tensor,
    top: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    mass: torch.Tensor,
    rest: torch.Tensor,
) -> torch.Tensor:
    """Improved clustered attention's output, forward only (no autograd): for query i of cluster c,
    ``mass_c * out_i + rest_c`` with ``out_i`` as in :func:`clustered_topk_op` (zero rows for padded queries).

    mass ``(b, h, C)`` and rest ``(b, h, C, e)`` in q's dtype (from :func:`centroid_topk_op`); other arguments as
    in :func:`clustered_topk_op`. Returns ``(b, h, n, e)``; no weights are kept.
    """
    return _clustered_module().improved_topk(q, k, v, assign, top, key_mask, scale, mass, rest)


@improved_topk_op.register_fake
def _(q, k, v, assign, top, key_mask, scale, mass, rest):
    b, h, n, _ = q.shape
    return q.new_empty(b, h, n, v.shape[-1])


# --------------------------------------------------------------------------- non-causal, feature map fused in
@torch.library.custom_op("hf_efficient::linear_fused", mutates_args=())
def linear_fused_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float = 1e-6,
    feature: int = 1,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-causal normalised linear attention, ``out_i = phi(q_i) S / (phi(q_i) . z + eps)``, phi applied
    inside the kernel (one pass over the keys builds ``S = sum_j phi(k_j) v_j^T`` and ``z = sum_j phi(k_j)``,
    one pass over the queries reads them). CPU only.

    Args:
        q: ``(batch, heads, n_q, d)``; k: ``(batch, heads, n_k, d)`` raw queries and keys;
            v: ``(batch, heads, n_k, d_v)``; all of one dtype (float32/64, bfloat16, float16).
        feature: 1 = elu(x) + 1, 2 = relu(x) (:data:`FUSED_FEATURES`).
        key_mask: optional ``(batch, n_k)`` bool, False = padded key (skipped: no weight, no gradient).

    Returns:
        out ``(batch, heads, n_q, d_v)`` in the inputs' dtype, the packed state ``(batch, heads, d, d_v + 1)``
        (``[S z]``) and the denominators ``phi(q_i) . z`` ``(batch, heads, n_q)``, both in float32 (float64
        for float64 inputs) and without gradient.
    """
    out, state, den = _cpu_module().linear_fused_forward(q, k, v, eps, feature, key_mask)
    return out, state, den


@linear_fused_op.register_fake
def _(q, k, v, eps=1e-6, feature=1, key_mask=None):
    b, h, n_q, m = q.shape
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    return (v.new_empty(b, h, n_q, v.shape[-1]), v.new_empty(b, h, m, v.shape[-1] + 1, dtype=acc),
            v.new_empty(b, h, n_q, dtype=acc))


@torch.library.custom_op("hf_efficient::linear_fused_backward", mutates_args=())
def linear_fused_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    den: torch.Tensor,
    state: torch.Tensor,
    grad_out: torch.Tensor,
    eps: float = 1e-6,
    feature: int = 1,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`linear_fused_op` w.r.t. the raw q, k, v (phi recomputed, not stored)."""
    dq, dk, dv = _cpu_module().linear_fused_backward(q, k, v, out, den, state, grad_out, eps, feature, key_mask)
    return dq, dk, dv


@linear_fused_backward_op.register_fake
def _(q, k, v, out, den, state, grad_out, eps=1e-6, feature=1, key_mask=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_linear_fused(ctx, inputs, output):
    q, k, v, eps, feature, key_mask = inputs
    out, state, den = output
    ctx.save_for_backward(q, k, v, out, den, state, key_mask)
    ctx.eps, ctx.feature = eps, feature
    ctx.mark_non_differentiable(state, den)


def _linear_fused_differentiable(q, k, v, eps, feature, key_mask):
    """The forward of :func:`linear_fused_op` in PyTorch operations, only for gradients of gradients (the
    kernel's backward has no derivative of its own); the attention modules hold the user-facing path."""
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    phi = (lambda x: F.elu(x.to(acc)) + 1.0) if feature == 1 else (lambda x: F.relu(x.to(acc)))
    phi_q, phi_k, vf = phi(q), phi(k), v.to(acc)
    if key_mask is not None:
        keep = key_mask[:, None, :, None]
        phi_k, vf = torch.where(keep, phi_k, 0.0), torch.where(keep, vf, 0.0)
    den = torch.matmul(phi_q, phi_k.sum(2).unsqueeze(-1)) + eps
    return (torch.matmul(phi_q, torch.matmul(phi_k.transpose(-1, -2), vf)) / den).to(v.dtype)


def _backward_linear_fused(ctx, grad_out, _grad_state, _grad_den):
    q, k, v, out, den, state, key_mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradient itself must be differentiable
        with torch.enable_grad():
            leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in (q, k, v)]
            again = _linear_fused_differentiable(*leaves, ctx.eps, ctx.feature, key_mask)
            dq, dk, dv = torch.autograd.grad(again, leaves, grad_out, create_graph=True)
        return dq, dk, dv, None, None, None
    dq, dk, dv = linear_fused_backward_op(q, k, v, out, den, state, grad_out, ctx.eps, ctx.feature, key_mask)
    return dq, dk, dv, None, None, None


linear_fused_op.register_autograd(_backward_linear_fused, setup_context=_setup_linear_fused)
