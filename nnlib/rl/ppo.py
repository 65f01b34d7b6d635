"""Proximal Policy Optimization (Schulman et al. 2017), compiled end to end.

A policy gradient step pushes up ``log pi(a_t | s_t)`` in proportion to the
advantage ``A_t`` of the action taken. Done naively with data from the
current policy, one big step can wreck the policy. PPO reuses each batch of
experience for several epochs of minibatch updates but stops the policy from
moving far from the one that collected it, by clipping the probability ratio
``rho_t = pi_new(a_t | s_t) / pi_old(a_t | s_t)``::

    L_clip = E[ min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t) ]

Once ``rho_t`` leaves ``[1 - eps, 1 + eps]`` in the direction the advantage
favours, the gradient of that sample is zero. The full loss adds a value
regression (the critic for GAE, see ``nnlib.rl.gae``) and an entropy bonus
that keeps the policy exploring::

    loss = -L_clip + vf_coef * L_value - ent_coef * entropy

As in PureJaxRL (Lu et al. 2022), *everything* runs inside one ``jax.jit``:
the rollout (``jax.lax.scan`` over time, ``jax.vmap`` over gymnax
environments), GAE, the shuffled minibatch epochs and the optimizer. No
Python runs between environment steps, and ``jax.vmap(train)(keys)`` trains
several seeds in one program.

Usage::

    train = make_ppo_train(PPOConfig())          # jitted
    train_state, metrics = train(jax.random.key(0))
    train_states, metrics = jax.vmap(train)(jax.random.split(key, 4))  # 4 seeds
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from nnlib.rl.gae import generalized_advantage_estimation
from nnlib.rl.networks import ActorCritic
from nnlib.train import TrainState


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters (defaults: PureJaxRL's CartPole-v1 settings).

    Attributes:
      env_name: a gymnax environment id (``gymnax.make``), used when no
        environment is passed to ``make_ppo_train``.
      num_envs: environments stepped in parallel (``jax.vmap``).
      num_steps: steps per environment in each rollout; one update consumes
        ``num_envs * num_steps`` transitions.
      total_timesteps: environment steps over the whole run.
      update_epochs: passes over each rollout.
      num_minibatches: minibatches per pass; must divide ``num_envs * num_steps``.
      learning_rate: Adam's step size (peak, when annealed).
      anneal_lr: decay the learning rate linearly to 0 over training.
      gamma: discount factor.
      gae_lambda: GAE's bias/variance knob (0: TD error, 1: Monte Carlo).
      clip_eps: PPO's ratio clip ``eps``.
      clip_value: also clip the value update to ``old_value +/- clip_eps``.
      ent_coef: weight of the entropy bonus.
      vf_coef: weight of the value loss.
      max_grad_norm: global gradient-norm clip.
      normalize_advantages: standardise advantages within each minibatch.
      hidden_sizes: hidden widths of the actor and of the critic tower.
      activation: hidden activation name.
    """

    env_name: str = "CartPole-v1"
    num_envs: int = 4
    num_steps: int = 128
    total_timesteps: int = 500_000
    update_epochs: int = 4
    num_minibatches: int = 4
    learning_rate: float = 2.5e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    clip_value: bool = True
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    normalize_advantages: bool = True
    hidden_sizes: tuple[int, ...] = (64, 64)
    activation: str = "tanh"

    def __post_init__(self):
        if self.batch_size % self.num_minibatches:
            raise ValueError(
                f"PPOConfig: num_minibatches={self.num_minibatches} must divide the rollout "
                f"size num_envs * num_steps = {self.batch_size}")
        if self.num_updates < 1:
            raise ValueError(
                f"PPOConfig: total_timesteps={self.total_timesteps} is less than one rollout "
                f"(num_envs * num_steps = {self.batch_size})")

    @property
    def batch_size(self) -> int:
        """Transitions per update, ``num_envs * num_steps``."""
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_updates(self) -> int:
        """Rollout-and-learn iterations; ``total_timesteps`` rounded down to whole rollouts."""
        return self.total_timesteps // self.batch_size


class Transition(NamedTuple):
    """One rollout step for every environment; fields are ``[num_envs, ...]``
    (``[num_steps, num_envs, ...]`` once scanned)."""

    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    terminated: jax.Array
    done: jax.Array
    next_obs: jax.Array  # the true s_{t+1}, before gymnax's auto-reset
    episode_return: jax.Array  # return of the episode that ended here, else 0


def clipped_surrogate_loss(
    log_prob: Float[Array, " batch"],
    old_log_prob: Float[Array, " batch"],
    advantages: Float[Array, " batch"],
    clip_eps: float,
) -> Float[Array, ""]:
    """PPO's clipped policy loss, ``-mean(min(rho A, clip(rho, 1-eps, 1+eps) A))``.

    Args:
      log_prob: ``log pi_new(a_t | s_t)``, ``[batch]``.
      old_log_prob: ``log pi_old(a_t | s_t)`` from the rollout, ``[batch]``.
      advantages: ``A_t``, ``[batch]``.
      clip_eps: the clip range ``eps``.

    Returns:
      the scalar loss (to minimise).
    """
    ratio = jnp.exp(log_prob - old_log_prob)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -jnp.mean(jnp.minimum(unclipped, clipped))


def value_loss(
    values: Float[Array, " batch"],
    old_values: Float[Array, " batch"],
    targets: Float[Array, " batch"],
    clip_eps: float | None,
) -> Float[Array, ""]:
    """``0.5 * mean((V - target)^2)``; with ``clip_eps``, the pessimistic max of that
    and the same error for ``V`` clipped to ``old_values +/- clip_eps`` (PPO2's
    value clipping)."""
    error = jnp.square(values - targets)
    if clip_eps is not None:
        clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        error = jnp.maximum(error, jnp.square(clipped - targets))
    return 0.5 * jnp.mean(error)


def ppo_loss(
    params: Any,
    apply_fn: Callable[..., Any],
    batch: dict[str, jax.Array],
    config: PPOConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The PPO objective on one minibatch.

    Args:
      params: the ``ActorCritic`` parameters.
      apply_fn: its ``apply``.
      batch: ``{"obs": [b, obs_dim], "action": [b], "log_prob": [b],
        "value": [b], "advantage": [b], "target": [b]}`` from the rollout.
      config: coefficients and switches.

    Returns:
      ``(loss, metrics)`` with the policy and value losses, entropy, the
      approximate KL ``E[(rho - 1) - log rho]`` and the clipped fraction.
    """
    logits, values = apply_fn({"params": params}, batch["obs"])  # [b, A], [b]
    log_probs = jax.nn.log_softmax(logits)
    log_prob = jnp.take_along_axis(log_probs, batch["action"][:, None], axis=-1)[:, 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1).mean()
    advantages = batch["advantage"]
    if config.normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    policy_loss = clipped_surrogate_loss(log_prob, batch["log_prob"], advantages,
                                         config.clip_eps)
    v_loss = value_loss(values, batch["value"], batch["target"],
                        config.clip_eps if config.clip_value else None)
    loss = policy_loss + config.vf_coef * v_loss - config.ent_coef * entropy
    log_ratio = log_prob - batch["log_prob"]
    ratio = jnp.exp(log_ratio)
    metrics = {
        "loss": loss,
        "policy_loss": policy_loss,
        "value_loss": v_loss,
        "entropy": entropy,
        "approx_kl": jnp.mean((ratio - 1.0) - log_ratio),
        "clip_fraction": jnp.mean(jnp.abs(ratio - 1.0) > config.clip_eps),
    }
    return loss, metrics


def make_ppo_network(config: PPOConfig, num_actions: int) -> nn.Module:
    """The ``ActorCritic`` a config describes."""
    return ActorCritic(num_actions, tuple(config.hidden_sizes), config.activation)


class PPORunner(NamedTuple):
    """Everything one PPO update reads and writes (a pytree; ``vmap`` adds a seed axis).

    Attributes:
      train_state: the ``ActorCritic``'s parameters and optimizer state.
      env_state: the gymnax states of the ``num_envs`` environments.
      obs: their current observations, ``[num_envs, obs_dim]``.
      running_return: return so far of each environment's current episode, ``[num_envs]``.
      last_return: the last logged mean episode return (carried forward when
        no episode ends in a rollout).
      timesteps: environment steps so far (int32 scalar).
    """

    train_state: TrainState
    env_state: Any
    obs: jax.Array
    running_return: jax.Array
    last_return: jax.Array
    timesteps: jax.Array


def _make_env(env_name: str, env: Any, env_params: Any) -> tuple[Any, Any]:
    if env is None:
        import gymnax  # optional dependency: the `rl` extra

        env, default_params = gymnax.make(env_name)
        return env, default_params if env_params is None else env_params
    return env, env.default_params if env_params is None else env_params


def make_ppo_update(
    config: PPOConfig, env: Any = None, env_params: Any = None
) -> tuple[Callable[[jax.Array], PPORunner],
           Callable[[PPORunner, jax.Array], tuple[PPORunner, dict[str, jax.Array]]]]:
    """The two pieces of a PPO run: ``init(key) -> runner`` and one
    ``update(runner, key) -> (runner, metrics)`` (collect a rollout of
    ``num_steps x num_envs`` transitions, GAE, ``update_epochs`` shuffled passes
    of ``num_minibatches`` Adam steps). Neither is jitted; ``make_ppo_train``
    scans ``update`` ``num_updates`` times.

    Args:
      config: hyperparameters.
      env, env_params: a gymnax environment with discrete actions; by default
        ``gymnax.make(config.env_name)``.

    Returns:
      ``(init, update)``; ``update``'s metrics are scalars (see ``make_ppo_train``).
    """
    env, env_params = _make_env(config.env_name, env, env_params)
    num_actions = env.action_space(env_params).n
    obs_shape = tuple(env.observation_space(env_params).shape)
    network = make_ppo_network(config, num_actions)
    steps_per_update = config.update_epochs * config.num_minibatches
    learning_rate = (optax.linear_schedule(config.learning_rate, 0.0,
                                           config.num_updates * steps_per_update)
                     if config.anneal_lr else config.learning_rate)
    # eps=1e-5: PPO implementations' Adam epsilon (the "37 details" study).
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                     optax.adam(learning_rate, eps=1e-5))
    env_reset = jax.vmap(env.reset, in_axes=(0, None))
    env_step = jax.vmap(env.step, in_axes=(0, 0, 0, None))
    grad_fn = jax.grad(ppo_loss, has_aux=True)

    def rollout_step(carry, key):
        train_state, env_state, obs, running_return = carry
        action_key, step_key = jax.random.split(key)
        logits, value = train_state.apply_fn({"params": train_state.params}, obs)
        action = jax.random.categorical(action_key, logits)  # [num_envs]
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], -1)[:, 0]
        # gymnax 1.0 steps return 6 values and auto-reset: next_obs is already
        # the new episode's first observation where done; the true s_{t+1} is
        # info["final_observation"].
        next_obs, env_state, reward, terminated, truncated, info = env_step(
            jax.random.split(step_key, config.num_envs), env_state, action, env_params)
        done = terminated | truncated
        running_return = running_return + reward
        transition = Transition(
            obs=obs, action=action, log_prob=log_prob, value=value, reward=reward,
            terminated=terminated, done=done, next_obs=info["final_observation"],
            episode_return=jnp.where(done, running_return, 0.0))
        running_return = jnp.where(done, 0.0, running_return)
        return (train_state, env_state, next_obs, running_return), transition

    def learn_epoch(batch, train_state, key):
        """One shuffled pass over the rollout, in ``num_minibatches`` updates."""
        order = jax.random.permutation(key, config.batch_size)
        minibatches = jax.tree.map(
            lambda x: x[order].reshape(config.num_minibatches, config.minibatch_size,
                                       *x.shape[1:]), batch)

        def learn_minibatch(train_state, minibatch):
            grads, metrics = grad_fn(train_state.params, train_state.apply_fn, minibatch,
                                     config)
            return train_state.apply_gradients(grads), metrics

        return jax.lax.scan(learn_minibatch, train_state, minibatches)

    def update(runner: PPORunner, key: jax.Array) -> tuple[PPORunner, dict[str, jax.Array]]:
        rollout_key, epoch_key = jax.random.split(key)
        (train_state, env_state, obs, running_return), traj = jax.lax.scan(
            rollout_step, (runner.train_state, runner.env_state, runner.obs,
                           runner.running_return),
            jax.random.split(rollout_key, config.num_steps))  # traj: [num_steps, num_envs, ...]
        _, next_values = train_state.apply_fn({"params": train_state.params}, traj.next_obs)
        advantages, targets = generalized_advantage_estimation(
            traj.reward, traj.value, next_values, traj.terminated, traj.done,
            gamma=config.gamma, gae_lambda=config.gae_lambda)
        batch = {"obs": traj.obs, "action": traj.action, "log_prob": traj.log_prob,
                 "value": traj.value, "advantage": advantages, "target": targets}
        batch = jax.tree.map(lambda x: x.reshape(config.batch_size, *x.shape[2:]), batch)
        train_state, losses = jax.lax.scan(
            functools.partial(learn_epoch, batch), train_state,
            jax.random.split(epoch_key, config.update_epochs))
        episodes = traj.done.sum()
        mean_return = jnp.where(episodes > 0,
                                traj.episode_return.sum() / jnp.maximum(episodes, 1),
                                runner.last_return)
        timesteps = runner.timesteps + config.batch_size
        metrics = {name: value.mean() for name, value in losses.items()}
        metrics.update(episode_return=mean_return, episodes=episodes, timesteps=timesteps)
        return PPORunner(train_state, env_state, obs, running_return, mean_return,
                         timesteps), metrics

    def init(key: jax.Array) -> PPORunner:
        init_key, reset_key = jax.random.split(key)
        train_state = TrainState.create(model=network, tx=tx, key=init_key,
                                        example_input=jnp.zeros((1, *obs_shape)))
        obs, env_state = env_reset(jax.random.split(reset_key, config.num_envs), env_params)
        return PPORunner(train_state, env_state, obs, jnp.zeros(config.num_envs),
                         jnp.zeros(()), jnp.zeros((), jnp.int32))

    return init, update


def make_ppo_train(
    config: PPOConfig, env: Any = None, env_params: Any = None
) -> Callable[[jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the jitted PPO run ``train(key) -> (train_state, metrics)``.

    Args:
      config: hyperparameters.
      env, env_params: a gymnax environment with discrete actions; by default
        ``gymnax.make(config.env_name)``.

    Returns:
      ``train(key)``, jit-compiled. It returns the final ``TrainState`` (an
      ``ActorCritic``'s parameters) and per-update metrics, each
      ``[num_updates]``: ``episode_return`` (mean return of the episodes
      that ended during that rollout; the previous value when none ended),
      ``episodes`` (how many ended), ``timesteps`` (environment steps so
      far), and the loss terms averaged over the update's minibatches.
      ``jax.vmap(train)(keys)`` gives every leaf a leading seed axis.
    """
    init, update = make_ppo_update(config, env, env_params)

    def train(key):
        init_key, loop_key = jax.random.split(key)
        runner, metrics = jax.lax.scan(update, init(init_key),
                                       jax.random.split(loop_key, config.num_updates))
        return runner.train_state, metrics

    return jax.jit(train)
