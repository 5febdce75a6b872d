"""The training loop shared by every strategy.

One loop trains the sequential baseline, each ensemble member, every
data-parallel replica and every local-SGD worker. What differs between them is
*where the ranks talk*, and that is a :class:`Sync` object's job:

* which rows of the data this process uses for each step (``batches``);
* what happens while backprop produces the gradients (``on_grads_ready``:
  start an ``Iallreduce`` of each finished bucket, for data-parallel training);
* the optimizer step (``step``: wait for each bucket and update its part of
  the parameters; for local SGD, average the model every K steps).

:class:`LocalSync` is the no-communication case.
"""

from __future__ import annotations

import time

import numpy as np

from .fpenv import flush_denormals
from .model import Sequential, build_model
from .optim import Adam


class LocalSync:
    """No communication: shuffle the local data each epoch and step on each batch."""

    def __init__(self, n_samples, batch_size, rng):
        self.n_samples = n_samples
        self.batch_size = min(batch_size, n_samples)  # as scikit-learn: min(200, n_samples)
        self.rng = rng

    def batches(self, epoch):
        """Yield ``(rows, global_batch_size)`` for each step of an epoch."""
        order = self.rng.permutation(self.n_samples)
        for start in range(0, self.n_samples, self.batch_size):
            rows = order[start:start + self.batch_size]
            yield rows, len(rows)

    #: Values per block of a weight gradient that backprop hands over at once (None: whole layers).
    grad_chunk = None

    def on_grads_ready(self, ready):
        """Backprop has finished the first ``ready`` values of ``model.grads``."""

    @property
    def l2_batch(self):
        """The batch size the L2 term is scaled by (``alpha / 2 * ||W||^2 / batch``): the global batch."""
        return self.batch_size

    def step(self, optimizer, global_batch):
        """The optimizer step, with whatever communication it needs."""
        optimizer.step(global_batch)

    def end_epoch(self, loss_sum, n_seen):
        """Return the epoch's mean loss (across ranks, for syncs that communicate)."""
        return loss_sum / n_seen

    def finish(self):
        pass


class BatchLoader:
    """Turns rows of the uint8 training set into float batches without allocating."""

    def __init__(self, x, dtype, kernels):
        self.x = np.ascontiguousarray(x)  # a copy only if it is not contiguous already
        self.dtype = np.dtype(dtype)
        self.kernels = kernels
        self._batches = {}

    def __call__(self, rows):
        n = len(rows)
        if n not in self._batches:
            self._batches[n] = np.empty((n, self.x.shape[1]), dtype=self.dtype)
        self.kernels.gather_scaled(self.x, rows, self._batches[n])
        return self._batches[n]


class FloatBatchLoader:
    """Rows of a float training set, already scaled, as batches in the model's dtype (the estimator's input).

    The array is converted to the model's dtype once; each batch is a gather
    into a reused buffer. uint8 pixels go through :class:`BatchLoader` instead.
    """

    def __init__(self, x, dtype):
        self.x = np.ascontiguousarray(x, dtype=dtype)
        self._batches = {}

    def __call__(self, rows):
        n = len(rows)
        if n not in self._batches:
            self._batches[n] = np.empty((n, self.x.shape[1]), dtype=self.x.dtype)
        np.take(self.x, rows, axis=0, out=self._batches[n])
        return self._batches[n]


def fit(model: Sequential, optimizer: Adam, x, y, *, epochs, sync, on_epoch=None, start_epoch=0, losses=(),
        flush=True, stop=None):
    """Train ``model`` in place for ``epochs`` passes.

    Parameters
    ----------
    model : Sequential
    optimizer : Adam
    x : ndarray of uint8, shape (n_samples, n_features)
        Raw pixels; batches are scaled to [0, 1] as they are drawn. A float
        array is used as it is (converted to the model's dtype once, not
        scaled): :class:`FloatBatchLoader`.
    y : ndarray of int, shape (n_samples,)
    epochs : int
    sync : LocalSync or a strategy's sync object
        Decides the batches and where ranks communicate.
    on_epoch : callable(epoch, loss), optional
        Called after each epoch (progress bars, checkpoints).
    start_epoch : int, default 0
        Epochs already done (resuming from a checkpoint: the model, optimizer
        and the sync's RNG must already hold that checkpoint's state).
    losses : sequence of float
        The losses of those ``start_epoch`` epochs, to which the new ones are added.
    flush : bool, default True
        Flush denormal floats to zero while training (:mod:`mlpcore.nn.fpenv`);
        False only to measure what that buys.
    stop : callable(epoch, loss) -> bool, optional
        Called after ``on_epoch``; True ends training after this epoch (the
        stopping rule of :class:`mlpcore.estimator.MLPClassifier`).

    Returns
    -------
    losses : list of float
        Mean training loss of each epoch, L2 penalty included.
    """
    x = np.asarray(x)
    load = BatchLoader(x, model.dtype, model.kernels) if x.dtype == np.uint8 else FloatBatchLoader(x, model.dtype)
    y = np.ascontiguousarray(y, dtype=np.intp)
    losses = list(losses)
    with flush_denormals(flush):
        _epochs(model, optimizer, load, y, epochs, sync, on_epoch, start_epoch, losses, stop)
    sync.finish()
    return losses


def _epochs(model, optimizer, load, y, epochs, sync, on_epoch, start_epoch, losses, stop=None):
    for epoch in range(start_epoch, epochs):
        loss_sum, n_seen = 0.0, 0
        for rows, global_batch in sync.batches(epoch):
            xb, yb = load(rows), y[rows]
            probs = model.forward(xb)
            loss_sum += model.kernels.cross_entropy_sum(probs, yb)
            n_seen += len(rows)
            for ready in model.backward(yb, 1.0 / global_batch, chunk=sync.grad_chunk):
                sync.on_grads_ready(ready)
            sync.step(optimizer, global_batch)
        loss = sync.end_epoch(loss_sum, n_seen) + model.l2_penalty(optimizer.alpha, sync.l2_batch)
        losses.append(loss)
        if on_epoch is not None:
            on_epoch(epoch, loss)
        if stop is not None and stop(epoch, loss):
            break


def train_sequential(x, y, *, hidden, epochs, batch_size, seed, dtype=np.float32, lr=1e-3, alpha=1e-4,
                     n_classes=10, on_epoch=None, checkpoint=None, kernels="auto", flush=True, model="mlp"):
    """Train one model on ``(x, y)`` in this process; returns ``(model, losses, seconds)``.

    ``model``: the name :func:`mlpcore.nn.model.build_model` builds.
    ``checkpoint``: an object with ``restore(model, optimizer, rng)`` and
    ``saver(model, optimizer, rng, losses, then)`` (a
    :class:`mlpcore.strategies.checkpoint.RankCheckpoint`) to resume from and to
    write every few epochs (None: neither). ``kernels`` and ``flush``: see
    :class:`mlpcore.nn.model.Sequential` and :func:`fit`. The seconds are those
    of :func:`fit` alone (the kernels are compiled before).
    """
    rng = np.random.default_rng(seed)
    model = build_model(model, n_features=x.shape[1], n_classes=n_classes, hidden=hidden, dtype=dtype, rng=rng,
                        kernels=kernels)
    optimizer = Adam(model, lr=lr, alpha=alpha)
    start_epoch, done = 0, []
    if checkpoint is not None:
        start_epoch, done = checkpoint.restore(model, optimizer, rng)
        on_epoch = checkpoint.saver(model, optimizer, rng, done, then=on_epoch)
    start = time.perf_counter()
    losses = fit(model, optimizer, x, y, epochs=epochs, sync=LocalSync(len(x), batch_size, rng),
                 on_epoch=on_epoch, start_epoch=start_epoch, losses=done, flush=flush)
    return model, losses, time.perf_counter() - start
