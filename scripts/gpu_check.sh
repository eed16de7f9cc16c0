#!/usr/bin/env bash
# GPU check, run once on a machine with a CUDA GPU and triton installed: the Triton kernel tests on the
# GPU, then a forward+backward benchmark (Triton kernel vs the PyTorch chunked reference vs causal SDPA,
# and flash-linear-attention's chunk kernel when `fla` is installed). Writes results/gpu_check.json; then the
# same for the clustered-attention Triton kernels (results/gpu_check_clustered.json).
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

# Clustered attention: the Triton kernels' tests on the GPU, then each op timed (median ms, forward+backward
# where the op has one) against the PyTorch path the dispatcher would otherwise run, with their max errors.
# Writes results/gpu_check_clustered.json. DEV=cpu with TRITON_INTERPRET=1 and a tiny N runs it without a GPU.
if ! TRITON_INTERPRET=0 "$PY" -m pytest -q tests/kernels/test_triton_clustered.py 2>&1 \
        | tee results/gpu_check_clustered_tests.log; then
    echo "clustered Triton tests FAILED (see results/gpu_check_clustered_tests.log); timing anyway"
fi
N="$N" "$PY" - <<'PYEOF'
import json, os, platform, statistics, time, torch
from hf_efficient.attention.hashing import hamming_kmeans
from hf_efficient_kernels import dispatch
from hf_efficient_kernels.triton import clustered as tc

n, dev = int(os.environ["N"]), os.environ.get("DEV", "cuda")
b, h, d, bits, c, iters, t = 1, 8, 64, 63, 100, 10, 32
c, t = min(c, n // 2), min(t, n)
name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine()
out = {"device": name, "torch": torch.__version__, "n": n, "batch": b, "heads": h, "d": d, "bits": bits,
       "clusters": c, "iterations": iters, "topk": t, "threads": torch.get_num_threads(),
       "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1"}  # interpreted timings mean nothing
g = torch.Generator(device=dev).manual_seed(0)
codes = torch.rand(b * h, n, bits, device=dev, generator=g) < 0.5
valid = torch.ones(b * h, n, dtype=torch.bool, device=dev)
valid[0, n // 2:] = False  # one padded sequence
assign = hamming_kmeans(codes, valid, c, iters).reshape(b, h, n)
x = torch.randn(b, h, n, d, device=dev, generator=g)
y = torch.randn(b, h, c, d, device=dev, generator=g)
k, v = (torch.randn(b, h, n, d, device=dev, generator=g) for _ in range(2))
top = torch.rand(b, h, c, n, device=dev, generator=g).topk(t, dim=-1).indices
key_mask = torch.ones(b, n, dtype=torch.bool, device=dev)
key_mask[:, -n // 8:] = False

def sync():
    if dev == "cuda":
        torch.cuda.synchronize()

def timed(fn, repeats=10):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        sync(); s = time.perf_counter(); fn(); sync(); ts.append((time.perf_counter() - s) * 1e3)
    return statistics.median(ts)

def fb(f, *ins):
    def go():
        leaves = [z.detach().clone().requires_grad_() for z in ins]
        r = f(*leaves)
        r.float().sum().backward()
        return r, [z.grad for z in leaves]
    return go

ref = lambda op: (lambda *a: getattr(dispatch, op)(*a, implementation="reference"))
cases = {
    "hamming_kmeans": (lambda: tc.triton_hamming_kmeans(codes, valid, c, iters),
                       lambda: hamming_kmeans(codes, valid, c, iters)),
    "cluster_mean": (fb(lambda z: tc.triton_cluster_mean(z, assign, c), x),
                     fb(lambda z: ref("cluster_mean")(z, assign, c), x)),
    "cluster_broadcast": (fb(lambda z: tc.triton_cluster_broadcast(z, assign), y),
                          fb(lambda z: ref("cluster_broadcast")(z, assign), y)),
    "clustered_topk": (fb(lambda *z: tc.triton_clustered_topk(*z, assign, top, key_mask, d**-0.5), x, k, v),
                       fb(lambda *z: ref("clustered_topk")(*z, assign, top, key_mask, d**-0.5), x, k, v)),
}
out["ms"], out["triton_over_pytorch"], out["max_relative_error"] = {}, {}, {}
for op, (fast, slow) in cases.items():
    try:
        got, want = fast(), slow()
        if op == "hamming_kmeans":
            out["kmeans_identical"] = bool(torch.equal(got, want))
        else:
            pairs = [(got[0], want[0])] + list(zip(got[1], want[1]))
            out["max_relative_error"][op] = max(float((a - w).abs().max() / w.abs().max()) for a, w in pairs)
        ms = {"triton": timed(fast), "pytorch": timed(slow)}
        out["ms"][op] = ms
        out["triton_over_pytorch"][op] = ms["triton"] / ms["pytorch"]
    except Exception as exc:  # report and keep timing the others
        out[f"{op}_error"] = repr(exc)
print(json.dumps(out, indent=2))
with open("results/gpu_check_clustered.json", "w") as f:
    json.dump(out, f, indent=2)
PYEOF
