"""Checkpoint-swap matrix (the paper's Fig. 8): weights trained with one attention, evaluated with another.

Row i holds the weights of checkpoint i; column j evaluates them with checkpoint j's attention config (as
``eval.py ckpt=CKPT_i attention=...`` does), on checkpoint i's evaluation data. The diagonal is each
checkpoint's native accuracy (a plain ``eval.py``). The attentions share timm's parameter names (``qkv``,
``proj``), so a swap loads every weight; parameters that the evaluated attention has and the checkpoint lacks
start from a seeded init and are listed per cell (``missing_keys``).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional, Sequence

import numpy as np

from mita.analysis import common

__all__ = ["swap_matrix"]

_logger = logging.getLogger(__name__)


def swap_matrix(ckpt_paths: Sequence[str], out: str, *, overrides: Sequence[str] = (),
                labels: Optional[Sequence[str]] = None, max_images=None, split: str = "val", batch_size: int = 256,
                num_workers: int = 0, device: str = "auto", precision: str = "fp32",
                progress: bool = True) -> Dict[str, Any]:
    """Write ``swap.png``, ``swap.json`` and ``swap.csv`` to ``out``; returns the JSON payload.

    ``overrides``: ``data.KEY=VALUE`` only (each column's attention is a checkpoint's). ``labels``: one name
    per checkpoint (default: each attention's tag).
    """
    from tqdm import tqdm

    if len(ckpt_paths) < 2:
        raise ValueError(f"ckpts: give two or more checkpoints, got {list(ckpt_paths)}")
    ckpts = [common.read_checkpoint(path, arg=f"ckpts[{i}]") for i, path in enumerate(ckpt_paths)]
    ov = common.parse_overrides(overrides, groups=("data",))
    if labels is None:
        labels = [c.label for c in ckpts]
    labels = [str(label) for label in labels]
    if len(labels) != len(ckpts):
        raise ValueError(f"labels={labels}: give one label per checkpoint ({len(ckpts)})")
    if len(set(labels)) != len(labels):
        labels = [f"{label} ({i})" for i, label in enumerate(labels)]
    archs = {json.dumps(c.config["model"].get("kwargs"), sort_keys=True) + str(c.config["model"].get("arch"))
             for c in ckpts}
    if len(archs) > 1:
        _logger.warning("the checkpoints have different model configs; weights may not fit other rows' models")
    dev = common.resolve_device(device)

    datasets: Dict[str, common.EvalData] = {}
    cells = []
    n = len(ckpts)
    for i, j in tqdm([(i, j) for i in range(n) for j in range(n)], desc="swap matrix", disable=not progress,
                     dynamic_ncols=True):
        weights, attention_of = ckpts[i], ckpts[j]
        data_key = json.dumps(dict(weights.config["data"], **ov["data"]), sort_keys=True, default=str)
        if data_key not in datasets:
            datasets[data_key] = common.in_memory(common.load_eval_data(
                weights, ov["data"], split=split, max_images=max_images, batch_size=batch_size,
                num_workers=num_workers, pin_memory=dev.type == "cuda"))
        data = datasets[data_key]
        cell: Dict[str, Any] = {"weights": labels[i], "attention": labels[j], "row": i, "col": j}
        try:
            model, info = common.build_model(weights, attention_of.attention, data=data.config, device=dev)
            cell.update(common.evaluate_model(model, data, dev, precision))
            cell.update(missing_keys=info["missing_keys"], unexpected_keys=info["unexpected_keys"])
        except ValueError as err:
            if i == j:
                raise
            cell["error"] = str(err)
            _logger.warning("weights %s with attention %s skipped: %s", labels[i], labels[j], err)
        cells.append(cell)

    acc = np.full((n, n), np.nan)
    for cell in cells:
        if "acc1" in cell:
            acc[cell["row"], cell["col"]] = cell["acc1"]
    from mita.analysis.plots import annotated_heatmap, pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.5 * n + 2.8, 1.1 * n + 1.8))
    image = annotated_heatmap(ax, acc, labels, labels, fmt="{:.1f}", cmap="cividis", origin="upper",
                              mark=[(i, i) for i in range(n)], mark_label="native")
    fig.colorbar(image, ax=ax, label="top-1 (%)")
    ax.set_xlabel("evaluated with attention")
    ax.set_ylabel("weights trained with")
    ax.tick_params(axis="x", labelrotation=20)
    ax.set_title("Checkpoint swap", fontsize=9)

    payload = {
        "analysis": "swap_matrix",
        "ckpts": [c.path for c in ckpts],
        "epochs": [c.epoch for c in ckpts],
        "labels": labels,
        "attentions": [c.attention for c in ckpts],
        "split": split,
        "precision": precision,
        "acc1": acc.tolist(),
        "native_acc1": [acc[i, i] for i in range(n)],
        "cells": cells,
    }
    os.makedirs(out, exist_ok=True)
    common.write_json(os.path.join(out, "swap.json"), payload)
    columns = ("weights", "attention", "acc1", "acc5", "loss", "n", "error")
    common.write_csv(os.path.join(out, "swap.csv"), [{c: cell.get(c) for c in columns} for cell in cells])
    save_figure(fig, os.path.join(out, "swap.png"))
    _logger.info("swap matrix (rows weights, columns attention):\n%s", np.array2string(acc, precision=2))
    return payload
