"""Baseline attentions (standard, agent, MoBA, top-k, linear) and the registry."""
import math

import pytest
import torch
import torch.nn.functional as F

from mita.attention import (
    ATTENTIONS,
    AgentAttention,
    LinearAttention,
    MoBAAttention,
    StandardAttention,
    TopkAttention,
    create_attention,
    pool_patch_queries,
    set_token_layout,
)
from tests.helpers import assert_close

BASELINES = ("standard", "agent", "moba", "topk", "linear")


def _qkv(B, H, N, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, d, generator=g, dtype=dtype) for _ in range(3)]


def _dense_attention(q, k, v, keep=None):
    """softmax(s q k^T) v over the keys where ``keep`` is True, float64."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits.softmax(-1) @ v


def test_standard_matches_timm_attention():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, depth=1)
    ref = model.blocks[0].attn.eval()
    ours = StandardAttention(192, num_heads=3, qkv_bias=True).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 17, 192)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-6, rtol=0)
        mask = torch.rand(17, 17) > 0.3
        mask.fill_diagonal_(True)
        assert torch.allclose(ours(x, attn_mask=mask), ref(x, attn_mask=mask), atol=1e-6, rtol=0)
        assert torch.allclose(ours(x, is_causal=True), ref(x, is_causal=True), atol=1e-6, rtol=0)


def test_topk_with_all_keys_is_standard():
    N = 17
    std = StandardAttention(32, num_heads=2).double()
    topk = TopkAttention(32, num_heads=2, topk=N).double()
    topk.load_state_dict(std.state_dict())
    set_token_layout(std, (4, 4), 1)
    set_token_layout(topk, (4, 4), 1)
    x = torch.randn(2, N, 32, dtype=torch.float64)
    assert_close(topk(x), std(x), 1e-12, "topk=N vs standard")


def test_topk_matches_direct_formula():
    q, k, v = _qkv(2, 2, 23, 8)
    attn = TopkAttention(16, num_heads=2, topk=5)
    scores = q @ k.transpose(-1, -2)
    kth = scores.topk(5, dim=-1).values[..., -1:]
    assert_close(attn.attend(q, k, v), _dense_attention(q, k, v, scores >= kth), 1e-12, "topk")


def test_topk_out_of_range():
    attn = TopkAttention(16, num_heads=2, topk=18)
    with pytest.raises(ValueError, match=r"topk.*\[1, 17\]"):
        attn(torch.randn(1, 17, 16))
    with pytest.raises(ValueError, match="topk"):
        TopkAttention(16, num_heads=2, topk=0)


def _adaptive_windows(n, out):
    return [(math.floor(i * n / out), math.ceil((i + 1) * n / out)) for i in range(out)]


def _pool_direct(q, p, h, w, ph, pw):
    B, H, N, d = q.shape
    grid = q[:, :, p:].reshape(B, H, h, w, d)
    cells = [
        grid[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
        for r0, r1 in _adaptive_windows(h, ph)
        for c0, c1 in _adaptive_windows(w, pw)
    ]
    return torch.stack(cells, dim=2)


@pytest.mark.parametrize("p,h,w,ph,pw", [(1, 14, 14, 7, 7), (1, 10, 15, 4, 6), (0, 5, 7, 3, 3), (2, 3, 4, 5, 5)])
def test_pool_patch_queries(p, h, w, ph, pw):
    (q,) = _qkv(2, 3, p + h * w, 4)[:1]
    assert_close(pool_patch_queries(q, p, h, w, (ph, pw)), _pool_direct(q, p, h, w, ph, pw), 1e-14, "pool")


@pytest.mark.parametrize("grid,agent_kw,shape", [
    ((14, 14), {}, (7, 7)),
    ((10, 15), {"agent_grid": (3, 5)}, (3, 5)),
    ((6, 6), {"num_agents": 16}, (4, 4)),
])
def test_agent_matches_direct_formula(grid, agent_kw, shape):
    h, w = grid
    N = h * w + 1
    attn = AgentAttention(16, num_heads=2, **agent_kw).double()
    attn.grid_size = grid
    q, k, v = _qkv(2, 2, N, 8)
    agents = _pool_direct(q, 1, h, w, *shape)
    agent_v = _dense_attention(agents, k, v)
    assert_close(attn.attend(q, k, v), _dense_attention(q, agents, agent_v), 1e-12, "agent")


def test_agent_bias_matches_direct_formula():
    h, w = 7, 7
    attn = AgentAttention(16, num_heads=2, num_agents=9, agent_bias=True, bias_grid=(7, 7)).double()
    attn.grid_size = (h, w)
    attn.num_prefix_tokens = 2
    q, k, v = _qkv(1, 2, h * w + 2, 8)
    s = 8 ** -0.5
    agents = _pool_direct(q, 2, h, w, 3, 3)  # [B, H, 9, d]
    at = torch.cat([attn.agent_prefix_bias.expand(2, 9, 2), attn.agent_token_bias.flatten(2)], dim=2)
    ta = torch.cat([attn.prefix_agent_bias.expand(2, 2, 9), attn.token_agent_bias.flatten(2).transpose(1, 2)], dim=1)
    agent_v = (s * agents @ k.transpose(-1, -2) + at).softmax(-1) @ v
    expected = (s * q @ agents.transpose(-1, -2) + ta).softmax(-1) @ agent_v
    assert_close(attn.attend(q, k, v), expected.detach(), 1e-12, "agent bias")
    # the biases are resized to other grids
    attn.grid_size = (10, 15)
    attn.num_prefix_tokens = 1
    x = torch.randn(1, 151, 16, dtype=torch.float64)
    attn(x).sum().backward()
    assert attn.agent_token_bias.grad.abs().sum() > 0 and attn.prefix_agent_bias.grad.abs().sum() > 0


def test_agent_bad_arguments():
    with pytest.raises(ValueError, match="num_agents"):
        AgentAttention(16, num_heads=2, num_agents=10)
    with pytest.raises(ValueError, match="num_agents"):
        AgentAttention(16, num_heads=2, num_agents=10, agent_grid=(3, 3))
    with pytest.raises(ValueError, match="agent_grid"):
        AgentAttention(16, num_heads=2, agent_grid=(0, 3))
    assert AgentAttention(16, num_heads=2, num_agents=10, agent_grid=(2, 5)).num_agents == 10


def _moba_direct(q, k, v, block_size, topk_blocks):
    N = k.shape[2]
    nb = math.ceil(N / block_size)
    block_keys = torch.stack([k[:, :, j * block_size:(j + 1) * block_size].mean(2) for j in range(nb)], dim=2)
    chosen = (q @ block_keys.transpose(-1, -2)).topk(min(topk_blocks, nb), dim=-1).indices
    selected = torch.zeros(*chosen.shape[:-1], nb, dtype=torch.bool).scatter_(-1, chosen, True)
    keep = selected[..., torch.arange(N) // block_size]
    return _dense_attention(q, k, v, keep)


@pytest.mark.parametrize("impl", ["mask", "gather"])
@pytest.mark.parametrize("N,block_size,topk_blocks", [(26, 5, 2), (37, 6, 3), (40, 8, 1)])
def test_moba_matches_direct_formula(impl, N, block_size, topk_blocks):
    q, k, v = _qkv(2, 2, N, 8)
    attn = MoBAAttention(16, num_heads=2, block_size=block_size, topk_blocks=topk_blocks, impl=impl, chunk_size=7)
    expected = _moba_direct(q, k, v, block_size, topk_blocks)
    assert_close(attn.attend(q, k, v), expected, 1e-12, f"moba {impl}")


@pytest.mark.parametrize("impl", ["mask", "gather"])
@pytest.mark.parametrize("block_size,topk_blocks", [(5, 4), (25, 8), (4, 1000)])
def test_moba_with_all_blocks_is_standard(impl, block_size, topk_blocks):
    std = StandardAttention(16, num_heads=2).double()
    moba = MoBAAttention(16, num_heads=2, block_size=block_size, topk_blocks=topk_blocks, impl=impl, chunk_size=6)
    moba.double().load_state_dict(std.state_dict())
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    assert_close(moba(x), std(x), 1e-12, "moba with every block vs standard")


def test_moba_gather_gradients_match_mask():
    q, k, v = _qkv(1, 2, 29, 8)
    grads = {}
    for impl in ("mask", "gather"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attn = MoBAAttention(16, num_heads=2, block_size=4, topk_blocks=2, impl=impl, chunk_size=5)
        out = attn.attend(*leaves)
        out.pow(2).sum().backward()
        grads[impl] = [out.detach()] + [t.grad for t in leaves]
    for a, b in zip(grads["gather"], grads["mask"]):
        assert_close(a, b, 1e-12, "moba gather vs mask")


def test_linear_matches_direct_formula():
    q, k, v = _qkv(2, 2, 19, 8)
    attn = LinearAttention(16, num_heads=2).double()
    with torch.no_grad():
        attn.lin_q_norm.weight.uniform_(0.5, 1.5)
        attn.lin_k_norm.weight.uniform_(0.5, 1.5)

    def rms(x, weight):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    fq = torch.relu(rms(q, attn.lin_q_norm.weight))
    fk = torch.relu(rms(k, attn.lin_k_norm.weight))
    sim = fq @ fk.transpose(-1, -2)  # [B, H, N, N], the unnormalised weights phi(q_i) . phi(k_j)
    expected = (sim @ v) / (sim.sum(-1, keepdim=True) + 1e-6)
    assert_close(attn.attend(q, k, v), expected.detach(), 1e-12, "linear")


def test_linear_accumulates_in_float32_under_autocast():
    attn = LinearAttention(32, num_heads=2)
    x = torch.randn(1, 17, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert torch.isfinite(out).all()
    assert_close(out, attn(x), 3e-2, "linear bf16 autocast vs fp32")


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("grid", [(14, 14), (10, 15)])
def test_forward_backward_with_dwc_and_gate(name, grid):
    torch.manual_seed(0)
    attn = create_attention(name, dim=32, num_heads=2, qkv_bias=True, dwc=True, gate=True)
    set_token_layout(attn, grid, 1)
    x = torch.randn(1, grid[0] * grid[1] + 1, 32, requires_grad=True)
    out = attn(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for pname, param in attn.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
    assert attn.dwc.weight.grad.abs().sum() > 0 and attn.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", [n for n in BASELINES if n != "standard"])
def test_unsupported_mask_and_causal_raise(name):
    attn = create_attention(name, dim=16, num_heads=2)
    x = torch.randn(1, 17, 16)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        attn(x, attn_mask=torch.ones(17, 17, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="is_causal"):
        attn(x, is_causal=True)


@pytest.mark.parametrize("name", BASELINES)
def test_bad_token_count_raises(name):
    # with dwc every variant reads the grid (agent also without it)
    attn = create_attention(name, dim=16, num_heads=2, dwc=True)
    set_token_layout(attn, (4, 4), 1)
    with pytest.raises(ValueError, match="N=18"):
        attn(torch.randn(1, 18, 16))
    if name == "agent":
        set_token_layout(attn, None, 1)
        with pytest.raises(ValueError, match="N=18"):
            AgentAttention(16, num_heads=2)(torch.randn(1, 18, 16))


def test_create_attention_and_registry():
    with pytest.raises(ValueError, match="unknown attention 'nope'.*standard"):
        create_attention("nope", dim=16)
    assert set(BASELINES) | {"mita"} <= set(ATTENTIONS)
    attn = create_attention("topk", dim=16, num_heads=2, qkv_bias=True, topk=3)
    assert isinstance(attn, TopkAttention) and attn.topk == 3 and attn.qkv.bias is not None
    assert ATTENTIONS["moba"] is MoBAAttention


def test_set_token_layout_reaches_every_attention():
    model = torch.nn.Sequential(create_attention("agent", dim=16, num_heads=2), torch.nn.Linear(16, 16),
                                create_attention("linear", dim=16, num_heads=2))
    assert set_token_layout(model, (3, 5), 2) == 2
    assert all(model[i].grid_size == (3, 5) and model[i].num_prefix_tokens == 2 for i in (0, 2))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        set_token_layout(model, (3, 5), -1)
    with pytest.raises(ValueError, match="grid_size"):
        set_token_layout(model, (0, 5), 1)


VARIANT_KW = {"topk": {"topk": 16}, "moba": {"block_size": 8}, "agent": {"num_agents": 9, "agent_bias": True}}


@pytest.mark.parametrize("name", BASELINES)
def test_swapped_into_timm_deit(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # 64 px -> a 4 x 4 patch grid + cls = 17 tokens; four blocks keep the test fast
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, depth=4, num_classes=10)
    for blk in model.blocks:
        old = blk.attn
        blk.attn = create_attention(name, dim=192, num_heads=3, qkv_bias=True, **VARIANT_KW.get(name, {}))
        blk.attn.load_state_dict(old.state_dict(), strict=False)
    assert set_token_layout(model, model.patch_embed.grid_size, model.num_prefix_tokens) == len(model.blocks)
    images = torch.randn(2, 3, 64, 64)
    logits = model(images)
    assert logits.shape == (2, 10)
    logits.logsumexp(-1).mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert torch.isfinite(model.blocks[0].attn.qkv.weight.grad).all()
