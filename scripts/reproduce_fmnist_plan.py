"""The plan of issue 7 (small-scale reproduction on Fashion-MNIST): named groups of runs, each group one device call.

    python3 scripts/reproduce_fmnist_plan.py            # the groups, their runs, estimates and the call list
    python3 scripts/reproduce_fmnist.py --plan main1 --out $OUT --data-root .data/fashion-mnist --gpus 8

The recipe (``configs/experiment/fmnist_repro.yaml``): ``experiment=fmnist`` (DeiT-Tiny width and depth on 28 x 28
images, patch 2 -> 197 tokens, batch 256, AdamW 1e-3, 2 warm-up epochs, cosine, bf16) for **16 epochs**,
evaluated every 4 epochs and after the last.

Why 16 epochs. Measured on one H100 80GB (results/issue4_gpu_check, results/issue6_fmnist): MiTA trains at
2,400-4,200 images/s, standard attention at 5,000-6,400, Agent at 4,200; an evaluation of the 10,000 test
images takes about 1.6 s. A device call may run 600 s; the wheels install and packing leave the driver
``--budget-s 560``. Taking the slowest measurement (MiTA at 2,400 images/s: 25 s an epoch), plus 10% for
8 runs sharing one host, plus 25 s of start-up, final evaluation, FLOPs, inference timing and export:

    MiTA, 16 epochs:  25 + 16 * (60000 / 2400 * 1.1) + 4 * 1.6  = 471 s   (at 4,200 images/s: 282 s)
    MiTA, 18 epochs:  25 + 18 * 27.5 + 5 * 1.6                  = 528 s   (too close to 560 s)
    standard, 16:     25 + 16 * (60000 / 5000 * 1.1) + 4 * 1.6  = 243 s   (two fit one GPU in one call)

so 16 epochs is the longest recipe whose slowest run ends inside one call with a margin; the faster
attentions queue two runs on one GPU. MoBA and top-k attention have no measurement at 197 tokens yet:
they are budgeted at MiTA's speed. The estimates (:data:`SPEED`) decide which runs start: the driver
starts a run only if its estimate ends inside the budget and stops any run still going at the budget.

Long sequences (``configs/experiment/fmnist_repro_long.yaml``): 112 x 112 (3,137 tokens), batch 64,
4 epochs; no speed is known at that length, so the driver first probes each long run for 2 x 20 steps
(images/s and peak memory), then gives all of them the same training subset, the largest that lets the
slowest finish inside the budget (at most 60,000 images).

Groups (8 GPUs each; ``--shard 1/2`` and ``2/2`` split one over two calls of 4 GPUs):

=================  ==========================================================================================
group              runs
=================  ==========================================================================================
``main1``          MiTA, MiTA+DWC, MiTA+DWC+Gate (seeds 0, 1) and standard, linear, Agent-49, standard+DWC
                   (seed 0, two per GPU); exports the fp16 weights of MiTA, standard and Agent seed 0
``main2``          MoBA, top-k (seeds 0, 1), standard, linear, Agent-49, standard+DWC (seed 1), route-only,
                   compress-only
``ablations``      top-2; extractors 1d, random, learned, conv, dwconv, tome; m x k point 9 x 9
``mk1``, ``mk2``   the other 14 points of the m x k training grid (25 x 25 is main1's MiTA seed 0)
``generalisation`` on main1's exports (``--ckpt-dir``): token pruning, experts, routing overlap, the inference
                   (m, k) grid, the 3 x 3 swap matrix, the zero-shot swap of the standard checkpoint to MiTA,
                   3 epochs of fine-tuning it with MiTA and, as control, with standard attention
``long``           112 x 112: standard, MiTA m = k = 100, MiTA m = k = 25 (runs with ``generalisation``)
=================  ==========================================================================================

The whole issue takes **6 calls of nvidia-h100-x8** (main1, main2, ablations, mk1, mk2,
generalisation+long), about 10.5 minutes of device time each with the machine's start; 12 calls of
nvidia-h100-x4 with ``--shard``. RESULTS.md lists them with their commands and carry lists.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Dict, List, Optional, Sequence, Tuple

#: train.py overrides every run of the main recipe starts from
RECIPE = ["experiment=fmnist_repro"]
EPOCHS = 16
EVAL_EVERY = 4
TRAIN_IMAGES = 60000
VAL_IMAGES = 10000
#: training images/s on one H100 (the slowest measured; unmeasured attentions at MiTA's)
SPEED = {"standard": 5000.0, "standard_dwc": 4700.0, "linear": 5000.0, "agent": 4200.0, "mita": 2400.0,
         "mita_dwc": 2300.0, "mita_dwc_gate": 2200.0, "moba": 2400.0, "topk": 2400.0}
VAL_SPEED = 6000.0
#: 8 runs share one host (CPU, PCIe): this much slower than alone
CROWDING = 1.1
#: process start, data, model, first-step compilation, final evaluation, FLOPs, inference timing, export
OVERHEAD_S = 25.0
#: with S runs at a time on one GPU (the driver's --slots), each run is this much slower than alone; S = 1 is
#: alone by definition; other counts are measured by scripts/bench_models.py --concurrent (see SLOWDOWN_NOTE)
SLOWDOWN: Dict[int, float] = {1: 1.0}
SLOWDOWN_NOTE = "not measured yet: S runs on one GPU are assumed S times slower each (no gain from sharing)"
#: what the driver gets of a 600 s call (the rest: installing the wheels, packing, copying back)
BUDGET_S = 560.0
GPUS = 8


@dataclasses.dataclass
class Run:
    """One job of a group: a training run (then its evaluation) or an analysis task on exported weights.

    ``overrides`` are train.py's (after :data:`RECIPE`); ``kind`` is ``train`` (train.py + eval.py),
    ``finetune`` (zero-shot eval of ``ckpt`` with the run's attention, then training from it), ``fit``
    (a long run: probed, then trained on a subset sized to the budget) or an analysis: ``figures``,
    ``mk_grid``, ``swap``. ``ckpts`` names exported weights in ``--ckpt-dir``; ``export`` asks for this
    run's fp16 weights in --out (for a later call).
    """

    name: str
    overrides: List[str] = dataclasses.field(default_factory=list)
    seed: int = 0
    kind: str = "train"
    speed_key: str = "mita"
    epochs: int = EPOCHS
    export: bool = False
    ckpts: Tuple[str, ...] = ()
    estimate_s: Optional[float] = None

    def estimate(self) -> float:
        """Seconds on one H100 with 8 runs on the host (see the module docstring)."""
        if self.estimate_s is not None:
            return self.estimate_s
        epoch = TRAIN_IMAGES / SPEED[self.speed_key] * CROWDING
        evals = math.ceil(self.epochs / EVAL_EVERY) * VAL_IMAGES / VAL_SPEED
        return OVERHEAD_S + self.epochs * epoch + evals


KINDS = ("train", "finetune", "fit", "figures", "mk_grid", "swap")

#: the main table's attentions: (name, train.py overrides, speed key)
MAIN = [
    ("standard", ["attention=standard"], "standard"),
    ("agent49", ["attention=agent"], "agent"),
    ("moba", ["attention=moba"], "moba"),
    ("topk50", ["attention=topk"], "topk"),
    ("linear", ["attention=linear"], "linear"),
    ("mita", ["attention=mita"], "mita"),
    ("mita_dwc", ["attention=mita_dwc"], "mita_dwc"),
    ("mita_dwc_gate", ["attention=mita_dwc_gate"], "mita_dwc_gate"),
    ("standard_dwc", ["attention=standard", "attention.dwc=true", "attention.tag=standard_dwc"], "standard_dwc"),
]
#: the checkpoints main1 exports (fp16, weights only) for the generalisation group
EXPORTS = ("mita", "standard", "agent49")
MK_VALUES = (9, 16, 25, 36)
POOLS = ("1d", "random", "learned", "conv", "dwconv", "tome")


def _main(name: str, seed: int) -> Run:
    row = {n: (o, s) for n, o, s in MAIN}[name]
    return Run(f"{name}_s{seed}", list(row[0]), seed=seed, speed_key=row[1], export=seed == 0 and name in EXPORTS)


def _mk(m: int, k: int) -> Run:
    return Run(f"mk_m{m}_k{k}", ["attention=mita", f"attention.num_landmarks={m}", f"attention.topk={k}"])


def _groups() -> Dict[str, List[Run]]:
    mk_points = [(m, k) for m in MK_VALUES for k in MK_VALUES if (m, k) != (25, 25)]
    groups = {
        "main1": [_main(n, s) for n in ("mita", "mita_dwc", "mita_dwc_gate") for s in (0, 1)]
        + [_main(n, 0) for n in ("standard", "linear", "agent49", "standard_dwc")],
        "main2": [_main(n, s) for n in ("moba", "topk50") for s in (0, 1)]
        + [_main(n, 1) for n in ("standard", "linear", "agent49", "standard_dwc")]
        + [Run("route_only", ["attention=mita_route_only"]),
           Run("compress_only", ["attention=mita_compress_only"])],
        "ablations": [Run("top2", ["attention=mita_top2"])]
        + [Run(f"pool_{p}", ["attention=mita", f"attention.pool={p}", f"attention.tag=mita_{p}"]) for p in POOLS]
        + [_mk(*mk_points[0])],
        "mk1": [_mk(*p) for p in mk_points[1:9]],
        "mk2": [_mk(*p) for p in mk_points[9:]],
        "generalisation": [
            Run("figures", kind="figures", ckpts=("mita",), estimate_s=90.0),
            Run("mk_grid", kind="mk_grid", ckpts=("mita",), estimate_s=150.0),
            Run("swap", kind="swap", ckpts=("mita", "standard", "agent49"), estimate_s=90.0),
            Run("finetune_std_to_mita", ["attention=mita", "optim.lr=2.5e-4", "sched.warmup_epochs=0"],
                kind="finetune", ckpts=("standard",), epochs=3),
            Run("finetune_std_to_std", ["attention=standard", "optim.lr=2.5e-4", "sched.warmup_epochs=0"],
                kind="finetune", ckpts=("standard",), epochs=3, speed_key="standard"),
        ],
        "long": [
            Run("long_standard", ["experiment=fmnist_repro_long", "attention=standard"], kind="fit", epochs=4),
            Run("long_mita_m100", ["experiment=fmnist_repro_long", "attention=mita", "attention.num_landmarks=100",
                                   "attention.topk=100"], kind="fit", epochs=4),
            Run("long_mita_m25", ["experiment=fmnist_repro_long", "attention=mita"], kind="fit", epochs=4),
        ],
        # CPU tests of the driver (tests/test_repro.py): tiny synthetic runs; one can never fit its budget
        "smoke": [
            Run("smoke_mita", ["attention=mita"], epochs=1, estimate_s=1.0, export=True),
            Run("smoke_standard", ["attention=standard"], seed=1, epochs=1, estimate_s=1.0, export=True),
            Run("smoke_too_long", ["attention=standard"], epochs=1, estimate_s=1e6),
        ],
        "smoke_analysis": [
            Run("smoke_figures", kind="figures", ckpts=("smoke_mita",), estimate_s=1.0),
            Run("smoke_mk_grid", kind="mk_grid", ckpts=("smoke_mita",), estimate_s=1.0),
            Run("smoke_swap", kind="swap", ckpts=("smoke_mita", "smoke_standard"), estimate_s=1.0),
            Run("smoke_finetune", ["attention=mita"], kind="finetune", ckpts=("smoke_standard",), epochs=1,
                estimate_s=1.0),
        ],
        "smoke_long": [Run("smoke_fit_a", ["attention=standard"], kind="fit", epochs=1),
                       Run("smoke_fit_b", ["attention=mita"], kind="fit", epochs=1)],
    }
    return groups


GROUPS: Dict[str, List[Run]] = _groups()
#: the device calls, in order: (groups, what the call needs carried besides the data and wheels)
CALLS: List[Tuple[str, str]] = [
    ("main1", ""), ("main2", ""), ("ablations", ""), ("mk1", ""), ("mk2", ""),
    ("generalisation,long", "main1's three *_fp16.pth in --ckpt-dir"),
]


def slowdown(slots: int) -> float:
    """How much slower each of ``slots`` runs sharing one GPU is than one run alone (:data:`SLOWDOWN`)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if slots in SLOWDOWN:
        return SLOWDOWN[slots]
    # between measured counts, the next smaller one's per-run slowdown scaled by the extra runs (no gain)
    known = max(s for s in SLOWDOWN if s <= slots)
    return SLOWDOWN[known] * slots / known


def runs_of(plan: str) -> List[Run]:
    """The runs of ``plan``: one group name or several joined by commas (one call)."""
    runs: List[Run] = []
    for name in plan.split(","):
        if name not in GROUPS:
            raise ValueError(f"--plan: unknown group {name!r}; valid: {sorted(GROUPS)}")
        runs.extend(GROUPS[name])
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"--plan {plan!r}: a run appears twice")
    return runs


def shard(runs: Sequence[Run], spec: Optional[str]) -> List[Run]:
    """``spec`` "i/n": the i-th of n parts, balanced by estimate (longest first, to the lightest part)."""
    if not spec:
        return list(runs)
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be I/N with 1 <= I <= N, got {spec!r}") from None
    if not 1 <= i <= n:
        raise ValueError(f"--shard must be I/N with 1 <= I <= N, got {spec!r}")
    parts: List[List[Run]] = [[] for _ in range(n)]
    for run in sorted(runs, key=lambda r: -r.estimate()):
        min(parts, key=lambda p: sum(r.estimate() for r in p)).append(run)
    return parts[i - 1]


def makespan(runs: Sequence[Run], gpus: int) -> float:
    """Estimated end of the last run when each GPU takes the longest waiting run as it frees (the driver's order)."""
    free = [0.0] * gpus
    for run in sorted(runs, key=lambda r: -r.estimate()):
        j = min(range(gpus), key=free.__getitem__)
        free[j] += run.estimate()
    return max(free) if runs else 0.0


def describe() -> str:
    lines = [f"recipe: {' '.join(RECIPE)} ({EPOCHS} epochs), budget {BUDGET_S:.0f} s a call, {GPUS} GPUs", ""]
    for name, runs in GROUPS.items():
        if name.startswith("smoke"):
            continue
        span = "probed" if any(r.kind == "fit" for r in runs) else f"{makespan(runs, GPUS):.0f} s"
        lines.append(f"{name}: {len(runs)} runs, estimated makespan on {GPUS} GPUs {span}")
        lines += [f"  {r.name:24s} {r.kind:9s} seed {r.seed}  ~{r.estimate():.0f} s  {' '.join(r.overrides)}"
                  + ("  [exports fp16]" if r.export else "") for r in runs]
    lines += ["", f"{len(CALLS)} device calls (nvidia-h100-x8):"]
    lines += [f"  {i + 1}. --plan {plan}" + (f"  (needs {need})" if need else "") for i, (plan, need) in
              enumerate(CALLS)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(describe() + "\n")
