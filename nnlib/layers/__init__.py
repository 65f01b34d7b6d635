"""nnlib.layers: the functional building blocks, as Flax linen modules.

Every layer is a pure ``init``/``apply`` pair. Randomness comes from explicit
PRNG keys (``rngs={"dropout": key}``) and mutable state (BatchNorm's
``"batch_stats"``) is an explicit collection.
"""

from nnlib.layers._checks import ShapeError
from nnlib.layers.activations import ACTIVATIONS, Activation, get_activation
from nnlib.layers.dense import MLP, Dense
from nnlib.layers.normalization import BatchNorm, Dropout, LayerNorm, dropout

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "Activation",
    "BatchNorm",
    "Dense",
    "Dropout",
    "LayerNorm",
    "ShapeError",
    "dropout",
    "get_activation",
]
