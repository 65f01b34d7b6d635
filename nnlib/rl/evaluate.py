"""Evaluating a policy: the returns of whole episodes, run in parallel.

Training curves in RL report the returns of episodes the *exploring* policy
happened to finish; evaluation asks what the learned policy is worth. Here
``num_episodes`` copies of the environment each play exactly one episode
(vmapped, inside one ``jax.lax.scan`` of ``max_steps_in_episode`` steps);
an episode's reward stops counting at its first ``done``, so gymnax's
auto-reset cannot sneak a second episode in.

Two ways to act from a policy network are common and they can give
different numbers: **stochastic** (sample ``a ~ pi(. | s)``, the policy that
was trained) and **deterministic** (``argmax_a pi(a | s)``, or
``argmax_a Q(s, a)`` for DQN). Reports should say which.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

Policy = Callable[[jax.Array, Float[Array, "envs obs_dim"]], Int[Array, " envs"]]


def evaluate_policy(
    env: Any,
    env_params: Any,
    policy: Policy,
    key: jax.Array,
    num_episodes: int = 100,
    max_steps: int | None = None,
) -> dict[str, Float[Array, " episodes"]]:
    """Plays ``num_episodes`` episodes at once and returns their returns and lengths.

    Args:
      env: a gymnax environment.
      env_params: its parameters.
      policy: ``policy(key, obs: [num_episodes, obs_dim]) -> actions: [num_episodes]``.
      key: PRNG key (resets, environment noise, the policy's sampling).
      num_episodes: how many episodes (one per parallel environment).
      max_steps: scan length; defaults to ``env_params.max_steps_in_episode``,
        the time limit, so every episode ends.

    Returns:
      ``{"return": [num_episodes], "length": [num_episodes]}``.
    """
    if num_episodes < 1:
        raise ValueError(f"evaluate_policy needs num_episodes >= 1, got {num_episodes}")
    max_steps = int(env_params.max_steps_in_episode if max_steps is None else max_steps)
    reset_key, run_key = jax.random.split(key)
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(
        jax.random.split(reset_key, num_episodes), env_params)
    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def one_step(carry, step_key):
        obs, state, alive, total, length = carry
        policy_key, env_key = jax.random.split(step_key)
        action = policy(policy_key, obs)
        obs, state, reward, terminated, truncated, _ = step(
            jax.random.split(env_key, num_episodes), state, action, env_params)
        total = total + jnp.where(alive, reward, 0.0)
        length = length + alive.astype(jnp.int32)
        alive = alive & ~(terminated | truncated)
        return (obs, state, alive, total, length), None

    carry = (obs, state, jnp.ones(num_episodes, bool), jnp.zeros(num_episodes),
             jnp.zeros(num_episodes, jnp.int32))
    (_, _, _, total, length), _ = jax.lax.scan(
        one_step, carry, jax.random.split(run_key, max_steps))
    return {"return": total, "length": length}


def categorical_policy(
    apply_fn: Callable[..., Any], params: Any, *, deterministic: bool = False
) -> Policy:
    """The policy of an ``ActorCritic``: sample from its logits, or take their argmax."""

    def policy(key, obs):
        logits, _ = apply_fn({"params": params}, obs)
        if deterministic:
            return jnp.argmax(logits, axis=-1)
        return jax.random.categorical(key, logits, axis=-1)

    return policy


def greedy_q_policy(
    apply_fn: Callable[..., Any], params: Any, *, epsilon: float = 0.0
) -> Policy:
    """The policy of a ``QNetwork``: ``argmax_a Q(s, a)``, random with probability ``epsilon``."""

    def policy(key, obs):
        q_values = apply_fn({"params": params}, obs)  # [envs, num_actions]
        greedy = jnp.argmax(q_values, axis=-1)
        if epsilon == 0.0:
            return greedy
        explore_key, action_key = jax.random.split(key)
        random_action = jax.random.randint(action_key, greedy.shape, 0, q_values.shape[-1])
        return jnp.where(jax.random.uniform(explore_key, greedy.shape) < epsilon,
                         random_action, greedy)

    return policy
