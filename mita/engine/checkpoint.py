"""Atomic training checkpoints, safe loading, the run folder's latest checkpoint and weights-only export.

Names in a run folder: ``checkpoint.pth`` (the rolling latest, rewritten every epoch) and optionally
``checkpoint_<epoch>.pth`` (kept copies); :func:`checkpoint_path` builds them, :func:`latest_checkpoint`
finds them.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import torch

from mita.models.checkpoint import SAFE_GLOBALS

__all__ = [
    "LATEST_NAME",
    "checkpoint_path",
    "export_weights",
    "latest_checkpoint",
    "load_state",
    "save_checkpoint",
]

PathLike = Union[str, os.PathLike]

LATEST_NAME = "checkpoint.pth"
_EPOCH_NAME = re.compile(r"^checkpoint_(\d+)\.pth$")
#: entries of a training checkpoint that export_weights keeps besides the model weights
_EXPORT_KEYS = ("config", "epoch")


def checkpoint_path(run_dir: PathLike, epoch: Optional[int] = None) -> str:
    """``run_dir/checkpoint.pth``, or ``run_dir/checkpoint_<epoch>.pth`` for a kept copy."""
    if epoch is None:
        return os.path.join(os.fspath(run_dir), LATEST_NAME)
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch!r}")
    return os.path.join(os.fspath(run_dir), f"checkpoint_{epoch:04d}.pth")


def _fsync_dir(folder: str) -> None:
    # The rename is durable only once the folder's entry is on disk; some filesystems refuse O_RDONLY on dirs.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: PathLike, state: Mapping[str, Any]) -> str:
    """Write ``state`` with ``torch.save`` atomically: a temporary file in the same folder, fsync, ``os.replace``.

    A crash or error mid-write leaves the previous file at ``path`` untouched and no partial file behind.
    Store plain containers, tensors and numbers (e.g. the config as a dict) so :func:`load_state` can read
    it back with ``weights_only=True``. Returns ``path``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)
    return path


def load_state(path: PathLike, *, map_location: Union[str, torch.device] = "cpu",
               extra_safe_globals: Iterable[Any] = ()) -> Dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    ``argparse.Namespace`` (DeiT checkpoints) and ``extra_safe_globals`` are allow-listed; any other pickled
    object raises ``ValueError`` naming it (never a silent ``weights_only=False``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with torch.serialization.safe_globals(list(SAFE_GLOBALS) + list(extra_safe_globals)):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # the file may be no zip archive at all; torch's own message then says why
                unsafe = []
            raise ValueError(
                f"{path!r} holds objects that weights_only loading refuses{f' ({unsafe})' if unsafe else ''}. "
                f"If you trust the file, pass them in extra_safe_globals. torch said: {err}"
            ) from err
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, expected a dict")
    return state


def latest_checkpoint(run_dir: PathLike) -> Optional[str]:
    """The checkpoint to resume ``run_dir`` from: ``checkpoint.pth``, else the ``checkpoint_<epoch>.pth`` with
    the largest epoch, else None (also when ``run_dir`` does not exist). Temporary files are ignored."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        return None
    latest = checkpoint_path(run_dir)
    if os.path.isfile(latest):
        return latest
    epochs = []
    for name in os.listdir(run_dir):
        match = _EPOCH_NAME.match(name)
        if match and os.path.isfile(os.path.join(run_dir, name)):
            epochs.append((int(match.group(1)), name))
    return os.path.join(run_dir, max(epochs)[1]) if epochs else None


def export_weights(path_in: PathLike, path_out: PathLike, fp16: bool = True) -> str:
    """Write a weights-only copy of a training checkpoint: ``{"model": state_dict, "config", "epoch"}``.

    Optimizer, scaler, scheduler and EMA states are dropped (``model`` holds the non-EMA weights, the ones
    evaluated); ``fp16=True`` stores floating-point tensors as float16 (integer buffers keep their dtype).
    Accepts training checkpoints (weights under ``model``) and plain state dicts. Returns ``path_out``.
    """
    state = load_state(path_in)
    weights = state.get("model", state)
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"{os.fspath(path_in)!r} holds no model weights under `model`")
    model = {}
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{os.fspath(path_in)!r}: model entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        model[key] = value.half() if fp16 and value.is_floating_point() else value.clone()
    out = {"model": model}
    if weights is not state:
        out.update({key: state[key] for key in _EXPORT_KEYS if key in state})
    return save_checkpoint(path_out, out)
