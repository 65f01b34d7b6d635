"""The pure ring-buffer replay memory: add, wrap-around, uniform sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnlib.rl import ReplayBuffer


def items(start, stop):
    ids = np.arange(start, stop)
    return {"obs": jnp.asarray(np.stack([ids, -ids], 1), jnp.float32),
            "action": jnp.asarray(ids, jnp.int32)}


def test_add_fills_in_order_and_wraps_around_overwriting_the_oldest():
    buffer = ReplayBuffer.create({"obs": jnp.zeros(2), "action": jnp.zeros((), jnp.int32)}, 5)
    assert buffer.capacity == 5 and int(buffer.size) == 0
    buffer = buffer.add(items(0, 3))
    np.testing.assert_array_equal(buffer.storage["action"], [0, 1, 2, 0, 0])
    assert int(buffer.position) == 3 and int(buffer.size) == 3
    buffer = jax.jit(ReplayBuffer.add)(buffer, items(3, 7))  # 3, 4 -> rows 3, 4; 5, 6 -> rows 0, 1
    np.testing.assert_array_equal(buffer.storage["action"], [5, 6, 2, 3, 4])
    np.testing.assert_array_equal(buffer.storage["obs"][:, 1], [-5, -6, -2, -3, -4])
    assert int(buffer.position) == 2 and int(buffer.size) == 5
    assert buffer.storage["action"].dtype == jnp.int32


def test_sample_draws_only_valid_rows_uniformly():
    buffer = ReplayBuffer.create({"obs": jnp.zeros(2), "action": jnp.zeros((), jnp.int32)}, 8)
    buffer = buffer.add(items(10, 13))  # three valid rows out of eight
    batch = jax.jit(ReplayBuffer.sample, static_argnums=2)(buffer, jax.random.key(0), 6000)
    assert batch["obs"].shape == (6000, 2) and batch["action"].shape == (6000,)
    # Rows stay whole: obs and action of one sample come from the same transition.
    np.testing.assert_array_equal(batch["obs"][:, 0], batch["action"])
    counts = np.bincount(np.asarray(batch["action"]) - 10, minlength=3)
    assert counts.sum() == 6000 and len(counts) == 3  # never an empty row
    np.testing.assert_allclose(counts / 6000, 1 / 3, atol=0.03)


def test_buffers_vmap_as_independent_pytrees():
    def fill(start):
        buffer = ReplayBuffer.create({"x": jnp.zeros(())}, 3)
        buffer = buffer.add({"x": start + jnp.arange(2.0)})
        return buffer.add({"x": start + 2 + jnp.arange(2.0)})  # the 4th overwrites the 1st

    buffers = jax.vmap(fill)(jnp.array([0.0, 100.0]))
    np.testing.assert_array_equal(buffers.storage["x"], [[3, 1, 2], [103, 101, 102]])


def test_add_rejects_too_big_or_wrong_batches():
    buffer = ReplayBuffer.create({"x": jnp.zeros(())}, 3)
    with pytest.raises(ValueError, match=r"ReplayBuffer.add got a batch of 4 transitions, more than its capacity 3"):
        buffer.add({"x": jnp.zeros(4)})
    with pytest.raises(ValueError, match=r"ReplayBuffer.add expected transitions with the structure"):
        buffer.add({"y": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"ReplayBuffer capacity must be >= 1"):
        ReplayBuffer.create({"x": jnp.zeros(())}, 0)
