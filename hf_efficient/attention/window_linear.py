"""Sliding-window softmax inside, linear attention beyond: a causal kind that decodes in O(1).

For query i (causal), the ``window`` most recent keys ``i - w < j <= i`` get the softmax weight
``exp(s_ij - m_i)`` with ``s_ij = scale * q_i . k_j`` and ``m_i`` the largest of those scores; every
older key ``j <= i - w`` gets the linear-attention weight ``phi(q_i) . phi(k_j)``. One normaliser
covers both::

    out_i = (sum_window exp(s_ij - m_i) v_j + sum_older phi(q_i).phi(k_j) v_j)
            / (sum_window exp(s_ij - m_i)   + sum_older phi(q_i).phi(k_j) + eps)

The first ``window`` positions are therefore exact softmax attention, and local structure (which
carries most of a pretrained model's attention mass) stays exact everywhere, while the tail is a
linear-attention state. Decoding keeps the last ``window - 1`` keys and values plus one
``(m, d_v)`` state per head: constant memory, constant work per token.

Training/prefill cost is O(N w d) for the band (blocks of w queries against 2w keys) plus the
chunked causal linear product on keys shifted by w; never N x N.
:func:`window_linear_weights` forms the full N x N weight matrix: the quadratic reference, and
what attention transfer fits when linearising a pretrained model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import check_padding_mask, check_qkv, check_scale, check_window
from .feature_maps import FEATURE_MAPS, _compute_dtype, resolve_feature_maps
from .linear import (
    LinearAttentionState,
    _check_eps,
    _check_state,
    _with_ones,
    causal_linear,
)
from .registry import AttentionKind, register_attention_kind

__all__ = [
    "WindowLinearParams",
    "WindowLinearState",
    "window_linear_attention",
    "window_linear_attention_reference",
    "window_linear_weights",
]

_NAME = "window_linear_attention"


class WindowLinearState(NamedTuple):
    """What decoding carries from one call to the next, per layer.

    linear: :class:`LinearAttentionState` of every key that has left the window (None before any has).
    keys: ``(batch, heads, r, d)``, values: ``(batch, heads, r, d_v)``: the ``r <= window - 1`` most
    recent keys/values; mask: ``(batch, r)`` bool, False for padding; window: the window the state
    was built with (a state continues only with the same window). Size bounded by the window.
    """

    linear: LinearAttentionState | None
    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    window: int | None = None

    def map(self, fn) -> WindowLinearState:
        """Apply ``fn`` to every tensor (batch selection, device moves)."""
        linear = self.linear.map(fn) if self.linear is not None else None
        return WindowLinearState(linear, fn(self.keys), fn(self.values), fn(self.mask), self.window)

    def nbytes(self) -> int:
        linear = self.linear.nbytes() if self.linear is not None else 0
        return linear + sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.mask))


def _window_exp(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``exp(s - m)`` on the allowed keys (0 elsewhere), m = the row's largest allowed score; a row with
    no allowed key (a padded query's window) gets zeros instead of NaN."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    return torch.exp(scores - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))


def _band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor, window: int, scale: float):
    """Softmax part over the band: queries are the last ``n_q`` of the ``n`` key positions.

    q ``(b, h, n, d)`` (already front-padded to the key length), k ``(b, h, n, d)``, v ``(b, h, n, e)``,
    key_ok ``(b, n)`` bool. Returns the un-normalised sum ``(b, h, n, e)`` and its weights' sum
    ``(b, h, n)``, with weights ``exp(s - m)`` over ``i - w < j <= i``.
    """
    b, h, n, d = q.shape
    w = window
    blocks = -(-n // w)
    pad = blocks * w - n
    qb = F.pad(q, (0, 0, 0, pad)).view(b, h, blocks, w, d)
    # keys of block t and block t - 1: query i = t*w + a sees keys (t-1)*w + c with a < c <= a + w.
    kp = F.pad(k, (0, 0, w, pad)).view(b, h, blocks + 1, w, d)
    vp = F.pad(v, (0, 0, w, pad)).view(b, h, blocks + 1, w, v.shape[-1])
    ok = F.pad(key_ok, (w, pad), value=False).view(b, blocks + 1, w)
    k2 = torch.cat([kp[:, :, :-1], kp[:, :, 1:]], dim=3)  # (b, h, blocks, 2w, d)
    v2 = torch.cat([vp[:, :, :-1], vp[:, :, 1:]], dim=3)
    ok2 = torch.cat([ok[:, :-1], ok[:, 1:]], dim=2)  # (b, blocks, 2w)
    a = torch.arange(w, device=q.device)
    c = torch.arange(2 * w, device=q.device)
    band = (c[None, :] > a[:, None]) & (c[None, :] <= a[:, None] + w)  # (w, 2w)
    allowed = band[None, None] & ok2[:, :, None, :]  # (b, blocks, w, 2w)
    weights = _window_exp(torch.matmul(qb, k2.transpose(-1, -2)) * scale, allowed[:, None])
    num = torch.matmul(weights, v2).reshape(b, h, blocks * w, -1)[:, :, :n]
    den = weights.sum(-1).reshape(b, h, blocks * w)[:, :, :n]
    return num, den


def window_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int = 64,
    feature_map="elu",
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
    state: WindowLinearState | None = None,
    return_state: bool = False,
):
    """Causal sliding-window softmax + linear attention (see the module docstring).

    Args:
        q, k: ``(batch, heads, T, d)``; v: ``(batch, heads, T, d_v)``: T new tokens, in order.
        window: w, the number of most recent keys (the query's own included) under softmax.
        feature_map: phi of the linear part: a registry name, a module/callable or a (query, key) pair.
        scale: softmax temperature; defaults to ``d ** -0.5``.
        key_padding_mask: optional ``(batch, T)`` bool or 0/1, True/1 = real token (padded keys get zero weight).
        eps: added to the normaliser.
        chunk_size: chunk length of the causal linear product.
        state: a :class:`WindowLinearState` from earlier tokens (prefill after a prefix, decoding).
        return_state: also return the state after these tokens.

    Returns:
        ``(batch, heads, T, d_v)`` in q's dtype (and the new state if ``return_state``).
    """
    check_qkv(q, k, v, _NAME)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{_NAME}: causal attention needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
    check_window(window, _NAME)
    _check_eps(eps, _NAME)
    scale = check_scale(scale, _NAME)
    if isinstance(chunk_size, bool) or not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"{_NAME}: chunk_size must be a positive int, got {chunk_size!r}")
    b, h, t, d = q.shape
    mask = check_padding_mask(key_padding_mask, b, t, _NAME, "key_padding_mask")
    if mask is None:
        mask = torch.ones(b, t, dtype=torch.bool, device=q.device)
    scale = d**-0.5 if scale is None else scale
    dtype = _compute_dtype(q)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    init = None
    if state is not None:
        _check_window_state(state, q, v, window)
        if t == 0:
            return (q.new_zeros(b, h, 0, v.shape[-1]), state) if return_state else q.new_zeros(b, h, 0, v.shape[-1])
        kf = torch.cat([state.keys.to(dtype), kf], dim=2)
        vf = torch.cat([state.values.to(dtype), vf], dim=2)
        mask = torch.cat([state.mask, mask], dim=1)
        init = state.linear.packed().to(dtype) if state.linear is not None else None
    vf = vf.masked_fill(~mask[:, None, :, None], 0.0)  # a padded key's value: 0 * NaN would still be NaN
    n = kf.shape[2]
    front = n - t  # buffered keys precede the new queries
    if t == 0:  # an empty sequence and no state: nothing seen, nothing to carry
        out = q.new_zeros(b, h, 0, v.shape[-1])
        return (out, WindowLinearState(None, k, v, mask, window)) if return_state else out
    if t == 1:  # decoding: one query against <= w keys and the state, no blocking or padding
        return _step(q, qf, kf, vf, mask, init, feature_map, window, scale, eps, return_state)

    q_map, k_map = resolve_feature_maps(feature_map, d, h)
    phi_q = q_map(qf).to(dtype)
    # padded keys are zeroed, not multiplied by 0: a NaN under the mask must change nothing (as softmax confines it)
    phi_k = k_map(kf).to(dtype).masked_fill(~mask[:, None, :, None], 0.0)
    if phi_q.shape[-1] != phi_k.shape[-1]:
        raise ValueError(f"{_NAME}: query and key feature maps give different sizes "
                         f"({phi_q.shape[-1]} vs {phi_k.shape[-1]})")
    v1 = _with_ones(vf)

    # Older keys: key j reaches query i >= j + w, i.e. the causal product with keys shifted by w.
    phi_q_all = F.pad(phi_q, (0, 0, front, 0))
    shifted_k = F.pad(phi_k, (0, 0, window, 0))[:, :, :n]
    shifted_v = F.pad(v1, (0, 0, window, 0))[:, :, :n]
    y_lin, _ = causal_linear(phi_q_all, shifted_k, shifted_v, chunk_size, init)
    num, den = _band(F.pad(qf, (0, 0, front, 0)), kf, vf, mask, window, scale)
    out = (num + y_lin[..., :-1]) / (den + y_lin[..., -1] + eps).unsqueeze(-1)
    out = out[:, :, front:].to(q.dtype)
    if not return_state:
        return out

    leaving = max(0, n - (window - 1))  # keys older than the next query's window
    packed = init
    if leaving:
        add = torch.matmul(phi_k[:, :, :leaving].transpose(-1, -2), v1[:, :, :leaving])
        packed = add if packed is None else packed + add
    linear = LinearAttentionState.unpack(packed) if packed is not None else None
    keep = slice(leaving, n)
    new_state = WindowLinearState(linear, kf[:, :, keep].to(k.dtype), vf[:, :, keep].to(v.dtype), mask[:, keep], window)
    return out, new_state


def _check_window_state(state, q: torch.Tensor, v: torch.Tensor, window: int) -> None:
    """The state must come from this batch/heads/sizes and this window: otherwise keys would be missing from
    the softmax band (a smaller window) or counted twice (a larger one)."""
    if not isinstance(state, WindowLinearState):
        raise TypeError(f"{_NAME}: state must be a WindowLinearState or None, got {type(state).__name__}")
    b, h, _, d = q.shape
    if state.window is not None and state.window != window:
        raise ValueError(f"{_NAME}: the state was built with window={state.window}, not window={window}; "
                         "continue it with the window it was built with")
    r = state.keys.shape[2] if state.keys.dim() == 4 else -1
    if (state.keys.dim() != 4 or state.keys.shape[:2] != (b, h) or state.keys.shape[-1] != d
            or tuple(state.values.shape) != (b, h, r, v.shape[-1]) or tuple(state.mask.shape) != (b, r)):
        raise ValueError(f"{_NAME}: the state holds keys {tuple(state.keys.shape)}, values "
                         f"{tuple(state.values.shape)} and mask {tuple(state.mask.shape)}, which do not fit "
                         f"q {tuple(q.shape)}, v {tuple(v.shape)}")
    if r > window - 1:
        raise ValueError(f"{_NAME}: the state buffers {r} keys, more than window - 1 = {window - 1}; it was built "
                         "with a larger window")
    if state.mask.dtype != torch.bool:
        raise TypeError(f"{_NAME}: state.mask must be bool, got {state.mask.dtype}")
    if state.linear is not None:
        _check_state(state.linear, b, h, state.linear.kv.shape[2], v.shape[-1], q.device, _NAME, "state.linear")


def _step(q, qf, kf, vf, mask, init, feature_map, window, scale, eps, return_state):
    """:func:`window_linear_attention` for one new token: qf ``(b, h, 1, d)``, kf/vf ``(b, h, n, .)`` with
    ``n <= window`` (the buffer and the new key), init the packed state of older keys or None."""
    b, h, n, d = kf.shape
    weights = _window_exp(torch.matmul(qf, kf.transpose(-1, -2)).squeeze(2) * scale, mask[:, None, :])  # (b, h, n)
    num = torch.einsum("bhn,bhne->bhe", weights, vf)
    den = weights.sum(-1)
    q_map, k_map = resolve_feature_maps(feature_map, d, h)
    if init is not None:
        phi_q = q_map(qf).to(init.dtype).squeeze(2)  # (b, h, m)
        y = torch.einsum("bhm,bhme->bhe", phi_q, init)
        num, den = num + y[..., :-1], den + y[..., -1]
    out = (num / (den + eps).unsqueeze(-1)).unsqueeze(2).to(q.dtype)
    if not return_state:
        return out
    packed = init
    if n > window - 1:  # the oldest key leaves the window: fold it into the state
        gone = ~mask[:, None, :1, None]
        phi_old = k_map(kf[:, :, :1]).to(kf.dtype).masked_fill(gone, 0.0)
        add = torch.matmul(phi_old.transpose(-1, -2), _with_ones(vf[:, :, :1].masked_fill(gone, 0.0)))
        packed = add if packed is None else packed + add
    linear = LinearAttentionState.unpack(packed) if packed is not None else None
    keep = slice(max(0, n - (window - 1)), n)
    state = WindowLinearState(linear, kf[:, :, keep].to(q.dtype), vf[:, :, keep].to(q.dtype), mask[:, keep], window)
    return out, state


def window_linear_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    window: int,
    feature_map="elu",
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The full causal weight matrix ``(batch, heads, n, n)`` (rows sum to 1 up to eps). O(N^2).

    q, k: ``(batch, heads, n, d)``. Differentiable in the feature map's parameters (attention transfer).
    """
    check_window(window, "window_linear_weights")
    b, h, n, d = q.shape
    if k.shape != q.shape:
        raise ValueError(f"window_linear_weights: q and k must have the same shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    mask = check_padding_mask(key_padding_mask, b, n, "window_linear_weights", "key_padding_mask")
    scale = check_scale(scale, "window_linear_weights")
    scale = d**-0.5 if scale is None else scale
    dtype = _compute_dtype(q)
    i = torch.arange(n, device=q.device)
    near = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    far = i[None, :] <= i[:, None] - window
    keys_ok = mask[:, None, None, :] if mask is not None else torch.ones(1, 1, 1, n, dtype=torch.bool, device=q.device)
    soft = _window_exp(torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale, near & keys_ok)
    q_map, k_map = resolve_feature_maps(feature_map, d, h)
    lin = torch.matmul(q_map(q.to(dtype)), k_map(k.to(dtype)).transpose(-1, -2))
    lin = lin.masked_fill(~(far & keys_ok), 0.0)
    weights = soft + lin
    return weights / (weights.sum(-1, keepdim=True) + eps)


def window_linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int = 64,
    feature_map="elu",
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Quadratic definition of :func:`window_linear_attention` (full weight matrix times v)."""
    check_qkv(q, k, v, "window_linear_attention_reference")
    weights = window_linear_weights(q, k, window=window, feature_map=feature_map, scale=scale,
                                    key_padding_mask=key_padding_mask, eps=eps)
    return torch.matmul(weights, v.to(weights.dtype)).to(q.dtype)


# --------------------------------------------------------------------------- registry entry
@dataclass
class WindowLinearParams:
    """Knobs of the ``window-linear`` kind.

    Attributes:
        window: recent keys (the query's own included) under exact softmax.
        feature_map: phi of the linear part beyond the window (``hedgehog`` is learnable: see ``linearize``).
        eps: normaliser epsilon.
        chunk_size: chunk length of the causal linear product.
    """

    window: int = 64
    feature_map: str = "elu"
    eps: float = 1e-6
    chunk_size: int = 64

    def __post_init__(self) -> None:
        check_window(self.window, "WindowLinearParams")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map {self.feature_map!r}; accepted: {', '.join(sorted(FEATURE_MAPS))}")
        _check_eps(self.eps, "WindowLinearParams")
        if not (isinstance(self.chunk_size, int) and self.chunk_size > 0):
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")


def _forward(q, k, v, params: WindowLinearParams, *, causal=False, key_padding_mask=None, query_padding_mask=None,
             scale=None, module=None):
    check_qkv(q, k, v, _NAME)
    n_q, n_k = q.shape[2], k.shape[2]
    if not causal and n_q > 1:
        raise ValueError("attention kind 'window-linear' is causal only (a sliding window over past tokens); use "
                         "'linear' or the clustered kinds for bidirectional encoders")
    feature_map = getattr(module, "hf_efficient_feature_map", None) or params.feature_map
    if n_q < n_k:  # queries are the last n_q positions (decoding without our cache): pad them at the front
        q = torch.cat([q.new_zeros(*q.shape[:2], n_k - n_q, q.shape[3]), q], dim=2)
    out = window_linear_attention(q, k, v, window=params.window, feature_map=feature_map, scale=scale,
                                  key_padding_mask=key_padding_mask, eps=params.eps, chunk_size=params.chunk_size)
    return out[:, :, n_k - n_q:]


def _decode(state, q, k, v, params: WindowLinearParams, *, key_padding_mask=None, scale=None, module=None):
    """The T new tokens after ``state`` (prefill or decoding): ``(out, state after them)``."""
    feature_map = getattr(module, "hf_efficient_feature_map", None) or params.feature_map
    return window_linear_attention(q, k, v, window=params.window, feature_map=feature_map, scale=scale,
                                   key_padding_mask=key_padding_mask, eps=params.eps, chunk_size=params.chunk_size,
                                   state=state, return_state=True)


register_attention_kind(
    AttentionKind(
        name="window-linear",
        params_class=WindowLinearParams,
        forward=_forward,
        supports_causal=True,
        decode=_decode,
        description="causal sliding-window softmax + linear attention beyond the window; O(1) decoding",
        supports_bidirectional=False,
    )
)
