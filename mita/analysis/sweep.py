"""A sweep of train.py runs as a Markdown table and a heatmap (m x k by default).

Every folder under SWEEP_DIR holding ``config.yaml`` and ``log.jsonl`` (what train.py writes) is one run;
runs that differ only in their seed are averaged. ``scripts/collect_sweep.py`` is its command line::

    python train.py -m experiment=fmnist attention.num_landmarks=9,16,25,36 attention.topk=9,16,25,36
    python scripts/collect_sweep.py outputs/fmnist
    python scripts/collect_sweep.py outputs/fmnist --metric best_acc1 --out outputs/fmnist_mk

Writes ``<out>.md`` (the table, also printed) and ``<out>.png`` (the heatmap); ``--out`` defaults to
``SWEEP_DIR/sweep``. ``--rows``/``--cols`` pick other config keys (dotted paths) for the two axes and
``--where KEY=VALUE`` keeps only matching runs (e.g. ``--where attention.name=mita``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

_logger = logging.getLogger(__name__)


def _lookup(config: Dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _read_log(path: str) -> List[Dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    _logger.warning("%s: skipping a malformed line", path)
    return records


def find_runs(sweep_dir: str) -> Iterable[str]:
    """Folders under ``sweep_dir`` (itself included) with a config.yaml and a log.jsonl."""
    for folder, dirs, files in os.walk(sweep_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "wandb")
        if "config.yaml" in files and "log.jsonl" in files:
            yield folder


def load_runs(sweep_dir: str, metric: str, rows: str, cols: str,
              where: Sequence[Tuple[str, str]] = ()) -> List[Dict[str, Any]]:
    """One dict per run: folder, row and column values, seed, epochs done and the metric's last value."""
    runs = []
    for folder in find_runs(sweep_dir):
        with open(os.path.join(folder, "config.yaml"), encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
        if any(str(_lookup(config, key)) != value for key, value in where):
            continue
        records = [r for r in _read_log(os.path.join(folder, "log.jsonl")) if r.get(metric) is not None]
        if not records:
            _logger.warning("%s: no epoch with %r yet; skipped", folder, metric)
            continue
        last = records[-1]
        runs.append({
            "folder": os.path.relpath(folder, sweep_dir),
            "row": _lookup(config, rows),
            "col": _lookup(config, cols),
            "seed": config.get("seed"),
            "epoch": last.get("epoch"),
            "epochs": _lookup(config, "trainer.epochs"),
            "value": float(last[metric]),
        })
    return runs


def _sort_key(value: Any) -> Tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def aggregate(runs: Sequence[Dict[str, Any]]):
    """(row values, column values, {(row, col): (mean, std, count)})."""
    cells: Dict[Tuple[Any, Any], List[float]] = defaultdict(list)
    for run in runs:
        cells[(run["row"], run["col"])].append(run["value"])
    row_values = sorted({r for r, _ in cells}, key=_sort_key)
    col_values = sorted({c for _, c in cells}, key=_sort_key)
    stats = {}
    for key, values in cells.items():
        stats[key] = (*mean_std(values), len(values))
    return row_values, col_values, stats


def markdown(runs, metric: str, rows: str, cols: str) -> str:
    row_values, col_values, stats = aggregate(runs)
    seeds = max((count for _, _, count in stats.values()), default=0)
    lines = [
        f"{metric} (last logged epoch; rows {rows}, columns {cols}"
        + (f"; mean ± std over up to {seeds} seeds" if seeds > 1 else "") + ")",
        "",
        "| " + " | ".join([f"{rows} \\ {cols}"] + [str(c) for c in col_values]) + " |",
        "| --- " + "| ---: " * len(col_values) + "|",
    ]
    for r in row_values:
        cells = []
        for c in col_values:
            if (r, c) not in stats:
                cells.append("—")
                continue
            mean, std, count = stats[(r, c)]
            cells.append(f"{mean:.2f} ± {std:.2f}" if count > 1 else f"{mean:.2f}")
        lines.append("| " + " | ".join([str(r)] + cells) + " |")
    lines += ["", "| run | " + rows + " | " + cols + " | seed | epoch | " + metric + " |",
              "| --- | --- | --- | --- | --- | ---: |"]
    for run in sorted(runs, key=lambda x: (_sort_key(x["row"]), _sort_key(x["col"]), str(x["seed"]))):
        epoch = f"{run['epoch']}" + (f"/{run['epochs']}" if run["epochs"] is not None else "")
        lines.append(f"| {run['folder']} | {run['row']} | {run['col']} | {run['seed']} | {epoch} | {run['value']:.2f} |")
    return "\n".join(lines) + "\n"


def heatmap(runs, metric: str, rows: str, cols: str, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    row_values, col_values, stats = aggregate(runs)
    grid = np.full((len(row_values), len(col_values)), np.nan)
    for i, r in enumerate(row_values):
        for j, c in enumerate(col_values):
            if (r, c) in stats:
                grid[i, j] = stats[(r, c)][0]
    fig, ax = plt.subplots(figsize=(1.2 * len(col_values) + 2.5, 1.0 * len(row_values) + 1.8))
    image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(col_values)), [str(c) for c in col_values])
    ax.set_yticks(range(len(row_values)), [str(r) for r in row_values])
    ax.set_xlabel(cols)
    ax.set_ylabel(rows)
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(row_values)):
        for j in range(len(col_values)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                        color="black" if grid[i, j] > middle else "white")
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(metric)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="folder holding the runs (searched recursively)")
    parser.add_argument("--metric", default="val_acc1", help="log.jsonl key (default val_acc1)")
    parser.add_argument("--rows", default="attention.num_landmarks", help="config key of the rows")
    parser.add_argument("--cols", default="attention.topk", help="config key of the columns")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="keep only runs whose config has this value (repeatable)")
    parser.add_argument("--out", default=None, help="output prefix (default SWEEP_DIR/sweep)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not os.path.isdir(args.sweep_dir):
        parser.error(f"sweep_dir {args.sweep_dir!r} is not a folder")
    where = []
    for item in args.where:
        if "=" not in item:
            parser.error(f"--where {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        where.append((key, value))
    runs = load_runs(args.sweep_dir, args.metric, args.rows, args.cols, where)
    if not runs:
        _logger.error("no run with config.yaml and a log.jsonl holding %r under %s", args.metric, args.sweep_dir)
        return 1
    prefix = args.out or os.path.join(args.sweep_dir, "sweep")
    table = markdown(runs, args.metric, args.rows, args.cols)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".md", "w", encoding="utf-8") as handle:
        handle.write(table)
    heatmap(runs, args.metric, args.rows, args.cols, prefix + ".png")
    sys.stdout.write(table)
    _logger.info("wrote %s.md and %s.png (%d runs)", prefix, prefix, len(runs))
    return 0
