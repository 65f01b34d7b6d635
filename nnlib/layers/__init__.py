"""nnlib.layers: the functional building blocks, as Flax linen modules.

Every layer is a pure ``init``/``apply`` pair. Randomness comes from explicit
PRNG keys (``rngs={"dropout": key}``) and mutable state (BatchNorm's
``"batch_stats"``) is an explicit collection.
"""

from nnlib.layers._checks import ShapeError
from nnlib.layers.activations import ACTIVATIONS, Activation, get_activation
from nnlib.layers.attention import (
    MultiHeadAttention,
    causal_mask,
    combine_masks,
    dot_product_attention,
    dot_product_attention_weights,
    padding_mask,
)
from nnlib.layers.conv import Conv1D, Conv2D, ConvBlock1D, ConvBlock2D
from nnlib.layers.dense import MLP, Dense, matmul_last_axis
from nnlib.layers.initializers import orthogonal
from nnlib.layers.normalization import BatchNorm, Dropout, LayerNorm, dropout, l2_normalize
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
from nnlib.layers.transformer import (
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    TransformerDecoder,
    TransformerDecoderBlock,
    TransformerEncoder,
    TransformerEncoderBlock,
    sinusoidal_positions,
)

__all__ = [
    "ACTIVATIONS",
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
    "LearnedPositionalEmbedding",
    "MLP",
    "MaxPool1D",
    "MaxPool2D",
    "MultiHeadAttention",
    "RNN",
    "RecurrentCell",
    "ShapeError",
    "SimpleRNNCell",
    "SinusoidalPositionalEncoding",
    "TransformerDecoder",
    "TransformerDecoderBlock",
    "TransformerEncoder",
    "TransformerEncoderBlock",
    "avg_pool",
    "causal_mask",
    "combine_masks",
    "dot_product_attention",
    "dot_product_attention_weights",
    "dropout",
    "get_activation",
    "l2_normalize",
    "matmul_last_axis",
    "max_pool",
    "orthogonal",
    "padding_mask",
    "sinusoidal_positions",
]
