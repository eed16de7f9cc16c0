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

from hf_efficient.attention import clustered_attention, improved_clustered_attention
from hf_efficient.attention.clustered import ImprovedClusteredAttentionParams, clustered_attention_reference
from hf_efficient.integrations import patch_model
from hf_efficient_kernels import dispatch

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
