"""The ``local`` kind (sliding-window softmax) against its quadratic definition and SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_efficient.attention.local import LocalAttentionParams, local_attention, local_attention_reference


def _qkv(n, d=8, b=2, h=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n", "window"), [(1, 1), (5, 1), (7, 3), (16, 4), (17, 5), (10, 40)])
def test_blocked_form_equals_the_quadratic_definition(causal, n, window):
    q, k, v = _qkv(n)
    mask = torch.rand(2, n, generator=torch.Generator().manual_seed(1)) > 0.3
    out = local_attention(q, k, v, window=window, causal=causal, key_padding_mask=mask)
    ref = local_attention_reference(q, k, v, window=window, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_reference_is_the_band_of_softmax():
    """Independent check of the reference: a loop over queries with softmax over the band's keys."""
    q, k, v = _qkv(9, b=1, h=1)
    w = 3
    ref = local_attention_reference(q, k, v, window=w, causal=False)
    for i in range(9):
        keys = [j for j in range(9) if abs(i - j) < w]
        s = (q[0, 0, i] @ k[0, 0, keys].T) / 8**0.5
        expected = torch.softmax(s, -1) @ v[0, 0, keys]
        torch.testing.assert_close(ref[0, 0, i], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_a_window_covering_the_sequence_is_softmax_attention(causal):
    q, k, v = _qkv(11, dtype=torch.float32)
    out = local_attention(q, k, v, window=11, causal=causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), rtol=1e-5, atol=1e-5)


def test_state_hand_off_at_every_cut_equals_one_call():
    n, w = 13, 4
    q, k, v = _qkv(n)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    whole = local_attention(q, k, v, window=w, causal=True, key_padding_mask=mask)
    for cut in range(n + 1):
        first, state = local_attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], window=w, causal=True,
                                       key_padding_mask=mask[:, :cut], return_state=True)
        assert state.keys.shape[2] <= w - 1  # bounded, whatever the length
        outs = [first]
        for t in range(cut, n):  # then one token at a time, as decoding does
            out, state = local_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], window=w, causal=True,
                                         key_padding_mask=mask[:, t:t + 1], state=state, return_state=True)
            outs.append(out)
        torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=0, atol=1e-12)


def test_gradients_match_float64_gradcheck():
    q, k, v = (t[:1, :2, :, :4].clone().requires_grad_() for t in _qkv(7))
    assert torch.autograd.gradcheck(lambda a, b, c: local_attention(a, b, c, window=3, causal=True), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: local_attention(a, b, c, window=2), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    q, k, v = _qkv(33, dtype=torch.float32)
    out = local_attention(q.to(dtype), k.to(dtype), v.to(dtype), window=8, causal=True)
    assert out.dtype == dtype
    ref = local_attention_reference(q, k, v, window=8, causal=True)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_non_finite_values_stay_in_the_band_they_reach():
    """As softmax: a NaN query spoils its own row; a NaN key only the rows whose band holds it."""
    q, k, v = _qkv(12, b=1, h=1)
    q[0, 0, 2, 0] = float("nan")
    k[0, 0, 9, 1] = float("nan")
    out = local_attention(q, k, v, window=2)
    bad = torch.isnan(out[0, 0]).any(-1).nonzero().flatten().tolist()
    assert bad == [2, 8, 9, 10]


def test_fully_padded_queries_get_zeros_and_empty_input_is_empty():
    q, k, v = _qkv(6)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0] = True
    out = local_attention(q, k, v, window=3, key_padding_mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(out).all()
    empty = local_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], window=3)
    assert empty.shape == (2, 3, 0, 8)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_bad_windows_are_refused(bad):
    q, k, v = _qkv(4)
    with pytest.raises(ValueError, match="window must be a positive int"):
        local_attention(q, k, v, window=bad)
    with pytest.raises(ValueError, match="window must be a positive int"):
        LocalAttentionParams(window=bad)


def test_misuse_of_states_is_refused():
    q, k, v = _qkv(10)
    _, state = local_attention(q, k, v, window=8, causal=True, return_state=True)
    with pytest.raises(ValueError, match="built with a larger window"):
        local_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], window=4, causal=True, state=state)
    with pytest.raises(ValueError, match="do not fit"):
        local_attention(q[:1, :, :1], k[:1, :, :1], v[:1, :, :1], window=8, causal=True, state=state)
    with pytest.raises(ValueError, match="need causal=True"):
        local_attention(q, k, v, window=8, state=state)
    with pytest.raises(ValueError, match="scale must be"):
        local_attention(q, k, v, window=8, scale=float("nan"))
