"""Short-sequence MiTA kernels against SDPA: correctness gate, then a sweep of launch configs.

    python3 scripts/bench_short.py                                 # DeiT-S core shape, every config
    python3 scripts/bench_short.py --shape 256,3,197,128,25,25     # B,H,N,d,m,k
    python3 scripts/bench_short.py --configs 'fwd=4/64/64/1/1/16/1,bwd=8/64/32/1/1' --reps 50

For one shape (default B=256, H=6, N=197, d=64, m=k=25, bf16): checks the fused path (own routing and a
given routing) against ``impl="reference"`` in float64 on the same routing at B=2, then times, with CUDA
events (median over --reps, input sets rotated), the forward and forward+backward of SDPA (cuDNN and
flash backends), ``impl="triton"`` (general kernels) and the fused path under each launch config of the
sweep (with the default configs also as ``MiTAAttention`` calls it: ``qkv=``, the three gradients written as one
qkv-shaped tensor, checked equal to the three first), and prints one table with the card's name. Peak memory is
one forward+backward after a reset.
"""
from __future__ import annotations

import argparse
import cProfile
import itertools
import math
import pstats
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity
from torch.profiler import profile as prof_ctx

from mita import kernels
from mita.attention import pool_patch_queries
from mita.functional import mita_attention, mita_routing
from mita.kernels import fused_small, small_ops
from mita.utils.bench import event_device_us, rel_err


def inputs(B, H, N, d, m, dtype, seed, device="cuda"):
    """A timm-shaped ``qkv [B, N, 3, H, d]`` and landmarks ``[B, H, m, d]``, both leaves needing grad."""
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, d, generator=g, device=device, dtype=dtype).requires_grad_()
    lm = torch.randn(B, H, m, d, generator=g, device=device, dtype=dtype).requires_grad_()
    return qkv, lm


def check(B, H, N, d, m, topk, r, shared, dtype, seed=0):
    qkv, lm = inputs(B, H, N, d, m, dtype, seed)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # timm's strided views
    out, routing = small_ops.mita_attention_small(q, k, v, lm, topk, r, shared, 1 / d, return_routing=True)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v, lm)]
    ref = mita_attention(*ref_in, topk, router_topk=r, shared=shared, impl="reference", routing=routing)
    do = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, ref_in, do, allow_unused=True)
    g = torch.autograd.grad(out, [qkv, lm], do.to(dtype), allow_unused=True)
    gq, gk, gv = g[0].permute(2, 0, 3, 1, 4)
    errs = [rel_err(out, ref)]
    for a, b in zip((gq, gk, gv, g[1]), g_ref):
        # a vanishing reference gradient (N = 1: every value is v_0; no shared expert: the landmarks only
        # select) is checked against the size of dO instead
        if b is None or b.norm() <= 1e-9 * do.norm():
            errs.append(0.0 if a is None else (a.double().norm() / do.norm()).item())
        else:
            errs.append(rel_err(a, b))
    return errs


def _grad(out, x, do):
    return torch.autograd.grad(out, x, do, allow_unused=True)


def time_fn(fn, sets, reps, warmup=5, backward=True):
    for i in range(warmup):
        x, do = sets[i % len(sets)]
        _grad(fn(*x), x, do)
    torch.cuda.synchronize()
    f_ms, fb_ms = [], []
    for i in range(reps):
        x, do = sets[i % len(sets)]
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        out = fn(*x)
        e1.record()
        if backward:
            _grad(out, x, do)
        e2.record()
        torch.cuda.synchronize()
        f_ms.append(e0.elapsed_time(e1))
        fb_ms.append(e0.elapsed_time(e2))
    return statistics.median(f_ms), statistics.median(fb_ms)


def queued_ms(fn, sets, reps, warmup=5, rounds=5):
    """Milliseconds a forward (no grad) when ``reps`` calls are queued between one pair of CUDA events; the
    median of ``rounds`` such rounds."""
    out = []
    with torch.no_grad():
        for i in range(warmup):
            fn(*sets[i % len(sets)][0])
        for _ in range(rounds):
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for i in range(reps):
                fn(*sets[i % len(sets)][0])
            e1.record()
            torch.cuda.synchronize()
            out.append(e0.elapsed_time(e1) / reps)
    return statistics.median(out)


def peak(fn, x, do):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _grad(fn(*x), x, do)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="256,6,197,64,25,25", help="B,H,N,d,m,k")
    p.add_argument("--r", type=int, default=1)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--configs", default="default",
                   help="'default', 'sweep' or fwd=W/BQ/BK/P/S/M/MW[/V[/C]],bwd=W/BQ/BK/H/S[/T][;...] (warps, blocks, query "
                        "blocks a program, stages, landmarks and warps a prep program, V: passes of the value-space "
                        "top-k search, C: passes of the bitwise search between checks whether every row is done, "
                        "one backward program a head (2: keys as the rows of its tiles), T=1: the block backward in "
                        "two launches)")
    p.add_argument("--no-general", action="store_true", help="skip impl='triton' (general kernels)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of the fused path's kernels")
    p.add_argument("--pool", action="store_true",
                   help="also time the landmarks pooled from q (DeiT grid: 1 + h*w tokens, sqrt(m) x sqrt(m) windows): "
                        "by adaptive_avg_pool2d before the op, and inside the kernels (mita.kernels.POOL_IN_KERNEL)")
    p.add_argument("--host", action="store_true",
                   help="host (CPU) time of a forward and of a forward+backward call, and a cProfile of the fused path's")
    p.add_argument("--prep-parts", action="store_true",
                   help="GPU time of the forward's kernels with parts of the prep launch's work switched off (selection, "
                        "shared values, pooling): where the forward's time goes")
    p.add_argument("--queued", action="store_true",
                   help="also time forwards queued back to back (inference, no grad; one pair of CUDA events around "
                        "--reps calls): the GPU's rate once host latency is hidden, as in a model")
    p.add_argument("--kernel-times", action="store_true",
                   help="GPU time of the fused kernels alone (profiler) for each config of the sweep")
    p.add_argument("--count-dtype", default="default",
                   help="how the kernels apply the expert mask: 'bias' (a logit bias, fused_small.MASK_BIAS), "
                        "'bias-blocks' (the same in the block backward that d = 128 takes too, "
                        "fused_small.MASK_BIAS_BLOCKS), 'fp16' or 'fp32' (count products accumulated so, "
                        "fused_small.COUNT_FP32), several comma-separated to run every config of --configs with each; "
                        "default: the package's")
    args = p.parse_args()
    if args.count_dtype == "default":
        args.count_dtype = ("fp32" if fused_small.COUNT_FP32 else "fp16") if not fused_small.MASK_BIAS else (
            "bias-blocks" if fused_small.MASK_BIAS_BLOCKS else "bias")
    counts = args.count_dtype.split(",")
    if not counts or any(c not in ("fp16", "fp32", "bias", "bias-blocks") for c in counts):
        p.error(f"--count-dtype {args.count_dtype!r}: expected bias, bias-blocks, fp16, fp32 or several of them")
    try:
        combos = config_combos(args.configs)
    except (ValueError, KeyError) as exc:
        p.error(f"--configs {args.configs!r}: expected 'default', 'sweep' or fwd=W/BQ/BK/P/S/M/MW[/V[/C]],"
                f"bwd=W/BQ/BK/H/S[/T][;...] ({exc})")
    B, H, N, d, m, topk = (int(x) for x in args.shape.split(","))
    dtype = torch.bfloat16
    dev = torch.cuda.get_device_name()
    print(f"card: {dev}  torch {torch.__version__}")

    for case in [(2, 3, N, d, m, topk, args.r, True), (2, 3, N, d, m, topk, 2, True), (1, 2, N, d, m, topk, 1, False),
                 (2, 2, 17, d, 5, 7, 1, True), (1, 1, 1, d, 3, 1, 1, True)]:
        errs = check(*case, dtype)
        ok = all(e <= 1e-2 for e in errs)
        print("check", case, " ".join(f"{e:.1e}" for e in errs), "ok" if ok else "FAIL")

    nsets = 3
    sets = []
    for s in range(nsets):
        qkv, lm = inputs(B, H, N, d, m, dtype, 100 + s)
        # the output gradient in the layout of the layer's view: [B, N, H, d] memory
        sets.append(((qkv, lm), torch.randn(B, N, H, d, device="cuda", dtype=dtype).transpose(1, 2)))

    def sdpa(backend):
        def f(qkv, lm):
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return f

    def fused(qkv, lm):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return small_ops.mita_attention_small(q, k, v, lm, topk, args.r, True, 1 / d)

    def fused_packed(qkv, lm):
        # as MiTAAttention calls it: the backward writes dq, dk, dv into one qkv-shaped gradient (no stack copy)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return small_ops.mita_attention_small(q, k, v, lm, topk, args.r, True, 1 / d, qkv=qkv)

    def general(qkv, lm):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return mita_attention(q, k, v, lm, topk, router_topk=args.r, impl="triton")

    rows = []
    for name, fn in [("sdpa-cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)), ("sdpa-flash", sdpa(SDPBackend.FLASH_ATTENTION))]:
        f, fb = time_fn(fn, sets, args.reps)
        rows.append((name, f, fb, peak(fn, *sets[0])))
    if not args.no_general:
        f, fb = time_fn(general, sets, args.reps)
        rows.append(("mita impl=triton", f, fb, peak(general, *sets[0])))

    orig_f, orig_b = fused_small.fwd_config, fused_small.bwd_config
    orig_count, orig_bias, orig_blocks = fused_small.COUNT_FP32, fused_small.MASK_BIAS, fused_small.MASK_BIAS_BLOCKS

    def mask_form(count):
        fused_small.COUNT_FP32 = count == "fp32"
        fused_small.MASK_BIAS = (orig_bias or 4096.0) if count.startswith("bias") else 0.0
        fused_small.MASK_BIAS_BLOCKS = count == "bias-blocks"

    for (fwd_spec, bwd_spec), count in itertools.product(combos, counts):
        fcfg, bcfg, label = config_functions(fwd_spec, bwd_spec)
        label += "" if len(counts) == 1 else f" mask {count}"
        fused_small.fwd_config, fused_small.bwd_config = fcfg, bcfg
        mask_form(count)
        fused_small.LAUNCHED.clear()
        try:
            errs = check(2, 3, N, d, m, topk, args.r, True, dtype)
            if not all(e <= 1e-2 for e in errs):
                rows.append((f"{label} WRONG " + " ".join(f"{e:.0e}" for e in errs), float("nan"), float("nan"),
                             float("nan")))
                continue
            f, fb = time_fn(fused, sets, args.reps)
            rows.append((label, f, fb, peak(fused, *sets[0])))
            res = {k: (getattr(v, "n_regs", "?"), getattr(v, "n_spills", "?"), getattr(v, "metadata", None) and
                       v.metadata.shared) for k, v in fused_small.LAUNCHED.items()}
            print(label, "regs/spills/smem", res, flush=True)
            if args.kernel_times:
                print(label, "kernel us", kernel_times(fused, sets), flush=True)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
            rows.append((f"{label} FAILED {type(e).__name__}", float("nan"), float("nan"), float("nan")))
    fused_small.fwd_config, fused_small.bwd_config = orig_f, orig_b
    for count in counts if not combos else ():
        mask_form(count)
        f, fb = time_fn(fused, sets, args.reps)
        rows.append(("mita fused (default configs)" + ("" if len(counts) == 1 else f" mask {count}"), f, fb,
                     peak(fused, *sets[0])))
    fused_small.COUNT_FP32, fused_small.MASK_BIAS, fused_small.MASK_BIAS_BLOCKS = orig_count, orig_bias, orig_blocks
    if not combos:
        # the packed gradient gives the same values as the three separate ones
        (x, do) = sets[0]
        want, got = _grad(fused(*x), x, do), _grad(fused_packed(*x), x, do)
        if all((a is None and b is None) or torch.equal(a, b) for a, b in zip(want, got)):
            f, fb = time_fn(fused_packed, sets, args.reps)
            rows.append(("mita fused, qkv= (as MiTAAttention)", f, fb, peak(fused_packed, *sets[0])))
        else:
            rows.append(("mita fused, qkv= WRONG", float("nan"), float("nan"), float("nan")))
    if args.pool:
        rows.extend(pooling_rows(sets, N, m, topk, args.r, d, args.reps, args.kernel_times))
    if args.kernel_times:
        print("default configs, routing passed in, kernel us",
              kernel_times(lambda qkv, lm: fused_given(qkv, lm, topk, args.r, d), sets), flush=True)

    if args.queued:
        print(f"\nforward, queued back to back (no grad), ms a call: median of 5 rounds of {args.reps} calls:")
        for name, fn in (("sdpa-cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)), ("sdpa-flash", sdpa(SDPBackend.FLASH_ATTENTION)),
                         ("mita fused (default configs)", fused)):
            print(f"  {name:38s} {queued_ms(fn, sets, args.reps):8.3f}", flush=True)
    if args.prep_parts:
        prep_parts(sets, N, m, topk, args.r, d)
    if args.profile:
        profile(fused, sets, given=lambda qkv, lm: fused_given(qkv, lm, topk, args.r, d))
    if args.host:
        for name, fn in (("sdpa-cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)), ("mita fused", fused)):
            print(f"host time {name}: forward {host_us(fn, sets, False):.0f} us, "
                  f"forward+backward {host_us(fn, sets, True):.0f} us", flush=True)
        host_profile(fused, sets)
    cud = rows[0]
    print(f"\n{dev}, bf16, B={B} H={H} N={N} d={d} m={m} k={topk} r={args.r}, median of {args.reps}")
    print(f"{'method':38s} {'fwd ms':>8s} {'f+b ms':>8s} {'fwd/cuDNN':>10s} {'f+b/cuDNN':>10s} {'peak MiB':>9s}")
    for name, f, fb, pk in rows:
        print(f"{name:38s} {f:8.3f} {fb:8.3f} {f / cud[1]:10.2f} {fb / cud[2]:10.2f} {pk:9.1f}")


# forward: warps/BQ/BK/query blocks a program (0: all)/stages/landmarks a prep program (0: selection and shared
# values inside the attention kernel)/warps a prep program[/passes of the value-space top-k search[/passes of the
# bitwise search between checks whether every row is done]];
# backward: warps/BQ/BK/one program a head (0/1; 2: with keys as the rows of its tiles, BQ-query chunks)/stages
# [/1: the block backward in two launches]
# (the first round's 16-warp, value-search and split-backward configs are in results/short_path_h200/)
# The defaults first (forward 8 warps, 128 x 64 blocks, prep 32 landmarks on 4 warps; per-head backward, 32-key
# blocks, 3 stages), then the prep launch's shapes that compile without spills for sm_90 (Triton 3.8: 32 landmarks on
# 8 warps 158 registers, 16 on 4 138, 16 on 2 239; 32 on 2 and 16 on 1 spill) and the backward's 2 stages (64-key
# blocks spill 1.4 KB a thread)
SWEEP_FWD = [(8, 128, 64, 1, 1, 32, 4), (8, 128, 64, 1, 1, 32, 8), (8, 128, 64, 1, 1, 16, 4),
             (8, 128, 64, 1, 1, 16, 2)]
SWEEP_BWD = [(8, 64, 32, 1, 3), (8, 64, 32, 1, 2)]


def config_combos(spec: str):
    """``(forward, backward)`` config tuples of ``--configs``: 'default' (none: the package's own), 'sweep', or
    ``fwd=...,bwd=...`` combos separated by ';'."""
    if spec == "default":
        return []
    if spec == "sweep":
        return [(fc, SWEEP_BWD[0]) for fc in SWEEP_FWD] + [(SWEEP_FWD[0], bc) for bc in SWEEP_BWD[1:]]
    combos = []
    for combo in spec.split(";"):
        parts = dict(x.split("=") for x in combo.split(","))
        fwd, bwd = (tuple(int(v) for v in parts[key].split("/")) for key in ("fwd", "bwd"))
        if len(fwd) not in (7, 8, 9) or len(bwd) not in (5, 6):
            raise ValueError(f"{combo!r}: fwd takes 7 to 9 numbers, bwd 5 or 6")
        combos.append((fwd, bwd))
    return combos


def config_functions(fwd_spec, bwd_spec):
    """Replacements for ``fused_small.fwd_config`` / ``bwd_config`` from one combo, and its label."""
    fw, fq, fk, fp, fs, fm, fmw, *more = fwd_spec
    search = more[0] if more else 0
    check = more[1] if len(more) > 1 else 1
    bw, bq, bk, bh, bs, *more = bwd_spec
    split = bool(more and more[0])

    def fcfg(G, n_pad, *a):
        bqq, bkk = min(fq, n_pad), min(fk, n_pad)
        return {"BQ": bqq, "BK": bkk, "QB_PER_PROG": fp or triton_cdiv(n_pad, bqq), "num_warps": fw,
                "num_stages": fs, "prep_bm": fm, "prep_warps": fmw, "select_search": search,
                "select_check": check}

    def bcfg(n_pad, *a):
        return {"BQ": min(bq, n_pad), "BK": min(bk, n_pad), "num_warps": bw, "num_stages": bs, "per_head": bool(bh),
                "key_rows": bh == 2, "split": split}

    label = (f"fused f{fw}/{fq}/{fk}/{fp}/{fs}/{fm}/{fmw}" + (f"/s{search}" if search else "")
             + (f"/c{check}" if check != 1 else "")
             + f" b{bw}/{bq}/{bk}/{bh}/{bs}" + ("/split" if split else ""))
    return fcfg, bcfg, label


def pooling_rows(sets, N, m, topk, r, d, reps, kernel_us=False):
    """The fused path with the landmarks pooled from q: by ``pool_patch_queries`` in PyTorch, and inside the
    kernels from the same windows' ``[m, N]`` weights (checked against each other first)."""
    side, grid = math.isqrt(m), math.isqrt(N - 1)
    eye = torch.eye(N, dtype=torch.float64).view(1, 1, N, N)
    W = pool_patch_queries(eye, 1, grid, grid, (side, side))[0, 0].float().cuda()  # [m, N]

    def outside(qkv, lm):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        R = pool_patch_queries(q, 1, grid, grid, (side, side))
        return small_ops.mita_attention_small(q, k, v, R, topk, r, True, 1 / d)

    def inside(qkv, lm):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return kernels.mita_attention_fused(q, k, v, None, topk, r, True, 1 / d, pool=W)

    def inside_whole(qkv, lm):
        # as a timm model's MiTAAttention calls it: q, k, v handed over as the one qkv tensor
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return kernels.mita_attention_fused(q, k, v, None, topk, r, True, 1 / d, pool=W,
                                            qkv=kernels.qkv_source(q, k, v))

    previous, kernels.POOL_IN_KERNEL = kernels.POOL_IN_KERNEL, True
    try:
        x, _ = sets[0]
        a, b = outside(*x), inside(*x)
        agree = rel_err(a, b)
        rows = []
        assert rel_err(inside(*x), inside_whole(*x)) == 0
        for name, fn in (("fused, pooling before the op", outside), ("fused, pooling in the kernels", inside),
                         ("fused, pooled in kernel, qkv whole", inside_whole)):
            f, fb = time_fn(fn, sets, reps)
            rows.append((name, f, fb, peak(fn, *sets[0])))
            if kernel_us:
                print(name, "kernel us", kernel_times(fn, sets), flush=True)
        print(f"pooling inside against before: relative difference of the outputs {agree:.1e}", flush=True)
        return rows
    finally:
        kernels.POOL_IN_KERNEL = previous


def prep_parts(sets, N, m, topk, r, d, iters=10, device="cuda"):
    """Mean GPU microseconds of the forward kernels (``fused_small.forward`` alone, no autograd) with the prep
    launch's parts on and off: selection (off: the routing passed in), shared values, pooling from q."""
    side, grid = math.isqrt(m), math.isqrt(N - 1)
    eye = torch.eye(N, dtype=torch.float64).view(1, 1, N, N)
    W = fused_small.pool_weights(pool_patch_queries(eye, 1, grid, grid, (side, side))[0, 0].float().to(device))
    x = [(qkv.detach(), lm.detach()) for (qkv, lm), _ in sets]
    q, k, v = x[0][0].permute(2, 0, 3, 1, 4)
    _, _, sel, expert, *_ = fused_small.forward(q, k, v, x[0][1], topk, r, True, 1 / d)
    cases = {
        "selection + shared values (landmarks given)": dict(),
        "selection only (shared off)": dict(shared=False),
        "shared values only (routing passed in)": dict(sel=sel, expert=expert),
        "routing passed in, shared off": dict(sel=sel, expert=expert, shared=False),
        "pooling + selection + shared values": dict(pool=W, num_landmarks=m),
        "pooling + shared values (routing passed in)": dict(pool=W, num_landmarks=m, sel=sel, expert=expert),
    }
    print(f"\nforward kernels, GPU us a call (mean of {iters}), B H = {q.shape[0] * q.shape[1]}, N = {N}, m = {m}:")
    for label, kw in cases.items():
        shared = kw.pop("shared", True)

        def call(i, kw=kw, shared=shared):
            qq, kk, vv = x[i % len(x)][0].permute(2, 0, 3, 1, 4)
            fused_small.forward(qq, kk, vv, x[i % len(x)][1], topk, r, shared, 1 / d, **kw)

        for i in range(3 if device == "cuda" else 1):
            call(i)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        with prof_ctx(activities=[ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU]) as prof:
            for i in range(iters):
                call(i)
            sync()
        times = {}
        for e in prof.key_averages():
            t = event_device_us(e)
            if t and e.key.startswith("_") and "kernel" in e.key:
                times[e.key] = round(t / iters, 1)
        print(f"  {label:48s} {times}", flush=True)


def fused_given(qkv, lm, topk, r, d, _cache={}):
    """The fused path with a routing passed in (no selection in the kernel): routing made once per input."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    key = id(qkv)
    if key not in _cache:
        _cache[key] = mita_routing(q.detach(), k.detach(), lm.detach(), topk, r)
    return small_ops.mita_attention_small(q, k, v, lm, topk, r, True, 1 / d, routing=_cache[key])


def profile(fused, sets, given):
    for name, fn in (("own selection", fused), ("given routing", given)):
        for x, do in sets:
            _grad(fn(*x), x, do)
        torch.cuda.synchronize()
        with prof_ctx(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(10):
                x, do = sets[i % len(sets)]
                _grad(fn(*x), x, do)
            torch.cuda.synchronize()
        print(f"\nprofile, fused path, {name}, 10 forward+backward:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def kernel_times(fn, sets, iters=6):
    """Mean GPU microseconds per call of each Triton kernel (and of everything else) over ``iters`` f+b."""
    for x, do in sets:
        _grad(fn(*x), x, do)
    torch.cuda.synchronize()
    with prof_ctx(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            x, do = sets[i % len(sets)]
            _grad(fn(*x), x, do)
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = event_device_us(e)
        if t and e.key.startswith("_") and "kernel" in e.key:
            out[e.key] = round(t / iters, 1)
        elif t:
            out["other"] = round(out.get("other", 0) + t / iters, 1)
    return out


def host_us(fn, sets, backward, reps=50):
    """Median host microseconds of one call (forward, or forward+backward), the GPU idle at its start."""
    times = []
    for i in range(reps + 5):
        x, do = sets[i % len(sets)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*x)
        if backward:
            _grad(out, x, do)
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times[5:]) * 1e6


def host_profile(fn, sets, reps=50):
    """cProfile of ``reps`` forward+backward calls: the 25 functions with the most own time."""
    for x, do in sets:
        _grad(fn(*x), x, do)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for i in range(reps):
        x, do = sets[i % len(sets)]
        _grad(fn(*x), x, do)
        torch.cuda.synchronize()
    prof.disable()
    print(f"\ncProfile of {reps} forward+backward calls of the fused path (own time):")
    pstats.Stats(prof).strip_dirs().sort_stats("tottime").print_stats(25)


def triton_cdiv(a, b):
    return -(-a // b)


if __name__ == "__main__":
    main()
