"""Two CPU processes (gloo) under torchrun: with resampling off the trainer is bit-identical to the
stock Trainer in DDP with gradient accumulation; with it on, both ranks stay in sync."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_matches_stock_trainer(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(worker),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stock = [load_file(tmp_path / f"stock_rank{r}.safetensors") for r in (0, 1)]
    off = [load_file(tmp_path / f"off_rank{r}.safetensors") for r in (0, 1)]
    on = [load_file(tmp_path / f"on_rank{r}.safetensors") for r in (0, 1)]
    for name, value in stock[0].items():
        assert torch.equal(value, off[0][name]), name
        assert torch.equal(off[0][name], off[1][name]), name
        assert torch.equal(on[0][name], on[1][name]), name  # different presamples, one synced update
        assert not torch.equal(on[0][name], off[0][name]), name
    assert int(on[0]["active_steps"]) > 0 and int(on[1]["active_steps"]) > 0
