"""A kind registered from outside the package decodes through generate() with the package's cache.

The kind below lives in this file only: a forward, a decoding form (``decode``) and its state. Nothing
of the package is edited, yet ``patch_model`` uses it, ``generate()`` builds a ``LinearAttentionCache``
whose layers run its decoding form, and the cached decoding equals the uncached forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
import transformers

from hf_efficient import LinearAttentionCache, patch_model
from hf_efficient.attention import registry
from hf_efficient.attention.registry import AttentionKind, recurrent_kind_names, register_attention_kind
from hf_efficient.integrations.attention_interface import register_with_transformers

KIND = "toy-retention"


@dataclass
class RetentionParams:
    decay: float = 0.75


class RetentionState(NamedTuple):
    """sum_j decay^(t - j) k_j v_j^T over the tokens seen: ``(batch, heads, d, d_v)``."""

    kv: torch.Tensor

    def map(self, fn) -> RetentionState:
        return RetentionState(fn(self.kv))

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def _forward(q, k, v, params, *, causal=False, key_padding_mask=None, query_padding_mask=None, scale=None,
             module=None):
    """Quadratic form: out_i = sum_{j <= i, j real} decay^(i - j) (scale q_i . k_j) v_j; the queries are the
    last n_q positions."""
    n_q, n_k = q.shape[2], k.shape[2]
    i = torch.arange(n_k - n_q, n_k, dtype=q.dtype)[:, None]
    j = torch.arange(n_k, dtype=q.dtype)[None, :]
    weights = torch.where(j <= i, params.decay ** (i - j).clamp(min=0), 0.0)
    if key_padding_mask is not None:
        weights = weights * key_padding_mask[:, None, None, :].to(q.dtype)
    return (scale * q @ k.transpose(-1, -2) * weights) @ v


def _decode(state, q, k, v, params, *, key_padding_mask=None, scale=None, module=None):
    """One token at a time: kv <- decay kv + k_t v_t^T (padded tokens only decay), out_t = scale q_t kv."""
    kv = state.kv if state is not None else q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    outs = []
    for t in range(q.shape[2]):
        new = k[:, :, t, :, None] * v[:, :, t, None, :]
        if key_padding_mask is not None:
            new = new * key_padding_mask[:, t, None, None, None].to(new.dtype)
        kv = params.decay * kv + new
        outs.append(scale * torch.einsum("bhd,bhde->bhe", q[:, :, t], kv))
    return torch.stack(outs, dim=2), RetentionState(kv)


@pytest.fixture
def toy_kind(monkeypatch):
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))  # the registration ends with the test
    register_attention_kind(AttentionKind(name=KIND, params_class=RetentionParams, forward=_forward,
                                          supports_causal=True, supports_bidirectional=False, decode=_decode))
    register_with_transformers()
    return KIND


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                                      pad_token_id=0)
    return transformers.LlamaForCausalLM(config).double().eval()


def test_a_kind_registered_here_decodes_with_the_package_cache(toy_kind):
    assert toy_kind in recurrent_kind_names()
    model = patch_model(_llama(), toy_kind, decay=0.6)
    ids = torch.randint(3, 48, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    cache = out.cache
    assert isinstance(cache, LinearAttentionCache)
    assert [layer.kind for layer in cache.layers] == [toy_kind, toy_kind]
    assert all(isinstance(cache.recurrent_state(i), RetentionState) for i in range(2))
    # constant size: 2 layers x batch 2 x 4 heads x (8 x 8) float64, whatever the length
    assert cache.nbytes() == 2 * 2 * 4 * 8 * 8 * 8
    # every decoded step's logits equal the uncached forward of the whole sequence at that position
    new = out.sequences.shape[1] - ids.shape[1]
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        uncached = model(out.sequences, attention_mask=full_mask, use_cache=False).logits
    assert len(out.logits) == new
    for step, logits in enumerate(out.logits):  # generate() hands its logits back in float32
        torch.testing.assert_close(logits, uncached[:, ids.shape[1] - 1 + step].float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(out.sequences, model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                                     use_cache=False))
    # the kind really replaced softmax attention
    with torch.no_grad():
        softmax = _llama()(out.sequences, attention_mask=full_mask).logits
    assert (softmax - uncached).abs().max() > 1e-3


def test_beam_search_reorders_the_registered_state(toy_kind):
    model = patch_model(_llama(), toy_kind)
    ids = torch.randint(3, 48, (1, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_a_kind_without_a_decoding_form_cannot_claim_recurrence():
    with pytest.raises(ValueError, match="decode"):
        AttentionKind(name="x", params_class=RetentionParams, forward=_forward, supports_causal=True,
                      supports_recurrent=True)
