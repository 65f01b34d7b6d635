"""The training state: everything a step reads and writes, as one pytree.

``TrainState`` holds the parameters, the optimizer state, the step counter,
the PRNG key and the model's mutable collections (BatchNorm's
``"batch_stats"``). It is a pytree, so it passes through ``jit``, ``vmap``
(an ensemble is a state with a leading model axis), device meshes and
checkpoints unchanged. The model's ``apply`` and the optax transformation ride
along as static fields.

The key is stored as raw ``uint32`` key data (``jax.random.key_data``) so that
checkpoints and ``vmap`` handle it like any other array; ``state.rng`` gives the
typed key back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from nnlib.train.optim import FusedAdamW, kept_where


def _raw_key(key: jax.Array) -> jax.Array:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return jnp.asarray(key, jnp.uint32)


class TrainState(struct.PyTreeNode):
    """Parameters, optimizer state, step, PRNG key and mutable collections.

    Attributes:
      step: int32 scalar, number of updates applied.
      params: the model's ``"params"`` collection.
      opt_state: the optax state for ``params``.
      key: raw PRNG key data (``uint32[2]`` for the default threefry key);
        each step derives its randomness as ``fold_in(key, step)``, so a resumed
        run draws exactly the numbers an uninterrupted one would.
      collections: the model's other (mutable) collections, e.g.
        ``{"batch_stats": ...}``; ``{}`` for models without any.
      apply_fn: the model's ``apply`` (static).
      tx: the optax transformation (static).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    key: jax.Array
    collections: Mapping[str, Any]
    apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(
        cls,
        *,
        model: nn.Module,
        tx: optax.GradientTransformation,
        key: jax.Array,
        example_input: Any,
        **init_kwargs: Any,
    ) -> TrainState:
        """Initialises a model and its optimizer.

        Args:
          model: a linen module whose ``__call__`` takes ``(inputs, *, train)``.
          tx: the optax transformation (see ``nnlib.train.make_optimizer``).
          key: PRNG key (typed or raw); split into the init key and the
            training key.
          example_input: a batch with the real shapes and dtypes (its values
            are not used beyond initialisation), e.g. ``x[:1]``.
          **init_kwargs: passed to ``model.init``.
        """
        key = jax.random.wrap_key_data(_raw_key(key)) if not jnp.issubdtype(
            key.dtype, jax.dtypes.prng_key) else key
        init_key, dropout_key, train_key = jax.random.split(key, 3)
        variables = model.init(
            {"params": init_key, "dropout": dropout_key}, example_input, **init_kwargs
        )
        variables = dict(variables)
        params = variables.pop("params")
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            key=_raw_key(train_key),
            collections=variables,
            apply_fn=model.apply,
            tx=tx,
        )

    @property
    def rng(self) -> jax.Array:
        """The typed PRNG key."""
        return jax.random.wrap_key_data(self.key)

    @property
    def variables(self) -> dict[str, Any]:
        """``{"params": ..., **collections}``, ready for ``apply_fn``."""
        return {"params": self.params, **self.collections}

    def apply_gradients(
        self, grads: Any, collections: Mapping[str, Any] | None = None, *,
        keep: jax.Array | None = None,
    ) -> TrainState:
        """One optimizer update; returns the new state with ``step + 1``
        (``tx.apply`` where the optimizer has one: ``FusedAdamW``).

        ``keep``: a boolean scalar (per member under ``vmap``); where true, the
        state comes back unchanged — the update computed and not taken, as a
        guard over a non-finite gradient needs. ``FusedAdamW`` leaves its
        native arrays as they are itself; every other leaf is selected.
        """
        if isinstance(self.tx, FusedAdamW):
            params, opt_state = self.tx.apply(grads, self.opt_state, self.params, keep=keep)
        else:
            updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
            params = optax.apply_updates(self.params, updates)
            if keep is not None:
                params, opt_state = kept_where(keep, (self.params, self.opt_state),
                                            (params, opt_state))
        collections = self.collections if collections is None else collections
        step = self.step + 1
        if keep is not None:
            step, collections = kept_where(keep, (self.step, self.collections), (step, collections))
        return self.replace(step=step, params=params, opt_state=opt_state,
                            collections=collections)


def num_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
