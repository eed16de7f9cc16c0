"""The Triton clustered-attention kernels, run by Triton's CPU interpreter on tiny shapes (on the GPU if one exists).

* k-means: identical assignments to ``hashing.hamming_kmeans`` and to the popcount loop
  ``hashing.hamming_kmeans_reference`` (distance ties across blocks of centres, majority ties, empty clusters);
* cluster mean / broadcast and the top-k products: values and gradients against float64 formulas written
  here (one-hot products, an explicit gather and softmax), for float32 and bfloat16 inputs, with padding.

Skipped where ``triton`` is not installed (it is not a dependency: CUDA users install it with torch).
"""

import os
from functools import partial

os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before the kernels are defined

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton): these tests need it")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET was set to something other than 1 and there is no GPU", allow_module_level=True)

from hf_efficient import kernels as dispatch  # noqa: E402
from hf_efficient.attention.hashing import hamming_kmeans, hamming_kmeans_reference, pack_bits  # noqa: E402
from hf_efficient_kernels import dispatch as kernel_dispatch  # noqa: E402
from hf_efficient_kernels.triton.clustered import (  # noqa: E402
    triton_cluster_broadcast,
    triton_cluster_mean,
    triton_clustered_topk,
    triton_hamming_kmeans,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double().cpu() - want.detach()).abs().max() / want.abs().max().clamp(min=1e-12))


# --------------------------------------------------------------------------- k-means
@pytest.mark.parametrize("n_bits", [1, 5, 64, 65, 130])
@pytest.mark.parametrize("clusters", [1, 3, 20])
def test_kmeans_equals_pytorch_path(n_bits, clusters):
    g = _gen(n_bits * 100 + clusters)
    s, n = 4, 45
    bits = torch.rand(s, n, n_bits, generator=g) < 0.5
    valid = torch.rand(s, n, generator=g) < 0.8
    valid[1] = False  # no real query
    valid[2] = False
    valid[2, 5:5 + clusters] = True  # exactly `clusters` real queries: each its own cluster
    valid[3] = True
    for iterations in (0, 1, 10):
        want = hamming_kmeans(bits, valid, clusters, iterations)
        got = triton_hamming_kmeans(bits.to(DEVICE), valid.to(DEVICE), clusters, iterations)
        assert torch.equal(got.cpu(), want), (n_bits, clusters, iterations)


@pytest.mark.parametrize("clusters", [4, 20])
def test_kmeans_ties_equal_popcount_reference(clusters):
    """Few distinct codes: distances tie everywhere (also between centres 0-15 and 16-19, two blocks of
    the kernel), majorities tie (even cluster sizes) and some clusters end up empty."""
    g = _gen(clusters)
    n_bits, n = 4, 60
    palette = torch.rand(6, n_bits, generator=g) < 0.5
    bits = palette[torch.randint(0, 6, (3, n), generator=g)]
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[1, ::3] = False
    got = triton_hamming_kmeans(bits.to(DEVICE), valid.to(DEVICE), clusters, 10).cpu()
    for seq in range(3):
        want = hamming_kmeans_reference(pack_bits(bits[seq][valid[seq]]), n_bits, clusters, 10)
        assert torch.equal(got[seq][valid[seq]], want)
        assert bool((got[seq][~valid[seq]] == -1).all())


# --------------------------------------------------------------------------- cluster mean / broadcast
def _one_hot(assign: torch.Tensor, clusters: int) -> torch.Tensor:
    """float64 ``(b, h, n, C)``; a row of zeros where assign is -1."""
    hot = torch.zeros(*assign.shape, clusters + 1, dtype=torch.float64)
    hot.scatter_(-1, torch.where(assign < 0, clusters, assign)[..., None], 1.0)
    return hot[..., :clusters]


def _assignment(b, h, n, clusters, g):
    assign = torch.randint(0, clusters - 2, (b, h, n), generator=g)  # the last cluster stays empty
    assign[..., 1] = clusters - 2  # a cluster of one member
    assign[0, :, -5:] = -1  # padded queries
    return assign


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [5, 130])
def test_cluster_mean_and_broadcast_match_one_hot_products(dtype, d):
    g = _gen(d)
    b, h, n, clusters = 2, 2, 37, 6
    assign = _assignment(b, h, n, clusters, g)
    hot = _one_hot(assign, clusters)
    x = torch.randn(b, h, n, d, generator=g).to(dtype)
    y = torch.randn(b, h, clusters, d, generator=g).to(dtype)
    gx, gy = torch.randn(b, h, clusters, d, generator=g), torch.randn(b, h, n, d, generator=g)

    x_ref, y_ref = x.double().requires_grad_(), y.double().requires_grad_()
    size = hot.sum(2).clamp(min=1)[..., None]  # (b, h, C, 1)
    mean_ref = hot.transpose(2, 3) @ x_ref / size
    bcast_ref = hot @ y_ref
    dx_ref = torch.autograd.grad((mean_ref * gx).sum(), x_ref)[0]
    dy_ref = torch.autograd.grad((bcast_ref * gy).sum(), y_ref)[0]

    x_in, y_in = x.to(DEVICE).requires_grad_(), y.to(DEVICE).requires_grad_()
    a = assign.to(DEVICE)
    mean = triton_cluster_mean(x_in, a, clusters)
    bcast = triton_cluster_broadcast(y_in, a)
    assert mean.dtype == dtype and bcast.dtype == dtype
    (dx,) = torch.autograd.grad((mean.float() * gx.to(DEVICE)).sum(), x_in)
    (dy,) = torch.autograd.grad((bcast.float() * gy.to(DEVICE)).sum(), y_in)
    tol = TOLERANCE[dtype]
    assert _rel(mean, mean_ref.detach()) < tol
    assert _rel(bcast, bcast_ref.detach()) < tol
    assert _rel(dx, dx_ref) < tol and _rel(dy, dy_ref) < tol
    assert bool((mean[:, :, -1] == 0).all())  # the empty cluster
    assert bool((bcast[0, :, -5:] == 0).all()) and bool((dx[0, :, -5:] == 0).all())  # padded queries


def test_cluster_ops_agree_with_pytorch_path():
    """The same numbers as the PyTorch functions the dispatcher falls back to (float32)."""
    g = _gen(3)
    assign = _assignment(1, 3, 20, 4, g).to(DEVICE)
    x = torch.randn(1, 3, 20, 7, generator=g).to(DEVICE)
    y = torch.randn(1, 3, 4, 7, generator=g).to(DEVICE)
    want_mean = dispatch.cluster_mean(x, assign, 4, implementation="reference")
    want_bcast = dispatch.cluster_broadcast(y, assign, implementation="reference")
    torch.testing.assert_close(triton_cluster_mean(x, assign, 4), want_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(triton_cluster_broadcast(y, assign), want_bcast, rtol=0, atol=0)


# --------------------------------------------------------------------------- top-k products
def _topk_reference(q, k, v, assign, top, key_mask, scale):
    """float64: gather each query's cluster keys, softmax over the real ones (none real: zero output)."""
    b, h, n, _ = q.shape
    t = top.shape[3]
    a = assign.clamp(min=0)
    idx = top.gather(2, a[..., None].expand(b, h, n, t))  # (b, h, n, t) key index of each slot
    k_sel = torch.gather(k[:, :, None].expand(-1, -1, n, -1, -1), 3, idx[..., None].expand(-1, -1, -1, -1, k.shape[-1]))
    v_sel = torch.gather(v[:, :, None].expand(-1, -1, n, -1, -1), 3, idx[..., None].expand(-1, -1, -1, -1, v.shape[-1]))
    scores = (q[:, :, :, None, :] * k_sel).sum(-1) * scale
    ok = (assign >= 0)[..., None].expand(b, h, n, t)
    if key_mask is not None:
        ok = ok & key_mask[:, None, None, :].expand(b, h, n, -1).gather(3, idx)
    scores = scores.masked_fill(~ok, float("-inf"))
    top_score = scores.amax(-1, keepdim=True).clamp(min=-1e300).detach()
    p = torch.exp(scores - top_score) * ok
    w = p / p.sum(-1, keepdim=True).clamp(min=1e-300)
    return (w[..., None] * v_sel).sum(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(2, 1, 17, 19, 5, 3, 4, 6), (1, 1, 9, 40, 16, 17, 2, 33)])
def test_clustered_topk_values_and_gradients(dtype, masked, shape):
    b, h, n, n_k, d, e, c, t = shape
    g = _gen(n + t)
    q = torch.randn(b, h, n, d, generator=g).to(dtype)
    k = torch.randn(b, h, n_k, d, generator=g).to(dtype)
    v = torch.randn(b, h, n_k, e, generator=g).to(dtype)
    assign = torch.randint(0, c, (b, h, n), generator=g)
    assign[0, 0, :3] = -1  # padded queries
    top = torch.stack([torch.randperm(n_k, generator=g)[:t] for _ in range(b * h * c)]).reshape(b, h, c, t)
    key_mask = None
    if masked:
        key_mask = torch.rand(b, n_k, generator=g) < 0.6
        key_mask[0, top[0, 0, 0]] = False  # cluster 0 of the first head has no real key: zero output
    gout = torch.randn(b, h, n, e, generator=g)
    scale = d**-0.5

    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    out_ref = _topk_reference(*ref_in, assign, top, key_mask, scale)
    grads_ref = torch.autograd.grad((out_ref * gout).sum(), ref_in)

    ins = [x.to(DEVICE).requires_grad_() for x in (q, k, v)]
    out = triton_clustered_topk(*ins, assign.to(DEVICE), top.to(DEVICE),
                                key_mask.to(DEVICE) if masked else None, scale)
    assert out.dtype == dtype
    grads = torch.autograd.grad((out.float() * gout.to(DEVICE)).sum(), ins)
    tol = TOLERANCE[dtype]
    assert _rel(out, out_ref.detach()) < tol
    for got, want in zip(grads, grads_ref):
        assert got.dtype == dtype
        assert _rel(got, want) < tol
    assert bool((out[0, 0, :3] == 0).all()) and bool((grads[0][0, 0, :3] == 0).all())
    if masked:
        first = (assign[0, 0] == 0).nonzero().flatten()
        assert bool((out[0, 0, first.to(out.device)] == 0).all())


def test_clustered_topk_agrees_with_pytorch_path():
    g = _gen(7)
    b, h, n, n_k, d, e, c, t = 2, 1, 15, 12, 4, 3, 3, 5
    q, k = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n_k, d, generator=g)
    v = torch.randn(b, h, n_k, e, generator=g)
    assign = torch.randint(0, c, (b, h, n), generator=g)
    top = torch.stack([torch.randperm(n_k, generator=g)[:t] for _ in range(b * h * c)]).reshape(b, h, c, t)
    key_mask = torch.rand(b, n_k, generator=g) < 0.7
    want = dispatch.clustered_topk(q, k, v, assign, top, key_mask, 0.3, implementation="reference")
    got = triton_clustered_topk(*(x.to(DEVICE) for x in (q, k, v, assign, top, key_mask)), 0.3)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)


def test_out_of_range_indices_are_refused():
    x = torch.randn(1, 1, 4, 3).to(DEVICE)
    with pytest.raises(ValueError, match=r"assign must lie in \[-1, 2\)"):
        triton_cluster_mean(x, torch.tensor([[[0, 1, 2, -1]]]).to(DEVICE), 2)
    with pytest.raises(ValueError, match="assign must lie"):
        triton_cluster_broadcast(x[:, :, :2], torch.tensor([[[0, -2, 1, 1]]]).to(DEVICE))
    top = torch.tensor([[[[0, 4]]]]).to(DEVICE)  # key 4 of 4 keys
    with pytest.raises(ValueError, match=r"top must lie in \[0, 4\)"):
        triton_clustered_topk(x, x, x, torch.zeros(1, 1, 4, dtype=torch.long).to(DEVICE), top, None, 1.0)


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("improved", [False, True])
def test_clustered_attention_with_triton_ops_equals_pytorch_path(monkeypatch, improved):
    """The attention functions with the ops routed as CUDA tensors are (Triton; centroid_topk stays in
    PyTorch) give the PyTorch path's values and gradients, with query and key padding."""
    from hf_efficient.attention import clustered_attention, improved_clustered_attention

    g = _gen(5)
    b, h, n, d = 2, 2, 24, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(DEVICE) for _ in range(3))
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, -7:] = False
    mask = mask.to(DEVICE)
    gout = torch.randn(b, h, n, d, generator=g).to(DEVICE)
    kwargs = dict(clusters=4, bits=16, iterations=5, seed=0, key_padding_mask=mask, query_padding_mask=mask)
    if improved:
        kwargs["topk"] = 5
    fn = improved_clustered_attention if improved else clustered_attention

    def run():
        ins = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*ins, **kwargs)
        return out, torch.autograd.grad((out * gout).sum(), ins)

    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    want, want_grads = run()
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    # the attention modules ask the kernels' dispatcher at each call: route every op but centroid_topk to Triton
    monkeypatch.setattr(kernel_dispatch, "hamming_kmeans_kernel", lambda *a, **kw: partial(triton_hamming_kmeans, *a))
    monkeypatch.setattr(kernel_dispatch, "cluster_mean_kernel", lambda *a, **kw: partial(triton_cluster_mean, *a))
    monkeypatch.setattr(kernel_dispatch, "cluster_broadcast_kernel",
                        lambda *a, **kw: partial(triton_cluster_broadcast, *a))
    monkeypatch.setattr(kernel_dispatch, "clustered_topk_kernel", lambda *a, **kw: partial(triton_clustered_topk, *a))
    monkeypatch.setattr(kernel_dispatch, "centroid_topk_kernel", lambda *a, **kw: None)
    got, got_grads = run()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, w in zip(got_grads, want_grads):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- dispatch on CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="routing of CUDA tensors needs a CUDA device")
def test_dispatch_routes_cuda_tensors_to_triton():
    g = _gen(11)
    bits = (torch.rand(3, 50, 63, generator=g) < 0.5).cuda()
    valid = torch.ones(3, 50, dtype=torch.bool, device="cuda")
    assert dispatch.select_clustered_implementation(bits, "hamming_kmeans") == "kernel"
    assert dispatch.select_clustered_implementation(bits.float(), "centroid_topk") == "reference"
    assert torch.equal(dispatch.hamming_kmeans(bits, valid, 5, 10, implementation="kernel"),
                       hamming_kmeans(bits, valid, 5, 10))
    x = torch.randn(1, 2, 50, 8, device="cuda")
    assign = torch.randint(0, 5, (1, 2, 50), device="cuda")
    torch.testing.assert_close(dispatch.cluster_mean(x, assign, 5, implementation="kernel"),
                               dispatch.cluster_mean(x, assign, 5, implementation="reference"))
