"""Float32 decoding through the compiled decoding kernels (the whole block in one call; or ``DecodeLinear`` and
``linear_decode_step``) against the uncached model and against the same model on its PyTorch path
(``HF_EFFICIENT_KERNELS=reference``): greedy, left padding, beam search (states reordered) and a reused cache."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_efficient import LinearAttentionCache, LinearLMConfig, LinearLMForCausalLM
from hf_efficient.models.linear_lm.modeling_linear_lm import DecodeLinear
from hf_efficient_kernels import dispatch
from hf_efficient_kernels.cpu import load_decode_extension

VOCAB = 40

pytestmark = pytest.mark.skipif(load_decode_extension() is None, reason="the CPU decoding kernels cannot be built")


def tiny(feature_map: str = "elu", position_embedding: str = "rope", seed: int = 0) -> LinearLMForCausalLM:
    """A float32 model with large weights, so greedy decoding does not collapse to one token."""
    torch.manual_seed(seed)
    config = LinearLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, feature_map=feature_map, position_embedding=position_embedding,
                            chunk_size=4, initializer_range=0.3, pad_token_id=0)
    return LinearLMForCausalLM(config).eval()


class Counts(dict):
    """Kernels given out (``gemv``, ``step``) and decoder blocks that ran compiled (``block``)."""

    def __init__(self, mode: str, blocks):
        super().__init__(gemv=0, step=0, mode=mode)
        self.blocks = blocks

    def __getitem__(self, key: str):
        return self.blocks.n if key == "block" else super().__getitem__(key)

    def __setitem__(self, key: str, value) -> None:
        if key == "block":
            self.blocks.n = value
        else:
            super().__setitem__(key, value)


@pytest.fixture(params=["block", "step"])
def counted(request, monkeypatch, block_calls):
    """Counts of the decoding kernels that ran: with "block" the whole block runs as one compiled call (the
    default); with "step" that kernel is switched off, so the linear layers and the attention step run theirs."""
    counts = Counts(request.param, block_calls)
    originals = {"gemv": dispatch.decode_gemv_kernel, "step": dispatch.linear_decode_step_kernel}
    attributes = {"gemv": "decode_gemv_kernel", "step": "linear_decode_step_kernel"}

    def count(name, fn):
        def wrapped(*args, **kwargs):
            kernel = fn(*args, **kwargs)
            counts[name] += kernel is not None
            return kernel
        return wrapped

    for name, fn in originals.items():
        monkeypatch.setattr(dispatch, attributes[name], count(name, fn))
    if request.param == "step":
        monkeypatch.setattr(dispatch, "decoder_block_step_kernel", lambda *args, **kwargs: None)
    return counts


def ran(counts) -> bool:
    """The kernels of this mode ran."""
    if counts["mode"] == "block":
        return counts["block"] > 0
    return counts["gemv"] > 0 and counts["step"] > 0 and counts["block"] == 0


def on_reference_path(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setenv(dispatch.ENV_VAR, "reference")
        return fn()


@pytest.mark.parametrize("feature_map,position", [("elu", "rope"), ("relu", "none")])
def test_greedy_tokens_equal_uncached_argmax(counted, feature_map, position):
    model = tiny(feature_map, position)
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert ran(counted)
    if counted["mode"] == "block":  # each of the 11 steps after the prefill: blocks, norm and head in one call
        # (the one product given out alone: the head on the prefill's last position)
        assert counted.blocks.stacks == 11 and counted["block"] == 11 * 2 and counted["gemv"] == 1
    seq = ids
    with torch.no_grad():  # argmax of the full forward over the whole prefix at every step (no cache)
        for _ in range(12):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert len(set(seq[0, 9:].tolist())) > 2


def test_step_logits_equal_the_pytorch_path(counted, monkeypatch):
    model = tiny()
    ids = torch.randint(1, VOCAB, (1, 11), generator=torch.Generator().manual_seed(2))

    def run():
        cache = LinearAttentionCache(model.config.num_hidden_layers)
        with torch.no_grad():
            logits = [model(ids[:, :6], cache=cache).logits]
            logits += [model(ids[:, t : t + 1], cache=cache).logits for t in range(6, 11)]
        return torch.cat(logits, dim=1), cache

    fast, fast_cache = run()
    assert counted[counted["mode"]] == 5 * 2  # five steps of two layers
    slow, slow_cache = on_reference_path(monkeypatch, run)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for i in range(2):
        torch.testing.assert_close(fast_cache.recurrent_state(i).packed(), slow_cache.recurrent_state(i).packed(),
                                   rtol=1e-5, atol=1e-5)


def test_left_padded_batch_and_beam_search_equal_the_pytorch_path(counted, monkeypatch):
    model = tiny()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    greedy = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    beams = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, early_stopping=True)
    fast = [model.generate(ids, **greedy), model.generate(ids[:1], **beams)]
    assert ran(counted)  # 2 rows, 3 beams: both within DECODE_MAX_ROWS
    slow = on_reference_path(monkeypatch, lambda: [model.generate(ids, **greedy), model.generate(ids[:1], **beams)])
    assert torch.equal(fast[0], slow[0])
    assert torch.equal(fast[1], slow[1])
    uncached = model.generate(ids[:1], use_cache=False, **beams)
    assert torch.equal(fast[1], uncached)


def test_reused_cache_is_not_corrupted(counted):
    """A prompt cache copied before decoding continues the same way twice: decoding never writes a state that
    a copy (or the caller) still holds."""
    model = tiny()
    ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    prompt = model.generate(ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    before = prompt.cache.recurrent_state(0).packed().clone()
    runs = []
    for _ in range(2):
        cache = copy.deepcopy(prompt.cache)
        held = cache.recurrent_state(0)
        held_before = held.packed().clone()
        runs.append(model.generate(prompt.sequences, cache=cache, max_new_tokens=6, do_sample=False))
        assert torch.equal(held.packed(), held_before)  # the state object handed out earlier is unchanged
    assert ran(counted)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(prompt.cache.recurrent_state(0).packed(), before)
    assert torch.equal(runs[0], model.generate(ids, max_new_tokens=7, do_sample=False))


def test_decode_linear_is_a_linear():
    layer = DecodeLinear(24, 10, bias=True)
    plain = torch.nn.Linear(24, 10, bias=True)
    plain.load_state_dict(layer.state_dict())
    assert list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(1, 1, 24)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    # training takes torch's path: same values and gradients as nn.Linear
    xs = torch.randn(1, 24, requires_grad=True)
    layer(xs).square().sum().backward()
    plain(xs.detach().requires_grad_()).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
    assert layer(torch.randn(7, 24)).shape == (7, 10)


def test_commit_refuses_a_state_it_cannot_continue():
    model = tiny()
    cache = LinearAttentionCache(model.config.num_hidden_layers)
    with torch.no_grad():
        model(torch.randint(1, VOCAB, (1, 5)), cache=cache)
    layer = cache.layers[0]
    with pytest.raises(ValueError, match="batch"):
        layer.commit(layer.state, torch.zeros(2, 1, 32))
    with pytest.raises(ValueError, match="dtype"):
        layer.commit(layer.state, torch.zeros(1, 1, 32, dtype=torch.float64))
    layer.commit(layer.state, torch.zeros(1, 1, 32))
    assert cache.get_seq_length() == 6


def test_hooks_and_adapters_keep_the_module_path(counted, monkeypatch):
    """A hook on a projection (as an adapter or a probe adds) must see the token: the compiled block steps aside."""
    model = tiny()
    handle = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda module, args, out: out + 0.5)
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    counted["block"] = 0

    def run():
        cache = LinearAttentionCache(model.config.num_hidden_layers)
        with torch.no_grad():
            model(ids[:, :5], cache=cache)
            return model(ids[:, 5:], cache=cache).logits

    fast = run()
    if counted["mode"] == "block":
        assert counted["block"] == 1  # layer 0 (no hook) fused, layer 1 through its modules
    slow = on_reference_path(monkeypatch, run)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    handle.remove()
    unhooked = run()
    assert (unhooked - fast).abs().max() > 1e-3  # the hook mattered
