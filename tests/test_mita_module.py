"""MiTAAttention: identity with the official MiTA_Attention (spec §2), variants, routing hook, precision."""
import pytest
import torch
import torch.nn.functional as F

from mita.attention import AgentAttention
from mita.attention.mita import MiTAAttention
from mita.landmarks import POOLS
from tests.helpers import assert_close, rel_err

DIM, HEADS = 16, 2


def make(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("qkv_bias", True)
    return MiTAAttention(DIM, HEADS, dtype=dtype, **kw).eval()


def inputs(n_tokens, batch=2, dtype=torch.float64, seed=1):
    return torch.randn(batch, n_tokens, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def official_mita(x, w_qkv, b_qkv, num_heads, pool_size=5, kv_topk=25, dwc=None, gate=None):
    """The official MiTA_Attention / MiTA_Attention_Conv_Gate up to ``proj``, as a dense float64 formula.

    ``dwc`` is (weight [C, 1, 3, 3], bias [C]), ``gate`` (weight [C, C], bias [C]) sliced from ``qkvg``.
    """
    B, N, C = x.shape
    d = C // num_heads
    s = d ** -0.5
    q, k, v = F.linear(x, w_qkv, b_qkv).reshape(B, N, 3, C).unbind(2)  # [B, N, C] each
    side = int(N ** 0.5)
    # landmarks: tokens 0..N-2 (cls included, last patch dropped) on a side x side raster grid
    grid = q[:, :-1].reshape(B, side, side, C).permute(0, 3, 1, 2)
    R = F.adaptive_avg_pool2d(grid, pool_size).reshape(B, C, -1).transpose(1, 2)  # [B, M, C]
    M = R.shape[1]
    heads = lambda t: t.reshape(B, -1, num_heads, d).transpose(1, 2)  # noqa: E731  [B, H, ., d]
    q, k, v, R = heads(q), heads(k), heads(v), heads(R)
    topk_idx = (R @ k.transpose(-1, -2)).topk(kv_topk, dim=-1).indices  # [B, H, M, k]
    shared_v = torch.softmax((R @ k.transpose(-1, -2)) * s, dim=-1) @ v  # SDPA(R, K, V): [B, H, M, d]
    expert = (R @ q.transpose(-1, -2)).argmax(dim=-2)  # [B, H, N]
    sel = topk_idx.gather(2, expert[..., None].expand(-1, -1, -1, kv_topk))  # [B, H, N, k]
    k_sel = k.gather(2, sel.flatten(2)[..., None].expand(-1, -1, -1, d)).reshape(B, num_heads, N, kv_topk, d)
    v_sel = v.gather(2, sel.flatten(2)[..., None].expand(-1, -1, -1, d)).reshape(B, num_heads, N, kv_topk, d)
    # shared keys enter as R * s into a softmax that scales by s again: logits q.R / d
    shared_logits = (q @ (R * s).transpose(-1, -2)) * s  # [B, H, N, M]
    routed_logits = torch.einsum("bhnd,bhnkd->bhnk", q, k_sel) * s  # [B, H, N, k]
    p = torch.softmax(torch.cat([shared_logits, routed_logits], dim=-1), dim=-1)
    out = p[..., :M] @ shared_v + torch.einsum("bhnk,bhnkd->bhnd", p[..., M:], v_sel)
    out = out.transpose(1, 2).reshape(B, N, C)
    if dwc is not None:
        v_grid = v[:, :, 1:].transpose(1, 2).reshape(B, side, side, C).permute(0, 3, 1, 2)
        conv = F.conv2d(v_grid, dwc[0], dwc[1], padding=1, groups=C).permute(0, 2, 3, 1).reshape(B, N - 1, C)
        out = out + F.pad(conv, (0, 0, 1, 0))  # cls gets 0
    if gate is not None:
        out = out * F.silu(F.linear(x, *gate))
    return out


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_official_pool_and_scale_match_official_module(impl):
    # Spec §2: pool="official" + shared_scale="official" computes what MiTA_Attention computes.
    attn = make(pool="official", shared_scale="official", impl=impl)
    x = inputs(1 + 14 * 14)
    expected = F.linear(official_mita(x, attn.qkv.weight, attn.qkv.bias, HEADS), attn.proj.weight, attn.proj.bias)
    with torch.no_grad():
        assert_close(attn(x), expected, 1e-10, f"official MiTA ({impl})")


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_dwc_gate_loads_official_qkvg(impl):
    C = DIM
    attn = make(pool="official", shared_scale="official", impl=impl, dwc=True, gate=True)
    gen = torch.Generator().manual_seed(3)
    # an official-style fused projection: qkvg = [q; k; v; g] rows
    w_qkvg = torch.randn(4 * C, C, generator=gen, dtype=torch.float64) * C ** -0.5
    b_qkvg = torch.randn(4 * C, generator=gen, dtype=torch.float64) * 0.1
    with torch.no_grad():
        attn.qkv.weight.copy_(w_qkvg[: 3 * C])
        attn.qkv.bias.copy_(b_qkvg[: 3 * C])
        attn.gate.weight.copy_(w_qkvg[3 * C :])
        attn.gate.bias.copy_(b_qkvg[3 * C :])
    x = inputs(1 + 7 * 7)
    expected = official_mita(
        x, w_qkvg[: 3 * C], b_qkvg[: 3 * C], HEADS,
        dwc=(attn.dwc.weight, attn.dwc.bias), gate=(w_qkvg[3 * C :], b_qkvg[3 * C :]),
    )
    expected = F.linear(expected, attn.proj.weight, attn.proj.bias)
    with torch.no_grad():
        assert_close(attn(x), expected, 1e-10, f"official MiTA + DWC + gate ({impl})")


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_compress_only_is_agent_attention(impl):
    # topk = 0 and the paper's scale leave the shared expert alone: SDPA(q, A, SDPA(A, K, V)).
    attn = make(num_landmarks=9, topk=0, shared_scale="paper", pool="grid", impl=impl)
    agent = AgentAttention(DIM, HEADS, qkv_bias=True, num_agents=9, dtype=torch.float64).eval()
    agent.load_state_dict(attn.state_dict())
    for layout in [(1, (6, 6)), (2, (5, 7))]:
        for module in (attn, agent):
            module.num_prefix_tokens, module.grid_size = layout
        p, (h, w) = layout
        x = inputs(p + h * w)
        with torch.no_grad():
            out = attn(x)
            assert_close(out, agent(x), 1e-12, f"MiTA topk=0 vs Agent {layout}")
            q, k, v = attn.project_qkv(x)
            A = F.adaptive_avg_pool2d(q[:, :, p:].transpose(-1, -2).reshape(2, DIM, h, w), 3)
            A = A.reshape(2, HEADS, DIM // HEADS, 9).transpose(-1, -2)  # [B, H, 9, d]
            y = F.scaled_dot_product_attention(q, A, F.scaled_dot_product_attention(A, k, v))
            assert_close(out, attn.proj(y.transpose(1, 2).reshape(2, -1, DIM)), 1e-12, "SDPA(q, A, SDPA(A, K, V))")


@pytest.mark.parametrize("router_topk", [1, 2])
def test_capture_then_inject_reproduces(router_topk):
    attn = make(num_landmarks=16, topk=8, router_topk=router_topk, impl="torch")
    x = inputs(1 + 8 * 8)
    attn.capture_routing = True
    with torch.no_grad():
        out = attn(x)
    topk_idx, expert_idx = attn.last_routing
    assert topk_idx.shape == (2, HEADS, 16, 8) and expert_idx.shape == (2, HEADS, 65, router_topk)
    assert attn.last_landmarks.shape == (2, HEADS, 16, DIM // HEADS)
    attn.capture_routing = False
    attn.routing = (topk_idx, expert_idx)
    with torch.no_grad():
        assert torch.equal(attn(x), out)
        # the injected routing is what the op uses: another routing changes the output
        attn.routing = (topk_idx, expert_idx.roll(1, dims=2))
        assert not torch.allclose(attn(x), out)


def test_router_topk_2_reference_equals_torch():
    x = inputs(1 + 8 * 8)
    outs = [make(num_landmarks=16, topk=8, router_topk=2, impl=impl)(x) for impl in ("reference", "torch")]
    assert_close(outs[1], outs[0], 1e-10, "router_topk=2")


@pytest.mark.parametrize("pool", POOLS)
def test_every_pool_trains(pool):
    attn = make(dtype=torch.float32, num_landmarks=16, topk=8, pool=pool, impl="torch", window_grid=(8, 8)).train()
    x = inputs(1 + 8 * 8, dtype=torch.float32).requires_grad_(True)
    out = attn(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, param in attn.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    if pool in ("learned", "conv", "dwconv"):
        assert next(attn.landmarks.parameters()).grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_bf16_autocast_close_to_fp32(impl):
    attn = make(dtype=torch.float32, num_landmarks=16, topk=8, impl=impl)
    x = inputs(1 + 8 * 8, dtype=torch.float32)
    attn.capture_routing = True
    with torch.no_grad():
        ref = attn(x)
    attn.capture_routing = False
    attn.routing = attn.last_routing
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2  # rel_err is inf on NaN


@pytest.mark.parametrize("pool", ["grid", "tome"])
def test_batch_of_one(pool):
    attn = make(num_landmarks=16, topk=8, pool=pool, impl="torch")
    attn.grid_size = (6, 10)
    x = inputs(1 + 60, batch=3)
    with torch.no_grad():
        full = attn(x)
        for b in range(3):
            assert_close(attn(x[b : b + 1]), full[b : b + 1], 1e-12, f"batch element {b}")


def test_rectangular_grid_and_registers():
    attn = make(num_landmarks=6, topk=5, impl="torch", landmark_grid=(2, 3))
    attn.grid_size, attn.num_prefix_tokens = (4, 9), 5
    attn.capture_routing = True
    with torch.no_grad():
        out = attn(inputs(5 + 36))
    assert out.shape == (2, 41, DIM) and attn.last_landmarks.shape[2] == 6


def test_validation():
    with pytest.raises(ValueError, match="topk=0 with shared=False"):
        make(topk=0, shared=False)
    with pytest.raises(ValueError, match="router_topk"):
        make(num_landmarks=4, router_topk=5)
    with pytest.raises(ValueError, match="topk"):
        make(topk=-1)
    with pytest.raises(ValueError, match="shared_scale"):
        make(shared_scale="sqrt")
    with pytest.raises(ValueError, match="impl"):
        make(impl="cuda")
    with pytest.raises(ValueError, match="pool="):
        make(pool="max")
    with pytest.raises(ValueError, match="perfect square"):
        make(num_landmarks=24)
    with pytest.raises(TypeError, match="unexpected"):
        make(landmarks_grid=(4, 6))
    attn = make(num_landmarks=16, topk=40)
    with pytest.raises(ValueError, match=r"topk must be an int in \[0, N=37\]"):
        attn(inputs(1 + 36))
    attn = make(num_landmarks=25, topk=8)
    with pytest.raises(ValueError, match=r"num_landmarks=25 must be in \[1, 16\]"):
        attn(inputs(1 + 16))


def test_module_keeps_topk_and_registry_builds_it():
    from mita.attention import create_attention

    attn = create_attention("mita", dim=DIM, num_heads=HEADS, qkv_bias=True, topk=24, router_topk=2, pool="tome")
    assert isinstance(attn, MiTAAttention) and attn.topk == 24 and attn.router_topk == 2
    assert "pool='tome'" in repr(attn)
