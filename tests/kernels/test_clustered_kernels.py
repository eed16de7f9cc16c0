"""The compiled clustered-attention kernels against independent references.

* k-means: identical assignments to ``hashing.hamming_kmeans`` and to the popcount loop
  ``hashing.hamming_kmeans_reference`` (ties included);
* cluster mean / broadcast and the top-k products: values and gradients against plain float64
  formulas written here (gathers and a softmax), float64 ``gradcheck``, ``torch.library.opcheck``;
* clustered attention end to end: the same result with the kernels as with ``HF_EFFICIENT_KERNELS=reference``.
"""

import os

import pytest
import torch

from hf_efficient import kernels as dispatch
from hf_efficient.attention import clustered_attention, improved_clustered_attention
from hf_efficient.attention.clustered import clustered_attention_reference
from hf_efficient.attention.hashing import hamming_kmeans, hamming_kmeans_reference, pack_bits
from hf_efficient_kernels.cpu import clustered_build_error, load_clustered_extension, loader


@pytest.fixture(scope="module")
def ops():
    if load_clustered_extension() is None:
        # CI has a compiler, so a failed build there is a failure, not a skip.
        if os.environ.get("HF_EFFICIENT_REQUIRE_ASSETS") == "1":
            pytest.fail(f"the clustered CPU kernel did not build: {clustered_build_error()}")
        pytest.skip(f"the clustered CPU kernel cannot be built here: {clustered_build_error()}")
    from hf_efficient_kernels import ops as kernel_ops

    return kernel_ops


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- k-means
@pytest.mark.parametrize("n_bits", [1, 5, 63, 64, 65, 130])
@pytest.mark.parametrize("clusters", [1, 3, 8, 40])
def test_kmeans_equals_pytorch_path(ops, n_bits, clusters):
    g = _gen(n_bits * 100 + clusters)
    s, n = 5, 120
    bits = torch.rand(s, n, n_bits, generator=g) < 0.5
    valid = torch.rand(s, n, generator=g) < 0.8
    valid[1] = False  # no real query
    valid[2] = False
    valid[2, 7:7 + clusters] = True  # exactly `clusters` real queries: each its own cluster
    valid[3] = True
    for iterations in (0, 1, 10):
        want = hamming_kmeans(bits, valid, clusters, iterations)
        got = ops.hamming_kmeans_op(bits, valid, clusters, iterations)
        assert torch.equal(got, want), (n_bits, clusters, iterations)


def test_kmeans_ties_equal_popcount_reference(ops):
    """Few bits and many duplicate codes: distances tie everywhere, majorities tie (even cluster sizes)."""
    g = _gen(1)
    n_bits, n = 4, 200
    palette = torch.rand(6, n_bits, generator=g) < 0.5
    bits = palette[torch.randint(0, 6, (3, n), generator=g)]  # (3, n, 4) with many exact duplicates
    bits[2] = False  # all codes equal: every distance ties, the lowest centre index must win
    valid = torch.ones(3, n, dtype=torch.bool)
    got = ops.hamming_kmeans_op(bits, valid, 5, 10)
    assert torch.equal(got, hamming_kmeans(bits, valid, 5, 10))
    for i in range(3):
        want = hamming_kmeans_reference(pack_bits(bits[i]), n_bits, 5, 10)
        assert torch.equal(got[i], want), i
    assert torch.equal(got[2], torch.zeros(n, dtype=torch.long))


def test_kmeans_padded_queries_match_popcount_reference(ops):
    g = _gen(2)
    bits = torch.rand(2, 90, 63, generator=g) < 0.5
    valid = torch.rand(2, 90, generator=g) < 0.6
    got = ops.hamming_kmeans_op(bits, valid, 7, 10)
    for i in range(2):
        assert (got[i][~valid[i]] == -1).all()
        want = hamming_kmeans_reference(pack_bits(bits[i][valid[i]]), 63, 7, 10)
        assert torch.equal(got[i][valid[i]], want)


# --------------------------------------------------------------------------- mean / broadcast
def _assign(b, h, n, c, seed, padded=True):
    a = torch.randint(0, c, (b, h, n), generator=_gen(seed))
    if padded:
        a[:, :, -2:] = -1
    return a


def mean_formula(x, assign, c):
    onehot = torch.nn.functional.one_hot(assign.clamp(min=0), c).to(x.dtype) * (assign >= 0)[..., None]
    count = onehot.sum(2).clamp(min=1)  # (b, h, c)
    return torch.einsum("bhnc,bhnd->bhcd", onehot, x) / count[..., None]


def broadcast_formula(y, assign):
    rows = torch.stack([y[bi, hi][assign[bi, hi].clamp(min=0)] for bi in range(y.shape[0]) for hi in range(y.shape[1])])
    return rows.reshape(*assign.shape, y.shape[-1]) * (assign >= 0)[..., None]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)])
def test_mean_and_broadcast_values_and_grads(ops, dtype, tol):
    b, h, n, d, c = 2, 3, 37, 9, 5
    g = _gen(3)
    x = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(b, h, c, d + 2, generator=g, dtype=torch.float64)
    assign = _assign(b, h, n, c, 4)
    assign[0, 0] = 0  # clusters 1.. empty in one sequence
    xk, yk = x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_()
    xr, yr = x.to(dtype).double().requires_grad_(), y.to(dtype).double().requires_grad_()
    mean = dispatch.cluster_mean(xk, assign, c, implementation="kernel")
    out = dispatch.cluster_broadcast(yk, assign, implementation="kernel")
    mean_r, out_r = mean_formula(xr, assign, c), broadcast_formula(yr, assign)
    assert mean.dtype == dtype and out.dtype == dtype
    torch.testing.assert_close(mean.double(), mean_r, atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), out_r, atol=tol, rtol=tol)
    gm, go = torch.randn_like(mean_r), torch.randn_like(out_r)
    (mean * gm.to(dtype)).sum().add((out * go.to(dtype)).sum()).backward()
    (mean_r * gm.to(dtype).double()).sum().add((out_r * go.to(dtype).double()).sum()).backward()
    torch.testing.assert_close(xk.grad.double(), xr.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(yk.grad.double(), yr.grad, atol=tol, rtol=tol)


def test_mean_and_broadcast_gradcheck(ops):
    g = _gen(5)
    x = torch.randn(1, 2, 11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 2, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assign = _assign(1, 2, 11, 4, 6)
    assert torch.autograd.gradcheck(lambda t: ops.cluster_sum_op(t, assign, 4, True), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.cluster_sum_op(t, assign, 4, False), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.cluster_gather_op(t, assign, False), (y,))
    assert torch.autograd.gradcheck(lambda t: ops.cluster_gather_op(t, assign, True), (y,))


# --------------------------------------------------------------------------- top-k products
def topk_formula(q, k, v, assign, top, key_mask, scale):
    """Per query: gather its cluster's top keys, masked softmax, weighted sum (float64 in, float64 out)."""
    b, h, n, _ = q.shape
    idx = torch.gather(top, 2, assign.clamp(min=0)[..., None].expand(b, h, n, top.shape[-1]))  # (b, h, n, t)
    bh = torch.arange(b)[:, None, None, None], torch.arange(h)[None, :, None, None]
    k_sel, v_sel = k[bh[0], bh[1], idx], v[bh[0], bh[1], idx]  # (b, h, n, t, d)
    scores = torch.einsum("bhnd,bhntd->bhnt", q, k_sel) * scale
    if key_mask is not None:
        ok = key_mask[torch.arange(b)[:, None, None, None], idx]
        scores = scores.masked_fill(~ok, float("-inf"))
        w = torch.softmax(scores, -1).nan_to_num(0.0)  # a query with no real key gets zeros
    else:
        w = torch.softmax(scores, -1)
    return torch.einsum("bhnt,bhnte->bhne", w, v_sel) * (assign >= 0)[..., None]


def _topk_inputs(b=2, h=2, n=40, nk=30, d=8, e=5, c=4, t=6, seed=7, masked=False):
    g = _gen(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, nk, e, generator=g, dtype=torch.float64)
    assign = _assign(b, h, n, c, seed + 1)
    top = torch.stack([torch.randperm(nk, generator=g)[:t] for _ in range(b * h * c)]).reshape(b, h, c, t)
    key_mask = None
    if masked:
        key_mask = torch.rand(b, nk, generator=g) < 0.6
        key_mask[-1] = False  # a sequence with no real key: zero output (with b = 1: the only one)
    return q, k, v, assign, top, key_mask


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape", [dict(), dict(n=70, nk=50, d=64, e=64, c=3, t=32), dict(d=3, e=1, t=17, nk=17)])
def test_topk_values_and_grads(ops, masked, dtype, tol, shape):
    q, k, v, assign, top, key_mask = _topk_inputs(masked=masked, **shape)
    scale = 0.4
    xs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    rs = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    out = dispatch.clustered_topk(*xs, assign, top, key_mask, scale, implementation="kernel")
    ref = topk_formula(*rs, assign, top, key_mask, scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad.to(dtype).double())
    for x, r in zip(xs, rs):
        torch.testing.assert_close(x.grad.double(), r.grad, atol=4 * tol, rtol=4 * tol)


def test_topk_matches_pytorch_path(ops):
    q, k, v, assign, top, key_mask = _topk_inputs(masked=True)
    q, k, v = q.float(), k.float(), v.float()
    got = dispatch.clustered_topk(q, k, v, assign, top, key_mask, 0.3, implementation="kernel")
    want = dispatch.clustered_topk(q, k, v, assign, top, key_mask, 0.3, implementation="reference")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_topk_gradcheck(ops):
    q, k, v, assign, top, _ = _topk_inputs(b=1, h=2, n=9, nk=7, d=3, e=2, c=3, t=4)
    key_mask = torch.tensor([[True, False, True, True, False, True, True]])
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b_, c: ops.clustered_topk_op(a, b_, c, assign, top, key_mask, 0.7)[0], inputs
    )


# --------------------------------------------------------------------------- opcheck
def test_opcheck(ops):
    g = _gen(8)
    bits = torch.rand(2, 30, 10, generator=g) < 0.5
    valid = torch.rand(2, 30, generator=g) < 0.9
    torch.library.opcheck(ops.hamming_kmeans_op, (bits, valid, 4, 5))
    x = torch.randn(1, 2, 13, 3, generator=g, requires_grad=True)
    y = torch.randn(1, 2, 4, 5, generator=g, requires_grad=True)
    assign = _assign(1, 2, 13, 4, 9)
    for mean in (True, False):
        torch.library.opcheck(ops.cluster_sum_op, (x, assign, 4, mean))
        torch.library.opcheck(ops.cluster_gather_op, (y, assign, mean))
    q, k, v, assign, top, key_mask = _topk_inputs(masked=True)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(ops.clustered_topk_op, (q, k, v, assign, top, key_mask, 0.5))
    torch.library.opcheck(ops.clustered_topk_op, (q, k, v, assign, top, None, 0.5))


# --------------------------------------------------------------------------- dispatch and errors
def test_env_var_forces_reference(ops, monkeypatch):
    x = torch.randn(1, 1, 4, 2)
    assert dispatch.select_clustered_implementation(x, "cluster_mean") == "kernel"
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    for op in dispatch.CLUSTERED_OPS:
        assert dispatch.select_clustered_implementation(x, op) == "reference"
    # the per-call argument wins over the variable
    assert dispatch.select_clustered_implementation(x, "cluster_mean", "kernel") == "kernel"


def test_unbuildable_kernel_falls_back(monkeypatch):
    monkeypatch.setattr(loader, "_clustered_tried", True)
    monkeypatch.setattr(loader, "_clustered_module", None)
    monkeypatch.setattr(loader, "_clustered_error", "no compiler")
    bits = torch.rand(2, 20, 6, generator=_gen(10)) < 0.5
    valid = torch.ones(2, 20, dtype=torch.bool)
    assert dispatch.select_clustered_implementation(bits, "hamming_kmeans") == "reference"
    assert torch.equal(dispatch.hamming_kmeans(bits, valid, 3, 4), hamming_kmeans(bits, valid, 3, 4))
    with pytest.raises(RuntimeError, match="no compiler"):
        dispatch.hamming_kmeans(bits, valid, 3, 4, implementation="kernel")
    assert dispatch.available(build=False)["cpu_clustered"] is False


def test_cuda_and_odd_dtypes_use_reference():
    x = torch.randn(1, 1, 4, 2).to(torch.complex64)
    assert dispatch.select_clustered_implementation(x, "cluster_mean") == "reference"
    with pytest.raises(RuntimeError, match="complex64"):
        dispatch.select_clustered_implementation(x, "cluster_mean", "kernel")


def test_clear_errors():
    x = torch.randn(1, 2, 5, 3)
    assign = torch.zeros(1, 2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown clustered op"):
        dispatch.select_clustered_implementation(x, "nope")
    with pytest.raises(ValueError, match="implementation"):
        dispatch.cluster_mean(x, assign, 2, implementation="fast")
    with pytest.raises(TypeError, match="int64"):
        dispatch.cluster_mean(x, assign.int(), 2)
    with pytest.raises(ValueError, match="batch, heads"):
        dispatch.cluster_broadcast(x, assign[:, :1])
    with pytest.raises(TypeError, match="bool"):
        dispatch.hamming_kmeans(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), 2, 1)
    with pytest.raises(ValueError, match="clusters"):
        dispatch.hamming_kmeans(torch.zeros(2, 3, 4, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool), 0, 1)
    q, k, v, assign, top, _ = _topk_inputs()
    with pytest.raises(ValueError, match="key_mask"):
        dispatch.clustered_topk(q, k, v, assign, top, torch.ones(3, 3, dtype=torch.bool), 0.1)
    with pytest.raises(ValueError, match="share a dtype"):
        dispatch.clustered_topk(q, k.float(), v, assign, top, None, 0.1)


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("improved", [False, True])
def test_clustered_attention_same_with_and_without_kernels(ops, monkeypatch, improved):
    g = _gen(11)
    b, h, n, d = 2, 2, 150, 16
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    qm = torch.ones(b, n, dtype=torch.bool)
    qm[1, 120:] = False
    km = torch.ones(b, n, dtype=torch.bool)
    km[1, 100:] = False
    fn = improved_clustered_attention if improved else clustered_attention
    kwargs = dict(clusters=10, seed=0, query_padding_mask=qm, key_padding_mask=km, return_clusters=True)
    if improved:
        kwargs["topk"] = 8

    def run():
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        out, assign = fn(*xs, **kwargs)
        out.backward(torch.ones_like(out))
        return out, assign, [x.grad for x in xs]

    out, assign, grads = run()
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    out_r, assign_r, grads_r = run()
    assert torch.equal(assign, assign_r)
    torch.testing.assert_close(out, out_r, atol=1e-5, rtol=1e-5)
    for a, r in zip(grads, grads_r):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- fused centroid attention + top-k
def centroid_formula(cent, k, v, key_mask, scale, t):
    """Float64: weights over the real keys, the t largest per centroid, their mass and the rest of the output."""
    scores = torch.einsum("bhcd,bhnd->bhcn", cent, k) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    ranked = p - (0.0 if key_mask is None else (~key_mask[:, None, None, :]).double())  # padded keys last
    top = ranked.topk(t, -1).indices
    in_top = torch.zeros_like(p).scatter(-1, top, 1.0)
    return top, (p * in_top).sum(-1), torch.einsum("bhcn,bhne->bhce", p * (1 - in_top), v)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(2, 2, 5, 40, 8, 5, 6), (1, 2, 19, 300, 64, 64, 32), (2, 1, 3, 17, 3, 1, 17)])
def test_centroid_topk_values(ops, dtype, tol, shape):
    b, h, c, nk, d, e, t = shape
    g = _gen(12)
    cent, k = torch.randn(b, h, c, d, generator=g), torch.randn(b, h, nk, d, generator=g)
    v = torch.randn(b, h, nk, e, generator=g)
    key_mask = torch.rand(b, nk, generator=g) < 0.6
    key_mask[0, :2] = True
    if b > 1:
        key_mask[1] = False  # a sequence with no real key: zero mass and rest
    for mask in (None, key_mask):
        xs = [x.to(dtype) for x in (cent, k, v)]
        top, mass, rest = dispatch.centroid_topk(*xs, mask, 0.3, t, implementation="kernel")
        top_r, mass_r, rest_r = centroid_formula(*(x.double() for x in xs), mask, 0.3, t)
        assert mass.dtype == dtype and rest.dtype == dtype
        torch.testing.assert_close(mass.double(), mass_r, atol=tol, rtol=tol)
        torch.testing.assert_close(rest.double(), rest_r, atol=tol, rtol=tol)
        if dtype != torch.bfloat16:  # bf16 rounding may swap near-equal weights at the boundary
            has_real = torch.ones(b, dtype=torch.bool) if mask is None else mask.any(-1)
            assert torch.equal(top.sort(-1).values[has_real], top_r.sort(-1).values[has_real])


def test_centroid_topk_is_forward_only(ops):
    cent = torch.randn(1, 1, 3, 4, requires_grad=True)
    k, v = torch.randn(1, 1, 10, 4), torch.randn(1, 1, 10, 2)
    with pytest.raises(RuntimeError, match="forward only"):
        dispatch.centroid_topk(cent, k, v, None, 0.5, 3, implementation="kernel")
    # auto: the differentiable PyTorch path, whose gradient reaches the centroids
    top, mass, rest = dispatch.centroid_topk(cent, k, v, None, 0.5, 3)
    (mass.sum() + rest.sum()).backward()
    assert cent.grad is not None and cent.grad.abs().sum() > 0
    with torch.no_grad():
        torch.library.opcheck(ops.centroid_topk_op, (cent.detach(), k, v, None, 0.5, 3))


def test_improved_inference_path_equals_reference(ops, monkeypatch):
    g = _gen(13)
    q, k, v = (torch.randn(2, 2, 120, 16, generator=g) for _ in range(3))
    km = torch.ones(2, 120, dtype=torch.bool)
    km[1, 90:] = False
    with torch.no_grad():
        out = improved_clustered_attention(q, k, v, clusters=9, topk=7, seed=0, key_padding_mask=km)
        monkeypatch.setenv(dispatch.ENV_VAR, "reference")
        ref = improved_clustered_attention(q, k, v, clusters=9, topk=7, seed=0, key_padding_mask=km)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- memory safety on any data
def _sprinkle(x: torch.Tensor, g: torch.Generator, values=(float("nan"), float("inf"), float("-inf"))) -> torch.Tensor:
    x = x.clone()
    flat = x.view(-1)
    where = torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 7)]
    for i, pos in enumerate(where.tolist()):
        flat[pos] = values[i % len(values)]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("which", ["cent", "k", "both", "huge"])
def test_centroid_topk_non_finite_keeps_t_distinct_keys(ops, dtype, which):
    """NaN / inf scores never enter the top-t heap on their own: every centroid still gets t distinct keys
    in range (an earlier version read and wrote past the heap), and finite rows keep their exact values."""
    g = _gen(21)
    b, h, c, nk, d, e, t = 2, 2, 6, 23, 8, 5, 4
    cent, k = torch.randn(b, h, c, d, generator=g), torch.randn(b, h, nk, d, generator=g)
    v = torch.randn(b, h, nk, e, generator=g)
    if which in ("cent", "both"):
        cent[0, 0, 1] = _sprinkle(cent[0, 0, 1], g)
        cent[1, 1, 4, 0] = float("nan")
    if which in ("k", "both"):
        k[0, 1] = _sprinkle(k[0, 1], g)
    if which == "huge":  # finite, but the scores overflow to +-inf
        cent = cent * 1e30
        k = k * 1e30
    key_mask = torch.rand(b, nk, generator=g) < 0.7
    key_mask[:, :t] = True
    for mask in (None, key_mask):
        xs = [x.to(dtype) for x in (cent, k, v)]
        top, mass, rest = ops.centroid_topk_op(*xs, mask, 0.3, t)
        assert top.shape == (b, h, c, t)
        assert int(top.min()) >= 0 and int(top.max()) < nk
        assert (top.sort(-1).values.diff(dim=-1) > 0).all(), "a key was picked twice"
        x64 = [x.double() for x in xs]
        _, mass_r, rest_r = centroid_formula(*x64, mask, 0.3, t)
        scores = torch.einsum("bhcd,bhnd->bhcn", x64[0], x64[1]) * 0.3
        real = torch.ones(b, nk, dtype=torch.bool) if mask is None else mask
        finite = (torch.isfinite(scores) | ~real[:, None, None, :]).all(-1)  # rows the formula defines
        assert finite.any() and (which == "huge" or not finite.all())
        if which == "huge" and dtype != torch.float64:
            continue  # the scores overflow in float32: only the indices are checked above
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(mass.double()[finite], mass_r[finite], atol=tol, rtol=tol)
        torch.testing.assert_close(rest.double()[finite], rest_r[finite], atol=tol, rtol=tol)


def test_topk_products_extreme_scores_stay_exact(ops):
    """Scores of -1e30 next to zero-padded lanes: the fast exponential clamps its argument, so a padded
    key (weight 0) never overflows the exponent bits; values match the float64 formula."""
    q, k, v, assign, top, key_mask = _topk_inputs(masked=True)
    q = (q * 1e15).float()
    k = (k * 1e15).float()
    v = v.float()
    out, _ = ops.clustered_topk_op(q, k, v, assign, top, key_mask, 0.5)
    want = topk_formula(q.double(), k.double(), v.double(), assign, top, key_mask, 0.5)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_indices_from_data_are_checked(ops):
    """Out-of-range cluster ids or key indices raise instead of addressing memory outside the tensors."""
    x = torch.randn(1, 2, 5, 3)
    y = torch.randn(1, 2, 3, 4)
    bad = torch.zeros(1, 2, 5, dtype=torch.long)
    bad[0, 1, 2] = 3  # 3 clusters: ids 0..2
    for divide in (False, True):
        with pytest.raises(RuntimeError, match="out of range"):
            ops.cluster_gather_op(y, bad, divide)
    for mean in (False, True):
        with pytest.raises(RuntimeError, match="out of range"):
            ops.cluster_sum_op(x, bad, 3, mean)
    q, k, v, assign, top, key_mask = _topk_inputs()
    c, nk = top.shape[2], k.shape[2]
    for bad_top in (nk, -1):
        t2 = top.clone()
        t2[0, 0, 0, 0] = bad_top
        a2 = assign.clone()
        a2[0, 0] = 0  # make sure cluster 0 is used
        with pytest.raises(RuntimeError, match="out of range"):
            ops.clustered_topk_op(q, k, v, a2, t2, None, 0.3)
    a2 = assign.clone()
    a2[1, 1, 3] = c
    with pytest.raises(RuntimeError, match="out of range"):
        ops.clustered_topk_op(q, k, v, a2, top, None, 0.3)
    w = torch.rand(*q.shape[:3], top.shape[3])
    with pytest.raises(RuntimeError, match="out of range"):
        ops.clustered_topk_backward_op(q, k, v, a2, top, w, torch.randn(*q.shape[:3], v.shape[3]), 0.3)


def test_sanitizer_build_is_separate(monkeypatch):
    """HF_EFFICIENT_SANITIZE=1 selects the ASan/UBSan flags, with no plain fallback, in a folder of its own."""
    monkeypatch.delenv(loader.SANITIZE_ENV, raising=False)
    plain = loader._flag_sets()
    assert all("-fsanitize=address,undefined" not in cflags for cflags, _ in plain)
    monkeypatch.setenv(loader.SANITIZE_ENV, "1")
    sanitized = loader._flag_sets()
    assert len(sanitized) == 1 and "-fsanitize=address,undefined" in sanitized[0][0]
    assert "-fsanitize=address,undefined" in sanitized[0][1]
    plain_dir = loader._build_dir(plain[0][0], loader._CLUSTERED_SOURCE)[1]
    asan_dir = loader._build_dir(sanitized[0][0], loader._CLUSTERED_SOURCE)[1]
    assert plain_dir != asan_dir and "asan" in asan_dir.name


def test_kernel_arch_override(monkeypatch):
    """HF_EFFICIENT_KERNEL_ARCH swaps -march=native for the named target, with no fallback set, and a
    name that is not a -march value is refused before any compiler runs."""
    monkeypatch.delenv(loader.SANITIZE_ENV, raising=False)
    monkeypatch.delenv(loader.ARCH_ENV, raising=False)
    native = loader._flag_sets()
    assert len(native) == 2 and "-march=native" in native[0][0]
    monkeypatch.setenv(loader.ARCH_ENV, "x86-64-v3")
    (only,) = loader._flag_sets()
    assert "-march=x86-64-v3" in only[0] and "-march=native" not in only[0]
    assert loader._build_dir(only[0], loader._SOURCE)[1] != loader._build_dir(native[0][0], loader._SOURCE)[1]
    monkeypatch.setenv(loader.SANITIZE_ENV, "1")
    (sanitized,) = loader._flag_sets()
    assert "-march=x86-64-v3" in sanitized[0] and "-fsanitize=address,undefined" in sanitized[0]
    monkeypatch.setenv(loader.ARCH_ENV, "x86-64; rm -rf /")
    with pytest.raises(ValueError, match="HF_EFFICIENT_KERNEL_ARCH"):
        loader._flag_sets()


# --------------------------------------------------------------------------- the fast paths at working sizes
def _hashed_codes(s, n, n_bits, seed):
    """Codes of queries drawn around a few directions (real clusters, so the k-means converges), as bools."""
    g = _gen(seed)
    centres = torch.randn(6, 16, generator=g)
    x = centres[torch.randint(0, 6, (s, n), generator=g)] + 0.7 * torch.randn(s, n, 16, generator=g)
    planes = torch.randn(16, n_bits, generator=g)
    return (x @ planes) > 0


@pytest.mark.parametrize("n_bits,clusters", [(63, 100), (64, 8), (130, 37), (5, 100)])
def test_kmeans_working_size_equals_pytorch_path_and_popcount_reference(ops, n_bits, clusters):
    """n = 700 queries: the vector start, assignment (full and partial lanes of centres), counts and majorities."""
    bits = _hashed_codes(3, 700, n_bits, n_bits + clusters)
    valid = torch.ones(3, 700, dtype=torch.bool)
    valid[1, ::5] = False
    for iterations in (0, 1, 3, 10, 40):
        got = ops.hamming_kmeans_op(bits, valid, clusters, iterations)
        assert torch.equal(got, hamming_kmeans(bits, valid, clusters, iterations)), iterations
    want = hamming_kmeans_reference(pack_bits(bits[1][valid[1]]), n_bits, clusters, 10)
    assert torch.equal(ops.hamming_kmeans_op(bits, valid, clusters, 10)[1][valid[1]], want)


def test_kmeans_stop_at_fixed_point_equals_running_every_round(ops):
    """The kernel stops once no assignment changes; the clusters are those of running all the rounds."""
    bits = _hashed_codes(2, 300, 63, 5)
    valid = torch.ones(2, 300, dtype=torch.bool)
    codes = pack_bits(bits[0])
    runs = [hamming_kmeans_reference(codes, 63, 20, it, stop_at_fixed_point=False) for it in range(0, 31, 3)]
    assert torch.equal(runs[-1], runs[-2]) and not torch.equal(runs[0], runs[-1]), "no fixed point reached"
    for it, want in zip(range(0, 31, 3), runs):
        assert torch.equal(ops.hamming_kmeans_op(bits, valid, 20, it)[0], want), it


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_centroid_topk_working_size(ops, dtype, tol):
    """C = 100 (a partial vector of centroids), t = 32, n_k = 1030 (not a multiple of t), padded keys."""
    b, h, c, nk, d, e, t = 1, 2, 100, 1030, 16, 8, 32
    g = _gen(31)
    cent, k = torch.randn(b, h, c, d, generator=g), torch.randn(b, h, nk, d, generator=g)
    v = torch.randn(b, h, nk, e, generator=g)
    key_mask = torch.rand(b, nk, generator=g) < 0.8
    for mask in (None, key_mask):
        xs = [x.to(dtype) for x in (cent, k, v)]
        top, mass, rest = ops.centroid_topk_op(*xs, mask, 0.5, t)
        top_r, mass_r, rest_r = centroid_formula(*(x.double() for x in xs), mask, 0.5, t)
        torch.testing.assert_close(mass.double(), mass_r, atol=tol, rtol=tol)
        torch.testing.assert_close(rest.double(), rest_r, atol=tol, rtol=tol)
        if dtype == torch.float32:
            assert torch.equal(top.sort(-1).values, top_r.sort(-1).values)


def test_centroid_topk_ties_take_the_lowest_real_keys(ops):
    """Identical keys give every real key the same weight: the top t are the t real keys of lowest index."""
    b, h, c, nk, d, e, t = 1, 1, 5, 50, 4, 3, 8
    g = _gen(32)
    cent = torch.randn(b, h, c, d, generator=g)
    k = torch.randn(1, 1, 1, d, generator=g).expand(b, h, nk, d).contiguous()
    v = torch.randn(b, h, nk, e, generator=g)
    key_mask = torch.rand(b, nk, generator=g) < 0.5
    key_mask[0, :3] = False
    real = key_mask[0].nonzero().flatten()
    top, mass, rest = ops.centroid_topk_op(cent, k, v, key_mask, 0.5, t)
    for ci in range(c):
        assert torch.equal(top[0, 0, ci].sort().values, real[:t])
    torch.testing.assert_close(mass.double(), torch.full((b, h, c), t / len(real), dtype=torch.float64))
    rest_r = v[0, 0, real[t:]].double().sum(0) / len(real)  # the real keys left out, each of weight 1 / n_real
    torch.testing.assert_close(rest.double(), rest_r.expand(b, h, c, e), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.float16, 3e-3),
                                       (torch.bfloat16, 3e-2)])
def test_improved_topk_combines_products_with_the_centroid_half(ops, masked, dtype, tol):
    q, k, v, assign, top, key_mask = _topk_inputs(masked=masked, n=70, nk=50, d=16, e=8, c=3, t=32)
    g = _gen(33)
    mass = torch.rand(*top.shape[:3], generator=g, dtype=torch.float64)
    rest = torch.randn(*top.shape[:3], v.shape[-1], generator=g, dtype=torch.float64)
    xs = [x.to(dtype) for x in (q, k, v, mass, rest)]
    out = ops.improved_topk_op(*xs[:3], assign, top, key_mask, 0.4, *xs[3:])
    x64 = [x.double() for x in xs]
    products = topk_formula(*x64[:3], assign, top, key_mask, 0.4)
    idx = assign.clamp(min=0)
    m_q = x64[3].gather(2, idx)[..., None]
    r_q = x64[4].gather(2, idx[..., None].expand(*idx.shape, v.shape[-1]))
    want = (m_q * products + r_q) * (assign >= 0)[..., None]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    with pytest.raises(RuntimeError, match="mass"):
        ops.improved_topk_op(*xs[:3], assign, top, key_mask, 0.4, xs[3][:, :, :-1], xs[4])


@pytest.mark.parametrize("n,clusters", [(7, 100), (300, 100), (300, 9)])
def test_improved_inference_equals_loop_reference(ops, n, clusters):
    """The inference path (k-means, centroid top-k and combined products in kernels) against the loop
    definition, with padded queries and keys, a NaN query and a NaN key; also equal to the autograd path."""
    g = _gen(34)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for _ in range(3))
    q[0, 1, 3, 2] = float("nan")
    k[1, 0, 4, 0] = float("nan")
    qm = torch.ones(2, n, dtype=torch.bool)
    qm[1, -2:] = False
    km = torch.ones(2, n, dtype=torch.bool)
    km[0, -3:] = False
    kw = dict(clusters=clusters, topk=5, seed=0, key_padding_mask=km, query_padding_mask=qm)
    with torch.no_grad():
        out = improved_clustered_attention(q, k, v, **kw)
    ref = torch.as_tensor(clustered_attention_reference(q, k, v, **kw))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    grad_path = improved_clustered_attention(q.requires_grad_(), k, v, **kw)
    torch.testing.assert_close(out, grad_path.detach(), atol=1e-5, rtol=1e-5, equal_nan=True)
