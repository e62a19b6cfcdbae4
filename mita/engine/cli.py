"""What ``train.py``, ``eval.py`` and ``segment.py`` do around the engine.

:func:`run_main` calls the entrypoint's function and turns an error the user can fix (a config value out of
range, a run folder in use, an unreadable checkpoint, a missing file) into one logged line and exit status 2
instead of a traceback; ``MITA_DEBUG=1`` keeps the traceback. A run that fails leaves no empty run folder
behind (Hydra creates a multirun job's folder before the job starts). :func:`hold_run_dir` is the run-folder
lock, ``.hydra/`` and log file for entrypoints without their own (``segment.py``; ``train.py``'s are in
:func:`mita.engine.training.train`, which shares them between DDP ranks).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Callable, Iterator, Optional

from mita.engine.rundir import (
    RunFolderLocked,
    close_log_file,
    lock_run_dir,
    open_log_file,
    remove_empty_run_dir,
    unlock_run_dir,
    write_hydra_files,
)
from mita.engine.validate import ConfigError, debug_enabled
from mita.models.checkpoint import CheckpointError

__all__ = ["USER_ERRORS", "hold_run_dir", "run_main"]

#: errors whose message says what to change: the entrypoints print it as one line
USER_ERRORS = (ConfigError, RunFolderLocked, CheckpointError, FileNotFoundError)
#: exit status of a run stopped by one of USER_ERRORS (argparse's for a usage error)
USER_ERROR_STATUS = 2


def run_main(fn: Callable[[Any], Any], cfg: Any, logger: logging.Logger, *, run_dir: Optional[str] = None,
             root: Optional[str] = None) -> Any:
    """``fn(cfg)``; on an error, remove ``run_dir`` if it is empty (and its empty parents below ``root``),
    then log a :data:`USER_ERRORS` error as one line and exit with status 2 (unless ``MITA_DEBUG=1``)."""
    try:
        return fn(cfg)
    except BaseException as err:
        if run_dir is not None:
            remove_empty_run_dir(run_dir, root)
        if isinstance(err, USER_ERRORS) and not debug_enabled():
            logger.error("%s (MITA_DEBUG=1 shows the traceback)", " ".join(str(err).split()))
            sys.exit(USER_ERROR_STATUS)
        raise


@contextlib.contextmanager
def hold_run_dir(run_dir: str, cfg: Any, rank: Optional[int] = None) -> Iterator[str]:
    """Lock ``run_dir`` (rank 0 only; torchrun's ``RANK``), write ``.hydra/`` and open the log file there
    while the block runs; yields the folder's absolute path."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    if rank == 0:
        lock_run_dir(run_dir)
    handler = None
    try:
        if rank == 0:
            write_hydra_files(run_dir, cfg)
        handler = open_log_file(run_dir, rank)
        yield run_dir
    finally:
        close_log_file(handler)
        if rank == 0:
            unlock_run_dir(run_dir)
