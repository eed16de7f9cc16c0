"""Attention transfer: the loss against exact formulas, and linearize() on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_efficient import LinearAttentionCache
from hf_efficient.decoding import DecodeLinear
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
    # adapters merged and removed: the plain linear layer again (DecodeLinear: patch_model's nn.Linear for decoding)
    assert type(layers[1].self_attn.q_proj) is DecodeLinear
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


# --------------------------------------------------------------------------- encoders and padding
def tiny_bert(head: str = "BertForMaskedLM"):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.5,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return getattr(transformers, head)(config).eval()


def test_bidirectional_transfer_loss_exact_for_uniform_attention():
    # q = 0: softmax is uniform over every real key, as is a constant feature map; the loss is the
    # entropy log(#real keys), averaged over the real query rows only.
    n, real = 7, 5
    q, k = torch.zeros(2, 3, n, 4, dtype=torch.float64), torch.randn(2, 3, n, 4, dtype=torch.float64)
    ones = lambda x: torch.ones_like(x)  # noqa: E731
    assert attention_transfer_loss(ones, q, k, 0.5, causal=False).item() == pytest.approx(math.log(n), rel=1e-5)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[:, real:] = False
    loss = attention_transfer_loss(ones, q, k, 0.5, causal=False, key_padding_mask=mask)
    assert loss.item() == pytest.approx(math.log(real), rel=1e-5)


def test_causal_transfer_loss_with_left_padding_is_exact():
    # Left padding of p tokens: real row i sees keys p..i, a uniform row of i - p + 1 keys.
    n, p = 8, 3
    q, k = torch.zeros(1, 2, n, 4, dtype=torch.float64), torch.randn(1, 2, n, 4, dtype=torch.float64)
    mask = torch.arange(n)[None] >= p
    loss = attention_transfer_loss(lambda x: torch.ones_like(x), q, k, 0.5, key_padding_mask=mask)
    expected = sum(math.log(i - p + 1) for i in range(p, n)) / (n - p)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_transfer_loss_matches_a_float64_loop_on_random_rows():
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 2, 6, 4, generator=gen, dtype=torch.float64), torch.randn(2, 2, 6, 4, generator=gen,
                                                                                      dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    for causal in (True, False):
        total, rows = 0.0, 0
        for b in range(2):
            for h in range(2):
                for i in range(6):
                    if not mask[b, i]:
                        continue
                    keys = [j for j in range(6) if mask[b, j] and (j <= i or not causal)]
                    logits = torch.stack([q[b, h, i] @ k[b, h, j] * 0.5 for j in keys])
                    target = torch.softmax(logits, 0)
                    scores = torch.stack([phi(q[b, h, i]) @ phi(k[b, h, j]) for j in keys])
                    predicted = scores / (scores.sum() + 1e-6)
                    total += -(target * torch.log(predicted + 1e-6)).sum().item()
                    rows += 1
        loss = attention_transfer_loss(phi, q, k, 0.5, causal=causal, key_padding_mask=mask)
        assert loss.item() == pytest.approx(total / rows, rel=1e-6)  # the softmax logits are float32


def pooled_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.mean(1), b.mean(1), dim=-1).mean().item()


def test_linearize_encoder_fits_bidirectional_attention():
    from hf_efficient import patch_model

    gen = torch.Generator().manual_seed(1)
    train = [torch.randint(0, 48, (2, 24), generator=gen) for _ in range(2)]
    reference = tiny_bert("BertModel")
    with torch.no_grad():
        expected = reference(input_ids=train[0]).last_hidden_state
        store: dict = {}
        with capture_queries_keys(reference, store):
            reference(input_ids=train[0])
    attn = reference.encoder.layer[1].attention.self
    q, k, scaling = store[attn]
    untrained = patch_model(tiny_bert("BertModel"), "linear", feature_map="hedgehog")
    config = LinearizeConfig(transfer_steps=40, transfer_lr=3e-2)
    model = linearize(tiny_bert("BertModel"), train, config)
    assert config.log[0]["causal"] is False
    fmap = model.encoder.layer[1].attention.self.hf_efficient_feature_map
    with torch.no_grad():
        fitted = attention_transfer_loss(fmap, q, k, scaling, causal=False).item()
        identity = attention_transfer_loss(untrained.encoder.layer[1].attention.self.hf_efficient_feature_map, q, k,
                                           scaling, causal=False).item()
        # fitted on full rows: the causal rows (which a decoder fit would use) are not what it learned
        assert fitted < identity - 0.02
        out = model(input_ids=train[0]).last_hidden_state
        base = untrained(input_ids=train[0]).last_hidden_state
    # closer to the unpatched encoder than the same patch with the untrained map
    assert pooled_cosine(out, expected) > pooled_cosine(base, expected)
    assert ((out - expected).norm() < (base - expected).norm())


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama], ids=["encoder", "decoder"])
def test_padding_in_windows_is_honoured(make):
    # A right-padded window with its attention_mask trains exactly as the unpadded window: padded keys
    # get no weight, padded queries no loss. Ignoring the mask would fit on the padding too.
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 48, (1, 12), generator=gen)
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 6)], dim=1).long()
    plain = linearize(make(), [ids], transfer_steps=8, transfer_lr=3e-2)
    masked = linearize(make(), [{"input_ids": padded, "attention_mask": mask}], transfer_steps=8, transfer_lr=3e-2)
    unmasked = linearize(make(), [padded], transfer_steps=8, transfer_lr=3e-2)
    for (name, p), (_, m) in zip(plain.named_parameters(), masked.named_parameters()):
        if "hf_efficient_feature_map" in name:
            torch.testing.assert_close(m, p, atol=1e-4, rtol=1e-4)
    moved = [(u - p).abs().max().item() for (name, p), (_, u) in zip(plain.named_parameters(),
                                                                     unmasked.named_parameters())
             if "hf_efficient_feature_map" in name]
    assert max(moved) > 1e-3  # the test can tell padding fitted from padding ignored


def test_encoder_distillation_on_hidden_states():
    from hf_efficient.training.linearize import hidden_distillation_loss

    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    assert hidden_distillation_loss(a, b).item() == pytest.approx(torch.nn.functional.mse_loss(a, b).item(), rel=1e-6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.nn.functional.mse_loss(a[mask], b[mask])
    assert hidden_distillation_loss(a, b, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    model = tiny_bert("BertModel")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = [torch.randint(0, 48, (2, 16), generator=gen)]
    config = LinearizeConfig(transfer_steps=2, finetune_steps=4, finetune_lr=1e-2)
    linearize(model, train, config)
    losses = [e["loss"] for e in config.log if "finetune_step" in e]
    assert len(losses) == 4 and losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name


def test_feature_map_finetune_runs_the_frozen_model_without_dropout():
    # The teacher ran in eval mode; fitting feature maps against a student with dropout would fit noise.
    # With a learning rate too small to move anything, two steps on the same window give the same loss.
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=48, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.9)
    model = transformers.BertModel(config).eval()
    log = LinearizeConfig(transfer_steps=1, finetune_steps=2, finetune_lr=1e-12)
    linearize(model, [torch.randint(0, 48, (1, 16), generator=torch.Generator().manual_seed(4))], log)
    first, second = [e["loss"] for e in log.log if "finetune_step" in e]
    assert second == pytest.approx(first, rel=1e-5)
    assert not model.training


def test_hidden_states_distillation_loss_matches_a_float64_loop():
    from hf_efficient.training.linearize import hidden_states_distillation_loss

    gen = torch.Generator().manual_seed(5)
    # layers of very different scale: each weighs the same once made relative
    teacher = [torch.randn(2, 5, 6, generator=gen) * scale for scale in (0.1, 1.0, 30.0)]
    student = [t + torch.randn(2, 5, 6, generator=gen) * 0.3 for t in teacher]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    terms = []
    for s, t in zip(student, teacher):
        error = scale = 0.0
        for b in range(2):
            for i in range(5):
                if mask[b, i]:
                    error += sum((float(s[b, i, j]) - float(t[b, i, j])) ** 2 for j in range(6))
                    scale += sum(float(t[b, i, j]) ** 2 for j in range(6))
        terms.append(error / scale)
    loss = hidden_states_distillation_loss(student, teacher, mask)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # padded positions are left out: changing them changes nothing
    noisy = [s.clone() for s in student]
    for s in noisy:
        s[0, 3:] += 100.0
    assert hidden_states_distillation_loss(noisy, teacher, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match="as many student as teacher layers"):
        hidden_states_distillation_loss(student[:2], teacher, mask)


def layer_errors(model, reference, ids: torch.Tensor) -> list[float]:
    """Relative squared error of every layer's hidden states against the unpatched model."""
    with torch.no_grad():
        got = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
        want = reference(input_ids=ids, output_hidden_states=True).hidden_states[1:]
    return [((g - w).pow(2).sum() / w.pow(2).sum()).item() for g, w in zip(got, want)]


def test_layerwise_distillation_lowers_every_layers_error_below_transfer_alone():
    gen = torch.Generator().manual_seed(6)
    train = [torch.randint(0, 48, (2, 20), generator=gen) for _ in range(2)]
    reference = tiny_bert("BertModel")
    transfer = linearize(tiny_bert("BertModel"), train, transfer_steps=20, transfer_lr=3e-2)
    config = LinearizeConfig(transfer_steps=20, transfer_lr=3e-2, finetune_steps=30, finetune_lr=1e-2,
                             finetune_loss="distill_layers")
    distilled = linearize(tiny_bert("BertModel"), train, config)
    before, after = layer_errors(transfer, reference, train[0]), layer_errors(distilled, reference, train[0])
    assert all(a < 0.8 * b for a, b in zip(after, before)), (before, after)
    losses = [e["loss"] for e in config.log if "finetune_step" in e]
    assert losses[-1] < losses[0]
    # only the feature maps trained: every weight of the model is the reference's
    weights = dict(reference.named_parameters())
    for name, p in distilled.named_parameters():
        if "hf_efficient_feature_map" not in name:
            assert torch.equal(p, weights[name]), name


def test_finetune_qk_trains_an_encoders_query_and_key_projections():
    # BERT names them query/key; the option once trained nothing more than the maps there.
    model = tiny_bert("BertModel")
    attn = model.encoder.layer[1].attention.self
    before = {name: getattr(attn, name).weight.detach().clone() for name in ("query", "key", "value")}
    train = [torch.randint(0, 48, (1, 16), generator=torch.Generator().manual_seed(4))]
    linearize(model, train, transfer_steps=1, finetune_steps=2, finetune_lr=1e-2, finetune_params="feature_maps+qk")
    assert not torch.equal(attn.query.weight, before["query"])
    assert not torch.equal(attn.key.weight, before["key"])
    assert torch.equal(attn.value.weight, before["value"])
