"""MoBA (Mixture of Block Attention, Lu et al. 2025), non-causal, as the MiTA paper's baseline.

Per batch element and head, with scale ``s = d^-1/2``: the keys are split into ``nb = ceil(N / b)``
contiguous blocks of ``b = block_size`` tokens (the last may be shorter); block key ``kb_j`` = mean of
the keys of block j. Query n selects the ``t = topk_blocks`` blocks with the largest ``q_n . kb_j``
(unscaled; no gradient through the selection; ``t`` is clipped to ``nb``) and attends with ONE softmax
over all keys of its selected blocks: ``out_n = softmax_{i in blocks(n)}(s q_n . k_i) V[blocks(n)]``.

Two implementations, same result:

* ``impl="mask"``: the block selection expanded to an N x N boolean mask for
  ``F.scaled_dot_product_attention``. O(N^2) memory (the mask, and the scores in SDPA's math backend),
  but the fastest at ViT lengths (N ~ 200-1000).
* ``impl="gather"``: queries in chunks of ``chunk_size``; each chunk gathers the keys and values of its
  selected blocks (``[chunk, t * b, d]``) and is recomputed in backward (activation checkpointing), so
  memory is O(N (d + t) + chunk t b d), never N x N.
* ``impl="auto"`` (default): ``mask`` up to N = 4096 tokens, ``gather`` above.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .base import AttentionBase

__all__ = ["MoBAAttention"]

IMPLS = ("auto", "mask", "gather")
#: longest sequence ``impl="auto"`` runs with the N x N mask
AUTO_MASK_MAX_TOKENS = 4096


class MoBAAttention(AttentionBase):
    """Non-causal MoBA; constructor as :class:`AttentionBase` plus:

    Args:
        block_size: tokens per key block b, >= 1; default 25.
        topk_blocks: blocks per query t, >= 1 (clipped to the number of blocks); default 2.
        impl: ``"auto"``, ``"mask"`` or ``"gather"`` (see the module docstring).
        chunk_size: queries per chunk for ``impl="gather"``, >= 1; default 1024.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *args,
        block_size: int = 25,
        topk_blocks: int = 2,
        impl: str = "auto",
        chunk_size: int = 1024,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, *args, **kwargs)
        for name, value in (("block_size", block_size), ("topk_blocks", topk_blocks), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.block_size = block_size
        self.topk_blocks = topk_blocks
        self.impl = impl
        self.chunk_size = chunk_size

    @torch.no_grad()
    def select_blocks(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, H, N, t]`` of each query's top-t key blocks by ``q . mean(block keys)``."""
        B, H, N, d = k.shape
        b = self.block_size
        nb = math.ceil(N / b)
        k_blocks = F.pad(k, (0, 0, 0, nb * b - N)).reshape(B, H, nb, b, d).sum(dim=3)  # [B, H, nb, d]
        counts = torch.full((nb, 1), b, dtype=k.dtype, device=k.device)
        counts[-1] = N - (nb - 1) * b
        scores = q @ (k_blocks / counts).transpose(-1, -2)  # [B, H, N, nb]
        return scores.topk(min(self.topk_blocks, nb), dim=-1, sorted=False).indices

    def attend(self, q, k, v, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        N = q.shape[2]
        blocks = self.route(lambda: self.select_blocks(q, k))  # [B, H, N, t]
        impl = self.impl
        if impl == "auto":
            impl = "mask" if N <= AUTO_MASK_MAX_TOKENS else "gather"
        if impl == "mask":
            return self._attend_mask(q, k, v, blocks)
        return self._attend_gather(q, k, v, blocks)

    def _attend_mask(self, q, k, v, blocks):
        B, H, N, _ = q.shape
        nb = math.ceil(N / self.block_size)
        selected = torch.zeros(B, H, N, nb, dtype=torch.bool, device=q.device).scatter_(-1, blocks, True)
        key_block = torch.arange(N, device=q.device) // self.block_size  # [N]
        mask = selected.index_select(-1, key_block)  # [B, H, N, N]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.0
        )

    def _attend_gather(self, q, k, v, blocks):
        B, H, N, d = q.shape
        b = self.block_size
        nb = math.ceil(N / b)
        pad = nb * b - N
        # keys and values of each block as one row, so a block gathers with a single index
        k_rows = F.pad(k, (0, 0, 0, pad)).reshape(B, H, nb, b * d)
        v_rows = F.pad(v, (0, 0, 0, pad)).reshape(B, H, nb, b * d)
        key_valid = (torch.arange(nb * b, device=q.device) < N).reshape(nb, b)  # padding of the last block
        recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        outs = []
        for start in range(0, N, self.chunk_size):
            args = (q[:, :, start:start + self.chunk_size], k_rows, v_rows, blocks[:, :, start:start + self.chunk_size],
                    key_valid)
            if recompute:
                outs.append(checkpoint(self._gather_chunk, *args, use_reentrant=False))
            else:
                outs.append(self._gather_chunk(*args))
        return torch.cat(outs, dim=2)  # [B, H, N, d]

    def _gather_chunk(self, q, k_rows, v_rows, blocks, key_valid):
        B, H, c, d = q.shape
        t = blocks.shape[-1]
        b = key_valid.shape[1]
        index = blocks.reshape(B, H, c * t, 1).expand(-1, -1, -1, k_rows.shape[-1])
        k_sel = k_rows.gather(2, index).reshape(B, H, c, t * b, d)  # [B, H, c, t*b, d]
        v_sel = v_rows.gather(2, index).reshape(B, H, c, t * b, d)  # [B, H, c, t*b, d]
        logits = torch.einsum("bhcd,bhcjd->bhcj", q, k_sel) * self.scale  # [B, H, c, t*b]
        valid = key_valid[blocks].reshape(B, H, c, t * b)
        attn = logits.masked_fill(~valid, float("-inf")).softmax(dim=-1)
        attn = self.attn_drop(attn).to(v_sel.dtype)
        return torch.einsum("bhcj,bhcjd->bhcd", attn, v_sel)  # [B, H, c, d]
