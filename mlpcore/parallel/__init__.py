"""Where workers run and how they are timed: knows nothing of models.

- :mod:`~mlpcore.parallel.launchers` - MPI, joblib and serial launchers behind one interface.
- :mod:`~mlpcore.parallel.blas` - cores and BLAS threads per worker (threadpoolctl).
- :mod:`~mlpcore.parallel.watchdog` - the stall watchdog (``--stall-timeout``).
- :mod:`~mlpcore.parallel.timing` - phase spans on one clock.
"""
