"""MiTA's shared values split over the keys (FlashDecoding-style), forward and backward.

``V~ = softmax(s R K^T) V`` has only m query rows (the landmarks) against N keys: an attention kernel that
parallelises over query blocks gets one program per head and walks all N keys alone (at N = 65,536 and
B H = 16, 16 programs on a 132-SM card). Here the keys are split into ``C`` chunks so that
``B H x C x (m / BM)`` programs fill the card:

* forward: programs (head, chunk, landmark block) keep an online softmax over their chunk and write its
  partial ``(max, sum, acc)`` (fp32); one combine launch merges the chunks into ``V~`` and the base-2
  log-normaliser ``lse_sh`` (kept for the backward);
* backward, from ``dV~``: programs (head, key block) loop over every landmark block for ``dK`` and ``dV``
  of their keys (``A = exp2(s R K^T log2 e - lse_sh)``, ``dV = A^T dV~``, ``dL = A (dV~ V^T - rowsum(dV~ V~))``,
  ``dK = s dL^T R``); programs (head, chunk, landmark block) sum ``s dL K`` over their chunk into fp32
  partials of ``dR``, which one sum merges. Every output element has one writer (no atomics).

q, k, v style layouts: ``landmarks [B, H, m, d]``, ``k, v [B, H, N, d]`` with any batch, head and row
strides and a unit last one. Every dot accumulates in fp32; fp32 inputs use IEEE unless TF32 is allowed.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2
from .routed import sum_chunks

__all__ = ["shared_values"]

# Programs to aim for (a few waves on a 132-SM card); the number of key chunks follows from it.
_TARGET_PROGRAMS = 512


@triton.jit
def _rows(P, rows, ok, stride_n, offs_d):
    return tl.load(P + rows[:, None] * stride_n + offs_d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _chunk_program(H, M, D: tl.constexpr, BM: tl.constexpr):
    """Head ``g`` (batch ``b``, head ``h``), key chunk ``c`` and landmark rows of a (g, chunk, block) program."""
    g = tl.program_id(0).to(tl.int64)
    lm = tl.program_id(2) * BM + tl.arange(0, BM)
    return g, tl.program_id(1), g // H, g % H, lm, lm < M, tl.arange(0, D)


@triton.jit
def _fwd_partial_kernel(
    R, K, V, PACC, PM, PL,
    stride_rb, stride_rh, stride_rm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, N, M, CHUNK, C, scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    DT = K.dtype.element_ty
    g, c, b, h, lm, lm_ok, offs_d = _chunk_program(H, M, D, BM)
    r = _rows(R + b * stride_rb + h * stride_rh, lm, lm_ok, stride_rm, offs_d)  # [BM, D]
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh
    sl2 = scale * 1.4426950408889634
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    start = c * CHUNK
    for n0 in range(start, tl.minimum(start + CHUNK, N), BN):
        cols = n0 + tl.arange(0, BN)
        ok = cols < N
        s = tl.dot(r, tl.trans(_rows(Kh, cols, ok, stride_kn, offs_d)), input_precision=PREC) * sl2
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds a key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), _rows(Vh, cols, ok, stride_vn, offs_d), input_precision=PREC)
        m_i = m_new
    part = (g * C + c) * M + lm
    tl.store(PACC + part[:, None] * D + offs_d[None, :], acc, mask=lm_ok[:, None])
    tl.store(PM + part, m_i, mask=lm_ok)
    tl.store(PL + part, l_i, mask=lm_ok)


@triton.jit
def _fwd_combine_kernel(PACC, PM, PL, VS, LSE, M, C, D: tl.constexpr, BM: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    lm = tl.program_id(1) * BM + tl.arange(0, BM)
    lm_ok = lm < M
    offs_d = tl.arange(0, D)
    mx = tl.full([BM], float("-inf"), tl.float32)
    for c in range(C):
        mx = tl.maximum(mx, tl.load(PM + (g * C + c) * M + lm, mask=lm_ok, other=0.0))
    l_sum = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for c in range(C):
        part = (g * C + c) * M + lm
        w = tl.exp2(tl.load(PM + part, mask=lm_ok, other=0.0) - mx)
        l_sum += tl.load(PL + part, mask=lm_ok, other=0.0) * w
        acc += tl.load(PACC + part[:, None] * D + offs_d[None, :], mask=lm_ok[:, None], other=0.0) * w[:, None]
    l_sum = tl.where(lm_ok, l_sum, 1.0)
    out = g * M + lm
    tl.store(VS + out[:, None] * D + offs_d[None, :], (acc / l_sum[:, None]).to(VS.dtype.element_ty),
             mask=lm_ok[:, None])
    tl.store(LSE + out, mx + tl.log2(l_sum), mask=lm_ok)


@triton.jit
def _landmark_rows(R, VS, DVS, LSE, g, b, h, lm, lm_ok, stride_rb, stride_rh, stride_rm, M, offs_d):
    """Landmarks, ``dV~`` (input dtype), ``lse_sh`` and ``rowsum(dV~ * V~)`` of a block of landmark rows."""
    r = _rows(R + b * stride_rb + h * stride_rh, lm, lm_ok, stride_rm, offs_d)
    rows = g * M + lm
    vs = tl.load(VS + rows[:, None] * offs_d.shape[0] + offs_d[None, :], mask=lm_ok[:, None], other=0.0)
    dvs = tl.load(DVS + rows[:, None] * offs_d.shape[0] + offs_d[None, :], mask=lm_ok[:, None], other=0.0)
    lse = tl.load(LSE + rows, mask=lm_ok, other=0.0)
    vs_dot = tl.sum(dvs.to(tl.float32) * vs.to(tl.float32), 1)
    return r, dvs, lse, vs_dot


@triton.jit
def _bwd_keys_kernel(
    R, K, V, VS, DVS, LSE, DK, DV, DKP, DVP, PAIR_ORDER, KEY_PTR,
    stride_rb, stride_rh, stride_rm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, N, M, MK, scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, ADD: tl.constexpr,
    PAIRS: tl.constexpr,
):
    """Programs (head, block of ``BN`` keys): the shared values' ``dK``, ``dV`` of the block's keys over every
    landmark block, then (``PAIRS``) the routed keys' float32 partial rows of the (expert, slot) pairs that hold
    each key, read through the inverse index ``PAIR_ORDER [G, MK]``, ``KEY_PTR [G, N + 1]`` (routed.py's key
    reduction, fused: dK, dV written once), or (``ADD``) what is already in ``DK``, ``DV``."""
    DT = K.dtype.element_ty
    g = tl.program_id(0).to(tl.int64)
    b = g // H
    h = g % H
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = cols < N
    offs_d = tl.arange(0, D)
    kb = _rows(K + b * stride_kb + h * stride_kh, cols, ok, stride_kn, offs_d)  # [BN, D]
    vb = _rows(V + b * stride_vb + h * stride_vh, cols, ok, stride_vn, offs_d)
    sl2 = scale * 1.4426950408889634
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    for m0 in range(0, M, BM):
        lm = m0 + tl.arange(0, BM)
        lm_ok = lm < M
        r, dvs, lse, vs_dot = _landmark_rows(R, VS, DVS, LSE, g, b, h, lm, lm_ok, stride_rb, stride_rh, stride_rm,
                                             M, offs_d)
        a_t = tl.dot(kb, tl.trans(r), input_precision=PREC) * sl2  # [BN, BM]
        a_t = tl.where(ok[:, None] & lm_ok[None, :], tl.exp2(a_t - lse[None, :]), 0.0)
        dv = tl.dot(a_t.to(DT), dvs, dv, input_precision=PREC)
        dl_t = a_t * (tl.dot(vb, tl.trans(dvs), input_precision=PREC) - vs_dot[None, :])
        dk = tl.dot(dl_t.to(DT), r, dk, input_precision=PREC)
    out = (g * N + cols[:, None]) * D + offs_d[None, :]
    dk = dk * scale
    if PAIRS:  # the routed partials of each key's (expert, slot) pairs, in the inverse index's order
        ptr = KEY_PTR + g * (N + 1) + cols
        lo = tl.load(ptr, mask=ok, other=0)
        cnt = tl.load(ptr + 1, mask=ok, other=0) - lo
        for c in range(0, tl.max(cnt, 0)):
            held = c < cnt
            pair = tl.load(PAIR_ORDER + g * MK + lo + c, mask=held, other=0)
            row = (g * MK + pair)[:, None] * D + offs_d[None, :]
            dk += tl.load(DKP + row, mask=held[:, None], other=0.0).to(tl.float32)
            dv += tl.load(DVP + row, mask=held[:, None], other=0.0).to(tl.float32)
    if ADD:  # onto the gradients already there (the routed keys'), rounded once
        dk += tl.load(DK + out, mask=ok[:, None], other=0.0).to(tl.float32)
        dv += tl.load(DV + out, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DK + out, dk.to(DT), mask=ok[:, None])
    tl.store(DV + out, dv.to(DT), mask=ok[:, None])


@triton.jit
def _bwd_keys_resident_kernel(
    R, K, V, VS, DVS, LSE, DK, DV,
    stride_rb, stride_rh, stride_rm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, N, M, NKB, scale,
    D: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, KPP: tl.constexpr, PREC: tl.constexpr,
    ADD: tl.constexpr,
):
    """:func:`_bwd_keys_kernel` with every landmark (``M <= MP``) loaded once a program: programs (head, group of
    ``KPP`` key blocks) keep ``R``, ``dV~``, ``lse_sh`` and ``rowsum(dV~ V~)`` on chip and go through their key
    blocks, instead of each key block reading the landmarks again."""
    DT = K.dtype.element_ty
    g = tl.program_id(0).to(tl.int64)
    b = g // H
    h = g % H
    kb0 = tl.program_id(1) * KPP
    offs_d = tl.arange(0, D)
    lm = tl.arange(0, MP)
    lm_ok = lm < M
    r, dvs, lse, vs_dot = _landmark_rows(R, VS, DVS, LSE, g, b, h, lm, lm_ok, stride_rb, stride_rh, stride_rm, M,
                                         offs_d)
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh
    sl2 = scale * 1.4426950408889634
    for kb in range(kb0, tl.minimum(kb0 + KPP, NKB)):
        cols = kb * BN + tl.arange(0, BN)
        ok = cols < N
        kblk = _rows(Kh, cols, ok, stride_kn, offs_d)  # [BN, D]
        vblk = _rows(Vh, cols, ok, stride_vn, offs_d)
        a_t = tl.dot(kblk, tl.trans(r), input_precision=PREC) * sl2  # [BN, MP]
        a_t = tl.where(ok[:, None] & lm_ok[None, :], tl.exp2(a_t - lse[None, :]), 0.0)
        dv = tl.dot(a_t.to(DT), dvs, input_precision=PREC)
        dl_t = a_t * (tl.dot(vblk, tl.trans(dvs), input_precision=PREC) - vs_dot[None, :])
        dk = tl.dot(dl_t.to(DT), r, input_precision=PREC) * scale
        out = (g * N + cols[:, None]) * D + offs_d[None, :]
        if ADD:  # onto the gradients already there (the routed keys'), rounded once
            dk += tl.load(DK + out, mask=ok[:, None], other=0.0).to(tl.float32)
            dv += tl.load(DV + out, mask=ok[:, None], other=0.0).to(tl.float32)
        tl.store(DK + out, dk.to(DT), mask=ok[:, None])
        tl.store(DV + out, dv.to(DT), mask=ok[:, None])


def resident_keys_config(num_heads: int, n: int, m: int, head_dim: int, itemsize: int):
    """Launch config of :func:`_bwd_keys_resident_kernel` (``MP``, ``BN``, ``KPP``, warps), or None where it does
    not take the case: fp16/bf16, m up to 128 at d <= 64 (64 at d = 128). Key blocks of 64 (32 with 128 landmark
    rows or d = 128), as many a program as keeps about ``_TARGET_PROGRAMS`` programs; 4 warps. Compiled for sm_90
    (Triton 3.8, ``ptxas -v``, bf16), no spills: d = 64, m <= 64: 217 registers, 72 KiB of shared memory;
    m = 128: 168, 96 KiB; d = 128, m = 64: 190, 104 KiB. Not yet timed on a GPU."""
    mp = max(16, next_power_of_2(m))
    if itemsize > 2 or mp > 128 or mp * head_dim > 8192:
        return None
    bn = 64 if mp <= 64 and head_dim <= 64 else 32
    nkb = cdiv(n, bn)
    kpp = max(1, min(16, nkb * num_heads // _TARGET_PROGRAMS))
    return {"MP": mp, "BN": bn, "KPP": kpp, "num_warps": 4}


@triton.jit
def _bwd_landmarks_kernel(
    R, K, V, VS, DVS, LSE, PDR,
    stride_rb, stride_rh, stride_rm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, N, M, CHUNK, C, scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    DT = K.dtype.element_ty
    g, c, b, h, lm, lm_ok, offs_d = _chunk_program(H, M, D, BM)
    r, dvs, lse, vs_dot = _landmark_rows(R, VS, DVS, LSE, g, b, h, lm, lm_ok, stride_rb, stride_rh, stride_rm, M,
                                         offs_d)
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh
    sl2 = scale * 1.4426950408889634
    dr = tl.zeros([BM, D], tl.float32)
    start = c * CHUNK
    for n0 in range(start, tl.minimum(start + CHUNK, N), BN):
        cols = n0 + tl.arange(0, BN)
        ok = cols < N
        kb = _rows(Kh, cols, ok, stride_kn, offs_d)
        a = tl.dot(r, tl.trans(kb), input_precision=PREC) * sl2  # [BM, BN]
        a = tl.where(lm_ok[:, None] & ok[None, :], tl.exp2(a - lse[:, None]), 0.0)
        dl = a * (tl.dot(dvs, tl.trans(_rows(Vh, cols, ok, stride_vn, offs_d)), input_precision=PREC)
                  - vs_dot[:, None])
        dr = tl.dot(dl.to(DT), kb, dr, input_precision=PREC)
    part = (g * C + c) * M + lm
    tl.store(PDR + part[:, None] * D + offs_d[None, :], dr, mask=lm_ok[:, None])


def config(num_heads: int, n: int, m: int, head_dim: int, itemsize: int = 2) -> dict:
    """Blocks of ``BM`` landmarks and ``BN`` keys, and the key chunk of the split launches (``CHUNK``, a
    multiple of ``BN``): enough chunks that heads x chunks x landmark blocks reach ``_TARGET_PROGRAMS``.
    fp32 inputs take 16-landmark blocks: IEEE fp32 dots at 64 x 32 tiles spill and, at d = 128, ask more
    shared memory than an H200 has (238 KB with Triton 3.6)."""
    bm = min(64, max(16, next_power_of_2(m))) if itemsize <= 2 else 16
    bn = 64 if head_dim <= 64 and itemsize <= 2 else 32
    from . import SHARED_RESIDENT

    # landmark blocks of the programs that loop over the keys (forward partials, combine, dR): with
    # SHARED_RESIDENT and m >= 128, 128 landmarks and 8 warps, so that each key tile is read by half as many
    # programs (117 and 125 registers, no spills on sm_90; not yet timed)
    lm_bm, lm_warps = (128, 8) if SHARED_RESIDENT and itemsize == 2 and head_dim <= 64 and m >= 128 else (bm, None)
    blocks = cdiv(n, bn)
    # chunks fill the GPU at few heads, but the backward's float32 dR partials [G, chunks, m, d] stay within a
    # quarter of one 16-bit [G, N, d] input (chunks <= N / 8m; none of the benchmark cases is capped by it)
    chunks = max(1, min(blocks, cdiv(_TARGET_PROGRAMS, num_heads * cdiv(m, lm_bm)), n // (8 * m)))
    out = {"BM": bm, "BN": bn, "CHUNK": cdiv(blocks, chunks) * bn, "num_warps": 4 if head_dim <= 64 else 8}
    if lm_warps:
        out.update(LM_BM=lm_bm, LM_WARPS=lm_warps)
    return out


def _landmark_blocks(cfg: dict):
    """Landmarks a program and warps of the launches that loop over the keys (``LM_BM``, ``LM_WARPS`` of the
    config, else its ``BM`` and ``num_warps``)."""
    return cfg.get("LM_BM", cfg["BM"]), cfg.get("LM_WARPS", cfg["num_warps"])


def _resident_keys(G, N, m, D, itemsize):
    from . import SHARED_RESIDENT

    return resident_keys_config(G, N, m, D, itemsize) if SHARED_RESIDENT else None


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(landmarks, k, v, scale, allow_tf32=False, cfg=None, alloc=torch.empty):
    """``(V~ [B, H, m, d] in the input dtype, lse_sh [B H, m] fp32, base 2)``."""
    B, H, m, D = landmarks.shape
    N = k.shape[2]
    G = B * H
    cfg = cfg or config(G, N, m, D, k.element_size())
    chunks = cdiv(N, cfg["CHUNK"])
    lm_bm, lm_warps = _landmark_blocks(cfg)
    dev = k.device
    pacc = alloc((G, chunks, m, D), dtype=torch.float32, device=dev)
    pm = alloc((G, chunks, m), dtype=torch.float32, device=dev)
    pl = alloc((G, chunks, m), dtype=torch.float32, device=dev)
    prec = _precision(k.dtype, allow_tf32)
    launch(
        _fwd_partial_kernel, (G, chunks, cdiv(m, lm_bm)),
        (landmarks, k, v, pacc, pm, pl, *_strides(landmarks), *_strides(k), *_strides(v), H, N, m, cfg["CHUNK"],
            chunks, scale),
        dict(D=D, BM=lm_bm, BN=cfg["BN"], PREC=prec, num_warps=lm_warps),
    )
    vs = alloc((B, H, m, D), dtype=k.dtype, device=dev)
    lse = alloc((G, m), dtype=torch.float32, device=dev)
    launch(
        _fwd_combine_kernel, (G, cdiv(m, lm_bm)),
        (pacc, pm, pl, vs, lse, m, chunks),
        dict(D=D, BM=lm_bm, num_warps=lm_warps),
    )
    return vs, lse


def backward(landmarks, k, v, vs, lse, grad_vs, scale, allow_tf32=False, cfg=None, alloc=torch.empty, into=None,
             dr_add=None, key_pairs=None):
    """``(dR [B, H, m, d], dK, dV [B, H, N, d])`` in the input dtype, from ``dV~`` (``grad_vs``).

    ``into``: optional ``(dK, dV)``, contiguous ``[B, H, N, d]`` (or ``[B H, N, d]``) gradients in the input
    dtype that this pass adds its own to, in place and returned (None entries: written fresh). ``dr_add``:
    optional float32 partial sums ``[B H, C, m, d]`` of another landmark gradient, added into dR in the launch
    that sums this pass's own partials. ``key_pairs``: optional ``(dKp, dVp, pair_order, key_ptr)``, the routed
    keys' float32 partials ``[B H, m, topk, d]`` per (expert, slot) and their inverse index
    (``routed.routed_backward(..., reduce_keys=False)``): each key's are summed into its dK, dV in the same
    launch, and ``into``'s buffers are written, not added to."""
    B, H, m, D = landmarks.shape
    N = k.shape[2]
    G = B * H
    cfg = cfg or config(G, N, m, D, k.element_size())
    dev = k.device
    prec = _precision(k.dtype, allow_tf32)
    dvs = grad_vs.to(k.dtype).contiguous()
    add = into is not None and into[0] is not None
    if key_pairs is not None and not (add and _resident_keys(G, N, m, D, k.element_size()) is None):
        raise ValueError("key_pairs needs into's dK, dV buffers and the key-block kernel (not SHARED_RESIDENT's)")
    if add:
        if not all(t.is_contiguous() and t.dtype == k.dtype and t.numel() == G * N * D for t in into):
            raise ValueError(f"into must hold contiguous dK, dV of {G * N * D} elements in the dtype of k ({k.dtype})")
        dk, dv = (t.view(B, H, N, D) for t in into)
    else:
        dk = alloc((B, H, N, D), dtype=k.dtype, device=dev)
        dv = alloc((B, H, N, D), dtype=k.dtype, device=dev)
    args = (landmarks, k, v, vs, dvs, lse)
    strides = (*_strides(landmarks), *_strides(k), *_strides(v))
    res = _resident_keys(G, N, m, D, k.element_size())
    if res is not None:
        nkb = cdiv(N, res["BN"])
        launch(
            _bwd_keys_resident_kernel, (G, cdiv(nkb, res["KPP"])),
            (*args, dk, dv, *strides, H, N, m, nkb, scale),
            dict(D=D, PREC=prec, ADD=add, **res),
        )
    else:
        pairs = key_pairs if key_pairs is not None else (dk, dv, dk, dk)  # the latter never read
        mk = key_pairs[2].shape[-1] if key_pairs is not None else 0
        launch(
            _bwd_keys_kernel, (G, cdiv(N, cfg["BN"])),
            (*args, dk, dv, *pairs, *strides, H, N, m, mk, scale),
            dict(D=D, BM=cfg["BM"], BN=cfg["BN"], PREC=prec, ADD=add and key_pairs is None,
                 PAIRS=key_pairs is not None, num_warps=cfg["num_warps"]),
        )
    chunks = cdiv(N, cfg["CHUNK"])
    lm_bm, lm_warps = _landmark_blocks(cfg)
    pdr = alloc((G, chunks, m, D), dtype=torch.float32, device=dev)
    launch(
        _bwd_landmarks_kernel, (G, chunks, cdiv(m, lm_bm)),
        (*args, pdr, *strides, H, N, m, cfg["CHUNK"], chunks, scale),
        dict(D=D, BM=lm_bm, BN=cfg["BN"], PREC=prec, num_warps=lm_warps),
    )
    dr = sum_chunks(pdr, k.dtype, scale, dr_add).view(B, H, m, D)
    return dr, dk, dv


def fuses_key_pairs(landmarks: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`backward` takes ``key_pairs`` for these inputs (its key-block kernel, not the resident one)."""
    B, H, m, D = landmarks.shape
    return _resident_keys(B * H, k.shape[2], m, D, k.element_size()) is None


# Behind torch custom ops, as the other kernels (ops.py): torch.compile sees one opaque op (inductor would
# otherwise re-compile the kernels itself, with ``scale`` as a float64) and CUDA graphs can capture it.
@torch.library.custom_op("mita::shared_values_fwd", mutates_args=())
def shared_values_fwd(landmarks: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      allow_tf32: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return forward(_unit_last(landmarks), _unit_last(k), _unit_last(v), scale, allow_tf32)


@shared_values_fwd.register_fake
def _(landmarks, k, v, scale, allow_tf32):
    B, H, m, D = landmarks.shape
    return landmarks.new_empty(B, H, m, D), landmarks.new_empty(B * H, m, dtype=torch.float32)


@torch.library.custom_op("mita::shared_values_bwd", mutates_args=())
def shared_values_bwd(landmarks: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vs: torch.Tensor,
                      lse: torch.Tensor, grad_vs: torch.Tensor, scale: float,
                      allow_tf32: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(_unit_last(landmarks), _unit_last(k), _unit_last(v), vs, lse, grad_vs, scale, allow_tf32)


@shared_values_bwd.register_fake
def _(landmarks, k, v, vs, lse, grad_vs, scale, allow_tf32):
    # contiguous, as the kernels write them (not the strides of k, v, views of a qkv projection)
    return landmarks.new_empty(landmarks.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    landmarks, k, v, scale, allow_tf32 = inputs
    ctx.save_for_backward(landmarks, k, v, *output)
    ctx.meta = (scale, allow_tf32)


def _shared_backward(ctx, grad_vs, grad_lse):
    landmarks, k, v, vs, lse = ctx.saved_tensors
    dr, dk, dv = shared_values_bwd(landmarks, k, v, vs, lse, grad_vs, *ctx.meta)
    return dr, dk, dv, None, None


torch.library.register_autograd("mita::shared_values_fwd", _shared_backward, setup_context=_setup_context)


def shared_values(landmarks: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  allow_tf32: bool = False) -> torch.Tensor:
    """``softmax(scale R K^T) V`` per (batch, head): ``landmarks [B, H, m, d]``, ``k, v [B, H, N, d]`` (same
    dtype, any strides with a unit last one) -> ``[B, H, m, d]``, differentiable in all three."""
    return shared_values_fwd(landmarks, k, v, float(scale), bool(allow_tf32))[0]
