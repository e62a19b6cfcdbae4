"""The shared values split over the keys (kernels/shared.py) against float64 PyTorch, forward and backward.

Without CUDA the kernels run in Triton's interpreter (small shapes; several key chunks and landmark blocks
forced by a small config); on a GPU the ``gpu`` tests take the real configs at larger N.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from mita import kernels  # noqa: E402
from mita.kernels import shared  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.available(), reason="Triton kernels unavailable here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(landmarks, k, v, scale):
    return torch.softmax(scale * landmarks @ k.transpose(-1, -2), dim=-1) @ v


def _inputs(B, H, N, m, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(DEVICE, dtype)  # k, v as strided views, as in a ViT
    landmarks = torch.randn(B, H, m, d, generator=g).to(DEVICE, dtype)
    _, k, v = qkv.permute(2, 0, 3, 1, 4)
    return [landmarks.requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_()]


def _check(B, H, N, m, d, dtype=torch.float32, tol=1e-5, seed=0, cfg=None, monkeypatch=None):
    if cfg is not None:
        monkeypatch.setattr(shared, "config", lambda *a: cfg)
    inputs = _inputs(B, H, N, m, d, dtype, seed)
    ref_in = [x.detach().double().requires_grad_() for x in inputs]
    scale = d ** -0.5
    out = shared.shared_values(*inputs, scale)
    ref = _reference(*ref_in, scale)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) <= tol
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, grad.to(DEVICE, dtype))
    want = torch.autograd.grad(ref, ref_in, grad.to(DEVICE))
    for name, a, b in zip(("dR", "dK", "dV"), got, want):
        assert a.dtype == dtype and rel_err(a, b) <= tol, f"{name}: {rel_err(a, b):.1e}"


# BM = BN = 16 and chunks of 32 keys: N = 100 spans 4 chunks with a short last one, m = 33 three blocks
SMALL = {"BM": 16, "BN": 16, "CHUNK": 32, "num_warps": 4}


@pytest.mark.parametrize("B,H,N,m", [(1, 1, 1, 1), (2, 1, 17, 5), (1, 2, 100, 33), (1, 1, 64, 16), (2, 2, 33, 2)])
def test_matches_reference(monkeypatch, B, H, N, m):
    _check(B, H, N, m, 32, seed=N + m, cfg=SMALL if DEVICE == "cpu" else None, monkeypatch=monkeypatch)


def test_one_chunk_and_default_config(monkeypatch):
    # the config's own choice (one chunk at this size) and a chunk as long as the sequence
    _check(1, 2, 40, 7, 32, seed=3)
    _check(1, 2, 40, 7, 32, seed=4, cfg={**SMALL, "CHUNK": 48}, monkeypatch=monkeypatch)


def test_config_fills_the_card():
    cfg = shared.config(16, 65536, 128, 64)
    programs = 16 * (-(-65536 // cfg["CHUNK"])) * (-(-128 // cfg["BM"]))
    assert programs >= shared._TARGET_PROGRAMS and cfg["CHUNK"] % cfg["BN"] == 0


@pytest.mark.parametrize("G,N,m", [(2, 4096, 64), (8, 4096, 128), (1, 1024, 64), (16, 16384, 256), (1, 300, 100)])
def test_config_chunks_bound_the_partial_memory(G, N, m):
    # few heads take more chunks, but the backward's float32 dR partials [G, chunks, m, d] stay within a quarter
    # of one 16-bit [G, N, d] input (or one chunk)
    cfg = shared.config(G, N, m, 64)
    chunks = -(-N // cfg["CHUNK"])
    assert chunks == 1 or chunks * m * 4 <= N * 2 / 4


@pytest.mark.parametrize("B,H,N,m,over", [(1, 1, 1, 1, {}), (2, 1, 17, 5, {"BN": 16, "KPP": 2}),
                                           (1, 2, 100, 33, {"BN": 16, "KPP": 3}), (2, 2, 70, 100, {"BN": 16, "KPP": 2}),
                                           (1, 2, 100, 7, {})])
@pytest.mark.parametrize("add", [False, True])
def test_resident_keys_backward(monkeypatch, B, H, N, m, over, add):
    """mita.kernels.SHARED_RESIDENT: dK, dV from programs that load every landmark once and go through several
    key blocks (groups of 2-3 blocks of 16 keys, a short last group; m up to 100), fresh or added into given
    gradients: the same as the key-block programs, fp16."""
    from mita import kernels

    monkeypatch.setattr(shared, "config", lambda *a: SMALL)
    B_, d, dtype = B, 32, torch.float16
    landmarks, k, v = (x.detach() for x in _inputs(B_, H, N, m, d, dtype, seed=N + m))
    scale = d ** -0.5
    vs, lse = shared.forward(landmarks, k, v, scale)
    grad_vs = torch.randn(vs.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    g = torch.Generator().manual_seed(4)
    base = [torch.randn(B_, H, N, d, generator=g).to(DEVICE, dtype) for _ in range(2)]
    into = tuple(t.clone() for t in base) if add else None
    want = shared.backward(landmarks, k, v, vs, lse, grad_vs, scale, into=into)
    launched = []
    config = shared.resident_keys_config
    monkeypatch.setattr(kernels, "SHARED_RESIDENT", True)
    monkeypatch.setattr(shared, "resident_keys_config", lambda *a: launched.append(a) or dict(config(*a), **over))
    into = tuple(t.clone() for t in base) if add else None
    got = shared.backward(landmarks, k, v, vs, lse, grad_vs, scale, into=into)
    assert launched
    for name, a, b in zip(("dR", "dK", "dV"), got, want):
        assert rel_err(a, b) <= 2e-3, f"{name}: {rel_err(a, b):.1e}"


@pytest.mark.parametrize("B,H,N,m", [(1, 2, 100, 33), (2, 1, 70, 40)])
def test_landmark_blocks_of_their_own(monkeypatch, B, H, N, m):
    """``LM_BM``: the launches that loop over the keys (forward partials and combine, dR) take landmark blocks of
    their own size (32 here), the dK, dV launch its ``BM`` (16): the same results."""
    _check(B, H, N, m, 32, seed=N + m + 1, cfg={**SMALL, "LM_BM": 32, "LM_WARPS": 4}, monkeypatch=monkeypatch)


def test_config_with_shared_resident(monkeypatch):
    from mita import kernels

    monkeypatch.setattr(kernels, "SHARED_RESIDENT", True)
    c = shared.config(16, 65536, 128, 64, 2)
    assert (c["BM"], c["LM_BM"], c["LM_WARPS"]) == (64, 128, 8) and c["CHUNK"] % c["BN"] == 0
    assert 16 * (-(-65536 // c["CHUNK"])) >= shared._TARGET_PROGRAMS  # one landmark block: chunks fill the card
    assert "LM_BM" not in shared.config(16, 65536, 64, 64, 2) and "LM_BM" not in shared.config(16, 65536, 128, 64, 4)


def test_resident_keys_config():
    c = shared.resident_keys_config(16, 65536, 128, 64, 2)
    assert (c["MP"], c["BN"]) == (128, 32) and c["KPP"] == 16
    assert shared.resident_keys_config(16, 16384, 64, 64, 2)["BN"] == 64
    assert shared.resident_keys_config(384, 1025, 49, 64, 2)["KPP"] == 12
    assert shared.resident_keys_config(16, 65536, 256, 64, 2) is None
    assert shared.resident_keys_config(16, 65536, 128, 128, 2) is None
    assert shared.resident_keys_config(16, 65536, 64, 64, 4) is None
    assert shared.resident_keys_config(16, 65536, 200, 32, 2) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_adds_into_given_gradients(monkeypatch, dtype):
    """``backward(into=(dK, dV))`` adds the shared values' dK, dV onto the given tensors in place (the general
    path's routed gradients), rounding once; ``into=(None, None)`` writes fresh ones."""
    monkeypatch.setattr(shared, "config", lambda *a: SMALL)
    B, H, N, m, d = 2, 2, 37, 5, 32
    landmarks, k, v = (x.detach() for x in _inputs(B, H, N, m, d, dtype, seed=7))
    scale = d ** -0.5
    vs, lse = shared.forward(landmarks, k, v, scale)
    grad_vs = torch.randn(vs.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE, dtype)
    dr, dk, dv = shared.backward(landmarks, k, v, vs, lse, grad_vs, scale)
    g = torch.Generator().manual_seed(9)
    base_k, base_v = (torch.randn(B, H, N, d, generator=g).to(DEVICE, dtype) for _ in range(2))
    into = (base_k.clone(), base_v.clone())
    dr2, dk2, dv2 = shared.backward(landmarks, k, v, vs, lse, grad_vs, scale, into=into)
    assert dk2.data_ptr() == into[0].data_ptr() and dv2.data_ptr() == into[1].data_ptr()
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert rel_err(dk2, base_k.double() + dk.double()) <= tol and rel_err(dv2, base_v.double() + dv.double()) <= tol
    assert torch.equal(dr2, dr)
    _, dk3, dv3 = shared.backward(landmarks, k, v, vs, lse, grad_vs, scale, into=(None, None))
    assert torch.equal(dk3, dk) and torch.equal(dv3, dv)
    with pytest.raises(ValueError, match="into must hold contiguous dK, dV of"):
        shared.backward(landmarks, k, v, vs, lse, grad_vs, scale, into=(base_k.transpose(2, 3), base_v))


def test_custom_ops_fake_kernels(monkeypatch):
    # the split runs behind torch custom ops (opaque under torch.compile): their fake kernels give the real
    # ops' shapes, dtypes and strides (k, v strided views of a qkv projection; outputs contiguous)
    monkeypatch.setattr(shared, "config", lambda *a: SMALL)
    landmarks, k, v = (x.detach() for x in _inputs(1, 2, 40, 7, 32, torch.float32, seed=5))
    torch.library.opcheck(shared.shared_values_fwd, (landmarks, k, v, 0.2, False),
                          test_utils=("test_schema", "test_faketensor"))
    vs, lse = shared.shared_values_fwd(landmarks, k, v, 0.2, False)
    torch.library.opcheck(shared.shared_values_bwd, (landmarks, k, v, vs, lse, torch.randn_like(vs), 0.2, False),
                          test_utils=("test_schema", "test_faketensor"))

def test_fp32_config_fits_shared_memory():
    # fp32 at d = 128 with the bf16 blocks (64 x 32) asked 238 KB of shared memory from an H200 (232 KB):
    # fp32 takes 16-landmark blocks, bf16 keeps its own
    f32, bf16 = shared.config(16, 3000, 49, 128, 4), shared.config(16, 3000, 49, 128, 2)
    assert (f32["BM"], f32["BN"]) == (16, 32) and (bf16["BM"], bf16["BN"]) == (64, 32)
    assert shared.config(16, 3000, 49, 64, 4)["BM"] == 16 and f32["CHUNK"] % f32["BN"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestGPU:
    @pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-2), (torch.float32, 1e-5)])
    @pytest.mark.parametrize("N,m,d", [(4097, 64, 64), (16384, 128, 64), (3000, 49, 128), (1025, 7, 32)])
    def test_matches_reference(self, N, m, d, dtype, tol):
        _check(2, 2, N, m, d, dtype=dtype, tol=tol, seed=N)

    @pytest.mark.parametrize("N,m,d", [(4097, 64, 64), (16384, 128, 64), (3000, 49, 128), (1025, 100, 32)])
    def test_resident_keys_backward(self, monkeypatch, N, m, d):
        from mita import kernels

        monkeypatch.setattr(kernels, "SHARED_RESIDENT", True)
        assert shared.resident_keys_config(4, N, m, d, 2) is not None
        _check(2, 2, N, m, d, dtype=torch.bfloat16, tol=1e-2, seed=N + 1)


def test_every_buffer_element_written(monkeypatch):
    # buffers and outputs start as NaN: an element the kernels leave unwritten (or read past) shows up
    monkeypatch.setattr(shared, "config", lambda *a: SMALL)
    poison = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)  # noqa: E731
    landmarks, k, v = (x.detach() for x in _inputs(2, 1, 50, 20, 32, torch.float32, seed=9))
    scale = 32 ** -0.5
    vs, lse = shared.forward(landmarks, k, v, scale, alloc=poison)
    assert rel_err(vs, _reference(landmarks.double(), k.double(), v.double(), scale)) <= 1e-5
    grad = torch.randn(vs.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for got in shared.backward(landmarks, k, v, vs, lse, grad, scale, alloc=poison):
        assert torch.isfinite(got).all()
