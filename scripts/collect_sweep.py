"""Collect a sweep of train.py runs into a Markdown table and a heatmap (m x k by default).

    python train.py -m experiment=fmnist attention.num_landmarks=9,16,25,36 attention.topk=9,16,25,36
    python scripts/collect_sweep.py outputs/fmnist
    python scripts/collect_sweep.py outputs/fmnist --metric best_acc1 --where attention.name=mita --out outputs/mk

Writes ``<out>.md`` (the table, also printed) and ``<out>.png`` (the heatmap); ``--out`` defaults to
``SWEEP_DIR/sweep``. The library behind it is :mod:`mita.analysis.sweep`.
"""
import sys

from mita.analysis.sweep import aggregate, heatmap, load_runs, main, markdown, mean_std

__all__ = ["aggregate", "heatmap", "load_runs", "main", "markdown", "mean_std"]

if __name__ == "__main__":
    sys.exit(main())
