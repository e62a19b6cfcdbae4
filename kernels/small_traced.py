"""The short path's forward and backward as ``torch.library.triton_op`` (behind ``mita.kernels.TRITON_OPS``).

Under ``torch.compile`` the custom ops of ``small_ops.py`` are opaque: every call goes through the dispatcher
into Python, which plans, allocates and launches (host time a layer and step). A ``triton_op`` is traced
instead: inductor sees the allocations and the ``wrap_triton`` launches of the same kernels and emits them in
its own generated code, so a compiled step launches the kernels without the op's Python. Same kernels,
plans and outputs as ``small_fwd_qkv`` / ``small_bwd_qkv`` and ``small_fwd`` / ``small_bwd`` (their
docstrings hold the contracts); eager calls never come here (``small_ops._SmallAttention`` runs them).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.library import triton_op, wrap_triton

from . import small_ops

T = torch.Tensor


def _launch(name, kernel, grid, args, meta, key):
    """``fused_small._launch``'s signature, as traceable launches: inductor takes the kernel, grid and args."""
    wrap_triton(kernel)[grid](*args, **meta)


@triton_op("mita::small_fwd_traced", mutates_args=())
def small_fwd_traced(
    q: T, k: T, v: T, landmarks: T, sel: Optional[T], expert: Optional[T], topk: int, router_topk: int,
    shared: bool, scale_shared: float, allow_tf32: bool, pool: Optional[T], num_landmarks: int,
) -> Tuple[T, T, T, T, T, T, T]:
    return small_ops._small_forward(q, k, v, landmarks, sel, expert, topk, router_topk, shared, scale_shared,
                                    allow_tf32, pool, num_landmarks, launcher=_launch)


@triton_op("mita::small_bwd_traced", mutates_args=())
def small_bwd_traced(
    grad_out: T, q: T, k: T, v: T, landmarks: T, out: T, lse: T, sel: T, expert: T, vs: T, lse_sh: T, topk: int,
    shared: bool, scale_shared: float, multi: bool, allow_tf32: bool, pool: Optional[T], lmk: T, num_landmarks: int,
) -> Tuple[T, T, T, T]:
    return small_ops._backward_kernels(grad_out, q, k, v, landmarks, out, lse, sel, expert, vs, lse_sh, topk, shared,
                                       scale_shared, multi, allow_tf32, pool, lmk, num_landmarks, empty_dr=True,
                                       launcher=_launch)


@triton_op("mita::small_fwd_qkv_traced", mutates_args=())
def small_fwd_qkv_traced(
    qkv: T, landmarks: T, sel: Optional[T], expert: Optional[T], topk: int, router_topk: int, shared: bool,
    scale_shared: float, allow_tf32: bool, pool: Optional[T], num_landmarks: int,
) -> Tuple[T, T, T, T, T, T, T]:
    return small_ops._small_forward(*small_ops._views(qkv), landmarks, sel, expert, topk, router_topk, shared,
                                    scale_shared, allow_tf32, pool, num_landmarks, launcher=_launch)


@triton_op("mita::small_bwd_qkv_traced", mutates_args=())
def small_bwd_qkv_traced(
    grad_out: T, qkv: T, landmarks: T, out: T, lse: T, sel: T, expert: T, vs: T, lse_sh: T, topk: int,
    shared: bool, scale_shared: float, multi: bool, allow_tf32: bool, pool: Optional[T], lmk: T, num_landmarks: int,
) -> Tuple[T, T]:
    dqkv, dr = small_ops._backward_kernels(grad_out, *small_ops._views(qkv), landmarks, out, lse, sel, expert, vs,
                                           lse_sh, topk, shared, scale_shared, multi, allow_tf32, pool, lmk,
                                           num_landmarks, empty_dr=True, packed=True, launcher=_launch)
    return dqkv, (qkv.new_empty(0) if dr is None else dr)


# the same saved tensors and formula as the custom ops (small_ops._setup_context / _setup_context_qkv)
small_fwd_traced.register_autograd(small_ops.autograd_backward(small_bwd_traced),
                                   setup_context=small_ops._setup_context)
small_fwd_qkv_traced.register_autograd(small_ops.autograd_backward(small_bwd_qkv_traced),
                                       setup_context=small_ops._setup_context_qkv)
