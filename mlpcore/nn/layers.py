"""Layers, and the one small contract every layer keeps.

A layer

* declares its parameters as :class:`Slot` s (name, shape, whether the L2
  penalty applies, how to initialise it) and owns no storage for them: the
  model (:class:`mlpcore.nn.model.Sequential`) lays every slot out in one flat
  buffer and hands the layer views into it with :meth:`Layer.bind`;
* computes its output with ``layer(x)``, keeping what its backward needs;
* back-propagates with :meth:`Layer.backward`, a generator: it writes its
  parameter gradients into the bound views, *yields* how many leading values of
  its own block are final (so that a data-parallel run can send them while the
  layers below are computed), and *returns* the gradient of its input. The
  gradients it has yielded are final, but it may still read its parameters
  afterwards (the input gradient needs them): update parameters only once the
  whole backward pass has ended.

The buffers of a layer's output are allocated once per batch size and reused,
so a training step allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GlorotUniform:
    """Glorot & Bengio (2010) uniform initialisation, ``U(-b, b)``, ``b = sqrt(6 / (fan_in + fan_out))``.

    scikit-learn's ``MLPClassifier`` uses it for ReLU networks, for the weights
    and the biases alike.
    """

    fan_in: int
    fan_out: int

    def __call__(self, rng, shape):
        bound = np.sqrt(6.0 / (self.fan_in + self.fan_out))
        return rng.uniform(-bound, bound, shape)


@dataclass(frozen=True)
class Slot:
    """One parameter array of a layer.

    Attributes
    ----------
    name : str
        ``"weight"``, ``"bias"``, ... unique within the layer.
    shape : tuple of int
    decay : bool
        Whether the L2 penalty (``--alpha``) applies (weights yes, biases no).
    init : callable(rng, shape) -> ndarray
        Draws the initial values.
    """

    name: str
    shape: tuple
    decay: bool
    init: object

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))


class Layer:
    """The contract (see the module docstring); subclasses override what they need.

    Attributes set by the model
    ---------------------------
    dtype : numpy.dtype
    kernels : NumpyKernels or NumbaKernels
        The elementwise kernels (:mod:`mlpcore.nn.kernels`).
    needs_input_grad : bool
        False for the first layer with parameters: nothing below it needs a gradient.
    """

    needs_input_grad = True

    def slots(self):
        """The parameter slots, in the order they lie in the layer's block."""
        return ()

    def build(self, dtype, kernels):
        self.dtype, self.kernels = np.dtype(dtype), kernels

    def bind(self, params, grads):
        """Receive ``{slot name: view}`` into the model's parameter and gradient buffers."""

    def spec(self):
        """A JSON-friendly description (checkpoints and reports name the model by it)."""
        return {"type": type(self).__name__}

    def __call__(self, x):
        raise NotImplementedError

    def backward(self, grad, chunk=None):
        """Generator: yield ready counts of this layer's block; return the input gradient."""
        raise NotImplementedError

    # -- shapes and arithmetic (per sample, without the batch axis) --------------------
    def in_shape(self):
        """The shape of one input sample, if the layer fixes it (None: it takes any)."""
        return None

    def out_shape(self, in_shape):
        """The shape of one output sample for an input sample of ``in_shape``."""
        return tuple(in_shape)

    def flops(self, in_shape):
        """``(forward, weight gradient, input gradient)`` FLOPs per sample, a multiply-add counting 2.

        Only the multiply-adds of the matrix products and convolutions are counted;
        elementwise work (bias, ReLU, pooling, softmax) is not.
        """
        return 0, 0, 0


class Dense(Layer):
    """Fully connected: ``y = x @ W + b``.

    Parameters
    ----------
    fan_in, fan_out : int
        Input and output features.
    """

    def __init__(self, fan_in, fan_out):
        self.fan_in, self.fan_out = int(fan_in), int(fan_out)
        self._buffers = {}

    def slots(self):
        init = GlorotUniform(self.fan_in, self.fan_out)
        return (Slot("weight", (self.fan_in, self.fan_out), True, init),
                Slot("bias", (self.fan_out,), False, init))

    def bind(self, params, grads):
        self.W, self.b = params["weight"], params["bias"]
        self.dW, self.db = grads["weight"], grads["bias"]

    def spec(self):
        return {"type": "Dense", "in": self.fan_in, "out": self.fan_out}

    def in_shape(self):
        return (self.fan_in,)

    def out_shape(self, in_shape):
        return (self.fan_out,)

    def flops(self, in_shape):
        macs = self.fan_in * self.fan_out
        return 2 * macs, 2 * macs, 2 * macs

    def _batch(self, n):
        """Output, input-gradient and ones (bias gradients by BLAS) arrays for ``n`` rows."""
        if n not in self._buffers:
            self._buffers[n] = (np.empty((n, self.fan_out), dtype=self.dtype),
                                np.empty((n, self.fan_in), dtype=self.dtype) if self.needs_input_grad else None,
                                np.ones(n, dtype=self.dtype))
        return self._buffers[n]

    def __call__(self, x):
        self._x = x
        out = self._batch(x.shape[0])[0]
        np.dot(x, self.W, out=out)
        self.kernels.bias_add(out, self.b)
        return out

    def backward(self, grad, chunk=None):
        """``chunk``: hand the weight gradient over in blocks of rows of about this many values."""
        _, grad_x, ones = self._batch(grad.shape[0])
        rows = self.fan_in if chunk is None else max(1, chunk // self.fan_out)
        for r in range(0, self.fan_in, rows):
            # Rows r:r+rows of dW = x.T @ grad: a contiguous run of the layer's block.
            np.dot(self._x[:, r:r + rows].T, grad, out=self.dW[r:r + rows])
            if r + rows < self.fan_in:
                yield (r + rows) * self.fan_out
        np.dot(ones, grad, out=self.db)  # column sums, via BLAS
        yield self.dW.size + self.db.size
        if grad_x is None:
            return None
        np.dot(grad, self.W.T, out=grad_x)
        return grad_x


class ReLU(Layer):
    """``y = max(x, 0)``, in place: its input buffer (a contiguous layer output) becomes its output."""

    inplace = True  # the model copies a caller's array before an in-place first layer

    def __call__(self, x):
        self.kernels.relu(x)
        self._y = x
        return x

    def backward(self, grad, chunk=None):
        self.kernels.relu_grad(grad, self._y)
        return grad
        yield  # a generator like every layer's backward; it has no parameters to hand over


#: Layer types by the name their ``spec()`` gives (checkpoints store the spec).
LAYERS = {cls.__name__: cls for cls in (Dense, ReLU)}
# mlpcore.nn.conv adds its layers (Unflatten, Conv2d, MaxPool2d, Flatten) when it is imported
# (mlpcore.nn.model imports it; importing it from here would make a cycle).
