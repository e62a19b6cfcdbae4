"""Tile layout of a routing in Triton (kernels/layout_kernels.py) against kernels/layout.py, value for value.

Without CUDA the kernels run in Triton's interpreter on CPU (TRITON_INTERPRET must be set before Triton is
first imported, hence at the top of this module). ``chunk=16`` cuts the tiny inputs into many chunks, so the
scan over chunks and the padding shares of several programs are exercised; the default chunk (1,024 entries)
holds up to 16 blocks of the scatter pass, so the running slots carry across blocks.
"""
import itertools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mita import kernels  # noqa: E402
from mita.kernels.layout import expert_tiles  # noqa: E402
from mita.kernels.layout_kernels import expert_tiles_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.available(), reason="Triton kernels unavailable here")


@pytest.fixture(autouse=True)
def _poison_buffers(monkeypatch):
    """Outputs and scratch start as -7, so an element the kernels fail to write shows up."""
    from mita.kernels import layout_kernels

    monkeypatch.setattr(layout_kernels, "_POISON", True)


def _routing(kind: str, G: int, E: int, m: int, seed: int = 0) -> torch.Tensor:
    """``expert [G, E]`` int64: random, all entries on one expert, or on a few experts (the rest empty)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        ex = torch.randint(0, m, (G, E), generator=gen)
    elif kind == "one":
        ex = torch.full((G, E), m // 2, dtype=torch.long)
    elif kind == "few":  # every third expert at most, so most experts are empty
        ex = 3 * torch.randint(0, -(-m // 3), (G, E), generator=gen)
    elif kind == "skewed":  # expert 0 holds about half the entries, the last expert the other half
        ex = torch.where(torch.rand(G, E, generator=gen) < 0.5, 0, m - 1)
    else:
        raise ValueError(kind)
    return ex.to(DEVICE)


def _assert_same(expert, m, N, r, chunk=None):
    want = expert_tiles(expert.long(), m, N, r)
    got = expert_tiles_triton(expert, m, N, r, chunk=chunk)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, int):
            assert got[key] == value, key
        else:
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            assert torch.equal(got[key], value), key


@pytest.mark.parametrize("N, m, r", list(itertools.product((1, 2, 17, 197), (1, 3, 25, 64), (1, 2))))
def test_random_routing(N, m, r):
    for G, chunk in ((1, None), (3, 16)):
        _assert_same(_routing("random", G, N * r, m, seed=N + m), m, N, r, chunk=chunk)


@pytest.mark.parametrize("kind", ["one", "few", "skewed"])
@pytest.mark.parametrize("N, m, r", [(1, 3, 2), (17, 25, 1), (197, 3, 2), (197, 64, 1), (197, 64, 2)])
def test_awkward_routing(kind, N, m, r):
    for G, chunk in ((1, None), (3, 16)):
        _assert_same(_routing(kind, G, N * r, m), m, N, r, chunk=chunk)


def test_many_blocks_and_chunks():
    """Several chunks of the default size, each of 16 scatter blocks, with int32 experts."""
    N, m, r = 1500, 25, 2
    _assert_same(_routing("random", 2, N * r, m).int(), m, N, r)
    _assert_same(_routing("skewed", 1, N * r, m), m, N, r, chunk=256)


def test_checks_arguments():
    ex = torch.zeros(2, 10, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="shape"):
        expert_tiles_triton(ex, 4, 5, 1)
    with pytest.raises(ValueError, match="number of experts"):
        expert_tiles_triton(ex, 1025, 10, 1)
    with pytest.raises(ValueError, match="chunk"):
        expert_tiles_triton(ex, 4, 10, 1, chunk=24)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["random", "skewed"])
@pytest.mark.parametrize("G, N, m, r", [(16, 65536, 128, 1), (16, 65536, 512, 2), (8, 2**20, 512, 1), (2, 2**20, 1024, 2)])
def test_gpu_sizes(G, N, m, r, kind):
    """The sizes of the cost table (compiled kernels, default chunks)."""
    _assert_same(_routing(kind, G, N * r, m), m, N, r)
