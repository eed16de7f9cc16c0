"""The maths of importance sampling against independent references (autograd, exact formulas)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_efficient.training.scores import (
    autograd_logit_gradient_norm,
    cross_entropy_gradient_norm,
    cross_entropy_losses_tail_accurate,
    default_tau_threshold,
    importance_resample,
    importance_sample,
    merge_duplicates,
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
    # A cheaper backward (c = 1) makes scoring relatively dearer: a step costs (B + 2b) / (2b).
    assert default_tau_threshold(96, 32, backward_cost=1.0) == pytest.approx(160 / 64)
    assert default_tau_threshold(10, 5, backward_cost=4.0) == pytest.approx(35 / 25)
    with pytest.raises(ValueError, match="backward_cost"):
        default_tau_threshold(96, 32, backward_cost=float("nan"))
    with pytest.raises(ValueError, match="batch_size"):
        default_tau_threshold(96, 0)


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


def _margin_logits(margins: torch.Tensor, classes: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose label leads every other class by about ``margin`` (with some spread)."""
    g = torch.Generator().manual_seed(6)
    n = margins.numel()
    z = torch.randn(n, classes, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    z[torch.arange(n), labels] = z.max(dim=1).values + margins.double()
    return z.to(dtype), labels


def _float64_reference(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient norm and loss in float64 from the textbook formulas (one-hot materialised)."""
    z = z.double()
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    grad = p - F.one_hot(labels, z.shape[-1]).double()
    # In float64 1 - p_y itself cancels beyond margin ~36: take the label's entry from the others.
    others = p.scatter(-1, labels.unsqueeze(-1), 0.0)
    grad[torch.arange(z.shape[0]), labels] = -others.sum(-1)
    loss = torch.log1p(
        torch.exp(
            z.scatter(-1, labels.unsqueeze(-1), float("-inf")).logsumexp(-1)
            - z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        )
    )
    return grad.norm(dim=-1), loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("classes", [2, 10, 1000])
def test_scores_are_accurate_for_well_fit_samples(dtype, classes):
    """Margins up to 50: scores as small as 1e-22 keep float32's relative precision, never 0."""
    margins = torch.cat([torch.linspace(-5.0, 50.0, 56), torch.tensor([20.0, 35.0, 49.5])])
    z, labels = _margin_logits(margins, classes, dtype)
    want_norm, want_loss = _float64_reference(z, labels)  # the same (rounded) logits, in float64
    got = cross_entropy_gradient_norm(z, labels, "classification")
    assert got.dtype == torch.float32
    assert (got > 0).all()
    rel = ((got.double() - want_norm) / want_norm).abs()
    assert rel.max() < 1e-3, float(rel.max())
    loss = cross_entropy_losses_tail_accurate(z, labels, "classification")
    rel = ((loss.double() - want_loss) / want_loss).abs()
    assert (loss > 0).all() and rel.max() < 1e-3, float(rel.max())


def test_token_scores_are_accurate_for_well_fit_tokens():
    """Token tasks: the root of summed squares of per-token norms near 1e-20 does not underflow."""
    margins = torch.tensor([45.0, 46.0, 47.0, 48.0, 30.0, 49.0, 50.0, 44.0])
    z, labels = _margin_logits(margins, 7, torch.float32)
    z, labels = z.reshape(2, 4, 7), labels.reshape(2, 4)
    labels[1, 3] = -100
    want_tokens, want_loss_tokens = _float64_reference(z.reshape(8, 7), labels.reshape(8).clamp(min=0))
    mask = (labels.reshape(8) != -100).double()
    want = (want_tokens.pow(2) * mask).reshape(2, 4).sum(1).sqrt()
    got = cross_entropy_gradient_norm(z, labels, "token_classification")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0.0)
    want_loss = (want_loss_tokens * mask).reshape(2, 4).sum(1)
    got_loss = cross_entropy_losses_tail_accurate(z, labels, "token_classification")
    torch.testing.assert_close(got_loss.double(), want_loss, rtol=1e-4, atol=0.0)


def test_merged_duplicates_give_the_duplicated_batch_gradient():
    """Training each distinct row once with summed weights equals the explicit duplicated batch."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (12,), generator=g)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    scores = torch.tensor([50.0, 30.0] + [0.1] * 10, dtype=torch.float64)  # concentrated: many repeats
    draws, weights, _ = importance_resample(scores, 16, generator=g)
    unique, merged = merge_duplicates(draws, weights)
    assert unique.numel() < draws.numel()
    assert sorted(unique.tolist()) == sorted(set(draws.tolist()))
    # Reference: every draw as its own row, duplicates and all.
    dup_loss = weighted_loss(F.cross_entropy(x[draws] @ w, y[draws], reduction="none"), weights, 16.0)
    (dup_grad,) = torch.autograd.grad(dup_loss, w)
    loss = weighted_loss(F.cross_entropy(x[unique] @ w, y[unique], reduction="none"), merged, 16.0)
    (grad,) = torch.autograd.grad(loss, w)
    torch.testing.assert_close(grad, dup_grad, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(loss, dup_loss, rtol=1e-13, atol=0.0)
    for i, wi in zip(unique.tolist(), merged.tolist()):
        assert wi == pytest.approx(float((draws == i).sum()) / (12 * float(scores[i] / scores.sum())))
    with pytest.raises(ValueError, match="1-D of one length"):
        merge_duplicates(draws, weights[:3])


def test_tau_and_weights_for_tiny_and_spread_scores_match_float64_literals():
    """tau from the two sums and the weights 1 / (B p) equal the literal float64 definitions, for
    float32 scores of well-fit samples (down to 1e-38) beside large ones."""
    g = torch.Generator().manual_seed(9)
    exponents = torch.empty(64, dtype=torch.float64).uniform_(-38.0, 0.0, generator=g)
    scores = torch.pow(10.0, exponents).float()
    s = scores.double()
    gn, u = s / s.sum(), 1.0 / s.numel()
    literal = float((1 - ((gn - u) ** 2).sum() / (gn**2).sum()) ** -0.5)
    assert tau_from_scores(scores) == pytest.approx(literal, rel=1e-12)
    idx, w, p = importance_resample(scores, 500, generator=g)
    assert (scores[idx] > 0).all()
    torch.testing.assert_close(w, 1.0 / (s.numel() * (s / s.sum())[idx]), rtol=1e-15, atol=0.0)
    for bad in (float("nan"), float("inf"), -1e-30):
        spoiled = scores.clone()
        spoiled[5] = bad
        with pytest.raises(ValueError, match="finite and non-negative"):
            tau_from_scores(spoiled)
        with pytest.raises(ValueError, match="finite and non-negative"):
            importance_resample(spoiled, 4)


@pytest.mark.parametrize("case", ["spread", "concentrated", "tiny", "huge", "zeros", "one_positive"])
def test_fused_importance_sample_equals_the_separate_references(case):
    """importance_sample = importance_resample + merge_duplicates + tau_from_scores, from the same
    generator state: the same draws and weights, the same merged rows, the same tau."""
    g = torch.Generator().manual_seed(11)
    base = torch.rand(96, generator=g, dtype=torch.float64)
    scores = {
        "spread": base,
        "concentrated": torch.cat([torch.tensor([40.0, 25.0], dtype=torch.float64), base * 1e-3]),
        "tiny": base * 1e-200,
        "huge": base * 1e200,
        "zeros": torch.zeros(96, dtype=torch.float64),
        "one_positive": torch.zeros(96, dtype=torch.float64).index_fill_(0, torch.tensor([17]), 3.0),
    }[case]
    want_draws, want_w, want_p = importance_resample(scores, 128, generator=torch.Generator().manual_seed(5))
    got = importance_sample(scores, 128, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got.draws, want_draws)
    torch.testing.assert_close(got.draw_weights, want_w, rtol=0.0, atol=0.0)
    torch.testing.assert_close(got.p, want_p, rtol=0.0, atol=0.0)
    want_index, want_merged = merge_duplicates(want_draws, want_w)
    assert torch.equal(got.index, want_index)
    torch.testing.assert_close(got.weights, want_merged, rtol=1e-13, atol=0.0)
    assert got.tau == pytest.approx(tau_from_scores(scores), rel=1e-12)
    if case == "one_positive":
        assert got.index.tolist() == [17] and got.tau == pytest.approx(math.sqrt(96))
    with pytest.raises(ValueError, match="num_samples"):
        importance_sample(scores, 0)
    for bad in (float("nan"), float("inf"), -1.0):
        spoiled = scores.clone()
        spoiled[3] = bad
        with pytest.raises(ValueError, match="finite and non-negative"):
            importance_sample(spoiled, 4)
