"""Fused short-sequence kernels against the float64 reference over many shapes: one line of relative errors each.

    python3 scripts/check_short.py            # the grid below, bf16 and fp32
"""
import itertools
import sys

import torch

from mita.functional import mita_attention, mita_routing
from mita.kernels import small_ops
from mita.utils.bench import rel_err


def one(B, H, N, d, m, topk, r, shared, scale, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    xs = [torch.randn(B, H, n, d, generator=g, device="cuda").to(dtype).requires_grad_() for n in (N, N, N, m)]
    routing = mita_routing(*[x.detach().double() for x in (xs[0], xs[1], xs[3])], topk, r)
    sc = 1 / d if scale == "official" else d ** -0.5
    out = small_ops.mita_attention_small(*xs, topk, r, shared, sc, routing=routing)
    xr = [x.detach().double().requires_grad_() for x in xs]
    ref = mita_attention(*xr, topk, router_topk=r, shared=shared, shared_scale=scale, impl="reference", routing=routing)
    do = torch.randn(ref.shape, generator=g, device="cuda", dtype=torch.float64)
    gr = torch.autograd.grad(ref, xr, do, allow_unused=True)
    gk = torch.autograd.grad(out, xs, do.to(dtype), allow_unused=True)
    errs = [rel_err(out, ref)]
    for a, b in zip(gk, gr):
        errs.append(0.0 if b is None or b.norm() < 1e-12 else rel_err(a, b))
    return errs


def main():
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-5}
    bad = 0
    grid = sys.argv[1] if len(sys.argv) > 1 else "default"
    cases = []
    if grid == "default":
        for d, m, N, r, shared, dtype in itertools.product([32, 64], [25, 64], [197], [1, 2], [True, False],
                                                           [torch.bfloat16]):
            cases.append((2, 3, N, d, m, min(13, N), r, shared, "paper", dtype))
        for d in (32, 128):
            cases.append((2, 3, 197, d, 25, 25, 1, True, "official", torch.float32))
        cases.append((2, 3, 49, 32, 64, 13, 2, True, "paper", torch.bfloat16))
    if grid == "d32":
        for N, d, m, r, shared in [(49, 32, 64, 2, True), (49, 32, 64, 2, False), (49, 32, 64, 1, True),
                                   (49, 32, 32, 2, True), (64, 32, 64, 2, True), (100, 32, 64, 2, True),
                                   (49, 64, 64, 2, True), (33, 32, 64, 2, True)]:
            cases.append((2, 3, N, d, m, 13, r, shared, "paper", torch.bfloat16))
    from mita.kernels import fused_small
    blocks = [None] + ([32, 16] if grid == "d32" else [])
    default_bwd = fused_small.bwd_config
    for c, blk in itertools.product(cases, blocks):
        fused_small.bwd_config = default_bwd
        if blk is not None:
            fused_small.bwd_config = lambda n_pad, *a, blk=blk: {"BQ": min(blk, n_pad), "BK": min(blk, n_pad),
                                                                 "num_warps": 4}
        errs = one(*c)
        ok = all(e <= tol[c[-1]] for e in errs)
        bad += not ok
        print(("ok  " if ok else "BAD ") + " ".join(str(x) for x in c[:-1]), str(c[-1])[6:], f"bwd block {blk}",
              " ".join(f"{e:.1e}" for e in errs), flush=True)
    print(f"{bad} of {len(cases)} cases above tolerance")


if __name__ == "__main__":
    main()
