"""The optimiser: Adam on the model's flat parameter buffer.

It reads the model's layout (which slots get the L2 penalty) and nothing else
of the model, so any model on the layer contract trains with it.

With ``shard=`` it steps only some ranges of the buffer (a sharded optimizer,
ZeRO stage 1: :mod:`mlpcore.strategies.zero`): the moments, and the summed
gradient they are stepped from, are then sized to those ranges, and
:meth:`Adam.update` maps a range of the global buffer to its place in them.
The update of each value is the same arithmetic either way (the kernels are
elementwise), so a sharded step writes bit for bit the values a full one does.
"""

from __future__ import annotations

import math

import numpy as np


class Adam:
    """Adam (Kingma & Ba, 2015) on a flat parameter buffer, with L2 on the weights.

    Same update as scikit-learn's ``AdamOptimizer``, rearranged to take fewer
    passes over memory: the moments are kept unnormalised,
    ``M = m / (1 - beta_1)`` and ``V = v / (1 - beta_2)``, so each needs one
    scale and one add.

    Parameters
    ----------
    model : Sequential
        The model whose ``params`` are updated from its ``grads``; the L2 term
        applies to the slots it marks ``decay`` (:meth:`Sequential.decay_ranges`).
    lr, beta_1, beta_2, epsilon : float
        Adam's hyper-parameters (scikit-learn's defaults).
    alpha : float
        L2 strength; the step adds ``alpha / batch * W`` to the weight gradients.
    shard : sequence of (start, stop), optional
        Step only these ranges of the flat buffer (ascending, disjoint; empty
        ones are dropped). ``M`` and ``V`` then hold those ranges only, one
        after the other, and the gradient is read from :attr:`G` (same layout),
        which the caller fills (:meth:`grad_slice`): the reduce-scattered sum
        of the ranks' gradients, for instance. None (default): the whole
        buffer, from ``model.grads``.
    """

    def __init__(self, model, *, lr=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-8, alpha=1e-4, shard=None):
        self.model = model
        self.lr, self.beta_1, self.beta_2, self.epsilon, self.alpha = lr, beta_1, beta_2, epsilon, alpha
        self.t = 0
        self._decay_ranges = model.decay_ranges()
        self._ranges = {}
        self._slices = {}
        self.shard = None
        if shard is None:
            self.M = np.zeros_like(model.params)
            self.V = np.zeros_like(model.params)
            return
        ranges = np.array([(int(lo), int(hi)) for lo, hi in shard if hi > lo], dtype=np.int64).reshape(-1, 2)
        if ranges.size and (ranges[0, 0] < 0 or ranges[-1, 1] > model.params.size
                            or np.any(ranges[1:, 0] < ranges[:-1, 1])):
            raise ValueError(f"Adam shard: ranges must be ascending and disjoint within 0..{model.params.size}")
        self.shard = ranges
        # Where each range starts in M, V and G.
        self._offsets = np.concatenate([[0], np.cumsum(ranges[:, 1] - ranges[:, 0])]).astype(np.int64)
        size = int(self._offsets[-1])
        self.M = np.zeros(size, dtype=model.params.dtype)
        self.V = np.zeros_like(self.M)
        self.G = np.zeros_like(self.M)

    @property
    def nbytes(self):
        """Bytes of optimizer state this process holds (the two moments)."""
        return int(self.M.nbytes + self.V.nbytes)

    def state(self):
        """Arrays and counters that, with the parameters, determine every later step.

        Sharded: also ``shard``, the ranges that ``M`` and ``V`` hold.
        """
        state = {"t": self.t, "M": self.M, "V": self.V}
        if self.shard is not None:
            state["shard"] = self.shard
        return state

    def load_state(self, state):
        shard = state.get("shard")
        if (shard is None) != (self.shard is None) or (
                shard is not None and not np.array_equal(np.asarray(shard).reshape(-1, 2), self.shard)):
            raise ValueError("Adam.load_state: the state holds other ranges of the parameters than this optimizer")
        self.t = int(state["t"])
        self.M[...] = state["M"]
        self.V[...] = state["V"]

    def step(self, batch_size):
        """Apply one update from ``model.grads`` (the batch-mean data gradient); sharded: from :attr:`G`."""
        self.begin_step(batch_size)
        if self.shard is None:
            self.update(0, self.model.params.size)
            return
        for lo, hi in self.shard:
            self.update(int(lo), int(hi))

    def begin_step(self, batch_size):
        """Start step ``t + 1``; then :meth:`update` each part of the parameters once.

        Data-parallel training updates each bucket as soon as its allreduce has
        completed, while later buckets are still in flight.
        """
        self.t += 1
        # p -= lr_t * m / (sqrt(v) + eps), with lr_t scikit-learn's bias-corrected rate;
        # with m = (1 - b1) M and v = (1 - b2) V this is
        # p -= c * M / (sqrt(V) + eps / sqrt(1 - b2)),  c = lr_t (1 - b1) / sqrt(1 - b2).
        # (Python floats and math.sqrt: the same values as numpy's, ten times cheaper a step.)
        lr_t = self.lr * math.sqrt(1 - self.beta_2 ** self.t) / (1 - self.beta_1 ** self.t)
        root_1mb2 = math.sqrt(1 - self.beta_2)
        f = self.model.dtype.type
        # The step's scalars in the parameters' dtype: L2 strength, beta_1, beta_2, eps, c.
        self._scalars = (f(self.alpha / batch_size), f(self.beta_1), f(self.beta_2),
                         f(self.epsilon / root_1mb2), f(-lr_t * (1 - self.beta_1) / root_1mb2))

    def update(self, start, stop):
        """Update ``params[start:stop]`` from ``grads[start:stop]``, in place.

        Sharded: ``[start, stop)`` must lie in one range of the shard; the
        gradient comes from :attr:`G` (see :meth:`grad_slice`).
        """
        if self.shard is not None:
            sl = self._slice_of(start, stop)
            self.model.kernels.adam(self.model.params[start:stop], self.G[sl], self.M[sl], self.V[sl],
                                    self._weight_ranges(start, stop), *self._scalars)
            return
        sl = slice(start, stop)
        self.model.kernels.adam(self.model.params[sl], self.model.grads[sl], self.M[sl], self.V[sl],
                                self._weight_ranges(start, stop), *self._scalars)

    def grad_slice(self, start, stop):
        """Sharded: the view of :attr:`G` that holds the gradient of ``params[start:stop]``."""
        return self.G[self._slice_of(start, stop)]

    def _slice_of(self, start, stop):
        """Where global ``[start, stop)`` lies in the shard's M, V and G (cached: the same ranges come back)."""
        key = (start, stop)
        if key in self._slices:
            return self._slices[key]
        i = int(np.searchsorted(self.shard[:, 0], start, side="right")) - 1
        if i < 0 or stop > self.shard[i, 1] or stop < start:
            raise IndexError(f"Adam shard: [{start}, {stop}) is not inside one range this optimizer steps")
        offset = int(self._offsets[i]) + start - int(self.shard[i, 0])
        self._slices[key] = slice(offset, offset + stop - start)
        return self._slices[key]

    def _weight_ranges(self, start, stop):
        """Where the weights (which get the L2 term; biases do not) lie in ``params[start:stop]``.

        An int array of ``[lo, hi)`` rows relative to ``start``; cached, as the
        same ranges (data-parallel buckets) come back every step.
        """
        key = (start, stop)
        if key not in self._ranges:
            spans = [(max(start, lo) - start, min(stop, hi) - start) for lo, hi in self._decay_ranges]
            self._ranges[key] = np.array(sorted(s for s in spans if s[0] < s[1]), dtype=np.int64).reshape(-1, 2)
        return self._ranges[key]
