"""Hypothesis fuzzing of causal linear attention (the fused-feature-map kernel where it runs) against a
float64 quadratic definition: random shapes incl. length 1, magnitudes from 1e-3 to 1e2, a non-finite
key or value sprinkled in (it may reach only the rows at or after it), and non-finite queries (their
own rows only)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_efficient import linear_attention

PHI = {"elu": lambda x: torch.nn.functional.elu(x) + 1, "relu": torch.relu}


def quadratic(q, k, v, phi):
    a = torch.tril(phi(q.double()) @ phi(k.double()).transpose(-1, -2))
    return (a @ v.double()) / (a.sum(-1, keepdim=True) + 1e-6)


cases = st.tuples(
    st.integers(1, 2), st.integers(1, 3), st.integers(1, 150), st.integers(1, 12), st.integers(1, 9),
    st.sampled_from([1e-3, 1.0, 10.0, 100.0]), st.sampled_from(["elu", "relu"]), st.integers(0, 2**31 - 1),
)


@settings(max_examples=60, deadline=None)
@given(cases, st.sampled_from(["none", "key", "value", "query"]), st.sampled_from([float("nan"), float("inf")]))
def test_causal_linear_attention_fuzz(case, spoil, value):
    b, h, n, d, dv, scale, fmap, seed = case
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, n, d, generator=g) * scale for _ in range(2))
    v = torch.randn(b, h, n, dv, generator=g)
    where = int(torch.randint(0, n, (1,), generator=g))
    reference = quadratic(q, k, v, PHI[fmap])
    if spoil != "none":
        {"key": k, "value": v, "query": q}[spoil][0, 0, where, 0] = value
    out = linear_attention(q, k, v, causal=True, feature_map=fmap)
    assert out.shape == (b, h, n, dv) and out.dtype == q.dtype
    keep = torch.ones(b, h, n, dtype=torch.bool)
    if spoil in ("key", "value"):
        keep[0, 0, where:] = False  # what a non-finite past token may reach
    elif spoil == "query":
        keep[0, 0, where] = False
    # relu features can be all zero: the row is then 0 / eps in both, which the tolerance covers
    torch.testing.assert_close(out[keep].double(), reference[keep], atol=2e-4, rtol=2e-3)
