"""The elementwise work between the matrix products, as numpy or as fused loops.

A training step of the default 784-128-10 model at batch 200 spends ~620 us
in two large GEMMs and, with plain numpy, about as long again in small passes:
the batch gather and uint8 -> float scaling, the bias, ReLU, the softmax, the softmax
gradient, the ReLU mask and a dozen passes of Adam over 101,770 parameters.
Each numpy call is one pass over memory plus ~1 us of dispatch. The numba
versions do each of those jobs in one pass.

The convolutional network's kernels (LeNet-5, :mod:`mlpcore.nn.conv`) live here too:
direct convolutions, their weight and input gradients, max-pooling and the
layout transposes, on activations laid out (height, width, channels, batch).
Their numba versions can split their outer loop over threads
(:meth:`NumbaKernels.set_threads`); each output is still computed by one
thread in one order, so the thread count changes no bit either.

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

    threads = 1

    def set_threads(self, n):
        """The reference runs on the calling thread; the count is kept for reports only."""
        self.threads = max(1, int(n))

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

    # -- convolutional networks (mlpcore.nn.conv) ---------------------------------------------
    # Activations are (height, width, channels, lanes), the batch innermost (see mlpcore.nn.conv).
    # Each reference adds every output's terms in the order its numba twin does, one numpy
    # operation per term (whole images at once), so the two agree bit for bit.
    def to_lanes(self, X, out):
        """``out[:, :n] = X.T`` and 0 in the lanes after (``X`` (n, F), ``out`` (F, lanes))."""
        n = X.shape[0]
        np.copyto(out[:, :n], X.T)
        out[:, n:] = 0

    def from_lanes(self, x, out):
        """``out = x[:, :n].T`` (``x`` (F, lanes), ``out`` (n, F))."""
        np.copyto(out, x[:, :out.shape[0]].T)

    def conv2d_forward(self, x, w, b, out):
        """The convolution ``out[oh, ow, co] = b[co] + sum over (kh, kw, ci), in that order, of
        w[co, kh, kw, ci] * x[oh+kh, ow+kw, ci]``.

        ``x`` (Hp, Wp, Cin, lanes) is the (already padded) input, ``w`` (Cout, KH, KW, Cin),
        ``out`` (Ho, Wo, Cout, lanes); stride 1.
        """
        Ho, Wo = out.shape[:2]
        _, KH, KW, Cin = w.shape
        term = self._buffer("conv_term", out.shape, out.dtype)
        out[...] = b[:, None]
        for kh in range(KH):
            for kw in range(KW):
                for ci in range(Cin):
                    np.multiply(w[:, kh, kw, ci, None], x[kh:kh + Ho, kw:kw + Wo, ci, None, :], out=term)
                    out += term

    def conv2d_backward_input(self, g, wt, dx, pad):
        """The input gradient ``dx[ih, iw, ci] = 0 + sum over valid (kh, kw), in that order, and co of
        wt[kh, kw, ci, co] * g[oh, ow, co]``.

        ``oh = ih + pad - kh``, ``ow = iw + pad - kw``; ``wt`` is the weight as (KH, KW, Cin, Cout),
        ``g`` (Ho, Wo, Cout, lanes), ``dx`` (H, W, Cin, lanes) the unpadded input's gradient.
        """
        Ho, Wo, Cout = g.shape[:3]
        KH, KW = wt.shape[:2]
        H, W = dx.shape[:2]
        dx[...] = 0
        for kh in range(KH):
            i0, i1 = max(0, kh - pad), min(H, kh - pad + Ho)
            for kw in range(KW):
                j0, j1 = max(0, kw - pad), min(W, kw - pad + Wo)
                if i0 >= i1 or j0 >= j1:
                    continue
                region = dx[i0:i1, j0:j1]
                term = self._buffer("conv_dx_term", region.shape, dx.dtype)
                for co in range(Cout):
                    src = g[i0 + pad - kh:i1 + pad - kh, j0 + pad - kw:j1 + pad - kw, co, None, :]
                    np.multiply(wt[kh, kw, :, co, None], src, out=term)
                    region += term

    def fold_lanes(self, P, out):
        """``out[j]`` = the sum of ``P[j, :]``: halve the lanes while their count is even, then add the rest
        in order (``P`` is overwritten)."""
        L = P.shape[1]
        while L % 2 == 0 and L > 1:
            h = L // 2
            P[:, :h] += P[:, h:L]
            L = h
        out[...] = P[:, 0]
        for lane in range(1, L):
            out += P[:, lane]

    def conv2d_backward_weight(self, g, x, P, Pb, dw, db):
        """Weight and bias gradients, summed over positions per lane, then over lanes.

        ``P[co, kh, kw*Cin + ci] = 0 + sum over (oh, ow), in order, of g[oh, ow, co] * x[oh+kh, ow+kw, ci]`` and
        ``Pb[co] = 0 + sum over (oh, ow) of g[oh, ow, co]``, lane by lane; then :meth:`fold_lanes` into ``dw``
        (Cout, KH, KW, Cin) and ``db``. ``P`` (Cout', U', lanes), ``U = KH*KW*Cin`` taps in (kh, kw, ci)
        order, both rounded up to even (the numba kernel's spare rows), and ``Pb`` (Cout, lanes) are
        workspaces.
        """
        Ho, Wo, Cout, N = g.shape
        _, KH, KW, Cin = dw.shape
        U = KH * KW * Cin
        P5 = P[:Cout, :U].reshape(Cout, KH, KW, Cin, N)
        term = self._buffer("conv_dw_term", P5.shape, P.dtype)
        P[...] = 0
        Pb[...] = 0
        for oh in range(Ho):
            for ow in range(Wo):
                np.multiply(g[oh, ow, :, None, None, None, :], x[None, oh:oh + KH, ow:ow + KW], out=term)
                P5 += term
                Pb += g[oh, ow]
        for co in range(Cout):
            self.fold_lanes(P[co, :U], dw[co].reshape(-1))
        self.fold_lanes(Pb, db)

    def conv2d_bias_grad(self, g, Pb, db):
        """The bias gradient alone, as :meth:`conv2d_backward_weight` computes it (``Pb`` a workspace)."""
        Ho, Wo = g.shape[:2]
        Pb[...] = 0
        for oh in range(Ho):
            for ow in range(Wo):
                Pb += g[oh, ow]
        self.fold_lanes(Pb, db)

    def im2col_lanes(self, x, col):
        """``col[kh, kw, ci, oh, ow] = x[oh+kh, ow+kw, ci]``: the patches of a stride-1 convolution, as rows
        of lanes (``col`` (KH, KW, Cin, Ho, Wo, lanes)); a copy."""
        KH, KW, Cin, Ho, Wo = col.shape[:5]
        for kh in range(KH):
            for kw in range(KW):
                np.copyto(col[kh, kw], x[kh:kh + Ho, kw:kw + Wo].transpose(2, 0, 1, 3))

    def channels_first(self, g, out):
        """``out[c, oh, ow] = g[oh, ow, c]`` (rows of lanes); a copy."""
        np.copyto(out, g.transpose(2, 0, 1, 3))

    def conv2d_weight_grad_gemm(self, x, gT, col, parts, dWT):
        """The weight gradient by im2col + BLAS, an output row at a time, in a fixed order.

        For each output row ``r``: the patches of that row (:meth:`im2col_lanes` of ``x[r:r+KH]``),
        then ``parts[r] = patches @ gT[:, r].T`` in one BLAS call; then
        ``dWT = parts[0] + parts[1] + ...`` in row order. ``x`` (Hp, Wp, Cin, lanes) is the padded
        input, ``gT`` (Cout, Ho, Wo, lanes) the output gradient channels first, ``col``
        (Ho, KH, KW, Cin, 1, Wo, lanes) and ``parts`` (Ho, taps, Cout) workspaces, ``dWT``
        (taps, Cout) the result, transposed. The patches of every row are built in one slot of
        ``col`` (``col[0]`` here; with the numba kernels' threads, the first row of each thread's
        share), so a row's patches (1.2 MB at batch 200) stay in the core's cache between their
        copy and their product; each row's call is the same at any thread count.
        """
        _gemm_rows(self.im2col_lanes, x, gT, col, parts, 0, gT.shape[1])
        _sum_in_order(parts, dWT)

    def maxpool_forward(self, x, out, idx, relu=False):
        """``out`` = the maximum of each k x k window of ``x`` (stride k), ``idx`` = its place ``i*k + j``
        in the window.

        Ties: the first in row-major window order wins; a NaN wins over any number (the first NaN does).
        ``relu``: then ``out = max(out, 0)`` (:meth:`relu`): a ReLU before the pool, fused.
        """
        Hp, Wp = out.shape[:2]
        k = x.shape[0] // Hp
        take = self._buffer("pool_take", out.shape, np.bool_)
        nan = self._buffer("pool_nan", out.shape, np.bool_)
        np.copyto(out, x[0:k * Hp:k, 0:k * Wp:k])
        idx[...] = 0
        for i in range(k):
            for j in range(k):
                if i == 0 and j == 0:
                    continue
                v = x[i:k * Hp:k, j:k * Wp:k]
                np.greater(v, out, out=take)
                np.isnan(v, out=nan)
                np.logical_or(take, nan & ~np.isnan(out), out=take)
                np.copyto(out, v, where=take)
                idx[take] = i * k + j
        if relu:
            self.relu(out)

    def maxpool_backward(self, g, idx, pooled, relu, dx):
        """``dx`` = ``g`` at each window's winner, 0 elsewhere (and on rows/columns no window covers).

        ``relu`` (the forward was fused with a ReLU): ``g * sign(pooled)`` at the winner, the ReLU's gradient.
        """
        Hp, Wp = g.shape[:2]
        k = dx.shape[0] // Hp
        mask = self._buffer("pool_mask", g.shape, np.bool_)
        if relu:
            masked = self._buffer("pool_relu_grad", g.shape, g.dtype)
            np.sign(pooled, out=masked)
            np.multiply(g, masked, out=masked)
            g = masked
        dx[...] = 0
        for i in range(k):
            for j in range(k):
                np.equal(idx, i * k + j, out=mask)
                np.copyto(dx[i:k * Hp:k, j:k * Wp:k], g, where=mask)


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
        self._warm_up_conv(f)

    def _warm_up_conv(self, f):
        """The convolutional kernels (mlpcore.nn.conv), on arrays of the types a model passes them."""
        n = 2
        x = np.zeros((n, 16), dtype=f)
        images = np.zeros((16, n), dtype=f)
        self.to_lanes(x, images)
        self.from_lanes(images, x)
        xp = np.zeros((6, 6, 2, n), dtype=f)
        w, b = np.zeros((3, 3, 3, 2), dtype=f), np.zeros(3, dtype=f)
        out = np.zeros((4, 4, 3, n), dtype=f)
        self.conv2d_forward(xp, w, b, out)
        self.conv2d_backward_weight(out, xp, np.zeros((4, 18, n), dtype=f), np.zeros((3, n), dtype=f), w, b)
        # one grey input channel, 5-wide kernel rows: the first conv's own weight-gradient kernel
        g1, w1 = np.zeros((2, 2, 2, n), dtype=f), np.zeros((2, 5, 5, 1), dtype=f)
        self.conv2d_backward_weight(g1, np.zeros((6, 6, 1, n), dtype=f), np.zeros((2, 26, n), dtype=f),
                                    np.zeros((2, n), dtype=f), w1, b[:2])
        self.conv2d_backward_input(out, np.zeros((3, 3, 2, 3), dtype=f), np.zeros((4, 4, 2, n), dtype=f), 1)
        self.conv2d_bias_grad(out, np.zeros((3, n), dtype=f), b)
        self.im2col_lanes(xp, np.zeros((3, 3, 2, 4, 4, n), dtype=f))
        self.channels_first(out, np.zeros((3, 4, 4, n), dtype=f))
        pooled, idx = np.zeros((2, 2, 3, n), dtype=f), np.zeros((2, 2, 3, n), dtype=np.uint8)
        for relu in (False, True):
            self.maxpool_forward(out, pooled, idx, relu)
            self.maxpool_backward(pooled, idx, pooled, relu, out)

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

    # The convolutional kernels take a range of their outermost loop (rows, or work blocks) and run
    # on ``threads`` threads (numba releases the GIL), each on its own share of the outputs; every
    # output is computed by one thread in the same order whatever the count, so it changes no bit.
    threads = 1
    _pool = None

    def set_threads(self, n):
        """Threads the convolutional kernels split their work over (1: the calling thread only)."""
        self.threads = max(1, int(n))

    #: A memory-bound kernel (``light``: pools, transposes, im2col) whose arrays hold fewer values
    #: than this, read and written together, runs on the calling thread: handing shares to the pool
    #: costs more than it saves. Measured at LeNet-5's shapes, batch 200, 2 threads: the second pool
    #: (560,000 values in its backward) 80 -> 175 us and the Flatten 68 -> 155 us when split; the
    #: first pool (1.4 M values) 234 -> 186 us.
    LIGHT_SPLIT_VALUES = 1_000_000

    def _split(self, fn, args, total, align=1, tail=(), light=False):
        """``fn(*args, lo, hi, *tail)`` over shares of ``range(total)`` (bounds multiples of ``align``).

        The last share runs on the calling thread; ``tail`` holds extra arguments for each share,
        as a function of whether the share is the last one. ``light``: see :data:`LIGHT_SPLIT_VALUES`.
        """
        k = min(self.threads, max(1, total // align))
        if light and k > 1 and sum(a.size for a in args if isinstance(a, np.ndarray)) < self.LIGHT_SPLIT_VALUES:
            k = 1
        if k <= 1:
            fn(*args, 0, total, *(tail(True) if tail else ()))
            return
        if self._pool is None or self._pool._max_workers < k - 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=k - 1, thread_name_prefix="mlpcore-kernels")
        bounds = [min(total, (total * i // k + align - 1) // align * align) for i in range(k)] + [total]
        futures = [self._pool.submit(fn, *args, bounds[i], bounds[i + 1], *(tail(False) if tail else ()))
                   for i in range(k - 1)]
        fn(*args, bounds[k - 1], total, *(tail(True) if tail else ()))
        for future in futures:
            future.result()

    def to_lanes(self, X, out):
        self._split(self._fns["to_lanes"], (X, out), out.shape[0], align=16, light=True)

    def from_lanes(self, x, out):
        self._split(self._fns["from_lanes"], (x, out), out.shape[0], align=16, light=True)

    def conv2d_forward(self, x, w, b, out):
        cout, kh, kw, cin = w.shape
        X = x.reshape(x.shape[0], x.shape[1] * cin, x.shape[3])  # image row h: (width * channels, lanes)
        self._split(self._fns["conv2d_forward"], (X, w.reshape(cout, kh, kw * cin), b, out, cin), out.shape[0])

    def conv2d_backward_input(self, g, wt, dx, pad):
        self._split(self._fns["conv2d_backward_input"], (g, wt, dx, pad), dx.shape[0])

    def fold_lanes(self, P, out):
        self._fns["fold_lanes"](P, out)

    def conv2d_backward_weight(self, g, x, P, Pb, dw, db):
        if x.shape[2] == 1 and dw.shape[2] == 5:  # one input channel, 5-wide rows: (channel, row) blocks
            fn, blocks = self._fns["conv2d_backward_weight_row5"], dw.shape[0] * dw.shape[1]
        else:  # (channel pair, tap pair) blocks
            fn, blocks = self._fns["conv2d_backward_weight"], (dw.shape[0] + 1) // 2 * (P.shape[1] // 2)
        self._split(fn, (g, x, P, Pb, dw, db), blocks,
                    tail=lambda last: (last,))  # the calling thread's share also does the bias

    def conv2d_bias_grad(self, g, Pb, db):
        self._fns["conv2d_bias_grad"](g, Pb, db)

    def im2col_lanes(self, x, col):
        self._split(self._fns["im2col_lanes"], (x, col), col.shape[0], light=True)

    def conv2d_weight_grad_gemm(self, x, gT, col, parts, dWT):
        im2col = self._fns["im2col_lanes"]

        def patches(x, col):  # one row's, on the thread that multiplies them
            im2col(x, col, 0, col.shape[0])

        self._split(_gemm_rows, (patches, x, gT, col, parts), gT.shape[1])
        _sum_in_order(parts, dWT)

    def channels_first(self, g, out):
        self._split(self._fns["channels_first"], (g, out), g.shape[0], light=True)

    def maxpool_forward(self, x, out, idx, relu=False):
        self._split(self._fns["maxpool_forward"], (x, out, idx, bool(relu)), out.shape[0], light=True)

    def maxpool_backward(self, g, idx, pooled, relu, dx):
        self._split(self._fns["maxpool_backward"], (g, idx, pooled, bool(relu), dx), dx.shape[0], light=True)


def _gemm_rows(im2col, x, gT, col, parts, lo, hi):
    # Output rows lo..hi-1 of conv2d_weight_grad_gemm: each row's patches, then their product. Every
    # row's patches go to the same slot, col[lo] (this share's own): rebuilt in place, they stay in
    # the core's cache, where a slot a row would stream the whole workspace (6 MB at batch 100)
    # through memory. The same values in the same shapes: the products are the same bits.
    KH, taps, cout = col.shape[1], parts.shape[1], gT.shape[0]
    patches = col[lo]
    for r in range(lo, hi):
        im2col(x[r:r + KH], patches)
        np.dot(patches.reshape(taps, -1), gT[:, r].reshape(cout, -1).T, out=parts[r])


def _sum_in_order(parts, out):
    # out = parts[0] + parts[1] + ..., left to right (whichever thread computed each part)
    np.copyto(out, parts[0])
    for part in parts[1:]:
        out += part


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
