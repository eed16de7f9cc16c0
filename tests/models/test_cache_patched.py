"""Stock decoders patched with linear attention decode with LinearAttentionCache as they do uncached."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.cache_utils import DynamicLayer

from hf_efficient import LinearAttentionCache
from hf_efficient.integrations import patch_model
from hf_efficient.integrations.cache import LinearStateLayer, RecurrentStateLayer

VOCAB = 48


def build(arch: str):
    torch.manual_seed(0)
    if arch == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, pad_token_id=0)
        model = LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, pad_token_id=0)
        model = Qwen2ForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = GPT2LMHeadModel(config)
    return model.double().eval()


@pytest.mark.parametrize("arch,feature_map", [("llama", "elu"), ("qwen2", "elu"), ("gpt2", "elu"),
                                               ("gpt2", "hedgehog")])
def test_cached_generation_equals_uncached(arch, feature_map):
    model = patch_model(build(arch), "linear", feature_map=feature_map, chunk_size=4)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    cache = LinearAttentionCache.from_model(model)
    out = model.generate(ids, max_new_tokens=10, do_sample=False, cache=cache, return_dict_in_generate=True)
    ref = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, ref)
    assert out.cache is cache
    assert all(cache.recurrent_state(i) is not None for i in range(2))
    # Constant size: 2 layers x batch 2 x 4 query heads x (m x d + m), float64.
    m = 8 if feature_map == "elu" else 16
    assert cache.nbytes() == 2 * 2 * 4 * (m * 8 + m) * 8


def test_left_padding_with_patched_llama():
    model = patch_model(build("llama"), "linear", chunk_size=4)
    gen = torch.Generator().manual_seed(2)
    short, long = torch.randint(3, VOCAB, (4,), generator=gen), torch.randint(3, VOCAB, (9,), generator=gen)
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0, 5:], ids[1] = short, long
    mask = (ids != 0).long()
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             cache=LinearAttentionCache.from_model(model))
    for row, prompt in ((0, short), (1, long)):
        single = model.generate(prompt[None], max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(batched[row, 9:], single[0, len(prompt):])


def test_partially_patched_model_mixes_states_and_keys():
    model = patch_model(build("llama"), "linear", softmax_layers=[0], chunk_size=4)
    cache = LinearAttentionCache.from_model(model)
    assert isinstance(cache.layers[0], DynamicLayer) and cache.layers[1].kind == "linear"
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    out = model.generate(ids, max_new_tokens=8, do_sample=False, cache=cache)
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="recurrent state"):
        cache.recurrent_state(0)


def test_from_model_refuses_unpatched_model():
    model = build("llama")
    with pytest.raises(ValueError, match="patch_model"):
        LinearAttentionCache.from_model(model)
    # A hand-built cache on an unpatched model is caught instead of silently attending to new tokens only.
    ids = torch.randint(3, VOCAB, (1, 5))
    with pytest.raises(ValueError, match="does not read LinearAttentionCache"):
        model.generate(ids, max_new_tokens=3, do_sample=False, cache=LinearAttentionCache(2))
    with pytest.raises(ValueError, match="num_layers"):
        LinearAttentionCache(0)
    with pytest.raises(ValueError, match="softmax layer index"):
        LinearAttentionCache(2, softmax_layers=[5])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_window_linear_generation_equals_uncached(arch):
    model = patch_model(build(arch), "window-linear", window=4, feature_map="hedgehog", chunk_size=4)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    cache = LinearAttentionCache.from_model(model)
    assert all(isinstance(layer, RecurrentStateLayer) and layer.kind == "window-linear" for layer in cache.layers)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, cache=cache,
                         return_dict_in_generate=True)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, ref)
    # Bounded size: per layer 3 recent keys and values (4 query heads x 8 dims, float64) + their mask,
    # and a hedgehog state of m = 16 features: the same after 19 tokens as it would be after 19,000.
    per_layer = 2 * 4 * 3 * 8 * 8 * 2 + 2 * 3 + 2 * 4 * (16 * 8 + 16) * 8
    assert cache.nbytes() == 2 * per_layer


def test_window_linear_beam_search_matches_uncached():
    model = patch_model(build("llama"), "window-linear", window=3, chunk_size=4)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    out = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False,
                         cache=LinearAttentionCache.from_model(model))
    ref = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kind,params", [("linear", {}), ("window-linear", {"window": 3})])
def test_generate_builds_the_recurrent_cache_itself(kind, params):
    model = patch_model(build("llama"), kind, softmax_layers=[0], chunk_size=4, **params)
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, LinearAttentionCache)
    assert isinstance(out.cache.layers[0], DynamicLayer)  # the softmax layer keeps keys and values
    assert torch.equal(out.sequences, model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False))


def test_cache_is_built_from_the_config_like_transformers_caches():
    model = patch_model(build("llama"), "window-linear", window=3, softmax_layers=[1], chunk_size=4)
    cache = LinearAttentionCache(config=model.config)
    assert [getattr(layer, "kind", type(layer).__name__) for layer in cache.layers] == ["window-linear", "DynamicLayer"]
    assert [type(layer) for layer in LinearAttentionCache.from_model(model).layers] == [type(x) for x in cache.layers]
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, cache=cache),
                       model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False))
    # the old constructor keeps working
    legacy = LinearAttentionCache(2, softmax_layers=[1], window_layers=[0])
    assert [type(layer) for layer in legacy.layers] == [type(x) for x in cache.layers]


def test_old_cache_layer_names_are_deprecated_aliases():
    import transformers.cache_utils

    import hf_efficient.integrations.cache as cache_module

    with pytest.warns(DeprecationWarning, match="LinearStateLayer"):
        assert cache_module.LinearAttentionLayer is LinearStateLayer
    with pytest.warns(DeprecationWarning, match="RecurrentStateLayer"):
        assert cache_module.WindowLinearStateLayer is RecurrentStateLayer
    # no longer shadows transformers' own class of that name
    assert LinearStateLayer.__name__ != transformers.cache_utils.LinearAttentionLayer.__name__


def test_checkpoint_default_cache_implementation_gives_way_to_the_state():
    """Gemma checkpoints ship cache_implementation="hybrid" in their generation config (chosen for softmax)."""
    model = patch_model(build("llama"), "linear", chunk_size=4)
    model.generation_config.cache_implementation = "hybrid"
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(8))
    out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, LinearAttentionCache)
    assert torch.equal(out.sequences, model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False))
