"""push_to_hub and model cards, against a local stand-in for the Hub API (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig

from hf_efficient.integrations import efficient_config, patch_model, push_to_hub, render_model_card


class FakeHub:
    """Records what would be uploaded: the repo, and every file of the uploaded folder (read at upload)."""

    def __init__(self):
        self.repos, self.files = [], {}

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        self.repos.append((repo_id, private, exist_ok))
        return f"https://hub.invalid/{repo_id}"

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                self.files[str(path.relative_to(folder_path))] = path.read_bytes()
        return f"https://hub.invalid/{repo_id}/commit/1"


RESULTS = [{"task": "text-classification", "dataset": "rotten_tomatoes", "metric": "accuracy", "value": 0.771,
            "split": "test"}]


def _front_matter(card: str) -> dict:
    _, header, _ = card.split("---\n", 2)
    return yaml.safe_load(header)


def test_push_patched_model(tiny, tmp_path):
    model = patch_model(tiny.model("bert", "BertForSequenceClassification"), "linear", keep_softmax_first=1)
    hub = FakeHub()
    url = push_to_hub(model, "someone/tiny-efficient-bert", results=RESULTS, base_model="someone/tiny-bert", api=hub)
    assert url.endswith("/commit/1") and hub.repos == [("someone/tiny-efficient-bert", None, True)]
    names = set(hub.files)
    assert {"config.json", "model.safetensors", "README.md", "modeling_hf_efficient.py",
            "configuration_hf_efficient.py"} <= names
    assert all(Path(n).suffix in (".json", ".safetensors", ".py", ".md") for n in names), names
    config = json.loads(hub.files["config.json"])
    assert config["model_type"] == "efficient-bert" and "AutoModelForSequenceClassification" in config["auto_map"]
    (tmp_path / "w.safetensors").write_bytes(hub.files["model.safetensors"])
    weights = load_file(tmp_path / "w.safetensors")
    assert set(weights) == set(model.state_dict())
    card = hub.files["README.md"].decode()
    meta = _front_matter(card)
    assert meta["base_model"] == "someone/tiny-bert" and "hf_efficient" in meta["tags"]
    result = meta["model-index"][0]["results"][0]
    assert meta["model-index"][0]["name"] == "tiny-efficient-bert"
    assert result["task"]["type"] == "text-classification"
    assert result["metrics"][0] == {"type": "accuracy", "name": "accuracy", "value": 0.771}
    assert "| 1 | `linear`" in card and "| 0 | softmax" in card


def test_push_efficient_config_through_hfapi(monkeypatch, tiny):
    """The default path builds huggingface_hub.HfApi: replace its upload methods, not the network."""
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, **kw: hub.create_repo(**kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: hub.upload_folder(**kw))
    config = efficient_config(tiny.model("gpt2").config, "linear", feature_map="relu")
    config.push_to_hub("someone/efficient-gpt2-config")  # the method of the efficient config class
    assert set(hub.files) == {"config.json", "README.md"}
    saved = json.loads(hub.files["config.json"])
    assert saved["model_type"] == "efficient-gpt2"
    assert saved["hf_efficient"]["layers"][0]["params"]["feature_map"] == "relu"
    assert "model-index" not in _front_matter(hub.files["README.md"].decode())
    assert AutoConfig.for_model("efficient-gpt2").model_type == "efficient-gpt2"


def test_model_push_to_hub_method_uses_the_card(tiny, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, **kw: hub.create_repo(**kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: hub.upload_folder(**kw))
    model = patch_model(tiny.model("vit", "ViTForImageClassification"), "linear")
    model.push_to_hub("someone/vit", results=RESULTS)
    assert "efficient-attention" in _front_matter(hub.files["README.md"].decode())["tags"]


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="patch_model"):
        push_to_hub(tiny.model("bert"), "someone/plain", api=FakeHub())
    model = patch_model(tiny.model("bert"), "linear")
    with pytest.raises(ValueError, match="missing"):
        render_model_card(model, model_name="x", results=[{"task": "t", "value": 1.0}])


def test_card_metadata_through_huggingface_hub(tiny):
    """The card's metadata is huggingface_hub's ModelCardData: pipeline tag of the head, license, dataset ids."""
    model = patch_model(tiny.model("bert", "BertForSequenceClassification"), "linear")
    card = render_model_card(model, model_name="m", base_model="someone/base", results=RESULTS, license="apache-2.0",
                             datasets=["rotten_tomatoes"])
    data = huggingface_hub.ModelCard(card).data  # parsed and validated by the hub library
    assert data.pipeline_tag == "text-classification" and data.license == "apache-2.0"
    assert data.datasets == ["rotten_tomatoes"] and data.library_name == "transformers"
    assert data.eval_results[0].metric_value == 0.771 and data.eval_results[0].dataset_split == "test"
    heads = {("llama", "LlamaForCausalLM"): "text-generation", ("vit", "ViTModel"): "image-feature-extraction",
             ("bert", "BertModel"): "feature-extraction", ("bert", "BertForMaskedLM"): "fill-mask"}
    for (arch, cls), tag in heads.items():
        card = render_model_card(patch_model(tiny.model(arch, cls), "linear"), model_name="m")
        assert huggingface_hub.ModelCard(card).data.pipeline_tag == tag, cls
    with pytest.raises(FileNotFoundError, match="no-such-template"):
        render_model_card(model, model_name="m", template="no-such-template.md.j2")


def test_hybrid_card_names_the_kept_layers(tiny):
    model = patch_model(tiny.model("gemma3", "Gemma3ForCausalLM"), "linear")
    card = render_model_card(model, model_name="tiny-gemma3")
    assert "| 5 | `linear`" in card
    assert "| 0, 1, 2, 3, 4 | softmax, as in the original model (sliding_attention)" in card
