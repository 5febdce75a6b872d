#!/usr/bin/env python
"""Scaling study of mpi_train.py: run it at several rank counts, then tabulate and plot.

    python scripts/scaling.py --help                            # every option
    python scripts/scaling.py --ranks 1,2,4 --epochs 3 --train-limit 20000
    python scripts/scaling.py --from runs/scaling-X/scaling.csv  # redraw, run nothing

The command line is :mod:`mlpcore.study.cli` (installed: ``mlpcore-scaling``);
this wrapper runs it from a checkout without installing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mlpcore.study.cli import main  # noqa: E402

if __name__ == "__main__":
    # The name the README and --help write, whatever path the script was started by.
    sys.exit(main(prog="scripts/scaling.py"))
