"""The laws of parallel speed-up, and their fits to measured speed-ups.

* Amdahl (strong scaling, fixed problem): :func:`amdahl_speedup`, :func:`fit_amdahl`;
* Gustafson (weak scaling, the problem grows with N): :func:`gustafson_speedup`,
  :func:`fit_gustafson`;
* Karp-Flatt, the serial fraction one measured speed-up implies: :func:`karp_flatt`.
"""

from __future__ import annotations

import numpy as np


def amdahl_speedup(n, f):
    """Amdahl's law: ``S(N) = 1 / (f + (1 - f) / N)`` for a serial fraction ``f``.

    Parameters
    ----------
    n : array_like
        Worker counts.
    f : float
        Fraction of the sequential time that does not parallelise, in [0, 1].

    Returns
    -------
    ndarray
        The speed-up at each ``n``.
    """
    n = np.asarray(n, dtype=float)
    return 1.0 / (f + (1.0 - f) / n)


def fit_amdahl(ranks, speedups):
    """Least-squares serial fraction ``f`` of Amdahl's law for measured speed-ups.

    Minimises ``sum((S_i - amdahl_speedup(N_i, f))**2)`` over ``f`` in [0, 1]
    (the residuals are in speed-up, the quantity plotted). Superlinear data
    gives ``f = 0``; no point with ``N > 1`` gives NaN.

    Parameters
    ----------
    ranks, speedups : array_like
        One entry per run; non-finite speed-ups are ignored.

    Returns
    -------
    float

    Examples
    --------
    >>> n = [1, 2, 4, 8]
    >>> round(fit_amdahl(n, amdahl_speedup(n, 0.1)), 6)
    0.1
    """
    from scipy.optimize import minimize_scalar

    n, s = _finite_pairs(ranks, speedups)
    if not np.any(n > 1):
        return float("nan")

    def sse(f):
        return float(np.sum((amdahl_speedup(n, f) - s) ** 2))

    # A coarse grid first, so the bounded search starts next to the global minimum.
    grid = np.linspace(0.0, 1.0, 1001)
    best = grid[int(np.argmin([sse(f) for f in grid]))]
    lo, hi = max(0.0, best - 1e-3), min(1.0, best + 1e-3)
    res = minimize_scalar(sse, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
    return float(min((res.x, lo, hi), key=sse))


def gustafson_speedup(n, s):
    """Gustafson's scaled speed-up ``S(N) = N - s (N - 1)`` for a serial fraction ``s``.

    ``s`` is the serial share of the *parallel* run's time, when the problem
    grows with the worker count (weak scaling).
    """
    n = np.asarray(n, dtype=float)
    return n - s * (n - 1.0)


def fit_gustafson(ranks, speedups):
    """Least-squares serial fraction of Gustafson's law (closed form, clipped to [0, 1])."""
    n, s = _finite_pairs(ranks, speedups)
    x = n - 1.0
    if not np.any(x > 0):
        return float("nan")
    # S = N - s x  =>  N - S = s x: a line through the origin.
    return float(np.clip(np.sum(x * (n - s)) / np.sum(x * x), 0.0, 1.0))


def karp_flatt(speedup, n):
    """Karp-Flatt experimentally determined serial fraction ``e = (1/S - 1/N) / (1 - 1/N)``.

    If ``e`` stays flat as ``N`` grows, a fixed serial part limits the
    speed-up (Amdahl); if it rises, parallel overhead (communication,
    imbalance, contention) grows with ``N``. Undefined (NaN) at ``N = 1``.

    Parameters
    ----------
    speedup, n : float or array_like

    Returns
    -------
    float or ndarray

    Examples
    --------
    >>> karp_flatt(1.6, 2)
    0.25
    """
    s, n = np.asarray(speedup, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.where(n > 1, (1.0 / s - 1.0 / n) / (1.0 - 1.0 / n), np.nan)
    return float(e) if e.ndim == 0 else e


def _finite_pairs(ranks, speedups):
    """The (N, S) pairs a fit can use: finite, N >= 1 and S > 0."""
    n, s = np.asarray(ranks, dtype=float), np.asarray(speedups, dtype=float)
    ok = np.isfinite(n) & np.isfinite(s) & (n >= 1) & (s > 0)
    return n[ok], s[ok]
