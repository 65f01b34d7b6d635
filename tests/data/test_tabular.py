"""Tests for nnlib.data.tabular: splits, Standardizer (vs scikit-learn), load_tabular."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnlib.data.batching import batch_iterator
from nnlib.data.tabular import (
    Dataset,
    Standardizer,
    load_tabular,
    split_indices,
    train_val_test_split,
)

sklearn_preprocessing = pytest.importorskip("sklearn.preprocessing")


def _features(n=40, d=4, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, size=(n, d)) * np.arange(1, d + 1)
    x[:, 1] = 7.5  # a constant column: std 0
    return x.astype(dtype)


# --- Standardizer -------------------------------------------------------------


def test_standardizer_matches_sklearn_standard_scaler_float64():
    x, x_new = _features(), _features(seed=1)
    ours = Standardizer.fit(x)
    ref = sklearn_preprocessing.StandardScaler().fit(x)
    np.testing.assert_allclose(ours.mean, ref.mean_, rtol=1e-12)
    np.testing.assert_allclose(ours.scale, ref.scale_, rtol=1e-12)
    np.testing.assert_allclose(ours.transform(x_new), ref.transform(x_new), rtol=1e-12, atol=1e-12)
    z = ref.transform(x_new)
    np.testing.assert_allclose(ours.inverse_transform(z), ref.inverse_transform(z), rtol=1e-12)
    assert ours.scale[1] == 1.0 and np.all(ours.transform(x)[:, 1] == 0.0)  # constant column


def test_standardizer_float32_keeps_dtype_and_int_becomes_float32():
    x = _features(dtype=np.float32)
    z = Standardizer.fit(x).transform(x)
    assert z.dtype == np.float32
    ref = sklearn_preprocessing.StandardScaler().fit_transform(x.astype(np.float64))
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-6)
    xi = np.arange(12).reshape(6, 2)
    zi = Standardizer.fit(xi).transform(xi)
    assert zi.dtype == np.float32
    # Independent formula: (x - mean) / population std.
    np.testing.assert_allclose(zi, (xi - xi.mean(0)) / xi.std(0), rtol=1e-6)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 30), d=st.integers(1, 6), seed=st.integers(0, 1000))
def test_standardizer_round_trip_and_moments(n, d, seed):
    x = np.random.default_rng(seed).uniform(-5, 50, size=(n, d))
    s = Standardizer.fit(x)
    z = s.transform(x)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(z.std(0), 1.0, rtol=1e-9)
    np.testing.assert_allclose(s.inverse_transform(z), x, rtol=1e-12, atol=1e-12)


def test_standardizer_errors():
    s = Standardizer.fit(_features(d=4))
    with pytest.raises(ValueError, match=r"Standardizer.transform expected x of shape \[n, 4\].*got \(3, 5\)"):
        s.transform(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"Standardizer.inverse_transform expected x of shape \[n, 4\].*got \(3,\)"):
        s.inverse_transform(np.zeros((3,)))
    x = _features()
    x[5, 2] = np.nan
    with pytest.raises(ValueError, match=r"Standardizer.fit: x has NaN or inf in .*columns \[2\]"):
        Standardizer.fit(x)
    with pytest.raises(ValueError, match=r"Standardizer.fit expected numeric x .*got shape \(0, 3\)"):
        Standardizer.fit(np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"Standardizer.fit expected numeric x .*dtype <U1"):
        Standardizer.fit(np.array([["a"], ["b"]]))


# --- splitting ------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(n=st.integers(10, 200), val=st.sampled_from([0.0, 0.1, 0.15, 0.25]),
       test=st.sampled_from([0.0, 0.2, 0.3]), seed=st.integers(0, 2**31 - 1))
def test_split_indices_partition_and_sizes(n, val, test, seed):
    idx = split_indices(n, (1 - val - test, val, test), seed=seed)
    # Nearest-integer sizes with halves up, computed independently with Python's Decimal-free floor.
    want_val, want_test = int(val * n + 0.5), int(test * n + 0.5)
    assert (len(idx["val"]), len(idx["test"])) == (want_val, want_test)
    assert len(idx["train"]) == n - want_val - want_test
    together = np.concatenate([idx["train"], idx["val"], idx["test"]])
    assert sorted(together.tolist()) == list(range(n))  # disjoint and covering
    for part in idx.values():
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)  # sorted


def test_split_indices_unstratified_is_a_default_rng_permutation():
    order = np.random.default_rng(7).permutation(20)  # independent reconstruction
    idx = split_indices(20, (0.5, 0.25, 0.25), seed=7)
    assert idx["test"].tolist() == sorted(order[:5].tolist())
    assert idx["val"].tolist() == sorted(order[5:10].tolist())
    assert idx["train"].tolist() == sorted(order[10:].tolist())
    assert split_indices(20, (0.5, 0.25, 0.25), seed=8)["test"].tolist() != idx["test"].tolist()


def test_split_indices_halves_round_up():
    idx = split_indices(10, (0.5, 0.25, 0.25))  # 2.5 -> 3 each
    assert [len(idx[s]) for s in ("train", "val", "test")] == [4, 3, 3]


@pytest.mark.parametrize("stratify", [None, np.array([0, 0, 1, 1, 1])])
def test_split_indices_rejects_rounded_sizes_beyond_n(stratify):
    # 0.5 of 5 rounds up to 3 for both val and test: 6 > 5 examples. Before, the
    # unstratified split silently gave val 2 (not 3) and the stratified one a
    # confusing scikit-learn error.
    with pytest.raises(ValueError, match=r"split_indices: the val and test fractions 0.5 and "
                                         r"0.5 of 5 examples round to 3 \+ 3 = 6 examples"):
        split_indices(5, (0.0, 0.5, 0.5), stratify=stratify)


def test_stratified_split_keeps_class_proportions_and_matches_sklearn():
    from sklearn.model_selection import train_test_split

    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    idx = split_indices(100, (0.6, 0.2, 0.2), seed=3, stratify=labels)
    for part, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        counts = np.bincount(labels[idx[part]], minlength=4)
        assert np.all(np.abs(counts - frac * np.array([40, 30, 20, 10])) <= 1), (part, counts)
    rest, test = train_test_split(np.arange(100), test_size=20, random_state=3, stratify=labels)
    train, val = train_test_split(rest, test_size=20, random_state=3, stratify=labels[rest])
    assert idx["test"].tolist() == sorted(test.tolist())
    assert idx["val"].tolist() == sorted(val.tolist())
    assert idx["train"].tolist() == sorted(train.tolist())


def test_train_val_test_split_keeps_rows_aligned():
    x = np.arange(50, dtype=np.float32).reshape(25, 2)
    y = np.arange(25) % 5
    parts = train_val_test_split({"inputs": x, "labels": y}, (0.6, 0.2, 0.2), seed=1,
                                 stratify="labels")
    for split in parts.values():
        np.testing.assert_array_equal(split["labels"], (split["inputs"][:, 0] // 2) % 5)
        assert np.all(np.bincount(split["labels"], minlength=5) == len(split["labels"]) // 5)
    assert sum(len(p["labels"]) for p in parts.values()) == 25


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(arrays={}), r"train_val_test_split expected a non-empty dict of arrays"),
        (dict(arrays={"inputs": np.zeros(5), "labels": np.zeros(4)}),
         r"train_val_test_split: all arrays need the same number of examples .*'inputs': 5, 'labels': 4"),
        (dict(arrays={"inputs": np.zeros(5)}, stratify="labels"),
         r"train_val_test_split: stratify='labels' names no array; arrays are \['inputs'\]"),
        (dict(arrays={"inputs": np.zeros(10)}, fractions=(0.5, 0.3, 0.3)),
         r"train_val_test_split: fractions \(train, val, test\) must sum to 1, got \(0.5, 0.3, 0.3\)"),
        (dict(arrays={"inputs": np.zeros(10)}, fractions=(0.5, 0.5)),
         r"train_val_test_split: fractions must be \(train, val, test\), each in \[0, 1\], got \(0.5, 0.5\)"),
        (dict(arrays={"inputs": np.zeros(10)}, fractions=(0.96, 0.02, 0.02)),
         r"train_val_test_split: the val fraction 0.02 of 10 examples rounds to 0 examples"),
        (dict(arrays={"inputs": np.zeros(6)}, stratify=np.array([0, 0, 0, 0, 0, 1]),
              fractions=(0.5, 0.0, 0.5)),
         r"train_val_test_split: cannot stratify 3 of 6 examples by class \(class counts \{0: 5, 1: 1\}\)"),
    ],
)
def test_train_val_test_split_errors(kwargs, match):
    kwargs.setdefault("fractions", (0.6, 0.2, 0.2))
    with pytest.raises(ValueError, match=match):
        train_val_test_split(**kwargs)


def test_split_indices_stratify_shape_error():
    with pytest.raises(ValueError, match=r"split_indices: stratify must hold one label per example, shape \(10,\), got \(9,\)"):
        split_indices(10, stratify=np.zeros(9))


# --- load_tabular -------------------------------------------------------------------


def _classification(n=60):
    rng = np.random.default_rng(0)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 3)) + y[:, None] * 10.0
    return x, y


def test_load_tabular_classification_standardizes_with_train_statistics():
    x, y = _classification()
    ds = load_tabular(x, y, fractions=(0.5, 0.25, 0.25), seed=2)
    assert isinstance(ds, Dataset)
    assert ds.num_classes == 3 and ds.class_names == ("0", "1", "2")
    assert ds.input_shape == (3,)
    ref = sklearn_preprocessing.StandardScaler().fit(x[ds.indices["train"]])
    for split in ("train", "val", "test"):
        part = ds[split]
        assert part["inputs"].dtype == np.float32 and part["labels"].dtype == np.int32
        np.testing.assert_allclose(part["inputs"], ref.transform(x[ds.indices[split]]),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(part["labels"], y[ds.indices[split]])
        assert np.all(np.bincount(part["labels"]) == len(part["labels"]) // 3)  # stratified
    assert isinstance(ds.info["standardizer"], Standardizer)
    assert repr(ds) == "Dataset('tabular', train=30, val=15, test=15, input_shape=(3,), num_classes=3)"
    assert set(ds.splits) == {"train", "val", "test"}


def test_load_tabular_string_labels_regression_and_no_standardize():
    x, y = _classification(30)
    names = np.array(["cat", "ant", "bee"])[y]
    ds = load_tabular(x, names, feature_names=["a", "b", "c"], standardize=False)
    assert ds.class_names == ("ant", "bee", "cat")
    np.testing.assert_array_equal(np.array(ds.class_names)[ds.train["labels"]],
                                  names[ds.indices["train"]])
    np.testing.assert_array_equal(ds.train["inputs"], x[ds.indices["train"]].astype(np.float32))
    assert ds.info == {"feature_names": ("a", "b", "c")}

    target = x @ np.array([1.0, -2.0, 0.5])
    reg = load_tabular(x, target, seed=4)
    assert reg.num_classes is None and reg.class_names is None
    assert reg.test["labels"].dtype == np.float32
    np.testing.assert_allclose(reg.test["labels"], target[reg.indices["test"]], rtol=1e-6)
    # Regression is not stratified: the split is the plain default_rng(seed) permutation.
    np.testing.assert_array_equal(reg.indices["test"], split_indices(30, seed=4)["test"])


def test_dataset_feeds_batch_iterator():
    x, y = _classification()
    ds = load_tabular(x, y)
    batches = list(batch_iterator(ds["train"], batch_size=16, seed=0, epoch=0))
    assert batches[0]["inputs"].shape == (16, 3) and batches[0]["labels"].shape == (16,)
    assert sum(int(b["mask"].sum()) for b in batches) == len(ds.train["labels"])
    with pytest.raises(KeyError, match=r"Dataset 'tabular' has splits \('train', 'val', 'test'\), got 'valid'"):
        ds["valid"]


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "match"),
    [
        (np.zeros(10), np.zeros(10, int), {}, r"load_tabular expected numeric x of shape \[n, features\], got shape \(10,\)"),
        (np.zeros((10, 2)), np.zeros(9, int), {}, r"load_tabular expected y of shape \[n\] or \[n, targets\] with n=10 .*got \(9,\)"),
        (np.zeros((10, 2)), -np.ones(10, int), {}, r"load_tabular: integer class labels must be in \[0, num_classes\), got minimum -1"),
        (np.zeros((10, 2)), np.zeros((10, 2), int), {}, r"load_tabular: class labels must have shape \[n\], got \(10, 2\)"),
        (np.full((10, 2), np.nan), np.zeros(10), {}, r"load_tabular: x has NaN or inf in 10 rows \(first: \[0, 1, 2, 3, 4\]\)"),
        (np.zeros((10, 2)), np.zeros(10), {"feature_names": ["a"]}, r"load_tabular: got 1 feature_names for 2 feature columns"),
    ],
)
def test_load_tabular_errors(x, y, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_tabular(x, y, **kwargs)
