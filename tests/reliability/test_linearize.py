"""Misuse of linearize(): each cell a clear error naming the bad input, before any training."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

from hf_efficient.training.linearize import LinearizeConfig, learnable_feature_maps, linearize

VOCAB = 48


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def bert():
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64)).eval()


def untouched(model) -> bool:
    return not any("hf_efficient" in name for name, _ in model.named_modules())


@pytest.mark.parametrize("name", ["elu", "relu", "favor"])
def test_fixed_feature_maps_are_refused(name):
    assert learnable_feature_maps() == ["hedgehog"]
    with pytest.raises(ValueError, match=rf"feature_map='{name}' has no learnable parameters.*hedgehog"):
        LinearizeConfig(feature_map=name)
    with pytest.raises(ValueError, match="no learnable parameters"):
        linearize(llama(), [torch.arange(8)], feature_map=name)


@pytest.mark.parametrize("window", [torch.tensor([1.0, 2.0, 3.7]), [1.0, 2.5, 3.0], torch.tensor([True, False]),
                                    {"input_ids": torch.tensor([[1.0, 2.0]])}])
def test_float_or_bool_token_ids_are_refused(window):
    model = llama()
    with pytest.raises(TypeError, match="token ids must be integers"):
        linearize(model, [torch.arange(8), window])
    assert untouched(model)


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 100, -1])
def test_token_ids_outside_the_vocabulary_are_refused(bad):
    model = llama()
    with pytest.raises(ValueError, match=rf"window 1 holds token id {bad}; the model's vocabulary has {VOCAB} ids"):
        linearize(model, [torch.arange(8), torch.tensor([1, 2, bad])])
    assert untouched(model)


@pytest.mark.parametrize("mask, error, message", [
    (torch.tensor([[1.0, 1.0, 0.0, 0.0]]), TypeError, "attention_mask has dtype"),
    (torch.tensor([[1, 1, 0]]), ValueError, "attention_mask has shape"),
    (torch.tensor([[1, 2, 0, 0]]), ValueError, "only 0 and 1"),
    (torch.tensor([[0, 0, 0, 0]]), ValueError, "padding only"),
])
def test_malformed_attention_masks_are_refused(mask, error, message):
    with pytest.raises(error, match=message):
        linearize(llama(), [{"input_ids": torch.tensor([[1, 2, 3, 4]]), "attention_mask": mask}])


def test_encoder_refuses_what_only_a_decoder_can_do():
    with pytest.raises(ValueError, match="window-linear.*bidirectional.*kind='linear'"):
        linearize(bert(), [torch.arange(8)], kind="window-linear", window=4)
    with pytest.raises(ValueError, match="finetune_loss='lm'.*encoder"):
        linearize(bert(), [torch.arange(8)], finetune_steps=1, finetune_loss="lm")


def test_mapping_without_input_ids_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="without 'input_ids'"):
        linearize(llama(), [{"ids": [1, 2, 3]}])
    with pytest.raises(ValueError, match="shape"):
        linearize(llama(), [torch.zeros(1, 2, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="shape"):
        linearize(llama(), [torch.zeros(0, dtype=torch.long)])


def test_qk_finetune_refused_before_training_where_query_and_key_are_one_projection():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64)).eval()
    with pytest.raises(ValueError, match="feature_maps\\+qk.*GPT2Attention.*no separate query/key projection"):
        linearize(model, [torch.arange(8)], finetune_steps=1, finetune_params="feature_maps+qk")
    assert untouched(model)
