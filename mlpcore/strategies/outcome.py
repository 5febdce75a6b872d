"""What a strategy hands back to the experiment on the root: one typed :class:`Outcome`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Outcome:
    """The result of training with one strategy, on the root.

    Attributes
    ----------
    strategy : str
        ``"ensemble"``, ``"allreduce"`` or ``"localsgd"``.
    y_pred : ndarray of int, shape (n_test,)
        The headline test-set predictions (for the ensemble: of the ``--vote``).
        How good they are is measured by the caller (:func:`mlpcore.results.scores`).
    parallel_train_s : float
        Training time of the slowest worker: the speed-up's denominator.
    threads_per_worker : list of int
        BLAS threads each worker ran with (measured, not requested).
    final_train_loss : float, list of float or None
        The last epoch's training loss (the ensemble: one per member).
    comm : dict
        Bytes moved by phase (``scatter_bytes``, ``bcast_bytes``, ``gather_bytes``,
        ``train_bytes``) and, for data-parallel training, ``train_calls``.
    shard_sizes : list of int or None
        Training samples per worker (the ensemble's shards).
    member_probs : ndarray or None
        The ensemble members' test probabilities, (members, n_test, classes).
    votes : dict or None
        The ensemble's predictions by each vote, ``{"soft": ..., "hard": ...}``.
    worker_spans : list or None
        joblib/serial: each worker's phase spans (MPI gathers them separately).
    worker_peak_rss_mb : list of float or None
        joblib/serial: each worker process's peak resident memory (MPI gathers it separately).
    overlap : dict or None
        Data-parallel training: the communication summary (calls, bytes,
        total_s in flight, exposed_s, fraction hidden, mode).
    comm_exposed_per_rank : list of float or None
        Data-parallel training: seconds each rank waited for communication.
    """

    strategy: str
    y_pred: np.ndarray
    parallel_train_s: float
    threads_per_worker: list
    final_train_loss: object
    comm: dict
    shard_sizes: list | None = None
    member_probs: np.ndarray | None = None
    votes: dict | None = None
    worker_spans: list | None = None
    worker_peak_rss_mb: list | None = None
    overlap: dict | None = None
    comm_exposed_per_rank: list | None = None
