"""Pooling: max and average over spatial windows, global pools, flatten.

Layout is channels last, as everywhere in nnlib: ``x: [batch, *spatial,
channels]`` (``[batch, width, channels]`` in 1-D, ``[batch, height, width,
channels]`` in 2-D). A window slides over the spatial axes only; batch and
channels are never pooled.

Conventions:

- ``strides`` default to the window (non-overlapping windows, the usual
  "downsample by 2" pool); ``padding`` is ``"VALID"`` (no padding, the last
  partial window is dropped), ``"SAME"`` (``ceil(size / stride)`` outputs,
  padding split as in ``lax``: the extra cell goes after), an int ``p`` (``p``
  cells each side) or one ``(low, high)`` pair per spatial axis.
- Max pooling pads with ``-inf``, so padded cells never win.
- Average pooling with padding: by default padded cells *count*, as zeros, in
  the divisor (``count_include_pad=True``: flax's and PyTorch's default), so a
  window half off the edge averages to half its real cells' mean.
  ``count_include_pad=False`` divides by the number of real cells instead.

Speed: when the windows tile the input exactly (window == stride, no padding,
every spatial size divisible by its window) pooling is a reshape followed by a
reduction, ``x.reshape(B, H // 2, 2, W // 2, 2, C).max((2, 4))``. On CPU this
made a small CNN's train step 1.43x faster than ``lax.reduce_window``, whose
max gradient XLA lowers to a slow select-and-scatter (the gradient of a 2x2 max
pool alone on [64, 28, 28, 32]: 7 ms vs 57 ms on 2 cores). Other configurations
use ``lax.reduce_window``. Both paths give identical values and gradients: a
max window holding *tied* maxima sends its gradient to the first of them (in
row-major order within the window), as ``reduce_window`` and PyTorch do. The
reshape path defines that derivative itself (a plain reduction's would split it
equally among the ties and divide every cell by their count, a slower program).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from nnlib.layers._checks import ShapeError, check_input

Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]


def _as_tuple(value: int | Sequence[int], n: int, what: str, layer: str) -> tuple[int, ...]:
    """``3 -> (3, 3)`` for ``n=2``; a sequence must already have ``n`` entries."""
    out = (value,) * n if isinstance(value, int) else tuple(value)
    if len(out) != n or not all(isinstance(v, int | np.integer) and v >= 1 for v in out):
        raise ValueError(
            f"{layer} expected {what} to be a positive int or {n} positive ints "
            f"(one per spatial axis), got {value!r}"
        )
    return tuple(int(v) for v in out)


def _padding_pairs(
    padding: Padding,
    spatial: Sequence[int],
    window: Sequence[int],
    strides: Sequence[int],
    layer: str,
) -> tuple[tuple[int, int], ...]:
    """Resolves any padding spelling to explicit ``(low, high)`` pairs.

    ``window`` is the *effective* window (dilated kernel size for convs).
    """
    n = len(spatial)
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(
                f"{layer} padding must be 'SAME', 'VALID', an int or {n} "
                f"(low, high) pairs, got {padding!r}"
            )
        return tuple(lax.padtype_to_pads(spatial, window, strides, padding.upper()))
    if isinstance(padding, int):
        pairs = ((padding, padding),) * n
    else:
        pairs = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pairs) != n or any(len(p) != 2 or min(p) < 0 for p in pairs):
        raise ValueError(
            f"{layer} padding must be 'SAME', 'VALID', an int or {n} "
            f"(low, high) pairs of non-negative ints, got {padding!r}"
        )
    return tuple((int(lo), int(hi)) for lo, hi in pairs)


def _pool_geometry(
    x: Array,
    window: int | Sequence[int],
    strides: int | Sequence[int] | None,
    padding: Padding,
    layer: str,
    layout: str,
    ndim: int | None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, int], ...]]:
    """Validates ``x`` and resolves window, strides and padding per spatial axis."""
    check_input(layer, x, layout=layout, ndim=ndim, min_ndim=3)
    spatial = x.shape[1:-1]
    n = len(spatial)
    window = _as_tuple(window, n, "window", layer)
    strides = window if strides is None else _as_tuple(strides, n, "strides", layer)
    pads = _padding_pairs(padding, spatial, window, strides, layer)
    for size, w, (lo, hi) in zip(spatial, window, pads, strict=True):
        if size + lo + hi < w:
            raise ShapeError(
                f"{layer} window {window} is larger than the padded input: got "
                f"x of shape {tuple(x.shape)} for {layout} with padding {pads}"
            )
    return window, strides, pads


def _tiles_exactly(spatial, window, strides, pads) -> bool:
    """Whether the windows cover the input exactly once: the reshape fast path."""
    return all(
        w == s and size % w == 0 and lo == hi == 0
        for size, w, s, (lo, hi) in zip(spatial, window, strides, pads, strict=True)
    )


def _tiled(x: Array, window: Sequence[int]) -> tuple[Array, tuple[int, ...]]:
    """``[B, H, W, C] -> [B, H/wh, wh, W/ww, ww, C]`` and the window axes (2, 4)."""
    shape = [x.shape[0]]
    for size, w in zip(x.shape[1:-1], window, strict=True):
        shape += [size // w, w]
    shape.append(x.shape[-1])
    return x.reshape(shape), tuple(range(2, 2 * len(window) + 1, 2))


_ANY_RANK = "[batch, *spatial, channels]"


#: Windows up to this many cells mark their first maximum cell by cell.
_FIRST_MAXIMUM_UNROLL = 16


def _first_maximum(tiles: Array, axes: tuple[int, ...], maximum: Array) -> Array:
    """Bool mask of each window's first maximum (row-major order within the window).

    Small windows walk their cells in order, each cell a maximum no earlier
    cell was: elementwise work that XLA fuses into the gradient's one select
    (CNN benchmark step 29.5 -> 32 steps/s against a min-reduction of the
    positions, which larger windows use).
    """
    is_max = tiles == jnp.expand_dims(maximum, axes)
    sizes = [tiles.shape[a] for a in axes]
    if math.prod(sizes) > _FIRST_MAXIMUM_UNROLL:
        position = np.zeros([1] * tiles.ndim, np.int32)  # each cell's index in its window
        for a, stride in zip(axes, np.cumprod([1, *sizes[:0:-1]])[::-1], strict=True):
            shape = [1] * tiles.ndim
            shape[a] = tiles.shape[a]
            position = position + (np.arange(tiles.shape[a], dtype=np.int32) * stride).reshape(
                shape)
        candidate = jnp.where(is_max, position, math.prod(sizes))
        return candidate == jnp.expand_dims(candidate.min(axis=axes), axes)

    first, seen = {}, None
    for cell in itertools.product(*(range(n) for n in sizes)):
        index = [slice(None)] * tiles.ndim
        for a, i in zip(axes, cell, strict=True):
            index[a] = i
        here = is_max[tuple(index)]
        first[cell] = here if seen is None else here & ~seen
        seen = here if seen is None else seen | here

    def assemble(cell: tuple[int, ...]) -> Array:
        depth = len(cell)  # window axes before this one are already indexed away
        if depth == len(axes):
            return first[cell]
        return jnp.stack([assemble((*cell, i)) for i in range(sizes[depth])],
                         axis=axes[depth] - depth)

    return assemble(())


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _tiled_max(tiles: Array, axes: tuple[int, ...]) -> Array:
    """``tiles.max(axes)`` whose derivative follows each window's first maximum.

    A plain reduction's derivative splits a window's gradient equally among
    tied maxima and divides by their count on every cell; ``reduce_window``
    and PyTorch give it all to the first. Written as a JVP (the tangent of the
    first maximum), reverse mode is its transpose: one select per cell.
    """
    return tiles.max(axis=axes)


@_tiled_max.defjvp
def _tiled_max_jvp(axes, primals, tangents):
    (tiles,), (tangent,) = primals, tangents
    # Through the rule itself, so that the maximum's own derivative (second
    # order: the Hessian, forward over forward) follows the first maximum too.
    maximum = _tiled_max(tiles, axes)
    first = _first_maximum(tiles, axes, maximum)
    return maximum, jnp.where(first, tangent, jnp.zeros_like(tangent)).sum(axis=axes)


def _max_pool(x, window, strides, padding, layer="max_pool", layout=_ANY_RANK, ndim=None):
    window, strides, pads = _pool_geometry(x, window, strides, padding, layer, layout, ndim)
    if _tiles_exactly(x.shape[1:-1], window, strides, pads):
        # reduce_window's max gradient is a select-and-scatter, slow on XLA CPU;
        # a plain reduction's is not (module docstring has the numbers).
        tiles, axes = _tiled(x, window)  # [B, H/wh, wh, W/ww, ww, C]
        return _tiled_max(tiles, axes)
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0))
    )


def _avg_pool(
    x, window, strides, padding, count_include_pad, layer="avg_pool", layout=_ANY_RANK,
    ndim=None,
):
    window, strides, pads = _pool_geometry(x, window, strides, padding, layer, layout, ndim)
    if _tiles_exactly(x.shape[1:-1], window, strides, pads):
        tiles, axes = _tiled(x, window)  # [B, H/wh, wh, W/ww, ww, C]
        return tiles.mean(axis=axes)
    dims, steps, pads = (1, *window, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0))
    # Half precision sums in float32, as the reshape path's mean (and PyTorch) do.
    acc = np.promote_types(x.dtype, np.float32)
    total = lax.reduce_window(x.astype(acc), 0.0, lax.add, dims, steps, pads)
    if count_include_pad:
        return (total / math.prod(window)).astype(x.dtype)
    # Real cells per window depend only on position: count them on a
    # [1, *spatial, 1] grid of ones, a constant that XLA folds away.
    ones = jnp.ones((1, *x.shape[1:-1], 1), acc)
    return (total / lax.reduce_window(ones, 0.0, lax.add, dims, steps, pads)).astype(x.dtype)


def max_pool(
    x: Float[Array, "batch *spatial channels"],
    window: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: Padding = "VALID",
) -> Float[Array, "batch *out_spatial channels"]:
    """Maximum over each window.

    Args:
      x: ``[batch, *spatial, channels]``, floating point.
      window: window size, an int (same on every spatial axis) or one per axis.
      strides: step between windows; default ``window``.
      padding: ``"VALID"``, ``"SAME"``, int, or ``(low, high)`` per axis;
        padded cells are ``-inf``.

    Returns:
      ``[batch, *out_spatial, channels]``.
    """
    return _max_pool(x, window, strides, padding)


def avg_pool(
    x: Float[Array, "batch *spatial channels"],
    window: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: Padding = "VALID",
    count_include_pad: bool = True,
) -> Float[Array, "batch *out_spatial channels"]:
    """Mean over each window.

    Args:
      x: ``[batch, *spatial, channels]``, floating point.
      window: window size, an int (same on every spatial axis) or one per axis.
      strides: step between windows; default ``window``.
      padding: ``"VALID"``, ``"SAME"``, int, or ``(low, high)`` per axis;
        padded cells are zeros.
      count_include_pad: divide by the full window size, padded cells included
        (flax's and PyTorch's default); ``False`` divides by the number of real
        cells in each window.

    Returns:
      ``[batch, *out_spatial, channels]``.
    """
    return _avg_pool(x, window, strides, padding, count_include_pad)


class _Pool(nn.Module):
    """Shared body of the pooling modules; subclasses fix the rank and reducer."""

    window: int | Sequence[int] = 2
    strides: int | Sequence[int] | None = None
    padding: Padding = "VALID"

    # Fixed per subclass (not dataclass fields): the name and layout that
    # error messages use, and the rank the layer accepts.
    _name: ClassVar[str]
    _layout: ClassVar[str]
    _ndim: ClassVar[int]


class MaxPool1D(_Pool):
    """Max pooling over width: ``x: [batch, width, channels] -> [batch, out_width, channels]``.

    Attributes:
      window: window width (default 2).
      strides: step between windows; default ``window``.
      padding: ``"VALID"`` (default), ``"SAME"``, int, or ``[(low, high)]``.
    """

    _name = "MaxPool1D"
    _layout = "[batch, width, channels]"
    _ndim = 3

    def __call__(
        self, x: Float[Array, "batch width channels"]
    ) -> Float[Array, "batch out_width channels"]:
        return _max_pool(
            x, self.window, self.strides, self.padding, self._name, self._layout, self._ndim
        )


class MaxPool2D(_Pool):
    """Max pooling over height and width.

    ``x: [batch, height, width, channels] -> [batch, out_height, out_width, channels]``.

    Attributes:
      window: window size, int or ``(height, width)`` (default 2).
      strides: step between windows; default ``window``.
      padding: ``"VALID"`` (default), ``"SAME"``, int, or two ``(low, high)`` pairs.
    """

    _name = "MaxPool2D"
    _layout = "[batch, height, width, channels]"
    _ndim = 4

    def __call__(
        self, x: Float[Array, "batch height width channels"]
    ) -> Float[Array, "batch out_height out_width channels"]:
        return _max_pool(
            x, self.window, self.strides, self.padding, self._name, self._layout, self._ndim
        )


class AvgPool1D(_Pool):
    """Average pooling over width: ``x: [batch, width, channels] -> [batch, out_width, channels]``.

    Attributes:
      window: window width (default 2).
      strides: step between windows; default ``window``.
      padding: ``"VALID"`` (default), ``"SAME"``, int, or ``[(low, high)]``.
      count_include_pad: padded cells count (as zeros) in the divisor.
    """

    count_include_pad: bool = True

    _name = "AvgPool1D"
    _layout = "[batch, width, channels]"
    _ndim = 3

    def __call__(
        self, x: Float[Array, "batch width channels"]
    ) -> Float[Array, "batch out_width channels"]:
        return _avg_pool(
            x, self.window, self.strides, self.padding, self.count_include_pad,
            self._name, self._layout, self._ndim,
        )


class AvgPool2D(_Pool):
    """Average pooling over height and width.

    ``x: [batch, height, width, channels] -> [batch, out_height, out_width, channels]``.

    Attributes:
      window: window size, int or ``(height, width)`` (default 2).
      strides: step between windows; default ``window``.
      padding: ``"VALID"`` (default), ``"SAME"``, int, or two ``(low, high)`` pairs.
      count_include_pad: padded cells count (as zeros) in the divisor.
    """

    count_include_pad: bool = True

    _name = "AvgPool2D"
    _layout = "[batch, height, width, channels]"
    _ndim = 4

    def __call__(
        self, x: Float[Array, "batch height width channels"]
    ) -> Float[Array, "batch out_height out_width channels"]:
        return _avg_pool(
            x, self.window, self.strides, self.padding, self.count_include_pad,
            self._name, self._layout, self._ndim,
        )


class GlobalAvgPool(nn.Module):
    """Mean over all spatial axes: ``x: [batch, *spatial, channels] -> [batch, channels]``."""

    def __call__(
        self, x: Float[Array, "batch *spatial channels"]
    ) -> Float[Array, "batch channels"]:
        check_input("GlobalAvgPool", x, layout="[batch, *spatial, channels]", min_ndim=3)
        return x.mean(axis=tuple(range(1, x.ndim - 1)))


class GlobalMaxPool(nn.Module):
    """Maximum over all spatial axes: ``x: [batch, *spatial, channels] -> [batch, channels]``."""

    def __call__(
        self, x: Float[Array, "batch *spatial channels"]
    ) -> Float[Array, "batch channels"]:
        check_input("GlobalMaxPool", x, layout="[batch, *spatial, channels]", min_ndim=3)
        return x.max(axis=tuple(range(1, x.ndim - 1)))


class Flatten(nn.Module):
    """Keeps the batch axis, flattens the rest: ``x: [batch, ...] -> [batch, prod(...)]``.

    Any dtype is accepted (flattening integer ids is fine).
    """

    def __call__(self, x: Array) -> Array:
        check_input("Flatten", x, layout="[batch, ...]", min_ndim=2, floating=False)
        return x.reshape(x.shape[0], -1)
