"""The compiled causal linear attention kernel against an independent quadratic float64 reference."""

import os

import pytest
import torch

from hf_efficient import kernels
from hf_efficient_kernels import dispatch
from hf_efficient_kernels.cpu import build_error, load_extension, loader

CHUNK = 64


@pytest.fixture(scope="module")
def kernel_ops():
    ops = load_extension()
    if ops is None:
        # CI has a compiler, so a failed build there is a failure, not a skip.
        if os.environ.get("HF_EFFICIENT_REQUIRE_ASSETS") == "1":
            pytest.fail(f"the CPU kernel did not build: {build_error()}")
        pytest.skip(f"the CPU kernel cannot be built here: {build_error()}")
    from hf_efficient_kernels.ops import causal_linear_op

    return causal_linear_op


def quadratic(q, k, v, initial=None):
    """y_i = sum_{j <= i} (q_i . k_j) v_j + q_i^T initial, and the final state, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bhim,bhjm->bhij", q, k).tril()
    y = torch.einsum("bhij,bhje->bhie", scores, v)
    state = torch.einsum("bhjm,bhje->bhme", k, v)
    if initial is not None:
        y = y + q @ initial.double()
        state = state + initial.double()
    return y, state


def inputs(b, h, n, m, e, dtype=torch.float32, seed=0, initial=False):
    g = torch.Generator().manual_seed(seed)
    # Positive features, as a feature map gives; values of both signs.
    q = torch.rand(b, h, n, m, generator=g, dtype=torch.float64).to(dtype)
    k = torch.rand(b, h, n, m, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h, n, e, generator=g, dtype=torch.float64).to(dtype)
    init = torch.randn(b, h, m, e, generator=g, dtype=torch.float64).to(dtype) if initial else None
    return q, k, v, init


SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 3, 5, 4, 3),  # shorter than one chunk
    (1, 2, 64, 16, 17),  # exactly one chunk
    (2, 1, 130, 7, 9),  # chunks plus a ragged tail, odd sizes everywhere
    (1, 2, 257, 64, 65),  # the real head size: m = 64 features, e = d_v + 1
    (1, 1, 100, 33, 1),  # feature size not a multiple of the vector width
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_initial", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_quadratic(kernel_ops, shape, with_initial, dtype):
    q, k, v, init = inputs(*shape, dtype=dtype, initial=with_initial)
    y, state = kernel_ops(q, k, v, init)
    y_ref, state_ref = quadratic(q, k, v, init)
    assert y.dtype == dtype and state.dtype == dtype
    assert y.shape == v.shape and state.shape == (*q.shape[:2], q.shape[-1], v.shape[-1])
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    scale = y_ref.abs().max().clamp_min(1)
    assert (y.double() - y_ref).abs().max() / scale < tol
    assert (state.double() - state_ref).abs().max() / state_ref.abs().max().clamp_min(1) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(kernel_ops, dtype):
    # A long sequence: summing 2048 terms in 16-bit would drift by far more than one rounding of the output.
    q, k, v, init = inputs(1, 2, 2048, 16, 9, dtype=dtype, initial=True)
    y, state = kernel_ops(q, k, v, init)
    assert y.dtype == dtype and state.dtype == dtype
    y_ref, state_ref = quadratic(q, k, v, init)  # the same 16-bit inputs, exact sums
    rel = (y.double() - y_ref).abs() / y_ref.abs().clamp_min(y_ref.abs().mean())
    half_ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert rel.max() <= 2 * half_ulp
    assert ((state.double() - state_ref).abs() / state_ref.abs().clamp_min(1)).max() <= 2 * half_ulp


@pytest.mark.parametrize("shape", [(1, 2, 9, 3, 2), (2, 1, 20, 5, 4)])
@pytest.mark.parametrize("with_initial", [False, True])
def test_gradcheck_float64(kernel_ops, shape, with_initial):
    q, k, v, init = inputs(*shape, initial=with_initial, dtype=torch.float64)
    args = [t.requires_grad_() if t is not None else None for t in (q, k, v, init)]
    # Both outputs feed the loss, so grad_state is exercised as well as grad_y.
    assert torch.autograd.gradcheck(lambda *a: kernel_ops(*a, chunk=16), tuple(args))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("use_state", [False, True])
def test_gradients_match_quadratic(kernel_ops, dtype, tol, use_state):
    q, k, v, init = inputs(2, 2, 150, 16, 9, dtype=dtype, initial=True)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(v.shape, generator=g, dtype=torch.float64)
    gs = torch.randn(init.shape, generator=g, dtype=torch.float64) if use_state else None

    def grads(fn, tensors):
        tensors = [t.detach().requires_grad_() for t in tensors]
        y, state = fn(*tensors)
        loss = (y.double() * gy).sum() + ((state.double() * gs).sum() if use_state else 0)
        return torch.autograd.grad(loss, tensors)

    ours = grads(kernel_ops, (q, k, v, init))
    ref = grads(quadratic, (q.double(), k.double(), v.double(), init.double()))
    for name, a, b in zip(["phi_q", "phi_k", "v", "initial"], ours, ref):
        assert a.dtype == dtype
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < tol, f"d{name}: relative error {err:.2e}"


def test_opcheck(kernel_ops):
    q, k, v, init = inputs(2, 2, 70, 6, 5, initial=True)
    torch.library.opcheck(kernel_ops, (q, k, v, None))
    torch.library.opcheck(kernel_ops, (q.requires_grad_(), k.requires_grad_(), v, init.requires_grad_()))
    from hf_efficient_kernels.ops import causal_linear_backward_op

    torch.library.opcheck(causal_linear_backward_op, (q.detach(), k.detach(), v, init.detach(), v.clone(), None))


def test_torch_compile(kernel_ops):
    q, k, v, init = inputs(1, 2, 100, 8, 5, initial=True)

    def f(q, k, v, init):
        y, state = kernels.causal_linear(q, k, v, 64, init)
        return (y.sin().sum() + state.sum()) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_() for t in (q, k, v, init)]
    out = compiled(*args)
    out.backward()
    ref_args = [t.clone().double().requires_grad_() for t in (q, k, v, init)]
    y_ref, state_ref = quadratic(*ref_args)
    ref = (y_ref.sin().sum() + state_ref.sum()) * 2
    ref.backward()
    assert torch.allclose(out.double(), ref, rtol=1e-5)
    for a, b in zip(args, ref_args):
        assert (a.grad.double() - b.grad).abs().max() / b.grad.abs().max() < 1e-5


def test_dispatch_uses_kernel_and_linear_attention_matches(kernel_ops, monkeypatch):
    from hf_efficient import linear_attention, linear_attention_reference

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    q, k, v, _ = inputs(1, 2, 90, 8, 8)
    assert kernels.select_implementation(q) == "kernel"
    assert kernels.available()["cpu"] is True
    got = linear_attention(q - 0.5, k - 0.5, v, causal=True)
    ref = linear_attention_reference(q.double() - 0.5, k.double() - 0.5, v.double(), causal=True)
    assert (got.double() - ref).abs().max() < 1e-5


def test_environment_forces_reference(kernel_ops, monkeypatch):
    from hf_efficient.attention.linear import causal_linear_chunked

    q, k, v, init = inputs(1, 2, 90, 8, 8, initial=True)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert kernels.select_implementation(q) == "reference"
    assert kernels.available(build=False)["forced"] == "reference"
    y, state = kernels.causal_linear(q, k, v, 32, init)
    y_ref, state_ref = causal_linear_chunked(q, k, v, 32, init)
    assert torch.equal(y, y_ref) and torch.equal(state, state_ref)  # the same code ran, bit for bit
    # A per-call choice wins over the environment.
    assert kernels.select_implementation(q, "kernel") == "kernel"
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="HF_EFFICIENT_KERNELS"):
        kernels.causal_linear(q, k, v)


def test_falls_back_when_build_fails(monkeypatch):
    from hf_efficient.attention.linear import causal_linear_chunked

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(loader, "_tried", True)
    monkeypatch.setattr(loader, "_module", None)
    monkeypatch.setattr(loader, "_error", "no C++ compiler found")
    q, k, v, _ = inputs(1, 1, 40, 4, 3)
    assert kernels.select_implementation(q) == "reference"
    report = kernels.available()
    assert report["cpu"] is False and "compiler" in report["cpu_error"]
    y, _ = kernels.causal_linear(q, k, v)
    assert torch.equal(y, causal_linear_chunked(q, k, v)[0])
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        kernels.causal_linear(q, k, v, implementation="kernel")


def test_bad_input_is_rejected():
    q, k, v, _ = inputs(1, 1, 8, 4, 3)
    with pytest.raises(ValueError, match="implementation"):
        kernels.causal_linear(q, k, v, implementation="gpu")
    with pytest.raises(ValueError, match="batch, heads, n"):
        kernels.causal_linear(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="v \\(batch, heads, n, e\\)"):
        kernels.causal_linear(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="share a dtype"):
        kernels.causal_linear(q, k.double(), v)
    with pytest.raises(ValueError, match="initial must be"):
        kernels.causal_linear(q, k, v, initial=torch.zeros(1, 1, 3, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        kernels.causal_linear(q, k, [1.0])


# --------------------------------------------------------------------------- fused normaliser
def quadratic_normalized(q, k, v, initial=None, eps=1e-6):
    """out_i = num_i / (den_i + eps) from the quadratic sums, in float64; initial packs k_sum last."""
    ones = torch.ones_like(v[..., :1])
    y, state = quadratic(q, k, torch.cat([v, ones], -1), initial)
    return y[..., :-1] / (y[..., -1:] + eps), state


@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 3), (2, 1, 130, 7, 9), (1, 2, 257, 64, 64)])
@pytest.mark.parametrize("with_initial", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_normalized_forward_matches_quadratic(kernel_ops, shape, with_initial, dtype, tol):
    from hf_efficient_kernels.ops import causal_linear_normalized_op

    b, h, n, m, d = shape
    q, k, v, _ = inputs(b, h, n, m, d, dtype=dtype)
    init = torch.rand(b, h, m, d + 1, dtype=torch.float64).to(dtype) if with_initial else None
    out, state, den = causal_linear_normalized_op(q, k, v, init, 1e-3)
    ref, state_ref = quadratic_normalized(q, k, v, init, 1e-3)
    assert out.dtype == dtype and out.shape == v.shape and state.shape == (b, h, m, d + 1)
    assert den.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (out.double() - ref).abs().max() / ref.abs().max() < tol
    assert (state.double() - state_ref).abs().max() / state_ref.abs().max() < tol


@pytest.mark.parametrize("with_initial", [False, True])
def test_normalized_gradcheck_float64(kernel_ops, with_initial):
    from hf_efficient_kernels.ops import causal_linear_normalized_op

    q, k, v, _ = inputs(2, 1, 21, 4, 3, dtype=torch.float64)
    init = torch.rand(2, 1, 4, 4, dtype=torch.float64) if with_initial else None
    args = tuple(t.requires_grad_() if t is not None else None for t in (q, k, v, init))
    assert torch.autograd.gradcheck(lambda *a: causal_linear_normalized_op(*a, 1e-2, 16)[:2], args)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_normalized_gradients_match_quadratic(kernel_ops, dtype, tol):
    q, k, v, _ = inputs(2, 2, 150, 16, 8, dtype=dtype)
    gy = torch.randn(v.shape, dtype=torch.float64)

    def grads(fn, tensors):
        tensors = [t.detach().requires_grad_() for t in tensors]
        out = fn(*tensors)[0]
        return torch.autograd.grad((out.double() * gy).sum(), tensors)

    ours = grads(lambda *a: kernels.causal_linear_normalized(*a, implementation="kernel"), (q, k, v))
    ref = grads(quadratic_normalized, (q.double(), k.double(), v.double()))
    for name, a, b in zip(["phi_q", "phi_k", "v"], ours, ref):
        assert a.dtype == dtype
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < tol, f"d{name}: relative error {err:.2e}"


def test_normalized_opcheck_and_reference_path(kernel_ops):
    from hf_efficient_kernels.ops import causal_linear_normalized_backward_op, causal_linear_normalized_op

    q, k, v, _ = inputs(2, 2, 40, 6, 5)
    init = torch.rand(2, 2, 6, 6)
    torch.library.opcheck(causal_linear_normalized_op, (q, k, v, None, 1e-6))
    torch.library.opcheck(causal_linear_normalized_op, (q.requires_grad_(), k, v.requires_grad_(), init, 1e-6))
    out, _, den = causal_linear_normalized_op(q.detach(), k, v.detach(), None, 1e-6)
    torch.library.opcheck(causal_linear_normalized_backward_op,
                          (q.detach(), k, v.detach(), None, out, den, torch.randn_like(out), None, 1e-6))
    fast = kernels.causal_linear_normalized(q.detach(), k, v.detach(), 1e-6, init, implementation="kernel")
    slow = kernels.causal_linear_normalized(q.detach(), k, v.detach(), 1e-6, init, implementation="reference")
    for a, b in zip(fast, slow):
        assert (a - b).abs().max() < 1e-5
    with pytest.raises(ValueError, match="eps"):
        kernels.causal_linear_normalized(q, k, v, eps=0.0)
    with pytest.raises(ValueError, match="initial must be"):
        kernels.causal_linear_normalized(q, k, v, initial=torch.zeros(2, 2, 6, 5))


# --------------------------------------------------------------------------- feature map fused into the kernel
def _phi(name):
    # written out, independent of torch.nn.functional
    return {"elu": lambda x: torch.where(x > 0, x + 1.0, torch.exp(x)), "relu": lambda x: x.clamp_min(0.0)}[name]


def raw_inputs(b, h, n, d, e, dtype=torch.float32, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    q, k = (scale * torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, h, n, e, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("feature", ["elu", "relu"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 5, 4, 3), (2, 1, 130, 7, 9), (1, 2, 257, 64, 64),
                                   (1, 1, 100, 33, 1)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_fused_feature_map_forward_matches_quadratic(kernel_ops, feature, shape, dtype, tol):
    from hf_efficient_kernels.ops import FUSED_FEATURES, causal_linear_fused_op

    b, h, n, d, e = shape
    q, k, v = raw_inputs(b, h, n, d, e, dtype=dtype)
    init = torch.rand(b, h, d, e + 1, dtype=torch.float64).to(dtype)
    phi = _phi(feature)
    for initial in (None, init):
        out, state, _ = causal_linear_fused_op(q, k, v, initial, 1e-3, 64, FUSED_FEATURES[feature])
        ref, state_ref = quadratic_normalized(phi(q.double()), phi(k.double()), v, initial, 1e-3)
        assert (out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30) < tol
        assert (state.double() - state_ref).abs().max() / state_ref.abs().max().clamp_min(1e-30) < tol


@pytest.mark.parametrize("feature", ["elu", "relu"])
@pytest.mark.parametrize("with_initial", [False, True])
def test_fused_feature_map_gradcheck_float64(kernel_ops, feature, with_initial):
    from hf_efficient_kernels.ops import FUSED_FEATURES, causal_linear_fused_op

    q, k, v = raw_inputs(2, 1, 37, 5, 3, dtype=torch.float64, scale=1.0)
    init = torch.rand(2, 1, 5, 4, dtype=torch.float64) if with_initial else None
    args = tuple(t.requires_grad_() if t is not None else None for t in (q, k, v, init))
    fn = lambda *a: causal_linear_fused_op(*a, 1e-2, 16, FUSED_FEATURES[feature])[:2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_fused_linear_attention_values_and_gradients(kernel_ops, dtype, tol, monkeypatch):
    """The user-facing call (which takes the fused path) against the PyTorch path and a float64 reference."""
    import hf_efficient

    q, k, v = raw_inputs(2, 2, 150, 16, 8, dtype=dtype, scale=1.0)
    gy = torch.randn(v.shape, dtype=torch.float64)

    def grads(tensors):
        tensors = [t.detach().requires_grad_() for t in tensors]
        out = hf_efficient.linear_attention(*tensors, causal=True)
        return out, torch.autograd.grad((out.double() * gy).sum(), tensors)

    out, ours = grads((q, k, v))
    monkeypatch.setenv("HF_EFFICIENT_KERNELS", "reference")  # PyTorch features and products in float64
    ref_out, ref = grads((q.double(), k.double(), v.double()))
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    for name, a, b in zip("qkv", ours, ref):
        assert a.dtype == dtype
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < tol, f"d{name}: relative error {err:.2e}"


def test_fused_feature_map_extremes_and_opcheck(kernel_ops):
    from hf_efficient_kernels.ops import causal_linear_fused_backward_op, causal_linear_fused_op

    # the vectorised exp over its whole range: far below underflow, around 0, positive
    x = torch.linspace(-120, 20, 2003, dtype=torch.float64).reshape(1, 1, -1, 1)
    v = torch.ones_like(x)
    _, state, den = causal_linear_fused_op(x.float(), x.float(), v.float(), None, 1e-6, 64, 1)
    ref = torch.where(x > 0, x + 1, torch.exp(x)).squeeze()
    assert ((state[0, 0, 0, 0].double() - ref.sum()) / ref.sum()).abs() < 1e-6
    assert ((den.double().squeeze() - ref * ref.cumsum(0)).abs() / (ref * ref.cumsum(0)).clamp_min(1e-30)
            )[x.squeeze() > -87].max() < 1e-5
    q, k, vv = raw_inputs(2, 2, 40, 6, 5)
    init = torch.rand(2, 2, 6, 6)
    torch.library.opcheck(causal_linear_fused_op, (q, k, vv, None, 1e-6, 64, 1))
    torch.library.opcheck(causal_linear_fused_op, (q.requires_grad_(), k, vv.requires_grad_(), init, 1e-6, 64, 2))
    out, _, den = causal_linear_fused_op(q.detach(), k, vv.detach(), None, 1e-6, 64, 1)
    torch.library.opcheck(causal_linear_fused_backward_op,
                          (q.detach(), k, vv.detach(), None, out, den, torch.randn_like(out), None, 1e-6, 64, 1))
    with pytest.raises(RuntimeError, match="feature"):
        causal_linear_fused_op(q.detach(), k, vv.detach(), None, 1e-6, 64, 7)


@pytest.mark.parametrize("feature", ["elu", "relu"])
def test_fused_feature_map_key_mask(kernel_ops, feature):
    from hf_efficient_kernels.ops import FUSED_FEATURES, causal_linear_fused_op

    q, k, v = raw_inputs(2, 2, 45, 5, 3, dtype=torch.float64, scale=1.0)
    mask = torch.rand(2, 45, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[1, :7] = False
    phi = _phi(feature)
    out, state, _ = causal_linear_fused_op(q, k, v, None, 1e-3, 16, FUSED_FEATURES[feature], mask)
    ref, state_ref = quadratic_normalized(phi(q), phi(k) * mask[:, None, :, None], v, None, 1e-3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state, state_ref, rtol=1e-10, atol=1e-12)
    # padded keys: any value, even NaN, changes nothing and gets no gradient
    k2 = k.clone()
    k2[~mask[:, None, :, None].expand_as(k)] = float("nan")
    out2, _, _ = causal_linear_fused_op(q, k2, v, None, 1e-3, 16, FUSED_FEATURES[feature], mask)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    args = tuple(t.clone().requires_grad_() for t in (q, k, v))
    fn = lambda q, k, v: causal_linear_fused_op(q, k, v, None, 1e-2, 16, FUSED_FEATURES[feature], mask)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    dk = torch.autograd.grad(fn(*args)[0].sum(), args[1])[0]
    assert (dk[~mask[:, None, :, None].expand_as(dk)] == 0).all()


# --------------------------------------------------------------------------- the token-major forward
@pytest.mark.parametrize("shape,dtype,tol", [
    ((1, 2, 300, 64, 64), torch.float32, 2e-5),  # several forward blocks; rows written straight out
    ((1, 1, 700, 6, 40), torch.float32, 2e-5),  # state rows not a multiple of the register block, padded columns
    ((1, 1, 300, 64, 64), torch.float64, 1e-12),  # two groups of value columns (8 lanes a vector)
    ((1, 2, 150, 5, 24), torch.float64, 1e-12),  # a whole number of vectors, not of the 16-column padding
    ((2, 1, 333, 9, 24), torch.bfloat16, 2e-2),  # converted on the way in and out
])
def test_fused_forward_blocks_match_quadratic(kernel_ops, shape, dtype, tol):
    from hf_efficient_kernels.ops import causal_linear_fused_op

    b, h, n, d, e = shape
    q, k, v = raw_inputs(b, h, n, d, e, dtype=dtype, scale=1.0)
    init = torch.rand(b, h, d, e + 1, dtype=torch.float64).to(dtype)
    phi = _phi("elu")
    for initial in (None, init):
        out, state, den = causal_linear_fused_op(q, k, v, initial, 1e-3, 64, 1)
        ref, state_ref = quadratic_normalized(phi(q.double()), phi(k.double()), v, initial, 1e-3)
        assert (out.double() - ref).abs().max() / ref.abs().max() < tol
        assert (state.double() - state_ref).abs().max() / state_ref.abs().max() < tol
        den_ref = torch.einsum("bhim,bhim->bhi", phi(q.double()), phi(k.double()).cumsum(2))
        if initial is not None:  # the packed state's last column is the initial key sum
            den_ref = den_ref + (phi(q.double()) @ initial.double()[..., -1:]).squeeze(-1)
        assert ((den.double() - den_ref).abs() / den_ref).max() < tol


@pytest.mark.parametrize("where", ["query", "key", "value"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fused_forward_non_finite_stays_in_the_rows_that_see_it(kernel_ops, where, bad):
    from hf_efficient_kernels.ops import causal_linear_fused_op

    q, k, v = raw_inputs(1, 2, 300, 64, 64, scale=1.0)  # token 200 lies in the second forward block
    clean = causal_linear_fused_op(q, k, v, None, 1e-6, 64, 1)[0]
    x = {"query": q, "key": k, "value": v}[where].clone()
    x[0, 1, 200, 5] = bad
    args = {"query": (x, k, v), "key": (q, x, v), "value": (q, k, x)}[where]
    out = causal_linear_fused_op(*args, None, 1e-6, 64, 1)[0]
    assert torch.equal(out[0, 0], clean[0, 0])  # the other head
    assert torch.equal(out[0, 1, :200], clean[0, 1, :200])  # earlier rows, bit for bit
    if where == "query":
        torch.testing.assert_close(out[0, 1, 201:], clean[0, 1, 201:], rtol=0, atol=0)
        if bad != -float("inf"):  # phi(-inf) is finite: exp(-87) for the kernel, 0 for the definition
            assert not torch.isfinite(out[0, 1, 200]).all()
    elif bad == -float("inf") and where == "key":
        pass  # a finite feature again
    else:
        assert not torch.isfinite(out[0, 1, 200:]).all(-1).any()


def test_fused_forward_padded_keys_change_nothing_even_nan_values(kernel_ops):
    from hf_efficient_kernels.ops import causal_linear_fused_op

    q, k, v = raw_inputs(2, 2, 300, 64, 64, scale=1.0)
    mask = torch.rand(2, 300, generator=torch.Generator().manual_seed(5)) > 0.25
    hidden = ~mask[:, None, :, None]
    out, state, den = causal_linear_fused_op(q, k, v, None, 1e-3, 64, 1, mask)
    phi = _phi("elu")
    ref, state_ref = quadratic_normalized(phi(q.double()), phi(k.double()) * ~hidden, v * ~hidden, None, 1e-3)
    assert (out.double() - ref).abs().max() / ref.abs().max() < 2e-5
    assert (state.double() - state_ref).abs().max() / state_ref.abs().max() < 2e-5
    k2, v2 = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("inf"))
    out2, state2, den2 = causal_linear_fused_op(q, k2, v2, None, 1e-3, 64, 1, mask)
    assert torch.equal(out2, out) and torch.equal(state2, state) and torch.equal(den2, den)


def test_fused_large_outputs_values_and_gradients(kernel_ops):
    """Outputs of 4 MiB and more (the kernel asks for huge pages for them) against the float64 PyTorch path."""
    import hf_efficient

    q, k, v = raw_inputs(1, 1, 16384, 64, 64, scale=1.0)
    gy = torch.randn(v.shape, generator=torch.Generator().manual_seed(2))

    def run(tensors):
        tensors = [t.detach().requires_grad_() for t in tensors]
        out = hf_efficient.linear_attention(*tensors, causal=True)
        return out, torch.autograd.grad((out * gy.to(out.dtype)).sum(), tensors)

    out, grads = run((q, k, v))
    os.environ["HF_EFFICIENT_KERNELS"] = "reference"
    try:
        ref_out, ref_grads = run((q.double(), k.double(), v.double()))
    finally:
        del os.environ["HF_EFFICIENT_KERNELS"]
    assert (out.double() - ref_out).abs().max() / ref_out.abs().max() < 2e-5
    for name, a, b in zip("qkv", grads, ref_grads):
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < 1e-4, f"d{name}: relative error {err:.2e}"
