"""Group fairness metrics: selection rates, demographic parity, equalized odds.

A *group* is a value of a sensitive attribute (sex, age band, ...). Groups are
given as integer ids ``groups: [n]`` in ``[0, num_groups)`` with a static
``num_groups``, so every result has a fixed shape ``[num_groups]`` and every
function works under ``jit`` and ``vmap`` (e.g. over a stack of prediction
sets). The definitions follow fairlearn (``fairlearn.metrics``), against which
the tests check every number:

* **selection rate** of group ``g``: ``P(h(X) = 1 | A = g)``.
* **true / false positive rate**: ``P(h(X) = 1 | A = g, Y = 1)`` and
  ``P(h(X) = 1 | A = g, Y = 0)``.
* **demographic parity difference / ratio**: ``max_g r_g - min_g r_g`` and
  ``min_g r_g / max_g r_g`` of the selection rates ``r_g``.
* **equalized odds difference**: the larger of the TPR difference and the FPR
  difference (``agg="worst_case"``) or their mean (``agg="mean"``);
  **ratio**: the smaller of the TPR and FPR ratios (or their mean).
* **equal opportunity difference / ratio**: the TPR difference / ratio.

``method="to_overall"`` compares each group with the whole population
instead of with the other groups, as fairlearn's ``MetricFrame.difference``
does: ``max_g |r_g - r|`` and ``min_g min(r_g / r, r / r_g)``.

Conventions:

* **Predictions.** Binary ``y_pred: [n]`` is either hard labels (integer or
  bool; positive means ``== 1``, fairlearn's ``pos_label=1``) or scores
  (floating; positive means ``score > threshold``, default 0.5 for
  probabilities, use 0 for logits). Multiclass predictions are integer class
  ids ``[n]`` or scores ``[n, classes]`` (the argmax). Labels ``y_true: [n]``
  are integer/bool (positive ``== 1``) or floats (positive ``>= 0.5``, as
  ``nnlib.metrics.binary_accuracy``).
* **Weights.** ``sample_weight: [n]`` (float, int or bool) weights each
  example; weight 0 leaves it out, so a batch's padding ``mask`` is a valid
  ``sample_weight``. Rates are weighted means, as in fairlearn.
* **Empty groups** (no example, or total weight 0, in the rate's
  denominator) get rate 0 and are *excluded* from every max, min, difference
  and ratio, rather than producing NaN. For the TPR (FPR) a group counts as
  empty when it has no positive (negative) labels. fairlearn instead drops a
  group only when it has no examples at all, and scores a group without
  positives TPR 0 (scikit-learn's zero-division value), so the two differ in
  exactly that case. With fewer than two non-empty groups the difference is 0
  and the ratio 1.
* **Ratios** of all-zero rates (no group ever selected) are 1 (equal rates),
  where fairlearn gives 0/0 = NaN.
* **Errors.** Shapes and dtypes are checked on the static shapes. Group ids
  outside ``[0, num_groups)`` and negative weights raise when the arrays are
  concrete (eager calls); inside a caller's ``jit`` the values cannot be
  inspected, and an out-of-range id simply belongs to no group.

Results are float32, or float64 when the weights (or, for the binary metrics,
the scores) are float64.

Shapes glossary: ``n`` examples, ``groups`` = ``num_groups``, ``classes`` the
number of classes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Num

from nnlib.layers._checks import ShapeError

# Shape aliases, defined once (and outside annotations, where linters would read
# a lone "n" as a forward reference).
PerExample = Num[Array, "n"]  # labels, hard predictions or scores: one per example
GroupIds = Int[Array, "n"]
SampleWeight = Num[Array, "n"]
PerGroup = Float[Array, "groups"]

_METHODS = ("between_groups", "to_overall")
_AGGS = ("worst_case", "mean")


# --- validation --------------------------------------------------------------


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_num_groups(fn: str, num_groups: Any) -> int:
    if isinstance(num_groups, bool) or not isinstance(num_groups, int | np.integer) or (
            num_groups < 1):
        raise ValueError(f"{fn} expected num_groups to be a Python int >= 1 (static: it fixes "
                         f"the output shape [num_groups]), got {num_groups!r}")
    return int(num_groups)


def _check_groups(fn: str, groups: Any, num_groups: int, n: int) -> Array:
    """Integer ``groups: [n]`` with ids in ``[0, num_groups)`` (checked when concrete)."""
    groups = jnp.asarray(groups)
    if groups.shape != (n,):
        raise ShapeError(f"{fn} expected groups of shape [n] = ({n},) (one group id per "
                         f"example), got shape {groups.shape}")
    if not (jnp.issubdtype(groups.dtype, jnp.integer) or groups.dtype == jnp.bool_):
        raise TypeError(f"{fn} expected integer group ids of shape [n] in [0, {num_groups}), "
                        f"got dtype {groups.dtype}; encode categories as ids first, e.g. "
                        f"np.unique(a, return_inverse=True)[1]")
    if _is_concrete(groups) and n:
        ids = np.asarray(groups)  # on the host: jnp.min would be traced inside a jit
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_groups:
            raise ValueError(f"{fn}: group ids must lie in [0, num_groups) = [0, {num_groups}), "
                             f"got ids from {lo} to {hi}; raise num_groups or re-encode groups")
    return groups.astype(jnp.int32)


def _check_weights(fn: str, sample_weight: Any, n: int) -> Array | None:
    if sample_weight is None:
        return None
    w = jnp.asarray(sample_weight)
    if w.shape != (n,):
        raise ShapeError(f"{fn} expected sample_weight of shape [n] = ({n},), got shape "
                         f"{w.shape}")
    if _is_concrete(w) and n and w.dtype != jnp.bool_ and np.asarray(w).min() < 0:
        raise ValueError(f"{fn} expected non-negative sample_weight, got minimum "
                         f"{np.asarray(w).min()}")
    return w


def _check_vector(fn: str, x: Any, name: str, n: int | None = None) -> Array:
    x = jnp.asarray(x)
    if x.ndim != 1 or (n is not None and x.shape[0] != n):
        size = "n" if n is None else f"n = ({n},)"
        raise ShapeError(f"{fn} expected {name} of shape [{size}] (one value per "
                         f"example), got shape {x.shape}")
    return x


def _float_dtype(*arrays: Array | None) -> Any:
    """float64 if any floating input is float64, else float32 (explicit: no promotion)."""
    wide = any(a is not None and a.dtype == jnp.float64 for a in arrays)
    return jnp.float64 if wide else jnp.float32


def _positive_predictions(y_pred: Array, threshold: Array) -> Array:
    """Binary decisions ``[n]`` bool: ``== 1`` for hard labels, ``> threshold`` for scores."""
    if jnp.issubdtype(y_pred.dtype, jnp.floating):
        return y_pred > threshold.astype(y_pred.dtype)
    if y_pred.dtype == jnp.bool_:
        return y_pred
    return y_pred == 1


def _positive_labels(y_true: Array) -> Array:
    if jnp.issubdtype(y_true.dtype, jnp.floating):
        return y_true >= 0.5
    if y_true.dtype == jnp.bool_:
        return y_true
    return y_true == 1


def _check_method(fn: str, method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"{fn} expected method 'between_groups' or 'to_overall', got {method!r}")


def _check_agg(fn: str, agg: str) -> None:
    if agg not in _AGGS:
        raise ValueError(f"{fn} expected agg 'worst_case' or 'mean', got {agg!r}")


# --- per-group means and their aggregation ------------------------------------


def _group_means(
    values: Array, weights: Array, groups: Array, num_groups: int
) -> tuple[Array, Array]:
    """Weighted mean of ``values: [n, ...]`` in each group, and each group's total weight.

    Returns ``(means [groups, ...], totals [groups])``; empty groups get mean 0.
    Sums are elementwise products with a one-hot membership matrix rather than
    a matmul, so accelerators' reduced-precision matmuls never touch them.
    """
    member = groups[:, None] == jnp.arange(num_groups, dtype=groups.dtype)[None, :]  # [n, G]
    w = jnp.where(member, weights[:, None], 0)  # [n, G]
    totals = jnp.sum(w, axis=0)  # [G]
    extra = values.ndim - 1
    w = w.reshape(w.shape + (1,) * extra)  # [n, G, 1...]
    # where, not a product: a value that is inf/NaN in another group stays out.
    sums = jnp.sum(jnp.where(w != 0, w * values[:, None], 0), axis=0)  # [G, ...]
    safe = jnp.where(totals > 0, totals, 1).reshape((num_groups,) + (1,) * extra)
    present = (totals > 0).reshape(safe.shape)
    return jnp.where(present, sums / safe, 0), totals


def _overall_mean(values: Array, weights: Array) -> Array:
    w = weights.reshape(weights.shape + (1,) * (values.ndim - 1))
    total = jnp.sum(weights)
    return jnp.where(total > 0, jnp.sum(w * values, axis=0) / jnp.where(total > 0, total, 1), 0)


def _expand(present: Array, rates: Array) -> Array:
    return present.reshape(present.shape + (1,) * (rates.ndim - 1))


def _group_max(rates: Array, present: Array) -> Array:
    """Largest rate over present groups (axis 0); 0 if none is present."""
    p = _expand(present, rates)
    return jnp.where(jnp.any(present), jnp.max(jnp.where(p, rates, -jnp.inf), axis=0), 0)


def _group_min(rates: Array, present: Array) -> Array:
    p = _expand(present, rates)
    return jnp.where(jnp.any(present), jnp.min(jnp.where(p, rates, jnp.inf), axis=0), 0)


def _difference(rates: Array, present: Array, overall: Array, method: str) -> Array:
    """``max - min`` over present groups, or ``max |r_g - overall|`` (``to_overall``)."""
    if method == "between_groups":
        return _group_max(rates, present) - _group_min(rates, present)
    p = _expand(present, rates)
    return jnp.max(jnp.where(p, jnp.abs(rates - overall), 0), axis=0)


def _safe_ratio(lo: Array, hi: Array) -> Array:
    """``lo / hi`` for ``0 <= lo <= hi``; 1 when both are 0 (equal rates)."""
    return jnp.where(hi > 0, lo / jnp.where(hi > 0, hi, 1), 1)


def _ratio(rates: Array, present: Array, overall: Array, method: str) -> Array:
    """``min / max`` over present groups, or ``min_g min(r_g/r, r/r_g)`` (``to_overall``)."""
    if method == "between_groups":
        return _safe_ratio(_group_min(rates, present), _group_max(rates, present))
    per_group = _safe_ratio(jnp.minimum(rates, overall), jnp.maximum(rates, overall))
    return jnp.min(jnp.where(_expand(present, rates), per_group, 1), axis=0)


# --- binary rates (jitted kernels; public wrappers validate first) ------------


def _weights_or_ones(sample_weight: Array | None, n: int, dtype: Any) -> Array:
    if sample_weight is None:
        return jnp.ones((n,), dtype)
    return sample_weight.astype(dtype)


def _stats(selected: Array, weights: Array, groups: Array, num_groups: int):
    """(rates [G], present [G], overall []) of the decisions under ``weights``."""
    rates, totals = _group_means(selected, weights, groups, num_groups)
    return rates, totals > 0, _overall_mean(selected, weights)


def _aggregates(stats: list, difference: bool) -> dict:
    """``{method: {agg: value}}`` of the differences (or ratios) of one or two rates."""
    out = {}
    for method in _METHODS:
        if difference:
            values = jnp.stack([_difference(*st, method) for st in stats])
            out[method] = {"worst_case": jnp.max(values), "mean": jnp.mean(values)}
        else:
            values = jnp.stack([_ratio(*st, method) for st in stats])
            out[method] = {"worst_case": jnp.min(values), "mean": jnp.mean(values)}
    return out


@functools.partial(jax.jit, static_argnames=("num_groups",))
def _binary_metrics(y_true, y_pred, groups, sample_weight, threshold, *, num_groups):
    """Every binary metric, for every method and aggregation, in one compiled
    program: each is a handful of reductions over ``[n, groups]``, cheaper than
    compiling a program per metric. Keys are the public names."""
    dtype = _float_dtype(y_pred, sample_weight)
    w = _weights_or_ones(sample_weight, y_pred.shape[0], dtype)
    selected = _positive_predictions(y_pred, threshold).astype(dtype)
    sel = [_stats(selected, w, groups, num_groups)]
    out = {"selection_rate": sel[0][0],
           "demographic_parity_difference": _aggregates(sel, True),
           "demographic_parity_ratio": _aggregates(sel, False)}
    if y_true is None:
        return out
    positive = _positive_labels(y_true)
    tpr = _stats(selected, jnp.where(positive, w, 0), groups, num_groups)  # Y = 1
    fpr = _stats(selected, jnp.where(positive, 0, w), groups, num_groups)  # Y = 0
    return {**out, "true_positive_rate": tpr[0], "false_positive_rate": fpr[0],
            "equal_opportunity_difference": _aggregates([tpr], True),
            "equal_opportunity_ratio": _aggregates([tpr], False),
            "equalized_odds_difference": _aggregates([tpr, fpr], True),
            "equalized_odds_ratio": _aggregates([tpr, fpr], False)}


def _binary(fn, y_true, y_pred, groups, num_groups, sample_weight, threshold,
            method="between_groups", agg="worst_case"):
    """Validates, then picks the public metric ``fn`` out of :func:`_binary_metrics`."""
    _check_method(fn, method)
    _check_agg(fn, agg)
    y_true, y_pred, groups, w, threshold, num_groups = _binary_inputs(
        fn, y_true, y_pred, groups, num_groups, sample_weight, threshold)
    value = _binary_metrics(y_true, y_pred, groups, w, threshold, num_groups=num_groups)[fn]
    return value if fn.endswith("rate") else value[method][agg]


def _binary_inputs(fn, y_true, y_pred, groups, num_groups, sample_weight, threshold):
    """Validated ``(y_true or None, y_pred, groups, weights, threshold)``."""
    num_groups = _check_num_groups(fn, num_groups)
    y_pred = _check_vector(fn, y_pred, "y_pred")
    n = y_pred.shape[0]
    if y_true is not None:
        y_true = _check_vector(fn, y_true, "y_true", n)
    groups = _check_groups(fn, groups, num_groups, n)
    sample_weight = _check_weights(fn, sample_weight, n)
    threshold = jnp.asarray(threshold)
    if threshold.shape != ():
        raise ShapeError(f"{fn} expected a scalar threshold, got shape {threshold.shape}")
    return y_true, y_pred, groups, sample_weight, threshold, num_groups


def selection_rate(
    y_pred: PerExample,
    groups: GroupIds,
    num_groups: int,
    *,
    sample_weight: SampleWeight | None = None,
    threshold: float = 0.5,
) -> PerGroup:
    """Selection rate of each group, ``r_g = P(h(X) = 1 | A = g)``.

    The weighted fraction of group ``g``'s examples predicted positive:
    ``r_g = sum_{i: a_i = g} w_i [yhat_i = 1] / sum_{i: a_i = g} w_i``.

    Args:
      y_pred: ``[n]`` hard labels (int/bool, positive ``== 1``) or scores
        (float, positive ``> threshold``).
      groups: ``[n]`` group ids in ``[0, num_groups)``.
      num_groups: number of groups (static).
      sample_weight: ``[n]`` non-negative weights (0 leaves an example out).
      threshold: decision threshold for float scores.

    Returns:
      ``[groups]`` rates in ``[0, 1]``; 0 for an empty group.
    """
    return _binary("selection_rate", None, y_pred, groups, num_groups, sample_weight, threshold)


def demographic_parity_difference(
    y_pred: PerExample,
    groups: GroupIds,
    num_groups: int,
    *,
    sample_weight: SampleWeight | None = None,
    threshold: float = 0.5,
    method: str = "between_groups",
) -> Float[Array, ""]:
    """``max_g r_g - min_g r_g`` over non-empty groups of the selection rates.

    0 means every group is selected at the same rate. ``method="to_overall"``
    gives ``max_g |r_g - r|`` with ``r`` the overall selection rate. Arguments
    as in :func:`selection_rate`. Returns a scalar in ``[0, 1]``.
    """
    return _binary("demographic_parity_difference", None, y_pred, groups, num_groups,
                   sample_weight, threshold, method)


def demographic_parity_ratio(
    y_pred: PerExample,
    groups: GroupIds,
    num_groups: int,
    *,
    sample_weight: SampleWeight | None = None,
    threshold: float = 0.5,
    method: str = "between_groups",
) -> Float[Array, ""]:
    """``min_g r_g / max_g r_g`` over non-empty groups of the selection rates.

    1 means equal rates (also when no group is ever selected); the "80% rule"
    of US employment law asks for at least 0.8. ``method="to_overall"`` gives
    ``min_g min(r_g / r, r / r_g)``. Arguments as in :func:`selection_rate`.
    Returns a scalar in ``[0, 1]``.
    """
    return _binary("demographic_parity_ratio", None, y_pred, groups, num_groups, sample_weight,
                   threshold, method)


def true_positive_rate(
    y_true: PerExample,
    y_pred: PerExample,
    groups: GroupIds,
    num_groups: int,
    *,
    sample_weight: SampleWeight | None = None,
    threshold: float = 0.5,
) -> PerGroup:
    """True positive rate (recall) of each group, ``P(h(X) = 1 | A = g, Y = 1)``.

    Args:
      y_true: ``[n]`` binary labels.
      y_pred, groups, num_groups, sample_weight, threshold: as in
        :func:`selection_rate`.

    Returns:
      ``[groups]`` rates; 0 for a group without positive labels.
    """
    return _binary("true_positive_rate", y_true, y_pred, groups, num_groups, sample_weight,
                   threshold)


def false_positive_rate(
    y_true: PerExample,
    y_pred: PerExample,
    groups: GroupIds,
    num_groups: int,
    *,
    sample_weight: SampleWeight | None = None,
    threshold: float = 0.5,
) -> PerGroup:
    """False positive rate of each group, ``P(h(X) = 1 | A = g, Y = 0)``.

    Arguments as in :func:`true_positive_rate`. Returns ``[groups]`` rates; 0
    for a group without negative labels.
    """
    return _binary("false_positive_rate", y_true, y_pred, groups, num_groups, sample_weight,
                   threshold)


def equalized_odds_difference(
    y_true: PerExample,
    y_pred: PerExample,
    groups: GroupIds,
    num_groups: int,
    *,
    sample_weight: SampleWeight | None = None,
    threshold: float = 0.5,
    method: str = "between_groups",
    agg: str = "worst_case",
) -> Float[Array, ""]:
    """The larger of the TPR difference and the FPR difference across groups.

    Equalized odds (Hardt, Price & Srebro 2016) asks that ``h(X)`` be
    independent of ``A`` given ``Y``: equal TPR *and* equal FPR in every group.
    ``agg="mean"`` averages the two differences instead of taking the larger.
    A group without positives (negatives) is left out of the TPR (FPR)
    difference. Arguments as in :func:`true_positive_rate`; ``method`` as in
    :func:`demographic_parity_difference`.
    """
    return _binary("equalized_odds_difference", y_true, y_pred, groups, num_groups,
                   sample_weight, threshold, method, agg)


def equalized_odds_ratio(
    y_true: PerExample,
    y_pred: PerExample,
    groups: GroupIds,
    num_groups: int,
    *,
    sample_weight: SampleWeight | None = None,
    threshold: float = 0.5,
    method: str = "between_groups",
    agg: str = "worst_case",
) -> Float[Array, ""]:
    """The smaller of the TPR ratio and the FPR ratio across groups (or their mean).

    Arguments as in :func:`equalized_odds_difference`.
    """
    return _binary("equalized_odds_ratio", y_true, y_pred, groups, num_groups, sample_weight,
                   threshold, method, agg)


def equal_opportunity_difference(
    y_true: PerExample,
    y_pred: PerExample,
    groups: GroupIds,
    num_groups: int,
    *,
    sample_weight: SampleWeight | None = None,
    threshold: float = 0.5,
    method: str = "between_groups",
) -> Float[Array, ""]:
    """``max_g TPR_g - min_g TPR_g``: equal opportunity (Hardt et al. 2016) asks
    for equal true positive rates only. Arguments as in
    :func:`equalized_odds_difference`."""
    return _binary("equal_opportunity_difference", y_true, y_pred, groups, num_groups,
                   sample_weight, threshold, method)


def equal_opportunity_ratio(
    y_true: PerExample,
    y_pred: PerExample,
    groups: GroupIds,
    num_groups: int,
    *,
    sample_weight: SampleWeight | None = None,
    threshold: float = 0.5,
    method: str = "between_groups",
) -> Float[Array, ""]:
    """``min_g TPR_g / max_g TPR_g``. Arguments as in :func:`equalized_odds_difference`."""
    return _binary("equal_opportunity_ratio", y_true, y_pred, groups, num_groups,
                   sample_weight, threshold, method)


# --- accuracy and multiclass --------------------------------------------------


def _check_class_predictions(fn: str, y_pred: Any, num_classes: int | None) -> tuple[Array, int]:
    """Class ids ``[n]`` (int) or scores ``[n, classes]`` (float), and the class count."""
    y_pred = jnp.asarray(y_pred)
    if y_pred.ndim == 2 and jnp.issubdtype(y_pred.dtype, jnp.floating):
        if num_classes is not None and y_pred.shape[1] != num_classes:
            raise ShapeError(f"{fn} expected scores of shape [n, classes] with "
                             f"classes={num_classes}, got shape {y_pred.shape}")
        num_classes = y_pred.shape[1]
    elif y_pred.ndim == 1 and jnp.issubdtype(y_pred.dtype, jnp.integer):
        if num_classes is None:
            raise ValueError(f"{fn} needs num_classes (static) when y_pred holds class ids "
                             f"[n]; scores [n, classes] carry it in their shape")
    else:
        raise ShapeError(f"{fn} expected integer class ids of shape [n] or float scores of "
                         f"shape [n, classes], got {y_pred.dtype} y_pred of shape {y_pred.shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{fn} expected num_classes to be a Python int >= 1, "
                         f"got {num_classes!r}")
    return y_pred, num_classes


def _class_ids(y_pred: Array) -> Array:
    if y_pred.ndim == 2:
        return jnp.argmax(y_pred, axis=-1).astype(jnp.int32)  # [n]
    return y_pred.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_groups",))
def _group_accuracy(y_true, y_pred, groups, sample_weight, threshold, *, num_groups):
    if y_pred.ndim == 1 and jnp.issubdtype(y_pred.dtype, jnp.floating):
        correct = _positive_predictions(y_pred, threshold) == _positive_labels(y_true)
    else:
        if jnp.issubdtype(y_true.dtype, jnp.floating):
            # Float binary labels are positive from 0.5 up (a cast would truncate 0.9 to 0);
            # rounding half up also keeps integer-valued float class ids as they are.
            y_true = jnp.floor(y_true + 0.5)
        correct = _class_ids(y_pred) == y_true.astype(jnp.int32)
    dtype = _float_dtype(sample_weight)
    w = _weights_or_ones(sample_weight, y_true.shape[0], dtype)
    return _group_means(correct.astype(dtype), w, groups, num_groups)[0]


def group_accuracy(
    y_true: PerExample,
    y_pred: PerExample | Float[Array, "n classes"],
    groups: GroupIds,
    num_groups: int,
    *,
    sample_weight: SampleWeight | None = None,
    threshold: float = 0.5,
) -> PerGroup:
    """Accuracy of each group, ``P(h(X) = Y | A = g)``.

    Args:
      y_true: ``[n]`` labels: class ids (binary or multiclass) or float binary
        labels (positive ``>= 0.5``).
      y_pred: integer class ids ``[n]`` (compared with ``y_true``), float
        binary scores ``[n]`` (positive ``> threshold``, compared with
        ``y_true``'s positives), or scores ``[n, classes]`` (argmax).
      groups, num_groups, sample_weight, threshold: as in :func:`selection_rate`.

    Returns:
      ``[groups]`` accuracies; 0 for an empty group.
    """
    fn = "group_accuracy"
    num_groups = _check_num_groups(fn, num_groups)
    y_true = _check_vector(fn, y_true, "y_true")
    n = y_true.shape[0]
    y_pred = jnp.asarray(y_pred)
    if y_pred.ndim != 1 or y_pred.shape[0] != n:
        if y_pred.ndim != 2 or y_pred.shape[0] != n:
            raise ShapeError(f"{fn} expected y_pred of shape [n] or [n, classes] with n={n} "
                             f"(the length of y_true), got shape {y_pred.shape}")
        _check_class_predictions(fn, y_pred, None)
    groups = _check_groups(fn, groups, num_groups, n)
    w = _check_weights(fn, sample_weight, n)
    return _group_accuracy(y_true, y_pred, groups, w, jnp.asarray(threshold),
                           num_groups=num_groups)


@functools.partial(jax.jit, static_argnames=("num_groups", "num_classes", "difference"))
def _multiclass(y_pred, groups, sample_weight, *, num_groups, num_classes, difference):
    dtype = _float_dtype(sample_weight)
    w = _weights_or_ones(sample_weight, y_pred.shape[0], dtype)
    onehot = jax.nn.one_hot(_class_ids(y_pred), num_classes, dtype=dtype)  # [n, C]
    rates, totals = _group_means(onehot, w, groups, num_groups)  # [G, C], [G]
    if not difference:
        return rates
    return jnp.max(_difference(rates, totals > 0, jnp.zeros((), dtype), "between_groups"))


def _multiclass_inputs(fn, y_pred, groups, num_groups, num_classes, sample_weight):
    num_groups = _check_num_groups(fn, num_groups)
    y_pred, num_classes = _check_class_predictions(fn, y_pred, num_classes)
    n = y_pred.shape[0]
    groups = _check_groups(fn, groups, num_groups, n)
    w = _check_weights(fn, sample_weight, n)
    return dict(y_pred=y_pred, groups=groups, sample_weight=w, num_groups=num_groups,
                num_classes=num_classes)


def multiclass_selection_rate(
    y_pred: PerExample | Float[Array, "n classes"],
    groups: GroupIds,
    num_groups: int,
    *,
    num_classes: int | None = None,
    sample_weight: SampleWeight | None = None,
) -> Float[Array, "groups classes"]:
    """One-vs-rest selection rate of every class in every group,
    ``r_{g,c} = P(h(X) = c | A = g)``; each non-empty group's row sums to 1.

    Args:
      y_pred: class ids ``[n]`` (then ``num_classes`` is required) or scores
        ``[n, classes]`` (argmax; first maximum on ties).
      groups, num_groups, sample_weight: as in :func:`selection_rate`.
      num_classes: number of classes (static).

    Returns:
      ``[groups, classes]``; an empty group's row is all 0.
    """
    return _multiclass(**_multiclass_inputs("multiclass_selection_rate", y_pred, groups,
                                            num_groups, num_classes, sample_weight),
                       difference=False)


def multiclass_demographic_parity_difference(
    y_pred: PerExample | Float[Array, "n classes"],
    groups: GroupIds,
    num_groups: int,
    *,
    num_classes: int | None = None,
    sample_weight: SampleWeight | None = None,
) -> Float[Array, ""]:
    """Worst one-vs-rest demographic parity difference over classes,
    ``max_c (max_g r_{g,c} - min_g r_{g,c})`` over non-empty groups.

    Each class ``c`` is treated as the "positive" outcome in turn (the binary
    demographic parity difference of the indicator ``h(X) = c``), and the
    worst class is reported. For two classes it equals the binary
    :func:`demographic_parity_difference` of class 1, since
    ``r_{g,0} = 1 - r_{g,1}``. Arguments as in :func:`multiclass_selection_rate`.
    """
    return _multiclass(**_multiclass_inputs("multiclass_demographic_parity_difference", y_pred,
                                            groups, num_groups, num_classes, sample_weight),
                       difference=True)


# --- a MetricFrame for any metric ---------------------------------------------


class GroupedMetric(NamedTuple):
    """A metric disaggregated by group, like ``fairlearn.metrics.MetricFrame``.

    A pytree (returnable from ``jit``). Attributes:
      by_group: ``[groups, ...]`` the metric on each group's examples (its
        value for an empty group is whatever ``metric_fn`` gives for all-zero
        weights).
      overall: ``[...]`` the metric on all examples.
      present: ``[groups]`` bool, the group has positive total weight; the
        aggregates below only look at present groups.
    """

    by_group: Array
    overall: Array
    present: Array  # [groups] bool

    def group_min(self) -> Array:
        """Smallest value over present groups (0 if none)."""
        return _group_min(self.by_group, self.present)

    def group_max(self) -> Array:
        """Largest value over present groups (0 if none)."""
        return _group_max(self.by_group, self.present)

    def difference(self, method: str = "between_groups") -> Array:
        """``group_max - group_min``, or ``max_g |v_g - overall|`` (``"to_overall"``)."""
        _check_method("GroupedMetric.difference", method)
        return _difference(self.by_group, self.present, self.overall, method)

    def ratio(self, method: str = "between_groups") -> Array:
        """``group_min / group_max`` (1 if both are 0), or ``min_g min(v_g/overall,
        overall/v_g)`` (``"to_overall"``). Meant for non-negative metrics."""
        _check_method("GroupedMetric.ratio", method)
        return _ratio(self.by_group, self.present, self.overall, method)


def by_group(
    metric_fn: Callable[..., Array],
    y_true: Array,
    y_pred: Array,
    groups: GroupIds,
    num_groups: int,
    *,
    sample_weight: SampleWeight | None = None,
) -> GroupedMetric:
    """Evaluates ``metric_fn`` on every group's examples and on all of them.

    Group ``g``'s value is ``metric_fn(y_true, y_pred, sample_weight=w * [a == g])``:
    the metric sees every example, with weight 0 outside the group, so shapes
    stay static and the groups are computed together with ``vmap``. The
    metric must therefore treat weight-0 examples as absent; wrap nnlib's
    metrics as e.g. ``lambda t, p, sample_weight: accuracy(p, t, mask=sample_weight)``.

    Args:
      metric_fn: ``(y_true, y_pred, *, sample_weight: [n] float) -> [...]``.
      y_true, y_pred: anything with a leading ``[n]`` axis.
      groups, num_groups, sample_weight: as in :func:`selection_rate`.

    Returns:
      A :class:`GroupedMetric` with ``by_group: [groups, ...]``.
    """
    fn = "by_group"
    num_groups = _check_num_groups(fn, num_groups)
    y_true, y_pred = jnp.asarray(y_true), jnp.asarray(y_pred)
    if y_true.ndim < 1 or y_pred.ndim < 1 or y_true.shape[0] != y_pred.shape[0]:
        raise ShapeError(f"{fn} expected y_true and y_pred with the same leading axis [n, ...], "
                         f"got shapes {y_true.shape} and {y_pred.shape}")
    n = y_true.shape[0]
    groups = _check_groups(fn, groups, num_groups, n)
    w = _check_weights(fn, sample_weight, n)
    w = _weights_or_ones(w, n, _float_dtype(w))
    member = groups[None, :] == jnp.arange(num_groups, dtype=groups.dtype)[:, None]  # [G, n]
    group_w = jnp.where(member, w[None, :], 0)  # [G, n]
    values = jax.vmap(lambda gw: metric_fn(y_true, y_pred, sample_weight=gw))(group_w)
    overall = metric_fn(y_true, y_pred, sample_weight=w)
    return GroupedMetric(by_group=values, overall=overall, present=jnp.sum(group_w, 1) > 0)
