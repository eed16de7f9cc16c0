"""Linear attention ("Transformers are RNNs", Katharopoulos et al., ICML 2020).

softmax(q k^T) v is replaced by phi(q) (phi(k)^T v) / (phi(q) . sum_j phi(k_j)), which costs
O(N d m) instead of O(N^2 d). Three forms, one result:

* non-causal: two matrix products with the summed state;
* causal, chunked-parallel (training and prefill): within a chunk of C tokens a masked C x C
  product, across chunks a carried state; memory O(N C + (N / C) m d_v), never N x m x d_v;
* causal, recurrent (decoding): ``state += phi(k_t) v_t^T``, constant work per token.

The normaliser rides along as an extra column of ones appended to v, so numerator and
denominator come out of the same products. Everything accumulates in float32 (float64 stays
float64) whatever the input dtype; the output is cast back to the input dtype.
:func:`linear_attention_reference` is the quadratic definition the fast forms are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._checks import check_padding_mask, check_qkv
from .feature_maps import FEATURE_MAPS, resolve_feature_maps
from .registry import AttentionKind, register_attention_kind

__all__ = [
    "LinearAttentionParams",
    "LinearAttentionState",
    "causal_linear_chunked",
    "causal_linear_normalized_reference",
    "causal_linear_recurrent",
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_step",
]


class LinearAttentionState(NamedTuple):
    """The recurrent state of causal linear attention for one layer.

    kv: ``(batch, heads, m, d_v)`` = sum_j phi(k_j) v_j^T; k_sum: ``(batch, heads, m)`` = sum_j phi(k_j).
    Its size does not depend on how many tokens were seen.
    """

    kv: torch.Tensor
    k_sum: torch.Tensor

    def packed(self) -> torch.Tensor:
        """``(batch, heads, m, d_v + 1)``: kv with k_sum as the last column."""
        return torch.cat([self.kv, self.k_sum.unsqueeze(-1)], dim=-1)

    @staticmethod
    def unpack(packed: torch.Tensor) -> LinearAttentionState:
        return LinearAttentionState(packed[..., :-1], packed[..., -1])


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
    y = torch.matmul(scores, vc).add_(torch.matmul(q, torch.stack(before, dim=2)))
    return y.reshape(b, h, nc * c, e)[:, :, :n], acc


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
    This is the path the fused kernel (``kernels.causal_linear_normalized``) is tested against and
    falls back to.

    Args:
        phi_q, phi_k: ``(batch, heads, n, m)`` features; v: ``(batch, heads, n, d_v)``.
        initial: optional packed state ``(batch, heads, m, d_v + 1)`` (k_sum as the last column).

    Returns:
        out ``(batch, heads, n, d_v)`` and the final packed state ``(batch, heads, m, d_v + 1)``.
    """
    y, state = causal_linear_chunked(phi_q, phi_k, _with_ones(v), chunk_size, initial)
    return (y[..., :-1] / (y[..., -1:] + eps)).to(v.dtype), state


# --------------------------------------------------------------------------- public functions
def _features(q, k, v, feature_map, key_padding_mask, name):
    check_qkv(q, k, v, name)
    b, h, _, d = q.shape
    mask = check_padding_mask(key_padding_mask, b, k.shape[2], name, "key_padding_mask")
    q_map, k_map = resolve_feature_maps(feature_map, d, h)
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
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"{name}: eps must be a positive number, got {eps!r}")


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
            ``(query_map, key_map)`` pair.
        key_padding_mask: optional ``(batch, n_k)`` bool or 0/1; True/1 = real key (the Hugging
            Face ``attention_mask`` convention). Padded keys get exactly zero weight.
        eps: added to the normaliser; a query that sees no key gets a zero output.
        chunk_size: chunk length of the causal chunked form.
        initial_state: causal only: the state of earlier tokens (prefill after a prefix).
        return_state: causal only: also return the final :class:`LinearAttentionState`.

    Returns:
        ``(batch, heads, n_q, d_v)`` in the dtype of q (and the state if ``return_state``).
    """
    name = "linear_attention"
    _check_eps(eps, name)
    phi_q, phi_k, vf = _features(q, k, v, feature_map, key_padding_mask, name)
    if not causal:
        if initial_state is not None or return_state:
            raise ValueError(f"{name}: initial_state/return_state need causal=True")
        v1 = _with_ones(vf)
        y = torch.matmul(phi_q, torch.matmul(phi_k.transpose(-1, -2), v1))  # via the (b, h, m, d_v + 1) state
        out = (y[..., :-1] / (y[..., -1:] + eps)).to(q.dtype)
    else:
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"{name}: causal attention needs as many queries as keys, got n_q={q.shape[2]}, n_k={k.shape[2]}"
            )
        init = initial_state.packed().to(phi_q.dtype) if initial_state is not None else None
        # The compiled kernel (normaliser fused) when one can run here, else
        # causal_linear_normalized_reference; kernels/dispatch.py decides.
        from hf_efficient_kernels.dispatch import causal_linear_normalized as causal_linear_fast

        out, state = causal_linear_fast(phi_q, phi_k, vf, eps, init, chunk_size)
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
        state: the state from earlier tokens, or None to start.
        q, k: ``(batch, heads, T, d)``; v: ``(batch, heads, T, d_v)``.
        key_padding_mask: optional ``(batch, T)``, True/1 = real token.

    Returns:
        ``(new_state, out)`` with out ``(batch, heads, T, d_v)``.
    """
    name = "linear_attention_step"
    _check_eps(eps, name)
    phi_q, phi_k, vf = _features(q, k, v, feature_map, key_padding_mask, name)
    init = state.packed().to(phi_q.dtype) if state is not None else None
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
    """Quadratic definition: A = phi(q) phi(k)^T (masked), out = A v / (A 1 + eps). O(N^2)."""
    phi_q, phi_k, vf = _features(q, k, v, feature_map, key_padding_mask, "linear_attention_reference")
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


def _forward(q, k, v, params: LinearAttentionParams, *, causal=False, key_padding_mask=None,
             query_padding_mask=None, scale=None, module=None):
    feature_map = getattr(module, "hf_efficient_feature_map", None) or params.feature_map
    if params.feature_map == "favor" and scale is not None:
        # favor approximates exp(q.k / sqrt(d)); fold a model's different scaling into q.
        q = q * (scale * q.shape[-1] ** 0.5)
    return linear_attention(q, k, v, causal=causal, feature_map=feature_map, key_padding_mask=key_padding_mask,
                            eps=params.eps, chunk_size=params.chunk_size)


register_attention_kind(
    AttentionKind(
        name="linear",
        params_class=LinearAttentionParams,
        forward=_forward,
        supports_causal=True,
        supports_recurrent=True,
        description="linear attention phi(q)(phi(k)^T v), O(N); causal chunked + recurrent decoding",
    )
)
