"""Agent attention (Han et al., "Agent Attention", ECCV 2024) with pooled-query agents.

Per batch element and head, with scale ``s = d^-1/2`` and agents ``A = pool(q)`` ``[a, d]`` (the patch
queries average-pooled to a ``ph x pw`` grid, ``a = ph * pw``, default 7 x 7 = 49):

    V_A = softmax(s A K^T + B_at) V        # [a, d]: agents aggregate all tokens
    out = softmax(s Q A^T + B_ta) V_A      # [N, d]: tokens read from the agents

which is ``SDPA(q, A, SDPA(A, k, v))``. Memory and cost are O(N a d). The optional position biases
``B_at`` (agent -> token) and ``B_ta`` (token -> agent) are learned on a base grid and resized
bilinearly to the current patch grid, so one model runs at any resolution; prefix tokens get their own
learned bias per (head, agent), shared by all prefix tokens.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._pooling import pool_patch_queries
from .base import AttentionBase

__all__ = ["AgentAttention"]


def _grid_arg(name: str, value) -> Tuple[int, int]:
    try:
        ph, pw = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (h, w) of positive ints, got {value!r}") from None
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in (ph, pw)):
        raise ValueError(f"{name} must be a pair (h, w) of positive ints, got {value!r}")
    return ph, pw


class AgentAttention(AttentionBase):
    """Agent attention; constructor as :class:`AttentionBase` plus:

    Args:
        num_agents: number of agents a, a positive perfect square (agents on a sqrt(a) x sqrt(a)
            grid); default 49. With ``agent_grid`` it may be omitted or must equal ``ph * pw``.
        agent_grid: ``(ph, pw)`` grid of agents for non-square layouts.
        agent_bias: learn the agent <-> token position biases.
        bias_grid: ``(bh, bw)`` base grid the biases are stored at; default the agent grid (7 x 7 as
            in the Agent-Attention paper). Resized bilinearly to the patch grid on every forward.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *args,
        num_agents: Optional[int] = None,
        agent_grid: Optional[Sequence[int]] = None,
        agent_bias: bool = False,
        bias_grid: Optional[Sequence[int]] = None,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, *args, **kwargs)
        if num_agents is not None and (
            not isinstance(num_agents, int) or isinstance(num_agents, bool) or num_agents < 1
        ):
            raise ValueError(f"num_agents must be a positive int, got {num_agents!r}")
        if agent_grid is not None:
            agent_grid = _grid_arg("agent_grid", agent_grid)
            if num_agents is not None and num_agents != agent_grid[0] * agent_grid[1]:
                raise ValueError(
                    f"num_agents={num_agents} does not match agent_grid={agent_grid} "
                    f"(expected {agent_grid[0] * agent_grid[1]}); pass only one of them"
                )
        else:
            num_agents = 49 if num_agents is None else num_agents
            side = math.isqrt(num_agents)
            if side * side != num_agents:
                raise ValueError(
                    f"num_agents must be a perfect square (1, 4, 9, ..., 49, ...) unless agent_grid=(ph, pw) "
                    f"is given, got {num_agents}"
                )
            agent_grid = (side, side)
        self.agent_grid: Tuple[int, int] = agent_grid
        self.num_agents = agent_grid[0] * agent_grid[1]

        self.agent_bias = bool(agent_bias)
        if self.agent_bias:
            self.bias_grid = agent_grid if bias_grid is None else _grid_arg("bias_grid", bias_grid)
            dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
            H, a = self.num_heads, self.num_agents
            # agent -> patch tokens and patch tokens -> agent, [H, a, bh, bw] on the base grid
            self.agent_token_bias = nn.Parameter(torch.zeros(H, a, *self.bias_grid, **dd))
            self.token_agent_bias = nn.Parameter(torch.zeros(H, a, *self.bias_grid, **dd))
            # agent -> prefix tokens [H, a, 1] and prefix tokens -> agent [H, 1, a]
            self.agent_prefix_bias = nn.Parameter(torch.zeros(H, a, 1, **dd))
            self.prefix_agent_bias = nn.Parameter(torch.zeros(H, 1, a, **dd))
            for param in (self.agent_token_bias, self.token_agent_bias, self.agent_prefix_bias,
                          self.prefix_agent_bias):
                nn.init.trunc_normal_(param, std=0.02)
        elif bias_grid is not None:
            raise ValueError("bias_grid is only used with agent_bias=True")

    def position_biases(self, p: int, h: int, w: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """Biases for ``p`` prefix tokens and an ``h x w`` patch grid: ``([H, a, N], [H, N, a])``."""
        H, a = self.num_heads, self.num_agents

        def resize(bias):  # [H, a, bh, bw] -> [H, a, h*w]
            if tuple(bias.shape[-2:]) != (h, w):
                bias = F.interpolate(bias, size=(h, w), mode="bilinear", align_corners=False)
            return bias.flatten(2)

        agent_token = torch.cat([self.agent_prefix_bias.expand(H, a, p), resize(self.agent_token_bias)], dim=2)
        token_agent = torch.cat(
            [self.prefix_agent_bias.expand(H, p, a), resize(self.token_agent_bias).transpose(1, 2)], dim=1
        )
        return agent_token.to(dtype), token_agent.to(dtype)

    def attend(self, q, k, v, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        B, H, N, d = q.shape
        p, h, w = self.token_grid(N)
        agents = pool_patch_queries(q, p, h, w, self.agent_grid)  # [B, H, a, d]
        bias_at = bias_ta = None
        if self.agent_bias:
            # SDPA wants a float mask in the query dtype (bf16 under autocast); [H, ., .] broadcasts over B
            bias_at, bias_ta = self.position_biases(p, h, w, agents.dtype)
        dropout_p = self.attn_drop.p if self.training else 0.0
        agent_v = F.scaled_dot_product_attention(agents, k, v, attn_mask=bias_at, dropout_p=dropout_p)  # [B, H, a, d]
        return F.scaled_dot_product_attention(q, agents, agent_v, attn_mask=bias_ta, dropout_p=dropout_p)
