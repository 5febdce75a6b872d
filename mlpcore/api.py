"""The Python API: :func:`run` an experiment, :func:`load_results` of a saved one, both as typed :class:`Results`.

::

    import mlpcore
    res = mlpcore.run(strategy="ensemble", jobs=4, epochs=10, out="runs/tour")   # joblib on one machine
    res.speedup.train, res.metrics.vote_soft_accuracy, res.run_dir
    res = mlpcore.load_results("runs/tour/results.json")                          # the same object, from disk

:func:`run` takes the command line's options under their field names
(``--batch-size`` is ``batch_size``; see :class:`mlpcore.config.RunConfig`),
checks them the same way (a bad value raises :class:`~mlpcore.errors.UsageError`
with the command line's message), runs the same :class:`~mlpcore.experiment.Experiment`
and writes the same run folder. It never calls ``sys.exit``, and it leaves the
process as it found it: the joblib workers and the resource trackers it started
are stopped, and the BLAS thread pools get back the sizes they had.

Under ``mpirun`` call it on every rank, as ``mpi_train.py`` does: the root gets
the :class:`Results`, the other ranks None. An error every rank agrees on (bad
options, a bad data file) is raised on every rank; any other failure on one rank
is printed with its rank and phase and ends the whole job (``MPI_Abort``), as on
the command line, since the other ranks would otherwise wait for it forever.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig
from .errors import MlpcoreError, UsageError

__all__ = ["Baseline", "CompareRow", "DataInfo", "Environment", "Metrics", "ModelInfo", "RankTimings", "Results",
           "Speedup", "StrategyInfo", "Timings", "VsMultithreaded", "load_results", "run"]


# -- the typed sections of results.json ------------------------------------------------------------
def _frozen(value):
    """Lists (JSON arrays) as tuples, recursively; dicts are kept as they are."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _section(cls, doc, **nested):
    """``cls`` built from the dict ``doc``: keys it does not know are left out (they stay in ``raw``),
    missing ones are None; ``nested`` maps a key to the function that builds its value."""
    doc = doc or {}
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in doc:
            value = doc[f.name]
            kwargs[f.name] = nested[f.name](value) if f.name in nested and value is not None else _frozen(value)
    return cls(**kwargs)


@dataclass(frozen=True)
class VsMultithreaded:
    """Speed-up against the fastest multi-threaded baseline (``baseline_threads=(1, "all")``).

    Attributes
    ----------
    baseline_threads : int
        BLAS threads of that baseline.
    train, end_to_end : float
        Its training / end-to-end time over the parallel run's.
    """

    baseline_threads: int | None = None
    train: float | None = None
    end_to_end: float | None = None


@dataclass(frozen=True)
class Speedup:
    """What parallelism bought, against the first sequential baseline (results.json's ``speedup``).

    Every field is None when the run had no baseline (``no_baseline=True``).

    Attributes
    ----------
    train : float
        Speed-up of training: the baseline's training time over the slowest worker's.
    end_to_end : float
        Sequential end to end (load + train + predict) over parallel end to end
        (load + distribute + train + combine).
    efficiency_train, efficiency_end_to_end : float
        The speed-ups divided by the number of workers (1 is perfect).
    baseline_threads : int
        BLAS threads of the baseline (1: the classic T1).
    vs_multithreaded : VsMultithreaded or None
        Against a multi-threaded baseline, when one ran.
    """

    train: float | None = None
    end_to_end: float | None = None
    efficiency_train: float | None = None
    efficiency_end_to_end: float | None = None
    baseline_threads: int | None = None
    vs_multithreaded: VsMultithreaded | None = None


@dataclass(frozen=True)
class Metrics:
    """Test-set accuracies (results.json's ``metrics``), each in [0, 1].

    Attributes
    ----------
    accuracy : float
        The headline: the ensemble's ``vote``, or the data-parallel model's.
    baseline_accuracy : float or None
        The first sequential baseline's.
    vote_soft_accuracy, vote_hard_accuracy : float or None
        The ensemble's two votes (None for the data-parallel strategies).
    member_accuracy : tuple of float or None
        Each ensemble member's own accuracy.
    """

    accuracy: float | None = None
    baseline_accuracy: float | None = None
    vote_soft_accuracy: float | None = None
    vote_hard_accuracy: float | None = None
    member_accuracy: tuple | None = None


@dataclass(frozen=True)
class Baseline:
    """One sequential baseline run: the same trainer and seed as worker 0, on all the data.

    Attributes
    ----------
    threads : int
        BLAS threads it ran with; ``requested`` is what ``baseline_threads`` asked (an int or ``"all"``).
    train_s, predict_s, total_s : float
        Seconds of training, of predicting the test set, and end to end (load + train + predict).
    accuracy, final_train_loss : float
    speedup_train, speedup_end_to_end, efficiency_train, efficiency_end_to_end : float
        The parallel run measured against this baseline.
    """

    threads: int | None = None
    requested: object = None
    train_s: float | None = None
    predict_s: float | None = None
    total_s: float | None = None
    accuracy: float | None = None
    final_train_loss: float | None = None
    speedup_train: float | None = None
    speedup_end_to_end: float | None = None
    efficiency_train: float | None = None
    efficiency_end_to_end: float | None = None


@dataclass(frozen=True)
class RankTimings:
    """Seconds one worker (rank) spent in each phase, and the BLAS threads it ran with."""

    rank: int | None = None
    threads: int | None = None
    load_s: float | None = None
    wait_s: float | None = None
    scatter_s: float | None = None
    setup_s: float | None = None
    train_s: float | None = None
    predict_s: float | None = None
    gather_s: float | None = None
    comm_exposed_s: float | None = None
    peak_rss_mb: float | None = None


@dataclass(frozen=True)
class Timings:
    """Where the time went (results.json's ``timings``), in seconds.

    Attributes
    ----------
    parallel_train_s : float
        Training phase of the slowest worker (the others wait for it).
    parallel_total_s : float
        The root's wall time from loading through distributing, training, predicting, gathering, voting.
    load_s, vote_s : float
        Loading MNIST on the root; combining the members' predictions.
    baseline_train_s, baseline_total_s : float or None
        The first baseline's training and end-to-end times.
    parallel_started_at_s : float
        When the parallel part began on the run's clock (the timeline's origin is the launch).
    per_rank : tuple of RankTimings
    baselines : tuple of Baseline
    """

    parallel_train_s: float | None = None
    parallel_total_s: float | None = None
    load_s: float | None = None
    vote_s: float | None = None
    baseline_train_s: float | None = None
    baseline_total_s: float | None = None
    parallel_started_at_s: float | None = None
    per_rank: tuple = ()
    baselines: tuple = ()


@dataclass(frozen=True)
class Environment:
    """What ran where (results.json's ``environment``).

    Attributes
    ----------
    launcher : str
        ``"mpi"``, ``"joblib"`` or ``"serial"``.
    world_size : int
        Workers (MPI ranks, joblib processes, serial members).
    cores : int
        Cores the run could use (per node under MPI).
    threads_requested : int
        BLAS threads asked for per worker; ``threads_per_worker`` is what each actually ran with.
    oversubscribed : bool
        More threads than cores ran at once: the parallel times include time-slicing.
    mpi_library : str or None
        The MPI library's version line (None without MPI).
    kernels, denormals : str
        Which elementwise kernels ran, and how denormal floats were handled.
    versions : dict of str to str
        Python and the main packages.
    blas : tuple of dict
        The BLAS pools (implementation, version, architecture, threads).
    """

    launcher: str | None = None
    world_size: int | None = None
    cores: int | None = None
    threads_requested: int | None = None
    oversubscribed: bool | None = None
    mpi_library: str | None = None
    threads_per_worker: tuple = ()
    kernels: str | None = None
    denormals: str | None = None
    hostname: str | None = None
    platform: str | None = None
    python_executable: str | None = None
    pid: int | None = None
    versions: dict = field(default_factory=dict)
    blas: tuple = ()


@dataclass(frozen=True)
class ModelInfo:
    """The model trained (results.json's ``model``).

    Attributes
    ----------
    name : str
        ``"mlp"`` or ``"lenet5"``.
    n_params : int
        Trainable parameters.
    flops_per_sample : int
        Training FLOPs of one sample (forward + weight gradients + input gradients; a multiply-add is 2).
    layers : tuple of dict
        Each layer's spec (type and sizes).
    """

    name: str | None = None
    n_params: int | None = None
    flops_per_sample: int | None = None
    layers: tuple = ()


@dataclass(frozen=True)
class DataInfo:
    """The data the run used: where it came from, how much, and each worker's shard size."""

    origin: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    shard_sizes: tuple = ()


@dataclass(frozen=True)
class StrategyInfo:
    """The headline strategy (results.json's ``strategy``).

    Attributes
    ----------
    name : str
    comm : dict
        Bytes moved by kind (``scatter_bytes``, ...) or the data-parallel strategies' counters.
    final_train_loss : float, tuple of float (ensemble: per member) or None
    overlap : dict or None
        allreduce: calls, bytes, in-flight and exposed seconds, overlap fraction.
    """

    name: str | None = None
    comm: dict | None = None
    final_train_loss: object = None
    overlap: dict | None = None


@dataclass(frozen=True)
class CompareRow:
    """One strategy of a ``compare=True`` run."""

    accuracy: float | None = None
    parallel_train_s: float | None = None
    final_train_loss: object = None
    comm: dict | None = None
    overlap: dict | None = None


def _config_from(doc):
    """The :class:`RunConfig` a results.json recorded (validated again; as recorded if this version refuses it)."""
    known = {f.name: f for f in dataclasses.fields(RunConfig)}
    kwargs = {k: _frozen(v) for k, v in (doc or {}).items() if k in known}
    try:
        return RunConfig(**kwargs)
    except UsageError:  # written by another version of mlpcore, with values this one refuses: keep them
        config = object.__new__(RunConfig)
        for name, f in known.items():
            default = f.default if f.default is not dataclasses.MISSING else None
            object.__setattr__(config, name, kwargs.get(name, default))
        return config


@dataclass(frozen=True)
class Results:
    """A run's results: the results.json document as typed, frozen sections.

    Built by :func:`run` and :func:`load_results` (or :meth:`from_dict`); the
    document itself is :attr:`raw`, for keys the sections leave out.

    Attributes
    ----------
    config : RunConfig
        The options as used.
    model : ModelInfo
    environment : Environment
    data : DataInfo
    timings : Timings
    metrics : Metrics
    speedup : Speedup
    strategy : StrategyInfo
    compare : dict of str to CompareRow, or None
        One row per strategy with ``compare=True``.
    warnings : tuple of str
        Notes for the reader (e.g. oversubscribed cores).
    files : tuple of str
        The files the run wrote into :attr:`run_dir`.
    resumed_from_epoch : tuple of int or None
        Per worker, the epoch a ``resume`` continued from.
    run_dir : pathlib.Path or None
        The run folder (None for a document that did not come from one).
    raw : dict
        The results.json document.
    """

    config: RunConfig
    model: ModelInfo
    environment: Environment
    data: DataInfo
    timings: Timings
    metrics: Metrics
    speedup: Speedup
    strategy: StrategyInfo
    compare: dict | None = None
    warnings: tuple = ()
    files: tuple = ()
    resumed_from_epoch: tuple | None = None
    run_dir: Path | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, doc, run_dir=None):
        """Results from a results.json document (a dict), e.g. the one :class:`~mlpcore.experiment.Experiment` returns.

        Parameters
        ----------
        doc : dict
            The document (:func:`mlpcore.results.build`).
        run_dir : path-like, optional
            The folder it was written to.

        Returns
        -------
        Results
        """
        if not isinstance(doc, dict) or "config" not in doc or "metrics" not in doc:
            raise UsageError("not a results.json document (it has no 'config' and 'metrics')")
        timings = _section(Timings, doc.get("timings"),
                           per_rank=lambda rows: tuple(_section(RankTimings, r) for r in rows),
                           baselines=lambda rows: tuple(_section(Baseline, b) for b in rows))
        compare = doc.get("compare")
        return cls(
            config=_config_from(doc.get("config")),
            model=_section(ModelInfo, doc.get("model")),
            environment=_section(Environment, doc.get("environment")),
            data=_section(DataInfo, doc.get("data")),
            timings=timings,
            metrics=_section(Metrics, doc.get("metrics")),
            speedup=_section(Speedup, doc.get("speedup"),
                             vs_multithreaded=lambda d: _section(VsMultithreaded, d)),
            strategy=_section(StrategyInfo, doc.get("strategy")),
            compare=None if compare is None else {k: _section(CompareRow, v) for k, v in compare.items()},
            warnings=tuple(doc.get("warnings") or ()),
            files=tuple(doc.get("files") or ()),
            resumed_from_epoch=_frozen(doc.get("resumed_from_epoch")),
            run_dir=None if run_dir is None else Path(run_dir).absolute(),
            raw=doc,
        )

    # -- what the run folder holds -------------------------------------------------------------
    def path(self, name):
        """``run_dir / name``: a file of the run (see :attr:`files`)."""
        if self.run_dir is None:
            raise UsageError("these results have no run folder")
        return self.run_dir / name

    @property
    def figures(self):
        """``{name: path}`` of the run's PNG figures (``confusion_parallel``, ``timeline``, ...)."""
        return {Path(f).stem: self.path(f) for f in self.files if f.endswith(".png") and self.path(f).is_file()}

    @property
    def report_path(self):
        """The run's report.md: ``open`` it, or view it in any Markdown viewer."""
        return self.path("report.md")

    def predictions(self):
        """The run's predictions.npz as a dict of arrays.

        Returns
        -------
        dict of str to ndarray
            ``y_pred`` (the headline's test-set predictions), and where there
            are some ``member_probs`` (members, n_test, classes) and
            ``baseline_y_pred``.
        """
        import numpy as np

        with np.load(self.path("predictions.npz")) as npz:
            return {k: npz[k] for k in npz.files}

    def summary(self):
        """The console summary the run printed (what was run, how long it took, what it bought and cost)."""
        from .report.console import summary_table

        return summary_table(self.raw).strip("\n")

    def __repr__(self):
        s = self.speedup
        parts = [f"strategy={self.strategy.name!r}", f"launcher={self.environment.launcher!r}",
                 f"workers={self.environment.world_size}", f"accuracy={self.metrics.accuracy}"]
        if s.train is not None:
            parts.append(f"speedup.train={s.train:.2f}")
        parts.append(f"run_dir={str(self.run_dir) if self.run_dir else None!r}")
        return f"Results({', '.join(parts)})"

    def _repr_markdown_(self):  # Jupyter shows the summary table
        return f"```text\n{self.summary()}\n```\n\nrun folder: `{self.run_dir}`"


def load_results(path):
    """The :class:`Results` of a saved run.

    Parameters
    ----------
    path : path-like
        A run folder, or its ``results.json``.

    Returns
    -------
    Results
        With ``run_dir`` the folder the file is in.

    Raises
    ------
    UsageError
        If there is no such file or it is not a results.json document.
    """
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    try:
        doc = json.loads(file.read_text())
    except FileNotFoundError:
        raise UsageError(f"{file}: no such results file (give a run folder or its results.json)") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{file}: cannot read it as results.json ({exc})") from None
    return Results.from_dict(doc, run_dir=file.parent)


# -- running -------------------------------------------------------------------------------------
def _make_config(config, options):
    """A :class:`RunConfig` from a config and/or the command line's options as keywords."""
    if config is not None and not isinstance(config, RunConfig):
        raise UsageError(f"mlpcore.run: the positional argument is a RunConfig, got {type(config).__name__}; "
                         "pass the options as keywords, e.g. mlpcore.run(jobs=4, epochs=10)")
    names = [f.name for f in dataclasses.fields(RunConfig)]
    unknown = [k for k in options if k not in names]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UsageError(f"unknown option {', '.join(hints)}: the options are the command line's, named as "
                         "RunConfig's fields (--batch-size is batch_size)")
    values = {}
    for key, value in options.items():
        if isinstance(value, list):  # hidden=[512, 256], baseline_threads=[1, "all"]
            value = tuple(value)
        elif isinstance(value, os.PathLike):  # out=Path("runs/x"), data=..., resume=...
            value = os.fspath(value)
        values[key] = value
    return config.replace(**values) if config is not None else RunConfig(**values)


def run(config=None, /, **options):
    """Run one experiment, as ``mpi_train.py`` does; returns its :class:`Results` on the root.

    Parameters
    ----------
    config : RunConfig, optional
        A configuration to start from; ``options`` change some of its values.
    **options
        The command line's options, named as :class:`~mlpcore.config.RunConfig`'s
        fields: ``strategy``, ``launcher``, ``jobs``, ``epochs``, ``hidden``
        (a tuple such as ``(128,)``), ``batch_size``, ``lr``, ``alpha``,
        ``seed``, ``train_limit``, ``test_limit``, ``out``, ``no_plots``, ...
        (see ``mpi_train.py --help``). Lists are taken as tuples and paths as strings.

    Returns
    -------
    Results or None
        The run's results (read back from its results.json) on the root
        (rank 0); None on the other MPI ranks.

    Raises
    ------
    UsageError
        For a bad option value (with the command line's message), an unknown
        option, a bad data file or output folder; under MPI on every rank.
    MlpcoreError
        For a failure during the run (outside MPI; under MPI with several
        ranks a failure on one rank ends the job, as on the command line).

    Notes
    -----
    Outside ``mpirun`` the ``auto`` launcher runs the ensemble's ``jobs``
    workers with joblib; ``launcher="serial"`` runs them one after another in
    this process. The run prints the same console summary as the command line
    and writes the same run folder. Afterwards the joblib workers and the
    resource trackers this call started are stopped, and the BLAS pools are
    given back the thread counts they had, so a second call in the same
    interpreter works and, with the same seed, gives the same results.

    Examples
    --------
    >>> import mlpcore
    >>> res = mlpcore.run(jobs=2, epochs=2, train_limit=2000, test_limit=500, no_plots=True,
    ...                   out="runs/example")                                       # doctest: +SKIP
    >>> res.speedup.train, res.metrics.vote_soft_accuracy                              # doctest: +SKIP
    """
    from .experiment import Experiment

    cfg = _make_config(config, options)
    experiment = Experiment(cfg)
    with _leaving_no_trace(experiment):
        document = _run_like_the_cli(experiment)
    if document is None:  # not the root
        return None
    return load_results(experiment.run_dir)


def _run_like_the_cli(experiment):
    """``experiment.run()`` with the command line's handling of one rank's failure under MPI (see cli.main)."""
    from .cli import EXIT_FAILURE, EXIT_USAGE, _fail_job, _multi_rank

    try:
        return experiment.run()
    except MlpcoreError as exc:
        if not getattr(exc, "collective", False) and _multi_rank(experiment):
            _fail_job(experiment, str(exc), EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILURE, exc=exc)
        raise
    except KeyboardInterrupt:
        if _multi_rank(experiment):
            _fail_job(experiment, "interrupted", 130)
        raise
    except Exception as exc:  # the other ranks may be blocked in a collective: end the job, as the CLI does
        if _multi_rank(experiment):
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            _fail_job(experiment, detail, EXIT_FAILURE, tb=traceback.format_exc(), exc=exc)
        raise


# -- leaving the process as it was -------------------------------------------------------------------
def _blas_pools():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().lib_controllers


def _default_threads(internal_api):
    """What a thread pool loaded during the run would have started with (its environment variable, else the cores)."""
    from .parallel.blas import visible_cores

    variables = {"openblas": ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"),
                 "mkl": ("MKL_NUM_THREADS", "OMP_NUM_THREADS")}.get(internal_api, ("OMP_NUM_THREADS",))
    for var in variables:
        value = os.environ.get(var, "").split(",")[0]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return visible_cores()


def _trackers():
    """The resource-tracker singletons of multiprocessing and of joblib's loky (those imported)."""
    found = []
    for name in ("multiprocessing.resource_tracker", "joblib.externals.loky.backend.resource_tracker"):
        module = sys.modules.get(name)
        tracker = getattr(module, "_resource_tracker", None)
        if tracker is not None:
            found.append(tracker)
    return found


@contextmanager
def _leaving_no_trace(experiment):
    """Undo what a run does to this process: joblib workers, resource trackers, BLAS pins, matplotlib's backend."""
    pools_before = {pool.filepath: (pool.internal_api, pool.num_threads) for pool in _blas_pools()}
    trackers_before = {id(t) for t in _trackers() if getattr(t, "_pid", None) is not None}
    pyplot = sys.modules.get("matplotlib.pyplot")
    backend = pyplot.get_backend() if pyplot is not None else None
    try:
        yield
    finally:
        launcher = experiment.launcher
        if launcher is not None and launcher.name == "joblib":
            _stop_joblib_workers()
        for tracker in _trackers():
            if id(tracker) not in trackers_before and getattr(tracker, "_pid", None) is not None:
                try:
                    tracker._stop()  # started for this run's workers; it starts again when needed
                except Exception:  # noqa: BLE001 - private API of the stdlib and loky: best effort
                    pass
        _restore_blas(pools_before)
        if backend is not None:
            import matplotlib.pyplot as plt

            if plt.get_backend() != backend:  # the figures ran on Agg: give a notebook its inline backend back
                plt.switch_backend(backend)


def _stop_joblib_workers():
    executor_module = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(executor_module, "_executor", None)
    if executor is None:
        return
    if hasattr(executor, "terminate"):  # joblib's MemmappingExecutor: also deletes its memory-mapped arrays
        executor.terminate(kill_workers=False)
    else:
        executor.shutdown(wait=True)


def _restore_blas(before):
    from .parallel import blas

    # mlpcore's own record of "the pin" (re-applied when scikit-learn brings scipy's BLAS): forget it.
    blas._blas_limiter, blas._pinned_threads = None, None
    for pool in _blas_pools():
        internal_api, threads = before.get(pool.filepath, (pool.internal_api, None))
        if threads is None:  # loaded during the run: what it would have started with
            same = [n for api, n in before.values() if api == pool.internal_api]
            threads = max(same) if same else _default_threads(pool.internal_api)
        if pool.num_threads != threads:
            pool.set_num_threads(threads)
