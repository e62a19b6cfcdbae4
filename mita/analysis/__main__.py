"""``python -m mita.analysis NAME ARGS``: the paper's analyses of a checkpoint (:mod:`mita.analysis.cli`).

    python -m mita.analysis pruning outputs/fmnist/mita_m25_k25/seed0/checkpoint.pth --out outputs/analysis
    python -m mita.analysis --help
"""
import sys

from mita.analysis.cli import main

sys.exit(main())
