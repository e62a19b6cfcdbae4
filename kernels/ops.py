"""MiTA attention core with Triton kernels: an autograd.Function over [shared ; routed] pairs.

Per (batch, head) with ``G = B H`` flattened, the output is ONE softmax over the logits
``[c q.R_j (m shared) ; s q.K_i (k per routed slot, r slots)]``:

* shared values ``V~ = softmax(s R K^T) V`` come from ``F.scaled_dot_product_attention`` (m queries, so
  cheap), outside the Function, and autograd carries their gradient back to R, K and V;
* ``routed.py``'s forward kernel runs, for each (query, slot) entry grouped by expert, one online softmax
  over the shared keys (slot 0 only, so they count once per query) and the expert's top-k keys;
  with ``r = 1`` that is the output, with ``r = 2`` the two entries are merged by log-sum-exp;
* the backward recomputes probabilities from the saved per-token ``lse`` (FlashAttention's scheme,
  ``delta = rowsum(dO * O)``): one kernel for dq, one for the routed dk/dv per expert (partial sums per
  (expert, slot)) and a key-major one that sums those per key through an inverse index (no atomics), one
  for the landmark-side gradients dR and dV~.

No ``N x m`` tensor reaches memory. Maths in kernels/README.md.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import shared as shared_split  # the shared values split over the keys
from .layout import expert_tiles, key_pairs
from .routed import dkdv_plan, merge_slots, routed_backward, routed_forward, shared_backward, sum_chunks
from .small_ops import _unit_last_stride  # the kernels take any batch, head and row strides, a unit last one

# Backends for the shared values, in order of preference (flash takes fp16/bf16, the rest any dtype).
_SHARED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH]

# Tests switch this on so that a buffer element the kernels fail to write shows up as NaN.
_POISON = False


def _expert_tiles(expert: torch.Tensor, m: int, N: int, r: int) -> dict:
    """The tile layout of a routing: three Triton launches (layout_kernels.py) with
    ``mita.kernels.LAYOUT_KERNELS`` on, else ``layout.expert_tiles``'s PyTorch ops; the same dict either way."""
    from . import LAYOUT_KERNELS

    if LAYOUT_KERNELS:
        from .layout_kernels import expert_tiles_triton

        return expert_tiles_triton(expert, m, N, r)
    return expert_tiles(expert.long(), m, N, r)


def _key_pairs(topk_idx: torch.Tensor, N: int):
    """The inverse index of the key lists: its CSR pointers from one Triton launch with
    ``mita.kernels.LAYOUT_KERNELS`` on, else ``layout.key_pairs``'s PyTorch ops; the same tensors either way."""
    from . import LAYOUT_KERNELS

    if LAYOUT_KERNELS:
        from .layout_kernels import key_pairs_triton

        return key_pairs_triton(topk_idx, N)
    return key_pairs(topk_idx, N)


def _buffer(shape, device, dtype=torch.float32) -> torch.Tensor:
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# The layout entries the routed kernels read (the rest of the dict is the PyTorch path's).
_LAYOUT_KEYS = ("slot_token", "slot_source", "tile_expert", "tile_count", "expert_start", "expert_count")


def _forward(q, k, v, landmarks, shared_v, topk_idx, expert_idx, scale_shared, allow_tf32):
    """Launch the forward kernels: ``out [B, H, N, d]`` (dtype of q), the per-token ``lse [B H, N]`` and the
    routing's tile layout (for the backward to reuse). ``out``
    is token-major (``[B, N, H, d]`` memory), as SDPA's fused kernels return theirs: the module's
    ``out.transpose(1, 2).reshape(B, N, C)`` is then a view, so the output projection saves the very tensor
    this op saves for its backward instead of a second copy (one ``[B, N, C]`` activation a layer)."""
    B, H, N, d = q.shape
    m, topk = landmarks.shape[2], topk_idx.shape[-1]
    shared = shared_v is not None
    if topk == 0:  # the shared expert alone: one entry per query
        expert_idx = expert_idx[..., :1]
    r = expert_idx.shape[-1]
    G = B * H
    # the kernels read q, k, v by their strides (a ViT's qkv views in place), so nothing is copied here
    qf, kf, vf = (_unit_last_stride(t) for t in (q, k, v))  # [B, H, N, d]
    rf = landmarks.reshape(G, m, d).contiguous() if shared else None  # [G, m, d]
    vsf = shared_v.reshape(G, m, d).contiguous() if shared else None  # [G, m, d]
    idx = topk_idx.reshape(G, m, topk).long().contiguous()  # [G, m, topk]
    lay = _expert_tiles(expert_idx.reshape(G, N * r), m, N, r)
    scale = d ** -0.5
    if r == 1:
        # entries are the tokens: written in place, token-major ([B, N, H, d] memory) as SDPA returns it
        out = _buffer((B, N, H, d), q.device, q.dtype).transpose(1, 2)  # [B, H, N, d]
        lse = _buffer((G, N), q.device)
        routed_forward(qf, kf, vf, rf, vsf, idx, lay, r, scale, scale_shared, out, lse, allow_tf32)
        return out, lse, lay
    o_r = _buffer((B, H, N * r, d), q.device)  # normalised per entry
    lse_r = _buffer((G, N * r), q.device)
    routed_forward(qf, kf, vf, rf, vsf, idx, lay, r, scale, scale_shared, o_r, lse_r, allow_tf32)
    # each slot's share of the softmax mass exp(lse_j - lse): one launch writes the token-major output
    out = _buffer((B, N, H, d), q.device, q.dtype).transpose(1, 2)  # [B, H, N, d]
    return out, merge_slots(o_r, lse_r, out, r), lay


def _backward(grad_out, q, k, v, landmarks, shared_v, topk_idx, expert_idx, out, lse, scale_shared, allow_tf32,
              lay=None, dr_partials=False, fuse_keys=False):
    """Launch the backward kernels: ``dq, dk, dv`` (None for dk, dv when topk = 0), ``dR, dV~``
    (None without the shared expert), in the dtype of q, and ``key_pairs``. ``lay``: the forward's tile layout,
    else rebuilt. ``dr_partials``: dR as the kernel's float32 partial sums ``[G, C, m, d]`` (for the shared
    values' backward to add its own dR to in one launch). ``fuse_keys``: where the routed dk/dv partials take one
    pass (:func:`routed.dkdv_plan`), leave them unsummed and dk, dv unwritten, and return ``key_pairs = (dKp, dVp,
    pair_order, key_ptr)`` for the shared values' key pass to sum (``shared.backward``); else ``key_pairs`` is
    None and dk, dv are written."""
    B, H, N, d = q.shape
    m, topk = landmarks.shape[2], topk_idx.shape[-1]
    shared = shared_v is not None
    if topk == 0:
        expert_idx = expert_idx[..., :1]
    r = expert_idx.shape[-1]
    G = B * H
    scale = d ** -0.5
    qf, kf, vf = (_unit_last_stride(t) for t in (q, k, v))  # [B, H, N, d], read by their strides
    rf = landmarks.reshape(G, m, d).contiguous() if shared else None
    vsf = shared_v.reshape(G, m, d).contiguous() if shared else None
    idx = topk_idx.reshape(G, m, topk).long().contiguous()
    if lay is None:  # the custom op keeps no layout between passes: three small launches rebuild it
        lay = _expert_tiles(expert_idx.reshape(G, N * r), m, N, r)
    do = _unit_last_stride(grad_out.to(q.dtype))  # [B, H, N, d], any strides
    # delta = rowsum(dO * O) [G, N] fp32: filled by routed_backward, in its dq kernel where each token is one entry
    delta = _buffer((G, N), q.device)

    # one entry per token (r = 1): the kernel writes dq in q's dtype, no cast after
    dq_e = _buffer((G, N * r, d), q.device, q.dtype if r == 1 else torch.float32)  # [G, N r, d]
    dk = dv = pairs = key_pairs = None
    partials = ()
    reduce_keys = True
    if topk > 0:
        # routed dk, dv without atomics: per-(expert, slot) partials [G, chunk, topk, d] (all experts or chunks
        # of them), summed per key through the inverse index (which (expert, slot) pairs hold each key);
        # written in q's dtype, every element
        dk, dv = _buffer((G, N, d), q.device, q.dtype), _buffer((G, N, d), q.device, q.dtype)
        from . import DKDV_TWO_BUFFERS, ROUTED_RESIDENT

        # the inverse index first: its sort's scratch is freed before the partials are made
        pairs = _key_pairs(idx, N)
        part_dtype, buffers, chunk = dkdv_plan(q.dtype, N, m, topk, one_pass=ROUTED_RESIDENT,
                                               two_buffers=DKDV_TWO_BUFFERS)
        partials = tuple(_buffer((G, chunk, topk, d), q.device, part_dtype) for _ in range(buffers))
        if fuse_keys and buffers == 2 and chunk == m:
            reduce_keys = False
            key_pairs = (*partials, *pairs)
    routed_backward(qf, kf, vf, rf, vsf, do, lse, delta, idx, lay, r, scale, scale_shared,
                    dq_e, dk, dv, pairs, partials, allow_tf32, reduce_keys, out=_unit_last_stride(out))
    # summed into dk, dv (unless key_pairs hands them on): freed before the landmark side's partials are made
    del partials, pairs
    dq = dq_e.view(G, N, r, d).sum(2) if r > 1 else dq_e
    dr = dvs = None
    if topk > 0:
        dk, dv = dk.view(B, H, N, d), dv.view(B, H, N, d)
    if shared:
        dr_p, dvs_p = shared_backward(qf, rf, vsf, do, lse, delta, scale_shared, allow_tf32)
        dvs = sum_chunks(dvs_p, q.dtype).view(B, H, m, d)
        dr = dr_p if dr_partials else sum_chunks(dr_p, q.dtype).view(B, H, m, d)
    return dq.view(B, H, N, d).to(q.dtype), dk, dv, dr, dvs, key_pairs


# The kernels run behind torch custom ops, so torch.compile treats them as single opaque ops (no graph
# breaks) and CUDA graphs can capture them: nothing in them syncs with the host.
@torch.library.custom_op("mita::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmarks: torch.Tensor, shared_v: Optional[torch.Tensor],
    topk_idx: torch.Tensor, expert_idx: torch.Tensor, scale_shared: float, allow_tf32: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, landmarks, shared_v, topk_idx, expert_idx, scale_shared, allow_tf32)[:2]


@attention_fwd.register_fake
def _(q, k, v, landmarks, shared_v, topk_idx, expert_idx, scale_shared, allow_tf32):
    B, H, N, d = q.shape
    return q.new_empty(B, N, H, d).transpose(1, 2), q.new_empty(B * H, N, dtype=torch.float32)


@torch.library.custom_op("mita::attention_bwd", mutates_args=())
def attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmarks: torch.Tensor,
    shared_v: Optional[torch.Tensor], topk_idx: torch.Tensor, expert_idx: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, scale_shared: float, allow_tf32: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _backward(grad_out, q, k, v, landmarks, shared_v, topk_idx, expert_idx, out, lse, scale_shared,
                      allow_tf32)[:5]
    # a custom op returns tensors only: an empty tensor stands for "no gradient"
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@attention_bwd.register_fake
def _(grad_out, q, k, v, landmarks, shared_v, topk_idx, expert_idx, out, lse, scale_shared, allow_tf32):
    topk, shared = topk_idx.shape[-1], shared_v is not None
    # contiguous, as the kernels write them, whatever the inputs' strides: empty_like would copy the strides of
    # q, k, v, which in a ViT are views of one qkv projection, and inductor checks them against the real op's;
    # and one new empty tensor per missing gradient, as the real op returns (outputs must not alias each other)
    shapes = (q.shape, k.shape if topk else (0,), v.shape if topk else (0,), landmarks.shape if shared else (0,),
              landmarks.shape if shared else (0,))
    return tuple(q.new_empty(shape) for shape in shapes)


def _setup_context(ctx, inputs, output):
    q, k, v, landmarks, shared_v, topk_idx, expert_idx, scale_shared, allow_tf32 = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, landmarks, shared_v, topk_idx, expert_idx, out, lse)
    ctx.scale_shared, ctx.allow_tf32 = scale_shared, allow_tf32
    # lse is an output for the backward's sake only: no [B H, N] zero gradient is made for it (a fill launch)
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, landmarks, shared_v, topk_idx, expert_idx, out, lse = ctx.saved_tensors
    grads = attention_bwd(grad_out, q, k, v, landmarks, shared_v, topk_idx, expert_idx, out, lse,
                          ctx.scale_shared, ctx.allow_tf32)
    dq, dk, dv, dr, dvs = (None if g.numel() == 0 and g.dim() == 1 else g for g in grads)
    return dq, dk, dv, dr, (dvs if shared_v is not None else None), None, None, None, None


torch.library.register_autograd("mita::attention_fwd", _attention_backward, setup_context=_setup_context)


def _save_layout(lay: dict) -> tuple:
    return tuple(lay[key] for key in _LAYOUT_KEYS)


def _saved_layout(tensors, meta) -> dict:
    return {**dict(zip(_LAYOUT_KEYS, tensors)), "tile": meta[0], "num_tiles": meta[1]}


class _Attention(torch.autograd.Function):
    """The custom ops' forward and backward without their dispatch, for eager mode (``torch.compile`` traces
    the custom ops): the backward reuses the forward's tile layout instead of rebuilding it. With
    ``split_shared`` the shared values are made here too (kernels/shared.py), and their backward adds its
    dK, dV into the routed ones in the kernel (no separate gradients for autograd to sum)."""

    @staticmethod
    def forward(ctx, q, k, v, landmarks, shared_v, topk_idx, expert_idx, scale_shared, allow_tf32, split_shared):
        lse_sh = None
        if split_shared:
            shared_v, lse_sh = shared_split.forward(*(shared_split._unit_last(t) for t in (landmarks, k, v)),
                                                    q.shape[-1] ** -0.5, allow_tf32)
        out, lse, lay = _forward(q, k, v, landmarks, shared_v, topk_idx, expert_idx, scale_shared, allow_tf32)
        ctx.save_for_backward(q, k, v, landmarks, shared_v, lse_sh, topk_idx, expert_idx, out, lse, *_save_layout(lay))
        ctx.meta = (lay["tile"], lay["num_tiles"], scale_shared, allow_tf32, split_shared)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, landmarks, shared_v, lse_sh, topk_idx, expert_idx, out, lse, *layout = ctx.saved_tensors
        scale_shared, allow_tf32, split_shared = ctx.meta[2:]
        from . import FUSE_KEYS

        fuse = False
        if split_shared:
            lm, kk, vv = (shared_split._unit_last(t) for t in (landmarks, k, v))
            fuse = FUSE_KEYS and shared_split.fuses_key_pairs(lm, kk)
        dq, dk, dv, dr, dvs, key_pairs = _backward(
            grad_out, q, k, v, landmarks, shared_v, topk_idx, expert_idx, out, lse, scale_shared, allow_tf32,
            lay=_saved_layout(layout, ctx.meta), dr_partials=split_shared, fuse_keys=fuse)
        if split_shared:
            # V~'s backward: dR (with the shared logits' partials added in the same launch), and dK, dV added
            # into the routed ones (or written, with no routed keys; or with the routed partials summed per key
            # in the same launch: key_pairs)
            dr, dk, dv = shared_split.backward(lm, kk, vv, shared_v, lse_sh, dvs, q.shape[-1] ** -0.5, allow_tf32,
                                               into=(dk, dv), dr_add=dr, key_pairs=key_pairs)
            return dq, dk, dv, dr, None, None, None, None, None, None
        return dq, dk, dv, dr, dvs, None, None, None, None, None


def mita_attention(q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared, allow_tf32=False):
    """MiTA for a given routing; inputs checked by ``mita.kernels.mita_attention``. Eager calls go through
    :class:`_Attention`, ``torch.compile`` traces the custom ops."""
    from . import EAGER_FUNCTIONS, SHARED_SPLIT_MIN_N

    # the keys split over programs (kernels/shared.py): every SM busy however few heads; fp16/bf16 only
    # (timed there; fp32 keeps SDPA's IEEE backward, more exact than TF32 dots for dR)
    split = shared and SHARED_SPLIT_MIN_N is not None and k.shape[2] >= SHARED_SPLIT_MIN_N and k.element_size() == 2
    eager = EAGER_FUNCTIONS and not torch.compiler.is_compiling()
    if eager and split:
        return _Attention.apply(q, k, v, landmarks, None, topk_idx, expert_idx, float(scale_shared),
                                bool(allow_tf32), True)[0]
    shared_v = None
    if shared:
        # [B, H, m, d]; m queries over N keys: an SDPA call whose backward autograd handles. FlashAttention
        # first: with so few queries cuDNN's kernel, PyTorch's default on Hopper, runs 5-8x slower
        # (H100, bf16, m = 512: 1.05 against 8.8 ms at N = 2^20), and at N = 2^20 the default choice even
        # fell back to the math backend, which forms the m x N matrix in fp32
        # (the fused backends need unit stride along d; pooled landmarks often lack it, and they are small)
        if split:
            shared_v = shared_split.shared_values(landmarks, k, v, q.shape[-1] ** -0.5, allow_tf32)
        else:
            with sdpa_kernel(_SHARED_BACKENDS, set_priority=True):
                shared_v = F.scaled_dot_product_attention(landmarks.contiguous(), k, v, scale=q.shape[-1] ** -0.5)
    if eager:
        return _Attention.apply(q, k, v, landmarks, shared_v, topk_idx, expert_idx, float(scale_shared),
                                bool(allow_tf32), False)[0]
    out, _ = attention_fwd(q, k, v, landmarks, shared_v, topk_idx, expert_idx, float(scale_shared), bool(allow_tf32))
    return out
