"""Attention kinds versus softmax SDPA: time (forward, forward+backward) and peak memory against N.

Every registered kind that is asked for (default: ``linear``) runs through the registry's forward
with its default parameters, beside ``torch.nn.functional.scaled_dot_product_attention`` (the
transformers v5 default). Timings are interleaved (ours, SDPA, ours, ...) after a warm-up and the
median of the repeats is reported with the min-max spread and the ratio to SDPA; every time is taken
by ``torch.utils.benchmark.Timer`` (:func:`interleaved_times`); peak memory is the growth of the peak
resident set of a fresh subprocess over its size after the inputs were made.

    python scripts/bench_attention.py --quick               # CI-sized, seconds
    python scripts/bench_attention.py                       # N = 512 ... 32768
    python scripts/bench_attention.py --kinds linear clustered improved-clustered
    hf-efficient bench --quick                              # the same, from the installed package

Writes ``results/bench_attention.json`` and ``results/bench_attention.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import hf_efficient
from hf_efficient.arguments import positive_int
from hf_efficient.attention import attention_kind_names, get_attention_kind

B, H, D = 1, 8, 64


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What every benchmark records beside its numbers: threads, torch version, CPU model."""
    return {"torch_num_threads": torch.get_num_threads(), "torch_version": torch.__version__, "cpu_model": cpu_model()}


def make_fn(impl: str, causal: bool):
    """A function (q, k, v) -> out for an implementation name ('sdpa' or a registered kind)."""
    if impl == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    kind = get_attention_kind(impl)
    params = kind.make_params()
    return lambda q, k, v: kind.forward(q, k, v, params, causal=causal, scale=D**-0.5)


def inputs(n: int, grad: bool):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, n, D, generator=g).requires_grad_(grad) for _ in range(3)]


def timer(stmt: Callable[[], object], setup: Callable[[], object] | None = None,
          clock: Callable[[], float] = time.perf_counter) -> benchmark.Timer:
    """A ``torch.utils.benchmark.Timer`` of ``stmt()`` at this process's thread count; with ``setup``, each
    timed block first runs ``x = setup()`` untimed and then times ``stmt(x)``. ``clock`` is wall time by
    default; ``time.process_time`` counts this process's CPU time only (steadier on a shared machine)."""
    if setup is None:
        return benchmark.Timer(stmt="stmt()", globals={"stmt": stmt}, num_threads=torch.get_num_threads(),
                               timer=clock)
    return benchmark.Timer(stmt="stmt(x)", setup="x = setup()", globals={"stmt": stmt, "setup": setup},
                           num_threads=torch.get_num_threads(), timer=clock)


def interleaved_times(timers: Mapping[Hashable, benchmark.Timer], rounds: int, number: int = 1) -> dict:
    """Seconds per call of each timer's statement, interleaved (A B C A B C ...) so that changes of the
    machine's load hit all alike: ``{name: [rounds samples]}``, a sample being ``number`` calls timed together."""
    times: dict = {name: [] for name in timers}
    for _ in range(rounds):
        for name, t in timers.items():
            times[name].append(t.timeit(number).mean)
    return times


def load_older_causal_product(src: str | None):
    """The older fast-transformers CPU causal product (``causal_product_cpu.cpp`` of its source
    distribution), compiled into a temporary folder with its own flags (-fopenmp -ffast-math) plus -O3;
    None without ``src``. For the comparison benchmarks only; never shipped here."""
    if not src:
        return None
    import tempfile

    from torch.utils.cpp_extension import load

    build = Path(tempfile.gettempdir()) / "older_causal_product_build"
    build.mkdir(exist_ok=True)
    return load(name="older_causal_product_cpu", sources=[src], build_directory=str(build),
                extra_cflags=["-O3", "-fopenmp", "-ffast-math"], extra_ldflags=["-fopenmp"])


def older_causal_product(older) -> type[torch.autograd.Function]:
    """An autograd function around the older fast-transformers CPU causal product (``older``: its compiled
    extension, with ``causal_dot_product`` and ``causal_dot_backward``), for the comparisons in the kernel
    benchmarks: ``apply(phi_q, phi_k, v)`` -> ``(batch, heads, n, d_v)`` unnormalised causal products."""

    class OlderCausalProduct(torch.autograd.Function):
        @staticmethod
        def forward(ctx, fq, fk, fv):
            ctx.save_for_backward(fq, fk, fv)
            out = torch.zeros_like(fv)
            older.causal_dot_product(fq, fk, fv, out)
            return out

        @staticmethod
        def backward(ctx, gy):
            fq, fk, fv = ctx.saved_tensors
            dq, dk, dv = torch.zeros_like(fq), torch.zeros_like(fk), torch.zeros_like(fv)
            older.causal_dot_backward(fq, fk, fv, gy.contiguous(), dq, dk, dv)
            return dq, dk, dv

    return OlderCausalProduct


def summary(times: list[float]) -> dict:
    """``median_s`` (what we report), ``min_s``, ``max_s`` (the spread) and ``repeats`` of a list of seconds."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def run_once(fn, q, k, v, backward: bool) -> None:
    """One call (and its backward, gradients then cleared)."""
    out = fn(q, k, v)
    if backward:
        out.sum().backward()
        for t in (q, k, v):
            t.grad = None


def time_pair(impls, n, causal, backward, repeats):
    """Interleaved timings of several implementations at one size: {impl: [seconds...]}."""
    fns = {impl: make_fn(impl, causal) for impl in impls}
    q, k, v = inputs(n, backward)
    with torch.set_grad_enabled(backward):
        timers = {impl: timer(lambda fn=fn: run_once(fn, q, k, v, backward)) for impl, fn in fns.items()}
        # warm-up, and the cost of one call to size the repeats
        first = interleaved_times(timers, 1)
        reps = repeats if max(t[0] for t in first.values()) < 5.0 else max(3, repeats // 2)
        return interleaved_times(timers, reps)


def matmul_gflops() -> float:
    """This machine's float32 matmul rate (GFLOP/s) at 2048 x 2048, median of ``blocked_autorange``."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / timer(lambda: a @ b).blocked_autorange(min_run_time=0.5).median / 1e9


def read_bandwidth_gbs(megabytes: int = 256, clock: Callable[[], float] = time.perf_counter) -> float:
    """This machine's memory read bandwidth as torch sees it (GB/s): the fastest of the sums over a float32
    tensor far larger than the caches that ``blocked_autorange`` times (with ``clock``, as :func:`timer`). The
    floor of a decoding step is its weight bytes over it."""
    x = torch.ones(megabytes * 2**20 // 4)
    return x.numel() * 4 / min(timer(x.sum, clock=clock).blocked_autorange(min_run_time=0.5).times) / 1e9


def linear_flops(n: int, causal: bool, backward: bool, chunk: int = 64) -> float:
    """Multiply-add FLOPs of the linear kind's algorithm (m = D features, e = D + 1 columns)."""
    m, e = D, D + 1
    per_head = 4 * n * m * e + (2 * n * chunk * (m + e) if causal else 0)
    return B * H * per_head * (3 if backward else 1)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def child(impl: str, n: int, causal: bool, backward: bool) -> None:
    """Runs in a fresh process: print the peak growth (MiB) of the resident set during one call.

    A thread samples /proc/self/statm every 0.5 ms (ru_maxrss is useless here: the import of torch
    already set a higher peak than most calls reach)."""
    import threading

    torch.set_num_threads(1)
    fn = make_fn(impl, causal)
    q, k, v = inputs(n, backward)
    with torch.set_grad_enabled(backward):
        run_once(fn, q, k, v, backward)  # warm-up: lazy initialisation is not the call's memory
    base = _rss_bytes()
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    with torch.set_grad_enabled(backward):
        run_once(fn, q, k, v, backward)
    done.set()
    thread.join()
    print(json.dumps({"peak_mib": (max(peak[0], _rss_bytes()) - base) / 2**20}))


def peak_memory(impl, n, causal, backward) -> float:
    flags = [impl, str(n), str(int(causal)), str(int(backward))]
    cmd = [sys.executable, "-m", "hf_efficient.benchmarking", "--child", *flags]
    # Large blocks straight from mmap: freed memory leaves the process at once, so the peak resident
    # set tracks live tensors instead of glibc's recycled heap (its dynamic threshold hides growth).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 512, 1024; 3 repeats; no memory subprocesses")
    parser.add_argument("--lengths", type=positive_int, nargs="+", help="sequence lengths to sweep")
    parser.add_argument("--kinds", nargs="+", default=["linear"], choices=attention_kind_names(), metavar="KIND",
                        help=f"registered kinds to compare with SDPA ({', '.join(attention_kind_names())})")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--masking", choices=["both", "causal", "full"], default="both",
                        help="causal attention, full (non-causal) attention, or both (default)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_attention.json"))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, n, causal, backward = args.child
        child(impl, int(n), bool(int(causal)), bool(int(backward)))
        return 0

    torch.set_num_threads(args.threads)
    lengths = args.lengths or ([512, 1024] if args.quick else [512, 1024, 2048, 4096, 8192, 16384, 32768])
    repeats = 3 if args.quick else args.repeats
    measure_memory = not (args.quick or args.no_memory)
    for kind in args.kinds:
        get_attention_kind(kind)  # fail early with the list of kinds
    peak = matmul_gflops()
    rows = []
    for causal in {"both": (True, False), "causal": (True,), "full": (False,)}[args.masking]:
        kinds = [k for k in args.kinds if not causal or get_attention_kind(k).supports_causal]
        for backward in (False, True):
            for n in lengths:
                times = time_pair(["sdpa", *kinds], n, causal, backward, repeats)
                base = statistics.median(times["sdpa"])
                for impl in ["sdpa", *kinds]:
                    row = {"impl": impl, "causal": causal, "mode": "fwd+bwd" if backward else "fwd", "n": n,
                           **summary(times[impl])}
                    med = row["median_s"]
                    row["speedup_vs_sdpa"] = base / med
                    if impl == "linear":
                        gflops = linear_flops(n, causal, backward) / med / 1e9
                        row.update(gflops=gflops, fraction_of_matmul=gflops / peak)
                    if measure_memory:
                        row["peak_mib"] = peak_memory(impl, n, causal, backward)
                    rows.append(row)
                    print(_fmt(row), flush=True)

    result = {
        "benchmark": "attention vs SDPA",
        "shape": {"batch": B, "heads": H, "head_dim": D},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "hf_efficient": hf_efficient.__version__,
        "cpu": cpu_model(),
        "matmul_gflops": peak,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nmatmul fp32 GFLOP/s on this machine: {peak:.1f}; wrote {args.out}")
    _plot(rows, args.out.with_suffix(".png"))
    return 0


def _fmt(row) -> str:
    extra = f"  {row['gflops']:6.1f} GFLOP/s ({row['fraction_of_matmul']:.0%} of matmul)" if "gflops" in row else ""
    mem = f"  peak {row['peak_mib']:8.1f} MiB" if "peak_mib" in row else ""
    return (
        f"{row['impl']:>20s} {'causal' if row['causal'] else 'full':6s} {row['mode']:7s} N={row['n']:6d}  "
        f"{row['median_s'] * 1e3:9.1f} ms [{row['min_s'] * 1e3:.1f}-{row['max_s'] * 1e3:.1f}]  "
        f"x{row['speedup_vs_sdpa']:6.2f} vs SDPA{extra}{mem}"
    )


def _plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    modes = sorted({(r["causal"], r["mode"]) for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 4), squeeze=False)
    for ax, (causal, mode) in zip(axes[0], modes):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = [(r["n"], r["median_s"]) for r in rows if (r["causal"], r["mode"], r["impl"]) == (causal, mode, impl)]
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=impl)
        ax.set_title(f"{'causal' if causal else 'non-causal'} {mode}")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("seconds (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
