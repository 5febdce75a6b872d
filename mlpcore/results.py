"""Typed results of a run, and the one function that turns them into the results.json contract.

A run's facts arrive typed: the strategies' :class:`~mlpcore.strategies.Outcome`,
each :class:`BaselineRun`, every rank's phase spans. :func:`build` measures
them (accuracies, speed-ups, efficiencies, per-rank phase totals) and lays
them out as the results.json document, whose keys the report, the scaling
study and users' scripts read:

``config``, ``environment``, ``data``, ``timings`` (``per_rank``,
``baselines``, ...), ``metrics``, ``speedup``, ``strategy``, ``compare``,
``spans``, ``warnings`` and, once written, ``files``.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys
from dataclasses import dataclass

import numpy as np

from .data import N_CLASSES
from .nn import fpenv, kernels
from .nn.model import THREADED_KERNEL_MODELS, build_model
from .parallel.launchers import peak_rss_mb
from .report.metrics import accuracy, efficiency, speedup

#: The per-rank phases results.json reports, each as ``<phase>_s``.
RANK_PHASES = ("load", "wait", "scatter", "setup", "train", "predict", "gather", "comm_exposed")


@dataclass
class BaselineRun:
    """One sequential baseline: the same trainer and seed as rank 0's member, on all the data."""

    threads: int           # BLAS threads it ran with
    requested: object      # what --baseline-threads asked for (an int or "all")
    train_s: float
    predict_s: float
    y_pred: np.ndarray
    final_train_loss: float | None


def scores(outcome, y_test):
    """``(accuracy, metrics)`` of a strategy's outcome on the test labels.

    The ensemble's metrics hold both votes and each member's accuracy; a
    data-parallel strategy's, its one model's accuracy.
    """
    headline = accuracy(y_test, outcome.y_pred)
    if outcome.member_probs is None:
        return headline, {"accuracy": headline}
    return headline, {"vote_soft_accuracy": accuracy(y_test, outcome.votes["soft"]),
                      "vote_hard_accuracy": accuracy(y_test, outcome.votes["hard"]),
                      "member_accuracy": [accuracy(y_test, p.argmax(axis=1)) for p in outcome.member_probs]}


def phase_totals(spans):
    """``{phase: seconds}`` summed over ``(name, start, end)`` spans."""
    totals = {}
    for name, start, end in spans:
        totals[name] = totals.get(name, 0.0) + (end - start)
    return totals


def build(config, launcher, data, outcomes, baselines, root_spans, spans, peak_rss, *, parallel_total_s,
          parallel_started_at_s, resumed_from=None):
    """The results.json document (on the root).

    Parameters
    ----------
    config : RunConfig
    launcher : Launcher
    data : MNIST
    outcomes : dict of str to Outcome
        Per strategy trained (one, or all with ``--compare``).
    baselines : list of BaselineRun
    root_spans : list
        The root's own phase spans.
    spans : list of list, or None
        Every rank's spans (MPI); None when they came back with the workers' outputs.
    peak_rss : list of float, or None
        Every rank's peak resident memory in MB (MPI); None: in the workers' outputs.
    parallel_total_s : float
        End to end: load + distribute + train + combine of the headline strategy.
    parallel_started_at_s : float
        When the parallel part began, on the run's clock (for the timeline).
    resumed_from : list of int, optional
        Per rank, the epoch a ``--resume`` continued from.
    """
    headline = outcomes[config.strategy]
    if spans is None:  # joblib/serial: worker spans came back with the outputs
        spans = [list(s) for s in headline.worker_spans]
        spans[0] = root_spans + spans[0]
    if peak_rss is None:  # joblib/serial: rank 0's row is the root process and worker 0 together
        peak_rss = list(headline.worker_peak_rss_mb)
        peak_rss[0] = max(peak_rss[0], peak_rss_mb())
    per_rank = []
    for rank, rank_spans in enumerate(spans):
        totals = phase_totals(rank_spans)
        per_rank.append({"rank": rank, **{f"{k}_s": round(totals.get(k, 0.0), 6) for k in RANK_PHASES},
                         "threads": headline.threads_per_worker[rank], "peak_rss_mb": peak_rss[rank]})
        if headline.comm_exposed_per_rank is not None:  # measured over every step, not only the traced ones
            per_rank[-1]["comm_exposed_s"] = headline.comm_exposed_per_rank[rank]
    parallel_train_s = headline.parallel_train_s
    load_s = per_rank[0]["load_s"]

    timings = {"parallel_train_s": parallel_train_s, "parallel_total_s": parallel_total_s,
               "load_s": load_s, "vote_s": phase_totals(root_spans).get("vote", 0.0), "per_rank": per_rank,
               "baseline_train_s": None, "baseline_total_s": None, "baselines": []}
    headline_accuracy, metrics = scores(headline, data.y_test)
    metrics["accuracy"] = headline_accuracy
    speed = {}
    for i, b in enumerate(baselines):
        total = load_s + b.train_s + b.predict_s  # sequential end to end
        entry = {"threads": b.threads, "requested": b.requested, "train_s": b.train_s,
                 "predict_s": b.predict_s, "total_s": total, "accuracy": accuracy(data.y_test, b.y_pred),
                 "final_train_loss": b.final_train_loss,
                 "speedup_train": speedup(b.train_s, parallel_train_s),
                 "speedup_end_to_end": speedup(total, parallel_total_s),
                 "efficiency_train": efficiency(b.train_s, parallel_train_s, launcher.size),
                 "efficiency_end_to_end": efficiency(total, parallel_total_s, launcher.size)}
        timings["baselines"].append(entry)
        if i == 0:
            timings["baseline_train_s"], timings["baseline_total_s"] = b.train_s, total
            metrics["baseline_accuracy"] = entry["accuracy"]
            speed = {"train": entry["speedup_train"], "end_to_end": entry["speedup_end_to_end"],
                     "efficiency_train": entry["efficiency_train"],
                     "efficiency_end_to_end": entry["efficiency_end_to_end"],
                     "baseline_threads": b.threads}
    if len(timings["baselines"]) > 1:
        best = min(timings["baselines"][1:], key=lambda e: e["train_s"])
        speed["vs_multithreaded"] = {"baseline_threads": best["threads"], "train": best["speedup_train"],
                                     "end_to_end": best["speedup_end_to_end"]}
    timings["parallel_started_at_s"] = parallel_started_at_s

    compare = {name: {"accuracy": scores(o, data.y_test)[0], "comm": o.comm,
                      "final_train_loss": o.final_train_loss, "overlap": o.overlap,
                      "parallel_train_s": o.parallel_train_s}
               for name, o in outcomes.items()}
    env = environment(launcher, headline, config)
    strategy = {"name": config.strategy, "comm": headline.comm, "final_train_loss": headline.final_train_loss}
    if headline.overlap is not None:
        strategy["overlap"] = headline.overlap
    results = {
        "config": config.as_dict(),
        "model": model_facts(config, data),
        "environment": env,
        "data": {"origin": data.origin, "n_train": data.n_train, "n_test": data.n_test,
                 "shard_sizes": headline.shard_sizes},
        "timings": timings,
        "metrics": metrics,
        "speedup": speed,
        "strategy": strategy,
        "compare": compare if config.compare else None,
        "spans": [[list(s) for s in rank_spans] for rank_spans in spans],
        "warnings": warnings(env),
    }
    if resumed_from is not None:
        results["resumed_from_epoch"] = list(resumed_from)
    return results


def model_facts(config, data):
    """The model's name, parameter count and training FLOPs per sample (results.json's ``model``).

    FLOPs: forward + weight gradients + input gradients of every layer but the
    first, a multiply-add counted as 2 (:meth:`Sequential.flops_per_sample`).
    ``--trainer sklearn`` trains the same architecture, so the same counts.
    """
    model = build_model(config.model, n_features=data.x_train.shape[1], n_classes=N_CLASSES, hidden=config.hidden,
                        dtype=np.dtype(config.dtype), rng=np.random.default_rng(0), kernels="numpy")
    return {"name": config.model, "n_params": model.n_params, "flops_per_sample": model.flops_per_sample(),
            "layers": [layer.spec() for layer in model.layers]}


def predictions(outcome, baselines, y_test):
    """The arrays of predictions.npz (plus ``y_test``, for the figures and reports)."""
    return {"y_test": y_test, "y_pred": outcome.y_pred, "member_probs": outcome.member_probs,
            "baseline_y_pred": baselines[0].y_pred if baselines else None}


def warnings(env):
    """Notes for the reader: oversubscribed cores."""
    notes = []
    if env["oversubscribed"]:
        threads = ",".join(map(str, sorted(set(env["threads_per_worker"]))))
        most = max(env["threads_per_worker"]) or 1
        fit = max(1, env["cores"] // most)
        notes.append(f"{env['world_size']} workers x {threads} BLAS thread(s) on {env['cores']} cores: "
                     "workers share cores, so the parallel times include time-slicing; for speed-ups that "
                     f"measure parallelism, run at most {fit} (mpirun -n {fit} or --jobs {fit}"
                     + (", or --threads 1)" if most > 1 else ")"))
    return notes


def environment(launcher, headline, config):
    """What ran where: launcher, cores, threads, BLAS, kernels, versions (results.json's ``environment``)."""
    from threadpoolctl import threadpool_info

    versions = {"python": platform.python_version()}
    for pkg in ("numpy", "numba", "mpi4py", "mpich", "joblib", "threadpoolctl", "scikit-learn", "matplotlib"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    env = launcher.describe()
    # Judge by the threads the workers actually ran with (a BLAS pool loaded
    # after the pinning would run more than requested), not only by the request.
    measured = max(t for t in headline.threads_per_worker if t) if any(headline.threads_per_worker) else 1
    env["oversubscribed"] = bool(env["oversubscribed"] or launcher.workers_per_node * measured > launcher.cores)
    env.update({"threads_per_worker": headline.threads_per_worker, "versions": versions,
                "hostname": platform.node(), "platform": platform.platform(),
                "blas": [{k: pool.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                         for pool in threadpool_info() if pool.get("user_api") == "blas"],
                "python_executable": sys.executable, "pid": os.getpid(),
                # Which implementation did the elementwise work (same results, different speed),
                # and whether denormal floats were flushed to zero while training.
                "kernels": "n/a (scikit-learn)" if config.trainer == "sklearn" else
                kernels.describe(kernels.get_kernels(config.kernels)),
                "denormals": fpenv.status(),
                # Who used the workers' threads in training: BLAS, or (a CNN) the conv kernels, BLAS
                # then on the calling thread (mlpcore.strategies.ensemble.prepare_trainer).
                "threads_used_by": "n/a (scikit-learn)" if config.trainer == "sklearn" else
                "conv kernels (BLAS on the calling thread)" if config.model in THREADED_KERNEL_MODELS else "BLAS"})
    return env
