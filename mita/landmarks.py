"""Landmark extraction: the m vectors R [B, H, m, d] that route keys and queries in MiTA.

Every option is an ``nn.Module`` with ``forward(q, k, p, h, w) -> landmarks [B, H, m, d]`` where
``q, k`` are ``[B, H, N, d]``, ``p`` is the number of prefix tokens (cls, registers) and ``(h, w)`` the
patch grid, so ``N = p + h * w``. Build one with :func:`build_landmark_extractor`:

========== =====================================================================================
pool       landmarks
========== =====================================================================================
grid       2-D average pooling of the patch queries on their (h, w) grid to (p_h, p_w) windows
           (``AdaptiveAvgPool2d``); the default and the paper's definition
official   the official DeiT code's pooling: queries of tokens 0..N-2 (cls included, last patch
           dropped) on a sqrt(N-1) x sqrt(N-1) raster grid; one prefix token, square grids only
1d         1-D adaptive average pooling over the whole token sequence (prefix tokens included)
random     m patch queries drawn afresh each training forward, a fixed seeded draw in eval
learned    a parameter [H, m, d] shared by every input
conv       a strided Conv2d (kernel = stride = window) over the patch queries, then 2-D pooling
dwconv     the same with a depthwise Conv2d
tome       bipartite token merging (ToMe) on the keys until m clusters remain; landmarks are the
           mean queries of each cluster
========== =====================================================================================

Keyword options (any pool accepts them and ignores those it does not use):
``landmark_grid=(p_h, p_w)`` with ``p_h * p_w == m`` (default: a square grid, m a perfect square);
``seed`` for the eval draw of ``random`` (default 0); ``window_grid=(h, w)``, the patch grid that the
``conv``/``dwconv`` window is sized for, window = (max(1, h // p_h), max(1, w // p_w)) (default (14, 14),
the DeiT grid at 224 px and patch 16: a kernel size has to be fixed before the first input is seen).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mita.attention import pool_patch_queries

__all__ = ["POOLS", "LANDMARK_KWARGS", "build_landmark_extractor", "landmark_grid_shape"]

POOLS = ("grid", "official", "1d", "random", "learned", "conv", "dwconv", "tome")
#: keyword options understood by :func:`build_landmark_extractor` (modules forward these to it)
LANDMARK_KWARGS = ("landmark_grid", "seed", "window_grid")


def landmark_grid_shape(num_landmarks: int, landmark_grid: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """The (p_h, p_w) landmark grid: ``landmark_grid`` if given, else a square of side sqrt(m)."""
    if landmark_grid is not None:
        if len(landmark_grid) != 2:
            raise ValueError(f"landmark_grid must be a pair (p_h, p_w), got {landmark_grid!r}")
        ph, pw = (int(s) for s in landmark_grid)
        if ph <= 0 or pw <= 0 or ph * pw != num_landmarks:
            raise ValueError(
                f"landmark_grid={tuple(landmark_grid)} must hold two positive ints whose product is "
                f"num_landmarks={num_landmarks}"
            )
        return ph, pw
    side = math.isqrt(num_landmarks)
    if side * side != num_landmarks:
        raise ValueError(
            f"num_landmarks={num_landmarks} is not a perfect square; pass landmark_grid=(p_h, p_w) with "
            f"p_h * p_w == {num_landmarks}"
        )
    return side, side


class LandmarkExtractor(nn.Module):
    """Base class: holds m and validates the token layout against it.

    ``linear`` extractors (fixed averaging windows: grid, official, 1d) also give their ``[m, N]`` pooling
    weights (:meth:`pooling_weights`), so that the fused kernels can pool inside.
    """

    pool: str = ""
    linear: bool = False
    grid: Optional[Tuple[int, int]] = None  # the (p_h, p_w) landmark grid of the pools that have one

    def __init__(self, num_landmarks: int) -> None:
        super().__init__()
        self.num_landmarks = num_landmarks

    def pooling_weights(self, N: int, p: int, h: int, w: int, device) -> torch.Tensor:
        """``[m, N]`` fp32 weights W with ``forward(q) == W @ q`` (linear extractors only), cached per layout
        and device: the extractor applied to the identity."""
        if not self.linear:
            raise ValueError(f"pool={self.pool!r} has no fixed pooling weights")
        # plain values only: torch.compile (2.11) cannot pass a module to an assume_constant_result function
        grid = None if self.grid is None else tuple(self.grid)
        return _cached_pooling_weights(self.pool, self.num_landmarks, grid, N, p, h, w, str(device))

    def check_layout(self, q: torch.Tensor, p: int, h: int, w: int) -> None:
        n_patch = h * w
        if q.shape[2] != p + n_patch:
            raise ValueError(f"q has N={q.shape[2]} tokens, expected num_prefix_tokens + h*w = {p} + {h}*{w}")
        if self.num_landmarks > n_patch:
            raise ValueError(
                f"num_landmarks={self.num_landmarks} must be in [1, {n_patch}] (the number of patch tokens, "
                f"{h}x{w}) for pool={self.pool!r}"
            )

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}, num_landmarks={self.num_landmarks}"


class GridLandmarks(LandmarkExtractor):
    """2-D average pooling of the patch queries to a (p_h, p_w) grid of ``AdaptiveAvgPool2d`` windows."""

    pool = "grid"
    linear = True

    def __init__(self, num_landmarks: int, grid: Tuple[int, int]) -> None:
        super().__init__(num_landmarks)
        self.grid = grid

    def check_grid(self, h: int, w: int) -> None:
        ph, pw = self.grid
        # A landmark grid finer than the token grid would repeat tokens as several landmarks.
        if ph > h or pw > w:
            raise ValueError(
                f"landmark grid {ph}x{pw} must fit the {h}x{w} patch grid for pool={self.pool!r} "
                f"(p_h <= h and p_w <= w); lower num_landmarks or pass landmark_grid"
            )

    def forward(self, q, k, p: int, h: int, w: int) -> torch.Tensor:
        self.check_layout(q, p, h, w)
        self.check_grid(h, w)
        return pool_patch_queries(q, p, h, w, self.grid)  # [B, H, m, d]


class OfficialLandmarks(GridLandmarks):
    """The official DeiT code's pooling: tokens 0..N-2 (cls in, last patch out) on a square raster grid.

    Kept to load and reproduce the published checkpoints exactly; :class:`GridLandmarks` is the clean
    definition.
    """

    pool = "official"

    def forward(self, q, k, p: int, h: int, w: int) -> torch.Tensor:
        self.check_layout(q, p, h, w)
        if p != 1 or h != w:
            raise ValueError(
                f'pool="official" needs exactly one prefix token and a square patch grid, got '
                f'num_prefix_tokens={p} and a {h}x{w} grid; use pool="grid"'
            )
        self.check_grid(h, w)
        # The official code reshapes q[:, :-1] (cls first, last patch dropped) to the grid.
        return pool_patch_queries(q[:, :, :-1], 0, h, w, self.grid)  # [B, H, m, d]


class SequenceLandmarks(LandmarkExtractor):
    """1-D adaptive average pooling over the whole sequence, prefix tokens included."""

    pool = "1d"
    linear = True

    def forward(self, q, k, p: int, h: int, w: int) -> torch.Tensor:
        self.check_layout(q, p, h, w)
        B, H, N, d = q.shape
        pooled = F.adaptive_avg_pool1d(q.reshape(B * H, N, d).transpose(1, 2), self.num_landmarks)  # [B*H, d, m]
        return pooled.transpose(1, 2).reshape(B, H, self.num_landmarks, d)


class RandomLandmarks(LandmarkExtractor):
    """The queries of m patch tokens: a fresh draw each training forward, a fixed seeded draw in eval.

    The training draw uses the device's generator (``torch.randperm`` on ``q.device``, no host sync);
    the eval draw depends only on ``seed`` and the number of patch tokens, so evaluation is repeatable.
    """

    pool = "random"

    def __init__(self, num_landmarks: int, seed: int = 0) -> None:
        super().__init__(num_landmarks)
        self.seed = int(seed)
        self._eval_index: dict = {}

    def eval_index(self, n_patch: int, device: torch.device) -> torch.Tensor:
        key = (n_patch, str(device))
        if key not in self._eval_index:
            gen = torch.Generator().manual_seed(self.seed)
            self._eval_index[key] = torch.randperm(n_patch, generator=gen)[: self.num_landmarks].to(device)
        return self._eval_index[key]

    def forward(self, q, k, p: int, h: int, w: int) -> torch.Tensor:
        self.check_layout(q, p, h, w)
        if self.training:
            idx = torch.randperm(h * w, device=q.device)[: self.num_landmarks]
        else:
            idx = self.eval_index(h * w, q.device)
        return q.index_select(2, idx + p)  # [B, H, m, d]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"


class LearnedLandmarks(LandmarkExtractor):
    """Landmarks as free parameters [H, m, d] (trunc-normal, std 0.02), the same for every input."""

    pool = "learned"

    def __init__(self, num_landmarks: int, num_heads: int, head_dim: int, device=None, dtype=None) -> None:
        super().__init__(num_landmarks)
        self.weight = nn.Parameter(torch.empty(num_heads, num_landmarks, head_dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, q, k, p: int, h: int, w: int) -> torch.Tensor:
        self.check_layout(q, p, h, w)
        # Cast so autocast runs see one dtype; the cast keeps the gradient to the parameter.
        weight = self.weight.to(q.dtype)
        if not torch.is_grad_enabled():
            # Under no_grad a view of the parameter still requires grad but has no grad_fn, which
            # breaks module hooks that register gradient hooks on outputs (FlopCounterMode's tracker).
            weight = weight.detach()
        return weight.unsqueeze(0).expand(q.shape[0], -1, -1, -1)  # [B, H, m, d]


class ConvLandmarks(GridLandmarks):
    """A strided (optionally depthwise) Conv2d over the patch queries, then pooling to (p_h, p_w)."""

    linear = False  # learned weights and a bias: no fixed pooling weights

    def __init__(
        self,
        num_landmarks: int,
        grid: Tuple[int, int],
        dim: int,
        window_grid: Tuple[int, int] = (14, 14),
        depthwise: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_landmarks, grid)
        self.pool = "dwconv" if depthwise else "conv"
        window = (max(1, int(window_grid[0]) // grid[0]), max(1, int(window_grid[1]) // grid[1]))
        self.conv = nn.Conv2d(
            dim, dim, window, stride=window, groups=dim if depthwise else 1, device=device, dtype=dtype
        )

    def forward(self, q, k, p: int, h: int, w: int) -> torch.Tensor:
        self.check_layout(q, p, h, w)
        kh, kw = self.conv.kernel_size
        if kh > h or kw > w:
            raise ValueError(
                f"pool={self.pool!r}: conv window {kh}x{kw} does not fit the {h}x{w} patch grid; "
                f"pass window_grid=({h}, {w})"
            )
        B, H, _, d = q.shape
        # Channels in timm's head-major order (c = head * d + j), as the qkv projection lays them out.
        img = q[:, :, p:].transpose(-1, -2).reshape(B, H * d, h, w)  # [B, C, h, w]
        img = F.adaptive_avg_pool2d(self.conv(img), self.grid)  # [B, C, p_h, p_w]
        return img.reshape(B, H, d, self.num_landmarks).transpose(-1, -2)  # [B, H, m, d]


class ToMeLandmarks(LandmarkExtractor):
    """Bipartite token merging (ToMe) of the patch tokens on their keys until m clusters remain.

    Each round splits the current clusters alternately into sets A and B, scores every A cluster
    against every B cluster by cosine similarity of their size-weighted mean keys, and merges the
    A clusters with the highest best-match score into that match. The landmarks are the size-weighted
    means of the merged queries, i.e. the plain mean of the queries of each cluster's tokens. The
    clustering is chosen without gradient; the mean uses the kept assignment, so q gets gradients.
    """

    pool = "tome"

    @torch.no_grad()
    def assign(self, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Patch keys [B, H, n, d] -> (cluster of each token [B, H, n] in [0, m), cluster sizes [B, H, m])."""
        B, H, n, d = k.shape
        keys = k.float() if k.dtype in (torch.float16, torch.bfloat16) else k  # [B, H, c, d] cluster mean keys
        size = keys.new_ones(B, H, n)  # [B, H, c]
        cluster = torch.arange(n, device=k.device).expand(B, H, n)  # [B, H, n]
        c = n
        while c > self.num_landmarks:
            n_a = (c + 1) // 2  # tokens at even positions (set a); the c // 2 at odd ones are set b (n_b)
            r = min(c - self.num_landmarks, n_a)
            unit = F.normalize(keys, dim=-1)
            scores = unit[:, :, 0::2] @ unit[:, :, 1::2].transpose(-1, -2)  # [B, H, n_a, n_b]
            best, best_b = scores.max(dim=-1)  # [B, H, n_a]
            order = best.argsort(dim=-1, descending=True)  # [B, H, n_a]
            merged, kept = order[..., :r], order[..., r:]
            # New cluster order: kept A clusters, then B clusters (absorbing the merged A ones).
            new_of_a = torch.empty_like(best_b)
            new_of_a.scatter_(-1, kept, torch.arange(n_a - r, device=k.device).expand(B, H, -1))
            new_of_a.scatter_(-1, merged, best_b.gather(-1, merged) + (n_a - r))
            new_index = torch.empty(B, H, c, dtype=torch.long, device=k.device)  # old cluster -> new
            new_index[..., 0::2] = new_of_a
            new_index[..., 1::2] = torch.arange(n_a - r, c - r, device=k.device)
            cluster = new_index.gather(-1, cluster)
            key_sum = keys.new_zeros(B, H, c - r, d).scatter_add_(
                2, new_index.unsqueeze(-1).expand(-1, -1, -1, d), keys * size.unsqueeze(-1)
            )
            size = size.new_zeros(B, H, c - r).scatter_add_(-1, new_index, size)
            keys = key_sum / size.unsqueeze(-1)
            c -= r
        return cluster, size

    def forward(self, q, k, p: int, h: int, w: int) -> torch.Tensor:
        self.check_layout(q, p, h, w)
        cluster, size = self.assign(k[:, :, p:])
        qp = q[:, :, p:]  # [B, H, n, d]
        B, H, _, d = qp.shape
        # Accumulate fp16/bf16 in fp32 so the sums keep their precision; the gradient reaches qp.
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        total = qp.new_zeros(B, H, self.num_landmarks, d, dtype=acc).scatter_add(
            2, cluster.unsqueeze(-1).expand(-1, -1, -1, d), qp.to(acc)
        )
        return (total / size.to(acc).unsqueeze(-1)).to(q.dtype)  # [B, H, m, d]


def build_landmark_extractor(
    pool: str = "grid",
    num_landmarks: int = 25,
    dim: Optional[int] = None,
    num_heads: Optional[int] = None,
    *,
    landmark_grid: Optional[Tuple[int, int]] = None,
    seed: int = 0,
    window_grid: Tuple[int, int] = (14, 14),
    device=None,
    dtype=None,
) -> LandmarkExtractor:
    """Build the landmark extractor ``pool`` (one of :data:`POOLS`) producing ``num_landmarks`` landmarks.

    ``dim`` (C = H * d) and ``num_heads`` are needed by the pools with parameters (``learned``,
    ``conv``, ``dwconv``). The returned module maps ``(q, k, p, h, w)`` to landmarks [B, H, m, d].
    """
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r} is not a landmark extractor; choose one of {POOLS}")
    if isinstance(num_landmarks, bool) or not isinstance(num_landmarks, int) or num_landmarks <= 0:
        raise ValueError(
            f"num_landmarks must be a positive int (at most the number of patch tokens), got {num_landmarks!r}"
        )
    if pool in ("learned", "conv", "dwconv"):
        if not dim or not num_heads or dim % num_heads:
            raise ValueError(
                f"pool={pool!r} needs dim and num_heads with num_heads dividing dim, got dim={dim!r}, "
                f"num_heads={num_heads!r}"
            )
    if pool in ("grid", "official"):
        cls = GridLandmarks if pool == "grid" else OfficialLandmarks
        return cls(num_landmarks, landmark_grid_shape(num_landmarks, landmark_grid))
    if pool in ("conv", "dwconv"):
        grid = landmark_grid_shape(num_landmarks, landmark_grid)
        if len(window_grid) != 2 or min(int(s) for s in window_grid) <= 0:
            raise ValueError(f"window_grid must be two positive ints (h, w), got {window_grid!r}")
        return ConvLandmarks(
            num_landmarks, grid, dim, tuple(window_grid), pool == "dwconv", device=device, dtype=dtype
        )
    if pool == "learned":
        return LearnedLandmarks(num_landmarks, num_heads, dim // num_heads, device=device, dtype=dtype)
    if pool == "random":
        return RandomLandmarks(num_landmarks, seed)
    if pool == "1d":
        return SequenceLandmarks(num_landmarks)
    return ToMeLandmarks(num_landmarks)


_POOLING_WEIGHTS: dict = {}


@torch.compiler.assume_constant_result
def _cached_pooling_weights(
    pool: str, m: int, grid: Optional[Tuple[int, int]], N: int, p: int, h: int, w: int, device: str
) -> torch.Tensor:
    """The ``[m, N]`` weights of :meth:`LandmarkExtractor.pooling_weights`, cached per extractor, layout and
    device. Under ``torch.compile`` a constant of the graph (the function runs once, when traced): no per-call
    ops."""
    key = (pool, m, grid, N, p, h, w, device)
    if key not in _POOLING_WEIGHTS:
        extractor = build_landmark_extractor(pool, m, landmark_grid=grid)
        # a normal tensor even under inference_mode: the cache serves later training steps too, whose
        # autograd cannot save an inference tensor
        with torch.inference_mode(False), torch.no_grad():
            eye = torch.eye(N, dtype=torch.float64).view(1, 1, N, N)
            _POOLING_WEIGHTS[key] = extractor.forward(eye, eye, p, h, w)[0, 0].float().to(device)  # [m, N]
    return _POOLING_WEIGHTS[key]
