"""The op's host side on any machine (no GPU needed): host time, launches, other device ops and peak memory.

Runs MiTA's forward and backward for a case on "meta" tensors (shapes, strides and dtypes, no data) that the
code takes for CUDA ones, with every Triton launch stood in for at the compiled-kernel level: the op's Python,
torch's dispatch, the launch signatures and the launch cache all run as on a GPU machine, only the driver's
launch call and the kernels themselves do not. It prints, a case a row:

* host time of a forward and of a forward+backward call (median of ``--reps``) on this machine's CPU: not a
  GPU host's (meta tensors skip the CUDA allocator and the driver's launch call, while some torch ops, the
  sort and top-k among them, have meta implementations written in Python), but a measure to compare code
  versions on one machine;
* Triton launches and other device ops (torch ops that would run a kernel on the GPU: copies, fills, sorts;
  not views or bare allocations) in the forward and the backward;
* the peak memory of one forward+backward as ``torch.cuda.max_memory_allocated`` counts it in
  ``scripts/bench_attention.py`` (every storage the call allocates, rounded to 512 bytes, plus one input set:
  q, k, v, dO and the landmarks), in MiB and in units of one ``[B, H, N, d]`` input. SDPA's (cuDNN or flash:
  q, k, v, dO, o, dq, dk, dv and a float32 dq accumulator) is about 10 of those units on the H200
  (BENCHMARKS.md); a buffer made inside a torch op (a sort's scratch) is not counted, and an SDPA call (the
  shared values of fp32 inputs) takes PyTorch's math backend on meta tensors, whose m x N probabilities a GPU's
  fused backends do not keep: fp32 peaks are overstated here.

A call that syncs with the host (``.item()``, ``.tolist()``) fails here: meta tensors hold no values.

    python3 scripts/dry_run.py                                # bench_attention's d64 cases
    python3 scripts/dry_run.py --cases vit-b-512 --detail     # the launches and what is live at the peak
    python3 scripts/dry_run.py --shape 8,8,4096,64,64,64 --switches resident
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as bench  # noqa: E402  (the cases, switches and the timed call's method)

# allocation without a kernel; every other op that writes memory it did not alias from an input runs one
_ALLOCATIONS = {"aten::empty", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
                "aten::empty_like"}


class _Compiled:
    """Stands in for a compiled Triton kernel: its launcher records the launch and runs nothing."""

    function = None

    def __init__(self, record):
        self._record = record

    def run(self, *args, **kwargs):
        self._record()

    def __getitem__(self, grid):
        record = self._record

        def runner(*args):
            record()
        return runner


class StandIn:
    """Patches Triton's launches (``kernel[grid](...)`` returns a :class:`_Compiled` after counting the launch),
    ``mita.kernels``' availability check and ``Tensor.is_cuda`` (True: the op takes its GPU paths), and clears
    the launch cache on both sides, so that no stand-in launcher outlives the patch."""

    def __init__(self):
        self.launches = [0]
        self.names: List[Tuple[str, tuple, Optional[int]]] = []
        self._saved = []

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        import mita.kernels as kernels
        from mita.kernels import launch as launch_mod

        counter, names = self.launches, self.names

        def getitem(kernel, grid):
            def call(*args, **kwargs):
                entry = (kernel.fn.__name__, tuple(grid) if isinstance(grid, tuple) else grid, kwargs.get("num_warps"))

                def record():
                    counter[0] += 1
                    names.append(entry)
                record()
                return _Compiled(record)
            return call

        self._saved = [(JITFunction, "__getitem__", JITFunction.__getitem__),
                       (kernels, "_interpreting", kernels._interpreting)]
        self._runners = launch_mod._RUNNERS
        self._runners.clear()
        JITFunction.__getitem__ = getitem
        kernels._interpreting = lambda: True
        torch.Tensor.is_cuda = property(lambda self: True)
        return self

    def __exit__(self, *exc):
        del torch.Tensor.is_cuda
        for obj, attr, old in reversed(self._saved):
            setattr(obj, attr, old)
        self._runners.clear()
        from mita.kernels import fused_small

        fused_small.LAUNCHED.clear()


class MemoryModel(TorchDispatchMode):
    """Every storage a torch op creates (rounded up to 512 bytes, as CUDA's caching allocator counts it), live
    until its last tensor dies: ``peak`` bytes, what was live then, and the device ops run (see the module
    docstring)."""

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.live: Dict[int, Tuple[object, int, str]] = {}
        self.current = self.peak = 0
        self.at_peak: List[Tuple[int, str]] = []
        self.device_ops = 0

    def _collect(self):
        for key in [key for key, (ref, _, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._collect()
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        wrote = any(r.alias_info is not None and r.alias_info.is_write for r in func._schema.returns)
        new = False
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self.live:
                continue
            new = True
            size = -(-storage.nbytes() // 512) * 512
            self.live[key] = (self._ref(storage), size, f"{name} {tuple(t.shape)} {str(t.dtype)[6:]} @ {_site()}")
            self.current += size
        if wrote or (new and name not in _ALLOCATIONS):
            self.device_ops += 1
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = sorted(((size, what) for _, size, what in self.live.values()), reverse=True)
        return out


def _site() -> str:
    """The innermost frame of the package (kernels/ or mita/) that led to an allocation, else 'autograd'."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        parts = Path(frame.filename).parts
        if "kernels" in parts or "mita" in parts:
            return f"{parts[-1]}:{frame.lineno} {frame.name}"
    return "autograd"


def _inputs(case, dtype) -> Dict[str, torch.Tensor]:
    shapes = {"q": case.N, "k": case.N, "v": case.N, "lm": case.m, "do": case.N}
    return {key: torch.empty(case.B, case.H, rows, case.d, device="meta", dtype=dtype, requires_grad=key != "do")
            for key, rows in shapes.items()}


def _call(fn, x):
    for key in ("q", "k", "v", "lm"):
        x[key].grad = None
    out = fn(x["q"], x["k"], x["v"], x["lm"])
    return out


def dry_run(case, dtype=torch.bfloat16, reps: int = 30) -> dict:
    """Host times (us), launch and device-op counts, the launches' list and the memory model of one case (the
    bench's ``mita-triton`` method: routing inside the call)."""
    fn = bench.method_fn("mita-triton", case)
    x = _inputs(case, dtype)
    set_bytes = sum(t.numel() * t.element_size() for t in x.values())
    one = case.B * case.H * case.N * case.d * x["q"].element_size()
    with StandIn() as stand_in:
        _call(fn, x).backward(x["do"])  # plans and launch caches made, as after a warm-up
        fwd, fb = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = _call(fn, x)
            t1 = time.perf_counter()
            out.backward(x["do"])
            fb.append(time.perf_counter() - t0)
            fwd.append(t1 - t0)
            del out
        stand_in.names.clear()
        stand_in.launches[0] = 0
        with MemoryModel() as model:
            out = _call(fn, x)
            launches_fwd, ops_fwd, names_fwd = stand_in.launches[0], model.device_ops, list(stand_in.names)
            out.backward(x["do"])
            del out
        launches_bwd = stand_in.launches[0] - launches_fwd
        names_bwd = stand_in.names[len(names_fwd):]
    return {
        "host_fwd_us": statistics.median(fwd) * 1e6, "host_fb_us": statistics.median(fb) * 1e6,
        "launches": (launches_fwd, launches_bwd), "device_ops": (ops_fwd, model.device_ops - ops_fwd),
        "peak_mib": (model.peak + set_bytes) / 2**20, "peak_units": (model.peak + set_bytes) / one,
        "at_peak": model.at_peak, "names": (names_fwd, names_bwd),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="d64", help="bench_attention case names or sets (d64, d128, all)")
    p.add_argument("--shape", default="", help="B,H,N,d,m,k: this shape instead of --cases")
    p.add_argument("--switches", default="", help="bench_attention's --switches (general-path options)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--reps", type=int, default=30, help="timed calls a case (median reported)")
    p.add_argument("--detail", action="store_true", help="also list each case's launches and the live buffers at "
                                                         "the peak")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error(f"--reps must be >= 1, got {args.reps}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.shape:
        try:
            B, H, N, d, m, k = (int(v) for v in args.shape.split(","))
        except ValueError:
            p.error(f"--shape must be six integers B,H,N,d,m,k, got {args.shape!r}")
        cases = [bench.Case(f"B={B} H={H} N={N} d={d} m={m} k={k}", B, H, N, d, m, k)]
    else:
        cases = bench.select_cases(args.cases, False)
    for name, on in bench.parse_switches(args.switches):
        bench.set_switch(name, on)
    print(f"# host side of mita-triton, {args.dtype}, torch {torch.__version__}, switches: {args.switches or 'defaults'}; "
          "host time on this machine's CPU with the launches stood in for (to compare code versions, not a GPU host's)")
    print("| case | shape | host fwd us | host f+b us | Triton launches fwd / bwd | other device ops fwd / bwd "
          "| peak MiB | peak / one input |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    details = []
    for case in cases:
        r = dry_run(case, dtype, args.reps)
        print(f"| {case.name} | {case.shape} | {r['host_fwd_us']:.0f} | {r['host_fb_us']:.0f} | "
              f"{r['launches'][0]} / {r['launches'][1]} | {r['device_ops'][0]} / {r['device_ops'][1]} | "
              f"{r['peak_mib']:.0f} | {r['peak_units']:.2f} |", flush=True)
        details.append((case, r))
    if args.detail:
        for case, r in details:
            print(f"\n## {case.name}: launches (kernel, grid, warps)")
            for phase, names in zip(("forward", "backward"), r["names"]):
                print(f"{phase}:")
                for kernel, grid, warps in names:
                    print(f"  {kernel} {grid} {warps or ''}")
            print(f"live at the peak ({r['peak_mib']:.0f} MiB with the input set), largest first:")
            for size, what in r["at_peak"][:12]:
                print(f"  {size / 2**20:9.2f} MiB  {what}")


if __name__ == "__main__":
    main()
