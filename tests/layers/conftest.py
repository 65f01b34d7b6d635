"""Layer tests run under strict dtype promotion, as equinox's suite does.

Implicit promotion (float32 + float64 -> float64, int + float) hides dtype bugs
that only surface on accelerators or in half precision; under "strict" any
implicit promotion raises, so every layer must keep its dtypes explicit. It is
scoped to the layer tests: optax's own update rules (e.g. Adam's bias
correction, float ** int32 step) rely on standard promotion.
"""

import jax
import pytest


@pytest.fixture(autouse=True)
def strict_dtype_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield
