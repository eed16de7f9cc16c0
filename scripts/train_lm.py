#!/usr/bin/env python
"""Train a linear-attention LM and the same-size softmax LM on Hamlet for the same budget.

    python scripts/train_lm.py --quick     # seconds
    python scripts/train_lm.py             # a few minutes on 2 cores

Byte-level tokens (vocabulary 256, no tokenizer needed). The first 90% of the play trains, the
last 10% is held out. Both models see the same batches in the same order; their steps are
interleaved (A B A B ...) so a change in machine load slows both alike. Reports held-out loss,
perplexity and bits per byte, and training tokens per second, as a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_efficient import LinearLMConfig, LinearLMForCausalLM
from hf_efficient.assets import load_hamlet
from hf_efficient.benchmarking import machine_info


def build(layers: int, width: int, heads: int, feature_map: str, seq: int, seed: int = 0):
    sizes = dict(vocab_size=256, hidden_size=width, intermediate_size=int(width * 8 / 3) // 16 * 16,
                 num_hidden_layers=layers, num_attention_heads=heads, tie_word_embeddings=True)
    torch.manual_seed(seed)
    softmax = LlamaForCausalLM(LlamaConfig(**sizes, max_position_embeddings=seq, attn_implementation="sdpa"))
    torch.manual_seed(seed)
    linear = LinearLMForCausalLM(LinearLMConfig(**sizes, feature_map=feature_map))
    return {"softmax": softmax, "linear": linear}


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int, batch: int) -> float:
    """Mean next-byte loss over non-overlapping windows of ``seq`` bytes."""
    model.eval()
    n = (len(data) - 1) // seq
    windows = data[: n * seq].view(n, seq)
    total, count = 0.0, 0
    for start in range(0, n, batch):
        x = windows[start : start + batch]
        loss = model(x, labels=x, use_cache=False).loss
        total += loss.item() * x.shape[0]
        count += x.shape[0]
    model.train()
    return total / count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--feature-map", default="elu")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/train_lm.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.seq, args.layers, args.width = 15, 8, 128, 2, 64
    torch.set_num_threads(args.threads)

    data = torch.tensor(list(load_hamlet().encode("utf-8")), dtype=torch.long)
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:]
    models = build(args.layers, args.width, args.heads, args.feature_map, args.seq)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.01) for name, m in models.items()}
    schedules = {name: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                           pct_start=0.1) for name, opt in optimizers.items()}
    gen = torch.Generator().manual_seed(0)
    step_times = {name: [] for name in models}
    train_loss = {name: [] for name in models}
    for model in models.values():
        model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([train[s : s + args.seq] for s in starts.tolist()])
        for name, model in models.items():
            t0 = time.perf_counter()
            loss = model(x, labels=x, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            schedules[name].step()
            step_times[name].append(time.perf_counter() - t0)
            train_loss[name].append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  " + "  ".join(f"{n} {train_loss[n][-1]:.3f}" for n in models), flush=True)

    rows = []
    for name, model in models.items():
        loss = evaluate(model, held_out, args.seq, args.batch)
        median_step = statistics.median(step_times[name][1:] or step_times[name])
        rows.append({
            "model": name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "held_out_loss": loss,
            "held_out_perplexity": math.exp(loss),
            "bits_per_byte": loss / math.log(2),
            "final_train_loss": statistics.mean(train_loss[name][-10:]),
            "train_tokens_per_s": args.batch * args.seq / median_step,
            "train_seconds": sum(step_times[name]),
        })
    print(f"{'model':>8} {'params':>9} {'held-out loss':>14} {'perplexity':>11} {'bits/byte':>10} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['model']:>8} {r['parameters']:>9} {r['held_out_loss']:>14.3f} {r['held_out_perplexity']:>11.2f} "
              f"{r['bits_per_byte']:>10.3f} {r['train_tokens_per_s']:>9.0f}")
    record = {
        "benchmark": "train_lm",
        "quick": args.quick,
        "data": "Hamlet bytes, first 90% train / last 10% held out",
        "train_tokens_per_model": args.steps * args.batch * args.seq,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **machine_info(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
