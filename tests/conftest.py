"""Shared pytest setup: CPU-friendly threads, a fixed seed per test, gpu tests skipped without CUDA."""
import pytest
import torch

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
