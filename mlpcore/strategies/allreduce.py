"""The allreduce strategy's gradient sum: :class:`AllreduceSync`, and what communication cost (:class:`CommStats`).

Split from :mod:`mlpcore.strategies.data_parallel` (which re-exports both) so that
the other ways of combining the gradients - :mod:`~mlpcore.strategies.zero` and
:mod:`~mlpcore.strategies.node_shm`, subclasses of :class:`AllreduceSync` - can
build on it without an import cycle.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..data import shard_bounds
from ..errors import UsageError
from ..nn.fpenv import flush_denormals
from ..nn.optim import Adam
from ..nn.train import LocalSync
from ..parallel.launchers import require_thread_multiple
from ..parallel.timing import PhaseTimer

#: Per-step compute/communication spans are kept for this many steps only, so
#: that trace.json stays small while still showing the overlap.
TRACE_STEPS = 30


@dataclass
class CommStats:
    """What the communication cost during training, on one rank."""

    calls: int = 0
    bytes: int = 0          # gradient bytes combined (the buffers handed to the collectives)
    total_s: float = 0.0    # wall time the communication was in flight
    exposed_s: float = 0.0  # time training waited for it
    spans: list = field(default_factory=list)  # ("comm"/"comm_wait", start, end) for the first steps
    sync: str = ""          # how the gradients were combined: "allreduce", "zero1", "node-shm", ...
    optimizer_bytes: int = 0  # Adam's moments on this rank
    wire_bytes: int = 0     # bytes this rank sent over the network, as a bandwidth-optimal algorithm sends them
    shm_bytes: int = 0      # bytes this rank loaded from other ranks' gradients in shared memory
    steps: int = 0
    breakdown: dict = field(default_factory=dict)  # seconds: reduce_s, optimizer_s, allgather_s, sync_s, ...

    def add(self, name, seconds):
        self.breakdown[name] = self.breakdown.get(name, 0.0) + seconds

    def as_dict(self):
        fraction = 1.0 - self.exposed_s / self.total_s if self.total_s > 0 else 0.0
        return {"calls": self.calls, "bytes": self.bytes, "total_s": self.total_s,
                "exposed_s": self.exposed_s, "fraction": max(0.0, fraction), "sync": self.sync,
                "optimizer_bytes": self.optimizer_bytes, "wire_bytes": self.wire_bytes, "shm_bytes": self.shm_bytes,
                "steps": self.steps, "breakdown": dict(self.breakdown)}


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

    name = "allreduce"
    shard = None  # every rank steps every parameter

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
        self.stats = CommStats(sync=self.name)
        self.steps = 0
        self._buckets = []      # (start, stop, request or None) posted this step, in order
        self._posted = 0        # grads[:_posted] are in buckets already
        self._posted_at = None  # when this step's first bucket went out
        if overlap == "thread":
            self._start_comm_thread()

    def make_optimizer(self, **options):
        """The Adam this sync steps (every parameter, on every rank)."""
        optimizer = Adam(self.model, **options)
        self.stats.optimizer_bytes = optimizer.nbytes
        return optimizer

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
        self.stats.wire_bytes += 2 * (stop - start) * self.model.grads.itemsize * (self.size - 1) // self.size

    def step(self, optimizer, global_batch):
        """Wait for each bucket's sum in turn and update its part of the parameters."""
        optimizer.begin_step(global_batch)
        self.watch("allreduce")  # --stall-timeout: name the ranks that never get here
        waits, adam_s = [], 0.0
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
            adam_s += time.perf_counter() - waits[-1][1]
        exposed = sum(end - begin for begin, end in waits)
        self.stats.add("reduce_s", exposed)
        self.stats.add("optimizer_s", adam_s)
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
        self.stats.steps += 1

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



def _no_watch(name):
    pass
