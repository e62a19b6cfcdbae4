"""Timing, environment and table helpers shared by the benchmark scripts (scripts/bench_*.py)."""
from __future__ import annotations

import csv
import datetime
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch

__all__ = ["rel_err", "Clock", "environment", "l2_bytes", "copy_rate", "write_csv", "markdown"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; infinite when either side holds NaN or inf."""
    a64, b64 = a.detach().double(), b.detach().double()
    if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
        return float("inf")
    denom = b64.norm().item()
    diff = (a64 - b64).norm().item()
    return diff / denom if denom > 0 else diff


class Clock:
    """CUDA events on a GPU (read after one synchronize), ``time.perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def event_device_us(event) -> float:
    """Device microseconds of a torch.profiler event or key average (``device_time_total``; older torch:
    ``cuda_time_total``)."""
    return float(getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0) or 0)


def environment(device: torch.device) -> Dict[str, str]:
    """Card, library versions and date, for the printed header and the CSV."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["card"] = f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
        info["cuda"] = str(torch.version.cuda)
        info["cudnn"] = str(torch.backends.cudnn.version())
    else:
        info["card"] = "CPU (smoke run: timings mean nothing)"
    return info


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    # A CPU core's L2, so the smoke run exercises the rotation too.
    return 1 << 20


def copy_rate(device: torch.device, clock: Clock, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    src = torch.rand(nbytes // 4, device=device)  # random data, never zeros
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start = clock.mark()
        dst.copy_(src)
        end = clock.mark()
        clock.sync()
        times.append(clock.ms(start, end))
    return 2 * src.numel() * 4 / (statistics.median(times) * 1e-3) / 1e9


def write_csv(path: Path, rows: List[dict]) -> None:
    keys: List[str] = []
    for r in rows:
        keys += [key for key in r if key not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({key: (f"{val:.6g}" if isinstance(val, float) else val) for key, val in r.items()})


def markdown(header: List[str], body: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)
