"""The MiTA op: the PyTorch path against the float64 reference, routing, memory bound and bad input."""
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mita.functional import mita_attention, mita_attention_macs, mita_routing
from tests.helpers import assert_close, rel_err
from tests.helpers import input_grads as _grads

# (N, description): DeiT 14x14+1, ViT-B/512 32x32+1, a non-square 10x15+1 grid, 63 tokens without prefix
TOKEN_CASES = [197, 1025, 151, 63]
LANDMARKS = [4, 25, 49]
TOPKS = [1, 25, 64]


def _inputs(B, H, N, d, m, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, d, generator=g, dtype=dtype) for _ in range(3))
    landmarks = torch.randn(B, H, m, d, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, landmarks)]


def _compare(B, H, N, d, m, topk, r, shared, scale, tol=1e-10, seed=0, routing=None):
    inputs = _inputs(B, H, N, d, m, seed=seed)
    kw = dict(router_topk=r, shared=shared, shared_scale=scale)
    ref, used = mita_attention(*inputs, topk, impl="reference", routing=routing, return_routing=True, **kw)
    out = mita_attention(*inputs, topk, impl="torch", routing=used, **kw)
    grad_out = torch.randn_like(ref)
    assert_close(out, ref, tol, "out")
    for name, a, b in zip("q k v landmarks".split(), _grads(out, inputs, grad_out), _grads(ref, inputs, grad_out)):
        if b.abs().max() <= 1e-12:  # e.g. landmarks without the shared expert only select: no gradient
            assert a.abs().max() <= 1e-12, f"d{name} should be zero"
        else:
            assert_close(a, b, tol, f"d{name}")


@pytest.mark.parametrize("N,m,topk", list(itertools.product(TOKEN_CASES, LANDMARKS, TOPKS)))
def test_torch_matches_reference_float64(N, m, topk):
    # cycle the remaining options through the grid so each combination of them is covered somewhere
    i = TOKEN_CASES.index(N) * 9 + LANDMARKS.index(m) * 3 + TOPKS.index(topk)
    r = 1 + i % 2
    B = (1, 3)[(i // 2) % 2]
    scale = ("official", "paper")[(i // 4) % 2]
    shared = (i % 5) != 3
    if topk > N:
        with pytest.raises(ValueError, match="topk"):
            mita_attention(*_inputs(B, 2, N, 8, m), topk, impl="torch")
        return
    _compare(B, 2, N, 8, m, topk, r, shared, scale, seed=i)


@pytest.mark.parametrize("scale", ["official", "paper"])
@pytest.mark.parametrize("r", [1, 2])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("B", [1, 3])
def test_options_grid(scale, r, shared, B):
    _compare(B, 3, 197, 16, 25, 25, r, shared, scale)


@pytest.mark.parametrize("scale", ["official", "paper"])
def test_topk_zero_keeps_only_shared_expert(scale):
    _compare(2, 2, 151, 8, 25, 0, 1, True, scale)
    q, k, v, R = _inputs(2, 2, 151, 8, 25)
    out = mita_attention(q, k, v, R, 0, shared_scale=scale, impl="torch")
    c = 1 / 8 if scale == "official" else 8 ** -0.5
    shared_v = torch.softmax(R @ k.transpose(-1, -2) * 8 ** -0.5, -1) @ v
    expected = torch.softmax(q @ R.transpose(-1, -2) * c, -1) @ shared_v
    assert_close(out, expected, 1e-12, "compress-only")


@pytest.mark.parametrize("r", [1, 2])
def test_empty_experts(r):
    B, H, N, d, m, topk = 2, 2, 197, 8, 25, 25
    q, k, v, R = _inputs(B, H, N, d, m)
    topk_idx, _ = mita_routing(q, k, R, topk, r)
    # every query goes to experts 0 (and 1): experts 2..m-1 hold no query
    expert_idx = torch.arange(r).expand(B, H, N, r).contiguous()
    _compare(B, H, N, d, m, topk, r, True, "official", routing=(topk_idx, expert_idx))
    # one query per expert at most, the rest of the experts empty; a single token
    _compare(1, 1, 1, 8, 4, 1, 1, True, "paper")


def test_duplicate_keys_enter_softmax_twice():
    B, H, N, d, m, topk = 1, 1, 6, 4, 2, 2
    q, k, v, R = _inputs(B, H, N, d, m)
    # both experts pick keys {0, 1}; every query is routed to both experts
    topk_idx = torch.tensor([[[[0, 1], [1, 0]]]])
    expert_idx = torch.tensor([0, 1]).expand(B, H, N, 2).contiguous()
    out = mita_attention(q, k, v, R, topk, router_topk=2, shared=False, routing=(topk_idx, expert_idx), impl="torch")
    logits = q @ k[:, :, :2].transpose(-1, -2) * d ** -0.5  # [.., N, 2]
    p = torch.softmax(torch.cat([logits, logits], -1), -1)
    expected = p @ torch.cat([v[:, :, :2], v[:, :, :2]], -2)
    assert_close(out, expected, 1e-12, "duplicates")
    ref = mita_attention(q, k, v, R, topk, router_topk=2, shared=False, routing=(topk_idx, expert_idx), impl="reference")
    assert_close(ref, expected, 1e-12, "duplicates (reference)")


def test_routing_passed_in_equals_recomputed():
    q, k, v, R = _inputs(2, 3, 197, 16, 25)
    out, routing = mita_attention(q, k, v, R, 25, return_routing=True, impl="torch")
    again = mita_attention(q, k, v, R, 25, routing=routing, impl="torch")
    assert torch.equal(out, again)


def test_routing_selection_matches_torch_topk():
    B, H, N, d, m, topk = 2, 2, 151, 8, 25, 16
    q, k, v, R = _inputs(B, H, N, d, m)
    _, (topk_idx, expert_idx) = mita_attention(q, k, v, R, topk, router_topk=2, return_routing=True, impl="torch")
    assert topk_idx.shape == (B, H, m, topk) and topk_idx.dtype == torch.long
    assert expert_idx.shape == (B, H, N, 2) and expert_idx.dtype == torch.long
    scores = (R @ k.transpose(-1, -2)).detach()
    ref_sets = scores.topk(topk, -1).indices.sort(-1).values
    assert torch.equal(topk_idx.sort(-1).values, ref_sets)
    assert torch.equal(expert_idx, (q @ R.transpose(-1, -2)).detach().topk(2, -1).indices)


def test_routing_on_cpu_takes_torch_topk_unless_triton_is_asked(monkeypatch):
    # under Triton's interpreter (the CPU tests) the one-launch top-k search runs only for impl="triton"; a bad
    # impl is named
    from mita import kernels
    from mita.functional import mita_routing
    from mita.kernels import topk_stream

    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 2, 70, 32, generator=g) for _ in range(2))
    R = torch.randn(2, 2, 3, 32, generator=g)
    calls = []
    search = topk_stream.search_topk
    monkeypatch.setattr(topk_stream, "search_topk", lambda *a, **kw: calls.append(1) or search(*a, **kw))
    monkeypatch.setattr(kernels, "SEARCH_TOPK_MAX_N", 2048)
    mita_routing(q, k, R, 9)
    assert calls == []
    if kernels._interpreting() and kernels.available():
        mita_routing(q, k, R, 9, impl="triton")
        assert calls == [1]
    with pytest.raises(ValueError, match="impl must be"):
        mita_routing(q, k, R, 9, impl="cuda")


def test_bf16_torch_path_close_to_float64_reference():
    q, k, v, R = _inputs(2, 3, 197, 64, 25)
    ref, routing = mita_attention(q, k, v, R, 25, impl="reference", return_routing=True)
    out = mita_attention(*(t.detach().bfloat16() for t in (q, k, v, R)), 25, routing=routing, impl="torch")
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 1e-2


def test_auto_on_cpu_uses_torch_path():
    q, k, v, R = _inputs(1, 2, 63, 8, 4)
    out, routing = mita_attention(q, k, v, R, 25, impl="auto", return_routing=True)
    assert torch.equal(out, mita_attention(q, k, v, R, 25, impl="torch", routing=routing))


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("r", [1, 2])
def test_torch_path_memory_bound(r):
    B, H, N, d, m, topk = 1, 2, 2049, 8, 4, 8
    q, k, v, R = _inputs(B, H, N, d, m, dtype=torch.float32)
    bound = 2 * B * H * (N * (d + m + r * topk) + m * (m + topk) * d)
    assert bound < B * H * N * N and bound < B * H * N * topk * d  # the bound excludes both forbidden sizes
    mode = _LargestTensor()
    with mode:
        out = mita_attention(q, k, v, R, topk, router_topk=r, impl="torch")
        out.sum().backward()
    assert mode.largest <= bound, f"largest intermediate {mode.largest} > O(N (d + m + r k)) bound {bound}"


def test_macs_formula():
    # DeiT-Tiny layer: 3 heads, N = 197, d = 64, m = k = 25
    assert mita_attention_macs(1, 3, 197, 64, 25, 25) == 3 * (3 * 25 * 197 * 64 + 2 * 197 * 50 * 64)
    assert mita_attention_macs(1, 1, 10, 4, 2, 0) == 2 * 2 * 10 * 4 + 2 * 10 * 2 * 4
    assert mita_attention_macs(1, 1, 10, 4, 2, 3, shared=False) == 2 * 2 * 10 * 4 + 2 * 10 * 3 * 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(topk=198), r"topk must be an int in \[0, N=197\]"),
        (dict(topk=-1), "topk"),
        (dict(topk=0, shared=False), "topk=0 with shared=False"),
        (dict(router_topk=0), r"router_topk must be an int in \[1, m=25\]"),
        (dict(router_topk=26), "router_topk"),
        (dict(shared_scale="sqrt"), "shared_scale"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_bad_arguments(kwargs, match):
    q, k, v, R = _inputs(1, 2, 197, 8, 25)
    kwargs = {"topk": 25, **kwargs}
    topk = kwargs.pop("topk")
    with pytest.raises(ValueError, match=match):
        mita_attention(q, k, v, R, topk, **kwargs)


def test_bad_tensors():
    q, k, v, R = (t.detach() for t in _inputs(1, 2, 197, 8, 25))
    with pytest.raises(ValueError, match="q must be a floating-point"):
        mita_attention(q.long(), k, v, R, 25)
    with pytest.raises(ValueError, match="head dim"):
        mita_attention(q, k, v, torch.randn(1, 2, 25, 4, dtype=q.dtype), 25)
    with pytest.raises(ValueError, match="landmarks is on meta"):
        mita_attention(q, k, v, R.to("meta"), 25)
    with pytest.raises(ValueError, match="k must have the shape of q"):
        mita_attention(q, k[:, :, :-1], v, R, 25)
    with pytest.raises(ValueError, match="4-D"):
        mita_attention(q[0], k, v, R, 25)
    with pytest.raises(ValueError, match="dtype"):
        mita_attention(q, k.float(), v, R, 25)
    topk_idx, expert_idx = mita_routing(q, k, R, 25)
    with pytest.raises(ValueError, match="routing\\[0\\]"):
        mita_attention(q, k, v, R, 25, routing=(topk_idx[..., :-1], expert_idx))
    with pytest.raises(ValueError, match="routing\\[1\\].*values"):
        mita_attention(q, k, v, R, 25, routing=(topk_idx, expert_idx + 25))


def test_triton_impl_unavailable_raises_clearly():
    from mita import kernels

    if kernels.available():
        pytest.skip("kernels available: covered by the kernel tests")
    q, k, v, R = (t.detach() for t in _inputs(1, 1, 16, 8, 4))
    with pytest.raises(RuntimeError, match="Triton"):
        mita_attention(q, k, v, R, 4, impl="triton")


@pytest.mark.gpu
def test_torch_path_never_syncs_with_host():
    q, k, v, R = (t.detach().float().cuda().requires_grad_() for t in _inputs(2, 2, 197, 16, 25))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = mita_attention(q, k, v, R, 25, router_topk=2, impl="torch")
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_pooling_weights_as_landmarks(impl):
    # landmarks given as [m, N] weights W mean W @ q for every batch element and head, gradient to q included
    from mita.landmarks import build_landmark_extractor

    q, k, v, _ = _inputs(2, 3, 197, 16, 25)
    W = build_landmark_extractor("grid", 25, 48, 3).pooling_weights(197, 1, 14, 14, "cpu").double()
    out, routing = mita_attention(q, k, v, W, 25, impl=impl, return_routing=True)
    ref = mita_attention(q, k, v, W @ q, 25, impl="reference", routing=routing)
    grad_out = torch.randn_like(ref)
    assert_close(out, ref, 1e-10, "out")
    for name, a, b in zip("qkv", _grads(out, [q, k, v], grad_out), _grads(ref, [q, k, v], grad_out)):
        assert_close(a, b, 1e-10, f"d{name}")


def test_bad_pooling_weights():
    q, k, v, _ = (t.detach() for t in _inputs(1, 2, 197, 8, 25))
    with pytest.raises(ValueError, match=r"pooling weights must be \[m >= 1, N=197\]"):
        mita_attention(q, k, v, torch.rand(25, 196, dtype=q.dtype), 25)
    with pytest.raises(ValueError, match="must be floating point"):
        mita_attention(q, k, v, torch.ones(25, 197, dtype=torch.long), 25)
    with pytest.raises(ValueError, match="pooling weights\\) are on meta"):
        mita_attention(q, k, v, torch.rand(25, 197, device="meta"), 25)
