"""Locality-sensitive hashing of queries and Lloyd's k-means in Hamming space.

Used by clustered attention (:mod:`hf_efficient.attention.clustered`) to group similar queries.

* Hashing: ``bits`` random hyperplanes through the mean of the sequence's real queries. Bit j of
  query x is ``w_j . x > w_j . mean``: the Hamming distance of two codes tracks the angle between
  the queries seen from their mean (as random-hyperplane LSH does from the origin), and a shared
  offset of every query (common in attention) does not push all codes to the same side. Measured on
  the offline MiniLM (improved-clustered, 25 clusters, top-32, mean of 5 seeds, pooled cosine to the
  unpatched model; 4 Hamlet windows of 256 tokens / 2 of 512): through the mean 0.980 / 0.975,
  through the origin 0.977 / 0.972, with random offsets across the data's spread
  (``t_j = w_j . mean + std_j z_j``, still available through ``z``) 0.974 / 0.966.
* Codes are packed into int64 words (:func:`pack_bits`); the Hamming distance of two codes is the
  popcount of their xor (:func:`hamming_distance`, a byte lookup table since torch has no popcount).
* k-means: Lloyd's algorithm in Hamming space; a centre is the bitwise majority of its members.
  Start: farthest-first traversal (the first real query, then repeatedly the query farthest from every
  centre chosen so far), so that a run of duplicate queries takes one centre and distinct queries get
  the others. An empty centre (a duplicate centre ends up empty too: ties go to the lowest index) is
  re-seeded at each update with the query farthest from its own centre, the j-th empty centre taking
  the j-th farthest query; a query at distance 0 is never taken. Ties go to the lowest rank everywhere.

The fast k-means (:func:`hamming_kmeans`) computes the same Hamming distances as
``(bits - s_a . s_b) / 2`` with ``s = 2 * bit - 1``, one matrix product per round: torch's
element-wise int64 ops cost about 80x more on CPU than the product here, and the integer result is
the same (tests check both against :func:`hamming_kmeans_reference`, which uses packed popcounts).
"""

from __future__ import annotations

import torch

__all__ = [
    "MAX_BITS",
    "draw_hyperplanes",
    "hamming_distance",
    "hamming_kmeans",
    "hamming_kmeans_reference",
    "farthest_first_centres",
    "hash_queries",
    "initial_centre_ranks",
    "pack_bits",
    "popcount64",
    "reseed_empty_centres",
    "unpack_bits",
]

MAX_BITS = 1024

_POPCOUNT_BYTE = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
_BIT_WEIGHTS = torch.ones(64, dtype=torch.int64) << torch.arange(64, dtype=torch.int64)  # 1 << 63 wraps


def draw_hyperplanes(
    dim: int, bits: int, seed: int | None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random hyperplanes for :func:`hash_queries`.

    Returns ``w`` ``(dim, bits)`` and ``z`` ``(bits,)`` (optional offsets; clustered attention uses
    planes through the mean and ignores z), float32, both ``N(0, 1)``. With a ``seed``
    the draw is the same on every call and device; without one it comes from torch's global
    generator (a fresh draw each call, reproducible only through ``torch.manual_seed``).
    """
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
    w = torch.randn(dim, bits, generator=gen, dtype=torch.float32)
    z = torch.randn(bits, generator=gen, dtype=torch.float32)
    return w.to(device), z.to(device)


@torch.no_grad()
def hash_queries(
    q: torch.Tensor, valid: torch.Tensor | None, w: torch.Tensor, z: torch.Tensor | None = None
) -> torch.Tensor:
    """Hash queries with hyperplanes through their mean (see the module docstring).

    Args:
        q: ``(batch, heads, n, d)``.
        valid: ``(batch, n)`` or ``(batch, heads, n)`` bool, True = real query, or None (all real).
            Other queries (padded, or non-finite ones) take no part in the per-sequence statistics;
            their bits are meaningless.
        w: ``(d, bits)`` plane normals; z: optional ``(bits,)`` offsets of the planes from the mean, in
            units of the spread of each projection (None: planes through the mean).

    Returns:
        bool ``(batch, heads, n, bits)``.
    """
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q = q.to(dt)
    w = w.to(dt)
    # The projections' mean (and variance) follow from the queries' mean (and covariance): w is
    # linear, so the statistics cost O(n d^2) instead of touching every (query, bit) pair twice.
    if valid is not None and bool(valid.all()):
        valid = None  # nothing left out: skip the masking passes over q
    if valid is None:
        mean_q = q.mean(dim=2, keepdim=True)  # (b, h, 1, d)
        count = q.shape[2]
    else:
        m = valid[:, None, :, None] if valid.dim() == 2 else valid[..., None]
        q = torch.where(m, q, 0)  # a left-out row never reaches the statistics, even a non-finite one
        count = m.sum(dim=2, keepdim=True).clamp(min=1)
        mean_q = q.sum(dim=2, keepdim=True) / count
    threshold = torch.matmul(mean_q, w)  # (b, h, 1, bits)
    if z is not None:
        centred = q - mean_q if valid is None else torch.where(m, q - mean_q, 0)
        cov = torch.matmul(centred.transpose(-1, -2), centred) / count  # (b, h, d, d)
        var = (torch.matmul(cov, w) * w).sum(dim=-2, keepdim=True)  # (b, h, 1, bits) = w_j^T cov w_j
        threshold = threshold + var.clamp(min=0).sqrt() * z.to(dt)
    # GEMMs with a multiple of 64 output columns run about twice as fast as with 63: pad, then cut
    bits = w.shape[1]
    w_wide = torch.nn.functional.pad(w, (0, (-bits) % 64))
    return torch.matmul(q, w_wide)[..., :bits] > threshold


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack bool ``(..., n_bits)`` into int64 ``(..., ceil(n_bits / 64))``; bit i of word w is bit 64 w + i."""
    n_bits = bits.shape[-1]
    words = -(-n_bits // 64)
    padded = torch.nn.functional.pad(bits.long(), (0, words * 64 - n_bits))
    padded = padded.reshape(*bits.shape[:-1], words, 64)
    # distinct powers of two: the sum is an exact bitwise or, also for bit 63 (the sign bit)
    return (padded * _BIT_WEIGHTS.to(bits.device)).sum(dim=-1)


def unpack_bits(words: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int64 ``(..., W)`` -> bool ``(..., n_bits)``."""
    shifts = torch.arange(64, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # arithmetic shift still reads bit i correctly
    return bits.reshape(*words.shape[:-1], words.shape[-1] * 64)[..., :n_bits].bool()


def popcount64(x: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each int64 element (byte lookup table), shape kept."""
    if x.dtype != torch.int64:
        raise TypeError(f"popcount64 expects int64, got {x.dtype}")
    as_bytes = x.contiguous().unsqueeze(-1).view(torch.uint8)  # (..., 8)
    return _POPCOUNT_BYTE.to(x.device)[as_bytes.long()].sum(dim=-1)


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamming distance of packed codes: popcount of xor, summed over words. ``(..., W)`` -> ``(...)``."""
    return popcount64(torch.bitwise_xor(a, b)).sum(dim=-1)


def initial_centre_ranks(n_real: torch.Tensor, clusters: int) -> torch.Tensor:
    """Ranks (among a sequence's real queries) of ``clusters`` evenly spread queries: midpoints of equal slices.

    Depends only on the number of real queries. (The k-means starts farthest-first instead, see
    :func:`farthest_first_centres`.) ``n_real``: ``(s,)`` int64 -> ``(s, clusters)``.
    """
    i = torch.arange(clusters, device=n_real.device)
    return ((2 * i + 1)[None, :] * n_real[:, None]) // (2 * clusters)


def _fast_dtype(device: torch.device, n_bits: int) -> torch.dtype:
    # +-1 products are small integers: exact in bfloat16 up to 256 bits, and bf16 GEMMs are ~4x
    # faster where the CPU has native bf16 (float32 otherwise, exact up to 2**24).
    if n_bits > 256:
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16
    try:
        if torch.cpu._is_avx512_bf16_supported():
            return torch.bfloat16
    except AttributeError:  # private helper absent in some builds
        pass
    return torch.float32


@torch.no_grad()
def hamming_kmeans(bits: torch.Tensor, valid: torch.Tensor, clusters: int, iterations: int) -> torch.Tensor:
    """Lloyd's k-means in Hamming space for many sequences at once (start and re-seeding: module docstring).

    Args:
        bits: bool ``(s, n, n_bits)`` hash codes of s sequences (batch x heads flattened).
        valid: bool ``(s, n)``, True = real query.
        clusters: C. A sequence with at most C real queries puts each in its own cluster (rank order).
        iterations: Lloyd rounds (centre update + reassignment) after the first assignment; stops
            early once no assignment changes (a fixed point: more rounds would change nothing).

    Returns:
        int64 ``(s, n)`` cluster of each query in ``[0, C)``, -1 for padded queries.
    """
    s, n, n_bits = bits.shape
    n_real = valid.sum(dim=1)
    rank = valid.long().cumsum(dim=1) - 1
    own = n_real <= clusters  # each real query is its own cluster: exact attention
    assign = rank.clone()
    todo = (~own).nonzero().flatten()
    if todo.numel():
        assign[todo] = _lloyd(bits[todo], valid[todo], n_real[todo], clusters, iterations)
    return assign.masked_fill(~valid, -1)


def _lloyd(bits, valid, n_real, clusters, iterations):
    s = bits.shape[0]
    dt = _fast_dtype(bits.device, bits.shape[-1])
    # +-1 per bit, plus zero columns up to a multiple of 64 (faster GEMMs; zeros add nothing)
    signs = torch.nn.functional.pad(bits.to(dt) * 2 - 1, (0, (-bits.shape[-1]) % 64))  # (s, n, b')
    centres = farthest_first_centres(signs, valid, clusters)
    members = torch.where(valid[..., None], signs, 0).float().reshape(-1, signs.shape[-1])
    weight = valid.float().reshape(-1)
    offset = torch.arange(s, device=bits.device)[:, None] * clusters  # flat (sequence, cluster) index
    assign, agree = _nearest(signs, centres)
    for _ in range(iterations):
        flat = (assign + offset).reshape(-1)
        votes = members.new_zeros(s * clusters, members.shape[-1]).index_add_(0, flat, members)
        count = weight.new_zeros(s * clusters).index_add_(0, flat, weight)
        votes, count = votes.reshape(centres.shape), count.reshape(s, clusters)
        # majority bit of the members (a tie gives 0); an empty cluster is re-seeded
        majority = torch.where(votes > 0, 1.0, -1.0).to(dt)
        centres = torch.where(count[..., None] > 0, majority, centres)
        centres = reseed_empty_centres(signs, valid, agree, count == 0, centres, bits.shape[-1])
        new, agree = _nearest(signs, centres)
        if torch.equal(new[valid], assign[valid]):
            break
        assign = new
    return assign


def farthest_first_centres(signs: torch.Tensor, valid: torch.Tensor, clusters: int) -> torch.Tensor:
    """Farthest-first start of the k-means: ``(s, C, b)`` centres taken among the real queries.

    ``signs``: ``(s, n, b)`` +-1 codes (zero columns allowed), ``valid``: bool ``(s, n)``, each row with
    more than ``clusters`` real queries. Centre 0 is the first real query; centre c the real query with
    the fewest agreeing bits with its closest earlier centre (the farthest in Hamming distance), the
    first one on ties. One product per centre, about the cost of one assignment round.
    """
    s, n, _ = signs.shape
    rows = torch.arange(s, device=signs.device)
    pick = valid.to(torch.int8).argmax(dim=1)  # the first real query
    centres = [signs[rows, pick]]
    closest = torch.matmul(signs, centres[0][..., None])[..., 0].float()  # agreement with the closest centre
    for _ in range(1, clusters):
        pick = torch.where(valid, closest, float("inf")).argmin(dim=1)  # the first on ties
        centres.append(signs[rows, pick])
        closest = torch.maximum(closest, torch.matmul(signs, centres[-1][..., None])[..., 0].float())
    return torch.stack(centres, dim=1)


def reseed_empty_centres(signs: torch.Tensor, valid: torch.Tensor, agree: torch.Tensor, empty: torch.Tensor,
                         centres: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Move each empty centre onto a query far from its own centre.

    ``agree``: ``(s, n)`` agreement of each query with the centre it was assigned to (``n_bits`` - 2 x
    distance); ``empty``: bool ``(s, C)``. The j-th empty centre of a sequence (in index order) takes the
    j-th farthest real query (lowest rank first on ties) unless that query is at distance 0.
    """
    if not bool(empty.any()):
        return centres
    c = centres.shape[1]
    order = torch.argsort(torch.where(valid, agree.float(), float("inf")), dim=1, stable=True)[:, :c]
    slot = (empty.long().cumsum(dim=1) - 1).clamp(min=0)  # rank of each empty centre among the empty ones
    pick = order.gather(1, slot)  # (s, C) query positions
    far = torch.where(valid, agree.float(), float(n_bits)).gather(1, pick) < n_bits  # distance > 0
    chosen = signs.gather(1, pick[..., None].expand(-1, -1, signs.shape[-1])).to(centres.dtype)
    return torch.where((empty & far)[..., None], chosen, centres)


def _nearest(signs: torch.Tensor, centres: torch.Tensor, block: int = 1 << 18) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centre in Hamming distance (the first one on ties): the most agreeing signs.

    signs ``(s, n, b)``, centres ``(s, C, b)`` -> int64 ``(s, n)`` and the agreement with that centre,
    float32 ``(s, n)``. Works on blocks of queries whose ``(s, rows, C)`` agreement matrix (about
    ``block`` numbers) stays in cache.
    """
    s, n, n_bits = signs.shape
    c = centres.shape[1]
    # Agreements are integers in [-b, b]: pack (agreement, reversed index) into one exact float32
    # key, agreement * m + (m - 1 - j), and take a plain max, several times faster than argmax on
    # CPU. The largest key has the largest agreement and, among equals, the smallest j.
    m = 1 << max(0, (c - 1).bit_length())
    packed = (n_bits + 1) * m <= 1 << 24
    reverse = (m - 1 - torch.arange(c, device=signs.device)).float()
    rows = max(1, block // (s * c))
    centres_t = centres.transpose(1, 2)
    out = torch.empty(s, n, dtype=torch.long, device=signs.device)
    best = torch.empty(s, n, dtype=torch.float32, device=signs.device)
    for start in range(0, n, rows):  # blocks of queries, not single queries
        agree = torch.matmul(signs[:, start : start + rows], centres_t).float()
        if packed:
            key = agree.mul_(m).add_(reverse).amax(dim=-1)
            out[:, start : start + rows] = (m - 1) - torch.remainder(key, m).long()
            best[:, start : start + rows] = torch.div(key, m, rounding_mode="floor")
        else:
            top = agree.max(dim=-1)
            out[:, start : start + rows] = top.indices
            best[:, start : start + rows] = top.values
    return out, best


def hamming_kmeans_reference(
    codes: torch.Tensor, n_bits: int, clusters: int, iterations: int, stop_at_fixed_point: bool = True
) -> torch.Tensor:
    """Lloyd's k-means on the packed codes of one sequence's real queries, loops and popcounts.

    ``codes``: int64 ``(n, W)`` -> int64 ``(n,)`` clusters. Same start, re-seeding, tie rules and
    stopping as :func:`hamming_kmeans`; ``stop_at_fixed_point=False`` runs every round instead (the
    clusters must be the same: a test of the stop).
    """
    n = codes.shape[0]
    if n <= clusters:
        return torch.arange(n)
    chosen = [0]  # farthest-first: the first query, then the one farthest from all chosen so far
    far = hamming_distance(codes, codes[0][None])
    for _ in range(1, clusters):
        chosen.append(int(far.argmax()))  # the first on ties
        far = torch.minimum(far, hamming_distance(codes, codes[chosen[-1]][None]))
    centres = codes[chosen].clone()
    best, assign = hamming_distance(codes[:, None, :], centres[None, :, :]).min(dim=1)
    for _ in range(iterations):
        empty = []
        for c in range(clusters):
            member_bits = unpack_bits(codes[assign == c], n_bits)
            if len(member_bits):
                centres[c] = pack_bits(member_bits.double().mean(dim=0) > 0.5)
            else:
                empty.append(c)
        farthest = sorted(range(n), key=lambda i: -int(best[i]))  # stable: the lowest rank first on ties
        for c, i in zip(empty, farthest):
            if best[i] > 0:
                centres[c] = codes[i]
        best, new = hamming_distance(codes[:, None, :], centres[None, :, :]).min(dim=1)
        if stop_at_fixed_point and torch.equal(new, assign):
            break
        assign = new
    return assign
