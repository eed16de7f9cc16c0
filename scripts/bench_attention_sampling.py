"""Per-image cost of attention sampling vs a CNN over the full-resolution image, canvas 512 ... 4096.

    python scripts/bench_attention_sampling.py            # full: 512, 1024, 2048, 4096
    python scripts/bench_attention_sampling.py --quick    # 512, 1024

Both methods run with the defaults a user gets: ``AttentionSamplingImageProcessor()`` and
``AttentionSamplingConfig(num_channels=1, num_labels=10)`` on a uint8 image; the CNN is that
config's own feature network applied to the whole image (both through ``run_cnn``: channels-last on the
CPU). Time: forward + backward of one image
(batch 1), methods interleaved in one process (A B A B ...) after a warm-up, median of
``--repeats``; and the total with each method's preparation (the processor for attention sampling,
the normalised float copy of the image for the CNN). A third method, multi-scale attention sampling, draws
``--regions`` regions of ``--region-size`` pixels from the same low-resolution view and the patches
inside them (the same total number of patches).

Memory, in a fresh subprocess per method and canvas that builds the model, loads the image, then
prepares the inputs and runs one forward + backward:
- peak: the process's peak resident memory (``VmHWM``), interpreter and torch included (~470 MiB);
- compute: the peak resident memory during preparation + forward + backward minus the resident
  memory of the same process just before it (model and uint8 image loaded): what the computation
  itself needs.
  The peak is reset before the step by writing ``5`` to ``/proc/self/clear_refs`` (Linux). This
  first step also pays one-off costs (library code paged in, allocator and thread set-up);
- compute (warm): the same for a second forward + backward, after the first one's freed memory is
  handed back to the system (``malloc_trim``), so that it counts the step's working memory only.
Attention sampling reads a fixed-size low-resolution view (128 x 128 by default, ``--low-res`` for
another), so its cost does not grow with the image. Writes ``results/bench_attention_sampling.json``
and a log-log PNG beside it.

    python scripts/bench_attention_sampling.py --pipeline           # 512, 4096, 8192 RGB, defaults
    python scripts/bench_attention_sampling.py --pipeline --quick   # 512, 2048

``--pipeline`` measures the path a user gets with the defaults (``AttentionSamplingImageProcessor()``,
``AttentionSamplingConfig(num_channels=3)``) on a uint8 RGB ``(H, W, 3)`` array: the processor's CPU
time and the model step (forward + backward, batch 1), sizes interleaved, one thread, median of
``--repeats``; and, in a fresh subprocess per size, the peak resident memory beyond the loaded image
(``VmHWM`` during processor + step minus ``VmRSS`` once the image is loaded, the model built and the
code warmed on a small image), compared with the image's own uint8 size. ``--tiff-side 32768`` adds
one run on a pyramidal RGB TIFF of that side written to a temporary folder (tifffile): zlib-compressed
256 x 256 tiles by default, or uncompressed strips with ``--tiff-kind strips``.
Writes ``results/bench_attention_sampling_pipeline.json``.

    python scripts/bench_attention_sampling.py --layouts --repeats 7   # run_cnn's layout against the default one

``--layouts`` times a forward + backward of 32 megaNIST 1500 x 1500 images with the paper's view and patches
through ``run_cnn`` and with the default layout everywhere (interleaved, CPU time), and compares the feature
network in training mode with its float64 copy on both layouts. Writes
``results/bench_attention_sampling_layouts.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hf_efficient.benchmarking import cpu_model
from hf_efficient.vision import (
    AttentionSamplingConfig,
    AttentionSamplingForImageClassification,
    AttentionSamplingImageProcessor,
)
from hf_efficient.vision.attention_sampling import build_feature_cnn, modeling_attention_sampling, run_cnn

METHODS = ("attention_sampling", "multiscale", "cnn")
DEFINITIONS = {
    "seconds": "median wall time of one forward + backward of one image (batch 1), methods interleaved",
    "peak_mib": "peak resident memory of a fresh process that loads the model and image and runs one "
    "forward + backward (interpreter and torch included)",
    "compute_mib": "peak resident memory during prepare + forward + backward minus the resident memory of the "
    "same process just before it, with the model and the uint8 input image already loaded",
    "warm_compute_mib": "the same for a second forward + backward, after the first one's freed memory is "
    "returned to the system with malloc_trim (excludes one-off costs such as library code paged in)",
    "total_seconds": "median wall time of prepare + forward + backward: the processor (attention sampling) or "
    "the uint8 -> normalised float image (CNN), then the step",
    "time_ratio": "attention sampling seconds / CNN seconds",
    "total_time_ratio": "attention sampling total_seconds / CNN total_seconds",
    "peak_memory_ratio": "attention sampling peak_mib / CNN peak_mib",
    "compute_memory_ratio": "attention sampling compute_mib / CNN compute_mib",
    "warm_compute_memory_ratio": "attention sampling warm_compute_mib / CNN warm_compute_mib",
}
REGIONS, REGION_SIZE, REGION_DOWNSAMPLE = 2, 256, 8


def build(method: str, canvas: int, low_res: int | None):
    """Model, its inputs for one ``canvas x canvas`` uint8 image, and the call that makes them.

    Attention sampling uses the defaults a user gets (``AttentionSamplingConfig(num_channels=1,
    num_labels=10)``, ``AttentionSamplingImageProcessor()``, unless ``low_res`` is given); the CNN is
    that config's own feature network over the whole image, whose ``prepare`` makes the normalised
    float image a CNN needs (as the processor makes the low-resolution view for attention sampling).
    """
    torch.manual_seed(0)
    image = torch.randint(0, 256, (canvas, canvas), dtype=torch.uint8)
    labels = torch.tensor([3])
    defaults = AttentionSamplingConfig(num_channels=1, num_labels=10)
    if method in ("attention_sampling", "multiscale"):
        nested = {}
        if method == "multiscale":  # the same 10 patches: 5 in each of 2 regions
            nested = dict(region_size=REGION_SIZE, num_regions=REGIONS, region_downsample=REGION_DOWNSAMPLE,
                          num_patches=defaults.num_patches // REGIONS)
        config = AttentionSamplingConfig(num_channels=1, num_labels=10, **nested)
        model = AttentionSamplingForImageClassification(config)
        processor = (AttentionSamplingImageProcessor() if low_res is None
                     else AttentionSamplingImageProcessor(low_res_size={"height": low_res, "width": low_res}))

        def prepare():
            return dict(processor(image), labels=labels)

        def step(inputs):
            return model(**inputs).loss

    elif method == "cnn":
        model = nn.Sequential(build_feature_cnn(1, defaults.feature_channels),
                              nn.Linear(defaults.feature_channels[-1], 10))

        def prepare():
            return {"pixel_values": ((image / 255 - 0.5) / 0.5)[None, None], "labels": labels}

        def step(inputs):
            # through run_cnn, as the model runs the same network: channels-last on the CPU for both methods
            features = run_cnn(model[0], inputs["pixel_values"])
            return nn.functional.cross_entropy(model[1](features), inputs["labels"])

    else:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}")
    model.train()
    return model, prepare, step


def fwd_bwd(model, step, inputs) -> None:
    model.zero_grad(set_to_none=True)
    step(inputs).backward()


def child(method: str, canvas: int, low_res: int | None) -> None:
    """Run in a fresh process: load, then one forward + backward; print the memory measures in MiB."""
    torch.set_num_threads(1)
    model, prepare, step = build(method, canvas, low_res)
    peak_before = peak_rss_kib()
    loaded = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    inputs = prepare()  # counted: the processor (attention sampling) or the float image (CNN)
    fwd_bwd(model, step, inputs)
    peak_step = peak_rss_kib()
    del inputs
    _release_freed_memory()
    before_warm = _status_kib("VmRSS")
    _reset_peak_rss()
    fwd_bwd(model, step, prepare())
    peak_warm = peak_rss_kib()
    known = reset and loaded is not None  # without a reset the step's own peak is unknown
    print(
        json.dumps(
            {
                "peak_mib": max(peak_before, peak_step) / 1024,
                "loaded_mib": loaded / 1024 if loaded is not None else None,
                "compute_mib": (peak_step - loaded) / 1024 if known else None,
                "warm_compute_mib": (peak_warm - before_warm) / 1024 if known and before_warm is not None else None,
            }
        )
    )


def _release_freed_memory() -> None:
    """Return memory freed by the first step to the system, so the second step must touch its own pages."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the warm measure may then read low
        pass


def _status_kib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident size (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_kib() -> float:
    """Peak resident memory of this process in KiB.

    ``VmHWM`` belongs to this process's own address space; ``getrusage``'s ``ru_maxrss`` (the
    fallback) can carry over the parent's peak across fork + exec on Linux, which would hide small
    children behind the parent benchmark's footprint.
    """
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def measure_memory(method: str, canvas: int, low_res: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(canvas)] + ([] if low_res is None else
                                                                        ["--low-res", str(low_res)])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_time(canvas: int, low_res: int | None, repeats: int) -> dict:
    built = {m: build(m, canvas, low_res) for m in METHODS}
    for model, prepare, step in built.values():  # warm-up
        fwd_bwd(model, step, prepare())
    times: dict[str, list[float]] = {m: [] for m in built}
    totals: dict[str, list[float]] = {m: [] for m in built}
    for _ in range(repeats):
        for m, (model, prepare, step) in built.items():  # interleaved A B A B ...
            t0 = time.perf_counter()
            inputs = prepare()
            t1 = time.perf_counter()
            fwd_bwd(model, step, inputs)
            t2 = time.perf_counter()
            times[m].append(t2 - t1)
            totals[m].append(t2 - t0)
            del inputs
    result = {f"{m}_seconds": statistics.median(v) for m, v in times.items()}
    result.update({f"{m}_seconds_min_max": [min(v), max(v)] for m, v in times.items()})
    result.update({f"{m}_total_seconds": statistics.median(v) for m, v in totals.items()})
    result["processor_seconds"] = statistics.median(
        [t - s for t, s in zip(totals["attention_sampling"], times["attention_sampling"], strict=True)])
    return result


LABELS = {"attention_sampling": "attention sampling", "multiscale": "multi-scale sampling", "cnn": "CNN, full image"}
MARKERS = {"attention_sampling": "o", "multiscale": "^", "cnn": "s"}
COLOURS = {"attention_sampling": "tab:blue", "multiscale": "tab:orange", "cnn": "tab:green"}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["canvas"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for m in METHODS:
        style = dict(marker=MARKERS[m], color=COLOURS[m])
        ax1.loglog(sizes, [r[f"{m}_seconds"] for r in rows], "-", label=LABELS[m], **style)
        ax2.loglog(sizes, [r[f"{m}_peak_mib"] for r in rows], "-", label=f"{LABELS[m]}, peak", **style)
        for key, line, name in (("compute_mib", "--", "compute"), ("warm_compute_mib", ":", "compute, warm")):
            values = [r[f"{m}_{key}"] for r in rows]
            if all(v is not None for v in values):  # floor at 0.1 MiB so the log axis can show it
                ax2.loglog(sizes, [max(v, 0.1) for v in values], line, label=f"{LABELS[m]}, {name}", **style)
    ax1.set_xlabel("canvas side (pixels)")
    ax1.set_ylabel("forward + backward per image (s)")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("canvas side (pixels)")
    ax2.set_ylabel("resident memory (MiB)")
    ax2.set_title("peak: whole process; compute: step only", fontsize=8)
    ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: the lines cross
    for ax in (ax1, ax2):
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return a / max(b, 1e-9)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


# --- the default pipeline at megapixel sizes: processor CPU, model step, memory beyond the image ---

def _pipeline_parts():
    config = AttentionSamplingConfig(num_channels=3)
    model = AttentionSamplingForImageClassification(config).train()
    processor = AttentionSamplingImageProcessor()
    labels = torch.tensor([3])

    def step(inputs) -> None:
        model.zero_grad(set_to_none=True)
        model(**inputs, labels=labels).loss.backward()

    return model, processor, step


def _rgb(side: int):
    import numpy as np

    return np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)


def pipeline_child(side: int) -> None:
    """Fresh process: build, warm up on a small image, load the image, then processor + one step."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    _, processor, step = _pipeline_parts()
    step(processor(_rgb(256)))  # pages in the code paths, so the measure below is the image's cost
    image = _rgb(side)
    _release_freed_memory()
    loaded = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    step(processor(image))
    peak = peak_rss_kib()
    growth = (peak - loaded) / 1024 if reset and loaded is not None else None
    print(json.dumps({"beyond_image_mib": growth, "image_mib": image.nbytes / 2**20, "peak_mib": peak / 1024}))


def write_pyramidal_tiff(path: Path, side: int, kind: str = "tiled", smallest: int = 256) -> None:
    """An RGB TIFF of ``side x side`` with halving levels down to ``smallest``.

    ``kind="tiled"``: 256 x 256 tiles, zlib-compressed (as whole-slide images are stored), read tile
    by tile; ``"strips"``: uncompressed strips of 64 rows, memory-mapped. Level 0 is written tile by
    tile or band by band, so writing it never holds the image in memory.
    """
    import numpy as np
    import tifffile

    rng = np.random.default_rng(side)
    levels = max(0, (side // smallest).bit_length() - 1)
    tile = 256

    def tiles():
        for _ in range((side // tile) ** 2):
            yield rng.integers(0, 256, (tile, tile, 3), dtype=np.uint8)

    def bands():
        for row in range(0, side, 1024):
            yield rng.integers(0, 256, (min(1024, side - row), side, 3), dtype=np.uint8)

    layout = dict(tile=(tile, tile), compression="zlib", compressionargs={"level": 1}) if kind == "tiled" else {}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        if kind == "tiled":
            tif.write(tiles(), shape=(side, side, 3), dtype=np.uint8, photometric="rgb", subifds=levels, **layout)
        else:
            tif.write(bands(), shape=(side, side, 3), dtype=np.uint8, photometric="rgb", subifds=levels,
                      rowsperstrip=64)
        for k in range(1, levels + 1):
            level = side >> k
            tif.write(rng.integers(0, 256, (level, level, 3), dtype=np.uint8), photometric="rgb", subfiletype=1,
                      **(layout if level >= tile else {}))


def tiff_child(path: str, repeats: int = 5) -> None:
    """Fresh process: processor on the TIFF path + one step, memory beyond the start; then the time of
    processor + step on the TIFF against a 4096 x 4096 in-memory RGB image, interleaved, median of ``repeats``.

    Every TIFF call starts from the path (a new reader: the file is opened and its tiles decoded anew).
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    _, processor, step = _pipeline_parts()
    step(processor(_rgb(256)))
    _release_freed_memory()
    loaded = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    t0 = time.process_time()
    inputs = processor(path)
    cpu = time.process_time() - t0
    t0 = time.perf_counter()
    step(inputs)
    wall = time.perf_counter() - t0
    growth = (peak_rss_kib() - loaded) / 1024 if reset and loaded is not None else None
    del inputs
    image = _rgb(4096)
    step(processor(image))
    times: dict[str, list[float]] = {"tiff": [], "memory_4096": []}
    cpus: dict[str, list[float]] = {"tiff": [], "memory_4096": []}
    for _ in range(repeats):
        for name, source in (("tiff", path), ("memory_4096", image)):  # interleaved
            t0, c0 = time.perf_counter(), time.process_time()
            step(processor(source))
            times[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
    tiff_s, memory_s = statistics.median(times["tiff"]), statistics.median(times["memory_4096"])
    tiff_cpu, memory_cpu = statistics.median(cpus["tiff"]), statistics.median(cpus["memory_4096"])
    print(json.dumps({"beyond_start_mib": growth, "processor_cpu_seconds": cpu, "step_seconds": wall,
                      "total_seconds": tiff_s, "total_seconds_min_max": [min(times["tiff"]), max(times["tiff"])],
                      "memory_4096_total_seconds": memory_s, "over_memory_4096": tiff_s / memory_s,
                      "total_cpu_seconds": tiff_cpu, "memory_4096_total_cpu_seconds": memory_cpu,
                      "cpu_over_memory_4096": tiff_cpu / memory_cpu}))


def run_tiff(side: int, kind: str, path: Path | None = None) -> dict:
    """Processor + step on a pyramidal TIFF of ``side`` on disk (written to a temporary folder, then
    deleted), or on the existing file ``path``."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        if path is None:
            path = Path(folder) / f"rgb_{side}.tif"
            write_pyramidal_tiff(path, side, kind)
        cmd = [sys.executable, __file__, "--tiff-child", str(path)]
        row = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        row.update(side=side, kind=kind, file_mib=path.stat().st_size / 2**20, path=str(path))
    layout = "zlib tiles" if kind == "tiled" else "uncompressed strips"
    print(f"TIFF {side}x{side} RGB on disk ({row['file_mib']:.0f} MiB, {layout}, pyramid): processor CPU "
          f"{row['processor_cpu_seconds']:.3f} s, step {row['step_seconds']:.4f} s, peak memory beyond the start "
          f"{_fmt(row['beyond_start_mib'], '.1f')} MiB (first run); processor + step {row['total_seconds']:.3f} s "
          f"= {row['over_memory_4096']:.2f}x a 4096x4096 in-memory image ({row['memory_4096_total_seconds']:.3f} s; "
          f"interleaved, median); in CPU time {row['total_cpu_seconds']:.3f} s = {row['cpu_over_memory_4096']:.2f}x "
          f"({row['memory_4096_total_cpu_seconds']:.3f} s)")
    return row


def run_pipeline(sizes: list[int], repeats: int, output: Path, tiff_side: int | None = None,
                 tiff_kind: str = "tiled", tiff_file: Path | None = None) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    _, processor, step = _pipeline_parts()
    images = {side: _rgb(side) for side in sizes}
    for side in sizes:  # warm-up
        step(processor(images[side]))
    cpu: dict[int, list[float]] = {side: [] for side in sizes}
    wall: dict[int, list[float]] = {side: [] for side in sizes}
    for _ in range(repeats):
        for side in sizes:  # interleaved: 512, 4096, 8192, 512, ...
            t0 = time.process_time()
            inputs = processor(images[side])
            cpu[side].append(time.process_time() - t0)
            t0 = time.perf_counter()
            step(inputs)
            wall[side].append(time.perf_counter() - t0)
            del inputs
    del images
    gc.collect()
    rows = []
    print(f"{'side':>6} {'proc CPU s':>10} {'step s':>8} {'step x':>7} {'image MiB':>9} {'beyond MiB':>10} "
          f"{'x image':>7}")
    base = statistics.median(wall[sizes[0]])
    for side in sizes:
        cmd = [sys.executable, __file__, "--pipeline-child", str(side)]
        memory = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        row = {
            "side": side,
            "processor_cpu_seconds": statistics.median(cpu[side]),
            "processor_cpu_seconds_min_max": [min(cpu[side]), max(cpu[side])],
            "step_seconds": statistics.median(wall[side]),
            "step_seconds_min_max": [min(wall[side]), max(wall[side])],
            "step_over_smallest": statistics.median(wall[side]) / base,
            **memory,
            "beyond_over_image": _ratio(memory["beyond_image_mib"], memory["image_mib"]),
        }
        rows.append(row)
        print(f"{side:>6} {row['processor_cpu_seconds']:>10.3f} {row['step_seconds']:>8.4f} "
              f"{row['step_over_smallest']:>7.2f} {row['image_mib']:>9.1f} {_fmt(row['beyond_image_mib'], '>10.1f')} "
              f"{_fmt(row['beyond_over_image'], '>7.2f')}", flush=True)
    tiff = run_tiff(tiff_side, tiff_kind, tiff_file) if tiff_side else None
    by_side = {r["side"]: r for r in rows}
    targets = {}
    if 512 in by_side and 8192 in by_side:
        big = by_side[8192]
        targets = {
            "step_8192_over_512": big["step_seconds"] / by_side[512]["step_seconds"],
            "step_8192_over_512_met (<= 1.5)": big["step_seconds"] / by_side[512]["step_seconds"] <= 1.5,
            "processor_cpu_8192": big["processor_cpu_seconds"],
            "processor_cpu_8192_met (<= 0.5 s)": big["processor_cpu_seconds"] <= 0.5,
            "beyond_image_over_image_8192": big["beyond_over_image"],
            "beyond_image_over_image_8192_met (<= 1.5)": big["beyond_over_image"] is not None
            and big["beyond_over_image"] <= 1.5,
        }
    if tiff is not None:
        targets["tiff_beyond_start_mib"] = tiff["beyond_start_mib"]
        targets["tiff_beyond_start_met (<= 400 MB)"] = tiff["beyond_start_mib"] is not None and (
            tiff["beyond_start_mib"] * 2**20 <= 400e6)
        targets["tiff_over_memory_4096"] = tiff["over_memory_4096"]
        targets["tiff_over_memory_4096_met (<= 2)"] = tiff["over_memory_4096"] <= 2
        targets["tiff_cpu_over_memory_4096"] = tiff["cpu_over_memory_4096"]
        targets["tiff_cpu_over_memory_4096_met (<= 2)"] = tiff["cpu_over_memory_4096"] <= 2
    for k, v in targets.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    result = {
        "rows": rows,
        "tiff": tiff,
        "targets": targets,
        "definitions": {
            "tiff": "a fresh process on a pyramidal RGB TIFF on disk: processor CPU, step and peak resident memory "
            "beyond the process before the call (memory-mapped pages touched included) of the first run; then "
            "total_seconds, the median wall time of processor + step from the path, interleaved with the same on a "
            "4096x4096 in-memory RGB image (memory_4096_total_seconds), and their ratio over_memory_4096; the same in "
            "CPU time (process_time: total_cpu_seconds, cpu_over_memory_4096)",
            "processor_cpu_seconds": "median CPU time (process_time) of AttentionSamplingImageProcessor() on one "
            "uint8 (side, side, 3) array, sizes interleaved",
            "step_seconds": "median wall time of one forward + backward (batch 1) of "
            "AttentionSamplingConfig(num_channels=3) defaults, sizes interleaved",
            "beyond_image_mib": "fresh process: peak resident memory during processor + step minus the resident "
            "memory with the image loaded, the model built and the code warmed on a 256x256 image",
            "image_mib": "the uint8 image's own size",
        },
        "settings": {"repeats": repeats, "sizes": sizes, "processor": "defaults", "model": "defaults, 3 channels"},
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"wrote {output}")


# --- --layouts: run_cnn's channels-last layout against the default one, on the paper's megaNIST batch ---
def run_layouts(canvas: int, batch: int, attention_channels: list[int], feature_channels: list[int], repeats: int,
                output: Path) -> dict:
    """Forward + backward of a batch of megaNIST images with the paper's view and patches (scale 0.12, 10
    patches of 50x50) and the networks of ``train_attention_sampling.py --paper``: through ``run_cnn``
    (channels-last where it applies) and with every network called on its input as it comes, interleaved,
    median of ``repeats`` (CPU time, one thread). Also the precision of the feature network over sparse
    patches against its float64 copy, in training mode (batch statistics), on both layouts: why ``run_cnn``
    leaves batch norm in training mode in the default layout."""
    from hf_efficient.benchmarking import interleaved_times, timer
    from hf_efficient.vision import make_megamnist

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = make_megamnist(batch, canvas, "train", seed=0)
    processor = AttentionSamplingImageProcessor(low_res_scale=0.12)
    inputs = dict(processor([np.asarray(r["image"]) for r in rows]), labels=torch.tensor([r["label"] for r in rows]))
    model = AttentionSamplingForImageClassification(AttentionSamplingConfig(
        num_channels=1, patch_size=50, num_patches=10, attention_channels=attention_channels,
        feature_channels=feature_channels, entropy_regularizer=0.01, num_labels=10))
    model.train()
    fast = modeling_attention_sampling.run_cnn

    def step(layout_fn):
        def run():
            modeling_attention_sampling.run_cnn = layout_fn
            try:
                model.zero_grad(set_to_none=True)
                model(**inputs).loss.backward()
            finally:
                modeling_attention_sampling.run_cnn = fast
        return run

    timers = {"run_cnn": timer(step(fast), clock=time.process_time),
              "default": timer(step(lambda net, x: net(x)), clock=time.process_time)}
    interleaved_times(timers, 1)
    times = interleaved_times(timers, repeats)
    medians = {k: statistics.median(v) for k, v in times.items()}

    net = build_feature_cnn(1, [16, 32, 32]).train()
    net64 = build_feature_cnn(1, [16, 32, 32])
    net64.load_state_dict(net.state_dict())
    net64 = net64.double().train()
    patches = torch.rand(128, 1, 50, 50) * (torch.rand(128, 1, 50, 50) < 0.1)  # mostly zero, as megaNIST's
    with torch.no_grad():
        want = net64(patches.double())
        errors = {name: float((net(x).double() - want).abs().max() / want.abs().max()) for name, x in
                  (("default", patches), ("channels_last", patches.to(memory_format=torch.channels_last)))}
    result = {
        "canvas": canvas, "batch": batch, "attention_channels": attention_channels,
        "feature_channels": feature_channels, "repeats": repeats,
        "step_seconds": medians, "step_seconds_samples": times,
        "default_over_run_cnn": medians["default"] / medians["run_cnn"],
        "batch_norm_training_relative_error_vs_float64": errors,
        "torch_version": torch.__version__, "num_threads": torch.get_num_threads(), "cpu": cpu_model(),
    }
    print(f"megaNIST {canvas}x{canvas}, batch {batch}, attention channels {attention_channels}, feature channels "
          f"{feature_channels}: forward + backward CPU s, median of {repeats}")
    print(f"  run_cnn {medians['run_cnn']:.3f}   default layout {medians['default']:.3f}   "
          f"default / run_cnn {result['default_over_run_cnn']:.2f}")
    print(f"feature network in training mode vs float64 (max relative error): default {errors['default']:.2e}, "
          f"channels-last {errors['channels_last']:.2e}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"wrote {output}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="canvas 512 and 1024 only")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--low-res", type=int, default=None,
                        help="side of an exact low-resolution view (default: the processor's own default)")
    parser.add_argument("--output", type=Path, default=Path("results/bench_attention_sampling.json"))
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "CANVAS"), help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", action="store_true",
                        help="the default processor + model on RGB images of 512, 4096, 8192 (see above)")
    parser.add_argument("--pipeline-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tiff-side", type=int, default=None,
                        help="with --pipeline: also a pyramidal TIFF of this side on disk (needs tifffile)")
    parser.add_argument("--tiff-kind", choices=("tiled", "strips"), default="tiled",
                        help="zlib-compressed 256x256 tiles (read tile by tile) or uncompressed strips (memory-mapped)")
    parser.add_argument("--tiff-file", type=Path, default=None,
                        help="with --tiff-side: measure this existing pyramidal TIFF instead of writing one")
    parser.add_argument("--tiff-child", help=argparse.SUPPRESS)
    parser.add_argument("--layouts", action="store_true",
                        help="run_cnn's channels-last layout against the default one on a megaNIST 1500x1500 batch "
                             "of 32 with the paper's view and patches (--quick: canvas 512, batch 4)")
    parser.add_argument("--attention-channels", type=int, nargs="+", default=[16, 16, 16],
                        help="with --layouts: the attention network's hidden channels (default: the --paper recipe's)")
    parser.add_argument("--feature-channels", type=int, nargs="+", default=[16, 32, 32],
                        help="with --layouts: the feature network's channels (default: the training script's)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.child:
        child(args.child[0], int(args.child[1]), args.low_res)
        return
    if args.tiff_child:
        tiff_child(args.tiff_child)
        return
    if args.pipeline_child:
        pipeline_child(args.pipeline_child)
        return
    if args.layouts:
        canvas, batch = (512, 4) if args.quick else (1500, 32)
        run_layouts(canvas, batch, args.attention_channels, args.feature_channels, args.repeats,
                    args.output.with_name("bench_attention_sampling_layouts.json"))
        return
    if args.pipeline:
        sizes = [512, 2048] if args.quick else [512, 4096, 8192]
        output = args.output.with_name("bench_attention_sampling_pipeline.json")
        run_pipeline(sizes, args.repeats, output, args.tiff_side, args.tiff_kind, args.tiff_file)
        return
    if args.quick:
        args.sizes = [512, 1024]
    torch.set_num_threads(1)

    print("AS: attention sampling; MS: multi-scale attention sampling; CNN: CNN over the full image")
    for key, short in (("peak_mib", "peak"), ("compute_mib", "comp"), ("warm_compute_mib", "warm")):
        print(f"{short}: {DEFINITIONS[key]}")
    header = (
        f"{'canvas':>7} {'AS s':>7} {'MS s':>7} {'CNN s':>8} {'time x':>7} {'total x':>7} | {'AS peak':>7} "
        f"{'MS peak':>7} "
        f"{'CNN peak':>8} {'peak x':>6} | {'AS comp':>7} {'MS comp':>7} {'CNN comp':>8} {'comp x':>7} | "
        f"{'AS warm':>7} {'MS warm':>7} {'CNN warm':>8} {'warm x':>7}"
    )
    print(header)
    rows = []
    for canvas in args.sizes:
        row = {"canvas": canvas, **measure_time(canvas, args.low_res, args.repeats)}
        for m in METHODS:
            memory = measure_memory(m, canvas, args.low_res)
            row[f"{m}_peak_mib"] = memory["peak_mib"]
            row[f"{m}_loaded_mib"] = memory["loaded_mib"]
            row[f"{m}_compute_mib"] = memory["compute_mib"]
            row[f"{m}_warm_compute_mib"] = memory["warm_compute_mib"]
        row["time_ratio"] = row["attention_sampling_seconds"] / row["cnn_seconds"]
        row["total_time_ratio"] = row["attention_sampling_total_seconds"] / row["cnn_total_seconds"]
        row["peak_memory_ratio"] = row["attention_sampling_peak_mib"] / row["cnn_peak_mib"]
        row["compute_memory_ratio"] = _ratio(row["attention_sampling_compute_mib"], row["cnn_compute_mib"])
        row["warm_compute_memory_ratio"] = _ratio(
            row["attention_sampling_warm_compute_mib"], row["cnn_warm_compute_mib"]
        )
        row["multiscale_time_ratio"] = row["multiscale_seconds"] / row["cnn_seconds"]
        row["multiscale_peak_memory_ratio"] = row["multiscale_peak_mib"] / row["cnn_peak_mib"]
        row["multiscale_compute_memory_ratio"] = _ratio(row["multiscale_compute_mib"], row["cnn_compute_mib"])
        row["multiscale_warm_compute_memory_ratio"] = _ratio(
            row["multiscale_warm_compute_mib"], row["cnn_warm_compute_mib"]
        )
        rows.append(row)
        print(
            f"{canvas:>7} {row['attention_sampling_seconds']:>7.4f} {row['multiscale_seconds']:>7.4f} "
            f"{row['cnn_seconds']:>8.3f} {row['time_ratio']:>7.4f} {row['total_time_ratio']:>7.4f} | "
            f"{row['attention_sampling_peak_mib']:>7.0f} "
            f"{row['multiscale_peak_mib']:>7.0f} {row['cnn_peak_mib']:>8.0f} {row['peak_memory_ratio']:>6.3f} | "
            f"{_fmt(row['attention_sampling_compute_mib'], '>7.1f')} {_fmt(row['multiscale_compute_mib'], '>7.1f')} "
            f"{_fmt(row['cnn_compute_mib'], '>8.1f')} {_fmt(row['compute_memory_ratio'], '>7.4f')} | "
            f"{_fmt(row['attention_sampling_warm_compute_mib'], '>7.1f')} "
            f"{_fmt(row['multiscale_warm_compute_mib'], '>7.1f')} {_fmt(row['cnn_warm_compute_mib'], '>8.1f')} "
            f"{_fmt(row['warm_compute_memory_ratio'], '>7.4f')}",
            flush=True,
        )
    print("time x (step), total x (prepare + step), peak x, comp x, warm x: attention sampling (AS) over the CNN; "
          "memory in MiB")

    by_size = {r["canvas"]: r for r in rows}
    targets: dict = {}
    if 4096 in by_size and 512 in by_size:
        big, small = by_size[4096], by_size[512]
        growth = big["attention_sampling_seconds"] / small["attention_sampling_seconds"]
        compute = big["compute_memory_ratio"]
        targets = {
            "time_ratio_at_4096": big["time_ratio"],
            "time_ratio_at_4096_met (<= 0.05)": big["time_ratio"] <= 0.05,
            "total_time_ratio_at_4096": big["total_time_ratio"],
            "total_time_ratio_at_4096_met (<= 0.05)": big["total_time_ratio"] <= 0.05,
            "compute_memory_ratio_at_4096": compute,
            "compute_memory_ratio_at_4096_met (<= 0.05)": compute is not None and compute <= 0.05,
            "warm_compute_memory_ratio_at_4096": big["warm_compute_memory_ratio"],
            "warm_compute_memory_ratio_at_4096_met (<= 0.05)": big["warm_compute_memory_ratio"] is not None
            and big["warm_compute_memory_ratio"] <= 0.05,
            "peak_memory_ratio_at_4096": big["peak_memory_ratio"],
            "peak_memory_ratio_at_4096_met (<= 0.05)": big["peak_memory_ratio"] <= 0.05,
            "as_time_4096_over_512": growth,
            "as_time_4096_over_512_met (<= 1.5)": growth <= 1.5,
            "multiscale_time_ratio_at_4096": big["multiscale_time_ratio"],
            "multiscale_compute_memory_ratio_at_4096": big["multiscale_compute_memory_ratio"],
            "multiscale_time_4096_over_512": big["multiscale_seconds"] / small["multiscale_seconds"],
        }
        for k, v in targets.items():
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    result = {
        "rows": rows,
        "targets": targets,
        "definitions": DEFINITIONS,
        "settings": {
            "model": "AttentionSamplingConfig(num_channels=1, num_labels=10) defaults: "
            + json.dumps({k: getattr(AttentionSamplingConfig(), k) for k in
                          ("patch_size", "num_patches", "feature_channels", "attention_channels")}),
            "processor": "AttentionSamplingImageProcessor() defaults" if args.low_res is None
            else f"low_res_size {args.low_res}x{args.low_res}",
            "image": "uint8 (canvas, canvas)",
            "multiscale": {
                "num_regions": REGIONS,
                "patches_per_region": AttentionSamplingConfig().num_patches // REGIONS,
                "region_size": REGION_SIZE,
                "region_downsample": REGION_DOWNSAMPLE,
            },
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
