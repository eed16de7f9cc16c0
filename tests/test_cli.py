"""The hf-efficient command line: arguments, errors, and what convert writes."""

import json
import subprocess
import sys

import pytest
import torch

from hf_efficient.assets import require_asset
from hf_efficient.cli import EXIT_HUB, EXIT_USAGE, main


@pytest.mark.parametrize("command", ["convert", "eval", "generate", "push"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: hf-efficient" in capsys.readouterr().out


def test_unknown_kind_names_the_accepted_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--attention", "softmax2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'softmax2'" in err and "linear" in err


def test_parameter_of_another_kind_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--attention", "linear", "--topk", "8", "--out", "unused"])
    assert exit_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--topk is not a parameter of 'linear'" in err and "--feature-map" in err


def test_invalid_parameter_value_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--attention", "linear", "--feature-map", "nope", "--out", "unused"])
    assert exit_info.value.code == EXIT_USAGE
    assert "unknown feature map 'nope'" in capsys.readouterr().err


def test_missing_model_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    require_asset("minilm")
    require_asset("rotten_tomatoes")
    out = tmp_path_factory.mktemp("converted")
    args = ["convert", "--attention", "improved-clustered", "--clusters", "4", "--topk", "8", "--length", "64",
            "--windows", "2", "--train-reviews", "40", "--test-reviews", "20", "--long-lengths", "128",
            "--repeats", "1", "--no-plot", "--json", "--out", str(out)]
    assert main(args) == 0
    return out


def test_convert_writes_a_loadable_folder_that_matches_its_report(converted):
    from transformers import AutoModel, AutoTokenizer

    from hf_efficient.assets import minilm_path
    from hf_efficient.evaluation import hamlet_windows

    files = {p.name for p in converted.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "hf_efficient_results.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    report = json.loads((converted / "hf_efficient_results.json").read_text())
    config = json.loads((converted / "config.json").read_text())
    assert config["hf_efficient"]["kind"] == "improved-clustered"
    # recompute the reported agreement independently from the saved folder and the original model
    tokenizer = AutoTokenizer.from_pretrained(converted)
    ids = hamlet_windows(tokenizer, 64, 2)
    with torch.inference_mode():
        ref = AutoModel.from_pretrained(minilm_path())(input_ids=ids).last_hidden_state
        out = AutoModel.from_pretrained(converted)(input_ids=ids).last_hidden_state
    token_cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1).mean().item()
    assert abs(token_cos - report["agreement"]["token_cosine"]) < 1e-4
    assert token_cos < 0.99999  # 4 clusters / top-8 on 64 tokens is an approximation, not the original
    assert 0 <= report["long_context_task"]["accuracy_patched"] <= 1
    card = (converted / "README.md").read_text()
    assert "model-index" in card and "Measured against the original model" in card
    assert f"{report['agreement']['token_cosine']:.4f}" in card and "Citation" in card


def test_push_offline_reports_hub_error(converted, monkeypatch, capsys):
    import huggingface_hub

    class OfflineApi:
        def __init__(self, *a, **kw):
            pass

        def create_repo(self, **kw):
            raise ConnectionError("Hub unreachable")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    assert main(["push", str(converted), "--repo-id", "someone/minilm-clustered"]) == EXIT_HUB
    assert "could not upload to the Hugging Face Hub" in capsys.readouterr().err


def test_push_uploads_only_safe_files(converted, monkeypatch):
    import huggingface_hub

    uploaded = {}

    class RecordingApi:
        def __init__(self, *a, **kw):
            pass

        def create_repo(self, **kw):
            uploaded["repo"] = kw["repo_id"]

        def upload_folder(self, repo_id, folder_path, **kw):
            from pathlib import Path

            uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            uploaded["card"] = (Path(folder_path) / "README.md").read_text()
            return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    assert main(["push", str(converted), "--repo-id", "someone/minilm-clustered"]) == 0
    assert uploaded["repo"] == "someone/minilm-clustered"
    assert "model.safetensors" in uploaded["files"] and "config.json" in uploaded["files"]
    assert all(f.endswith((".safetensors", ".json", ".py", ".md", ".txt")) for f in uploaded["files"])
    assert "improved-clustered" in uploaded["card"]


def test_console_script_forwards_bench_options():
    from pathlib import Path

    script = Path(sys.executable).parent / "hf-efficient"
    assert script.exists(), "the hf-efficient console script is not installed"
    out = subprocess.run([str(script), "bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--kinds" in out.stdout
    out = subprocess.run([str(script), "bench", "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "context" in out.stdout


def test_generate_with_recurrent_state_equals_uncached(tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_efficient import patch_model
    from hf_efficient.assets import minilm_path

    require_asset("minilm")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompt = "to be or not to be"
    assert main(["generate", str(tmp_path), "--prompt", prompt, "--attention", "linear", "--max-new-tokens", "12",
                 "--json"]) == 0
    completion = json.loads(capsys.readouterr().out)["completion"]
    # reference: the same patched model, greedy, recomputing the whole prefix at every step
    model = patch_model(LlamaForCausalLM.from_pretrained(tmp_path).eval(), "linear")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        for _ in range(12):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = tokenizer.decode(ids[0, -12:], skip_special_tokens=True)
    assert completion == expected
