#!/usr/bin/env python
"""Linearise the offline SmolLM2-135M and compare held-out Hamlet loss: softmax, naive elu swap, linearised.

    python scripts/linearize_smollm2.py --quick     # 2 short windows, a few transfer steps
    python scripts/linearize_smollm2.py             # 512-token windows, the issue's target

The defaults are those of the measured run: every one of the 30 layers becomes ``window-linear``
(exact softmax over the last 64 tokens, hedgehog linear attention beyond: a constant-size decoding
state), 8 training windows of 512 tokens, 25 attention-transfer steps per layer, then 128 distillation
steps of the feature maps only. Held-out loss 4.390 vs softmax 3.967 and naive elu swap 8.355:
90.4% of the gap closed (target 90%, loss <= 4.406); on the tokens after the first 64 of each window,
where the window no longer covers the whole context, 89.1%. 4,096 training tokens, 724 CPU s.
``--kind linear --keep-softmax-first 2 --keep-softmax-last 2 --train-windows 4 --finetune-steps 24``
(fully linear layers, 4 kept softmax) reached 4.851 (80%).

Hamlet is tokenised with SmolLM2's tokenizer and cut into windows of ``--seq`` tokens. The last
``--eval-windows`` windows are held out; training (attention transfer, optional fine-tune) uses
the first ``--train-windows``. Reports the mean next-token loss and perplexity of each model on the
held-out windows, the token budget and the CPU time, as a table and JSON. The linearised model is
also checked to decode with ``LinearAttentionCache`` exactly as without a cache.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_efficient import LinearAttentionCache
from hf_efficient.assets import load_hamlet, smollm2_path
from hf_efficient.benchmarking import machine_info
from hf_efficient.integrations import patch_model, unpatch_model
from hf_efficient.training.linearize import FINETUNE_LOSSES, FINETUNE_PARAMS, KINDS, LinearizeConfig, linearize


@torch.no_grad()
def held_out_loss(model, windows: list[torch.Tensor], skip: int = 0) -> tuple[float, float]:
    """Mean next-token loss over all positions, and over the positions after the first ``skip``."""
    full, late = [], []
    for w in windows:
        logits = model(w[None], use_cache=False).logits[0, :-1].float()
        per_token = torch.nn.functional.cross_entropy(logits, w[1:], reduction="none")
        full.append(per_token.mean().item())
        late.append(per_token[skip:].mean().item())
    return sum(full) / len(full), sum(late) / len(late)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--train-windows", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--transfer-steps", type=int, default=25)
    parser.add_argument("--transfer-lr", type=float, default=1e-2)
    parser.add_argument("--finetune-steps", type=int, default=128)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--finetune-params", choices=FINETUNE_PARAMS, default="feature_maps")
    parser.add_argument("--finetune-loss", choices=FINETUNE_LOSSES, default="distill")
    parser.add_argument("--keep-softmax-first", type=int, default=0,
                        help="first layers left softmax (the model is then a hybrid)")
    parser.add_argument("--keep-softmax-last", type=int, default=0)
    parser.add_argument("--kind", choices=KINDS, default="window-linear",
                        help="linear, or window-linear (softmax over the last --window tokens, linear beyond)")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/linearize_smollm2.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seq, args.train_windows, args.eval_windows, args.transfer_steps = 64, 2, 1, 3
        args.finetune_steps = min(args.finetune_steps, 2)
        args.window = min(args.window, 16)
    if args.kind == "window-linear" and not 0 < args.window < args.seq - 1:
        parser.error(f"--window must be between 1 and --seq - 2 ({args.seq - 2}), got {args.window}")
    torch.set_num_threads(args.threads)

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(tokenizer(load_hamlet())["input_ids"], dtype=torch.long)
    count = len(ids) // args.seq
    windows = list(ids[: count * args.seq].view(count, args.seq))
    if args.train_windows + args.eval_windows > count:
        raise ValueError(f"Hamlet has {count} windows of {args.seq} tokens; asked for "
                         f"{args.train_windows} + {args.eval_windows}")
    train, held_out = windows[: args.train_windows], windows[-args.eval_windows :]

    rows = []
    t0 = time.process_time()
    # Window-linear is exact softmax on the first `window` positions: also score only the later ones.
    skip = args.window if args.kind == "window-linear" else 0

    def scored(name: str, **extra) -> dict:
        loss, late = held_out_loss(model, held_out, skip)
        return {"model": name, "loss": loss, "loss_after_window": late, **extra}

    rows.append(scored("softmax (original)"))
    patch_model(model, "linear", feature_map="elu")
    rows.append(scored("naive swap to elu linear"))
    unpatch_model(model)
    eval_seconds = time.process_time() - t0

    config = LinearizeConfig(kind=args.kind, window=args.window,
                             transfer_steps=args.transfer_steps, transfer_lr=args.transfer_lr,
                             finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
                             finetune_params=args.finetune_params, finetune_loss=args.finetune_loss,
                             keep_softmax_first=args.keep_softmax_first, keep_softmax_last=args.keep_softmax_last)
    linearize(model, train, config)
    linearize_seconds = config.log[-1]["cpu_seconds"]
    layers = model.config.num_hidden_layers
    softmax_layers = min(layers, args.keep_softmax_first + args.keep_softmax_last)
    kind = "linear" if args.kind == "linear" else f"window-linear w={args.window}"
    rows.append(scored(f"linearised ({kind}, hedgehog transfer" + (" + fine-tune" if args.finetune_steps else "")
                       + (f", {softmax_layers}/{layers} layers softmax" if softmax_layers else "") + ")",
                       softmax_layers=softmax_layers, layers=layers))
    for row in rows:
        row["perplexity"] = math.exp(row["loss"])

    prompt = held_out[0][None, :32]
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, cache=LinearAttentionCache.from_model(model))
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)

    gap = rows[1]["loss"] - rows[0]["loss"]
    closed = (rows[1]["loss"] - rows[2]["loss"]) / gap if gap > 0 else float("nan")
    late_gap = rows[1]["loss_after_window"] - rows[0]["loss_after_window"]
    late_closed = (rows[1]["loss_after_window"] - rows[2]["loss_after_window"]) / late_gap if late_gap > 0 else None
    print(f"{'model':>72} {'held-out loss':>14} {'perplexity':>11} {f'loss, tokens > {skip}':>18}")
    for row in rows:
        print(f"{row['model']:>72} {row['loss']:>14.3f} {row['perplexity']:>11.1f} {row['loss_after_window']:>18.3f}")
    print(f"gap closed: {100 * closed:.1f}%  (target: loss <= softmax + 10% of the gap, "
          f"i.e. <= {rows[0]['loss'] + 0.1 * gap:.3f})")
    print(f"training tokens: {args.train_windows * args.seq} (transfer steps/layer {args.transfer_steps}, "
          f"fine-tune steps {args.finetune_steps} on {args.finetune_params} by {args.finetune_loss}); "
          f"linearise CPU time {linearize_seconds:.0f} s; layers kept softmax: {softmax_layers} of {layers}")
    if skip:
        print(f"gap closed on the tokens after the first {skip} (where the window is not the whole context): "
              f"{100 * late_closed:.1f}%")
    print(f"cached decoding equals uncached: {torch.equal(cached, uncached)}")
    record = {
        "benchmark": "linearize_smollm2",
        "quick": args.quick,
        "model": "SmolLM2-135M-Instruct (GGUF 4-bit, dequantised to float32)",
        "windows": {"seq": args.seq, "train": args.train_windows, "held_out": args.eval_windows,
                    "held_out_are_last_windows_of_the_play": True},
        "train_tokens": args.train_windows * args.seq,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "gap_closed": closed,
        "gap_closed_after_window": late_closed,
        "loss_after_window_skips_first_tokens": skip,
        "target_loss": rows[0]["loss"] + 0.1 * gap,
        "target_reached": rows[2]["loss"] <= rows[0]["loss"] + 0.1 * gap,
        "linearize_cpu_seconds": linearize_seconds,
        "evaluation_cpu_seconds": eval_seconds,
        "softmax_layers": softmax_layers,
        "layers": layers,
        "phase_cpu_seconds": {k: e[k] for e in config.log for k in e if k.endswith("cpu_seconds")},
        "transfer_log": [e for e in config.log if "layer" in e],
        "finetune_log": [e for e in config.log if "finetune_step" in e],
        "cached_equals_uncached": torch.equal(cached, uncached),
        **machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
