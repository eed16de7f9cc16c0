"""The linear-lm family: generation with the recurrent cache against the uncached full forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from hf_efficient import LinearAttentionCache, LinearLMConfig, LinearLMForCausalLM
from hf_efficient.attention.linear import linear_attention_reference

VOCAB = 40


def tiny(feature_map: str = "elu", position_embedding: str = "rope", seed: int = 0) -> LinearLMForCausalLM:
    """A float64 model with large weights, so greedy decoding does not collapse to one token."""
    torch.manual_seed(seed)
    config = LinearLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, feature_map=feature_map, position_embedding=position_embedding,
                            chunk_size=4, initializer_range=0.3, pad_token_id=0)
    return LinearLMForCausalLM(config).double().eval()


def greedy_reference(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Argmax of the full forward over the whole prefix at every step (no cache)."""
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(seq, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("feature_map,position", [("elu", "rope"), ("relu", "none"), ("hedgehog", "rope")])
def test_greedy_generate_matches_full_forward(feature_map, position):
    model = tiny(feature_map, position)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, LinearAttentionCache)  # built by generate() itself
    assert out.cache.get_seq_length() == 9 + 12 - 1  # the last token is never fed back
    ref = greedy_reference(model, ids, 12)
    assert torch.equal(out.sequences, ref)
    assert len(set(ref[0, 9:].tolist())) > 2  # a real sequence, not one repeated token


def test_sampled_generate_matches_uncached():
    model = tiny()
    ids = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(123)
    cached = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=0)
    torch.manual_seed(123)
    uncached = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_left_padded_batch_equals_single_generation():
    model = tiny()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen) for n in (11, 5, 8)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=8, do_sample=False)
        assert torch.equal(batched[i, width:], single[0, len(p):]), f"prompt {i}"


def test_beam_search_matches_uncached():
    model = tiny()
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, early_stopping=True)
    cached = model.generate(ids, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_cache_size_is_constant_in_generated_tokens():
    model = tiny()
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    sizes = []
    for steps in (2, 10, 40):
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             return_dict_in_generate=True)
        sizes.append(out.cache.nbytes())
    c = model.config
    m = d = c.head_dim  # elu features keep the head dimension
    expected = c.num_hidden_layers * 2 * c.num_attention_heads * (m * d + m) * 8  # float64 S and z
    assert sizes == [expected] * 3


def test_prefill_then_steps_equals_full_logits():
    model = tiny("hedgehog")
    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = LinearAttentionCache(model.config.num_hidden_layers)
        parts = [model(ids[:, :7], cache=cache).logits]  # chunked prefill (7 = 4 + 3: a partial chunk)
        parts.append(model(ids[:, 7:10], cache=cache).logits)  # a second prefill seeded with the state
        for t in range(10, 13):  # recurrent steps
            parts.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-10)


def test_attention_layer_matches_quadratic_reference():
    """One attention module against the O(N^2) definition of causal linear attention."""
    model = tiny(position_embedding="none")
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x, None, None, None)
        q, k, v = (p(x).view(2, 10, 4, 8).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        ref = linear_attention_reference(q, k, v, causal=True, feature_map="elu")
        ref = attn.o_proj(ref.transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_save_load_round_trip(tmp_path):
    model = tiny("hedgehog")
    with torch.no_grad():  # make the learnable feature maps differ from their initialisation
        for layer in model.model.layers:
            layer.self_attn.feature_map.weight.add_(0.1 * torch.randn_like(layer.self_attn.feature_map.weight))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "linear-lm"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert isinstance(loaded, LinearLMForCausalLM)
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert torch.equal(loaded.generate(ids, max_new_tokens=5, do_sample=False),
                       model.generate(ids, max_new_tokens=5, do_sample=False))


def test_trains_with_stock_trainer(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LinearLMConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, chunk_size=8)
    model = LinearLMForCausalLM(config)
    # A learnable pattern: each row counts up modulo 16 from a random start.
    starts = torch.randint(0, 16, (64,))
    rows = ((starts[:, None] + torch.arange(24)[None]) % 16).tolist()
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=12,
                             learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < 0.8 * losses[0]


def test_bad_inputs_are_refused():
    model = tiny()
    ids = torch.randint(1, VOCAB, (1, 4))
    with pytest.raises(TypeError, match="LinearAttentionCache"):
        model(ids, cache=DynamicCache())
    with pytest.raises(TypeError, match="LinearAttentionCache"):
        model.generate(ids, cache=DynamicCache(), max_new_tokens=2)
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(ids, cache_implementation="static", max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="feature_map"):
        LinearLMConfig(feature_map="cosine")
    with pytest.raises(ValueError, match="multiple"):
        LinearLMConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="position_embedding"):
        LinearLMConfig(position_embedding="alibi")
    cache = LinearAttentionCache(2)
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="cannot remove tokens"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="batch"):
        model(torch.randint(1, VOCAB, (3, 1)), cache=cache)


def test_rotary_frequencies_follow_the_config_and_the_grad_mode():
    """The rotary frequencies are kept between calls: a changed rope_theta must be seen, and a training step after
    an inference_mode call still runs backward."""
    model = tiny()
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.inference_mode():
        model(ids)
    model.config.rope_theta = 500.0
    got = model(ids).logits
    fresh = tiny()
    fresh.config.rope_theta = 500.0
    torch.testing.assert_close(got, fresh(ids).logits, rtol=0, atol=0)
    got.sum().backward()  # after the inference-mode call: trains
    assert model.lm_head.weight.grad is not None
    model.config.rope_theta = 10000.0
    assert not torch.equal(model(ids).logits, got)
