"""The PyTorch form that remote code runs in place of the fused-feature-map kernel gives the kernel's answer."""

from __future__ import annotations

import pytest
import torch

from hf_efficient.attention.linear import causal_linear_feature_map_reference
from hf_efficient.kernels import causal_linear_feature_map


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_reference_equals_the_dispatched_op_with_and_without_a_state(feature_map):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 70, 8, generator=g) * 2 for _ in range(2))
    v = torch.randn(2, 3, 70, 5, generator=g)
    out, state = causal_linear_feature_map(q[:, :, :30], k[:, :, :30], v[:, :, :30], feature_map)
    ref_out, ref_state = causal_linear_feature_map_reference(q[:, :, :30], k[:, :, :30], v[:, :, :30], feature_map)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, ref_state, atol=1e-4, rtol=1e-5)
    out2, _ = causal_linear_feature_map(q[:, :, 30:], k[:, :, 30:], v[:, :, 30:], feature_map, initial=state)
    ref2, _ = causal_linear_feature_map_reference(q[:, :, 30:], k[:, :, 30:], v[:, :, 30:], feature_map,
                                                  initial=ref_state)
    torch.testing.assert_close(out2, ref2, atol=1e-5, rtol=1e-5)
    # and the reference is the definition: phi(q_i) . sum_{j<=i} phi(k_j) v_j^T over the normaliser
    phi = (lambda x: torch.nn.functional.elu(x) + 1) if feature_map == "elu" else torch.relu
    a = torch.tril(phi(q[:, :, :30]) @ phi(k[:, :, :30]).transpose(-1, -2))
    torch.testing.assert_close(ref_out, (a @ v[:, :, :30]) / (a.sum(-1, keepdim=True) + 1e-6), atol=1e-5, rtol=1e-5)
