"""The compiled non-causal linear attention (feature map inside the kernel) against a quadratic float64 reference."""

import math
import os

import pytest
import torch

from hf_efficient_kernels import dispatch
from hf_efficient_kernels.cpu import build_error, load_extension, loader

EPS = 1e-6


@pytest.fixture(scope="module")
def ops():
    if load_extension() is None:
        # CI has a compiler, so a failed build there is a failure, not a skip.
        if os.environ.get("HF_EFFICIENT_REQUIRE_ASSETS") == "1":
            pytest.fail(f"the CPU kernel did not build: {build_error()}")
        pytest.skip(f"the CPU kernel cannot be built here: {build_error()}")
    from hf_efficient_kernels.ops import FUSED_FEATURES, linear_fused_op

    return linear_fused_op, FUSED_FEATURES


def phi(x, feature):
    return torch.where(x > 0, x + 1, torch.exp(x)) if feature == "elu" else x.clamp_min(0)


def quadratic(q, k, v, feature, mask=None):
    """out_i = sum_j w_ij v_j / (sum_j w_ij + eps), w_ij = phi(q_i) . phi(k_j), padded keys left out; float64."""
    q, k, v = q.double(), k.double(), v.double()
    w = phi(q, feature) @ phi(k, feature).transpose(-1, -2)
    if mask is not None:  # drop the padded keys outright (not a zero weight times their value)
        keep = mask[:, None, None, :]
        w = w.masked_fill(~keep, 0.0)
        v = v.masked_fill(~mask[:, None, :, None], 0.0)
    return (w @ v) / (w.sum(-1, keepdim=True) + EPS)


def inputs(b, h, n_q, n_k, d, d_v, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, h, n_k, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h, n_k, d_v, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(b, n_k, generator=g) > 0.3
    return q, k, v, mask


SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (2, 3, 5, 9, 4, 3),  # shorter than one chunk, n_q != n_k
    (1, 2, 64, 64, 16, 16),  # exactly one chunk
    (2, 1, 130, 77, 7, 9),  # chunks plus a ragged tail, odd sizes everywhere
    (1, 2, 200, 257, 64, 64),  # the real head size
    (1, 1, 100, 40, 33, 1),  # feature size not a multiple of the vector width
]
DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)]


@pytest.mark.parametrize("feature", ["elu", "relu"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_forward_matches_quadratic(ops, feature, shape, dtype, tol, masked):
    op, codes = ops
    q, k, v, mask = inputs(*shape, dtype=dtype)
    mask = mask if masked else None
    out, state, den = op(q, k, v, EPS, codes[feature], mask)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and state.dtype == den.dtype == acc
    # the reference sees the same rounded inputs, so the error is the kernel's float32 accumulation and the
    # rounding of the output only
    ref = quadratic(q, k, v, feature, mask)
    assert (out.double() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())
    keep = mask[:, None, :, None].double() if masked else 1.0
    fk = phi(k.double(), feature) * keep
    z = fk.sum(2)
    assert torch.allclose(state[..., -1].double(), z, rtol=1e-5, atol=1e-5)
    assert torch.allclose(den.double(), torch.einsum("bhim,bhm->bhi", phi(q.double(), feature), z),
                          rtol=1e-4, atol=1e-4)


def test_empty_sequences(ops):
    op, codes = ops
    q, k, v, _ = inputs(2, 2, 0, 5, 4, 3)
    out, _, _ = op(q, k, v, EPS, codes["elu"], None)
    assert out.shape == (2, 2, 0, 3)
    q, k, v, _ = inputs(2, 2, 6, 0, 4, 3)
    out, state, _ = op(q, k, v, EPS, codes["elu"], None)
    assert out.shape == (2, 2, 6, 3) and torch.equal(out, torch.zeros_like(out)) and not state.any()


@pytest.mark.parametrize("feature", ["elu", "relu"])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_float64(ops, feature, masked):
    op, codes = ops
    q, k, v, mask = inputs(2, 2, 70, 67, 5, 4, dtype=torch.float64, seed=1)
    if feature == "relu":  # keep inputs away from the kink at 0, where finite differences are meaningless
        q, k = q + 0.05 * q.sign(), k + 0.05 * k.sign()
    mask = mask if masked else None
    args = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: op(a, b, c, EPS, codes[feature], mask)[0], args)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_gradients_match_quadratic(ops, dtype, tol):
    op, codes = ops
    q, k, v, mask = inputs(1, 2, 150, 97, 16, 8, dtype=dtype, seed=2)
    g = torch.randn(1, 2, 150, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    op(*args, EPS, codes["elu"], mask)[0].backward(g.to(dtype))
    ref_args = [t.double().requires_grad_() for t in (q, k, v)]
    quadratic(*ref_args, "elu", mask).backward(g)
    for got, want in zip(args, ref_args):
        assert got.grad.dtype == dtype
        err = (got.grad.double() - want.grad).abs().max() / want.grad.abs().max()
        assert err < tol
    # padded keys get no gradient at all
    assert not args[1].grad[~mask[:, None].expand(-1, 2, -1)].any()
    assert not args[2].grad[~mask[:, None].expand(-1, 2, -1)].any()


def test_non_finite_is_confined(ops):
    op, codes = ops
    q, k, v, mask = inputs(1, 2, 40, 30, 8, 6, dtype=torch.float32, seed=4)
    elu = codes["elu"]
    # a NaN query spoils only its own row
    qn = q.clone()
    qn[0, 1, 7, 3] = float("nan")
    out = op(qn, k, v, EPS, elu, None)[0]
    bad = ~torch.isfinite(out)
    assert bad[0, 1, 7].all() and bad.sum() == out.shape[-1]
    # an inf query too (elu + 1 of inf is inf: inf / inf)
    qn[0, 1, 7, 3] = float("inf")
    assert (~torch.isfinite(op(qn, k, v, EPS, elu, None)[0])).sum() == out.shape[-1]
    # a NaN key is seen by every query of its head, and by no other head
    kn = k.clone()
    kn[0, 0, 11, 2] = float("nan")
    out = op(q, kn, v, EPS, elu, None)[0]
    assert torch.isnan(out[0, 0]).all() and torch.isfinite(out[0, 1]).all()
    # a NaN value spoils the column it sits in, for every query that sees its key
    vn = v.clone()
    vn[0, 1, 5, 4] = float("nan")
    out = op(q, k, vn, EPS, elu, None)[0]
    assert torch.isnan(out[0, 1, :, 4]).all() and (~torch.isfinite(out)).sum() == out.shape[2]
    # under a padded key, a NaN key or value changes nothing at all
    mask = torch.ones(1, 30, dtype=torch.bool)
    mask[0, 5] = False
    kn = k.clone()
    kn[0, :, 5] = float("nan")
    vn[0, :, 5] = float("inf")
    out = op(q, kn, vn, EPS, elu, mask)[0]
    assert torch.allclose(out.double(), quadratic(q, k, v, "elu", mask), atol=1e-5)


def test_linear_attention_uses_the_kernel_and_reference_agrees(ops, monkeypatch):
    from hf_efficient import linear_attention, linear_attention_reference

    q, k, v, mask = inputs(2, 2, 90, 120, 16, 8, seed=5)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    calls = []
    real = dispatch.linear_feature_map_kernel

    def spy(x, feature_map, implementation=None):
        run = real(x, feature_map, implementation)
        calls.append(run is not None)
        return run

    monkeypatch.setattr(dispatch, "linear_feature_map_kernel", spy)
    for feature in ("elu", "relu"):
        got = linear_attention(q, k, v, feature_map=feature, key_padding_mask=mask.int())
        ref = linear_attention_reference(q.double(), k.double(), v.double(), feature_map=feature,
                                         key_padding_mask=mask)
        assert (got.double() - ref).abs().max() < 1e-5
    assert calls == [True, True]
    # the PyTorch path (forced) gives the same result, padded values included
    v_bad = v.clone()
    v_bad[~mask[:, None].expand(-1, 2, -1)] = float("nan")
    fast = linear_attention(q, k, v_bad, key_padding_mask=mask)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    slow = linear_attention(q, k, v_bad, key_padding_mask=mask)
    assert torch.isfinite(fast).all() and torch.allclose(fast, slow, atol=1e-5)
    assert calls[-1] is False


def test_only_built_in_maps_and_cpu(ops, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    q = torch.randn(1, 1, 4, 4)
    assert dispatch.linear_feature_map_kernel(q, "favor") is None
    with pytest.raises(RuntimeError, match="favor"):
        dispatch.linear_feature_map_kernel(q, "favor", implementation="kernel")
    assert dispatch.linear_feature_map_kernel(q, "elu", implementation="reference") is None
    assert dispatch.linear_feature_map_kernel(q.to(torch.int32), "elu") is None


def test_falls_back_when_build_fails(monkeypatch):
    from hf_efficient import linear_attention, linear_attention_reference

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(loader, "_tried", True)
    monkeypatch.setattr(loader, "_module", None)
    monkeypatch.setattr(loader, "_error", "no C++ compiler found")
    q, k, v, mask = inputs(1, 2, 20, 30, 4, 3)
    assert dispatch.linear_feature_map_kernel(q, "elu") is None
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        dispatch.linear_feature_map_kernel(q, "elu", implementation="kernel")
    got = linear_attention(q, k, v, key_padding_mask=mask)
    ref = linear_attention_reference(q.double(), k.double(), v.double(), key_padding_mask=mask)
    assert (got.double() - ref).abs().max() < 1e-5


def test_bad_input_is_rejected(ops, monkeypatch):
    op, codes = ops
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    q, k, v, mask = inputs(1, 2, 8, 9, 4, 3)
    run = dispatch.linear_feature_map_kernel(q, "elu")
    with pytest.raises(ValueError, match="expected q"):
        run(q, k, v[:, :, :5], EPS)
    with pytest.raises(ValueError, match="expected q"):
        run(q, k[..., :3], v, EPS)
    with pytest.raises(ValueError, match="4 dimensions"):
        run(q[0], k, v, EPS)
    with pytest.raises(TypeError, match="v must be torch.float32"):
        run(q, k, v.double(), EPS)
    with pytest.raises(TypeError, match="key_mask must be torch.bool"):
        run(q, k, v, EPS, mask.int())
    with pytest.raises(ValueError, match="key_mask must be"):
        run(q, k, v, EPS, mask[:, :4])
    # the compiled op checks shapes itself before reading anything
    with pytest.raises(RuntimeError, match="v must be"):
        op(q, k, v[:, :, :5], EPS, codes["elu"], None)
    with pytest.raises(RuntimeError, match="key_mask"):
        op(q, k, v, EPS, codes["elu"], mask[:, :4])
    with pytest.raises(RuntimeError, match="feature"):
        op(q, k, v, EPS, 7, None)
    from hf_efficient_kernels.ops import linear_fused_backward_op

    out, state, den = op(q, k, v, EPS, codes["elu"], None)
    with pytest.raises(RuntimeError, match="state"):
        linear_fused_backward_op(q, k, v, out, den, state[..., :2], out, EPS, codes["elu"], None)
    with pytest.raises(RuntimeError, match="den"):
        linear_fused_backward_op(q, k, v, out, den[..., :3], state, out, EPS, codes["elu"], None)


def test_opcheck_and_extremes(ops):
    op, codes = ops
    q, k, v, mask = inputs(1, 2, 33, 21, 6, 5)
    torch.library.opcheck(op, (q, k, v, EPS, codes["elu"], mask))
    torch.library.opcheck(op, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), EPS, codes["relu"], None))
    # large negative inputs: elu + 1 = exp(x) stays a positive weight, no NaN from 0 / 0
    out = op(q.detach() * 1e3, k.detach() * 1e3, v.detach(), EPS, codes["elu"], None)[0]
    assert torch.isfinite(out).all()
    assert math.isfinite(out.abs().max().item())
