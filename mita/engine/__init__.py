"""Training engine: loops, optimizer and schedule, checkpoints, distributed helpers and loggers; config checks
(``validate``), the run-folder lock (``rundir``) and the entrypoints' error handling (``cli``).

The entrypoints' jobs are modules of their own, imported by name: ``mita.engine.training`` (train.py) and
``mita.engine.evaluation`` (eval.py).
"""
from mita.engine.checkpoint import (
    CheckpointError,
    checkpoint_path,
    export_weights,
    latest_checkpoint,
    load_resume_state,
    load_state,
    save_checkpoint,
)
from mita.engine.distributed import (
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    is_main,
)
from mita.engine.logging import JsonlLogger, NullLogger, WandbLogger
from mita.engine.loop import NonFiniteLossError, build_criterion, build_ema, evaluate, train_one_epoch
from mita.engine.optim import build_optimizer, build_scheduler, unwrap_model
from mita.engine.rundir import RunFolderLocked
from mita.engine.validate import ConfigError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "JsonlLogger",
    "NonFiniteLossError",
    "NullLogger",
    "RunFolderLocked",
    "WandbLogger",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "build_criterion",
    "build_ema",
    "build_optimizer",
    "build_scheduler",
    "checkpoint_path",
    "cleanup",
    "evaluate",
    "export_weights",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main",
    "latest_checkpoint",
    "load_resume_state",
    "load_state",
    "save_checkpoint",
    "train_one_epoch",
    "unwrap_model",
]
