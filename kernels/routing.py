"""Query routing without the N x m gate matrix: ``expert_idx = top-r_j (R_j . q)`` in one Triton pass.

One program per (batch-head g, block of queries) loads its queries once, streams the landmarks in blocks,
and keeps the best (and, for ``r = 2``, second best) landmark per query in registers. Ties go to the
lower landmark index, as ``torch.argmax``. Layouts: ``q`` ``[B, H, N, d]`` with any batch, head and row
strides and a unit last one (read in place), ``landmarks`` ``[G, m, d]`` (contiguous), ``expert_idx`` int64
``[G, N, r]``.
"""
import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2
from .routed import _bhn


@triton.jit
def _route_kernel(
    Q, R, OUT, H, sqb, sqh, sqn, N, M, NUM_NB,
    D: tl.constexpr, R_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    g = (pid // NUM_NB).to(tl.int64)
    nb = pid % NUM_NB
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    n_ok = offs_n < N
    b, h = g // H, g % H
    q = tl.load(Q + b * sqb + h * sqh + offs_n.to(tl.int64)[:, None] * sqn + offs_d[None, :],
                mask=n_ok[:, None], other=0.0)

    best_v = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK_N], tl.int32)
    second_v = tl.full([BLOCK_N], float("-inf"), tl.float32)
    second_i = tl.zeros([BLOCK_N], tl.int32)
    for r0 in range(0, M, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < M
        rt = tl.load(R + (g * M + offs_r)[None, :] * D + offs_d[:, None], mask=r_ok[None, :], other=0.0)
        s = tl.dot(q, rt, input_precision=PRECISION)  # [BLOCK_N, BLOCK_R], unscaled: ranking only
        s = tl.where(r_ok[None, :], s, float("-inf"))
        # block maximum, lowest index among ties
        blk_v = tl.max(s, 1)
        blk_i = tl.min(tl.where(s == blk_v[:, None], offs_r[None, :], M), 1)
        if R_SLOTS == 2:
            s2 = tl.where(offs_r[None, :] == blk_i[:, None], float("-inf"), s)
            blk2_v = tl.max(s2, 1)
            blk2_i = tl.min(tl.where(s2 == blk2_v[:, None], offs_r[None, :], M), 1)
            # merge the block's two best into the running two best (earlier blocks win ties)
            new_best = blk_v > best_v
            cand_v = tl.where(new_best, best_v, blk_v)
            cand_i = tl.where(new_best, best_i, blk_i)
            alt_v = tl.where(new_best, blk2_v, second_v)
            alt_i = tl.where(new_best, blk2_i, second_i)
            take_cand = (cand_v > alt_v) | ((cand_v == alt_v) & (cand_i < alt_i))
            second_v = tl.where(take_cand, cand_v, alt_v)
            second_i = tl.where(take_cand, cand_i, alt_i)
            best_v = tl.where(new_best, blk_v, best_v)
            best_i = tl.where(new_best, blk_i, best_i)
        else:
            new_best = blk_v > best_v
            best_v = tl.where(new_best, blk_v, best_v)
            best_i = tl.where(new_best, blk_i, best_i)

    out = OUT + (g * N + offs_n) * R_SLOTS
    tl.store(out, best_i.to(tl.int64), mask=n_ok)
    if R_SLOTS == 2:
        tl.store(out + 1, second_i.to(tl.int64), mask=n_ok)


def route(q: torch.Tensor, landmarks: torch.Tensor, router_topk: int) -> torch.Tensor:
    """``expert_idx [B, H, N, r]`` (int64, best first) for ``q [B, H, N, d]``, ``landmarks [B, H, m, d]``: the
    custom op :func:`route_queries` under ``torch.compile``, the launch itself in eager mode (no dispatch)."""
    from . import EAGER_FUNCTIONS

    if torch.compiler.is_compiling() or not EAGER_FUNCTIONS:
        return route_queries(q, landmarks, router_topk)
    return _route(q, landmarks, router_topk)


def _route(q: torch.Tensor, landmarks: torch.Tensor, router_topk: int) -> torch.Tensor:
    if router_topk not in (1, 2):
        raise ValueError(f"router_topk must be 1 or 2 for the routing kernel, got {router_topk}")
    B, H, N, d = q.shape
    m = landmarks.shape[2]
    G = B * H
    qf = q if q.stride(-1) == 1 else q.contiguous()  # read by its strides: no copy of a ViT's q view
    rf = landmarks.reshape(G, m, d).contiguous()
    out = torch.empty(B, H, N, router_topk, dtype=torch.long, device=q.device)
    block_n, warps = route_blocks(N, d, q.element_size())
    block_r = max(16, min(64, next_power_of_2(m)))
    num_nb = cdiv(N, block_n)
    launch(
        _route_kernel, (G * num_nb,),
        (qf, rf, out, H, *_bhn(qf), N, m, num_nb),
        dict(D=d, R_SLOTS=router_topk, BLOCK_N=block_n, BLOCK_R=block_r,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps),
    )
    return out


def route_blocks(N: int, head_dim: int, itemsize: int):
    """``(queries a program, warps)``: 64 (32 at d = 128), 4 warps; with ``ROUTED_RESIDENT`` (fp16/bf16, d <= 64,
    N >= 1,024) 256 queries and 8 warps, so that each program's pass over the m landmarks serves four times the
    queries (at N = 65,536, m = 512 the 64-query programs read 1 GiB of landmarks from L2 a call; 256-query
    programs compile to 120-128 registers and 56 KiB of shared memory, no spills, sm_90). Not yet timed."""
    from . import ROUTED_RESIDENT

    if ROUTED_RESIDENT and itemsize == 2 and head_dim <= 64 and N >= 1024:
        return 256, 8
    return (64 if head_dim <= 64 else 32), 4


# A torch custom op, so torch.compile keeps it as one opaque call.
@torch.library.custom_op("mita::route_queries", mutates_args=())
def route_queries(q: torch.Tensor, landmarks: torch.Tensor, router_topk: int) -> torch.Tensor:
    """``expert_idx [B, H, N, r]`` (int64, best first) for ``q [B, H, N, d]``, ``landmarks [B, H, m, d]``."""
    return _route(q, landmarks, router_topk)


@route_queries.register_fake
def _(q, landmarks, router_topk):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, router_topk, dtype=torch.long)
