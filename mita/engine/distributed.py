"""torch.distributed helpers that also work in a single process (no process group: rank 0 of 1).

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` set) with more
than one process, :func:`init_distributed` joins the process group: NCCL when CUDA is available, gloo
otherwise. Every other helper is a no-op (or the identity) without a process group.
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Dict, Optional, Union

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main",
]

_logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from err


def init_distributed(backend: Optional[str] = None, *, device: Optional[Union[str, torch.device]] = None,
                     timeout_s: float = 1800.0) -> Dict[str, Any]:
    """Join the process group that ``torchrun`` describes, or set up a single process.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or None (NCCL on CUDA devices, gloo on CPU).
        device: force a device type (``"cpu"`` or ``"cuda"``); default CUDA when available. Each rank uses
            ``cuda:LOCAL_RANK``.
        timeout_s: collective timeout.

    Returns:
        ``dict(rank, world_size, local_rank, device)``; ``world_size == 1`` without ``torchrun`` (or with one
        process), in which case no process group is created.
    """
    rank, world_size, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} must satisfy 0 <= RANK < WORLD_SIZE")
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but CUDA is not available")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch_device = torch.device("cuda", local_rank)
        # NCCL collectives and broadcast_object_list use the current device.
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device(device_type)
    if world_size > 1 and not is_distributed():
        backend = backend or ("nccl" if device_type == "cuda" else "gloo")
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
        if backend == "nccl" and device_type != "cuda":
            raise ValueError("backend='nccl' needs CUDA devices; use 'gloo' on CPU")
        kwargs = {"device_id": torch_device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        _logger.info("joined %s process group: rank %d of %d on %s", backend, rank, world_size, torch_device)
    return {"rank": rank, "world_size": world_size, "local_rank": local_rank, "device": torch_device}


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects, e.g. the run folder's path)."""
    if not is_distributed():
        return obj
    holder = [obj if get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=op)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, as a new tensor (the input is left alone)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, as a new tensor (the input is left alone)."""
    out = all_reduce_sum(tensor)
    return out / get_world_size() if is_distributed() else out


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks, as a new tensor."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def cleanup() -> None:
    """Leave the process group (if any)."""
    if is_distributed():
        dist.destroy_process_group()
