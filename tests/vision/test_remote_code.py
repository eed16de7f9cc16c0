"""Remote code: a saved attention-sampling checkpoint loads where hf_efficient cannot be imported."""

from __future__ import annotations

import json
import re

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hf_efficient.vision import (
    AttentionSamplingConfig,
    AttentionSamplingForImageClassification,
    AttentionSamplingImageProcessor,
)

CHILD = """
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    report = {}
    for job in json.loads(sys.argv[1]):
        model = transformers.AutoModelForImageClassification.from_pretrained(
            job["folder"], trust_remote_code=True
        ).eval()
        processor = transformers.AutoImageProcessor.from_pretrained(job["folder"], trust_remote_code=True)
        image = load_file(job["image"])["image"]
        inputs = processor(image)
        torch.manual_seed(job["seed"])
        with torch.no_grad():
            out = model(**inputs)
        save_file({"logits": out.logits.contiguous(), "low_res": inputs["low_res_pixel_values"].contiguous()},
                  job["out"])
        assert "hf_efficient" not in sys.modules
        report[job["folder"]] = [type(model).__name__, type(processor).__name__, type(model).__module__]
    print(json.dumps(report))
"""

TINY = dict(num_channels=1, patch_size=8, num_patches=3, attention_channels=[4], feature_channels=[4, 8], num_labels=3)


def test_remote_code_without_the_package(tmp_path, run_without_package):
    configs = {
        "one_level": AttentionSamplingConfig(**TINY),
        "multiscale": AttentionSamplingConfig(**TINY, region_size=16, num_regions=2, sampling="with_replacement"),
    }
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (48, 56), dtype=np.uint8))
    save_file({"image": image}, tmp_path / "image.safetensors")
    jobs, expected = [], {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = AttentionSamplingForImageClassification(config).eval()
        processor = AttentionSamplingImageProcessor(low_res_scale=0.25)
        folder = tmp_path / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        torch.manual_seed(11)
        with torch.no_grad():
            expected[name] = model(**processor(image)).logits
        jobs.append({"folder": str(folder), "image": str(tmp_path / "image.safetensors"), "seed": 11,
                     "out": str(tmp_path / f"{name}-out.safetensors")})

        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModelForImageClassification"].endswith(".AttentionSamplingForImageClassification")
        assert "AutoImageProcessor" in json.loads((folder / "preprocessor_config.json").read_text())["auto_map"]
        for path in folder.iterdir():
            assert path.suffix in (".safetensors", ".json", ".py"), path.name
            if path.suffix == ".py":  # self-contained: only relative imports of siblings
                text = path.read_text()
                assert not re.search(r"^\s*(from|import)\s+hf_efficient", text, flags=re.MULTILINE), path.name
                assert not re.search(r"^\s*from\s+\.\.", text, flags=re.MULTILINE), path.name

    report = run_without_package(CHILD, jobs)
    for name, job in zip(configs, jobs, strict=True):
        model_name, processor_name, module = report[job["folder"]]
        assert model_name == "AttentionSamplingForImageClassification"
        assert processor_name == "AttentionSamplingImageProcessor"
        assert module.startswith("transformers_modules.")  # the copied code, not a local class
        # same weights, same processor, same seed: the same draws and bit-identical logits
        assert torch.equal(load_file(job["out"])["logits"], expected[name]), name
