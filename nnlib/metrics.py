"""Evaluation metrics: accuracy, top-k accuracy, perplexity, confusion matrix, F1.

Pure, ``jit``/``vmap``-safe functions of arrays, each wrapped in ``jax.jit``
(``k`` and ``num_classes`` static), with the same conventions as
:mod:`nnlib.losses`:

* Class predictions are given either as ``logits: [..., classes]`` (floating;
  the prediction is the argmax, the first maximum on ties) or as integer class
  ids of the labels' shape ``[...]``.
* ``mask`` holds per-example weights of the labels' shape (or a leading part
  of it, broadcast over the rest); a metric is the weighted mean over unmasked
  examples, and 0 when everything is masked. ``confusion_matrix`` counts the
  examples with a nonzero mask once each.
* Labels outside ``[0, classes)`` count as wrong (and are not counted in a
  confusion matrix) unless masked.

Results are float32 scalars (``confusion_matrix``: int32 counts).

Shapes glossary: ``...`` is any batch layout (``[batch]``, ``[batch, time]``);
``classes`` is the number of classes.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nnlib.layers._checks import ShapeError, check_input
from nnlib.losses import _check_class_logits, _check_same_shape, _mask_weights, _weighted_mean
from nnlib.losses import softmax_cross_entropy as _softmax_cross_entropy


def _layout(shape: tuple[int, ...], last: str) -> str:
    return "[" + ", ".join([str(d) for d in shape] + [last]) + "]"


def _class_predictions(
    fn: str, predictions: Any, labels: Any, num_classes: int | None = None
) -> tuple[Array, Array]:
    """Integer predicted classes ``[...]`` (argmax of logits if given logits) and labels."""
    predictions, labels = jnp.asarray(predictions), jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"{fn} expected integer class labels, got dtype {labels.dtype} with shape "
            f"{labels.shape}"
        )
    if predictions.ndim == labels.ndim + 1 and jnp.issubdtype(predictions.dtype, jnp.floating):
        _check_class_logits(fn, predictions, labels)
        if num_classes is not None and predictions.shape[-1] != num_classes:
            raise ShapeError(
                f"{fn} expected logits of shape [..., classes] with classes={num_classes}, "
                f"got shape {predictions.shape}"
            )
        predictions = jnp.argmax(predictions, axis=-1)  # [...]
    elif predictions.shape != labels.shape or not jnp.issubdtype(predictions.dtype, jnp.integer):
        raise ShapeError(
            f"{fn} expected logits of shape [..., classes] = {_layout(labels.shape, 'classes')} "
            f"or integer class predictions of the labels' shape {labels.shape}, got "
            f"{predictions.dtype} predictions of shape {predictions.shape}"
            + ("; for one logit per example use binary_accuracy"
               if predictions.shape == labels.shape else "")
        )
    return predictions.astype(labels.dtype), labels


@jax.jit
def accuracy(
    predictions: Float[Array, "*batch classes"] | Int[Array, "*batch"],
    labels: Int[Array, "*batch"],
    *,
    mask: Any = None,
) -> Float[Array, ""]:
    """Fraction of examples whose predicted class equals the label.

    Args:
      predictions: logits ``[..., classes]`` or integer class ids ``[...]``.
      labels: ``[...]`` integer class ids.
      mask: ``[...]`` (or a leading part) per-example weights.

    Returns:
      A float32 scalar in ``[0, 1]``.
    """
    predictions, labels = _class_predictions("accuracy", predictions, labels)
    weights = _mask_weights("accuracy", mask, labels.shape, jnp.float32)
    return _weighted_mean((predictions == labels).astype(jnp.float32), weights)


@functools.partial(jax.jit, static_argnames=("k",))
def top_k_accuracy(
    logits: Float[Array, "*batch classes"],
    labels: Int[Array, "*batch"],
    k: int,
    *,
    mask: Any = None,
) -> Float[Array, ""]:
    """Fraction of examples whose label is among the ``k`` highest-scoring classes.

    Ties are broken deterministically in favour of the lower class index, as
    ``jnp.argmax`` and ``jax.lax.top_k`` do: the label's rank is the number of
    classes scoring higher, plus those scoring equal with a smaller index, and
    it is a hit when that rank is below ``k``. So ``k=1`` agrees with
    :func:`accuracy` exactly. (scikit-learn's ``top_k_accuracy_score`` breaks
    ties towards the higher index; the two agree whenever scores are distinct.)

    Args:
      logits: ``[..., classes]`` scores (logits or probabilities).
      labels: ``[...]`` integer class ids.
      k: how many top classes count, ``1 <= k <= classes``.
      mask: ``[...]`` (or a leading part) per-example weights.

    Returns:
      A float32 scalar in ``[0, 1]``.
    """
    fn = "top_k_accuracy"
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_class_logits(fn, logits, labels)
    classes = logits.shape[-1]
    if not isinstance(k, int) or not 1 <= k <= classes:
        raise ValueError(f"{fn} expected an int k in [1, classes={classes}], got {k!r}")
    weights = _mask_weights(fn, mask, labels.shape, jnp.float32)
    valid = (labels >= 0) & (labels < classes)  # [...]
    label = jnp.where(valid, labels, 0)[..., None]  # [..., 1]
    label_score = jnp.take_along_axis(logits, label, axis=-1)  # [..., 1]
    index = jnp.arange(classes, dtype=labels.dtype)  # [classes]
    ahead = (logits > label_score) | ((logits == label_score) & (index < label))
    rank = jnp.sum(ahead, axis=-1)  # [...] classes ranked before the label
    return _weighted_mean((valid & (rank < k)).astype(jnp.float32), weights)


@jax.jit
def perplexity(
    logits: Float[Array, "*batch classes"],
    labels: Int[Array, "*batch"],
    *,
    mask: Any = None,
) -> Float[Array, ""]:
    """``exp`` of the mean token cross-entropy (nats) over unmasked tokens.

    Averaging the cross-entropy first and exponentiating once is the standard
    corpus-level perplexity (not the mean of per-sequence perplexities). With
    every token masked the mean cross-entropy is 0, so the result is 1.

    Args:
      logits: ``[batch, time, vocab]`` (any ``[..., classes]``).
      labels: ``[batch, time]`` next-token ids.
      mask: ``[batch, time]`` (or ``[batch]``) weights; 0 on padding.

    Returns:
      A scalar >= 1 in the dtype of ``logits``.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_class_logits("perplexity", logits, labels)
    _mask_weights("perplexity", mask, labels.shape, logits.dtype)  # validates, names us
    return jnp.exp(_softmax_cross_entropy(logits, labels, mask=mask))


@functools.partial(jax.jit, static_argnames=("num_classes",))
def confusion_matrix(
    predictions: Float[Array, "*batch classes"] | Int[Array, "*batch"],
    labels: Int[Array, "*batch"],
    num_classes: int,
    *,
    mask: Any = None,
) -> Int[Array, "classes classes"]:
    """Counts ``C[i, j]`` of examples with true class ``i`` predicted as ``j``.

    Rows are true classes and columns predicted ones, scikit-learn's
    convention, so row sums are class supports and column sums prediction counts.

    Args:
      predictions: logits ``[..., num_classes]`` or integer class ids ``[...]``.
      labels: ``[...]`` integer class ids.
      num_classes: the matrix size (static).
      mask: ``[...]`` (or a leading part); examples with a nonzero entry are
        counted once.

    Returns:
      ``[num_classes, num_classes]`` int32 counts.
    """
    fn = "confusion_matrix"
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{fn} expected a positive int num_classes, got {num_classes!r}")
    predictions, labels = _class_predictions(fn, predictions, labels, num_classes)
    counted = (labels >= 0) & (labels < num_classes)
    counted = counted & (predictions >= 0) & (predictions < num_classes)  # [...]
    weights = _mask_weights(fn, mask, labels.shape, jnp.bool_)
    if weights is not None:
        counted = counted & weights
    # Uncounted examples add 0 at [0, 0]; negative ids must never reach .at[], which wraps them.
    rows = jnp.where(counted, labels, 0)
    cols = jnp.where(counted, predictions, 0)
    zeros = jnp.zeros((num_classes, num_classes), jnp.int32)
    return zeros.at[rows, cols].add(counted.astype(jnp.int32))


class PrecisionRecallF1(NamedTuple):
    """Per-class scores ``[classes]`` and their unweighted (macro) means."""

    precision: Float[Array, " classes"]
    recall: Float[Array, " classes"]
    f1: Float[Array, " classes"]
    macro_precision: Float[Array, ""]
    macro_recall: Float[Array, ""]
    macro_f1: Float[Array, ""]


@jax.jit
def precision_recall_f1(confusion: Int[Array, "classes classes"]) -> PrecisionRecallF1:
    """Per-class precision, recall and F1 from a confusion matrix, and macro averages.

    ``precision_c = C[c, c] / sum_i C[i, c]`` (of those predicted ``c``),
    ``recall_c = C[c, c] / sum_j C[c, j]`` (of those truly ``c``) and
    ``f1_c = 2 C[c, c] / (sum_i C[i, c] + sum_j C[c, j])``, their harmonic mean.
    A 0 / 0 gives 0, as scikit-learn's ``zero_division=0``. Macro scores are the
    unweighted means over all classes, scikit-learn's ``average="macro"`` with
    ``labels=range(classes)``.

    Args:
      confusion: ``[classes, classes]`` with rows = true class, columns =
        predicted (as :func:`confusion_matrix` returns).

    Returns:
      A :class:`PrecisionRecallF1` of float32 arrays.
    """
    fn = "precision_recall_f1"
    confusion = jnp.asarray(confusion)
    check_input(fn, confusion, layout="[classes, classes]", ndim=2, floating=False,
                name="confusion")
    if confusion.shape[0] != confusion.shape[1]:
        raise ShapeError(
            f"{fn} expected a square confusion matrix [classes, classes], got shape "
            f"{confusion.shape}"
        )
    confusion = confusion.astype(jnp.float32)
    true_positives = jnp.diagonal(confusion)  # [classes]
    predicted = jnp.sum(confusion, axis=0)  # [classes] column sums
    actual = jnp.sum(confusion, axis=1)  # [classes] row sums

    def ratio(num: Array, den: Array) -> Array:
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0)

    precision = ratio(true_positives, predicted)
    recall = ratio(true_positives, actual)
    f1 = ratio(2 * true_positives, predicted + actual)
    return PrecisionRecallF1(
        precision, recall, f1, jnp.mean(precision), jnp.mean(recall), jnp.mean(f1)
    )


@jax.jit
def binary_accuracy(
    logits: Float[Array, "*shape"],
    labels: Array,
    *,
    mask: Any = None,
) -> Float[Array, ""]:
    """Fraction of binary decisions right, predicting positive when ``logit > 0``.

    ``logit > 0`` is ``sigmoid(logit) > 0.5``; a logit of exactly 0 predicts
    negative. Labels may be bool, 0/1 integers or floats (``>= 0.5`` is positive).

    Args:
      logits: ``[...]`` one logit per decision.
      labels: ``[...]`` binary targets.
      mask: weights of shape ``[...]`` or a leading part.

    Returns:
      A float32 scalar in ``[0, 1]``.
    """
    fn = "binary_accuracy"
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    check_input(fn, logits, layout="[...]", name="logits")
    _check_same_shape(fn, labels, "labels", logits, "logits")
    positive = labels.astype(jnp.float32) >= 0.5
    correct = (logits > 0) == positive
    weights = _mask_weights(fn, mask, labels.shape, jnp.float32)
    return _weighted_mean(correct.astype(jnp.float32), weights)
