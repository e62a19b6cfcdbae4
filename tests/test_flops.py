"""MAC and parameter counting (mita.utils.flops): exact on small modules, +-2% on the published models."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import mita.functional as functional
from mita.attention import create_attention, set_token_layout
from mita.functional import mita_attention, mita_attention_macs
from mita.landmarks import POOLS
from mita.utils.flops import count_flops, count_params, flop_formulas, flops_table, format_flops_table


class _Call(nn.Module):
    """Wraps a function so count_flops can run it as a model."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def test_linear_and_conv_are_counted_as_macs():
    lin = nn.Linear(8, 16)
    assert count_flops(lin, torch.randn(2, 5, 8)) == 2 * 5 * 8 * 16
    conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    assert count_flops(conv, torch.randn(1, 3, 6, 5)) == 6 * 5 * 4 * 3 * 9


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"attn_mask": torch.ones(7, 11, dtype=torch.bool)}])
def test_cpu_sdpa_counts_both_matmuls(kw):
    B, H, Nq, Nk, d = 2, 3, 7, 11, 8
    q = torch.randn(B, H, Nq, d)
    k, v = torch.randn(B, H, Nk, d), torch.randn(B, H, Nk, d)
    fn = _Call(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw))
    # q K^T and P V; causal and masked attention are counted dense, as torch counts them on CUDA.
    assert count_flops(fn, (q, k, v)) == 2 * B * H * Nq * Nk * d


def test_cpu_sdpa_backward_formula():
    q, k, v = (torch.randn(1, 2, 9, 4, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    bwd = [n for op, n in counts.items() if "for_cpu_backward" in op]
    assert bwd and bwd[0] > 0, counts
    assert counter.get_total_flops() > 2 * 2 * 2 * 9 * 9 * 4


def test_mita_attention_macs_matches_the_contract():
    B, H, N, d, m, k = 2, 3, 197, 64, 25, 25
    for r in (1, 2):
        assert mita_attention_macs(B, H, N, d, m, k, r, True) == B * H * (3 * m * N * d + 2 * N * (m + r * k) * d)
    # Without the shared expert the shared values are not computed.
    assert mita_attention_macs(B, H, N, d, m, k, 1, False) == B * H * (2 * m * N * d + 2 * N * k * d)
    # topk = 0: only the shared expert (landmark-key scores, shared values, m-key attention).
    assert mita_attention_macs(B, H, N, d, m, 0, 1, True) == B * H * (2 * m * N * d + 2 * N * m * d)


@pytest.mark.parametrize("topk,router_topk,shared", [(5, 1, True), (5, 2, True), (3, 1, False), (0, 1, True)])
def test_mita_op_is_counted_once_by_its_formula(topk, router_topk, shared):
    B, H, N, d, m = 2, 3, 29, 8, 4
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    landmarks = torch.randn(B, H, m, d)  # [B, H, m, d]
    fn = _Call(lambda q, k, v, r: mita_attention(q, k, v, r, topk, router_topk=router_topk, shared=shared))
    macs = count_flops(fn, (q, k, v, landmarks))
    assert macs == mita_attention_macs(B, H, N, d, m, topk, router_topk, shared)
    # The counting switch is off again afterwards: the op runs its normal path.
    assert not functional._COUNTING


def test_count_flops_restores_train_mode_and_takes_dict_inputs():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    model.train()
    assert count_flops(model, {"input": torch.randn(3, 4)}) == 3 * 16
    assert model.training
    with pytest.raises(ValueError, match="inputs"):
        count_flops(model, 3)


def _linear_macs(N, C, gate=False):
    return N * C * 3 * C + N * C * C + (N * C * C if gate else 0)  # qkv, proj, gate


@pytest.mark.parametrize("dwc,gate", [(False, False), (True, True)])
def test_standard_attention_module_macs(dwc, gate):
    C, H, h, w = 32, 4, 4, 5
    N = h * w + 1
    attn = create_attention("standard", dim=C, num_heads=H, qkv_bias=True, dwc=dwc, gate=gate)
    set_token_layout(attn, (h, w), 1)
    expected = _linear_macs(N, C, gate) + 2 * N * N * C + (9 * C * h * w if dwc else 0)
    assert count_flops(attn, torch.randn(1, N, C)) == expected


def test_mita_attention_module_macs():
    C, H, h, w, m, k = 32, 4, 6, 6, 4, 5
    N = h * w + 1
    attn = create_attention("mita", dim=C, num_heads=H, qkv_bias=True, num_landmarks=m, topk=k)
    set_token_layout(attn, (h, w), 1)
    expected = _linear_macs(N, C) + mita_attention_macs(1, H, N, C // H, m, k)
    assert count_flops(attn, torch.randn(1, N, C)) == expected


@pytest.mark.parametrize("pool", POOLS)
def test_mita_attention_macs_count_with_every_landmark_extractor(pool):
    # The learned extractor returns a view of its parameter; under no_grad that view requires grad
    # without a grad_fn, which FlopCounterMode's module tracker rejects unless the extractor detaches it.
    C, H, h, w, m, k = 32, 4, 14, 14, 4, 5  # the conv extractors' windows assume DeiT's 14 x 14 grid
    N = h * w + 1
    attn = create_attention("mita", dim=C, num_heads=H, qkv_bias=True, num_landmarks=m, topk=k, pool=pool)
    set_token_layout(attn, (h, w), 1)
    assert count_flops(attn, torch.randn(1, N, C)) >= _linear_macs(N, C) + mita_attention_macs(1, H, N, C // H, m, k)


def test_count_params_counts_shared_tensors_once():
    lin = nn.Linear(3, 5)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert count_params(model) == 3 * 5 + 5
    lin.bias.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 15


# Honest counts (every matmul, spec section 4) at 224x224 and 1000 classes: (GMACs, M params).
HONEST = {
    "deit_tiny_patch16_224": (1.26, 5.7),
    "deit_small_patch16_224": (4.61, 22.0),
    "mita_deit_tiny_patch16_224": (1.16, 5.7),
    "mita_dwc_deit_tiny_patch16_224": (1.16, 5.7),
    "mita_deit_small_patch16_224": (4.41, 22.0),
    "mita_dwc_deit_small_patch16_224": (4.42, 22.1),
    "mita_dwc_gate_deit_small_patch16_224": (4.76, 23.8),
    # The spec gives no honest count for ViT-5; the published 4.5 G is within a truncation of it.
    "mita_vit5_small": (4.5, 22.0),
    "mita_dwc_vit5_small": (4.5, 22.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HONEST))
def test_published_models_macs_and_params(name):
    row = flops_table([name])[0]
    gmacs, mparams = HONEST[name]
    assert row["gmacs"] == pytest.approx(gmacs, rel=0.02), row
    assert row["mparams"] == pytest.approx(mparams, rel=0.02), row
    published = row["published_gflops"]
    # The published FLOPs are the honest count cut to one decimal (DeiT's are rounded).
    assert published is not None and abs(published - row["gmacs"]) < 0.1, row


def test_standard_attention_swapped_in_counts_as_timm():
    import timm

    from mita.models import build_model

    x = torch.randn(1, 3, 224, 224)
    swapped = count_flops(build_model("deit_tiny_patch16_224", attention="standard"), x)
    assert swapped == count_flops(timm.create_model("deit_tiny_patch16_224"), x)
    assert swapped / 1e9 == pytest.approx(1.26, rel=0.02)


def test_every_registered_zoo_name_is_in_the_published_table():
    from mita.models import ZOO_MODELS

    # A zoo row without an expected count would silently escape the checks above.
    published = [name for name in ZOO_MODELS if name.startswith("mita_")]
    assert published and sorted(published) == sorted(n for n in HONEST if n.startswith("mita_"))


def test_format_flops_table():
    rows = [{"model": "m", "input_size": (3, 224, 224), "gmacs": 1.159, "mparams": 5.72,
             "published_gflops": 1.1, "published_mparams": None}]
    table = format_flops_table(rows).splitlines()
    assert table[0].startswith("| model |") and len(table) == 3
    assert table[2] == "| m | 224x224 | 1.159 | 1.1 | 5.72 | — |"
