"""Issue 7's driver: run one group of the Fashion-MNIST reproduction plan, one process per GPU, inside a budget.

    python3 scripts/reproduce_fmnist_plan.py                                   # the groups and the call list
    python3 scripts/reproduce_fmnist.py --plan main1 --out $OUT --data-root .data/fashion-mnist --gpus 8
    python3 scripts/reproduce_fmnist.py --plan generalisation,long --out $OUT --data-root .data/fashion-mnist \\
        --ckpt-dir .ckpt/issue7 --gpus 8
    python3 scripts/reproduce_fmnist.py --plan main1 --shard 1/2 --out $OUT --data-root ... --gpus 4   # 4 GPUs
    python3 scripts/reproduce_fmnist.py --plan smoke --out /tmp/repro --smoke --gpus 2   # CPU, tiny synthetic runs

Each run of the group (scripts/reproduce_fmnist_plan.py) is a worker process (this script with ``--worker``)
pinned to one GPU by CUDA_VISIBLE_DEVICES. A training run composes ``train.py``'s config
(``experiment=fmnist_repro`` + the run's overrides), trains through ``mita.engine.runner.train``, evaluates the
last checkpoint as ``eval.py`` does (bf16, with FLOPs), times inference on random batches (CUDA events, median)
and records the peak GPU memory; analysis jobs call ``mita.analysis`` on the weights in ``--ckpt-dir``.
Runs start longest first (long-sequence runs in the group's order), each on the GPU that frees first; a run
whose estimate would end after ``--budget-s`` is not started and is reported as skipped, and a run still
going at the budget is stopped and reported as killed (its log.jsonl lines stay). Long-sequence runs (kind
``fit``) are first probed for 2 x 20 steps, each alone on its GPU; then all of them get the same training
subset, the largest with which the runs sharing a GPU end inside the budget when each takes its own probed
time (see ``Driver._sized``).

--out receives at most 8 files: summary.json (per run: status, the equivalent train.py/eval.py commands,
seed, epochs, card, wall time, training and inference images/s, params, FLOPs, top-1, peak memory),
driver.log, runs.tar.gz (every run's config.yaml, log.jsonl, result.json, eval.json, worker.log and the
analyses' PNG/JSON/CSV; no checkpoints) and ``<run>_fp16.pth`` for the runs the plan exports (weights only,
fp16, about 11 MB each: the generalisation call reads them from ``--ckpt-dir``).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reproduce_fmnist_plan as plan_mod  # noqa: E402
from make_analysis_figures import SMOKE, _last_wins  # noqa: E402

_logger = logging.getLogger("reproduce_fmnist")

#: probe of a long run: this many steps in each of 2 epochs (the second is timed), this many test images
#: (enough that the test loader's start-up does not dominate the test speed the evaluations are sized by)
PROBE_STEPS, PROBE_VAL = 20, 2048
#: files of a run folder that go into runs.tar.gz
PACKED = (".json", ".jsonl", ".yaml", ".log", ".csv", ".md", ".png")
#: what a training run does after its last epoch: evaluation (as eval.py, with FLOPs), inference timing, export
FINAL_S = 15.0
#: inference timing: batch, warm-up and timed forwards
INFER_BATCH, INFER_WARMUP, INFER_REPS = 256, 5, 20


def _smoke_overrides(overrides: Sequence[str]) -> List[str]:
    """The tiny synthetic setting of make_analysis_figures, with MiTA budgets that fit 8 x 8 patches."""
    # fmnist_repro's model (fmnist_deit_tiny) sets no width: add the keys rather than override them
    extra = [("++" + o if o.startswith("model.kwargs.") else o) for o in SMOKE]
    extra += ["trainer.precision=fp32", "trainer.threads=1", "data.num_workers=0", "trainer.eval_every=1",
              "data.max_train_samples=null"]
    if any(o.startswith("attention=mita") for o in overrides):
        extra += ["attention.num_landmarks=4", "attention.topk=8"]
    return extra


def run_overrides(spec: Dict[str, Any], extra: Sequence[str] = ()) -> List[str]:
    """train.py's overrides for a run spec (the recipe, the run's own, seed, epochs, folder, data, --set)."""
    own = list(spec["overrides"])
    base = [o for o in plan_mod.RECIPE if not (o.startswith("experiment=") and any(
        x.startswith("experiment=") for x in own))]
    items = [*base, *own, f"seed={spec['seed']}", f"trainer.epochs={spec['epochs']}", f"run_dir={spec['run_dir']}"]
    if spec.get("smoke"):
        items += _smoke_overrides(own)
    elif spec.get("data_root"):
        items.append(f"data.root={spec['data_root']}")
    return _last_wins([*items, *extra, *spec.get("extra", [])])


def _command(script: str, overrides: Sequence[str]) -> str:
    return " ".join(["python", script, *overrides])


def _read_log(path: str) -> List[Dict[str, Any]]:
    records = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


def _epochs(run_dir: str) -> List[Dict[str, Any]]:
    """The epoch records of a run's log.jsonl (those with an epoch time)."""
    return [r for r in _read_log(os.path.join(run_dir, "log.jsonl")) if "epoch_time_s" in r]


def _log_stats(run_dir: str) -> Dict[str, Any]:
    """Training speed (median over epochs after the first, which compiles the kernels) and the last top-1."""
    records = [r for r in _read_log(os.path.join(run_dir, "log.jsonl")) if "train_images_per_s" in r]
    if not records:
        return {}
    warm = records[1:] or records
    evaluated = [r for r in records if "val_acc1" in r]
    return {
        "epochs_done": len(records),
        "train_images_per_s": statistics.median(r["train_images_per_s"] for r in warm),
        "epoch_time_s": statistics.median(r["epoch_time_s"] for r in warm),
        "last_val_acc1": evaluated[-1]["val_acc1"] if evaluated else None,
        "best_acc1": records[-1].get("best_acc1"),
    }


def _inference_speed(ckpt: str, precision: str, smoke: bool) -> Dict[str, Any]:
    """Forward images/s of the checkpoint's model on random inputs (CUDA events, median of timed batches)."""
    import torch

    from bench_attention import Clock
    from mita.engine.checkpoint import load_state
    from mita.engine.runner import PRECISIONS, build_model_from_config

    config = load_state(ckpt)["config"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model_from_config(config["model"], config["attention"], load_pretrained=False).to(device).eval()
    batch, warmup, reps = (4, 1, 2) if smoke else (INFER_BATCH, INFER_WARMUP, INFER_REPS)
    size = int(config["data"]["img_size"])
    x = torch.randn(batch, int(config["model"]["in_chans"]), size, size, device=device)  # [B, C, H, W]
    dtype = PRECISIONS[precision]
    clock, times = Clock(device), []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(warmup + reps):
            start = clock.mark()
            model(x)
            end = clock.mark()
            clock.sync()
            if i >= warmup:
                times.append(clock.ms(start, end))
    return {"infer_images_per_s": batch / (statistics.median(times) / 1e3), "infer_batch": batch,
            "infer_precision": precision}


def _evaluate(spec: Dict[str, Any], ckpt: str, out: str, attention: Optional[str] = None) -> Dict[str, Any]:
    from mita.engine.runner import compose, evaluate_checkpoint

    overrides = [f"ckpt={ckpt}", f"out={out}", f"precision={spec['precision']}"]
    if attention:
        overrides.append(f"attention={attention}")
    if spec.get("smoke"):
        overrides += ["data.num_workers=0", "device=cpu"]
    elif spec.get("data_root"):
        overrides += [f"data.root={spec['data_root']}", "data.num_workers=8"]
    report = evaluate_checkpoint(compose("eval", overrides))
    report["command"] = _command("eval.py", overrides)
    return report


def _train_and_evaluate(spec: Dict[str, Any], result: Dict[str, Any], extra: Sequence[str] = ()) -> None:
    import torch

    from mita.engine.runner import compose, train

    overrides = run_overrides(spec, extra)
    result["train_command"] = _command("train.py", overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    record = train(compose("train", overrides))
    result["train_s"] = time.perf_counter() - began
    result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    result["last_record"] = record
    result.update(_log_stats(spec["run_dir"]))
    if spec.get("probe"):
        return
    ckpt = os.path.join(spec["run_dir"], "checkpoint.pth")
    report = _evaluate(spec, ckpt, os.path.join(spec["run_dir"], "eval.json"))
    result.update(eval_command=report["command"], top1=report["acc1"], top5=report["acc5"], params=report["params"],
                  macs=report.get("macs"), eval_images_per_s=report["images_per_s"])
    if report.get("macs_error"):  # the evaluation kept its accuracy; the summary names why MACs are missing
        result["macs_error"] = report["macs_error"]
    result.update(_inference_speed(ckpt, spec["precision"], bool(spec.get("smoke"))))
    if spec.get("export"):
        from mita.engine.checkpoint import export_weights

        result["export"] = export_weights(ckpt, os.path.join(spec["run_dir"], "model_fp16.pth"), fp16=True)


def _attention_choice(overrides: Sequence[str]) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("attention="))


def _analysis(spec: Dict[str, Any], result: Dict[str, Any]) -> None:
    from mita import analysis

    ckpts, out, smoke = spec["ckpt_paths"], os.path.join(spec["run_dir"], "analysis"), bool(spec.get("smoke"))
    kw = dict(overrides=[] if smoke or not spec.get("data_root") else [f"data.root={spec['data_root']}"],
              progress=False)
    kind = spec["kind"]
    if kind == "figures":
        result["pruning"] = analysis.token_pruning(ckpts[0], out, **kw)
        result["experts"] = analysis.expert_maps(ckpts[0], out, **kw)
        result["overlap"] = analysis.routing_overlap(ckpts[0], out, **kw)
    elif kind == "mk_grid":
        grid = [4, 9] if smoke else [9, 16, 25, 36, 49]
        result["mk_grid"] = analysis.mk_grid(ckpts[0], out, num_landmarks=grid, topk=[4, 8] if smoke else grid,
                                             precision=spec["precision"], **kw)
    elif kind == "swap":
        result["swap"] = analysis.swap_matrix(ckpts, out, labels=list(spec["ckpts"]), precision=spec["precision"],
                                              **kw)
    result["commands"] = {"figures": [f"python scripts/analysis_{n}.py CKPT_mita --out OUT"
                                      for n in ("pruning", "experts", "overlap")],
                          "mk_grid": ["python scripts/analysis_mk_grid.py CKPT_mita --precision bf16 --out OUT"],
                          "swap": ["python scripts/analysis_swap.py " + " ".join(f"CKPT_{c}" for c in spec["ckpts"])
                                   + f" --labels {','.join(spec['ckpts'])} --precision bf16 --out OUT"]}[kind]


def _strip_paths(text: str, work: str) -> str:
    """``text`` with the driver's work folder and the repository taken out: a path inside either becomes relative
    to it, the folder itself "." (not a longer name it begins: ``/x/work2`` stays); the run folders then read
    ``runs/NAME``, as runs.tar.gz holds them, rather than a temporary folder of the machine they ran on."""
    for folder in (os.path.abspath(work), str(REPO)):
        text = text.replace(os.path.join(folder, ""), "")
        text = re.sub(re.escape(folder) + r"(?![\w.-])", ".", text)
    return text


def portable(value: Any, work: Optional[str]) -> Any:
    """``value`` with :func:`_strip_paths` applied to every string in it (the JSON the driver writes)."""
    if not work:
        return value

    def strip(item: Any) -> Any:
        if isinstance(item, str):
            return _strip_paths(item, work)
        if isinstance(item, dict):
            return {k: strip(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(strip(v) for v in item)
        return item

    return strip(value)


def _portable_argv(argv: Sequence[str]) -> List[str]:
    """The driver's arguments with the output and work folders as ``$OUT`` and ``$WORK``: they are folders of the
    machine it ran on, which a reader of summary.json neither has nor needs."""
    out, hidden = [], {"--out": "$OUT", "--work": "$WORK"}
    it = iter(argv)
    for item in it:
        flag, eq, _ = item.partition("=")
        if flag in hidden and eq:
            out.append(f"{flag}={hidden[flag]}")
        elif item in hidden:
            out.append(item)
            if next(it, None) is not None:
                out.append(hidden[item])
        else:
            out.append(item)
    return out


def worker(spec_path: str) -> int:
    """One job on the GPU CUDA_VISIBLE_DEVICES names: writes RUN_DIR/result.json, exit status 0 if ok."""
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    import torch

    result: Dict[str, Any] = {"name": spec["name"], "kind": spec["kind"], "seed": spec["seed"],
                              "epochs": spec["epochs"], "probe": bool(spec.get("probe")),
                              "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                              "torch": torch.__version__}
    began, status = time.perf_counter(), 0
    try:
        if spec["kind"] in ("train", "fit"):
            extra = []
            if spec.get("probe"):
                steps = 2 if spec.get("smoke") else PROBE_STEPS
                extra = ["trainer.epochs=2", f"trainer.max_steps_per_epoch={steps}",
                         f"data.max_val_samples={8 if spec.get('smoke') else PROBE_VAL}", "trainer.eval_every=2"]
            _train_and_evaluate(spec, result, extra)
        elif spec["kind"] == "finetune":
            ckpt = spec["ckpt_paths"][0]
            zero = _evaluate(spec, ckpt, os.path.join(spec["run_dir"], "zero_shot.json"),
                             attention=_attention_choice(spec["overrides"]))
            result.update(zero_shot_top1=zero["acc1"], zero_shot_command=zero["command"],
                          zero_shot_missing_keys=zero["missing_keys"])
            _train_and_evaluate(spec, result, [f"model.checkpoint={ckpt}"])
        else:
            _analysis(spec, result)
        result["status"] = "ok"
    except Exception as err:  # the driver records the failure; other runs go on
        _logger.exception("run %s failed", spec["name"])
        result.update(status="failed", error=f"{type(err).__name__}: {err}")
        status = 1
    result["wall_s"] = time.perf_counter() - began
    from mita.analysis.common import write_json

    write_json(os.path.join(spec["run_dir"], "result.json"), portable(result, spec.get("work")))
    return status


def _pick_gpu(job: "Job", free: Sequence[int], running: Sequence["Job"]) -> Optional[int]:
    """The GPU ``job`` starts on: the first free slot's, but a probe only on a GPU where nothing runs and
    nothing beside a probe; None: wait."""
    probing = {j.gpu for j in running if j.probe}
    busy = {j.gpu for j in running}
    for gpu in free:
        if gpu in probing or (job.probe and gpu in busy):
            continue
        return gpu
    return None


class Job:
    def __init__(self, run: plan_mod.Run, probe: bool = False, estimate: Optional[float] = None,
                 slowdown: float = 1.0, card: str = "h100") -> None:
        self.run, self.probe = run, probe
        self.name = f"{run.name}_probe" if probe else run.name
        self.estimate = estimate if estimate is not None else run.estimate(card) * slowdown
        self.extra: List[str] = []
        self.proc: Optional[subprocess.Popen] = None
        self.gpu: Optional[int] = None
        self.started = 0.0
        # epochs it had logged when a run last started or ended on its GPU (its speed changed then)
        self.epochs_at_change = 0


class Driver:
    def __init__(self, args: argparse.Namespace, runs: Sequence[plan_mod.Run]) -> None:
        self.args, self.runs = args, list(runs)
        self.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="mita_repro_"))
        self.start = time.perf_counter()
        self.summary: Dict[str, Any] = {"runs": {}, "fit": None}
        # each run's estimate is for a GPU of its own: with several runs on one GPU, each is this much slower
        self.slowdown = args.slowdown if args.slowdown is not None else plan_mod.slowdown(args.slots)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def spec(self, job: Job) -> Dict[str, Any]:
        run, args = job.run, self.args
        run_dir = os.path.join(self.work, "runs", job.name)
        missing = [c for c in run.ckpts if not args.ckpt_dir or not os.path.isfile(REPO / self._ckpt(c))]
        if missing:
            raise FileNotFoundError(f"--ckpt-dir {args.ckpt_dir!r} lacks {[c + '_fp16.pth' for c in missing]}")
        return {"name": job.name, "kind": run.kind, "overrides": run.overrides, "seed": run.seed,
                "epochs": run.epochs, "run_dir": run_dir, "data_root": args.data_root, "smoke": args.smoke,
                "export": run.export and not job.probe, "probe": job.probe, "extra": [*args.extra, *job.extra],
                "ckpts": list(run.ckpts), "ckpt_paths": [self._ckpt(c) for c in run.ckpts],
                "precision": "fp32" if args.smoke else "bf16", "work": self.work}

    def _ckpt(self, name: str) -> str:
        return os.path.join(self.args.ckpt_dir or "", f"{name}_fp16.pth")

    def record(self, job: Job, status: str, **info: Any) -> None:
        entry = {"status": status, "estimate_s": round(job.estimate, 1), **info}
        key = "probes" if job.probe else "runs"
        self.summary.setdefault(key, {})[job.name] = entry
        self.save()

    def save(self) -> None:
        from mita.analysis.common import write_json

        self.summary["elapsed_s"] = time.perf_counter() - self.start
        write_json(os.path.join(self.args.out, "summary.json"), self.summary)

    def launch(self, job: Job, gpu: int) -> None:
        try:
            spec = self.spec(job)
        except FileNotFoundError as err:
            _logger.error("%s not started: %s", job.name, err)
            self.record(job, "failed", error=str(err))
            job.proc = None
            return
        os.makedirs(spec["run_dir"], exist_ok=True)
        spec_path = os.path.join(spec["run_dir"], "spec.json")
        with open(spec_path, "w", encoding="utf-8") as handle:
            json.dump(spec, handle, indent=2)
        env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="" if self.args.smoke else str(gpu))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec_path]
        log = open(os.path.join(spec["run_dir"], "worker.log"), "w", encoding="utf-8")
        job.proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        log.close()
        job.gpu, job.started = gpu, time.perf_counter()
        _logger.info("started %s on GPU %d (estimate %.0f s, %.0f s left)", job.name, gpu, job.estimate, self.left())

    def finish(self, job: Job, killed: bool = False, reason: Optional[str] = None) -> Dict[str, Any]:
        path = os.path.join(self.work, "runs", job.name, "result.json")
        result = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}
        wall = time.perf_counter() - job.started
        if killed:
            result.update(_log_stats(os.path.join(self.work, "runs", job.name)))
            status = "killed"
        else:
            status = result.get("status", "failed")
        info = {k: v for k, v in result.items() if k != "status"}
        info.update(gpu=job.gpu, wall_s=round(wall, 1))
        if reason:
            info["reason"] = reason
        self.record(job, status, **info)
        _logger.info("%s %s after %.0f s%s", job.name, status, wall,
                     f": top-1 {result['top1']:.2f}" if result.get("top1") is not None else "")
        return result

    def schedule(self) -> None:
        """Longest first on the GPU that frees first; fit runs after their probes have sized them, each probe
        alone on its GPU (a probe timed beside others that end sooner reads a speed no shared run gets)."""
        fit = [r for r in self.runs if r.kind == "fit"]
        queue = [Job(r, probe=True, estimate=60.0 if not self.args.smoke else 1.0) for r in fit]
        queue += sorted((Job(r, slowdown=self.slowdown, card=self.args.card) for r in self.runs if r.kind != "fit"),
                        key=lambda j: -j.estimate)
        probes_left = {r.name for r in fit}
        probe_results: Dict[str, Dict[str, Any]] = {}
        # --slots runs at a time on each GPU, spread over the GPUs first
        free = [gpu for _ in range(self.args.slots) for gpu in range(self.args.gpus)]
        running: List[Job] = []
        checked = time.perf_counter()
        while queue or running:
            if time.perf_counter() - checked >= (0.5 if self.args.smoke else 10.0):
                checked = time.perf_counter()
                for job in self._stop_overrunning(running):
                    running.remove(job)
                    free.append(job.gpu)
                    self._occupancy_changed(job.gpu, running)
            for job in list(running):
                if job.proc.poll() is not None:
                    running.remove(job)
                    free.append(job.gpu)
                    self._occupancy_changed(job.gpu, running)
                    result = self.finish(job)
                    if job.probe:
                        probe_results[job.run.name] = result
                        probes_left.discard(job.run.name)
                        if not probes_left:
                            queue = self._sized(fit, probe_results) + queue
            if self.left() <= 0:
                for job in running:
                    _logger.warning("%s stopped at the budget (%.0f s)", job.name, self.args.budget_s)
                    _stop(job.proc)
                    self.finish(job, killed=True)
                running = []
                for job in queue:
                    self.record(job, "skipped", reason="the budget ran out before it could start")
                queue = []
                break
            while free and queue:
                gpu = _pick_gpu(queue[0], free, running)
                if gpu is None:
                    break
                job = queue.pop(0)
                if job.estimate > self.left():
                    _logger.warning("%s not started: about %.0f s needed, %.0f s left", job.name, job.estimate,
                                    self.left())
                    self.record(job, "skipped", reason=f"estimated {job.estimate:.0f} s, {self.left():.0f} s left")
                    continue
                free.remove(gpu)
                self.launch(job, gpu)
                if job.proc is None:
                    free.insert(0, gpu)
                else:
                    self._occupancy_changed(gpu, running)
                    running.append(job)
            time.sleep(0.2 if self.args.smoke else 1.0)

    def _projection(self, job: Job) -> Optional[float]:
        """Seconds past the budget at which ``job`` would end (> 0: it cannot finish), or None (no estimate yet).

        The epochs left are timed at the median of the epochs logged since its GPU's occupancy last changed
        (a run started or ended there, which changes every co-runner's speed), once at least one such epoch
        exists and two in all (the first holds the start-up and the kernels' compilation).
        """
        if job.probe or job.run.kind not in ("train", "finetune", "fit"):
            return None
        records = _epochs(self._run_dir(job))
        done = len(records)
        recent = records[max(1, job.epochs_at_change):]
        if done < 2 or done >= job.run.epochs or not recent:
            return None
        epoch_s = statistics.median(r["epoch_time_s"] for r in recent)
        elapsed = time.perf_counter() - job.started
        # the epochs left and the final evaluation, inference timing and export; the start-up is behind it
        projected = elapsed + (job.run.epochs - done) * epoch_s + FINAL_S
        return projected - (elapsed + self.left())

    def _stop_overrunning(self, running: List[Job]) -> List[Job]:
        """On each GPU, stop the running job projected furthest past the budget, if any (one at a time: the
        others speed up once it is gone, so they are judged again on their next epochs)."""
        stopped = []
        for gpu in sorted({j.gpu for j in running}):
            over = [(p, j) for j in running if j.gpu == gpu for p in [self._projection(j)] if p is not None and p > 0]
            if not over:
                continue
            past, job = max(over, key=lambda item: item[0])
            done = len(_epochs(self._run_dir(job)))
            reason = (f"stopped after {done} of {job.run.epochs} epochs: projected to end {past:.0f} s after "
                      f"the budget ({self.args.budget_s:.0f} s)")
            _logger.warning("%s %s", job.name, reason)
            _stop(job.proc)
            self.finish(job, killed=True, reason=reason)
            stopped.append(job)
        return stopped

    def _occupancy_changed(self, gpu: Optional[int], running: Sequence[Job]) -> None:
        for job in running:
            if job.gpu == gpu:
                job.epochs_at_change = len(_epochs(self._run_dir(job)))

    def _run_dir(self, job: Job) -> str:
        return os.path.join(self.work, "runs", job.name)

    def _sized(self, fit: Sequence[plan_mod.Run], probes: Dict[str, Dict[str, Any]]) -> List[Job]:
        """One training subset for every fit run: the largest with which the fit runs that share a GPU end in
        the time left.

        Each probe ran alone, so it gives its run's own speed (training and test images/s). Runs sharing a
        GPU take the sum of their own times: one after another (``--slots 1``, the single-GPU plan's long
        call, where each run's measured speed is then its own too), or side by side, where at 3,137 tokens
        the kernels fill the GPU and it time-slices between the processes (any gain is margin; probes timed
        side by side had read speeds that three shared runs never reached, RESULTS.md's long sequences).
        A GPU with ``n`` of them ends after ``epochs x images x sum(1 / rate)`` of training, the sum of their
        evaluations (each ``EVAL_EVERY``-th epoch's and the last, the final evaluation of the checkpoint, the
        inference timing) and their start-ups (``OVERHEAD_S`` each, with the final evaluation's model build,
        FLOPs and export). With several GPUs the worst placement counts: the ``ceil(n / gpus)`` slowest runs
        on one GPU. The jobs keep the group's order (its baseline first), not the longest first: one at a
        time, a run that cannot start at the end is then not the baseline.
        """
        ok = [probes[r.name] for r in fit if probes.get(r.name, {}).get("status") == "ok"]
        jobs = []
        if len(ok) < len(fit):
            for run in fit:
                if probes.get(run.name, {}).get("status") != "ok":
                    self.record(Job(run), "skipped", reason="its probe failed")
            fit = [r for r in fit if probes.get(r.name, {}).get("status") == "ok"]
        if not fit:
            return jobs
        epochs = fit[0].epochs
        passes = math.ceil(epochs / plan_mod.EVAL_EVERY) + 1  # the training's evaluations and the final one
        infer = (INFER_WARMUP + INFER_REPS) * INFER_BATCH
        per_image = [epochs / p["train_images_per_s"] for p in ok]
        val_rates = {p["name"]: p["last_record"].get("val_images_per_s") for p in ok}
        evals = [(passes * plan_mod.VAL_IMAGES + infer) / (rate or plan_mod.VAL_SPEED) for rate in val_rates.values()]
        share = math.ceil(len(ok) / max(1, self.args.gpus))
        cost = sum(sorted(per_image, reverse=True)[:share])  # s per training image of the subset, worst GPU
        overhead = 2.0 if self.args.smoke else plan_mod.OVERHEAD_S
        eval_s = sum(sorted(evals, reverse=True)[:share]) + share * overhead
        left = self.left()
        usable = left - eval_s - (0 if self.args.smoke else 20.0)
        unit, cap = (8, 32) if self.args.smoke else (1000, plan_mod.TRAIN_IMAGES)
        images = max(0, min(cap, int(usable / cost // unit * unit)))
        span = images * cost + eval_s
        own_s = [overhead + images * t + e for t, e in zip(per_image, evals)]  # each run's time alone
        self.summary["fit"] = {
            "train_images_per_s": {p["name"]: p["train_images_per_s"] for p in ok},
            "val_images_per_s": val_rates,
            "epochs": epochs, "train_images": images, "left_s": left, "runs_per_gpu": share,
            "estimate_s": span, "model": "runs sharing a GPU take the sum of their own (probed) times"}
        _logger.info("long runs: %d training images x %d epochs, %d to a GPU, all done in about %.0f s of %.0f "
                     "(probed alone: %s images/s)", images, epochs, share, span, left,
                     ", ".join(f"{p['name'].removesuffix('_probe')} {p['train_images_per_s']:.0f}" for p in ok))
        for run, own in zip(fit, own_s):
            job = Job(run, estimate=own)
            if images < unit:
                self.record(job, "skipped", reason=f"not even {unit} training images fit the time left")
                continue
            job.extra = [f"data.max_train_samples={images}"]
            jobs.append(job)
        return jobs

    def pack(self) -> None:
        """runs.tar.gz (small files of every run folder) and the fp16 exports beside it."""
        exports = {}
        for run in self.runs:
            src = os.path.join(self.work, "runs", run.name, "model_fp16.pth")
            if run.export and os.path.isfile(src):
                dst = os.path.join(self.args.out, f"{plan_mod.unseeded(run.name)}_fp16.pth")
                shutil.copyfile(src, dst)
                exports[run.name] = os.path.basename(dst)
        self.summary["exports"] = exports
        with tarfile.open(os.path.join(self.args.out, "runs.tar.gz"), "w:gz") as tar:
            for root, dirs, files in os.walk(os.path.join(self.work, "runs")):
                dirs[:] = sorted(d for d in dirs if d not in ("wandb", ".hydra"))
                for file in sorted(files):
                    if file.endswith(PACKED):
                        path = os.path.join(root, file)
                        _add_portable(tar, path, os.path.relpath(path, self.work), self.work)


def _add_portable(tar: tarfile.TarFile, path: str, arcname: str, work: str) -> None:
    """Add ``path`` to ``tar``; a text file through :func:`_strip_paths`, so the raw logs and configs hold no
    machine path either."""
    if path.endswith(".png"):
        tar.add(path, arcname=arcname)
        return
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        data = _strip_paths(handle.read(), work).encode("utf-8", errors="surrogateescape")
    info = tar.gettarinfo(path, arcname=arcname)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _stop(proc: subprocess.Popen) -> None:
    """End a worker and its data-loader children (its own process group, started by this driver)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _repo_relative(path: str) -> str:
    full = Path(path).resolve()
    try:
        return str(full.relative_to(REPO))
    except ValueError:
        return str(full)


def _gpus() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=f"group(s), comma-separated: {', '.join(plan_mod.GROUPS)}")
    parser.add_argument("--out", help="folder for summary.json, driver.log, runs.tar.gz and the fp16 exports")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST folder (the four *-ubyte.gz files)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use, one run each (default: all visible)")
    parser.add_argument("--slots", type=int, default=1,
                        help="runs at a time on each GPU (default 1; see reproduce_fmnist_plan.SLOWDOWN)")
    parser.add_argument("--slowdown", type=float, default=None,
                        help="how much slower each run is with --slots runs on a GPU (default: the plan's)")
    parser.add_argument("--card", choices=("h100", "h200"), default="h100",
                        help="whose measured speeds estimate each run (reproduce_fmnist_plan.SPEED / SPEED_H200)")
    parser.add_argument("--budget-s", type=float, default=plan_mod.BUDGET_S,
                        help=f"start no run that would end later, stop runs at it (default {plan_mod.BUDGET_S:.0f})")
    parser.add_argument("--shard", default=None, metavar="I/N", help="run the I-th of N balanced parts of the plan")
    parser.add_argument("--only", default=None, metavar="RUN,RUN",
                        help="run only these runs of the plan (comma-separated names)")
    parser.add_argument("--ckpt-dir", default=None, help="folder with the exported NAME_fp16.pth (generalisation)")
    parser.add_argument("--work", default=None, help="folder for run folders and checkpoints (default: temporary)")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic runs on CPU (tests of this driver)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="extra",
                        help="train.py override added to every run, last (repeatable)")
    args = parser.parse_args(argv)
    if args.worker:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        return worker(args.worker)
    if not args.plan or not args.out:
        parser.error("--plan and --out are required")
    try:
        runs = plan_mod.shard(plan_mod.runs_of(args.plan), args.shard)
        if args.only:
            wanted = [n for n in args.only.split(",") if n]
            unknown = sorted(set(wanted) - {r.name for r in runs})
            if unknown or not wanted:
                raise ValueError(f"argument --only: {unknown or args.only!r} not in --plan {args.plan}"
                                 + (f" --shard {args.shard}" if args.shard else "")
                                 + f"; valid: {[r.name for r in runs]}")
            runs = [r for r in runs if r.name in wanted]
    except ValueError as err:
        parser.error(str(err))
    if args.gpus is None:
        args.gpus = _gpus()
    if args.gpus < 1:
        parser.error(f"argument --gpus: must be >= 1, got {args.gpus}")
    if args.slots < 1:
        parser.error(f"argument --slots: must be >= 1, got {args.slots}")
    if args.slowdown is not None and args.slowdown <= 0:
        parser.error(f"argument --slowdown: must be > 0, got {args.slowdown}")
    if args.budget_s <= 0:
        parser.error(f"argument --budget-s: must be > 0, got {args.budget_s}")
    if not args.smoke and (args.data_root is None or not os.path.isdir(args.data_root)):
        parser.error(f"argument --data-root: {args.data_root!r} is not a folder")
    # workers run in the repository: a folder inside it is kept relative, so the recorded commands and the
    # analyses' JSON hold no machine path
    if args.data_root:
        args.data_root = _repo_relative(args.data_root)
    if args.ckpt_dir:
        args.ckpt_dir = _repo_relative(args.ckpt_dir)
    bad = [item for item in args.extra if "=" not in item or item.startswith("=")]
    if bad:
        parser.error(f"argument --set: {bad} are not KEY=VALUE")

    os.makedirs(args.out, exist_ok=True)
    fmt = "%(asctime)s %(name)s: %(message)s"
    root = logging.getLogger()
    handler = logging.FileHandler(os.path.join(args.out, "driver.log"), mode="w")
    handler.setFormatter(logging.Formatter(fmt))
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format=fmt)
    root.addHandler(handler)
    level = root.level
    root.setLevel(min(level, logging.INFO))
    driver = Driver(args, runs)
    try:
        driver.summary["setup"] = {"argv": _portable_argv(sys.argv if argv is None else argv), "plan": args.plan,
                                   "shard": args.shard, "gpus": args.gpus, "slots": args.slots, "card": args.card,
                                   "slowdown": driver.slowdown, "budget_s": args.budget_s,
                                   "recipe": plan_mod.RECIPE, "epochs": plan_mod.EPOCHS,
                                   "runs": [r.name for r in runs]}
        driver.save()
        driver.schedule()
        driver.pack()
        statuses = {name: r["status"] for name, r in driver.summary["runs"].items()}
        driver.summary["not_ok"] = sorted(n for n, s in statuses.items() if s != "ok")
        driver.save()
        _logger.info("done in %.0f s: %d ok, not ok: %s", time.perf_counter() - driver.start,
                     sum(s == "ok" for s in statuses.values()), driver.summary["not_ok"])
        return 0 if not driver.summary["not_ok"] else 1
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


if __name__ == "__main__":
    sys.exit(main())
