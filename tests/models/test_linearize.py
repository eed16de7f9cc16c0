"""Attention transfer: the loss against exact formulas, and linearize() on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_efficient import LinearAttentionCache
from hf_efficient.training.linearize import (
    LinearizeConfig,
    attention_transfer_loss,
    capture_queries_keys,
    linearize,
)


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5)
    return LlamaForCausalLM(config).eval()


def test_transfer_loss_exact_for_uniform_attention():
    # q = 0 makes softmax uniform over the causal prefix; a constant feature map does the same.
    # The cross-entropy is then the mean entropy of a uniform distribution over i + 1 keys.
    n = 6
    q, k = torch.zeros(1, 2, n, 4, dtype=torch.float64), torch.randn(1, 2, n, 4, dtype=torch.float64)
    loss = attention_transfer_loss(lambda x: torch.ones_like(x), q, k, 0.5)
    expected = sum(math.log(i + 1) for i in range(n)) / n
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_capture_records_the_softmax_inputs():
    model = tiny_llama()
    ids = torch.randint(0, 48, (1, 10))
    store: dict = {}
    with torch.no_grad(), capture_queries_keys(model, store):
        logits = model(ids).logits
    assert len(store) == 2
    q, k, scaling = store[model.model.layers[0].self_attn]
    assert q.shape == (1, 4, 10, 8) and k.shape == (1, 2, 10, 8) and scaling == 8**-0.5
    with torch.no_grad():  # the override is gone: the model runs as before
        torch.testing.assert_close(model(ids).logits, logits)


def test_linearize_brings_linear_attention_closer_to_softmax():
    model = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    train = [torch.randint(0, 48, (24,), generator=gen) for _ in range(2)]
    probe = train[0][None]  # random weights and tokens: there is nothing to generalise, so fit is measured
    store: dict = {}
    with torch.no_grad(), capture_queries_keys(model, store):
        model(probe)
    attn = model.model.layers[1].self_attn
    q, k, scaling = store[attn]
    k = k.repeat_interleave(2, dim=1)
    config = LinearizeConfig(transfer_steps=30, transfer_lr=3e-2)
    linearize(model, train, config)
    fmap = attn.hf_efficient_feature_map
    with torch.no_grad():
        after = attention_transfer_loss(fmap, q, k, scaling).item()
        fmap.weight.copy_(torch.eye(8).expand(4, 8, 8))  # back to the untrained (identity) map
        fmap.bias.zero_()
        before = attention_transfer_loss(fmap, q, k, scaling).item()
    assert after < before - 0.02
    assert [entry["layer"] for entry in config.log if "layer" in entry] == [0, 1]
    # The linearised model decodes with the recurrent cache exactly as without a cache.
    ids = probe[:, :8]
    out = model.generate(ids, max_new_tokens=6, do_sample=False, cache=LinearAttentionCache.from_model(model))
    assert torch.equal(out, model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False))


def test_linearize_refuses_bad_input():
    with pytest.raises(ValueError, match="transfer_steps"):
        LinearizeConfig(transfer_steps=-1)
    with pytest.raises(ValueError, match="feature map"):
        LinearizeConfig(feature_map="nope")
    with pytest.raises(ValueError, match="at least one window"):
        linearize(tiny_llama(), [])
