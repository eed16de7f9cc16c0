"""Weights moved onto huge pages for decoding (``hf_efficient_kernels.memory``, ``hf_efficient.place_for_decoding``)
keep every parameter object, value, tie, gradient flag and checkpoint; the copies are separate storages."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from hf_efficient import LinearAttentionCache, LinearLMConfig, LinearLMForCausalLM, place_for_decoding
from hf_efficient.decoding import placed_for_decoding
from hf_efficient_kernels.memory import HUGE_PAGE_BYTES, huge_page_copies, huge_page_empty


def test_copies_are_equal_separate_aligned_storages():
    tensors = [torch.randn(3, 5), torch.arange(7), torch.zeros(0), torch.tensor([True, False]),
               torch.randn(300, 700).to(torch.bfloat16), torch.randn(2, 0, 3), torch.randn(4, 6)[:, ::2]]
    copies = huge_page_copies(tensors)
    for t, c in zip(tensors, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and torch.equal(c, t) and c.is_contiguous()
        assert c.data_ptr() % 64 == 0
        assert c.untyped_storage().data_ptr() == c.data_ptr()  # its own storage, starting at the tensor
    spans = sorted((c.data_ptr(), c.data_ptr() + c.numel() * c.element_size()) for c in copies if c.numel())
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no two overlap
    copies[0].add_(1)  # writable, and writing one leaves the rest
    assert torch.equal(copies[0], tensors[0] + 1) and torch.equal(copies[1], tensors[1])
    del tensors
    assert torch.equal(copies[4], copies[4].clone())  # alive without the originals


def test_the_first_tensor_starts_on_a_huge_page_and_the_advice_can_be_skipped(monkeypatch):
    (big,) = huge_page_empty([((HUGE_PAGE_BYTES // 4 * 3,), torch.float32)])
    assert big.data_ptr() % HUGE_PAGE_BYTES == 0
    monkeypatch.setenv("HF_EFFICIENT_HUGE_PAGES", "0")
    (small,) = huge_page_copies([torch.ones(10)])
    assert torch.equal(small, torch.ones(10))


def test_refuses_tensors_not_on_the_cpu():
    with pytest.raises(ValueError, match="CPU tensors only"):
        huge_page_copies([torch.empty(3, device="meta")])
    with pytest.raises(ValueError, match="CPU tensors only"):
        huge_page_copies([[1.0, 2.0]])


def tiny_lm(tie: bool) -> LinearLMForCausalLM:
    torch.manual_seed(0)
    return LinearLMForCausalLM(LinearLMConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, tie_word_embeddings=tie)).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_placement_keeps_parameters_ties_values_and_checkpoints(tie, tmp_path):
    model = tiny_lm(tie)
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moved = place_for_decoding(model)
    assert moved > 0 and place_for_decoding(model) == 0  # idempotent
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tie
    assert placed_for_decoding(model, model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight)
    model.save_pretrained(tmp_path / "m")  # safetensors sees separate storages (no shared-tensor refusal)
    reloaded = LinearLMForCausalLM.from_pretrained(tmp_path / "m")
    assert all(torch.equal(before[k], v) for k, v in reloaded.state_dict().items())
    weights = {k: v for k, v in model.state_dict().items() if "lm_head" not in k or not tie}
    save_file(weights, tmp_path / "w.safetensors")
    assert all(torch.equal(before[k], v) for k, v in load_file(tmp_path / "w.safetensors").items())


def test_a_model_placed_inside_inference_mode_still_trains():
    model = tiny_lm(False)
    with torch.inference_mode():  # the first decoding step places the weights
        cache = LinearAttentionCache.from_model(model)
        model(torch.tensor([[1, 2, 3]]), cache=cache, use_cache=True)
        model(torch.tensor([[4]]), cache=cache, use_cache=True)
    assert placed_for_decoding(model, model.lm_head.weight)
    assert not model.lm_head.weight.is_inference() and model.lm_head.weight.requires_grad
    model.train()
    loss = model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # in-place updates on the placed weights


def test_new_weights_are_placed_again_and_the_reference_path_places_nothing(monkeypatch):
    model = tiny_lm(False)
    with torch.no_grad():
        cache = LinearAttentionCache.from_model(model)
        model(torch.tensor([[1, 2]]), cache=cache, use_cache=True)
        model(torch.tensor([[3]]), cache=cache, use_cache=True)
        assert placed_for_decoding(model, model.lm_head.weight)
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))  # a new weight
        assert not placed_for_decoding(model, model.lm_head.weight)
        model(torch.tensor([[4]]), cache=cache, use_cache=True)
        assert placed_for_decoding(model, model.lm_head.weight)
    fresh = tiny_lm(False)
    monkeypatch.setenv("HF_EFFICIENT_KERNELS", "reference")
    with torch.no_grad():
        cache = LinearAttentionCache.from_model(fresh)
        fresh(torch.tensor([[1, 2]]), cache=cache, use_cache=True)
        fresh(torch.tensor([[3]]), cache=cache, use_cache=True)
    assert not placed_for_decoding(fresh, fresh.lm_head.weight)


def test_placement_skips_what_is_not_on_the_cpu():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                             num_attention_heads=2))
    assert place_for_decoding(model) == 0
    assert model.lm_head.weight.device.type == "meta"


def test_parameters_sharing_one_storage_keep_sharing_it():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    fused = torch.randn(2, 4, 4)
    model[0].weight, model[1].weight = torch.nn.Parameter(fused[0]), torch.nn.Parameter(fused[1])
    moved = place_for_decoding(model)
    assert moved == 2 * 4 * 4  # the biases only
    assert model[0].weight.untyped_storage().data_ptr() == model[1].weight.untyped_storage().data_ptr()


def test_no_memory_to_map_leaves_the_weights_and_warns(monkeypatch):
    import hf_efficient.decoding as decoding

    def refuse(specs):
        raise OSError("Cannot allocate memory")

    monkeypatch.setattr(decoding, "huge_page_empty", refuse)
    model = tiny_lm(False)
    before = model.lm_head.weight.data_ptr()
    with pytest.warns(RuntimeWarning, match="stay where they are"):
        assert place_for_decoding(model) == 0
    assert model.lm_head.weight.data_ptr() == before
    with torch.no_grad():  # decoding still works, and does not try again every step
        cache = LinearAttentionCache.from_model(model)
        model(torch.tensor([[1, 2]]), cache=cache, use_cache=True)
        model(torch.tensor([[3]]), cache=cache, use_cache=True)
