"""mita.models: build_model, swap_attention, the token-layout hook, ViT-5 and the registered zoo names."""
import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import RmsNormFp32

import mita.models
from mita.attention import ATTENTIONS, AttentionBase, MiTAAttention, StandardAttention
from mita.models import ZOO_MODELS, build_model, swap_attention
from mita.models.vit import TokenLayoutHook
from tests.helpers import rel_err

# Tiny versions of every architecture: width 32, 2 heads, one block. 128 px at patch 16 is an 8 x 8 grid,
# the smallest that keeps every zoo row's defaults valid (25 landmarks, top-k 50 keys).
TINY = dict(img_size=128, embed_dim=32, num_heads=2, depth=1, num_classes=10)


def _layout_hooks(model):
    return [h for h in model.patch_embed._forward_hooks.values() if isinstance(h, TokenLayoutHook)]


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_name_builds_and_trains(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **TINY)
    assert all(isinstance(blk.attn, AttentionBase) for blk in model.blocks)
    assert model.pretrained_cfg["architecture"] == name
    x = torch.randn(2, 3, 128, 128)
    out = model(x)  # [B, num_classes]
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_zoo_rows_use_the_official_settings():
    deit = timm.create_model("mita_dwc_gate_deit_small_patch16_224", depth=1)
    attn = deit.blocks[0].attn
    assert isinstance(attn, MiTAAttention) and attn.dim == 384 and attn.num_heads == 6
    assert (attn.num_landmarks, attn.topk, attn.pool, attn.shared_scale) == (25, 25, "official", "official")
    assert attn.dwc is not None and attn.gate is not None
    vit5 = timm.create_model("mita_dwc_vit5_small", depth=1)
    attn = vit5.blocks[0].attn
    assert (attn.num_landmarks, attn.topk, attn.pool, attn.shared_scale) == (25, 30, "grid", "official")
    assert attn.dwc is not None and attn.gate is None
    override = timm.create_model("mita_deit_tiny_patch16_224", depth=1, attention_kwargs=dict(topk=36))
    assert override.blocks[0].attn.topk == 36 and override.blocks[0].attn.pool == "official"


def test_zoo_refuses_pretrained():
    with pytest.raises(ValueError, match="load_checkpoint"):
        timm.create_model("mita_deit_tiny_patch16_224", pretrained=True)
    with pytest.raises(ValueError, match="load_checkpoint"):
        timm.create_model("vit5_small", pretrained=True)


def test_bad_arch_and_attention_names():
    with pytest.raises(ValueError, match="unknown arch 'deit_nano_patch16_224'"):
        build_model("deit_nano_patch16_224")
    with pytest.raises(ValueError, match="not a ViT"):
        build_model("resnet18")
    with pytest.raises(ValueError, match="unknown attention"):
        build_model("deit_tiny_patch16_224", attention="flash", depth=1)
    with pytest.raises(ValueError, match="pretrained_path"):
        build_model("deit_tiny_patch16_224", pretrained=True)


def test_swap_standard_to_standard_keeps_logits():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=2).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
        swap_attention(model, "standard")
        after = model(x)
    assert all(isinstance(blk.attn, StandardAttention) for blk in model.blocks)
    assert rel_err(after, before) < 1e-5


def test_swap_reuses_weights_and_keeps_device_dtype():
    torch.manual_seed(0)
    model = build_model("deit_tiny_patch16_224", attention="mita", depth=2, attention_kwargs=dict(dwc=True))
    model = model.double()
    old = model.blocks[1].attn
    swap_attention(model, "agent", dwc=True, gate=True)
    new = model.blocks[1].attn
    assert new.qkv.weight.dtype == torch.float64 and new.qkv.weight.device == old.qkv.weight.device
    for name in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "dwc.weight", "dwc.bias"):
        assert torch.equal(new.state_dict()[name], old.state_dict()[name]), name
    assert new.qkv.bias is not None and new.gate is not None
    assert len(_layout_hooks(model)) == 1  # swapping again does not stack hooks
    out = model(torch.randn(1, 3, 224, 224, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_swap_infers_vit5_norms():
    model = timm.create_model("vit5_small", **TINY)
    with torch.no_grad():
        model.blocks[0].attn.q_norm.weight.uniform_()
    q_norm = model.blocks[0].attn.q_norm.weight.clone()
    swap_attention(model, "mita", topk=8, num_landmarks=4)
    attn = model.blocks[0].attn
    assert isinstance(attn.q_norm, RmsNormFp32) and attn.q_norm.eps == 1e-6
    assert attn.qkv.bias is None and isinstance(attn.norm, nn.Identity)
    assert torch.equal(attn.q_norm.weight, q_norm)


def test_swap_refuses_models_without_blocks():
    with pytest.raises(ValueError, match="VisionTransformer"):
        swap_attention(nn.Linear(4, 4), "standard")


def test_dynamic_img_size_follows_the_grid():
    torch.manual_seed(0)
    model = build_model("deit_tiny_patch16_224", attention="mita", depth=2, dynamic_img_size=True, num_classes=10)
    attn = model.blocks[0].attn
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)
    assert attn.grid_size == (14, 14) and attn.num_prefix_tokens == 1
    out = model(torch.randn(1, 3, 288, 224))
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    assert attn.grid_size == (18, 14)


def test_distilled_deit_has_two_prefix_tokens():
    model = build_model("deit_tiny_distilled_patch16_224", attention="mita", **TINY).eval()
    out = model(torch.randn(2, 3, 128, 128))
    assert out.shape == (2, 10)
    assert model.blocks[0].attn.num_prefix_tokens == 2 and model.blocks[0].attn.grid_size == (8, 8)


def test_deepcopy_hook_follows_the_copy():
    model = build_model("deit_tiny_patch16_224", attention="mita", depth=1, dynamic_img_size=True)
    model(torch.randn(1, 3, 224, 224))
    ema = copy.deepcopy(model)
    ema(torch.randn(1, 3, 160, 224))
    assert ema.blocks[0].attn.grid_size == (10, 14)
    assert model.blocks[0].attn.grid_size == (14, 14)
    assert _layout_hooks(ema)[0].model is ema


def test_every_attention_builds():
    for name in ATTENTIONS:
        model = build_model("deit_tiny_patch16_224", attention=name, **TINY)
        assert model(torch.randn(1, 3, 128, 128)).shape == (1, 10), name


def test_vit5_small_architecture():
    model = timm.create_model("vit5_small", depth=2)
    assert isinstance(model, mita.models.ViT5)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (384, 2, 6)
    assert model.num_prefix_tokens == 5 and model.num_reg_tokens == 4
    assert model.pos_embed.shape == (1, 196, 384)  # patches only
    blk = model.blocks[0]
    assert isinstance(blk.norm1, RmsNormFp32) and isinstance(model.norm, RmsNormFp32)
    assert isinstance(blk.attn, StandardAttention) and isinstance(blk.attn.q_norm, RmsNormFp32)
    assert blk.attn.qkv.bias is None and blk.attn.proj.bias is not None
    assert torch.all(blk.ls1.gamma == 1e-4) and torch.all(blk.ls2.gamma == 1e-4)
    assert isinstance(blk.mlp.act, nn.GELU) and blk.mlp.fc1.out_features == 4 * 384
    full = timm.create_model("vit5_small")
    assert 21.5e6 < sum(p.numel() for p in full.parameters()) < 22.5e6


def test_vit5_uniform_drop_path():
    model = timm.create_model("vit5_small", depth=3, drop_path_rate=0.1)
    assert [blk.drop_path1.drop_prob for blk in model.blocks] == [0.1, 0.1, 0.1]


def _official_rope(x, pt_seq_len, theta):
    """The official ViT-5 rotary embedding, written out: x [B, L*L, H, d] in raster order."""
    d = x.shape[-1]
    dim = d // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    side = int(math.sqrt(x.shape[1]))
    t = torch.arange(side) / side * pt_seq_len
    f = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # [L, d/2]
    f = torch.cat([f[:, None].expand(side, side, dim), f[None].expand(side, side, dim)], dim=-1)
    f = f.reshape(side * side, 1, d)
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * f.cos() + rotated * f.sin()


@pytest.mark.parametrize("img_size", [224, 160])
def test_vit5_rope_matches_the_official_formula(img_size):
    torch.manual_seed(0)
    model = timm.create_model("vit5_small", depth=1, dynamic_img_size=True).eval()
    attn = model.blocks[0].attn
    model(torch.randn(1, 3, img_size, img_size))
    side = img_size // 16
    x = torch.randn(2, 5 + side * side, 384)
    q, k, _ = attn.project_qkv(x)  # [B, H, N, d], timm order [cls, 4 registers, patches]

    B, N, C = x.shape
    ref = attn.qkv(x).reshape(B, N, 3, 6, 64)[:, :, 0]  # [B, N, H, d]
    ref = attn.q_norm(ref)
    ref = torch.cat([ref[:, :1], _official_rope(ref[:, 1:5], 2, 100.0), _official_rope(ref[:, 5:], 14, 10000.0)], 1)
    assert rel_err(q, ref.transpose(1, 2)) < 1e-6


def test_vit5_forward_at_other_sizes():
    model = timm.create_model("vit5_small", **dict(TINY, dynamic_img_size=True))
    assert model(torch.randn(1, 3, 128, 128)).shape == (1, 10)
    assert model(torch.randn(1, 3, 160, 128)).shape == (1, 10)
    assert model.blocks[0].attn.rope.shape == (5 + 10 * 8, 32)


def test_vit5_mita_lands_on_patches():
    model = build_model("vit5_small", attention="mita", attention_kwargs=dict(topk=30), **TINY)
    out = model(torch.randn(2, 3, 128, 128))
    assert out.shape == (2, 10)
    assert model.blocks[0].attn.num_prefix_tokens == 5
