"""Triton kernels for the routed experts of MiTA: queries grouped by expert into tiles.

The tile layout is the one of ``mita.functional._expert_tiles``: the ``E = N r`` (query, slot) entries of
one (batch, head) are sorted by expert into ``S`` tiles of ``T`` entries that hold one expert each. A
tile's queries all attend to the same ``topk`` keys, so one program loads them once for up to
``BLOCK_M`` queries. All index tensors are int64 and every row offset is formed in int64, so
``B H N d >= 2^31`` does not overflow. Flattened layouts (``G = B H``):

* ``q, k, v, do`` ``[G, N, d]``; ``topk_idx`` ``[G, m, topk]``;
* ``slot_token``, ``slot_source`` ``[G, S T]`` (padding: ``N`` and ``E``); ``tile_expert`` ``[G, S]``;
* per entry: ``o``, ``dq`` ``[G, E, d]``, ``lse`` ``[G, E]``; per token: ``lse``, ``delta`` ``[G, N]``;
* per tile: ``dk``, ``dv`` ``[G, S, topk, d]`` (summed into keys by the caller, no atomics here).

Maths in kernels/README.md.
"""
import triton
import triton.language as tl


@triton.jit
def _routed_fwd_kernel(
    Q, K, V, TOPK_IDX, SLOT_TOKEN, SLOT_SOURCE, TILE_EXPERT, O, LSE,
    N, E, M, TOPK, T, S, NUM_MB, scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    # one program per (batch-head g, tile t, block mb of BLOCK_M entries of that tile)
    pid = tl.program_id(0)
    g = (pid // (S * NUM_MB)).to(tl.int64)
    t = ((pid // NUM_MB) % S).to(tl.int64)
    mb = pid % NUM_MB
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # position inside the tile
    offs_d = tl.arange(0, D)
    in_tile = offs_m < T
    slot = g * S * T + t * T + offs_m
    token = tl.load(SLOT_TOKEN + slot, mask=in_tile, other=N)
    entry = tl.load(SLOT_SOURCE + slot, mask=in_tile, other=E)
    row_ok = entry < E
    expert = tl.load(TILE_EXPERT + g * S + t)
    q = tl.load(Q + (g * N + token)[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    idx_base = TOPK_IDX + (g * M + expert) * TOPK
    for k0 in range(0, TOPK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < TOPK
        key = tl.load(idx_base + offs_k, mask=k_ok, other=0)
        key_row = (g * N + key) * D
        kt = tl.load(K + key_row[None, :] + offs_d[:, None], mask=k_ok[None, :], other=0.0)  # [D, BLOCK_K]
        vb = tl.load(V + key_row[:, None] + offs_d[None, :], mask=k_ok[:, None], other=0.0)  # [BLOCK_K, D]
        s = tl.dot(q, kt, input_precision=PRECISION) * scale
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
    tl.store(O + (g * E + entry)[:, None] * D + offs_d[None, :], o, mask=row_ok[:, None])
    tl.store(LSE + g * E + entry, lse, mask=row_ok)


@triton.jit
def _routed_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, TOPK_IDX, SLOT_TOKEN, SLOT_SOURCE, TILE_EXPERT, DQ,
    N, E, M, TOPK, T, S, NUM_MB, scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    # same grid as the forward; dq of each entry, summed over its r slots by the caller
    pid = tl.program_id(0)
    g = (pid // (S * NUM_MB)).to(tl.int64)
    t = ((pid // NUM_MB) % S).to(tl.int64)
    mb = pid % NUM_MB
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    in_tile = offs_m < T
    slot = g * S * T + t * T + offs_m
    token = tl.load(SLOT_TOKEN + slot, mask=in_tile, other=N)
    entry = tl.load(SLOT_SOURCE + slot, mask=in_tile, other=E)
    row_ok = entry < E
    expert = tl.load(TILE_EXPERT + g * S + t)
    row = (g * N + token)[:, None] * D + offs_d[None, :]
    q = tl.load(Q + row, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + row, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + g * N + token, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + g * N + token, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, D], tl.float32)
    idx_base = TOPK_IDX + (g * M + expert) * TOPK
    for k0 in range(0, TOPK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < TOPK
        key = tl.load(idx_base + offs_k, mask=k_ok, other=0)
        key_row = (g * N + key) * D
        kt = tl.load(K + key_row[None, :] + offs_d[:, None], mask=k_ok[None, :], other=0.0)  # [D, BLOCK_K]
        vt = tl.load(V + key_row[None, :] + offs_d[:, None], mask=k_ok[None, :], other=0.0)  # [D, BLOCK_K]
        s = tl.dot(q, kt, input_precision=PRECISION) * scale
        # probabilities of the ONE softmax over [shared ; all routed slots], via the query's final lse
        p = tl.exp(s - lse[:, None])
        p = tl.where(row_ok[:, None] & k_ok[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None]) * scale
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)

    tl.store(DQ + (g * E + entry)[:, None] * D + offs_d[None, :], dq, mask=row_ok[:, None])


@triton.jit
def _routed_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, TOPK_IDX, SLOT_TOKEN, SLOT_SOURCE, TILE_EXPERT, DK, DV,
    N, E, M, TOPK, T, S, NUM_KB, scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    # one program per (batch-head g, tile t, block kb of the expert's keys); loops over the tile's queries
    pid = tl.program_id(0)
    g = (pid // (S * NUM_KB)).to(tl.int64)
    t = ((pid // NUM_KB) % S).to(tl.int64)
    kblk = pid % NUM_KB
    offs_k = kblk * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    k_ok = offs_k < TOPK
    expert = tl.load(TILE_EXPERT + g * S + t)
    key = tl.load(TOPK_IDX + (g * M + expert) * TOPK + offs_k, mask=k_ok, other=0)
    key_row = (g * N + key)[:, None] * D + offs_d[None, :]
    kblock = tl.load(K + key_row, mask=k_ok[:, None], other=0.0)  # [BLOCK_K, D]
    vb = tl.load(V + key_row, mask=k_ok[:, None], other=0.0)

    dk = tl.zeros([BLOCK_K, D], tl.float32)
    dv = tl.zeros([BLOCK_K, D], tl.float32)
    for m0 in range(0, T, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_tile = offs_m < T
        slot = g * S * T + t * T + offs_m
        token = tl.load(SLOT_TOKEN + slot, mask=in_tile, other=N)
        row_ok = token < N
        row = (g * N + token)[:, None] * D + offs_d[None, :]
        q = tl.load(Q + row, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
        do = tl.load(DO + row, mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + g * N + token, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + g * N + token, mask=row_ok, other=0.0)
        st = tl.dot(kblock, tl.trans(q), input_precision=PRECISION) * scale  # [BLOCK_K, BLOCK_M]
        pt = tl.exp(st - lse[None, :])
        pt = tl.where(k_ok[:, None] & row_ok[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(vb, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :]) * scale
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)

    out = ((g * S + t) * TOPK + offs_k)[:, None] * D + offs_d[None, :]
    tl.store(DK + out, dk, mask=k_ok[:, None])
    tl.store(DV + out, dv, mask=k_ok[:, None])


def _block(n: int, head_dim: int, itemsize: int) -> int:
    """Block of queries or keys: a power of two >= 16 (tl.dot's minimum), one operand tile <= 16 KiB."""
    cap = max(16, min(64, 16384 // (head_dim * itemsize)))
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _precision(dtype, allow_tf32: bool) -> str:
    return "tf32" if allow_tf32 or dtype.itemsize < 4 else "ieee"


def routed_forward(q, k, v, topk_idx, lay, scale, o, lse, allow_tf32=False):
    """Partial attention of every entry over its expert's keys: normalised ``o [G, E, d]``, ``lse [G, E]``.

    ``q, k, v`` ``[G, N, d]`` and ``topk_idx`` ``[G, m, topk]`` contiguous; ``lay`` from ``_expert_tiles``;
    ``o`` and ``lse`` float32 outputs (every entry is written).
    """
    G, N, D = q.shape
    M, topk = topk_idx.shape[1], topk_idx.shape[2]
    E = o.shape[1]
    S, T = lay["num_tiles"], lay["tile"]
    block_m, block_k = _block(T, D, q.element_size()), _block(topk, D, q.element_size())
    num_mb = triton.cdiv(T, block_m)
    _routed_fwd_kernel[(G * S * num_mb,)](
        q, k, v, topk_idx, lay["slot_token"], lay["slot_source"], lay["tile_expert"], o, lse,
        N, E, M, topk, T, S, num_mb, scale,
        D=D, BLOCK_M=block_m, BLOCK_K=block_k, PRECISION=_precision(q.dtype, allow_tf32),
        num_warps=4, num_stages=2,
    )


def routed_backward(q, k, v, do, lse, delta, topk_idx, lay, scale, dq, dk, dv, allow_tf32=False):
    """Routed gradients given the final ``lse`` and ``delta = rowsum(dO * O)`` per token ``[G, N]``.

    Writes ``dq [G, E, d]`` per entry and ``dk, dv [G, S, topk, d]`` per tile (all float32, fully written).
    """
    G, N, D = q.shape
    M, topk = topk_idx.shape[1], topk_idx.shape[2]
    E = dq.shape[1]
    S, T = lay["num_tiles"], lay["tile"]
    block_m, block_k = _block(T, D, q.element_size()), _block(topk, D, q.element_size())
    precision = _precision(q.dtype, allow_tf32)
    num_mb = triton.cdiv(T, block_m)
    _routed_bwd_dq_kernel[(G * S * num_mb,)](
        q, k, v, do, lse, delta, topk_idx, lay["slot_token"], lay["slot_source"], lay["tile_expert"], dq,
        N, E, M, topk, T, S, num_mb, scale,
        D=D, BLOCK_M=block_m, BLOCK_K=block_k, PRECISION=precision,
        num_warps=4, num_stages=2,
    )
    num_kb = triton.cdiv(topk, block_k)
    _routed_bwd_dkdv_kernel[(G * S * num_kb,)](
        q, k, v, do, lse, delta, topk_idx, lay["slot_token"], lay["slot_source"], lay["tile_expert"], dk, dv,
        N, E, M, topk, T, S, num_kb, scale,
        D=D, BLOCK_M=block_m, BLOCK_K=block_k, PRECISION=precision,
        num_warps=4, num_stages=2,
    )
