"""The paper's ablation tables from sweep folders: landmark extractors, routed vs shared experts, top-1 vs top-2.

    python train.py -m experiment=fmnist attention.pool=grid,1d,random 'attention.tag=mita_${attention.pool}'
    python train.py -m experiment=fmnist attention=mita,mita_route_only,mita_compress_only,mita_top2
    python -m mita.analysis ablations outputs/fmnist --out outputs/ablations
    python -m mita.analysis ablations outputs/fmnist outputs/fmnist_more --metric best_acc1 --where trainer.epochs=30

Every run folder under the SWEEP_DIRs (config.yaml + log.jsonl, what train.py writes) is read with
mita.analysis.sweep; runs that differ only in their seed are averaged (mean ± std). Three tables, each
over the MiTA runs it concerns (runs with dwc or gate are left out; --where filters further):

- landmark extractors: rows attention.pool, columns (m, k); runs with both experts and top-1 routing;
- route-only vs compress-only vs both: rows the variant (shared expert off; k = 0; both), columns m;
  pools grid/official, top-1 routing;
- top-1 vs top-2 routing: rows router_topk, columns (m, k) with k the per-expert budget before the official
  top-2 halving (base_topk); both experts, pools grid/official.

Writes <out>.md (the three tables, also printed) and <out>.json (the runs behind each table).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mita.analysis import sweep as collect_sweep
from mita.analysis.common import write_json

_logger = logging.getLogger(__name__)


def _is_true(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


def _extractor(att: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    if not _is_true(att.get("shared", True)) or int(att.get("topk") or 0) == 0 or int(att.get("router_topk") or 1) != 1:
        return None
    return str(att.get("pool") or "grid"), f"m={att.get('num_landmarks')}, k={att.get('topk')}"


def _experts(att: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    if str(att.get("pool") or "grid") not in ("grid", "official") or int(att.get("router_topk") or 1) != 1:
        return None
    k = int(att.get("topk") or 0)
    if not _is_true(att.get("shared", True)):
        variant = f"route-only (k={k})"
    elif k == 0:
        variant = "compress-only (k=0)"
    else:
        variant = f"both (k={k})"
    return variant, f"m={att.get('num_landmarks')}"


def _routing(att: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    if (not _is_true(att.get("shared", True)) or int(att.get("topk") or 0) == 0
            or str(att.get("pool") or "grid") not in ("grid", "official")):
        return None
    r = int(att.get("router_topk") or 1)
    k = att.get("base_topk") if r > 1 and att.get("base_topk") is not None else att.get("topk")
    return f"top-{r}", f"m={att.get('num_landmarks')}, k={k}"


#: (title, row header, column header, run -> (row, column) or None when the run does not belong)
TABLES: Sequence[Tuple[str, str, str, Callable[[Dict[str, Any]], Optional[Tuple[str, str]]]]] = (
    ("Landmark extractors", "pool", "setting", _extractor),
    ("Route-only vs compress-only vs both", "experts", "setting", _experts),
    ("Top-1 vs top-2 routing", "routing", "setting", _routing),
)


def load(sweep_dirs: Sequence[str], metric: str, where: Sequence[Tuple[str, str]] = ()) -> List[Dict[str, Any]]:
    """The MiTA runs under ``sweep_dirs`` (collect_sweep.load_runs), each with its attention config in ``att``."""
    runs = []
    for sweep in sweep_dirs:
        # rows="attention" puts the whole attention config of each run in run["row"].
        for run in collect_sweep.load_runs(sweep, metric, "attention", "trainer.epochs", where):
            att = run["row"] if isinstance(run["row"], dict) else {}
            if att.get("name") != "mita" or _is_true(att.get("dwc")) or _is_true(att.get("gate")):
                continue
            folder = run["folder"] if len(sweep_dirs) == 1 else os.path.join(os.path.basename(sweep.rstrip("/")),
                                                                              run["folder"])
            runs.append(dict(run, att=att, folder=folder))
    return runs


def tables(runs: Sequence[Dict[str, Any]], metric: str) -> Tuple[str, Dict[str, List[Dict[str, Any]]]]:
    """(Markdown of the three tables, {title: runs with their row and column labels})."""
    parts, chosen = [], {}
    for title, rows, cols, select in TABLES:
        picked = []
        for run in runs:
            cell = select(run["att"])
            if cell is not None:
                picked.append(dict(run, row=cell[0], col=cell[1]))
        chosen[title] = picked
        parts.append(f"## {title}\n")
        parts.append(collect_sweep.markdown(picked, metric, rows, cols) if picked else "(no matching runs)\n")
    return "\n".join(parts), chosen


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mita.analysis ablations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", nargs="+", help="folders holding train.py runs (searched recursively)")
    parser.add_argument("--metric", default="val_acc1", help="log.jsonl key (default val_acc1)")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="keep only runs whose config has this value (repeatable), e.g. trainer.epochs=30")
    parser.add_argument("--out", default=None, help="output prefix (default FIRST_SWEEP_DIR/ablations)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for folder in args.sweep_dirs:
        if not os.path.isdir(folder):
            parser.error(f"argument sweep_dirs: {folder!r} is not a folder")
    where = []
    for item in args.where:
        if "=" not in item:
            parser.error(f"argument --where: {item!r} is not KEY=VALUE")
        where.append(tuple(item.split("=", 1)))
    runs = load(args.sweep_dirs, args.metric, where)
    if not runs:
        _logger.error("no MiTA run with a log.jsonl holding %r under %s", args.metric, args.sweep_dirs)
        return 1
    text, chosen = tables(runs, args.metric)
    prefix = args.out or os.path.join(args.sweep_dirs[0], "ablations")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    header = f"# Ablations ({args.metric}, last logged epoch of each run)\n\n"
    with open(prefix + ".md", "w", encoding="utf-8") as handle:
        handle.write(header + text)
    write_json(prefix + ".json", {
        "metric": args.metric,
        "sweep_dirs": list(args.sweep_dirs),
        "tables": {title: [{k: v for k, v in run.items() if k != "att"} | {"attention": run["att"]} for run in picked]
                   for title, picked in chosen.items()},
    })
    sys.stdout.write(header + text)
    _logger.info("wrote %s.md and %s.json (%d MiTA runs)", prefix, prefix, len(runs))
    return 0
