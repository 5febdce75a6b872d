"""Splitting samples among workers and scaling pixels to floats.

:func:`shard_bounds` gives every launcher the same split of the training set
and :func:`to_float` the one pixel scaling, so that every process computes
bitwise-identical inputs.
"""

import numbers

import numpy as np

from ..errors import UsageError

__all__ = ["shard_bounds", "to_float"]


def shard_bounds(n, parts):
    """Return the offsets that split ``n`` samples into ``parts`` shards.

    Shard ``i`` is ``bounds[i]:bounds[i + 1]``. The sizes are those of
    ``np.array_split``: the first ``n % parts`` shards get one sample more.

    Parameters
    ----------
    n : int
        Number of samples, >= 0.
    parts : int
        Number of shards (e.g. MPI ranks), 1 <= parts <= n.

    Returns
    -------
    bounds : ndarray of shape (parts + 1,), dtype int64
        Increasing offsets, ``bounds[0] == 0`` and ``bounds[-1] == n``.

    Raises
    ------
    UsageError
        If ``parts`` < 1 or ``parts`` > ``n``, which would leave a shard
        empty.
    """
    if not _is_int(n) or n < 0:
        raise UsageError(f"the number of samples must be an integer >= 0, got {n!r}")
    if not _is_int(parts) or parts < 1:
        raise UsageError(f"the number of shards must be an integer >= 1, got {parts!r}")
    if parts > n:
        raise UsageError(
            f"cannot split {n} training samples into {parts} shards; "
            "use fewer ranks or a larger --train-limit"
        )
    size, extra = divmod(int(n), int(parts))
    i = np.arange(parts + 1, dtype=np.int64)
    return i * size + np.minimum(i, extra)


def to_float(x, dtype=np.float32, out=None):
    """Scale uint8 pixels to [0, 1] as ``x * dtype(1 / 255)``.

    This is the one scaling used everywhere, so that every process computes
    bitwise-identical inputs. It can differ from ``x / 255`` in the last bit.

    Parameters
    ----------
    x : ndarray of dtype uint8
        Pixels in 0..255.
    dtype : floating dtype, default=np.float32
        The dtype of the result and of the arithmetic.
    out : ndarray of dtype ``dtype`` and the shape of ``x``, default=None
        Where to write the result, to avoid allocating.

    Returns
    -------
    out : ndarray of dtype ``dtype``
        The scaled pixels (``out`` itself if given).
    """
    dtype = np.dtype(dtype)
    if x.dtype != np.uint8:
        raise ValueError(f"to_float expects uint8 pixels, got dtype {x.dtype}")
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"to_float needs a floating dtype, got {dtype}")
    if out is not None and out.dtype != dtype:
        raise ValueError(f"out has dtype {out.dtype}, expected {dtype}")
    return np.multiply(x, dtype.type(1 / 255), out=out, dtype=dtype)


def _is_int(value):
    # bool is an Integral, but True samples is a mistake, not 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
