"""nnlib: a JAX functional research library for neural networks and deep learning."""

__version__ = "0.1.0"
