"""Small image-classification datasets as numpy arrays: 8x8 digits and the MNISTs.

Every loader returns a :class:`nnlib.data.tabular.Dataset` whose splits are
``{"inputs": float32 [n, H, W, 1], "labels": int32 [n]}`` (``[n, H*W]`` with
``flatten=True``), channels last as flax convolutions expect. With
``normalize=True`` pixels are in [0, 1] (digits: value / 16, MNIST: value /
255); otherwise they keep their raw scale as float32.

* :func:`load_digits`: scikit-learn's 1797 8x8 handwritten digits (ships
  with scikit-learn, no download), split stratified by class with
  :func:`nnlib.data.tabular.split_indices` (scikit-learn ``train_test_split``,
  ``random_state=seed``): the same rows land in the same split on every
  machine.
* :func:`load_mnist`: MNIST, Fashion-MNIST or Kuzushiji-MNIST (28x28, 10
  classes, 60000 train + 10000 test) from the official IDX files, plain or
  gzipped, or a Keras-style ``<name>.npz`` (``x_train, y_train, x_test,
  y_test``). The three datasets share file names, so give each its own
  ``data_dir``. A stratified validation split (``val_fraction``) is taken
  from the official training set with a fixed seed; the official test set is
  the test split.

Downloads (``download=True`` only) fetch the four ``.gz`` IDX files from the
mirrors below into ``data_dir`` and check each against its published MD5
digest (the digests torchvision and the dataset authors publish); a file
with another digest is rejected, never kept. Files already in ``data_dir``
are not checked against the digests (you may have unpacked or rebuilt them),
but every file is parsed strictly: IDX magic number, dimension header and
exact byte length.

IDX format (LeCun et al.): a 4-byte magic ``0x0000TTDD`` (``TT`` the element
type, 0x08 = uint8; ``DD`` the number of dimensions), ``DD`` big-endian
uint32 sizes, then the elements, big-endian, row-major. Labels are
``0x00000801`` ``[n]``, images ``0x00000803`` ``[n, rows, cols]``.
:func:`read_idx` and :func:`write_idx` read and write any IDX file.
"""

from __future__ import annotations

import gzip
import os
import struct
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Shaped

from nnlib.data._download import download_file
from nnlib.data.tabular import Dataset, _split_indices

# IDX element type code -> big-endian numpy dtype.
_IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_CODES = {dt.newbyteorder("="): code for code, dt in _IDX_TYPES.items()}
IDX_LABELS_MAGIC = 0x00000801  # uint8 [n]
IDX_IMAGES_MAGIC = 0x00000803  # uint8 [n, rows, cols]


# --- IDX files ---------------------------------------------------------------


def _read_maybe_gzip(fn: str, path: Path) -> bytes:
    raw = path.read_bytes()
    # Sniff the gzip magic instead of trusting the suffix: browsers often
    # unpack "x.gz" on the fly and keep the name.
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{fn}: {path} is gzip-compressed but corrupt or truncated ({e}); "
                         "delete it and download it again") from e


def _magic_meaning(magic: int) -> str:
    code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    return f"{_IDX_TYPES[code].newbyteorder('=').name} array with {ndim} dimensions"


def read_idx(path: str | os.PathLike, *, expected_magic: int | None = None) -> np.ndarray:
    """Reads an IDX file (plain or gzipped) into a native-endian numpy array.

    Args:
      path: the file.
      expected_magic: e.g. ``IDX_IMAGES_MAGIC`` (``0x00000803``); any valid
        IDX magic is accepted when ``None``.

    Returns:
      ``[d0, d1, ...]`` as declared by the header, in the stored dtype.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: bad magic number, short header, data shorter or longer than
        the header declares (naming both byte counts), corrupt gzip.
    """
    fn, path = "read_idx", Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{fn}: no file at {path}")
    data = _read_maybe_gzip(fn, path)
    if len(data) < 4:
        raise ValueError(f"{fn}: {path} is truncated: {len(data)} bytes, shorter than the "
                         "4-byte IDX magic number")
    (magic,) = struct.unpack(">I", data[:4])
    code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    valid = magic >> 16 == 0 and code in _IDX_TYPES and ndim > 0
    if not valid or (expected_magic is not None and magic != expected_magic):
        want = (f"0x{expected_magic:08x} ({_magic_meaning(expected_magic)})"
                if expected_magic is not None else
                "0x0000TTDD with TT an IDX type code (0x08 uint8 ... 0x0e float64), DD >= 1")
        raise ValueError(f"{fn}: {path} has magic number 0x{magic:08x}, expected {want}; "
                         "the file is not this IDX file or is corrupt")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{fn}: {path} is truncated: the header of a {ndim}-dimensional IDX "
                         f"file needs {header} bytes, the file has {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_TYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise ValueError(f"{fn}: {path} is {what}: the header declares shape {shape} of "
                         f"{dtype.newbyteorder('=').name}, i.e. {expected} bytes of data, "
                         f"but the file holds {actual}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # a native-endian, writable copy


def write_idx(path: str | os.PathLike, array: Shaped[np.ndarray, "*shape"]) -> Path:
    """Writes ``array`` as an IDX file; gzipped when ``path`` ends in ``.gz``.

    Supported dtypes: uint8, int8, int16, int32, float32, float64; 1 to 255
    dimensions. MNIST images are uint8 ``[n, 28, 28]``, labels uint8 ``[n]``.
    """
    fn, path, array = "write_idx", Path(path), np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _IDX_CODES:
        raise ValueError(f"{fn}: IDX stores uint8, int8, int16, int32, float32 or float64, "
                         f"got dtype {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"{fn}: IDX stores 1 to 255 dimensions, got shape {array.shape}")
    magic = (_IDX_CODES[native] << 8) | array.ndim
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)  # mtime=0: same bytes on every run
    path.write_bytes(payload)
    return path


# --- shared formatting ---------------------------------------------------------


def _format_images(images: np.ndarray, max_value: float, *, flatten: bool, normalize: bool
                   ) -> np.ndarray:
    """[n, H, W] raw pixels -> float32 [n, H, W, 1] (or [n, H*W])."""
    x = images.astype(np.float32)
    if normalize:
        x /= np.float32(max_value)
    return x.reshape(x.shape[0], -1) if flatten else x[..., None]


def _check_fraction(fn: str, name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{fn}: {name} must be in [0, 1), got {value}")


# --- scikit-learn digits -------------------------------------------------------


def load_digits(
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    flatten: bool = False,
    normalize: bool = True,
) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), split stratified by class.

    With the defaults the split is train 1258 / val 180 / test 359 and is the
    same on every machine (pinned by the tests).

    Args:
      val_fraction, test_fraction: of all 1797 images, rounded to nearest.
      seed: ``random_state`` of the stratified split.
      flatten: inputs ``[n, 64]`` instead of ``[n, 8, 8, 1]``.
      normalize: pixels / 16 (the data's range 0..16) into [0, 1].

    Returns:
      ``Dataset("digits")`` with float32 inputs and int32 labels.
    """
    fn = "load_digits"
    _check_fraction(fn, "val_fraction", val_fraction)
    _check_fraction(fn, "test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"{fn}: val_fraction + test_fraction must be < 1 to leave a train "
                         f"split, got {val_fraction} + {test_fraction}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:  # pragma: no cover - sklearn is in the "data" extra
        raise ImportError(f"{fn} needs scikit-learn (pip install 'nnlib[data]')") from e
    bunch = sklearn_digits()
    images = _format_images(bunch.images, 16.0, flatten=flatten, normalize=normalize)
    labels = bunch.target.astype(np.int32)
    fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
    idx = _split_indices(fn, len(labels), fractions, seed, labels)
    splits = {s: {"inputs": images[i], "labels": labels[i]} for s, i in idx.items()}
    return Dataset(name="digits", **splits, input_shape=images.shape[1:], num_classes=10,
                   class_names=tuple(str(d) for d in range(10)), indices=idx)


# --- MNIST, Fashion-MNIST, KMNIST ------------------------------------------------


@dataclass(frozen=True)
class _Source:
    mirrors: tuple[str, ...]
    md5: dict[str, str]  # .gz file name -> published MD5
    class_names: tuple[str, ...]


_FILES = {  # role -> IDX file name (without .gz); the same for all three datasets
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}

_SOURCES = {
    "mnist": _Source(
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
        class_names=tuple(str(d) for d in range(10))),
    "fashion_mnist": _Source(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                 "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"),
        md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
             "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
             "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
             "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                     "Sneaker", "Bag", "Ankle boot")),
    "kmnist": _Source(
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        md5={"train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
             "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
             "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
             "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134"},
        class_names=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
}


def _find_idx(data_dir: Path) -> dict[str, Path | None]:
    """Role -> existing file (plain preferred over .gz) or None."""
    found = {}
    for role, stem in _FILES.items():
        candidates = [data_dir / stem, data_dir / (stem + ".gz")]
        found[role] = next((p for p in candidates if p.is_file()), None)
    return found


def _read_npz(fn: str, path: Path) -> dict[str, np.ndarray]:
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"a single {type(loaded).__name__}, not an archive of arrays")
        with loaded:
            contents = {k: loaded[k] for k in loaded.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{fn}: {path} is not a readable .npz archive ({e}); delete it and "
                         "download it again") from e
    missing = [k for k in keys if k not in contents]
    if missing:
        raise ValueError(f"{fn}: {path} lacks arrays {missing}; a Keras-style npz holds "
                         f"{list(keys)}, this one holds {sorted(contents)}")
    arrays = {k: contents[k] for k in keys}
    for k in ("x_train", "x_test"):
        if arrays[k].dtype != np.uint8 or arrays[k].ndim != 3:
            raise ValueError(f"{fn}: {path}[{k!r}] must be uint8 images [n, rows, cols], got "
                             f"shape {arrays[k].shape} dtype {arrays[k].dtype}")
    return arrays


def _check_pair(fn: str, split: str, images: np.ndarray, labels: np.ndarray, where: str,
                num_classes: int) -> None:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{fn}: {split} labels must be integers [n], got shape {labels.shape} "
                         f"dtype {labels.dtype} ({where})")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{fn}: {split} images hold {images.shape[0]} examples but {split} "
                         f"labels {labels.shape[0]}; the files do not belong together ({where})")
    if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
        raise ValueError(f"{fn}: {split} labels must be in [0, {num_classes}), got range "
                         f"[{labels.min()}, {labels.max()}] ({where})")


def load_mnist(
    name: str,
    data_dir: str | os.PathLike,
    *,
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    flatten: bool = False,
    normalize: bool = True,
    mirrors: Sequence[str] | None = None,
) -> Dataset:
    """MNIST, Fashion-MNIST or KMNIST from ``data_dir`` (downloaded on request).

    Looks in ``data_dir`` for the four IDX files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, each plain or ``.gz``), else for a Keras-style
    ``<name>.npz``; else, with ``download=True``, fetches the missing ``.gz``
    files and verifies their MD5 digests.

    Args:
      name: ``"mnist"``, ``"fashion_mnist"`` or ``"kmnist"``.
      data_dir: this dataset's folder (created when downloading).
      download: fetch missing files from the official mirrors.
      val_fraction: share of the official training set held out as the val
        split, stratified by class with ``seed`` (default 6000 of 60000).
      seed: fixes the val split.
      flatten: inputs ``[n, rows*cols]`` instead of ``[n, rows, cols, 1]``.
      normalize: pixels / 255 into [0, 1].
      mirrors: base URLs to download from instead of the official ones (the
        official MD5 digests still apply).

    Returns:
      ``Dataset(name)`` with float32 inputs, int32 labels and 10 classes.

    Raises:
      FileNotFoundError: the files are missing and ``download=False``.
      ValueError: a corrupt file, or images and labels that disagree.
      nnlib.data._download.ChecksumError: a download with the wrong digest.
    """
    fn = f"load_mnist({name!r})"
    if name not in _SOURCES:
        raise ValueError(f"load_mnist: unknown dataset {name!r}; choose one of {list(_SOURCES)}")
    _check_fraction(fn, "val_fraction", val_fraction)
    source, data_dir = _SOURCES[name], Path(data_dir).expanduser()
    found = _find_idx(data_dir)
    npz = data_dir / f"{name}.npz"
    if None in found.values() and not npz.is_file():
        missing = [_FILES[r] for r, p in found.items() if p is None]
        if not download:
            raise FileNotFoundError(
                f"{fn}: dataset files missing in {data_dir}: {missing} (plain or .gz), and no "
                f"Keras-style {npz.name}. Pass download=True to fetch them from "
                f"{source.mirrors[0]}, or copy the files there.")
        for role, path in found.items():
            if path is None:
                gz = _FILES[role] + ".gz"
                urls = [m.rstrip("/") + "/" + gz for m in (mirrors or source.mirrors)]
                found[role] = download_file(urls, data_dir / gz, md5=source.md5[gz])
    if None not in found.values():
        arrays = {
            "x_train": read_idx(found["train_images"], expected_magic=IDX_IMAGES_MAGIC),
            "y_train": read_idx(found["train_labels"], expected_magic=IDX_LABELS_MAGIC),
            "x_test": read_idx(found["test_images"], expected_magic=IDX_IMAGES_MAGIC),
            "y_test": read_idx(found["test_labels"], expected_magic=IDX_LABELS_MAGIC)}
        where = {s: f"{found[s + '_images'].name}, {found[s + '_labels'].name} in {data_dir}"
                 for s in ("train", "test")}
    else:
        arrays = _read_npz(fn, npz)
        where = {"train": str(npz), "test": str(npz)}
    num_classes = len(source.class_names)
    for split in ("train", "test"):
        _check_pair(fn, split, arrays[f"x_{split}"], arrays[f"y_{split}"], where[split],
                    num_classes)
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(f"{fn}: train images are {arrays['x_train'].shape[1:]} but test images "
                         f"{arrays['x_test'].shape[1:]}")

    y_train = arrays["y_train"].astype(np.int32)
    idx = _split_indices(fn, len(y_train), (1 - val_fraction, val_fraction, 0.0), seed,
                         y_train if val_fraction > 0 else None)
    idx["test"] = np.arange(len(arrays["y_test"]), dtype=np.int64)
    x_train = _format_images(arrays["x_train"], 255.0, flatten=flatten, normalize=normalize)
    x_test = _format_images(arrays["x_test"], 255.0, flatten=flatten, normalize=normalize)
    splits = {
        "train": {"inputs": x_train[idx["train"]], "labels": y_train[idx["train"]]},
        "val": {"inputs": x_train[idx["val"]], "labels": y_train[idx["val"]]},
        "test": {"inputs": x_test, "labels": arrays["y_test"].astype(np.int32)}}
    return Dataset(name=name, **splits, input_shape=x_train.shape[1:], num_classes=num_classes,
                   class_names=source.class_names, indices=idx)


__all__ = ["IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "load_digits", "load_mnist", "read_idx",
           "write_idx"]
