"""The fault matrix of every registered attention kind, through the registry's one forward signature.

Each cell gives a clear error (``ValueError``/``TypeError`` naming the bad input) or a correct
result checked against something independent of the kind: the exact answer where attention has one
(a single key returns its value), causality, batch independence, the same call on contiguous or
float32 copies. A kind added to the registry joins every cell without editing this file; its
parameters for small inputs come from ``SMALL`` (defaults otherwise).
"""

from __future__ import annotations

import pytest
import torch

from hf_efficient.attention import attention_kind_names, get_attention_kind

# Parameters that make every kind do real work on 16-token inputs.
SMALL = {
    "linear": {},
    "clustered": {"clusters": 3, "bits": 31, "iterations": 5},
    "improved-clustered": {"clusters": 3, "bits": 31, "iterations": 5, "topk": 4},
    "window-linear": {"window": 4},
    "local": {"window": 4},
}
KINDS = attention_kind_names()
# Cells known to fail: (test name, a part of the cell's id) -> the defect. Each is to be fixed; strict, so
# a fixed cell fails until its line here is removed.
KNOWN: dict[tuple[str, str], str] = {
}


@pytest.fixture(autouse=True)
def _known_defects(request):
    for (test, cell), reason in KNOWN.items():
        if request.node.originalname == test and cell in request.node.name:
            request.applymarker(pytest.mark.xfail(reason=reason, strict=True))


def _modes(name: str) -> list[bool]:
    kind = get_attention_kind(name)
    return ([False] if kind.supports_bidirectional else []) + ([True] if kind.supports_causal else [])


CASES = [(name, causal) for name in KINDS for causal in _modes(name)]
IDS = [f"{name}-{'causal' if causal else 'bidirectional'}" for name, causal in CASES]


def _run(name: str, q, k, v, causal: bool, **kwargs):
    kind = get_attention_kind(name)
    params = kind.make_params(**SMALL.get(name, {}))
    return kind.forward(q, k, v, params, causal=causal, key_padding_mask=kwargs.pop("key_padding_mask", None),
                        query_padding_mask=kwargs.pop("query_padding_mask", None), scale=kwargs.pop("scale", None),
                        module=None)


def _qkv(b=2, h=2, n=16, d=8, dv=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g, dtype=dtype), torch.randn(b, h, n, d, generator=g, dtype=dtype),
            torch.randn(b, h, n, dv, generator=g, dtype=dtype))


def test_the_matrix_covers_every_kind():
    assert {"linear", "clustered", "improved-clustered", "window-linear", "local"} <= set(KINDS)
    assert all(_modes(name) for name in KINDS), "a kind that supports neither causal nor bidirectional attention"


# --------------------------------------------------------------------------- bad input: clear errors
BAD = {
    "rank 3": lambda q, k, v: (q[0], k[0], v[0]),
    "integer q": lambda q, k, v: (q.long(), k, v),
    "dtypes differ": lambda q, k, v: (q.double(), k, v),
    "batch differs": lambda q, k, v: (q, k[:1], v[:1]),
    "head dims differ": lambda q, k, v: (q, k[..., :4], v),
    "k and v lengths differ": lambda q, k, v: (q, k, v[:, :, :5]),
    "not a tensor": lambda q, k, v: (q.tolist(), k, v),
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_bad_tensors_get_a_clear_error(name, causal, bad):
    q, k, v = BAD[bad](*_qkv())
    with pytest.raises((ValueError, TypeError)) as info:
        _run(name, q, k, v, causal)
    assert any(w in str(info.value) for w in ("dim", "dtype", "shape", "length", "match", "Tensor", "same")), info.value


@pytest.mark.parametrize("mask", ["wrong shape", "additive", "4-D", "complex"])
@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_bad_padding_masks_get_a_clear_error(name, causal, mask):
    q, k, v = _qkv()
    bad = {"wrong shape": torch.ones(2, 15, dtype=torch.bool),
           "additive": torch.zeros(2, 16).masked_fill(torch.arange(16) > 12, float("-inf")),
           "4-D": torch.ones(2, 1, 16, 16, dtype=torch.bool),
           "complex": torch.ones(2, 16, dtype=torch.complex64)}[mask]
    with pytest.raises((ValueError, TypeError), match="mask"):
        _run(name, q, k, v, causal, key_padding_mask=bad)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -1.0])
@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_a_scale_that_is_not_a_positive_finite_number_is_refused(name, causal, scale):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="scale"):
        _run(name, q, k, v, causal, scale=scale)


# --------------------------------------------------------------------------- edge sizes: exact answers
@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_an_empty_sequence_gives_an_empty_output_or_a_clear_error(name, causal):
    q, k, v = _qkv(n=0)
    try:
        out = _run(name, q, k, v, causal)
    except ValueError as err:
        assert "empty" in str(err) or "0" in str(err), err
    else:
        assert out.shape == (2, 2, 0, 6)


@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_one_token_attends_to_itself_and_returns_its_value(name, causal):
    q, k, v = _qkv(n=1)
    torch.testing.assert_close(_run(name, q, k, v, causal), v, atol=1e-5, rtol=1e-5)


def _visible(name: str, causal: bool, n: int) -> torch.Tensor | None:
    """``(n, n)`` bool: which keys query i sees, for kinds whose weights are one softmax-like rule."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    if name in ("linear", "clustered", "improved-clustered"):
        return j <= i if causal else torch.ones(n, n, dtype=torch.bool)
    if name == "local":
        w = SMALL["local"]["window"]
        return ((j <= i) & (j > i - w)) if causal else (j - i).abs() < w
    return None  # window-linear mixes two rules (softmax in the window, linear beyond): no single mean


@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_identical_keys_average_the_values_a_query_sees(name, causal):
    """Every key the same: all scores are equal, so the output is the mean of the visible values."""
    q, _, v = _qkv()
    k = torch.randn(2, 2, 1, 8).expand(2, 2, 16, 8)
    out = _run(name, q, k, v, causal)
    visible = _visible(name, causal, 16)
    if visible is None:
        pytest.skip(f"{name} has no single averaging rule")
    expected = (visible.float() / visible.sum(1, keepdim=True)) @ v
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- structure: independence, layout
@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_samples_of_a_batch_do_not_affect_each_other(name, causal):
    q, k, v = _qkv(b=3)
    together = _run(name, q, k, v, causal)
    for i in range(3):
        alone = _run(name, q[i:i + 1], k[i:i + 1], v[i:i + 1], causal)
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,causal", [c for c in CASES if c[1]], ids=[i for c, i in zip(CASES, IDS) if c[1]])
@pytest.mark.parametrize("later", ["other tokens", "non-finite keys"])
def test_causal_outputs_never_see_later_tokens(name, causal, later):
    """Rows before position 10 are unchanged whatever comes after. A non-finite later *key* is masked
    out, as softmax's -inf mask drops it; (a NaN later *value* reaches earlier rows in softmax too,
    through 0 * NaN, so it is not asked of the kinds.)"""
    q, k, v = _qkv()
    before = _run(name, q, k, v, causal)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 10:] = torch.randn_like(k2[:, :, 10:]) * 5
    v2[:, :, 10:] = torch.randn_like(v2[:, :, 10:]) * 5
    if later == "non-finite keys":
        k2[:, :, 11, 0] = float("nan")
        k2[:, :, 12, 1] = float("inf")
    after = _run(name, q, k2, v2, causal)
    torch.testing.assert_close(after[:, :, :10], before[:, :, :10], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["transposed", "stride-0 batch", "sliced"])
@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_non_contiguous_inputs_give_the_contiguous_answer(name, causal, layout):
    q, k, v = _qkv(b=1)
    if layout == "transposed":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    elif layout == "stride-0 batch":
        q, k, v = (t.expand(3, -1, -1, -1) for t in (q, k, v))
    else:
        q, k, v = (torch.cat([t, t], dim=-1)[..., ::2] for t in (q, k, v))
    assert not all(t.is_contiguous() for t in (q, k, v))
    out = _run(name, q, k, v, causal)
    torch.testing.assert_close(out, _run(name, *(t.contiguous() for t in (q, k, v)), causal), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_half_precision_with_large_magnitudes_matches_float32(name, causal, dtype):
    """Inputs of magnitude ~30 overflow a float16 q.k; kinds must accumulate in float32."""
    q, k, v = (t * s for t, s in zip(_qkv(), (30, 30, 1)))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out = _run(name, q, k, v, causal)
    reference = _run(name, q.float(), k.float(), v.float(), causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.float(), reference, atol=tol * 4, rtol=tol)


# --------------------------------------------------------------------------- non-finite input and padding
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_a_non_finite_query_spoils_at_most_its_own_row(name, causal, value):
    q, k, v = _qkv()
    q[0, 1, 5, 2] = value
    out = _run(name, q, k, v, causal)
    finite = torch.isfinite(out).all(-1)
    finite[0, 1, 5] = True
    assert finite.all(), f"rows spoiled by one non-finite query: {(~finite).nonzero().tolist()}"


@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_an_all_padding_sample_gives_finite_output_and_leaves_the_others_alone(name, causal):
    q, k, v = _qkv()
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0] = False
    out = _run(name, q, k, v, causal, key_padding_mask=mask, query_padding_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:], _run(name, q[1:], k[1:], v[1:], causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_padded_keys_are_the_same_as_absent_keys(name, causal):
    """Right padding: the real tokens' outputs equal those of the shorter, unpadded sequence."""
    q, k, v = _qkv(b=1)
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[:, 12:] = False
    k_junk, v_junk = k.clone(), v.clone()
    k_junk[:, :, 12:] = 1e4
    v_junk[:, :, 12:] = 1e4
    padded = _run(name, q, k_junk, v_junk, causal, key_padding_mask=mask, query_padding_mask=mask)
    short = _run(name, q[:, :, :12], k[:, :, :12], v[:, :, :12], causal)
    torch.testing.assert_close(padded[:, :, :12], short, atol=1e-4, rtol=1e-4)
