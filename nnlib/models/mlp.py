"""The multilayer perceptron as a classifier of whole inputs (images, vectors)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
from jaxtyping import Array, Float

from nnlib.layers import MLP, Flatten


class MLPClassifier(nn.Module):
    """Flattens each example, then ``MLP`` to ``num_classes`` logits.

    Attributes:
      hidden_sizes: hidden widths, e.g. ``(256, 128)``.
      num_classes: number of output logits.
      activation: activation name or callable.
      dropout_rate: dropout after each hidden layer (train only).
      normalization: ``None``, ``"layer"`` or ``"batch"``.

    Shapes: ``x: [batch, ...] -> logits [batch, num_classes]``.
    """

    hidden_sizes: Sequence[int] = (256, 128)
    num_classes: int = 10
    activation: str | Callable[[Array], Array] = "relu"
    dropout_rate: float = 0.0
    normalization: str | None = None

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch ..."], *, train: bool = False
    ) -> Float[Array, "batch num_classes"]:
        x = Flatten()(x)  # [B, D]
        return MLP(
            self.hidden_sizes,
            out_features=self.num_classes,
            activation=self.activation,
            dropout_rate=self.dropout_rate,
            normalization=self.normalization,
            name="mlp",
        )(x, train=train)
