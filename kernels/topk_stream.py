"""Streamed exact top-k of the landmark-key scores: ``topk_idx[g, j] = top-k_i (R_j . K_i)`` without the
``m x N`` score matrix.

Two passes over the keys recompute the scores ``S = R K^T`` tile by tile (a block of ``BLOCK_M`` landmarks
times a block of ``BLOCK_N`` keys, fp32 accumulation); neither writes them:

1. group maxima (``_group_max_kernel``): the keys of a row are split into ``P`` interleaved groups
   (key i in group ``i mod P``) and each program keeps the running elementwise maximum of its score tiles,
   which is the maximum of each of its ``BLOCK_N`` groups. The k-th largest of the P group maxima, ``tau``,
   is a lower bound of the k-th largest score (k distinct groups each hold a score >= tau), so at least k
   scores are >= tau, and with ``P >= 4 k`` groups only a few more than k on unstructured data (interleaving
   keeps monotone trends from piling the best keys into one group). The softmax statistics of ``s R K^T``
   (row max, row sum of exp) come out of this pass when asked.
2. threshold (``_threshold_kernel``): ``tau`` = the k-th largest of each row's P group maxima, found bit by
   bit on order-preserving int32 keys (32 counting passes over P values, in registers).
3. collection (``_collect_kernel``): the same score tiles again; each program writes the scores ``>= tau``
   of its rows to its own slots (``[G, m, chunks, capacity]``, no atomics), one candidate per row and
   round (the row's best in the tile, by a max with indices), as one int64 key
   ``(order-preserving int32 of the score) << 32 | (2^31 - 1 - i)``: larger keys mean larger scores and,
   among equal scores, lower indices, so no two keys tie.
4. ranking: the k largest candidate keys of each row (a few more than k candidates), largest first, by
   one in-register sort per row (``_select_kernel``, rows of at most 512 slots) or ``torch.topk``; with
   ``_COMPACT``, by an in-register sort of the row's candidates gathered into one dense list first
   (``_select_compact_kernel``: a block for the count expected, rows beyond it repaired as below).

The result is exact with respect to the fp32 scores the kernel computes, ties broken by the lowest index.
A (row, chunk) whose candidates overflow its slots (adversarial inputs only: massive ties, or the best
keys concentrated in one residue class) has its row redone on the device by ``_repair_kernel`` (a radix
select over recomputed scores, four passes of 8-bit digits, then a collection), launched after the ranking
for every row and returning at once for the rest: nothing syncs with the host.

Layouts (``G = B H``): keys ``[B, H, N, d]`` and landmarks ``[B, H, m, d]`` with any batch, head and row
strides and a unit last one (read in place); program ids put the landmark block fastest, so the programs
that share a key tile run together and read it from L2 once.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2

HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_LANDMARKS = 1024
MAX_TOPK = 1024
_LOW31 = 0x7FFFFFFF
# the candidates of a row are ranked by one in-register sort (``_select_kernel``) up to this many slots, by
# torch.topk beyond (and on CPU, where the interpreter sorts slowly); config key ``sort_max`` overrides it (the
# sort compiles without spills up to 2,048 slots on sm_90: 128 registers, 4 warps; not yet timed beyond 512)
_SORT_MAX = 512
# whether the collection pass writes each tile's candidates at once, at slots from a prefix sum of the rows' hits
# (``_collect_scan``), instead of one candidate a row and round (``_collect_tile``); config key ``scan`` overrides
# it. Off until timed in the op (at N = 65,536, m = k = 512 the collection took 889 us of the selection's 2.7 ms on
# an H100)
_SCAN = False
# whether the ranking first gathers each row's candidates from its chunks' slots into one dense list (a prefix sum
# of the chunks' counts) and sorts that, in a block sized to the expected count (about 1.25 topk plus six standard
# deviations: 256 at topk = 128) instead of to every slot (chunks x capacity: 1,024 at N = 65,536, m = k = 128,
# which took torch.topk's ~37 device ops and the glue around it); rows with more candidates than the block are
# redone by the repair kernel. Config key ``compact`` overrides it. Off until timed in the op.
_COMPACT = False
# Tests switch this on so that an index :func:`search_topk` fails to write shows up (as -1).
_POISON = False


@triton.jit
def _score_tile(r, Kg, skn, t, N, offs_d, BLOCK_N: tl.constexpr, PREC: tl.constexpr, LAST: tl.constexpr):
    """Unscaled fp32 scores ``[BLOCK_M, BLOCK_N]`` of the landmark block ``r`` against key tile t (-inf
    past N; only the LAST tile is masked). Both passes call this with the same shapes, so they compute
    the same scores."""
    keys = t * BLOCK_N + tl.arange(0, BLOCK_N)
    ptrs = Kg + keys.to(tl.int64)[:, None] * skn + offs_d[None, :]
    if LAST:
        kt = tl.load(ptrs, mask=(keys < N)[:, None], other=0.0)
    else:
        kt = tl.load(ptrs)
    s = tl.dot(r, tl.trans(kt), input_precision=PREC)  # [BLOCK_M, BLOCK_N]
    if LAST:
        s = tl.where((keys < N)[None, :], s, float("-inf"))
    return s


@triton.jit
def _landmark_block(R, g, H, srb, srh, srm, M, mb, offs_d, BLOCK_M: tl.constexpr):
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < M
    b, h = g // H, g % H
    r = tl.load(R + b * srb + h * srh + rows.to(tl.int64)[:, None] * srm + offs_d[None, :],
                mask=r_ok[:, None], other=0.0)  # [BLOCK_M, D]
    return r, rows, r_ok


@triton.jit
def _group_max_tile(s, gmax, m_i, l_i, scale, STATS: tl.constexpr):
    gmax = tl.maximum(gmax, s)
    if STATS:
        # online softmax statistics; every tile holds a valid key, so m_new is finite
        z = s * scale
        m_new = tl.maximum(m_i, tl.max(z, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m_i = m_new
    return gmax, m_i, l_i


@triton.jit
def _group_max_kernel(
    K, R, GMAX, ROW_MAX, ROW_SUM, H, skb, skh, skn, srb, srh, srm, N, M, N_TILES, CHUNKS, N_MB, scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, STATS: tl.constexpr,
):
    """Program (g, chunk c, landmark block): the maxima of groups ``c BLOCK_N + [0, BLOCK_N)`` of its rows
    over key tiles c, c + CHUNKS, ... -> ``GMAX [G, M, CHUNKS BLOCK_N]``; with STATS, the row max and sum
    of ``exp(scale s - max)`` over those tiles -> ``ROW_MAX, ROW_SUM [G, M, CHUNKS]``."""
    pid = tl.program_id(0)
    mb = pid % N_MB
    c = (pid // N_MB) % CHUNKS
    g = (pid // (N_MB * CHUNKS)).to(tl.int64)
    offs_d = tl.arange(0, D)
    r, rows, r_ok = _landmark_block(R, g, H, srb, srh, srm, M, mb, offs_d, BLOCK_M)
    Kg = K + (g // H) * skb + (g % H) * skh

    gmax = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # full tiles without masks, then the last tile (its program only)
    for t in range(c, N_TILES - 1, CHUNKS):
        s = _score_tile(r, Kg, skn, t, N, offs_d, BLOCK_N, PREC, False)
        gmax, m_i, l_i = _group_max_tile(s, gmax, m_i, l_i, scale, STATS)
    if (N_TILES - 1) % CHUNKS == c:
        s = _score_tile(r, Kg, skn, N_TILES - 1, N, offs_d, BLOCK_N, PREC, True)
        gmax, m_i, l_i = _group_max_tile(s, gmax, m_i, l_i, scale, STATS)

    row_off = g * M + rows  # [BLOCK_M]
    groups = c * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(GMAX + row_off.to(tl.int64)[:, None] * (CHUNKS * BLOCK_N) + groups[None, :], gmax,
             mask=r_ok[:, None])
    if STATS:
        tl.store(ROW_MAX + row_off * CHUNKS + c, m_i, mask=r_ok)
        tl.store(ROW_SUM + row_off * CHUNKS + c, l_i, mask=r_ok)


@triton.jit
def _ordered(x):
    """int32 keys whose signed order is the float order of ``x`` (-0.0 and +0.0 get the same key)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    # flipping the magnitude bits of negative floats makes int32 order equal float order
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _threshold_kernel(GMAX, TAU, ROWS, P, TOPK, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                      ONE_BLOCK: tl.constexpr):
    """``TAU[row]`` = the TOPK-th largest of the P group maxima of each row of ``GMAX [ROWS, P]``, lowered
    by 2^-20 (relative). Bit by bit on order-preserving int32 keys: the sign, then 31 bits from the top,
    each kept when at least TOPK keys reach it (32 counting passes; rows of at most BLOCK_P maxima
    (ONE_BLOCK) stay in registers, longer ones are read again from L1/L2 each pass)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < ROWS
    base = GMAX + rows.to(tl.int64)[:, None] * P
    cols = tl.arange(0, BLOCK_P)
    if ONE_BLOCK:
        x = _ordered(tl.load(base + cols[None, :], mask=r_ok[:, None] & (cols < P)[None, :],
                             other=float("-inf")))
    thr = tl.full([BLOCK_R], -2147483648, tl.int32)
    for b in tl.static_range(32):
        # first whether the k-th key is non-negative, then bits 30 .. 0
        if b == 0:
            cand = tl.zeros([BLOCK_R], tl.int32)
        else:
            cand = thr | (1 << (31 - b))
        if ONE_BLOCK:
            n_ge = tl.sum((x >= cand[:, None]).to(tl.int32), 1)
        else:
            n_ge = tl.zeros([BLOCK_R], tl.int32)
            for p0 in range(0, P, BLOCK_P):
                ok = r_ok[:, None] & (p0 + cols < P)[None, :]
                x = _ordered(tl.load(base + p0 + cols[None, :], mask=ok, other=float("-inf")))
                n_ge += tl.sum((x >= cand[:, None]).to(tl.int32), 1)
        thr = tl.where(n_ge >= TOPK, cand, thr)
    bits = tl.where(thr < 0, thr ^ 0x7FFFFFFF, thr)
    tau = bits.to(tl.float32, bitcast=True)
    # a guard: a product rounded differently by the collection pass cannot drop a candidate
    tl.store(TAU + rows, tau - tl.abs(tau) * 9.5367431640625e-07, mask=r_ok)


@triton.jit
def _collect_scan(s, t, tau, out, n, CAP, BLOCK_N: tl.constexpr):
    """:func:`_collect_tile` with each candidate's slot from a prefix sum of the row's hits: all of the tile's
    candidates in one masked store (in key order) instead of one row maximum a round."""
    hit = (s >= tau[:, None]).to(tl.int32)
    pos = n[:, None] + tl.cumsum(hit, 1) - hit  # [BLOCK_M, BLOCK_N] slot of each candidate
    cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
    key = (_ordered(s).to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)[None, :]
    tl.store(out[:, None] + pos, key, mask=(hit > 0) & (pos < CAP))
    return n + tl.sum(hit, 1)


@triton.jit
def _collect_tile(s, t, tau, out, n, CAP, BLOCK_N: tl.constexpr):
    """Appends the scores ``>= tau`` of tile t to the rows' slots ``out + n`` as int64 keys; returns n."""
    # one candidate per row and round, best first (lowest index among equals), as [BLOCK_M] vectors: with
    # tau near the k-th score most rows have no candidate in a tile and few more than one
    best, col = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
    hit = best >= tau
    key = (_ordered(best).to(tl.int64) << 32) | (0x7FFFFFFF - (t * BLOCK_N + col)).to(tl.int64)
    tl.store(out + n, key, mask=hit & (n < CAP))
    n += hit.to(tl.int32)
    todo = tl.sum((s >= tau[:, None]).to(tl.int32), 1)  # [BLOCK_M] candidates per row
    rounds = tl.max(todo, 0)
    if rounds > 1:
        cols = tl.arange(0, BLOCK_N)
        for i in range(1, rounds):
            s = tl.where(cols[None, :] == col[:, None], float("-inf"), s)
            best, col = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
            hit = i < todo
            key = (_ordered(best).to(tl.int64) << 32) | (0x7FFFFFFF - (t * BLOCK_N + col)).to(tl.int64)
            tl.store(out + n, key, mask=hit & (n < CAP))
            n += hit.to(tl.int32)
    return n


@triton.jit
def _collect(s, t, tau, out, n, CAP, BLOCK_N: tl.constexpr, SCAN: tl.constexpr):
    """:func:`_collect_scan` with ``SCAN``, else :func:`_collect_tile`."""
    if SCAN:
        n = _collect_scan(s, t, tau, out, n, CAP, BLOCK_N)
    else:
        n = _collect_tile(s, t, tau, out, n, CAP, BLOCK_N)
    return n


@triton.jit
def _collect_kernel(
    K, R, TAU, CNT, BUF, H, skb, skh, skn, srb, srh, srm, N, M, N_TILES, CHUNKS, N_MB, CAP,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, SCAN: tl.constexpr = False,
):
    """Program (g, chunk c, landmark block): writes every score ``>= TAU[g, row]`` of key tiles
    c, c + CHUNKS, ... as an int64 key to its own slots ``BUF [G, M, CHUNKS, CAP]`` in key order, and their
    number to ``CNT [G, M, CHUNKS]`` (keys past CAP are counted, not written)."""
    pid = tl.program_id(0)
    mb = pid % N_MB
    c = (pid // N_MB) % CHUNKS
    g = (pid // (N_MB * CHUNKS)).to(tl.int64)
    offs_d = tl.arange(0, D)
    r, rows, r_ok = _landmark_block(R, g, H, srb, srh, srm, M, mb, offs_d, BLOCK_M)
    Kg = K + (g // H) * skb + (g % H) * skh
    row_off = g * M + rows  # [BLOCK_M]
    tau = tl.load(TAU + row_off, mask=r_ok, other=float("inf"))
    out = BUF + (row_off * CHUNKS + c).to(tl.int64) * CAP  # [BLOCK_M] pointers to the rows' slots
    n = tl.zeros([BLOCK_M], tl.int32)

    for t in range(c, N_TILES - 1, CHUNKS):
        s = _score_tile(r, Kg, skn, t, N, offs_d, BLOCK_N, PREC, False)
        n = _collect(s, t, tau, out, n, CAP, BLOCK_N, SCAN)
    if (N_TILES - 1) % CHUNKS == c:
        s = _score_tile(r, Kg, skn, N_TILES - 1, N, offs_d, BLOCK_N, PREC, True)
        n = _collect(s, N_TILES - 1, tau, out, n, CAP, BLOCK_N, SCAN)
    tl.store(CNT + row_off * CHUNKS + c, n, mask=r_ok)


@triton.jit
def _select_kernel(BUF, CNT, OUT, ROWS, CHUNKS, CAP, TOPK, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK_R rows: the TOPK largest candidate keys of ``BUF [rows, CHUNKS, CAP]`` (the first ``CNT`` slots
    of each chunk hold keys), largest first, decoded to indices ``OUT [rows, TOPK]``."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = (rows < ROWS)[:, None]
    rows = rows.to(tl.int64)[:, None]
    i = tl.arange(0, BLOCK)[None, :]
    chunk = i // CAP
    ok = r_ok & (i < CHUNKS * CAP)
    n = tl.load(CNT + rows * CHUNKS + chunk, mask=ok, other=0)
    key = tl.load(BUF + rows * CHUNKS * CAP + i, mask=ok & (i - chunk * CAP < n), other=-9223372036854775808)
    key = tl.sort(key, dim=1, descending=True)
    tl.store(OUT + rows * TOPK + i, 0x7FFFFFFF - (key & 0x7FFFFFFF), mask=r_ok & (i < TOPK))


@triton.jit
def _select_compact_kernel(BUF, CNT, OUT, ROWS, CHUNKS, CAP, TOPK, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    """BLOCK_R rows: the TOPK largest candidate keys of ``BUF [rows, CHUNKS, CAP]`` (the first ``CNT`` slots of
    each chunk, at most CAP), largest first, decoded to indices ``OUT [rows, TOPK]``, with the row's candidates
    first gathered into BLOCK dense positions (position p holds slot ``p - start[c]`` of the chunk c whose
    range of positions, from the exclusive prefix sum of the counts, holds p). A row with more than BLOCK
    candidates is left to :func:`_repair_kernel`."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < ROWS
    rows = rows.to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    n = tl.load(CNT + rows[:, None] * CHUNKS + c[None, :], mask=r_ok[:, None] & (c < CHUNKS)[None, :], other=0)
    n = tl.minimum(n, CAP)  # an overflowing chunk's row is repaired: its first CAP slots stand in
    end = tl.cumsum(n, 1)  # [R, C] inclusive
    total = tl.sum(n, 1)  # [R]
    p = tl.arange(0, BLOCK)
    # the chunk of position p: how many chunks end at or before it; its start: that chunk's exclusive prefix
    before = end[:, None, :] <= p[None, :, None]  # [R, B, C]
    chunk = tl.sum(before.to(tl.int32), 2)  # [R, B]
    start = tl.sum(tl.where(c[None, None, :] == chunk[:, :, None], (end - n)[:, None, :], 0), 2)  # [R, B]
    ok = r_ok[:, None] & (p[None, :] < total[:, None])
    key = tl.load(BUF + rows[:, None] * CHUNKS * CAP + chunk.to(tl.int64) * CAP + (p[None, :] - start), mask=ok,
                  other=-9223372036854775808)
    key = tl.sort(key, dim=1, descending=True)
    tl.store(OUT + rows[:, None] * TOPK + p[None, :], 0x7FFFFFFF - (key & 0x7FFFFFFF),
             mask=r_ok[:, None] & (p < TOPK)[None, :])


@triton.jit
def _row_keys(r, Kg, skn, t, N, offs_d, rows, j, BLOCK_N: tl.constexpr, PREC: tl.constexpr, LAST: tl.constexpr):
    """Row j's scores in key tile t (the same tile products as the passes, so the same fp32 scores) as uint32
    keys in the scores' order, and which of the tile's keys exist."""
    s = _score_tile(r, Kg, skn, t, N, offs_d, BLOCK_N, PREC, LAST)
    s = tl.sum(tl.where(rows[:, None] == j, s, 0.0), 0)  # row j alone: one term per column
    keys = t * BLOCK_N + tl.arange(0, BLOCK_N)
    return (_ordered(s) ^ -2147483648).to(tl.uint32, bitcast=True), keys < N


@triton.jit
def _radix_row(r, Kg, skn, N, N_TILES, offs_d, rows, j, out, TOPK, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PREC: tl.constexpr):
    """Row j of the landmark block ``r`` (rows ``rows``): its TOPK indices, largest score first, written to
    ``out[0 : TOPK]`` (int64; the slots hold packed keys in between), with no host round trip: the TOPK-th
    largest score by a radix select (four passes over the key tiles, one 8-bit digit of the order-preserving keys
    each, from the top, counted by a 256-bin histogram of the keys that match the digits so far; the scores
    recomputed each pass), then one pass collecting the keys above it and, of those equal to it, the lowest
    indices, ranked by score, then index."""
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], tl.uint32)  # the digits chosen so far
    need = TOPK  # keys still to take among those that match the prefix
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        hist = tl.zeros([256], tl.int32)
        for t in range(N_TILES):
            key, ok = _row_keys(r, Kg, skn, t, N, offs_d, rows, j, BLOCK_N, PREC, t == N_TILES - 1)
            match = ok
            if p > 0:
                match = ok & ((key >> (shift + 8)) == prefix)
            digit = tl.where(match, (key >> shift) & 255, 0).to(tl.int32)
            hist += tl.histogram(digit, 256)
            hist -= tl.where(bins == 0, tl.sum((match == 0).to(tl.int32), 0), 0)  # the non-matching
        # keys with a digit >= b, per b; the chosen digit is the largest b with at least `need` of them
        at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        chosen = tl.sum((at_least >= need).to(tl.int32), 0) - 1
        need -= tl.sum(tl.where(bins == chosen, at_least - hist, 0), 0)
        prefix = (prefix << 8) | chosen.to(tl.uint32)
    n_out = 0
    n_eq = 0
    for t in range(N_TILES):
        key, ok = _row_keys(r, Kg, skn, t, N, offs_d, rows, j, BLOCK_N, PREC, t == N_TILES - 1)
        eq = (ok & (key == prefix)).to(tl.int32)
        take = (ok & (key > prefix)) | ((eq > 0) & (n_eq + tl.cumsum(eq, 0) - eq < need))
        pos = n_out + tl.cumsum(take.to(tl.int32), 0) - take.to(tl.int32)
        idx = t * BLOCK_N + tl.arange(0, BLOCK_N)
        packed = ((key ^ 0x80000000).to(tl.int32, bitcast=True).to(tl.int64) << 32) | \
            (0x7FFFFFFF - idx).to(tl.int64)
        tl.store(out + pos, packed, mask=take)
        n_out += tl.sum(take.to(tl.int32), 0)
        n_eq += tl.sum(eq, 0)
    tl.debug_barrier()  # the row's TOPK packed keys are in place
    i = tl.arange(0, BLOCK_K)
    packed = tl.load(out + i, mask=i < TOPK, other=-9223372036854775808)
    packed = tl.sort(packed, dim=0, descending=True)
    tl.debug_barrier()  # every slot read before any is overwritten
    tl.store(out + i, 0x7FFFFFFF - (packed & 0x7FFFFFFF), mask=i < TOPK)


@triton.jit
def _repair_kernel(
    K, R, CNT, OUT, H, skb, skh, skn, srb, srh, srm, N, M, N_TILES, CHUNKS, CAP, TOPK, MAX_TOTAL,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    PREC: tl.constexpr,
):
    """Program (g, landmark j): nothing unless one of the row's chunks had more candidates than its CAP slots
    (adversarial inputs: massive ties, or the best keys in one residue class) or the row more than the
    MAX_TOTAL its ranking took. Then the row's top-k from scratch by :func:`_radix_row`."""
    pid = tl.program_id(0)
    g = (pid // M).to(tl.int64)
    j = pid % M
    row = g * M + j
    over = 0
    total = 0
    for c0 in range(0, CHUNKS, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        n = tl.load(CNT + row * CHUNKS + cs, mask=cs < CHUNKS, other=0)
        over += tl.sum((n > CAP).to(tl.int32), 0)
        total += tl.sum(n, 0)
    if over + (total > MAX_TOTAL).to(tl.int32) > 0:
        offs_d = tl.arange(0, D)
        r, rows, _ = _landmark_block(R, g, H, srb, srh, srm, M, j // BLOCK_M, offs_d, BLOCK_M)
        Kg = K + (g // H) * skb + (g % H) * skh
        _radix_row(r, Kg, skn, N, N_TILES, offs_d, rows, j, OUT + row * TOPK, TOPK, BLOCK_N, BLOCK_K, PREC)


@triton.jit
def _count4(s, t1, t2, t3, t4, c1, c2, c3, c4):
    """Adds to c1 .. c4 how many entries of each row of ``s`` reach each of the four thresholds (one row sum of four
    8-bit fields: a tile has at most 128 columns; the top field's carry into the sign bit is undone by the mask)."""
    pk = tl.sum((s >= t1[:, None]).to(tl.int32) | ((s >= t2[:, None]).to(tl.int32) << 8) |
                ((s >= t3[:, None]).to(tl.int32) << 16) | ((s >= t4[:, None]).to(tl.int32) << 24), 1)
    return c1 + (pk & 255), c2 + ((pk >> 8) & 255), c3 + ((pk >> 16) & 255), c4 + ((pk >> 24) & 255)


@triton.jit
def _take_tile(sc, t, thr, take_row, out, n, N, BLOCK_N: tl.constexpr):
    """Writes the indices of tile t's scores ``>= thr`` of the rows ``take_row`` to ``out + n``, in index order."""
    keys = t * BLOCK_N + tl.arange(0, BLOCK_N)
    hit = ((sc >= thr[:, None]) & take_row[:, None] & (keys < N)[None, :]).to(tl.int32)
    pos = n[:, None] + tl.cumsum(hit, 1) - hit
    tl.store(out[:, None] + pos, keys.to(tl.int64)[None, :], mask=hit > 0)
    return n + tl.sum(hit, 1)


@triton.jit
def _search_kernel(
    K, R, OUT, H, skb, skh, skn, srb, srh, srm, N, M, N_TILES, N_MB, TOPK,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    SEARCH: tl.constexpr,
):
    """Program (g, landmark block): the TOPK largest scores of each of its rows in one launch, the scores
    recomputed tile by tile in every pass (never stored). A pass for each row's min and max, then a search in
    value space: a bracket ``lo < hi`` with count(s >= lo) > TOPK > count(s >= hi) and, a pass, the counts at four
    points inside it (at quarters and at hi itself in the first pass, at fifths after), until some point t has
    count(s >= t) == TOPK (that set is the top-k: ties cannot cross it); then one pass writing each row's
    ``s >= t`` indices in increasing order. Rows still open after ``SEARCH`` passes (ties across the k-th place,
    brackets down to adjacent floats) are done one at a time by :func:`_radix_row` (largest first, ties to the
    lowest index)."""
    pid = tl.program_id(0)
    mb = pid % N_MB
    g = (pid // N_MB).to(tl.int64)
    offs_d = tl.arange(0, D)
    r, rows, r_ok = _landmark_block(R, g, H, srb, srh, srm, M, mb, offs_d, BLOCK_M)
    Kg = K + (g // H) * skb + (g % H) * skh
    cols = tl.arange(0, BLOCK_N)

    lo = tl.full([BLOCK_M], float("inf"), tl.float32)
    hi = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for t in range(N_TILES - 1):
        sc = _score_tile(r, Kg, skn, t, N, offs_d, BLOCK_N, PREC, False)
        lo = tl.minimum(lo, tl.min(sc, 1))
        hi = tl.maximum(hi, tl.max(sc, 1))
    sc = _score_tile(r, Kg, skn, N_TILES - 1, N, offs_d, BLOCK_N, PREC, True)
    valid = ((N_TILES - 1) * BLOCK_N + cols < N)[None, :]
    lo = tl.minimum(lo, tl.min(tl.where(valid, sc, float("inf")), 1))
    hi = tl.maximum(hi, tl.max(sc, 1))

    # count(s >= lo) = N: with N == TOPK every key is taken
    thr = lo
    done = (r_ok == 0) | (N == TOPK)
    n_open = tl.sum((done == 0).to(tl.int32), 0)
    p = 0
    while (p < SEARCH) & (n_open > 0):
        # the first pass counts at the quarters and at hi (the row max, whose count is not known yet), later ones
        # at the fifths
        first = p == 0
        w = hi - lo
        t1 = lo + w * tl.where(first, 0.25, 0.2)
        t2 = lo + w * tl.where(first, 0.5, 0.4)
        t3 = lo + w * tl.where(first, 0.75, 0.6)
        t4 = tl.where(first, hi, lo + w * 0.8)
        c1 = tl.zeros([BLOCK_M], tl.int32)
        c2 = tl.zeros([BLOCK_M], tl.int32)
        c3 = tl.zeros([BLOCK_M], tl.int32)
        c4 = tl.zeros([BLOCK_M], tl.int32)
        for t in range(N_TILES - 1):
            c1, c2, c3, c4 = _count4(_score_tile(r, Kg, skn, t, N, offs_d, BLOCK_N, PREC, False), t1, t2, t3, t4,
                                     c1, c2, c3, c4)
        c1, c2, c3, c4 = _count4(_score_tile(r, Kg, skn, N_TILES - 1, N, offs_d, BLOCK_N, PREC, True), t1, t2, t3,
                                 t4, c1, c2, c3, c4)
        open_ = done == 0
        # an exact point closes the row (any of them: each gives the same set)
        exact = open_ & ((c1 == TOPK) | (c2 == TOPK) | (c3 == TOPK) | (c4 == TOPK))
        t_ex = tl.where(c1 == TOPK, t1, tl.where(c2 == TOPK, t2, tl.where(c3 == TOPK, t3, t4)))
        thr = tl.where(exact, t_ex, thr)
        # the bracket: lo the largest point counting more than TOPK, hi the smallest counting fewer (counts fall as
        # the points rise). A first pass with count(s >= max) > TOPK (ties at the top) leaves lo = hi = max: stuck,
        # for the radix select
        lo_n = tl.where(c1 > TOPK, t1, lo)
        lo_n = tl.where(c2 > TOPK, t2, lo_n)
        lo_n = tl.where(c3 > TOPK, t3, lo_n)
        lo_n = tl.where(c4 > TOPK, t4, lo_n)
        hi_n = tl.where(c4 < TOPK, t4, hi)
        hi_n = tl.where(c3 < TOPK, t3, hi_n)
        hi_n = tl.where(c2 < TOPK, t2, hi_n)
        hi_n = tl.where(c1 < TOPK, t1, hi_n)
        lo = tl.where(open_, lo_n, lo)
        hi = tl.where(open_, hi_n, hi)
        done = done | exact
        n_open = tl.sum((done == 0).to(tl.int32), 0)
        p += 1

    # the rows closed by the search: their keys >= thr, in increasing index order
    out = OUT + (g * M + rows).to(tl.int64) * TOPK  # [BLOCK_M] pointers to the rows' outputs
    n = tl.zeros([BLOCK_M], tl.int32)
    take_row = done & r_ok
    for t in range(N_TILES - 1):
        n = _take_tile(_score_tile(r, Kg, skn, t, N, offs_d, BLOCK_N, PREC, False), t, thr, take_row, out, n, N,
                       BLOCK_N)
    n = _take_tile(_score_tile(r, Kg, skn, N_TILES - 1, N, offs_d, BLOCK_N, PREC, True), N_TILES - 1, thr, take_row,
                   out, n, N, BLOCK_N)
    if n_open > 0:
        lanes = tl.arange(0, BLOCK_M)
        for jj in range(BLOCK_M):
            still = tl.sum(tl.where((lanes == jj) & (done == 0), 1, 0), 0)
            if still > 0:
                j = mb * BLOCK_M + jj
                _radix_row(r, Kg, skn, N, N_TILES, offs_d, rows, j, OUT + (g * M + j) * TOPK, TOPK, BLOCK_N,
                           BLOCK_K, PREC)


# search_topk's launch: 16 landmarks a program (the most programs: every pass goes through every key), 64-key tiles,
# at most ``search`` value-space passes, 4 warps
SEARCH_CONFIG = dict(block_m=16, block_n=64, search=12, num_warps=4, num_stages=3)


def search_topk(k_keys: torch.Tensor, landmarks: torch.Tensor, topk: int, config: Optional[dict] = None):
    """:func:`topk_stream`'s indices ``[B, H, m, topk]`` (int64) in one launch (:func:`_search_kernel`), for rows
    of a few thousand keys at most: every pass recomputes the row's scores. Exact with respect to the kernel's
    fp32 scores: a row is ordered by increasing index where the search closes it, largest score first where the
    radix select does (ties across the k-th place: the lowest indices win). ``config`` overrides
    :data:`SEARCH_CONFIG` (tests, benchmarks)."""
    _check(k_keys, landmarks, topk)
    B, H, N, d = k_keys.shape
    m = landmarks.shape[2]
    G = B * H
    cfg = {**SEARCH_CONFIG, **(config or {})}
    bm, bn = cfg["block_m"], cfg["block_n"]
    if bn > 128:
        raise ValueError(f"block_n must be at most 128 (8-bit counts a tile), got {bn}")
    kf, ks = _bhn(k_keys)
    rf, rs = _bhn(landmarks)
    n_tiles = cdiv(N, bn)
    n_mb = cdiv(m, bm)
    shape = (B, H, m, topk)
    idx = (torch.full(shape, -1, dtype=torch.int64, device=k_keys.device) if _POISON
           else torch.empty(shape, dtype=torch.int64, device=k_keys.device))
    launch(
        _search_kernel, (G * n_mb,),
        (kf, rf, idx, H, *ks, *rs, N, m, n_tiles, n_mb, topk),
        dict(D=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=max(16, next_power_of_2(topk)),
             PREC="ieee" if k_keys.dtype == torch.float32 else "tf32", SEARCH=cfg["search"],
             num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
    )
    return idx


def launch_config(N: int, m: int, d: int, G: int, topk: int, device: torch.device) -> dict:
    """Blocks, warps and chunking of both passes (they must match: the passes recompute the same scores).

    * ``block_m`` landmarks per program: m padded to a power of two >= 16 (``tl.dot``'s minimum) up to 128
      landmarks, 64 beyond. K is read once per landmark block (``ceil(m / block_m) N d`` elements per head
      and pass, shared in L2 by the programs of one key tile, which run together). ``num_warps`` 4, 8 at
      ``block_m`` 64 and 128 for m <= 128; 4 at m > 128 (blocks of 64: measured faster below).
    * ``block_n = 64`` keys per tile, ``num_stages = 3``.
    * ``chunks`` programs along N (tile t goes to program ``t mod chunks``): enough for ``P = chunks
      block_n >= 4 topk`` groups and, up to ``P = 2,048`` (one register block of the threshold kernel), for
      >= 4 programs per SM; at most one per tile.
    * ``capacity`` candidate slots per (row, chunk): the mean (about ``1.25 topk / chunks`` on random keys)
      plus six standard deviations of a Poisson count, so that a second collection is rare, rounded up to
      fill the power of two that the ranking sorts.

    Chosen by timing on an H200 (bf16, d = 64, Triton 3.6; scripts/bench_topk.py's sizes): 128-key tiles were
    slower in every case; at m = 256 and 512, blocks of 64 landmarks with 4 warps beat 128 with 8 by 5-17%,
    at m = 128 they lost by 40%.

    sm_90 compiles (Triton 3.8, ptxas ``--gpu-name sm_90a -v``), d = 64, bf16, block_n = 64, num_stages = 3;
    registers per thread, spills, shared memory from the compile's metadata:

    | block_m | warps | group-max pass (with stats) | collect pass |
    | --- | --- | --- | --- |
    | 16 | 4 | 64 (80) regs, 0 spills, 18 KiB | 92 regs, 0 spills, 18.5 KiB |
    | 32 | 4 | 94 (125) regs, 0 spills, 20 KiB | 128 regs, 0 spills, 21 KiB |
    | 64 | 4 | 98 (126) regs, 0 spills, 32 KiB | 111 regs, 0 spills, 32.5 KiB |
    | 64 | 8 | 56 (64) regs, 0 spills, 32 KiB | 78 regs, 0 spills, 33 KiB |
    | 128 | 8 | 95 (126) regs, 0 spills, 40 KiB | 110 regs, 0 spills, 41 KiB |

    Threshold kernel (4 warps, 4096 maxima a program): 54 regs, 0 spills; ranking sort (4 warps, 2048 keys a
    program): 96 regs, 0 spills, 4 KiB. 128-key tiles at block_m = 128 and 8 warps: 166 / 167 regs.
    """
    block_m = min(128, max(16, next_power_of_2(m))) if m <= 128 else 64
    block_n = 64
    num_warps = 8 if 64 <= block_m and m <= 128 else 4
    n_tiles = cdiv(N, block_n)
    n_mb = cdiv(m, block_m)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    # (for occupancy at most 2,048 groups a row, so that the threshold kernel keeps a row's maxima in registers
    # instead of reading them again in each of its 32 passes)
    chunks = min(n_tiles, max(cdiv(4 * topk, block_n), min(cdiv(4 * sms, G * n_mb), 2048 // block_n)))
    # candidates of one (row, chunk): about 1.25 topk / chunks on unstructured keys; room for six standard
    # deviations of a Poisson count, rounded up to fill the power of two the ranking sorts
    mean = 1.25 * topk / chunks + 1
    cap = math.ceil(mean + 6 * math.sqrt(mean) + 8)
    cap = next_power_of_2(chunks * cap) // chunks
    return dict(block_m=block_m, block_n=block_n, chunks=chunks, capacity=cap, num_warps=num_warps, num_stages=3)


def compact_block(topk: int) -> int:
    """Positions of the compacted ranking (``_COMPACT``): a row's candidates, about 1.25 topk on unstructured keys
    (:func:`launch_config`), plus six standard deviations of a Poisson count, as a power of two >= topk."""
    mean = 1.25 * topk + 1
    return max(16, next_power_of_2(topk), next_power_of_2(math.ceil(mean + 6 * math.sqrt(mean) + 8)))


def _bhn(t: torch.Tensor):
    """The tensor (copied only for a non-unit last stride) and its batch, head and row strides."""
    if t.stride(3) != 1:
        t = t.contiguous()
    return t, (t.stride(0), t.stride(1), t.stride(2))


def _check(k_keys: torch.Tensor, landmarks: torch.Tensor, topk: int) -> None:
    for name, t in (("k_keys", k_keys), ("landmarks", landmarks)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ([B, H, N, d] / [B, H, m, d]), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} dtype must be one of {DTYPES}, got {t.dtype}")
    B, H, N, d = k_keys.shape
    if landmarks.dtype != k_keys.dtype:
        raise ValueError(f"landmarks dtype {landmarks.dtype} must equal k_keys dtype {k_keys.dtype}")
    if landmarks.shape[:2] != (B, H) or landmarks.shape[3] != d:
        raise ValueError(f"landmarks must be [B={B}, H={H}, m, d={d}], got shape {tuple(landmarks.shape)}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim d must be one of {HEAD_DIMS}, got {d}")
    m = landmarks.shape[2]
    if not 1 <= m <= MAX_LANDMARKS:
        raise ValueError(f"number of landmarks m must lie in [1, {MAX_LANDMARKS}], got {m}")
    if not 1 <= topk <= min(N, MAX_TOPK):
        raise ValueError(f"topk must lie in [1, min(N={N}, {MAX_TOPK})], got {topk}")


def topk_stream(k_keys: torch.Tensor, landmarks: torch.Tensor, topk: int, *, return_stats: bool = False,
                scale: Optional[float] = None, config: Optional[dict] = None):
    """Indices ``[B, H, m, topk]`` (int64) of the ``topk`` largest unscaled scores ``landmarks_j . k_i``.

    ``k_keys [B, H, N, d]``, ``landmarks [B, H, m, d]``: same dtype (fp16, bf16 or fp32; fp32 products in
    IEEE precision), d in {32, 64, 128}, any batch/head/row strides with a unit last one, finite values.
    Each row is ordered by score, largest first; equal scores by ascending index (the lowest indices win
    ties at the k-th place). With ``return_stats``, also returns ``(row_max, row_sum) [B, H, m]`` fp32: the
    softmax statistics of ``scale R K^T`` (``scale`` defaults to ``d^-1/2``), i.e.
    ``logsumexp = row_max + log(row_sum)``. ``config`` overrides :func:`launch_config` (tests use small
    blocks). No ``m x N`` tensor is allocated and nothing syncs with the host (rows whose candidates overflow
    their slots are redone on the device).
    """
    _check(k_keys, landmarks, topk)
    B, H, N, d = k_keys.shape
    m = landmarks.shape[2]
    G = B * H
    dev = k_keys.device
    cfg = launch_config(N, m, d, G, topk, dev)
    cfg.update(config or {})
    bm, bn, chunks = cfg["block_m"], cfg["block_n"], cfg["chunks"]
    kf, ks = _bhn(k_keys)
    rf, rs = _bhn(landmarks)
    n_tiles = cdiv(N, bn)
    n_mb = cdiv(m, bm)
    if not 1 <= chunks <= n_tiles or chunks * bn < topk:
        raise ValueError(f"chunks must lie in [ceil(topk / block_n), {n_tiles}], got {chunks}")
    grid = (G * chunks * n_mb,)
    prec = "ieee" if k_keys.dtype == torch.float32 else "tf32"
    common = dict(D=d, BLOCK_M=bm, BLOCK_N=bn, PREC=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    gmax = torch.empty(G, m, chunks * bn, dtype=torch.float32, device=dev)  # [G, m, P] group maxima
    # per (row, chunk) softmax statistics, merged below; without them the kernel gets gmax as a placeholder
    row_max, row_sum = (torch.empty(G, m, chunks, dtype=torch.float32, device=dev) if return_stats else gmax
                        for _ in range(2))
    launch(
        _group_max_kernel, grid,
        (kf, rf, gmax, row_max, row_sum, H, *ks, *rs, N, m, n_tiles, chunks, n_mb,
            d ** -0.5 if scale is None else scale),
        dict(STATS=return_stats, **common),
    )
    # k distinct groups hold a score >= tau: a lower bound of each row's k-th score
    tau = torch.empty(G, m, dtype=torch.float32, device=dev)
    P = chunks * bn
    block_p = min(2048, next_power_of_2(P))
    block_r = max(1, 4096 // block_p)  # 4096 maxima per program: 32 registers a thread
    launch(
        _threshold_kernel, (cdiv(G * m, block_r),),
        (gmax, tau, G * m, P, topk),
        dict(BLOCK_R=block_r, BLOCK_P=block_p, ONE_BLOCK=P <= block_p, num_warps=4),
    )
    del gmax

    cap = max(cfg["capacity"], cdiv(topk, chunks))  # the slots hold topk candidates at least
    cnt = torch.empty(G, m, chunks, dtype=torch.int32, device=dev)
    buf = torch.empty(G, m, chunks, cap, dtype=torch.int64, device=dev)  # candidate keys per chunk
    launch(
        _collect_kernel, grid,
        (kf, rf, tau, cnt, buf, H, *ks, *rs, N, m, n_tiles, chunks, n_mb, cap),
        dict(SCAN=bool(cfg.get("scan", _SCAN)), **common),
    )
    idx = torch.empty(B, H, m, topk, dtype=torch.int64, device=dev)
    block = next_power_of_2(chunks * cap)
    max_total = chunks * cap  # candidates a row's ranking takes (beyond: repaired)
    final = cfg.get("final", "sort" if k_keys.is_cuda else "topk")
    compact = cfg.get("rank_block", compact_block(topk))
    if final == "sort" and cfg.get("compact", _COMPACT) and compact < block and compact <= cfg.get("sort_max",
                                                                                                   _SORT_MAX):
        # the row's candidates gathered into one dense list first: a block for the count expected, not the slots
        rows_per = max(1, 2048 // (compact * next_power_of_2(chunks)))
        launch(
            _select_compact_kernel, (cdiv(G * m, rows_per),),
            (buf, cnt, idx, G * m, chunks, cap, topk),
            dict(BLOCK_R=rows_per, BLOCK=compact, BLOCK_C=next_power_of_2(chunks), num_warps=4),
        )
        max_total = compact
    elif final == "sort" and block <= cfg.get("sort_max", _SORT_MAX):
        rows_per = max(1, 2048 // block)
        launch(
            _select_kernel, (cdiv(G * m, rows_per),),
            (buf, cnt, idx, G * m, chunks, cap, topk),
            dict(BLOCK_R=rows_per, BLOCK=block, num_warps=4),
        )
    else:
        empty = torch.arange(cap, device=dev) >= cnt[..., None]
        keys = buf.masked_fill_(empty, torch.iinfo(torch.int64).min).view(G, m, chunks * cap)
        best = keys.topk(topk, dim=-1, sorted=True).values  # [G, m, topk], unique keys: no ties
        idx.copy_((_LOW31 - (best & _LOW31)).view(B, H, m, topk))
    # rows whose candidates overflowed a chunk's slots (adversarial inputs only) are redone on the device
    launch(
        _repair_kernel, (G * m,),
        (kf, rf, cnt, idx, H, *ks, *rs, N, m, n_tiles, chunks, cap, topk, max_total),
        dict(D=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=max(16, next_power_of_2(topk)),
             BLOCK_C=min(1024, next_power_of_2(chunks)), PREC=prec, num_warps=cfg["num_warps"], num_stages=1),
    )
    if not return_stats:
        return idx
    big_m = row_max.amax(-1, keepdim=True)  # [G, m, 1]
    total = (row_sum * torch.exp(row_max - big_m)).sum(-1)
    return idx, (big_m.squeeze(-1).view(B, H, m), total.view(B, H, m))


# A torch custom op, so torch.compile keeps the selection as one opaque call (its launches are not traceable).
@torch.library.custom_op("mita::landmark_topk", mutates_args=())
def landmark_topk_op(k_keys: torch.Tensor, landmarks: torch.Tensor, topk: int) -> torch.Tensor:
    """:func:`topk_stream`'s indices ``[B, H, m, topk]`` (int64)."""
    return topk_stream(k_keys, landmarks, topk)


def _fake_indices(k_keys, landmarks, topk):
    """Both selection ops' output under fake tensors: ``[B, H, m, topk]`` int64."""
    B, H, m, _ = landmarks.shape
    return landmarks.new_empty(B, H, m, topk, dtype=torch.long)


landmark_topk_op.register_fake(_fake_indices)


def landmark_topk(k_keys: torch.Tensor, landmarks: torch.Tensor, topk: int) -> torch.Tensor:
    """:func:`topk_stream`'s indices: the custom op under ``torch.compile``, the launches themselves in eager mode."""
    if torch.compiler.is_compiling():
        return landmark_topk_op(k_keys, landmarks, topk)
    return topk_stream(k_keys, landmarks, topk)


@torch.library.custom_op("mita::landmark_topk_search", mutates_args=())
def landmark_topk_search_op(k_keys: torch.Tensor, landmarks: torch.Tensor, topk: int) -> torch.Tensor:
    """:func:`search_topk`'s indices ``[B, H, m, topk]`` (int64)."""
    return search_topk(k_keys, landmarks, topk)


landmark_topk_search_op.register_fake(_fake_indices)


def landmark_topk_search(k_keys: torch.Tensor, landmarks: torch.Tensor, topk: int) -> torch.Tensor:
    """:func:`search_topk`'s indices: the custom op under ``torch.compile``, the launch itself in eager mode."""
    if torch.compiler.is_compiling():
        return landmark_topk_search_op(k_keys, landmarks, topk)
    return search_topk(k_keys, landmarks, topk)
