"""The maths of importance sampling, free of the Trainer: per-sample losses, importance scores, the
variance-reduction estimate tau, and the resampling with unbiasing weights.

Shapes: sequence-level tasks have ``logits (batch, classes)`` and ``labels (batch,)``; token-level
tasks have ``logits (batch, seq, classes)`` and ``labels (batch, seq)``, where ``-100`` marks a
token without a target. The per-sample loss ``L_i`` is the *sum* of the sample's token losses, so
that the importance weights apply to whole samples; the training loss divides the weighted sum by
the expected number of target items, which keeps it an unbiased estimate of the usual token mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

#: Task layouts the trainer can score in closed form or with one batched backward.
LOSS_KINDS = ("classification", "token_classification", "causal_lm", "regression")

#: Importance scores: the paper's upper bound, the loss, and the exact per-sample gradient norm.
SCORES = ("gradient_norm_bound", "loss", "gradient_norm")

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _align(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(logits, labels)`` with matching leading dims; for a causal LM, position ``t``
    predicts token ``t + 1``."""
    if kind == "causal_lm":
        return logits[:, :-1, :], labels[:, 1:]
    return logits, labels


def check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> None:
    """Raise a clear ``ValueError`` when ``logits`` and ``labels`` do not fit ``kind``."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; accepted: {', '.join(LOSS_KINDS)}")
    if kind == "classification":
        if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(
                "classification needs logits (batch, classes) and integer labels (batch,), got "
                f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
            )
    elif kind == "regression":
        if labels.shape[0] != logits.shape[0] or labels.numel() != logits.numel():
            raise ValueError(
                "regression needs logits and float labels with one value per output, got "
                f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
            )
    else:
        if logits.dim() != 3 or labels.dim() != 2 or tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(
                f"{kind} needs logits (batch, seq, classes) and integer labels (batch, seq), got "
                f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
            )
    if kind != "regression" and labels.is_floating_point():
        raise ValueError(f"{kind} needs integer class labels, got dtype {labels.dtype}")


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed loss and number of target items.

    Returns ``(losses (batch,), items (batch,))`` in float32 (float64 for float64 logits): cross-entropy summed over the
    sample's target tokens (``-100`` ignored) or, for ``regression``, the squared error summed over
    the outputs (one item per sample, as ``MSELoss`` on ``(batch, 1)`` outputs).
    """
    check_logits_labels(logits, labels, kind)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if kind == "regression":
        diff = logits.reshape(logits.shape[0], -1) - labels.reshape(labels.shape[0], -1).to(logits.dtype)
        losses = diff.pow(2).sum(dim=1)
        return losses, torch.full_like(losses, float(diff.shape[1]))
    z, y = _align(logits, labels, kind)
    if kind == "classification":
        losses = F.cross_entropy(z, y, reduction="none", ignore_index=IGNORE_INDEX)
        return losses, (y != IGNORE_INDEX).float()
    token_losses = F.cross_entropy(z.transpose(1, 2), y, reduction="none", ignore_index=IGNORE_INDEX)
    return token_losses.sum(dim=1), (y != IGNORE_INDEX).float().sum(dim=1)


def cross_entropy_gradient_norm(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Closed-form norm of the per-sample loss gradient w.r.t. the logits, ``(batch,)``, in float32.

    For one target, ``d CE / d z = softmax(z) - onehot(y)``; a sample's summed token loss has the
    stacked per-token gradients, whose norm is the root of the summed squared token norms.

    Computed without cancellation: the label's entry ``p_y - 1`` equals ``-sum_{j != y} p_j``, a sum
    of small positive terms, and the norm ``s * sqrt(1 + sum_j (p_j / s)^2)`` (``s`` that sum, ``j``
    over the other classes) never squares a tiny number; ``p_j / s`` is formed from ``exp(z_j - max z)``
    without the softmax. The expansion ``||p||^2 - 2 p_y + 1`` would
    round every sample with a loss below about 1e-4 to exactly 0 in float32, so that it could never
    be drawn again. Accurate to float32's relative precision while ``p_j`` stays a normal float32
    (margins up to about 85).
    """
    check_logits_labels(logits, labels, kind)
    if kind == "regression":
        raise ValueError("the closed form is for cross-entropy; regression scores use autograd")
    z, y = _align(logits.float(), labels, kind)
    valid = y != IGNORE_INDEX
    # Unnormalised probabilities e_j = exp(z_j - max z): p_j / (1 - p_y) = e_j / sum_{k != y} e_k, so
    # the norm needs no softmax (whose kernel is several times slower than exp for few classes).
    e = (z - z.amax(dim=-1, keepdim=True)).exp_()
    total = e.sum(dim=-1)
    e.scatter_(-1, y.clamp(min=0).unsqueeze(-1), 0.0)  # the other classes only (in place: e is ours)
    rest = e.sum(dim=-1)
    s = rest / total  # 1 - p_y, without forming 1 - p_y
    safe = rest + (rest == 0)  # rest = 0 only when every other e_j is 0: the ratios are then 0 as well
    # In place on our own temporaries: a handful of small kernels, scoring runs at every step.
    ratio_sq = e.div_(safe.unsqueeze(-1)).square_().sum(dim=-1)
    norms = ratio_sq.add_(1.0).sqrt_().mul_(s) * valid
    if norms.dim() == 2:
        # Root of the summed squared token norms, scaled by the largest so tiny norms do not underflow.
        top = norms.amax(dim=1, keepdim=True)
        safe_top = torch.where(top > 0, top, torch.ones_like(top))
        norms = top.squeeze(1) * (norms / safe_top).pow(2).sum(dim=1).sqrt()
    return norms


def cross_entropy_losses_tail_accurate(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample summed cross-entropy ``(batch,)`` in float32, accurate for tiny losses.

    ``-log p_y = softplus(logsumexp_{j != y} z_j - z_y)``: for a well-fit sample the argument is very
    negative and softplus returns ``exp(.)`` to full relative precision, where ``F.cross_entropy``
    rounds every loss below about 6e-8 to exactly 0 in float32. Used for the ``loss`` score; the
    training loss keeps ``F.cross_entropy`` (its gradient has no such cancellation).
    """
    check_logits_labels(logits, labels, kind)
    if kind == "regression":
        raise ValueError("cross-entropy losses need class labels; regression uses per_sample_losses")
    z, y = _align(logits.float(), labels, kind)
    valid = y != IGNORE_INDEX
    index = y.clamp(min=0).unsqueeze(-1)
    z_y = z.gather(-1, index).squeeze(-1)
    rest = z.scatter(-1, index, float("-inf")).logsumexp(dim=-1)
    token = torch.where(valid, F.softplus(rest - z_y), torch.zeros_like(z_y))
    return token.sum(dim=1) if token.dim() == 2 else token


def autograd_logit_gradient_norm(logits: torch.Tensor, labels: torch.Tensor, loss_fn: PerSampleLoss) -> torch.Tensor:
    """Norm of each sample's loss gradient w.r.t. its logits with one batched backward, ``(batch,)``.

    Samples do not interact through ``loss_fn``, so the gradient of the summed loss holds every
    sample's own gradient in its row.
    """
    z = logits.detach().float().requires_grad_(True)
    with torch.enable_grad():
        losses, _ = loss_fn(z, labels)
        (grad,) = torch.autograd.grad(losses.sum(), z)
    return grad.reshape(grad.shape[0], -1).norm(dim=1)


def tau_from_scores(scores: torch.Tensor) -> float:
    """Variance-reduction estimate ``tau = (1 - ||g - u||^2 / ||g||^2) ** -1/2``.

    ``g`` are the normalised scores and ``u`` the uniform distribution. Since
    ``||g - u||^2 = ||g||^2 - 1/n``, tau equals ``sqrt(n) * ||g||``: 1 for uniform scores, ``sqrt(n)``
    when one sample holds all the mass. All-zero scores give 1 (nothing to prefer).
    """
    scores = scores.detach().double().flatten()
    n = scores.numel()
    if n == 0:
        raise ValueError("tau needs at least one score")
    # One pass and one host read: the two sums, and a check (NaN >= 0 and inf < inf are False).
    valid = ((scores >= 0) & (scores < math.inf)).all()
    # tau does not change when every score is scaled alike; dividing by the largest keeps the squares
    # representable for scores near float64's range (1e-200 or 1e200).
    scores = scores / scores.abs().amax().clamp_min(torch.finfo(torch.float64).tiny)
    total, total_sq, ok = torch.stack([scores.sum(), scores.square().sum(), valid.double()]).tolist()
    if not ok:
        raise ValueError("importance scores must be finite and non-negative")
    if total <= 0 or total_sq <= 0:
        return 1.0
    # 1 - ||g - u||^2 / ||g||^2 = (1 / n) / ||g||^2 with g = s / sum(s); floored at 1e-12 like the literal form.
    return 1.0 / math.sqrt(max(total * total / (n * total_sq), 1e-12))


def default_tau_threshold(presample_size: int, batch_size: int, backward_cost: float = 2.0) -> float:
    """``(B + (1 + c) b) / ((1 + c) b)``: the variance reduction that pays for scoring ``B`` samples
    with forward passes when a backward costs ``c`` forwards (``c = 2``: ``(B + 3b) / (3b)``,
    Katharopoulos & Fleuret 2018, eq. 29)."""
    for name, value in (("presample_size", presample_size), ("batch_size", batch_size)):
        if not value >= 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    if not (math.isfinite(backward_cost) and backward_cost > 0):
        raise ValueError(f"backward_cost must be a finite number > 0, got {backward_cost!r}")
    step = (1.0 + backward_cost) * batch_size
    return (presample_size + step) / step


def _check_draw(scores: torch.Tensor, num_samples: int) -> None:
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if scores.numel() == 0:
        raise ValueError("importance scores are empty: at least one scored sample is needed to draw from")


def importance_resample(
    scores: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``num_samples`` of the ``B`` scored samples with replacement, ``p_i`` proportional to
    ``scores_i``.

    Returns ``(indices (num_samples,), weights (num_samples,), p (B,))`` with ``w = 1 / (B p_i)``,
    so that ``mean_k w_k f(x_{i_k})`` is an unbiased estimate of ``mean_i f(x_i)`` over the presample.
    """
    scores = scores.detach().double().flatten()
    _check_draw(scores, num_samples)
    n = scores.numel()
    total = scores.sum()
    valid = ((scores >= 0) & (scores < math.inf)).all()
    total_value, ok = torch.stack([total, valid.double()]).tolist()  # one host read for both
    if not ok:
        raise ValueError("importance scores must be finite and non-negative")
    p = scores / total if total_value > 0 else torch.full_like(scores, 1.0 / n)
    indices = draw_indices(p, num_samples, generator)
    weights = (p[indices] * n).reciprocal_()
    return indices, weights, p


def merge_duplicates(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge repeated draws: ``(unique indices (m,), summed weights (m,))`` with ``m <= num_samples``.

    Sampling with replacement from a concentrated distribution repeats rows; a row drawn ``c`` times
    with weight ``w`` contributes ``c w L`` to the weighted loss, so training it once with weight
    ``c w = c / (B p)`` gives the same gradient for a fraction of the forward and backward work
    (exactly the same for models whose rows do not interact, i.e. without batch normalisation).
    """
    if indices.shape != weights.shape or indices.dim() != 1:
        raise ValueError(
            f"indices and weights must be 1-D of one length, got {tuple(indices.shape)} and {tuple(weights.shape)}"
        )
    unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    merged = torch.zeros(unique.shape[0], dtype=weights.dtype, device=weights.device)
    merged.index_add_(0, inverse.to(weights.device), weights)
    return unique, merged


class ImportanceDraw(NamedTuple):
    """What one importance-sampled step needs from the presample's ``B`` scores."""

    index: torch.Tensor  # (m,) the distinct rows drawn, ascending
    weights: torch.Tensor  # (m,) their summed unbiasing weights c / (B p)
    draws: torch.Tensor  # (num_samples,) every draw, repeats included
    draw_weights: torch.Tensor  # (num_samples,) 1 / (B p) of every draw
    p: torch.Tensor  # (B,) the sampling distribution
    tau: float  # the variance-reduction estimate of the scores (tau_from_scores)


def draw_indices(p: torch.Tensor, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``num_samples`` i.i.d. draws from the distribution ``p (B,)``, on ``p``'s device."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.multinomial(p.to(gen_device), num_samples, replacement=True, generator=generator).to(p.device)


def importance_sample(
    scores: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
) -> ImportanceDraw:
    """:func:`importance_resample`, :func:`merge_duplicates` and :func:`tau_from_scores` of one score
    vector ``(B,)`` with a single host read: the draws and weights are those of
    :func:`importance_resample` with the same generator, the merged rows those of
    :func:`merge_duplicates` (counted with ``bincount``, not sorted), and ``tau = sqrt(B ||p||^2)``
    (``p`` lies in [0, 1], so no rescaling is needed for extreme scores)."""
    scores = scores.detach().double().flatten()
    _check_draw(scores, num_samples)
    n = scores.numel()
    total = scores.sum()
    valid = ((scores >= 0) & (scores < math.inf)).all()
    p = scores / total
    total_value, sum_sq, ok = torch.stack([total, p.square().sum(), valid.double()]).tolist()
    if not ok:
        raise ValueError("importance scores must be finite and non-negative")
    if total_value > 0:
        tau = 1.0 / math.sqrt(max(1.0 / (n * sum_sq), 1e-12))  # as tau_from_scores, with p already normalised
    else:  # nothing to prefer: uniform draws, tau = 1
        p, tau = torch.full_like(scores, 1.0 / n), 1.0
    draws = draw_indices(p, num_samples, generator)
    draw_weights = (p[draws] * n).reciprocal_()
    counts = torch.bincount(draws, minlength=n)
    index = counts.nonzero().flatten()
    weights = counts[index].to(p.dtype).div_(p[index] * n)
    return ImportanceDraw(index, weights, draws, draw_weights, p, tau)


def weighted_loss(losses: torch.Tensor, weights: torch.Tensor, expected_items: torch.Tensor | float) -> torch.Tensor:
    """``sum_k w_k L_k / expected_items``: the importance-weighted training loss.

    ``expected_items`` is the number of target items a uniform batch of the same size holds on
    average (the batch size for sequence tasks), estimated from the presample for token tasks.
    """
    return (losses * weights.to(losses.dtype)).sum() / expected_items
