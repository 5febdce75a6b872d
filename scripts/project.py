#!/usr/bin/env python
"""Project measured runs onto a cluster: training time, speed-up and efficiency at N ranks.

    python scripts/project.py RUN_DIR --cluster 10gbe           # N = 1, 2, 4, ... 1024
    python scripts/project.py RUN_A RUN_B --cluster ib100 --ranks 1,8,64 --json proj.json
    python scripts/project.py RUN_DIR --cluster netbench.json   # links measured by scripts/netbench.py

The command line is :mod:`mlpcore.study.project_cli`; the model is
:mod:`mlpcore.study.projection` (docs/projection.md says what it leaves out).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mlpcore.study.project_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="scripts/project.py"))
