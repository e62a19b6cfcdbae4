"""Tile layout of a routing grouped by expert (``layout.expert_tiles``) in three Triton launches.

``expert_tiles_triton(expert, m, N, r)`` returns exactly what :func:`kernels.layout.expert_tiles` returns
(same keys, shapes, int64 dtypes and values), without its argsort and ~35 PyTorch ops: a stable counting
sort of the ``E = N r`` (query, slot) entries of each batch-head by expert. Shapes never depend on the data
and nothing syncs with the host. The entries of batch-head g are cut into ``C`` chunks of ``CHUNK`` entries:

1. count (``_count_kernel``, programs (g, chunk)): a histogram of the chunk's experts (``tl.histogram`` over
   blocks of up to 1,024 entries), written as partial counts ``part [G, C, m]`` (int32, no atomics).
2. scan (``_scan_kernel``, one program per g): per expert, the exclusive prefix of the partial counts over
   the chunks (written back into ``part``) and the total ``expert_count``; over the experts, tiles per
   expert ``ceil(count / T)`` and their exclusive prefix, ``expert_start = tile_start T``; then the tile
   table: each non-empty expert marks its first tile with its index and its end slot, and a running
   maximum over the tiles (experts and their ends grow along the tiles) gives ``tile_expert`` and
   ``tile_count = min(T, end - t T)`` on the used tiles, 0 on the others.
3. scatter (``_scatter_kernel``, programs (g, chunk)): the program's row of ``part`` becomes the next free
   slot of each expert (``expert_start + part``); the chunk's entries go in blocks of ``BLOCK = 64``: an
   entry's slot is its expert's next slot plus the number of earlier entries of the block with the same
   expert, and the row then advances by the block's count of each expert (both from one ``[BLOCK, BLOCK]``
   comparison summed with weights ``1 + 2^16 [j < i]``; every entry of an expert writes the same new value,
   so the write needs no atomics). Entries keep their order within an expert, as ``argsort(stable=True)``.
   Writes ``slot_of`` (contiguous), ``slot_token`` and ``slot_source`` (scattered); the same program then
   writes the padding (token N, entry N r) of its share of the ``S T`` slots: slot ``t T + j`` is padding
   when ``j >= tile_count[t]``.

Within a program, the scan's tile marks and the scatter's row of next slots go through global memory between
``tl.debug_barrier()`` calls (a barrier orders a CTA's global accesses), so only loads, stores, sums, scans
and one histogram are used: APIs stable since Triton 3.0.

Cost, r = 1 (``E = N``), int64 in and out as ``expert_tiles`` returns; ``S T ~ 2 E`` slots per head; the
DRAM bytes count every output once and the routing twice (the 8-byte scattered slot writes fall on sectors
that neighbouring entries of the same expert fill, in L2); chunks are sized for ~1,024 programs:

| (G, N, m) | T | S | chunks x entries | bytes: routing + slot_of + slots + part | int ops (comparisons) |
| --- | --- | --- | --- | --- | --- |
| (16, 65,536, 128) | 512 | 256 | 64 x 1,024 | 17 + 8 + 34 + 2 = 61 MB | 0.2 G |
| (16, 65,536, 512) | 128 | 1,020 | 64 x 1,024 | 17 + 8 + 33 + 8 = 67 MB | 0.2 G |
| (8, 2^20, 512) | 2,048 | 1,024 | 128 x 8,192 | 134 + 67 + 268 + 8 = 478 MB | 1.6 G |

(r = 2 doubles E, T and every term but ``part``.) At 4.8 TB/s the bytes take about 13, 14 and 100 us; the
comparisons, 3 integer operations per pair of a 64-entry block (~190 per entry), take about as long on the
integer units (~17 T int32 operations per second on an H200: 12, 12 and 96 us). The scan is one program per
head looping over ``C m`` partial counts (8 K, 33 K and 66 K) and ``S`` tiles. ``expert_tiles`` instead runs
a segmented argsort of int64 keys and ~48 element-wise passes over ``[G, E]``- and ``[G, S T]``-sized int64
tensors (~0.4 GB at the first two rows, 3.2 GB at the last, besides the sort) in ~35 launches. Not yet timed
on a GPU.

Launches: count and scatter with 4 and 8 warps, the scan with 4. Compiled for sm_90 (Triton 3.8, ``ptxas -v``,
m in {128, 512, 1,024}): count 27-32 registers, scan 128, scatter 64; no spills.

Scratch: ``part`` (``G C m`` int32). Limits: m <= 1,024; expert values must lie in ``[0, m)``; E < 2^30 per
head (slot indices in int32 within a head, offsets across heads in int64).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2
from .layout import _sort_keys

MAX_EXPERTS = 1024
_COUNT_BLOCK = 1024  # entries per histogram in the count pass
_SCATTER_BLOCK = 64  # entries per comparison block in the scatter pass
_TARGET_PROGRAMS = 1024  # chunks are sized for about this many programs in the count and scatter passes
# Tests switch this on so that an element the kernels fail to write shows up (as -7, neither a slot nor a count).
_POISON = False


def _buffer(shape, device, dtype=torch.long) -> torch.Tensor:
    if _POISON:
        return torch.full(shape, -7, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _count_kernel(EXPERT, PART, E, M, CHUNK, NUM_CHUNKS, BINS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    g = (pid // NUM_CHUNKS).to(tl.int64)
    c = pid % NUM_CHUNKS
    start = c * CHUNK
    hist = tl.zeros([BINS], tl.int32)
    for i0 in range(0, CHUNK, BLOCK):
        offs = start + i0 + tl.arange(0, BLOCK)
        e = tl.load(EXPERT + g * E + offs, mask=offs < E, other=0).to(tl.int32)
        hist += tl.histogram(e, BINS)
    bins = tl.arange(0, BINS)
    # the entries past E were counted as expert 0
    pad = CHUNK - tl.minimum(E - start, CHUNK)
    hist -= tl.where(bins == 0, pad, 0)
    tl.store(PART + (g * NUM_CHUNKS + c) * M + bins, hist, mask=bins < M)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _scan_kernel(
    PART, COUNT, START, TILE_EXPERT, TILE_COUNT, M, NUM_CHUNKS, T, S,
    BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    # the tile table starts at zero: the experts' marks below are scattered into it
    for t0 in range(0, S, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        tl.store(TILE_EXPERT + g * S + ts, tl.zeros([BLOCK_T], tl.int64), mask=ts < S)
        tl.store(TILE_COUNT + g * S + ts, tl.zeros([BLOCK_T], tl.int64), mask=ts < S)
    tl.debug_barrier()

    tiles_before = tl.full([], 0, tl.int32)  # tiles of the experts already scanned
    for x0 in range(0, M, BLOCK_X):
        xs = x0 + tl.arange(0, BLOCK_X)
        x_ok = xs < M
        total = tl.zeros([BLOCK_X], tl.int32)
        # per expert, exclusive prefix of the partial counts over the chunks, in place
        for c0 in range(0, NUM_CHUNKS, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            ptrs = PART + (g * NUM_CHUNKS + cs)[:, None] * M + xs[None, :]
            ok = (cs < NUM_CHUNKS)[:, None] & x_ok[None, :]
            p = tl.load(ptrs, mask=ok, other=0)  # [BLOCK_C, BLOCK_X]
            tl.store(ptrs, tl.cumsum(p, 0) - p + total[None, :], mask=ok)
            total += tl.sum(p, 0)
        tiles = (total + T - 1) // T
        tile_start = tiles_before + tl.cumsum(tiles, 0) - tiles
        start = tile_start * T
        tl.store(COUNT + g * M + xs, total.to(tl.int64), mask=x_ok)
        tl.store(START + g * M + xs, start.to(tl.int64), mask=x_ok)
        # each non-empty expert marks its first tile with its index and its end slot
        first = x_ok & (total > 0)
        tl.store(TILE_EXPERT + g * S + tile_start, xs.to(tl.int64), mask=first)
        tl.store(TILE_COUNT + g * S + tile_start, (start + total).to(tl.int64), mask=first)
        tiles_before += tl.sum(tiles, 0)
    tl.debug_barrier()

    # experts and their end slots grow along the tiles: a running maximum spreads the marks over each
    # expert's tiles
    run_e = tl.zeros([BLOCK_T], tl.int64)
    run_end = tl.zeros([BLOCK_T], tl.int64)
    for t0 in range(0, S, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_ok = ts < S
        mark_e = tl.load(TILE_EXPERT + g * S + ts, mask=t_ok, other=0)
        mark_end = tl.load(TILE_COUNT + g * S + ts, mask=t_ok, other=0)
        run_e = tl.maximum(tl.associative_scan(mark_e, 0, _max_combine), tl.max(run_e, 0))
        run_end = tl.maximum(tl.associative_scan(mark_end, 0, _max_combine), tl.max(run_end, 0))
        used = ts < tiles_before
        tl.store(TILE_EXPERT + g * S + ts, tl.where(used, run_e, 0), mask=t_ok)
        count = tl.minimum(run_end - ts.to(tl.int64) * T, T)
        tl.store(TILE_COUNT + g * S + ts, tl.where(used, count, 0), mask=t_ok)


@triton.jit
def _scatter_kernel(
    EXPERT, PART, START, TILE_COUNT, SLOT_TOKEN, SLOT_SOURCE, SLOT_OF,
    N, R, E, M, CHUNK, NUM_CHUNKS, T, S, SLOT_CHUNK,
    BINS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    g = (pid // NUM_CHUNKS).to(tl.int64)
    c = pid % NUM_CHUNKS
    bins = tl.arange(0, BINS)
    b_ok = bins < M
    # this program's row of ``part`` becomes the next free slot of each expert: its first slot plus its
    # entries in the earlier chunks
    nxt = PART + (g * NUM_CHUNKS + c) * M
    first = tl.load(START + g * M + bins, mask=b_ok, other=0).to(tl.int32)
    tl.store(nxt + bins, first + tl.load(nxt + bins, mask=b_ok, other=0), mask=b_ok)
    lanes = tl.arange(0, BLOCK)
    # summed over the lanes j of the same expert as lane i: their count plus 2^16 times those before lane i
    weight = tl.where(lanes[None, :] < lanes[:, None], 65537, 1)  # [BLOCK, BLOCK]
    slots = SLOT_TOKEN + g * S * T
    sources = SLOT_SOURCE + g * S * T
    start = c * CHUNK
    for i0 in range(0, CHUNK, BLOCK):
        offs = start + i0 + tl.arange(0, BLOCK)
        ok = offs < E
        e = tl.load(EXPERT + g * E + offs, mask=ok, other=-1).to(tl.int32)  # -1 past E: no expert's
        packed = tl.sum(tl.where(e[None, :] == e[:, None], weight, 0), 1)
        rank = packed >> 16  # entries of the block before this one with the same expert
        tl.debug_barrier()  # the previous block has advanced the row
        base = tl.load(nxt + e, mask=ok, other=0)
        slot = base + rank
        tl.debug_barrier()  # every lane has read the row before any lane advances it
        # every entry of an expert writes the same value: the slot after the block's last one
        tl.store(nxt + e, base + (packed & 0xFFFF), mask=ok)
        tl.store(SLOT_OF + g * E + offs, slot.to(tl.int64), mask=ok)
        tl.store(slots + slot, (offs // R).to(tl.int64), mask=ok)
        tl.store(sources + slot, offs.to(tl.int64), mask=ok)

    # padding of this program's share of the slots: slot t T + j of tile t when j >= tile_count[t]
    s_end = tl.minimum((c + 1) * SLOT_CHUNK, S * T)
    for s0 in range(c * SLOT_CHUNK, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < s_end
        t = s // T
        filled = tl.load(TILE_COUNT + g * S + t, mask=s_ok, other=0)
        pad = s_ok & ((s - t * T) >= filled)
        tl.store(slots + s, tl.full([BLOCK_S], 0, tl.int64) + N, mask=pad)
        tl.store(sources + s, tl.full([BLOCK_S], 0, tl.int64) + E, mask=pad)


def launch_config(G: int, E: int, m: int, chunk: Optional[int] = None) -> dict:
    """Chunk and block sizes: chunks of a power of two entries in [1,024, 16,384] sized for about 1,024
    programs (or ``chunk``, a power of two >= 16, as the tests use to cut tiny inputs into many chunks)."""
    if chunk is None:
        chunk = min(16384, max(1024, next_power_of_2(cdiv(G * E, _TARGET_PROGRAMS))))
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    num_chunks = cdiv(E, chunk)
    return dict(chunk=chunk, num_chunks=num_chunks, bins=max(32, next_power_of_2(m)),
                count_block=min(_COUNT_BLOCK, chunk), scatter_block=min(_SCATTER_BLOCK, chunk))


def expert_tiles_triton(expert: torch.Tensor, m: int, N: int, r: int, chunk: Optional[int] = None) -> dict:
    """:func:`kernels.layout.expert_tiles` in three Triton launches: the same dict, value for value.

    ``expert`` [G, N*r] (any integer dtype, values in [0, m)) holds the expert of entry ``n*r + j``.
    ``chunk`` overrides the entries per program of the count and scatter passes (tests).
    """
    if expert.dim() != 2 or expert.shape[1] != N * r:
        raise ValueError(f"expert must have shape [G, N*r] = [G, {N * r}], got {tuple(expert.shape)}")
    if not 1 <= m <= MAX_EXPERTS:
        raise ValueError(f"number of experts m must lie in [1, {MAX_EXPERTS}], got {m}")
    G, E = expert.shape
    device = expert.device
    tile = max(1, -(-E // m))
    num_tiles = -(-(E + m * (tile - 1)) // tile)
    cfg = launch_config(G, E, m, chunk)
    C = cfg["num_chunks"]
    ex = expert.contiguous()
    part = _buffer((G, C, m), device, torch.int32)  # partial counts, then their prefixes, then next slots
    counts = _buffer((G, m), device)
    expert_start = _buffer((G, m), device)
    tile_expert = _buffer((G, num_tiles), device)
    tile_count = _buffer((G, num_tiles), device)
    slot_token = _buffer((G, num_tiles * tile), device)
    slot_source = _buffer((G, num_tiles * tile), device)
    slot_of = _buffer((G, E), device)

    launch(
        _count_kernel, (G * C,),
        (ex, part, E, m, cfg["chunk"], C),
        dict(BINS=cfg["bins"], BLOCK=cfg["count_block"], num_warps=4),
    )
    launch(
        _scan_kernel, (G,),
        (part, counts, expert_start, tile_expert, tile_count, m, C, tile, num_tiles),
        dict(BLOCK_X=min(128, cfg["bins"]), BLOCK_C=32, BLOCK_T=256, num_warps=4),
    )
    launch(
        _scatter_kernel, (G * C,),
        (ex, part, expert_start, tile_count, slot_token, slot_source, slot_of, N, r, E, m, cfg["chunk"], C, tile,
            num_tiles, cdiv(num_tiles * tile, C)),
        dict(BINS=cfg["bins"], BLOCK=cfg["scatter_block"], BLOCK_S=256, num_warps=8),
    )
    return {
        "tile_count": tile_count,
        "tile": tile,
        "num_tiles": num_tiles,
        "slot_token": slot_token,
        "slot_source": slot_source,
        "slot_of": slot_of,
        "tile_expert": tile_expert,
        "expert_start": expert_start,
        "expert_count": counts,
    }


@triton.jit
def _key_ptr_kernel(SORTED, PTR, N, MK, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """``PTR[g, i]`` = the first position p of row g of ``SORTED [G, MK]`` (ascending) with ``SORTED[g, p] >= i``,
    for i in [0, N]: a lower-bound binary search per i (``STEPS >= log2(MK + 1)`` halvings)."""
    g = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i <= N
    lo = tl.zeros([BLOCK], tl.int64)
    hi = tl.zeros([BLOCK], tl.int64) + MK
    for _ in tl.static_range(STEPS):
        open_ = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(SORTED + g * MK + mid, mask=ok & open_, other=0)
        right = open_ & (v < i)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(open_ & (right == 0), mid, hi)
    tl.store(PTR + g * (N + 1) + i, lo, mask=ok)


def key_pairs_triton(topk_idx: torch.Tensor, N: int):
    """:func:`kernels.layout.key_pairs` with the CSR pointers from one launch (a binary search per key)
    instead of an arange, its copy and ``torch.searchsorted``: the same ``(pair_order, key_ptr)``, int64."""
    G = topk_idx.shape[0]
    MK = topk_idx.numel() // max(G, 1)
    # (the narrowed copy of the key lists is freed once sorted)
    sorted_keys, pair_order = torch.sort(_sort_keys(topk_idx.reshape(G, -1), N), dim=-1, stable=True)
    key_ptr = _buffer((G, N + 1), topk_idx.device)
    block = min(1024, next_power_of_2(N + 1))
    launch(
        _key_ptr_kernel, (G, cdiv(N + 1, block)),
        (sorted_keys, key_ptr, N, MK),
        dict(STEPS=max(1, (MK + 1).bit_length()), BLOCK=block, num_warps=4),
    )
    return pair_order, key_ptr
