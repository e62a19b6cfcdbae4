"""Deformable experts (paper Fig. 3): a landmark's pooling window, its top-k keys and its routed queries.

    python scripts/analysis_experts.py outputs/fmnist/mita_m25_k25/seed0/checkpoint.pth --out outputs/analysis
    python scripts/analysis_experts.py CKPT data.root=/path/to/fashion-mnist --image 7 --layers 0,11 --experts 0,12

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
from __future__ import annotations

import sys

from mita.analysis.cli import analysis_parser, int_list, run_cli


def main(argv=None) -> int:
    from mita.analysis.experts import expert_maps

    parser = analysis_parser(__doc__)
    parser.add_argument("--image", type=int, default=0, help="dataset index of the drawn image (default 0)")
    parser.add_argument("--layers", type=int_list, default=None, help="MiTA layers (default first, middle, last)")
    parser.add_argument("--experts", type=int_list, default=None,
                        help="landmark indices (default a corner, the centre, the opposite corner)")
    return run_cli(parser, argv, lambda a: expert_maps(
        a.ckpts[0], a.out, overrides=a.overrides, image=a.image, layers=a.layers, experts=a.experts,
        max_images=a.max_images, split=a.split, batch_size=a.batch_size, num_workers=a.num_workers,
        device=a.device, progress=not a.no_progress))


if __name__ == "__main__":
    sys.exit(main())
