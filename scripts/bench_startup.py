#!/usr/bin/env python
"""What a user pays before any attention runs: ``import hf_efficient`` and ``hf-efficient --help``.

Each case runs in a fresh interpreter; the cost is the child's CPU time (user + system, from
``os.wait4``), so other jobs on the machine move it less than wall time. Cases are interleaved
(baseline, package, CLI, baseline, ...) and the median of the repeats is reported with the min-max
spread. The baseline is ``import torch, transformers``: what any Hugging Face user already pays.

    python scripts/bench_startup.py --quick     # 3 repeats
    python scripts/bench_startup.py             # 9 repeats

Writes ``results/bench_startup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

CASES = {
    "python": [sys.executable, "-c", "pass"],
    "torch+transformers": [sys.executable, "-c", "import torch, transformers"],
    "import hf_efficient": [sys.executable, "-c", "import hf_efficient"],
    "hf-efficient --help": [sys.executable, "-m", "hf_efficient.cli", "--help"],
    # the sub-command parsers read the attention registry (which imports torch), not transformers
    "hf-efficient convert --help": [sys.executable, "-m", "hf_efficient.cli", "convert", "--help"],
}
HELP_TARGET_SECONDS = 1.5  # `hf-efficient --help`


def child_cpu_seconds(cmd: list[str]) -> float:
    """CPU seconds (user + system) of one fresh process running ``cmd``; raises if it fails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {err[-2000:]}")
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 9")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of each case (>= 1)")
    parser.add_argument("--out", default="results/bench_startup.json", help="JSON output path")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 9)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")

    for cmd in CASES.values():  # warm the file cache (and the kernels' build cache) once
        child_cpu_seconds(cmd)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(repeats):
        for name, cmd in CASES.items():
            times[name].append(child_cpu_seconds(cmd))

    base = statistics.median(times["torch+transformers"])
    rows = []
    print(f"{'case':<28} {'CPU s (median)':>15} {'min-max':>14} {'vs torch+transformers':>22}")
    for name, values in times.items():
        med = statistics.median(values)
        rows.append({"case": name, "cpu_seconds_median": med, "cpu_seconds_min": min(values),
                     "cpu_seconds_max": max(values), "ratio_to_torch_transformers": med / base})
        print(f"{name:<28} {med:>15.2f} {min(values):>6.2f}-{max(values):<7.2f} {med / base:>21.2f}x")
    help_median = statistics.median(times["hf-efficient --help"])
    print(f"hf-efficient --help: {help_median:.2f} s CPU (target <= {HELP_TARGET_SECONDS} s: "
          f"{'met' if help_median <= HELP_TARGET_SECONDS else 'NOT met'})")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "repeats": repeats, "python": sys.version.split()[0], "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "rows": rows,
        "help_target_seconds": HELP_TARGET_SECONDS, "help_target_met": help_median <= HELP_TARGET_SECONDS,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
