"""Downloading ``mnist.npz`` into keras' cache (or anywhere), checked and atomic.

The file is streamed into a temporary file beside its destination while being
hashed, and is put in place with :func:`mlpcore.fsio.atomic_path` (fsynced,
renamed, folder fsynced) only if the hash matches: a failed, interrupted or
corrupt download leaves nothing behind, and a file already in place is only
ever replaced by a complete, checked one.
"""

import hashlib
import os
import sys
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path

from ..errors import DataError
from ..fsio import atomic_path
from .mnist import keras_cache_path

__all__ = ["KERAS_FILE_SHA256", "KERAS_URL", "download_mnist"]

KERAS_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
# sha256 of the whole file at KERAS_URL (11,490,434 bytes).
KERAS_FILE_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"

# The errors urlopen and reading its response raise on a failed download
# (URLError, HTTPError and timeouts are OSErrors; ValueError is a malformed URL).
_DOWNLOAD_ERRORS = (OSError, HTTPException, ValueError)
_CHUNK_BYTES = 1 << 20


def download_mnist(
    dest=None, *, url=None, sha256=KERAS_FILE_SHA256, progress=True, timeout=60
):
    """Download ``mnist.npz`` and check its sha256 before putting it in place.

    The file is streamed into a temporary file next to ``dest`` while being
    hashed, and only renamed to ``dest`` (by :func:`mlpcore.fsio.atomic_path`)
    if the hash matches, so that a failed, interrupted or corrupt download
    leaves nothing behind. A ``dest`` that already holds a file with the
    expected hash is returned without downloading; one with another hash is
    replaced.

    Parameters
    ----------
    dest : str or path-like, default=None
        Where to save the file; None means keras' cache (see
        :func:`mlpcore.data.keras_cache_path`), which
        :func:`mlpcore.data.load_mnist` looks at.
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

    started = False
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # atomic_path removes the temporary file on any error, KeyboardInterrupt
        # included, and gives it fsio.FILE_MODE (not a private temp file's 0600): MNIST is
        # public, so the other users of a shared cache may read it.
        with atomic_path(dest) as tmp:
            started = True
            with open(tmp, "wb") as f:
                got = _fetch(url, f, progress=progress, timeout=timeout)
            if sha256 is not None and got != sha256:
                raise DataError(
                    f"{url}: sha256 mismatch of the downloaded file: expected "
                    f"{sha256}, got {got}; nothing was saved to {dest}"
                )
    except OSError as exc:
        action = "save the download to" if started else "write the download to"
        raise DataError(f"cannot {action} {dest}: {exc}") from None
    return dest


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


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


def _reason(exc):
    # URLError wraps the real cause (refused connection, DNS failure...).
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__
