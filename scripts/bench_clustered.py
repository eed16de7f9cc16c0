#!/usr/bin/env python
"""Clustered and improved-clustered attention versus non-causal softmax SDPA: forward time and memory against N.

Both kinds run through the attention registry with their default parameters (clusters 100, bits 63,
10 Lloyd rounds, top-k 32, seed 0) beside ``torch.nn.functional.scaled_dot_product_attention``.
B=1, H=8, D=64, random Gaussian q, k, v. Timings are interleaved (SDPA, clustered, improved, SDPA,
...) after a warm-up; the median of the repeats is reported with the min-max spread (fewer repeats
where one SDPA call takes over 5 s: the JSON records how many). Peak memory is the growth of the peak
resident set of a fresh subprocess during one call (its high-water mark reset just before).

    python scripts/bench_clustered.py --quick                  # N = 512, 1024, 2048; seconds
    python scripts/bench_clustered.py                          # N = 512 ... 32768
    python scripts/bench_clustered.py --lengths 4096 16384 --threads 1

Writes ``results/bench_clustered.json`` and ``results/bench_clustered.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hf_efficient
from hf_efficient.attention import get_attention_kind

B, H, D = 1, 8, 64
IMPLS = ("sdpa", "clustered", "improved-clustered")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_fn(impl: str):
    """(q, k, v) -> out for 'sdpa' or a registered kind with its default parameters."""
    if impl == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    kind = get_attention_kind(impl)
    params = kind.make_params()
    return lambda q, k, v: kind.forward(q, k, v, params, causal=False, scale=D**-0.5)


def inputs(n: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, n, D, generator=g) for _ in range(3)]


def run_once(fn, q, k, v) -> float:
    start = time.perf_counter()
    fn(q, k, v)
    return time.perf_counter() - start


@torch.no_grad()
def time_interleaved(n: int, repeats: int) -> dict[str, list[float]]:
    fns = {impl: make_fn(impl) for impl in IMPLS}
    q, k, v = inputs(n)
    first = {impl: run_once(fn, q, k, v) for impl, fn in fns.items()}  # warm-up
    reps = repeats if first["sdpa"] < 5.0 else max(2, repeats // 2)
    times = {impl: [] for impl in IMPLS}
    for _ in range(reps):
        for impl, fn in fns.items():
            times[impl].append(run_once(fn, q, k, v))
    return times


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def child(impl: str, n: int) -> None:
    """Runs in a fresh process: print the peak-RSS growth (MiB) of one forward call.

    Importing torch and transformers peaks higher than a small call, so the high-water mark is reset
    (``/proc/self/clear_refs``) just before the call where Linux allows it; otherwise the growth of
    ``ru_maxrss`` is reported, which reads 0 for calls below the import peak.
    """
    torch.set_num_threads(1)
    fn = make_fn(impl)
    q, k, v = inputs(n)
    with torch.no_grad():
        fn(q[:, :, :64], k[:, :, :64], v[:, :, :64])  # load lazily initialised libraries first
        try:
            Path("/proc/self/clear_refs").write_text("5")
            base = _rss_kib("VmRSS")
        except OSError:
            base = None
        base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn(q, k, v)
    if base is not None and _rss_kib("VmHWM") is not None:
        growth = _rss_kib("VmHWM") - base
    else:
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_max
    print(json.dumps({"peak_mib": growth / 1024}))


def peak_memory(impl: str, n: int) -> float:
    cmd = [sys.executable, __file__, "--child", impl, str(n)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 512, 1024, 2048; 3 repeats; no memory subprocesses")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths to sweep")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", type=Path, default=Path("results/bench_clustered.json"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0

    torch.set_num_threads(args.threads)
    lengths = args.lengths or ([512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192, 16384, 32768])
    repeats = 3 if args.quick else args.repeats
    measure_memory = not (args.quick or args.no_memory)
    rows = []
    for n in lengths:
        times = time_interleaved(n, repeats)
        base = statistics.median(times["sdpa"])
        for impl in IMPLS:
            med = statistics.median(times[impl])
            row = {
                "impl": impl,
                "n": n,
                "median_s": med,
                "min_s": min(times[impl]),
                "max_s": max(times[impl]),
                "repeats": len(times[impl]),
                "speedup_vs_sdpa": base / med,
            }
            if measure_memory:
                row["peak_mib"] = peak_memory(impl, n)
            rows.append(row)
            print(_fmt(row), flush=True)

    result = {
        "benchmark": "clustered attention vs SDPA (non-causal forward)",
        "shape": {"batch": B, "heads": H, "head_dim": D},
        "params": {impl: vars(get_attention_kind(impl).make_params()) for impl in IMPLS[1:]},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "hf_efficient": hf_efficient.__version__,
        "cpu": cpu_model(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nthreads {torch.get_num_threads()}, torch {torch.__version__}, {cpu_model()}; wrote {args.out}")
    _plot(rows, args.out.with_suffix(".png"), measure_memory)
    return 0


def _fmt(row) -> str:
    mem = f"  peak {row['peak_mib']:8.1f} MiB" if "peak_mib" in row else ""
    return (
        f"{row['impl']:>20s} N={row['n']:6d}  {row['median_s'] * 1e3:9.1f} ms "
        f"[{row['min_s'] * 1e3:.1f}-{row['max_s'] * 1e3:.1f}] x{row['repeats']}  "
        f"speed-up x{row['speedup_vs_sdpa']:6.2f} vs SDPA{mem}"
    )


def _plot(rows, path: Path, with_memory: bool) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    panels = [("median_s", "forward seconds (median)")]
    if with_memory:
        panels.append(("peak_mib", "peak memory growth (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for impl in IMPLS:
            pts = [(r["n"], r[key]) for r in rows if r["impl"] == impl and r.get(key, 0) > 0]
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=impl)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(label)
        ax.set_title(f"non-causal, B={B}, H={H}, D={D}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
