"""Plain-PyTorch MiTA for benchmarks and checks: no custom kernels, no tiling of our own.

* :func:`plain_mita_attention` is the "plain-PyTorch MiTA" baseline of issue 3: queries sorted by
  expert, each expert's queries padded to the largest expert group, then ONE
  ``F.scaled_dot_product_attention`` call over ``[experts, max_count, d]`` queries against each
  expert's ``[m shared keys ; k routed keys]``. It needs a host sync (``.item()``) for the largest
  group, which is fine for a baseline but not for CUDA graphs.
* :func:`chunked_reference_attention` is an exact per-query formulation that gathers each query's
  routed keys, in chunks of queries with activation checkpointing, so float64 references stay
  affordable where the dense N x N ``impl="reference"`` does not fit (N = 65,536).

Both compute the same function as :func:`mita.functional.mita_attention` (maths in its docstring).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mita.functional import Routing, _check_inputs, _check_routing, _shared_scale, mita_routing

__all__ = ["plain_mita_attention", "chunked_reference_attention"]


def _routing(q, k, landmarks, topk, router_topk, routing) -> Routing:
    if routing is None:
        return mita_routing(q, k, landmarks, topk, router_topk)
    return _check_routing(routing, q, landmarks, topk, router_topk)


def plain_mita_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    topk: int,
    *,
    router_topk: int = 1,
    shared: bool = True,
    shared_scale: str = "official",
    routing: Optional[Routing] = None,
) -> torch.Tensor:
    """MiTA as a user would write it in plain PyTorch: sort, pad, one SDPA call per routing slot.

    Same arguments and result as :func:`mita.functional.mita_attention` (without ``impl`` and
    ``return_routing``). The shared expert is folded into every expert's key set: SDPA scales every
    logit by ``s = d^-1/2``, so the shared keys are ``R * (c / s)`` and give the shared logits ``c q.R``.

    With ``router_topk = r > 1`` slot j runs its own padded SDPA pass (the shared keys only in the first)
    and the passes are merged by their log-sum-exps, which SDPA does not return: they are recomputed
    from explicit padded logits, which costs one more matmul per pass. The benchmark cases use r = 1.

    Returns:
        ``out [B, H, N, d]``.
    """
    _check_inputs(q, k, v, landmarks, topk, router_topk, shared, shared_scale, "torch")
    topk_idx, expert_idx = _routing(q, k, landmarks, topk, router_topk, routing)
    B, H, N, d = q.shape
    m, r = landmarks.shape[2], router_topk
    G = B * H
    s = d ** -0.5
    qf = q.reshape(G, N, d)
    kf, vf = k.reshape(G, N, d), v.reshape(G, N, d)
    rf = landmarks.reshape(G, m, d)

    if shared:
        shared_keys = rf * (_shared_scale(d, shared_scale) / s)  # [G, m, d]
        shared_values = F.scaled_dot_product_attention(rf, kf, vf, scale=s)  # [G, m, d]
    if topk == 0:
        # Only the shared expert: every query sees the same m keys, no sorting needed.
        return F.scaled_dot_product_attention(qf, shared_keys, shared_values, scale=s).view(B, H, N, d)

    key_rows = topk_idx.reshape(G, m * topk, 1).expand(-1, -1, d)
    routed_k = kf.gather(1, key_rows).view(G, m, topk, d)  # [G, m, topk, d]
    routed_v = vf.gather(1, key_rows).view(G, m, topk, d)
    expert = expert_idx.reshape(G, N, r)
    counts = torch.zeros(G, r, m, dtype=torch.long, device=q.device)
    counts.scatter_add_(2, expert.transpose(1, 2), torch.ones_like(expert.transpose(1, 2)))  # [G, r, m]
    # The padded shape depends on the data: this is the host sync that the real kernels avoid.
    cap = int(counts.max().item())
    positions = torch.arange(N, device=q.device).expand(G, N)
    # lse of half-precision passes in float32, as SDPA accumulates them internally
    lse_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype

    outs, lses = [], []
    for j in range(r):
        e = expert[..., j]  # [G, N]
        order = torch.argsort(e, dim=1, stable=True)  # [G, N] tokens sorted by expert
        sorted_e = e.gather(1, order)
        starts = counts[:, j].cumsum(1) - counts[:, j]  # [G, m] first sorted position of each expert
        rank = positions - starts.gather(1, sorted_e)  # rank of each sorted token within its expert
        slot = torch.empty_like(order).scatter_(1, order, sorted_e * cap + rank)  # [G, N] padded row of each token
        slot_rows = slot[..., None].expand(-1, -1, d)
        q_pad = qf.new_zeros(G, m * cap, d).scatter(1, slot_rows, qf).view(G, m, cap, d)  # [G, m, cap, d]
        if shared and j == 0:
            keys = torch.cat([shared_keys[:, None].expand(-1, m, -1, -1), routed_k], dim=2)  # [G, m, m + topk, d]
            values = torch.cat([shared_values[:, None].expand(-1, m, -1, -1), routed_v], dim=2)
        else:
            keys, values = routed_k, routed_v
        o_pad = F.scaled_dot_product_attention(q_pad, keys, values, scale=s)  # [G, m, cap, d]
        outs.append(o_pad.reshape(G, m * cap, d).gather(1, slot_rows))  # [G, N, d]
        if r > 1:
            logits = (q_pad @ keys.transpose(-1, -2)).to(lse_dtype) * s  # [G, m, cap, L]
            lses.append(torch.logsumexp(logits, dim=-1).reshape(G, m * cap).gather(1, slot))  # [G, N]

    if r == 1:
        return outs[0].view(B, H, N, d)
    weight = torch.softmax(torch.stack(lses, dim=-1), dim=-1).to(q.dtype)  # [G, N, r] share of each pass
    out = (torch.stack(outs, dim=-2) * weight[..., None]).sum(-2)  # [G, N, d]
    return out.view(B, H, N, d)


def chunked_reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    topk: int,
    *,
    router_topk: int = 1,
    shared: bool = True,
    shared_scale: str = "official",
    routing: Optional[Routing] = None,
    max_elements: int = 1 << 24,
) -> torch.Tensor:
    """Exact MiTA by gathering each query's ``r * topk`` routed keys, a chunk of queries at a time.

    Same arguments and result as :func:`mita.functional.mita_attention`; meant for float64 checks at
    sizes where the dense reference (N x N) does not fit. Each chunk's gathered keys and values hold at
    most about ``max_elements`` elements, and each chunk is recomputed in the backward
    (``torch.utils.checkpoint``), so memory stays O(N d + max_elements) through forward and backward.
    """
    _check_inputs(q, k, v, landmarks, topk, router_topk, shared, shared_scale, "reference")
    topk_idx, expert_idx = _routing(q, k, landmarks, topk, router_topk, routing)
    B, H, N, d = q.shape
    m, r = landmarks.shape[2], router_topk
    G = B * H
    s = d ** -0.5
    qf = q.reshape(G, N, d)
    kf, vf = k.reshape(G, N, d), v.reshape(G, N, d)
    rf = landmarks.reshape(G, m, d)
    shared_values = F.scaled_dot_product_attention(rf, kf, vf, scale=s) if shared else None  # [G, m, d]
    scale_shared = _shared_scale(d, shared_scale)
    # keys of every expert each query is routed to: [G, N, r * topk]
    selected = topk_idx.reshape(G, m, topk).gather(1, expert_idx.reshape(G, N * r, 1).expand(-1, -1, topk))
    selected = selected.reshape(G, N, r * topk)

    def chunk_out(qc, kf, vf, rf, shared_values, sel):
        n = qc.shape[1]
        logits, values = [], []
        if shared:
            logits.append((qc @ rf.transpose(-1, -2)) * scale_shared)  # [G, n, m]
        if topk > 0:
            rows = sel.reshape(G, n * r * topk, 1).expand(-1, -1, d)
            k_sel = kf.gather(1, rows).view(G, n, r * topk, d)  # [G, n, r topk, d]
            logits.append((k_sel @ qc[..., None]).squeeze(-1) * s)  # [G, n, r topk]
        p = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
        out = p[..., :m] @ shared_values if shared else 0
        if topk > 0:
            v_sel = vf.gather(1, rows).view(G, n, r * topk, d)
            out = out + (p[..., m * int(shared):, None] * v_sel).sum(-2)  # [G, n, d]
        return out

    chunk = max(1, max_elements // max(1, G * r * topk * d))
    outs = []
    for start in range(0, N, chunk):
        part = slice(start, min(N, start + chunk))
        args = (qf[:, part], kf, vf, rf, shared_values, selected[:, part])
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, landmarks)):
            outs.append(checkpoint(chunk_out, *args, use_reentrant=False))
        else:
            outs.append(chunk_out(*args))
    return torch.cat(outs, dim=1).view(B, H, N, d)
