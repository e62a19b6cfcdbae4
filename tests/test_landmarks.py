"""Landmark extractors (mita.landmarks): shapes, exact definitions, randomness, gradients, errors."""
import math

import pytest
import torch

from mita.landmarks import POOLS, build_landmark_extractor
from tests.helpers import assert_close, saved_storages

HEADS, HEAD_DIM = 2, 4
DIM = HEADS * HEAD_DIM


def tokens(p, h, w, batch=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, HEADS, p + h * w, HEAD_DIM)
    return torch.randn(shape, generator=gen, dtype=dtype), torch.randn(shape, generator=gen, dtype=dtype)


def build(pool, m=25, **kw):
    return build_landmark_extractor(pool, m, DIM, HEADS, dtype=torch.float64, **kw)


def window_means(x, h, w, ph, pw):
    """AdaptiveAvgPool2d by hand: x [B, H, h*w, d] on a raster grid -> [B, H, ph*pw, d] in float64."""
    grid = x.double().reshape(x.shape[0], x.shape[1], h, w, x.shape[-1])
    out = []
    for i in range(ph):
        r0, r1 = (i * h) // ph, math.ceil((i + 1) * h / ph)
        for j in range(pw):
            c0, c1 = (j * w) // pw, math.ceil((j + 1) * w / pw)
            out.append(grid[:, :, r0:r1, c0:c1].mean(dim=(2, 3)))
    return torch.stack(out, dim=2)


LAYOUTS = [(1, 14, 14), (1, 10, 15), (0, 7, 9)]


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("p,h,w", LAYOUTS)
def test_shapes(pool, p, h, w):
    if pool == "official" and (p != 1 or h != w):
        pytest.skip("official pooling needs one prefix token and a square grid")
    q, k = tokens(p, h, w)
    out = build(pool)(q, k, p, h, w)
    assert out.shape == (2, HEADS, 25, HEAD_DIM)
    assert out.dtype == q.dtype and torch.isfinite(out).all()


def test_grid_equals_window_average_divisible():
    # 10x15 patches into a 5x5 grid: disjoint 2x3 windows.
    q, k = tokens(1, 10, 15)
    out = build("grid")(q, k, 1, 10, 15)
    windows = q[:, :, 1:].reshape(2, HEADS, 5, 2, 5, 3, HEAD_DIM)
    expected = windows.mean(dim=(3, 5)).reshape(2, HEADS, 25, HEAD_DIM)
    assert_close(out, expected, 1e-14, "grid 10x15 -> 5x5")


def test_grid_overlapping_windows_and_rectangular_grid():
    q, k = tokens(3, 14, 14)
    assert_close(build("grid")(q, k, 3, 14, 14), window_means(q[:, :, 3:], 14, 14, 5, 5), 1e-14, "grid 14x14")
    ext = build("grid", m=6, landmark_grid=(2, 3))
    assert_close(ext(q, k, 3, 14, 14), window_means(q[:, :, 3:], 14, 14, 2, 3), 1e-14, "grid 2x3")


def test_official_is_the_released_code_definition():
    # Spec §2: queries of tokens 0..N-2 (cls included, last patch dropped) as a sqrt(N-1) raster grid.
    q, k = tokens(1, 14, 14)
    out = build("official")(q, k, 1, 14, 14)
    expected = window_means(q[:, :, : 14 * 14], 14, 14, 5, 5)
    assert_close(out, expected, 1e-14, "official")
    # and it differs from the clean grid pooling
    assert (out - build("grid")(q, k, 1, 14, 14)).abs().max() > 1e-3


def test_official_rejects_other_layouts():
    q, k = tokens(1, 10, 15)
    with pytest.raises(ValueError, match='pool="official"'):
        build("official")(q, k, 1, 10, 15)
    q, k = tokens(2, 14, 14)
    with pytest.raises(ValueError, match='pool="official"'):
        build("official")(q, k, 2, 14, 14)


def test_1d_pools_the_whole_sequence():
    q, k = tokens(0, 7, 9)
    out = build("1d", m=9)(q, k, 0, 7, 9)
    assert_close(out, q.reshape(2, HEADS, 9, 7, HEAD_DIM).mean(3), 1e-14, "1d 63 -> 9")


def test_random_deterministic_in_eval_varies_in_train():
    torch.manual_seed(0)
    q, k = tokens(1, 14, 14)
    ext = build("random").eval()
    a, b = ext(q, k, 1, 14, 14), ext(q, k, 1, 14, 14)
    assert torch.equal(a, b)
    assert torch.equal(a, build("random").eval()(q, k, 1, 14, 14))  # same default seed
    assert not torch.equal(a, build("random", seed=1).eval()(q, k, 1, 14, 14))
    # every landmark is the query of a patch token, never of the prefix token
    match = (a[:, :, :, None] == q[:, :, None]).all(-1)  # [B, H, m, N]
    assert match[..., 1:].any(-1).all() and not match[..., 0].any()
    ext.train()
    draws = [ext(q, k, 1, 14, 14) for _ in range(3)]
    assert not torch.equal(draws[0], draws[1]) or not torch.equal(draws[1], draws[2])


def test_learned_is_a_broadcast_parameter():
    q, k = tokens(1, 10, 15)
    ext = build("learned")
    out = ext(q, k, 1, 10, 15)
    assert ext.weight.shape == (HEADS, 25, HEAD_DIM)
    assert 0.005 < ext.weight.std().item() < 0.04
    assert torch.equal(out[0], out[1])
    out.sum().backward()
    assert ext.weight.grad is not None


@pytest.mark.parametrize("pool", ["conv", "dwconv"])
def test_conv_with_averaging_weights_equals_grid(pool):
    q, k = tokens(1, 10, 10)
    ext = build(pool, window_grid=(10, 10))
    assert ext.conv.kernel_size == (2, 2) and ext.conv.stride == (2, 2)
    assert ext.conv.groups == (DIM if pool == "dwconv" else 1)
    with torch.no_grad():
        ext.conv.bias.zero_()
        if pool == "dwconv":
            ext.conv.weight.fill_(0.25)
        else:
            ext.conv.weight.copy_(0.25 * torch.eye(DIM, dtype=torch.float64)[:, :, None, None].expand(-1, -1, 2, 2))
    assert_close(ext(q, k, 1, 10, 10), build("grid")(q, k, 1, 10, 10), 1e-14, pool)


def test_conv_window_from_default_grid():
    assert build("conv").conv.kernel_size == (2, 2)  # 14 // 5
    assert build("dwconv", m=4, window_grid=(3, 16)).conv.kernel_size == (1, 8)


def test_tome_exact_when_nothing_merges_and_gradients_reach_q():
    q, k = tokens(1, 5, 6)
    q.requires_grad_(True)
    out = build("tome", m=30)(q, k, 1, 5, 6)
    assert torch.equal(out, q[:, :, 1:])
    out = build("tome", m=7)(q, k, 1, 5, 6)
    out.pow(2).sum().backward()
    assert q.grad[:, :, 1:].abs().sum(-1).gt(0).all()  # every patch token feeds a landmark
    assert q.grad[:, :, 0].abs().sum() == 0  # the prefix token never does


def test_tome_merges_identical_keys_into_exact_means():
    # Keys come in identical pairs (tokens 2i, 2i+1): one round merges each pair.
    q, _ = tokens(0, 2, 4, batch=1)
    k = torch.eye(HEAD_DIM, dtype=torch.float64).repeat_interleave(2, 0).expand(1, HEADS, 8, HEAD_DIM)
    out = build("tome", m=4)(q, k, 0, 2, 4)
    expected = q.reshape(1, HEADS, 4, 2, HEAD_DIM).mean(3)
    # cluster order is an implementation detail: match each landmark to its expected pair mean
    dist = (out[:, :, :, None] - expected[:, :, None]).abs().amax(-1)  # [1, H, 4, 4]
    assert dist.amin(-1).max() < 1e-14 and dist.argmin(-1).sort(-1).values.eq(torch.arange(4)).all()


def test_tome_is_vectorised_over_batch_and_heads():
    q, k = tokens(1, 6, 7, batch=3)
    ext = build("tome", m=9)
    out = ext(q, k, 1, 6, 7)
    for b in range(3):
        for h in range(HEADS):
            one = ext(q[b : b + 1, h : h + 1], k[b : b + 1, h : h + 1], 1, 6, 7)
            assert torch.equal(out[b : b + 1, h : h + 1], one)


@pytest.mark.parametrize("pool", POOLS)
def test_too_many_landmarks(pool):
    q, k = tokens(1, 4, 4)
    ext = build(pool, m=25)
    with pytest.raises(ValueError, match="num_landmarks=25"):
        ext(q, k, 1, 4, 4)


def test_build_errors():
    with pytest.raises(ValueError, match="num_landmarks"):
        build("grid", m=0)
    with pytest.raises(ValueError, match="num_landmarks"):
        build("1d", m=-3)
    with pytest.raises(ValueError, match="pool='nope'"):
        build("nope")
    with pytest.raises(ValueError, match="perfect square"):
        build("grid", m=24)
    with pytest.raises(ValueError, match="landmark_grid"):
        build("grid", m=24, landmark_grid=(5, 5))
    with pytest.raises(ValueError, match="dim"):
        build_landmark_extractor("learned", 25)
    assert build("grid", m=24, landmark_grid=(4, 6)).grid == (4, 6)
    # non-square m is fine for pools without a grid
    q, k = tokens(1, 5, 5)
    assert build("1d", m=7)(q, k, 1, 5, 5).shape[2] == 7


def test_grid_must_fit_the_patch_grid():
    q, k = tokens(1, 3, 12)
    with pytest.raises(ValueError, match="5x5"):
        build("grid")(q, k, 1, 3, 12)
    assert build("grid", m=24, landmark_grid=(3, 8))(q, k, 1, 3, 12).shape[2] == 24


@pytest.mark.parametrize("p,h,w,out_hw", [(1, 5, 7, (2, 3)), (0, 4, 4, (4, 4)), (2, 3, 5, (3, 2))])
def test_patch_pooling_same_for_both_layouts_and_keeps_no_copy(p, h, w, out_hw):
    """pool_patch_queries gives the same landmarks and gradients whether q is a view of a ViT's qkv
    projection (heads as channels) or contiguous (heads as batch), against a float64 loop over the
    windows, and what it saves for the backward is q's own storage, never a copy of it."""
    from mita.attention._pooling import pool_patch_queries

    B, H, d = 2, 3, 4
    N = p + h * w
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, N, 3, H, d, generator=g, dtype=torch.float64)
    strided = qkv.permute(2, 0, 3, 1, 4)[0].requires_grad_()  # [B, H, N, d], not contiguous
    contiguous = strided.detach().contiguous().requires_grad_()
    ph, pw = out_hw
    ref = torch.stack([
        torch.stack([strided.detach()[:, :, p:].reshape(B, H, h, w, d)[
            :, :, (i * h) // ph:-(-(i + 1) * h // ph), (j * w) // pw:-(-(j + 1) * w // pw)].mean((2, 3))
            for j in range(pw)], 2) for i in range(ph)], 2).reshape(B, H, ph * pw, d)
    grad = torch.randn(B, H, ph * pw, d, generator=g, dtype=torch.float64)
    for q in (strided, contiguous):
        out, saved = saved_storages(pool_patch_queries, q, p, h, w, out_hw)
        assert_close(out, ref, 1e-12, name="landmarks")
        assert set(saved) <= {q.untyped_storage().data_ptr()}
        (out * grad).sum().backward()
    assert_close(strided.grad, contiguous.grad, 1e-12, name="dq")
    assert not strided.grad[:, :, :p].any()  # the prefix tokens are not pooled


@pytest.mark.parametrize("pool", ["grid", "official", "1d"])
def test_pooling_weights_reproduce_the_extractor(pool):
    # fixed windows: forward(q) == W @ q, so the fused kernels can pool inside
    extractor = build_landmark_extractor(pool, 25, 64, 4)
    W = extractor.pooling_weights(197, 1, 14, 14, "cpu")
    assert W.shape == (25, 197) and W.dtype == torch.float32
    assert extractor.pooling_weights(197, 1, 14, 14, "cpu") is W  # cached
    q = torch.randn(2, 4, 197, 16, dtype=torch.float64)
    assert_close(W.double() @ q, extractor(q, q, 1, 14, 14), 1e-6, "W q")



def test_pooling_weights_are_a_constant_under_compile():
    # torch.compile takes the cached weights as a constant of the graph: no eye / pooling ops on every call
    extractor = build_landmark_extractor("grid", 25, 64, 4)

    def f(q):
        return extractor.pooling_weights(197, 1, 14, 14, q.device) @ q

    q = torch.randn(2, 4, 197, 16)
    explained = torch._dynamo.explain(f)(q)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    ops = {str(n.target) for n in explained.graphs[0].graph.nodes if n.op == "call_function"}
    assert not any("eye" in op or "pool" in op for op in ops), ops
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True)(q), f(q))


@pytest.mark.parametrize("pool", ["grid", "official", "1d"])
def test_pooling_weights_of_a_submodule_under_compile(pool):
    # the extractor as a submodule of the compiled module (as in a model): the cache takes plain values
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.landmarks = build_landmark_extractor(pool, 25, 64, 4)

        def forward(self, q):
            return self.landmarks.pooling_weights(197, 1, 14, 14, q.device) @ q

    layer, q = Layer(), torch.randn(2, 4, 197, 16)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(layer, fullgraph=True)(q), layer(q))


@pytest.mark.parametrize("pool", ["random", "learned", "conv", "dwconv", "tome"])
def test_pooling_weights_only_for_fixed_windows(pool):
    extractor = build_landmark_extractor(pool, 25, 64, 4)
    assert not extractor.linear
    with pytest.raises(ValueError, match="no fixed pooling weights"):
        extractor.pooling_weights(197, 1, 14, 14, "cpu")
