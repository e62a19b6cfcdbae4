"""Training and inference images/s of timm ViTs with MiTA against the same models with softmax attention.

    python3 scripts/bench_vit.py                                   # DeiT-S and DeiT-T, eager and torch.compile
    python3 scripts/bench_vit.py --pairs deit_small --no-compile --steps 20
    python3 scripts/bench_vit.py --pairs deit_tiny --rounds 1 --profile 3   # plus a profile of 3 training steps
    python3 scripts/bench_vit.py --pairs deit_tiny --triton-ops     # also compiled with the short path's kernels traced
    python3 scripts/bench_vit.py --pairs deit_small --cuda-graphs   # also torch.compile(mode="reduce-overhead")
    python3 scripts/bench_vit.py --cpu-smoke                        # tiny CPU run of the pipeline (tests)

Each pair is timm's ``deit_{size}_patch16_224`` (softmax attention through ``F.scaled_dot_product_attention``,
timm's default) and this package's registered ``mita_deit_{size}_patch16_224`` (m = k = 25), built with
``timm.create_model`` (no weights), on random 224 x 224 images and labels on the GPU, batch 256 under bf16
autocast:

- training: forward + cross-entropy + backward + AdamW step, CUDA events around each step after ``--warmup``
  steps, median of ``--steps``;
- inference: forward under ``torch.inference_mode()``, median of ``--steps``;
- eager, then ``torch.compile`` (default mode) unless ``--no-compile``; with ``--triton-ops`` also "traced":
  the MiTA model compiled with ``mita.kernels.TRITON_OPS`` on (inductor launches the short path's kernels
  itself, kernels/small_traced.py), its ratio taken against the compiled softmax model; with ``--cuda-graphs``
  also "graphs": both models under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs: no host launches a
  step), ratio against the softmax model in the same mode;
- ``--rounds`` passes over the models in alternating order, each figure the median over rounds.

Before timing, every model's loss and gradients are checked to be finite. Prints the card, versions and one
table: images/s of each model and MiTA's ratio to softmax attention (the speed issue's bar: >= 0.9x each).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Dict, List

import timm
import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

import mita.models  # noqa: F401  (registers the mita_* timm names)
from mita import kernels
from mita.utils.bench import event_device_us as _device_us

PAIRS = {
    "deit_small": ("deit_small_patch16_224", "mita_deit_small_patch16_224"),
    "deit_tiny": ("deit_tiny_patch16_224", "mita_deit_tiny_patch16_224"),
}


def build(name: str, device, img_size: int) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, img_size=img_size).to(device)


def check_finite(model, x, y) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if not torch.isfinite(loss) or bad:
        raise RuntimeError(f"non-finite loss or gradients ({bad[:3]})")
    model.zero_grad(set_to_none=True)


def time_steps(step, steps: int, warmup: int, device) -> float:
    """Median milliseconds of ``step()`` (CUDA events on a GPU, the host clock on a CPU)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile_steps(label: str, step, steps: int, device, rows: int = 12) -> None:
    """torch.profiler over ``steps`` steps (after the timed ones): wall and GPU-busy milliseconds a step and
    the ops with the most GPU time (CPU time on a CPU), to see where a step goes and whether the host sets
    its pace."""
    import time

    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # GPU busy from the device's own events (kernels, copies, memsets) only: an op's row and a user range
    # carry their kernels' time too, and summing every row counted it twice
    busy = sum(_device_us(e) for e in prof.events() if _on_device(e)) / 1e3 / steps if cuda else 0.0
    print(f"\nprofile {label}: {wall:.2f} ms a step (profiled), GPU busy {busy:.2f} ms ({busy / wall:.0%})",
          flush=True)
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=70), flush=True)
    if cuda:  # where the host's time goes: a step whose GPU is not busy waits on these
        print(f"host side of {label}, ops by self CPU time:", flush=True)
        print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70), flush=True)


def _on_device(event) -> bool:
    return event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def measure(name: str, args, device, mode: str) -> Dict[str, float]:
    """Training and inference images/s of one model in one mode: eager, compile, traced (compiled) or graphs
    (compiled with CUDA graphs)."""
    torch.manual_seed(0)
    model = build(name, device, args.img_size)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    check_finite(model, x, y)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    compiled = mode != "eager"
    graphs = mode == "graphs"
    fwd = torch.compile(model, mode="reduce-overhead") if graphs else torch.compile(model) if compiled else model

    def train_step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are no longer read
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer_step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            fwd(x)

    model.train()
    train_ms = time_steps(train_step, args.steps, args.warmup, device)
    if args.profile:
        profile_steps(f"{name} {mode} training", train_step, args.profile, device)
    model.eval()
    infer_ms = time_steps(infer_step, args.steps, args.warmup, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"train": args.batch / train_ms * 1e3, "infer": args.batch / infer_ms * 1e3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="deit_small,deit_tiny", help="comma list from " + ", ".join(PAIRS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the models in alternating order")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager only")
    parser.add_argument("--triton-ops", action="store_true",
                        help="also time the MiTA models compiled with mita.kernels.TRITON_OPS (mode 'traced')")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time both models under torch.compile(mode='reduce-overhead') (mode 'graphs')")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile STEPS training steps of each model and mode (torch.profiler table)")
    parser.add_argument("--cpu-smoke", action="store_true", help="batch 2, 80 px, one step, eager, on the CPU")
    args = parser.parse_args(argv)
    if args.profile < 0:
        parser.error(f"--profile must be >= 0 training steps, got {args.profile}")
    pairs = [p for p in args.pairs.split(",") if p]
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        parser.error(f"--pairs: unknown {unknown}; choose from {list(PAIRS)}")
    if args.cpu_smoke:
        # 80 px: 5 x 5 patches, as many as the 25 landmarks need
        args.batch, args.img_size, args.steps, args.warmup, args.rounds, args.compile = 2, 80, 1, 0, 1, False
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --cpu-smoke)")
    else:
        device = torch.device("cuda")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"

    modes = (["eager"] + (["compile"] if args.compile else []) + (["traced"] if args.compile and args.triton_ops else [])
             + (["graphs"] if args.compile and args.cuda_graphs else []))
    results: Dict[tuple, List[Dict[str, float]]] = {}
    for rnd in range(args.rounds):
        for pair in pairs:
            names = PAIRS[pair] if rnd % 2 == 0 else PAIRS[pair][::-1]
            for mode in modes:
                for name in names:
                    if mode == "traced" and name == PAIRS[pair][0]:
                        continue  # no MiTA layer: the same as "compile"
                    kernels.TRITON_OPS = mode == "traced"
                    try:
                        r = measure(name, args, device, mode)
                    finally:
                        kernels.TRITON_OPS = False
                    results.setdefault((name, mode), []).append(r)
                    print(f"round {rnd} {name} {mode}: train {r['train']:.0f} img/s, infer {r['infer']:.0f} img/s",
                          flush=True)

    def med(name, mode, key):
        return statistics.median(r[key] for r in results[(name, mode)])

    print(f"\n{card}, torch {torch.__version__}, timm {timm.__version__}, batch {args.batch}, bf16 autocast, "
          f"{args.img_size} px, medians of {args.steps} steps over {args.rounds} rounds")
    print(f"{'model':34s} {'mode':8s} {'train img/s':>12s} {'infer img/s':>12s} {'train x':>8s} {'infer x':>8s}")
    for pair in pairs:
        base, mita = PAIRS[pair]
        for mode in modes:
            base_mode = "compile" if mode == "traced" else mode
            for name in (base, mita) if mode != "traced" else (mita,):
                t, i = med(name, mode, "train"), med(name, mode, "infer")
                tx, ix = t / med(base, base_mode, "train"), i / med(base, base_mode, "infer")
                print(f"{name:34s} {mode:8s} {t:12.0f} {i:12.0f} {tx:8.2f} {ix:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
