"""Input validation shared by every attention kind: clear errors instead of einsum stack traces."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str) -> None:
    """Check the ``(batch, heads, seq, dim)`` layout shared by every attention kind.

    q: ``(B, H, n_q, d)``, k: ``(B, H, n_k, d)``, v: ``(B, H, n_k, d_v)``.
    """
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name}: {label} must have 4 dimensions (batch, heads, seq, dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{name}: {label} has dtype {t.dtype}; accepted: float16, bfloat16, float32, float64"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"{name}: batch and heads must match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(for grouped-query attention repeat k/v heads first)"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name}: q and k need the same last dim, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{name}: k and v need the same sequence length, got {k.shape[2]} and {v.shape[2]}")


def check_padding_mask(mask: torch.Tensor | None, batch: int, seq: int, name: str, what: str) -> torch.Tensor | None:
    """Validate a 2-D padding mask and return it as bool ``(batch, seq)``, True = real token.

    Accepts bool, or integer/float tensors holding only 0 and 1 (the Hugging Face
    ``attention_mask`` convention: 1 marks a token that takes part, 0 marks padding).
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: {what} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dim() != 2 or tuple(mask.shape) != (batch, seq):
        raise ValueError(
            f"{name}: {what} must be 2-D (batch, seq) = ({batch}, {seq}) with 1/True for real tokens, "
            f"got shape {tuple(mask.shape)}; 4-D additive masks are not accepted here"
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                f"{name}: {what} must hold only 0 and 1 (1 = real token); additive masks such as "
                "0/-inf are not accepted"
            )
        return mask.bool()
    raise ValueError(f"{name}: {what} has dtype {mask.dtype}; accepted: bool or 0/1 integer/float")


def check_scale(scale, name: str) -> float | None:
    """A softmax scale must be a finite positive number (or None for the default ``d ** -0.5``); NaN,
    inf, 0 and negative values would give NaN or reversed attention silently. Returns it as a float."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name}: scale must be a finite positive number or None (the default d ** -0.5), "
                         f"got {scale!r}")
    return float(scale)


def check_window(window, name: str) -> int:
    """A sliding window must be an int >= 1 (keys within that many positions, the query's own included)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{name}: window must be a positive int (keys within that many positions are attended), "
                         f"got {window!r}")
    return window
