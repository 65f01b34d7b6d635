"""Minibatches from in-memory arrays: deterministic, fixed-shape, resumable.

``batch_iterator`` cuts a dict of equally long arrays into dict batches.

* **Deterministic order.** The shuffle of epoch ``e`` comes from a numpy
  ``Generator`` seeded with ``[seed, e]``: the same (seed, epoch) always gives
  the same batches, whatever happened in earlier epochs or processes. That is
  what lets a resumed run re-create the interrupted epoch exactly.
* **Fixed shapes.** Unless ``drop_remainder=True``, the last partial batch is
  padded to ``batch_size`` by repeating the epoch's first examples, so a jitted
  step compiles once per epoch instead of twice. Every batch carries a
  ``"mask"`` (``float32 [batch]``, 1.0 for real rows, 0.0 for padding; all
  ones when there is no padding), so the pytree structure never changes
  either. ``nnlib.train.step`` losses and metrics ignore masked rows. Layers
  that compute batch statistics in training (BatchNorm) *do* see padding rows:
  train those with ``drop_remainder=True``.
* **Resumable.** ``start_batch=k`` skips straight to the k-th batch of the
  epoch (no data is read for the skipped ones).

``prefetch`` runs any iterator a few items ahead in a background thread,
overlapping data preparation with the device step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Mapping

import numpy as np


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Number of batches ``batch_iterator`` yields for ``num_examples`` examples."""
    if batch_size <= 0:
        raise ValueError(f"num_batches: batch_size must be a positive integer, got {batch_size}")
    if drop_remainder:
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> int:
    """Validates the arrays and returns their common length."""
    if not isinstance(arrays, Mapping) or not arrays:
        raise ValueError(
            "batch_iterator expected a non-empty dict of arrays such as "
            f"{{'inputs': x, 'labels': y}}, got {arrays!r:.80}"
        )
    lengths = {}
    for name, value in arrays.items():
        shape = np.shape(value)
        if not shape:
            raise ValueError(
                f"batch_iterator: array {name!r} is a scalar; every array needs a "
                "leading example axis [num_examples, ...]"
            )
        lengths[name] = shape[0]
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{k!r}: {n}" for k, n in lengths.items())
        raise ValueError(
            "batch_iterator: all arrays need the same number of examples (leading axis), "
            f"got {described}"
        )
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(f"batch_iterator: the arrays are empty (0 examples in {list(lengths)})")
    return n


def epoch_order(num_examples: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True
                ) -> np.ndarray:
    """The example order of one epoch: a permutation seeded by ``[seed, epoch]``."""
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_iterator(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = False,
    start_batch: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields the batches of one epoch as dicts of numpy arrays.

    Args:
      arrays: ``{name: [num_examples, ...]}``, e.g. ``{"inputs": x, "labels": y}``.
        An existing ``"mask"`` array is kept (cast to float32) and its padding
        rows set to 0.
      batch_size: examples per batch.
      seed, epoch: the shuffle is a permutation drawn from
        ``np.random.default_rng([seed, epoch])``.
      shuffle: ``False`` keeps the stored order (evaluation).
      drop_remainder: drop the last partial batch instead of padding it.
      start_batch: index of the first batch to yield (resume mid-epoch).

    Yields:
      ``{name: [batch_size, ...], "mask": float32 [batch_size]}``.

    Errors (raised at the call, not at the first ``next``): empty or
    mismatched arrays, ``batch_size <= 0``, ``start_batch`` out of range, and
    ``drop_remainder=True`` with fewer examples than one batch.
    """
    n = _check_arrays(arrays)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or (
            batch_size <= 0):
        raise ValueError(
            f"batch_iterator: batch_size must be a positive integer, got {batch_size!r}")
    total = num_batches(n, batch_size, drop_remainder)
    if total == 0:
        raise ValueError(
            f"batch_iterator: drop_remainder=True with {n} examples and batch_size={batch_size} "
            "gives no batches; lower batch_size or set drop_remainder=False"
        )
    if not 0 <= start_batch <= total:
        raise ValueError(
            f"batch_iterator: start_batch must be in [0, {total}] for {n} examples and "
            f"batch_size={batch_size}, got {start_batch}"
        )
    order = epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    base_mask = arrays.pop("mask", None)
    base_mask = (np.ones((n,), np.float32) if base_mask is None
                 else base_mask.astype(np.float32).reshape(n))
    return _batches(arrays, base_mask, order, batch_size, start_batch, total)


def _batches(arrays, base_mask, order, batch_size, start_batch, total):
    n = order.shape[0]
    for b in range(start_batch, total):
        idx = order[b * batch_size:(b + 1) * batch_size]  # [<= batch_size]
        real = idx.shape[0]
        if real < batch_size:
            # Pad with the epoch's first examples: real values (no NaN from
            # zeros through a log), masked out of every loss and metric.
            idx = np.concatenate([idx, order[np.arange(batch_size - real) % n]])
        batch = {k: v[idx] for k, v in arrays.items()}
        mask = base_mask[idx]
        mask[real:] = 0.0
        batch["mask"] = mask  # [batch_size]
        yield batch


_DONE = object()


class prefetch:  # noqa: N801 -- used like a function: ``for b in prefetch(it): ...``
    """Iterates ``iterator`` ``size`` items ahead in a daemon thread.

    Order is preserved; an exception raised by the source is re-raised in the
    consumer. ``close()`` (or leaving a ``with`` block) stops the thread
    early.
    """

    def __init__(self, iterator: Iterable, size: int = 2):
        if size < 1:
            raise ValueError(f"prefetch: size must be >= 1, got {size}")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iter(iterator),), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, iterator: Iterator) -> None:
        try:
            for item in iterator:
                if not self._put((item, None)):
                    return
        except BaseException as e:  # handed to the consumer, re-raised there
            self._put((_DONE, e))
            return
        self._put((_DONE, None))

    def __iter__(self):
        return self

    def __next__(self):
        if self._stop.is_set():
            raise StopIteration
        item, error = self._queue.get()
        if item is _DONE:
            self._stop.set()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
