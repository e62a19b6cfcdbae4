"""MiTA for short sequences (N <= SMALL_MAX_N) with the fused kernels of ``fused_small.py``.

One forward launch computes routing (landmark scores, top-k, gate), the shared expert and the attention;
one backward launch produces dq, dk, dv and the landmark gradient. The routing is either selected in the
forward kernel or passed in (``routing=``); the backward always reuses the forward's selection (saved as
a uint8 multiplicity mask and int32 expert ids), so it never selects again.

Both passes are torch custom ops (``mita::small_fwd``, ``mita::small_bwd``) with an autograd formula, as
the general kernels in ``ops.py``: ``torch.compile`` captures them whole and CUDA graphs can record them
(nothing here syncs with the host).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import fused_small

__all__ = ["SMALL_MAX_N", "SMALL_MAX_LANDMARKS", "supports", "mita_attention_small", "qkv_source"]

# Largest sequence the fused kernels take: a program holds whole rows of a head on chip (N padded to a
# power of two); 256 covers ViT/DeiT's 197 tokens.
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
    # uint8 selection mask: 255 would count a key 255 times; int ids: -1 is no key or expert
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


def _empty(q: torch.Tensor, dtype=torch.int32) -> torch.Tensor:
    return q.new_empty(0, dtype=dtype)


@torch.library.custom_op("mita::small_fwd", mutates_args=())
def small_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmarks: torch.Tensor,
    sel: Optional[torch.Tensor], expert: Optional[torch.Tensor], topk: int, router_topk: int,
    shared: bool, scale_shared: float, allow_tf32: bool, pool: Optional[torch.Tensor], num_landmarks: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out [B, H, N, d], lse [G, N], sel [G, MP, NP], expert [G, N, r], vs [G, MP, d], lse_sh [G, MP],
    lmk)``.

    With a given routing (``sel`` uint8, ``expert`` int32, as :func:`routing_tensors` builds them) the
    returned ``sel`` and ``expert`` are empty (outputs may not alias inputs; the caller keeps its own).
    With ``pool`` (padded fp32 weights, ``fused_small.pool_weights``) the ``num_landmarks`` landmarks are
    pooled from q in the kernel (``landmarks`` is then unused) and ``lmk [G, MP, d]`` holds them; else
    ``lmk`` is empty.
    """
    return _small_forward(q, k, v, landmarks, sel, expert, topk, router_topk, shared, scale_shared, allow_tf32,
                          pool, num_landmarks)


def _small_forward(q, k, v, landmarks, sel, expert, topk, router_topk, shared, scale_shared, allow_tf32, pool,
                   num_landmarks, launcher=None):
    """What :func:`small_fwd` and :func:`small_fwd_qkv` return (one custom op does not call the other: each
    dispatch costs host time)."""
    q, k, v, landmarks, (out, lse, sel_out, exp_out, vs, lsh, lmk) = _forward_kernels(
        q, k, v, landmarks, sel, expert, topk, router_topk, shared, scale_shared, allow_tf32, pool, num_landmarks,
        launcher=launcher)
    if expert is not None:
        return out, lse, _empty(q, torch.uint8), _empty(q), vs, lsh, lmk
    return out, lse, sel_out, exp_out, vs, lsh, lmk


def _forward_kernels(q, k, v, landmarks, sel, expert, topk, router_topk, shared, scale_shared, allow_tf32, pool,
                     num_landmarks, launcher=None):
    """The inputs as the kernels read them (unit last stride) and ``fused_small.forward``'s outputs."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    if pool is None:
        landmarks = _unit_last_stride(landmarks)
    outputs = fused_small.forward(
        q, k, v, landmarks, topk, router_topk, shared, scale_shared, sel=sel, expert=expert, pool=pool,
        num_landmarks=num_landmarks, allow_tf32=allow_tf32, alloc=_alloc, launcher=launcher,
    )
    return q, k, v, landmarks, outputs


@small_fwd.register_fake
def _small_fwd_fake(q, k, v, landmarks, sel, expert, topk, router_topk, shared, scale_shared, allow_tf32, pool,
                    num_landmarks):
    B, H, N, d = q.shape
    m = landmarks.shape[2] if pool is None else num_landmarks
    sel_shape, exp_shape, vs_shape, lsh_shape = fused_small.saved_shapes(B, H, N, m, d, router_topk, topk, shared)
    select = expert is None
    return (
        q.new_empty(B, N, H, d).transpose(1, 2),  # out, token-major as the kernel writes it
        q.new_empty(B * H, N, dtype=torch.float32),
        q.new_empty(sel_shape, dtype=torch.uint8) if select else _empty(q, torch.uint8),
        q.new_empty(exp_shape, dtype=torch.int32) if select else _empty(q),
        q.new_empty(vs_shape),
        q.new_empty(lsh_shape, dtype=torch.float32),
        q.new_empty(B * H, fused_small.padded(m), d) if pool is not None else q.new_empty(0),
    )


@torch.library.custom_op("mita::small_bwd", mutates_args=())
def small_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmarks: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, sel: torch.Tensor, expert: torch.Tensor, vs: torch.Tensor,
    lse_sh: torch.Tensor, topk: int, shared: bool, scale_shared: float, multi: bool, allow_tf32: bool,
    pool: Optional[torch.Tensor], lmk: torch.Tensor, num_landmarks: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dR)`` in the dtype of q; ``dR`` empty without the shared expert or with ``pool`` (whose
    landmark gradient is inside dq). ``multi``: the mask may count a key twice for one query (r = 2 or a
    routing passed in)."""
    return _backward_kernels(grad_out, q, k, v, landmarks, out, lse, sel, expert, vs, lse_sh, topk, shared,
                             scale_shared, multi, allow_tf32, pool, lmk, num_landmarks, empty_dr=True)


@small_bwd.register_fake
def _(grad_out, q, k, v, landmarks, out, lse, sel, expert, vs, lse_sh, topk, shared, scale_shared, multi,
      allow_tf32, pool, lmk, num_landmarks):
    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape),
            q.new_empty(landmarks.shape) if shared and pool is None else q.new_empty(0))


def _backward_kernels(grad_out, q, k, v, landmarks, out, lse, sel, expert, vs, lsh, topk, shared, scale_shared,
                      multi, allow_tf32, pool, lmk, num_landmarks, empty_dr, packed=False, launcher=None):
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    if pool is None:
        landmarks = _unit_last_stride(landmarks)
    grad_out = _unit_last_stride(grad_out.to(q.dtype))
    grads = fused_small.backward(
        q, k, v, landmarks, out, grad_out, lse, sel, expert, vs, lsh, topk, shared, scale_shared, multi,
        pool=pool, num_landmarks=num_landmarks, lmk=lmk, allow_tf32=allow_tf32, alloc=_alloc, packed=packed,
        launcher=launcher,
    )
    if packed:
        return grads[4], grads[3]  # dqkv, dR
    dq, dk, dv, dr = grads
    if dr is None and empty_dr:
        dr = q.new_empty(0)
    return dq, dk, dv, dr


def _setup_context(ctx, inputs, output):
    q, k, v, landmarks, sel, expert, topk, router_topk, shared, scale_shared, allow_tf32, pool, num_landmarks = inputs
    out, lse, sel_out, exp_out, vs, lsh, lmk = output
    # the backward reuses the forward's selection: the mask and the expert ids, chosen or passed in
    multi = expert is not None or router_topk == 2
    if expert is None:
        sel, expert = sel_out, exp_out
    ctx.save_for_backward(q, k, v, landmarks, out, lse, sel, expert, vs, lsh, pool, lmk)
    ctx.meta = (topk, shared, scale_shared, multi, allow_tf32, num_landmarks)


def autograd_backward(bwd_op):
    """The autograd formula of a forward op (``small_fwd`` / ``small_fwd_qkv``, or their traced twins): the
    backward op ``bwd_op`` on what :func:`_setup_context` / :func:`_setup_context_qkv` saved (the op's
    tensors up to ``lse_sh``, then ``pool`` and ``lmk``); nine inputs of either forward take no gradient."""

    def backward(ctx, grad_out, *_):
        saved = ctx.saved_tensors
        topk, shared, scale_shared, multi, allow_tf32, num_landmarks = ctx.meta
        *grads, dr = bwd_op(grad_out, *saved[:-2], topk, shared, scale_shared, multi, allow_tf32, *saved[-2:],
                            num_landmarks)
        # without the shared expert the landmarks only select, which carries no gradient; pooled in the
        # kernel (saved[-2] is the pooling weights), their gradient is inside dq
        dr = dr if shared and saved[-2] is None else None
        return (*grads, dr, *(None,) * 9)

    return backward


torch.library.register_autograd("mita::small_fwd", autograd_backward(small_bwd), setup_context=_setup_context)


def _views(qkv: torch.Tensor):
    """q, k, v ``[B, H, N, d]`` of a ``[B, N, 3, H, d]`` tensor."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


@torch.library.custom_op("mita::small_fwd_qkv", mutates_args=())
def small_fwd_qkv(
    qkv: torch.Tensor, landmarks: torch.Tensor, sel: Optional[torch.Tensor], expert: Optional[torch.Tensor],
    topk: int, router_topk: int, shared: bool, scale_shared: float, allow_tf32: bool, pool: Optional[torch.Tensor],
    num_landmarks: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`small_fwd` with q, k, v given as the ``[B, N, 3, H, d]`` tensor they are views of."""
    return _small_forward(*_views(qkv), landmarks, sel, expert, topk, router_topk, shared, scale_shared, allow_tf32,
                          pool, num_landmarks)


@small_fwd_qkv.register_fake
def _(qkv, landmarks, sel, expert, topk, router_topk, shared, scale_shared, allow_tf32, pool, num_landmarks):
    q, k, v = _views(qkv)
    return _small_fwd_fake(q, k, v, landmarks, sel, expert, topk, router_topk, shared, scale_shared, allow_tf32,
                           pool, num_landmarks)


@torch.library.custom_op("mita::small_bwd_qkv", mutates_args=())
def small_bwd_qkv(
    grad_out: torch.Tensor, qkv: torch.Tensor, landmarks: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    sel: torch.Tensor, expert: torch.Tensor, vs: torch.Tensor, lse_sh: torch.Tensor, topk: int, shared: bool,
    scale_shared: float, multi: bool, allow_tf32: bool, pool: Optional[torch.Tensor], lmk: torch.Tensor,
    num_landmarks: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dqkv [B, N, 3, H, d], dR)``: :func:`small_bwd` with the three gradients written as one tensor."""
    dqkv, dr = _backward_kernels(grad_out, *_views(qkv), landmarks, out, lse, sel, expert, vs, lse_sh, topk, shared,
                                 scale_shared, multi, allow_tf32, pool, lmk, num_landmarks, empty_dr=True,
                                 packed=True)
    return dqkv, (qkv.new_empty(0) if dr is None else dr)


@small_bwd_qkv.register_fake
def _(grad_out, qkv, landmarks, out, lse, sel, expert, vs, lse_sh, topk, shared, scale_shared, multi, allow_tf32,
      pool, lmk, num_landmarks):
    return qkv.new_empty(qkv.shape), (landmarks.new_empty(landmarks.shape) if shared and pool is None
                                      else qkv.new_empty(0))


def _setup_context_qkv(ctx, inputs, output):
    qkv, landmarks, sel, expert, topk, router_topk, shared, scale_shared, allow_tf32, pool, num_landmarks = inputs
    out, lse, sel_out, exp_out, vs, lsh, lmk = output
    multi = expert is not None or router_topk == 2
    if expert is None:
        sel, expert = sel_out, exp_out
    ctx.save_for_backward(qkv, landmarks, out, lse, sel, expert, vs, lsh, pool, lmk)
    ctx.meta = (topk, shared, scale_shared, multi, allow_tf32, num_landmarks)


torch.library.register_autograd("mita::small_fwd_qkv", autograd_backward(small_bwd_qkv),
                                setup_context=_setup_context_qkv)


def _function_forward(ctx, q, k, v, landmarks, sel, expert, args):
    """The kernels' forward for an autograd function: ``(out, sel, expert)``, the routing non-differentiable."""
    q, k, v, landmarks, outputs = _forward_kernels(q, k, v, landmarks, sel, expert, *args)
    _setup_context(ctx, (q, k, v, landmarks, sel, expert, *args), outputs)
    if expert is None:  # selected here: the mask and expert ids are outputs
        sel, expert = outputs[2:4]
    ctx.mark_non_differentiable(sel, expert)
    # no zero-filled gradients made for the routing outputs before each backward (two fill launches and the
    # mask's bytes again)
    ctx.set_materialize_grads(False)
    return outputs[0], sel, expert


def _function_backward(ctx, grad_out, packed):
    """``(dq, dk, dv, dR)``, or ``(dqkv, dR)`` with ``packed``, from what :func:`_function_forward` saved."""
    q, k, v, landmarks, out, lse, sel, expert, vs, lsh, pool, lmk = ctx.saved_tensors
    topk, shared, scale_shared, multi, allow_tf32, num_landmarks = ctx.meta
    if grad_out is None:  # the output took no gradient
        return (None,) * (2 if packed else 4)
    return _backward_kernels(grad_out, q, k, v, landmarks, out, lse, sel, expert, vs, lsh, topk, shared, scale_shared,
                             multi, allow_tf32, pool, lmk, num_landmarks, empty_dr=False, packed=packed)


class _SmallAttention(torch.autograd.Function):
    """The same forward and backward as the custom ops, without their dispatch (about half of the host time
    of an eager forward+backward); ``torch.compile`` traces the custom ops instead."""

    @staticmethod
    def forward(ctx, q, k, v, landmarks, sel, expert, *args):
        return _function_forward(ctx, q, k, v, landmarks, sel, expert, args)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *_):
        return (*_function_backward(ctx, grad_out, packed=False), *(None,) * 9)


class _SmallAttentionPacked(torch.autograd.Function):
    """:class:`_SmallAttention` with q, k, v handed over as the one ``[B, N, 3, H, d]`` tensor they are views
    of (a ViT's qkv projection output, reshaped as timm does): the backward writes dq, dk, dv into one tensor
    of that layout, which is the projection's gradient as it stands (no stack of three gradients after)."""

    @staticmethod
    def forward(ctx, qkv, landmarks, sel, expert, *args):
        return _function_forward(ctx, *_views(qkv), landmarks, sel, expert, args)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *_):
        return (*_function_backward(ctx, grad_out, packed=True), *(None,) * 9)


def qkv_source(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
    """The ``[B, N, 3, H, d]`` tensor whose three views q, k, v ``[B, H, N, d]`` are, as timm's attention makes
    them (``qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)``), or None when they are not (and
    under ``torch.compile``, which traces the custom ops with three gradients: ``_base`` would break its graph)."""
    if torch.compiler.is_compiling():
        return None
    base = q._base
    if base is None or k._base is not base or v._base is not base or not base.is_contiguous():
        return None
    B, H, N, d = q.shape
    step, size = H * d, q.element_size()
    if base.numel() != 3 * B * N * step or q.stride() != (3 * N * step, d, 3 * step, 1):
        return None
    if k.stride() != q.stride() or v.stride() != q.stride() or k.shape != q.shape or v.shape != q.shape:
        return None
    start = base.data_ptr()
    if (q.data_ptr(), k.data_ptr(), v.data_ptr()) != (start, start + step * size, start + 2 * step * size):
        return None
    return base.view(B, N, 3, H, d)


def _attention(q, k, v, landmarks, sel, expert, *args, qkv=None):
    """``(out, sel, expert)``: the custom op under ``torch.compile`` (or, with ``mita.kernels.TRITON_OPS``, its
    traced twin of ``small_traced.py``), the autograd function in eager mode."""
    if torch.compiler.is_compiling():
        from . import TRITON_OPS

        if TRITON_OPS:
            from .small_traced import small_fwd_qkv_traced as fwd_qkv
            from .small_traced import small_fwd_traced as fwd
        else:
            fwd_qkv, fwd = small_fwd_qkv, small_fwd
        if qkv is not None:
            out, _, sel_out, exp_out, _, _, _ = fwd_qkv(qkv, landmarks, sel, expert, *args)
        else:
            out, _, sel_out, exp_out, _, _, _ = fwd(q, k, v, landmarks, sel, expert, *args)
        return out, sel_out, exp_out
    if qkv is not None:
        return _SmallAttentionPacked.apply(qkv, landmarks, sel, expert, *args)
    return _SmallAttention.apply(q, k, v, landmarks, sel, expert, *args)


def routing_tensors(topk_idx: torch.Tensor, expert_idx: torch.Tensor, N: int, m: int):
    """The kernels' form of a routing ``(topk_idx [B, H, m, topk], expert_idx [B, H, N, r])``: the uint8
    multiplicity mask ``[G, MP, NP]`` (a key listed twice by one expert counts twice) and int32 expert ids
    ``[G, N, r]``."""
    B, H = topk_idx.shape[:2]
    G, topk = B * H, topk_idx.shape[-1]
    sel = torch.zeros(G, fused_small.padded(m), fused_small.padded(N), dtype=torch.uint8, device=topk_idx.device)
    if topk > 0:
        idx = topk_idx.reshape(G, m, topk).long()
        sel[:, :m].scatter_add_(2, idx, torch.ones_like(idx, dtype=torch.uint8))
    return sel, expert_idx.reshape(G, N, -1).to(torch.int32).contiguous()


def selected_keys(sel: torch.Tensor, B: int, H: int, N: int, m: int, topk: int) -> torch.Tensor:
    """``topk_idx [B, H, m, topk]`` (int64, ascending) from the kernel's own 0/1 selection mask."""
    if topk == 0:
        return torch.empty(B, H, m, 0, dtype=torch.long, device=sel.device)
    mask = sel[:, :m, :N].to(torch.int16)  # [G, m, N]
    # a stable descending sort puts the selected keys first, in ascending order
    order = torch.argsort(mask, dim=-1, descending=True, stable=True)[..., :topk]
    return order.view(B, H, m, topk)


_PADDED = {}


def _padded_weights(pool: torch.Tensor) -> torch.Tensor:
    """``fused_small.pool_weights(pool)``, kept per weights tensor (models hand the same cached tensor to
    every call): two launches and their host time saved each call."""
    if torch.compiler.is_compiling():
        return fused_small.pool_weights(pool)
    # inference tensors keep no version counter (and cannot change outside inference_mode)
    version = -1 if pool.is_inference() else pool._version
    entry = _PADDED.get(id(pool))
    if entry is None or entry[0] is not pool or entry[1] != version:
        if len(_PADDED) > 64:
            _PADDED.clear()
        with torch.inference_mode(False):  # a normal tensor: autograd may save it for a training step
            entry = _PADDED[id(pool)] = (pool, version, fused_small.pool_weights(pool))
    return entry[2]


def mita_attention_small(q, k, v, landmarks, topk, router_topk, shared, scale_shared, *, routing=None,
                         return_routing=False, allow_tf32=False, pool=None, qkv=None):
    """Fused MiTA for ``N <= SMALL_MAX_N`` (see :func:`supports`); inputs validated by the caller.

    Args:
        q, k, v: ``[B, H, N, d]``; landmarks ``[B, H, m, d]`` (same dtype and device; any strides), or None
            with ``pool``.
        topk, router_topk: keys per expert (0 keeps only the shared expert) and experts per query (1 or 2).
        shared, scale_shared: include the shared expert; its logit scale (``1/d`` or ``d^-1/2``).
        routing: optional ``(topk_idx [B, H, m, topk], expert_idx [B, H, N, r])``; selected in the kernel
            when None (top-k ties and gate ties go to the lower index).
        return_routing: also return the routing used (selected keys in ascending order when selected here).
        allow_tf32: let fp32 ``tl.dot`` use TF32.
        pool: optional ``[m, N]`` pooling weights: the landmarks are ``pool @ q`` per head, pooled inside the
            kernels where ``mita.kernels.POOL_IN_KERNEL`` is on and ``fused_small.pools_in_kernel`` holds
            (their gradient then goes into dq there), else in PyTorch before the call.
        qkv: optional ``[B, N, 3, H, d]`` tensor of which q, k, v are the views (:func:`qkv_source`): the
            gradient then reaches it as one tensor written by the backward kernel (eager mode; under
            ``torch.compile`` the three gradients as usual).

    Returns:
        ``out [B, H, N, d]``, or ``(out, (topk_idx, expert_idx))`` with ``return_routing``.
    """
    B, H, N, d = q.shape
    pool_arg, m = None, None
    if pool is not None:
        from . import POOL_IN_KERNEL

        m = pool.shape[0]
        if POOL_IN_KERNEL and fused_small.pools_in_kernel(N, d, q.element_size()):
            pool_arg = _padded_weights(pool)
            landmarks = q.new_empty(0, 0, 0, 0)
        else:
            landmarks = torch.matmul(pool.to(q.dtype), q)  # [B, H, m, d]
    m = landmarks.shape[2] if pool_arg is None else m
    args = (topk, router_topk, bool(shared), float(scale_shared), bool(allow_tf32), pool_arg, m)
    if routing is None and topk > 0:
        out, sel, expert = _attention(q, k, v, landmarks, None, None, *args, qkv=qkv)
        if not return_routing:
            return out
        return out, (selected_keys(sel, B, H, N, m, topk), expert.view(B, H, N, router_topk).long())
    if routing is None:
        # shared expert only: nothing to select for the attention; the experts only when asked for
        sel, expert = _empty(q, torch.uint8), _empty(q)
        if return_routing:
            from .routing import route

            lm = landmarks if pool_arg is None else torch.matmul(pool.to(q.dtype), q.detach())
            routing = (q.new_empty(B, H, m, 0, dtype=torch.long), route(q, lm, router_topk))
    else:
        sel, expert = routing_tensors(*routing, N, m)
    out = _attention(q, k, v, landmarks, sel, expert, *args, qkv=qkv)[0]
    return (out, tuple(routing)) if return_routing else out
