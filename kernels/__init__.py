"""Triton kernels for MiTA, installed as ``mita.kernels``.

``mita.functional.mita_attention(impl="triton")`` calls :func:`mita_attention` here, and ``impl="auto"``
does on CUDA when :func:`supports` accepts the case. Triton is imported lazily, so ``import mita`` works
without it. Maths, tiling and limits in kernels/README.md.
"""
import functools
import os
from typing import Tuple

import torch

__all__ = ["available", "supports", "mita_attention", "supports_fused", "mita_attention_fused", "pools_in_kernel", "qkv_source",
           "landmark_topk", "HEAD_DIMS", "DTYPES", "MAX_LANDMARKS", "MAX_TOPK"]

HEAD_DIMS = (32, 64, 128)
# Whether short sequences (N <= 256, m <= 64, r <= 2) take the fused kernels of kernels/fused_small.py (one
# forward and one backward launch, routing selected in the kernel): mita.functional.mita_attention and
# kernels.mita_attention send every case they support there. Off, they use the general kernels.
FUSED_SMALL = True
# Whether models hand fixed pooling windows to the fused kernels (pools_in_kernel below), which then pool the
# landmarks from q themselves (no pooling launches; MiTAAttention then also hands q, k, v over as its qkv
# projection, whose gradient the backward writes as one tensor).
POOL_IN_KERNEL = True
# Whether the general path builds its routing layout with the three Triton launches of kernels/layout_kernels.py
# instead of ~20 PyTorch ops (the same layout, value for value). On: with SHARED_SPLIT_MIN_N below, forward+backward
# 4-25% faster at N = 16,384 and 65,536 (m = k = 64 to 512) on an H200, within run-to-run noise at N = 1,025
# (BENCHMARKS.md, "Long sequences"); False: the PyTorch ops.
LAYOUT_KERNELS = True
# From this many landmark-key scores a head (m N) on, mita.functional.mita_routing selects each landmark's top-k
# with the streamed kernel of kernels/topk_stream.py (no m x N score matrix) instead of R K^T + torch.topk (a
# custom op under torch.compile; nothing in it syncs with the host, so CUDA graphs capture it); None: never.
# Timed in the whole op (BENCHMARKS.md, "Kernel options timed on an H100"): on an H100 (2026-12-05, same
# process) forward 2.09 -> 1.38 ms at N = 65,536, m = k = 128 (m N = 2^23; forward+backward -16%), +12% forward
# at N = 16,384, m = k = 256 (2^22) and +11% at m = k = 64 (2^20); on an H200 on 2026-12-04 (when it still made
# one host sync), -10% forward+backward at m N = 2^25 and +6% at 2^23. From 2^23 on; the score matrix it saves
# (2 m N bytes a head in bf16: 1 GiB at B H = 16, N = 65,536, m = 512) also sets the peak memory there.
STREAM_TOPK_MIN_SCORES = 1 << 23
# Up to this many keys, the general path's landmark top-k runs in one launch (kernels/topk_stream.py's search_topk:
# per landmark block, the scores recomputed tile by tile in ~8 value-space counting passes, no score matrix) instead
# of R K^T and torch.topk (at N = 1,025, m = 49, B H = 384: a 89 us GEMM and ~330 us of top-k kernels in 9
# launches); None: never. On an H100 (2026-12-05, same process, BENCHMARKS.md "Defaults timed on an H100"): at
# N = 1,025, m = k = 49 the GPU's busy time 2.64 -> 2.55 ms with 21 device ops fewer (forward 0.95 -> 0.91 ms); at
# N = 4,096, m = k = 64 the search kernel took more GPU time than the GEMM and torch.topk (busy 1.10 -> 1.32 ms)
# while the host-bound forward moved 1.25 -> 0.76 ms in one call and 0.98 -> 1.07 ms in the next. Hence 2,048.
SEARCH_TOPK_MAX_N = 2048
# From this many keys on, the general path computes the shared values V~ = softmax(s R K^T) V (and their
# backward) with the key-split kernels of kernels/shared.py instead of SDPA, whose m-query launch runs one
# program per head over all N keys; fp16/bf16 inputs only; None: never. 1,024: the shortest length where it was
# timed (H200, with LAYOUT_KERNELS, see above).
SHARED_SPLIT_MIN_N = 1024
# Whether eager (not compiled) calls of the general path run through autograd functions that launch the kernels
# themselves (ops._Attention): no custom-op dispatch, the routing layout built once and kept for the backward, and
# with SHARED_SPLIT_MIN_N the shared values' dK, dV added into the routed ones in the kernel. torch.compile traces
# the custom ops either way; False: eager calls take the custom ops too.
EAGER_FUNCTIONS = True
# Whether torch.compile traces the short path's kernels (kernels/small_traced.py, torch.library.triton_op: inductor
# launches them from its generated code) instead of calling the opaque custom ops of kernels/small_ops.py, whose
# every call goes through the dispatcher and the op's Python. Off: slower on an H100 (BENCHMARKS.md, "The expert
# mask as a logit bias"): a compiled DeiT-S trains at 0.72x softmax's images/s traced against 0.86x with the custom
# ops, and infers at 0.73x against 0.74x.
TRITON_OPS = False
# Whether the general path's routed kernels size their programs to the work of a tile: the forward and dq run one
# program per tile (or per few short tiles) that keeps the expert's keys and values and the head's landmarks and
# shared values on chip while it goes through the tile's queries (routed.resident_config: fp16/bf16, m and topk up
# to 128), the dk/dv programs take several experts of few queries each, beyond the resident kernels' cases the
# block programs take 128 queries or keys with 8 warps (routed.routed_blocks), the expert choice takes 256
# queries a program (routing.route_blocks), and where 4 m topk > N the dk/dv partials fill two input-dtype buffers
# in one pass over half-length chunks of experts (routed.dkdv_plan: 4 products instead of 5, same memory); instead
# of one program per block of 64 queries, each loading the expert's keys and the landmarks again. Off: slower on an
# H100 (BENCHMARKS.md, "Kernel options timed on an H100": forward+backward +14% at N = 65,536, m = k = 128, +6% at
# m = k = 512; its forward and dq kernels 1.2-1.8x the block kernels', its dk/dv kernel 0.6-0.7x with a slower key
# reduction).
ROUTED_RESIDENT = False
# Whether the routed dk/dv programs take ROUTED_RESIDENT's shapes without the rest of it: several experts of few
# queries to a program (routed.experts_per_program) and, where experts hold 128 keys or more (fp16/bf16, d <= 64),
# blocks of 128 keys with 8 warps (routed.routed_blocks); the forward, dq and the dk/dv partials' passes unchanged.
# ROUTED_RESIDENT's dk/dv kernel took 0.6-0.7x the default's time on an H100 (BENCHMARKS.md, "Kernel options timed
# on an H100") while its one-pass partials slowed the key reduction; this keeps the first without the second.
# Off: slower on an H100 (BENCHMARKS.md, "The expert mask as a logit bias"): forward+backward +3-7% at N = 1,025,
# 16,384 and 65,536 (m = k = 49-512).
DKDV_WIDE = False
# Whether the general path's forward block programs take 128 entries with 8 warps where tiles hold 128 or more
# (N r / m >= 128: e.g. N = 65,536, m = 128, T = 512; fp16/bf16, d <= 64), instead of 64 entries with 4 warps: each
# block re-reads the expert's keys and values and the head's landmarks and shared values from L2 half as often.
# Keys stay in blocks of 64. On an H100 (2026-12-05, kernel times from the profiler, same process): forward kernel
# 0.559 -> 0.429 ms at N = 65,536, m = k = 128, 1.907 -> 1.614 ms at m = k = 512, 0.104 -> 0.083 ms at N = 16,384,
# m = k = 64. dq keeps 64-entry blocks: 128 made it slower (0.583 -> 0.841 ms, 1.899 -> 3.057 ms).
ROUTED_WIDE = True
# Whether the routed dk/dv partials, where they go in chunks of experts (4 m topk > N: N = 1,025-16,384 at the
# benchmark's budgets, m = k = 49-256), fill two input-dtype buffers in one pass over each chunk (routed.dkdv_plan:
# 2 launches a chunk instead of 4, 4 products instead of 5) instead of one buffer in two passes, for one more
# [B, H, N, d] of memory at the backward's peak. On an H100 (2026-12-05, same process): time in mita's kernels
# 2.60 -> 2.12 ms at N = 16,384, m = k = 256 and 15.08 -> 12.47 ms at N = 65,536, m = k = 512 (backward 11.5 ->
# 8.9 ms), 2.13 -> 2.07 at N = 1,025, 0.86 -> 0.79 at N = 4,096; peak memory 1.06-1.10x SDPA's (0.95-1.01x without).
DKDV_TWO_BUFFERS = True
# Whether the general path's forward and dq programs of fewer than 64 entries (short tiles, N r / m < 64: ViT
# lengths such as N = 1,025, m = 49) run with their tiles transposed (keys and landmarks as rows), so that their
# products have 64 rows and become Hopper warp-group MMAs (routed.transposed); the untransposed 32-entry programs
# use the older MMA instructions. Off: within the run-to-run spread on an H100 (BENCHMARKS.md, "Kernel options
# timed on an H100"), and 8-9% slower with ROUTED_RESIDENT at N = 65,536.
ROUTED_TRANSPOSED = False
# Whether the key-split shared values' dK, dV (kernels/shared.py) run programs that load every landmark once and go
# through several key blocks (shared.resident_keys_config: fp16/bf16, m up to 128 at d <= 64), instead of one
# program per key block that reads all the landmarks again (at N = 65,536, m = 128: 1,024 reads of them a head);
# and from m = 128 on the programs that loop over the keys (shared values and their dR, shared.config's LM_BM) or
# over the queries (the shared logits' landmark gradients, routed.shared_backward) take 128 landmarks with 8 warps,
# so that each key or query tile is read by half as many programs. Off: no faster on an H100 (BENCHMARKS.md,
# "Kernel options timed on an H100": within 1% at N = 65,536, within the host-bound spread below).
SHARED_RESIDENT = False
# Whether the eager general path with the key-split shared values sums the routed dk/dv partials per key in the
# shared values' key pass (kernels/shared.py's _bwd_keys_kernel, PAIRS) where they take one pass (4 m topk <= N:
# the paper's budgets, e.g. N = 16,384, m = k = 64 and N = 65,536, m = k = 128), instead of a key reduction of their
# own (routed.py's _key_reduce_kernel) whose dK, dV that pass then reads back, adds to and writes again. Off: no
# faster on an H100 (2026-12-05, profiler, same process): the key pass grew more than the reduction it saves
# (0.432 -> 0.652 ms against 0.178 at N = 65,536, m = k = 128; 0.095 -> 0.145 against 0.047 at N = 16,384, m = 64).
FUSE_KEYS = False
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_LANDMARKS = 1024
MAX_TOPK = 1024


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_and_cuda() -> Tuple[bool, bool]:
    """Whether Triton imports and whether CUDA is present: asked once (every call of the op checks)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, False
    return True, torch.cuda.is_available()


def available() -> bool:
    """Whether the kernels can run here: Triton imports and CUDA is present or ``TRITON_INTERPRET=1``."""
    has_triton, cuda = _triton_and_cuda()
    return has_triton and (cuda or _interpreting())


def _unsupported(q, landmarks, topk, router_topk):
    """Why the kernels cannot take this case, or None."""
    d, m = q.shape[-1], landmarks.shape[-2]
    if d not in HEAD_DIMS:
        return f"head dim d must be one of {HEAD_DIMS}, got {d}"
    if q.dtype not in DTYPES:
        return f"dtype must be one of {DTYPES}, got {q.dtype}"
    if not 1 <= m <= MAX_LANDMARKS:
        return f"number of landmarks m must lie in [1, {MAX_LANDMARKS}], got {m}"
    if not 0 <= topk <= MAX_TOPK:
        return f"topk must lie in [0, {MAX_TOPK}], got {topk}"
    if not 1 <= router_topk <= m:
        return f"router_topk must lie in [1, m={m}], got {router_topk}"
    return None


def supports(q: torch.Tensor, landmarks: torch.Tensor, topk: int, router_topk: int) -> bool:
    """Whether the kernels handle this case: d in {32, 64, 128}, fp16/bf16/fp32, m and topk <= 1024."""
    return _unsupported(q, landmarks, topk, router_topk) is None


def mita_attention(q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared, *, allow_tf32=False):
    """MiTA attention for a given routing, with Triton routed experts; differentiable in q, k, v, landmarks.

    Args:
        q, k, v: ``[B, H, N, d]``; landmarks ``[B, H, m, d]`` (same dtype and device; any strides).
        topk_idx: int64 ``[B, H, m, topk]`` keys of each routed expert (topk may be 0: shared only).
        expert_idx: int64 ``[B, H, N, r]`` experts of each query.
        shared: include the shared expert; scale_shared: its logit scale (``1/d`` or ``d^-1/2``).
        allow_tf32: let fp32 ``tl.dot`` use TF32 (faster, about 1e-3 relative error); default IEEE fp32.

    Returns:
        ``out [B, H, N, d]`` in the dtype of q.
    """
    if not available():
        raise RuntimeError("mita.kernels needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    if not (q.is_cuda or _interpreting()):
        raise ValueError(f"q must be a CUDA tensor for the Triton kernels, got device {q.device}")
    reason = _unsupported(q, landmarks, topk_idx.shape[-1], expert_idx.shape[-1])
    if reason is not None:
        raise ValueError(f"mita.kernels does not support this case: {reason}")
    if topk_idx.shape[-1] == 0 and not shared:
        raise ValueError("topk_idx has no keys (topk=0) and shared=False: no expert left")
    from . import small_ops

    topk, router_topk = topk_idx.shape[-1], expert_idx.shape[-1]
    if FUSED_SMALL and small_ops.supports(q, landmarks, topk, router_topk):
        # short sequences: one fused forward and one fused backward launch (kernels/fused_small.py)
        return small_ops.mita_attention_small(q, k, v, landmarks, topk, router_topk, shared, scale_shared,
                                              routing=(topk_idx, expert_idx), allow_tf32=allow_tf32)
    from . import ops

    return ops.mita_attention(q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared, allow_tf32)


def supports_fused(q: torch.Tensor, landmarks: torch.Tensor, topk: int, router_topk: int) -> bool:
    """Whether :func:`mita_attention_fused` selects in the kernel: N <= 256, m <= 64, r <= 2 (and d, dtype
    as :func:`supports`)."""
    from . import small_ops

    return small_ops.supports(q, landmarks, topk, router_topk)


def mita_attention_fused(q, k, v, landmarks, topk, router_topk, shared, scale_shared, *, return_routing=False,
                         allow_tf32=False, pool=None, qkv=None):
    """MiTA with routing selected inside one fused kernel, for cases :func:`supports_fused` accepts.

    Landmark-key scores, top-k, gate and shared values are computed in the forward kernel, so no routing
    tensor reaches memory unless ``return_routing``. Arguments as :func:`mita_attention`, with ``topk``
    (0 <= topk <= N) and ``router_topk`` (1 or 2) instead of a routing; top-k and gate ties go to the lower
    index. ``pool``: ``[m, N]`` pooling weights instead of ``landmarks`` (None): the landmarks are
    ``pool @ q`` per head, pooled inside the kernels where they can (then their gradient goes into dq
    there). ``qkv``: the ``[B, N, 3, H, d]`` tensor q, k, v are views of (``small_ops.qkv_source``), whose
    gradient the backward then writes whole. Returns ``out [B, H, N, d]`` or ``(out, (topk_idx [B, H, m, topk],
    expert_idx [B, H, N, r]))``.
    """
    if pool is not None:
        landmarks = pool  # [m, N]: its m is what the checks below read
    if not available():
        raise RuntimeError("mita.kernels needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    if not (q.is_cuda or _interpreting()):
        raise ValueError(f"q must be a CUDA tensor for the Triton kernels, got device {q.device}")
    if not supports_fused(q, landmarks, topk, router_topk):
        raise ValueError(
            f"mita_attention_fused needs N <= 256, m <= 64, router_topk <= 2, d in {HEAD_DIMS} and a dtype in "
            f"{DTYPES}; got N={q.shape[-2]}, m={landmarks.shape[-2]}, router_topk={router_topk}, "
            f"d={q.shape[-1]}, {q.dtype} (use mita_attention with a routing)"
        )
    if topk == 0 and not shared:
        raise ValueError("topk=0 and shared=False: no expert left")
    from . import small_ops

    return small_ops.mita_attention_small(q, k, v, None if pool is not None else landmarks, topk, router_topk,
                                          shared, scale_shared, return_routing=return_routing,
                                          allow_tf32=allow_tf32, pool=pool, qkv=qkv)


def qkv_source(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The ``[B, N, 3, H, d]`` tensor q, k, v are the views of, as timm's attention makes them, or None
    (``small_ops.qkv_source``)."""
    from .small_ops import qkv_source as source

    return source(q, k, v)


def pools_in_kernel(q: torch.Tensor, num_landmarks: int, topk: int, router_topk: int) -> bool:
    """Whether models should hand ``[m, N]`` landmark weights to the fused kernels, which pool them from q
    inside (``mita_attention_fused(..., pool=W)``): ``POOL_IN_KERNEL`` on, CUDA, the short path, and a
    config that keeps a whole head in one program (N in (128, 256], d = 64, fp16/bf16)."""
    if not (POOL_IN_KERNEL and FUSED_SMALL and q.is_cuda and available()):
        return False
    from . import fused_small, small_ops

    N, d = q.shape[-2], q.shape[-1]
    like = q[..., :1, :].expand(*q.shape[:-2], num_landmarks, d)  # a view of q shaped as the landmarks
    return small_ops.supports(q, like, topk, router_topk) and fused_small.pools_in_kernel(N, d, q.element_size())


def landmark_topk(k: torch.Tensor, landmarks: torch.Tensor, topk: int) -> torch.Tensor:
    """``topk_idx [B, H, m, topk]`` (int64): the keys with the largest unscaled scores ``R_j . k_i``, streamed
    (kernels/topk_stream.py: no m x N tensor; rows by score, ties to the lower index)."""
    from .topk_stream import landmark_topk as select

    return select(k, landmarks, topk)


def landmark_topk_search(k: torch.Tensor, landmarks: torch.Tensor, topk: int) -> torch.Tensor:
    """``topk_idx [B, H, m, topk]`` (int64) as :func:`landmark_topk`, in one launch (kernels/topk_stream.py's
    ``search_topk``: rows of up to a few thousand keys)."""
    from .topk_stream import landmark_topk_search as select

    return select(k, landmarks, topk)


def route_queries(q: torch.Tensor, landmarks: torch.Tensor, router_topk: int) -> torch.Tensor:
    """Experts of each query, ``top-r_j (R_j . q)`` for r in {1, 2}, without forming the N x m gate matrix.

    ``q [B, H, N, d]``, ``landmarks [B, H, m, d]`` -> int64 ``[B, H, N, r]``, best first; ties go to the
    lower landmark index.
    """
    from .routing import route

    return route(q, landmarks, router_topk)
