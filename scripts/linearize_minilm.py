#!/usr/bin/env python
"""Linearise the offline all-MiniLM-L6-v2 encoder and measure how close it stays to the original.

    python scripts/linearize_minilm.py --quick     # 2 training windows, a few steps (seconds)
    python scripts/linearize_minilm.py             # 16 x 256 = 4,096 training tokens of Hamlet

Every one of the 6 attention layers becomes bidirectional linear attention with a learnable
``hedgehog`` feature map, fitted by attention transfer on full (non-causal) attention rows of the
unchanged model's queries and keys, then (``--finetune-steps``, default 120) fine-tuned on the feature maps only
by distillation of the original ``last_hidden_state``. The model's own weights never change.

Measured on text it did not train on, against the unpatched model: mean-pooled and token cosine of
``last_hidden_state`` on held-out Hamlet windows (windows after the training ones, far into the play)
at each ``--eval-lengths``, and on Rotten Tomatoes reviews packed into 256-token documents (another
kind of text, with padding). Baseline: the naive swap to ``elu`` linear attention with no training.
Prints a table and writes JSON (``results/linearize_minilm.json``).

Measured (2 threads on a shared, loaded 2-core machine; 4,096 training tokens), pooled cosine to the
unpatched model, held-out Hamlet at 256 / 512 tokens and packed reviews at 256:

| run | Hamlet 256 | Hamlet 512 | reviews 256 | CPU s |
|---|---|---|---|---|
| naive elu swap | 0.403 | 0.527 | 0.345 | - |
| transfer, 200 steps/layer, lr 1e-2 | 0.930 | 0.927 | 0.803 | 242 |
| transfer 300 steps lr 2e-2 + 120 hidden-state distillation steps lr 3e-3, dropout on | 0.947 | 0.936 | 0.855 | 649 |
| the same, no dropout in the distillation (the defaults) | 0.950 | 0.938 | 0.852 | 616 |

So 0.95 is reached on held-out Hamlet at 256 tokens only: not at 512, and text unlike the training
text (short reviews packed into documents) stays well below (0.85). Token cosine: 0.92 / 0.90 / 0.86.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from hf_efficient.arguments import non_negative_int, positive_int
from hf_efficient.assets import load_rotten_tomatoes, minilm_path
from hf_efficient.benchmarking import machine_info
from hf_efficient.evaluation import hamlet_windows, pack_reviews
from hf_efficient.integrations import patch_model
from hf_efficient.training.linearize import LinearizeConfig, linearize


@torch.inference_mode()
def agreement(original, model, ids: torch.Tensor, mask: torch.Tensor | None = None, batch: int = 8) -> dict:
    """Token and mean-pooled cosine of ``last_hidden_state`` to the original, over real tokens only."""
    mask = torch.ones_like(ids) if mask is None else mask
    token, pooled = [], []
    for i in range(0, len(ids), batch):
        x, m = ids[i : i + batch], mask[i : i + batch]
        a = original(input_ids=x, attention_mask=m).last_hidden_state
        b = model(input_ids=x, attention_mask=m).last_hidden_state
        real = m.bool()
        token.append(F.cosine_similarity(a, b, dim=-1)[real])
        w = m[..., None].float()
        pooled.append(F.cosine_similarity((a * w).sum(1) / w.sum(1), (b * w).sum(1) / w.sum(1), dim=-1))
    return {"token_cosine": torch.cat(token).mean().item(), "pooled_cosine": torch.cat(pooled).mean().item(),
            "pooled_cosine_min": torch.cat(pooled).min().item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 training windows, 3 steps: a smoke run")
    parser.add_argument("--length", type=positive_int, default=256, help="training window length")
    parser.add_argument("--train-windows", type=positive_int, default=16)
    parser.add_argument("--eval-lengths", type=positive_int, nargs="+", default=[256, 512])
    parser.add_argument("--eval-windows", type=positive_int, default=8, help="held-out Hamlet windows per length")
    parser.add_argument("--eval-offset-tokens", type=positive_int, default=30000,
                        help="held-out windows start this many tokens into the play (training uses the start)")
    parser.add_argument("--review-docs", type=non_negative_int, default=16,
                        help="held-out 256-token documents of packed Rotten Tomatoes reviews (0: skip)")
    parser.add_argument("--transfer-steps", type=non_negative_int, default=300)
    parser.add_argument("--transfer-lr", type=float, default=2e-2)
    parser.add_argument("--feature-dim", type=positive_int, default=None,
                        help="hedgehog features per sign (default: the head dim)")
    parser.add_argument("--finetune-steps", type=non_negative_int, default=120)
    parser.add_argument("--finetune-lr", type=float, default=3e-3)
    parser.add_argument("--finetune-params", default="feature_maps", choices=["feature_maps", "feature_maps+qk"])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/linearize_minilm.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.train_windows, args.transfer_steps, args.eval_windows = 2, 3, 2
        args.eval_lengths, args.review_docs = [256], 4
        args.finetune_steps = min(args.finetune_steps, 2)
    if args.train_windows * args.length > args.eval_offset_tokens:
        parser.error(f"--train-windows x --length ({args.train_windows * args.length} tokens) overlaps the held-out "
                     f"text from token {args.eval_offset_tokens}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = AutoModel.from_pretrained(path).eval()
    train = hamlet_windows(tokenizer, args.length, args.train_windows)
    held_out = {n: hamlet_windows(tokenizer, n, args.eval_windows, offset=args.eval_offset_tokens // n)
                for n in args.eval_lengths}
    reviews = None
    if args.review_docs:
        data = load_rotten_tomatoes().shuffle(seed=1)
        docs = pack_reviews(tokenizer, data["text"][:2000], data["label"][:2000], 256, max_docs=args.review_docs)
        reviews = (docs.input_ids[: args.review_docs], docs.attention_mask[: args.review_docs])

    def measure(name: str, model, **extra) -> dict:
        row = {"model": name, **extra}
        for n, ids in held_out.items():
            row[f"hamlet_{n}"] = agreement(original, model, ids)
        if reviews is not None:
            row["reviews_256"] = agreement(original, model, *reviews)
        return row

    rows = [measure("naive swap to elu linear (no training)",
                    patch_model(AutoModel.from_pretrained(path).eval(), "linear", feature_map="elu"))]
    windows = [{"input_ids": w[None]} for w in train]
    config = LinearizeConfig(transfer_steps=args.transfer_steps, transfer_lr=args.transfer_lr,
                             finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
                             finetune_params=args.finetune_params, seed=args.seed)
    start = time.process_time()
    model = AutoModel.from_pretrained(path).eval()
    if args.feature_dim is not None:
        # the registry's hedgehog factory takes feature_dim; linearize builds maps through patch_model
        from hf_efficient.attention import feature_maps

        base = feature_maps.FEATURE_MAPS["hedgehog"]
        feature_maps.FEATURE_MAPS["hedgehog"] = lambda head_dim, num_heads=None, **kw: base(
            head_dim, num_heads, feature_dim=args.feature_dim, **kw)
    linearize(model, windows, config)
    seconds = time.process_time() - start
    label = "hedgehog attention transfer" + (f" + {args.finetune_steps} distillation steps" if args.finetune_steps
                                             else "")
    rows.append(measure(f"linearised ({label})", model, linearize_cpu_seconds=seconds))

    cols = [f"hamlet_{n}" for n in args.eval_lengths] + (["reviews_256"] if reviews is not None else [])
    print(f"{'model':<58}" + "".join(f"{c + ' pooled':>20}{'token':>8}" for c in cols))
    for row in rows:
        print(f"{row['model']:<58}" + "".join(f"{row[c]['pooled_cosine']:>20.4f}{row[c]['token_cosine']:>8.4f}"
                                               for c in cols))
    target = all(rows[-1][c]["pooled_cosine"] >= 0.95 for c in cols)
    print(f"training tokens: {args.train_windows * args.length} (Hamlet, first {args.train_windows} windows); "
          f"held-out Hamlet from token {args.eval_offset_tokens}; linearise CPU time {seconds:.0f} s; "
          f"target pooled cosine >= 0.95 on every held-out set: {'met' if target else 'NOT met'}")
    record = {
        "benchmark": "linearize_minilm",
        "quick": args.quick,
        "model": "sentence-transformers/all-MiniLM-L6-v2 (offline)",
        "train_tokens": args.train_windows * args.length,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "target_pooled_cosine": 0.95,
        "target_met": target,
        "transfer_log": [e for e in config.log if "layer" in e],
        "finetune_log": [e for e in config.log if "finetune_step" in e],
        **machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
