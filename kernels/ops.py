"""MiTA attention core with Triton kernels: an autograd.Function over [shared ; routed] pairs.

Per (batch, head) with ``G = B H`` flattened, the output is ONE softmax over the logits
``[c q.R_j (m shared) ; s q.K_i (k per routed slot, r slots)]``:

* shared values ``V~ = softmax(s R K^T) V`` come from ``F.scaled_dot_product_attention`` (m queries, so
  cheap), outside the Function, and autograd carries their gradient back to R, K and V;
* ``routed.py``'s forward kernel runs, for each (query, slot) entry grouped by expert, one online softmax
  over the shared keys (slot 0 only, so they count once per query) and the expert's top-k keys;
  with ``r = 1`` that is the output, with ``r = 2`` the two entries are merged by log-sum-exp;
* the backward recomputes probabilities from the saved per-token ``lse`` (FlashAttention's scheme,
  ``delta = rowsum(dO * O)``): one kernel for dq, one for the routed dk/dv per tile (summed into keys
  without atomics), one for the landmark-side gradients dR and dV~.

No ``N x m`` tensor reaches memory. Maths in kernels/README.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..functional import _expert_tiles
from .routed import routed_backward, routed_forward, shared_backward

# Tests switch this on so that a buffer element the kernels fail to write shows up as NaN.
_POISON = False


def _buffer(shape, device, dtype=torch.float32) -> torch.Tensor:
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


class MiTAFunction(torch.autograd.Function):
    """``out [B, H, N, d]`` of MiTA for a given routing and shared values; differentiable in q, k, v,
    landmarks and shared values."""

    @staticmethod
    def forward(ctx, q, k, v, landmarks, shared_v, topk_idx, expert_idx, scale_shared, allow_tf32):
        B, H, N, d = q.shape
        m, topk = landmarks.shape[2], topk_idx.shape[-1]
        shared = shared_v is not None
        if topk == 0:  # the shared expert alone: one entry per query
            expert_idx = expert_idx[..., :1]
        r = expert_idx.shape[-1]
        G = B * H
        scale = d ** -0.5
        # reshape copies non-contiguous inputs; the kernels index rows as g * N + n
        qf, kf, vf = (t.reshape(G, N, d).contiguous() for t in (q, k, v))  # [G, N, d]
        rf = landmarks.reshape(G, m, d).contiguous()  # [G, m, d]
        vsf = shared_v.reshape(G, m, d).contiguous() if shared else None  # [G, m, d]
        idx = topk_idx.reshape(G, m, topk).long().contiguous()  # [G, m, topk]
        lay = _expert_tiles(expert_idx.reshape(G, N * r).long(), m, N, r)

        if r == 1:
            out = _buffer((G, N, d), q.device, q.dtype)  # entries are the tokens: written in place
            lse = _buffer((G, N), q.device)
            routed_forward(qf, kf, vf, rf if shared else None, vsf, idx, lay, r, scale, scale_shared,
                           out, lse, allow_tf32)
        else:
            o_r = _buffer((G, N * r, d), q.device)  # [G, N r, d], normalised per entry
            lse_r = _buffer((G, N * r), q.device)
            routed_forward(qf, kf, vf, rf if shared else None, vsf, idx, lay, r, scale, scale_shared,
                           o_r, lse_r, allow_tf32)
            lse_r = lse_r.view(G, N, r)
            lse = torch.logsumexp(lse_r, dim=-1)  # [G, N]
            weight = torch.exp(lse_r - lse[..., None])  # [G, N, r], each slot's share of the softmax mass
            out = (weight[..., None] * o_r.view(G, N, r, d)).sum(2).to(q.dtype)  # [G, N, d]

        ctx.save_for_backward(qf, kf, vf, rf, vsf, idx, out, lse,
                              lay["slot_token"], lay["slot_source"], lay["tile_expert"])
        ctx.meta = (B, H, N, d, m, topk, r, shared, scale_shared, allow_tf32, lay["tile"], lay["num_tiles"])
        return out.view(B, H, N, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        qf, kf, vf, rf, vsf, idx, out, lse, slot_token, slot_source, tile_expert = ctx.saved_tensors
        B, H, N, d, m, topk, r, shared, scale_shared, allow_tf32, tile, num_tiles = ctx.meta
        G = B * H
        scale = d ** -0.5
        lay = {"tile": tile, "num_tiles": num_tiles, "slot_token": slot_token,
               "slot_source": slot_source, "tile_expert": tile_expert}
        do = grad_out.reshape(G, N, d).to(qf.dtype).contiguous()  # [G, N, d]
        delta = (do.float() * out.float()).sum(-1)  # [G, N]

        dq_e = _buffer((G, N * r, d), qf.device)  # [G, N r, d]
        dk_t = _buffer((G, num_tiles, topk, d), qf.device)  # [G, S, topk, d]
        dv_t = _buffer((G, num_tiles, topk, d), qf.device)
        routed_backward(qf, kf, vf, rf if shared else None, vsf, do, lse, delta, idx, lay, r, scale,
                        scale_shared, dq_e, dk_t, dv_t, allow_tf32)
        dq = dq_e.view(G, N, r, d).sum(2) if r > 1 else dq_e
        dk = dv = dr = dvs = None
        if topk > 0:
            # key of each (tile, position): the tile's expert's top-k list; a key shared by tiles adds up
            keys = idx.gather(1, tile_expert[..., None].expand(-1, -1, topk))  # [G, S, topk]
            keys = keys.reshape(G, num_tiles * topk, 1).expand(-1, -1, d)
            dk = torch.zeros(G, N, d, dtype=torch.float32, device=qf.device)
            dv = torch.zeros_like(dk)
            dk.scatter_add_(1, keys, dk_t.view(G, num_tiles * topk, d))
            dv.scatter_add_(1, keys, dv_t.view(G, num_tiles * topk, d))
            dk, dv = (t.view(B, H, N, d).to(qf.dtype) for t in (dk, dv))
        if shared:
            dr, dvs = shared_backward(qf, rf, vsf, do, lse, delta, scale_shared, allow_tf32)
            dr, dvs = (t.view(B, H, m, d).to(qf.dtype) for t in (dr, dvs))
        return dq.view(B, H, N, d).to(qf.dtype), dk, dv, dr, dvs, None, None, None, None


def mita_attention(q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared, allow_tf32=False):
    """MiTA for a given routing; inputs checked by ``mita.kernels.mita_attention``."""
    shared_v = None
    if shared:
        # [B, H, m, d]; m queries over N keys: an SDPA call whose backward autograd handles
        shared_v = F.scaled_dot_product_attention(landmarks, k, v, scale=q.shape[-1] ** -0.5)
    return MiTAFunction.apply(q, k, v, landmarks, shared_v, topk_idx, expert_idx, scale_shared, allow_tf32)
