"""The numpy multi-layer perceptron: ReLU hidden layers, softmax output, Adam.

Written for speed on a CPU core, in the layout of scikit-learn's
``MLPClassifier``: weights and gradients are per-layer lists, forward and
backprop are loops over layers. Two things make it fast:

* every parameter lives in one flat float buffer (``MLP.params``) and every
  gradient in another (``MLP.grads``); the per-layer ``coefs`` / ``intercepts``
  lists are views into them. Adam then makes one pass over one array instead
  of a loop over layers, and a gradient allreduce sends one buffer (or
  contiguous buckets of it) with no packing.
* the flat buffers store the layers **last layer first**, the order in which
  backprop produces their gradients. A prefix of ``grads`` is therefore final
  as soon as backprop has passed it, which is what overlapped communication
  needs (see :mod:`mlpcore.strategies`).

The maths follows scikit-learn so the two agree to within sampling noise:
Glorot-uniform initialisation, the loss ``mean cross-entropy +
alpha/2 * ||W||^2 / batch``, and the same Adam update.

The matrix products are numpy's (BLAS); the elementwise work between them
(bias + ReLU, the softmax and ReLU gradients, Adam) is done by
:mod:`mlpcore.kernels`, plain numpy or fused numba loops with bitwise the same
results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UsageError
from .kernels import get_kernels


@dataclass
class _BatchBuffers:
    outputs: list      # each layer's activations (the last holds probabilities, then deltas)
    deltas: list       # dL/dz of each hidden layer
    ones: np.ndarray   # for bias gradients as a matrix-vector product


class MLP:
    """Multi-layer perceptron classifier with ReLU hidden layers and a softmax output.

    Parameters
    ----------
    layer_sizes : sequence of int
        Units per layer, input first and classes last, e.g. ``(784, 128, 10)``.
    dtype : numpy dtype, default float32
        Floating type of parameters, gradients and activations.
    rng : numpy.random.Generator
        Source of the Glorot-uniform initial weights.
    kernels : {"auto", "numba", "numpy"}, default "auto"
        Implementation of the elementwise work (:func:`mlpcore.kernels.get_kernels`);
        it changes the speed, not the results.

    Attributes
    ----------
    coefs : list of ndarray, shape (fan_in, fan_out)
        Weight matrix of each layer, first layer first (views into ``params``).
    intercepts : list of ndarray, shape (fan_out,)
        Bias of each layer (views into ``params``).
    coef_grads, intercept_grads : list of ndarray
        Gradients of the same shapes (views into ``grads``).
    params, grads : ndarray, shape (n_params,)
        Flat buffers holding every parameter / gradient, last layer first.
    layer_slices : list of slice
        ``params[layer_slices[i]]`` holds layer ``i``'s weights then its bias.
    """

    def __init__(self, layer_sizes, *, dtype=np.float32, rng, kernels="auto"):
        sizes = [int(s) for s in layer_sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise UsageError(f"layer sizes must be at least two positive integers, got {layer_sizes!r}")
        self.layer_sizes = tuple(sizes)
        self.dtype = np.dtype(dtype)
        self.kernels = get_kernels(kernels)
        self.kernels.warm_up(self.dtype)
        n_layers = len(sizes) - 1
        counts = [sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(n_layers)]
        self.params = np.empty(sum(counts), dtype=self.dtype)
        self.grads = np.zeros_like(self.params)

        # Last layer first: layer i starts after all layers above it.
        starts = np.cumsum([0] + counts[::-1])[::-1][1:]
        self.layer_slices = [slice(int(s), int(s) + c) for s, c in zip(starts, counts)]
        self.coefs, self.intercepts = self._layer_views(self.params)
        self.coef_grads, self.intercept_grads = self._layer_views(self.grads)

        for W, b in zip(self.coefs, self.intercepts):
            # Glorot & Bengio (2010) uniform bound, as scikit-learn uses for ReLU.
            bound = np.sqrt(6.0 / (W.shape[0] + W.shape[1]))
            W[...] = rng.uniform(-bound, bound, W.shape)
            b[...] = rng.uniform(-bound, bound, b.shape)
        self._batch_buffers = {}

    def _layer_views(self, flat):
        coefs, intercepts = [], []
        for i, sl in enumerate(self.layer_slices):
            fan_in, fan_out = self.layer_sizes[i], self.layer_sizes[i + 1]
            block = flat[sl]
            coefs.append(block[: fan_in * fan_out].reshape(fan_in, fan_out))
            intercepts.append(block[fan_in * fan_out:])
        return coefs, intercepts

    @property
    def n_layers(self):
        """Number of weight layers (hidden layers + 1)."""
        return len(self.coefs)

    def _buffers(self, n):
        """Work arrays for a batch of ``n`` rows, allocated once per batch size."""
        if n not in self._batch_buffers:
            hidden_and_out = self.layer_sizes[1:]
            self._batch_buffers[n] = _BatchBuffers(
                outputs=[np.empty((n, s), dtype=self.dtype) for s in hidden_and_out],
                deltas=[np.empty((n, s), dtype=self.dtype) for s in hidden_and_out[:-1]],
                ones=np.ones(n, dtype=self.dtype),
            )
        return self._batch_buffers[n]

    def forward(self, X):
        """Forward pass.

        Parameters
        ----------
        X : ndarray, shape (n_samples, n_features)
            Inputs in ``self.dtype``.

        Returns
        -------
        activations : list of ndarray
            ``[X, hidden_1, ..., probabilities]``; all but ``X`` are buffers
            reused by the next call with the same batch size.
        """
        outputs = self._buffers(X.shape[0]).outputs
        activations = [X]
        for i, (W, b) in enumerate(zip(self.coefs, self.intercepts)):
            Z = outputs[i]
            np.dot(activations[-1], W, out=Z)
            if i < self.n_layers - 1:
                self.kernels.bias_relu(Z, b)
            else:
                self.kernels.bias_softmax(Z, b)
            activations.append(Z)
        return activations

    def backward(self, activations, y, scale, chunk=None):
        """Backprop the cross-entropy data term into ``self.grads``.

        The gradient written is ``scale * sum over samples`` of the per-sample
        gradient, so ``scale = 1 / global_batch`` gives the batch mean even when
        this process holds only a slice of the batch. The L2 term is added by
        the optimizer (:meth:`Adam.update`), after any allreduce.

        Parameters
        ----------
        activations : list of ndarray
            The output of :meth:`forward`; the probabilities are overwritten.
        y : ndarray of int, shape (n_samples,)
            Class labels.
        scale : float
            Factor applied to the summed gradient.
        chunk : int, optional
            Compute each weight gradient in blocks of rows of about this many
            values, so that a caller can send the first rows of a large layer
            while the rest are computed. None: one block per layer.

        Yields
        ------
        ready : int
            How many leading values of ``self.grads`` are final (they are
            stored last layer first, in the order backprop produces them).
        """
        n = y.shape[0]
        buffers = self._buffers(n)
        deltas = buffers.deltas
        delta = activations[-1]  # softmax + cross-entropy: dL/dz = p - onehot(y), in place
        self.kernels.softmax_grad(delta, y, scale)
        for i in range(self.n_layers - 1, -1, -1):
            W_grad, start = self.coef_grads[i], self.layer_slices[i].start
            fan_in, fan_out = W_grad.shape
            rows = fan_in if chunk is None else max(1, chunk // fan_out)
            for r in range(0, fan_in, rows):
                # Rows r:r+rows of dW_i = A_i.T @ delta, a contiguous run of grads.
                np.dot(activations[i][:, r:r + rows].T, delta, out=W_grad[r:r + rows])
                if r + rows < fan_in:
                    yield start + (r + rows) * fan_out
            np.dot(buffers.ones, delta, out=self.intercept_grads[i])  # column sums, via BLAS
            yield self.layer_slices[i].stop
            if i > 0:
                # Propagate to the layer below through W_i and the ReLU mask.
                below = deltas[i - 1]
                np.dot(delta, self.coefs[i].T, out=below)
                self.kernels.relu_grad(below, activations[i])
                delta = below

    def gradient(self, X, y, scale=None):
        """Compute the data-term gradient of a batch into ``self.grads`` at once.

        Returns the summed cross-entropy of the batch (before ``scale``).
        """
        activations = self.forward(X)
        loss = self.kernels.cross_entropy_sum(activations[-1], y)
        for _ in self.backward(activations, y, 1.0 / len(y) if scale is None else scale):
            pass
        return loss

    def l2_penalty(self, alpha, n):
        """The L2 term of the loss, ``alpha / 2 * sum(W**2) / n``, as scikit-learn scales it."""
        return 0.5 * alpha * sum(float(np.dot(W.ravel(), W.ravel())) for W in self.coefs) / n

    def predict_proba(self, X, chunk=8192):
        """Class probabilities, shape (n_samples, n_classes), computed in chunks."""
        X = np.asarray(X, dtype=self.dtype)
        out = np.empty((X.shape[0], self.layer_sizes[-1]), dtype=self.dtype)
        for start in range(0, X.shape[0], chunk):
            out[start:start + chunk] = self.forward(X[start:start + chunk])[-1]
        return out

    def predict(self, X):
        """Most probable class of each sample."""
        return self.predict_proba(X).argmax(axis=1)


class Adam:
    """Adam (Kingma & Ba, 2015) on a flat parameter buffer, with L2 on the weights.

    Same update as scikit-learn's ``AdamOptimizer``, rearranged to take fewer
    passes over memory: the moments are kept unnormalised,
    ``M = m / (1 - beta_1)`` and ``V = v / (1 - beta_2)``, so each needs one
    scale and one add.

    Parameters
    ----------
    model : MLP
        The model whose ``params`` are updated from its ``grads``.
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
        self._coef_ranges = [(sl.start, sl.start + W.size) for sl, W in zip(model.layer_slices, model.coefs)]
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
            spans = [(max(start, lo) - start, min(stop, hi) - start) for lo, hi in self._coef_ranges]
            self._ranges[key] = np.array(sorted(s for s in spans if s[0] < s[1]), dtype=np.int64).reshape(-1, 2)
        return self._ranges[key]
