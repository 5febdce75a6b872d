"""One experiment, start to finish: load, distribute, train, combine, baseline, report.

Every rank runs :func:`run`; the launcher decides what "rank" means. The root
(rank 0) loads the data, combines the workers' results, times the sequential
baseline and writes the report; the other ranks train and then wait.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from contextlib import contextmanager

import numpy as np

from . import checkpoint, faults, report
from .comm import blas_threads, make_launcher, pin_blas_threads
from .config import config_dict
from .data import download_mnist, load_mnist, shard_bounds
from .ensemble import TrainSettings, hard_vote, soft_vote, prepare_trainer, train_member
from .errors import MlpcoreError, UsageError
from .metrics import accuracy, efficiency, speedup
from .timing import PhaseTimer


class _State:
    """What the CLI's error handler needs to say where a failure happened."""

    launcher = None
    timer = None

    @property
    def phase(self):
        return (self.timer.current if self.timer is not None else None) or "startup"


STATE = _State()


def run(args):
    """Run the experiment the options describe; returns the results dict on the root, else None."""
    faults.check_env()  # the test-only fault switch: a malformed value is a usage error on every rank
    launcher = STATE.launcher = make_launcher(args)
    timer = STATE.timer = PhaseTimer(launcher.start_clock(), rank=launcher.rank)
    launcher.raise_if_any(_options_differ(launcher, args) or _options_unfit(launcher, args), "options")
    with _stall_watchdog(launcher, args):  # after the options agree: every rank has the same --stall-timeout
        return _run(launcher, timer, args)


def _run(launcher, timer, args):
    run_dir = launcher.on_root(lambda: report.prepare_run_dir(args, launcher.size), "output")
    try:
        plan = _checkpoint_plan(launcher, args, run_dir)
        with timer.phase("setup"):
            # Imports and kernel compilation, on every rank at once: like numpy's own
            # import, outside both the parallel and the sequential times.
            launcher.raise_if_any(_setup_error(args), "setup")
        load_started = timer.now()
        with timer.phase("load" if launcher.is_root else "wait"):
            data = launcher.on_root(lambda: _load(args, launcher.size), "load")
        strategies = ("ensemble", "allreduce", "localsgd") if args.compare else (args.strategy,)
        loaded_at, outcomes, elapsed = timer.now(), {}, {}
        for name in strategies:
            started = timer.now()
            outcomes[name] = _run_strategy(name, launcher, data, args, timer, plan)
            elapsed[name] = timer.now() - started
        # End to end = load + the headline strategy (with --compare the others ran too).
        parallel_total_s = loaded_at - load_started + elapsed[args.strategy]

        reporter = _reporter_rank(launcher, args)
        baselines = _baselines(launcher, data, args, timer, reporter)
        spans = launcher.gather_spans(timer)
        if launcher.rank == reporter and not launcher.is_root:
            _draw_for_root(launcher)
        if not launcher.is_root:
            return None
        results = _results(args, launcher, data, outcomes, baselines, timer, spans, parallel_total_s)
        results["timings"]["parallel_started_at_s"] = load_started  # on the run's clock, for the timeline
        if plan is not None and args.resume:
            results["resumed_from_epoch"] = list(plan.start_epochs)
        with timer.phase("report"):
            draw = _remote_drawing(launcher, reporter) if reporter else None
            report.write_run(run_dir, results, data, outcomes, baselines, args, draw=draw)
        return results
    except BaseException:
        if launcher.is_root:
            report.discard_run_dir(run_dir)
        raise


def _setup_error(args):
    """Prepare this process's trainer (:func:`mlpcore.ensemble.prepare_trainer`); the error, if any."""
    try:
        prepare_trainer(args.trainer, args.kernels, np.dtype(args.dtype))
    except MlpcoreError as exc:
        return exc
    except Exception as exc:  # e.g. numba failing to compile for this dtype: on one rank, so say it on all
        return MlpcoreError(f"preparing the {args.trainer} trainer: {type(exc).__name__}: {exc}")
    return None


@contextmanager
def _stall_watchdog(launcher, args):
    """Run the stall watchdog (``--stall-timeout``, MPI with 2+ ranks) around the block; else nothing."""
    if args.stall_timeout is None or launcher.comm is None or launcher.size < 2:
        yield
        return
    from .watchdog import Watchdog

    launcher.watchdog = Watchdog(launcher.comm, args.stall_timeout)
    try:
        yield
    except BaseException as exc:
        # Every rank raised it (a usage error): finish cleanly. Otherwise MPI_Abort follows anyway.
        launcher.watchdog.close(clean=getattr(exc, "collective", False))
        launcher.watchdog = None
        raise
    launcher.watchdog.close()
    launcher.watchdog = None


def _checkpoint_plan(launcher, args, run_dir):
    """What every worker does about checkpoints: a ``checkpoint.CheckpointPlan``, or None.

    On the root: check ``--resume``'s checkpoints against these options and
    choose each rank's starting epoch, or clear an earlier run's checkpoints
    from a reused (``--overwrite``) folder; then every rank gets the plan.
    """
    if not (args.checkpoint_every or args.resume):
        if launcher.is_root:
            checkpoint.clear(run_dir)  # an earlier run's, from a folder reused with --overwrite
        return None
    # One model trained by every rank resumes from the latest epoch all ranks saved.
    shared_model = args.strategy != "ensemble"
    plan = launcher.on_root(lambda: checkpoint.plan(run_dir, args, launcher.size, shared_model=shared_model),
                            "resume")
    if launcher.comm is not None:
        plan = launcher.comm.bcast(plan, root=0)
    if args.resume and launcher.is_root:
        print(f"resuming {run_dir}: " + ", ".join(f"rank {r} from epoch {e}" for r, e in
                                                    enumerate(plan.start_epochs)), file=sys.stderr, flush=True)
    return plan


def _options_unfit(launcher, args):
    """A UsageError for options this many ranks cannot run (the same answer on every rank)."""
    data_parallel = args.strategy != "ensemble" or args.compare
    if data_parallel and args.batch_size < launcher.size:
        return UsageError(f"--batch-size {args.batch_size} is smaller than the {launcher.size} ranks: "
                          "allreduce and localsgd split every global batch across the ranks")
    return None


def _options_differ(launcher, args):
    """A UsageError if the ranks were started with different options (e.g. a bad wrapper script)."""
    if launcher.comm is None:
        return None
    everyone = launcher.comm.allgather(config_dict(args))
    odd = [r for r, cfg in enumerate(everyone) if cfg != everyone[0]]
    if odd:
        keys = sorted({k for r in odd for k in set(everyone[r]) | set(everyone[0])
                       if everyone[r].get(k) != everyone[0].get(k)})
        return UsageError(f"ranks {odd} were started with options that differ from rank 0's "
                          f"({', '.join('--' + k.replace('_', '-') for k in keys)}); "
                          "every rank must get the same command line")
    return None


def _load(args, workers):
    """Load (and if asked, download) MNIST on the root, and check it splits into the shards."""
    if args.download:
        # The downloaded file claims to be canonical MNIST: check its arrays too.
        path = download_mnist(args.data, url=args.mirror, progress=not args.quiet)
        data = load_mnist(path, train_limit=args.train_limit, test_limit=args.test_limit, verify_checksums=True)
    else:
        data = load_mnist(args.data, source=args.source, train_limit=args.train_limit,
                          test_limit=args.test_limit)
    shard_bounds(data.n_train, workers)  # raises a clear error when shards would be empty
    return data


def _run_strategy(name, launcher, data, args, timer, plan=None):
    """Train with one strategy; the root gets a dict of predictions and per-rank facts."""
    if name == "ensemble":
        return _run_ensemble(launcher, data, args, timer, plan)
    from .strategies import run_data_parallel

    return run_data_parallel(name, launcher, data, args, timer, plan)


def _run_ensemble(launcher, data, args, timer, plan=None):
    settings = TrainSettings.from_args(args, progress=not args.quiet)
    if plan is not None:
        settings = dataclasses.replace(settings, checkpoint=plan)
    x, y, x_test = (data.x_train, data.y_train, data.x_test) if launcher.is_root else (None, None, None)
    outputs = launcher.map_shards(train_member, x, y, x_test, settings, timer)
    if not launcher.is_root:
        return None
    with timer.phase("vote"):
        probs = np.stack([out.probs for out in outputs])
        predictions = {"soft": soft_vote(probs), "hard": hard_vote(probs)}
    return {
        "strategy": "ensemble",
        "y_pred": predictions[args.vote],
        "member_probs": probs,  # (members, n_test, classes): saved in predictions.npz
        "metrics": {
            "vote_soft_accuracy": accuracy(data.y_test, predictions["soft"]),
            "vote_hard_accuracy": accuracy(data.y_test, predictions["hard"]),
            "member_accuracy": [accuracy(data.y_test, p.argmax(axis=1)) for p in probs],
        },
        "accuracy": accuracy(data.y_test, predictions[args.vote]),
        "parallel_train_s": max(out.train_s for out in outputs),
        "threads_per_worker": [out.threads for out in outputs],
        "worker_spans": [out.spans for out in outputs],
        "final_train_loss": [out.losses[-1] if out.losses else None for out in outputs],
        "shard_sizes": [out.n_train for out in outputs],
        "comm": {"scatter_bytes": int(data.x_train.nbytes + data.y_train.nbytes),
                 "bcast_bytes": int(data.x_test.nbytes) * (launcher.size - 1),
                 "gather_bytes": int(probs.nbytes)},
    }


def _baselines(launcher, data, args, timer, reporter=0):
    """Train the sequential baseline(s) on the root while the other ranks sleep.

    The first entry of ``--baseline-threads`` is the classic T1 of the
    speed-up; others (e.g. ``all``) answer "was one multi-threaded process enough?".
    """
    if args.no_baseline:
        return []
    runs = []
    if launcher.is_root:
        settings = TrainSettings.from_args(args, progress=not args.quiet)
        worker_threads = blas_threads()
        for requested in args.baseline_threads:
            threads = pin_blas_threads(launcher.cores if requested == "all" else requested)
            member_timer = PhaseTimer()
            with timer.phase("baseline"):
                # Same trainer, model, epochs and seed as rank 0's member, on all the data.
                out = train_member(0, data.x_train, data.y_train, data.x_test, settings, member_timer)
            y_pred = out.probs.argmax(axis=1)
            runs.append({"threads": threads, "requested": requested,
                         "train_s": member_timer.seconds("train"), "predict_s": member_timer.seconds("predict"),
                         "accuracy": accuracy(data.y_test, y_pred), "y_pred": y_pred,
                         "final_train_loss": out.losses[-1] if out.losses else None})
        pin_blas_threads(worker_threads)
    elif launcher.rank == reporter:
        from . import plots

        plots.preload()  # on the core the 1-thread baseline leaves free
    launcher.wait_for_root()
    return runs


# -- drawing the figures on an idle rank -----------------------------------------
# The figures' libraries take over a second to import (seaborn brings pandas).
# Under MPI, rank 1 is idle while the root trains the 1-thread baseline: it
# imports them on the core the baseline leaves free, then draws every figure
# while the root writes the rest of the report.
def _reporter_rank(launcher, args):
    """1 when rank 1 can draw the figures (same node, a core free during the baseline), else 0."""
    if launcher.comm is None or launcher.size < 2 or args.no_plots or args.show or args.no_baseline:
        return 0
    most_threads = max(launcher.cores if t == "all" else t for t in args.baseline_threads)
    if most_threads >= launcher.cores or not launcher.same_node(0, 1):
        return 0
    return 1


def _remote_drawing(launcher, reporter):
    """A ``draw`` for report.write_run that ships what the figures need to ``reporter``."""
    def draw(run_dir, results, data, headline, baselines, args):
        slim_headline = {k: headline.get(k) for k in ("y_pred", "accuracy", "shard_sizes")}
        slim_baselines = [{k: b[k] for k in ("y_pred", "threads", "accuracy")} for b in baselines[:1]]
        launcher.comm.send((str(run_dir), results, data.y_test, slim_headline, slim_baselines, args),
                           dest=reporter, tag=_DRAW_TAG)
        ok, answer = launcher.comm.recv(source=reporter, tag=_DRAW_TAG)
        if not ok:
            raise MlpcoreError(f"rank {reporter} could not draw the figures: {answer}")
        return answer
    return draw


def _draw_for_root(launcher):
    from pathlib import Path
    from types import SimpleNamespace

    from . import plots

    run_dir, results, y_test, headline, baselines, args = launcher.comm.recv(source=0, tag=_DRAW_TAG)
    try:
        files = plots.run_figures(Path(run_dir), results, SimpleNamespace(y_test=y_test), headline, baselines, args)
        answer = (True, files)
    except Exception as exc:  # noqa: BLE001 - reported by the root, which owns the run's outcome
        answer = (False, f"{type(exc).__name__}: {exc}")
    launcher.comm.send(answer, dest=0, tag=_DRAW_TAG)


_DRAW_TAG = 41


def _phase_totals(spans):
    totals = {}
    for name, start, end in spans:
        totals[name] = totals.get(name, 0.0) + (end - start)
    return totals


def _results(args, launcher, data, outcomes, baselines, timer, spans, parallel_total_s):
    """The results.json document (root only)."""
    headline = outcomes[args.strategy]
    root_spans = timer.spans
    if spans is None:  # joblib/serial: worker spans came back with the outputs
        spans = [list(s) for s in headline["worker_spans"]]
        spans[0] = root_spans + spans[0]
    per_rank = []
    for rank, rank_spans in enumerate(spans):
        totals = _phase_totals(rank_spans)
        per_rank.append({"rank": rank, **{f"{k}_s": round(totals.get(k, 0.0), 6) for k in
                                          ("load", "wait", "scatter", "setup", "train", "predict", "gather",
                                           "comm_exposed")},
                         "threads": headline["threads_per_worker"][rank]})
        if "comm_exposed_per_rank" in headline:  # measured over every step, not only the traced ones
            per_rank[-1]["comm_exposed_s"] = headline["comm_exposed_per_rank"][rank]
    parallel_train_s = headline["parallel_train_s"]
    load_s = per_rank[0]["load_s"]

    timings = {"parallel_train_s": parallel_train_s, "parallel_total_s": parallel_total_s,
               "load_s": load_s, "vote_s": _phase_totals(root_spans).get("vote", 0.0), "per_rank": per_rank,
               "baseline_train_s": None, "baseline_total_s": None, "baselines": []}
    metrics = dict(headline["metrics"])
    metrics["accuracy"] = headline["accuracy"]
    speed = {}
    for i, b in enumerate(baselines):
        total = load_s + b["train_s"] + b["predict_s"]  # sequential end to end
        entry = {"threads": b["threads"], "requested": b["requested"], "train_s": b["train_s"],
                 "predict_s": b["predict_s"], "total_s": total, "accuracy": b["accuracy"],
                 "final_train_loss": b["final_train_loss"],
                 "speedup_train": speedup(b["train_s"], parallel_train_s),
                 "speedup_end_to_end": speedup(total, parallel_total_s)}
        entry["efficiency_train"] = efficiency(b["train_s"], parallel_train_s, launcher.size)
        entry["efficiency_end_to_end"] = efficiency(total, parallel_total_s, launcher.size)
        timings["baselines"].append(entry)
        if i == 0:
            timings["baseline_train_s"], timings["baseline_total_s"] = b["train_s"], total
            metrics["baseline_accuracy"] = b["accuracy"]
            speed = {"train": entry["speedup_train"], "end_to_end": entry["speedup_end_to_end"],
                     "efficiency_train": entry["efficiency_train"],
                     "efficiency_end_to_end": entry["efficiency_end_to_end"],
                     "baseline_threads": b["threads"]}
    if len(timings["baselines"]) > 1:
        best = min(timings["baselines"][1:], key=lambda e: e["train_s"])
        speed["vs_multithreaded"] = {"baseline_threads": best["threads"], "train": best["speedup_train"],
                                     "end_to_end": best["speedup_end_to_end"]}

    compare = {}
    for name, outcome in outcomes.items():
        compare[name] = {k: outcome.get(k) for k in ("accuracy", "comm", "final_train_loss", "overlap")}
        compare[name]["parallel_train_s"] = outcome["parallel_train_s"]
    environment = _environment(launcher, headline, args)
    return {
        "config": config_dict(args),
        "environment": environment,
        "data": {"origin": data.origin, "n_train": data.n_train, "n_test": data.n_test,
                 "shard_sizes": headline.get("shard_sizes")},
        "timings": timings,
        "metrics": metrics,
        "speedup": speed,
        "strategy": {"name": args.strategy, **{k: v for k, v in headline.items()
                                               if k in ("comm", "final_train_loss", "overlap")}},
        "compare": compare if args.compare else None,
        "spans": [[list(s) for s in rank_spans] for rank_spans in spans],
        "warnings": _warnings(environment),
    }


def _warnings(env):
    notes = []
    if env["oversubscribed"]:
        threads = ",".join(map(str, sorted(set(env["threads_per_worker"]))))
        notes.append(f"{env['world_size']} workers x {threads} BLAS thread(s) on {env['cores']} cores: "
                     "workers share cores, so the parallel times include time-slicing")
    return notes


def _environment(launcher, headline, args):
    import importlib.metadata as md

    from . import fpenv, kernels

    versions = {"python": platform.python_version()}
    for pkg in ("numpy", "numba", "mpi4py", "mpich", "joblib", "threadpoolctl", "scikit-learn", "matplotlib"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    from threadpoolctl import threadpool_info

    env = launcher.describe()
    # Judge by the threads the workers actually ran with (a BLAS pool loaded
    # after the pinning would run more than requested), not only by the request.
    measured = max(t for t in headline["threads_per_worker"] if t) if any(headline["threads_per_worker"]) else 1
    env["oversubscribed"] = bool(env["oversubscribed"] or launcher.workers_per_node * measured > launcher.cores)
    env.update({"threads_per_worker": headline["threads_per_worker"], "versions": versions,
                "hostname": platform.node(), "platform": platform.platform(),
                "blas": [{k: pool.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                         for pool in threadpool_info() if pool.get("user_api") == "blas"],
                "python_executable": sys.executable, "pid": os.getpid(),
                # Which implementation did the elementwise work (same results, different speed),
                # and whether denormal floats were flushed to zero while training.
                "kernels": "n/a (scikit-learn)" if args.trainer == "sklearn" else
                kernels.describe(kernels.get_kernels(args.kernels)),
                "denormals": fpenv.status()})
    return env
