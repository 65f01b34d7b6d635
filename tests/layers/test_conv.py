"""Conv1D / Conv2D / ConvBlock against numpy loops and PyTorch."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from nnlib.layers._checks import ShapeError
from nnlib.layers.conv import Conv1D, Conv2D, ConvBlock1D, ConvBlock2D

KEY = jax.random.key(0)

# ---------------------------------------------------------------- reference


def same_pads(size, span, stride):
    """TensorFlow's SAME rule: ceil(size / stride) outputs, the odd pad after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def resolve(padding, spatial, kernel, strides, dilation):
    n = len(spatial)
    if padding == "SAME":
        spans = [(kernel[i] - 1) * dilation[i] + 1 for i in range(n)]
        return [same_pads(spatial[i], spans[i], strides[i]) for i in range(n)]
    if padding == "VALID":
        return [(0, 0)] * n
    if isinstance(padding, int):
        return [(padding, padding)] * n
    return [tuple(p) for p in padding]


def np_conv(x, kernel, bias, strides, pads, dilation, groups):
    """Cross-correlation with explicit loops over output positions and taps.

    x: [B, *S, C]; kernel: [*K, C / groups, F]; bias: [F] or None.
    """
    x = np.pad(np.asarray(x, np.float64), [(0, 0), *pads, (0, 0)])
    kernel = np.asarray(kernel, np.float64)
    n = x.ndim - 2
    *ks, cg, f = kernel.shape
    fg = f // groups
    out = [(x.shape[1 + i] - (ks[i] - 1) * dilation[i] - 1) // strides[i] + 1 for i in range(n)]
    y = np.zeros((x.shape[0], *out, f))
    for o in itertools.product(*(range(k) for k in out)):
        for t in itertools.product(*(range(k) for k in ks)):
            pos = tuple(o[i] * strides[i] + t[i] * dilation[i] for i in range(n))
            patch = x[(slice(None), *pos)]  # [B, C]
            for g in range(groups):
                w = kernel[t][:, g * fg:(g + 1) * fg]  # [C / groups, F / groups]
                y[(slice(None), *o, slice(g * fg, (g + 1) * fg))] += (
                    patch[:, g * cg:(g + 1) * cg] @ w
                )
    return y if bias is None else y + np.asarray(bias, np.float64)


def normal(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def numpy_variables(module, x, seed=1, dtype=np.float32):
    """Variables with the shapes ``init`` would give, filled from numpy.

    Conv parameters (bias included, so adding it is tested) are N(0, 0.5^2);
    normalization parameters and batch statistics are as initialised (scale 1,
    bias 0, running mean 0, running var 1). Building them from
    ``eval_shape`` skips compiling a PRNG kernel per shape, which dominated the
    run time of this file.
    """
    shapes = jax.eval_shape(module.init, KEY, x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            ones = name.endswith(("['scale']", "['var']"))
            return jnp.full(leaf.shape, 1.0 if ones else 0.0, dtype)
        return jnp.asarray(0.5 * rng.normal(size=leaf.shape).astype(dtype))

    return jax.tree_util.tree_map_with_path(fill, shapes)


def check_against_numpy(module, x, strides, padding, dilation, groups, rtol=1e-5):
    params = numpy_variables(module, x)["params"]
    y = module.apply({"params": params}, x)
    kernel = params["kernel"]
    n = x.ndim - 2
    pads = resolve(padding, x.shape[1:-1], kernel.shape[:n], strides, dilation)
    want = np_conv(x, kernel, params.get("bias"), strides, pads, dilation, groups)
    np.testing.assert_allclose(y, want, rtol=rtol, atol=rtol)
    return y


# ----------------------------------------------------------------- vs numpy

CASES_2D = [
    # kernel, strides, padding, dilation, groups
    ((3, 3), (1, 1), "SAME", (1, 1), 1),
    ((3, 2), (2, 1), "SAME", (1, 1), 1),  # even kernel: odd padding goes after
    ((3, 3), (1, 1), "VALID", (1, 1), 1),
    ((2, 3), (2, 2), "VALID", (1, 1), 1),
    ((3, 3), (1, 1), "SAME", (2, 1), 1),  # dilation
    ((3, 3), (2, 1), 1, (1, 2), 1),  # PyTorch-style int padding
    ((2, 2), (1, 1), ((1, 0), (0, 2)), (1, 1), 1),
    ((3, 3), (1, 1), "SAME", (1, 1), 2),  # grouped
    ((3, 3), (1, 1), "VALID", (1, 1), 4),  # depthwise (channels == groups)
]


@pytest.mark.parametrize("kernel,strides,padding,dilation,groups", CASES_2D)
def test_conv2d_matches_numpy(kernel, strides, padding, dilation, groups):
    x = jnp.asarray(normal((2, 6, 7, 4)))
    module = Conv2D(8, kernel, strides, padding, dilation, groups)
    y = check_against_numpy(module, x, strides, padding, dilation, groups)
    assert y.shape[-1] == 8


@pytest.mark.parametrize("kernel,strides,padding,dilation,groups", [
    (3, 1, "SAME", 1, 1), (4, 2, "SAME", 1, 1), (3, 1, "VALID", 2, 1), (3, 2, 2, 1, 1),
    (2, 1, [(0, 3)], 1, 2), (5, 1, "SAME", 1, 4),
])
def test_conv1d_matches_numpy(kernel, strides, padding, dilation, groups):
    x = jnp.asarray(normal((2, 9, 4)))
    module = Conv1D(4, kernel, strides, padding, dilation, groups)
    check_against_numpy(module, x, (strides,), padding, (dilation,), groups)


def test_param_layout_and_no_bias():
    variables = Conv2D(6, (3, 2), groups=2).init(KEY, jnp.zeros((1, 5, 5, 4)))
    assert variables["params"]["kernel"].shape == (3, 2, 2, 6)  # [KH, KW, C / g, F]
    assert variables["params"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(variables["params"]["bias"], jnp.zeros(6))
    shapes = jax.eval_shape(Conv1D(3, 5, use_bias=False).init, KEY, jnp.zeros((1, 5, 2)))
    assert set(shapes["params"]) == {"kernel"}
    assert shapes["params"]["kernel"].shape == (5, 2, 3)


@settings(max_examples=10, deadline=None)
@given(
    h=st.integers(1, 6), w=st.integers(1, 6), c=st.sampled_from([1, 2, 4]),
    groups=st.sampled_from([1, 2]), kh=st.integers(1, 3), kw=st.integers(1, 3),
    sh=st.integers(1, 2), sw=st.integers(1, 2), dh=st.integers(1, 2),
    padding=st.sampled_from(["SAME", "VALID", 1]),
)
def test_conv2d_sizes_hypothesis(h, w, c, groups, kh, kw, sh, sw, dh, padding):
    if c % groups:
        groups = 1
    pads = resolve(padding, (h, w), (kh, kw), (sh, sw), (dh, 1))
    if h + sum(pads[0]) < (kh - 1) * dh + 1 or w + sum(pads[1]) < kw:
        return  # kernel larger than the input: rejected, see test_kernel_larger_than_input
    x = jnp.asarray(normal((2, h, w, c), seed=h * 7 + w))
    module = Conv2D(2 * groups, (kh, kw), (sh, sw), padding, (dh, 1), groups)
    check_against_numpy(module, x, (sh, sw), padding, (dh, 1), groups)


# ------------------------------------------------------------------ PyTorch


def torch_to_params(layer):
    """PyTorch [F, C / g, *K] weight -> nnlib [*K, C / g, F] kernel."""
    weight = layer.weight.detach().numpy()
    kernel = np.transpose(weight, (*range(2, weight.ndim), 1, 0))
    return {"params": {"kernel": jnp.asarray(kernel),
                       "bias": jnp.asarray(layer.bias.detach().numpy())}}


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups", [
    (3, 1, 1, 1, 1), (3, 2, 0, 1, 1), ((3, 2), (2, 1), (1, 0), (1, 2), 2), (3, 1, 2, 2, 4),
])
def test_conv2d_matches_pytorch(kernel, stride, padding, dilation, groups):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(4, 8, kernel, stride, padding, dilation, groups)
    x = normal((2, 7, 6, 4))
    want = layer(torch.from_numpy(x).permute(0, 3, 1, 2))  # NHWC -> NCHW
    pad = (padding, padding) if isinstance(padding, int) else padding
    ours = Conv2D(8, kernel, stride, [(p, p) for p in pad], dilation, groups)
    got = ours.apply(torch_to_params(layer), jnp.asarray(x))
    np.testing.assert_allclose(got, want.detach().permute(0, 2, 3, 1).numpy(), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups", [
    (3, 1, 1, 1, 1), (4, 2, 0, 1, 2), (3, 1, 2, 2, 4),
])
def test_conv1d_matches_pytorch(kernel, stride, padding, dilation, groups):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.Conv1d(4, 8, kernel, stride, padding, dilation, groups)
    x = normal((2, 10, 4))
    want = layer(torch.from_numpy(x).permute(0, 2, 1))  # NWC -> NCW
    ours = Conv1D(8, kernel, stride, padding, dilation, groups)
    got = ours.apply(torch_to_params(layer), jnp.asarray(x))
    np.testing.assert_allclose(got, want.detach().permute(0, 2, 1).numpy(), rtol=1e-5,
                               atol=1e-5)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("module,shape", [
    (Conv1D(3, 3, 2, "SAME", 1, 1), (2, 7, 2)),
    (Conv2D(4, 3, (2, 1), "SAME", (1, 2), 2), (2, 5, 6, 2)),
])
def test_conv_gradients_float64(module, shape):
    with jax.enable_x64(True):
        x = jnp.asarray(normal(shape, dtype=np.float64))
        params = numpy_variables(module, x, dtype=np.float64)["params"]
        check_grads(lambda x, p: jnp.tanh(module.apply({"params": p}, x)), (x, params),
                    order=2, modes=("rev",), atol=1e-6, rtol=1e-6)


# ------------------------------------------ few input channels: shifted products

SHIFTED = [
    # make(**kwargs) -> layer, input shape; each takes ``shifted_conv`` on the CPU
    (lambda **k: Conv2D(6, 3, **k), (3, 8, 7, 1)),  # an image's first layer
    (lambda **k: Conv2D(5, (3, 2), padding=((2, 0), (1, 1)), **k), (2, 6, 9, 3)),
    (lambda **k: Conv2D(4, 5, padding="VALID", **k), (2, 9, 8, 1)),
    (lambda **k: Conv2D(4, 7, padding=4, **k), (2, 6, 6, 1)),  # padding beyond the kernel
    (lambda **k: Conv1D(4, 5, **k), (3, 12, 2)),
]


def forward_program(layer, x, params):
    return str(jax.make_jaxpr(lambda p, x: layer.apply({"params": p}, x))(params, x))


@pytest.mark.parametrize("make,shape", SHIFTED)
def test_few_channel_convolutions_take_the_shifted_products(make, shape):
    """Forward without XLA's convolution, equal to numpy's loops and to
    ``native=False``; gradients of the parameters and the input equal XLA's."""
    layer, plain = make(), make(native=False)
    x = jnp.asarray(normal(shape, seed=3))
    params = numpy_variables(layer, x)["params"]
    assert "conv_general_dilated" not in forward_program(layer, x, params)
    assert "conv_general_dilated" in forward_program(plain, x, params)
    n = x.ndim - 2
    pads = resolve(layer.padding, x.shape[1:-1], params["kernel"].shape[:n], (1,) * n, (1,) * n)
    y = layer.apply({"params": params}, x)
    np.testing.assert_allclose(
        y, np_conv(x, params["kernel"], params["bias"], (1,) * n, pads, (1,) * n, 1),
        rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, plain.apply({"params": params}, x), rtol=1e-5, atol=1e-5)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply({"params": p}, x)))

    got, want = jax.grad(loss(layer), (0, 1))(params, x), jax.grad(loss(plain), (0, 1))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_shifted_conv_every_derivative():
    """Forward mode and second order by finite differences (and equal to XLA's
    convolution's), per-example (vmap over data) and ensemble (vmap over
    kernels) gradients."""
    from nnlib.layers.conv import shifted_conv

    x = jnp.asarray(normal((3, 6, 5, 2), seed=4))
    w = jnp.asarray(normal((3, 3, 2, 4), seed=5)) * 0.5
    pads = ((1, 1), (2, 0))

    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), pads,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def f(x, w):
        return shifted_conv(x, w, pads)

    def close(a, b):
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4)

    check_grads(f, (x, w), order=2, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)
    tangents = (jnp.ones_like(x), -w)
    close(jax.jvp(f, (x, w), tangents), jax.jvp(xla, (x, w), tangents))
    close(jax.jvp(lambda w: f(x, w), (w,), (w,)), jax.jvp(lambda w: xla(x, w), (w,), (w,)))

    def loss(conv):
        return lambda w, x: jnp.sum(jnp.sin(conv(x, w)))

    hvp = lambda conv: jax.jvp(jax.grad(loss(conv)), (w, x), (w, x))[1]  # noqa: E731
    close(hvp(f), hvp(xla))
    per_example = lambda conv: jax.vmap(  # noqa: E731
        jax.grad(lambda w, xi: loss(conv)(w, xi[None])), (None, 0))(w, x)
    close(per_example(f), per_example(xla))
    ensemble = jnp.stack([w, 2 * w, -w])
    close(jax.vmap(jax.grad(loss(f)), (0, None))(ensemble, x),
          jax.vmap(jax.grad(loss(xla)), (0, None))(ensemble, x))


def test_an_intercepted_convolution_stays_a_convolution(monkeypatch):
    """While something replaces ``lax.conv_general_dilated`` (qwix does, to
    quantize), the CPU paths step aside and the layer calls it."""
    seen = []
    original = jax.lax.conv_general_dilated

    def intercepted(*args, **kwargs):
        seen.append(args[1].shape)
        return original(*args, **kwargs)

    layer = Conv2D(4, 3)
    x = jnp.asarray(normal((2, 6, 6, 1)))
    params = numpy_variables(layer, x)["params"]
    layer.apply({"params": params}, x)
    assert not seen  # the shifted products
    monkeypatch.setattr(jax.lax, "conv_general_dilated", intercepted)
    y = layer.apply({"params": params}, x)
    assert seen == [(3, 3, 1, 4)]
    monkeypatch.undo()
    np.testing.assert_allclose(y, layer.apply({"params": params}, x), rtol=1e-5, atol=1e-5)


def test_shifted_products_only_where_they_apply():
    """Strided, dilated, grouped, many-tap (3x3 over 8 channels), bfloat16 and
    float64 convolutions stay XLA's convolution."""
    x = jnp.asarray(normal((2, 7, 7, 2)))
    x8 = jnp.asarray(normal((2, 7, 7, 8)))
    for layer, inputs in ((Conv2D(4, 3, strides=2), x), (Conv2D(4, 3, dilation=2), x),
                          (Conv2D(4, 3, groups=2), x), (Conv2D(4, 3), x8),
                          (Conv2D(4, 3), x.astype(jnp.bfloat16))):
        params = numpy_variables(layer, inputs)["params"]
        assert "conv_general_dilated" in forward_program(layer, inputs, params)
    with jax.enable_x64(True):
        x64 = jnp.asarray(normal((2, 7, 7, 2), dtype=np.float64))
        layer = Conv2D(4, 3, param_dtype=jnp.float64)
        params = numpy_variables(layer, x64, dtype=np.float64)["params"]
        assert "conv_general_dilated" in forward_program(layer, x64, params)


# ------------------------------------------------------------ jit and vmap

MODULES = [
    (Conv1D(4, 3), (2, 6, 3)),
    (Conv2D(4, 3, 2, "VALID", groups=1), (2, 6, 6, 2)),
    (ConvBlock1D(4, normalization="layer", pooling="avg"), (2, 6, 3)),
    (ConvBlock2D(4, normalization="batch", pooling="max"), (2, 6, 6, 3)),
]


@pytest.mark.parametrize("module,shape", MODULES, ids=lambda m: type(m).__name__)
def test_jit_and_vmap_match_eager(module, shape):
    x = jnp.asarray(normal((3, *shape)))  # leading axis: an ensemble to vmap over
    variables = numpy_variables(module, x[0])
    eager = jnp.stack([module.apply(variables, xi) for xi in x])
    np.testing.assert_allclose(jax.jit(module.apply)(variables, x[0]), eager[0], rtol=1e-5,
                               atol=1e-6)
    batched = jax.vmap(module.apply, (None, 0))(variables, x)
    np.testing.assert_allclose(batched, eager, rtol=1e-5, atol=1e-6)


def test_dtype_and_param_dtype():
    x = jnp.asarray(normal((1, 5, 5, 2)))
    module = Conv2D(3, 3, dtype=jnp.bfloat16, param_dtype=jnp.float16)
    variables = jax.eval_shape(module.init, KEY, x)
    assert variables["params"]["kernel"].dtype == jnp.float16
    assert jax.eval_shape(module.apply, variables, x).dtype == jnp.bfloat16


# --------------------------------------------------------------- ConvBlock


def test_conv_block_matches_composition():
    """conv -> relu -> max pool 2, computed from the block's own params in numpy."""
    x = jnp.asarray(normal((2, 6, 4, 3)))
    block = ConvBlock2D(5, 3, activation="relu", pooling="max")
    params = numpy_variables(block, x)["params"]
    conv = params["conv"]
    pads = resolve("SAME", (6, 4), (3, 3), (1, 1), (1, 1))
    h = np.maximum(np_conv(x, conv["kernel"], conv["bias"], (1, 1), pads, (1, 1), 1), 0.0)
    want = h.reshape(2, 3, 2, 2, 2, 5).max(axis=(2, 4))  # [B, 3, 2, 5]
    np.testing.assert_allclose(block.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)


def test_conv_block_1d_avg_pool_and_no_activation():
    x = jnp.asarray(normal((2, 8, 3)))
    block = ConvBlock1D(4, 3, activation=None, pooling="avg", pool_window=4)
    params = numpy_variables(block, x)["params"]
    conv = params["conv"]
    pads = resolve("SAME", (8,), (3,), (1,), (1,))
    h = np_conv(x, conv["kernel"], conv["bias"], (1,), pads, (1,), 1)
    want = h.reshape(2, 2, 4, 4).mean(axis=2)  # [B, 2, 4]
    np.testing.assert_allclose(block.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)


def test_conv_block_layer_norm_normalizes_channels():
    x = jnp.asarray(normal((2, 5, 5, 3)))
    block = ConvBlock2D(6, normalization="layer", activation=None)
    y = block.apply(numpy_variables(block, x), x)  # [B, H, W, 6]
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1.0, atol=1e-3)  # epsilon=1e-5 shrinks it a bit


def test_conv_block_batch_norm_updates_stats_only_in_train_mode():
    x = jnp.asarray(normal((4, 5, 5, 3)))
    block = ConvBlock2D(6, normalization="batch", use_bias=False)
    variables = numpy_variables(block, x)
    assert set(variables["batch_stats"]["norm"]) == {"mean", "var"}

    y_eval, updates = block.apply(variables, x, train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])

    _, updates = block.apply(variables, x, train=True, mutable=["batch_stats"])
    h = Conv2D(6, 3, use_bias=False).apply({"params": variables["params"]["conv"]}, x)
    batch_mean = np.asarray(h).reshape(-1, 6).mean(0)
    np.testing.assert_allclose(updates["batch_stats"]["norm"]["mean"], 0.1 * batch_mean,
                               rtol=1e-4, atol=1e-6)  # momentum 0.9 from zeros
    # evaluation reads the running statistics: before the update, (h - 0) / sqrt(1 + eps)
    np.testing.assert_allclose(y_eval, np.maximum(h / np.sqrt(1 + 1e-5), 0), rtol=1e-5,
                               atol=1e-6)


def test_conv_block_dropout_only_in_train():
    x = jnp.asarray(normal((2, 6, 3)))
    block = ConvBlock1D(8, dropout_rate=0.5, activation="tanh")
    no_dropout = ConvBlock1D(8, activation="tanh")
    variables = numpy_variables(block, x)
    clean = no_dropout.apply(variables, x)
    np.testing.assert_array_equal(block.apply(variables, x), clean)
    noisy = block.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    dropped = noisy == 0
    assert 0 < int(dropped.sum()) < dropped.size
    np.testing.assert_allclose(noisy[~dropped], 2 * clean[~dropped], rtol=1e-6)


# -------------------------------------------------------------- bad inputs


def test_unbatched_input_asks_for_batch_axis():
    with pytest.raises(ShapeError, match=r"Conv2D expected inputs of shape \[batch, height, "
                                         r"width, channels\].*\(5, 5, 3\).*x\[None\]"):
        Conv2D(4, 3).init(KEY, jnp.zeros((5, 5, 3)))
    with pytest.raises(ShapeError, match=r"Conv1D .*\[batch, width, channels\].*\(5, 3\)"
                                         r".*batch axis"):
        Conv1D(4, 3).init(KEY, jnp.zeros((5, 3)))


def test_wrong_rank():
    with pytest.raises(ShapeError, match=r"Conv1D expected .*\[batch, width, channels\] "
                                         r"\(rank 3\), got shape \(2, 5, 5, 3\)"):
        Conv1D(4, 3).init(KEY, jnp.zeros((2, 5, 5, 3)))
    with pytest.raises(ShapeError, match=r"ConvBlock2D expected .*\(2, 5\)"):
        ConvBlock2D(4).init(KEY, jnp.zeros((2, 5)))


def test_channel_mismatch_after_init():
    variables = numpy_variables(Conv2D(4, 3), jnp.zeros((1, 5, 5, 3)))
    with pytest.raises(ShapeError, match=r"Conv2D expected .*channels=3.*\(1, 5, 5, 2\)"):
        Conv2D(4, 3).apply(variables, jnp.zeros((1, 5, 5, 2)))
    grouped = numpy_variables(Conv1D(4, 3, groups=2), jnp.zeros((1, 5, 6)))
    with pytest.raises(ShapeError, match=r"Conv1D expected .*channels=6.*\(1, 5, 4\)"):
        Conv1D(4, 3, groups=2).apply(grouped, jnp.zeros((1, 5, 4)))
    block = numpy_variables(ConvBlock2D(4), jnp.zeros((1, 5, 5, 3)))
    with pytest.raises(ShapeError, match=r"ConvBlock2D expected .*channels=3.*\(1, 5, 5, 1\)"):
        ConvBlock2D(4).apply(block, jnp.zeros((1, 5, 5, 1)))


def test_integer_input_rejected():
    with pytest.raises(TypeError, match=r"Conv2D expected floating-point .*int32.*"
                                        r"\(1, 5, 5, 3\)"):
        Conv2D(4, 3).init(KEY, jnp.zeros((1, 5, 5, 3), jnp.int32))


def test_groups_must_divide_channels_and_features():
    with pytest.raises(ValueError, match=r"Conv2D groups=2 must divide .*channels=3"):
        Conv2D(4, 3, groups=2).init(KEY, jnp.zeros((1, 5, 5, 3)))
    with pytest.raises(ValueError, match=r"Conv1D groups=2 must divide .*features=3"):
        Conv1D(3, 3, groups=2).init(KEY, jnp.zeros((1, 5, 4)))


def test_bad_kernel_size_and_padding():
    x = jnp.zeros((1, 5, 5, 3))
    with pytest.raises(ValueError, match=r"Conv2D expected kernel_size .*2 positive.*\(3, 3, 3\)"):
        Conv2D(4, (3, 3, 3)).init(KEY, x)
    with pytest.raises(ValueError, match=r"Conv2D expected dilation .*0"):
        Conv2D(4, 3, dilation=0).init(KEY, x)
    with pytest.raises(ValueError, match=r"Conv2D padding must be .*'CIRCULAR'"):
        Conv2D(4, 3, padding="CIRCULAR").init(KEY, x)
    with pytest.raises(ValueError, match=r"Conv1D padding must be .*1 \(low, high\)"):
        Conv1D(4, 3, padding=[(1, 1), (1, 1)]).init(KEY, jnp.zeros((1, 5, 3)))


def test_kernel_larger_than_input():
    with pytest.raises(ShapeError, match=r"Conv2D kernel_size=\(3, 3\) with dilation=\(2, 2\) "
                                         r"spans \(5, 5\).*\(1, 4, 8, 1\)"):
        Conv2D(4, 3, padding="VALID", dilation=2).init(KEY, jnp.zeros((1, 4, 8, 1)))


def test_block_bad_options():
    x = jnp.zeros((1, 5, 5, 3))
    with pytest.raises(ValueError, match=r"ConvBlock2D normalization .*'group'"):
        ConvBlock2D(4, normalization="group").init(KEY, x)
    with pytest.raises(ValueError, match=r"ConvBlock1D pooling .*'min'"):
        ConvBlock1D(4, pooling="min").init(KEY, jnp.zeros((1, 5, 3)))
