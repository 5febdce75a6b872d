"""``python -m mlpcore``: the same command line as ``mpi_train.py`` and ``mlpcore-train``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
