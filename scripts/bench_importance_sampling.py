"""Uniform sampling versus importance sampling at equal compute, through the real Trainers.

Main case (``--case paper``, the default), the regime the paper studied: Fashion-MNIST, the first
10,000 training images, the MLP 784-512-512-10, SGD with momentum 0.9 at a constant learning rate,
batch 128, one thread. Every arm continues from one shared warm start (1,334 uniform steps) and
gets the same budget of process CPU time (``--budget``, 60 s by default; evaluation pauses the
clock). Each arm runs at every learning rate of a small grid with seed 0; its best (lowest final
training loss on the 10k) then runs the other seeds. Reported per seed: the CPU time importance
sampling needs to reach uniform sampling's final training loss over the time uniform needs, the
CPU cost of an importance-sampled step over a uniform step (medians), the share of active steps,
the distinct rows trained per active step, the share of steps that ``max_grad_norm`` (the
Trainer's default 1.0, the same for every arm) clipped, and curves of training loss, test error and tau
(``results/bench_importance_sampling.json`` and ``.png``). Arms: ``importance`` is the trainer's
defaults (B = 3b, the paper's tau switch, a bfloat16 scoring forward on hardware with native
bfloat16 products); ``importance_fp32_score`` scores in float32; ``importance_presample2`` has B = 2b.

Text case (``--case text``): the same protocol for a Rotten Tomatoes sentiment classifier, the MLP
384-512-512-2 over frozen all-MiniLM-L6-v2 sentence embeddings, 10,000 train / 2,808 test snippets
(``results/bench_importance_sampling_text.json``).

Second table (``--case short``): short wall-clock budgets on other tasks:
  * ``fashion_mnist``: a small CNN on Fashion-MNIST (60k train, 10k test).
  * ``rotten_tomatoes``: an MLP head on frozen all-MiniLM-L6-v2 sentence embeddings (computed once
    and cached as safetensors), 10,000 train / 2,808 test snippets.
with methods ``uniform`` (the stock :class:`transformers.Trainer`), ``importance`` (presample 3x,
the paper's tau switch), ``importance_eager`` (presample 2x, on whenever the smoothed tau > 1)
and ``constant_time`` (the reference code's constant-time variant), the gradient-variance
reduction measured exactly on a presample, and the time to uniform's final training loss
(``results/bench_importance_sampling_short.json``).

    python scripts/bench_importance_sampling.py --quick               # seconds: a smoke run
    python scripts/bench_importance_sampling.py --budget 30           # the main case, ~15 CPU-minutes
    python scripts/bench_importance_sampling.py --case text --budget 30  # the text classifier, ~6 CPU-minutes
    python scripts/bench_importance_sampling.py --case short --tasks fashion_mnist --warm-start 60
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_efficient.assets import AssetMissingError, asset_path, cache_dir, load_rotten_tomatoes, minilm_path
from hf_efficient.benchmarking import cpu_model
from hf_efficient.training import ImportanceSamplingConfig, ImportanceSamplingTrainer
from hf_efficient.training.scores import cross_entropy_gradient_norm, tau_from_scores

METHODS = (
    "uniform",
    "importance",
    "importance_eager",
    "constant_time",
    "importance_presample2",
    "importance_fp32_score",
)
METHOD_ARGS = {
    # The trainer's defaults: B = 3b, tau_th = (B + 3b) / (3b) = 2, score_dtype="auto" (a bfloat16
    # scoring forward where the hardware multiplies bfloat16 natively, else float32).
    "importance": dict(),
    # The same with the scoring forward in float32 whatever the hardware: what bfloat16 scoring buys.
    "importance_fp32_score": dict(score_dtype="model"),
    "importance_eager": dict(presample=2.0, tau_threshold=1.0),  # on as soon as the smoothed tau > 1
    "constant_time": dict(constant_time=True),  # the reference code's variant, tau_th = 2
    # B = 2b: scoring costs 2/3 of the default's, tau_th = (B + 3b) / (3b) = 5/3
    "importance_presample2": dict(presample=2.0),
}


# ---- models -------------------------------------------------------------------------------------
class BenchConfig(PretrainedConfig):
    model_type = "importance_bench"

    def __init__(self, arch: str = "cnn", in_dim: int = 384, hidden: int = 64, num_labels: int = 10, **kwargs):
        super().__init__(num_labels=num_labels, **kwargs)
        self.arch, self.in_dim, self.hidden = arch, in_dim, hidden


class BenchModel(PreTrainedModel):
    """``cnn``: ``pixel_values (batch, 1, 28, 28)``; ``mlp``: ``features (batch, in_dim)``; both give
    ``logits (batch, num_labels)``."""

    config_class = BenchConfig
    base_model_prefix = "bench"

    def __init__(self, config: BenchConfig):
        super().__init__(config)
        if config.arch == "cnn":
            self.body = nn.Sequential(
                nn.Conv2d(1, 8, 5, padding=2),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 5, padding=2),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(16 * 7 * 7, config.hidden),
                nn.ReLU(),
            )
        elif config.arch == "mlp2":  # the paper's MLP: in_dim - hidden - hidden - classes
            self.body = nn.Sequential(
                nn.Linear(config.in_dim, config.hidden),
                nn.ReLU(),
                nn.Linear(config.hidden, config.hidden),
                nn.ReLU(),
            )
        else:
            self.body = nn.Sequential(nn.Linear(config.in_dim, config.hidden), nn.ReLU())
        self.head = nn.Linear(config.hidden, config.num_labels)

    def _init_weights(self, module):  # torch's default initialisation, seeded by the run
        pass

    def forward(self, pixel_values=None, features=None, labels=None):
        x = pixel_values if pixel_values is not None else features
        logits = self.head(self.body(x))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class TensorDictDataset(torch.utils.data.Dataset):
    """Map-style dataset over aligned tensors; ``__getitems__`` fetches a batch in one indexing."""

    def __init__(self, **tensors: torch.Tensor):
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitems__(self, indices: list[int]) -> GatheredRows:
        idx = torch.as_tensor(indices)
        return GatheredRows({k: v.index_select(0, idx) for k, v in self.tensors.items()}, len(indices))


class GatheredRows(Sequence):
    """The examples of one ``__getitems__`` call as gathered columns: :func:`collate` returns the
    columns without restacking row by row, and a row is built only if something asks for it (a
    per-row dict for each of 384 rows costs about a millisecond; both arms load data this way)."""

    def __init__(self, columns: dict[str, torch.Tensor], n: int):
        self.columns, self.n = columns, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(self.n))]
        return {k: c[j] for k, c in self.columns.items()}


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if isinstance(examples, GatheredRows):
        return dict(examples.columns)
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


# ---- data -------------------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    # The IDX files directly: building the `datasets` table of 60k images takes far longer than training.
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_task(quick: bool) -> dict:
    """Fashion-MNIST (the ``fashion_mnist`` asset), normalised images ``(n, 1, 28, 28)``."""
    root = asset_path("fashion_mnist")

    def tensors(prefix):
        images = torch.from_numpy(_read_idx(root / f"{prefix}-images-idx3-ubyte.gz").copy()).float()
        images = images.div_(255.0).sub_(0.2860).div_(0.3530)
        labels = torch.from_numpy(_read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
        return images.unsqueeze(1), labels

    x, y = tensors("train")
    xt, yt = tensors("t10k")
    if quick:
        x, y = x[:3000], y[:3000]
    return {
        "name": "fashion_mnist",
        "train": TensorDictDataset(pixel_values=x, labels=y),
        "eval_train": {"pixel_values": x[:1000], "labels": y[:1000]},
        "eval_test": {"pixel_values": xt[:1000], "labels": yt[:1000]},
        "config": BenchConfig(arch="cnn", hidden=64, num_labels=10),
    }


def _minilm_embeddings(texts: list[str], quick: bool) -> torch.Tensor:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 embeddings ``(n, 384)``, cached on disk."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoTokenizer

    path = cache_dir() / f"rotten_tomatoes_minilm_{len(texts)}.safetensors"
    if path.exists():
        return load_file(path)["embeddings"]
    folder = minilm_path()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))  # a one-off cache step, not timed
    tokenizer, encoder = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), 128):
            batch = tokenizer(
                texts[start : start + 128], padding=True, truncation=True, max_length=64, return_tensors="pt"
            )
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    torch.set_num_threads(threads)
    emb = torch.cat(out)
    save_file({"embeddings": emb.contiguous()}, path)
    return emb


def rotten_tomatoes_task(quick: bool) -> dict:
    ds = load_rotten_tomatoes().shuffle(seed=0)
    n = 1200 if quick else len(ds)
    texts, labels = ds["text"][:n], torch.tensor(ds["label"][:n])
    emb = _minilm_embeddings(texts, quick)
    n_train = 900 if quick else 10_000
    x, y, xt, yt = emb[:n_train], labels[:n_train], emb[n_train:], labels[n_train:]
    return {
        "name": "rotten_tomatoes",
        "train": TensorDictDataset(features=x, labels=y),
        "eval_train": {"features": x[:2000], "labels": y[:2000]},
        "eval_test": {"features": xt[:2000], "labels": yt[:2000]},
        "config": BenchConfig(arch="mlp", in_dim=384, hidden=128, num_labels=2),
    }


# ---- runs -------------------------------------------------------------------------------------
class Clock(TrainerCallback):
    """Stops training after ``budget`` seconds of training time; evaluates every ``every`` seconds
    with the clock paused."""

    def __init__(self, budget: float, every: float, evaluate):
        self.budget, self.every, self.evaluate = budget, every, evaluate
        self.points: list[dict] = []
        self.elapsed = 0.0
        self.next_eval = 0.0
        self.steps = 0

    def on_train_begin(self, args, state, control, **kw):
        self._record(kw["model"])
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        self.elapsed += now - self.start
        self.steps = state.global_step
        if self.elapsed >= self.next_eval or self.elapsed >= self.budget:
            self._record(kw["model"])
        if self.elapsed >= self.budget:
            control.should_training_stop = True
        self.start = time.perf_counter()

    def _record(self, model):
        loss, err = self.evaluate(model)
        self.points.append({"time": self.elapsed, "steps": self.steps, "train_loss": loss, "test_error": err})
        self.next_eval = self.elapsed + self.every


def make_evaluator(task: dict):
    def evaluate(model) -> tuple[float, float]:
        was = model.training
        model.eval()
        with torch.no_grad():
            tr = task["eval_train"]
            loss = F.cross_entropy(model(**{k: v for k, v in tr.items() if k != "labels"}).logits, tr["labels"])
            te = task["eval_test"]
            pred = model(**{k: v for k, v in te.items() if k != "labels"}).logits.argmax(-1)
        model.train(was)
        return float(loss), float((pred != te["labels"]).float().mean())

    return evaluate


def _trainer_settings(out_dir: str, batch: int, lr: float, seed: int, max_steps: int = 10**7, **extra) -> dict:
    """TrainingArguments keywords shared by every arm: constant lr, CPU, no saving, logging or progress bar;
    the run ends on its CPU budget (a callback), not on ``max_steps``."""
    return dict(output_dir=out_dir, per_device_train_batch_size=batch, learning_rate=lr,
                lr_scheduler_type="constant", max_steps=max_steps, logging_steps=10**7, save_strategy="no",
                report_to=[], disable_tqdm=True, use_cpu=True, seed=seed, dataloader_pin_memory=False, **extra)


def run(task: dict, method: str, lr: float, seed: int, budget: float, batch: int, out_dir: str) -> dict:
    torch.manual_seed(seed)
    model = BenchModel(task["config"])
    if "init_state" in task:  # warm start: every run continues from the same partly trained model
        model.load_state_dict(task["init_state"])
    common = _trainer_settings(out_dir, batch, lr, seed)
    clock = Clock(budget, budget / 6, make_evaluator(task))
    if method == "uniform":
        trainer = Trainer(
            model=model, args=TrainingArguments(**common), train_dataset=task["train"], data_collator=collate
        )
    else:
        args = ImportanceSamplingConfig(**common, **METHOD_ARGS[method])
        trainer = ImportanceSamplingTrainer(model=model, args=args, train_dataset=task["train"], data_collator=collate)
    trainer.add_callback(clock)
    trainer.train()
    result = {
        "method": method,
        "lr": lr,
        "seed": seed,
        "steps": clock.steps,
        "train_time": clock.elapsed,
        "seconds_per_step": clock.elapsed / max(clock.steps, 1),
        "curve": clock.points,
        "final_train_loss": clock.points[-1]["train_loss"],
        "final_test_error": clock.points[-1]["test_error"],
    }
    if method != "uniform":
        st = trainer.is_state
        result.update(active_fraction=st.active_steps / max(st.steps, 1), final_tau=st.tau)
    result["model"] = model
    return result


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """First training time at which the evaluated training loss is <= target (linear interpolation)."""
    prev = None
    for point in curve:
        if point["train_loss"] <= target:
            if prev is None:
                return point["time"]
            t0, l0, t1, l1 = prev["time"], prev["train_loss"], point["time"], point["train_loss"]
            return t0 + (t1 - t0) * (l0 - target) / max(l0 - l1, 1e-12)
        prev = point
    return None


def gradient_variance(model, task: dict, batch: int, presample: int, seed: int = 0) -> dict:
    """Exact trace of the covariance of one-sample gradient estimators on a random presample.

    Uniform: ``X = g_i`` w.p. ``1/B``; importance: ``X = g_i / (B p_i)`` w.p. ``p_i``. Both have
    mean ``G``; ``tr Var = E||X||^2 - ||G||^2``. Reported for the upper-bound score and for the
    exact gradient norm (the optimal distribution), per sample (divide by ``b`` for a batch)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(task["train"]), generator=g)[:presample].tolist()
    rows = collate(task["train"].__getitems__(idx))
    inputs = {k: v for k, v in rows.items() if k != "labels"}
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    per_sample = []
    for i in range(presample):
        logits = model(**{k: v[i : i + 1] for k, v in inputs.items()}).logits
        loss = F.cross_entropy(logits, rows["labels"][i : i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, params)
        per_sample.append(torch.cat([gr.flatten() for gr in grads]))
    gmat = torch.stack(per_sample).double()
    with torch.no_grad():
        bound = cross_entropy_gradient_norm(model(**inputs).logits, rows["labels"], "classification").double()
    sq = gmat.pow(2).sum(1)
    mean_sq = gmat.mean(0).pow(2).sum()
    n = presample
    uniform = sq.mean() - mean_sq

    def is_var(scores):
        # Rows with p = 0 are never drawn: the estimator then misses their gradient (a bias, reported
        # below) and its second moment is taken about the biased mean, never by dropping them quietly.
        p = scores / scores.sum()
        keep = p > 0
        biased_mean_sq = gmat[keep].sum(0).div(n).pow(2).sum()
        return (sq[keep] / (n * n * p[keep])).sum() - biased_mean_sq

    def bias(scores):
        return float(gmat[scores <= 0].sum(0).div(n).norm() / gmat.mean(0).norm())

    exact = sq.sqrt()
    return {
        "presample": n,
        "uniform_trace_var": float(uniform),
        "importance_trace_var": float(is_var(bound)),
        "optimal_trace_var": float(is_var(exact)),
        "variance_reduction": float(uniform / is_var(bound)),
        "optimal_variance_reduction": float(uniform / is_var(exact)),
        "relative_bias_of_zero_scores": bias(bound),
        "tau_estimate": tau_from_scores(bound),
        "tau_exact_scores": tau_from_scores(exact),
    }


def warm_start(task: dict, seconds: float, batch: int, lr: float = 3e-3) -> None:
    """Train uniformly for ``seconds`` and store the weights as every run's starting point: the race
    then happens later in training, where many examples are already easy."""
    with tempfile.TemporaryDirectory() as tmp:
        r = run(task, "uniform", lr, 1234, seconds, batch, tmp)
    task["init_state"] = {k: v.detach().clone() for k, v in r["model"].state_dict().items()}
    task["warm_start"] = {"seconds": seconds, "lr": lr, "train_loss": r["final_train_loss"], "steps": r["steps"]}


def bench_task(task: dict, lrs: list[float], seeds: int, budget: float, batch: int, log, methods=METHODS) -> dict:
    out: dict = {"task": task["name"], "budget_s": budget, "batch_size": batch, "lr_grid": lrs, "methods": {}}
    out["warm_start"] = task.get("warm_start")
    grid: dict[str, list[dict]] = {m: [] for m in methods}
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Interleave the methods (A B C A B C ...) so that machine noise hits them alike.
        for lr in lrs:
            for method in methods:
                r = run(task, method, lr, 0, budget, batch, tmp)
                log(
                    f"  {task['name']:16s} {method:16s} lr={lr:<7g} seed=0 loss={r['final_train_loss']:.4f} "
                    f"err={r['final_test_error']:.4f} steps={r['steps']}"
                )
                grid[method].append(r)
        for method in methods:
            runs[method] = [min(grid[method], key=lambda r: r["final_train_loss"])]
        uniform_best = runs["uniform"][0]
        out["variance_end_of_uniform_run"] = gradient_variance(uniform_best["model"], task, batch, 3 * batch)
        for seed in range(1, seeds):
            for method in methods:
                r = run(task, method, runs[method][0]["lr"], seed, budget, batch, tmp)
                log(
                    f"  {task['name']:16s} {method:16s} lr={r['lr']:<7g} seed={seed} "
                    f"loss={r['final_train_loss']:.4f} err={r['final_test_error']:.4f} steps={r['steps']}"
                )
                runs[method].append(r)
    for method in methods:
        for r in grid[method] + runs[method]:
            r.pop("model", None)
        out["methods"][method] = {
            "best_lr": runs[method][0]["lr"],
            "grid": [{"lr": r["lr"], "final_train_loss": r["final_train_loss"]} for r in grid[method]],
            "runs": runs[method],
        }
    torch.manual_seed(0)
    init_model = BenchModel(task["config"])
    if "init_state" in task:
        init_model.load_state_dict(task["init_state"])
    out["variance_at_init"] = gradient_variance(init_model, task, batch, 3 * batch)
    uni = out["methods"]["uniform"]
    target = statistics.median(r["final_train_loss"] for r in uni["runs"])
    out["target_train_loss"] = target
    spu = statistics.median(r["seconds_per_step"] for r in uni["runs"])
    for m in out["methods"].values():
        times = [time_to_reach(r["curve"], target) for r in m["runs"]]
        reached = [t for t in times if t is not None]
        m["time_to_target"] = times
        m["median_time_to_target"] = statistics.median(reached) if len(reached) * 2 > len(times) else None
        m["median_final_train_loss"] = statistics.median(r["final_train_loss"] for r in m["runs"])
        m["median_final_test_error"] = statistics.median(r["final_test_error"] for r in m["runs"])
        m["step_cost_ratio"] = statistics.median(r["seconds_per_step"] for r in m["runs"]) / spu
    t_uni = uni["median_time_to_target"]
    for m in out["methods"].values():
        t = m["median_time_to_target"]
        m["time_ratio_vs_uniform"] = t / t_uni if (t is not None and t_uni) else None
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    colors = {
        "uniform": "tab:blue",
        "importance": "tab:red",
        "importance_eager": "tab:orange",
        "importance_presample2": "tab:purple",
        "importance_fp32_score": "tab:brown",
        "constant_time": "tab:green",
    }
    for row, res in zip(axes, results, strict=True):
        for col, key in enumerate(("train_loss", "test_error")):
            ax = row[col]
            for method, m in res["methods"].items():
                for i, r in enumerate(m["runs"]):
                    t = [p["time"] for p in r["curve"]]
                    v = [p[key] for p in r["curve"]]
                    label = f"{method} (lr {m['best_lr']:g})" if i == 0 else None
                    ax.plot(t, v, color=colors[method], alpha=0.8, lw=1.2, label=label)
            if key == "train_loss":
                ax.axhline(res["target_train_loss"], color="gray", ls=":", lw=1, label="target (uniform's final)")
                ax.set_yscale("log")
            ax.set_xlabel("training wall-clock (s)")
            ax.set_ylabel(key.replace("_", " "))
            ax.set_title(f"{res['task']}: {key.replace('_', ' ')}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the paper's regime (main case) ----------------------------------------------------------------
# A half-decade grid with 0.2 between 0.1 and 0.3: at 60 s uniform is best at 0.1 (at 0.2 it oscillates near
# 0.1-0.15, at 0.3 it diverges) and importance sampling at 0.2 (at 0.3 it ends 1000x higher); without 0.2 both
# sat at 0.1, below importance sampling's best. With 0.03 at the top, both arms sat at that edge.
PAPER = dict(
    train=10_000, test=10_000, hidden=512, batch=128, warm_steps=1334, warm_lr=0.03, lrs=[0.01, 0.03, 0.1, 0.2, 0.3]
)
PAPER_QUICK = dict(train=2_000, test=2_000, hidden=128, batch=64, warm_steps=100, warm_lr=0.03, lrs=[0.05])


def paper_task(quick: bool) -> dict:
    """Fashion-MNIST, the first ``train`` training images flattened to 784 features, and the MLP
    784-512-512-10 of the paper's image-classification experiment."""
    cfg = PAPER_QUICK if quick else PAPER
    root = asset_path("fashion_mnist")

    def tensors(prefix: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(_read_idx(root / f"{prefix}-images-idx3-ubyte.gz")[:n].copy()).float()
        images = images.reshape(images.shape[0], -1).div_(255.0).sub_(0.2860).div_(0.3530)
        labels = torch.from_numpy(_read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")[:n].copy()).long()
        return images, labels

    x, y = tensors("train", cfg["train"])
    xt, yt = tensors("t10k", cfg["test"])
    return {
        "name": f"fashion_mnist_{len(x)}_mlp",
        "train": TensorDictDataset(features=x, labels=y),
        "eval_train": {"features": x, "labels": y},  # the whole training set: its training loss
        "eval_test": {"features": xt, "labels": yt},
        "config": BenchConfig(arch="mlp2", in_dim=784, hidden=cfg["hidden"], num_labels=10),
        "settings": cfg,
    }


TEXT = dict(train=10_000, hidden=512, batch=128, warm_steps=780, warm_lr=0.03, lrs=[0.03, 0.1])
TEXT_QUICK = dict(train=900, hidden=128, batch=64, warm_steps=50, warm_lr=0.03, lrs=[0.05])


def text_task(quick: bool) -> dict:
    """Rotten Tomatoes sentiment (10,000 train / 2,808 test review snippets): a classifier
    384-512-512-2 over frozen all-MiniLM-L6-v2 sentence embeddings (computed once and cached), run
    like the paper case (warm start of 780 uniform steps = 10 epochs, equal CPU budgets)."""
    cfg = TEXT_QUICK if quick else TEXT
    ds = load_rotten_tomatoes().shuffle(seed=0)
    n = 1200 if quick else len(ds)
    emb, labels = _minilm_embeddings(ds["text"][:n], quick), torch.tensor(ds["label"][:n])
    x, y, xt, yt = emb[: cfg["train"]], labels[: cfg["train"]], emb[cfg["train"] :], labels[cfg["train"] :]
    return {
        "name": f"rotten_tomatoes_{len(x)}_minilm_mlp",
        "train": TensorDictDataset(features=x, labels=y),
        "eval_train": {"features": x, "labels": y},
        "eval_test": {"features": xt, "labels": yt},
        "config": BenchConfig(arch="mlp2", in_dim=emb.shape[1], hidden=cfg["hidden"], num_labels=2),
        "settings": cfg,
    }


class CpuClock(TrainerCallback):
    """Stops training after ``budget`` seconds of this process's CPU time (one thread: the work done,
    whatever else the machine runs); evaluates every ``every`` seconds with the clock paused; keeps
    the CPU time of every step, split by whether it was importance-sampled."""

    def __init__(self, budget: float, every: float, evaluate, trainer=None):
        self.budget, self.every, self.evaluate, self.trainer = budget, every, evaluate, trainer
        self.points: list[dict] = []
        self.elapsed, self.next_eval, self.steps = 0.0, 0.0, 0
        self.step_costs: dict[str, list[float]] = {"uniform": [], "active": []}
        self.distinct_rows: list[int] = []

    def on_train_begin(self, args, state, control, **kw):
        self._record(kw["model"])
        self.start = time.process_time()

    def on_step_end(self, args, state, control, **kw):
        cost = time.process_time() - self.start
        self.elapsed += cost
        self.steps = state.global_step
        is_state = getattr(self.trainer, "is_state", None)
        active = is_state is not None and is_state.last_presample > 0
        self.step_costs["active" if active else "uniform"].append(cost)
        if active:
            self.distinct_rows.append(is_state.last_trained)
        if self.elapsed >= self.next_eval or self.elapsed >= self.budget:
            self._record(kw["model"])
        if self.elapsed >= self.budget:
            control.should_training_stop = True
        self.start = time.process_time()

    def on_train_end(self, args, state, control, **kw):
        if self.points[-1]["steps"] != self.steps:  # a run stopped by max_steps: its final point
            self._record(kw["model"])

    def _record(self, model):
        loss, err = self.evaluate(model)
        is_state = getattr(self.trainer, "is_state", None)
        self.points.append(
            {
                "time": self.elapsed,
                "steps": self.steps,
                "train_loss": loss,
                "test_error": err,
                "tau": is_state.tau if is_state is not None else None,
            }
        )
        self.next_eval = self.elapsed + self.every


def make_chunked_evaluator(task: dict, chunk: int = 2500):
    def evaluate(model) -> tuple[float, float]:
        was = model.training
        model.eval()
        with torch.no_grad():
            tr, te = task["eval_train"], task["eval_test"]
            total = 0.0
            for i in range(0, len(tr["labels"]), chunk):
                logits = model(features=tr["features"][i : i + chunk]).logits
                total += float(F.cross_entropy(logits, tr["labels"][i : i + chunk], reduction="sum"))
            wrong = 0
            for i in range(0, len(te["labels"]), chunk):
                pred = model(features=te["features"][i : i + chunk]).logits.argmax(-1)
                wrong += int((pred != te["labels"][i : i + chunk]).sum())
        model.train(was)
        return total / len(tr["labels"]), wrong / len(te["labels"])

    return evaluate


def record_grad_norms(trainer: Trainer) -> list[float]:
    """The list that will hold the pre-clipping gradient norm of every optimizer step of ``trainer``
    (the norm the Trainer computes anyway, whether or not ``max_grad_norm`` clips)."""
    norms: list[float] = []
    get = trainer._get_grad_norm

    def recorded(model, grad_norm=None):
        value = get(model, grad_norm=grad_norm)
        norms.append(float(value))
        return value

    trainer._get_grad_norm = recorded
    return norms


def clip_fraction(grad_norms: list[float], max_grad_norm: float) -> float | None:
    """Fraction of steps whose gradient ``max_grad_norm`` clipped (norm above it); ``None`` without steps,
    0 when clipping is off (``max_grad_norm <= 0``)."""
    if not grad_norms:
        return None
    if max_grad_norm <= 0:
        return 0.0
    return sum(n > max_grad_norm for n in grad_norms) / len(grad_norms)


def paper_run(
    task: dict, method: str, lr: float, seed: int, budget: float, out_dir: str, max_steps: int | None = None
) -> dict:
    """One arm: SGD with momentum 0.9 at a constant ``lr`` from the shared warm start."""
    torch.manual_seed(seed)
    model = BenchModel(task["config"])
    if "init_state" in task:
        model.load_state_dict(task["init_state"])
    common = _trainer_settings(out_dir, task["settings"]["batch"], lr, seed, max_steps or 10**7,
                               remove_unused_columns=False)  # the columns are the model's inputs
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    kw = dict(model=model, train_dataset=task["train"], data_collator=collate, optimizers=(optimizer, None))
    if method == "uniform":
        trainer = Trainer(args=TrainingArguments(**common), **kw)
    else:
        trainer = ImportanceSamplingTrainer(args=ImportanceSamplingConfig(**common, **METHOD_ARGS[method]), **kw)
    clock = CpuClock(budget, budget / 15, make_chunked_evaluator(task), trainer if method != "uniform" else None)
    trainer.add_callback(clock)
    grad_norms = record_grad_norms(trainer)
    trainer.train()
    result = {
        "method": method,
        "lr": lr,
        "seed": seed,
        "steps": clock.steps,
        "cpu_time": clock.elapsed,
        "clip_fraction": clip_fraction(grad_norms, trainer.args.max_grad_norm),
        "median_grad_norm": statistics.median(grad_norms) if grad_norms else None,
        "curve": clock.points,
        "final_train_loss": clock.points[-1]["train_loss"],
        "final_test_error": clock.points[-1]["test_error"],
        "uniform_step_s": statistics.median(clock.step_costs["uniform"]) if clock.step_costs["uniform"] else None,
        "active_step_s": statistics.median(clock.step_costs["active"]) if clock.step_costs["active"] else None,
        "active_fraction": len(clock.step_costs["active"]) / max(clock.steps, 1),
        "mean_distinct_rows": statistics.fmean(clock.distinct_rows) if clock.distinct_rows else None,
    }
    if method != "uniform":
        result["final_tau"] = trainer.is_state.tau
    result["model"] = model
    return result


def bench_paper(task: dict, methods: tuple[str, ...], budget: float, seeds: int, log) -> dict:
    """Grid of learning rates at seed 0 for every arm (interleaved), then more seeds at each arm's best."""
    cfg = task["settings"]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.process_time()
        warm = paper_run(task, "uniform", cfg["warm_lr"], 1234, float("inf"), tmp, max_steps=cfg["warm_steps"])
        task["init_state"] = {k: v.detach().clone() for k, v in warm["model"].state_dict().items()}
        warm_info = {
            "steps": warm["steps"],
            "lr": cfg["warm_lr"],
            "train_loss": warm["final_train_loss"],
            "test_error": warm["final_test_error"],
            "cpu_s": time.process_time() - t0,
        }
        log(f"  warm start: {warm_info}")
        grid: dict[str, list[dict]] = {m: [] for m in methods}
        for lr in cfg["lrs"]:
            for method in methods:
                r = paper_run(task, method, lr, 0, budget, tmp)
                log(
                    f"  {method:12s} lr={lr:<6g} seed=0 loss={r['final_train_loss']:.5f} "
                    f"err={r['final_test_error']:.4f} steps={r['steps']} active={r['active_fraction']:.2f} "
                    f"clipped={r['clip_fraction'] or 0:.2f}"
                )
                r.pop("model")
                grid[method].append(r)
        runs = {m: [min(grid[m], key=lambda r: r["final_train_loss"])] for m in methods}
        for seed in range(1, seeds):
            for method in methods:
                r = paper_run(task, method, runs[method][0]["lr"], seed, budget, tmp)
                log(
                    f"  {method:12s} lr={r['lr']:<6g} seed={seed} loss={r['final_train_loss']:.5f} "
                    f"err={r['final_test_error']:.4f} steps={r['steps']} active={r['active_fraction']:.2f} "
                    f"clipped={r['clip_fraction'] or 0:.2f}"
                )
                r.pop("model")
                runs[method].append(r)
    out: dict = {
        "task": task["name"],
        "settings": {**cfg, "budget_cpu_s": budget, "seeds": seeds, "optimizer": "SGD momentum 0.9, constant lr"},
        "warm_start": warm_info,
        "methods": {},
    }
    uniform_runs = runs["uniform"]
    uniform_step = statistics.median(r["uniform_step_s"] for r in uniform_runs)
    for method in methods:
        m = {
            "best_lr": runs[method][0]["lr"],
            "grid": [{"lr": r["lr"], "final_train_loss": r["final_train_loss"]} for r in grid[method]],
            "runs": runs[method],
            "median_final_train_loss": statistics.median(r["final_train_loss"] for r in runs[method]),
            "median_final_test_error": statistics.median(r["final_test_error"] for r in runs[method]),
        }
        # Per seed: the time to reach uniform's final training loss of the same seed, over uniform's.
        ratios = []
        for r, u in zip(runs[method], uniform_runs, strict=True):
            target = u["final_train_loss"]
            t, t_u = time_to_reach(r["curve"], target), time_to_reach(u["curve"], target)
            ratios.append(t / t_u if (t is not None and t_u) else None)
        m["time_ratio_per_seed"] = ratios
        reached = [x for x in ratios if x is not None]
        m["mean_time_ratio"] = statistics.fmean(reached) if len(reached) == len(ratios) else None
        active = [r["active_step_s"] for r in runs[method] if r["active_step_s"] is not None]
        m["active_step_cost_ratio"] = statistics.median(active) / uniform_step if active else None
        m["mean_step_cost_ratio"] = statistics.fmean(
            r["cpu_time"] / max(r["steps"], 1) for r in runs[method]
        ) / statistics.fmean(r["cpu_time"] / max(r["steps"], 1) for r in uniform_runs)
        m["active_fraction"] = statistics.fmean(r["active_fraction"] for r in runs[method])
        rows = [r["mean_distinct_rows"] for r in runs[method] if r["mean_distinct_rows"] is not None]
        m["mean_distinct_rows"] = statistics.fmean(rows) if rows else None
        clipped = [r["clip_fraction"] for r in runs[method] if r["clip_fraction"] is not None]
        m["clip_fraction"] = statistics.fmean(clipped) if clipped else None
        out["methods"][method] = m
    return out


def print_paper(res: dict) -> None:
    print(f"\n{res['task']}: {res['settings']}")
    print(
        f"{'method':22s} {'lr':>6s} {'train loss':>10s} {'test err':>8s} {'t->unif final (per seed)':>26s} "
        f"{'mean':>6s} {'active step':>11s} {'mean step':>9s} {'active':>6s} {'rows':>5s} {'clipped':>7s}"
    )
    for method, m in res["methods"].items():
        per_seed = " ".join(f"{x:.2f}" if x is not None else "never" for x in m["time_ratio_per_seed"])
        mean = f"{m['mean_time_ratio']:.2f}" if m["mean_time_ratio"] is not None else "-"
        act = f"{m['active_step_cost_ratio']:.2f}x" if m["active_step_cost_ratio"] is not None else "-"
        rows = f"{m['mean_distinct_rows']:.0f}" if m["mean_distinct_rows"] is not None else "-"
        clipped = f"{m['clip_fraction']:.2f}" if m.get("clip_fraction") is not None else "-"
        print(
            f"{method:22s} {m['best_lr']:6g} {m['median_final_train_loss']:10.5f} {m['median_final_test_error']:8.4f} "
            f"{per_seed:>26s} {mean:>6s} {act:>11s} {m['mean_step_cost_ratio']:8.2f}x {m['active_fraction']:6.2f} "
            f"{rows:>5s} {clipped:>7s}"
        )


def plot_paper(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    colors = {
        "uniform": "tab:blue",
        "importance": "tab:red",
        "importance_eager": "tab:orange",
        "importance_presample2": "tab:purple",
        "importance_fp32_score": "tab:brown",
        "constant_time": "tab:green",
    }
    for method, m in res["methods"].items():
        for i, r in enumerate(m["runs"]):
            t = [p["time"] for p in r["curve"]]
            label = f"{method} (lr {m['best_lr']:g})" if i == 0 else None
            axes[0].plot(t, [p["train_loss"] for p in r["curve"]], color=colors[method], lw=1.2, label=label)
            axes[1].plot(t, [p["test_error"] for p in r["curve"]], color=colors[method], lw=1.2, label=label)
            if method != "uniform":
                axes[2].plot(t, [p["tau"] for p in r["curve"]], color=colors[method], lw=1.2, label=label)
    axes[0].set_yscale("log")
    for ax, name in zip(axes, ("training loss (10k)", "test error", "smoothed tau"), strict=True):
        ax.set_xlabel("process CPU time (s)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(res["task"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: small subsets, one seed, seconds")
    parser.add_argument(
        "--case",
        choices=("paper", "text", "short"),
        default="paper",
        help="paper: Fashion-MNIST 10k, MLP 784-512-512-10, SGD momentum, warm start, equal CPU-time budgets "
        "(the main case); text: the same protocol for a Rotten Tomatoes classifier on frozen MiniLM "
        "embeddings; short: the short-budget tasks (--tasks)",
    )
    parser.add_argument("--budget", type=float, default=60.0, help="paper and text cases: CPU seconds per arm")
    parser.add_argument(
        "--seeds", type=int, default=3, help="paper and text cases: seeds at each arm's best learning rate"
    )
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=None, help="paper and text cases: the learning-rate grid"
    )
    parser.add_argument("--tasks", nargs="+", default=["fashion_mnist", "rotten_tomatoes"])
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON report (default: results/bench_importance_sampling[_short].json)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--warm-start", type=float, default=0.0, help="seconds of uniform training every run starts from (0 = none)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=METHODS,
        help="arms (uniform always runs); default: paper case uniform importance, short case all but "
        "importance_presample2 and importance_fp32_score",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.case in ("paper", "text"):
        return main_paper(args)
    chosen = args.methods or [m for m in METHODS if m not in ("importance_presample2", "importance_fp32_score")]
    methods = ("uniform", *[m for m in chosen if m != "uniform"])  # uniform sets the target
    if args.out is None:
        args.out = Path("results/bench_importance_sampling_short.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    settings = {
        "fashion_mnist": dict(lrs=[1e-3, 3e-3], seeds=3, budget=10.0, batch=64),
        "rotten_tomatoes": dict(lrs=[1e-3, 3e-3], seeds=3, budget=5.0, batch=32),
    }
    if args.quick:
        settings = {
            "fashion_mnist": dict(lrs=[3e-3], seeds=1, budget=1.5, batch=32),
            "rotten_tomatoes": dict(lrs=[3e-3], seeds=1, budget=1.0, batch=32),
        }
    builders = {"fashion_mnist": fashion_mnist_task, "rotten_tomatoes": rotten_tomatoes_task}
    results, skipped = [], {}
    for name in args.tasks:
        try:
            task = builders[name](args.quick)
        except AssetMissingError as err:
            skipped[name] = str(err).splitlines()[0]
            print(f"skipping {name}: {skipped[name]}")
            continue
        s = settings[name]
        if args.warm_start > 0:
            warm_start(task, args.warm_start, s["batch"])
            print(f"  {name}: warm start from {task['warm_start']}")
        results.append(bench_task(task, s["lrs"], s["seeds"], s["budget"], s["batch"], print, methods))

    print(
        f"\n{'task':16s} {'method':16s} {'lr':>7s} {'loss':>8s} {'err':>7s} {'cost/step':>9s} "
        f"{'t->target':>9s} {'vs unif':>7s} {'active':>6s}"
    )
    for res in results:
        for method, m in res["methods"].items():
            t, ratio = m["median_time_to_target"], m["time_ratio_vs_uniform"]
            active = statistics.median(r.get("active_fraction", 0.0) for r in m["runs"])
            print(
                f"{res['task']:16s} {method:16s} {m['best_lr']:7g} {m['median_final_train_loss']:8.4f} "
                f"{m['median_final_test_error']:7.4f} {m['step_cost_ratio']:9.2f} "
                f"{(f'{t:.1f}s' if t is not None else 'never'):>9s} "
                f"{(f'{ratio:.2f}x' if ratio is not None else '-'):>7s} {active:6.2f}"
            )
        for when in ("variance_at_init", "variance_end_of_uniform_run"):
            v = res[when]
            print(
                f"{res['task']:16s} {when}: variance reduction {v['variance_reduction']:.2f}x "
                f"(optimal {v['optimal_variance_reduction']:.2f}x), tau {v['tau_estimate']:.2f}"
            )

    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "quick": args.quick,
        "methods": list(methods),
        "skipped": skipped,
        "results": results,
    }
    args.out.write_text(
        json.dumps(report, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    )
    try:
        plot(results, args.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is missing: no plot")
    print(f"\nthreads {torch.get_num_threads()}, torch {torch.__version__}, {cpu_model()}; wrote {args.out}")
    return 0


def main_paper(args: argparse.Namespace) -> int:
    suffix = "" if args.case == "paper" else f"_{args.case}"
    out = args.out or Path(f"results/bench_importance_sampling{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    methods = ("uniform", *[m for m in (args.methods or ["importance"]) if m != "uniform"])
    budget, seeds = (3.0, 1) if args.quick else (args.budget, args.seeds)
    try:
        task = paper_task(args.quick) if args.case == "paper" else text_task(args.quick)
    except AssetMissingError as err:
        print(f"skipping the {args.case} case: {str(err).splitlines()[0]}")
        return 1
    if args.lrs:
        task["settings"] = {**task["settings"], "lrs": list(args.lrs)}
    start = time.perf_counter()
    res = bench_paper(task, methods, budget, seeds, print)
    print_paper(res)
    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "quick": args.quick,
        "wall_s": time.perf_counter() - start,
        "result": res,
    }
    out.write_text(json.dumps(report, indent=1, default=str))
    try:
        plot_paper(res, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is missing: no plot")
    print(f"\nthreads {torch.get_num_threads()}, torch {torch.__version__}, {cpu_model()}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
