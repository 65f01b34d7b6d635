"""nnlib: a JAX functional research library for neural networks and deep learning."""

from nnlib import runtime as _runtime

__version__ = "0.1.0"

# Keep freed host memory for the next call of a compiled program instead of
# faulting fresh pages in every step, and run CPU programs on the calling thread
# (see nnlib/runtime.py; opt out with NNLIB_RETAIN_MEMORY=0 and
# NNLIB_SYNC_CPU_DISPATCH=0).
_runtime._apply_on_import()
