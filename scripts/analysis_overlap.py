"""Routing overlap (paper Fig. 5): IoU between an expert's top-k key positions and its routed queries' positions.

    python scripts/analysis_overlap.py outputs/fmnist/mita_m25_k25/seed0/checkpoint.pth --out outputs/analysis
    python scripts/analysis_overlap.py CKPT data.root=/path/to/fashion-mnist --max-images 2000

Per layer: the mean IoU over experts, heads and images, a band from the smallest to the largest per-image
mean, the IoU that random sets of the same sizes would have, and the fraction of idle experts (no query).
An IoU near 1 would mean routing is mere clustering (each expert reads where its queries are). Writes
overlap.png, overlap.json and overlap.csv to --out (default: CKPT's folder/analysis).

The routing is read through the MiTA modules' routing hook (``capture_routing``/``last_routing``, see
mita/analysis/__init__.py).
"""
from __future__ import annotations

import sys

from mita.analysis.cli import analysis_parser, run_cli


def main(argv=None) -> int:
    from mita.analysis.overlap import routing_overlap

    parser = analysis_parser(__doc__)
    return run_cli(parser, argv, lambda a: routing_overlap(
        a.ckpts[0], a.out, overrides=a.overrides, max_images=a.max_images, split=a.split, batch_size=a.batch_size,
        num_workers=a.num_workers, device=a.device, progress=not a.no_progress))


if __name__ == "__main__":
    sys.exit(main())
