"""Multi-scale (nested) attention sampling: exact unbiasedness by enumeration, geometry, errors, round trip."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageClassification

from hf_efficient.vision import (
    AttentionSamplingConfig,
    AttentionSamplingForImageClassification,
    AttentionSamplingImageProcessor,
)
from hf_efficient.vision.attention_sampling.sampling import (
    attention_distribution,
    expectation,
    expectation_weights,
    nested_expectation_weights,
)


def _orders(mode: str, k: int, n: int) -> list[tuple[int, ...]]:
    if mode == "with_replacement":
        return list(itertools.product(range(k), repeat=n))
    return list(itertools.permutations(range(k), n))


def _probability(a: torch.Tensor, order: tuple[int, ...], mode: str) -> torch.Tensor:
    p, drawn = torch.ones((), dtype=a.dtype), torch.zeros((), dtype=a.dtype)
    for i in order:
        p = p * (a[i] if mode == "with_replacement" else a[i] / (1 - drawn))
        drawn = drawn + a[i]
    return p


def _nested_exact(mode, k1, r, k2, n, combine=nested_expectation_weights, seed=0):
    """Enumerate every joint draw of both levels: E[estimate], E[gradients] and the true ones.

    Level 1: ``r`` regions from ``a`` over ``k1`` regions (parameters ``logits1``). Level 2: in each
    drawn region ``i``, ``n`` positions from ``b^i`` over ``k2`` positions, whose logits come from a
    shared parameter ``theta2`` (a second attention network). Features: a nonlinear network
    (parameter ``proj``) of each position's input.
    """
    gen = torch.Generator().manual_seed(seed)
    logits1 = torch.randn(1, k1, generator=gen, dtype=torch.float64, requires_grad=True)
    theta2 = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    proj = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    x_att = torch.randn(k1, k2, 4, generator=gen, dtype=torch.float64)
    x_feat = torch.randn(k1, k2, 4, generator=gen, dtype=torch.float64)
    c = torch.randn(3, generator=gen, dtype=torch.float64)
    params = [logits1, theta2, proj]

    def level1():
        return attention_distribution(logits1, smoothing=0.05)[0]  # (k1,)

    def level2():
        return attention_distribution(x_att @ theta2, smoothing=0.05)  # (k1, k2)

    def features():
        return torch.tanh(x_feat @ proj.T)  # (k1, k2, 3)

    true_value = (level1()[:, None, None] * level2()[..., None] * features()).sum((0, 1)) @ c
    true_grads = torch.autograd.grad(true_value, params)

    # E[grad estimate] = grad sum_draws p * estimate with p held constant (linearity): one backward pass
    surrogate = torch.zeros((), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    a, b, f = level1(), level2(), features()
    inner = _orders(mode, k2, n)
    for regions in _orders(mode, k1, r):
        for within in itertools.product(inner, repeat=r):  # independent draws in each drawn region
            p = _probability(a.detach(), regions, mode)
            for region, order in zip(regions, within, strict=True):
                p = p * _probability(b[region].detach(), order, mode)
            u = expectation_weights(a[list(regions)][None], mode)  # (1, r)
            v = torch.stack(
                [expectation_weights(b[region, list(order)][None], mode)[0] for region, order in zip(regions, within)]
            )[None]  # (1, r, n)
            feats = torch.stack([f[region, j] for region, order in zip(regions, within) for j in order])[None]
            estimate = expectation(feats, combine(u, v))[0] @ c
            surrogate = surrogate + p * estimate
            total = total + p
    torch.testing.assert_close(total, torch.ones((), dtype=torch.float64))
    grads = torch.autograd.grad(surrogate, params, allow_unused=True)
    exp_grads = [torch.zeros_like(q) if g is None else g for q, g in zip(params, grads, strict=True)]
    exp_value = surrogate.detach()
    return exp_value, exp_grads, true_value.detach(), true_grads


@pytest.mark.parametrize("mode", ["with_replacement", "without_replacement"])
@pytest.mark.parametrize(("k1", "r", "k2", "n"), [(3, 2, 3, 2), (3, 3, 2, 2), (4, 1, 3, 3)])
def test_nested_estimator_and_both_attention_gradients_are_exactly_unbiased(mode, k1, r, k2, n):
    value, grads, true_value, true_grads = _nested_exact(mode, k1, r, k2, n)
    torch.testing.assert_close(value, true_value, rtol=1e-12, atol=1e-12)
    for name, g, t in zip(("level-1 attention", "level-2 attention", "features"), grads, true_grads, strict=True):
        assert t.abs().max() > 1e-3, name  # the check is not vacuous
        torch.testing.assert_close(g, t, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("mode", ["with_replacement", "without_replacement"])
def test_a_first_level_weight_without_its_gradient_fails_the_enumeration(mode):
    """Negative control: detaching the region weights keeps the value but loses level-1's gradient."""

    def detached(u, v):
        return (u.detach()[..., None] * v).flatten(1)

    value, grads, true_value, true_grads = _nested_exact(mode, 3, 2, 3, 2, combine=detached)
    torch.testing.assert_close(value, true_value)
    assert (grads[0] - true_grads[0]).abs().max() > 1e-3


def test_uniform_region_weights_are_biased_without_replacement():
    """Negative control: averaging the regions (1/R) instead of their estimator weights biases the value."""

    def uniform(u, v):
        return (torch.full_like(u, 1.0 / u.shape[-1])[..., None] * v).flatten(1)

    value, _, true_value, _ = _nested_exact("without_replacement", 3, 2, 3, 2, combine=uniform)
    assert abs(float(value - true_value)) > 1e-3


def test_nested_weights_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="position_weights"):
        nested_expectation_weights(torch.ones(2, 3), torch.ones(2, 4, 5))


def multiscale_config(**kwargs) -> AttentionSamplingConfig:
    defaults = dict(
        num_channels=1,
        patch_size=6,
        num_patches=4,
        region_size=16,
        num_regions=3,
        region_downsample=4,
        sampling="with_replacement",
        attention_channels=[4],
        feature_channels=[4, 8],
        num_labels=3,
    )
    defaults.update(kwargs)
    return AttentionSamplingConfig(**defaults)


def _coordinate_images() -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """Images whose pixel value encodes its (row, col): 1 + row * 100 + col (0 is reserved for outside)."""
    out = []
    for h, w in [(40, 36), (27, 44)]:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        out.append((1 + rows * 100 + cols).astype(np.float32))
    return out, [torch.from_numpy(a) for a in out]


def _expected_window(image: torch.Tensor, top: int, left: int, h: int, w: int) -> torch.Tensor:
    """Slice of ``image`` at (top, left) of size (h, w), zeros outside it (a loop-free reference by padding)."""
    pad = max(h, w)
    padded = F.pad(image, (pad, pad, pad, pad))
    return padded[top + pad : top + pad + h, left + pad : left + pad + w]


@pytest.mark.parametrize("mode", ["with_replacement", "without_replacement"])
def test_nested_patches_and_regions_map_back_to_the_right_pixels_including_borders(mode):
    arrays, images = _coordinate_images()
    proc = AttentionSamplingImageProcessor(low_res_scale=0.25, do_rescale=False, do_normalize=False)
    enc = proc(arrays)
    torch.manual_seed(0)
    model = AttentionSamplingForImageClassification(multiscale_config(sampling=mode)).eval()
    crossed_border = 0
    for seed in range(4):
        torch.manual_seed(seed)
        out = model(**enc, return_patches=True)
        for i, image in enumerate(images):
            for k, (top, left) in enumerate(out.region_top_left[i].tolist()):
                region = _expected_window(image, top, left, 16, 16)
                torch.testing.assert_close(out.region_pixel_values[i, k, 0], F.avg_pool2d(region[None], 4)[0])
                # cells of the middle view lying wholly outside the image get no attention
                outside = F.max_pool2d(region[None], 4)[0] == 0
                assert torch.equal(out.region_attention_maps[i, k] == 0, outside)
                torch.testing.assert_close(out.region_attention_maps[i, k].sum(), torch.tensor(1.0))
                for j in range(4):
                    row = k * 4 + j  # region-major
                    pt, pl = out.patch_top_left[i, row].tolist()
                    expected = _expected_window(image, pt, pl, 6, 6)
                    torch.testing.assert_close(out.patches[i, row, 0], expected)
                    # the patch is centred on the centre of its drawn 4x4 cell of the region
                    cell = int(out.region_sampled_positions[i, k, j])
                    assert (pt + 3, pl + 3) == (top + 4 * (cell // 4) + 2, left + 4 * (cell % 4) + 2)
                    h, w = image.shape
                    crossed_border += int(pt < 0 or pl < 0 or pt + 6 > h or pl + 6 > w)
    assert crossed_border > 0  # the borders were exercised


@pytest.mark.parametrize("mode", ["with_replacement", "without_replacement"])
def test_multiscale_model_combines_the_two_levels_and_trains_both_attentions(mode):
    torch.manual_seed(0)
    model = AttentionSamplingForImageClassification(multiscale_config(sampling=mode, entropy_regularizer=0.1))
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25)(list(np.random.default_rng(0).random((2, 32, 48))))
    labels = torch.tensor([0, 2])
    torch.manual_seed(1)
    out = model(**enc, labels=labels, return_patches=True)
    b, r, n = 2, 3, 4
    # the reported weights are the product of the two levels' estimator weights
    first = expectation_weights(out.attention_map.flatten(1).gather(1, out.sampled_positions), mode)
    second = expectation_weights(
        out.region_attention_maps.flatten(2).gather(2, out.region_sampled_positions).flatten(0, 1), mode
    ).view(b, r, n)
    torch.testing.assert_close(out.region_weights, first.detach())
    torch.testing.assert_close(out.sample_weights, (first[..., None] * second).flatten(1).detach())
    torch.testing.assert_close(out.sample_weights.sum(-1), torch.ones(b))
    # the regulariser covers the coarse map and the middle-view maps of the drawn regions
    def neg_entropy(p):
        return (p * torch.log(p + 1e-12)).sum(-1)

    penalty = neg_entropy(out.attention_map.flatten(1)).mean()
    penalty = penalty + neg_entropy(out.region_attention_maps.flatten(2)).mean()
    torch.testing.assert_close(out.entropy_penalty, penalty)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels) + 0.1 * out.entropy_penalty)
    # the classification loss alone (no regulariser) reaches both attention networks through the weights
    F.cross_entropy(out.logits, labels).backward()
    for net in (model.attention_network, model.region_attention_network, model.feature_network):
        assert net[0].weight.grad.abs().sum() > 0


def test_multiscale_logits_match_a_manual_forward():
    torch.manual_seed(0)
    model = AttentionSamplingForImageClassification(multiscale_config(normalize_features=True)).eval()
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25)(list(np.random.default_rng(1).random((2, 32, 32))))
    torch.manual_seed(3)
    out = model(**enc, return_patches=True)
    b, m = out.patches.shape[:2]
    features = F.normalize(model.feature_network(out.patches.flatten(0, 1)).view(b, m, -1), dim=-1)
    torch.testing.assert_close(out.logits, model.classifier((out.sample_weights[..., None] * features).sum(1)))


def test_multiscale_zero_init_starts_uniform_at_both_levels():
    torch.manual_seed(0)
    model = AttentionSamplingForImageClassification(multiscale_config(zero_init_attention=True))
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25)(np.random.default_rng(0).random((64, 64)))
    out = model(**enc)
    torch.testing.assert_close(out.attention_map, torch.full_like(out.attention_map, 1 / 256))
    interior = out.region_attention_maps[(out.region_attention_maps > 0).flatten(2).all(-1)]
    torch.testing.assert_close(interior, torch.full_like(interior, 1 / 16))


def test_multiscale_clear_errors_for_inconsistent_sizes():
    cases = [
        (dict(region_size=4, patch_size=6), "smaller than patch_size"),
        (dict(region_size=18, region_downsample=4), "must divide"),
        (dict(num_regions=0), "num_regions"),
        (dict(region_downsample=0), "region_downsample"),
        (dict(region_size=[16, 16, 16]), "region_size"),
        (dict(sampling="without_replacement", num_patches=17), "distinct positions"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            multiscale_config(**kwargs)
    model = AttentionSamplingForImageClassification(multiscale_config(region_size=32))
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25)(np.zeros((24, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="smaller than a region"):
        model(**enc)


def test_multiscale_save_load_round_trip_is_identical(tmp_path):
    torch.manual_seed(0)
    config = multiscale_config(sampling="without_replacement", region_attention_channels=[3, 5], region_size=[16, 24])
    model = AttentionSamplingForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.region_size == [16, 24] and loaded.config.region_attention_channels == [3, 5]
    assert loaded.region_attention_network[0].out_channels == 3
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25)(list(np.random.default_rng(2).random((2, 48, 40))))
    torch.manual_seed(5)
    a = model(**enc)
    torch.manual_seed(5)
    b = loaded(**enc)
    for key in ("logits", "attention_map", "region_attention_maps", "patch_top_left", "sample_weights"):
        assert torch.equal(a[key], b[key]), key
