"""Inference-time (m, k) grid (the paper's Fig. 7): one MiTA checkpoint evaluated at other (num_landmarks, topk).

No retraining: each point rebuilds the model with ``attention.num_landmarks=m attention.topk=k`` (what
``eval.py ckpt=... attention.num_landmarks=m attention.topk=k`` does) and evaluates it on the same data.
The training point (the checkpoint's own m, k) is always included and boxed in the heatmap; it equals a
plain ``eval.py`` of the checkpoint. Points the model cannot run (m above the number of patches, m not a
perfect square for the grid pool, k above N) are kept in the JSON with their error and left blank.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, Sequence

import numpy as np

from mita.analysis import common

__all__ = ["DEFAULT_LANDMARKS", "DEFAULT_TOPK", "mk_grid"]

_logger = logging.getLogger(__name__)

DEFAULT_LANDMARKS = (9, 16, 25, 36, 49)
DEFAULT_TOPK = (9, 16, 25, 36, 49)


def _check_values(values: Sequence[int], arg: str, minimum: int) -> list:
    values = [int(v) for v in values]
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{arg}={values}: give one or more ints >= {minimum}")
    return sorted(set(values))


def mk_grid(ckpt_path: str, out: str, *, overrides: Sequence[str] = (),
            num_landmarks: Sequence[int] = DEFAULT_LANDMARKS, topk: Sequence[int] = DEFAULT_TOPK, max_images=None,
            split: str = "val", batch_size: int = 256, num_workers: int = 0, device: str = "auto",
            precision: str = "fp32", progress: bool = True) -> Dict[str, Any]:
    """Write ``mk_grid.png``, ``mk_grid.json`` and ``mk_grid.csv`` to ``out``; returns the JSON payload."""
    from tqdm import tqdm

    ckpt = common.read_checkpoint(ckpt_path)
    ov = common.parse_overrides(overrides)
    base = common.resolve_attention(ckpt.attention, ov["attention"])
    if base.get("name") != "mita":
        raise ValueError(f"ckpt={ckpt.path!r}: attention {base.get('name')!r} has no (m, k); pass a MiTA checkpoint")
    if base.get("num_landmarks") is None or base.get("topk") is None:
        raise ValueError("attention: the (m, k) to start from is unknown; pass attention.num_landmarks and "
                         "attention.topk with attention.name=mita")
    ms = _check_values(num_landmarks, "num_landmarks", 1)
    ks = _check_values(topk, "topk", 0)
    # Another m gets a square landmark grid (a stored landmark_grid fits the training m only).
    bad = [m for m in ms if math.isqrt(m) ** 2 != m and m != int(base["num_landmarks"])]
    if bad:
        raise ValueError(f"num_landmarks={ms}: {bad} are not perfect squares, which the square landmark grid needs")
    train_m, train_k = int(base["num_landmarks"]), int(base["topk"])
    if train_m not in ms or train_k not in ks:
        _logger.info("adding the training point m=%d, k=%d to the grid", train_m, train_k)
        ms, ks = sorted(set(ms) | {train_m}), sorted(set(ks) | {train_k})
    dev = common.resolve_device(device)
    data = common.in_memory(common.load_eval_data(ckpt, ov["data"], split=split, max_images=max_images,
                                                  batch_size=batch_size, num_workers=num_workers,
                                                  pin_memory=dev.type == "cuda"))

    points = []
    for m, k in tqdm([(m, k) for m in ms for k in ks], desc="m x k grid", disable=not progress, dynamic_ncols=True):
        attention = dict(base, num_landmarks=m, topk=k)
        if m != train_m:
            # A stored non-square landmark grid belongs to the training m only.
            attention.pop("landmark_grid", None)
        point: Dict[str, Any] = {"num_landmarks": m, "topk": k, "training_point": (m, k) == (train_m, train_k)}
        try:
            model, _ = common.build_model(ckpt, attention, data=data.config, device=dev)
            point.update(common.evaluate_model(model, data, dev, precision))
        except ValueError as err:
            if point["training_point"]:
                raise
            point["error"] = str(err)
            _logger.warning("m=%d, k=%d skipped: %s", m, k, err)
        points.append(point)

    acc = np.full((len(ms), len(ks)), np.nan)
    for point in points:
        if "acc1" in point:
            acc[ms.index(point["num_landmarks"]), ks.index(point["topk"])] = point["acc1"]
    from mita.analysis.plots import annotated_heatmap, pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.0 * len(ks) + 2.6, 0.8 * len(ms) + 1.8))
    image = annotated_heatmap(ax, acc, ms, ks, fmt="{:.1f}", mark=[(ms.index(train_m), ks.index(train_k))],
                              mark_label="training (m, k)")
    fig.colorbar(image, ax=ax, label="top-1 (%)")
    ax.set_xlabel("k (keys per routed expert)")
    ax.set_ylabel("m (landmarks)")
    ax.set_title(f"{ckpt.label} evaluated at other (m, k), no retraining", fontsize=9)

    training = next(p for p in points if p["training_point"])
    payload = {
        "analysis": "mk_grid",
        "ckpt": ckpt.path,
        "epoch": ckpt.epoch,
        "attention": base,
        "data": data.config.get("name"),
        "split": split,
        "precision": precision,
        "n_images": len(data.dataset),
        "num_landmarks": ms,
        "topk": ks,
        "training_point": {"num_landmarks": train_m, "topk": train_k, "acc1": training.get("acc1")},
        "points": points,
    }
    os.makedirs(out, exist_ok=True)
    common.write_json(os.path.join(out, "mk_grid.json"), payload)
    columns = ("num_landmarks", "topk", "training_point", "acc1", "acc5", "loss", "n", "error")
    common.write_csv(os.path.join(out, "mk_grid.csv"), [{c: p.get(c) for c in columns} for p in points])
    save_figure(fig, os.path.join(out, "mk_grid.png"))
    _logger.info("m x k grid: training point (%d, %d) top-1 %.2f", train_m, train_k, training.get("acc1"))
    return payload
