"""BLAS threads and CPU cores: what each worker may use, pinned with threadpoolctl and recorded."""

from __future__ import annotations

import os


def affinity():
    """The CPU ids this process may run on (the affinity mask: Slurm and taskset shrink it)."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not on Linux: assume every CPU
        return set(range(os.cpu_count() or 1))


def visible_cores():
    """How many CPUs this process may run on."""
    return len(affinity())


def pin_blas_threads(n):
    """Limit every BLAS/OpenMP pool in this process to ``n`` threads; returns what it now runs with.

    The limiter is kept alive for the life of the process (threadpoolctl
    resets the pools when it is garbage-collected).
    """
    from threadpoolctl import threadpool_info, threadpool_limits

    global _blas_limiter, _pinned_threads
    _blas_limiter, _pinned_threads = threadpool_limits(limits=n), n
    return blas_threads(threadpool_info())


def repin_blas_threads():
    """Apply the last pin to BLAS pools loaded since (scikit-learn brings scipy's own OpenBLAS)."""
    if _pinned_threads is not None:
        pin_blas_threads(_pinned_threads)


_blas_limiter = None
_pinned_threads = None


def pinned_threads():
    """The threads this worker was given (the last :func:`pin_blas_threads`), else its BLAS pools' count.

    What a worker computes on, and what results.json records as its ``threads``,
    even where BLAS itself runs on the calling thread (:func:`blas_on_calling_thread`).
    """
    return _pinned_threads if _pinned_threads is not None else blas_threads()


def blas_on_calling_thread():
    """Run BLAS on one thread, keeping the worker's pin: mlpcore's own kernels take its threads.

    OpenBLAS's idle workers spin for about 0.1 s after each call (its
    ``THREAD_TIMEOUT``), on the very cores the convolution kernels' threads
    need. Measured on 2 cores, LeNet-5 at 2 threads: 5.2 s an epoch with both
    pools, 4.1 s with BLAS on one thread (``scripts/bench_cnn.py``).
    """
    from threadpoolctl import threadpool_limits

    global _blas_limiter
    _blas_limiter = threadpool_limits(limits=1, user_api="blas")


def blas_threads(info=None):
    """The largest thread count among this process's BLAS pools (1 if none is loaded)."""
    if info is None:
        from threadpoolctl import threadpool_info

        info = threadpool_info()
    counts = [pool["num_threads"] for pool in info if pool.get("user_api") == "blas"]
    return max(counts) if counts else 1
