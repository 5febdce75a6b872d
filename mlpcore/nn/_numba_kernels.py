"""The numba side of :mod:`mlpcore.nn.kernels` (imported only when numba kernels are used).

Each kernel mirrors its numpy reference in :class:`mlpcore.nn.kernels.NumpyKernels`
operation for operation, in the arrays' own floating type, so the results are
bitwise the same. Two compiler settings matter:

* ``error_model="numpy"`` drops Python's division-by-zero check, which would
  otherwise keep LLVM from vectorising the loops;
* no ``fastmath``: nothing is reordered or fused into FMAs.

The kernels live at module level so numba's on-disk cache (``cache=True``)
can find them again in the next process.
"""

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic

jit = numba.njit(cache=True, nogil=True, error_model="numpy")


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
