"""Benchmark the compiled causal linear attention kernel.

Compares, in one process and interleaved (A B C A B C ...), after a warm-up, median of --repeats:

* ``kernel``: ``kernels.causal_linear(..., implementation="kernel")`` (the C++ kernel);
* ``reference``: ``hf_efficient.attention.linear.causal_linear_chunked`` (plain PyTorch, chunked);
* ``sdpa``: causal ``torch.nn.functional.scaled_dot_product_attention`` on the raw q, k, v (quadratic);
* ``older``: optional, the older fast-transformers CPU ``causal_dot_product`` kernel, when its source file
  is given with ``--older-causal-product-src`` (compiled into a temporary folder; never shipped here).
  Its "module" variant adds the separate normaliser (a cumsum of the keys) the way that library's
  causal linear attention does; ours ("kernel_module") is ``kernels.causal_linear_normalized``, which
  fuses the normaliser into the kernel. Both compute num / (den + eps) from features and values.

Shapes: batch 1, 8 heads, head dim 64, elu+1 features (m = 64), v with the normaliser column (e = 65).
Achieved GFLOP/s is reported against this machine's ``torch.matmul`` fp32 GFLOP/s measured in the same
run and thread setting, under two FLOP counts (see ``flops``).

    python scripts/bench_kernels.py --quick      # seconds
    python scripts/bench_kernels.py              # N = 16384, 1 and 2 threads, a few minutes

With ``--clustered``: clustered (C = 100) and improved-clustered (top-32) attention at N = 16384, 63 bits,
10 k-means iterations, ours with the compiled kernels vs our PyTorch path (and the k-means alone),
forward and forward+backward; with ``--older-src-dir`` also the older library's CPU pipeline
reassembled from its raw ops (forward). JSON to ``results/bench_kernels_clustered.json``.

    python scripts/bench_kernels.py --clustered --quick
    python scripts/bench_kernels.py --clustered --threads 1 --older-src-dir /path/to/fast-transformers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_efficient import kernels
from hf_efficient.attention.linear import causal_linear_chunked
from hf_efficient.benchmarking import cpu_model, load_older_causal_product, older_causal_product

ROOT = Path(__file__).resolve().parents[1]




def flops(n: int, bh: int, m: int, e: int, chunk: int = 64) -> dict[str, float]:
    """FLOPs of one forward pass.

    ``useful``: 4 n m e per head, the recurrent form (update the m x e state, read it out); it does not
    depend on how an implementation blocks the work, so it is the conservative count.
    ``chunked``: what a chunked form with chunk C executes: per chunk, state read-out and update
    (2 x 2 C m e) plus the C x C score and score-times-value products (2 C^2 m + 2 C^2 e).
    Forward+backward is counted as 3x the forward (the backward has twice the products).
    """
    useful = 4.0 * n * m * e * bh
    chunked = (n / chunk) * (4.0 * chunk * m * e + 2.0 * chunk * chunk * (m + e)) * bh
    return {"useful": useful, "chunked": chunked}


def matmul_case(size: int):
    """A square fp32 torch.matmul, timed interleaved with the kernels: the machine's reachable FLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return (lambda: (a, b)), (lambda x: torch.matmul(*x))


load_older = load_older_causal_product


def elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def make_cases(n: int, older, with_backward: bool, sdpa_backward: bool):
    """name -> (setup, run); setup returns fresh inputs, run(inputs) does the timed work."""
    b, h, d = 1, 8, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    phi_q, phi_k = elu1(q), elu1(k)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    grad = torch.randn(b, h, n, d + 1, generator=g)

    def feats(grad_needed):
        if not grad_needed:
            return phi_q, phi_k, v1
        return tuple(t.detach().clone().requires_grad_() for t in (phi_q, phi_k, v1))

    cases = {}

    def kernel_fwd(x):
        return kernels.causal_linear(*x, implementation="kernel")[0]

    def reference_fwd(x):
        return causal_linear_chunked(*x, 64)[0]

    cases["kernel"] = (lambda: feats(False), kernel_fwd)
    cases["reference"] = (lambda: feats(False), reference_fwd)
    cases["sdpa"] = (lambda: (q, k, v), lambda x: F.scaled_dot_product_attention(*x, is_causal=True))
    if older is not None:
        def older_fwd(x):
            out = torch.zeros_like(x[2])
            older.causal_dot_product(x[0], x[1], x[2], out)
            return out

        cases["older"] = (lambda: feats(False), older_fwd)
    fwd = {name: (setup, run) for name, (setup, run) in cases.items()}
    if not with_backward:
        return fwd, {}

    def backward_of(run):
        def go(x):
            y = run(x)
            y.backward(grad if y.shape[-1] == grad.shape[-1] else grad[..., : y.shape[-1]])

        return go

    fb = {
        "kernel": (lambda: feats(True), backward_of(kernel_fwd)),
        "reference": (lambda: feats(True), backward_of(reference_fwd)),
    }
    if sdpa_backward:
        fb["sdpa"] = (lambda: tuple(t.detach().clone().requires_grad_() for t in (q, k, v)),
                      backward_of(lambda x: F.scaled_dot_product_attention(*x, is_causal=True)))
    if older is not None:
        OlderCausalProduct = older_causal_product(older)

        # The older library's causal linear attention: the product on the d_v value columns, and the
        # normaliser from a cumulative sum of the keys. Our side of this comparison is "module".
        def older_module(x):
            fq, fk, fv = x
            z = 1.0 / (torch.einsum("bhnm,bhnm->bhn", fq, fk.cumsum(2)) + 1e-6)
            return OlderCausalProduct.apply(fq, fk, fv) * z[..., None]

        def our_module(x):  # the normaliser fused into the kernel
            return kernels.causal_linear_normalized(*x, 1e-6, implementation="kernel")[0]

        def module_inputs():
            return tuple(t.detach().clone().requires_grad_() for t in (phi_q, phi_k, v))

        fb["older_module"] = (module_inputs, backward_of(older_module))
        fb["kernel_module"] = (module_inputs, backward_of(our_module))
    return fwd, fb


def time_interleaved(cases: dict, repeats: int, warmup: int = 1) -> dict[str, dict]:
    names = list(cases)
    times = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in names:
            setup, run = cases[name]
            x = setup()
            t = time.perf_counter()
            run(x)
            dt = time.perf_counter() - t
            if r >= warmup:
                times[name].append(dt)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": len(ts)}
            for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (seconds)")
    parser.add_argument("--n", type=int, default=None, help="sequence length (default 16384, quick 1024)")
    parser.add_argument("--threads", nargs="+", default=["1,2"],
                        help="thread counts, space- or comma-separated (e.g. --threads 1 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 5, quick 3)")
    parser.add_argument("--no-sdpa-backward", action="store_true", help="skip the slow quadratic SDPA backward")
    parser.add_argument("--older-causal-product-src", default=None,
                        help="path to the older fast-transformers causal_product_cpu.cpp, to compare against it")
    parser.add_argument("--clustered", action="store_true",
                        help="benchmark clustered and improved-clustered attention instead of causal linear")
    parser.add_argument("--clusters", type=int, default=100, help="--clustered: clusters C")
    parser.add_argument("--topk", type=int, default=32, help="--clustered: top keys of improved clustered")
    parser.add_argument("--older-src-dir", default=None,
                        help="--clustered: a fast-transformers checkout whose CPU clustering, aggregate and sparse "
                             "product extensions are compiled into a temp folder and timed beside ours")
    parser.add_argument("--out", default=None,
                        help="JSON path (default results/bench_kernels.json; --clustered: "
                             "results/bench_kernels_clustered.json)")
    args = parser.parse_args()
    threads = [int(t) for arg in args.threads for t in arg.split(",") if t]
    if args.clustered:
        run_clustered(args, threads)
        return
    args.out = args.out or str(ROOT / "results" / "bench_kernels.json")
    n = args.n or (1024 if args.quick else 16384)
    repeats = args.repeats or (3 if args.quick else 5)

    report = kernels.available()
    if not report["cpu"]:
        raise SystemExit(f"the CPU kernel is not available here: {report['cpu_error']}")
    older = load_older(args.older_causal_product_src)
    fl = flops(n, 8, 64, 65)
    results = {
        "torch": torch.__version__, "cpu": cpu_model(), "n": n, "batch": 1, "heads": 8, "head_dim": 64,
        "feature_dim": 64, "value_cols": 65, "repeats": repeats, "flops_forward": fl,
        "flop_note": "useful = 4 n m e per head (recurrent form); chunked = what a C=64 chunked form executes; "
                     "forward+backward counted as 3x forward",
        "runs": [],
    }
    fwd, fb = make_cases(n, older, True, not args.no_sdpa_backward)
    for t in threads:
        torch.set_num_threads(t)
        size = 512 if args.quick else 1024
        forward = time_interleaved({**fwd, "matmul": matmul_case(size)}, repeats)
        mm = 2.0 * size**3 / forward.pop("matmul")["median_s"] / 1e9
        run = {"threads": torch.get_num_threads(), "matmul_gflops": mm, "matmul_size": size,
               "forward": forward, "forward_backward": time_interleaved(fb, repeats)}
        for phase, mult in (("forward", 1.0), ("forward_backward", 3.0)):
            for name, r in run[phase].items():
                if name in ("kernel", "reference", "kernel_module"):
                    for count, value in fl.items():
                        r[f"gflops_{count}"] = mult * value / r["median_s"] / 1e9
                        r[f"fraction_of_matmul_{count}"] = r[f"gflops_{count}"] / mm
        results["runs"].append(run)

    # Ratios the targets are stated in.
    by_threads = {r["threads"]: r for r in results["runs"]}
    summary = {}
    for t, r in by_threads.items():
        f, b = r["forward"], r["forward_backward"]
        s = {"kernel_over_reference_forward": f["kernel"]["median_s"] / f["reference"]["median_s"],
             "kernel_over_sdpa_forward": f["kernel"]["median_s"] / f["sdpa"]["median_s"],
             "kernel_over_reference_fwd_bwd": b["kernel"]["median_s"] / b["reference"]["median_s"]}
        if "sdpa" in b:
            s["kernel_over_sdpa_fwd_bwd"] = b["kernel"]["median_s"] / b["sdpa"]["median_s"]
        if "older" in f:
            s["kernel_over_older_forward"] = f["kernel"]["median_s"] / f["older"]["median_s"]
            s["kernel_module_over_older_module_fwd_bwd"] = (
                b["kernel_module"]["median_s"] / b["older_module"]["median_s"])
        summary[f"{t}_threads"] = s
    if 1 in by_threads and 2 in by_threads:
        summary["kernel_speedup_2_threads_forward"] = (
            by_threads[1]["forward"]["kernel"]["median_s"] / by_threads[2]["forward"]["kernel"]["median_s"])
        summary["kernel_speedup_2_threads_fwd_bwd"] = (
            by_threads[1]["forward_backward"]["kernel"]["median_s"]
            / by_threads[2]["forward_backward"]["kernel"]["median_s"])
    results["summary"] = summary

    print(f"causal linear attention, B=1 H=8 D=64 N={n}, torch {torch.__version__}, {cpu_model()}")
    print(f"{'threads':>7} {'phase':<17} {'impl':<14} {'median ms':>10} {'min-max ms':>17} "
          f"{'GFLOP/s (useful/chunked)':>25} {'of matmul':>14}")
    for r in results["runs"]:
        for phase in ("forward", "forward_backward"):
            for name, x in r[phase].items():
                gf = (f"{x['gflops_useful']:.1f} / {x['gflops_chunked']:.1f}" if "gflops_useful" in x else "")
                frac = (f"{x['fraction_of_matmul_useful']:.0%} / {x['fraction_of_matmul_chunked']:.0%}"
                        if "gflops_useful" in x else "")
                print(f"{r['threads']:>7} {phase:<17} {name:<14} {1e3 * x['median_s']:>10.1f} "
                      f"{1e3 * x['min_s']:>8.1f}-{1e3 * x['max_s']:<8.1f} {gf:>25} {frac:>14}")
        print(f"{r['threads']:>7} matmul fp32 GFLOP/s: {r['matmul_gflops']:.1f}")
    for key, value in summary.items():
        print(f"{key}: {value if isinstance(value, float) else json.dumps(value, default=float)}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, phase in zip(axes, ("forward", "forward_backward")):
        names = list(runs[0][phase])
        width = 0.8 / len(runs)
        for i, r in enumerate(runs):
            xs = [j + i * width for j in range(len(names))]
            ax.bar(xs, [1e3 * r[phase][nm]["median_s"] for nm in names], width, label=f"{r['threads']} thread(s)")
        ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(names))], names, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms, log)")
        ax.set_title(f"{phase.replace('_', ' + ')}, N={results['n']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)



# --------------------------------------------------------------------------- clustered attention (--clustered)
OLDER_CLUSTERED_SOURCES = {
    "hash": "fast_transformers/hashing/hash_cpu.cpp",
    "cluster": "fast_transformers/clustering/hamming/cluster_cpu.cpp",
    "aggregate": "fast_transformers/aggregate/aggregate_cpu.cpp",
    "sparse": "fast_transformers/sparse_product/clustered_sparse_product_cpu.cpp",
}


def load_older_clustered(src_dir: str | None) -> dict | None:
    """The older library's CPU hashing, clustering, aggregate/broadcast and clustered sparse products,
    each compiled from its checkout (``--older-src-dir``) into a temporary folder; never shipped here."""
    if not src_dir:
        return None
    from torch.utils.cpp_extension import load

    mods = {}
    for key, rel in OLDER_CLUSTERED_SOURCES.items():
        build = Path(tempfile.gettempdir()) / "older_clustered_build" / key
        build.mkdir(parents=True, exist_ok=True)
        mods[key] = load(name=f"older_{key}_cpu", sources=[str(Path(src_dir) / rel)], build_directory=str(build),
                         extra_cflags=["-O3", "-fopenmp", "-ffast-math"], extra_ldflags=["-fopenmp"])
    return mods


def older_clustered_forward(mods: dict, q, k, v, clusters: int, bits: int, iterations: int, topk: int | None):
    """The older library's (improved) clustered attention forward, reassembled from its raw ops in the order
    its attention modules call them: hash, cluster, sort the queries by cluster, aggregate the centroids,
    softmax attention of the centroids, (top-k sparse products,) broadcast, un-sort. Inputs and output are
    (batch, heads, n, d) like ours (its modules' own (batch, n, heads, d) permutes are left out)."""
    b, h, n, d = q.shape
    e = v.shape[-1]
    temp = d**-0.5
    planes = torch.randn(bits, d + 1)
    hashes = torch.zeros(b * h * n, dtype=torch.int64)
    mods["hash"].compute_hashes(q.reshape(-1, d), planes, hashes)
    hashes = hashes.view(b, h, n)
    lengths = torch.full((b,), n, dtype=torch.int32)
    centroids = hashes[:, :, torch.randperm(n)[:clusters]].contiguous()
    groups = torch.empty(b, h, n, dtype=torch.int32)
    counts = torch.empty(b, h, clusters, dtype=torch.int32)
    mods["cluster"].cluster(hashes, lengths, centroids, groups, counts, iterations, bits)
    sorted_groups, order = torch.sort(groups, dim=-1)
    offset = torch.arange(b * h).unsqueeze(-1) * n
    s_q = q.reshape(-1, d).index_select(0, (order.view(b * h, -1) + offset).reshape(-1)).view(b, h, n, d)
    factors = 1.0 / counts.float()
    q_grouped = torch.zeros(b, h, clusters, d)
    mods["aggregate"].aggregate(s_q, sorted_groups, factors, q_grouped)
    qk = torch.einsum("nhle,nhse->nhls", q_grouped, k) + torch.zeros(b, 1, 1, k.shape[2])  # its key-length mask
    ones = torch.ones_like(factors)
    if topk is None:
        a = torch.softmax(temp * qk, dim=-1)
        v_c = torch.einsum("nhls,nhsd->nhld", a, v)
        out_sorted = torch.zeros(b, h, n, e)
        mods["aggregate"].broadcast(v_c, sorted_groups, ones, out_sorted)
    else:
        top_values, top = torch.topk(qk, topk, sorted=False, dim=-1)
        a = torch.softmax(temp * qk, dim=-1)
        mask = torch.ones_like(qk)
        mask[torch.arange(b).view(b, 1, 1, 1), torch.arange(h).view(1, h, 1, 1),
             torch.arange(clusters).view(1, 1, clusters, 1), top] = 0
        a = a * mask
        a_bottom = a.sum(-1)
        v_bottom = torch.zeros(b, h, n, e)
        mods["aggregate"].broadcast(torch.einsum("nhls,nhse->nhle", a, v), sorted_groups, ones, v_bottom)
        qk_top = torch.zeros(b, h, n, topk)
        mods["sparse"].clustered_sparse_dot_product(s_q, k, sorted_groups, top, qk_top)
        qk_top = qk_top.masked_fill(torch.isinf(top_values[:, 0, 0, :]).view(b, 1, 1, topk), float("-inf"))
        a_top = torch.softmax(temp * qk_top, dim=-1)
        a_bottom_q = torch.zeros(b, h, n, 1)
        mods["aggregate"].broadcast(a_bottom.unsqueeze(3).contiguous(), sorted_groups, ones, a_bottom_q)
        a_top = a_top * (1.0 - a_bottom_q)
        v_top = torch.zeros(b, h, n, e)
        mods["sparse"].clustered_sparse_weighted_average(a_top, v, sorted_groups, top, v_top)
        out_sorted = v_top + v_bottom
    reverse = torch.argsort(order, dim=-1)
    return out_sorted.reshape(-1, e).index_select(0, (reverse.view(b * h, -1) + offset).reshape(-1)).view(b, h, n, e)


def clustered_cases(n: int, older: dict | None, clusters: int, topk: int, bits: int, iterations: int):
    """Forward cases (name -> (setup, run)) and forward+backward cases; ours with the kernels ("kernel") and
    with ``HF_EFFICIENT_KERNELS=reference`` ("reference"), same seed, so both cluster identically."""
    from hf_efficient.attention import clustered_attention, improved_clustered_attention
    from hf_efficient.attention.hashing import draw_hyperplanes, hash_queries

    b, h, d = 1, 8, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    knobs = dict(clusters=clusters, bits=bits, iterations=iterations, seed=0)

    def ours(fn, impl, **extra):
        def run(x):
            os.environ[kernels.ENV_VAR] = impl
            try:
                with torch.no_grad():
                    return fn(*x, **knobs, **extra)
            finally:
                os.environ.pop(kernels.ENV_VAR)
        return run

    def ours_fb(fn, impl, **extra):
        def run(x):
            os.environ[kernels.ENV_VAR] = impl
            try:
                fn(*x, **knobs, **extra).backward(torch.ones(b, h, n, d))
            finally:
                os.environ.pop(kernels.ENV_VAR)
        return run

    def plain():
        return q, k, v

    def grads():
        return tuple(t.detach().clone().requires_grad_() for t in (q, k, v))

    w, z = draw_hyperplanes(d, bits, 0)
    codes = hash_queries(q, None, w, z).reshape(b * h, n, bits)
    valid = torch.ones(b * h, n, dtype=torch.bool)
    groups = {
        "clustered": {"kernel": (plain, ours(clustered_attention, "auto")),
                      "reference": (plain, ours(clustered_attention, "reference"))},
        "improved": {"kernel": (plain, ours(improved_clustered_attention, "auto", topk=topk)),
                     "reference": (plain, ours(improved_clustered_attention, "reference", topk=topk))},
        "kmeans": {"kernel": (lambda: (codes, valid), lambda x: kernels.hamming_kmeans(*x, clusters, iterations,
                                                                                       implementation="kernel")),
                   "reference": (lambda: (codes, valid), lambda x: kernels.hamming_kmeans(
                       *x, clusters, iterations, implementation="reference"))},
        "clustered_fwd_bwd": {"kernel": (grads, ours_fb(clustered_attention, "auto")),
                              "reference": (grads, ours_fb(clustered_attention, "reference"))},
        "improved_fwd_bwd": {"kernel": (grads, ours_fb(improved_clustered_attention, "auto", topk=topk)),
                             "reference": (grads, ours_fb(improved_clustered_attention, "reference", topk=topk))},
    }
    # the other kernels alone, at the sizes clustered attention gives them (they are dispatched by default
    # only where faster than their PyTorch path)
    _, assign = clustered_attention(q, k, v, **knobs, return_clusters=True)
    cout = torch.randn(b, h, clusters, d + 1, generator=g)
    top = torch.randint(0, n, (b, h, clusters, topk), generator=g)
    op_calls = {
        "op_cluster_mean": lambda impl: kernels.cluster_mean(q, assign, clusters, implementation=impl),
        "op_cluster_broadcast": lambda impl: kernels.cluster_broadcast(cout, assign, implementation=impl),
        "op_clustered_topk": lambda impl: kernels.clustered_topk(q, k, v, assign, top, None, d**-0.5,
                                                                 implementation=impl),
    }
    for name, call in op_calls.items():
        groups[name] = {impl: (plain, lambda x, call=call, impl=impl: call(impl)) for impl in ("kernel", "reference")}
    if older is not None:
        groups["clustered"]["older"] = (plain, lambda x: older_clustered_forward(older, *x, clusters, bits,
                                                                                 iterations, None))
        groups["improved"]["older"] = (plain, lambda x: older_clustered_forward(older, *x, clusters, bits,
                                                                                iterations, topk))

        def older_kmeans(x):
            hashes, centroids = x
            groups_ = torch.empty(b, h, n, dtype=torch.int32)
            counts = torch.empty(b, h, clusters, dtype=torch.int32)
            older["cluster"].cluster(hashes, torch.full((b,), n, dtype=torch.int32), centroids.clone(), groups_,
                                     counts, iterations, bits)

        packed = (codes.long() << torch.arange(bits)).sum(-1).reshape(b, h, n)  # its int64 codes
        groups["kmeans"]["older"] = (lambda: (packed, packed[:, :, torch.randperm(n)[:clusters]].contiguous()),
                                     older_kmeans)
    return groups


def time_with_cpu(cases: dict, repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Like :func:`time_interleaved`, also recording the process CPU time of each run: on a busy machine
    the wall time of a 1-thread run includes waiting for a core, its CPU time does not."""
    names = list(cases)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in names:
            setup, run = cases[name]
            x = setup()
            t, c = time.perf_counter(), time.process_time()
            run(x)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if r >= warmup:
                wall[name].append(dt)
                cpu[name].append(dc)
    return {name: {"median_s": statistics.median(wall[name]), "min_s": min(wall[name]), "max_s": max(wall[name]),
                   "cpu_median_s": statistics.median(cpu[name]), "repeats": len(wall[name])} for name in names}


def run_clustered(args, threads: list[int]) -> None:
    n = args.n or (2048 if args.quick else 16384)
    repeats = args.repeats or (3 if args.quick else 5)
    clusters, topk, bits, iterations = args.clusters, args.topk, 63, 10
    report = kernels.available()
    if not report["cpu_clustered"]:
        raise SystemExit(f"the clustered CPU kernels are not available here: {report['cpu_clustered_error']}")
    older = load_older_clustered(args.older_src_dir)
    groups = clustered_cases(n, older, clusters, topk, bits, iterations)
    if args.quick:  # the backward cases dominate a quick run; the full run has them
        groups = {name: cases for name, cases in groups.items() if not name.endswith("fwd_bwd")}
    results = {"torch": torch.__version__, "cpu": cpu_model(), "n": n, "batch": 1, "heads": 8, "head_dim": 64,
               "clusters": clusters, "topk": topk, "bits": bits, "iterations": iterations, "repeats": repeats,
               "older": older is not None,
               "note": "kernel = ours with the compiled kernels, reference = ours with HF_EFFICIENT_KERNELS=reference, "
                       "older = the older library's raw CPU ops reassembled (forward only); times are wall-clock "
                       "medians, cpu_median_s the process CPU time",
               "runs": []}
    for t in threads:
        torch.set_num_threads(t)
        run = {"threads": torch.get_num_threads()}
        for name, cases in groups.items():
            run[name] = time_with_cpu(cases, repeats)
        results["runs"].append(run)

    summary = {}
    for run in results["runs"]:
        s = {}
        for name in groups:
            r = run[name]
            s[f"{name}_kernel_over_reference"] = r["kernel"]["median_s"] / r["reference"]["median_s"]
            if "older" in r:
                s[f"{name}_kernel_over_older"] = r["kernel"]["median_s"] / r["older"]["median_s"]
                s[f"{name}_kernel_over_older_cpu_time"] = r["kernel"]["cpu_median_s"] / r["older"]["cpu_median_s"]
        summary[f"{run['threads']}_threads"] = s
    by_threads = {r["threads"]: r for r in results["runs"]}
    if 1 in by_threads and 2 in by_threads:
        for name in groups:
            summary[f"{name}_kernel_speedup_2_threads"] = (
                by_threads[1][name]["kernel"]["median_s"] / by_threads[2][name]["kernel"]["median_s"])
    results["summary"] = summary

    print(f"clustered attention, B=1 H=8 D=64 N={n} C={clusters} top-{topk} {bits} bits {iterations} iterations, "
          f"torch {torch.__version__}, {cpu_model()}")
    print(f"{'threads':>7} {'case':<18} {'impl':<10} {'median ms':>10} {'min-max ms':>17} {'cpu ms':>8}")
    for run in results["runs"]:
        for name in groups:
            for impl, x in run[name].items():
                print(f"{run['threads']:>7} {name:<18} {impl:<10} {1e3 * x['median_s']:>10.1f} "
                      f"{1e3 * x['min_s']:>8.1f}-{1e3 * x['max_s']:<8.1f} {1e3 * x['cpu_median_s']:>8.1f}")
    for key, value in summary.items():
        print(f"{key}: {json.dumps(value, default=float) if isinstance(value, dict) else f'{value:.3f}'}")
    out = Path(args.out or ROOT / "results" / "bench_kernels_clustered.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot_clustered(results, list(groups), out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot_clustered(results: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        impls = ["kernel", "reference", "older"]
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            xs = [j + i * width for j, nm in enumerate(names) if impl in run[nm]]
            ys = [1e3 * run[nm][impl]["median_s"] for nm in names if impl in run[nm]]
            if xs:
                ax.bar(xs, ys, width, label=impl)
        ax.set_xticks([j + width for j in range(len(names))], names, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms, log)")
        ax.set_title(f"N={results['n']}, C={results['clusters']}, {run['threads']} thread(s)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
