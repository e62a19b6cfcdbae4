"""Streamed exact top-k of the landmark-key scores (kernels/topk_stream.py) against ``R K^T`` + ``torch.topk``.

Needs the package installed (``pip install -e .``: ``mita.kernels`` is the checkout's kernels/).

    python3 scripts/bench_topk.py                      # every case, bf16, d = 64: about a minute on an H200
    python3 scripts/bench_topk.py --cases 2 --reps 20  # only the third case (0-based), fewer reps
    python3 scripts/bench_topk.py --smoke              # CPU: Triton's interpreter, two tiny cases (tests)
    python3 scripts/bench_topk.py --config block_m=64,num_warps=8   # override the launch configuration
    python3 scripts/bench_topk.py --config scan=1 --kernel-times    # prefix-sum collection; GPU time a kernel
    python3 scripts/bench_topk.py --cases 0,1 --search-config "block_m=16;block_m=64,num_warps=4"  # search configs

Per case (B, H, N, m = k), d = 64: a gate first checks the kernel's index sets against ``torch.topk`` of
fp32 scores of the same inputs (IEEE products, per head), allowing a different choice only where the
row's k-th and (k+1)-th scores lie within 1e-5 of its largest |score| (rounding); a case that fails
is marked FAIL and not timed. Then both methods are timed with CUDA events, median over --reps calls
after --warmup, rotating --sets input sets so that L2 does not hold the keys between calls:

* ``topk_stream``: :func:`mita.kernels.topk_stream.topk_stream` (two passes over the keys, no ``m x N``
  tensor, no host sync; the device-side repair of overflowing rows, a launch that returns at once for
  the others, is inside the timed region);
* ``matmul+topk``: ``landmarks @ k.transpose(-1, -2)`` then ``torch.topk(sorted=False)``;
* ``search_topk`` (up to ``--search-max-n`` keys): :func:`mita.kernels.topk_stream.search_topk`, one launch of
  value-space counting passes over recomputed scores (gated as the stream).

Peak memory: ``torch.cuda.max_memory_allocated`` during one call minus the memory in use before it (the
inputs), i.e. what the method allocates. Effective bandwidth: ``B H ceil(m / block_m) N d`` bytes (the
keys read once per landmark block, ``block_m`` from the kernel's launch configuration) over the time, for
both columns; the kernel itself reads the keys twice (two passes), L2 hits aside.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors; read when Triton is first imported

import torch  # noqa: E402

from mita.kernels.topk_stream import launch_config, search_topk, topk_stream  # noqa: E402

CASES = [  # (B, H, N, m = k)
    (32, 12, 1025, 49),
    (8, 8, 4096, 64),
    (2, 8, 16384, 64),
    (2, 8, 65536, 128),
    (2, 8, 16384, 256),
    (2, 8, 65536, 512),
    (1, 8, 2 ** 20, 512),
]
SMOKE_CASES = [(1, 2, 100, 5), (2, 1, 300, 17)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def baseline(k_keys, landmarks, topk):
    return (landmarks @ k_keys.transpose(-1, -2)).topk(topk, dim=-1, sorted=False).indices


def gate(k_keys, landmarks, topk, config, rtol=1e-5, select=None):
    """Whether the kernel's index sets match torch.topk on fp32 scores (up to rounding ties); checked per head
    so that the fp32 score matrix stays one head large. ``select``: the kernel (default: topk_stream with
    ``config``)."""
    idx = select(k_keys, landmarks, topk) if select else topk_stream(k_keys, landmarks, topk, config=config)
    B, H = k_keys.shape[:2]
    for b in range(B):
        for h in range(H):
            s = landmarks[b, h].float() @ k_keys[b, h].float().T  # [m, N], IEEE: TF32 is off by default
            top = s.topk(min(topk + 1, s.shape[-1]), dim=-1)
            got = idx[b, h].sort(-1).values
            same = (got == top.indices[:, :topk].sort(-1).values).all(-1)
            if topk < s.shape[-1]:
                tol = rtol * s.abs().amax(-1)
                near = top.values[:, topk - 1] - top.values[:, topk] <= tol
                kth_ok = top.values[:, topk - 1] - s.gather(-1, idx[b, h]).amin(-1) <= tol
                if not ((same | near) & kth_ok).all():
                    return False
            elif not same.all():
                return False
    return True


def time_ms(fn, sets, reps, warmup, cuda):
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    times = []
    for i in range(reps):
        args = sets[i % len(sets)]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def kernel_times(fn, sets, topk, calls=6):
    """Mean GPU microseconds a call of each kernel ``fn`` launches (torch.profiler over ``calls`` calls), the
    names cut to 40 characters."""
    from torch.profiler import ProfilerActivity, profile

    fn(*sets[0], topk)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(*sets[i % len(sets)], topk)
        torch.cuda.synchronize()
    from mita.utils.bench import event_device_us

    out = {}
    for e in prof.key_averages():
        us = event_device_us(e)
        if us and getattr(e.device_type, "name", "") == "CUDA":  # the kernels themselves, not the ops launching them
            out[e.key[:40]] = round(out.get(e.key[:40], 0) + us / calls, 1)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def peak_mib(fn, args, cuda):
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def _overrides(spec: str) -> dict:
    """``{key: value}`` from ``key=value,...``: integers, but for ``final`` (``sort`` or ``topk``)."""
    out = {}
    for kv in (w.strip() for w in spec.split(",") if w.strip()):
        key, eq, value = kv.partition("=")
        if not eq or not key or not value:
            raise ValueError(f"expected key=value pairs separated by commas, got {kv!r}")
        if key == "final":
            if value not in ("sort", "topk"):
                raise ValueError(f"final must be sort or topk, got {value!r}")
            out[key] = value
        elif value.lstrip("-").isdigit():
            out[key] = int(value)
        else:
            raise ValueError(f"{key} must be an integer, got {value!r}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="two tiny cases on CPU in Triton's interpreter")
    p.add_argument("--cases", default="", help="comma-separated 0-based case numbers (default: all)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--sets", type=int, default=3, help="input sets rotated between calls")
    p.add_argument("--config", default="", help="launch_config overrides, e.g. block_m=64,num_warps=8")
    p.add_argument("--search-max-n", type=int, default=4096,
                   help="also time the one-launch search_topk up to this many keys (0: never)")
    p.add_argument("--search-config", default="",
                   help="SEARCH_CONFIG overrides, e.g. block_m=64,num_warps=4 (several: separated by ';', each timed)")
    p.add_argument("--kernel-times", action="store_true",
                   help="GPU microseconds of each of topk_stream's kernels per call (torch.profiler, 6 calls)")
    args = p.parse_args()
    try:
        overrides = _overrides(args.config)
    except ValueError as exc:
        p.error(f"--config {args.config!r}: {exc}")
    try:
        search_specs = [(spec, _overrides(spec)) for spec in args.search_config.split(";")]
    except ValueError as exc:
        p.error(f"--search-config {args.search_config!r}: {exc}")
    cuda = torch.cuda.is_available() and not args.smoke
    dev = torch.device("cuda" if cuda else "cpu")
    cases = SMOKE_CASES if args.smoke else CASES
    if args.cases:
        cases = [cases[int(i)] for i in args.cases.split(",")]
    reps, warmup = (2, 1) if args.smoke else (args.reps, args.warmup)
    dtype = torch.float32 if args.smoke else DTYPES[args.dtype]
    d = 32 if args.smoke else args.d
    card = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    import triton

    print(f"# {card}, torch {torch.__version__}, triton {triton.__version__}, {str(dtype)[6:]}, d = {d}, "
          f"median of {reps} calls, {args.sets} input sets" + (f", config {overrides}" if overrides else ""))
    print("| B | H | N | m = k | gate | method | ms | peak MiB | eff. GB/s | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for B, H, N, mk in cases:
        g = torch.Generator(device=dev).manual_seed(N)
        sets = [(torch.randn(B, H, N, d, device=dev, dtype=dtype, generator=g),
                 torch.randn(B, H, mk, d, device=dev, dtype=dtype, generator=g)) for _ in range(args.sets)]
        cfg = launch_config(N, mk, d, B * H, mk, dev)
        cfg.update(overrides)
        ok = gate(*sets[0], mk, cfg)
        kernel = lambda k_, r_, t_: topk_stream(k_, r_, t_, config=cfg)  # noqa: E731
        nbytes = B * H * math.ceil(mk / cfg["block_m"]) * N * d * sets[0][0].element_size()
        rows = []
        methods = [("topk_stream", kernel, ok)]
        if N <= args.search_max_n:
            for spec, scfg in search_specs:
                search = lambda k_, r_, t_, c=scfg: search_topk(k_, r_, t_, config=c)  # noqa: E731
                name = "search_topk" + (f" {spec}" if spec else "")
                methods.append((name, search, gate(*sets[0], mk, None, select=search)))
        for name, fn, passed in methods:
            if passed:
                ms = time_ms(lambda k_, r_: fn(k_, r_, mk), sets, reps, warmup, cuda)
                rows.append((name, ms, peak_mib(lambda k_, r_: fn(k_, r_, mk), sets[0], cuda), "ok"))
            else:
                rows.append((name, float("nan"), float("nan"), "FAIL"))
        ms = time_ms(lambda k_, r_: baseline(k_, r_, mk), sets, reps, warmup, cuda)
        rows.append(("matmul+topk", ms, peak_mib(lambda k_, r_: baseline(k_, r_, mk), sets[0], cuda), "-"))
        base_ms = rows[-1][1]
        for name, ms, mib, status in rows:
            print(f"| {B} | {H} | {N} | {mk} | {status} | {name} | {ms:.3f} | {mib:.0f} | "
                  f"{nbytes / ms / 1e6:.0f} | {base_ms / ms:.2f} |")
        if args.kernel_times and ok and cuda:
            for name, fn in (("topk_stream", kernel), ("matmul+topk", baseline)):
                print(f"#   kernel us a call, {name}, N={N} m=k={mk}: {kernel_times(fn, sets, mk)}", flush=True)
        del sets
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
