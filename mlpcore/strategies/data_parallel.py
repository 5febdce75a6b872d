"""Data-parallel strategies: one model trained by all ranks.

* **allreduce** - every rank holds a replica; each global mini-batch is split
  across the ranks; the gradients are summed with ``Allreduce`` so every rank
  takes the same Adam step. With ``--overlap`` the sum of each bucket of
  layers starts as soon as backprop has produced it (wait-free backprop, as in
  Poseidon, Horovod and PyTorch DDP), while the layers below are computed.
* **localsgd** - every rank trains on its own shard with its own Adam and the
  parameters are averaged every K steps (K = 0: once, at the end).

Two options of allreduce change how the gradients are combined and who steps
Adam (same batches, same buckets): ``--shard-optimizer`` (ZeRO-1,
:mod:`mlpcore.strategies.zero`) and ``--node-shm`` (node-local shared memory,
:mod:`mlpcore.strategies.node_shm`). With ``--compare`` they are rows of their
own (:data:`VARIANTS`).

Every rank issues the same collectives in the same order: the bucket plan
depends only on the model's shape and ``--bucket-kb``, which every rank
shares (the options are checked to agree at start-up).
"""

from __future__ import annotations

import time

import numpy as np

from ..data import N_CLASSES, shard_bounds, to_float
from ..errors import UsageError
from ..nn.model import build_model
from ..nn.optim import Adam
from ..nn.train import LocalSync, fit
from ..parallel.blas import pinned_threads
from .allreduce import TRACE_STEPS, AllreduceSync, CommStats, _no_watch  # noqa: F401 - re-exported
from .outcome import Outcome


class LocalSGDSync(LocalSync):
    """Train on the local shard; average the parameters every ``sync_every`` steps.

    ``sync_every = 0`` trains fully independent models and averages them once
    at the end ("one-shot" parameter averaging). Each rank keeps its own Adam
    moments; only the parameters are averaged.
    """

    def __init__(self, comm, model, n_samples, batch_size, rng, steps_per_epoch, sync_every, watch=None):
        super().__init__(n_samples, batch_size, rng)
        from mpi4py import MPI

        self.MPI, self.comm, self.model = MPI, comm, model
        self.watch = watch or _no_watch
        self.size = comm.Get_size()
        self.steps_per_epoch, self.sync_every = steps_per_epoch, sync_every
        self.stats = CommStats(sync="localsgd")
        self.steps = 0
        self._synced_at = 0

    def batches(self, epoch):
        # Shards differ by at most one sample, but every rank must take the same
        # number of steps so the averaging collectives match: split the local
        # permutation into the common number of steps.
        order = self.rng.permutation(self.n_samples)
        for rows in np.array_split(order, self.steps_per_epoch):
            yield rows, len(rows)

    @property
    def l2_batch(self):
        """The global batch: every rank's share together, so that the L2 strength is the sequential run's."""
        return self.batch_size * self.size

    def step(self, optimizer, local_batch):
        # The data gradient is this rank's local mean; the L2 term is scaled by the
        # global batch, as in allreduce and the sequential baseline (not N times stronger).
        optimizer.step(local_batch * self.size)
        self.steps += 1
        if self.sync_every and self.steps % self.sync_every == 0:
            self.average()

    def average(self):
        """Replace every rank's parameters by their mean."""
        self.watch("average")
        begin = time.perf_counter()
        self.comm.Allreduce(self.MPI.IN_PLACE, self.model.params)
        self.model.params *= self.model.dtype.type(1.0 / self.size)
        end = time.perf_counter()
        self.stats.calls += 1
        self.stats.bytes += self.model.params.nbytes
        self.stats.wire_bytes += 2 * self.model.params.nbytes * (self.size - 1) // self.size
        self.stats.total_s += end - begin
        self.stats.exposed_s += end - begin
        if len(self.stats.spans) < 2 * TRACE_STEPS:
            self.stats.spans.append(("comm", begin, end))
        self._synced_at = self.steps

    def end_epoch(self, loss_sum, n_seen):
        self.watch("epoch loss")
        total = self.comm.allreduce(np.array([loss_sum, n_seen]))
        return float(total[0] / total[1])

    def resume_at(self, epoch):
        """Continue after ``epoch`` checkpointed epochs: the averaging schedule counts steps."""
        self.steps = epoch * self.steps_per_epoch
        self._synced_at = self.steps - self.steps % self.sync_every if self.sync_every else 0

    def finish(self):
        if self._synced_at != self.steps:  # end with one model on every rank
            self.average()


def train_data_parallel(strategy, comm, x, y, config, on_epoch=None, initial_params=None, watch=None,
                        checkpoint=None):
    """Train one model with all ranks of ``comm``; returns ``(model, losses, stats)``.

    Parameters
    ----------
    strategy : {"allreduce", "localsgd"}
    comm : mpi4py communicator
    x, y : ndarray
        allreduce: the whole training set on every rank (uint8 pixels);
        localsgd: this rank's shard.
    config : RunConfig
        The model and optimiser options, ``overlap``, ``bucket_kb`` and ``sync_every``.
    on_epoch : callable(epoch, loss), optional
    initial_params : ndarray, optional
        Start from these parameters instead of rank 0's initialisation (tests
        use it to replay one rank's local-SGD run in a single process).
    watch : callable(name), optional
        Called on every rank before each blocking collective (the stall
        watchdog's :meth:`Launcher.watch`).
    checkpoint : mlpcore.strategies.checkpoint.RankCheckpoint, optional
        Resume from this rank's checkpoint and write new ones every E epochs.
    """
    watch = watch or _no_watch
    rank = comm.Get_rank()
    # allreduce: the same seed everywhere, so every rank draws the same sample
    # order. localsgd: seed + rank, so the ranks' shards are shuffled differently.
    rng = np.random.default_rng(config.seed if strategy == "allreduce" else config.seed + rank)
    model = build_model(config.model, n_features=x.shape[1], n_classes=N_CLASSES, hidden=config.hidden,
                        dtype=np.dtype(config.dtype), rng=rng, kernels=config.kernels)
    if initial_params is not None:
        model.params[...] = initial_params
    watch("bcast params")
    comm.Bcast(model.params, root=0)  # identical replicas, whatever each rank's RNG did
    if strategy == "allreduce":
        sync = make_allreduce_sync(comm, model, x, config, rng, watch)
        optimizer = sync.make_optimizer(lr=config.lr, alpha=config.alpha)
    else:
        optimizer = Adam(model, lr=config.lr, alpha=config.alpha)
        # --batch-size is the global batch here too: each rank steps on its
        # share of it, so an epoch has as many steps as with allreduce.
        watch("shard sizes")
        n_total, size = comm.allreduce(len(x)), comm.Get_size()
        sizes = np.diff(shard_bounds(n_total, size))
        local_batch = min(max(1, config.batch_size // size), int(sizes.max()))
        # Never more steps than the smallest shard has samples: no rank gets an empty batch.
        steps = min(-(-int(sizes.max()) // local_batch), int(sizes.min()))
        sync = LocalSGDSync(comm, model, len(x), local_batch, rng, steps, config.sync_every, watch)
        sync.stats.optimizer_bytes = optimizer.nbytes
    start_epoch, done = 0, []
    if checkpoint is not None:
        # After the broadcast: a resumed rank's own saved state replaces it (for
        # allreduce every rank saved the same replica; for local SGD its own model).
        # --node-shm: the node's one copy of the parameters is written once, by its leader.
        start_epoch, done = checkpoint.restore(model, optimizer, rng, write_params=getattr(sync, "write_params", None))
        on_epoch = checkpoint.saver(model, optimizer, rng, done, then=on_epoch)
        sync.resume_at(start_epoch)
    losses = fit(model, optimizer, x, y, epochs=config.epochs, sync=sync, on_epoch=on_epoch,
                 start_epoch=start_epoch, losses=done)
    return model, losses, sync.stats


def make_allreduce_sync(comm, model, x, config, rng, watch):
    """The sync of ``--strategy allreduce``: plain, ``--shard-optimizer`` (ZeRO-1) or ``--node-shm``."""
    args = (comm, model, len(x), config.batch_size, rng, config.overlap, config.bucket_kb, watch)
    if config.node_shm:
        from .node_shm import NodeShmSync

        return NodeShmSync(*args, n_features=x.shape[1], shard_optimizer=config.shard_optimizer)
    if config.shard_optimizer:
        from .zero import ZeroSync

        return ZeroSync(*args, n_features=x.shape[1])
    return AllreduceSync(*args)


#: ``--compare`` rows of their own for the allreduce options: name -> (shard_optimizer, node_shm).
VARIANTS = {"zero1": (True, False), "node-shm": (False, True), "shm+zero1": (True, True)}


def compare_variants(config):
    """The :data:`VARIANTS` rows ``--compare`` adds: those the options ask for (both: all three)."""
    return tuple(name for name, (shard, shm) in VARIANTS.items()
                 if (shard or shm) and (shard <= config.shard_optimizer) and (shm <= config.node_shm))


def run_allreduce(config, launcher, data, timer, plan=None):
    """allreduce: every rank a replica, each global batch split, the gradients summed every step.

    With ``--compare`` this row is plain allreduce; the options' rows are :func:`run_variant`'s.
    """
    if config.compare:
        config = config.replace(shard_optimizer=False, node_shm=False)
    return _run("allreduce", config, launcher, data, timer, plan)


def run_variant(name):
    """The ``--compare`` row ``name`` of :data:`VARIANTS`: allreduce with those options."""
    shard, shm = VARIANTS[name]

    def run(config, launcher, data, timer, plan=None):
        return _run(name, config.replace(shard_optimizer=shard, node_shm=shm), launcher, data, timer, plan)

    run.__name__ = run.__qualname__ = f"run_{name.replace('-', '_').replace('+', '_')}"
    run.__doc__ = f"--compare row {name!r}: allreduce with --shard-optimizer {shard}, --node-shm {shm}."
    return run


def run_localsgd(config, launcher, data, timer, plan=None):
    """localsgd: every rank trains on its shard; the models are averaged every ``sync_every`` steps."""
    return _run("localsgd", config, launcher, data, timer, plan)


def _run(name, config, launcher, data, timer, plan):
    """Distribute the data, train one model with every rank, predict on the root (the :class:`Outcome`)."""
    if launcher.comm is None:
        raise UsageError(f"--strategy {name} needs MPI (mpirun)")
    kind = "localsgd" if name == "localsgd" else "allreduce"
    root = launcher.is_root
    with timer.phase("scatter"):
        if kind == "allreduce":
            x, y = launcher.bcast_train(data.x_train if root else None, data.y_train if root else None)
            comm_bytes = {"bcast_bytes": int(x.nbytes + y.nbytes) * (launcher.size - 1)}
        else:
            x, y = launcher.scatter_shards(data.x_train if root else None, data.y_train if root else None)
            comm_bytes = {"scatter_bytes": launcher.comm.allreduce(int(x.nbytes + y.nbytes))}
    with timer.phase("train"):
        train_start = time.perf_counter()
        model, losses, stats = train_data_parallel(
            kind, launcher.comm, x, y, config, watch=launcher.watch,
            checkpoint=None if plan is None else plan.for_rank(launcher.rank))
        train_s = time.perf_counter() - train_start
    for span_name, start, end in stats.spans:  # a few steps' communication, for the timeline
        timer.spans.append((span_name, start - timer.t0, end - timer.t0))

    with timer.phase("gather"):
        launcher.watch("gather")
        per_rank = launcher.comm.gather((train_s, stats.as_dict(), pinned_threads()), root=0)
    if not root:
        return None
    with timer.phase("predict"):
        y_pred = model.predict(to_float(data.x_test, model.dtype))
    comm_stats = [s for _, s, _ in per_rank]
    overlap = {k: max(s[k] for s in comm_stats) for k in ("total_s", "exposed_s")}
    overlap.update(calls=comm_stats[0]["calls"], bytes=comm_stats[0]["bytes"],
                   fraction=min(s["fraction"] for s in comm_stats),
                   mode=config.overlap if kind == "allreduce" else f"sync every {config.sync_every}",
                   # How the gradients were combined, and what it cost each rank in memory and traffic.
                   sync=comm_stats[0]["sync"],
                   optimizer_bytes_per_rank=[s["optimizer_bytes"] for s in comm_stats],
                   wire_bytes_per_rank=[s["wire_bytes"] for s in comm_stats],
                   shm_bytes_per_rank=[s["shm_bytes"] for s in comm_stats],
                   steps=comm_stats[0]["steps"],
                   # Per rank, seconds of the training phase by part (the rest is forward and backward).
                   breakdown_per_rank=[{"train_s": t, **s["breakdown"]} for t, s, _ in per_rank])
    return Outcome(
        strategy=name,
        y_pred=y_pred,
        parallel_train_s=max(t for t, _, _ in per_rank),
        threads_per_worker=[threads for _, _, threads in per_rank],
        final_train_loss=losses[-1] if losses else None,
        comm={**comm_bytes, "train_bytes": overlap["bytes"] * launcher.size, "train_calls": overlap["calls"]},
        overlap=overlap,
        comm_exposed_per_rank=[s["exposed_s"] for s in comm_stats],
    )
