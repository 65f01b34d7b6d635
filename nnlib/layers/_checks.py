"""Early, readable input validation shared by every layer.

Errors raised here name the layer, the shape (or dtype) it got and the shape it
expected, in the user's layout vocabulary, e.g.::

    LSTM expected inputs of shape [batch, time, features] with features=32,
    got shape (8, 16, 5)

Checks run on static shape/dtype information only, so they work identically on
concrete arrays and on tracers inside ``jit``/``vmap``/``grad`` and cost nothing
at run time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np


class ShapeError(ValueError):
    """An input had the wrong rank or size for the layer that received it."""


def _shape_dtype(layer: str, x: Any, name: str) -> tuple[tuple[int, ...], np.dtype]:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(
            f"{layer} expected {name} to be an array, got {type(x).__name__}"
        )
    return tuple(shape), np.dtype(dtype)


def check_input(
    layer: str,
    x: Any,
    *,
    layout: str,
    ndim: int | Sequence[int] | None = None,
    min_ndim: int | None = None,
    features: int | None = None,
    floating: bool = True,
    name: str = "inputs",
) -> None:
    """Validates rank, trailing feature size and dtype of ``x``.

    Args:
      layer: the layer's name as the user knows it (``"LSTM"``).
      x: the array (or tracer) to check.
      layout: the expected layout in words, e.g. ``"[batch, time, features]"``.
      ndim: allowed rank(s); ``None`` skips the check.
      min_ndim: smallest allowed rank; ``None`` skips the check.
      features: expected size of the last axis; ``None`` skips the check.
      floating: require a floating-point dtype (integer token ids, booleans and
        the like are rejected with a hint to cast).
      name: what the argument is called in the error message.

    Raises:
      ShapeError: wrong rank or wrong feature size.
      TypeError: not an array, or not floating point when ``floating``.
    """
    shape, dtype = _shape_dtype(layer, x, name)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if len(shape) not in allowed:
            ranks = " or ".join(str(r) for r in allowed)
            raise ShapeError(
                f"{layer} expected {name} of shape {layout} (rank {ranks}), "
                f"got shape {shape} (rank {len(shape)})"
            )
    if min_ndim is not None and len(shape) < min_ndim:
        raise ShapeError(
            f"{layer} expected {name} of shape {layout} (rank >= {min_ndim}), "
            f"got shape {shape} (rank {len(shape)})"
        )
    if features is not None and (not shape or shape[-1] != features):
        raise ShapeError(
            f"{layer} expected {name} of shape {layout} with features={features}, "
            f"got shape {shape}"
        )
    if floating and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{layer} expected floating-point {name} of shape {layout}, got dtype "
            f"{dtype} with shape {shape}; cast first, e.g. x.astype(jnp.float32)"
        )


def check_mask(
    layer: str,
    mask: Any,
    expected: Sequence[int],
    *,
    layout: str,
    name: str = "mask",
    broadcast: bool = False,
) -> None:
    """Validates a mask against the shape it has to match.

    Args:
      layer: the layer's name.
      mask: boolean (or 0/1) array, or ``None`` (accepted, nothing to check).
      expected: the full shape the mask applies to.
      layout: the expected layout in words, e.g. ``"[batch, time]"``.
      name: what the argument is called in the error message.
      broadcast: accept any shape of the same rank that broadcasts to
        ``expected`` (size-1 axes), as attention masks do.
    """
    if mask is None:
        return
    shape, _ = _shape_dtype(layer, mask, name)
    expected = tuple(int(d) for d in expected)
    ok = shape == expected
    if broadcast and not ok and len(shape) == len(expected):
        ok = all(m in (1, e) for m, e in zip(shape, expected, strict=True))
    if not ok:
        how = "broadcastable to" if broadcast else "of shape"
        raise ShapeError(
            f"{layer} expected {name} {how} {layout} = {expected}, got shape {shape}"
        )


def param_shape(variables: Mapping[str, Any], *path: str) -> tuple[int, ...] | None:
    """Shape of an already-initialised variable, or ``None`` while initialising.

    Used inside ``nn.compact`` methods to compare an input against the feature
    size the parameters were built for, before flax reports the mismatch as a
    parameter-shape error deep inside the scope machinery::

        kernel = param_shape(self.variables, "params", "kernel")
    """
    node: Any = variables
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return tuple(node.shape)
