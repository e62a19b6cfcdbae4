"""Build the small-scale reproduction's tables and figures (RESULTS.md) from its run folders.

    python scripts/collect_repro.py results/fmnist_repro --bench results/fmnist_repro/speed/models_h200_rounds.json
    python scripts/collect_repro.py outputs/fmnist_repro --out outputs/fmnist_repro/tables   # your own runs

Writes main.md, ablations.md, mk_grid.md, long.md, generalisation.md, rows.json and main.png, ablations.png,
mk_grid.png to --out (default RUNS_DIR/tables). The library behind it is :mod:`mita.analysis.reproduction`.
"""
import sys

from mita.analysis.reproduction import main

if __name__ == "__main__":
    sys.exit(main())
