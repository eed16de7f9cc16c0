"""The maths of importance sampling against independent references (autograd, exact formulas)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_efficient.training.scores import (
    autograd_logit_gradient_norm,
    cross_entropy_gradient_norm,
    default_tau_threshold,
    importance_resample,
    per_sample_losses,
    tau_from_scores,
    weighted_loss,
)


def _autograd_norms(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Reference: one backward per sample through plain F.cross_entropy, float64."""
    norms = []
    for i in range(logits.shape[0]):
        z = logits[i : i + 1].detach().double().requires_grad_(True)
        y = labels[i : i + 1]
        if kind == "causal_lm":
            loss = F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), y[:, 1:].reshape(-1), reduction="sum")
        elif kind == "token_classification":
            loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="sum")
        else:
            loss = F.cross_entropy(z, y, reduction="sum")
        (g,) = torch.autograd.grad(loss, z)
        norms.append(g.norm())
    return torch.stack(norms)


@pytest.mark.parametrize("kind", ["classification", "token_classification", "causal_lm"])
def test_closed_form_score_equals_autograd_gradient_norm(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "classification":
        logits = 3 * torch.randn(9, 5, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 5, (9,), generator=g)
    else:
        logits = 3 * torch.randn(4, 6, 7, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 7, (4, 6), generator=g)
        labels[0, 3:] = -100  # padding
        labels[2, :] = -100  # a sample without targets has zero gradient
    got = cross_entropy_gradient_norm(logits, labels, kind)
    want = _autograd_norms(logits, labels, kind)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if kind != "classification":
        assert got[2] == 0


def test_batched_autograd_score_matches_closed_form_and_regression():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 4, generator=g)
    labels = torch.randint(0, 4, (6,), generator=g)
    fn = lambda z, y: per_sample_losses(z, y, "classification")  # noqa: E731
    torch.testing.assert_close(
        autograd_logit_gradient_norm(logits, labels, fn), cross_entropy_gradient_norm(logits, labels, "classification")
    )
    # Squared error: d/dz (z - y)^2 = 2 (z - y).
    z, y = torch.randn(5, 1, generator=g), torch.randn(5, generator=g)
    reg = lambda a, b: per_sample_losses(a, b, "regression")  # noqa: E731
    torch.testing.assert_close(autograd_logit_gradient_norm(z, y, reg), 2 * (z.squeeze(1) - y).abs())


def test_per_sample_losses_sum_to_the_usual_losses():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 7, generator=g)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[1, 2:] = -100
    losses, items = per_sample_losses(logits, labels, "token_classification")
    ref = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1))
    torch.testing.assert_close(losses.sum() / items.sum(), ref)
    assert items.tolist() == [5.0, 2.0, 5.0]
    losses, items = per_sample_losses(logits, labels, "causal_lm")
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(losses.sum() / items.sum(), ref)


def test_tau_identities():
    # Uniform scores: nothing to gain, tau = 1, whatever their scale.
    assert tau_from_scores(torch.full((10,), 0.3)) == pytest.approx(1.0)
    assert tau_from_scores(torch.zeros(10)) == 1.0
    # All the mass on one sample: tau = sqrt(n).
    one_hot = torch.zeros(16)
    one_hot[3] = 2.0
    assert tau_from_scores(one_hot) == pytest.approx(4.0)
    # The definition, computed literally, for random scores; and scale invariance.
    s = torch.rand(50, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    gn, u = s / s.sum(), 1.0 / 50
    literal = (1 - ((gn - u) ** 2).sum() / (gn**2).sum()) ** -0.5
    assert tau_from_scores(s) == pytest.approx(float(literal))
    assert tau_from_scores(7 * s) == pytest.approx(float(literal))
    assert tau_from_scores(s) == pytest.approx(math.sqrt(50) * float(gn.norm()))
    assert tau_from_scores(s) > 1.0
    with pytest.raises(ValueError, match="non-negative"):
        tau_from_scores(torch.tensor([1.0, -1.0]))


def test_default_threshold_is_eq29():
    assert default_tau_threshold(96, 32) == pytest.approx(2.0)
    assert default_tau_threshold(32, 32) == pytest.approx(4.0 / 3.0)


def test_resample_weights_and_unbiasedness():
    g = torch.Generator().manual_seed(5)
    scores = torch.tensor([0.0, 1.0, 2.0, 5.0, 0.5, 1.5], dtype=torch.float64)
    values = torch.tensor([0.0, -1.0, 3.0, 2.0, 7.0, 1.0], dtype=torch.float64)  # f(x_i); f = 0 where score = 0
    idx, w, p = importance_resample(scores, 200_000, generator=g)
    torch.testing.assert_close(p, scores / scores.sum())
    torch.testing.assert_close(w, 1.0 / (6 * p[idx]))
    assert not (idx == 0).any()  # zero score, zero probability
    est = w * values[idx]
    stderr = est.std() / math.sqrt(est.numel())
    assert abs(est.mean() - values.mean()) < 5 * stderr
    # The weighted loss is the same estimator with a normaliser.
    losses = values[idx][:4].float().requires_grad_(True)
    torch.testing.assert_close(weighted_loss(losses, w[:4], 4.0), (w[:4].float() * losses).sum() / 4)
    with pytest.raises(ValueError, match="num_samples"):
        importance_resample(scores, 0)
