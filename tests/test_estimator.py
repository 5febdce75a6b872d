"""mlpcore.MLPClassifier: scikit-learn's estimator checks, its parameters and stopping rule, and the CLI's model.

* scikit-learn's own checks (``parametrize_with_checks``), with every check it
  skips or is expected to fail listed in :data:`EXPECTED_FAILED_CHECKS` with the reason;
* the parameters and defaults are scikit-learn's ``MLPClassifier``'s; the
  parameters it does not support raise a clear error;
* the stopping rule stops at the same epoch as scikit-learn's for the same
  loss curve (the rule is replayed on ``loss_curve_``) and, where progress is
  impossible (a huge ``tol``), at the same epoch as scikit-learn itself;
* any labels; ``Pipeline`` and ``GridSearchCV``;
* the same predictions, bit for bit, as ``mpi_train.py --launcher serial --jobs 1``.
"""

import contextlib
import io
import pickle
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV
from sklearn.neural_network import MLPClassifier as SklearnMLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import mlpcore
from mlpcore.data import load_mnist, to_float
from mlpcore.estimator import MLPClassifier

#: Checks expected to fail, each with its reason; parametrize_with_checks reports them as xfail.
#: None today: every check scikit-learn runs on this estimator passes.
EXPECTED_FAILED_CHECKS = {}
#: Checks scikit-learn itself skips or does not run for this estimator, and why (for the record).
NOT_RUN = {
    "check_array_api_input": "skipped by scikit-learn unless SCIPY_ARRAY_API=1; the estimator computes with numpy",
    "check_sample_weight_*": "fit takes no sample_weight, so scikit-learn does not run them",
    "check_estimators_partial_fit_n_features, check_classifiers_partial_fit...": "no partial_fit",
    "check_classifiers_multilabel_*": "multi-label y is not supported (tag multi_label=False)",
    "check_decision_proba_consistency": "no decision_function",
    "sparse input": "refused with scikit-learn's message (tag input_tags.sparse=False), which the checks test",
}


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X / 16.0, y


@parametrize_with_checks([MLPClassifier()], expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


def test_parameters_and_defaults_are_sklearns():
    ours, theirs = MLPClassifier().get_params(), SklearnMLPClassifier().get_params()
    assert {k: v for k, v in ours.items() if k not in ("dtype", "kernels")} == theirs
    assert (ours["dtype"], ours["kernels"]) == ("float32", "auto")
    assert ours["hidden_layer_sizes"] == (100,) and ours["batch_size"] == "auto" and ours["max_iter"] == 200
    clf = MLPClassifier().set_params(alpha=0.1, hidden_layer_sizes=(8,))
    assert clf.get_params()["alpha"] == 0.1 and clf.hidden_layer_sizes == (8,)


@pytest.mark.parametrize("params, match", [
    ({"solver": "sgd"}, "solver='adam' only; solver='sgd' is not supported"),
    ({"solver": "lbfgs"}, "solver='lbfgs' is not supported"),
    ({"activation": "tanh"}, "activation='relu' only; activation='tanh' is not supported"),
    ({"activation": "logistic"}, "activation='logistic' is not supported"),
    ({"hidden_layer_sizes": (10, 0)}, "hidden_layer_sizes must be > 0"),
    ({"dtype": "float16"}, "'dtype' parameter of MLPClassifier must be"),
    ({"alpha": -1.0}, "'alpha' parameter of MLPClassifier must be"),
])
def test_unsupported_or_bad_parameters_raise_a_clear_error(digits, params, match):
    X, y = digits
    with pytest.raises(ValueError, match=match):
        MLPClassifier(**params).fit(X[:50], y[:50])


def test_any_labels(digits):
    X, y = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    for labels in (names[y], y * 10 - 7, (y % 3).astype(float)):
        clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=30, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X, labels)
        assert np.array_equal(clf.classes_, np.unique(labels))
        assert set(clf.predict(X)) <= set(labels)
        assert clf.predict_proba(X).shape == (len(X), len(clf.classes_))
        assert clf.score(X, labels) > 0.9
    assert clf.n_features_in_ == 64 and clf.n_outputs_ == 3 and clf.out_activation_ == "softmax"
    assert [c.shape for c in clf.coefs_] == [(64, 32), (32, 3)] and [b.shape for b in clf.intercepts_] == [(32,), (3,)]


def _replay_sklearn_rule(curve, tol, n_iter_no_change):
    """The epoch (1-based) at which scikit-learn's rule stops on this loss curve, or None."""
    best, count = np.inf, 0
    for epoch, loss in enumerate(curve, 1):
        count = count + 1 if loss > best - tol else 0
        best = min(best, loss)
        if count > n_iter_no_change:
            return epoch
    return None


@pytest.mark.parametrize("tol, n_iter_no_change, stops_early", [(1e-4, 10, False), (0.05, 2, True), (0.01, 1, True)])
def test_stopping_rule_is_sklearns(digits, tol, n_iter_no_change, stops_early):
    X, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=60, tol=tol, n_iter_no_change=n_iter_no_change,
                            random_state=1).fit(X, y)
    stopped = _replay_sklearn_rule(clf.loss_curve_, tol, n_iter_no_change)
    assert (stopped is not None) == stops_early, stopped
    assert (stopped or 60) == clf.n_iter_ == len(clf.loss_curve_), (stopped, clf.n_iter_)
    assert clf.best_loss_ == min(clf.loss_curve_) and clf.loss_ == clf.loss_curve_[-1]
    assert clf.t_ == clf.n_iter_ * len(X)


@pytest.mark.parametrize("n_iter_no_change", [1, 3])
def test_without_progress_it_stops_when_sklearn_does(digits, n_iter_no_change):
    """A tol no epoch can beat: both stop after n_iter_no_change + 2 epochs (the first sets the best loss)."""
    X, y = digits
    kwargs = dict(hidden_layer_sizes=(16,), max_iter=50, tol=100.0, n_iter_no_change=n_iter_no_change,
                  random_state=0)
    ours, theirs = MLPClassifier(**kwargs).fit(X, y), SklearnMLPClassifier(**kwargs).fit(X, y)
    assert ours.n_iter_ == theirs.n_iter_ == n_iter_no_change + 2


def test_max_iter_warns_and_n_iter_no_change_of_max_iter_never_stops(digits):
    X, y = digits
    with pytest.warns(ConvergenceWarning, match=r"Maximum iterations \(4\) reached"):
        clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=4, tol=100.0, n_iter_no_change=4, random_state=0).fit(X, y)
    assert clf.n_iter_ == 4


def test_early_stopping_keeps_the_best_weights(digits):
    X, y = digits
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=200, early_stopping=True, n_iter_no_change=3,
                        random_state=0).fit(X, y)
    scores = clf.validation_scores_
    assert len(scores) == clf.n_iter_ < 200 and clf.best_validation_score_ == max(scores)
    assert clf.best_loss_ is None
    best, count = -np.inf, 0  # scikit-learn's rule on the validation scores
    for epoch, score in enumerate(scores, 1):
        count = count + 1 if score < best + clf.tol else 0
        best = max(best, score)
        if count > 3:
            break
    assert epoch == clf.n_iter_


def test_verbose_prints_like_sklearn(digits):
    X, y = digits
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        MLPClassifier(hidden_layer_sizes=(8,), max_iter=30, tol=100.0, n_iter_no_change=1, verbose=True,
                      random_state=0).fit(X, y)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Iteration 1, loss = ") and len(lines) == 4
    assert lines[-1] == "Training loss did not improve more than tol=100.000000 for 1 consecutive epochs. Stopping."


def test_warm_start_continues_and_shuffle_false_is_deterministic(digits):
    X, y = digits
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=5, warm_start=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
        first = list(clf.loss_curve_)
        clf.fit(X, y)
        assert clf.loss_curve_[:5] == first and len(clf.loss_curve_) == 10 and clf.loss_curve_[5] < first[0]
        a = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, shuffle=False, random_state=0).fit(X, y)
        b = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, shuffle=False, random_state=0).fit(X, y)
    assert a.loss_curve_ == b.loss_curve_


def test_pickle_pipeline_and_grid_search(digits):
    X, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe = make_pipeline(MinMaxScaler(), MLPClassifier(hidden_layer_sizes=(32,), max_iter=40, random_state=0))
        pipe.fit(X * 16, y)
        assert pipe.score(X * 16, y) > 0.95
        again = pickle.loads(pickle.dumps(pipe))
        assert np.array_equal(again.predict_proba(X * 16), pipe.predict_proba(X * 16))
        grid = GridSearchCV(MLPClassifier(max_iter=20, random_state=0),
                            {"hidden_layer_sizes": [(8,), (32,)], "alpha": [1e-4, 1e-2]}, cv=2)
        grid.fit(X, y)
    assert set(grid.best_params_) == {"hidden_layer_sizes", "alpha"} and grid.best_score_ > 0.7
    assert len(grid.cv_results_["params"]) == 4


def test_same_predictions_as_the_command_lines_serial_run(tmp_path):
    """mpi_train.py --launcher serial --jobs 1 (via mlpcore.run, in this process) and the estimator with the
    same settings: the same model, so the same predictions and the same final loss, bit for bit."""
    settings = dict(train_limit=3000, test_limit=500, epochs=3, hidden=(64,), seed=7, alpha=1e-4, lr=1e-3,
                    batch_size=200)
    with contextlib.redirect_stdout(io.StringIO()):
        res = mlpcore.run(launcher="serial", jobs=1, no_baseline=True, no_plots=True, quiet=True,
                          out=str(tmp_path / "run"), **settings)
    data = load_mnist(train_limit=3000, test_limit=500)
    clf = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-4, batch_size=200, learning_rate_init=1e-3,
                        max_iter=3, n_iter_no_change=3, random_state=7)  # n_iter_no_change = max_iter: never stops early
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(to_float(data.x_train), data.y_train)  # the same scaling as the CLI: x * float32(1/255)
    assert len(clf.classes_) == 10
    y_pred = res.predictions()["y_pred"]
    assert np.array_equal(clf.predict(to_float(data.x_test)), y_pred)
    assert clf.loss_curve_[-1] == res.strategy.final_train_loss[0]
