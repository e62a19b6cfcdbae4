"""The small-scale reproduction on Fashion-MNIST: its runs, and the tables and figures built from their folders.

The runs are Hydra experiments (``configs/experiment/fmnist_repro/``, one command per table, RESULTS.md); each
writes train.py's run folder under ``outputs/fmnist_repro/``::

    python train.py -m experiment=fmnist_repro/main                # main table, seeds 0 and 1
    python scripts/collect_repro.py outputs/fmnist_repro --out outputs/fmnist_repro/tables

A run is named by its folder under the root: ``<attention.tag>/seed<seed>`` for the 16-epoch recipe,
``long/...`` for the 3,137-token runs, ``finetune/...`` for the fine-tuning runs; ``analysis/<job>/`` holds the
analyses' JSON (``mk_grid``, ``swap``, ``figures``). A run folder holds train.py's ``config.yaml`` and
``log.jsonl`` (top-1 of the last evaluation, parameters, training speed), and may hold ``eval.py``'s
``eval.json`` (multiply-adds), ``zero_shot.json`` (eval.py of the checkpoint a fine-tuning run starts from)
and ``result.json``: what was measured beside the run (card, wall time, inference images/s on random batches,
peak GPU memory), whose values win. ``results/fmnist_repro/`` holds the runs RESULTS.md reports.

Writes to ``--out``: ``main.md`` (per attention: seeds, mean ± std of top-1, params, GMACs, training and
inference images/s), ``ablations.md`` (experts, routing, landmark extractors), ``mk_grid.md`` and
``mk_grid.png`` (through :mod:`mita.analysis.sweep`), ``long.md``, ``generalisation.md`` (the inference-time
(m, k) grid, the checkpoint-swap matrix, fine-tuning, the figures' per-layer numbers), ``rows.json`` (every
run read) and the figures ``main.png`` (top-1 against training images/s) and ``ablations.png``. Only numbers
found in the folders are written: an unfinished or failed run shows its status, never a number, and a run
of a table that no folder holds is named in a line below it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from mita.analysis import sweep as collect_sweep

_logger = logging.getLogger(__name__)

#: train.py overrides every run of the 16-epoch recipe starts from
RECIPE = ["experiment=fmnist_repro"]
#: the main table's attentions: (name, train.py overrides after RECIPE, label)
MAIN = [
    ("standard", ["attention=standard"], "standard"),
    ("agent49", ["attention=agent"], "Agent (49)"),
    ("moba", ["attention=moba"], "MoBA"),
    ("topk50", ["attention=topk"], "top-k (50)"),
    ("linear", ["attention=linear"], "linear"),
    ("mita", ["attention=mita"], "MiTA (25 + 25)"),
    ("mita_dwc", ["attention=mita_dwc"], "MiTA + DWC"),
    ("mita_dwc_gate", ["attention=mita_dwc_gate"], "MiTA + DWC + Gate"),
    ("standard_dwc", ["attention=standard", "attention.dwc=true", "attention.tag=standard_dwc"], "standard + DWC"),
]
#: the run folder (``attention.tag``) of each main-table attention
MAIN_TAGS = {"standard": "standard", "agent49": "agent49", "moba": "moba_b25_s2", "topk50": "topk50",
             "linear": "linear", "mita": "mita_m25_k25", "mita_dwc": "mita_dwc_m25_k25",
             "mita_dwc_gate": "mita_dwc_gate_m25_k25", "standard_dwc": "standard_dwc"}
MAIN_LABELS = {name: label for name, _, label in MAIN}
MAIN_SEEDS = (0, 1)
#: the main table's MiTA seed 0: the ablations' "both", "top-1" and "2-D pool", and the grid's 25 x 25
CENTRE = "mita_m25_k25/seed0"
EXPERTS = [("both (m = k = 25)", CENTRE), ("route-only", "mita_route_only_m25_k50/seed0"),
           ("compress-only", "mita_compress_only_m25/seed0")]
ROUTING = [("top-1 (k = 25)", CENTRE), ("top-2", "mita_top2_m25_k12/seed0")]
POOLS = ("1d", "random", "learned", "conv", "dwconv", "tome")
EXTRACTORS = [("2-D pool (grid, default)", CENTRE), ("1-D pool", "mita_1d/seed0"), ("random", "mita_random/seed0"),
              ("learned", "mita_learned/seed0"), ("conv", "mita_conv/seed0"), ("depthwise conv", "mita_dwconv/seed0"),
              ("token merging (tome)", "mita_tome/seed0")]
LONG = [("standard", "long/standard/seed0"), ("MiTA m = k = 100", "long/mita_m100_k100/seed0"),
        ("MiTA m = k = 25", "long/mita_m25_k25/seed0")]
MK_VALUES = (9, 16, 25, 36)
#: grid points trained again with another seed, averaged with seed 0 (36 x 36, the grid's best point)
MK_MORE_SEEDS = ((36, 36, 1),)
FINETUNE = [("standard checkpoint, MiTA swapped in", "finetune/mita_m25_k25/seed0"),
            ("standard checkpoint, standard kept (control)", "finetune/standard/seed0")]
#: the analysis jobs under ``analysis/`` and the JSON files each writes
ANALYSES = {"mk_grid": ("mk_grid",), "swap": ("swap",), "figures": ("pruning", "experts", "overlap")}
#: the table each named run belongs to (for the lines naming what no folder holds)
TABLE_OF = {**{f"{tag}/seed{s}": "main" for tag in MAIN_TAGS.values() for s in MAIN_SEEDS},
            **{name: "ablations" for _, name in EXPERTS + ROUTING + EXTRACTORS if name != CENTRE},
            **{name: "long" for _, name in LONG}, **{name: "generalisation" for _, name in FINETUNE}}

#: the fields of a run written to rows.json
FIELDS = ("status", "seed", "epochs", "epochs_done", "card", "wall_s", "top1", "top5", "params", "macs",
          "train_images_per_s", "infer_images_per_s", "epoch_time_s", "peak_mem_gib", "error",
          "train_command", "eval_command", "zero_shot_top1", "zero_shot_command", "train_images")


def mk_name(m: int, k: int, seed: int = 0) -> str:
    """The run of m x k grid point (m, k): ``mita_m36_k36/seed0``."""
    return f"mita_m{m}_k{k}/seed{seed}"


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_run(folder: str) -> Dict[str, Any]:
    """One run folder as a row: train.py's config.yaml and log.jsonl, then eval.json, zero_shot.json and
    result.json where present (result.json's values win: it holds what was measured beside the run)."""
    with open(os.path.join(folder, "config.yaml"), encoding="utf-8") as handle:
        config = yaml.safe_load(handle) or {}
    records = collect_sweep._read_log(os.path.join(folder, "log.jsonl"))
    epochs = [r for r in records if "epoch_time_s" in r]
    errors = [r["error"] for r in records if r.get("error")]
    planned = collect_sweep._lookup(config, "trainer.epochs")
    last = epochs[-1] if epochs else {}
    done = len(epochs) == planned and last.get("val_acc1") is not None
    warm = epochs[1:] or epochs
    row: Dict[str, Any] = {key: None for key in FIELDS}
    row.update({
        "status": "failed" if errors else ("ok" if done else "unfinished"),
        "error": errors[-1] if errors else None,
        "seed": config.get("seed"), "epochs": planned, "epochs_done": len(epochs),
        "top1": last.get("val_acc1") if done else None, "top5": last.get("val_acc5") if done else None,
        "params": last.get("n_params"),
        "train_images": collect_sweep._lookup(config, "data.max_train_samples"),
        # the first epoch compiles the kernels: speeds are medians over the epochs after it
        "train_images_per_s": statistics.median(r["train_images_per_s"] for r in warm) if warm else None,
        "epoch_time_s": statistics.median(r["epoch_time_s"] for r in warm) if warm else None,
    })
    evaluation = _read_json(os.path.join(folder, "eval.json"))
    if evaluation:
        row.update({"top1": evaluation.get("acc1", row["top1"]), "top5": evaluation.get("acc5", row["top5"]),
                    "params": evaluation.get("params", row["params"]), "macs": evaluation.get("macs")})
    zero_shot = _read_json(os.path.join(folder, "zero_shot.json"))
    if zero_shot:
        row["zero_shot_top1"] = zero_shot.get("acc1")
    record = _read_json(os.path.join(folder, "result.json")) or {}
    row.update({key: record[key] for key in FIELDS if record.get(key) is not None})
    return row


def load_runs(root: str) -> Dict[str, Dict[str, Any]]:
    """{run name: row} for every run folder under ``root`` (config.yaml and log.jsonl), named by its path."""
    rows = {}
    for folder in collect_sweep.find_runs(root):
        name = os.path.relpath(folder, root).replace(os.sep, "/")
        rows[name] = {"name": name, "table": TABLE_OF.get(name), "source": folder, **read_run(folder)}
    return rows


def _num(value: Optional[float], fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _status(row: Dict[str, Any]) -> str:
    """The cell of a run that gave no number: its status and, briefly, why."""
    status = row["status"]
    if status == "unfinished":
        return f"unfinished ({row.get('epochs_done')} of {row.get('epochs')} epochs)"
    if status == "failed" and row.get("error"):
        return "failed (" + str(row["error"]).replace("|", "/")[:80] + ")"
    return status


def _wall(row: Dict[str, Any]) -> str:
    return "—" if row.get("wall_s") is None else f"{row['wall_s']:.0f} s"


def _missing_line(names: Sequence[str]) -> List[str]:
    if not names:
        return []
    named = ", ".join(f"`{n}` ({TABLE_OF.get(n) or 'no table'})" for n in names)
    return ["", f"Not in any run folder (left out): {named}."]


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _planned_seeds(name: str) -> List[str]:
    """The runs of a main-table attention's seeds (``TAG/seed0``, ``TAG/seed1``)."""
    return [f"{MAIN_TAGS[name]}/seed{seed}" for seed in MAIN_SEEDS]


def _ok_top1(row: Optional[Dict[str, Any]]) -> Optional[float]:
    """A run's top-1 if it is ok and has one, else None."""
    return float(row["top1"]) if row and row["status"] == "ok" and row.get("top1") is not None else None


def main_table(rows: Dict[str, Dict[str, Any]]) -> str:
    """Per attention of the plan's main table: its seeds' runs merged; a run not ok is named, never averaged."""
    lines = ["# Main table", "",
             "top-1: mean ± sample std over the seeds whose run is ok (eval.py on the last checkpoint); params, "
             "GMACs (multiply-adds of one image) and images/s: mean over the same runs.", "",
             "| attention | seeds ok | top-1 | params (M) | GMACs | train img/s | infer img/s | not ok | card | wall |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    missing = []
    for name, _, _ in MAIN:
        planned = _planned_seeds(name)
        found = [rows[n] for n in planned if n in rows]
        missing += [n for n in planned if n not in rows]
        if not found:
            continue
        ok = sorted((r for r in found if _ok_top1(r) is not None),
                    key=lambda r: r["seed"])
        sweep_runs = [{"row": name, "col": "top1", "value": float(r["top1"])} for r in ok]
        top1 = "no ok run"
        if ok:
            mean, std, count = collect_sweep.aggregate(sweep_runs)[2][(name, "top1")]
            top1 = f"{mean:.2f} ± {std:.2f}" if count > 1 else f"{mean:.2f}"
        not_ok = "; ".join(f"seed {r['seed']}: {_status(r)}" if r.get("seed") is not None
                           else f"{r['name']}: {_status(r)}" for r in found if r not in ok)
        params = _mean([r["params"] for r in ok if r.get("params") is not None])
        macs = _mean([r["macs"] for r in ok if r.get("macs") is not None])
        train = _mean([r["train_images_per_s"] for r in ok if r.get("train_images_per_s") is not None])
        infer = _mean([r["infer_images_per_s"] for r in ok if r.get("infer_images_per_s") is not None])
        cards = ", ".join(sorted({str(r["card"]) for r in found if r.get("card")})) or "—"
        walls = ", ".join(f"s{r['seed']} {_wall(r)}" for r in found)
        seeds = f"{len(ok)} ({', '.join(str(r['seed']) for r in ok)})" if ok else "0"
        lines.append(f"| {MAIN_LABELS[name]} | {seeds} | {top1} | "
                     f"{_num(None if params is None else params / 1e6, '.2f')} | "
                     f"{_num(None if macs is None else macs / 1e9, '.3f')} | {_num(train, ',.0f')} | "
                     f"{_num(infer, ',.0f')} | {not_ok or '—'} | {cards} | {walls} |")
    return "\n".join(lines + _missing_line(missing)) + "\n"


def _single_table(title: str, header: str, spec: Sequence[Tuple[str, str]],
                  rows: Dict[str, Dict[str, Any]]) -> List[str]:
    lines = [f"## {title}", "", f"| {header} | run | top-1 | card | wall | source |", "| --- | --- | --- | --- | --- | --- |"]
    missing = []
    for label, name in spec:
        row = rows.get(name)
        if row is None:
            missing.append(name)
            continue
        top1 = f"{_ok_top1(row):.2f}" if _ok_top1(row) is not None else _status(row)
        lines.append(f"| {label} | `{name}` | {top1} | {row.get('card') or '—'} | {_wall(row)} | {row['source']} |")
    return lines + _missing_line(missing)


def ablation_tables(rows: Dict[str, Dict[str, Any]]) -> str:
    lines = ["# Ablations", "", "One run each (seed 0); \"both\", \"top-1\" and the 2-D pool are the main table's "
             "MiTA seed 0.", ""]
    lines += _single_table("Experts", "experts", EXPERTS, rows) + [""]
    lines += _single_table("Routing", "routing", ROUTING, rows) + [""]
    lines += _single_table("Landmark extractor", "landmark extractor", EXTRACTORS, rows)
    return "\n".join(lines) + "\n"


def mk_points() -> List[Tuple[str, int, int]]:
    """(run name, m, k) of every run of the training grid, seed 0 (25 x 25 is the main table's MiTA seed 0), then
    the points trained again with another seed (:data:`MK_MORE_SEEDS`), which collect_sweep averages with seed 0."""
    points = [(mk_name(m, k), m, k) for m in MK_VALUES for k in MK_VALUES]
    return points + [(mk_name(m, k, seed), m, k) for m, k, seed in MK_MORE_SEEDS]


def mk_runs(rows: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The ok grid runs as collect_sweep's run dicts (value = top-1 of eval.py on the last checkpoint)."""
    runs = []
    for name, m, k in mk_points():
        row = rows.get(name)
        if row is not None and row["status"] == "ok" and row.get("top1") is not None:
            runs.append({"folder": name, "row": m, "col": k, "seed": row.get("seed"),
                         "epoch": row.get("epochs_done"), "epochs": row.get("epochs"),
                         "value": float(row["top1"])})
    return runs


def mk_table(rows: Dict[str, Dict[str, Any]], runs: Sequence[Dict[str, Any]]) -> str:
    lines = ["# m x k training grid", "",
             "top1 = top-1 of the last checkpoint (the table below is mita.analysis.sweep's; '—' = no ok run).",
             ""]
    lines.append(collect_sweep.markdown(runs, "top1", "m", "k") if runs else "No grid point has an ok run.\n")
    lines += ["| run | m | k | status | card | wall | source |", "| --- | --- | --- | --- | --- | --- | --- |"]
    missing = []
    for name, m, k in mk_points():
        row = rows.get(name)
        if row is None:
            missing.append(name)
            continue
        lines.append(f"| `{name}` | {m} | {k} | {_status(row)} | {row.get('card') or '—'} | {_wall(row)} | "
                     f"{row['source']} |")
    return "\n".join(lines + _missing_line(missing)) + "\n"


def long_table(rows: Dict[str, Dict[str, Any]]) -> str:
    lines = ["# Long sequences (112 x 112, 3,137 tokens)", ""]
    subsets = sorted({(r.get("train_images"), r.get("epochs")) for _, name in LONG if (r := rows.get(name))},
                     key=str)
    for images, epochs in subsets:
        lines.append(f"Training subset: {images if images is not None else 'all'} images x {epochs} epochs "
                     "(data.max_train_samples, the same fixed subset for every run).")
    lines += ["", "| attention | run | top-1 | s / epoch | train img/s | infer img/s | GMACs | peak memory (GiB) | card "
              "| wall |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    missing = []
    for label, name in LONG:
        row = rows.get(name)
        if row is None:
            missing.append(name)
            continue
        if row["status"] == "ok":
            first = _num(row.get("top1"), ".2f")
        else:  # what a run stopped early measured before it stopped
            first = _status(row)
            if row.get("epochs_done") and "epochs" not in first:
                first += f", {row['epochs_done']} epochs done"
        macs = None if row.get("macs") is None else row["macs"] / 1e9
        cells = [first, _num(row.get("epoch_time_s"), ".1f"), _num(row.get("train_images_per_s"), ",.0f"),
                 _num(row.get("infer_images_per_s"), ",.0f"), _num(macs, ".2f"), _num(row.get("peak_mem_gib"), ".2f")]
        lines.append(f"| {label} | `{name}` | {' | '.join(cells)} | {row.get('card') or '—'} | {_wall(row)} |")
    return "\n".join(lines + _missing_line(missing)) + "\n"


def load_analyses(root: str) -> Dict[str, Dict[str, Any]]:
    """{job: {"record": its result.json or {}, "folder": path, key: analysis JSON}} for every analysis job under
    ``root/analysis/`` with at least one of its JSON files."""
    found: Dict[str, Dict[str, Any]] = {}
    for name, keys in ANALYSES.items():
        folder = os.path.join(root, "analysis", name)
        payloads = {key: data for key in keys if isinstance(data := _read_json(os.path.join(folder, f"{key}.json")),
                                                            dict)}
        if payloads:
            found[name] = {"record": _read_json(os.path.join(folder, "result.json")) or {}, "folder": folder,
                           **payloads}
    return found


def _job_line(analyses: Dict[str, Dict[str, Any]], name: str) -> str:
    job = analyses[name]
    return f"Job `{name}`: {job['record'].get('card') or '—'}, {_wall(job['record'])}, {job['folder']}."


def _grid_table(analysis: Dict[str, Any]) -> List[str]:
    points = analysis.get("points") or []
    ms = sorted({p["num_landmarks"] for p in points})
    ks = sorted({p["topk"] for p in points})
    acc = {(p["num_landmarks"], p["topk"]): p for p in points}
    lines = ["| m \\ k | " + " | ".join(str(k) for k in ks) + " |", "| --- |" + " ---: |" * len(ks)]
    for m in ms:
        cells = []
        for k in ks:
            point = acc.get((m, k))
            if point is None or point.get("acc1") is None:
                cells.append("—")
            else:
                cell = f"{point['acc1']:.2f}"
                cells.append(f"**{cell}**" if point.get("training_point") else cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def generalisation_tables(rows: Dict[str, Dict[str, Any]], analyses: Dict[str, Dict[str, Any]]) -> str:
    """The generalisation group: the analyses' JSON files and the fine-tuning runs; what is absent is named."""
    lines = ["# Generalisation", ""]
    missing = [name for _, name in FINETUNE if name not in rows]

    lines += ["## Inference-time (m, k) grid", ""]
    grid = analyses.get("mk_grid", {}).get("mk_grid")
    if grid:
        trained = grid.get("attention") or {}
        lines += [f"top-1 of `{grid.get('ckpt')}` (trained at m = {trained.get('num_landmarks')}, k = "
                  f"{trained.get('topk')}, in bold) evaluated with other (m, k), {grid.get('precision')}, "
                  f"{grid.get('n_images')} images. {_job_line(analyses, 'mk_grid')}", ""] + _grid_table(grid)
    else:
        lines.append("`analysis/mk_grid/mk_grid.json`: not found.")
    lines += ["", "## Checkpoint swap", ""]
    swap = analyses.get("swap", {}).get("swap")
    if swap:
        labels = swap["labels"]
        lines += [f"top-1, rows: the weights' training attention, columns: the attention evaluated with "
                  f"({swap.get('precision')}). {_job_line(analyses, 'swap')}", "",
                  "| weights \\ evaluated with | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
        for label, values in zip(labels, swap["acc1"]):
            lines.append(f"| {label} | " + " | ".join(_num(v, ".2f") for v in values) + " |")
    else:
        lines.append("`analysis/swap/swap.json`: not found.")
    lines += ["", "## Fine-tuning a standard checkpoint", "",
              "| run | zero-shot top-1 | epochs | top-1 after | card | wall |", "| --- | --- | --- | --- | --- | --- |"]
    for label, name in FINETUNE:
        row = rows.get(name)
        if row is None:
            continue
        if row["status"] == "ok":
            cells = [_num(row.get("zero_shot_top1"), ".2f"), str(row.get("epochs_done") or row.get("epochs")),
                     _num(row.get("top1"), ".2f")]
        else:
            cells = [_status(row), str(row.get("epochs")), "—"]
        lines.append(f"| {label} (`{name}`) | {' | '.join(cells)} | {row.get('card') or '—'} | {_wall(row)} |")
    scratch = rows.get(CENTRE)
    if scratch is not None and scratch["status"] == "ok":
        lines.append(f"| MiTA from scratch (`{CENTRE}`) | — | {scratch.get('epochs_done')} | "
                     f"{_num(scratch.get('top1'), '.2f')} | {scratch.get('card') or '—'} | {_wall(scratch)} |")
    lines += ["", "## Figures (per layer)", ""]
    figures = analyses.get("figures", {})
    if any(key in figures for key in ANALYSES["figures"]):
        pruning, experts, overlap = (figures.get(k, {}).get("layers") or [] for k in ANALYSES["figures"])
        layers = max(len(pruning), len(experts), len(overlap))

        def cell(items: List[Dict[str, Any]], i: int, key: str) -> str:
            return _num(items[i].get(key), ".3f") if i < len(items) else "—"

        lines += ["pruned: share of tokens no routed expert of any head keeps (left to the shared expert); outside "
                  "window: share of an expert's top-k keys outside its pooling window (chance: the share of tokens "
                  "outside it); IoU: an expert's keys against the queries routed to it (chance: random sets of the "
                  f"same sizes). {_job_line(analyses, 'figures')}", "",
                  "| layer | pruned | outside window | (chance) | IoU | (chance) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        columns = [(pruning, "pruned_fraction"), (experts, "outside_window_fraction"), (experts, "chance"),
                   (overlap, "mean_iou"), (overlap, "chance_iou")]
        for i in range(layers):
            lines.append(f"| {i} | " + " | ".join(cell(items, i, key) for items, key in columns) + " |")
    else:
        lines.append("`analysis/figures/`: not found.")
    return "\n".join(lines + _missing_line(missing)) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _seed_top1(rows: Dict[str, Dict[str, Any]], name: str) -> List[Tuple[Dict[str, Any], float]]:
    """The ok seeds of a main-table attention as (row, top-1), as main_table finds them."""
    return [(rows[n], top1) for n in _planned_seeds(name) if (top1 := _ok_top1(rows.get(n))) is not None]


def load_bench(path: str) -> Tuple[Dict[str, float], str]:
    """({attention: training images/s}, card) from a ``bench_models.py`` JSON (its ``rows``)."""
    with open(path, encoding="utf-8") as handle:
        bench = json.load(handle)
    if not isinstance(bench, dict) or not isinstance(bench.get("rows"), list):
        raise ValueError(f"--bench {path!r}: not a bench_models.py JSON (no 'rows' list)")
    speeds = {row["attention"]: float(row["train_images_per_s"]) for row in bench["rows"]
              if row.get("train_images_per_s") is not None}
    cards = sorted({str(row.get("card")) for row in bench["rows"] if row.get("card")})
    return speeds, ", ".join(cards) or "unknown card"


def main_points(rows: Dict[str, Dict[str, Any]], bench: Optional[Tuple[Dict[str, float], str]] = None
                ) -> List[Tuple[str, float, List[float], float, float]]:
    """(label, training images/s, the ok seeds' top-1, their mean, their sample std) per attention of the main
    table with an ok seed and a speed. The speeds are the benchmark's (``bench``: every model alone, in one
    process) where given, else the mean of the runs' own, which may have shared their GPU with another run."""
    points = []
    for name, _, _ in MAIN:
        found = _seed_top1(rows, name)
        if bench is not None:
            speeds = [bench[0][name]] if name in bench[0] else []
        else:
            speeds = [r["train_images_per_s"] for r, _ in found if r.get("train_images_per_s") is not None]
        if found and speeds:
            values = [v for _, v in found]
            points.append((MAIN_LABELS[name], sum(speeds) / len(speeds), values, *collect_sweep.mean_std(values)))
    return points


def main_figure(rows: Dict[str, Dict[str, Any]], path: str,
                bench: Optional[Tuple[Dict[str, float], str]] = None) -> Optional[str]:
    """Top-1 against training images/s, one point per attention of :func:`main_points` (the mean, each seed a
    small dot, the bar the sample std); None when there is no point."""
    points = main_points(rows, bench)
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    colors = plt.get_cmap("tab10").colors
    for i, (label, speed, values, mean, std) in enumerate(points):
        color = colors[i % len(colors)]
        ax.scatter([speed] * len(values), values, s=12, color=color, alpha=0.4)
        ax.errorbar(speed, mean, yerr=std, fmt="o" if label.startswith("MiTA") else "s", color=color, capsize=3,
                    label=f"{label}: {mean:.2f}" + (f" ± {std:.2f}" if len(values) > 1 else ""))
    ax.set_xlabel(f"training images/s (bench_models.py, each model alone on {bench[1].split(' (')[0]})" if bench
                  is not None else "training images/s of the runs (mean over seeds; some shared their GPU)")
    ax.set_ylabel("top-1 on the 10,000 test images (%)")
    ax.set_title("Main table: accuracy against training speed (circles: MiTA)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def ablation_bars(rows: Dict[str, Dict[str, Any]]
                  ) -> Tuple[List[Tuple[str, float]], Optional[Tuple[float, float, int]]]:
    """([(label, top-1)] of the ok ablation runs, MiTA seed 0 first; (mean, std, count) of the main table's ok
    MiTA seeds, or None with fewer than 2). No bars when no ablation run other than MiTA seed 0 is ok."""
    sections = [("experts", EXPERTS[1:]), ("routing", ROUTING[1:]), ("landmarks", EXTRACTORS[1:])]
    bars = [(f"{title}: {label}", top1) for title, spec in sections for label, name in spec
            if (top1 := _ok_top1(rows.get(name))) is not None]
    centre = _ok_top1(rows.get(CENTRE))
    if bars and centre is not None:
        bars.insert(0, ("MiTA (both experts, top-1, 2-D pool; seed 0)", centre))
    seeds = [v for _, v in _seed_top1(rows, "mita")]
    return bars, (*collect_sweep.mean_std(seeds), len(seeds)) if len(seeds) > 1 else None


def ablation_figure(rows: Dict[str, Dict[str, Any]], path: str) -> Optional[str]:
    """One horizontal bar per ok ablation run (:func:`ablation_bars`), beside the band of the main table's MiTA
    seeds (mean ± std), the noise a one-seed difference should be read against; None when there is no bar."""
    bars, band = ablation_bars(rows)
    if not bars:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(bars) + 1.6))
    labels, values = zip(*reversed(bars))
    ax.barh(range(len(values)), values, color="tab:red", alpha=0.75)
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    for i, value in enumerate(values):
        ax.text(value, i, f" {value:.2f}", va="center", fontsize=8)
    if band is not None:
        mean, std, count = band
        ax.axvspan(mean - std, mean + std, color="grey", alpha=0.25,
                   label=f"MiTA over {count} seeds: {mean:.2f} ± {std:.2f}")
        ax.legend(loc="lower right", fontsize=8)
    low, high = min(values), max(values)
    ax.set_xlim(low - 2.0, high + 1.0)
    ax.set_xlabel("top-1 (%), one seed each")
    ax.set_title("Ablations")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def collect(root: str, out: str, png: bool = True, bench: Optional[str] = None) -> Dict[str, str]:
    """Write every table of the run folders under ``root`` to ``out``; returns {table name: path}. ``bench``: a
    ``bench_models.py`` JSON whose training speeds the main figure plots."""
    rows = load_runs(root)
    os.makedirs(out, exist_ok=True)
    runs = mk_runs(rows)
    texts = {"main": main_table(rows), "ablations": ablation_tables(rows), "mk_grid": mk_table(rows, runs),
             "long": long_table(rows), "generalisation": generalisation_tables(rows, load_analyses(root))}
    written = {}
    for name, text in texts.items():
        written[name] = os.path.join(out, f"{name}.md")
        with open(written[name], "w", encoding="utf-8") as handle:
            handle.write(text)
    if png and runs:
        written["mk_grid_png"] = collect_sweep.heatmap(runs, "top1", "m", "k", os.path.join(out, "mk_grid.png"))
    if png:
        drawn = {"main_png": main_figure(rows, os.path.join(out, "main.png"), load_bench(bench) if bench else None),
                 "ablations_png": ablation_figure(rows, os.path.join(out, "ablations.png"))}
        written.update({name: path for name, path in drawn.items() if path})
    written["rows"] = os.path.join(out, "rows.json")
    with open(written["rows"], "w", encoding="utf-8") as handle:
        json.dump({"root": root, "rows": [rows[n] for n in sorted(rows)]}, handle, indent=2)
        handle.write("\n")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Build the reproduction's tables and figures from its run folders.")
    parser.add_argument("root", metavar="RUNS_DIR", help="the runs' folder (outputs/fmnist_repro, results/fmnist_repro)")
    parser.add_argument("--out", default=None, help="folder for the tables and figures (default RUNS_DIR/tables)")
    parser.add_argument("--no-png", action="store_true", help="skip the figures (m x k heatmap, main, ablations)")
    parser.add_argument("--bench", metavar="BENCH_JSON",
                        help="bench_models.py JSON whose training images/s main.png plots (default: the runs' own)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not os.path.isdir(args.root):
        parser.error(f"argument RUNS_DIR: {args.root!r} is not a folder")
    if args.bench and not os.path.isfile(args.bench):
        parser.error(f"argument --bench: {args.bench!r} is not a file")
    try:
        written = collect(args.root, args.out or os.path.join(args.root, "tables"), png=not args.no_png,
                          bench=args.bench)
    except (ValueError, json.JSONDecodeError) as err:
        parser.error(str(err))
    _logger.info("wrote %s", ", ".join(sorted(written.values())))
    return 0
