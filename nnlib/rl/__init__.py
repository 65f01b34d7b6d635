"""nnlib.rl: deep reinforcement learning on JAX environments (gymnax).

PPO and DQN, each a single jit-compiled program from environment reset to
trained parameters: rollouts are ``jax.lax.scan`` over time and ``jax.vmap``
over environments, so ``jax.vmap(train)(keys)`` trains several seeds at once.
The pieces are importable on their own: GAE and discounted returns, the PPO
clipped objective, the (Double) DQN target, a pure ring-buffer replay memory,
and parallel policy evaluation.
"""

from nnlib.rl.buffers import ReplayBuffer
from nnlib.rl.dqn import (
    DQNConfig,
    DQNRunner,
    linear_epsilon,
    make_dqn_train,
    make_dqn_update,
    td_target,
)
from nnlib.rl.evaluate import categorical_policy, evaluate_policy, greedy_q_policy
from nnlib.rl.gae import discounted_returns, generalized_advantage_estimation
from nnlib.rl.networks import ActorCritic, QNetwork
from nnlib.rl.ppo import (
    PPOConfig,
    PPORunner,
    clipped_surrogate_loss,
    make_ppo_train,
    make_ppo_update,
    ppo_loss,
    value_loss,
)

__all__ = [
    "ActorCritic",
    "DQNConfig",
    "DQNRunner",
    "PPOConfig",
    "PPORunner",
    "QNetwork",
    "ReplayBuffer",
    "categorical_policy",
    "clipped_surrogate_loss",
    "discounted_returns",
    "evaluate_policy",
    "generalized_advantage_estimation",
    "greedy_q_policy",
    "linear_epsilon",
    "make_dqn_train",
    "make_dqn_update",
    "make_ppo_train",
    "make_ppo_update",
    "ppo_loss",
    "td_target",
    "value_loss",
]
