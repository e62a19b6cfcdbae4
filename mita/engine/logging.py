"""Run loggers: one JSON line per epoch (always), Weights & Biases (optional), and a no-op logger.

Loggers write on rank 0 only, so every rank may hold one.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import uuid
from typing import Any, Dict, Mapping, Optional

import torch

from mita.engine.distributed import is_main

__all__ = ["JsonlLogger", "NullLogger", "WandbLogger", "to_jsonable"]

_logger = logging.getLogger(__name__)
WANDB_MODES = ("offline", "online", "disabled")


def to_jsonable(value: Any) -> Any:
    """Numbers, tensors and containers as plain JSON values; NaN/inf become null (strict JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    return str(value)


class NullLogger:
    """Accepts everything, writes nothing."""

    def log(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JsonlLogger(NullLogger):
    """Appends one JSON object per :meth:`log` call to ``run_dir/log.jsonl`` (flushed at once, so a killed
    run keeps its lines; a resumed run appends to them)."""

    filename = "log.jsonl"

    def __init__(self, run_dir: str):
        self.path = os.path.join(os.fspath(run_dir), self.filename)
        self.enabled = is_main()
        if self.enabled:
            os.makedirs(os.fspath(run_dir), exist_ok=True)

    def log(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        record: Dict[str, Any] = {} if step is None else {"step": int(step)}
        record.update(to_jsonable(dict(metrics)))
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
            handle.flush()


class WandbLogger(NullLogger):
    """Weights & Biases run (offline by default) holding ``config`` and the logged metrics.

    ``wandb`` is imported here only, so it is needed only when asked for. The run id is kept in
    ``run_dir/wandb_id`` so a resumed training continues the same W&B run.
    """

    def __init__(self, project: str, mode: str = "offline", config: Optional[Mapping[str, Any]] = None,
                 run_dir: Optional[str] = None, name: Optional[str] = None):
        if mode not in WANDB_MODES:
            raise ValueError(f"mode must be one of {WANDB_MODES}, got {mode!r}")
        if run_dir is None:
            raise ValueError("run_dir is required: W&B files and the run id live in the run folder")
        self.run = None
        if not is_main():
            return
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                "W&B logging was asked for but the `wandb` package is not installed: `pip install wandb`, or "
                "log without it (logger=none)"
            ) from err
        self._wandb = wandb
        run_dir = os.fspath(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        id_path = os.path.join(run_dir, "wandb_id")
        if os.path.isfile(id_path):
            with open(id_path, encoding="utf-8") as handle:
                run_id = handle.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B run ids: lowercase letters and digits
            with open(id_path, "w", encoding="utf-8") as handle:
                handle.write(run_id + "\n")
        self.run = wandb.init(project=project, mode=mode, config=to_jsonable(dict(config or {})), dir=run_dir,
                              name=name, id=run_id, resume="allow")

    def log(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        if self.run is not None:
            self.run.log(to_jsonable(dict(metrics)), step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
