"""Shared test settings: deterministic seeds and small thread counts (the CI machine has 2 cores).

Triton reads TRITON_INTERPRET when it is first imported, which may happen in any test (torch and
transformers import it when installed), so the interpreter is chosen here, before anything else, for
machines without a GPU: the Triton kernels' tests then run on the CPU.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
