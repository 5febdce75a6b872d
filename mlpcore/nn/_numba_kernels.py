"""The numba side of :mod:`mlpcore.nn.kernels` (imported only when numba kernels are used).

Each kernel mirrors its numpy reference in :class:`mlpcore.nn.kernels.NumpyKernels`
operation for operation, in the arrays' own floating type, so the results are
bitwise the same. Three compiler settings matter:

* ``error_model="numpy"`` drops Python's division-by-zero check, which would
  otherwise keep LLVM from vectorising the loops;
* no ``fastmath``: nothing is reordered or fused into FMAs;
* the convolutions' kernels mark their array arguments ``noalias`` (``conv_jit``),
  so their loops need no run-time overlap checks (the caller's promise: no two of
  their arrays share memory).

The kernels live at module level so numba's on-disk cache (``cache=True``)
can find them again in the next process.
"""

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils
from numba.core.compiler import CompilerBase, DefaultPassBuilder
from numba.extending import intrinsic

jit = numba.njit(cache=True, nogil=True, error_model="numpy")
# The inner blocks of the convolutions (one call per pixel, channel pair and tap group: about
# 24,000 calls a conv2 forward) are inlined into their callers in numba's IR. As separate
# functions each call passed every array as a struct, and those calls cost ~2.5 ms a batch
# whatever its size: half the time of a batch of 100. Inlining changes no operation.
inline = numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")


class _NoAliasCompiler(CompilerBase):
    """numba's nopython pipeline, with every array argument marked ``noalias`` (C's ``restrict``)."""

    def define_pipelines(self):
        self.state.flags.noalias = True
        return [DefaultPassBuilder.define_nopython_pipeline(self.state)]


# The convolutions' kernels promise LLVM that no two of their array arguments share memory (the
# layers hand them separate buffers; tests/test_conv.py checks every call of a LeNet-5 step).
# Without the promise each inner loop over the lanes first checks its output rows against its
# input rows at run time, and a loop whose rows are too many for those checks is not vectorised
# at all. Measured at batch 104 lanes, one thread: conv1 forward 483 -> 404 us, conv2 forward
# 832 -> 708 us; the first conv's weight gradient can then keep a whole output row in registers
# (755 -> 447 us). It changes no operation: the results are bitwise the same.
conv_jit = numba.njit(cache=True, nogil=True, error_model="numpy", pipeline_class=_NoAliasCompiler)


@intrinsic
def prefetch(typingctx, array, index):
    """``prefetch(array_1d, i)``: LLVM's hint to start loading the cache line of ``array_1d[i]``."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        address = cgutils.get_item_pointer(context, builder, array_type, array, [args[1]])
        address = builder.bitcast(address, ir.IntType(8).as_pointer())
        # The intrinsic's name carries the pointer type: opaque (LLVM >= 15) or i8*.
        name = "llvm.prefetch.p0" if str(address.type) == "ptr" else "llvm.prefetch.p0i8"
        i32 = ir.IntType(32)
        hint = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]), name)
        # read, keep in every cache level, data cache
        builder.call(hint, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return numba.types.void(array, index), codegen


@jit
def gather_scaled(x, rows, scale, out):
    # The rows are scattered over the whole training set, so each is a cache
    # and TLB miss: ask for the lines of row i + 2 while row i is converted.
    # A prefetch is only a hint; it changes no value.
    n = rows.shape[0]
    for i in range(n):
        if i + 2 < n:
            ahead = x[rows[i + 2]]
            for offset in range(0, ahead.shape[0], 64):
                prefetch(ahead, offset)
        src, dst = x[rows[i]], out[i]
        for j in range(src.shape[0]):
            dst[j] = src[j] * scale


@jit
def bias_add(Z, b):
    for i in range(Z.shape[0]):
        row = Z[i]
        for j in range(row.shape[0]):
            row[j] += b[j]


@jit
def relu(flat):
    for k in range(flat.shape[0]):
        z = flat[k]
        # np.maximum(z, 0): z unless z < 0 (NaN passes through).
        flat[k] = z if (z >= 0 or z != z) else 0


@jit
def shift_by_row_max(Z):
    # Each row minus its maximum (exact in any order), before numpy's exp.
    for i in range(Z.shape[0]):
        row = Z[i]
        top = row[0]
        for j in range(row.shape[0]):
            top = max(top, row[j])
        for j in range(row.shape[0]):
            row[j] -= top


@jit
def normalise_rows(Z):
    for i in range(Z.shape[0]):
        row = Z[i]
        total = row[0]
        for j in range(1, row.shape[0]):  # left to right, as the reference sums
            total += row[j]
        for j in range(row.shape[0]):
            row[j] /= total


@jit
def softmax_grad(P, y, scale):
    for i in range(P.shape[0]):
        P[i, y[i]] -= 1
    flat = P.reshape(-1)
    for k in range(flat.shape[0]):
        flat[k] *= scale


@jit
def relu_grad(delta, activation):
    for k in range(delta.shape[0]):
        # A multiply, as the reference's, so that a denormal delta is flushed the
        # same way under FTZ/DAZ. (numba's sign(-0.0) is -0.0, numpy's +0.0: the
        # product differs at most in the sign of a zero.)
        delta[k] *= np.sign(activation[k])


@jit
def cross_entropy_sum(P, y, eps):
    total = 0.0
    for i in range(P.shape[0]):
        p = min(max(P[i, y[i]], eps), 1 - eps)
        total -= np.log(p)
    return total


# Each Adam span is a loop over range(size) of a view: with range(lo, hi) numba
# must allow negative indices, and LLVM then leaves the loop unvectorised (4x slower).
@jit
def adam_span(p, g, M, V, with_l2, l2, beta_1, beta_2, eps, c):
    for k in range(p.shape[0]):
        gk = g[k]
        if with_l2:  # loop-invariant: LLVM unswitches it, and both loops vectorise
            gk += p[k] * l2
            g[k] = gk
        m = M[k] * beta_1 + gk
        v = V[k] * beta_2 + gk * gk
        M[k] = m
        V[k] = v
        p[k] += m / (np.sqrt(v) + eps) * c


@jit
def adam(p, g, M, V, weight_ranges, l2, beta_1, beta_2, eps, c):
    # Weights get the L2 term (if l2, as the reference), biases not: one pass over each span, in order.
    done, with_l2 = 0, l2 != 0
    for r in range(weight_ranges.shape[0]):
        lo, hi = weight_ranges[r, 0], weight_ranges[r, 1]
        adam_span(p[done:lo], g[done:lo], M[done:lo], V[done:lo], False, l2, beta_1, beta_2, eps, c)
        adam_span(p[lo:hi], g[lo:hi], M[lo:hi], V[lo:hi], with_l2, l2, beta_1, beta_2, eps, c)
        done = hi
    adam_span(p[done:], g[done:], M[done:], V[done:], False, l2, beta_1, beta_2, eps, c)


FUNCTIONS = {"gather_scaled": gather_scaled, "bias_add": bias_add, "relu": relu,
             "shift_by_row_max": shift_by_row_max, "normalise_rows": normalise_rows,
             "softmax_grad": softmax_grad, "relu_grad": relu_grad, "cross_entropy_sum": cross_entropy_sum,
             "adam": adam}


# -- convolutional networks (mlpcore.nn.conv) ------------------------------------------
# Activations are laid out (height, width, channels, lanes): the batch is the
# innermost axis, so every inner loop below runs over the lanes of one image
# row, contiguous and independent. LLVM vectorises such a loop without
# reordering any sum (no fastmath): each output lane accumulates its terms in
# exactly the order the numpy reference does, so the two agree bit for bit.
# The helpers add up to five products per pass over a pair of output rows,
# reusing each loaded input row for both (two outputs x four or five inputs
# keeps the multipliers busy; one output per pass is load-bound).


# Every helper indexes whole arrays (no views: making a view costs reference counting, which
# adds up in kernels that call helpers tens of thousands of times a batch).


@inline
def _conv_fwd_4x5(out, oh, ow, co, X, xh, r, taps, kh, k, init, b0, b1, b2, b3):
    # out[oh, ow, co..co+3] = (b if init else out) + 5 taps k..k+4 of kernel row kh, left to right
    c0, c1, c2, c3, c4 = (taps[co, kh, k], taps[co, kh, k + 1], taps[co, kh, k + 2], taps[co, kh, k + 3],
                          taps[co, kh, k + 4])
    d0, d1, d2, d3, d4 = (taps[co + 1, kh, k], taps[co + 1, kh, k + 1], taps[co + 1, kh, k + 2],
                          taps[co + 1, kh, k + 3], taps[co + 1, kh, k + 4])
    e0, e1, e2, e3, e4 = (taps[co + 2, kh, k], taps[co + 2, kh, k + 1], taps[co + 2, kh, k + 2],
                          taps[co + 2, kh, k + 3], taps[co + 2, kh, k + 4])
    f0, f1, f2, f3, f4 = (taps[co + 3, kh, k], taps[co + 3, kh, k + 1], taps[co + 3, kh, k + 2],
                          taps[co + 3, kh, k + 3], taps[co + 3, kh, k + 4])
    i = r + k
    if init:
        for n in range(out.shape[3]):
            a0, a1, a2, a3, a4 = X[xh, i, n], X[xh, i + 1, n], X[xh, i + 2, n], X[xh, i + 3, n], X[xh, i + 4, n]
            out[oh, ow, co, n] = b0 + c0 * a0 + c1 * a1 + c2 * a2 + c3 * a3 + c4 * a4
            out[oh, ow, co + 1, n] = b1 + d0 * a0 + d1 * a1 + d2 * a2 + d3 * a3 + d4 * a4
            out[oh, ow, co + 2, n] = b2 + e0 * a0 + e1 * a1 + e2 * a2 + e3 * a3 + e4 * a4
            out[oh, ow, co + 3, n] = b3 + f0 * a0 + f1 * a1 + f2 * a2 + f3 * a3 + f4 * a4
    else:
        for n in range(out.shape[3]):
            a0, a1, a2, a3, a4 = X[xh, i, n], X[xh, i + 1, n], X[xh, i + 2, n], X[xh, i + 3, n], X[xh, i + 4, n]
            out[oh, ow, co, n] = out[oh, ow, co, n] + c0 * a0 + c1 * a1 + c2 * a2 + c3 * a3 + c4 * a4
            out[oh, ow, co + 1, n] = out[oh, ow, co + 1, n] + d0 * a0 + d1 * a1 + d2 * a2 + d3 * a3 + d4 * a4
            out[oh, ow, co + 2, n] = out[oh, ow, co + 2, n] + e0 * a0 + e1 * a1 + e2 * a2 + e3 * a3 + e4 * a4
            out[oh, ow, co + 3, n] = out[oh, ow, co + 3, n] + f0 * a0 + f1 * a1 + f2 * a2 + f3 * a3 + f4 * a4


@inline
def _conv_fwd_2x5(out, oh, ow, co, X, xh, r, taps, kh, k, init, b0, b1):
    # out[oh, ow, co(+1)] = (b if init else out) + 5 taps k..k+4 of kernel row kh, left to right
    c0, c1, c2, c3, c4 = (taps[co, kh, k], taps[co, kh, k + 1], taps[co, kh, k + 2], taps[co, kh, k + 3],
                          taps[co, kh, k + 4])
    d0, d1, d2, d3, d4 = (taps[co + 1, kh, k], taps[co + 1, kh, k + 1], taps[co + 1, kh, k + 2],
                          taps[co + 1, kh, k + 3], taps[co + 1, kh, k + 4])
    i = r + k
    if init:
        for n in range(out.shape[3]):
            a0, a1, a2, a3, a4 = X[xh, i, n], X[xh, i + 1, n], X[xh, i + 2, n], X[xh, i + 3, n], X[xh, i + 4, n]
            out[oh, ow, co, n] = b0 + c0 * a0 + c1 * a1 + c2 * a2 + c3 * a3 + c4 * a4
            out[oh, ow, co + 1, n] = b1 + d0 * a0 + d1 * a1 + d2 * a2 + d3 * a3 + d4 * a4
    else:
        for n in range(out.shape[3]):
            a0, a1, a2, a3, a4 = X[xh, i, n], X[xh, i + 1, n], X[xh, i + 2, n], X[xh, i + 3, n], X[xh, i + 4, n]
            out[oh, ow, co, n] = out[oh, ow, co, n] + c0 * a0 + c1 * a1 + c2 * a2 + c3 * a3 + c4 * a4
            out[oh, ow, co + 1, n] = out[oh, ow, co + 1, n] + d0 * a0 + d1 * a1 + d2 * a2 + d3 * a3 + d4 * a4


@inline
def _conv_fwd_2x1(out, oh, ow, co, X, xh, r, taps, kh, k, init, b0, b1):
    c0, d0 = taps[co, kh, k], taps[co + 1, kh, k]
    i = r + k
    if init:
        for n in range(out.shape[3]):
            a0 = X[xh, i, n]
            out[oh, ow, co, n] = b0 + c0 * a0
            out[oh, ow, co + 1, n] = b1 + d0 * a0
    else:
        for n in range(out.shape[3]):
            a0 = X[xh, i, n]
            out[oh, ow, co, n] = out[oh, ow, co, n] + c0 * a0
            out[oh, ow, co + 1, n] = out[oh, ow, co + 1, n] + d0 * a0


@inline
def _conv_fwd_1x1(out, oh, ow, co, X, xh, r, taps, kh, k, init, b0):
    c0 = taps[co, kh, k]
    i = r + k
    if init:
        for n in range(out.shape[3]):
            out[oh, ow, co, n] = b0 + c0 * X[xh, i, n]
    else:
        for n in range(out.shape[3]):
            out[oh, ow, co, n] = out[oh, ow, co, n] + c0 * X[xh, i, n]


@conv_jit
def conv2d_forward(X, taps, b, out, Cin, lo, hi):
    # out[oh, ow, co] = b[co] + sum over (kh, kw, ci), in that order, of w[co, kh, kw, ci] * x[oh+kh, ow+kw, ci],
    # with X = x as (height, width * Cin, lanes) and taps = w as (Cout, KH, KW * Cin): views the caller
    # makes (a view made in here would hide from LLVM that X is an argument, and so noalias).
    # Four output channels (then pairs) share each loaded input row; taps go five at a time.
    Ho, Wo, Cout, N = out.shape
    KH, T = taps.shape[1], taps.shape[2]
    for oh in range(lo, hi):  # output rows lo..hi-1 (a thread's share; each row's values do not depend on it)
        for ow in range(Wo):
            r = ow * Cin  # taps (kw, ci) of kernel row kh: rows r .. r+T-1 of X[oh + kh]
            for kh in range(KH):
                init = kh == 0
                co = 0
                while co + 4 <= Cout:
                    k = 0
                    while k + 5 <= T:
                        _conv_fwd_4x5(out, oh, ow, co, X, oh + kh, r, taps, kh, k, init and k == 0,
                                      b[co], b[co + 1], b[co + 2], b[co + 3])
                        k += 5
                    while k < T:
                        _conv_fwd_2x1(out, oh, ow, co, X, oh + kh, r, taps, kh, k, init and k == 0, b[co], b[co + 1])
                        _conv_fwd_2x1(out, oh, ow, co + 2, X, oh + kh, r, taps, kh, k, init and k == 0,
                                      b[co + 2], b[co + 3])
                        k += 1
                    co += 4
                while co + 2 <= Cout:
                    k = 0
                    while k + 5 <= T:
                        _conv_fwd_2x5(out, oh, ow, co, X, oh + kh, r, taps, kh, k, init and k == 0, b[co], b[co + 1])
                        k += 5
                    while k < T:
                        _conv_fwd_2x1(out, oh, ow, co, X, oh + kh, r, taps, kh, k, init and k == 0, b[co], b[co + 1])
                        k += 1
                    co += 2
                if co < Cout:
                    for k in range(T):
                        _conv_fwd_1x1(out, oh, ow, co, X, oh + kh, r, taps, kh, k, init and k == 0, b[co])


@inline
def _conv_dx_3x4(dx, ih, iw, ci, g, oh, ow, co, wt, kh, kw, init):
    # dx[ih, iw, ci..ci+2] = (0 if init else dx) + 4 output channels co..co+3, left to right
    c0, c1, c2, c3 = wt[kh, kw, ci, co], wt[kh, kw, ci, co + 1], wt[kh, kw, ci, co + 2], wt[kh, kw, ci, co + 3]
    d0, d1, d2, d3 = (wt[kh, kw, ci + 1, co], wt[kh, kw, ci + 1, co + 1], wt[kh, kw, ci + 1, co + 2],
                      wt[kh, kw, ci + 1, co + 3])
    e0, e1, e2, e3 = (wt[kh, kw, ci + 2, co], wt[kh, kw, ci + 2, co + 1], wt[kh, kw, ci + 2, co + 2],
                      wt[kh, kw, ci + 2, co + 3])
    if init:
        zero = dx.dtype.type(0)
        for n in range(dx.shape[3]):
            a0, a1, a2, a3 = g[oh, ow, co, n], g[oh, ow, co + 1, n], g[oh, ow, co + 2, n], g[oh, ow, co + 3, n]
            dx[ih, iw, ci, n] = zero + c0 * a0 + c1 * a1 + c2 * a2 + c3 * a3
            dx[ih, iw, ci + 1, n] = zero + d0 * a0 + d1 * a1 + d2 * a2 + d3 * a3
            dx[ih, iw, ci + 2, n] = zero + e0 * a0 + e1 * a1 + e2 * a2 + e3 * a3
    else:
        for n in range(dx.shape[3]):
            a0, a1, a2, a3 = g[oh, ow, co, n], g[oh, ow, co + 1, n], g[oh, ow, co + 2, n], g[oh, ow, co + 3, n]
            dx[ih, iw, ci, n] = dx[ih, iw, ci, n] + c0 * a0 + c1 * a1 + c2 * a2 + c3 * a3
            dx[ih, iw, ci + 1, n] = dx[ih, iw, ci + 1, n] + d0 * a0 + d1 * a1 + d2 * a2 + d3 * a3
            dx[ih, iw, ci + 2, n] = dx[ih, iw, ci + 2, n] + e0 * a0 + e1 * a1 + e2 * a2 + e3 * a3


@inline
def _conv_dx_1x1(dx, ih, iw, ci, g, oh, ow, co, wt, kh, kw, init):
    c0 = wt[kh, kw, ci, co]
    if init:
        zero = dx.dtype.type(0)
        for n in range(dx.shape[3]):
            dx[ih, iw, ci, n] = zero + c0 * g[oh, ow, co, n]
    else:
        for n in range(dx.shape[3]):
            dx[ih, iw, ci, n] = dx[ih, iw, ci, n] + c0 * g[oh, ow, co, n]


@conv_jit
def conv2d_backward_input(g, wt, dx, pad, lo, hi):
    # dx[ih, iw, ci] = 0 + sum over valid (kh, kw), in that order, and co of wt[kh, kw, ci, co] * g[oh, ow, co],
    # oh = ih + pad - kh, ow = iw + pad - kw. wt is the weight as (kh, kw, ci, co).
    # Input channels go three at a time against four output channels where the counts allow (LeNet's
    # conv2; each gradient row loaded once for three outputs: 1.2x faster than in pairs), the rest one at a time.
    Ho, Wo, Cout, N = g.shape
    KH, KW, Cin = wt.shape[0], wt.shape[1], wt.shape[2]
    H, W = dx.shape[0], dx.shape[1]
    zero = dx.dtype.type(0)
    for ih in range(lo, hi):  # input rows lo..hi-1
        for iw in range(W):
            first = True
            for kh in range(KH):
                oh = ih + pad - kh
                if oh < 0 or oh >= Ho:
                    continue
                for kw in range(KW):
                    ow = iw + pad - kw
                    if ow < 0 or ow >= Wo:
                        continue
                    ci = 0
                    while ci + 3 <= Cin and Cout % 4 == 0:
                        for co in range(0, Cout, 4):
                            _conv_dx_3x4(dx, ih, iw, ci, g, oh, ow, co, wt, kh, kw, first and co == 0)
                        ci += 3
                    while ci < Cin:  # other shapes: one channel at a time (correct, not tuned)
                        for co in range(Cout):
                            _conv_dx_1x1(dx, ih, iw, ci, g, oh, ow, co, wt, kh, kw, first and co == 0)
                        ci += 1
                    first = False
            if first:  # no output position sees this input pixel
                for ci in range(Cin):
                    for n in range(N):
                        dx[ih, iw, ci, n] = zero


@inline
def _conv_dw_2x2x4(P, c, s, g, oh, ow, cr, X, hs, i, ht, j, Cin, init):
    # Per lane: P[c(+1), s(+1)] += four positions ow..ow+3 of g[oh, ., channel] * x (tap), left to right.
    # Tap s is image row hs, row i of it (at ow); tap s+1 is row ht, j. Channel c+1 is read as cr and tap
    # s+1 as (ht, j), clamped at the last channel/tap by the caller: their P rows are then spare.
    if init:
        zero = P.dtype.type(0)
        for n in range(P.shape[2]):
            a0, a1, a2, a3 = g[oh, ow, c, n], g[oh, ow + 1, c, n], g[oh, ow + 2, c, n], g[oh, ow + 3, c, n]
            b0, b1, b2, b3 = g[oh, ow, cr, n], g[oh, ow + 1, cr, n], g[oh, ow + 2, cr, n], g[oh, ow + 3, cr, n]
            u0, u1, u2, u3 = X[hs, i, n], X[hs, i + Cin, n], X[hs, i + 2 * Cin, n], X[hs, i + 3 * Cin, n]
            v0, v1, v2, v3 = X[ht, j, n], X[ht, j + Cin, n], X[ht, j + 2 * Cin, n], X[ht, j + 3 * Cin, n]
            P[c, s, n] = zero + a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3
            P[c, s + 1, n] = zero + a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3
            P[c + 1, s, n] = zero + b0 * u0 + b1 * u1 + b2 * u2 + b3 * u3
            P[c + 1, s + 1, n] = zero + b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3
    else:
        for n in range(P.shape[2]):
            a0, a1, a2, a3 = g[oh, ow, c, n], g[oh, ow + 1, c, n], g[oh, ow + 2, c, n], g[oh, ow + 3, c, n]
            b0, b1, b2, b3 = g[oh, ow, cr, n], g[oh, ow + 1, cr, n], g[oh, ow + 2, cr, n], g[oh, ow + 3, cr, n]
            u0, u1, u2, u3 = X[hs, i, n], X[hs, i + Cin, n], X[hs, i + 2 * Cin, n], X[hs, i + 3 * Cin, n]
            v0, v1, v2, v3 = X[ht, j, n], X[ht, j + Cin, n], X[ht, j + 2 * Cin, n], X[ht, j + 3 * Cin, n]
            P[c, s, n] = P[c, s, n] + a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3
            P[c, s + 1, n] = P[c, s + 1, n] + a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3
            P[c + 1, s, n] = P[c + 1, s, n] + b0 * u0 + b1 * u1 + b2 * u2 + b3 * u3
            P[c + 1, s + 1, n] = P[c + 1, s + 1, n] + b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3


@inline
def _conv_dw_2x2x2(P, c, s, g, oh, ow, cr, X, hs, i, ht, j, Cin, init):
    # _conv_dw_2x2x4 over two positions ow, ow+1
    if init:
        zero = P.dtype.type(0)
        for n in range(P.shape[2]):
            a0, a1, b0, b1 = g[oh, ow, c, n], g[oh, ow + 1, c, n], g[oh, ow, cr, n], g[oh, ow + 1, cr, n]
            u0, u1, v0, v1 = X[hs, i, n], X[hs, i + Cin, n], X[ht, j, n], X[ht, j + Cin, n]
            P[c, s, n] = zero + a0 * u0 + a1 * u1
            P[c, s + 1, n] = zero + a0 * v0 + a1 * v1
            P[c + 1, s, n] = zero + b0 * u0 + b1 * u1
            P[c + 1, s + 1, n] = zero + b0 * v0 + b1 * v1
    else:
        for n in range(P.shape[2]):
            a0, a1, b0, b1 = g[oh, ow, c, n], g[oh, ow + 1, c, n], g[oh, ow, cr, n], g[oh, ow + 1, cr, n]
            u0, u1, v0, v1 = X[hs, i, n], X[hs, i + Cin, n], X[ht, j, n], X[ht, j + Cin, n]
            P[c, s, n] = P[c, s, n] + a0 * u0 + a1 * u1
            P[c, s + 1, n] = P[c, s + 1, n] + a0 * v0 + a1 * v1
            P[c + 1, s, n] = P[c + 1, s, n] + b0 * u0 + b1 * u1
            P[c + 1, s + 1, n] = P[c + 1, s + 1, n] + b0 * v0 + b1 * v1


@inline
def _conv_dw_2x2x1(P, c, s, g, oh, ow, cr, X, hs, i, ht, j, init):
    if init:
        zero = P.dtype.type(0)
        for n in range(P.shape[2]):
            a0, b0, u0, v0 = g[oh, ow, c, n], g[oh, ow, cr, n], X[hs, i, n], X[ht, j, n]
            P[c, s, n] = zero + a0 * u0
            P[c, s + 1, n] = zero + a0 * v0
            P[c + 1, s, n] = zero + b0 * u0
            P[c + 1, s + 1, n] = zero + b0 * v0
    else:
        for n in range(P.shape[2]):
            a0, b0, u0, v0 = g[oh, ow, c, n], g[oh, ow, cr, n], X[hs, i, n], X[ht, j, n]
            P[c, s, n] = P[c, s, n] + a0 * u0
            P[c, s + 1, n] = P[c, s + 1, n] + a0 * v0
            P[c + 1, s, n] = P[c + 1, s, n] + b0 * u0
            P[c + 1, s + 1, n] = P[c + 1, s + 1, n] + b0 * v0


@inline
def _conv_db_4(Pb, c, g, oh, ow, init):
    if init:
        zero = Pb.dtype.type(0)
        for n in range(Pb.shape[1]):
            Pb[c, n] = zero + g[oh, ow, c, n] + g[oh, ow + 1, c, n] + g[oh, ow + 2, c, n] + g[oh, ow + 3, c, n]
    else:
        for n in range(Pb.shape[1]):
            Pb[c, n] = Pb[c, n] + g[oh, ow, c, n] + g[oh, ow + 1, c, n] + g[oh, ow + 2, c, n] + g[oh, ow + 3, c, n]


@inline
def _conv_db_1(Pb, c, g, oh, ow, init):
    if init:
        zero = Pb.dtype.type(0)
        for n in range(Pb.shape[1]):
            Pb[c, n] = zero + g[oh, ow, c, n]
    else:
        for n in range(Pb.shape[1]):
            Pb[c, n] = Pb[c, n] + g[oh, ow, c, n]


@conv_jit
def fold_lanes(P, out):
    # out[j] = the sum of P[j, :] in a fixed order: halve the lanes while their count is even
    # (P[:, :h] += P[:, h:2h]), then add the remaining ones left to right. P is overwritten.
    J, L = P.shape
    while L % 2 == 0 and L > 1:
        h = L // 2
        for j in range(J):
            for lane in range(h):
                P[j, lane] += P[j, h + lane]
        L = h
    for j in range(J):
        total = P[j, 0]
        for lane in range(1, L):
            total += P[j, lane]
        out[j] = total


@conv_jit
def conv2d_backward_weight(g, x, P, Pb, dw, db, lo, hi, with_bias):
    # Per lane first: P[co, u] = 0 + sum over positions (oh, ow), in order, of g[oh, ow, co] * x[oh+kh, ow+kw, ci]
    # (tap u = (kh * KW + kw) * Cin + ci) and Pb[co] = 0 + sum over positions of g[oh, ow, co]; then the lanes
    # are folded (fold_lanes) into dw (co, kh, kw, ci) and db. P is (Cout', U', lanes), U = KH*KW*Cin, with
    # Cout' and U' rounded up to even: pairs of channels x pairs of taps share their loads, and the spare
    # rows take the odd ones out. Work items lo..hi-1 (a thread's share) are those (channel pair, tap pair)
    # blocks, item = pair * (U' / 2) + tap pair; with_bias: also the bias gradient. Which thread computes a
    # block changes none of its values.
    Ho, Wo, Cout, N = g.shape
    Cin = x.shape[2]
    KH = dw.shape[1]
    T = dw.shape[2] * Cin  # taps of one kernel row
    U = KH * T
    pairs = P.shape[1] // 2
    X = x.reshape(x.shape[0], x.shape[1] * Cin, N)
    if with_bias:
        _bias_partials(g, Pb)
    for oh in range(Ho):
        for item in range(lo, hi):
            c, s = 2 * (item // pairs), 2 * (item % pairs)
            cr, t = min(c + 1, Cout - 1), min(s + 1, U - 1)
            hs, ht = oh + s // T, oh + t // T
            ow = 0
            while ow + 4 <= Wo:
                r = ow * Cin
                _conv_dw_2x2x4(P, c, s, g, oh, ow, cr, X, hs, r + s % T, ht, r + t % T, Cin, oh == 0 and ow == 0)
                ow += 4
            if ow + 2 <= Wo:
                r = ow * Cin
                _conv_dw_2x2x2(P, c, s, g, oh, ow, cr, X, hs, r + s % T, ht, r + t % T, Cin, oh == 0 and ow == 0)
                ow += 2
            while ow < Wo:
                r = ow * Cin
                _conv_dw_2x2x1(P, c, s, g, oh, ow, cr, X, hs, r + s % T, ht, r + t % T, oh == 0 and ow == 0)
                ow += 1
    for item in range(lo, hi):
        c, s = 2 * (item // pairs), 2 * (item % pairs)
        t = min(s + 2, U)
        flat = dw[c].reshape(-1)
        fold_lanes(P[c, s:t], flat[s:t])
        if c + 1 < Cout:
            flat = dw[c + 1].reshape(-1)
            fold_lanes(P[c + 1, s:t], flat[s:t])
    if with_bias:
        fold_lanes(Pb, db)


@inline
def _row5_add4(p0, p1, p2, p3, p4, g, x, oh, h, c, ow, n):
    # The five taps' sums of one grey channel and 5-wide kernel row, plus positions ow..ow+3 of output row
    # oh (image row h), left to right. The taps are neighbouring pixels: 8 loaded for 4 positions x 5 taps.
    a0, a1, a2, a3 = g[oh, ow, c, n], g[oh, ow + 1, c, n], g[oh, ow + 2, c, n], g[oh, ow + 3, c, n]
    x0, x1, x2, x3 = x[h, ow, 0, n], x[h, ow + 1, 0, n], x[h, ow + 2, 0, n], x[h, ow + 3, 0, n]
    x4, x5, x6, x7 = x[h, ow + 4, 0, n], x[h, ow + 5, 0, n], x[h, ow + 6, 0, n], x[h, ow + 7, 0, n]
    return (p0 + a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3, p1 + a0 * x1 + a1 * x2 + a2 * x3 + a3 * x4,
            p2 + a0 * x2 + a1 * x3 + a2 * x4 + a3 * x5, p3 + a0 * x3 + a1 * x4 + a2 * x5 + a3 * x6,
            p4 + a0 * x4 + a1 * x5 + a2 * x6 + a3 * x7)


@inline
def _row5_add(p0, p1, p2, p3, p4, g, x, oh, h, c, ow, n, npos):
    # The sums plus npos (28, 4 or 1: a constant of the caller) positions from ow, left to right.
    if npos == 1:
        a0 = g[oh, ow, c, n]
        return (p0 + a0 * x[h, ow, 0, n], p1 + a0 * x[h, ow + 1, 0, n], p2 + a0 * x[h, ow + 2, 0, n],
                p3 + a0 * x[h, ow + 3, 0, n], p4 + a0 * x[h, ow + 4, 0, n])
    p0, p1, p2, p3, p4 = _row5_add4(p0, p1, p2, p3, p4, g, x, oh, h, c, ow, n)
    if npos == 28:  # written out: a loop here would be the innermost one, and LLVM would not vectorise the lanes
        p0, p1, p2, p3, p4 = _row5_add4(p0, p1, p2, p3, p4, g, x, oh, h, c, ow + 4, n)
        p0, p1, p2, p3, p4 = _row5_add4(p0, p1, p2, p3, p4, g, x, oh, h, c, ow + 8, n)
        p0, p1, p2, p3, p4 = _row5_add4(p0, p1, p2, p3, p4, g, x, oh, h, c, ow + 12, n)
        p0, p1, p2, p3, p4 = _row5_add4(p0, p1, p2, p3, p4, g, x, oh, h, c, ow + 16, n)
        p0, p1, p2, p3, p4 = _row5_add4(p0, p1, p2, p3, p4, g, x, oh, h, c, ow + 20, n)
        p0, p1, p2, p3, p4 = _row5_add4(p0, p1, p2, p3, p4, g, x, oh, h, c, ow + 24, n)
    return p0, p1, p2, p3, p4


@inline
def _conv_dw_row5(P, c, s, g, oh, ow, x, h, npos, init):
    # Per lane, P[c, s..s+4] (the five taps of one kernel row, image row h) = (0 if init else P) + npos
    # positions ow.. of g[oh, ., c] * x. The sums stay in registers over the positions: a run of 28 (a
    # whole row of LeNet's first conv) loads and stores P once instead of seven times.
    if init:
        zero = P.dtype.type(0)
        for n in range(P.shape[2]):
            p0, p1, p2, p3, p4 = _row5_add(zero, zero, zero, zero, zero, g, x, oh, h, c, ow, n, npos)
            P[c, s, n], P[c, s + 1, n], P[c, s + 2, n], P[c, s + 3, n], P[c, s + 4, n] = p0, p1, p2, p3, p4
    else:
        for n in range(P.shape[2]):
            p0, p1, p2, p3, p4 = _row5_add(P[c, s, n], P[c, s + 1, n], P[c, s + 2, n], P[c, s + 3, n],
                                           P[c, s + 4, n], g, x, oh, h, c, ow, n, npos)
            P[c, s, n], P[c, s + 1, n], P[c, s + 2, n], P[c, s + 3, n], P[c, s + 4, n] = p0, p1, p2, p3, p4


@conv_jit
def conv2d_backward_weight_row5(g, x, P, Pb, dw, db, lo, hi, with_bias):
    # conv2d_backward_weight for one input channel and 5-wide kernels (LeNet's first conv), the same sums
    # in the same order: work items lo..hi-1 are (channel, kernel row) blocks, item = channel * KH + kh,
    # each the five taps of that row. A pass loads 8 pixels and 4 gradients for 20 products, where the
    # generic kernel loads 16 for 16.
    Ho, Wo, Cout, N = g.shape
    KH = dw.shape[1]
    if with_bias:
        _bias_partials(g, Pb)
    for oh in range(Ho):
        for item in range(lo, hi):
            c, kh = item // KH, item % KH
            s = 5 * kh
            ow = 0
            while ow + 28 <= Wo:
                _conv_dw_row5(P, c, s, g, oh, ow, x, oh + kh, 28, oh == 0 and ow == 0)
                ow += 28
            while ow + 4 <= Wo:
                _conv_dw_row5(P, c, s, g, oh, ow, x, oh + kh, 4, oh == 0 and ow == 0)
                ow += 4
            while ow < Wo:
                _conv_dw_row5(P, c, s, g, oh, ow, x, oh + kh, 1, oh == 0 and ow == 0)
                ow += 1
    for item in range(lo, hi):
        c, kh = item // KH, item % KH
        flat = dw[c].reshape(-1)
        fold_lanes(P[c, 5 * kh:5 * kh + 5], flat[5 * kh:5 * kh + 5])
    if with_bias:
        fold_lanes(Pb, db)


@inline
def _bias_partials(g, Pb):
    # Pb[co] = 0 + sum over positions (oh, ow), in order, of g[oh, ow, co], per lane.
    Ho, Wo, Cout, N = g.shape
    for c in range(Cout):
        for oh in range(Ho):
            ow = 0
            while ow + 4 <= Wo:
                _conv_db_4(Pb, c, g, oh, ow, oh == 0 and ow == 0)
                ow += 4
            while ow < Wo:
                _conv_db_1(Pb, c, g, oh, ow, oh == 0 and ow == 0)
                ow += 1


@conv_jit
def conv2d_bias_grad(g, Pb, db):
    # The bias gradient alone: Pb[co] = 0 + sum over positions of g[oh, ow, co], per lane, folded into db.
    _bias_partials(g, Pb)
    fold_lanes(Pb, db)


@conv_jit
def im2col_lanes(x, col, lo, hi):
    # col[(kh, kw, ci), oh, ow] = x[oh+kh, ow+kw, ci] (rows of lanes): the patches of a stride-1
    # convolution with col (KH, KW, Cin, Ho, Wo, lanes), for kernel rows lo..hi-1.
    KW, Cin, Ho, Wo, N = col.shape[1], col.shape[2], col.shape[3], col.shape[4], col.shape[5]
    for kh in range(lo, hi):
        for kw in range(KW):
            for ci in range(Cin):
                for oh in range(Ho):
                    for ow in range(Wo):
                        for n in range(N):
                            col[kh, kw, ci, oh, ow, n] = x[oh + kh, ow + kw, ci, n]


@conv_jit
def channels_first(g, out, lo, hi):
    # out[c, oh, ow] = g[oh, ow, c] (rows of lanes), for output rows lo..hi-1.
    Ho, Wo, C, N = g.shape
    for oh in range(lo, hi):
        for ow in range(Wo):
            for c in range(C):
                for n in range(N):
                    out[c, oh, ow, n] = g[oh, ow, c, n]


@inline
def _pick(a, m, q, pos):
    # The window's running winner (m, q) against a new value a at place pos: a wins if greater,
    # or if it is a NaN and the winner is not (so the first NaN wins and NaNs propagate).
    take = a > m or (a != a and m == m)
    return (a if take else m), (pos if take else q)


@conv_jit
def maxpool_forward(x, out, idx, relu, lo, hi):
    # out[ph, pw, c] = the maximum of the k x k window at (k ph, k pw); idx = its place in the window,
    # i * k + j in row-major order. Ties: the first in that order wins; a NaN wins over any number (the first NaN).
    # relu: then max(out, 0) as the relu kernel computes it (NaN passes): relu(max) = max(relu), the same values.
    Hp, Wp, C, N = out.shape
    k = x.shape[0] // Hp
    zero = out.dtype.type(0)
    if k == 2:  # one pass: the four values of each window at once (output rows lo..hi-1)
        for ph in range(lo, hi):
            for pw in range(Wp):
                h, w = 2 * ph, 2 * pw
                for c in range(C):
                    for n in range(N):
                        m, q = x[h, w, c, n], np.uint8(0)
                        m, q = _pick(x[h, w + 1, c, n], m, q, np.uint8(1))
                        m, q = _pick(x[h + 1, w, c, n], m, q, np.uint8(2))
                        m, q = _pick(x[h + 1, w + 1, c, n], m, q, np.uint8(3))
                        if relu:
                            m = m if (m >= 0 or m != m) else zero
                        out[ph, pw, c, n] = m
                        idx[ph, pw, c, n] = q
        return
    for ph in range(lo, hi):
        for pw in range(Wp):
            for c in range(C):
                for n in range(N):
                    out[ph, pw, c, n] = x[k * ph, k * pw, c, n]
                    idx[ph, pw, c, n] = 0
                for i in range(k):
                    for j in range(k):
                        if i == 0 and j == 0:
                            continue
                        pos = np.uint8(i * k + j)
                        for n in range(N):
                            m, q = _pick(x[k * ph + i, k * pw + j, c, n], out[ph, pw, c, n], idx[ph, pw, c, n], pos)
                            out[ph, pw, c, n] = m
                            idx[ph, pw, c, n] = q
                if relu:
                    for n in range(N):
                        m = out[ph, pw, c, n]
                        out[ph, pw, c, n] = m if (m >= 0 or m != m) else zero


@conv_jit
def maxpool_backward(g, idx, pooled, relu, dx, lo, hi):
    # dx at the window's winner = g (relu: g * sign(pooled), the ReLU's gradient there), elsewhere 0
    # (and 0 on rows/columns no window covers).
    Hp, Wp, C, N = g.shape
    H, W = dx.shape[0], dx.shape[1]
    k = H // Hp
    zero = dx.dtype.type(0)
    for h in range(lo, hi):  # input rows lo..hi-1
        for w in range(W):
            ph, pw = h // k, w // k
            if ph >= Hp or pw >= Wp:
                for c in range(C):
                    for n in range(N):
                        dx[h, w, c, n] = zero
                continue
            pos = np.uint8((h - k * ph) * k + (w - k * pw))
            for c in range(C):
                if relu:
                    for n in range(N):
                        v = g[ph, pw, c, n] * np.sign(pooled[ph, pw, c, n])
                        dx[h, w, c, n] = v if idx[ph, pw, c, n] == pos else zero
                else:
                    for n in range(N):
                        dx[h, w, c, n] = g[ph, pw, c, n] if idx[ph, pw, c, n] == pos else zero


@conv_jit
def to_lanes(X, out, lo, hi):
    # out[f, n] = X[n, f] for the n < rows of X, 0 in the lanes after: a transpose in 16 x 16 tiles.
    n_rows, F = X.shape
    L = out.shape[1]
    zero = out.dtype.type(0)
    for f0 in range(lo, hi, 16):  # features lo..hi-1 (lo a multiple of 16)
        f1 = min(f0 + 16, hi)
        for n0 in range(0, n_rows, 16):
            n1 = min(n0 + 16, n_rows)
            for f in range(f0, f1):
                for n in range(n0, n1):
                    out[f, n] = X[n, f]
        for f in range(f0, f1):
            for n in range(n_rows, L):
                out[f, n] = zero


@conv_jit
def from_lanes(x, out, lo, hi):
    # out[n, f] = x[f, n] for the rows of out.
    n_rows, F = out.shape
    for n0 in range(lo, hi, 16):  # rows lo..hi-1 (lo a multiple of 16)
        n1 = min(n0 + 16, hi)
        for f0 in range(0, F, 16):
            f1 = min(f0 + 16, F)
            for n in range(n0, n1):
                for f in range(f0, f1):
                    out[n, f] = x[f, n]


CONV_FUNCTIONS = {"conv2d_forward": conv2d_forward, "conv2d_backward_input": conv2d_backward_input,
                  "conv2d_backward_weight": conv2d_backward_weight,
                  "conv2d_backward_weight_row5": conv2d_backward_weight_row5, "fold_lanes": fold_lanes,
                  "maxpool_forward": maxpool_forward, "maxpool_backward": maxpool_backward,
                  "to_lanes": to_lanes, "from_lanes": from_lanes, "conv2d_bias_grad": conv2d_bias_grad,
                  "im2col_lanes": im2col_lanes, "channels_first": channels_first}
FUNCTIONS.update(CONV_FUNCTIONS)
#: The kernels compiled with noalias arguments (``conv_jit``): no two of their array arguments may share memory.
NOALIAS_KERNELS = tuple(CONV_FUNCTIONS)
