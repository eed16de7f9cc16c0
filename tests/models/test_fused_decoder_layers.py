"""The compiled block step of patched Llama, Mistral and Qwen2 decoders (``linear`` and ``window-linear``) against
the same model on its PyTorch modules in float64 (``HF_EFFICIENT_KERNELS=reference``), through prefills of every
length around the window, grouped-query heads, biases, padding, hooks, NaN rows and ``generate()``; and the
decoding preparation (``DecodeLinear``, fused layer classes, weights on huge pages) undone by ``unpatch_model``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import hf_efficient
from hf_efficient import LinearAttentionCache, patch_model, unpatch_model
from hf_efficient.decoding import DecodeLinear
from hf_efficient.integrations import fused_layers
from hf_efficient.integrations.fused_layers import EfficientLlamaDecoderLayer
from hf_efficient_kernels import dispatch
from hf_efficient_kernels.cpu import load_decode_extension

pytestmark = pytest.mark.skipif(load_decode_extension() is None, reason="the CPU decoding kernels cannot be built")

VOCAB = 64


def decoder(arch: str = "llama", seed: int = 0) -> nn.Module:
    """A float32 decoder with 4 query heads on 2 key/value heads and weights large enough to keep tokens apart."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.2)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False)).eval()  # q/k/v biases


@pytest.fixture
def block_calls(monkeypatch):
    """How many block steps ran compiled (built and run: the model-level step builds every block's step before it
    runs any, and runs none when one block must take its modules)."""
    calls = {"n": 0}
    original = dispatch.decoder_block_step_kernel

    def counted(*args, **kwargs):
        kernel = original(*args, **kwargs)
        if kernel is None:
            return None

        def run(*inputs):
            calls["n"] += 1
            return kernel(*inputs)

        return run

    monkeypatch.setattr(dispatch, "decoder_block_step_kernel", counted)
    return calls


def decode(model, ids: torch.Tensor, steps: int, mask: torch.Tensor | None = None, reference: bool = False,
           monkeypatch=None):
    """Prefill ``ids`` then feed ``steps`` fixed tokens one at a time; the logits of every decoding step."""
    tokens = torch.arange(steps).remainder(VOCAB).view(1, steps).expand(ids.shape[0], steps) + 3
    cache = LinearAttentionCache(config=model.config)
    if reference:
        monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    out = []
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache, use_cache=True)
        for t in range(steps):
            step_mask = None if mask is None else torch.cat([mask, torch.ones(mask.shape[0], t + 1, dtype=mask.dtype)],
                                                            dim=1)
            out.append(model(tokens[:, t : t + 1], attention_mask=step_mask, cache=cache, use_cache=True).logits)
    if reference:
        monkeypatch.delenv(dispatch.ENV_VAR)
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kind,params", [("window-linear", {"window": 1}), ("window-linear", {"window": 2}),
                                         ("window-linear", {"window": 5}), ("linear", {}),
                                         ("linear", {"feature_map": "relu"}),
                                         ("window-linear", {"window": 4, "feature_map": "relu"})])
@pytest.mark.parametrize("prefill", [1, 3, 4, 9])
def test_block_step_matches_the_modules_in_float64(arch, kind, params, prefill, block_calls, monkeypatch):
    model = patch_model(decoder(arch), kind, **params)
    reference = copy.deepcopy(model).double()
    ids = torch.randint(0, VOCAB, (2, prefill))
    got, cache = decode(model, ids, 7)
    assert block_calls["n"] == 7 * 2  # every decoding step of both layers ran compiled
    want, ref_cache = decode(reference, ids, 7, reference=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    for layer, ref_layer in zip(cache.layers, ref_cache.layers):  # the states the next tokens would continue
        mine, ref = layer.state, ref_layer.state
        if kind == "window-linear":
            torch.testing.assert_close(mine.keys.double(), ref.keys, rtol=1e-4, atol=1e-4)
            assert torch.equal(mine.mask, ref.mask)
            assert (mine.linear is None) == (ref.linear is None)
            mine, ref = mine.linear, ref.linear
        if mine is not None:
            torch.testing.assert_close(mine.kv.double(), ref.kv, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(mine.k_sum.double(), ref.k_sum, rtol=1e-4, atol=1e-4)


def test_padded_prefill_then_unmasked_steps_keep_padding_out_of_the_window(block_calls, monkeypatch):
    """After a left-padded prefill the buffered keys carry padding; decoding without a mask runs compiled and must
    still skip them (a NaN planted in a padded key would show)."""
    model = patch_model(decoder(), "window-linear", window=6)
    reference = copy.deepcopy(model).double()
    ids = torch.randint(0, VOCAB, (2, 4))
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    results = []
    for m, is_ref in ((model, False), (reference, True)):
        if is_ref:
            monkeypatch.setenv(dispatch.ENV_VAR, "reference")
        cache = LinearAttentionCache(config=m.config)
        with torch.no_grad():
            m(ids, attention_mask=mask, cache=cache, use_cache=True)
            for layer in cache.layers:  # NaN in the key and value under row 0's padding
                state = layer.state
                keys, values = state.keys.clone(), state.values.clone()
                keys[0, :, 0], values[0, :, 0] = float("nan"), float("nan")
                layer.state = state._replace(keys=keys, values=values)
            steps = [m(torch.full((2, 1), t + 5), cache=cache, use_cache=True).logits for t in range(7)]
        results.append(torch.cat(steps, dim=1))
        monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert block_calls["n"] == 7 * 2
    assert torch.isfinite(results[0]).all() and torch.isfinite(results[1]).all()
    torch.testing.assert_close(results[0].double(), results[1], rtol=1e-4, atol=1e-4)


def test_steps_with_a_padding_mask_take_the_modules(block_calls):
    model = patch_model(decoder(), "window-linear", window=3)
    ids = torch.randint(0, VOCAB, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    got, _ = decode(model, ids, 3, mask=mask)
    assert block_calls["n"] == 0 and torch.isfinite(got).all()


def test_a_nan_row_stays_in_its_row(block_calls):
    model = patch_model(decoder(), "window-linear", window=3)
    cache = LinearAttentionCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 4)), cache=cache, use_cache=True)
        embeds = model.get_input_embeddings()(torch.tensor([[3], [4]])).clone()
        embeds[0, 0, 5] = float("nan")
        out = model(inputs_embeds=embeds, cache=cache, use_cache=True).logits
    assert block_calls["n"] == 2
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


def test_hooks_adapters_and_learned_maps_take_the_modules(block_calls):
    model = patch_model(decoder(), "linear")
    seen = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *args: seen.append(1))
    decode(model, torch.randint(0, VOCAB, (1, 3)), 4)
    assert len(seen) == 1 + 4 and block_calls["n"] == 4  # layer 1 ran its modules every token, layer 0 compiled
    handle.remove()
    model.model.layers[0].self_attn.q_proj.__class__ = nn.Linear  # a projection of another class (an adapter)
    block_calls["n"] = 0
    decode(model, torch.randint(0, VOCAB, (1, 3)), 4)
    assert block_calls["n"] == 4  # layer 1 only
    hedgehog = patch_model(decoder(), "linear", feature_map="hedgehog")
    block_calls["n"] = 0
    decode(hedgehog, torch.randint(0, VOCAB, (1, 3)), 4)
    assert block_calls["n"] == 0


@pytest.mark.parametrize("kind", ["linear", "window-linear"])
def test_generate_gives_the_tokens_of_the_modules(kind, block_calls, monkeypatch):
    model = patch_model(decoder(seed=1), kind)
    ids = torch.randint(0, VOCAB, (1, 6))
    fast = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert block_calls["n"] > 0
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    slow = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(fast, slow)


def test_unpatch_restores_classes_and_weights_bit_for_bit():
    model = decoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch_model(model, "window-linear", window=4)
    assert type(model.model.layers[0]) is EfficientLlamaDecoderLayer
    assert type(model.lm_head) is DecodeLinear and type(model.model.layers[0].mlp.up_proj) is DecodeLinear
    unpatch_model(model)
    assert type(model.model.layers[0]) is LlamaDecoderLayer
    assert all(type(m) is not DecodeLinear for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_layer_kept_softmax_decodes_through_its_modules(block_calls, monkeypatch):
    model = patch_model(decoder(), "linear", layers=[0])  # layer 1 keeps softmax and decodes from keys and values
    ids = torch.randint(0, VOCAB, (1, 5))
    got, _ = decode(model, ids, 4)
    assert block_calls["n"] == 4  # layer 0 only
    want, _ = decode(copy.deepcopy(model).double(), ids, 4, reference=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_a_model_built_from_an_efficient_config_decodes_compiled(block_calls, tmp_path):
    model = patch_model(decoder(), "window-linear", window=4)
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(loaded.model.layers[0]) is EfficientLlamaDecoderLayer
    ids = torch.randint(0, VOCAB, (1, 5))
    assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False),
                       model.generate(ids, max_new_tokens=6, do_sample=False))
    assert block_calls["n"] > 0
    assert fused_layers.prepare_for_decoding(loaded) is True  # idempotent


def test_block_step_refuses_what_does_not_fit():
    ops = torch.ops.hf_efficient_decode_cpu
    x = torch.randn(1, 1, 8)
    weights = [torch.ones(8), torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8), torch.randn(8, 8),
               torch.ones(8), torch.randn(12, 8), torch.randn(12, 8), torch.randn(8, 12)]
    none = [None] * 7
    keys, values, mask = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), torch.ones(1, 2, dtype=torch.bool)
    args = (None, None, None, None, keys, values, mask)
    ops.decoder_block_step(x, weights, none, *args, 2, 1, 4, 1, 3, 0.5, 1e-6, 1e-6)  # fits
    with pytest.raises(RuntimeError, match="keeps at most"):  # a buffer of 2 keys for a window of 2
        ops.decoder_block_step(x, weights, none, *args, 2, 1, 4, 1, 2, 0.5, 1e-6, 1e-6)
    with pytest.raises(RuntimeError, match="multiple"):  # 2 query heads on 3 key/value heads
        ops.decoder_block_step(x, weights, none, *args, 2, 3, 4, 1, 3, 0.5, 1e-6, 1e-6)
    with pytest.raises(RuntimeError, match="k weight"):  # k/v projections of another size
        ops.decoder_block_step(x, weights[:2] + [torch.randn(5, 8)] + weights[3:], none, *args, 2, 1, 4, 1, 3, 0.5,
                               1e-6, 1e-6)
    with pytest.raises(RuntimeError, match="q bias"):
        ops.decoder_block_step(x, weights, [torch.zeros(3)] + none[1:], *args, 2, 1, 4, 1, 3, 0.5, 1e-6, 1e-6)
    with pytest.raises(RuntimeError, match="needs its state"):  # linear attention without kv/k_sum
        ops.decoder_block_step(x, weights, none, *args, 2, 1, 4, 1, 0, 0.5, 1e-6, 1e-6)
    with pytest.raises(RuntimeError, match="key_mask"):
        ops.decoder_block_step(x, weights, none, None, None, None, None, keys, values, mask.float(), 2, 1, 4, 1, 3,
                               0.5, 1e-6, 1e-6)
    with pytest.raises(RuntimeError, match="both kv and k_sum"):
        ops.decoder_block_step(x, weights, none, None, None, torch.zeros(1, 2, 4, 4), None, keys, values, mask, 2, 1,
                               4, 1, 3, 0.5, 1e-6, 1e-6)


def test_bfloat16_and_training_take_the_modules(block_calls):
    model = patch_model(decoder(), "window-linear", window=3).to(torch.bfloat16)
    out, _ = decode(model, torch.randint(0, VOCAB, (1, 4)), 3)
    assert block_calls["n"] == 0 and torch.isfinite(out).all()
    model = patch_model(decoder(), "linear")
    cache = LinearAttentionCache(config=model.config)
    model(torch.randint(0, VOCAB, (1, 4)), cache=cache, use_cache=True)  # gradients on: the modules
    model(torch.tensor([[3]]), cache=cache, use_cache=True).logits.sum().backward()
    assert block_calls["n"] == 0 and model.model.layers[0].mlp.down_proj.weight.grad is not None


def test_public_names():
    assert hf_efficient.place_for_decoding is hf_efficient.decoding.place_for_decoding
