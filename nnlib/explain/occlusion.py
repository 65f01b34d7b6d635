"""Occlusion sensitivity: how much the target score drops when a patch is hidden.

Zeiler & Fergus (2014, "Visualizing and Understanding Convolutional
Networks") slide a grey square over the image and record the classifier's
score for the true class at every position: where hiding the patch hurts, the
model was looking. Here a window of ``baseline_value`` slides over the spatial
axes (all channels hidden together) with a given stride, and each input
position gets the *average* drop of the target logit over the windows that
cover it (the per-pixel map of Captum's ``Occlusion``)::

    drop_p    = logit_t(x) - logit_t(x with window p set to baseline_value)
    map[i, j] = mean_{p covers (i, j)} drop_p      (0 where no window reaches)

Only windows that lie fully inside the input are used: positions ``0, s,
2s, ...`` while ``start + window <= size``; with a stride that does not tile
the input, the last rows/columns may be covered by no window.

All ``P`` occluded copies of the batch are scored by the model in chunks of
``batch_size`` window positions (``batch_size * B`` rows per forward pass)
inside a ``lax.scan``, so memory holds one chunk whatever ``P`` is.

Conventions: the model function as in ``nnlib.explain.gradients``
(evaluation mode, ``Partial(model.apply, variables)`` preferred, ``target:
[B]`` or ``None`` for the predicted class). Shapes: ``x: [B, *spatial,
channels]``, e.g. ``[B, H, W, C]`` images or ``[B, T, F]`` sequences; P
window positions.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from nnlib.explain.gradients import (
    ModelFn,
    _check_batch_size,
    _check_model_input,
    _check_target,
    _join_model,
    _scan_chunks,
    _split_model,
    _target_logits,
)
from nnlib.layers._checks import ShapeError


def _per_axis(fn: str, name: str, value: int | Sequence[int], spatial: tuple[int, ...]
              ) -> tuple[int, ...]:
    values = (value,) * len(spatial) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != len(spatial) or any(
            isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
            for v in values):
        raise ValueError(f"{fn} expected {name} to be a positive int or {len(spatial)} positive "
                         f"ints (one per spatial axis of {spatial}), got {value!r}")
    return tuple(int(v) for v in values)


def _window_starts(spatial: Sequence[int], window: Sequence[int], stride: Sequence[int]
                  ) -> np.ndarray:
    """``[P, len(spatial)]`` corner of every window lying fully inside ``spatial``,
    in row-major order of the positions."""
    ranges = [range(0, size - w + 1, s) for size, w, s in zip(spatial, window, stride,
                                                              strict=True)]
    return np.array(list(itertools.product(*ranges)), dtype=np.int32).reshape(-1, len(spatial))


def _window_masks(starts: Array, spatial: tuple[int, ...], window: tuple[int, ...]) -> Array:
    """``starts: [c, n]`` -> boolean ``[c, *spatial]``, True inside each window."""
    mask = jnp.ones((starts.shape[0],) + spatial, bool)
    for axis, (size, w) in enumerate(zip(spatial, window, strict=True)):
        index = jnp.arange(size, dtype=jnp.int32)  # [size]
        start = starts[:, axis][:, None]  # [c, 1]
        inside = (index[None] >= start) & (index[None] < start + w)  # [c, size]
        shape = [starts.shape[0]] + [1] * len(spatial)
        shape[axis + 1] = size
        mask = mask & inside.reshape(shape)
    return mask  # [c, *spatial]


@functools.partial(jax.jit, static_argnames=("static", "window", "chunk"))
def _occlusion(static, arrays, x, target, starts, baseline_value, *, window, chunk):
    f = _join_model(static, arrays)
    spatial = x.shape[1:-1]
    logits = f(x)  # [B, C]
    target = jnp.argmax(logits, axis=-1) if target is None else target
    clean = _target_logits(logits, target)  # [B]
    fill = jnp.asarray(baseline_value, x.dtype)
    num_positions = starts.shape[0]
    valid = jnp.ones((num_positions,), x.dtype)  # 0 on the scan's padding rows

    def body(total, start, keep):  # start: [c, n], keep: [c]
        c = start.shape[0]
        mask = _window_masks(start, spatial, window)  # [c, *spatial]
        occluded = jnp.where(mask[:, None, ..., None], fill, x[None])  # [c, B, *spatial, C]
        rows = occluded.reshape((c * x.shape[0],) + x.shape[1:])  # [c * B, ...]
        scores = _target_logits(f(rows), jnp.tile(target, c)).reshape(c, x.shape[0])  # [c, B]
        drop = (clean[None] - scores) * keep[:, None]  # [c, B]
        return total + jnp.tensordot(drop, mask.astype(x.dtype), axes=([0], [0]))  # [B, *sp]

    total = _scan_chunks(body, (starts, valid), chunk, jnp.zeros(x.shape[:-1], x.dtype))
    # How many windows cover each position: [P, *spatial] booleans, small next to a chunk.
    coverage = jnp.sum(_window_masks(starts, spatial, window).astype(x.dtype), axis=0)
    return jnp.where(coverage > 0, total / jnp.maximum(coverage, 1.0), jnp.zeros_like(total))


def occlusion(
    f: ModelFn,
    x: Float[Array, "batch *spatial channels"],
    target: Int[Array, " batch"] | None = None,
    *,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    baseline_value: float = 0.0,
    batch_size: int | None = 64,
) -> Float[Array, "batch ..."]:
    """Occlusion map (Zeiler & Fergus 2014): average target-logit drop per position.

    Args:
      f: ``x [B, ...] -> logits [B, classes]`` (see ``nnlib.explain.gradients``).
      x: ``[B, *spatial, channels]``, e.g. ``[B, H, W, C]``.
      target: ``[B]`` class ids to explain; ``None``: the predicted classes.
      window: occluding patch size, an int for every spatial axis or one per
        axis, e.g. ``(4, 4)``; it covers all channels.
      stride: step between window positions (``None``: ``window``, i.e.
        non-overlapping patches). A stride smaller than the window gives a
        smoother map at the cost of more forward passes.
      baseline_value: what hidden inputs are set to (0 for black on [0, 1]
        pixels; the dataset mean is another common choice).
      batch_size: window positions per forward pass (``batch_size * B`` rows);
        ``None``: all at once.

    Returns:
      ``[B, *spatial]``: positive where hiding the input lowers the target
      logit; 0 where no window reaches.
    """
    fn = "occlusion"
    x, num_classes = _check_model_input(fn, f, x)
    if x.ndim < 3:
        raise ShapeError(f"{fn} expected x of shape [batch, *spatial, channels] (rank >= 3, "
                         f"e.g. [batch, height, width, channels]), got shape {tuple(x.shape)}")
    target = _check_target(fn, target, x.shape[0], num_classes)
    spatial = tuple(int(s) for s in x.shape[1:-1])
    window = _per_axis(fn, "window", window, spatial)
    stride = window if stride is None else _per_axis(fn, "stride", stride, spatial)
    if any(w > s for w, s in zip(window, spatial, strict=True)):
        raise ShapeError(f"{fn} got window {window} larger than the spatial size {spatial} of "
                         f"x [batch, *spatial, channels] = {tuple(x.shape)}")
    starts = _window_starts(spatial, window, stride)  # [P, n]
    chunk = _check_batch_size(fn, batch_size, len(starts))
    if np.ndim(baseline_value) != 0:
        raise ValueError(f"{fn} expected a scalar baseline_value, got shape "
                         f"{np.shape(baseline_value)}")
    static, arrays = _split_model(f)
    return _occlusion(static, arrays, x, target, jnp.asarray(starts), baseline_value,
                      window=window, chunk=chunk)


__all__ = ["occlusion"]
