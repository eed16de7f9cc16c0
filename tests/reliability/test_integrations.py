"""Misuse of the transformers integration: each cell gives a clear error or the correct result.

The references are the unpatched model, the same model decoding without a cache, or a model
patched once on a fresh copy.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import pickle

import pytest
import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache, StaticCache

import hf_efficient
from hf_efficient import LinearAttentionCache, LinearLMConfig, LinearLMForCausalLM, efficient_config
from hf_efficient.integrations import is_patched, patch_model, push_to_hub, unpatch_model

VOCAB = 48


def llama(seed: int = 0, layers: int = 2, head: str = "LlamaForCausalLM"):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                                      pad_token_id=0)
    return getattr(transformers, head)(config).eval()


def gemma3(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                           sliding_window_pattern=3, initializer_range=0.3, pad_token_id=0,
                                           bos_token_id=1, eos_token_id=2)
    return transformers.Gemma3ForCausalLM(config).eval()


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, initializer_range=0.3)
    return transformers.BertModel(config).eval()


def ids(length: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, prompt, n=5, **kwargs):
    return model.generate(prompt, max_new_tokens=n, do_sample=False, **kwargs)


# --------------------------------------------------------------------------- caches and generate()
@pytest.mark.parametrize("implementation", ["static", "offloaded_static", "quantized"])
def test_static_and_other_cache_implementations_are_refused(implementation):
    model = patch_model(llama(), "linear")
    with pytest.raises(ValueError, match=f"cache_implementation='{implementation}' is not supported"):
        greedy(model, ids(5), cache_implementation=implementation)


def test_static_cache_objects_are_refused():
    model = patch_model(llama(), "linear")
    static = StaticCache(config=model.config, max_cache_len=12)
    with pytest.raises(ValueError, match="gives it a StaticLayer"):
        greedy(model, ids(5), cache=static)
    with pytest.raises(ValueError, match="Static or pre-allocated caches are not supported"):  # a forward by hand
        model(ids(5), cache=StaticCache(config=model.config, max_cache_len=12))


def test_dynamic_caches_stay_exact():
    model = patch_model(llama(), "linear")
    prompt = ids(5)
    reference = greedy(model, prompt, use_cache=False)
    assert torch.equal(greedy(model, prompt, cache_implementation="dynamic"), reference)
    assert torch.equal(greedy(model, prompt, cache=DynamicCache()), reference)


@pytest.mark.parametrize("kind,params", [("linear", {}), ("window-linear", {"window": 3})])
def test_a_used_cache_only_continues_its_own_tokens(kind, params):
    model = patch_model(llama(), kind, **params)
    cache = LinearAttentionCache(config=model.config)
    first = greedy(model, ids(5), cache=cache)
    with pytest.raises(ValueError, match="do not continue"):  # a new prompt: never the stale state
        greedy(model, ids(7, seed=9), cache=cache)
    with pytest.raises(ValueError, match="do not continue"):  # same length as what it has seen
        greedy(model, first[:, :-1], cache=cache)
    follow_up = torch.cat([first, ids(2, seed=3)], dim=1)  # the same conversation, continued: exact
    assert torch.equal(greedy(model, follow_up, cache=cache), greedy(model, follow_up, use_cache=False))
    cache.reset()  # a reset cache is a fresh one
    fresh = ids(6, seed=5)
    assert torch.equal(greedy(model, fresh, cache=cache), greedy(model, fresh, use_cache=False))


def test_a_cache_is_not_handed_to_another_model():
    model, other = patch_model(llama(0), "linear"), patch_model(llama(1), "linear")
    cache = LinearAttentionCache(config=model.config)
    first = greedy(model, ids(5), cache=cache)
    with pytest.raises(ValueError, match="from another model"):
        greedy(other, torch.cat([first, ids(1)], 1), cache=cache)
    # an unused cache of the same layout is just an empty container
    assert torch.equal(greedy(other, ids(5), cache=LinearAttentionCache(config=model.config)),
                       greedy(other, ids(5), use_cache=False))
    with pytest.raises(ValueError, match="another layer layout"):  # a fresh cache of another layout
        greedy(patch_model(llama(layers=3), "linear"), ids(5), cache=LinearAttentionCache(config=model.config))


def test_caches_that_cannot_be_continued():
    model = patch_model(llama(), "linear")
    beams = LinearAttentionCache(config=model.config)
    out = greedy(model, ids(5), cache=beams, num_beams=2)
    with pytest.raises(ValueError, match="beam search"):
        greedy(model, torch.cat([out, ids(1)], 1), cache=beams)
    by_hand = LinearAttentionCache(config=model.config)
    with torch.no_grad():
        model(ids(5), cache=by_hand, use_cache=True)
    with pytest.raises(ValueError, match="outside generate"):
        greedy(model, torch.cat([ids(5), ids(1)], 1), cache=by_hand)
    batch = LinearAttentionCache(config=model.config)
    two = greedy(model, ids(5, batch=2), cache=batch)
    with pytest.raises(ValueError, match="2 rows but input_ids has 1"):
        greedy(model, two[:1], cache=batch)


def test_linear_lm_cache_reuse_is_checked():
    torch.manual_seed(0)
    config = LinearLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, initializer_range=0.3, pad_token_id=0)
    model, other = LinearLMForCausalLM(config).eval(), LinearLMForCausalLM(config).eval()
    cache = LinearAttentionCache(config.num_hidden_layers)
    first = greedy(model, ids(5), cache=cache)
    with pytest.raises(ValueError, match="do not continue"):
        greedy(model, ids(8, seed=4), cache=cache)
    with pytest.raises(ValueError, match="another model"):
        greedy(other, torch.cat([first, ids(1)], 1), cache=cache)
    follow_up = torch.cat([first, ids(2, seed=3)], dim=1)
    assert torch.equal(greedy(model, follow_up, cache=cache), greedy(model, follow_up, use_cache=False))


def test_cache_layout_misuse():
    model = patch_model(llama(), "linear")
    with pytest.raises(ValueError, match="has 1 layers but the model called layer 1"):  # a forward by hand
        model(ids(5), cache=LinearAttentionCache(1))
    with pytest.raises(ValueError, match="another layer layout"):
        greedy(model, ids(5), cache=LinearAttentionCache(1))
    with pytest.raises(ValueError, match="does not use linear attention"):
        LinearAttentionCache(config=llama().config)
    with pytest.raises(TypeError, match="either config"):
        LinearAttentionCache(2, config=model.config)
    cache = LinearAttentionCache(config=model.config)
    greedy(model, ids(5), cache=cache)
    with pytest.raises(ValueError, match="cannot remove tokens"):
        cache.crop(-1)


def test_cache_after_dtype_or_device_change():
    model = patch_model(llama(), "linear").double()
    cache = LinearAttentionCache(config=model.config)
    with torch.no_grad():
        model(ids(5), cache=cache, use_cache=True)
        model.float()
        with pytest.raises(ValueError, match="filled by a torch.float64 model"):
            model(ids(1), cache=cache, use_cache=True)
        model.double()
        cache.layers[0].state = cache.layers[0].state._replace(kv=cache.layers[0].state.kv.to("meta"))
        cache.layers[0]._unread = False
        with pytest.raises(ValueError, match="holds its state on meta"):
            model(ids(1), cache=cache, use_cache=True)


def test_gpt_neox_cannot_reach_a_recurrent_cache():
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=37, pad_token_id=0)
    model = patch_model(transformers.GPTNeoXForCausalLM(config).eval(), "linear")
    with pytest.raises(ValueError, match="does not pass its keyword arguments"):
        LinearAttentionCache.from_model(model)
    with pytest.raises(ValueError, match="does not pass its keyword arguments"):
        greedy(model, ids(5), cache=LinearAttentionCache(config=model.config))
    assert torch.equal(greedy(model, ids(5)), greedy(model, ids(5), use_cache=False))  # DynamicCache: exact


def test_hybrid_caches_that_would_truncate_replaced_layers():
    model = patch_model(gemma3(), "linear", sliding="window-linear")
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer"):
        greedy(model, ids(5), cache=DynamicCache(config=model.config))
    with pytest.raises(ValueError, match="windowed kind decode only from a LinearAttentionCache"):
        greedy(model, ids(5), cache_implementation="dynamic")


def test_sampling_chunked_prefill_and_return_sequences_with_the_cache():
    model = patch_model(llama(), "linear")
    prompt = ids(7, batch=2)
    assert torch.equal(greedy(model, prompt, prefill_chunk_size=3), greedy(model, prompt, use_cache=False))
    sampled = []
    for use_cache in (True, False):
        torch.manual_seed(11)
        sampled.append(model.generate(prompt, max_new_tokens=5, do_sample=True, num_return_sequences=2,
                                      use_cache=use_cache))
    assert torch.equal(*sampled)


def test_generate_on_a_model_without_a_generation_head():
    with pytest.raises(TypeError, match="cannot generate"):
        patch_model(bert(), "linear").generate(ids(4))


# --------------------------------------------------------------------------- masks, outputs, precision
def test_output_attentions_and_4d_masks():
    model = patch_model(llama(), "linear")
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(ids(5), output_attentions=True)
    with pytest.raises(ValueError, match="2-D"):
        model(ids(5), attention_mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))
    kept = patch_model(llama(), "linear", layers=[])  # layers kept softmax take the 4-D mask as before
    mask4d = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    with torch.no_grad():
        torch.testing.assert_close(kept(ids(5), attention_mask=mask4d).logits, llama()(ids(5)).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    model = patch_model(llama(), "linear")
    with torch.no_grad():
        full = model(ids(9)).logits
        half = model.to(dtype)(ids(9)).logits
    assert half.dtype == dtype and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), full, atol=0.05 * full.abs().max().item(), rtol=0)
    cache = LinearAttentionCache(config=model.config)
    with torch.no_grad():  # cached decoding in half precision gives the full forward's logits
        model(ids(9)[:, :8], cache=cache, use_cache=True)
        step = model(ids(9)[:, 8:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(step[:, -1].float(), half[:, -1].float(), atol=0.02 * full.abs().max().item(), rtol=0)


# --------------------------------------------------------------------------- patching misuse
def test_patching_twice_and_unpatching_twice():
    inputs = ids(6)
    with torch.no_grad():
        once = patch_model(llama(), "linear", feature_map="relu")(inputs).logits
        model = patch_model(patch_model(llama(), "window-linear", window=2), "linear", feature_map="relu")
        assert torch.equal(model(inputs).logits, once)
        softmax = llama()(inputs).logits
        assert unpatch_model(unpatch_model(model)) is model and not is_patched(model)
        assert torch.equal(model(inputs).logits, softmax)
    plain = llama()
    assert unpatch_model(plain) is plain and type(plain) is transformers.LlamaForCausalLM


def test_models_without_an_efficient_class_are_refused():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37)
    model = transformers.BertForPreTraining(config)
    with pytest.raises(ValueError, match="no efficient class for it.*BertForSequenceClassification"):
        patch_model(model, "linear")
    assert not is_patched(model) and type(model) is transformers.BertForPreTraining
    with pytest.raises(ValueError, match="relative position bias"):
        efficient_config(transformers.T5Config(), "linear")


def test_attn_implementation_set_by_hand_is_refused(tmp_path):
    """It would record nothing in the config, so a saved model would reload as softmax."""
    bert().save_pretrained(tmp_path / "base")
    model = AutoModel.from_pretrained(tmp_path / "base", attn_implementation="hf_efficient_linear")
    with pytest.raises(ValueError, match="not patched by hf_efficient"):
        model(ids(5))


def test_an_efficient_checkpoint_keeps_its_attention(tmp_path):
    model = patch_model(llama(), "linear")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attn_implementation='sdpa' would not change it"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="hf_efficient_linear")
    with torch.no_grad():
        assert torch.equal(loaded(ids(5)).logits, model(ids(5)).logits)
    # the record carries the parameters too
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["hf_efficient"]["layers"][0]["params"] == {"feature_map": "elu", "eps": 1e-6, "chunk_size": 64}


# --------------------------------------------------------------------------- pickling: static classes
def test_patched_models_pickle_copy_and_save(tmp_path):
    model = patch_model(gemma3(), "linear", feature_map="hedgehog", sliding="window-linear")
    inputs = ids(8)
    with torch.no_grad():
        expected = model(inputs).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone) is type(model) and type(clone.config) is type(model.config)
        with torch.no_grad():
            assert torch.equal(clone(inputs).logits, expected)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(inputs).logits, expected)
    # a reader finds the class a model says it is
    module = __import__(type(model).__module__, fromlist=[type(model).__name__])
    assert getattr(module, type(model).__name__) is type(model)
    assert type(model).__module__ == "hf_efficient.integrations.architectures"
    copied_config = copy.deepcopy(model.config)
    assert copied_config.hf_efficient == model.config.hf_efficient and copied_config is not model.config


def test_a_patched_model_crosses_a_spawned_process(tmp_path):
    """multiprocessing's spawn pickles the model into a fresh interpreter, which unpickles it and saves it back."""
    model = patch_model(llama(), "linear", feature_map="hedgehog")
    with torch.no_grad():
        expected = model(ids(6)).logits
    process = multiprocessing.get_context("spawn").Process(target=torch.save, args=(model, tmp_path / "back.pt"))
    process.start()
    process.join(timeout=300)
    assert process.exitcode == 0
    back = torch.load(tmp_path / "back.pt", weights_only=False)
    assert type(back).__name__ == "EfficientLlamaForCausalLM"
    with torch.no_grad():
        assert torch.equal(back(ids(6)).logits, expected)


_FRESH_INTERPRETER = """
import pickle, sys
import torch
from safetensors.torch import load_file, save_file
model = pickle.loads(open(sys.argv[1], "rb").read())  # imports hf_efficient through the classes' module
inputs = load_file(sys.argv[2])["ids"]
with torch.no_grad():
    out = model(inputs, output_hidden_states=True)
    cache = sys.modules["hf_efficient"].LinearAttentionCache(config=model.config)
    model(inputs, cache=cache)
    step = model(inputs[:, :1], cache=cache).logits
save_file({"logits": out.logits, "last": out.hidden_states[-1], "step": step,
           "count": torch.tensor(len(out.hidden_states))}, sys.argv[3])
"""


def test_a_patched_model_unpickled_in_a_fresh_interpreter_runs_and_decodes(tmp_path):
    """Nothing but the pickle: the attention functions are registered and the model-level decoding step keeps
    output_hidden_states working in an interpreter that never patched a model."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    model = patch_model(llama(), "window-linear", window=3)
    inputs = ids(6)
    # pickled first: once output_hidden_states was asked for, transformers' capture hooks (local functions) stay
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(model))
    with torch.no_grad():
        expected = model(inputs, output_hidden_states=True)
        cache = LinearAttentionCache(config=model.config)
        model(inputs, cache=cache)
        step = model(inputs[:, :1], cache=cache).logits
    save_file({"ids": inputs}, tmp_path / "ids.safetensors")
    run = subprocess.run([sys.executable, "-c", _FRESH_INTERPRETER, str(tmp_path / "model.pkl"),
                          str(tmp_path / "ids.safetensors"), str(tmp_path / "out.safetensors")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = load_file(tmp_path / "out.safetensors")
    assert int(got["count"]) == len(expected.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(got["logits"], expected.logits)
    torch.testing.assert_close(got["last"], expected.hidden_states[-1])
    torch.testing.assert_close(got["step"], step)


# --------------------------------------------------------------------------- saving and uploading
def test_saving_into_a_folder_that_holds_another_model(tmp_path):
    folder = tmp_path / "out"
    bert().save_pretrained(folder)
    before = (folder / "config.json").read_bytes()
    model = patch_model(llama(), "linear")
    with pytest.raises(FileExistsError, match="already holds another model.*'bert'"):
        model.save_pretrained(folder)
    assert (folder / "config.json").read_bytes() == before
    model.save_pretrained(tmp_path / "mine")
    model.save_pretrained(tmp_path / "mine")  # saving the same kind of model again is fine
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mine")
    with torch.no_grad():
        assert torch.equal(reloaded(ids(5)).logits, model(ids(5)).logits)


class _NoUpload:
    def create_repo(self, **kwargs):
        raise AssertionError("must not be reached")

    upload_folder = create_repo


def test_push_to_hub_misuse():
    with pytest.raises(ValueError, match="Repo id must"):
        push_to_hub(patch_model(llama(), "linear"), "not a repo id", api=_NoUpload())
    with pytest.raises(ValueError, match="patch_model"):
        push_to_hub(llama(), "someone/plain", api=_NoUpload())


def test_register_is_idempotent():
    before = dict(transformers.AttentionInterface._global_mapping)
    hf_efficient.integrations.register()
    hf_efficient.integrations.register()
    assert dict(transformers.AttentionInterface._global_mapping) == before


def test_copied_and_pickled_caches():
    """A deep copy (transformers' prompt-reuse recipe) continues like the original; a pickled one cannot."""
    model = patch_model(llama(), "linear")
    cache = LinearAttentionCache(config=model.config)
    first = greedy(model, ids(5), cache=cache)
    follow_up = torch.cat([first, ids(2, seed=3)], dim=1)
    reference = greedy(model, follow_up, use_cache=False)
    assert torch.equal(greedy(model, follow_up, cache=copy.deepcopy(cache)), reference)
    with pytest.raises(ValueError, match="outside generate"):
        greedy(model, follow_up, cache=pickle.loads(pickle.dumps(cache)))
    assert torch.equal(greedy(model, follow_up, cache=cache), reference)
