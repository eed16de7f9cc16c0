"""A real tokenizer, a `datasets.Dataset` and a padding collator through ImportanceSamplingTrainer:
with resampling off it equals the stock Trainer; with it on, presamples are collated and padded."""

from __future__ import annotations

import functools

import datasets
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_efficient.assets import minilm_path, require_asset
from hf_efficient.training import ImportanceSamplingCallback, ImportanceSamplingConfig, ImportanceSamplingTrainer

TEXTS = [
    "a gripping, funny film",
    "dull",
    "the plot goes nowhere and the acting is wooden",
    "a small gem",
    "i wanted my two hours back",
    "beautifully shot, with a heart",
    "tedious and overlong",
    "one of the year's best",
    "not worth it",
    "charming",
    "a mess from start to finish, loud and empty",
    "smart, tender, and surprising",
]


def _setup(tmp_path):
    require_asset("minilm")
    return _cached_setup()


@functools.cache
def _cached_setup():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    ds = datasets.Dataset.from_dict({"text": TEXTS * 2, "label": [1, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1] * 2})
    ds = ds.map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return tokenizer, ds, config


def _model(config):
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


COMMON = dict(
    per_device_train_batch_size=4,
    max_steps=3,
    learning_rate=1e-2,
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    save_strategy="no",
    seed=3,
)


def test_text_classification_matches_stock_when_off(tmp_path):
    tokenizer, ds, config = _setup(tmp_path)
    collator = DataCollatorWithPadding(tokenizer)
    stock, ours = _model(config), _model(config)
    Trainer(
        model=stock, args=TrainingArguments(str(tmp_path / "a"), **COMMON), train_dataset=ds, data_collator=collator
    ).train()
    trainer = ImportanceSamplingTrainer(
        model=ours,
        args=ImportanceSamplingConfig(str(tmp_path / "b"), tau_threshold=float("inf"), **COMMON),
        train_dataset=ds,
        data_collator=collator,
    )
    trainer.train()
    for name, value in stock.state_dict().items():
        assert torch.equal(value, ours.state_dict()[name]), name


def test_text_classification_presamples_with_padding(tmp_path):
    tokenizer, ds, config = _setup(tmp_path)
    seen = []

    class Shapes(ImportanceSamplingCallback):
        def on_importance_scores(self, args, state, control, *, scores, is_active, **kw):
            seen.append((is_active, tuple(scores.shape)))

    model = _model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = ImportanceSamplingConfig(str(tmp_path), tau_threshold=1.0, tau_smoothing=0.0, **COMMON)
    trainer = ImportanceSamplingTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[Shapes()],
    )
    trainer.train()
    assert seen[0] == (False, (4,)) and all(s == (True, (12,)) for s in seen[1:])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
