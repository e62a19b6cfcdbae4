"""Every attention under CPU bf16 autocast stays close to its fp32 output, with no NaN."""
import pytest
import torch

from mita.attention import ATTENTIONS, create_attention, set_token_layout
from tests.helpers import rel_err

# small sizes of each variant's budget so that selection happens on a 14 x 14 + 1 grid
KWARGS = {
    "agent": dict(num_agents=16, agent_bias=True),
    "moba": dict(block_size=16, topk_blocks=2),
    "topk": dict(topk=32),
    "mita": dict(num_landmarks=16, topk=16, router_topk=2),
}


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
@pytest.mark.parametrize("options", [dict(), dict(dwc=True, gate=True)], ids=["plain", "dwc_gate"])
def test_bf16_autocast_close_to_fp32(name, options):
    attn = create_attention(name, dim=64, num_heads=4, qkv_bias=True, **KWARGS.get(name, {}), **options).eval()
    set_token_layout(attn, (14, 14), 1)
    x = torch.randn(2, 197, 64)
    with torch.no_grad():
        # bf16 rounding can flip a top-k choice: feed the fp32 selection to the bf16 run
        attn.capture_routing = True
        ref = attn(x)
        attn.capture_routing, attn.routing = False, attn.last_routing
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x)
    assert torch.isfinite(out).all()
    assert rel_err(out.float(), ref) <= 2e-2
