"""Exact checks of the attention-sampling estimator, the samplers and the patch geometry."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hf_efficient.vision.attention_sampling.sampling import (
    attention_distribution,
    expectation,
    expectation_weights,
    extract_patches,
    negative_entropy,
    patch_top_left,
    sample_with_replacement,
    sample_without_replacement,
)


def _draw_orders(mode: str, k: int, n: int):
    if mode == "with_replacement":
        return itertools.product(range(k), repeat=n)
    return itertools.permutations(range(k), n)


def _order_probability(a: torch.Tensor, order: tuple[int, ...], mode: str) -> torch.Tensor:
    """Exact probability of drawing ``order`` (sequential draws, renormalised without replacement)."""
    p = torch.ones((), dtype=a.dtype)
    drawn = torch.zeros((), dtype=a.dtype)
    for i in order:
        if mode == "with_replacement":
            p = p * a[i]
        else:
            p = p * a[i] / (1 - drawn)
            drawn = drawn + a[i]
    return p


def _exact_expected_estimate_and_gradient(mode, k, n, weight_fn=expectation_weights, seed=0):
    """Enumerate every draw order: E[estimate], E[grad estimate] and the true value/gradient."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, k, generator=gen, dtype=torch.float64, requires_grad=True)
    proj = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(k, 4, generator=gen, dtype=torch.float64)
    c = torch.randn(3, generator=gen, dtype=torch.float64)

    def features():  # (k, 3): a nonlinear feature network of the patch at each position
        return torch.tanh(x @ proj.T)

    def attention():
        return attention_distribution(logits, smoothing=0.05)[0]

    true_value = (attention()[:, None] * features()).sum(0) @ c
    true_grads = torch.autograd.grad(true_value, [logits, proj])

    exp_value = torch.zeros((), dtype=torch.float64)
    exp_grads = [torch.zeros_like(logits), torch.zeros_like(proj)]
    total_p = torch.zeros((), dtype=torch.float64)
    for order in _draw_orders(mode, k, n):
        a = attention()
        idx = torch.tensor(order)
        p = _order_probability(a.detach(), order, mode)
        w = weight_fn(a[idx][None], mode)
        estimate = expectation(features()[idx][None], w)[0] @ c
        grads = torch.autograd.grad(estimate, [logits, proj])
        exp_value = exp_value + p * estimate.detach()
        exp_grads = [e + p * g for e, g in zip(exp_grads, grads, strict=True)]
        total_p = total_p + p
    assert torch.allclose(total_p, torch.ones((), dtype=torch.float64))
    return exp_value, exp_grads, true_value.detach(), true_grads


@pytest.mark.parametrize("mode", ["with_replacement", "without_replacement"])
@pytest.mark.parametrize(("k", "n"), [(3, 2), (4, 3), (5, 2), (4, 4)])
def test_estimator_and_gradient_are_exactly_unbiased(mode, k, n):
    value, grads, true_value, true_grads = _exact_expected_estimate_and_gradient(mode, k, n)
    torch.testing.assert_close(value, true_value, rtol=1e-12, atol=1e-12)
    for g, t in zip(grads, true_grads, strict=True):
        torch.testing.assert_close(g, t, rtol=1e-10, atol=1e-12)


def test_differentiating_the_remaining_mass_is_biased():
    """The enumeration can fail: letting gradients flow through 1 - S_j gives a biased gradient."""

    def leaky_weights(a: torch.Tensor, mode: str) -> torch.Tensor:
        n = a.shape[-1]
        remaining = 1.0 - (torch.cumsum(a, dim=-1) - a)  # not detached
        later = torch.arange(n - 1, -1, -1, dtype=a.dtype)
        return (remaining * a / a.detach() + later * a) / n

    value, grads, true_value, true_grads = _exact_expected_estimate_and_gradient(
        "without_replacement", 4, 3, weight_fn=leaky_weights
    )
    torch.testing.assert_close(value, true_value)  # the value is still unbiased ...
    assert (grads[0] - true_grads[0]).abs().max() > 1e-3  # ... the attention gradient is not


@pytest.mark.parametrize("mode", ["with_replacement", "without_replacement"])
def test_weights_sum_to_one(mode):
    a = attention_distribution(torch.randn(6, 20))
    idx = sample_without_replacement(a, 7) if mode == "without_replacement" else sample_with_replacement(a, 7)
    w = expectation_weights(a.gather(1, idx), mode)
    torch.testing.assert_close(w.sum(-1), torch.ones(6))


def test_gumbel_top_k_inclusion_frequencies_match_exact_probabilities():
    k, n, draws = 5, 2, 200_000
    a = torch.tensor([[0.4, 0.25, 0.15, 0.12, 0.08]], dtype=torch.float64)
    exact = torch.zeros(k, dtype=torch.float64)
    exact_first = a[0].clone()
    for order in itertools.permutations(range(k), n):
        p = _order_probability(a[0], order, "without_replacement")
        exact[list(order)] += p
    gen = torch.Generator().manual_seed(0)
    idx = sample_without_replacement(a.expand(draws, k), n, generator=gen)
    assert bool((idx[:, 0] != idx[:, 1]).all())
    freq = torch.bincount(idx.flatten(), minlength=k).double() / draws
    first = torch.bincount(idx[:, 0], minlength=k).double() / draws
    # 5 standard errors of a binomial frequency
    tol = 5 * torch.sqrt(exact * (1 - exact) / draws)
    assert bool(((freq - exact).abs() < tol).all()), (freq, exact)
    assert bool(((first - exact_first).abs() < 5 * torch.sqrt(exact_first / draws)).all())
    assert math.isclose(float(exact.sum()), n)


def test_sampling_respects_the_valid_mask_and_rejects_too_many_draws():
    logits = torch.zeros(2, 6)
    valid = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    a = attention_distribution(logits, valid, smoothing=0.1)
    assert bool((a[1, 3:] == 0).all())
    torch.testing.assert_close(a.sum(-1), torch.ones(2))
    idx = sample_without_replacement(a, 3, generator=torch.Generator().manual_seed(0))
    assert bool((idx[1] < 3).all())
    with pytest.raises(ValueError, match="distinct positions"):
        sample_without_replacement(a, 4)


def test_entropy_regulariser_sign():
    k = 16
    uniform = attention_distribution(torch.zeros(1, k))
    torch.testing.assert_close(negative_entropy(uniform), torch.tensor([-math.log(k)]))
    logits = torch.randn(1, k, requires_grad=True)
    peaked_before = attention_distribution(logits)
    penalty = negative_entropy(peaked_before).sum()
    assert float(penalty.detach()) > -math.log(k)  # any non-uniform map is penalised more than the uniform one
    penalty.backward()
    with torch.no_grad():
        after = attention_distribution(logits - 0.5 * logits.grad)  # a descent step on + lambda * penalty
    entropy = lambda p: float(-(p * p.log()).sum())  # noqa: E731
    assert entropy(after) > entropy(peaked_before)


def _reference_patches(images, top_left, ph, pw, sizes):
    """Loop reference: zero the padding area, pad every side by the patch size, slice."""
    b, c, h, w = images.shape
    out = torch.zeros(b, top_left.shape[1], c, ph, pw)
    for i in range(b):
        valid = images[i].clone()
        valid[:, sizes[i, 0] :, :] = 0
        valid[:, :, sizes[i, 1] :] = 0
        padded = F.pad(valid, (pw, pw, ph, ph))
        for j in range(top_left.shape[1]):
            r, col = top_left[i, j].tolist()
            out[i, j] = padded[:, r + ph : r + 2 * ph, col + pw : col + 2 * pw]
    return out


def test_patches_match_the_pixels_they_name_including_borders():
    images = torch.arange(2 * 3 * 20 * 30, dtype=torch.float32).reshape(2, 3, 20, 30) + 1
    sizes = torch.tensor([[20, 30], [14, 22]])  # second image padded in the batch
    top_left = torch.tensor(
        [
            [[0, 0], [-3, -4], [15, 25], [18, 28], [5, 10]],
            [[-2, 20], [10, -5], [12, 18], [0, 0], [-5, -5]],
        ]
    )
    got = extract_patches(images, top_left, (6, 7), sizes)
    assert got.shape == (2, 5, 3, 6, 7)
    torch.testing.assert_close(got, _reference_patches(images, top_left, 6, 7, sizes))
    # an interior patch is the exact slice of the image
    torch.testing.assert_close(got[0, 4], images[0, :, 5:11, 10:17])


def test_patch_centres_map_attention_cells_to_the_right_pixels():
    # a 4x5 attention map over a 40x50 image: cells of 10x10 pixels
    idx = torch.tensor([[0, 4, 19, 7]])
    tl = patch_top_left(idx, 5, torch.tensor([[10.0, 10.0]]), (6, 6))
    # cell (r, c) has centre (10 r + 5, 10 c + 5); the 6x6 patch starts 3 pixels before
    expected = torch.tensor([[[2, 2], [2, 42], [32, 42], [12, 22]]])
    assert torch.equal(tl, expected)
