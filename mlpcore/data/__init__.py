"""The data wing: MNIST found, read, checked, downloaded and split.

Modules, one concern each:

- :mod:`mlpcore.data.mnist` - finding the data (a user's path, the shipped
  copy, keras' cache), reading it (keras-layout ``.npz``, folders of IDX files,
  TensorFlow's loader) and validating it (:func:`load_mnist`,
  :func:`validate_arrays`, :class:`MNIST`).
- :mod:`mlpcore.data.download` - :func:`download_mnist`: a checked, atomic
  download into keras' cache.
- :mod:`mlpcore.data.shards` - :func:`shard_bounds` and :func:`to_float`: the
  split among workers and the one pixel scaling.

``mnist.npz`` (the canonical arrays, see ``README.md`` beside it) ships inside
this package as package data; :data:`SHIPPED_PATH` is where it was found.

Every problem with a data file is raised as :class:`~mlpcore.errors.DataError`
with a one-line message. From mlpcore this wing imports only
:mod:`mlpcore.errors` and :mod:`mlpcore.fsio`.
"""

from .download import KERAS_FILE_SHA256, KERAS_URL, download_mnist
from .mnist import (
    ARRAY_SHA256,
    IDX_FILES,
    IMAGE_SHAPE,
    KEYS,
    MNIST,
    N_CLASSES,
    N_FEATURES,
    SHIPPED_PATH,
    keras_cache_path,
    load_mnist,
    validate_arrays,
)
from .shards import shard_bounds, to_float

__all__ = [
    "ARRAY_SHA256",
    "IDX_FILES",
    "IMAGE_SHAPE",
    "KERAS_FILE_SHA256",
    "KERAS_URL",
    "KEYS",
    "MNIST",
    "N_CLASSES",
    "N_FEATURES",
    "SHIPPED_PATH",
    "download_mnist",
    "keras_cache_path",
    "load_mnist",
    "shard_bounds",
    "to_float",
    "validate_arrays",
]


def __getattr__(name):
    # KERAS_CACHE_PATH is computed on access (PEP 562) so that it follows $HOME.
    if name == "KERAS_CACHE_PATH":
        return keras_cache_path()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
