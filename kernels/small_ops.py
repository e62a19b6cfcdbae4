"""MiTA for short sequences (N <= SMALL_MAX_N) with the fused kernels of ``fused_small.py``.

One forward launch computes routing (landmark scores, top-k, gate), the shared expert and the attention;
one backward launch produces dq, dk, dv and the landmark gradient. The routing is either selected in the
forward kernel or passed in (``routing=``); the backward always reuses the forward's selection (saved as
a uint8 mask and the expert ids), so it never selects again.

Both passes are torch custom ops (``mita::small_fwd``, ``mita::small_bwd``) with an autograd formula, as
the general kernels in ``ops.py``: ``torch.compile`` captures them whole and CUDA graphs can record them
(nothing here syncs with the host).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import fused_small

__all__ = ["SMALL_MAX_N", "SMALL_MAX_LANDMARKS", "supports", "mita_attention_small"]

# Largest sequence the fused kernels take: the forward holds the [m, N] landmark-key scores of a head in
# registers for the top-k selection (N padded to a power of two); 256 covers ViT/DeiT's 197 tokens.
SMALL_MAX_N = 256
# Largest number of landmarks (experts), for the same reason.
SMALL_MAX_LANDMARKS = 64

# Tests switch this on so that an output element the kernels fail to write shows up (NaN, or -1 for ids).
_POISON = False


def _alloc(shape, dtype, device):
    if not _POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    # uint8 selection mask: 255 would count a key 255 times; int64 ids: -1 is no key or expert
    return torch.full(shape, 255 if dtype == torch.uint8 else -1, dtype=dtype, device=device)


def supports(q: torch.Tensor, landmarks: torch.Tensor, topk: int, router_topk: int) -> bool:
    """Whether the fused path takes this case (d and dtype as ``mita.kernels``; N, m small; r in {1, 2})."""
    from . import DTYPES, HEAD_DIMS

    N, d = q.shape[-2], q.shape[-1]
    m = landmarks.shape[-2]
    return (
        d in HEAD_DIMS
        and q.dtype in DTYPES
        and 1 <= N <= SMALL_MAX_N
        and 1 <= m <= SMALL_MAX_LANDMARKS
        and 0 <= topk <= N
        and router_topk in (1, 2)
        and router_topk <= m
    )


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # the kernels take any batch, head and row strides (timm's qkv views) but need a unit column stride
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("mita::small_fwd", mutates_args=())
def small_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmarks: torch.Tensor,
    topk_idx: Optional[torch.Tensor], expert_idx: Optional[torch.Tensor], topk: int, router_topk: int,
    shared: bool, scale_shared: float, write_topk: bool, allow_tf32: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out [B, H, N, d], lse [G, N], sel, topk_idx [G, m, topk], expert_idx [G, N, r])``; with a given
    routing (``topk_idx [G, m, topk]``, ``expert_idx [G, N, r]``, int64 contiguous) the last two are empty,
    and so is ``topk_idx`` unless ``write_topk``."""
    q, k, v, landmarks = (_unit_last_stride(t) for t in (q, k, v, landmarks))
    out, lse, sel, topk_out, expert_out = fused_small.forward(
        q, k, v, landmarks, topk, router_topk, shared, scale_shared, topk_idx=topk_idx, expert_idx=expert_idx,
        write_topk=write_topk, allow_tf32=allow_tf32, alloc=_alloc,
    )
    if expert_idx is not None:
        # custom-op outputs may not alias inputs: the caller keeps the routing it passed
        return out, lse, sel, q.new_empty(0, dtype=torch.int64), q.new_empty(0, dtype=torch.int64)
    return out, lse, sel, (topk_out if write_topk else q.new_empty(0, dtype=torch.int64)), expert_out


@small_fwd.register_fake
def _(q, k, v, landmarks, topk_idx, expert_idx, topk, router_topk, shared, scale_shared, write_topk, allow_tf32):
    B, H, N, d = q.shape
    m = landmarks.shape[2]
    sel_shape, _ = fused_small.sel_shape(B * H, N, m, d, q.element_size(), topk)
    def empty():  # one new tensor each: outputs that alias one another would not match the real op
        return q.new_empty(0, dtype=torch.int64)

    select = expert_idx is None
    return (
        q.new_empty(B, N, H, d).transpose(1, 2),  # out, token-major as the kernel writes it
        q.new_empty(B * H, N, dtype=torch.float32), q.new_empty(sel_shape, dtype=torch.uint8),
        q.new_empty(B * H, m, topk, dtype=torch.int64) if select and write_topk else empty(),
        q.new_empty(B * H, N, router_topk, dtype=torch.int64) if select else empty(),
    )


@torch.library.custom_op("mita::small_bwd", mutates_args=())
def small_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmarks: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, sel: torch.Tensor, expert_idx: torch.Tensor, topk: int, shared: bool,
    scale_shared: float, allow_tf32: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dR)`` in the dtype of q; ``dR`` empty without the shared expert."""
    q, k, v, landmarks = (_unit_last_stride(t) for t in (q, k, v, landmarks))
    grad_out = _unit_last_stride(grad_out.to(q.dtype))
    dq, dk, dv, dr = fused_small.backward(
        q, k, v, landmarks, out, grad_out, lse, sel, expert_idx, topk, shared, scale_shared,
        allow_tf32=allow_tf32, alloc=_alloc,
    )
    return dq, dk, dv, (q.new_empty(0) if dr is None else dr)


@small_bwd.register_fake
def _(grad_out, q, k, v, landmarks, out, lse, sel, expert_idx, topk, shared, scale_shared, allow_tf32):
    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape),
            q.new_empty(landmarks.shape) if shared else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, landmarks, topk_idx, expert_idx, topk, router_topk, shared, scale_shared, write_topk, allow_tf32 = inputs
    out, lse, sel, _, expert_out = output
    # the backward reuses the forward's selection: the mask, and the expert ids passed in or chosen
    ctx.save_for_backward(q, k, v, landmarks, out, lse, sel, expert_out if expert_idx is None else expert_idx)
    ctx.meta = (topk, shared, scale_shared, allow_tf32)


def _backward(ctx, grad_out, *_):
    q, k, v, landmarks, out, lse, sel, expert_idx = ctx.saved_tensors
    topk, shared, scale_shared, allow_tf32 = ctx.meta
    dq, dk, dv, dr = small_bwd(grad_out, q, k, v, landmarks, out, lse, sel, expert_idx, topk, shared,
                               scale_shared, allow_tf32)
    # without the shared expert the landmarks only select, which carries no gradient
    return dq, dk, dv, (dr if shared else None), None, None, None, None, None, None, None, None


torch.library.register_autograd("mita::small_fwd", _backward, setup_context=_setup_context)


def mita_attention_small(q, k, v, landmarks, topk, router_topk, shared, scale_shared, *, routing=None,
                         return_routing=False, allow_tf32=False):
    """Fused MiTA for ``N <= SMALL_MAX_N`` (see :func:`supports`); inputs validated by the caller.

    Args:
        q, k, v: ``[B, H, N, d]``; landmarks ``[B, H, m, d]`` (same dtype and device; any strides).
        topk, router_topk: keys per expert (0 keeps only the shared expert) and experts per query (1 or 2).
        shared, scale_shared: include the shared expert; its logit scale (``1/d`` or ``d^-1/2``).
        routing: optional ``(topk_idx [B, H, m, topk], expert_idx [B, H, N, r])``; selected in the kernel
            when None (top-k ties and gate ties go to the lower index).
        return_routing: also return the routing used (selected keys in ascending order when selected here).
        allow_tf32: let fp32 ``tl.dot`` use TF32.

    Returns:
        ``out [B, H, N, d]``, or ``(out, (topk_idx, expert_idx))`` with ``return_routing``.
    """
    B, H, N, _ = q.shape
    m = landmarks.shape[2]
    args = (topk, router_topk, bool(shared), float(scale_shared))
    if routing is not None:
        topk_idx, expert_idx = routing
        idx = topk_idx.reshape(B * H, m, topk).long().contiguous()  # [G, m, topk]
        exp = expert_idx.reshape(B * H, N, router_topk).long().contiguous()  # [G, N, r]
        out = small_fwd(q, k, v, landmarks, idx, exp, *args, False, bool(allow_tf32))[0]
        return (out, (topk_idx, expert_idx)) if return_routing else out
    out, _, _, topk_idx, expert_idx = small_fwd(q, k, v, landmarks, None, None, *args, bool(return_routing),
                                                bool(allow_tf32))
    if not return_routing:
        return out
    return out, (topk_idx.view(B, H, m, topk), expert_idx.view(B, H, N, router_topk))
