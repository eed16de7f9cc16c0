"""``import hf_efficient`` is cheap, and the Auto classes know the package whatever the import order."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (offline) and return the JSON it prints last."""
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1",
                                                                             "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_loads_neither_torch_nor_the_model_stack():
    out = _run("""
        import json, sys
        import hf_efficient
        print(json.dumps({m: m in sys.modules for m in ("torch", "transformers", "transformers.modeling_utils",
                                                         "datasets", "matplotlib", "PIL")}))
    """)
    assert not any(out.values()), out


@pytest.mark.parametrize("order", [
    "import hf_efficient\nfrom transformers import AutoModel, AutoConfig",
    "from transformers import AutoModel, AutoConfig\nimport hf_efficient",
    # a modeling module that imports the Auto classes halfway through its own import
    "import hf_efficient\nfrom transformers import Gemma3ForCausalLM\nfrom transformers import AutoModel, AutoConfig",
    # a base config first: its class decorator loads the Auto modules before the class exists
    "import hf_efficient\nfrom transformers import LlamaConfig\nfrom transformers import AutoModel, AutoConfig",
    "import torch\nimport hf_efficient\nfrom transformers import BertConfig, BertModel\n"
    "from transformers import AutoModel, AutoConfig",
])
def test_auto_classes_build_the_package_classes_whatever_the_import_order(order):
    out = _run(order + "\n" + textwrap.dedent("""
        import json
        import torch
        from transformers import AutoModelForCausalLM, BertConfig
        from hf_efficient import LinearLMConfig, efficient_config

        lm = AutoModelForCausalLM.from_config(LinearLMConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                             num_attention_heads=2))
        config = AutoConfig.for_model("efficient-bert", hidden_size=16)
        bert = AutoModel.from_config(efficient_config(BertConfig(hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32), "linear"))
        print(json.dumps({"lm": type(lm).__module__ + "." + type(lm).__name__,
                          "config": type(config).__name__,
                          "bert": type(bert).__module__ + "." + type(bert).__name__}))
    """))
    assert out == {"lm": "hf_efficient.models.linear_lm.modeling_linear_lm.LinearLMForCausalLM",
                   "config": "EfficientBertConfig",
                   "bert": "hf_efficient.integrations.architectures.EfficientBertModel"}


def test_saved_checkpoint_loads_patched_after_a_bare_import(tmp_path):
    """The deferred Auto entry resolves to the real class: the reloaded model gives the saved model's outputs."""
    _run(f"""
        import torch
        from safetensors.torch import save_file
        from transformers import BertConfig, BertModel
        import hf_efficient

        torch.manual_seed(0)
        model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=50)).eval()
        ids = torch.randint(0, 50, (2, 12))
        with torch.no_grad():
            softmax = model(ids).last_hidden_state
            hf_efficient.patch_model(model, "linear")
            patched = model(ids).last_hidden_state
        model.save_pretrained({str(tmp_path / "model")!r})
        save_file({{"ids": ids, "softmax": softmax, "patched": patched}}, {str(tmp_path / "outputs.safetensors")!r})
        print("{{}}")
    """)
    out = _run(f"""
        import json
        import torch
        from safetensors.torch import load_file
        import hf_efficient
        from transformers import AutoModel

        saved = load_file({str(tmp_path / "outputs.safetensors")!r})
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}).eval()
        with torch.no_grad():
            out = model(saved["ids"]).last_hidden_state
        print(json.dumps({{"class": type(model).__name__, "kind": model.config.hf_efficient["kind"],
                           "vs_patched": float((out - saved["patched"]).abs().max()),
                           "vs_softmax": float((out - saved["softmax"]).abs().max())}}))
    """)
    assert out["class"] == "EfficientBertModel" and out["kind"] == "linear"
    assert out["vs_patched"] < 1e-6 < 1e-5 < out["vs_softmax"]


def test_deferred_names_match_the_declared_classes():
    """Every name registered before its module loads is a class of that module, under the same Auto head."""
    import transformers.models.auto.modeling_auto as modeling_auto

    from hf_efficient.integrations import architectures
    from hf_efficient.integrations.export import auto_class_name
    from hf_efficient.registration import DeferredClass, _deferred_models

    entries = _deferred_models(modeling_auto)
    efficient = [e for e in entries if e[2].__name__.startswith("Efficient")]
    from hf_efficient.integrations.configurations import MODEL_CLASS_NAMES

    # only the package's own classes: other tests may add architectures (add_architecture) to ARCHITECTURES
    declared = [getattr(architectures, name) for names in MODEL_CLASS_NAMES.values() for name in names]
    assert sorted(d.__name__ for _, _, d in efficient) == sorted(
        cls.__name__ for cls in declared if auto_class_name(cls) is not None)
    for auto, config_class, deferred in entries:
        assert isinstance(deferred, DeferredClass)
        real = deferred.load()
        assert real.__name__ == deferred.__name__ and real.config_class is config_class
        if real.__name__.startswith("Efficient"):
            assert auto_class_name(real) == auto


def test_watched_base_config_modules_are_those_of_the_efficient_configs():
    from hf_efficient.integrations.configurations import CONFIG_CLASSES
    from hf_efficient.registration import BASE_CONFIG_MODULES

    bases = {c.hf_efficient_base_class.__module__ for c in CONFIG_CLASSES.values()}
    assert sorted(BASE_CONFIG_MODULES) == sorted(bases)
