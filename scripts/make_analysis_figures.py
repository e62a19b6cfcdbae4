"""Train the Fashion-MNIST checkpoints and make every analysis figure, in one command (one GPU call).

    python3 scripts/make_analysis_figures.py --out $OUT --data-root .data/fashion-mnist   # ~9 min on one H100
    python3 scripts/make_analysis_figures.py --out /tmp/figs --smoke                       # CPU, ~20 s: the whole
                                                                                           # pipeline on tiny data

Stages, in this order (each logged, timed and recorded in summary.json; a failing stage is recorded and the
next one runs):

1. train MiTA (experiment=fmnist: DeiT-Tiny geometry on 28 x 28 images, patch 2, 197 tokens, m = k = 25,
   bf16) for --epochs (about 15.5 s an epoch on an H100: 8 epochs took 153 s; 3-4 minutes hold 11-14);
2. token pruning, experts, routing overlap (fp32, the whole test split) and the inference-time m x k grid
   (--grid-m x --grid-k, bf16) on that checkpoint;
3. train standard and Agent attention for --baseline-epochs, then the 3 x 3 checkpoint-swap matrix (bf16);
4. short ablation runs (--ablation-epochs on --ablation-images training images, each: MiTA, route-only,
   compress-only, top-2, then pools 1d and random) and their Markdown tables (scripts/analysis_ablations.py).

A stage whose estimated time (from the measured MiTA epoch) exceeds what is left of --budget-s is skipped and
recorded as such, so that the command ends inside a 10-minute limit with what it has. Checkpoints stay in
--work (default a temporary folder); --out receives at most 8 files: the five PNGs (pruning, experts,
overlap, mk_grid, swap), summary.json (every number: the analyses' JSON, the training records, the ablation
tables, the stage times, the card), driver.log, and analysis.tar.gz (each analysis's JSON/CSV, the
ablation tables, every run's config.yaml and log.jsonl, and the MiTA weights as an fp16 export that the
analysis scripts accept, for redrawing on a CPU).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mita.analysis.cli import int_list  # noqa: E402

_logger = logging.getLogger("make_analysis_figures")

FIGURES = ("pruning", "experts", "overlap", "mk_grid", "swap")

#: the smoke setting: tiny synthetic images and model, two steps a run (CPU tests of this driver)
SMOKE = ["data=synthetic", "data.img_size=16", "data.synthetic_size=32", "model.kwargs.embed_dim=32",
         "model.kwargs.depth=2", "model.kwargs.num_heads=2", "trainer.global_batch_size=8",
         "trainer.max_steps_per_epoch=2", "sched.warmup_epochs=0"]


class Driver:
    """Runs the stages inside a time budget and keeps summary.json current after each one."""

    def __init__(self, out: str, work: str, budget_s: float) -> None:
        self.out, self.work, self.budget_s = out, work, budget_s
        self.start = time.perf_counter()
        self.summary: Dict[str, Any] = {"stages": {}, "runs": {}, "analyses": {}}
        self.epoch_s: Optional[float] = None
        #: train.py overrides added to every run (--set)
        self.extra: List[str] = []

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def stage(self, name: str, fn: Callable[[], Any], estimate_s: Optional[float] = None) -> Any:
        """Run ``fn`` unless ``estimate_s`` exceeds the time left (no estimate: always run)."""
        if estimate_s is not None and estimate_s > self.left():
            _logger.warning("stage %s skipped: about %.0f s needed, %.0f s left of --budget-s", name, estimate_s,
                            self.left())
            self.summary["stages"][name] = {"status": "skipped", "estimate_s": estimate_s, "left_s": self.left()}
            self.save()
            return None
        _logger.info("stage %s (%.0f s left)", name, self.left())
        began = time.perf_counter()
        try:
            result = fn()
            status: Dict[str, Any] = {"status": "ok"}
        except Exception as err:  # a failing stage must not lose the others' results
            _logger.error("stage %s failed:\n%s", name, traceback.format_exc())
            result, status = None, {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        status["seconds"] = time.perf_counter() - began
        self.summary["stages"][name] = status
        self.save()
        return result

    def save(self) -> None:
        from mita.analysis.common import write_json

        self.summary["elapsed_s"] = time.perf_counter() - self.start
        write_json(os.path.join(self.out, "summary.json"), self.summary)


def _last_wins(overrides: Sequence[str]) -> List[str]:
    """Hydra refuses two overrides of one key: keep the last of each (the command line's --set come last)."""
    keys = [item.split("=", 1)[0] for item in overrides]
    return [item for i, item in enumerate(overrides) if keys[i] not in keys[i + 1:]]


def _train(driver: Driver, name: str, overrides: Sequence[str], folder: str = "runs") -> str:
    """Train one run into WORK/<folder>/<name>; returns its checkpoint path."""
    import torch

    from mita.engine.runner import compose, train

    run_dir = os.path.join(driver.work, folder, name)
    threads = torch.get_num_threads()
    began = time.perf_counter()
    overrides = _last_wins([*overrides, f"run_dir={run_dir}", "logger=none", "trainer.progress=false", *driver.extra])
    try:
        record = train(compose("train", overrides))
    finally:
        torch.set_num_threads(threads)  # trainer.threads applies process-wide
    seconds = time.perf_counter() - began
    driver.summary["runs"][name] = {"run_dir": run_dir, "seconds": seconds, "record": record}
    return os.path.join(run_dir, "checkpoint.pth")


def _epochs(epochs: int, smoke: bool) -> List[str]:
    """trainer.epochs, with experiment=fmnist's 2 warm-up epochs cut to fit short runs."""
    return [f"trainer.epochs={epochs}"] + ([] if smoke else [f"sched.warmup_epochs={min(2, epochs - 1)}"])


def _analysis(driver: Driver, name: str, fn: Callable[[str], Dict[str, Any]]) -> Dict[str, Any]:
    """Run one analysis into WORK/analysis, copy its PNG to --out, keep its JSON in the summary."""
    folder = os.path.join(driver.work, "analysis")
    payload = fn(folder)
    driver.summary["analyses"][name] = payload
    shutil.copyfile(os.path.join(folder, f"{name}.png"), os.path.join(driver.out, f"{name}.png"))
    return payload


def _pack(driver: Driver, mita_ckpt: Optional[str]) -> None:
    """analysis.tar.gz: analyses, ablation tables, run configs and logs, and MiTA's fp16 weights."""
    from mita.engine.checkpoint import export_weights

    if mita_ckpt and os.path.isfile(mita_ckpt):
        export_weights(mita_ckpt, os.path.join(driver.work, "runs", "mita", "model_fp16.pth"), fp16=True)
    with tarfile.open(os.path.join(driver.out, "analysis.tar.gz"), "w:gz") as tar:
        for root, _, files in os.walk(driver.work):
            for file in sorted(files):
                path = os.path.join(root, file)
                keep = file.endswith((".json", ".csv", ".md", ".jsonl", ".yaml", ".png")) or file == "model_fp16.pth"
                if keep:
                    tar.add(path, arcname=os.path.relpath(path, driver.work))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the PNGs, summary.json, driver.log, analysis.tar.gz")
    parser.add_argument("--work", default=None, help="folder for runs and checkpoints (default: a temporary folder)")
    parser.add_argument("--data-root", default=None,
                        help="Fashion-MNIST folder (default the config's, /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--epochs", type=int, default=10, help="MiTA epochs (default 10, ~2.6 min on an H100)")
    parser.add_argument("--baseline-epochs", type=int, default=3, help="standard and Agent epochs (default 3)")
    parser.add_argument("--ablation-epochs", type=int, default=2, help="epochs of each ablation run (0: none)")
    parser.add_argument("--ablation-images", type=int, default=30000, help="training images of the ablation runs")
    parser.add_argument("--grid-m", type=int_list, default=[9, 16, 25, 36, 49], help="m values of the grid")
    parser.add_argument("--grid-k", type=int_list, default=[9, 16, 25, 36, 49], help="k values of the grid")
    parser.add_argument("--max-images", type=int, default=None, help="images of the analyses (default the split)")
    parser.add_argument("--budget-s", type=float, default=510.0,
                        help="skip stages that would end after this many seconds (default 510)")
    parser.add_argument("--eval-precision", default=None, choices=("fp32", "bf16", "fp16"),
                        help="autocast of the grid and swap evaluations (default bf16 as training, fp32 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic setting (CPU check of the pipeline)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="extra",
                        help="train.py override added to every run, last (repeatable), e.g. data.num_workers=2")
    args = parser.parse_args(argv)
    for key in ("epochs", "baseline_epochs"):
        if getattr(args, key) < 1:
            parser.error(f"argument --{key.replace('_', '-')}: must be >= 1, got {getattr(args, key)}")
    if args.ablation_epochs < 0 or args.ablation_images < 1:
        parser.error("arguments --ablation-epochs >= 0 and --ablation-images >= 1 expected")
    bad = [item for item in args.extra if "=" not in item or item.startswith("=")]
    if bad:
        parser.error(f"argument --set: {bad} are not KEY=VALUE")
    if args.data_root is not None and not args.smoke and not os.path.isdir(args.data_root):
        parser.error(f"argument --data-root: {args.data_root!r} is not a folder")

    os.makedirs(args.out, exist_ok=True)
    fmt = "%(asctime)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt)
    # driver.log gets every record too, also when the process already had logging set up (tests).
    root = logging.getLogger()
    log_file = logging.FileHandler(os.path.join(args.out, "driver.log"), mode="w")
    log_file.setFormatter(logging.Formatter(fmt))
    root.addHandler(log_file)
    level = root.level
    root.setLevel(min(level, logging.INFO))
    try:
        return _run(args)
    finally:
        root.removeHandler(log_file)
        root.setLevel(level)
        log_file.close()


def _run(args: argparse.Namespace) -> int:
    work = args.work or tempfile.mkdtemp(prefix="mita_analysis_")
    os.makedirs(work, exist_ok=True)
    driver = Driver(args.out, work, args.budget_s)
    driver.extra = list(args.extra)

    import torch

    driver.summary["setup"] = {
        "args": vars(args),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "work": work,
    }
    if args.smoke:
        common = ["experiment=fmnist_cpu", *SMOKE]
        mita_k = ["attention.num_landmarks=4", "attention.topk=8"]
        base_k = ["attention.num_landmarks=4", "attention.base_topk=8"]
        agent = ["attention.num_agents=16"]
        grid_m, grid_k = [4, 9], [4, 8]
        ablation_data: List[str] = []
    else:
        common = ["experiment=fmnist"] + ([f"data.root={os.path.abspath(args.data_root)}"] if args.data_root else [])
        mita_k, base_k, agent = [], [], []
        grid_m, grid_k = args.grid_m, args.grid_k
        ablation_data = [f"data.max_train_samples={args.ablation_images}", "sched.warmup_epochs=0",
                         "sched.per_step=true"]
    data_ov = [o for o in common if o.startswith("data.root=")]
    analysis_kw = dict(overrides=data_ov, max_images=args.max_images, progress=False)

    from mita import analysis

    mita_ckpt = driver.stage("train_mita", lambda: _train(
        driver, "mita", [*common, "attention=mita", *mita_k, *_epochs(args.epochs, args.smoke)]))
    if mita_ckpt:
        driver.epoch_s = driver.summary["runs"]["mita"]["seconds"] / args.epochs
    eval_precision = args.eval_precision or ("fp32" if args.smoke else "bf16")
    if mita_ckpt:
        driver.stage("pruning", lambda: _analysis(driver, "pruning", lambda out: analysis.token_pruning(
            mita_ckpt, out, **analysis_kw)), estimate_s=0.3 * driver.epoch_s)
        driver.stage("experts", lambda: _analysis(driver, "experts", lambda out: analysis.expert_maps(
            mita_ckpt, out, **analysis_kw)), estimate_s=0.3 * driver.epoch_s)
        driver.stage("overlap", lambda: _analysis(driver, "overlap", lambda out: analysis.routing_overlap(
            mita_ckpt, out, **analysis_kw)), estimate_s=0.3 * driver.epoch_s)
        driver.stage("mk_grid", lambda: _analysis(driver, "mk_grid", lambda out: analysis.mk_grid(
            mita_ckpt, out, num_landmarks=grid_m, topk=grid_k, precision=eval_precision,
            **analysis_kw)), estimate_s=0.1 * driver.epoch_s * len(grid_m) * len(grid_k))
    epoch_s = driver.epoch_s or 20.0
    swap_ckpts = [mita_ckpt] if mita_ckpt else []
    for name, att in (("standard", ["attention=standard"]), ("agent", ["attention=agent", *agent])):
        ckpt = driver.stage(f"train_{name}", lambda: _train(
            driver, name, [*common, *att, *_epochs(args.baseline_epochs, args.smoke)]),
            estimate_s=epoch_s * args.baseline_epochs + 10)
        if ckpt:
            swap_ckpts.append(ckpt)
    if len(swap_ckpts) >= 2:
        driver.stage("swap", lambda: _analysis(driver, "swap", lambda out: analysis.swap_matrix(
            swap_ckpts, out, precision=eval_precision, **analysis_kw)),
            estimate_s=0.1 * epoch_s * len(swap_ckpts) ** 2)

    if args.ablation_epochs:
        ablations = (
            ("both", ["attention=mita", *mita_k]),
            ("route_only", ["attention=mita_route_only", *base_k]),
            ("compress_only", ["attention=mita_compress_only", *mita_k[:1]]),
            ("top2", ["attention=mita_top2", *base_k]),
            ("pool_1d", ["attention=mita", *mita_k, "attention.pool=1d"]),
            ("pool_random", ["attention=mita", *mita_k, "attention.pool=random"]),
        )
        share = 1.0 if args.smoke else min(1.0, args.ablation_images / 60000)
        for name, att in ablations:
            driver.stage(f"ablation_{name}", lambda: _train(
                driver, name, [*common, *att, *ablation_data, f"trainer.epochs={args.ablation_epochs}"],
                folder="ablations"), estimate_s=epoch_s * args.ablation_epochs * share + 15)

        def tables() -> str:
            import analysis_ablations

            prefix = os.path.join(work, "analysis", "ablations")
            if analysis_ablations.main([os.path.join(work, "ablations"), "--out", prefix]) != 0:
                raise RuntimeError("no ablation run finished")
            with open(prefix + ".md", encoding="utf-8") as handle:
                driver.summary["ablations_md"] = handle.read()
            return prefix

        if os.path.isdir(os.path.join(work, "ablations")):
            driver.stage("ablation_tables", tables)
    driver.stage("pack", lambda: _pack(driver, mita_ckpt))
    missing = [name for name in FIGURES if not os.path.isfile(os.path.join(args.out, f"{name}.png"))]
    failed = [name for name, s in driver.summary["stages"].items() if s["status"] != "ok"]
    driver.summary["missing_figures"] = missing
    driver.save()
    _logger.info("done in %.0f s: %s in %s%s", time.perf_counter() - driver.start, sorted(os.listdir(args.out)),
                 args.out, f"; not ok: {failed}" if failed else "")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
