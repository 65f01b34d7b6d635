"""``jax.vmap`` compositions of the train step: per-example gradients, DP-SGD, ensembles.

The train step (``nnlib.train.step``) is a pure function of ``(state, batch)``,
so two of JAX's transformations give whole techniques for free:

- **Per-example gradients** are ``vmap(grad(loss of one example))``. Each
  example reaches the model as a *batch of one* (``x[None]``), so models whose
  ``__call__`` requires a batch axis (convolutions, BatchNorm in eval mode)
  run unchanged, and the loss functions of the train step
  (``classification_loss``, ``regression_loss``, any ``(outputs, batch) ->
  (loss, metrics)``) are reused as they are. The result is the parameter
  pytree with a leading ``[batch]`` axis on every leaf — memory grows with the
  batch size times the parameter count.
- **DP-SGD** (Abadi et al. 2016, "Deep Learning with Differential Privacy")
  clips every per-example gradient to L2 norm ``<= C``, sums them, adds
  Gaussian noise ``N(0, (noise_multiplier * C)^2)`` to every coordinate and
  divides by the number of examples. ``optax.contrib.dpsgd`` /
  ``differentially_private_aggregate`` (optax 0.2.8) do the same aggregation
  as an optimizer stage, but keep their noise key in the optimizer state and
  know nothing of padding masks; here the noise key follows the step
  (``fold_in(state.rng, state.step)``), masked rows are left out, and the
  step reports how many examples were clipped.
- **Ensembles of seeds** are a ``TrainState`` with a leading ``[members]``
  axis on every leaf, trained by ``vmap(train_step)`` in one compiled program.

Conventions shared with ``make_train_step``:

- A batch is a dict of arrays with a leading batch axis: ``"inputs"``,
  ``"labels"``, optional ``"mask"`` ([batch], 0 for padding rows). A masked
  example gets an all-zero gradient (whatever the loss function does with the
  mask) and is not counted in any average.
- Randomness. With step key ``k``, example ``j`` runs the model with the key
  ``fold_in(k, j)``, and rng stream number ``i`` (``"dropout"`` is 0) draws
  from ``fold_in(fold_in(k, j), i)``: every example gets its own dropout mask,
  reproducible from ``k`` alone.
- BatchNorm in training mode has no per-example gradient: its batch statistics
  mix the examples, so "the gradient of example j" is not defined (and on a
  batch of one the normalized activations are all zero). Asking for it raises;
  pass ``train=False`` to use the running statistics (frozen BatchNorm), or
  use ``LayerNorm``.

Shapes glossary: B batch, K ensemble members, ``...`` any parameter shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, PyTree

from nnlib.layers._native import materialize, sums_of_squares
from nnlib.train.state import TrainState
from nnlib.train.step import (
    Batch,
    LossFn,
    _forward,
    classification_loss,
    guarded_update,
    make_train_step,
)

# --------------------------------------------------------------------------
# Helpers: batch validation, masks, norms.
# --------------------------------------------------------------------------


def _batch_size(caller: str, batch: Batch) -> int:
    """The common leading size of every array in ``batch``, validated."""
    if not isinstance(batch, Mapping) or "inputs" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"{caller} expected a batch dict with 'inputs' (and 'labels', optional "
            f"'mask'), each with a leading batch axis; got {got}"
        )
    shapes = {jax.tree_util.keystr(path): tuple(jnp.shape(leaf))
              for path, leaf in jax.tree_util.tree_leaves_with_path(batch)}
    sizes = {shape[0] if shape else None for shape in shapes.values()}
    if len(sizes) != 1 or None in sizes:
        listing = ", ".join(f"{path}: {shape}" for path, shape in shapes.items())
        raise ValueError(
            f"{caller} expected every batch array to share a leading batch axis "
            f"[batch, ...], got shapes {{{listing}}}"
        )
    return int(sizes.pop())


def _keep(batch: Batch, n: int) -> Bool[Array, " batch"]:
    """True for the real (unmasked) examples."""
    mask = batch.get("mask")
    if mask is None:
        return jnp.ones((n,), bool)
    return jnp.asarray(mask).reshape(n) > 0


def _norm_dtype(leaves: Sequence[jax.Array]) -> jnp.dtype:
    """The widest floating dtype among the leaves, at least float32 (norms of
    bf16 gradients lose too many digits otherwise); strict dtype promotion
    forbids mixing them implicitly."""
    widest = max((jnp.dtype(leaf.dtype) for leaf in leaves), key=lambda d: d.itemsize)
    return widest if widest.itemsize >= 4 else jnp.dtype(jnp.float32)


def _check_not_batchnorm_in_train(caller: str, state: TrainState, train: bool) -> None:
    if train and "batch_stats" in state.collections:
        raise ValueError(
            f"{caller}: the model keeps 'batch_stats' (BatchNorm), and BatchNorm in "
            "training mode has no per-example gradient: its batch statistics mix the "
            "examples. Pass train=False to normalize with the running statistics "
            "(frozen BatchNorm), or use LayerNorm instead"
        )


def _check_scalar(caller: str, name: str, value: Any, *, positive: bool) -> None:
    """Validates a hyperparameter when it is a concrete number (not a tracer)."""
    if isinstance(value, jax.core.Tracer):
        return
    number = float(value)
    if positive and not number > 0.0:
        raise ValueError(f"{caller} expected {name} > 0, got {value}")
    if not positive and not number >= 0.0:
        raise ValueError(f"{caller} expected {name} >= 0, got {value}")


# --------------------------------------------------------------------------
# Per-example gradients.
# --------------------------------------------------------------------------


def _per_example_value_and_grad(
    state: TrainState,
    batch: Batch,
    key: jax.Array,
    *,
    loss_fn: LossFn,
    train: bool,
    rng_streams: Sequence[str],
    caller: str,
) -> tuple[jax.Array, dict[str, jax.Array], Any, jax.Array]:
    """Per-example (losses [B], metrics {name: [B]}, grads [B, ...], keep [B])."""
    _check_not_batchnorm_in_train(caller, state, train)
    n = _batch_size(caller, batch)

    def objective(params, example, example_key):
        one = jax.tree.map(lambda x: x[None], example)  # a batch of one: [1, ...]
        outputs, _ = _forward(
            state, params, one, train=train, key=example_key, rng_streams=rng_streams)
        return loss_fn(outputs, one)

    example_keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(n))  # [B]
    (losses, metrics), grads = jax.vmap(
        jax.value_and_grad(objective, has_aux=True), in_axes=(None, 0, 0)
    )(state.params, batch, example_keys)
    keep = _keep(batch, n)
    # where, not multiply: a padding row full of garbage may give NaN gradients.
    # Each leaf then passes through ``materialize``: a dense layer's
    # per-example kernel gradients are outer products ``x_j dy_j^T``, which
    # XLA:CPU would otherwise fuse into every consumer and form once per
    # consumer — DP-SGD's norms and its weighted sum each formed the
    # ``[64, 784, 512]`` gradients of the benchmark MLP's first layer afresh
    # (11 ms each; the step 44.7 -> 26.8 ms formed once). Where the gradients
    # are the program's output, the copy is free: its output aliases its input.
    grads = jax.tree.map(
        lambda g: materialize(
            jnp.where(keep.reshape((n,) + (1,) * (g.ndim - 1)), g, jnp.zeros_like(g))),
        grads)
    return losses, metrics, grads, keep


def per_example_gradients(
    state: TrainState,
    batch: Batch,
    key: jax.Array | None = None,
    *,
    loss_fn: LossFn | None = None,
    train: bool = True,
    rng_streams: Sequence[str] = ("dropout",),
) -> PyTree[Float[Array, "batch ..."]]:
    """The gradient of every example's loss, one at a time, in one vmapped pass.

    Args:
      state: the ``TrainState``; gradients are taken at ``state.params``.
      batch: ``{"inputs": [B, ...], "labels": [B, ...], "mask"?: [B]}``.
      key: step key; example ``j`` runs with ``fold_in(key, j)`` (see the module
        docstring). ``None`` uses the train step's own key,
        ``fold_in(state.rng, state.step)``.
      loss_fn: ``(outputs, batch) -> (loss, metrics)``, called on a batch of one;
        defaults to ``classification_loss()``.
      train: run the model in training mode (dropout on), as the train step
        does. BatchNorm models need ``train=False``.
      rng_streams: rng stream names the model draws from.

    Returns:
      A pytree like ``state.params`` with a leading ``[B]`` axis on every leaf;
      masked examples' gradients are zero. For a mean-reduced loss and a model
      without randomness, their mean over the unmasked examples is the train
      step's gradient (with dropout, only in expectation: the masks differ).

    Raises:
      ValueError: a BatchNorm model with ``train=True``; a batch without
        ``"inputs"`` or whose arrays disagree on the batch size.
    """
    if key is None:
        key = jax.random.fold_in(state.rng, state.step)
    _, _, grads, _ = _per_example_value_and_grad(
        state, batch, key, loss_fn=loss_fn or classification_loss(), train=train,
        rng_streams=rng_streams, caller="per_example_gradients")
    return grads


def per_example_grad_norms(
    grads: PyTree[Float[Array, "batch ..."]],
) -> Float[Array, " batch"]:
    """Global L2 norm of each example's gradient: ``grads`` leaves ``[B, ...]`` -> ``[B]``.

    Computed in the widest dtype among the leaves (at least float32); the
    float32 leaves' sums in one call of ``nnlib.layers._native.sums_of_squares``
    on the CPU (DP-SGD on the benchmark MLP at batch 64: 32.4-33.1 -> 28.7-29.2
    ms a step, where XLA's reductions of the 100 MB of first-layer gradients
    ran in its YNNPACK library).
    """
    leaves = jax.tree.leaves(grads)
    if not leaves or any(getattr(leaf, "ndim", 0) < 1 for leaf in leaves):
        raise ValueError(
            "per_example_grad_norms expected a gradient pytree whose leaves have a "
            f"leading [batch] axis, got leaf shapes "
            f"{[tuple(getattr(leaf, 'shape', ())) for leaf in leaves]}"
        )
    n = leaves[0].shape[0]
    if any(leaf.shape[0] != n for leaf in leaves):
        raise ValueError(
            "per_example_grad_norms expected every leaf to share the leading [batch] "
            f"axis, got leaf shapes {[tuple(leaf.shape) for leaf in leaves]}"
        )
    dtype = _norm_dtype(leaves)
    squares = jax.vmap(lambda *xs: sums_of_squares(xs))(
        *(leaf.astype(dtype) for leaf in leaves))  # [B, leaves]
    return jnp.sqrt(functools.reduce(jnp.add, [squares[:, i] for i in range(len(leaves))]))


# --------------------------------------------------------------------------
# DP-SGD.
# --------------------------------------------------------------------------


def weighted_sum_over_batch(
    values: Float[Array, "batch ..."], weights: Float[Array, " batch"]
) -> Array:
    """``sum_j weights[j] * values[j]`` over the leading axis, as one product.

    Written as ``jnp.sum(values * weights[:, None, ...], axis=0)``, the sum
    over the leading axis of an array with three or more axes is a reduction
    that XLA:CPU (jaxlib 0.10, through YNNPACK) runs hundreds of times slower
    than the same work as a matrix-vector product: 1.2 s against 3 ms for 64
    per-example gradients of a 784x512 kernel. Accumulated in (at least)
    float32, returned in ``values``' dtype.
    """
    n = values.shape[0]
    acc = np.promote_types(values.dtype, np.float32)
    total = jnp.matmul(weights.astype(values.dtype), values.reshape(n, -1),
                       preferred_element_type=acc)
    return total.reshape(values.shape[1:]).astype(values.dtype)


def dp_sgd_gradients(
    state: TrainState,
    batch: Batch,
    key: jax.Array,
    *,
    l2_norm_clip: float,
    noise_multiplier: float,
    loss_fn: LossFn | None = None,
    train: bool = True,
    rng_streams: Sequence[str] = ("dropout",),
) -> tuple[PyTree[Array], dict[str, jax.Array]]:
    """The privatized gradient of DP-SGD (Abadi et al. 2016, Algorithm 1).

    ``g_j`` per-example gradients, ``C = l2_norm_clip``, ``s = noise_multiplier``,
    ``n`` = number of unmasked examples::

        g_j <- g_j * min(1, C / ||g_j||)                  # clip
        g   <- (sum_j g_j + N(0, (s * C)^2 I)) / n        # noise, average

    Args:
      state: the ``TrainState``.
      batch: ``{"inputs": [B, ...], "labels": [B, ...], "mask"?: [B]}``; masked
        examples contribute nothing and are not counted in ``n``.
      key: PRNG key. The model (dropout) uses ``fold_in(key, 0)`` as the step
        key of ``per_example_gradients``; the noise uses ``fold_in(key, 1)``.
      l2_norm_clip: ``C > 0``.
      noise_multiplier: ``s >= 0``; 0 gives clipped averaging without noise.
      loss_fn: ``(outputs, batch) -> (loss, metrics)``; defaults to
        ``classification_loss()``.
      train: training mode for the model (BatchNorm models need False).
      rng_streams: rng stream names the model draws from.

    Returns:
      ``(grads, metrics)``: ``grads`` shaped like ``state.params``; ``metrics``
      holds the loss function's metrics averaged over the unmasked examples,
      ``"per_example_grad_norm"`` (their mean unclipped norm) and
      ``"clipped_fraction"`` (the share with norm > C).

    Dividing by the number of real examples follows the paper's fixed-size
    lots; privacy accounting under Poisson sampling assumes a fixed
    denominator (the expected batch size) instead.
    """
    _check_scalar("dp_sgd_gradients", "l2_norm_clip", l2_norm_clip, positive=True)
    _check_scalar("dp_sgd_gradients", "noise_multiplier", noise_multiplier, positive=False)
    loss_fn = loss_fn or classification_loss()
    model_key, noise_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    _, metrics, grads, keep = _per_example_value_and_grad(
        state, batch, model_key, loss_fn=loss_fn, train=train,
        rng_streams=rng_streams, caller="dp_sgd_gradients")
    norms = per_example_grad_norms(grads)  # [B]
    # C / max(||g||, C) is min(1, C / ||g||) without dividing by a zero norm.
    factors = l2_norm_clip / jnp.maximum(norms, l2_norm_clip)  # [B]
    count = jnp.sum(keep.astype(jnp.float32))
    leaves, treedef = jax.tree.flatten(grads)
    noise_keys = jax.random.split(noise_key, len(leaves))
    private = []
    for leaf, leaf_key in zip(leaves, noise_keys, strict=True):
        total = weighted_sum_over_batch(leaf, factors)  # [...]: sum of clipped gradients
        noise = jax.random.normal(leaf_key, total.shape, total.dtype)
        total = total + (noise_multiplier * l2_norm_clip) * noise
        private.append(total / jnp.maximum(count, 1.0).astype(total.dtype))
    weights = keep.astype(jnp.float32)

    def real_mean(values: jax.Array) -> jax.Array:
        return jnp.sum(values.astype(jnp.float32) * weights) / jnp.maximum(count, 1.0)

    metrics = {name: real_mean(value) for name, value in metrics.items()}
    metrics["per_example_grad_norm"] = real_mean(norms)
    metrics["clipped_fraction"] = real_mean((norms > l2_norm_clip).astype(jnp.float32))
    return jax.tree.unflatten(treedef, private), metrics


def make_dp_sgd_train_step(
    loss_fn: LossFn | None = None,
    *,
    l2_norm_clip: float,
    noise_multiplier: float,
    train: bool = True,
    rng_streams: Sequence[str] = ("dropout",),
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the pure DP-SGD step ``(state, batch) -> (state, metrics)``.

    A drop-in for ``make_train_step``'s step: the gradient is
    ``dp_sgd_gradients(state, batch, fold_in(state.rng, state.step), ...)``
    and then ``state.tx`` applies it (plain SGD as in the paper, or any optax
    optimizer — post-processing does not weaken the guarantee). Metrics: the
    loss function's, ``"per_example_grad_norm"``, ``"clipped_fraction"``,
    ``"grad_norm"`` (of the noisy gradient), ``"finite"`` and
    ``"nonfinite_leaf"``; on NaN/Inf the incoming state is returned, as in
    ``make_train_step``. Not jitted; wrap it in ``jax.jit``.
    """
    _check_scalar("make_dp_sgd_train_step", "l2_norm_clip", l2_norm_clip, positive=True)
    _check_scalar("make_dp_sgd_train_step", "noise_multiplier", noise_multiplier,
                  positive=False)
    loss_fn = loss_fn or classification_loss()

    def dp_sgd_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(state.rng, state.step)
        grads, metrics = dp_sgd_gradients(
            state, batch, key, l2_norm_clip=l2_norm_clip,
            noise_multiplier=noise_multiplier, loss_fn=loss_fn, train=train,
            rng_streams=rng_streams)
        new_state, guard = guarded_update(state, grads, metrics.get("loss"))
        return new_state, {**metrics, **guard}

    return dp_sgd_step


# --------------------------------------------------------------------------
# Ensembles of seeds.
# --------------------------------------------------------------------------


def _ensemble_size(caller: str, state: TrainState) -> int:
    step = jnp.shape(state.step)
    if len(step) != 1:
        raise ValueError(
            f"{caller} expected an ensemble TrainState (every leaf with a leading "
            f"[members] axis, as create_ensemble makes), got step of shape {step}"
        )
    return int(step[0])


def create_ensemble(
    model: nn.Module,
    tx: optax.GradientTransformation,
    keys: jax.Array,
    example_input: Any,
    **init_kwargs: Any,
) -> TrainState:
    """K independently initialised copies of a model, as one stacked ``TrainState``.

    Args:
      model: a linen module taking ``(inputs, *, train)``.
      tx: the optax transformation, shared by all members.
      keys: ``[K]`` typed keys (``jax.random.split(jax.random.key(0), K)``) or
        ``[K, 2]`` raw ``uint32`` keys; member ``k`` is ``TrainState.create``
        with ``keys[k]``, so members differ in initialisation and dropout.
      example_input: a batch with the real shapes and dtypes, e.g. ``x[:1]``.
      **init_kwargs: passed to ``model.init``.

    Returns:
      A ``TrainState`` whose every leaf has a leading ``[K]`` axis.

    Works under ``jax.jit`` as well (the key checks are on static shapes).
    """
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    expected = 1 if typed else 2
    if keys.ndim != expected or (not typed and keys.dtype != jnp.uint32) or keys.shape[0] < 1:
        layout = "[members] typed keys" if typed else "[members, 2] raw uint32 keys"
        hint = " (a single key: split it, e.g. jax.random.split(key, 4))" if (
            keys.ndim == expected - 1) else ""
        raise ValueError(
            f"create_ensemble expected keys of shape {layout}, got shape "
            f"{tuple(keys.shape)} with dtype {keys.dtype}{hint}"
        )

    def create(key: jax.Array, example: Any) -> TrainState:
        return TrainState.create(
            model=model, tx=tx, key=key, example_input=example, **init_kwargs)

    return jax.vmap(create, in_axes=(0, None))(keys, example_input)


def make_ensemble_train_step(
    loss_fn: LossFn | None = None,
    *,
    same_batch: bool = True,
    rng_streams: Sequence[str] = ("dropout",),
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds ``(ensemble_state, batch) -> (ensemble_state, metrics)``.

    ``jax.vmap(make_train_step(loss_fn))`` over the members (a shared batch
    is broadcast to every member): each takes one step of the ordinary train
    step, in one program.

    Args:
      loss_fn: as for ``make_train_step``.
      same_batch: ``True`` gives every member the same batch
        (``[B, ...]`` leaves); ``False`` takes one batch per member
        (``[K, B, ...]`` leaves, e.g. for bagging).
      rng_streams: as for ``make_train_step``.

    Metrics come back with a leading ``[K]`` axis. Not jitted.
    """
    # Under vmap a cond guard becomes a select of both branches; the where
    # form is that select fused into the update (8-seed MLP ensemble, batch
    # 64: 24.1 vs 25.3 ms per step).
    step = make_train_step(loss_fn, rng_streams=rng_streams, guard="where")
    # A shared batch is broadcast to [K, B, ...] rather than mapped with
    # in_axes=None: then every matmul is a plain batched GEMM. With an
    # unmapped batch XLA:CPU merges the members' first-layer weights into one
    # [F, K*H] GEMM and pays for transposing them and their gradients; the
    # broadcast form measured 1.3-1.45x faster (CPU time, MLP 784-512-512-10,
    # 8 members, batch 64; experiments/bench/NOTES.md).
    mapped = jax.vmap(step, in_axes=(0, 0))

    def ensemble_train_step(
        state: TrainState, batch: Batch
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        members = _ensemble_size("make_ensemble_train_step", state)
        if not same_batch:
            shapes = [tuple(jnp.shape(leaf)) for leaf in jax.tree.leaves(batch)]
            if any(len(s) < 2 or s[0] != members for s in shapes):
                raise ValueError(
                    f"make_ensemble_train_step(same_batch=False) expected batch arrays "
                    f"of shape [members={members}, batch, ...], got shapes {shapes}"
                )
        if same_batch:
            batch = jax.tree.map(lambda a: jnp.broadcast_to(a, (members, *jnp.shape(a))), batch)
        return mapped(state, batch)

    return ensemble_train_step


def ensemble_predict(
    state: TrainState,
    inputs: Any,
    *,
    transform: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[Float[Array, "members batch ..."], Float[Array, "batch ..."]]:
    """Every member's prediction (evaluation mode) and their average.

    Args:
      state: an ensemble ``TrainState`` (leading ``[K]`` axis).
      inputs: one batch, given to every member: ``[B, ...]``.
      transform: applied to each member's outputs before averaging, e.g.
        ``jax.nn.softmax`` to average probabilities rather than logits (the
        usual ensemble for classification).

    Returns:
      ``(per_member [K, B, ...], mean [B, ...])``.
    """
    _ensemble_size("ensemble_predict", state)

    def predict(member: TrainState) -> jax.Array:
        outputs = member.apply_fn(member.variables, inputs, train=False)
        return outputs if transform is None else transform(outputs)

    per_member = jax.vmap(predict)(state)
    # The mean as a sum then a division, the sum as one product (see
    # weighted_sum_over_batch): [8, 256, 1000] logits 10.6 -> 0.36 ms.
    members = per_member.shape[0]
    total = weighted_sum_over_batch(per_member, jnp.ones((members,), jnp.float32))
    return per_member, total / members


def unstack_ensemble(state: TrainState, index: int) -> TrainState:
    """Member ``index`` of an ensemble, as an ordinary ``TrainState``."""
    members = _ensemble_size("unstack_ensemble", state)
    if not -members <= index < members:
        raise IndexError(
            f"unstack_ensemble: member {index} out of range for an ensemble of {members}")
    return jax.tree.map(lambda leaf: leaf[index], state)


def stack_ensemble(states: Sequence[TrainState]) -> TrainState:
    """The inverse of ``unstack_ensemble``: K states of one model -> a stacked state."""
    if not states:
        raise ValueError("stack_ensemble expected at least one TrainState, got none")
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
