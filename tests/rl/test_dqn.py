"""DQN: the (Double) DQN target and epsilon schedule against numpy, and a small CartPole run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnlib.rl import DQNConfig, linear_epsilon, make_dqn_train, td_target


def numpy_targets(rewards, terminated, q_target, q_online, gamma):
    dqn, double = [], []
    for i in range(len(rewards)):
        keep = 0.0 if terminated[i] else 1.0
        dqn.append(rewards[i] + gamma * keep * max(q_target[i]))
        best = int(np.argmax(q_online[i]))
        double.append(rewards[i] + gamma * keep * q_target[i][best])
    return np.array(dqn), np.array(double)


def test_td_targets_match_numpy():
    rng = np.random.default_rng(0)
    b, num_actions = 32, 4
    rewards = rng.normal(size=b).astype(np.float32)
    terminated = rng.random(b) < 0.3
    q_target = rng.normal(size=(b, num_actions)).astype(np.float32)
    q_online = rng.normal(size=(b, num_actions)).astype(np.float32)
    dqn, double = numpy_targets(rewards, terminated, q_target, q_online, 0.9)
    args = (jnp.asarray(rewards), jnp.asarray(terminated), jnp.asarray(q_target))
    np.testing.assert_allclose(td_target(*args, gamma=0.9), dqn, rtol=1e-6)
    np.testing.assert_allclose(td_target(*args, jnp.asarray(q_online), gamma=0.9), double,
                               rtol=1e-6)
    # The two differ where the online argmax is not the target's argmax (and s' is not terminal).
    differs = (q_online.argmax(1) != q_target.argmax(1)) & ~terminated
    assert differs.any()
    np.testing.assert_array_equal(~np.isclose(dqn, double), differs)


def test_double_dqn_target_is_never_above_the_max_target():
    rng = np.random.default_rng(1)
    q_target = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)
    zeros = jnp.zeros(64)
    double = td_target(zeros, zeros.astype(bool), q_target,
                       jnp.asarray(rng.normal(size=(64, 3)), jnp.float32), gamma=1.0)
    assert (double <= td_target(zeros, zeros.astype(bool), q_target, gamma=1.0)).all()


def test_linear_epsilon():
    steps = np.array([0, 250, 500, 1000, 5000])
    got = jax.vmap(lambda t: linear_epsilon(t, 1.0, 0.05, 1000.0))(jnp.asarray(steps))
    np.testing.assert_allclose(got, np.interp(steps, [0, 1000], [1.0, 0.05]), rtol=1e-6)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"train_frequency=5 must be a positive multiple of num_envs=4"):
        DQNConfig(num_envs=4, train_frequency=5)
    with pytest.raises(ValueError, match=r"loss must be one of"):
        DQNConfig(loss="l1")


def test_small_run_learns_cartpole_with_finite_metrics():
    """10k environment steps on 4 environments: returns climb from a random
    policy's ~22 and the loss and Q-values stay finite."""
    config = DQNConfig(num_envs=4, total_timesteps=10_000, buffer_size=2_000, batch_size=64,
                       learning_starts=1_000, train_frequency=4, target_update_interval=200,
                       log_every=1_000, learning_rate=1e-3, exploration_fraction=0.3)
    state, metrics = make_dqn_train(config)(jax.random.key(0))
    assert metrics["episode_return"].shape == (10,)
    for name, value in metrics.items():
        assert np.isfinite(np.asarray(value, np.float64)).all(), name
    np.testing.assert_array_equal(metrics["timesteps"], 1_000 * np.arange(1, 11))
    np.testing.assert_allclose(metrics["epsilon"][-1], 0.05, rtol=1e-6)
    np.testing.assert_allclose(metrics["epsilon"][0], 1.0 - 0.95 / 3, rtol=1e-5)
    # One gradient step every 4 environment steps from step 1000 on (inclusive).
    assert int(state.step) == (10_000 - 1_000) // 4 + 1
    returns = np.asarray(metrics["episode_return"])
    assert returns[0] < 40 and returns[-5:].mean() > 100, returns
