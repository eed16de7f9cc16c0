"""Tiny random models of every supported architecture (seconds to build, no downloads)."""

from __future__ import annotations

import pytest
import torch
import transformers

import hf_efficient  # noqa: F401  (registers the kinds and the efficient classes)

VOCAB = 100

_TEXT_SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=37, max_position_embeddings=64, initializer_range=0.3)
_GQA = dict(_TEXT_SIZES, num_key_value_heads=2)

# name -> (config factory, model class name, causal). initializer_range=0.3 makes attention far from
# uniform, so softmax and its approximations really differ.
TINY = {
    "bert": (lambda: transformers.BertConfig(**_TEXT_SIZES), "BertModel", False),
    "roberta": (lambda: transformers.RobertaConfig(**dict(_TEXT_SIZES, max_position_embeddings=70, pad_token_id=1)),
                "RobertaModel", False),
    "distilbert": (lambda: transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4,
                                                         hidden_dim=37, max_position_embeddings=64,
                                                         initializer_range=0.3), "DistilBertModel", False),
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                             initializer_range=0.3), "GPT2Model", True),
    "llama": (lambda: transformers.LlamaConfig(**_GQA), "LlamaModel", True),
    "qwen2": (lambda: transformers.Qwen2Config(**_GQA), "Qwen2Model", True),
    "vit": (lambda: transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                           initializer_range=0.3), "ViTModel", False),
}
# Hybrid and other modern layouts: sliding-window layers (window 4) beside full ones, GQA, soft-capping.
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MODERN = dict(_GQA, **_IDS, head_dim=8)
TINY.update({
    "electra": (lambda: transformers.ElectraConfig(**_TEXT_SIZES, embedding_size=32), "ElectraModel", False),
    "modernbert": (lambda: transformers.ModernBertConfig(**dict(_TEXT_SIZES, num_hidden_layers=3), **_IDS,
                                                         cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=3,
                                                         local_attention=4), "ModernBertModel", False),
    "gpt_neox": (lambda: transformers.GPTNeoXConfig(**_TEXT_SIZES, **_IDS), "GPTNeoXModel", True),
    "qwen3": (lambda: transformers.Qwen3Config(**_MODERN), "Qwen3Model", True),
    "mistral": (lambda: transformers.MistralConfig(**_MODERN, sliding_window=4), "MistralModel", True),
    "phi3": (lambda: transformers.Phi3Config(**_GQA, **_IDS, sliding_window=4), "Phi3Model", True),
    "qwen2_sliding": (lambda: transformers.Qwen2Config(**dict(_GQA, num_hidden_layers=4), **_IDS,
                                                       use_sliding_window=True, sliding_window=4, max_window_layers=2),
                      "Qwen2Model", True),
    "gemma2": (lambda: transformers.Gemma2Config(**dict(_MODERN, num_hidden_layers=4), sliding_window=4,
                                                 attn_logit_softcapping=5.0), "Gemma2Model", True),
    "gemma3": (lambda: transformers.Gemma3TextConfig(**dict(_MODERN, num_hidden_layers=6), sliding_window=4),
               "Gemma3TextModel", True),
    "cohere2": (lambda: transformers.Cohere2Config(**dict(_GQA, num_hidden_layers=4), **_IDS, sliding_window=4),
                "Cohere2Model", True),
})
HYBRID = ["modernbert", "mistral", "phi3", "qwen2_sliding", "gemma2", "gemma3", "cohere2"]
TEXT = [name for name in TINY if name != "vit"]
CAUSAL = [name for name, (_, _, causal) in TINY.items() if causal]


def tiny_model(name: str, class_name: str | None = None, seed: int = 0):
    """A tiny random model of architecture ``name`` in eval mode (float32)."""
    make_config, default_class, _ = TINY[name]
    torch.manual_seed(seed)
    model = getattr(transformers, class_name or default_class)(make_config())
    return model.eval()


def tiny_inputs(name: str, batch: int = 2, seq: int = 12, seed: int = 1) -> dict:
    """Model inputs; text models get a right-padded second row (3 pads) and its position ids."""
    gen = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)}
    ids = torch.randint(2, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[1, seq - 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def hidden(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


@pytest.fixture
def tiny():
    """The helpers above, as a fixture (tests import nothing from this file)."""
    return type("Tiny", (), {"model": staticmethod(tiny_model), "inputs": staticmethod(tiny_inputs),
                             "hidden": staticmethod(hidden), "TINY": TINY, "TEXT": TEXT, "CAUSAL": CAUSAL,
                             "HYBRID": HYBRID})
