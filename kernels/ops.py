"""MiTA attention core with Triton routed experts: an autograd.Function over [shared ; routed] pairs.

Per (batch, head) with ``G = B H`` flattened, the output is ONE softmax over the logits
``[c q.R_j (m shared) ; s q.K_i (k per routed slot, r slots)]``. It is assembled from parts that each
carry a normalised output and a log-sum-exp:

* shared expert (PyTorch, float32): ``o_sh = softmax(c q R^T) V~``, ``lse_sh``, with
  ``V~ = softmax(s R K^T) V``;
* routed slot j of query n (Triton, ``routed.py``): ``o_nj = softmax(s q_n K_e^T) V_e``, ``lse_nj``;
* merge: ``lse = logsumexp(lse_sh, lse_n1..lse_nr)``, ``out = sum_parts exp(lse_part - lse) o_part``.

The backward recomputes the probabilities from the saved per-token ``lse`` (FlashAttention's scheme,
``delta = rowsum(dO * O)``). Maths in kernels/README.md.
"""
from __future__ import annotations

import torch

from ..functional import _expert_tiles
from .routed import routed_backward, routed_forward

# Tests switch this on so that a buffer element the kernels fail to write shows up as NaN.
_POISON = False


def _buffer(shape, device) -> torch.Tensor:
    if _POISON:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _shared_parts(q32, k32, v32, r32, scale_shared, scale):
    """Float32 shared-expert tensors: logits ``[G, N, m]``, landmark attention ``[G, m, N]``, values ``[G, m, d]``."""
    logits = (q32 @ r32.transpose(-1, -2)) * scale_shared  # [G, N, m]
    attn = torch.softmax((r32 @ k32.transpose(-1, -2)) * scale, dim=-1)  # [G, m, N]
    values = attn @ v32  # [G, m, d]
    return logits, attn, values


class MiTAFunction(torch.autograd.Function):
    """``out [B, H, N, d]`` of MiTA for a given routing; differentiable in q, k, v and landmarks."""

    @staticmethod
    def forward(ctx, q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared, allow_tf32):
        B, H, N, d = q.shape
        m, topk, r = landmarks.shape[2], topk_idx.shape[-1], expert_idx.shape[-1]
        G = B * H
        scale = d ** -0.5
        # reshape copies non-contiguous inputs; the kernels index rows as g * N + n
        qf, kf, vf = (t.reshape(G, N, d).contiguous() for t in (q, k, v))  # [G, N, d]
        rf = landmarks.reshape(G, m, d).contiguous()  # [G, m, d]
        idx = topk_idx.reshape(G, m, topk).long().contiguous()  # [G, m, topk]

        part_lse, part_out = [], []
        if shared:
            logits, _, values = _shared_parts(qf.float(), kf.float(), vf.float(), rf.float(), scale_shared, scale)
            part_lse.append(torch.logsumexp(logits, dim=-1)[..., None])  # [G, N, 1]
            part_out.append((torch.softmax(logits, dim=-1) @ values)[:, :, None])  # [G, N, 1, d]
        lay = None
        if topk > 0:
            lay = _expert_tiles(expert_idx.reshape(G, N * r).long(), m, N, r)
            o_r = _buffer((G, N * r, d), q.device)  # [G, N r, d], normalised per entry
            lse_r = _buffer((G, N * r), q.device)  # [G, N r]
            routed_forward(qf, kf, vf, idx, lay, scale, o_r, lse_r, allow_tf32)
            part_lse.append(lse_r.view(G, N, r))
            part_out.append(o_r.view(G, N, r, d))

        part_lse = torch.cat(part_lse, dim=-1)  # [G, N, P]
        lse = torch.logsumexp(part_lse, dim=-1)  # [G, N]
        weight = torch.exp(part_lse - lse[..., None])  # [G, N, P], each part's share of the softmax mass
        out = (weight[..., None] * torch.cat(part_out, dim=2)).sum(2).to(q.dtype)  # [G, N, d]

        layout = () if lay is None else (lay["slot_token"], lay["slot_source"], lay["tile_expert"])
        ctx.save_for_backward(qf, kf, vf, rf, idx, out, lse, *layout)
        ctx.meta = (B, H, N, d, m, topk, r, shared, scale_shared, allow_tf32)
        ctx.tiles = None if lay is None else (lay["tile"], lay["num_tiles"])
        return out.view(B, H, N, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        qf, kf, vf, rf, idx, out, lse, *layout = ctx.saved_tensors
        B, H, N, d, m, topk, r, shared, scale_shared, allow_tf32 = ctx.meta
        G = B * H
        scale = d ** -0.5
        do = grad_out.reshape(G, N, d).to(qf.dtype).contiguous()  # [G, N, d]
        do32 = do.float()
        delta = (do32 * out.float()).sum(-1)  # [G, N]

        dq = torch.zeros(G, N, d, dtype=torch.float32, device=qf.device)
        dk = torch.zeros_like(dq)
        dv = torch.zeros_like(dq)
        dr = None
        if shared:
            q32, k32, v32, r32 = qf.float(), kf.float(), vf.float(), rf.float()
            logits, attn, values = _shared_parts(q32, k32, v32, r32, scale_shared, scale)
            p = torch.exp(logits - lse[..., None])  # [G, N, m], shared columns of the one softmax
            ds = p * (do32 @ values.transpose(-1, -2) - delta[..., None]) * scale_shared  # [G, N, m]
            dq += ds @ r32
            dr = ds.transpose(-1, -2) @ q32  # [G, m, d]
            dvalues = p.transpose(-1, -2) @ do32  # [G, m, d]
            dv += attn.transpose(-1, -2) @ dvalues
            dattn = dvalues @ v32.transpose(-1, -2)  # [G, m, N]
            dl = attn * (dattn - (dvalues * values).sum(-1, keepdim=True)) * scale  # [G, m, N]
            dr += dl @ k32
            dk += dl.transpose(-1, -2) @ r32
            dr = dr.view(B, H, m, d).to(rf.dtype)
        if topk > 0:
            slot_token, slot_source, tile_expert = layout
            tile, num_tiles = ctx.tiles
            lay = {"tile": tile, "num_tiles": num_tiles, "slot_token": slot_token,
                   "slot_source": slot_source, "tile_expert": tile_expert}
            dq_e = _buffer((G, N * r, d), qf.device)  # [G, N r, d]
            dk_t = _buffer((G, num_tiles, topk, d), qf.device)  # [G, S, topk, d]
            dv_t = _buffer((G, num_tiles, topk, d), qf.device)
            routed_backward(qf, kf, vf, do, lse.contiguous(), delta.contiguous(), idx, lay, scale,
                            dq_e, dk_t, dv_t, allow_tf32)
            dq += dq_e.view(G, N, r, d).sum(2)
            # key of each (tile, position): the tile's expert's top-k list; a key shared by tiles adds up
            keys = idx.gather(1, tile_expert[..., None].expand(-1, -1, topk))  # [G, S, topk]
            keys = keys.reshape(G, num_tiles * topk, 1).expand(-1, -1, d)
            dk.scatter_add_(1, keys, dk_t.view(G, num_tiles * topk, d))
            dv.scatter_add_(1, keys, dv_t.view(G, num_tiles * topk, d))

        grads = [t.view(B, H, N, d).to(qf.dtype) for t in (dq, dk, dv)]
        return (*grads, dr, None, None, None, None, None)


def mita_attention(q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared, allow_tf32=False):
    """Apply :class:`MiTAFunction`; inputs checked by ``mita.kernels.mita_attention``."""
    return MiTAFunction.apply(q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared, allow_tf32)
