"""Fused Triton kernels of MiTA for short sequences: routing, shared expert and attention in one launch.

For N up to a few hundred tokens (ViT/DeiT: 197) the whole selection of a (batch, head) fits in one
program, so the kernels work like FlashAttention with MiTA's selection as a multiplicity mask:

* forward (one launch), programs (batch-head g, group of query blocks):
  1. landmark-key scores ``SK = R K^T [MP, NP]`` (fp32, unscaled, all keys at once since top-k needs whole
     rows) and the top-k mask ``Sel [MP, NP]`` in registers (or ``Sel`` scattered from a given
     ``topk_idx``); the program stores its copy of ``Sel`` (uint8) and reads it back in ``[MP, BK]``
     slices (registers cannot be sliced); the copy of group 0 is kept for the backward, and group 0
     writes ``topk_idx`` when asked;
  2. shared values ``V~ = softmax(s SK) V`` by an online softmax over key blocks;
  3. per block of ``BQ`` queries: gate ``Q R^T`` and the expert ids ``e1`` (``e2`` for r = 2; written when
     selecting), then ONE online softmax over the shared logits ``c Q R^T`` and, key block by key block,
     the routed logits ``s Q K^T`` weighted by the multiplicity ``C[n, i] = Sel[e1(n), i] + Sel[e2(n), i]``
     (gathered from the uint8 mask): a key picked by both experts of a query counts twice.
* backward (one launch; FlashAttention's recomputation from ``lse`` and ``delta = rowsum(dO * O)``,
  reusing the forward's ``Sel`` and expert ids), programs ``(g, j)``: key blocks own ``dK, dV`` (routed
  pairs over all query blocks, then the path through ``V~ = A V``, ``A = softmax(s R K^T)``), query
  blocks own ``dQ``, and one program per head owns ``dR``. Each output element has one writer: no atomics.
  The key and landmark programs work on transposed tiles (keys or landmarks as rows, as FlashAttention's
  dK/dV loop), so no product takes a transposed register tile as its left operand.

Top-k selection without a sort: scores are mapped to order-preserving int32 keys and the k-th largest key
of each row is found bit by bit (32 counting passes, whatever k is); keys above it are selected, and ties
at it go to the smallest indices (a prefix count), so every row selects exactly k keys.

Layouts (``G = B H``): q, k, v, dO ``[B, H, N, d]`` and landmarks ``[B, H, m, d]`` with any strides but a
unit last one; out ``[B, H, N, d]`` token-major (``[B, N, H, d]`` memory, as SDPA's), any strides with a unit
last one when read back by the backward; dq, dk, dv, dR contiguous in the input dtype; ``lse [G, N]`` fp32; ``Sel
[G, P, MP, NP]`` uint8 (P programs per head along the queries); ``topk_idx [G, m, topk]`` and
``expert_idx [G, N, r]`` int64. ``MP``, ``NP`` are m and N padded to powers of two >= 16 (``tl.dot``'s
minimum). All dots accumulate in fp32; fp32 inputs use ``input_precision="ieee"`` unless TF32 is allowed.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _select_topk(sk, key_ok, TOPK):
    """0/1 int32 mask of the TOPK largest entries of each row of ``sk`` (ties: smallest index first)."""
    bits = sk.to(tl.int32, bitcast=True)
    # flipping the magnitude bits of negative floats makes int32 order equal float order
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(key_ok[None, :], key, -2147483648)
    # thr = the largest t with count(key >= t) >= TOPK, i.e. the TOPK-th largest key: sign bit first,
    # then the 31 lower bits from the top (with the sign fixed, setting a lower bit raises the value)
    n_pos = tl.sum((key >= 0).to(tl.int32), 1)
    thr = tl.where(n_pos >= TOPK, 0, -2147483648)
    for b in tl.static_range(31):
        cand = thr | (1 << (30 - b))
        n_ge = tl.sum((key >= cand[:, None]).to(tl.int32), 1)
        thr = tl.where(n_ge >= TOPK, cand, thr)
    sel = key >= thr[:, None]
    # more keys than TOPK only where several tie at the threshold: then the lowest indices among them
    # (a prefix count, kept off the common path for its registers)
    if tl.max(tl.sum(sel.to(tl.int32), 1), 0) > TOPK:
        above = key > thr[:, None]
        need = TOPK - tl.sum(above.to(tl.int32), 1)
        tie = (key == thr[:, None]).to(tl.int32)
        sel = above | ((tie > 0) & (tl.cumsum(tie, 1) <= need[:, None]))
    return sel.to(tl.int32)


@triton.jit
def _routing_mask(IDXh, lm, lm_ok, keys, TOPK, MP: tl.constexpr, NP: tl.constexpr):
    """Multiplicity mask ``[MP, NP]`` of a given ``topk_idx`` (a key listed twice by one expert counts twice)."""
    sel = tl.zeros([MP, NP], tl.int32)
    for t in range(TOPK):
        idx = tl.load(IDXh + lm * TOPK + t, mask=lm_ok, other=-1)  # [MP]
        sel += (keys[None, :] == idx[:, None]).to(tl.int32)
    return sel


@triton.jit
def _argmax_first(x, cols, WIDTH: tl.constexpr):
    """Column of each row's maximum, the smallest one among ties."""
    xmax = tl.max(x, 1)
    return tl.min(tl.where(x == xmax[:, None], cols[None, :], WIDTH), 1)


@triton.jit
def _experts(EXPh, rows, q_ok, R_TOPK: tl.constexpr):
    """Stored expert ids of a block of queries (padding rows: expert 0); the second equals the first for r = 1."""
    e1 = tl.load(EXPh + rows * R_TOPK, mask=q_ok, other=0)
    e2 = e1
    if R_TOPK == 2:
        e2 = tl.load(EXPh + rows * R_TOPK + 1, mask=q_ok, other=0)
    return e1, e2


@triton.jit
def _multiplicity(SELh, e1, e2, kcols, NP: tl.constexpr, R_TOPK: tl.constexpr, TRANSPOSED: tl.constexpr):
    """How often each key of ``kcols`` is in a query's experts, ``C[n, i] = Sel[e1(n), i] + Sel[e2(n), i]``
    (r = 2; a key in both experts counts twice), gathered from the uint8 mask: ``[BQ, BK]`` fp32, or
    ``[BK, BQ]`` when TRANSPOSED."""
    if TRANSPOSED:
        cnt = tl.load(SELh + e1[None, :] * NP + kcols[:, None]).to(tl.float32)
        if R_TOPK == 2:
            cnt += tl.load(SELh + e2[None, :] * NP + kcols[:, None]).to(tl.float32)
    else:
        cnt = tl.load(SELh + e1[:, None] * NP + kcols[None, :]).to(tl.float32)
        if R_TOPK == 2:
            cnt += tl.load(SELh + e2[:, None] * NP + kcols[None, :]).to(tl.float32)
    return cnt


@triton.jit
def _key_block(Kh, Vh, kcols, k_ok, stride_kn, stride_vn, offs_d):
    kblk = tl.load(Kh + kcols[:, None] * stride_kn + offs_d[None, :], mask=k_ok[:, None], other=0.0)  # [BK, D]
    vblk = tl.load(Vh + kcols[:, None] * stride_vn + offs_d[None, :], mask=k_ok[:, None], other=0.0)  # [BK, D]
    return kblk, vblk


@triton.jit
def _shared_values(r, Kh, Vh, stride_kn, stride_vn, N, NKB, scale, offs_d,
                   MP: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Shared values ``V~ = softmax(s R K^T) V`` (fp32 ``[MP, D]``) by an online softmax over key blocks,
    with the row max and row sum of the landmark attention (to recompute its blocks)."""
    m_i = tl.full([MP], float("-inf"), tl.float32)
    l_i = tl.zeros([MP], tl.float32)
    acc = tl.zeros([MP, D], tl.float32)
    for kb in range(NKB):
        kcols = kb * BK + tl.arange(0, BK)
        k_ok = kcols < N
        kblk, vblk = _key_block(Kh, Vh, kcols, k_ok, stride_kn, stride_vn, offs_d)
        z = tl.dot(r, tl.trans(kblk), input_precision=PREC) * scale  # [MP, BK]
        z = tl.where(k_ok[None, :], z, float("-inf"))
        # every key block holds a valid key, so m_new is finite from the first block on
        m_new = tl.maximum(m_i, tl.max(z, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vblk.dtype), vblk, input_precision=PREC)
        m_i = m_new
    return acc / l_i[:, None], m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, R, O, LSE, SEL, TOPK_IDX, EXPERT_IDX,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_rb, stride_rh, stride_rm, stride_ob, stride_oh, stride_on,
    H, N, M, TOPK, NKB, scale, scale_shared,
    D: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    DC: tl.constexpr, QB_PER_PROG: tl.constexpr, R_TOPK: tl.constexpr, SHARED: tl.constexpr,
    ROUTED: tl.constexpr, SELECT: tl.constexpr, WRITE_TOPK: tl.constexpr, PREC: tl.constexpr,
):
    # programs (g, grp): batch-head g, query blocks grp*QB_PER_PROG .. (grp+1)*QB_PER_PROG - 1
    DT = Q.dtype.element_ty
    g = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    b = g // H
    h = g % H
    Qh = Q + b * stride_qb + h * stride_qh
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh
    Rh = R + b * stride_rb + h * stride_rh
    offs_d = tl.arange(0, D)
    lm = tl.arange(0, MP)
    lm_ok = lm < M
    r = tl.load(Rh + lm[:, None] * stride_rm + offs_d[None, :], mask=lm_ok[:, None], other=0.0)  # [MP, D]

    if ROUTED:
        keys = tl.arange(0, NP)
        key_ok = keys < N
        if SELECT:
            # unscaled landmark-key scores of all keys at once (top-k needs whole rows), the head dim in
            # chunks of DC so that one [DC, NP] key tile bounds the shared memory
            sk = tl.zeros([MP, NP], tl.float32)
            for c in tl.static_range(D // DC):
                offs_c = c * DC + tl.arange(0, DC)
                r_c = tl.load(Rh + lm[:, None] * stride_rm + offs_c[None, :], mask=lm_ok[:, None], other=0.0)
                kt_c = tl.load(Kh + keys[None, :] * stride_kn + offs_c[:, None], mask=key_ok[None, :], other=0.0)
                sk = tl.dot(r_c, kt_c, sk, input_precision=PREC)
            sel = _select_topk(sk, key_ok, TOPK)  # [MP, NP]
        else:
            sel = _routing_mask(TOPK_IDX + g * M * TOPK, lm, lm_ok, keys, TOPK, MP, NP)
        # this program's copy of the mask (slot grp; the backward reads slot 0): the key-block loops
        # below read it back in [MP, BK] slices, which registers cannot be cut into
        SELg = SEL + (g * tl.num_programs(1) + grp) * MP * NP
        tl.store(SELg + lm[:, None] * NP + keys[None, :], sel.to(tl.uint8))
        tl.debug_barrier()
        if WRITE_TOPK:
            if grp == 0:
                # selected keys of each row in ascending order, 16 rows at a time (the scatter's
                # pointers would otherwise take two registers per element of the whole mask)
                for j0 in tl.static_range(0, MP, 16):
                    lj = j0 + tl.arange(0, 16)
                    sel_j = tl.load(SELg + lj[:, None] * NP + keys[None, :]).to(tl.int32)  # [16, NP]
                    pos = tl.cumsum(sel_j, 1) - 1
                    tl.store(TOPK_IDX + (g * M + lj)[:, None] * TOPK + pos, keys[None, :].to(tl.int64),
                             mask=(sel_j > 0) & (lj < M)[:, None])
    if SHARED:
        vs, _, _ = _shared_values(r, Kh, Vh, stride_kn, stride_vn, N, NKB, scale, offs_d, MP, D, BK, PREC)
        vs = vs.to(DT)  # [MP, D]

    EXPh = EXPERT_IDX + g * N * R_TOPK
    for i in range(QB_PER_PROG):
        rows = (grp * QB_PER_PROG + i) * BQ + tl.arange(0, BQ)
        q_ok = rows < N
        q = tl.load(Qh + rows[:, None] * stride_qn + offs_d[None, :], mask=q_ok[:, None], other=0.0)  # [BQ, D]
        gate = tl.dot(q, tl.trans(r), input_precision=PREC)  # [BQ, MP]
        if SELECT:
            gm = tl.where(lm_ok[None, :], gate, float("-inf"))
            e1 = _argmax_first(gm, lm, MP)
            e2 = e1
            tl.store(EXPh + rows * R_TOPK, e1.to(tl.int64), mask=q_ok)
            if R_TOPK == 2:
                e2 = _argmax_first(tl.where(lm[None, :] == e1[:, None], float("-inf"), gm), lm, MP)
                tl.store(EXPh + rows * R_TOPK + 1, e2.to(tl.int64), mask=q_ok)
        elif ROUTED:
            e1, e2 = _experts(EXPh, rows, q_ok, R_TOPK)
        # ONE online softmax over [shared ; routed]: the shared logits first, then the key blocks
        m_i = tl.full([BQ], float("-inf"), tl.float32)
        l_i = tl.zeros([BQ], tl.float32)
        acc = tl.zeros([BQ, D], tl.float32)
        if SHARED:
            zs = tl.where(lm_ok[None, :], gate * scale_shared, float("-inf"))  # [BQ, MP]
            m_i = tl.max(zs, 1)
            ps = tl.exp(zs - m_i[:, None])
            l_i = tl.sum(ps, 1)
            acc = tl.dot(ps.to(DT), vs, input_precision=PREC)
        if ROUTED:
            for kb in range(NKB):
                kcols = kb * BK + tl.arange(0, BK)
                kblk, vblk = _key_block(Kh, Vh, kcols, kcols < N, stride_kn, stride_vn, offs_d)
                cnt = _multiplicity(SELg, e1, e2, kcols, NP, R_TOPK, False)  # [BQ, BK]
                s = tl.dot(q, tl.trans(kblk), input_precision=PREC) * scale
                s = tl.where(cnt > 0, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # a row may have no logit yet (no shared expert, no selected key in the blocks so far)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                # a key counted C times enters the softmax as C equal logits: C exp(z - max)
                p = cnt * tl.exp(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(DT), vblk, input_precision=PREC)
                m_i = m_new
        out = acc / l_i[:, None]
        Oh = O + b * stride_ob + h * stride_oh
        tl.store(Oh + rows[:, None] * stride_on + offs_d[None, :], out.to(DT), mask=q_ok[:, None])
        tl.store(LSE + g * N + rows, m_i + tl.log(l_i), mask=q_ok)


@triton.jit
def _query_rows(Qh, DOh, Oh, LSEh, rows, q_ok, stride_qn, stride_don, stride_on, offs_d, D: tl.constexpr):
    """Queries, output gradients, lse and ``delta = rowsum(dO * O)`` of a block of rows."""
    q = tl.load(Qh + rows[:, None] * stride_qn + offs_d[None, :], mask=q_ok[:, None], other=0.0)  # [BQ, D]
    do = tl.load(DOh + rows[:, None] * stride_don + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    o = tl.load(Oh + rows[:, None] * stride_on + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # [BQ]
    lse = tl.load(LSEh + rows, mask=q_ok, other=0.0)
    return q, do, delta, lse


@triton.jit
def _shared_probs(q, r, lse, q_ok, lm_ok, scale_shared, PREC: tl.constexpr):
    """Shared-expert probabilities ``[BQ, MP]`` of the one softmax (0 for padding rows and columns)."""
    gate = tl.dot(q, tl.trans(r), input_precision=PREC)
    return tl.where(lm_ok[None, :] & q_ok[:, None], tl.exp(gate * scale_shared - lse[:, None]), 0.0)


@triton.jit
def _bwd_keys(
    Qh, Kh, Vh, Rh, Oh, DOh, LSEh, SELh, EXPh, DKh, DVh,
    stride_qn, stride_kn, stride_vn, stride_rm, stride_don, stride_on,
    kb, N, M, NQB, NKB, scale, scale_shared,
    D: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    R_TOPK: tl.constexpr, SHARED: tl.constexpr, ROUTED: tl.constexpr, PREC: tl.constexpr,
):
    """dK, dV of keys ``kb*BK ..``: routed pairs, and the path through the shared values.

    Works with transposed tiles (keys or landmarks as rows, as FlashAttention's dK/dV loop), so every
    product takes its left operand as computed, never a transposed register tile.
    """
    DT = Qh.dtype.element_ty
    offs_d = tl.arange(0, D)
    lm = tl.arange(0, MP)
    lm_ok = lm < M
    kcols = kb * BK + tl.arange(0, BK)
    k_ok = kcols < N
    kblk, vblk = _key_block(Kh, Vh, kcols, k_ok, stride_kn, stride_vn, offs_d)
    r = tl.load(Rh + lm[:, None] * stride_rm + offs_d[None, :], mask=lm_ok[:, None], other=0.0)  # [MP, D]
    if SHARED:
        dvs = tl.zeros([MP, D], tl.float32)  # gradient of the shared values, summed over all queries
    dk = tl.zeros([BK, D], tl.float32)
    dv = tl.zeros([BK, D], tl.float32)
    for qb in range(NQB):
        rows = qb * BQ + tl.arange(0, BQ)
        q_ok = rows < N
        q, do, delta, lse = _query_rows(Qh, DOh, Oh, LSEh, rows, q_ok, stride_qn, stride_don, stride_on, offs_d, D)
        if ROUTED:
            e1, e2 = _experts(EXPh, rows, q_ok, R_TOPK)
            cnt_t = _multiplicity(SELh, e1, e2, kcols, NP, R_TOPK, True)  # [BK, BQ]
            s_t = tl.dot(kblk, tl.trans(q), input_precision=PREC) * scale
            p_t = tl.where((cnt_t > 0) & q_ok[None, :], cnt_t * tl.exp(s_t - lse[None, :]), 0.0)  # [BK, BQ]
            ds_t = p_t * (tl.dot(vblk, tl.trans(do), input_precision=PREC) - delta[None, :])
            dv += tl.dot(p_t.to(DT), do, input_precision=PREC)
            dk += tl.dot(ds_t.to(DT), q, input_precision=PREC)
        if SHARED:
            gate_t = tl.dot(r, tl.trans(q), input_precision=PREC)  # [MP, BQ]
            ps_t = tl.where(lm_ok[:, None] & q_ok[None, :], tl.exp(gate_t * scale_shared - lse[None, :]), 0.0)
            dvs += tl.dot(ps_t.to(DT), do, input_precision=PREC)
    dk = dk * scale
    if SHARED:
        # computed after the query loop, so that V~ does not hold registers during it
        vs, zmax, zsum = _shared_values(r, Kh, Vh, stride_kn, stride_vn, N, NKB, scale, offs_d, MP, D, BK, PREC)
        # V~ = A V with A = softmax(s R K^T): dV += A^T dV~, dL = A (dV~ V^T - rowsum(dV~ * V~)), dK += s dL^T R
        a_t = tl.exp(tl.dot(kblk, tl.trans(r), input_precision=PREC) * scale - zmax[None, :]) / zsum[None, :]
        a_t = tl.where(k_ok[:, None], a_t, 0.0)  # [BK, MP]
        dvs_dt = dvs.to(DT)
        dv += tl.dot(a_t.to(DT), dvs_dt, input_precision=PREC)
        vs_dot = tl.sum(dvs * vs, 1)  # [MP]
        dl_t = a_t * (tl.dot(vblk, tl.trans(dvs_dt), input_precision=PREC) - vs_dot[None, :])  # [BK, MP]
        dk += scale * tl.dot(dl_t.to(DT), r, input_precision=PREC)
    out = kcols[:, None] * D + offs_d[None, :]
    tl.store(DKh + out, dk.to(DT), mask=k_ok[:, None])
    tl.store(DVh + out, dv.to(DT), mask=k_ok[:, None])


@triton.jit
def _bwd_queries(
    Qh, Kh, Vh, Rh, Oh, DOh, LSEh, SELh, EXPh, DQh,
    stride_qn, stride_kn, stride_vn, stride_rm, stride_don, stride_on,
    qb, N, M, NKB, scale, scale_shared,
    D: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    R_TOPK: tl.constexpr, SHARED: tl.constexpr, ROUTED: tl.constexpr, PREC: tl.constexpr,
):
    """dQ of queries ``qb*BQ ..``: routed ``s dS K`` over key blocks plus shared ``c dS_sh R``."""
    DT = Qh.dtype.element_ty
    offs_d = tl.arange(0, D)
    lm = tl.arange(0, MP)
    lm_ok = lm < M
    rows = qb * BQ + tl.arange(0, BQ)
    q_ok = rows < N
    q, do, delta, lse = _query_rows(Qh, DOh, Oh, LSEh, rows, q_ok, stride_qn, stride_don, stride_on, offs_d, D)
    dq = tl.zeros([BQ, D], tl.float32)
    if SHARED:
        r = tl.load(Rh + lm[:, None] * stride_rm + offs_d[None, :], mask=lm_ok[:, None], other=0.0)  # [MP, D]
        vs, _, _ = _shared_values(r, Kh, Vh, stride_kn, stride_vn, N, NKB, scale, offs_d, MP, D, BK, PREC)
        ps = _shared_probs(q, r, lse, q_ok, lm_ok, scale_shared, PREC)  # [BQ, MP]
        dss = ps * (tl.dot(do, tl.trans(vs.to(DT)), input_precision=PREC) - delta[:, None])
        dq += scale_shared * tl.dot(dss.to(DT), r, input_precision=PREC)
    if ROUTED:
        e1, e2 = _experts(EXPh, rows, q_ok, R_TOPK)
        dq_routed = tl.zeros([BQ, D], tl.float32)
        for kb in range(NKB):
            kcols = kb * BK + tl.arange(0, BK)
            kblk, vblk = _key_block(Kh, Vh, kcols, kcols < N, stride_kn, stride_vn, offs_d)
            cnt = _multiplicity(SELh, e1, e2, kcols, NP, R_TOPK, False)  # [BQ, BK]
            s = tl.dot(q, tl.trans(kblk), input_precision=PREC) * scale
            p = tl.where((cnt > 0) & q_ok[:, None], cnt * tl.exp(s - lse[:, None]), 0.0)
            ds = p * (tl.dot(do, tl.trans(vblk), input_precision=PREC) - delta[:, None])
            dq_routed += tl.dot(ds.to(DT), kblk, input_precision=PREC)
        dq += scale * dq_routed
    tl.store(DQh + rows[:, None] * D + offs_d[None, :], dq.to(DT), mask=q_ok[:, None])


@triton.jit
def _bwd_landmarks(
    Qh, Kh, Vh, Rh, Oh, DOh, LSEh, DRh,
    stride_qn, stride_kn, stride_vn, stride_rm, stride_don, stride_on,
    N, M, NQB, NKB, scale, scale_shared,
    D: tl.constexpr, MP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """dR = c dS_sh^T Q (shared logits) + s dL K (landmark attention of the shared values)."""
    DT = Qh.dtype.element_ty
    offs_d = tl.arange(0, D)
    lm = tl.arange(0, MP)
    lm_ok = lm < M
    r = tl.load(Rh + lm[:, None] * stride_rm + offs_d[None, :], mask=lm_ok[:, None], other=0.0)  # [MP, D]
    vs, zmax, zsum = _shared_values(r, Kh, Vh, stride_kn, stride_vn, N, NKB, scale, offs_d, MP, D, BK, PREC)
    vs_dt = vs.to(DT)
    dvs = tl.zeros([MP, D], tl.float32)
    dr = tl.zeros([MP, D], tl.float32)
    for qb in range(NQB):
        rows = qb * BQ + tl.arange(0, BQ)
        q_ok = rows < N
        q, do, delta, lse = _query_rows(Qh, DOh, Oh, LSEh, rows, q_ok, stride_qn, stride_don, stride_on, offs_d, D)
        gate_t = tl.dot(r, tl.trans(q), input_precision=PREC)  # [MP, BQ]
        ps_t = tl.where(lm_ok[:, None] & q_ok[None, :], tl.exp(gate_t * scale_shared - lse[None, :]), 0.0)
        dvs += tl.dot(ps_t.to(DT), do, input_precision=PREC)
        dss_t = ps_t * (tl.dot(vs_dt, tl.trans(do), input_precision=PREC) - delta[None, :])  # [MP, BQ]
        dr += tl.dot(dss_t.to(DT), q, input_precision=PREC)
    dr = dr * scale_shared
    dvs_dt = dvs.to(DT)
    vs_dot = tl.sum(dvs * vs, 1)  # [MP]
    for kb in range(NKB):
        kcols = kb * BK + tl.arange(0, BK)
        k_ok = kcols < N
        kblk, vblk = _key_block(Kh, Vh, kcols, k_ok, stride_kn, stride_vn, offs_d)
        a_blk = tl.exp(tl.dot(r, tl.trans(kblk), input_precision=PREC) * scale - zmax[:, None]) / zsum[:, None]
        a_blk = tl.where(k_ok[None, :], a_blk, 0.0)  # [MP, BK]
        dl = a_blk * (tl.dot(dvs_dt, tl.trans(vblk), input_precision=PREC) - vs_dot[:, None])
        dr += scale * tl.dot(dl.to(DT), kblk, input_precision=PREC)
    tl.store(DRh + lm[:, None] * D + offs_d[None, :], dr.to(DT), mask=lm_ok[:, None])


@triton.jit
def _bwd_kernel(
    Q, K, V, R, O, DO, LSE, SEL, EXPERT_IDX, DQ, DK, DV, DR,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_rb, stride_rh, stride_rm,
    stride_dob, stride_doh, stride_don, stride_ob, stride_oh, stride_on, stride_selg,
    H, N, M, NQB, NKB, scale, scale_shared,
    D: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    R_TOPK: tl.constexpr, SHARED: tl.constexpr, ROUTED: tl.constexpr, PREC: tl.constexpr,
):
    # programs (g, j): j < NKB own a key block (dK, dV), then NQB query blocks (dQ), then (shared) dR
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
    LSEh = LSE + g * N
    SELh = SEL + g * stride_selg
    EXPh = EXPERT_IDX + g * N * R_TOPK
    if j < NKB:
        _bwd_keys(
            Qh, Kh, Vh, Rh, Oh, DOh, LSEh, SELh, EXPh, DK + g * N * D, DV + g * N * D,
            stride_qn, stride_kn, stride_vn, stride_rm, stride_don, stride_on,
            j, N, M, NQB, NKB, scale, scale_shared,
            D, MP, NP, BQ, BK, R_TOPK, SHARED, ROUTED, PREC,
        )
    elif j < NKB + NQB:
        _bwd_queries(
            Qh, Kh, Vh, Rh, Oh, DOh, LSEh, SELh, EXPh, DQ + g * N * D,
            stride_qn, stride_kn, stride_vn, stride_rm, stride_don, stride_on,
            j - NKB, N, M, NKB, scale, scale_shared,
            D, MP, NP, BQ, BK, R_TOPK, SHARED, ROUTED, PREC,
        )
    else:
        _bwd_landmarks(
            Qh, Kh, Vh, Rh, Oh, DOh, LSEh, DR + g * M * D,
            stride_qn, stride_kn, stride_vn, stride_rm, stride_don, stride_on,
            N, M, NQB, NKB, scale, scale_shared,
            D, MP, BQ, BK, PREC,
        )


def padded(n: int) -> int:
    """``n`` rounded up to a power of two >= 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(n))


def _block(n_pad: int, head_dim: int, itemsize: int, budget: int) -> int:
    """Query or key block: a power of two in [16, 64], at most ``n_pad``, with a ``[block, d]`` tile of about
    ``budget`` bytes (fp16/bf16) or half that (fp32: ``input_precision="ieee"`` dots run on FMA units and
    hold more registers)."""
    if itemsize == 4:
        return min(n_pad, max(16, min(64, budget // 2 // (head_dim * itemsize))))
    return min(n_pad, max(32, min(64, budget // (head_dim * itemsize))))


# Launch configs chosen by compiling for sm_90 (no spills at the GPU test shapes); the forward's [MP, NP]
# selection tile and the backward's fp32 dK, dV accumulators need 8 warps from N = 64 on. Tune on the device.
def fwd_config(num_heads: int, n_pad: int, m_pad: int, head_dim: int, itemsize: int) -> dict:
    """Forward launch: query block ``BQ``, key block ``BK``, head-dim chunk ``DC`` of the selection's
    score product, ``QB_PER_PROG`` query blocks per program, warps.

    Each program recomputes the selection, so with many (batch, head) pairs one program takes all the
    query blocks of its head; with few, the blocks are spread over programs for parallelism.
    """
    block = _block(n_pad, head_dim, itemsize, 8192)
    return {
        "BQ": block,
        "BK": block,
        "DC": min(head_dim, max(16, 16384 // (n_pad * itemsize))),
        "QB_PER_PROG": triton.cdiv(n_pad, block) if num_heads >= 256 else 1,
        "num_warps": 8 if n_pad >= 64 else 4,
    }


def bwd_config(n_pad: int, m_pad: int, head_dim: int, itemsize: int) -> dict:
    """Backward launch: query block ``BQ``, key block ``BK`` (fp32 ``[BK, d]`` accumulators), warps."""
    block = _block(n_pad, head_dim, itemsize, 4096)
    # d = 32 keeps 4 warps: with 8 warps and 64-row bf16 blocks, Triton 3.6 on sm_90 gave a wrong dq
    # (relative error 2.5 at N = 256, m = 7, r = 2; 3e-3 with 4 warps or 32-row blocks)
    return {"BQ": block, "BK": block, "num_warps": 8 if n_pad >= 64 and head_dim > 32 else 4}


def sel_shape(num_heads: int, n: int, m: int, head_dim: int, itemsize: int, topk: int):
    """Shape of the forward's uint8 selection mask ``[G, P, MP, NP]`` (P = programs per head along the
    queries; ``(0,)`` when topk = 0) and the forward's config."""
    n_pad, m_pad = padded(n), padded(m)
    cfg = fwd_config(num_heads, n_pad, m_pad, head_dim, itemsize)
    groups = triton.cdiv(triton.cdiv(n, cfg["BQ"]), cfg["QB_PER_PROG"])
    return ((num_heads, groups, m_pad, n_pad) if topk > 0 else (0,)), cfg


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot`` precision: IEEE fp32 unless TF32 is allowed; fp16/bf16 operands ignore it."""
    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def forward(q, k, v, landmarks, topk, router_topk, shared, scale_shared, *, topk_idx=None, expert_idx=None,
            write_topk=False, allow_tf32=False, alloc=torch.empty):
    """Fused forward. ``q, k, v [B, H, N, d]``, ``landmarks [B, H, m, d]`` with unit last stride.

    With ``topk_idx [G, m, topk]`` and ``expert_idx [G, N, r]`` (int64, contiguous) the routing is
    taken from them; otherwise it is selected in the kernel, ``expert_idx`` always written and
    ``topk_idx`` written when ``write_topk``. ``alloc(shape, dtype=, device=)`` allocates the outputs
    (tests pass a poisoning one). Returns ``out [B, H, N, d]`` (token-major memory), ``lse [G, N]``, the selection mask
    ``sel [G, P, MP, NP]`` (uint8, one copy per program along the queries; empty when topk = 0),
    ``topk_idx`` and ``expert_idx``.
    """
    B, H, N, D = q.shape
    M = landmarks.shape[2]
    G = B * H
    dev = q.device
    select = expert_idx is None
    routed = topk > 0
    shape, cfg = sel_shape(G, N, M, D, q.element_size(), topk)
    # token-major memory ([B, N, H, d] viewed as [B, H, N, d]), as SDPA returns its output: the layer's
    # out.transpose(1, 2).reshape(B, N, C) is then a view, and the projection saves this very tensor
    out = alloc((B, N, H, D), dtype=q.dtype, device=dev).transpose(1, 2)
    lse = alloc((G, N), dtype=torch.float32, device=dev)
    sel = alloc(shape, dtype=torch.uint8, device=dev)
    if select:
        expert_idx = alloc((G, N, router_topk), dtype=torch.int64, device=dev)
        topk_idx = alloc((G, M, topk), dtype=torch.int64, device=dev) if write_topk else sel
    groups = triton.cdiv(triton.cdiv(N, cfg["BQ"]), cfg["QB_PER_PROG"])
    _fwd_kernel[(G, groups)](
        q, k, v, landmarks, out, lse, sel, topk_idx, expert_idx,
        *_strides(q), *_strides(k), *_strides(v), *_strides(landmarks), *_strides(out),
        H, N, M, topk, triton.cdiv(N, cfg["BK"]), D ** -0.5, scale_shared,
        D=D, MP=padded(M), NP=padded(N), BQ=cfg["BQ"], BK=cfg["BK"], DC=cfg["DC"], QB_PER_PROG=cfg["QB_PER_PROG"],
        R_TOPK=router_topk, SHARED=shared, ROUTED=routed, SELECT=select,
        WRITE_TOPK=select and write_topk and routed, PREC=_precision(q.dtype, allow_tf32),
        num_warps=cfg["num_warps"], num_stages=1,
    )
    return out, lse, sel, topk_idx, expert_idx


def backward(q, k, v, landmarks, out, grad_out, lse, sel, expert_idx, topk, shared, scale_shared, *,
             allow_tf32=False, alloc=torch.empty):
    """Fused backward: ``dq, dk, dv [B, H, N, d]`` and ``dR [B, H, m, d]``, every element written once
    (``dR`` is None without the shared expert: the landmarks then only select, which has no gradient)."""
    B, H, N, D = q.shape
    M = landmarks.shape[2]
    G = B * H
    dev = q.device
    n_pad, m_pad = padded(N), padded(M)
    dq, dk, dv = (alloc((B, H, N, D), dtype=q.dtype, device=dev) for _ in range(3))
    dr = alloc((B, H, M, D), dtype=q.dtype, device=dev) if shared else dq
    cfg = bwd_config(n_pad, m_pad, D, q.element_size())
    n_qb, n_kb = triton.cdiv(N, cfg["BQ"]), triton.cdiv(N, cfg["BK"])
    _bwd_kernel[(G, n_kb + n_qb + int(shared))](
        q, k, v, landmarks, out, grad_out, lse, sel, expert_idx, dq, dk, dv, dr,
        *_strides(q), *_strides(k), *_strides(v), *_strides(landmarks), *_strides(grad_out), *_strides(out),
        sel.stride(0) if sel.dim() == 4 else 0,
        H, N, M, n_qb, n_kb, D ** -0.5, scale_shared,
        D=D, MP=m_pad, NP=n_pad, BQ=cfg["BQ"], BK=cfg["BK"], R_TOPK=expert_idx.shape[-1],
        SHARED=shared, ROUTED=topk > 0, PREC=_precision(q.dtype, allow_tf32),
        num_warps=cfg["num_warps"], num_stages=1,
    )
    return dq, dk, dv, (dr if shared else None)
