"""The maths of attention sampling: the attention distribution, the two samplers, the unbiased
expectation estimator and its gradient, patch geometry and vectorised patch extraction.

Notation: ``a`` is the attention distribution over the ``K`` positions of the attention map,
``f_i`` the feature of the high-resolution patch at position ``i``. The model needs
``E_a[f] = sum_i a_i f_i`` and its gradient with respect to both ``a`` and ``f``; it sees only
``n`` sampled patches.

**With replacement** (``i_1..i_n`` i.i.d. from ``a``): the estimate is ``1/n sum_j f_{i_j}``. It is
written as ``sum_j w_j f_{i_j}`` with ``w_j = (a_{i_j} / sg(a_{i_j})) / n`` (``sg`` = stop-gradient):
the value is unchanged and ``E[grad w_j f] = sum_i grad(a_i f_i) / n`` per draw, i.e. the gradient
of ``E_a[f]``.

**Without replacement** (``i_1..i_n`` drawn one after the other, each from ``a`` renormalised over
the positions not drawn yet; this is exactly the order Gumbel top-k returns). Let
``S_j = sum_{k<j} a_{i_k}`` be the mass already drawn before step ``j``. Conditioned on the first
``j-1`` draws, ``Y_j = sum_{k<j} a_{i_k} f_{i_k} + (1 - S_j) f_{i_j}`` has expectation
``sum_i a_i f_i`` (the draw ``i_j`` has probability ``a_i / (1 - S_j)`` over the rest), so the mean
``1/n sum_j Y_j`` is unbiased. For the gradient we differentiate the surrogate
``T_j = sum_{k<j} a_{i_k} f_{i_k} + sg(1 - S_j) (a_{i_j} / sg(a_{i_j})) f_{i_j}``, whose value is
``Y_j``. Conditioned on any prefix ``P`` of earlier draws,
``E[grad T_j | P] = sum_{k in P} grad(a_k f_k) + sum_{i not in P} (a_i / (1-S_j)) (1-S_j) / a_i grad(a_i f_i)
= grad sum_i a_i f_i``, the same for every prefix, hence also unconditionally. The remaining mass
``1 - S_j`` must be held constant: differentiating through it adds
``-sum_{k<j} grad(a_{i_k}) f_{i_j}``, whose expectation is not zero (a bias that the exact
enumeration tests detect). Collecting the coefficient of each draw ``k`` (0-based) over all ``T_j``:
``w_k = [sg(1 - S_k) a_{i_k} / sg(a_{i_k}) + (n - 1 - k) a_{i_k}] / n``; the values sum to one.

**Nested (multi-scale) sampling.** A first attention ``a`` over ``K`` regions, and in each region
``i`` a second attention ``b^i`` over its positions; the model needs
``E_a[g] = sum_i a_i g_i`` with ``g_i = E_{b^i}[f_i] = sum_j b^i_j f_{ij}``. Draw regions
``i_1..i_R`` from ``a`` (either mode) with weights ``u_k``, then, independently in each drawn region,
``n`` positions from ``b^{i_k}`` with weights ``v_{kj}``, and estimate with
``sum_k sum_j u_k v_{kj} f_{i_k j_{kj}} = sum_k u_k ghat_k``. Given the region draws, ``ghat_k`` is an
unbiased estimate of ``g_{i_k}`` (value and gradient, by the single-level result), and ``u_k``
depends on the region draws only, so ``E[sum_k u_k ghat_k | regions] = sum_k u_k g_{i_k}``, whose
expectation is ``E_a[g]`` by the single-level result again. Gradients split the same way: the first
attention's parameters enter only ``u_k``, whose gradient times ``g_{i_k}`` is unbiased for
``sum_i grad(a_i) g_i``; the second attention and the features enter only ``ghat_k``, and
``sum_k u_k grad(ghat_k)`` is unbiased for ``sum_i a_i grad(g_i)``. So the weights multiply, and both
factors keep their own stop-gradient surrogates (:func:`nested_expectation_weights`). A region drawn
twice (with replacement) gets two independent sets of position draws; only the conditional
expectation matters, so this is still unbiased.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

SamplingMode = Literal["with_replacement", "without_replacement"]
SAMPLING_MODES = ("with_replacement", "without_replacement")


def attention_distribution(
    logits: torch.Tensor, valid_mask: torch.Tensor | None = None, smoothing: float = 0.0
) -> torch.Tensor:
    """Softmax over the whole attention map, mixed with a little uniform mass.

    Args:
        logits: ``(batch, K)`` attention scores, one per position of the flattened map.
        valid_mask: optional ``(batch, K)`` bool, False for positions in padding (they get zero mass).
        smoothing: ``eps`` in ``a = (1 - eps) softmax(logits) + eps / K_valid``; keeps every valid
            position reachable so that ``a / sg(a)`` in the estimator stays finite.

    Returns:
        ``(batch, K)`` probabilities; each row sums to one over its valid positions.
    """
    if logits.dim() != 2:
        raise ValueError(f"attention_distribution: logits must be (batch, K), got shape {tuple(logits.shape)}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"attention_distribution: smoothing must be in [0, 1), got {smoothing}")
    if valid_mask is None:
        probs = torch.softmax(logits, dim=-1)
        return (1.0 - smoothing) * probs + smoothing / logits.shape[-1]
    if not bool(valid_mask.any(dim=-1).all()):
        raise ValueError("attention_distribution: every image needs at least one valid attention position")
    probs = torch.softmax(logits.masked_fill(~valid_mask, float("-inf")), dim=-1)
    n_valid = valid_mask.sum(dim=-1, keepdim=True).to(probs.dtype)
    return (1.0 - smoothing) * probs + smoothing * valid_mask.to(probs.dtype) / n_valid


def _check_sampling_args(attention: torch.Tensor, n: int, name: str) -> None:
    if attention.dim() != 2:
        raise ValueError(f"{name}: attention must be (batch, K), got shape {tuple(attention.shape)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{name}: the number of samples must be a positive int, got {n!r}")
    bad = ~(torch.isfinite(attention) & (attention >= 0)).all(dim=-1)
    if bool(bad.any()):
        raise ValueError(
            f"{name}: row {int(bad.nonzero()[0, 0])} of attention holds NaN, inf or negative values; accepted: "
            "probabilities (check the inputs of the attention network for non-finite pixels)"
        )


def sample_with_replacement(
    attention: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``n`` i.i.d. positions per row of ``attention`` ``(batch, K)``; returns ``(batch, n)`` long."""
    _check_sampling_args(attention, n, "sample_with_replacement")
    return torch.multinomial(attention.detach(), n, replacement=True, generator=generator)


def sample_without_replacement(
    attention: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``n`` distinct positions per row with Gumbel top-k, in draw order.

    Adding i.i.d. Gumbel noise to ``log a`` and keeping the ``n`` largest keys, sorted in decreasing
    order, draws positions one after the other from ``a`` renormalised over those not drawn yet.

    Args:
        attention: ``(batch, K)`` probabilities.
        n: number of distinct positions; at most the number of positions with nonzero mass.

    Returns:
        ``(batch, n)`` long indices, first draw first.
    """
    _check_sampling_args(attention, n, "sample_without_replacement")
    support = int((attention > 0).sum(dim=-1).min())
    if n > support:
        raise ValueError(
            f"sample_without_replacement: cannot draw {n} distinct positions from a distribution with only "
            f"{support} positions of nonzero mass; lower num_patches, use a larger image or low-res view, "
            "or sample with replacement"
        )
    a = attention.detach()
    u = torch.rand(a.shape, generator=generator, dtype=a.dtype, device=a.device)
    # clamp keeps log(-log(u)) finite at u == 0 or 1
    tiny = torch.finfo(a.dtype).tiny
    gumbel = -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))
    keys = torch.log(a) + gumbel
    return torch.topk(keys, n, dim=-1, sorted=True).indices


def expectation_weights(sampled_attention: torch.Tensor, mode: SamplingMode) -> torch.Tensor:
    """Weights ``w`` of the unbiased estimator ``sum_j w_j f_{i_j}`` of ``E_a[f]`` (see module docstring).

    Args:
        sampled_attention: ``(batch, n)`` attention values ``a_{i_j}`` of the drawn positions, in draw
            order, still attached to the graph of the attention network.
        mode: ``"with_replacement"`` or ``"without_replacement"``.

    Returns:
        ``(batch, n)`` weights. Their values give the estimate; their gradient (through
        ``sampled_attention``) gives an unbiased estimate of the gradient of ``E_a[f]``.
    """
    n = sampled_attention.shape[-1]
    a = sampled_attention
    ratio = a / a.detach()  # value 1, gradient grad(a) / a
    if mode == "with_replacement":
        return ratio / n
    if mode == "without_replacement":
        a_const = a.detach()
        remaining = 1.0 - (torch.cumsum(a_const, dim=-1) - a_const)  # 1 - S_k, held constant
        later = torch.arange(n - 1, -1, -1, device=a.device, dtype=a.dtype)  # n - 1 - k
        return (remaining * ratio + later * a) / n
    raise ValueError(f"expectation_weights: mode must be one of {SAMPLING_MODES}, got {mode!r}")


def nested_expectation_weights(region_weights: torch.Tensor, position_weights: torch.Tensor) -> torch.Tensor:
    """Weights of the two-level estimator (see the module docstring): ``u_k v_kj``, flattened.

    Args:
        region_weights: ``(batch, R)`` :func:`expectation_weights` of the drawn regions.
        position_weights: ``(batch, R, n)`` :func:`expectation_weights` of the positions drawn inside
            each drawn region (row ``k`` belongs to region draw ``k``).

    Returns:
        ``(batch, R * n)`` weights, region-major (all positions of region draw 0 first); their values
        sum to one and their gradient reaches both attention distributions.
    """
    if region_weights.dim() != 2 or position_weights.dim() != 3 or position_weights.shape[:2] != region_weights.shape:
        raise ValueError(
            "nested_expectation_weights: expected region_weights (batch, R) and position_weights (batch, R, n), "
            f"got {tuple(region_weights.shape)} and {tuple(position_weights.shape)}"
        )
    return (region_weights[..., None] * position_weights).flatten(1)


def expectation(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_j w_j f_j``: features ``(batch, n, dim)``, weights ``(batch, n)`` -> ``(batch, dim)``."""
    return torch.einsum("bn,bnd->bd", weights.to(features.dtype), features)


def negative_entropy(attention: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``sum_i a_i log a_i`` per row of ``(batch, K)`` -> ``(batch,)``.

    Adding ``lambda * negative_entropy`` to a loss that is minimised pushes the attention towards
    higher entropy (more spread) for ``lambda > 0`` and towards lower entropy for ``lambda < 0``.
    """
    return (attention * torch.log(attention + eps)).sum(dim=-1)


def patch_top_left(
    indices: torch.Tensor, map_width: int, cell_size: torch.Tensor, patch_size: tuple[int, int]
) -> torch.Tensor:
    """Top-left pixel of the patch centred on each sampled attention position.

    Position ``(r, c)`` of the attention map covers the high-resolution area whose centre is
    ``((r + 0.5) * cell_h, (c + 0.5) * cell_w)``; the patch is centred there.

    Args:
        indices: ``(batch, n)`` flat positions in an attention map of width ``map_width``.
        cell_size: ``(batch, 2)`` float, high-resolution pixels per attention cell (height, width).
        patch_size: ``(ph, pw)``.

    Returns:
        ``(batch, n, 2)`` long ``(row, col)``; may be negative or run past the image near borders.
    """
    rows = torch.div(indices, map_width, rounding_mode="floor")
    cols = indices - rows * map_width
    centre_r = (rows.to(cell_size.dtype) + 0.5) * cell_size[:, None, 0]
    centre_c = (cols.to(cell_size.dtype) + 0.5) * cell_size[:, None, 1]
    top = torch.floor(centre_r - patch_size[0] / 2).long()
    left = torch.floor(centre_c - patch_size[1] / 2).long()
    return torch.stack([top, left], dim=-1)


def _read_windows(reader, windows: list[tuple[int, int, int, int]]) -> np.ndarray:
    """``(n, ph, pw, C)`` windows through a reader's ``read_windows``, or ``read_window`` one by one."""
    if hasattr(reader, "read_windows"):
        return np.asarray(reader.read_windows(windows))
    return np.stack([reader.read_window(*window) for window in windows])


def extract_patches(
    images: torch.Tensor,
    top_left: torch.Tensor,
    patch_size: tuple[int, int],
    image_sizes: torch.Tensor | None = None,
    pixel_scale: torch.Tensor | None = None,
    pixel_offset: torch.Tensor | None = None,
    pixel_readers: list | None = None,
) -> torch.Tensor:
    """Gather patches from high-resolution images in one indexing operation (no loop over patches).

    Pixels outside an image's valid area (beyond its border or in batch padding) read as zero; the
    full image is never copied, padded or converted, so memory is ``O(batch * n * channels * ph * pw)``
    whatever the image's dtype (integer images are converted patch by patch).

    Args:
        images: ``(batch, channels, H, W)``.
        top_left: ``(batch, n, 2)`` long ``(row, col)`` of each patch.
        patch_size: ``(ph, pw)``.
        image_sizes: optional ``(batch, 2)`` long valid ``(height, width)`` of each image
            (top-left aligned); defaults to the full ``(H, W)``.
        pixel_scale, pixel_offset: optional ``(batch, channels)``: the patches become
            ``pixel_scale * x + pixel_offset`` (rescaling and normalisation of raw pixels) before the
            pixels outside the image are set to zero.
        pixel_readers: optional, one object per image with ``read_window(top, left, height, width)``
            returning ``(height, width, channels)`` pixels (zeros outside the image), and optionally
            ``read_windows(windows)`` for all of an image's windows at once (``(n, height, width,
            channels)``): patches are read through them (e.g. from tiles of a file) and ``images``
            only gives the shape and dtype.

    Returns:
        ``(batch, n, channels, ph, pw)``, floating point (float32 for integer images).
    """
    b, _, h, w = images.shape
    ph, pw = patch_size
    if image_sizes is None:
        image_sizes = torch.tensor([[h, w]], device=images.device).expand(b, 2)
    rows = top_left[..., 0, None] + torch.arange(ph, device=images.device)  # (b, n, ph)
    cols = top_left[..., 1, None] + torch.arange(pw, device=images.device)  # (b, n, pw)
    valid_r = (rows >= 0) & (rows < image_sizes[:, None, None, 0])
    valid_c = (cols >= 0) & (cols < image_sizes[:, None, None, 1])
    if pixel_readers is not None:
        corners = top_left.tolist()
        # one call per image, so a reader decodes each tile its patches share only once
        windows = [_read_windows(reader, [(t, left, ph, pw) for t, left in corners[i]])
                   for i, reader in enumerate(pixel_readers)]
        patches = torch.from_numpy(np.stack(windows)).to(images.device)  # (b, n, ph, pw, C)
    else:
        batch_idx = torch.arange(b, device=images.device)[:, None, None, None]
        # advanced indices on dims 0, 2, 3 broadcast to (b, n, ph, pw); the channel slice goes last
        patches = images[batch_idx, :, rows.clamp(0, h - 1)[..., :, None], cols.clamp(0, w - 1)[..., None, :]]
    if not patches.is_floating_point():
        patches = patches.float()
    if pixel_scale is not None:  # (b, n, ph, pw, C) * (b, 1, 1, 1, C)
        patches = patches * pixel_scale[:, None, None, None, :] + pixel_offset[:, None, None, None, :]
    valid = (valid_r[..., :, None] & valid_c[..., None, :]).unsqueeze(-1)
    patches = patches * valid.to(patches.dtype)
    return patches.permute(0, 1, 4, 2, 3)

