"""``python -m mita.analysis FIGURE CKPT ...``: one command per figure of the paper, on a train.py checkpoint.

Every command takes the checkpoint(s), eval.py-style overrides (``data.root=PATH``, ``attention.topk=36``) and
the shared data options, and writes a PNG plus its numbers (JSON and CSV) to ``--out``.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import os
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["COMMANDS", "analysis_parser", "experts", "int_list", "main", "mk_grid", "overlap", "pruning", "run_cli", "swap"]

_OVERRIDE = re.compile(r"^(data|attention)\.[A-Za-z0-9_.]+=")


def int_list(text: str) -> List[int]:
    """``"9,16,25"`` -> [9, 16, 25] (argparse type)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def analysis_parser(doc: str, *, many: bool = False, precision: bool = False,
                    prog: Optional[str] = None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the shared options; ``doc`` (the script's docstring) is its help text.

    Positionals: the checkpoint (``many``: several), then ``data.KEY=VALUE`` / ``attention.KEY=VALUE``
    overrides in any order.
    """
    parser = argparse.ArgumentParser(prog=f"python -m mita.analysis {prog}" if prog else None,
                                     description=inspect.cleandoc(doc),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "inputs", nargs="+", metavar="CKPT|KEY=VALUE",
        help=("checkpoint(s) written by train.py, then overrides as eval.py takes them: data.root=PATH, "
              "data.name=..., attention.topk=36 ..." if not many else
              "checkpoints written by train.py (two or more), then data.KEY=VALUE overrides"),
    )
    parser.add_argument("--out", default=None,
                        help="output folder (default: an 'analysis' folder beside the (first) checkpoint)")
    parser.add_argument("--split", default="val", choices=("val", "train"), help="dataset split (default val)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="use a fixed random subset of this many images (default: the whole split)")
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default 256)")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers (default 0)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto (CUDA if any)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if precision:
        parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                            help="autocast dtype of the evaluations (default fp32, as eval.py)")
    return parser


def split_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace, many: bool) -> None:
    """Set ``args.ckpts`` and ``args.overrides`` from the positionals, ``args.out`` to its default."""
    args.overrides = [item for item in args.inputs if _OVERRIDE.match(item)]
    args.ckpts = [item for item in args.inputs if not _OVERRIDE.match(item)]
    if not args.ckpts:
        parser.error("argument CKPT: give a checkpoint path")
    if not many and len(args.ckpts) > 1:
        parser.error(f"argument CKPT: one checkpoint expected, got {args.ckpts} (overrides are GROUP.KEY=VALUE)")
    if many and len(args.ckpts) < 2:
        parser.error(f"argument CKPT: two or more checkpoints expected, got {args.ckpts}")
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(args.ckpts[0])), "analysis")
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"argument --max-images: must be >= 1, got {args.max_images}")
    if args.batch_size < 1:
        parser.error(f"argument --batch-size: must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        parser.error(f"argument --num-workers: must be >= 0, got {args.num_workers}")


def run_cli(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
            body: Callable[[argparse.Namespace], object], *, many: bool = False) -> int:
    """Parse ``argv``, run ``body(args)``; bad input (ValueError, missing files) exits 2 with the message."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    split_inputs(parser, args, many)
    try:
        body(args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    return 0


def pruning(argv: Optional[Sequence[str]] = None) -> int:
    """Token pruning (paper Fig. 4): per layer, the key/value positions no routed expert keeps.

        python -m mita.analysis pruning outputs/fmnist/mita_m25_k25/seed0/checkpoint.pth --out outputs/analysis
        python -m mita.analysis pruning CKPT data.root=/path/to/fashion-mnist --images 0,7,42 --layers 0,5,11
        python -m mita.analysis pruning CKPT attention.topk=36 --max-images 2000

    For a few images (--images: indices into the whole split, whatever --max-images), each layer's panel
    shades in red the patches that no routed expert of any head selected among its top-k keys. Over the split
    (or --max-images of it), per layer: the fraction of tokens no expert selected, the fraction not kept by an
    expert that receives a query, the per-head fraction and how often the cls token is selected. Writes
    pruning.png, pruning.json and pruning.csv to --out (default: CKPT's folder/analysis).

    The routing is read through the MiTA modules' routing hook (``capture_routing``/``last_routing``, see
    mita/analysis/__init__.py); the model is rebuilt from the config stored in the checkpoint, as eval.py does,
    and data.KEY=VALUE / attention.KEY=VALUE override it the same way.
    """
    from mita.analysis.pruning import token_pruning

    parser = analysis_parser(pruning.__doc__, prog="pruning")
    parser.add_argument("--images", type=int_list, default=[0, 1, 2, 3],
                        help="dataset indices to draw (default 0,1,2,3)")
    parser.add_argument("--layers", type=int_list, default=None, help="MiTA layers to draw (default all)")
    return run_cli(parser, argv, lambda a: token_pruning(
        a.ckpts[0], a.out, overrides=a.overrides, images=a.images, layers=a.layers, max_images=a.max_images,
        split=a.split, batch_size=a.batch_size, num_workers=a.num_workers, device=a.device,
        progress=not a.no_progress))


def experts(argv: Optional[Sequence[str]] = None) -> int:
    """Deformable experts (paper Fig. 3): a landmark's pooling window, its top-k keys and its routed queries.

        python -m mita.analysis experts outputs/fmnist/mita_m25_k25/seed0/checkpoint.pth --out outputs/analysis
        python -m mita.analysis experts CKPT data.root=/path/to/fashion-mnist --image 7 --layers 0,11 --experts 0,12

    For one image (--image: an index into the whole split) and each chosen layer (--layers, default first, middle and last)
    and landmark (--experts, default a corner, the centre and the opposite corner of the landmark grid): three
    heatmaps over the patch grid, averaged over heads: the landmark's pooling window, the fraction of heads
    whose expert keeps each patch among its top-k keys, and the fraction of heads that route each patch's
    query to it; the window is outlined in cyan on each. Over the split (or --max-images of it), per layer:
    the mean fraction of an expert's keys outside its window, against 1 - |window| / N for random keys.
    Writes experts.png, experts.json and experts.csv to --out (default: CKPT's folder/analysis).

    The routing is read through the MiTA modules' routing hook (``capture_routing``/``last_routing``, see
    mita/analysis/__init__.py); windows exist for pool=grid and pool=official only.
    """
    from mita.analysis.experts import expert_maps

    parser = analysis_parser(experts.__doc__, prog="experts")
    parser.add_argument("--image", type=int, default=0, help="dataset index of the drawn image (default 0)")
    parser.add_argument("--layers", type=int_list, default=None, help="MiTA layers (default first, middle, last)")
    parser.add_argument("--experts", type=int_list, default=None,
                        help="landmark indices (default a corner, the centre, the opposite corner)")
    return run_cli(parser, argv, lambda a: expert_maps(
        a.ckpts[0], a.out, overrides=a.overrides, image=a.image, layers=a.layers, experts=a.experts,
        max_images=a.max_images, split=a.split, batch_size=a.batch_size, num_workers=a.num_workers,
        device=a.device, progress=not a.no_progress))


def overlap(argv: Optional[Sequence[str]] = None) -> int:
    """Routing overlap (paper Fig. 5): IoU between an expert's top-k key positions and its routed queries' positions.

        python -m mita.analysis overlap outputs/fmnist/mita_m25_k25/seed0/checkpoint.pth --out outputs/analysis
        python -m mita.analysis overlap CKPT data.root=/path/to/fashion-mnist --max-images 2000

    Per layer: the mean IoU over experts, heads and images, a band from the smallest to the largest per-image
    mean, the IoU that random sets of the same sizes would have, and the fraction of idle experts (no query).
    An IoU near 1 would mean routing is mere clustering (each expert reads where its queries are). Writes
    overlap.png, overlap.json and overlap.csv to --out (default: CKPT's folder/analysis).

    The routing is read through the MiTA modules' routing hook (``capture_routing``/``last_routing``, see
    mita/analysis/__init__.py).
    """
    from mita.analysis.overlap import routing_overlap

    parser = analysis_parser(overlap.__doc__, prog="overlap")
    return run_cli(parser, argv, lambda a: routing_overlap(
        a.ckpts[0], a.out, overrides=a.overrides, max_images=a.max_images, split=a.split, batch_size=a.batch_size,
        num_workers=a.num_workers, device=a.device, progress=not a.no_progress))


def mk_grid(argv: Optional[Sequence[str]] = None) -> int:
    """Inference-time (m, k) grid (paper Fig. 7): one MiTA checkpoint evaluated at other (num_landmarks, topk).

        python -m mita.analysis mk_grid outputs/fmnist/mita_m25_k25/seed0/checkpoint.pth --out outputs/analysis
        python -m mita.analysis mk_grid CKPT data.root=/path/to/fashion-mnist --num-landmarks 16,25,36 --topk 16,25,36,49
        python -m mita.analysis mk_grid CKPT --precision bf16 --max-images 5000

    No retraining: every point is ``eval.py ckpt=CKPT attention.num_landmarks=m attention.topk=k`` on the same
    images. The heatmap (rows m, columns k, top-1 in %) boxes the training point, which is always evaluated and
    equals a plain eval.py of the checkpoint. Points the model cannot run (m above the number of patches, k
    above N) stay blank with their error in the JSON. Writes mk_grid.png, mk_grid.json and mk_grid.csv to --out
    (default: CKPT's folder/analysis).
    """
    from mita.analysis.mk_grid import DEFAULT_LANDMARKS, DEFAULT_TOPK, mk_grid

    parser = analysis_parser(mk_grid.__doc__, prog="mk_grid", precision=True)
    parser.add_argument("--num-landmarks", type=int_list, default=list(DEFAULT_LANDMARKS),
                        help="values of m, perfect squares (default 9,16,25,36,49)")
    parser.add_argument("--topk", type=int_list, default=list(DEFAULT_TOPK), help="values of k (default 9,16,25,36,49)")
    return run_cli(parser, argv, lambda a: mk_grid(
        a.ckpts[0], a.out, overrides=a.overrides, num_landmarks=a.num_landmarks, topk=a.topk,
        max_images=a.max_images, split=a.split, batch_size=a.batch_size, num_workers=a.num_workers,
        device=a.device, precision=a.precision, progress=not a.no_progress))


def swap(argv: Optional[Sequence[str]] = None) -> int:
    """Checkpoint-swap matrix (paper Fig. 8): each checkpoint's weights evaluated with every checkpoint's attention.

        python -m mita.analysis swap outputs/fmnist/{mita_m25_k25,standard,agent49}/seed0/checkpoint.pth --out swap
        python -m mita.analysis swap MITA_CKPT STANDARD_CKPT data.root=/path/to/fashion-mnist --labels MiTA,full

    Rows: the weights (trained with); columns: the attention config of each checkpoint (evaluated with), as
    ``eval.py ckpt=ROW attention=...`` would swap it. The diagonal, boxed, is each checkpoint's native top-1.
    Writes swap.png, swap.json (with the missing keys of each swap) and swap.csv to --out (default: the first
    checkpoint's folder/analysis).
    """
    from mita.analysis.swap import swap_matrix

    parser = analysis_parser(swap.__doc__, prog="swap", many=True, precision=True)
    parser.add_argument("--labels", type=lambda s: s.split(","), default=None,
                        help="comma-separated names of the checkpoints (default: their attention tags)")
    return run_cli(parser, argv, lambda a: swap_matrix(
        a.ckpts, a.out, overrides=a.overrides, labels=a.labels, max_images=a.max_images, split=a.split,
        batch_size=a.batch_size, num_workers=a.num_workers, device=a.device, precision=a.precision,
        progress=not a.no_progress), many=True)


def ablations(argv: Optional[Sequence[str]] = None) -> int:
    """The ablation tables of sweep folders (:mod:`mita.analysis.ablations`)."""
    from mita.analysis.ablations import main as ablations_main

    return ablations_main(argv)


#: ``python -m mita.analysis NAME``: the paper's figure or table each command makes
COMMANDS: Dict[str, Tuple[Callable[[Optional[Sequence[str]]], int], str]] = {
    "pruning": (pruning, "Fig. 4: the tokens no routed expert keeps"),
    "experts": (experts, "Fig. 3: a landmark's window, its top-k keys and its routed queries"),
    "overlap": (overlap, "Fig. 5: IoU of an expert's keys and its routed queries"),
    "mk_grid": (mk_grid, "Fig. 7: top-1 at other (m, k), no retraining"),
    "swap": (swap, "Fig. 8: each checkpoint's weights evaluated with every attention"),
    "ablations": (ablations, "the ablation tables of sweep folders"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mita.analysis NAME ARGS``: run the command NAME of :data:`COMMANDS` on ARGS."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = "\n".join(f"  {name:10s} {text}" for name, (_, text) in COMMANDS.items())
    usage = f"usage: python -m mita.analysis NAME ARGS (python -m mita.analysis NAME --help)\n\nNAME:\n{names}\n"
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        sys.stderr.write(usage + f"\nerror: unknown NAME {argv[0]!r}; valid: {sorted(COMMANDS)}\n")
        return 2
    return COMMANDS[argv[0]][0](argv[1:])
