"""One experiment, start to finish: load -> distribute -> strategy -> baselines -> report.

Every rank runs :meth:`Experiment.run`; the launcher decides what "rank"
means. The root (rank 0) loads the data, times the sequential baseline and
writes the report; the strategy decides how the ranks train and talk. This
module only orchestrates: each step lives in its wing.
"""

from __future__ import annotations

import numpy as np

from . import strategies
from .data import download_mnist, load_mnist, shard_bounds
from .errors import MlpcoreError, UsageError
from .fsio import default_run_dir, discard_run_dir, prepare_run_dir
from .parallel.blas import pin_blas_threads, pinned_threads
from .parallel.launchers import make_launcher
from .parallel.timing import PhaseTimer
from .parallel.watchdog import watching
from .report import figures
from .report.write import write_run
from .results import BaselineRun, build, predictions
from .strategies import checkpoint
from .strategies.ensemble import MemberJob, prepare_trainer, train_member
from .testing import faults


class Experiment:
    """The run a :class:`~mlpcore.config.RunConfig` describes, on this process's rank.

    Attributes
    ----------
    config : RunConfig
    launcher : Launcher or None
        Set once the launcher has started (the CLI's error handler aborts through it).
    timer : PhaseTimer or None
        This rank's phase timer; :attr:`phase` names the phase now running.
    run_dir : pathlib.Path or None
        The run folder, once prepared (on the root; None elsewhere): :func:`mlpcore.run` reports it.
    """

    def __init__(self, config):
        self.config = config
        self.launcher = None
        self.timer = None
        self.run_dir = None

    @property
    def phase(self):
        """The phase now running on this rank, for error messages."""
        return (self.timer.current if self.timer is not None else None) or "startup"

    def run(self):
        """Run it; returns the results.json document on the root, else None."""
        faults.check_env()  # the test-only fault switch: a malformed value is a usage error on every rank
        config = self.config
        launcher = self.launcher = make_launcher(config)
        self.timer = PhaseTimer(launcher.start_clock(), rank=launcher.rank)
        launcher.raise_if_any(_options_differ(launcher, config) or _options_unfit(launcher, config), "options")
        with watching(launcher, config.stall_timeout):  # after the options agree: every rank has the same timeout
            return self._run(launcher, self.timer, config)

    def _run(self, launcher, timer, config):
        run_dir = self.run_dir = launcher.on_root(lambda: _prepare_run_dir(config, launcher.size), "output")
        try:
            plan = checkpoint.plan_for_run(launcher, config, run_dir,
                                           shared_model=config.strategy in strategies.SHARED_MODEL)
            with timer.phase("setup"):
                # Imports and kernel compilation, on every rank at once: like numpy's own
                # import, outside both the parallel and the sequential times.
                launcher.raise_if_any(_setup_error(config), "setup")
            load_started = timer.now()
            with timer.phase("load" if launcher.is_root else "wait"):
                data = launcher.on_root(lambda: _load(config, launcher.size), "load")
            plan = checkpoint.bind_data(launcher, plan, data)  # a resumed run trains on the same arrays
            loaded_at, outcomes, elapsed = timer.now(), {}, {}
            for name in config.strategies:
                started = timer.now()
                outcomes[name] = strategies.run(name, config, launcher, data, timer, plan)
                elapsed[name] = timer.now() - started

            reporter = _reporter_rank(launcher, config)
            baselines = _baselines(launcher, data, config, timer, reporter)
            spans = launcher.gather_spans(timer)
            peak_rss = launcher.gather_peak_rss()
            if launcher.rank == reporter and not launcher.is_root:
                launcher.serve_call()  # draws the figures while the root writes the rest
            if not launcher.is_root:
                return None
            results = build(config, launcher, data, outcomes, baselines, timer.spans, spans, peak_rss,
                            # End to end = load + the headline strategy (with --compare the others ran too).
                            parallel_total_s=loaded_at - load_started + elapsed[config.strategy],
                            parallel_started_at_s=load_started,  # on the run's clock, for the timeline
                            resumed_from=plan.start_epochs if plan is not None and config.resume else None)
            with timer.phase("report"):
                draw = _drawing_on(launcher, reporter) if reporter else None
                write_run(run_dir, results, predictions(outcomes[config.strategy], baselines, data.y_test),
                          plots=not config.no_plots, show=config.show, draw=draw)
            return results
        except BaseException:
            if launcher.is_root:
                discard_run_dir(run_dir)
            raise


def _drawing_on(launcher, reporter):
    """A ``draw`` for :func:`write_run` that has rank ``reporter`` draw the figures."""
    def draw(run_dir, results, arrays, show):
        needed = {k: arrays[k] for k in ("y_test", "y_pred", "baseline_y_pred")}  # not the members' probabilities
        return launcher.call_on(reporter, figures.run_figures, run_dir, results, needed, show)
    return draw


def _prepare_run_dir(config, workers):
    name = "compare" if config.compare else config.strategy
    return prepare_run_dir(config.out or default_run_dir(name, workers),
                           reuse=config.overwrite or config.resume is not None)


def _setup_error(config):
    """Prepare this process's trainer (:func:`mlpcore.strategies.ensemble.prepare_trainer`); the error, if any."""
    try:
        prepare_trainer(config.trainer, config.kernels, np.dtype(config.dtype), config.model)
    except MlpcoreError as exc:
        return exc
    except Exception as exc:  # e.g. numba failing to compile for this dtype: on one rank, so say it on all
        return MlpcoreError(f"preparing the {config.trainer} trainer: {type(exc).__name__}: {exc}")
    return None


def _options_unfit(launcher, config):
    """A UsageError for options this many ranks cannot run (the same answer on every rank)."""
    data_parallel = config.strategy != "ensemble" or config.compare
    if data_parallel and config.batch_size < launcher.size:
        return UsageError(f"--batch-size {config.batch_size} is smaller than the {launcher.size} ranks: "
                          "allreduce and localsgd split every global batch across the ranks")
    return None


def _options_differ(launcher, config):
    """A UsageError if the ranks were started with different options (e.g. a bad wrapper script)."""
    if launcher.comm is None:
        return None
    everyone = launcher.comm.allgather(config.as_dict())
    odd = [r for r, cfg in enumerate(everyone) if cfg != everyone[0]]
    if odd:
        keys = sorted({k for r in odd for k in set(everyone[r]) | set(everyone[0])
                       if everyone[r].get(k) != everyone[0].get(k)})
        return UsageError(f"ranks {odd} were started with options that differ from rank 0's "
                          f"({', '.join('--' + k.replace('_', '-') for k in keys)}); "
                          "every rank must get the same command line")
    return None


def _load(config, workers):
    """Load (and if asked, download) MNIST on the root, and check it splits into the shards."""
    if config.download:
        # The downloaded file claims to be canonical MNIST: check its arrays too.
        path = download_mnist(config.data, url=config.mirror, progress=config.progress)
        data = load_mnist(path, train_limit=config.train_limit, test_limit=config.test_limit,
                          verify_checksums=True)
    else:
        data = load_mnist(config.data, source=config.source, train_limit=config.train_limit,
                          test_limit=config.test_limit)
    shard_bounds(data.n_train, workers)  # raises a clear error when shards would be empty
    return data


def _baselines(launcher, data, config, timer, reporter=0):
    """Train the sequential baseline(s) on the root while the other ranks sleep.

    The first entry of ``--baseline-threads`` is the classic T1 of the
    speed-up; others (e.g. ``all``) answer "was one multi-threaded process enough?".
    """
    if config.no_baseline:
        return []
    runs = []
    if launcher.is_root:
        job = MemberJob(config)
        worker_threads = pinned_threads()
        for requested in config.baseline_threads:
            threads = pin_blas_threads(launcher.cores if requested == "all" else requested)
            member_timer = PhaseTimer()
            with timer.phase("baseline"):
                # Same trainer, model, epochs and seed as rank 0's member, on all the data.
                out = train_member(0, data.x_train, data.y_train, data.x_test, job, member_timer)
            runs.append(BaselineRun(threads=threads, requested=requested, train_s=member_timer.seconds("train"),
                                    predict_s=member_timer.seconds("predict"), y_pred=out.probs.argmax(axis=1),
                                    final_train_loss=out.losses[-1] if out.losses else None))
        pin_blas_threads(worker_threads)
    elif launcher.rank == reporter:
        figures.preload()  # on the core the 1-thread baseline leaves free
    launcher.wait_for_root()
    return runs


def _reporter_rank(launcher, config):
    """The rank that draws the figures: 1 when it can (same node, a core free during the baseline), else 0.

    The figures' libraries take over a second to import (seaborn brings
    pandas). Under MPI, rank 1 is idle while the root trains the 1-thread
    baseline: it imports them on the core the baseline leaves free, then draws
    every figure while the root writes the rest of the report.
    """
    if launcher.comm is None or launcher.size < 2 or config.no_plots or config.show or config.no_baseline:
        return 0
    most_threads = max(launcher.cores if t == "all" else t for t in config.baseline_threads)
    if most_threads >= launcher.cores or not launcher.same_node(0, 1):
        return 0
    return 1
