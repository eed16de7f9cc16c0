"""Remote code: a saved efficient checkpoint loads in a process where hf_efficient cannot be imported."""

from __future__ import annotations

import json
import re

import torch
from safetensors.torch import load_file, save_file

from hf_efficient.integrations import patch_model

CHILD = """
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    report = {}
    for job in json.loads(sys.argv[1]):
        inputs = load_file(job["inputs"])
        results, names = {}, {}
        for i, head in enumerate(job["heads"]):
            model = getattr(transformers, head).from_pretrained(job["folder"], trust_remote_code=True).eval()
            names[head] = type(model).__name__
            assert "hf_efficient" not in sys.modules
            if i == 0:
                with torch.no_grad():
                    out = model(**inputs)
                results["out"] = (out.logits if hasattr(out, "logits") else out.last_hidden_state).contiguous()
                impl = model.config._attn_implementation
                results["implementation"] = torch.tensor([impl.startswith("hf_efficient_")])
                if head == "AutoModelForCausalLM":  # generate() decodes from the shipped recurrent cache
                    ids = inputs["input_ids"][:1, :6]
                    out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
                    plain = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
                    results["generate_equal"] = torch.tensor([torch.equal(out.sequences, plain)])
                    names["cache"] = [type(out.cache).__name__] + sorted(
                        {type(x).__name__ + (f"[{x.kind}]" if hasattr(x, "kind") else "") for x in out.cache.layers})
        save_file(results, job["out"])
        report[job["folder"]] = names
    print(json.dumps(report))
"""


# (architecture, saved class, Auto heads loaded in the child (first one is compared), kind, params,
#  the cache classes generate() decodes with in the child)
CASES = [
    ("bert", "BertForSequenceClassification",
     ["AutoModelForSequenceClassification", "AutoModel", "AutoModelForMaskedLM"],
     "linear", {"feature_map": "hedgehog", "keep_softmax_first": 1}, None),
    ("llama", "LlamaForCausalLM", ["AutoModelForCausalLM", "AutoModel"], "linear", {"feature_map": "favor"},
     ["LinearAttentionCache", "RecurrentStateLayer[linear]"]),
    ("llama", "LlamaForCausalLM", ["AutoModelForCausalLM"], "window-linear", {"feature_map": "hedgehog", "window": 3},
     ["LinearAttentionCache", "RecurrentStateLayer[window-linear]"]),
    ("vit", "ViTForImageClassification", ["AutoModelForImageClassification"], "improved-clustered", {}, None),
    # hybrid and modern layouts: sliding layers kept (their own masks and cache layers) or replaced
    ("gemma3", "Gemma3ForCausalLM", ["AutoModelForCausalLM"], "linear", {},
     ["LinearAttentionCache", "DynamicSlidingWindowLayer", "RecurrentStateLayer[linear]"]),
    ("gemma2", "Gemma2ForCausalLM", ["AutoModelForCausalLM"], "linear", {"ignore_logit_softcap": True},
     ["LinearAttentionCache", "DynamicSlidingWindowLayer", "RecurrentStateLayer[linear]"]),
    ("qwen2_sliding", "Qwen2ForCausalLM", ["AutoModelForCausalLM"], "linear", {},
     ["LinearAttentionCache", "DynamicSlidingWindowLayer", "RecurrentStateLayer[linear]"]),
    ("mistral", "MistralForCausalLM", ["AutoModelForCausalLM"], "linear", {"sliding": "window-linear"},
     ["LinearAttentionCache", "RecurrentStateLayer[window-linear]"]),
    ("phi3", "Phi3ForCausalLM", ["AutoModelForCausalLM"], "linear", {"sliding": "window-linear"},
     ["LinearAttentionCache", "RecurrentStateLayer[window-linear]"]),
    ("gpt_neox", "GPTNeoXForCausalLM", ["AutoModelForCausalLM"], "linear", {}, ["DynamicCache", "DynamicLayer"]),
    ("modernbert", "ModernBertForMaskedLM", ["AutoModelForMaskedLM", "AutoModel"], "improved-clustered",
     {"clusters": 3, "topk": 4}, None),
]


def _save_checkpoint(arch, base_class, kind, params, tiny, folder):
    import hf_efficient

    if kind not in hf_efficient.attention_kind_names():
        kind, params = "linear", {}
    model = patch_model(tiny.model(arch, base_class), kind, **params)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hf_efficient_feature_map" in name:  # trained-looking feature maps must travel too
                p.add_(0.1 * torch.randn_like(p))
    inputs = tiny.inputs(arch)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(folder)
    return inputs, expected


def test_remote_code_without_the_package(tiny, tmp_path, run_without_package):
    jobs, expected = [], {}
    for index, (arch, base_class, heads, kind, params, _) in enumerate(CASES):
        folder = tmp_path / f"{arch}-{index}"
        inputs, expected[str(folder)] = _save_checkpoint(arch, base_class, kind, params, tiny, folder)
        save_file({k: v.contiguous() for k, v in inputs.items()}, tmp_path / f"{index}-inputs.safetensors")
        jobs.append({"folder": str(folder), "inputs": str(tmp_path / f"{index}-inputs.safetensors"),
                     "out": str(tmp_path / f"{index}-out.safetensors"), "heads": heads})

        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert {"AutoConfig", "AutoModel"} <= set(auto_map)
        if arch in ("bert", "llama"):
            assert {"AutoModelForSequenceClassification", "AutoModelForCausalLM"} <= set(auto_map)
        if arch == "bert":
            assert {"AutoModelForMaskedLM", "AutoModelForTokenClassification"} <= set(auto_map)
        for path in folder.iterdir():
            assert path.suffix in (".safetensors", ".json", ".py"), path.name
            if path.suffix == ".py":  # self-contained: only relative imports of siblings
                text = path.read_text()
                assert not re.search(r"^\s*(from|import)\s+hf_efficient", text, flags=re.MULTILINE), path.name
                assert not re.search(r"^\s*from\s+\.\.", text, flags=re.MULTILINE), path.name

    report = run_without_package(CHILD, jobs)
    for (arch, base_class, heads, kind, _, cache), job in zip(CASES, jobs, strict=True):
        result = load_file(job["out"])
        assert bool(result["implementation"]), arch
        names = report[job["folder"]]
        if "AutoModelForCausalLM" in heads:
            assert bool(result["generate_equal"]), (arch, kind)
            assert names.pop("cache") == cache, arch
        # the parent may run a compiled kernel where the child runs the PyTorch path: float32 rounding only
        torch.testing.assert_close(result["out"], expected[job["folder"]], atol=2e-5, rtol=1e-4)
        assert names[heads[0]] == f"Efficient{base_class}"
        assert all(name.startswith("Efficient") for name in names.values())
