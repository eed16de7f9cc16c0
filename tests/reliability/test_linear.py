"""Misuse and extreme inputs of the linear kinds: each cell gives a clear error or the correct result.

References: the quadratic definition written out here in float64, the same call on clean contiguous
inputs, and softmax's own confinement of non-finite values (a NaN query spoils its row; a NaN key
spoils the rows that see it).
"""

from __future__ import annotations

import pytest
import torch

from hf_efficient import linear_attention, linear_attention_step
from hf_efficient.attention import window_linear_attention

NAN, INF = float("nan"), float("inf")


def elu1(x):
    return torch.where(x > 0, x + 1.0, torch.exp(x))


def quadratic(q, k, v, causal, mask=None, eps=1e-6):
    """float64 linear attention with elu + 1 features, from the definition."""
    q, k, v = q.double(), k.double(), v.double()
    a = elu1(q) @ elu1(k).transpose(-1, -2)
    if mask is not None:
        a = a * mask[:, None, None, :].double()
    if causal:
        a = a.tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.fixture(params=["kernel", "reference"])
def implementation(request, monkeypatch):
    """Both implementations of the causal product: the compiled kernel (when it builds here) and PyTorch."""
    if request.param == "kernel":
        from hf_efficient_kernels.dispatch import available

        if not available()["cpu"]:
            pytest.skip("the CPU kernel cannot be built here")
    monkeypatch.setenv("HF_EFFICIENT_KERNELS", request.param)
    return request.param


def _step_all(q, k, v, **kw):
    state, outs = None, []
    for t in range(q.shape[2]):
        state, out = linear_attention_step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], **kw)
        outs.append(out)
    return torch.cat(outs, dim=2)


# Every public causal path, as a function of (q, k, v).
CAUSAL_PATHS = {
    "chunked": lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=4),
    "recurrent": _step_all,
    "window": lambda q, k, v: window_linear_attention(q, k, v, window=3, chunk_size=4),
}


# --------------------------------------------------------------------------- clear errors
@pytest.mark.parametrize("fn", [
    lambda q, k, v, **kw: linear_attention(q, k, v, **kw),
    lambda q, k, v, **kw: linear_attention(q, k, v, causal=True, **kw),
    lambda q, k, v, **kw: linear_attention_step(None, q, k, v, **kw),
    lambda q, k, v, **kw: window_linear_attention(q, k, v, **kw),
], ids=["linear", "causal", "step", "window"])
def test_bad_inputs_are_refused(fn):
    q = rand(2, 3, 5, 4)
    cells = [
        ((q[0], q[0], q[0]), {}, "4 dimensions"),
        ((q, q, q.unsqueeze(0)), {}, "4 dimensions"),
        ((q.long(), q.long(), q.long()), {}, "dtype torch.int64"),
        ((q, q.double(), q), {}, "share a dtype"),
        ((q, q[:1], q[:1]), {}, "batch and heads must match"),
        ((q, rand(2, 3, 5, 6), rand(2, 3, 5, 6)), {}, "same last dim"),
        ((q.numpy(), q, q), {}, "torch.Tensor"),
        ((q, q, q), {"key_padding_mask": torch.ones(2, 6, dtype=torch.bool)}, "key_padding_mask must be 2-D"),
        ((q, q, q), {"key_padding_mask": torch.ones(2, 1, 1, 5)}, "key_padding_mask must be 2-D"),
        ((q, q, q), {"key_padding_mask": torch.full((2, 5), 0.5)}, "only 0 and 1"),
        ((q, q, q), {"key_padding_mask": torch.ones(2, 5, dtype=torch.complex64)}, "dtype"),
        ((q, q, q), {"eps": NAN}, "eps must be a finite positive"),
        ((q, q, q), {"eps": -1.0}, "eps must be a finite positive"),
        ((q, q, q), {"feature_map": "softmax"}, "unknown feature map"),
        ((q, q, q), {"feature_map": 3}, "feature_map must be"),
    ]
    for args, kw, match in cells:
        with pytest.raises((ValueError, TypeError), match=match):
            fn(*args, **kw)


def test_bad_chunk_size_is_refused():
    q = rand(1, 1, 5, 4)
    for chunk in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            linear_attention(q, q, q, causal=True, chunk_size=chunk)
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            window_linear_attention(q, q, q, chunk_size=chunk)


# --------------------------------------------------------------------------- layouts and sizes
@pytest.mark.parametrize("causal", [False, True])
def test_stride_zero_and_non_contiguous_inputs(causal, implementation):
    b, h, n, d = 2, 3, 21, 8
    base = rand(b, n, h, d, seed=1)
    q = base.transpose(1, 2)  # non-contiguous
    k = rand(1, 1, n, d, seed=2).expand(b, h, n, d)  # stride 0 over batch and heads
    v = rand(b, h, n, 2 * d, seed=3)[..., ::2]  # every other column
    mask = torch.ones(b, 1, dtype=torch.bool).expand(b, n)  # stride-0 mask
    assert not q.is_contiguous() and k.stride(0) == 0 and not v.is_contiguous()
    out = linear_attention(q, k, v, causal=causal, key_padding_mask=mask, chunk_size=5)
    torch.testing.assert_close(out.double(), quadratic(q, k, v, causal), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, linear_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal,
                                                     chunk_size=5))
    if causal:
        torch.testing.assert_close(_step_all(q, k, v), out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(window_linear_attention(q, k, v, window=4),
                                   window_linear_attention(q.contiguous(), k.contiguous(), v.contiguous(), window=4))


@pytest.mark.parametrize("n", [1, 2])
def test_length_one_and_two(n, implementation):
    q, k, v = rand(2, 2, n, 4, seed=1), rand(2, 2, n, 4, seed=2), rand(2, 2, n, 3, seed=3)
    for causal in (False, True):
        torch.testing.assert_close(linear_attention(q, k, v, causal=causal).double(), quadratic(q, k, v, causal),
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_step_all(q, k, v).double(), quadratic(q, k, v, True), rtol=1e-5, atol=1e-6)
    if n == 1:  # one token: the softmax window holds only itself
        torch.testing.assert_close(window_linear_attention(q, k, v, window=2), v)


def test_all_padding_rows_give_zeros_not_nan(implementation):
    q, k, v = rand(2, 2, 9, 4, seed=1), rand(2, 2, 9, 4, seed=2), rand(2, 2, 9, 3, seed=3)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1] = False
    for causal in (False, True):
        out = linear_attention(q, k, v, causal=causal, key_padding_mask=mask)
        assert (out[1] == 0).all()
        torch.testing.assert_close(out[:1], linear_attention(q[:1], k[:1], v[:1], causal=causal))
    out = window_linear_attention(q, k, v, window=3, key_padding_mask=mask)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("dtype, big", [(torch.float16, 1e4), (torch.bfloat16, 1e15)])
def test_half_precision_large_magnitudes(dtype, big, implementation):
    # sums of phi(k) and phi(k) v would overflow in the input dtype; they accumulate in float32
    q, k = rand(1, 2, 64, 8, seed=1, dtype=dtype), rand(1, 2, 64, 8, seed=2, dtype=dtype)
    v = (rand(1, 2, 64, 4, seed=3) * big).to(dtype)
    k = (k.float() * big / 8).to(dtype)
    for causal in (False, True):
        out = linear_attention(q, k, v, causal=causal)
        assert out.dtype == dtype and torch.isfinite(out).all()
        ref = quadratic(q, k, v, causal)
        assert ((out.double() - ref).abs().amax(-1) / ref.abs().amax(-1)).max() < 2e-2


# --------------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("path", sorted(CAUSAL_PATHS))
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_bad_query_spoils_only_its_row(path, bad, implementation):
    q, k, v = rand(1, 2, 13, 4, seed=1), rand(1, 2, 13, 4, seed=2), rand(1, 2, 13, 3, seed=3)
    fn = CAUSAL_PATHS[path]
    clean = fn(q, k, v)
    q2 = q.clone()
    q2[0, 1, 6, 2] = bad
    out = fn(q2, k, v)
    others = [i for i in range(13) if i != 6]
    torch.testing.assert_close(out[:, :, others], clean[:, :, others], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[:, 0], clean[:, 0], rtol=1e-6, atol=1e-6)  # another head: untouched


@pytest.mark.parametrize("path", sorted(CAUSAL_PATHS))
@pytest.mark.parametrize("bad", [NAN, INF])
def test_bad_key_spoils_only_rows_that_see_it(path, bad, implementation):
    q, k, v = rand(1, 2, 13, 4, seed=1), rand(1, 2, 13, 4, seed=2), rand(1, 2, 13, 3, seed=3)
    fn = CAUSAL_PATHS[path]
    clean = fn(q, k, v)
    k2 = k.clone()
    k2[0, 1, 6, 2] = bad
    out = fn(q, k2, v)
    torch.testing.assert_close(out[:, 1, :6], clean[:, 1, :6], rtol=1e-6, atol=1e-6)  # rows before the key
    torch.testing.assert_close(out[:, 0], clean[:, 0], rtol=1e-6, atol=1e-6)
    # every row that sees it through phi(q).phi(k) is spoiled, as with softmax; inside the window the softmax
    # weight exp(q.k - max) of an infinite key can be exactly 0 (q.k = -inf), as with softmax itself
    first = 6 + 3 if path == "window" else 6
    assert not torch.isfinite(out[:, 1, first:]).all(-1).any()


def test_non_causal_bad_query_and_key(implementation):
    q, k, v = rand(1, 2, 13, 4, seed=1), rand(1, 2, 13, 4, seed=2), rand(1, 2, 13, 3, seed=3)
    clean = linear_attention(q, k, v)
    q2 = q.clone()
    q2[0, 1, 6, 0] = NAN
    out = linear_attention(q2, k, v)
    assert torch.isnan(out[0, 1, 6]).all()
    out[0, 1, 6] = clean[0, 1, 6]
    torch.testing.assert_close(out, clean)
    k2 = k.clone()
    k2[0, 1, 6, 0] = NAN
    out = linear_attention(q, k2, v)
    assert torch.isnan(out[0, 1]).all()  # every query sees every key
    torch.testing.assert_close(out[0, 0], clean[0, 0])


@pytest.mark.parametrize("path", ["chunked", "recurrent"])
def test_bad_value_spoils_only_rows_that_see_it(path, implementation):
    q, k, v = rand(1, 1, 13, 4, seed=1), rand(1, 1, 13, 4, seed=2), rand(1, 1, 13, 3, seed=3)
    fn = CAUSAL_PATHS[path]
    clean = fn(q, k, v)
    v2 = v.clone()
    v2[0, 0, 6, 1] = NAN
    out = fn(q, k, v2)
    torch.testing.assert_close(out[:, :, :6], clean[:, :, :6], rtol=1e-6, atol=1e-6)
    assert torch.isnan(out[0, 0, 6:, 1]).all()
    torch.testing.assert_close(out[0, 0, :, [0, 2]], clean[0, 0, :, [0, 2]], rtol=1e-6, atol=1e-6)
