"""``train.py``'s job: from a composed config to a trained model in its run folder.

:func:`train` reads top to bottom: check the config, hold the run folder, load the checkpoint to resume, build
data, model and optimisation (:func:`build_run`), restore, run the epochs (:func:`run_epochs`, one
:func:`mita.engine.loop.train_one_epoch` and :func:`mita.engine.loop.evaluate` each, a checkpoint after each),
release the folder.

Run folder (``cfg.run_dir``, one for all ranks; rank 0's path is broadcast): ``config.yaml`` (the resolved
config), ``log.jsonl`` (one JSON line per epoch), ``checkpoint.pth`` (rewritten atomically every epoch, with
the resolved config so that ``eval.py`` can rebuild the model), kept copies ``checkpoint_<epoch>.pth``,
``model_fp16.pth`` (``trainer.export_fp16``), ``wandb/``, Hydra's ``.hydra/`` and ``train.log``, and
``run.lock`` while a run writes it (:mod:`mita.engine.rundir`). The config is checked
(:mod:`mita.engine.validate`) before the folder is touched; a run refused at start (a config error, a
folder in use, a checkpoint of another configuration) leaves it as it was.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from mita.build import build_datasets, build_model_from_config
from mita.config import PRECISIONS, plain
from mita.data import build_loader, build_mixup
from mita.engine import checkpoint as ckpt
from mita.engine.distributed import barrier, broadcast_object, cleanup, init_distributed, is_main
from mita.engine.logging import JsonlLogger, NullLogger, WandbLogger
from mita.engine.loop import NonFiniteLossError, build_criterion, build_ema, evaluate, train_one_epoch
from mita.engine.optim import build_optimizer, build_scheduler, unwrap_model
from mita.engine.rundir import close_log_file, lock_run_dir, open_log_file, unlock_run_dir, write_hydra_files
from mita.engine.validate import DEVICES, ConfigError, check_train
from mita.utils.flops import count_params

__all__ = ["Run", "batch_sizes", "build_run", "describe_model", "device_of", "result_line", "run_epochs",
           "seed_everything", "train"]

_logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def batch_sizes(trainer: Mapping[str, Any], world_size: int) -> Tuple[int, int]:
    """(per-rank batch, global batch) from trainer.batch_size or trainer.global_batch_size."""
    if trainer.get("batch_size") is not None:
        per_rank = int(trainer["batch_size"])
        if per_rank < 1:
            raise ValueError(f"trainer.batch_size must be >= 1, got {per_rank}")
        return per_rank, per_rank * world_size
    total = trainer.get("global_batch_size")
    if total is None or int(total) < 1:
        raise ValueError(f"trainer.global_batch_size must be >= 1 (or set trainer.batch_size), got {total!r}")
    total = int(total)
    if total % world_size:
        raise ValueError(
            f"trainer.global_batch_size={total} is not divisible by the {world_size} ranks; "
            "change it or set trainer.batch_size (per rank)"
        )
    return total // world_size, total


def device_of(name: str) -> Optional[str]:
    """``trainer.device`` / ``device`` as :func:`mita.engine.init_distributed` takes it (auto: None)."""
    if name not in DEVICES:
        raise ValueError(f"trainer.device={name!r} must be one of {list(DEVICES)}")
    return None if name == "auto" else name


def describe_model(model: Mapping[str, Any]) -> str:
    """``fmnist_mini (timm deit_tiny_patch16_224, patch_size=2, embed_dim=32, ...)``: a ``model`` node's name, and
    the timm architecture with the arguments that change it."""
    args = "".join(f", {k}={v}" for k, v in (model.get("kwargs") or {}).items())
    return f"{model.get('name') or model['arch']} (timm {model['arch']}{args})"


def result_line(record: Mapping[str, Any], run_dir: str) -> str:
    """The run's last line: its top-1 and its run folder."""
    if record.get("val_acc1") is None:
        return f"no evaluation yet; run folder {run_dir}"
    return (f"top-1 {record['val_acc1']:.2f}% (best {record['best_acc1']:.2f}%) after epoch {record['epoch']}; "
            f"run folder {run_dir}")


def on_main(fn, *args):
    """``fn(*args)`` on rank 0, its result on every rank; an exception on rank 0 is raised on every rank
    (so that no rank waits for a collective the others never reach)."""
    result, error, shared = None, None, None
    if is_main():
        try:
            result = fn(*args)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = shared = err
            try:
                pickle.dumps(err)
            except Exception:  # noqa: BLE001 - an error that cannot travel goes as its message
                shared = RuntimeError(f"rank 0: {type(err).__name__}: {err}")
    result, shared = broadcast_object((result, shared))
    if error is not None:
        raise error
    if shared is not None:
        raise shared
    return result


def _open_run_dir(path: str) -> str:
    """Rank 0 creates and locks the run folder (:func:`mita.engine.rundir.lock_run_dir`); every rank gets
    its absolute path. A folder another run holds raises RunFolderLocked on every rank."""
    def lock() -> str:
        run_dir = os.path.abspath(os.path.expanduser(path))
        lock_run_dir(run_dir)
        return run_dir

    return on_main(lock)


def _resume_state(resume: Any, run_dir: str) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """``(path, state)`` of the checkpoint to continue from, or ``(None, None)``.

    ``resume=auto`` takes the run folder's latest checkpoint, or, when it cannot be read, the newest readable
    ``checkpoint_<epoch>.pth`` (with a warning); ``resume=PATH`` takes that file only. Rank 0 chooses.
    """
    if resume in (None, "never", False):
        return None, None
    if resume == "auto":
        path = ckpt.latest_checkpoint(run_dir)
        if path is None:
            return None, None
        fallback = True
    else:
        path = os.path.expanduser(str(resume))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume={resume!r}: no such checkpoint (use auto, never or a checkpoint path)")
        fallback = False
    loaded: Dict[str, Any] = {}

    def choose() -> str:
        chosen, loaded["state"] = ckpt.load_resume_state(path, fallback=fallback)
        return chosen

    chosen = on_main(choose)
    return chosen, loaded["state"] if is_main() else ckpt.load_state(chosen)


def _schedule_changes(state: Mapping[str, Any], config: Mapping[str, Any], run_info: Mapping[str, Any],
                      scheduler) -> List[str]:
    """The settings in which the schedule of a checkpoint's run (``state``) and ``scheduler`` differ, as
    ``"trainer.epochs 3 -> 6"``; empty when the two schedules are the same."""
    old_state = state.get("scheduler") or {}
    if all(old_state.get(key) == value for key, value in scheduler.state_dict().items()):
        return []
    old_cfg = state.get("config") or {}
    changes = []
    for section, keys in (("trainer", ("epochs", "max_steps_per_epoch")), ("sched", None)):
        old, new = old_cfg.get(section) or {}, config.get(section) or {}
        for key in keys or sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                changes.append(f"{section}.{key} {old.get(key)!r} -> {new.get(key)!r}")
    old_run = state.get("run") or {}
    if old_run.get("lr") != run_info.get("lr"):
        changes.append(f"lr {old_run.get('lr')!r} -> {run_info.get('lr')!r}")
    return changes or ["the schedule's settings"]


def _check_same_experiment(stored: Optional[dict], config: dict, path: str) -> None:
    """A resumed checkpoint must come from the same model, attention and data: runs that differ only in
    a setting the run folder's name leaves out (e.g. ``attention.pool``) would otherwise resume each
    other silently. Training length, logging, paths and the model's name (a label) may change
    between the two."""
    if not stored:
        return
    differ = []
    for section in ("model", "attention", "data"):
        old, new = stored.get(section) or {}, config.get(section) or {}
        for key in sorted(set(old) | set(new)):
            label = section == "model" and key == "name"
            if key not in ("root", "num_workers", "pin_memory") and not label and old.get(key) != new.get(key):
                differ.append(f"{section}.{key}: {old.get(key)!r} in the checkpoint, {new.get(key)!r} now")
    if differ:
        raise ConfigError(
            f"resume: the checkpoint {path} was trained with another configuration ("
            + "; ".join(differ) + "). Give this run its own folder (e.g. attention.tag=NAME or run_dir=PATH) "
            "or start afresh with resume=never."
        )


def _export_submitit_env() -> None:
    """Inside a multi-task submitit (SLURM) job, expose the job as torchrun's environment variables."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment  # optional: SLURM launches only
    except ImportError:
        return
    env = TorchDistributedEnvironment()
    if env.world_size > 1:
        env.export(set_cuda_visible_devices=False)


def _rewrite_log(path: str, start_epoch: int, last_record: Optional[Dict[str, Any]]) -> None:
    """On resume: keep the lines of epochs before ``start_epoch``, restore the last one from the checkpoint
    (a run killed between saving and logging lacks it)."""
    records: List[Dict[str, Any]] = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if isinstance(record.get("epoch"), int) and record["epoch"] < start_epoch:
                    records.append(record)
    if last_record is not None and not any(r.get("epoch") == last_record.get("epoch") for r in records):
        records.append(last_record)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _build_loggers(cfg: DictConfig, run_dir: str, config: Dict[str, Any]):
    jsonl = JsonlLogger(run_dir)
    logger_cfg = cfg.logger
    if logger_cfg.name == "none":
        return jsonl, NullLogger()
    if logger_cfg.get("entity"):
        os.environ.setdefault("WANDB_ENTITY", str(logger_cfg.entity))
    name = logger_cfg.get("run_name") or f"{cfg.experiment_name}/{cfg.attention.tag}/seed{cfg.seed}"
    return jsonl, WandbLogger(logger_cfg.project, mode=logger_cfg.mode, config=config, run_dir=run_dir, name=name)


@dataclass
class Run:
    """What one training run works with, built from the config by :func:`build_run`."""

    model: nn.Module
    train_model: nn.Module
    eval_model: nn.Module
    model_ema: Optional[nn.Module]
    train_loader: Any
    val_loader: Any
    mixup_fn: Any
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    amp_dtype: Optional[torch.dtype]
    n_params: int


def _build_data(cfg: DictConfig, batch_size: int, world_size: int, device: torch.device):
    """``(train loader, val loader, mixup or None, criterion)``; a bad dataset path fails here, before any model."""
    data, trainer, aug = plain(cfg.data), plain(cfg.trainer), plain(cfg.data.aug)
    seed = int(cfg.seed)
    train_set, val_set = build_datasets(data, seed)
    loader_kwargs = dict(num_workers=data["num_workers"] or 0, distributed=world_size > 1, seed=seed,
                         pin_memory=bool(data["pin_memory"]) and device.type == "cuda")
    train_loader = build_loader(train_set, batch_size=batch_size, train=True, repeated_aug=aug["repeated_aug"],
                                **loader_kwargs)
    eval_batch = trainer["eval_batch_size"] or int(1.5 * batch_size)
    val_loader = build_loader(val_set, batch_size=eval_batch, train=False, **loader_kwargs)
    mixup_fn = build_mixup(mixup=aug["mixup"], cutmix=aug["cutmix"], label_smoothing=aug["label_smoothing"],
                           num_classes=data["num_classes"], prob=aug["mixup_prob"],
                           switch_prob=aug["mixup_switch_prob"], mode=aug["mixup_mode"])
    criterion = build_criterion(mixup_active=mixup_fn is not None, label_smoothing=aug["label_smoothing"],
                                bce=trainer["loss"] == "bce", bce_target_thresh=trainer["bce_target_thresh"])
    return train_loader, val_loader, mixup_fn, criterion


def build_run(cfg: DictConfig, *, lr: float, batch_size: int, world_size: int, device: torch.device,
              load_pretrained: bool) -> Run:
    """Data, model (DDP, compile, EMA), optimizer, schedule and scaler of a run, from ``cfg``."""
    train_loader, val_loader, mixup_fn, criterion = _build_data(cfg, batch_size, world_size, device)
    trainer = plain(cfg.trainer)
    # The same initial weights on every rank (DDP also broadcasts rank 0's).
    seed_everything(int(cfg.seed))
    model = build_model_from_config(cfg.model, cfg.attention, load_pretrained=load_pretrained).to(device)
    ema = trainer["ema"]
    model_ema = build_ema(model, decay=ema["decay"]) if ema["enabled"] else None
    # Evaluation runs outside DDP: ranks may hold different numbers of evaluation batches, and DDP's
    # forward would wait for the others.
    train_model = eval_model = model
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if trainer["compile"]:
        train_model = torch.compile(train_model)
        eval_model = train_model if world_size == 1 else torch.compile(model)

    optim = {k: v for k, v in plain(cfg.optim).items() if k != "lr_base_batch"}
    optimizer = build_optimizer(model, **dict(optim, lr=lr))
    max_steps = trainer["max_steps_per_epoch"]
    steps_per_epoch = len(train_loader) if max_steps is None else min(len(train_loader), int(max_steps))
    scheduler = build_scheduler(optimizer, **plain(cfg.sched), epochs=trainer["epochs"],
                                steps_per_epoch=steps_per_epoch)
    amp_dtype = PRECISIONS[trainer["precision"]]
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None
    return Run(model=model, train_model=train_model, eval_model=eval_model, model_ema=model_ema,
               train_loader=train_loader, val_loader=val_loader, mixup_fn=mixup_fn, criterion=criterion,
               optimizer=optimizer, scheduler=scheduler, scaler=scaler, amp_dtype=amp_dtype,
               n_params=count_params(model))


def _restore(state: Mapping[str, Any], path: str, run: Run, *, config: Mapping[str, Any],
             run_info: Mapping[str, Any]) -> Tuple[int, float, Optional[Dict[str, Any]]]:
    """Load a training checkpoint's state into the run's objects; returns ``(start epoch, best top-1, the last
    epoch's record)``.

    The schedule is not loaded: timm's schedules are functions of the epoch and their settings, so the one
    built from this config continues the run (timm's train.py does the same). When it differs from the
    checkpoint's (e.g. more epochs stretch the cosine over the new length), the log says so.
    """
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    start_epoch = int(state["epoch"]) + 1
    epochs = int(config["trainer"]["epochs"])
    changes = _schedule_changes(state, config, run_info, run.scheduler)
    if changes and is_main() and start_epoch < epochs:
        span = f"epoch {start_epoch}" if start_epoch == epochs - 1 else f"epochs {start_epoch}-{epochs - 1}"
        _logger.warning("resume: the learning-rate schedule was rebuilt for the new settings (%s); %s follow the "
                        "schedule of a fresh run with these settings", ", ".join(changes), span)
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    if run.model_ema is not None and state.get("model_ema"):
        run.model_ema.module.load_state_dict(state["model_ema"])
    if is_main():
        _logger.info("resumed from %s at epoch %d%s", path, start_epoch,
                     "" if start_epoch < epochs else f" (trainer.epochs={epochs}: nothing left to train)")
    return start_epoch, float(state.get("best_acc1", 0.0)), state.get("record")


def _save(run: Run, run_dir: str, epoch: int, record: Dict[str, Any], best_acc1: float, *,
          config: Dict[str, Any], run_info: Dict[str, Any], keep: bool) -> None:
    """Rank 0 writes the epoch's checkpoint (and a kept copy when ``keep``)."""
    state = {
        "model": unwrap_model(run.model).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "model_ema": run.model_ema.module.state_dict() if run.model_ema is not None else None,
        "epoch": epoch,
        "best_acc1": best_acc1,
        "record": record,
        "config": config,
        "run": run_info,
        "format": ckpt.FORMAT,
    }
    ckpt.save_checkpoint(ckpt.checkpoint_path(run_dir), state)
    if keep:
        ckpt.save_checkpoint(ckpt.checkpoint_path(run_dir, epoch), state)


def run_epochs(cfg: DictConfig, run: Run, run_dir: str, *, start_epoch: int, best_acc1: float,
               record: Dict[str, Any], device: torch.device, rank: int, loggers, config: Dict[str, Any],
               run_info: Dict[str, Any]) -> Dict[str, Any]:
    """Epochs ``start_epoch .. trainer.epochs - 1``: train, evaluate, save, log; returns the last record."""
    trainer = plain(cfg.trainer)
    seed, epochs = int(cfg.seed), trainer["epochs"]
    jsonl, wandb_logger = loggers
    for epoch in range(start_epoch, epochs):
        seed_everything(_epoch_seed(seed, epoch, rank))
        start = time.perf_counter()
        try:
            train_stats = train_one_epoch(
                run.train_model, run.criterion, run.train_loader, run.optimizer, device, epoch, scaler=run.scaler,
                amp_dtype=run.amp_dtype, mixup_fn=run.mixup_fn, model_ema=run.model_ema,
                clip_grad=trainer["clip_grad"], scheduler=run.scheduler, progress=bool(trainer["progress"]),
                max_steps=trainer["max_steps_per_epoch"],
            )
        except NonFiniteLossError as err:
            _logger.error("%s Last good checkpoint: %s", err, ckpt.latest_checkpoint(run_dir))
            jsonl.log({"epoch": epoch, "error": str(err)})
            raise
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()}}
        last = epoch == epochs - 1
        if last or (epoch + 1) % int(trainer["eval_every"] or 1) == 0:
            val_stats = evaluate(run.eval_model, run.val_loader, device, amp_dtype=run.amp_dtype)
            record.update({f"val_{k}": v for k, v in val_stats.items()})
            best_acc1 = max(best_acc1, val_stats["acc1"])
            if run.model_ema is not None and trainer["ema"]["eval"]:
                ema_stats = evaluate(run.model_ema.module, run.val_loader, device, amp_dtype=run.amp_dtype)
                record.update({f"ema_{k}": v for k, v in ema_stats.items()})
        record.update(best_acc1=best_acc1, epoch_time_s=time.perf_counter() - start, n_params=run.n_params)
        if is_main():
            keep = trainer["keep_every"]
            _save(run, run_dir, epoch, record, best_acc1, config=config, run_info=run_info,
                  keep=bool(keep) and ((epoch + 1) % int(keep) == 0 or last))
        barrier()
        jsonl.log(record)
        wandb_logger.log(record, step=epoch)
        if is_main():
            _logger.info("epoch %d: %s", epoch, json.dumps(
                {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}))
    return record


def train(cfg: DictConfig) -> Dict[str, Any]:
    """Train as ``cfg`` says (see ``configs/train.yaml``); returns the last epoch's JSON record, with the run
    folder under ``run_dir``.

    Raises:
        mita.engine.loop.NonFiniteLossError: the loss became NaN/inf; the run folder keeps the checkpoint
            of the last completed epoch.
        mita.engine.validate.ConfigError: a config value that cannot work (named), found before the run
            folder is touched; or a checkpoint to resume of another configuration.
        mita.engine.rundir.RunFolderLocked: another run holds the run folder (left unchanged).
        mita.engine.checkpoint.CheckpointError: no readable checkpoint to resume from.
        FileNotFoundError / ValueError: a missing dataset or checkpoint, a bad value found later.
    """
    _export_submitit_env()
    # Everything that needs no data is checked before any folder, process group or dataset.
    check_train(cfg)
    trainer = plain(cfg.trainer)
    if trainer["threads"]:
        torch.set_num_threads(int(trainer["threads"]))
    dist_info = init_distributed(trainer["dist_backend"], device=device_of(trainer["device"]))
    rank, world_size, device = dist_info["rank"], dist_info["world_size"], dist_info["device"]
    run_dir, log_file = None, None
    try:
        run_dir = _open_run_dir(cfg.run_dir)
        batch_size, global_batch = batch_sizes(trainer, world_size)
        lr = float(cfg.optim.lr)
        if cfg.optim.lr_base_batch:
            lr = lr * global_batch / float(cfg.optim.lr_base_batch)
        config = OmegaConf.to_container(cfg, resolve=True)
        run_info = dict(world_size=world_size, batch_size=batch_size, global_batch_size=global_batch, lr=lr,
                        run_dir=run_dir)
        resume_from, state = _resume_state(cfg.resume, run_dir)
        if state is not None:
            _check_same_experiment(state.get("config"), config, resume_from)
        # The run goes ahead: only now is anything in the folder written or removed.
        if is_main():
            ckpt.remove_orphans(run_dir)
            OmegaConf.save(OmegaConf.create(config), os.path.join(run_dir, "config.yaml"))
            write_hydra_files(run_dir, cfg)
        log_file = open_log_file(run_dir, rank)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        run = build_run(cfg, lr=lr, batch_size=batch_size, world_size=world_size, device=device,
                        load_pretrained=resume_from is None)
        start_epoch, best_acc1, last_record = 0, 0.0, None
        if state is not None:
            start_epoch, best_acc1, last_record = _restore(state, resume_from, run, config=config, run_info=run_info)
            state = None  # the optimizer state is in place now: free the loaded copy
        if is_main():
            _rewrite_log(os.path.join(run_dir, "log.jsonl"), start_epoch, last_record)
        barrier()

        loggers = _build_loggers(cfg, run_dir, dict(config, run=run_info))
        if is_main():
            _logger.info(
                "training %s with %s attention: %.2fM parameters, %d ranks x %d images (global %d), lr %.3g, "
                "epochs %d-%d, run folder %s", describe_model(config["model"]), cfg.attention.name, run.n_params / 1e6, world_size,
                batch_size, global_batch, lr, start_epoch, trainer["epochs"] - 1, run_dir,
            )
        try:
            record = run_epochs(cfg, run, run_dir, start_epoch=start_epoch, best_acc1=best_acc1,
                                record=last_record or {}, device=device, rank=rank, loggers=loggers, config=config,
                                run_info=run_info)
        finally:
            loggers[1].close()
        if trainer["export_fp16"] and is_main():
            ckpt.export_weights(ckpt.checkpoint_path(run_dir), os.path.join(run_dir, "model_fp16.pth"), fp16=True)
        barrier()
        if is_main():
            _logger.info("%s", result_line(record, run_dir))
        return record
    finally:
        close_log_file(log_file)
        if run_dir is not None and is_main():
            unlock_run_dir(run_dir)
        cleanup()
