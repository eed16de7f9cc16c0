"""``hf-efficient``: the command line.

    hf-efficient convert [MODEL] --attention improved-clustered --clusters 25 --topk 32 --out DIR
    hf-efficient eval [MODEL] --attention improved-clustered --sweep clusters=10,25,50,100,200
    hf-efficient bench [attention] [--quick] [--kinds linear clustered improved-clustered]
    hf-efficient bench generate [--quick]
    hf-efficient generate MODEL --prompt "..." [--attention linear]
    hf-efficient push DIR --repo-id USER/NAME

MODEL defaults to the offline all-MiniLM-L6-v2 encoder; any local Hugging Face folder works. The
options of every attention kind (``--clusters``, ``--topk``, ``--feature-map``, ...) come from the
kinds' parameter dataclasses in the registry, typed by their annotations. Exit codes: 0 success,
2 bad arguments or input, 3 the Hub could not be reached.

Every argument is checked before any work starts (counts, the model folder, the output folder,
the kind's parameters), so a mistake costs seconds, not an evaluation. ``convert`` writes into a
hidden folder beside ``--out`` and moves it into place at the end: an interrupted run leaves the
previous output as it was, and a rerun never mixes old and new files. It refuses a non-empty folder
that is not its own earlier output unless ``--overwrite`` (which replaces the folder wholesale).

Building the parser imports neither torch nor transformers: the attention registry is read only
for the command being parsed, and the heavy modules load inside the command functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import types
import typing
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .arguments import non_negative_float, non_negative_int, positive_int

__all__ = ["main", "non_negative_int", "positive_int"]

EXIT_OK, EXIT_USAGE, EXIT_HUB = 0, 2, 3
RESULTS_FILE = "hf_efficient_results.json"
KIND_COMMANDS = ("convert", "eval", "generate")
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                             "spiece.model", "sentencepiece.bpe.model"})


# --------------------------------------------------------------------------- argument types
def _field_parser(hint: Any) -> Callable[[str], Any]:
    """An argparse type for a parameter annotated ``hint`` (``int``, ``float | None``, ``str`` ...).

    The text is converted to the annotated type, never guessed; ``none`` gives None where the
    annotation allows it. Range checks are the kind's own (its ``__post_init__``)."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    optional = type(None) in members
    base = next((m for m in members if m is not type(None)), str) if members else hint
    bools = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}

    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        if base is bool:
            if text.lower() not in bools:
                raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
            return bools[text.lower()]
        if base in (int, float):
            try:
                return base(text)
            except ValueError:
                accepted = f"{'an integer' if base is int else 'a number'}{' or none' if optional else ''}"
                raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None
        return text

    parse.__name__ = getattr(base, "__name__", "value")
    parse.metavar = parse.__name__.upper() + ("|NONE" if optional else "")
    return parse


# --------------------------------------------------------------------------- kind options
def _kind_fields() -> dict[str, tuple[dataclasses.Field, Any]]:
    """Every parameter of every registered kind (the union, first definition wins), with its type."""
    from .attention import attention_kind_names, get_attention_kind

    fields: dict[str, tuple[dataclasses.Field, Any]] = {}
    for name in attention_kind_names():
        params_class = get_attention_kind(name).params_class
        hints = typing.get_type_hints(params_class)
        for f in dataclasses.fields(params_class):
            fields.setdefault(f.name, (f, hints.get(f.name, str)))
    return fields


def _add_kind_options(parser: argparse.ArgumentParser, default_kind: str | None) -> None:
    from .attention import attention_kind_names

    parser.add_argument("--attention", default=default_kind, choices=attention_kind_names(),
                        help=f"attention kind (default {default_kind})")
    group = parser.add_argument_group("attention parameters (each kind takes its own; defaults from the kind)")
    for name, (f, hint) in _kind_fields().items():
        parse = _field_parser(hint)
        # SUPPRESS: an option the user did not give is absent, so the kind's default applies.
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"kind_{name}", type=parse, default=argparse.SUPPRESS,
                           metavar=parse.metavar, help=f"kind default: {f.default!r}")


def _kind_params(args) -> dict:
    """The parameters the user set, checked against the chosen kind (ValueError/TypeError if bad)."""
    from .attention import get_attention_kind

    given = {name: getattr(args, f"kind_{name}") for name in _kind_fields() if hasattr(args, f"kind_{name}")}
    if args.attention is None:
        if given:
            options = ", ".join("--" + n.replace("_", "-") for n in given)
            raise ValueError(f"{options} given without --attention; choose the kind they belong to")
        return {}
    kind = get_attention_kind(args.attention)
    accepted = {f.name for f in dataclasses.fields(kind.params_class)}
    for name in given:
        if name not in accepted:
            raise ValueError(f"--{name.replace('_', '-')} is not a parameter of {kind.name!r}; "
                             f"its parameters: {', '.join('--' + a.replace('_', '-') for a in sorted(accepted))}")
    kind.make_params(**given)  # validate now, with the kind's own message
    return given


def _parse_sweep(text: str, kind_name: str, base: dict) -> tuple[str, list]:
    """``NAME=V1,V2,...`` -> (field name, typed values), each value validated by the kind."""
    from .attention import get_attention_kind

    if "=" not in text:
        raise ValueError(f"--sweep takes NAME=V1,V2,..., got {text!r}")
    name, values = text.split("=", 1)
    name = name.replace("-", "_")
    kind = get_attention_kind(kind_name)
    accepted = sorted(f.name for f in dataclasses.fields(kind.params_class))
    if name not in accepted:
        raise ValueError(f"--sweep: {name!r} is not a parameter of {kind_name!r}; accepted: {', '.join(accepted)}")
    parse = _field_parser(typing.get_type_hints(kind.params_class)[name])
    texts = [v for v in values.split(",") if v.strip()]
    if not texts:
        raise ValueError(f"--sweep {text!r} lists no values")
    try:
        parsed = [parse(v.strip()) for v in texts]
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"--sweep {name}: {err}") from None
    for value in parsed:
        kind.make_params(**{**base, name: value})
    return name, parsed


# --------------------------------------------------------------------------- folders
def _model_folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a local Hugging Face model folder, or None."""
    if not path.exists():
        return f"model folder {path} does not exist (give a local Hugging Face model folder)"
    if not path.is_dir():
        return f"model {path} is a file, not a folder (give a local Hugging Face model folder)"
    names = {p.name for p in path.iterdir()}
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not any(n.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")) for n in names):
        missing.append("weights (*.safetensors or pytorch_model.bin)")
    if not names & TOKENIZER_FILES:
        # transformers would otherwise build a tokenizer of a handful of special tokens: silently wrong ids
        missing.append(f"tokenizer files (one of {', '.join(sorted(TOKENIZER_FILES))})")
    if missing:
        return (f"{path} is not a Hugging Face model folder: it has no {'; no '.join(missing)} (save_pretrained "
                "of the model and of its tokenizer writes them)")
    return None


def _foreign_files(folder: Path) -> list[str]:
    """Names in ``folder`` that an earlier ``convert`` did not write (per the list in its results file);
    every name when there is no such list."""
    names = sorted(p.name for p in folder.iterdir())
    try:
        written = set(json.loads((folder / RESULTS_FILE).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return names
    return [n for n in names if n not in written | {RESULTS_FILE}]


def _out_folder_problem(out: Path, overwrite: bool) -> str | None:
    """Why ``convert`` must not write to ``out``, or None."""
    out = out.resolve()
    if out == out.parent:
        return f"--out {out} is the file-system root; give a folder below it"
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; give a folder (new, empty, or an earlier output of hf-efficient convert)"
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"--out {out}: {ancestor} is a file, so the folder cannot be created"
    if not os.access(ancestor, os.W_OK):
        return f"--out {out}: {ancestor} is not writable"
    foreign = _foreign_files(out) if out.is_dir() and not overwrite else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        return (f"--out {out} is a non-empty folder that hf-efficient convert did not write (it holds {shown}); "
                "give a new or empty folder, or pass --overwrite to replace the folder and everything in it")
    return None


def _staging_folder(out: Path) -> Path:
    """A new hidden folder beside ``out`` (same file system, so the final move is a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    return staging


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` (if any) by ``staging``: two renames, the old folder restored if the second fails."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- convert
def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError) as err:
        raise ValueError(f"cannot load a tokenizer from {path} ({type(err).__name__}: {err}); the model "
                         "folder needs its tokenizer files (saved with save_pretrained beside the model)") from err


def _load_encoder(model_arg: str | None):
    from transformers import AutoModel

    from .assets import minilm_path

    path = Path(model_arg) if model_arg else minilm_path()
    problem = _model_folder_problem(path)
    if problem:
        raise ValueError(problem)
    tokenizer = _load_tokenizer(path)
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
    params = args.kind_params
    path, tokenizer, load = _load_encoder(args.model)
    original = load()
    patched = patch_model(load(), args.attention, keep_softmax_first=args.keep_softmax_first,
                          keep_softmax_last=args.keep_softmax_last, **params)
    config = original.config
    length = min(args.length, getattr(config, "max_position_embeddings", args.length))
    windows, (train_n, test_n) = (16, (3000, 1000)) if args.full else (4, (600, 300))
    long_lengths = [4096, 16384] if args.full else [4096]
    # The options are None when not given (never 0: the parser refuses counts below 1).
    windows = args.windows if args.windows is not None else windows
    train_n = args.train_reviews if args.train_reviews is not None else train_n
    test_n = args.test_reviews if args.test_reviews is not None else test_n
    long_lengths = args.long_lengths if args.long_lengths is not None else long_lengths
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

    out = Path(args.out).resolve()  # a real name and parent, also for "." or "dir/"
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
    staging = _staging_folder(out)
    try:
        patched.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _write_card(patched, staging, result, name=out.name)
        if not args.no_plot:
            _plot_convert(result, staging / "hf_efficient_results.png")
        # The list of files marks the folder as ours: a rerun may replace exactly such a folder.
        result["files"] = sorted([p.name for p in staging.iterdir()] + [RESULTS_FILE])
        (staging / RESULTS_FILE).write_text(json.dumps(result, indent=2))
        problem = _out_folder_problem(out, args.overwrite)  # the folder may have changed during the run
        if problem:
            raise ValueError(problem)
        _move_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return result


def _write_card(model, out: Path, result: dict, name: str) -> None:
    from .integrations.export import render_model_card

    task = result["long_context_task"]
    results = [
        {"task": "text-classification", "dataset": "Rotten Tomatoes (reviews packed into long documents)",
         "dataset_type": "rotten_tomatoes", "metric": "accuracy", "value": task["accuracy_patched"]},
        {"task": "feature-extraction", "dataset": "Hamlet windows", "dataset_type": "hamlet",
         "metric": "cosine", "metric_name": "mean-pooled cosine to the original model",
         "value": result["agreement"]["pooled_cosine"]},
    ]
    card = render_model_card(model, model_name=name, base_model=result["model"], results=results,
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
def _previous_eval(path: Path) -> bool:
    """Whether ``path`` is a JSON file an earlier ``eval`` wrote."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"model", "rows", "threads"} <= set(data)


def run_eval(args) -> dict:
    import torch

    from .evaluation import hamlet_windows, hidden_agreement, long_context_accuracy, model_speed
    from .integrations.patch import patch_model

    torch.set_num_threads(args.threads)
    base_params = args.kind_params
    sweep_name, values = args.sweep_values
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
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        staging.write_text(json.dumps(result, indent=2))
        os.replace(staging, out)  # whole file or nothing
    return result


# --------------------------------------------------------------------------- generate / push
def run_generate(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from .attention import get_attention_kind
    from .integrations.patch import patch_model

    path = Path(args.model)
    problem = _model_folder_problem(path)
    if problem:
        raise ValueError(problem)
    torch.manual_seed(args.sampling_seed)
    tokenizer = _load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if args.attention is not None:
        model = patch_model(model, args.attention, **args.kind_params)
    encoded = tokenizer(args.prompt, return_tensors="pt")
    inputs = {k: encoded[k] for k in ("input_ids", "attention_mask") if k in encoded}
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        kwargs["temperature"] = args.temperature
    if args.attention is not None and get_attention_kind(args.attention).decode is not None:
        # a stock decoder patched with a recurrent kind decodes from its constant-size state
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
    config = AutoConfig.from_pretrained(folder)
    if not getattr(config, "hf_efficient", None):
        raise ValueError(f"{folder} holds no hf_efficient model (config.json has no 'hf_efficient' record)")
    model = AutoModel.from_pretrained(folder)
    results_file = folder / RESULTS_FILE
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


# --------------------------------------------------------------------------- parser
def _command_of(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (the top-level parser has no options that take a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser. The attention options (read from the registry, which imports torch) are added
    only to the sub-command ``command``, so ``hf-efficient --help`` stays cheap."""
    parser = argparse.ArgumentParser(prog="hf-efficient", description="Efficient attention for Hugging Face models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def kind_options(p: argparse.ArgumentParser, name: str, default_kind: str | None) -> None:
        if command == name:
            _add_kind_options(p, default_kind)

    conv = sub.add_parser("convert", help="patch a pretrained model, evaluate it, write a Hub-ready folder")
    conv.add_argument("model", nargs="?", help="local HF model folder (default: the offline all-MiniLM-L6-v2)")
    kind_options(conv, "convert", "improved-clustered")
    conv.add_argument("--keep-softmax-first", type=non_negative_int, default=0, help="leave the first N layers softmax")
    conv.add_argument("--keep-softmax-last", type=non_negative_int, default=0, help="leave the last N layers softmax")
    conv.add_argument("--out", default="out/converted",
                      help="output folder (default out/converted): new, empty, or an earlier output of convert")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace a non-empty --out folder that convert did not write, with everything in it")
    conv.add_argument("--length", type=positive_int, default=512, help="input length for the evaluation (default 512)")
    conv.add_argument("--full", action="store_true", help="the full evaluation (more windows, reviews, lengths)")
    conv.add_argument("--windows", type=positive_int, help="Hamlet windows (quick 4, full 16)")
    conv.add_argument("--train-reviews", type=positive_int, help="reviews to train the head on (quick 600, full 3000)")
    conv.add_argument("--test-reviews", type=positive_int, help="held-out reviews (quick 300, full 1000)")
    conv.add_argument("--long-lengths", type=positive_int, nargs="+", help="synthetic attention lengths (quick 4096)")
    conv.add_argument("--repeats", type=positive_int, default=5, help="timing repeats (default 5)")
    conv.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    conv.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    conv.add_argument("--json", action="store_true", help="print the result as JSON")

    ev = sub.add_parser("eval", help="fidelity of a patched encoder against the original (sweeps)")
    ev.add_argument("model", nargs="?", help="local HF model folder (default: the offline all-MiniLM-L6-v2)")
    kind_options(ev, "eval", "improved-clustered")
    ev.add_argument("--sweep", help="NAME=V1,V2,... one attention parameter to sweep, e.g. clusters=10,25,100")
    ev.add_argument("--lengths", type=positive_int, nargs="+", default=[256, 512],
                    help="input lengths (default 256 512)")
    ev.add_argument("--windows", type=positive_int, default=4, help="Hamlet windows per length (default 4)")
    ev.add_argument("--task", action="store_true", help="also the long-context review accuracy (slower)")
    ev.add_argument("--train-reviews", type=positive_int, default=600)
    ev.add_argument("--test-reviews", type=positive_int, default=300)
    ev.add_argument("--repeats", type=positive_int, default=3)
    ev.add_argument("--threads", type=positive_int, default=1)
    ev.add_argument("--out", help="write the rows as JSON to this file")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --out file that eval did not write")
    ev.add_argument("--json", action="store_true")

    sub.add_parser("bench", add_help=False,
                   help="'bench [attention] ...': attention kinds vs SDPA against sequence length; "
                        "'bench generate ...': decode latency and cache size against context length")

    gen = sub.add_parser("generate", help="decode from a prompt (recurrent kinds: constant-size state)")
    gen.add_argument("model", help="local causal LM folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=positive_int, default=40)
    gen.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--sampling-seed", type=non_negative_int, default=0, help="torch seed for sampling")
    kind_options(gen, "generate", None)
    gen.add_argument("--json", action="store_true")

    push = sub.add_parser("push", help="upload a converted folder to the Hugging Face Hub")
    push.add_argument("folder")
    push.add_argument("--repo-id", required=True, help="USER/NAME on the Hub")
    push.add_argument("--token", default=None)
    push.add_argument("--private", action="store_true")
    push.add_argument("--json", action="store_true")
    for p in sub.choices.values():
        p.set_defaults(subparser=p)  # so that later checks report with the sub-command's usage line
    return parser


def _check_args(args) -> None:
    """Everything that can be checked before the work starts; a problem raises ValueError/TypeError."""
    if args.command in KIND_COMMANDS:
        args.kind_params = _kind_params(args)
    if args.command in ("convert", "eval") and args.model is not None:
        problem = _model_folder_problem(Path(args.model))
        if problem:
            raise ValueError(problem)
    if args.command == "generate":
        problem = _model_folder_problem(Path(args.model))
        if problem:
            raise ValueError(problem)
    if args.command == "convert":
        problem = _out_folder_problem(Path(args.out), args.overwrite)
        if problem:
            raise ValueError(problem)
    if args.command == "eval":
        args.sweep_values = (_parse_sweep(args.sweep, args.attention, args.kind_params) if args.sweep
                             else (None, [None]))
        if args.out is not None:
            out = Path(args.out)
            if out.is_dir():
                raise ValueError(f"--out {out} is a folder; give a JSON file path")
            if out.exists() and not args.overwrite and not _previous_eval(out):
                raise ValueError(f"--out {out} exists and is not an earlier eval result; give a new path or "
                                 "pass --overwrite to replace it")
    if args.command == "push":
        folder = Path(args.folder)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is not a saved model folder (no config.json); run `hf-efficient convert` "
                             "first and push the folder it writes")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmarks have their own options (and --help)
        if argv[1:2] == ["generate"]:
            from .generation_benchmark import main as generate_bench

            return generate_bench(argv[2:])
        from .benchmarking import main as bench_main

        return bench_main(argv[2:] if argv[1:2] == ["attention"] else argv[1:])
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    try:
        _check_args(args)
    except (ValueError, TypeError) as err:
        args.subparser.error(str(err))  # argparse's format and exit code 2
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
