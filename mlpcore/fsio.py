"""The one place mlpcore writes files: atomic writes and run folders.

Every file a run leaves (results.json, report.md, figures, checkpoints, a
downloaded MNIST, a scaling table) goes through :func:`atomic_write` or one of
its siblings: a temporary file in the same folder, fsynced, renamed over the
target, and the folder fsynced so that the rename itself survives a crash.
A run that is killed at any moment leaves either the previous complete file or
none, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .errors import UsageError

def _read_umask():
    """The process umask, read from /proc (setting it to read it would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


#: The mode ``open()`` would give a new file: mkstemp's are private (0600), ours
#: are readable like any other output.
FILE_MODE = 0o666 & ~_read_umask()


def fsync_dir(path):
    """Make a rename in ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path, keep_previous=None):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, else it is removed.

    Write the file under the yielded name (any writer: numpy, matplotlib, a
    download loop), then it is fsynced and renamed over ``path``.
    ``keep_previous``: move an existing ``path`` there first (checkpoints keep
    the last complete one until the new one is in place).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f"{path.suffix}.tmp")
    os.close(fd)
    try:
        os.chmod(tmp, FILE_MODE)
        yield Path(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path, data, keep_previous=None):
    """Write ``data`` (str or bytes) to ``path`` atomically (see :func:`atomic_path`).

    Where the file system can (Linux's ``O_TMPFILE``), the data is written into a
    file with no name, fsynced, and only then linked beside ``path`` and renamed
    over it: a writer SIGKILLed while writing (``mpirun`` ends the ranks of a failed
    job that way) leaves nothing, not even a temporary file. With ``keep_previous``
    (checkpoints, written all through training) the old file is moved there first and
    the new one is linked under ``path`` itself, so no temporary name exists at any
    moment. Elsewhere, as :func:`atomic_path`.
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else bytes(data)
    fd = _unnamed_file(path.parent)
    if fd is None:
        with atomic_path(path, keep_previous) as tmp:
            with open(tmp, "wb") as f:
                f.write(payload)
        return
    try:
        os.fchmod(fd, FILE_MODE)
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if keep_previous is not None:
                # The old file steps aside first, then the new one gets the target's name: never a
                # temporary name (a writer SIGKILLed between the two leaves the previous one, complete).
                if path.exists():
                    os.replace(path, keep_previous)
                _link(fd, path.name, folder)
            else:
                # Replacing in one step needs a name for a moment (link, rename: no I/O between them).
                tmp = path.parent / f".{path.stem}.{os.getpid()}.{os.urandom(4).hex()}{path.suffix}.tmp"
                _link(fd, tmp.name, folder)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    if os.path.lexists(tmp):
                        os.unlink(tmp)
                    raise
        finally:
            os.close(folder)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def _link(fd, name, folder):
    """Give the unnamed file ``fd`` the name ``name`` in the directory open as ``folder``."""
    # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: a dir fd makes Python call linkat, not link
    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=folder, follow_symlinks=True)


def _unnamed_file(folder):
    """A file descriptor of a new unnamed file in ``folder`` (``O_TMPFILE``), or None where unsupported."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.exists("/proc/self/fd"):
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY, 0o600)
    except OSError:  # EOPNOTSUPP, EISDIR (kernel or file system without it), ...
        if not os.path.isdir(folder):
            raise
        return None


def atomic_savefig(fig, path, **kwargs):
    """Save a matplotlib figure atomically, in the format ``path``'s suffix names."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or None, **kwargs)


# -- run folders -------------------------------------------------------------------
def default_run_dir(name, workers):
    """``runs/<UTC timestamp>-<name>-n<workers>``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path("runs") / f"{stamp}-{name}-n{workers}"


def prepare_run_dir(run_dir, *, reuse=False):
    """Create ``run_dir`` before any training, so a bad ``--out`` fails in a second, not after.

    ``reuse``: a non-empty folder is allowed (``--overwrite``, ``--resume``).
    Raises :class:`UsageError` when the folder cannot be used.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir}: exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not reuse:
        raise UsageError(f"--out {run_dir}: the folder exists and is not empty; "
                         "pass --overwrite to write into it, or choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(run_dir)  # an earlier, killed run's (--overwrite, --resume)
        probe = tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise UsageError(f"--out {run_dir}: cannot write there ({exc.strerror or exc})") from None
    return run_dir


def remove_stale_temp_files(run_dir):
    """Remove the temporary files of :func:`atomic_path` that a killed process left in ``run_dir``.

    A process killed while writing (SIGKILL cannot be caught) leaves its hidden
    ``.NAME.XXXX.SUFFIX.tmp``; no final file is ever torn. Looks in the folder
    and its subfolders (``checkpoints/``); returns what it removed.
    """
    removed = []
    for path in Path(run_dir).rglob(".*.tmp"):
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def discard_run_dir(run_dir):
    """After a failed run: remove temporary files left there, then the folder if the run left it empty."""
    if run_dir is None or not Path(run_dir).is_dir():
        return
    remove_stale_temp_files(run_dir)
    for sub in (Path(run_dir) / "checkpoints", Path(run_dir)):
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
