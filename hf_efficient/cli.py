"""``hf-efficient``: the command line.

    hf-efficient convert [MODEL] --attention improved-clustered --clusters 25 --topk 32 --out DIR
    hf-efficient eval [MODEL] --attention improved-clustered --sweep clusters=10,25,50,100,200
    hf-efficient bench [attention] [--quick] [--kinds linear clustered improved-clustered]
    hf-efficient bench generate [--quick]
    hf-efficient generate MODEL --prompt "..." [--attention linear]
    hf-efficient push DIR --repo-id USER/NAME

MODEL defaults to the offline all-MiniLM-L6-v2 encoder; any local Hugging Face folder works. The
options of every attention kind (``--clusters``, ``--topk``, ``--feature-map``, ...) come from the
kinds' parameter dataclasses in the registry. Exit codes: 0 success, 2 bad arguments or input,
3 the Hub could not be reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

__all__ = ["main"]

EXIT_OK, EXIT_USAGE, EXIT_HUB = 0, 2, 3


# --------------------------------------------------------------------------- kind options
def _kind_fields() -> dict[str, dataclasses.Field]:
    """Every parameter name of every registered kind (the union), first definition wins."""
    from .attention import attention_kind_names, get_attention_kind

    fields: dict[str, dataclasses.Field] = {}
    for name in attention_kind_names():
        for f in dataclasses.fields(get_attention_kind(name).params_class):
            fields.setdefault(f.name, f)
    return fields


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _add_kind_options(parser: argparse.ArgumentParser, default_kind: str) -> None:
    from .attention import attention_kind_names

    parser.add_argument("--attention", default=default_kind, choices=attention_kind_names(),
                        help=f"attention kind (default {default_kind})")
    group = parser.add_argument_group("attention parameters (each kind takes its own; defaults from the kind)")
    for name, f in _kind_fields().items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"kind_{name}", type=_parse_value, default=None,
                           metavar=str(f.type).upper().replace(" | NONE", ""), help=f"kind default: {f.default!r}")
    parser.add_argument("--keep-softmax-first", type=int, default=0, help="leave the first N layers softmax")
    parser.add_argument("--keep-softmax-last", type=int, default=0, help="leave the last N layers softmax")


def _kind_params(args) -> dict:
    """The parameters the user set, checked against the chosen kind."""
    from .attention import get_attention_kind

    kind = get_attention_kind(args.attention)
    accepted = {f.name for f in dataclasses.fields(kind.params_class)}
    params = {}
    for name in _kind_fields():
        value = getattr(args, f"kind_{name}")
        if value is None:
            continue
        if name not in accepted:
            raise ValueError(f"--{name.replace('_', '-')} is not a parameter of {kind.name!r}; "
                             f"its parameters: {', '.join('--' + a.replace('_', '-') for a in sorted(accepted))}")
        params[name] = value
    kind.make_params(**params)  # validate now, with the kind's own message
    return params


# --------------------------------------------------------------------------- convert
def _load_encoder(model_arg: str | None):
    from transformers import AutoModel, AutoTokenizer

    from .assets import minilm_path

    path = Path(model_arg) if model_arg else minilm_path()
    if not path.exists():
        raise ValueError(f"model folder {path} does not exist (give a local Hugging Face model folder)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return path, tokenizer, lambda: AutoModel.from_pretrained(path).eval()


def _model_name(model_arg: str | None, path: Path) -> str:
    """A readable name for cards and tables: the Hub id of the default model, else the folder name."""
    return "sentence-transformers/all-MiniLM-L6-v2" if model_arg is None else path.name


def run_convert(args) -> dict:
    import torch
    from tqdm.auto import tqdm

    from .evaluation import attention_speed, hamlet_windows, hidden_agreement, long_context_accuracy, model_speed
    from .integrations.patch import patch_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    params = _kind_params(args)
    path, tokenizer, load = _load_encoder(args.model)
    original = load()
    patched = patch_model(load(), args.attention, keep_softmax_first=args.keep_softmax_first,
                          keep_softmax_last=args.keep_softmax_last, **params)
    config = original.config
    length = min(args.length, getattr(config, "max_position_embeddings", args.length))
    windows, (train_n, test_n) = (16, (3000, 1000)) if args.full else (4, (600, 300))
    long_lengths = [4096, 16384] if args.full else [4096]
    windows = args.windows or windows
    train_n, test_n = args.train_reviews or train_n, args.test_reviews or test_n
    long_lengths = args.long_lengths or long_lengths
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads

    steps = tqdm(total=4, desc="convert", disable=args.json)
    steps.set_postfix_str("agreement on Hamlet")
    ids = hamlet_windows(tokenizer, length, windows)
    agreement = hidden_agreement(original, patched, ids)
    steps.update()
    steps.set_postfix_str("long-context Rotten Tomatoes")
    task = long_context_accuracy(original, patched, tokenizer, length=length, train_reviews=train_n,
                                 test_reviews=test_n)
    steps.update()
    steps.set_postfix_str("speed")
    speed_model = model_speed(original, patched, ids[:2], repeats=args.repeats)
    steps.update()
    speed_long = [attention_speed(args.attention, params, heads=heads, head_dim=head_dim, length=n,
                                  repeats=max(3, args.repeats // 2)) for n in long_lengths]
    steps.update()
    steps.close()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    patched.save_pretrained(out)
    tokenizer.save_pretrained(out)
    result = {
        "model": _model_name(args.model, path),
        "attention": args.attention,
        "params": params,
        "layers": {"keep_softmax_first": args.keep_softmax_first, "keep_softmax_last": args.keep_softmax_last},
        "length": length,
        "agreement": {**agreement, "windows": windows, "text": "Hamlet"},
        "long_context_task": {**task, "dataset": "Rotten Tomatoes (packed)"},
        "speed_model": {**speed_model, "length": length},
        "speed_attention": speed_long,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mode": "full" if args.full else "quick",
    }
    (out / "hf_efficient_results.json").write_text(json.dumps(result, indent=2))
    _write_card(patched, out, result)
    if not args.no_plot:
        _plot_convert(result, out / "hf_efficient_results.png")
    return result


def _write_card(model, out: Path, result: dict) -> None:
    from .integrations.export import render_model_card

    task = result["long_context_task"]
    results = [
        {"task": "text-classification", "dataset": "Rotten Tomatoes (reviews packed into long documents)",
         "dataset_type": "rotten_tomatoes", "metric": "accuracy", "value": task["accuracy_patched"]},
        {"task": "feature-extraction", "dataset": "Hamlet windows", "dataset_type": "hamlet",
         "metric": "cosine", "metric_name": "mean-pooled cosine to the original model",
         "value": result["agreement"]["pooled_cosine"]},
    ]
    card = render_model_card(model, model_name=out.name, base_model=result["model"], results=results,
                             extra={"hf_efficient_results": result})
    (out / "README.md").write_text(card, encoding="utf-8")


def _plot_convert(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    task, agree = result["long_context_task"], result["agreement"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].bar(["token", "pooled"], [agree["token_cosine"], agree["pooled_cosine"]], color="tab:blue")
    axes[0].set_ylim(0, 1)
    axes[0].set_title(f"cosine to original ({result['length']} tokens)")
    axes[1].bar(["original", result["attention"]], [task["accuracy_original"], task["accuracy_patched"]],
                color=["tab:gray", "tab:blue"])
    axes[1].axhline(task["majority_class"], color="k", ls="--", lw=1, label="majority class")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("long-context review accuracy")
    axes[1].legend()
    labels = [f"model @{result['length']}"] + [f"attention @{s['length']}" for s in result["speed_attention"]]
    values = [result["speed_model"]["speedup"]] + [s["speedup"] for s in result["speed_attention"]]
    axes[2].bar(labels, values, color="tab:green")
    axes[2].axhline(1.0, color="k", lw=1)
    axes[2].set_title("speed-up vs softmax (SDPA)")
    fig.suptitle(f"{result['attention']} {result['params']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_convert(result: dict, out: str) -> None:
    task, agree, sm = result["long_context_task"], result["agreement"], result["speed_model"]
    rows = [
        ("model", result["model"]),
        ("attention", f"{result['attention']} {result['params'] or ''}"),
        (f"token cosine to original ({agree['windows']}x{result['length']} Hamlet)", f"{agree['token_cosine']:.4f}"),
        ("mean-pooled cosine to original", f"{agree['pooled_cosine']:.4f}"),
        (f"review accuracy, original ({task['test_reviews']} reviews, {task['length']}-token docs)",
         f"{task['accuracy_original']:.3f}"),
        ("review accuracy, patched", f"{task['accuracy_patched']:.3f}  (drop {task['accuracy_drop_points']:+.1f} pts)"),
        (f"model forward speed-up at {result['length']} tokens", f"{sm['speedup']:.2f}x"),
    ]
    rows += [(f"attention speed-up at {s['length']} tokens", f"{s['speedup']:.2f}x") for s in result["speed_attention"]]
    rows.append(("written to", out))
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"\n  ({result['threads']} thread(s), medians of interleaved runs vs softmax SDPA; mode {result['mode']})")


# --------------------------------------------------------------------------- eval
def run_eval(args) -> dict:
    import torch

    from .evaluation import hamlet_windows, hidden_agreement, long_context_accuracy, model_speed
    from .integrations.patch import patch_model

    torch.set_num_threads(args.threads)
    base_params = _kind_params(args)
    sweep_name, values = _parse_sweep(args.sweep) if args.sweep else (None, [None])
    path, tokenizer, load = _load_encoder(args.model)
    original = load()
    rows = []
    for length in args.lengths:
        ids = hamlet_windows(tokenizer, length, args.windows)
        for value in values:
            params = dict(base_params)
            if sweep_name is not None:
                params[sweep_name] = value
            patched = patch_model(load(), args.attention, **params)
            row = {"length": length, "attention": args.attention, "params": params,
                   **hidden_agreement(original, patched, ids)}
            row.update(model_speed(original, patched, ids[:2], repeats=args.repeats))
            if args.task:
                task = long_context_accuracy(original, patched, tokenizer, length=length,
                                             train_reviews=args.train_reviews, test_reviews=args.test_reviews)
                row.update(task)
            rows.append(row)
            if not args.json:
                acc = f"  acc {row['accuracy_patched']:.3f} vs {row['accuracy_original']:.3f}" if args.task else ""
                print(f"N={length:4d} {args.attention} {params}: token cos {row['token_cosine']:.4f}  "
                      f"pooled cos {row['pooled_cosine']:.4f}  speed-up {row['speedup']:.2f}x{acc}", flush=True)
    result = {"model": str(path), "rows": rows, "threads": torch.get_num_threads()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def _parse_sweep(text: str) -> tuple[str, list]:
    if "=" not in text:
        raise ValueError(f"--sweep takes NAME=V1,V2,..., got {text!r}")
    name, values = text.split("=", 1)
    name = name.replace("-", "_")
    if name not in _kind_fields():
        raise ValueError(f"--sweep: {name!r} is not an attention parameter; known: {', '.join(_kind_fields())}")
    return name, [_parse_value(v) for v in values.split(",") if v]


# --------------------------------------------------------------------------- generate / push
def run_generate(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .integrations.patch import patch_model

    path = Path(args.model)
    if not path.exists():
        raise ValueError(f"model folder {path} does not exist (give a local causal LM folder)")
    torch.manual_seed(args.sampling_seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if args.attention is not None:
        params = _kind_params(args)
        model = patch_model(model, args.attention, **params)
    encoded = tokenizer(args.prompt, return_tensors="pt")
    inputs = {k: encoded[k] for k in ("input_ids", "attention_mask") if k in encoded}
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        kwargs["temperature"] = args.temperature
    if args.attention == "linear":  # a patched stock decoder decodes with the recurrent state
        from .integrations.cache import LinearAttentionCache

        kwargs["cache"] = LinearAttentionCache.from_model(model)
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return {"model": str(path), "prompt": args.prompt, "completion": text}


def run_push(args) -> dict:
    from transformers import AutoConfig, AutoModel

    from .integrations.export import push_to_hub

    folder = Path(args.folder)
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder} is not a saved model folder (no config.json); run `hf-efficient convert` first")
    config = AutoConfig.from_pretrained(folder)
    if not getattr(config, "hf_efficient", None):
        raise ValueError(f"{folder} holds no hf_efficient model (config.json has no 'hf_efficient' record)")
    model = AutoModel.from_pretrained(folder)
    results_file = folder / "hf_efficient_results.json"
    results = None
    if results_file.exists():
        saved = json.loads(results_file.read_text())
        results = [{"task": "text-classification", "dataset": "Rotten Tomatoes (reviews packed into long documents)",
                    "dataset_type": "rotten_tomatoes", "metric": "accuracy",
                    "value": saved["long_context_task"]["accuracy_patched"]}]
    try:
        url = push_to_hub(model, args.repo_id, results=results, private=args.private, token=args.token)
    except Exception as err:  # the Hub client raises httpx/requests/huggingface_hub errors when offline
        module = type(err).__module__
        if isinstance(err, OSError) or module.startswith(("httpx", "requests", "huggingface_hub", "urllib3")):
            raise HubUnreachable(f"{type(err).__name__}: {err}") from err
        raise
    return {"repo_id": args.repo_id, "result": str(url)}


class HubUnreachable(RuntimeError):
    """The Hugging Face Hub could not be reached (or refused the upload)."""


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-efficient", description="Efficient attention for Hugging Face models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="patch a pretrained model, evaluate it, write a Hub-ready folder")
    conv.add_argument("model", nargs="?", help="local HF model folder (default: the offline all-MiniLM-L6-v2)")
    _add_kind_options(conv, "improved-clustered")
    conv.add_argument("--out", default="out/converted", help="output folder (default out/converted)")
    conv.add_argument("--length", type=int, default=512, help="input length for the evaluation (default 512)")
    conv.add_argument("--full", action="store_true", help="the full evaluation (more windows, reviews, lengths)")
    conv.add_argument("--windows", type=int, help="Hamlet windows (quick 4, full 16)")
    conv.add_argument("--train-reviews", type=int, help="reviews to train the head on (quick 600, full 3000)")
    conv.add_argument("--test-reviews", type=int, help="held-out reviews (quick 300, full 1000)")
    conv.add_argument("--long-lengths", type=int, nargs="+", help="synthetic attention lengths (quick 4096)")
    conv.add_argument("--repeats", type=int, default=5, help="timing repeats (default 5)")
    conv.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    conv.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    conv.add_argument("--json", action="store_true", help="print the result as JSON")

    ev = sub.add_parser("eval", help="fidelity of a patched encoder against the original (sweeps)")
    ev.add_argument("model", nargs="?", help="local HF model folder (default: the offline all-MiniLM-L6-v2)")
    _add_kind_options(ev, "improved-clustered")
    ev.add_argument("--sweep", help="NAME=V1,V2,... one attention parameter to sweep, e.g. clusters=10,25,100")
    ev.add_argument("--lengths", type=int, nargs="+", default=[256, 512], help="input lengths (default 256 512)")
    ev.add_argument("--windows", type=int, default=4, help="Hamlet windows per length (default 4)")
    ev.add_argument("--task", action="store_true", help="also the long-context review accuracy (slower)")
    ev.add_argument("--train-reviews", type=int, default=600)
    ev.add_argument("--test-reviews", type=int, default=300)
    ev.add_argument("--repeats", type=int, default=3)
    ev.add_argument("--threads", type=int, default=1)
    ev.add_argument("--out", help="write the rows as JSON here")
    ev.add_argument("--json", action="store_true")

    bench = sub.add_parser("bench", add_help=False,
                           help="'bench [attention] ...': attention kinds vs SDPA against sequence length; "
                                "'bench generate ...': decode latency and cache size against context length")
    bench.add_argument("rest", nargs=argparse.REMAINDER)

    gen = sub.add_parser("generate", help="decode from a prompt (linear attention: constant-size recurrent state)")
    gen.add_argument("model", help="local causal LM folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--sampling-seed", type=int, default=0, help="torch seed for sampling")
    _add_kind_options(gen, None)
    gen.add_argument("--json", action="store_true")

    push = sub.add_parser("push", help="upload a converted folder to the Hugging Face Hub")
    push.add_argument("folder")
    push.add_argument("--repo-id", required=True, help="USER/NAME on the Hub")
    push.add_argument("--token", default=None)
    push.add_argument("--private", action="store_true")
    push.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmarks have their own options (and --help)
        if argv[1:2] == ["generate"]:
            from .generation_benchmark import main as generate_bench

            return generate_bench(argv[2:])
        from .benchmarking import main as bench_main

        return bench_main(argv[2:] if argv[1:2] == ["attention"] else argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    runners = {"convert": run_convert, "eval": run_eval, "generate": run_generate, "push": run_push}
    try:
        result = runners[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except HubUnreachable as err:
        print(f"error: could not upload to the Hugging Face Hub: {err}", file=sys.stderr)
        return EXIT_HUB
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    elif args.command == "convert":
        _print_convert(result, args.out)
    elif args.command == "generate":
        print(result["prompt"] + result["completion"])
    elif args.command == "push":
        print(f"pushed to {result['repo_id']}: {result['result']}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
