"""The networks of deep RL: an actor-critic for policy gradients, a Q-network for DQN.

Both read an observation vector and are plain nnlib layers underneath:

* ``ActorCritic`` (PPO) has two separate MLP towers, one for the policy's
  logits ``pi(a | s)`` and one for the state value ``V(s)``. Separate towers
  (no shared trunk) keep the value loss from pulling the policy's features
  around, which is what the PPO paper and PureJaxRL's CartPole agent do.
  Weights start orthogonal (Saxe et al. 2014) with gain ``sqrt(2)`` in the
  hidden layers, ``0.01`` on the policy head (so the first policy is close to
  uniform and explores) and ``1`` on the value head: the initialisation the
  "37 implementation details of PPO" study (Huang et al. 2022) found matters.
* ``QNetwork`` (DQN) is an ``nnlib.layers.MLP`` with one output per action,
  ``Q(s, a)`` for every ``a`` in a single forward pass (Mnih et al. 2015).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from nnlib.layers import MLP, Dense
from nnlib.layers.activations import get_activation
from nnlib.layers.initializers import orthogonal


class ActorCritic(nn.Module):
    """Policy logits and state value from one observation.

    Attributes:
      num_actions: size of the discrete action space.
      hidden_sizes: widths of each tower's hidden layers.
      activation: activation name (``"tanh"`` is PPO's usual choice for
        control tasks).

    Shapes: ``obs: [..., obs_dim] -> (logits: [..., num_actions], value: [...])``.
    """

    num_actions: int
    hidden_sizes: Sequence[int] = (64, 64)
    activation: str = "tanh"

    @nn.compact
    def __call__(
        self, obs: Float[Array, "... obs_dim"], *, train: bool = False
    ) -> tuple[Float[Array, "... num_actions"], Float[Array, " ..."]]:
        del train  # no dropout or normalization: the same in acting and learning
        act = get_activation(self.activation)
        hidden = orthogonal(np.sqrt(2.0))
        x = obs.astype(jnp.float32)
        actor = critic = x
        for i, width in enumerate(self.hidden_sizes):
            actor = act(Dense(width, kernel_init=hidden, name=f"actor_{i}")(actor))
            critic = act(Dense(width, kernel_init=hidden, name=f"critic_{i}")(critic))
        logits = Dense(self.num_actions, kernel_init=orthogonal(0.01),
                       name="policy_head")(actor)  # [..., num_actions]
        value = Dense(1, kernel_init=orthogonal(1.0),
                      name="value_head")(critic)  # [..., 1]
        return logits, value[..., 0]


class QNetwork(nn.Module):
    """Action values ``Q(s, a)`` for every action at once.

    Attributes:
      num_actions: size of the discrete action space.
      hidden_sizes: hidden widths (CleanRL's CartPole DQN uses ``(120, 84)``).
      activation: activation name.

    Shapes: ``obs: [..., obs_dim] -> q_values: [..., num_actions]``.
    """

    num_actions: int
    hidden_sizes: Sequence[int] = (120, 84)
    activation: str = "relu"

    @nn.compact
    def __call__(
        self, obs: Float[Array, "... obs_dim"], *, train: bool = False
    ) -> Float[Array, "... num_actions"]:
        return MLP(tuple(self.hidden_sizes), out_features=self.num_actions,
                   activation=self.activation, name="mlp")(obs.astype(jnp.float32), train=train)
