"""Returns and advantages: how much better an action turned out than expected.

A policy gradient weighs ``grad log pi(a_t | s_t)`` by how good ``a_t`` was.
The Monte-Carlo return ``G_t = r_t + gamma r_{t+1} + ...`` is unbiased but
noisy; the one-step TD error ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)`` is
quiet but biased by the critic's errors. Generalized Advantage Estimation
(Schulman et al. 2016) blends them with one knob ``lambda``::

    A_t = delta_t + gamma * lambda * A_{t+1}      (backwards in time)

``lambda = 0`` is the TD error, ``lambda = 1`` the Monte-Carlo return minus
``V(s_t)``. The value target is ``A_t + V(s_t)`` (the TD(lambda) return).

Episode ends come in two kinds, and they are treated differently:

* **terminated** (the pole fell): the next state has no future, so the
  bootstrap ``gamma V(s_{t+1})`` is dropped;
* **truncated** (a time limit hit): the future exists, we just stopped
  watching, so ``V`` of the true final observation *is* bootstrapped
  (Pardo et al. 2018, "Time limits in reinforcement learning").

Either way the recursion must not carry ``A_{t+1}`` across the boundary,
because ``t + 1`` belongs to the next episode. Callers therefore pass
``next_values = V(s'_t)`` evaluated on each transition's own next
observation (gymnax's ``info["final_observation"]``), which stays correct
when vectorised environments auto-reset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


def generalized_advantage_estimation(
    rewards: Float[Array, "time ..."],
    values: Float[Array, "time ..."],
    next_values: Float[Array, "time ..."],
    terminated: Bool[Array, "time ..."],
    done: Bool[Array, "time ..."],
    *,
    gamma: float,
    gae_lambda: float,
) -> tuple[Float[Array, "time ..."], Float[Array, "time ..."]]:
    """GAE(gamma, lambda) advantages and value targets, time-major.

    Args:
      rewards: ``r_t``, ``[time, *batch]``.
      values: ``V(s_t)``, ``[time, *batch]``.
      next_values: ``V(s'_t)`` on each transition's own next observation
        (before any auto-reset), ``[time, *batch]``.
      terminated: true where ``s'_t`` is terminal (no bootstrap).
      done: true where the episode ended for any reason (terminated or
        truncated); cuts the recursion.
      gamma: discount factor.
      gae_lambda: the GAE ``lambda`` in ``[0, 1]``.

    Returns:
      ``(advantages, targets)``, both ``[time, *batch]``, with
      ``targets = advantages + values``.
    """
    if not (rewards.shape == values.shape == next_values.shape == terminated.shape
            == done.shape):
        raise ValueError(
            "generalized_advantage_estimation expected rewards, values, next_values, "
            "terminated and done of one shape [time, *batch], got "
            f"{rewards.shape}, {values.shape}, {next_values.shape}, {terminated.shape}, "
            f"{done.shape}")
    # Masks in the inputs' promoted dtype: in the values' own, a bfloat16 critic
    # would round gamma and gamma * lambda to 8 bits even with float32 rewards.
    dtype = jnp.result_type(rewards, values, next_values)
    not_terminated = 1.0 - terminated.astype(dtype)
    not_done = 1.0 - done.astype(dtype)
    deltas = rewards + gamma * not_terminated * next_values - values  # [time, *batch]

    def backwards(next_advantage, inputs):
        delta, keep = inputs
        advantage = delta + gamma * gae_lambda * keep * next_advantage
        return advantage, advantage

    # The carry takes the deltas' dtype: with bfloat16 values and float32 rewards
    # the advantages are float32, and a carry of the values' dtype would not match.
    _, advantages = jax.lax.scan(
        backwards, jnp.zeros_like(deltas[0]), (deltas, not_done), reverse=True)
    return advantages, advantages + values


def discounted_returns(
    rewards: Float[Array, "time ..."],
    done: Bool[Array, "time ..."],
    *,
    gamma: float,
    bootstrap: Float[Array, " ..."] | None = None,
) -> Float[Array, "time ..."]:
    """Monte-Carlo returns ``G_t = r_t + gamma (1 - done_t) G_{t+1}``, time-major.

    Args:
      rewards: ``[time, *batch]``.
      done: true where an episode ended at step ``t`` (its return stops there).
      gamma: discount factor.
      bootstrap: value of the state after the last step, ``[*batch]``, for a
        rollout cut mid-episode; zeros when ``None``.

    Returns:
      ``G: [time, *batch]``.
    """
    if rewards.shape != done.shape:
        raise ValueError(f"discounted_returns expected rewards and done of one shape, "
                         f"got {rewards.shape} and {done.shape}")
    if bootstrap is None:
        carry = jnp.zeros_like(rewards[0])
    else:  # returns in the promoted dtype of the two, as the recursion computes them
        dtype = jnp.result_type(rewards, bootstrap)
        rewards, carry = rewards.astype(dtype), jnp.asarray(bootstrap, dtype)
    not_done = 1.0 - done.astype(rewards.dtype)

    def backwards(next_return, inputs):
        reward, keep = inputs
        g = reward + gamma * keep * next_return
        return g, g

    _, returns = jax.lax.scan(backwards, carry, (rewards, not_done), reverse=True)
    return returns
