"""Convolutional layers on the layer contract (:mod:`mlpcore.nn.layers`): LeNet-5's pieces.

Layout: the batch innermost
---------------------------
Between :class:`Unflatten` and :class:`Flatten` activations are arrays of shape
``(height, width, channels, lanes)``: the samples of the batch are the last,
contiguous axis ("lanes"), padded with zeros to a multiple of 8 lanes
(:data:`LANE_MULTIPLE`). Every inner loop of the kernels
(:mod:`mlpcore.nn.kernels`) then runs over the lanes of one pixel and channel:
contiguous, independent, and long (the batch), which LLVM vectorises without
reordering a single sum. That is what lets a direct convolution in numba keep
the exact operation order of the numpy reference (bitwise equality) and still
beat im2col + BLAS on these channel counts (1 -> 6 and 6 -> 16), whose GEMMs
are too narrow for BLAS to run near its peak (see ``scripts/bench_cnn.py``).

* :class:`Unflatten` turns the training loop's ``(n, features)`` rows into that layout,
  :class:`Flatten` turns it back into rows for the :class:`~mlpcore.nn.layers.Dense` layers
  (features in ``(height, width, channel)`` order).
* :class:`Conv2d` (stride 1, zero padding), weights ``(out, kh, kw, in)``.
* :class:`MaxPool2d` (k x k windows, stride k), keeping each window's winner for backprop.
* :class:`~mlpcore.nn.layers.ReLU` works on any layout in place, so it is reused as it is; in LeNet-5
  the ReLU after each conv is fused into the pool (``MaxPool2d(relu=True)``).

Operation order (what "bitwise" rests on): a convolution output is
``bias + sum over (kh, kw, ci)`` in that order; an input gradient is
``0 + sum over (kh, kw), then co``; a weight gradient is summed over the output
positions in row-major order separately in each lane, then over the lanes by
:meth:`~mlpcore.nn.kernels.NumpyKernels.fold_lanes` (halving while the count is
even, then left to right). A batch of another lane count sums its lanes in another
tree, so only runs of the same shapes are compared bitwise.
"""

from __future__ import annotations

import numpy as np

from .layers import LAYERS, Dense, GlorotUniform, Layer, ReLU, Slot


def _size(shape):
    return int(np.prod(shape, dtype=np.int64))


# Lanes a batch is padded to a multiple of (zeros in the spare lanes). numba's vectorised
# loops over the lanes go 8 floats at a time (AVX2, and AVX-512 at LLVM's preferred 256-bit
# width); a count that is not a multiple of 8 leaves a scalar tail in every inner loop.
# Measured at batch 100, one thread (Intel Xeon, AVX-512): conv1 forward 543 -> 478 us,
# conv2 forward 1081 -> 949 us, conv2 input gradient 1023 -> 907 us with 104 lanes instead
# of 100, for 4% more arithmetic.
LANE_MULTIPLE = 8


class Unflatten(Layer):
    """``(n, height*width*channels)`` rows -> ``(height, width, channels, lanes)`` images, the batch innermost.

    ``lanes`` is ``n`` rounded up to a multiple of ``lane_multiple`` (default
    :data:`LANE_MULTIPLE`); the spare lanes hold zeros. Every layer up to the
    :class:`Flatten` computes them like real samples (they are independent of the
    real ones); the Flatten drops them, and its backward gives them a zero gradient,
    so they add exact zeros to the weight gradients.

    A transpose, not a view (the layout puts the batch last); about 0.1 ms for
    a batch of 200 MNIST images. Its backward (never needed as the first layer
    of a model) transposes back.
    """

    def __init__(self, height, width, channels=1, lane_multiple=LANE_MULTIPLE):
        self.shape = (int(height), int(width), int(channels))
        self.lane_multiple = int(lane_multiple)
        if self.lane_multiple < 1:
            raise ValueError(f"lane_multiple must be a positive integer, not {lane_multiple!r}")
        self.rows = None  # the real samples of the last batch (the Flatten after reads it)
        self._buffers = {}

    def spec(self):
        return {"type": "Unflatten", "shape": list(self.shape)}

    def in_shape(self):
        return (_size(self.shape),)

    def out_shape(self, in_shape):
        return self.shape

    def lanes(self, n):
        """The lanes a batch of ``n`` samples takes."""
        return -(-n // self.lane_multiple) * self.lane_multiple

    def __call__(self, x):
        n = x.shape[0]
        if n not in self._buffers:
            self._buffers[n] = [np.empty((*self.shape, self.lanes(n)), dtype=self.dtype), None]
        out = self._buffers[n][0]
        self.rows = n
        self.kernels.to_lanes(np.ascontiguousarray(x), out.reshape(_size(self.shape), out.shape[-1]))
        return out

    def backward(self, grad, chunk=None):
        bufs = self._buffers[self.rows]
        if bufs[1] is None:
            bufs[1] = np.empty((self.rows, _size(self.shape)), dtype=self.dtype)
        self.kernels.from_lanes(grad.reshape(_size(self.shape), grad.shape[-1]), bufs[1])
        return bufs[1]
        yield  # no parameters


class Flatten(Layer):
    """``(height, width, channels, lanes)`` -> ``(n, height*width*channels)`` rows, features in (h, w, c) order.

    ``unflatten``: the :class:`Unflatten` that laid the batch out, which says how
    many of the lanes are real samples (the rest are dropped here, and get a zero
    gradient in backward). Without one, every lane is a sample.
    """

    def __init__(self, unflatten=None):
        self.unflatten = unflatten
        self._buffers = {}

    def out_shape(self, in_shape):
        return (_size(in_shape),)

    def __call__(self, x):
        shape, lanes = x.shape[:-1], x.shape[-1]
        n = lanes if self.unflatten is None else self.unflatten.rows
        key = (x.shape, n)
        if key not in self._buffers:
            self._buffers[key] = [np.empty((n, _size(shape)), dtype=self.dtype), None]
        out = self._buffers[key][0]
        self._key = key
        self.kernels.from_lanes(x.reshape(out.shape[1], lanes), out)
        return out

    def backward(self, grad, chunk=None):
        if not self.needs_input_grad:
            return None
        bufs = self._buffers[self._key]
        shape = self._key[0]
        if bufs[1] is None:  # made by the first backward of a batch size
            bufs[1] = np.empty(shape, dtype=self.dtype)
        grad_x = bufs[1]
        # to_lanes writes zeros into the spare lanes
        self.kernels.to_lanes(np.ascontiguousarray(grad), grad_x.reshape(grad.shape[1], shape[-1]))
        return grad_x
        yield  # no parameters


class Conv2d(Layer):
    """2-d convolution (cross-correlation), stride 1, zero ``padding`` on each side.

    Input ``(H, W, in_channels, n)``, output ``(H + 2p - kh + 1, W + 2p - kw + 1, out_channels, n)``.

    Slots: ``weight`` of shape ``(out_channels, kh, kw, in_channels)`` (each output
    channel's taps contiguous, in the order the kernels add them) with L2 decay,
    then ``bias`` ``(out_channels,)``. Both are drawn Glorot-uniform with Keras'
    fans for a convolution, ``fan_in = kh*kw*in``, ``fan_out = kh*kw*out``; the
    bias with the same bound, as :class:`~mlpcore.nn.layers.Dense` does.

    Backward writes the weight and bias gradients and yields the whole block
    once; then, unless it is the model's first layer with parameters, the input
    gradient (a direct "full" correlation with the weights, gathered per input pixel).

    ``weight_grad`` chooses how the weight gradient is computed:

    * ``"direct"``: numba loops, summed per lane over the output positions, then
      folded over the lanes (the bitwise twin of the numpy reference);
    * ``"gemm"``: im2col + BLAS, an output row at a time: each row's patches
      ``(kh*kw*in, width*lanes)`` times the output gradient (channels first),
      the rows' products added in row order
      (:meth:`~mlpcore.nn.kernels.NumpyKernels.conv2d_weight_grad_gemm`); the
      same numpy calls under either kernels, so still bitwise the same between them;
    * ``"auto"`` (default): ``"gemm"`` when a filter has at least 64 taps
      (``kh*kw*in``), else ``"direct"``. Measured at LeNet's shapes, batch 200, one
      thread (``scripts/bench_cnn.py``, Intel, 2026-12-04): conv1 (25 taps) direct 8.4x
      faster than im2col + BLAS; conv2 (150 taps) im2col + BLAS 2.1x faster than direct.
    """

    GEMM_MIN_TAPS = 64

    def __init__(self, in_channels, out_channels, kernel_size, padding=0, weight_grad="auto"):
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        kh, kw = (kernel_size, kernel_size) if np.isscalar(kernel_size) else kernel_size
        self.kernel_size = (int(kh), int(kw))
        self.padding = int(padding)
        if weight_grad not in ("auto", "direct", "gemm"):
            raise ValueError(f"weight_grad must be 'auto', 'direct' or 'gemm', not {weight_grad!r}")
        if weight_grad == "auto":
            weight_grad = "gemm" if kh * kw * self.in_channels >= self.GEMM_MIN_TAPS else "direct"
        self.weight_grad = weight_grad
        self._buffers = {}

    def slots(self):
        kh, kw = self.kernel_size
        init = GlorotUniform(kh * kw * self.in_channels, kh * kw * self.out_channels)
        return (Slot("weight", (self.out_channels, kh, kw, self.in_channels), True, init),
                Slot("bias", (self.out_channels,), False, init))

    def bind(self, params, grads):
        self.W, self.b = params["weight"], params["bias"]
        self.dW, self.db = grads["weight"], grads["bias"]

    def spec(self):
        return {"type": "Conv2d", "in": self.in_channels, "out": self.out_channels,
                "kernel": list(self.kernel_size), "padding": self.padding}

    def out_shape(self, in_shape):
        h, w, _ = in_shape
        kh, kw = self.kernel_size
        p = self.padding
        return (h + 2 * p - kh + 1, w + 2 * p - kw + 1, self.out_channels)

    def flops(self, in_shape):
        """Per sample: forward, weight gradient, input gradient; a multiply-add counts 2 (bias adds not counted)."""
        ho, wo, cout = self.out_shape(in_shape)
        kh, kw = self.kernel_size
        macs = ho * wo * cout * kh * kw * self.in_channels
        return 2 * macs, 2 * macs, 2 * macs

    def _batch(self, shape):
        if shape not in self._buffers:
            h, w, cin, n = shape
            if cin != self.in_channels:
                raise ValueError(f"Conv2d expects {self.in_channels} input channels, got {cin}")
            p, (kh, kw) = self.padding, self.kernel_size
            ho, wo, cout = self.out_shape((h, w, cin))
            f = self.dtype
            self._buffers[shape] = {"out": np.empty((ho, wo, cout, n), dtype=f),
                                    "padded": np.zeros((h + 2 * p, w + 2 * p, cin, n), dtype=f) if p else None}
        return self._buffers[shape]

    def _backward_buffers(self, bufs, shape):
        """Made by the first backward of a batch size (prediction never needs them)."""
        if "P" not in bufs:
            h, w, cin, n = shape
            (kh, kw), cout, f = self.kernel_size, self.out_channels, self.dtype
            # Weight-gradient partials, per lane (channels and taps rounded up to even: see the kernel).
            taps = kh * kw * cin
            ho, wo, _ = self.out_shape((h, w, cin))
            if self.weight_grad == "gemm":
                bufs["col"] = np.empty((ho, kh, kw, cin, 1, wo, n), dtype=f)
                bufs["gT"] = np.empty((cout, ho, wo, n), dtype=f)
                bufs["parts"] = np.empty((ho, taps, cout), dtype=f)
                bufs["dWT"] = np.empty((taps, cout), dtype=f)
            else:
                bufs["P"] = np.empty((cout + cout % 2, taps + taps % 2, n), dtype=f)
            bufs["Pb"] = np.empty((cout, n), dtype=f)
            if self.needs_input_grad:
                bufs["dx"] = np.empty(shape, dtype=f)
                bufs["wt"] = np.empty((kh, kw, cin, cout), dtype=f)
        return bufs

    def __call__(self, x):
        bufs = self._batch(x.shape)
        p = self.padding
        if p:
            xp = bufs["padded"]  # its border stays zero
            xp[p:xp.shape[0] - p, p:xp.shape[1] - p] = x
        else:
            xp = x
        self._x, self._bufs, self._shape = xp, bufs, x.shape
        self.kernels.conv2d_forward(xp, self.W, self.b, bufs["out"])
        return bufs["out"]

    def backward(self, grad, chunk=None):
        bufs = self._backward_buffers(self._bufs, self._shape)
        if self.weight_grad == "gemm":
            gT, dWT = bufs["gT"], bufs["dWT"]
            self.kernels.channels_first(grad, gT)
            # dW.T = sum over output rows of (the row's patches) @ g.T, then transposed into place:
            # BLAS runs this orientation (150 x 16 out) 1.6x faster than g @ col.T (16 x 150 out)
            # at conv2's shapes (1.20 vs 1.95 ms at batch 200, as one product).
            self.kernels.conv2d_weight_grad_gemm(self._x, gT, bufs["col"], bufs["parts"], dWT)
            np.copyto(self.dW.reshape(self.out_channels, -1), dWT.T)
            self.kernels.conv2d_bias_grad(grad, bufs["Pb"], self.db)
        else:
            self.kernels.conv2d_backward_weight(grad, self._x, bufs["P"], bufs["Pb"], self.dW, self.db)
        yield self.dW.size + self.db.size
        if not self.needs_input_grad:
            return None
        np.copyto(bufs["wt"], self.W.transpose(1, 2, 3, 0))
        self.kernels.conv2d_backward_input(grad, bufs["wt"], bufs["dx"], self.padding)
        return bufs["dx"]


class MaxPool2d(Layer):
    """Max-pooling over ``size x size`` windows with stride ``size`` (rows/columns left over are dropped).

    Ties: the first maximum in row-major window order wins and gets the whole
    gradient; a NaN wins over any number (the first NaN), so NaNs propagate.
    The winner's place in its window is kept (one byte per output) for backprop.

    ``relu=True``: a ReLU before the pool, fused into it. ``max(relu(x)) =
    relu(max(x))`` and the ReLU's gradient at the winner is ``sign(pooled)``, so
    this is the same function with the same gradient as ``ReLU`` then ``MaxPool2d``
    (bitwise, up to the sign of a zero), without two passes over the larger
    input (about 0.7 ms a step of LeNet-5's first conv output, batch 200).
    """

    def __init__(self, size=2, relu=False):
        self.size = int(size)
        self.relu = bool(relu)
        self._buffers = {}

    def spec(self):
        return {"type": "MaxPool2d", "size": self.size, "relu": self.relu}

    def out_shape(self, in_shape):
        h, w, c = in_shape
        return (h // self.size, w // self.size, c)

    def __call__(self, x):
        key = x.shape
        if key not in self._buffers:
            h, w, c, n = key
            k = self.size
            self._buffers[key] = [np.empty((h // k, w // k, c, n), dtype=self.dtype),
                                  np.empty((h // k, w // k, c, n), dtype=np.uint8), None]
        out, idx, _ = self._buffers[key]
        self._key = key
        self.kernels.maxpool_forward(x, out, idx, self.relu)
        return out

    def backward(self, grad, chunk=None):
        if not self.needs_input_grad:
            return None
        bufs = self._buffers[self._key]
        if bufs[2] is None:  # made by the first backward of a batch size
            bufs[2] = np.empty(self._key, dtype=self.dtype)
        self.kernels.maxpool_backward(grad, bufs[1], bufs[0], self.relu, bufs[2])
        return bufs[2]
        yield  # no parameters


def lenet5_layers(n_classes=10, image=(28, 28, 1), fuse_relu=True):
    """LeNet-5 as it is trained today (ReLU, max-pooling): 61,706 parameters for 28x28x1 and 10 classes.

    conv 5x5x6 (padding 2) - ReLU - pool 2 - conv 5x5x16 - ReLU - pool 2 - flatten (400)
    - dense 120 - ReLU - dense 84 - ReLU - dense ``n_classes`` (the softmax follows).
    ``fuse_relu``: each ReLU after a conv is fused into the pool after it
    (``MaxPool2d(relu=True)``, the same function and gradient; see there).
    """
    h, w, c = image

    def relu_pool():
        return [MaxPool2d(2, relu=True)] if fuse_relu else [ReLU(), MaxPool2d(2)]

    unflatten = Unflatten(h, w, c)
    layers = [unflatten, Conv2d(c, 6, 5, padding=2), *relu_pool(), Conv2d(6, 16, 5), *relu_pool(),
              Flatten(unflatten)]
    shape = (h, w, c)
    for layer in layers[1:-1]:
        shape = layer.out_shape(shape)
    flat = _size(shape)
    return layers + [Dense(flat, 120), ReLU(), Dense(120, 84), ReLU(), Dense(84, int(n_classes))]


LAYERS.update({cls.__name__: cls for cls in (Unflatten, Conv2d, MaxPool2d, Flatten)})
