"""Training and inference images/s of the Fashion-MNIST reproduction's models, one attention after another, alone.

    python3 scripts/bench_models.py --out results/bench                          # the main table's nine attentions
    python3 scripts/bench_models.py --attentions mita,standard --concurrent 1,2,4 --out results/bench   # GPU sharing
    python3 scripts/bench_models.py --attentions mita,standard --compile --warmup 20 --out results/bench   # torch.compile
    python3 scripts/bench_models.py --cpu-smoke --out /tmp/bm           # tiny CPU run of the pipeline (tests)

Each model is built from train.py's config (``experiment=fmnist_repro`` + the attention's overrides, exactly as
the reproduction's main table in configs/experiment/fmnist_repro/: DeiT-Tiny width and depth, 28 x 28, patch 2
-> 197 tokens) and timed on random batches on the GPU, so the numbers measure the model and not the data loader:

- training: forward + backward + AdamW step under bf16 autocast, batch 256 (the recipe's), CUDA events around
  each step after ``--warmup`` steps, median of ``--steps``;
- inference: forward under ``torch.no_grad()`` and bf16 autocast, batch 256, median of ``--steps``;
- params and multiply-adds of one image (``mita.utils.flops``, as eval.py reports them);
- ``--rounds`` passes over the attentions in alternating order (the first attention timed is otherwise favoured
  or penalised by the card's warm-up), each figure the median over rounds.

Every attention runs in this one process on the same card, so the ratios to ``standard`` are fair; the
training runs of the reproduction share their GPU and host, so their logged images/s are not. Before timing,
each model's forward is checked for finite outputs and its loss for a finite gradient.

``--concurrent 1,2,4``: for each attention, also start that many copies of this script at once on the same GPU
(``--worker``) and sum their training images/s: how much several runs of a multirun gain from sharing one GPU.

Writes ``models.json`` and ``models.csv`` (and ``sharing.json`` with --concurrent) to --out and prints the card,
versions and a table last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from mita.analysis import reproduction as plan_mod
from mita.build import build_model_from_config
from mita.config import compose
from mita.utils.bench import Clock, environment, markdown, write_csv

#: the main table's attentions, by the plan's names
MAIN_ROWS = {name: overrides for name, overrides, _ in plan_mod.MAIN}
SMOKE_OVERRIDES = ["model.img_size=8", "data.img_size=8", "++model.kwargs.embed_dim=16", "++model.kwargs.depth=1",
                   "++model.kwargs.num_heads=2"]


def build(name: str, smoke: bool) -> torch.nn.Module:
    if name not in MAIN_ROWS:
        raise ValueError(f"--attentions: unknown attention {name!r}; valid: {sorted(MAIN_ROWS)}")
    overrides = [*plan_mod.RECIPE, *MAIN_ROWS[name]]
    if smoke:
        overrides += SMOKE_OVERRIDES
        if name.startswith("mita"):
            overrides += ["attention.num_landmarks=4", "attention.topk=4"]
    cfg = compose("train", overrides)
    return build_model_from_config(cfg.model, cfg.attention, load_pretrained=False)


def measure(name: str, *, batch: int, steps: int, warmup: int, smoke: bool, use_compile: bool = False) -> Dict[str, Any]:
    """Training and inference images/s, params and MACs of one attention's model (see the module docstring)."""
    from mita.utils.flops import count_flops

    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    torch.manual_seed(0)
    model = build(name, smoke).to(device)
    size, chans = model.patch_embed.img_size, model.patch_embed.proj.in_channels
    x = torch.randn(batch, chans, *size, device=device)  # [B, C, H, W]
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    params = sum(p.numel() for p in model.parameters())
    macs = count_flops(model.eval(), x[:1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    raw = model
    if use_compile:
        # the warm-up steps hold the compilation; train and eval modes compile once each
        model = torch.compile(model)
    amp = dict(device_type=device.type, dtype=torch.bfloat16)
    clock = Clock(device)

    model.train()
    with torch.autocast(**amp):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grad = torch.stack([p.grad.float().norm() for p in raw.parameters() if p.grad is not None]).norm()
    if not (torch.isfinite(loss) and torch.isfinite(grad)):
        raise RuntimeError(f"{name}: non-finite loss {loss.item()} or gradient norm {grad.item()}")
    opt.zero_grad(set_to_none=True)

    def timed(step) -> float:
        times = []
        for i in range(warmup + steps):
            start = clock.mark()
            step()
            end = clock.mark()
            clock.sync()
            if i >= warmup:
                times.append(clock.ms(start, end))
        return statistics.median(times)

    def train_step() -> None:
        with torch.autocast(**amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer_step() -> None:
        with torch.no_grad(), torch.autocast(**amp):
            model(x)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_ms = timed(train_step)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    model.eval()
    infer_ms = timed(infer_step)
    return {"attention": name, "overrides": " ".join(MAIN_ROWS[name]), "batch": batch, "params": params,
            "gmacs": macs / 1e9, "train_ms": train_ms, "train_images_per_s": batch / train_ms * 1e3,
            "infer_ms": infer_ms, "infer_images_per_s": batch / infer_ms * 1e3, "train_peak_mem_gib": peak,
            "compiled": use_compile}


def sharing(name: str, copies: int, args: argparse.Namespace) -> Dict[str, Any]:
    """``copies`` workers timing ``name``'s training at once on the same GPU: the sum of their images/s."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--cpu-smoke"] if args.cpu_smoke else []) \
        + (["--compile"] if args.compile else [])
    began = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    rows = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"a --concurrent worker for {name} exited with {proc.returncode}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    rates = [r["train_images_per_s"] for r in rows]
    return {"attention": name, "copies": copies, "train_images_per_s_each": rates,
            "train_images_per_s_total": sum(rates), "wall_s": time.perf_counter() - began}


def _names(text: str) -> List[str]:
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in MAIN_ROWS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown attention(s) {bad}; valid: {', '.join(MAIN_ROWS)}")
    return names


def _counts(text: str) -> List[int]:
    try:
        counts = [int(c) for c in text.split(",") if c]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, got {text!r}")
    return counts


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attentions", type=_names, default=list(MAIN_ROWS),
                        help=f"comma-separated, of {', '.join(MAIN_ROWS)} (default: all)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2,
                        help="passes over the attentions, in alternating order (median over rounds)")
    parser.add_argument("--concurrent", type=_counts, default=None, metavar="N,N,...",
                        help="also time N copies of each attention's training at once on the GPU")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each model (train.py's trainer.compile=true); warm-up holds the compilation")
    parser.add_argument("--out", default=None, help="folder for models.json / models.csv / sharing.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU (tests)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key in ("batch", "steps", "rounds"):
        if getattr(args, key) < 1:
            parser.error(f"argument --{key}: must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        parser.error(f"argument --warmup: must be >= 0, got {args.warmup}")
    if args.cpu_smoke:
        args.batch, args.steps, args.warmup = min(args.batch, 4), min(args.steps, 2), min(args.warmup, 1)
    if args.worker:
        row = measure(args.worker, batch=args.batch, steps=args.steps, warmup=args.warmup, smoke=args.cpu_smoke,
                      use_compile=args.compile)
        print(json.dumps(row))
        return 0
    if not args.out:
        parser.error("--out is required")
    if not torch.cuda.is_available() and not args.cpu_smoke:
        parser.error("no CUDA device: this benchmark times GPU training (use --cpu-smoke for a CPU check)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    env = environment(device)

    # rounds in alternating order, so that no attention always runs first (clocks, caches, allocator warm-up);
    # each attention's figures are the median over rounds of its per-round medians
    rounds: Dict[str, List[Dict[str, Any]]] = {n: [] for n in args.attentions}
    failed = []
    for i in range(args.rounds):
        for name in (args.attentions if i % 2 == 0 else args.attentions[::-1]):
            if name in {f["attention"] for f in failed}:
                continue
            try:
                rounds[name].append(measure(name, batch=args.batch, steps=args.steps, warmup=args.warmup,
                                            smoke=args.cpu_smoke, use_compile=args.compile))
            except Exception as err:  # one broken attention must not hide the others' numbers
                failed.append({"attention": name, "error": f"{type(err).__name__}: {err}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows = []
    for name in args.attentions:
        if not rounds[name] or name in {f["attention"] for f in failed}:
            continue
        row = dict(rounds[name][0])
        for key in ("train_ms", "infer_ms"):
            row[key] = statistics.median(r[key] for r in rounds[name])
            row[f"{key}_rounds"] = [r[key] for r in rounds[name]]
        row["train_images_per_s"] = args.batch / row["train_ms"] * 1e3
        row["infer_images_per_s"] = args.batch / row["infer_ms"] * 1e3
        row["train_peak_mem_gib"] = max((r["train_peak_mem_gib"] or 0.0) for r in rounds[name]) or None
        rows.append(row)
    base = next((r for r in rows if r["attention"] == "standard"), None)
    for r in rows:
        r.update(env)
        if base is not None:
            r["train_vs_standard"] = r["train_images_per_s"] / base["train_images_per_s"]
            r["infer_vs_standard"] = r["infer_images_per_s"] / base["infer_images_per_s"]
    write_csv(out / "models.csv", rows)
    (out / "models.json").write_text(json.dumps({"environment": env, "rows": rows, "failed": failed}, indent=2))

    shared = []
    if args.concurrent:
        shared = [sharing(n, c, args) for n in args.attentions if n not in {f["attention"] for f in failed}
                  for c in args.concurrent]
        (out / "sharing.json").write_text(json.dumps({"environment": env, "rows": shared}, indent=2))

    print(", ".join(f"{k} {v}" for k, v in env.items()))
    ratio = (lambda r, k: f"{r[k]:.2f}x" if k in r else "-")
    print(markdown(["attention", "params (M)", "GMACs", "train img/s", "vs standard", "infer img/s", "vs standard"],
                   [[r["attention"], f"{r['params'] / 1e6:.2f}", f"{r['gmacs']:.3f}", f"{r['train_images_per_s']:,.0f}",
                     ratio(r, "train_vs_standard"), f"{r['infer_images_per_s']:,.0f}", ratio(r, "infer_vs_standard")]
                    for r in rows]))
    for f in failed:
        print(f"FAILED {f['attention']}: {f['error']}")
    if shared:
        print(markdown(["attention", "copies on one GPU", "train img/s (sum)", "each"],
                       [[s["attention"], str(s["copies"]), f"{s['train_images_per_s_total']:,.0f}",
                         ", ".join(f"{x:,.0f}" for x in s["train_images_per_s_each"])] for s in shared]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
