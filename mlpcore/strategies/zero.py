"""ZeRO stage 1 for the allreduce strategy (``--shard-optimizer``): each rank steps 1/N of the parameters.

DeepSpeed's ZeRO-1 (Rajbhandari et al., 2020) shards the optimizer: instead of
summing every gradient on every rank (``Allreduce``) and having every rank
step Adam over all the parameters, each gradient bucket is
**reduce-scattered** - rank ``r`` receives the sum of its piece only - each
rank steps Adam on its pieces, with moments for those pieces only (1/N of
the optimizer memory), and the updated pieces are **allgathered** so that
every rank again holds the whole model. A reduce-scatter and an allgather
move what one bandwidth-optimal allreduce moves (an allreduce *is* a
reduce-scatter followed by an allgather), so the communication volume is
that of plain allreduce; what shrinks is the optimizer's memory and work.

How buckets map to slices. The buckets are those :class:`AllreduceSync`
sends: backprop hands the gradient over last layer first, in blocks of about
``--bucket-kb`` (:func:`bucket_bounds` finds where, from one dry backward
pass). Each bucket ``[a, e)`` is cut into N contiguous pieces of nearly equal
size, at multiples of 64 bytes (:func:`split_buckets`); rank ``r`` owns piece
``r`` of *every* bucket. So every rank has work as soon as the first bucket
has been summed, and every bucket's allgather can start as soon as its
pieces are stepped, while later buckets are still being reduced.

Overlap (``--overlap``), the same collectives in the same order in every mode:

* ``none``: per bucket, ``Reduce_scatter``, Adam on the piece, ``Allgatherv``.
* ``nonblocking``: each bucket's ``Ireduce_scatter`` starts as soon as backprop
  has finished it (tested between blocks, as MPICH progresses only inside MPI
  calls); the step waits for each in turn, steps the piece and starts its
  ``Iallgatherv``, which runs while later buckets are waited for and stepped,
  and is completed just before the next forward pass needs the parameters.
* ``thread``: a communication thread does the reduce-scatters as backprop
  queues them and the allgathers as the step queues them (FIFO: every rank
  queues ``RS_1 .. RS_k`` then ``AG_1 .. AG_k``).

Every element of the summed gradient is computed once, by its owner, and the
parameters every rank ends with are copies of what the owner computed:
replicas are bitwise identical by construction. Against plain allreduce, the
Adam arithmetic is the same elementwise (:mod:`mlpcore.nn.optim`); the sums are
too when the reduction order is - always with 2 ranks (a float sum of two
values is commutative), not necessarily with 3 (MPICH's reduce-scatter and
allreduce algorithms may add the ranks' values in different orders).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..nn.fpenv import flush_denormals
from ..nn.optim import Adam
from ..parallel.timing import PhaseTimer
from .allreduce import TRACE_STEPS, AllreduceSync

#: Piece boundaries fall on multiples of this many bytes (a cache line): with
#: ``--node-shm`` no two ranks ever write into one line of the shared parameters.
ALIGN_BYTES = 64


def handovers(model, bucket_values, n_features):
    """Every count of final gradient values backprop hands over, in order (``model.backward``'s yields).

    They depend on the layers and ``chunk`` only, not on the batch, so one dry
    forward and backward pass of a single zero sample finds them. The model's
    gradient buffer is overwritten; its parameters are not touched.
    """
    model.forward(np.zeros((1, n_features), dtype=model.dtype))
    return list(model.backward(np.zeros(1, dtype=np.intp), 1.0, chunk=bucket_values or None))


def bucket_bounds(model, bucket_values, n_features):
    """``[(start, stop), ...]``: the buckets :class:`AllreduceSync` posts for this model and bucket size.

    From backprop's :func:`handovers`, by AllreduceSync's rule: a bucket closes
    once it holds ``bucket_values`` values (0: at every hand-over, one bucket
    per layer) or the gradient is complete.
    """
    n = model.grads.size
    bounds, posted = [], 0
    for ready in handovers(model, bucket_values, n_features):
        if ready - posted >= bucket_values or ready == n:
            bounds.append((posted, ready))
            posted = ready
    if posted != n:
        raise RuntimeError(f"backprop handed over {posted} of {n} gradient values")
    return bounds


def split_buckets(buckets, parts, align):
    """Cut points ``(n_buckets, parts + 1)``: piece ``p`` of bucket ``b`` is ``[cuts[b, p], cuts[b, p + 1])``.

    Nearly equal pieces, each boundary inside a bucket rounded to a multiple
    of ``align`` (absolute index in the flat buffer); small buckets leave some
    pieces empty.
    """
    cuts = np.empty((len(buckets), parts + 1), dtype=np.int64)
    for b, (start, stop) in enumerate(buckets):
        for p in range(parts + 1):
            ideal = start + (stop - start) * p / parts
            cuts[b, p] = min(stop, max(start, int(round(ideal / align)) * align))
        cuts[b, 0], cuts[b, parts] = start, stop
        cuts[b] = np.maximum.accumulate(cuts[b])
    return cuts


def mpi_datatype(MPI, dtype):
    from mpi4py.util.dtlib import from_numpy_dtype

    return from_numpy_dtype(np.dtype(dtype))


class ZeroSync(AllreduceSync):
    """Reduce-scatter each gradient bucket, step this rank's pieces, allgather the parameters (ZeRO-1).

    Same batches, buckets and overlap modes as :class:`AllreduceSync`; see the
    module docstring. :attr:`shard` lists this rank's pieces: the optimizer
    is made from it (:meth:`make_optimizer`).
    """

    name = "zero1"

    def __init__(self, comm, model, n_samples, batch_size, rng, overlap="none", bucket_kb=256, watch=None,
                 n_features=None):
        # Before the base class starts the communication thread, which releases it on an error.
        self._ag_done = threading.Semaphore(0)
        super().__init__(comm, model, n_samples, batch_size, rng, overlap, bucket_kb, watch)
        self.stats.sync = self.name
        self.buckets = bucket_bounds(model, self.bucket_values, n_features or model.layers[0].in_shape()[0])
        align = max(1, ALIGN_BYTES // model.grads.itemsize)
        self.cuts = split_buckets(self.buckets, self.size, align)
        self.shard = [(int(c[self.rank]), int(c[self.rank + 1])) for c in self.cuts]
        self._counts = [[int(v) for v in np.diff(c)] for c in self.cuts]
        self._displs = [[int(v) for v in c[:-1] - c[0]] for c in self.cuts]
        self._datatype = mpi_datatype(self.MPI, model.dtype)
        self._empty = np.empty(0, dtype=model.dtype)
        self.optimizer = None
        self._next = 0          # buckets [0, _next) have been handed to the reduce-scatter this step
        self._rs = []           # their requests (nonblocking)
        self._ag = []           # this step's allgather requests (nonblocking), or how many are queued (thread)
        self._ag_pending = False
        self._step_started = None

    # -- the optimizer of this rank's pieces ----------------------------------------
    def make_optimizer(self, **options):
        """Adam over :attr:`shard` (moments, and the reduce-scattered gradient, for those pieces only)."""
        self.optimizer = Adam(self.model, shard=self.shard, **options)
        self.stats.optimizer_bytes = self.optimizer.nbytes
        return self.optimizer

    def _recv(self, b):
        lo, hi = self.shard[b]
        return self.optimizer.grad_slice(lo, hi) if hi > lo else self._empty

    def _allgather_spec(self, params, b):
        start, stop = self.buckets[b]
        return [params[start:stop], (self._counts[b], self._displs[b]), self._datatype]

    # -- which rows this rank computes: the parameters must be complete first --------------
    def batches(self, epoch):
        for rows, global_batch in super().batches(epoch):
            self._complete_params()
            yield rows, global_batch

    # -- communication during backprop -------------------------------------------
    def on_grads_ready(self, ready):
        while self._next < len(self.buckets) and self.buckets[self._next][1] <= ready:
            self._post_reduce_scatter(self._next)
            self._next += 1
        if self.overlap == "nonblocking" and self._rs:
            self.MPI.Request.Testall(self._rs)

    def _post_reduce_scatter(self, b):
        start, stop = self.buckets[b]
        if self._posted_at is None:
            self._posted_at = time.perf_counter()
        if self.overlap == "nonblocking":
            self._rs.append(self.comm.Ireduce_scatter(self.model.grads[start:stop], self._recv(b),
                                                      self._counts[b], op=self.MPI.SUM))
        elif self.overlap == "thread":
            self._queue.put(("rs", b))
        nbytes = (stop - start) * self.model.grads.itemsize
        self.stats.calls += 2  # this bucket's reduce-scatter and allgather
        self.stats.bytes += nbytes
        self.stats.wire_bytes += 2 * nbytes * (self.size - 1) // self.size

    def step(self, optimizer, global_batch):
        """Wait for each bucket's piece of the sum, step it, start its allgather."""
        optimizer.begin_step(global_batch)
        self.watch("reduce-scatter")
        params = self.model.params
        waits, adam_s = [], 0.0
        for b, (start, stop) in enumerate(self.buckets):
            wait_start = time.perf_counter()
            if self.overlap == "none":
                self.comm.Reduce_scatter(self.model.grads[start:stop], self._recv(b), self._counts[b],
                                         op=self.MPI.SUM)
            elif self.overlap == "nonblocking":
                self._rs[b].Wait()
            else:
                self._wait_for_thread_bucket()
            stepped = time.perf_counter()
            waits.append((wait_start, stepped))
            lo, hi = self.shard[b]
            if hi > lo:
                optimizer.update(lo, hi)
            done = time.perf_counter()
            adam_s += done - stepped
            if self.overlap == "none":
                self.comm.Allgatherv(self.MPI.IN_PLACE, self._allgather_spec(params, b))
                waits.append((done, time.perf_counter()))
            elif self.overlap == "nonblocking":
                self._ag.append(self.comm.Iallgatherv(self.MPI.IN_PLACE, self._allgather_spec(params, b)))
            else:
                self._queue.put(("ag", b))
        self.stats.add("reduce_s", sum(end - begin for begin, end in waits[::2 if self.overlap == "none" else 1]))
        self.stats.add("optimizer_s", adam_s)
        self._waits = waits
        self._ag_pending = True
        self._next, self._rs = 0, []
        if self.overlap == "none":
            self._complete_params()

    def _complete_params(self):
        """Wait for this step's allgathers (before the parameters are read again); account the step."""
        if not self._ag_pending:
            return
        waits = self._waits
        if self.overlap != "none":
            self.watch("allgather")
            begin = time.perf_counter()
            if self.overlap == "nonblocking":
                self.MPI.Request.Waitall(self._ag)
            else:
                for _ in self.buckets:
                    self._wait_for_thread_allgather()
            waits.append((begin, time.perf_counter()))
            self.stats.add("allgather_s", waits[-1][1] - begin)
        else:
            self.stats.add("allgather_s", sum(end - begin for begin, end in waits[1::2]))
        exposed = sum(end - begin for begin, end in waits)
        posted_at = waits[0][0] if self.overlap == "none" else self._posted_at
        self.stats.total_s += exposed if self.overlap == "none" else waits[-1][1] - posted_at
        self.stats.exposed_s += exposed
        if self.steps < TRACE_STEPS:
            self.stats.spans.append(("comm", posted_at, waits[-1][1]))
            self.stats.spans += [("comm_wait", begin, end) for begin, end in waits]
        self._ag, self._ag_pending, self._posted_at = [], False, None
        self.steps += 1
        self.stats.steps += 1

    # -- the communication thread (--overlap thread) -----------------------------------
    def _comm_loop(self):
        timer = PhaseTimer(rank=self.rank)  # the test-only fault switch can fail it on "comm-thread"
        try:
            with timer.phase("comm-thread"), flush_denormals():
                while (item := self._queue.get()) is not None:
                    kind, b = item
                    start, stop = self.buckets[b]
                    if kind == "rs":
                        self._thread_comm.Reduce_scatter(self.model.grads[start:stop], self._recv(b),
                                                         self._counts[b], op=self.MPI.SUM)
                        self._bucket_done.release()
                    else:
                        self._thread_comm.Allgatherv(self.MPI.IN_PLACE, self._allgather_spec(self.model.params, b))
                        self._ag_done.release()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            self._thread_error = exc
            self._bucket_done.release()
            self._ag_done.release()

    def _wait_for_thread_allgather(self):
        self._ag_done.acquire()
        if self._thread_error is not None:
            raise self._thread_error

    def end_epoch(self, loss_sum, n_seen):
        self._complete_params()  # the L2 term of the loss, and checkpoints, read the parameters next
        return super().end_epoch(loss_sum, n_seen)

    def finish(self):
        self._complete_params()
        super().finish()
