"""Merge the summary.json files of issue 7's driver calls into the tables RESULTS.md needs.

    python scripts/collect_repro.py results/issue7_*/summary.json --out results/issue7_tables \
        --bench results/issue7_bench/models_h200_rounds.json

Each summary.json is what ``scripts/reproduce_fmnist.py`` writes (``runs.NAME`` with status, seed, card,
wall_s, top1, params, macs, train/inference images/s, epoch time, peak memory). Run names are the plan's
(``scripts/reproduce_fmnist_plan.py``), so a run means the same thing whichever call brought it. A run found in
several summaries (a rerun) keeps its ``ok`` entry; between entries of the same standing the later file wins.

Writes to ``--out``: ``main.md`` (per attention: seeds, mean ± std of top-1 over the ok seeds, params,
GMACs, training and inference images/s, cards and wall times), ``ablations.md`` (experts, routing, landmark
extractors), ``mk_grid.md`` and ``mk_grid.png`` (through ``collect_sweep.py``), ``long.md`` (top-1, s/epoch,
images/s, peak memory), ``generalisation.md`` (the inference-time (m, k) grid, the checkpoint-swap matrix, the
fine-tuning rows and the figures' per-layer numbers, from the analyses the driver put in its summary) and
``rows.json`` (every merged run, with the file it came from), and the figures ``main.png`` (top-1 against
training images/s) and ``ablations.png`` (one bar per ablation run beside MiTA's seed band). Only numbers found in
the summaries are written: a skipped, killed or failed run shows its status, never a number, and a run no
summary holds is left out with a line naming it and its group.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import collect_sweep  # noqa: E402
import reproduce_fmnist_plan as plan_mod  # noqa: E402

_logger = logging.getLogger("collect_repro")

#: the fields of a run copied into rows.json (as the driver wrote them; absent ones stay None)
FIELDS = ("status", "kind", "seed", "epochs", "epochs_done", "card", "gpu", "wall_s", "top1", "top5", "params", "macs",
          "train_images_per_s", "infer_images_per_s", "epoch_time_s", "peak_mem_gib", "reason", "error",
          "train_command", "eval_command", "zero_shot_top1", "zero_shot_command", "macs_error")
#: the group of each planned run (for the lines naming what no summary holds)
GROUP_OF = {run.name: group for group, runs in plan_mod.GROUPS.items() for run in runs}
PLANNED_SEED = {run.name: run.seed for runs in plan_mod.GROUPS.values() for run in runs}
MAIN_LABELS = {"standard": "standard", "agent49": "Agent (49)", "moba": "MoBA", "topk50": "top-k (50)",
               "linear": "linear", "mita": "MiTA (25 + 25)", "mita_dwc": "MiTA + DWC",
               "mita_dwc_gate": "MiTA + DWC + Gate", "standard_dwc": "standard + DWC"}
EXPERTS = [("both (m = k = 25)", "mita_s0"), ("route-only", "route_only"), ("compress-only", "compress_only")]
ROUTING = [("top-1 (k = 25)", "mita_s0"), ("top-2", "top2")]
EXTRACTORS = [("2-D pool (grid, default)", "mita_s0"), ("1-D pool", "pool_1d"), ("random", "pool_random"),
              ("learned", "pool_learned"), ("conv", "pool_conv"), ("depthwise conv", "pool_dwconv"),
              ("token merging (tome)", "pool_tome")]
LONG = [("standard", "long_standard"), ("MiTA m = k = 100", "long_mita_m100"), ("MiTA m = k = 25", "long_mita_m25")]
#: the training point of the main table's MiTA, which is the grid's 25 x 25
MK_CENTRE = ("mita_s0", 25, 25)
_RANK = {"ok": 0, "killed": 1, "failed": 2, "skipped": 3}


def load_summaries(paths: Sequence[str]) -> Tuple[Dict[str, Dict[str, Any]], List[Dict[str, Any]],
                                                  Dict[str, Dict[str, Any]]]:
    """(run name -> merged row, one dict per summary file: path, plan, fit, run name -> the driver's whole entry
    of the row kept)."""
    rows: Dict[str, Dict[str, Any]] = {}
    entries: Dict[str, Dict[str, Any]] = {}
    sources = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            summary = json.load(handle)
        if not isinstance(summary, dict) or not isinstance(summary.get("runs"), dict):
            raise ValueError(f"SUMMARY_JSON {path!r}: not a driver summary (no 'runs' object)")
        setup = summary.get("setup") or {}
        sources.append({"path": path, "plan": setup.get("plan"), "shard": setup.get("shard"),
                        "fit": summary.get("fit"), "elapsed_s": summary.get("elapsed_s"),
                        # each probe's speed and peak memory only (the summaries hold their whole records)
                        "probes": {name: {key: (probe or {}).get(key) for key in ("peak_mem_gib", "train_images_per_s")}
                                   for name, probe in (summary.get("probes") or {}).items()}})
        for name, entry in summary["runs"].items():
            row = {"name": name, "group": GROUP_OF.get(name), "source": path, "plan": setup.get("plan"),
                   **{key: entry.get(key) for key in FIELDS}}
            if row["seed"] is None and name in PLANNED_SEED:
                # a killed or skipped run has no result.json, hence no seed: the plan's run name fixes it
                row["seed"] = PLANNED_SEED[name]
            if row["status"] not in _RANK:
                row["status"] = "failed"
            old = rows.get(name)
            if old is not None:
                _logger.warning("%s is in %s and %s; keeping the %s entry", name, old["source"], path,
                                "earlier" if _RANK[old["status"]] < _RANK[row["status"]] else "later")
                if _RANK[old["status"]] < _RANK[row["status"]]:
                    old.setdefault("also_in", []).append(path)
                    continue
                row["also_in"] = [*old.get("also_in", []), old["source"]]
            rows[name], entries[name] = row, entry
    return rows, sources, entries


def _num(value: Optional[float], fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _status(row: Dict[str, Any]) -> str:
    """The cell of a run that gave no number: its status and, briefly, why."""
    status = row["status"]
    if status == "skipped" and row.get("reason"):
        return f"skipped ({row['reason']})"
    if status == "killed":
        # an early stop says when it was stopped and why; a stop at the budget carries no reason
        if row.get("reason"):
            return "stopped early (" + str(row["reason"]).replace("|", "/") + ")"
        return "killed at the budget"
    if status == "failed" and row.get("error"):
        return "failed (" + str(row["error"]).replace("|", "/")[:80] + ")"
    return status


def _wall(row: Dict[str, Any]) -> str:
    return "—" if row.get("wall_s") is None else f"{row['wall_s']:.0f} s"


def _missing_line(names: Sequence[str]) -> List[str]:
    if not names:
        return []
    named = ", ".join(f"`{n}` ({GROUP_OF.get(n) or 'no group'})" for n in names)
    return ["", f"Not in any summary (left out): {named}."]


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _planned_seeds(name: str) -> List[str]:
    """The plan's run names of a main-table attention's seeds (``NAME_s0``, ``NAME_s1``, ...)."""
    return sorted(r.name for g in ("main1", "main2") for r in plan_mod.GROUPS[g]
                  if r.name.startswith(name + "_s") and r.name[len(name) + 2:].isdigit())


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
    for name, _, _ in plan_mod.MAIN:
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
    """(run name, m, k) of every run of the training grid: the main table's MiTA seed 0 included, and the points
    run again with seed 1 (the plan's ``MK_SEED1``) last, which collect_sweep averages with their seed 0."""
    points = [MK_CENTRE]
    for m in plan_mod.MK_VALUES:
        for k in plan_mod.MK_VALUES:
            if (m, k) != MK_CENTRE[1:]:
                points.append((plan_mod.mk_name(m, k), m, k))
    return points + [(plan_mod.mk_name(m, k, seed=1), m, k) for m, k in plan_mod.MK_SEED1]


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
             "top1 = eval.py's top-1 of the last checkpoint (the table below is collect_sweep.py's; '—' = no ok run).",
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


def _probe_memory(source: Dict[str, Any], name: str) -> str:
    """The probe's peak memory as " at X GiB", or "" when its summary entry has none."""
    peak = (source["probes"].get(name) or {}).get("peak_mem_gib")
    return "" if peak is None else f" at {peak:.2f} GiB"


def long_table(rows: Dict[str, Dict[str, Any]], sources: Sequence[Dict[str, Any]]) -> str:
    lines = ["# Long sequences (112 x 112, 3,137 tokens)", ""]
    for source in sources:
        fit = source.get("fit")
        if fit:
            if isinstance(fit.get("train_images_per_s"), dict):  # probes alone, runs sized by the sum of times
                rates = ", ".join(f"{name.removesuffix('_probe')} {rate:,.0f} images/s{_probe_memory(source, name)}"
                                  for name, rate in fit["train_images_per_s"].items())
                share = fit.get("runs_per_gpu")
                how = (f"{share} run{'' if share == 1 else 's'} to a GPU, estimated "
                       f"{_num(fit.get('estimate_s'), '.0f')} s; probed alone: {rates}")
            else:  # the first sizing: the slowest of probes run side by side
                how = f"slowest probe {_num(fit.get('slowest_images_per_s'), ',.0f')} images/s, probes side by side"
            if fit.get("train_images"):
                lines.append(f"Training subset from {source['path']}: {fit.get('train_images')} images x "
                             f"{fit.get('epochs')} epochs ({how}).")
            else:  # the probes left too little time for the smallest subset: the runs were skipped
                lines.append(f"Probes only in {source['path']}: no training subset fitted the time left, the runs "
                             f"were skipped ({how}).")
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
            if row.get("epochs_done") is not None and "epochs" not in first:
                first += f", {row['epochs_done']} epochs done"
        macs = None if row.get("macs") is None else row["macs"] / 1e9
        cells = [first, _num(row.get("epoch_time_s"), ".1f"), _num(row.get("train_images_per_s"), ",.0f"),
                 _num(row.get("infer_images_per_s"), ",.0f"), _num(macs, ".2f"), _num(row.get("peak_mem_gib"), ".2f")]
        lines.append(f"| {label} | `{name}` | {' | '.join(cells)} | {row.get('card') or '—'} | {_wall(row)} |")
    return "\n".join(lines + _missing_line(missing)) + "\n"

#: the generalisation group's analysis jobs and the keys of their summary entries that hold the analysis
ANALYSES = {"mk_grid": ("mk_grid",), "swap": ("swap",), "figures": ("pruning", "experts", "overlap")}
FINETUNE = [("standard checkpoint, MiTA swapped in", "finetune_std_to_mita"),
            ("standard checkpoint, standard kept (control)", "finetune_std_to_std")]


def load_analyses(rows: Dict[str, Dict[str, Any]], entries: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """{job name: {key: analysis dict}} for the ok analysis jobs, from the driver's entries of the rows kept."""
    found: Dict[str, Dict[str, Any]] = {}
    for name, keys in ANALYSES.items():
        if name in rows and rows[name]["status"] == "ok":
            entry = entries[name]
            found[name] = {key: entry[key] for key in keys if isinstance(entry.get(key), dict)}
    return found


def _job_line(rows: Dict[str, Dict[str, Any]], name: str) -> str:
    row = rows[name]
    return f"Job `{name}`: {row.get('card') or '—'}, {_wall(row)}, {row['source']}."


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
    """The generalisation group: numbers only from the ok jobs' analyses; a job not ok shows its status."""
    lines = ["# Generalisation", ""]
    missing = [n for n in [*ANALYSES, *(name for _, name in FINETUNE)] if n not in rows]

    lines += ["## Inference-time (m, k) grid", ""]
    grid = analyses.get("mk_grid", {}).get("mk_grid")
    if grid:
        trained = grid.get("attention") or {}
        lines += [f"top-1 of `{grid.get('ckpt')}` (trained at m = {trained.get('num_landmarks')}, k = "
                  f"{trained.get('topk')}, in bold) evaluated with other (m, k), {grid.get('precision')}, "
                  f"{grid.get('n_images')} images. {_job_line(rows, 'mk_grid')}", ""] + _grid_table(grid)
    elif "mk_grid" in rows:
        lines.append(f"`mk_grid`: {_status(rows['mk_grid'])}.")
    lines += ["", "## Checkpoint swap", ""]
    swap = analyses.get("swap", {}).get("swap")
    if swap:
        labels = swap["labels"]
        lines += [f"top-1, rows: the weights' training attention, columns: the attention evaluated with "
                  f"({swap.get('precision')}). {_job_line(rows, 'swap')}", "",
                  "| weights \\ evaluated with | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
        for label, values in zip(labels, swap["acc1"]):
            lines.append(f"| {label} | " + " | ".join(_num(v, ".2f") for v in values) + " |")
    elif "swap" in rows:
        lines.append(f"`swap`: {_status(rows['swap'])}.")
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
    scratch = rows.get(MK_CENTRE[0])
    if scratch is not None and scratch["status"] == "ok":
        lines.append(f"| MiTA from scratch (`{MK_CENTRE[0]}`) | — | {scratch.get('epochs_done')} | "
                     f"{_num(scratch.get('top1'), '.2f')} | {scratch.get('card') or '—'} | {_wall(scratch)} |")
    lines += ["", "## Figures (per layer)", ""]
    figures = analyses.get("figures", {})
    if figures:
        pruning, experts, overlap = (figures.get(k, {}).get("layers") or [] for k in ANALYSES["figures"])
        layers = max(len(pruning), len(experts), len(overlap))

        def cell(items: List[Dict[str, Any]], i: int, key: str) -> str:
            return _num(items[i].get(key), ".3f") if i < len(items) else "—"

        lines += ["pruned: share of tokens no routed expert of any head keeps (left to the shared expert); outside "
                  "window: share of an expert's top-k keys outside its pooling window (chance: the share of tokens "
                  "outside it); IoU: an expert's keys against the queries routed to it (chance: random sets of the "
                  f"same sizes). {_job_line(rows, 'figures')}", "",
                  "| layer | pruned | outside window | (chance) | IoU | (chance) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        columns = [(pruning, "pruned_fraction"), (experts, "outside_window_fraction"), (experts, "chance"),
                   (overlap, "mean_iou"), (overlap, "chance_iou")]
        for i in range(layers):
            lines.append(f"| {i} | " + " | ".join(cell(items, i, key) for items, key in columns) + " |")
    elif "figures" in rows:
        lines.append(f"`figures`: {_status(rows['figures'])}.")
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
    for name, _, _ in plan_mod.MAIN:
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
    centre = _ok_top1(rows.get(MK_CENTRE[0]))
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


def collect(paths: Sequence[str], out: str, png: bool = True, bench: Optional[str] = None) -> Dict[str, str]:
    """Write every table to ``out``; returns {table name: path}. ``bench``: a ``bench_models.py`` JSON whose
    training speeds the main figure plots."""
    rows, sources, entries = load_summaries(paths)
    os.makedirs(out, exist_ok=True)
    runs = mk_runs(rows)
    texts = {"main": main_table(rows), "ablations": ablation_tables(rows), "mk_grid": mk_table(rows, runs),
             "long": long_table(rows, sources),
             "generalisation": generalisation_tables(rows, load_analyses(rows, entries))}
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
        json.dump({"sources": sources, "rows": [rows[n] for n in sorted(rows)]}, handle, indent=2)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", nargs="+", metavar="SUMMARY_JSON", help="summary.json of a driver call")
    parser.add_argument("--out", required=True, help="folder for the Markdown tables and rows.json")
    parser.add_argument("--no-png", action="store_true", help="skip the figures (m x k heatmap, main, ablations)")
    parser.add_argument("--bench", metavar="BENCH_JSON",
                        help="bench_models.py JSON whose training images/s main.png plots (default: the runs' own)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    bad = [p for p in args.summaries if not os.path.isfile(p)]
    if bad:
        parser.error(f"argument SUMMARY_JSON: {bad} are not files")
    if args.bench and not os.path.isfile(args.bench):
        parser.error(f"argument --bench: {args.bench!r} is not a file")
    try:
        written = collect(args.summaries, args.out, png=not args.no_png, bench=args.bench)
    except (ValueError, json.JSONDecodeError) as err:
        parser.error(str(err))
    _logger.info("wrote %s", ", ".join(sorted(written.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
