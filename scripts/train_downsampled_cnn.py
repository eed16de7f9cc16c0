"""The baseline attention sampling is compared with: a CNN over the downsampled image alone.

    python scripts/train_downsampled_cnn.py --data-dir /tmp/megamnist-1500          # 3 seeds, the view ATS sees
    python scripts/train_downsampled_cnn.py --data-dir /tmp/megamnist-1500 --scale 0.25 --seeds 0
    python scripts/train_downsampled_cnn.py --quick                                    # seconds: tiny data

megaNIST at 1500x1500 (``write_megamnist`` defaults, from ``--data-dir``; written there on first use) is
reduced once to the low-resolution view of ``AttentionSamplingImageProcessor(low_res_scale=--scale)``: with
the default 0.12 the same 180x180 view the attention network of ``train_attention_sampling.py --paper`` sees,
where a 28x28 digit covers about 3x3 pixels. A small CNN (four 3x3 convolutions with ReLU and max pooling,
global max pooling, a linear classifier) is trained on it with the stock ``Trainer`` (AdamW, cosine decay,
batch 32) and its test error reported per seed on the 1,000 test images. Writes
``results/train_downsampled_cnn.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_efficient import AttentionSamplingImageProcessor
from hf_efficient.vision import load_megamnist, make_megamnist, write_megamnist


class DownsampledCNN(nn.Module):
    """Four 3x3 convolutions (ReLU; max pooling after the first three), global max pooling, a linear layer:
    ``pixel_values`` ``(batch, 1, h, w)`` to logits ``(batch, classes)``; the loss when ``labels`` are given."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 64), classes: int = 10) -> None:
        super().__init__()
        layers, previous = [], 1
        for i, width in enumerate(channels):
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.ReLU()]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            previous = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(previous, classes)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.classifier(self.features(pixel_values).amax(dim=(2, 3)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def views(rows, processor: AttentionSamplingImageProcessor, batch: int = 16) -> Dataset:
    """The low-resolution views ``(n, 1, h, w)`` float32 and labels of ``rows``, as a torch-formatted Dataset."""
    pixels, labels = [], []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        pixels.append(processor(list(chunk["image"]))["low_res_pixel_values"].numpy())
        labels += [int(label) for label in chunk["label"]]
    data = Dataset.from_dict({"pixel_values": np.concatenate(pixels), "labels": labels})
    return data.with_format("torch")


def test_error(model: nn.Module, data: Dataset, batch: int = 64) -> float:
    model.eval()
    wrong = 0
    with torch.no_grad():
        for start in range(0, len(data), batch):
            rows = data[start : start + batch]
            wrong += int((model(rows["pixel_values"])["logits"].argmax(-1) != rows["labels"]).sum())
    return wrong / len(data)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="megaNIST 1500x1500 (written if absent)")
    parser.add_argument("--quick", action="store_true", help="tiny in-memory data, one seed, one epoch")
    parser.add_argument("--scale", type=float, default=0.12, help="low-resolution view scale (ATS --paper: 0.12)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("results/train_downsampled_cnn.json"))
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    if not args.quick and args.data_dir is None:
        parser.error("--data-dir is required (a folder of write_megamnist output, or a new one to write it to)")
    torch.set_num_threads(args.threads)
    processor = AttentionSamplingImageProcessor(low_res_scale=args.scale)
    cpu0 = time.process_time()
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 1
        train_rows = make_megamnist(64, canvas_size=256, split="train", seed=0)
        test_rows = make_megamnist(32, canvas_size=256, split="test", seed=1)
    else:
        if not (args.data_dir / "megamnist.json").exists():
            write_megamnist(args.data_dir)
        train_rows, test_rows = load_megamnist(args.data_dir, "train"), load_megamnist(args.data_dir, "test")
    train, test = views(train_rows, processor), views(test_rows, processor)
    prepare_seconds = time.process_time() - cpu0
    print(f"views {tuple(train[0]['pixel_values'].shape)}: {len(train)} train, {len(test)} test "
          f"({prepare_seconds:.0f} CPU-s)", flush=True)
    runs = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = DownsampledCNN()
        training = TrainingArguments(
            output_dir=str(args.output.parent / f"downsampled_cnn_seed{seed}"),
            per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs, learning_rate=args.lr,
            lr_scheduler_type="cosine", warmup_steps=50,
            logging_steps=100, save_strategy="no", report_to=[], seed=seed, use_cpu=True, dataloader_num_workers=0,
            disable_tqdm=True)
        cpu = time.process_time()
        Trainer(model=model, args=training, train_dataset=train).train()
        seconds = time.process_time() - cpu
        error = test_error(model, test)
        runs.append({"seed": seed, "test_error": error, "train_cpu_seconds": seconds})
        print(f"seed {seed}: test error {error:.3f} after {seconds:.0f} CPU-s of training", flush=True)
    result = {"scale": args.scale, "view": list(train[0]["pixel_values"].shape[1:]), "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "train_size": len(train), "test_size": len(test),
              "prepare_cpu_seconds": prepare_seconds, "runs": runs,
              "mean_test_error": statistics.mean(r["test_error"] for r in runs)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
