"""nnlib.compress.quantization: the plain-JAX int8 grid against its error
bound, and qwix's PTQ/QAT on nnlib layers against an int8 matmul written in
numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnlib.compress import (
    dequantize,
    fake_quantize,
    fake_quantize_params,
    ptq_model,
    qat_model,
    quantize_per_channel,
    quantized_size_bytes,
    tree_bytes,
)
from nnlib.layers import Dense
from nnlib.models import CNN, MLPClassifier


@pytest.mark.parametrize("shape", [(7, 5), (3, 3, 4, 6), (1, 9)])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_dequantize_error_within_half_a_step(shape, bits):
    rng = np.random.default_rng(sum(shape) + bits)
    w = rng.normal(size=shape).astype(np.float32) * rng.uniform(0.01, 10, size=shape[-1])
    w[..., 0] = 0.0  # an all-zero channel
    q, scale = quantize_per_channel(jnp.asarray(w), bits=bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == jnp.int8 and int(jnp.max(jnp.abs(q))) <= qmax
    absmax = np.abs(w).reshape(-1, shape[-1]).max(0)
    np.testing.assert_allclose(np.asarray(scale)[1:], absmax[1:] / qmax, rtol=1e-6)
    err = np.abs(np.asarray(dequantize(q, scale)) - w)
    assert (err <= np.asarray(scale) / 2 * (1 + 1e-5)).all()
    assert (np.asarray(q)[..., 0] == 0).all()


def test_fake_quantize_is_straight_through():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
    c = jnp.arange(24.0).reshape(6, 4)
    np.testing.assert_array_equal(fake_quantize(w), dequantize(*quantize_per_channel(w)))
    np.testing.assert_array_equal(jax.grad(lambda w: jnp.sum(fake_quantize(w) * c))(w), c)
    params = {"kernel": w, "bias": jnp.ones(4) * 0.123456}
    fq = fake_quantize_params(params)
    assert (fq["bias"] == params["bias"]).all() and not (fq["kernel"] == w).all()


def test_quantized_size_closed_form():
    params = {"dense": {"kernel": jnp.zeros((64, 32)), "bias": jnp.zeros(32)},
              "conv": {"kernel": jnp.zeros((3, 3, 2, 8))}}
    sizes = quantized_size_bytes(params)
    assert sizes["float_bytes"] == 4 * (64 * 32 + 32 + 144)
    assert sizes["quantized_bytes"] == (64 * 32 + 4 * 32) + 4 * 32 + (144 + 4 * 8)
    assert quantized_size_bytes(params, bits=4)["quantized_bytes"] == (
        64 * 32 // 2 + 4 * 32) + 4 * 32 + (144 // 2 + 4 * 8)


def _on_qwix_grid(rng, rows, cols, step, axis):
    """Values n * step (n integer, |n| <= 127) with one +-127.5 * step per slice
    along ``axis``: qwix's scale (absmax / 127.5) is then exactly ``step`` and
    every quotient is exact, so a numpy reference can match bit for bit."""
    n = rng.integers(-127, 128, size=(rows, cols)).astype(np.float32)
    idx = rng.integers(0, n.shape[axis], size=n.shape[1 - axis])
    signs = rng.choice([-1.0, 1.0], size=idx.shape)
    if axis == 0:  # one extreme per column
        n[idx, np.arange(cols)] = 127.5 * signs
    else:  # one extreme per row
        n[np.arange(rows), idx] = 127.5 * signs
    return n * step


def _numpy_int8_dense(x, w, b):
    """Symmetric int8 on qwix's grid: per output column for w, per row for x;
    round half to even, clip to [-128, 127]; int32 matmul, then rescale."""
    sw = np.abs(w).max(0, keepdims=True) / 127.5
    sx = np.abs(x).max(1, keepdims=True) / 127.5
    qw = np.clip(np.round(w / sw), -128, 127).astype(np.int64)
    qx = np.clip(np.round(x / sx), -128, 127).astype(np.int64)
    return (qx @ qw).astype(np.float64) * sx * sw + b, qw


def test_qwix_ptq_and_qat_on_nnlib_dense_match_numpy_int8():
    rng = np.random.default_rng(1)
    x = _on_qwix_grid(rng, 5, 12, 2.0 ** -6, axis=1)
    w = _on_qwix_grid(rng, 12, 7, 2.0 ** -9, axis=0)
    b = rng.normal(size=7).astype(np.float32)
    layer = Dense(7)
    params = {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
    expected, qw = _numpy_int8_dense(x, w, b)
    qmodel, qparams = ptq_model(layer, params, jnp.asarray(x))
    kernel = qparams["kernel"].array
    assert kernel.qvalue.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(kernel.qvalue), qw)
    ptq = np.asarray(jax.jit(qmodel.apply)({"params": qparams}, jnp.asarray(x)))
    np.testing.assert_allclose(ptq, expected, rtol=1e-5, atol=1e-6)
    qat = np.asarray(jax.jit(qat_model(layer).apply)({"params": params}, jnp.asarray(x)))
    np.testing.assert_allclose(qat, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(qat - (x @ w + b)).max() > 1e-4  # the Dense really is quantized


def test_ptq_params_size_and_match_qat_on_models():
    x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
    for model in (MLPClassifier(hidden_sizes=(32, 32)), CNN(features=(4, 8), hidden_sizes=(16,))):
        params = model.init(jax.random.key(1), x)["params"]
        qmodel, qparams = ptq_model(model, params, x)
        ptq = jax.jit(qmodel.apply)({"params": qparams}, x)
        qat = jax.jit(qat_model(model).apply)({"params": params}, x)
        np.testing.assert_allclose(np.asarray(ptq), np.asarray(qat), rtol=1e-5, atol=1e-5)
        # int8 kernels + a float32 scale per output channel, float biases
        assert tree_bytes(qparams) == quantized_size_bytes(params)["quantized_bytes"]


def test_qat_survives_batch_equal_to_a_square_layer_width():
    # qwix alone takes a [32, 32] activation for the [32, 32] kernel and asserts.
    model = MLPClassifier(hidden_sizes=(32, 32))
    x = jnp.ones((32, 32))
    params = model.init(jax.random.key(0), x)
    grads = jax.grad(lambda p: jnp.sum(qat_model(model).apply(p, x)))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
