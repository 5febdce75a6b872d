"""A drop-in scikit-learn estimator on mlpcore's own MLP: :class:`MLPClassifier`.

It takes scikit-learn's ``MLPClassifier`` parameters, with their defaults, and
trains with mlpcore's numpy/numba MLP (:func:`mlpcore.nn.model.build_model`,
:class:`mlpcore.nn.optim.Adam`, the loop of :mod:`mlpcore.nn.train`), so it
fits in a ``Pipeline`` or a ``GridSearchCV`` where scikit-learn's does and
trains faster. The stopping rule is scikit-learn's: stop when the training loss
(or, with ``early_stopping``, the validation accuracy) has not improved by
``tol`` for more than ``n_iter_no_change`` consecutive epochs, else after
``max_iter`` epochs.

With the command line's settings it trains the very model ``mpi_train.py
--launcher serial --jobs 1`` trains (same code path, same random numbers)::

    MLPClassifier(hidden_layer_sizes=(128,), batch_size=200, max_iter=10, n_iter_no_change=10,
                  random_state=0).fit(x_train * np.float32(1 / 255), y_train)

predicts exactly the ``y_pred`` of that run's predictions.npz (for a training
set holding all ten digits).
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier as _SklearnMLPClassifier
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from .nn.kernels import KERNELS
from .nn.layers import Dense
from .nn.model import build_model
from .nn.optim import Adam
from .nn.train import LocalSync, fit

try:
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # scikit-learn < 1.6: the method it replaced
    def _validate_data(estimator, X="no_validation", y="no_validation", **kwargs):
        return estimator._validate_data(X, y, **kwargs)

__all__ = ["MLPClassifier"]

#: What this estimator trains with; other values of these parameters raise a clear error.
SUPPORTED = {"solver": "adam", "activation": "relu"}


class _InOrder(LocalSync):
    """``shuffle=False``: the batches in the order of the rows, every epoch."""

    def batches(self, epoch):
        for start in range(0, self.n_samples, self.batch_size):
            rows = np.arange(start, min(start + self.batch_size, self.n_samples))
            yield rows, len(rows)


def _generator(random_state):
    """The numpy Generator mlpcore trains with: ``default_rng(seed)`` for an int seed, as the command line's
    ``seed``; for None or a RandomState, seeded from that RandomState (so ``np.random.seed`` applies)."""
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        return np.random.default_rng(int(random_state))
    return np.random.default_rng(check_random_state(random_state).randint(np.iinfo(np.int32).max))


class MLPClassifier(ClassifierMixin, BaseEstimator):
    """Multi-layer perceptron classifier trained by mlpcore, with scikit-learn's API and defaults.

    A drop-in for :class:`sklearn.neural_network.MLPClassifier` with
    ``solver='adam'`` and ``activation='relu'`` (its defaults): the same
    parameters, defaults and stopping rule, trained by mlpcore's MLP
    (float32 and fused kernels by default, so several times faster).

    Parameters
    ----------
    hidden_layer_sizes : array-like of shape (n_layers - 2,) or int, default=(100,)
        Units of each hidden layer.
    activation : {'relu'}, default='relu'
        Hidden activation; only ReLU is supported (others raise ValueError).
    solver : {'adam'}, default='adam'
        Only Adam is supported ('sgd' and 'lbfgs' raise ValueError).
    alpha : float, default=0.0001
        L2 penalty, in scikit-learn's scaling (divided by the batch size).
    batch_size : int or 'auto', default='auto'
        Mini-batch size; 'auto' is ``min(200, n_samples)``.
    learning_rate : {'constant', 'invscaling', 'adaptive'}, default='constant'
        Used by scikit-learn's 'sgd' solver only; accepted and ignored, as there.
    learning_rate_init : float, default=0.001
        Adam's learning rate.
    power_t : float, default=0.5
        'sgd' only: accepted and ignored.
    max_iter : int, default=200
        Most epochs per ``fit``.
    shuffle : bool, default=True
        Shuffle the samples every epoch.
    random_state : int, RandomState instance or None, default=None
        Seed of the initial weights, the shuffling and the early-stopping
        split. An int ``s`` uses ``numpy.random.default_rng(s)``, as the
        command line's ``--seed s`` does for worker 0.
    tol : float, default=1e-4
        Improvement of the loss (or validation score) that counts as progress.
    verbose : bool, default=False
        Print the loss of every epoch.
    warm_start : bool, default=False
        Start ``fit`` from the previous solution (a fresh Adam, as scikit-learn).
    momentum : float, default=0.9
        'sgd' only: accepted and ignored.
    nesterovs_momentum : bool, default=True
        'sgd' only: accepted and ignored.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the data (stratified) and stop when
        its accuracy has not improved by ``tol`` for more than
        ``n_iter_no_change`` epochs; the best weights are kept.
    validation_fraction : float, default=0.1
        Held-out share for ``early_stopping``.
    beta_1, beta_2 : float, default=0.9, 0.999
        Adam's moment decay rates.
    epsilon : float, default=1e-8
        Adam's numerical stability term.
    n_iter_no_change : int or np.inf, default=10
        Epochs without progress (by ``tol``) tolerated before stopping.
    max_fun : int, default=15000
        'lbfgs' only: accepted and ignored.
    dtype : {'float32', 'float64'}, default='float32'
        mlpcore only: the floating type of the weights and the arithmetic.
    kernels : {'auto', 'numba', 'numpy'}, default='auto'
        mlpcore only: the implementation of the elementwise work (the same
        results, another speed; see :mod:`mlpcore.nn.kernels`).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The class labels (any labels: ``np.unique`` of ``y``).
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Set when ``X`` has string feature names (a DataFrame).
    loss_ : float
        The last epoch's training loss.
    best_loss_ : float or None
        The lowest training loss (None with ``early_stopping``).
    loss_curve_ : list of float
        The training loss of every epoch (L2 term included).
    validation_scores_ : list of float or None
        With ``early_stopping``: the held-out accuracy of every epoch.
    best_validation_score_ : float or None
    t_ : int
        Training samples seen.
    coefs_, intercepts_ : list of ndarray
        Weights ``(fan_in, fan_out)`` and biases of each layer (views of the model's parameters).
    n_iter_ : int
        Epochs run by the last ``fit``.
    n_layers_ : int
    n_outputs_ : int
        Output units: one per class (a softmax, also for two classes).
    out_activation_ : str
        ``'softmax'``.

    See Also
    --------
    sklearn.neural_network.MLPClassifier : the estimator this one replaces.
    mlpcore.run : the parallel experiment on MNIST.

    Notes
    -----
    Differences from scikit-learn's: two classes get two softmax outputs (not
    one logistic unit), so ``n_outputs_`` is 2; the arithmetic is float32
    unless ``dtype='float64'``; there is no ``partial_fit``, no
    ``sample_weight`` and no multi-label ``y``; sparse ``X`` is refused.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from mlpcore import MLPClassifier
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=50, random_state=0).fit(X / 16, y)
    >>> clf.score(X / 16, y) > 0.9
    True
    """

    _parameter_constraints: dict = {
        **_SklearnMLPClassifier._parameter_constraints,
        "dtype": [StrOptions({"float32", "float64"})],
        "kernels": [StrOptions(set(KERNELS))],
    }

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", alpha=0.0001,
                 batch_size="auto", learning_rate="constant", learning_rate_init=0.001, power_t=0.5, max_iter=200,
                 shuffle=True, random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1, beta_1=0.9,
                 beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000, dtype="float32",
                 kernels="auto"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.dtype = dtype
        self.kernels = kernels

    # -- fitting ---------------------------------------------------------------------------------
    def _check_parameters(self):
        self._validate_params()  # scikit-learn's own constraints, plus dtype and kernels
        for name, value in SUPPORTED.items():
            if getattr(self, name) != value:
                raise ValueError(f"mlpcore.MLPClassifier trains with {name}={value!r} only; {name}="
                                 f"{getattr(self, name)!r} is not supported (use "
                                 "sklearn.neural_network.MLPClassifier for it)")
        sizes = self.hidden_layer_sizes
        sizes = [sizes] if not hasattr(sizes, "__iter__") else list(sizes)
        if any(int(s) != s or s <= 0 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be > 0, got {sizes}.")
        return tuple(int(s) for s in sizes)

    def fit(self, X, y):
        """Fit the model to ``X`` and ``y``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training inputs, already scaled (e.g. pixels / 255).
        y : array-like of shape (n_samples,)
            Class labels, of any type ``np.unique`` sorts.

        Returns
        -------
        self : MLPClassifier
        """
        hidden = self._check_parameters()
        first_pass = not hasattr(self, "_model") or not self.warm_start
        X, y = _validate_data(self, X, y, dtype=(np.float64, np.float32), reset=first_pass)
        check_classification_targets(y)
        if first_pass:
            classes, y_index = np.unique(y, return_inverse=True)
            if len(classes) < 2:
                raise ValueError(f"MLPClassifier needs samples of at least 2 classes; the data have 1 class "
                                 f"({classes[0]!r})")
        else:
            classes = self.classes_
            if set(np.unique(y)) != set(classes):
                raise ValueError("warm_start can only be used where `y` has the same classes as in the previous "
                                 f"call to fit. Previously got {classes}, `y` has {np.unique(y)}")
            y_index = np.searchsorted(classes, y)
        dtype = np.dtype(self.dtype)
        X = np.ascontiguousarray(X, dtype=dtype)
        y_index = y_index.astype(np.intp, copy=False)

        X_val = y_val = None
        if self.early_stopping:
            split_state = self.random_state if isinstance(self.random_state, numbers.Integral) else \
                check_random_state(self.random_state)
            X, X_val, y_index, y_val = train_test_split(X, y_index, random_state=split_state,
                                                        test_size=self.validation_fraction, stratify=y_index)
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase 'validation_fraction' or the size "
                                 "of your dataset.")
        n_samples = X.shape[0]
        if self.batch_size == "auto":
            batch_size = min(200, n_samples)
        else:
            if self.batch_size > n_samples:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is going to be "
                              "clipped")
            batch_size = int(np.clip(self.batch_size, 1, n_samples))

        # The same steps, in the same order of random numbers, as mlpcore.nn.train.train_sequential.
        rng = _generator(self.random_state)
        if first_pass:
            self.classes_ = classes
            self._hidden = hidden
            self._model = self._build(rng)
            self.loss_curve_, self.t_, self._no_improvement_count = [], 0, 0
            self.best_loss_ = None if self.early_stopping else np.inf
            self.validation_scores_ = [] if self.early_stopping else None
            self.best_validation_score_ = -np.inf if self.early_stopping else None
        model = self._model
        optimizer = Adam(model, lr=self.learning_rate_init, beta_1=self.beta_1, beta_2=self.beta_2,
                         epsilon=self.epsilon, alpha=self.alpha)
        sync = (LocalSync if self.shuffle else _InOrder)(n_samples, batch_size, rng)

        self.n_iter_ = 0
        best = {"params": None, "stopped": False}

        def stop(epoch, loss):
            """scikit-learn's rule (``_update_no_improvement_count``), after each epoch."""
            self.n_iter_ += 1
            self.loss_ = float(loss)
            self.t_ += n_samples
            self.loss_curve_.append(self.loss_)
            if self.verbose:
                print("Iteration %d, loss = %.8f" % (self.n_iter_, self.loss_))
            if self.early_stopping:
                score = float(np.mean(model.predict(X_val) == y_val))
                self.validation_scores_.append(score)
                if self.verbose:
                    print("Validation score: %f" % score)
                self._no_improvement_count = (self._no_improvement_count + 1
                                              if score < self.best_validation_score_ + self.tol else 0)
                if score > self.best_validation_score_:
                    self.best_validation_score_ = score
                    best["params"] = model.params.copy()
            else:
                self._no_improvement_count = (self._no_improvement_count + 1
                                              if self.loss_ > self.best_loss_ - self.tol else 0)
                self.best_loss_ = min(self.best_loss_, self.loss_)
            if self._no_improvement_count > self.n_iter_no_change:
                if self.verbose:
                    what = "Validation score" if self.early_stopping else "Training loss"
                    print(f"{what} did not improve more than tol={self.tol:f} for "
                          f"{self.n_iter_no_change} consecutive epochs. Stopping.")
                best["stopped"] = True
                return True
            return False

        fit(model, optimizer, X, y_index, epochs=self.max_iter, sync=sync, stop=stop)
        if not best["stopped"] and self.n_iter_ == self.max_iter:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the "
                          "optimization hasn't converged yet.", ConvergenceWarning)
        if best["params"] is not None:  # early stopping keeps the best weights, as scikit-learn
            model.params[...] = best["params"]
        if not np.isfinite(model.params).all():
            raise ValueError("Solver produced non-finite parameter weights. The input data may contain large "
                             "values and need to be preprocessed.")
        self._expose()
        return self

    def _build(self, rng):
        return build_model("mlp", n_features=self.n_features_in_, n_classes=len(self.classes_), hidden=self._hidden,
                           dtype=np.dtype(self.dtype), rng=rng, kernels=self.kernels)

    def _expose(self):
        """scikit-learn's fitted attributes, from the model."""
        dense = [layer for layer in self._model.layers if isinstance(layer, Dense)]
        self.coefs_ = [layer.W for layer in dense]
        self.intercepts_ = [layer.b for layer in dense]
        self.n_layers_ = len(dense) + 1
        self.n_outputs_ = len(self.classes_)
        self.out_activation_ = "softmax"

    # -- predicting ------------------------------------------------------------------------------
    def predict_proba(self, X):
        """Class probabilities.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Columns in the order of :attr:`classes_`, in the model's ``dtype``.
        """
        check_is_fitted(self)
        X = _validate_data(self, X, dtype=(np.float64, np.float32), reset=False)
        return self._model.predict_proba(X)

    def predict_log_proba(self, X):
        """Logarithm of :meth:`predict_proba`."""
        return np.log(self.predict_proba(X))

    def predict(self, X):
        """The most probable class of each sample.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
            Labels from :attr:`classes_`.
        """
        check_is_fitted(self)
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    # -- pickling: the model is rebuilt from its parameters --------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        model = state.pop("_model", None)
        for name in ("coefs_", "intercepts_"):
            state.pop(name, None)
        if model is not None:
            state["_model_params"] = model.params.copy()
        return state

    def __setstate__(self, state):
        state = dict(state)
        params = state.pop("_model_params", None)
        super().__setstate__(state)
        if params is not None:
            self._model = self._build(np.random.default_rng(0))
            self._model.params[...] = params
            self._expose()
