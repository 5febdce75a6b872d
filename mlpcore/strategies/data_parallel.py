"""Data-parallel strategies: one model trained by all ranks.

* **allreduce** - every rank holds a replica; each global mini-batch is split
  across the ranks; the gradients are summed with ``Allreduce`` so every rank
  takes the same Adam step. With ``--overlap`` the sum of each bucket of
  layers starts as soon as backprop has produced it (wait-free backprop, as in
  Poseidon, Horovod and PyTorch DDP), while the layers below are computed.
* **localsgd** - every rank trains on its own shard with its own Adam and the
  parameters are averaged every K steps (K = 0: once, at the end).

Every rank issues the same collectives in the same order: the bucket plan
depends only on the model's shape and ``--bucket-kb``, which every rank
shares (the options are checked to agree at start-up).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..data import N_CLASSES, shard_bounds, to_float
from ..errors import UsageError
from ..nn.fpenv import flush_denormals
from ..nn.model import build_model
from ..nn.optim import Adam
from ..nn.train import LocalSync, fit
from ..parallel.blas import blas_threads
from ..parallel.launchers import require_thread_multiple
from ..parallel.timing import PhaseTimer
from .outcome import Outcome

#: Per-step compute/communication spans are kept for this many steps only, so
#: that trace.json stays small while still showing the overlap.
TRACE_STEPS = 30


@dataclass
class CommStats:
    """What the communication cost during training, on one rank."""

    calls: int = 0
    bytes: int = 0
    total_s: float = 0.0    # wall time the communication was in flight
    exposed_s: float = 0.0  # time training waited for it
    spans: list = field(default_factory=list)  # ("comm"/"comm_wait", start, end) for the first steps

    def as_dict(self):
        fraction = 1.0 - self.exposed_s / self.total_s if self.total_s > 0 else 0.0
        return {"calls": self.calls, "bytes": self.bytes, "total_s": self.total_s,
                "exposed_s": self.exposed_s, "fraction": max(0.0, fraction)}


class AllreduceSync(LocalSync):
    """Split each global batch across ranks and sum the gradients with (I)Allreduce.

    Every rank draws the same permutation (same seed), so the global sample
    order is that of a sequential run with the same batch size; rank ``r``
    takes the ``r``-th part of each global batch.

    Buckets: backprop hands over the gradient in blocks of rows (about
    ``bucket_kb`` each; small layers are fused until a bucket is that big).
    Each bucket is summed as soon as it is complete - while backprop computes
    the next - and Adam updates its part of the parameters as soon as its sum
    has arrived, while later buckets are still in flight. The buckets depend
    only on the model's shape and ``bucket_kb``, so every rank issues the same
    collectives in the same order, and every overlap mode sends the same
    messages (hence the same sums, bit for bit).
    """

    def __init__(self, comm, model, n_samples, batch_size, rng, overlap="none", bucket_kb=256, watch=None):
        super().__init__(n_samples, batch_size, rng)
        if self.batch_size < comm.Get_size():
            raise UsageError(f"--batch-size {batch_size} is smaller than the {comm.Get_size()} ranks: "
                             "every rank needs at least one sample of each global batch")
        from mpi4py import MPI

        self.MPI, self.comm, self.model, self.overlap = MPI, comm, model, overlap
        self.watch = watch or _no_watch
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.bucket_values = bucket_kb * 1024 // model.grads.itemsize  # 0: one bucket per layer
        self.grad_chunk = self.bucket_values or None
        self.stats = CommStats()
        self.steps = 0
        self._buckets = []      # (start, stop, request or None) posted this step, in order
        self._posted = 0        # grads[:_posted] are in buckets already
        self._posted_at = None  # when this step's first bucket went out
        if overlap == "thread":
            self._start_comm_thread()

    # -- which rows this rank computes ------------------------------------------
    def batches(self, epoch):
        for rows, global_batch in super().batches(epoch):
            part = shard_bounds(len(rows), self.size) if len(rows) >= self.size else \
                np.minimum(np.arange(self.size + 1), len(rows))
            yield rows[part[self.rank]:part[self.rank + 1]], global_batch

    # -- communication during backprop -----------------------------------------
    def on_grads_ready(self, ready):
        if ready - self._posted >= self.bucket_values or ready == self.model.grads.size:
            self._post(self._posted, ready)
            self._posted = ready
        elif self.overlap == "nonblocking" and self._buckets:
            # MPICH and Open MPI progress a nonblocking collective only inside
            # MPI calls: a Test between blocks moves it on while we compute.
            self.MPI.Request.Testall([req for _, _, req in self._buckets])

    def _post(self, start, stop):
        if self._posted_at is None:
            self._posted_at = time.perf_counter()
        request = None
        if self.overlap == "nonblocking":
            request = self.comm.Iallreduce(self.MPI.IN_PLACE, self.model.grads[start:stop])
        elif self.overlap == "thread":
            self._queue.put((start, stop))
        self._buckets.append((start, stop, request))
        self.stats.calls += 1
        self.stats.bytes += (stop - start) * self.model.grads.itemsize

    def step(self, optimizer, global_batch):
        """Wait for each bucket's sum in turn and update its part of the parameters."""
        optimizer.begin_step(global_batch)
        self.watch("allreduce")  # --stall-timeout: name the ranks that never get here
        waits = []
        for start, stop, request in self._buckets:
            wait_start = time.perf_counter()
            if self.overlap == "none":
                self.comm.Allreduce(self.MPI.IN_PLACE, self.model.grads[start:stop])
            elif self.overlap == "nonblocking":
                request.Wait()
            else:
                self._wait_for_thread_bucket()
            waits.append((wait_start, time.perf_counter()))
            optimizer.update(start, stop)
        exposed = sum(end - begin for begin, end in waits)
        posted_at = waits[0][0] if self.overlap == "none" else self._posted_at
        # Blocking: the communication took exactly the time it was waited for.
        # Overlapped: it was in flight from the first post to the last arrival.
        self.stats.total_s += exposed if self.overlap == "none" else waits[-1][1] - posted_at
        self.stats.exposed_s += exposed
        if self.steps < TRACE_STEPS:
            self.stats.spans.append(("comm", posted_at, waits[-1][1]))
            self.stats.spans += [("comm_wait", begin, end) for begin, end in waits]
        self._buckets, self._posted, self._posted_at = [], 0, None
        self.steps += 1

    # -- the communication thread (--overlap thread) -----------------------------
    def _start_comm_thread(self):
        require_thread_multiple(self.MPI, "--overlap thread")
        # Its own communicator, so its Allreduces never match the main thread's collectives.
        self._thread_comm = self.comm.Dup()
        self._queue = queue.Queue()
        self._bucket_done = threading.Semaphore(0)
        self._thread_error = None
        self._thread = threading.Thread(target=self._comm_loop, name="mlpcore-allreduce", daemon=True)
        self._thread.start()

    def _comm_loop(self):
        # The test-only fault switch can fail this thread on entering "comm-thread".
        timer = PhaseTimer(rank=self.rank)
        try:
            # MPI sums the buckets on this thread: flush denormals here too, as training
            # does on the main thread, so that every overlap mode computes the same sums.
            with timer.phase("comm-thread"), flush_denormals():
                while (bucket := self._queue.get()) is not None:
                    start, stop = bucket
                    # mpi4py releases the GIL in here, so backprop goes on in the main thread.
                    self._thread_comm.Allreduce(self.MPI.IN_PLACE, self.model.grads[start:stop])
                    self._bucket_done.release()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            self._thread_error = exc
            self._bucket_done.release()  # wake the main thread if it waits for a bucket

    def _wait_for_thread_bucket(self):
        """Block until the communication thread has summed the next bucket; raise what it raised."""
        self._bucket_done.acquire()
        if self._thread_error is not None:
            # Raised on the main thread, the CLI ends the whole job with it (MPI_Abort):
            # the other ranks may be blocked in the sum this thread will never finish.
            raise self._thread_error

    def end_epoch(self, loss_sum, n_seen):
        self.watch("epoch loss")
        total = self.comm.allreduce(np.array([loss_sum, n_seen]))  # tiny, once per epoch
        return float(total[0] / total[1])

    def resume_at(self, epoch):
        """Continue after ``epoch`` checkpointed epochs (the step counter feeds only the trace)."""
        self.steps = epoch * -(-self.n_samples // self.batch_size)

    def finish(self):
        if self.overlap == "thread":
            self._queue.put(None)
            self._thread.join()
            self._thread_comm.Free()


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
        self.stats = CommStats()
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


def _no_watch(name):
    pass


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
    optimizer = Adam(model, lr=config.lr, alpha=config.alpha)
    if strategy == "allreduce":
        sync = AllreduceSync(comm, model, len(x), config.batch_size, rng, config.overlap, config.bucket_kb,
                             watch)
    else:
        # --batch-size is the global batch here too: each rank steps on its
        # share of it, so an epoch has as many steps as with allreduce.
        watch("shard sizes")
        n_total, size = comm.allreduce(len(x)), comm.Get_size()
        sizes = np.diff(shard_bounds(n_total, size))
        local_batch = min(max(1, config.batch_size // size), int(sizes.max()))
        # Never more steps than the smallest shard has samples: no rank gets an empty batch.
        steps = min(-(-int(sizes.max()) // local_batch), int(sizes.min()))
        sync = LocalSGDSync(comm, model, len(x), local_batch, rng, steps, config.sync_every, watch)
    start_epoch, done = 0, []
    if checkpoint is not None:
        # After the broadcast: a resumed rank's own saved state replaces it (for
        # allreduce every rank saved the same replica; for local SGD its own model).
        start_epoch, done = checkpoint.restore(model, optimizer, rng)
        on_epoch = checkpoint.saver(model, optimizer, rng, done, then=on_epoch)
        sync.resume_at(start_epoch)
    losses = fit(model, optimizer, x, y, epochs=config.epochs, sync=sync, on_epoch=on_epoch,
                 start_epoch=start_epoch, losses=done)
    return model, losses, sync.stats


def run_allreduce(config, launcher, data, timer, plan=None):
    """allreduce: every rank a replica, each global batch split, the gradients summed every step."""
    return _run("allreduce", config, launcher, data, timer, plan)


def run_localsgd(config, launcher, data, timer, plan=None):
    """localsgd: every rank trains on its shard; the models are averaged every ``sync_every`` steps."""
    return _run("localsgd", config, launcher, data, timer, plan)


def _run(name, config, launcher, data, timer, plan):
    """Distribute the data, train one model with every rank, predict on the root (the :class:`Outcome`)."""
    if launcher.comm is None:
        raise UsageError(f"--strategy {name} needs MPI (mpirun)")
    root = launcher.is_root
    with timer.phase("scatter"):
        if name == "allreduce":
            x, y = launcher.bcast_train(data.x_train if root else None, data.y_train if root else None)
            comm_bytes = {"bcast_bytes": int(x.nbytes + y.nbytes) * (launcher.size - 1)}
        else:
            x, y = launcher.scatter_shards(data.x_train if root else None, data.y_train if root else None)
            comm_bytes = {"scatter_bytes": launcher.comm.allreduce(int(x.nbytes + y.nbytes))}
    with timer.phase("train"):
        train_start = time.perf_counter()
        model, losses, stats = train_data_parallel(
            name, launcher.comm, x, y, config, watch=launcher.watch,
            checkpoint=None if plan is None else plan.for_rank(launcher.rank))
        train_s = time.perf_counter() - train_start
    for span_name, start, end in stats.spans:  # a few steps' communication, for the timeline
        timer.spans.append((span_name, start - timer.t0, end - timer.t0))

    with timer.phase("gather"):
        launcher.watch("gather")
        per_rank = launcher.comm.gather((train_s, stats.as_dict(), blas_threads()), root=0)
    if not root:
        return None
    with timer.phase("predict"):
        y_pred = model.predict(to_float(data.x_test, model.dtype))
    comm_stats = [s for _, s, _ in per_rank]
    overlap = {k: max(s[k] for s in comm_stats) for k in ("total_s", "exposed_s")}
    overlap.update(calls=comm_stats[0]["calls"], bytes=comm_stats[0]["bytes"],
                   fraction=min(s["fraction"] for s in comm_stats),
                   mode=config.overlap if name == "allreduce" else f"sync every {config.sync_every}")
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
