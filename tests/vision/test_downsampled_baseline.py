"""The CNN-on-the-downsampled-image baseline of ``scripts/train_downsampled_cnn.py``: its views are the processor's
low-resolution views, its test error counts exactly the wrong predictions, and its CLI refuses a bad scale."""

from __future__ import annotations

import json

import pytest
import torch

from hf_efficient import AttentionSamplingImageProcessor
from hf_efficient.vision import make_megamnist


@pytest.fixture(scope="module")
def baseline(load_file_module):
    return load_file_module("hf_efficient_train_downsampled_cnn", "scripts/train_downsampled_cnn.py")


def test_views_are_the_processors_low_resolution_views(baseline):
    rows = make_megamnist(5, canvas_size=256, split="test", seed=3)
    processor = AttentionSamplingImageProcessor(low_res_scale=0.25)
    data = baseline.views(rows, processor, batch=2)  # batches of 2: the last one is short
    assert len(data) == 5
    for i in range(5):
        want = processor([rows[i]["image"]])["low_res_pixel_values"][0]
        torch.testing.assert_close(data[i]["pixel_values"], want)
        assert int(data[i]["labels"]) == int(rows[i]["label"])


class _Fixed(torch.nn.Module):
    """Predicts ``labels + shift`` (mod 10) for the rows whose first pixel is positive, and ``labels`` otherwise."""

    def __init__(self, labels: torch.Tensor, shift: int) -> None:
        super().__init__()
        self.labels, self.shift, self.seen = labels, shift, 0

    def forward(self, pixel_values: torch.Tensor) -> dict:
        n = pixel_values.shape[0]
        labels = self.labels[self.seen : self.seen + n]
        self.seen += n
        wrong = pixel_values[:, 0, 0, 0] > 0
        return {"logits": torch.nn.functional.one_hot((labels + self.shift * wrong) % 10, 10).float()}


def test_test_error_counts_the_wrong_predictions(baseline):
    from datasets import Dataset

    pixels = torch.randn(70, 1, 4, 4)
    labels = torch.randint(0, 10, (70,))
    data = Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.tolist()}).with_format("torch")
    expected = float((pixels[:, 0, 0, 0] > 0).float().mean())
    assert baseline.test_error(_Fixed(labels, 3), data, batch=16) == pytest.approx(expected)
    assert baseline.test_error(_Fixed(labels, 0), data, batch=16) == 0.0


def test_the_model_gives_logits_and_the_cross_entropy(baseline):
    torch.manual_seed(0)
    model = baseline.DownsampledCNN()
    x, y = torch.randn(3, 1, 40, 36), torch.tensor([1, 7, 9])
    out = model(x, labels=y)
    assert out["logits"].shape == (3, 10)
    torch.testing.assert_close(out["loss"], torch.nn.functional.cross_entropy(out["logits"], y))


def test_quick_run_writes_its_result_and_a_bad_scale_is_refused(baseline, tmp_path, capsys):
    out = tmp_path / "cnn.json"
    assert baseline.main(["--quick", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["view"] == [31, 31] and len(result["runs"]) == 1  # 256 * 0.12 = 30.7 -> 31
    assert 0.0 <= result["mean_test_error"] <= 1.0
    for bad in (["--quick", "--scale", "0"], ["--quick", "--scale", "1.5"], []):
        with pytest.raises(SystemExit) as stop:
            baseline.main(bad)
        assert stop.value.code == 2
    assert "--scale must be in (0, 1]" in capsys.readouterr().err
