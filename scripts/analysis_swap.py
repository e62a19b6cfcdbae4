"""Checkpoint-swap matrix (paper Fig. 8): each checkpoint's weights evaluated with every checkpoint's attention.

    python scripts/analysis_swap.py outputs/fmnist/{mita_m25_k25,standard,agent49}/seed0/checkpoint.pth --out swap
    python scripts/analysis_swap.py MITA_CKPT STANDARD_CKPT data.root=/path/to/fashion-mnist --labels MiTA,full

Rows: the weights (trained with); columns: the attention config of each checkpoint (evaluated with), as
``eval.py ckpt=ROW attention=...`` would swap it. The diagonal, boxed, is each checkpoint's native top-1.
Writes swap.png, swap.json (with the missing keys of each swap) and swap.csv to --out (default: the first
checkpoint's folder/analysis).
"""
from __future__ import annotations

import sys

from mita.analysis.cli import analysis_parser, run_cli


def main(argv=None) -> int:
    from mita.analysis.swap import swap_matrix

    parser = analysis_parser(__doc__, many=True, precision=True)
    parser.add_argument("--labels", type=lambda s: s.split(","), default=None,
                        help="comma-separated names of the checkpoints (default: their attention tags)")
    return run_cli(parser, argv, lambda a: swap_matrix(
        a.ckpts, a.out, overrides=a.overrides, labels=a.labels, max_images=a.max_images, split=a.split,
        batch_size=a.batch_size, num_workers=a.num_workers, device=a.device, precision=a.precision,
        progress=not a.no_progress), many=True)


if __name__ == "__main__":
    sys.exit(main())
