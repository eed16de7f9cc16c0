"""The compiled decoding kernels (kernels/cpu/decode.cpp) against float64 PyTorch references.

``decode_gemv`` is ``torch.nn.functional.linear`` for a few rows; ``linear_decode_step`` is one token of causal
linear attention with the feature map applied inside, checked against :func:`linear_attention_step` run on its
PyTorch path in float64; ``decode_rms_norm`` is ``torch.rms_norm``; the rotary tables are the Python expressions
bit for bit. The extension's direct calls (its Python module) and its ``torch.ops`` ops give the same results.
"""

import os

import pytest
import torch

from hf_efficient.attention.linear import LinearAttentionState, linear_attention_step
from hf_efficient.models.linear_lm import LinearLMConfig, LinearLMModel
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


# --------------------------------------------------------------------------- decoder_block_step, linear-lm layout
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
    kernel = _linear_lm_block(x, weights, rotary, state, heads, feature)
    assert kernel is not None
    out, kv, k_sum = kernel()
    ref_out, ref_state = _block_reference(x, weights, rotary, state, heads, feature, EPS, 1e-6)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(LinearAttentionState(kv, k_sum).packed().double(), ref_state, rtol=1e-4, atol=1e-4)
    assert torch.equal(state.packed(), before)  # the state passed in is not written


def _linear_lm_block(x, weights, rotary, state, heads, feature):
    """``decoder_block_step_kernel`` as linear-lm calls it: no biases, as many key/value heads as query heads,
    linear attention (window 0)."""
    d = x.shape[-1] // heads
    return dispatch.decoder_block_step_kernel(x, weights, (None,) * 7, rotary, {"kv": state.kv, "k_sum": state.k_sum},
                                              heads, heads, d, feature, 0, 1.0, EPS, 1e-6)


def _block_call(ops, x, weights, rotary, kv, k_sum, heads, d):
    cos, sin = rotary
    return ops.decoder_block_step(x, list(weights), [None] * 7, cos, sin, kv, k_sum, None, None, None, heads, heads, d,
                                  1, 0, 1.0, EPS, 1e-6)


def test_block_nan_stays_in_its_row(ops):
    x, weights, rotary, state = _block_inputs(3, 2, 4, 8, True)
    x[1, 0, 3] = float("nan")
    out, kv, k_sum = _block_call(ops, x, weights, rotary, state.kv, state.k_sum, 2, 4)
    packed = LinearAttentionState(kv, k_sum).packed()
    assert out[1].isnan().all() and packed[1].isnan().any()
    assert out[[0, 2]].isfinite().all() and packed[[0, 2]].isfinite().all()


def test_block_refuses_bad_input(ops):
    x, weights, rotary, state = _block_inputs(1, 2, 4, 8, True)
    kv, k_sum = state.kv, state.k_sum
    with pytest.raises(RuntimeError, match="decoder_block_step: q weight must be a contiguous float32 \\(8, 8\\)"):
        _block_call(ops, x, (weights[0], weights[1][:, :7], *weights[2:]), rotary, kv, k_sum, 2, 4)
    with pytest.raises(RuntimeError, match="rows"):
        _block_call(ops, x.expand(5, 1, 8).contiguous(), weights, rotary, kv, k_sum, 2, 4)
    with pytest.raises(RuntimeError, match="both cos and sin"):
        ops.decoder_block_step(x, list(weights), [None] * 7, rotary[0], None, kv, k_sum, None, None, None, 2, 2, 4, 1,
                               0, 1.0, EPS, 1e-6)
    with pytest.raises(RuntimeError, match="q weight"):  # 3 heads of 4 features do not make the width of 8
        _block_call(ops, x, weights, rotary, kv, k_sum, 3, 4)
    with pytest.raises(RuntimeError, match="kv has size 2 in dim 2"):
        _block_call(ops, x, weights, rotary, kv[:, :, :2], k_sum, 2, 4)
    assert _linear_lm_block(x.double(), weights, rotary, state, 2, "elu") is None
    assert _linear_lm_block(x, weights, rotary, state, 2, "favor") is None


# --------------------------------------------------------------------------- direct calls, final norm, rotary
@pytest.fixture(scope="module")
def calls(ops):
    dispatch._decode_cpu_kernel()
    assert dispatch._DECODE_CALLS is not None
    return dispatch._DECODE_CALLS


def test_direct_calls_are_the_ops(ops, calls):
    x, weights, rotary, state = _block_inputs(2, 2, 4, 8, True)
    w = torch.randn(5, 8)
    assert torch.equal(calls.decode_gemv(x, w, None), ops.decode_gemv(x, w, None))
    args = (list(weights), [None] * 7, *rotary, state.kv, state.k_sum, None, None, None, 2, 2, 4, 1, 0, 1.0, EPS, 1e-6,
            False)
    assert all(torch.equal(a, b) for a, b in zip(calls.decoder_block_step(x, *args), ops.decoder_block_step(x, *args)))
    with pytest.raises(RuntimeError, match="q weight"):  # the same checks, the same errors
        calls.decoder_block_step(x, [weights[0], weights[1][:, :7], *weights[2:]], *args[1:])


@pytest.mark.parametrize("shape", [(3, 1, 64), (1, 1, 512), (2, 5, 7), (4, 1, 1)])
def test_rms_norm_matches_float64_and_keeps_nan_in_its_row(calls, shape):
    x = torch.randn(shape) * 5
    weight = torch.randn(shape[-1])
    got = calls.decode_rms_norm(x, weight, 1e-6)
    xd = x.double()
    want = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-6) * weight.double()
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, torch.rms_norm(x, (shape[-1],), weight, 1e-6), rtol=1e-5, atol=1e-6)
    x[0, 0, 0] = float("nan")
    got = calls.decode_rms_norm(x, weight, 1e-6)
    assert got[0, 0].isnan().all() and got[1:].isfinite().all() and got[0, 1:].isfinite().all()


def test_rms_norm_refuses_bad_input(calls):
    x = torch.randn(2, 1, 8)
    assert calls.decode_rms_norm(torch.empty(0, 1, 8), torch.ones(8), 1e-6).shape == (0, 1, 8)
    assert calls.decode_rms_norm(torch.empty(2, 0), torch.ones(0), 1e-6).shape == (2, 0)
    with pytest.raises(RuntimeError, match="weight must be a contiguous float32 \\(8,\\)"):
        calls.decode_rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be"):
        calls.decode_rms_norm(x, torch.ones(16)[::2], 1e-6)
    with pytest.raises(RuntimeError, match="x must be a float32"):
        calls.decode_rms_norm(x.double(), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="x must be a float32"):
        calls.decode_rms_norm(torch.tensor(1.0), torch.ones(1), 1e-6)
    assert dispatch.decode_rms_norm_kernel(x.double(), torch.ones(8), 1e-6) is None
    assert dispatch.decode_rms_norm_kernel(x, torch.ones(7), 1e-6) is None
    assert dispatch.decode_rms_norm_kernel(x, torch.ones(8), 1e-6, implementation="reference") is None
    kernel = dispatch.decode_rms_norm_kernel(x[:, :, ::2], torch.ones(4), 1e-6)  # a strided x is read as it is
    assert torch.equal(kernel(), calls.decode_rms_norm(x[:, :, ::2].contiguous(), torch.ones(4), 1e-6))


@pytest.mark.parametrize("position", [0, 1, 1234, 123457, 2**24 - 1, 2**24 + 3])
@pytest.mark.parametrize("scaling", [1.0, 0.7])
def test_rotary_table_is_the_python_expression_bit_for_bit(calls, position, scaling):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    freqs = (inv_freq * float(position)).view(1, 1, -1)
    emb = torch.cat((freqs, freqs), dim=-1)
    want = (emb.cos() * scaling, emb.sin() * scaling) if scaling != 1.0 else (emb.cos(), emb.sin())
    got = dispatch.rotary_cos_sin_kernel(inv_freq, position, scaling)()
    assert all(g.shape == (1, 1, 64) and torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("head_dim,theta", [(2, 10000), (8, 10000), (64, 10000.0), (128, 500000.0), (64, 1e6)])
def test_rope_table_is_linear_lm_rotary_bit_for_bit(calls, head_dim, theta):
    config = LinearLMConfig(vocab_size=8, hidden_size=head_dim, num_attention_heads=1, num_hidden_layers=1,
                            intermediate_size=4, rope_theta=theta)
    model = LinearLMModel(config)
    for position in (0, 1, 77, 4096, 123457):
        want = model._rotary(torch.tensor([[position]]), torch.float32)
        got = dispatch.rope_cos_sin_kernel(head_dim, theta, position)()
        assert all(g.shape == w.shape == (1, 1, 1, head_dim) and torch.equal(g, w) for g, w in zip(got, want))


def test_rotary_tables_refuse_bad_input(calls):
    with pytest.raises(RuntimeError, match="head_dim must be even"):
        calls.rope_cos_sin(7, 10000.0, 3)
    with pytest.raises(RuntimeError, match="inv_freq must be a float32"):
        calls.rotary_cos_sin(torch.ones(4, dtype=torch.float64), 3, 1.0)
    with pytest.raises(RuntimeError, match="inv_freq must be a float32"):
        calls.rotary_cos_sin(torch.ones(2, 2), 3, 1.0)
    assert dispatch.rope_cos_sin_kernel(7, 10000.0, 3) is None
    assert dispatch.rope_cos_sin_kernel(0, 10000.0, 3) is None
    assert dispatch.rotary_cos_sin_kernel(torch.ones(4, dtype=torch.float64), 3, 1.0) is None
    assert dispatch.rotary_cos_sin_kernel(torch.ones(4), 3, 1.0, implementation="reference") is None


# --------------------------------------------------------------------------- a step's whole stack in one call
def _stack_inputs(blocks: int, b: int = 2, heads: int = 2, d: int = 4, inter: int = 8, vocab: int = 11):
    """``blocks`` linear-lm blocks of one width, each with weights and a state of its own, a final norm's weight and
    a head's weight and bias."""
    c = heads * d
    g = torch.Generator().manual_seed(blocks)
    layers = []
    for _ in range(blocks):
        weights = (1 + 0.1 * torch.randn(c, generator=g), *(0.3 * torch.randn(c, c, generator=g) for _ in range(4)),
                   1 + 0.1 * torch.randn(c, generator=g), 0.3 * torch.randn(inter, c, generator=g),
                   0.3 * torch.randn(inter, c, generator=g), 0.3 * torch.randn(c, inter, generator=g))
        state = _state(b, heads, d, d)
        layers.append((weights, state))
    angle = torch.rand(b, 1, 1, d // 2, generator=g) * 6
    rotary = (torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin())
    x = torch.randn(b, 1, c, generator=g)
    norm = 1 + 0.1 * torch.randn(c, generator=g)
    head = torch.randn(vocab, c, generator=g)
    return x, layers, rotary, norm, head, torch.randn(vocab, generator=g)


def _stack_blocks(x, layers, rotary, heads=2):
    return [_linear_lm_block(x, weights, rotary, state, heads, "elu") for weights, state in layers]


@pytest.mark.parametrize("tail", ["none", "norm", "head", "head+bias"])
@pytest.mark.parametrize("blocks", [1, 3])
def test_stack_is_its_blocks_norm_and_head_one_by_one(calls, tail, blocks):
    """The one call gives, bit for bit, what the blocks' own calls give in turn, then the final norm's and the
    head's: the same functions, with nothing between them."""
    x, layers, rotary, norm, head, bias = _stack_inputs(blocks)
    steps = _stack_blocks(x, layers, rotary)
    norm_args = None if tail == "none" else (norm, 1e-5)
    head_args = (head, bias if tail == "head+bias" else None) if tail.startswith("head") else None
    stack = dispatch.decoder_stack_kernel(x, steps, norm_args, head_args)
    assert stack is not None
    out, states = stack()
    hidden, want = x, []
    for step in steps:
        hidden, *state = step(hidden)
        want.append(state)
    if norm_args is not None:
        hidden = calls.decode_rms_norm(hidden, norm, 1e-5)
    if head_args is not None:
        hidden = calls.decode_gemv(hidden, *head_args)
    assert torch.equal(out, hidden) and out.shape == (2, 1, 11 if head_args else 8)
    assert len(states) == blocks and all(len(s) == 2 for s in states)
    assert all(torch.equal(a, b) for got, ref in zip(states, want) for a, b in zip(got, ref))
    # and the whole against float64: each block, the norm, the head
    ref = x.double()
    for weights, state in layers:
        ref, _ = _block_reference(ref.float(), weights, rotary, state, 2, "elu", EPS, 1e-6)
    if norm_args is not None:
        ref = ref * torch.rsqrt(ref.square().mean(-1, keepdim=True) + 1e-5) * norm.double()
    if head_args is not None:
        ref = ref @ head.double().T + (bias.double() if head_args[1] is not None else 0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_stack_kernel_routes_what_it_cannot_take_to_the_blocks(ops):
    x, layers, rotary, norm, head, bias = _stack_inputs(2)
    steps = _stack_blocks(x, layers, rotary)
    route = dispatch.decoder_stack_kernel
    assert route(x, steps, (norm, 1e-5), (head, bias)) is not None
    assert route(x, [], (norm, 1e-5)) is None
    assert route(x, steps, None, (head, None)) is None  # the head comes after the norm
    assert route(x, steps, (norm.double(), 1e-5)) is None
    assert route(x, steps, (norm[:-1], 1e-5)) is None
    assert route(x, steps, (torch.ones(16)[::2], 1e-5)) is None  # not contiguous
    assert route(x, steps, (norm, 1e-5), (head[:, :-1], None)) is None  # another width
    assert route(x, steps, (norm, 1e-5), (head.to(torch.bfloat16), None)) is None
    assert route(x, steps, (norm, 1e-5), (head.t().contiguous().t(), None)) is None  # columns, not rows
    overlapping = torch.randn(64).as_strided((11, 8), (1, 1))  # rows that overlap
    assert route(x, steps, (norm, 1e-5), (overlapping, None)) is None
    assert route(x, steps, (norm, 1e-5), (head, bias[:-1])) is None
    assert route(x, steps, (norm, 1e-5), (head, bias.double())) is None
    assert route(x, steps, (norm, 1e-5), (head, bias), implementation="reference") is None
    with torch.enable_grad():
        assert route(x, steps, (norm, 1e-5), (head.requires_grad_(), None)) is None


def test_stack_refuses_malformed_calls_with_an_error(calls):
    """The direct call checks what it is handed: an error that names it, never a crash."""
    x, layers, rotary, norm, head, bias = _stack_inputs(2)
    args = [step.arguments for step in _stack_blocks(x, layers, rotary)]
    with pytest.raises(RuntimeError, match="no blocks"):
        calls.decoder_stack_step(x, [], None, 0.0, None, None)
    with pytest.raises(RuntimeError, match="18 arguments after x, got 17"):
        calls.decoder_stack_step(x, [args[0][:-1]], None, 0.0, None, None)
    with pytest.raises(RuntimeError, match="Unable to cast"):
        calls.decoder_stack_step(x, [(1,) * 18], None, 0.0, None, None)
    with pytest.raises(RuntimeError, match="a head bias without a head weight"):
        calls.decoder_stack_step(x, args, norm, 1e-5, None, bias)
    with pytest.raises(RuntimeError, match="decode_rms_norm: weight must be"):
        calls.decoder_stack_step(x, args, norm[:-1], 1e-5, None, None)
    with pytest.raises(RuntimeError, match="decode_gemv: x has 8 features"):
        calls.decoder_stack_step(x, args, norm, 1e-5, head[:, :-1], None)
    with pytest.raises(RuntimeError, match="decode_gemv: bias must be a float32"):
        calls.decoder_stack_step(x, args, norm, 1e-5, head, bias[:-1])
    broken = list(args[1])
    broken[4] = broken[4][:, :, :2]  # the second block's kv of the wrong shape
    with pytest.raises(RuntimeError, match="kv has size 2 in dim 2"):  # raised after the first block ran
        calls.decoder_stack_step(x, [args[0], tuple(broken)], None, 0.0, None, None)
