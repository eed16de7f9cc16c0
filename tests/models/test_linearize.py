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
    distillation_loss,
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
    with pytest.raises(ValueError, match="finetune_params"):
        LinearizeConfig(finetune_params="everything")
    with pytest.raises(ValueError, match="finetune_loss"):
        LinearizeConfig(finetune_loss="mse")


def test_distillation_loss_matches_kl_div():
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    teacher_lp = torch.log_softmax(teacher, -1)
    expected = torch.nn.functional.kl_div(torch.log_softmax(student, -1), teacher_lp, log_target=True,
                                          reduction="sum") / 10
    assert distillation_loss(student, teacher_lp).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(teacher, teacher_lp).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss_kind", ["distill", "lm"])
def test_finetune_trains_only_feature_maps_of_linear_layers(loss_kind):
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    train = [torch.randint(0, 48, (16,), generator=gen) for _ in range(2)]
    config = LinearizeConfig(transfer_steps=2, finetune_steps=3, finetune_loss=loss_kind, keep_softmax_first=1)
    linearize(model, train, config)
    for name, p in model.named_parameters():
        if name in before:  # the original weights are untouched, and trainable again afterwards
            assert torch.equal(p, before[name]), name
            assert p.requires_grad, name
    # Layer 0 stays softmax (no feature map); layer 1's map moved during transfer + fine-tune.
    assert not hasattr(model.model.layers[0].self_attn, "hf_efficient_feature_map")
    fmap = model.model.layers[1].self_attn.hf_efficient_feature_map
    assert not torch.equal(fmap.weight, torch.eye(8).expand(4, 8, 8))
    steps = [e["loss"] for e in config.log if "finetune_step" in e]
    assert len(steps) == 3 and all(math.isfinite(v) and v >= 0 for v in steps)


def test_finetune_qk_also_trains_linear_layer_projections():
    model = tiny_llama()
    q0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    q1 = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    train = [torch.randint(0, 48, (16,), generator=torch.Generator().manual_seed(4))]
    linearize(model, train, transfer_steps=1, finetune_steps=2, finetune_params="feature_maps+qk",
              keep_softmax_first=1)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q0)  # softmax layer untouched
    assert not torch.equal(model.model.layers[1].self_attn.q_proj.weight, q1)


def test_window_transfer_loss_is_exact_when_the_window_covers_everything_but_the_tail():
    # With q = 0 the softmax rows are uniform; with a constant feature map (weight 1 per old key) and
    # exp(0 - 0) = 1 per window key, window-linear is uniform too: the loss is the uniform entropy,
    # over the rows past the window only.
    n, w = 7, 3
    q, k = torch.zeros(1, 2, n, 4, dtype=torch.float64), torch.randn(1, 2, n, 4, dtype=torch.float64)
    loss = attention_transfer_loss(lambda x: torch.ones_like(x[..., :1]), q, k, 0.5, window=w)
    expected = sum(math.log(i + 1) for i in range(w, n)) / (n - w)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_linearize_window_linear_fits_and_decodes_with_its_cache():
    from hf_efficient.integrations.cache import WindowLinearAttentionLayer

    model = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    train = [torch.randint(0, 48, (24,), generator=gen) for _ in range(2)]
    store: dict = {}
    with torch.no_grad(), capture_queries_keys(model, store):
        model(train[0][None])
    attn = model.model.layers[1].self_attn
    q, k, scaling = store[attn]
    k = k.repeat_interleave(2, dim=1)
    config = LinearizeConfig(kind="window-linear", window=4, transfer_steps=30, transfer_lr=3e-2)
    linearize(model, train, config)
    assert model.config.hf_efficient["kind"] == "window-linear"
    fmap = attn.hf_efficient_feature_map
    with torch.no_grad():
        after = attention_transfer_loss(fmap, q, k, scaling, window=4).item()
        fmap.weight.copy_(torch.eye(8).expand(4, 8, 8))
        fmap.bias.zero_()
        before = attention_transfer_loss(fmap, q, k, scaling, window=4).item()
    assert after < before - 0.01
    ids = train[0][None, :8]
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache.layers[1], WindowLinearAttentionLayer)
    assert torch.equal(out.sequences, model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False))
    with pytest.raises(ValueError, match="kind"):
        LinearizeConfig(kind="clustered")
    with pytest.raises(ValueError, match="window"):
        LinearizeConfig(window=0)


def test_lora_finetune_merges_into_the_linearised_layers_only(monkeypatch):
    pytest.importorskip("peft", reason="finetune_params='lora' needs peft (the test extra installs it)")
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train = [torch.randint(0, 48, (16,), generator=torch.Generator().manual_seed(5))]
    config = LinearizeConfig(transfer_steps=1, finetune_steps=3, finetune_params="lora", finetune_lr=1e-2,
                             keep_softmax_first=1, lora_rank=2)
    linearize(model, train, config)
    layers = model.model.layers
    assert type(layers[1].self_attn.q_proj) is torch.nn.Linear  # adapters merged and removed
    assert not any("lora" in name for name, _ in model.named_parameters())
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        key = f"model.layers.1.self_attn.{name}.weight"
        assert not torch.equal(getattr(layers[1].self_attn, name).weight, before[key]), name
        key0 = f"model.layers.0.self_attn.{name}.weight"
        assert torch.equal(getattr(layers[0].self_attn, name).weight, before[key0]), name  # softmax layer
    assert torch.equal(layers[1].mlp.up_proj.weight, before["model.layers.1.mlp.up_proj.weight"])
    assert all(p.requires_grad for p in model.parameters())
    ids = train[0][None, :8]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False))
    monkeypatch.setitem(__import__("sys").modules, "peft", None)
    with pytest.raises(ImportError, match="pip install peft"):
        linearize(tiny_llama(), train, transfer_steps=1, finetune_steps=1, finetune_params="lora")
