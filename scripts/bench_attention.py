#!/usr/bin/env python
"""Attention kinds versus softmax SDPA (time and memory against N); see hf_efficient.benchmarking.

    python scripts/bench_attention.py --quick
    python scripts/bench_attention.py --kinds linear clustered improved-clustered

``--clustered`` runs a focused sweep of improved-clustered attention instead: the default (Hamming)
clustering and ``clustering="queries"`` beside SDPA, forward only, interleaved, median CPU time of the
calling thread (one thread), at N = 512 ... 4096, B=1, H=8, D=64:

    python scripts/bench_attention.py --clustered                       # writes results/bench_clustered.json
    python scripts/bench_attention.py --clustered --lengths 1024 --repeats 5 --clusters 25
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_efficient.benchmarking import machine_info, main


def _calls(q, k, v, knobs, query_iterations):
    from hf_efficient.attention import improved_clustered_attention

    return {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "hamming": lambda: improved_clustered_attention(q, k, v, **knobs),
        "queries": lambda: improved_clustered_attention(q, k, v, **knobs, clustering="queries",
                                                        iterations=query_iterations),
    }


def clustered_sweep(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="improved-clustered (Hamming / queries clustering) vs SDPA")
    parser.add_argument("--clustered", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--query-iterations", type=int, default=1, help="Lloyd rounds of clustering='queries'")
    parser.add_argument("--out", type=Path, default=Path("results/bench_clustered.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    b, h, d = 1, 8, 64
    knobs = dict(clusters=args.clusters, topk=args.topk, seed=0)
    rows = []
    print(f"{'N':>6s} {'sdpa ms':>9s} {'hamming ms':>11s} {'queries ms':>11s} {'sdpa/hamming':>13s} "
          f"{'queries/hamming':>16s}")
    for n in args.lengths:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
        fns = _calls(q, k, v, knobs, args.query_iterations)
        times = {name: [] for name in fns}
        with torch.no_grad():
            for fn in fns.values():
                fn()  # warm-up
            for _ in range(args.repeats):  # interleaved; thread CPU time is robust to other load on the machine
                for name, fn in fns.items():
                    start = time.thread_time()
                    fn()
                    times[name].append(time.thread_time() - start)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        row = {"n": n, **{f"{name}_ms": 1e3 * med[name] for name in fns},
               **{f"{name}_range_ms": [1e3 * min(ts), 1e3 * max(ts)] for name, ts in times.items()},
               "sdpa_over_hamming": med["sdpa"] / med["hamming"], "sdpa_over_queries": med["sdpa"] / med["queries"],
               "queries_over_hamming": med["queries"] / med["hamming"]}
        rows.append(row)
        print(f"{n:6d} {row['sdpa_ms']:9.1f} {row['hamming_ms']:11.1f} {row['queries_ms']:11.1f} "
              f"{row['sdpa_over_hamming']:13.2f} {row['queries_over_hamming']:16.2f}", flush=True)
    result = {"benchmark": "improved-clustered vs SDPA, forward", "shape": {"batch": b, "heads": h, "head_dim": d},
              "params": {**knobs, "query_iterations": args.query_iterations}, "repeats": args.repeats,
              "timer": "time.thread_time (CPU time of the calling thread), median", **machine_info(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if "--clustered" in sys.argv[1:]:
        raise SystemExit(clustered_sweep(sys.argv[1:]))
    raise SystemExit(main())
