"""Tests for nnlib.data.batching: order fixed by (seed, epoch), padded fixed-shape
batches with a mask, resuming at a batch, errors, and the prefetch thread."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnlib.data.batching import batch_iterator, epoch_order, num_batches, prefetch


def _arrays(n=10):
    return {"inputs": np.arange(n * 3, dtype=np.float32).reshape(n, 3),
            "labels": np.arange(n, dtype=np.int32)}


def _ids(batches):
    """The example ids (labels) of the real rows, batch by batch."""
    return [b["labels"][b["mask"] > 0].tolist() for b in batches]


def test_order_is_a_function_of_seed_and_epoch():
    a = list(batch_iterator(_arrays(), 4, seed=1, epoch=2))
    b = list(batch_iterator(_arrays(), 4, seed=1, epoch=2))
    assert _ids(a) == _ids(b)
    # the permutation is numpy's, seeded with [seed, epoch] (independent reference)
    expected = np.random.default_rng([1, 2]).permutation(10)
    assert sum(_ids(a), []) == expected.tolist()
    assert _ids(batch_iterator(_arrays(), 4, seed=1, epoch=3)) != _ids(a)
    assert _ids(batch_iterator(_arrays(), 4, seed=2, epoch=2)) != _ids(a)
    assert sum(_ids(batch_iterator(_arrays(), 4, shuffle=False)), []) == list(range(10))
    assert epoch_order(5, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def test_last_batch_is_padded_and_masked_with_constant_structure():
    batches = list(batch_iterator(_arrays(10), 4, seed=0))
    assert len(batches) == 3 == num_batches(10, 4)
    for b in batches:
        assert set(b) == {"inputs", "labels", "mask"}
        assert b["inputs"].shape == (4, 3) and b["labels"].shape == (4,)
        assert b["mask"].dtype == np.float32 and b["mask"].shape == (4,)
    assert batches[0]["mask"].tolist() == [1, 1, 1, 1]
    assert batches[2]["mask"].tolist() == [1, 1, 0, 0]
    # rows match across keys, padding included (rows are real examples)
    for b in batches:
        np.testing.assert_array_equal(b["inputs"][:, 0], b["labels"] * 3.0)


def test_drop_remainder_and_tiny_datasets():
    batches = list(batch_iterator(_arrays(10), 4, drop_remainder=True))
    assert len(batches) == 2 == num_batches(10, 4, drop_remainder=True)
    assert all(b["mask"].tolist() == [1, 1, 1, 1] for b in batches)
    # fewer examples than one batch: padding repeats them
    (only,) = batch_iterator(_arrays(3), 8, shuffle=False)
    assert only["labels"].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert only["mask"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_start_batch_skips_exactly():
    full = list(batch_iterator(_arrays(10), 3, seed=4, epoch=1))
    resumed = list(batch_iterator(_arrays(10), 3, seed=4, epoch=1, start_batch=2))
    assert _ids(resumed) == _ids(full[2:])
    assert list(batch_iterator(_arrays(10), 3, start_batch=4)) == []


def test_given_mask_is_kept_and_zeroed_on_padding():
    arrays = {**_arrays(5), "mask": np.array([1, 0, 1, 1, 0], bool)}
    b1, b2 = batch_iterator(arrays, 3, shuffle=False)
    assert b1["mask"].tolist() == [1, 0, 1] and b2["mask"].tolist() == [1, 0, 0]
    assert arrays["mask"].dtype == bool  # the input is not modified


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 40), batch_size=st.integers(1, 12), seed=st.integers(0, 99))
def test_every_example_exactly_once_per_epoch(n, batch_size, seed):
    batches = list(batch_iterator(_arrays(n), batch_size, seed=seed))
    assert len(batches) == num_batches(n, batch_size)
    assert all(b["labels"].shape == (batch_size,) for b in batches)
    assert sorted(sum(_ids(batches), [])) == list(range(n))


@pytest.mark.parametrize("arrays, kwargs, match", [
    ({}, {}, "expected a non-empty dict of arrays"),
    ({"inputs": np.zeros((0, 2))}, {}, r"the arrays are empty \(0 examples in \['inputs'\]\)"),
    ({"inputs": np.zeros((4, 2)), "labels": np.zeros(3)}, {},
     r"same number of examples .* got 'inputs': 4, 'labels': 3"),
    ({"inputs": np.zeros((4, 2)), "labels": np.float32(1)}, {}, "'labels' is a scalar"),
    (_arrays(), {"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    (_arrays(), {"batch_size": -2}, "batch_size must be a positive integer, got -2"),
    (_arrays(), {"batch_size": 2.5}, "batch_size must be a positive integer, got 2.5"),
    (_arrays(), {"start_batch": 6}, r"start_batch must be in \[0, 5\] .* got 6"),
    (_arrays(), {"batch_size": 16, "drop_remainder": True},
     "drop_remainder=True with 10 examples and batch_size=16 gives no batches"),
])
def test_errors_are_raised_at_the_call(arrays, kwargs, match):
    kwargs = {"batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        batch_iterator(arrays, **kwargs)  # no next(): errors come before iteration


def test_num_batches_error():
    with pytest.raises(ValueError, match="num_batches: batch_size must be a positive integer"):
        num_batches(10, 0)


def test_prefetch_keeps_order_and_reraises():
    assert list(prefetch(iter(range(20)), size=3)) == list(range(20))

    def failing():
        yield 1
        raise RuntimeError("source broke")

    it = prefetch(failing())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="source broke"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    with pytest.raises(ValueError, match="prefetch: size must be >= 1, got 0"):
        prefetch([], size=0)


def test_prefetch_close_stops_the_thread():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    with prefetch(endless(), size=2) as it:
        assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert not it._thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)
