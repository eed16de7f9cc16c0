"""Save/load round trips, efficient_config and the efficient Auto classes."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoConfig

from hf_efficient.integrations import efficient_config, is_patched, patch_model, unpatch_model

# (architecture, base class, Auto class) covering every Auto head the issue names
HEADS = [
    ("bert", "BertForSequenceClassification", "AutoModelForSequenceClassification"),
    ("bert", "BertForMaskedLM", "AutoModelForMaskedLM"),
    ("roberta", "RobertaForTokenClassification", "AutoModelForTokenClassification"),
    ("distilbert", "DistilBertModel", "AutoModel"),
    ("gpt2", "GPT2LMHeadModel", "AutoModelForCausalLM"),
    ("llama", "LlamaForCausalLM", "AutoModelForCausalLM"),
    ("qwen2", "Qwen2ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("vit", "ViTForImageClassification", "AutoModelForImageClassification"),
]


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize(("arch", "base_class", "auto_class"), HEADS)
def test_efficient_config_loads_pretrained_weights_like_patch_model(arch, base_class, auto_class, tiny, tmp_path):
    base = tiny.model(arch, base_class)
    if arch == "qwen2":
        base.config.pad_token_id = 0
    base.save_pretrained(tmp_path / "base")
    inputs = tiny.inputs(arch)
    params = {"feature_map": "relu"} if arch != "gpt2" else {}
    config = efficient_config(AutoConfig.from_pretrained(tmp_path / "base"), "linear", keep_softmax_last=1, **params)
    assert config.model_type == f"efficient-{arch}"
    assert type(AutoConfig.for_model(config.model_type)) is type(config)
    model = getattr(transformers, auto_class).from_pretrained(tmp_path / "base", config=config).eval()
    assert type(model).__name__ == f"Efficient{base_class}" and is_patched(model)
    reference = patch_model(getattr(transformers, base_class).from_pretrained(tmp_path / "base").eval(), "linear",
                            keep_softmax_last=1, **params)
    expected = _outputs(reference, inputs)
    assert torch.equal(_outputs(model, inputs), expected)
    # and it is really not the softmax model
    assert not torch.allclose(_outputs(unpatch_model(reference), inputs), expected, atol=1e-4)


@pytest.mark.parametrize(("arch", "base_class"), [("bert", "BertForSequenceClassification"),
                                                  ("llama", "LlamaForCausalLM"), ("vit", "ViTModel")])
def test_patched_model_save_load_round_trip(arch, base_class, tiny, tmp_path):
    model = patch_model(tiny.model(arch, base_class), "linear", softmax_layers=[0],
                        layer_params={1: {"feature_map": "hedgehog"}})
    with torch.no_grad():  # move the learnable feature map away from its initial values
        for name, p in model.named_parameters():
            if "hf_efficient_feature_map" in name:
                p.add_(0.1 * torch.randn_like(p))
    inputs = tiny.inputs(arch)
    expected = _outputs(model, inputs)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == f"efficient-{arch}"
    assert saved["hf_efficient"]["layers"][0] == {"kind": None, "params": None, "layer_type": "full_attention"}
    assert saved["hf_efficient"]["layers"][1]["params"]["feature_map"] == "hedgehog"
    auto = "AutoModel" if base_class.endswith("Model") else (
        "AutoModelForCausalLM" if "CausalLM" in base_class else "AutoModelForSequenceClassification")
    loaded = getattr(transformers, auto).from_pretrained(tmp_path / "saved").eval()
    assert type(loaded) is type(model)
    assert torch.equal(_outputs(loaded, inputs), expected)
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "saved").iterdir())
    # a model loaded as an efficient class unpatches to its base class, with softmax attention
    softmax = _outputs(unpatch_model(model), inputs)
    unpatch_model(loaded)
    assert type(loaded) is getattr(transformers, base_class) and loaded.config.model_type == arch
    assert torch.equal(_outputs(loaded, inputs), softmax)


def test_learnable_feature_maps_start_from_their_initial_values(tiny, tmp_path):
    """Missing feature-map weights (loading a base checkpoint) must get the map's own init, not garbage."""
    tiny.model("bert").save_pretrained(tmp_path / "base")
    config = efficient_config(AutoConfig.from_pretrained(tmp_path / "base"), "linear", feature_map="hedgehog")
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "base", config=config).eval()
    patched = patch_model(transformers.BertModel.from_pretrained(tmp_path / "base").eval(), "linear",
                          feature_map="hedgehog")
    inputs = tiny.inputs("bert")
    assert torch.equal(_outputs(loaded, inputs), _outputs(patched, inputs))


def test_efficient_config_round_trips_and_validates(tiny, tmp_path):
    config = efficient_config(tiny.model("gpt2").config, "linear", layers=[1], feature_map="favor")
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert type(again) is type(config) and again.hf_efficient == config.hf_efficient
    assert [layer["kind"] for layer in again.hf_efficient["layers"]] == [None, "linear"]
    # an efficient config of an efficient config keeps the same base architecture
    assert efficient_config(again, "linear").model_type == "efficient-gpt2"
    with pytest.raises(TypeError, match="transformers config"):
        efficient_config({"model_type": "bert"}, "linear")
    with pytest.raises(ValueError, match="unknown feature map"):
        efficient_config(config, "linear", feature_map="nope")


def test_auto_classes_are_registered_at_import():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for arch in ("bert", "roberta", "distilbert", "gpt2", "llama", "qwen2", "vit"):
        assert f"efficient-{arch}" in CONFIG_MAPPING
    config = AutoConfig.for_model("efficient-vit", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=37, image_size=16, patch_size=4,
                                  hf_efficient={"kind": "linear", "layers": [{"kind": "linear", "params": {}}]})
    model = transformers.AutoModelForImageClassification.from_config(config)
    assert type(model).__name__ == "EfficientViTForImageClassification"
    assert model.config._attn_implementation == "hf_efficient_linear"
