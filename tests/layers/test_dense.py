"""Dense and MLP against numpy formulas and PyTorch."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from nnlib.layers import MLP, Dense, ShapeError
from nnlib.layers.dense import matmul_last_axis

KEY = jax.random.key(0)


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 5),
    extra=st.integers(0, 2),
    fin=st.integers(1, 9),
    fout=st.integers(1, 9),
)
def test_dense_shapes_and_numpy(batch, extra, fin, fout):
    shape = (batch,) + (2,) * extra + (fin,)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    layer = Dense(fout)
    params = layer.init(KEY, x)["params"]
    assert params["kernel"].shape == (fin, fout) and params["bias"].shape == (fout,)
    y = layer.apply({"params": params}, x)
    assert y.shape == shape[:-1] + (fout,)
    ref = x @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_dense_without_bias_and_dtype():
    x = jnp.ones((2, 3))
    params = Dense(4, use_bias=False).init(KEY, x)["params"]
    assert set(params) == {"kernel"}
    y = Dense(4, dtype=jnp.bfloat16).apply(Dense(4).init(KEY, x), x)
    assert y.dtype == jnp.bfloat16


def test_dense_gradients():
    with jax.enable_x64(True):
        x = jax.random.normal(KEY, (3, 4), jnp.float64)
        layer = Dense(5, param_dtype=jnp.float64)
        params = layer.init(KEY, x)
        f = lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)))
        check_grads(f, (params, x), order=2, modes=("rev",))


@pytest.mark.parametrize("shape", [(7,), (5, 7), (2, 3, 7), (2, 1, 3, 7), (1, 7), (1, 1, 7)])
def test_matmul_last_axis_equals_matmul_with_gradients(shape):
    """Values and derivatives, forward and reverse, second order; (7,), (1, 7)
    and (1, 1, 7) are single rows, which take their own derivative rule."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=shape))
        k = jnp.asarray(rng.normal(size=(7, 4)))
        np.testing.assert_allclose(matmul_last_axis(x, k), np.asarray(x) @ np.asarray(k),
                                   rtol=1e-12)
        f = lambda x, k: jnp.sin(matmul_last_axis(x, k))
        check_grads(f, (x, k), order=2, modes=("rev", "fwd"))
        # Derivatives with respect to one argument only (the other unperturbed).
        check_grads(lambda x: f(x, k), (x,), order=2, modes=("rev", "fwd"))
        check_grads(lambda k: f(x, k), (k,), order=2, modes=("rev", "fwd"))


def test_single_row_gradients_equal_matmul_gradients():
    """The single-row rule against jnp.matmul's own derivative, also in bf16
    (kernel tangent accumulated in float32) and with preferred_element_type."""
    rng = np.random.default_rng(3)
    for dtype, pet, tol in [(jnp.float32, None, 1e-6), (jnp.bfloat16, None, 1e-2),
                            (jnp.bfloat16, jnp.float32, 1e-2)]:
        x = jnp.asarray(rng.normal(size=(1, 9)), dtype)
        k = jnp.asarray(rng.normal(size=(9, 5)), dtype)
        g = jnp.asarray(rng.normal(size=(1, 5)), pet or dtype)
        mine = jax.vjp(lambda x, k, pet=pet: matmul_last_axis(x, k, preferred_element_type=pet),
                       x, k)
        ref = jax.vjp(lambda x, k, pet=pet: jnp.matmul(x, k, preferred_element_type=pet), x, k)
        assert mine[0].dtype == ref[0].dtype
        for a, b in zip(mine[1](g), ref[1](g), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=tol, atol=tol)
        tx, tk = jnp.ones_like(x), jnp.ones_like(k)
        got = jax.jvp(lambda x, k, pet=pet: matmul_last_axis(x, k, preferred_element_type=pet),
                      (x, k), (tx, tk))[1]
        want = jax.jvp(lambda x, k, pet=pet: jnp.matmul(x, k, preferred_element_type=pet),
                       (x, k), (tx, tk))[1]
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=tol, atol=tol)


def test_single_row_bf16_kernel_tangent_is_not_rounded_before_the_sum():
    """bf16 inputs: the single-row rule's kernel tangent multiplies in float32, as
    jnp.matmul does, instead of rounding each product to bf16 before the sum."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(1, 256)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(256, 8)), jnp.bfloat16)
    dk = jnp.asarray(rng.normal(size=(256, 8)), jnp.bfloat16)
    exact = np.asarray(x, np.float64) @ np.asarray(dk, np.float64)
    for pet in (None, jnp.float32):
        got = jax.jvp(lambda k, pet=pet: matmul_last_axis(x, k, preferred_element_type=pet),
                      (k,), (dk,))[1]
        want = jax.jvp(lambda k, pet=pet: jnp.matmul(x, k, preferred_element_type=pet),
                       (k,), (dk,))[1]
        if pet is None:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(want, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU layout choice")
def test_per_example_kernel_gradients_are_written_in_place():
    """vmap of a single-row gradient: the [B, in, out] kernel gradients come out
    of one fusion in their own layout, with no transposed copy of them."""
    x = jnp.ones((8, 6))
    layer = Dense(5)
    params = layer.init(KEY, x[:1])
    per_example = jax.jit(jax.vmap(
        jax.grad(lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x[None])))), in_axes=(None, 0)))
    hlo = per_example.lower(params, x).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    assert "f32[8,6,5]{1,2,0}" not in hlo
    assert not re.findall(r"%\S+ = f32\[8,6,5\]\{2,1,0\} (?:copy|transpose)\(", entry), entry
    want = jax.vmap(jax.grad(lambda p, x: jnp.sum(jnp.sin(
        x[None] @ p["params"]["kernel"] + p["params"]["bias"]))), in_axes=(None, 0))(params, x)
    got = per_example(params, x)
    np.testing.assert_allclose(got["params"]["kernel"], want["params"]["kernel"], rtol=1e-6)


def test_matmul_last_axis_preferred_element_type():
    x = jnp.ones((2, 3, 4), jnp.bfloat16)
    k = jnp.ones((4, 5), jnp.bfloat16)
    assert matmul_last_axis(x, k).dtype == jnp.bfloat16
    y = matmul_last_axis(x, k, preferred_element_type=jnp.float32)
    assert y.dtype == jnp.float32 and y.shape == (2, 3, 5)
    np.testing.assert_array_equal(y, 4.0)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU layout choice")
def test_dense_kernel_gradient_on_sequences_copies_nothing():
    # The reason matmul_last_axis exists: the kernel gradient of a Dense on
    # [B, T, in] is one [B*T, in]^T @ [B*T, out] product that reads the output
    # gradient in place. Contracting B and T as two axes made XLA:CPU copy
    # the output gradient into a transposed layout first.
    x = jnp.ones((4, 16, 8))
    layer = Dense(32)
    params = layer.init(KEY, x)
    g = jnp.ones((4, 16, 32))
    grad = jax.jit(lambda p, x, g: jax.vjp(lambda p: layer.apply(p, x), p)[1](g)[0])
    hlo = grad.lower(params, x, g).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    # "%name = shape opcode(operands)": the instruction names and opcodes.
    ops = re.findall(r"%(\S+) = \S+ ([\w-]+)\(", entry)
    assert ops and not [op for op in ops
                        if "copy" in op[0] or "transpose" in op[0] or op[1] in ("copy", "transpose")], entry


def test_dense_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(size=(6, 7)).astype(np.float32)
    params = Dense(3).init(KEY, x)["params"]
    lin = torch.nn.Linear(7, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.asarray(params["kernel"]).T.copy()))
        lin.bias.copy_(torch.from_numpy(np.array(params["bias"])))
        ref = lin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(Dense(3).apply({"params": params}, x), ref, rtol=1e-5, atol=1e-6)


def _numpy_mlp(params, x, act):
    h = x
    for i in range(len([k for k in params if k.startswith("dense_")])):
        h = act(h @ np.asarray(params[f"dense_{i}"]["kernel"]) + np.asarray(params[f"dense_{i}"]["bias"]))
    return h @ np.asarray(params["output"]["kernel"]) + np.asarray(params["output"]["bias"])


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu_exact"])
def test_mlp_matches_numpy(activation):
    import math

    acts = {
        "relu": lambda h: np.maximum(h, 0),
        "tanh": np.tanh,
        "gelu_exact": lambda h: 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2))),
    }
    x = np.random.default_rng(2).normal(size=(5, 6)).astype(np.float32)
    mlp = MLP((8, 7), out_features=3, activation=activation)
    params = mlp.init(KEY, x)["params"]
    np.testing.assert_allclose(
        mlp.apply({"params": params}, x), _numpy_mlp(params, x, acts[activation]),
        rtol=1e-5, atol=1e-5,
    )


def test_mlp_without_output_layer_ends_on_activation():
    x = jnp.linspace(-1, 1, 12).reshape(3, 4)
    mlp = MLP((5,), activation="relu")
    y = mlp.apply(mlp.init(KEY, x), x)
    assert y.shape == (3, 5) and bool(jnp.all(y >= 0))


def test_mlp_dropout_needs_train_and_key():
    x = jnp.ones((64, 16))
    mlp = MLP((128,), out_features=4, dropout_rate=0.5)
    v = mlp.init(KEY, x)
    eval_out = mlp.apply(v, x)
    np.testing.assert_array_equal(eval_out, mlp.apply(v, x, train=False))
    a = mlp.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = mlp.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
    c = mlp.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, eval_out)
    with pytest.raises(ValueError, match="Dropout with train=True needs a PRNG key"):
        mlp.apply(v, x, train=True)


def test_mlp_batch_norm_updates_stats_only_in_training():
    x = jax.random.normal(KEY, (32, 6)) * 3 + 1
    mlp = MLP((8,), out_features=2, normalization="batch")
    v = mlp.init(KEY, x)
    _, upd = mlp.apply(v, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(upd["batch_stats"]["norm_0"]["mean"], v["batch_stats"]["norm_0"]["mean"])
    _, same = mlp.apply(v, x, train=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(same["batch_stats"]["norm_0"]["mean"], v["batch_stats"]["norm_0"]["mean"])


def test_mlp_layer_norm_output_shape():
    x = jnp.ones((2, 3, 4))
    mlp = MLP((6, 6), out_features=1, normalization="layer")
    assert mlp.apply(mlp.init(KEY, x), x).shape == (2, 3, 1)


def test_dense_bad_inputs():
    layer = Dense(4)
    params = layer.init(KEY, jnp.ones((2, 3)))
    with pytest.raises(ShapeError, match=r"Dense expected inputs .*features=3, got shape \(2, 5\)"):
        layer.apply(params, jnp.ones((2, 5)))
    with pytest.raises(TypeError, match=r"Dense expected floating-point inputs.*int32"):
        layer.apply(params, jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ShapeError, match=r"Dense expected inputs.*rank >= 1.*got shape \(\)"):
        layer.apply(params, jnp.float32(1.0))
    with pytest.raises(TypeError, match="Dense expected inputs to be an array, got list"):
        layer.apply(params, [[1.0, 2.0, 3.0]])


def test_mlp_bad_inputs():
    with pytest.raises(ValueError, match="MLP normalization must be None, 'layer' or 'batch'"):
        MLP((3,), normalization="group").init(KEY, jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="MLP expected floating-point inputs"):
        MLP((3,)).init(KEY, jnp.ones((2, 3), jnp.int32))
    mlp = MLP((3,), out_features=2)
    v = mlp.init(KEY, jnp.ones((2, 4)))
    with pytest.raises(ShapeError, match=r"Dense expected inputs .*features=4, got shape \(2, 7\)"):
        mlp.apply(v, jnp.ones((2, 7)))
