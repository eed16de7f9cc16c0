"""Misuse of the command line: every cell exits with argparse's code 2 and a message naming the bad
argument before any work starts, or does the right thing to the user's files.

The output-folder cells run ``convert`` on a tiny random BERT with the evaluation functions replaced
by stubs, so they check what is written where (and what is left alone) in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hf_efficient import cli
from hf_efficient.assets import require_asset
from hf_efficient.cli import EXIT_USAGE, build_parser, main


def exit_code_and_err(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets past argument checking."""
    def refuse(args):
        raise AssertionError(f"{args.command} started work despite a bad argument")
    for name in ("run_convert", "run_eval", "run_generate", "run_push"):
        monkeypatch.setattr(cli, name, refuse)


@pytest.mark.parametrize("argv, option", [
    (["convert", "--test-reviews", "0"], "--test-reviews"),
    (["convert", "--train-reviews", "-3"], "--train-reviews"),
    (["convert", "--windows", "0"], "--windows"),
    (["convert", "--threads", "0"], "--threads"),
    (["convert", "--repeats", "0"], "--repeats"),
    (["convert", "--length", "0"], "--length"),
    (["convert", "--long-lengths", "128", "0"], "--long-lengths"),
    (["eval", "--lengths", "0"], "--lengths"),
    (["eval", "--repeats", "0"], "--repeats"),
    (["eval", "--threads", "two"], "--threads"),
    (["generate", "m", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_counts_below_one_are_refused_at_parse_time(argv, option, capsys, no_work):
    code, err = exit_code_and_err(argv, capsys)
    assert code == EXIT_USAGE
    assert f"argument {option}" in err and "positive integer" in err


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "hot"])
def test_temperature_must_be_a_finite_non_negative_number(value, capsys, no_work):
    code, err = exit_code_and_err(["generate", "m", "--prompt", "x", "--temperature", value], capsys)
    assert code == EXIT_USAGE and "argument --temperature" in err and "finite number >= 0" in err


def test_bench_unknown_kind_lists_the_accepted_ones(capsys):
    code, err = exit_code_and_err(["bench", "--kinds", "linear", "foo"], capsys)
    assert code == EXIT_USAGE
    assert "invalid choice: 'foo'" in err and "improved-clustered" in err and "window-linear" in err


@pytest.mark.parametrize("argv, option", [
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--lengths", "512", "0"], "--lengths"),
    (["bench", "generate", "--steps", "0"], "--steps"),
    (["bench", "generate", "--threads", "0"], "--threads"),
    (["bench", "generate", "--window", "-1"], "--window"),
])
def test_bench_counts_are_refused_at_parse_time(argv, option, capsys):
    code, err = exit_code_and_err(argv, capsys)
    assert code == EXIT_USAGE and f"argument {option}" in err


def test_bench_generate_width_must_split_into_heads(capsys):
    code, err = exit_code_and_err(["bench", "generate", "--width", "30", "--heads", "4"], capsys)
    assert code == EXIT_USAGE and "--width (30) must be a multiple of --heads (4)" in err


def test_kind_values_take_the_annotated_types():
    parser = build_parser("convert")
    args = parser.parse_args(["convert", "--attention", "linear", "--eps", "1", "--chunk-size", "32"])
    cli._check_args(args)
    assert args.kind_params == {"eps": 1.0, "chunk_size": 32}
    assert type(args.kind_params["eps"]) is float
    args = parser.parse_args(["convert", "--attention", "clustered", "--seed", "none", "--clusters", "7"])
    cli._check_args(args)
    assert args.kind_params == {"seed": None, "clusters": 7}


@pytest.mark.parametrize("argv, message", [
    (["convert", "--clusters", "2.5"], "argument --clusters: expected an integer, got '2.5'"),
    (["convert", "--seed", "x"], "argument --seed: expected an integer or none, got 'x'"),
    (["convert", "--clusters", "0"], "clusters must be >= 1, got 0"),
    (["eval", "--sweep", "clusters=4,x"], "--sweep clusters: expected an integer, got 'x'"),
    (["eval", "--sweep", "clusters=4,0"], "clusters must be >= 1, got 0"),
    (["eval", "--attention", "linear", "--sweep", "topk=4"], "'topk' is not a parameter of 'linear'"),
    (["generate", "m", "--prompt", "x", "--clusters", "4"], "--clusters given without --attention"),
])
def test_bad_kind_values_are_refused_before_work(argv, message, capsys, no_work):
    code, err = exit_code_and_err(argv, capsys)
    assert code == EXIT_USAGE and message in err


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom hf_efficient.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'hf_efficient.attention') if m in sys.modules)\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "convert" in out.stdout and "bench" in out.stdout


# --------------------------------------------------------------------------- model folders
@pytest.mark.parametrize("files", [[], ["config.json"], ["config.json", "model.safetensors"]])
def test_a_folder_that_is_not_a_model_is_named_as_such(tmp_path, files, capsys, no_work):
    folder = tmp_path / "m"
    folder.mkdir()
    for name in files:
        (folder / name).write_text("{}")
    for argv in (["convert", str(folder), "--out", str(tmp_path / "o")], ["eval", str(folder)],
                 ["generate", str(folder), "--prompt", "x"]):
        code, err = exit_code_and_err(argv, capsys)
        assert code == EXIT_USAGE
        assert f"{folder} is not a Hugging Face model folder" in err
        assert "sentencepiece or tiktoken" not in err
        if not files:
            assert "config.json" in err
        assert "tokenizer files" in err  # none of these folders has a tokenizer
    assert not (tmp_path / "o").exists()


def test_a_file_given_as_model_is_refused(tmp_path, capsys, no_work):
    (tmp_path / "model.bin").write_bytes(b"")
    code, err = exit_code_and_err(["convert", str(tmp_path / "model.bin")], capsys)
    assert code == EXIT_USAGE and "is a file, not a folder" in err


# --------------------------------------------------------------------------- output folders
def test_out_pointing_at_a_file_is_refused_before_any_work(tmp_path, capsys, no_work):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code, err = exit_code_and_err(["convert", "--out", str(target)], capsys)
    assert code == EXIT_USAGE and f"--out {target} is a file" in err
    assert target.read_text() == "mine"
    code, err = exit_code_and_err(["convert", "--out", str(target / "sub")], capsys)
    assert code == EXIT_USAGE and "is a file, so the folder cannot be created" in err


def test_eval_out_must_be_a_new_file_or_an_earlier_result(tmp_path, capsys, no_work):
    code, err = exit_code_and_err(["eval", "--out", str(tmp_path)], capsys)
    assert code == EXIT_USAGE and "is a folder; give a JSON file path" in err
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": 1}')
    code, err = exit_code_and_err(["eval", "--out", str(mine)], capsys)
    assert code == EXIT_USAGE and "is not an earlier eval result" in err and "--overwrite" in err
    assert mine.read_text() == '{"mine": 1}'


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random BERT folder with the MiniLM tokenizer (a real vocabulary)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hf_efficient.assets import minilm_path

    require_asset("minilm")
    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def stub_evaluation(monkeypatch):
    """Replace the evaluation (minutes on real data) by fixed numbers; the PNG by a marker file."""
    from hf_efficient import evaluation

    monkeypatch.setattr(evaluation, "hamlet_windows", lambda tokenizer, length, count: torch.zeros(count, 8).long())
    monkeypatch.setattr(evaluation, "hidden_agreement", lambda *a, **k: {"token_cosine": 0.9, "pooled_cosine": 0.95})
    monkeypatch.setattr(evaluation, "long_context_accuracy", lambda *a, **k: {
        "accuracy_original": 0.8, "accuracy_patched": 0.75, "accuracy_drop_points": 5.0, "majority_class": 0.58,
        "train_reviews": 10, "test_reviews": 10, "documents": 2, "length": 32})
    monkeypatch.setattr(evaluation, "model_speed", lambda *a, **k: {"speedup": 1.0})
    monkeypatch.setattr(evaluation, "attention_speed", lambda kind, params, **k: {"length": k["length"],
                                                                                  "speedup": 1.0})
    monkeypatch.setattr(cli, "_plot_convert", lambda result, path: path.write_bytes(b"png"))


def convert(model, out, *extra) -> int:
    return main(["convert", str(model), "--attention", "linear", "--length", "32", "--json", "--out", str(out),
                 *extra])


def hidden_leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_foreign_non_empty_folder_is_refused_and_left_alone(tiny_model, tmp_path, stub_evaluation, capsys):
    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("my own readme")
    (out / "config.json").write_text('{"mine": true}')
    code, err = exit_code_and_err(["convert", str(tiny_model), "--out", str(out)], capsys)
    assert code == EXIT_USAGE and "non-empty folder that hf-efficient convert did not write" in err
    assert "README.md" in err and "--overwrite" in err
    assert (out / "README.md").read_text() == "my own readme"
    assert (out / "config.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json"]


def test_overwrite_replaces_the_folder_wholesale(tiny_model, tmp_path, stub_evaluation, capsys):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text("my own readme")
    assert convert(tiny_model, out, "--overwrite") == 0
    files = {p.name for p in out.iterdir()}
    assert "notes.txt" not in files and {"config.json", "model.safetensors", "hf_efficient_results.json"} <= files
    assert (out / "README.md").read_text() != "my own readme"
    report = json.loads((out / "hf_efficient_results.json").read_text())
    assert sorted(report["files"]) == sorted(files)
    assert hidden_leftovers(tmp_path) == []


def test_rerun_replaces_its_own_output_and_drops_the_stale_png(tiny_model, tmp_path, stub_evaluation, capsys):
    out = tmp_path / "converted"
    assert convert(tiny_model, out) == 0
    assert (out / "hf_efficient_results.png").exists()
    first = json.loads((out / "hf_efficient_results.json").read_text())
    assert first["params"] == {}
    # a rerun into our own output needs no --overwrite; its files replace the old ones, none is left over
    assert convert(tiny_model, out, "--no-plot", "--feature-map", "relu") == 0
    assert not (out / "hf_efficient_results.png").exists()
    second = json.loads((out / "hf_efficient_results.json").read_text())
    assert second["params"] == {"feature_map": "relu"}
    layers = json.loads((out / "config.json").read_text())["hf_efficient"]["layers"]
    assert [layer["params"]["feature_map"] for layer in layers] == ["relu"]
    assert sorted(p.name for p in out.iterdir()) == sorted(second["files"])
    assert hidden_leftovers(tmp_path) == []


def test_our_output_with_a_user_file_added_is_not_replaced_silently(tiny_model, tmp_path, stub_evaluation, capsys):
    out = tmp_path / "converted"
    assert convert(tiny_model, out) == 0
    (out / "my_notes.md").write_text("keep me")
    code, err = exit_code_and_err(["convert", str(tiny_model), "--out", str(out)], capsys)
    assert code == EXIT_USAGE and "my_notes.md" in err
    assert (out / "my_notes.md").read_text() == "keep me"


def test_interrupted_rerun_leaves_the_previous_output_intact(tiny_model, tmp_path, stub_evaluation, monkeypatch,
                                                             capsys):
    out = tmp_path / "converted"
    assert convert(tiny_model, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(result, path):  # the new weights and card are already written by now
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_plot_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_model, out, "--feature-map", "relu")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert hidden_leftovers(tmp_path) == []


def test_out_given_as_dot_or_root_is_resolved_before_checking(tmp_path, monkeypatch, capsys, no_work):
    (tmp_path / "mine.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    code, err = exit_code_and_err(["convert", "--out", "."], capsys)
    assert code == EXIT_USAGE and "did not write (it holds mine.txt)" in err
    code, err = exit_code_and_err(["convert", "--out", "/"], capsys)
    assert code == EXIT_USAGE and "file-system root" in err
