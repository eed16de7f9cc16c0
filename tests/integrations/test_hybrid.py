"""Hybrid local/global and other modern architectures (tiny random configs, sliding window 4).

By default ``patch_model`` replaces the full-attention layers and keeps the sliding-window ones,
which must then behave exactly as in the unpatched model; ``sliding="window-linear"`` replaces
those too. Decoding keeps constant memory for the whole model.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.modeling_utils import AttentionInterface

from hf_efficient import LinearAttentionCache
from hf_efficient.attention.linear import linear_attention_reference
from hf_efficient.attention.window_linear import window_linear_attention_reference
from hf_efficient.integrations import (
    ARCHITECTURES,
    EfficientConfigMixin,
    EfficientModelMixin,
    add_architecture,
    implementation_name,
    patch_model,
    summarize_plan,
    unpatch_model,
)
from hf_efficient.integrations.export import AUTO_HEADS, auto_class_name
from hf_efficient.integrations.plan import plan_from_record

NEW = ["electra", "modernbert", "gpt_neox", "qwen3", "mistral", "phi3", "qwen2_sliding", "gemma2", "gemma3", "cohere2"]
# What patch_model(model, "linear", **PATCH[arch]) puts in each layer (None = kept softmax).
PATCH = {"gemma2": {"ignore_logit_softcap": True}, "mistral": {"sliding": "window-linear"},
         "phi3": {"sliding": "window-linear"}}
EXPECTED = {
    "electra": ["linear"] * 2,
    "modernbert": ["linear", None, None],
    "gpt_neox": ["linear"] * 2,
    "qwen3": ["linear"] * 2,
    "mistral": ["window-linear"] * 2,
    "phi3": ["window-linear"] * 2,
    "qwen2_sliding": ["linear", "linear", None, None],
    "gemma2": [None, "linear", None, "linear"],
    "gemma3": [None] * 5 + ["linear"],
    "cohere2": [None, None, None, "linear"],
}
CAUSAL_LM = {"gpt_neox": "GPTNeoXForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
             "phi3": "Phi3ForCausalLM", "qwen2_sliding": "Qwen2ForCausalLM", "gemma2": "Gemma2ForCausalLM",
             "gemma3": "Gemma3ForCausalLM", "cohere2": "Cohere2ForCausalLM"}


def _left_padded(batch: int = 2, seq: int = 10, pads: int = 3, seed: int = 0) -> dict:
    ids = torch.randint(3, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :pads] = 0
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def _padded(arch: str, tiny) -> dict:
    """Left padding with position ids for decoders (the padding that matters causally), right padding for encoders."""
    return _left_padded() if tiny.TINY[arch][2] else tiny.inputs(arch)


@pytest.mark.parametrize("arch", NEW)
def test_kept_layers_are_the_models_own(arch, tiny):
    """Every layer kept: the model's own implementation and masks (sliding windows, soft-capping), bit for bit."""
    model = tiny.model(arch)
    inputs = _padded(arch, tiny)
    before = tiny.hidden(model, inputs)
    patch_model(model, "linear", layers=[])
    assert torch.equal(tiny.hidden(model, inputs), before)


@pytest.mark.parametrize("arch", NEW)
def test_replaced_layers_compute_their_kind(arch, tiny, monkeypatch, caplog):
    """The replaced layers' outputs equal the quadratic reference of their kind on the captured q/k/v and padding."""
    model = tiny.model(arch)
    inputs = _padded(arch, tiny)
    before = tiny.hidden(model, inputs)
    with caplog.at_level(logging.INFO, logger="hf_efficient"):
        patch_model(model, "linear", **PATCH.get(arch, {}))
    layers = model.config.hf_efficient["layers"]
    assert [layer["kind"] for layer in layers] == EXPECTED[arch]
    assert summarize_plan(plan_from_record(model.config.hf_efficient)) in caplog.text
    if None in EXPECTED[arch]:
        assert "sliding_attention): kept softmax" in caplog.text

    inner = AttentionInterface._global_mapping[implementation_name("linear")]
    calls = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        out, weights = inner(module, query, key, value, attention_mask, **kwargs)
        calls.append((module, query, key, value, attention_mask, kwargs, out))
        return out, weights

    monkeypatch.setitem(AttentionInterface._global_mapping, implementation_name("linear"), spy)
    out = tiny.hidden(model, inputs)
    real = inputs["attention_mask"].bool()
    assert (out - before)[real].abs().max() > 1e-3  # the replaced layers really changed the model
    replaced = [c for c in calls if c[0].hf_efficient_attention.kind is not None]
    assert len(replaced) == sum(kind is not None for kind in EXPECTED[arch])
    for module, q, k, v, mask, kwargs, got in replaced:
        layer = module.hf_efficient_attention
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        causal = bool(module.is_causal)
        if layer.kind == "linear":
            assert mask is None or (mask.dim() == 2 and torch.equal(mask, real))  # the 2-D padding mask
            ref = linear_attention_reference(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=real)
        else:  # a sliding layer gets the model's sliding mask; the window comes from the config
            assert layer.params.window == model.config.sliding_window
            ref = window_linear_attention_reference(q.double(), k.double(), v.double(), window=layer.params.window,
                                                    scale=kwargs["scaling"], key_padding_mask=real)
        got, ref = got.double(), ref.transpose(1, 2)
        torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", NEW)
def test_padding_save_load_and_unpatch(arch, tiny, tmp_path):
    model = tiny.model(arch)
    inputs = _padded(arch, tiny)
    before = tiny.hidden(model, inputs)
    patch_model(model, "linear", **PATCH.get(arch, {}))
    out = tiny.hidden(model, inputs)
    # the padded row equals that row alone
    if tiny.TINY[arch][2]:
        alone = tiny.hidden(model, {"input_ids": inputs["input_ids"][:1, 3:]})
        torch.testing.assert_close(out[0, 3:], alone[0], atol=2e-5, rtol=1e-4)
    else:
        alone = tiny.hidden(model, {"input_ids": inputs["input_ids"][1:, :9]})
        torch.testing.assert_close(out[1, :9], alone[0], atol=2e-5, rtol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and type(loaded).__name__ == f"Efficient{tiny.TINY[arch][1]}"
    assert torch.equal(tiny.hidden(loaded, inputs), out)
    unpatch_model(model)
    assert torch.equal(tiny.hidden(model, inputs), before)


def _causal_lm(arch: str, tiny, **params):
    model = tiny.model(arch, CAUSAL_LM[arch])
    return patch_model(model, "linear", **{**PATCH.get(arch, {}), **params})


@pytest.mark.parametrize("arch", list(CAUSAL_LM))
def test_generate_decodes_like_uncached(arch, tiny):
    model = _causal_lm(arch, tiny)
    inputs = _left_padded()
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=8,
                  do_sample=False)
    out = model.generate(**kwargs, return_dict_in_generate=True)
    assert torch.equal(out.sequences, model.generate(**kwargs, use_cache=False))
    plan = model.config.hf_efficient["layers"]
    if arch == "gpt_neox":  # its attention does not hand its kwargs to the cache: transformers' exact DynamicCache
        assert type(out.cache) is DynamicCache
        return
    assert isinstance(out.cache, LinearAttentionCache)
    for layer, cache_layer in zip(plan, out.cache.layers, strict=True):
        if layer["kind"] is not None:  # the generic layer of a recurrent kind, running that kind's decoding form
            assert type(cache_layer).__name__ == "RecurrentStateLayer" and cache_layer.kind == layer["kind"]
        else:
            expected = "DynamicSlidingWindowLayer" if layer["layer_type"] == "sliding_attention" else "DynamicLayer"
            assert type(cache_layer).__name__ == expected


def _cache_sizes(model, prompt: torch.Tensor, steps: int, cache) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding by hand: the cache's bytes after the prompt and after each new token."""
    sizes, ids = [], prompt
    with torch.no_grad():
        out = model(prompt, cache=cache, use_cache=True)
        for _ in range(steps):
            sizes.append(_nbytes(cache))
            token = out.logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, token], dim=1)
            out = model(token, cache=cache, use_cache=True)
    return sizes, ids


def _nbytes(cache) -> int:
    if isinstance(cache, LinearAttentionCache):
        return cache.nbytes()
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.keys is not None)


@pytest.mark.parametrize("sliding", [None, "window-linear"])
def test_gemma3_cache_stops_growing_after_the_window(sliding, tiny):
    """A patched 5 sliding : 1 full Gemma 3 decodes from a cache whose size stops growing after the window
    (4 tokens), with the same tokens as decoding without a cache; the unpatched model's cache keeps growing."""
    model = _causal_lm("gemma3", tiny, sliding=sliding)
    prompt = torch.randint(3, 100, (1, 2), generator=torch.Generator().manual_seed(4))
    sizes, ids = _cache_sizes(model, prompt, 12, LinearAttentionCache(config=model.config))
    assert sizes[0] < sizes[2] and len(set(sizes[3:])) == 1  # grows over the first window, then constant
    assert torch.equal(ids, model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False))
    assert torch.equal(ids, model.generate(prompt, max_new_tokens=12, do_sample=False))  # its default cache
    softmax = unpatch_model(model)
    grows, _ = _cache_sizes(softmax, prompt, 12, DynamicCache(config=softmax.config))
    assert grows[-1] > grows[-2] > grows[3]  # transformers' own cache: the full layer keeps every key


@pytest.mark.parametrize("arch", ["gemma3", "cohere2", "qwen2_sliding"])
def test_sliding_layers_replaced_by_window_linear(arch, tiny):
    model = _causal_lm(arch, tiny, sliding="window-linear")
    kinds = [layer["kind"] for layer in model.config.hf_efficient["layers"]]
    assert None not in kinds and "window-linear" in kinds
    inputs = _left_padded()
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=8,
                  do_sample=False)
    out = model.generate(**kwargs, return_dict_in_generate=True)
    assert torch.equal(out.sequences, model.generate(**kwargs, use_cache=False))
    assert all(type(layer).__name__.endswith("StateLayer") for layer in out.cache.layers)
    with pytest.raises(ValueError, match="larger than the model's sliding window"):
        _causal_lm(arch, tiny, sliding="window-linear", sliding_params={"window": 5})
    smaller = _causal_lm(arch, tiny, sliding="window-linear", sliding_params={"window": 2})
    assert {layer["params"]["window"] for layer in smaller.config.hf_efficient["layers"]
            if layer["kind"] == "window-linear"} == {2}


def test_refusals(tiny):
    with pytest.raises(ValueError, match="attn_logit_softcapping=5.0"):
        patch_model(tiny.model("gemma2"), "linear")
    with pytest.raises(ValueError, match="sliding='window-linear'"):  # Mistral: every layer sliding
        patch_model(tiny.model("mistral"), "linear")
    with pytest.raises(ValueError, match="honours a window"):
        patch_model(tiny.model("gemma3"), "linear", sliding="linear")
    with pytest.raises(ValueError, match="cannot honour its window"):
        patch_model(tiny.model("gemma3"), "linear", layers=[0])
    with pytest.raises(ValueError, match="attends in both directions"):  # ModernBERT's local layers
        patch_model(tiny.model("modernbert"), "linear", sliding="window-linear")
    with pytest.raises(ValueError, match="sliding_params needs sliding"):
        patch_model(tiny.model("gemma3"), "linear", sliding_params={"window": 2})
    config = transformers.GptOssConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, intermediate_size=32, num_local_experts=2,
                                       num_experts_per_tok=1, sliding_window=4)
    with pytest.raises(ValueError, match="sink"):
        patch_model(transformers.GptOssForCausalLM(config), "linear")
    for arch in ("gemma2", "mistral", "gemma3", "modernbert"):
        assert not type(tiny.model(arch)).__name__.startswith("Efficient")


def test_every_auto_head_has_an_efficient_class():
    """The static table covers each architecture's heads in transformers' Auto mappings (and nothing else)."""
    for model_type, (config_class, model_classes) in ARCHITECTURES.items():
        if config_class.__module__ != "hf_efficient.integrations.architectures":
            continue  # added by add_architecture in another test
        assert config_class.model_type == f"efficient-{model_type}"
        assert config_class.hf_efficient_base_class.model_type == model_type
        expected = {mapping[model_type] for mapping in AUTO_HEADS.values() if model_type in mapping}
        got = {cls.hf_efficient_base_class.__name__ for cls in model_classes}
        assert got == expected, model_type
        for cls in model_classes:
            assert cls.config_class is config_class
            assert cls.__name__ == f"Efficient{cls.hf_efficient_base_class.__name__}"
            assert auto_class_name(cls) is not None
            assert getattr(transformers, auto_class_name(cls))._model_mapping[config_class] is cls


class EfficientOlmoConfig(EfficientConfigMixin, transformers.OlmoConfig):
    model_type = "efficient-olmo"


class EfficientOlmoForCausalLM(EfficientModelMixin, transformers.OlmoForCausalLM):
    config_class = EfficientOlmoConfig


def test_another_architecture_joins_with_add_architecture(tmp_path):
    torch.manual_seed(0)
    config = transformers.OlmoConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                     num_attention_heads=4, initializer_range=0.3, pad_token_id=0)
    with pytest.raises(ValueError, match="Supported:"):
        patch_model(transformers.OlmoForCausalLM(config), "linear")
    with pytest.raises(TypeError, match="attention_classes"):
        add_architecture(EfficientOlmoConfig, EfficientOlmoForCausalLM, attention_classes="OlmoAttention")
    add_architecture(EfficientOlmoConfig, EfficientOlmoForCausalLM, attention_classes=["OlmoAttention"])
    model = patch_model(transformers.OlmoForCausalLM(config).eval(), "linear")
    assert type(model) is EfficientOlmoForCausalLM
    prompt = _left_padded()
    kwargs = dict(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], max_new_tokens=6,
                  do_sample=False)
    out = model.generate(**kwargs, return_dict_in_generate=True)
    assert isinstance(out.cache, LinearAttentionCache)
    assert torch.equal(out.sequences, model.generate(**kwargs, use_cache=False))
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is EfficientOlmoForCausalLM
    with torch.no_grad():
        assert torch.equal(loaded(**prompt).logits, model(**prompt).logits)
