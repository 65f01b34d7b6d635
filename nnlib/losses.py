"""Loss functions: cross-entropy, binary cross-entropy, squared error, Huber, L2.

Every loss is a pure function of arrays, safe under ``jit``, ``vmap`` and
``grad``: input checks read static shapes and dtypes only, and nothing branches
on array values. Each is wrapped in ``jax.jit`` so an eager call compiles one
program per input shape instead of dispatching a dozen small ops (inside a
caller's ``jit`` it simply inlines); its configuration (``reduction``,
``label_smoothing``, ``delta``, ``eps``, ``kernels_only``) is static, so pass
Python values. The pointwise formulas come from optax; this module owns the
validation, masking and reduction, which are the same for every loss:

* **Per-example shape.** One loss value per prediction: ``labels.shape`` for
  classification (``[batch]`` or ``[batch, time]`` for tokens), the full shape
  of ``predictions`` for elementwise losses (binary cross-entropy, squared
  error, Huber).
* **mask** holds per-example weights (bool, or float for weighting) of the
  per-example shape, or of a leading part of it (``[batch]`` for a
  ``[batch, time]`` loss) that is broadcast over the remaining axes. Entries
  with weight 0 contribute nothing, even if their loss is inf or NaN. Padding
  labels such as PyTorch's ``ignore_index=-100`` are safe once masked
  (``mask = labels != -100``): masked labels are never used as an index.
* **reduction**: ``"mean"`` (default) is the weighted mean over unmasked
  entries, ``sum(w * loss) / sum(w)``, and 0 (not NaN) when everything is
  masked; ``"sum"`` is ``sum(w * loss)``; ``"none"`` returns the per-example
  ``w * loss`` with masked entries exactly 0.

Shapes glossary: ``...`` is any batch layout (``[batch]``, ``[batch, time]``);
``classes`` is the number of classes.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PyTree

from nnlib.layers._checks import ShapeError, check_input

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")


# --- validation, masking and reduction shared by every loss (and metrics.py) ---


def _check_reduction(fn: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn} expected reduction 'mean', 'sum' or 'none', got {reduction!r}")


def _check_same_shape(fn: str, x: Array, name: str, ref: Array, ref_name: str) -> None:
    if x.shape != ref.shape:
        raise ShapeError(
            f"{fn} expected {name} of the same shape as {ref_name} {ref.shape}, "
            f"got shape {x.shape}"
        )


def _check_class_logits(fn: str, logits: Array, labels: Array) -> None:
    """``logits: [..., classes]`` floating, ``labels: [...]`` integer class ids."""
    check_input(fn, logits, layout="[..., classes]", min_ndim=1, name="logits")
    expected = logits.shape[:-1]
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"{fn} expected integer class labels of shape [...] = {expected}, got dtype "
            f"{labels.dtype} with shape {labels.shape}; for target probabilities use "
            f"softmax_cross_entropy_with_probs"
        )
    if labels.shape != expected:
        raise ShapeError(
            f"{fn} expected labels of shape [...] = {expected} to match logits "
            f"[..., classes] = {logits.shape}, got shape {labels.shape}"
        )


def _mask_weights(fn: str, mask: Any, shape: tuple[int, ...], dtype: Any) -> Array | None:
    """The mask as weights of the full per-example ``shape`` (``None`` if no mask)."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    k = mask.ndim
    if (k == 0 and shape) or mask.shape != shape[:k]:
        raise ShapeError(
            f"{fn} expected mask of the per-example shape {shape} or a leading part of "
            f"it such as {shape[:1]}, got shape {mask.shape}"
        )
    mask = mask.reshape(mask.shape + (1,) * (len(shape) - k))  # [batch] -> [batch, 1, ...]
    return jnp.broadcast_to(mask.astype(dtype), shape)


def _weighted_mean(values: Array, weights: Array | None) -> Array:
    """``sum(w * v) / sum(w)``; 0 when every weight is 0, rather than 0 / 0."""
    if weights is None:
        return jnp.mean(values)
    # Accumulate in float32 at least, as jnp.mean does: a float16 count overflows to inf
    # past 65504 examples (inf / inf = NaN), and bfloat16 rounds it to 8 bits.
    dtype = values.dtype
    acc = np.promote_types(dtype, np.float32)  # numpy's: jnp's raises under strict promotion
    values, weights = values.astype(acc), weights.astype(acc)
    total = jnp.sum(jnp.where(weights != 0, values * weights, 0))
    count = jnp.sum(weights)
    # The inner where keeps the division (and its gradient) finite when count is 0.
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1), 0).astype(dtype)


def _reduce(per_example: Array, weights: Array | None, reduction: str) -> Array:
    if reduction == "mean":
        return _weighted_mean(per_example, weights)
    if weights is not None:
        # where, not just a product: a masked inf/NaN loss times 0 would still be NaN.
        per_example = jnp.where(weights != 0, per_example * weights, 0)
    return per_example if reduction == "none" else jnp.sum(per_example)


def _check_elementwise(
    fn: str, predictions: Any, targets: Any, names: tuple[str, str]
) -> tuple[Array, Array]:
    """Floating ``predictions`` and same-shape ``targets`` cast to their dtype."""
    predictions, targets = jnp.asarray(predictions), jnp.asarray(targets)
    check_input(fn, predictions, layout="[...]", name=names[0])
    _check_same_shape(fn, targets, names[1], predictions, names[0])
    return predictions, targets.astype(predictions.dtype)


# --- classification ---


@functools.partial(jax.jit, static_argnames=("label_smoothing", "reduction"))
def softmax_cross_entropy(
    logits: Float[Array, "*batch classes"],
    labels: Int[Array, "*batch"],
    *,
    label_smoothing: float = 0.0,
    mask: Any = None,
    reduction: Reduction = "mean",
) -> Float[Array, "*out"]:
    """Cross-entropy of integer class labels under ``softmax(logits)``.

    With label smoothing (Szegedy et al. 2016, "Rethinking the Inception
    Architecture"; PyTorch's ``label_smoothing``) the target is
    ``(1 - eps) * onehot(label) + eps / classes``.

    Args:
      logits: ``[..., classes]`` unnormalized log-probabilities.
      labels: ``[...]`` integer class ids in ``[0, classes)``; out-of-range ids
        give undefined values unless masked.
      label_smoothing: ``eps`` in ``[0, 1]`` (a Python float).
      mask: ``[...]`` (or a leading part) per-example weights; see module doc.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
      A scalar, or ``[...]`` for ``reduction="none"``.
    """
    fn = "softmax_cross_entropy"
    _check_reduction(fn, reduction)
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_class_logits(fn, logits, labels)
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"{fn} expected label_smoothing in [0, 1], got {label_smoothing}")
    weights = _mask_weights(fn, mask, labels.shape, logits.dtype)
    if weights is not None:
        labels = jnp.where(weights != 0, labels, 0)  # padding ids like -100 never index
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [...]
    if label_smoothing != 0:
        # Cross-entropy against the uniform distribution: mean_c -log p_c.
        uniform = jax.nn.logsumexp(logits, axis=-1) - jnp.mean(logits, axis=-1)  # [...]
        loss = (1 - label_smoothing) * loss + label_smoothing * uniform
    return _reduce(loss, weights, reduction)


@functools.partial(jax.jit, static_argnames=("reduction",))
def softmax_cross_entropy_with_probs(
    logits: Float[Array, "*batch classes"],
    target_probs: Float[Array, "*batch classes"],
    *,
    mask: Any = None,
    reduction: Reduction = "mean",
) -> Float[Array, "*out"]:
    """Cross-entropy ``-sum_c q_c log softmax(logits)_c`` against target distributions.

    Args:
      logits: ``[..., classes]`` unnormalized log-probabilities.
      target_probs: ``[..., classes]`` target probabilities ``q`` (rows summing
        to 1: one-hot, smoothed or soft labels such as mixup's).
      mask: ``[...]`` (or a leading part) per-example weights.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
      A scalar, or ``[...]`` for ``reduction="none"``.
    """
    fn = "softmax_cross_entropy_with_probs"
    _check_reduction(fn, reduction)
    logits, target_probs = jnp.asarray(logits), jnp.asarray(target_probs)
    check_input(fn, logits, layout="[..., classes]", min_ndim=1, name="logits")
    _check_same_shape(fn, target_probs, "target_probs", logits, "logits")
    check_input(fn, target_probs, layout="[..., classes]", name="target_probs")
    loss = optax.softmax_cross_entropy(logits, target_probs.astype(logits.dtype))  # [...]
    weights = _mask_weights(fn, mask, loss.shape, logits.dtype)
    return _reduce(loss, weights, reduction)


@functools.partial(jax.jit, static_argnames=("reduction",))
def binary_cross_entropy(
    logits: Float[Array, "*shape"],
    labels: Float[Array, "*shape"],
    *,
    mask: Any = None,
    reduction: Reduction = "mean",
) -> Float[Array, "*out"]:
    """Binary cross-entropy of labels in ``[0, 1]`` under ``sigmoid(logits)``.

    Computed from logits with ``log_sigmoid`` (PyTorch's
    ``binary_cross_entropy_with_logits``), so it stays finite for any logit;
    prefer it to :func:`binary_cross_entropy_with_probs`.

    Args:
      logits: ``[...]`` one logit per binary decision (multi-label: ``[batch, labels]``).
      labels: ``[...]`` targets in ``[0, 1]`` (bool and integers are cast).
      mask: per-example weights of shape ``[...]`` or a leading part.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
      A scalar, or ``[...]`` for ``reduction="none"``.
    """
    fn = "binary_cross_entropy"
    _check_reduction(fn, reduction)
    logits, labels = _check_elementwise(fn, logits, labels, ("logits", "labels"))
    loss = optax.sigmoid_binary_cross_entropy(logits, labels)  # [...]
    return _reduce(loss, _mask_weights(fn, mask, loss.shape, logits.dtype), reduction)


@functools.partial(jax.jit, static_argnames=("eps", "reduction"))
def binary_cross_entropy_with_probs(
    probs: Float[Array, "*shape"],
    labels: Float[Array, "*shape"],
    *,
    eps: float = 1e-7,
    mask: Any = None,
    reduction: Reduction = "mean",
) -> Float[Array, "*out"]:
    """Binary cross-entropy ``-(y log p + (1 - y) log(1 - p))`` from probabilities.

    ``p`` is clipped to ``[eps, 1 - eps]`` so saturated probabilities give a
    large finite loss instead of inf (PyTorch instead clamps the logs at -100);
    the gradient is zero outside that range. ``eps`` must be resolvable next to
    1 in the dtype of ``probs``: 1e-7 suits float32, bfloat16 needs ~1e-2.

    Args:
      probs: ``[...]`` predicted probabilities of the positive class.
      labels: ``[...]`` targets in ``[0, 1]`` (bool and integers are cast).
      eps: clipping margin.
      mask: per-example weights of shape ``[...]`` or a leading part.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
      A scalar, or ``[...]`` for ``reduction="none"``.
    """
    fn = "binary_cross_entropy_with_probs"
    _check_reduction(fn, reduction)
    probs, labels = _check_elementwise(fn, probs, labels, ("probs", "labels"))
    probs = jnp.clip(probs, eps, 1 - eps)
    loss = -(labels * jnp.log(probs) + (1 - labels) * jnp.log1p(-probs))  # [...]
    return _reduce(loss, _mask_weights(fn, mask, loss.shape, probs.dtype), reduction)


# --- regression ---


@functools.partial(jax.jit, static_argnames=("reduction",))
def mean_squared_error(
    predictions: Float[Array, "*shape"],
    targets: Float[Array, "*shape"],
    *,
    mask: Any = None,
    reduction: Reduction = "mean",
) -> Float[Array, "*out"]:
    """Squared error ``(predictions - targets)^2``, elementwise, then reduced.

    The mean is over all unmasked elements, as PyTorch's ``mse_loss``.

    Args:
      predictions: ``[...]``, e.g. ``[batch, features]``.
      targets: ``[...]``, same shape (integers are cast).
      mask: weights of shape ``[...]`` or a leading part (``[batch]``).
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
      A scalar, or ``[...]`` for ``reduction="none"``.
    """
    fn = "mean_squared_error"
    _check_reduction(fn, reduction)
    predictions, targets = _check_elementwise(fn, predictions, targets, ("predictions", "targets"))
    loss = jnp.square(predictions - targets)  # [...]
    return _reduce(loss, _mask_weights(fn, mask, loss.shape, predictions.dtype), reduction)


@functools.partial(jax.jit, static_argnames=("delta", "reduction"))
def huber_loss(
    predictions: Float[Array, "*shape"],
    targets: Float[Array, "*shape"],
    delta: float = 1.0,
    *,
    mask: Any = None,
    reduction: Reduction = "mean",
) -> Float[Array, "*out"]:
    """Huber loss (Huber 1964): ``0.5 r^2`` for ``|r| <= delta``, else ``delta (|r| - delta / 2)``.

    ``r = predictions - targets``. Quadratic near zero, linear in the tails, so
    outliers pull with a bounded gradient ``delta``. Equals PyTorch's
    ``huber_loss``; ``smooth_l1_loss`` is this divided by ``delta``.

    Args:
      predictions: ``[...]``.
      targets: ``[...]``, same shape (integers are cast).
      delta: where quadratic turns linear; > 0.
      mask: weights of shape ``[...]`` or a leading part.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
      A scalar, or ``[...]`` for ``reduction="none"``.
    """
    fn = "huber_loss"
    _check_reduction(fn, reduction)
    predictions, targets = _check_elementwise(fn, predictions, targets, ("predictions", "targets"))
    if not delta > 0:
        raise ValueError(f"{fn} expected delta > 0, got {delta}")
    loss = optax.huber_loss(predictions, targets, delta=delta)  # [...]
    return _reduce(loss, _mask_weights(fn, mask, loss.shape, predictions.dtype), reduction)


# --- regularization ---


def _leaf_name(path: tuple[Any, ...]) -> str | None:
    if not path:
        return None
    key = path[-1]
    return str(getattr(key, "key", getattr(key, "name", "")))


@functools.partial(jax.jit, static_argnames=("kernels_only",))
def l2_regularization(params: PyTree, *, kernels_only: bool = False) -> Float[Array, ""]:
    """Sum of squares of every floating-point leaf of a pytree, ``sum_i ||w_i||^2``.

    Add ``coefficient / 2 * l2_regularization(params)`` to a loss for classic
    weight decay under SGD (with Adam, prefer decoupled decay: ``optax.adamw``).

    Args:
      params: a pytree of arrays, e.g. ``variables["params"]``. Integer and
        boolean leaves (step counters, masks) are skipped.
      kernels_only: only leaves named ``"kernel"`` (flax's name for Dense and
        Conv weight matrices), leaving biases, normalization scales and
        embeddings unregularized, as is common practice.

    Returns:
      A scalar: float32, or float64 if any selected leaf is float64.
    """
    selected = [
        jnp.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)
        and (not kernels_only or _leaf_name(path) == "kernel")
    ]
    # Accumulate in float32 at least: a bfloat16 sum of many squares loses digits.
    acc = jnp.float64 if any(x.dtype == jnp.float64 for x in selected) else jnp.float32
    total = jnp.zeros((), acc)
    for x in selected:
        total = total + jnp.sum(jnp.square(x.astype(acc)))
    return total
