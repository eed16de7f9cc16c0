"""Tiny models and datasets built in the tests: fast, and their losses are known exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput, SequenceClassifierOutput


class TinyConfig(PretrainedConfig):
    model_type = "tiny_importance_mlp"

    def __init__(self, in_dim: int = 6, hidden: int = 8, num_labels: int = 3, vocab: int = 11, **kwargs):
        super().__init__(num_labels=num_labels, **kwargs)
        self.in_dim, self.hidden, self.vocab = in_dim, hidden, vocab


class TinyClassifier(PreTrainedModel):
    """``x (batch, in_dim) -> logits (batch, num_labels)``; its own loss is the mean cross-entropy."""

    config_class = TinyConfig
    base_model_prefix = "tiny"

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.fc1 = nn.Linear(config.in_dim, config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.num_labels)

    def _init_weights(self, module):  # keep torch's default initialisation: seeded, reproducible
        pass

    def forward(self, x, labels=None):
        logits = self.fc2(torch.tanh(self.fc1(x)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class TinyKwargsClassifier(TinyClassifier):
    """Accepts ``**kwargs`` (so the stock Trainer passes ``num_items_in_batch``) but ignores them."""

    def forward(self, x, labels=None, **kwargs):
        return super().forward(x, labels)


class TinyLabelsRequiredClassifier(TinyClassifier):
    """A forward that cannot run without ``labels`` (it always returns its loss)."""

    def forward(self, x, labels):
        return super().forward(x, labels)


class TinyForCausalLM(PreTrainedModel):
    """Bag-of-previous-token language model: ``input_ids (batch, seq) -> logits (batch, seq, vocab)``."""

    config_class = TinyConfig
    base_model_prefix = "tiny"

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab, config.hidden)
        self.head = nn.Linear(config.hidden, config.vocab)

    def _init_weights(self, module):
        pass

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(torch.tanh(self.embed(input_ids).cumsum(dim=1)))
        return CausalLMOutput(logits=logits)


class NoLogitsModel(TinyClassifier):
    def forward(self, x, labels=None):
        return {"scores": self.fc2(torch.tanh(self.fc1(x)))}


def make_classification_data(n: int, in_dim: int = 6, num_labels: int = 3, seed: int = 0):
    """A list of ``{"x", "labels"}`` dicts: a noisy linear problem with some hard examples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g)
    w = torch.randn(in_dim, num_labels, generator=g)
    y = (x @ w + 0.8 * torch.randn(n, num_labels, generator=g)).argmax(dim=1)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def make_lm_data(n: int, seq: int = 7, vocab: int = 11, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    labels = ids.clone()
    # Ignore a random tail of each sequence, as padding would.
    for i in range(n):
        cut = int(torch.randint(3, seq + 1, (1,), generator=g))
        labels[i, cut:] = -100
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]
