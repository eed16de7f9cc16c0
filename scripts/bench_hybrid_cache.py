#!/usr/bin/env python
"""Decoding memory of a hybrid (5 sliding : 1 full) Gemma 3 against context length.

    python scripts/bench_hybrid_cache.py --quick     # seconds: window 16, contexts 16 ... 256
    python scripts/bench_hybrid_cache.py             # window 128, contexts 128 ... 16384

Three models with the same random weights (12 layers, every 6th full attention):

* ``softmax``: the unpatched model with transformers' ``DynamicCache(config=...)`` (sliding layers
  already bounded by the window; the full layers keep every key and value);
* ``linear``: ``patch_model(model, "linear")``: full layers replaced by linear attention, sliding
  layers kept; ``LinearAttentionCache(config=...)``, which ``generate()`` builds;
* ``all window-linear``: ``patch_model(model, "linear", sliding="window-linear")``.

For each context length the prompt is prefilled through the cache in chunks (what ``generate``
does with ``prefill_chunk_size``), then ``--steps`` tokens are decoded one at a time; we record
the cache's bytes (exact tensor sizes) after the prompt and after decoding. The per-token decode
time (median and min-max over the decoded tokens, one thread, models run one after the other) is
printed as a side note, not a speed claim: memory is what this script measures. A short greedy
generation checks that each patched model decodes the same tokens with its cache as
without one. Writes ``results/hybrid_cache.json`` and a log-log plot beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig

from hf_efficient import LinearAttentionCache, patch_model
from hf_efficient.benchmarking import timer


def build(window: int, width: int, layers: int) -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=512, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4, sliding_window=window,
                              max_position_embeddings=65536, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Gemma3ForCausalLM(config).eval()


def cache_bytes(cache) -> int:
    if isinstance(cache, LinearAttentionCache):
        return cache.nbytes()
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers if layer.keys is not None)


def new_cache(model):
    return LinearAttentionCache(config=model.config) if hasattr(model.config, "hf_efficient") else \
        DynamicCache(config=model.config)


@torch.no_grad()
def prefill(model, context: int, chunk: int = 512):
    cache = new_cache(model)
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
    for start in range(0, context, chunk):
        out = model(ids[:, start:start + chunk], cache=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode(model, cache, token, steps: int) -> list[float]:
    """Seconds of each of ``steps`` greedy decoding steps continuing ``cache`` (torch.utils.benchmark Timer)."""
    def step() -> None:
        nonlocal token
        token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)

    one_step = timer(step)
    return [one_step.timeit(1).mean for _ in range(steps)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: window 16, contexts up to 256")
    parser.add_argument("--steps", type=int, default=None, help="decoded tokens per context (default 8, quick 4)")
    parser.add_argument("--out", default="results/hybrid_cache.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    window, width, layers = (16, 64, 6) if args.quick else (128, 256, 12)
    contexts = [16, 32, 64, 128, 256] if args.quick else [128, 512, 2048, 8192, 16384]
    steps = args.steps or (4 if args.quick else 8)
    if steps < 1:
        parser.error("--steps must be >= 1")

    base = build(window, width, layers)
    models = {"softmax": base,
              "linear": patch_model(build(window, width, layers), "linear"),
              "all window-linear": patch_model(build(window, width, layers), "linear", sliding="window-linear")}
    prompt = torch.randint(3, 512, (1, 2 * window), generator=torch.Generator().manual_seed(1))
    same_tokens = {}
    for name, model in models.items():
        if name != "softmax":
            cached = model.generate(prompt, max_new_tokens=window, do_sample=False)
            same_tokens[name] = bool(torch.equal(cached, model.generate(prompt, max_new_tokens=window, do_sample=False,
                                                                          use_cache=False)))
    rows = []
    for context in contexts:
        for name, model in models.items():
            cache, token = prefill(model, context)
            after_prompt = cache_bytes(cache)
            times = decode(model, cache, token, steps)
            rows.append({"model": name, "context": context, "bytes_after_prompt": after_prompt,
                         "bytes_after_decoding": cache_bytes(cache), "decode_ms_median": 1e3 * statistics.median(times),
                         "decode_ms_min": 1e3 * min(times), "decode_ms_max": 1e3 * max(times)})
    print(f"Gemma 3 text, {layers} layers (5 sliding : 1 full), width {width}, window {window}; "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print(f"{'model':>18} {'context':>8} {'cache KiB':>10} {'decode ms (min-max)':>22}")
    for r in rows:
        print(f"{r['model']:>18} {r['context']:>8} {r['bytes_after_decoding'] / 1024:>10.1f} "
              f"{r['decode_ms_median']:>8.2f} ({r['decode_ms_min']:.2f}-{r['decode_ms_max']:.2f})")
    print("same tokens as decoding without a cache:", same_tokens)
    result = {"window": window, "layers": layers, "width": width, "steps": steps, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "mode": "quick" if args.quick else "full", "same_tokens": same_tokens,
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in models:
        pts = [(r["context"], r["bytes_after_decoding"] / 1024) for r in rows if r["model"] == name]
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("cache (KiB)")
    ax.set_title(f"Gemma 3 (5 sliding : 1 full), window {window}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
