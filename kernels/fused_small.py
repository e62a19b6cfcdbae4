"""Fused Triton kernels of MiTA for short sequences (ViT lengths): one forward and one backward launch.

For N up to a few hundred tokens (ViT/DeiT at 224 px: 197) every row of a (batch, head) fits on chip, so
the kernels work like FlashAttention without the online softmax, with MiTA's selection as a multiplicity
mask folded into a dense tile: the ``m + r k`` logits of a query are a masked row of ``[m + N]`` logits.

Forward, one program per (batch-head ``g``, group of query blocks):
  1. ``SK = R K^T [MP, NP]`` (fp32, unscaled) with the whole key tile ``K [NP, d]`` on chip;
  2. top-k mask ``Sel [MP, NP]`` (uint8 counts) by an exact radix select on ``SK`` (or read from a given
     routing); group 0 stores it for the backward;
  3. shared values ``V~ = softmax(s SK) V`` and their log-normaliser ``lse_sh [MP]`` (stored for the backward);
  4. per block of ``BQ`` queries: gate ``Q R^T``, expert ids (stored), the multiplicity
     ``C = onehot(e1) + onehot(e2) @ Sel`` as one ``[BQ, MP] x [MP, NP]`` product (exact small integers),
     logits ``[c Q R^T ; s Q K^T]`` and ONE softmax over the row (``p = C exp(z - max)``: a key held by both
     experts of a query counts twice), ``out = P_sh V~ + P V``, ``lse``.
Backward, one launch without atomics, programs per head: ``NKB`` key blocks (dK, dV: routed pairs over all
queries at once, then the path through ``V~ = A V``), ``NQB`` query blocks (dQ) and one landmark program
(dR = ``c dS_sh^T Q + s dL K``). Every output element has one writer. See kernels/README.md for the maths.

Layouts (``G = B H``): q, k, v, dO ``[B, H, N, d]`` and landmarks ``[B, H, m, d]`` with any batch, head and
row strides and a unit last one; ``out`` token-major (``[B, N, H, d]`` memory seen as ``[B, H, N, d]``, as
SDPA returns it); dq, dk, dv, dR contiguous in the input dtype; ``lse [G, N]`` fp32; ``sel [G, MP, NP]``
uint8; ``expert [G, N, r]`` int32; ``vs [G, MP, d]`` in the input dtype; ``lse_sh [G, MP]`` fp32. ``MP`` and
``NP`` are m and N padded to powers of two >= 16 (``tl.dot``'s minimum). Every dot accumulates in fp32; fp32
inputs use ``input_precision="ieee"`` unless TF32 is allowed. Exponentials are ``exp2`` of logits scaled by
``log2(e)``. Each launched kernel casts its scale arguments to fp32 first: inductor, tracing them as
``torch.library.triton_op`` (``mita.kernels.TRITON_OPS``), types Python floats fp64, which would make the
accumulators fp64 (``scripts/compile_report.py --float64-scalars`` compiles them so).
"""
import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2

LOG2E = 1.4426950408889634
# Whether the expert-mask products (``onehot @ Sel``: exact small integers) accumulate in fp32 instead of fp16. With
# fp16 accumulators ptxas serializes every wgmma of the attention and per-head backward kernels ("non wgmma
# instructions reading accumulator registers"; sm_90, Triton 3.8): fp32 ones lift that, at +16 registers in the
# forward (126 -> 142 at 8 warps, 128 x 64 blocks: one program an SM instead of two; 110 with 32-key blocks) and
# fewer spills in the per-head backward (60 -> 40 bytes). Off: on an H100 (BENCHMARKS.md, "Kernel options timed on
# an H100") +7% forward+backward at the DeiT-S core shape (d = 64), 6-11% faster at d = 128 with two of three tilings.
# Where MASK_BIAS applies (16-bit inputs, no key counted twice) there is no count product.
COUNT_FP32 = False
# The expert mask as a logit bias (attention forward and the per-head backwards; the block backward with
# MASK_BIAS_BLOCKS), where no key counts twice (r = 1,
# own routing) and the inputs are 16-bit: ``s + MASK_BIAS * (key held by the query's expert)`` comes out of one
# accumulator (``onehot @ (MASK_BIAS Sel)`` added to ``Q K^T``), ``MASK_BIAS * s log2(e)`` is taken off again
# (>= 500 for d <= 128), and the logits of keys outside the mask sit that far below and underflow to an exact 0 in
# exp2: no count tile, no select, and no fp16-accumulator product (which serializes wgmma, see COUNT_FP32). The
# price: the logits are rounded at MASK_BIAS's magnitude (2^-11 absolute at 4096, ~1e-4 relative in p), against
# bf16 inputs' 4e-3. 0.0: a count product and a select instead. On an H100 (BENCHMARKS.md, "The expert mask as a
# logit bias") the forward 3-4% faster at the DeiT-S core shape, d = 64 and d = 128, the backward unchanged.
MASK_BIAS = 4096.0
# Whether the block backward (programs per key block, query block and landmark block: d = 128, N < 129) takes the
# mask as a logit bias too (fewer spills at d = 128: 764 against 956 bytes a thread, wgmma no longer serialized;
# compile_report). Off until timed on a GPU.
MASK_BIAS_BLOCKS = False
# Whether the attention forward's loop over the routed keys ends with a block narrower than the others for the keys
# left over (key_blocks: N = 197 with 64-key blocks, 3 blocks and one of 16 keys, 208 key columns instead of 256: 19%
# less of the loop's products and exponentials; sm_90, Triton 3.8: 126 registers, no spills, as without). The
# per-head backward's 32-key blocks leave less over (224 -> 208 columns), and a tail there spilled 448 bytes a
# thread against 24 (its body compiled twice). Off until timed on a GPU.
KEY_TAIL = False
# The last compiled kernel of each pass (registers, spills and shared memory for benchmarks).
LAUNCHED = {}


@triton.jit
def _store_topk(sk, key_ok, lm_ok, TOPK, PTRS, SEARCH: tl.constexpr = 16, CHECK: tl.constexpr = 1):
    """Stores to ``PTRS`` (uint8 pointers shaped as ``sk``) the 0/1 mask of the TOPK largest entries of each
    valid row of ``sk`` (ties: smallest index first; rows outside ``lm_ok`` select nothing; at most 1023
    columns).

    A search in value space first: each row keeps a bracket ``lo < hi`` with count(x >= lo) > TOPK >
    count(x >= hi) and counts, in one pass, the keys at or above the three quarter points of it (three
    10-bit counts packed into one int32 sum, so a pass costs one row reduction), until some threshold t has
    count(x >= t) == TOPK exactly (that set is the top-k: ties cannot cross it). The bracket shrinks four
    times a pass: ~7 passes for rows of scores, against ~20 for the bitwise search. Rows it leaves open
    (ties at the boundary, brackets down to adjacent floats, more than ``SEARCH`` passes) go to
    :func:`_select_topk_radix`. ``SEARCH = 0``: the bitwise search alone (asking whether every row is done
    every ``CHECK`` passes).
    """
    if SEARCH == 0:
        tl.store(PTRS, _select_topk_radix(sk, key_ok, lm_ok, TOPK, CHECK).to(tl.uint8))
        return
    R: tl.constexpr = sk.shape[0]
    x = tl.where(key_ok[None, :], sk, float("-inf"))
    n_valid = tl.sum(key_ok.to(tl.int32), 0) + tl.zeros([R], tl.int32)
    lo = tl.min(tl.where(key_ok[None, :], sk, float("inf")), 1)
    hi = tl.max(x, 1)
    c_hi = tl.sum((x >= hi[:, None]).to(tl.int32), 1)
    # done: t selects exactly TOPK (every valid key when N <= TOPK); rows outside lm_ok need nothing
    done = (n_valid <= TOPK) | (c_hi == TOPK) | (lm_ok == 0)
    t = tl.where(c_hi == TOPK, hi, lo)
    active = (done == 0) & (c_hi < TOPK)  # c_hi > TOPK: ties at the maximum, for the fallback
    it = 0
    todo = tl.max(active.to(tl.int32), 0)
    while todo > 0:
        step = hi - lo
        g1 = lo + 0.25 * step
        g2 = lo + 0.5 * step
        g3 = lo + 0.75 * step
        packed = ((x >= g1[:, None]).to(tl.int32) + ((x >= g2[:, None]).to(tl.int32) << 10)
                  + ((x >= g3[:, None]).to(tl.int32) << 20))
        tot = tl.sum(packed, 1)
        c1 = tot & 1023
        c2 = (tot >> 10) & 1023
        c3 = tot >> 20
        # a candidate at lo or hi (adjacent floats) counts as they do, so it cannot be taken for a hit
        hit = active & (((c1 == TOPK) & (g1 > lo)) | ((c2 == TOPK) & (g2 > lo)) | ((c3 == TOPK) & (g3 > lo)))
        t = tl.where(hit, tl.where(c1 == TOPK, g1, tl.where(c2 == TOPK, g2, g3)), t)
        done = done | hit
        new_lo = tl.where(c3 > TOPK, g3, tl.where(c2 > TOPK, g2, tl.where(c1 > TOPK, g1, lo)))
        new_hi = tl.where(c1 < TOPK, g1, tl.where(c2 < TOPK, g2, tl.where(c3 < TOPK, g3, hi)))
        moved = (new_lo != lo) | (new_hi != hi)
        lo = tl.where(active, new_lo, lo)
        hi = tl.where(active, new_hi, hi)
        active = active & (hit == 0) & moved
        it += 1
        todo = tl.max(active.to(tl.int32), 0) * (it < SEARCH).to(tl.int32)
    # rows found by their threshold, then (disjoint addresses) the rows left open, by the bitwise search
    tl.store(PTRS, ((x >= t[:, None]) & key_ok[None, :] & lm_ok[:, None]).to(tl.uint8), mask=done[:, None])
    if tl.min(done.to(tl.int32), 0) == 0:
        tl.store(PTRS, _select_topk_radix(x, key_ok, lm_ok, TOPK, CHECK).to(tl.uint8), mask=(done == 0)[:, None])


@triton.jit
def _select_topk_radix(sk, key_ok, lm_ok, TOPK, CHECK: tl.constexpr = 1):
    """0/1 int32 mask of the TOPK largest entries of each valid row of ``sk`` (ties: smallest index first;
    rows outside ``lm_ok`` select nothing).

    Floats map to order-preserving uint32 keys and the TOPK-th largest key of each row is built from the
    top bit down, one bit a pass: ``thr`` = the largest t with count(key >= t) >= TOPK. The passes stop
    once every row counts exactly TOPK keys at or above its ``thr`` (that set is then the top-k, whatever
    the lower bits): ~10-20 passes for scores without ties at the boundary, 32 with them. Whether every row
    is done (a reduction over the whole program) is asked every ``CHECK`` passes: passes after a row is done
    keep its set (they only take bits that leave its count at TOPK).
    """
    # -0.0 as +0.0 (they compare equal, so their tie goes to the lower index as any other)
    bits = tl.where(sk == 0.0, 0, sk.to(tl.int32, bitcast=True))
    # negative floats: flip every bit; positive: set the sign bit -> unsigned order equals float order
    key = tl.where(bits < 0, ~bits, bits | -2147483648).to(tl.uint32, bitcast=True)
    key = tl.where(key_ok[None, :], key, 0)
    thr = tl.zeros([sk.shape[0]], tl.uint32)
    # keys at or above thr (0: every valid key); a row is done once this is TOPK (or fewer: N < TOPK)
    n_at = tl.sum(key_ok.to(tl.int32), 0) + tl.zeros([sk.shape[0]], tl.int32)
    bit = tl.full([], 1 << 31, tl.uint32)
    todo = tl.max((lm_ok & (n_at > TOPK)).to(tl.int32), 0)
    while todo > 0:
        for _ in tl.static_range(CHECK):
            cand = thr | bit
            n_ge = tl.sum((key >= cand[:, None]).to(tl.int32), 1)
            take = n_ge >= TOPK
            thr = tl.where(take, cand, thr)
            n_at = tl.where(take, n_ge, n_at)
            bit = bit >> 1
        todo = tl.max((lm_ok & (n_at > TOPK)).to(tl.int32), 0) * (bit > 0).to(tl.int32)
    sel = (key >= thr[:, None]) & key_ok[None, :] & lm_ok[:, None]
    # more keys than TOPK only where several tie at the threshold: then the lowest indices among them
    if tl.max(tl.where(lm_ok, n_at, 0), 0) > TOPK:
        above = (key > thr[:, None]) & key_ok[None, :] & lm_ok[:, None]
        need = TOPK - tl.sum(above.to(tl.int32), 1)
        tie = ((key == thr[:, None]) & key_ok[None, :] & lm_ok[:, None]).to(tl.int32)
        sel = above | ((tie > 0) & (tl.cumsum(tie, 1) <= need[:, None]))
    return sel.to(tl.int32)


@triton.jit
def _argmax_first(x, cols, WIDTH: tl.constexpr):
    """Column of each row's maximum, the smallest one among ties."""
    xmax = tl.max(x, 1)
    return tl.min(tl.where(x == xmax[:, None], cols[None, :], WIDTH), 1)


@triton.jit
def _rows(P, rows, ok, stride_n, offs_d):
    """``[len(rows), D]`` tile of a ``[N, D]`` matrix with row stride ``stride_n`` (zeros outside ``ok``)."""
    return tl.load(P + rows[:, None] * stride_n + offs_d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _prep_kernel(
    Q, K, V, R, SEL, VS, LSH, POOL, LMK,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_rb, stride_rh, stride_rm,
    H, N, M, TOPK, scale,
    D: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr, DC: tl.constexpr, BKC: tl.constexpr,
    SELECT: tl.constexpr, SHARED: tl.constexpr, POOLED: tl.constexpr, PREC: tl.constexpr, SEARCH: tl.constexpr,
    CHECK: tl.constexpr = 1,
):
    """Per-landmark work of the forward, programs (batch-head, block of ``BM`` landmarks) of one to eight
    warps (with one warp per 16 rows a row's reductions stay inside its warp), many small programs hiding
    each other's latency:

    * ``POOLED``: the landmarks ``R = W Q`` of the rows from the pooling weights ``W = POOL [MP, NP]``
      (fp32, used in the input dtype), stored to ``LMK [G, MP, D]`` for the attention and backward kernels;
    * ``SELECT``: the top-k mask of the rows (uint8 into ``SEL``) from ``R K^T``, computed in head-dim
      chunks of ``DC`` so that one ``[NP, DC]`` key chunk bounds the registers;
    * ``SHARED``: the shared values ``V~ = softmax(s R K^T) V`` and their base-2 log-normaliser, in key
      chunks of ``BKC`` (the scores recomputed chunk by chunk).
    The attention kernel then reads the mask, ``V~`` and ``lse_sh`` (``PREP``)."""
    scale = tl.cast(scale, tl.float32)  # see the module docstring
    DT = K.dtype.element_ty
    g = tl.program_id(0).to(tl.int64)
    b = g // H
    h = g % H
    lm = tl.program_id(1) * BM + tl.arange(0, BM)
    lm_ok = lm < M
    keys = tl.arange(0, NP)
    key_ok = keys < N
    offs_d = tl.arange(0, D)
    Rh = R + b * stride_rb + h * stride_rh
    Kh = K + b * stride_kb + h * stride_kh
    sl2 = scale * 1.4426950408889634
    if POOLED:
        # R = W Q in key chunks (the weights in the input dtype, as a pooling op in that dtype would see them;
        # fp32 accumulation), stored, then read back as the given landmarks would be
        Qh = Q + b * stride_qb + h * stride_qh
        r = tl.zeros([BM, D], tl.float32)
        for kc in tl.static_range(NP // BKC):
            kcols = kc * BKC + tl.arange(0, BKC)
            w = tl.load(POOL + lm[:, None] * NP + kcols[None, :]).to(DT)  # [BM, BKC]
            r = tl.dot(w, _rows(Qh, kcols, kcols < N, stride_qn, offs_d), r, input_precision=PREC)
        Rh = LMK + g * MP * D
        tl.store(Rh + lm[:, None] * D + offs_d[None, :], r.to(DT))
        tl.debug_barrier()
        stride_rm = D
    sk = tl.zeros([BM, NP], tl.float32)
    for c in tl.static_range(D // DC):
        offs_c = c * DC + tl.arange(0, DC)
        r_c = _rows(Rh, lm, lm_ok, stride_rm, offs_c)  # [BM, DC]
        k_c = _rows(Kh, keys, key_ok, stride_kn, offs_c)  # [NP, DC]
        sk = tl.dot(r_c, tl.trans(k_c), sk, input_precision=PREC)
    if SHARED:
        zmax = tl.max(tl.where(key_ok[None, :], sk * sl2, float("-inf")), 1)  # [BM]
    if SELECT:
        _store_topk(sk, key_ok, lm_ok, TOPK, SEL + g * MP * NP + lm[:, None] * NP + keys[None, :], SEARCH, CHECK)
    if SHARED:
        r = _rows(Rh, lm, lm_ok, stride_rm, offs_d)  # [BM, D]
        Vh = V + b * stride_vb + h * stride_vh
        zsum = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        for kc in tl.static_range(NP // BKC):
            kcols = kc * BKC + tl.arange(0, BKC)
            k_ok = kcols < N
            z = tl.dot(r, tl.trans(_rows(Kh, kcols, k_ok, stride_kn, offs_d)), input_precision=PREC) * sl2
            pa = tl.where(k_ok[None, :], tl.exp2(z - zmax[:, None]), 0.0)  # [BM, BKC]
            zsum += tl.sum(pa, 1)
            acc = tl.dot(pa.to(DT), _rows(Vh, kcols, k_ok, stride_vn, offs_d), acc, input_precision=PREC)
        tl.store(VS + (g * MP + lm[:, None]) * D + offs_d[None, :], (acc / zsum[:, None]).to(DT))
        tl.store(LSH + g * MP + lm, zmax + tl.log2(zsum))


@triton.jit
def _fwd_key_block(q, onehot, kcols, Kh, Vh, SELg, lm, N, stride_kn, stride_vn, offs_d, sl2, m_i, l_i, acc,
                   NP: tl.constexpr, ODT: tl.constexpr, MASK_BIAS: tl.constexpr, CNT32: tl.constexpr,
                   MULTI: tl.constexpr, PREC: tl.constexpr):
    """One block of keys ``kcols`` of the attention's online softmax over the routed keys: the running max
    ``m_i``, sum ``l_i`` and output ``acc`` of the block's queries ``q`` (experts ``onehot``) updated."""
    DT = q.dtype
    k_ok = kcols < N
    kblk = _rows(Kh, kcols, k_ok, stride_kn, offs_d)  # [BK, D]
    vblk = _rows(Vh, kcols, k_ok, stride_vn, offs_d)
    sel_b = tl.load(SELg + lm[:, None] * NP + kcols[None, :]).to(ODT)  # [MP, BK]
    if MASK_BIAS > 0:
        # + MASK_BIAS where the query's expert holds the key, in the logits' own accumulator
        s = tl.dot(onehot, sel_b * MASK_BIAS, tl.dot(q, tl.trans(kblk), input_precision=PREC))
        s = s * sl2 - MASK_BIAS * sl2
    else:
        # multiplicity of each key in the query's experts: exact small integers
        cnt = tl.dot(onehot, sel_b, out_dtype=tl.float32 if CNT32 else tl.float16)  # [BQ, BK]
        s = tl.dot(q, tl.trans(kblk), input_precision=PREC) * sl2
        s = tl.where(cnt > 0, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row may have no logit yet (no shared expert, no selected key in the blocks so far)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    if MULTI:
        # a key counted C times enters the softmax as C equal logits
        p = p * cnt.to(tl.float32)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DT), vblk, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(
    Q, K, V, R, O, LSE, SEL, EXP, VS, LSH, POOL, LMK,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_rb, stride_rh, stride_rm, stride_ob, stride_oh, stride_on,
    H, N, M, TOPK, NKB, scale, scale_shared,
    D: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    QB_PER_PROG: tl.constexpr, R_TOPK: tl.constexpr, SHARED: tl.constexpr, ROUTED: tl.constexpr,
    SELECT: tl.constexpr, MULTI: tl.constexpr, PREC: tl.constexpr, SELECT_HERE: tl.constexpr,
    POOLED: tl.constexpr, PREP: tl.constexpr, SEARCH: tl.constexpr, CNT32: tl.constexpr = False,
    MASK_BIAS: tl.constexpr = 0.0, CHECK: tl.constexpr = 1, BKT: tl.constexpr = 0,
):
    scale, scale_shared = tl.cast(scale, tl.float32), tl.cast(scale_shared, tl.float32)  # see the module docstring
    # NKB blocks of BK keys, then (BKT > 0) one of BKT keys: the last keys without a whole block's padding
    # CHECK: passes of the bitwise top-k search between asking whether every row is done
    # MASK_BIAS > 0: the expert mask as a logit bias (see the constant of that name)
    ODT = Q.dtype.element_ty if MASK_BIAS > 0 else tl.float16  # operands of the expert-mask products
    # SELECT_HERE: the top-k mask is selected in this kernel (else it was passed in or _prep_kernel wrote it);
    # PREP: _prep_kernel wrote the shared values and lse_sh (and the mask where selecting);
    # POOLED: the landmarks are W Q with W = POOL [MP, NP] (fp32), computed here and stored to LMK [G, MP, D]
    DT = Q.dtype.element_ty
    g = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    b = g // H
    h = g % H
    Qh = Q + b * stride_qb + h * stride_qh
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh
    offs_d = tl.arange(0, D)
    lm = tl.arange(0, MP)
    lm_ok = lm < M
    keys = tl.arange(0, NP)
    key_ok = keys < N
    if POOLED:
        qa = _rows(Qh, keys, key_ok, stride_qn, offs_d)  # [NP, D]
        w = tl.load(POOL + lm[:, None] * NP + keys[None, :])  # [MP, NP]
        r = tl.dot(w, qa.to(tl.float32), input_precision=PREC).to(DT)  # [MP, D]
        if grp == 0:
            tl.store(LMK + (g * MP + lm[:, None]) * D + offs_d[None, :], r)
    else:
        r = _rows(R + b * stride_rb + h * stride_rh, lm, lm_ok, stride_rm, offs_d)  # [MP, D]
    sl2 = scale * 1.4426950408889634
    cl2 = scale_shared * 1.4426950408889634
    SELg = SEL + g * MP * NP

    if PREP:
        if SHARED:
            vs = tl.load(VS + (g * MP + lm[:, None]) * D + offs_d[None, :])  # [MP, D]
    elif SHARED or SELECT_HERE:
        kt = _rows(Kh, keys, key_ok, stride_kn, offs_d)  # [NP, D]
        sk = tl.dot(r, tl.trans(kt), input_precision=PREC)  # [MP, NP] unscaled landmark-key scores
        if SELECT_HERE:
            # every program of the head selects (the same mask); group 0 keeps it for the backward, and
            # the key-block loop below reads it back in [MP, BK] slices, which registers cannot be cut into
            _store_topk(sk, key_ok, lm_ok, TOPK, SELg + lm[:, None] * NP + keys[None, :], SEARCH, CHECK)  # [MP, NP]
            tl.debug_barrier()
        if SHARED:
            # shared values V~ = softmax(s R K^T) V and their log-normaliser (base 2), kept for the backward
            za = tl.where(key_ok[None, :], sk * sl2, float("-inf"))
            zmax = tl.max(za, 1)
            pa = tl.exp2(za - zmax[:, None])
            zsum = tl.sum(pa, 1)
            vt = _rows(Vh, keys, key_ok, stride_vn, offs_d)  # [NP, D]
            vs = (tl.dot(pa.to(DT), vt, input_precision=PREC) / zsum[:, None]).to(DT)  # [MP, D]
            if grp == 0:
                tl.store(VS + (g * MP + lm[:, None]) * D + offs_d[None, :], vs)
                tl.store(LSH + g * MP + lm, zmax + tl.log2(zsum))

    EXPh = EXP + g * N * R_TOPK
    Oh = O + b * stride_ob + h * stride_oh
    for i in range(QB_PER_PROG):
        rows = (grp * QB_PER_PROG + i) * BQ + tl.arange(0, BQ)
        q_ok = rows < N
        q = _rows(Qh, rows, q_ok, stride_qn, offs_d)  # [BQ, D]
        gate = tl.dot(q, tl.trans(r), input_precision=PREC)  # [BQ, MP]
        m_i = tl.full([BQ], float("-inf"), tl.float32)
        l_i = tl.zeros([BQ], tl.float32)
        acc = tl.zeros([BQ, D], tl.float32)
        if SHARED:
            # the shared logits open the one softmax
            zs = tl.where(lm_ok[None, :], gate * cl2, float("-inf"))  # [BQ, MP]
            m_i = tl.max(zs, 1)
            ps = tl.exp2(zs - m_i[:, None])
            l_i = tl.sum(ps, 1)
            acc = tl.dot(ps.to(DT), vs, input_precision=PREC)
        if ROUTED:
            if SELECT:
                gm = tl.where(lm_ok[None, :], gate, float("-inf"))
                e1 = _argmax_first(gm, lm, MP)
                tl.store(EXPh + rows * R_TOPK, e1, mask=q_ok)
                onehot = (lm[None, :] == e1[:, None]).to(ODT)
                if R_TOPK == 2:
                    e2 = _argmax_first(tl.where(lm[None, :] == e1[:, None], float("-inf"), gm), lm, MP)
                    tl.store(EXPh + rows * R_TOPK + 1, e2, mask=q_ok)
                    onehot += (lm[None, :] == e2[:, None]).to(ODT)
            else:
                e1 = tl.load(EXPh + rows * R_TOPK, mask=q_ok, other=0)
                onehot = (lm[None, :] == e1[:, None]).to(ODT)
                if R_TOPK == 2:
                    e2 = tl.load(EXPh + rows * R_TOPK + 1, mask=q_ok, other=0)
                    onehot += (lm[None, :] == e2[:, None]).to(ODT)
            for kb in range(NKB):
                m_i, l_i, acc = _fwd_key_block(q, onehot, kb * BK + tl.arange(0, BK), Kh, Vh, SELg, lm, N,
                                               stride_kn, stride_vn, offs_d, sl2, m_i, l_i, acc, NP, ODT, MASK_BIAS,
                                               CNT32, MULTI, PREC)
            if BKT > 0:  # the last keys in a narrower block (KEY_TAIL)
                m_i, l_i, acc = _fwd_key_block(q, onehot, NKB * BK + tl.arange(0, BKT), Kh, Vh, SELg, lm, N,
                                               stride_kn, stride_vn, offs_d, sl2, m_i, l_i, acc, NP, ODT, MASK_BIAS,
                                               CNT32, MULTI, PREC)
        m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows
        tl.store(Oh + rows[:, None] * stride_on + offs_d[None, :], (acc / l_i[:, None]).to(DT), mask=q_ok[:, None])
        # lse in base 2 (exp2 of base-2 logits minus it gives the probabilities)
        tl.store(LSE + g * N + rows, m_i + tl.log2(l_i), mask=q_ok)


@triton.jit
def _routed_probs(a, b, mask_a, mask_b, lse, sl2, MASK_BIAS: tl.constexpr, MULTI: tl.constexpr,
                  CNT32: tl.constexpr, PREC: tl.constexpr):
    """Routed attention probabilities ``exp2(s (a b) log2 e - lse)`` where the expert mask ``mask_a mask_b`` holds
    the key (times its count with ``MULTI``), 0 elsewhere; ``lse`` broadcast to the tile's shape (``[:, None]`` with
    queries as rows, ``[None, :]`` with keys as rows). With ``MASK_BIAS`` the mask's Sel factor comes scaled by it
    and the product lands in the logits' accumulator (see the constant)."""
    if MASK_BIAS > 0:
        s = tl.dot(mask_a, mask_b, tl.dot(a, b, input_precision=PREC))
        p = tl.exp2(s * sl2 - (lse + MASK_BIAS * sl2))
    else:
        cnt = tl.dot(mask_a, mask_b, out_dtype=tl.float32 if CNT32 else tl.float16)
        s = tl.dot(a, b, input_precision=PREC) * sl2
        p = tl.where(cnt > 0, tl.exp2(s - lse), 0.0)
        if MULTI:
            p = p * cnt.to(tl.float32)
    return p


@triton.jit
def _sel_rows(SELg, lm, kcols, NP: tl.constexpr, ODT: tl.constexpr, MASK_BIAS: tl.constexpr, KEYS: tl.constexpr):
    """The head's top-k mask at keys ``kcols`` as a product operand of dtype ``ODT``: ``[MP, BK]``, or ``[BK, MP]``
    with ``KEYS`` (keys as rows); scaled by ``MASK_BIAS`` where that is on."""
    if KEYS:
        sel = tl.load(SELg + lm[None, :] * NP + kcols[:, None]).to(ODT)
    else:
        sel = tl.load(SELg + lm[:, None] * NP + kcols[None, :]).to(ODT)
    if MASK_BIAS > 0:
        sel = sel * MASK_BIAS
    return sel


@triton.jit
def _grad_rows(Qh, DOh, Oh, LSEh, rows, ok, stride_qn, stride_don, stride_on, offs_d):
    """Queries, output gradients, ``delta = rowsum(dO * O)`` and base-2 lse of a set of rows."""
    q = _rows(Qh, rows, ok, stride_qn, offs_d)
    do = _rows(DOh, rows, ok, stride_don, offs_d)
    o = _rows(Oh, rows, ok, stride_on, offs_d)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(LSEh + rows, mask=ok, other=0.0)
    return q, do, delta, lse


@triton.jit
def _onehot_t(EXPh, rows, ok, lm, R_TOPK: tl.constexpr):
    """``[MP, len(rows)]`` fp16: 1 (2 if both slots) where landmark ``lm`` is an expert of query ``rows``."""
    e1 = tl.load(EXPh + rows * R_TOPK, mask=ok, other=-1)
    oh = (lm[:, None] == e1[None, :]).to(tl.float16)
    if R_TOPK == 2:
        e2 = tl.load(EXPh + rows * R_TOPK + 1, mask=ok, other=-1)
        oh += (lm[:, None] == e2[None, :]).to(tl.float16)
    return oh


@triton.jit
def _shared_key_grads(kblk, vblk, r, lsh, dvs_dt, vs_dot, k_ok, lm_ok, sl2, dk, dv, PREC: tl.constexpr):
    """A key block's share of the path through the shared values ``V~ = A V``, ``A = softmax(s R K^T)``:
    ``dV += A^T dV~``, ``dL = A (dV~ V^T - rowsum(dV~ V~))``, ``dK += dL^T R`` (unscaled); returns dk, dv and
    ``dL^T [BK, MP]`` (in the keys' dtype) for dR."""
    DT = kblk.dtype
    a_t = tl.dot(kblk, tl.trans(r), input_precision=PREC) * sl2  # [BK, MP]
    a_t = tl.where(k_ok[:, None] & lm_ok[None, :], tl.exp2(a_t - lsh[None, :]), 0.0)
    dv = tl.dot(a_t.to(DT), dvs_dt, dv, input_precision=PREC)
    dl_t = (a_t * (tl.dot(vblk, tl.trans(dvs_dt), input_precision=PREC) - vs_dot[None, :])).to(DT)
    dk = tl.dot(dl_t, r, dk, input_precision=PREC)
    return dk, dv, dl_t


@triton.jit
def _bwd_keys(
    Qh, Kh, Vh, Rh, Oh, DOh, LSEh, SELg, EXPh, VSg, LSHg, DKg, DVg, DVSg,
    stride_qn, stride_kn, stride_vn, stride_rm, stride_don, stride_on, stride_gn,
    kb, N, M, NQB, scale, scale_shared,
    D: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    R_TOPK: tl.constexpr, SHARED: tl.constexpr, ROUTED: tl.constexpr, MULTI: tl.constexpr, PREC: tl.constexpr,
    DVS_GIVEN: tl.constexpr, CNT32: tl.constexpr, MASK_BIAS: tl.constexpr,
):
    """dK, dV of keys ``kb*BK ..``: transposed tiles (keys as rows, as FlashAttention's dK/dV loop) over
    every query block; routed pairs, then the path through the shared values ``V~ = A V``, whose gradient
    ``dV~ = P_sh^T dO`` (a sum over every query) is summed in the same loop, or read from ``DVSg [MP, D]``
    (fp32) where the landmark program of an earlier launch wrote it (``DVS_GIVEN``)."""
    DT = Qh.dtype.element_ty
    offs_d = tl.arange(0, D)
    lm = tl.arange(0, MP)
    lm_ok = lm < M
    sl2 = scale * 1.4426950408889634
    cl2 = scale_shared * 1.4426950408889634
    kcols = kb * BK + tl.arange(0, BK)
    k_ok = kcols < N
    kblk = _rows(Kh, kcols, k_ok, stride_kn, offs_d)  # [BK, D]
    vblk = _rows(Vh, kcols, k_ok, stride_vn, offs_d)
    dk = tl.zeros([BK, D], tl.float32)
    dv = tl.zeros([BK, D], tl.float32)
    dvs = tl.zeros([MP, D], tl.float32)
    ODT = DT if MASK_BIAS > 0 else tl.float16  # operands of the expert-mask products
    if ROUTED:
        sel_t = _sel_rows(SELg, lm, kcols, NP, ODT, MASK_BIAS, True)  # [BK, MP]
    if SHARED:
        r = _rows(Rh, lm, lm_ok, stride_rm, offs_d)  # [MP, D]
    for qb in range(NQB if (ROUTED or (SHARED and not DVS_GIVEN)) else 0):
        rows = qb * BQ + tl.arange(0, BQ)
        q_ok = rows < N
        q, do, delta, lse = _grad_rows(Qh, DOh, Oh, LSEh, rows, q_ok, stride_qn, stride_don, stride_on, offs_d)
        if ROUTED:
            p_t = _routed_probs(kblk, tl.trans(q), sel_t, _onehot_t(EXPh, rows, q_ok, lm, R_TOPK).to(ODT),
                                lse[None, :], sl2, MASK_BIAS, MULTI, CNT32, PREC)  # [BK, BQ]
            dp_t = tl.dot(vblk, tl.trans(do), input_precision=PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dv = tl.dot(p_t.to(DT), do, dv, input_precision=PREC)
            dk = tl.dot(ds_t.to(DT), q, dk, input_precision=PREC)
        if SHARED and not DVS_GIVEN:
            # dV~ = P_sh^T dO, summed over every query block
            ps_t = tl.dot(r, tl.trans(q), input_precision=PREC) * cl2  # [MP, BQ]
            ps_t = tl.where(lm_ok[:, None] & q_ok[None, :], tl.exp2(ps_t - lse[None, :]), 0.0)
            dvs = tl.dot(ps_t.to(DT), do, dvs, input_precision=PREC)
    if SHARED:
        vs = tl.load(VSg + lm[:, None] * D + offs_d[None, :])  # [MP, D]
        lsh = tl.load(LSHg + lm)
        if DVS_GIVEN:
            dvs = tl.load(DVSg + lm[:, None] * D + offs_d[None, :])
        vs_dot = tl.sum(dvs * vs.to(tl.float32), 1)  # [MP]
        dk, dv, _ = _shared_key_grads(kblk, vblk, r, lsh, dvs.to(DT), vs_dot, k_ok, lm_ok, sl2, dk, dv, PREC)
    out = kcols[:, None] * stride_gn + offs_d[None, :]
    tl.store(DKg + out, (dk * scale).to(DT), mask=k_ok[:, None])
    tl.store(DVg + out, dv.to(DT), mask=k_ok[:, None])


@triton.jit
def _bwd_queries(
    Qh, Kh, Vh, Rh, Oh, DOh, LSEh, SELg, EXPh, VSg, DQg,
    stride_qn, stride_kn, stride_vn, stride_rm, stride_don, stride_on, stride_gn,
    qb, N, M, NKB, scale, scale_shared,
    D: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    R_TOPK: tl.constexpr, SHARED: tl.constexpr, ROUTED: tl.constexpr, MULTI: tl.constexpr, PREC: tl.constexpr,
    CNT32: tl.constexpr, MASK_BIAS: tl.constexpr,
):
    """dQ of queries ``qb*BQ ..``: routed ``s dS K`` over the key blocks, shared ``c dS_sh R``."""
    DT = Qh.dtype.element_ty
    offs_d = tl.arange(0, D)
    lm = tl.arange(0, MP)
    lm_ok = lm < M
    sl2 = scale * 1.4426950408889634
    rows = qb * BQ + tl.arange(0, BQ)
    q_ok = rows < N
    q, do, delta, lse = _grad_rows(Qh, DOh, Oh, LSEh, rows, q_ok, stride_qn, stride_don, stride_on, offs_d)
    dq = tl.zeros([BQ, D], tl.float32)
    if ROUTED:
        ODT = DT if MASK_BIAS > 0 else tl.float16  # operands of the expert-mask products
        onehot = tl.trans(_onehot_t(EXPh, rows, q_ok, lm, R_TOPK)).to(ODT)  # [BQ, MP]
        for kb in range(NKB):
            kcols = kb * BK + tl.arange(0, BK)
            k_ok = kcols < N
            kblk = _rows(Kh, kcols, k_ok, stride_kn, offs_d)  # [BK, D]
            vblk = _rows(Vh, kcols, k_ok, stride_vn, offs_d)
            sel_b = _sel_rows(SELg, lm, kcols, NP, ODT, MASK_BIAS, False)  # [MP, BK]
            p = _routed_probs(q, tl.trans(kblk), onehot, sel_b, lse[:, None], sl2, MASK_BIAS, MULTI, CNT32,
                              PREC)  # [BQ, BK]
            dp = tl.dot(do, tl.trans(vblk), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(DT), kblk, dq, input_precision=PREC)
        dq = dq * scale
    if SHARED:
        r = _rows(Rh, lm, lm_ok, stride_rm, offs_d)
        vs = tl.load(VSg + lm[:, None] * D + offs_d[None, :])
        ps = tl.dot(q, tl.trans(r), input_precision=PREC) * (scale_shared * 1.4426950408889634)  # [BQ, MP]
        ps = tl.where(lm_ok[None, :] & q_ok[:, None], tl.exp2(ps - lse[:, None]), 0.0)
        dss = ps * (tl.dot(do, tl.trans(vs), input_precision=PREC) - delta[:, None])
        dq += scale_shared * tl.dot(dss.to(DT), r, input_precision=PREC)
    tl.store(DQg + rows[:, None] * stride_gn + offs_d[None, :], dq.to(DT), mask=q_ok[:, None])


@triton.jit
def _bwd_landmarks(
    Qh, Kh, Vh, Rh, Oh, DOh, LSEh, VSg, LSHg, DRg, DVSg,
    stride_qn, stride_kn, stride_vn, stride_rm, stride_don, stride_on,
    N, M, NQB, NKB, scale, scale_shared,
    D: tl.constexpr, MP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    STORE_DVS: tl.constexpr,
):
    """dR = c dS_sh^T Q (shared logits) + s dL K (landmark attention of the shared values); with
    ``STORE_DVS`` also ``dV~ = P_sh^T dO`` (fp32) into ``DVSg [MP, D]`` for the key programs of the next
    launch."""
    DT = Qh.dtype.element_ty
    offs_d = tl.arange(0, D)
    lm = tl.arange(0, MP)
    lm_ok = lm < M
    cl2 = scale_shared * 1.4426950408889634
    sl2 = scale * 1.4426950408889634
    r = _rows(Rh, lm, lm_ok, stride_rm, offs_d)
    vs = tl.load(VSg + lm[:, None] * D + offs_d[None, :])
    lsh = tl.load(LSHg + lm)
    dvs = tl.zeros([MP, D], tl.float32)
    dr = tl.zeros([MP, D], tl.float32)
    for qb in range(NQB):
        rows = qb * BQ + tl.arange(0, BQ)
        q_ok = rows < N
        q, do, delta, lse = _grad_rows(Qh, DOh, Oh, LSEh, rows, q_ok, stride_qn, stride_don, stride_on, offs_d)
        ps_t = tl.dot(r, tl.trans(q), input_precision=PREC) * cl2  # [MP, BQ]
        ps_t = tl.where(lm_ok[:, None] & q_ok[None, :], tl.exp2(ps_t - lse[None, :]), 0.0)
        dvs = tl.dot(ps_t.to(DT), do, dvs, input_precision=PREC)  # [MP, D]
        dss_t = ps_t * (tl.dot(vs, tl.trans(do), input_precision=PREC) - delta[None, :])
        dr = tl.dot(dss_t.to(DT), q, dr, input_precision=PREC)
    dr = dr * scale_shared
    if STORE_DVS:
        tl.store(DVSg + lm[:, None] * D + offs_d[None, :], dvs)
    dvs_dt = dvs.to(DT)
    vs_dot = tl.sum(dvs * vs.to(tl.float32), 1)
    dl_k = tl.zeros([MP, D], tl.float32)
    for kb in range(NKB):
        kcols = kb * BK + tl.arange(0, BK)
        k_ok = kcols < N
        kblk = _rows(Kh, kcols, k_ok, stride_kn, offs_d)
        vblk = _rows(Vh, kcols, k_ok, stride_vn, offs_d)
        a = tl.dot(r, tl.trans(kblk), input_precision=PREC) * sl2  # [MP, BK]
        a = tl.where(k_ok[None, :] & lm_ok[:, None], tl.exp2(a - lsh[:, None]), 0.0)
        dl = a * (tl.dot(dvs_dt, tl.trans(vblk), input_precision=PREC) - vs_dot[:, None])
        dl_k = tl.dot(dl.to(DT), kblk, dl_k, input_precision=PREC)
    dr += scale * dl_k
    tl.store(DRg + lm[:, None] * D + offs_d[None, :], dr.to(DT), mask=lm_ok[:, None])


@triton.jit
def _bwd_head_key_block(kcols, q, do, delta, lse, onehot, r, lsh, dvs_dt, vs_dot, dq, dr, Kh, Vh, SELg, DKh, DVh,
                        lm, lm_ok, N, stride_kn, stride_vn, stride_gn, offs_d, sl2, scale, NP: tl.constexpr,
                        BK: tl.constexpr, D: tl.constexpr, ODT: tl.constexpr, SHARED: tl.constexpr,
                        ROUTED: tl.constexpr, MULTI: tl.constexpr, CNT32: tl.constexpr, MASK_BIAS: tl.constexpr,
                        PREC: tl.constexpr):
    """One key block ``kcols`` (``BK`` keys) of :func:`_bwd_head_kernel`: its dK, dV stored, the head's dQ and dR
    updated."""
    DT = q.dtype
    k_ok = kcols < N
    kblk = _rows(Kh, kcols, k_ok, stride_kn, offs_d)  # [BK, D]
    vblk = _rows(Vh, kcols, k_ok, stride_vn, offs_d)
    dk = tl.zeros([BK, D], tl.float32)
    dv = tl.zeros([BK, D], tl.float32)
    if ROUTED:
        sel_b = _sel_rows(SELg, lm, kcols, NP, ODT, MASK_BIAS, False)  # [MP, BK]
        p = _routed_probs(q, tl.trans(kblk), onehot, sel_b, lse[:, None], sl2, MASK_BIAS, MULTI, CNT32,
                          PREC)  # [NP, BK]
        dp = tl.dot(do, tl.trans(vblk), input_precision=PREC)
        ds = (p * (dp - delta[:, None])).to(DT)  # [NP, BK]
        dv = tl.dot(tl.trans(p.to(DT)), do, dv, input_precision=PREC)
        dk = tl.dot(tl.trans(ds), q, dk, input_precision=PREC)
        dq = tl.dot(ds, kblk, dq, input_precision=PREC)
    if SHARED:
        dk, dv, dl_t = _shared_key_grads(kblk, vblk, r, lsh, dvs_dt, vs_dot, k_ok, lm_ok, sl2, dk, dv, PREC)
        dr = tl.dot(tl.trans(dl_t), kblk, dr, input_precision=PREC)
    out = kcols[:, None] * stride_gn + offs_d[None, :]
    tl.store(DKh + out, (dk * scale).to(DT), mask=k_ok[:, None])
    tl.store(DVh + out, dv.to(DT), mask=k_ok[:, None])
    return dq, dr


@triton.jit
def _bwd_head_kernel(
    Q, K, V, R, O, DO, LSE, SEL, EXP, VS, LSH, DQ, DK, DV, DR, POOL,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_rb, stride_rh, stride_rm,
    stride_dob, stride_doh, stride_don, stride_ob, stride_oh, stride_on, stride_gb, stride_gh, stride_gn,
    H, N, M, NKB, scale, scale_shared,
    D: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr, BK: tl.constexpr,
    R_TOPK: tl.constexpr, SHARED: tl.constexpr, ROUTED: tl.constexpr, MULTI: tl.constexpr, PREC: tl.constexpr,
    POOLED: tl.constexpr, CNT32: tl.constexpr = False, MASK_BIAS: tl.constexpr = 0.0,
):
    """One program per head: every query at once (``[NP, .]`` tiles), key blocks of ``BK`` in a loop.

    dQ stays on chip for the whole head, so each (query, key) tile is computed once and every output
    element still has one writer: dK, dV of a key block are final after its step, dQ and dR after the loop.
    """
    scale, scale_shared = tl.cast(scale, tl.float32), tl.cast(scale_shared, tl.float32)  # see the module docstring
    DT = Q.dtype.element_ty
    g = tl.program_id(0).to(tl.int64)
    b = g // H
    h = g % H
    Qh = Q + b * stride_qb + h * stride_qh
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh
    offs_d = tl.arange(0, D)
    lm = tl.arange(0, MP)
    lm_ok = lm < M
    rows = tl.arange(0, NP)
    q_ok = rows < N
    sl2 = scale * 1.4426950408889634
    cl2 = scale_shared * 1.4426950408889634
    q, do, delta, lse = _grad_rows(Qh, DO + b * stride_dob + h * stride_doh, O + b * stride_ob + h * stride_oh,
                                   LSE + g * N, rows, q_ok, stride_qn, stride_don, stride_on, offs_d)
    # dq accumulates s dS K; the shared part c dS_sh R enters pre-divided by s
    dq = tl.zeros([NP, D], tl.float32)
    dr = tl.zeros([MP, D], tl.float32)
    if SHARED:
        r = _rows(R + b * stride_rb + h * stride_rh, lm, lm_ok, stride_rm, offs_d)  # [MP, D]
        vs = tl.load(VS + (g * MP + lm[:, None]) * D + offs_d[None, :])  # [MP, D]
        lsh = tl.load(LSH + g * MP + lm)
        ps = tl.dot(q, tl.trans(r), input_precision=PREC) * cl2  # [NP, MP]
        ps = tl.where(lm_ok[None, :] & q_ok[:, None], tl.exp2(ps - lse[:, None]), 0.0)
        dss = ps * (tl.dot(do, tl.trans(vs), input_precision=PREC) - delta[:, None])  # [NP, MP]
        dss_dt = dss.to(DT)
        dq = tl.dot(dss_dt, r, input_precision=PREC) * (scale_shared / scale)
        # dR: c dS_sh^T Q now, s dL K in the loop (pre-divided by s)
        dr = tl.dot(tl.trans(dss_dt), q, input_precision=PREC) * (scale_shared / scale)
        dvs = tl.dot(tl.trans(ps.to(DT)), do, input_precision=PREC)  # [MP, D] = P_sh^T dO
        dvs_dt = dvs.to(DT)
        vs_dot = tl.sum(dvs * vs.to(tl.float32), 1)  # [MP]
    else:  # placeholders of the key blocks' arguments (never used without the shared expert)
        r = tl.zeros([MP, D], DT)
        lsh = tl.zeros([MP], tl.float32)
        dvs_dt = r
        vs_dot = lsh
    ODT = DT if MASK_BIAS > 0 else tl.float16  # operands of the expert-mask products
    if ROUTED:
        EXPh = EXP + g * N * R_TOPK
        e1 = tl.load(EXPh + rows * R_TOPK, mask=q_ok, other=-1)
        onehot = (e1[:, None] == lm[None, :]).to(ODT)  # [NP, MP]
        if R_TOPK == 2:
            e2 = tl.load(EXPh + rows * R_TOPK + 1, mask=q_ok, other=-1)
            onehot += (e2[:, None] == lm[None, :]).to(ODT)
    else:
        onehot = tl.zeros([NP, MP], ODT)
    DKh = DK + b * stride_gb + h * stride_gh
    DVh = DV + b * stride_gb + h * stride_gh
    for kb in range(NKB):
        dq, dr = _bwd_head_key_block(
            kb * BK + tl.arange(0, BK), q, do, delta, lse, onehot, r, lsh, dvs_dt, vs_dot, dq, dr, Kh, Vh,
            SEL + g * MP * NP, DKh, DVh, lm, lm_ok, N, stride_kn, stride_vn, stride_gn, offs_d, sl2, scale, NP, BK, D,
            ODT, SHARED, ROUTED, MULTI, CNT32, MASK_BIAS, PREC)
    if POOLED and SHARED:
        # landmarks W Q: their gradient goes back into dq as W^T dR (dr is still divided by s)
        w = tl.load(POOL + lm[:, None] * NP + rows[None, :])  # [MP, NP]
        dq = tl.dot(tl.trans(w), dr, dq, input_precision=PREC)
    tl.store(DQ + b * stride_gb + h * stride_gh + rows[:, None] * stride_gn + offs_d[None, :], (dq * scale).to(DT),
             mask=q_ok[:, None])
    if SHARED and not POOLED:
        tl.store(DR + (g * M + lm[:, None]) * D + offs_d[None, :], (dr * scale).to(DT), mask=lm_ok[:, None])


@triton.jit
def _keys_pass(q, do, LSEh, DELTAg, rows, ok, kb, oh_t, kblk, vblk, sel_t, dk, dv, dq_t, sl2,
               ROUTED: tl.constexpr, MULTI: tl.constexpr, PREC: tl.constexpr, CNT32: tl.constexpr,
               MASK_BIAS: tl.constexpr):
    """One (key block, query chunk) tile of the routed backward with keys as rows: ``dK, dV [BK, D]`` and
    ``dQ^T [D, BQ]`` updated (every dot has ``BK`` or ``D`` rows, so none is narrower than a wgmma). The
    chunk's lse and delta are read here (cache hits) rather than kept in registers across the key loop."""
    DT = q.dtype
    if ROUTED:
        # offsets that vary with the key block (program_id(1) is 0): a loop-invariant [BQ] pointer tensor would be
        # hoisted out of the key loop and held in registers, 64-bit, for every chunk
        rows = rows + tl.program_id(1) * kb
        lse = tl.load(LSEh + rows, mask=ok, other=0.0)
        delta = tl.load(DELTAg + rows)
        p_t = _routed_probs(kblk, tl.trans(q), sel_t, oh_t, lse[None, :], sl2, MASK_BIAS, MULTI, CNT32,
                            PREC)  # [BK, BQ]
        dp_t = tl.dot(vblk, tl.trans(do), input_precision=PREC)
        ds_t = (p_t * (dp_t - delta[None, :])).to(DT)
        dv = tl.dot(p_t.to(DT), do, dv, input_precision=PREC)
        dk = tl.dot(ds_t, q, dk, input_precision=PREC)
        dq_t = tl.dot(tl.trans(kblk), ds_t, dq_t, input_precision=PREC)
    return dk, dv, dq_t


@triton.jit
def _shared_queries_t(q, do, delta, lse, r, vs, q_ok, lm_ok, cl2, ratio, dr, dvs, PREC: tl.constexpr):
    """Shared-logit gradients of one query chunk with landmarks as rows: ``dQ^T [D, BQ]`` (its ``c dS_sh R``
    part, divided by s), and ``dR`` (``c dS_sh^T Q``, divided by s) and ``dV~ = P_sh^T dO`` updated."""
    DT = q.dtype
    ps_t = tl.dot(r, tl.trans(q), input_precision=PREC) * cl2  # [MP, BQ]
    ps_t = tl.where(lm_ok[:, None] & q_ok[None, :], tl.exp2(ps_t - lse[None, :]), 0.0)
    dss_t = (ps_t * (tl.dot(vs, tl.trans(do), input_precision=PREC) - delta[None, :])).to(DT)  # [MP, BQ]
    dq_t = tl.dot(tl.trans(r), dss_t, input_precision=PREC) * ratio  # [D, BQ]
    dr += tl.dot(dss_t, q, input_precision=PREC) * ratio
    dvs = tl.dot(ps_t.to(DT), do, dvs, input_precision=PREC)
    return dq_t, dr, dvs


@triton.jit
def _open_chunk(c, Qh, DOh, Oh, LSEh, EXPh, DELTAg, r, vs, lm, lm_ok, N, stride_qn, stride_don, stride_on, offs_d, cl2,
                ratio, dr, dvs, BQ: tl.constexpr, D: tl.constexpr, MP: tl.constexpr, R_TOPK: tl.constexpr,
                ROUTED: tl.constexpr, SHARED: tl.constexpr, ODT: tl.constexpr, PREC: tl.constexpr):
    """Query chunk ``c`` of :func:`_bwd_head_keys_kernel` before its key loop: rows, q, dO, the expert one-hot
    ``[MP, BQ]`` (dtype ``ODT``), delta stored to ``DELTAg``, and ``dQ^T [D, BQ]`` opened with the shared logits'
    part (pre-divided by s) while ``dR`` and ``dV~`` take theirs."""
    rows = c * BQ + tl.arange(0, BQ)
    ok = rows < N
    q, do, delta, lse = _grad_rows(Qh, DOh, Oh, LSEh, rows, ok, stride_qn, stride_don, stride_on, offs_d)
    tl.store(DELTAg + rows, delta)
    oh = _onehot_t(EXPh, rows, ok, lm, R_TOPK).to(ODT) if ROUTED else tl.zeros([MP, BQ], ODT)
    dq = tl.zeros([D, BQ], tl.float32)
    if SHARED:
        dq, dr, dvs = _shared_queries_t(q, do, delta, lse, r, vs, ok, lm_ok, cl2, ratio, dr, dvs, PREC)
    return rows, ok, q, do, oh, dq, dr, dvs


@triton.jit
def _bwd_head_keys_kernel(
    Q, K, V, R, O, DO, LSE, SEL, EXP, VS, LSH, DQ, DK, DV, DR, POOL, DELTA,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_rb, stride_rh, stride_rm,
    stride_dob, stride_doh, stride_don, stride_ob, stride_oh, stride_on, stride_gb, stride_gh, stride_gn,
    H, N, M, NKB, scale, scale_shared,
    D: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr,
    R_TOPK: tl.constexpr, SHARED: tl.constexpr, ROUTED: tl.constexpr, MULTI: tl.constexpr, PREC: tl.constexpr,
    POOLED: tl.constexpr, CNT32: tl.constexpr = False, MASK_BIAS: tl.constexpr = 0.0,
):
    """One program per head as :func:`_bwd_head_kernel`, with keys as the rows of every tile: the queries in
    ``NP / BQ`` (at most 4) chunks, each with its own ``dQ^T [D, BQ]`` accumulator, key blocks of ``BK`` in a
    loop. ``s^T = K Q^T``, ``dP^T = V dO^T``, ``dV += P^T dO``, ``dK += dS^T Q``, ``dQ^T += K^T dS^T``: every
    product has ``BK`` or ``D`` rows, so with ``BK`` = 128 and 8 warps each warpgroup owns 64 rows of every
    tile (the query-major kernel's dK, dV products have ``BK`` = 32 rows). ``DELTA [G, NP]`` (fp32, scratch):
    ``rowsum(dO * O)``, written before the key loop and read back in it. ``MASK_BIAS`` (a power of two, or 0:
    off; only where no key counts twice and the inputs are 16-bit): the expert mask enters the routed logits
    as ``+ MASK_BIAS`` from a second product into the same accumulator, ``MASK_BIAS * s log2(e)`` is taken
    off with the lse, and the logits of keys outside it (``MASK_BIAS * s log2 e`` >= 500 lower) underflow
    to an exact 0: no ``[BK, BQ]`` count tile and no select."""
    scale, scale_shared = tl.cast(scale, tl.float32), tl.cast(scale_shared, tl.float32)  # see the module docstring
    DT = Q.dtype.element_ty
    NQC: tl.constexpr = NP // BQ
    ODT = DT if MASK_BIAS > 0 else tl.float16  # the expert-mask products' operands
    tl.static_assert(NQC <= 4, "at most 4 query chunks")
    g = tl.program_id(0).to(tl.int64)
    b = g // H
    h = g % H
    Qh = Q + b * stride_qb + h * stride_qh
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh
    DOh = DO + b * stride_dob + h * stride_doh
    Oh = O + b * stride_ob + h * stride_oh
    LSEh = LSE + g * N
    EXPh = EXP + g * N * R_TOPK
    DELTAg = DELTA + g * NP
    offs_d = tl.arange(0, D)
    lm = tl.arange(0, MP)
    lm_ok = lm < M
    sl2 = scale * 1.4426950408889634
    cl2 = scale_shared * 1.4426950408889634
    ratio = scale_shared / scale
    dr = tl.zeros([MP, D], tl.float32)
    dr_t = tl.zeros([D, MP], tl.float32)
    dvs = tl.zeros([MP, D], tl.float32)
    r = tl.zeros([MP, D], DT)  # (zeros without the shared expert: passed, not used)
    vs = tl.zeros([MP, D], DT)
    if SHARED:
        r = _rows(R + b * stride_rb + h * stride_rh, lm, lm_ok, stride_rm, offs_d)  # [MP, D]
        vs = tl.load(VS + (g * MP + lm[:, None]) * D + offs_d[None, :])  # [MP, D]
        lsh = tl.load(LSH + g * MP + lm)
    # chunk c: rows c*BQ.., its q, dO, expert one-hot [MP, BQ] and dQ^T [D, BQ] (delta into DELTA); dQ^T
    # accumulates s dS^T K, the shared part c dS_sh R enters pre-divided by s
    rows0, ok0, q0, do0, oh0, dq0, dr, dvs = _open_chunk(
        0, Qh, DOh, Oh, LSEh, EXPh, DELTAg, r, vs, lm, lm_ok, N, stride_qn, stride_don, stride_on, offs_d, cl2, ratio,
        dr, dvs, BQ, D, MP, R_TOPK, ROUTED, SHARED, ODT, PREC)
    if NQC > 1:
        rows1, ok1, q1, do1, oh1, dq1, dr, dvs = _open_chunk(
            1, Qh, DOh, Oh, LSEh, EXPh, DELTAg, r, vs, lm, lm_ok, N, stride_qn, stride_don, stride_on, offs_d, cl2,
            ratio, dr, dvs, BQ, D, MP, R_TOPK, ROUTED, SHARED, ODT, PREC)
    if NQC > 2:
        rows2, ok2, q2, do2, oh2, dq2, dr, dvs = _open_chunk(
            2, Qh, DOh, Oh, LSEh, EXPh, DELTAg, r, vs, lm, lm_ok, N, stride_qn, stride_don, stride_on, offs_d, cl2,
            ratio, dr, dvs, BQ, D, MP, R_TOPK, ROUTED, SHARED, ODT, PREC)
    if NQC > 3:
        rows3, ok3, q3, do3, oh3, dq3, dr, dvs = _open_chunk(
            3, Qh, DOh, Oh, LSEh, EXPh, DELTAg, r, vs, lm, lm_ok, N, stride_qn, stride_don, stride_on, offs_d, cl2,
            ratio, dr, dvs, BQ, D, MP, R_TOPK, ROUTED, SHARED, ODT, PREC)
    dvs_dt = dvs.to(DT)
    vs_dot = tl.sum(dvs * vs.to(tl.float32), 1) if SHARED else tl.zeros([MP], tl.float32)  # [MP]
    tl.debug_barrier()  # DELTA written by every thread before any reads it back
    for kb in range(NKB):
        kcols = kb * BK + tl.arange(0, BK)
        k_ok = kcols < N
        kblk = _rows(Kh, kcols, k_ok, stride_kn, offs_d)  # [BK, D]
        vblk = _rows(Vh, kcols, k_ok, stride_vn, offs_d)
        dk = tl.zeros([BK, D], tl.float32)
        dv = tl.zeros([BK, D], tl.float32)
        sel_t = tl.zeros([BK, MP], ODT)
        if ROUTED:
            sel_t = _sel_rows(SEL + g * MP * NP, lm, kcols, NP, ODT, MASK_BIAS, True)  # [BK, MP]
        dk, dv, dq0 = _keys_pass(q0, do0, LSEh, DELTAg, rows0, ok0, kb, oh0, kblk, vblk, sel_t, dk, dv, dq0, sl2,
                                 ROUTED, MULTI, PREC, CNT32, MASK_BIAS)
        if NQC > 1:
            dk, dv, dq1 = _keys_pass(q1, do1, LSEh, DELTAg, rows1, ok1, kb, oh1, kblk, vblk, sel_t, dk, dv, dq1, sl2,
                                     ROUTED, MULTI, PREC, CNT32, MASK_BIAS)
        if NQC > 2:
            dk, dv, dq2 = _keys_pass(q2, do2, LSEh, DELTAg, rows2, ok2, kb, oh2, kblk, vblk, sel_t, dk, dv, dq2, sl2,
                                     ROUTED, MULTI, PREC, CNT32, MASK_BIAS)
        if NQC > 3:
            dk, dv, dq3 = _keys_pass(q3, do3, LSEh, DELTAg, rows3, ok3, kb, oh3, kblk, vblk, sel_t, dk, dv, dq3, sl2,
                                     ROUTED, MULTI, PREC, CNT32, MASK_BIAS)
        if SHARED:
            dk, dv, dl_t = _shared_key_grads(kblk, vblk, r, lsh, dvs_dt, vs_dot, k_ok, lm_ok, sl2, dk, dv, PREC)
            dr_t = tl.dot(tl.trans(kblk), dl_t, dr_t, input_precision=PREC)  # [D, MP]
        out = b * stride_gb + h * stride_gh + kcols[:, None] * stride_gn + offs_d[None, :]
        tl.store(DK + out, (dk * scale).to(DT), mask=k_ok[:, None])
        tl.store(DV + out, dv.to(DT), mask=k_ok[:, None])
    drt = dr_t + tl.trans(dr)  # [D, MP], divided by s
    DQh = DQ + b * stride_gb + h * stride_gh + offs_d[:, None]
    # landmarks W Q (POOLED): their gradient goes back into dq as W^T dR, here dQ^T += dR^T W
    _store_dq_t(DQh, dq0, drt, POOL, lm, rows0, ok0, stride_gn, scale, NP, POOLED and SHARED, PREC)
    if NQC > 1:
        _store_dq_t(DQh, dq1, drt, POOL, lm, rows1, ok1, stride_gn, scale, NP, POOLED and SHARED, PREC)
    if NQC > 2:
        _store_dq_t(DQh, dq2, drt, POOL, lm, rows2, ok2, stride_gn, scale, NP, POOLED and SHARED, PREC)
    if NQC > 3:
        _store_dq_t(DQh, dq3, drt, POOL, lm, rows3, ok3, stride_gn, scale, NP, POOLED and SHARED, PREC)
    if SHARED and not POOLED:
        tl.store(DR + (g * M + lm[None, :]) * D + offs_d[:, None], (drt * scale).to(DT), mask=lm_ok[None, :])


@triton.jit
def _store_dq_t(DQh, dq_t, drt, POOL, lm, rows, ok, stride_gn, scale, NP: tl.constexpr, POOLED: tl.constexpr,
                PREC: tl.constexpr):
    """Stores ``dQ^T [D, BQ]`` of rows ``rows`` (scaled by s), with ``dR^T W`` added first where ``POOLED``."""
    if POOLED:
        w = tl.load(POOL + lm[:, None] * NP + rows[None, :])  # [MP, BQ]
        dq_t = tl.dot(drt, w, dq_t, input_precision=PREC)
    tl.store(DQh + rows[None, :] * stride_gn, (dq_t * scale).to(DQh.dtype.element_ty), mask=ok[None, :])


@triton.jit
def _bwd_kernel(
    Q, K, V, R, O, DO, LSE, SEL, EXP, VS, LSH, DQ, DK, DV, DR, DVS,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_rb, stride_rh, stride_rm,
    stride_dob, stride_doh, stride_don, stride_ob, stride_oh, stride_on, stride_gb, stride_gh, stride_gn,
    H, N, M, NKB, NQB, scale, scale_shared,
    D: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    R_TOPK: tl.constexpr, SHARED: tl.constexpr, ROUTED: tl.constexpr, MULTI: tl.constexpr, PREC: tl.constexpr,
    PHASE: tl.constexpr, CNT32: tl.constexpr = False, MASK_BIAS: tl.constexpr = 0.0,
):
    scale, scale_shared = tl.cast(scale, tl.float32), tl.cast(scale_shared, tl.float32)  # see the module docstring
    # PHASE 0, one launch: programs (g, j): j < NKB own a key block (dK, dV), the next NQB a query block (dQ),
    # the last dR. Two launches, each compiled for its own programs only (fewer registers than the three
    # kinds together): PHASE 1: j < NQB a query block, the last dR and dV~ into DVS [G, MP, D] (fp32);
    # PHASE 2: j < NKB a key block, reading dV~.
    g = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    b = g // H
    h = g % H
    Qh = Q + b * stride_qb + h * stride_qh
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh
    Rh = R + b * stride_rb + h * stride_rh
    DOh = DO + b * stride_dob + h * stride_doh
    Oh = O + b * stride_ob + h * stride_oh
    n_keys = NKB if PHASE == 0 else 0
    if PHASE == 2 or (PHASE == 0 and j < NKB):
        _bwd_keys(
            Qh, Kh, Vh, Rh, Oh, DOh, LSE + g * N, SEL + g * MP * NP, EXP + g * N * R_TOPK, VS + g * MP * D,
            LSH + g * MP, DK + b * stride_gb + h * stride_gh, DV + b * stride_gb + h * stride_gh, DVS + g * MP * D,
            stride_qn, stride_kn, stride_vn, stride_rm, stride_don, stride_on, stride_gn,
            j, N, M, NQB, scale, scale_shared, D, MP, NP, BQ, BK, R_TOPK, SHARED, ROUTED, MULTI, PREC, PHASE == 2,
            CNT32, MASK_BIAS,
        )
    elif j < n_keys + NQB:
        _bwd_queries(
            Qh, Kh, Vh, Rh, Oh, DOh, LSE + g * N, SEL + g * MP * NP, EXP + g * N * R_TOPK, VS + g * MP * D,
            DQ + b * stride_gb + h * stride_gh,
            stride_qn, stride_kn, stride_vn, stride_rm, stride_don, stride_on, stride_gn,
            j - n_keys, N, M, NKB, scale, scale_shared, D, MP, NP, BQ, BK, R_TOPK, SHARED, ROUTED, MULTI, PREC, CNT32,
            MASK_BIAS,
        )
    elif SHARED:
        _bwd_landmarks(
            Qh, Kh, Vh, Rh, Oh, DOh, LSE + g * N, VS + g * MP * D, LSH + g * MP, DR + g * M * D, DVS + g * MP * D,
            stride_qn, stride_kn, stride_vn, stride_rm, stride_don, stride_on,
            N, M, NQB, NKB, scale, scale_shared, D, MP, BQ, BK, PREC, PHASE == 1,
        )


def padded(n: int) -> int:
    """``n`` rounded up to a power of two >= 16 (``tl.dot``'s minimum)."""
    return max(16, next_power_of_2(n))


def _wide(n_pad: int, head_dim: int, itemsize: int) -> bool:
    """Whether the 8-warp configs (forward: all 256 queries of a head at once; backward: one program per head)
    take the case: only where they were checked on sm_90 with Triton 3.6 (N in (128, 256], d = 64, fp16/bf16;
    Triton 3.6 miscompiled other tile shapes at d = 32 before, see bwd_config)."""
    return n_pad == 256 and head_dim == 64 and itemsize == 2


def pools_in_kernel(n: int, head_dim: int, itemsize: int) -> bool:
    """Whether the kernels can pool the landmarks from q themselves (``pool=``): the configs that keep a
    whole head in one program, forward and backward (:func:`_wide`)."""
    return _wide(padded(n), head_dim, itemsize)


def pool_weights(weights: torch.Tensor) -> torch.Tensor:
    """``[m, N]`` pooling weights (landmark j = sum_n weights[j, n] q_n) as the kernels take them: fp32,
    zero-padded to ``[MP, NP]``, contiguous."""
    m, n = weights.shape
    out = weights.new_zeros(padded(m), padded(n), dtype=torch.float32)
    out[:m, :n] = weights
    return out


def fwd_config(num_heads: int, n_pad: int, m_pad: int, head_dim: int, itemsize: int) -> dict:
    """Forward launches: query block ``BQ``, key block ``BK``, ``QB_PER_PROG`` query blocks per program, warps,
    pipeline stages; ``prep_bm`` / ``prep_warps`` (optional): the top-k mask and the shared values in a
    launch of its own (``_prep_kernel``, ``prep_bm`` landmarks a program) instead of inside the attention
    programs; ``select_search`` (optional, default 0: the value-space search was no faster on an H200):
    passes of the value-space top-k search before the bitwise one (:func:`_store_topk`); ``select_check``
    (optional, default 1): passes of the bitwise search between asking whether every row is done.

    Where :func:`_wide` holds: the prep launch (32 landmarks, 4 warps) and 8-warp attention programs of 128
    queries (H200, DeiT-S shape, bf16, GPU time: prep 133 + attention 157 us against 363 us for one 8-warp
    program a head selecting itself; scripts/bench_short.py --configs sweep --kernel-times). Elsewhere the
    selection stays inside the attention programs; with many (batch, head) pairs one program takes every
    query block of its head (selecting once), with few the blocks are spread over programs.
    """
    if _wide(n_pad, head_dim, itemsize):
        return {"BQ": 128, "BK": 64, "QB_PER_PROG": 1, "num_warps": 8, "num_stages": 1,
                "prep_bm": 32, "prep_warps": 4}
    bq = min(n_pad, 64)
    return {
        "BQ": bq,
        "BK": min(n_pad, 64),
        "QB_PER_PROG": cdiv(n_pad, bq) if num_heads >= 264 else 1,
        "num_warps": 4,
        "num_stages": 1,
    }


def bwd_config(n_pad: int, m_pad: int, head_dim: int, itemsize: int) -> dict:
    """Backward launch: one program per head (``per_head``: every query at once, key blocks of ``BK``; its
    ``[NP, d]`` tiles take 200 KB of shared memory at d = 64) where :func:`_wide` holds, else programs per
    key block, query block and landmark block (``BQ``, ``BK``); warps, stages. ``split`` (optional, not yet
    timed): the block programs in two launches, query blocks and dR first (storing ``dV~``), key blocks
    second, each compiled for its own programs (``split_warps``: the warps of each).

    H200, DeiT-S shape, bf16: backward 0.82 ms with one program per head against 1.18 ms with programs
    per block. The per-head program loads its key blocks three stages ahead (cp.async): on an H100 its kernel
    takes 482-486 us against 572 with one stage, 526 with two, 479 with four, whose 224 KB of shared memory
    leave no room for the pooled variant (BENCHMARKS.md, "The expert mask as a logit bias"). With 64 landmark
    slots (33-64 landmarks) three stages take 236 KB, past the 227 KB a Hopper program may have (sm_90, Triton 3.6
    and 3.8): two stages there.
    """
    if _wide(n_pad, head_dim, itemsize):
        return {"BQ": 64, "BK": 32, "num_warps": 8, "num_stages": 3 if m_pad <= 32 else 2, "per_head": True}
    block = min(n_pad, 64)
    if head_dim == 32 and m_pad >= 64:
        # Triton 3.6 on sm_90 gave wrong dK, dV here with 64-row blocks (relative error 0.2 at N <= 64,
        # m = 64, bf16); 32-row blocks are right
        block = min(block, 32)
    return {"BQ": block, "BK": block, "num_warps": 4, "num_stages": 1}


def key_blocks(n: int, block: int):
    """``(full, tail)``: the routed key loops' blocks of ``block`` keys and, with ``KEY_TAIL``, a last block of
    ``tail`` keys (a power of two >= 16, below ``block``) for the ``n mod block`` keys left, where that is
    narrower than a block (``tail = 0``: none). N = 197 with 64-key blocks: 3 blocks and one of 16 keys, 208
    columns instead of 256."""
    rest = n % block
    if KEY_TAIL and rest and padded(rest) < block:
        return n // block, padded(rest)
    return cdiv(n, block), 0


def _mask_bias(dtype: torch.dtype, multi: bool, blocks: bool = False) -> float:
    """``MASK_BIAS`` for a launch (0.0: counts instead): only with 16-bit inputs and no key counted twice, and for
    the block backward (``blocks``) only with ``MASK_BIAS_BLOCKS``."""
    on = MASK_BIAS > 0 and not multi and dtype != torch.float32 and (MASK_BIAS_BLOCKS or not blocks)
    return MASK_BIAS if on else 0.0


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot`` precision: IEEE fp32 unless TF32 is allowed; fp16/bf16 operands ignore it."""
    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def saved_shapes(B: int, H: int, N: int, m: int, d: int, router_topk: int, topk: int, shared: bool):
    """Shapes of what the forward keeps for the backward: ``sel``, ``expert``, ``vs``, ``lse_sh``
    (``(0,)`` for a part the case does not use)."""
    G, MP, NP = B * H, padded(m), padded(N)
    return ((G, MP, NP) if topk > 0 else (0,), (G, N, router_topk) if topk > 0 else (0,),
            (G, MP, d) if shared else (0,), (G, MP) if shared else (0,))


# Host side: each launch goes through the launcher of the kernel Triton compiled for its first call
# (launch.py), and what does not change between calls of one shape (configs, grids, compile-time arguments)
# is worked out once per shape (``_plan``), whose key then stands for them in the launcher's cache.
_PLANS = {}
_CACHE_LIMIT = 512


def _launch(name, kernel, grid, args, meta, key):
    """``kernel[grid](*args, **meta)`` through :func:`launch.launch`; ``key`` fixes everything Triton
    specializes the kernel on except the tensors' dtypes and alignment (the value of every int argument, the
    device and ``meta``)."""
    LAUNCHED[name] = launch(kernel, grid, args, meta, key=key)


def _plan(key, make):
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _CACHE_LIMIT:
            _PLANS.clear()
        plan = _PLANS[key] = make()
    return plan


def _forward_plan(q, k, v, landmarks, topk, router_topk, shared, select, pooled, num_landmarks, allow_tf32):
    B, H, N, D = q.shape
    M = landmarks.shape[2] if not pooled else num_landmarks
    G, n_pad, m_pad = B * H, padded(N), padded(M)
    routed = topk > 0
    cfg = fwd_config(G, n_pad, m_pad, D, q.element_size())
    if pooled and not pools_in_kernel(N, D, q.element_size()):
        raise ValueError(f"pooling inside the kernel needs N in (128, 256], d = 64, fp16/bf16; got N={N}, d={D}")
    # per-landmark work (pooling, selection, shared values) in a launch of its own where the config has one
    prep = bool(cfg.get("prep_bm")) and (pooled or shared or (select and routed))
    prec = _precision(q.dtype, allow_tf32)
    lm_strides = (H * m_pad * D, m_pad * D, D) if pooled else _strides(landmarks)
    plan = {
        "M": M, "shapes": saved_shapes(B, H, N, M, D, router_topk, topk, shared), "lmk": (G, m_pad, D),
        "prep": None,
    }
    if prep:
        bm = min(cfg["prep_bm"], m_pad)
        plan["prep"] = ((G, m_pad // bm), (*_strides(q), *_strides(k), *_strides(v), *lm_strides,
                                           H, N, M, topk, D ** -0.5), dict(
            D=D, MP=m_pad, NP=n_pad, BM=bm, DC=16, BKC=min(n_pad, 64), SELECT=select and routed, SHARED=shared,
            POOLED=pooled, PREC=prec, SEARCH=cfg.get("select_search", 0), CHECK=cfg.get("select_check", 1),
            num_warps=cfg.get("prep_warps") or max(1, bm // 16), num_stages=1))
    out_strides = (N * H * D, D, H * D)  # token-major, see forward
    nkb, bkt = key_blocks(N, cfg["BK"])
    plan["fwd"] = ((G, cdiv(cdiv(N, cfg["BQ"]), cfg["QB_PER_PROG"])), (
        *_strides(q), *_strides(k), *_strides(v), *lm_strides, *out_strides,
        H, N, M, topk, nkb, D ** -0.5), dict(BKT=bkt,
        D=D, MP=m_pad, NP=n_pad, BQ=cfg["BQ"], BK=cfg["BK"], QB_PER_PROG=cfg["QB_PER_PROG"],
        R_TOPK=router_topk, SHARED=shared, ROUTED=routed, SELECT=select and routed,
        MULTI=router_topk == 2 or not select, SELECT_HERE=select and routed and not prep, POOLED=pooled and not prep,
        PREP=prep, SEARCH=cfg.get("select_search", 0), CHECK=cfg.get("select_check", 1), CNT32=COUNT_FP32,
        MASK_BIAS=_mask_bias(q.dtype, router_topk == 2 or not select),
        PREC=prec, num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 1)))
    return plan


def forward(q, k, v, landmarks, topk, router_topk, shared, scale_shared, *, sel=None, expert=None,
            pool=None, num_landmarks=None, allow_tf32=False, alloc=torch.empty, launcher=None):
    """Fused forward. ``q, k, v [B, H, N, d]``, ``landmarks [B, H, m, d]`` with unit last stride.

    With ``sel [G, MP, NP]`` (uint8 multiplicity mask) and ``expert [G, N, r]`` (int32, contiguous) the
    routing is taken from them; otherwise it is selected in the kernel. With ``pool`` (``[MP, NP]`` fp32
    pooling weights, zero-padded, see :func:`pool_weights`) and ``num_landmarks`` the landmarks are
    ``pool @ q``, computed in the kernel (``landmarks`` is ignored; only where :func:`pools_in_kernel` holds).
    ``alloc(shape, dtype=, device=)`` allocates the outputs (tests pass a poisoning one); ``launcher`` (as
    :func:`_launch`, the default) launches the kernels (``small_traced`` passes one for torch.compile). Returns
    ``out [B, H, N, d]`` (token-major memory), ``lse [G, N]`` (base 2), ``sel``, ``expert``, ``vs``, ``lse_sh``
    (see the module docstring) and ``lmk [G, MP, d]``, the pooled landmarks (empty without ``pool``).
    """
    B, H, N, D = q.shape
    dev = q.device
    select = expert is None
    pooled = pool is not None
    launch_ = launcher or _launch
    key = ("fwd", q.shape, q.stride(), k.stride(), v.stride(), None if pooled else landmarks.shape,
           None if pooled else landmarks.stride(), q.dtype, dev, topk, router_topk, shared, select, pooled,
           num_landmarks, allow_tf32, fwd_config, COUNT_FP32, MASK_BIAS, KEY_TAIL)
    plan = _plan(key, lambda: _forward_plan(q, k, v, landmarks, topk, router_topk, shared, select, pooled,
                                                   num_landmarks, allow_tf32))
    sel_shape, exp_shape, vs_shape, lsh_shape = plan["shapes"]
    # what the prep launch writes first, so that it starts as early as it can
    if select:
        sel = alloc(sel_shape, dtype=torch.uint8, device=dev)
    vs = alloc(vs_shape, dtype=q.dtype, device=dev)
    lsh = alloc(lsh_shape, dtype=torch.float32, device=dev)
    if pooled:
        lmk = alloc(plan["lmk"], dtype=q.dtype, device=dev)
        landmarks = lmk.view(B, H, plan["lmk"][1], D)
    else:
        lmk = alloc((0,), dtype=q.dtype, device=dev)
    if plan["prep"] is not None:
        grid, ints, meta = plan["prep"]
        launch_("prep", _prep_kernel, grid, (q, k, v, landmarks, sel, vs, lsh, pool if pooled else lsh, lmk, *ints),
                meta, (key, "prep"))
    # token-major memory ([B, N, H, d] viewed as [B, H, N, d]), as SDPA returns its output: the layer's
    # out.transpose(1, 2).reshape(B, N, C) is then a view, and the projection saves this very tensor
    out = alloc((B, N, H, D), dtype=q.dtype, device=dev).transpose(1, 2)
    lse = alloc((B * H, N), dtype=torch.float32, device=dev)
    if select:
        expert = alloc(exp_shape, dtype=torch.int32, device=dev)
    grid, ints, meta = plan["fwd"]
    launch_("fwd", _fwd_kernel, grid, (q, k, v, landmarks, out, lse, sel, expert, vs, lsh, pool if pooled else lsh,
                                       lmk, *ints, scale_shared), meta, (key, "fwd"))
    return out, lse, sel, expert, vs, lsh, lmk


def _backward_plan(q, k, v, landmarks, out, grad_out, topk, router_topk, shared, multi, pooled, num_landmarks,
                   allow_tf32, grad_strides):
    B, H, N, D = q.shape
    M = landmarks.shape[2] if not pooled else num_landmarks
    G, n_pad, m_pad = B * H, padded(N), padded(M)
    cfg = bwd_config(n_pad, m_pad, D, q.element_size())
    n_qb, n_kb = cdiv(N, cfg["BQ"]), cdiv(N, cfg["BK"])
    per_head = cfg.get("per_head", False)
    if pooled and not per_head:
        raise ValueError("pooling inside the kernel needs the one-program-per-head backward")
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(landmarks), *_strides(grad_out), *_strides(out),
               *grad_strides)
    common = dict(D=D, MP=m_pad, NP=n_pad, BK=cfg["BK"], R_TOPK=router_topk, SHARED=shared, ROUTED=topk > 0,
                  MULTI=multi, PREC=_precision(q.dtype, allow_tf32), CNT32=COUNT_FP32,
                  MASK_BIAS=_mask_bias(q.dtype, multi, not per_head), num_warps=cfg["num_warps"],
                  num_stages=cfg.get("num_stages", 1))
    if per_head:
        meta = dict(common, POOLED=pooled)
        kernel = _bwd_head_kernel
        if cfg.get("key_rows", False):
            # query chunks of BQ rows, at most 4 of them
            kernel, meta["BQ"] = _bwd_head_keys_kernel, max(min(cfg["BQ"], n_pad), n_pad // 4)
        return {"M": M, "per_head": True, "kernel": kernel, "launch": ((G,), (*strides, H, N, M, n_kb, D ** -0.5),
                                                                         meta)}
    ints = (*strides, H, N, M, n_kb, n_qb, D ** -0.5)
    if not cfg.get("split", False):
        return {"M": M, "per_head": False, "launches": [((G, n_kb + n_qb + int(shared)), ints,
                                                         dict(common, BQ=cfg["BQ"], PHASE=0))]}
    # two launches: query blocks and dR (storing dV~), then key blocks; warps of each
    w1, w2 = cfg.get("split_warps", (cfg["num_warps"], cfg["num_warps"]))
    return {"M": M, "per_head": False, "dvs": (G, m_pad, D) if shared else None, "launches": [
        ((G, n_qb + int(shared)), ints, dict(common, BQ=cfg["BQ"], PHASE=1, num_warps=w1)),
        ((G, n_kb), ints, dict(common, BQ=cfg["BQ"], PHASE=2, num_warps=w2))]}


def backward(q, k, v, landmarks, out, grad_out, lse, sel, expert, vs, lsh, topk, shared, scale_shared, multi, *,
             pool=None, num_landmarks=None, lmk=None, allow_tf32=False, alloc=torch.empty, packed=False,
             launcher=None):
    """Fused backward: ``dq, dk, dv [B, H, N, d]`` and ``dR [B, H, m, d]``, every element written once
    (``dR`` is None without the shared expert: the landmarks then only select, which has no gradient).
    ``multi``: the mask may count a key more than once for a query (r = 2, or a routing passed in).
    With ``pool`` (and the forward's ``lmk``) the landmark gradient goes into ``dq`` and ``dR`` is None.
    With ``packed`` dq, dk, dv are views of one ``[B, N, 3, H, d]`` tensor (the gradient of a ViT's qkv
    projection output, as timm reshapes it), returned as a fifth value. ``launcher`` as in :func:`forward`."""
    B, H, N, D = q.shape
    dev = q.device
    pooled = pool is not None
    launch_ = launcher or _launch
    if pooled:
        landmarks = lmk.view(B, H, lmk.shape[1], D)
    if packed:
        dqkv = alloc((B, N, 3, H, D), dtype=q.dtype, device=dev)
        dq, dk, dv = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        dqkv = None
        dq, dk, dv = (alloc((B, H, N, D), dtype=q.dtype, device=dev) for _ in range(3))
    router_topk = expert.shape[-1] if topk > 0 else 1
    key = ("bwd", q.shape, q.stride(), k.stride(), v.stride(), landmarks.shape, landmarks.stride(),
           grad_out.stride(), out.stride(), q.dtype, dev, topk, router_topk, shared, multi, pooled, num_landmarks,
           allow_tf32, packed, bwd_config, COUNT_FP32, MASK_BIAS, MASK_BIAS_BLOCKS, KEY_TAIL)
    plan = _plan(key, lambda: _backward_plan(q, k, v, landmarks, out, grad_out, topk, router_topk, shared,
                                                    multi, pooled, num_landmarks, allow_tf32, _strides(dq)))
    M = plan["M"]
    dr = alloc((B, H, M, D), dtype=q.dtype, device=dev) if shared and not pooled else dq
    tensors = (q, k, v, landmarks, out, grad_out, lse, sel, expert, vs, lsh, dq, dk, dv, dr)
    if plan["per_head"]:
        grid, ints, meta = plan["launch"]
        extra = (alloc((B * H, padded(N)), dtype=torch.float32, device=dev),) if "BQ" in meta else ()  # DELTA
        launch_("bwd", plan["kernel"], grid, (*tensors, pool if pooled else lsh, *extra, *ints, scale_shared),
                meta, key)
    else:
        # dV~ between the two launches of the split backward (fp32, [G, MP, d])
        dvs = alloc(plan["dvs"], dtype=torch.float32, device=dev) if plan.get("dvs") else lsh
        for i, (grid, ints, meta) in enumerate(plan["launches"]):
            launch_(f"bwd{i or ''}", _bwd_kernel, grid, (*tensors, dvs, *ints, scale_shared), meta, (key, i))
    dr = dr if shared and not pooled else None
    return (dq, dk, dv, dr, dqkv) if packed else (dq, dk, dv, dr)
