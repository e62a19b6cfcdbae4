"""Issue 3's attention benchmark: a correctness gate, then forward, backward and forward+backward times.

    python3 scripts/bench_attention.py --out results/bench                  # every case, d=64 and d=128: ~5 min on an H100
    python3 scripts/bench_attention.py --quick --out results/bench          # d=64 cases, 5 reps: ~2 min
    python3 scripts/bench_attention.py --cases deit-s,n16k-k64 --reps 50
    python3 scripts/bench_attention.py --cases n1m-k512 --methods mita-triton --reps 3 --no-profile
    python3 scripts/bench_attention.py --cases n16k-k64 --methods mita-triton --host    # where the host time goes
    python3 scripts/bench_attention.py --methods sdpa-cudnn,mita-triton,mita-triton+resident  # A/B in one process
    python3 scripts/bench_attention.py --methods sdpa-cudnn,mita-triton,sdpa-cudnn@graphed,mita-triton@graphed
    python3 scripts/bench_attention.py --cases smoke --out results/bench     # seconds: every method on two tiny shapes
    python3 scripts/bench_attention.py --cpu-smoke --out /tmp/bench   # tiny CPU run of the whole pipeline (tests)

Methods, each timed on the same inputs in the same run: SDPA with the cuDNN backend, SDPA with the flash
backend, the plain-PyTorch MiTA of :mod:`mita.baselines` (queries sorted by expert, padded, one SDPA),
``mita_attention(impl="torch")`` and ``mita_attention(impl="triton")``. The MiTA methods compute their
own routing inside the timed region (``routing=None``), as a model calls them.

Per case and MiTA method, a gate runs first at a reduced batch (B, H <= 2) with one routing fed to both
sides: output and the gradients of q, k, v and the landmarks against ``impl="reference"`` in float64
on the same (rounded) inputs, or against the exact chunked float64 formulation
(:func:`mita.baselines.chunked_reference_attention`) where the dense N x N reference does not fit.
A relative error ||a - b|| / ||b|| above --tol marks the method FAIL for that case, and it is not timed.

A method named with the suffix ``@graphed`` is the same method with its forward and backward captured in CUDA
graphs (``torch.cuda.make_graphed_callables``, one pair per input set, whose tensors are the graphs' static
inputs: no copies) and replayed: the GPU's time without the host's launches, as a model under
``torch.compile(mode="reduce-overhead")`` or CUDA graphs runs it; its ratios are taken against the baselines
graphed the same way (``sdpa-cudnn@graphed``), and its peak memory is not measured (the graphs' pools are
allocated at capture).

Timing: CUDA events around the forward and the backward of each repetition (median over --reps after
--warmup calls), input sets rotated when one set fits in L2, torch.cuda.synchronize before reading the
events. A method that runs out of memory, or whose single forward+backward takes longer than
--max-call-s, is recorded as skipped, as is everything left once --max-total-s has passed. Peak memory is
torch.cuda.max_memory_allocated over one forward+backward after a reset, counting one input set
(q, k, v, landmarks, dO) plus everything the method allocates. Effective bandwidth = the fewest bytes
a phase must move (forward: q, k, v, o; backward and forward+backward: q, k, v, o, dO, dq, dk, dv, each
once) over its time, beside a device-to-device copy rate measured in the same run (bytes read +
written). For ``impl="triton"`` one profiled forward+backward gives the time spent in mita's own
Triton kernels (kernels.csv lists every kernel).

Writes ``attention.csv``, ``kernels.csv`` and ``attention.png`` to --out, prints the forward/backward
and bandwidth tables, then the card, versions and the main table last.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from mita import kernels
from mita.baselines import chunked_reference_attention, plain_mita_attention
from mita.functional import mita_attention, mita_routing
from mita.utils.bench import Clock, copy_rate, environment, l2_bytes, markdown, rel_err, write_csv

log = logging.getLogger("bench_attention")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METHODS = ("sdpa-cudnn", "sdpa-flash", "plain-mita", "mita-torch", "mita-triton")
MITA_METHODS = ("plain-mita", "mita-torch", "mita-triton")
# Dense float64 reference while its N x N tensors stay under this many elements (512 MB each).
DENSE_REFERENCE_LIMIT = 1 << 26


@dataclass(frozen=True)
class Case:
    """One benchmark shape; ``bar`` = (baseline method, least speedup of mita-triton f+b, wording)."""

    name: str
    B: int
    H: int
    N: int
    d: int
    m: int
    k: int
    family: str = "paper"
    bar: Optional[Tuple[str, float, str]] = None

    @property
    def shape(self) -> str:
        return f"B={self.B} H={self.H} N={self.N} d={self.d} m=k={self.m}" if self.m == self.k else \
            f"B={self.B} H={self.H} N={self.N} d={self.d} m={self.m} k={self.k}"


_D64 = [
    Case("deit-s", 256, 6, 197, 64, 25, 25, bar=("sdpa-cudnn", 1 / 1.3, "<= 1.3x SDPA-cuDNN time")),
    Case("vit-b-512", 32, 12, 1025, 64, 49, 49, bar=("sdpa-cudnn", 1.4, ">= 1.4x SDPA-cuDNN")),
    Case("n4k-k64", 8, 8, 4096, 64, 64, 64, bar=("sdpa-cudnn", 3.0, ">= 3x SDPA-cuDNN")),
    Case("n16k-k64", 2, 8, 16384, 64, 64, 64, bar=("sdpa-cudnn", 15.0, ">= 15x SDPA-cuDNN")),
    Case("n64k-k128", 2, 8, 65536, 64, 128, 128, bar=("sdpa-cudnn", 40.0, ">= 40x SDPA-cuDNN")),
    Case("n16k-k256", 2, 8, 16384, 64, 256, 256, "generous", ("sdpa-cudnn", 5.0, ">= 5x SDPA-cuDNN")),
    Case("n64k-k512", 2, 8, 65536, 64, 512, 512, "generous", ("sdpa-cudnn", 20.0, ">= 20x SDPA-cuDNN")),
]
# d = 128 twins keep the model width H * d: half the heads, no bar of their own.
CASES: Dict[str, Case] = {c.name: c for c in _D64}
CASES.update({f"{c.name}-d128": replace(c, name=f"{c.name}-d128", H=max(1, c.H // 2), d=128, bar=None)
              for c in _D64})
# One layer at a million tokens (the long-sequence issue's bar: it runs; time and peak memory reported); by
# name only, not in "all" (dense attention takes ~35 s a call there, plain MiTA pads past the memory: pass
# --methods mita-triton).
HUGE_CASES = [Case("n1m-k512", 1, 8, 1 << 20, 64, 512, 512, "generous")]
CASES.update({c.name: c for c in HUGE_CASES})
SMOKE_CASES = [
    Case("smoke-a", 2, 2, 40, 32, 4, 5),
    Case("smoke-b", 1, 2, 90, 64, 6, 6, bar=("sdpa-flash", 1e-9, "smoke bar")),
]
EVERY_CASE_BAR = ("plain-mita", 3.0, ">= 3x plain MiTA")
MEMORY_SLACK = 1.10


def make_inputs(
    case: Case, dtype, device, seed: int, batch: Optional[Tuple[int, int]] = None
) -> Dict[str, torch.Tensor]:
    """q, k, v, landmarks (1-D pooled queries, as the module's ``pool="1d"``) and dO, leaves needing grad."""
    B, H = batch or (case.B, case.H)
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, case.N, case.d, generator=g, device=device, dtype=dtype) for _ in range(4))
    lm = F.adaptive_avg_pool1d(q.reshape(B * H, case.N, case.d).transpose(1, 2).float(), case.m)  # [B H, d, m]
    lm = lm.transpose(1, 2).reshape(B, H, case.m, case.d).to(dtype)  # [B, H, m, d]
    out = {"q": q, "k": k, "v": v, "lm": lm}
    for t in out.values():
        t.requires_grad_()
    out["do"] = do
    return out


def method_fn(name: str, case: Case) -> Callable:
    """``fn(q, k, v, lm, routing=None) -> out [B, H, N, d]`` for a method name."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION}
    if name in backends:
        def sdpa(q, k, v, lm, routing=None):
            with sdpa_kernel(backends[name]):
                return F.scaled_dot_product_attention(q, k, v)
        return sdpa
    if name == "plain-mita":
        return lambda q, k, v, lm, routing=None: plain_mita_attention(q, k, v, lm, case.k, routing=routing)
    impl = {"mita-torch": "torch", "mita-triton": "triton"}[name]
    return lambda q, k, v, lm, routing=None: mita_attention(q, k, v, lm, case.k, routing=routing, impl=impl)


def _grads(out, inputs, do):
    grads = torch.autograd.grad(out, inputs, do, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


class Gate:
    """The float64 reference of one case at a reduced batch, computed once and shared by the MiTA methods."""

    names = ("out", "dq", "dk", "dv", "dlandmarks")

    def __init__(self, case: Case, dtype, device, seed: int):
        batch = (min(case.B, 2), min(case.H, 2))
        x = make_inputs(case, dtype, device, seed, batch)
        self.inputs = [x[key].detach() for key in ("q", "k", "v", "lm")]
        self.do = x["do"]
        self.routing = mita_routing(*self.inputs[:2], self.inputs[3], case.k, 1)
        ref_in = [t.double().requires_grad_() for t in self.inputs]
        if batch[0] * batch[1] * case.N ** 2 <= DENSE_REFERENCE_LIMIT:
            self.kind = "dense"
            ref = mita_attention(*ref_in, case.k, routing=self.routing, impl="reference")
        else:
            self.kind = "chunked"
            ref = chunked_reference_attention(*ref_in, case.k, routing=self.routing, max_elements=1 << 25)
        self.expected = [ref.detach()] + _grads(ref, ref_in, self.do.double())

    def check(self, fn: Callable) -> Dict[str, float]:
        inputs = [t.clone().requires_grad_() for t in self.inputs]
        out = fn(*inputs, routing=self.routing)
        got = [out] + _grads(out, inputs, self.do)
        return {name: rel_err(a, b) for name, a, b in zip(self.names, got, self.expected)}


# (module, function) pairs whose host time --host reports, inclusive of what they call
HOST_STAGES = (
    ("mita.functional", "mita_routing"), ("mita.kernels.routing", "_route"), ("mita.kernels.ops", "mita_attention"), ("mita.kernels.ops", "_forward"),
    ("mita.kernels.ops", "_backward"), ("mita.kernels.ops", "_expert_tiles"), ("mita.kernels.ops", "_key_pairs"),
    ("mita.kernels.ops", "routed_forward"), ("mita.kernels.ops", "routed_backward"),
    ("mita.kernels.ops", "shared_backward"), ("mita.kernels.shared", "forward"), ("mita.kernels.shared", "backward"),
    ("mita.kernels.routed", "launch"), ("mita.kernels.shared", "launch"), ("mita.kernels.layout_kernels", "launch"),
    ("mita.kernels", "mita_attention_fused"), ("mita.kernels.fused_small", "_launch"),
)


def host_stages(step: Callable[[], None], sync: Callable[[], None], calls: int = 10) -> List[Tuple[str, float, float]]:
    """Host time spent inside each function of :data:`HOST_STAGES` during ``step`` (inclusive; the device idle
    before each call): ``[(module.function, us a call of step, calls a step)]``, largest first. The functions
    are wrapped for the measurement and restored after; a name a module lacks is skipped."""
    import functools
    import importlib

    spent: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    saved = []

    def timer(f, label):
        @functools.wraps(f)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + (time.perf_counter() - t0) * 1e6
                counts[label] = counts.get(label, 0) + 1
        return timed

    for module_name, attr in HOST_STAGES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        original = getattr(module, attr, None)
        if original is None:
            continue
        setattr(module, attr, timer(original, f"{module_name.rsplit('.', 1)[-1]}.{attr}"))
        saved.append((module, attr, original))
    try:
        for _ in range(calls):
            sync()
            step()
        sync()
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)
    return sorted(((n, t / calls, counts[n] / calls) for n, t in spent.items()), key=lambda r: -r[1])


def profile_table(stats, rows: int = 40) -> str:
    """A cProfile of one call in microseconds (pstats prints seconds to 3 decimals: a call's few hundred
    microseconds show as zeros): the functions by time spent in themselves, then by time including callees."""
    entries = [(f"{file}:{line}({name})" if line else name, cc, nc, tt * 1e6, ct * 1e6)
               for (file, line, name), (cc, nc, tt, ct, _) in stats.stats.items()]
    out = [f"{sum(e[2] for e in entries)} function calls, {sum(e[3] for e in entries):.1f} us in all"]
    for title, key in (("by own time", 3), ("by time with callees", 4)):
        out += ["", f"{title}:", f"{'calls':>7} {'own us':>9} {'cum us':>9}  function"]
        for where, _, calls, own, cum in sorted(entries, key=lambda e: -e[key])[:rows]:
            out.append(f"{calls:7d} {own:9.1f} {cum:9.1f}  {where}")
    return "\n".join(out) + "\n"


def triton_kernel_names() -> set:
    """Names of the Triton kernels defined in mita.kernels' modules (as the profiler shows them)."""
    names = set()
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("mita.kernels"):
            continue
        for obj in vars(mod).values():
            if type(obj).__module__.startswith("triton") and hasattr(obj, "fn"):
                names.add(getattr(obj.fn, "__name__", ""))
    return names


def kernel_breakdown(step: Callable[[], None]) -> List[Tuple[str, int, float]]:
    """(kernel name, calls, total ms) of one profiled call of ``step``, longest first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    totals: Dict[str, List[float]] = {}
    for evt in prof.events():
        if evt.device_type != DeviceType.CUDA:
            continue
        entry = totals.setdefault(evt.name, [0, 0.0])
        entry[0] += 1
        entry[1] += evt.time_range.elapsed_us() / 1e3
    return sorted(((name, int(c), t) for name, (c, t) in totals.items()), key=lambda row: -row[2])


class Runner:
    """Times every (case, method) pair and collects CSV rows."""

    def __init__(self, args, device: torch.device):
        self.args = args
        self.device = device
        self.dtype = DTYPES[args.dtype]
        self.clock = Clock(device)
        self.deadline = time.perf_counter() + (args.max_total_s if args.max_total_s is not None else float("inf"))
        self.rows: List[dict] = []
        self.kernel_rows: List[dict] = []
        self.copy_gbs = 0.0  # GB/s, set by main on a GPU

    def step(self, fn: Callable, x: Dict[str, torch.Tensor]):
        """One forward+backward; returns the three marks (before forward, between, after backward)."""
        for key in ("q", "k", "v", "lm"):
            x[key].grad = None
        start = self.clock.mark()
        out = fn(x["q"], x["k"], x["v"], x["lm"])
        mid = self.clock.mark()
        out.backward(x["do"])
        end = self.clock.mark()
        return start, mid, end

    def time_method(self, fn: Callable, sets: List[Dict[str, torch.Tensor]], measure_peak: bool = True) -> dict:
        args, clock = self.args, self.clock
        self.step(fn, sets[0])  # compiles and warms caches: not judged against --max-call-s
        clock.sync()
        wall = time.perf_counter()
        self.step(fn, sets[1 % len(sets)])
        clock.sync()
        wall = time.perf_counter() - wall
        if wall > args.max_call_s:
            return {"status": f"skipped (one call {wall:.1f} s > --max-call-s {args.max_call_s})"}
        for i in range(max(0, args.warmup - 2)):
            self.step(fn, sets[i % len(sets)])
        clock.sync()

        peak = float("nan")
        if self.device.type == "cuda" and measure_peak:
            for x in sets:
                for key in ("q", "k", "v", "lm"):
                    x[key].grad = None
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step(fn, sets[0])
            clock.sync()
            set_bytes = sum(t.numel() * t.element_size() for t in sets[0].values())
            peak = (torch.cuda.max_memory_allocated(self.device) - before + set_bytes) / 2**20

        marks = [self.step(fn, sets[i % len(sets)]) for i in range(args.reps)]
        clock.sync()
        fwd = [clock.ms(a, b) for a, b, _ in marks]
        bwd = [clock.ms(b, c) for _, b, c in marks]
        fb = [clock.ms(a, c) for a, _, c in marks]
        q10, q90 = (statistics.quantiles(fb, n=10)[i] for i in (0, 8)) if len(fb) > 1 else (fb[0], fb[0])
        return {"status": "ok", "fwd_ms": statistics.median(fwd), "bwd_ms": statistics.median(bwd),
                "fb_ms": statistics.median(fb), "fb_spread": (q90 - q10) / statistics.median(fb),
                "peak_mib": peak}

    def run_case(self, case: Case) -> None:
        args = self.args
        torch.manual_seed(args.seed)
        log.info("case %s: %s", case.name, case.shape)
        first = make_inputs(case, self.dtype, self.device, args.seed)
        set_bytes = sum(t.numel() * t.element_size() for t in first.values())
        n_sets = 1 if set_bytes >= l2_bytes(self.device) else min(8, math.ceil(2 * l2_bytes(self.device) / set_bytes))
        sets = [first] + [make_inputs(case, self.dtype, self.device, args.seed + i) for i in range(1, n_sets)]
        with torch.no_grad():
            _, expert = mita_routing(first["q"], first["k"], first["lm"], case.k, 1)
            G = case.B * case.H
            counts = torch.zeros(G, case.m, device=self.device)
            counts.scatter_add_(1, expert.reshape(G, case.N), torch.ones(G, case.N, device=self.device))
            imbalance = (counts.max() / (case.N / case.m)).item()  # largest expert group over the mean
        gate_box = [None]  # the case's correctness gate, made by the first MiTA method
        base = {"case": case.name, "B": case.B, "H": case.H, "N": case.N, "d": case.d, "m": case.m, "k": case.k,
                "dtype": args.dtype, "input_sets": n_sets, "route_max_over_mean": imbalance}
        for name in args.methods:
            row = dict(base, method=name)
            self.rows.append(row)
            if time.perf_counter() > self.deadline:
                row["status"] = "skipped (--max-total-s reached)"
                continue
            base_name, variant = split_method(name)
            fn = method_fn(base_name, case)
            try:
                with switched(variant):
                    self.run_method(case, name, base_name, fn, sets, first, row, gate_box)
            except torch.cuda.OutOfMemoryError:
                row["status"] = "skipped (out of memory)"
            except Exception as exc:  # noqa: BLE001 - one broken method must not lose the others' numbers
                # e.g. an SDPA backend that does not take this dtype or device, or a kernel that fails to build
                first_line = (str(exc).splitlines() or [""])[0][:120]
                row["status"] = f"skipped ({type(exc).__name__}: {first_line})"
                log.debug("  %s failed", name, exc_info=True)
            for x in sets:
                for key in ("q", "k", "v", "lm"):
                    x[key].grad = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log.info("  %-12s %s", name, _summary(row))
        self.add_derived(case)

    def run_method(self, case, name, base_name, fn, sets, first, row, gate_box) -> None:
        """Correctness gate (MiTA methods: the case's gate, made once in ``gate_box``), timings, profile and host
        time of one method on one case."""
        args = self.args
        if base_name in MITA_METHODS:
            if gate_box[0] is None:
                gate_box[0] = Gate(case, self.dtype, self.device, args.seed + 100)
            gate = gate_box[0]
            errs = gate.check(fn)
            row.update({f"err_{key}": val for key, val in errs.items()})
            row["gate_ref"] = gate.kind
            row["gate_err"] = max(errs.values())
            if not row["gate_err"] <= args.tol:
                row["status"] = f"FAIL (rel err {row['gate_err']:.2e} > {args.tol:g})"
                log.warning("  %-12s %s %s", name, row["status"], errs)
                return
        graphed = is_graphed(name)
        if graphed:
            if self.device.type != "cuda":
                row["status"] = "skipped (@graphed needs a CUDA device)"
                return
            fn = graphed_fn(fn, sets)
        row.update(self.time_method(fn, sets, measure_peak=not graphed))
        if graphed:
            return  # the profiler and the host stages would see graph replays only
        if row["status"] == "ok" and base_name == "mita-triton" and self.device.type == "cuda" and args.profile:
            self.profile(case, name, fn, first, row)
        if row["status"] == "ok" and base_name in MITA_METHODS and args.host:
            self.host_profile(case, name, fn, first, row)

    def profile(self, case: Case, name: str, fn: Callable, x: Dict[str, torch.Tensor], row: dict) -> None:
        try:
            kernels = kernel_breakdown(lambda: self.step(fn, x))
        except Exception as exc:  # the profiler is an extra: never lose the timings over it
            log.warning("  profiler failed: %s", exc)
            return
        ours = triton_kernel_names()
        total = sum(t for _, _, t in kernels)
        # kernels, copies and memsets the device ran for one forward+backward (the launch-count bar)
        row["device_ops_fb"] = sum(calls for _, calls, _ in kernels)
        # the device's own time for the call (every kernel, copy and memset): steadier between methods and calls
        # than CUDA events where the host sets the pace
        row["gpu_busy_ms"] = total
        row["triton_kernels_ms"] = sum(t for kname, _, t in kernels if kname in ours)
        row["triton_kernel_share"] = row["triton_kernels_ms"] / total if total else float("nan")
        for kname, calls, t in kernels:
            self.kernel_rows.append({"case": case.name, "method": name, "kernel": kname[:200], "calls": calls,
                                     "total_ms": t, "share": t / total if total else float("nan"),
                                     "mita_triton": kname in ours})

    def host_profile(self, case: Case, name: str, fn: Callable, x: Dict[str, torch.Tensor], row: dict) -> None:
        """Host time of a forward+backward call (Python returns, device idle before it; median of 10), the host
        time inside the op's stages (:func:`host_stages`) and a cProfile of one call, written to
        ``host_<case>_<method>.txt`` in --out."""
        import cProfile
        import io
        import pstats

        times = []
        for _ in range(10):
            self.clock.sync()
            t0 = time.perf_counter()
            self.step(fn, x)
            times.append((time.perf_counter() - t0) * 1e3)
        self.clock.sync()
        row["host_fb_ms"] = statistics.median(times)
        stages = host_stages(lambda: self.step(fn, x), self.clock.sync)
        prof = cProfile.Profile()
        prof.enable()
        self.step(fn, x)
        prof.disable()
        self.clock.sync()
        text = io.StringIO()
        text.write(profile_table(pstats.Stats(prof).strip_dirs()))
        # a variant's name (mita-triton+resident=off) in letters, digits, '.', '_' and '-' only
        path = Path(self.args.out) / f"host_{case.name}_{name.replace('+', '_').replace('=', '-')}.txt"
        table = "".join(f"  {stage:34s} {us:8.1f} us, {calls:4.1f} calls\n" for stage, us, calls in stages)
        path.write_text(f"host ms a forward+backward call (median of 10): {row['host_fb_ms']:.3f}\n"
                        f"host time inside the op's stages a forward+backward call (inclusive, mean of 10 calls):\n{table}\n" + text.getvalue())
        log.info("  %-12s host stages, us a forward+backward call: %s", name,
                 ", ".join(f"{n} {us:.0f}" for n, us, _ in stages[:8]))
        log.info("  %-12s host %.3f ms a forward+backward call; cProfile in %s", name, row["host_fb_ms"], path)

    def add_derived(self, case: Case) -> None:
        """Ratios against the baselines and effective bandwidth, for the rows of ``case``."""
        rows = [r for r in self.rows if r["case"] == case.name]
        by_method = {r["method"]: r for r in rows if r.get("status") == "ok"}
        elem = torch.empty((), dtype=self.dtype).element_size()
        tensor_bytes = case.B * case.H * case.N * case.d * elem
        phase_bytes = {"fwd": 4 * tensor_bytes, "bwd": 8 * tensor_bytes, "fb": 8 * tensor_bytes}
        for r in rows:
            if r.get("status") != "ok":
                continue
            suffix = GRAPHED if is_graphed(r["method"]) else ""  # graphed methods against graphed baselines
            for phase in ("fwd", "bwd", "fb"):
                for base, short in (("sdpa-cudnn", "cudnn"), ("sdpa-flash", "flash"), ("plain-mita", "plain")):
                    if base + suffix in by_method:
                        r[f"x_{short}_{phase}"] = by_method[base + suffix][f"{phase}_ms"] / r[f"{phase}_ms"]
                r[f"bw_{phase}_gbs"] = phase_bytes[phase] / (r[f"{phase}_ms"] * 1e-3) / 1e9
            if self.copy_gbs:
                r["bw_fb_of_copy"] = r["bw_fb_gbs"] / self.copy_gbs
            if r.get("triton_kernels_ms"):
                if self.copy_gbs:
                    kernel_gbs = phase_bytes["fb"] / (r["triton_kernels_ms"] * 1e-3) / 1e9
                    r["bw_kernels_of_copy"] = kernel_gbs / self.copy_gbs


def _summary(row: dict) -> str:
    if row.get("status") != "ok":
        return row.get("status", "")
    ops = f"  {row['device_ops_fb']} device ops" if "device_ops_fb" in row else ""
    return (f"fwd {row['fwd_ms']:.3f} ms  bwd {row['bwd_ms']:.3f} ms  f+b {row['fb_ms']:.3f} ms  "
            f"peak {row['peak_mib']:.0f} MiB{ops}")


def _ms(row: Optional[dict], key: str = "fb_ms") -> str:
    if row is None:
        return "-"
    if row.get("status") != "ok":
        status = row.get("status", "-")
        return "FAIL" if status.startswith("FAIL") else "skipped"
    return f"{row[key]:.3g}"


def _x(value: Optional[float]) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}x"


def _pct(value: Optional[float]) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.0f}%"


def _sdpa_row(rows: Dict[str, dict]) -> Optional[dict]:
    """The SDPA row that memory is compared with: cuDNN (PyTorch's default on Hopper), else flash."""
    return next((rows[b] for b in ("sdpa-cudnn", "sdpa-flash") if rows.get(b, {}).get("status") == "ok"), None)


def bar_verdict(case: Case, rows: Dict[str, dict]) -> Tuple[str, str]:
    """(bar text, verdict) for mita-triton in one case: the case's bar, >= 3x plain MiTA, the forward's ratio
    to the baseline at least the forward+backward's (inference keeps the gain), memory."""
    tri = rows.get("mita-triton")
    bars = ([case.bar] if case.bar else []) + ([EVERY_CASE_BAR] if case.bar else [])
    if not bars:
        return "-", "-"
    texts, verdicts = [], []
    for base, least, text in bars:
        texts.append(text)
        if tri is None or tri.get("status") != "ok" or rows.get(base, {}).get("status") != "ok":
            verdicts.append("?")
            continue
        speedup = rows[base]["fb_ms"] / tri["fb_ms"]
        verdicts.append("yes" if speedup >= least else f"no ({speedup:.2f}x)")
    base = case.bar[0]
    texts.append("fwd ratio >= f+b ratio")
    if tri is None or tri.get("status") != "ok" or rows.get(base, {}).get("status") != "ok":
        verdicts.append("?")
    else:
        fwd, fb = rows[base]["fwd_ms"] / tri["fwd_ms"], rows[base]["fb_ms"] / tri["fb_ms"]
        verdicts.append("yes" if fwd >= fb else f"no ({fwd:.2f}x < {fb:.2f}x)")
    sdpa = _sdpa_row(rows)
    texts.append("mem <= SDPA + 10%")
    if tri is None or tri.get("status") != "ok" or sdpa is None or math.isnan(tri["peak_mib"]):
        verdicts.append("?")
    else:
        ratio = tri["peak_mib"] / sdpa["peak_mib"]
        verdicts.append("yes" if ratio <= MEMORY_SLACK else f"no ({ratio:.2f}x)")
    return "; ".join(texts), "; ".join(verdicts)


def tables(cases: List[Case], rows: List[dict], env: Dict[str, str], copy_gbs: float) -> str:
    """Forward/backward table, bandwidth table, then the header and the main table (printed last)."""
    grouped = {c.name: {r["method"]: r for r in rows if r["case"] == c.name} for c in cases}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fb_body = []
    for c in cases:
        for phase in ("fwd", "bwd"):
            fb_body.append([c.name, phase] + [_ms(grouped[c.name].get(mth), f"{phase}_ms") for mth in methods])
    out = ["Forward and backward, ms (median):", markdown(["case", "phase"] + methods, fb_body), ""]

    bw_body = []
    for c in cases:
        for mth in ("sdpa-cudnn", "mita-torch", "mita-triton"):
            r = grouped[c.name].get(mth)
            if r is None or r.get("status") != "ok":
                continue
            bw_body.append([c.name, mth, f"{r['bw_fwd_gbs']:.4g}", f"{r['bw_bwd_gbs']:.4g}", f"{r['bw_fb_gbs']:.4g}",
                            _pct(r.get("bw_fb_of_copy")), _pct(r.get("triton_kernel_share")),
                            _pct(r.get("bw_kernels_of_copy"))])
    out += [f"Effective bandwidth, GB/s (fewest bytes / time); device-to-device copy: {copy_gbs:.0f} GB/s:",
            markdown(["case", "method", "fwd", "bwd", "f+b", "f+b of copy", "time in mita Triton kernels",
                      "f+b bytes / Triton-kernel time, of copy"], bw_body), ""]

    main_body = []
    for c in cases:
        g = grouped[c.name]
        tri = g.get("mita-triton", {})
        ok = tri.get("status") == "ok"
        torch_row = g.get("mita-torch", {})
        torch_vs_plain = _x(torch_row.get("x_plain_fb")) if torch_row.get("status") == "ok" else "-"
        sdpa = _sdpa_row(g)
        mem = "-"
        if ok and sdpa is not None and not math.isnan(tri["peak_mib"]):
            mem = f"{tri['peak_mib'] / sdpa['peak_mib']:.2f}"
        bar, met = bar_verdict(c, g)
        main_body.append([c.name, c.shape] + [_ms(g.get(mth)) for mth in METHODS]
                         + [_x(tri.get("x_cudnn_fb")) if ok else "-", _x(tri.get("x_flash_fb")) if ok else "-",
                            _x(tri.get("x_plain_fb")) if ok else "-", mem, torch_vs_plain, bar, met])
    busy = [mth for mth in methods if any("gpu_busy_ms" in g.get(mth, {}) for g in grouped.values())]
    if busy:
        body = [[c.name, *(f"{grouped[c.name][mth]['gpu_busy_ms']:.3g}" if "gpu_busy_ms" in grouped[c.name].get(mth, {})
                           else "-" for mth in busy)] for c in cases]
        out += ["GPU busy in one profiled forward+backward, ms (every kernel, copy and memset of the call):",
                markdown(["case", *busy], body), ""]
    graphed = [mth for mth in methods if is_graphed(mth)]
    if graphed:
        body = []
        for c in cases:
            for mth in graphed:
                r = grouped[c.name].get(mth, {})
                if r.get("status") == "ok" and not mth.startswith("sdpa"):
                    body.append([c.name, mth, _ms(r, "fwd_ms"), _ms(r, "bwd_ms"), _ms(r), _x(r.get("x_cudnn_fwd")),
                                 _x(r.get("x_cudnn_fb")), _x(r.get("x_flash_fb"))])
        out += ["Replayed from CUDA graphs (no host launches), ms (median), against the SDPA methods graphed alike:",
                markdown(["case", "method", "fwd", "bwd", "f+b", "fwd vs cuDNN", "f+b vs cuDNN", "f+b vs flash"],
                         body), ""]
    out += [f"card: {env['card']}; torch {env['torch']}; triton {env['triton']}; cuda {env.get('cuda', '-')}; "
            f"cudnn {env.get('cudnn', '-')}; {env['date']}",
            "Forward+backward, ms (median); speedups of mita-triton (and of mita-torch over plain MiTA); "
            "peak memory of mita-triton over SDPA's (cuDNN, else flash); bars of mita-triton:",
            markdown(["case", "shape", *METHODS, "triton vs cuDNN", "vs flash", "vs plain", "mem / SDPA",
                      "torch vs plain", "bars", "met"], main_body)]
    return "\n".join(out)


def plot(path: Path, cases: List[Case], rows: List[dict], env: Dict[str, str]) -> None:
    """Forward+backward time against N, log-log, one panel per head dim; dashed: the generous budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({c.d for c in cases})
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4.5), squeeze=False)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, d in zip(axes[0], dims):
        for mth in METHODS:
            for family, style in (("paper", "-"), ("generous", "--")):
                pts = sorted((r["N"], r["fb_ms"]) for r in rows
                             if r["method"] == mth and r["d"] == d and r.get("status") == "ok"
                             and next(c.family for c in cases if c.name == r["case"]) == family)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=colors[mth],
                            label=mth if family == "paper" else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel("forward+backward, ms (median)")
        ax.set_title(f"d = {d}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"MiTA attention, {env['card']}, torch {env['torch']}; dashed: m=k=256/512", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def select_cases(spec: str, quick: bool) -> List[Case]:
    if spec == "smoke":
        return list(SMOKE_CASES)
    huge = {c.name for c in HUGE_CASES}
    if spec == "all":
        names = [c.name for c in _D64] if quick else [c for c in CASES if c not in huge]
    elif spec in ("d64", "d128"):
        names = [c for c in CASES if c.endswith("-d128") == (spec == "d128") and c not in huge]
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"--cases: unknown case(s) {unknown}; valid: all, d64, d128, smoke or a comma list of "
                         f"{list(CASES)}")
    return [CASES[n] for n in names]


# General-path options (mita.kernels module switches) for A/B timings: name -> (attribute, value when on, value
# when off). ``--switches layout=off,stream-topk`` sets each named one (a bare name: on); the rest keep the
# package's defaults, SWITCH_DEFAULTS (also --switches' help).
SWITCH_DEFAULTS = ("layout, shared-split, eager-fn, mask-bias, dkdv-two and wide on, stream-topk from 2^23 scores a "
                   "head, search-topk up to 2,048 keys, resident, dkdv-wide, transposed, shared-resident, count-fp32, "
                   "mask-bias-blocks, key-tail, topk-scan, compact-rank and fuse-keys off, sort-max 512")
SWITCHES = {
    "layout": ("LAYOUT_KERNELS", True, False),  # routing layout from kernels/layout_kernels.py
    "stream-topk": ("STREAM_TOPK_MIN_SCORES", 1, None),  # landmarks' top-k streamed (kernels/topk_stream.py)
    "search-topk": ("SEARCH_TOPK_MAX_N", 4096, None),  # ... in one search launch up to 4,096 keys (default 2,048)
    "shared-split": ("SHARED_SPLIT_MIN_N", 1, None),  # shared values split over the keys, kernels/shared.py
    "eager-fn": ("EAGER_FUNCTIONS", True, False),  # eager calls skip the custom ops' dispatch (kernels/ops.py)
    "resident": ("ROUTED_RESIDENT", True, False),  # routed forward and dq one program a tile (kernels/routed.py)
    "dkdv-wide": ("DKDV_WIDE", True, False),  # routed dk/dv: resident's program shapes alone (kernels/routed.py)
    "dkdv-two": ("DKDV_TWO_BUFFERS", True, False),  # chunked dk/dv partials: two buffers, one pass a chunk
    "wide": ("ROUTED_WIDE", True, False),  # routed forward: 128-entry, 8-warp blocks where tiles are long
    "transposed": ("ROUTED_TRANSPOSED", True, False),  # forward and dq of short tiles transposed (warp-group MMA)
    "shared-resident": ("SHARED_RESIDENT", True, False),  # shared values' dK, dV: landmarks loaded once a program
    "count-fp32": ("fused_small.COUNT_FP32", True, False),  # short path: expert-mask products in fp32
    "mask-bias": ("fused_small.MASK_BIAS", 4096.0, 0.0),  # short path: the expert mask as a logit bias
    "mask-bias-blocks": ("fused_small.MASK_BIAS_BLOCKS", True, False),  # ... in the block backward (d = 128) too
    "key-tail": ("fused_small.KEY_TAIL", True, False),  # short path: the keys left over in a narrower last block
    # streamed top-k: rows of up to 2,048 candidates ranked by the in-register sort instead of torch.topk
    "sort-max": ("topk_stream._SORT_MAX", 2048, 512),
    # streamed top-k: each tile's candidates collected at once by a prefix sum
    "topk-scan": ("topk_stream._SCAN", True, False),
    # streamed top-k: each row's candidates gathered into one dense list and sorted in a block for their count
    "compact-rank": ("topk_stream._COMPACT", True, False),
    # routed dk/dv partials summed per key in the shared values' key pass (one-pass partials, key-split shared)
    "fuse-keys": ("FUSE_KEYS", True, False),
}


def switch_target(attribute: str):
    """``(object, name)`` a switch sets: an attribute of ``mita.kernels`` or of one of its modules."""
    import importlib

    module, _, name = attribute.rpartition(".")
    return (importlib.import_module(f"mita.kernels.{module}") if module else kernels), name


def set_switch(name: str, on: bool) -> None:
    attribute, on_value, off_value = SWITCHES[name]
    setattr(*switch_target(attribute), on_value if on else off_value)


GRAPHED = "@graphed"


def split_method(name: str) -> Tuple[str, List[Tuple[str, bool]]]:
    """A method and the switches of its variant: ``mita-triton+resident+count-fp32=off`` is mita-triton timed
    with those switches set (and restored after), beside the other methods in the same process; a ``@graphed``
    suffix (:func:`is_graphed`) is not part of either."""
    base, *words = name.removesuffix(GRAPHED).split("+")
    return base, parse_switches(",".join(words))


def is_graphed(name: str) -> bool:
    """Whether a method name asks for its forward and backward replayed from CUDA graphs (``NAME@graphed``)."""
    return name.endswith(GRAPHED)


def graphed_fn(fn: Callable, sets: List[Dict[str, torch.Tensor]]) -> Callable:
    """``fn`` with its forward and its backward captured in CUDA graphs (``torch.cuda.make_graphed_callables``):
    one pair per input set, captured with that set's q, k, v and landmarks as their static inputs (so a replay
    copies nothing in), chosen by the inputs' addresses; ``routing`` is not taken (the gate checks ``fn``)."""
    graphs = {}
    for x in sets:
        args = tuple(x[key] for key in ("q", "k", "v", "lm"))
        graphs[tuple(a.data_ptr() for a in args)] = torch.cuda.make_graphed_callables(
            lambda q, k, v, lm: fn(q, k, v, lm), args, allow_unused_input=True)

    def call(q, k, v, lm, routing=None):
        if routing is not None:
            raise ValueError("a graphed method takes no routing")
        return graphs[(q.data_ptr(), k.data_ptr(), v.data_ptr(), lm.data_ptr())](q, k, v, lm)

    return call


@contextlib.contextmanager
def switched(switches: List[Tuple[str, bool]]):
    """Sets ``switches`` for the duration of the block, then restores the values they had."""
    saved = []
    try:
        for n, on in switches:
            obj, attr = switch_target(SWITCHES[n][0])
            saved.append((obj, attr, getattr(obj, attr)))
            set_switch(n, on)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def parse_switches(spec: str):
    """``[(name, on)]`` from ``--switches`` (``name``, ``name=on`` or ``name=off``, comma-separated)."""
    out = []
    for word in (w.strip() for w in spec.split(",") if w.strip()):
        name, _, state = word.partition("=")
        if name not in SWITCHES or state not in ("", "on", "off"):
            raise ValueError(f"{word!r}: expected NAME, NAME=on or NAME=off with NAME one of {', '.join(SWITCHES)}")
        out.append((name, state != "off"))
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="all",
                        help="all (default), d64, d128, smoke (two tiny shapes), or a comma list of case names")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma list from " + ", ".join(METHODS) + "; a method with +SWITCH (or +SWITCH=off) "
                             "suffixes is timed with those --switches set, beside the others in the same process "
                             "(e.g. mita-triton,mita-triton+resident+count-fp32); a method with the suffix @graphed is replayed "
                             "from CUDA graphs (e.g. sdpa-cudnn@graphed,mita-triton@graphed)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20; --quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 5; --quick 3)")
    parser.add_argument("--quick", action="store_true", help="d=64 cases only, 5 repetitions")
    parser.add_argument("--tol", type=float, default=1e-2, help="gate: largest relative error (default 1e-2)")
    parser.add_argument("--max-call-s", type=float, default=3.0, help="skip a method whose f+b takes longer")
    parser.add_argument("--max-total-s", type=float, default=None,
                        help="skip what is left once the run has taken this many seconds (default: no limit)")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="no profiled kernel breakdown")
    parser.add_argument("--host", action="store_true",
                        help="host (CPU) time of a MiTA forward+backward call, split by the op's stages, and a cProfile "
                             "of one (host_*.txt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--switches", default="",
                        help="general-path options for mita-triton, comma list of NAME, NAME=on or NAME=off; NAME: "
                             + ", ".join(SWITCHES) + f" (default: the package's: {SWITCH_DEFAULTS})")
    parser.add_argument("--out", default="bench_out", help="folder for attention.csv, kernels.csv, attention.png")
    parser.add_argument("--cpu-smoke", "--dry-run", dest="cpu_smoke", action="store_true",
                        help="tiny cases on the CPU in float32, perf_counter timing: checks the pipeline only")
    args = parser.parse_args(argv)
    try:
        args.switches = parse_switches(args.switches)
    except ValueError as exc:
        parser.error(f"--switches: {exc}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = []
    for m in args.methods:
        try:
            if split_method(m)[0] not in METHODS:
                bad.append(m)
        except ValueError:
            bad.append(m)
    if bad:
        parser.error(f"--methods: unknown {bad}; valid: {', '.join(METHODS)}, each optionally with +SWITCH or "
                     f"+SWITCH=off suffixes (a variant timed with those switches: {', '.join(SWITCHES)})")
    if args.reps is None:
        args.reps = 2 if args.cpu_smoke else 5 if args.quick else 20
    if args.warmup is None:
        args.warmup = 2 if args.cpu_smoke else 3 if args.quick else 5
    if args.reps < 1 or args.warmup < 2:
        parser.error("--reps must be >= 1 and --warmup >= 2 (the first call compiles, the second is judged)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.cpu_smoke:
        device = torch.device("cpu")
        # Tiny shapes: one thread beats several fighting over a shared CI machine.
        torch.set_num_threads(1)
        if args.dtype == "bf16":
            args.dtype = "fp32"
        cases = SMOKE_CASES
    else:
        if not torch.cuda.is_available():
            log.error("no CUDA device: run on a GPU, or use --cpu-smoke to check the pipeline")
            return 2
        device = torch.device("cuda")
        try:
            cases = select_cases(args.cases, args.quick)
        except ValueError as exc:
            log.error("%s", exc)
            return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, on in args.switches:
        set_switch(name, on)
    env = environment(device)
    log.info("%s", env)
    switches = " ".join(f"{name}={getattr(*switch_target(attribute))!r}" for name, (attribute, *_) in SWITCHES.items())
    log.info("general-path switches: %s", switches)

    runner = Runner(args, device)
    if device.type == "cuda":
        runner.copy_gbs = copy_rate(device, runner.clock)
        log.info("device-to-device copy: %.0f GB/s (read + write)", runner.copy_gbs)
    for case in cases:
        runner.run_case(case)

    for r in runner.rows:
        r.update(card=env["card"], torch=env["torch"], triton=env["triton"], date=env["date"],
                 copy_gbs=runner.copy_gbs, switches=switches)
    write_csv(out_dir / "attention.csv", runner.rows)
    write_csv(out_dir / "kernels.csv", runner.kernel_rows or [{"case": "", "kernel": "(no profile)"}])
    plot(out_dir / "attention.png", cases, runner.rows, env)
    log.info("wrote %s", ", ".join(str(out_dir / f) for f in ("attention.csv", "kernels.csv", "attention.png")))
    sys.stdout.write(tables(cases, runner.rows, env, runner.copy_gbs) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
