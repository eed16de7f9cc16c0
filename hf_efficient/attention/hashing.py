"""Locality-sensitive hashing of queries and Lloyd's k-means in Hamming space.

Used by clustered attention (:mod:`hf_efficient.attention.clustered`) to group similar queries.

* Hashing: ``bits`` random hyperplanes, each with a bias. Bit j of query x is ``w_j . x > t_j``
  with the threshold ``t_j = mean_j + std_j * z_j``, where ``mean_j``/``std_j`` are the mean and
  standard deviation of ``w_j . x`` over the real queries of that sequence and ``z_j ~ N(0, 1)``.
  Planes through the origin only see the angle between two queries; an offset drawn across the
  spread of the data separates two queries with a chance that grows with ``|w_j . (x - y)|``, so
  the Hamming distance of the codes tracks their Euclidean distance.
* Codes are packed into int64 words (:func:`pack_bits`); the Hamming distance of two codes is the
  popcount of their xor (:func:`hamming_distance`, a byte lookup table since torch has no popcount).
* k-means: Lloyd's algorithm in Hamming space; a centre is the bitwise majority of its members.

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
    "hash_queries",
    "initial_centre_ranks",
    "pack_bits",
    "popcount64",
    "unpack_bits",
]

MAX_BITS = 1024

_POPCOUNT_BYTE = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
_BIT_WEIGHTS = torch.ones(64, dtype=torch.int64) << torch.arange(64, dtype=torch.int64)  # 1 << 63 wraps


def draw_hyperplanes(
    dim: int, bits: int, seed: int | None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random hyperplanes for :func:`hash_queries`.

    Returns ``w`` ``(dim, bits)`` and ``z`` ``(bits,)``, float32, both ``N(0, 1)``. With a ``seed``
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
    q: torch.Tensor, valid: torch.Tensor | None, w: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """Hash queries with biased hyperplanes (see the module docstring).

    Args:
        q: ``(batch, heads, n, d)``.
        valid: ``(batch, n)`` bool, True = real query, or None (all real). Padded queries take no
            part in the per-sequence statistics; their bits are meaningless.
        w: ``(d, bits)`` plane normals; z: ``(bits,)`` offsets in units of the data's spread.

    Returns:
        bool ``(batch, heads, n, bits)``.
    """
    # float64 input keeps float64 projections (tests); the statistics are float64 always, so that a
    # sequence's thresholds barely depend on how much padding surrounds it.
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    p = torch.matmul(q.to(dt), w.to(dt))  # (b, h, n, bits)
    p64 = p.double()
    if valid is None:
        mean = p64.mean(dim=2, keepdim=True)
        var = (p64 - mean).square().mean(dim=2, keepdim=True)
    else:
        m = valid[:, None, :, None]
        count = m.sum(dim=2, keepdim=True).clamp(min=1)
        p64 = torch.where(m, p64, 0.0)
        mean = p64.sum(dim=2, keepdim=True) / count
        var = torch.where(m, (p64 - mean).square(), 0.0).sum(dim=2, keepdim=True) / count
    threshold = mean + var.sqrt() * z.double()
    return p > threshold.to(dt)


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
    return bits.reshape(*words.shape[:-1], -1)[..., :n_bits].bool()


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
    """Ranks (among a sequence's real queries) of the initial centres: midpoints of ``clusters`` equal slices.

    Depends only on the number of real queries, so neither padding nor the other sequences of a
    batch move the start of k-means. ``n_real``: ``(s,)`` int64 -> ``(s, clusters)``.
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
    """Lloyd's k-means in Hamming space for many sequences at once.

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
    dt = _fast_dtype(bits.device, bits.shape[-1])
    signs = bits.to(dt) * 2 - 1  # (s, n, b) in {-1, +1}
    real_first = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    start = real_first.gather(1, initial_centre_ranks(n_real, clusters))  # (s, C) query positions
    centres = signs.gather(1, start[..., None].expand(-1, -1, signs.shape[-1]))
    members = torch.where(valid[..., None], signs, 0).float()
    weight = valid.float()
    assign = torch.matmul(signs, centres.transpose(1, 2)).argmax(dim=-1)  # max agreement = min distance
    for _ in range(iterations):
        votes = members.new_zeros(centres.shape).scatter_add_(
            1, assign[..., None].expand(-1, -1, members.shape[-1]), members
        )
        count = weight.new_zeros(centres.shape[:2]).scatter_add_(1, assign, weight)
        # majority bit of the members (a tie gives 0); an empty cluster keeps its centre
        majority = torch.where(votes > 0, 1.0, -1.0).to(dt)
        centres = torch.where(count[..., None] > 0, majority, centres)
        new = torch.matmul(signs, centres.transpose(1, 2)).argmax(dim=-1)
        if torch.equal(new[valid], assign[valid]):
            break
        assign = new
    return assign


def hamming_kmeans_reference(codes: torch.Tensor, n_bits: int, clusters: int, iterations: int) -> torch.Tensor:
    """Lloyd's k-means on the packed codes of one sequence's real queries, loops and popcounts.

    ``codes``: int64 ``(n, W)`` -> int64 ``(n,)`` clusters. Same initialisation, tie rules and
    stopping as :func:`hamming_kmeans`.
    """
    n = codes.shape[0]
    if n <= clusters:
        return torch.arange(n)
    start = initial_centre_ranks(torch.tensor([n]), clusters)[0]
    centres = codes[start].clone()
    assign = hamming_distance(codes[:, None, :], centres[None, :, :]).argmin(dim=1)
    for _ in range(iterations):
        for c in range(clusters):
            member_bits = unpack_bits(codes[assign == c], n_bits)
            if len(member_bits):
                centres[c] = pack_bits(member_bits.double().mean(dim=0) > 0.5)
        new = hamming_distance(codes[:, None, :], centres[None, :, :]).argmin(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign
