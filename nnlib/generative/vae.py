"""The variational autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes").

A latent-variable model ``p(z) = N(0, I)``, ``p_theta(x | z)`` a decoder
network, trained by maximising a lower bound on ``log p(x)`` with the help of
an encoder ``q_phi(z | x) = N(mu(x), diag sigma^2(x))``::

    log p(x) >= ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z))
                          \\_ reconstruction _/   \\_ analytic for Gaussians _/

* **Reparameterisation.** ``z = mu + sigma * eps`` with ``eps ~ N(0, I)``
  drawn from an explicit key: the sample is a differentiable function of
  ``(mu, sigma)``, so ``jax.grad`` goes through it (low-variance pathwise
  gradients instead of REINFORCE).
* **KL in closed form.** ``KL(N(mu, sigma^2) || N(0, 1)) = 0.5 (mu^2 + sigma^2
  - 1 - log sigma^2)`` per latent dimension; only the reconstruction term is a
  Monte-Carlo estimate (one sample per example in training).
* **IWAE bound** (Burda, Grosse & Salakhutdinov 2016): ``log (1/K) sum_k
  p(x, z_k) / q(z_k | x)`` with ``z_k ~ q``. ``K = 1`` is an ELBO; the bound
  tightens monotonically in ``K`` towards ``log p(x)``, which is how a test
  log-likelihood is estimated.

Likelihoods ``p(x | z)`` (the ``likelihood`` attribute; the decoder's
output is a logit per pixel for the first two, a mean for the third):

* ``"binomial"`` (default, for the 8x8 digits): each pixel is a count ``k in
  {0, ..., n}`` of ``n = num_trials`` "on" quanta, given as ``x = k / n`` in
  [0, 1] (the digits are scanned at 17 grey levels, ``n = 16``). A Binomial
  is ``n`` Bernoullis sharing one probability, and its log-probability is
  ``n`` times the familiar Bernoulli cross-entropy on ``x`` plus ``log C(n,
  k)``. Keeping the constant makes the ELBO a bound, in nats, on the
  probability of the actual discrete image — a number that can be compared
  with other models of the same data. (The common practice of Bernoulli
  cross-entropy on grey pixels is not a normalised likelihood of anything.)
* ``"bernoulli"``: binary pixels ``x in {0, 1}`` (binarised MNIST, the
  paper's setting); the ``binomial`` case with ``n = 1``.
* ``"gaussian"``: ``N(x; decoder(z), gaussian_std^2)`` with a fixed standard
  deviation; a *density*, so its "nats" depend on the pixel scale and are
  not comparable with the discrete likelihoods.

Shapes: B batch, L latent_dim, K importance samples, ``*data`` the shape of
one example (``(8, 8, 1)`` for the digits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln, logsumexp
from jaxtyping import Array, Float, PRNGKeyArray

from nnlib.layers import MLP, ShapeError

LIKELIHOODS = ("binomial", "bernoulli", "gaussian")
_LOG_2PI = math.log(2.0 * math.pi)


# --- the pieces, as pure functions ------------------------------------------------------


def reparameterize(
    key: PRNGKeyArray,
    mean: Float[Array, "*batch latent"],
    log_var: Float[Array, "*batch latent"],
    num_samples: int | None = None,
) -> Float[Array, "*samples_batch latent"]:
    """``z = mean + exp(log_var / 2) * eps``, ``eps ~ N(0, I)`` from ``key``.

    Returns ``[*batch, L]``, or ``[num_samples, *batch, L]`` when
    ``num_samples`` is given. Differentiable in ``mean`` and ``log_var``.
    """
    shape = mean.shape if num_samples is None else (num_samples, *mean.shape)
    eps = jax.random.normal(key, shape, mean.dtype)
    return mean + jnp.exp(0.5 * log_var) * eps


def gaussian_kl(
    mean: Float[Array, "*batch latent"], log_var: Float[Array, "*batch latent"]
) -> Float[Array, "*batch"]:
    """``KL(N(mean, diag exp(log_var)) || N(0, I))`` in nats, summed over the latent axis."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(log_var) - 1.0 - log_var, axis=-1)


def diagonal_gaussian_log_prob(
    z: Float[Array, "*batch latent"],
    mean: Float[Array, "*batch latent"] | float = 0.0,
    log_var: Float[Array, "*batch latent"] | float = 0.0,
) -> Float[Array, "*batch"]:
    """``log N(z; mean, diag exp(log_var))``, summed over the last axis (standard normal
    by default)."""
    return -0.5 * jnp.sum(
        _LOG_2PI + log_var + jnp.square(z - mean) * jnp.exp(-log_var), axis=-1)


def log_likelihood(
    decoded: Float[Array, "batch ..."],
    x: Float[Array, "batch ..."],
    likelihood: str = "binomial",
    *,
    num_trials: int = 16,
    gaussian_std: float = 0.1,
) -> Float[Array, " batch"]:
    """``log p(x | z)`` in nats per example, summed over every axis but the first.

    Args:
      decoded: the decoder's output; per-pixel logits for ``"binomial"`` and
        ``"bernoulli"``, the mean for ``"gaussian"``.
      x: data in [0, 1]; ``k / num_trials`` for ``"binomial"``, {0, 1} for
        ``"bernoulli"``. Broadcasts against ``decoded`` (e.g. ``decoded:
        [K, B, *data]`` with ``x: [B, *data]`` gives ``[K, B]``); the sum is
        over the trailing ``x.ndim - 1`` axes.
      likelihood: one of ``LIKELIHOODS``.
      num_trials: ``n`` of the Binomial.
      gaussian_std: the Gaussian's fixed standard deviation.
    """
    _check_likelihood("log_likelihood", likelihood)
    data_axes = tuple(range(-(x.ndim - 1), 0))
    if likelihood == "gaussian":
        z = (x - decoded) / gaussian_std
        per_pixel = -0.5 * (_LOG_2PI + jnp.square(z)) - math.log(gaussian_std)
        return jnp.sum(per_pixel, axis=data_axes)
    n = 1.0 if likelihood == "bernoulli" else float(num_trials)
    k = x * n
    # log sigmoid(l) and log sigmoid(-l) directly: no log(0) for saturated pixels.
    per_pixel = k * jax.nn.log_sigmoid(decoded) + (n - k) * jax.nn.log_sigmoid(-decoded)
    if likelihood == "binomial":
        per_pixel = per_pixel + gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0)
    return jnp.sum(per_pixel, axis=data_axes)


def _check_likelihood(fn: str, likelihood: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"{fn}: likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


# --- the model --------------------------------------------------------------------------


class VAEOutput(NamedTuple):
    """One stochastic pass of ``VAE.__call__``; every field has a leading batch axis.

    Attributes:
      decoded: decoder output for the sampled ``z``, ``[B, *data]``.
      mean, log_var: ``q(z | x)``, each ``[B, L]``.
      z: the reparameterised sample, ``[B, L]``.
      log_likelihood: ``log p(x | z)``, ``[B]`` (nats).
      kl: ``KL(q(z | x) || p(z))``, ``[B]`` (nats).
    """

    decoded: Array
    mean: Array
    log_var: Array
    z: Array
    log_likelihood: Array
    kl: Array

    @property
    def elbo(self) -> Array:
        """The single-sample ELBO estimate ``log p(x | z) - KL``, ``[B]``."""
        return self.log_likelihood - self.kl


class VAE(nn.Module):
    """Gaussian-latent VAE with MLP encoder and decoder.

    Attributes:
      latent_dim: L.
      hidden_sizes: encoder widths; the decoder mirrors them.
      data_shape: shape of one example, e.g. ``(8, 8, 1)``.
      likelihood: ``"binomial"``, ``"bernoulli"`` or ``"gaussian"`` (module
        docstring).
      num_trials: the Binomial's ``n`` (16 for the digits' 17 grey levels).
      gaussian_std: the Gaussian likelihood's fixed standard deviation.
      activation: hidden activation.

    Methods (``model.apply(variables, ..., method=...)``):

    - ``__call__(x [B, *data], *, train=False) -> VAEOutput``; draws ``z``
      from the ``"latent"`` rng stream (``rngs={"latent": key}``), so it
      plugs into ``nnlib.train.make_train_step(vae_loss(),
      rng_streams=("latent",))``.
    - ``encode(x [B, *data]) -> (mean [B, L], log_var [B, L])``
    - ``decode(z [..., L]) -> decoded [..., *data]`` (logits or mean)
    - ``mean_image(z [..., L]) -> E[x | z] [..., *data]`` in data space
    """

    latent_dim: int = 8
    hidden_sizes: Sequence[int] = (256, 128)
    data_shape: Sequence[int] = (8, 8, 1)
    likelihood: str = "binomial"
    num_trials: int = 16
    gaussian_std: float = 0.1
    activation: str | Callable[[Array], Array] = "relu"

    def setup(self) -> None:
        _check_likelihood("VAE", self.likelihood)
        self.encoder = MLP(tuple(self.hidden_sizes), out_features=2 * self.latent_dim,
                           activation=self.activation)
        self.decoder = MLP(tuple(reversed(self.hidden_sizes)),
                           out_features=math.prod(self.data_shape), activation=self.activation)

    def _check_data(self, name: str, x: Any) -> None:
        shape, data = tuple(getattr(x, "shape", ())), tuple(self.data_shape)
        if len(shape) != len(data) + 1 or shape[1:] != data:
            raise ShapeError(f"VAE.{name} expected inputs of shape [batch, *data_shape] = "
                             f"[batch, {', '.join(map(str, data))}], got shape {shape}")

    def encode(self, x: Float[Array, "batch ..."]) -> tuple[Array, Array]:
        """``q(z | x)``: ``x [B, *data] -> (mean [B, L], log_var [B, L])``."""
        self._check_data("encode", x)
        h = self.encoder(x.reshape(x.shape[0], -1))  # [B, 2L]
        mean, log_var = jnp.split(h, 2, axis=-1)
        return mean, log_var

    def decode(self, z: Float[Array, "... latent"]) -> Float[Array, "*batch_then_data"]:
        """Parameters of ``p(x | z)``: ``z [..., L] -> [..., *data]`` (logits, or the
        Gaussian's mean)."""
        if z.shape[-1] != self.latent_dim:
            raise ShapeError(f"VAE.decode expected z of shape [..., latent_dim="
                             f"{self.latent_dim}], got shape {tuple(z.shape)}")
        return self.decoder(z).reshape(*z.shape[:-1], *self.data_shape)

    def mean_image(self, z: Float[Array, "... latent"]) -> Float[Array, "*batch_then_data"]:
        """``E[x | z]`` in data space, ``[..., *data]`` (probabilities for the
        discrete likelihoods, since ``E[k / n] = p``)."""
        decoded = self.decode(z)
        return decoded if self.likelihood == "gaussian" else jax.nn.sigmoid(decoded)

    def log_likelihood(self, decoded: Array, x: Array) -> Array:
        """``log p(x | z)`` for this model's likelihood, ``[...]`` (see ``log_likelihood``)."""
        return log_likelihood(decoded, x, self.likelihood, num_trials=self.num_trials,
                              gaussian_std=self.gaussian_std)

    def __call__(self, x: Float[Array, "batch ..."], *, train: bool = False) -> VAEOutput:
        del train  # no dropout or batch statistics
        mean, log_var = self.encode(x)
        z = reparameterize(self.make_rng("latent"), mean, log_var)  # [B, L]
        decoded = self.decode(z)  # [B, *data]
        return VAEOutput(decoded, mean, log_var, z, self.log_likelihood(decoded, x),
                         gaussian_kl(mean, log_var))


# --- objectives -------------------------------------------------------------------------


class ELBOTerms(NamedTuple):
    """``elbo = log_likelihood - kl``, each ``[B]`` in nats (log-likelihood averaged over
    the Monte-Carlo samples)."""

    elbo: Array
    log_likelihood: Array
    kl: Array


def _variables(params: Any) -> Any:
    return params if "params" in params else {"params": params}


def elbo(
    model: VAE, params: Any, x: Float[Array, "batch ..."], key: PRNGKeyArray,
    num_samples: int = 1,
) -> ELBOTerms:
    """The ELBO per example with ``num_samples`` reparameterised samples of ``z`` for the
    reconstruction term and the analytic KL. Pure and jittable (``model`` static)."""
    variables = _variables(params)
    mean, log_var = model.apply(variables, x, method="encode")  # [B, L] each
    z = reparameterize(key, mean, log_var, num_samples)  # [K, B, L]
    decoded = model.apply(variables, z, method="decode")  # [K, B, *data]
    ll = jnp.mean(model.apply(variables, decoded, x, method="log_likelihood"), axis=0)  # [B]
    kl = gaussian_kl(mean, log_var)
    return ELBOTerms(ll - kl, ll, kl)


def iwae_bound(
    model: VAE, params: Any, x: Float[Array, "batch ..."], key: PRNGKeyArray,
    num_samples: int = 100,
) -> Float[Array, " batch"]:
    """Importance-weighted bound ``log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x)``,
    ``[B]`` nats, ``K = num_samples``; ``ELBO <= IWAE_K <= log p(x)`` in expectation,
    tight as ``K -> inf`` (Burda et al. 2016)."""
    variables = _variables(params)
    mean, log_var = model.apply(variables, x, method="encode")
    z = reparameterize(key, mean, log_var, num_samples)  # [K, B, L]
    decoded = model.apply(variables, z, method="decode")  # [K, B, *data]
    log_px_z = model.apply(variables, decoded, x, method="log_likelihood")  # [K, B]
    log_w = log_px_z + diagonal_gaussian_log_prob(z) - diagonal_gaussian_log_prob(
        z, mean, log_var)  # [K, B]
    return logsumexp(log_w, axis=0) - math.log(num_samples)


def vae_loss(kl_weight: float = 1.0) -> Callable[[VAEOutput, Any], tuple[Array, dict]]:
    """Loss for ``nnlib.train.make_train_step``: the negative ELBO in nats per example,
    averaged over the batch's unmasked rows.

    ``kl_weight`` != 1 gives the beta-VAE objective (Higgins et al. 2017), which
    is no longer a bound on ``log p(x)``; the reported ``elbo`` metric always uses
    weight 1.
    """

    def loss_fn(outputs: VAEOutput, batch: Any) -> tuple[Array, dict[str, Array]]:
        weights = batch.get("mask")
        n = outputs.kl.shape[0]
        weights = jnp.ones((n,)) if weights is None else jnp.asarray(weights, jnp.float32)
        total = jnp.maximum(jnp.sum(weights), 1.0)

        def mean(v: Array) -> Array:
            return jnp.sum(v * weights) / total

        loss = mean(kl_weight * outputs.kl - outputs.log_likelihood)
        return loss, {"loss": loss, "elbo": mean(outputs.elbo),
                      "log_likelihood": mean(outputs.log_likelihood), "kl": mean(outputs.kl)}

    return loss_fn


# --- using a trained model -----------------------------------------------------------------


def sample(
    model: VAE, params: Any, key: PRNGKeyArray, num_samples: int, *, mean: bool = True
) -> Float[Array, "num_samples ..."]:
    """Generates ``[num_samples, *data]`` images: ``z ~ N(0, I)``, then ``E[x | z]``
    (``mean=True``, the usual picture) or a draw ``x ~ p(x | z)``."""
    z_key, x_key = jax.random.split(key)
    z = jax.random.normal(z_key, (num_samples, model.latent_dim))
    variables = _variables(params)
    if mean:
        return model.apply(variables, z, method="mean_image")
    decoded = model.apply(variables, z, method="decode")
    if model.likelihood == "gaussian":
        return decoded + model.gaussian_std * jax.random.normal(x_key, decoded.shape)
    n = 1 if model.likelihood == "bernoulli" else model.num_trials
    counts = jax.random.binomial(x_key, n, jax.nn.sigmoid(decoded))
    return counts / n


def reconstruct(
    model: VAE, params: Any, x: Float[Array, "batch ..."]
) -> Float[Array, "batch ..."]:
    """``E[x | z = mean of q(z | x)]``: the deterministic reconstruction, ``[B, *data]``."""
    variables = _variables(params)
    mean, _ = model.apply(variables, x, method="encode")
    return model.apply(variables, mean, method="mean_image")


def interpolate(
    model: VAE, params: Any, z0: Float[Array, " latent"], z1: Float[Array, " latent"],
    num_points: int,
) -> Float[Array, "num_points ..."]:
    """Decodes ``num_points`` evenly spaced points on the straight line from ``z0`` to
    ``z1`` (both ends included): ``[num_points, *data]`` mean images."""
    t = jnp.linspace(0.0, 1.0, num_points)[:, None]  # [N, 1]
    z = (1.0 - t) * jnp.asarray(z0)[None] + t * jnp.asarray(z1)[None]  # [N, L]
    return model.apply(_variables(params), z, method="mean_image")


__all__ = [
    "LIKELIHOODS",
    "VAE",
    "ELBOTerms",
    "VAEOutput",
    "diagonal_gaussian_log_prob",
    "elbo",
    "gaussian_kl",
    "interpolate",
    "iwae_bound",
    "log_likelihood",
    "reconstruct",
    "reparameterize",
    "sample",
    "vae_loss",
]
