"""Parallel evaluation counts exactly one episode per environment."""

from __future__ import annotations

import gymnax
import jax
import jax.numpy as jnp
import numpy as np

from nnlib.rl import evaluate_policy


def test_one_episode_each_despite_auto_reset():
    env, params = gymnax.make("CartPole-v1")
    params = params.replace(max_steps_in_episode=30)  # a 30-step time limit

    def policy(key, obs):
        # Episodes 0-7: a hand controller (push towards where the pole falls),
        # which survives the 30 steps. Episodes 8-15: always push right, which
        # topples the pole within a dozen steps.
        controller = (obs[:, 2] + obs[:, 3] > 0).astype(jnp.int32)
        return jnp.where(jnp.arange(obs.shape[0]) < 8, controller, 1)

    # Scanning 60 steps: after a reset the environments keep playing, but only
    # their first episode may count.
    out = evaluate_policy(env, params, policy, jax.random.key(0), num_episodes=16, max_steps=60)
    assert out["return"].shape == (16,)
    np.testing.assert_array_equal(out["return"], out["length"])  # reward 1 per step
    np.testing.assert_array_equal(out["length"][:8], np.full(8, 30))
    assert ((out["length"][8:] >= 5) & (out["length"][8:] <= 15)).all(), out["length"]
