"""Atomic training checkpoints, safe loading, the run folder's latest checkpoint and weights-only export.

Names in a run folder: ``checkpoint.pth`` (the rolling latest, rewritten every epoch) and optionally
``checkpoint_<epoch>.pth`` (kept copies); :func:`checkpoint_path` builds them, :func:`latest_checkpoint`
finds them, :func:`load_resume_state` loads the newest readable one. A write in progress is a hidden
``.<name>.<random>.tmp`` beside its target; one left by a killed run is removed by :func:`remove_orphans`.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from mita.models.checkpoint import CheckpointError, torch_load

__all__ = [
    "FORMAT",
    "LATEST_NAME",
    "CheckpointError",
    "check_training_state",
    "checkpoint_path",
    "export_weights",
    "latest_checkpoint",
    "load_resume_state",
    "load_state",
    "remove_orphans",
    "save_checkpoint",
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

LATEST_NAME = "checkpoint.pth"
#: version of the training checkpoint's layout (``state["format"]``); a newer one is refused on resume
FORMAT = 1
#: entries a training checkpoint of train.py must hold to be resumed
TRAINING_KEYS = ("model", "optimizer", "epoch")
_EPOCH_NAME = re.compile(r"^checkpoint_(\d+)\.pth$")
# save_checkpoint's temporary files (mkstemp: "." + target name + "." + random + ".tmp") and _rewrite_log's
_ORPHAN_NAME = re.compile(r"^(\..+\.pth\.[A-Za-z0-9_]+\.tmp|log\.jsonl\.tmp)$")
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
    object raises ``ValueError`` naming it (never a silent ``weights_only=False``). A file that cannot be
    read raises :class:`CheckpointError` naming it and the cause (empty, truncated, not a checkpoint,
    another torch version).
    """
    path = os.fspath(path)
    state = torch_load(path, map_location=map_location, safe_globals=extra_safe_globals)
    if not isinstance(state, dict):
        raise CheckpointError(path, f"it holds a {type(state).__name__}, expected a dict")
    return state


def check_training_state(state: Mapping[str, Any], path: PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``state`` is a training checkpoint this version can resume."""
    missing = [key for key in TRAINING_KEYS if key not in state]
    if missing:
        raise CheckpointError(path, f"not a training checkpoint of train.py (no {', '.join(missing)}): written "
                                    "by another program or version; evaluate or fine-tune from it instead")
    version = state.get("format", FORMAT)
    if not isinstance(version, int) or version > FORMAT:
        raise CheckpointError(path, f"written by a newer version of mita (checkpoint format {version!r}, this "
                                    f"version reads up to {FORMAT})")


def _kept_checkpoints(run_dir: str) -> List[Tuple[int, str]]:
    """``(epoch, path)`` of the run folder's ``checkpoint_<epoch>.pth``, newest first."""
    kept = []
    for name in os.listdir(run_dir):
        match = _EPOCH_NAME.match(name)
        if match and os.path.isfile(os.path.join(run_dir, name)):
            kept.append((int(match.group(1)), os.path.join(run_dir, name)))
    return sorted(kept, reverse=True)


def load_resume_state(path: PathLike, *, fallback: bool = True) -> Tuple[str, Dict[str, Any]]:
    """``(path, state)`` of the checkpoint to resume from: ``path``, or, when it cannot be read and
    ``fallback``, the newest readable ``checkpoint_<epoch>.pth`` of its folder (with a warning).

    Raises :class:`CheckpointError` naming every unreadable file when none can be resumed.
    """
    path = os.fspath(path)
    try:
        state = load_state(path)
        check_training_state(state, path)
        return path, state
    except CheckpointError as err:
        if not fallback:
            raise
        first = err
    failures = [str(first)]
    folder = os.path.dirname(os.path.abspath(path))
    for _, candidate in _kept_checkpoints(folder):
        if os.path.abspath(candidate) == os.path.abspath(path):
            continue
        try:
            state = load_state(candidate)
            check_training_state(state, candidate)
        except CheckpointError as err:
            failures.append(str(err))
            continue
        _logger.warning("%s; resuming from %s (epoch %s) instead", "; ".join(failures), candidate,
                        state.get("epoch"))
        return candidate, state
    raise CheckpointError(
        path, f"{first.cause}, and no readable checkpoint_<epoch>.pth to fall back to"
        + (f" ({'; '.join(failures[1:])})" if len(failures) > 1 else "")
        + "; remove it to start afresh, or pass resume=never (overwrites) or resume=PATH"
    )


def remove_orphans(run_dir: PathLike) -> List[str]:
    """Remove the temporary files that a run killed while writing left in ``run_dir``; returns their paths.

    Call it only while holding the run folder (:mod:`mita.engine.rundir`): a running run's write in
    progress looks the same.
    """
    run_dir = os.fspath(run_dir)
    removed = []
    if not os.path.isdir(run_dir):
        return removed
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if _ORPHAN_NAME.match(name) and os.path.isfile(path):
            os.unlink(path)
            removed.append(path)
    if removed:
        _logger.warning("removed temporary files a killed run left behind: %s", ", ".join(removed))
    return removed


def latest_checkpoint(run_dir: PathLike) -> Optional[str]:
    """The checkpoint to resume ``run_dir`` from: ``checkpoint.pth``, else the ``checkpoint_<epoch>.pth`` with
    the largest epoch, else None (also when ``run_dir`` does not exist). Temporary files are ignored."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        return None
    latest = checkpoint_path(run_dir)
    if os.path.isfile(latest):
        return latest
    kept = _kept_checkpoints(run_dir)
    return kept[0][1] if kept else None


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
