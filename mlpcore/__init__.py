"""mlpcore: see what parallel training buys.

Modules, one concern each:

- :mod:`mlpcore.data` - MNIST: find, download, validate, shard.
- :mod:`mlpcore.model` - the numpy MLP and Adam.
- :mod:`mlpcore.train` - the training loop every strategy shares.
- :mod:`mlpcore.comm` - launchers (MPI, joblib, serial): where workers run and talk.
- :mod:`mlpcore.ensemble` - one model per shard, and the votes.
- :mod:`mlpcore.strategies` - data-parallel allreduce and local SGD.
- :mod:`mlpcore.metrics`, :mod:`mlpcore.report`, :mod:`mlpcore.plots` - numbers, files, figures.
- :mod:`mlpcore.config`, :mod:`mlpcore.cli`, :mod:`mlpcore.experiment` - options and the run itself.
"""

__version__ = "0.1.0"
