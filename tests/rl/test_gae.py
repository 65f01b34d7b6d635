"""GAE and discounted returns against numpy written out by hand."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from nnlib.rl import discounted_returns, generalized_advantage_estimation


def numpy_gae(rewards, values, next_values, terminated, done, gamma, lam):
    """Backward recursion, one environment and one step at a time."""
    time, envs = rewards.shape
    advantages = np.zeros((time, envs))
    for env in range(envs):
        running = 0.0
        for t in reversed(range(time)):
            if done[t, env]:
                running = 0.0  # t + 1 belongs to another episode
            bootstrap = 0.0 if terminated[t, env] else gamma * next_values[t, env]
            delta = rewards[t, env] + bootstrap - values[t, env]
            running = delta + gamma * lam * running
            advantages[t, env] = running
    return advantages


def random_rollout(seed, time=12, envs=3):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(time, envs)).astype(np.float32)
    values = rng.normal(size=(time, envs)).astype(np.float32)
    next_values = rng.normal(size=(time, envs)).astype(np.float32)
    terminated = rng.random((time, envs)) < 0.15
    truncated = (rng.random((time, envs)) < 0.1) & ~terminated
    return rewards, values, next_values, terminated, terminated | truncated


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.0), (0.97, 1.0)])
def test_gae_matches_numpy_recursion_across_episode_boundaries(gamma, lam):
    rewards, values, next_values, terminated, done = random_rollout(0)
    assert terminated.any() and (done & ~terminated).any()  # both kinds of boundary occur
    adv, targets = generalized_advantage_estimation(
        jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(next_values),
        jnp.asarray(terminated), jnp.asarray(done), gamma=gamma, gae_lambda=lam)
    expected = numpy_gae(rewards, values, next_values, terminated, done, gamma, lam)
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets, expected + values, rtol=1e-5, atol=1e-5)


def test_gae_limits_are_td_error_and_monte_carlo_return():
    """lambda=0 is the one-step TD error; lambda=1 within one episode is the
    discounted sum of future rewards (written as a forward sum) minus V(s_t)."""
    gamma, time = 0.9, 7
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(time,)).astype(np.float32)
    values = rng.normal(size=(time,)).astype(np.float32)
    next_values = np.append(values[1:], 0.0).astype(np.float32)
    terminated = np.zeros(time, bool)
    terminated[-1] = True  # the episode ends (terminally) on the last step
    args = [jnp.asarray(a) for a in (rewards, values, next_values, terminated, terminated)]
    td, _ = generalized_advantage_estimation(*args, gamma=gamma, gae_lambda=0.0)
    np.testing.assert_allclose(
        td, rewards + gamma * next_values * ~terminated - values, rtol=1e-6, atol=1e-6)
    mc, _ = generalized_advantage_estimation(*args, gamma=gamma, gae_lambda=1.0)
    forward = np.array([sum(gamma ** (k - t) * rewards[k] for k in range(t, time))
                        for t in range(time)])
    np.testing.assert_allclose(mc, forward - values, rtol=1e-5, atol=1e-5)


def test_truncation_bootstraps_termination_does_not():
    # One step, reward 1, V(s)=0, V(s')=10: truncated -> 1 + gamma*10, terminated -> 1.
    ones, zeros, tens = jnp.ones((1, 2)), jnp.zeros((1, 2)), jnp.full((1, 2), 10.0)
    terminated = jnp.array([[True, False]])
    done = jnp.array([[True, True]])
    adv, _ = generalized_advantage_estimation(ones, zeros, tens, terminated, done,
                                              gamma=0.5, gae_lambda=0.9)
    np.testing.assert_allclose(adv, [[1.0, 6.0]])


def test_gae_rejects_mismatched_shapes():
    a = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match=r"generalized_advantage_estimation expected .* one shape"):
        generalized_advantage_estimation(a, a, a[:3], a.astype(bool), a.astype(bool),
                                         gamma=0.9, gae_lambda=0.9)


def test_discounted_returns_matches_forward_sums_per_episode():
    gamma = 0.8
    rewards = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], np.float32)
    done = np.array([False, False, True, False, False, False])
    got = discounted_returns(jnp.asarray(rewards)[:, None], jnp.asarray(done)[:, None],
                             gamma=gamma, bootstrap=jnp.array([10.0]))[:, 0]
    first = [1 + gamma * 2 + gamma**2 * 3, 2 + gamma * 3, 3]
    second = [4 + gamma * 5 + gamma**2 * 6 + gamma**3 * 10, 5 + gamma * 6 + gamma**2 * 10,
              6 + gamma * 10]
    np.testing.assert_allclose(got, first + second, rtol=1e-6)


def test_mixed_precision_values_and_bootstrap():
    # bfloat16 value estimates with float32 rewards (a bf16 critic): the recursions
    # run in the promoted dtype instead of failing on the scan carry's dtype.
    rewards, values, next_values, terminated, done = random_rollout(1)
    values16, next16 = (jnp.asarray(v, jnp.bfloat16) for v in (values, next_values))
    adv, targets = generalized_advantage_estimation(
        jnp.asarray(rewards), values16, next16, jnp.asarray(terminated), jnp.asarray(done),
        gamma=0.99, gae_lambda=0.95)
    assert adv.dtype == targets.dtype == jnp.float32
    expected = numpy_gae(rewards, np.asarray(values16, np.float32),
                         np.asarray(next16, np.float32), terminated, done, 0.99, 0.95)
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)
    returns = discounted_returns(jnp.asarray(rewards, jnp.bfloat16), jnp.asarray(done),
                                 gamma=0.9, bootstrap=jnp.ones(rewards.shape[1], jnp.float32))
    assert returns.dtype == jnp.float32
