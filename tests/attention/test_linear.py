"""Linear attention against an independent float64 quadratic reference written out here."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_efficient import (
    FavorFeatureMap,
    HedgehogFeatureMap,
    LinearAttentionState,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
)


def elu1(x):
    # elu(x) + 1 written out, independent of torch.nn.functional.elu
    return torch.where(x > 0, x + 1.0, torch.exp(x))


def quadratic(q, k, v, *, causal=False, mask=None, phi_q=elu1, phi_k=elu1, eps=1e-6):
    """out_i = sum_j a_ij v_j / (sum_j a_ij + eps), a_ij = phi(q_i).phi(k_j), in float64."""
    q, k, v = q.double(), k.double(), v.double()
    a = torch.einsum("bhim,bhjm->bhij", phi_q(q), phi_k(k))
    if mask is not None:
        a = a * mask[:, None, None, :].double()
    if causal:
        n_q, n_k = a.shape[-2:]
        a = a * torch.ones(n_q, n_k, dtype=torch.bool).tril()
    return torch.einsum("bhij,bhjd->bhid", a, v) / (a.sum(-1, keepdim=True) + eps)


def rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


shapes = st.tuples(
    st.integers(1, 3),  # batch
    st.integers(1, 3),  # heads
    st.integers(1, 40),  # n_q
    st.integers(1, 40),  # n_k
    st.integers(1, 9),  # d
    st.integers(1, 9),  # d_v
    st.integers(1, 17),  # chunk size
)


@settings(max_examples=40, deadline=None)
@given(shapes, st.booleans(), st.booleans())
def test_matches_quadratic_reference(shape, causal, padded):
    b, h, n_q, n_k, d, dv, chunk = shape
    if causal:
        n_k = n_q
    q, k, v = rand(b, h, n_q, d, seed=1), rand(b, h, n_k, d, seed=2), rand(b, h, n_k, dv, seed=3)
    mask = None
    if padded:
        mask = torch.rand(b, n_k, generator=torch.Generator().manual_seed(4)) > 0.3
    out = linear_attention(q, k, v, causal=causal, key_padding_mask=mask, chunk_size=chunk)
    ref = quadratic(q, k, v, causal=causal, mask=mask)
    assert out.shape == (b, h, n_q, dv)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name, fn", [("relu", torch.relu), ("elu", elu1)])
def test_named_feature_maps(name, fn):
    q, k, v = rand(2, 2, 13, 5, seed=1), rand(2, 2, 13, 5, seed=2), rand(2, 2, 13, 4, seed=3)
    for causal in (False, True):
        out = linear_attention(q, k, v, causal=causal, feature_map=name, chunk_size=4)
        torch.testing.assert_close(out, quadratic(q, k, v, causal=causal, phi_q=fn, phi_k=fn))


def test_different_query_and_key_maps():
    q, k, v = rand(1, 2, 11, 6, seed=1), rand(1, 2, 11, 6, seed=2), rand(1, 2, 11, 3, seed=3)
    out = linear_attention(q, k, v, causal=True, feature_map=("elu", "relu"), chunk_size=3)
    torch.testing.assert_close(out, quadratic(q, k, v, causal=True, phi_q=elu1, phi_k=torch.relu))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    q, k, v = (rand(1, 2, 7, 3, seed=s).requires_grad_() for s in (1, 2, 3))
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0]])
    fn = lambda q, k, v: linear_attention(q, k, v, causal=causal, key_padding_mask=mask, chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradients_match_reference_autograd():
    q, k, v = (rand(2, 2, 19, 4, seed=s).requires_grad_() for s in (1, 2, 3))
    grads = torch.autograd.grad(linear_attention(q, k, v, causal=True, chunk_size=5).square().sum(), (q, k, v))
    ref = torch.autograd.grad(quadratic(q, k, v, causal=True).square().sum(), (q, k, v))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_recurrent_equals_chunked_and_prefill_handoff():
    b, h, n, d = 2, 3, 23, 5
    q, k, v = rand(b, h, n, d, seed=1), rand(b, h, n, d, seed=2), rand(b, h, n, d, seed=3)
    full = linear_attention(q, k, v, causal=True, chunk_size=4)
    state, outs = None, []
    for t in range(n):
        state, out_t = linear_attention_step(state, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        outs.append(out_t)
    torch.testing.assert_close(torch.cat(outs, dim=2), full)
    # prefill the first 15 tokens with the chunked form, then decode the rest recurrently
    pre, st = linear_attention(q[:, :, :15], k[:, :, :15], v[:, :, :15], causal=True, return_state=True)
    assert isinstance(st, LinearAttentionState) and st.kv.shape == (b, h, d, d) and st.k_sum.shape == (b, h, d)
    torch.testing.assert_close(st.kv, state.kv.new_tensor(0) + _sum_state(k[:, :, :15], v[:, :, :15]))
    rest = []
    for t in range(15, n):
        st, out_t = linear_attention_step(st, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        rest.append(out_t)
    torch.testing.assert_close(torch.cat([pre, *rest], dim=2), full)
    # a second chunked call continuing from the state gives the same as one call
    tail = linear_attention(q[:, :, 15:], k[:, :, 15:], v[:, :, 15:], causal=True, initial_state=st_after(q, k, v, 15))
    torch.testing.assert_close(tail, full[:, :, 15:])


def _sum_state(k, v):
    return torch.einsum("bhnm,bhnd->bhmd", elu1(k), v)


def st_after(q, k, v, t):
    return LinearAttentionState(_sum_state(k[:, :, :t], v[:, :, :t]), elu1(k[:, :, :t]).sum(2))


@pytest.mark.parametrize("causal", [False, True])
def test_changing_padded_tokens_changes_nothing(causal):
    b, h, n, d = 2, 2, 16, 4
    q, k, v = rand(b, h, n, d, seed=1), rand(b, h, n, d, seed=2), rand(b, h, n, d, seed=3)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, :5] = False  # left padding
    mask[1, 12:] = False  # right padding
    out = linear_attention(q, k, v, causal=causal, key_padding_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[~mask[:, None, :, None].expand_as(k)] = 1e3
    v2[~mask[:, None, :, None].expand_as(v)] = -7.0
    out2 = linear_attention(q, k2, v2, causal=causal, key_padding_mask=mask.long())
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    # and the padded result equals attention over the real keys only
    ref = linear_attention(q[1:, :, :12], k[1:, :, :12], v[1:, :, :12], causal=causal)
    torch.testing.assert_close(out[1:, :, :12], ref)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_close_to_float64(dtype, tol, causal):
    q, k, v = (rand(2, 2, 300, 16, dtype=dtype, seed=s) for s in (1, 2, 3))
    out = linear_attention(q, k, v, causal=causal)
    assert out.dtype == dtype
    ref = quadratic(q, k, v, causal=causal)
    assert (out.double() - ref).abs().max() < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_finite_at_16k(dtype):
    # large activations: fp16 sums of phi(k) over 16k tokens would overflow (max 65504)
    q, k, v = (4 * rand(1, 2, 16384, 16, dtype=dtype, seed=s) for s in (1, 2, 3))
    for causal in (False, True):
        out = linear_attention(q, k, v, causal=causal)
        assert torch.isfinite(out).all()
    ref = quadratic(q[:, :, -64:], k, v, causal=False)
    torch.testing.assert_close(linear_attention(q, k, v)[:, :, -64:].double(), ref, rtol=3e-2, atol=3e-2)


def test_favor_approximates_softmax_and_improves_with_features():
    q, k, v = (0.5 * rand(1, 2, 64, 16, seed=s) for s in (1, 2, 3))
    exact = F.scaled_dot_product_attention(q, k, v)
    errors = []
    for m in (16, 256, 4096):
        fmap = FavorFeatureMap(16, num_features=m, seed=0)
        errors.append((linear_attention(q, k, v, feature_map=fmap) - exact).abs().mean().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02


def test_favor_seed_and_redraw():
    x = rand(1, 1, 5, 8, seed=1)
    a, b = FavorFeatureMap(8, seed=3), FavorFeatureMap(8, seed=3)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    before = a(x)
    a.redraw()
    assert a.seed == 4 and not torch.allclose(a(x), before)
    assert (a(x) > 0).all()


def test_hedgehog_map_is_learnable_and_positive():
    fmap = HedgehogFeatureMap(num_heads=2, head_dim=4)
    q, k, v = rand(1, 2, 9, 4, dtype=torch.float32, seed=1), rand(1, 2, 9, 4, dtype=torch.float32, seed=2), rand(
        1, 2, 9, 3, dtype=torch.float32, seed=3
    )
    feats = fmap(q)
    assert feats.shape == (1, 2, 9, 8) and (feats > 0).all()
    torch.testing.assert_close(feats[..., :4].sum(-1), torch.ones(1, 2, 9))
    linear_attention(q, k, v, causal=True, feature_map=fmap).sum().backward()
    assert fmap.weight.grad is not None and fmap.weight.grad.abs().sum() > 0


def _err(match, **kw):
    return pytest.raises((ValueError, TypeError), match=match)


def test_clear_errors():
    q = torch.randn(2, 3, 5, 4)
    with _err("4 dimensions"):
        linear_attention(q[0], q[0], q[0])
    with _err("batch and heads must match"):
        linear_attention(q, q[:1], q[:1])
    with _err("same last dim"):
        linear_attention(q, torch.randn(2, 3, 5, 6), torch.randn(2, 3, 5, 6))
    with _err("same sequence length"):
        linear_attention(q, q, torch.randn(2, 3, 6, 4))
    with _err("key_padding_mask must be 2-D"):
        linear_attention(q, q, q, key_padding_mask=torch.ones(2, 1, 1, 5))
    with _err("only 0 and 1"):
        linear_attention(q, q, q, key_padding_mask=torch.tensor([[0.0, -1e9, 0, 0, 0]] * 2))
    with _err("dtype"):
        linear_attention(q, q, q, key_padding_mask=torch.ones(2, 5, dtype=torch.complex64))
    with _err("unknown feature map 'softmax'"):
        linear_attention(q, q, q, feature_map="softmax")
    with _err("dtype torch.int64"):
        linear_attention(q.long(), q.long(), q.long())
    with _err("as many queries as keys"):
        linear_attention(q, torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4), causal=True)
    with _err("eps"):
        linear_attention(q, q, q, eps=0)


# --------------------------------------------------------------------------- favor at large norms
def _favor_estimator(fmap, q, k, v, causal, mask=None):
    """The FAVOR+ random-feature estimator written out in float64 from its exponents, without any eps:
    w_ij = sum_r exp(a_ir + b_jr) (a, b = W x / d^(1/4) - |x|^2 / (2 sqrt(d))), out = softmax_j(log w_ij) v."""
    d = q.shape[-1]
    w = fmap.projection.double()
    qd, kd = q.double() * d**-0.25, k.double() * d**-0.25
    a = qd @ w.T - 0.5 * qd.pow(2).sum(-1, keepdim=True)
    b = kd @ w.T - 0.5 * kd.pow(2).sum(-1, keepdim=True)
    logw = torch.logsumexp(a[..., :, None, :] + b[..., None, :, :], dim=-1)
    n_q, n_k = logw.shape[-2:]
    if mask is not None:
        logw = logw.masked_fill(~mask[:, None, None, :], float("-inf"))
    if causal:
        logw = logw.masked_fill(torch.ones(n_q, n_k, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(logw, dim=-1) @ v.double()


def _of_norm(norm, *shape, seed, dtype=torch.float32):
    x = rand(*shape, dtype=torch.float64, seed=seed)
    return (x / x.norm(dim=-1, keepdim=True) * norm).to(dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("norm_q, norm_k", [(48.0, 30.0), (64.0, 64.0), (1.0, 48.0)])
def test_favor_large_norms_match_float64_estimator(causal, norm_q, norm_k):
    d, n = 64, 37
    fmap = FavorFeatureMap(d, seed=1)
    q, k = _of_norm(norm_q, 2, 2, n, d, seed=1), _of_norm(norm_k, 2, 2, n, d, seed=2)
    v = rand(2, 2, n, d, dtype=torch.float32, seed=3)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, :6] = False
    ref = _favor_estimator(fmap, q, k, v, causal, mask)
    out = linear_attention(q, k, v, causal=causal, feature_map=fmap, key_padding_mask=mask, chunk_size=8)
    rows_with_keys = mask[:, None, :, None].cumsum(2).bool().expand_as(ref) if causal else torch.ones_like(ref).bool()
    assert out[rows_with_keys].abs().max() > 0.1  # the unshifted features gave all-zero rows here
    torch.testing.assert_close(out.double()[rows_with_keys], ref[rows_with_keys], rtol=1e-4, atol=1e-4)
    # float64 inputs: equal to the eps-free estimator up to eps (the normaliser's largest term is 1)
    out64 = linear_attention(q.double(), k.double(), v.double(), causal=causal, feature_map=fmap,
                             key_padding_mask=mask, chunk_size=5)
    torch.testing.assert_close(out64[rows_with_keys], ref[rows_with_keys], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        linear_attention_reference(q.double(), k.double(), v.double(), causal=causal, feature_map=fmap,
                                   key_padding_mask=mask),
        out64, rtol=1e-9, atol=1e-9)


def test_favor_recurrent_chunked_and_handoff_agree_at_large_norms():
    d, n = 64, 29
    fmap = FavorFeatureMap(d, seed=2)
    # norms that grow along the sequence: the per-feature shifts of the state must be raised as keys arrive
    q = _of_norm(48.0, 1, 2, n, d, seed=4, dtype=torch.float64)
    k = _of_norm(1.0, 1, 2, n, d, seed=5, dtype=torch.float64) * torch.linspace(1, 60, n, dtype=torch.float64)[:, None]
    v = rand(1, 2, n, 8, seed=6)
    full = linear_attention(q, k, v, causal=True, feature_map=fmap, chunk_size=4)
    torch.testing.assert_close(full, _favor_estimator(fmap, q, k, v, True), rtol=1e-5, atol=1e-5)
    state, outs = None, []
    for t in range(n):
        state, o = linear_attention_step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], feature_map=fmap)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-10, atol=1e-10)
    pre, st = linear_attention(q[:, :, :11], k[:, :, :11], v[:, :, :11], causal=True, feature_map=fmap,
                               return_state=True, chunk_size=3)
    assert st.key_shift is not None and st.key_shift.shape == (1, 2, d)
    st2, mid = linear_attention_step(st, q[:, :, 11:14], k[:, :, 11:14], v[:, :, 11:14], feature_map=fmap)
    tail = linear_attention(q[:, :, 14:], k[:, :, 14:], v[:, :, 14:], causal=True, feature_map=fmap,
                            initial_state=st2, chunk_size=6)
    torch.testing.assert_close(torch.cat([pre, mid, tail], dim=2), full, rtol=1e-10, atol=1e-10)


def test_favor_gradcheck_with_shifts():
    fmap = FavorFeatureMap(4, seed=0)
    q, k = (3 * rand(1, 1, 6, 4, seed=s) for s in (1, 2))
    v = rand(1, 1, 6, 2, seed=3)
    for causal in (False, True):
        args = tuple(t.clone().requires_grad_() for t in (q, k, v))
        fn = lambda q, k, v: linear_attention(q, k, v, causal=causal, feature_map=fmap, chunk_size=4)  # noqa: B023,E731
        assert torch.autograd.gradcheck(fn, args, atol=1e-5)


def test_favor_named_map_is_stabilised_and_scale_is_folded_once():
    from hf_efficient.attention.linear import fold_favor_scale

    q = _of_norm(48.0, 1, 1, 9, 64, seed=7)
    out = linear_attention(q, q, rand(1, 1, 9, 4, dtype=torch.float32, seed=8), feature_map="favor")
    assert (out.abs().amax(-1) > 0).all()
    x = torch.ones(1, 1, 2, 4)
    torch.testing.assert_close(fold_favor_scale(x, "favor", 0.25), x * 0.5)
    assert fold_favor_scale(x, "elu", 0.25) is x and fold_favor_scale(x, "favor", None) is x


# --------------------------------------------------------------------------- states and empty inputs
def test_state_of_another_size_is_refused():
    q = rand(2, 3, 4, 5, seed=1)
    state, _ = linear_attention_step(None, q, q, q)
    for bad in (q[:1], q[:, :2], rand(2, 3, 4, 6, seed=2)):
        with _err("state.kv has shape"):
            linear_attention_step(state, bad, bad, bad)
        with _err("initial_state.kv has shape"):
            linear_attention(bad, bad, bad, causal=True, initial_state=state)
    with _err("value dim"):
        linear_attention_step(state, q, q, rand(2, 3, 4, 2, seed=3))
    with _err("LinearAttentionState"):
        linear_attention_step((state.kv, state.k_sum), q, q, q)
    with _err("k_sum has shape"):
        linear_attention_step(state._replace(k_sum=state.k_sum[:1]), q, q, q)
    favor_state, _ = linear_attention_step(None, q, q, q, feature_map=FavorFeatureMap(5))
    with _err("built with the favor feature map"):
        linear_attention_step(favor_state, q, q, q)


def test_empty_sequences():
    q = rand(2, 3, 0, 5, seed=1)
    for causal in (False, True):
        for fmap in ("elu", FavorFeatureMap(5)):
            out = linear_attention(q, q, q, causal=causal, feature_map=fmap)
            assert out.shape == (2, 3, 0, 5)
    # queries but no keys: nothing to attend to, zero output
    out = linear_attention(rand(2, 3, 4, 5, seed=2), q, q)
    assert out.shape == (2, 3, 4, 5) and (out == 0).all()
    x = rand(2, 3, 7, 5, seed=3)
    out, st = linear_attention(x, x, x, causal=True, return_state=True)
    out0, st0 = linear_attention(q, q, q, causal=True, return_state=True, initial_state=st)
    assert out0.shape == (2, 3, 0, 5) and torch.equal(st0.kv, st.kv)
    st1, out1 = linear_attention_step(st, q, q, q)
    assert out1.shape == (2, 3, 0, 5) and torch.equal(st1.kv, st.kv) and torch.equal(st1.k_sum, st.k_sum)
    st2, _ = linear_attention_step(None, q, q, q)
    assert st2.kv.shape == (2, 3, 5, 5) and (st2.kv == 0).all()


@pytest.mark.parametrize("name", ["elu", "relu"])
def test_all_ones_mask_equals_no_mask(name):
    q, k, v = (rand(2, 2, 70, 8, dtype=torch.float32, seed=s) for s in (1, 2, 3))
    ones = torch.ones(2, 70, dtype=torch.long)
    out = linear_attention(q, k, v, causal=True, feature_map=name, key_padding_mask=ones)
    torch.testing.assert_close(out, linear_attention(q, k, v, causal=True, feature_map=name), rtol=0, atol=0)
    phi = {"elu": elu1, "relu": torch.relu}[name]
    torch.testing.assert_close(out.double(), quadratic(q, k, v, causal=True, phi_q=phi, phi_k=phi),
                               rtol=1e-4, atol=1e-5)
