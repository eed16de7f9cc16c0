#!/usr/bin/env bash
# GPU check, run once on a machine with a CUDA GPU and triton installed: the Triton kernel tests on the
# GPU, then a forward+backward benchmark (Triton kernel vs the PyTorch chunked reference vs causal SDPA,
# and flash-linear-attention's chunk kernel when `fla` is installed). Writes results/gpu_check.json.
#   bash scripts/gpu_check.sh [N]      (default N = 8192)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
N=${1:-8192}
mkdir -p results
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
TRITON_INTERPRET=0 "$PY" -m pytest -q tests/kernels/test_triton_causal_linear.py 2>&1 | tee results/gpu_check_tests.log
N="$N" "$PY" - <<'PYEOF'
import json, os, statistics, torch
import torch.nn.functional as F
from hf_efficient_kernels.ops import causal_linear_op
from hf_efficient.attention.linear import causal_linear_chunked

n, b, h, d = int(os.environ["N"]), 1, 8, 64
dev, out = "cuda", {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "n": n}
g = torch.Generator(device=dev).manual_seed(0)
q, k, v = (torch.randn(b, h, n, d, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(3))
fq, fk = F.elu(q) + 1, F.elu(k) + 1
v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)

# The custom ops on CUDA (Triton inside) against the float64 PyTorch reference, forward and backward.
from hf_efficient_kernels.ops import causal_linear_normalized_op
small = [torch.rand(2, 3, 300, 16, device=dev, dtype=torch.float64) for _ in range(2)]
small.append(torch.randn(2, 3, 300, 9, device=dev, dtype=torch.float64))
ref_in = [t.clone().requires_grad_() for t in small]
y_ref, _ = causal_linear_chunked(*ref_in, 64)
y_ref.sum().backward()
errors = {}
for dtype in (torch.float32, torch.bfloat16):
    x = [t.to(dtype).requires_grad_() for t in small]
    y, _ = causal_linear_op(*x)
    y.float().sum().backward()
    errors[str(dtype)] = max(float((a.double() - b).abs().max() / b.abs().max())
                             for a, b in [(y, y_ref)] + [(t.grad, r.grad) for t, r in zip(x, ref_in)])
    o, _, _ = causal_linear_normalized_op(x[0].detach(), x[1].detach(), x[2].detach(), None, 1e-6)
    ones = torch.ones_like(small[2][..., :1])
    y1, _ = causal_linear_chunked(small[0], small[1], torch.cat([small[2], ones], -1), 64)
    ref_out = y1[..., :-1] / (y1[..., -1:] + 1e-6)
    errors[f"normalized {dtype}"] = float((o.double() - ref_out).abs().max() / ref_out.abs().max())
out["max_relative_error_vs_float64_reference"] = errors

def timed(fn, make, repeats=10):
    for _ in range(3):
        fn(make())
    ts = []
    for _ in range(repeats):
        x = make(); torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(x); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return statistics.median(ts)

def grads(*ts):
    return lambda: tuple(t.detach().clone().requires_grad_() for t in ts)

def fb(f):
    def go(x):
        y = f(x)
        y.float().sum().backward()
    return go

cases = {
    "triton": (fb(lambda x: causal_linear_op(*x)[0]), grads(fq, fk, v1)),
    "reference": (fb(lambda x: causal_linear_chunked(*x, 64)[0]), grads(fq, fk, v1)),
    "sdpa": (fb(lambda x: F.scaled_dot_product_attention(*x, is_causal=True)), grads(q, k, v)),
}
try:
    from fla.ops.linear_attn import chunk_linear_attn  # (b, n, h, d) layout, unnormalised product
    cases["fla_chunk"] = (fb(lambda x: chunk_linear_attn(*x, normalize=False)[0]),
                          grads(*(t.transpose(1, 2).contiguous() for t in (fq, fk, v1))))
except Exception as exc:  # not installed, or a different API version
    out["fla_error"] = repr(exc)
out["forward_backward_ms"] = {}
for name, (fn, make) in cases.items():
    try:
        out["forward_backward_ms"][name] = timed(fn, make)
    except Exception as exc:  # e.g. an fla version with another signature: report, keep the rest
        out[f"{name}_error"] = repr(exc)
if "fla_chunk" in out["forward_backward_ms"]:
    out["triton_over_fla"] = out["forward_backward_ms"]["triton"] / out["forward_backward_ms"]["fla_chunk"]
print(json.dumps(out, indent=2))
with open("results/gpu_check.json", "w") as f:
    json.dump(out, f, indent=2)
PYEOF
