"""Tests of mlpcore.data (mnist, download, shards): real files in tmp_path and a real local HTTP server."""

import ast
import functools
import gzip
import hashlib
import http.server
import shutil
import socket
import struct
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mlpcore import data
from mlpcore.data import download as data_download
from mlpcore.data import mnist as data_mnist
from mlpcore.data import (
    MNIST,
    download_mnist,
    load_mnist,
    shard_bounds,
    to_float,
    validate_arrays,
)
from mlpcore.errors import DataError, UsageError
from mlpcore.fsio import FILE_MODE

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
# load_mnist reads SHIPPED_PATH from mlpcore.data.mnist at call time: tests patch it there.
SHIPPED = data_mnist.SHIPPED_PATH  # kept before any test hides it


# --- Fixtures and helpers ---------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    """The shipped copy, loaded once for the module."""
    return load_mnist()


def small_arrays(n_train=12, n_test=5, seed=0):
    """Valid keras-layout arrays, small and random."""
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def small_npz(tmp_path):
    return save_npz(tmp_path / "small.npz", **small_arrays())


@pytest.fixture
def no_default_data(monkeypatch, tmp_path):
    """Hide the shipped copy and point $HOME to an empty folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("KERAS_HOME", raising=False)
    monkeypatch.setattr(data_mnist, "SHIPPED_PATH", tmp_path / "absent" / "mnist.npz")
    return home


def assert_data_error(match, func, *args, **kwargs):
    """Call func, expect a one-line DataError matching ``match``."""
    with pytest.raises(DataError, match=match) as info:
        func(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- The shipped copy -------------------------------------------------------


def test_shipped_copy_loads(mnist):
    assert mnist.x_train.shape == (60000, 784)
    assert mnist.x_test.shape == (10000, 784)
    assert (mnist.n_train, mnist.n_test, mnist.n_features) == (60000, 10000, 784)
    for arr in (mnist.x_train, mnist.y_train, mnist.x_test, mnist.y_test):
        assert arr.dtype == np.uint8
        assert arr.flags.c_contiguous
    assert np.bincount(mnist.y_train).tolist() == TRAIN_COUNTS
    assert np.bincount(mnist.y_test).tolist() == TEST_COUNTS
    assert mnist.origin == f"{SHIPPED} (shipped copy)"
    assert "n_train=60000" in repr(mnist)


def test_shipped_copy_is_package_data():
    # Found with importlib.resources, so an installed wheel finds its own copy.
    assert SHIPPED == (Path(data.__file__).resolve().parent / "mnist.npz")
    assert SHIPPED.is_file()
    assert data.SHIPPED_PATH == SHIPPED
    assert (SHIPPED.parent / "README.md").is_file()


def test_the_data_wing_imports_only_errors_and_fsio_from_mlpcore():
    allowed = {"errors", "fsio"}
    problems = []
    for path in sorted(Path(data.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                names = [node.module] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if not node.module.startswith("mlpcore"):
                    continue
                parts = node.module.split(".")
                if parts[:2] == ["mlpcore", "data"]:
                    continue
                names = [parts[1] if len(parts) > 1 else "(mlpcore itself)"]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names
                         if a.name.startswith("mlpcore.") and not a.name.startswith("mlpcore.data")]
            else:
                continue
            problems += [f"{path.name}: {n}" for n in names if n.split(".")[0] not in allowed]
    assert not problems, problems


def test_limits_take_the_first_samples(mnist):
    small = load_mnist(train_limit=100, test_limit=7)
    assert small.x_train.shape == (100, 784) and small.y_test.shape == (7,)
    np.testing.assert_array_equal(small.x_train, mnist.x_train[:100])
    np.testing.assert_array_equal(small.y_train, mnist.y_train[:100])
    np.testing.assert_array_equal(small.x_test, mnist.x_test[:7])
    np.testing.assert_array_equal(small.y_test, mnist.y_test[:7])
    full = load_mnist(train_limit=60000, test_limit=10000)
    assert (full.n_train, full.n_test) == (60000, 10000)


@pytest.mark.parametrize("limit", [0, -5, 1.5, True, "10"])
def test_limit_must_be_a_positive_integer(limit):
    with pytest.raises(UsageError, match="train_limit must be a positive integer"):
        load_mnist(train_limit=limit)


def test_limit_larger_than_the_data(small_npz):
    msg = assert_data_error(
        "train_limit 70000 exceeds the 12 training samples in", load_mnist,
        small_npz, train_limit=70000,
    )
    assert str(small_npz) in msg
    assert_data_error("test_limit 6 exceeds the 5 test samples", load_mnist,
                      small_npz, test_limit=6)


def test_user_npz_is_not_checksummed(small_npz):
    # Another data set in the same layout (e.g. Fashion-MNIST) must load.
    m = load_mnist(small_npz)
    np.testing.assert_array_equal(m.x_train, small_arrays()["x_train"].reshape(12, 784))
    assert m.origin == f"{small_npz} (npz file)"
    assert_data_error("x_train sha256 mismatch", load_mnist, small_npz,
                      verify_checksums=True)


def test_checksum_mismatch_of_a_shipped_like_copy(tmp_path, monkeypatch):
    with np.load(SHIPPED) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["x_test"][123, 4, 5] ^= 1  # a single bit
    modified = save_npz(tmp_path / "mnist.npz", **arrays)
    monkeypatch.setattr(data_mnist, "SHIPPED_PATH", modified)
    msg = assert_data_error(
        "x_test sha256 mismatch: expected 6d87418d.*; the file is corrupt or not "
        "canonical MNIST", load_mnist,
    )
    assert str(modified) in msg
    # The check runs before limits, so a limit does not hide the change.
    assert_data_error("x_test sha256 mismatch", load_mnist, test_limit=10)
    # A user path is only checked structurally.
    assert load_mnist(modified).n_test == 10000


# --- Finding the data -------------------------------------------------------


def keras_cache_in(home):
    cache = home / ".keras" / "datasets" / "mnist.npz"
    cache.parent.mkdir(parents=True)
    return cache


def test_keras_cache_fallback(no_default_data):
    cache = keras_cache_in(no_default_data)
    shutil.copy(SHIPPED, cache)
    assert data.KERAS_CACHE_PATH == cache
    m = load_mnist(test_limit=3)
    assert m.origin == f"{cache} (keras cache)"
    assert (m.n_train, m.n_test) == (60000, 3)


def test_keras_cache_is_checksummed(no_default_data, small_npz):
    # The cache claims to be canonical MNIST, so other arrays are refused.
    cache = keras_cache_in(no_default_data)
    shutil.copy(small_npz, cache)
    msg = assert_data_error("x_train sha256 mismatch", load_mnist)
    assert str(cache) in msg


def test_keras_home_is_honoured(no_default_data, monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert data.keras_cache_path() == tmp_path / "kh" / "datasets" / "mnist.npz"


def test_no_data_anywhere(no_default_data):
    msg = assert_data_error("no MNIST data found", load_mnist)
    assert str(data_mnist.SHIPPED_PATH) in msg
    assert str(no_default_data / ".keras" / "datasets" / "mnist.npz") in msg
    assert "--download" in msg and "--data PATH" in msg


def test_missing_user_path(tmp_path):
    assert_data_error(f"{tmp_path / 'nope.npz'}: no such file", load_mnist,
                      tmp_path / "nope.npz")


def test_keras_source_without_tensorflow(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes the import fail
    msg = assert_data_error("needs TensorFlow", load_mnist, source="keras")
    assert "pip install -e .[keras]" in msg


def test_bad_source_options(small_npz):
    with pytest.raises(UsageError, match="unknown data source"):
        load_mnist(source="torch")
    with pytest.raises(UsageError, match="takes no data path"):
        load_mnist(small_npz, source="keras")


# --- File-level errors ------------------------------------------------------


def test_empty_file(tmp_path):
    path = tmp_path / "empty.npz"
    path.touch()
    assert_data_error(f"{path}: the file is empty", load_mnist, path)


def test_truncated_npz(tmp_path):
    raw = SHIPPED.read_bytes()
    path = tmp_path / "half.npz"
    path.write_bytes(raw[: len(raw) // 2])
    assert_data_error(f"{path}: corrupt or truncated .npz file", load_mnist, path)


def test_corrupt_bytes_in_npz(tmp_path, small_npz):
    raw = bytearray(small_npz.read_bytes())
    raw[2000:2100] = bytes(b ^ 0xFF for b in raw[2000:2100])  # inside x_train
    path = tmp_path / "corrupt.npz"
    path.write_bytes(raw)
    assert_data_error(f"{path}: corrupt or truncated .npz file", load_mnist, path)


def test_corrupt_compressed_npz(tmp_path):
    path = tmp_path / "corrupt.npz"
    np.savez_compressed(path, **small_arrays(n_train=200))
    raw = bytearray(path.read_bytes())
    raw[3000:3050] = bytes(50)
    path.write_bytes(raw)
    assert_data_error(f"{path}: corrupt or truncated .npz file", load_mnist, path)


@pytest.mark.parametrize(
    "content", [b"x_train,y_train\n1,2\n", b"\x93NUMPY not an npz", b"PK"]
)
def test_not_an_npz(tmp_path, content):
    path = tmp_path / "mnist.npz"
    path.write_bytes(content)
    assert_data_error(f"{path}: not an .npz file", load_mnist, path)


def test_pickled_object_array_is_refused(tmp_path):
    arrays = small_arrays()
    arrays["y_train"] = np.array([object()] * 12, dtype=object)
    path = save_npz(tmp_path / "pickled.npz", **arrays)
    assert_data_error(f"{path}: y_train is a pickled object array", load_mnist, path)


def test_missing_keys(tmp_path):
    arrays = small_arrays()
    path = save_npz(tmp_path / "keys.npz", images=arrays["x_train"],
                    y_train=arrays["y_train"], x_test=arrays["x_test"])
    msg = assert_data_error(f"{path}: missing array\\(s\\) x_train, y_test", load_mnist,
                            path)
    assert "found images, y_train, x_test" in msg


def test_bad_arrays_in_a_file(tmp_path):
    arrays = small_arrays()
    arrays["x_test"] = arrays["x_test"].reshape(5, 784, 1)
    path = save_npz(tmp_path / "shape.npz", **arrays)
    assert_data_error(f"{path}: x_test has shape \\(5, 784, 1\\)", load_mnist, path)


# --- Array validation -------------------------------------------------------


def bad(**changes):
    arrays = small_arrays()
    arrays.update(changes)
    return arrays


@pytest.mark.parametrize(
    "arrays, match",
    [
        (bad(x_train=np.zeros((12, 28, 27), np.uint8)),
         r"x_train has shape \(12, 28, 27\)"),
        (bad(x_train=np.zeros((12, 783), np.uint8)), r"x_train has shape \(12, 783\)"),
        (bad(x_test=np.zeros(784, np.uint8)), r"x_test has shape \(784,\)"),
        (bad(y_train=np.zeros((12, 1), np.uint8)), r"y_train has shape \(12, 1\)"),
        (bad(y_test=np.zeros(4, np.uint8)), "x_test has 5 images but y_test has 4"),
        (bad(x_test=np.zeros((0, 784), np.uint8), y_test=np.zeros(0, np.uint8)),
         "the test split is empty"),
        (bad(x_train=np.full((12, 784), 0.5)),
         "x_train has dtype float64; expected uint8"),
        (bad(x_train=np.full((12, 784), np.nan, np.float32)),
         "x_train contains NaN or inf"),
        (bad(x_test=np.full((5, 784), np.inf)), "x_test contains NaN or inf pixels"),
        (bad(x_train=np.ones((12, 784), bool)), "x_train has dtype bool"),
        (bad(x_train=np.full((12, 784), "7")), "x_train has dtype <U1"),
        (bad(x_train=np.ones((12, 784), "m8[s]")),
         r"x_train has dtype timedelta64\[s\]"),
        (bad(x_train=np.full((12, 784), 256, np.int32)), r"pixels in 256\.\.256"),
        (bad(x_train=np.full((12, 784), -1, np.int16)), r"pixels in -1\.\.-1"),
        (bad(y_train=np.array([10] * 12)), "y_train holds labels outside 0..9: 10 "),
        (bad(y_test=np.array([-1, 0, 1, 2, 11])),
         "y_test holds labels outside 0..9: -1, 11"),
        (bad(y_train=np.arange(12) + 10),
         r"y_train holds labels outside 0..9: 10, 11, 12, 13, 14, \.\.\. "
         r"\(12 samples\)"),
        (bad(y_test=np.arange(5) * 1.0), "y_test has dtype float64; expected integer"),
        (bad(y_test=np.ones(5, bool)), "y_test has dtype bool; expected integer"),
        (bad(y_train=list(range(12))), "y_train is a list, not a numpy array"),
    ],
)
def test_validate_arrays_errors(arrays, match):
    msg = assert_data_error(match, validate_arrays, origin="somefile.npz", **arrays)
    assert msg.startswith("somefile.npz: ")


def test_validate_arrays_normalises():
    arrays = small_arrays()
    x_train, y_train, x_test, y_test = validate_arrays(
        arrays["x_train"].astype(np.int64),
        arrays["y_train"].astype(">i4"),
        np.asfortranarray(arrays["x_test"].reshape(5, 784)),
        arrays["y_test"],
        "f",
    )
    for x, key in ((x_train, "x_train"), (x_test, "x_test")):
        assert x.dtype == np.uint8 and x.flags.c_contiguous and x.shape[1] == 784
        np.testing.assert_array_equal(x, arrays[key].reshape(len(x), 784))
    assert y_train.dtype == y_test.dtype == np.uint8
    np.testing.assert_array_equal(y_train, arrays["y_train"])


def image_shapes(n):
    return st.sampled_from([(n, 28, 28), (n, 784)])


@st.composite
def valid_splits(draw):
    """Arrays validate_arrays must accept."""
    arrays = []
    for _ in range(2):
        n = draw(st.integers(1, 4))
        x_dtype = draw(st.sampled_from([np.uint8, np.int16, np.int64, np.uint32]))
        y_dtype = draw(st.sampled_from([np.uint8, np.int8, np.int64, np.uint64]))
        arrays.append(draw(hnp.arrays(x_dtype, draw(image_shapes(n)),
                                      elements=st.integers(0, 255))))
        arrays.append(draw(hnp.arrays(y_dtype, n, elements=st.integers(0, 9))))
    return arrays


@settings(max_examples=100, deadline=None)
@given(valid_splits())
def test_property_valid_arrays_pass(arrays):
    out = validate_arrays(*arrays, "gen")
    for got, want in zip(out, arrays, strict=True):
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want.reshape(got.shape))


PROBLEMS = ["shape", "labels_2d", "length", "empty", "nan", "float", "dtype",
            "pixel_range", "label_range", "label_dtype"]


@st.composite
def broken_splits(draw, problem):
    """Valid arrays with exactly one thing wrong, of the kind ``problem``."""
    x = draw(hnp.arrays(np.uint8, draw(image_shapes(3)), elements=st.integers(0, 255)))
    y = np.array([0, 5, 9], np.uint8)
    if problem == "shape":
        shape = draw(st.sampled_from(
            [(), (3,), (3, 27), (3, 28, 27), (3, 784, 1), (3, 28, 28, 1)]))
        x = np.zeros(shape, np.uint8)
    elif problem == "labels_2d":
        y = y.reshape(3, 1)
    elif problem == "length":
        y = np.resize(y, draw(st.integers(0, 6).filter(lambda n: n != 3)))
    elif problem == "empty":
        x, y = x[:0], y[:0]
    elif problem == "nan":
        x = x.astype(draw(st.sampled_from([np.float16, np.float32, np.float64])))
        x.flat[draw(st.integers(0, x.size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf]))
    elif problem == "float":
        x = x.astype(draw(st.sampled_from([np.float32, np.float64, np.complex64])))
    elif problem == "dtype":
        x = x.astype(draw(st.sampled_from(
            [bool, object, "U3", "S3", "M8[s]", "m8[s]"])))
    elif problem == "pixel_range":
        x = x.astype(np.int32)
        x.flat[draw(st.integers(0, x.size - 1))] = draw(
            st.one_of(st.integers(-(2**31), -1), st.integers(256, 2**31 - 1)))
    elif problem == "label_range":
        y = y.astype(np.int64)
        y[draw(st.integers(0, 2))] = draw(
            st.one_of(st.integers(-(2**63), -1), st.integers(10, 2**63 - 1)))
    else:
        y = y.astype(draw(st.sampled_from([np.float32, bool, object, "U1", "m8[D]"])))
    good = small_arrays()
    split = draw(st.sampled_from(["train", "test"]))
    good[f"x_{split}"], good[f"y_{split}"] = x, y
    return good


@pytest.mark.parametrize("problem", PROBLEMS)
def test_property_broken_arrays_raise_data_error(problem):
    # One hypothesis run per problem, so that each gets its share of examples.
    @settings(max_examples=30, deadline=None)
    @given(broken_splits(problem))
    def check(arrays):
        with pytest.raises(DataError):
            validate_arrays(origin="gen", **arrays)

    check()


# Mostly well-shaped, so that arbitrary dtypes and values reach the later checks.
any_images = hnp.arrays(hnp.scalar_dtypes(), st.one_of(
    st.sampled_from([(2, 28, 28), (2, 784), (3, 784)]),
    hnp.array_shapes(min_dims=0, max_dims=3, max_side=30),
))
any_labels = hnp.arrays(hnp.scalar_dtypes(), st.one_of(
    st.sampled_from([(2,), (3,)]), hnp.array_shapes(min_dims=0, max_dims=2, max_side=4),
))


@settings(max_examples=200, deadline=None)
@given(any_images, any_labels)
def test_property_anything_gives_data_error_or_valid_output(x, y):
    # Whatever is passed in, the outcome is a DataError or valid arrays.
    good = small_arrays()
    try:
        out = validate_arrays(x, y, good["x_test"], good["y_test"], "gen")
    except DataError:
        return
    # Only integer arrays in range may pass, and their values are kept.
    assert x.dtype.kind in "iu" and y.dtype.kind in "iu"
    np.testing.assert_array_equal(out[0], x.reshape(len(y), 784))
    np.testing.assert_array_equal(out[1], y)
    assert out[1].max() <= 9


# --- IDX folders ------------------------------------------------------------


def idx_bytes(arr, magic=None):
    magic = {3: 2051, 1: 2049}[arr.ndim] if magic is None else magic
    return struct.pack(f">{1 + arr.ndim}I", magic, *arr.shape) + arr.tobytes()


def write_idx_folder(folder, arrays, gz=False):
    folder.mkdir(exist_ok=True)
    for key, name in data.IDX_FILES.items():
        raw = idx_bytes(arrays[key])
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return folder


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_loads(tmp_path, gz):
    arrays = small_arrays()
    folder = write_idx_folder(tmp_path / "idx", arrays, gz=gz)
    m = load_mnist(folder, test_limit=4)
    np.testing.assert_array_equal(m.x_train, arrays["x_train"].reshape(12, 784))
    np.testing.assert_array_equal(m.y_train, arrays["y_train"])
    np.testing.assert_array_equal(m.y_test, arrays["y_test"][:4])
    assert m.x_train.flags.writeable
    assert m.origin == f"{folder} (IDX folder)"


def test_idx_bad_magic(tmp_path):
    arrays = small_arrays()
    folder = write_idx_folder(tmp_path / "idx", arrays)
    path = folder / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(arrays["y_train"], magic=2051))
    assert_data_error(f"{path}: bad IDX magic number 2051; expected 2049", load_mnist,
                      folder)


def test_idx_size_disagrees_with_header(tmp_path):
    folder = write_idx_folder(tmp_path / "idx", small_arrays())
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    assert_data_error(f"{path}: the IDX header announces shape \\(5, 28, 28\\)",
                      load_mnist, folder)
    path.write_bytes(b"\x00\x00\x08")
    assert_data_error(f"{path}: truncated IDX header", load_mnist, folder)


def test_idx_missing_and_corrupt_files(tmp_path):
    folder = write_idx_folder(tmp_path / "idx", small_arrays(), gz=True)
    gz = folder / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:50])
    assert_data_error(f"{gz}: cannot read the file", load_mnist, folder)
    gz.unlink()
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    assert_data_error(
        "not an MNIST folder: missing train-images-idx3-ubyte\\[.gz\\], "
        "t10k-labels-idx1-ubyte\\[.gz\\]", load_mnist, folder)


# --- Download ---------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A short poll interval makes shutdown() quick.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def sha256_of(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def served_npz(server, small_npz):
    root, base = server
    shutil.copy(small_npz, root / "mnist.npz")
    return f"{base}/mnist.npz", sha256_of(small_npz)


def test_download_success(tmp_path, served_npz):
    url, sha = served_npz
    dest = tmp_path / "cache" / "sub" / "mnist.npz"
    assert download_mnist(dest, url=url, sha256=sha) == dest  # bar off: not a tty
    assert sha256_of(dest) == sha
    assert sorted(p.name for p in dest.parent.iterdir()) == ["mnist.npz"]
    assert load_mnist(dest).n_train == 12


def test_download_is_readable_by_others(tmp_path, served_npz):
    # Written through mlpcore.fsio.atomic_path, with its FILE_MODE (not mkstemp's 0600).
    url, sha = served_npz
    dest = download_mnist(tmp_path / "mnist.npz", url=url, sha256=sha, progress=False)
    assert dest.stat().st_mode & 0o777 == FILE_MODE


def test_interrupted_download_leaves_nothing(tmp_path, served_npz, monkeypatch):
    url, sha = served_npz
    real_fetch = data_download._fetch

    def fetch_then_interrupt(url, f, **kwargs):
        real_fetch(url, f, **kwargs)  # a complete temporary file, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(data_download, "_fetch", fetch_then_interrupt)
    dest = tmp_path / "dest" / "mnist.npz"
    with pytest.raises(KeyboardInterrupt):
        download_mnist(dest, url=url, sha256=sha, progress=False)
    assert list(dest.parent.iterdir()) == []
    dest.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        download_mnist(dest, url=url, sha256=sha, progress=False)
    assert [p.name for p in dest.parent.iterdir()] == ["mnist.npz"]
    assert dest.read_bytes() == b"old"


def test_download_to_an_unwritable_place(tmp_path, served_npz):
    url, sha = served_npz
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    msg = assert_data_error("cannot write the download to", download_mnist,
                            blocker / "mnist.npz", url=url, sha256=sha, progress=False)
    assert str(blocker / "mnist.npz") in msg


def test_download_default_dest_and_env_url(no_default_data, served_npz, monkeypatch):
    url, sha = served_npz
    monkeypatch.setenv("MLPCORE_MNIST_URL", url)
    dest = download_mnist(sha256=sha, progress=False)
    assert dest == no_default_data / ".keras" / "datasets" / "mnist.npz"
    assert sha256_of(dest) == sha


def test_download_checksum_mismatch_leaves_nothing(tmp_path, served_npz):
    url, _ = served_npz
    dest_dir = tmp_path / "dest"
    msg = assert_data_error("sha256 mismatch of the downloaded file: expected 0{64}",
                            download_mnist, dest_dir / "mnist.npz", url=url,
                            sha256="0" * 64, progress=False)
    assert url in msg
    assert list(dest_dir.iterdir()) == []


def test_download_replaces_a_bad_file_only_on_success(tmp_path, served_npz):
    url, sha = served_npz
    dest = tmp_path / "mnist.npz"
    dest.write_bytes(b"old")
    with pytest.raises(DataError):
        download_mnist(dest, url=url, sha256="0" * 64, progress=False)
    assert dest.read_bytes() == b"old"
    download_mnist(dest, url=url, sha256=sha, progress=False)
    assert sha256_of(dest) == sha


def test_download_404(tmp_path, server):
    _, base = server
    url = f"{base}/missing.npz"
    assert_data_error(f"cannot download {url}: HTTP 404", download_mnist,
                      tmp_path / "mnist.npz", url=url, progress=False)
    assert list(tmp_path.glob("*mnist.npz*")) == []


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist.npz"


def test_download_unreachable(tmp_path):
    url = closed_port_url()
    assert_data_error(f"cannot download {url}: .*refused", download_mnist,
                      tmp_path / "mnist.npz", url=url, progress=False, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_download_keeps_an_existing_good_file(tmp_path, small_npz):
    dest = tmp_path / "mnist.npz"
    shutil.copy(small_npz, dest)
    # The URL is unreachable, so any download attempt would fail.
    got = download_mnist(dest, url=closed_port_url(), sha256=sha256_of(small_npz),
                         progress=False)
    assert got == dest and sha256_of(dest) == sha256_of(small_npz)


# --- Sharding and scaling ---------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_shard_bounds_match_array_split(n_parts):
    n, parts = n_parts
    bounds = shard_bounds(n, parts)
    assert bounds.shape == (parts + 1,) and bounds[0] == 0 and bounds[-1] == n
    expected = [len(chunk) for chunk in np.array_split(np.arange(n), parts)]
    assert np.diff(bounds).tolist() == expected


def test_shard_bounds_errors():
    with pytest.raises(UsageError, match="cannot split 3 training samples into 4 "
                                         "shards; use fewer ranks or a larger "
                                         "--train-limit"):
        shard_bounds(3, 4)
    with pytest.raises(UsageError, match="number of shards"):
        shard_bounds(10, 0)
    assert shard_bounds(np.int64(60000), np.int32(7))[-1] == 60000


def test_to_float_is_one_fixed_formula(mnist):
    x = mnist.x_train[:50]
    got = to_float(x)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x.astype(np.float32) * np.float32(1 / 255))
    assert got.min() == 0 and got.max() == 1
    out = np.empty((50, 784), np.float64)
    assert to_float(x, np.float64, out=out) is out
    np.testing.assert_array_equal(out, x * (1 / 255))
    with pytest.raises(ValueError, match="uint8"):
        to_float(got)
    with pytest.raises(ValueError, match="out has dtype"):
        to_float(x, out=out)


def test_mnist_dataclass_is_frozen(mnist):
    assert isinstance(mnist, MNIST)
    with pytest.raises(AttributeError):
        mnist.origin = "elsewhere"
