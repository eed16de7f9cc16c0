"""patch_model on the real offline all-MiniLM-L6-v2 encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from hf_efficient.assets import require_asset
from hf_efficient.integrations import patch_model, unpatch_model

SENTENCES = [
    "The play opens on a cold night at Elsinore, where two guards have seen a ghost.",
    "A short one.",
    "Linear attention replaces the softmax by a kernel, so its cost grows linearly with the length of the text.",
]


def _load():
    path = require_asset("minilm")
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _pooled(model, batch):
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    return tokens, (tokens * mask).sum(1) / mask.sum(1)


def test_minilm_padding_invariance_and_unpatch():
    model, tokenizer = _load()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all())  # the batch really is padded
    tokens_before, pooled_before = _pooled(model, batch)
    patch_model(model, "linear", keep_softmax_first=1)
    tokens, pooled = _pooled(model, batch)
    for i, text in enumerate(SENTENCES):
        alone, _ = _pooled(model, tokenizer([text], return_tensors="pt"))
        n = alone.shape[1]
        torch.testing.assert_close(tokens[i : i + 1, :n], alone, atol=1e-4, rtol=1e-4)
    # an approximation, not a copy: close to the sentence embedding but not equal
    cosine = F.cosine_similarity(pooled, pooled_before)
    assert (cosine < 0.9999).all() and (cosine > 0.3).all()
    unpatch_model(model)
    tokens_after, _ = _pooled(model, batch)
    assert torch.equal(tokens_after, tokens_before)


def test_minilm_all_softmax_layers_match_unpatched():
    model, tokenizer = _load()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    before, _ = _pooled(model, batch)
    patch_model(model, "linear", layers=[])
    after, _ = _pooled(model, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(after[real], before[real], atol=1e-5, rtol=1e-5)
