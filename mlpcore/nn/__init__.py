"""The neural networks, knowing nothing of distribution.

- :mod:`~mlpcore.nn.layers` - the layer contract (:class:`Slot`, :class:`Layer`) and the layers.
- :mod:`~mlpcore.nn.model` - :class:`Sequential` on flat parameter buffers, :func:`build_model`.
- :mod:`~mlpcore.nn.optim` - Adam.
- :mod:`~mlpcore.nn.kernels` - the elementwise work, numpy reference and numba loops.
- :mod:`~mlpcore.nn.fpenv` - flushing denormal floats while training.
- :mod:`~mlpcore.nn.train` - the training loop every strategy shares.
"""
