"""The clipping diagnostic of ``scripts/bench_importance_sampling.py``: the gradient norms it records are
the pre-clipping norms of every step (checked against a float64 full-batch gradient), and the clip rate
counts the steps above ``max_grad_norm``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments


@pytest.fixture(scope="module")
def bench(load_file_module):
    return load_file_module("hf_efficient_bench_importance_sampling", "scripts/bench_importance_sampling.py")


@pytest.fixture(scope="module")
def tiny(load_file_module):
    return load_file_module("hf_efficient_training_tiny_models", "tests/training/tiny_models.py")


def _full_batch_gradient_norm(model: torch.nn.Module, data: list[dict]) -> float:
    """float64 norm of the gradient of the mean cross-entropy over all of ``data``, computed directly."""
    ref = type(model)(model.config).double()
    ref.load_state_dict(model.state_dict())
    x = torch.stack([d["x"] for d in data]).double()
    y = torch.stack([d["labels"] for d in data])
    loss = F.cross_entropy(ref(x).logits, y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    return float(torch.sqrt(sum((g**2).sum() for g in grads)))


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-3, 1e3])
def test_recorded_norms_are_the_unclipped_gradient_norms(bench, tiny, tmp_path, max_grad_norm):
    torch.manual_seed(0)
    data = tiny.make_classification_data(12)
    model = tiny.TinyClassifier(tiny.TinyConfig())
    expected = _full_batch_gradient_norm(model, data)
    # One batch holds the whole data set and lr = 0 keeps the weights: every step sees the full-batch
    # gradient, whatever the clipping does to it afterwards.
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(data),
        learning_rate=0.0,
        max_steps=3,
        max_grad_norm=max_grad_norm,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        lr_scheduler_type="constant",
        logging_steps=10**7,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    norms = bench.record_grad_norms(trainer)
    trainer.train()
    assert len(norms) == 3
    assert norms == pytest.approx([expected] * 3, rel=1e-5)
    clipped = bench.clip_fraction(norms, max_grad_norm)
    assert clipped == (1.0 if 0 < max_grad_norm < expected else 0.0)


def test_clip_fraction_counts_steps_above_the_threshold(bench):
    assert bench.clip_fraction([0.5, 1.0, 1.5, 3.0], 1.0) == 0.5  # a norm equal to the bound is not clipped
    assert bench.clip_fraction([0.5, 5.0], 0.0) == 0.0  # clipping off
    assert bench.clip_fraction([], 1.0) is None
