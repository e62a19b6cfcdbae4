"""The command line every analysis script shares: checkpoint(s), eval.py-style overrides and data options."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Callable, List, Optional, Sequence

__all__ = ["analysis_parser", "int_list", "run_cli"]

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


def analysis_parser(doc: str, *, many: bool = False, precision: bool = False) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the shared options; ``doc`` (the script's docstring) is its help text.

    Positionals: the checkpoint (``many``: several), then ``data.KEY=VALUE`` / ``attention.KEY=VALUE``
    overrides in any order.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
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
