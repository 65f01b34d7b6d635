"""The VAE against closed forms, numpy/scipy and quadrature.

* Analytic KL: the textbook formula in numpy, and a Monte-Carlo estimate of
  ``E_q[log q(z) - log p(z)]`` with scipy densities.
* Likelihoods: ``scipy.stats`` binom / bernoulli / norm log-probabilities.
* The bound chain ``ELBO <= IWAE_K <= log p(x)`` on a VAE with a 1-D latent,
  where ``log p(x)`` and the exact ELBO ``log p(x) - KL(q || p(z | x))`` are
  computed by quadrature on a grid of z (the decoder evaluated on the grid,
  every density in scipy).
* Reparameterised gradients: ``d/d(mean, log_var) E[||z - c||^2]`` against its
  closed form, and the ELBO's parameter gradient (fixed key) against finite
  differences in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats
from scipy.special import expit, logsumexp

from nnlib.generative import (
    VAE,
    diagonal_gaussian_log_prob,
    elbo,
    gaussian_kl,
    interpolate,
    iwae_bound,
    log_likelihood,
    reconstruct,
    reparameterize,
    sample,
    vae_loss,
)
from nnlib.layers import ShapeError
from nnlib.train import TrainState, make_train_step


def test_gaussian_kl_closed_form_and_monte_carlo():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 4))
    log_var = rng.normal(scale=0.7, size=(3, 4))
    var = np.exp(log_var)
    expected = 0.5 * np.sum(mean**2 + var - 1.0 - np.log(var), axis=1)
    np.testing.assert_allclose(gaussian_kl(jnp.asarray(mean), jnp.asarray(log_var)), expected,
                               rtol=1e-5)
    # Monte Carlo: E_q[log q(z) - log p(z)], scipy densities.
    z = mean + np.sqrt(var) * rng.normal(size=(200_000, 3, 4))
    log_ratio = (stats.norm.logpdf(z, mean, np.sqrt(var)) - stats.norm.logpdf(z)).sum(-1)
    stderr = log_ratio.std(0) / np.sqrt(len(z))
    assert np.all(np.abs(log_ratio.mean(0) - expected) < 4 * stderr + 1e-3)


def test_log_likelihoods_match_scipy():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=2.0, size=(5, 3, 2, 1)).astype(np.float32)
    k = rng.integers(0, 17, size=(3, 2, 1))
    p = expit(logits.astype(np.float64))
    got = log_likelihood(jnp.asarray(logits), jnp.asarray(k / 16, jnp.float32), "binomial",
                         num_trials=16)  # [5, 3]: broadcast over the samples axis
    np.testing.assert_allclose(got, stats.binom.logpmf(k, 16, p).sum((-2, -1)), rtol=1e-4)
    bits = (k > 8).astype(np.float32)
    got = log_likelihood(jnp.asarray(logits[0]), jnp.asarray(bits), "bernoulli")
    np.testing.assert_allclose(got, stats.bernoulli.logpmf(bits, p[0]).sum((1, 2)), rtol=1e-4)
    x = rng.uniform(size=(3, 2, 1)).astype(np.float32)
    got = log_likelihood(jnp.asarray(logits[0]), jnp.asarray(x), "gaussian", gaussian_std=0.3)
    np.testing.assert_allclose(got, stats.norm.logpdf(x, logits[0], 0.3).sum((1, 2)),
                               rtol=1e-4)
    z, m, lv = rng.normal(size=(3, 4, 2))
    np.testing.assert_allclose(
        diagonal_gaussian_log_prob(jnp.asarray(z), jnp.asarray(m), jnp.asarray(lv)),
        stats.norm.logpdf(z, m, np.exp(lv / 2)).sum(-1), rtol=1e-5)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        log_likelihood(jnp.zeros((1, 2)), jnp.zeros((1, 2)), "poisson")


def test_reparameterized_gradient_matches_closed_form():
    mean = jnp.array([0.5, -1.0, 2.0])
    log_var = jnp.array([0.0, -1.0, 0.7])
    c = jnp.array([1.0, 0.0, -0.5])

    def objective(mean, log_var):  # MC estimate of E||z - c||^2 = ||mean - c||^2 + sum var
        z = reparameterize(jax.random.key(0), mean, log_var, num_samples=200_000)
        return jnp.mean(jnp.sum(jnp.square(z - c), axis=-1))

    g_mean, g_log_var = jax.grad(objective, argnums=(0, 1))(mean, log_var)
    np.testing.assert_allclose(g_mean, 2 * (mean - c), atol=0.03)
    np.testing.assert_allclose(g_log_var, jnp.exp(log_var), rtol=0.03)
    z = reparameterize(jax.random.key(1), mean, log_var, num_samples=100_000)
    np.testing.assert_allclose(z.mean(0), mean, atol=0.03)
    np.testing.assert_allclose(z.var(0), jnp.exp(log_var), rtol=0.03)


def _tiny_vae():
    """A 1-D latent VAE on 6 binomial pixels, weights large enough for a curved posterior."""
    model = VAE(latent_dim=1, hidden_sizes=(16,), data_shape=(6,), likelihood="binomial",
                num_trials=4, activation="tanh")
    init = jax.jit(lambda key: jax.tree.map(  # jit: eager flax init compiles op by op
        lambda w: 2.0 * w, model.init({"params": key}, jnp.zeros((1, 6)))["params"]))
    params = init(jax.random.key(3))
    x = jnp.asarray(np.array([[0, 1, 4, 3, 2, 4], [4, 4, 0, 0, 1, 2]]) / 4.0, jnp.float32)
    return model, params, x


def test_bounds_against_quadrature():
    model, params, x = _tiny_vae()
    grid = np.linspace(-12.0, 12.0, 24_001)  # z grid, step 1e-3
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(grid[:, None], jnp.float32),
                                    method="decode"), np.float64)  # [G, 6]
    counts = np.rint(np.asarray(x) * 4).astype(int)  # [B, 6]
    log_joint = (stats.binom.logpmf(counts[:, None], 4, expit(logits)[None]).sum(-1)
                 + stats.norm.logpdf(grid)[None])  # [B, G]
    dz = grid[1] - grid[0]
    log_px = logsumexp(log_joint, axis=1) + np.log(dz)  # [B]
    mean, log_var = (np.asarray(a, np.float64)[:, 0]
                     for a in model.apply({"params": params}, x, method="encode"))
    log_q = stats.norm.logpdf(grid[None], mean[:, None], np.exp(log_var / 2)[:, None])
    log_post = log_joint - log_px[:, None]
    kl_q_post = np.sum(np.exp(log_q) * (log_q - log_post), axis=1) * dz
    exact_elbo = log_px - kl_q_post
    assert np.all(kl_q_post > 0.05)  # a real gap, so the checks below can fail

    num_samples = 50_000
    terms = jax.jit(lambda k: elbo(model, params, x, k, num_samples=num_samples))(
        jax.random.key(5))
    # Monte-Carlo standard error of the reconstruction term, from the same grid.
    log_px_z = log_joint - stats.norm.logpdf(grid)[None]
    q = np.exp(log_q) * dz
    stderr = np.sqrt((np.sum(q * log_px_z**2, 1) - np.sum(q * log_px_z, 1) ** 2) / num_samples)
    assert np.all(np.abs(np.asarray(terms.elbo) - exact_elbo) < 4 * stderr + 1e-3)
    iwae = jax.jit(lambda k: iwae_bound(model, params, x, k, num_samples=num_samples))(
        jax.random.key(6))
    assert np.all(np.asarray(terms.elbo) + 0.05 < np.asarray(iwae))
    assert np.all(np.asarray(iwae) <= log_px + 0.01)
    np.testing.assert_allclose(iwae, log_px, atol=0.03)  # K = 50000 is nearly tight


def test_elbo_gradient_finite_differences():
    """Directional derivative of the fixed-key ELBO estimate: ``grad . v`` against a
    central difference along a random direction ``v``."""
    model, params, x = _tiny_vae()
    key = jax.random.key(8)  # fixed key: the estimate is a smooth function of params
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(9)
    v = treedef.unflatten([jnp.asarray(rng.normal(size=w.shape), jnp.float32) for w in leaves])
    h = 1e-3

    @jax.jit
    def directional_and_difference(p):
        def f(p):
            return jnp.sum(elbo(model, p, x, key, num_samples=3).elbo)

        grad = jax.grad(f)(p)
        directional = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad),
                                                         jax.tree.leaves(v), strict=True))
        plus = f(jax.tree.map(lambda w, d: w + h * d, p, v))
        minus = f(jax.tree.map(lambda w, d: w - h * d, p, v))
        return directional, (plus - minus) / (2 * h)

    directional, numeric = (float(a) for a in directional_and_difference(params))
    assert abs(directional) > 1.0  # a direction the ELBO really depends on
    assert directional == pytest.approx(numeric, rel=2e-3)


def test_train_step_sample_reconstruct_interpolate():
    model = VAE(latent_dim=2, hidden_sizes=(32,), data_shape=(4, 4, 1))
    x = jnp.asarray(np.random.default_rng(2).integers(0, 17, (16, 4, 4, 1)) / 16, jnp.float32)
    state = jax.jit(lambda key: TrainState.create(
        model=model, tx=optax.adam(1e-2), key=key, example_input=x[:1]))(jax.random.key(0))
    step = jax.jit(make_train_step(vae_loss(), rng_streams=("latent",)))
    losses = []
    for _ in range(40):
        state, metrics = step(state, {"inputs": x, "labels": jnp.zeros(16, jnp.int32)})
        losses.append(float(metrics["loss"]))
        assert float(metrics["elbo"]) == pytest.approx(-losses[-1], rel=1e-5)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 5.0
    z0, z1 = jnp.array([-1.0, 0.5]), jnp.array([2.0, 0.0])

    @jax.jit
    def probe(params, key):  # one program: eager flax calls compile op by op (slow)
        variables = {"params": params}
        out = model.apply(variables, x, rngs={"latent": jax.random.key(1)})
        mean, log_var = model.apply(variables, x, method="encode")
        return {
            "out": out, "mean": mean, "log_var": log_var,
            "decoded": model.apply(variables, out.z, method="decode"),
            "sample": sample(model, params, key, 5),
            "reconstruction": reconstruct(model, params, x),
            "decoded_mean": jax.nn.sigmoid(model.apply(variables, mean, method="decode")),
            "path": interpolate(model, params, z0, z1, 5),
            "ends": model.apply(variables, jnp.stack([z0, (z0 + z1) / 2, z1]),
                                method="mean_image"),
        }

    r = probe(state.params, jax.random.key(2))
    # The module's stochastic pass: KL, decoder output and log-likelihood agree with the
    # functional pieces evaluated at the z it drew.
    out = r["out"]
    np.testing.assert_allclose(out.kl, gaussian_kl(r["mean"], r["log_var"]), rtol=1e-5)
    np.testing.assert_allclose(out.decoded, r["decoded"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.log_likelihood, log_likelihood(r["decoded"], x), rtol=1e-5)
    s1 = r["sample"]
    assert s1.shape == (5, 4, 4, 1) and float(s1.min()) >= 0 and float(s1.max()) <= 1
    np.testing.assert_array_equal(s1, probe(state.params, jax.random.key(2))["sample"])
    assert not np.allclose(s1, probe(state.params, jax.random.key(3))["sample"])
    np.testing.assert_allclose(r["reconstruction"], r["decoded_mean"], rtol=1e-6)
    assert r["path"].shape == (5, 4, 4, 1)
    np.testing.assert_allclose(r["path"][jnp.array([0, 2, 4])], r["ends"], rtol=1e-5,
                               atol=1e-6)

    with pytest.raises(ShapeError, match=r"VAE.encode expected .* = \[batch, 4, 4, 1\]"):
        model.apply({"params": state.params}, x[..., 0], method="encode")
    with pytest.raises(ValueError, match="likelihood must be one of"):
        VAE(likelihood="poisson").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
