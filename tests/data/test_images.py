"""Tests for nnlib.data.images (digits, IDX files, MNIST loaders) and the download helper.

No internet: MNIST-format files are written into tmp_path, and downloads are
served from ``file://`` URLs or a local http.server on 127.0.0.1.
"""

import dataclasses
import functools
import gzip
import hashlib
import http.server
import os
import struct
import threading
import urllib.request

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnlib.data import images
from nnlib.data._download import ChecksumError, download_file, file_digest, verify_checksum
from nnlib.data.batching import batch_iterator
from nnlib.data.images import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    load_digits,
    load_mnist,
    read_idx,
    write_idx,
)

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def _digest(indices) -> str:
    """Endianness-free fingerprint of a split: sha256 of the decimal indices."""
    return hashlib.sha256(",".join(map(str, indices.tolist())).encode()).hexdigest()


# --- scikit-learn digits ---------------------------------------------------------------


def test_load_digits_split_is_pinned():
    ds = load_digits()
    assert repr(ds) == "Dataset('digits', train=1258, val=180, test=359, input_shape=(8, 8, 1), num_classes=10)"
    # The same rows on every machine (scikit-learn stratified split, random_state=0).
    assert _digest(ds.indices["test"]) == "a9dda1ba6e307178f16bf633089df8458e120d00ba11b30e16840a3507973acd"
    assert _digest(ds.indices["val"]) == "d8c93e25fbc54fc102340adad35abc079b58e535653ef531d888527445c1ad76"
    assert ds.indices["test"][:10].tolist() == [21, 24, 28, 34, 35, 37, 39, 42, 45, 51]


def test_load_digits_matches_sklearn_data_and_split():
    from sklearn.model_selection import train_test_split

    bunch = sklearn_datasets.load_digits()
    ds = load_digits(seed=5)
    rest, test = train_test_split(np.arange(1797), test_size=359, random_state=5,
                                  stratify=bunch.target)
    train, val = train_test_split(rest, test_size=180, random_state=5,
                                  stratify=bunch.target[rest])
    for split, idx in (("train", train), ("val", val), ("test", test)):
        idx = np.sort(idx)
        np.testing.assert_array_equal(ds.indices[split], idx)
        part = ds[split]
        assert part["inputs"].dtype == np.float32 and part["labels"].dtype == np.int32
        np.testing.assert_allclose(part["inputs"][..., 0], bunch.images[idx] / 16.0, rtol=1e-6)
        np.testing.assert_array_equal(part["labels"], bunch.target[idx])
        # Stratified: each class within one example of its share.
        share = np.bincount(bunch.target) * len(idx) / 1797
        assert np.all(np.abs(np.bincount(part["labels"], minlength=10) - share) <= 1)
    assert ds.class_names == tuple("0123456789") and ds.num_classes == 10
    assert not np.array_equal(ds.indices["test"], load_digits(seed=6).indices["test"])


def test_load_digits_flatten_and_raw_scale():
    flat = load_digits(flatten=True, normalize=False, val_fraction=0.0, test_fraction=0.5)
    assert flat.input_shape == (64,) and flat.train["inputs"].shape == (898, 64)
    assert flat.val["inputs"].shape == (0, 64) and flat.test["inputs"].shape == (899, 64)
    assert flat.train["inputs"].max() == 16.0
    with pytest.raises(ValueError, match=r"load_digits: val_fraction must be in \[0, 1\), got 1.5"):
        load_digits(val_fraction=1.5)
    with pytest.raises(ValueError, match=r"load_digits: val_fraction \+ test_fraction must be < 1 to leave a train split, got 0.6 \+ 0.7"):
        load_digits(val_fraction=0.6, test_fraction=0.7)


def test_digits_train_split_feeds_batch_iterator():
    ds = load_digits()
    batch = next(batch_iterator(ds.train, batch_size=32, seed=0, epoch=0))
    assert batch["inputs"].shape == (32, 8, 8, 1) and batch["labels"].shape == (32,)


# --- IDX files -------------------------------------------------------------------------


def _idx_reference_bytes(array: np.ndarray, type_code: int) -> bytes:
    """The IDX layout written out from the spec: 0, 0, type, ndim, sizes, big-endian data."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_write_idx_known_bytes(tmp_path):
    path = write_idx(tmp_path / "labels", np.array([1, 2, 3], np.uint8))
    assert path.read_bytes() == bytes.fromhex("00000801" "00000003" "010203")
    path = write_idx(tmp_path / "pair", np.array([[-2, 258]], np.int16))
    assert path.read_bytes() == bytes.fromhex("00000b02" "00000001" "00000002" "fffe" "0102")


IDX_DTYPES = [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C),
              (np.float32, 0x0D), (np.float64, 0x0E)]


@settings(max_examples=10, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
       dtype_code=st.sampled_from(IDX_DTYPES), gz=st.booleans(), seed=st.integers(0, 1000))
def test_idx_round_trip_matches_reference_layout(tmp_path_factory, shape, dtype_code, gz, seed):
    dtype, code = dtype_code
    array = (np.random.default_rng(seed).uniform(-100, 100, size=shape)).astype(dtype)
    folder = tmp_path_factory.mktemp("idx")
    ours = write_idx(folder / ("a.gz" if gz else "a"), array)
    raw = gzip.decompress(ours.read_bytes()) if gz else ours.read_bytes()
    assert raw == _idx_reference_bytes(array, code)
    back = read_idx(ours)
    assert back.dtype == np.dtype(dtype) and back.shape == tuple(shape)
    np.testing.assert_array_equal(back, array)
    (folder / "ref").write_bytes(_idx_reference_bytes(array, code))  # read a file we did not write
    np.testing.assert_array_equal(read_idx(folder / "ref"), array)


def test_read_idx_sniffs_gzip_instead_of_trusting_the_suffix(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    (tmp_path / "plain.gz").write_bytes(_idx_reference_bytes(labels, 0x08))  # not compressed
    (tmp_path / "packed").write_bytes(gzip.compress(_idx_reference_bytes(labels, 0x08)))
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz", expected_magic=IDX_LABELS_MAGIC), labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed"), labels)


def test_read_idx_errors(tmp_path):
    images_ = np.zeros((2, 3, 4), np.uint8)
    good = _idx_reference_bytes(images_, 0x08)
    cases = {
        "missing": (None, FileNotFoundError, r"read_idx: no file at .*missing"),
        "short": (b"\x00\x00", ValueError, r"read_idx: .*short is truncated: 2 bytes, shorter than the 4-byte IDX magic number"),
        "magic": (b"\x12\x34\x08\x03" + good[4:], ValueError, r"read_idx: .*magic has magic number 0x12340803, expected 0x00000803 \(uint8 array with 3 dimensions\)"),
        "labels": (_idx_reference_bytes(np.zeros(2, np.uint8), 0x08), ValueError, r"magic number 0x00000801, expected 0x00000803"),
        "header": (good[:10], ValueError, r"read_idx: .*header is truncated: the header of a 3-dimensional IDX file needs 16 bytes, the file has 10"),
        "truncated": (good[:-5], ValueError, r"read_idx: .*truncated is truncated: the header declares shape \(2, 3, 4\) of uint8, i.e. 24 bytes of data, but the file holds 19"),
        "long": (good + b"\x00", ValueError, r"read_idx: .*long is longer than its header says: .* 24 bytes of data, but the file holds 25"),
        "badgz": (gzip.compress(good)[:-12], ValueError, r"read_idx: .*badgz is gzip-compressed but corrupt or truncated"),
    }
    for name, (content, error, match) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(error, match=match):
            read_idx(tmp_path / name, expected_magic=IDX_IMAGES_MAGIC)
    (tmp_path / "badtype").write_bytes(b"\x00\x00\x07\x01" + good[4:])
    with pytest.raises(ValueError, match=r"magic number 0x00000701, expected 0x0000TTDD with TT an IDX type code"):
        read_idx(tmp_path / "badtype")


def test_write_idx_errors(tmp_path):
    with pytest.raises(ValueError, match=r"write_idx: IDX stores uint8, int8, int16, int32, float32 or float64, got dtype int64"):
        write_idx(tmp_path / "x", np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"write_idx: IDX stores 1 to 255 dimensions, got shape \(\)"):
        write_idx(tmp_path / "x", np.uint8(3))


# --- MNIST-format loading ----------------------------------------------------------------

STEMS = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fake_mnist(seed=0, n_train=40, n_test=20):
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "y_train": (np.arange(n_train) % 10).astype(np.uint8),
            "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "y_test": (np.arange(n_test)[::-1] % 10).astype(np.uint8)}


def _write_idx_set(folder, arrays, gz=(True, False, True, False)):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, key, packed in zip(STEMS.values(), ("x_train", "y_train", "x_test", "y_test"), gz, strict=True):
        write_idx(folder / (stem + (".gz" if packed else "")), arrays[key])
    return folder


def _check_against_source(ds, arrays):
    """Every split equals the source pixels / 255 at the recorded indices."""
    for split, (x, y) in {"train": ("x_train", "y_train"), "val": ("x_train", "y_train"),
                          "test": ("x_test", "y_test")}.items():
        idx = ds.indices[split]
        np.testing.assert_allclose(ds[split]["inputs"][..., 0], arrays[x][idx] / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(ds[split]["labels"], arrays[y][idx])
        assert ds[split]["inputs"].dtype == np.float32 and ds[split]["labels"].dtype == np.int32


def test_load_mnist_from_idx_files_plain_and_gz(tmp_path):
    arrays = _fake_mnist()
    ds = load_mnist("fashion_mnist", _write_idx_set(tmp_path, arrays), val_fraction=0.25, seed=1)
    assert repr(ds) == "Dataset('fashion_mnist', train=30, val=10, test=20, input_shape=(28, 28, 1), num_classes=10)"
    _check_against_source(ds, arrays)
    assert sorted(np.concatenate([ds.indices["train"], ds.indices["val"]]).tolist()) == list(range(40))
    assert np.all(np.bincount(ds.val["labels"]) == 1)  # stratified: one of each class
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[-1] == "Ankle boot"
    flat = load_mnist("kmnist", tmp_path, flatten=True, normalize=False, val_fraction=0.0)
    assert flat.train["inputs"].shape == (40, 784) and flat.val["inputs"].shape == (0, 784)
    np.testing.assert_array_equal(flat.test["inputs"], arrays["x_test"].reshape(20, -1).astype(np.float32))
    assert flat.class_names[:2] == ("o", "ki")


def test_load_mnist_from_keras_npz_equals_idx(tmp_path):
    arrays = _fake_mnist(seed=3)
    np.savez(_mkdir(tmp_path / "npz") / "mnist.npz", **arrays)
    from_npz = load_mnist("mnist", tmp_path / "npz", val_fraction=0.25)
    from_idx = load_mnist("mnist", _write_idx_set(tmp_path / "idx", arrays), val_fraction=0.25)
    _check_against_source(from_npz, arrays)
    for split in ("train", "val", "test"):
        for key in ("inputs", "labels"):
            np.testing.assert_array_equal(from_npz[split][key], from_idx[split][key])


def test_load_mnist_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_mnist\('mnist'\): dataset files missing in .*empty: \['train-images-idx3-ubyte', .*'t10k-labels-idx1-ubyte'\] \(plain or .gz\), and no Keras-style mnist.npz. Pass download=True to fetch them from https://ossci-datasets.s3.amazonaws.com/mnist/"):
        load_mnist("mnist", tmp_path / "empty")
    with pytest.raises(ValueError, match=r"load_mnist: unknown dataset 'cifar10'; choose one of \['mnist', 'fashion_mnist', 'kmnist'\]"):
        load_mnist("cifar10", tmp_path)
    with pytest.raises(ValueError, match=r"load_mnist\('mnist'\): val_fraction must be in \[0, 1\), got 1.0"):
        load_mnist("mnist", tmp_path, val_fraction=1.0)


def test_load_mnist_corrupt_or_inconsistent_files(tmp_path):
    arrays = _fake_mnist()
    folder = _write_idx_set(tmp_path / "count", {**arrays, "y_train": arrays["y_train"][:-1]})
    with pytest.raises(ValueError, match=r"load_mnist\('mnist'\): train images hold 40 examples but train labels 39; the files do not belong together \(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte in .*count\)"):
        load_mnist("mnist", folder)
    folder = _write_idx_set(tmp_path / "range", {**arrays, "y_test": np.full(20, 12, np.uint8)})
    with pytest.raises(ValueError, match=r"load_mnist\('mnist'\): test labels must be in \[0, 10\), got range \[12, 12\]"):
        load_mnist("mnist", folder)
    folder = _write_idx_set(tmp_path / "swapped", {**arrays, "x_test": arrays["y_test"]})
    with pytest.raises(ValueError, match=r"read_idx: .*t10k-images-idx3-ubyte.gz has magic number 0x00000801, expected 0x00000803"):
        load_mnist("mnist", folder)
    folder = _write_idx_set(tmp_path / "size", {**arrays, "x_test": arrays["x_test"][:, :14]})
    with pytest.raises(ValueError, match=r"load_mnist\('mnist'\): train images are \(28, 28\) but test images \(14, 28\)"):
        load_mnist("mnist", folder)
    stem = tmp_path / "trunc" / "train-images-idx3-ubyte"
    _write_idx_set(tmp_path / "trunc", arrays, gz=(False,) * 4)
    stem.write_bytes(stem.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"read_idx: .*train-images-idx3-ubyte is truncated: the header declares shape \(40, 28, 28\) of uint8, i.e. 31360 bytes of data, but the file holds 31260"):
        load_mnist("mnist", tmp_path / "trunc")


def test_load_mnist_npz_errors(tmp_path):
    arrays = _fake_mnist()
    cases = {
        "garbage": (b"this is not a zip archive", r"load_mnist\('mnist'\): .*garbage.*mnist.npz is not a readable .npz archive"),
        "keys": (dict(x_train=arrays["x_train"], y_train=arrays["y_train"]), r"load_mnist\('mnist'\): .*mnist.npz lacks arrays \['x_test', 'y_test'\]; a Keras-style npz holds"),
        "dtype": ({**arrays, "x_train": arrays["x_train"].astype(np.float32)}, r"load_mnist\('mnist'\): .*mnist.npz\['x_train'\] must be uint8 images \[n, rows, cols\], got shape \(40, 28, 28\) dtype float32"),
        "labels": ({**arrays, "y_test": arrays["y_test"].astype(np.float32)}, r"load_mnist\('mnist'\): test labels must be integers \[n\], got shape \(20,\) dtype float32"),
        "npy": (np.zeros(3), r"mnist.npz is not a readable .npz archive \(a single ndarray, not an archive of arrays\)"),
    }
    for name, (content, match) in cases.items():
        path = _mkdir(tmp_path / name) / "mnist.npz"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, dict):
            np.savez(path, **content)
        else:
            with open(path, "wb") as f:
                np.save(f, content)
        with pytest.raises(ValueError, match=match):
            load_mnist("mnist", path.parent)


# --- downloads ----------------------------------------------------------------------------


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """Serves tmp_path/www over http on 127.0.0.1 (no internet involved)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    root = _mkdir(tmp_path / "www")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# download_file is nnlib.data's one download helper (MNIST, Tiny Shakespeare); it is
# tested here once, the loaders' own tests only check how they call it.


def test_download_file_from_file_url_verifies_and_caches(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(b"hello nnlib" * 100)
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = download_file(source.as_uri(), tmp_path / "cache" / "file.bin", md5=md5, sha256=sha.upper())
    assert dest.read_bytes() == source.read_bytes()
    assert file_digest(dest, "md5") == md5
    source.unlink()  # a verified cached file is not fetched again
    assert download_file(source.as_uri(), dest, md5=md5) == dest


def test_download_file_streams_over_http_and_leaves_no_temp_file(http_root, tmp_path):
    root, url = http_root
    payload = np.random.default_rng(0).bytes(3_000_000)  # several 1 MiB chunks
    (root / "blob.bin").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "cache" / "sub" / "blob.bin"  # parent folders are created
    assert download_file(f"{url}/blob.bin", dest, sha256=sha.upper()) == dest
    assert dest.read_bytes() == payload and file_digest(dest) == sha
    assert list(dest.parent.iterdir()) == [dest]
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask  # shareable, unlike mkstemp's 0600


def test_download_file_without_digest_keeps_bytes_and_refetches(tmp_path):
    source = tmp_path / "src.txt"
    source.write_text("hello")
    dest = download_file(source.as_uri(), tmp_path / "dest.txt")
    assert dest.read_text() == "hello"
    source.write_text("changed")  # nothing to verify a cached copy against: fetched again
    assert download_file(source.as_uri(), dest).read_text() == "changed"


def test_download_file_checksum_mismatch_keeps_nothing(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(b"tampered")
    dest = tmp_path / "cache" / "file.bin"
    got = hashlib.md5(b"tampered").hexdigest()
    with pytest.raises(ChecksumError, match=rf"download_file: checksum mismatch for file.bin downloaded from file://.*src.bin: expected md5 0{{32}}, got {got} \(8 bytes\).*not kept"):
        download_file(source.as_uri(), dest, md5="0" * 32)
    assert list(dest.parent.iterdir()) == []  # neither the file nor a temporary file remains
    with pytest.raises(ChecksumError, match=r"checksum mismatch for src.bin: expected sha256 abc, got"):
        verify_checksum(source, sha256="ABC")
    verify_checksum(source, md5=got.upper(), sha256=file_digest(source))  # passes silently


def test_download_file_unreachable_url_names_it(http_root, tmp_path):
    _, url = http_root
    with pytest.raises(OSError, match=r"download_file: could not fetch http://127.0.0.1:\d+/missing.bin: HTTP Error 404") as info:
        download_file(f"{url}/missing.bin", tmp_path / "m.bin")
    assert not isinstance(info.value, ChecksumError) and info.value.__cause__ is not None
    assert list(tmp_path.iterdir()) == [tmp_path / "www"]  # nothing written beside m.bin


def test_download_file_interrupted_leaves_nothing(tmp_path, monkeypatch):
    class Response:  # yields one chunk, then the user presses Ctrl-C
        chunks = [b"partial"]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, size):
            if self.chunks:
                return self.chunks.pop()
            raise KeyboardInterrupt

    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: Response())
    with pytest.raises(KeyboardInterrupt):
        download_file("https://example.invalid/f.bin", tmp_path / "f.bin", md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_download_file_falls_back_to_next_mirror(http_root, tmp_path):
    root, url = http_root
    _mkdir(root / "good").joinpath("f.bin").write_bytes(b"payload")
    md5 = hashlib.md5(b"payload").hexdigest()
    dest = download_file([f"{url}/missing/f.bin", f"{url}/good/f.bin"], tmp_path / "f.bin", md5=md5)
    assert dest.read_bytes() == b"payload"
    dest.write_bytes(b"stale")  # a corrupted cache entry is replaced
    assert download_file(f"{url}/good/f.bin", dest, md5=md5).read_bytes() == b"payload"


def test_download_file_says_when_a_mirror_served_wrong_bytes(http_root, tmp_path):
    # The verified copy from the second mirror is kept, and the first mirror's
    # mismatch is reported rather than silently retried into success.
    root, url = http_root
    _mkdir(root / "bad").joinpath("f.bin").write_bytes(b"tampered")
    _mkdir(root / "ok").joinpath("f.bin").write_bytes(b"payload")
    md5 = hashlib.md5(b"payload").hexdigest()
    with pytest.warns(UserWarning, match=r"f.bin verified from http://.*/ok/f.bin after a "
                                         r"checksum mismatch from http://.*/bad/f.bin"):
        dest = download_file([f"{url}/bad/f.bin", f"{url}/ok/f.bin"], tmp_path / "f.bin",
                             md5=md5)
    assert dest.read_bytes() == b"payload"


def test_download_file_reports_every_failed_mirror(http_root, tmp_path):
    root, url = http_root
    with pytest.raises(OSError, match=r"download_file: could not fetch f.bin from any mirror:\n  http://127.0.0.1:\d+/a/f.bin: HTTP Error 404.*\n  http://127.0.0.1:\d+/b/f.bin: HTTP Error 404"):
        download_file([f"{url}/a/f.bin", f"{url}/b/f.bin"], tmp_path / "f.bin")
    (root / "f.bin").write_bytes(b"x")
    with pytest.raises(ChecksumError, match=r"could not fetch f.bin from any mirror:\n.*404.*\n.*checksum mismatch"):
        download_file([f"{url}/a/f.bin", f"{url}/f.bin"], tmp_path / "f.bin", md5="0" * 32)
    with pytest.raises(ValueError, match=r"download_file: no URL given for"):
        download_file([], tmp_path / "f.bin")


def test_load_mnist_download_rejects_files_without_the_published_md5(http_root, tmp_path):
    root, url = http_root
    _write_idx_set(root, _fake_mnist(), gz=(True,) * 4)
    # Our fake files are not the real MNIST: the official digest must reject them.
    with pytest.raises(ChecksumError, match=r"checksum mismatch for train-images-idx3-ubyte.gz downloaded from http://127.0.0.1:\d+/train-images-idx3-ubyte.gz: expected md5 f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        load_mnist("mnist", tmp_path / "data", download=True, mirrors=[url])
    assert not (tmp_path / "data" / "train-images-idx3-ubyte.gz").exists()


def test_load_mnist_download_fetches_missing_files(http_root, tmp_path, monkeypatch):
    root, url = http_root
    arrays = _fake_mnist(seed=9)
    _write_idx_set(root, arrays, gz=(True,) * 4)
    digests = {p.name: file_digest(p, "md5") for p in root.iterdir()}
    monkeypatch.setitem(images._SOURCES, "mnist",
                        dataclasses.replace(images._SOURCES["mnist"], mirrors=(url + "/",), md5=digests))
    data = _mkdir(tmp_path / "data")
    write_idx(data / "t10k-labels-idx1-ubyte", arrays["y_test"])  # present: not downloaded
    ds = load_mnist("mnist", data, download=True, val_fraction=0.25)
    _check_against_source(ds, arrays)
    assert sorted(p.name for p in data.iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_published_digests_are_well_formed():
    # The recorded digests are the published MD5s (32 hex digits, one per file).
    for source in images._SOURCES.values():
        assert sorted(source.md5) == sorted(s + ".gz" for s in STEMS.values())
        assert all(len(d) == 32 and int(d, 16) >= 0 for d in source.md5.values())
        assert len(source.class_names) == 10 and source.mirrors
