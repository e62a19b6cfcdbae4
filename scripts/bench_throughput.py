"""The paper's throughput figure: a 3-layer Transformer, MiTA against full attention, N = 2^10 ... 2^20.

    python3 scripts/bench_throughput.py --out results/bench                 # N = 2^10 .. 2^20: ~4 min on an H100
    python3 scripts/bench_throughput.py --log2n 14,16,18,20 --out results/bench
    python3 scripts/bench_throughput.py --cpu-smoke --out /tmp/tp  # tiny CPU run of the whole pipeline (tests)

Model: three timm ``Block``s (pre-norm, MLP ratio 4, qkv bias) of width 128 with 2 heads (d = 64, the
head width the kernels and SDPA serve best; ``--heads 4`` gives d = 32), then a LayerNorm; the input is
a random sequence [B, N, 128] (no embedding). Each block's ``attn`` is ``MiTAAttention`` (1-D pooled
landmarks, ``impl="auto"``: the Triton kernels on CUDA) or ``StandardAttention`` (SDPA, PyTorch's
default backend choice), or nothing (``none``: an identity, the ceiling no attention can beat, since
the MLPs, norms and projections remain). m * k = N / 4: m = k = sqrt(N) / 2 for even powers of two, k = 2 m for odd ones.

Inference only: ``torch.no_grad()``, weights and activations in bf16 (the whole model cast, no autocast).
Batch per (method, N): one forward at batch 1 measures the peak memory per sample; the batch is the largest
power of two whose estimate fits ``--mem-frac`` of the card's memory, capped by ``--max-tokens`` tokens
per batch and ``--max-batch``, halved on an out-of-memory error. Timing: CUDA events around each forward
after warm-up, median, samples/s = batch / median time; repetitions are chosen to cover about
``--target-s`` seconds (``--min-reps`` to 20). A point whose forward is estimated (from the previous N, quadratic for
full attention, N^1.5 for MiTA) to exceed ``--max-call-s`` is not run: its row says "skipped" and carries
that estimate in the columns named ``extrapolated_*``, never in the measured ones.

The speedup column (MiTA samples/s over full attention's) is set beside the paper's, measured on an
RTX 4090 without kernels: x4.7 at 2^14, x19 at 2^16, x56 at 2^18, x160 at 2^20.
Writes ``throughput.csv`` and ``throughput.png`` to --out and prints the card, versions and table last.
"""
from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

# Benchmark the checkout this script lives in; the shared helpers live beside this file.
from mita.utils.bench import Clock, environment, markdown, write_csv
from mita.attention import create_attention, set_token_layout

log = logging.getLogger("bench_throughput")

PAPER_SPEEDUP = {14: 4.7, 16: 19.0, 18: 56.0, 20: 160.0}  # RTX 4090, MiTA over full attention
# "none": the same model with its attention removed (an identity), whose speed no attention can beat; its
# samples/s over full attention's is the ceiling of any attention's speedup in this model.
METHODS = ("mita", "full", "none")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def landmark_budget(n_tokens: int) -> Tuple[int, int]:
    """(m, k) with m * k = N / 4 for N a power of two >= 4: m = k = sqrt(N) / 2, or k = 2 m."""
    e = int(math.log2(n_tokens))
    if 2 ** e != n_tokens or e < 2:
        raise ValueError(f"N must be a power of two >= 4, got {n_tokens}")
    m = 2 ** ((e - 2) // 2)
    return m, n_tokens // (4 * m)


class _NoAttention(nn.Module):
    """The identity in place of a block's attention (timm's Block passes ``attn_mask`` and ``is_causal``)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        return x


def build_model(method: str, n_tokens: int, args, device, dtype) -> nn.Module:
    """``depth`` timm Blocks with MiTA or standard attention, then a LayerNorm, in eval mode."""
    from timm.models.vision_transformer import Block

    m, k = landmark_budget(n_tokens)
    blocks = []
    for _ in range(args.depth):
        blk = Block(dim=args.width, num_heads=args.heads, mlp_ratio=4.0, qkv_bias=True)
        if method == "mita":
            blk.attn = create_attention("mita", dim=args.width, num_heads=args.heads, qkv_bias=True,
                                        num_landmarks=m, topk=k, pool="1d", impl=args.impl)
        elif method == "full":
            blk.attn = create_attention("standard", dim=args.width, num_heads=args.heads, qkv_bias=True)
        else:
            blk.attn = _NoAttention()
        blocks.append(blk)
    model = nn.Sequential(*blocks, nn.LayerNorm(args.width))
    # A 1-D sequence: one row of N tokens, no prefix tokens (the 1-D landmark pool ignores the grid).
    set_token_layout(model, (1, n_tokens), 0)
    return model.to(device=device, dtype=dtype).eval()


def resolved_impl(args, device) -> str:
    """What ``impl="auto"`` runs for this width, heads and dtype on this device."""
    if args.impl != "auto":
        return args.impl
    if device.type != "cuda":
        return "torch"
    from mita import kernels

    d = args.width // args.heads
    q = torch.empty(1, 1, 1, d, device="meta", dtype=DTYPES[args.dtype])
    return "triton" if kernels.available() and kernels.supports(q, q, 1, 1) else "torch"


class Bench:
    """Batch tuning and timing of one model forward."""

    def __init__(self, args, device):
        self.args = args
        self.device = device
        self.dtype = DTYPES[args.dtype]
        self.clock = Clock(device)
        self.cuda = device.type == "cuda"
        self.mem_budget = args.mem_frac * torch.cuda.get_device_properties(device).total_memory if self.cuda else 0

    def forward(self, model, batch: int, n_tokens: int) -> float:
        """One forward on fresh random input; wall seconds after a synchronize."""
        x = torch.randn(batch, n_tokens, self.args.width, device=self.device, dtype=self.dtype)
        start = time.perf_counter()
        model(x)
        self.clock.sync()
        return time.perf_counter() - start

    def pick_batch(self, model, n_tokens: int) -> Tuple[int, float]:
        """(batch, seconds of one batch-1 forward); the probe also compiles and warms up."""
        args = self.args
        cap = max(1, min(args.max_batch, args.max_tokens // n_tokens))
        cap = 2 ** int(math.log2(cap))
        self.forward(model, 1, n_tokens)  # compile, allocate, pick kernels
        if self.cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        probe_s = self.forward(model, 1, n_tokens)
        if not self.cuda:
            return cap, probe_s
        per_sample = max(1, torch.cuda.max_memory_allocated(self.device) - before)
        fits = max(1, int(self.mem_budget // per_sample))
        return min(cap, 2 ** int(math.log2(fits))), probe_s

    def measure(self, model, n_tokens: int) -> dict:
        args = self.args
        batch, probe_s = self.pick_batch(model, n_tokens)
        first = probe_s if batch == 1 else None  # the probe already ran this shape warm
        while first is None:
            try:
                first = self.forward(model, batch, n_tokens)
            except torch.cuda.OutOfMemoryError:
                if batch == 1:
                    raise
                batch //= 2
                torch.cuda.empty_cache()
        reps = int(min(20, max(args.min_reps, math.ceil(args.target_s / max(first, 1e-6)))))
        for _ in range(max(0, args.warmup - 1)):
            self.forward(model, batch, n_tokens)
        inputs = [torch.randn(batch, n_tokens, args.width, device=self.device, dtype=self.dtype)
                  for _ in range(2)]  # two sets: a small batch must not be timed from cache
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        marks = []
        for i in range(reps):
            start = self.clock.mark()
            model(inputs[i % 2])
            marks.append((start, self.clock.mark()))
        self.clock.sync()
        ms = statistics.median(self.clock.ms(a, b) for a, b in marks)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else float("nan")
        return {"status": "ok", "batch": batch, "reps": reps, "ms_per_batch": ms,
                "samples_s": batch / (ms * 1e-3), "tokens_s": batch * n_tokens / (ms * 1e-3),
                "peak_mib": peak, "probe_s_per_sample": probe_s}


def estimate_s(prev: Optional[Tuple[int, float]], method: str, n_tokens: int) -> Optional[float]:
    """Seconds of a batch-1 forward at N from the previous measured (N, seconds per sample)."""
    if prev is None:
        return None
    n_prev, s_prev = prev
    # full: N^2 d; MiTA: N (m + k) d with m, k ~ sqrt(N); no attention: linear in N
    power = {"full": 2.0, "mita": 1.5}.get(method, 1.0)
    return s_prev * (n_tokens / n_prev) ** power


def run(args, device) -> List[dict]:
    bench = Bench(args, device)
    deadline = time.perf_counter() + (args.max_total_s if args.max_total_s is not None else float("inf"))
    rows: List[dict] = []
    prev: Dict[str, Tuple[int, float]] = {}
    for e in args.log2n:
        n_tokens = 2 ** e
        m, k = landmark_budget(n_tokens)
        for method in METHODS:
            row = {"N": n_tokens, "log2N": e, "m": m, "k": k, "method": method,
                   "impl": {"mita": resolved_impl(args, device), "full": "sdpa"}.get(method, "-")}
            rows.append(row)
            est = estimate_s(prev.get(method), method, n_tokens)
            if est is not None and est > args.max_call_s:
                row.update(status=f"skipped (estimated {est:.1f} s per sample > --max-call-s {args.max_call_s})",
                           extrapolated_samples_s=1.0 / est)
                log.info("N=2^%d %-5s %s", e, method, row["status"])
                continue
            if time.perf_counter() > deadline:
                row["status"] = "skipped (--max-total-s reached)"
                continue
            torch.manual_seed(args.seed)
            try:
                model = build_model(method, n_tokens, args, device, bench.dtype)
                with torch.no_grad():
                    row.update(bench.measure(model, n_tokens))
                prev[method] = (n_tokens, row["ms_per_batch"] * 1e-3 / row["batch"])
            except torch.cuda.OutOfMemoryError:
                row["status"] = "skipped (out of memory at batch 1)"
            except Exception as exc:  # noqa: BLE001 - one broken point must not lose the others
                first_line = (str(exc).splitlines() or [""])[0][:120]
                row["status"] = f"skipped ({type(exc).__name__}: {first_line})"
                log.debug("N=2^%d %s failed", e, method, exc_info=True)
            model = None
            if bench.cuda:
                torch.cuda.empty_cache()
            log.info("N=2^%d %-5s %s", e, method, _summary(row))
        add_speedup([r for r in rows if r["N"] == n_tokens])
    return rows


def add_speedup(rows: List[dict]) -> None:
    """MiTA samples/s over full attention's at one N; 'extrapolated' where full attention was not run."""
    by = {r["method"]: r for r in rows}
    mita, full, none = by.get("mita", {}), by.get("full", {}), by.get("none", {})
    if full.get("status") == "ok" and none.get("status") == "ok":
        mita["ceiling"] = none["samples_s"] / full["samples_s"]
    paper = PAPER_SPEEDUP.get(mita.get("log2N"))
    if paper is not None:
        mita["paper_speedup_rtx4090"] = paper
    if mita.get("status") != "ok":
        return
    if full.get("status") == "ok":
        mita["speedup"] = mita["samples_s"] / full["samples_s"]
        if paper is not None:
            mita["beats_paper"] = mita["speedup"] > paper
    elif "extrapolated_samples_s" in full:
        mita["extrapolated_speedup"] = mita["samples_s"] / full["extrapolated_samples_s"]


def _summary(row: dict) -> str:
    if row.get("status") != "ok":
        return row.get("status", "")
    return (f"batch {row['batch']:>5}  {row['ms_per_batch']:.2f} ms/batch  {row['samples_s']:.4g} samples/s  "
            f"peak {row['peak_mib']:.0f} MiB")


def table(rows: List[dict]) -> str:
    body = []
    for e in sorted({r["log2N"] for r in rows}):
        by = {r["method"]: r for r in rows if r["log2N"] == e}
        mita, full = by.get("mita", {}), by.get("full", {})

        def cells(r):
            if r.get("status") == "ok":
                return [str(r["batch"]), f"{r['samples_s']:.4g}"]
            if "extrapolated_samples_s" in r:
                return ["-", f"~{r['extrapolated_samples_s']:.3g} (extrapolated)"]
            return ["-", "FAIL" if r.get("status", "").startswith("FAIL") else "skipped"]

        if "speedup" in mita:
            speedup = f"x{mita['speedup']:.3g}"
        elif "extrapolated_speedup" in mita:
            speedup = f"~x{mita['extrapolated_speedup']:.3g} (extrapolated)"
        else:
            speedup = "-"
        ceiling = f"x{mita['ceiling']:.3g}" if "ceiling" in mita else "-"
        paper = mita.get("paper_speedup_rtx4090")
        beats = "-" if paper is None or "beats_paper" not in mita else ("yes" if mita["beats_paper"] else "no")
        body.append([f"2^{e}", str(mita.get("m", "")), str(mita.get("k", ""))] + cells(mita) + cells(full)
                    + [speedup, ceiling, "-" if paper is None else f"x{paper:g}", beats])
    return markdown(["N", "m", "k", "MiTA batch", "MiTA samples/s", "full batch", "full samples/s",
                     "speedup", "ceiling (no attention)", "paper (RTX 4090)", "beats paper"], body)


def plot(path: Path, rows: List[dict], env: Dict[str, str], args) -> None:
    """samples/s against N for both methods, and the speedup beside the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for method, label in (("mita", f"MiTA (impl {args.impl})"), ("full", "full attention (SDPA)"),
                          ("none", "no attention (ceiling)")):
        pts = [(r["N"], r["samples_s"]) for r in rows if r["method"] == method and r.get("status") == "ok"]
        if pts:
            ax1.plot(*zip(*pts), "-o", label=label)
        ext = [(r["N"], r["extrapolated_samples_s"]) for r in rows
               if r["method"] == method and "extrapolated_samples_s" in r]
        if ext:
            ax1.plot(*zip(*ext), "x", label=f"{label}, extrapolated")
    ax1.set_ylabel("inference samples/s")
    pts = [(r["N"], r["speedup"]) for r in rows if "speedup" in r]
    if pts:
        ax2.plot(*zip(*pts), "-o", label="measured here")
    pts = [(r["N"], r["ceiling"]) for r in rows if "ceiling" in r]
    if pts:
        ax2.plot(*zip(*pts), ":", color="grey", label="ceiling: no attention over full")
    ext = [(r["N"], r["extrapolated_speedup"]) for r in rows if "extrapolated_speedup" in r]
    if ext:
        ax2.plot(*zip(*ext), "x", label="extrapolated (full attention not run)")
    ax2.plot([2 ** e for e in PAPER_SPEEDUP], list(PAPER_SPEEDUP.values()), "s--", label="paper, RTX 4090")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_ylabel("MiTA speedup over full attention")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{args.depth}-layer Transformer, width {args.width}, {args.heads} heads, {args.dtype}; "
                 f"{env['card']}, torch {env['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log2_list(spec: str) -> List[int]:
    if "-" in spec:
        lo, hi = (int(s) for s in spec.split("-"))
        return list(range(lo, hi + 1))
    return [int(s) for s in spec.split(",") if s.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log2n", default=None, help="exponents of N: 'lo-hi' or a comma list (default 10-20)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2, help="attention heads (default 2: d = 64)")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--impl", default="auto", choices=("auto", "torch", "triton"), help="MiTA implementation")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--mem-frac", type=float, default=0.6, help="share of GPU memory a batch may use")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap on batch * N (default 2^20)")
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--target-s", type=float, default=1.5, help="time to cover with repetitions")
    parser.add_argument("--min-reps", type=int, default=3, help="fewest timed repetitions (at most 20 are run)")
    parser.add_argument("--max-call-s", type=float, default=8.0,
                        help="skip a point whose batch-1 forward is estimated to take longer")
    parser.add_argument("--max-total-s", type=float, default=None,
                        help="skip what is left once the run has taken this many seconds (default: no limit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_out", help="folder for throughput.csv and throughput.png")
    parser.add_argument("--cpu-smoke", "--dry-run", dest="cpu_smoke", action="store_true",
                        help="N = 2^6, 2^7 on the CPU in float32, small batches: checks the pipeline only")
    args = parser.parse_args(argv)
    if args.width % args.heads:
        parser.error(f"--heads {args.heads} must divide --width {args.width}")
    if args.cpu_smoke:
        args.log2n = args.log2n or "6-7"
        args.max_tokens = args.max_tokens or 2 ** 8
        args.dtype = "fp32" if args.dtype == "bf16" else args.dtype
        args.target_s = min(args.target_s, 0.01)
        args.min_reps = min(args.min_reps, 2)
        args.warmup = min(args.warmup, 1)
    args.log2n = _log2_list(args.log2n or "10-20")
    args.max_tokens = args.max_tokens or 2 ** 20
    if not args.log2n or min(args.log2n) < 2:
        parser.error("--log2n: exponents must be >= 2")
    if args.min_reps < 1 or args.warmup < 1:
        parser.error("--min-reps and --warmup must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.cpu_smoke:
        device = torch.device("cpu")
        # Tiny shapes: one thread beats several fighting over a shared CI machine.
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        log.error("no CUDA device: run on a GPU, or use --cpu-smoke to check the pipeline")
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    log.info("%s", env)
    rows = run(args, device)
    for r in rows:
        r.update(width=args.width, heads=args.heads, depth=args.depth, dtype=args.dtype, card=env["card"],
                 torch=env["torch"], triton=env["triton"], date=env["date"])
    write_csv(out_dir / "throughput.csv", rows)
    plot(out_dir / "throughput.png", rows, env, args)
    log.info("wrote %s, %s", out_dir / "throughput.csv", out_dir / "throughput.png")
    mita_impl = resolved_impl(args, device)
    sys.stdout.write(
        f"card: {env['card']}; torch {env['torch']}; triton {env['triton']}; {env['date']}\n"
        f"{args.depth}-layer Transformer, width {args.width}, {args.heads} heads (d = {args.width // args.heads}), "
        f"{args.dtype}, no_grad; MiTA impl {args.impl} -> {mita_impl}, 1-D pooled landmarks, m*k = N/4; "
        "full attention = SDPA default backend. Inference samples/s:\n" + table(rows) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
