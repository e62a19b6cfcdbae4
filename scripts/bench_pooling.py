"""Landmark pooling of a strided q: pooled as a view (what the layer does) against pooled after a copy.

    python scripts/bench_pooling.py --out outputs/bench   # GPU: the 197- and 3,137-token shapes, ~20 s
    python scripts/bench_pooling.py --cpu-smoke --out outputs/pool_smoke   # tiny CPU run of the whole script (tests)

A ViT layer's q is a strided view of its qkv projection ([B, N, 3, H, d] permuted to [B, H, N, d]).
``mita.attention.pool_patch_queries`` pools it as a view, heads as channels, so that the pooling keeps
no [B, N, C] copy for its backward. Before that change the pooling reshaped the strided q, which copied it; the
``copy`` method here reproduces that (``q.contiguous()`` inside the timed region, then the head-as-batch pooling).
``matmul`` is a candidate replacement: adaptive average pooling is a fixed linear map over the patches, so the
pooled cells are ``P @ q`` with ``P`` the ``[m, h*w]`` matrix of the pooling windows' weights (built once per
shape, outside the timed region, as a layer would cache it) and q viewed as ``[B, h*w, H*d]``, no copy.

Per shape, both methods first go through a correctness gate against a float64 pooling of the same inputs
(output and the gradient to the qkv projection, relative error <= --tol), then are timed: CUDA events around
forward + backward (median over --reps after --warmup), and torch.cuda.max_memory_allocated over one forward +
backward after a reset, beyond the inputs. Writes ``pooling.json`` to --out and prints the table, card last.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from mita.attention import pool_patch_queries
from mita.utils.bench import Clock, environment

#: (name, B, prefix tokens, h, w, heads, head dim, landmark grid): DeiT-Tiny width, the reproduction's shapes
SHAPES = [("n197-m25", 256, 1, 14, 14, 3, 64, (5, 5)), ("n3137-m25", 64, 1, 56, 56, 3, 64, (5, 5)),
          ("n3137-m100", 64, 1, 56, 56, 3, 64, (10, 10))]
SMOKE_SHAPES = [("smoke-6x5", 2, 1, 6, 5, 2, 8, (2, 3))]
METHODS = ("view", "copy", "matmul")


def _q_of(qkv: torch.Tensor) -> torch.Tensor:
    """q of a [B, N, 3, H, d] projection as the attention layers take it: [B, H, N, d], strided."""
    return qkv.permute(2, 0, 3, 1, 4)[0]


@functools.lru_cache(maxsize=None)
def pool_matrix(h: int, w: int, grid: Tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[ph*pw, h*w]``: adaptive_avg_pool2d's weights, read off by pooling the identity (one patch per image)."""
    eye = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    return F.adaptive_avg_pool2d(eye, grid).reshape(h * w, -1).t().to(device, dtype)


def pool(method: str, qkv: torch.Tensor, p: int, h: int, w: int, grid) -> torch.Tensor:
    q = _q_of(qkv)
    if method == "matmul":
        B, H, _, d = q.shape
        patches = q.transpose(1, 2)[:, p:].reshape(B, h * w, H * d)  # a view of the projection: [B, h*w, H*d]
        return (pool_matrix(h, w, tuple(grid), q.dtype, q.device) @ patches).reshape(B, -1, H, d).transpose(1, 2).contiguous()  # [B, H, m, d]
    if method == "copy":
        q = q.contiguous()
    elif method != "view":
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return pool_patch_queries(q, p, h, w, grid)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def gate(method: str, qkv: torch.Tensor, grad: torch.Tensor, p: int, h: int, w: int, grid) -> float:
    """Largest relative error of the output and of d qkv against a float64 pooling of the same inputs."""
    x = qkv.detach().clone().requires_grad_(True)
    out = pool(method, x, p, h, w, grid)
    out.backward(grad)
    ref_x = qkv.detach().double().cpu().requires_grad_(True)
    ref = pool_patch_queries(_q_of(ref_x).contiguous(), p, h, w, grid)
    ref.backward(grad.double().cpu())
    return max(_rel(out.cpu(), ref), _rel(x.grad.cpu(), ref_x.grad))


def measure(method: str, qkv: torch.Tensor, grad: torch.Tensor, p: int, h: int, w: int, grid, *,
            reps: int, warmup: int, clock: Clock) -> Dict[str, float]:
    x = qkv.detach().clone().requires_grad_(True)
    times: List[float] = []
    for i in range(warmup + reps):
        x.grad = None
        start = clock.mark()
        pool(method, x, p, h, w, grid).backward(grad)
        end = clock.mark()
        clock.sync()
        if i >= warmup:
            times.append(clock.ms(start, end))
    peak = None
    if qkv.is_cuda:
        x.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        pool(method, x, p, h, w, grid).backward(grad)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"ms": statistics.median(times), "peak_mib": peak}


def run(shapes: Sequence, device: torch.device, dtype: torch.dtype, reps: int, warmup: int,
        tol: float, seed: int) -> List[Dict[str, Any]]:
    clock, rows = Clock(device), []
    torch.manual_seed(seed)
    for name, B, p, h, w, H, d, grid in shapes:
        N = p + h * w
        qkv = torch.randn(B, N, 3, H, d, device=device, dtype=dtype)
        grad = torch.randn(B, H, grid[0] * grid[1], d, device=device, dtype=dtype)
        base: Optional[float] = None
        for method in METHODS:
            row: Dict[str, Any] = {"shape": name, "B": B, "N": N, "H": H, "d": d, "m": grid[0] * grid[1],
                                   "method": method, "dtype": str(dtype).replace("torch.", "")}
            row["rel_err"] = gate(method, qkv, grad, p, h, w, grid)
            row["ok"] = row["rel_err"] <= tol
            if row["ok"]:
                row.update(measure(method, qkv, grad, p, h, w, grid, reps=reps, warmup=warmup, clock=clock))
                base = row["ms"] if method == "view" else base
                row["vs_view"] = row["ms"] / base if base else None
            rows.append(row)
    return rows


def table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| shape | method | rel. err | fwd+bwd ms | x view | peak MiB |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['shape']} | {r['method']} | {r['rel_err']:.1e} FAIL | — | — | — |")
            continue
        peak = "—" if r.get("peak_mib") is None else f"{r['peak_mib']:.1f}"
        ratio = "—" if r.get("vs_view") is None else f"{r['vs_view']:.2f}"
        lines.append(f"| {r['shape']} | {r['method']} | {r['rel_err']:.1e} | {r['ms']:.3f} | {ratio} | {peak} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions, >= 1 (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up calls, >= 0 (default 10)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--tol", type=float, default=1e-2, help="gate: largest relative error (default 1e-2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU, 2 repetitions")
    parser.add_argument("--out", default="bench_out", help="folder for pooling.json")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"argument --reps: must be >= 1, got {args.reps}")
    if args.warmup < 0:
        parser.error(f"argument --warmup: must be >= 0, got {args.warmup}")
    if args.tol <= 0:
        parser.error(f"argument --tol: must be > 0, got {args.tol}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --cpu-smoke")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    reps, warmup = (2, 1) if args.cpu_smoke else (args.reps, args.warmup)
    rows = run(SMOKE_SHAPES if args.cpu_smoke else SHAPES, device, dtype, reps, warmup, args.tol, args.seed)
    env = environment(device)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pooling.json"), "w", encoding="utf-8") as handle:
        json.dump({"environment": env, "rows": rows}, handle, indent=2)
    print(table(rows))
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
