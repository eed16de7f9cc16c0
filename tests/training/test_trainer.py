"""ImportanceSamplingTrainer inside the whole transformers Trainer, against independent references:
the stock Trainer, the exact mean gradient, an uninterrupted run, a recomputation of the switch."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from hf_efficient.training import (
    ImportanceSamplingCallback,
    ImportanceSamplingConfig,
    ImportanceSamplingTrainer,
    cross_entropy_gradient_norm,
    tau_from_scores,
)


def _load_tiny_models():
    # Test helpers live beside the tests; load them by path (pytest runs with --import-mode=importlib).
    name = "hf_efficient_training_tiny_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).with_name("tiny_models.py"))
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


_tiny = _load_tiny_models()
NoLogitsModel, TinyClassifier, TinyConfig = _tiny.NoLogitsModel, _tiny.TinyClassifier, _tiny.TinyConfig
TinyForCausalLM, TinyKwargsClassifier = _tiny.TinyForCausalLM, _tiny.TinyKwargsClassifier
make_classification_data, make_lm_data = _tiny.make_classification_data, _tiny.make_lm_data

COMMON = dict(report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", learning_rate=0.05, seed=7)


def _args(tmp_path, cls=ImportanceSamplingConfig, **kw):
    # Scoring in the model's precision: the references below are float32/float64 on every machine
    # (score_dtype="auto" would score in bfloat16 on hardware with native bfloat16 products).
    precision = {"score_dtype": "model"} if issubclass(cls, ImportanceSamplingConfig) else {}
    return cls(output_dir=str(tmp_path), **{**COMMON, **precision, **kw})


def _model(cls=TinyClassifier, seed=0, **cfg):
    torch.manual_seed(seed)
    return cls(TinyConfig(**cfg))


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Recorder(ImportanceSamplingCallback):
    def __init__(self):
        self.events = []

    def on_importance_scores(self, args, state, control, **kw):
        self.events.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kw.items()})


@pytest.mark.parametrize("bf16", [False, True])
def test_resampling_off_is_bit_identical_to_stock_trainer(tmp_path, bf16):
    data = make_classification_data(48)
    kw = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=5, bf16=bf16)
    stock_model, ours_model = _model(), _model()
    Trainer(model=stock_model, args=_args(tmp_path / "a", TrainingArguments, **kw), train_dataset=data).train()
    ours = ImportanceSamplingTrainer(
        model=ours_model, args=_args(tmp_path / "b", tau_threshold=float("inf"), **kw), train_dataset=data
    )
    ours.train()
    assert ours.is_state.active_steps == 0 and ours.is_state.steps == 10
    for name, value in _params(stock_model).items():
        assert torch.equal(value, ours_model.state_dict()[name]), name


def test_accepts_loss_kwargs_model_is_not_over_scaled(tmp_path):
    """The model takes **kwargs but ignores num_items_in_batch: we must still divide by the
    accumulation steps, exactly like the stock trainer does for a model without **kwargs."""
    data = make_classification_data(48)
    kw = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4)
    reference, ours_model = _model(TinyClassifier), _model(TinyKwargsClassifier)
    Trainer(model=reference, args=_args(tmp_path / "a", TrainingArguments, **kw), train_dataset=data).train()
    trainer = ImportanceSamplingTrainer(
        model=ours_model, args=_args(tmp_path / "b", tau_threshold=float("inf"), **kw), train_dataset=data
    )
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    for name, value in _params(reference).items():
        assert torch.equal(value, ours_model.state_dict()[name]), name


def _mc_gradients(trainer, model, data, b, draws):
    """Gradients of the trainer's importance-sampled loss over `draws` independent steps, each given
    a uniformly drawn loader batch of `b` examples, as the dataloader would."""
    g = torch.Generator().manual_seed(11)
    grads = []
    for _ in range(draws):
        trainer.is_state.tau = 1e9  # force importance sampling on
        model.zero_grad()
        loader_batch = trainer.data_collator([data[i] for i in torch.randperm(len(data), generator=g)[:b].tolist()])
        loss = trainer.compute_loss(model, loader_batch)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(grads)


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_weighted_resampled_gradient_is_unbiased(tmp_path, task):
    """Presamples of the loader batch plus uniform draws: the weighted resampled gradient averages
    to the exact mean gradient over the training set (a statistical check of the whole step)."""
    b, presample = 3, 4.0
    if task == "classification":
        data, model = make_classification_data(12, seed=3), _model(TinyClassifier, seed=1)
    else:
        data, model = make_lm_data(12, seed=3), _model(TinyForCausalLM, seed=1)
    trainer = ImportanceSamplingTrainer(
        model=model, args=_args(tmp_path, per_device_train_batch_size=b, presample=presample), train_dataset=data
    )
    model.train()
    grads = _mc_gradients(trainer, model, data, b, 600)
    # Reference: the usual mean loss over all 12 examples (token mean for the LM), one backward.
    model.zero_grad()
    batch = trainer.data_collator(data)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    if task == "classification":
        ref_loss = F.cross_entropy(logits, batch["labels"])
    else:
        ref_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    ref_loss.backward()
    exact = torch.cat([p.grad.flatten() for p in model.parameters()])
    mean, stderr = grads.mean(0), grads.std(0) / math.sqrt(grads.shape[0])
    assert stderr.max() > 0  # the estimator is random
    z = (mean - exact).abs() / (stderr + 1e-7)
    assert z.max() < 5.0, float(z.max())


def test_switch_turns_on_and_off_as_specified(tmp_path):
    data = make_classification_data(64, seed=2)
    rec = Recorder()
    # presample 2: th = (8 + 12) / 12; with b = 4 the uniform phase's tau is at most sqrt(4) = 2 > th.
    args = _args(
        tmp_path, per_device_train_batch_size=4, presample=2.0, max_steps=14, tau_smoothing=0.5, learning_rate=0.5
    )
    trainer = ImportanceSamplingTrainer(model=_model(), args=args, train_dataset=data, callbacks=[rec])
    th = args.resolved_tau_threshold
    assert th == pytest.approx((8 + 12) / 12)

    # Make the scores peaked (so tau grows) for 8 steps, then uniform (so tau decays).
    original = trainer._scores_from_logits

    def scripted(logits, labels, kind):
        real = original(logits, labels, kind)
        if trainer.is_state.steps <= 8:
            peaked = torch.full_like(real, 1e-3)
            peaked[0] = 1.0
            return peaked
        return torch.ones_like(real)

    trainer._scores_from_logits = scripted
    trainer.train()
    # Recompute the EMA and the decision independently from the recorded raw scores: tau comes from
    # the last B = 8 uniformly drawn scores (a presample's, or the uniform batches' pooled).
    tau, expected_active, window = 0.0, [], []
    for event in rec.events:
        expected_active.append(tau > th)
        window = event["scores"].tolist() if event["is_active"] else (window + event["scores"].tolist())[-8:]
        tau = 0.5 * tau + 0.5 * tau_from_scores(torch.tensor(window))
        assert event["tau"] == pytest.approx(tau)
    assert [e["is_active"] for e in rec.events] == expected_active
    assert expected_active[0] is False and any(expected_active) and expected_active[-1] is False
    for e in rec.events:  # presample of B when active, the trained batch otherwise
        assert e["scores"].shape == ((8,) if e["is_active"] else (4,))
        if e["is_active"]:
            p = e["scores"] / e["scores"].sum()
            torch.testing.assert_close(e["weights"], (1.0 / (8 * p[e["indices"]])).double())


def test_logs_carry_tau_activity_and_speedup(tmp_path):
    data = make_classification_data(40)
    args = _args(
        tmp_path, per_device_train_batch_size=4, max_steps=6, logging_steps=2, tau_threshold=1.0001, tau_smoothing=0.0
    )
    trainer = ImportanceSamplingTrainer(model=_model(), args=args, train_dataset=data)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    assert logs[0]["is_active"] == 0.5 and logs[-1]["is_active"] == 1.0  # first step is always uniform
    for h in logs:
        assert h["tau"] >= 1.0
        assert h["estimated_speedup"] == pytest.approx(max(h["tau"], 1.0) ** 2 * 12 / (12 + 12))


def test_scores_loss_and_exact_gradient_norm(tmp_path):
    data = make_classification_data(16)
    model = _model()
    batch = None
    for score in ("loss", "gradient_norm", "gradient_norm_bound"):
        trainer = ImportanceSamplingTrainer(
            model=model, args=_args(tmp_path, per_device_train_batch_size=4, score=score), train_dataset=data
        )
        batch = trainer.data_collator(data[:5])
        got = trainer.score_samples(model, batch)
        want = []
        for i in range(5):
            model.zero_grad()
            logits = model(batch["x"][i : i + 1]).logits.requires_grad_(True) if score != "gradient_norm" else None
            if score == "gradient_norm":
                F.cross_entropy(model(batch["x"][i : i + 1]).logits, batch["labels"][i : i + 1]).backward()
                want.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())))
            else:
                logits = logits.detach().requires_grad_(True)
                loss = F.cross_entropy(logits, batch["labels"][i : i + 1])
                (g,) = torch.autograd.grad(loss, logits)
                want.append(loss.detach() if score == "loss" else g.norm())
        torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("restore_flag", [False, True])
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, restore_flag):
    """Train, checkpoint, resume: the same tau and state, the same presamples and draws after the
    checkpoint, the same weights as an uninterrupted run; the state travels in trainer_state.json."""
    import json

    data = make_classification_data(64, seed=4)
    kw = dict(
        per_device_train_batch_size=4,
        max_steps=8,
        tau_threshold=1.0001,
        tau_smoothing=0.5,
        save_strategy="steps",
        save_steps=3,
        gradient_accumulation_steps=2,
        restore_callback_states_from_checkpoint=restore_flag,
    )
    full_model, full_rec = _model(), Recorder()
    full = ImportanceSamplingTrainer(
        model=full_model, args=_args(tmp_path / "full", **kw), train_dataset=data, callbacks=[full_rec]
    )
    full.train()
    assert full.is_state.active_steps > 4
    checkpoint = tmp_path / "full" / "checkpoint-3"
    stored = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    saved = stored["ImportanceSamplingStateCallback"]["attributes"]["saved"]
    assert saved["steps"] == 6 and len(saved["recent_scores"]) == 12
    assert sorted(p.name for p in checkpoint.iterdir() if "importance" in p.name) == []  # no side files
    resumed_model, resumed_rec = _model(seed=123), Recorder()  # different init: all from the checkpoint
    resumed = ImportanceSamplingTrainer(
        model=resumed_model, args=_args(tmp_path / "full", **kw), train_dataset=data, callbacks=[resumed_rec]
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in _params(full_model).items():
        assert torch.equal(value, resumed_model.state_dict()[name]), name
    assert resumed.is_state == full.is_state
    after = full_rec.events[6:]  # the micro-steps after the checkpoint
    assert len(after) == len(resumed_rec.events) == 10
    for a, b in zip(after, resumed_rec.events):
        assert a.keys() == b.keys() and a["tau"] == b["tau"] and a["is_active"] == b["is_active"]
        for key in ("scores", "indices", "weights"):
            if a.get(key) is not None:
                assert torch.equal(a[key], b[key]), key


def test_constant_time_keeps_the_step_budget(tmp_path):
    args = _args(tmp_path, per_device_train_batch_size=32, constant_time=True)
    trainer = ImportanceSamplingTrainer(model=_model(), args=args, train_dataset=make_classification_data(64))
    assert args.resolved_tau_threshold == 2.0
    for tau in (2.0, 3.0, 10.0, 1e6):
        presample, trained = trainer._constant_time_sizes(tau)
        assert presample + 3 * trained <= 3 * 32  # scoring + training fit in a uniform step
        assert presample >= trained
    assert trainer._constant_time_sizes(2.0) == (40, 18)  # a = b/2 = 16; B = 32 + (96 - 48 - 32)/2 = 40
    assert trainer._constant_time_sizes(1e6)[1] == int((96 - trainer._constant_time_sizes(1e6)[0]) / 3)


def test_token_classification_and_causal_lm_train(tmp_path):
    """The causal LM path trains and its uniform loss equals the model-independent token mean."""
    data = make_lm_data(24)
    model = _model(TinyForCausalLM)
    args = _args(tmp_path, per_device_train_batch_size=4, max_steps=1, tau_threshold=float("inf"))
    trainer = ImportanceSamplingTrainer(model=model, args=args, train_dataset=data)
    assert trainer._loss_shifts_labels
    batch = trainer.data_collator(data[:4])
    model.train()
    loss = trainer.compute_loss(model, batch)
    logits = model(batch["input_ids"]).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 11), batch["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want)


def test_errors(tmp_path):
    data = make_classification_data(10)
    with pytest.raises(ValueError, match="training set has 10 examples"):
        args = _args(tmp_path, per_device_train_batch_size=4, presample=3.0)
        ImportanceSamplingTrainer(model=_model(), args=args, train_dataset=data).get_train_dataloader()
    args = _args(tmp_path, per_device_train_batch_size=2, max_steps=1)
    with pytest.raises(ValueError, match="no `logits`"):
        ImportanceSamplingTrainer(model=_model(NoLogitsModel), args=args, train_dataset=data).train()
    trainer = ImportanceSamplingTrainer(model=_model(), args=args, train_dataset=data)
    with pytest.raises(ValueError, match="`labels` tensor"):
        trainer.model.train()
        trainer.compute_loss(trainer.model, {"x": torch.zeros(2, 6)})
    with pytest.raises(TypeError, match="ImportanceSamplingConfig"):
        ImportanceSamplingTrainer(model=_model(), args=_args(tmp_path, TrainingArguments), train_dataset=data)
    with pytest.raises(ValueError, match="presample must be"):
        _args(tmp_path, presample=0.5)
    with pytest.raises(ValueError, match="score must be one of"):
        _args(tmp_path, score="entropy")
    with pytest.raises(ValueError, match="tau_threshold"):
        _args(tmp_path, tau_threshold=0.5)
    with pytest.raises(ValueError, match="loss_kind"):
        _args(tmp_path, loss_kind="ranking")

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(data)

    with pytest.raises(ValueError, match="map-style"):
        ImportanceSamplingTrainer(model=_model(), args=args, train_dataset=Stream()).get_train_dataloader()


def test_regression_and_custom_loss_scores(tmp_path):
    """Regression scores come from one batched backward: d (z - y)^2 / dz = 2 (z - y). A custom
    per-sample loss (here plain cross-entropy) reproduces the closed-form score."""
    g = torch.Generator().manual_seed(9)
    reg_data = [{"x": torch.randn(6, generator=g), "labels": torch.randn((), generator=g)} for _ in range(12)]
    model = _model(num_labels=1)
    trainer = ImportanceSamplingTrainer(
        model=model, args=_args(tmp_path, per_device_train_batch_size=4), train_dataset=reg_data
    )
    batch = trainer.data_collator(reg_data[:5])
    with torch.no_grad():
        z = model(batch["x"]).logits.squeeze(1)
    torch.testing.assert_close(trainer.score_samples(model, batch), 2 * (z - batch["labels"]).abs())

    def ce(logits, labels):
        return F.cross_entropy(logits, labels, reduction="none"), torch.ones(labels.shape[0])

    data = make_classification_data(12)
    model = _model()
    custom = ImportanceSamplingTrainer(
        model=model, args=_args(tmp_path, per_device_train_batch_size=4), train_dataset=data, per_sample_loss=ce
    )
    builtin = ImportanceSamplingTrainer(
        model=model, args=_args(tmp_path, per_device_train_batch_size=4), train_dataset=data
    )
    batch = custom.data_collator(data[:6])
    torch.testing.assert_close(custom.score_samples(model, batch), builtin.score_samples(model, batch))


def test_repeated_draws_are_trained_once_with_the_duplicated_batch_gradient(tmp_path):
    """An active step trains each distinct drawn row once; its gradient equals the explicit
    computation over every draw (duplicates included) with weights 1 / (B p)."""
    data = make_classification_data(32, seed=5)
    b = 8
    model = _model(seed=2).double()
    rec = Recorder()
    args = _args(tmp_path, per_device_train_batch_size=b, presample=2.0)
    trainer = ImportanceSamplingTrainer(model=model, args=args, train_dataset=data, callbacks=[rec])
    fixed = trainer.data_collator(data[:16])
    fixed["x"] = fixed["x"].double()
    trainer._draw_presample = lambda size, loader_batch=None: {k: v[:size] for k, v in fixed.items()}
    trained = []
    original_rows = trainer._rows

    def rows(inputs, index):
        trained.append(index.clone())
        return original_rows(inputs, index)

    trainer._rows = rows
    real_scores = trainer._scores_from_logits

    def concentrated(logits, labels, kind):  # a few rows hold most of the mass: repeats are certain
        s = real_scores(logits, labels, kind)
        return s * torch.tensor([40.0, 20.0, 10.0] + [0.05] * (s.numel() - 3), dtype=s.dtype)

    trainer._scores_from_logits = concentrated
    model.train()
    trainer.is_state.tau = 1e9
    model.zero_grad()
    trainer.compute_loss(model, {"labels": torch.zeros(1)}).backward()
    got = [p.grad.clone() for p in model.parameters()]
    event = rec.events[-1]
    draws, weights = event["indices"], event["weights"]
    assert draws.numel() == b and trained[-1].numel() < b  # duplicates existed and were merged
    assert trained[-1].tolist() == sorted(set(draws.tolist()))
    model.zero_grad()
    logits = model(fixed["x"][draws]).logits
    ref = (weights * F.cross_entropy(logits, fixed["labels"][draws], reduction="none")).sum() / b
    ref.backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-14)


def _exact_is_expectation(trainer, model, cases, b, monkeypatch):
    """Exact expectation of the trainer's importance-sampled gradient over `cases`, each
    ``(probability, loader rows, extra rows)``: the loader batch the step is given and the rows the
    trainer draws from the training set, and over every ordered b-tuple of draws from the presample
    (weighted by the product of their p)."""
    import itertools

    import hf_efficient.training.scores as module

    state = {}

    def enumerated_draws(p, num_samples, generator=None):
        state["p"] = p
        assert num_samples == len(state["draws"])
        return torch.tensor(state["draws"])

    monkeypatch.setattr(module, "draw_indices", enumerated_draws)
    expectation = None
    for probability, loader_rows, extra_rows in cases:
        loader_batch = trainer.data_collator([trainer.train_dataset[i] for i in loader_rows])
        trainer._presample_indices = lambda population, count, rows=list(extra_rows): rows
        for draws in itertools.product(range(len(loader_rows) + len(extra_rows)), repeat=b):
            state["draws"] = list(draws)
            trainer.is_state.tau = 1e9
            model.zero_grad()
            trainer.compute_loss(model, loader_batch).backward()
            prob = float(torch.prod(state["p"][list(draws)])) * probability
            grad = torch.cat([p.grad.flatten() for p in model.parameters()]) * prob
            expectation = grad if expectation is None else expectation + grad
    return expectation


@pytest.mark.parametrize(
    "model_dtype,score_dtype,rtol,atol",
    [(torch.float64, "model", 1e-10, 1e-12), (torch.float32, "bfloat16", 2e-5, 1e-6)],
    ids=["float64", "bfloat16-scores"],
)
def test_exact_expectation_of_the_importance_sampled_gradient_is_the_full_gradient(
    tmp_path, monkeypatch, model_dtype, score_dtype, rtol, atol
):
    """Enumerable: 6 examples, b = 2, B = 4: every loader batch (all 15 pairs, as a shuffled
    dataloader gives), every pair of extra rows the trainer draws (all 15, overlaps with the loader
    batch included) and every ordered pair of draws from the presample. The exact expectation of the
    weighted gradient equals the full-set mean gradient, to the model's rounding. With bfloat16 scores
    the sampling distribution changes but the weights 1 / (B p) follow it, so the same holds."""
    import itertools

    data = [{"x": e["x"].to(model_dtype), "labels": e["labels"]} for e in make_classification_data(6, seed=8)]
    model = _model(seed=3).to(model_dtype)
    with torch.no_grad():
        model.fc2.weight.mul_(6.0)  # confident on some rows, wrong on others: very unequal scores
    args = _args(tmp_path, per_device_train_batch_size=2, presample=2.0, score_dtype=score_dtype)
    trainer = ImportanceSamplingTrainer(model=model, args=args, train_dataset=data)
    model.train()
    pairs = list(itertools.combinations(range(6), 2))
    cases = [(1.0 / len(pairs) ** 2, d, e) for d in pairs for e in pairs]
    expectation = _exact_is_expectation(trainer, model, cases, 2, monkeypatch)
    model.zero_grad()
    full = trainer.data_collator(data)
    F.cross_entropy(model(full["x"]).logits, full["labels"]).backward()
    exact = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(expectation.to(model_dtype), exact, rtol=rtol, atol=atol)
    # The sampler is not uniform: the check has teeth (uniform weights would give another mean).
    scores = trainer.score_samples(model, full)
    assert float(scores.max() / scores.min()) > 2.0


def test_exact_expectation_for_a_token_task_is_the_presample_token_mean(tmp_path, monkeypatch):
    """Causal LM: given the presample (loader batch + drawn rows, here one row in both), the exact
    expectation over the draws is the presample's token-mean gradient (the trainer divides by its
    expected number of target tokens)."""
    data = make_lm_data(4, seed=9)
    model = _model(TinyForCausalLM, seed=4).double()
    args = _args(tmp_path, per_device_train_batch_size=2, presample=1.5)
    trainer = ImportanceSamplingTrainer(model=model, args=args, train_dataset=data)
    model.train()
    expectation = _exact_is_expectation(trainer, model, [(1.0, [0, 2], [2])], 2, monkeypatch)
    model.zero_grad()
    rows = trainer.data_collator([data[0], data[2], data[2]])
    logits = model(rows["input_ids"]).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, 11), rows["labels"][:, 1:].reshape(-1)).backward()
    exact = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(expectation, exact, rtol=1e-10, atol=1e-12)


def test_batch_size_one_switches_on(tmp_path):
    """b = 1: tau pools the last B scores, so peaked scores switch importance sampling on (tau from
    one score alone is always 1); the rows then come from presamples of B = 8. tau never exceeds
    sqrt(B), so a threshold at or above it is refused (the paper's default (B + 3) / 3 always is)."""
    with pytest.raises(ValueError, match=r"tau_threshold .* can never be reached"):
        _args(tmp_path, per_device_train_batch_size=1, presample=8.0)
    with pytest.raises(ValueError, match=r"tau_threshold .* can never be reached"):
        _args(tmp_path, per_device_train_batch_size=4, presample=1.0, tau_threshold=2.5)
    assert _args(tmp_path, per_device_train_batch_size=4, presample=2.0, backward_cost=1.0).resolved_tau_threshold == (
        pytest.approx((8 + 8) / 8)
    )
    data = make_classification_data(40, seed=6)
    rec = Recorder()
    args = _args(
        tmp_path, per_device_train_batch_size=1, presample=8.0, max_steps=30, tau_smoothing=0.5, tau_threshold=2.0
    )
    trainer = ImportanceSamplingTrainer(model=_model(), args=args, train_dataset=data, callbacks=[rec])
    original = trainer._scores_from_logits

    def peaked(logits, labels, kind):  # one sample in eight matters
        real = original(logits, labels, kind)
        out = torch.full_like(real, 1e-3)
        if real.numel() > 1:
            out[0] = 1.0
        elif trainer.is_state.steps % 8 == 0:
            out[0] = 1.0
        return out

    trainer._scores_from_logits = peaked
    trainer.train()
    assert trainer.is_state.active_steps > 0
    first = next(i for i, e in enumerate(rec.events) if e["is_active"])
    assert all(not e["is_active"] for e in rec.events[:first]) and first >= 8
    assert rec.events[first]["scores"].shape == (8,) and rec.events[first]["indices"].shape == (1,)
    # Independent check of the first switch: tau from the 8 pooled scores of the uniform steps.
    tau = 0.0
    for i, e in enumerate(rec.events[:first]):
        pooled = torch.cat([x["scores"] for x in rec.events[max(0, i - 7) : i + 1]])
        tau = 0.5 * tau + 0.5 * tau_from_scores(pooled)
        assert e["tau"] == pytest.approx(tau)
    assert tau > 2.0


def test_model_whose_forward_requires_labels(tmp_path):
    """Labels reach a forward that requires them: uniform training equals the stock Trainer bit for
    bit, and importance-sampled steps (scoring and training) run on the same model."""
    data = make_classification_data(48)
    kw = dict(per_device_train_batch_size=4, max_steps=4)
    stock_model, ours_model = _model(_tiny.TinyLabelsRequiredClassifier), _model(_tiny.TinyLabelsRequiredClassifier)
    Trainer(model=stock_model, args=_args(tmp_path / "a", TrainingArguments, **kw), train_dataset=data).train()
    ours = ImportanceSamplingTrainer(
        model=ours_model, args=_args(tmp_path / "b", tau_threshold=float("inf"), **kw), train_dataset=data
    )
    ours.train()
    for name, value in _params(stock_model).items():
        assert torch.equal(value, ours_model.state_dict()[name]), name
    model = _model(_tiny.TinyLabelsRequiredClassifier)
    trainer = ImportanceSamplingTrainer(
        model=model, args=_args(tmp_path / "c", tau_threshold=1.0001, tau_smoothing=0.0, **kw), train_dataset=data
    )
    trainer.train()
    assert trainer.is_state.active_steps == 3
    batch = trainer.data_collator(data[:5])
    want = cross_entropy_gradient_norm(model(batch["x"], batch["labels"]).logits, batch["labels"], "classification")
    torch.testing.assert_close(trainer.score_samples(model, batch), want)


def _recording_presamples(trainer):
    """Record (loader batch, presample) of each importance-sampled step."""
    seen, original_loss, original_score = [], trainer._importance_loss, trainer.score_samples

    def importance_loss(model, inputs):
        seen.append({"loader": {k: v.clone() for k, v in inputs.items()}})
        return original_loss(model, inputs)

    def score_samples(model, inputs):
        seen[-1]["presample"] = {k: v.clone() for k, v in inputs.items()}
        return original_score(model, inputs)

    trainer._importance_loss, trainer.score_samples = importance_loss, score_samples
    return seen


def test_presample_starts_with_the_loader_batch_and_an_epoch_is_one_pass(tmp_path):
    """Active steps score the dataloader's own batch plus B - b rows of the training set, so one
    epoch still passes every example through the step (no fetched batch is thrown away)."""
    data = make_classification_data(32, seed=10)
    args = _args(
        tmp_path,
        per_device_train_batch_size=4,
        presample=3.0,
        num_train_epochs=1,
        tau_threshold=1.0001,
        tau_smoothing=0.0,
    )
    trainer = ImportanceSamplingTrainer(model=_model(), args=args, train_dataset=data)
    seen = _recording_presamples(trainer)
    trainer.train()
    assert trainer.state.global_step == 8 and len(seen) == 7  # the first step is uniform
    rows = {tuple(e["x"].tolist()) for e in data}
    for step in seen:
        loader, presample = step["loader"], step["presample"]
        assert presample["x"].shape[0] == 12
        assert torch.equal(presample["x"][:4], loader["x"]) and torch.equal(presample["labels"][:4], loader["labels"])
        extra = [tuple(r.tolist()) for r in presample["x"][4:]]
        assert set(extra) <= rows and len(set(extra)) == 8  # distinct training rows


def test_presample_with_a_padding_collator_is_drawn_whole(tmp_path):
    """Batches padded to their own length cannot be stacked with the loader batch: the whole
    presample of B rows then comes from the training set, padded together."""
    g = torch.Generator().manual_seed(12)
    data = []
    for i in range(24):
        n = 3 + i % 5
        ids = torch.randint(0, 11, (n,), generator=g)
        data.append({"input_ids": ids, "labels": ids.clone()})

    def pad(examples):
        length = max(e["input_ids"].shape[0] for e in examples)
        ids = torch.zeros(len(examples), length, dtype=torch.long)
        labels = torch.full((len(examples), length), -100)
        for j, e in enumerate(examples):
            ids[j, : e["input_ids"].shape[0]] = e["input_ids"]
            labels[j, : e["labels"].shape[0]] = e["labels"]
        return {"input_ids": ids, "labels": labels}

    args = _args(tmp_path, per_device_train_batch_size=3, presample=2.0, max_steps=6, tau_threshold=1.0001)
    args.tau_smoothing = 0.0
    trainer = ImportanceSamplingTrainer(model=_model(TinyForCausalLM), args=args, train_dataset=data, data_collator=pad)
    seen = _recording_presamples(trainer)
    trainer.train()
    assert len(seen) == 5
    # Some loader batches were padded otherwise than the presample: those presamples were drawn whole.
    assert any(st["loader"]["input_ids"].shape[1] != st["presample"]["input_ids"].shape[1] for st in seen)
    lengths = {e["input_ids"].shape[0] for e in data}
    for step in seen:
        presample = step["presample"]
        assert presample["input_ids"].shape[0] == 6
        assert presample["input_ids"].shape[1] == max((presample["labels"] != -100).sum(1).tolist())
        assert set((presample["labels"] != -100).sum(1).tolist()) <= lengths


def test_score_dtype_resolution(tmp_path, monkeypatch):
    """'auto' casts the scoring forward to bfloat16 only for a float32 model on hardware with native
    bfloat16 products; 'model' never casts; an unknown setting is refused by name."""
    import hf_efficient.training.importance_sampling as module

    model = _model()
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(module, "native_bfloat16", lambda device, native=native: native)
        assert module.scoring_autocast_dtype("auto", model, cpu) == (torch.bfloat16 if native else None)
        assert module.scoring_autocast_dtype("auto", _model().double(), cpu) is None
        assert module.scoring_autocast_dtype("model", model, cpu) is None
        assert module.scoring_autocast_dtype("bfloat16", model, cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="score_dtype must be one of auto, model, bfloat16, float16"):
        _args(tmp_path, score_dtype="bf16")


def test_bfloat16_scoring_runs_in_bfloat16_and_stays_close(tmp_path):
    """score_dtype='bfloat16': the presample's forward runs in bfloat16 (its logits are bfloat16), the
    scores stay within bfloat16 rounding of the float32 scores, and training stays in float32."""
    data = make_classification_data(32, seed=3)
    model = _model(seed=2)
    seen = []
    model.register_forward_hook(lambda m, i, out: seen.append(out.logits.dtype))
    trainer = ImportanceSamplingTrainer(
        model=model, args=_args(tmp_path, per_device_train_batch_size=4, score_dtype="bfloat16"), train_dataset=data
    )
    batch = trainer.data_collator(data)
    got = trainer.score_samples(model, batch)
    assert seen == [torch.bfloat16] and got.dtype == torch.float32
    with torch.no_grad():
        want = cross_entropy_gradient_norm(model(batch["x"]).logits, batch["labels"], "classification")
    torch.testing.assert_close(got, want, rtol=0.05, atol=1e-3)
    assert not torch.equal(got, want)  # it did score in another precision
    seen.clear()
    trainer.is_state.tau = 1e9
    trainer.compute_loss(model, batch).backward()
    assert seen == [torch.bfloat16, torch.float32]  # scoring, then the trained rows in float32
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
