"""Denoising diffusion probabilistic models (Ho, Jain & Abbeel 2020, "DDPM").

**Forward process** (fixed, no parameters): add a little Gaussian noise at
each of T steps, ``q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)``.
Gaussians compose, so any step is one draw from the data::

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),  abar_t = prod_{s<=t} (1 - beta_s)
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,       eps ~ N(0, I)

and by the end (``abar_T ~ 0``) nothing of ``x_0`` is left: ``x_T ~ N(0, I)``.

**Reverse process** (learned): a network ``eps_theta(x_t, t)`` predicts the
noise in ``x_t``. Training is regression on that noise (Ho et al.'s
``L_simple``, a reweighted ELBO)::

    loss = E_{x_0, t ~ U, eps} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2

Sampling walks back from ``x_T ~ N(0, I)``: the noise estimate gives an
estimate of the clean image, ``x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) /
sqrt(abar_t)``, and ``x_{t-1}`` is drawn from the Gaussian *posterior* of the
forward process given that estimate::

    q(x_{t-1} | x_t, x_0) = N(c0_t x_0 + ct_t x_t, betatilde_t I)
    c0_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t)
    ct_t = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)
    betatilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t

with variance ``beta_t`` (Ho et al.'s choice) or ``betatilde_t``.
``ddpm_sample`` runs the T steps as one ``jax.lax.scan``; ``ddim_sample``
(Song, Meng & Ermon 2021) takes a deterministic (``eta=0``) shortcut through
a subsequence of the steps with the same trained network.

**Indexing.** Code steps are ``t = 0 .. T-1`` for the paper's ``1 .. T``;
``abar_{-1} = 1`` (so at ``t = 0`` the posterior is exactly ``x_0``).

**Schedules.** ``"linear"``: Ho et al.'s betas from 1e-4 to 0.02 at T = 1000,
scaled by ``1000 / T`` for other T (as Nichol & Dhariwal 2021 do) so the
total noise stays the same. ``"cosine"`` (Nichol & Dhariwal 2021): ``abar_t
= f(t) / f(0)`` with ``f(t) = cos^2((t/T + s) / (1 + s) * pi / 2)``, betas
clipped at 0.999; it destroys information more evenly, which matters for
small images like 8x8 digits, where the linear schedule leaves the last
third of the steps as almost pure noise.

Data should be scaled to [-1, 1] (``2 * pixels - 1``), the scale of the
unit-variance noise; ``clip_denoised`` keeps ``x0_hat`` in that range.

Shapes: B batch, ``*data`` the shape of one example, T diffusion steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jaxtyping import Array, Float, Int, PRNGKeyArray

from nnlib.layers import Dense, LayerNorm, get_activation, sinusoidal_positions
from nnlib.train.state import TrainState

SCHEDULES = ("linear", "cosine")


# --- the noise schedule ---------------------------------------------------------------


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02
                 ) -> np.ndarray:
    """Ho et al.'s linear betas ``[T]`` (float64), scaled by ``1000 / T``."""
    scale = 1000.0 / num_steps
    return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule as betas ``[T]`` (float64)."""
    steps = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    abar = f / f[0]  # [T + 1], abar[0] = 1 is "before step 1"
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


class NoiseSchedule(struct.PyTreeNode):
    """The forward process's per-step constants, each ``[T]`` float32 (a pytree: pass it
    through ``jit`` as an argument).

    Attributes:
      betas: ``beta_t``.
      alphas: ``1 - beta_t``.
      alpha_bars: ``abar_t = prod_{s<=t} alpha_s``.
      alpha_bars_prev: ``abar_{t-1}``, with 1 at ``t = 0``.
    """

    betas: Array
    alphas: Array
    alpha_bars: Array
    alpha_bars_prev: Array

    @classmethod
    def from_betas(cls, betas: Sequence[float] | np.ndarray) -> NoiseSchedule:
        """Builds the schedule from ``betas: [T]`` in (0, 1); products in float64."""
        betas = np.asarray(betas, np.float64)
        if betas.ndim != 1 or betas.size == 0 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError(f"NoiseSchedule needs betas of shape [T] in (0, 1), got shape "
                             f"{betas.shape} with range [{betas.min(initial=0)}, "
                             f"{betas.max(initial=0)}]")
        alphas = 1.0 - betas
        alpha_bars = np.cumprod(alphas)
        alpha_bars_prev = np.concatenate([[1.0], alpha_bars[:-1]])
        f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
        return cls(f32(betas), f32(alphas), f32(alpha_bars), f32(alpha_bars_prev))

    @property
    def num_steps(self) -> int:
        """T."""
        return int(self.betas.shape[0])

    @property
    def posterior_variance(self) -> Array:
        """``betatilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t``, ``[T]``."""
        return (1.0 - self.alpha_bars_prev) / (1.0 - self.alpha_bars) * self.betas

    @property
    def posterior_coefficients(self) -> tuple[Array, Array]:
        """``(c0, ct)``, each ``[T]``: the posterior mean is ``c0_t x_0 + ct_t x_t``."""
        c0 = jnp.sqrt(self.alpha_bars_prev) * self.betas / (1.0 - self.alpha_bars)
        ct = jnp.sqrt(self.alphas) * (1.0 - self.alpha_bars_prev) / (1.0 - self.alpha_bars)
        return c0, ct


def noise_schedule(kind: str = "cosine", num_steps: int = 1000) -> NoiseSchedule:
    """``"linear"`` or ``"cosine"`` schedule with T = ``num_steps``."""
    if kind not in SCHEDULES:
        raise ValueError(f"noise_schedule: kind must be one of {SCHEDULES}, got {kind!r}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"noise_schedule: num_steps must be a positive int, got {num_steps!r}")
    betas = linear_betas(num_steps) if kind == "linear" else cosine_betas(num_steps)
    return NoiseSchedule.from_betas(betas)


def _per_example(values: Array, t: Array, like: Array) -> Array:
    """``values[t]`` for ``t: [B]``, shaped ``[B, 1, ..., 1]`` to broadcast against ``like``."""
    return values[t].reshape(t.shape + (1,) * (like.ndim - t.ndim))


# --- forward process and its posterior ------------------------------------------------------


def q_mean_variance(
    schedule: NoiseSchedule, x0: Float[Array, "batch ..."], t: Int[Array, " batch"]
) -> tuple[Float[Array, "batch ..."], Float[Array, "batch ..."]]:
    """Mean ``sqrt(abar_t) x_0`` and variance ``1 - abar_t`` of ``q(x_t | x_0)``
    (the variance broadcast to ``x0``'s shape)."""
    abar = _per_example(schedule.alpha_bars, t, x0)
    return jnp.sqrt(abar) * x0, jnp.broadcast_to(1.0 - abar, x0.shape)


def q_sample(
    schedule: NoiseSchedule, x0: Float[Array, "batch ..."], t: Int[Array, " batch"],
    noise: Float[Array, "batch ..."],
) -> Float[Array, "batch ..."]:
    """A draw from ``q(x_t | x_0)``: ``sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``."""
    abar = _per_example(schedule.alpha_bars, t, x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def q_posterior_mean_variance(
    schedule: NoiseSchedule, x0: Float[Array, "batch ..."], xt: Float[Array, "batch ..."],
    t: Int[Array, " batch"],
) -> tuple[Float[Array, "batch ..."], Float[Array, "batch ..."]]:
    """Mean and variance of ``q(x_{t-1} | x_t, x_0)`` (module docstring), each
    ``[B, *data]``."""
    c0, ct = schedule.posterior_coefficients
    mean = _per_example(c0, t, x0) * x0 + _per_example(ct, t, xt) * xt
    variance = jnp.broadcast_to(_per_example(schedule.posterior_variance, t, x0), x0.shape)
    return mean, variance


def predict_x0_from_noise(
    schedule: NoiseSchedule, xt: Float[Array, "batch ..."], t: Int[Array, " batch"],
    noise: Float[Array, "batch ..."],
) -> Float[Array, "batch ..."]:
    """Inverts ``q_sample``: ``x_0 = (x_t - sqrt(1 - abar_t) noise) / sqrt(abar_t)``."""
    abar = _per_example(schedule.alpha_bars, t, xt)
    return (xt - jnp.sqrt(1.0 - abar) * noise) / jnp.sqrt(abar)


# --- the noise-prediction network ----------------------------------------------------------


class MLPDenoiser(nn.Module):
    """``eps_theta(x_t, t)``: a residual MLP with a sinusoidal time embedding.

    The step ``t`` is embedded with the Transformer's sinusoidal encodings
    (``nnlib.layers.sinusoidal_positions``, as Ho et al. do), passed through a
    two-layer MLP, and added inside every residual block, so each block knows
    how noisy its input is::

        h = Dense(flatten(x_t))
        for each block: h = h + Dense(act(Dense(LayerNorm(h)) + Dense_t(temb)))
        eps = Dense(act(LayerNorm(h)))  reshaped like x_t

    For 8x8 images (64 numbers) an MLP is enough and is fast on a CPU; larger
    images want a U-Net.

    Attributes:
      num_timesteps: T (rows of the embedding table).
      hidden_size: width of the residual stream.
      num_blocks: residual blocks.
      time_embedding_dim: width of the sinusoidal encoding.
      activation: activation name.

    Shapes: ``x_t: [B, *data], t: [B] int -> [B, *data]``.
    """

    num_timesteps: int
    hidden_size: int = 256
    num_blocks: int = 3
    time_embedding_dim: int = 64
    activation: str = "silu"

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch ..."], t: Int[Array, " batch"], *, train: bool = False
    ) -> Float[Array, "batch ..."]:
        del train
        if getattr(t, "shape", None) != (x.shape[0],):
            raise ValueError(f"MLPDenoiser expected t of shape [batch] = ({x.shape[0]},), "
                             f"got {getattr(t, 'shape', t)!r}")
        act = get_activation(self.activation)
        table = sinusoidal_positions(self.num_timesteps, self.time_embedding_dim)  # [T, E]
        temb = jnp.take(table, t, axis=0)  # [B, E]
        temb = Dense(self.hidden_size, name="time_0")(temb)
        temb = Dense(self.hidden_size, name="time_1")(act(temb))  # [B, H]
        h = Dense(self.hidden_size, name="input")(x.reshape(x.shape[0], -1))  # [B, H]
        for i in range(self.num_blocks):
            r = Dense(self.hidden_size, name=f"block_{i}_in")(LayerNorm(name=f"norm_{i}")(h))
            r = act(r + Dense(self.hidden_size, name=f"block_{i}_time")(temb))
            h = h + Dense(self.hidden_size, name=f"block_{i}_out")(r)
        out = Dense(math.prod(x.shape[1:]), name="output")(act(LayerNorm(name="norm_out")(h)))
        return out.reshape(x.shape)


# --- training ------------------------------------------------------------------------------


def ddpm_loss(
    apply_fn: Callable[..., Array], variables: Any, schedule: NoiseSchedule,
    x0: Float[Array, "batch ..."], key: PRNGKeyArray,
    mask: Float[Array, " batch"] | None = None,
) -> Array:
    """Ho et al.'s ``L_simple``: mean squared error of the predicted noise at a uniform
    random step per example; a scalar (mean over pixels and unmasked examples).

    Args:
      apply_fn: ``apply_fn(variables, x_t, t) -> eps_hat`` (a denoiser's ``apply``).
      variables: its variables (``{"params": ...}``).
      schedule: the forward process.
      x0: clean data in [-1, 1].
      key: draws ``t`` and the noise.
      mask: ``[B]`` example weights (0 for padding rows).
    """
    t_key, noise_key = jax.random.split(key)
    t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_steps)  # [B]
    noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
    predicted = apply_fn(variables, q_sample(schedule, x0, t, noise), t)
    per_example = jnp.mean(jnp.square(predicted - noise).reshape(x0.shape[0], -1), axis=1)
    weights = jnp.ones_like(per_example) if mask is None else jnp.asarray(mask, jnp.float32)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_ddpm_train_step(
    schedule: NoiseSchedule,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Array]]]:
    """``(state, batch) -> (state, metrics)`` minimising ``ddpm_loss`` on
    ``batch["inputs"]`` (in [-1, 1]); fits ``nnlib.train.fit(train_step=jax.jit(...))``.

    The step's key is ``fold_in(state.rng, state.step)`` (a resumed run repeats the
    same noise); a NaN/Inf loss or gradient keeps the incoming state and reports
    ``finite=False``, as ``nnlib.train.make_train_step`` does.
    """

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Array]]:
        key = jax.random.fold_in(state.rng, state.step)

        def objective(params):
            variables = {"params": params, **state.collections}
            return ddpm_loss(state.apply_fn, variables, schedule, batch["inputs"], key,
                             batch.get("mask"))

        loss, grads = jax.value_and_grad(objective)(state.params)
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        new_state = state.apply_gradients(grads)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "finite": finite}

    return train_step


# --- sampling ---------------------------------------------------------------------------


def _variables(params: Any) -> Any:
    return params if "params" in params else {"params": params}


@functools.partial(jax.jit, static_argnames=("model", "shape", "clip_denoised", "variance",
                                             "return_trajectory"))
def _ddpm_loop(model, variables, schedule, key, *, shape, clip_denoised, variance,
               return_trajectory):
    init_key, step_key = jax.random.split(key)
    x_T = jax.random.normal(init_key, shape)  # [B, *data]
    sigma2 = schedule.betas if variance == "beta" else schedule.posterior_variance  # [T]

    def step(x, t):
        tb = jnp.full((shape[0],), t, jnp.int32)  # [B]
        eps = model.apply(variables, x, tb)
        x0_hat = predict_x0_from_noise(schedule, x, tb, eps)
        if clip_denoised:
            x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
        mean, _ = q_posterior_mean_variance(schedule, x0_hat, x, tb)
        z = jax.random.normal(jax.random.fold_in(step_key, t), shape)
        x_prev = mean + jnp.where(t > 0, jnp.sqrt(sigma2[t]), 0.0) * z  # no noise at t = 0
        return x_prev, (x_prev if return_trajectory else None)

    x0, trajectory = jax.lax.scan(step, x_T, jnp.arange(schedule.num_steps - 1, -1, -1))
    if return_trajectory:
        return x0, jnp.concatenate([x_T[None], trajectory], axis=0)  # [T + 1, B, *data]
    return x0


def ddpm_sample(
    model: nn.Module, params: Any, schedule: NoiseSchedule, key: PRNGKeyArray,
    shape: Sequence[int], *, clip_denoised: bool = True, variance: str = "beta",
    return_trajectory: bool = False,
) -> Float[Array, "batch ..."] | tuple[Array, Array]:
    """Ancestral sampling (Ho et al. Algorithm 2), the T steps in one ``lax.scan``.

    Args:
      model: the denoiser (``model.apply(variables, x_t, t) -> eps``); static.
      params: its ``"params"`` (or the whole variables dict).
      schedule: the schedule it was trained with.
      key: draws ``x_T`` and each step's noise (``fold_in`` by step).
      shape: ``(B, *data)`` of the samples.
      clip_denoised: clip ``x0_hat`` to [-1, 1] before the posterior mean
        (as Ho et al.'s code does); without it, the step is exactly the
        paper's ``(x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)``.
      variance: ``"beta"`` (``sigma_t^2 = beta_t``) or ``"posterior"``
        (``betatilde_t``); the paper found both work similarly.
      return_trajectory: also return every ``x_t``.

    Returns:
      ``x_0: [B, *data]`` (in about [-1, 1]), and with ``return_trajectory``
      ``[T + 1, B, *data]`` from ``x_T`` down to ``x_0``.
    """
    if variance not in ("beta", "posterior"):
        raise ValueError(f"ddpm_sample: variance must be 'beta' or 'posterior', got "
                         f"{variance!r}")
    return _ddpm_loop(model, _variables(params), schedule, key, shape=tuple(shape),
                      clip_denoised=clip_denoised, variance=variance,
                      return_trajectory=return_trajectory)


def ddim_timesteps(num_steps: int, num_sampling_steps: int) -> np.ndarray:
    """``num_sampling_steps`` evenly spaced steps from 0 to T-1 (increasing, distinct)."""
    if not 1 <= num_sampling_steps <= num_steps:
        raise ValueError(f"ddim: num_sampling_steps must be in [1, T={num_steps}], got "
                         f"{num_sampling_steps}")
    return np.unique(np.round(np.linspace(0, num_steps - 1, num_sampling_steps)).astype(int))


@functools.partial(jax.jit, static_argnames=("model", "shape", "clip_denoised"))
def _ddim_loop(model, variables, schedule, key, timesteps, eta, *, shape, clip_denoised):
    init_key, step_key = jax.random.split(key)
    x_T = jax.random.normal(init_key, shape)
    prev_steps = jnp.concatenate([jnp.array([-1]), timesteps[:-1]])

    def step(x, ts):
        t, t_prev = ts
        tb = jnp.full((shape[0],), t, jnp.int32)
        eps = model.apply(variables, x, tb)
        x0_hat = predict_x0_from_noise(schedule, x, tb, eps)
        abar = schedule.alpha_bars[t]
        if clip_denoised:
            x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
            eps = (x - jnp.sqrt(abar) * x0_hat) / jnp.sqrt(1.0 - abar)  # consistent with x0_hat
        abar_prev = jnp.where(t_prev >= 0, schedule.alpha_bars[jnp.maximum(t_prev, 0)], 1.0)
        sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        z = jax.random.normal(jax.random.fold_in(step_key, t), shape)
        x_prev = (jnp.sqrt(abar_prev) * x0_hat
                  + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma ** 2, 0.0)) * eps + sigma * z)
        return x_prev, None

    x0, _ = jax.lax.scan(step, x_T, (timesteps[::-1], prev_steps[::-1]))
    return x0


def ddim_sample(
    model: nn.Module, params: Any, schedule: NoiseSchedule, key: PRNGKeyArray,
    shape: Sequence[int], *, num_sampling_steps: int = 50, eta: float = 0.0,
    clip_denoised: bool = True,
) -> Float[Array, "batch ..."]:
    """DDIM sampling (Song et al. 2021) through ``num_sampling_steps`` of the T steps.

    ``x_{prev} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z``
    with ``sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t /
    abar_prev)``: ``eta = 0`` is deterministic given ``x_T``, ``eta = 1`` with
    every step is DDPM with ``betatilde`` variance. Same network, no retraining.

    Returns ``[B, *data]`` (``shape``).
    """
    timesteps = jnp.asarray(ddim_timesteps(schedule.num_steps, num_sampling_steps))
    return _ddim_loop(model, _variables(params), schedule, key, timesteps,
                      jnp.asarray(eta, jnp.float32), shape=tuple(shape),
                      clip_denoised=clip_denoised)


__all__ = [
    "SCHEDULES",
    "MLPDenoiser",
    "NoiseSchedule",
    "cosine_betas",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_loss",
    "ddpm_sample",
    "linear_betas",
    "make_ddpm_train_step",
    "noise_schedule",
    "predict_x0_from_noise",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
]
