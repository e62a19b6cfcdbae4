"""Shared pytest setup: CPU-friendly threads, a fixed seed per test, gpu tests skipped without CUDA."""
import os

import pytest
import torch

# Without CUDA the Triton kernels are tested in Triton's interpreter, which reads TRITON_INTERPRET
# when triton is first imported; torch.utils.flop_counter (and others) import triton during collection,
# so the switch must be set here, before any test module loads. impl="auto" still picks Triton only
# for CUDA tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI and the development machines have 2 cores; more threads only oversubscribe them.
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    """Each test starts from the same RNG state, whatever ran before it."""
    torch.manual_seed(0)
    yield
