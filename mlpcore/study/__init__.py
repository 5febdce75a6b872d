"""Scaling study: run ``mpi_train.py`` at several rank counts, tabulate, fit and plot.

Modules, one concern each (importing this package imports none of them):

- :mod:`mlpcore.study.laws` - Amdahl, Gustafson and Karp-Flatt, and the fits of
  the first two to measured speed-ups.
- :mod:`mlpcore.study.table` - one tidy row per run from its results.json, the
  table (``scaling.csv`` plus a ``scaling.json`` copy), and summaries of its
  rows: series per rank count, fitted serial fractions.
- :mod:`mlpcore.study.sweep` - :class:`~mlpcore.study.sweep.Sweep`, the runs to
  make, and the runner that starts each one with a real ``mpirun -n N``.
- :mod:`mlpcore.study.figures` - the five figures, drawn from the table's rows.
- :mod:`mlpcore.study.report` - ``report.md``, the console summary, and
  :func:`~mlpcore.study.report.replot` (figures and report from a CSV).
- :mod:`mlpcore.study.cli` - the command line (``scripts/scaling.py``,
  ``mlpcore-scaling``).
- :mod:`mlpcore.study.projection` - the alpha-beta-gamma projection of a measured run
  onto a cluster of N ranks; :mod:`mlpcore.study.project_cli` is ``scripts/project.py``.

Figures and report read nothing but the table's rows, so ``--from scaling.csv``
redraws exactly what a sweep drew.

Speed-up is always ``T_seq / T_par`` of training time, where ``T_seq`` is the
1-thread sequential baseline that the *same run* trained right after its
parallel part (same data, model, epochs and seed), so every point carries its
own reference time.
"""
