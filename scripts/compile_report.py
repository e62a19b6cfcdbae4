"""What the op's Triton kernels compile to on a Hopper GPU, on any machine (no GPU needed).

Runs MiTA's forward and backward for a case with every kernel launch intercepted (nothing executes: the inputs
live on the CPU and the outputs stay unwritten), then compiles each distinct kernel with the arguments and launch
options it was given, specialized as Triton specializes them at run time (integer values, 16-byte alignment),
for sm_90 with Triton's own ``ptxas``, and prints a table: registers a thread, spilled bytes, shared memory, and
whether ptxas serialized the kernel's wgmma instructions (a large loss on Hopper: "wgmma.mma_async instructions
are serialized ..."), and from the TTGIR how its dots and loads were lowered: ``tl.dot`` calls that became
Hopper's asynchronous warp-group MMA (wgmma) against those left as older MMA instructions, and the loads made
asynchronous copies (pipelined) or TMA. Use it to choose tile shapes and catch spills before timing on the GPU.

    python3 scripts/compile_report.py                          # every case of bench_attention's d64 set
    python3 scripts/compile_report.py --cases deit-s,n64k-k128 --switches resident
    python3 scripts/compile_report.py --cases deit-s --count-fp32 --pool
    python3 scripts/compile_report.py --shape 8,8,4096,64,64,64 # B,H,N,d,m,k

Cases and switches are ``scripts/bench_attention.py``'s (``--switches``: its general-path options). The general
path gets a random routing (its routing kernels are compiled on their own: the expert choice, the streamed
top-k or, with ``--switches search-topk`` where it applies, the one-launch search); the short path (N <= 256) runs as ``MiTAAttention`` calls it (selection in the kernels). Registers and
spills may differ by a few from the GPU's Triton version's; the table says which Triton compiled it.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as bench  # noqa: E402  (the cases and switches)


def _ptxas() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")


class Recorder:
    """Stands in for every kernel launch: records ``(kernel, args, kwargs)`` and runs nothing."""

    def __init__(self):
        self.calls = []

    def launch(self, kernel, grid, args, meta, key=None):
        self.calls.append((kernel, tuple(args), dict(meta)))

    def getitem(self, kernel, grid):
        return lambda *args, **kwargs: self.calls.append((kernel, args, kwargs))

    def install(self, monkey):
        """Patches the launches (undone from ``monkey``, a list of ``(object, attribute, old value)``)."""
        from triton.runtime.jit import JITFunction

        import mita.kernels as kernels
        from mita.kernels import launch as launch_mod

        rec = self
        monkey.append((JITFunction, "__getitem__", JITFunction.__getitem__))
        JITFunction.__getitem__ = lambda kernel, grid: rec.getitem(kernel, grid)
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("mita.kernels") and getattr(mod, "launch", None) is \
                    launch_mod.launch:
                monkey.append((mod, "launch", mod.launch))
                mod.launch = self.launch
        # the kernels' availability checks: Triton is here, the tensors are not on a GPU
        monkey.append((kernels, "_interpreting", kernels._interpreting))
        kernels._interpreting = lambda: True


def compile_report(kernel, args, kwargs, arch: int = 90, float64_scalars: bool = False, dump: str = ""):
    """``(registers, spill bytes (stores, loads), shared bytes, serialized, lowering)`` of ``kernel`` compiled for
    sm_<arch> with these arguments, specialized as at run time; ``lowering`` (:func:`lowering`) from its TTGIR.
    ``float64_scalars``: Python float arguments typed fp64, as inductor types them when it traces a
    ``torch.library.triton_op`` (``mita.kernels.TRITON_OPS``), where Triton's own launcher types them fp32.
    ``dump``: a folder to write the kernel's TTGIR and PTX to (``<kernel>.ttgir``, ``<kernel>.ptx``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("debug", "instrumentation_mode")}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    if float64_scalars:
        floats = {name for name, value in zip(kernel.arg_names, args) if isinstance(value, float)}
        signature = {name: "fp64" if name in floats and ty == "fp32" else ty for name, ty in signature.items()}
    compiled = triton_compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            Path(dump, f"{kernel.fn.__name__}.{ext}").write_text(compiled.asm[ext])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        Path(path).write_text(compiled.asm["ptx"])
        out = subprocess.run([_ptxas(), f"--gpu-name=sm_{arch}a", "-v", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (int(regs.group(1)) if regs else -1, tuple(int(x) for x in spills.groups()) if spills else (-1, -1),
            compiled.metadata.shared, "serialized" in text, lowering(compiled.asm["ttgir"]))


def lowering(ttgir: str) -> dict:
    """Counts in a kernel's TTGIR: ``wgmma`` (dots lowered to warp-group MMA), ``mma`` (dots left as ``tt.dot``,
    lowered later to pre-Hopper MMA or FMA), ``async`` (loads made asynchronous copies into shared memory: the
    pipeliner's) and ``tma`` (tensor-memory-accelerator copies)."""
    return {"wgmma": ttgir.count("ttng.warp_group_dot "), "mma": len(re.findall(r"= tt\.dot ", ttgir)),
            "async": ttgir.count("ttg.async_copy_global_to_local"), "tma": ttgir.count("async_tma_copy")}


def _routing(B, H, N, m, topk, r, gen):
    """A random routing: distinct keys per expert, distinct experts per query."""
    topk_idx = torch.rand(B, H, m, N, generator=gen).argsort(-1)[..., :topk].contiguous()
    expert_idx = torch.rand(B, H, N, m, generator=gen).argsort(-1)[..., :r].contiguous()
    return topk_idx, expert_idx


def record_case(case, dtype, recorder, pool=False):
    """Runs the case's forward and backward (and the routing kernels) with the launches recorded."""
    from mita import kernels
    from mita.kernels import small_ops

    B, H, N, d, m, topk, r = case.B, case.H, case.N, case.d, case.m, case.k, 1
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, d, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    landmarks = torch.randn(B, H, m, d, generator=gen).to(dtype).requires_grad_()
    scale = 1.0 / d
    if small_ops.supports(q, landmarks, topk, r) and kernels.FUSED_SMALL:
        from mita.kernels import fused_small

        if pool and fused_small.pools_in_kernel(N, d, q.element_size()):
            # as MiTAAttention calls it: [m, N] pooling weights, the landmarks pooled from q in the kernels
            weights = torch.full((m, N), 1.0 / N)
            out = kernels.mita_attention_fused(q, k, v, None, topk, r, True, scale, pool=weights)
        else:
            out = kernels.mita_attention_fused(q, k, v, landmarks, topk, r, True, scale)
    else:
        kernels.route_queries(q.detach(), landmarks.detach(), r)
        from mita.functional import _searches_topk
        from mita.kernels.topk_stream import search_topk, topk_stream

        if _searches_topk(k, landmarks, topk, "triton"):  # as on a GPU (these are CPU tensors)
            search_topk(k.detach(), landmarks.detach(), topk)
        else:
            topk_stream(k.detach(), landmarks.detach(), topk, config={"final": "sort"})  # the GPU's ranking
        out = kernels.mita_attention(q, k, v, landmarks, *_routing(B, H, N, m, topk, r, gen), True, scale)
    out.backward(torch.randn_like(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="d64", help="bench_attention case names or sets (d64, d128, all)")
    p.add_argument("--shape", default="", help="B,H,N,d,m,k: this shape instead of --cases")
    p.add_argument("--switches", default="", help="bench_attention's --switches (general-path options)")
    p.add_argument("--count-fp32", action="store_true", help="short path: fused_small.COUNT_FP32 on")
    p.add_argument("--pool", action="store_true",
                   help="short path: the landmarks pooled from q inside the kernels (as MiTAAttention calls them)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--float64-scalars", action="store_true",
                   help="Python float arguments typed fp64, as inductor passes them to the short path's traced "
                        "kernels (mita.kernels.TRITON_OPS under torch.compile)")
    p.add_argument("--dump", default="", help="folder to write each compiled kernel's TTGIR and PTX to")
    p.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90: sm_90a)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("TRITON_INTERPRET=1 is set: the kernels are then the interpreter's, which do not compile; unset it")
    import triton

    from mita.kernels import fused_small

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.shape:
        B, H, N, d, m, k = (int(x) for x in args.shape.split(","))
        cases = [bench.Case(f"B={B} H={H} N={N} d={d} m={m} k={k}", B, H, N, d, m, k)]
    else:
        cases = bench.select_cases(args.cases, False)
    fused_small.COUNT_FP32 = args.count_fp32
    for name, on in bench.parse_switches(args.switches):
        bench.set_switch(name, on)
    print(f"# compiled for sm_{args.arch}a by Triton {triton.__version__} (ptxas of its package), {args.dtype}; "
          f"switches: {args.switches or 'defaults'}" + ("; short path: fp32 expert counts" if args.count_fp32 else "")
          + ("; Python floats typed fp64" if args.float64_scalars else ""))
    print("| case | kernel | launch options | registers | spills (store/load B) | shared KiB | wgmma | dots: wgmma / other "
          "| loads: async / TMA |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    monkey = []
    recorder = Recorder()
    recorder.install(monkey)
    try:
        for case in cases:
            recorder.calls.clear()
            record_case(case, dtype, recorder, args.pool)
            seen = set()
            for kernel, kargs, kwargs in recorder.calls:
                opts = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "maxnreg")}
                consts = tuple(sorted((k, str(v)) for k, v in kwargs.items() if k not in opts))
                key = (kernel.fn.__name__, consts, tuple(sorted(opts.items())))
                if key in seen:
                    continue
                seen.add(key)
                try:
                    regs, spills, smem, serial, low = compile_report(kernel, kargs, kwargs, args.arch,
                                                                      args.float64_scalars, args.dump)
                    row = (f"{regs} | {spills[0]}/{spills[1]} | {smem / 1024:.1f} | {'SERIALIZED' if serial else 'ok'} | "
                           f"{low['wgmma']} / {low['mma']} | {low['async']} / {low['tma']}")
                except Exception as exc:  # noqa: BLE001 - a kernel that does not compile is reported
                    row = f"- | - | - | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:60]} | - | -"
                short = ",".join(f"{k}={v}" for k, v in kwargs.items() if k in ("BLOCK_M", "BLOCK_K", "BQ", "BK", "BM",
                                                                                   "BN", "KP", "MP", "TPP", "EPP"))
                print(f"| {case.name} | {kernel.fn.__name__} | {short} w{opts.get('num_warps', 4)}"
                      f"/s{opts.get('num_stages', 3)} | {row} |", flush=True)
    finally:
        for obj, attr, value in reversed(monkey):
            setattr(obj, attr, value)


if __name__ == "__main__":
    main()
