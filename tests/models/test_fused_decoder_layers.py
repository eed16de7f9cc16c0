"""The compiled block step of patched Llama, Mistral and Qwen2 decoders (``linear`` and ``window-linear``) against
the same model on its PyTorch modules in float64 (``HF_EFFICIENT_KERNELS=reference``), through prefills of every
length around the window, grouped-query heads, biases, padding, hooks, NaN rows and ``generate()``; and the
decoding preparation (``DecodeLinear``, fused layer classes, weights on huge pages) undone by ``unpatch_model``.
The model-level step (``FusedLlamaModel`` ...) too: the logits of the modules, and ``forward`` for every argument or
state it does not cover (hidden states or attentions asked for, tuples, padding masks, masks of another length,
hooks, gradients, a layer kept softmax, other arguments), checked to have run."""

from __future__ import annotations

import copy
import inspect

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
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

import hf_efficient
from hf_efficient import LinearAttentionCache, patch_model, unpatch_model
from hf_efficient.decoding import DecodeLinear
from hf_efficient.integrations import fused_layers
from hf_efficient.integrations.fused_layers import EfficientLlamaDecoderLayer, FusedLlamaModel
from hf_efficient_kernels import dispatch
from hf_efficient_kernels.cpu import load_decode_extension

pytestmark = pytest.mark.skipif(load_decode_extension() is None, reason="the CPU decoding kernels cannot be built")

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.2)


def decoder(arch: str = "llama", seed: int = 0, layers: int = 2) -> nn.Module:
    """A float32 decoder with 4 query heads on 2 key/value heads and weights large enough to keep tokens apart."""
    torch.manual_seed(seed)
    common = dict(COMMON, num_hidden_layers=layers)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False)).eval()  # q/k/v biases


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


@pytest.mark.parametrize("hidden,window", [(64, 9), (64, 21), (48, 9), (256, 17)])
def test_window_buffer_of_whole_and_partial_vectors_matches_the_modules(hidden, window, block_calls, monkeypatch):
    """The kept keys and values move to the new buffer with streaming stores where a head's rows start on a vector
    boundary (head_dim 16 and 64) and plain ones where they do not (head_dim 12): the buffer the next steps read
    must be the modules' in every case, as the window fills and as keys leave it."""
    torch.manual_seed(hidden + window)
    config = LlamaConfig(**{**COMMON, "hidden_size": hidden, "intermediate_size": hidden + 16})
    model = patch_model(LlamaForCausalLM(config).eval(), "window-linear", window=window)
    reference = copy.deepcopy(model).double()
    ids = torch.randint(0, VOCAB, (2, 3))
    got, cache = decode(model, ids, window + 6)
    assert block_calls["n"] == (window + 6) * 2
    want, ref_cache = decode(reference, ids, window + 6, reference=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    for layer, ref_layer in zip(cache.layers, ref_cache.layers):
        torch.testing.assert_close(layer.state.keys.double(), ref_layer.state.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.state.values.double(), ref_layer.state.values, rtol=1e-4, atol=1e-4)
        assert torch.equal(layer.state.mask, ref_layer.state.mask)


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


# ---------------------------------------------------------------- the model-level decoding step (FusedLlamaModel ...)
def taken_steps(monkeypatch, name: str) -> dict:
    """How many decoding steps ``fused_layers.<name>`` took (gave an output rather than None), counted from now."""
    calls = {"n": 0}
    original = getattr(fused_layers, name)

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += out is not None
        return out

    monkeypatch.setattr(fused_layers, name, counted)
    return calls


@pytest.fixture
def model_steps(monkeypatch):
    """How many decoding steps the model-level step took (the base model's, or the causal LM's around it)."""
    return taken_steps(monkeypatch, "_decoding_step")


def prefilled(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> LinearAttentionCache:
    cache = LinearAttentionCache(config=model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache, use_cache=True)
    return cache


def both(model, ids, step, monkeypatch):
    """``step(model, cache)`` after a prefill of ``ids`` on ``model`` (float32, as it runs) and on a float64 copy
    through its modules; both results."""
    reference = copy.deepcopy(model).double()
    got = step(model, prefilled(model, ids))
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    with torch.no_grad():
        want = step(reference, prefilled(reference, ids))
    monkeypatch.delenv(dispatch.ENV_VAR)
    return got, want


def steps(n: int, **kwargs):
    """A step function feeding ``n`` fixed tokens one at a time; their logits ``(batch, n, vocab)``."""

    def run(model, cache):
        out = []
        with torch.no_grad():
            for t in range(n):
                token = torch.full((2, 1), 3 + t)
                out.append(model(token, cache=cache, use_cache=True, **kwargs).logits)
        return torch.cat(out, dim=1)

    return run


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kind,params", [("linear", {}), ("window-linear", {"window": 3}),
                                         ("window-linear", {"window": 6, "feature_map": "relu"})])
def test_the_model_step_gives_the_logits_and_states_of_the_modules(arch, kind, params, model_steps, monkeypatch):
    model = patch_model(decoder(arch, layers=3), kind, **params)
    assert type(model.model).__name__ == f"Fused{type(model.model).__mro__[2].__name__}"
    ids = torch.randint(0, VOCAB, (2, 5))
    got, want = both(model, ids, steps(6), monkeypatch)
    assert model_steps["n"] == 6  # every step of the float32 model took the model-level step
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_generate_takes_the_model_step_and_gives_the_tokens_of_the_modules(model_steps, monkeypatch):
    model = patch_model(decoder(seed=1, layers=3), "window-linear", window=4)
    ids = torch.randint(0, VOCAB, (1, 6))
    fast = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert model_steps["n"] == 9  # every token after the prefill's
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), fast)


def test_positions_embeddings_and_full_masks_take_the_model_step(model_steps, monkeypatch):
    model = patch_model(decoder(layers=3), "window-linear", window=4)
    ids = torch.randint(0, VOCAB, (2, 5))

    def given(model, cache):
        with torch.no_grad():
            token = torch.tensor([[7], [9]])
            a = model(token, position_ids=torch.tensor([[5], [11]]), cache=cache).logits  # positions of its own
            b = model(inputs_embeds=model.get_input_embeddings()(token), cache=cache).logits
            mask = torch.ones(2, cache.get_seq_length() + 1, dtype=torch.long)  # no padding: as no mask
            c = model(token, attention_mask=mask, cache=cache).logits
        return torch.cat([a, b, c], dim=1)

    got, want = both(model, ids, given, monkeypatch)
    assert model_steps["n"] == 3
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_what_the_model_step_does_not_cover_takes_forward(arch, model_steps, monkeypatch):
    model = patch_model(decoder(arch, layers=3), "window-linear", window=4)
    ids = torch.randint(0, VOCAB, (2, 5))
    layers = 3

    def asks(model, cache):
        token = torch.tensor([[7], [9]])
        with torch.no_grad():
            hidden = model(token, cache=cache, output_hidden_states=True)
            assert len(hidden.hidden_states) == layers + 1
            as_tuple = model(token, cache=cache, return_dict=False)
            assert isinstance(as_tuple, tuple)
            n = cache.get_seq_length()
            padded = model(token, cache=cache, attention_mask=torch.tensor([[0] + [1] * n, [1] * (n + 1)])).logits
        return torch.cat([hidden.hidden_states[-1], hidden.logits, as_tuple[0], padded], dim=-1)

    got, want = both(model, ids, asks, monkeypatch)
    # only the tuple: the causal-LM head asks its base model for an output object and makes the tuple itself, so
    # that step is the model step's to take (its values are compared below like the others)
    assert model_steps["n"] == 1
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_hidden_states_asked_once_leave_later_steps_compiled(block_calls, monkeypatch):
    """transformers leaves its output-capturing hooks on the layers after the first call that asks for hidden
    states; idle, they record nothing, so later steps run compiled again (and give the modules' logits), while a
    step that asks again runs the modules and gets every hidden state. A user's hook still sends steps to them."""
    model = patch_model(decoder(layers=3), "window-linear", window=4)
    ids = torch.randint(0, VOCAB, (2, 5))

    def run(m, reference):
        cache = LinearAttentionCache(config=m.config)
        out = []
        with torch.no_grad():
            m(ids, cache=cache)
            for t in range(6):
                token = torch.full((2, 1), 3 + t)
                if t in (1, 4):
                    asked = m(token, cache=cache, output_hidden_states=True)
                    assert len(asked.hidden_states) == 4
                    out += [asked.hidden_states[-1], asked.logits]
                else:
                    out.append(m(token, cache=cache).logits)
        return torch.cat(out, dim=-1)

    got = run(model, False)
    assert block_calls["n"] == 4 * 3  # the four steps that asked for nothing, every block
    assert any(layer._forward_hooks for layer in model.model.layers)  # transformers' hooks are still there
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setenv(dispatch.ENV_VAR, "reference")
        want = run(copy.deepcopy(model).double(), True)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)

    def output_capturing_hook(module, args, output):  # a user's hook of the same name is still a hook
        return None

    handle = model.model.layers[0].register_forward_hook(output_capturing_hook)
    before = block_calls["n"]
    run(model, False)
    handle.remove()
    assert block_calls["n"] == before


def test_a_mask_that_does_not_cover_the_cache_is_not_taken_for_no_mask(model_steps):
    """A full mask of the wrong length is the user's mistake: forward sees it as it would without the step."""
    model = patch_model(decoder(layers=3), "linear")
    cache = prefilled(model, torch.randint(0, VOCAB, (1, 5)))
    outcome = []
    for length in (3, 6, 9):  # 6 = the 5 cached tokens and the new one
        try:
            with torch.no_grad():
                model(torch.tensor([[4]]), attention_mask=torch.ones(1, length, dtype=torch.long), cache=cache)
            outcome.append("ran")
        except (ValueError, RuntimeError, IndexError) as error:
            outcome.append(type(error).__name__)
    assert model_steps["n"] == 1 and outcome[1] == "ran"


def test_hooks_gradients_and_a_softmax_layer_take_forward(model_steps):
    model = patch_model(decoder(layers=3), "linear")
    cache = prefilled(model, torch.randint(0, VOCAB, (1, 4)))
    seen = []
    handle = model.model.layers[2].register_forward_pre_hook(lambda *args: seen.append(1))
    with torch.no_grad():
        model(torch.tensor([[3]]), cache=cache)
    handle.remove()
    assert seen == [1] and model_steps["n"] == 0  # the last layer's hook saw its layer run
    model(torch.tensor([[3]]), cache=cache).logits.sum().backward()  # gradients on
    assert model_steps["n"] == 0 and model.lm_head.weight.grad is not None
    with torch.no_grad():
        model(torch.tensor([[3]]), cache=cache, unexpected_flag=None)  # an argument of another kind
        model(torch.tensor([[3]]), cache=cache)
    assert model_steps["n"] == 1
    mixed = patch_model(decoder(layers=3), "linear", layers=[0, 1])  # layer 2 keeps softmax
    cache = LinearAttentionCache(config=mixed.config)
    with torch.no_grad():
        mixed(torch.randint(0, VOCAB, (1, 4)), cache=cache)
        mixed(torch.tensor([[3]]), cache=cache)
    assert model_steps["n"] == 1


def test_a_patched_base_model_takes_the_model_step(model_steps, monkeypatch):
    torch.manual_seed(0)
    base = patch_model(LlamaModel(LlamaConfig(**dict(COMMON, num_hidden_layers=3))).eval(), "window-linear", window=3)
    ids = torch.randint(0, VOCAB, (2, 4))

    def hidden(model, cache):
        with torch.no_grad():
            return torch.cat([model(torch.full((2, 1), t), cache=cache).last_hidden_state for t in range(4)], dim=1)

    got, want = both(base, ids, hidden, monkeypatch)
    assert model_steps["n"] == 4
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_unpatch_gives_the_base_model_class_back_and_copies_keep_the_step(model_steps):
    model = patch_model(decoder(layers=3), "linear")
    assert type(model.model) is FusedLlamaModel
    twin = copy.deepcopy(model)
    assert type(twin.model) is FusedLlamaModel
    cache = prefilled(twin, torch.randint(0, VOCAB, (1, 3)))
    with torch.no_grad():
        twin(torch.tensor([[3]]), cache=cache)
    assert model_steps["n"] == 1
    unpatch_model(model)
    assert type(model.model) is LlamaModel


# ---------------------------------------------------------------- the model step's rotary and final norm
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}])
def test_the_step_rotary_is_the_module_bit_for_bit(arch, rope):
    model = decoder(arch)
    if rope is not None:  # rebuilt with another frequency table (yarn also scales cos/sin: attention_scaling != 1)
        config = copy.deepcopy(model.config)
        config.rope_parameters = {**config.rope_parameters, **rope}
        model = type(model)(config).eval()
    rotary = model.model.rotary_emb
    hidden = torch.randn(2, 1, COMMON["hidden_size"])
    for positions in (torch.tensor([[0]]), torch.tensor([[1234]]), torch.tensor([[5], [77]])):
        got, want = fused_layers._rotary_embeddings(rotary, hidden, positions), rotary(hidden, position_ids=positions)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    # the model step's own position (no position_ids): the past length, without a position tensor
    for past in (0, 1, 1234, 123457, 2**24 - 1):
        got = fused_layers._rotary_embeddings(rotary, hidden, None, past)
        want = rotary(hidden, position_ids=torch.tensor([[past]]))
        assert all(g.shape == w.shape and torch.equal(g, w) for g, w in zip(got, want)), past
    if rope is not None and rope["rope_type"] == "yarn":
        assert rotary.attention_scaling != 1.0


def test_the_step_rotary_leaves_dynamic_tables_hooks_and_other_dtypes_to_the_module():
    model = decoder()
    rotary = model.model.rotary_emb
    calls = []
    original = type(rotary).forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    hidden, positions = torch.randn(1, 1, COMMON["hidden_size"]), torch.tensor([[9]])
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(type(rotary), "forward", counted)
        fused_layers._rotary_embeddings(rotary, hidden, positions)
        assert calls == []
        rotary.rope_type = "dynamic"  # its table follows the positions: only the module knows how
        fused_layers._rotary_embeddings(rotary, hidden, positions)
        rotary.rope_type = "default"
        fused_layers._rotary_embeddings(rotary, hidden.double(), positions)
        handle = rotary.register_forward_hook(lambda *args: None)
        fused_layers._rotary_embeddings(rotary, hidden, positions)
        seen = []
        handle.remove()
        handle = rotary.register_forward_hook(lambda module, args, kwargs, out: seen.append(kwargs["position_ids"]),
                                              with_kwargs=True)
        fused_layers._rotary_embeddings(rotary, hidden, None, 41)  # the module gets the step's position as a tensor
        handle.remove()
    assert calls == [1, 1, 1, 1]
    assert len(seen) == 1 and seen[0].tolist() == [[41]]


def test_the_step_final_norm_matches_the_module_and_leaves_hooks_to_it():
    norm = decoder().model.norm
    with torch.no_grad():
        norm.weight.normal_()
    hidden = torch.randn(3, 1, COMMON["hidden_size"]) * 5
    torch.testing.assert_close(fused_layers._final_norm(norm, hidden), norm(hidden), rtol=1e-6, atol=1e-6)
    seen = []
    norm.register_forward_hook(lambda module, args, out: seen.append(out))
    out = fused_layers._final_norm(norm, hidden)
    assert len(seen) == 1 and seen[0] is out
    nan_row = hidden.clone()
    nan_row[1, 0, 3] = float("nan")
    out = fused_layers._final_norm(norm, nan_row)
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()  # a NaN stays in its row


@pytest.mark.parametrize("kind,params,dtype", [("linear", {}, torch.bfloat16), ("linear", {}, torch.float64),
                                               ("window-linear", {"window": 3}, torch.float64)])
def test_a_cache_filled_in_another_dtype_is_refused_before_any_block_runs(kind, params, dtype, model_steps,
                                                                          block_calls):
    """A cache filled by a copy of the model in another dtype cannot continue in float32 (a bfloat16 model keeps
    float32 linear states, which would fit the kernel): the step leaves it to the modules, which name the mismatch,
    and the cache is left as it was."""
    model = patch_model(decoder(layers=3), kind, **params)
    cache = prefilled(copy.deepcopy(model).to(dtype), torch.randint(0, VOCAB, (1, 4)))
    before = [layer.state for layer in cache.layers]
    with torch.no_grad(), pytest.raises(ValueError, match=f"{str(dtype).split('.')[-1]} model"):
        model(torch.tensor([[3]]), cache=cache)
    assert model_steps["n"] == 0 and block_calls["n"] == 0 and cache.get_seq_length() == 4
    assert all(layer.state is state for layer, state in zip(cache.layers, before))


# ---------------------------------------------------------------- the causal LM's step (EfficientLlamaForCausalLM ...)
@pytest.fixture
def lm_steps(monkeypatch):
    """How many decoding steps the causal LM's step took."""
    return taken_steps(monkeypatch, "fused_lm_step")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kind,params", [("linear", {}), ("window-linear", {"window": 4})])
def test_the_lm_step_gives_what_forward_gives(arch, kind, params, lm_steps, block_calls, monkeypatch):
    model = patch_model(decoder(arch, layers=3), kind, **params)
    ids = torch.randint(0, VOCAB, (2, 5))
    cache = prefilled(model, ids)
    other = copy.deepcopy(cache)
    separate = []  # compiled products given out on their own: the head's, when it is not in the blocks' call
    gemv = dispatch.decode_gemv_kernel
    monkeypatch.setattr(dispatch, "decode_gemv_kernel", lambda *args, **kwargs: separate.append(1) or gemv(*args,
                                                                                                             **kwargs))
    for t in range(7):
        token = torch.full((2, 1), 3 + t)
        keep = {} if t % 3 == 0 else {"logits_to_keep": t % 3 - 1}  # nothing, 0 (every position) or 1
        with torch.no_grad():
            got = model(token, cache=cache, use_cache=True, **keep)
            assert not separate  # the head ran in the one call of the blocks and the norm
            with monkeypatch.context() as patcher:  # transformers' forward around the same base-model step
                patcher.setattr(fused_layers, "fused_lm_step", lambda *args: None)
                want = model(token, cache=other, use_cache=True, **keep)
            assert separate == [1]  # there, the head as a module after the base model's call
            separate.clear()
        assert type(got) is type(want) and got.cache is cache and got.loss is None
        assert got.logits.shape == (2, 1, VOCAB) and torch.equal(got.logits, want.logits)
    assert lm_steps["n"] == 7 and block_calls["stacks"] == 2 * 7 and block_calls["n"] == 2 * 7 * 3


def test_what_the_lm_step_does_not_cover_takes_forward(lm_steps, model_steps):
    model = patch_model(decoder(layers=3), "window-linear", window=4)
    cache = prefilled(model, torch.randint(0, VOCAB, (2, 5)))
    token = torch.tensor([[7], [9]])
    seen = []
    with torch.no_grad():
        assert model(token, cache=cache, labels=token).loss is not None
        assert isinstance(model(token, cache=cache, return_dict=False), tuple)
        assert model(token, cache=cache, logits_to_keep=torch.tensor([0])).logits.shape == (2, 1, VOCAB)
        assert model(token, past_key_values=cache).logits.shape == (2, 1, VOCAB)  # the old name: forward renames it
        handle = model.model.register_forward_hook(lambda module, args, out: seen.append(out))
        model(token, cache=cache)
        handle.remove()
        assert len(model(token, cache=cache, output_hidden_states=True).hidden_states) == 4
    assert len(seen) == 1 and lm_steps["n"] == 0
    assert model_steps["n"] == 5  # each went through forward, whose base model took its step (not hidden states)
    logits = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: logits.append(out))
    with torch.no_grad():
        out = model(token, cache=cache)
    handle.remove()
    assert lm_steps["n"] == 1 and len(logits) == 1 and logits[0] is out.logits  # the head runs as a module


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_the_lm_step_keeps_forwards_parameters(arch):
    """generate() reads a model's forward parameters to choose its inputs (the positions of left-padded rows
    among them): the fused forward has transformers' parameters, in order."""
    model = patch_model(decoder(arch), "linear")
    plain = type(decoder(arch)).forward
    assert isinstance(model, fused_layers.FusedCausalLMMixin)
    assert list(inspect.signature(type(model).forward).parameters) == list(inspect.signature(plain).parameters)
