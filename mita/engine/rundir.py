"""One run per folder: a lock file while a run writes its folder, and the files Hydra would write there.

:func:`lock_run_dir` creates ``<run_dir>/run.lock`` atomically (``O_CREAT | O_EXCL``) holding the host, the
pid and the SLURM job of the run, and :func:`unlock_run_dir` removes it. A second run into a locked folder
stops with :class:`RunFolderLocked` naming the folder and the process that holds it, having changed nothing.
A lock whose holder is gone (same host and pid not alive, or the same SLURM job requeued) is stale and taken
over with a warning. Only rank 0 takes the lock; the runner broadcasts the outcome to the other ranks.

Hydra is told to write nothing into the run folder itself (``configs/hydra/default.yaml``: no
``output_subdir``, console-only job logging), so that a run refused at start leaves the folder as it was;
once the lock is held, :func:`write_hydra_files` writes ``.hydra/`` and :func:`open_log_file` appends the
job's log to ``<job name>.log`` there, as Hydra would have.
"""
from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
from typing import Any, Dict, Optional

__all__ = [
    "LOCK_NAME",
    "RunFolderLocked",
    "close_log_file",
    "lock_run_dir",
    "open_log_file",
    "remove_empty_run_dir",
    "unlock_run_dir",
    "write_hydra_files",
]

_logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class RunFolderLocked(RuntimeError):
    """Another run holds the run folder; the message names the folder and the holder."""


def _slurm_job() -> Optional[str]:
    # A requeued job keeps its id (an array task: array job id + task id), so it recognises its own lock.
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a killed process its parent has not reaped yet (Linux) is gone too
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_lock(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            holder = json.load(handle)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}  # being written, or cut by a kill during the write


def _stale(holder: Dict[str, Any]) -> bool:
    """Whether the lock's holder is certainly gone."""
    if not holder:
        return False
    job = _slurm_job()
    if job is not None and holder.get("slurm_job") == job:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)


def _describe(holder: Dict[str, Any]) -> str:
    if not holder:
        return "a process whose lock file is unreadable"
    words = f"pid {holder.get('pid')} on {holder.get('host')}"
    if holder.get("slurm_job"):
        words += f" (SLURM job {holder['slurm_job']})"
    if holder.get("started"):
        words += f", started {holder['started']}"
    return words


def lock_run_dir(run_dir: str) -> str:
    """Create ``run_dir`` if needed and hold it; returns the lock file's path.

    Raises:
        RunFolderLocked: another live run holds the folder (nothing in it was changed).
    """
    path = os.path.join(run_dir, LOCK_NAME)
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": _slurm_job(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for _ in range(3):
        os.makedirs(run_dir, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read_lock(path)
            if not _stale(other):
                raise RunFolderLocked(
                    f"run folder {run_dir} is in use by {_describe(other)}: wait for that run to finish or stop "
                    f"it, give this run another folder (run_dir=PATH or attention.tag=NAME), or delete {path} "
                    "if that run is gone"
                ) from None
            _logger.warning("taking over the lock of %s left by %s, which is no longer running", run_dir,
                            _describe(other))
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            continue
        except FileNotFoundError:  # the folder was removed between makedirs and open
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(holder, handle)
            handle.write("\n")
        return path
    raise RunFolderLocked(f"run folder {run_dir}: could not take its lock {path} (another run keeps taking it)")


def unlock_run_dir(run_dir: str) -> None:
    """Remove the lock of ``run_dir`` if this process holds it."""
    path = os.path.join(run_dir, LOCK_NAME)
    holder = _read_lock(path)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def remove_empty_run_dir(run_dir: str, root: Optional[str] = None) -> None:
    """Remove ``run_dir`` if it is empty, then its empty parents up to ``root`` included (a failed start's
    leftovers: Hydra creates the run folder before the job runs)."""
    run_dir = os.path.abspath(run_dir)
    root = os.path.abspath(root) if root else None
    folder = run_dir
    while True:
        try:
            os.rmdir(folder)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                _logger.debug("kept %s: %s", folder, err)
            if err.errno != errno.ENOENT:
                return
        parent = os.path.dirname(folder)
        if root is None or parent == folder or not (parent == root or parent.startswith(root + os.sep)):
            return
        folder = parent


def _hydra_config():
    """Hydra's config of the job this process runs, or None outside ``@hydra.main``."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return None
    return HydraConfig.instance().cfg if HydraConfig.initialized() else None


def write_hydra_files(run_dir: str, task_cfg: Any) -> Optional[str]:
    """Write ``.hydra/{config,hydra,overrides}.yaml`` into ``run_dir`` as Hydra's ``output_subdir`` does
    (the composed config, unresolved); a no-op outside ``@hydra.main``. Returns the folder written."""
    from omegaconf import OmegaConf

    hydra_cfg = _hydra_config()
    if hydra_cfg is None:
        return None
    folder = os.path.join(run_dir, ".hydra")
    os.makedirs(folder, exist_ok=True)
    for name, node in (("config.yaml", task_cfg), ("hydra.yaml", hydra_cfg),
                       ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            handle.write(OmegaConf.to_yaml(node))
    return folder


def open_log_file(run_dir: str, rank: int = 0) -> Optional[logging.Handler]:
    """Append the root logger's records to ``<run_dir>/<job name>.log`` (``_rank<r>`` for ranks > 0), as
    Hydra's file handler did; a no-op outside ``@hydra.main``. Close it with :func:`close_log_file`."""
    hydra_cfg = _hydra_config()
    if hydra_cfg is None:
        return None
    suffix = "" if rank == 0 else f"_rank{rank}"
    os.makedirs(run_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(run_dir, f"{hydra_cfg.hydra.job.name}{suffix}.log"))
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def close_log_file(handler: Optional[logging.Handler]) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()
