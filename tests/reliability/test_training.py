"""Misuse of the importance-sampling trainer and its maths: each cell gives a clear error naming
the bad input, or the correct result against an independent reference (float64 formulas, the
stock Trainer)."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

from hf_efficient.training import ImportanceSamplingConfig, ImportanceSamplingTrainer
from hf_efficient.training.scores import (
    cross_entropy_gradient_norm,
    cross_entropy_losses_tail_accurate,
    default_tau_threshold,
    importance_resample,
    merge_duplicates,
    per_sample_losses,
    tau_from_scores,
)


def _tiny():
    name = "hf_efficient_training_tiny_models"
    if name not in sys.modules:
        path = pathlib.Path(__file__).resolve().parents[1] / "training" / "tiny_models.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def _reference_norms(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """||softmax(z) - onehot(y)|| in float64 with the label entry taken from the other classes."""
    p = torch.softmax(logits.double(), dim=-1)
    others = p.scatter(-1, labels.unsqueeze(-1), 0.0)
    return torch.sqrt(others.pow(2).sum(-1) + others.sum(-1).pow(2))


# ---- scores: shapes, dtypes, empty and non-finite input ------------------------------------------------
@pytest.mark.parametrize(
    "logits, labels, kind, match",
    [
        (torch.randn(4, 3), torch.zeros(5, dtype=torch.long), "classification", "classification needs"),
        (torch.randn(4), torch.zeros(4, dtype=torch.long), "classification", "classification needs"),
        (torch.randn(4, 3), torch.zeros(4), "classification", "integer class labels"),
        (torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long), "causal_lm", "causal_lm needs"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), "ranking", "unknown loss kind"),
    ],
)
def test_scores_refuse_bad_shapes_and_dtypes(logits, labels, kind, match):
    for fn in (cross_entropy_gradient_norm, cross_entropy_losses_tail_accurate, per_sample_losses):
        with pytest.raises(ValueError, match=match):
            fn(logits, labels, kind)


def test_scores_of_an_empty_batch_are_empty_and_tau_refuses_them():
    logits, labels = torch.randn(0, 3), torch.zeros(0, dtype=torch.long)
    assert cross_entropy_gradient_norm(logits, labels, "classification").shape == (0,)
    assert cross_entropy_losses_tail_accurate(logits, labels, "classification").shape == (0,)
    with pytest.raises(ValueError, match="at least one score"):
        tau_from_scores(torch.zeros(0))


def test_a_nan_logit_spoils_only_its_own_row():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(5, 4, generator=g), torch.randint(0, 4, (5,), generator=g)
    logits[2, 1] = float("nan")
    got = cross_entropy_gradient_norm(logits, labels, "classification")
    assert torch.isnan(got[2]) and torch.isfinite(got[[0, 1, 3, 4]]).all()
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(got[keep].double(), _reference_norms(logits[keep], labels[keep]))
    # ... and the sampler refuses such scores instead of drawing from them.
    with pytest.raises(ValueError, match="finite and non-negative"):
        importance_resample(got, 3)
    with pytest.raises(ValueError, match="finite and non-negative"):
        tau_from_scores(got)


def test_an_infinite_logit_gives_the_limit_or_spoils_only_its_row():
    logits = torch.tensor([[float("inf"), 0.0, 0.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([1, 2])
    got = cross_entropy_gradient_norm(logits, labels, "classification")
    # Row 0: softmax itself gives NaN there (inf - inf); the limit would be ||e_0 - e_1|| = sqrt(2).
    assert torch.isnan(got[0]) or got[0] == pytest.approx(math.sqrt(2.0))
    torch.testing.assert_close(got[1:].double(), _reference_norms(logits[1:], labels[1:]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_huge_low_precision_logits_score_like_float64(dtype):
    """Margins of thousands in fp16/bf16 (no overflow inside: the softmax runs in float32)."""
    logits = torch.tensor([[3000.0, 0.0, -2000.0], [5.0, 40.0, 0.0], [-60000.0, 60000.0, 0.0]]).to(dtype)
    labels = torch.tensor([0, 1, 0])
    got = cross_entropy_gradient_norm(logits, labels, "classification")
    want = _reference_norms(logits, labels)
    # Row 0: exp(-3000) underflows even in float64; float32 must give 0 there, not NaN.
    assert got[0] == 0 and want[0] == 0
    torch.testing.assert_close(got[1:].double(), want[1:], rtol=1e-3, atol=0.0)


def test_all_padding_rows_score_zero_and_cost_nothing():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, -100, -100], [-100, -100, -100, -100]])
    assert cross_entropy_gradient_norm(logits, labels, "token_classification")[1] == 0
    assert cross_entropy_losses_tail_accurate(logits, labels, "token_classification")[1] == 0
    losses, items = per_sample_losses(logits, labels, "token_classification")
    assert losses[1] == 0 and items.tolist() == [2.0, 0.0]


def test_non_contiguous_and_expanded_logits_score_as_contiguous():
    base = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    strided = base.t().contiguous().t()  # same values, transposed strides
    expanded = base[:1].expand(6, 4)  # stride-0 rows
    torch.testing.assert_close(
        cross_entropy_gradient_norm(strided, labels, "classification"),
        cross_entropy_gradient_norm(base.contiguous(), labels, "classification"),
    )
    torch.testing.assert_close(
        cross_entropy_gradient_norm(expanded, labels, "classification").double(),
        _reference_norms(expanded.contiguous(), labels),
    )


# ---- sampling helpers ----------------------------------------------------------------------------------
def test_sampling_helpers_refuse_bad_input():
    with pytest.raises(ValueError, match="num_samples"):
        importance_resample(torch.ones(4), 0)
    with pytest.raises(ValueError, match="finite and non-negative"):
        importance_resample(torch.tensor([1.0, -0.5]), 2)
    with pytest.raises(ValueError, match="1-D of one length"):
        merge_duplicates(torch.tensor([0, 1]), torch.ones(3))
    with pytest.raises(ValueError, match="backward_cost"):
        default_tau_threshold(12, 4, backward_cost=0.0)
    with pytest.raises(ValueError, match="presample_size"):
        default_tau_threshold(0, 4)
    # All-zero scores: nothing to prefer, so sampling is uniform and unbiased (weights 1).
    idx, w, p = importance_resample(torch.zeros(4, dtype=torch.float64), 8, torch.Generator().manual_seed(0))
    assert torch.equal(p, torch.full((4,), 0.25, dtype=torch.float64)) and torch.equal(w, torch.ones(8).double())


# ---- configuration -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(presample=float("nan")), "presample must be"),
        (dict(presample=0.5), "presample must be"),
        (dict(score="entropy"), "score must be one of"),
        (dict(tau_threshold=0.5), "tau_threshold must be"),
        (dict(tau_threshold=float("nan")), "tau_threshold must be"),
        (dict(tau_smoothing=1.0), "tau_smoothing"),
        (dict(backward_cost=0.0), "backward_cost"),
        (dict(min_train_fraction=0.0), "min_train_fraction"),
        (dict(loss_kind="ranking"), "loss_kind"),
        (dict(score_batch_size=0), "score_batch_size"),
        # tau never exceeds sqrt(B): with b = 1 the paper's default (B + 3) / 3 is out of reach.
        (dict(per_device_train_batch_size=1), "can never be reached"),
        (dict(per_device_train_batch_size=4, presample=1.0, tau_threshold=2.0), "can never be reached"),
    ],
)
def test_config_refuses_bad_settings(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        ImportanceSamplingConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def test_batch_of_one_with_a_reachable_threshold_is_accepted(tmp_path):
    args = ImportanceSamplingConfig(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=1,
        presample=16.0,
        tau_threshold=2.0,
    )
    assert args.presample_size == 16 and math.sqrt(16) > args.resolved_tau_threshold


# ---- the trainer ---------------------------------------------------------------------------------------
def _trainer(tmp_path, model, data, **kw):
    args = ImportanceSamplingConfig(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        per_device_train_batch_size=4,
        max_steps=3,
        **kw,
    )
    return ImportanceSamplingTrainer(model=model, args=args, train_dataset=data)


def test_trainer_misuse_gives_clear_errors(tmp_path):
    tiny = _tiny()
    data = tiny.make_classification_data(24)
    torch.manual_seed(0)
    model = tiny.TinyClassifier(tiny.TinyConfig())
    trainer = _trainer(tmp_path, model, data)
    model.train()
    with pytest.raises(ValueError, match="`labels` tensor"):
        trainer.compute_loss(model, {"x": torch.zeros(4, 6)})

    def wrong_shape(logits, labels):
        return F.cross_entropy(logits, labels, reduction="none")[:2], torch.ones(2)

    bad = ImportanceSamplingTrainer(model=model, args=trainer.args, train_dataset=data, per_sample_loss=wrong_shape)
    with pytest.raises(ValueError, match="per_sample_loss must return"):
        bad.compute_loss(model, bad.data_collator(data[:4]))
    with pytest.raises(TypeError, match="per_sample_loss must be callable"):
        ImportanceSamplingTrainer(model=model, args=trainer.args, train_dataset=data, per_sample_loss=3)


def test_model_requiring_labels_trains_like_the_stock_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    tiny = _tiny()
    data = tiny.make_classification_data(24)
    common = dict(
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=0.1,
        seed=3,
    )
    torch.manual_seed(0)
    stock = tiny.TinyLabelsRequiredClassifier(tiny.TinyConfig())
    torch.manual_seed(0)
    ours = tiny.TinyLabelsRequiredClassifier(tiny.TinyConfig())
    Trainer(model=stock, args=TrainingArguments(output_dir=str(tmp_path / "a"), **common), train_dataset=data).train()
    ImportanceSamplingTrainer(
        model=ours,
        args=ImportanceSamplingConfig(output_dir=str(tmp_path / "b"), tau_threshold=float("inf"), **common),
        train_dataset=data,
    ).train()
    for name, value in stock.state_dict().items():
        assert torch.equal(value, ours.state_dict()[name]), name
