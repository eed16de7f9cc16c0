"""Run by ``torchrun --nproc_per_node 2`` from ``test_ddp.py``: trains the same tiny classifier with
the stock Trainer and with ImportanceSamplingTrainer (resampling off, then on) under CPU DDP (gloo)
and writes each rank's final parameters as safetensors."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

from hf_efficient.training import ImportanceSamplingConfig, ImportanceSamplingTrainer


def main(out: str) -> None:
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("tiny_models", pathlib.Path(__file__).with_name("tiny_models.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    data = tiny.make_classification_data(64)
    common = dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=0.05,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=7,
        ddp_backend="gloo",
    )
    runs = {
        "stock": (Trainer, TrainingArguments(output_dir=f"{out}/stock", **common)),
        "off": (
            ImportanceSamplingTrainer,
            ImportanceSamplingConfig(output_dir=f"{out}/off", tau_threshold=float("inf"), **common),
        ),
        "on": (
            ImportanceSamplingTrainer,
            ImportanceSamplingConfig(output_dir=f"{out}/on", tau_threshold=1.0001, tau_smoothing=0.0, **common),
        ),
    }
    for name, (cls, args) in runs.items():
        torch.manual_seed(0)
        model = tiny.TinyClassifier(tiny.TinyConfig())
        trainer = cls(model=model, args=args, train_dataset=data)
        trainer.train()
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if name == "on":
            state["active_steps"] = torch.tensor(trainer.is_state.active_steps)
        save_file(state, f"{out}/{name}_rank{args.process_index}.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
    # Leave the process group in order: gloo threads still alive at interpreter exit can abort a rank.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
