"""nnlib.models: whole networks built from ``nnlib.layers``."""

from nnlib.models.cnn import CNN
from nnlib.models.gpt import GPT, GPTConfig, KVCache, generate, sample_next_token
from nnlib.models.mlp import MLPClassifier

__all__ = ["CNN", "GPT", "GPTConfig", "KVCache", "MLPClassifier", "generate",
           "sample_next_token"]
