"""The optimiser: Adam on the model's flat parameter buffer.

It reads the model's layout (which slots get the L2 penalty) and nothing else
of the model, so any model on the layer contract trains with it.
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
    """

    def __init__(self, model, *, lr=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-8, alpha=1e-4):
        self.model = model
        self.lr, self.beta_1, self.beta_2, self.epsilon, self.alpha = lr, beta_1, beta_2, epsilon, alpha
        self.t = 0
        self.M = np.zeros_like(model.params)
        self.V = np.zeros_like(model.params)
        self._decay_ranges = model.decay_ranges()
        self._ranges = {}

    def state(self):
        """Arrays and counters that, with the parameters, determine every later step."""
        return {"t": self.t, "M": self.M, "V": self.V}

    def load_state(self, state):
        self.t = int(state["t"])
        self.M[...] = state["M"]
        self.V[...] = state["V"]

    def step(self, batch_size):
        """Apply one update from ``model.grads`` (the batch-mean data gradient)."""
        self.begin_step(batch_size)
        self.update(0, self.model.params.size)

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
        """Update ``params[start:stop]`` from ``grads[start:stop]``, in place."""
        sl = slice(start, stop)
        self.model.kernels.adam(self.model.params[sl], self.model.grads[sl], self.M[sl], self.V[sl],
                                self._weight_ranges(start, stop), *self._scalars)

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
