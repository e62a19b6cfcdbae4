"""``eval.py``'s job: a checkpoint of train.py evaluated, with its own attention or another, as a JSON report.

The model is rebuilt from the config stored in the checkpoint, with the overrides of ``configs/eval.yaml``
(:func:`merge_attention`, :func:`merge_data`: the rules the analyses of :mod:`mita.analysis` follow too); the
checkpoint file is read once.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Mapping, Optional

import torch
from omegaconf import DictConfig

from mita.build import build_datasets, build_model_from_config
from mita.config import PRECISIONS, plain
from mita.data import build_loader
from mita.engine import checkpoint as ckpt
from mita.engine.distributed import cleanup, init_distributed
from mita.engine.loop import evaluate
from mita.engine.rundir import close_log_file, open_log_file, write_hydra_files
from mita.engine.training import device_of, seed_everything
from mita.engine.validate import check_model
from mita.models import load_checkpoint
from mita.utils.flops import count_flops, count_params

__all__ = ["evaluate_checkpoint", "merge_attention", "merge_data", "stored_config"]

_logger = logging.getLogger(__name__)


def merge_attention(stored: Mapping[str, Any], override: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The attention to build from a checkpoint's ``stored`` attention and the keys given (``override``):
    with a ``name`` they replace it, otherwise they update it; a key given as None goes back to the
    constructor's default."""
    override = dict(override or {})
    if override.get("name") is not None:
        return {k: v for k, v in override.items() if v is not None}
    attention = dict(stored)
    for key, value in override.items():
        if value is None:
            attention.pop(key, None)
        else:
            attention[key] = value
    return attention


def merge_data(stored: Mapping[str, Any], override: Mapping[str, Any]) -> Dict[str, Any]:
    """A checkpoint's ``stored`` data config with the keys given in ``override`` (None: keep the stored one)."""
    return dict(stored, **{k: v for k, v in override.items() if v is not None})


def stored_config(state: Mapping[str, Any], path: str) -> Dict[str, Any]:
    """The training config a train.py checkpoint holds (ValueError naming ``path`` when it holds none)."""
    stored = state.get("config")
    if not isinstance(stored, Mapping) or not all(key in stored for key in ("model", "attention", "data")):
        raise ValueError(
            f"{path!r} holds no training config (a checkpoint written by train.py, or its fp16 export, has one); "
            "build the model yourself and use mita.models.load_checkpoint"
        )
    return dict(stored)


def _count_macs(model, in_chans: int, img_size: int, device) -> Dict[str, Any]:
    """``macs``/``gmacs`` of one image; a counting failure is recorded (``macs_error``), not raised."""
    x = torch.randn(1, in_chans, img_size, img_size, device=device)
    try:
        macs = count_flops(model, x)
        return {"macs": macs, "gmacs": macs / 1e9}
    except Exception as err:  # noqa: BLE001 - a counting failure must not discard the accuracy
        _logger.exception("FLOP counting failed; the report keeps the accuracy, macs=None")
        return {"macs": None, "gmacs": None, "macs_error": f"{type(err).__name__}: {err}"}


def evaluate_checkpoint(cfg: DictConfig) -> Dict[str, Any]:
    """Evaluate ``cfg.ckpt`` (see ``configs/eval.yaml``); returns the JSON report as a dict.

    ``cfg.attention``: with ``name`` null (``attention=checkpoint``) its non-null keys update the stored
    attention; otherwise it replaces it (then weights the new attention lacks are ignored and those it adds
    keep their initial values; both lists are in the report). ``cfg.export`` writes a weights-only copy
    instead of evaluating.
    """
    path = os.path.expanduser(str(cfg.ckpt))
    if cfg.export:
        out = ckpt.export_weights(path, os.path.expanduser(str(cfg.export)), fp16=bool(cfg.export_fp16))
        return {"ckpt": path, "export": out, "fp16": bool(cfg.export_fp16)}
    state = ckpt.load_state(path)
    stored = stored_config(state, path)
    given = {k: v for k, v in plain(cfg.attention).items() if v is not None}
    attention = merge_attention(stored["attention"], given)
    data = merge_data(stored["data"], plain(cfg.data))
    # Evaluate at another resolution: the model's position embeddings are resampled on loading.
    model_cfg = dict(stored["model"], img_size=data["img_size"])
    check_model(model_cfg, attention)
    seed = int(stored.get("seed", 0))
    seed_everything(seed)
    precision = cfg.precision or "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {list(PRECISIONS)}")
    dist_info = init_distributed(device=device_of(cfg.device))
    device = dist_info["device"]
    log_file = None
    try:
        # Hydra's files for this evaluation, written once its config is known to work
        if cfg.run_dir:
            run_dir = os.path.abspath(str(cfg.run_dir))
            if dist_info["rank"] == 0:
                write_hydra_files(run_dir, cfg)
            log_file = open_log_file(run_dir, dist_info["rank"])
        model = build_model_from_config(model_cfg, attention, load_pretrained=False)
        missing, unexpected = load_checkpoint(model, path, state=state)
        model.to(device).eval()
        _, eval_set = build_datasets(dict(data, max_val_samples=data.get("max_samples")), seed, train=False,
                                     split=cfg.split)
        loader = build_loader(eval_set, batch_size=int(data.get("batch_size") or 256), train=False,
                              num_workers=int(data.get("num_workers") or 0),
                              distributed=dist_info["world_size"] > 1, pin_memory=device.type == "cuda")
        stats = evaluate(model, loader, device, amp_dtype=PRECISIONS[precision], progress=True)
        report: Dict[str, Any] = {
            "ckpt": path,
            "epoch": state.get("epoch"),
            "model": model_cfg.get("name") or model_cfg["arch"],
            "arch": model_cfg["arch"],
            "attention": attention,
            "data": data["name"],
            "split": cfg.split,
            "img_size": data["img_size"],
            "acc1": stats["acc1"],
            "acc5": stats["acc5"],
            "loss": stats["loss"],
            "n": stats["n"],
            "images_per_s": stats["images_per_s"],
            "params": count_params(model),
            "device": str(device),
            "precision": precision,
            "missing_keys": missing,
            "unexpected_keys": unexpected,
        }
        if cfg.flops:
            report.update(_count_macs(model, int(model_cfg["in_chans"]), int(data["img_size"]), device))
        if cfg.out and dist_info["rank"] == 0:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
            with open(cfg.out, "w", encoding="utf-8") as handle:
                json.dump(report, handle, indent=2)
        return report
    finally:
        close_log_file(log_file)
        cleanup()
