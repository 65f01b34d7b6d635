"""Pure train and eval steps: ``(state, batch) -> (state, metrics)``.

One definition serves every composition: ``jax.jit`` it for one device,
``jax.vmap`` it over a stacked state for an ensemble of seeds, run it under a
device mesh (``nnlib.train.parallel``) for data parallelism.

A batch is a dict of arrays with a leading batch axis: ``"inputs"`` (whatever
the model's ``__call__`` takes first), ``"labels"``, and optionally ``"mask"``
([batch] float/bool, 0 for the padding rows of a padded last batch; padded rows
contribute nothing to the loss, the gradients or the metrics).

A loss function maps ``(outputs, batch) -> (loss, metrics)`` where ``loss`` is
a scalar and ``metrics`` a dict of scalars, both means over the unmasked
examples; ``classification_loss`` and ``regression_loss`` are the common ones.

Randomness: the step's key is ``fold_in(state.key, state.step)`` and each rng
stream (``"dropout"`` by default) gets its own ``fold_in`` of that, so steps
never reuse a key and a resumed run repeats an uninterrupted one exactly.

Non-finite guard: when the loss or any gradient is NaN/Inf, the step returns
the *incoming* state unchanged, with ``metrics["finite"] = False`` and
``metrics["nonfinite_leaf"]`` the index (in ``jax.tree.leaves(params)`` order)
of the first non-finite gradient leaf, or -1 if only the loss was. A leaf
counts as non-finite when its sum of squares is (so also when a finite
gradient's square overflows its float type, which would make Adam's second
moment infinite); that sum is the same one ``metrics["grad_norm"]`` is made of.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from nnlib import losses
from nnlib import metrics as metrics_lib
from nnlib.layers._native import sums_of_squares
from nnlib.train.state import TrainState

Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]


def _example_weights(batch: Batch, n: int) -> jax.Array:
    mask = batch.get("mask")
    if mask is None:
        return jnp.ones((n,), jnp.float32)
    return jnp.asarray(mask).astype(jnp.float32)


def classification_loss(label_smoothing: float = 0.0) -> LossFn:
    """Softmax cross-entropy on ``outputs: [batch, classes]`` (or ``[batch, ...,
    classes]`` with labels ``[batch, ...]``) with accuracy as a metric. The
    batch's ``"mask"`` ([batch]) weights examples; an optional ``"label_mask"``
    (the labels' shape, e.g. [batch, time]) weights individual labels, so
    sequence tasks score only their answer tokens."""

    def loss_fn(logits: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        labels, mask = batch["labels"], batch.get("mask")
        if "label_mask" in batch:
            label_mask = jnp.asarray(batch["label_mask"], jnp.float32)
            if mask is not None:
                example = jnp.asarray(mask, jnp.float32)
                mask = label_mask * example.reshape(example.shape + (1,) * (labels.ndim - 1))
            else:
                mask = label_mask
        loss = losses.softmax_cross_entropy(logits, labels, label_smoothing=label_smoothing,
                                            mask=mask)
        return loss, {"loss": loss, "accuracy": metrics_lib.accuracy(logits, labels, mask=mask)}

    return loss_fn


def regression_loss() -> LossFn:
    """Mean squared error on ``outputs`` and ``batch["labels"]`` of the same shape."""

    def loss_fn(predictions: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        loss = losses.mean_squared_error(predictions, batch["labels"], mask=batch.get("mask"))
        return loss, {"loss": loss}

    return loss_fn


def _forward(
    state: TrainState,
    params: Any,
    batch: Batch,
    *,
    train: bool,
    key: jax.Array | None,
    rng_streams: Sequence[str],
) -> tuple[Any, Mapping[str, Any]]:
    """Runs the model; returns (outputs, updated mutable collections)."""
    variables = {"params": params, **state.collections}
    rngs = None
    if key is not None:
        rngs = {name: jax.random.fold_in(key, i) for i, name in enumerate(rng_streams)}
    if train and state.collections:
        outputs, updated = state.apply_fn(
            variables, batch["inputs"], train=True, rngs=rngs,
            mutable=list(state.collections))
        return outputs, {**state.collections, **updated}
    return state.apply_fn(variables, batch["inputs"], train=train, rngs=rngs), state.collections


def guarded_update(
    state: TrainState, grads: Any, loss: jax.Array | None = None,
    collections: Mapping[str, Any] | None = None, *, use_cond: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``state.apply_gradients(grads, collections)`` unless the loss or a gradient
    is NaN/Inf, in which case ``state`` comes back unchanged.

    Returns ``(new_state, metrics)`` with ``"grad_norm"`` (global L2 norm of
    ``grads``), ``"finite"`` and ``"nonfinite_leaf"`` (index in
    ``jax.tree.leaves(grads)`` order of the first non-finite leaf, -1 if none).

    One reduction per gradient leaf serves the norm and the guard: a leaf is
    finite iff its sum of squares is (NaN and inf propagate into it), so a
    finite gradient whose square overflows counts as non-finite too — Adam's
    second moment would overflow on it. On the CPU the float32 leaves' sums are
    one native call (``nnlib.layers._native.sums_of_squares``): XLA's
    reduction of the benchmark MLP's 784 x 512 gradient, the last thing the
    update waits for, took ~0.2 ms of a ~4 ms step. The guard is a ``lax.cond``: the
    update runs only when it is kept and does not wait on the guard cell by
    cell (under ``vmap`` JAX turns it into a per-member select). Inside
    ``pmap``/``shard_map`` pass ``use_cond=False``: the new state may vary
    across devices where the incoming one does not (BatchNorm without
    ``axis_name``), which a cond rejects before ``shard_map`` can say so; the
    update is then computed and not taken where the step is not finite
    (``apply_gradients(..., keep=...)``: a select over the state, except the
    arrays ``FusedAdamW``'s kernel leaves as they are itself). (Measured on
    the benchmark MLP: the shared reduction 2.5 %, the cond 3.8 % of the
    step; on the 8-member vmapped ensemble, selecting the whole state after
    the fused update took 16.7 ms a step, keeping it in the kernel 9.8.)
    """
    leaf_squares = sums_of_squares(jax.tree.leaves(grads))
    leaf_finite = jnp.isfinite(leaf_squares)
    finite = jnp.all(leaf_finite)
    if loss is not None:
        finite = finite & jnp.isfinite(loss)
    if use_cond:
        new_state = jax.lax.cond(
            finite, lambda s, g, c: s.apply_gradients(g, c), lambda s, g, c: s,
            state, grads, collections)
    else:
        new_state = state.apply_gradients(grads, collections, keep=~finite)
    first_bad = jnp.where(jnp.all(leaf_finite), -1, jnp.argmin(leaf_finite))
    return new_state, {
        "grad_norm": jnp.sqrt(jnp.sum(leaf_squares)),
        "finite": finite,
        "nonfinite_leaf": first_bad.astype(jnp.int32),
    }


def make_train_step(
    loss_fn: LossFn | None = None,
    *,
    axis_name: str | None = None,
    gradient_reduction: str = "loss",
    rng_streams: Sequence[str] = ("dropout",),
    guard: str | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the pure train step ``(state, batch) -> (state, metrics)``.

    Args:
      loss_fn: ``(outputs, batch) -> (loss, metrics)``; defaults to
        ``classification_loss()``.
      axis_name: name of the mapped device axis when the step runs per device
        (``shard_map``, ``pmap``); gradients and metrics are then averaged over
        it. ``None`` for a single device or a jit-with-shardings mesh step,
        where XLA inserts the reductions itself.
      gradient_reduction: how gradients are averaged over ``axis_name``.
        ``"loss"`` takes ``pmean`` of the loss *inside* the differentiated
        function — right under ``jax.shard_map`` (whose transpose rules then
        sum the replicated parameters' cotangents); ``"gradients"`` takes
        ``pmean`` of the gradients afterwards — right under ``jax.pmap``.
        Using the pmap pattern under ``shard_map`` silently scales gradients by
        the device count, so the choice is explicit.
      rng_streams: names of the rng streams the model draws from when
        ``train=True``.
      guard: how the step keeps the old state on a non-finite loss or
        gradient (``guarded_update``): ``"cond"`` skips the update,
        ``"where"`` computes it and selects. ``None`` (default): ``"cond"``,
        or ``"where"`` with ``axis_name``. Under ``jax.vmap`` a cond becomes a
        select anyway, and ``"where"`` is the faster of the two there
        (``make_ensemble_train_step`` uses it).

    The returned function is not jitted: wrap it in ``jax.jit`` (with
    ``donate_argnums=0`` to update the state in place), ``jax.vmap`` or a mesh.
    """
    loss_fn = loss_fn or classification_loss()
    if gradient_reduction not in ("loss", "gradients"):
        raise ValueError(
            f"gradient_reduction must be 'loss' or 'gradients', got {gradient_reduction!r}")
    if guard not in (None, "cond", "where"):
        raise ValueError(f"guard must be None, 'cond' or 'where', got {guard!r}")
    use_cond = (axis_name is None) if guard is None else guard == "cond"

    def objective(params, state, batch, key):
        outputs, collections = _forward(
            state, params, batch, train=True, key=key, rng_streams=rng_streams)
        loss, metrics = loss_fn(outputs, batch)
        if axis_name is not None and gradient_reduction == "loss":
            loss = jax.lax.pmean(loss, axis_name)
        return loss, (metrics, collections)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(state.rng, state.step)
        (loss, (metrics, collections)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, state, batch, key)
        if axis_name is not None:
            if gradient_reduction == "gradients":
                grads = jax.lax.pmean(grads, axis_name)
                # The guard reads the loss: with each device's own, one device
                # would skip the update while the others apply it, splitting the
                # replicas. Non-finite anywhere makes it non-finite everywhere.
                # (The where keeps the loss device-varying in type, so shard_map's
                # out_specs check still rejects this pmap-only rule, as before.)
                loss = jnp.where(jnp.isfinite(loss), jax.lax.pmean(loss, axis_name), loss)
            metrics = jax.lax.pmean(metrics, axis_name)
        new_state, kept = guarded_update(state, grads, loss, collections, use_cond=use_cond)
        return new_state, {**metrics, **kept}

    return train_step


def make_eval_step(
    loss_fn: LossFn | None = None, *, axis_name: str | None = None
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Builds ``(state, batch) -> metrics`` in evaluation mode (no dropout,
    running BatchNorm statistics). ``metrics["count"]`` is the number of real
    (unmasked) examples — of scored labels when the batch has a
    ``"label_mask"``, the unit ``classification_loss`` averages over — so
    ``nnlib.train.average_metrics`` can combine batches of different sizes
    exactly."""
    loss_fn = loss_fn or classification_loss()

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        outputs, _ = _forward(state, state.params, batch, train=False, key=None, rng_streams=())
        _, metrics = loss_fn(outputs, batch)
        leaves = jax.tree.leaves(batch["labels"])
        weights = _example_weights(batch, leaves[0].shape[0])  # [batch]
        if "label_mask" in batch:
            # Per-label means: batches with more scored labels must weigh more.
            label_mask = jnp.asarray(batch["label_mask"], jnp.float32)  # [batch, ...]
            weights = label_mask * weights.reshape(weights.shape + (1,) * (label_mask.ndim - 1))
        metrics = {**metrics, "count": jnp.sum(weights)}
        if axis_name is not None:
            count = jax.lax.psum(metrics["count"], axis_name)
            metrics = {k: jax.lax.psum(v * metrics["count"], axis_name) / jnp.maximum(count, 1.0)
                       for k, v in metrics.items() if k != "count"} | {"count": count}
        return metrics

    return eval_step


def average_metrics(per_batch: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Combines eval-step metrics over batches, weighting each by its ``count``."""
    total = sum(float(m["count"]) for m in per_batch)
    if total == 0:
        return {}
    keys = [k for k in per_batch[0] if k != "count"]
    return {k: sum(float(m[k]) * float(m["count"]) for m in per_batch) / total for k in keys} | {
        "count": total}
