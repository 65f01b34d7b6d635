"""Activations against their closed forms (numpy / math), by name."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from nnlib.layers import ACTIVATIONS, Activation, get_activation
from nnlib.layers.activations import gelu_exact


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


_erf = np.vectorize(math.erf)

REFERENCE = {
    "identity": lambda x: x,
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0),
    "relu6": lambda x: np.clip(x, 0, 6),
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.01 * x),
    "elu": lambda x: np.where(x > 0, x, np.expm1(x)),
    "selu": lambda x: 1.0507009873554805
    * np.where(x > 0, x, 1.6732632423543772 * np.expm1(x)),
    "celu": lambda x: np.where(x > 0, x, np.expm1(x)),
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "gelu_exact": lambda x: 0.5 * x * (1 + _erf(x / np.sqrt(2))),
    "silu": lambda x: x * _sigmoid(x),
    "swish": lambda x: x * _sigmoid(x),
    "mish": lambda x: x * np.tanh(_softplus(x)),
    "sigmoid": _sigmoid,
    "hard_sigmoid": lambda x: np.clip(x + 3, 0, 6) / 6,
    "log_sigmoid": lambda x: -_softplus(-x),
    "tanh": np.tanh,
    "hard_tanh": lambda x: np.clip(x, -1, 1),
    "softplus": _softplus,
    "softsign": lambda x: x / (1 + np.abs(x)),
}


def test_every_activation_has_a_reference():
    assert set(REFERENCE) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_matches_closed_form(name):
    x = np.linspace(-5, 5, 101)
    with jax.enable_x64(True):
        got = np.asarray(get_activation(name)(jnp.asarray(x)))
    np.testing.assert_allclose(got, REFERENCE[name](x), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "name", [n for n in sorted(ACTIVATIONS) if n not in ("relu", "relu6", "leaky_relu",
                                                       "hard_tanh", "hard_sigmoid")]
)
def test_gradients_match_finite_differences(name):
    # Points away from kinks so central differences are valid.
    x = np.array([-2.3, -0.7, 0.4, 1.9])
    with jax.enable_x64(True):
        check_grads(get_activation(name), (jnp.asarray(x),), order=2, modes=("rev",))


def test_gelu_exact_float32_error_is_float_rounding_of_x():
    """The erf form against the exact x * erfc(-x / sqrt 2) / 2 in float64:
    within 2 |x| eps over [-12, 12], tails included, like JAX's erfc form."""
    x = np.linspace(-12, 12, 4001).astype(np.float32)
    x64 = x.astype(np.float64)
    exact = 0.5 * x64 * np.vectorize(math.erfc)(-x64 / math.sqrt(2))
    bound = 2 * np.abs(x64) * np.finfo(np.float32).eps + 1e-30
    for fn in (gelu_exact, lambda x: jax.nn.gelu(x, approximate=False)):
        got = np.asarray(fn(jnp.asarray(x)), np.float64)
        assert np.all(np.abs(got - exact) <= bound)


def test_gelu_exact_keeps_half_precision_dtypes():
    x = jnp.linspace(-4, 4, 33, dtype=jnp.bfloat16)
    got = get_activation("gelu_exact")(x)
    assert got.dtype == jnp.bfloat16
    want = jax.nn.gelu(x.astype(jnp.float32), approximate=False)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.02)


def test_piecewise_derivatives():
    x = jnp.array([-2.0, -0.5, 0.5, 2.0, 7.0])
    np.testing.assert_allclose(jax.vmap(jax.grad(get_activation("relu")))(x), [0, 0, 1, 1, 1])
    np.testing.assert_allclose(jax.vmap(jax.grad(get_activation("relu6")))(x), [0, 0, 1, 1, 0])
    np.testing.assert_allclose(
        jax.vmap(jax.grad(get_activation("leaky_relu")))(x), [0.01, 0.01, 1, 1, 1], rtol=1e-6
    )


def test_callable_passes_through_and_names_are_case_insensitive():
    fn = lambda x: 2 * x
    assert get_activation(fn) is fn
    assert get_activation("ReLU") is get_activation("relu")
    assert get_activation("leaky-relu") is get_activation("leaky_relu")


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown activation 'relux'.*known activations: .*relu"):
        get_activation("relux")
    with pytest.raises(TypeError, match="name or a callable"):
        get_activation(3)


def test_activation_module():
    x = jnp.linspace(-1, 1, 5)
    y = Activation("tanh").apply({}, x)
    np.testing.assert_allclose(y, np.tanh(np.asarray(x)), rtol=1e-6)
