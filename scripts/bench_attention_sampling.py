"""Per-image cost of attention sampling vs a CNN over the full-resolution image, canvas 512 ... 4096.

    python scripts/bench_attention_sampling.py            # full: 512, 1024, 2048, 4096
    python scripts/bench_attention_sampling.py --quick    # 512, 1024

Time: forward + backward of one image (batch 1) from the image processor's outputs, both methods
interleaved in one process (A B A B ...) after a warm-up, median of ``--repeats``; the processor's own
time (making the low-resolution view) is reported beside it. Memory: peak resident memory
(``VmHWM``; ``resource.getrusage`` where that is missing) of a fresh subprocess that runs one
forward + backward, and the same minus an idle subprocess that only imports, builds the model and
holds the input (the memory the method itself needs). The CNN is the attention model's own feature
network applied to the whole image.
Attention sampling reads a fixed-size low-resolution view (``--low-res``), so its cost does not grow
with the image. Writes ``results/bench_attention_sampling.json`` and a log-log PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from hf_efficient.benchmarking import cpu_model
from hf_efficient.vision import (
    AttentionSamplingConfig,
    AttentionSamplingForImageClassification,
    AttentionSamplingImageProcessor,
)
from hf_efficient.vision.attention_sampling import build_feature_cnn

FEATURE_CHANNELS = [16, 32, 32]




def build(method: str, canvas: int, low_res: int):
    """Model, its inputs for one ``canvas x canvas`` image, and the processor call that makes them."""
    torch.manual_seed(0)
    image = torch.rand(canvas, canvas) * 255
    labels = torch.tensor([3])
    if method == "attention_sampling":
        config = AttentionSamplingConfig(
            num_channels=1, patch_size=32, num_patches=10, feature_channels=FEATURE_CHANNELS, num_labels=10
        )
        model = AttentionSamplingForImageClassification(config)
        processor = AttentionSamplingImageProcessor(low_res_size={"height": low_res, "width": low_res})

        def prepare():
            return dict(processor(image), labels=labels)

        def step(inputs):
            return model(**inputs).loss

    elif method == "cnn":
        model = nn.Sequential(build_feature_cnn(1, FEATURE_CHANNELS), nn.Linear(FEATURE_CHANNELS[-1], 10))

        def prepare():
            return {"pixel_values": ((image / 255 - 0.5) / 0.5)[None, None], "labels": labels}

        def step(inputs):
            return nn.functional.cross_entropy(model(inputs["pixel_values"]), inputs["labels"])

    else:
        raise ValueError(f"unknown method {method!r}; accepted: attention_sampling, cnn")
    model.train()
    return model, prepare, step


def fwd_bwd(model, step, inputs) -> None:
    model.zero_grad(set_to_none=True)
    step(inputs).backward()


def child(method: str, canvas: int, low_res: int, idle: bool) -> None:
    """Run in a fresh process: one forward + backward (unless idle), print peak RSS in MiB."""
    torch.set_num_threads(1)
    model, prepare, step = build(method, canvas, low_res)
    inputs = prepare()
    if not idle:
        fwd_bwd(model, step, inputs)
    print(json.dumps({"peak_rss_mib": peak_rss_kib() / 1024}))


def peak_rss_kib() -> float:
    """Peak resident memory of this process in KiB.

    ``VmHWM`` belongs to this process's own address space; ``getrusage``'s ``ru_maxrss`` (the
    fallback) can carry over the parent's peak across fork + exec on Linux, which would hide small
    children behind the parent benchmark's footprint.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def measure_memory(method: str, canvas: int, low_res: int, idle: bool) -> float:
    cmd = [sys.executable, __file__, "--child", method, str(canvas), "--low-res", str(low_res)]
    if idle:
        cmd.append("--idle")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def measure_time(canvas: int, low_res: int, repeats: int) -> dict:
    built = {m: build(m, canvas, low_res) for m in ("attention_sampling", "cnn")}
    inputs = {m: built[m][1]() for m in built}
    for m, (model, _, step) in built.items():  # warm-up
        fwd_bwd(model, step, inputs[m])
    times: dict[str, list[float]] = {m: [] for m in built}
    prep: list[float] = []
    for _ in range(repeats):
        for m, (model, prepare, step) in built.items():  # interleaved A B A B ...
            if m == "attention_sampling":
                t0 = time.perf_counter()
                prepare()
                prep.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fwd_bwd(model, step, inputs[m])
            times[m].append(time.perf_counter() - t0)
    result = {f"{m}_seconds": statistics.median(v) for m, v in times.items()}
    result.update({f"{m}_seconds_min_max": [min(v), max(v)] for m, v in times.items()})
    result["processor_seconds"] = statistics.median(prep)
    return result


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["canvas"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.loglog(sizes, [r["attention_sampling_seconds"] for r in rows], "o-", label="attention sampling")
    ax1.loglog(sizes, [r["cnn_seconds"] for r in rows], "s-", label="CNN, full resolution")
    ax1.set_xlabel("canvas side (pixels)")
    ax1.set_ylabel("forward + backward per image (s)")
    ax1.legend()
    ax2.loglog(sizes, [r["attention_sampling_peak_mib"] for r in rows], "o-", label="attention sampling, peak")
    ax2.loglog(sizes, [r["cnn_peak_mib"] for r in rows], "s-", label="CNN, peak")
    extra_as = [max(r["attention_sampling_extra_mib"], 1e-1) for r in rows]
    ax2.loglog(sizes, extra_as, "o--", label="attention sampling, over idle")
    ax2.loglog(sizes, [max(r["cnn_extra_mib"], 1e-1) for r in rows], "s--", label="CNN, over idle")
    ax2.set_xlabel("canvas side (pixels)")
    ax2.set_ylabel("resident memory (MiB)")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="canvas 512 and 1024 only")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--low-res", type=int, default=128, help="side of the fixed low-resolution view")
    parser.add_argument("--output", type=Path, default=Path("results/bench_attention_sampling.json"))
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "CANVAS"), help=argparse.SUPPRESS)
    parser.add_argument("--idle", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.low_res, args.idle)
        return
    if args.quick:
        args.sizes = [512, 1024]
    torch.set_num_threads(1)

    rows = []
    header = (
        f"{'canvas':>7} {'AS s':>8} {'CNN s':>8} {'time x':>7} {'AS MiB':>7} {'CNN MiB':>8} "
        f"{'AS+':>7} {'CNN+':>8} {'mem+ x':>7}"
    )
    print(header)
    for canvas in args.sizes:
        row = {"canvas": canvas, **measure_time(canvas, args.low_res, args.repeats)}
        for m in ("attention_sampling", "cnn"):
            peak = measure_memory(m, canvas, args.low_res, idle=False)
            idle = measure_memory(m, canvas, args.low_res, idle=True)
            row[f"{m}_peak_mib"], row[f"{m}_idle_mib"], row[f"{m}_extra_mib"] = peak, idle, peak - idle
        row["time_ratio"] = row["attention_sampling_seconds"] / row["cnn_seconds"]
        row["peak_memory_ratio"] = row["attention_sampling_peak_mib"] / row["cnn_peak_mib"]
        row["extra_memory_ratio"] = row["attention_sampling_extra_mib"] / max(row["cnn_extra_mib"], 1e-9)
        rows.append(row)
        print(
            f"{canvas:>7} {row['attention_sampling_seconds']:>8.4f} {row['cnn_seconds']:>8.3f} "
            f"{row['time_ratio']:>7.4f} {row['attention_sampling_peak_mib']:>7.0f} {row['cnn_peak_mib']:>8.0f} "
            f"{row['attention_sampling_extra_mib']:>7.1f} {row['cnn_extra_mib']:>8.1f} "
            f"{row['extra_memory_ratio']:>7.4f}",
            flush=True,
        )

    by_size = {r["canvas"]: r for r in rows}
    targets = {}
    if 4096 in by_size and 512 in by_size:
        big, small = by_size[4096], by_size[512]
        targets = {
            "time_ratio_at_4096": big["time_ratio"],
            "time_ratio_at_4096_met (<= 0.05)": big["time_ratio"] <= 0.05,
            "extra_memory_ratio_at_4096": big["extra_memory_ratio"],
            "extra_memory_ratio_at_4096_met (<= 0.05)": big["extra_memory_ratio"] <= 0.05,
            "peak_memory_ratio_at_4096": big["peak_memory_ratio"],
            "peak_memory_ratio_at_4096_met (<= 0.05)": big["peak_memory_ratio"] <= 0.05,
            "as_time_4096_over_512": big["attention_sampling_seconds"] / small["attention_sampling_seconds"],
            "as_time_4096_over_512_met (<= 1.5)": big["attention_sampling_seconds"]
            / small["attention_sampling_seconds"]
            <= 1.5,
        }
        for k, v in targets.items():
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    result = {
        "rows": rows,
        "targets": targets,
        "settings": {
            "patch_size": 32,
            "num_patches": 10,
            "low_res": args.low_res,
            "feature_channels": FEATURE_CHANNELS,
            "repeats": args.repeats,
            "batch": 1,
        },
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    plot(rows, args.output.with_suffix(".png"))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
