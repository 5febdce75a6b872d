"""The ensemble strategy: one model per shard, then a vote.

Each worker trains an MLP on its shard of the training set (seed + rank) and
returns its test-set class probabilities; the root combines them by a soft vote
(mean probability) and a hard vote (majority, ties broken by summed
probability).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import numpy as np

from .comm import WorkerOutput, repin_blas_threads
from .data import to_float
from .kernels import get_kernels
from .train import Hyperparams, train_sequential


@dataclass(frozen=True)
class TrainSettings(Hyperparams):
    """What a worker needs to train one member (picklable for joblib)."""

    trainer: str = "numpy"
    progress: bool = False  # an epoch bar on stderr (rank 0, terminal only)
    checkpoint: object = None  # a checkpoint.CheckpointPlan (--checkpoint-every / --resume), or None

    @classmethod
    def from_args(cls, args, progress=False):
        return super().from_args(args, trainer=args.trainer, progress=progress)


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


def prepare_trainer(trainer, kernels, dtype):
    """Import and compile what training needs, so that none of it is timed as training.

    ``numpy``: numba's kernels are loaded from its cache (or compiled, the
    first time); ``sklearn``: scikit-learn is imported. Both bring scipy, whose
    own OpenBLAS arrives after this worker's BLAS threads were pinned, so the
    pin is applied again.
    """
    if trainer == "sklearn":
        import sklearn.neural_network  # noqa: F401
    else:
        get_kernels(kernels).warm_up(dtype)
    repin_blas_threads()


def train_member(rank, x, y, x_test, settings, timer):
    """Train one ensemble member on its shard and predict the test set.

    Runs inside whichever process the launcher gives it. ``x``/``x_test`` are
    raw uint8 pixels; the member scales them itself.
    """
    dtype = np.dtype(settings.dtype)
    seed = settings.seed + rank
    with timer.phase("setup"):  # instant where experiment.run has done it already (MPI ranks)
        prepare_trainer(settings.trainer, settings.kernels, dtype)
    bar = _epoch_bar(settings) if rank == 0 and settings.trainer != "sklearn" else None
    start = timer.now()
    with timer.phase("train"):
        if settings.trainer == "sklearn":
            model, losses = _train_sklearn(x, y, settings, seed)
        else:
            model, losses, _ = train_sequential(
                x, y, hidden=settings.hidden, epochs=settings.epochs, batch_size=settings.batch_size,
                seed=seed, dtype=dtype, lr=settings.lr, alpha=settings.alpha, kernels=settings.kernels,
                on_epoch=None if bar is None else (lambda epoch, loss: bar.update(1)),
                checkpoint=None if settings.checkpoint is None else settings.checkpoint.for_rank(rank))
            if bar is not None:
                bar.close()
    train_s = timer.now() - start
    with timer.phase("predict"):
        probs = model.predict_proba(to_float(x_test, dtype)).astype(np.float32, copy=False)
    return WorkerOutput(rank=rank, probs=probs, threads=0, losses=[float(v) for v in losses], n_train=len(x),
                        train_s=train_s)


def _train_sklearn(x, y, settings, seed):
    """scikit-learn's MLPClassifier with the same settings, as the reference program trained it."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=settings.hidden, activation="relu", solver="adam",
                        alpha=settings.alpha, batch_size=settings.batch_size, learning_rate_init=settings.lr,
                        max_iter=settings.epochs, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # max_iter is the epoch count here, so "not converged" is expected.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(to_float(x, np.dtype(settings.dtype)), y)
    return clf, list(clf.loss_curve_)


def _epoch_bar(settings):
    if not settings.progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=settings.epochs, desc="rank 0 epochs", unit="epoch", file=sys.stderr, leave=False)
