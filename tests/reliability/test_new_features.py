"""Misuse of the recently added options: each case gives a clear error or the answer of an independent reference.

Covered: the output capture of patched models, the registry's decoding forms (``decode=``) as the cache runs
them, ``clustering="queries"`` on extreme query scales, megaNIST folders read back through ``datasets`` and
``finetune_params="feature_maps+qk"`` on an encoder with separate query/key projections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
import transformers

from hf_efficient import patch_model
from hf_efficient.attention import registry
from hf_efficient.attention.registry import AttentionKind, get_attention_kind, register_attention_kind
from hf_efficient.integrations import unpatch_model
from hf_efficient.integrations.attention_interface import register_with_transformers
from hf_efficient.integrations.cache import LinearAttentionCache, RecurrentStateLayer

VOCAB = 48


def _bert(cls=transformers.BertModel):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, initializer_range=0.3)
    return cls(config).eval()


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                                      pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def forget_capture():
    """Drops a class from transformers' output-capture registry, as in a process that never built one;
    the entries come back after the test (the registry's own ``get`` has another signature than a dict's, so
    monkeypatch cannot do it)."""
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    saved = dict(_CAN_RECORD_REGISTRY)

    def forget(cls: type) -> None:
        dict.pop(_CAN_RECORD_REGISTRY, str(cls), None)

    yield forget
    dict.clear(_CAN_RECORD_REGISTRY)
    dict.update(_CAN_RECORD_REGISTRY, saved)


def _layer_outputs(model, layers, ids):
    """Each encoder layer's output, recorded by forward hooks (the reference for ``hidden_states``)."""
    seen = []
    handles = [layer.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
               for layer in layers]
    try:
        with torch.no_grad():
            last = model(ids).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return seen, last


# --------------------------------------------------------------------------- patched models' hidden states
@pytest.mark.parametrize("kind, params", [("linear", {}), ("improved-clustered", {"clusters": 3, "topk": 4,
                                                                                   "clustering": "queries"})])
def test_a_patched_base_model_returns_every_layers_hidden_states(forget_capture, kind, params):
    # The base model's own class is swapped by patch_model; its hidden states were silently None.
    from hf_efficient.integrations.architectures import EfficientBertModel

    forget_capture(EfficientBertModel)
    model = patch_model(_bert(), kind, **params)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    hooked, last = _layer_outputs(model, model.encoder.layer, ids)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert out.hidden_states is not None
    assert len(out.hidden_states) == 3
    for got, expected in zip(out.hidden_states[1:], hooked, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(out.hidden_states[-1], last, rtol=0, atol=0)


def test_unpatching_a_model_built_efficient_keeps_its_hidden_states(forget_capture):
    from hf_efficient import efficient_config
    from hf_efficient.integrations.architectures import EfficientBertModel

    config = efficient_config(_bert().config, "linear")
    model = EfficientBertModel(config).eval()
    forget_capture(transformers.BertModel)  # as if no BertModel was ever built here
    unpatch_model(model)
    assert type(model) is transformers.BertModel
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    hooked, _ = _layer_outputs(model, model.encoder.layer, ids)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert hidden is not None and len(hidden) == 3
    torch.testing.assert_close(hidden[2], hooked[1], rtol=0, atol=0)


# --------------------------------------------------------------------------- the registry's decoding forms
@dataclass
class _Params:
    pass


class _SumState(NamedTuple):
    total: torch.Tensor

    def map(self, fn):
        return _SumState(fn(self.total))

    def nbytes(self) -> int:
        return self.total.numel() * self.total.element_size()


def _forward(q, k, v, params, *, causal=False, key_padding_mask=None, query_padding_mask=None, scale=None,
             module=None):
    """out_i = sum_{j <= i} v_j (the queries are the last n_q positions)."""
    n_q, n_k = q.shape[2], k.shape[2]
    keep = torch.ones(n_k, n_k, dtype=v.dtype).tril()[n_k - n_q:]
    return keep @ v


def _good_decode(state, q, k, v, params, *, key_padding_mask=None, scale=None, module=None):
    total = state.total if state is not None else v.new_zeros(*v.shape[:2], 1, v.shape[-1])
    out = total + v.cumsum(2)
    return out, _SumState(out[:, :, -1:])


def _tensor_state_decode(state, q, k, v, params, *, key_padding_mask=None, scale=None, module=None):
    out, new = _good_decode(None if state is None else _SumState(state), q, k, v, params)
    return out, new.total  # a bare tensor: no map() for beam search, no nbytes()


def _transposed_decode(state, q, k, v, params, *, key_padding_mask=None, scale=None, module=None):
    out, new = _good_decode(state, q, k, v, params)
    return out.transpose(1, 2), new  # (batch, T, heads, d_v)


@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))  # registrations end with the test


def _register(name, decode):
    register_attention_kind(AttentionKind(name=name, params_class=_Params, forward=_forward, supports_causal=True,
                                          supports_bidirectional=False, decode=decode))
    register_with_transformers()


def test_the_reference_kind_decodes_like_its_forward(scratch_registry):
    # the well-formed kind of this file really decodes through the cache (so the refusals below are meaningful)
    _register("toy-sum", _good_decode)
    model = patch_model(_llama(), "toy-sum")
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                       model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False))


@pytest.mark.parametrize("decode, error, words", [
    (_tensor_state_decode, TypeError, "without map and nbytes"),
    (_transposed_decode, ValueError, "expected \\(batch, heads, T, d_v\\)"),
])
def test_a_malformed_decoding_form_is_named_at_its_first_step(scratch_registry, decode, error, words):
    # was: AttributeError "'Tensor' object has no attribute 'map'" at the second step, or a silently
    # mis-shaped attention output
    _register("toy-bad", decode)
    model = patch_model(_llama(), "toy-bad")
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with pytest.raises(error, match=f"'toy-bad'.*decoding form.*{words}"):
        model.generate(ids, max_new_tokens=3, do_sample=False)


def test_registering_something_else_than_a_kind_is_refused(scratch_registry):
    with pytest.raises(TypeError, match="needs an AttentionKind.*got str"):
        register_attention_kind("toy")


def test_a_cache_layer_built_from_the_kind_object_matches_the_models_layout():
    layer = RecurrentStateLayer(get_attention_kind("linear"))
    assert layer.kind == "linear"
    model = patch_model(_llama(), "linear")
    cache = LinearAttentionCache(config=model.config)
    cache.layers = [RecurrentStateLayer(get_attention_kind("linear")) for _ in cache.layers]
    cache.check_layout(model.config)  # was: "built for another layer layout"
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False, past_key_values=cache),
                       model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False))


# --------------------------------------------------------------------------- clustering="queries"
@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_query_kmeans_does_not_depend_on_the_queries_scale(scale):
    # k-means is scale invariant: the clusters of c * x are those of x (the Hamming clustering is too)
    from hf_efficient.attention.query_kmeans import query_kmeans

    x = torch.randn(1, 40, 8, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(1, 40, dtype=torch.bool)
    expected = query_kmeans(x.double(), valid, 4, 5, seed=0)
    assert len(expected.unique()) == 4
    assert torch.equal(query_kmeans(x * scale, valid, 4, 5, seed=0), expected)


# --------------------------------------------------------------------------- megaNIST on disk
def test_two_megamnist_folders_of_one_name_load_as_themselves(tmp_path):
    datasets = pytest.importorskip("datasets")
    from hf_efficient.vision.megamnist import write_megamnist

    first = write_megamnist(tmp_path / "a" / "megamnist", canvas_size=256, num_train=2, num_test=1)
    second = write_megamnist(tmp_path / "b" / "megamnist", canvas_size=256, num_train=3, num_test=1, seed=1)
    cache = str(tmp_path / "hf-cache")  # one cache, as every call without cache_dir shares
    assert datasets.load_dataset(str(first), cache_dir=cache)["train"].num_rows == 2
    # the folder's card says to read it with datasets.load_dataset(folder)
    assert datasets.load_dataset(str(second), cache_dir=cache)["train"].num_rows == 3


# --------------------------------------------------------------------------- linearize
def test_finetune_qk_trains_distilberts_separate_query_and_key_projections():
    from hf_efficient.training.linearize import linearize

    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37)
    model = transformers.DistilBertModel(config).eval()
    attn = model.transformer.layer[1].attention
    before = {name: getattr(attn, name).weight.detach().clone() for name in ("q_lin", "k_lin", "v_lin")}
    train = [torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))]
    linearize(model, train, transfer_steps=1, finetune_steps=2, finetune_lr=1e-2, finetune_params="feature_maps+qk")
    assert not torch.equal(attn.q_lin.weight, before["q_lin"])
    assert not torch.equal(attn.k_lin.weight, before["k_lin"])
    assert torch.equal(attn.v_lin.weight, before["v_lin"])


# --------------------------------------------------------------------------- importance sampling's tau
def _tau_literal(scores: torch.Tensor) -> float:
    """1 / sqrt(1 - ||g - u||^2 / ||g||^2), g = s / sum(s), u = 1 / n: the definition, on normalised scores."""
    g = scores / scores.sum()
    u = 1.0 / scores.numel()
    return 1.0 / float((1.0 - ((g - u) ** 2).sum() / (g**2).sum()).clamp_min(1e-12).sqrt())


@pytest.mark.parametrize("scores", [[1e-200, 0.0, 0.0, 0.0], [3e-170, 1e-170, 0.0], [1e200, 1e200]])
def test_tau_does_not_depend_on_the_scores_scale(scores):
    from hf_efficient.training.scores import tau_from_scores

    s = torch.tensor(scores, dtype=torch.float64)
    assert tau_from_scores(s) == pytest.approx(_tau_literal(s / s.max()), rel=1e-12)


# --------------------------------------------------------------------------- non-causal linear attention
def test_noncausal_linear_attention_has_second_derivatives(monkeypatch):
    from hf_efficient.attention.linear import linear_attention
    from hf_efficient_kernels.cpu import load_extension

    if load_extension() is None:
        pytest.skip("the CPU kernel cannot be built here (the PyTorch path has second derivatives)")
    monkeypatch.delenv("HF_EFFICIENT_KERNELS", raising=False)  # the default choice: the kernel

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, n, 3, generator=g, dtype=torch.float64, requires_grad=True) for n in (4, 6))
    v = torch.randn(1, 2, 6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, True, True]])
    assert torch.autograd.gradgradcheck(lambda q, k, v: linear_attention(q, k, v, key_padding_mask=mask), (q, k, v))


# --------------------------------------------------------------------------- a config shared by two models
def test_patching_one_model_leaves_another_built_from_the_same_config_alone(tmp_path):
    from hf_efficient.integrations import is_patched

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    patched, other = transformers.LlamaForCausalLM(config).eval(), transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, before = other(ids).logits, patched(ids).logits
    patch_model(patched, "linear")
    assert is_patched(patched) and not is_patched(other)
    assert type(other.config) is transformers.LlamaConfig
    # every submodule of the patched model reads the patched config
    assert all(m.config is patched.config for m in patched.modules() if "config" in m.__dict__)
    # was: the other model's checkpoint reloaded with linear attention (logits off by ~10)
    other.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is transformers.LlamaForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected)
    unpatch_model(patched)
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, before)
