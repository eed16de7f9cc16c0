"""patch_model / unpatch_model on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.modeling_utils import AttentionInterface

import hf_efficient
from hf_efficient.attention.linear import linear_attention_reference
from hf_efficient.integrations import (
    attention_modules,
    implementation_name,
    is_patched,
    kind_from_implementation,
    patch_model,
    plan_layers,
    unpatch_model,
)

ARCHS = ["bert", "roberta", "distilbert", "gpt2", "llama", "qwen2", "vit"]
TEXT = [a for a in ARCHS if a != "vit"]
CAUSAL = ["gpt2", "llama", "qwen2"]
CLUSTERED = [k for k in ("clustered", "improved-clustered") if k in hf_efficient.attention_kind_names()]


def _capture(monkeypatch, kind: str) -> list:
    """Wrap the registered attention function of ``kind``; record inputs and output of each call."""
    name = implementation_name(kind)
    inner = AttentionInterface._global_mapping[name]
    calls = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        out, weights = inner(module, query, key, value, attention_mask, **kwargs)
        calls.append((module, query, key, value, attention_mask, kwargs, out))
        return out, weights

    monkeypatch.setitem(AttentionInterface._global_mapping, name, spy)
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_layers_equal_reference_on_captured_qkv(arch, tiny, monkeypatch):
    model = tiny.model(arch)
    inputs = tiny.inputs(arch)
    softmax_out = tiny.hidden(model, inputs)
    patch_model(model, "linear")
    calls = _capture(monkeypatch, "linear")
    out = tiny.hidden(model, inputs)
    assert len(calls) == 2  # one per layer
    for module, q, k, v, mask, kwargs, got in calls:
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        causal = arch in CAUSAL
        assert bool(module.is_causal) == causal
        if "attention_mask" in inputs and arch != "vit":
            assert mask is not None and mask.shape == (2, 12) and mask.dtype == torch.bool  # the 2-D padding mask
            assert torch.equal(mask, inputs["attention_mask"].bool())
        ref = linear_attention_reference(q.double(), k.double(), v.double(), causal=causal,
                                         key_padding_mask=mask).transpose(1, 2)
        assert got.shape == (q.shape[0], q.shape[2], q.shape[1], v.shape[-1])
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
        # linear attention is not softmax: on the same q/k/v the outputs really differ
        bias = None if mask is None else torch.zeros(mask.shape[0], 1, 1, mask.shape[1]).masked_fill(
            ~mask[:, None, None, :], float("-inf"))
        soft = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal and bias is None,
                                              scale=kwargs["scaling"]).transpose(1, 2)
        assert (got - soft).abs().max() > 1e-2 * soft.abs().max()
    assert out.shape == softmax_out.shape


@pytest.mark.parametrize("arch", TEXT)
def test_padding_and_batch_invariance(arch, tiny):
    model = patch_model(tiny.model(arch), "linear", feature_map="relu" if arch == "gpt2" else "elu")
    inputs = tiny.inputs(arch, batch=2, seq=12)
    batched = tiny.hidden(model, inputs)
    for row, length in ((0, 12), (1, 9)):
        alone = tiny.hidden(model, {"input_ids": inputs["input_ids"][row : row + 1, :length]})
        torch.testing.assert_close(batched[row : row + 1, :length], alone, atol=2e-5, rtol=1e-4)
    # changing only pad tokens must not move the real tokens
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][1, 9:] = 3
    torch.testing.assert_close(tiny.hidden(model, changed)[1, :9], batched[1, :9], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_left_padding_causal(arch, tiny):
    model = patch_model(tiny.model(arch), "linear")
    ids = torch.randint(2, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = tiny.hidden(model, {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids})
    alone = tiny.hidden(model, {"input_ids": ids[:1, 4:]})
    torch.testing.assert_close(batched[0, 4:], alone[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_unpatch_is_bit_identical(arch, tiny):
    model = tiny.model(arch)
    inputs = tiny.inputs(arch)
    before = tiny.hidden(model, inputs)
    config_class, model_class = type(model.config), type(model)
    patch_model(model, "linear", feature_map="hedgehog")
    assert is_patched(model) and model.config.model_type == f"efficient-{model_class.config_class.model_type}"
    assert not torch.equal(tiny.hidden(model, inputs), before)
    unpatch_model(model)
    assert not is_patched(model)
    assert type(model) is model_class and type(model.config) is config_class
    assert not any("hf_efficient" in name for name, _ in model.named_parameters())
    assert torch.equal(tiny.hidden(model, inputs), before)


@pytest.mark.parametrize("arch", ARCHS)
def test_softmax_layers_rebuild_the_4d_mask(arch, tiny):
    """Layers kept softmax must give the unpatched model's output, padding included."""
    model = tiny.model(arch)
    inputs = tiny.inputs(arch)
    before = tiny.hidden(model, inputs)
    patch_model(model, "linear", layers=[])
    assert model.config._attn_implementation == "hf_efficient_linear"
    # the model's own implementation and mask: bit for bit (padded rows included)
    assert torch.equal(tiny.hidden(model, inputs), before)


def test_per_layer_choice(tiny, monkeypatch):
    model = patch_model(tiny.model("bert"), "linear", keep_softmax_last=1, layer_params={0: {"feature_map": "relu"}})
    layers = model.config.hf_efficient["layers"]
    assert layers[0] == {"kind": "linear", "params": {"feature_map": "relu", "eps": 1e-6, "chunk_size": 64},
                         "layer_type": "full_attention"}
    assert layers[1] == {"kind": None, "params": None, "layer_type": "full_attention"}
    calls = _capture(monkeypatch, "linear")
    inputs = tiny.inputs("bert")
    tiny.hidden(model, inputs)
    (m0, q, k, v, mask, _, got0), (m1, q1, k1, v1, mask1, kw1, got1) = calls
    ref0 = linear_attention_reference(q, k, v, feature_map="relu", key_padding_mask=mask).transpose(1, 2)
    torch.testing.assert_close(got0, ref0, atol=1e-5, rtol=1e-5)
    bias = torch.zeros(2, 1, 1, 12).masked_fill(~mask[:, None, None, :], float("-inf"))
    ref1 = F.scaled_dot_product_attention(q1, k1, v1, attn_mask=bias, scale=kw1["scaling"]).transpose(1, 2)
    torch.testing.assert_close(got1, ref1, atol=1e-5, rtol=1e-5)


def test_plan_layers_indices():
    plan = plan_layers(6, "linear", softmax_layers=[-1], keep_softmax_first=2)
    assert [layer.kind for layer in plan] == [None, None, "linear", "linear", "linear", None]
    plan = plan_layers(4, "linear", layers=[1, 3])
    assert [layer.kind for layer in plan] == [None, "linear", None, "linear"]


def test_generation_with_cache_matches_full_forward(tiny):
    model = patch_model(tiny.model("llama", "LlamaForCausalLM"), "linear")
    ids = torch.randint(2, 100, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :5], use_cache=True)
        rest = model(ids[:, 5:], cache=first.past_key_values, use_cache=True)  # prefill after a prefix
        step = model(ids[:, 8:], cache=model(ids[:, :8], use_cache=True).past_key_values)  # one token
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        greedy = model(generated[:, :-1]).logits[:, -4:].argmax(-1)
    assert torch.equal(greedy, generated[:, -4:])


def test_hedgehog_feature_map_trains(tiny):
    model = patch_model(tiny.model("bert"), "linear", feature_map="hedgehog")
    names = [n for n, _ in model.named_parameters() if "hf_efficient_feature_map" in n]
    assert len(names) == 4  # weight + bias in each of 2 layers
    model.train()
    out = model(**tiny.inputs("bert")).last_hidden_state
    out.pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "hf_efficient_feature_map" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_setting_implementation_by_hand_is_refused(tiny):
    """attn_implementation alone records nothing in the config, so save_pretrained would lose it."""
    model = tiny.model("bert")
    model.set_attn_implementation("hf_efficient_linear")
    with pytest.raises(ValueError, match="not patched by hf_efficient"):
        tiny.hidden(model, tiny.inputs("bert"))
    assert kind_from_implementation("hf_efficient_linear") == "linear"
    assert kind_from_implementation("sdpa") is None


# --------------------------------------------------------------------------- errors
class _NoInterfaceConfig(transformers.PretrainedConfig):
    model_type = "no-interface-test"


class _NoInterfaceModel(transformers.PreTrainedModel):
    config_class = _NoInterfaceConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(4, 4)
        self.post_init()

    def forward(self, x):
        return torch.softmax(self.proj(x) @ x.transpose(-1, -2), -1) @ x


def test_unsupported_architecture_is_refused():
    with pytest.raises(ValueError, match="Supported: bert, cohere2, distilbert, electra, gemma2, gemma3_text, gpt2"):
        patch_model(_NoInterfaceModel(_NoInterfaceConfig()), "linear")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch_model(torch.nn.Linear(2, 2), "linear")


def test_bad_arguments(tiny):
    model = tiny.model("bert")
    with pytest.raises(ValueError, match="unknown attention kind"):
        patch_model(model, "no-such-kind")
    with pytest.raises(TypeError, match="unknown parameter"):
        patch_model(model, "linear", clusters=3)
    with pytest.raises(ValueError, match="layer index"):
        patch_model(model, "linear", softmax_layers=[5])
    assert not is_patched(model)  # nothing changed on errors


def test_unsupported_masks_raise(tiny):
    model = patch_model(tiny.model("llama"), "linear")
    ids = torch.randint(2, 100, (1, 8))
    with pytest.raises(ValueError, match="2-D"):  # a caller-built 4-D mask
        model(ids, attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="packed sequences"):  # packed: positions restart inside the row
        model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]), use_cache=False)
    config = tiny.model("qwen2").config
    config.use_sliding_window, config.sliding_window = True, 4
    config.layer_types = ["sliding_attention", "sliding_attention"]
    qwen = transformers.Qwen2Model(config).eval()
    with pytest.raises(ValueError, match="sliding"):
        patch_model(qwen, "linear")  # every layer is sliding: nothing to replace
    with pytest.raises(ValueError, match="cannot honour its window"):
        patch_model(qwen, "linear", layers=[0])
    patch_model(qwen, "linear", layers=[])  # sliding layers kept softmax are fine


def test_attention_modules_of_each_architecture(tiny):
    for arch in ARCHS:
        modules = attention_modules(tiny.model(arch))
        assert len(modules) == 2, arch


@pytest.mark.parametrize("arch", ["mistral", "electra"])
def test_more_architectures(arch, tmp_path):
    """Padding invariance, save/load through the Auto classes and bit-identical unpatch."""
    small = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 initializer_range=0.3)
    if arch == "mistral":
        config = transformers.MistralConfig(**small, num_key_value_heads=2)
        windowed = transformers.MistralModel(config).eval()  # Mistral's default: every layer a 4096-token window
        with pytest.raises(ValueError, match="sliding='window-linear'"):  # nothing global to replace
            patch_model(windowed, "linear")
        assert type(windowed) is transformers.MistralModel
        config.sliding_window = None
        model = transformers.MistralModel(config)
    else:
        model = transformers.ElectraModel(transformers.ElectraConfig(**small, embedding_size=32))
    model.eval()
    ids = torch.randint(2, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
        patch_model(model, "linear")
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = model(input_ids=ids[1:, :7]).last_hidden_state
        torch.testing.assert_close(out[1:, :7], alone, atol=2e-5, rtol=1e-4)
        assert (out - before).abs().max() > 1e-3
        model.save_pretrained(tmp_path)
        loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
        assert type(loaded) is type(model)
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).last_hidden_state, out)
        unpatch_model(model)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, before)


def test_t5_relative_bias_is_refused():
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match="relative position bias"):
        patch_model(transformers.T5EncoderModel(config), "linear")


@pytest.mark.skipif(not CLUSTERED, reason="clustered kinds are not registered yet")
@pytest.mark.parametrize("kind", CLUSTERED)
@pytest.mark.parametrize("arch", ["bert", "llama", "vit"])
def test_clustered_kinds_through_the_interface(kind, arch, tiny, monkeypatch):
    spec = hf_efficient.get_attention_kind(kind)
    model = tiny.model(arch)
    if arch in CAUSAL and not spec.supports_causal:
        with pytest.raises(ValueError, match="causal"):
            patch_model(model, kind)
            tiny.hidden(model, tiny.inputs(arch))
        return
    patch_model(model, kind)
    params = model.config.hf_efficient["layers"][0]["params"]
    calls = _capture(monkeypatch, kind)
    inputs = tiny.inputs(arch)
    tiny.hidden(model, inputs)
    assert len(calls) == 2
    for module, q, k, v, mask, kwargs, got in calls:
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        ref = spec.forward(q, k, v, spec.make_params(**params), causal=arch in CAUSAL, key_padding_mask=mask,
                           query_padding_mask=mask, scale=kwargs["scaling"], module=module).transpose(1, 2)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
