"""Per-token decode latency and cache memory against context length: softmax + DynamicCache
versus linear attention + LinearAttentionCache, on decoders of the same size.

    python scripts/bench_generate.py --quick        # seconds, CI-sized model and contexts
    python scripts/bench_generate.py                # 6 layers, 512 wide, contexts 512 ... 16384
    hf-efficient bench generate --quick             # the same, from the installed package

(a) ``LlamaForCausalLM`` (SDPA softmax attention, transformers' default ``DynamicCache``) and
(b) a ``linear-lm`` model with the same layers, width, heads, MLP and vocabulary, and (c) with
``--window W`` (default 64; 0 leaves it out) the Llama of (a) patched with ``window-linear``
attention (exact softmax over the last W tokens, linear beyond) decoding from its bounded
``LinearAttentionCache``. For each
context length the linear models run a real chunked prefill; the softmax cache is filled with
random keys/values of the right shape (a real softmax prefill at 16k costs minutes on a CPU, and
decode cost depends only on the cache's shape). Then both decode ``--steps`` tokens at a time,
interleaved over models and lengths, ``--repeats`` times after a warm-up, each timing a
``torch.utils.benchmark.Timer`` of ``--steps`` steps; we report the median per-token time (one
decoding step: one new token for each of ``--batch`` sequences) and the min-max spread. Cache
bytes are exact tensor sizes.

On a CPU, decoding one token is bound by memory traffic: every step reads all weights, and the
softmax model also reads its whole cache. So the speed-up of a constant-size state over a growing
cache is about (weight bytes + cache bytes) / weight bytes, and it grows with the batch, whose
caches add up while the weights are read once.

The weight-read floor of a step is the bytes of weights it reads (every parameter once; of an input
embedding not tied to the output, only its ``--batch`` rows) over this machine's read bandwidth: the
fastest of the streaming reads (a sum over 256 MiB of float32, on the bench's threads, with its clock,
of ordinary memory and of memory advised for huge pages, where the decoders keep their weights: a read
there is faster, so counting it keeps the floor honest) measured before the decoding timings and
interleaved with them, so the floor is never inflated by a slow moment. ``--reference`` also
times each linear model on its PyTorch path (``HF_EFFICIENT_KERNELS=reference``: no compiled decoding
kernel and no weight placement), interleaved in the same run: the
before/after of the kernels under the same load. ``--clock cpu`` counts this process's CPU time (a
shared machine's other work then costs less, though memory traffic still competes).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from hf_efficient import LinearAttentionCache, LinearLMConfig, LinearLMForCausalLM
from hf_efficient.arguments import non_negative_int, positive_int
from hf_efficient.benchmarking import interleaved_times, machine_info, read_bandwidth_gbs, timer
from hf_efficient_kernels import dispatch
from hf_efficient_kernels.memory import huge_page_empty


def build(layers: int, width: int, heads: int, intermediate: int, vocab: int):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=intermediate,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         attn_implementation="sdpa"))
    linear = LinearLMForCausalLM(LinearLMConfig(vocab_size=vocab, hidden_size=width, intermediate_size=intermediate,
                                                num_hidden_layers=layers, num_attention_heads=heads,
                                                tie_word_embeddings=False))
    return llama.eval(), linear.eval()


def softmax_cache(model: LlamaForCausalLM, context: int, batch: int = 1) -> DynamicCache:
    """A DynamicCache holding ``context`` tokens of random keys/values, ``(batch, heads, context, head_dim)``."""
    c = model.config
    cache = DynamicCache(config=c)
    head_dim = c.hidden_size // c.num_attention_heads
    for i in range(c.num_hidden_layers):
        k = torch.randn(batch, c.num_key_value_heads, context, head_dim)
        cache.update(k, torch.randn_like(k), i)
    return cache


def window_model(llama: LlamaForCausalLM, window: int) -> LlamaForCausalLM:
    """A copy of ``llama`` with every layer patched to ``window-linear`` attention."""
    import copy

    from hf_efficient import patch_model

    return patch_model(copy.deepcopy(llama), "window-linear", window=window).eval()


def linear_cache(model, context: int, batch: int = 1) -> LinearAttentionCache:
    """A real chunked prefill of ``context`` random tokens (a linear-lm or a patched decoder)."""
    cache = LinearAttentionCache.from_model(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, context))
    for start in range(0, context, 4096):  # bounded activations
        model(ids[:, start : start + 4096], cache=cache, logits_to_keep=1)
    return cache


def weight_bytes(model, batch: int = 1) -> int:
    """Bytes of weights one decoding step reads: every distinct parameter tensor once (tied weights counted
    once), except an input embedding table that no other module reads, of which a step reads only ``batch``
    rows (counting the whole table would raise the floor and flatter the decoder)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    if not tied:
        seen[embedding.data_ptr()] = min(batch, embedding.shape[0]) * embedding.shape[1] * embedding.element_size()
    return sum(seen.values())


def cache_bytes(cache) -> int:
    if isinstance(cache, LinearAttentionCache):
        return cache.nbytes()
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


@contextlib.contextmanager
def kernels(implementation: str | None):
    """``HF_EFFICIENT_KERNELS=implementation`` inside the block (None: as it is); the dispatcher reads it per call."""
    if implementation is None:
        yield
        return
    old = os.environ.get(dispatch.ENV_VAR)
    os.environ[dispatch.ENV_VAR] = implementation
    try:
        yield
    finally:
        if old is None:
            del os.environ[dispatch.ENV_VAR]
        else:
            os.environ[dispatch.ENV_VAR] = old


def decoder(model, cache, batch: int = 1, clock=time.perf_counter, implementation: str | None = None):
    """A timer of one decoding step (one new token for each of ``batch`` sequences, the greedy choice of
    the step before) continuing ``cache``: ``decoder(...).timeit(steps).mean`` is seconds per step.
    ``implementation="reference"`` times the PyTorch path (no compiled kernel), as before the kernels."""
    token = torch.zeros(batch, 1, dtype=torch.long)

    def step() -> None:
        nonlocal token
        with kernels(implementation):
            logits = model(token, cache=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)

    return timer(step, clock=clock)


def read_timer(clock, megabytes: int = 256, huge_pages: bool = False):
    """A timer of one streaming read (a sum) of ``megabytes`` of float32, and its bytes; ``huge_pages``: of memory
    advised for huge pages, as the decoding weights are (a read of ordinary 4 KiB pages is slower)."""
    n = megabytes * 2**20 // 4
    x = huge_page_empty([((n,), torch.float32)])[0].fill_(1.0) if huge_pages else torch.ones(n)
    return timer(x.sum, clock=clock), x.numel() * 4


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and contexts (seconds)")
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=None)
    parser.add_argument("--layers", type=positive_int, default=6)
    parser.add_argument("--width", type=positive_int, default=512)
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--intermediate", type=positive_int, default=1408)
    parser.add_argument("--vocab", type=positive_int, default=8192)
    parser.add_argument("--steps", type=positive_int, default=20, help="decode steps per timing")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--batch", type=positive_int, default=1, help="sequences decoded together")
    parser.add_argument("--window", type=non_negative_int, default=64,
                        help="also time window-linear with this window (0: no)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine); the read "
                             "bandwidth of the floor is measured with the same clock")
    parser.add_argument("--reference", action="store_true",
                        help="also time the linear models on their PyTorch path (HF_EFFICIENT_KERNELS=reference: "
                             "no compiled decoding kernel), interleaved with the rest")
    parser.add_argument("--out", type=Path, default=Path("results/bench_generate.json"))
    args = parser.parse_args(argv)
    if args.width % args.heads:
        parser.error(f"--width ({args.width}) must be a multiple of --heads ({args.heads})")
    if args.quick:
        args.layers, args.width, args.heads, args.intermediate, args.vocab = 2, 128, 4, 256, 1024
        args.steps, args.repeats = 4, 3
        args.contexts = args.contexts or [128, 512, 2048]
    contexts = args.contexts or [512, 1024, 2048, 4096, 8192, 16384]
    torch.set_num_threads(args.threads)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    llama, linear = build(args.layers, args.width, args.heads, args.intermediate, args.vocab)
    models = {"softmax": llama, "linear": linear}
    if args.window:
        models["window"] = window_model(llama, args.window)
    # (timed name, model name, implementation): the reference rows run the same model without the kernels
    arms = [(name, name, None) for name in models]
    if args.reference:
        arms += [(f"{name}_reference", name, "reference") for name in models if name != "softmax"]
    rows = {}
    with torch.inference_mode():
        caches = {n: {name: softmax_cache(model, n, args.batch) if name == "softmax" else
                      linear_cache(model, n, args.batch)
                      for name, model in models.items()} for n in contexts}
        # the floor's read bandwidth: the fastest streaming read seen, measured before and interleaved with the
        # decoding timings (the same load), with the same clock; the fastest read gives the lowest floor
        read, read_bytes = read_timer(clock)
        read_huge, _ = read_timer(clock, huge_pages=True)
        bandwidths = [read_bandwidth_gbs(clock=clock)]
        # interleaved over lengths and models, so load changes hit all alike; the first pass is a warm-up
        timers = {(n, arm): decoder(models[name], caches[n][name] if impl is None else copy.deepcopy(caches[n][name]),
                                    args.batch, clock, impl)
                  for n in contexts for arm, name, impl in arms}
        timers["read"], timers["read_huge"] = read, read_huge
        interleaved_times(timers, 1, args.steps)
        times = interleaved_times(timers, args.repeats, args.steps)
        round_bandwidths = [read_bytes / t / 1e9 for t in times.pop("read")]
        huge_bandwidths = [read_bytes / t / 1e9 for t in times.pop("read_huge")]
        bandwidths += round_bandwidths + huge_bandwidths
        bandwidth = max(bandwidths)
        # the same ratio with each round's own read (the faster of the two in that round): the machine's other
        # work slows a round's reads and its decoding alike, which the fastest read of the whole run does not see
        round_bandwidths = [max(a, b) for a, b in zip(round_bandwidths, huge_bandwidths)]
        # the weight-read floor of one step: every weight read once from memory at the measured bandwidth
        step_bytes = {name: weight_bytes(model, args.batch) for name, model in models.items()}
        floors = {name: 1e3 * step_bytes[name] / (bandwidth * 1e9) for name in models}
        for n in contexts:
            row = {"context": n}
            for arm, name, _ in arms:
                ts = times[n, arm]
                row[f"{arm}_ms"] = 1e3 * statistics.median(ts)
                row[f"{arm}_ms_min"], row[f"{arm}_ms_max"] = 1e3 * min(ts), 1e3 * max(ts)
                row[f"{arm}_over_floor"] = row[f"{arm}_ms"] / floors[name]
                row[f"{arm}_over_round_floor"] = statistics.median(
                    t * bw * 1e9 / step_bytes[name] for t, bw in zip(ts, round_bandwidths))
            for name in models:
                row[f"{name}_cache_bytes"] = cache_bytes(caches[n][name])
            row["speedup"] = row["softmax_ms"] / row["linear_ms"]
            if "window" in models:
                row["window_speedup"] = row["softmax_ms"] / row["window_ms"]
            rows[n] = row

    first, last = rows[contexts[0]], rows[contexts[-1]]
    summary = {
        "clock": args.clock,
        "read_bandwidth_gbs": bandwidth,
        "read_bandwidth_samples_gbs": bandwidths,
        "read_bandwidth_huge_page_samples_gbs": huge_bandwidths,
        "weight_read_floor_ms": floors,
        "linear_over_floor_max": max(r["linear_over_floor"] for r in rows.values()),
        **({"window_over_floor_max": max(r["window_over_floor"] for r in rows.values())} if "window" in models else {}),
        **{f"{arm}_over_floor_max": max(r[f"{arm}_over_floor"] for r in rows.values())
           for arm, _, impl in arms if impl is not None},
        **{f"{arm}_over_round_floor_max": max(r[f"{arm}_over_round_floor"] for r in rows.values())
           for arm, name, _ in arms if name != "softmax"},
        "speedup_at_longest": last["speedup"],
        "linear_longest_over_shortest": last["linear_ms"] / first["linear_ms"],
        "softmax_longest_over_shortest": last["softmax_ms"] / first["softmax_ms"],
        **({"window_speedup_at_longest": last["window_speedup"],
            "window_longest_over_shortest": last["window_ms"] / first["window_ms"]} if "window" in models else {}),
        "targets": {"speedup_at_16384 >= 16": None, "linear_16384_over_512 <= 1.1": None},
    }
    if contexts[0] == 512 and contexts[-1] == 16384:
        summary["targets"] = {"speedup_at_16384 >= 16": last["speedup"] >= 16,
                              "linear_16384_over_512 <= 1.1": summary["linear_longest_over_shortest"] <= 1.1}
    summary["targets"]["linear and window <= 1.5x the weight-read floor"] = (
        max(summary["linear_over_floor_max"], summary.get("window_over_floor_max", 0.0)) <= 1.5)

    window = "window" in models
    print(f"{'context':>8} {'softmax ms/tok':>15} {'linear ms/tok':>14} {'speedup':>8} "
          f"{'softmax cache MB':>17} {'linear cache MB':>16}"
          + (f" {'window ms/tok':>14} {'speedup':>8} {'window cache MB':>16}" if window else ""))
    for row in rows.values():
        print(f"{row['context']:>8} {row['softmax_ms']:>15.2f} {row['linear_ms']:>14.2f} {row['speedup']:>8.1f} "
              f"{row['softmax_cache_bytes'] / 2**20:>17.2f} {row['linear_cache_bytes'] / 2**20:>16.3f}"
              + (f" {row['window_ms']:>14.2f} {row['window_speedup']:>8.1f} "
                 f"{row['window_cache_bytes'] / 2**20:>16.3f}" if window else ""))
    print(f"weight-read floor per token at {bandwidth:.1f} GB/s: "
          + ", ".join(f"{name} {ms:.2f} ms" for name, ms in floors.items())
          + "; time over floor (largest over contexts): "
          + ", ".join(f"{arm} {max(r[f'{arm}_over_floor'] for r in rows.values()):.2f}x"
                      for arm, name, _ in arms if name != "softmax"))
    print(f"{'context':>8} " + " ".join(f"{arm + ' /floor':>20}" for arm, name, _ in arms if name != "softmax"))
    for row in rows.values():
        print(f"{row['context']:>8} " + " ".join(
            f"{row[f'{arm}_over_floor']:>9.2f} [{row[f'{arm}_ms_min'] / floors[name]:.2f}-"
            f"{row[f'{arm}_ms_max'] / floors[name]:.2f}]" for arm, name, _ in arms if name != "softmax"))
    print("over each round's own read (median of rounds): " + "; ".join(
        f"{row['context']}: " + ", ".join(f"{arm} {row[f'{arm}_over_round_floor']:.2f}"
                                          for arm, name, _ in arms if name != "softmax") for row in rows.values()))
    print(json.dumps(summary, indent=1))

    record = {
        "benchmark": "bench_generate",
        "quick": args.quick,
        "model": {"layers": args.layers, "width": args.width, "heads": args.heads,
                  "intermediate": args.intermediate, "vocab": args.vocab, "feature_map": "elu"},
        "steps": args.steps,
        "batch": args.batch,
        "repeats": args.repeats,
        "softmax_cache": "random keys/values of the real shape (DynamicCache)",
        "linear_cache": "real chunked prefill (LinearAttentionCache)",
        "window": args.window or None,
        "clock": args.clock,
        "floor": "weight bytes one step reads (input embedding: batch rows unless tied) / fastest streaming read "
                 "(sum of 256 MiB float32, of ordinary and of huge-page memory, on the decoding's threads), measured "
                 "before and interleaved with it; *_over_round_floor: the median over rounds of a round's time over "
                 "the floor at that round's own fastest read",
        **machine_info(),
        "rows": list(rows.values()),
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    _plot(list(rows.values()), args.out.with_suffix(".png"), floors.get("linear"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def _plot(rows: list[dict], path: Path, floor_ms: float | None = None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional (hf-efficient[plots])
        print("matplotlib not installed: no plot")
        return
    n = [r["context"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.6))
    curves = [("softmax", "softmax + DynamicCache"), ("linear", "linear + LinearAttentionCache"),
              ("window", "window-linear (patched Llama) + LinearAttentionCache")]
    for name, label in curves:
        if f"{name}_ms" not in rows[0]:
            continue
        ax1.errorbar(n, [r[f"{name}_ms"] for r in rows],
                     yerr=[[r[f"{name}_ms"] - r[f"{name}_ms_min"] for r in rows],
                           [r[f"{name}_ms_max"] - r[f"{name}_ms"] for r in rows]], marker="o", label=label)
        ax2.plot(n, [r[f"{name}_cache_bytes"] / 2**20 for r in rows], marker="o")
    if floor_ms is not None:  # the same weights for every model: one floor
        ax1.axhline(floor_ms, color="grey", linestyle="--", label="weight-read floor")
    for ax, title, unit in ((ax1, "decode time per token", "ms"), (ax2, "cache size", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
    fig.legend(*ax1.get_legend_handles_labels(), loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)

if __name__ == "__main__":
    raise SystemExit(main())
