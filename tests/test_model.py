"""mlpcore.model against finite differences and against scikit-learn.

* gradients: central differences in float64, every parameter, tolerance below;
* the flat-buffer layout (last layer first) and that the per-layer arrays are views;
* Adam: the same steps as scikit-learn's ``AdamOptimizer``;
* gradients and Adam with both kernel implementations (numpy and numba);
* parity: test accuracy of mlpcore's MLP within 0.5 percentage points of
  scikit-learn's ``MLPClassifier`` with the same hyper-parameters.
"""

import warnings

import numpy as np
import pytest

from mlpcore.data import load_mnist, to_float
from mlpcore.errors import UsageError
from mlpcore.kernels import cross_entropy_sum
from mlpcore.model import MLP, Adam
from mlpcore.train import train_sequential

GRAD_REL_TOL = 1e-6   # ||numerical - analytic|| / max(||numerical||, ||analytic||), float64
FD_STEP = 1e-6        # central-difference step


KERNELS = ["numpy", "numba"]  # both implementations of the elementwise work, against the same references


def random_problem(sizes, n, seed, kernels="auto"):
    rng = np.random.default_rng(seed)
    model = MLP(sizes, dtype=np.float64, rng=rng, kernels=kernels)
    X = rng.normal(size=(n, sizes[0]))
    y = rng.integers(0, sizes[-1], n)
    return model, X, y


def objective(model, X, y, alpha):
    """scikit-learn's loss: mean cross-entropy + alpha/2 * ||W||^2 / n (weights only, not biases)."""
    probs = model.forward(X)[-1]
    return cross_entropy_sum(probs, y) / len(y) + model.l2_penalty(alpha, len(y))


def analytic_gradient(model, X, y, alpha):
    """The data gradient from backprop plus the L2 term exactly as Adam.step adds it."""
    model.gradient(X, y)
    for W, gW in zip(model.coefs, model.coef_grads):
        gW += alpha / len(y) * W
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
    assert loss == pytest.approx(cross_entropy_sum(model.forward(X)[-1], y))
    model.gradient(X, y, scale=1.0)
    np.testing.assert_allclose(model.grads, mean_grad * len(y), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunk", [None, 7, 40])
def test_backward_yields_growing_final_prefixes_of_grads(chunk):
    """Each value backward yields is a count of leading ``grads`` entries that are already final:
    they only grow, end at the whole buffer, and every layer's end is among them."""
    model, X, y = random_problem((5, 4, 4, 3), n=6, seed=2)
    model.gradient(X, y)
    whole = model.grads.copy()
    model.grads[...] = np.nan
    acts = model.forward(X)
    snapshots = []
    for ready in model.backward(acts, y, 1.0 / len(y), chunk=chunk):
        assert not np.isnan(model.grads[:ready]).any()
        snapshots.append((ready, model.grads[:ready].copy()))
    ready_seen = [r for r, _ in snapshots]
    assert ready_seen == sorted(ready_seen) and ready_seen[-1] == model.grads.size
    assert {sl.stop for sl in model.layer_slices} <= set(ready_seen)
    for ready, prefix in snapshots:  # nothing before `ready` changed afterwards
        np.testing.assert_array_equal(prefix, model.grads[:ready])
    # Chunked or not, the same gradient (up to the rounding of a differently blocked GEMM).
    np.testing.assert_allclose(model.grads, whole, rtol=1e-12, atol=1e-15)


def test_flat_buffers_are_last_layer_first_and_views_alias():
    sizes = (7, 5, 4, 3)
    model, _, _ = random_problem(sizes, n=1, seed=3)
    counts = [sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(len(sizes) - 1)]
    assert model.params.size == model.grads.size == sum(counts)
    assert model.params.flags.c_contiguous and model.grads.flags.c_contiguous

    # Last layer at offset 0, then the one below it, ...: contiguous and in reverse order.
    offset = 0
    for i in reversed(range(model.n_layers)):
        sl = model.layer_slices[i]
        assert (sl.start, sl.stop) == (offset, offset + counts[i]), f"layer {i}"
        offset = sl.stop
    assert offset == model.params.size

    for i in range(model.n_layers):
        fan_in, fan_out = sizes[i], sizes[i + 1]
        sl = model.layer_slices[i]
        for flat, W, b in ((model.params, model.coefs[i], model.intercepts[i]),
                           (model.grads, model.coef_grads[i], model.intercept_grads[i])):
            assert W.shape == (fan_in, fan_out) and b.shape == (fan_out,)
            assert W.dtype == b.dtype == np.float64
            assert np.shares_memory(W, flat) and np.shares_memory(b, flat)
            # Weights first (row-major, (fan_in, fan_out)), then the bias, inside the layer's slice.
            np.testing.assert_array_equal(flat[sl][: fan_in * fan_out], W.ravel())
            np.testing.assert_array_equal(flat[sl][fan_in * fan_out:], b)
            # Writes go both ways.
            flat[sl] = np.arange(counts[i]) + 1000.0 * i
            np.testing.assert_array_equal(W, (np.arange(fan_in * fan_out) + 1000.0 * i).reshape(fan_in, fan_out))
            np.testing.assert_array_equal(b, np.arange(fan_in * fan_out, counts[i]) + 1000.0 * i)
            W[0, 0] = -7.0
            b[-1] = -9.0
            assert flat[sl.start] == -7.0 and flat[sl.stop - 1] == -9.0
    # params and grads are separate memory.
    assert not np.shares_memory(model.params, model.grads)


def test_backprop_writes_into_the_flat_gradient_buffer():
    model, X, y = random_problem((6, 5, 3), n=10, seed=4)
    buffer = model.grads
    model.gradient(X, y)
    assert model.grads is buffer
    assert np.abs(buffer).sum() > 0
    np.testing.assert_array_equal(buffer[model.layer_slices[1]][:15], model.coef_grads[1].ravel())


def test_glorot_initialisation_bounds():
    model, _, _ = random_problem((50, 40, 10), n=1, seed=5)
    for W, b in zip(model.coefs, model.intercepts):
        bound = np.sqrt(6.0 / (W.shape[0] + W.shape[1]))
        assert np.abs(W).max() <= bound and np.abs(b).max() <= bound
        assert np.abs(W).max() > 0.9 * bound


@pytest.mark.parametrize("sizes", [(3,), (3, 0, 2), (0, 2)])
def test_bad_layer_sizes(sizes):
    with pytest.raises(UsageError):
        MLP(sizes, rng=np.random.default_rng(0))


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
    model = MLP(sizes, dtype=np.float64, rng=rng, kernels=kernels)
    ref_params = [W.copy() for W in model.coefs] + [b.copy() for b in model.intercepts]
    n_layers = model.n_layers
    lr, batch = 3e-3, 17
    ours = Adam(model, lr=lr, alpha=alpha)
    theirs = AdamOptimizer(ref_params, learning_rate_init=lr, beta_1=0.9, beta_2=0.999, epsilon=1e-8)
    for step in range(6):
        data_grad = rng.normal(scale=10.0 ** rng.integers(-4, 1), size=model.grads.size)
        model.grads[...] = data_grad
        ref_grads = [gW + alpha / batch * W for gW, W in zip(model.coef_grads, ref_params[:n_layers])]
        ref_grads += [gb.copy() for gb in model.intercept_grads]
        ours.step(batch)
        theirs.update_params(ref_params, ref_grads)
        assert ours.t == theirs.t == step + 1
        for i in range(n_layers):
            np.testing.assert_allclose(model.coefs[i], ref_params[i], rtol=1e-12, atol=1e-13,
                                       err_msg=f"weights of layer {i}, step {step + 1}")
            np.testing.assert_allclose(model.intercepts[i], ref_params[n_layers + i], rtol=1e-12, atol=1e-13,
                                       err_msg=f"bias of layer {i}, step {step + 1}")


@pytest.mark.parametrize("kernels", KERNELS)
def test_adam_in_buckets_equals_one_step(kernels):
    """begin_step + update over contiguous ranges (data-parallel buckets) == step()."""
    sizes = (6, 5, 4, 3)
    one = MLP(sizes, dtype=np.float64, rng=np.random.default_rng(0), kernels=kernels)
    parts = MLP(sizes, dtype=np.float64, rng=np.random.default_rng(0), kernels=kernels)
    a_one, a_parts = Adam(one, alpha=0.1), Adam(parts, alpha=0.1)
    rng = np.random.default_rng(1)
    # Cut across weight/bias and layer edges: layer 2 holds [0, 15) (weights [0, 12)), layer 1 [15, 39).
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
    m64 = MLP(sizes, dtype=np.float64, rng=np.random.default_rng(0))
    m32 = MLP(sizes, dtype=np.float32, rng=np.random.default_rng(0))
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
        model = MLP((20, 16, 8, 10), dtype=dtype, rng=rng)
        X = rng.normal(scale=30.0, size=(1000, 20))  # large logits: softmax must stay finite
        probs = model.predict_proba(X, chunk=128)  # several chunks and a partial last one
        assert probs.shape == (1000, 10) and probs.dtype == dtype
        assert np.all(np.isfinite(probs)) and np.all(probs >= 0) and np.all(probs <= 1)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=tol)
        np.testing.assert_array_equal(model.predict(X), probs.argmax(axis=1))
        # Chunking does not change the answer.
        np.testing.assert_allclose(model.predict_proba(X, chunk=100_000), probs, rtol=1e-6, atol=1e-7)


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
    Adam(MLP((2, 2), rng=np.random.default_rng(0)))
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
