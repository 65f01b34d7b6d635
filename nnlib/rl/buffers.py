"""Experience replay as a pure pytree: a fixed-size ring buffer.

DQN learns from transitions sampled uniformly from the last ``capacity``
steps instead of the latest ones: consecutive transitions are strongly
correlated, and replaying old ones many times is data-efficient (Lin 1992;
Mnih et al. 2015).

Here the buffer is data, not an object with hidden state: a pytree of
preallocated arrays ``[capacity, ...]`` plus an insertion ``position`` and a
``size``. ``add`` and ``sample`` return new values, so the whole DQN loop,
buffer included, lives inside one ``jax.jit`` and ``jax.vmap`` runs several
independent buffers (one per seed) at once. When full, new transitions
overwrite the oldest (first in, first out).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


class ReplayBuffer(struct.PyTreeNode):
    """A ring buffer of transitions (any pytree of arrays).

    Attributes:
      storage: the transition pytree with a leading ``[capacity]`` axis.
      position: int32 scalar, where the next transition goes.
      size: int32 scalar, number of valid transitions (``<= capacity``).
    """

    storage: Any
    position: jax.Array
    size: jax.Array

    @classmethod
    def create(cls, example: Any, capacity: int) -> ReplayBuffer:
        """An empty buffer for transitions shaped like ``example`` (one, unbatched)."""
        if capacity < 1:
            raise ValueError(f"ReplayBuffer capacity must be >= 1, got {capacity}")
        storage = jax.tree.map(
            lambda x: jnp.zeros((capacity, *jnp.shape(x)), jnp.asarray(x).dtype), example)
        return cls(storage=storage, position=jnp.zeros((), jnp.int32),
                   size=jnp.zeros((), jnp.int32))

    @property
    def capacity(self) -> int:
        return jax.tree.leaves(self.storage)[0].shape[0]

    def add(self, batch: Any) -> ReplayBuffer:
        """Appends a batch of transitions (leading axis ``[n]``, ``n <= capacity``).

        The ``n`` rows go to ``position, position + 1, ...`` modulo the
        capacity, overwriting the oldest rows once the buffer is full.
        """
        leaves = jax.tree.leaves(batch)
        n = leaves[0].shape[0]
        if n > self.capacity:
            raise ValueError(f"ReplayBuffer.add got a batch of {n} transitions, more than "
                             f"its capacity {self.capacity}")
        if jax.tree.structure(batch) != jax.tree.structure(self.storage):
            raise ValueError("ReplayBuffer.add expected transitions with the structure "
                             f"{jax.tree.structure(self.storage)}, got {jax.tree.structure(batch)}")
        index = (self.position + jnp.arange(n)) % self.capacity  # [n]
        storage = jax.tree.map(lambda s, x: s.at[index].set(x.astype(s.dtype)),
                               self.storage, batch)
        return self.replace(storage=storage,
                            position=(self.position + n) % self.capacity,
                            size=jnp.minimum(self.size + n, self.capacity))

    def sample(self, key: jax.Array, batch_size: int) -> Any:
        """``batch_size`` transitions drawn uniformly, with replacement, from the valid rows.

        Returns the transition pytree with a leading ``[batch_size]`` axis.
        Sampling an empty buffer returns row 0 (zeros); callers start learning
        only after ``learning_starts`` steps.
        """
        index = jax.random.randint(key, (batch_size,), 0, jnp.maximum(self.size, 1))
        return jax.tree.map(lambda s: s[index], self.storage)
