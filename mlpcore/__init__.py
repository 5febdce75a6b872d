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

The Python API, imported on first use (``import mlpcore`` stays light: no
numpy, plots, scikit-learn or MPI until you call something):

- :func:`run` - one experiment, the same options and run folder as the command line (:mod:`mlpcore.api`).
- :func:`load_results` - the typed :class:`~mlpcore.api.Results` of a saved run.
- :class:`MLPClassifier` - a scikit-learn estimator on mlpcore's MLP (:mod:`mlpcore.estimator`).
- :class:`RunConfig` - every option of a run, validated; :class:`UsageError` - what bad input raises.
"""

__version__ = "0.1.0"

# name -> (module, attribute), resolved by __getattr__ (PEP 562) on first access.
_LAZY = {
    "run": ("mlpcore.api", "run"),
    "load_results": ("mlpcore.api", "load_results"),
    "Results": ("mlpcore.api", "Results"),
    "MLPClassifier": ("mlpcore.estimator", "MLPClassifier"),
    "RunConfig": ("mlpcore.config", "RunConfig"),
    "UsageError": ("mlpcore.errors", "UsageError"),
    "MlpcoreError": ("mlpcore.errors", "MlpcoreError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value  # the next access is a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})
