"""Streamed exact top-k of the landmark-key scores (kernels/topk_stream.py) against torch.topk in float64.

Without CUDA the kernel runs in Triton's interpreter on CPU (TRITON_INTERPRET must be set before Triton is
first imported, hence at the top of this module) with 16 x 16 tiles, so small N spans several tiles,
chunks and landmark blocks. The `gpu` class runs the default launch configuration at real sizes, bf16
included (Triton 3.8's interpreter computes bf16 `tl.dot` wrongly).
"""
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mita import kernels  # noqa: E402
from mita.kernels.topk_stream import launch_config, search_topk, topk_stream  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.available(), reason="Triton kernels unavailable here")
SMALL = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)


def _tied(N, m, d, dtype=torch.float32, batch=(1, 1), cyclic=False):
    """Keys and landmarks with exact ties: every key one of 7 integer vectors (drawn at random, or in turn with
    ``cyclic``), integer landmarks; ``[B, H, N, d]`` and ``[B, H, m, d]`` on DEVICE (the keys broadcast over B, H)."""
    g = torch.Generator().manual_seed(3 if cyclic else 1)
    base = torch.randint(-2, 3, (7, d), generator=g).float()
    pick = torch.arange(N) % 7 if cyclic else torch.randint(0, 7, (N,), generator=g)
    k_keys = base[pick].expand(*batch, N, d).to(DEVICE, dtype)
    landmarks = torch.randint(-2, 3, (*batch, m, d), generator=g).float().to(DEVICE, dtype)
    return k_keys, landmarks


def _small_config(N, topk, chunks=3):
    """16 x 16 tiles and a few chunks: at least topk / 16 (>= topk groups), and 4 topk / 16 where the tiles
    allow, as launch_config keeps P >= 4 topk groups (fewer make a chunk's candidates overflow its slots
    often: the device-side repair, tested on its own below, then recomputes those rows, slowly in the
    interpreter)."""
    n_tiles = -(-N // 16)
    return dict(SMALL, chunks=max(-(-topk // 16), min(n_tiles, max(chunks, -(-4 * topk // 16)))))


def _scores64(k_keys, landmarks):
    return landmarks.double() @ k_keys.double().transpose(-1, -2)  # [B, H, m, N]


def _assert_topk_sets(idx, k_keys, landmarks, topk, rtol=1e-5):
    """The selected index SETS equal torch.topk's on float64 scores of the same inputs; a row may differ only
    where its k-th and (k+1)-th float64 scores lie within rounding (rtol of the row's largest |score|)."""
    B, H, m, _ = landmarks.shape
    assert idx.shape == (B, H, m, topk) and idx.dtype == torch.int64
    s = _scores64(k_keys, landmarks).cpu()
    idx = idx.cpu()
    assert (idx >= 0).all() and (idx < k_keys.shape[2]).all()
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all(), "an index is selected twice"
    ref = s.topk(topk, dim=-1).indices
    same = (idx.sort(-1).values == ref.sort(-1).values).all(-1)  # [B, H, m]
    if topk < s.shape[-1]:
        top2 = s.topk(topk + 1, dim=-1).values
        gap = top2[..., topk - 1] - top2[..., topk]
        near_tie = gap <= rtol * s.abs().amax(-1)
        assert (same | near_tie).all(), f"{(~same).sum().item()} rows select another set"
        # where sets differ, the kernel's k-th score is still within rounding of the true k-th score
        got_min = s.gather(-1, idx).amin(-1)
        assert (top2[..., topk - 1] - got_min <= rtol * s.abs().amax(-1)).all()
    else:
        assert same.all()


def _expected_exact(k_keys, landmarks, topk):
    """Exact order of integer-valued inputs: score descending, equal scores by ascending index."""
    s = _scores64(k_keys, landmarks).cpu()
    N = s.shape[-1]
    # scores are integers far below 2^40, so score * 2^21 - index orders by score then lowest index
    key = s * 2.0 ** 21 - torch.arange(N, dtype=torch.float64)
    return key.topk(topk, dim=-1).indices


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize(
    "N,m,topk",
    [(1, 1, 1), (2, 3, 1), (2, 3, 2), (17, 1, 1), (17, 3, 5), (17, 25, 17), (197, 25, 1), (197, 3, 49),
     (197, 25, 100), (197, 1, 197), (1000, 3, 7), (1000, 1, 1000), (1000, 25, 64)],
)
def test_sets_match_float64_topk(N, m, topk):
    d = 32
    k_keys = _randn(1, 2, N, d, seed=N + topk)
    landmarks = _randn(1, 2, m, d, seed=m)
    idx = topk_stream(k_keys, landmarks, topk, config=_small_config(N, topk))
    _assert_topk_sets(idx, k_keys, landmarks, topk)


@pytest.mark.parametrize("final", ["sort", "topk"])
def test_final_ranking_by_sort_kernel_and_by_torch(final):
    """The candidates are ranked by the in-register sort kernel (CUDA's default) or by torch.topk (CPU's):
    the same indices in the same order."""
    N, m, topk = 120, 3, 11
    k_keys, landmarks = _randn(1, 1, N, 32, seed=11), _randn(1, 1, m, 32, seed=12)
    idx = topk_stream(k_keys, landmarks, topk, config=dict(_small_config(N, topk), final=final))
    _assert_topk_sets(idx, k_keys, landmarks, topk)
    scores = _scores64(k_keys, landmarks).gather(-1, idx.cpu())
    assert (scores.diff(dim=-1) <= 0).all(), "rows are not ordered by score"


@pytest.mark.parametrize("N,m,topk", [(17, 3, 5), (197, 25, 49), (1000, 3, 7), (1000, 1, 1000)])
def test_collection_by_prefix_sums(N, m, topk):
    """``scan=1``: the collection places each tile's candidates by a prefix sum of the row's hits (one masked
    store a tile) instead of one row maximum a round: the same sets."""
    d = 32
    k_keys = _randn(1, 2, N, d, seed=N + topk)
    landmarks = _randn(1, 2, m, d, seed=m)
    idx = topk_stream(k_keys, landmarks, topk, config=dict(_small_config(N, topk), scan=1))
    _assert_topk_sets(idx, k_keys, landmarks, topk)


@pytest.mark.parametrize("capacity", [None, 6, 2])
def test_collection_by_prefix_sums_with_ties_and_overflow(capacity):
    """``scan=1`` on exact ties (7 distinct keys): the same exact order (score, then lowest index), rows that
    overflow their slots repaired on the device."""
    N, m, d, topk = 90, 5, 32, 23
    k_keys, landmarks = _tied(N, m, d)
    cfg = dict(_small_config(N, topk), scan=1)
    if capacity is not None:
        cfg["capacity"] = capacity
    idx = topk_stream(k_keys, landmarks, topk, config=cfg)
    assert torch.equal(idx.cpu(), _expected_exact(k_keys, landmarks, topk))


def test_many_groups_threshold_in_blocks():
    """More than 2048 groups per row (132 chunks of 16 keys): the threshold kernel reads them in blocks."""
    N, m, topk = 2100, 1, 3
    k_keys, landmarks = _randn(1, 1, N, 32, seed=13), _randn(1, 1, m, 32, seed=14)
    idx = topk_stream(k_keys, landmarks, topk, config=dict(SMALL, chunks=132))
    _assert_topk_sets(idx, k_keys, landmarks, topk)


def test_default_launch_config():
    """The launch configuration the GPU uses, here in the interpreter (one 64-key tile per chunk)."""
    N, m, topk = 300, 20, 30
    k_keys, landmarks = _randn(1, 1, N, 32, seed=3), _randn(1, 1, m, 32, seed=4)
    cfg = launch_config(N, m, 32, 1, topk, k_keys.device)
    assert cfg["block_m"] == 32 and cfg["chunks"] == 5  # one program per tile: there are only 5
    _assert_topk_sets(topk_stream(k_keys, landmarks, topk), k_keys, landmarks, topk)


def test_launch_config_keeps_the_groups_in_one_threshold_block():
    """Chunks for occupancy stop at 2,048 groups a row (the threshold kernel's register block); more only where
    4 topk groups need them."""
    cpu = torch.device("cpu")
    assert launch_config(65536, 128, 64, 16, 128, cpu)["chunks"] == 32  # 33 for 4 programs an SM before
    assert launch_config(16384, 64, 64, 16, 64, cpu)["chunks"] == 32
    assert launch_config(65536, 1024, 64, 1, 1024, cpu)["chunks"] == 64  # P >= 4 topk = 4,096


def test_final_ranking_sort_beyond_512_slots():
    """``sort_max``: the in-register ranking sort over more than 512 candidate slots (1,024 here)."""
    N, m, topk = 300, 3, 20
    k_keys, landmarks = _randn(1, 1, N, 32, seed=21), _randn(1, 1, m, 32, seed=22)
    cfg = dict(_small_config(N, topk), final="sort", capacity=1024 // _small_config(N, topk)["chunks"],
               sort_max=1024)
    idx = topk_stream(k_keys, landmarks, topk, config=cfg)
    _assert_topk_sets(idx, k_keys, landmarks, topk)
    scores = _scores64(k_keys, landmarks).gather(-1, idx.cpu())
    assert (scores.diff(dim=-1) <= 0).all(), "rows are not ordered by score"


@pytest.mark.parametrize("rank_block", [None, 32, 16])
def test_compacted_ranking(monkeypatch, rank_block):
    """``compact``: each row's candidates gathered from its chunks' slots into one dense list (prefix sums of the
    chunks' counts) and sorted in a block for the count expected (``compact_block``, 128 here, against 512
    slots); rows with more candidates than the block (a block of 32 or 16 for ~25-40 candidates) are redone by
    the repair kernel: the same indices in the same order as the plain ranking."""
    from mita.kernels.topk_stream import compact_block

    N, m, topk = 300, 6, 20
    k_keys, landmarks = _randn(2, 1, N, 32, seed=31), _randn(2, 1, m, 32, seed=32)
    base = dict(_small_config(N, topk), final="sort")
    base["capacity"] = 512 // base["chunks"]
    assert compact_block(topk) == 128 < base["chunks"] * base["capacity"]
    want = topk_stream(k_keys, landmarks, topk, config=dict(base, sort_max=512))
    cfg = dict(base, compact=True) if rank_block is None else dict(base, compact=True, rank_block=rank_block)
    from mita.kernels import topk_stream as module

    launched, launch = [], module.launch
    monkeypatch.setattr(module, "launch", lambda kernel, *a, **kw: launched.append(kernel.fn.__name__)
                        or launch(kernel, *a, **kw))
    got = topk_stream(k_keys, landmarks, topk, config=cfg)
    assert "_select_compact_kernel" in launched and "_select_kernel" not in launched
    assert torch.equal(got.cpu(), want.cpu())
    _assert_topk_sets(got, k_keys, landmarks, topk)


def test_compacted_ranking_with_ties_and_overflow():
    """The compacted ranking on exact ties with chunks that overflow their slots: the exact order (score, then
    lowest index), overflowing rows repaired."""
    N, m, d, topk = 90, 5, 32, 23
    k_keys, landmarks = _tied(N, m, d)
    cfg = dict(_small_config(N, topk), final="sort", compact=True, capacity=6, rank_block=32)
    idx = topk_stream(k_keys, landmarks, topk, config=cfg)
    assert torch.equal(idx.cpu(), _expected_exact(k_keys, landmarks, topk))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_dtypes_and_head_dims(dtype, d):
    N, m, topk = 70, 5, 9
    k_keys = _randn(1, 1, N, d, dtype=dtype, seed=d)
    landmarks = _randn(1, 1, m, d, dtype=dtype, seed=d + 1)
    idx = topk_stream(k_keys, landmarks, topk, config=_small_config(N, topk))
    _assert_topk_sets(idx, k_keys, landmarks, topk)


def test_strided_views_of_qkv():
    """k and the landmarks read in place from a ViT's fused qkv projection ([B, N, 3, H, d] memory)."""
    B, H, N, d, m, topk = 2, 3, 50, 32, 7, 6
    qkv = _randn(B, N, 3, H, d, seed=5)
    k_keys = qkv[:, :, 1].transpose(1, 2)  # [B, H, N, d], row stride 3 H d
    landmarks = _randn(B, m, 2, H, d, seed=6)[:, :, 0].transpose(1, 2)  # [B, H, m, d], not contiguous
    assert not k_keys.is_contiguous() and not landmarks.is_contiguous()
    idx = topk_stream(k_keys, landmarks, topk, config=_small_config(N, topk))
    _assert_topk_sets(idx, k_keys, landmarks, topk)
    assert torch.equal(idx, topk_stream(k_keys.contiguous(), landmarks.contiguous(), topk,
                                        config=_small_config(N, topk)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ties_go_to_the_lowest_index_and_rows_are_ordered(dtype):
    """Duplicate keys (5 distinct, small integers: exact scores, many equal ones): the k-th place goes to the
    lowest indices and each row lists its keys by score, then by index."""
    N, m, d, topk = 90, 3, 32, 23
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-2, 3, (5, d), generator=g).float()
    k_keys = base[torch.arange(N) % 5].view(1, 1, N, d).to(DEVICE, dtype)
    landmarks = torch.randint(-2, 3, (1, 1, m, d), generator=g).float().to(DEVICE, dtype)
    idx = topk_stream(k_keys, landmarks, topk, config=_small_config(N, topk))
    assert torch.equal(idx.cpu(), _expected_exact(k_keys, landmarks, topk))


def test_all_scores_equal_overflow_the_buffer():
    """Identical keys: every score ties, so every key is a candidate and the first collection overflows its
    buffer; the second has room, and the lowest indices win."""
    N, m, d, topk = 60, 2, 32, 4
    k_keys = torch.ones(1, 1, N, d, device=DEVICE)
    landmarks = _randn(1, 1, m, d, seed=1)
    cfg = dict(_small_config(N, topk), capacity=8)
    idx = topk_stream(k_keys, landmarks, topk, config=cfg)
    assert torch.equal(idx.cpu(), torch.arange(topk).expand(1, 1, m, topk))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_overflowing_rows_are_repaired_on_the_device(dtype):
    """Slots too few for some rows' candidates (capacity 6: one of five rows overflows here; capacity 2, raised
    to the least that holds topk candidates in all: every row): those rows are redone by the device-side radix
    select (no host sync), the others kept; every row exact and ordered (score, then index), ties included."""
    N, m, d, topk = 90, 5, 32, 23
    k_keys, landmarks = _tied(N, m, d, dtype=dtype)
    for capacity in (6, 2):
        idx = topk_stream(k_keys, landmarks, topk, config=dict(_small_config(N, topk), capacity=capacity))
        assert torch.equal(idx.cpu(), _expected_exact(k_keys, landmarks, topk)), capacity


def test_increasing_scores_stay_within_capacity():
    """A monotone trend along N (interleaved groups keep tau at the k-th score): correct either way."""
    N, m, d, topk = 200, 2, 32, 10
    k_keys = (torch.linspace(0.1, 1.0, N)[:, None] * torch.ones(d)).view(1, 1, N, d).to(DEVICE)
    landmarks = torch.ones(1, 1, m, d, device=DEVICE)
    idx = topk_stream(k_keys, landmarks, topk, config=dict(_small_config(N, topk), capacity=topk))
    assert torch.equal(idx.cpu(), torch.arange(N - 1, N - 1 - topk, -1).expand(1, 1, m, topk))


def test_softmax_statistics():
    """Row max and sum of exp of ``scale R K^T`` from the first pass, against float64."""
    N, m, d, topk = 150, 25, 64, 12
    k_keys, landmarks = _randn(2, 1, N, d, seed=7), _randn(2, 1, m, d, seed=8)
    idx, (row_max, row_sum) = topk_stream(k_keys, landmarks, topk, return_stats=True, scale=0.125,
                                          config=_small_config(N, topk))
    _assert_topk_sets(idx, k_keys, landmarks, topk)
    z = _scores64(k_keys, landmarks) * 0.125
    assert row_max.shape == row_sum.shape == (2, 1, m) and row_max.dtype == torch.float32
    torch.testing.assert_close(row_max.double(), z.amax(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((row_max.double() + row_sum.double().log()), z.logsumexp(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(d=48), "head dim"), (dict(topk=0), "topk"), (dict(topk=21), "topk"), (dict(m=0), "landmarks"),
     (dict(dtype=torch.float64), "dtype")],
)
def test_rejects_unsupported_inputs(kwargs, match):
    p = dict(N=20, m=3, d=32, topk=4, dtype=torch.float32)
    p.update(kwargs)
    k_keys = torch.zeros(1, 1, p["N"], p["d"], dtype=p["dtype"])
    landmarks = torch.zeros(1, 1, p["m"], p["d"], dtype=p["dtype"])
    with pytest.raises(ValueError, match=match):
        topk_stream(k_keys, landmarks, p["topk"])


def test_bench_script_smoke():
    """scripts/bench_topk.py end to end in its CPU smoke mode (interpreter)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_topk.py"
    out = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "topk_stream" in out.stdout and "ok" in out.stdout
    for flag, spec, says in (("--config", "compact", "key=value"), ("--search-config", "block_m=x", "an integer"),
                             ("--config", "final=fast", "sort or topk")):
        bad = subprocess.run([sys.executable, str(script), "--smoke", flag, spec], capture_output=True, text=True,
                             timeout=120)
        assert bad.returncode == 2 and flag in bad.stderr and says in bad.stderr, bad.stderr[-500:]


@pytest.mark.gpu
class TestGPU:
    """Default launch configuration on CUDA: real sizes, all dtypes, strided views, ties."""

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    @pytest.mark.parametrize(
        "B,H,N,d,m,topk",
        [(2, 3, 197, 64, 25, 25), (1, 2, 1025, 32, 49, 49), (1, 2, 4097, 128, 64, 64),
         (1, 2, 16384, 64, 256, 256), (1, 1, 65536, 64, 512, 512), (1, 1, 3000, 64, 1024, 1024),
         (1, 1, 777, 32, 3, 777)],
    )
    def test_sets(self, dtype, B, H, N, d, m, topk):
        k_keys = _randn(B, H, N, d, dtype=dtype, seed=N)
        landmarks = _randn(B, H, m, d, dtype=dtype, seed=m)
        idx = topk_stream(k_keys, landmarks, topk)
        _assert_topk_sets(idx, k_keys, landmarks, topk)

    @pytest.mark.parametrize("B,H,N,d,m,topk", [(1, 2, 16384, 64, 64, 64), (1, 1, 65536, 64, 512, 512),
                                                 (2, 3, 1025, 64, 49, 49)])
    def test_sets_collected_by_prefix_sums(self, B, H, N, d, m, topk):
        # and ranked by the in-register sort up to 2,048 slots
        k_keys = _randn(B, H, N, d, dtype=torch.bfloat16, seed=N)
        landmarks = _randn(B, H, m, d, dtype=torch.bfloat16, seed=m)
        cfg = dict(launch_config(N, m, d, B * H, topk, torch.device(DEVICE)), scan=1, sort_max=2048)
        _assert_topk_sets(topk_stream(k_keys, landmarks, topk, config=cfg), k_keys, landmarks, topk)

    @pytest.mark.parametrize("B,H,N,d,m,topk", [(2, 8, 65536, 64, 128, 128), (2, 8, 16384, 64, 64, 64),
                                                 (1, 2, 16384, 64, 256, 256), (2, 3, 1025, 64, 49, 49)])
    def test_sets_by_compacted_ranking(self, B, H, N, d, m, topk):
        # each row's candidates gathered into one dense list and sorted (topk_stream._COMPACT): the same indices in
        # the same order as the default ranking; on ties (7 distinct keys), overflowing rows repaired
        k_keys = _randn(B, H, N, d, dtype=torch.bfloat16, seed=N)
        landmarks = _randn(B, H, m, d, dtype=torch.bfloat16, seed=m)
        got = topk_stream(k_keys, landmarks, topk, config=dict(compact=1))
        assert torch.equal(got, topk_stream(k_keys, landmarks, topk))
        _assert_topk_sets(got, k_keys, landmarks, topk)
        k_int, r_int = _tied(N, m, d, dtype=torch.bfloat16, cyclic=True)
        assert torch.equal(topk_stream(k_int, r_int, topk, config=dict(compact=1)).cpu(),
                           _expected_exact(k_int, r_int, topk))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    def test_strided_and_ties(self, dtype):
        B, H, N, d, m, topk = 2, 4, 3001, 64, 49, 49
        qkv = _randn(B, N, 3, H, d, dtype=dtype, seed=1)
        k_keys = qkv[:, :, 1].transpose(1, 2)
        landmarks = _randn(B, H, m, d, dtype=dtype, seed=2)
        _assert_topk_sets(topk_stream(k_keys, landmarks, topk), k_keys, landmarks, topk)
        k_int, r_int = _tied(N, m, d, dtype=dtype, batch=(B, H), cyclic=True)
        assert torch.equal(topk_stream(k_int, r_int, topk).cpu(), _expected_exact(k_int, r_int, topk))

    def test_cuda_graph_capture_with_overflowing_rows(self):
        # nothing syncs with the host, so a CUDA graph records the whole selection, repairs included (ties:
        # 7 distinct keys over 3,001 overflow the candidate slots), and its replay gives the eager result
        B, H, N, d, m, topk = 1, 2, 3001, 64, 49, 49
        k_int, r_int = _tied(N, m, d, dtype=torch.bfloat16, batch=(B, H), cyclic=True)
        k_int = k_int.contiguous()
        eager = topk_stream(k_int, r_int, topk)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            topk_stream(k_int, r_int, topk)  # warm-up: compiles and caches the launchers
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = topk_stream(k_int, r_int, topk)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
        assert torch.equal(eager.cpu(), _expected_exact(k_int, r_int, topk))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    @pytest.mark.parametrize("B,H,N,d,m,topk", [(2, 3, 197, 64, 25, 25), (1, 2, 1025, 64, 49, 49),
                                                 (1, 2, 4097, 128, 64, 64), (1, 1, 777, 32, 3, 777)])
    def test_search_sets(self, dtype, B, H, N, d, m, topk):
        # the one-launch search at its default configuration, and on ties (the radix select of open rows)
        k_keys = _randn(B, H, N, d, dtype=dtype, seed=N)
        landmarks = _randn(B, H, m, d, dtype=dtype, seed=m)
        _assert_topk_sets(search_topk(k_keys, landmarks, topk), k_keys, landmarks, topk)
        k_int, r_int = _tied(N, m, d, dtype=dtype, batch=(B, H), cyclic=True)
        got = search_topk(k_int, r_int, topk).cpu()
        assert torch.equal(got.sort(-1).values, _expected_exact(k_int, r_int, topk).sort(-1).values)

    def test_softmax_statistics(self):
        k_keys, landmarks = _randn(2, 2, 5000, 64, seed=4), _randn(2, 2, 128, 64, seed=5)
        _, (row_max, row_sum) = topk_stream(k_keys, landmarks, 128, return_stats=True)
        z = _scores64(k_keys, landmarks) * 64 ** -0.5
        torch.testing.assert_close(row_max.double(), z.amax(-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(row_max.double() + row_sum.double().log(), z.logsumexp(-1), rtol=1e-5, atol=1e-5)


def _routing_inputs():
    """q, k ``[2, 2, 70, 32]`` and landmarks ``[2, 2, 3, 32]`` for the routing tests."""
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 2, 70, 32, generator=g).to(DEVICE) for _ in range(2))
    return q, k, torch.randn(2, 2, 3, 32, generator=g).to(DEVICE)


def _takes_the_custom_op_when_compiling(monkeypatch, module, name, qkr, want):
    """Under torch.compile mita_routing calls the custom op ``module.name`` (same indices as eager), whose schema
    and fake implementation pass torch.library.opcheck."""
    from mita.functional import mita_routing

    q, k, R = qkr
    ops, op = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: ops.append(1) or op(*a))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(mita_routing(q, k, R, 9, impl="triton")[0], want) and ops == [1]
    torch.library.opcheck(op, (k, R, 9), test_utils=("test_schema", "test_faketensor"))


def test_mita_routing_streams_the_topk_from_a_score_count_on(monkeypatch):
    # mita.kernels.STREAM_TOPK_MIN_SCORES: mita_routing takes the streamed kernel from m N scores a head on (the
    # custom op under torch.compile)
    from mita import kernels
    from mita.functional import mita_routing

    q, k, R = _routing_inputs()
    calls = []
    stream = kernels.landmark_topk
    monkeypatch.setattr(kernels, "landmark_topk", lambda *a: calls.append(1) or stream(*a))
    monkeypatch.setattr(kernels, "SEARCH_TOPK_MAX_N", None)  # the one-launch search comes first where it applies
    monkeypatch.setattr(kernels, "STREAM_TOPK_MIN_SCORES", 3 * 70 + 1)
    torch_idx, _ = mita_routing(q, k, R, 9, impl="triton")
    assert calls == []
    monkeypatch.setattr(kernels, "STREAM_TOPK_MIN_SCORES", 3 * 70)
    stream_idx, _ = mita_routing(q, k, R, 9, impl="triton")
    assert calls == [1]
    assert torch.equal(stream_idx.sort(-1).values, torch_idx.sort(-1).values)
    from mita.kernels import topk_stream as module

    _takes_the_custom_op_when_compiling(monkeypatch, module, "landmark_topk_op", (q, k, R), stream_idx)


# The one-launch search (search_topk): 16-key tiles in the interpreter, so small N spans several tiles and the last
# one is part-filled.
SEARCH_SMALL = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)


@pytest.fixture(autouse=True)
def _poison_search_output(monkeypatch):
    """search_topk's output starts as -1, so an index it fails to write shows up (``_assert_topk_sets`` wants every
    index in [0, N) and none twice)."""
    from mita.kernels import topk_stream as module

    monkeypatch.setattr(module, "_POISON", True)


@pytest.mark.parametrize("N,m,topk,d", [(1, 1, 1, 32), (2, 3, 1, 32), (17, 3, 5, 32), (197, 25, 49, 64),
                                        (300, 20, 7, 32), (64, 2, 64, 32), (130, 33, 17, 128)])
def test_search_sets_match_float64_topk(N, m, topk, d):
    """Random keys: the selected sets against float64 torch.topk, N = 1, 2, 17, 197 (several landmark blocks, part-
    filled tiles), topk = N, d = 32, 64, 128."""
    k_keys, landmarks = _randn(2, 1, N, d, seed=N), _randn(2, 1, m, d, seed=N + 1)
    idx = search_topk(k_keys, landmarks, topk, config=SEARCH_SMALL)
    _assert_topk_sets(idx, k_keys, landmarks, topk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("search", [12, 1, 0])
def test_search_ties_and_open_rows_go_to_the_radix_select(dtype, search):
    """Small-integer keys (many equal scores): rows whose k-th place is tied cannot close by a count and go to the
    radix select, the lowest indices winning; with 1 or 0 search passes every row does (and each row is then
    ordered by score, then index)."""
    N, m, d, topk = 90, 5, 32, 23
    k_keys, landmarks = _tied(N, m, d, dtype=dtype)
    idx = search_topk(k_keys, landmarks, topk, config=dict(SEARCH_SMALL, search=search)).cpu()
    want = _expected_exact(k_keys, landmarks, topk)
    assert torch.equal(idx.sort(-1).values, want.sort(-1).values)
    if search == 0:
        assert torch.equal(idx, want)


def test_search_identical_keys_and_strided_views():
    """Every score equal (the first pass finds count(s >= max) = N > topk: the radix select, lowest indices), and
    keys read as strided views of a qkv tensor."""
    N, m, d, topk = 40, 3, 32, 4
    k_keys = torch.ones(1, 1, N, d, device=DEVICE)
    idx = search_topk(k_keys, _randn(1, 1, m, d, seed=1), topk, config=SEARCH_SMALL)
    assert torch.equal(idx.cpu(), torch.arange(topk).expand(1, 1, m, topk))
    qkv = _randn(2, 50, 3, 2, 32, seed=3)  # [B, N, 3, H, d]
    k_view = qkv[:, :, 1].transpose(1, 2)  # [B, H, N, d], non-contiguous
    landmarks = _randn(2, 2, 6, 32, seed=4)
    idx = search_topk(k_view, landmarks, 9, config=SEARCH_SMALL)
    _assert_topk_sets(idx, k_view, landmarks, 9)


def test_search_rejects_wide_tiles():
    with pytest.raises(ValueError, match="block_n"):
        search_topk(_randn(1, 1, 300, 32), _randn(1, 1, 2, 32), 3, config=dict(block_n=256))


def test_mita_routing_searches_the_topk_up_to_a_length(monkeypatch):
    # mita.kernels.SEARCH_TOPK_MAX_N: mita_routing takes the one-launch search up to that many keys (the custom op
    # under torch.compile), before the streamed kernel's threshold
    from mita.functional import mita_routing
    from mita.kernels import topk_stream as module

    q, k, R = _routing_inputs()
    calls = []
    search = module.search_topk
    monkeypatch.setattr(module, "search_topk", lambda *a, **kw: calls.append(1) or search(*a, **kw))
    monkeypatch.setattr(kernels, "STREAM_TOPK_MIN_SCORES", 1)
    monkeypatch.setattr(kernels, "SEARCH_TOPK_MAX_N", 69)
    torch_idx, _ = mita_routing(q, k, R, 9, impl="triton")
    assert calls == []
    monkeypatch.setattr(kernels, "SEARCH_TOPK_MAX_N", 70)
    search_idx, _ = mita_routing(q, k, R, 9, impl="triton")
    assert calls == [1]
    assert torch.equal(search_idx.sort(-1).values, torch_idx.sort(-1).values)
    _takes_the_custom_op_when_compiling(monkeypatch, module, "landmark_topk_search_op", (q, k, R), search_idx)
