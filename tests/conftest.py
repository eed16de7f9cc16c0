"""Shared test settings: deterministic seeds and small thread counts (the CI machine has 2 cores)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
