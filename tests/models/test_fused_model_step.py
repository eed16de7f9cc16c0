"""The model-level decoding step of patched Llama, Mistral and Qwen2 decoders (``FusedLlamaModel`` ...): a token's
step runs embedding, rotary module, the compiled blocks and the final norm, and gives what transformers' ``forward``
on the modules gives (float64, ``HF_EFFICIENT_KERNELS=reference``); every argument or state it does not cover
(hidden states or attentions asked for, tuples, padding masks, masks of another length, hooks, gradients, a layer
kept softmax, other arguments) takes ``forward``, which is checked to have run."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_efficient import LinearAttentionCache, patch_model, unpatch_model
from hf_efficient.integrations import fused_layers
from hf_efficient.integrations.fused_layers import FusedLlamaModel
from hf_efficient_kernels import dispatch
from hf_efficient_kernels.cpu import load_decode_extension

pytestmark = pytest.mark.skipif(load_decode_extension() is None, reason="the CPU decoding kernels cannot be built")

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.2)


def decoder(arch: str = "llama", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**COMMON)).eval()
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=False)).eval()


@pytest.fixture
def model_steps(monkeypatch):
    """How many decoding steps the model-level step took (gave an output rather than None)."""
    calls = {"n": 0}
    original = fused_layers.fused_model_step

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += out is not None
        return out

    monkeypatch.setattr(fused_layers, "fused_model_step", counted)
    return calls


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
    model = patch_model(decoder(arch), kind, **params)
    assert type(model.model).__name__ == f"Fused{type(model.model).__mro__[2].__name__}"
    ids = torch.randint(0, VOCAB, (2, 5))
    got, want = both(model, ids, steps(6), monkeypatch)
    assert model_steps["n"] == 6  # every step of the float32 model took the model-level step
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_generate_takes_the_model_step_and_gives_the_tokens_of_the_modules(model_steps, monkeypatch):
    model = patch_model(decoder(seed=1), "window-linear", window=4)
    ids = torch.randint(0, VOCAB, (1, 6))
    fast = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert model_steps["n"] == 9  # every token after the prefill's
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), fast)


def test_positions_embeddings_and_full_masks_take_the_model_step(model_steps, monkeypatch):
    model = patch_model(decoder(), "window-linear", window=4)
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
    model = patch_model(decoder(arch), "window-linear", window=4)
    ids = torch.randint(0, VOCAB, (2, 5))
    layers = COMMON["num_hidden_layers"]

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
    assert model_steps["n"] == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_a_mask_that_does_not_cover_the_cache_is_not_taken_for_no_mask(model_steps):
    """A full mask of the wrong length is the user's mistake: forward sees it as it would without the step."""
    model = patch_model(decoder(), "linear")
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
    model = patch_model(decoder(), "linear")
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
    mixed = patch_model(decoder(), "linear", layers=[0, 1])  # layer 2 keeps softmax
    cache = LinearAttentionCache(config=mixed.config)
    with torch.no_grad():
        mixed(torch.randint(0, VOCAB, (1, 4)), cache=cache)
        mixed(torch.tensor([[3]]), cache=cache)
    assert model_steps["n"] == 1


def test_a_patched_base_model_takes_the_model_step(model_steps, monkeypatch):
    torch.manual_seed(0)
    base = patch_model(LlamaModel(LlamaConfig(**COMMON)).eval(), "window-linear", window=3)
    ids = torch.randint(0, VOCAB, (2, 4))

    def hidden(model, cache):
        with torch.no_grad():
            return torch.cat([model(torch.full((2, 1), t), cache=cache).last_hidden_state for t in range(4)], dim=1)

    got, want = both(base, ids, hidden, monkeypatch)
    assert model_steps["n"] == 4
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_unpatch_gives_the_base_model_class_back_and_copies_keep_the_step(model_steps):
    model = patch_model(decoder(), "linear")
    assert type(model.model) is FusedLlamaModel
    twin = copy.deepcopy(model)
    assert type(twin.model) is FusedLlamaModel
    cache = prefilled(twin, torch.randint(0, VOCAB, (1, 3)))
    with torch.no_grad():
        twin(torch.tensor([[3]]), cache=cache)
    assert model_steps["n"] == 1
    unpatch_model(model)
    assert type(model.model) is LlamaModel
