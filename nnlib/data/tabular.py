"""Tabular data: reproducible train/val/test splits and standardization.

The pieces every in-memory dataset needs, shared by the image loaders too:

* :class:`Dataset` is what every ``nnlib.data`` loader returns: three splits,
  each a dict ``{"inputs": [n, ...], "labels": [n, ...]}`` of numpy arrays
  ready for ``nnlib.data.batching.batch_iterator``, plus the metadata a model
  needs (``input_shape``, ``num_classes``, ``class_names``) and the source
  row ``indices`` of each split.
* :func:`split_indices` / :func:`train_val_test_split` cut ``n`` examples
  into train/val/test by ``fractions=(train, val, test)``. Split sizes are
  the fractions of ``n`` rounded to the nearest integer (halves up), the
  train split takes the rest. A stratified split (``stratify=labels``) uses
  scikit-learn's ``train_test_split`` twice (test off the whole set, then val
  off the rest) with ``random_state=seed``; an unstratified one is a numpy
  ``default_rng(seed)`` permutation. Both are identical on every machine for
  a given seed; indices inside each split are sorted (source order).
* :class:`Standardizer` is a z-score transform fit on the *train* split only,
  so no statistic of the val/test data leaks into training. It matches
  ``sklearn.preprocessing.StandardScaler`` (population std, ``ddof=0``;
  a constant feature gets scale 1 so it maps to 0 instead of NaN).
* :func:`load_tabular` puts them together for a feature matrix ``x`` and
  targets ``y``.

Shapes glossary: ``n`` examples, ``features`` input columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from jaxtyping import Float, Num, Shaped

SPLITS = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train/val/test splits of an in-memory dataset plus its metadata.

    Attributes:
      name: e.g. ``"digits"``, ``"mnist"``.
      train, val, test: ``{"inputs": [n, *input_shape], "labels": [n, ...]}``;
        ``dataset["train"]`` works too.
      input_shape: shape of one example's inputs, e.g. ``(28, 28, 1)``.
      num_classes: number of classes; ``None`` for regression.
      class_names: name of each class id; ``None`` for regression.
      indices: ``{split: [n_split]}`` rows of the source arrays each split
        took (for MNIST-style data, train/val index the official training
        file and test the official test file).
      info: anything else a loader records (e.g. the fitted ``Standardizer``).
    """

    name: str
    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    indices: dict[str, np.ndarray] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, split: str) -> dict[str, np.ndarray]:
        if split not in SPLITS:
            raise KeyError(f"Dataset {self.name!r} has splits {SPLITS}, got {split!r}")
        return getattr(self, split)

    @property
    def splits(self) -> dict[str, dict[str, np.ndarray]]:
        return {s: getattr(self, s) for s in SPLITS}

    def __repr__(self) -> str:  # sizes, not a dump of the arrays
        sizes = ", ".join(f"{s}={len(getattr(self, s)['labels'])}" for s in SPLITS)
        return (f"Dataset({self.name!r}, {sizes}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes})")


# --- splitting -------------------------------------------------------------


def _split_sizes(fn: str, n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    if len(fractions) != 3 or any(not 0 <= f <= 1 for f in fractions):
        raise ValueError(
            f"{fn}: fractions must be (train, val, test), each in [0, 1], got {tuple(fractions)}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"{fn}: fractions (train, val, test) must sum to 1, got "
                         f"{tuple(fractions)} (sum {sum(fractions):.6g})")
    # Nearest integer with halves rounded up (Python's round() rounds halves to even).
    n_val, n_test = (int(np.floor(f * n + 0.5)) for f in fractions[1:])
    n_train = n - n_val - n_test
    if n_train < 0:  # e.g. (0, 0.5, 0.5) of an odd n: both halves round up
        raise ValueError(
            f"{fn}: the val and test fractions {fractions[1]} and {fractions[2]} of {n} "
            f"examples round to {n_val} + {n_test} = {n_val + n_test} examples, more than "
            f"there are; change the fractions so their rounded sizes fit in {n}")
    for split, frac, size in (("val", fractions[1], n_val), ("test", fractions[2], n_test),
                              ("train", fractions[0], n_train)):
        if frac > 0 and size < 1:
            raise ValueError(
                f"{fn}: the {split} fraction {frac} of {n} examples rounds to {size} examples; "
                f"use a larger fraction, more data, or fraction 0 to skip the {split} split")
    return n_train, n_val, n_test


def _stratified_take(fn: str, pool: np.ndarray, labels: np.ndarray, size: int, seed: int):
    """Splits ``pool`` into (rest, taken) with ``size`` taken, class-balanced."""
    if size == 0:
        return pool, pool[:0]
    try:
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - sklearn is in the "data" extra
        raise ImportError(f"{fn}: a stratified split needs scikit-learn "
                          "(pip install 'nnlib[data]')") from e
    try:
        rest, taken = train_test_split(pool, test_size=size, random_state=seed,
                                       stratify=labels[pool])
    except ValueError as e:
        classes, counts = np.unique(labels[pool], return_counts=True)
        counts = dict(zip(classes.tolist(), counts.tolist(), strict=True))
        raise ValueError(f"{fn}: cannot stratify {size} of {len(pool)} examples by class "
                         f"(class counts {counts}): {e}") from e
    return rest, taken


def split_indices(
    n: int,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    *,
    seed: int = 0,
    stratify: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Row indices of a reproducible train/val/test split of ``n`` examples.

    Args:
      n: number of examples.
      fractions: ``(train, val, test)``, summing to 1; a 0 gives an empty split.
      seed: fixes the split (``random_state`` of scikit-learn, or the numpy
        permutation when not stratified).
      stratify: ``[n]`` class labels to keep class proportions equal across
        the splits (needs scikit-learn and >= 2 examples per class).

    Returns:
      ``{"train": int64 [n_train], "val": [n_val], "test": [n_test]}``,
      disjoint, covering ``range(n)``, each sorted.
    """
    return _split_indices("split_indices", n, fractions, seed, stratify)


def _split_indices(fn: str, n: int, fractions: Sequence[float], seed: int,
                   stratify: np.ndarray | None) -> dict[str, np.ndarray]:
    """:func:`split_indices` with errors naming the public function ``fn``."""
    n_train, n_val, n_test = _split_sizes(fn, n, fractions)
    if stratify is None:
        order = np.random.default_rng(seed).permutation(n)
        parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val],
                 "train": order[n_test + n_val:]}
    else:
        labels = np.asarray(stratify)
        if labels.shape != (n,):
            raise ValueError(f"{fn}: stratify must hold one label per example, shape ({n},), "
                             f"got {labels.shape}")
        rest, test = _stratified_take(fn, np.arange(n), labels, n_test, seed)
        train, val = _stratified_take(fn, rest, labels, n_val, seed)
        parts = {"test": test, "val": val, "train": train}
    return {s: np.sort(parts[s]).astype(np.int64) for s in SPLITS}


def train_val_test_split(
    arrays: Mapping[str, np.ndarray],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    stratify: str | np.ndarray | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Splits equally long arrays into train/val/test dicts.

    Args:
      arrays: ``{name: [n, ...]}``, e.g. ``{"inputs": x, "labels": y}``.
      fractions: ``(train, val, test)`` summing to 1.
      seed: fixes the split.
      stratify: the name of an array in ``arrays`` (``"labels"``) or an
        ``[n]`` array of classes to stratify by; ``None`` for a plain shuffle.

    Returns:
      ``{"train": {name: [n_train, ...]}, "val": {...}, "test": {...}}``.
    """
    fn = "train_val_test_split"
    if not isinstance(arrays, Mapping) or not arrays:
        raise ValueError(f"{fn} expected a non-empty dict of arrays such as "
                         f"{{'inputs': x, 'labels': y}}, got {type(arrays).__name__}")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    lengths = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
        raise ValueError(f"{fn}: all arrays need the same number of examples (leading axis), "
                         f"got {lengths}")
    if isinstance(stratify, str):
        if stratify not in arrays:
            raise ValueError(f"{fn}: stratify={stratify!r} names no array; arrays are "
                             f"{sorted(arrays)}")
        stratify = arrays[stratify]
    n = next(iter(lengths.values()))
    idx = _split_indices(fn, n, fractions, seed, stratify)
    return {s: {k: v[idx[s]] for k, v in arrays.items()} for s in SPLITS}


# --- standardization -------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Standardizer:
    """``z = (x - mean) / scale`` per feature, with statistics from the train split.

    Build with ``Standardizer.fit(x_train)``. Statistics are over the example
    axis (axis 0) in float64; ``scale`` is the population std, or 1 for a
    feature that is constant on the train data.

    Attributes:
      mean: ``[*feature_shape]`` float64.
      scale: ``[*feature_shape]`` float64, never 0.
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: Num[np.ndarray, "n ..."]) -> Standardizer:
        """Fits to ``x: [n, *features]`` (n >= 1, all values finite)."""
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[0] < 1 or not np.issubdtype(x.dtype, np.number):
            raise ValueError("Standardizer.fit expected numeric x of shape [n, features] with "
                             f"n >= 1, got shape {x.shape} dtype {x.dtype}")
        finite = np.isfinite(x).reshape(x.shape[0], -1).all(axis=0)
        if not finite.all():
            raise ValueError("Standardizer.fit: x has NaN or inf in (flattened) feature columns "
                             f"{np.flatnonzero(~finite).tolist()}; impute or drop them first")
        x64 = x.astype(np.float64)
        mean = x64.mean(axis=0)
        std = x64.std(axis=0)
        # Exactly constant columns (ptp == 0): scale 1, so they map to 0, not NaN.
        scale = np.where(np.ptp(x64, axis=0) == 0, 1.0, std)
        return cls(mean=mean, scale=scale)

    def _check(self, fn: str, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.shape[1:] != self.mean.shape:
            raise ValueError(
                f"Standardizer.{fn} expected x of shape [n, {', '.join(map(str, self.mean.shape))}]"
                f" (the shape it was fit on), got {x.shape}")
        return x

    @staticmethod
    def _out_dtype(x: np.ndarray):
        return x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)

    def transform(self, x: Num[np.ndarray, "n ..."]) -> Float[np.ndarray, "n ..."]:
        """``(x - mean) / scale``; float inputs keep their dtype, others become float32."""
        x = self._check("transform", x)
        return ((x - self.mean) / self.scale).astype(self._out_dtype(x))

    def inverse_transform(
        self, z: Num[np.ndarray, "n ..."]
    ) -> Float[np.ndarray, "n ..."]:
        """``z * scale + mean``: undoes :meth:`transform`."""
        z = self._check("inverse_transform", z)
        return (z * self.scale + self.mean).astype(self._out_dtype(z))


# --- a whole dataset from (x, y) ------------------------------------------


def load_tabular(
    x: Num[np.ndarray, "n features"],
    y: Shaped[np.ndarray, "n ..."],
    *,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    stratify: bool | None = None,
    standardize: bool = True,
    name: str = "tabular",
    feature_names: Sequence[str] | None = None,
) -> Dataset:
    """Splits a feature matrix and targets into a standardized :class:`Dataset`.

    Classification or regression is read off ``y``: integer, bool or string
    labels are classes (``labels`` int32, class ids as given for integers in
    ``[0, K)``; strings are numbered in sorted order, ``class_names`` keeps
    them); float ``y`` is a regression target (``labels`` float32,
    ``num_classes=None``).

    Args:
      x: ``[n, features]`` numeric, finite.
      y: ``[n]`` labels, or ``[n]``/``[n, targets]`` float regression targets.
      fractions: ``(train, val, test)`` summing to 1.
      seed: fixes the split.
      stratify: keep class proportions across splits; default: yes for
        classification, no for regression.
      standardize: z-score the inputs with a :class:`Standardizer` fit on the
        train split only (kept in ``dataset.info["standardizer"]``).
      name: the dataset's name.
      feature_names: one name per column, kept in ``info["feature_names"]``.

    Returns:
      A :class:`Dataset` with float32 ``inputs: [n_split, features]``.
    """
    fn = "load_tabular"
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{fn} expected numeric x of shape [n, features], got shape {x.shape} "
                         f"dtype {x.dtype}")
    if y.ndim not in (1, 2) or y.shape[0] != x.shape[0]:
        raise ValueError(f"{fn} expected y of shape [n] or [n, targets] with n={x.shape[0]} "
                         f"(the rows of x), got {y.shape}")
    bad_rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad_rows.size:
        raise ValueError(f"{fn}: x has NaN or inf in {bad_rows.size} rows (first: "
                         f"{bad_rows[:5].tolist()}); impute or drop them first")
    if feature_names is not None and len(feature_names) != x.shape[1]:
        raise ValueError(f"{fn}: got {len(feature_names)} feature_names for {x.shape[1]} "
                         "feature columns")
    classification = not np.issubdtype(y.dtype, np.floating)
    num_classes = class_names = None
    if classification:
        if y.ndim != 1:
            raise ValueError(f"{fn}: class labels must have shape [n], got {y.shape}")
        if np.issubdtype(y.dtype, np.integer) or y.dtype == bool:
            y = y.astype(np.int64)
            if y.min() < 0:
                raise ValueError(f"{fn}: integer class labels must be in [0, num_classes), "
                                 f"got minimum {y.min()}")
            num_classes = int(y.max()) + 1
            class_names = tuple(str(c) for c in range(num_classes))
        else:
            names, y = np.unique(y, return_inverse=True)
            num_classes, class_names = len(names), tuple(str(c) for c in names)
        labels = y.astype(np.int32)
    else:
        labels = y.astype(np.float32)
    if stratify is None:
        stratify = classification
    idx = _split_indices(fn, x.shape[0], fractions, seed, labels if stratify else None)
    info: dict[str, Any] = {}
    if feature_names is not None:
        info["feature_names"] = tuple(feature_names)
    if standardize:
        standardizer = Standardizer.fit(x[idx["train"]])
        info["standardizer"] = standardizer
        inputs = standardizer.transform(x.astype(np.float64)).astype(np.float32)
    else:
        inputs = x.astype(np.float32)
    splits = {s: {"inputs": inputs[idx[s]], "labels": labels[idx[s]]} for s in SPLITS}
    return Dataset(name=name, **splits, input_shape=(x.shape[1],), num_classes=num_classes,
                   class_names=class_names, indices=idx, info=info)
