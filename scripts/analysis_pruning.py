"""Token pruning (paper Fig. 4): per layer, the key/value positions no routed expert keeps.

    python scripts/analysis_pruning.py outputs/fmnist/mita_m25_k25/seed0/checkpoint.pth --out outputs/analysis
    python scripts/analysis_pruning.py CKPT data.root=/path/to/fashion-mnist --images 0,7,42 --layers 0,5,11
    python scripts/analysis_pruning.py CKPT attention.topk=36 --max-images 2000

For a few images (--images: indices into the whole split, whatever --max-images), each layer's panel
shades in red the patches that no routed expert of any head selected among its top-k keys. Over the split
(or --max-images of it), per layer: the fraction of tokens no expert selected, the fraction not kept by an
expert that receives a query, the per-head fraction and how often the cls token is selected. Writes
pruning.png, pruning.json and pruning.csv to --out (default: CKPT's folder/analysis).

The routing is read through the MiTA modules' routing hook (``capture_routing``/``last_routing``, see
mita/analysis/__init__.py); the model is rebuilt from the config stored in the checkpoint, as eval.py does,
and data.KEY=VALUE / attention.KEY=VALUE override it the same way.
"""
from __future__ import annotations

import sys

from mita.analysis.cli import analysis_parser, int_list, run_cli


def main(argv=None) -> int:
    from mita.analysis.pruning import token_pruning

    parser = analysis_parser(__doc__)
    parser.add_argument("--images", type=int_list, default=[0, 1, 2, 3],
                        help="dataset indices to draw (default 0,1,2,3)")
    parser.add_argument("--layers", type=int_list, default=None, help="MiTA layers to draw (default all)")
    return run_cli(parser, argv, lambda a: token_pruning(
        a.ckpts[0], a.out, overrides=a.overrides, images=a.images, layers=a.layers, max_images=a.max_images,
        split=a.split, batch_size=a.batch_size, num_workers=a.num_workers, device=a.device,
        progress=not a.no_progress))


if __name__ == "__main__":
    sys.exit(main())
