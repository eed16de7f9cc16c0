"""Linear attention ("Transformers are RNNs", Katharopoulos et al., ICML 2020).

softmax(q k^T) v is replaced by phi(q) (phi(k)^T v) / (phi(q) . sum_j phi(k_j)), which costs
O(N d m) instead of O(N^2 d). Three forms, one result:

* non-causal: two matrix products with the summed state (for elu/relu on the CPU, a kernel that applies the
  map itself: one pass over the keys, one over the queries);
* causal, chunked-parallel (training and prefill): within a chunk of C tokens a masked C x C
  product, across chunks a carried state; memory O(N C + (N / C) m d_v), never N x m x d_v;
* causal, recurrent (decoding): ``state += phi(k_t) v_t^T``, constant work per token.

In the PyTorch causal forms the normaliser rides along as an extra column of ones appended to v,
so numerator and denominator come out of the same products; the compiled CPU kernel fuses it, and
applies the built-in elu/relu maps to each chunk as it loads it. Everything accumulates in float32
(float64 stays float64) whatever the input dtype; the output is cast back to the input dtype.
FAVOR features are evaluated with stabilising shifts (see below), so inputs of large norm do not
underflow to all-zero rows.
:func:`linear_attention_reference` is the quadratic definition the fast forms are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

# The optional compiled kernels (remote code, shipped without them, sets this to None).
from hf_efficient_kernels import dispatch

from ._checks import check_padding_mask, check_qkv, check_scale
from .feature_maps import (
    FEATURE_MAPS,
    EluFeatureMap,
    FavorFeatureMap,
    ReluFeatureMap,
    _compute_dtype,
    resolve_feature_maps,
)
from .registry import AttentionKind, register_attention_kind

__all__ = [
    "LinearAttentionParams",
    "LinearAttentionState",
    "causal_linear",
    "causal_linear_chunked",
    "causal_linear_feature_map",
    "causal_linear_feature_map_reference",
    "causal_linear_normalized",
    "causal_linear_normalized_reference",
    "causal_linear_recurrent",
    "fold_favor_scale",
    "linear_attention",
    "linear_attention_decode",
    "linear_attention_reference",
    "linear_attention_step",
]


class LinearAttentionState(NamedTuple):
    """The recurrent state of causal linear attention for one layer.

    kv: ``(batch, heads, m, d_v)`` = sum_j phi(k_j) v_j^T; k_sum: ``(batch, heads, m)`` = sum_j phi(k_j).
    key_shift: ``(batch, heads, m)`` or None. Only the ``favor`` feature map sets it: its key features
    are then stored as ``exp(log_phi(k_j) - key_shift)`` (per feature, the largest exponent seen so far),
    so that keys of large norm do not underflow to zero. Its size does not depend on how many tokens
    were seen.
    """

    kv: torch.Tensor
    k_sum: torch.Tensor
    key_shift: torch.Tensor | None = None

    def packed(self) -> torch.Tensor:
        """``(batch, heads, m, d_v + 1)``: kv with k_sum as the last column (key_shift is not included)."""
        return torch.cat([self.kv, self.k_sum.unsqueeze(-1)], dim=-1)

    @staticmethod
    def unpack(packed: torch.Tensor, key_shift: torch.Tensor | None = None) -> LinearAttentionState:
        return LinearAttentionState(packed[..., :-1], packed[..., -1], key_shift)

    def map(self, fn) -> LinearAttentionState:
        """Apply ``fn`` to every tensor (batch selection, device moves)."""
        return LinearAttentionState(*(fn(t) if t is not None else None for t in self))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self if t is not None)


def _check_state(state, b: int, h: int, m: int, d_v: int, device: torch.device, name: str, what: str) -> None:
    """A state must have been built for this batch, head count, feature size and value size: a tensor of
    another size would otherwise broadcast into a silently wrong answer."""
    if not isinstance(state, LinearAttentionState):
        raise TypeError(f"{name}: {what} must be a LinearAttentionState or None, got {type(state).__name__}")
    expected = {"kv": (b, h, m, d_v), "k_sum": (b, h, m), "key_shift": (b, h, m)}
    for field, shape in expected.items():
        t = getattr(state, field)
        if t is None and field == "key_shift":
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: {what}.{field} must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name}: {what}.{field} has shape {tuple(t.shape)}, but these inputs need {shape} "
                "(batch, heads, features[, value dim]); a state only continues the sequence it was built on"
            )
        if t.device != device:
            raise ValueError(f"{name}: {what}.{field} is on {t.device}, the inputs on {device}")


# --------------------------------------------------------------------------- products on features
def causal_linear_chunked(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int = 64,
    initial: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal sum ``y_i = sum_{j <= i} (phi_q_i . phi_k_j) v_j`` in chunked-parallel form.

    Args:
        phi_q, phi_k: ``(batch, heads, n, m)`` features.
        v: ``(batch, heads, n, e)``.
        chunk_size: C; work is O(n C m) inside chunks plus O(n m e) across them.
        initial: optional ``(batch, heads, m, e)`` state of earlier tokens.

    Returns:
        y ``(batch, heads, n, e)`` and the final state ``(batch, heads, m, e)``.
    """
    b, h, n, m = phi_q.shape
    e = v.shape[-1]
    c = max(1, min(chunk_size, n))
    pad = (-n) % c
    if pad:  # zero keys add nothing to any state; zero queries give rows that are cut off below
        phi_q = torch.nn.functional.pad(phi_q, (0, 0, 0, pad))
        phi_k = torch.nn.functional.pad(phi_k, (0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    nc = (n + pad) // c
    q = phi_q.reshape(b, h, nc, c, m)
    k = phi_k.reshape(b, h, nc, c, m)
    vc = v.reshape(b, h, nc, c, e)

    kv = torch.matmul(k.transpose(-1, -2), vc)  # (b, h, nc, m, e): each chunk's contribution
    # State of all tokens before each chunk. A running sum over chunks is faster on CPU than
    # torch.cumsum along a middle dimension, and it is the same O(N / C) sequence of adds.
    acc = initial if initial is not None else kv.new_zeros(b, h, m, e)
    before = []
    for i in range(nc):
        before.append(acc)
        acc = acc + kv[:, :, i]
    scores = torch.matmul(q, k.transpose(-1, -2)).tril_()  # (b, h, nc, c, c), causal inside the chunk
    y = _masked_product(scores, vc).add_(torch.matmul(q, torch.stack(before, dim=2)))
    return y.reshape(b, h, nc * c, e)[:, :, :n], acc


def _masked_product(scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``scores @ v`` for lower-triangular scores ``(..., c, c)`` and v ``(..., c, e)``, where a non-finite
    value spoils only the rows that see it: a plain product would multiply it by the zeros above the
    diagonal (0 * nan = nan) and spoil the earlier rows of its chunk too."""
    finite = torch.isfinite(v)
    if bool(finite.all()):
        return torch.matmul(scores, v)
    y = torch.matmul(scores, v.masked_fill(~finite, 0.0))
    # row i, column f sees a non-finite value if some j <= i of its chunk holds one (with nonzero weight)
    seen = torch.matmul((scores != 0).to(v.dtype), (~finite).to(v.dtype)) > 0
    return y.masked_fill(seen, float("nan"))


def causal_linear_recurrent(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, initial: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same causal sum as :func:`causal_linear_chunked`, one token at a time (the RNN form).

    Shapes as in :func:`causal_linear_chunked`. O(1) work and memory per token in n.
    """
    b, h, n, m = phi_q.shape
    state = initial if initial is not None else phi_q.new_zeros(b, h, m, v.shape[-1])
    outs = []
    for t in range(n):
        state = state + phi_k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhm,bhme->bhe", phi_q[:, :, t], state))
    return torch.stack(outs, dim=2), state


def causal_linear_normalized_reference(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    eps: float = 1e-6,
    initial: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention with its normaliser, ``out_i = num_i / (den_i + eps)``, in PyTorch.

    The normaliser rides as a column of ones appended to v through :func:`causal_linear_chunked`.
    This is the path the fused kernel (:func:`causal_linear_normalized`) is tested against and falls
    back to.

    Args:
        phi_q, phi_k: ``(batch, heads, n, m)`` features; v: ``(batch, heads, n, d_v)``.
        initial: optional packed state ``(batch, heads, m, d_v + 1)`` (k_sum as the last column).

    Returns:
        out ``(batch, heads, n, d_v)`` and the final packed state ``(batch, heads, m, d_v + 1)``.
    """
    y, state = causal_linear_chunked(phi_q, phi_k, _with_ones(v), chunk_size, initial)
    return (y[..., :-1] / (y[..., -1:] + eps)).to(v.dtype), state


# --------------------------------------------------------------------------- compiled kernel, else PyTorch
# hf_efficient_kernels.dispatch checks the inputs and hands back the compiled kernel when one runs here
# (implementation=/HF_EFFICIENT_KERNELS decide); otherwise the PyTorch function above runs.
def causal_linear(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int = 64,
    initial: torch.Tensor | None = None,
    *,
    implementation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`causal_linear_chunked` through the compiled kernel where one runs.

    Args:
        phi_q, phi_k: ``(batch, heads, n, m)`` features; v: ``(batch, heads, n, e)``.
        chunk_size: the PyTorch path's block size (the kernel picks its own blocking).
        initial: optional ``(batch, heads, m, e)`` state of earlier tokens.
        implementation: ``"auto"``, ``"reference"`` or ``"kernel"``; None reads ``HF_EFFICIENT_KERNELS``.

    Returns:
        y ``(batch, heads, n, e)`` and the final state ``(batch, heads, m, e)``.
    """
    kernel = dispatch.causal_linear_kernel(phi_q, phi_k, v, initial, implementation=implementation) \
        if dispatch else None
    return kernel() if kernel else causal_linear_chunked(phi_q, phi_k, v, chunk_size, initial)


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
    """:func:`causal_linear_normalized_reference` through the compiled kernel (normaliser fused) where one runs.

    Arguments and result as there, plus ``implementation`` as in :func:`causal_linear`.
    """
    kernel = dispatch.causal_linear_normalized_kernel(phi_q, phi_k, v, eps, initial, implementation=implementation) \
        if dispatch else None
    return kernel() if kernel else causal_linear_normalized_reference(phi_q, phi_k, v, eps, initial, chunk_size)


def causal_linear_feature_map(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str,
    eps: float = 1e-6,
    initial: torch.Tensor | None = None,
    chunk_size: int = 64,
    key_mask: torch.Tensor | None = None,
    *,
    implementation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal normalised linear attention with a built-in map (``elu``, ``relu``) the CPU kernel applies to
    each chunk itself; elsewhere the map's features go through :func:`causal_linear_normalized`.

    Args:
        q, k: ``(batch, heads, n, d)`` raw queries and keys; v: ``(batch, heads, n, d_v)``.
        feature_map: ``"elu"`` (elu(x) + 1) or ``"relu"``.
        eps: added to the normaliser; chunk_size: the PyTorch path's block size.
        initial: optional packed ``(batch, heads, d, d_v + 1)`` state (k_sum as the last column).
        key_mask: optional ``(batch, n)`` bool, False = padded key.
        implementation: as in :func:`causal_linear`.

    Returns:
        out ``(batch, heads, n, d_v)`` in float32 (float64 for float64 inputs) and the final packed state.
    """
    kernel = dispatch.causal_linear_feature_map_kernel(q, k, v, feature_map, eps, initial, key_mask,
                                                       implementation=implementation) if dispatch else None
    if kernel:
        return kernel()
    fmap = FEATURE_MAPS[feature_map](q.shape[-1])
    phi_q, phi_k, vf = _features(q, k, v, fmap, fmap, key_mask, "causal_linear_feature_map")
    return causal_linear_normalized(phi_q, phi_k, vf, eps, initial, chunk_size, implementation=implementation)


# --------------------------------------------------------------------------- favor, stabilised
# FAVOR features exp(l) with l = W x' - |x'|^2 / 2 underflow for inputs of large norm (|q| ~ 48 at d = 64
# gives l ~ -144: every feature is 0 in float32 and the output row is 0). The estimator's weight of key j
# for query i is sum_r exp(a_ir + b_jr) (a, b the query and key exponents), so
#   * a per-feature shift B_r moves freely between the two sides: exp(a_ir + B_r) exp(b_jr - B_r);
#   * a per-query shift t_i cancels between numerator and normaliser.
# With B_ir = max_{j <= i} b_jr (the largest key exponent the query sees, per feature; over all keys when
# not causal) and t_i = max_r (a_ir + B_ir), key features are <= 1, query features <= 1, and the largest
# term of the normaliser is exactly 1, so eps stays negligible (relative size <= eps) at any norm. The
# output is out_i = num_i / (den_i + eps) with num, den taken at that scale, in every form: the quadratic
# reference, the parallel and chunked forms and the recurrent step, whose state stores kv at the
# per-feature shift B (LinearAttentionState.key_shift). The shifts are constants for autograd (they change
# the result only through eps). A NaN key exponent is left out of the shifts, so it spoils only the rows
# that see the key; a NaN query spoils only its own row.
_NEG_INF = float("-inf")


def _fused_name(q_map, k_map) -> str | None:
    """``"elu"`` / ``"relu"`` when both maps are that built-in map (which kernels can apply themselves)."""
    for cls, name in ((EluFeatureMap, "elu"), (ReluFeatureMap, "relu")):
        if type(q_map) is cls and type(k_map) is cls:
            return name
    return None


def _is_favor(q_map, k_map) -> bool:
    return isinstance(q_map, FavorFeatureMap) and isinstance(k_map, FavorFeatureMap)


def _finite_or_zero(shift: torch.Tensor) -> torch.Tensor:
    """-inf (no key seen yet) -> 0, so that exp(b - shift) of a padded key is exp(-inf) = 0, never NaN."""
    return torch.where(torch.isneginf(shift), torch.zeros_like(shift), shift)


def _rescale(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """exp(old - new) for moving a state from shift ``old`` to ``new >= old``; 0 where nothing was stored."""
    return torch.where(torch.isneginf(old), torch.zeros_like(old), torch.exp(old - _finite_or_zero(new)))


def _shift_values(b: torch.Tensor) -> torch.Tensor:
    """Key exponents as they enter the shifts: detached, NaN left out (as -inf)."""
    b = b.detach()
    return torch.where(torch.isnan(b), torch.full_like(b, _NEG_INF), b)


def _favor_logits(q, k, q_map, k_map, mask, name):
    a, b = q_map.log_features(q), k_map.log_features(k)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{name}: query and key feature maps give different sizes ({a.shape[-1]} vs {b.shape[-1]})")
    if mask is not None:  # a padded key contributes nothing: exp(-inf) = 0
        b = b.masked_fill(~mask[:, None, :, None], _NEG_INF)
    return a, b


def _favor_causal_chunked(a, b, v, eps, chunk_size, initial=None, initial_shift=None):
    """Causal FAVOR attention from exponents, chunked-parallel form with per-chunk shifts.

    a, b: ``(batch, heads, n, m)`` query/key exponents; v ``(batch, heads, n, d_v)``; initial: packed
    ``(batch, heads, m, d_v + 1)`` state at shift ``initial_shift`` ``(batch, heads, m)``.
    Returns out ``(batch, heads, n, d_v)``, the packed state and its shift.

    Inside chunk c keys and queries use the shift M_c of the chunk's last token (>= each row's own B_i,
    so nothing overflows); each row's eps is moved to that scale, which gives exactly the result at the
    row's own shift. The carried state is rescaled by exp(M_{c-1} - M_c) <= 1 from chunk to chunk.
    """
    bsz, h, n, m = a.shape
    v1 = _with_ones(v)
    e = v1.shape[-1]
    if n == 0:
        empty_shift = torch.full((bsz, h, m), _NEG_INF, dtype=v1.dtype, device=v1.device)
        return (v1.new_zeros(bsz, h, 0, e - 1), initial if initial is not None else v1.new_zeros(bsz, h, m, e),
                initial_shift if initial_shift is not None else empty_shift)
    c = max(1, min(chunk_size, n))
    pad = (-n) % c
    if pad:  # padded keys have exponent -inf (weight 0); padded rows are cut off below
        a = torch.nn.functional.pad(a, (0, 0, 0, pad))
        b = torch.nn.functional.pad(b, (0, 0, 0, pad), value=_NEG_INF)
        v1 = torch.nn.functional.pad(v1, (0, 0, 0, pad))
    nc = (n + pad) // c
    keys = _shift_values(b)
    if initial_shift is not None:
        keys = torch.cat([initial_shift[:, :, None].to(keys.dtype), keys], dim=2)
    shift = torch.cummax(keys, dim=2).values  # B_i, per feature
    if initial_shift is not None:
        shift = shift[:, :, 1:]
    row_shift = (a.detach() + _finite_or_zero(shift)).amax(-1)  # t_i, the scale the result is defined at
    chunk_shift = shift.reshape(bsz, h, nc, c, m)[:, :, :, -1]  # M_c, (b, h, nc, m)
    m_c = _finite_or_zero(chunk_shift)[:, :, :, None]
    ac = a.reshape(bsz, h, nc, c, m)
    t_c = (ac.detach() + m_c).amax(-1, keepdim=True)  # >= t_i for every row of the chunk
    qf = torch.exp(ac + m_c - t_c)
    kf = torch.exp(b.reshape(bsz, h, nc, c, m) - m_c)
    vc = v1.reshape(bsz, h, nc, c, e)
    kv = torch.matmul(kf.transpose(-1, -2), vc)
    acc = initial.to(kv.dtype) if initial is not None else kv.new_zeros(bsz, h, m, e)
    prev = (initial_shift.to(kv.dtype) if initial_shift is not None
            else torch.full((bsz, h, m), 0.0 if initial is not None else _NEG_INF, dtype=kv.dtype, device=kv.device))
    before = []
    for i in range(nc):
        acc = acc * _rescale(prev, chunk_shift[:, :, i])[..., None]
        before.append(acc)
        acc = acc + kv[:, :, i]
        prev = chunk_shift[:, :, i]
    scores = torch.matmul(qf, kf.transpose(-1, -2)).tril_()
    y = _masked_product(scores, vc).add_(torch.matmul(qf, torch.stack(before, dim=2)))
    y = y.reshape(bsz, h, nc * c, e)[:, :, :n]
    eps_scaled = eps * torch.exp(row_shift - t_c.reshape(bsz, h, nc * c))[:, :, :n, None]
    return y[..., :-1] / (y[..., -1:] + eps_scaled), acc, prev


def _favor_recurrent(a, b, v, eps, initial=None, initial_shift=None):
    """The same as :func:`_favor_causal_chunked`, one token at a time (the decoding form)."""
    bsz, h, n, m = a.shape
    v1 = _with_ones(v)
    acc = initial.to(v1.dtype) if initial is not None else v1.new_zeros(bsz, h, m, v1.shape[-1])
    shift = (initial_shift.to(v1.dtype) if initial_shift is not None
             else torch.full((bsz, h, m), 0.0 if initial is not None else _NEG_INF, dtype=v1.dtype, device=v1.device))
    outs = []
    for t in range(n):
        new = torch.maximum(shift, _shift_values(b[:, :, t]))
        safe = _finite_or_zero(new)
        acc = acc * _rescale(shift, new)[..., None] + torch.exp(b[:, :, t] - safe)[..., None] * v1[:, :, t, None, :]
        shift = new
        a_t = a[:, :, t]
        phi_q = torch.exp(a_t + safe - (a_t.detach() + safe).amax(-1, keepdim=True))
        y = torch.einsum("bhm,bhme->bhe", phi_q, acc)
        outs.append(y[..., :-1] / (y[..., -1:] + eps))
    return torch.stack(outs, dim=2), acc, shift


def _favor_parallel(a, b, v, eps):
    """Non-causal FAVOR attention from exponents: one shift per feature over all keys."""
    shift = _finite_or_zero(_shift_values(b).amax(dim=2, keepdim=True))  # (b, h, 1, m)
    phi_q = torch.exp(a + shift - (a.detach() + shift).amax(-1, keepdim=True))
    phi_k = torch.exp(b - shift)
    y = torch.matmul(phi_q, torch.matmul(phi_k.transpose(-1, -2), _with_ones(v)))
    return y[..., :-1] / (y[..., -1:] + eps)


def _favor_quadratic(a, b, v, eps, causal):
    """Quadratic definition: w_ij = exp(logsumexp_r(a_ir + b_jr) - t_i), out = w v / (w 1 + eps)."""
    keys = _shift_values(b)
    shift = torch.cummax(keys, dim=2).values if causal else keys.amax(dim=2, keepdim=True)
    row_shift = (a.detach() + _finite_or_zero(shift)).amax(-1, keepdim=True)
    scores = torch.exp(torch.logsumexp(a[..., :, None, :] + b[..., None, :, :], dim=-1) - row_shift)
    if causal:
        n_q, n_k = scores.shape[-2:]
        future = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, 0.0)
    y = scores @ _with_ones(v)
    return y[..., :-1] / (y[..., -1:] + eps)


def causal_linear_feature_map_reference(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`causal_linear_feature_map` on its PyTorch path only: the built-in map (``elu``/``relu``) in
    float32 (float64 stays float64), then :func:`causal_linear_normalized_reference`. Same arguments."""
    return causal_linear_feature_map(*args, **kwargs, implementation="reference")


# --------------------------------------------------------------------------- public functions
def _prepare(q, k, v, feature_map, key_padding_mask, name):
    """Checks, then ``(q_map, k_map, mask, compute dtype)``."""
    check_qkv(q, k, v, name)
    b, h, _, d = q.shape
    mask = check_padding_mask(key_padding_mask, b, k.shape[2], name, "key_padding_mask")
    q_map, k_map = resolve_feature_maps(feature_map, d, h)
    return q_map, k_map, mask


def _features(q, k, v, q_map, k_map, mask, name):
    phi_q, phi_k = q_map(q), k_map(k)
    if phi_q.shape[-1] != phi_k.shape[-1]:
        raise ValueError(
            f"{name}: query and key feature maps give different sizes ({phi_q.shape[-1]} vs {phi_k.shape[-1]})"
        )
    if mask is not None:  # a padded key contributes nothing to any sum
        phi_k = phi_k * mask[:, None, :, None].to(phi_k.dtype)
    return phi_q, phi_k, v.to(phi_k.dtype)


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """Append the column of ones that carries the normaliser through the products."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _check_eps(eps: float, name: str) -> None:
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"{name}: eps must be a finite positive number, got {eps!r}")


def _check_chunk(chunk_size, name: str) -> None:
    if isinstance(chunk_size, bool) or not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}")


def _state_in(state, q, phi_dim, d_v, favor, dtype, name, what):
    """Check a state and return ``(packed, key_shift)`` in the compute dtype (None, None without one)."""
    if state is None:
        return None, None
    b, h = q.shape[:2]
    _check_state(state, b, h, phi_dim, d_v, q.device, name, what)
    if state.key_shift is not None and not favor:
        raise ValueError(f"{name}: {what} was built with the favor feature map (it has a key_shift); "
                         "continue it with the same feature map")
    shift = state.key_shift.to(dtype) if state.key_shift is not None else None
    return state.packed().to(dtype), shift


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    feature_map="elu",
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
    initial_state: LinearAttentionState | None = None,
    return_state: bool = False,
):
    """Linear attention, O(N) in sequence length.

    Args:
        q: ``(batch, heads, n_q, d)``.
        k: ``(batch, heads, n_k, d)``.
        v: ``(batch, heads, n_k, d_v)``.
        causal: query i attends keys j <= i (needs n_q == n_k).
        feature_map: a name (``elu``, ``relu``, ``favor``, ``hedgehog``), a module/callable, or a
            ``(query_map, key_map)`` pair. ``favor`` maps (:class:`FavorFeatureMap`) are evaluated with
            stabilising shifts, so inputs of any norm give non-zero rows (see the comment above).
        key_padding_mask: optional ``(batch, n_k)`` bool or 0/1; True/1 = real key (the Hugging
            Face ``attention_mask`` convention). Padded keys get exactly zero weight.
        eps: added to the normaliser; a query that sees no key gets a zero output.
        chunk_size: chunk length of the causal chunked form.
        initial_state: causal only: the state of earlier tokens (prefill after a prefix); it must have
            this batch size, head count, feature size and value size.
        return_state: causal only: also return the final :class:`LinearAttentionState`.

    Returns:
        ``(batch, heads, n_q, d_v)`` in the dtype of q (and the state if ``return_state``). An empty
        sequence gives an empty output (and the initial state unchanged). Non-finite inputs: a NaN/inf
        query spoils only its own row; a NaN/inf key spoils the rows that see it (all rows when not
        causal, the rows from it on when causal), as with softmax; a NaN/inf value spoils the rows
        that see its key (and, inside a chunk, the rows of that chunk before it too).
    """
    name = "linear_attention"
    _check_eps(eps, name)
    _check_chunk(chunk_size, name)
    q_map, k_map, mask = _prepare(q, k, v, feature_map, key_padding_mask, name)
    if not causal and (initial_state is not None or return_state):
        raise ValueError(f"{name}: initial_state/return_state need causal=True")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"{name}: causal attention needs as many queries as keys, got n_q={q.shape[2]}, n_k={k.shape[2]}"
        )
    favor = _is_favor(q_map, k_map)
    b, h, n_k, d_v = v.shape
    if favor:
        a, bk = _favor_logits(q, k, q_map, k_map, mask, name)
        dtype = a.dtype
        vf = v.to(dtype)
        init, init_shift = _state_in(initial_state, q, a.shape[-1], d_v, True, dtype, name, "initial_state")
        if not causal:
            out = _favor_parallel(a, bk, vf, eps) if n_k else vf.new_zeros(b, h, q.shape[2], d_v)
            return out.to(q.dtype)
        out, state, shift = _favor_causal_chunked(a, bk, vf, eps, chunk_size, init, init_shift)
        if n_k == 0 and init is None:  # nothing seen: keep "no key yet" rather than a zero-scale state
            shift = None
        out = out.to(q.dtype)
        return (out, LinearAttentionState.unpack(state, shift)) if return_state else out

    fused = _fused_name(q_map, k_map)
    if causal and fused is not None and n_k > 0:
        # elu/relu: the CPU kernel applies the feature map itself; padded keys get zero features there
        if mask is not None and bool(mask.all()):
            mask = None
        init, _ = _state_in(initial_state, q, q.shape[-1], d_v, False, _compute_dtype(q), name, "initial_state")
        out, state = causal_linear_feature_map(q, k, v, fused, eps, init, chunk_size, mask)
        out = out.to(q.dtype)
        return (out, LinearAttentionState.unpack(state)) if return_state else out
    if not causal and fused is not None:
        # elu/relu: one pass over the keys builds the state and key sum, one over the queries reads them, the
        # map applied inside the kernel (kernels/dispatch.py); None when no kernel runs here
        kernel = dispatch.linear_feature_map_kernel(q, fused) if dispatch else None
        if kernel is not None:
            return kernel(q, k, v, eps, None if mask is None or bool(mask.all()) else mask)
    phi_q, phi_k, vf = _features(q, k, v, q_map, k_map, mask, name)
    if not causal:
        if mask is not None:  # a padded key is skipped: even a non-finite value under it changes nothing
            vf = vf.masked_fill(~mask[:, None, :, None], 0.0)
        # Through the (b, h, m, d_v) state and the (b, h, m) key sum, without a column of ones: no
        # (b, h, n, d_v + 1) copies of v and of the output.
        kv = torch.matmul(phi_k.transpose(-1, -2), vf)
        den = torch.matmul(phi_q, phi_k.sum(2).unsqueeze(-1)).add_(eps)
        return torch.matmul(phi_q, kv).div_(den).to(q.dtype)  # in place: fresh tensors, no extra pass
    init, _ = _state_in(initial_state, q, phi_q.shape[-1], d_v, False, phi_q.dtype, name, "initial_state")
    if n_k == 0:
        state = init if init is not None else phi_q.new_zeros(b, h, phi_q.shape[-1], d_v + 1)
        out = q.new_zeros(b, h, 0, d_v)
    else:
        out, state = causal_linear_normalized(phi_q, phi_k, vf, eps, init, chunk_size)
        out = out.to(q.dtype)
    if return_state:
        return out, LinearAttentionState.unpack(state)
    return out


def linear_attention_step(
    state: LinearAttentionState | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map="elu",
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[LinearAttentionState, torch.Tensor]:
    """Recurrent causal decoding: feed T new tokens (usually 1) into the state.

    Args:
        state: the state from earlier tokens (same batch size, head count, feature and value sizes),
            or None to start.
        q, k: ``(batch, heads, T, d)``; v: ``(batch, heads, T, d_v)``. T = 0 returns the state
            unchanged (a zero state if None) and an empty output.
        key_padding_mask: optional ``(batch, T)``, True/1 = real token.

    Returns:
        ``(new_state, out)`` with out ``(batch, heads, T, d_v)``.
    """
    name = "linear_attention_step"
    _check_eps(eps, name)
    q_map, k_map, mask = _prepare(q, k, v, feature_map, key_padding_mask, name)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{name}: needs as many new queries as keys, got {q.shape[2]} and {k.shape[2]}")
    b, h, _, d_v = v.shape
    fused = _fused_name(q_map, k_map)
    if (fused is not None and isinstance(state, LinearAttentionState) and state.key_shift is None and q.shape[2] == 1
            and dispatch):
        # one decoding token with elu/relu: one compiled call (features, state update, read-out) that returns a
        # fresh state; None when it does not run here (then the PyTorch path below, which also checks the state)
        kernel = dispatch.linear_decode_step_kernel(q, k, v, state.kv, state.k_sum, fused, eps,
                                                    None if mask is None else mask[:, 0])
        if kernel is not None:
            out, packed = kernel()
            return LinearAttentionState.unpack(packed), out
    if _is_favor(q_map, k_map):
        a, bk = _favor_logits(q, k, q_map, k_map, mask, name)
        init, shift = _state_in(state, q, a.shape[-1], d_v, True, a.dtype, name, "state")
        out, new, new_shift = _favor_recurrent(a, bk, v.to(a.dtype), eps, init, shift)
        if state is None and q.shape[2] == 0:
            new_shift = None
        return LinearAttentionState.unpack(new, new_shift), out.to(q.dtype)
    phi_q, phi_k, vf = _features(q, k, v, q_map, k_map, mask, name)
    init, _ = _state_in(state, q, phi_q.shape[-1], d_v, False, phi_q.dtype, name, "state")
    if q.shape[2] == 0:
        new = init if init is not None else phi_q.new_zeros(b, h, phi_q.shape[-1], d_v + 1)
        return LinearAttentionState.unpack(new), q.new_zeros(b, h, 0, d_v)
    y, new = causal_linear_recurrent(phi_q, phi_k, _with_ones(vf), init)
    out = (y[..., :-1] / (y[..., -1:] + eps)).to(q.dtype)
    return LinearAttentionState.unpack(new), out


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    feature_map="elu",
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Quadratic definition: A = phi(q) phi(k)^T (masked), out = A v / (A 1 + eps). O(N^2) (O(N^2 m) for favor,
    whose weights are formed from the exponents with the shifts described above)."""
    name = "linear_attention_reference"
    q_map, k_map, mask = _prepare(q, k, v, feature_map, key_padding_mask, name)
    if _is_favor(q_map, k_map):
        a, bk = _favor_logits(q, k, q_map, k_map, mask, name)
        return _favor_quadratic(a, bk, v.to(a.dtype), eps, causal).to(q.dtype)
    phi_q, phi_k, vf = _features(q, k, v, q_map, k_map, mask, name)
    scores = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        scores = scores.tril()
    y = scores @ _with_ones(vf)
    return (y[..., :-1] / (y[..., -1:] + eps)).to(q.dtype)


# --------------------------------------------------------------------------- registry entry
@dataclass
class LinearAttentionParams:
    """Knobs of the ``linear`` kind.

    Attributes:
        feature_map: registry name of phi (``elu``, ``relu``, ``favor``, ``hedgehog``). A learnable
            map (``hedgehog``) is attached to each patched attention module, so it trains and saves.
        eps: normaliser epsilon.
        chunk_size: chunk length of the causal chunked form.
    """

    feature_map: str = "elu"
    eps: float = 1e-6
    chunk_size: int = 64

    def __post_init__(self) -> None:
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"unknown feature map {self.feature_map!r}; accepted: {', '.join(sorted(FEATURE_MAPS))}"
            )
        _check_eps(self.eps, "LinearAttentionParams")
        if not (isinstance(self.chunk_size, int) and self.chunk_size > 0):
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")


def fold_favor_scale(q: torch.Tensor, feature_map: str, scale: float | None) -> torch.Tensor:
    """``favor`` approximates ``exp(q.k / sqrt(d))``: a model's own softmax scale is folded into q.

    q: ``(batch, heads, seq, d)``; returned unchanged for every other feature map or when scale is None.
    """
    scale = check_scale(scale, "fold_favor_scale")
    if feature_map == "favor" and scale is not None:
        return q * (scale * q.shape[-1] ** 0.5)
    return q


def _knobs(q, params: LinearAttentionParams, scale, module, key_padding_mask) -> tuple[torch.Tensor, dict]:
    """The query with a favor map's scale folded in, and the keyword arguments of the kind's functions (a
    learned feature map lives on the attention module)."""
    feature_map = getattr(module, "hf_efficient_feature_map", None) or params.feature_map
    return fold_favor_scale(q, params.feature_map, scale), dict(
        feature_map=feature_map, key_padding_mask=key_padding_mask, eps=params.eps, chunk_size=params.chunk_size)


def _forward(q, k, v, params: LinearAttentionParams, *, causal=False, key_padding_mask=None,
             query_padding_mask=None, scale=None, module=None):
    q, knobs = _knobs(q, params, scale, module, key_padding_mask)
    return linear_attention(q, k, v, causal=causal, **knobs)


def linear_attention_decode(
    state: LinearAttentionState | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_size: int = 64,
    **knobs,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """Causal linear attention of T new tokens after ``state``: one recurrent step for T == 1 (decoding),
    the chunked form seeded with the state for T > 1 (prefill).

    q, k: ``(batch, heads, T, d)``; v: ``(batch, heads, T, d_v)``; knobs: ``feature_map``, ``key_padding_mask``
    (``(batch, T)``) and ``eps`` of :func:`linear_attention_step`. Returns out ``(batch, heads, T, d_v)`` and
    the state after these tokens.
    """
    if q.shape[2] == 1:
        new, out = linear_attention_step(state, q, k, v, **knobs)
        return out, new
    return linear_attention(q, k, v, causal=True, chunk_size=chunk_size, initial_state=state, return_state=True,
                            **knobs)


def _decode(state, q, k, v, params: LinearAttentionParams, *, key_padding_mask=None, scale=None, module=None):
    q, knobs = _knobs(q, params, scale, module, key_padding_mask)
    return linear_attention_decode(state, q, k, v, **knobs)


register_attention_kind(
    AttentionKind(
        name="linear",
        params_class=LinearAttentionParams,
        forward=_forward,
        supports_causal=True,
        decode=_decode,
        description="linear attention phi(q)(phi(k)^T v), O(N); causal chunked + recurrent decoding",
    )
)
