"""window-linear attention against an independent loop reference, exact softmax and its own recurrence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_efficient.attention import (
    HedgehogFeatureMap,
    WindowLinearParams,
    get_attention_kind,
    window_linear_attention,
    window_linear_attention_reference,
    window_linear_weights,
)


def loop_reference(q, k, v, window, scale, mask=None, eps=1e-6):
    """Row by row, straight from the definition: softmax weights on the window, elu+1 products before it."""
    b, h, n, d = q.shape
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    phi = lambda x: F.elu(x) + 1  # noqa: E731
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                num = torch.zeros(v.shape[-1], dtype=torch.float64)
                den = torch.tensor(0.0, dtype=torch.float64)
                near = [j for j in range(max(0, i - window + 1), i + 1) if mask is None or mask[bi, j]]
                if near:
                    s = torch.stack([q[bi, hi, i] @ k[bi, hi, j] * scale for j in near])
                    wts = torch.exp(s - s.max())
                    for wt, j in zip(wts, near):
                        num, den = num + wt * v[bi, hi, j], den + wt
                for j in range(0, i - window + 1):
                    if mask is None or mask[bi, j]:
                        wt = phi(q[bi, hi, i]) @ phi(k[bi, hi, j])
                        num, den = num + wt * v[bi, hi, j], den + wt
                out[bi, hi, i] = num / (den + eps)
    return out


def qkv(b=2, h=3, n=13, d=4, dv=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=gen, dtype=dtype), torch.randn(b, h, n, d, generator=gen, dtype=dtype),
            torch.randn(b, h, n, dv, generator=gen, dtype=dtype))


@pytest.mark.parametrize("window,n", [(1, 7), (3, 13), (4, 16), (5, 23), (30, 13)])
def test_matches_loop_reference(window, n):
    q, k, v = qkv(n=n)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, :3] = False  # left padding of the second row
    mask[0, n // 2] = False  # and a hole in the first
    expected = loop_reference(q, k, v, window, 0.7, mask)
    fast = window_linear_attention(q, k, v, window=window, scale=0.7, key_padding_mask=mask)
    quad = window_linear_attention_reference(q, k, v, window=window, scale=0.7, key_padding_mask=mask)
    real = mask[:, None, :, None].expand_as(expected)  # padded queries' outputs are not used
    torch.testing.assert_close(fast[real], expected[real], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(quad[real], expected[real], rtol=1e-10, atol=1e-10)


def test_exact_softmax_inside_the_window():
    q, k, v = qkv(n=11)
    out = window_linear_attention(q, k, v, window=11, eps=1e-12)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-10, atol=1e-10)
    # With a shorter window the first `window` rows are still exact softmax, the rest are not.
    short = window_linear_attention(q, k, v, window=4, eps=1e-12)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(short[:, :, :4], sdpa[:, :, :4], rtol=1e-10, atol=1e-10)
    assert (short[:, :, 4:] - sdpa[:, :, 4:]).abs().max() > 1e-3


@pytest.mark.parametrize("cuts", [[5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [9, 10], [2, 12]])
def test_state_hand_off_equals_one_call(cuts):
    q, k, v = qkv(n=13)
    fmap = HedgehogFeatureMap(3, 4)
    with torch.no_grad():
        fmap.weight.normal_(generator=torch.Generator().manual_seed(3))
    fmap = fmap.double()
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :4] = False
    full = window_linear_attention(q, k, v, window=4, feature_map=fmap, key_padding_mask=mask)
    outs, state, start = [], None, 0
    for end in [*cuts, 13]:
        sl = slice(start, end)
        out, state = window_linear_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], window=4, feature_map=fmap,
                                             key_padding_mask=mask[:, sl], state=state, return_state=True)
        outs.append(out)
        assert state.keys.shape[2] <= 3  # never more than window - 1 keys are kept
        start = end
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-10, atol=1e-10)


def test_gradcheck_and_weights_rows_sum_to_one():
    q, k, v = qkv(b=1, h=2, n=9, d=3, dv=2)
    for t in (q, k, v):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: window_linear_attention(a, b, c, window=3), (q, k, v))
    w = window_linear_weights(q.detach(), k.detach(), window=3)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 9, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert bool((w.triu(1) == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float64(dtype):
    q, k, v = qkv(n=40, d=16, dv=16)
    ref = window_linear_attention(q, k, v, window=8)
    out = window_linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), window=8)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=0.05, atol=0.03)


def test_registry_kind_and_errors():
    kind = get_attention_kind("window-linear")
    assert kind.supports_causal and kind.supports_recurrent
    q, k, v = qkv(n=6)
    out = kind.forward(q, k, v, kind.make_params(window=2), causal=True, scale=None)
    torch.testing.assert_close(out, window_linear_attention(q, k, v, window=2))
    # One query over all keys (decoding without a cache) is the last row of the causal result.
    last = kind.forward(q[:, :, -1:], k, v, kind.make_params(window=2), causal=False, scale=None)
    torch.testing.assert_close(last, out[:, :, -1:])
    with pytest.raises(ValueError, match="causal only"):
        kind.forward(q, k, v, kind.make_params(), causal=False)
    with pytest.raises(ValueError, match="window must be a positive int"):
        WindowLinearParams(window=0)
    with pytest.raises(ValueError, match="unknown feature map"):
        WindowLinearParams(feature_map="gelu")
    with pytest.raises(ValueError, match="as many queries as keys"):
        window_linear_attention(q[:, :, :2], k, v)
    with pytest.raises(ValueError, match="4 dimensions"):
        window_linear_attention(q[0], k, v)
    _, state = window_linear_attention(q, k, v, window=3, return_state=True)
    with pytest.raises(ValueError, match="do not fit"):
        window_linear_attention(q[:1], k[:1], v[:1], window=3, state=state)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -0.5, True, "0.5"])
def test_bad_scale_is_refused(scale):
    q, k, v = qkv(n=6)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        window_linear_attention(q, k, v, window=2, scale=scale)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        window_linear_weights(q, k, window=2, scale=scale)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        get_attention_kind("linear").forward(q, k, v, get_attention_kind("linear").make_params(feature_map="favor"),
                                             causal=True, scale=scale)


def test_state_of_another_window_or_size_is_refused():
    q, k, v = qkv(n=12)
    _, state = window_linear_attention(q, k, v, window=8, return_state=True)
    assert state.window == 8
    with pytest.raises(ValueError, match="built with window=8, not window=4"):
        window_linear_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], window=4, state=state)
    with pytest.raises(ValueError, match="built with window=8, not window=4"):
        window_linear_attention(q, k, v, window=4, state=state)
    # a state without its window recorded: the buffer size still gives a larger window away
    with pytest.raises(ValueError, match="more than window - 1 = 3"):
        window_linear_attention(q, k, v, window=4, state=state._replace(window=None))
    with pytest.raises(ValueError, match="do not fit"):
        window_linear_attention(q, k, v[..., :2], window=8, state=state)
    with pytest.raises(ValueError, match="state.linear.kv has shape"):
        bad = state._replace(linear=state.linear._replace(kv=state.linear.kv[..., :2]))
        window_linear_attention(q, k, v, window=8, state=bad)
    with pytest.raises(TypeError, match="WindowLinearState"):
        window_linear_attention(q, k, v, window=8, state=tuple(state))


def test_empty_sequence():
    q, k, v = qkv(n=0)
    out, state = window_linear_attention(q, k, v, window=3, return_state=True)
    assert out.shape == (2, 3, 0, 5) and state.keys.shape == (2, 3, 0, 4)
    q1, k1, v1 = qkv(n=9, seed=1)
    full = window_linear_attention(q1, k1, v1, window=3)
    # an empty call in the middle of a sequence changes nothing
    out_a, st = window_linear_attention(q1[:, :, :5], k1[:, :, :5], v1[:, :, :5], window=3, state=state,
                                        return_state=True)
    empty, st = window_linear_attention(q, k, v, window=3, state=st, return_state=True)
    assert empty.shape == (2, 3, 0, 5)
    out_b = window_linear_attention(q1[:, :, 5:], k1[:, :, 5:], v1[:, :, 5:], window=3, state=st)
    torch.testing.assert_close(torch.cat([out_a, out_b], dim=2), full)
