"""Misuse of clustered and improved-clustered attention: each cell gives a clear error or the correct result.

The reference is quadratic softmax attention in float64: which rows it makes non-finite, and (where
the clustered forms are exact: a cluster per query, ``topk >= n_k``) its values. Cells run with and
without gradients (the fused forward-only kernels serve ``torch.no_grad()``) and with the PyTorch
path forced.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers

from hf_efficient import kernels as dispatch
from hf_efficient.attention import clustered_attention, improved_clustered_attention
from hf_efficient.attention.clustered import ImprovedClusteredAttentionParams, clustered_attention_reference
from hf_efficient.integrations import patch_model

KINDS = ("clustered", "improved")
INF, NAN = float("inf"), float("nan")


def softmax_reference(q, k, v, key_padding_mask=None):
    """Quadratic softmax attention in float64 ``(b, h, n_q, e)``."""
    scores = torch.einsum("bhnd,bhmd->bhnm", q.double(), k.double()) * q.shape[-1] ** -0.5
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], -INF)
    return torch.einsum("bhnm,bhme->bhne", torch.softmax(scores, -1), v.double())


def attend(kind, q, k, v, exact=False, **kw):
    """Clustered (exact: a cluster per query) or improved clustered (exact: also topk = n_k) attention."""
    clusters = q.shape[2] if exact else kw.pop("clusters", 3)
    if kind == "clustered":
        return clustered_attention(q, k, v, clusters=clusters, seed=0, **kw)
    return improved_clustered_attention(q, k, v, clusters=clusters, topk=k.shape[2] if exact else 4, seed=0, **kw)


@pytest.fixture(params=["grad", "no_grad", "reference"])
def mode(request, monkeypatch):
    """The autograd path, the forward-only kernels (no_grad) and the PyTorch code alone."""
    if request.param == "reference":
        monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    return request.param


def run(mode, kind, q, k, v, **kw):
    q, k, v = (x.clone().requires_grad_(mode == "grad") for x in (q, k, v))
    with torch.no_grad() if mode == "no_grad" else contextlib.nullcontext():
        return attend(kind, q, k, v, **kw), (q, k, v)


def qkv(b=2, h=2, n=16, m=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, length, d, generator=g) for length in (n, m, m))


def nan_rows(out):
    return ~torch.isfinite(out).all(-1)


# --------------------------------------------------------------------------- non-finite confinement
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_query_spoils_only_its_row(mode, kind, value):
    """The reported SIGSEGV (NaN query under no_grad) and the all-NaN output: only that row is NaN, and the
    other heads and rows equal the output without the bad value."""
    q, k, v = qkv()
    clean, _ = run(mode, kind, q, k, v)
    q_bad = q.clone()
    q_bad[0, 1, 5, 0] = value
    out, _ = run(mode, kind, q_bad, k, v)
    want = torch.zeros(2, 2, 16, dtype=torch.bool)
    want[0, 1, 5] = True
    assert torch.equal(nan_rows(out), want)
    assert torch.equal(nan_rows(out), nan_rows(softmax_reference(q_bad, k, v)))
    assert torch.isnan(out[0, 1, 5]).all()
    # the other heads are untouched; within the head, the query simply takes no part (as if padded)
    torch.testing.assert_close(out[:, 0], clean[:, 0])
    torch.testing.assert_close(out[1], clean[1])
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, 5] = False
    without, _ = run(mode, kind, q, k, v, query_padding_mask=mask)
    keep = torch.ones(16, dtype=torch.bool)
    keep[5] = False
    torch.testing.assert_close(out[0, 1, keep], without[0, 1, keep])


@pytest.mark.parametrize("kind", KINDS)
def test_inf_key_spoils_the_rows_softmax_spoils(mode, kind):
    """A key of (+inf, 0, ...): queries with a negative first entry score -inf (weight 0, unharmed), the
    others +inf (a NaN row in softmax). Exact settings: the finite rows equal softmax."""
    q, k, v = qkv()
    k[0, 0, 3] = 0.0
    k[0, 0, 3, 0] = INF
    k[1, 1, 7, 2] = -INF
    ref = softmax_reference(q, k, v)
    spoiled = nan_rows(ref)
    assert 0 < int(spoiled.sum()) < 32  # some rows of the two heads, not all
    for exact in (False, True):
        out, _ = run(mode, kind, q, k, v, exact=exact)
        assert torch.equal(nan_rows(out), spoiled), exact
        if exact:
            torch.testing.assert_close(out[~spoiled].double(), ref[~spoiled], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_nan_key_and_padding(mode, kind):
    """A NaN key spoils every real query of its head (a NaN score); as a padded key it spoils nothing; a head
    left with only non-finite keys is NaN, as softmax is."""
    q, k, v = qkv()
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    k[0, 0, 2, 1] = NAN
    k[1, 0, 12] = NAN  # padded: ignored
    k[1, 1, :10, 0] = -INF  # every real key of this head is non-finite
    q[1, 1, :, 0] = q[1, 1, :, 0].abs()  # all scores -inf: softmax gives NaN rows (0 / 0)
    ref = softmax_reference(q, k, v, key_padding_mask=mask)
    for exact in (False, True):
        out, _ = run(mode, kind, q, k, v, exact=exact, key_padding_mask=mask)
        assert torch.equal(nan_rows(out), nan_rows(ref)), exact
        assert nan_rows(out)[0, 0].all() and nan_rows(out)[1, 1].all() and not nan_rows(out)[1, 0].any()
        if exact:
            ok = ~nan_rows(ref)
            torch.testing.assert_close(out[ok].double(), ref[ok], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_stay_finite_beside_a_nan_row(kind):
    q, k, v = qkv()
    q[0, 0, 3, 1] = NAN
    k[1, 0, 4, 0] = INF
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = attend(kind, q, k, v)
    finite = ~nan_rows(out)
    assert 0 < int((~finite).sum()) < 64
    out[finite].square().sum().backward()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert torch.isfinite(q.grad[finite]).all() and q.grad[finite].abs().sum() > 0


def test_reference_confines_like_the_fast_functions():
    q, k, v = qkv(n=20, m=12)
    q[0, 1, 4, 2] = NAN
    k[1, 0, 3, 0] = INF
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 9:] = False
    for topk in (None, 5):
        ref = clustered_attention_reference(q, k, v, clusters=3, topk=topk, seed=0, key_padding_mask=mask)
        if topk is None:
            out = clustered_attention(q, k, v, clusters=3, seed=0, key_padding_mask=mask)
        else:
            out = improved_clustered_attention(q, k, v, clusters=3, topk=topk, seed=0, key_padding_mask=mask)
        assert torch.equal(nan_rows(out), nan_rows(ref))
        assert torch.equal(nan_rows(out), nan_rows(softmax_reference(q, k, v, key_padding_mask=mask)))
        ok = ~nan_rows(ref)
        torch.testing.assert_close(out[ok], ref[ok], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- empty and length-1 inputs
@pytest.mark.parametrize("kind", KINDS)
def test_no_queries_gives_an_empty_output(kind):
    q, k, v = torch.randn(2, 3, 0, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 4)
    out = attend(kind, q, k, v, clusters=3)
    assert out.shape == (2, 3, 0, 4)
    fn = clustered_attention if kind == "clustered" else improved_clustered_attention
    extra = {} if kind == "clustered" else {"topk": 2}
    out, assign = fn(q, k, v, clusters=3, seed=0, return_clusters=True, **extra)
    assert assign.shape == (2, 3, 0) and assign.dtype == torch.int64


@pytest.mark.parametrize("kind", KINDS)
def test_no_keys_is_a_clear_error(kind):
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 4)
    with pytest.raises(ValueError, match="no keys") as err:
        attend(kind, q, k, v, clusters=3)
    assert "clusters" not in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m", [(1, 1), (1, 7), (7, 1)])
def test_length_one_is_exact(mode, kind, n, m):
    q, k, v = qkv(n=n, m=m)
    out, _ = run(mode, kind, q, k, v, clusters=3)
    if n == 1 or m == 1 or kind == "improved":  # one query or one key: every form is exact
        torch.testing.assert_close(out.double(), softmax_reference(q, k, v), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- topk=None
def test_improved_refuses_topk_none():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="topk must be an int, got NoneType"):
        improved_clustered_attention(q, k, v, clusters=3, topk=None)
    with pytest.raises(TypeError, match="topk"):
        ImprovedClusteredAttentionParams(topk=None)
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=20)
    model = transformers.BertModel(config).eval()
    with pytest.raises(TypeError, match="topk"):
        patch_model(model, "improved-clustered", clusters=2, topk=None)


# --------------------------------------------------------------------------- layouts, low precision, bad masks
@pytest.mark.parametrize("kind", KINDS)
def test_strided_and_stride0_inputs_equal_contiguous(mode, kind):
    """Transposed views and stride-0 (expanded) tensors give the contiguous copies' result."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 20, 2, 8, generator=g).transpose(1, 2)  # (b, h, n, d) view, not contiguous
    k = torch.randn(2, 2, 8, 18, generator=g).transpose(2, 3)
    v = torch.randn(1, 2, 18, 8, generator=g).expand(2, 2, 18, 8)  # stride 0 over the batch
    assert not q.is_contiguous() and not k.is_contiguous() and v.stride(0) == 0
    got, _ = run(mode, kind, q, k, v)
    want, _ = run(mode, kind, q.contiguous(), k.contiguous(), v.contiguous())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_magnitudes(kind, dtype):
    """|q|, |k| about 100 in fp16/bf16 (scores far beyond fp16's exp range): the float32 accumulation keeps
    every row finite and close to the exact computation (a cluster per query, topk = n_k) in float64."""
    g = torch.Generator().manual_seed(9)
    q, k = (torch.randn(1, 2, 16, 8, generator=g) * 30 for _ in range(2))
    v = torch.randn(1, 2, 16, 8, generator=g)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    with torch.no_grad():
        out = attend(kind, q, k, v, exact=True)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    want = softmax_reference(q.double(), k.double(), v.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", KINDS)
def test_masks_of_the_wrong_kind_are_refused(kind):
    q, k, v = qkv(b=2, n=10, m=10)
    for mask, match in ((torch.full((2, 10), 0.5), "only 0 and 1"), (torch.zeros(2, 10) - INF, "only 0 and 1"),
                        (torch.ones(2, 9, dtype=torch.bool), "2-D"), (torch.ones(1, 1, 10, 10), "2-D")):
        with pytest.raises(ValueError, match=match):
            attend(kind, q, k, v, key_padding_mask=mask)
        with pytest.raises(ValueError, match=match):
            attend(kind, q, k, v, query_padding_mask=mask)


# --------------------------------------------------------------------------- fuzzing the kernels
# Random shapes (length 1 included), NaN/inf sprinkled, magnitudes far from 1: each compiled op against its
# PyTorch definition. Derandomized so that CI sees the same examples every run; a few dozen examples each.
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hf_efficient.attention.hashing import hamming_kmeans, hamming_kmeans_reference, pack_bits  # noqa: E402

FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None)


@pytest.fixture(scope="module")
def kernel_ops():
    from hf_efficient_kernels.cpu import clustered_build_error, load_clustered_extension

    if load_clustered_extension() is None:
        pytest.skip(f"the clustered CPU kernel cannot be built here: {clustered_build_error()}")
    from hf_efficient_kernels import ops

    return ops


def _tensor(seed: int, shape, scale: float, bad: int, dtype=torch.float64) -> torch.Tensor:
    """Normal values times ``scale`` with ``bad`` entries set to NaN, +inf or -inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    flat = x.view(-1)
    if flat.numel():
        for i, pos in enumerate(torch.randint(0, flat.numel(), (bad,), generator=g).tolist()):
            flat[pos] = (NAN, INF, -INF)[i % 3]
    return x.to(dtype)


@FUZZ
@given(s=st.integers(1, 3), n=st.integers(1, 40), n_bits=st.integers(1, 130), clusters=st.integers(1, 12),
       iterations=st.integers(0, 4), seed=st.integers(0, 2**16), dup=st.booleans())
def test_fuzz_kmeans_kernel_equals_references(kernel_ops, s, n, n_bits, clusters, iterations, seed, dup):
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(s, n, n_bits, generator=g) < 0.5
    if dup:  # many duplicate codes: ties, empty and re-seeded centres
        bits = bits[:, torch.randint(0, max(1, n // 4), (n,), generator=g)]
    valid = torch.rand(s, n, generator=g) < 0.8
    got = kernel_ops.hamming_kmeans_op(bits, valid, clusters, iterations)
    assert torch.equal(got, hamming_kmeans(bits, valid, clusters, iterations))
    for i in range(s):
        want = hamming_kmeans_reference(pack_bits(bits[i][valid[i]]), n_bits, clusters, iterations)
        assert torch.equal(got[i][valid[i]], want)
        assert bool((got[i][~valid[i]] == -1).all())


@FUZZ
@given(b=st.integers(1, 2), h=st.integers(1, 2), c=st.integers(1, 6), nk=st.integers(1, 20), d=st.integers(1, 9),
       e=st.integers(1, 6), t_frac=st.floats(0, 1), scale=st.sampled_from([1e-6, 1.0, 1e4]), bad=st.integers(0, 4),
       masked=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_fuzz_centroid_topk(kernel_ops, b, h, c, nk, d, e, t_frac, scale, bad, masked, dtype, seed):
    t = 1 + int(t_frac * (nk - 1))
    cent = _tensor(seed, (b, h, c, d), scale, bad, dtype)
    k = _tensor(seed + 1, (b, h, nk, d), 1.0, bad, dtype)
    v = _tensor(seed + 2, (b, h, nk, e), 1.0, 0, dtype)
    mask = (torch.rand(b, nk, generator=torch.Generator().manual_seed(seed)) < 0.7) if masked else None
    top, mass, rest = kernel_ops.centroid_topk_op(cent, k, v, mask, 0.5, t)
    assert top.shape == (b, h, c, t) and int(top.min()) >= 0 and int(top.max()) < nk
    assert bool((top.sort(-1).values.diff(dim=-1) > 0).all())  # t distinct keys
    # rows whose scores over the real keys are all finite: the float64 definition
    scores = torch.einsum("bhcd,bhnd->bhcn", cent.double(), k.double()) * 0.5
    real = torch.ones(b, nk, dtype=torch.bool) if mask is None else mask
    ok = (torch.isfinite(scores) | ~real[:, None, None, :]).all(-1) & real.any(-1)[:, None, None]
    p = torch.softmax(scores.masked_fill(~real[:, None, None, :], -INF), -1).nan_to_num(0.0)
    picked = torch.zeros_like(p).scatter(-1, top, 1.0)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(mass.double()[ok], (p * picked).sum(-1)[ok], atol=tol, rtol=tol)
    rest_want = torch.einsum("bhcn,bhne->bhce", p * (1 - picked), v.double())
    torch.testing.assert_close(rest.double()[ok], rest_want[ok], atol=tol, rtol=tol)
    # the kernel's keys are a top-t set: no key left out weighs more than a key taken (up to rounding)
    if t < nk:
        low = p.masked_fill(picked == 0, INF).amin(-1)
        high = p.masked_fill(picked == 1, -INF).amax(-1)
        assert bool((high[ok] <= low[ok] + tol).all())


@FUZZ
@given(b=st.integers(1, 2), h=st.integers(1, 2), n=st.integers(1, 20), c=st.integers(1, 5), nk=st.integers(1, 20),
       d=st.integers(1, 9), e=st.integers(1, 6), t_frac=st.floats(0, 1), scale=st.sampled_from([1e-6, 1.0, 1e4]),
       bad=st.integers(0, 3), masked=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_clustered_topk(kernel_ops, b, h, n, c, nk, d, e, t_frac, scale, bad, masked, seed):
    g = torch.Generator().manual_seed(seed)
    t = 1 + int(t_frac * (nk - 1))
    q = _tensor(seed, (b, h, n, d), scale, bad)
    k = _tensor(seed + 1, (b, h, nk, d), 1.0, bad)
    v = _tensor(seed + 2, (b, h, nk, e), 1.0, 0)
    assign = torch.randint(-1, c, (b, h, n), generator=g)
    top = torch.stack([torch.randperm(nk, generator=g)[:t] for _ in range(b * h * c)]).reshape(b, h, c, t)
    mask = (torch.rand(b, nk, generator=g) < 0.7) if masked else None
    out, _ = kernel_ops.clustered_topk_op(q, k, v, assign, top, mask, 0.5)
    want = dispatch.clustered_topk(q, k, v, assign, top, mask, 0.5, implementation="reference")
    # rows whose query and top keys are all finite: the PyTorch path's values; padded queries: zeros
    idx = torch.gather(top, 2, assign.clamp(min=0)[..., None].expand(b, h, n, t))
    k_ok = torch.isfinite(k).all(-1)
    keys_ok = torch.gather(k_ok[:, :, None, :].expand(b, h, n, nk), 3, idx).all(-1)
    ok = torch.isfinite(q).all(-1) & keys_ok
    torch.testing.assert_close(out[ok], want[ok], atol=1e-9, rtol=1e-9)
    assert bool((out[assign < 0] == 0).all())


@FUZZ
@given(b=st.integers(1, 2), h=st.integers(1, 2), n=st.integers(1, 24), m=st.integers(1, 24), d=st.integers(1, 8),
       clusters=st.integers(1, 6), topk=st.integers(1, 8), bad_q=st.integers(0, 2), bad_k=st.integers(0, 2),
       kind=st.sampled_from(KINDS), grad=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_attention_non_finite_rows_match_softmax(b, h, n, m, d, clusters, topk, bad_q, bad_k, kind, grad, seed):
    """End to end, kernels or autograd path: the non-finite rows are exactly softmax's."""
    q = _tensor(seed, (b, h, n, d), 1.0, bad_q, torch.float32)
    k = _tensor(seed + 1, (b, h, m, d), 1.0, bad_k, torch.float32)
    v = _tensor(seed + 2, (b, h, m, d), 1.0, 0, torch.float32)
    q, k, v = (x.requires_grad_(grad) for x in (q, k, v))
    with contextlib.nullcontext() if grad else torch.no_grad():
        if kind == "clustered":
            out = clustered_attention(q, k, v, clusters=clusters, seed=seed)
        else:
            out = improved_clustered_attention(q, k, v, clusters=clusters, topk=topk, seed=seed)
    assert torch.equal(nan_rows(out), nan_rows(softmax_reference(q.detach(), k.detach(), v)))


@pytest.mark.parametrize("clustering", ["hamming", "queries"])
@pytest.mark.parametrize("iterations", [-1, 1.5, True, "1"])
def test_iterations_that_are_not_a_count_are_refused(clustering, iterations):
    """iterations=None picks the clustering's default; anything but None or an int >= 0 is refused by name."""
    from hf_efficient.attention import improved_clustered_attention
    from hf_efficient.attention.clustered import ImprovedClusteredAttentionParams

    q = torch.randn(1, 1, 8, 4)
    with pytest.raises((TypeError, ValueError), match="iterations"):
        improved_clustered_attention(q, q, q, clusters=2, topk=2, clustering=clustering, iterations=iterations)
    with pytest.raises((TypeError, ValueError), match="iterations"):
        ImprovedClusteredAttentionParams(clustering=clustering, iterations=iterations)
