"""The Triton causal linear kernels, run by Triton's CPU interpreter on tiny shapes.

Skipped where ``triton`` is not installed (it is not a dependency: CUDA users install it with torch).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before the kernels are defined

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton): these tests need it")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET was set to something other than 1 and there is no GPU", allow_module_level=True)

from hf_efficient_kernels.triton.causal_linear import (  # noqa: E402
    triton_causal_linear_backward,
    triton_causal_linear_forward,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def quadratic(q, k, v, initial=None):
    """y_i = sum_{j <= i} (q_i . k_j) v_j + q_i^T initial, and the final state, in float64."""
    scores = torch.einsum("bhim,bhjm->bhij", q, k).tril()
    y = torch.einsum("bhij,bhje->bhie", scores, v)
    state = torch.einsum("bhjm,bhje->bhme", k, v)
    if initial is not None:
        y, state = y + q @ initial, state + initial
    return y, state


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(1, 2, 70, 5, 9), (2, 1, 16, 16, 17)])
@pytest.mark.parametrize("with_initial", [False, True])
def test_values_and_gradients_match_quadratic(dtype, tol, shape, with_initial):
    b, h, n, m, e = shape
    g = torch.Generator().manual_seed(0)
    q, k = (torch.rand(b, h, n, m, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, h, n, e, generator=g, dtype=torch.float64)
    init = torch.randn(b, h, m, e, generator=g, dtype=torch.float64) if with_initial else None
    gy, gs = torch.randn(b, h, n, e, generator=g, dtype=torch.float64), torch.randn(b, h, m, e, generator=g,
                                                                                  dtype=torch.float64)
    low = [t.to(dtype).to(DEVICE) if t is not None else None for t in (q, k, v, init)]
    # The reference sees the same rounded inputs, in float64.
    ref_in = [t.double().cpu().requires_grad_() if t is not None else None for t in low]
    y_ref, state_ref = quadratic(*ref_in)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (state_ref * gs).sum(), [t for t in ref_in if t is not None])

    y, state = triton_causal_linear_forward(*low)
    assert y.dtype == dtype and state.dtype == dtype
    for got, ref in ((y, y_ref), (state, state_ref)):
        assert (got.double().cpu() - ref).abs().max() / ref.abs().max() < tol
    grads = triton_causal_linear_backward(*low, gy.to(dtype).to(DEVICE), gs.to(dtype).to(DEVICE))
    for got, ref in zip(grads, grads_ref):
        assert got.dtype == dtype
        assert (got.double().cpu() - ref).abs().max() / ref.abs().max() < tol
    if not with_initial:  # dinit is still returned: dS_final plus everything the queries read
        total = gs + torch.einsum("bhim,bhie->bhme", ref_in[0].detach(), gy)
        assert (grads[3].double().cpu() - total).abs().max() / total.abs().max() < tol
