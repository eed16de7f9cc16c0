"""``hf-efficient``: the command line.

``hf-efficient demo`` patches the offline MiniLM encoder (or any local HF folder) with an attention
kind and prints how closely it agrees with the original model on real long text, and how fast it
runs beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _kind_params(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"error: --param takes NAME=VALUE, got {pair!r}")
        name, value = pair.split("=", 1)
        params[name.replace("-", "_")] = _parse_value(value)
    return params


def hamlet_windows(tokenizer, length: int, count: int) -> list[list[int]]:
    """``count`` consecutive windows of ``length`` tokens of Hamlet (special tokens included)."""
    from .assets import load_hamlet

    ids = tokenizer(load_hamlet(), add_special_tokens=False)["input_ids"]
    body = length - 2
    windows = []
    for i in range(count):
        chunk = ids[i * body : (i + 1) * body]
        if len(chunk) < body:
            break
        windows.append(tokenizer.build_inputs_with_special_tokens(chunk))
    return windows


def run_demo(args) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from . import patch_model
    from .assets import minilm_path

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    params = _kind_params(args.param)
    ours = patch_model(AutoModel.from_pretrained(path).eval(), args.attention, **params)

    windows = hamlet_windows(tokenizer, args.length, args.windows)
    input_ids = torch.tensor(windows)
    mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        ref = base(input_ids=input_ids, attention_mask=mask).last_hidden_state
        out = ours(input_ids=input_ids, attention_mask=mask).last_hidden_state
    token_cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1).mean().item()
    pooled_cos = torch.nn.functional.cosine_similarity(ref.mean(1), out.mean(1), dim=-1).mean().item()

    times = {"original": [], args.attention: []}
    with torch.inference_mode():
        for model in (base, ours):  # warm-up
            model(input_ids=input_ids, attention_mask=mask)
        for _ in range(args.repeats):  # interleaved: original, ours, original, ...
            for name, model in (("original", base), (args.attention, ours)):
                start = time.perf_counter()
                model(input_ids=input_ids, attention_mask=mask)
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": str(path),
        "attention": args.attention,
        "params": params,
        "inputs": {"text": "Hamlet", "windows": len(windows), "tokens_per_window": args.length},
        "token_cosine": token_cos,
        "pooled_cosine": pooled_cos,
        "seconds_original": med["original"],
        "seconds_patched": med[args.attention],
        "speedup": med["original"] / med[args.attention],
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }


def _print_demo(result: dict) -> None:
    print(f"\n{result['model']}")
    print(f"attention: {result['attention']} {result['params'] or ''}")
    inp = result["inputs"]
    print(f"inputs: {inp['windows']} windows of {inp['tokens_per_window']} tokens of {inp['text']}\n")
    rows = [
        ("token cosine to original", f"{result['token_cosine']:.4f}"),
        ("mean-pooled cosine to original", f"{result['pooled_cosine']:.4f}"),
        ("forward time, original / patched", f"{result['speedup']:.2f}x  ({result['threads']} threads, "
         f"median of {result['repeats']})"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    from .attention import attention_kind_names

    parser = argparse.ArgumentParser(prog="hf-efficient", description="Efficient attention for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="patch a pretrained encoder and compare it with the original on real text")
    demo.add_argument("model", nargs="?", help="local HF model folder (default: the offline all-MiniLM-L6-v2)")
    demo.add_argument("--attention", default="linear", choices=attention_kind_names(), help="attention kind")
    demo.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                      help="a parameter of the attention kind, e.g. feature_map=favor (repeatable)")
    demo.add_argument("--length", type=int, default=256, help="tokens per input window (default 256)")
    demo.add_argument("--windows", type=int, default=8, help="number of Hamlet windows (default 8)")
    demo.add_argument("--repeats", type=int, default=5, help="timing repeats (default 5)")
    demo.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

    if args.command == "demo":
        if args.length < 8:
            parser.error(f"--length must be at least 8 tokens, got {args.length}")
        try:
            result = run_demo(args)
        except (ValueError, TypeError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            _print_demo(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
