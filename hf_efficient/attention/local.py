"""Local (sliding-window) softmax attention: each query attends only to nearby keys.

With window ``w``, query i attends with exact softmax to keys ``i - w < j <= i`` (causal) or
``|i - j| < w`` (bidirectional), and to nothing else. Queries are processed in blocks of ``w``;
a block only ever meets the keys of itself and its neighbouring blocks, so the cost is O(N w d) in
time and O(N w) in memory, never N x N. With ``w >= N`` it is ordinary softmax attention.

Decoding (causal) carries the last ``w - 1`` keys and values in a :class:`LocalState`: constant
memory and constant work per token, whatever the length of the text. :func:`local_attention` takes
the state of earlier tokens and returns the new one, so a prefill followed by one-token steps gives
the same outputs as one call over the whole sequence.

A query that sees no real key (all padded) gets a zero output, as in the other kinds.
:func:`local_attention_reference` is the quadratic definition the blocked form is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import check_padding_mask, check_qkv, check_scale, check_window
from .feature_maps import _compute_dtype
from .registry import AttentionKind, register_attention_kind

__all__ = ["LocalAttentionParams", "LocalState", "local_attention", "local_attention_reference"]

_NAME = "local_attention"


class LocalState(NamedTuple):
    """The last ``r <= window - 1`` tokens of a causal sequence: keys ``(batch, heads, r, d)``, values
    ``(batch, heads, r, d_v)`` and their padding mask ``(batch, r)`` (True = real token)."""

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor


def _allowed(i: torch.Tensor, j: torch.Tensor, window: int, causal: bool) -> torch.Tensor:
    """Band mask of query positions ``i`` ``(..., q, 1)`` against key positions ``j`` ``(..., 1, k)``."""
    if causal:
        return (j <= i) & (j > i - window)
    return (j - i).abs() < window


def _softmax_rows(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the allowed keys; a row with none gets zeros (not NaN)."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores - torch.where(m == float("-inf"), torch.zeros_like(m), m))
    return weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


def _blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor, window: int, causal: bool,
             scale: float) -> torch.Tensor:
    """Banded softmax attention; q, k ``(b, h, n, d)``, v ``(b, h, n, e)``, key_ok ``(b, n)`` -> ``(b, h, n, e)``.

    Query block t (positions ``t*w ... t*w + w - 1``) meets the keys of blocks t - 1, t (and t + 1
    when bidirectional): every key it may attend, and no other block's.
    """
    b, h, n, d = q.shape
    w = window
    blocks = -(-n // w)
    pad = blocks * w - n
    right = w if not causal else 0
    span = 2 * w + right  # keys seen by one query block
    qb = F.pad(q, (0, 0, 0, pad)).view(b, h, blocks, w, d)
    kp = F.pad(k, (0, 0, w, pad + right))
    vp = F.pad(v, (0, 0, w, pad + right))
    ok = F.pad(key_ok, (w, pad + right), value=False)
    # keys of query block t: padded positions t*w ... t*w + span - 1 (real positions (t-1)*w ...)
    kb = kp.unfold(2, span, w).transpose(-1, -2)  # (b, h, blocks, span, d)
    vb = vp.unfold(2, span, w).transpose(-1, -2)
    okb = ok.unfold(1, span, w)  # (b, blocks, span)
    i = torch.arange(w, device=q.device)[:, None]  # query offset inside its block
    j = torch.arange(span, device=q.device)[None, :] - w  # key offset relative to the block start
    allowed = _allowed(i, j, w, causal)[None, None] & okb[:, :, None, :]  # (b, blocks, w, span)
    weights = _softmax_rows(torch.matmul(qb, kb.transpose(-1, -2)) * scale, allowed[:, None])
    return torch.matmul(weights, vb).reshape(b, h, blocks * w, -1)[:, :, :n]


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    state: LocalState | None = None,
    return_state: bool = False,
):
    """Sliding-window softmax attention (see the module docstring).

    Args:
        q, k: ``(batch, heads, n, d)``; v: ``(batch, heads, n, d_v)``: n new tokens, in order.
        window: w >= 1. Causal: keys ``i - w < j <= i``; bidirectional: ``|i - j| < w``.
        causal: attend to earlier keys only.
        key_padding_mask: optional ``(batch, n)`` bool or 0/1, True/1 = real token (padded keys get zero weight).
        scale: softmax temperature on q.k; defaults to ``d ** -0.5``.
        state: causal only: the :class:`LocalState` of earlier tokens (prefill after a prefix, decoding).
        return_state: causal only: also return the state after these tokens.

    Returns:
        ``(batch, heads, n, d_v)`` in q's dtype (and the new state if ``return_state``).
    """
    check_qkv(q, k, v, _NAME)
    check_window(window, _NAME)
    check_scale(scale, _NAME)
    b, h, n, d = q.shape
    if k.shape[2] != n:
        raise ValueError(f"{_NAME}: needs as many queries as keys (self-attention), got {n} and {k.shape[2]}")
    if (state is not None or return_state) and not causal:
        raise ValueError(f"{_NAME}: state/return_state need causal=True (decoding carries past keys forward)")
    mask = check_padding_mask(key_padding_mask, b, n, _NAME, "key_padding_mask")
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=q.device)
    scale = d**-0.5 if scale is None else float(scale)
    dtype = _compute_dtype(q)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    if state is not None:
        keys, values, past = state
        if (keys.shape[:2] != (b, h) or keys.shape[-1] != d or values.shape[-1] != v.shape[-1]
                or keys.shape[2] != values.shape[2] or tuple(past.shape) != (b, keys.shape[2])):
            raise ValueError(f"{_NAME}: the state holds keys {tuple(keys.shape)}, values {tuple(values.shape)} and a "
                             f"mask {tuple(past.shape)}, which do not fit q {tuple(q.shape)}, v {tuple(v.shape)}")
        if keys.shape[2] > window - 1:
            raise ValueError(f"{_NAME}: the state holds {keys.shape[2]} past tokens, more than window - 1 = "
                             f"{window - 1}; it was built with a larger window")
        kf = torch.cat([keys.to(dtype), kf], dim=2)
        vf = torch.cat([values.to(dtype), vf], dim=2)
        mask = torch.cat([past.to(mask.device), mask], dim=1)
    if n == 0:  # nothing new: an empty output, and the state as it was
        out = q.new_zeros(b, h, 0, v.shape[-1])
        if not return_state:
            return out
        return out, state if state is not None else LocalState(k, v, mask)
    front = kf.shape[2] - n  # past tokens before the first new query
    qf = F.pad(qf, (0, 0, front, 0))
    out = _blocked(qf, kf, vf, mask, window, causal, scale)[:, :, front:].to(q.dtype)
    if not return_state:
        return out
    keep = slice(max(0, kf.shape[2] - (window - 1)), kf.shape[2])
    return out, LocalState(kf[:, :, keep].to(k.dtype), vf[:, :, keep].to(v.dtype), mask[:, keep])


def local_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Quadratic definition: the full ``(n, n)`` score matrix masked to the band, softmax, times v."""
    check_qkv(q, k, v, "local_attention_reference")
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    dtype = _compute_dtype(q)
    i = torch.arange(n, device=q.device)
    allowed = _allowed(i[:, None], i[None, :], window, causal)[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]
    weights = _softmax_rows(torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale, allowed)
    return torch.matmul(weights, v.to(dtype)).to(q.dtype)


# --------------------------------------------------------------------------- registry entry
@dataclass
class LocalAttentionParams:
    """Knobs of the ``local`` kind.

    Attributes:
        window: keys within this distance of the query are attended (the query's own included).
    """

    window: int = 128

    def __post_init__(self) -> None:
        check_window(self.window, "LocalAttentionParams")


def _forward(q, k, v, params: LocalAttentionParams, *, causal=False, key_padding_mask=None, query_padding_mask=None,
             scale=None, module=None):
    check_qkv(q, k, v, _NAME)
    n_q, n_k = q.shape[2], k.shape[2]
    if n_q < n_k:  # the queries are the last n_q positions (decoding without a recurrent cache)
        if not causal and n_q > 1:
            raise ValueError("attention kind 'local' needs as many queries as keys when bidirectional")
        q = torch.cat([q.new_zeros(*q.shape[:2], n_k - n_q, q.shape[3]), q], dim=2)
        causal = True
    out = local_attention(q, k, v, window=params.window, causal=causal, key_padding_mask=key_padding_mask,
                          scale=scale)
    return out[:, :, n_k - n_q:]


register_attention_kind(
    AttentionKind(
        name="local",
        params_class=LocalAttentionParams,
        forward=_forward,
        supports_causal=True,
        description="sliding-window softmax attention: keys within `window` positions, O(N w)",
    )
)
