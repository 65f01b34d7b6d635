"""Fairness in training: differentiable penalties and adversarial debiasing.

The metrics in :mod:`nnlib.fairness.metrics` count hard decisions, which have
no gradient. The penalties here replace a decision ``[h(x) = 1]`` by the
predicted probability ``p = P(Y = 1 | x)`` (the usual relaxation), so the gaps
become smooth functions of the parameters:

* :func:`demographic_parity_penalty` compares the groups' mean predicted
  probabilities ``m_g = sum_{a_i=g} w_i p_i / sum_{a_i=g} w_i``:
  ``kind="squared"`` is the mean over pairs of non-empty groups of
  ``(m_g - m_h)^2``; ``kind="absolute"`` is ``max_g m_g - min_g m_g`` (the
  demographic parity difference with probabilities in place of decisions, so
  on 0/1 probabilities it *equals* the metric). For two groups they are
  ``(m_0 - m_1)^2`` and ``|m_0 - m_1|``.
* :func:`equalized_odds_penalty` is the same penalty among the positives plus
  among the negatives: soft TPR gap + soft FPR gap.
* :func:`make_fair_loss` adds ``weight * penalty`` to any nnlib loss and reads
  the groups from ``batch["groups"]``, so ``make_train_step(make_fair_loss(...))``
  trains a fair classifier with nothing else changed.
* :func:`make_adversarial_debiasing_step`: Zhang, Lemoine & Mitchell 2018
  ("Mitigating Unwanted Biases with Adversarial Learning"); see its docstring
  for exactly what is implemented.

Penalties are computed per batch: group means of a minibatch are noisy
estimates, and the squared gap of noisy means is biased upwards (by the
variance of each mean), so use batches with a fair number of examples from
every group. Under data parallelism with ``axis_name`` each device penalizes
its own shard's gap. Empty groups (total weight 0 in the batch) are left out;
with fewer than two non-empty groups the penalty is 0.

A binary classifier's ``outputs`` may be two logits ``[batch, 2]``
(``p = softmax(outputs)[:, 1]``), one logit ``[batch, 1]`` or ``[batch]``
(``p = sigmoid(outputs)``).

Shapes glossary: ``n``/``batch`` examples, ``groups`` = ``num_groups``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jaxtyping import Array, Float

from nnlib import losses
from nnlib import metrics as metrics_lib
from nnlib.fairness.metrics import (
    GroupIds,
    PerExample,
    SampleWeight,
    _check_groups,
    _check_num_groups,
    _check_vector,
    _check_weights,
    _group_means,
    _positive_labels,
)
from nnlib.layers._checks import ShapeError, check_input
from nnlib.train.state import TrainState
from nnlib.train.step import Batch, LossFn, _forward, classification_loss

Probabilities = Float[Array, "n"]  # P(Y = 1 | x), one per example

_KINDS = ("squared", "absolute")
_CRITERIA = ("demographic_parity", "equalized_odds")


# --- penalties -----------------------------------------------------------------


def _check_probs(fn: str, probs: Any) -> Array:
    probs = jnp.asarray(probs)
    check_input(fn, probs, layout="[n] (the predicted probability of the positive class)",
                ndim=1, name="probs")
    return probs


def _check_kind(fn: str, kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"{fn} expected kind 'squared' or 'absolute', got {kind!r}")


@functools.partial(jax.jit, static_argnames=("num_groups", "kind"))
def _gap(probs: Array, weights: Array, groups: Array, num_groups: int, kind: str) -> Array:
    """The penalty on the group means of ``probs`` under ``weights``."""
    means, totals = _group_means(probs, weights, groups, num_groups)  # [G], [G]
    present = totals > 0
    if kind == "absolute":
        hi = jnp.max(jnp.where(present, means, -jnp.inf))
        lo = jnp.min(jnp.where(present, means, jnp.inf))
        return jnp.where(jnp.sum(present) >= 2, hi - lo, 0)
    upper = jnp.triu(jnp.ones((num_groups, num_groups), bool), k=1)
    pairs = upper & present[:, None] & present[None, :]  # [G, G], each pair once
    diffs = means[:, None] - means[None, :]  # [G, G]
    count = jnp.sum(pairs)
    total = jnp.sum(jnp.where(pairs, jnp.square(diffs), 0))
    return total / jnp.maximum(count, 1).astype(total.dtype)


def _penalty_inputs(fn, probs, groups, num_groups, sample_weight, kind):
    _check_kind(fn, kind)
    num_groups = _check_num_groups(fn, num_groups)
    probs = _check_probs(fn, probs)
    n = probs.shape[0]
    groups = _check_groups(fn, groups, num_groups, n)
    w = _check_weights(fn, sample_weight, n)
    w = jnp.ones((n,), probs.dtype) if w is None else w.astype(probs.dtype)
    return probs, groups, num_groups, w


def demographic_parity_penalty(
    probs: Probabilities,
    groups: GroupIds,
    num_groups: int,
    *,
    sample_weight: SampleWeight | None = None,
    kind: str = "squared",
) -> Float[Array, ""]:
    """Smooth demographic parity gap between groups' mean predicted probability.

    ``m_g = sum_{a_i = g} w_i p_i / sum_{a_i = g} w_i``; ``kind="squared"``
    gives ``mean_{g < h} (m_g - m_h)^2`` over pairs of non-empty groups,
    ``kind="absolute"`` gives ``max_g m_g - min_g m_g``.

    Args:
      probs: ``[n]`` predicted probability of the positive class.
      groups: ``[n]`` group ids in ``[0, num_groups)``.
      num_groups: number of groups (static).
      sample_weight: ``[n]`` non-negative weights (a padding mask works).
      kind: ``"squared"`` (smooth everywhere) or ``"absolute"``.

    Returns:
      A non-negative scalar in the dtype of ``probs``; 0 when every non-empty
      group has the same mean.
    """
    probs, groups, num_groups, w = _penalty_inputs(
        "demographic_parity_penalty", probs, groups, num_groups, sample_weight, kind)
    return _gap(probs, w, groups, num_groups, kind)


def equalized_odds_penalty(
    probs: Probabilities,
    labels: PerExample,
    groups: GroupIds,
    num_groups: int,
    *,
    sample_weight: SampleWeight | None = None,
    kind: str = "squared",
) -> Float[Array, ""]:
    """Smooth equalized odds gap: the demographic parity penalty among the
    examples with ``Y = 1`` (a soft TPR gap) plus the one among ``Y = 0``
    (a soft FPR gap). The sum, not the max the metric takes, so both gaps
    always get a gradient.

    Args:
      probs: ``[n]`` predicted probability of the positive class.
      labels: ``[n]`` binary labels (int/bool positive ``== 1``, float ``>= 0.5``).
      groups, num_groups, sample_weight, kind: as in
        :func:`demographic_parity_penalty`.

    Returns:
      A non-negative scalar.
    """
    fn = "equalized_odds_penalty"
    probs, groups, num_groups, w = _penalty_inputs(fn, probs, groups, num_groups,
                                                   sample_weight, kind)
    positive = _positive_labels(_check_vector(fn, labels, "labels", probs.shape[0]))
    return (_gap(probs, jnp.where(positive, w, 0), groups, num_groups, kind)
            + _gap(probs, jnp.where(positive, 0, w), groups, num_groups, kind))


# --- a fair loss for make_train_step --------------------------------------------


def _log_odds(fn: str, outputs: Any) -> Array:
    """``log p / (1 - p)`` ``[batch]`` of a binary classifier's outputs."""
    outputs = jnp.asarray(outputs)
    if not jnp.issubdtype(outputs.dtype, jnp.floating) or not (
            outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] in (1, 2))):
        raise ShapeError(f"{fn} expected binary classifier outputs: logits of shape [batch, 2], "
                         f"[batch, 1] or [batch], got {outputs.dtype} outputs of shape "
                         f"{outputs.shape}")
    if outputs.ndim == 1:
        return outputs
    if outputs.shape[1] == 1:
        return outputs[:, 0]
    # softmax([l0, l1])[1] = sigmoid(l1 - l0).
    return outputs[:, 1] - outputs[:, 0]


def _binary_logit_loss(logits: Array, batch: Batch) -> tuple[Array, dict[str, Array]]:
    """Binary cross-entropy and accuracy for one logit per example."""
    logits = logits.reshape(logits.shape[0])
    labels = jnp.asarray(batch["labels"]).astype(logits.dtype)
    mask = batch.get("mask")
    loss = losses.binary_cross_entropy(logits, labels, mask=mask)
    return loss, {"loss": loss, "accuracy": metrics_lib.binary_accuracy(logits, labels, mask=mask)}


def _default_loss(outputs: Array, batch: Batch) -> tuple[Array, dict[str, Array]]:
    if outputs.ndim == 2 and outputs.shape[1] == 2:
        return classification_loss()(outputs, batch)
    return _binary_logit_loss(outputs, batch)


def _batch_groups(fn: str, batch: Batch) -> Array:
    if "groups" not in batch:
        raise KeyError(f"{fn}: the batch has no 'groups' entry (one group id per example, "
                       f"[batch]); it has {sorted(batch)}")
    return batch["groups"]


def make_fair_loss(
    base_loss_fn: LossFn | None = None,
    penalty: str | Callable[..., Array] = "demographic_parity",
    weight: float = 1.0,
    *,
    num_groups: int = 2,
    kind: str = "squared",
) -> LossFn:
    """A loss ``(outputs, batch) -> (loss, metrics)`` = task loss + ``weight`` x penalty.

    Args:
      base_loss_fn: the task's nnlib loss; ``None`` picks softmax cross-entropy
        for two logits ``[batch, 2]`` and binary cross-entropy for one logit
        ``[batch, 1]``/``[batch]`` (labels 0/1).
      penalty: ``"demographic_parity"`` (or :func:`demographic_parity_penalty`),
        ``"equalized_odds"`` (or :func:`equalized_odds_penalty`), or any
        ``(probs [batch], batch) -> scalar``.
      weight: the penalty's coefficient (>= 0).
      num_groups: number of groups (static).
      kind: ``"squared"`` or ``"absolute"`` for the built-in penalties.

    The batch needs ``"groups": [batch]`` int ids besides ``"inputs"`` and
    ``"labels"``; its ``"mask"`` (padding) weights the penalty as it weights
    the task loss. Outputs are binary logits (see module doc).

    Returns:
      A loss for ``nnlib.train.make_train_step``. Its metrics are the base
      loss's (``accuracy`` ...) with ``loss`` the total that is minimized, plus
      ``task_loss`` and ``fairness_penalty``.
    """
    fn = "make_fair_loss"
    _check_kind(fn, kind)
    num_groups = _check_num_groups(fn, num_groups)
    if not weight >= 0:
        raise ValueError(f"{fn} expected weight >= 0, got {weight}")
    named = {demographic_parity_penalty: "demographic_parity",
             equalized_odds_penalty: "equalized_odds"}
    if not isinstance(penalty, str):
        penalty = named.get(penalty, penalty)
    if isinstance(penalty, str) and penalty not in _CRITERIA:
        raise ValueError(f"{fn} expected penalty 'demographic_parity', 'equalized_odds' or a "
                         f"callable (probs, batch) -> scalar, got {penalty!r}")
    base = base_loss_fn or _default_loss

    def penalty_fn(probs: Array, batch: Batch) -> Array:
        groups, mask = _batch_groups(fn, batch), batch.get("mask")
        if penalty == "demographic_parity":
            return demographic_parity_penalty(probs, groups, num_groups, sample_weight=mask,
                                              kind=kind)
        if penalty == "equalized_odds":
            return equalized_odds_penalty(probs, batch["labels"], groups, num_groups,
                                          sample_weight=mask, kind=kind)
        return penalty(probs, batch)

    def loss_fn(outputs: Array, batch: Batch) -> tuple[Array, dict[str, Array]]:
        probs = jax.nn.sigmoid(_log_odds(fn, outputs))  # [batch]
        task_loss, metrics = base(outputs, batch)
        fairness = penalty_fn(probs, batch)
        total = task_loss + weight * fairness.astype(task_loss.dtype)
        return total, {**metrics, "loss": total, "task_loss": task_loss,
                       "fairness_penalty": fairness}

    return loss_fn


# --- adversarial debiasing ------------------------------------------------------


def adversary_features(
    outputs: Float[Array, "batch ..."],
    labels: PerExample,
    criterion: str = "demographic_parity",
) -> Float[Array, "batch features"]:
    """What the adversary sees: the predictor's log-odds ``l`` (and the label ``y``).

    ``criterion="demographic_parity"``: ``[batch, 1] = [l]``, so the adversary
    can only use the prediction. ``"equalized_odds"``: ``[batch, 3] =
    [l, y, l * y]``, so even a linear adversary gets a separate intercept and
    slope in ``l`` for each class; what it learns about the group beyond the
    label itself comes from how ``l`` varies *within* a class, which is what
    equalized odds forbids. Zhang et al. feed ``[s, s y, s (1 - y)]`` with
    ``s = sigmoid((1 + |c|) l)`` and a learned ``c``; here the log-odds stand
    in for ``s`` (a learned adversary can rescale ``l`` itself) and ``y`` is
    added: without it a linear adversary must explain the label's own
    correlation with the group through ``s``, which pushes the predictor
    towards demographic parity instead (we saw exactly that on
    :func:`~nnlib.fairness.planted_bias_dataset`).

    Args:
      outputs: binary logits ``[batch, 2]``, ``[batch, 1]`` or ``[batch]``.
      labels: ``[batch]`` binary labels (unused for demographic parity).
      criterion: ``"demographic_parity"`` or ``"equalized_odds"``.

    Returns:
      ``[batch, 1]`` or ``[batch, 3]`` in the dtype of ``outputs``.
    """
    fn = "adversary_features"
    if criterion not in _CRITERIA:
        raise ValueError(f"{fn} expected criterion 'demographic_parity' or 'equalized_odds', "
                         f"got {criterion!r}")
    logit = _log_odds(fn, outputs)  # [B]
    if criterion == "demographic_parity":
        return logit[:, None]
    y = _positive_labels(_check_vector(fn, labels, "labels", logit.shape[0])).astype(logit.dtype)
    return jnp.stack([logit, y, logit * y], axis=1)  # [B, 3]


class AdversarialDebiasingState(struct.PyTreeNode):
    """The predictor's and the adversary's :class:`~nnlib.train.TrainState`."""

    predictor: TrainState
    adversary: TrainState


class AdversarialDebiasing(NamedTuple):
    """``init(key, example_input) -> state`` and the pure
    ``step(state, batch) -> (state, metrics)``."""

    init: Callable[[jax.Array, Any], AdversarialDebiasingState]
    step: Callable[[AdversarialDebiasingState, Batch],
                   tuple[AdversarialDebiasingState, dict[str, Array]]]


def _tree_vdot(a: Any, b: Any) -> Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                               strict=True))


def make_adversarial_debiasing_step(
    predictor: nn.Module,
    adversary: nn.Module,
    *,
    predictor_tx: optax.GradientTransformation,
    adversary_tx: optax.GradientTransformation,
    num_groups: int = 2,
    alpha: float = 1.0,
    criterion: str = "demographic_parity",
    projection: bool = True,
    loss_fn: LossFn | None = None,
    rng_streams: Sequence[str] = ("dropout",),
) -> AdversarialDebiasing:
    """Adversarial debiasing (Zhang, Lemoine & Mitchell 2018) as a pure step.

    The predictor ``f_W`` (a binary classifier, outputs as in the module doc)
    learns the task; the adversary ``g_U`` predicts the group from
    :func:`adversary_features` of the predictor's output (the label too for
    equalized odds), with logits ``[batch, num_groups]``. With task loss
    ``L_P(W)`` (``loss_fn``) and adversary loss ``L_A(W, U)`` (softmax
    cross-entropy of the group ids, weighted by the batch ``"mask"``), each
    step, from the same forward pass:

    * the adversary descends ``grad_U L_A``;
    * the predictor moves along
      ``d = grad_W L_P - proj(grad_W L_P on grad_W L_A) - alpha * grad_W L_A``
      where ``proj(g on h) = (<g, h> / ||h||^2) h`` (0 when ``h = 0``).
      ``-alpha grad_W L_A`` makes the predictor *increase* the adversary's
      loss; the projection (Zhang et al.'s update rule, ``projection=True``)
      removes the part of the task gradient that would help the adversary.
      Inner products and norms are over all predictor parameters as one
      vector, as in the paper (AIF360's TensorFlow version projects each
      variable separately). ``d`` goes through ``predictor_tx`` like a
      gradient.

    Implemented as stated; not implemented: the paper's learned sharpness
    ``c`` in the adversary's input (see :func:`adversary_features`) and its
    schedules (``alpha`` growing like ``sqrt(t)``, decaying learning rate);
    ``alpha`` is a constant here, and a schedule can live in the optimizers.
    Single device only (no ``axis_name``): under data parallelism each
    device would project with its own shard's gradients.

    Args:
      predictor: linen module ``(inputs, *, train) -> binary logits``.
      adversary: linen module ``(features, *, train) -> [batch, num_groups]``.
      predictor_tx, adversary_tx: the two optimizers.
      num_groups: number of groups (static).
      alpha: weight of the adversarial term (>= 0). ``alpha=0`` with
        ``projection=False`` trains the two models independently (the
        baseline); with ``projection=True`` the projection still acts.
      criterion: ``"demographic_parity"`` or ``"equalized_odds"``.
      projection: include the projection term.
      loss_fn: the predictor's task loss; default as in :func:`make_fair_loss`.
      rng_streams: rng streams the models draw from in training.

    Returns:
      ``AdversarialDebiasing(init, step)``. ``init(key, example_input)``
      builds both states (the adversary's input shape comes from the
      predictor's output on ``example_input``). ``step(state, batch)`` is pure
      and unjitted; ``batch`` holds ``"inputs"``, ``"labels"``, ``"groups"``
      and optionally ``"mask"``. Metrics: ``loss``/``accuracy`` (task, before
      the update), ``adversary_loss``, ``adversary_accuracy``, ``finite``. On
      a non-finite loss or gradient both states are returned unchanged.
    """
    fn = "make_adversarial_debiasing_step"
    num_groups = _check_num_groups(fn, num_groups)
    if criterion not in _CRITERIA:
        raise ValueError(f"{fn} expected criterion 'demographic_parity' or 'equalized_odds', "
                         f"got {criterion!r}")
    if not alpha >= 0:
        raise ValueError(f"{fn} expected alpha >= 0, got {alpha}")
    task_loss_fn = loss_fn or _default_loss

    def init(key: jax.Array, example_input: Any) -> AdversarialDebiasingState:
        pred_key, adv_key = jax.random.split(key)
        pred = TrainState.create(model=predictor, tx=predictor_tx, key=pred_key,
                                 example_input=example_input)
        outputs = pred.apply_fn(pred.variables, example_input, train=False)
        labels = jnp.zeros((outputs.shape[0],), jnp.int32)
        adv = TrainState.create(model=adversary, tx=adversary_tx, key=adv_key,
                                example_input=adversary_features(outputs, labels, criterion))
        return AdversarialDebiasingState(predictor=pred, adversary=adv)

    def step(state: AdversarialDebiasingState,
             batch: Batch) -> tuple[AdversarialDebiasingState, dict[str, Array]]:
        pred, adv = state.predictor, state.adversary
        groups = jnp.asarray(_batch_groups(fn, batch))
        mask = batch.get("mask")
        pred_key = jax.random.fold_in(pred.rng, pred.step)
        adv_key = jax.random.fold_in(adv.rng, adv.step)

        def forward(params):
            return _forward(pred, params, batch, train=True, key=pred_key,
                            rng_streams=rng_streams)

        # One forward pass; pull back the two output gradients separately.
        outputs, pullback, pred_collections = jax.vjp(forward, pred.params, has_aux=True)
        groups = _check_groups(fn, groups, num_groups, outputs.shape[0])

        def adversary_loss(outputs, adv_params):
            features = adversary_features(outputs, batch["labels"], criterion)
            logits, adv_collections = _forward(
                adv, adv_params, {"inputs": features}, train=True, key=adv_key,
                rng_streams=rng_streams)
            if logits.shape != (outputs.shape[0], num_groups):
                raise ShapeError(f"{fn} expected adversary logits of shape [batch, num_groups] "
                                 f"= ({outputs.shape[0]}, {num_groups}), got {logits.shape}")
            loss = losses.softmax_cross_entropy(logits, groups, mask=mask)
            accuracy = metrics_lib.accuracy(logits, groups, mask=mask)
            return loss, (accuracy, adv_collections)

        (task_loss, metrics), d_task = jax.value_and_grad(task_loss_fn, has_aux=True)(
            outputs, batch)
        (adv_loss, (adv_accuracy, adv_collections)), (d_adv_out, grad_u) = jax.value_and_grad(
            adversary_loss, argnums=(0, 1), has_aux=True)(outputs, adv.params)
        (grad_task,) = pullback(d_task)
        (grad_adv,) = pullback(d_adv_out)

        scale = jnp.zeros(())
        if projection:
            norm2 = _tree_vdot(grad_adv, grad_adv)
            scale = jnp.where(norm2 > 0, _tree_vdot(grad_task, grad_adv)
                              / jnp.where(norm2 > 0, norm2, 1), 0)
        direction = jax.tree.map(lambda gp, ga: gp - (scale.astype(ga.dtype) + alpha) * ga,
                                 grad_task, grad_adv)

        grads = jax.tree.leaves((direction, grad_u))
        finite = (jnp.isfinite(task_loss) & jnp.isfinite(adv_loss)
                  & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in grads])))
        new = AdversarialDebiasingState(
            predictor=pred.apply_gradients(direction, pred_collections),
            adversary=adv.apply_gradients(grad_u, adv_collections))
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        return new, {**metrics, "adversary_loss": adv_loss,
                     "adversary_accuracy": adv_accuracy, "finite": finite}

    return AdversarialDebiasing(init=init, step=step)

