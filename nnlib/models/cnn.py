"""A convolutional classifier: conv blocks that halve the image, then an MLP head.

The classic LeNet/VGG shape: each block is ``conv 3x3 -> [norm] -> activation
-> 2x2 max-pool``, so features grow as the spatial size shrinks; the head
flattens (or globally averages) the last feature map into logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
from jaxtyping import Array, Float

from nnlib.layers import MLP, ConvBlock2D, Flatten, GlobalAvgPool


class CNN(nn.Module):
    """Convolutional network for images ``[batch, height, width, channels]``.

    Attributes:
      features: output channels of each conv block, e.g. ``(32, 64)``.
      kernel_size: square kernel size of every conv.
      pool_every: max-pool 2x2 after each block (``True``) or never.
      hidden_sizes: widths of the dense head's hidden layers.
      num_classes: number of output logits.
      activation: activation name.
      normalization: ``None``, ``"batch"`` or ``"layer"`` inside each block.
      dropout_rate: dropout in the dense head (train only).
      global_pool: average the last feature map over space instead of
        flattening it (fewer parameters, translation-invariant head).

    Shapes: ``x: [batch, H, W, C] -> logits [batch, num_classes]``.
    """

    features: Sequence[int] = (32, 64)
    kernel_size: int = 3
    pool_every: bool = True
    hidden_sizes: Sequence[int] = (128,)
    num_classes: int = 10
    activation: str = "relu"
    normalization: str | None = None
    dropout_rate: float = 0.0
    global_pool: bool = False

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch height width channels"], *, train: bool = False
    ) -> Float[Array, "batch num_classes"]:
        for i, width in enumerate(self.features):
            x = ConvBlock2D(
                width,
                kernel_size=self.kernel_size,
                normalization=self.normalization,
                activation=self.activation,
                pooling="max" if self.pool_every else None,
                name=f"block_{i}",
            )(x, train=train)  # [B, H / 2^(i+1), W / 2^(i+1), width]
        x = GlobalAvgPool()(x) if self.global_pool else Flatten()(x)  # [B, D]
        return MLP(
            self.hidden_sizes,
            out_features=self.num_classes,
            activation=self.activation,
            dropout_rate=self.dropout_rate,
            name="head",
        )(x, train=train)
