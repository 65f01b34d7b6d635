"""Test-wide settings: strict dtype promotion, as equinox's suite does.

Implicit promotion (float32 + float64 -> float64, int + float) hides dtype bugs
that only surface on accelerators or in half precision; under "strict" any
implicit promotion raises, so layers must keep dtypes consistent.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
