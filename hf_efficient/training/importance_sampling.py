"""Importance-sampled training as a drop-in :class:`transformers.Trainer`.

The algorithm of Katharopoulos & Fleuret, "Not All Samples Are Created Equal: Deep Learning with
Importance Sampling" (ICML 2018):

1. while the smoothed variance-reduction estimate ``tau`` is at most ``tau_th``, train on the
   uniform batch the dataloader gives and update ``tau`` from the scores of the last ``B`` uniformly
   drawn samples, this batch's included (free: they come from the training forward passes);
2. once ``tau > tau_th``: presample ``B = presample * b`` examples uniformly (the dataloader's
   batch and ``B - b`` more drawn from the training set), score them with one
   forward pass without gradients (in bfloat16 where the hardware multiplies bfloat16 natively,
   ``score_dtype``: only the sampling distribution changes, the weights follow it), resample
   ``b`` of them with replacement, ``p_i`` proportional to the score, and minimise the loss
   weighted by ``w_i = 1 / (B p_i)``, which keeps the gradient
   unbiased; a row drawn ``c`` times is trained once with weight ``c / (B p_i)`` (the same
   gradient, less work); ``tau`` is updated from the presample's scores.

The default score is the paper's upper bound on the per-sample gradient norm: the norm of the
loss gradient w.r.t. the logits, ``||softmax(z) - onehot(y)||`` for cross-entropy.

The trainer computes the training loss itself from the model's ``logits`` (cross-entropy for
classification, token classification and causal LM, squared error for regression, or a user
``per_sample_loss``), so it never depends on how a model treats ``num_items_in_batch``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import has_length

from .scores import (
    IGNORE_INDEX,
    LOSS_KINDS,
    SCORES,
    PerSampleLoss,
    autograd_logit_gradient_norm,
    check_logits_labels,
    cross_entropy_gradient_norm,
    cross_entropy_losses_tail_accurate,
    default_tau_threshold,
    importance_sample,
    per_sample_losses,
    tau_from_scores,
    weighted_loss,
)

__all__ = [
    "ImportanceSamplingCallback",
    "ImportanceSamplingConfig",
    "ImportanceSamplingState",
    "ImportanceSamplingStateCallback",
    "ImportanceSamplingTrainer",
]

STATE_NAME = "importance_sampling_state_{rank}.json"
#: Precisions of the scoring forward (``ImportanceSamplingConfig.score_dtype``).
SCORE_DTYPES = ("auto", "model", "bfloat16", "float16")
_MASK64 = (1 << 64) - 1


@dataclass
class ImportanceSamplingConfig(TrainingArguments):
    """:class:`~transformers.TrainingArguments` plus the knobs of importance sampling.

    ``per_device_train_batch_size`` is ``b``, the number of samples trained on per step; the
    presample is ``B = round(presample * b)``.
    """

    presample: float = field(
        default=3.0, metadata={"help": "B / b: how many examples are scored per trained example (>= 1)."}
    )
    score: str = field(
        default="gradient_norm_bound",
        metadata={"help": f"importance score, one of {', '.join(SCORES)}."},
    )
    tau_threshold: float | None = field(
        default=None,
        metadata={
            "help": "importance sampling is on while the smoothed tau exceeds this; None = (B + (1 + c) b) / "
            "((1 + c) b) with c = backward_cost, or 2.0 with constant_time. float('inf') never turns it on."
        },
    )
    tau_smoothing: float = field(
        default=0.9, metadata={"help": "momentum of the exponential moving average of tau, in [0, 1)."}
    )
    constant_time: bool = field(
        default=False,
        metadata={
            "help": "keep the per-step cost of uniform training: trade the trained batch size against the "
            "presample size from the current tau (the reference code's constant-time variant)."
        },
    )
    backward_cost: float = field(
        default=2.0,
        metadata={
            "help": "cost of a backward pass in forward passes (default threshold, speedup estimate, constant time)."
        },
    )
    constant_time_ratio: float = field(
        default=0.5, metadata={"help": "constant time: share of the saved backward budget spent on scoring."}
    )
    min_train_fraction: float = field(
        default=0.2, metadata={"help": "constant time: smallest trained batch, as a fraction of b."}
    )
    loss_kind: str | None = field(
        default=None,
        metadata={"help": f"one of {', '.join(LOSS_KINDS)}; None detects it from the model and the batch."},
    )
    score_batch_size: int | None = field(
        default=None, metadata={"help": "forward batch size when scoring the presample; None = all at once."}
    )
    score_dtype: str = field(
        default="auto",
        metadata={
            "help": f"precision of the presample's scoring forward, one of {', '.join(SCORE_DTYPES)}: 'auto' = "
            "bfloat16 autocast for a float32 model on a device with native bfloat16 matrix products (CUDA with "
            "bf16, a CPU with AVX512-BF16 or AMX), else the model's own; 'model' = never cast. Only the "
            "sampling distribution is affected: the weights 1 / (B p) keep the loss unbiased, and training "
            "runs in the model's precision."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.presample, (int, float)) and math.isfinite(self.presample) and self.presample >= 1):
            raise ValueError(f"presample must be a finite number >= 1 (B / b), got {self.presample!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.tau_threshold is not None and not (self.tau_threshold >= 1.0):
            raise ValueError(f"tau_threshold must be >= 1 (tau is always >= 1) or None, got {self.tau_threshold!r}")
        if not 0.0 <= self.tau_smoothing < 1.0:
            raise ValueError(f"tau_smoothing must be in [0, 1), got {self.tau_smoothing!r}")
        if not self.backward_cost > 0:
            raise ValueError(f"backward_cost must be > 0, got {self.backward_cost!r}")
        if not 0.0 <= self.constant_time_ratio <= 1.0:
            raise ValueError(f"constant_time_ratio must be in [0, 1], got {self.constant_time_ratio!r}")
        if not 0.0 < self.min_train_fraction <= 1.0:
            raise ValueError(f"min_train_fraction must be in (0, 1], got {self.min_train_fraction!r}")
        if self.loss_kind is not None and self.loss_kind not in LOSS_KINDS:
            raise ValueError(f"loss_kind must be None or one of {', '.join(LOSS_KINDS)}, got {self.loss_kind!r}")
        if self.score_batch_size is not None and self.score_batch_size < 1:
            raise ValueError(f"score_batch_size must be >= 1 or None, got {self.score_batch_size!r}")
        if self.score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype must be one of {', '.join(SCORE_DTYPES)}, got {self.score_dtype!r}")
        # tau = sqrt(n) ||g|| <= sqrt(n) for n scores: a threshold at or above sqrt(B) would leave
        # importance sampling off for ever without saying so (the paper's (B + 3b) / (3b) does for b = 1).
        ceiling = math.sqrt(self.presample_size)
        threshold = self.resolved_tau_threshold
        if math.isfinite(threshold) and threshold >= ceiling:
            raise ValueError(
                f"tau_threshold {threshold:.4g} can never be reached: tau is estimated from B = {self.presample_size} "
                f"scores and never exceeds sqrt(B) = {ceiling:.4g} (per_device_train_batch_size="
                f"{self.per_device_train_batch_size}, presample={self.presample}, backward_cost={self.backward_cost}); "
                "pass a lower tau_threshold, a larger presample, or tau_threshold=float('inf') to keep it off"
            )

    @property
    def presample_size(self) -> int:
        """``B``, the number of examples scored per step (standard variant)."""
        return max(int(round(self.presample * self.per_device_train_batch_size)), 1)

    @property
    def resolved_tau_threshold(self) -> float:
        """The threshold in use: the user's, else eq. 29 of the paper with this ``backward_cost``
        (2.0 for constant time, as in the reference code)."""
        if self.tau_threshold is not None:
            return float(self.tau_threshold)
        if self.constant_time:
            return 2.0
        return default_tau_threshold(self.presample_size, self.per_device_train_batch_size, self.backward_cost)


@dataclass
class ImportanceSamplingState:
    """What importance sampling remembers between steps; saved as JSON in each checkpoint."""

    tau: float = 0.0  # EMA of tau; starts at 0 like the reference code, so the first steps are uniform
    last_tau: float = 1.0  # the unsmoothed estimate of the latest step
    steps: int = 0  # training micro-steps seen
    active_steps: int = 0  # of which importance-sampled
    logged_steps: int = 0  # micro-steps at the last log
    logged_active_steps: int = 0
    last_presample: int = 0  # B and the number of distinct rows trained at the latest step
    last_trained: int = 0
    # The latest B scores of uniformly drawn samples (the last presample, then the uniform batches
    # since): tau is estimated from B scores in both phases, so a batch of one can switch on.
    recent_scores: list[float] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImportanceSamplingState:
        """Rebuild from :func:`dataclasses.asdict` output; a dict with unknown keys is refused."""
        if not isinstance(values, dict):
            raise TypeError(f"importance-sampling state must be a dict, got {type(values).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown importance-sampling state fields {unknown}; accepted: {sorted(known)}")
        return cls(**{k: (list(v) if k == "recent_scores" else v) for k, v in values.items()})


class ImportanceSamplingCallback(TrainerCallback):
    """A :class:`~transformers.TrainerCallback` that also sees the per-sample scores of every step.

    Override :meth:`on_importance_scores`; the trainer calls it on every callback that defines it.
    """

    def on_importance_scores(
        self,
        args: TrainingArguments,
        state: Any,
        control: Any,
        *,
        scores: torch.Tensor,
        is_active: bool,
        tau: float,
        indices: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """``scores (n,)``: of the presample (``n = B``) when ``is_active``, else of the uniform
        trained batch; ``indices (m,)`` / ``weights (m,)``: the ``m`` draws (with repeats) from the
        presample and their unbiasing weights ``1 / (B p)`` (``None`` when uniform; repeated rows are
        then trained once with their weights summed); ``tau``: the smoothed estimate."""


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (faster than float32): CUDA with bf16
    support, or a CPU with AVX512-BF16 or AMX tiles."""
    return _native_bfloat16(device.type)


@functools.lru_cache(maxsize=8)
def _native_bfloat16(device_type: str) -> bool:
    try:
        if device_type == "cuda":
            return bool(torch.cuda.is_bf16_supported())
        if device_type == "cpu":
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch build without these checks: assume not
        return False
    return False


def scoring_autocast_dtype(setting: str, model: nn.Module, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the scoring forward for ``setting`` (see ``score_dtype``), or ``None``
    for the model's own precision."""
    if setting == "model":
        return None
    if setting in ("bfloat16", "float16"):
        return getattr(torch, setting)
    if setting != "auto":
        raise ValueError(f"score_dtype must be one of {', '.join(SCORE_DTYPES)}, got {setting!r}")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None or param.dtype != torch.float32 or not native_bfloat16(device):
        return None
    return torch.bfloat16


@functools.lru_cache(maxsize=64)
def _forward_requires_labels(model_type: type) -> bool:
    """Whether ``model_type.forward`` has a ``labels`` parameter without a default."""
    try:
        parameter = inspect.signature(model_type.forward).parameters.get("labels")
    except (TypeError, ValueError):  # a forward without an inspectable signature
        return False
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return parameter is not None and parameter.default is inspect.Parameter.empty and parameter.kind not in variadic


class ImportanceSamplingTrainer(Trainer):
    """:class:`transformers.Trainer` that trains with importance sampling (see the module docstring).

    Args:
        args: an :class:`ImportanceSamplingConfig`.
        per_sample_loss: optional ``fn(logits, labels) -> (losses (batch,), items (batch,))`` for a
            loss the trainer does not know; its scores use one batched backward w.r.t. the logits.
        *args, **kwargs: as for :class:`transformers.Trainer`.
    """

    def __init__(self, *args: Any, per_sample_loss: PerSampleLoss | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, ImportanceSamplingConfig):
            raise TypeError(
                f"ImportanceSamplingTrainer needs args=ImportanceSamplingConfig(...), got {type(self.args).__name__}"
            )
        if self.compute_loss_func is not None or self.label_smoother is not None:
            raise ValueError(
                "ImportanceSamplingTrainer computes per-sample losses itself; pass per_sample_loss=fn instead "
                "of compute_loss_func, and leave label_smoothing_factor at 0"
            )
        if per_sample_loss is not None and not callable(per_sample_loss):
            raise TypeError(f"per_sample_loss must be callable, got {type(per_sample_loss).__name__}")
        self.per_sample_loss = per_sample_loss
        # The state lives in a stateful callback: checkpoints carry it in trainer_state.json.
        self.add_callback(ImportanceSamplingStateCallback())
        # Our own generator: the presample and the resampling never disturb the global RNG streams
        # (dropout, the dataloader's shuffling). It is re-seeded at every step from (seed, process,
        # step), so a resumed run draws exactly what an uninterrupted one would.
        self.is_generator = torch.Generator()
        self._presample_dataset: Any = None
        self._presample_collator: Any = None

    @property
    def _state_callback(self) -> ImportanceSamplingStateCallback:
        # Looked up each time: a resume with restore_callback_states_from_checkpoint replaces it.
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ImportanceSamplingStateCallback):
                return callback
        raise RuntimeError("the ImportanceSamplingStateCallback was removed from the trainer; add it back")

    @property
    def is_state(self) -> ImportanceSamplingState:
        """The importance-sampling state (tau, counters), checkpointed with the trainer state."""
        return self._state_callback.is_state

    @is_state.setter
    def is_state(self, value: ImportanceSamplingState) -> None:
        self._state_callback.is_state = value

    def _seed_generator(self) -> None:
        """Seed ``is_generator`` from the run's seed, this process and the micro-step count."""
        x = (int(self.args.seed) * 0x9E3779B97F4A7C15) & _MASK64
        x ^= (int(self.args.process_index) + 1) * 0xBF58476D1CE4E5B9 & _MASK64
        x ^= (int(self.is_state.steps) * 0x94D049BB133111EB) & _MASK64
        self.is_generator.manual_seed(x & ((1 << 63) - 1))

    # ---- data -----------------------------------------------------------------------------------
    def get_train_dataloader(self):  # noqa: D102 - the stock loader paces epochs; presamples come from here
        dataloader = super().get_train_dataloader()
        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, torch.utils.data.IterableDataset) or not has_length(dataset):
            raise ValueError(
                "ImportanceSamplingTrainer presamples by index: train_dataset must be a map-style dataset "
                "with __len__ and __getitem__ (e.g. datasets.Dataset), not an IterableDataset"
            )
        try:
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:  # pragma: no cover - datasets is a dependency
            is_hf_dataset = False
        if is_hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        largest = self._largest_presample()
        if len(dataset) < largest:
            raise ValueError(
                f"the training set has {len(dataset)} examples but importance sampling presamples B = {largest} "
                f"per step (presample={self.args.presample} x per_device_train_batch_size="
                f"{self.args.per_device_train_batch_size}); lower presample or the batch size"
            )
        self._presample_dataset, self._presample_collator = dataset, collator
        return dataloader

    def _largest_presample(self) -> int:
        args = self.args
        if not args.constant_time:
            return args.presample_size
        return self._constant_time_sizes(float("inf"))[0]

    def _constant_time_sizes(self, tau: float) -> tuple[int, int]:
        """Constant time: presample ``B`` and train ``a`` with ``B + (1 + c) a = (1 + c) b`` forwards."""
        args = self.args
        b, c = args.per_device_train_batch_size, 1.0 + args.backward_cost
        budget = c * b
        a = max(args.min_train_fraction * b, b / max(tau, 1.0))
        presample = int(b + (budget - c * a - b) * args.constant_time_ratio)
        presample = max(presample, 1)
        trained = max(int((budget - presample) / c), 1)
        return presample, trained

    def _step_sizes(self) -> tuple[int, int]:
        if self.args.constant_time:
            return self._constant_time_sizes(self.is_state.tau)
        return self.args.presample_size, self.args.per_device_train_batch_size

    def _presample_indices(self, population: int, count: int) -> list[int]:
        """``count`` distinct indices drawn uniformly from ``range(population)``.

        The distinct values of i.i.d. uniform draws, taken until ``count`` are seen, form a uniform
        random subset; for ``count`` much smaller than ``population`` this costs O(count), where a
        permutation of a large training set would cost O(population) at every step.
        """
        if 4 * count > population:
            return torch.randperm(population, generator=self.is_generator)[:count].tolist()
        chosen: dict[int, None] = {}  # insertion-ordered set
        while len(chosen) < count:
            for i in torch.randint(population, (count - len(chosen),), generator=self.is_generator).tolist():
                chosen.setdefault(i)
        return list(chosen)[:count]

    def _gather(self, indices: list[int]) -> dict[str, Any]:
        """Examples ``indices`` of the training set, collated in one call and on device."""
        if self._presample_dataset is None:
            self.get_train_dataloader()
        dataset = self._presample_dataset
        getitems = getattr(dataset, "__getitems__", None)
        examples = getitems(indices) if getitems is not None else [dataset[i] for i in indices]
        return self._prepare_inputs(self._presample_collator(examples))

    def _draw_presample(self, size: int, loader_batch: dict[str, Any] | None = None) -> dict[str, Any]:
        """A presample of about ``size`` uniformly drawn examples, collated and on device.

        The dataloader's batch for this step (itself a uniform draw) is the first part, so that no
        fetched batch is thrown away and an epoch still means one pass over the data; the rest,
        ``size - b`` examples, are drawn from the whole training set. Every row is marginally uniform,
        which is all the unbiasedness of the importance-sampled loss needs. When the two parts cannot
        be stacked (a collator that pads each batch to its own length) the whole presample is drawn
        from the training set instead.
        """
        dataset_size = len(self._presample_dataset) if self._presample_dataset is not None else None
        if dataset_size is None:
            self.get_train_dataloader()
            dataset_size = len(self._presample_dataset)
        if loader_batch is None:
            return self._gather(self._presample_indices(dataset_size, size))
        n = loader_batch["labels"].shape[0]
        extra = size - self.args.per_device_train_batch_size
        if extra <= 0:
            return self._rows(loader_batch, torch.arange(min(size, n), device=loader_batch["labels"].device))
        drawn = self._gather(self._presample_indices(dataset_size, extra))
        stacked = _stack_batches(loader_batch, drawn)
        if stacked is None:
            return self._gather(self._presample_indices(dataset_size, size))
        return stacked

    # ---- model and loss helpers -------------------------------------------------------------------
    def _unwrapped(self, model: nn.Module) -> nn.Module:
        # accelerate's unwrap_model costs about a millisecond a call; a step makes several.
        cached = self.__dict__.get("_unwrap_cache")
        if cached is not None and cached[0] is model:
            return cached[1]
        unwrapped = self.accelerator.unwrap_model(model)
        self.__dict__["_unwrap_cache"] = (model, unwrapped)
        return unwrapped

    def _model_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        # Labels only feed the model's own loss, which we do not use, so they are dropped to save its
        # computation; encoder-decoders need them to build decoder inputs, and a forward that
        # requires them (no default) gets them.
        unwrapped = self._unwrapped(model)
        config = getattr(unwrapped, "config", None)
        if getattr(config, "is_encoder_decoder", False) or self._forward_requires_labels(unwrapped):
            return inputs
        return {k: v for k, v in inputs.items() if k != "labels"}

    @staticmethod
    def _forward_requires_labels(model: nn.Module) -> bool:
        return _forward_requires_labels(type(model))

    @staticmethod
    def _logits(outputs: Any) -> torch.Tensor:
        logits = None
        if isinstance(outputs, dict) or hasattr(outputs, "keys"):
            logits = outputs.get("logits") if hasattr(outputs, "get") else None
        else:
            logits = getattr(outputs, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise ValueError(
                "importance sampling scores samples from the model's logits, but the model output has no "
                f"`logits` tensor (got {type(outputs).__name__}); use a model whose output has `logits`"
            )
        return logits

    @staticmethod
    def _labels(inputs: dict[str, Any]) -> torch.Tensor:
        labels = inputs.get("labels") if hasattr(inputs, "get") else None
        if not isinstance(labels, torch.Tensor):
            raise ValueError(
                "importance sampling needs the training batch to hold a `labels` tensor (per-sample losses "
                f"and scores come from it); got keys {sorted(inputs.keys()) if hasattr(inputs, 'keys') else inputs}"
            )
        return labels

    def _loss_kind(self, model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> str:
        if self.args.loss_kind is not None:
            return self.args.loss_kind
        if self._loss_shifts_labels and logits.dim() == 3:
            return "causal_lm"
        problem = getattr(getattr(self._unwrapped(model), "config", None), "problem_type", None)
        if problem == "multi_label_classification" and self.per_sample_loss is None:
            raise ValueError(
                "multi-label classification is not scored in closed form; pass per_sample_loss=fn(logits, labels)"
            )
        if problem == "regression" or labels.is_floating_point():
            return "regression"
        if logits.dim() == 3 and labels.dim() == 2:
            return "token_classification"
        if logits.dim() == 2 and labels.dim() == 1:
            return "classification"
        raise ValueError(
            f"cannot tell the loss of logits {tuple(logits.shape)} with labels {tuple(labels.shape)}; set "
            f"loss_kind to one of {', '.join(LOSS_KINDS)} or pass per_sample_loss=fn(logits, labels)"
        )

    def _per_sample(self, logits: torch.Tensor, labels: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.per_sample_loss is not None:
            losses, items = self.per_sample_loss(logits, labels)
            if losses.shape != (logits.shape[0],) or items.shape != (logits.shape[0],):
                raise ValueError(
                    f"per_sample_loss must return (losses, items) of shape ({logits.shape[0]},), got "
                    f"{tuple(losses.shape)} and {tuple(items.shape)}"
                )
            return losses.float(), items.float()
        return per_sample_losses(logits, labels, kind)

    def _items(self, labels: torch.Tensor, kind: str) -> torch.Tensor:
        """Target items per sample, ``(batch,)``: what the token-mean loss divides by."""
        if self.per_sample_loss is not None or kind == "regression":
            return torch.ones(labels.shape[0], device=labels.device)
        if kind == "causal_lm":
            labels = labels[:, 1:]
        valid = (labels != IGNORE_INDEX).float()
        return valid if valid.dim() == 1 else valid.sum(dim=1)

    def _scores_from_logits(self, logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
        logits = logits.detach()
        if self.args.score == "loss":
            if self.per_sample_loss is None and kind != "regression":
                return cross_entropy_losses_tail_accurate(logits, labels, kind)
            return self._per_sample(logits, labels, kind)[0].detach()
        if self.per_sample_loss is not None:
            return autograd_logit_gradient_norm(logits, labels, self.per_sample_loss)
        if kind == "regression":
            return autograd_logit_gradient_norm(logits, labels, lambda z, y: per_sample_losses(z, y, kind))
        return cross_entropy_gradient_norm(logits, labels, kind)

    def _exact_gradient_norms(self, model: nn.Module, inputs: dict[str, Any], kind: str) -> torch.Tensor:
        """``||d L_i / d theta||`` for each sample, one backward per sample (for comparisons only)."""
        unwrapped = self._unwrapped(model)
        params = [p for p in unwrapped.parameters() if p.requires_grad]
        labels = self._labels(inputs)
        n = labels.shape[0]
        norms = torch.empty(n, device=labels.device)
        for i in range(n):
            one = self._rows(inputs, torch.tensor([i], device=labels.device))
            with torch.enable_grad():
                logits = self._logits(unwrapped(**self._model_inputs(model, one)))
                loss, _ = self._per_sample(logits, one["labels"], kind)
                grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
            norms[i] = torch.sqrt(sum((g.float().pow(2).sum() for g in grads if g is not None), torch.zeros(())))
        return norms

    @torch.no_grad()
    def score_samples(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Importance scores ``(batch,)`` of a prepared batch, in eval mode (no dropout noise, no
        batch-norm statistics updates), by ``args.score``; the forward runs in ``args.score_dtype``."""
        unwrapped = self._unwrapped(model)
        labels = self._labels(inputs)
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            n = labels.shape[0]
            if self.args.score == "gradient_norm":
                logits = self._logits(unwrapped(**self._model_inputs(model, self._rows(inputs, torch.arange(1)))))
                return self._exact_gradient_norms(model, inputs, self._loss_kind(model, logits, labels))
            chunk = self.args.score_batch_size or n
            scores = []
            dtype = scoring_autocast_dtype(self.args.score_dtype, unwrapped, labels.device)
            for start in range(0, n, chunk):
                part = (
                    inputs
                    if chunk >= n
                    else self._rows(inputs, torch.arange(start, min(start + chunk, n), device=labels.device))
                )
                cast = (
                    torch.autocast(device_type=labels.device.type, dtype=dtype)
                    if dtype is not None
                    else contextlib.nullcontext()
                )
                with cast:
                    logits = self._logits(unwrapped(**self._model_inputs(model, part)))
                kind = self._loss_kind(model, logits, part["labels"])
                scores.append(self._scores_from_logits(logits, part["labels"], kind).float())
            return scores[0] if len(scores) == 1 else torch.cat(scores)
        finally:
            unwrapped.train(was_training)

    @staticmethod
    def _rows(inputs: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
        """Rows ``index`` of every batched tensor of ``inputs``."""
        n = inputs["labels"].shape[0]
        return {
            k: (v.index_select(0, index.to(v.device)) if isinstance(v, torch.Tensor) and v.shape[:1] == (n,) else v)
            for k, v in inputs.items()
        }

    def _update_tau(self, scores: torch.Tensor, presample: bool, tau: float | None = None) -> None:
        """Update tau from the latest ``B = args.presample_size`` uniformly drawn scores: a presample's
        own, or the uniform batches' pooled over the last steps (tau from ``b`` scores alone would be
        biased low, and exactly 1 for ``b = 1``). ``tau``: that of a whole presample, when known."""
        state, m = self.is_state, self.args.tau_smoothing
        window = self.args.presample_size
        latest = scores.detach().double().flatten()
        if presample or latest.numel() >= window:
            window_scores = latest[-window:]
            state.recent_scores = window_scores.tolist()
            if tau is not None and window_scores.numel() != latest.numel():
                tau = None  # not the scores that tau was computed from
        else:
            state.recent_scores = (state.recent_scores + latest.tolist())[-window:]
            window_scores = torch.tensor(state.recent_scores, dtype=torch.float64)
        state.last_tau = tau_from_scores(window_scores) if tau is None else tau
        state.tau = m * state.tau + (1.0 - m) * state.last_tau

    def _notify_scores(self, **payload: Any) -> None:
        for callback in self.callback_handler.callbacks:
            hook = getattr(callback, "on_importance_scores", None)
            if hook is not None:
                hook(self.args, self.state, self.control, **payload)

    @property
    def is_active(self) -> bool:
        """Whether the next step samples by importance: the smoothed tau exceeds the threshold."""
        return self.is_state.tau > self.args.resolved_tau_threshold

    # ---- the training loss --------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Uniform or importance-sampled training loss of one micro-batch (see the class docstring).

        Evaluation (model in eval mode) uses the stock :meth:`transformers.Trainer.compute_loss`.
        """
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = self._labels(inputs)
        state = self.is_state
        state.steps += 1
        if self.is_active:
            state.active_steps += 1
            loss, outputs = self._importance_loss(model, inputs)
        else:
            loss, outputs = self._uniform_loss(model, inputs, labels, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _uniform_loss(
        self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor, num_items_in_batch: Any
    ) -> tuple[torch.Tensor, Any]:
        outputs = model(**self._model_inputs(model, inputs))
        logits = self._logits(outputs)
        kind = self._loss_kind(model, logits, labels)
        self.loss_is_scaled_for_ga = False
        if self.per_sample_loss is None and kind == "classification":
            # The same call as the models' own loss, so that with importance sampling off the trainer
            # is bit-identical to the stock one.
            check_logits_labels(logits, labels, kind)
            loss = F.cross_entropy(logits, labels)
        elif self.per_sample_loss is None and kind == "regression":
            check_logits_labels(logits, labels, kind)
            loss = F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        else:
            losses, items = self._per_sample(logits, labels, kind)
            if num_items_in_batch is not None and self.per_sample_loss is None:
                # Normalise by the target tokens of the whole accumulated batch, as the stock trainer does.
                loss = losses.sum() / num_items_in_batch
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    loss = loss * self.accelerator.num_processes
                self.loss_is_scaled_for_ga = True
            else:
                loss = losses.sum() / items.sum().clamp(min=1.0)
        scores = (
            self._exact_gradient_norms(model, inputs, kind)
            if self.args.score == "gradient_norm"
            else self._scores_from_logits(logits, labels, kind)
        )
        self._update_tau(scores, presample=False)
        self.is_state.last_presample, self.is_state.last_trained = 0, labels.shape[0]
        self._notify_scores(scores=scores, is_active=False, tau=self.is_state.tau)
        return loss, outputs

    def _importance_loss(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        presample_size, trained_size = self._step_sizes()
        self._seed_generator()
        presample = self._draw_presample(presample_size, inputs)
        presample_size = int(presample["labels"].shape[0])  # the last loader batch of an epoch may be short
        scores = self.score_samples(model, presample)
        # One host read for tau, the draws and their weights. Rows drawn several times are trained
        # once with their weights summed: the same gradient, less work.
        drawn = importance_sample(scores, trained_size, generator=self.is_generator)
        self._update_tau(scores, presample=True, tau=drawn.tau)
        index, weights, draws, draw_weights = drawn.index, drawn.weights, drawn.draws, drawn.draw_weights
        batch = self._rows(presample, index)
        labels = batch["labels"]
        outputs = model(**self._model_inputs(model, batch))
        logits = self._logits(outputs)
        kind = self._loss_kind(model, logits, labels)
        losses, _ = self._per_sample(logits, labels, kind)
        # A uniform batch of `trained_size` holds this many target items on average; estimating it from
        # the whole presample keeps the weighted loss an unbiased estimate of the usual mean.
        items = self._items(presample["labels"], kind).sum().to(losses.dtype)
        expected_items = items * (trained_size / presample_size)
        loss = weighted_loss(losses, weights.to(losses.device), expected_items.clamp(min=1e-12))
        self.loss_is_scaled_for_ga = False
        self.is_state.last_presample, self.is_state.last_trained = presample_size, int(index.shape[0])
        self._notify_scores(scores=scores, is_active=True, tau=self.is_state.tau, indices=draws, weights=draw_weights)
        return loss, outputs

    # ---- logging ----------------------------------------------------------------------------------
    def estimated_speedup(self) -> float:
        """Estimated speedup over uniform training per unit of compute, from the smoothed tau.

        With ``p`` proportional to the per-sample gradient norms and ``||G||^2`` small against the
        per-sample norms, the trace of the gradient covariance of a uniform batch divided by that of
        an importance-sampled batch of the same size is ``n ||g||^2 = tau^2``: the importance-sampled
        batch is worth ``tau^2`` uniform batches. A standard step costs
        ``(B + (1 + c) b) / ((1 + c) b)`` uniform steps (``c`` = backward cost in forwards); a
        constant-time step costs one and trains ``a`` samples. (The on/off switch keeps the paper's
        more conservative rule ``tau > tau_th``.)"""
        args, tau = self.args, max(self.is_state.tau, 1.0)
        b, c = args.per_device_train_batch_size, 1.0 + args.backward_cost
        if args.constant_time:
            return tau**2 * self._constant_time_sizes(tau)[1] / b
        return tau**2 * c * b / (args.presample_size + c * b)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:  # noqa: D102
        if "loss" in logs:
            state = self.is_state
            steps = state.steps - state.logged_steps
            active = state.active_steps - state.logged_active_steps
            logs["tau"] = state.tau
            logs["is_active"] = active / steps if steps else float(self.is_active)
            logs["estimated_speedup"] = self.estimated_speedup()
            state.logged_steps, state.logged_active_steps = state.steps, state.active_steps
        super().log(logs, start_time)

    # ---- checkpoints -----------------------------------------------------------------------------------
    def save_importance_state(self, folder: str) -> None:
        """Write the importance-sampling state as JSON, one file per process (checkpoints carry it in
        ``trainer_state.json`` already; this is for saving it elsewhere)."""
        os.makedirs(folder, exist_ok=True)
        rank = self.args.process_index
        with open(os.path.join(folder, STATE_NAME.format(rank=rank)), "w", encoding="utf-8") as fh:
            json.dump(asdict(self.is_state), fh, indent=2)

    def load_importance_state(self, folder: str) -> bool:
        """Restore what :meth:`save_importance_state` wrote; ``False`` when the folder has none."""
        state_file = os.path.join(folder, STATE_NAME.format(rank=self.args.process_index))
        if not os.path.isfile(state_file):
            return False
        with open(state_file, encoding="utf-8") as fh:
            self.is_state = ImportanceSamplingState.from_dict(json.load(fh))
        return True


def _stack_batches(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any] | None:
    """Rows of ``first`` then ``second`` (two collated batches), or ``None`` when they differ in keys,
    in a tensor's trailing shape or dtype, or in a non-tensor value."""
    if first.keys() != second.keys():
        return None
    n, m = first["labels"].shape[0], second["labels"].shape[0]
    out: dict[str, Any] = {}
    for key, a in first.items():
        b = second[key]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape[:1] == (n,) and b.shape[:1] == (m,):
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                return None
            out[key] = torch.cat([a, b.to(a.device)])
        elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b.to(a.device))):
                return None
            out[key] = a
        else:
            if a != b:
                return None
            out[key] = a
    return out


class ImportanceSamplingStateCallback(TrainerCallback, ExportableState):
    """Holds the :class:`ImportanceSamplingState` of an :class:`ImportanceSamplingTrainer` (which adds
    it) as a stateful callback: every checkpoint's ``trainer_state.json`` carries it, and resuming
    restores it at the start of training, whatever ``restore_callback_states_from_checkpoint`` says
    (the sampler's random draws derive from the step count it holds, so the run continues exactly).

    With several processes the checkpoint holds the first process's state, which every process resumes.
    """

    def __init__(self) -> None:
        self.is_state = ImportanceSamplingState()

    def state(self) -> dict[str, Any]:  # noqa: D102 - ExportableState
        return {"args": {}, "attributes": {"saved": asdict(self.is_state)}}

    @property
    def saved(self) -> dict[str, Any]:
        """The state as a JSON-ready dict; setting it restores the state."""
        return asdict(self.is_state)

    @saved.setter
    def saved(self, value: dict[str, Any]) -> None:
        self.is_state = ImportanceSamplingState.from_dict(value)

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """Restore from the trainer state (the checkpoint's on a resume, our own otherwise)."""
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(stored, list):
            stored = stored[0] if stored else None
        if stored and "saved" in stored.get("attributes", {}):
            self.saved = stored["attributes"]["saved"]
