"""Finding, reading and checking MNIST-layout data.

Every problem with a data file is raised as :class:`~mlpcore.errors.DataError`
with a one-line message that names the file and the problem, so the command
line can print it without a traceback.

Where the data comes from (``load_mnist(source="auto")``), first match wins:

1. ``data``, a path given by the user: a keras-layout ``.npz`` file or a folder
   of the four original IDX files (optionally gzipped);
2. the copy shipped inside the package, ``mlpcore/data/mnist.npz``
   (:data:`SHIPPED_PATH`, found with :mod:`importlib.resources`, so that an
   installed wheel finds its own copy);
3. keras' cache, ``~/.keras/datasets/mnist.npz`` (see :func:`keras_cache_path`).

The shipped copy and keras' cache claim to be canonical MNIST, so the sha256 of
each array is checked against :data:`ARRAY_SHA256`. A user's file only gets the
structural checks of :func:`validate_arrays`, since it may hold another data set
in the same layout (Fashion-MNIST, for instance).

:data:`SHIPPED_PATH` is read from this module when :func:`load_mnist` runs, so
patch ``mlpcore.data.mnist.SHIPPED_PATH`` (not the re-export in
:mod:`mlpcore.data`) to hide or replace the shipped copy.
"""

import gzip
import hashlib
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from math import prod
from pathlib import Path

import numpy as np

from ..errors import DataError, UsageError
from .shards import _is_int

__all__ = [
    "ARRAY_SHA256",
    "IDX_FILES",
    "IMAGE_SHAPE",
    "KEYS",
    "MNIST",
    "N_CLASSES",
    "N_FEATURES",
    "SHIPPED_PATH",
    "keras_cache_path",
    "load_mnist",
    "validate_arrays",
]

# sha256 of each canonical array's raw bytes: uint8, (60000, 28, 28), (60000,),
# (10000, 28, 28) and (10000,), C order. Files differ byte-wise when they are
# re-compressed; the arrays do not, so these are what identify MNIST.
ARRAY_SHA256 = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}


def _shipped_path():
    """The package's own ``mnist.npz``, as a file-system path.

    A regular install (a wheel, an editable install, the checkout) keeps the
    package on disk, so the resource is a real file. A package imported from a
    zip archive has none; the path returned then does not exist and
    :func:`load_mnist` moves on to keras' cache.
    """
    resource = resources.files("mlpcore.data") / "mnist.npz"
    try:
        return Path(os.fspath(resource)).resolve()
    except TypeError:  # not on the file system (zipimport): no usable copy
        return Path(str(resource))


SHIPPED_PATH = _shipped_path()
KERAS_LOADER = "tf.keras.datasets.mnist.load_data()"

KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SHAPE = (28, 28)
N_FEATURES = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
N_CLASSES = 10

# Base names of the original MNIST files (http://yann.lecun.com/exdb/mnist/).
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
# An IDX magic number is 0x08 (unsigned byte data) << 8 | number of dimensions.
IDX_MAGIC = {3: 2051, 1: 2049}

# The errors np.load and zipfile raise on a damaged archive.
_NPZ_READ_ERRORS = (zipfile.BadZipFile, ValueError, EOFError, OSError, zlib.error)


def keras_cache_path():
    """Return where keras caches ``mnist.npz``, as of now.

    Like keras, honour ``$KERAS_HOME`` and else use ``~/.keras``; it is looked
    up at call time so that a changed ``$HOME`` is respected.

    Returns
    -------
    path : pathlib.Path
        ``$KERAS_HOME/datasets/mnist.npz`` or ``~/.keras/datasets/mnist.npz``.
    """
    keras_home = os.environ.get("KERAS_HOME") or Path.home() / ".keras"
    return Path(keras_home) / "datasets" / "mnist.npz"



@dataclass(frozen=True, eq=False)
class MNIST:
    """MNIST-layout data, checked and ready to use.

    Attributes
    ----------
    x_train : ndarray of shape (n_train, 784), dtype uint8
        Training images, flattened row by row, C-contiguous.
    y_train : ndarray of shape (n_train,), dtype uint8
        Training labels in 0..9.
    x_test : ndarray of shape (n_test, 784), dtype uint8
        Test images, flattened row by row, C-contiguous.
    y_test : ndarray of shape (n_test,), dtype uint8
        Test labels in 0..9.
    origin : str
        Where the data came from, e.g. ``"/abs/mlpcore/data/mnist.npz (shipped copy)"``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    origin: str

    @property
    def n_train(self):
        """Number of training samples."""
        return self.x_train.shape[0]

    @property
    def n_test(self):
        """Number of test samples."""
        return self.x_test.shape[0]

    @property
    def n_features(self):
        """Number of pixels per image (784)."""
        return self.x_train.shape[1]

    def __repr__(self):
        return (
            f"MNIST(n_train={self.n_train}, n_test={self.n_test}, "
            f"origin={self.origin!r})"
        )


def load_mnist(
    data=None,
    *,
    source="auto",
    train_limit=None,
    test_limit=None,
    verify_checksums=None,
):
    """Load MNIST-layout data, check it and optionally keep the first samples.

    Parameters
    ----------
    data : str or path-like, default=None
        A keras-layout ``.npz`` file (keys ``x_train``, ``y_train``,
        ``x_test``, ``y_test``) or a folder holding the four original IDX
        files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each possibly
        ending in ``.gz``; an uncompressed file is preferred to its ``.gz``).
        If None, use :data:`SHIPPED_PATH` if it exists, else keras' cache.
    source : {"auto", "keras"}, default="auto"
        ``"auto"`` reads files as described for ``data``; ``"keras"`` calls
        ``tf.keras.datasets.mnist.load_data()``, which needs TensorFlow and
        may download the file.
    train_limit, test_limit : int, default=None
        Keep only the first ``train_limit`` training / ``test_limit`` test
        samples. None keeps all of them.
    verify_checksums : bool, default=None
        Whether to check every array against :data:`ARRAY_SHA256`. None
        checks the shipped copy, keras' cache and ``source="keras"``, which
        all claim to be canonical MNIST, but not a user's ``data``.

    Returns
    -------
    mnist : MNIST
        Flattened uint8 images and uint8 labels, and their origin.

    Raises
    ------
    DataError
        If no data is found, a file is unreadable, the arrays are not valid
        MNIST layout, a checksum differs, or a limit exceeds the samples.
    UsageError
        If ``source`` is unknown, ``data`` is combined with
        ``source="keras"``, or a limit is not a positive integer.
    """
    _check_limit("train_limit", train_limit)
    _check_limit("test_limit", test_limit)
    if source == "keras":
        if data is not None:
            raise UsageError(
                "source='keras' downloads MNIST through TensorFlow and takes no "
                f"data path; got data={str(data)!r}"
            )
        arrays = _load_from_keras()
        where = origin = KERAS_LOADER
        canonical = True
    elif source == "auto":
        path, origin, canonical = _resolve_path(data)
        where = str(path)
        arrays = _read_idx_folder(path) if path.is_dir() else _read_npz(path)
    else:
        raise UsageError(f"unknown data source {source!r}; use 'auto' or 'keras'")

    arrays = validate_arrays(*arrays, where)
    if verify_checksums is None:
        verify_checksums = canonical
    if verify_checksums:
        _check_array_sha256(arrays, where)
    x_train, y_train, x_test, y_test = arrays
    x_train, y_train = _first(x_train, y_train, train_limit, "train", where)
    x_test, y_test = _first(x_test, y_test, test_limit, "test", where)
    return MNIST(x_train, y_train, x_test, y_test, origin)


def validate_arrays(x_train, y_train, x_test, y_test, origin):
    """Check MNIST-layout arrays and return them flattened as uint8.

    Each split is checked in this order: images are 3-D ``(n, 28, 28)`` or
    2-D ``(n, 784)``; labels are 1-D with one label per image; the split is
    not empty; float images hold no NaN or inf; images are uint8, or of an
    integer dtype with every value in 0..255; labels are integers in 0..9.

    Parameters
    ----------
    x_train, x_test : ndarray of shape (n, 28, 28) or (n, 784)
        Images.
    y_train, y_test : ndarray of shape (n,)
        Labels.
    origin : str
        Where the arrays come from (a file name); it starts every message.

    Returns
    -------
    x_train, y_train, x_test, y_test : ndarray
        Images as C-contiguous uint8 arrays of shape ``(n, 784)`` and labels
        as uint8 arrays of shape ``(n,)``. Arrays that already have that form
        are returned as views, not copies.

    Raises
    ------
    DataError
        On the first problem found, naming ``origin``, the array and the
        problem.
    """
    x_train, y_train = _validate_split(x_train, y_train, "train", origin)
    x_test, y_test = _validate_split(x_test, y_test, "test", origin)
    return x_train, y_train, x_test, y_test



# --- Finding and reading files ---------------------------------------------


def _resolve_path(data):
    """Return ``(path, origin, canonical)`` of the file or folder to read."""
    if data is not None:
        path = Path(data).expanduser().absolute()
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        kind = "IDX folder" if path.is_dir() else "npz file"
        return path, f"{path} ({kind})", False

    cache = keras_cache_path()
    candidates = [(SHIPPED_PATH, "shipped copy"), (cache, "keras cache")]
    for path, kind in candidates:
        if path.exists():
            return path, f"{path} ({kind})", True
    tried = ", ".join(f"{path} ({kind})" for path, kind in candidates)
    raise DataError(
        f"no MNIST data found; tried {tried}; run with --download to fetch it "
        "or pass --data PATH"
    )


def _read_npz(path):
    """Read the four arrays of a keras-layout npz file (not yet validated)."""
    _check_not_empty(path)
    try:
        with open(path, "rb") as f:
            signature = f.read(4)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file: {exc}") from None
    # An npz is a zip archive; checking first gives a clear message for text
    # files, .npy files and IDX files passed by mistake.
    if signature not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise DataError(
            f"{path}: not an .npz file (no zip signature); expected a keras-layout "
            "mnist.npz or a folder of the four MNIST IDX files"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in KEYS if key not in npz.files]
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {', '.join(missing)}; found "
                    f"{', '.join(npz.files) or 'no arrays'}; expected "
                    f"{', '.join(KEYS)}"
                )
            return tuple(_read_npz_array(npz, key, path) for key in KEYS)
    except _NPZ_READ_ERRORS as exc:
        raise DataError(f"{path}: corrupt or truncated .npz file: {exc}") from None


def _read_npz_array(npz, key, path):
    try:
        return npz[key]
    except ValueError as exc:
        # numpy's message for object arrays mentions allow_pickle; loading
        # them would run arbitrary pickled code, so they are refused.
        if "allow_pickle" in str(exc):
            raise DataError(
                f"{path}: {key} is a pickled object array, which is not loaded "
                "for safety; store it as a plain uint8 array"
            ) from None
        raise DataError(f"{path}: cannot read {key}: {exc}") from None


def _read_idx_folder(folder):
    """Read the four IDX files of the original MNIST distribution."""
    paths = {key: _find_idx_file(folder, name) for key, name in IDX_FILES.items()}
    missing = [IDX_FILES[key] + "[.gz]" for key, path in paths.items() if path is None]
    if missing:
        raise DataError(
            f"{folder}: not an MNIST folder: missing {', '.join(missing)}; "
            "expected the four IDX files or pass a keras-layout .npz file"
        )
    return tuple(
        _read_idx(paths[key], ndim=3 if key.startswith("x") else 1) for key in KEYS
    )


def _find_idx_file(folder, name):
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path, ndim):
    """Parse one IDX file of unsigned bytes with ``ndim`` dimensions."""
    raw = _read_maybe_gzipped(path)
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(
            f"{path}: truncated IDX header ({len(raw)} bytes, expected {header_size})"
        )
    magic, *dims = struct.unpack(f">{1 + ndim}I", raw[:header_size])
    if magic != IDX_MAGIC[ndim]:
        kind = "images" if ndim == 3 else "labels"
        raise DataError(
            f"{path}: bad IDX magic number {magic}; expected {IDX_MAGIC[ndim]} "
            f"for MNIST {kind}"
        )
    n_bytes = len(raw) - header_size
    if n_bytes != prod(dims):
        raise DataError(
            f"{path}: the IDX header announces shape {tuple(dims)}, that is "
            f"{prod(dims)} bytes of data, but the file holds {n_bytes}"
        )
    # bytearray keeps the result writable, like arrays read from an npz.
    return np.frombuffer(bytearray(raw), np.uint8, offset=header_size).reshape(dims)


def _read_maybe_gzipped(path):
    _check_not_empty(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read the file: {exc}") from None


def _check_not_empty(path):
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file: {exc}") from None
    if size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes)")


def _load_from_keras():
    """Return the four arrays of ``tf.keras.datasets.mnist.load_data()``."""
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise DataError(
            f"source='keras' needs TensorFlow, which cannot be imported ({exc}); "
            "install it with `pip install -e .[keras]`, or use the shipped copy "
            "(source='auto')"
        ) from None
    try:
        (x_train, y_train), (x_test, y_test) = tf.keras.datasets.mnist.load_data()
    except Exception as exc:  # keras' get_file raises bare Exception on failure
        raise DataError(f"{KERAS_LOADER} failed: {exc}") from None
    return x_train, y_train, x_test, y_test


# --- Checking arrays --------------------------------------------------------


def _validate_split(x, y, split, origin):
    """Check one split's images and labels; return them normalised."""
    x_name, y_name = f"x_{split}", f"y_{split}"
    for name, arr in ((x_name, x), (y_name, y)):
        if not isinstance(arr, np.ndarray):
            raise DataError(
                f"{origin}: {name} is a {type(arr).__name__}, not a numpy array"
            )

    if not (x.ndim == 3 and x.shape[1:] == IMAGE_SHAPE) and not (
        x.ndim == 2 and x.shape[1] == N_FEATURES
    ):
        raise DataError(
            f"{origin}: {x_name} has shape {x.shape}; expected (n, 28, 28) or (n, 784)"
        )
    if y.ndim != 1:
        raise DataError(f"{origin}: {y_name} has shape {y.shape}; expected (n,)")
    if len(y) != len(x):
        raise DataError(
            f"{origin}: {x_name} has {len(x)} images but {y_name} has {len(y)} labels"
        )
    if len(x) == 0:
        raise DataError(f"{origin}: the {split} split is empty")

    # dtype kinds, not np.issubdtype: numpy counts timedelta64 as an integer.
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{origin}: {x_name} contains NaN or inf pixels")
    if x.dtype.kind not in "iu":
        raise DataError(
            f"{origin}: {x_name} has dtype {x.dtype}; expected uint8 pixels in 0..255"
        )
    if x.dtype != np.uint8 and (x.min() < 0 or x.max() > 255):
        raise DataError(
            f"{origin}: {x_name} has pixels in {x.min()}..{x.max()}; expected 0..255"
        )
    if y.dtype.kind not in "iu":
        raise DataError(
            f"{origin}: {y_name} has dtype {y.dtype}; expected integer labels in 0..9"
        )
    bad = (y < 0) | (y >= N_CLASSES)
    if bad.any():
        values = np.unique(y[bad])
        shown = ", ".join(str(v) for v in values[:5])
        if len(values) > 5:
            shown += ", ..."
        raise DataError(
            f"{origin}: {y_name} holds labels outside 0..9: {shown} "
            f"({np.count_nonzero(bad)} samples)"
        )

    x = np.ascontiguousarray(x.reshape(len(x), N_FEATURES), dtype=np.uint8)
    return x, y.astype(np.uint8, copy=False)


def _check_array_sha256(arrays, where):
    """Check the four validated arrays against ARRAY_SHA256.

    The validated arrays have the same bytes as the canonical (n, 28, 28)
    uint8 arrays, since flattening a C-contiguous array does not move data.
    """
    for key, arr in zip(KEYS, arrays, strict=True):
        expected = ARRAY_SHA256[key]
        got = hashlib.sha256(arr).hexdigest()
        if got != expected:
            raise DataError(
                f"{where}: {key} sha256 mismatch: expected {expected}, got {got}; "
                "the file is corrupt or not canonical MNIST"
            )


# --- Limits -----------------------------------------------------------------


def _check_limit(name, limit):
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise UsageError(f"{name} must be a positive integer, got {limit!r}")


def _first(x, y, limit, split, where):
    """Keep the first ``limit`` samples of the split "train" or "test"."""
    if limit is None:
        return x, y
    if limit > len(x):
        samples = "training" if split == "train" else "test"
        raise DataError(
            f"{split}_limit {limit} exceeds the {len(x)} {samples} samples in {where}"
        )
    # Copy so that a small subset does not keep the full arrays in memory.
    return x[:limit].copy(), y[:limit].copy()

