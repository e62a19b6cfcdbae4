"""Triton kernels (mita.kernels) against the float64 reference of the op, outputs and gradients.

Without CUDA the kernels run in Triton's interpreter on CPU tensors at tiny shapes (TRITON_INTERPRET must
be set before Triton is first imported, hence at the top of this module). With CUDA the same tests
compile the kernels for the device, and the `gpu` class adds the real sizes and dtypes.
Both sides get the same routing (`routing=`), since rounding can flip a top-k choice.
"""
import itertools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mita import kernels  # noqa: E402
from mita.functional import mita_attention  # noqa: E402
from mita.kernels import launch as launch_mod  # noqa: E402
from tests.helpers import attention_inputs, rel_err, saved_storages  # noqa: E402
from tests.helpers import input_grads as _grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.available(), reason="Triton kernels unavailable here")


@pytest.fixture(autouse=True)
def _poison_buffers(monkeypatch):
    """Kernel output buffers start as NaN, so an element a kernel fails to write shows up; the general
    kernels take every case here (tests/test_kernels_small.py covers the fused short-sequence path)."""
    from mita.kernels import ops

    monkeypatch.setattr(ops, "_POISON", True)
    monkeypatch.setattr(kernels, "FUSED_SMALL", False)


def _inputs(B, H, N, d, m, dtype, seed=0, device=DEVICE):
    return attention_inputs(B, H, N, d, m, dtype, seed, device)


def _compare(B, H, N, d, m, topk, r, shared, scale, dtype=torch.float32, tol=1e-5, seed=0,
             transform=None, allow_tf32=False):
    """Kernel vs float64 reference on the same (rounded) inputs and routing; ``transform`` e.g. makes views."""
    inputs = _inputs(B, H, N, d, m, dtype, seed)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    kw = dict(router_topk=r, shared=shared, shared_scale=scale)
    ref, routing = mita_attention(*ref_inputs, topk, impl="reference", return_routing=True, **kw)
    fed = inputs if transform is None else [transform(x) for x in inputs]
    if allow_tf32:
        c = 1.0 / d if scale == "official" else d ** -0.5
        out = kernels.mita_attention(*fed, *routing, shared, c, allow_tf32=True)
    else:
        out = mita_attention(*fed, topk, impl="triton", routing=routing, **kw)
    assert out.shape == (B, H, N, d) and out.dtype == dtype
    err = rel_err(out, ref)
    assert err <= tol, f"out: relative error {err:.2e} > {tol:.0e}"

    grad_out = torch.randn(B, H, N, d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grad_out = grad_out.to(ref.device)
    _assert_grads(out, inputs, ref, ref_inputs, grad_out, dtype, tol)


def _assert_grads(out, inputs, ref, ref_inputs, grad_out, dtype, tol):
    """Gradients of q, k, v and the landmarks against the float64 reference's, given ``grad_out``."""
    ref_grads = _grads(ref, ref_inputs, grad_out)
    grads = _grads(out, inputs, grad_out.to(device=out.device, dtype=dtype))
    scale_g = grad_out.norm().item()
    for name, a, b in zip("q k v landmarks".split(), grads, ref_grads):
        assert a.dtype == dtype
        # e.g. N = 1 (all values equal v_0) or no shared expert (landmarks only select): the gradient is 0
        if b.norm().item() <= 1e-9 * scale_g:
            assert torch.isfinite(a).all() and a.double().norm().item() <= tol * scale_g, f"d{name} should vanish"
        else:
            err = rel_err(a, b)
            assert err <= tol, f"d{name}: relative error {err:.2e} > {tol:.0e}"


def _small_cases():
    """N x m x topk (topk <= N); r, shared, scale and B cycled so each pair of values with r shows up."""
    cases = []
    for i, (N, m, topk) in enumerate(
        c for c in itertools.product([1, 17, 50], [3, 5], [0, 1, 4, 7]) if c[2] <= c[0]
    ):
        r = 1 + (i // 3) % 2
        shared = topk == 0 or i % 4 != 3  # topk = 0 keeps only the shared expert, which must be on
        scale = ("official", "paper")[(i // 2) % 2]
        B = 1 + (i // 5) % 2
        cases.append((N, m, topk, r, shared, scale, B))
    return cases


@pytest.mark.parametrize("N,m,topk,r,shared,scale,B", _small_cases())
def test_matches_reference(N, m, topk, r, shared, scale, B):
    _compare(B, 2, N, 32, m, topk, r, shared, scale, seed=N + m + topk)


@pytest.mark.parametrize("shared", [True, False])
def test_several_query_and_key_blocks(shared):
    # 150 entries of two experts (r = 2, m = 2): tiles of 150 queries span 3 query blocks of 64,
    # and 70 keys span 2 key blocks of 64 (online softmax across blocks, masked tail)
    _compare(1, 1, 150, 32, 2, 70, 2, shared, "paper")


def test_half_precision():
    # fp16 only: Triton 3.8's interpreter computes bf16 tl.dot wrongly (the GPU class covers bf16)
    _compare(1, 2, 50, 32, 5, 7, 2, True, "official", dtype=torch.float16, tol=1e-2)


def test_non_contiguous_inputs():
    def strided(x):
        # [B, N, H, d] storage seen as [B, H, N, d], as timm's qkv reshape produces
        y = x.transpose(1, 2).contiguous().transpose(1, 2)
        assert not y.is_contiguous()
        return y

    _compare(2, 2, 17, 32, 3, 4, 2, True, "official", transform=strided)


@pytest.mark.parametrize("topk,r,shared", [(4, 1, True), (4, 2, True), (5, 2, False), (0, 1, True)])
def test_reads_a_vits_interleaved_qkv_views_in_place(topk, r, shared):
    """q, k, v as views of one [B, N, 3, H, d] projection (batch 2, so the batch and head strides both matter)
    and a token-major output gradient, as a ViT's projection passes it back: the kernels read them by their
    strides without copying; values and gradients against the float64 reference on the same routing."""
    B, H, N, d, m = 2, 2, 23, 32, 4
    g = torch.Generator().manual_seed(11 + topk + r)
    qkv = torch.randn(B, N, 3, H, d, generator=g, dtype=torch.float64)
    landmarks = qkv[:, 1:1 + m, 0].transpose(1, 2).contiguous()  # [B, H, m, d]
    kw = dict(router_topk=r, shared=shared, shared_scale="official")
    ref_qkv, ref_lm = qkv.clone().requires_grad_(), landmarks.clone().requires_grad_()
    ref, routing = mita_attention(*ref_qkv.permute(2, 0, 3, 1, 4), ref_lm, topk, impl="reference",
                                  return_routing=True, **kw)
    routing = tuple(t.to(DEVICE) for t in routing)
    x, lm = qkv.float().to(DEVICE).requires_grad_(), landmarks.float().to(DEVICE).requires_grad_()
    q, k, v = x.permute(2, 0, 3, 1, 4)  # [B, H, N, d] each, strided
    assert not q.is_contiguous() and q.stride(1) == d and q.stride(2) == 3 * H * d
    out = mita_attention(q, k, v, lm, topk, impl="triton", routing=routing, **kw)
    assert out.transpose(1, 2).is_contiguous() and rel_err(out, ref) <= 1e-5
    grad = torch.randn(B, N, H, d, generator=g, dtype=torch.float64)  # the projection's layout
    ref.backward(grad.transpose(1, 2))
    out.backward(grad.float().to(DEVICE).transpose(1, 2))
    assert rel_err(x.grad, ref_qkv.grad) <= 1e-5
    if shared:
        assert rel_err(lm.grad, ref_lm.grad) <= 1e-5


def test_empty_experts_and_duplicate_keys():
    # all queries on expert 0 (other experts empty); experts 0 and 1 share keys, r = 2 picks both
    B, H, N, d, m, topk = 1, 2, 17, 32, 5, 4
    inputs = _inputs(B, H, N, d, m, torch.float32)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    topk_idx = torch.arange(topk, device=DEVICE).expand(B, H, m, topk).contiguous()
    expert_idx = torch.tensor([0, 1], device=DEVICE).expand(B, H, N, 2).contiguous()
    kw = dict(router_topk=2, routing=(topk_idx, expert_idx))
    out = mita_attention(*inputs, topk, impl="triton", **kw)
    ref = mita_attention(*ref_inputs, topk, impl="reference", **kw)
    assert rel_err(out, ref) <= 1e-5
    grad_out = torch.randn_like(ref)
    for a, b in zip(_grads(out, inputs, grad_out.float()), _grads(ref, ref_inputs, grad_out)):
        assert rel_err(a, b) <= 1e-5


def _routing(kind, B, H, N, m, topk, r, seed):
    """A routing passed in: ``topk_idx [B, H, m, topk]``, ``expert_idx [B, H, N, r]`` (distinct experts)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "duplicates":  # keys drawn with replacement: repeats inside one expert's list
        topk_idx = torch.randint(0, N, (B, H, m, topk), generator=g)
        topk_idx[..., 0, :2] = topk_idx[..., 0, :1]  # at least one repeat
    elif kind == "one_key":  # every slot of every expert holds key N - 1: m topk pairs for one key
        topk_idx = torch.full((B, H, m, topk), N - 1)
    else:  # "shared_keys": every expert holds the same keys, the last ones
        topk_idx = (N - 1 - torch.arange(topk)).expand(B, H, m, topk).contiguous()
    # the first expert takes every query (it spans several tiles); the second slot goes to the next expert,
    # so with m > r experts the rest stay empty
    expert_idx = (torch.arange(r)).expand(B, H, N, r).contiguous()
    if kind == "duplicates" and N > 1:  # and a few queries elsewhere
        expert_idx = expert_idx.clone()
        expert_idx[..., ::3, 0] = m - 1
        expert_idx[..., ::3, r - 1] = (m - 1 + r - 1) % m
    return topk_idx.to(DEVICE), expert_idx.to(DEVICE)


@pytest.mark.parametrize("kind,B,N,m,topk,r,shared,dtype", [
    ("duplicates", 1, 50, 5, 7, 1, True, torch.float32),
    ("duplicates", 2, 17, 3, 4, 2, False, torch.float32),
    ("duplicates", 1, 2, 3, 2, 2, True, torch.float32),
    ("duplicates", 2, 1, 2, 1, 1, True, torch.float32),
    ("one_key", 1, 50, 5, 3, 2, True, torch.float32),
    ("one_key", 2, 17, 4, 5, 1, False, torch.float32),
    ("shared_keys", 1, 50, 6, 20, 1, False, torch.float32),
    ("shared_keys", 2, 2, 5, 2, 2, True, torch.float32),
    # 4 m topk > N: the partials are kept in the input dtype, in chunks of experts where m topk > N (kernels/README.md)
    ("duplicates", 1, 17, 5, 7, 2, True, torch.float16),
    ("shared_keys", 2, 50, 6, 10, 1, False, torch.float16),
])
def test_routed_dkdv_on_awkward_routings(kind, B, N, m, topk, r, shared, dtype):
    """The expert-major dk/dv and its key-major reduction on routings passed in: keys repeated inside one
    expert's list, one key held by every slot of every expert, all experts on the same keys, experts that take
    every query (several tiles) beside empty ones; N = 1, 2, 17, 50, batch 1 and 2, poisoned buffers."""
    d, H = 32, 2
    inputs = _inputs(B, H, N, d, m, dtype, seed=N + topk)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    kw = dict(router_topk=r, shared=shared, routing=_routing(kind, B, H, N, m, topk, r, seed=N))
    out = mita_attention(*inputs, topk, impl="triton", **kw)
    ref = mita_attention(*ref_inputs, topk, impl="reference", **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) <= tol
    grad_out = torch.randn(B, H, N, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _assert_grads(out, inputs, ref, ref_inputs, grad_out.to(DEVICE), dtype, tol)


@pytest.mark.parametrize("kind,N,m,topk,r,shared", [("duplicates", 50, 5, 7, 2, True), ("one_key", 17, 4, 5, 1, False)])
def test_layout_from_the_triton_kernels(monkeypatch, kind, N, m, topk, r, shared):
    """mita.kernels.LAYOUT_KERNELS: the routing layout from kernels/layout_kernels.py, built once in the forward
    and reused by the backward (eager mode)."""
    from mita.kernels import layout_kernels

    calls = []
    build = layout_kernels.expert_tiles_triton
    monkeypatch.setattr(layout_kernels, "expert_tiles_triton", lambda *a: calls.append(1) or build(*a))
    monkeypatch.setattr(kernels, "LAYOUT_KERNELS", True)
    _check_general_layout(kind, N, m, topk, r, shared)
    assert len(calls) == 1  # the forward's, kept for the backward


@pytest.mark.parametrize("split", [False, True])
def test_custom_ops_in_eager_mode(monkeypatch, split):
    """mita.kernels.EAGER_FUNCTIONS off: eager calls take the custom ops (as torch.compile does), which rebuild
    the layout in the backward and leave the shared values' gradients to autograd; the same results."""
    from mita.kernels import ops, routing

    calls = []
    for name in ("attention_fwd", "attention_bwd"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, op=op, name=name: calls.append(name) or op(*a))
    route_op = routing.route_queries
    monkeypatch.setattr(routing, "route_queries", lambda *a: calls.append("route_queries") or route_op(*a))
    monkeypatch.setattr(kernels, "EAGER_FUNCTIONS", False)
    monkeypatch.setattr(kernels, "SHARED_SPLIT_MIN_N", 1 if split else None)
    B, H, N, d, m, topk = 2, 2, 33, 32, 5, 7
    dtype = torch.float16 if split else torch.float32
    inputs = _inputs(B, H, N, d, m, dtype, seed=11)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    kw = dict(router_topk=2, shared=True, routing=_routing("duplicates", B, H, N, m, topk, 2, seed=3))
    out = mita_attention(*inputs, topk, impl="triton", **kw)
    ref = mita_attention(*ref_inputs, topk, impl="reference", **kw)
    tol = 1e-2 if split else 1e-5
    assert rel_err(out, ref) <= tol
    grad_out = torch.randn(B, H, N, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _assert_grads(out, inputs, ref, ref_inputs, grad_out.to(DEVICE), dtype, tol)
    assert calls == ["attention_fwd", "attention_bwd"]
    q, _, _, landmarks = inputs
    kernels.route_queries(q, landmarks, 1)
    assert calls[-1] == "route_queries"


def test_eager_function_refuses_a_second_derivative():
    """The kernels' backward is not itself differentiable: create_graph=True followed by a second backward
    fails loudly instead of giving a silent zero."""
    B, H, N, d, m, topk = 1, 2, 17, 32, 3, 4
    inputs = _inputs(B, H, N, d, m, torch.float32, seed=2)
    kw = dict(router_topk=1, shared=True, routing=_routing("duplicates", B, H, N, m, topk, 1, seed=2))
    out = mita_attention(*inputs, topk, impl="triton", **kw)
    (dq,) = torch.autograd.grad(out.square().sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()


@pytest.mark.parametrize("kind,N,m,topk,r,shared", [("duplicates", 50, 5, 7, 2, True)])
def test_layout_from_pytorch_ops(monkeypatch, kind, N, m, topk, r, shared):
    """mita.kernels.LAYOUT_KERNELS off: the layout from layout.expert_tiles's PyTorch ops, forward and backward."""
    from mita.kernels import layout_kernels

    monkeypatch.setattr(layout_kernels, "expert_tiles_triton", lambda *a: pytest.fail("layout kernels called"))
    monkeypatch.setattr(kernels, "LAYOUT_KERNELS", False)
    _check_general_layout(kind, N, m, topk, r, shared)


def _check_general_layout(kind, N, m, topk, r, shared, B=2, dtype=torch.float32, d=32):
    """The general path on a routing passed in (``_routing``), against float64: output and every gradient."""
    H = 2
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    inputs = _inputs(B, H, N, d, m, dtype, seed=N + 3)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    kw = dict(router_topk=r, shared=shared, routing=_routing(kind, B, H, N, m, topk, r, seed=N))
    out = mita_attention(*inputs, topk, impl="triton", **kw)
    ref = mita_attention(*ref_inputs, topk, impl="reference", **kw)
    assert rel_err(out, ref) <= tol
    grad_out = torch.randn(B, H, N, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _assert_grads(out, inputs, ref, ref_inputs, grad_out.to(DEVICE), dtype, tol)


@pytest.mark.parametrize("kind,B,N,m,topk,r,shared,over", [
    ("duplicates", 1, 50, 2, 7, 1, True, {"BLOCK_M": 16, "TPP": 1}),  # tiles of 25 entries: two blocks
    ("duplicates", 2, 17, 3, 4, 2, False, {"BLOCK_M": 16, "TPP": 2}),
    ("one_key", 1, 50, 3, 3, 2, True, {"BLOCK_M": 16, "TPP": 3}),  # tiles of 34: three blocks
    ("shared_keys", 2, 2, 5, 2, 2, True, {"BLOCK_M": 16, "TPP": 1}),
    ("duplicates", 2, 1, 2, 1, 1, True, {"BLOCK_M": 16, "TPP": 4}),
    ("duplicates", 1, 33, 20, 0, 1, True, {"BLOCK_M": 16, "TPP": 3}),  # topk = 0: the shared expert alone
    ("duplicates", 1, 50, 5, 7, 2, True, {}),  # the config's own blocks and tiles a program
    ("duplicates", 2, 50, 12, 9, 1, True, {"EPP": 2}),  # dk/dv: chunks of 5 experts, in programs of 2
    ("one_key", 1, 17, 7, 3, 2, False, {"EPP": 3}),
    ("duplicates", 1, 200, 70, 66, 2, True, {"BLOCK_M": 16}),  # m, topk in (64, 128]: tiles of 128 rows
    # topk > 128: the block-program kernels, with blocks of 128 queries (tiles of 150) and of 128 keys, 8 warps
    ("duplicates", 1, 300, 2, 130, 1, True, {}),
])
def test_resident_routed_kernels(monkeypatch, kind, B, N, m, topk, r, shared, over):
    """mita.kernels.ROUTED_RESIDENT: the forward and dq kernels with one program per group of tiles, the head's
    landmarks and shared values and each tile's expert keys and values loaded once; blocks of 16 queries so that
    a tile takes several, groups of 1 to 4 tiles (the first expert holds every query: several tiles, beside
    empty experts; the last group may be short); dk/dv programs of several experts (8 by the config here, or 2
    and 3 over chunks of experts); beyond the resident kernels (topk > 128) the block programs with wide blocks;
    fp16, poisoned buffers."""
    from mita.kernels import routed

    launched = []
    config = routed.resident_config
    over = dict(over)
    epp = over.pop("EPP", None)
    monkeypatch.setattr(kernels, "ROUTED_RESIDENT", True)
    monkeypatch.setattr(routed, "resident_config", lambda *a: launched.append(a) or (
        None if config(*a) is None else dict(config(*a), **over)))
    if epp is not None:
        monkeypatch.setattr(routed, "experts_per_program", lambda T: epp)
    _check_general_layout(kind, N, m, topk, r, shared, B=B, dtype=torch.float16)
    assert len(launched) == 2  # the forward's and the backward's dq


@pytest.mark.parametrize("kind,B,N,m,topk,r,shared,epp", [
    ("duplicates", 2, 50, 12, 9, 1, True, 2),  # several experts a dk/dv program, over chunks of experts
    ("one_key", 1, 17, 7, 3, 2, False, 3),
    ("duplicates", 1, 300, 2, 130, 1, True, None),  # experts of 130 keys: blocks of 128 keys, 8 warps
])
def test_dkdv_wide(monkeypatch, kind, B, N, m, topk, r, shared, epp):
    """mita.kernels.DKDV_WIDE: the routed dk/dv programs with ROUTED_RESIDENT's shapes (several experts a
    program, 128-key blocks with 8 warps) and the rest of the path as by default; fp16, poisoned buffers."""
    from mita.kernels import routed

    monkeypatch.setattr(kernels, "DKDV_WIDE", True)
    if epp is not None:
        monkeypatch.setattr(routed, "experts_per_program", lambda T: epp)
    launched = []
    dkdv = routed._routed_bwd_dkdv_kernel
    monkeypatch.setattr(routed, "launch", lambda kernel, grid, args, meta, key=None: (
        kernel is dkdv and launched.append(meta)) or launch_mod.launch(kernel, grid, args, meta, key))
    _check_general_layout(kind, N, m, topk, r, shared, B=B, dtype=torch.float16)
    assert launched and (epp is None or all(meta["EPP"] == epp for meta in launched))
    if topk >= 128:
        assert all(meta["BLOCK_K"] == 128 and meta["num_warps"] == 8 for meta in launched)


@pytest.mark.parametrize("kind,B,N,m,topk,r,shared", [
    ("duplicates", 1, 300, 2, 20, 1, True),  # tiles of 150 entries: two 128-entry blocks, the second part-filled
    ("one_key", 2, 140, 2, 9, 2, True),  # r = 2: tiles of 140
    ("shared_keys", 1, 260, 2, 70, 1, False),  # keys past one 64-key block, no shared expert
])
def test_routed_wide_blocks(monkeypatch, kind, B, N, m, topk, r, shared):
    """mita.kernels.ROUTED_WIDE: the routed forward in 128-entry, 8-warp blocks where tiles hold 128 entries or
    more, dq in its 64-entry ones; fp16, poisoned buffers."""
    from mita.kernels import routed

    monkeypatch.setattr(kernels, "ROUTED_WIDE", True)
    launched = []
    wide = (routed._routed_fwd_kernel, routed._routed_bwd_dq_kernel)
    monkeypatch.setattr(routed, "launch", lambda kernel, grid, args, meta, key=None: (
        kernel in wide and launched.append(meta)) or launch_mod.launch(kernel, grid, args, meta, key))
    _check_general_layout(kind, N, m, topk, r, shared, B=B, dtype=torch.float16)
    assert len(launched) == 2
    assert launched[0]["BLOCK_M"] == 128 and launched[0]["num_warps"] == 8  # the forward
    assert launched[1]["BLOCK_M"] == 64  # dq


@pytest.mark.parametrize("kind,B,N,m,topk,r,shared,resident", [
    ("duplicates", 1, 100, 40, 40, 1, True, False),  # tiles of 3 entries (blocks of 16), the first expert spans 23
    ("duplicates", 2, 90, 33, 50, 2, True, False),  # r = 2, tiles of 6
    ("duplicates", 1, 70, 40, 33, 2, False, False),  # without the shared expert
    ("shared_keys", 1, 80, 36, 66, 1, True, False),  # topk past one 64-key block
    ("duplicates", 1, 60, 40, 0, 1, True, False),  # topk = 0: the shared expert alone
    # the resident kernels (ROUTED_RESIDENT) transposed: groups of short tiles, the first expert's spanning several
    ("duplicates", 2, 90, 33, 50, 2, True, True),
    ("duplicates", 1, 70, 40, 33, 2, False, True),
    ("duplicates", 1, 60, 40, 0, 1, True, True),
])
def test_transposed_routed_kernels(monkeypatch, kind, B, N, m, topk, r, shared, resident):
    """mita.kernels.ROUTED_TRANSPOSED: the forward and dq programs of short tiles (blocks of fewer than 64
    entries) with keys and landmarks as rows, block or resident programs; d = 64, fp16, poisoned buffers, against
    float64."""
    from mita.kernels import routed

    chosen = []
    pick = routed.transposed
    monkeypatch.setattr(kernels, "ROUTED_TRANSPOSED", True)
    monkeypatch.setattr(kernels, "ROUTED_RESIDENT", resident)
    monkeypatch.setattr(routed, "transposed", lambda *a: chosen.append(pick(*a)) or chosen[-1])
    _check_general_layout(kind, N, m, topk, r, shared, B=B, dtype=torch.float16, d=64)
    assert chosen == [True, True]  # the forward's and the backward's dq


def test_transposed_only_for_short_tiles_with_wide_sides(monkeypatch):
    from mita.kernels import routed

    monkeypatch.setattr(kernels, "ROUTED_TRANSPOSED", True)
    assert routed.transposed(32, 64, 64, 64, 2, True, 49)
    assert not routed.transposed(64, 64, 64, 64, 2, True, 64)  # 64-entry blocks are warp-group MMAs already
    assert not routed.transposed(32, 32, 64, 64, 2, True, 25)  # 32 keys a block: no 64-row product
    assert not routed.transposed(32, 64, 32, 64, 2, True, 49)  # 32 landmarks a block
    assert routed.transposed(32, 64, 32, 64, 2, False, 49)  # ... unless there is no shared expert
    assert not routed.transposed(32, 64, 64, 32, 2, True, 49)  # d = 32
    assert not routed.transposed(32, 64, 64, 64, 4, True, 49)  # fp32
    monkeypatch.setattr(kernels, "ROUTED_TRANSPOSED", False)
    assert not routed.transposed(32, 64, 64, 64, 2, True, 49)


def test_resident_config_bounds():
    """The resident kernels take m and topk up to 128 with d (KP + MP) <= 16,384, fp16/bf16 only; blocks of 64
    queries while both pads are <= 64 and d <= 64, 32 beyond, never more than the tile."""
    from mita.kernels import routed
    from mita.kernels.routed import resident_config

    c = resident_config(256, 64, 64, 64, 2, True)
    assert (c["BLOCK_M"], c["KP"], c["MP"]) == (64, 64, 64)
    c = resident_config(512, 128, 100, 64, 2, True)
    assert (c["BLOCK_M"], c["KP"], c["MP"]) == (32, 128, 128)
    c = resident_config(21, 49, 49, 64, 2, True)
    assert (c["BLOCK_M"], c["TPP"]) == (32, 8)  # short tiles: several a program
    assert resident_config(100, 49, 49, 64, 2, True)["TPP"] == 2
    assert (routed.experts_per_program(21), routed.experts_per_program(100), routed.experts_per_program(512)) == (
        8, 2, 1)
    assert routed.routed_blocks(150, 130, 32, 2, True) == (128, 128, 8, 8)
    assert routed.routed_blocks(150, 130, 32, 2, False) == (64, 64, 4, 4)
    assert routed.routed_blocks(100, 64, 64, 2, True) == (64, 64, 4, 4)
    assert routed.routed_blocks(150, 130, 128, 2, True)[2:] == (4, 8)
    assert routed.routed_blocks(150, 130, 128, 2, False)[2:] == (4, 4)
    assert resident_config(5, 3, 4, 32, 2, False)["BLOCK_M"] == 16
    assert resident_config(256, 64, 64, 64, 4, True) is None  # fp32
    assert resident_config(256, 256, 64, 64, 2, True) is None
    assert resident_config(256, 128, 128, 128, 2, True) is None  # 128 (128 + 128) > 16,384
    assert resident_config(256, 64, 64, 128, 2, True)["BLOCK_M"] == 16
    assert resident_config(256, 300, 64, 64, 2, False)["MP"] == 16  # no shared expert: m does not count


@pytest.mark.parametrize("kind,N,m,topk,r", [("duplicates", 50, 5, 7, 2), ("one_key", 200, 130, 3, 1)])
def test_shared_resident_kernels(monkeypatch, kind, N, m, topk, r):
    """mita.kernels.SHARED_RESIDENT through the general path (key-split shared values, fp16): the shared values'
    dK, dV with every landmark loaded once a program, and with m >= 128 the shared logits' landmark gradients
    in programs of 128 landmarks."""
    from mita.kernels import routed, shared

    monkeypatch.setattr(kernels, "SHARED_RESIDENT", True)
    monkeypatch.setattr(kernels, "SHARED_SPLIT_MIN_N", 1)
    monkeypatch.setattr(shared, "config", lambda *a: {"BM": 16, "BN": 16, "CHUNK": 32, "num_warps": 4})
    launched = []
    monkeypatch.setattr(routed, "launch", lambda kernel, grid, args, meta, key=None: launched.append(
        (kernel.fn.__name__, meta.get("BLOCK_R"))) or kernel[grid](*args, **meta))
    _check_general_layout(kind, N, m, topk, r, True, B=1, dtype=torch.float16)
    assert (("_shared_bwd_kernel", 128) in launched) == (m >= 128)


@pytest.mark.parametrize("N,m,topk,r,fuse", [(50, 5, 7, 2, True), (33, 20, 4, 1, True), (17, 3, 0, 1, True),
                                              (130, 4, 8, 1, True), (150, 3, 9, 2, True), (130, 4, 8, 1, False)])
def test_shared_values_split_over_the_keys(monkeypatch, N, m, topk, r, fuse):
    """mita.kernels.SHARED_SPLIT_MIN_N: the general path's fp16/bf16 shared values from kernels/shared.py,
    made inside the eager autograd function, whose backward adds their dK, dV into the routed keys' in the
    kernel (written fresh with topk = 0); where the routed partials take one pass (``4 m topk <= N``) and
    ``ops.FUSE_KEYS`` is on, the same launch sums them per key (keys repeated in an expert's list)."""
    from mita.kernels import routed
    from mita.kernels import shared as shared_kernels

    monkeypatch.setattr(kernels, "FUSE_KEYS", fuse)
    calls = []
    forward, backward = shared_kernels.forward, shared_kernels.backward
    monkeypatch.setattr(shared_kernels, "forward", lambda *a, **kw: calls.append("fwd") or forward(*a, **kw))
    monkeypatch.setattr(shared_kernels, "backward", lambda *a, into=None, key_pairs=None, **kw: calls.append(
        ("bwd", into is not None and into[0] is not None, key_pairs is not None))
        or backward(*a, into=into, key_pairs=key_pairs, **kw))
    monkeypatch.setattr(shared_kernels, "config", lambda *a: {"BM": 16, "BN": 16, "CHUNK": 16, "num_warps": 4})
    monkeypatch.setattr(kernels, "SHARED_SPLIT_MIN_N", 1)
    B, H, d = 2, 2, 32
    inputs = _inputs(B, H, N, d, m, torch.float16, seed=N + 5)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    kw = dict(router_topk=r, shared=True, routing=_routing("duplicates", B, H, N, m, topk, r, seed=N))
    out = mita_attention(*inputs, topk, impl="triton", **kw)
    ref = mita_attention(*ref_inputs, topk, impl="reference", **kw)
    assert rel_err(out, ref) <= 1e-2
    grad_out = torch.randn(B, H, N, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _assert_grads(out, inputs, ref, ref_inputs, grad_out.to(DEVICE), torch.float16, 1e-2)
    # one pass of partials: float32 where 4 m topk <= N, else with DKDV_TWO_BUFFERS all experts in one chunk
    _, buffers, chunk = routed.dkdv_plan(torch.float16, N, m, topk, two_buffers=kernels.DKDV_TWO_BUFFERS)
    assert calls == ["fwd", ("bwd", topk > 0, fuse and topk > 0 and buffers == 2 and chunk == m)]
    # fp32 keeps SDPA's shared values (IEEE backward)
    calls.clear()
    mita_attention(*(x.float() for x in inputs), topk, impl="triton", **kw)
    assert calls == []


@pytest.mark.parametrize("plan", [("float32", 2, 5), ("float32", 1, 5), ("input", 2, 5), ("input", 1, 5),
                                  ("input", 1, 2), ("float32", 2, 1), ("input", 1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_routed_dkdv_partial_plans(plan, dtype, monkeypatch):
    """Every partial layout on one case whatever its size would pick: float32 or input-dtype partials, in
    two buffers (dk and dv in one pass) or one (a dv pass, then a dk pass over the same buffer), for all
    m = 5 experts at once or in chunks of 1, 2 or 3 (the last chunk shorter), each chunk's sums added onto
    the earlier ones'."""
    from mita.kernels import ops

    part, buffers, chunk = plan
    monkeypatch.setattr(ops, "dkdv_plan", lambda dt, N, m, topk, **kw: (torch.float32 if part == "float32" else dt,
                                                                   buffers, chunk))
    test_routed_dkdv_on_awkward_routings("duplicates", 2, 17, 5, 7, 2, True, dtype)


def test_dkdv_plan_bounds_the_partials():
    """The partials take at most the bytes of one 16-bit dk (``max(N, topk) d`` elements a head): float32 two
    buffers while ``4 m topk <= N``, chunks of experts in the input dtype beyond; chunks cover every expert."""
    from mita.kernels.routed import dkdv_plan

    for N, m, topk in ((16384, 64, 64), (4096, 64, 64), (1025, 49, 49), (16384, 256, 256), (65536, 512, 512),
                       (17, 5, 7), (2, 3, 2), (1, 4, 1), (100, 1000, 1000)):
        for one_pass in (False, True):
            dtype, buffers, chunk = dkdv_plan(torch.bfloat16, N, m, topk, one_pass=one_pass)
            assert 1 <= chunk <= m
            size = buffers * chunk * topk * dtype.itemsize  # bytes a head, per d
            assert size <= 2 * max(N, topk), (N, m, topk, one_pass)
    assert dkdv_plan(torch.bfloat16, 16384, 64, 64) == (torch.float32, 2, 64)  # the paper's budget: one pass
    # ROUTED_RESIDENT: two input-dtype buffers, one pass, chunks half as long: the same partial memory
    assert dkdv_plan(torch.bfloat16, 65536, 512, 512, one_pass=True) == (torch.bfloat16, 2, 64)
    assert dkdv_plan(torch.bfloat16, 65536, 512, 512) == (torch.bfloat16, 1, 128)
    assert dkdv_plan(torch.bfloat16, 100, 5, 60, one_pass=True) == (torch.bfloat16, 1, 1)  # 2 topk > N
    # DKDV_TWO_BUFFERS: the default chunks, two buffers, one pass: at most two 16-bit dk's
    for N, m, topk in ((4096, 64, 64), (1025, 49, 49), (16384, 256, 256), (65536, 512, 512), (17, 5, 7), (1, 4, 1)):
        dtype, buffers, chunk = dkdv_plan(torch.bfloat16, N, m, topk, two_buffers=True)
        assert 1 <= chunk <= m and buffers * chunk * topk * dtype.itemsize <= 4 * max(N, topk)
    assert dkdv_plan(torch.bfloat16, 1025, 49, 49, two_buffers=True) == (torch.bfloat16, 2, 20)
    assert dkdv_plan(torch.bfloat16, 16384, 64, 64, two_buffers=True) == (torch.float32, 2, 64)  # unchanged


def test_dkdv_two_buffers_on_awkward_routings(monkeypatch):
    """mita.kernels.DKDV_TWO_BUFFERS through the op: chunks of experts with two input-dtype buffers each, filled
    in one pass, the later chunks' sums added onto the earlier ones'; keys repeated, fp16."""
    monkeypatch.setattr(kernels, "DKDV_TWO_BUFFERS", True)
    test_routed_dkdv_on_awkward_routings("duplicates", 1, 17, 5, 7, 2, True, torch.float16)
    test_routed_dkdv_on_awkward_routings("shared_keys", 2, 50, 6, 10, 1, False, torch.float16)


def test_key_pairs_inverse_index():
    from mita.kernels.layout import key_pairs

    N, topk_idx = 6, torch.tensor([[[5, 0, 5], [2, 5, 0]]])  # [G=1, m=2, k=3]; key 5 three times, 1 3 4 never
    pair_order, key_ptr = key_pairs(topk_idx, N)
    assert key_ptr.tolist() == [[0, 2, 2, 3, 3, 3, 6]]
    # each key's pairs e k + j in increasing order
    assert pair_order.tolist() == [[1, 5, 3, 0, 2, 4]]


@pytest.mark.parametrize("N", [32767, 32768, 40000])
def test_key_pairs_sort_narrow_keys(N):
    """The inverse index sorts the key lists as int16 below 2^15 keys and int32 beyond: the same index as a
    sort of the int64 lists, with keys at the top of the range (N - 1) and repeated."""
    from mita.kernels.layout import _sort_keys, key_pairs

    assert _sort_keys(torch.zeros(1, 1, dtype=torch.long), N).dtype == (torch.int16 if N < 1 << 15 else torch.int32)
    g = torch.Generator().manual_seed(N)
    topk_idx = torch.randint(N - 40, N, (2, 5, 9), generator=g)
    topk_idx[:, 0, 0] = N - 1
    pair_order, key_ptr = key_pairs(topk_idx, N)
    flat = topk_idx.reshape(2, -1)
    want_keys, want_order = torch.sort(flat, dim=-1, stable=True)
    assert torch.equal(pair_order, want_order)
    assert torch.equal(key_ptr, torch.searchsorted(want_keys, torch.arange(N + 1).expand(2, N + 1).contiguous()))


def test_key_pairs_from_the_triton_kernel(monkeypatch):
    """layout_kernels.key_pairs_triton: the CSR pointers by a binary search per key, equal to key_pairs's, on
    keys repeated, missing, all one key, N not a multiple of the block, several heads; buffers poisoned."""
    from mita.kernels import layout_kernels
    from mita.kernels.layout import key_pairs

    monkeypatch.setattr(layout_kernels, "_POISON", True)
    g = torch.Generator().manual_seed(0)
    cases = [(6, torch.tensor([[[5, 0, 5], [2, 5, 0]]])), (1, torch.zeros(2, 3, 1, dtype=torch.long)),
             (50, torch.full((1, 4, 7), 49, dtype=torch.long)), (1500, torch.randint(0, 1500, (3, 5, 40), generator=g)),
             (17, torch.randint(0, 17, (2, 6, 17), generator=g))]
    for N, topk_idx in cases:
        want = key_pairs(topk_idx, N)
        got = layout_kernels.key_pairs_triton(topk_idx.to(DEVICE), N)
        for a, b in zip(got, want):
            assert a.dtype == torch.long and torch.equal(a.cpu(), b), N


def test_expert_tiles_expert_ranges():
    from mita.kernels.layout import expert_tiles

    g = torch.Generator().manual_seed(0)
    m, N, r = 5, 23, 2
    expert = torch.randint(0, m - 1, (3, N * r), generator=g)  # expert m - 1 empty
    lay = expert_tiles(expert, m, N, r)
    for gi in range(3):
        for e in range(m):
            lo, cnt = lay["expert_start"][gi, e].item(), lay["expert_count"][gi, e].item()
            sources = lay["slot_source"][gi, lo:lo + cnt]
            assert cnt == (expert[gi] == e).sum().item()
            assert (expert[gi, sources] == e).all()


@pytest.mark.parametrize("ca, cb, rows, d", [(1, 0, 3, 32), (8, 0, 5, 64), (9, 3, 2, 64), (20, 17, 7, 128)])
def test_sum_chunks(ca, cb, rows, d):
    """The chunk sums of the landmark-side partials: ``scale_a a.sum(1) + scale_b b.sum(1)`` in the output dtype,
    chunk counts below, at and past the 8 loaded a step, heads whose ``rows d`` is not a multiple of a block;
    deterministic (two calls bitwise equal)."""
    from mita.kernels import routed

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, ca, rows, d, generator=gen).to(DEVICE)
    b = torch.randn(3, cb, rows, d, generator=gen).to(DEVICE) if cb else None
    for dtype in (torch.float32, torch.bfloat16):
        out = routed.sum_chunks(a, dtype, 0.5, b, 2.0)
        ref = 0.5 * a.double().sum(1) + (2.0 * b.double().sum(1) if cb else 0)
        assert out.shape == (3, rows, d) and out.dtype == dtype
        assert rel_err(out, ref) <= (1e-6 if dtype == torch.float32 else 1e-2)
        assert torch.equal(out, routed.sum_chunks(a, dtype, 0.5, b, 2.0))


@pytest.mark.parametrize("r", [1, 2])
def test_routed_dkdv_is_deterministic(r):
    """No atomics: two backward passes give bitwise the same dk and dv (no shared expert, so every part of
    them comes from the routed kernels), with keys held by several experts."""
    from mita.kernels import ops

    args = list(_attention_fwd_args(topk=5, shared=False))
    topk_idx = args[5].clone()
    topk_idx[..., 1:, :2] = topk_idx[..., :1, :2]  # the first two keys of expert 0 in every expert's list
    args[5] = topk_idx
    if r == 2:
        e = args[6]
        args[6] = torch.cat([e, (e + 1) % args[3].shape[2]], dim=-1)
    out, lse = ops.attention_fwd(*args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    first = ops.attention_bwd(grad, *args[:7], out, lse, 1.0 / out.shape[-1], False)
    second = ops.attention_bwd(grad, *args[:7], out, lse, 1.0 / out.shape[-1], False)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)


def test_contract():
    q = torch.zeros(1, 1, 4, 32, device=DEVICE)
    R = torch.zeros(1, 1, 3, 32, device=DEVICE)
    assert kernels.available()
    assert kernels.supports(q, R, 4, 2)
    assert kernels.supports(q.half(), R.half(), 0, 1)
    assert not kernels.supports(q[..., :16], R[..., :16], 4, 1)
    assert not kernels.supports(q.double(), R.double(), 4, 1)
    assert not kernels.supports(q, R, 1025, 1)
    assert not kernels.supports(q, torch.zeros(1, 1, 1025, 32), 4, 1)
    idx = torch.zeros(1, 1, 3, 2, dtype=torch.long, device=DEVICE)
    exp = torch.zeros(1, 1, 4, 1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        kernels.mita_attention(q[..., :16], q[..., :16], q[..., :16], R[..., :16], idx, exp, True, 1 / 16)
    with pytest.raises(ValueError, match="shared=False"):
        kernels.mita_attention(q, q, q, R, idx[..., :0], exp, False, 1 / 32)


def _gpu_cases():
    cases = []
    for i, (N, dtype, d) in enumerate(
        itertools.product([197, 1025, 4097], [torch.bfloat16, torch.float16, torch.float32], [32, 64, 128])
    ):
        m, topk = [(25, 25), (49, 49), (7, 100), (33, 13)][i % 4]
        r = 1 + (i // 2) % 2
        shared = i % 5 != 4
        scale = ("official", "paper")[i % 2]
        B, H = (2, 3) if N < 4097 else (1, 2)
        cases.append((B, H, N, d, m, topk, r, shared, scale, dtype))
    return cases


@pytest.mark.gpu
class TestGPU:
    @pytest.mark.parametrize("B,H,N,d,m,topk,r,shared,scale,dtype", _gpu_cases())
    def test_matches_reference(self, B, H, N, d, m, topk, r, shared, scale, dtype):
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        _compare(B, H, N, d, m, topk, r, shared, scale, dtype=dtype, tol=tol, seed=N + d)

    @pytest.mark.parametrize("N,r", [(197, 1), (1025, 2), (4097, 1)])
    def test_repeated_calls_match_reference(self, N, r):
        # the first call of a shape launches through Triton, later ones through the compiled kernels'
        # launchers (kernels/launch.py): every call, forward and backward, against float64 on new inputs
        for seed in range(3):
            _compare(2, 3, N, 64, 25, 25, r, True, "official", dtype=torch.bfloat16, tol=1e-2, seed=seed)

    # Measured on an H200 (torch 2.11, triton 3.6): out within 2e-3 but dq at 2.2e-3, since dS = P (dP - delta)
    # cancels and dP comes from a TF32 product. Kept at the bar until the backward is reworked.
    @pytest.mark.parametrize("d", [32, 64, 128])
    def test_fp32_tf32(self, d):
        _compare(2, 3, 1025, d, 49, 49, 1, True, "official", tol=2e-3, allow_tf32=True)

    @pytest.mark.parametrize("N,d,m,topk,r,shared", [(4097, 64, 64, 64, 1, True), (4097, 64, 128, 100, 2, True),
                                                     (1025, 128, 49, 49, 1, True), (1025, 32, 128, 128, 2, False),
                                                     (197, 64, 25, 25, 2, True), (4097, 64, 32, 256, 1, True)])
    def test_resident_routed_kernels(self, monkeypatch, N, d, m, topk, r, shared):
        # the last: topk > 128, the block programs with wide blocks (tiles of 129 queries, keys in blocks of 128)
        monkeypatch.setattr(kernels, "ROUTED_RESIDENT", True)
        _compare(1, 2, N, d, m, topk, r, shared, "official", dtype=torch.bfloat16, tol=1e-2, seed=N + m)

    @pytest.mark.parametrize("N,d,m,topk,r,shared,resident", [
        (1025, 64, 49, 49, 1, True, False), (1025, 128, 49, 49, 2, True, False), (197, 64, 40, 40, 1, False, False),
        (1025, 64, 49, 0, 1, True, False), (1025, 64, 49, 49, 1, True, True), (1025, 128, 49, 49, 2, True, True)])
    def test_transposed_routed_kernels(self, monkeypatch, N, d, m, topk, r, shared, resident):
        # ViT-B at 512 px and shorter: tiles of 21 entries (blocks of 32) or fewer, run transposed
        monkeypatch.setattr(kernels, "ROUTED_TRANSPOSED", True)
        monkeypatch.setattr(kernels, "ROUTED_RESIDENT", resident)
        _compare(1, 2, N, d, m, topk, r, shared, "official", dtype=torch.bfloat16, tol=1e-2, seed=N + m + d)

    @pytest.mark.parametrize("N", [1, 2, 63])
    def test_tiny_sequences(self, N):
        _compare(2, 2, N, 64, 5, min(N, 7), 2 if N > 1 else 1, True, "official", dtype=torch.bfloat16, tol=1e-2)

    @pytest.mark.slow
    def test_64bit_offsets(self):
        # B H N d = 512 * 16 * 4097 * 64 > 2^31: check the last head, whose rows lie past 2^31 elements
        B, H, N, d, m, topk = 512, 16, 4097, 64, 25, 25
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        R = torch.randn(B, H, m, d, device="cuda", dtype=torch.bfloat16, generator=g)
        assert q.numel() >= 2 ** 31
        with torch.no_grad():
            out, routing = mita_attention(q, k, v, R, topk, shared=False, impl="triton", return_routing=True)
            last = [t[-1:, -1:].double() for t in (q, k, v, R)]
            ref = mita_attention(*last, topk, shared=False, impl="reference",
                                 routing=tuple(t[-1:, -1:] for t in routing))
        assert rel_err(out[-1:, -1:], ref) <= 1e-2


def _op_inputs(B=1, H=2, N=23, d=32, m=4, dtype=torch.float32, device=DEVICE, seed=3):
    return _inputs(B, H, N, d, m, dtype, seed=seed, device=device)


def _run(fn, inputs, grad_seed=7):
    out = fn(*inputs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
    grads = torch.autograd.grad(out, inputs, grad.to(out.device), allow_unused=True)
    # landmarks only select without the shared expert: no gradient reaches them
    return out, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


@pytest.mark.parametrize("r,shared", [(1, True), (2, True), (1, False)])
def test_custom_op_traces_under_torch_compile(r, shared):
    """The kernels are torch custom ops: dynamo captures the op in one graph (fullgraph) with no break."""
    inputs = _op_inputs()

    def f(q, k, v, landmarks):
        return mita_attention(q, k, v, landmarks, 5, router_topk=r, shared=shared, impl="triton")

    eager_out, eager_grads = _run(f, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out, grads = _run(compiled, inputs)
    assert rel_err(out, eager_out) <= 1e-6
    for a, b in zip(grads, eager_grads):
        assert rel_err(a, b) <= 1e-6


def _strided_qkv(B=1, H=2, N=23, d=32, m=4, seed=5):
    """q, k, v as a ViT makes them: views of one [B, N, 3 H d] projection (non-contiguous), pooled landmarks."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(DEVICE).permute(2, 0, 3, 1, 4)  # [3, B, H, N, d]
    q, k, v = (t.requires_grad_() for t in qkv.clone().unbind(0))
    assert not q.is_contiguous()
    landmarks = q.detach()[:, :, :m * (N // m)].reshape(B, H, m, N // m, d).mean(3).requires_grad_()
    return q, k, v, landmarks


def _attention_fwd_args(topk=5, shared=True):
    """``ops.attention_fwd``'s arguments on :func:`_strided_qkv`'s inputs (detached), routed by the reference."""
    q, k, v, landmarks = _strided_qkv()
    _, (topk_idx, expert_idx) = mita_attention(q, k, v, landmarks, topk, shared=shared, impl="reference",
                                               return_routing=True)
    shared_v = torch.nn.functional.scaled_dot_product_attention(landmarks, k, v).detach() if shared else None
    return (q.detach(), k.detach(), v.detach(), landmarks.detach(), shared_v, topk_idx, expert_idx,
            1.0 / q.shape[-1], False)


@pytest.mark.parametrize("topk,shared", [(5, True), (0, True), (5, False)])
def test_custom_ops_fake_kernels_match_the_real_ops_on_strided_inputs(topk, shared):
    """torch.library.opcheck: the fake (meta) kernels give the real ops' shapes, dtypes and strides, also for
    non-contiguous q, k, v (inductor asserts them; the backward's once copied q's strides, see ops.py)."""
    from mita.kernels import ops, routing

    fwd_args = _attention_fwd_args(topk, shared)
    q, landmarks = fwd_args[0], fwd_args[3]
    B, H, N, d = q.shape
    torch.library.opcheck(ops.attention_fwd, fwd_args, test_utils=("test_schema", "test_faketensor"))
    out, lse = ops.attention_fwd(*fwd_args)
    grad = torch.randn(B, H, N, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    bwd_args = (grad, *fwd_args[:7], out, lse, 1.0 / d, False)
    torch.library.opcheck(ops.attention_bwd, bwd_args, test_utils=("test_schema", "test_faketensor"))
    for r in (1, 2):
        torch.library.opcheck(routing.route_queries, (q, landmarks, r),
                              test_utils=("test_schema", "test_faketensor"))


def test_activation_checkpointing_recomputes_the_same_routing():
    inputs = _op_inputs(N=31)

    def f(q, k, v, landmarks):
        return mita_attention(q, k, v, landmarks, 6, router_topk=2, impl="triton")

    out, grads = _run(f, inputs)
    out_ck, grads_ck = _run(lambda *x: torch.utils.checkpoint.checkpoint(f, *x, use_reentrant=False), inputs)
    assert torch.equal(out, out_ck)
    # on a GPU the shared values' SDPA backward may sum with atomic adds, whose order varies between passes:
    # two backward passes agree to float32 rounding, not bitwise (the routed dk, dv are deterministic:
    # test_routed_dkdv_is_deterministic). A recomputed routing that differed (another key or expert for some
    # query) would move the gradients by orders of magnitude more.
    for a, b in zip(grads, grads_ck):
        assert rel_err(a, b) <= 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_and_cuda_graphs_match_eager_on_gpu(mode):
    inputs = _op_inputs(B=2, H=3, N=1025, d=64, m=49, dtype=torch.bfloat16, device="cuda")

    def f(q, k, v, landmarks):
        return mita_attention(q, k, v, landmarks, 49, impl="triton")

    eager_out, eager_grads = _run(f, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(f, mode=mode, fullgraph=True)
    for _ in range(3):  # reduce-overhead records its CUDA graph after warm-up calls
        out, grads = _run(compiled, inputs)
    assert rel_err(out, eager_out) <= 1e-2
    for a, b in zip(grads, eager_grads):
        assert rel_err(a, b) <= 1e-2


@pytest.mark.parametrize("r", [1, 2])
@pytest.mark.parametrize("N,m,d", [(37, 5, 32), (70, 20, 32), (5, 70, 64)])
def test_routing_kernel_matches_torch_topk(r, N, m, d):
    g = torch.Generator().manual_seed(N + m)
    q = torch.randn(2, 2, N, d, generator=g).to(DEVICE)
    landmarks = torch.randn(2, 2, m, d, generator=g).to(DEVICE)
    got = kernels.route_queries(q, landmarks, r)
    assert got.shape == (2, 2, N, r) and got.dtype == torch.long
    assert torch.equal(got, (q @ landmarks.transpose(-1, -2)).topk(r, dim=-1).indices)
    # the same queries as a strided view ([B, N, H, d] memory, as a ViT's q): read in place, same routing
    strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous() and torch.equal(kernels.route_queries(strided, landmarks, r), got)


@pytest.mark.parametrize("r", [1, 2])
def test_routing_kernel_with_wide_blocks(monkeypatch, r):
    """ROUTED_RESIDENT: 256 queries a routing program (N >= 1,024, fp16), a short last block; the same experts
    as torch.topk over the fp32 gate, lowest index first among ties."""
    from mita.kernels import routing

    monkeypatch.setattr(kernels, "ROUTED_RESIDENT", True)
    assert routing.route_blocks(1100, 32, 2) == (256, 8) and routing.route_blocks(1000, 32, 2) == (64, 4)
    g = torch.Generator().manual_seed(r)
    q = torch.randn(1, 2, 1100, 32, generator=g).to(DEVICE, torch.float16)
    landmarks = torch.randn(1, 2, 20, 32, generator=g).to(DEVICE, torch.float16)
    got = kernels.route_queries(q, landmarks, r)
    gate = q.double() @ landmarks.double().transpose(-1, -2)
    assert torch.equal(got.cpu(), gate.topk(r, dim=-1).indices.cpu())


@pytest.mark.parametrize("r,pool", [(1, "grid"), (2, "grid"), (1, "official")])
def test_mita_layer_keeps_no_activation_that_standard_attention_does_not(r, pool):
    """What a MiTA layer keeps for its backward beyond softmax attention's (torch SDPA) is landmark-sized:
    no [B, N, C] copy of q for the landmark pooling, no second copy of the output for the projection (at
    3,137 tokens, batch 64, the two cost 1.8 GiB over a 12-layer model: RESULTS.md, long sequences)."""
    from mita.attention.mita import MiTAAttention
    from mita.attention.standard import StandardAttention

    B, N, C = 2, 37, 64  # 6 x 6 patches and a class token
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_()
    standard = StandardAttention(C, 2).to(DEVICE)
    mita = MiTAAttention(C, 2, num_landmarks=4, topk=4, router_topk=r, pool=pool, impl="triton").to(DEVICE)
    token_sized = B * N * C * x.element_size() // 2

    def big(module):
        _, saved = saved_storages(module, x, exclude=module.parameters())
        return sorted(n for n in saved.values() if n >= token_sized)

    assert big(mita) == big(standard), "MiTA keeps a token-sized activation that standard attention does not"
    # the op's output is token-major in memory, as SDPA's, so that [B, N, C] is a view of it
    from mita.kernels import ops

    out, _ = ops.attention_fwd(*_attention_fwd_args())
    assert out.transpose(1, 2).is_contiguous()


def test_general_path_under_activation_checkpointing():
    """torch.utils.checkpoint around the general path (eager autograd function, layout kept between passes):
    the recomputed forward routes the same way and the gradients equal the plain call's."""
    from torch.utils.checkpoint import checkpoint

    B, H, N, d, m, topk = 2, 2, 33, 32, 4, 5
    inputs = _inputs(B, H, N, d, m, torch.float32, seed=4)
    grad_out = torch.randn(B, H, N, d, generator=torch.Generator().manual_seed(5)).to(DEVICE)

    def call(q, k, v, landmarks):
        return mita_attention(q, k, v, landmarks, topk, router_topk=2, impl="triton")

    plain = _grads(call(*inputs), inputs, grad_out)
    again = [x.detach().clone().requires_grad_() for x in inputs]
    out = checkpoint(call, *again, use_reentrant=False)
    for a, b in zip(_grads(out, again, grad_out), plain):
        assert torch.equal(a, b)
