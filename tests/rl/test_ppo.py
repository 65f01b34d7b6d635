"""PPO: the clipped objective and value loss against numpy, and a small CartPole run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnlib.rl import PPOConfig, clipped_surrogate_loss, make_ppo_train, ppo_loss, value_loss


def numpy_clipped_objective(ratio, adv, eps):
    """PPO's L_clip by cases (Schulman et al. 2017, fig. 1): positive advantages
    are capped at 1 + eps, negative ones at 1 - eps."""
    per_sample = np.where(adv >= 0, np.minimum(ratio, 1 + eps) * adv,
                          np.maximum(ratio, 1 - eps) * adv)
    return per_sample.mean()


# Ratios in every region: inside the trust region, above 1 + eps, below 1 - eps,
# each with positive and negative advantages.
RATIOS = np.array([1.0, 1.1, 0.9, 1.5, 1.5, 0.5, 0.5, 1.25, 0.7], np.float32)
ADVANTAGES = np.array([0.3, -1.0, 2.0, 1.0, -1.0, 1.0, -1.0, 2.5, -0.4], np.float32)


def test_clipped_surrogate_matches_numpy_in_every_region():
    rng = np.random.default_rng(0)
    old = rng.normal(size=RATIOS.shape).astype(np.float32)
    new = old + np.log(RATIOS)
    eps = 0.2
    got = clipped_surrogate_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(ADVANTAGES), eps)
    np.testing.assert_allclose(got, -numpy_clipped_objective(RATIOS, ADVANTAGES, eps), rtol=1e-5)


def test_clipped_samples_get_no_gradient():
    """d loss / d log pi_new is -rho A / n inside the clip and 0 where the ratio
    has already moved past 1 +/- eps in the direction the advantage favours."""
    old = jnp.zeros_like(jnp.asarray(RATIOS))
    new = jnp.log(jnp.asarray(RATIOS))
    eps = 0.2
    grad = jax.grad(clipped_surrogate_loss)(new, old, jnp.asarray(ADVANTAGES), eps)
    clipped = ((ADVANTAGES > 0) & (RATIOS > 1 + eps)) | ((ADVANTAGES < 0) & (RATIOS < 1 - eps))
    expected = np.where(clipped, 0.0, -RATIOS * ADVANTAGES / len(RATIOS))
    assert clipped.sum() == 4 and (~clipped).sum() == 5
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_value_loss_with_and_without_clipping():
    values = np.array([1.0, 2.0, 0.0, -1.0], np.float32)
    old = np.array([0.5, 2.1, 0.5, 0.0], np.float32)
    targets = np.array([3.0, 1.0, 0.2, -2.0], np.float32)
    args = [jnp.asarray(a) for a in (values, old, targets)]
    np.testing.assert_allclose(value_loss(*args, None), 0.5 * np.mean((values - targets) ** 2),
                               rtol=1e-6)
    eps = 0.2
    clipped = old + np.clip(values - old, -eps, eps)
    expected = 0.5 * np.mean(np.maximum((values - targets) ** 2, (clipped - targets) ** 2))
    np.testing.assert_allclose(value_loss(*args, eps), expected, rtol=1e-6)


def test_ppo_loss_combines_the_terms_like_numpy():
    """A stand-in network whose "parameters" are the logits and values themselves."""
    rng = np.random.default_rng(3)
    b, num_actions = 16, 3
    logits = rng.normal(size=(b, num_actions)).astype(np.float32)
    values = rng.normal(size=b).astype(np.float32)
    batch = {"obs": jnp.zeros((b, 1)), "action": jnp.asarray(rng.integers(0, num_actions, b)),
             "log_prob": jnp.asarray(rng.normal(size=b) - 1.0, jnp.float32),
             "value": jnp.asarray(values + rng.normal(size=b) * 0.3, jnp.float32),
             "advantage": jnp.asarray(rng.normal(size=b) * 2 + 0.5, jnp.float32),
             "target": jnp.asarray(rng.normal(size=b), jnp.float32)}
    config = PPOConfig(clip_eps=0.2, vf_coef=0.7, ent_coef=0.05, normalize_advantages=True)
    apply_fn = lambda variables, obs: (variables["params"]["logits"], variables["params"]["values"])
    loss, metrics = ppo_loss({"logits": jnp.asarray(logits), "values": jnp.asarray(values)},
                             apply_fn, batch, config)

    np_batch = {k: np.asarray(v, np.float64) for k, v in batch.items()}
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    new_log_prob = log_p[np.arange(b), np_batch["action"].astype(int)]
    ratio = np.exp(new_log_prob - np_batch["log_prob"])
    adv = np_batch["advantage"]
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    policy = -numpy_clipped_objective(ratio, adv, 0.2)
    v_clip = np_batch["value"] + np.clip(values - np_batch["value"], -0.2, 0.2)
    v_loss = 0.5 * np.mean(np.maximum((values - np_batch["target"]) ** 2,
                                      (v_clip - np_batch["target"]) ** 2))
    entropy = -(np.exp(log_p) * log_p).sum(-1).mean()
    np.testing.assert_allclose(metrics["policy_loss"], policy, rtol=1e-4)
    np.testing.assert_allclose(metrics["value_loss"], v_loss, rtol=1e-4)
    np.testing.assert_allclose(metrics["entropy"], entropy, rtol=1e-4)
    np.testing.assert_allclose(loss, policy + 0.7 * v_loss - 0.05 * entropy, rtol=1e-4)
    np.testing.assert_allclose(metrics["clip_fraction"], np.mean(np.abs(ratio - 1) > 0.2))
    np.testing.assert_allclose(metrics["approx_kl"],
                               np.mean(ratio - 1 - np.log(ratio)), rtol=1e-4)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"num_minibatches=3 must divide the rollout size num_envs \* num_steps = 32"):
        PPOConfig(num_envs=4, num_steps=8, num_minibatches=3)
    with pytest.raises(ValueError, match=r"total_timesteps=10 is less than one rollout"):
        PPOConfig(num_envs=4, num_steps=8, num_minibatches=1, total_timesteps=10)


def test_two_seeds_in_one_vmapped_run_learn_cartpole():
    """48 updates of 512 steps (25k environment steps): a random policy lasts
    ~22 steps; both seeds, trained side by side in one program, get far past it."""
    config = PPOConfig(num_envs=8, num_steps=64, total_timesteps=24_576, learning_rate=2.5e-3,
                       anneal_lr=False)
    keys = jax.random.split(jax.random.key(0), 2)
    lowered = jax.jit(jax.vmap(make_ppo_train(config))).lower(keys)
    # Batched LAPACK kernels can deadlock XLA:CPU's thread pool when two run at
    # once (the orthogonal inits of the towers under vmap); nnlib's init uses none.
    assert "lapack" not in lowered.as_text()
    states, metrics = lowered.compile()(keys)
    assert metrics["episode_return"].shape == (2, config.num_updates) == (2, 48)
    for name, value in metrics.items():
        assert np.isfinite(np.asarray(value, np.float64)).all(), name
    np.testing.assert_array_equal(metrics["timesteps"][0], 512 * np.arange(1, 49))
    returns = np.asarray(metrics["episode_return"])
    early, late = returns[:, :3].mean(1), returns[:, -10:].mean(1)
    assert (early < 40).all(), early  # random-ish start
    assert (late > 3 * early).all() and (late > 100).all(), (early, late)
    # The seeds are different runs: different parameters.
    kernel = states.params["policy_head"]["kernel"]
    assert not np.allclose(kernel[0], kernel[1])
