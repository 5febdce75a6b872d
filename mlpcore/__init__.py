"""mlpcore: see what parallel training buys.

The package is built in wings; each imports only the wings below it (and the
base modules ``errors`` and ``fsio``):

- :mod:`mlpcore.data` - MNIST: find, download, validate, shard.
- :mod:`mlpcore.nn` - layers, models, Adam, kernels, the training loop (no distribution).
- :mod:`mlpcore.parallel` - launchers (MPI, joblib, serial), BLAS threads, watchdog, phase timing.
- :mod:`mlpcore.strategies` - ensemble, allreduce, local SGD, behind one registry; checkpoints.
- :mod:`mlpcore.report` - metrics, console, markdown, figures, trace.
- :mod:`mlpcore.study` - the scaling study.

On top: :mod:`mlpcore.config` (the typed :class:`RunConfig`), :mod:`mlpcore.cli`
(argv -> config -> experiment), :mod:`mlpcore.experiment` (orchestration) and
:mod:`mlpcore.results` (the results.json contract). :mod:`mlpcore.testing` holds
the test-only fault switch.
"""

__version__ = "0.1.0"
