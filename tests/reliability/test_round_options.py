"""Misuse of the options and helpers added for decoding, importance sampling, megaNIST and the kernel
builds: a clear error naming what is accepted, or the right answer."""

from __future__ import annotations

import math

import pytest
import torch

from hf_efficient.training.importance_sampling import ImportanceSamplingConfig, scoring_autocast_dtype
from hf_efficient.training.scores import importance_resample, importance_sample
from hf_efficient.vision.megamnist import attention_on_digits, make_megamnist


@pytest.mark.parametrize("draw", [importance_sample, importance_resample])
def test_importance_draws_refuse_empty_nan_and_negative_scores(draw):
    with pytest.raises(ValueError, match="empty"):
        draw(torch.tensor([]), 4)
    with pytest.raises(ValueError, match="finite and non-negative"):
        draw(torch.tensor([1.0, math.nan, 2.0]), 4)
    with pytest.raises(ValueError, match="finite and non-negative"):
        draw(torch.tensor([1.0, -1e-3]), 4)
    with pytest.raises(ValueError, match="num_samples"):
        draw(torch.tensor([1.0, 2.0]), 0)


def test_importance_sample_all_zero_scores_draw_uniformly_with_unit_weights():
    got = importance_sample(torch.zeros(4), 64, generator=torch.Generator().manual_seed(0))
    assert got.tau == 1.0
    torch.testing.assert_close(got.p, torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(got.draw_weights, torch.ones(64, dtype=torch.float64))
    assert int(got.weights.sum().round()) == 64  # merged counts of unit weights add up to the draws


def test_score_dtype_refuses_unknown_precisions_by_name(tmp_path):
    with pytest.raises(ValueError, match="score_dtype must be one of auto, model, bfloat16, float16"):
        ImportanceSamplingConfig(output_dir=str(tmp_path), score_dtype="float64")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="score_dtype"):
        scoring_autocast_dtype("fp16", model, torch.device("cpu"))
    assert scoring_autocast_dtype("model", model, torch.device("cpu")) is None
    # a float64 model is never cast, whatever the hardware
    assert scoring_autocast_dtype("auto", model.double(), torch.device("cpu")) is None


def test_attention_on_digits_exact_masses_nan_confined_and_shapes_checked():
    # 112x112 images, 4x4 maps: each cell covers 28x28 pixels, so a digit at (0, 0) covers cell (0, 0) only
    uniform = torch.full((2, 4, 4), 1 / 16)
    boxes = torch.tensor([[[0, 0]], [[28, 56]]])
    sizes = torch.tensor([[112, 112], [112, 112]])
    torch.testing.assert_close(attention_on_digits(uniform, boxes, sizes), torch.tensor([1 / 16, 1 / 16]))
    peaked = torch.zeros(2, 4, 4)
    peaked[0, 0, 0] = peaked[1, 1, 2] = 1.0
    torch.testing.assert_close(attention_on_digits(peaked, boxes, sizes), torch.tensor([1.0, 1.0]))
    spoiled = uniform.clone()
    spoiled[1, 3, 3] = math.nan
    got = attention_on_digits(spoiled, boxes, sizes)
    assert got[0] == 1 / 16 and math.isnan(got[1])  # one image's NaN map does not reach another's
    with pytest.raises(ValueError, match=r"attention_map must be \(batch, h, w\)"):
        attention_on_digits(uniform[0], boxes, sizes)
    with pytest.raises(ValueError, match="digit_boxes must be"):
        attention_on_digits(uniform, boxes[:1], sizes)
    with pytest.raises(ValueError, match="image_sizes must be"):
        attention_on_digits(uniform, boxes, sizes[:, :1])
    with pytest.raises(ValueError, match="low_res_sizes must be"):
        attention_on_digits(uniform, boxes, sizes, low_res_sizes=torch.tensor([4, 4]))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_make_megamnist_refuses_bad_noise_pattern_counts(bad):
    with pytest.raises((ValueError, TypeError), match="num_noise_patterns"):
        make_megamnist(2, canvas_size=256, num_noise_patterns=bad)


def test_kernel_arch_refuses_a_non_march_value(monkeypatch):
    from hf_efficient_kernels.cpu import loader

    monkeypatch.setenv(loader.ARCH_ENV, "native $(touch /tmp/x)")
    with pytest.raises(ValueError, match="HF_EFFICIENT_KERNEL_ARCH"):
        loader._flag_sets()


@pytest.mark.parametrize("prefill", [3, 9])
def test_window_linear_ignores_nan_under_padding_in_prefill_state_and_steps(prefill):
    """A padded key whose key and value are NaN changes nothing: the same outputs and state as with zeros there."""
    from hf_efficient import window_linear_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, prefill, 8) for _ in range(3))
    mask = torch.ones(2, prefill, dtype=torch.bool)
    mask[0, 1] = False
    clean_k, clean_v = k.clone(), v.clone()
    clean_k[0, :, 1], clean_v[0, :, 1] = 0.0, 0.0
    k[0, :, 1], v[0, :, 1] = math.nan, math.nan
    results = []
    for kk, vv in ((k, v), (clean_k, clean_v)):
        out, state = window_linear_attention(q, kk, vv, window=2, key_padding_mask=mask, return_state=True)
        steps = []
        for t in range(3):  # decoding continues the state; the padded key leaves the window into the linear part
            step, state = window_linear_attention(q[:, :, t:t + 1], k[:, :, -1:] * 0 + t, v[:, :, -1:] * 0 + t,
                                                  window=2, state=state, return_state=True)
            steps.append(step)
        results.append((out[:, :, 2:], torch.cat(steps, 2)))
    (out, steps), (want_out, want_steps) = results
    assert torch.isfinite(out).all() and torch.isfinite(steps).all()
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(steps, want_steps)
