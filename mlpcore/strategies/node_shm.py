"""Node-local shared memory for the allreduce strategy (``--node-shm``).

The ranks of one node share one copy of the parameters and see each other's
gradients, in an MPI-3 shared-memory window: ``Win_allocate_shared`` on the
node's communicator (``Split_type(COMM_TYPE_SHARED)``). Local rank 0
allocates one segment; every local rank maps all of it
(``Win.Shared_query(0)``) as numpy arrays::

    [ parameters | gradient block of local rank 0 | ... | of local rank L-1 | node sums (2+ nodes) ]

each region starting on a 64-byte boundary. The model is rebound onto it
(its layers get views of the shared buffers, :func:`rebind`): forward and
backward read the shared parameters, and backprop writes this rank's
gradient straight into its block. There is no send buffer and no receive
buffer: a step is

1. every local rank has finished its gradient (synchronisation);
2. each rank sums its pieces of every bucket straight from the L blocks, in
   local-rank order (``((g0 + g1) + g2) + ...``), into its gradient slice;
3. it steps Adam on those pieces, writing them once into the shared
   parameters (one copy per node: L times less memory for them, and no
   allgather);
4. every local rank has written its pieces (synchronisation) before anyone
   reads the parameters again.

Pieces are those of :mod:`mlpcore.strategies.zero`: each bucket cut into
nearly equal, cache-line aligned parts, one per rank, so no two ranks write
into one cache line. Each rank keeps Adam's moments for its pieces only.

Several nodes (hierarchical, as Horovod's hierarchical allreduce): in step 2
the local ranks write the *node's* sums into the shared node-sum buffer; local
rank 0 of each node (the leader) then combines them with the other nodes'
leaders - ``Allreduce`` of the node sums, or with ``--shard-optimizer``
``Reduce_scatter`` so that each node gets the sums of its ranks' pieces only
- while the other local ranks wait; then every rank steps its pieces from the
global sums. With ``--shard-optimizer`` the pieces are the world's (each rank
owns 1/N of the model, moments included) and the leaders allgather the
stepped parameters between the nodes; without it they are the node's (1/L,
the same on every node, so every node steps the same values). On one node
the two are the same thing.

Memory model. The window must be in MPI's *unified* model (the public and
private copies are the same memory; checked at start-up, as MPICH provides
for shared windows). Every rank holds a passive-target epoch open on the
window for the whole training (``Lock_all(MODE_NOCHECK)``); each
synchronisation point above is ``Win.Sync()`` (a memory barrier: this
rank's stores to the window are complete) + a barrier on the node's
communicator (``Barrier``, or ``Ibarrier`` per bucket with ``--overlap
nonblocking``) + ``Win.Sync()`` again (later loads see the others' stores):
the usual pattern of MPI-3 shared memory (Hoefler et al., "MPI+MPI", 2013).
No store to a location is ever concurrent with a load of it or another store
to it: the gradient blocks are written only by backprop between points 4
and 1, and read only between 1 and 4; the parameters are read only between
4 and 1 (forward and backward) and written only between 1 and 4, each
element by its one owner.

``--overlap nonblocking``: after each bucket is finished by backprop, the
rank posts an ``Ibarrier`` for it; while backprop goes on, every completed
one lets the rank sum its piece of that bucket (the other ranks' gradients
of it are final), so most of step 2 is done before the step begins. The
parameters are written only once the *last* bucket's barrier has completed:
until every rank has finished backprop, some rank may still read a layer's
weights for its input gradient. ``--overlap thread`` is refused: the
reduction here is the ranks' own loads and stores, there is no message a
thread could progress, and a second thread would only take the core from
backprop.

Failure: a rank that raises inside the window's epoch is ended by the
command line's ``MPI_Abort``, and the others with it (they may be blocked in
a node barrier, and ``Win_free`` is collective: freeing on the error path
would block too). MPICH unlinks the segment as soon as every local rank has
mapped it, so the memory goes back to the system when the processes end. On
the normal path :meth:`NodeShmSync.finish` copies the parameters back into
private memory, ends the epoch and frees the window and communicators.

The test-only switch ``MLPCORE_TEST_RANKS_PER_NODE=k`` (:data:`RANKS_PER_NODE_ENV`)
groups the ranks into "nodes" of ``k`` consecutive ranks on one machine, so
that the hierarchical path runs in the tests.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from ..errors import UsageError
from ..nn.optim import Adam
from ..parallel.timing import PhaseTimer
from ..testing import faults
from .allreduce import TRACE_STEPS, AllreduceSync
from .zero import ALIGN_BYTES, bucket_bounds, mpi_datatype, split_buckets

#: Test-only: "nodes" of this many consecutive ranks instead of the real ones (see the module docstring).
RANKS_PER_NODE_ENV = "MLPCORE_TEST_RANKS_PER_NODE"

#: The phase the test-only fault switch can fail a rank on: the window synchronisation of each step.
FAULT_PHASE = "shm-window"


def node_communicator(comm, MPI):
    """The ranks of ``comm`` that share this node's memory (ordered by rank in ``comm``)."""
    emulate = os.environ.get(RANKS_PER_NODE_ENV)
    if emulate:
        if not emulate.isdigit() or int(emulate) < 1:
            raise UsageError(f"{RANKS_PER_NODE_ENV}={emulate!r}: expected a positive integer (a switch for tests)")
        return comm.Split(comm.Get_rank() // int(emulate), comm.Get_rank())
    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


def rebind(model, params, grads):
    """Make ``params``/``grads`` (flat, the model's size) the model's buffers: every layer gets views of them.

    The flat-buffer contract of :class:`mlpcore.nn.model.Sequential`: each slot
    is ``buffer[start:stop]`` of its :attr:`~Sequential.layout`, and a layer
    sees its slots only through the views :meth:`Layer.bind` gives it.
    """
    views = {}
    for s in model.layout:
        p, g = views.setdefault(s.layer, ({}, {}))
        p[s.name] = params[s.start:s.stop].reshape(s.shape)
        g[s.name] = grads[s.start:s.stop].reshape(s.shape)
    for index, (p, g) in views.items():
        model.layers[index].bind(p, g)
    model.params, model.grads = params, grads


def _agree(comm, error):
    """Collective: raise ``error`` (a UsageError) on every rank if any rank has one."""
    errors = comm.allgather(None if error is None else str(error))
    for rank, message in enumerate(errors):
        if message is not None:
            exc = UsageError(message)
            exc.collective = True  # every rank raises it: the command line exits cleanly, without MPI_Abort
            raise exc


class NodeShmSync(AllreduceSync):
    """Gradients and parameters in a node-local shared window; see the module docstring.

    Same batches and buckets as :class:`AllreduceSync`. :attr:`shard` lists this
    rank's pieces: the optimizer is made from it (:meth:`make_optimizer`).
    """

    def __init__(self, comm, model, n_samples, batch_size, rng, overlap="none", bucket_kb=256, watch=None,
                 n_features=None, shard_optimizer=False):
        if overlap == "thread":
            raise UsageError("--node-shm with --overlap thread: the node's reduction is the ranks' own loads "
                             "and stores, with no message for a thread to progress; use --overlap none or "
                             "nonblocking")
        super().__init__(comm, model, n_samples, batch_size, rng, overlap, bucket_kb, watch)
        MPI = self.MPI
        self.name = "node-shm+zero1" if shard_optimizer else "node-shm"
        self.stats.sync = self.name
        self.shard_optimizer = shard_optimizer
        self.node = node_communicator(comm, MPI)
        self.local_rank, self.local_size = self.node.Get_rank(), self.node.Get_size()
        self.leader = self.local_rank == 0
        self.inter = comm.Split(0 if self.leader else MPI.UNDEFINED, self.rank)  # the nodes' leaders
        facts = (self.inter.Get_rank(), self.inter.allgather(self.local_size)) if self.leader else None
        self.node_index, self.node_sizes = self.node.bcast(facts, root=0)
        self.n_nodes = len(self.node_sizes)

        n, dtype = model.params.size, model.dtype
        align = max(1, ALIGN_BYTES // dtype.itemsize)
        self.buckets = bucket_bounds(model, self.bucket_values, n_features or model.layers[0].in_shape()[0])
        # The node's sums: piece local_rank of each bucket, cut L ways.
        self.sum_cuts = split_buckets(self.buckets, self.local_size, align)
        self.sum_pieces = [(int(c[self.local_rank]), int(c[self.local_rank + 1])) for c in self.sum_cuts]
        # The pieces this rank steps: the world's (N ways) with --shard-optimizer, else the node's.
        first = sum(self.node_sizes[:self.node_index])
        if shard_optimizer:
            self.own_cuts, part = split_buckets(self.buckets, self.size, align), first + self.local_rank
            # Per bucket, each node's part of it (the leaders' reduce-scatter and allgather).
            bounds = np.cumsum([0, *self.node_sizes])
            self._node_counts = [[int(c[bounds[k + 1]] - c[bounds[k]]) for k in range(self.n_nodes)]
                                 for c in self.own_cuts]
            self._node_displs = [[int(c[bounds[k]] - c[0]) for k in range(self.n_nodes)] for c in self.own_cuts]
        else:
            self.own_cuts, part = self.sum_cuts, self.local_rank
        self.shard = [(int(c[part]), int(c[part + 1])) for c in self.own_cuts]
        self._datatype = mpi_datatype(MPI, dtype)

        # The window: [params | grads of local rank 0 .. L-1 | node sums], each region 64-byte aligned.
        stride = -(-n // align) * align
        regions = 1 + self.local_size + (1 if self.n_nodes > 1 else 0)
        self.win = MPI.Win.Allocate_shared(regions * stride * dtype.itemsize if self.leader else 0, dtype.itemsize,
                                           comm=self.node)
        self._locked = False
        error = None
        if self.win.Get_attr(MPI.WIN_MODEL) != MPI.WIN_UNIFIED:
            error = UsageError("--node-shm needs MPI's unified memory model for shared windows, which this MPI "
                               "library does not provide; run without --node-shm")
        try:
            _agree(comm, error)
        except UsageError:  # every rank raises it here, so the collective frees are safe
            self.win.Free()
            self.node.Free()
            if self.inter != MPI.COMM_NULL:
                self.inter.Free()
            raise
        buf, _ = self.win.Shared_query(0)
        memory = np.frombuffer(buf, dtype=dtype)
        self._memory = memory
        self.shared_params = memory[:n]
        self.blocks = [memory[(1 + j) * stride:(1 + j) * stride + n] for j in range(self.local_size)]
        self.node_sums = memory[(1 + self.local_size) * stride:][:n] if self.n_nodes > 1 else None
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self._locked = True
        # The replicas agree already (broadcast): the leader copies them in, every rank rebinds.
        if self.leader:
            self.shared_params[:] = model.params
        self.blocks[self.local_rank][:] = 0
        rebind(model, self.shared_params, self.blocks[self.local_rank])
        self._fence()

        self.optimizer = None
        self._ready = []        # this step's per-bucket Ibarriers (nonblocking)
        self._summed = 0        # buckets whose pieces are summed this step
        self._announced = 0     # buckets announced finished this step
        self._params_barrier = None
        self._params_pending = False
        self._step_waits = None
        self._fault = PhaseTimer(rank=self.rank) if faults.phase_hook() else None
        self._scratch = None
        # Bytes this rank loads from the other local ranks' gradient blocks each step.
        self._shm_bytes = sum(hi - lo for lo, hi in self.sum_pieces) * dtype.itemsize * (self.local_size - 1)

    # -- set-up and clean-up ------------------------------------------------------------
    def make_optimizer(self, **options):
        """Adam over :attr:`shard`: moments, and the summed gradient, for this rank's pieces only."""
        self.optimizer = Adam(self.model, shard=self.shard, **options)
        self.stats.optimizer_bytes = self.optimizer.nbytes
        return self.optimizer

    def write_params(self, saved):
        """Restore the parameters from a checkpoint: the leader writes the node's one copy, then a fence."""
        if self.leader:
            self.shared_params[:] = saved
        self._fence()

    def _fence(self):
        """Every local rank's stores to the window are visible to every local rank (blocking)."""
        self.win.Sync()
        self.node.Barrier()
        self.win.Sync()

    def finish(self):
        """Complete the last step; give the model private buffers again; free the window (collective)."""
        self._complete_params()
        rebind(self.model, self.shared_params.copy(), np.zeros_like(self.shared_params))
        self._fence()  # no local rank reads the window any more
        self.shared_params = self.blocks = self.node_sums = self._memory = None
        self.win.Unlock_all()
        self._locked = False
        self.win.Free()
        self.node.Free()
        if self.inter != self.MPI.COMM_NULL:
            self.inter.Free()

    # -- a step ----------------------------------------------------------------------------
    def batches(self, epoch):
        for rows, global_batch in super().batches(epoch):
            self._complete_params()  # every piece of the parameters written before the forward pass reads them
            yield rows, global_batch

    def on_grads_ready(self, ready):
        if self.overlap != "nonblocking":
            return
        self._announce(ready)
        # Sum the pieces of the buckets every local rank has finished, while backprop goes on.
        while self._summed < len(self._ready) and self._ready[self._summed].Test():
            self.win.Sync()
            self._sum(self._summed)
            self._summed += 1

    def _announce(self, ready):
        while self._announced < len(self.buckets) and self.buckets[self._announced][1] <= ready:
            self.win.Sync()  # this rank's gradient of the bucket is in the window
            self._ready.append(self.node.Ibarrier())
            self._announced += 1

    def _sum(self, b):
        """This rank's piece of bucket ``b``, summed over the local ranks' blocks in local-rank order."""
        lo, hi = self.sum_pieces[b]
        if hi <= lo:
            return
        out = self.node_sums[lo:hi] if self.n_nodes > 1 else self.optimizer.grad_slice(lo, hi)
        blocks = self.blocks
        if len(blocks) == 1:
            out[...] = blocks[0][lo:hi]
            return
        np.add(blocks[0][lo:hi], blocks[1][lo:hi], out=out)
        for block in blocks[2:]:
            out += block[lo:hi]

    def step(self, optimizer, global_batch):
        optimizer.begin_step(global_batch)
        phase = self._fault.phase(FAULT_PHASE) if self._fault is not None else contextlib.nullcontext()
        with phase:
            self._step(optimizer)

    def _step(self, optimizer):
        t0 = time.perf_counter()
        self.watch("node-shm gradients")
        waits, reduce_s = [], 0.0
        if self.overlap == "nonblocking":
            self._announce(self.model.grads.size)
            for b in range(self._summed, len(self.buckets)):
                begin = time.perf_counter()
                self._ready[b].Wait()
                self.win.Sync()
                summed = time.perf_counter()
                waits.append((begin, summed))
                self._sum(b)
                reduce_s += time.perf_counter() - summed
        else:
            begin = time.perf_counter()
            self._fence()
            summed = time.perf_counter()
            waits.append((begin, summed))
            for b in range(len(self.buckets)):
                self._sum(b)
            reduce_s += time.perf_counter() - summed
        sync_s = sum(end - begin for begin, end in waits)
        inter_s = self._between_nodes() if self.n_nodes > 1 else 0.0
        adam_start = time.perf_counter()
        for lo, hi in self.shard:
            if hi > lo:
                optimizer.update(lo, hi)
        adam_s = time.perf_counter() - adam_start
        inter_s += self._allgather_between_nodes() if self.n_nodes > 1 and self.shard_optimizer else 0.0
        self.win.Sync()  # this rank's pieces of the parameters are in the window
        if self.overlap == "nonblocking":
            self._params_barrier = self.node.Ibarrier()
        self._params_pending = True
        self._step_waits = (t0, sync_s, reduce_s, inter_s, waits)
        self.stats.add("optimizer_s", adam_s)
        if self.overlap == "none":
            self._complete_params()

    def _between_nodes(self):
        """Leaders combine the node sums; every rank then copies the sums of its pieces. Returns the seconds."""
        begin = time.perf_counter()
        self._fence()  # the node's sums are complete
        self.watch("node-shm between nodes")
        if self.leader:
            if not self.shard_optimizer:
                self.inter.Allreduce(self.MPI.IN_PLACE, self.node_sums)
            else:
                for b, (start, stop) in enumerate(self.buckets):
                    counts = self._node_counts[b]
                    mine = counts[self.node_index]
                    if self._scratch is None or self._scratch.size < mine:
                        self._scratch = np.empty(max(counts), dtype=self.node_sums.dtype)
                    self.inter.Reduce_scatter(self.node_sums[start:stop], self._scratch[:mine], counts,
                                              op=self.MPI.SUM)
                    at = start + self._node_displs[b][self.node_index]
                    self.node_sums[at:at + mine] = self._scratch[:mine]
        self._fence()  # the global sums are in the window
        for lo, hi in self.shard:
            if hi > lo:
                self.optimizer.grad_slice(lo, hi)[...] = self.node_sums[lo:hi]
        return time.perf_counter() - begin

    def _allgather_between_nodes(self):
        """--shard-optimizer across nodes: the leaders exchange their nodes' stepped pieces."""
        begin = time.perf_counter()
        self._fence()  # the node's pieces of the parameters are written
        self.watch("node-shm allgather between nodes")
        if self.leader:
            for b, (start, stop) in enumerate(self.buckets):
                self.inter.Allgatherv(self.MPI.IN_PLACE, [self.shared_params[start:stop],
                                                          (self._node_counts[b], self._node_displs[b]),
                                                          self._datatype])
        return time.perf_counter() - begin

    def _complete_params(self):
        """Wait until every local rank has written its pieces of the parameters; account the step."""
        if not self._params_pending:
            return
        t0, sync_s, reduce_s, inter_s, waits = self._step_waits
        self.watch("node-shm parameters")
        begin = time.perf_counter()
        if self._params_barrier is not None:
            self._params_barrier.Wait()
            self._params_barrier = None
        else:
            self.node.Barrier()
        self.win.Sync()  # the others' pieces are visible to this rank's loads
        end = time.perf_counter()
        waits.append((begin, end))
        sync_s += end - begin
        self.stats.add("sync_s", sync_s)
        self.stats.add("reduce_s", reduce_s)
        if inter_s:
            self.stats.add("inter_node_s", inter_s)
        exposed = sync_s + reduce_s + inter_s
        self.stats.exposed_s += exposed
        self.stats.total_s += exposed
        self.stats.calls += 1
        nbytes = self.model.params.nbytes
        self.stats.bytes += nbytes
        self.stats.shm_bytes += self._shm_bytes
        if self.n_nodes > 1 and self.leader:
            k = self.n_nodes
            self.stats.wire_bytes += 2 * nbytes * (k - 1) // k
        if self.steps < TRACE_STEPS:
            self.stats.spans.append(("comm", t0, end))
            self.stats.spans += [("comm_wait", b, e) for b, e in waits]
        self._ready, self._summed, self._announced = [], 0, 0
        self._params_pending = False
        self.steps += 1
        self.stats.steps += 1

    def end_epoch(self, loss_sum, n_seen):
        self._complete_params()
        return super().end_epoch(loss_sum, n_seen)
