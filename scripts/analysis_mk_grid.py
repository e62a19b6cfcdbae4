"""Inference-time (m, k) grid (paper Fig. 7): one MiTA checkpoint evaluated at other (num_landmarks, topk).

    python scripts/analysis_mk_grid.py outputs/fmnist/mita_m25_k25/seed0/checkpoint.pth --out outputs/analysis
    python scripts/analysis_mk_grid.py CKPT data.root=/path/to/fashion-mnist --num-landmarks 16,25,36 --topk 16,25,36,49
    python scripts/analysis_mk_grid.py CKPT --precision bf16 --max-images 5000

No retraining: every point is ``eval.py ckpt=CKPT attention.num_landmarks=m attention.topk=k`` on the same
images. The heatmap (rows m, columns k, top-1 in %) boxes the training point, which is always evaluated and
equals a plain eval.py of the checkpoint. Points the model cannot run (m above the number of patches, k
above N) stay blank with their error in the JSON. Writes mk_grid.png, mk_grid.json and mk_grid.csv to --out
(default: CKPT's folder/analysis).
"""
from __future__ import annotations

import sys

from mita.analysis.cli import analysis_parser, int_list, run_cli


def main(argv=None) -> int:
    from mita.analysis.mk_grid import DEFAULT_LANDMARKS, DEFAULT_TOPK, mk_grid

    parser = analysis_parser(__doc__, precision=True)
    parser.add_argument("--num-landmarks", type=int_list, default=list(DEFAULT_LANDMARKS),
                        help="values of m, perfect squares (default 9,16,25,36,49)")
    parser.add_argument("--topk", type=int_list, default=list(DEFAULT_TOPK), help="values of k (default 9,16,25,36,49)")
    return run_cli(parser, argv, lambda a: mk_grid(
        a.ckpts[0], a.out, overrides=a.overrides, num_landmarks=a.num_landmarks, topk=a.topk,
        max_images=a.max_images, split=a.split, batch_size=a.batch_size, num_workers=a.num_workers,
        device=a.device, precision=a.precision, progress=not a.no_progress))


if __name__ == "__main__":
    sys.exit(main())
