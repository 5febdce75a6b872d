"""mlpcore.nn.kernels: the numba kernels are bitwise the numpy reference; denormals are flushed.

* every kernel on random inputs with edge values (zeros, -0.0, negatives, NaN,
  inf), float32 and float64: ``np.array_equal`` with the numpy reference
  (``equal_nan``; so equal up to the sign of a zero and NaN payloads); the
  loss, reported only, to 1e-6;
* a whole training run with each implementation: the same weights, bit for bit;
* without numba, ``auto`` falls back to numpy and ``numba`` is a clear error;
* :mod:`mlpcore.nn.fpenv`: inside ``flush_denormals`` a denormal result is zero,
  outside (and after) it is not; and the float32 Adam + L2 run that makes
  denormals without it makes none with it.

Every bitwise comparison here is true by construction on any BLAS: the two
implementations run on copies of the same arrays, elementwise, and the matrix
products of a training run are the same numpy calls on the same shapes
whichever kernels do the elementwise work.
"""

import subprocess
import sys

import numpy as np
import pytest

from mlpcore.nn import fpenv
from mlpcore.nn.kernels import NumpyKernels, get_kernels
from mlpcore.nn.model import build_model
from mlpcore.nn.optim import Adam
from mlpcore.nn.train import train_sequential

DTYPES = [np.float32, np.float64]
TINY32 = np.finfo(np.float32).tiny  # the smallest normal float32, ~1.2e-38


@pytest.fixture(scope="module")
def mnist():
    from mlpcore.data import load_mnist

    return load_mnist(train_limit=3000, test_limit=10)


def small_mlp(kernels, dtype=np.float32):
    """The 4-3-2 MLP (the old ``MLP((4, 3, 2))``, float32 by default as it was)."""
    return build_model("mlp", n_features=4, n_classes=2, hidden=(3,), dtype=dtype, rng=np.random.default_rng(0),
                       kernels=kernels)


@pytest.fixture(scope="module")
def pair():
    return NumpyKernels(), get_kernels("numba")


def with_edges(a, rng):
    """``a`` with a few zeros, -0.0, negatives, a NaN and an inf sprinkled in."""
    flat = a.reshape(-1)
    idx = rng.choice(flat.size, size=min(flat.size, 12), replace=False)
    flat[idx] = np.array([0.0, -0.0, -1.5, 2.5, np.nan, np.inf, 0.0, -3.0, 1e-3, 0.0, 7.0, -0.0])[:len(idx)]
    return a


def both(fn_name, pair, *arrays, **kwargs):
    """Run a kernel of each implementation on its own copies; return both sets of arrays."""
    outs = []
    for kernels in pair:
        copies = [a.copy() if isinstance(a, np.ndarray) else a for a in arrays]
        result = getattr(kernels, fn_name)(*copies, **kwargs)
        outs.append((copies, result))
    return outs


def assert_bitwise(outs):
    (a, _), (b, _) = outs
    for x, y in zip(a, b):
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype
            assert np.array_equal(x, y, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_scaled(pair, dtype):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 17), dtype=np.uint8)
    rows = rng.integers(0, 50, 23)
    outs = both("gather_scaled", pair, x, rows, np.empty((23, 17), dtype))
    assert_bitwise(outs)
    np.testing.assert_array_equal(outs[0][0][2], (x[rows] * dtype(1 / 255)).astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_add_relu_and_relu_grad(pair, dtype):
    rng = np.random.default_rng(1)
    Z = with_edges(rng.normal(size=(9, 13)).astype(dtype), rng)
    b = with_edges(rng.normal(size=13).astype(dtype), rng)  # the bias with edges too: inf - inf, -0 + -0
    added = both("bias_add", pair, Z, b)
    assert_bitwise(added)
    assert_bitwise(both("relu", pair, Z))
    assert_bitwise(both("relu", pair, added[0][0][0]))  # as a Dense then a ReLU run
    # relu is max(z, 0) with NaN passed through.
    relu = both("relu", pair, Z)[0][0][0]
    np.testing.assert_array_equal(relu, np.where(np.isnan(Z) | (Z > 0), Z, 0))
    activation = np.abs(with_edges(rng.normal(size=(9, 13)).astype(dtype), rng))  # >= 0 or NaN, as after ReLU
    activation.reshape(-1)[:3] = [-0.0, -2.0, np.nan]  # and a few the reference's sign() also covers
    delta = with_edges(rng.normal(size=(9, 13)).astype(dtype), rng)
    assert_bitwise(both("relu_grad", pair, delta, activation))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_and_its_gradient(pair, dtype):
    rng = np.random.default_rng(2)
    Z = (rng.normal(size=(31, 10)) * 20).astype(dtype)
    b = rng.normal(size=10).astype(dtype)
    # Finite rows that stress the max shift: ties, +-0, logits far apart (exact 0 probabilities), huge ones.
    Z[0] = 5
    Z[1, :] = [-0.0, 0.0] * 5
    Z[2, :5], Z[2, 5:] = -1e4, 1e4
    Z[3] = np.finfo(dtype).max / 4 * np.sign(rng.normal(size=10))
    Z[4] = -np.finfo(dtype).max / 4
    Z[5, 3] = np.finfo(dtype).tiny / 8  # a denormal logit
    outs = both("bias_add", pair, Z, b)
    assert_bitwise(outs)
    outs = both("softmax", pair, outs[0][0][0])
    assert_bitwise(outs)
    P = outs[0][0][0]
    np.testing.assert_allclose(P.sum(axis=1), 1, rtol=10 * np.finfo(dtype).eps)
    y = rng.integers(0, 10, 31)
    assert_bitwise(both("softmax_grad", pair, P, y, 1 / 31))
    losses = [result for _, result in both("cross_entropy_sum", pair, P, y)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, on purpose
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_on_non_finite_logits(pair, dtype):
    """NaN, +inf and -inf logits (a diverged run): both implementations give the same NaN/0 pattern."""
    rng = np.random.default_rng(5)
    Z = (rng.normal(size=(12, 7)) * 10).astype(dtype)
    Z[0, 0], Z[1, 4] = np.nan, np.nan  # first in the row, and later (the max shift meets it late)
    Z[2, 0], Z[3, 6] = np.inf, np.inf
    Z[4, 2], Z[5, :] = -np.inf, -np.inf
    Z[6, :3] = [np.inf, -np.inf, np.nan]
    Z[7] = with_edges(Z[7].copy(), rng)
    outs = both("softmax", pair, Z)
    assert_bitwise(outs)
    P = outs[0][0][0]
    assert np.isnan(P[[0, 1, 2, 3, 5, 6]]).all()  # a NaN or +inf, or no finite logit, poisons its row
    assert P[4, 2] == 0 and np.isfinite(P[4]).all()  # a -inf logit is a zero probability
    np.testing.assert_allclose(P[8:].sum(axis=1), 1, rtol=10 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam(pair, dtype):
    rng = np.random.default_rng(3)
    n = 1000
    p, g, M = (rng.normal(size=n).astype(dtype) * s for s in (0.05, 1e-3, 1e-3))
    V = np.abs(rng.normal(size=n)).astype(dtype) * dtype(1e-6)
    ranges = np.array([[0, 300], [310, 700], [705, 1000]], dtype=np.int64)
    f = np.dtype(dtype).type
    for l2 in (f(5e-7), f(0)):
        outs = both("adam", pair, p, g, M, V, ranges, l2, f(0.9), f(0.999), f(3e-7), f(-1e-3))
        assert_bitwise(outs)
        assert not np.array_equal(outs[0][0][0], p)  # it did update


def test_a_training_run_is_bitwise_the_same_with_either_kernels(mnist):
    runs = {}
    for kernels in ("numpy", "numba"):
        model, losses, _ = train_sequential(mnist.x_train, mnist.y_train, hidden=(32, 16), epochs=2,
                                            batch_size=100, seed=5, kernels=kernels)
        assert model.kernels.name == kernels
        runs[kernels] = (model.params.copy(), losses)
    assert np.array_equal(runs["numpy"][0], runs["numba"][0])
    np.testing.assert_allclose(runs["numpy"][1], runs["numba"][1], rtol=1e-6)


def test_without_numba_auto_falls_back_and_numba_is_a_clear_error():
    code = (
        "import sys; sys.modules['numba'] = None\n"  # makes `import numba` raise ImportError
        "from mlpcore.nn.kernels import get_kernels, describe\n"
        "from mlpcore.errors import UsageError\n"
        "print(describe(get_kernels('auto')))\n"
        "try:\n    get_kernels('numba')\nexcept UsageError as e:\n    print('error:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "numpy"
    assert lines[1].startswith("error: --kernels numba: numba is not installed")
    assert "--kernels numpy" in lines[1]


def test_unknown_kernels_name():
    from mlpcore.errors import UsageError

    with pytest.raises(UsageError, match="unknown kernels"):
        get_kernels("fortran")


# -- denormals -----------------------------------------------------------------------------
needs_fpenv = pytest.mark.skipif(fpenv.status().startswith("not flushed"), reason=fpenv.status())


@needs_fpenv
def test_flush_denormals_is_scoped_to_the_block():
    half_tiny = np.array([TINY32], dtype=np.float32) * np.float32(0.5)  # a denormal, outside the block
    assert 0 < half_tiny[0] < TINY32
    with fpenv.flush_denormals():
        inside = np.array([TINY32], dtype=np.float32) * np.float32(0.5)
        assert inside[0] == 0  # result flushed (FTZ)
        assert (half_tiny * np.float32(4))[0] == 0  # denormal input read as zero (DAZ; x86)
    after = np.array([TINY32], dtype=np.float32) * np.float32(0.5)
    assert after[0] == half_tiny[0]  # restored
    with fpenv.flush_denormals(enabled=False):
        assert (np.array([TINY32], dtype=np.float32) * np.float32(0.5))[0] == half_tiny[0]


@needs_fpenv
@pytest.mark.parametrize("kernels", ["numpy", "numba"])
def test_adam_with_l2_on_dead_inputs_makes_denormals_unless_flushed(kernels):
    """The mechanism seen on MNIST: weights with no data gradient shrink under L2 into denormals.

    MNIST's border pixels are always 0, so their weights get only the L2
    gradient; Adam shrinks them by a few per cent a step. Without flushing,
    after ~2,000 steps float32 weights and moments are denormal (the slow path
    on x86); with flushing there are none.
    """
    from mlpcore.nn.train import LocalSync, fit

    counts = {}
    for flush in (False, True):
        model = small_mlp(kernels)
        optimizer = Adam(model, alpha=1e-2)
        x = np.zeros((50, 4), dtype=np.uint8)  # dead inputs: no data gradient reaches the first layer
        y = np.arange(50) % 2
        fit(model, optimizer, x, y, epochs=60, sync=LocalSync(50, 1, np.random.default_rng(0)), flush=flush)
        state = np.concatenate([model.params, optimizer.M])
        counts[flush] = int(np.sum((state != 0) & (np.abs(state) < TINY32)))
    assert counts[False] > 0, "the scenario no longer produces denormals; the test proves nothing"
    assert counts[True] == 0


@needs_fpenv
def test_kernels_agree_on_denormal_inputs_while_flushing(pair):
    """Under FTZ/DAZ (as in training) a denormal input becomes zero in both implementations alike.

    (BLAS worker threads do not flush, so a gradient can arrive denormal.)
    """
    rng = np.random.default_rng(4)
    delta = (rng.normal(size=(6, 7)) * TINY32).astype(np.float32)  # mostly denormal
    activation = np.abs(rng.normal(size=(6, 7))).astype(np.float32)
    activation[0, :3] = [0.0, np.nan, 2.0]
    Z = rng.normal(size=(6, 7)).astype(np.float32)
    Z[1, :4] = TINY32 / 4
    b = np.zeros(7, dtype=np.float32)
    p, g, M, V = (rng.normal(size=50).astype(np.float32) * np.float32(TINY32) for _ in range(4))
    f = np.float32
    with fpenv.flush_denormals():
        assert_bitwise(both("relu_grad", pair, delta, activation))
        assert_bitwise(both("bias_add", pair, Z, b))
        assert_bitwise(both("relu", pair, Z))
        assert_bitwise(both("softmax", pair, Z))
        assert_bitwise(both("softmax_grad", pair, delta, np.arange(6) % 7, 0.5))
        assert_bitwise(both("adam", pair, p, g, M, np.abs(V), np.array([[0, 30]], dtype=np.int64),
                            f(1e-4), f(0.9), f(0.999), f(1e-8), f(-1e-3)))
