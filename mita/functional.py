"""The MiTA op: ``mita_attention(q, k, v, landmarks, topk, ...)``.

Per batch element and head, with m landmarks R [m, d], k routed keys per expert and r experts per query
(maths in README.md, "The op"):

* routed experts: ``I_j = topk_i(R_j . K_i)``, expert j holds ``(K[I_j], V[I_j])``;
* shared expert: keys ``R``, values ``V~ = softmax(s R K^T) V`` with ``s = d^-1/2``;
* routing: query q goes to the r experts with the largest ``R_j . q``;
* output: ONE softmax over the ``m + r*k`` logits ``[c q.R_j ; s q.K_i for i in I_e(q)]`` applied to
  ``[V~ ; V[I_e(q)]]``, where ``c = 1/d`` (``shared_scale="official"``) or ``c = s`` (``"paper"``).

Selections (top-k, routing) carry no gradient. A key picked by two experts of the same query enters
the softmax twice. Implementations, all taking the same routing when it is passed in ``routing=``:

* ``impl="reference"``: dense masked formulation (an N x N multiplicity mask), any dtype; for tests.
* ``impl="torch"``: memory O(N (d + m + r k) + m (m + k) d) per (batch, head); queries are grouped by
  expert into tiles of a static capacity, with offsets from cumsum, so it never syncs with the host.
* ``impl="triton"``: the Triton kernels in ``mita.kernels`` (CUDA only).
* ``impl="auto"``: Triton on CUDA when the kernels support the case, otherwise ``torch``.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import kernels
from .kernels.layout import expert_tiles as _expert_tiles

__all__ = ["mita_attention", "mita_routing", "mita_attention_macs", "counting_flops"]

IMPLS = ("auto", "torch", "reference", "triton")
SHARED_SCALES = ("official", "paper")

Routing = Tuple[torch.Tensor, torch.Tensor]


def mita_attention(
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
    impl: str = "auto",
    return_routing: bool = False,
    qkv: Optional[torch.Tensor] = None,
):
    """Mixture-of-Top-k Attention.

    Args:
        q, k, v: ``[B, H, N, d]`` queries, keys and values (floating point, same dtype and device).
        landmarks: ``[B, H, m, d]`` landmarks R (e.g. pooled queries), 1 <= m; or ``[m, N]`` pooling weights
            W, the landmarks then being ``W @ q`` for every batch element and head (the fused short-sequence
            kernels pool inside, with the gradient to q, where they can).
        topk: keys per routed expert, 0 <= topk <= N; 0 keeps only the shared expert.
        router_topk: experts per query r, 1 <= r <= m.
        shared: include the shared (compressed) expert.
        shared_scale: ``"official"`` (shared logits ``q.R / d``, as the released code) or ``"paper"``
            (``q.R / sqrt(d)``).
        routing: optional ``(topk_idx [B, H, m, topk], expert_idx [B, H, N, r])`` int64 pair; when given,
            no selection is recomputed.
        impl: ``"auto"``, ``"torch"``, ``"reference"`` or ``"triton"``.
        return_routing: also return the ``(topk_idx, expert_idx)`` pair used.
        qkv: optional ``[B, N, 3, H, d]`` tensor of which q, k, v are the views (a ViT's reshaped qkv projection,
            see ``mita.kernels.small_ops.qkv_source``): the fused short-sequence kernels then write its
            gradient as one tensor instead of three to be stacked; ignored by the other paths. Pass it only
            when nothing else differentiates through q, k, v.

    Returns:
        ``out [B, H, N, d]``, or ``(out, (topk_idx, expert_idx))`` with ``return_routing``.
    """
    pool = None
    if isinstance(landmarks, torch.Tensor) and landmarks.dim() == 2:
        pool = _check_pool(landmarks, q)
        if routing is None and impl in ("auto", "triton") and _short_kernel(q, pool, topk, router_topk, impl):
            # the checks of the landmarks' shape, dtype and device on a view of q of their shape
            like = q[:, :, :1].expand(-1, -1, pool.shape[0], -1)
            _check_inputs(q, k, v, like, topk, router_topk, shared, shared_scale, impl)
            return kernels.mita_attention_fused(q, k, v, None, topk, router_topk, shared,
                                                _shared_scale(q.shape[-1], shared_scale),
                                                return_routing=return_routing, pool=pool, qkv=qkv)
        landmarks = torch.matmul(pool.to(q.dtype), q)  # [B, H, m, d]
    _check_inputs(q, k, v, landmarks, topk, router_topk, shared, shared_scale, impl)
    if _COUNTING and not return_routing:
        # One opaque op computes routing and attention, so FlopCounterMode counts each matmul once.
        return torch.ops.mita.mita_attention_counted(q, k, v, landmarks, topk, router_topk, shared, shared_scale)
    if routing is None and impl in ("auto", "triton") and _short_kernel(q, landmarks, topk, router_topk, impl):
        # ViT lengths: selection, shared expert and attention in one fused launch (no routing in memory)
        return kernels.mita_attention_fused(q, k, v, landmarks, topk, router_topk, shared,
                                            _shared_scale(q.shape[-1], shared_scale), return_routing=return_routing,
                                            qkv=qkv)
    if routing is None:
        routing = mita_routing(q, k, landmarks, topk, router_topk, impl=impl)
    else:
        routing = _check_routing(routing, q, landmarks, topk, router_topk)
    topk_idx, expert_idx = routing
    scale_shared = _shared_scale(q.shape[-1], shared_scale)

    if impl == "reference":
        out = _mita_reference(q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared)
    elif impl == "torch":
        out = _mita_torch(q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared)
    else:
        out = _dispatch_kernel(q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared, impl)
    return (out, (topk_idx, expert_idx)) if return_routing else out


@torch.no_grad()
def mita_routing(
    q: torch.Tensor, k: torch.Tensor, landmarks: torch.Tensor, topk: int, router_topk: int = 1, *,
    impl: str = "auto",
) -> Routing:
    """Hard selections of MiTA: ``(topk_idx [B, H, m, topk], expert_idx [B, H, N, router_topk])``.

    ``topk_idx[b, h, j]`` are the keys with the largest unscaled scores ``R_j . K_i`` (any order);
    ``expert_idx[b, h, n]`` the landmarks with the largest ``R_j . q_n`` (best first). No gradient.
    The landmarks' top-k takes the Triton kernels on CUDA tensors where ``mita.kernels``' thresholds say; on CPU
    tensors it does so in Triton's interpreter only with ``impl="triton"`` (as ``mita_attention``).
    """
    if impl not in ("auto", "torch", "reference", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch', 'reference' or 'triton', got {impl!r}")
    B, H, N, d = q.shape
    m = landmarks.shape[2]
    if topk > 0 and _searches_topk(k, landmarks, topk, impl):
        topk_idx = kernels.landmark_topk_search(k, landmarks, topk)  # one launch, no [B, H, m, N] score matrix
    elif topk > 0 and _streams_topk(k, landmarks, topk, impl):
        topk_idx = kernels.landmark_topk(k, landmarks, topk)  # no [B, H, m, N] score matrix
    elif topk > 0:
        key_scores = landmarks @ k.transpose(-1, -2)  # [B, H, m, N]
        topk_idx = key_scores.topk(topk, dim=-1, sorted=False).indices
    else:
        topk_idx = torch.empty(B, H, m, 0, dtype=torch.long, device=q.device)
    if (q.is_cuda and router_topk <= 2 and kernels.available()
            and kernels.supports(q, landmarks, topk, router_topk)):
        # one Triton pass: no N x m gate matrix in memory
        return topk_idx.long(), kernels.route_queries(q, landmarks, router_topk)
    gate = q @ landmarks.transpose(-1, -2)  # [B, H, N, m]
    if router_topk == 1:
        expert_idx = gate.argmax(dim=-1, keepdim=True)
    else:
        expert_idx = gate.topk(router_topk, dim=-1, sorted=True).indices
    return topk_idx.long(), expert_idx.long()


def mita_attention_macs(
    B: int, H: int, N: int, d: int, m: int, topk: int, router_topk: int = 1, shared: bool = True
) -> int:
    """Multiply-adds of one MiTA call, counted as the released code computes it.

    Landmark-key scores (m N d, shared by top-k selection and the shared values), gate scores R.q
    (m N d, only with routed experts), shared values softmax(.) V (m N d), then the logits and the
    weighted sum over ``m + r k`` keys per query (2 N (m + r k) d).
    """
    per_head = 0
    if topk > 0 or shared:
        per_head += m * N * d
    if topk > 0:
        per_head += m * N * d
    if shared:
        per_head += m * N * d
    per_head += 2 * N * (m * int(shared) + router_topk * topk) * d
    return B * H * per_head


def _shared_scale(d: int, shared_scale: str) -> float:
    return 1.0 / d if shared_scale == "official" else d ** -0.5


def _check_inputs(q, k, v, landmarks, topk, router_topk, shared, shared_scale, impl) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("landmarks", landmarks)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, d] (landmarks [B, H, m, d]), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    B, H, N, d = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    if landmarks.shape[:2] != (B, H) or landmarks.shape[3] != d:
        raise ValueError(
            f"landmarks must be [B={B}, H={H}, m, d={d}] to match q, got {tuple(landmarks.shape)} "
            "(check the head dim)"
        )
    for name, t in (("k", k), ("v", v), ("landmarks", landmarks)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share one device")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all inputs must share one dtype")
    m = landmarks.shape[2]
    if N < 1 or d < 1 or m < 1:
        raise ValueError(f"need N >= 1, d >= 1 and m >= 1 (num landmarks), got N={N}, d={d}, m={m}")
    if isinstance(topk, bool) or not isinstance(topk, int) or not 0 <= topk <= N:
        raise ValueError(f"topk must be an int in [0, N={N}], got {topk!r}")
    if isinstance(router_topk, bool) or not isinstance(router_topk, int) or not 1 <= router_topk <= m:
        raise ValueError(f"router_topk must be an int in [1, m={m}], got {router_topk!r}")
    if topk == 0 and not shared:
        raise ValueError("topk=0 with shared=False leaves no expert: use topk in [1, N] or shared=True")
    if shared_scale not in SHARED_SCALES:
        raise ValueError(f"shared_scale must be one of {SHARED_SCALES}, got {shared_scale!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _check_pool(weights, q) -> torch.Tensor:
    """Pooling weights ``[m, N]`` given as ``landmarks``: floating point, on q's device, N matching q."""
    if not weights.is_floating_point():
        raise ValueError(f"landmarks as pooling weights [m, N] must be floating point, got {weights.dtype}")
    if weights.shape[1] != q.shape[2] or weights.shape[0] < 1:
        raise ValueError(f"landmarks as pooling weights must be [m >= 1, N={q.shape[2]}], got {tuple(weights.shape)}")
    if weights.device != q.device:
        raise ValueError(f"landmarks (pooling weights) are on {weights.device} but q is on {q.device}")
    return weights


def _check_routing(routing, q, landmarks, topk, router_topk) -> Routing:
    if not (isinstance(routing, (tuple, list)) and len(routing) == 2):
        raise ValueError("routing must be a pair (topk_idx [B, H, m, topk], expert_idx [B, H, N, router_topk])")
    topk_idx, expert_idx = routing
    B, H, N, _ = q.shape
    m = landmarks.shape[2]
    for name, t, shape, high in (
        ("routing[0] (topk_idx)", topk_idx, (B, H, m, topk), N),
        ("routing[1] (expert_idx)", expert_idx, (B, H, N, router_topk), m),
    ):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an int64 tensor")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        # A range check needs the values on the host: only where that costs no device sync.
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= high):
            raise ValueError(f"{name} values must lie in [0, {high - 1}]")
    return topk_idx.long(), expert_idx.long()


def _mita_reference(q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared):
    """Dense masked formulation: routed keys enter through a multiplicity mask over all N keys."""
    B, H, N, d = q.shape
    s = d ** -0.5
    r, kk = expert_idx.shape[-1], topk_idx.shape[-1]
    logits, values = [], []
    if shared:
        logits.append((q @ landmarks.transpose(-1, -2)) * scale_shared)  # [B, H, N, m]
        shared_v = torch.softmax((landmarks @ k.transpose(-1, -2)) * s, dim=-1) @ v  # [B, H, m, d]
        values.append(shared_v)
    if kk > 0:
        # keys of every expert a query is routed to: [B, H, N, r * kk]
        sel = topk_idx.gather(2, expert_idx.reshape(B, H, N * r, 1).expand(-1, -1, -1, kk)).reshape(B, H, N, r * kk)
        count = torch.zeros(B, H, N, N, dtype=q.dtype, device=q.device)
        count.scatter_add_(-1, sel, torch.ones_like(sel, dtype=q.dtype))  # multiplicity of each key
        logits.append((q @ k.transpose(-1, -2)) * s + count.log())  # [B, H, N, N], -inf off the experts
        values.append(v)
    p = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
    return p @ torch.cat(values, dim=-2)


def _mita_torch(q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared):
    """Memory-efficient PyTorch path: queries grouped by expert into tiles of static capacity."""
    B, H, N, d = q.shape
    m = landmarks.shape[2]
    r, kk = expert_idx.shape[-1], topk_idx.shape[-1]
    G = B * H
    s = d ** -0.5
    # bf16/fp16 logits are formed by matmuls that accumulate in fp32; the softmax itself runs in fp32.
    sm_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype

    logits = []
    if shared:
        logits.append(((q @ landmarks.transpose(-1, -2)) * scale_shared).reshape(G, N, m))  # [G, N, m]
        shared_v = F.scaled_dot_product_attention(landmarks, k, v, scale=s).reshape(G, m, d)  # [G, m, d]
    if kk > 0:
        lay = _expert_tiles(expert_idx.reshape(G, N * r), m, N, r)
        S, T = lay["num_tiles"], lay["tile"]
        qf = torch.cat([q.reshape(G, N, d), q.new_zeros(G, 1, d)], dim=1)  # [G, N + 1, d], row N is padding
        q_tiles = qf.gather(1, lay["slot_token"][..., None].expand(-1, -1, d)).view(G, S, T, d)
        key_rows = topk_idx.reshape(G, m * kk)[..., None].expand(-1, -1, d)
        k_exp = k.reshape(G, N, d).gather(1, key_rows).view(G, m, kk, d)  # [G, m, kk, d]
        v_exp = v.reshape(G, N, d).gather(1, key_rows).view(G, m, kk, d)
        tile_rows = lay["tile_expert"][:, :, None, None].expand(-1, -1, kk, d)
        k_tiles = k_exp.gather(1, tile_rows)  # [G, S, kk, d]
        v_tiles = v_exp.gather(1, tile_rows)
        tile_logits = (q_tiles @ k_tiles.transpose(-1, -2)) * s  # [G, S, T, kk]
        routed = tile_logits.reshape(G, S * T, kk).gather(1, lay["slot_of"][..., None].expand(-1, -1, kk))
        logits.append(routed.reshape(G, N, r * kk))  # [G, N, r * kk]

    p = torch.softmax(torch.cat(logits, dim=-1).to(sm_dtype), dim=-1).to(v.dtype)  # [G, N, m + r kk]
    out = None
    if shared:
        out = p[..., :m] @ shared_v  # [G, N, d]
    if kk > 0:
        p_routed = p[..., m * int(shared):].reshape(G, N * r, kk)
        p_routed = torch.cat([p_routed, p_routed.new_zeros(G, 1, kk)], dim=1)  # row N*r is padding
        p_tiles = p_routed.gather(1, lay["slot_source"][..., None].expand(-1, -1, kk)).view(G, S, T, kk)
        o_tiles = (p_tiles @ v_tiles).reshape(G, S * T, d)  # [G, S*T, d]
        o_routed = o_tiles.gather(1, lay["slot_of"][..., None].expand(-1, -1, d)).view(G, N, r, d).sum(2)
        out = o_routed if out is None else out + o_routed
    return out.view(B, H, N, d)


def _topk_kernel_here(k, landmarks, topk, impl) -> bool:
    """Whether a top-k kernel may take these tensors: CUDA ones, or with ``impl="triton"`` CPU ones in Triton's
    interpreter (which runs the one-launch search ~200x slower than torch.topk at ViT sizes)."""
    on_device = k.is_cuda or (impl == "triton" and kernels._interpreting())
    return on_device and kernels.available() and kernels.supports(k, landmarks, topk, 1)


def _streams_topk(k, landmarks, topk, impl="auto") -> bool:
    """Whether the landmarks' top-k is streamed by a kernel (``mita.kernels.STREAM_TOPK_MIN_SCORES``): from that
    many scores a head (m N)."""
    min_scores = kernels.STREAM_TOPK_MIN_SCORES
    if min_scores is None or landmarks.shape[2] * k.shape[2] < min_scores:
        return False
    return _topk_kernel_here(k, landmarks, topk, impl)


def _searches_topk(k, landmarks, topk, impl="auto") -> bool:
    """Whether the landmarks' top-k is one search launch (``mita.kernels.SEARCH_TOPK_MAX_N``): up to that many
    keys."""
    max_n = kernels.SEARCH_TOPK_MAX_N
    if max_n is None or k.shape[2] > max_n:
        return False
    return _topk_kernel_here(k, landmarks, topk, impl)


def _short_kernel(q, landmarks, topk, router_topk, impl) -> bool:
    """Whether the fused short-sequence kernels take this call: on CUDA (``impl="triton"`` also in Triton's
    interpreter on CPU), for the cases they support."""
    on_device = q.is_cuda or (impl == "triton" and kernels._interpreting())
    return (kernels.FUSED_SMALL and on_device and kernels.available()
            and kernels.supports_fused(q, landmarks, topk, router_topk))


def _dispatch_kernel(q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared, impl):
    if impl == "triton":
        if not kernels.available():
            raise RuntimeError("impl='triton' needs the Triton kernels, which are not available here (mita.kernels)")
        return kernels.mita_attention(q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared)
    if q.is_cuda and kernels.available():
        if kernels.supports(q, landmarks, topk_idx.shape[-1], expert_idx.shape[-1]):
            return kernels.mita_attention(q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared)
        reason = kernels._unsupported(q, landmarks, topk_idx.shape[-1], expert_idx.shape[-1])
        # warnings shows this once per process (default filter), not on every layer and step
        warnings.warn(f"mita_attention(impl='auto'): Triton kernels skipped ({reason}); using impl='torch'",
                      stacklevel=3)
    return _mita_torch(q, k, v, landmarks, topk_idx, expert_idx, shared, scale_shared)


_COUNTING = False


@contextlib.contextmanager
def counting_flops():
    """Route ``mita_attention`` through the opaque op ``torch.ops.mita.mita_attention_counted``.

    FlopCounterMode then sees one op per call, whose formula ``mita_utils.flops`` registers from
    :func:`mita_attention_macs`, instead of the padded tiles of the PyTorch path. Forward only; a call
    with ``return_routing=True`` (a module capturing its routing) runs its usual path and is counted op by op.
    """
    global _COUNTING
    previous, _COUNTING = _COUNTING, True
    try:
        yield
    finally:
        _COUNTING = previous


@torch.library.custom_op("mita::mita_attention_counted", mutates_args=())
def _mita_attention_counted(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    topk: int,
    router_topk: int,
    shared: bool,
    shared_scale: str,
) -> torch.Tensor:
    topk_idx, expert_idx = mita_routing(q, k, landmarks, topk, router_topk)
    return _mita_torch(q, k, v, landmarks, topk_idx, expert_idx, shared, _shared_scale(q.shape[-1], shared_scale))


@_mita_attention_counted.register_fake
def _(q, k, v, landmarks, topk, router_topk, shared, shared_scale):
    return torch.empty_like(q)
