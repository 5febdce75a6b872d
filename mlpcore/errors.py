"""Exceptions whose message is meant for the user, not a traceback."""


class MlpcoreError(Exception):
    """Base class of every error mlpcore raises on purpose."""


class UsageError(MlpcoreError):
    """Bad input from the user (options, files, sizes): the CLI exits with status 2."""


class DataError(UsageError):
    """A data file is missing, unreadable or does not hold valid MNIST-layout arrays."""
