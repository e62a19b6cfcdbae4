"""The plan of issue 7 (small-scale reproduction on Fashion-MNIST): named groups of runs, and the device calls.

    python3 scripts/reproduce_fmnist_plan.py            # the groups, their runs, estimates and the 8-GPU call list
    python3 scripts/reproduce_fmnist_plan.py --single-gpu --done results/issue7_*/summary.json   # one H200 a call
    python3 scripts/reproduce_fmnist.py --plan main1 --out $OUT --data-root .data/fashion-mnist --gpus 8
    python3 scripts/reproduce_fmnist.py --plan main1 --only mita_s1,route_only --slots 2 --card h200 \
        --budget-s 570 --out $OUT --data-root .data/fashion-mnist              # one call of the single-GPU plan

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
4 epochs; no speed is known at that length, so the driver first probes each long run alone for 2 x 20
steps (images/s and peak memory), then gives all of them the same training subset, the largest with which
the runs sharing a GPU, each taking its own probed time, end inside the budget (at most 60,000 images).

Groups (8 GPUs each; ``--shard 1/2`` and ``2/2`` split one over two calls of 4 GPUs):

=================  ==========================================================================================
group              runs
=================  ==========================================================================================
``main1``          MiTA, MiTA+DWC, MiTA+DWC+Gate (seeds 0, 1) and standard, linear, Agent-49, standard+DWC
                   (seed 0, two per GPU); exports the fp16 weights of MiTA, standard and Agent seed 0
``main2``          MoBA, top-k (seeds 0, 1), standard, linear, Agent-49, standard+DWC (seed 1), route-only,
                   compress-only
``ablations``      top-2; extractors 1d, random, learned, conv, dwconv, tome; m x k point 9 x 9
``mk1``, ``mk2``   the other 15 points of the m x k training grid (25 x 25 is main1's MiTA seed 0); mk2 also
                   36 x 36 with seed 1 (``MK_SEED1``)
``generalisation`` on main1's exports (``--ckpt-dir``): token pruning, experts, routing overlap, the inference
                   (m, k) grid, the 3 x 3 swap matrix, the zero-shot swap of the standard checkpoint to MiTA,
                   3 epochs of fine-tuning it with MiTA and, as control, with standard attention
``long``           112 x 112: standard, MiTA m = k = 100, MiTA m = k = 25 (runs with ``generalisation``)
=================  ==========================================================================================

Single-GPU plan (:func:`single_gpu_calls`, what is lent now: one H200 a call, 30 minutes of device time a
session). On one H200, MiTA's training loop runs at 2,700 images/s alone, 16 epochs in about 390 s; two runs
share the GPU at 1.25x the time each (:data:`SLOWDOWN`, measured), so a call of :data:`BUDGET_1GPU_S` holds two
MiTA-speed runs (MiTA + DWC + Gate took 404 s alone). The long-sequence runs come first (one probed call),
then the training runs, main table first, other ablations next, the m x k grid last (:func:`_tier`), longest
first within each; while a generalisation job is not done, the runs whose fp16 weights it reads
(:data:`EXPORT_RUNS`) and the group take calls of one session (the weights live only as long as the session).
:func:`sessions` groups the calls into sessions of 30 minutes of device time, each call following the last while
the machine is still warm. ``--done`` leaves out runs that earlier calls' summaries hold as ok: after
2026-12-02's calls (the main table, the generalisation and long groups, top-2 and three landmark extractors
done), 9 calls in 3 sessions; where a session's calls leave time, the next session's longest run may go alone
(:func:`spare_run`).

The 8-GPU plan: the whole issue takes **6 calls of nvidia-h100-x8** (main1, main2, ablations, mk1, mk2,
generalisation+long), about 10.5 minutes of device time each with the machine's start; 12 calls of
nvidia-h100-x4 with ``--shard``. RESULTS.md lists them with their commands and carry lists.
"""
from __future__ import annotations

import dataclasses
import math
import re
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
         "mita_dwc": 2300.0, "mita_dwc_gate": 2200.0, "moba": 2400.0, "topk": 2400.0, "mita_tome": 2100.0}
#: training images/s of one run alone on one H200 (the single-GPU plan, :func:`single_gpu_calls`): train.py's own
#: loop where a run measured it, else scaled from a measured attention by scripts/bench_models.py's training
#: speeds on the same card (results/issue7_bench/models_h200_rounds.json). Measured: MiTA 2,701 images/s alone
#: (results/issue7_h200_1201b, second epoch); MiTA + DWC + Gate 2,600 alone (median epoch of 1201e and 1201f,
#: 404 s and 392 s for 16 epochs); Agent 3,770 and standard + DWC 3,350 beside each other (1201d), times
#: SLOWDOWN[2]; linear 2,530 beside standard (1201a). MiTA + DWC trains as fast as + Gate in the benchmark
#: (2,800 images/s each), so it takes that figure. MiTA with token-merging landmarks (``mita_tome``) trained
#: 31.2 s an epoch beside another MiTA run where the conv extractor took 27.1 (results/issue7_h200_1202r and
#: 1202q): 0.87x MiTA's speed, on both cards. Estimates for scheduling, not results.
SPEED_H200 = {"mita": 2700.0, "mita_dwc": 2600.0, "mita_dwc_gate": 2600.0, "standard": 4850.0,
              "standard_dwc": 4200.0, "agent": 4700.0, "moba": 4100.0, "topk": 3400.0, "linear": 3100.0,
              "mita_tome": 2350.0}
VAL_SPEED = 6000.0
#: 8 runs share one host (CPU, PCIe): this much slower than alone
CROWDING = 1.1
#: process start, data, model, first-step compilation, final evaluation, FLOPs, inference timing, export
OVERHEAD_S = 25.0
#: with S runs at a time on one GPU (the driver's --slots), each run is this much slower than alone. Measured
#: on an H200 by scripts/bench_models.py --concurrent 2,4 for MiTA (results/issue7_bench/sharing_h200.json:
#: 2,711 images/s alone, 2,140 and 2,239 each of 2, 1,123-2,066 each of 4), and borne out by train.py's loop
#: (22.2 s an epoch alone, 27.2 s beside a standard run: 1.23x). Counts between are scaled (:func:`slowdown`).
SLOWDOWN: Dict[int, float] = {1: 1.0, 2: 1.25, 4: 1.8}
#: what the driver gets of a 600 s call on a single-GPU machine (wheels, packing and copying back take the rest)
BUDGET_1GPU_S = 570.0
#: the share of the budget a call of several runs is packed to (a run alone may use all of it)
SHARED_MARGIN = 0.95
#: runs at a time on the one GPU of the single-GPU plan
SLOTS_1GPU = 2
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

    def estimate(self, card: str = "h100") -> float:
        """Seconds alone on one GPU: an H100 with 8 runs on its host (the module docstring), or an H200."""
        if self.estimate_s is not None:
            return self.estimate_s
        if card not in ("h100", "h200"):
            raise ValueError(f"card must be 'h100' or 'h200', got {card!r}")
        epoch = TRAIN_IMAGES / SPEED[self.speed_key] * CROWDING if card == "h100" else \
            TRAIN_IMAGES / SPEED_H200[self.speed_key]
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
#: the runs whose fp16 weights (weights only) the generalisation group reads, as ``<attention>_fp16.pth``;
#: standard's seed 1, since the seed-0 run was made before this list and its export did not outlive its session
EXPORT_RUNS = ("mita_s0", "agent49_s0", "standard_s1")


def unseeded(name: str) -> str:
    """A run's name without its ``_sN`` seed suffix: ``mita_dwc_s1`` -> ``mita_dwc``; other names unchanged."""
    return re.sub(r"_s[0-9]+$", "", name)


EXPORTS = tuple(unseeded(name) for name in EXPORT_RUNS)
MK_VALUES = (9, 16, 25, 36)
#: grid points run again with seed 1: the corner 36 x 36, the grid's best seed-0 point by 1.0 (more than MiTA's
#: seed spread), checked before it is read as matching standard attention
MK_SEED1 = ((36, 36),)
POOLS = ("1d", "random", "learned", "conv", "dwconv", "tome")


def _main(name: str, seed: int) -> Run:
    row = {n: (o, s) for n, o, s in MAIN}[name]
    return Run(f"{name}_s{seed}", list(row[0]), seed=seed, speed_key=row[1], export=f"{name}_s{seed}" in EXPORT_RUNS)


def mk_name(m: int, k: int, seed: int = 0) -> str:
    """The run name of m x k grid point (m, k): ``mk_m36_k36``, with ``_sN`` for a seed other than 0."""
    return f"mk_m{m}_k{k}" + (f"_s{seed}" if seed else "")


def _mk(m: int, k: int, seed: int = 0) -> Run:
    return Run(mk_name(m, k, seed), ["attention=mita", f"attention.num_landmarks={m}", f"attention.topk={k}"],
               seed=seed)


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
        + [Run(f"pool_{p}", ["attention=mita", f"attention.pool={p}", f"attention.tag=mita_{p}"],
               speed_key="mita_tome" if p == "tome" else "mita") for p in POOLS]
        + [_mk(*mk_points[0])],
        "mk1": [_mk(*p) for p in mk_points[1:9]],
        "mk2": [_mk(*p) for p in mk_points[9:]] + [_mk(m, k, seed=1) for m, k in MK_SEED1],
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


@dataclasses.dataclass
class Call:
    """One device call of the single-GPU plan: these runs, ``slots`` at a time, inside ``budget_s``."""

    runs: List[Run]
    slots: int
    budget_s: float = BUDGET_1GPU_S

    def span(self) -> float:
        """Estimated end of its last run on one H200 (the driver's longest-first order, shared-GPU slowdown)."""
        return makespan(self.runs, self.slots, card="h200") * slowdown(self.slots)

    def probed(self) -> bool:
        """Whether the call holds a long-sequence (``fit``) run, which the driver probes and sizes to the budget."""
        return any(r.kind == "fit" for r in self.runs)

    def command(self, budget: Optional[str] = None) -> str:
        """The driver's arguments for this call; ``budget`` stands in for ``--budget-s``'s value if given."""
        groups = sorted({g for g, runs in GROUPS.items() for r in runs if r in self.runs and not g.startswith("smoke")},
                        key=list(GROUPS).index)
        ckpts = " --ckpt-dir .ckpt/issue7" if any(r.ckpts for r in self.runs) else ""
        return (f"--plan {','.join(groups)} --only {','.join(r.name for r in self.runs)} --slots {self.slots} "
                f"--card h200 --budget-s {budget or f'{self.budget_s:.0f}'}{ckpts}")


#: the stage of the single-GPU plan that makes the exports and reads them: one session holds all of it
EXPORT_STAGE = "exports then generalisation"
#: the groups the single-GPU plan packs freely; ``generalisation`` and ``long`` get calls of their own
PACKED_GROUPS = ("main1", "main2", "ablations", "mk1", "mk2")


MAIN_NAMES = frozenset(name for name, _, _ in MAIN)


def _tier(run: "Run") -> int:
    """The order in which the single-GPU plan packs the training runs: the main table's seeds, then the other
    ablations, then the m x k grid (each tier may fill the room the one before left in its calls)."""
    if unseeded(run.name) in MAIN_NAMES:
        return 0
    return 2 if run.name.startswith("mk_") else 1


def single_gpu_calls(done: Sequence[str] = (), slots: int = SLOTS_1GPU,
                     budget_s: float = BUDGET_1GPU_S) -> List[Tuple[str, List[Call]]]:
    """The plan for machines of one H200: ``(stage, calls)`` in order, leaving out the runs named in ``done``.

    ``long``: the long-sequence runs not done, in one call, one run at a time (probed, then sized to the
    budget; alone, each run's s / epoch and images/s are its own, and the probes' speeds hold); first, as
    the only item of the issue that no call has measured yet. ``train``: every training run of
    :data:`PACKED_GROUPS` not done and not made by the exports stage, packed by :func:`_tier` (main table, other
    ablations, m x k grid), longest first within a tier, into the first call whose estimated span stays inside
    ``budget_s`` (a run too long to share the GPU gets a call of its own). ``exports then generalisation``,
    while a generalisation job is not done: the runs of :data:`EXPORT_RUNS` whose fp16 weights those jobs read
    (made again even if done: the weights do not outlive a session), then those jobs on them
    (``--ckpt-dir``), in ONE session.
    """
    done = set(done)
    generalisation = [r for r in GROUPS["generalisation"] if r.name not in done]
    needed = {c for r in generalisation for c in r.ckpts}
    exports = [r for g in PACKED_GROUPS for r in GROUPS[g]
               if r.name in EXPORT_RUNS and unseeded(r.name) in needed]
    made = {r.name for r in exports}
    runs = [r for g in PACKED_GROUPS for r in GROUPS[g] if r.name not in done and r.name not in made]

    def pack(items: Sequence[Run], calls: List[Call]) -> List[Call]:
        for run in sorted(items, key=lambda r: (_tier(r), -r.estimate("h200"))):
            for call in calls:
                # shared calls keep 5% of the budget in hand: the estimates are estimates
                if Call([*call.runs, run], call.slots, budget_s).span() <= SHARED_MARGIN * budget_s:
                    call.runs.append(run)
                    break
            else:
                call = Call([run], slots, budget_s)
                if call.span() > SHARED_MARGIN * budget_s:
                    call = Call([run], 1, budget_s)
                if call.span() > budget_s:
                    raise ValueError(f"{run.name}: estimated {call.span():.0f} s alone on one H200, over the "
                                     f"{budget_s:.0f} s of a call")
                calls.append(call)
        return calls

    # the exporting calls first, then the other runs, which fill what room those calls leave before new calls
    export_calls = pack(exports, [])
    train_calls = pack(runs, list(export_calls))[len(export_calls):]
    long = [r for r in GROUPS["long"] if r.name not in done]
    stages = [("long", [Call(long, 1, budget_s)] if long else []), ("train", train_calls)]
    if generalisation:
        stages.append((EXPORT_STAGE, export_calls + [Call(generalisation, slots, budget_s)]))
    return [(name, calls) for name, calls in stages if calls]


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


def makespan(runs: Sequence[Run], gpus: int, card: str = "h100") -> float:
    """Estimated end of the last run when each GPU takes the longest waiting run as it frees (the driver's order)."""
    free = [0.0] * gpus
    for run in sorted(runs, key=lambda r: -r.estimate(card)):
        j = min(range(gpus), key=free.__getitem__)
        free[j] += run.estimate(card)
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


def done_runs(paths: Sequence[str]) -> List[str]:
    """Names of the runs with status ok in the driver's summary.json files at ``paths``."""
    import json

    names = set()
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            runs = json.load(handle).get("runs", {})
        names |= {name for name, entry in runs.items() if entry.get("status") == "ok"}
    return sorted(names)


#: a developer session's device time, a machine's start, and what a call holds the machine beyond its driver's
#: span (wheels, transfers); measured 2026-12-01: a call of 518 s held 557 s with the start, the next 424 s for 412
SESSION_DEVICE_S = 1800.0
START_S = 60.0
CALL_OVERHEAD_S = 15.0


def _device_s(call: Call) -> float:
    """Device seconds a call holds the machine: a probed (long-sequence) call uses its whole budget."""
    span = call.budget_s if call.probed() else call.span()
    return span + CALL_OVERHEAD_S


def sessions(stages: Sequence[Tuple[str, List[Call]]],
             session_s: float = SESSION_DEVICE_S) -> List[List[Tuple[int, str, Call]]]:
    """The calls of ``stages`` in sessions of ``session_s`` device seconds, each beginning with a machine's start
    and sending its calls back to back while the machine is warm; calls numbered from 1 in the order to send them.

    :data:`EXPORT_STAGE` is kept whole in one session (its weights do not outlive it); where it does not
    fit in what is left of a session, the calls after it that do fit go first. Sessions are packed to
    :data:`SHARED_MARGIN` of ``session_s``: the estimates are estimates, and a session's device time ends hard.
    """
    limit = SHARED_MARGIN * session_s
    units: List[List[Tuple[str, Call]]] = []
    for stage, calls in stages:
        if stage == EXPORT_STAGE:
            units.append([(stage, c) for c in calls])
        else:
            units.extend([[(stage, c)] for c in calls])
    cost = [sum(_device_s(c) for _, c in unit) for unit in units]
    for i, unit in enumerate(units):
        if START_S + cost[i] > limit:
            raise ValueError(f"{unit[0][1].command()}: about {START_S + cost[i]:.0f} s of device time, over the "
                             f"{limit:.0f} s a session is packed to")
    out: List[List[Tuple[int, str, Call]]] = []
    used, number, pending = limit, 0, list(range(len(units)))
    while pending:
        # only a stage kept whole may be overtaken; a plain call that does not fit starts a new session
        candidates = pending if len(units[pending[0]]) > 1 else pending[:1]
        pick = next((i for i in candidates if used + cost[i] <= limit), None)
        if pick is None:
            out.append([])
            used = START_S
            continue
        pending.remove(pick)
        for stage, call in units[pick]:
            number += 1
            out[-1].append((number, stage, call))
        used += cost[pick]
    return out


#: what a run sent alone into a session's spare time keeps in hand: its ``--budget-s`` is the device time left
#: less this (the wheels, packing and copying back), and the driver starts it only if its estimate fits the budget
SPARE_MARGIN_S = 45.0


def spare_run(following: List[Tuple[int, str, Call]]) -> Optional[Tuple[float, Run]]:
    """The run of the first call of ``following`` (the next session) that may go alone at the end of a session
    whose calls ran faster than estimated, and the device seconds that must be left for it: ``(needed_s, run)``.

    Machines differ by about 17% between sessions, and the estimates are conservative: a session that
    left 477 s after its calls ran compress-only alone in 279 s (2026-12-02). None when that call is not a
    plain training call (the long call sizes itself to its budget, the exports stage must stay whole).
    """
    if not following:
        return None
    _, stage, call = following[0]
    if stage != "train":
        return None
    run = max(call.runs, key=lambda r: r.estimate("h200"))
    return Call([run], 1).span() + SPARE_MARGIN_S, run


def describe_single_gpu(done: Sequence[str] = ()) -> str:
    stages = single_gpu_calls(done)
    total = sum(len(calls) for _, calls in stages)
    grouped = sessions(stages)
    lines = [f"single-GPU plan (nvidia-h200): {total} calls of at most {BUDGET_1GPU_S:.0f} s of driver, "
             f"{SLOTS_1GPU} runs at a time (slowdown {slowdown(SLOTS_1GPU):.2f}x each), in {len(grouped)} sessions "
             f"of {SESSION_DEVICE_S / 60:.0f} minutes of device time; done: {', '.join(done) if done else 'none'}"]
    for index, session in enumerate(grouped, 1):
        held = START_S + sum(_device_s(c) for _, _, c in session)
        lines.append(f"session {index} (~{held:.0f} s of device time):")
        for number, stage, call in session:
            span = "probed" if call.probed() else f"~{call.span():.0f} s"
            lines.append(f"  call {number} [{stage}] ({span}): {call.command()}")
        spare = spare_run(grouped[index] if index < len(grouped) else [])
        if spare is not None:
            needed, run = spare
            alone = Call([run], 1).command(budget="LEFT")
            lines.append(f"  then, if at least {needed:.0f} s of device time are left (lease.budget_left_s), "
                         f"the next session's longest run alone, LEFT = that less {SPARE_MARGIN_S:.0f}: {alone}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Print the plan of issue 7's device calls.")
    parser.add_argument("--single-gpu", action="store_true", help="the plan for one H200 a call (nvidia-h200)")
    parser.add_argument("--done", nargs="*", default=[], metavar="SUMMARY",
                        help="summary.json files of earlier calls: their ok runs are left out")
    cli = parser.parse_args()
    sys.stdout.write((describe_single_gpu(done_runs(cli.done)) if cli.single_gpu else describe()) + "\n")
