"""The ``local`` kind inside models: a patched Llama equals transformers' own sliding-window Mistral."""

from __future__ import annotations

import pytest
import torch
import transformers

from hf_efficient import attention_kind_names, patch_model

_SIZES = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=37, max_position_embeddings=64, initializer_range=0.3, head_dim=8,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _pair(window: int):
    """A Llama patched with ``local`` and a Mistral with the same weights and ``sliding_window=window``."""
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SIZES)).eval()
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(**_SIZES, sliding_window=window)).eval()
    missing = mistral.load_state_dict(llama.state_dict(), strict=True)
    assert not missing.missing_keys
    patch_model(llama, "local", window=window)
    return llama, mistral


def test_local_is_a_registered_kind():
    assert "local" in attention_kind_names()


@pytest.mark.parametrize("window", [1, 3, 8])
def test_patched_forward_equals_a_sliding_window_model(window):
    llama, mistral = _pair(window)
    ids = torch.randint(3, 100, (2, 19))
    with torch.no_grad():
        ours, theirs = llama(ids).logits, mistral(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        full = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SIZES)).eval()
        full.load_state_dict(mistral.state_dict())
        assert (full(ids).logits - ours).abs().max() > 1e-3  # the window really changes the answer


def test_generation_with_a_cache_equals_the_sliding_window_model():
    llama, mistral = _pair(4)
    ids = torch.randint(3, 100, (1, 9))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = llama.generate(ids, **kwargs)
        uncached = llama.generate(ids, use_cache=False, **kwargs)
        theirs = mistral.generate(ids, **kwargs)
    assert torch.equal(ours, uncached) and torch.equal(ours, theirs)


def test_bad_window_is_refused_when_patching():
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SIZES))
    with pytest.raises(ValueError, match="window must be a positive int"):
        patch_model(llama, "local", window=0)
