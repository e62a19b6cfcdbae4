"""Measures of MiTA's routing decisions, on the tensors of the op's ``return_routing`` (pure functions).

``topk_idx`` [B, H, m, k] holds the token indices of each routed expert's keys (prefix tokens included);
``expert_idx`` [B, H, N, r] the experts each query is routed to. Sets are handled as boolean masks over
the N token positions.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "expert_iou",
    "key_masks",
    "landmark_windows",
    "outside_window_fraction",
    "query_masks",
    "token_selection",
]


def key_masks(topk_idx: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[B, H, m, k] key indices -> [B, H, m, N] bool: position t is one of expert j's keys."""
    B, H, m, _ = topk_idx.shape
    mask = torch.zeros(B, H, m, n_tokens, dtype=torch.bool, device=topk_idx.device)
    return mask.scatter_(-1, topk_idx.long(), True)


def query_masks(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[B, H, N, r] expert choices -> [B, H, m, N] bool: query t is routed to expert j (by any of its r slots)."""
    B, H, N, _ = expert_idx.shape
    mask = torch.zeros(B, H, N, num_experts, dtype=torch.bool, device=expert_idx.device)
    return mask.scatter_(-1, expert_idx.long(), True).transpose(-1, -2)


def token_selection(topk_idx: torch.Tensor, expert_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Which key/value positions the routed experts keep, as masks [B, N] (union over heads and experts).

    Returns ``(selected, used)``: ``selected[b, t]`` when some expert of some head has t among its top-k
    keys; ``used[b, t]`` when that expert also receives at least one query, i.e. t is attended through a
    routed expert at all. Every token still reaches every query through the shared expert's pooled values.
    """
    N, m = expert_idx.shape[2], topk_idx.shape[2]
    keys = key_masks(topk_idx, N)  # [B, H, m, N]
    busy = query_masks(expert_idx, m).any(-1)  # [B, H, m]
    selected = keys.any(dim=2).any(dim=1)  # [B, N]
    used = (keys & busy.unsqueeze(-1)).any(dim=2).any(dim=1)  # [B, N]
    return selected, used


def expert_iou(topk_idx: torch.Tensor, expert_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IoU between the positions an expert gathers (its top-k keys) and the positions of the queries routed to it.

    Returns ``(iou, chance, valid)``, each [B, H, m]: ``chance`` is the IoU that two random sets of the same
    sizes among N positions have in expectation (intersection |A||B|/N); ``valid`` is False where both sets
    are empty (k = 0 and no query), where the IoU is undefined (set to 0 there).
    """
    N, m = expert_idx.shape[2], topk_idx.shape[2]
    keys = key_masks(topk_idx, N)  # [B, H, m, N]
    queries = query_masks(expert_idx, m)  # [B, H, m, N]
    inter = (keys & queries).sum(-1).double()  # [B, H, m]
    n_keys, n_queries = keys.sum(-1).double(), queries.sum(-1).double()
    union = n_keys + n_queries - inter
    valid = union > 0
    iou = torch.where(valid, inter / union.clamp_min(1), torch.zeros_like(inter))
    expected = n_keys * n_queries / N
    chance_union = n_keys + n_queries - expected
    chance = torch.where(valid, expected / chance_union.clamp_min(1e-12), torch.zeros_like(expected))
    return iou, chance, valid


def landmark_windows(pool: str, grid: Tuple[int, int], landmark_grid: Optional[Sequence[int]], prefix: int,
                     n_tokens: Optional[int] = None) -> Optional[torch.Tensor]:
    """The token positions each landmark averages, as [m, N] bool, or None for pools without windows.

    ``pool="grid"``: the ``AdaptiveAvgPool2d`` windows of the (p_h, p_w) landmark grid over the (h, w)
    patch grid (cell (i, j) covers rows floor(i h / p_h) .. ceil((i + 1) h / p_h) - 1, likewise columns);
    token ``prefix + r * w + c``. ``pool="official"``: the same windows over tokens 0..N-2 laid out as the
    raster grid (cls first, last patch dropped), so window cell (r, c) is token ``r * w + c``. The other
    pools (learned, random, 1-D, conv, ToMe) have no fixed window: None.
    """
    if pool not in ("grid", "official") or landmark_grid is None:
        return None
    h, w = grid
    ph, pw = (int(s) for s in landmark_grid)
    n_tokens = prefix + h * w if n_tokens is None else n_tokens
    offset = prefix if pool == "grid" else 0
    windows = torch.zeros(ph * pw, n_tokens, dtype=torch.bool)
    for i in range(ph):
        r0, r1 = (i * h) // ph, -((-(i + 1) * h) // ph)
        for j in range(pw):
            c0, c1 = (j * w) // pw, -((-(j + 1) * w) // pw)
            cells = torch.zeros(h, w, dtype=torch.bool)
            cells[r0:r1, c0:c1] = True
            windows[i * pw + j, offset:offset + h * w] = cells.flatten()
    return windows


def outside_window_fraction(topk_idx: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """[B, H, m] fraction of each expert's top-k keys outside its landmark's window (``windows`` [m, N]).

    Experts with k = 0 give 0."""
    k = topk_idx.shape[-1]
    if k == 0:
        return torch.zeros(topk_idx.shape[:3], dtype=torch.float64, device=topk_idx.device)
    windows = windows.to(topk_idx.device)
    B, H, m, _ = topk_idx.shape
    inside = windows.unsqueeze(0).unsqueeze(0).expand(B, H, m, -1).gather(-1, topk_idx.long())  # [B, H, m, k]
    return 1.0 - inside.double().mean(-1)
