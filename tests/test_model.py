"""mlpcore.nn's MLP (``build_model("mlp")``, a Sequential) against finite differences and scikit-learn.

* gradients: central differences in float64, every parameter of the whole
  Sequential, tolerance below (Dense and ReLU alone: test_layers.py);
* Adam: the same steps as scikit-learn's ``AdamOptimizer``;
* gradients and Adam with both kernel implementations (numpy and numba);
* parity: test accuracy of mlpcore's MLP within 0.5 percentage points of
  scikit-learn's ``MLPClassifier`` with the same hyper-parameters.

The flat-buffer layout (last layer first, the layers' arrays as views) and the
ready counts of ``backward`` are the layer contract's: see test_layers.py.

Portability: the suite runs on any BLAS kernel family (OpenBLAS SkylakeX,
Haswell, Zen, ...). Results of matrix products of *different* shapes (another
chunking of the rows) are not bitwise equal under every kernel, so they are
compared with tolerances (``PROBS_TOL``); bitwise checks are kept only where
the computation is the same call on the same shapes.
"""

import warnings

import numpy as np
import pytest

from mlpcore.data import load_mnist, to_float
from mlpcore.errors import UsageError
from mlpcore.nn.kernels import cross_entropy_sum
from mlpcore.nn.layers import Dense, ReLU
from mlpcore.nn.model import Sequential, build_model, mlp_layers
from mlpcore.nn.optim import Adam
from mlpcore.nn.train import train_sequential

GRAD_REL_TOL = 1e-6   # ||numerical - analytic|| / max(||numerical||, ||analytic||), float64
FD_STEP = 1e-6        # central-difference step

# predict_proba of the same rows in chunks of different sizes: the GEMMs have other
# shapes, and a correct BLAS may then sum in another order or block (seen: float32
# relative differences of 5.4e-6 on AMD EPYC / OpenBLAS Haswell kernels, 0 on
# SkylakeX). Three layers with logits of O(100) (inputs scaled by 30): a logit's
# absolute error of ~k * eps * sum|terms| becomes the relative error of each
# probability. float32: 1e-4 leaves a margin of ~20 over what was seen; the atol
# covers probabilities that underflow towards denormals. float64: the old 1e-6.
PROBS_TOL = {np.float32: dict(rtol=1e-4, atol=1e-6), np.float64: dict(rtol=1e-6, atol=1e-7)}


KERNELS = ["numpy", "numba"]  # both implementations of the elementwise work, against the same references


def make_mlp(sizes, *, dtype=np.float64, rng, kernels="auto"):
    """The MLP of ``sizes`` = (inputs, hidden..., classes), as the old ``MLP(sizes)`` was."""
    return build_model("mlp", n_features=sizes[0], n_classes=sizes[-1], hidden=sizes[1:-1], dtype=dtype, rng=rng,
                       kernels=kernels)


def dense(model):
    """The model's Dense layers, first layer first (at the even indices; ReLU between)."""
    return [layer for layer in model.layers if isinstance(layer, Dense)]


def random_problem(sizes, n, seed, kernels="auto"):
    rng = np.random.default_rng(seed)
    model = make_mlp(sizes, dtype=np.float64, rng=rng, kernels=kernels)
    X = rng.normal(size=(n, sizes[0]))
    y = rng.integers(0, sizes[-1], n)
    return model, X, y


def objective(model, X, y, alpha):
    """scikit-learn's loss: mean cross-entropy + alpha/2 * ||W||^2 / n (weights only, not biases)."""
    probs = model.forward(X)
    return cross_entropy_sum(probs, y) / len(y) + model.l2_penalty(alpha, len(y))


def analytic_gradient(model, X, y, alpha):
    """The data gradient from backprop plus the L2 term exactly as Adam.step adds it."""
    model.gradient(X, y)
    for layer in dense(model):  # weights only: the layers' own arrays (views into grads/params)
        layer.dW += alpha / len(y) * layer.W
    return model.grads.copy()


def numerical_gradient(model, X, y, alpha, h=FD_STEP):
    g = np.empty_like(model.params)
    for k in range(model.params.size):
        old = model.params[k]
        model.params[k] = old + h
        up = objective(model, X, y, alpha)
        model.params[k] = old - h
        down = objective(model, X, y, alpha)
        model.params[k] = old
        g[k] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("sizes", [(6, 5, 3), (7, 6, 5, 4), (5, 9, 3, 2), (4, 3, 3, 3, 5)])
@pytest.mark.parametrize("alpha", [0.0, 1e-4, 0.5])
def test_gradient_matches_finite_differences(sizes, alpha, kernels):
    """Every parameter of 1-, 2- and 3-hidden-layer nets: rel. error < 1e-6 in float64."""
    model, X, y = random_problem(sizes, n=13, seed=sum(sizes), kernels=kernels)
    ana = analytic_gradient(model, X, y, alpha)
    num = numerical_gradient(model, X, y, alpha)
    rel = np.linalg.norm(num - ana) / max(np.linalg.norm(num), np.linalg.norm(ana))
    assert rel < GRAD_REL_TOL, f"relative gradient error {rel:.2e} for sizes {sizes}, alpha {alpha}"
    # And entry by entry, so one wrong small block cannot hide behind large ones.
    np.testing.assert_allclose(ana, num, rtol=1e-5, atol=1e-8)


def test_gradient_scale_and_returned_loss():
    """gradient(scale=s) is s * the summed per-sample gradient; it returns the summed loss."""
    model, X, y = random_problem((5, 4, 3), n=8, seed=1)
    loss = model.gradient(X, y)
    mean_grad = model.grads.copy()
    assert loss == pytest.approx(cross_entropy_sum(model.forward(X), y))
    model.gradient(X, y, scale=1.0)
    np.testing.assert_allclose(model.grads, mean_grad * len(y), rtol=1e-12, atol=1e-14)


def test_backprop_writes_into_the_flat_gradient_buffer():
    model, X, y = random_problem((6, 5, 3), n=10, seed=4)
    buffer = model.grads
    model.gradient(X, y)
    assert model.grads is buffer
    assert np.abs(buffer).sum() > 0
    # The last Dense (5 -> 3) lies first: its 15 weight gradients lead the buffer, as its layout says.
    last = model.layers[2]
    w = next(s for s in model.layout if s.layer == 2 and s.name == "weight")
    assert (w.start, w.stop) == (0, 15)
    np.testing.assert_array_equal(buffer[w.start:w.stop], last.dW.ravel())
    assert np.shares_memory(last.dW, buffer) and np.shares_memory(model.slot_view(buffer, last, "weight"), last.dW)


def test_glorot_initialisation_bounds():
    model, _, _ = random_problem((50, 40, 10), n=1, seed=5)
    for layer in dense(model):
        W, b = layer.W, layer.b
        bound = np.sqrt(6.0 / (W.shape[0] + W.shape[1]))
        assert np.abs(W).max() <= bound and np.abs(b).max() <= bound
        assert np.abs(W).max() > 0.9 * bound


@pytest.mark.parametrize("sizes", [(3, 0, 2), (0, 2), (3, 0), (3, -1, 2)])
def test_bad_layer_sizes(sizes):
    with pytest.raises(UsageError):
        make_mlp(sizes, rng=np.random.default_rng(0))
    with pytest.raises(UsageError):
        mlp_layers(sizes[0], sizes[1:-1], sizes[-1])


def test_a_model_needs_a_layer_with_parameters_and_a_known_name():
    # The old MLP((3,)) (no weight layer at all) is now a stack without parameters.
    for layers in ([], [ReLU()]):
        with pytest.raises(UsageError):
            Sequential(layers, rng=np.random.default_rng(0))
    with pytest.raises(UsageError, match="unknown model"):
        build_model("cnn", n_features=3, n_classes=2, hidden=(), dtype=np.float32, rng=np.random.default_rng(0))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("sizes,alpha", [((6, 5, 3), 1e-4), ((7, 6, 5, 4), 0.3), ((4, 8, 2), 0.0)])
def test_adam_matches_scikit_learn(sizes, alpha, kernels):
    """Six steps with random gradients: parameters equal scikit-learn's AdamOptimizer to float64 rounding.

    scikit-learn's MLP adds ``alpha * W / n`` to the weight gradients before the
    optimizer sees them; mlpcore's Adam.step adds it itself, so scikit-learn gets
    the data gradient plus that term.
    """
    from sklearn.neural_network._stochastic_optimizers import AdamOptimizer

    rng = np.random.default_rng(7)
    model = make_mlp(sizes, dtype=np.float64, rng=rng, kernels=kernels)
    layers = dense(model)
    ref_params = [layer.W.copy() for layer in layers] + [layer.b.copy() for layer in layers]
    n_layers = len(layers)
    lr, batch = 3e-3, 17
    ours = Adam(model, lr=lr, alpha=alpha)
    theirs = AdamOptimizer(ref_params, learning_rate_init=lr, beta_1=0.9, beta_2=0.999, epsilon=1e-8)
    for step in range(6):
        data_grad = rng.normal(scale=10.0 ** rng.integers(-4, 1), size=model.grads.size)
        model.grads[...] = data_grad
        ref_grads = [layer.dW + alpha / batch * W for layer, W in zip(layers, ref_params[:n_layers])]
        ref_grads += [layer.db.copy() for layer in layers]
        ours.step(batch)
        theirs.update_params(ref_params, ref_grads)
        assert ours.t == theirs.t == step + 1
        for i in range(n_layers):
            np.testing.assert_allclose(layers[i].W, ref_params[i], rtol=1e-12, atol=1e-13,
                                       err_msg=f"weights of layer {i}, step {step + 1}")
            np.testing.assert_allclose(layers[i].b, ref_params[n_layers + i], rtol=1e-12, atol=1e-13,
                                       err_msg=f"bias of layer {i}, step {step + 1}")


@pytest.mark.parametrize("kernels", KERNELS)
def test_adam_in_buckets_equals_one_step(kernels):
    """begin_step + update over contiguous ranges (data-parallel buckets) == step()."""
    sizes = (6, 5, 4, 3)
    one = make_mlp(sizes, dtype=np.float64, rng=np.random.default_rng(0), kernels=kernels)
    parts = make_mlp(sizes, dtype=np.float64, rng=np.random.default_rng(0), kernels=kernels)
    a_one, a_parts = Adam(one, alpha=0.1), Adam(parts, alpha=0.1)
    rng = np.random.default_rng(1)
    # Cut across weight/bias and layer edges: the last Dense holds [0, 15) (weights [0, 12)), the middle one
    # [15, 39).
    assert [(s.start, s.stop) for s in one.layout[:3]] == [(0, 12), (12, 15), (15, 35)]
    cuts = [0, 5, 13, 18, 50, one.params.size]
    for _ in range(4):
        g = rng.normal(size=one.grads.size)
        one.grads[...] = g
        parts.grads[...] = g
        a_one.step(9)
        a_parts.begin_step(9)
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            a_parts.update(lo, hi)
    np.testing.assert_allclose(parts.params, one.params, rtol=1e-14, atol=1e-15)


def test_adam_float32_tracks_float64():
    """The float32 path takes the same steps as float64 to float32 precision."""
    sizes = (6, 5, 3)
    m64 = make_mlp(sizes, dtype=np.float64, rng=np.random.default_rng(0))
    m32 = make_mlp(sizes, dtype=np.float32, rng=np.random.default_rng(0))
    a64, a32 = Adam(m64, alpha=1e-3), Adam(m32, alpha=1e-3)
    rng = np.random.default_rng(1)
    for _ in range(5):
        g = rng.normal(size=m64.grads.size)
        m64.grads[...] = g
        m32.grads[...] = g
        a64.step(10)
        a32.step(10)
    np.testing.assert_allclose(m32.params, m64.params, rtol=1e-5, atol=1e-6)


def test_predict_proba_rows_sum_to_one():
    rng = np.random.default_rng(8)
    for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        model = make_mlp((20, 16, 8, 10), dtype=dtype, rng=rng)
        X = rng.normal(scale=30.0, size=(1000, 20))  # large logits: softmax must stay finite
        probs = model.predict_proba(X, chunk=128)  # several chunks and a partial last one
        assert probs.shape == (1000, 10) and probs.dtype == dtype
        assert np.all(np.isfinite(probs)) and np.all(probs >= 0) and np.all(probs <= 1)
        # Each row is normalised by its own sum: true to a few eps whatever the BLAS.
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=tol)
        # predict is the argmax of predict_proba at its default chunk: the same calls, so exactly.
        np.testing.assert_array_equal(model.predict(X), model.predict_proba(X).argmax(axis=1))
        # Chunking does not change the answer, up to the rounding of differently shaped GEMMs
        # (PROBS_TOL: not bitwise under every BLAS kernel) ...
        whole = model.predict_proba(X, chunk=100_000)
        np.testing.assert_allclose(whole, probs, **PROBS_TOL[dtype])
        # ... nor the predicted class, wherever the top two are further apart than that rounding.
        top2 = np.sort(probs, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-3
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(whole.argmax(axis=1)[clear], probs.argmax(axis=1)[clear])


# -- parity with scikit-learn on MNIST -------------------------------------------------
# 20000 training / 10000 test images (the full test set), 10 epochs, 784-128-10, batch 200,
# the mean over seeds 0 and 1. Measured on this kind of machine over 6 seeds, a single run's
# accuracy has a spread (std) of ~0.12 pp for mlpcore and ~0.10 pp for scikit-learn at
# 20000 images (vs ~0.5 / ~0.25 pp at 10000 train / 2000 test), so the std of the difference
# of two 2-seed means is ~0.11 pp: the 0.5 pp criterion sits more than 4 sigma away.
PARITY_TRAIN, PARITY_TEST, PARITY_SEEDS, PARITY_PP = 20000, 10000, (0, 1), 0.5


@pytest.fixture(scope="module")
def parity_data():
    return load_mnist(train_limit=PARITY_TRAIN, test_limit=PARITY_TEST)


def test_accuracy_parity_with_scikit_learn(parity_data):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    # One BLAS thread: ~13 s for the four fits, and no slowdown when other processes
    # hold the cores (multi-threaded BLAS degrades badly on a busy 2-core machine).
    # Build an optimizer first, so any library it loads lazily is loaded before the limit.
    Adam(make_mlp((2, 2), dtype=np.float32, rng=np.random.default_rng(0)))
    with threadpool_limits(1):
        ours, theirs = _parity_runs(parity_data, MLPClassifier, ConvergenceWarning)
    gap_pp = 100 * abs(np.mean(ours) - np.mean(theirs))
    detail = f"mlpcore {ours}, scikit-learn {theirs}"
    assert np.mean(ours) > 0.95, detail
    assert gap_pp < PARITY_PP, f"mean accuracies differ by {gap_pp:.2f} pp: {detail}"


def _parity_runs(d, MLPClassifier, ConvergenceWarning):
    x_test32 = to_float(d.x_test, np.float32)
    ours, theirs = [], []
    for seed in PARITY_SEEDS:
        model, losses, _ = train_sequential(d.x_train, d.y_train, hidden=(128,), epochs=10, batch_size=200,
                                            seed=seed, dtype=np.float32, lr=1e-3, alpha=1e-4)
        assert len(losses) == 10 and losses[-1] < losses[0]
        ours.append(np.mean(model.predict(x_test32) == d.y_test))

        # The reference program: float64 pixels / 255.
        clf = MLPClassifier(hidden_layer_sizes=(128,), activation="relu", solver="adam", alpha=1e-4,
                            batch_size=200, learning_rate_init=1e-3, max_iter=10, shuffle=True,
                            random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(d.x_train.reshape(d.n_train, -1) / 255.0, d.y_train)
        theirs.append(np.mean(clf.predict(d.x_test.reshape(d.n_test, -1) / 255.0) == d.y_test))
    return ours, theirs
