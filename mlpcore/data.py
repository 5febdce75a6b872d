"""Loading, checking, downloading and splitting the MNIST data set.

Every problem with a data file is raised as :class:`~mlpcore.errors.DataError`
with a one-line message that names the file and the problem, so the command
line can print it without a traceback.

Where the data comes from (``load_mnist(source="auto")``), first match wins:

1. ``data``, a path given by the user: a keras-layout ``.npz`` file or a folder
   of the four original IDX files (optionally gzipped);
2. the copy shipped with the project, :data:`SHIPPED_PATH`;
3. keras' cache, ``~/.keras/datasets/mnist.npz`` (see :func:`keras_cache_path`).

The shipped copy and keras' cache claim to be canonical MNIST, so the sha256 of
each array is checked against :data:`ARRAY_SHA256`. A user's file only gets the
structural checks of :func:`validate_arrays`, since it may hold another data set
in the same layout (Fashion-MNIST, for instance).
"""

import gzip
import hashlib
import numbers
import os
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from http.client import HTTPException
from math import prod
from pathlib import Path

import numpy as np

from .errors import DataError, UsageError

__all__ = [
    "ARRAY_SHA256",
    "KERAS_FILE_SHA256",
    "KERAS_URL",
    "MNIST",
    "SHIPPED_PATH",
    "download_mnist",
    "keras_cache_path",
    "load_mnist",
    "shard_bounds",
    "to_float",
    "validate_arrays",
]

KERAS_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
# sha256 of the whole file at KERAS_URL (11,490,434 bytes).
KERAS_FILE_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
# sha256 of each canonical array's raw bytes: uint8, (60000, 28, 28), (60000,),
# (10000, 28, 28) and (10000,), C order. Files differ byte-wise when they are
# re-compressed; the arrays do not, so these are what identify MNIST.
ARRAY_SHA256 = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
SHIPPED_PATH = Path(__file__).resolve().parent.parent / "data" / "mnist.npz"
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
# The errors urlopen and reading its response raise on a failed download
# (URLError, HTTPError and timeouts are OSErrors; ValueError is a malformed URL).
_DOWNLOAD_ERRORS = (OSError, HTTPException, ValueError)
_CHUNK_BYTES = 1 << 20


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


def __getattr__(name):
    # KERAS_CACHE_PATH is computed on access (PEP 562) so that it follows $HOME.
    if name == "KERAS_CACHE_PATH":
        return keras_cache_path()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        Where the data came from, e.g. ``"/abs/data/mnist.npz (shipped copy)"``.
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


def download_mnist(
    dest=None, *, url=None, sha256=KERAS_FILE_SHA256, progress=True, timeout=60
):
    """Download ``mnist.npz`` and check its sha256 before putting it in place.

    The file is streamed into a temporary file next to ``dest`` while being
    hashed, and only renamed to ``dest`` if the hash matches, so that a failed
    or corrupt download leaves nothing behind. A ``dest`` that already holds
    a file with the expected hash is returned without downloading; one with
    another hash is replaced.

    Parameters
    ----------
    dest : str or path-like, default=None
        Where to save the file; None means keras' cache (see
        :func:`keras_cache_path`), which :func:`load_mnist` looks at.
    url : str, default=None
        Where to download from; None means ``$MLPCORE_MNIST_URL`` if set,
        else :data:`KERAS_URL`.
    sha256 : str or None, default=KERAS_FILE_SHA256
        Expected sha256 of the whole file. None skips the file check (for a
        mirror serving a re-compressed copy; pass the result to
        ``load_mnist(path, verify_checksums=True)`` to check its arrays).
    progress : bool, default=True
        Show a progress bar on stderr, if stderr is a terminal.
    timeout : float, default=60
        Seconds to wait for the server to connect or send data.

    Returns
    -------
    dest : pathlib.Path
        The path of the downloaded (or already present) file.

    Raises
    ------
    DataError
        If the download fails, the hash differs or ``dest`` is not writable.
    """
    dest = Path(dest).expanduser() if dest is not None else keras_cache_path()
    if url is None:
        url = os.environ.get("MLPCORE_MNIST_URL") or KERAS_URL
    if sha256 is not None and dest.is_file() and _file_sha256(dest) == sha256:
        return dest

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.NamedTemporaryFile(
            dir=dest.parent, prefix=f".{dest.name}.", suffix=".part", delete=False
        )
    except OSError as exc:
        raise DataError(f"cannot write the download to {dest}: {exc}") from None
    try:
        with tmp:
            got = _fetch(url, tmp, progress=progress, timeout=timeout)
        if sha256 is not None and got != sha256:
            raise DataError(
                f"{url}: sha256 mismatch of the downloaded file: expected {sha256}, "
                f"got {got}; nothing was saved to {dest}"
            )
        _install(tmp.name, dest)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a partial file behind.
        Path(tmp.name).unlink(missing_ok=True)
        raise
    return dest


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


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# --- Limits -----------------------------------------------------------------


def _is_int(value):
    # bool is an Integral, but True samples is a mistake, not 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


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


# --- Downloading ------------------------------------------------------------


def _fetch(url, f, *, progress, timeout):
    """Stream ``url`` into the open file ``f``; return the sha256 hex digest."""
    # tqdm is imported here because only downloads need it.
    from tqdm import tqdm

    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = response.headers.get("Content-Length")
            with tqdm(
                total=int(total) if total else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="downloading MNIST",
                file=sys.stderr,
                # None disables the bar when stderr is not a terminal.
                disable=None if progress else True,
            ) as bar:
                while chunk := response.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    f.write(chunk)
                    bar.update(len(chunk))
    except _DOWNLOAD_ERRORS as exc:
        raise DataError(f"cannot download {url}: {_reason(exc)}") from None
    return digest.hexdigest()


def _install(tmp_name, dest):
    """Make the complete download durable, then atomically move it to ``dest``."""
    try:
        with open(tmp_name, "rb+") as f:
            os.fsync(f.fileno())
        # NamedTemporaryFile creates the file 0600; MNIST is public, so let
        # the other users of a shared cache read it.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, dest)
    except OSError as exc:
        raise DataError(f"cannot save the download to {dest}: {exc}") from None


def _reason(exc):
    # URLError wraps the real cause (refused connection, DNS failure...).
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__
