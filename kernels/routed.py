"""Triton kernels for the routed experts of MiTA: queries grouped by expert into tiles.

The tile layout is the one of ``layout.expert_tiles``: the ``E = N r`` (query, slot) entries of
one (batch, head) are sorted by expert into ``S`` tiles of ``T`` entries that hold one expert each. A
tile's queries all attend to the same ``topk`` keys, so one program loads them once for up to
``BLOCK_M`` queries. All index tensors are int64 and every row offset is formed in int64, so
``B H N d >= 2^31`` does not overflow. Layouts (``G = B H``):

* ``q, k, v, do`` ``[B, H, N, d]`` with any batch, head and row strides and a unit last one (a ViT's views
  of its qkv projection are read in place, not copied); ``topk_idx`` ``[G, m, topk]``;
* ``slot_token``, ``slot_source`` ``[G, S T]`` (padding: ``N`` and ``E``); ``tile_expert`` ``[G, S]``;
* per entry: ``o`` ``[B, H, E, d]`` (any strides, unit last), ``dq`` ``[G, E, d]``, ``lse`` ``[G, E]``;
  per token: ``lse``, ``delta`` ``[G, N]``;
* routed dk, dv without atomics, in two launches: ``_routed_bwd_dkdv_kernel`` (expert-major: one program
  per expert and block of its keys, over all of the expert's entries) writes partial sums per (expert, slot)
  ``[G, m, topk, d]``; ``_key_reduce_kernel`` (key-major) sums them per key through the inverse index
  ``pair_order [G, m topk]``, ``key_ptr [G, N + 1]`` of ``layout.key_pairs`` into ``dk, dv [G, N, d]``, each
  element written by one program in a fixed order (deterministic).

Maths in kernels/README.md.
"""
import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2


@triton.jit
def _block_of_tile(TILE_COUNT, NUM_MB, S, BLOCK_M: tl.constexpr):
    """A block program's batch-head ``g``, tile ``t``, first position ``m0`` in the tile and the tile's entry
    count (grid: (batch-head, tile, block of ``BLOCK_M`` entries of the tile))."""
    pid = tl.program_id(0)
    g = (pid // (S * NUM_MB)).to(tl.int64)
    t = ((pid // NUM_MB) % S).to(tl.int64)
    return g, t, (pid % NUM_MB) * BLOCK_M, tl.load(TILE_COUNT + g * S + t)


@triton.jit
def _routed_fwd_kernel(
    Q, K, V, R, VS, TOPK_IDX, SLOT_TOKEN, SLOT_SOURCE, TILE_EXPERT, TILE_COUNT, O, LSE,
    H, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, soe,
    N, E, M, TOPK, T, S, NUM_MB, R_SLOTS, scale, scale_shared,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    SHARED: tl.constexpr, PRECISION: tl.constexpr, SPREC: tl.constexpr,
):
    # one program per (batch-head g, tile t, block mb of BLOCK_M entries of that tile)
    g, t, m0, count = _block_of_tile(TILE_COUNT, NUM_MB, S, BLOCK_M)
    # the tile count is static (worst case): unused tiles and blocks past a tile's entries do nothing
    if m0 >= count:
        return
    token, entry, row_ok = _tile_rows(SLOT_TOKEN, SLOT_SOURCE, g, t, m0, count, S, T, N, E, BLOCK_M)
    expert = tl.load(TILE_EXPERT + g * S + t)
    offs_d = tl.arange(0, D)
    b, h = g // H, g % H
    Kg, Vg = K + b * skb + h * skh, V + b * svb + h * svh
    q = tl.load(Q + b * sqb + h * sqh + token.to(tl.int64)[:, None] * sqn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)

    # finite start: a row whose shared block is masked out (slot > 0) must not produce exp(-inf + inf)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if SHARED:
        # the shared expert enters the softmax once per query: with the entry of slot 0
        first_slot = (entry % R_SLOTS) == 0
        for r0 in range(0, M, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < M
            lm_row = (g * M + offs_r) * D
            rt = tl.load(R + lm_row[None, :] + offs_d[:, None], mask=r_ok[None, :], other=0.0)  # [D, BLOCK_R]
            vs = tl.load(VS + lm_row[:, None] + offs_d[None, :], mask=r_ok[:, None], other=0.0)  # [BLOCK_R, D]
            s = tl.dot(q, rt, input_precision=SPREC) * scale_shared
            s = tl.where(first_slot[:, None] & r_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vs.dtype), vs, input_precision=PRECISION)
            m_i = m_new
    idx_base = TOPK_IDX + (g * M + expert) * TOPK
    for k0 in range(0, TOPK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < TOPK
        key = tl.load(idx_base + offs_k, mask=k_ok, other=0).to(tl.int64)
        kt = tl.load(Kg + (key * skn)[None, :] + offs_d[:, None], mask=k_ok[None, :], other=0.0)  # [D, BLOCK_K]
        vb = tl.load(Vg + (key * svn)[:, None] + offs_d[None, :], mask=k_ok[:, None], other=0.0)  # [BLOCK_K, D]
        s = tl.dot(q, kt, input_precision=SPREC) * scale
        # every block holds at least one valid key, so m_new stays finite
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    lse = m_i + tl.log(l_i)
    tl.store(O + b * sob + h * soh + entry.to(tl.int64)[:, None] * soe + offs_d[None, :], o, mask=row_ok[:, None])
    tl.store(LSE + g * E + entry, lse, mask=row_ok)


@triton.jit
def _routed_bwd_dq_kernel(
    Q, K, V, R, VS, DO, LSE, DELTA, TOPK_IDX, SLOT_TOKEN, SLOT_SOURCE, TILE_EXPERT, TILE_COUNT, DQ,
    H, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    N, E, M, TOPK, T, S, NUM_MB, R_SLOTS, scale, scale_shared, O, sob, soh, son,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    SHARED: tl.constexpr, PRECISION: tl.constexpr, SPREC: tl.constexpr, DELTA_HERE: tl.constexpr = False,
):
    # same grid as the forward; dq of each entry, summed over its r slots by the caller. DELTA_HERE (r = 1: each
    # token is one entry, so one program holds it): delta = rowsum(dO * O) from O read here and stored to DELTA
    # for the later kernels, instead of a launch of its own
    g, t, m0, count = _block_of_tile(TILE_COUNT, NUM_MB, S, BLOCK_M)
    # the tile count is static (worst case): unused tiles and blocks past a tile's entries do nothing
    if m0 >= count:
        return
    token, entry, row_ok = _tile_rows(SLOT_TOKEN, SLOT_SOURCE, g, t, m0, count, S, T, N, E, BLOCK_M)
    expert = tl.load(TILE_EXPERT + g * S + t)
    offs_d = tl.arange(0, D)
    b, h = g // H, g % H
    Kg, Vg = K + b * skb + h * skh, V + b * svb + h * svh
    tok = token.to(tl.int64)[:, None]
    q = tl.load(Q + b * sqb + h * sqh + tok * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + tok * sdn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + g * N + token, mask=row_ok, other=0.0)
    if DELTA_HERE:
        o = tl.load(O + b * sob + h * soh + tok * son + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + g * N + token, delta, mask=row_ok)
    else:
        delta = tl.load(DELTA + g * N + token, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, D], tl.float32)
    if SHARED:
        first_slot = row_ok & ((entry % R_SLOTS) == 0)
        for r0 in range(0, M, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < M
            lm_row = (g * M + offs_r) * D
            rt = tl.load(R + lm_row[None, :] + offs_d[:, None], mask=r_ok[None, :], other=0.0)  # [D, BLOCK_R]
            vst = tl.load(VS + lm_row[None, :] + offs_d[:, None], mask=r_ok[None, :], other=0.0)  # [D, BLOCK_R]
            s = tl.dot(q, rt, input_precision=SPREC) * scale_shared
            p = tl.exp(s - lse[:, None])
            p = tl.where(first_slot[:, None] & r_ok[None, :], p, 0.0)
            dp = tl.dot(do, vst, input_precision=SPREC)
            ds = p * (dp - delta[:, None]) * scale_shared
            dq += tl.dot(ds.to(rt.dtype), tl.trans(rt), input_precision=PRECISION)
    idx_base = TOPK_IDX + (g * M + expert) * TOPK
    for k0 in range(0, TOPK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < TOPK
        key = tl.load(idx_base + offs_k, mask=k_ok, other=0).to(tl.int64)
        kt = tl.load(Kg + (key * skn)[None, :] + offs_d[:, None], mask=k_ok[None, :], other=0.0)  # [D, BLOCK_K]
        vt = tl.load(Vg + (key * svn)[None, :] + offs_d[:, None], mask=k_ok[None, :], other=0.0)  # [D, BLOCK_K]
        s = tl.dot(q, kt, input_precision=SPREC) * scale
        # probabilities of the ONE softmax over [shared ; all routed slots], via the query's final lse
        p = tl.exp(s - lse[:, None])
        p = tl.where(row_ok[:, None] & k_ok[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=SPREC)
        ds = p * (dp - delta[:, None]) * scale
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)

    tl.store(DQ + (g * E + entry)[:, None] * D + offs_d[None, :], dq, mask=row_ok[:, None])


@triton.jit
def _routed_fwd_t_kernel(
    Q, K, V, R, VS, TOPK_IDX, SLOT_TOKEN, SLOT_SOURCE, TILE_EXPERT, TILE_COUNT, O, LSE,
    H, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, soe,
    N, E, M, TOPK, T, S, NUM_MB, R_SLOTS, scale, scale_shared,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    SHARED: tl.constexpr, PRECISION: tl.constexpr, SPREC: tl.constexpr,
):
    """:func:`_routed_fwd_kernel` with every tile transposed: keys (or landmarks) as rows, the block's entries as
    columns (``S^T = K Q^T``, ``O^T += V^T P^T``, the softmax statistics reduced over axis 0). With blocks of fewer
    than 64 entries (short tiles: ``N r / m < 64``) the products then have ``BLOCK_K``, ``BLOCK_R`` or ``D`` >= 64
    rows, as Hopper's warp-group MMA needs, where ``[BLOCK_M, .]`` products fall back to the older MMA."""
    g, t, m0, count = _block_of_tile(TILE_COUNT, NUM_MB, S, BLOCK_M)
    # the tile count is static (worst case): unused tiles and blocks past a tile's entries do nothing
    if m0 >= count:
        return
    token, entry, row_ok = _tile_rows(SLOT_TOKEN, SLOT_SOURCE, g, t, m0, count, S, T, N, E, BLOCK_M)
    expert = tl.load(TILE_EXPERT + g * S + t)
    offs_d = tl.arange(0, D)
    b, h = g // H, g % H
    Kg, Vg = K + b * skb + h * skh, V + b * svb + h * svh
    qt = tl.load(Q + b * sqb + h * sqh + token.to(tl.int64)[None, :] * sqn + offs_d[:, None],
                 mask=row_ok[None, :], other=0.0)  # [D, BLOCK_M]

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([D, BLOCK_M], tl.float32)
    if SHARED:
        first_slot = (entry % R_SLOTS) == 0
        for r0 in range(0, M, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < M
            lm_row = (g * M + offs_r) * D
            rr = tl.load(R + lm_row[:, None] + offs_d[None, :], mask=r_ok[:, None], other=0.0)  # [BLOCK_R, D]
            vst = tl.load(VS + lm_row[None, :] + offs_d[:, None], mask=r_ok[None, :], other=0.0)  # [D, BLOCK_R]
            s = tl.dot(rr, qt, input_precision=SPREC) * scale_shared  # [BLOCK_R, BLOCK_M]
            s = tl.where(r_ok[:, None] & first_slot[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[None, :])
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha[None, :] + tl.dot(vst, p.to(vst.dtype), input_precision=PRECISION)
            m_i = m_new
    idx_base = TOPK_IDX + (g * M + expert) * TOPK
    for k0 in range(0, TOPK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < TOPK
        key = tl.load(idx_base + offs_k, mask=k_ok, other=0).to(tl.int64)
        kb = tl.load(Kg + (key * skn)[:, None] + offs_d[None, :], mask=k_ok[:, None], other=0.0)  # [BLOCK_K, D]
        vt = tl.load(Vg + (key * svn)[None, :] + offs_d[:, None], mask=k_ok[None, :], other=0.0)  # [D, BLOCK_K]
        s = tl.dot(kb, qt, input_precision=SPREC) * scale  # [BLOCK_K, BLOCK_M]
        s = tl.where(k_ok[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha[None, :] + tl.dot(vt, p.to(vt.dtype), input_precision=PRECISION)
        m_i = m_new

    o = acc / l_i[None, :]
    lse = m_i + tl.log(l_i)
    tl.store(O + b * sob + h * soh + entry.to(tl.int64)[None, :] * soe + offs_d[:, None], o, mask=row_ok[None, :])
    tl.store(LSE + g * E + entry, lse, mask=row_ok)


@triton.jit
def _routed_bwd_dq_t_kernel(
    Q, K, V, R, VS, DO, LSE, DELTA, TOPK_IDX, SLOT_TOKEN, SLOT_SOURCE, TILE_EXPERT, TILE_COUNT, DQ,
    H, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    N, E, M, TOPK, T, S, NUM_MB, R_SLOTS, scale, scale_shared,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    SHARED: tl.constexpr, PRECISION: tl.constexpr, SPREC: tl.constexpr,
):
    """:func:`_routed_bwd_dq_kernel` transposed as :func:`_routed_fwd_t_kernel` (``dQ^T += K^T dS^T``)."""
    g, t, m0, count = _block_of_tile(TILE_COUNT, NUM_MB, S, BLOCK_M)
    # the tile count is static (worst case): unused tiles and blocks past a tile's entries do nothing
    if m0 >= count:
        return
    token, entry, row_ok = _tile_rows(SLOT_TOKEN, SLOT_SOURCE, g, t, m0, count, S, T, N, E, BLOCK_M)
    expert = tl.load(TILE_EXPERT + g * S + t)
    offs_d = tl.arange(0, D)
    b, h = g // H, g % H
    Kg, Vg = K + b * skb + h * skh, V + b * svb + h * svh
    tok = token.to(tl.int64)[None, :]
    qt = tl.load(Q + b * sqb + h * sqh + tok * sqn + offs_d[:, None], mask=row_ok[None, :], other=0.0)  # [D, BM]
    dot_ = tl.load(DO + b * sdb + h * sdh + tok * sdn + offs_d[:, None], mask=row_ok[None, :], other=0.0)
    lse = tl.load(LSE + g * N + token, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + g * N + token, mask=row_ok, other=0.0)

    dq = tl.zeros([D, BLOCK_M], tl.float32)
    if SHARED:
        first_slot = row_ok & ((entry % R_SLOTS) == 0)
        for r0 in range(0, M, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < M
            lm_row = (g * M + offs_r) * D
            rr = tl.load(R + lm_row[:, None] + offs_d[None, :], mask=r_ok[:, None], other=0.0)  # [BLOCK_R, D]
            vs = tl.load(VS + lm_row[:, None] + offs_d[None, :], mask=r_ok[:, None], other=0.0)  # [BLOCK_R, D]
            s = tl.dot(rr, qt, input_precision=SPREC) * scale_shared  # [BLOCK_R, BLOCK_M]
            p = tl.exp(s - lse[None, :])
            p = tl.where(r_ok[:, None] & first_slot[None, :], p, 0.0)
            dp = tl.dot(vs, dot_, input_precision=SPREC)
            ds = p * (dp - delta[None, :]) * scale_shared
            dq += tl.dot(tl.trans(rr), ds.to(rr.dtype), input_precision=PRECISION)
    idx_base = TOPK_IDX + (g * M + expert) * TOPK
    for k0 in range(0, TOPK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < TOPK
        key = tl.load(idx_base + offs_k, mask=k_ok, other=0).to(tl.int64)
        kb = tl.load(Kg + (key * skn)[:, None] + offs_d[None, :], mask=k_ok[:, None], other=0.0)  # [BLOCK_K, D]
        vb = tl.load(Vg + (key * svn)[:, None] + offs_d[None, :], mask=k_ok[:, None], other=0.0)  # [BLOCK_K, D]
        s = tl.dot(kb, qt, input_precision=SPREC) * scale  # [BLOCK_K, BLOCK_M]
        p = tl.exp(s - lse[None, :])
        p = tl.where(k_ok[:, None] & row_ok[None, :], p, 0.0)
        dp = tl.dot(vb, dot_, input_precision=SPREC)
        ds = p * (dp - delta[None, :]) * scale
        dq += tl.dot(tl.trans(kb), ds.to(kb.dtype), input_precision=PRECISION)

    tl.store(DQ + (g * E + entry)[None, :] * D + offs_d[:, None], dq, mask=row_ok[None, :])


@triton.jit
def _shared_tiles(R, VS, g, M, D: tl.constexpr, MP: tl.constexpr, SHARED: tl.constexpr, DT: tl.constexpr):
    """The head's landmarks and shared values ``[MP, D]`` (rows past M zero; zeros without the shared expert)."""
    offs_r = tl.arange(0, MP)
    r_ok = offs_r < M
    if SHARED:
        lm_row = (g * M + offs_r)[:, None] * D + tl.arange(0, D)[None, :]
        rr = tl.load(R + lm_row, mask=r_ok[:, None], other=0.0)
        vs = tl.load(VS + lm_row, mask=r_ok[:, None], other=0.0)
    else:
        rr = tl.zeros([MP, D], DT)
        vs = tl.zeros([MP, D], DT)
    return rr, vs, r_ok


@triton.jit
def _expert_tiles(Kh, Vh, TOPK_IDX, g, expert, skn, svn, M, TOPK, D: tl.constexpr, KP: tl.constexpr,
                  ROUTED: tl.constexpr, DT: tl.constexpr):
    """The expert's keys and values ``[KP, D]`` (rows past TOPK zero; zeros with topk = 0)."""
    offs_d = tl.arange(0, D)
    offs_k = tl.arange(0, KP)
    k_ok = offs_k < TOPK
    if ROUTED:
        key = tl.load(TOPK_IDX + (g * M + expert) * TOPK + offs_k, mask=k_ok, other=0).to(tl.int64)
        kb = tl.load(Kh + (key * skn)[:, None] + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        vb = tl.load(Vh + (key * svn)[:, None] + offs_d[None, :], mask=k_ok[:, None], other=0.0)
    else:
        kb = tl.zeros([KP, D], DT)
        vb = tl.zeros([KP, D], DT)
    return kb, vb, k_ok


@triton.jit
def _tile_rows(SLOT_TOKEN, SLOT_SOURCE, g, t, m0, count, S, T, N, E, BLOCK_M: tl.constexpr):
    """Tokens and entries of the tile's slots ``m0 ..`` (padding: N and E past the tile's count)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    in_tile = offs_m < count
    slot = g * S * T + t * T + offs_m
    token = tl.load(SLOT_TOKEN + slot, mask=in_tile, other=N)
    entry = tl.load(SLOT_SOURCE + slot, mask=in_tile, other=E)
    return token, entry, entry < E


@triton.jit
def _resident_group(TILE_COUNT, H, S, NUM_TP, TPP: tl.constexpr):
    """A resident program's batch-head ``g`` (and ``b``, ``h``), its first tile ``t0`` and whether that tile is
    unused (the used tiles come first, so the program then has nothing to do)."""
    pid = tl.program_id(0)
    g = (pid // NUM_TP).to(tl.int64)
    t0 = (pid % NUM_TP) * TPP
    return g, g // H, g % H, t0, tl.load(TILE_COUNT + g * S + t0) == 0


@triton.jit
def _resident_tile(TILE_COUNT, TILE_EXPERT, Kh, Vh, TOPK_IDX, g, t, skn, svn, M, S, TOPK, D: tl.constexpr,
                   KP: tl.constexpr, ROUTED: tl.constexpr, DT: tl.constexpr):
    """Tile t's entry count and its expert's resident keys and values."""
    kb, vb, k_ok = _expert_tiles(Kh, Vh, TOPK_IDX, g, tl.load(TILE_EXPERT + g * S + t), skn, svn, M, TOPK, D, KP,
                                 ROUTED, DT)
    return tl.load(TILE_COUNT + g * S + t), kb, vb, k_ok


@triton.jit
def _resident_fwd_block_t(Qg, Og, LSE, rr, vs, r_ok, kb, vb, k_ok, token, entry, row_ok, g, E, sqn, soe, R_SLOTS,
                          scale, scale_shared, D: tl.constexpr, BLOCK_M: tl.constexpr, SHARED: tl.constexpr,
                          ROUTED: tl.constexpr, PRECISION: tl.constexpr, SPREC: tl.constexpr, DT: tl.constexpr):
    """One block of a resident forward program, transposed: logits ``[MP, BLOCK_M]`` and ``[KP, BLOCK_M]``,
    ``O^T [D, BLOCK_M]``."""
    offs_d = tl.arange(0, D)
    qt = tl.load(Qg + token.to(tl.int64)[None, :] * sqn + offs_d[:, None], mask=row_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([D, BLOCK_M], tl.float32)
    if SHARED:
        z = tl.dot(rr, qt, input_precision=SPREC) * scale_shared  # [MP, BLOCK_M]
        z = tl.where(r_ok[:, None] & ((entry % R_SLOTS) == 0)[None, :], z, float("-inf"))
        m_i = tl.maximum(m_i, tl.max(z, 0))
        ps = tl.exp(z - m_i[None, :])
        l_i = tl.sum(ps, 0)
        acc = tl.dot(tl.trans(vs), ps.to(DT), input_precision=PRECISION)
    if ROUTED:
        s = tl.dot(kb, qt, input_precision=SPREC) * scale  # [KP, BLOCK_M]
        s = tl.where(k_ok[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = tl.dot(tl.trans(vb), p.to(DT), acc * alpha[None, :], input_precision=PRECISION)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows
    tl.store(Og + entry.to(tl.int64)[None, :] * soe + offs_d[:, None], acc / l_i[None, :], mask=row_ok[None, :])
    tl.store(LSE + g * E + entry, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _resident_dq_block_t(Qg, DOg, LSE, DELTA, DQ, rr, vs, r_ok, kb, vb, k_ok, token, entry, row_ok, g, N, E, sqn, sdn,
                         R_SLOTS, scale, scale_shared, D: tl.constexpr, BLOCK_M: tl.constexpr, SHARED: tl.constexpr,
                         ROUTED: tl.constexpr, PRECISION: tl.constexpr, SPREC: tl.constexpr, DT: tl.constexpr):
    """One block of a resident dq program, transposed: ``dQ^T [D, BLOCK_M]``."""
    offs_d = tl.arange(0, D)
    tok = token.to(tl.int64)[None, :]
    qt = tl.load(Qg + tok * sqn + offs_d[:, None], mask=row_ok[None, :], other=0.0)  # [D, BLOCK_M]
    dot_ = tl.load(DOg + tok * sdn + offs_d[:, None], mask=row_ok[None, :], other=0.0)
    lse = tl.load(LSE + g * N + token, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + g * N + token, mask=row_ok, other=0.0)
    dq = tl.zeros([D, BLOCK_M], tl.float32)
    if ROUTED:
        s = tl.dot(kb, qt, input_precision=SPREC) * scale  # [KP, BLOCK_M]
        p = tl.where(k_ok[:, None] & row_ok[None, :], tl.exp(s - lse[None, :]), 0.0)
        dp = tl.dot(vb, dot_, input_precision=SPREC)
        ds = p * (dp - delta[None, :]) * scale
        dq = tl.dot(tl.trans(kb), ds.to(DT), dq, input_precision=PRECISION)
    if SHARED:
        z = tl.dot(rr, qt, input_precision=SPREC) * scale_shared  # [MP, BLOCK_M]
        first = row_ok & ((entry % R_SLOTS) == 0)
        ps = tl.where(r_ok[:, None] & first[None, :], tl.exp(z - lse[None, :]), 0.0)
        dps = tl.dot(vs, dot_, input_precision=SPREC)
        dss = ps * (dps - delta[None, :]) * scale_shared
        dq = tl.dot(tl.trans(rr), dss.to(DT), dq, input_precision=PRECISION)
    tl.store(DQ + (g * E + entry)[None, :] * D + offs_d[:, None], dq, mask=row_ok[None, :])


@triton.jit
def _routed_fwd_resident_kernel(
    Q, K, V, R, VS, TOPK_IDX, SLOT_TOKEN, SLOT_SOURCE, TILE_EXPERT, TILE_COUNT, O, LSE,
    H, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, soe,
    N, E, M, TOPK, T, S, NUM_TP, R_SLOTS, scale, scale_shared,
    D: tl.constexpr, BLOCK_M: tl.constexpr, KP: tl.constexpr, MP: tl.constexpr, TPP: tl.constexpr,
    SHARED: tl.constexpr, ROUTED: tl.constexpr, PRECISION: tl.constexpr, SPREC: tl.constexpr,
    TR: tl.constexpr = False,
):
    # one program per (batch-head g, group of TPP consecutive tiles): the head's landmarks and shared values, then
    # each tile's expert keys and values, are loaded once and stay on chip (shared memory) while the program goes
    # through the tile's entries in blocks of BLOCK_M; every logit of an entry is in the two tiles [BLOCK_M, MP]
    # and [BLOCK_M, KP]. TR (ROUTED_TRANSPOSED, blocks of fewer than 64 entries): the tiles transposed, [MP, BLOCK_M]
    # and [KP, BLOCK_M], so that every product has 64 rows or more (warp-group MMA), as _routed_fwd_t_kernel
    DT = Q.dtype.element_ty
    g, b, h, t0, unused = _resident_group(TILE_COUNT, H, S, NUM_TP, TPP)
    if unused:
        return
    rr, vs, r_ok = _shared_tiles(R, VS, g, M, D, MP, SHARED, DT)
    offs_d = tl.arange(0, D)
    Qg, Og = Q + b * sqb + h * sqh, O + b * sob + h * soh
    Kh, Vh = K + b * skb + h * skh, V + b * svb + h * svh
    for t in range(t0, tl.minimum(t0 + TPP, S)):
        count, kb, vb, k_ok = _resident_tile(TILE_COUNT, TILE_EXPERT, Kh, Vh, TOPK_IDX, g, t, skn, svn, M, S, TOPK,
                                             D, KP, ROUTED, DT)
        for m0 in range(0, count, BLOCK_M):
            token, entry, row_ok = _tile_rows(SLOT_TOKEN, SLOT_SOURCE, g, t, m0, count, S, T, N, E, BLOCK_M)
            if TR:
                _resident_fwd_block_t(Qg, Og, LSE, rr, vs, r_ok, kb, vb, k_ok, token, entry, row_ok, g, E, sqn, soe,
                                      R_SLOTS, scale, scale_shared, D, BLOCK_M, SHARED, ROUTED, PRECISION, SPREC, DT)
            else:
                q = tl.load(Qg + token.to(tl.int64)[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
                # shared logits first (slot 0 only), then the routed ones, with one rescale between
                m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
                l_i = tl.zeros([BLOCK_M], tl.float32)
                acc = tl.zeros([BLOCK_M, D], tl.float32)
                if SHARED:
                    z = tl.dot(q, tl.trans(rr), input_precision=SPREC) * scale_shared  # [BLOCK_M, MP]
                    z = tl.where(((entry % R_SLOTS) == 0)[:, None] & r_ok[None, :], z, float("-inf"))
                    m_i = tl.maximum(m_i, tl.max(z, 1))
                    ps = tl.exp(z - m_i[:, None])
                    l_i = tl.sum(ps, 1)
                    acc = tl.dot(ps.to(DT), vs, input_precision=PRECISION)
                if ROUTED:
                    s = tl.dot(q, tl.trans(kb), input_precision=SPREC) * scale  # [BLOCK_M, KP]
                    s = tl.where(k_ok[None, :], s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    alpha = tl.exp(m_i - m_new)
                    p = tl.exp(s - m_new[:, None])
                    l_i = l_i * alpha + tl.sum(p, 1)
                    acc = tl.dot(p.to(DT), vb, acc * alpha[:, None], input_precision=PRECISION)
                    m_i = m_new
                l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows
                tl.store(Og + entry.to(tl.int64)[:, None] * soe + offs_d[None, :], acc / l_i[:, None],
                         mask=row_ok[:, None])
                tl.store(LSE + g * E + entry, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _routed_bwd_dq_resident_kernel(
    Q, K, V, R, VS, DO, LSE, DELTA, TOPK_IDX, SLOT_TOKEN, SLOT_SOURCE, TILE_EXPERT, TILE_COUNT, DQ,
    H, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    N, E, M, TOPK, T, S, NUM_TP, R_SLOTS, scale, scale_shared,
    D: tl.constexpr, BLOCK_M: tl.constexpr, KP: tl.constexpr, MP: tl.constexpr, TPP: tl.constexpr,
    SHARED: tl.constexpr, ROUTED: tl.constexpr, PRECISION: tl.constexpr, SPREC: tl.constexpr,
    TR: tl.constexpr = False,
):
    # the grid and the resident tiles of the forward above; dq of each entry, summed over its r slots by the caller
    # (TR: transposed, as the forward)
    DT = Q.dtype.element_ty
    g, b, h, t0, unused = _resident_group(TILE_COUNT, H, S, NUM_TP, TPP)
    if unused:
        return
    rr, vs, r_ok = _shared_tiles(R, VS, g, M, D, MP, SHARED, DT)
    offs_d = tl.arange(0, D)
    Qg, DOg = Q + b * sqb + h * sqh, DO + b * sdb + h * sdh
    Kh, Vh = K + b * skb + h * skh, V + b * svb + h * svh
    for t in range(t0, tl.minimum(t0 + TPP, S)):
        count, kb, vb, k_ok = _resident_tile(TILE_COUNT, TILE_EXPERT, Kh, Vh, TOPK_IDX, g, t, skn, svn, M, S, TOPK,
                                             D, KP, ROUTED, DT)
        for m0 in range(0, count, BLOCK_M):
            token, entry, row_ok = _tile_rows(SLOT_TOKEN, SLOT_SOURCE, g, t, m0, count, S, T, N, E, BLOCK_M)
            if TR:
                _resident_dq_block_t(Qg, DOg, LSE, DELTA, DQ, rr, vs, r_ok, kb, vb, k_ok, token, entry, row_ok, g, N,
                                     E, sqn, sdn, R_SLOTS, scale, scale_shared, D, BLOCK_M, SHARED, ROUTED, PRECISION,
                                     SPREC, DT)
            else:
                tok = token.to(tl.int64)[:, None]
                q = tl.load(Qg + tok * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
                do = tl.load(DOg + tok * sdn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
                lse = tl.load(LSE + g * N + token, mask=row_ok, other=0.0)
                delta = tl.load(DELTA + g * N + token, mask=row_ok, other=0.0)
                dq = tl.zeros([BLOCK_M, D], tl.float32)
                if ROUTED:
                    s = tl.dot(q, tl.trans(kb), input_precision=SPREC) * scale  # [BLOCK_M, KP]
                    p = tl.where(row_ok[:, None] & k_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
                    dp = tl.dot(do, tl.trans(vb), input_precision=SPREC)
                    ds = p * (dp - delta[:, None]) * scale
                    dq = tl.dot(ds.to(DT), kb, dq, input_precision=PRECISION)
                if SHARED:
                    z = tl.dot(q, tl.trans(rr), input_precision=SPREC) * scale_shared  # [BLOCK_M, MP]
                    first = row_ok & ((entry % R_SLOTS) == 0)
                    ps = tl.where(first[:, None] & r_ok[None, :], tl.exp(z - lse[:, None]), 0.0)
                    dps = tl.dot(do, tl.trans(vs), input_precision=SPREC)
                    dss = ps * (dps - delta[:, None]) * scale_shared
                    dq = tl.dot(dss.to(DT), rr, dq, input_precision=PRECISION)
                tl.store(DQ + (g * E + entry)[:, None] * D + offs_d[None, :], dq, mask=row_ok[:, None])


@triton.jit
def _dkdv_expert(
    Q, K, V, DO, LSE, DELTA, TOPK_IDX, SLOT_TOKEN, EXPERT_START, EXPERT_COUNT, DKP, DVP,
    g, e_in, kblk, H, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    N, M, TOPK, NUM_SLOTS, E0, MC, scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, SPREC: tl.constexpr,
    DO_DK: tl.constexpr, DO_DV: tl.constexpr,
):
    """The partial dk, dv of key block ``kblk`` of expert ``E0 + e_in`` over all of the expert's entries."""
    e = E0 + e_in
    count = tl.load(EXPERT_COUNT + g * M + e)
    first = tl.load(EXPERT_START + g * M + e)  # the expert's entries fill slots first .. first + count - 1
    offs_k = kblk * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    k_ok = offs_k < TOPK
    key = tl.load(TOPK_IDX + (g * M + e) * TOPK + offs_k, mask=k_ok, other=0).to(tl.int64)
    b, h = g // H, g % H
    Qg, DOg = Q + b * sqb + h * sqh, DO + b * sdb + h * sdh
    kblock = tl.load(K + b * skb + h * skh + (key * skn)[:, None] + offs_d[None, :], mask=k_ok[:, None],
                     other=0.0)  # [BLOCK_K, D]
    if DO_DK:
        vb = tl.load(V + b * svb + h * svh + (key * svn)[:, None] + offs_d[None, :], mask=k_ok[:, None],
                     other=0.0)

    dk = tl.zeros([BLOCK_K, D], tl.float32)
    dv = tl.zeros([BLOCK_K, D], tl.float32)
    for m0 in range(0, count, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < count
        token = tl.load(SLOT_TOKEN + g * NUM_SLOTS + first + offs_m, mask=row_ok, other=0)
        tok = token.to(tl.int64)[:, None]
        q = tl.load(Qg + tok * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
        do = tl.load(DOg + tok * sdn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + g * N + token, mask=row_ok, other=0.0)
        st = tl.dot(kblock, tl.trans(q), input_precision=SPREC) * scale  # [BLOCK_K, BLOCK_M]
        pt = tl.exp(st - lse[None, :])
        pt = tl.where(k_ok[:, None] & row_ok[None, :], pt, 0.0)
        if DO_DV:
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        if DO_DK:
            delta = tl.load(DELTA + g * N + token, mask=row_ok, other=0.0)
            dpt = tl.dot(vb, tl.trans(do), input_precision=SPREC)
            dst = pt * (dpt - delta[None, :]) * scale
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)

    # partials [G, MC, topk, D], one row per (expert, slot) of the chunk; stored in the buffer's dtype
    part = ((g * MC + e_in) * TOPK + offs_k)[:, None] * D + offs_d[None, :]
    if DO_DK:
        tl.store(DKP + part, dk, mask=k_ok[:, None])
    if DO_DV:
        tl.store(DVP + part, dv, mask=k_ok[:, None])


@triton.jit
def _routed_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, TOPK_IDX, SLOT_TOKEN, EXPERT_START, EXPERT_COUNT, DKP, DVP,
    H, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    N, M, TOPK, NUM_SLOTS, NUM_KB, E0, MC, scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, SPREC: tl.constexpr,
    DO_DK: tl.constexpr, DO_DV: tl.constexpr, EPP: tl.constexpr = 1,
):
    # one program per (batch-head g, group of EPP experts of the chunk E0 .. E0 + MC - 1, block kb of their keys),
    # key blocks fastest so that the programs of one expert run together and share its queries in L2; loops over
    # ALL of each expert's entries and writes the expert's partial dk, dv of its slots once (an empty expert
    # writes zeros); DO_DK / DO_DV choose which (both, or one per launch where the two passes share one buffer).
    # EPP > 1 where experts hold few queries (fewer, longer programs)
    pid = tl.program_id(0)
    num_eg = tl.cdiv(MC, EPP)
    g = (pid // (num_eg * NUM_KB)).to(tl.int64)
    eg = ((pid // NUM_KB) % num_eg).to(tl.int64)
    kblk = pid % NUM_KB
    if EPP == 1:
        _dkdv_expert(Q, K, V, DO, LSE, DELTA, TOPK_IDX, SLOT_TOKEN, EXPERT_START, EXPERT_COUNT, DKP, DVP,
                     g, eg, kblk, H, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, N, M, TOPK, NUM_SLOTS,
                     E0, MC, scale, D, BLOCK_M, BLOCK_K, PRECISION, SPREC, DO_DK, DO_DV)
    else:
        for e_in in range(eg * EPP, tl.minimum(eg * EPP + EPP, MC)):
            _dkdv_expert(Q, K, V, DO, LSE, DELTA, TOPK_IDX, SLOT_TOKEN, EXPERT_START, EXPERT_COUNT, DKP, DVP,
                         g, e_in, kblk, H, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, N, M, TOPK,
                         NUM_SLOTS, E0, MC, scale, D, BLOCK_M, BLOCK_K, PRECISION, SPREC, DO_DK, DO_DV)


@triton.jit
def _key_reduce_kernel(
    DKP, DVP, PAIR_ORDER, KEY_PTR, DK, DV,
    N, MK, NUM_NB, P0, PC,
    D: tl.constexpr, BLOCK_N: tl.constexpr, TWO: tl.constexpr, ADD: tl.constexpr,
):
    # one program per (batch-head g, block of BLOCK_N keys): each key sums the partial rows of the
    # (expert, slot) pairs that hold it, in the inverse index's order (fixed: deterministic), in float32,
    # and writes its dk, dv row once (zero for a key no expert holds); dk alone unless TWO. The partials are
    # those of the pairs P0 .. P0 + PC - 1 (a chunk of experts); ADD: onto what earlier chunks wrote, and only the
    # rows of keys that some pair of this chunk holds (the others keep their value: no read, no write)
    pid = tl.program_id(0)
    g = (pid // NUM_NB).to(tl.int64)
    offs_n = (pid % NUM_NB) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    n_ok = offs_n < N
    ptr = KEY_PTR + g * (N + 1) + offs_n
    lo = tl.load(ptr, mask=n_ok, other=0)
    cnt = tl.load(ptr + 1, mask=n_ok, other=0) - lo
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    held = n_ok & (n_ok == 0)  # [BLOCK_N] False
    for c in range(0, tl.max(cnt, 0)):
        pair = tl.load(PAIR_ORDER + g * MK + lo + c, mask=c < cnt, other=P0 - 1) - P0
        ok = (pair >= 0) & (pair < PC)
        held = held | ok
        row = (g * PC + pair)[:, None] * D + offs_d[None, :]
        dk += tl.load(DKP + row, mask=ok[:, None], other=0.0).to(tl.float32)
        if TWO:
            dv += tl.load(DVP + row, mask=ok[:, None], other=0.0).to(tl.float32)
    out = (g * N + offs_n)[:, None] * D + offs_d[None, :]
    write = n_ok
    if ADD:
        write = n_ok & held
        dk += tl.load(DK + out, mask=write[:, None], other=0.0).to(tl.float32)
        if TWO:
            dv += tl.load(DV + out, mask=write[:, None], other=0.0).to(tl.float32)
    tl.store(DK + out, dk, mask=write[:, None])
    if TWO:
        tl.store(DV + out, dv, mask=write[:, None])


@triton.jit
def _shared_bwd_kernel(
    Q, R, VS, DO, LSE, DELTA, DR, DVS,
    H, sqb, sqh, sqn, sdb, sdh, sdn,
    N, M, NUM_RB, NUM_CH, CHUNK, scale_shared,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, SPREC: tl.constexpr,
):
    # one program per (batch-head g, landmark block rb, chunk ch of queries); the landmarks play the keys
    # of FlashAttention's dk/dv pass: dR = c sum_n dS_n q_n, dVs = sum_n P_n dO_n (partial per chunk)
    pid = tl.program_id(0)
    g = (pid // (NUM_RB * NUM_CH)).to(tl.int64)
    rb = (pid // NUM_CH) % NUM_RB
    ch = pid % NUM_CH
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D)
    r_ok = offs_r < M
    lm_row = (g * M + offs_r)[:, None] * D + offs_d[None, :]
    rb_tile = tl.load(R + lm_row, mask=r_ok[:, None], other=0.0)  # [BLOCK_R, D]
    vs_tile = tl.load(VS + lm_row, mask=r_ok[:, None], other=0.0)

    dr = tl.zeros([BLOCK_R, D], tl.float32)
    dvs = tl.zeros([BLOCK_R, D], tl.float32)
    b, h = g // H, g % H
    Qg, DOg = Q + b * sqb + h * sqh, DO + b * sdb + h * sdh
    start = ch * CHUNK
    for n0 in range(start, start + CHUNK, BLOCK_M):
        offs_n = n0 + tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        tok = offs_n.to(tl.int64)[:, None]
        q = tl.load(Qg + tok * sqn + offs_d[None, :], mask=n_ok[:, None], other=0.0)  # [BLOCK_M, D]
        do = tl.load(DOg + tok * sdn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        lse = tl.load(LSE + g * N + offs_n, mask=n_ok, other=0.0)
        delta = tl.load(DELTA + g * N + offs_n, mask=n_ok, other=0.0)
        st = tl.dot(rb_tile, tl.trans(q), input_precision=SPREC) * scale_shared  # [BLOCK_R, BLOCK_M]
        pt = tl.exp(st - lse[None, :])
        pt = tl.where(r_ok[:, None] & n_ok[None, :], pt, 0.0)
        dvs += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(vs_tile, tl.trans(do), input_precision=SPREC)
        dst = pt * (dpt - delta[None, :]) * scale_shared
        dr += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)

    out = ((g * NUM_CH + ch) * M + offs_r)[:, None] * D + offs_d[None, :]
    tl.store(DR + out, dr, mask=r_ok[:, None])
    tl.store(DVS + out, dvs, mask=r_ok[:, None])


@triton.jit
def _token_program(H, N, D: tl.constexpr, BN: tl.constexpr):
    """Head ``g`` (batch ``b``, head ``h``) and token rows of a (g, block of BN tokens) program."""
    g = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    return g, g // H, g % H, rows, rows < N, tl.arange(0, D)


@triton.jit
def _delta_kernel(DO, O, DELTA, H, N, s_db, s_dh, s_dn, s_ob, s_oh, s_on, D: tl.constexpr, BN: tl.constexpr):
    """``delta [G, N] = rowsum(dO * O)`` (fp32) from both read by their strides."""
    g, b, h, rows, ok, offs_d = _token_program(H, N, D, BN)
    do = tl.load(DO + b * s_db + h * s_dh + rows[:, None] * s_dn + offs_d[None, :], mask=ok[:, None], other=0.0)
    o = tl.load(O + b * s_ob + h * s_oh + rows[:, None] * s_on + offs_d[None, :], mask=ok[:, None], other=0.0)
    tl.store(DELTA + g * N + rows, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=ok)


@triton.jit
def _merge_slots_kernel(O_R, LSE_R, OUT, LSE, H, N, s_ob, s_oh, s_on, R: tl.constexpr, D: tl.constexpr,
                        BN: tl.constexpr):
    """The r entries of each token, each normalised on its own with its (natural) log-normaliser, merged into
    the token's output and lse: ``lse = logsumexp_j lse_j``, ``out = sum_j exp(lse_j - lse) o_j``."""
    g, b, h, rows, ok, offs_d = _token_program(H, N, D, BN)
    mx = tl.full([BN], float("-inf"), tl.float32)
    for j in tl.static_range(R):
        mx = tl.maximum(mx, tl.load(LSE_R + g * N * R + rows * R + j, mask=ok, other=0.0))
    total = tl.zeros([BN], tl.float32)
    acc = tl.zeros([BN, D], tl.float32)
    for j in tl.static_range(R):
        w = tl.exp(tl.load(LSE_R + g * N * R + rows * R + j, mask=ok, other=0.0) - mx)
        total += w
        o = tl.load(O_R + (g * N * R + rows * R + j)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        acc += w[:, None] * o
    tl.store(OUT + b * s_ob + h * s_oh + rows[:, None] * s_on + offs_d[None, :], acc / total[:, None],
             mask=ok[:, None])
    tl.store(LSE + g * N + rows, mx + tl.log(total), mask=ok)


def merge_slots(o_r: torch.Tensor, lse_r: torch.Tensor, out: torch.Tensor, r: int) -> torch.Tensor:
    """Writes into ``out [B, H, N, d]`` (any strides, unit last) the merge of ``o_r [B, H, N r, d]`` (fp32,
    contiguous) by ``lse_r [B H, N r]``; returns the tokens' ``lse [B H, N]``. One launch."""
    B, H, N, D = out.shape
    lse = torch.empty(B * H, N, dtype=torch.float32, device=out.device)
    bn = 64 if D <= 64 else 32
    launch(
        _merge_slots_kernel, (B * H, cdiv(N, bn)),
        (o_r, lse_r, out, lse, H, N, *_bhn(out)),
        dict(R=r, D=D, BN=bn),
    )
    return lse


def row_delta(do: torch.Tensor, out: torch.Tensor, delta=None) -> torch.Tensor:
    """``rowsum(dO * O)`` per token, ``[B H, N]`` fp32, in one launch (``[B, H, N, d]`` inputs, any strides
    with a unit last one), into ``delta`` if given."""
    B, H, N, D = do.shape
    if delta is None:
        delta = torch.empty(B * H, N, dtype=torch.float32, device=do.device)
    bn = 64 if D <= 64 else 32
    launch(_delta_kernel, (B * H, cdiv(N, bn)), (do, out, delta, H, N, *_bhn(do), *_bhn(out)), dict(D=D, BN=bn))
    return delta


@triton.jit
def _sum_chunks_kernel(A, B, OUT, CA, CB, SIZE, scale_a, scale_b, BLOCK: tl.constexpr, CC: tl.constexpr,
                       HAS_B: tl.constexpr):
    """``OUT[g] = scale_a sum_c A[g, c] (+ scale_b sum_c B[g, c])`` over ``SIZE`` contiguous elements a chunk,
    summed in float32: ``CC`` running sums (chunks ``c``, ``c + CC``, ..., in order) added as a tree at the end, a
    fixed order, so the sums are deterministic; written in OUT's dtype."""
    g = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < SIZE
    cc = tl.arange(0, CC)
    acc = tl.zeros([CC, BLOCK], tl.float32)  # one running sum per chunk lane: the lanes meet once, at the end
    for c0 in range(0, CA, CC):
        c = c0 + cc
        acc += tl.load(A + ((g * CA + c) * SIZE)[:, None] + offs[None, :], mask=(c < CA)[:, None] & ok[None, :],
                       other=0.0).to(tl.float32)
    total = tl.sum(acc, 0) * scale_a
    if HAS_B:
        acc_b = tl.zeros([CC, BLOCK], tl.float32)
        for c0 in range(0, CB, CC):
            c = c0 + cc
            acc_b += tl.load(B + ((g * CB + c) * SIZE)[:, None] + offs[None, :],
                             mask=(c < CB)[:, None] & ok[None, :], other=0.0).to(tl.float32)
        total += tl.sum(acc_b, 0) * scale_b
    tl.store(OUT + g * SIZE + offs, total.to(OUT.dtype.element_ty), mask=ok)


def sum_chunks(a: torch.Tensor, dtype: torch.dtype, scale_a: float = 1.0, b=None, scale_b: float = 1.0):
    """``scale_a a.sum(1) + scale_b b.sum(1)`` in one launch, as ``dtype``: ``a [G, Ca, rows, d]`` and
    ``b [G, Cb, rows, d]`` (optional) contiguous partial sums -> ``[G, rows, d]``. Programs take 256 elements
    of a head's ``rows d`` and 8 chunks a step (16 loads in flight a thread): the partials are a few MB spread
    over dozens of chunks, so what sets the pace is how many loads are in flight, not bandwidth (one program
    per 32 rows, summing its chunks one load at a time, took 36 us for 8 MB at N = 16,384, m = k = 64, H100)."""
    G, ca, rows, D = a.shape
    out = torch.empty(G, rows, D, dtype=dtype, device=a.device)
    size = rows * D
    block = min(256, next_power_of_2(size))
    launch(
        _sum_chunks_kernel, (G, cdiv(size, block)),
        (a, a if b is None else b, out, ca, 0 if b is None else b.shape[1], size, float(scale_a), float(scale_b)),
        dict(BLOCK=block, CC=8, HAS_B=b is not None, num_warps=4 if block >= 256 else 1),
    )
    return out


def _block(n: int, head_dim: int, itemsize: int) -> int:
    """Block of queries or keys: a power of two >= 16 (tl.dot's minimum), one operand tile <= 16 KiB."""
    cap = max(16, min(64, 16384 // (head_dim * itemsize)))
    return max(16, min(cap, next_power_of_2(max(n, 1))))


def _reduce_block(head_dim: int) -> int:
    """Keys per program of the key-major reduction: two [BLOCK_N, d] float32 sums of 2,048 elements each
    (4 warps: 72 registers at d = 64 on sm_90, no spills; 64 keys took 138 and spilled with 16-bit partials)."""
    return 2048 // head_dim


def resident_config(T: int, m: int, topk: int, head_dim: int, itemsize: int, shared: bool):
    """Launch config of the resident routed kernels (``_routed_fwd_resident_kernel``, ``_routed_bwd_dq_resident_
    kernel``: one program per tile, the expert's ``[KP, d]`` keys and values and the head's ``[MP, d]`` landmarks
    and shared values loaded once; ``TPP`` consecutive tiles a program where tiles are short, the landmarks and
    shared values then loaded once for all of them), or None where they do not fit: fp16/bf16, ``KP``, ``MP``
    (topk and m padded to powers of two >= 16) up to 128 and ``d (KP + MP) <= 16,384`` (the four tiles in at
    most 64 KiB). Queries in blocks of 64 while ``KP, MP <= 64`` and ``d <= 64``, else 32 at d = 64 and 16
    otherwise; 4 warps, 3 stages. Compiled for sm_90 (Triton 3.8, ``ptxas -v``, bf16), every config this returns
    (d in {32, 64, 128}, KP, MP in {16, .., 128}, shared expert on or off) spills at most 20 bytes, most none: d = 64,
    KP = MP = 64: forward 212 registers and 58 KiB of shared memory, dq 255 and 84 KiB; KP = MP = 128: 168 / 78 KiB
    and 243 / 116 KiB. Not yet timed on a GPU."""
    kp = max(16, next_power_of_2(topk))
    mp = max(16, next_power_of_2(m)) if shared else 16
    if max(kp, mp) > 128 or head_dim * ((kp if topk else 0) + (mp if shared else 0)) > 16384 or itemsize > 2:
        return None
    block_m = 64 if max(kp, mp) <= 64 and head_dim <= 64 else (32 if head_dim == 64 else 16)
    # short tiles (few queries an expert) go several to a program: about 256 entries a program
    return dict(BLOCK_M=min(block_m, max(16, next_power_of_2(T))), KP=kp, MP=mp, TPP=max(1, min(8, 256 // max(T, 1))),
                SHARED=shared, ROUTED=topk > 0, num_warps=4, num_stages=3)


def routed_blocks(T: int, topk: int, head_dim: int, itemsize: int, wide: bool):
    """``(block_m, block_k, warps_q, warps_kv)`` of the block-program routed kernels: queries (forward, dq; warps
    ``warps_q``) and an expert's keys (dk/dv; warps ``warps_kv``) in blocks of :func:`_block`, 4 warps. ``wide``
    (``ROUTED_RESIDENT``'s cases beyond the resident kernels, fp16/bf16, d <= 64): blocks of 128 queries where
    tiles hold 128 entries or more and of 128 keys where experts hold 128 or more, with 8 warps: each block
    re-reads the expert's keys (forward, dq) or queries (dk/dv) from L2 half as often; at d = 128 the dk/dv
    programs take 8 warps. Compiled for sm_90 (Triton 3.8, ``ptxas -v``, bf16), no spills: d = 64 forward 135
    registers, dq 151, dk/dv 228 (172 dk alone, 156 dv alone); d = 128 dk/dv 254. Not yet timed on a GPU."""
    block_m, block_k = _block(T, head_dim, itemsize), _block(topk, head_dim, itemsize)
    warps_q = warps_kv = 4
    if wide and itemsize == 2 and head_dim <= 64:
        if T >= 128:
            block_m, warps_q = 128, 8
        if topk >= 128:
            block_k, warps_kv = 128, 8
    elif wide and itemsize == 2 and head_dim == 128 and block_k == 64:
        warps_kv = 8  # two [64, 128] fp32 sums: 72 B of spills a thread with 4 warps, none with 8
    return block_m, block_k, warps_q, warps_kv


def transposed(block_m: int, block_k: int, block_r: int, head_dim: int, itemsize: int, shared: bool,
               topk: int) -> bool:
    """Whether the forward and dq run transposed (``ROUTED_TRANSPOSED``; :func:`_routed_fwd_t_kernel`, and the
    resident kernels' ``TR``): blocks of fewer than 64 entries (short tiles, ``N r / m < 64``: ViT lengths) whose
    key, landmark and head-dim sides have 64 rows or more, fp16/bf16. Compiled for sm_90, every product of those
    kernels is then a warp-group MMA, where the untransposed ones at 32-entry blocks fall back to the older MMA
    instructions."""
    from . import ROUTED_TRANSPOSED

    return (ROUTED_TRANSPOSED and block_m < 64 and head_dim >= 64 and itemsize == 2
            and (topk == 0 or block_k >= 64) and (not shared or block_r >= 64))


def experts_per_program(T: int) -> int:
    """Experts a dk/dv program takes with ``ROUTED_RESIDENT`` (one without): experts of few queries (``T`` a tile,
    ``N r / m``) go several to a program, about 256 entries a program."""
    return max(1, min(8, 256 // max(T, 1)))


def _resident(T, M, topk, D, itemsize, shared, forward=False):
    """The resident kernels' config (None where they do not take the case or ``ROUTED_RESIDENT`` is off) and the
    block-program kernels' blocks and warps (:func:`routed_blocks`); ``forward``: the forward's (``ROUTED_WIDE``
    widens its blocks, not dq's)."""
    from . import ROUTED_RESIDENT, ROUTED_WIDE

    res = resident_config(T, M, topk, D, itemsize, shared) if ROUTED_RESIDENT else None
    block_m, block_k, warps_q, warps_kv = routed_blocks(T, topk, D, itemsize, ROUTED_RESIDENT)
    if forward and ROUTED_WIDE and not ROUTED_RESIDENT and itemsize == 2 and D <= 64 and T >= 128:
        # 128 entries, 8 warps; keys stay in blocks of 64 (128 x 64 forward: 123 registers, two programs an SM;
        # 128 x 128: 190, one; sm_90, Triton 3.8)
        block_m, warps_q = 128, 8
    return res, (block_m, block_k, warps_q, warps_kv)


def dkdv_plan(dtype, N: int, m: int, topk: int, one_pass: bool = False, two_buffers: bool = False):
    """``(dtype, buffers, chunk)`` of the per-(expert, slot) partial dk, dv ``[G, chunk, topk, d]``.

    While ``4 m topk <= N`` (the paper's budgets, ``m k ~ N / 4``) they are float32, two buffers, one pass over
    all m experts: at most the bytes of one 16-bit dk. Beyond, the experts go in chunks of ``chunk`` with
    ``chunk topk <= N`` (one expert at least), each with one buffer in the input dtype (each partial rounded
    once, then summed in float32) shared by two passes, dv then dk (recomputing the probabilities: 5 products
    instead of 4), whose key-major sums add onto the previous chunks': the partials never take more than
    one dk (``max(N, topk) d`` per head), whatever ``m topk``. ``one_pass`` (``ROUTED_RESIDENT``; where
    ``2 topk <= N``): instead, chunks of ``N / (2 topk)`` experts with two input-dtype buffers filled in one pass
    (4 products, each query block read once): twice the chunks for the same launches and the same partial
    memory (not yet timed). ``two_buffers`` (``DKDV_TWO_BUFFERS``): chunks of ``N / topk`` experts as by default,
    each with two input-dtype buffers filled in one pass: half the launches and 4 products instead of 5, for
    twice the partial memory (up to two 16-bit dk's)."""
    if 4 * m * topk <= N:
        return torch.float32, 2, m
    if two_buffers:
        return dtype, 2, max(1, min(m, N // topk))
    if one_pass and 2 * topk <= N:
        return dtype, 2, max(1, min(m, N // (2 * topk)))
    return dtype, 1, max(1, min(m, N // topk))


def _precision(dtype, allow_tf32: bool) -> str:
    return "tf32" if allow_tf32 or dtype.itemsize < 4 else "ieee"


def _score_precision(dtype, allow_tf32: bool) -> str:
    """Precision of the dots that become logits (q.k) or meet ``delta`` in ``dp - delta``: with TF32 allowed,
    fp32 inputs take three TF32 passes there, since one pass's 2^-11 rounding, amplified by exp and by the
    cancellation in ``dp - delta``, put dq at 2.2e-3 relative error; the value sums keep one pass."""
    if dtype.itemsize < 4:
        return "tf32"  # ignored for 16-bit inputs
    return "tf32x3" if allow_tf32 else "ieee"


def _bhn(t: torch.Tensor):
    """Batch, head and row strides of a ``[B, H, rows, d]`` tensor (its last stride must be 1)."""
    if t.dim() != 4 or t.stride(3) != 1:
        raise ValueError(f"expected a [B, H, rows, d] tensor with unit last stride, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")
    return t.stride(0), t.stride(1), t.stride(2)


def routed_forward(q, k, v, landmarks, shared_v, topk_idx, lay, r, scale, scale_shared, o, lse, allow_tf32=False):
    """One softmax per entry over [shared (slot 0 only) ; its expert's keys]: ``o [B, H, E, d]``, ``lse [G, E]``.

    ``q, k, v`` ``[B, H, N, d]`` with any batch, head and row strides and a unit last one (a ViT's qkv views
    are read in place); ``landmarks`` and ``shared_v`` ``[G, m, d]`` (``None`` without the shared expert) and
    ``topk_idx`` ``[G, m, topk]`` contiguous; ``lay`` from ``layout.expert_tiles`` over ``E = N r`` entries; ``o``
    (any float dtype, any strides with a unit last one) and ``lse`` (float32, contiguous) are written for
    every entry.
    """
    B, H, N, D = q.shape
    G = B * H
    M, topk = topk_idx.shape[1], topk_idx.shape[2]
    E = o.shape[2]
    S, T = lay["num_tiles"], lay["tile"]
    block_r = _block(M, D, q.element_size())
    shared = landmarks is not None
    res, (block_m, block_k, warps_q, _) = _resident(T, M, topk, D, q.element_size(), shared, forward=True)
    # the block and resident kernels take the same arguments but for their program count (blocks or tile groups)
    head = (q, k, v, landmarks if shared else q, shared_v if shared else q, topk_idx, lay["slot_token"],
            lay["slot_source"], lay["tile_expert"], lay["tile_count"], o, lse, H, *_bhn(q), *_bhn(k), *_bhn(v),
            *_bhn(o), N, E, M, topk, T, S)
    tail = (r, scale, scale_shared)
    precisions = dict(PRECISION=_precision(q.dtype, allow_tf32), SPREC=_score_precision(q.dtype, allow_tf32))
    if res is not None:
        num_tp = cdiv(S, res["TPP"])
        launch(
            _routed_fwd_resident_kernel, (G * num_tp,), (*head, num_tp, *tail),
            dict(res, D=D, TR=transposed(res["BLOCK_M"], res["KP"], res["MP"], D, q.element_size(), shared, topk),
                 **precisions),
        )
        return
    num_mb = cdiv(T, block_m)
    launch(
        _routed_fwd_t_kernel if transposed(block_m, block_k, block_r, D, q.element_size(), shared, topk)
        else _routed_fwd_kernel, (G * S * num_mb,), (*head, num_mb, *tail),
        dict(D=D, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, SHARED=shared, num_warps=warps_q, num_stages=2,
             **precisions),
    )


def routed_backward(q, k, v, landmarks, shared_v, do, lse, delta, topk_idx, lay, r, scale, scale_shared,
                    dq, dk=None, dv=None, pairs=None, partials=(), allow_tf32=False, reduce_keys=True, out=None):
    """Gradients given the final ``lse`` and ``delta = rowsum(dO * O)`` per token ``[G, N]``; with ``out``
    (``[B, H, N, d]``, any strides with a unit last one) ``delta`` is a buffer this fills first: in the dq
    kernel where each token is one entry (r = 1, block programs), else by :func:`row_delta`.

    ``q, k, v, do`` ``[B, H, N, d]``, any strides with a unit last one. Writes ``dq [G, E, d]`` per entry
    (routed and shared parts) and, with ``topk > 0``, the routed ``dk, dv [G, N, d]`` (contiguous, any float
    dtype, every element written): the expert-major kernel writes each (expert, slot)'s partial sums into
    ``partials`` (``[G, chunk, topk, d]`` buffers, two or one, for all m experts or chunks of them:
    :func:`dkdv_plan`), then the key-major reduction sums them per key through
    ``pairs = layout.key_pairs(topk_idx, N)`` (adding onto the earlier chunks'). ``reduce_keys=False`` (the
    one-pass plan only) leaves the partials unsummed and dk, dv unwritten, for the shared values' key pass to sum
    with its own (``shared.backward(..., key_pairs=...)``: dk, dv written once, one launch fewer).

    Launch configuration: dq and dk/dv take ``BLOCK_M``, ``BLOCK_K`` of :func:`_block` (64 at d = 64, 16-bit),
    4 warps, 2 stages; the reduction ``2048 / d`` keys, 4 warps. Compiled for sm_90 (Triton 3.8, ``ptxas -v``,
    d = 64, bf16): ``_routed_bwd_dkdv_kernel`` 232 registers with dk and dv (float32 partials), 172 with dk
    alone, 160 with dv alone (bf16 partials), no spills, 48.5 KiB shared memory (40 KiB for dv alone; the
    atomic kernel it replaced: 255 registers, 24 bytes spilled); ``_key_reduce_kernel`` 72 registers for two
    float32 tensors, 48 for one bf16, no spills, no shared memory.
    """
    B, H, N, D = q.shape
    G = B * H
    M, topk = topk_idx.shape[1], topk_idx.shape[2]
    E = dq.shape[1]
    S, T = lay["num_tiles"], lay["tile"]
    block_r = _block(M, D, q.element_size())
    precision = _precision(q.dtype, allow_tf32)
    sprec = _score_precision(q.dtype, allow_tf32)
    shared = landmarks is not None
    res, (block_m, block_k, warps_q, warps_kv) = _resident(T, M, topk, D, q.element_size(), shared)
    # dq: the block and resident kernels take the same arguments but for their program count
    head = (q, k, v, landmarks if shared else q, shared_v if shared else q, do, lse, delta, topk_idx,
            lay["slot_token"], lay["slot_source"], lay["tile_expert"], lay["tile_count"], dq, H, *_bhn(q), *_bhn(k),
            *_bhn(v), *_bhn(do), N, E, M, topk, T, S)
    tail = (r, scale, scale_shared)
    trans = res is None and transposed(block_m, block_k, block_r, D, q.element_size(), shared, topk)
    delta_here = out is not None and r == 1 and res is None and not trans
    if out is not None and not delta_here:
        row_delta(do, out, delta)
    if res is not None:
        num_tp = cdiv(S, res["TPP"])
        launch(
            _routed_bwd_dq_resident_kernel, (G * num_tp,), (*head, num_tp, *tail),
            dict(res, D=D, PRECISION=precision, SPREC=sprec,
                 TR=transposed(res["BLOCK_M"], res["KP"], res["MP"], D, q.element_size(), shared, topk)),
        )
    else:
        num_mb = cdiv(T, block_m)
        if trans:
            launch(
                _routed_bwd_dq_t_kernel, (G * S * num_mb,), (*head, num_mb, *tail),
                dict(D=D, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, SHARED=shared, PRECISION=precision,
                     SPREC=sprec, num_warps=warps_q, num_stages=2),
            )
        else:
            o_args = (out, *_bhn(out)) if delta_here else (do, 0, 0, 0)  # O: read only with DELTA_HERE
            launch(
                _routed_bwd_dq_kernel, (G * S * num_mb,), (*head, num_mb, *tail, *o_args),
                dict(D=D, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, SHARED=shared, PRECISION=precision,
                     SPREC=sprec, DELTA_HERE=delta_here, num_warps=warps_q, num_stages=2),
            )
    if topk == 0:
        return
    # the dk/dv programs take the queries in blocks of the tile's size (at most 64) and the keys in blocks of block_k
    block_m = _block(T, D, q.element_size())
    pair_order, key_ptr = pairs
    block_n = _reduce_block(D)
    num_nb = cdiv(N, block_n)
    chunk = partials[0].shape[1]  # experts a pass takes (all m, or chunks of them: dkdv_plan)
    from . import DKDV_WIDE, ROUTED_RESIDENT

    # the dk/dv programs' shapes: ROUTED_RESIDENT's, or those alone with DKDV_WIDE (ROUTED_WIDE is the forward's
    # and dq's)
    _, block_k, _, warps_kv = routed_blocks(T, topk, D, q.element_size(), ROUTED_RESIDENT or DKDV_WIDE)
    epp = experts_per_program(T) if res is not None or DKDV_WIDE else 1
    num_kb = cdiv(topk, block_k)
    for e0 in range(0, M, chunk):
        mc = min(chunk, M - e0)
        # one pass into two buffers, or two passes (dv, then dk) through one
        passes = [(True, True, partials[0], partials[1], dk, dv)] if len(partials) == 2 else [
            (False, True, partials[0], partials[0], dv, dv), (True, False, partials[0], partials[0], dk, dk)]
        for do_dk, do_dv, part_a, part_b, out_a, out_b in passes:
            launch(
                _routed_bwd_dkdv_kernel, (G * cdiv(mc, epp) * num_kb,),
                (q, k, v, do, lse, delta, topk_idx, lay["slot_token"], lay["expert_start"], lay["expert_count"],
                    part_a, part_b, H, *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(do), N, M, topk, S * T, num_kb, e0, mc,
                    scale),
                dict(D=D, BLOCK_M=block_m, BLOCK_K=block_k, PRECISION=precision, SPREC=sprec, DO_DK=do_dk,
                    DO_DV=do_dv, EPP=epp, num_warps=warps_kv, num_stages=2),
            )
            if not reduce_keys:  # the caller sums the partials per key (shared.backward's key_pairs)
                if len(partials) != 2 or chunk != M:
                    raise ValueError("reduce_keys=False needs the one-pass plan: two partial buffers of every expert")
                continue
            two = do_dk and do_dv
            # the reduction's first tensor is the pass's only one when it computes one
            first, first_out = (part_a, out_a) if do_dk else (part_b, out_b)
            launch(
                _key_reduce_kernel, (G * num_nb,),
                (first, part_b, pair_order, key_ptr, first_out, out_b, N, M * topk, num_nb, e0 * topk, mc * topk),
                dict(D=D, BLOCK_N=block_n, TWO=two, ADD=e0 > 0, num_warps=4),
            )


def shared_backward(q, landmarks, shared_v, do, lse, delta, scale_shared, allow_tf32=False):
    """Landmark-side gradients of the shared logits, as float32 partial sums over chunks of the queries:
    ``dR [G, C, m, d]`` (``c dS^T Q``) and ``dVs [G, C, m, d]`` (``P^T dO``), summed by :func:`sum_chunks`;
    ``q, do`` ``[B, H, N, d]``, any strides with a unit last one."""
    B, H, N, D = q.shape
    G = B * H
    M = landmarks.shape[1]
    block_m, block_r = _block(N, D, q.element_size()), _block(M, D, q.element_size())
    warps = 4
    from . import SHARED_RESIDENT

    if SHARED_RESIDENT and M >= 128 and D <= 64 and q.element_size() == 2:
        # 128 landmarks a program, 8 warps: each query block is read by half as many programs (216 registers,
        # 65 KiB of shared memory, no spills on sm_90; 4 warps would spill 632 B). Not yet timed.
        block_r, warps = 128, 8
    num_rb = cdiv(M, block_r)
    # enough programs to fill the GPU: split the queries into chunks, each writing a partial sum; the two float32
    # partials [G, chunks, m, d] stay within half of one 16-bit [G, N, d] input (chunks <= N / 8m)
    num_ch = max(1, min(cdiv(N, 4 * block_m), cdiv(512, G * num_rb), N // (8 * M)))
    chunk = cdiv(cdiv(N, num_ch), block_m) * block_m
    num_ch = cdiv(N, chunk)
    dr = q.new_empty((G, num_ch, M, D), dtype=torch.float32)
    dvs = q.new_empty((G, num_ch, M, D), dtype=torch.float32)
    launch(
        _shared_bwd_kernel, (G * num_rb * num_ch,),
        (q, landmarks, shared_v, do, lse, delta, dr, dvs, H, *_bhn(q), *_bhn(do), N, M, num_rb, num_ch, chunk,
            scale_shared),
        dict(D=D, BLOCK_M=block_m, BLOCK_R=block_r, PRECISION=_precision(q.dtype, allow_tf32),
            SPREC=_score_precision(q.dtype, allow_tf32), num_warps=warps, num_stages=2),
    )
    return dr, dvs
