"""LeNet-5 and its layers (mlpcore.nn.conv): shapes, the layer contract, gradients, kernels.

* LeNet-5 has 61,706 parameters, laid out last layer first (each layer's weight
  then bias), decay on the weights only; its FLOPs per sample are counted by hand;
* backward yields growing final prefixes of ``grads`` ending at the whole buffer,
  every layer's block end among them, and no input gradient for the first conv;
* ``Conv2d`` forward against a naive loop and ``scipy.signal.correlate``
  (float64, 1e-12); ``Conv2d``, ``MaxPool2d`` and the whole LeNet-5 against
  central finite differences in float64 (relative error < 1e-6);
* max-pool ties: the first maximum in row-major window order wins and takes the
  whole gradient; a NaN wins (NaNs propagate); rows/columns no window covers get 0;
  the ReLU fused into the pool is ReLU then pool, bitwise, and so is the fused LeNet-5;
* both weight-gradient algorithms of ``Conv2d`` (direct and im2col + GEMM) against
  finite differences; the conv kernels split over threads are bitwise one thread;
* every new numba kernel is bitwise its numpy reference (same operations in the
  same order, elementwise over the batch lanes: true on any CPU), float32 and
  float64, including the odd channel/tap counts that use the kernels' spare rows;
* a 1-epoch LeNet-5 run on 1000 images is bitwise the same with numba and numpy
  kernels (the matrix products are the same numpy calls on the same shapes);
* a float32 step keeps every buffer float32.

Comparisons between results of *different shapes* (a batch against its chunks)
get a tolerance: the dense layers' GEMMs may sum in another order per shape.
"""

import json

import numpy as np
import pytest

from mlpcore.nn.conv import Conv2d, Flatten, MaxPool2d, Unflatten, lenet5_layers
from mlpcore.nn.kernels import NumpyKernels, get_kernels
from mlpcore.nn.layers import LAYERS, Dense, ReLU
from mlpcore.nn.model import PREDICT_CHUNK, build_model
from mlpcore.nn.optim import Adam
from mlpcore.nn.train import train_sequential

KERNELS = ["numpy", "numba"]
DTYPES = [np.float32, np.float64]
GRAD_REL_TOL = 1e-6   # ||numerical - analytic|| / max(||numerical||, ||analytic||), float64
FD_STEP = 1e-6
FWD_TOL = 1e-12       # float64 forward against a naive loop (sums of <= 150 O(1) terms)


def lenet(seed=0, dtype=np.float64, kernels="numpy"):
    return build_model("lenet5", n_features=784, n_classes=10, hidden=(), dtype=dtype,
                       rng=np.random.default_rng(seed), kernels=kernels)


def drive(steps):
    ready = []
    while True:
        try:
            ready.append(next(steps))
        except StopIteration as done:
            return ready, done.value


def bind(layer, seed=0, dtype=np.float64, kernels="numpy", needs_input_grad=True):
    rng = np.random.default_rng(seed)
    layer.build(dtype, get_kernels(kernels))
    layer.needs_input_grad = needs_input_grad
    params = {s.name: rng.uniform(-1, 1, s.shape).astype(dtype) for s in layer.slots()}
    grads = {s.name: np.zeros(s.shape, dtype=dtype) for s in layer.slots()}
    layer.bind(params, grads)
    return rng, params, grads


def rel_error(num, ana):
    return np.linalg.norm(num - ana) / max(np.linalg.norm(num), np.linalg.norm(ana))


def finite_differences(f, a, h=FD_STEP, indices=None):
    flat = a.reshape(-1)
    indices = range(flat.size) if indices is None else indices
    out = []
    for k in indices:
        old = flat[k]
        flat[k] = old + h
        up = f()
        flat[k] = old - h
        down = f()
        flat[k] = old
        out.append((up - down) / (2 * h))
    return np.array(out)


# -- the model: parameters, layout, FLOPs ---------------------------------------------------
def test_lenet5_has_61706_parameters_laid_out_last_layer_first():
    model = lenet()
    assert model.n_params == model.params.size == 61706 and model.name == "lenet5"
    types = [type(layer) for layer in model.layers]
    assert types == [Unflatten, Conv2d, MaxPool2d, Conv2d, MaxPool2d, Flatten, Dense, ReLU, Dense, ReLU, Dense]
    assert model.layers[2].relu and model.layers[4].relu  # conv - ReLU - pool, the ReLU fused into the pool
    expected, offset = [], 0
    shapes = {10: [(84, 10), (10,)], 8: [(120, 84), (84,)], 6: [(400, 120), (120,)],
              3: [(16, 5, 5, 6), (16,)], 1: [(6, 5, 5, 1), (6,)]}
    for index in (10, 8, 6, 3, 1):
        for name, shape in zip(("weight", "bias"), shapes[index]):
            size = int(np.prod(shape))
            expected.append((index, name, shape, name == "weight", offset, offset + size))
            offset += size
    assert [(s.layer, s.name, s.shape, s.decay, s.start, s.stop) for s in model.layout] == expected
    assert offset == 61706
    conv1, conv2 = model.layers[1], model.layers[3]
    assert (conv1.weight_grad, conv2.weight_grad) == ("direct", "gemm")  # the measured choice (Conv2d's doc)
    for layer in (conv1, conv2):
        for flat, W, b in ((model.params, layer.W, layer.b), (model.grads, layer.dW, layer.db)):
            assert np.shares_memory(W, flat) and np.shares_memory(b, flat) and W.flags.c_contiguous
    assert not conv1.needs_input_grad and conv2.needs_input_grad
    # Glorot uniform with Keras' fans for a convolution: fan_in = kh*kw*in, fan_out = kh*kw*out.
    for layer, (fan_in, fan_out) in ((conv1, (25, 150)), (conv2, (150, 400))):
        bound = np.sqrt(6 / (fan_in + fan_out))
        assert np.abs(layer.W).max() <= bound and np.abs(layer.b).max() <= bound
        assert np.abs(layer.W).max() > 0.8 * bound  # drawn with that bound, not a smaller one
    spec = json.loads(json.dumps(model.spec()))
    assert all(layer["type"] in LAYERS for layer in spec["layers"])
    assert spec["layers"][1] == {"type": "Conv2d", "in": 1, "out": 6, "kernel": [5, 5], "padding": 2}
    assert model.decay_ranges() == [(s.start, s.stop) for s in sorted(model.layout, key=lambda s: s.layer)
                                    if s.name == "weight"]


def test_flops_per_sample():
    """Forward + weight gradients + input gradients of every layer but the first; a multiply-add is 2 FLOPs."""
    conv1, conv2 = 2 * 28 * 28 * 6 * 25, 2 * 10 * 10 * 16 * 150
    dense = [2 * 400 * 120, 2 * 120 * 84, 2 * 84 * 10]
    assert lenet().flops_per_sample() == 2 * conv1 + 3 * conv2 + 3 * sum(dense) == 2263920
    mlp = build_model("mlp", n_features=784, n_classes=10, hidden=(128,), dtype=np.float32,
                      rng=np.random.default_rng(0))
    assert mlp.flops_per_sample() == 2 * (2 * 784 * 128) + 3 * (2 * 128 * 10)
    assert mlp.predict_chunk == PREDICT_CHUNK["mlp"] == 8192 and lenet().predict_chunk == PREDICT_CHUNK["lenet5"]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("chunk", [None, 1000])
def test_lenet5_backward_yields_growing_final_prefixes(kernels, chunk):
    model = lenet(seed=1, kernels=kernels)
    rng = np.random.default_rng(2)
    X, y = rng.random((5, 784)), rng.integers(0, 10, 5)
    model.grads[...] = np.nan
    model.forward(X)
    snapshots = []
    steps = model.backward(y, 0.2, chunk=chunk)
    while True:
        try:
            ready = next(steps)
        except StopIteration as done:
            assert done.value is None  # the first conv computes no input gradient
            break
        assert not np.isnan(model.grads[:ready]).any()
        snapshots.append((ready, model.grads[:ready].copy()))
    counts = [r for r, _ in snapshots]
    assert all(a < b for a, b in zip(counts[:-1], counts[1:])) and counts[-1] == 61706
    assert {s.stop for s in model.layout if s.name == "bias"} <= set(counts)
    if chunk is None:
        assert counts == [850, 11014, 59134, 61550, 61706]
    for ready, prefix in snapshots:
        assert prefix.tobytes() == model.grads[:ready].tobytes()


# -- Conv2d --------------------------------------------------------------------------------
def naive_conv(x, w, b, pad):
    """``x`` (H, W, Cin, n), ``w`` (Cout, KH, KW, Cin): loops over every output, float64."""
    H, W, Cin, n = x.shape
    Cout, KH, KW, _ = w.shape
    xp = np.zeros((H + 2 * pad, W + 2 * pad, Cin, n))
    xp[pad:pad + H, pad:pad + W] = x
    Ho, Wo = H + 2 * pad - KH + 1, W + 2 * pad - KW + 1
    out = np.empty((Ho, Wo, Cout, n))
    for oh in range(Ho):
        for ow in range(Wo):
            for co in range(Cout):
                for s in range(n):
                    total = b[co]
                    for kh in range(KH):
                        for kw in range(KW):
                            for ci in range(Cin):
                                total += w[co, kh, kw, ci] * xp[oh + kh, ow + kw, ci, s]
                    out[oh, ow, co, s] = total
    return out


CONV_CASES = [  # (H, W, Cin, Cout, (KH, KW), pad, n)
    (6, 6, 1, 2, (3, 3), 0, 3),
    (7, 5, 3, 5, (3, 2), 1, 2),   # odd channels and taps: the weight-gradient kernel's spare rows
    (8, 8, 1, 6, (5, 5), 2, 2),   # LeNet's first conv, smaller
    (9, 9, 6, 3, (5, 5), 0, 1),
    (9, 7, 1, 3, (5, 5), 1, 3),   # one input channel, 5-wide rows: the first conv's weight-gradient kernel
    (8, 7, 5, 4, (3, 3), 1, 3),   # input channels in a triple and a pair (the input gradient's blocks)
]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("H,W,Cin,Cout,k,pad,n", CONV_CASES)
def test_conv2d_forward_matches_naive_loops_and_scipy(H, W, Cin, Cout, k, pad, n, kernels):
    from scipy.signal import correlate

    layer = Conv2d(Cin, Cout, k, padding=pad)
    rng, params, _ = bind(layer, seed=H + Cin, kernels=kernels)
    x = rng.normal(size=(H, W, Cin, n))
    out = layer(x)
    expected = naive_conv(x, params["weight"], params["bias"], pad)
    assert out.shape == expected.shape == (*layer.out_shape((H, W, Cin)), n)
    np.testing.assert_allclose(out, expected, rtol=FWD_TOL, atol=FWD_TOL)
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0), (0, 0)))
    for co in range(Cout):
        for s in range(n):
            ref = correlate(xp[..., s], params["weight"][co], mode="valid")[..., 0] + params["bias"][co]
            np.testing.assert_allclose(out[:, :, co, s], ref, rtol=FWD_TOL, atol=FWD_TOL)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("weight_grad", ["direct", "gemm"])
@pytest.mark.parametrize("H,W,Cin,Cout,k,pad,n", CONV_CASES[:3])
def test_conv2d_gradient_matches_finite_differences(H, W, Cin, Cout, k, pad, n, kernels, weight_grad):
    """Weight, bias and input gradients of ``sum(G * conv(x))``: rel. error < 1e-6 in float64."""
    layer = Conv2d(Cin, Cout, k, padding=pad, weight_grad=weight_grad)
    rng, params, grads = bind(layer, seed=Cout, kernels=kernels)
    x = rng.normal(size=(H, W, Cin, n))
    G = rng.normal(size=(*layer.out_shape((H, W, Cin)), n))

    def f():
        return float(np.sum(G * layer(x)))

    f()
    ready, grad_x = drive(layer.backward(G.copy()))
    assert ready == [params["weight"].size + Cout]
    for name in ("weight", "bias"):
        assert rel_error(finite_differences(f, params[name]), grads[name].ravel()) < GRAD_REL_TOL, name
    assert rel_error(finite_differences(f, x), grad_x.ravel()) < GRAD_REL_TOL, "input"

    first = Conv2d(Cin, Cout, k, padding=pad)
    bind(first, kernels=kernels, needs_input_grad=False)
    first(x)
    assert drive(first.backward(G.copy()))[1] is None


# -- MaxPool2d -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("size,shape", [(2, (6, 4, 3, 5)), (2, (5, 7, 2, 3)), (3, (7, 6, 2, 2))])
def test_maxpool_forward_backward_and_finite_differences(size, shape, relu, kernels):
    layer = MaxPool2d(size, relu=relu)
    rng, _, _ = bind(layer, kernels=kernels)
    # Distinct values (no ties: a step cannot swap winners), none within a step of 0 (the ReLU's kink).
    x = rng.permutation(np.prod(shape)).reshape(shape) * 0.01 + (-0.2345 if relu else 0.5)
    out = layer(x)
    H, W, C, n = shape
    Hp, Wp = H // size, W // size
    expected = x[:Hp * size, :Wp * size].reshape(Hp, size, Wp, size, C, n).max(axis=(1, 3))
    np.testing.assert_array_equal(out, np.maximum(expected, 0) if relu else expected)
    G = rng.normal(size=out.shape)
    ready, grad_x = drive(layer.backward(G.copy()))
    assert ready == []
    # The gradient goes to each window's winner (if positive, with the ReLU); uncovered rows/columns get 0.
    assert np.count_nonzero(grad_x) == (np.count_nonzero(out) if relu else G.size)
    assert not grad_x[Hp * size:].any() and not grad_x[:, Wp * size:].any()

    def f():
        return float(np.sum(G * layer(x)))

    assert rel_error(finite_differences(f, x), grad_x.ravel()) < GRAD_REL_TOL


@pytest.mark.parametrize("kernels", KERNELS)
def test_maxpool_ties_go_to_the_first_in_row_major_order_and_nan_wins(kernels):
    """Ties: the first maximum in (0,0), (0,1), (1,0), (1,1) order wins and takes the whole gradient;
    a NaN beats any number (the first NaN), so a NaN propagates."""
    layer = MaxPool2d(2)
    bind(layer, kernels=kernels)
    windows = np.array([
        [[1.0, 1.0], [1.0, 1.0]],        # all equal: (0, 0)
        [[0.0, 2.0], [2.0, 2.0]],        # (0, 1)
        [[-1.0, -3.0], [-1.0, -5.0]],    # (0, 0) over (1, 0)
        [[0.0, -0.0], [0.0, 0.0]],       # +0 and -0 compare equal: (0, 0)
        [[1.0, np.nan], [5.0, np.nan]],  # the first NaN: (0, 1)
        [[np.inf, 3.0], [np.nan, np.inf]],  # NaN beats inf: (1, 0)
    ])
    x = np.zeros((2, 2, 1, len(windows)))
    for s, w in enumerate(windows):
        x[:, :, 0, s] = w
    out = layer(x)
    winners = [(0, 0), (0, 1), (0, 0), (0, 0), (0, 1), (1, 0)]
    for s, (i, j) in enumerate(winners):
        assert np.array_equal(out[0, 0, 0, s], windows[s][i, j], equal_nan=True)
    _, grad_x = drive(layer.backward(np.arange(1.0, len(windows) + 1).reshape(1, 1, 1, -1)))
    for s, (i, j) in enumerate(winners):
        expected = np.zeros((2, 2))
        expected[i, j] = s + 1
        np.testing.assert_array_equal(grad_x[:, :, 0, s], expected)


@pytest.mark.parametrize("kernels", KERNELS)
def test_relu_fused_into_the_pool_is_relu_then_pool(kernels):
    """``MaxPool2d(relu=True)`` against ``ReLU`` then ``MaxPool2d``: the same outputs and input gradients
    (bitwise up to the sign of a zero), ties among the zeros a ReLU makes included; and the whole LeNet-5
    fused against unfused: the same probabilities and parameter gradients."""
    rng = np.random.default_rng(7)
    x = np.round(rng.normal(size=(8, 6, 3, 9)), 1)  # negatives (zeroed by the ReLU) and ties
    G = rng.normal(size=(4, 3, 3, 9))
    fused, relu, pool = MaxPool2d(2, relu=True), ReLU(), MaxPool2d(2)
    for layer in (fused, relu, pool):
        bind(layer, kernels=kernels)
    out = fused(x.copy())
    ref = pool(relu(x.copy()))
    assert np.array_equal(out, ref)
    grad = drive(fused.backward(G.copy()))[1]
    expected = drive(relu.backward(drive(pool.backward(G.copy()))[1]))[1]
    assert np.array_equal(grad, expected)

    from mlpcore.nn.model import Sequential

    models = [Sequential(lenet5_layers(fuse_relu=f), dtype=np.float64, rng=np.random.default_rng(1), kernels=kernels)
              for f in (True, False)]
    assert models[0].params.tobytes() == models[1].params.tobytes()
    X, y = rng.random((6, 784)), rng.integers(0, 10, 6)
    probs = [m.forward(X).copy() for m in models]
    assert np.array_equal(*probs)
    for m in models:
        m.gradient(X, y)
    assert np.array_equal(models[0].grads, models[1].grads)


def test_unflatten_and_flatten_are_inverse_transposes():
    for kernels in KERNELS:
        unflatten = Unflatten(4, 3, 2)
        flatten = Flatten(unflatten)
        for layer in (unflatten, flatten):
            layer.build(np.float64, get_kernels(kernels))
        X = np.random.default_rng(0).normal(size=(5, 24))
        images = unflatten(X)
        assert images.shape == (4, 3, 2, 8)  # 5 samples in 8 lanes, the spare ones zero
        np.testing.assert_array_equal(images[1, 2, 0, :5], X[:, (1 * 3 + 2) * 2 + 0])
        assert not images[..., 5:].any()
        images[..., 5:] = 7.0  # what layers in between compute in the spare lanes is dropped
        rows = flatten(images)
        np.testing.assert_array_equal(rows, X)
        back = drive(flatten.backward(rows * 2))[1]
        np.testing.assert_array_equal(back[..., :5], images[..., :5] * 2)
        assert not back[..., 5:].any()  # the spare lanes get no gradient
        np.testing.assert_array_equal(drive(unflatten.backward(back))[1], X * 2)
        # without an Unflatten to ask, every lane is a sample
        assert Flatten().out_shape((4, 3, 2)) == (24,)
        alone = Flatten()
        alone.build(np.float64, get_kernels(kernels))
        assert alone(images).shape == (8, 24)
    with pytest.raises(ValueError, match="lane_multiple"):
        Unflatten(4, 3, 2, lane_multiple=0)


def test_padded_lanes_change_no_sample():
    """A batch in 8 lanes (5 samples) and the same batch unpadded (5 lanes): the same probabilities,
    and the same gradients up to the order the lanes are summed in."""
    from mlpcore.nn.model import Sequential

    rng = np.random.default_rng(2)
    X, y = rng.random((5, 784)), rng.integers(0, 10, 5)
    padded, unpadded = (Sequential(lenet5_layers(), dtype=np.float64, rng=np.random.default_rng(1)) for _ in "ab")
    unpadded.layers[0].lane_multiple = 1
    p_padded, p_unpadded = padded.forward(X).copy(), unpadded.forward(X).copy()
    assert padded.layers[1]._shape[-1] == 8 and unpadded.layers[1]._shape[-1] == 5
    np.testing.assert_array_equal(p_padded, p_unpadded)
    padded.gradient(X, y)
    unpadded.gradient(X, y)
    np.testing.assert_allclose(padded.grads, unpadded.grads, rtol=1e-12, atol=1e-15)


# -- the whole LeNet-5 -----------------------------------------------------------------------
@pytest.mark.parametrize("kernels", KERNELS)
def test_lenet5_gradient_matches_finite_differences(kernels):
    """The mean cross-entropy's gradient, float64, on every bias and a sample of every weight."""
    model = lenet(seed=3, kernels=kernels)
    rng = np.random.default_rng(4)
    X, y = rng.random((3, 784)), rng.integers(0, 10, 3)
    model.gradient(X, y)
    analytic = model.grads.copy()

    def f():
        return model.kernels.cross_entropy_sum(model.forward(X), y) / len(y)

    picks = []
    for s in model.layout:
        size = s.stop - s.start
        picks += list(s.start + rng.choice(size, size=min(size, 12), replace=False))
    numerical = finite_differences(f, model.params, indices=picks)
    assert rel_error(numerical, analytic[picks]) < GRAD_REL_TOL


# -- numba kernels against the numpy reference ------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    return NumpyKernels(), get_kernels("numba")


def both(pair, name, *arrays, skip=()):
    """Run a kernel of each implementation on copies; every array argument must come out bitwise equal
    (but those at ``skip``: workspaces whose spare rows only the numba kernel uses)."""
    outs = []
    for kernels in pair:
        copies = [a.copy() if isinstance(a, np.ndarray) else a for a in arrays]
        getattr(kernels, name)(*copies)
        outs.append(copies)
    for i, (a, b) in enumerate(zip(*outs)):
        if isinstance(a, np.ndarray) and i not in skip:
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), name
    return outs[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,W,Cin,Cout,k,pad,n", CONV_CASES + [
    (14, 14, 6, 16, (5, 5), 0, 13),  # LeNet's second conv
    (6, 34, 1, 3, (5, 5), 2, 9),     # rows of 34 outputs: a run of 28 positions, a block of 4, two single ones
])
def test_conv_kernels_are_bitwise_the_reference(pair, dtype, H, W, Cin, Cout, k, pad, n):
    rng = np.random.default_rng(H * Cout)
    KH, KW = k
    Ho, Wo = H + 2 * pad - KH + 1, W + 2 * pad - KW + 1
    xp = rng.normal(size=(H + 2 * pad, W + 2 * pad, Cin, n)).astype(dtype)
    w = rng.normal(size=(Cout, KH, KW, Cin)).astype(dtype)
    b = rng.normal(size=Cout).astype(dtype)
    both(pair, "conv2d_forward", xp, w, b, np.empty((Ho, Wo, Cout, n), dtype))
    g = rng.normal(size=(Ho, Wo, Cout, n)).astype(dtype)
    U = KH * KW * Cin
    P = np.empty((Cout + Cout % 2, U + U % 2, n), dtype)
    both(pair, "conv2d_backward_weight", g, xp, P, np.empty((Cout, n), dtype), np.empty_like(w), np.empty_like(b),
         skip=(2,))
    wt = np.ascontiguousarray(w.transpose(1, 2, 3, 0))
    both(pair, "conv2d_backward_input", g, wt, np.empty((H, W, Cin, n), dtype), pad)
    both(pair, "conv2d_bias_grad", g, np.empty((Cout, n), dtype), np.empty_like(b))
    both(pair, "im2col_lanes", xp, np.empty((KH, KW, Cin, Ho, Wo, n), dtype))
    gT = np.ascontiguousarray(g.transpose(2, 0, 1, 3))
    dWT = both(pair, "conv2d_weight_grad_gemm", xp, gT, np.empty((Ho, KH, KW, Cin, 1, Wo, n), dtype),
               np.empty((Ho, U, Cout), dtype), np.empty((U, Cout), dtype))[4]
    # the same weight gradient as the direct kernel, up to the order of the sums
    direct = np.empty_like(w)
    pair[0].conv2d_backward_weight(g, xp, np.empty((Cout + Cout % 2, U + U % 2, n), dtype), np.empty((Cout, n), dtype),
                                   direct, np.empty_like(b))
    np.testing.assert_allclose(dWT.T.reshape(w.shape), direct, rtol=1e-4 if dtype == np.float32 else 1e-10,
                               atol=1e-4 if dtype == np.float32 else 1e-10)
    both(pair, "channels_first", g, np.empty((Cout, Ho, Wo, n), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lanes", [1, 7, 64, 200, 12])
def test_fold_lanes_and_transposes_are_bitwise_the_reference(pair, dtype, lanes):
    rng = np.random.default_rng(lanes)
    P = (rng.normal(size=(9, lanes)) * 10.0 ** rng.integers(-4, 4, (9, lanes))).astype(dtype)
    both(pair, "fold_lanes", P, np.empty(9, dtype))
    X = rng.normal(size=(lanes, 37)).astype(dtype)
    both(pair, "to_lanes", X, np.empty((37, lanes), dtype))
    both(pair, "from_lanes", X.T.copy(), np.empty((lanes, 37), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size,shape", [(2, (28, 28, 6, 9)), (2, (5, 5, 2, 3)), (3, (7, 6, 2, 4))])
def test_maxpool_kernels_are_bitwise_the_reference(pair, dtype, size, shape):
    rng = np.random.default_rng(size)
    x = np.round(rng.normal(size=shape), 1).astype(dtype)  # many ties
    x.reshape(-1)[rng.choice(x.size, 12, replace=False)] = [np.nan, np.inf, -np.inf, -0.0] * 3
    H, W, C, n = shape
    out_shape = (H // size, W // size, C, n)
    for relu in (False, True):
        out, idx = both(pair, "maxpool_forward", x, np.empty(out_shape, dtype), np.empty(out_shape, np.uint8),
                        relu)[1:3]
        g = rng.normal(size=out_shape).astype(dtype)
        both(pair, "maxpool_backward", g, idx, out, relu, np.empty(shape, dtype))


def test_lenet5_trains_bitwise_the_same_with_numba_and_numpy_kernels():
    """1 epoch on 1000 images at batch 200 (5 steps): the same weights, bit for bit."""
    from mlpcore.data import load_mnist

    data = load_mnist(train_limit=1000, test_limit=10)
    runs = {k: train_sequential(data.x_train, data.y_train, model="lenet5", hidden=(), epochs=1, batch_size=200,
                                seed=5, kernels=k)
            for k in KERNELS}
    (m1, losses1, _), (m2, losses2, _) = runs["numpy"], runs["numba"]
    assert m1.params.tobytes() == m2.params.tobytes()
    assert losses1 == pytest.approx(losses2, rel=1e-6)  # the loss is a reported number only
    assert np.isfinite(m1.params).all() and losses1[0] < 2.31


# -- float32 throughout, prediction in chunks ---------------------------------------------------
def float_arrays(obj, seen=None):
    """Every floating ndarray reachable from ``obj``'s attributes (dicts, lists, tuples followed)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj] if obj.dtype.kind == "f" else []
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif type(obj).__module__.startswith("mlpcore"):  # the model, its layers, the optimizer, the kernels
        items = vars(obj).values()
    else:
        return []
    return [a for item in items for a in float_arrays(item, seen)]


@pytest.mark.parametrize("kernels", KERNELS)
def test_a_float32_step_keeps_every_buffer_float32(kernels, monkeypatch):
    from mlpcore.nn import kernels as kernels_module

    # A fresh numpy-kernels instance: the shared one holds other tests' float64 work buffers.
    monkeypatch.setitem(kernels_module._CACHE, "numpy", NumpyKernels())
    model = lenet(dtype=np.float32, kernels=kernels)
    optimizer = Adam(model, alpha=1e-4)
    rng = np.random.default_rng(0)
    X, y = rng.random((20, 784)).astype(np.float32), rng.integers(0, 10, 20)
    model.gradient(X, y)
    optimizer.step(20)
    model.predict_proba(X[:7])
    arrays = float_arrays(model) + float_arrays(optimizer) + float_arrays(model.kernels)
    assert len(arrays) > 40
    assert {a.dtype for a in arrays} == {np.dtype(np.float32)}


@pytest.mark.parametrize("kernels", KERNELS)
def test_predict_proba_in_chunks(kernels):
    model = lenet(dtype=np.float32, kernels=kernels)
    X = np.random.default_rng(0).random((1100, 784)).astype(np.float32)
    whole = model.predict_proba(X)  # chunks of 512: 512, 512, 76
    assert whole.shape == (1100, 10) and whole.dtype == np.float32
    small = model.predict_proba(X, chunk=300)
    np.testing.assert_allclose(small, whole, rtol=1e-5, atol=1e-7)  # other shapes: the dense GEMMs may differ
    assert model.predict_proba(X[:0]).shape == (0, 10)
    # Workspaces stay small: every buffer the layers hold (forward only: backward buffers are made by
    # the first backward of a batch size), for the four batch sizes above together, under 64 MB.
    held = sum(a.nbytes for a in float_arrays(model.layers, seen={id(model.kernels)}))  # without the shared kernels
    assert held < 64e6, held


def test_lenet5_layers_and_build_model_errors():
    from mlpcore.errors import UsageError

    assert len(lenet5_layers()) == 11 and len(lenet5_layers(fuse_relu=False)) == 13
    with pytest.raises(UsageError):
        build_model("lenet5", n_features=783, n_classes=10, hidden=(), dtype=np.float32, rng=np.random.default_rng(0))
    with pytest.raises(UsageError):
        build_model("lenet5", n_features=64, n_classes=10, hidden=(), dtype=np.float32, rng=np.random.default_rng(0))


def test_conv_kernels_are_never_handed_overlapping_arrays(monkeypatch):
    """The conv kernels are compiled with their array arguments marked noalias: a training step and a
    prediction of LeNet-5 (numba kernels, 2 threads) must never pass one of them two arrays that share
    memory. A kernel that did would compute garbage, silently."""
    from mlpcore.nn import _numba_kernels

    model = lenet(dtype=np.float32, kernels="numba")
    kernels = model.kernels
    calls = []

    def checked(name, fn):
        def call(*args):
            arrays = [a for a in args if isinstance(a, np.ndarray)]
            for i, a in enumerate(arrays):
                for b in arrays[i + 1:]:
                    assert not np.shares_memory(a, b), f"{name}: two arguments share memory"
            calls.append(name)
            return fn(*args)
        return call

    fns = dict(kernels._fns)
    for name in _numba_kernels.NOALIAS_KERNELS:
        fns[name] = checked(name, fns[name])
    monkeypatch.setattr(kernels, "_fns", fns)
    monkeypatch.setattr(kernels, "threads", 2)
    rng = np.random.default_rng(0)
    X, y = rng.random((37, 784)).astype(np.float32), rng.integers(0, 10, 37)
    model.gradient(X, y)
    model.predict(X)
    # Every noalias kernel, but the generic weight gradient (LeNet's shapes take the other two) and
    # fold_lanes (called inside the weight-gradient kernels, on a workspace and dw).
    assert set(calls) == set(_numba_kernels.NOALIAS_KERNELS) - {"conv2d_backward_weight", "fold_lanes"}


@pytest.mark.parametrize("threads", [2, 3])
def test_numba_kernels_on_threads_are_bitwise_one_thread(pair, threads):
    """Each thread computes its own share of the outputs (rows, or weight blocks), each in the same order."""
    numba_kernels = pair[1]
    rng = np.random.default_rng(threads)
    xp = rng.normal(size=(18, 18, 6, 11)).astype(np.float32)
    w, b = rng.normal(size=(5, 5, 5, 6)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    g = rng.normal(size=(14, 14, 5, 11)).astype(np.float32)
    wt = np.ascontiguousarray(w.transpose(1, 2, 3, 0))
    X = rng.normal(size=(37, 50)).astype(np.float32)
    calls = [("conv2d_forward", (xp, w, b, np.empty((14, 14, 5, 11), np.float32))),
             ("conv2d_backward_weight", (g, xp, np.empty((6, 150, 11), np.float32), np.empty((5, 11), np.float32),
                                         np.empty_like(w), np.empty_like(b))),
             ("conv2d_backward_input", (g, wt, np.empty((16, 16, 6, 11), np.float32), 1)),
             ("maxpool_forward", (xp, np.empty((9, 9, 6, 11), np.float32), np.empty((9, 9, 6, 11), np.uint8), True)),
             ("maxpool_backward", (xp[::2, ::2].copy(), rng.integers(0, 4, (9, 9, 6, 11)).astype(np.uint8),
                                   xp[1::2, 1::2].copy(), True, np.empty((18, 18, 6, 11), np.float32))),
             ("im2col_lanes", (xp, np.empty((5, 5, 6, 14, 14, 11), np.float32))),
             ("channels_first", (g, np.empty((5, 14, 14, 11), np.float32))),
             ("to_lanes", (X, np.empty((50, 37), np.float32))),
             ("from_lanes", (X.T.copy(), np.empty((37, 50), np.float32)))]
    x1 = rng.normal(size=(17, 18, 1, 11)).astype(np.float32)  # one channel, 5-wide rows (LeNet's first conv)
    g1 = rng.normal(size=(13, 14, 6, 11)).astype(np.float32)
    calls.append(("conv2d_backward_weight", (g1, x1, np.empty((6, 26, 11), np.float32), np.empty((6, 11), np.float32),
                                             np.empty((6, 5, 5, 1), np.float32), np.empty(6, np.float32))))
    gT = np.ascontiguousarray(g.transpose(2, 0, 1, 3))
    calls.append(("conv2d_weight_grad_gemm", (xp, gT, np.empty((14, 5, 5, 6, 1, 14, 11), np.float32),
                                              np.empty((14, 150, 5), np.float32), np.empty((150, 5), np.float32))))
    numba_kernels.LIGHT_SPLIT_VALUES = 0  # split even these small arrays
    try:
        for name, args in calls:
            results = []
            for t in (1, threads):
                numba_kernels.set_threads(t)
                copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
                getattr(numba_kernels, name)(*copies)
                results.append(copies)
            # workspaces: the direct weight gradient's spare rows; the patches' slot of each thread
            skip = 2 if name in ("conv2d_backward_weight", "conv2d_weight_grad_gemm") else -1
            for i, (a, c) in enumerate(zip(*results)):
                if isinstance(a, np.ndarray) and i != skip:
                    assert np.array_equal(a, c, equal_nan=True), name
    finally:
        numba_kernels.set_threads(1)
        del numba_kernels.LIGHT_SPLIT_VALUES
