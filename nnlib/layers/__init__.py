"""nnlib.layers: the functional building blocks, as Flax linen modules.

Every layer is a pure ``init``/``apply`` pair. Randomness comes from explicit
PRNG keys (``rngs={"dropout": key}``) and mutable state (BatchNorm's
``"batch_stats"``) is an explicit collection.
"""

from nnlib.layers._checks import ShapeError
from nnlib.layers.activations import ACTIVATIONS, Activation, get_activation
from nnlib.layers.conv import Conv1D, Conv2D, ConvBlock1D, ConvBlock2D
from nnlib.layers.dense import MLP, Dense
from nnlib.layers.normalization import BatchNorm, Dropout, LayerNorm, dropout
from nnlib.layers.pooling import (
    AvgPool1D,
    AvgPool2D,
    Flatten,
    GlobalAvgPool,
    GlobalMaxPool,
    MaxPool1D,
    MaxPool2D,
    avg_pool,
    max_pool,
)
from nnlib.layers.recurrent import (
    RNN,
    Bidirectional,
    GRUCell,
    LSTMCell,
    RecurrentCell,
    SimpleRNNCell,
)

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "RNN",
    "Activation",
    "AvgPool1D",
    "AvgPool2D",
    "BatchNorm",
    "Bidirectional",
    "Conv1D",
    "Conv2D",
    "ConvBlock1D",
    "ConvBlock2D",
    "Dense",
    "Dropout",
    "Flatten",
    "GRUCell",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "LSTMCell",
    "LayerNorm",
    "MaxPool1D",
    "MaxPool2D",
    "RecurrentCell",
    "ShapeError",
    "SimpleRNNCell",
    "avg_pool",
    "dropout",
    "get_activation",
    "max_pool",
]
