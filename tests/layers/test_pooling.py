"""Pooling against numpy loops and PyTorch; fast (reshape) path vs reduce_window."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads

from nnlib.layers._checks import ShapeError
from nnlib.layers.pooling import (
    AvgPool1D,
    AvgPool2D,
    Flatten,
    GlobalAvgPool,
    GlobalMaxPool,
    MaxPool1D,
    MaxPool2D,
    avg_pool,
    max_pool,
)

# ---------------------------------------------------------------- references


def same_pads(size, window, stride):
    """TensorFlow's SAME rule: ceil(size / stride) outputs, extra pad after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def np_pool(x, window, strides, pads, op, count_include_pad=True):
    """Explicit loops over batch, output positions and channels.

    x: [B, *S, C]; pads: one (low, high) pair per spatial axis.
    """
    x = np.asarray(x, np.float64)
    n = x.ndim - 2
    out = [
        (x.shape[1 + i] + sum(pads[i]) - window[i]) // strides[i] + 1 for i in range(n)
    ]
    y = np.zeros((x.shape[0], *out, x.shape[-1]))
    for b, c in itertools.product(range(x.shape[0]), range(x.shape[-1])):
        for o in itertools.product(*(range(k) for k in out)):
            values = []
            for t in itertools.product(*(range(w) for w in window)):
                # position in the unpadded input
                pos = [o[i] * strides[i] + t[i] - pads[i][0] for i in range(n)]
                inside = all(0 <= p < x.shape[1 + i] for i, p in enumerate(pos))
                if inside:
                    values.append(x[(b, *pos, c)])
                elif op == "avg" and count_include_pad:
                    values.append(0.0)
            if op == "max":
                y[(b, *o, c)] = max(values)
            else:
                y[(b, *o, c)] = sum(values) / len(values)
    return y


def distinct(shape, seed=0, dtype=np.float32):
    """Values without ties, spaced 0.1 apart, so max gradients are unique."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(math.prod(shape)).reshape(shape) * 0.1 - 3.0).astype(dtype)


def resolve(padding, spatial, window, strides):
    n = len(spatial)
    if padding == "SAME":
        return [same_pads(spatial[i], window[i], strides[i]) for i in range(n)]
    if padding == "VALID":
        return [(0, 0)] * n
    if isinstance(padding, int):
        return [(padding, padding)] * n
    return [tuple(p) for p in padding]


# -------------------------------------------------------------- vs numpy

CASES_2D = [
    # (spatial, window, strides, padding)
    ((4, 6), (2, 2), None, "VALID"),  # tiles exactly: reshape path
    ((4, 6), (2, 3), None, "SAME"),  # tiles exactly under SAME too (no padding)
    ((5, 7), (2, 2), None, "VALID"),  # drops the last row/column
    ((5, 7), (2, 2), None, "SAME"),  # pads after
    ((5, 6), (3, 3), (1, 1), "SAME"),  # overlapping
    ((5, 6), (3, 2), (2, 1), 1),
    ((6, 5), (3, 3), (2, 2), ((1, 0), (0, 2))),
]


@pytest.mark.parametrize("spatial,window,strides,padding", CASES_2D)
@pytest.mark.parametrize("op", ["max", "avg"])
def test_pool_2d_matches_numpy(spatial, window, strides, padding, op):
    x = distinct((2, *spatial, 3))
    module = (MaxPool2D if op == "max" else AvgPool2D)(window, strides, padding)
    fn = max_pool if op == "max" else avg_pool
    s = window if strides is None else strides
    want = np_pool(x, window, s, resolve(padding, spatial, window, s), op)
    np.testing.assert_allclose(module.apply({}, jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fn(jnp.asarray(x), window, strides, padding), want, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("width,window,strides,padding", [
    (8, 2, None, "VALID"), (7, 3, None, "SAME"), (7, 3, 1, 1), (9, 4, 2, [(2, 1)]),
])
@pytest.mark.parametrize("op", ["max", "avg"])
def test_pool_1d_matches_numpy(width, window, strides, padding, op):
    x = distinct((2, width, 3))
    module = (MaxPool1D if op == "max" else AvgPool1D)(window, strides, padding)
    s = window if strides is None else strides
    pads = resolve(padding, (width,), (window,), (s,))
    want = np_pool(x, (window,), (s,), pads, op)
    np.testing.assert_allclose(module.apply({}, jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)


def test_pool_3d_spatial_function():
    """The functions take any number of spatial axes."""
    x = distinct((1, 4, 5, 3, 2))
    want = np_pool(x, (2, 2, 2), (2, 2, 1), [(0, 0)] * 3, "max")
    np.testing.assert_allclose(max_pool(jnp.asarray(x), 2, (2, 2, 1)), want, rtol=1e-6)


def test_avg_pool_same_counts_padding_as_zeros():
    """count_include_pad=True (default, flax & PyTorch): padded cells divide too."""
    x = jnp.ones((1, 3, 1))  # SAME with window 2, stride 2 pads one cell after
    np.testing.assert_allclose(avg_pool(x, 2, padding="SAME")[0, :, 0], [1.0, 0.5])
    np.testing.assert_allclose(AvgPool1D(2, padding="SAME").apply({}, x)[0, :, 0],
                               [1.0, 0.5])
    excluded = AvgPool1D(2, padding="SAME", count_include_pad=False).apply({}, x)
    np.testing.assert_allclose(excluded[0, :, 0], [1.0, 1.0])


@pytest.mark.parametrize("spatial,window,strides,padding", CASES_2D[3:])
def test_avg_pool_excluding_padding_matches_numpy(spatial, window, strides, padding):
    x = distinct((2, *spatial, 2))
    s = window if strides is None else strides
    want = np_pool(x, window, s, resolve(padding, spatial, window, s), "avg", False)
    got = avg_pool(jnp.asarray(x), window, strides, padding, count_include_pad=False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_max_pool_padding_never_wins():
    x = -jnp.ones((1, 3, 3, 1))  # all negative: a zero pad would win
    y = max_pool(x, 3, 1, "SAME")
    np.testing.assert_array_equal(y, -jnp.ones((1, 3, 3, 1)))


@settings(max_examples=10, deadline=None)
@given(
    h=st.integers(1, 7), w=st.integers(1, 7), wh=st.integers(1, 3), ww=st.integers(1, 3),
    sh=st.integers(1, 3), sw=st.integers(1, 3), padding=st.sampled_from(["VALID", "SAME"]),
    op=st.sampled_from(["max", "avg"]),
)
def test_pool_sizes_hypothesis(h, w, wh, ww, sh, sw, padding, op):
    if padding == "VALID" and (h < wh or w < ww):
        return  # no output; rejected, see test_window_larger_than_input
    x = distinct((1, h, w, 2), seed=h * 10 + w)
    fn = max_pool if op == "max" else avg_pool
    pads = resolve(padding, (h, w), (wh, ww), (sh, sw))
    want = np_pool(x, (wh, ww), (sh, sw), pads, op)
    got = fn(jnp.asarray(x), (wh, ww), (sh, sw), padding)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- PyTorch


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)])
@pytest.mark.parametrize("op", ["max", "avg"])
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_pool_2d_matches_pytorch(kernel, stride, padding, op, count_include_pad):
    torch = pytest.importorskip("torch")
    x = distinct((2, 5, 6, 3))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)  # NHWC -> NCHW
    if op == "max":
        want = torch.nn.MaxPool2d(kernel, stride, padding)(xt)
        got = MaxPool2D(kernel, stride, padding).apply({}, jnp.asarray(x))
    else:
        want = torch.nn.AvgPool2d(kernel, stride, padding, count_include_pad=count_include_pad)(xt)
        got = AvgPool2D(kernel, stride, padding, count_include_pad).apply({}, jnp.asarray(x))
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["max", "avg"])
def test_pool_1d_matches_pytorch(op):
    torch = pytest.importorskip("torch")
    x = distinct((2, 9, 3))
    xt = torch.from_numpy(x).permute(0, 2, 1)  # NWC -> NCW
    layer, ours = (torch.nn.MaxPool1d, MaxPool1D) if op == "max" else (torch.nn.AvgPool1d,
                                                                      AvgPool1D)
    want = layer(3, 2, 1)(xt).permute(0, 2, 1).numpy()
    np.testing.assert_allclose(ours(3, 2, 1).apply({}, jnp.asarray(x)), want, rtol=1e-5)


# -------------------------------------------- fast path vs reduce_window


def reduce_window_pool(x, window, op):
    """The general lax path, written out here as the reference for the fast path."""
    dims = (1, *window, 1)
    if op == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, dims, dims, "VALID")
    return lax.reduce_window(x, 0.0, lax.add, dims, dims, "VALID") / math.prod(window)


@pytest.mark.parametrize("op", ["max", "avg"])
@pytest.mark.parametrize("shape,window", [((2, 4, 6, 3), (2, 2)), ((2, 6, 6, 1), (3, 2)),
                                          ((2, 8, 3), (4,))])
def test_reshape_path_equals_reduce_window(op, shape, window):
    fn = max_pool if op == "max" else avg_pool
    x = jnp.asarray(distinct(shape))
    jaxpr = str(jax.make_jaxpr(lambda x: fn(x, window))(x))
    assert "reduce_window" not in jaxpr  # the reshape path was taken
    np.testing.assert_array_equal(fn(x, window), reduce_window_pool(x, window, op))
    weights = jnp.asarray(distinct(fn(x, window).shape, seed=1))
    grad_fast = jax.grad(lambda x: jnp.sum(weights * fn(x, window)))(x)
    grad_ref = jax.grad(lambda x: jnp.sum(weights * reduce_window_pool(x, window, op)))(x)
    np.testing.assert_allclose(grad_fast, grad_ref, rtol=1e-6)


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_bfloat16_avg_pool_general_path_sums_in_float32(count_include_pad):
    """bf16: the reduce_window path sums in float32 like the reshape path's mean,
    so the same windows give the same values on both paths."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 9, 8)) + 3, jnp.bfloat16)
    fast = avg_pool(x[:, :8, :8], 4, count_include_pad=count_include_pad)  # reshape path
    general = avg_pool(x, 4, count_include_pad=count_include_pad)  # drops the last row: lax
    assert general.dtype == jnp.bfloat16
    np.testing.assert_array_equal(general[:, :2, :2], fast)


def test_general_path_uses_reduce_window():
    x = jnp.asarray(distinct((1, 5, 5, 1)))
    assert "reduce_window" in str(jax.make_jaxpr(lambda x: max_pool(x, 2))(x))


@pytest.mark.parametrize("shape,window", [
    ((2, 4, 6, 3), (2, 2)),   # the benchmark CNN's pooling
    ((2, 6, 6, 1), (3, 2)),
    ((1, 4, 4, 2), (4, 4)),   # 16 cells: the last size marked cell by cell
    ((1, 10, 4, 2), (5, 4)),  # 20 cells: the position-minimum path
    ((2, 12, 3), (3,)),       # 1-D
])
def test_max_gradient_with_ties_goes_to_the_first_maximum(shape, window):
    """Integer inputs tie often: every path sends a window's gradient to its first
    maximum in row-major order, as reduce_window (and PyTorch) do."""
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, shape).astype(np.float32))
    assert "reduce_window" not in str(jax.make_jaxpr(lambda x: max_pool(x, window))(x))
    weights = jnp.asarray(distinct(max_pool(x, window).shape, seed=2))
    ours = jax.grad(lambda x: jnp.sum(weights * max_pool(x, window)))(x)
    want = jax.grad(lambda x: jnp.sum(weights * reduce_window_pool(x, window, "max")))(x)
    np.testing.assert_array_equal(ours, want)
    # Forward mode: the tangent of the first maximum.
    tangent = jnp.asarray(distinct(shape, seed=3))
    np.testing.assert_array_equal(
        jax.jvp(lambda x: max_pool(x, window), (x,), (tangent,))[1],
        jax.jvp(lambda x: reduce_window_pool(x, window, "max"), (x,), (tangent,))[1])


def test_max_pool_gradient_program_has_no_tie_count():
    """The reshape path's backward is a select: no per-window tie count or division
    (which a plain reduction's derivative computes for every cell)."""
    x = jnp.asarray(distinct((2, 8, 8, 4)))
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(max_pool(x, 2))))).lower(
        x).compile().as_text()
    assert "divide(" not in hlo and "reduce-window(" not in hlo


def test_max_pool_second_order_gradients_float64():
    with jax.enable_x64(True):
        x = jnp.asarray(distinct((1, 4, 4, 2), dtype=np.float64))
        check_grads(lambda x: jnp.sin(max_pool(x, 2)), (x,), order=2, modes=("fwd", "rev"),
                    atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape,window", [((1, 2, 4, 1), (2, 2)), ((1, 5, 4, 1), (5, 4))])
def test_max_pool_hessian_with_ties_follows_the_first_maximum(shape, window):
    """Second order through the reshape path: the maximum's own derivative inside
    the rule follows the first maximum too (a plain max there split it among the
    ties, giving an asymmetric Hessian), as reduce_window's does."""
    x = jnp.asarray(np.random.default_rng(0).integers(0, 2, shape).astype(np.float32))
    direction = jnp.asarray(distinct(shape, seed=4))

    def hessian_times_direction(pool):
        grad = jax.grad(lambda x: jnp.sum(pool(x) ** 2))
        return jax.jvp(grad, (x,), (direction,))[1]

    np.testing.assert_array_equal(
        hessian_times_direction(lambda x: max_pool(x, window)),
        hessian_times_direction(lambda x: reduce_window_pool(x, window, "max")))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("op", ["max", "avg"])
@pytest.mark.parametrize("window,strides,padding", [(2, None, "VALID"), (3, 2, "SAME"),
                                                    (2, 1, 1)])
def test_pool_gradients_float64(op, window, strides, padding):
    fn = max_pool if op == "max" else avg_pool
    with jax.enable_x64(True):
        # values 0.1 apart: finite differences never reorder a window's maximum
        x = jnp.asarray(distinct((2, 4, 6, 2), dtype=np.float64))
        check_grads(lambda x: fn(x, window, strides, padding), (x,), order=1,
                    modes=("rev",), atol=1e-6, rtol=1e-6)
        if op == "avg":
            check_grads(lambda x: avg_pool(x, window, strides, padding, False), (x,),
                        order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_global_pool_gradients_float64():
    with jax.enable_x64(True):
        x = jnp.asarray(distinct((2, 3, 4, 2), dtype=np.float64))
        for module in (GlobalAvgPool(), GlobalMaxPool()):
            check_grads(lambda x, m=module: m.apply({}, x), (x,), order=1, modes=("rev",),
                        atol=1e-6, rtol=1e-6)


# ------------------------------------------------- global pools, flatten


@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 3, 4, 3)])
def test_global_pools_match_numpy(shape):
    x = distinct(shape)
    flat = x.reshape(shape[0], -1, shape[-1])  # [B, positions, C]
    want_avg = np.array([[flat[b, :, c].sum() / flat.shape[1] for c in range(shape[-1])]
                         for b in range(shape[0])])
    want_max = np.array([[max(flat[b, :, c]) for c in range(shape[-1])]
                         for b in range(shape[0])])
    np.testing.assert_allclose(GlobalAvgPool().apply({}, jnp.asarray(x)), want_avg, rtol=1e-5)
    np.testing.assert_allclose(GlobalMaxPool().apply({}, jnp.asarray(x)), want_max, rtol=1e-6)


def test_flatten():
    x = distinct((2, 3, 4, 5))
    y = Flatten().apply({}, jnp.asarray(x))
    assert y.shape == (2, 60)
    np.testing.assert_array_equal(y[1], x[1].ravel())  # row-major, batch kept
    ids = Flatten().apply({}, jnp.zeros((2, 3, 4), jnp.int32))  # integers are fine
    assert ids.shape == (2, 12) and ids.dtype == jnp.int32


# ---------------------------------------------------------- jit and vmap

MODULES = [
    (MaxPool1D(2), (2, 6, 3)), (AvgPool1D(3, 2, "SAME"), (2, 7, 3)),
    (MaxPool2D(2), (2, 4, 4, 3)), (MaxPool2D(3, 2, "SAME"), (2, 5, 5, 3)),
    (AvgPool2D(2), (2, 4, 4, 3)), (AvgPool2D(3, 1, 1, count_include_pad=False), (2, 5, 5, 3)),
    (GlobalAvgPool(), (2, 4, 4, 3)), (GlobalMaxPool(), (2, 4, 4, 3)), (Flatten(), (2, 4, 4, 3)),
]


@pytest.mark.parametrize("module,shape", MODULES, ids=lambda m: type(m).__name__)
def test_jit_and_vmap_match_eager(module, shape):
    x = jnp.asarray(distinct((3, *shape)))  # leading axis: an ensemble to vmap over
    eager = jnp.stack([module.apply({}, xi) for xi in x])
    np.testing.assert_allclose(jax.jit(module.apply)({}, x[0]), eager[0], rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(module.apply, (None, 0))({}, x), eager, rtol=1e-6)


# ----------------------------------------------------------- bad inputs


def test_wrong_rank_names_layer_and_shape():
    with pytest.raises(ShapeError, match=r"MaxPool2D .*\[batch, height, width, channels\].*"
                                         r"\(4, 4, 3\)"):
        MaxPool2D(2).apply({}, jnp.zeros((4, 4, 3)))
    with pytest.raises(ShapeError, match=r"AvgPool1D .*\[batch, width, channels\].*\(2, 4, 4, 3\)"):
        AvgPool1D(2).apply({}, jnp.zeros((2, 4, 4, 3)))
    with pytest.raises(ShapeError, match=r"max_pool .*\[batch, \*spatial, channels\].*\(4, 3\)"):
        max_pool(jnp.zeros((4, 3)), 2)


def test_integer_input_rejected():
    with pytest.raises(TypeError, match=r"AvgPool2D expected floating-point.*int32"):
        AvgPool2D(2).apply({}, jnp.zeros((1, 4, 4, 1), jnp.int32))
    with pytest.raises(TypeError, match=r"MaxPool1D expected floating-point.*int32"):
        MaxPool1D(2).apply({}, jnp.zeros((1, 4, 1), jnp.int32))


def test_bad_window_and_strides():
    x = jnp.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError, match=r"MaxPool2D expected window .*2 positive.*\(2, 2, 2\)"):
        MaxPool2D((2, 2, 2)).apply({}, x)
    with pytest.raises(ValueError, match=r"avg_pool expected strides .*positive.*0"):
        avg_pool(x, 2, 0)


def test_bad_padding():
    x = jnp.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError, match=r"MaxPool2D padding must be .*'FULL'"):
        MaxPool2D(2, padding="FULL").apply({}, x)
    with pytest.raises(ValueError, match=r"AvgPool2D padding must be .*\(\(1, 1\),\)"):
        AvgPool2D(2, padding=[(1, 1)]).apply({}, x)
    with pytest.raises(ValueError, match=r"max_pool padding must be .*non-negative"):
        max_pool(x, 2, padding=-1)


def test_window_larger_than_input():
    with pytest.raises(ShapeError, match=r"MaxPool2D window \(3, 3\) is larger.*\(1, 2, 5, 1\)"):
        MaxPool2D(3).apply({}, jnp.zeros((1, 2, 5, 1)))


def test_global_pools_and_flatten_reject_bad_rank():
    with pytest.raises(ShapeError, match=r"GlobalAvgPool .*\[batch, \*spatial, channels\].*"
                                         r"\(2, 3\)"):
        GlobalAvgPool().apply({}, jnp.zeros((2, 3)))
    with pytest.raises(ShapeError, match=r"GlobalMaxPool .*\(2, 3\)"):
        GlobalMaxPool().apply({}, jnp.zeros((2, 3)))
    with pytest.raises(ShapeError, match=r"Flatten .*\[batch, \.\.\.\].*\(5,\)"):
        Flatten().apply({}, jnp.zeros((5,)))
