"""DDPM against numpy and against samplers with a known answer.

* Schedules: ``abar`` against ``np.cumprod(1 - beta)``; the cosine schedule
  against ``f(t) / f(0)``; the linear one against Ho et al.'s endpoints.
* ``q(x_t | x_0)``: mean and variance against a numpy simulation that applies
  the one-step kernel ``t`` times.
* The posterior ``q(x_{t-1} | x_t, x_0)``: against Bayes' rule for the two
  Gaussians in numpy (precision-weighted), and the sampler's step against
  Ho et al.'s Algorithm 2 formula.
* Sampling with the *exact* noise predictor of a known data distribution: a
  point mass is recovered exactly, a 1-D Gaussian's mean and standard
  deviation are reproduced (DDPM and DDIM); shapes and determinism by key.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nnlib.generative import (
    MLPDenoiser,
    NoiseSchedule,
    ddim_sample,
    ddim_timesteps,
    ddpm_loss,
    ddpm_sample,
    make_ddpm_train_step,
    noise_schedule,
    predict_x0_from_noise,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
)
from nnlib.train import TrainState


def test_schedules_against_numpy():
    for kind in ("linear", "cosine"):
        s = noise_schedule(kind, 100)
        betas = np.asarray(s.betas, np.float64)
        np.testing.assert_allclose(s.alpha_bars, np.cumprod(1.0 - betas), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(s.alpha_bars_prev[1:], s.alpha_bars[:-1])
        assert float(s.alpha_bars_prev[0]) == 1.0 and float(s.alpha_bars[-1]) < 0.01
    linear = noise_schedule("linear", 1000)
    np.testing.assert_allclose([linear.betas[0], linear.betas[-1]], [1e-4, 0.02], rtol=1e-6)
    t = np.arange(1, 51)
    f = np.cos((t / 50 + 0.008) / 1.008 * np.pi / 2) ** 2
    cosine = noise_schedule("cosine", 50)
    unclipped = np.asarray(cosine.betas) < 0.999
    np.testing.assert_allclose(np.asarray(cosine.alpha_bars)[unclipped],
                               (f / np.cos(0.008 / 1.008 * np.pi / 2) ** 2)[unclipped],
                               rtol=1e-4)
    with pytest.raises(ValueError, match="kind must be one of"):
        noise_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match=r"betas of shape \[T\] in \(0, 1\)"):
        NoiseSchedule.from_betas([0.1, 1.5])


def test_forward_marginal_matches_repeated_one_step_kernel():
    s = noise_schedule("linear", 40)
    betas = np.asarray(s.betas, np.float64)
    x0 = np.array([0.9, -0.4, 0.1])
    rng = np.random.default_rng(0)
    x = np.tile(x0, (100_000, 1))
    for step in range(25):  # x_{t} = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps, t = 0..24
        x = np.sqrt(1 - betas[step]) * x + np.sqrt(betas[step]) * rng.normal(size=x.shape)
    t = jnp.full((1,), 24)
    mean, var = q_mean_variance(s, jnp.asarray(x0[None], jnp.float32), t)
    np.testing.assert_allclose(mean[0], np.sqrt(np.prod(1 - betas[:25])) * x0, rtol=1e-5)
    np.testing.assert_allclose(var[0], 1 - np.prod(1 - betas[:25]), rtol=1e-5)
    np.testing.assert_allclose(x.mean(0), mean[0], atol=0.01)
    np.testing.assert_allclose(x.var(0), var[0], rtol=0.02)
    noise = jnp.asarray(rng.normal(size=(1, 3)), jnp.float32)
    xt = q_sample(s, jnp.asarray(x0[None], jnp.float32), t, noise)
    np.testing.assert_allclose(xt, mean + jnp.sqrt(var) * noise, rtol=1e-5)
    np.testing.assert_allclose(predict_x0_from_noise(s, xt, t, noise)[0], x0, atol=1e-5)


def test_posterior_is_bayes_rule_and_algorithm_2():
    s = noise_schedule("cosine", 30)
    b = np.asarray(s.betas, np.float64)
    abar = np.cumprod(1 - b)
    rng = np.random.default_rng(1)
    t = np.array([1, 7, 15, 29])
    x0, xt = rng.normal(size=(2, 4, 3))
    mean, var = q_posterior_mean_variance(s, jnp.asarray(x0, jnp.float32),
                                          jnp.asarray(xt, jnp.float32), jnp.asarray(t))
    # Prior x_{t-1} | x_0 ~ N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}); likelihood
    # x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t): multiply the Gaussians.
    prior_mean, prior_var = np.sqrt(abar[t - 1])[:, None] * x0, (1 - abar[t - 1])[:, None]
    alpha, beta = (1 - b[t])[:, None], b[t][:, None]
    post_var = 1.0 / (1.0 / prior_var + alpha / beta)
    post_mean = post_var * (prior_mean / prior_var + np.sqrt(alpha) * xt / beta)
    np.testing.assert_allclose(var, np.broadcast_to(post_var, (4, 3)), rtol=1e-4)
    np.testing.assert_allclose(mean, post_mean, rtol=1e-4, atol=1e-5)
    # At t = 0 (the paper's t = 1) the posterior is x_0 itself.
    mean0, var0 = q_posterior_mean_variance(s, jnp.asarray(x0, jnp.float32),
                                            jnp.asarray(xt, jnp.float32), jnp.zeros(4, int))
    np.testing.assert_allclose(mean0, x0, rtol=1e-5)
    np.testing.assert_allclose(var0, 0.0)
    # The sampler's mean (posterior at x0_hat) is Algorithm 2's
    # (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t).
    eps = rng.normal(size=(4, 3))
    x0_hat = predict_x0_from_noise(s, jnp.asarray(xt, jnp.float32), jnp.asarray(t),
                                   jnp.asarray(eps, jnp.float32))
    step_mean, _ = q_posterior_mean_variance(s, x0_hat, jnp.asarray(xt, jnp.float32),
                                             jnp.asarray(t))
    algorithm_2 = (xt - beta / np.sqrt(1 - abar[t])[:, None] * eps) / np.sqrt(alpha)
    np.testing.assert_allclose(step_mean, algorithm_2, rtol=1e-4, atol=1e-4)


class _GaussianOracle(nn.Module):
    """The exact noise predictor E[eps | x_t] for data x_0 ~ N(m, s^2) (s = 0: a point
    mass): with abar = abar_t, E[eps | x_t] = sqrt(1-abar) (x_t - sqrt(abar) m) /
    (abar s^2 + 1 - abar)."""

    alpha_bars: tuple[float, ...]
    mean: float
    std: float

    @nn.compact
    def __call__(self, x, t, *, train=False):
        abar = jnp.asarray(self.alpha_bars)[t].reshape(-1, *([1] * (x.ndim - 1)))
        return (jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * self.mean)
                / (abar * self.std**2 + 1 - abar))


def _gaussian_sampler_moments(alpha_bars, mean, std, steps, kind):
    """Exact mean and standard deviation of a sampler's output for data N(mean, std^2)
    and the exact noise predictor, by a numpy recursion (float64).

    With Gaussian data every step is affine in ``d_t = x_t - sqrt(abar_t) mean`` plus
    independent noise, ``d_prev = k_t d_t + sigma_t z``, so the law of ``d`` is
    carried exactly from ``x_T ~ N(0, 1)``: ``E d_prev = k E d``, ``Var d_prev = k^2
    Var d + sigma^2``. With ``V_t = abar_t std^2 + 1 - abar_t`` (the true variance of
    ``x_t``):

    * DDPM (posterior mean at ``x0_hat = E[x_0 | x_t]``): ``k = c0_t sqrt(abar_t)
      std^2 / V_t + ct_t``, ``sigma^2 = beta_t`` or ``betatilde_t``, none at t = 0.
    * DDIM, eta = 0: ``k = (sqrt(abar_prev abar_t) std^2 + sqrt((1 - abar_prev)
      (1 - abar_t))) / V_t``, which by Cauchy-Schwarz is at most ``sqrt(V_prev /
      V_t)``: coarse deterministic steps shrink the spread.
    """
    ab = np.asarray(alpha_bars, np.float64)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    beta = 1.0 - ab / ab_prev
    var_t = ab * std**2 + 1.0 - ab
    m, v = -np.sqrt(ab[steps[-1]]) * mean, 1.0  # d_T for x_T ~ N(0, 1)
    previous = np.concatenate([[-1], steps[:-1]])
    for t, t_prev in zip(steps[::-1], previous[::-1], strict=True):
        if kind == "ddim":
            a_prev = ab[t_prev] if t_prev >= 0 else 1.0
            k, sigma2 = (np.sqrt(a_prev * ab[t]) * std**2
                         + np.sqrt((1 - a_prev) * (1 - ab[t]))) / var_t[t], 0.0
        else:
            c0 = np.sqrt(ab_prev[t]) * beta[t] / (1 - ab[t])
            ct = np.sqrt(1 - beta[t]) * (1 - ab_prev[t]) / (1 - ab[t])
            k = c0 * np.sqrt(ab[t]) * std**2 / var_t[t] + ct
            sigma2 = 0.0 if t == 0 else (
                beta[t] if kind == "beta" else (1 - ab_prev[t]) / (1 - ab[t]) * beta[t])
        m, v = k * m, k * k * v + sigma2
    return mean + m, np.sqrt(v)


def test_samplers_with_the_exact_noise_predictor():
    s = noise_schedule("cosine", 100)
    abar = tuple(float(a) for a in s.alpha_bars)
    point = _GaussianOracle(abar, mean=0.4, std=0.0)
    x0 = jnp.full((3, 1), 0.4)
    assert float(ddpm_loss(point.apply, {}, s, x0, jax.random.key(0))) < 1e-9
    got = ddpm_sample(point, {}, s, jax.random.key(1), (6, 2, 2), clip_denoised=False)
    np.testing.assert_allclose(got, 0.4, atol=1e-4)
    got = ddim_sample(point, {}, s, jax.random.key(1), (6, 2, 2), num_sampling_steps=10)
    np.testing.assert_allclose(got, 0.4, atol=1e-4)

    # A 1-D Gaussian: each sampler's output law against the exact recursion above,
    # within 4 standard errors of n draws.
    oracle = _GaussianOracle(abar, mean=0.3, std=0.2)
    n = 20_000
    all_steps = np.arange(100)
    cases = {
        "beta": ddpm_sample(oracle, {}, s, jax.random.key(2), (n, 1), clip_denoised=False),
        "posterior": ddpm_sample(oracle, {}, s, jax.random.key(2), (n, 1),
                                 variance="posterior", clip_denoised=False),
        "ddim": ddim_sample(oracle, {}, s, jax.random.key(3), (n, 1), num_sampling_steps=25,
                            clip_denoised=False),
    }
    expected = {}
    for kind, x in cases.items():
        steps = ddim_timesteps(100, 25) if kind == "ddim" else all_steps
        mean, std = _gaussian_sampler_moments(abar, 0.3, 0.2, steps, kind)
        expected[kind] = std
        x = np.asarray(x, np.float64)
        assert abs(x.mean() - mean) < 4 * std / np.sqrt(n), (kind, x.mean(), mean)
        assert abs(x.std() - std) < 4 * std / np.sqrt(2 * n), (kind, x.std(), std)
    # beta_t over-disperses a little, betatilde_t (exact only for a point mass, Ho et al.
    # sec. 3.2) and coarse DDIM steps under-disperse: the recursion says by how much.
    assert expected["beta"] > 0.2 > expected["posterior"] > expected["ddim"] > 0.17
    np.testing.assert_array_equal(ddim_timesteps(100, 4), [0, 33, 66, 99])


def test_denoiser_training_and_sampling_shapes_and_determinism():
    s = noise_schedule("cosine", 20)
    model = MLPDenoiser(num_timesteps=20, hidden_size=32, num_blocks=1, time_embedding_dim=8)
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (32, 3, 3, 1)), jnp.float32)
    state = jax.jit(lambda key: TrainState.create(
        model=model, tx=optax.adam(3e-3), key=key, example_input=x[:1],
        t=jnp.zeros((1,), jnp.int32)))(jax.random.key(0))
    step = jax.jit(make_ddpm_train_step(s))
    losses = []
    for _ in range(60):
        state, metrics = step(state, {"inputs": x})
        losses.append(float(metrics["loss"]))
    assert bool(metrics["finite"]) and int(state.step) == 60
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])  # noise MSE starts near 1

    a, trajectory = ddpm_sample(model, state.params, s, jax.random.key(1), (5, 3, 3, 1),
                                return_trajectory=True)
    assert a.shape == (5, 3, 3, 1) and trajectory.shape == (21, 5, 3, 3, 1)
    np.testing.assert_array_equal(trajectory[-1], a)
    np.testing.assert_array_equal(
        a, ddpm_sample(model, state.params, s, jax.random.key(1), (5, 3, 3, 1)))
    assert not np.allclose(a, ddpm_sample(model, state.params, s, jax.random.key(2),
                                          (5, 3, 3, 1)))
    assert float(jnp.max(jnp.abs(a))) <= 1.0 + 1e-6  # x_0 is a clipped x0_hat at t = 0
    with pytest.raises(ValueError, match=r"MLPDenoiser expected t of shape \[batch\]"):
        model.apply({"params": state.params}, x[:2], jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="variance must be"):
        ddpm_sample(model, state.params, s, jax.random.key(1), (5, 3, 3, 1), variance="big")
