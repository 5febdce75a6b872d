"""The ensemble strategy: one model per shard, then a vote.

Each worker trains a model on its shard of the training set (seed + rank) and
returns its test-set class probabilities; the root combines them by a soft vote
(mean probability) and a hard vote (majority, ties broken by summed
probability). The launcher decides where the workers run (MPI ranks, joblib
processes, one after another); :func:`train_member` is what each one runs, and
the sequential baseline is the same function on all the data.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import numpy as np

from ..data import N_CLASSES, to_float
from ..nn.kernels import get_kernels
from ..nn.model import THREADED_KERNEL_MODELS
from ..nn.train import train_sequential
from ..parallel.blas import blas_on_calling_thread, pinned_threads, repin_blas_threads
from ..parallel.launchers import WorkerOutput
from .outcome import Outcome


@dataclass(frozen=True)
class MemberJob:
    """What a worker needs to train one member (small and picklable, for joblib).

    Attributes
    ----------
    config : RunConfig
        The run's options (model, optimiser, seed, trainer, progress bar).
    checkpoint : CheckpointPlan or None
        ``--checkpoint-every`` / ``--resume`` (:mod:`mlpcore.strategies.checkpoint`).
    """

    config: object
    checkpoint: object = None


def soft_vote(probs):
    """Class with the highest mean probability across members.

    Parameters
    ----------
    probs : ndarray, shape (n_members, n_samples, n_classes)

    Returns
    -------
    ndarray of int, shape (n_samples,)
    """
    return probs.sum(axis=0).argmax(axis=1)


def hard_vote(probs):
    """Majority vote of the members' predicted classes.

    A tie between classes with the same number of votes goes to the one with
    the larger summed probability, not to the lowest label (which is what
    ``np.bincount(votes).argmax()`` would pick).

    Parameters
    ----------
    probs : ndarray, shape (n_members, n_samples, n_classes)

    Returns
    -------
    ndarray of int, shape (n_samples,)
    """
    n_members, n_samples, n_classes = probs.shape
    votes = probs.argmax(axis=2)                                   # (members, samples)
    counts = np.zeros((n_samples, n_classes), dtype=np.intp)
    np.add.at(counts, (np.arange(n_samples)[None, :], votes), 1)   # votes per class
    summed = probs.sum(axis=0)
    # Among the classes with the most votes, take the most probable; summed
    # probability is < n_members, so it never outweighs a whole vote.
    is_top = counts == counts.max(axis=1, keepdims=True)
    return np.where(is_top, summed, -np.inf).argmax(axis=1)


def prepare_trainer(trainer, kernels, dtype, model="mlp"):
    """Import and compile what training needs, so that none of it is timed as training.

    ``numpy``: numba's kernels are loaded from its cache (or compiled, the
    first time); ``sklearn``: scikit-learn is imported. Both bring scipy, whose
    own OpenBLAS arrives after this worker's BLAS threads were pinned, so the
    pin is applied again. The worker's threads go to BLAS, except for a model
    with threaded kernels (a CNN): those take them, and BLAS runs on the
    calling thread (:func:`mlpcore.parallel.blas.blas_on_calling_thread`).
    """
    if trainer == "sklearn":
        import sklearn.neural_network  # noqa: F401
    else:
        get_kernels(kernels).warm_up(dtype)
    repin_blas_threads()
    if trainer != "sklearn":
        threads = pinned_threads()
        get_kernels(kernels).set_threads(threads)
        if threads > 1 and model in THREADED_KERNEL_MODELS:
            blas_on_calling_thread()


def train_member(rank, x, y, x_test, job, timer):
    """Train one ensemble member on its shard and predict the test set.

    Runs inside whichever process the launcher gives it. ``x``/``x_test`` are
    raw uint8 pixels; the member scales them itself. ``job``: a :class:`MemberJob`.
    """
    config = job.config
    dtype = np.dtype(config.dtype)
    seed = config.seed + rank
    with timer.phase("setup"):  # instant where the experiment has done it already (MPI ranks)
        prepare_trainer(config.trainer, config.kernels, dtype, config.model)
    bar = _epoch_bar(config) if rank == 0 and config.trainer != "sklearn" else None
    start = timer.now()
    with timer.phase("train"):
        if config.trainer == "sklearn":
            model, losses = _train_sklearn(x, y, config, seed)
        else:
            model, losses, _ = train_sequential(
                x, y, model=config.model, hidden=config.hidden, epochs=config.epochs, batch_size=config.batch_size,
                seed=seed, dtype=dtype, lr=config.lr, alpha=config.alpha, kernels=config.kernels,
                n_classes=N_CLASSES, on_epoch=None if bar is None else (lambda epoch, loss: bar.update(1)),
                checkpoint=None if job.checkpoint is None else job.checkpoint.for_rank(rank))
            if bar is not None:
                bar.close()
    train_s = timer.now() - start
    with timer.phase("predict"):
        probs = model.predict_proba(to_float(x_test, dtype)).astype(np.float32, copy=False)
    return WorkerOutput(rank=rank, probs=probs, threads=0, losses=[float(v) for v in losses], n_train=len(x),
                        train_s=train_s)


def _train_sklearn(x, y, config, seed):
    """scikit-learn's MLPClassifier with the same settings, as the reference program trained it."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=config.hidden, activation="relu", solver="adam",
                        alpha=config.alpha, batch_size=config.batch_size, learning_rate_init=config.lr,
                        max_iter=config.epochs, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # max_iter is the epoch count here, so "not converged" is expected.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(to_float(x, np.dtype(config.dtype)), y)
    return clf, list(clf.loss_curve_)


def _epoch_bar(config):
    if not config.progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=config.epochs, desc="rank 0 epochs", unit="epoch", file=sys.stderr, leave=False)


def run(config, launcher, data, timer, plan=None):
    """The ensemble: scatter the shards, train a member on each worker, vote on the root.

    Returns the :class:`Outcome` on the root, None elsewhere.
    """
    x, y, x_test = (data.x_train, data.y_train, data.x_test) if launcher.is_root else (None, None, None)
    outputs = launcher.map_shards(train_member, x, y, x_test, MemberJob(config, plan), timer)
    if not launcher.is_root:
        return None
    with timer.phase("vote"):
        probs = np.stack([out.probs for out in outputs])
        predictions = {"soft": soft_vote(probs), "hard": hard_vote(probs)}
    return Outcome(
        strategy="ensemble",
        y_pred=predictions[config.vote],
        parallel_train_s=max(out.train_s for out in outputs),
        threads_per_worker=[out.threads for out in outputs],
        final_train_loss=[out.losses[-1] if out.losses else None for out in outputs],
        comm={"scatter_bytes": int(data.x_train.nbytes + data.y_train.nbytes),
              "bcast_bytes": int(data.x_test.nbytes) * (launcher.size - 1),
              "gather_bytes": int(probs.nbytes)},
        shard_sizes=[out.n_train for out in outputs],
        member_probs=probs,  # (members, n_test, classes): saved in predictions.npz
        votes=predictions,
        worker_spans=[out.spans for out in outputs],
        worker_peak_rss_mb=[out.peak_rss_mb for out in outputs],
    )
