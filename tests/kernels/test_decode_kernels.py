"""The compiled decoding kernels (kernels/cpu/decode.cpp) against float64 PyTorch references.

``decode_gemv`` is ``torch.nn.functional.linear`` for a few rows; ``linear_decode_step`` is one token of causal
linear attention with the feature map applied inside, checked against :func:`linear_attention_step` run on its
PyTorch path in float64.
"""

import os

import pytest
import torch

from hf_efficient.attention.linear import LinearAttentionState, linear_attention_step
from hf_efficient_kernels import dispatch
from hf_efficient_kernels.cpu import decode_build_error, load_decode_extension

EPS = 1e-6


@pytest.fixture(scope="module")
def ops():
    if load_decode_extension() is None:
        # CI has a compiler, so a failed build there is a failure, not a skip.
        if os.environ.get("HF_EFFICIENT_REQUIRE_ASSETS") == "1":
            pytest.fail(f"the CPU decoding kernels did not build: {decode_build_error()}")
        pytest.skip(f"the CPU decoding kernels cannot be built here: {decode_build_error()}")
    return torch.ops.hf_efficient_decode_cpu


# --------------------------------------------------------------------------- decode_gemv
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("in_features,out_features", [(1, 1), (15, 3), (17, 33), (64, 5), (512, 7), (1408, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_float64_linear(ops, rows, in_features, out_features, bias):
    x = torch.randn(rows, 1, in_features)
    w = torch.randn(out_features, in_features)
    b = torch.randn(out_features) if bias else None
    got = ops.decode_gemv(x, w, b)
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (rows, 1, out_features) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * in_features**0.5)


def test_gemv_strided_inputs(ops):
    # x not contiguous; weight rows contiguous but further apart than in_features (a column slice)
    x = torch.randn(3, 40)[:, ::2]
    big = torch.randn(9, 50)
    w = big[:, 5:25]
    assert w.stride() == (50, 1)
    torch.testing.assert_close(ops.decode_gemv(x, w, None).double(), x.double() @ w.double().T, rtol=1e-5,
                               atol=1e-5)


def test_gemv_empty_sizes(ops):
    b = torch.randn(4)
    torch.testing.assert_close(ops.decode_gemv(torch.randn(1, 0), torch.randn(4, 0), b), b[None])
    assert ops.decode_gemv(torch.randn(1, 0), torch.randn(4, 0), None).eq(0).all()
    assert ops.decode_gemv(torch.randn(2, 6), torch.randn(0, 6), None).shape == (2, 0)


def test_gemv_nan_stays_in_its_row(ops):
    x = torch.randn(2, 32)
    w = torch.randn(5, 32)
    w[3, 7] = float("nan")
    x[1, 0] = float("inf")
    y = ops.decode_gemv(x, w, None)
    assert y[0, 3].isnan() and y[0, [0, 1, 2, 4]].isfinite().all()  # a NaN weight spoils its output only
    assert not y[1].isfinite().any()  # an infinite input reaches every output of its row


def test_gemv_refuses_bad_input(ops):
    with pytest.raises(RuntimeError, match="at most 4 rows"):
        ops.decode_gemv(torch.randn(5, 8), torch.randn(3, 8), None)
    with pytest.raises(RuntimeError, match="float32"):
        ops.decode_gemv(torch.randn(1, 8).double(), torch.randn(3, 8).double(), None)
    with pytest.raises(RuntimeError, match="features"):
        ops.decode_gemv(torch.randn(1, 8), torch.randn(3, 9), None)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.decode_gemv(torch.randn(1, 8), torch.randn(8, 3).T, None)
    with pytest.raises(RuntimeError, match="bias"):
        ops.decode_gemv(torch.randn(1, 8), torch.randn(3, 8), torch.randn(4))


def test_gemv_dispatch_routes(ops, monkeypatch):
    w = torch.randn(6, 8)
    assert dispatch.decode_gemv_kernel(torch.randn(1, 1, 8), w) is not None
    assert dispatch.decode_gemv_kernel(torch.randn(5, 1, 8), w) is None  # more rows: the BLAS product
    assert dispatch.decode_gemv_kernel(torch.randn(1, 8).double(), w.double()) is None
    trained = torch.randn(6, 8, requires_grad=True)
    assert dispatch.decode_gemv_kernel(torch.randn(1, 8), trained) is None  # no backward in the kernel
    with torch.no_grad():
        assert dispatch.decode_gemv_kernel(torch.randn(1, 8), trained) is not None
    assert dispatch.decode_gemv_kernel(torch.randn(1, 8), w, implementation="reference") is None
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.decode_gemv_kernel(torch.randn(1, 8), w) is None
    monkeypatch.setenv(dispatch.ENV_VAR, "kernel")  # forced kernels: routing still leaves training to PyTorch
    assert dispatch.decode_gemv_kernel(torch.randn(1, 8), trained) is None


# --------------------------------------------------------------------------- linear_decode_step
def _state(b, h, m, e, dtype=torch.float32):
    """A packed state as the cache keeps it: kv and k_sum are views into one (b, h, m, e + 1) tensor."""
    packed = torch.rand(b, h, m, e + 1, dtype=dtype) * 3
    return LinearAttentionState.unpack(packed)


def _reference(state, q, k, v, feature, mask=None, monkeypatch=None):
    """linear_attention_step on its PyTorch path in float64."""
    with monkeypatch.context() as m:
        m.setenv(dispatch.ENV_VAR, "reference")
        s64 = state.map(lambda t: t.double())
        new, out = linear_attention_step(s64, q.double(), k.double(), v.double(), feature_map=feature,
                                         key_padding_mask=None if mask is None else mask[:, None], eps=EPS)
    return new, out


@pytest.mark.parametrize("feature", ["elu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,d,e", [(1, 8, 64, 64), (2, 3, 5, 7), (3, 1, 1, 1)])
def test_step_matches_float64_reference(ops, monkeypatch, feature, dtype, b, h, d, e):
    state = _state(b, h, d, e)
    q, k = torch.randn(b, h, 1, d).to(dtype), torch.randn(b, h, 1, d).to(dtype)
    v = torch.randn(b, h, 1, e).to(dtype)
    kernel = dispatch.linear_decode_step_kernel(q, k, v, state.kv, state.k_sum, feature, EPS)
    assert kernel is not None
    out, packed = kernel()
    ref_state, ref_out = _reference(state, q, k, v, feature, monkeypatch=monkeypatch)
    assert out.dtype == dtype and packed.dtype == torch.float32 and packed.shape == (b, h, d, e + 1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(packed.double(), ref_state.packed(), rtol=1e-5, atol=1e-5)


def test_step_leaves_the_old_state_alone(ops):
    state = _state(2, 2, 4, 3)
    before = state.packed().clone()
    q, k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 3)
    _, packed = ops.linear_decode_step(q, k, v, state.kv, state.k_sum, None, 1, EPS)
    assert torch.equal(state.packed(), before)  # a reused cache or an unreordered beam still holds it
    assert not torch.equal(packed, before)


def test_step_padding_adds_nothing_even_nan(ops, monkeypatch):
    state = _state(2, 2, 4, 3)
    q, k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 3)
    k[1], v[1] = float("nan"), float("nan")  # the padded row's token is garbage
    mask = torch.tensor([True, False])
    out, packed = ops.linear_decode_step(q, k, v, state.kv, state.k_sum, mask, 1, EPS)
    assert torch.equal(packed[1], state.packed()[1])  # skipped, not multiplied by zero
    assert out[1].isfinite().all()
    k[1], v[1] = 0.5, 0.5  # finite garbage: compare the real row and the padded row with the reference
    out, packed = ops.linear_decode_step(q, k, v, state.kv, state.k_sum, mask, 1, EPS)
    ref_state, ref_out = _reference(state, q, k, v, "elu", mask, monkeypatch)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.double(), ref_state.packed(), rtol=1e-5, atol=1e-5)


def test_step_nan_confinement(ops):
    state = _state(1, 3, 4, 3)
    q, k, v = torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 3)
    q[0, 0, 0, 1] = float("nan")  # a NaN query spoils its own output only
    k[0, 1, 0, 2] = float("nan")  # a NaN key spoils its head's state and output
    out, packed = ops.linear_decode_step(q, k, v, state.kv, state.k_sum, None, 1, EPS)
    assert out[0, 0].isnan().all() and packed[0, 0].isfinite().all()
    assert out[0, 1].isnan().all() and packed[0, 1].isnan().any()
    assert out[0, 2].isfinite().all() and packed[0, 2].isfinite().all()


def test_step_refuses_bad_input(ops):
    state = _state(1, 2, 4, 3)
    q, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 3)
    with pytest.raises(RuntimeError, match="feature"):
        ops.linear_decode_step(q, q, v, state.kv, state.k_sum, None, 3, EPS)
    with pytest.raises(RuntimeError, match="one new token"):
        ops.linear_decode_step(q.expand(1, 2, 2, 4), q.expand(1, 2, 2, 4), v.expand(1, 2, 2, 3), state.kv,
                               state.k_sum, None, 1, EPS)
    with pytest.raises(RuntimeError, match="kv must be"):
        ops.linear_decode_step(q, q, v, state.kv[:, :, :3], state.k_sum, None, 1, EPS)
    with pytest.raises(RuntimeError, match="float32"):
        ops.linear_decode_step(q, q, v, state.kv.double(), state.k_sum.double(), None, 1, EPS)
    with pytest.raises(RuntimeError, match="key_mask"):
        ops.linear_decode_step(q, q, v, state.kv, state.k_sum, torch.ones(2, dtype=torch.bool), 1, EPS)


def test_step_dispatch_routes(ops):
    state = _state(1, 2, 4, 3)
    q, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 3)
    assert dispatch.linear_decode_step_kernel(q, q, v, state.kv, state.k_sum, "elu") is not None
    assert dispatch.linear_decode_step_kernel(q, q, v, state.kv, state.k_sum, "favor") is None
    assert dispatch.linear_decode_step_kernel(q.double(), q.double(), v.double(), state.kv, state.k_sum, "elu") is None
    two = q.expand(1, 2, 2, 4)
    assert dispatch.linear_decode_step_kernel(two, two, v.expand(1, 2, 2, 3), state.kv, state.k_sum, "elu") is None
    assert dispatch.linear_decode_step_kernel(q.requires_grad_(), q, v, state.kv, state.k_sum, "elu") is None


def test_linear_attention_step_uses_the_kernel_and_agrees(ops, monkeypatch):
    """The public step gives the same result whichever path runs, and keeps the cache's state layout."""
    state = _state(2, 4, 8, 8)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8)
    mask = torch.tensor([[1], [0]])
    calls = []
    real = dispatch.linear_decode_step_kernel
    monkeypatch.setattr(dispatch, "linear_decode_step_kernel", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    new, out = linear_attention_step(state, q, k, v, key_padding_mask=mask)
    assert calls
    ref_state, ref_out = _reference(state, q, k, v, "elu", mask[:, 0].bool(), monkeypatch)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.packed().double(), ref_state.packed(), rtol=1e-5, atol=1e-5)
    assert new.key_shift is None and new.kv.shape == (2, 4, 8, 8) and new.k_sum.shape == (2, 4, 8)


# --------------------------------------------------------------------------- linear_lm_decode_layer
def _block_reference(x, weights, rotary, state, heads, feature, eps, rms_eps):
    """A linear-lm block for one token, written out in float64: RMSNorm, q/k/v, rotary, the step, o, SwiGLU."""
    n1, wq, wk, wv, wo, n2, wg, wu, wd = (w.double() for w in weights)
    x = x.double()
    b, _, c = x.shape
    d = c // heads

    def rms(t, w):
        return t * torch.rsqrt(t.square().mean(-1, keepdim=True) + rms_eps) * w

    def heads_of(t):
        return t.view(b, 1, heads, d).transpose(1, 2)

    h = rms(x, n1)
    q, k, v = heads_of(h @ wq.T), heads_of(h @ wk.T), heads_of(h @ wv.T)
    if rotary is not None:
        cos, sin = (t.double() for t in rotary)

        def rot(t):
            return t * cos + torch.cat([-t[..., d // 2:], t[..., : d // 2]], dim=-1) * sin

        q, k = rot(q), rot(k)
    phi = (lambda t: torch.nn.functional.elu(t) + 1) if feature == "elu" else torch.relu
    pq, pk = phi(q)[:, :, 0], phi(k)[:, :, 0]  # (b, h, d)
    kv = state.kv.double() + pk[..., None] * v[:, :, 0, None, :]
    z = state.k_sum.double() + pk
    att = torch.einsum("bhm,bhme->bhe", pq, kv) / (torch.einsum("bhm,bhm->bh", pq, z)[..., None] + eps)
    x1 = x + att.reshape(b, 1, c) @ wo.T
    h2 = rms(x1, n2)
    g = h2 @ wg.T
    out = x1 + (torch.nn.functional.silu(g) * (h2 @ wu.T)) @ wd.T
    return out, torch.cat([kv, z[..., None]], dim=-1)


def _block_inputs(b, heads, d, inter, rope):
    c = heads * d
    g = torch.Generator().manual_seed(b * 100 + heads * 10 + d)
    weights = (1 + 0.1 * torch.randn(c, generator=g), *(0.2 * torch.randn(c, c, generator=g) for _ in range(4)),
               1 + 0.1 * torch.randn(c, generator=g), 0.2 * torch.randn(inter, c, generator=g),
               0.2 * torch.randn(inter, c, generator=g), 0.2 * torch.randn(c, inter, generator=g))
    rotary = None
    if rope:
        angle = torch.rand(b, 1, 1, d // 2, generator=g) * 6
        rotary = (torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin())
    x = torch.randn(b, 1, c, generator=g)
    return x, weights, rotary, _state(b, heads, d, d)


@pytest.mark.parametrize("feature", ["elu", "relu"])
@pytest.mark.parametrize("b,heads,d,inter,rope", [(1, 8, 64, 176, True), (3, 2, 6, 20, True), (4, 3, 5, 7, False),
                                                   (2, 1, 2, 3, True)])
def test_block_matches_float64_reference(ops, feature, b, heads, d, inter, rope):
    x, weights, rotary, state = _block_inputs(b, heads, d, inter, rope)
    before = state.packed().clone()
    kernel = dispatch.linear_lm_decode_layer_kernel(x, weights, rotary, state.kv, state.k_sum, heads, feature, EPS,
                                                    1e-6)
    assert kernel is not None
    out, packed = kernel()
    ref_out, ref_state = _block_reference(x, weights, rotary, state, heads, feature, EPS, 1e-6)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed.double(), ref_state, rtol=1e-4, atol=1e-4)
    assert torch.equal(state.packed(), before)  # the state passed in is not written


def test_block_nan_stays_in_its_row(ops):
    x, weights, rotary, state = _block_inputs(3, 2, 4, 8, True)
    x[1, 0, 3] = float("nan")
    out, packed = ops.linear_lm_decode_layer(x, *weights, *rotary, state.kv, state.k_sum, None, 2, 1, EPS, 1e-6)
    assert out[1].isnan().all() and packed[1].isnan().any()
    assert out[[0, 2]].isfinite().all() and packed[[0, 2]].isfinite().all()


def test_block_refuses_bad_input(ops):
    x, weights, rotary, state = _block_inputs(1, 2, 4, 8, True)
    args = (state.kv, state.k_sum, None, 2, 1, EPS, 1e-6)
    with pytest.raises(RuntimeError, match="q weight"):
        ops.linear_lm_decode_layer(x, weights[0], weights[1][:, :7], *weights[2:], *rotary, *args)
    with pytest.raises(RuntimeError, match="rows"):
        ops.linear_lm_decode_layer(x.expand(5, 1, 8).contiguous(), *weights, *rotary, *args)
    with pytest.raises(RuntimeError, match="both cos and sin"):
        ops.linear_lm_decode_layer(x, *weights, rotary[0], None, *args)
    with pytest.raises(RuntimeError, match="multiple of heads"):
        ops.linear_lm_decode_layer(x, *weights, *rotary, state.kv, state.k_sum, None, 3, 1, EPS, 1e-6)
    with pytest.raises(RuntimeError, match="kv must be"):
        ops.linear_lm_decode_layer(x, *weights, *rotary, state.kv[:, :, :2], state.k_sum, None, 2, 1, EPS, 1e-6)
    assert dispatch.linear_lm_decode_layer_kernel(x.double(), weights, rotary, state.kv, state.k_sum, 2, "elu", EPS,
                                                  1e-6) is None
    assert dispatch.linear_lm_decode_layer_kernel(x, weights, rotary, state.kv, state.k_sum, 2, "favor", EPS,
                                                  1e-6) is None
