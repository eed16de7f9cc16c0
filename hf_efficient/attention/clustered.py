"""Clustered and improved-clustered attention ("Fast Transformers with Clustered Attention",
Vyas, Katharopoulos and Fleuret, NeurIPS 2020).

Clustered: the queries of each sequence and head are hashed (:mod:`.hashing`) and grouped into C
clusters by k-means in Hamming space; each cluster's centroid (the mean of its member queries, in
query space) attends over all keys with softmax, and every query receives its centroid's output.
Cost O(N C d) instead of O(N^2 d); memory O(N C).

With ``clustering="queries"`` the k-means runs on the query vectors themselves (Euclidean,
:mod:`.query_kmeans`) instead of on their hashes: closer to exact attention (measured on the offline
MiniLM, 25 clusters / top-32, 256 tokens, 5 seeds: pooled cosine 0.984 with ``iterations=1``, 0.987
with 2, against 0.980) for a costlier clustering: one or two Lloyd rounds after the k-means++ start give
most of the gain, so one round is its default (N = 4096, 25 clusters, one thread: 1.7x the time of the
default Hamming clustering with one round).

Improved clustered: for each cluster the ``topk`` keys with the largest centroid attention are
re-scored exactly for every member query. With ``A^c`` the centroid's attention and ``T`` its top
keys, query i of the cluster gets

    out_i = m * softmax_T(q_i . k_T * scale) v_T + sum_{l not in T} A^c_l v_l,   m = sum_{l in T} A^c_l

so its weights still sum to one. Cost O(N (C + topk) d).

Both are differentiable in q, k and v (gradients reach the member queries through the centroid
mean; the hashing and clustering are discrete). Padded queries take no part in clustering and get a
zero output; padded keys get exactly zero weight. A sequence whose keys are all padded gets zeros.

Randomness: with ``seed`` the hyperplanes are the same on every call, and k-means starts
farthest-first from a sequence's own real queries (re-seeding empty centres, see :mod:`.hashing`),
so a sequence's result does not depend on the other sequences of the batch or on its padding. With
``seed=None`` fresh planes are drawn from torch's global generator on each call (reproducible only
under ``torch.manual_seed``).

Non-finite input is confined as softmax attention confines it: a query with a NaN or inf entry gets a
NaN row and takes no part in hashing, clustering or any centroid; a key with one is left out of the
centroids' attention and gives NaN exactly to the rows whose score with it is not -inf. No queries give
an empty output; no keys (``n_k = 0``) is an error (pad keys with ``key_padding_mask`` instead).

Limits: a sequence with at most ``clusters`` real queries puts each query in its own cluster, which
is exact softmax attention; ``topk >= n_keys`` is exact softmax attention too. Only the non-causal
form exists. :func:`clustered_attention_reference` is a loop-per-cluster definition the fast
functions are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The optional compiled kernels (remote code, shipped without them, sets this to None).
from hf_efficient_kernels import dispatch

from ._checks import check_padding_mask, check_qkv, check_scale
from .hashing import (
    MAX_BITS,
    draw_hyperplanes,
    hamming_kmeans,
    hamming_kmeans_reference,
    hash_queries,
    pack_bits,
)
from .query_kmeans import draw_uniforms, query_kmeans, query_kmeans_reference
from .registry import AttentionKind, register_attention_kind

__all__ = [
    "ClusteredAttentionParams",
    "ImprovedClusteredAttentionParams",
    "clustered_attention",
    "clustered_attention_reference",
    "improved_clustered_attention",
]

_TILE = 64  # most queries per tile in the improved products (fewer when clusters are small)
# How queries are grouped: k-means on LSH codes in Hamming space (the paper's), or on the queries themselves.
CLUSTERINGS = ("hamming", "queries")


# --------------------------------------------------------------------------- validation
def _check_int(value, name: str, what: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: {what} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: {what} must be {bound}, got {value}")
    return value


def _check_clustering(name: str, clustering) -> str:
    if not isinstance(clustering, str):
        raise TypeError(f"{name}: clustering must be a str (one of {', '.join(map(repr, CLUSTERINGS))}), "
                        f"got {type(clustering).__name__}")
    if clustering not in CLUSTERINGS:
        raise ValueError(f"{name}: clustering must be one of {', '.join(map(repr, CLUSTERINGS))}, got {clustering!r}")
    return clustering


# Lloyd rounds when ``iterations=None``: Hamming k-means on short codes needs several; on the queries
# themselves one round after the k-means++ start gives most of the gain (see the module docstring).
DEFAULT_ITERATIONS = {"hamming": 10, "queries": 1}


def _iterations(iterations: int | None, clustering: str) -> int:
    return DEFAULT_ITERATIONS[clustering] if iterations is None else iterations


def _check_knobs(name, clusters, bits, iterations, seed, topk=None, clustering="hamming"):
    _check_clustering(name, clustering)
    _check_int(clusters, name, "clusters", 1)
    _check_int(bits, name, "bits", 1, MAX_BITS)
    if iterations is not None:  # None: the clustering's own default (DEFAULT_ITERATIONS)
        _check_int(iterations, name, "iterations", 0)
    if topk is not None:
        _check_int(topk, name, "topk", 1)
    if seed is not None:
        _check_int(seed, name, "seed", 0)


# --------------------------------------------------------------------------- compiled kernel, else PyTorch
# hf_efficient_kernels.dispatch checks the inputs and hands back the compiled kernel when one runs here
# (implementation=/HF_EFFICIENT_KERNELS decide); otherwise the PyTorch code of this file runs.
def kmeans(
    bits: torch.Tensor, valid: torch.Tensor, clusters: int, iterations: int, *, implementation: str | None = None
) -> torch.Tensor:
    """:func:`.hashing.hamming_kmeans` (same assignment) through the compiled popcount kernel where one runs.

    bits: bool ``(s, n, n_bits)``; valid: bool ``(s, n)``. Returns int64 ``(s, n)``, -1 for padded queries.
    """
    kernel = dispatch.hamming_kmeans_kernel(bits, valid, clusters, iterations, implementation=implementation) \
        if dispatch else None
    return kernel() if kernel else hamming_kmeans(bits, valid, clusters, iterations)


def cluster_mean(
    x: torch.Tensor, assign: torch.Tensor, clusters: int, *, implementation: str | None = None
) -> torch.Tensor:
    """Mean of each cluster's member rows ``(b, h, C, d)`` (zero for an empty cluster), differentiable in x.

    x: ``(b, h, n, d)``; assign: int64 ``(b, h, n)`` in ``[0, C)``, -1 = left out.
    """
    kernel = dispatch.cluster_mean_kernel(x, assign, clusters, implementation=implementation) if dispatch else None
    return kernel() if kernel else _centroids(x, assign, clusters)


def cluster_broadcast(y: torch.Tensor, assign: torch.Tensor, *, implementation: str | None = None) -> torch.Tensor:
    """Give each query its cluster's row: ``(b, h, C, e)`` -> ``(b, h, n, e)``, differentiable in y; queries with
    assign -1 (padded or non-finite) get zeros."""
    kernel = dispatch.cluster_broadcast_kernel(y, assign, implementation=implementation) if dispatch else None
    return kernel() if kernel else _per_query(y, assign, assign >= 0)


def centroid_topk(
    cent: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    t: int,
    *,
    implementation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The centroid half of improved clustered attention: each centroid's top-``t`` keys, their weight and the rest.

    With ``p_c = softmax(scale * cent_c . k)`` over the real keys (zero for padded ones). The fused kernel is
    forward only; with a gradient to compute this is the differentiable PyTorch computation.

    Args:
        cent: ``(b, h, C, d)``; k: ``(b, h, n_k, d)``; v: ``(b, h, n_k, e)``.
        key_mask: optional bool ``(b, n_k)``, True = real key.
        scale: multiplies cent . k; t: keys kept per centroid, ``1 <= t <= n_k``.

    Returns:
        ``top`` int64 ``(b, h, C, t)`` (any order), ``mass`` ``(b, h, C)`` = the top keys' total weight,
        ``rest`` ``(b, h, C, e)`` = ``sum_{j not in top} p_cj v_j``.
    """
    kernel = dispatch.centroid_topk_kernel(cent, k, v, key_mask, scale, t, implementation=implementation) \
        if dispatch else None
    if kernel:
        return kernel()
    b, h, c, _ = cent.shape
    probs, cout = _centroid_attention(cent, k, v, key_mask, scale)
    top = probs.topk(t, dim=-1).indices  # padded keys have weight 0, picked last
    top_probs = probs.gather(-1, top)
    v_top = _rows(v.reshape(-1, v.shape[-1]), _flat_rows(top, k.shape[2])).reshape(b, h, c, t, v.shape[-1])
    rest = cout - torch.matmul(top_probs.unsqueeze(-2), v_top).squeeze(-2)
    return top, top_probs.sum(-1), rest


def clustered_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    assign: torch.Tensor,
    top: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    *,
    implementation: str | None = None,
) -> torch.Tensor:
    """Each query's softmax attention over its cluster's top keys (the exact part of improved clustered attention).

    ``out_i = sum_j softmax_j(scale q_i . k_{top[c_i, j]}) v_{top[c_i, j]}`` over the real keys among them;
    differentiable in q, k and v. The kernel reads the top keys in place; the PyTorch path copies them.

    Args:
        q: ``(b, h, n, d)``; k: ``(b, h, n_k, d)``; v: ``(b, h, n_k, e)``.
        assign: int64 ``(b, h, n)`` in ``[0, C)``, -1 = padded query (gets zeros).
        top: int64 ``(b, h, C, t)`` key indices in ``[0, n_k)``.
        key_mask: optional bool ``(b, n_k)``, True = real key.
        scale: multiplies q . k.

    Returns:
        ``(b, h, n, e)``.
    """
    kernel = dispatch.clustered_topk_kernel(q, k, v, assign, top, key_mask, scale, implementation=implementation) \
        if dispatch else None
    if kernel:
        return kernel()
    b, h, n, d = q.shape
    n_k, e, c, t = k.shape[2], v.shape[-1], top.shape[2], top.shape[3]
    rows = _flat_rows(top, n_k)
    k_top = _rows(k.reshape(-1, d), rows).reshape(b * h * c, t, d)
    v_top = _rows(v.reshape(-1, e), rows).reshape(b * h * c, t, e)
    key_ok = None
    if key_mask is not None:
        key_ok = key_mask[:, None, :].expand(b, h, n_k).reshape(-1)[rows].reshape(b * h * c, t)
    return _top_products(q, assign, k_top, v_top, key_ok, float(scale), c).reshape(b, h, n, e)


# --------------------------------------------------------------------------- shared steps
def _flat_rows(top: torch.Tensor, n_k: int) -> torch.Tensor:
    """Key indices ``(b, h, C, t)`` -> rows of the ``(b * h * n_k, .)`` flattened keys, ``(b * h * C * t,)``."""
    b, h = top.shape[:2]
    return (top + torch.arange(b * h, device=top.device).reshape(b, h, 1, 1) * n_k).reshape(-1)


def _rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` along dim 0 (differentiable in table); the embedding lookup copies narrow
    rows many times faster than ``index_select`` on CPU."""
    flat = table.reshape(table.shape[0], math.prod(table.shape[1:]))  # explicit: the table may be empty
    return torch.nn.functional.embedding(index, flat).reshape(index.shape[0], *table.shape[1:])


def _cluster(q, clusters, bits, iterations, seed, valid, clustering="hamming"):
    """Cluster assignment ``(b, h, n_q)`` int64 in ``[0, C)``, -1 where ``valid`` ``(b, h, n_q)`` is False."""
    b, h, n, d = q.shape
    if clustering == "queries":  # Euclidean k-means on the queries themselves (:mod:`.query_kmeans`)
        assign = query_kmeans(q.detach().reshape(b * h, n, d), valid.reshape(b * h, n), clusters, iterations, seed)
        return assign.reshape(b, h, n)
    w, _ = draw_hyperplanes(d, bits, seed, q.device)
    codes = hash_queries(q.detach(), valid, w)  # (b, h, n, bits), planes through the queries' mean
    valid_bh = valid.reshape(b * h, n)
    assign = kmeans(codes.reshape(b * h, n, bits), valid_bh, clusters, iterations)
    return assign.reshape(b, h, n)


def _centroids(q, assign, clusters):
    """Mean of member queries ``(b, h, C, d)`` (zero for an empty cluster); differentiable in q."""
    b, h, n, d = q.shape
    # padded queries go to an extra dump cluster that is dropped
    group = torch.where(assign < 0, clusters, assign)
    group = group + torch.arange(b * h, device=q.device).reshape(b, h, 1) * (clusters + 1)
    group = group.reshape(-1)
    sums = q.new_zeros(b * h * (clusters + 1), d).index_add(0, group, q.reshape(-1, d))
    count = torch.bincount(group, minlength=b * h * (clusters + 1)).clamp(min=1).to(q.dtype)
    cent = (sums / count[:, None]).reshape(b, h, clusters + 1, d)
    return cent[:, :, :clusters]


def _centroid_attention(cent, k, v, key_mask, scale):
    """Softmax attention of the centroids over all keys: probabilities ``(b, h, C, n_k)``, output ``(b, h, C, d_v)``."""
    scores = torch.matmul(cent, k.transpose(-1, -2)) * scale
    if key_mask is not None:
        keep = key_mask[:, None, None, :]
        # finfo.min instead of -inf: a sequence with no real key gets finite weights, zeroed below
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1) * keep.to(scores.dtype)
    else:
        probs = torch.softmax(scores, dim=-1)
    return probs, torch.matmul(probs, v)


@dataclass
class _Prepared:
    """Inputs ready for the clustered computation (see :func:`_prepare`)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_mask: torch.Tensor | None  # (batch', n_k) bool or None
    scale: float
    clusters: int
    assign: torch.Tensor  # (batch', heads', n_q) int64, -1 = padded or non-finite query
    nan_rows: torch.Tensor | None  # (b, h, n_q) bool: rows softmax attention would make NaN
    shape: tuple[int, int]  # (b, h) of the caller: heads were folded into the batch when shape != q.shape[:2]

    def finish(self, out: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Output ``(b, h, n_q, e)`` in ``dtype`` with the NaN rows set, and the assignment ``(b, h, n_q)``."""
        b, h = self.shape
        out = out.reshape(b, h, *out.shape[2:])
        assign = self.assign.reshape(b, h, -1)
        if self.nan_rows is not None:
            out = torch.where(self.nan_rows[..., None], float("nan"), out)
        return out.to(dtype), assign


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``(..., n)`` bool: rows of ``x`` ``(..., n, d)`` with only finite entries. The row max and min carry a
    NaN or an inf of the row (both reductions propagate NaN): two reads, several times faster than
    ``isfinite(x).all(-1)``, which writes full-size intermediates."""
    if x.shape[-1] == 0:
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    return torch.isfinite(x.amax(dim=-1)) & torch.isfinite(x.amin(dim=-1))


def _spoiled_by_keys(q, k, bad_k, valid_q, block: int = 1 << 22):
    """Queries ``(b, h, n_q)`` for which some non-finite real key has a score other than -inf: softmax gives
    them a NaN row (a +inf or NaN score); a -inf score is a zero weight and spoils nothing. Only the few
    non-finite keys are scored, in blocks of about ``block`` numbers."""
    spoiled = torch.zeros(valid_q.shape, dtype=torch.int32, device=q.device)
    where = bad_k.nonzero()  # (nb, 3): batch, head, key
    n_q, d = q.shape[2], q.shape[3]
    step = max(1, block // max(1, n_q * d))
    for start in range(0, where.shape[0], step):
        bi, hi, ki = where[start : start + step].unbind(1)
        scores = torch.matmul(q[bi, hi], k[bi, hi, ki][..., None])[..., 0]  # (chunk, n_q)
        hit = (scores != float("-inf")).to(torch.int32)
        spoiled.index_put_((bi, hi), hit, accumulate=True)
    return (spoiled > 0) & valid_q


def _prepare(name, q, k, v, clusters, bits, iterations, key_padding_mask, query_padding_mask, scale, seed,
             topk=None, clustering="hamming") -> _Prepared:
    """Validate, cast to the accumulation dtype, confine non-finite values and cluster the queries.

    Non-finite values are confined as softmax attention confines them: a query with a NaN or inf entry
    gets a NaN row and takes no part in hashing, k-means or any centroid; a key with a NaN or inf entry
    is left out of every centroid's attention (its score for a finite query is never finite) and makes
    NaN exactly the rows whose score with it is not -inf (softmax's NaN rows); a -inf score is a zero
    weight. A sequence left with only such keys gives NaN for all its real queries, as softmax does.
    Per-head key masks are needed then: the heads are folded into the batch for that call.
    """
    check_qkv(q, k, v, name)
    _check_knobs(name, clusters, bits, iterations, seed, topk, clustering)
    iterations = _iterations(iterations, clustering)
    check_scale(scale, name)
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    if n_k == 0 and n_q > 0:
        raise ValueError(
            f"{name}: k and v have no keys (k {tuple(k.shape)}, v {tuple(v.shape)}) for {n_q} queries; "
            "attention needs at least one key (mask keys with key_padding_mask instead)"
        )
    key_mask = check_padding_mask(key_padding_mask, b, n_k, name, "key_padding_mask")
    query_mask = check_padding_mask(query_padding_mask, b, n_q, name, "query_padding_mask")
    if key_mask is not None:
        key_mask = key_mask.to(q.device)
    if query_mask is not None:
        query_mask = query_mask.to(q.device)
    scale = d**-0.5 if scale is None else float(scale)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32  # accumulate in fp32 under fp16/bf16
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if n_q == 0:  # nothing to cluster: clusters = 0 tells the caller to return an empty output
        return _Prepared(q, k, v, key_mask, scale, 0, torch.zeros(b, h, 0, dtype=torch.long, device=q.device),
                         None, (b, h))

    real_q = torch.ones(b, h, n_q, dtype=torch.bool, device=q.device)
    if query_mask is not None:
        real_q = real_q & query_mask[:, None, :]
    finite_q = _finite_rows(q)
    valid_q = real_q & finite_q
    bad_q = real_q & ~finite_q
    real_k = torch.ones(b, h, n_k, dtype=torch.bool, device=q.device)
    if key_mask is not None:
        real_k = real_k & key_mask[:, None, :]
    finite_k = _finite_rows(k)
    bad_k = real_k & ~finite_k
    nan_rows = None
    if bool(bad_q.any()):
        nan_rows = bad_q
    # zeroed, padded ones too: no NaN reaches a centroid, a masked score (NaN + finfo.min) or a gradient
    if not bool(finite_q.all()):
        q = torch.where(finite_q[..., None], q, 0.0)
    if not bool(finite_k.all()):
        k_raw, k = k, torch.where(finite_k[..., None], k, 0.0)
    if bool(bad_k.any()):
        spoiled = _spoiled_by_keys(q, k_raw, bad_k, valid_q)
        good_k = real_k & ~bad_k
        # no finite key left: every score is -inf or NaN, a NaN row in softmax
        spoiled = spoiled | (valid_q & ~good_k.any(dim=-1, keepdim=True))
        nan_rows = spoiled if nan_rows is None else nan_rows | spoiled
        # one sequence per (batch, head), each with its own key mask
        q, k, v = (x.reshape(b * h, 1, *x.shape[2:]) for x in (q, k, v))
        key_mask = good_k.reshape(b * h, n_k)
        valid_q = valid_q.reshape(b * h, 1, n_q)
    c = min(clusters, n_q)  # more clusters than queries: every query is its own cluster
    assign = _cluster(q, c, bits, iterations, seed, valid_q, clustering)
    return _Prepared(q, k, v, key_mask, scale, c, assign, nan_rows, (b, h))


def _per_query(cout, assign, query_mask):
    """Give each query its cluster's row: ``(b, h, C, e)`` -> ``(b, h, n_q, e)``; queries outside
    ``query_mask`` (``(b, n_q)`` or ``(b, h, n_q)``) get zeros."""
    idx = assign.clamp(min=0)[..., None].expand(*assign.shape, cout.shape[-1])
    out = cout.gather(2, idx)
    if query_mask is not None:  # (b, n_q) or (b, h, n_q)
        keep = query_mask[:, None, :] if query_mask.dim() == 2 else query_mask
        out = out * keep[..., None].to(out.dtype)
    return out


# --------------------------------------------------------------------------- public functions
def clustered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    clusters: int,
    bits: int = 63,
    iterations: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    query_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    seed: int | None = None,
    return_clusters: bool = False,
    clustering: str = "hamming",
):
    """Clustered attention: each query receives the softmax attention output of its cluster's centroid.

    Args:
        q: ``(batch, heads, n_q, d)``.
        k: ``(batch, heads, n_k, d)``.
        v: ``(batch, heads, n_k, d_v)``.
        clusters: number of query clusters C per sequence and head (>= 1); C >= n_q is exact.
        bits: hash length, 1 ... 1024.
        iterations: Lloyd rounds after the first assignment (>= 0; stops early at a fixed point); None:
            10 with ``clustering="hamming"``, 1 with ``"queries"`` (:data:`DEFAULT_ITERATIONS`).
        key_padding_mask: optional ``(batch, n_k)`` bool or 0/1, True/1 = real key.
        query_padding_mask: optional ``(batch, n_q)`` bool or 0/1, True/1 = real query.
        scale: softmax temperature on q.k; default ``d ** -0.5``.
        seed: fixes the hyperplanes, or the k-means++ draws with ``clustering="queries"`` (see the module
            docstring); None draws fresh ones each call.
        return_clusters: also return the assignment ``(batch, heads, n_q)`` int64 (-1 = padded or
            non-finite query).
        clustering: ``"hamming"`` (default): k-means on ``bits``-bit LSH codes; ``"queries"``: Euclidean
            k-means on the queries themselves (:mod:`.query_kmeans`; ``bits`` is unused), closer to exact
            attention for a higher clustering cost.

    Returns:
        ``(batch, heads, n_q, d_v)`` in the dtype of q (and the assignment if ``return_clusters``).
    """
    p = _prepare(
        "clustered_attention", q, k, v, clusters, bits, iterations, key_padding_mask, query_padding_mask,
        scale, seed, clustering=clustering,
    )
    q32, k32, v32, key_mask, scale, c, assign = p.q, p.k, p.v, p.key_mask, p.scale, p.clusters, p.assign
    if c == 0:  # no queries
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        return (out, assign) if return_clusters else out
    cent = cluster_mean(q32, assign, c)
    # only the centroids' outputs are needed: the fused SDPA kernel never stores the C x n_k weights
    mask = None
    if key_mask is not None:
        # additive finfo.min rather than a bool mask: a sequence without real keys stays finite (also
        # in the backward pass) and is zeroed below
        mask = torch.zeros(key_mask.shape, dtype=cent.dtype, device=cent.device)
        mask = mask.masked_fill(~key_mask, torch.finfo(cent.dtype).min)[:, None, None, :]
    cout = torch.nn.functional.scaled_dot_product_attention(cent, k32, v32, attn_mask=mask, scale=scale)
    if key_mask is not None:
        cout = torch.where(key_mask.any(dim=1)[:, None, None, None], cout, 0.0)
    out, assign = p.finish(cluster_broadcast(cout, assign), q.dtype)
    return (out, assign) if return_clusters else out


def improved_clustered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    clusters: int,
    topk: int = 32,
    bits: int = 63,
    iterations: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    query_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    seed: int | None = None,
    return_clusters: bool = False,
    clustering: str = "hamming",
):
    """Improved clustered attention: clustered attention plus exact scores on each cluster's top-k keys.

    Arguments as in :func:`clustered_attention`, plus ``topk`` (>= 1): keys re-scored per query;
    ``topk >= n_k`` is exact softmax attention.

    Returns:
        ``(batch, heads, n_q, d_v)`` in the dtype of q (and the assignment if ``return_clusters``).
    """
    # topk=None would silently mean plain clustered attention in the shared checks: refuse it here
    _check_int(topk, "improved_clustered_attention", "topk", 1)
    p = _prepare(
        "improved_clustered_attention", q, k, v, clusters, bits, iterations, key_padding_mask,
        query_padding_mask, scale, seed, topk=topk, clustering=clustering,
    )
    q32, k32, v32, key_mask, scale, c, assign = p.q, p.k, p.v, p.key_mask, p.scale, p.clusters, p.assign
    if c == 0:  # no queries
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        return (out, assign) if return_clusters else out
    b, h, n_q = q32.shape[:3]
    e = v32.shape[-1]
    cent = cluster_mean(q32, assign, c)
    top, mass, rest = centroid_topk(cent, k32, v32, key_mask, scale, min(topk, k32.shape[2]))
    fused = dispatch.improved_topk_kernel(q32, k32, v32, assign, top, key_mask, scale, mass, rest) \
        if dispatch else None
    if fused:  # inference on the CPU: products and combination in one pass, no per-query copies
        out, assign = p.finish(fused(), q.dtype)
        return (out, assign) if return_clusters else out
    exact_top = clustered_topk(q32, k32, v32, assign, top, key_mask, scale)
    # mass and rest ride together through one per-query gather
    per_query = cluster_broadcast(torch.cat([mass.unsqueeze(-1), rest], dim=-1), assign)
    out, assign = p.finish(per_query[..., :1] * exact_top.reshape(b, h, n_q, e) + per_query[..., 1:], q.dtype)
    return (out, assign) if return_clusters else out


def _top_products(q, assign, k_top, v_top, key_ok, scale, c, tile: int | None = None):
    """Per-query softmax over its cluster's top keys, in tiles of queries that share a cluster.

    Queries are sorted by (sequence, head, cluster) and each cluster is cut into tiles of ``tile``
    queries (the last one zero-padded), so one batched product serves all clusters without ever
    forming an (n_q, topk, d) gather. Returns ``(b*h*n_q, d_v)`` rows ordered like q; rows of padded
    queries are zero.
    """
    b, h, n, d = q.shape
    e = v_top.shape[-1]
    real = (assign >= 0).reshape(-1)
    src = real.nonzero().flatten()  # flat positions of real queries
    group = (assign + torch.arange(b * h, device=q.device).reshape(b, h, 1) * c).reshape(-1)[src]
    order = torch.argsort(group, stable=True)
    src, group = src[order], group[order]
    size = torch.bincount(group, minlength=b * h * c)
    if tile is None:  # about the mean cluster size, so that padding at most doubles the rows
        mean_size = max(1, group.numel() // max(1, int((size > 0).sum())))
        tile = min(_TILE, 1 << (mean_size - 1).bit_length())
    tiles = (size + tile - 1) // tile
    first_tile = torch.cumsum(tiles, 0) - tiles
    first_query = torch.cumsum(size, 0) - size
    rank = torch.arange(group.numel(), device=q.device) - first_query[group]
    slot = first_tile[group] * tile + rank  # where each real query sits in the tiled layout
    n_tiles = int(tiles.sum())
    tile_group = torch.repeat_interleave(torch.arange(b * h * c, device=q.device), tiles)

    q_rows = torch.cat([q.reshape(-1, d), q.new_zeros(1, d)])  # last row: the zero filler
    take = torch.full((n_tiles * tile,), q_rows.shape[0] - 1, dtype=torch.long, device=q.device)
    take[slot] = src
    q_tiles = _rows(q_rows, take).reshape(n_tiles, tile, d)
    k_tiles = _rows(k_top, tile_group)  # (tiles, t, d)
    scores = torch.matmul(q_tiles, k_tiles.transpose(1, 2)) * scale  # (tiles, tile, t)
    if key_ok is not None:
        ok = key_ok[tile_group][:, None, :]
        scores = scores.masked_fill(~ok, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1) * ok.to(scores.dtype)
    else:
        weights = torch.softmax(scores, dim=-1)
    tiled = torch.matmul(weights, _rows(v_top, tile_group)).reshape(n_tiles * tile, e)
    return q.new_zeros(b * h * n, e).index_add(0, src, _rows(tiled, slot))


# --------------------------------------------------------------------------- naive reference
def clustered_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    clusters: int,
    topk: int | None = None,
    bits: int = 63,
    iterations: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    query_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    seed: int | None = None,
    clustering: str = "hamming",
) -> torch.Tensor:
    """Loop-per-sequence, loop-per-cluster definition of (improved, when ``topk`` is set) clustered attention.

    Hashes each sequence's real queries on its own, packs the bits, runs
    :func:`~.hashing.hamming_kmeans_reference` on popcounts (with ``clustering="queries"``:
    :func:`~.query_kmeans.query_kmeans_reference` on the queries), then attends cluster by cluster.
    Shapes as in :func:`clustered_attention`. Slow; for tests.
    """
    name = "clustered_attention_reference"
    check_qkv(q, k, v, name)
    _check_knobs(name, clusters, bits, iterations, seed, topk, clustering)
    iterations = _iterations(iterations, clustering)
    b, h, n_q, d = q.shape
    key_mask = check_padding_mask(key_padding_mask, b, k.shape[2], name, "key_padding_mask")
    query_mask = check_padding_mask(query_padding_mask, b, n_q, name, "query_padding_mask")
    scale = d**-0.5 if scale is None else float(scale)
    w, _ = draw_hyperplanes(d, bits, seed)
    u = draw_uniforms(clusters, seed) if clustering == "queries" else None
    out = q.new_zeros(b, h, n_q, v.shape[-1])
    for bi in range(b):
        real_q = query_mask[bi] if query_mask is not None else torch.ones(n_q, dtype=torch.bool)
        real_k = key_mask[bi] if key_mask is not None else torch.ones(k.shape[2], dtype=torch.bool)
        for hi in range(h):
            # non-finite values, as softmax confines them: a non-finite query gets a NaN row; a non-finite
            # key is left out, and a query whose score with it is not -inf gets a NaN row
            finite_q = torch.isfinite(q[bi, hi]).all(-1)
            finite_k = torch.isfinite(k[bi, hi]).all(-1)
            nan_rows = real_q & ~finite_q
            bad_k = real_k & ~finite_k
            qi = (real_q & finite_q).nonzero().flatten()
            ki = (real_k & finite_k).nonzero().flatten()
            if bad_k.any():
                bad_scores = q[bi, hi][qi] @ k[bi, hi][bad_k].T
                spoiled = (bad_scores != float("-inf")).any(-1) | (len(ki) == 0)
                nan_rows[qi[spoiled]] = True
            if len(qi) > 0 and len(ki) > 0:
                out[bi, hi] = _reference_sequence(q[bi, hi], k[bi, hi], v[bi, hi], qi, ki, w, bits, clusters,
                                                  iterations, scale, topk, u)
            out[bi, hi][nan_rows] = float("nan")
    return out


def _reference_sequence(q, k, v, qi, ki, w, bits, clusters, iterations, scale, topk, u=None):
    """One sequence and head of :func:`clustered_attention_reference`: rows ``qi`` attend over keys ``ki``;
    ``u``: the k-means++ uniforms when clustering the queries themselves, None for Hamming clustering."""
    out = q.new_zeros(q.shape[0], v.shape[-1])
    qs, ks, vs = q[qi], k[ki], v[ki]
    dt = torch.float64 if qs.dtype == torch.float64 else torch.float32
    if u is not None:
        assign = query_kmeans_reference(qs.to(dt), min(clusters, len(qi)), iterations, u)
    else:
        proj = qs.to(dt) @ w.to(dt)
        mean = qs.to(dt).mean(0) @ w.to(dt)  # planes through the queries' mean
        codes = pack_bits(proj > mean)
        assign = hamming_kmeans_reference(codes, bits, min(clusters, len(qi)), iterations)
    for c in assign.unique():
        members = (assign == c).nonzero().flatten()
        centroid = qs[members].mean(0)
        a = torch.softmax(centroid @ ks.T * scale, dim=-1)
        if topk is None:
            out[qi[members]] = a @ vs
            continue
        top = a.topk(min(topk, len(ki))).indices
        mass = a[top].sum()
        rest = a @ vs - a[top] @ vs[top]
        for m in members:
            p = torch.softmax(qs[m] @ ks[top].T * scale, dim=-1)
            out[qi[m]] = mass * (p @ vs[top]) + rest
    return out


# --------------------------------------------------------------------------- registry entries
@dataclass
class ClusteredAttentionParams:
    """Knobs of the ``clustered`` kind.

    Attributes:
        clusters: query clusters per sequence and head.
        bits: hash length (1 ... 1024).
        iterations: Lloyd rounds of k-means; None: 10 for ``"hamming"``, 1 for ``"queries"``.
        seed: hyperplane seed (k-means++ seed with ``clustering="queries"``). The default 0 makes a patched
            pretrained model give the same output on every forward (and the same vector for a text
            whatever batch it is in); None draws new planes each forward, like the original library.
        clustering: ``"hamming"`` (k-means on LSH codes, the paper's) or ``"queries"`` (Euclidean
            k-means on the queries: closer to exact attention, costlier clustering; ``bits`` unused).
    """

    clusters: int = 100
    bits: int = 63
    iterations: int | None = None
    seed: int | None = 0
    clustering: str = "hamming"

    def __post_init__(self) -> None:
        _check_knobs(type(self).__name__, self.clusters, self.bits, self.iterations, self.seed,
                     clustering=self.clustering)


@dataclass
class ImprovedClusteredAttentionParams(ClusteredAttentionParams):
    """Knobs of the ``improved-clustered`` kind: those of ``clustered`` plus ``topk`` keys re-scored per query."""

    topk: int = 32

    def __post_init__(self) -> None:
        _check_int(self.topk, type(self).__name__, "topk", 1)  # None is not "no top-k" here: refuse it
        _check_knobs(type(self).__name__, self.clusters, self.bits, self.iterations, self.seed, self.topk,
                     self.clustering)


def _no_causal(causal: bool, kind: str) -> None:
    if causal:
        raise ValueError(
            f"attention kind {kind!r} has no causal variant (only non-causal clustered attention is "
            "implemented); use it in encoders, or pick a kind with causal support such as 'linear'"
        )


def _forward_clustered(q, k, v, params: ClusteredAttentionParams, *, causal=False, key_padding_mask=None,
                       query_padding_mask=None, scale=None, module=None):
    _no_causal(causal, "clustered")
    return clustered_attention(q, k, v, clusters=params.clusters, bits=params.bits, iterations=params.iterations,
                               key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
                               scale=scale, seed=params.seed, clustering=params.clustering)


def _forward_improved(q, k, v, params: ImprovedClusteredAttentionParams, *, causal=False, key_padding_mask=None,
                      query_padding_mask=None, scale=None, module=None):
    _no_causal(causal, "improved-clustered")
    return improved_clustered_attention(q, k, v, clusters=params.clusters, topk=params.topk, bits=params.bits,
                                        iterations=params.iterations, key_padding_mask=key_padding_mask,
                                        query_padding_mask=query_padding_mask, scale=scale, seed=params.seed,
                                        clustering=params.clustering)


register_attention_kind(
    AttentionKind(
        name="clustered",
        params_class=ClusteredAttentionParams,
        forward=_forward_clustered,
        supports_causal=False,
        description="clustered attention: queries grouped by LSH + Hamming k-means, centroids attend, O(N C)",
    )
)
register_attention_kind(
    AttentionKind(
        name="improved-clustered",
        params_class=ImprovedClusteredAttentionParams,
        forward=_forward_improved,
        supports_causal=False,
        description="improved clustered attention: clustered plus exact scores on each cluster's top-k keys",
    )
)
