"""What a user calls: ``hf_efficient.linear_attention(q, k, v, causal=True)`` end to end, feature map included.

Compares, in one process, one thread, interleaved (A B C ... A B C ...), after a warm-up, median of
--repeats (with the min-max spread):

* ``linear_attention``: the user-facing call with the default elu + 1 feature map (on the CPU kernel
  the map is applied inside the kernel);
* ``features_then_kernel``: the features computed by PyTorch, then the compiled normalised kernel (the
  path before the map was fused: what fusing saves);
* ``chunk_loop``: a plain PyTorch causal linear attention, 128-token chunks, elu + 1 features, the
  normaliser carried beside the state: what one writes without this package;
* ``matmul``: square fp32 ``torch.matmul`` of several sizes (256, 1024, 2048; 256, 512 with --quick), this machine's
  reachable FLOP/s in the same run, one thread: the fastest is the baseline (the strongest), per round;
* ``older_module`` (with ``--older-causal-product-src``): the older fast-transformers causal linear attention,
  elu + 1 features in PyTorch, its compiled CPU causal product, the normaliser from a cumulative sum of the
  keys. Its source is the ``fast_transformers/causal_product/causal_product_cpu.cpp`` of the
  ``pytorch-fast-transformers`` 0.4.0 source distribution (``TMPDIR=$PWD pip download --no-deps
  --no-build-isolation --no-binary :all: --no-clean pytorch-fast-transformers==0.4.0``: its metadata step fails
  without CUDA, and the unpacked source stays under ``$PWD/pip-download-*``); it is compiled into a temp
  folder, never shipped here;
* non-causal: ``linear_attention(q, k, v)`` (the CPU kernel with elu + 1 inside) against the formulation it
  replaced (a column of ones appended to v, the normaliser sliced off the product).

Shapes: batch 1, 8 heads, head dim 64 (features m = 64, values d_v = 64 plus the normaliser: e = 65).
FLOP counts as in ``bench_kernels.py``: ``useful`` = 4 n m e per head, what the recurrence itself needs and the
count the fraction of matmul is quoted with: per token 2 m d for the state update phi(k) v^T, 2 m d for
phi(q)^T S, and for the normaliser m (the key sum) + 2 m (phi(q) . z) + d (the division), which is 4 m (d + 1)
exactly when m = d; the feature map's exp is not counted. ``chunked`` = what a 64-token chunked form executes
(the masked square inside each chunk as well), shown for comparison only: it is larger, so it flatters. With
--backward also forward+backward (counted as 3x the forward FLOPs). The fraction of matmul is given as the
median over the interleaved rounds of (useful FLOP/s in that round) / (matmul FLOP/s in that round), with its
min-max spread.

    python scripts/bench_linear_end_to_end.py --quick       # seconds
    python scripts/bench_linear_end_to_end.py               # N = 16384, about a minute
    python scripts/bench_linear_end_to_end.py --backward --clock cpu \
        --older-causal-product-src /path/to/causal_product_cpu.cpp

Writes ``results/bench_linear_end_to_end.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hf_efficient
from hf_efficient import kernels
from hf_efficient.benchmarking import (
    cpu_model,
    interleaved_times,
    load_older_causal_product,
    older_causal_product,
    summary,
    timer,
)

ROOT = Path(__file__).resolve().parents[1]
B, H, D = 1, 8, 64


def elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def chunk_loop(q, k, v, chunk: int = 128, eps: float = 1e-6) -> torch.Tensor:
    """Plain PyTorch causal linear attention: masked scores inside a chunk, a carried (m, d_v) state and
    (m,) normaliser across chunks."""
    fq, fk = elu1(q), elu1(k)
    b, h, n, m = fq.shape
    state = q.new_zeros(b, h, m, v.shape[-1])
    norm = q.new_zeros(b, h, m)
    mask = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    outs = []
    for t0 in range(0, n, chunk):
        qc, kc, vc = fq[:, :, t0:t0 + chunk], fk[:, :, t0:t0 + chunk], v[:, :, t0:t0 + chunk]
        c = qc.shape[2]
        scores = (qc @ kc.transpose(-1, -2)).masked_fill(~mask[:c, :c], 0.0)
        num = scores @ vc + qc @ state
        den = scores.sum(-1) + (qc @ norm.unsqueeze(-1)).squeeze(-1)
        outs.append(num / (den.unsqueeze(-1) + eps))
        state = state + kc.transpose(-1, -2) @ vc
        norm = norm + kc.sum(2)
    return torch.cat(outs, dim=2)


def ones_column_form(x, eps: float = 1e-6) -> torch.Tensor:
    """Non-causal linear attention as this package computed it before: v with a column of ones appended, the
    normaliser sliced off the product."""
    q, k, v = x
    fq, fk = elu1(q), elu1(k)
    y = fq @ (fk.transpose(-1, -2) @ torch.cat([v, torch.ones_like(v[..., :1])], dim=-1))
    return y[..., :-1] / (y[..., -1:] + eps)


def flops(n: int, bh: int, m: int = D, e: int = D + 1, chunk: int = 64) -> dict[str, float]:
    useful = 4.0 * n * m * e * bh
    chunked = (n / chunk) * (4.0 * chunk * m * e + 2.0 * chunk * chunk * (m + e)) * bh
    return {"useful": useful, "chunked": chunked}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def time_interleaved(cases: dict, repeats: int, warmup: int = 1, raw: dict | None = None) -> dict[str, dict]:
    """``{name: (setup, run)}`` -> per case the median/min/max seconds of ``run(setup())`` (setup untimed),
    interleaved over the cases after ``warmup`` untimed rounds (torch.utils.benchmark Timer). ``raw``, when
    given, receives the per-round seconds ``{name: [...]}``."""
    timers = {name: timer(run, setup, clock) for name, (setup, run) in cases.items()}
    interleaved_times(timers, warmup)
    times = interleaved_times(timers, repeats)
    if raw is not None:
        raw.update(times)
    return {name: summary(ts) for name, ts in times.items()}


load_older = load_older_causal_product


def older_module_fn(older):
    """The older library's causal linear attention on (batch, heads, n, d) tensors: elu + 1 features in PyTorch,
    its compiled causal product on the values, the normaliser from a cumulative sum of the keys (its module
    also permutes from (batch, n, heads, d) first; that copy is left out here, in its favour)."""

    OlderCausalProduct = older_causal_product(older)

    def run(x):
        q, k, v = x
        fq, fk = elu1(q), elu1(k)
        z = 1.0 / (torch.einsum("bhnm,bhnm->bhn", fq, fk.cumsum(2)) + 1e-6)
        return OlderCausalProduct.apply(fq, fk, v) * z[..., None]

    return run


def make_cases(n: int, backward: bool, matmul_sizes: tuple[int, ...], older=None) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))

    def plain():
        return q, k, v

    def with_grad():
        return tuple(t.detach().requires_grad_() for t in (q, k, v))

    fns = {
        "linear_attention": lambda x: hf_efficient.linear_attention(*x, causal=True),
        "features_then_kernel": lambda x: kernels.causal_linear_normalized(elu1(x[0]), elu1(x[1]), x[2],
                                                                            implementation="kernel")[0],
        "chunk_loop": lambda x: chunk_loop(*x),
    }
    if older is not None:
        fns["older_module"] = older_module_fn(older)
    if not backward:
        cases = {name: (plain, torch.no_grad()(fn)) for name, fn in fns.items()}
    else:
        def fwd_bwd(fn):
            def go(x):
                fn(x).sum().backward()
            return go
        cases = {name: (with_grad, fwd_bwd(fn)) for name, fn in fns.items()}
    for size in matmul_sizes:
        ab = (torch.randn(size, size), torch.randn(size, size))
        cases[f"matmul_{size}"] = (lambda ab=ab: ab, lambda x: torch.matmul(*x))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (seconds)")
    parser.add_argument("--n", type=int, default=None, help="sequence length (default 16384, quick 2048)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 5, quick 3)")
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--older-causal-product-src", default=None,
                        help="the older fast-transformers causal_product_cpu.cpp (from its source distribution): "
                             "also time its causal linear attention (with --backward: forward+backward)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (all its threads), steadier when "
                             "other work shares the machine")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_linear_end_to_end.json"))
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.n is not None and args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    global clock
    clock = CLOCKS[args.clock]
    n = args.n or (2048 if args.quick else 16384)
    repeats = args.repeats or (3 if args.quick else 5)
    report = kernels.available()
    if not report["cpu"]:
        raise SystemExit(f"the CPU kernel is not available here: {report['cpu_error']}")
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    older = load_older(args.older_causal_product_src)
    sizes = (256, 512) if args.quick else (256, 1024, 2048)
    fl = flops(n, B * H)
    results = {"torch": torch.__version__, "cpu": cpu_model(), "threads": torch.get_num_threads(), "n": n,
               "clock": args.clock, "load_average": os.getloadavg(),
               "batch": B, "heads": H, "head_dim": D, "repeats": repeats, "matmul_sizes": sizes, "flops_forward": fl,
               "phases": {}}
    phases = [("forward", False, 1.0)] + ([("forward_backward", True, 3.0)] if args.backward else [])
    for phase, backward, mult in phases:
        raw: dict = {}
        timed = time_interleaved(make_cases(n, backward, sizes, older), repeats, raw=raw)
        # per round: the fastest matmul size of that round (the strongest baseline)
        mm_rounds = [max(2.0 * s**3 / raw[f"matmul_{s}"][i] for s in sizes) / 1e9 for i in range(repeats)]
        mm_sizes = {s: 2.0 * s**3 / timed.pop(f"matmul_{s}")["median_s"] / 1e9 for s in sizes}
        mm = max(mm_sizes.values())
        loop = timed["chunk_loop"]["median_s"]
        for name, r in timed.items():
            r["speedup_over_chunk_loop"] = loop / r["median_s"]
            for count, value in fl.items():
                r[f"gflops_{count}"] = mult * value / r["median_s"] / 1e9
                r[f"fraction_of_matmul_{count}"] = r[f"gflops_{count}"] / mm
            paired = [mult * fl["useful"] / t / 1e9 / m for t, m in zip(raw[name], mm_rounds)]
            r["fraction_of_matmul_useful_paired"] = {"median": statistics.median(paired), "min": min(paired),
                                                     "max": max(paired), "per_round": paired}
        if older is not None:
            for r in timed.values():
                r["speedup_over_older_module"] = timed["older_module"]["median_s"] / r["median_s"]
        results["phases"][phase] = {"matmul_gflops": mm, "matmul_gflops_by_size": mm_sizes,
                                    "matmul_gflops_per_round": mm_rounds, "cases": timed}

    # Non-causal: the user-facing call against the formulation it replaced (a column of ones appended to v,
    # features out of place), forward only.
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
    nc_cases = {"linear_attention": (lambda: (q, k, v), lambda x: hf_efficient.linear_attention(*x)),
                "ones_column_form": (lambda: (q, k, v), ones_column_form)}
    with torch.no_grad():
        nc = time_interleaved(nc_cases, repeats)
    base = nc["ones_column_form"]["median_s"]
    for r in nc.values():
        r["speedup_over_ones_column_form"] = base / r["median_s"]
    results["non_causal_forward"] = nc

    print(f"B={B} H={H} N={n} D={D} causal, elu+1, {results['threads']} thread, {results['cpu']}, "
          f"torch {results['torch']}, median of {repeats} (min-max), {args.clock} clock, "
          f"load average {results['load_average'][0]:.1f}")
    for phase, r in results["phases"].items():
        by_size = ", ".join(f"{s}: {g:.1f}" for s, g in r["matmul_gflops_by_size"].items())
        print(f"\n{phase}: torch.matmul fp32 {r['matmul_gflops']:.1f} GFLOP/s (the fastest of {by_size})")
        print(f"{'case':>22} {'ms (min-max)':>22} {'x chunk loop':>13} {'of matmul, useful (min-max)':>28}"
              f" {'chunked':>8}" + (f" {'x older':>8}" if older is not None else ""))
        for name, x in r["cases"].items():
            spread = f"{1e3 * x['median_s']:.1f} ({1e3 * x['min_s']:.1f}-{1e3 * x['max_s']:.1f})"
            p = x["fraction_of_matmul_useful_paired"]
            frac = f"{p['median']:.0%} ({p['min']:.0%}-{p['max']:.0%})"
            extra = f" {x['speedup_over_older_module']:>7.2f}x" if older is not None else ""
            print(f"{name:>22} {spread:>22} {x['speedup_over_chunk_loop']:>12.2f}x {frac:>28}"
                  f" {x['fraction_of_matmul_chunked']:>8.0%}{extra}")
    print("\nnon-causal forward")
    for name, x in nc.items():
        spread = f"{1e3 * x['median_s']:.1f} ({1e3 * x['min_s']:.1f}-{1e3 * x['max_s']:.1f})"
        print(f"{name:>22} {spread:>22} {x['speedup_over_ones_column_form']:>12.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
