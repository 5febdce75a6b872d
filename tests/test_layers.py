"""The layer contract of mlpcore.nn (layers.py) and how Sequential (model.py) keeps it.

* layout: the flat buffers hold the layers last layer first, each Dense's
  weight then its bias, with no gap and no overlap; the layers' arrays are
  views into them;
* backward is a generator of strictly increasing counts of *final* leading
  gradient values, ending at ``params.size`` (with ``chunk``: also inside a
  big layer);
* the L2 decay ranges are exactly the weights (not the biases), and Adam and
  ``l2_penalty`` use nothing else;
* Dense and ReLU against central finite differences in float64 (the whole
  Sequential is checked the same way in test_model.py).

Comparisons are bitwise only where they are true by construction (the same
run, or a buffer against itself); results of differently shaped matrix
products get a tolerance (see ``GEMM_RTOL``).
"""

import json

import numpy as np
import pytest

from mlpcore.errors import UsageError
from mlpcore.nn.kernels import get_kernels
from mlpcore.nn.layers import LAYERS, Dense, Layer, ReLU
from mlpcore.nn.model import Sequential, build_model, mlp_layers
from mlpcore.nn.optim import Adam

KERNELS = ["numpy", "numba"]
GRAD_REL_TOL = 1e-6   # ||numerical - analytic|| / max(||numerical||, ||analytic||), float64
FD_STEP = 1e-6        # central-difference step
# float64 results of the same products computed in differently shaped BLAS calls
# (a weight gradient in blocks of rows vs at once): every correct BLAS may sum in
# another order or use FMA, so they agree to a few ulps of the terms, not bitwise.
# The terms here are O(1) and the sums have <= 13 of them: |diff| << 1e-13.
GEMM_RTOL, GEMM_ATOL = 1e-12, 1e-13


def mlp(sizes, seed=0, dtype=np.float64, kernels="auto"):
    rng = np.random.default_rng(seed)
    return build_model("mlp", n_features=sizes[0], n_classes=sizes[-1], hidden=sizes[1:-1], dtype=dtype, rng=rng,
                       kernels=kernels), rng


def dense_indices(model):
    return [i for i, layer in enumerate(model.layers) if isinstance(layer, Dense)]


def drive(steps):
    """Run a backward generator to its end: ``(yielded counts, returned value)``."""
    ready = []
    while True:
        try:
            ready.append(next(steps))
        except StopIteration as done:
            return ready, done.value


# -- (a) the layout -----------------------------------------------------------------------
def test_mlp_is_dense_relu_alternating():
    layers = mlp_layers(7, (5, 4), 3)
    assert [type(layer) for layer in layers] == [Dense, ReLU, Dense, ReLU, Dense]
    assert [(layer.fan_in, layer.fan_out) for layer in layers[::2]] == [(7, 5), (5, 4), (4, 3)]
    model, _ = mlp((7, 5, 4, 3))
    assert dense_indices(model) == [0, 2, 4] and model.name == "mlp"


def test_flat_buffers_are_last_layer_first_and_views_alias():
    sizes = (7, 5, 4, 3)
    model, _ = mlp(sizes, seed=3)
    n_layers = len(sizes) - 1
    counts = [sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(n_layers)]
    assert model.params.size == model.grads.size == model.n_params == sum(counts)
    assert model.params.flags.c_contiguous and model.grads.flags.c_contiguous
    dense = dense_indices(model)

    # The layout, in buffer order: last Dense first, each one's weight then its bias, back to back.
    expected, offset = [], 0
    for i in reversed(range(n_layers)):
        fan_in, fan_out = sizes[i], sizes[i + 1]
        expected.append((dense[i], "weight", (fan_in, fan_out), True, offset, offset + fan_in * fan_out))
        offset += fan_in * fan_out
        expected.append((dense[i], "bias", (fan_out,), False, offset, offset + fan_out))
        offset += fan_out
    assert [(s.layer, s.name, s.shape, s.decay, s.start, s.stop) for s in model.layout] == expected
    # It covers the buffers exactly: starts at 0, no gap, no overlap, ends at the end.
    assert model.layout[0].start == 0 and model.layout[-1].stop == model.params.size
    assert all(a.stop == b.start for a, b in zip(model.layout[:-1], model.layout[1:]))
    covered = np.zeros(model.params.size, dtype=int)
    for s in model.layout:
        covered[s.start:s.stop] += 1
    assert np.all(covered == 1)

    for i, index in enumerate(dense):
        layer = model.layers[index]
        fan_in, fan_out = sizes[i], sizes[i + 1]
        w, b = (next(s for s in model.layout if s.layer == index and s.name == n) for n in ("weight", "bias"))
        for flat, W, bias in ((model.params, layer.W, layer.b), (model.grads, layer.dW, layer.db)):
            assert W.shape == (fan_in, fan_out) and bias.shape == (fan_out,)
            assert W.dtype == bias.dtype == np.float64
            assert np.shares_memory(W, flat) and np.shares_memory(bias, flat)
            # slot_view, by index or by layer, is the same view.
            for key in (index, layer):
                assert np.shares_memory(model.slot_view(flat, key, "weight"), W)
                assert np.shares_memory(model.slot_view(flat, key, "bias"), bias)
            # Weights (row-major, (fan_in, fan_out)) then the bias, inside the layer's block.
            np.testing.assert_array_equal(flat[w.start:w.stop], W.ravel())
            np.testing.assert_array_equal(flat[b.start:b.stop], bias)
            # Writes go both ways.
            flat[w.start:b.stop] = np.arange(counts[i]) + 1000.0 * i
            np.testing.assert_array_equal(W, (np.arange(fan_in * fan_out) + 1000.0 * i).reshape(fan_in, fan_out))
            np.testing.assert_array_equal(bias, np.arange(fan_in * fan_out, counts[i]) + 1000.0 * i)
            W[0, 0] = -7.0
            bias[-1] = -9.0
            assert flat[w.start] == -7.0 and flat[b.stop - 1] == -9.0
    # params and grads are separate memory; parameters() are the layout's views, in buffer order.
    assert not np.shares_memory(model.params, model.grads)
    views = model.parameters()
    assert len(views) == len(model.layout)
    for view, s in zip(views, model.layout):
        assert view.shape == s.shape and np.shares_memory(view, model.params)
        np.testing.assert_array_equal(view.ravel(), model.params[s.start:s.stop])
    with pytest.raises(KeyError):
        model.slot_view(model.params, 1, "weight")  # a ReLU has no slots


def test_a_stack_that_is_not_an_mlp_keeps_the_contract():
    """Layers without parameters (a leading ReLU) own no block; backprop stops at the first Dense."""
    layers = [ReLU(), Dense(4, 3), Dense(3, 3), ReLU(), Dense(3, 2)]
    model = Sequential(layers, dtype=np.float64, rng=np.random.default_rng(0), name="odd")
    assert [(s.layer, s.name) for s in model.layout] == [(4, "weight"), (4, "bias"), (2, "weight"), (2, "bias"),
                                                         (1, "weight"), (1, "bias")]
    assert model.n_params == (3 * 2 + 2) + (3 * 3 + 3) + (4 * 3 + 3)
    assert not layers[1].needs_input_grad and layers[2].needs_input_grad and layers[4].needs_input_grad
    rng = np.random.default_rng(1)
    X, y = np.abs(rng.normal(size=(5, 4))), rng.integers(0, 2, 5)
    model.forward(X)
    ready, grad_x = drive(model.backward(y, 0.2))
    assert ready == [8, 20, 35] and grad_x is None
    with pytest.raises(UsageError):
        Sequential([ReLU()], rng=np.random.default_rng(0))


def test_spec_is_json_and_names_the_layers():
    model, _ = mlp((6, 5, 3))
    spec = json.loads(json.dumps(model.spec()))
    assert spec["name"] == "mlp" and spec["dtype"] == "float64"
    assert spec["layers"] == [{"type": "Dense", "in": 6, "out": 5}, {"type": "ReLU"}, {"type": "Dense", "in": 5,
                                                                                        "out": 3}]
    assert [(e["layer"], e["slot"], e["start"], e["stop"]) for e in spec["layout"]] == \
        [(s.layer, s.name, s.start, s.stop) for s in model.layout]
    assert all(layer["type"] in LAYERS for layer in spec["layers"])


# -- (b) backward: final prefixes ------------------------------------------------------------
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("sizes,chunk", [((5, 4, 4, 3), None), ((5, 4, 4, 3), 7), ((5, 4, 4, 3), 40),
                                         ((50, 40, 10), None), ((50, 40, 10), 100), ((50, 40, 10), 1)])
def test_backward_yields_growing_final_prefixes_of_grads(sizes, chunk, kernels):
    """Each count backward yields is a number of leading ``grads`` values that are already final:
    strictly increasing, ending at the whole buffer, every layer's end among them; with ``chunk``,
    also counts inside a big layer's weights, at whole rows of it."""
    model, rng = mlp(sizes, seed=2, kernels=kernels)
    X, y = rng.normal(size=(6, sizes[0])), rng.integers(0, sizes[-1], 6)
    model.grads[...] = np.nan
    model.forward(X)
    snapshots = []
    for ready in model.backward(y, 1.0 / len(y), chunk=chunk):
        assert not np.isnan(model.grads[:ready]).any()
        snapshots.append((ready, model.grads[:ready].copy()))
    counts = [r for r, _ in snapshots]
    assert all(a < b for a, b in zip(counts[:-1], counts[1:])), counts
    assert counts[-1] == model.params.size
    assert not np.isnan(model.grads).any()
    block_ends = {s.stop for s in model.layout if s.name == "bias"}
    assert block_ends <= set(counts)
    inside = [r for r in counts if r not in block_ends]
    if chunk is None:
        assert inside == []
    else:
        # Some count falls strictly inside a weight slot, at a whole row of that weight matrix.
        weights = [s for s in model.layout if s.name == "weight"]
        for r in inside:
            w = next(s for s in weights if s.start < r < s.stop)
            assert (r - w.start) % w.shape[1] == 0
        # ... and every weight matrix bigger than a chunk is handed over in more than one block.
        for w in weights:
            if max(1, chunk // w.shape[1]) < w.shape[0]:
                assert any(w.start < r < w.stop for r in inside), (w, counts)
        assert inside or chunk >= max(w.stop - w.start for w in weights)
    # Nothing before `ready` changed afterwards: the same buffer of the same run, so bitwise.
    for ready, prefix in snapshots:
        assert prefix.tobytes() == model.grads[:ready].tobytes()

    # Chunked or not, the same gradient; a weight gradient in blocks of rows is a
    # differently shaped GEMM, so not bitwise under every BLAS (see GEMM_RTOL).
    chunked = model.grads.copy()
    model.gradient(X, y)
    np.testing.assert_allclose(chunked, model.grads, rtol=GEMM_RTOL, atol=GEMM_ATOL)


@pytest.mark.parametrize("chunk", [None, 1, 5, 12, 13, 1000])
def test_dense_backward_chunks_are_whole_rows(chunk):
    """A lone Dense: counts ``(r + rows) * fan_out`` for the row blocks, then its whole block."""
    layer = Dense(9, 4)
    _, params, grads = bind(layer)
    x = np.random.default_rng(0).normal(size=(3, 9))
    layer(x)
    ready, grad_x = drive(layer.backward(np.ones((3, 4))))
    assert ready == [9 * 4 + 4] and grad_x.shape == (3, 9)
    whole = grads["weight"].copy()
    layer(x)
    ready, _ = drive(layer.backward(np.ones((3, 4)), chunk=chunk))
    rows = 9 if chunk is None else max(1, chunk // 4)
    assert ready == [r * 4 for r in range(rows, 9, rows)] + [40]
    np.testing.assert_allclose(grads["weight"], whole, rtol=GEMM_RTOL, atol=GEMM_ATOL)


# -- (c) L2 decay ranges ------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [(6, 5, 3), (7, 6, 5, 4), (4, 3, 3, 3, 5)])
def test_decay_ranges_are_exactly_the_weights(sizes):
    model, _ = mlp(sizes)
    ranges = model.decay_ranges()
    dense = dense_indices(model)
    # One range per weight matrix, first layer first, none for a bias.
    expected = [(s.start, s.stop) for i in dense for s in model.layout if s.layer == i and s.name == "weight"]
    assert ranges == expected
    mask = np.zeros(model.params.size, dtype=bool)
    for lo, hi in ranges:
        assert not mask[lo:hi].any()
        mask[lo:hi] = True
    for s in model.layout:
        assert mask[s.start:s.stop].all() if s.name == "weight" else not mask[s.start:s.stop].any()
    assert mask.sum() == sum(sizes[i] * sizes[i + 1] for i in range(len(sizes) - 1))

    # l2_penalty sums the weights' squares and nothing else (np.dot vs a sum: rounding only).
    alpha, n = 0.3, 17
    reference = 0.5 * alpha * sum(float(np.sum(model.layers[i].W ** 2)) for i in dense) / n
    assert model.l2_penalty(alpha, n) == pytest.approx(reference, rel=1e-12)
    for i in dense:
        model.layers[i].b[...] = 1e6  # biases carry no penalty
    assert model.l2_penalty(alpha, n) == pytest.approx(reference, rel=1e-12)


@pytest.mark.parametrize("kernels", KERNELS)
def test_adam_decays_the_weights_only(kernels):
    """With a zero data gradient, Adam's L2 term moves every weight and no bias."""
    model, _ = mlp((6, 5, 4, 3), kernels=kernels)
    before = model.params.copy()
    optimizer = Adam(model, alpha=0.5)
    model.grads[...] = 0
    optimizer.step(10)
    for s in model.layout:
        moved = model.params[s.start:s.stop] != before[s.start:s.stop]
        assert moved.all() if s.decay else not moved.any(), f"{s.name} of layer {s.layer}"


# -- (d) Dense and ReLU against finite differences ----------------------------------------------
def bind(layer, seed=0, dtype=np.float64, kernels="numpy"):
    """Build ``layer`` and bind it to random parameters and zeroed gradients of its own."""
    rng = np.random.default_rng(seed)
    layer.build(dtype, get_kernels(kernels))
    params = {s.name: rng.uniform(-1, 1, s.shape).astype(dtype) for s in layer.slots()}
    grads = {s.name: np.zeros(s.shape, dtype=dtype) for s in layer.slots()}
    layer.bind(params, grads)
    return rng, params, grads


def rel_error(num, ana):
    return np.linalg.norm(num - ana) / max(np.linalg.norm(num), np.linalg.norm(ana))


def finite_differences(f, a, h=FD_STEP):
    """Central differences of the scalar ``f()`` with respect to each entry of ``a`` (changed in place)."""
    g = np.empty_like(a)
    flat, out = a.reshape(-1), g.reshape(-1)
    for k in range(flat.size):
        old = flat[k]
        flat[k] = old + h
        up = f()
        flat[k] = old - h
        down = f()
        flat[k] = old
        out[k] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("fan_in,fan_out,n", [(5, 3, 4), (1, 7, 2), (8, 1, 6)])
def test_dense_gradient_matches_finite_differences(fan_in, fan_out, n, kernels):
    """Weight, bias and input gradients of ``sum(G * dense(x))``: rel. error < 1e-6 in float64."""
    layer = Dense(fan_in, fan_out)
    rng, params, grads = bind(layer, seed=fan_in + fan_out, kernels=kernels)
    x, G = rng.normal(size=(n, fan_in)), rng.normal(size=(n, fan_out))

    def f():
        return float(np.sum(G * layer(x)))

    f()
    ready, grad_x = drive(layer.backward(G.copy()))
    assert ready == [fan_in * fan_out + fan_out]
    for name, analytic in (("weight", grads["weight"]), ("bias", grads["bias"])):
        numerical = finite_differences(f, params[name])
        assert rel_error(numerical, analytic) < GRAD_REL_TOL, name
    numerical = finite_differences(f, x)
    assert rel_error(numerical, grad_x) < GRAD_REL_TOL, "input"

    first = Dense(fan_in, fan_out)
    first.needs_input_grad = False  # the first layer of a model: no input gradient
    bind(first, kernels=kernels)
    first(x)
    assert drive(first.backward(G.copy()))[1] is None


@pytest.mark.parametrize("kernels", KERNELS)
def test_relu_gradient_matches_finite_differences(kernels):
    """Input gradient of ``sum(G * relu(x))``, away from the kink: rel. error < 1e-6 in float64."""
    layer = ReLU()
    rng, _, _ = bind(layer, kernels=kernels)
    assert layer.slots() == ()
    x = rng.normal(size=(6, 5))
    x[np.abs(x) < 1e-3] = 0.5  # a step of 1e-6 must not cross 0
    G = rng.normal(size=(6, 5))

    def f():
        return float(np.sum(G * layer(x.copy())))  # ReLU works in place: on a copy

    y = layer(x.copy())
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    ready, grad_x = drive(layer.backward(G.copy()))
    assert ready == []  # no parameters: nothing to hand over
    np.testing.assert_array_equal(grad_x, G * (x > 0))
    numerical = finite_differences(f, x)
    assert rel_error(numerical, grad_x) < GRAD_REL_TOL


def test_base_layer_has_no_slots_and_must_be_implemented():
    layer = Layer()
    assert layer.slots() == () and layer.spec() == {"type": "Layer"}
    with pytest.raises(NotImplementedError):
        layer(np.zeros((1, 1)))
