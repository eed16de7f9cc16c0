"""Clustered and improved-clustered attention against independent references.

References: quadratic softmax through ``scaled_dot_product_attention`` (exact limits), the
loop-per-cluster definition with packed-popcount k-means (general case), float64 gradcheck, and
real MiniLM queries/keys/values for the error trend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_efficient.attention import (
    ClusteredAttentionParams,
    ImprovedClusteredAttentionParams,
    clustered_attention,
    clustered_attention_reference,
    get_attention_kind,
    improved_clustered_attention,
)
from hf_efficient.attention.hashing import (
    draw_hyperplanes,
    hamming_distance,
    hamming_kmeans,
    hamming_kmeans_reference,
    hash_queries,
    pack_bits,
    popcount64,
    unpack_bits,
)
from hf_efficient.attention.query_kmeans import (
    draw_uniforms,
    kmeans_plus_plus,
    query_kmeans,
    query_kmeans_reference,
    seeding_rounds,
)

F64 = torch.float64


def qkv(b=2, h=2, n_q=24, n_k=27, d=8, d_v=5, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, n_q, d, generator=g, dtype=dtype),
        torch.randn(b, h, n_k, d, generator=g, dtype=dtype),
        torch.randn(b, h, n_k, d_v, generator=g, dtype=dtype),
    )


def sdpa(q, k, v, key_mask=None, scale=None):
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def run(kind, q, k, v, **kw):
    if kind == "clustered":
        kw.pop("topk", None)
        return clustered_attention(q, k, v, **kw)
    return improved_clustered_attention(q, k, v, **kw)


# --------------------------------------------------------------------------- bit helpers and k-means
def test_pack_popcount_hamming():
    g = torch.Generator().manual_seed(1)
    bits = torch.rand(5, 7, 130, generator=g) > 0.5  # 3 words, last one partial; bit 63 set often
    words = pack_bits(bits)
    assert words.shape == (5, 7, 3) and words.dtype == torch.int64
    assert torch.equal(unpack_bits(words, 130), bits)
    assert torch.equal(popcount64(words).sum(-1), bits.sum(-1))
    assert popcount64(torch.tensor([-1, 0, 1 << 62, -(1 << 63)])).tolist() == [64, 0, 1, 1]
    a, b = words[:, :1], words[:, 1:]
    assert torch.equal(hamming_distance(a, b), (bits[:, :1] != bits[:, 1:]).sum(-1))


@pytest.mark.parametrize("n_bits", [63, 100])
def test_fast_kmeans_equals_popcount_reference(n_bits):
    g = torch.Generator().manual_seed(2)
    # a few well separated groups plus noise, so k-means has something to find
    proto = torch.rand(6, n_bits, generator=g) > 0.5
    noise = torch.rand(3, 200, n_bits, generator=g) < 0.15
    bits = proto[torch.randint(0, 6, (3, 200), generator=g)] ^ noise
    valid = torch.ones(3, 200, dtype=torch.bool)
    valid[1, 150:] = False
    valid[2, :20] = False
    fast = hamming_kmeans(bits, valid, clusters=9, iterations=6)
    for s in range(3):
        ref = hamming_kmeans_reference(pack_bits(bits[s][valid[s]]), n_bits, 9, 6)
        assert torch.equal(fast[s][valid[s]], ref)
        assert (fast[s][~valid[s]] == -1).all()


def test_hash_planes_pass_through_the_queries_mean():
    """Bit j is w_j . (x - mean) > 0 over the real queries (float64 formula here); a shift shared by every
    query changes no bit; padded and left-out rows do not move the mean; z adds offsets in units of spread."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 40, 8, generator=g, dtype=F64)
    valid = torch.rand(2, 3, 40, generator=g) < 0.7
    q[~valid] = float("nan")  # left-out rows never reach the statistics
    w, z = draw_hyperplanes(8, 63, seed=0)
    codes = hash_queries(q, valid, w)
    for bi in range(2):
        for hi in range(3):
            x = q[bi, hi][valid[bi, hi]]
            want = (x - x.mean(0)) @ w.double() > 0
            assert torch.equal(codes[bi, hi][valid[bi, hi]], want)
    shifted = hash_queries(torch.where(valid[..., None], q + 1e3 * torch.randn(8, generator=g, dtype=F64), q),
                           valid, w)
    agree = (shifted == codes)[valid].double().mean()
    assert agree > 0.999
    biased = hash_queries(q, valid, w, z)
    x = q[0, 0][valid[0, 0]]
    proj = x @ w.double()
    want = proj > proj.mean(0) + proj.std(0, unbiased=False) * z.double()
    assert (biased[0, 0][valid[0, 0]] == want).double().mean() > 0.999


@pytest.mark.parametrize("n_bits", [63, 100])
def test_kmeans_reseeds_empty_centres_equal_to_reference(n_bits):
    """Many duplicates and more clusters than groups: centres go empty and are re-seeded; the fast path and
    the popcount loop stay identical."""
    g = torch.Generator().manual_seed(5)
    proto = torch.rand(4, n_bits, generator=g) > 0.5
    pick = torch.randint(0, 4, (3, 90), generator=g)
    pick[0, :60] = 0  # a long run of one code
    bits = proto[pick] ^ (torch.rand(3, 90, n_bits, generator=g) < 0.05)
    bits[0, :60] = proto[0]
    valid = torch.ones(3, 90, dtype=torch.bool)
    valid[2, 70:] = False
    for iterations in (0, 1, 3, 10):
        fast = hamming_kmeans(bits, valid, clusters=12, iterations=iterations)
        for s in range(3):
            ref = hamming_kmeans_reference(pack_bits(bits[s][valid[s]]), n_bits, 12, iterations)
            assert torch.equal(fast[s][valid[s]], ref), (iterations, s)


def test_kmeans_duplicates_take_one_cluster():
    """60 identical queries and 40 distinct ones with 10 clusters: all 10 clusters are used (a start at
    evenly spread ranks put 6 centres on the duplicates and used 5)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 100, 16, generator=g)
    q[0, 0, :60] = q[0, 0, 0]
    k, v = torch.randn(1, 1, 100, 16, generator=g), torch.randn(1, 1, 100, 16, generator=g)
    _, assign = clustered_attention(q, k, v, clusters=10, seed=0, return_clusters=True)
    assert assign[0, 0, :60].unique().numel() == 1
    assert assign.unique().numel() == 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_well_separated_groups_get_their_own_clusters(seed):
    """8 tight, well separated groups of queries and 8 clusters: every group is one cluster, so the output is
    close to softmax attention (evenly spread starting ranks left groups merged: 0.28-0.43 relative error)."""
    g = torch.Generator().manual_seed(seed)
    d, groups, per = 16, 8, 16
    centres = torch.randn(groups, d, generator=g) * 3
    member = torch.arange(groups).repeat_interleave(per)[torch.randperm(groups * per, generator=g)]
    q = (centres[member] + 0.05 * torch.randn(groups * per, d, generator=g))[None, None]
    k, v = torch.randn(1, 1, 64, d, generator=g), torch.randn(1, 1, 64, d, generator=g)
    out, assign = clustered_attention(q, k, v, clusters=groups, seed=seed, return_clusters=True)
    for c in range(groups):  # one cluster per group, one group per cluster
        assert assign[0, 0, member == c].unique().numel() == 1
    assert assign.unique().numel() == groups
    want = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, -1) @ v
    assert float((out - want).norm() / want.norm()) < 0.1


# --------------------------------------------------------------------------- fast path vs references
@pytest.mark.parametrize("kind", ["clustered", "improved"])
@pytest.mark.parametrize("clusters,topk", [(1, 1), (3, 4), (7, 9), (100, 2)])
def test_matches_loop_reference_with_padding(kind, clusters, topk):
    q, k, v = qkv()
    key_mask = torch.ones(2, 27, dtype=torch.bool)
    key_mask[0, -8:] = False
    query_mask = torch.ones(2, 24, dtype=torch.bool)
    query_mask[1, :6] = False
    kw = dict(clusters=clusters, bits=24, iterations=4, seed=3, key_padding_mask=key_mask,
              query_padding_mask=query_mask)
    ref = clustered_attention_reference(q, k, v, topk=topk if kind == "improved" else None, **kw)
    out = run(kind, q, k, v, topk=topk, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert (out[1, :, :6] == 0).all()  # padded queries get zeros


@pytest.mark.parametrize("n_q,clusters", [(20, 20), (20, 64)])
def test_clusters_covering_queries_is_exact_softmax(n_q, clusters):
    q, k, v = qkv(n_q=n_q)
    key_mask = torch.ones(2, 27, dtype=torch.bool)
    key_mask[1, :5] = False
    out, assign = clustered_attention(q, k, v, clusters=clusters, key_padding_mask=key_mask, seed=0,
                                      return_clusters=True)
    torch.testing.assert_close(out, sdpa(q, k, v, key_mask), rtol=1e-10, atol=1e-12)
    assert torch.equal(assign, torch.arange(n_q).expand(2, 2, n_q))  # every query its own cluster


def test_topk_covering_keys_is_exact_softmax():
    q, k, v = qkv(n_q=40, n_k=30)
    key_mask = torch.ones(2, 30, dtype=torch.bool)
    key_mask[0, 10:] = False
    for topk in (30, 31, 500):
        out = improved_clustered_attention(q, k, v, clusters=3, topk=topk, key_padding_mask=key_mask, seed=1,
                                           scale=0.7)
        torch.testing.assert_close(out, sdpa(q, k, v, key_mask, scale=0.7), rtol=1e-10, atol=1e-12)


def test_fewer_clusters_is_not_exact():
    """Guards the exactness tests: with few clusters the result really is an approximation."""
    q, k, v = qkv(n_q=40)
    assert (clustered_attention(q, k, v, clusters=3, seed=0) - sdpa(q, k, v)).abs().max() > 1e-2
    assert (improved_clustered_attention(q, k, v, clusters=3, topk=3, seed=0) - sdpa(q, k, v)).abs().max() > 1e-3


def test_improved_weights_sum_to_one():
    """With v = 1 every output is the sum of the weights: exactly one, also with padded keys."""
    q, k, _ = qkv(n_q=30, n_k=20)
    v = torch.ones(2, 2, 20, 3, dtype=F64)
    key_mask = torch.ones(2, 20, dtype=torch.bool)
    key_mask[1, 12:] = False
    for fn in (clustered_attention, improved_clustered_attention):
        out = fn(q, k, v, clusters=4, key_padding_mask=key_mask, seed=0)
        torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["clustered", "improved"])
def test_sequence_without_real_keys_gives_zeros_and_finite_gradients(kind):
    q, k, v = (t.requires_grad_(True) for t in qkv(n_q=12, n_k=10))
    key_mask = torch.ones(2, 10, dtype=torch.bool)
    key_mask[0] = False
    out = run(kind, q, k, v, clusters=3, topk=2, key_padding_mask=key_mask, seed=0)
    assert (out[0] == 0).all()
    torch.testing.assert_close(out[1], run(kind, q[1:], k[1:], v[1:], clusters=3, topk=2, seed=0)[0])
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", ["clustered", "improved"])
def test_gradcheck(kind):
    q, k, v = qkv(b=1, h=1, n_q=8, n_k=7, d=3, d_v=2)
    key_mask = torch.ones(1, 7, dtype=torch.bool)
    key_mask[0, -2:] = False
    args = tuple(t.clone().requires_grad_(True) for t in (q, k, v))

    def fn(q_, k_, v_):
        return run(kind, q_, k_, v_, clusters=3, topk=3, bits=16, seed=5, key_padding_mask=key_mask)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


def test_centroid_gradient_reaches_member_queries():
    """One cluster: the centroid is the mean query, so d out / d q_i = (d out / d centroid) / n."""
    q, k, v = qkv(b=1, h=1, n_q=6, n_k=5)
    q.requires_grad_(True)
    clustered_attention(q, k, v, clusters=1, seed=0).sum().backward()
    mean = q.detach().mean(dim=2, keepdim=True).requires_grad_(True)
    (sdpa(mean, k, v) * 6).sum().backward()
    torch.testing.assert_close(q.grad, (mean.grad / 6).expand_as(q.grad))


# --------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("kind", ["clustered", "improved"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_padding_and_batch_invariance(kind, dtype):
    """A sequence gives the same output alone, padded on either side, or next to other sequences."""
    g = torch.Generator().manual_seed(4)
    n, width = 50, 64
    q1, k1, v1 = (torch.randn(1, 2, n, 8, generator=g, dtype=dtype) for _ in range(3))
    kw = dict(clusters=6, topk=5, seed=11)
    alone = run(kind, q1, k1, v1, **kw)

    def embed(t, left):
        out = torch.randn(3, 2, width, 8, generator=g, dtype=dtype) * 5  # junk in padding + other rows
        out[1, :, left : left + n] = t[0]
        return out

    for left in (0, width - n, 5):
        mask = torch.zeros(3, width, dtype=torch.bool)
        mask[1, left : left + n] = True
        mask[0, :40] = True
        mask[2] = True
        out = run(kind, embed(q1, left), embed(k1, left), embed(v1, left), key_padding_mask=mask,
                  query_padding_mask=mask, **kw)
        tol = 1e-12 if dtype == F64 else 1e-5
        torch.testing.assert_close(out[1, :, left : left + n], alone[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["clustered", "improved"])
def test_seed_determinism_and_unseeded_behaviour(kind):
    q, k, v = qkv(n_q=60, dtype=torch.float32)
    a = run(kind, q, k, v, clusters=5, topk=3, seed=7)
    assert torch.equal(a, run(kind, q, k, v, clusters=5, topk=3, seed=7))
    assert not torch.equal(a, run(kind, q, k, v, clusters=5, topk=3, seed=8))
    # without a seed the planes come from torch's global generator
    torch.manual_seed(123)
    b = run(kind, q, k, v, clusters=5, topk=3)
    torch.manual_seed(123)
    assert torch.equal(b, run(kind, q, k, v, clusters=5, topk=3))


def test_return_clusters():
    q, k, v = qkv(n_q=30)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, 25:] = False
    out, assign = improved_clustered_attention(q, k, v, clusters=4, seed=0, query_padding_mask=mask,
                                               return_clusters=True)
    assert out.shape == (2, 2, 30, 5) and assign.shape == (2, 2, 30) and assign.dtype == torch.int64
    assert (assign[0, :, 25:] == -1).all()
    real = assign[mask[:, None, :].expand_as(assign)]
    assert real.min() >= 0 and real.max() < 4
    # queries of one cluster share the clustered output
    plain = clustered_attention(q, k, v, clusters=4, seed=0, query_padding_mask=mask)
    for c in range(4):
        rows = plain[1, 0][assign[1, 0] == c]
        torch.testing.assert_close(rows, rows[:1].expand_as(rows))


def test_low_precision_inputs():
    q, k, v = qkv(n_q=64, n_k=64, d=16, d_v=16, dtype=torch.float32)
    ref = improved_clustered_attention(q, k, v, clusters=8, seed=0)
    for dtype in (torch.bfloat16, torch.float16):
        out = improved_clustered_attention(q.to(dtype), k.to(dtype), v.to(dtype), clusters=8, seed=0)
        assert out.dtype == dtype and torch.isfinite(out).all()
        # the rounded inputs may move a few queries to another cluster: compare on average
        assert (out.float() - ref).abs().mean() < 0.05


# --------------------------------------------------------------------------- real pretrained-model q/k/v
@pytest.fixture(scope="module")
def minilm():
    from hf_efficient.assets import minilm_path, require_asset

    require_asset("minilm")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def minilm_qkv(minilm):
    from hf_efficient.assets import load_hamlet, require_asset

    require_asset("hamlet")
    tokenizer, model = minilm
    enc = tokenizer(load_hamlet()[5000:20000], return_tensors="pt", truncation=True, max_length=256)
    layer = 3
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[layer].double()
    attn = model.encoder.layer[layer].attention.self
    heads, dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads

    def project(linear):
        with torch.no_grad():
            out = F.linear(hidden, linear.weight.double(), linear.bias.double())
        return out.view(1, -1, heads, dim).transpose(1, 2)

    return project(attn.query), project(attn.key), project(attn.value)


def test_error_decreases_with_clusters_and_topk_on_minilm(minilm_qkv):
    q, k, v = minilm_qkv
    exact = sdpa(q, k, v)

    def err(out):
        return float((out - exact).norm() / exact.norm())

    by_clusters = [err(clustered_attention(q, k, v, clusters=c, seed=0)) for c in (2, 8, 32, 128)]
    by_topk = [err(improved_clustered_attention(q, k, v, clusters=8, topk=t, seed=0)) for t in (1, 8, 32, 128)]
    assert all(a > b for a, b in zip(by_clusters, by_clusters[1:])), by_clusters
    assert all(a > b for a, b in zip(by_topk, by_topk[1:])), by_topk
    assert by_topk[1] < by_clusters[1]  # improved beats plain at the same clusters
    assert err(clustered_attention(q, k, v, clusters=q.shape[2], seed=0)) < 1e-12


def test_patched_minilm_exact_limit_and_batch_invariance(minilm):
    """Through the model: clusters >= tokens reproduces the unpatched encoder; a seeded approximate
    run gives a text the same vector alone and padded in a batch."""
    from hf_efficient import patch_model, unpatch_model

    tokenizer, model = minilm
    texts = ["To be, or not to be, that is the question.",
             "Something is rotten in the state of Denmark, said Marcellus to Horatio on the platform."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    try:
        with torch.no_grad():
            reference = model(**batch).last_hidden_state
            patch_model(model, "clustered", clusters=64)
            exact = model(**batch).last_hidden_state
            patch_model(model, "improved-clustered", clusters=3, topk=4)
            approx = model(**batch).last_hidden_state
            alone = model(**tokenizer(texts[:1], return_tensors="pt")).last_hidden_state
    finally:
        unpatch_model(model)
    torch.testing.assert_close(exact[real], reference[real], rtol=1e-5, atol=1e-5)
    assert (approx[real] - reference[real]).abs().max() > 1e-2  # really approximate
    torch.testing.assert_close(alone[0], approx[0, : alone.shape[1]], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- bad inputs and registry
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(clusters=0), ValueError, "clusters"),
        (dict(clusters=2.5), TypeError, "clusters"),
        (dict(clusters=2, topk=0), ValueError, "topk"),
        (dict(clusters=2, bits=0), ValueError, "bits"),
        (dict(clusters=2, bits=5000), ValueError, "bits"),
        (dict(clusters=2, iterations=-1), ValueError, "iterations"),
        (dict(clusters=2, seed=-3), ValueError, "seed"),
        (dict(clusters=2, scale=-1.0), ValueError, "scale"),
        (dict(clusters=2, key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (dict(clusters=2, query_padding_mask=torch.full((2, 24), 0.5)), ValueError, "0 and 1"),
        (dict(clusters=2, key_padding_mask=torch.ones(2, 27, dtype=torch.complex64)), ValueError, "dtype"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    q, k, v = qkv()
    with pytest.raises(error, match=match):
        improved_clustered_attention(q, k, v, **kwargs)


def test_bad_tensors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="4 dimensions"):
        clustered_attention(q[0], k, v, clusters=2)
    with pytest.raises(ValueError, match="same last dim"):
        clustered_attention(q[..., :4], k, v, clusters=2)
    with pytest.raises(ValueError, match="same sequence length"):
        clustered_attention(q, k, v[:, :, :3], clusters=2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        clustered_attention(q.numpy(), k, v, clusters=2)


def test_registry_kinds():
    q, k, v = qkv(dtype=torch.float32)
    key_mask = torch.ones(2, 27, dtype=torch.bool)
    key_mask[0, :3] = False
    query_mask = torch.ones(2, 24, dtype=torch.bool)
    query_mask[1, -4:] = False
    for name, fn in (("clustered", clustered_attention), ("improved-clustered", improved_clustered_attention)):
        kind = get_attention_kind(name)
        assert not kind.supports_causal
        params = kind.make_params(clusters=5)
        out = kind.forward(q, k, v, params, causal=False, key_padding_mask=key_mask,
                           query_padding_mask=query_mask, scale=0.3, module=None)
        torch.testing.assert_close(out, fn(q, k, v, clusters=5, key_padding_mask=key_mask, seed=0,
                                           query_padding_mask=query_mask, scale=0.3), rtol=0, atol=0)
        with pytest.raises(ValueError, match="no causal variant"):
            kind.forward(q, k, v, params, causal=True, key_padding_mask=None, query_padding_mask=None,
                         scale=None, module=None)
    assert ClusteredAttentionParams().seed == 0 and ImprovedClusteredAttentionParams().topk == 32
    with pytest.raises(ValueError, match="topk"):
        ImprovedClusteredAttentionParams(topk=0)
    with pytest.raises(ValueError, match="bits"):
        ClusteredAttentionParams(bits=2000)
    with pytest.raises(TypeError, match="unknown parameter"):
        get_attention_kind("clustered").make_params(topk=3)


# --------------------------------------------------------------------------- clustering="queries"
def _group_queries(seed, d=16, groups=8, per=16):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(groups, d, generator=g) * 3
    member = torch.arange(groups).repeat_interleave(per)[torch.randperm(groups * per, generator=g)]
    q = centres[member] + 0.05 * torch.randn(groups * per, d, generator=g)
    return q, member


@pytest.mark.parametrize("iterations", [0, 1, 5])
@pytest.mark.parametrize("clusters", [3, 10])
def test_query_kmeans_equals_loop_reference(iterations, clusters):
    """The batched k-means (products, doubling k-means++ rounds, vectorised re-seeding) assigns exactly as the
    per-sequence loops with explicit distances, padded and NaN rows left out."""
    g = torch.Generator().manual_seed(clusters + iterations)
    x = torch.randn(5, 40, 6, generator=g, dtype=F64)
    x[1, ::3] = x[1, 1]  # duplicates: empty clusters to re-seed
    valid = torch.rand(5, 40, generator=g) > 0.2
    valid[3, 4:] = False  # at most C real queries: each its own cluster
    x[2, 7] = float("nan")
    valid[2, 7] = False
    got = query_kmeans(x, valid, clusters, iterations, seed=11)
    u = draw_uniforms(clusters, 11)
    for s in range(5):
        real = valid[s].nonzero().flatten()
        want = query_kmeans_reference(x[s, real], min(clusters, len(real)), iterations, u)
        assert torch.equal(got[s, real], want), s
        assert (got[s, ~valid[s]] == -1).all()


def test_query_kmeans_start_is_kmeans_plus_plus_in_doubling_rounds():
    assert seeding_rounds(1) == []
    assert seeding_rounds(3) == [(1, 2), (2, 3)]
    assert seeding_rounds(100)[6:] == [(7, 8), (8, 16), (16, 32), (32, 64), (64, 100)]
    # D^2 sampling: a far outlier is (almost surely) among the first centres
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 50, 4, generator=g, dtype=F64)
    x[0, 17] += 1000
    centres = kmeans_plus_plus(x, torch.ones(1, 50, dtype=torch.bool), 4, draw_uniforms(4, 0))
    assert (centres[0] == x[0, 17]).all(-1).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_query_clustering_finds_separated_groups(seed):
    """8 tight groups and 8 clusters: k-means on the queries gives one cluster per group, so the output is
    close to softmax attention."""
    q, member = _group_queries(seed)
    q = q[None, None]
    g = torch.Generator().manual_seed(seed + 10)
    k, v = torch.randn(1, 1, 64, 16, generator=g), torch.randn(1, 1, 64, 16, generator=g)
    out, assign = clustered_attention(q, k, v, clusters=8, seed=seed, clustering="queries", return_clusters=True)
    for c in range(8):
        assert assign[0, 0, member == c].unique().numel() == 1
    assert assign.unique().numel() == 8
    want = torch.softmax(q @ k.transpose(-1, -2) * 16**-0.5, -1) @ v
    assert float((out - want).norm() / want.norm()) < 0.1


@pytest.mark.parametrize("kind", ["clustered", "improved"])
def test_query_clustering_matches_loop_reference_with_padding(kind):
    q, k, v = qkv()
    key_mask = torch.ones(2, 27, dtype=torch.bool)
    key_mask[0, -8:] = False
    query_mask = torch.ones(2, 24, dtype=torch.bool)
    query_mask[1, :6] = False
    kw = dict(clusters=5, iterations=3, seed=3, key_padding_mask=key_mask, query_padding_mask=query_mask,
              clustering="queries")
    ref = clustered_attention_reference(q, k, v, topk=4 if kind == "improved" else None, **kw)
    out = run(kind, q, k, v, topk=4, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    hamming = run(kind, q, k, v, topk=4, **{**kw, "clustering": "hamming"})
    assert not torch.allclose(out, hamming)  # the option changes the clusters


@pytest.mark.parametrize("kind", ["clustered", "improved"])
def test_query_clustering_confines_non_finite_queries(kind):
    """A NaN or inf query gets a NaN row and takes no part in any centroid: the other rows equal those of the
    same input without that query (it padded out)."""
    q, k, v = qkv(b=1, h=2, n_q=30)
    bad = q.clone()
    bad[0, 0, 4, 1] = float("nan")
    bad[0, 1, 9, 0] = float("inf")
    kw = dict(clusters=4, seed=0, clustering="queries", topk=3)
    out = run(kind, bad, k, v, **kw)
    nan = torch.isnan(out).any(-1)
    want = torch.zeros_like(nan)
    want[0, 0, 4] = want[0, 1, 9] = True
    assert torch.equal(nan, want)
    for h, i in ((0, 4), (1, 9)):
        keep = torch.ones(30, dtype=torch.bool)
        keep[i] = False
        clean = run(kind, q[:, h : h + 1, keep], k[:, h : h + 1], v[:, h : h + 1], **kw)
        torch.testing.assert_close(out[:, h : h + 1, keep], clean, rtol=1e-12, atol=1e-12)


def test_clustering_param_round_trips_and_patches(tmp_path):
    import dataclasses
    import json

    params = ImprovedClusteredAttentionParams(clusters=4, clustering="queries")
    data = json.loads(json.dumps(dataclasses.asdict(params)))
    assert data["clustering"] == "queries"
    assert get_attention_kind("improved-clustered").make_params(**data) == params
    assert ClusteredAttentionParams().clustering == "hamming"  # default unchanged
    with pytest.raises(ValueError, match="clustering must be one of 'hamming', 'queries', got 'euclid'"):
        ClusteredAttentionParams(clustering="euclid")
    with pytest.raises(TypeError, match="clustering must be a str"):
        ImprovedClusteredAttentionParams(clustering=1)
    with pytest.raises(ValueError, match="clustering"):
        clustered_attention(*qkv(), clusters=2, clustering="kmeans")


def test_iterations_default_follows_the_clustering():
    """iterations=None means 10 Lloyd rounds on Hamming codes and 1 on the queries themselves."""
    from hf_efficient.attention.clustered import DEFAULT_ITERATIONS

    assert DEFAULT_ITERATIONS == {"hamming": 10, "queries": 1}
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 96, 8, generator=g) for _ in range(3))
    knobs = dict(clusters=6, topk=4, seed=0)
    for clustering, rounds in DEFAULT_ITERATIONS.items():
        default = improved_clustered_attention(q, k, v, clustering=clustering, **knobs)
        assert torch.equal(default, improved_clustered_attention(q, k, v, clustering=clustering, iterations=rounds,
                                                                 **knobs))
    # the two settings differ on this data, so the equalities above can fail
    assert not torch.equal(improved_clustered_attention(q, k, v, clustering="queries", iterations=0, **knobs),
                           improved_clustered_attention(q, k, v, clustering="queries", iterations=10, **knobs))
    assert ImprovedClusteredAttentionParams().iterations is None
