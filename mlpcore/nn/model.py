"""Models: a :class:`Sequential` stack of layers with a softmax output, and :func:`build_model`.

Written for speed on a CPU core. Two things make it fast:

* every parameter lives in one flat float buffer (``Sequential.params``) and
  every gradient in another (``Sequential.grads``); each layer works on views
  into them. Adam then makes one pass over one array instead of a loop over
  layers, and a gradient allreduce sends one buffer (or contiguous buckets of
  it) with no packing.
* the flat buffers store the layers **last layer first**, the order in which
  backprop produces their gradients. A prefix of ``grads`` is therefore final
  as soon as backprop has passed it, which is what overlapped communication
  needs (see :mod:`mlpcore.strategies.data_parallel`).

The maths follows scikit-learn's ``MLPClassifier`` so the two agree to within
sampling noise: Glorot-uniform initialisation, the loss ``mean cross-entropy
+ alpha/2 * ||W||^2 / batch``, and the same Adam update (:mod:`mlpcore.nn.optim`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .conv import lenet5_layers
from .kernels import get_kernels
from .layers import Dense, ReLU

#: The models :func:`build_model` knows.
MODELS = ("mlp", "lenet5")
#: The models whose layers run mlpcore's own threaded kernels (the convolutions), not only BLAS.
THREADED_KERNEL_MODELS = frozenset({"lenet5"})

#: Rows :meth:`Sequential.predict_proba` pushes through at once, by model: small enough that
#: the per-chunk workspaces stay small (LeNet-5's first conv output is 28*28*6 floats a row).
PREDICT_CHUNK = {"mlp": 8192, "lenet5": 512}


@dataclass(frozen=True)
class SlotRange:
    """Where one layer's parameter slot lies in the flat buffers: ``params[start:stop]``."""

    layer: int   # index in ``Sequential.layers``
    name: str    # the slot's name within its layer
    shape: tuple
    decay: bool
    start: int
    stop: int

    def describe(self):
        return {"layer": self.layer, "slot": self.name, "shape": list(self.shape), "decay": self.decay,
                "start": self.start, "stop": self.stop}


class Sequential:
    """Layers applied in order, then a softmax; trained with the cross-entropy loss.

    Parameters
    ----------
    layers : list of Layer
        See :mod:`mlpcore.nn.layers`.
    dtype : numpy dtype, default float32
        Floating type of parameters, gradients and activations.
    rng : numpy.random.Generator
        Source of the initial parameters (each slot's initialiser, first layer first).
    kernels : {"auto", "numba", "numpy"}, default "auto"
        Implementation of the elementwise work (:func:`mlpcore.nn.kernels.get_kernels`);
        it changes the speed, not the results.
    name : str, optional
        What reports call it (``"mlp"``).
    predict_chunk : int, default 8192
        Rows :meth:`predict_proba` computes at once unless told otherwise.

    Attributes
    ----------
    params, grads : ndarray, shape (n_params,)
        Flat buffers holding every parameter / gradient, last layer first.
    layout : list of SlotRange
        Every slot's place in those buffers, in buffer order.
    """

    def __init__(self, layers, *, dtype=np.float32, rng, kernels="auto", name="sequential", predict_chunk=8192):
        self.layers = list(layers)
        self.name = name
        self.predict_chunk = int(predict_chunk)
        self.dtype = np.dtype(dtype)
        self.kernels = get_kernels(kernels)
        self.kernels.warm_up(self.dtype)
        with_params = [i for i, layer in enumerate(self.layers) if layer.slots()]
        if not with_params:
            raise UsageError("a model needs at least one layer with parameters")
        # Backprop stops at the first layer with parameters: nothing below it needs a gradient.
        self._first = with_params[0]
        for i, layer in enumerate(self.layers):
            layer.build(self.dtype, self.kernels)
            layer.needs_input_grad = i > self._first

        # Last layer first: layer i's block starts after the blocks of every layer above it.
        blocks = [sum(s.size for s in layer.slots()) for layer in self.layers]
        self.params = np.empty(sum(blocks), dtype=self.dtype)
        self.grads = np.zeros_like(self.params)
        self.layout, self._starts, start = [], [0] * len(self.layers), 0
        for i in reversed(range(len(self.layers))):
            self._starts[i] = start
            views, grad_views = {}, {}
            for slot in self.layers[i].slots():
                stop = start + slot.size
                self.layout.append(SlotRange(i, slot.name, tuple(slot.shape), slot.decay, start, stop))
                views[slot.name] = self.params[start:stop].reshape(slot.shape)
                grad_views[slot.name] = self.grads[start:stop].reshape(slot.shape)
                start = stop
            self.layers[i].bind(views, grad_views)
        for layer in self.layers:  # initialised first layer first, slot by slot
            for slot in layer.slots():
                view = self.slot_view(self.params, layer, slot.name)
                view[...] = slot.init(rng, slot.shape)

    # -- the layout ----------------------------------------------------------------
    def slot_view(self, flat, layer, name):
        """The view of ``flat`` (``params``, ``grads`` or a same-sized buffer) that holds one slot."""
        index = self.layers.index(layer) if not isinstance(layer, int) else layer
        for s in self.layout:
            if s.layer == index and s.name == name:
                return flat[s.start:s.stop].reshape(s.shape)
        raise KeyError(f"layer {index} has no slot {name!r}")

    def parameters(self):
        """Every parameter array (views into ``params``), in buffer order."""
        return [self.params[s.start:s.stop].reshape(s.shape) for s in self.layout]

    def decay_ranges(self):
        """``[(start, stop), ...]`` of the slots the L2 penalty applies to, first layer first."""
        return [(s.start, s.stop) for s in sorted(self.layout, key=lambda s: s.layer) if s.decay]

    def spec(self):
        """The architecture, JSON-friendly: checkpoints refuse a mismatch by it."""
        return {"name": self.name, "dtype": self.dtype.name, "layers": [layer.spec() for layer in self.layers],
                "layout": [s.describe() for s in self.layout]}

    @property
    def n_params(self):
        return int(self.params.size)

    def flops_per_sample(self, in_shape=None):
        """FLOPs of one training sample: forward + weight gradients + input gradients of every layer but the first.

        A multiply-add counts 2 FLOPs; only the matrix products and convolutions
        are counted (:meth:`mlpcore.nn.layers.Layer.flops`), not the elementwise
        work. The input gradient is counted for the layers backprop computes it
        for (``needs_input_grad``). ``in_shape``: one sample's shape, by default
        what the first layer declares (``(784,)`` for the MLP and LeNet-5 on MNIST).
        """
        shape = in_shape if in_shape is not None else self.layers[0].in_shape()
        if shape is None:
            raise UsageError("flops_per_sample: the first layer does not fix the input shape; pass in_shape")
        total = 0
        for layer in self.layers:
            forward, weights, inputs = layer.flops(tuple(shape))
            total += forward + weights + (inputs if layer.needs_input_grad else 0)
            shape = layer.out_shape(tuple(shape))
        return int(total)

    # -- training --------------------------------------------------------------------
    def __call__(self, X):
        """Class probabilities of a batch, shape (n, classes): a buffer reused by the next call."""
        return self.forward(X)

    def forward(self, X):
        """Forward pass of ``X`` (in ``self.dtype``); returns the softmax probabilities."""
        # A layer that works in place must not overwrite the caller's array.
        out = np.array(X, copy=True, order="C") if getattr(self.layers[0], "inplace", False) else X
        for layer in self.layers:
            out = layer(out)
        self.kernels.softmax(out)
        self._probs = out
        return out

    def backward(self, y, scale, chunk=None):
        """Backprop the cross-entropy data term of the last :meth:`forward` into ``self.grads``.

        The gradient written is ``scale * sum over samples`` of the per-sample
        gradient, so ``scale = 1 / global_batch`` gives the batch mean even when
        this process holds only a slice of the batch. The L2 term is added by
        the optimizer, after any allreduce. The probabilities are overwritten.

        Parameters
        ----------
        y : ndarray of int, shape (n_samples,)
            Class labels.
        scale : float
            Factor applied to the summed gradient.
        chunk : int, optional
            Hand each weight gradient over in blocks of rows of about this many
            values, so that a caller can send the first rows of a large layer
            while the rest are computed. None: one block per layer.

        Yields
        ------
        ready : int
            How many leading values of ``self.grads`` are final.
        """
        grad = self._probs
        self.kernels.softmax_grad(grad, y, scale)  # softmax + cross-entropy: dL/dz = p - onehot(y)
        for i in range(len(self.layers) - 1, self._first - 1, -1):
            steps, offset = self.layers[i].backward(grad, chunk), self._starts[i]
            while True:
                try:
                    ready = next(steps)
                except StopIteration as done:
                    grad = done.value
                    break
                yield offset + ready

    def gradient(self, X, y, scale=None):
        """Compute the data-term gradient of a batch into ``self.grads`` at once.

        Returns the summed cross-entropy of the batch (before ``scale``).
        """
        probs = self.forward(X)
        loss = self.kernels.cross_entropy_sum(probs, y)
        for _ in self.backward(y, 1.0 / len(y) if scale is None else scale):
            pass
        return loss

    def l2_penalty(self, alpha, n):
        """The L2 term of the loss, ``alpha / 2 * sum(W**2) / n``, as scikit-learn scales it."""
        flat = self.params
        return 0.5 * alpha * sum(float(np.dot(flat[lo:hi], flat[lo:hi])) for lo, hi in self.decay_ranges()) / n

    # -- inference -------------------------------------------------------------------
    def predict_proba(self, X, chunk=None):
        """Class probabilities, shape (n_samples, n_classes), computed in chunks of rows.

        ``chunk``: rows at once; None: the model's ``predict_chunk`` (8192 for the MLP, 512 for LeNet-5).
        """
        chunk = self.predict_chunk if chunk is None else int(chunk)
        X = np.asarray(X, dtype=self.dtype)
        out = None
        for start in range(0, X.shape[0], chunk) or [0]:  # no rows: one empty chunk gives the shape
            probs = self.forward(X[start:start + chunk])
            if out is None:
                out = np.empty((X.shape[0], probs.shape[1]), dtype=self.dtype)
            out[start:start + chunk] = probs
        return out

    def predict(self, X):
        """Most probable class of each sample."""
        return self.predict_proba(X).argmax(axis=1)


def mlp_layers(n_features, hidden, n_classes):
    """``[Dense, ReLU, ..., Dense]`` of a multi-layer perceptron with ``hidden`` widths."""
    sizes = [int(n_features), *(int(h) for h in hidden), int(n_classes)]
    if min(sizes) < 1:
        raise UsageError(f"layer sizes must be positive integers, got {sizes}")
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [Dense(fan_in, fan_out), ReLU()]
    return layers[:-1]  # no ReLU after the output layer: the softmax follows


def image_shape(n_features):
    """``(side, side, 1)`` for square grey images of ``n_features`` pixels (MNIST: 784 -> 28x28x1)."""
    side = int(round(np.sqrt(n_features)))
    if side * side != int(n_features):
        raise UsageError(f"lenet5 needs square grey images; {n_features} features are not a square number")
    return (side, side, 1)


def build_model(name, *, n_features, n_classes, hidden, dtype, rng, kernels="auto"):
    """The model ``--model NAME`` trains (one place, for every strategy and the baseline).

    ``"mlp"``: :func:`mlp_layers` with ``hidden`` widths. ``"lenet5"``: :func:`mlpcore.nn.conv.lenet5_layers`
    on square grey images of ``n_features`` pixels (``hidden`` is ignored: the architecture is fixed).
    """
    if name == "mlp":
        return Sequential(mlp_layers(n_features, hidden, n_classes), dtype=dtype, rng=rng, kernels=kernels,
                          name="mlp", predict_chunk=PREDICT_CHUNK["mlp"])
    if name == "lenet5":
        image = image_shape(n_features)
        if image[0] < 12:  # two 5x5 convolutions (the first padded) and two 2x2 pools need >= 12 pixels a side
            raise UsageError(f"lenet5 needs images of at least 12x12 pixels, got {image[0]}x{image[1]}")
        return Sequential(lenet5_layers(n_classes, image), dtype=dtype, rng=rng, kernels=kernels, name="lenet5",
                          predict_chunk=PREDICT_CHUNK["lenet5"])
    raise UsageError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
