"""The elementwise work between the matrix products, as numpy or as fused loops.

A training step of the default 784-128-10 model at batch 200 spends ~620 us
in two large GEMMs and, with plain numpy, about as long again in small passes:
the batch gather and uint8 -> float scaling, the bias, ReLU, the softmax, the softmax
gradient, the ReLU mask and a dozen passes of Adam over 101,770 parameters.
Each numpy call is one pass over memory plus ~1 us of dispatch. The numba
versions do each of those jobs in one pass.

Two implementations of one interface:

* :class:`NumpyKernels` - the reference: plain numpy ufuncs with ``out=``.
* :class:`NumbaKernels` - the same arithmetic, in the same order and the same
  floating type, compiled by numba. The results are **bitwise identical** to
  the reference, up to the sign of a zero (the tests check it), so which one ran never changes a result,
  only the time. The loss, a reported number only, may differ in the last bits.

:func:`get_kernels` picks one: ``"auto"`` means numba when it can be imported.
Compiled code is cached on disk, and :meth:`NumbaKernels.warm_up` compiles or
loads it before any timer starts.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import UsageError

KERNELS = ("auto", "numba", "numpy")

# The probability clip of the loss, per float type (looked up once, not every step).
_EPS = {np.dtype(t).char: np.finfo(t).eps for t in (np.float32, np.float64)}


def cross_entropy_sum(P, y):
    """Summed ``-log p[true class]`` of a batch, probabilities clipped to [eps, 1-eps] as scikit-learn does."""
    p = P[np.arange(P.shape[0]), y]
    eps = np.finfo(P.dtype).eps
    return float(-np.log(np.clip(p, eps, 1 - eps)).sum())


class NumpyKernels:
    """The reference implementation: numpy ufuncs, a work buffer per shape."""

    name = "numpy"

    def __init__(self):
        self._scratch = {}

    def _buffer(self, key, shape, dtype):
        """A work array of this shape and dtype, allocated once and reused."""
        key = (key, shape, np.dtype(dtype).char)
        if key not in self._scratch:
            self._scratch[key] = np.empty(shape, dtype=dtype)
        return self._scratch[key]

    def _vector(self, key, n, dtype):
        """A 1-d work array of ``n`` values, grown as needed (Adam's slices vary in size)."""
        buf = self._scratch.get(key)
        if buf is None or buf.size < n or buf.dtype != dtype:
            buf = self._scratch[key] = np.empty(n, dtype=dtype)
        return buf[:n]

    def warm_up(self, dtype):
        """Nothing to compile."""

    def gather_scaled(self, x, rows, out):
        """``out[i] = x[rows[i]] * dtype(1/255)``: a batch of uint8 rows, scaled to [0, 1].

        Gathers the uint8 rows first (a quarter of the bytes of float32), then
        scales; the formula is :func:`mlpcore.data.to_float`'s.
        """
        raw = self._buffer("gather", out.shape, x.dtype)
        np.take(x, rows, axis=0, out=raw)
        np.multiply(raw, out.dtype.type(1 / 255), out=out)

    def bias_add(self, Z, b):
        """``Z += b`` (a row vector) in place."""
        Z += b

    def relu(self, Z):
        """``Z = max(Z, 0)`` in place (NaN passes through)."""
        np.maximum(Z, 0, out=Z)

    def softmax(self, Z):
        """``Z = softmax(Z)`` of each row, in place.

        The exponential is numpy's in both implementations, and each row is
        summed left to right, so the two agree bit for bit.
        """
        Z -= Z.max(axis=1, keepdims=True)
        np.exp(Z, out=Z)
        total = self._buffer("row_sums", (Z.shape[0],), Z.dtype)
        total[...] = Z[:, 0]
        for j in range(1, Z.shape[1]):
            total += Z[:, j]
        Z /= total[:, None]

    def softmax_grad(self, P, y, scale):
        """Turn softmax probabilities into ``scale * (P - onehot(y))``, in place."""
        rows = np.arange(P.shape[0])
        P[rows, y] -= 1
        P *= P.dtype.type(scale)

    def relu_grad(self, delta, activation):
        """``delta *= (activation > 0)``: hidden activations are >= 0, so sign() is the mask."""
        mask = self._buffer("mask", activation.shape, activation.dtype)
        np.sign(activation, out=mask)
        delta *= mask

    def cross_entropy_sum(self, P, y):
        return cross_entropy_sum(P, y)

    def adam(self, p, g, M, V, weight_ranges, l2, beta_1, beta_2, eps, c):
        """One Adam step on contiguous slices, in place (see :class:`mlpcore.nn.optim.Adam`).

        ``g[lo:hi] += l2 * p[lo:hi]`` for each row of ``weight_ranges`` (if
        ``l2``); then ``M = beta_1 M + g``; ``V = beta_2 V + g*g``;
        ``p += c * M / (sqrt(V) + eps)``. Scalars are of the arrays' dtype.
        """
        tmp = self._vector("adam", p.size, p.dtype)
        if l2:
            for lo, hi in weight_ranges:
                g[lo:hi] += np.multiply(p[lo:hi], l2, out=tmp[lo:hi])
        M *= beta_1
        M += g
        np.multiply(g, g, out=tmp)
        V *= beta_2
        V += tmp
        np.sqrt(V, out=tmp)
        tmp += eps
        np.divide(M, tmp, out=tmp)
        tmp *= c
        p += tmp


class NumbaKernels:
    """The same operations as :class:`NumpyKernels`, each fused into one compiled loop."""

    name = "numba"

    def __init__(self):
        import numba

        from . import _numba_kernels

        self.version = numba.__version__
        self._fns = _numba_kernels.FUNCTIONS

    def warm_up(self, dtype):
        """Compile (or load from numba's on-disk cache) the kernels for ``dtype`` now, not in a timed step."""
        f = np.dtype(dtype).type
        x = np.zeros((2, 3), dtype=np.uint8)
        Z, v = np.zeros((2, 3), dtype=f), np.zeros(3, dtype=f)
        y = np.zeros(2, dtype=np.intp)
        self.gather_scaled(x, np.zeros(2, dtype=np.intp), Z)
        x.flags.writeable = False  # numba types read-only arrays apart: joblib hands workers read-only memmaps
        self.gather_scaled(x, np.zeros(2, dtype=np.intp), Z)
        self.bias_add(Z, v)
        self.relu(Z)
        self.softmax(Z)
        self.relu_grad(Z, Z.copy())
        self.softmax_grad(Z, y, 1.0)
        Z[...] = 0.5
        self.cross_entropy_sum(Z, y)
        self.adam(v, v.copy(), v.copy(), v.copy(), np.array([[0, 1]], dtype=np.int64), f(1e-4), f(0.9), f(0.999),
                  f(1e-8), f(-1e-3))

    def gather_scaled(self, x, rows, out):
        self._fns["gather_scaled"](x, rows, out.dtype.type(1 / 255), out)

    def bias_add(self, Z, b):
        self._fns["bias_add"](Z, b)

    def relu(self, Z):
        self._fns["relu"](Z.reshape(-1))

    def softmax(self, Z):
        self._fns["shift_by_row_max"](Z)
        np.exp(Z, out=Z)
        self._fns["normalise_rows"](Z)

    def softmax_grad(self, P, y, scale):
        self._fns["softmax_grad"](P, y, P.dtype.type(scale))

    def relu_grad(self, delta, activation):
        self._fns["relu_grad"](delta.reshape(-1), activation.reshape(-1))

    def cross_entropy_sum(self, P, y):
        return float(self._fns["cross_entropy_sum"](P, y, _EPS[P.dtype.char]))

    def adam(self, p, g, M, V, weight_ranges, l2, beta_1, beta_2, eps, c):
        self._fns["adam"](p, g, M, V, weight_ranges, l2, beta_1, beta_2, eps, c)


_CACHE = {}


def get_kernels(name="auto"):
    """The kernels called ``name``, one instance per process.

    ``"auto"``: numba's if it imports and compiles here, else numpy's with a
    warning (the results are the same; only the speed differs).
    """
    if name not in KERNELS:
        raise UsageError(f"unknown kernels {name!r}: choose one of {', '.join(KERNELS)}")
    if name == "auto":
        if "auto" not in _CACHE:
            try:
                _CACHE["auto"] = get_kernels("numba")
            except UsageError as exc:
                if "not installed" not in str(exc):
                    warnings.warn(f"{exc}; using the numpy kernels (same results, slower)", stacklevel=2)
                _CACHE["auto"] = get_kernels("numpy")
        return _CACHE["auto"]
    if name not in _CACHE:
        if name == "numba":
            try:
                import numba  # noqa: F401
            except ImportError:
                raise UsageError("--kernels numba: numba is not installed (`pip install numba`); "
                                 "--kernels numpy gives the same results, slower") from None
            try:
                kernels = NumbaKernels()
                kernels.warm_up(np.float32)
            except Exception as exc:  # a numba that cannot compile here: say so, never half-work
                raise UsageError(f"--kernels numba: numba {numba.__version__} could not compile the kernels "
                                 f"({type(exc).__name__}: {exc})") from None
            _CACHE[name] = kernels
        else:
            _CACHE[name] = NumpyKernels()
    return _CACHE[name]


def describe(kernels):
    """``"numba 0.68.1"`` or ``"numpy"``, for reports."""
    return f"numba {kernels.version}" if kernels.name == "numba" else "numpy"


if __name__ == "__main__":
    # `python -m mlpcore.nn.kernels`: compile the numba kernels into numba's cache
    # once (the Makefile does it after installing), so no run pays for it.
    chosen = get_kernels("auto")
    for dtype in (np.float32, np.float64):
        chosen.warm_up(dtype)
    print(f"mlpcore kernels: {describe(chosen)} (float32 and float64 ready)")
