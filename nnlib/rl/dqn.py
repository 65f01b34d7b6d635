"""Deep Q-Networks (Mnih et al. 2015), and Double DQN (van Hasselt et al. 2016).

Q-learning regresses ``Q(s, a)`` towards the one-step target::

    y = r + gamma * (1 - terminated) * max_a' Q_target(s', a')

Three things make that work with a neural network, and all three are here:

* **experience replay** (``nnlib.rl.buffers.ReplayBuffer``): learn from
  random past transitions, not the correlated latest ones;
* a **target network** ``Q_target``, a copy of the online network refreshed
  every ``target_update_interval`` steps (or Polyak-averaged with ``tau``),
  so the regression target does not move with every update;
* **epsilon-greedy exploration**, ``epsilon`` decaying linearly from
  ``epsilon_start`` to ``epsilon_end``.

``max`` over noisy estimates is biased upwards. Double DQN picks ``a'`` with
the online network and evaluates it with the target network::

    y = r + gamma * (1 - terminated) * Q_target(s', argmax_a' Q_online(s', a'))

As with ``nnlib.rl.ppo``, the whole run (acting in vmapped gymnax
environments, the buffer, learning and target updates) is one jitted
``jax.lax.scan``; ``jax.vmap(train)(keys)`` runs independent seeds, each
with its own buffer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

from nnlib.rl.buffers import ReplayBuffer
from nnlib.rl.networks import QNetwork
from nnlib.train import TrainState

LOSSES = ("mse", "huber")


@dataclasses.dataclass(frozen=True)
class DQNConfig:
    """DQN hyperparameters (defaults close to PureJaxRL's CartPole-v1 DQN).

    All intervals count environment steps (summed over the parallel
    environments) and must be multiples of ``num_envs``.

    Attributes:
      env_name: gymnax environment id, used when no environment is passed.
      num_envs: environments stepped in parallel; each iteration adds
        ``num_envs`` transitions to the buffer.
      total_timesteps: environment steps over the whole run.
      buffer_size: replay capacity (transitions).
      batch_size: transitions per gradient step.
      learning_rate: Adam's step size.
      gamma: discount factor.
      epsilon_start, epsilon_end: exploration rate at the start and after
        the decay.
      exploration_fraction: fraction of ``total_timesteps`` over which epsilon
        decays linearly.
      learning_starts: no gradient steps before this many environment steps.
      train_frequency: one gradient step every this many environment steps.
      target_update_interval: refresh the target network every this many
        environment steps.
      tau: target update ``target <- tau * online + (1 - tau) * target``
        (1.0: a hard copy).
      double_dqn: use the Double DQN target.
      loss: ``"mse"`` (``0.5 * err^2``) or ``"huber"`` (Mnih et al.'s error clipping).
      max_grad_norm: global gradient-norm clip.
      hidden_sizes: ``QNetwork`` hidden widths.
      log_every: metrics are aggregated over blocks of this many environment steps.
    """

    env_name: str = "CartPole-v1"
    num_envs: int = 10
    total_timesteps: int = 500_000
    buffer_size: int = 10_000
    batch_size: int = 128
    learning_rate: float = 2.5e-4
    gamma: float = 0.99
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    exploration_fraction: float = 0.5
    learning_starts: int = 10_000
    train_frequency: int = 10
    target_update_interval: int = 500
    tau: float = 1.0
    double_dqn: bool = True
    loss: str = "mse"
    max_grad_norm: float = 10.0
    hidden_sizes: tuple[int, ...] = (120, 84)
    log_every: int = 5_000

    def __post_init__(self):
        for name in ("train_frequency", "target_update_interval", "log_every"):
            value = getattr(self, name)
            if value < self.num_envs or value % self.num_envs:
                raise ValueError(f"DQNConfig: {name}={value} must be a positive multiple of "
                                 f"num_envs={self.num_envs} (one iteration steps every env)")
        if self.total_timesteps < self.log_every:
            raise ValueError(f"DQNConfig: total_timesteps={self.total_timesteps} is less than "
                             f"one logging block (log_every={self.log_every})")
        if self.buffer_size < self.num_envs:
            raise ValueError(f"DQNConfig: buffer_size={self.buffer_size} must hold at least "
                             f"one iteration's num_envs={self.num_envs} transitions")
        if self.loss not in LOSSES:
            raise ValueError(f"DQNConfig: loss must be one of {LOSSES}, got {self.loss!r}")

    @property
    def num_logs(self) -> int:
        """Metric rows: ``total_timesteps`` rounded down to whole ``log_every`` blocks."""
        return self.total_timesteps // self.log_every


def linear_epsilon(
    timesteps: Int[Array, ""], start: float, end: float, duration: float
) -> Float[Array, ""]:
    """Exploration rate decaying linearly from ``start`` to ``end`` over ``duration`` steps."""
    frac = jnp.clip(timesteps / max(duration, 1.0), 0.0, 1.0)
    return start + frac * (end - start)


def td_target(
    rewards: Float[Array, " batch"],
    terminated: Bool[Array, " batch"],
    next_q_target: Float[Array, "batch num_actions"],
    next_q_online: Float[Array, "batch num_actions"] | None = None,
    *,
    gamma: float,
) -> Float[Array, " batch"]:
    """The (Double) DQN regression target ``y: [batch]``.

    Args:
      rewards: ``r``, ``[batch]``.
      terminated: true where ``s'`` is terminal (no bootstrap). A time-limit
        truncation is *not* terminal: its ``s'`` is bootstrapped.
      next_q_target: ``Q_target(s', .)``, ``[batch, num_actions]``.
      next_q_online: ``Q_online(s', .)``; when given, the Double DQN target
        (online argmax, target evaluation), else ``max_a' Q_target(s', a')``.
      gamma: discount factor.
    """
    if next_q_online is None:
        bootstrap = jnp.max(next_q_target, axis=-1)
    else:
        best = jnp.argmax(next_q_online, axis=-1)  # [batch]
        bootstrap = jnp.take_along_axis(next_q_target, best[:, None], axis=-1)[:, 0]
    return rewards + gamma * (1.0 - terminated.astype(rewards.dtype)) * bootstrap


class DQNRunner(NamedTuple):
    """Everything one DQN iteration reads and writes (a pytree; ``vmap`` adds a seed axis).

    Attributes:
      train_state: the online ``QNetwork``'s parameters and optimizer state.
      target_params: the target network's parameters.
      buffer: the replay memory.
      env_state: the gymnax states of the ``num_envs`` environments.
      obs: their current observations, ``[num_envs, obs_dim]``.
      running_return: return so far of each environment's current episode, ``[num_envs]``.
      timesteps: environment steps so far (int32 scalar).
    """

    train_state: TrainState
    target_params: Any
    buffer: ReplayBuffer
    env_state: Any
    obs: jax.Array
    running_return: jax.Array
    timesteps: jax.Array


def make_dqn_update(
    config: DQNConfig, env: Any = None, env_params: Any = None
) -> tuple[Callable[[jax.Array], DQNRunner],
           Callable[[DQNRunner, jax.Array], tuple[DQNRunner, dict[str, jax.Array]]]]:
    """The two pieces of a DQN run: ``init(key) -> runner`` and one iteration
    ``step(runner, key) -> (runner, info)``: every environment takes one
    epsilon-greedy step, the ``num_envs`` transitions enter the buffer, and on
    the scheduled iterations one gradient step and a target update follow.
    Neither is jitted; ``make_dqn_train`` scans ``step``.

    Args:
      config: hyperparameters.
      env, env_params: a gymnax environment with discrete actions; by default
        ``gymnax.make(config.env_name)``.

    Returns:
      ``(init, step)``. ``step``'s info: ``done`` and ``episode_return``
      (``[num_envs]``; the return of each episode that ended at this step,
      else 0), ``loss``, ``q_value`` (0 when no gradient step was taken) and
      ``learned`` (whether one was).
    """
    if env is None:
        import gymnax  # optional dependency: the `rl` extra

        env, default_params = gymnax.make(config.env_name)
        env_params = default_params if env_params is None else env_params
    elif env_params is None:
        env_params = env.default_params
    num_actions = env.action_space(env_params).n
    obs_shape = tuple(env.observation_space(env_params).shape)
    network = QNetwork(num_actions, tuple(config.hidden_sizes))
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                     optax.adam(config.learning_rate))
    env_reset = jax.vmap(env.reset, in_axes=(0, None))
    env_step = jax.vmap(env.step, in_axes=(0, 0, 0, None))
    decay_steps = config.exploration_fraction * config.total_timesteps

    def loss_fn(params, target_params, apply_fn, batch):
        q_values = apply_fn({"params": params}, batch["obs"])  # [b, num_actions]
        q_taken = jnp.take_along_axis(q_values, batch["action"][:, None], axis=-1)[:, 0]
        next_online = apply_fn({"params": params}, batch["next_obs"]) \
            if config.double_dqn else None
        target = td_target(batch["reward"], batch["terminated"],
                           apply_fn({"params": target_params}, batch["next_obs"]),
                           next_online, gamma=config.gamma)
        error = q_taken - jax.lax.stop_gradient(target)
        if config.loss == "huber":
            loss = jnp.mean(optax.huber_loss(error))
        else:
            loss = 0.5 * jnp.mean(jnp.square(error))
        return loss, q_taken.mean()

    def learn(train_state, target_params, buffer, key):
        batch = buffer.sample(key, config.batch_size)
        (loss, q_value), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            train_state.params, target_params, train_state.apply_fn, batch)
        return train_state.apply_gradients(grads), loss, q_value

    def skip(train_state, target_params, buffer, key):
        return train_state, jnp.zeros(()), jnp.zeros(())

    def step(runner: DQNRunner, key: jax.Array) -> tuple[DQNRunner, dict[str, jax.Array]]:
        train_state, target_params, buffer = runner.train_state, runner.target_params, \
            runner.buffer
        explore_key, action_key, step_key, learn_key = jax.random.split(key, 4)
        epsilon = linear_epsilon(runner.timesteps, config.epsilon_start, config.epsilon_end,
                                 decay_steps)
        q_values = train_state.apply_fn({"params": train_state.params}, runner.obs)  # [envs, A]
        random_action = jax.random.randint(action_key, (config.num_envs,), 0, num_actions)
        explore = jax.random.uniform(explore_key, (config.num_envs,)) < epsilon
        action = jnp.where(explore, random_action, jnp.argmax(q_values, axis=-1))
        # gymnax 1.0: 6 return values, auto-reset; the true s' is info["final_observation"].
        next_obs, env_state, reward, terminated, truncated, info = env_step(
            jax.random.split(step_key, config.num_envs), runner.env_state, action, env_params)
        buffer = buffer.add({"obs": runner.obs, "action": action, "reward": reward,
                             "next_obs": info["final_observation"], "terminated": terminated})
        timesteps = runner.timesteps + config.num_envs
        do_learn = ((timesteps >= config.learning_starts)
                    & (timesteps % config.train_frequency == 0))
        train_state, loss, q_value = jax.lax.cond(
            do_learn, learn, skip, train_state, target_params, buffer, learn_key)
        do_target = ((timesteps >= config.learning_starts)
                     & (timesteps % config.target_update_interval == 0))
        target_params = jax.tree.map(
            lambda online, target: jnp.where(
                do_target, config.tau * online + (1.0 - config.tau) * target, target),
            train_state.params, target_params)
        done = terminated | truncated
        running_return = runner.running_return + reward
        info = {"done": done, "episode_return": jnp.where(done, running_return, 0.0),
                "loss": loss, "q_value": q_value, "learned": do_learn}
        running_return = jnp.where(done, 0.0, running_return)
        return DQNRunner(train_state, target_params, buffer, env_state, next_obs,
                         running_return, timesteps), info

    def init(key: jax.Array) -> DQNRunner:
        init_key, reset_key = jax.random.split(key)
        train_state = TrainState.create(model=network, tx=tx, key=init_key,
                                        example_input=jnp.zeros((1, *obs_shape)))
        obs, env_state = env_reset(jax.random.split(reset_key, config.num_envs), env_params)
        example = {"obs": obs[0], "action": jnp.zeros((), jnp.int32),
                   "reward": jnp.zeros(()), "next_obs": obs[0],
                   "terminated": jnp.zeros((), bool)}
        buffer = ReplayBuffer.create(example, config.buffer_size)
        return DQNRunner(train_state, train_state.params, buffer, env_state, obs,
                         jnp.zeros(config.num_envs), jnp.zeros((), jnp.int32))

    return init, step


def make_dqn_train(
    config: DQNConfig, env: Any = None, env_params: Any = None
) -> Callable[[jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the jitted DQN run ``train(key) -> (train_state, metrics)``.

    Args:
      config: hyperparameters.
      env, env_params: a gymnax environment with discrete actions; by default
        ``gymnax.make(config.env_name)``.

    Returns:
      ``train(key)``, jit-compiled, returning the online network's
      ``TrainState`` and metrics per ``log_every`` block, each ``[num_logs]``:
      ``episode_return`` (mean return of the episodes that ended in the block;
      the previous value when none did), ``episodes``, ``loss`` and
      ``q_value`` (means over the block's gradient steps), ``epsilon`` and
      ``timesteps`` at the block's end.
    """
    init, step = make_dqn_update(config, env, env_params)
    iterations_per_log = config.log_every // config.num_envs
    decay_steps = config.exploration_fraction * config.total_timesteps

    def log_block(carry, key):
        runner, last_return = carry
        runner, info = jax.lax.scan(step, runner, jax.random.split(key, iterations_per_log))
        episodes = info["done"].sum()
        updates = jnp.maximum(info["learned"].sum(), 1)
        mean_return = jnp.where(episodes > 0,
                                info["episode_return"].sum() / jnp.maximum(episodes, 1),
                                last_return)
        metrics = {
            "episode_return": mean_return,
            "episodes": episodes,
            "loss": info["loss"].sum() / updates,
            "q_value": info["q_value"].sum() / updates,
            "epsilon": linear_epsilon(runner.timesteps, config.epsilon_start,
                                      config.epsilon_end, decay_steps),
            "timesteps": runner.timesteps,
        }
        return (runner, mean_return), metrics

    def train(key):
        init_key, loop_key = jax.random.split(key)
        (runner, _), metrics = jax.lax.scan(log_block, (init(init_key), jnp.zeros(())),
                                            jax.random.split(loop_key, config.num_logs))
        return runner.train_state, metrics

    return jax.jit(train)
