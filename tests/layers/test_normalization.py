"""LayerNorm, BatchNorm and dropout against numpy formulas and PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from nnlib.layers import BatchNorm, Dropout, LayerNorm, ShapeError, dropout, l2_normalize
from nnlib.layers.normalization import _feature_mean

KEY = jax.random.key(0)


def _rand(shape, seed=0, scale=1.0, shift=0.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale + shift).astype(np.float32)


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.integers(2, 9))
def test_layer_norm_matches_numpy(lead, features):
    x = _rand((*lead, features), scale=3.0, shift=2.0)
    ln = LayerNorm()
    params = ln.init(KEY, x)
    # Non-trivial scale and bias so both are exercised.
    params = jax.tree.map(lambda p: p + 0.5, params)
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    ref = (x - mean) / np.sqrt(var + 1e-5) * 1.5 + 0.5
    np.testing.assert_allclose(ln.apply(params, x), ref, rtol=1e-5, atol=1e-5)


def test_layer_norm_without_affine_and_bf16():
    x = _rand((4, 8))
    ln = LayerNorm(use_scale=False, use_bias=False)
    assert ln.init(KEY, x) == {}
    y = ln.apply({}, x)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-6)
    yb = ln.apply({}, jnp.asarray(x, jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16


def test_layer_norm_matches_torch():
    torch = pytest.importorskip("torch")
    x = _rand((3, 5, 6), seed=1)
    params = jax.tree.map(lambda p: p * 0.7 + 0.1, LayerNorm().init(KEY, x))
    ref = torch.nn.LayerNorm(6, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.array(params["params"]["scale"])))
        ref.bias.copy_(torch.from_numpy(np.array(params["params"]["bias"])))
        want = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(LayerNorm().apply(params, x), want, rtol=1e-5, atol=1e-5)


def test_layer_norm_gradients():
    with jax.enable_x64(True):
        x = jax.random.normal(KEY, (3, 5), jnp.float64)
        ln = LayerNorm()
        p = jax.tree.map(lambda a: a.astype(jnp.float64), ln.init(KEY, x))
        check_grads(lambda p, x: jnp.sum(jnp.sin(ln.apply(p, x))), (p, x), order=2,
                    modes=("rev",))


def test_l2_normalize_matches_numpy_and_keeps_zero_and_half_precision_finite():
    x = _rand((2, 3, 5), scale=3.0)
    np.testing.assert_allclose(l2_normalize(x), x / np.linalg.norm(x, axis=-1, keepdims=True),
                               rtol=1e-6)
    # float16: a zero vector stays 0 (eps would round to 0) and a norm of 632 does not
    # overflow its sum of squares.
    np.testing.assert_array_equal(l2_normalize(jnp.zeros((1, 4), jnp.float16)), np.zeros((1, 4)))
    big = l2_normalize(jnp.full((1, 1000), 20.0, jnp.float16))
    assert big.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(big, np.float32), 1 / np.sqrt(1000), rtol=1e-3)


@pytest.mark.parametrize("shape", [(16, 4), (8, 3, 3, 5)])
def test_batch_norm_train_and_eval_match_numpy(shape):
    x = _rand(shape, scale=2.0, shift=-1.0)
    bn = BatchNorm(momentum=0.9)
    v = bn.init(KEY, x)
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    axes = tuple(range(len(shape) - 1))
    mean, var = x.mean(axes), x.var(axes)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    stats = upd["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)
    # Evaluation uses the running statistics, and leaves them alone.
    y_eval, same = bn.apply({**v, **upd}, x, mutable=["batch_stats"])
    ref_eval = (x - stats["mean"]) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
    np.testing.assert_allclose(y_eval, ref_eval, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(same["batch_stats"]["mean"], stats["mean"])


def test_batch_norm_variance_of_features_far_from_zero():
    # 3000 +- 1: the one-pass mean(x^2) - mean^2 cancels in float32 (the
    # variance comes out wrong by more than itself); two passes stay exact.
    x = _rand((64, 3), shift=3000.0)
    x64 = np.asarray(x, np.float64)
    want = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    v = BatchNorm().init(KEY, x)
    y, upd = BatchNorm().apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, want, atol=2e-3)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * x64.var(0), rtol=1e-4)
    fast, _ = BatchNorm(use_fast_variance=True).apply(v, x, train=True, mutable=["batch_stats"])
    assert np.abs(np.asarray(fast) - want).max() > 0.1  # the option keeps flax's trade


def test_batch_norm_init_does_not_move_statistics():
    v = BatchNorm().init(KEY, _rand((8, 3), shift=5.0), train=True)
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3))


def test_batch_norm_matches_torch_over_steps():
    torch = pytest.importorskip("torch")
    bn = BatchNorm(momentum=0.9)
    ref = torch.nn.BatchNorm2d(4, eps=1e-5, momentum=0.1)
    v = bn.init(KEY, _rand((2, 3, 3, 4)))
    for step in range(3):
        x = _rand((6, 5, 5, 4), seed=step, scale=2.0, shift=1.0)
        y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
        v = {**v, **upd}
        ref.train()
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(v["batch_stats"]["mean"], ref.running_mean.numpy(), rtol=1e-5,
                               atol=1e-6)
    # PyTorch's running variance is unbiased (n / (n - 1)); nnlib stores the
    # biased one, as flax does. They agree up to that factor's effect.
    np.testing.assert_allclose(v["batch_stats"]["var"], ref.running_var.numpy(), rtol=2e-2)
    ref.eval()
    x = _rand((2, 5, 5, 4), seed=9)
    got = bn.apply(v, x)
    assert got.shape == x.shape


def test_batch_norm_synchronized_over_axis():
    x = _rand((4, 8, 3), shift=2.0)  # 4 "devices" x 8 examples
    bn = BatchNorm(axis_name="devices")
    v = bn.init(KEY, x[0])
    f = lambda xs: bn.apply(v, xs, train=True, mutable=["batch_stats"])
    y, upd = jax.vmap(f, axis_name="devices")(x)
    y_global, upd_global = BatchNorm().apply(v, x.reshape(32, 3), train=True,
                                             mutable=["batch_stats"])
    np.testing.assert_allclose(y.reshape(32, 3), y_global, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"][0], upd_global["batch_stats"]["mean"],
                               rtol=1e-5, atol=1e-6)


def test_batch_norm_gradients():
    with jax.enable_x64(True):
        x = jax.random.normal(KEY, (6, 3), jnp.float64)
        bn = BatchNorm()
        v = bn.init(KEY, x)
        f = lambda p, x: jnp.sum(
            jnp.sin(bn.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                             mutable=["batch_stats"])[0]))
        p = jax.tree.map(lambda a: a.astype(jnp.float64), v["params"])
        check_grads(f, (p, x), order=1, modes=("rev",))


def test_dropout_statistics_and_determinism():
    x = jnp.ones((200, 100))
    y = dropout(KEY, x, 0.3)
    kept = np.asarray(y) != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.7, rtol=1e-6)
    np.testing.assert_array_equal(y, dropout(KEY, x, 0.3))
    np.testing.assert_array_equal(dropout(KEY, x, 0.0), x)
    np.testing.assert_array_equal(dropout(KEY, x, 1.0), 0 * x)
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\], got 1.5"):
        dropout(KEY, x, 1.5)


def test_dropout_module_key_sources():
    x = jnp.ones((10, 10))
    d = Dropout(0.5)
    np.testing.assert_array_equal(d.apply({}, x), x)
    a = d.apply({}, x, train=True, rng=jax.random.key(3))
    b = d.apply({}, x, train=True, rngs={"dropout": jax.random.key(3)})
    assert a.shape == b.shape and not np.array_equal(a, x)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        d.apply({}, x, train=True)
    with pytest.raises(ValueError, match=r"Dropout rate must be in \[0, 1\], got -0.1"):
        Dropout(-0.1).apply({}, x, train=True, rng=KEY)


def test_normalization_bad_inputs():
    ln = LayerNorm()
    v = ln.init(KEY, jnp.ones((2, 4)))
    with pytest.raises(ShapeError, match=r"LayerNorm expected inputs .*features=4, got shape \(2, 5\)"):
        ln.apply(v, jnp.ones((2, 5)))
    with pytest.raises(TypeError, match="LayerNorm expected floating-point inputs"):
        ln.apply(v, jnp.ones((2, 4), jnp.int32))
    bn = BatchNorm()
    vb = bn.init(KEY, jnp.ones((2, 4)))
    with pytest.raises(ShapeError, match=r"BatchNorm expected inputs of shape \[batch, \.\.\., features\] \(rank >= 2\), got shape \(4,\)"):
        bn.apply(vb, jnp.ones((4,)))
    with pytest.raises(ShapeError, match=r"BatchNorm expected inputs .*features=4, got shape \(2, 3\)"):
        bn.apply(vb, jnp.ones((2, 3)))


# ----------------------------------------------------------------------------
# the feature mean as a matrix-vector product (CPU)
# ----------------------------------------------------------------------------


def test_feature_mean_matches_numpy_and_is_a_product_on_cpu():
    """``_feature_mean`` is the row mean (to float rounding), its gradient checks
    against finite differences, and on CPU LayerNorm's mean is a dot_general
    (the form that keeps XLA:CPU from fusing the row sum into the preceding
    matmul's library call)."""
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(5, 7, 384)).astype(np.float32)
    np.testing.assert_allclose(_feature_mean(jnp.asarray(x)), x.mean(-1, keepdims=True),
                               rtol=1e-6, atol=1e-6)
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)
        np.testing.assert_allclose(_feature_mean(x64), x.astype(np.float64).mean(-1, keepdims=True),
                                   rtol=1e-14)
        check_grads(_feature_mean, (x64[:2, :3, :8],), order=2, modes=("fwd", "rev"))
    if jax.default_backend() == "cpu":
        ln = LayerNorm()
        variables = ln.init(jax.random.key(0), x)
        jaxpr = str(jax.make_jaxpr(ln.apply)(variables, x))
        assert "dot_general" in jaxpr


def test_feature_mean_on_accelerators_is_a_reduction(monkeypatch):
    """Off the CPU the mean stays ``jnp.mean`` (a reduction, no product)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16)), jnp.float32)
    jaxpr = str(jax.make_jaxpr(_feature_mean)(x))
    assert "reduce_sum" in jaxpr and "dot_general" not in jaxpr
    np.testing.assert_allclose(_feature_mean(x), np.asarray(x).mean(-1, keepdims=True), rtol=1e-6)
