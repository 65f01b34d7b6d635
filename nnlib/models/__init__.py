"""nnlib.models: whole networks built from ``nnlib.layers``."""

from nnlib.models.cnn import CNN
from nnlib.models.mlp import MLPClassifier

__all__ = ["CNN", "MLPClassifier"]
