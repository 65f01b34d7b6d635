"""nnlib.explain against closed forms, numpy references and naive loops.

Independent truths used here:

* a linear model ``x . W + b``: saliency is ``|W[:, t]|``, gradient x input
  ``x * W[:, t]``, integrated gradients exactly ``(x - x') * W[:, t]`` for any
  quadrature whose weights sum to 1, SmoothGrad ``W[:, t]`` whatever the noise,
  and occlusion drops ``sum_window (x - v) W[:, t]``;
* a tanh MLP with its input gradient written by hand in numpy (float64), so
  saliency, IG (trapezoid and Gauss-Legendre built in numpy) and SmoothGrad
  (the documented noise, ``fold_in(key, s)``) are reproduced step by step;
* central finite differences of a ReLU CNN in float64;
* completeness of IG (``sum IG = f(x) - f(x')``) on nnlib's CNN and a digits
  MLP trained with nnlib.train; positive homogeneity of a bias-free ReLU MLP
  (``grad`` constant along the path from 0, so IG is gradient x input);
* Grad-CAM of a global-average-pooled linear head is CAM (Zhou et al. 2016),
  ``ReLU(A . W[:, t])``, computed in numpy from captured intermediates; and
  the intercepted Grad-CAM equals the one of a head written by hand in jnp;
* occlusion against a Python loop over windows; attention rollout against a
  numpy loop; Spearman's rho against scipy;
* the randomization check: 1.0 for an unchanged model, far below for a
  randomized trained one (Adebayo et al. 2018).

Speed: models are initialized under ``jax.jit``; methods take
``Partial(apply, variables)`` so compiled programs are shared across tests.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.tree_util import Partial

from nnlib.data import load_digits
from nnlib.explain import (
    HEAD_FUSIONS,
    IG_METHODS,
    attention_map,
    attention_rollout,
    collect_attention_weights,
    completeness_gap,
    grad_cam,
    grad_cam_from_split,
    gradient_x_input,
    integrated_gradients,
    layer_names,
    model_randomization_check,
    occlusion,
    saliency,
    smoothgrad,
    spearman_rank_correlation,
)
from nnlib.layers import MLP, TransformerEncoder
from nnlib.layers._checks import ShapeError
from nnlib.models import CNN, MLPClassifier
from nnlib.train import TrainState, make_train_step

KEY = jax.random.key(0)


@pytest.fixture(autouse=True)
def strict():
    with jax.numpy_dtype_promotion("strict"):
        yield


# --- models -------------------------------------------------------------------------


def _linear_apply(w, b, x):
    return x.reshape(x.shape[0], -1) @ w + b  # [B, C]


def _linear(seed=0, features=12, classes=4):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(features, classes)).astype(np.float32)
    b = rng.normal(size=(classes,)).astype(np.float32)
    return Partial(_linear_apply, jnp.asarray(w), jnp.asarray(b)), w, b


def _tanh_apply(w1, b1, w2, b2, x):
    return jnp.tanh(x @ w1 + b1) @ w2 + b2


def _np_tanh_grad(params, x, t):
    """d logit_t / d x of tanh(x W1 + b1) W2 + b2, by hand: [B, D]."""
    w1, b1, w2, _ = params
    h = np.tanh(x @ w1 + b1)  # [B, H]
    return (w2[:, t].T * (1.0 - h * h)) @ w1.T


def _jit_init(model, x, seed=0):
    return jax.jit(model.init)(jax.random.key(seed), x)


@pytest.fixture(scope="module")
def cnn():
    """nnlib's CNN at digits size, with small random biases.

    Freshly initialized biases are 0, which puts every ReLU exactly at its
    kink at a zero baseline (see ``integrated_gradients``); a trained network
    has biases, so give it some.
    """
    model = CNN(features=(4, 8), hidden_sizes=(16,), num_classes=10)
    x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1))
    variables = _jit_init(model, x)
    noise = jax.random.key(2)
    variables = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.1 * jax.random.normal(jax.random.fold_in(noise, a.size), a.shape)
        if p[-1].key == "bias" else a, variables)
    return model, variables, x


@pytest.fixture(scope="module")
def digits():
    """MLPClassifier((32,)) trained 200 Adam steps on the 8x8 digits (~95% test)."""
    ds = load_digits()
    x, y = ds.train["inputs"], ds.train["labels"]  # [n, 8, 8, 1]
    model = MLPClassifier((32,), 10)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam promotes implicitly
        state = jax.jit(lambda k: TrainState.create(
            model=model, tx=optax.adam(1e-2), key=k, example_input=x[:1]))(KEY)
        step = jax.jit(make_train_step())
        rng = np.random.default_rng(0)
        for _ in range(200):
            idx = rng.choice(len(x), 128, replace=False)
            state, _ = step(state, {"inputs": x[idx], "labels": y[idx]})
    x_test = jnp.asarray(ds.test["inputs"][:16])
    return model, state.params, x_test


# --- saliency, gradient x input --------------------------------------------------------


def test_linear_model_saliency_and_gradient_x_input_are_the_weight_column():
    f, w, b = _linear()
    x = np.random.default_rng(1).normal(size=(5, 3, 4)).astype(np.float32)
    t = np.array([0, 3, 1, 2, 3], np.int32)
    column = w[:, t].T.reshape(x.shape)  # [B, 3, 4]
    np.testing.assert_allclose(saliency(f, x, t), np.abs(column), rtol=1e-6)
    np.testing.assert_allclose(saliency(f, x, t, absolute=False), column, rtol=1e-6)
    np.testing.assert_allclose(gradient_x_input(f, x, t), x * column, rtol=1e-6)
    predicted = np.argmax(x.reshape(5, -1) @ w + b, axis=1)
    np.testing.assert_allclose(saliency(f, x), np.abs(w[:, predicted].T.reshape(x.shape)),
                               rtol=1e-6)


def test_saliency_matches_finite_differences_on_relu_cnn(cnn):
    model, variables, x = cnn
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
        x64 = jnp.asarray(x, jnp.float64)
        t = np.array([1, 4, 7], np.int32)
        f = Partial(model.apply, v64)
        grads = np.asarray(saliency(f, x64, t, absolute=False))
        rng = np.random.default_rng(0)
        coords = [tuple(rng.integers(0, s) for s in x.shape[1:]) for _ in range(8)]
        eps = 1e-6
        bumps = np.zeros((2 * len(coords),) + x.shape, np.float64)  # [2k, B, 8, 8, 1]
        for k, c in enumerate(coords):
            bumps[2 * k][(slice(None),) + c] = eps
            bumps[2 * k + 1][(slice(None),) + c] = -eps
        rows = (np.asarray(x64)[None] + bumps).reshape((-1,) + x.shape[1:])
        logits = np.asarray(jax.jit(f)(jnp.asarray(rows))).reshape(2 * len(coords), 3, -1)
        scores = logits[:, np.arange(3), t]  # [2k, B]
        numeric = (scores[0::2] - scores[1::2]) / (2 * eps)  # [k, B]
        analytic = np.stack([grads[(slice(None),) + c] for c in coords])  # [k, B]
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


def test_gradients_match_numpy_tanh_mlp_in_float64():
    rng = np.random.default_rng(3)
    params = (rng.normal(size=(6, 5)), rng.normal(size=(5,)), rng.normal(size=(5, 3)),
              rng.normal(size=(3,)))
    x = rng.normal(size=(4, 6))
    base = rng.normal(size=(6,)) * 0.1  # one baseline for all examples
    t = np.array([0, 2, 1, 2], np.int32)
    key = jax.random.key(7)
    with jax.enable_x64(True):
        f = Partial(_tanh_apply, *(jnp.asarray(p) for p in params))
        xj = jnp.asarray(x)
        np.testing.assert_allclose(saliency(f, xj, t, absolute=False),
                                   _np_tanh_grad(params, x, t), rtol=1e-12)
        # IG: trapezoid on equally spaced points; Gauss-Legendre mapped to [0, 1].
        nodes, gl = np.polynomial.legendre.leggauss(6)
        rules = {"riemann_trapezoid": (np.linspace(0, 1, 9), np.r_[0.5, np.ones(7), 0.5] / 8),
                 "gauss_legendre": ((nodes + 1) / 2, gl / 2)}
        for method, (alphas, weights) in rules.items():
            path = sum(w * _np_tanh_grad(params, base + a * (x - base), t)
                       for a, w in zip(alphas, weights, strict=True))
            got = integrated_gradients(f, xj, t, baseline=base, steps=len(alphas),
                                       method=method, batch_size=4)
            np.testing.assert_allclose(got, (x - base) * path, rtol=1e-10, atol=1e-12)
        # SmoothGrad: sample s is x + noise_std * normal(fold_in(key, s)).
        noises = [0.3 * np.asarray(jax.random.normal(jax.random.fold_in(key, s), x.shape,
                                                     jnp.float64)) for s in range(5)]
        grads = [_np_tanh_grad(params, x + n, t) for n in noises]
        for squared, reference in [(False, np.mean(grads, 0)),
                                   (True, np.mean([g * g for g in grads], 0))]:
            got = smoothgrad(f, xj, t, key, num_samples=5, noise_std=0.3, squared=squared,
                             batch_size=2)
            np.testing.assert_allclose(got, reference, rtol=1e-10, atol=1e-12)


# --- integrated gradients ---------------------------------------------------------------


@pytest.mark.parametrize("method", IG_METHODS)
def test_integrated_gradients_of_linear_model_is_closed_form(method):
    f, w, _ = _linear()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 12)).astype(np.float32)
    t = np.array([0, 3, 1, 2, 3], np.int32)
    for baseline in [None, rng.normal(size=(12,)).astype(np.float32),
                     rng.normal(size=(5, 12)).astype(np.float32)]:
        ig = integrated_gradients(f, x, t, baseline, steps=7, method=method)
        b = 0.0 if baseline is None else baseline
        np.testing.assert_allclose(ig, (x - b) * w[:, t].T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,steps", [("riemann_trapezoid", 128), ("gauss_legendre", 128)])
def test_integrated_gradients_completeness_on_cnn_and_trained_mlp(cnn, digits, method, steps):
    model, variables, x = cnn
    mlp, params, x_digits = digits
    for f, inputs in [(Partial(model.apply, variables), x),
                      (Partial(mlp.apply, {"params": params}), x_digits[:8])]:
        ig = integrated_gradients(f, inputs, steps=steps, method=method)
        logits = np.asarray(f(inputs), np.float64)
        t = logits.argmax(1)
        delta = logits[np.arange(len(t)), t] - np.asarray(f(jnp.zeros_like(inputs)),
                                                          np.float64)[np.arange(len(t)), t]
        total = np.asarray(ig, np.float64).reshape(len(t), -1).sum(1)
        assert np.all(np.abs(total - delta) <= 0.01 * np.abs(delta)), (total, delta)
        gap = np.asarray(completeness_gap(f, inputs, ig))
        np.testing.assert_allclose(gap, np.abs(total - delta) / np.abs(delta), atol=1e-4)


def test_completeness_gap_float16_divides_a_zero_difference_by_tiny_not_zero():
    # float16 rounds the 1e-12 floor to 0: the gap of a zero logit difference was 0 / 0.
    w = jnp.asarray([[1.0, 0.0], [-1.0, 2.0]], jnp.float16)
    f = lambda v: v @ w  # noqa: E731
    x = jnp.asarray([[1.0, 1.0], [0.5, 0.25]], jnp.float16)  # row 0: logit 0 difference 0
    attributions = x * w[:, 0]  # exact for a linear model: sums to the difference
    gap = np.asarray(completeness_gap(f, x, attributions, target=jnp.array([0, 0])))
    np.testing.assert_array_equal(gap, 0.0)


def test_bias_free_relu_mlp_ig_is_gradient_x_input_up_to_the_kink_at_zero():
    # f(a x) = a f(x) for a > 0, so the gradient is constant along the path
    # from 0, except at 0 itself where every ReLU sits at its kink (gradient 0).
    model = MLP((8, 8), out_features=3, use_bias=False)
    x = jax.random.normal(jax.random.key(4), (4, 5))
    f = Partial(model.apply, _jit_init(model, x))
    gxi = np.asarray(gradient_x_input(f, x))
    gl = integrated_gradients(f, x, steps=3, method="gauss_legendre")
    np.testing.assert_allclose(gl, gxi, rtol=1e-5, atol=1e-6)
    trapezoid = integrated_gradients(f, x, steps=11)
    np.testing.assert_allclose(trapezoid, (1 - 0.5 / 10) * gxi, rtol=1e-5, atol=1e-6)


def test_chunked_equals_unchunked(cnn):
    model, variables, x = cnn
    f = Partial(model.apply, variables)
    t = np.array([2, 5, 9], np.int32)
    whole = integrated_gradients(f, x, t, steps=10, batch_size=None)
    chunked = integrated_gradients(f, x, t, steps=10, batch_size=3)  # 4 chunks, 2 padding
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    whole = smoothgrad(f, x, t, KEY, num_samples=5, batch_size=None)
    chunked = smoothgrad(f, x, t, KEY, num_samples=5, batch_size=2)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)


def _norm_plus_linear_apply(v, w, x):
    return jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True)) * v + x @ w  # [B, C]


def test_integrated_gradients_chunk_padding_never_evaluates_the_baseline():
    # ||x|| v + x W is linear along the path from 0 (gradient x / ||x|| v_t + W[:, t]
    # there), so IG is exactly x * that; its gradient at 0 itself is NaN (0 / 0).
    # Gauss-Legendre never needs alpha = 0, and no chunking may evaluate it.
    rng = np.random.default_rng(11)
    v = rng.normal(size=(3,)).astype(np.float32)
    w = rng.normal(size=(6, 3)).astype(np.float32)
    f = Partial(_norm_plus_linear_apply, jnp.asarray(v), jnp.asarray(w))
    x = rng.normal(size=(2, 6)).astype(np.float32)
    t = np.array([0, 2], np.int32)
    expected = x * (x / np.linalg.norm(x, axis=1, keepdims=True) * v[t][:, None] + w[:, t].T)
    ig = integrated_gradients(f, x, t, steps=5, method="gauss_legendre",
                              batch_size=3)  # 2 chunks, 1 padding point
    np.testing.assert_allclose(ig, expected, rtol=1e-5, atol=1e-6)


def test_smoothgrad_properties():
    f, w, _ = _linear()
    x = np.random.default_rng(5).normal(size=(3, 12)).astype(np.float32)
    t = np.array([1, 0, 3], np.int32)
    # A linear model's gradient ignores the noise.
    np.testing.assert_allclose(smoothgrad(f, x, t, KEY, num_samples=4), w[:, t].T, rtol=1e-5)
    np.testing.assert_allclose(smoothgrad(f, x, t, KEY, num_samples=4, squared=True),
                               w[:, t].T ** 2, rtol=1e-5)


# --- Grad-CAM ------------------------------------------------------------------------------


def _captured_block(model, variables, x, layer):
    _, state = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True,
                                                mutable=["intermediates"]))(variables, x)
    return state["intermediates"][layer]["__call__"][0]


def test_grad_cam_of_global_pooled_linear_head_is_cam():
    model = CNN(features=(4, 6), hidden_sizes=(), num_classes=5, global_pool=True)
    x = jax.random.uniform(jax.random.key(5), (3, 8, 8, 1))
    variables = _jit_init(model, x)
    f = Partial(model.apply, variables)
    t = np.array([0, 3, 4], np.int32)
    maps = np.asarray(_captured_block(model, variables, x, "block_1"), np.float64)  # [3,2,2,6]
    w = np.asarray(variables["params"]["head"]["output"]["kernel"], np.float64)  # [6, 5]
    cam = np.maximum(np.einsum("bhwk,kb->bhw", maps, w[:, t]), 0.0)  # CAM, Zhou et al.
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0)  # all-zero stays 0
    assert np.sum(peak > 0) >= 2  # the maps under test are not all trivially 0
    np.testing.assert_allclose(grad_cam(f, x, t, layer="block_1", upsample=False), cam,
                               rtol=1e-5, atol=1e-6)
    up = grad_cam(f, x, t, layer="block_1", resize_method="nearest")  # 2x2 -> 8x8
    np.testing.assert_allclose(up, cam.repeat(4, axis=1).repeat(4, axis=2), rtol=1e-5,
                               atol=1e-6)
    smooth = np.asarray(grad_cam(f, x, t, layer="block_1"))  # bilinear
    assert smooth.shape == (3, 8, 8) and smooth.min() >= 0.0
    np.testing.assert_allclose(smooth.max(axis=(1, 2)), (peak[:, 0, 0] > 0) * 1.0, rtol=1e-6)


def _hand_head(kernel0, bias0, kernel1, bias1, maps):
    """CNN's flatten -> Dense -> ReLU -> Dense head, written out in jnp."""
    h = jax.nn.relu(maps.reshape(maps.shape[0], -1) @ kernel0 + bias0)
    return h @ kernel1 + bias1


def test_grad_cam_by_interception_equals_hand_split_model(cnn):
    model, variables, x = cnn
    f = Partial(model.apply, variables)
    head = variables["params"]["head"]
    head_fn = Partial(_hand_head, head["dense_0"]["kernel"], head["dense_0"]["bias"],
                      head["output"]["kernel"], head["output"]["bias"])
    features_fn = Partial(_captured_block, model, variables, layer="block_1")
    np.testing.assert_allclose(head_fn(features_fn(x)), f(x), rtol=1e-5, atol=1e-5)
    for t in [None, np.array([3, 3, 8], np.int32)]:
        np.testing.assert_allclose(grad_cam(f, x, t, layer="block_1"),
                                   grad_cam_from_split(features_fn, head_fn, x, t),
                                   rtol=1e-5, atol=1e-6)


# --- occlusion ------------------------------------------------------------------------------


def _naive_occlusion(score, x, window, stride, value):
    """Loop over every window position; ``score(x) -> [B]`` target logits."""
    x = np.asarray(x)
    (wh, ww), (sh, sw) = window, stride
    clean = score(x)
    total = np.zeros(x.shape[:3])
    count = np.zeros(x.shape[1:3])
    for i in range(0, x.shape[1] - wh + 1, sh):
        for j in range(0, x.shape[2] - ww + 1, sw):
            hidden = x.copy()
            hidden[:, i:i + wh, j:j + ww, :] = value
            total[:, i:i + wh, j:j + ww] += (clean - score(hidden))[:, None, None]
            count[i:i + wh, j:j + ww] += 1
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def test_occlusion_matches_naive_loop_on_cnn(cnn):
    model, variables, x = cnn
    f = Partial(model.apply, variables)
    t = np.array([0, 5, 9], np.int32)
    apply = jax.jit(f)

    def score(v):
        return np.asarray(apply(jnp.asarray(v, jnp.float32)))[np.arange(3), t]

    # 3x3 windows every 2 pixels leave the last row/column uncovered.
    for window, stride, value in [((3, 3), (2, 2), 0.0), ((2, 4), (1, 2), 0.5)]:
        expected = _naive_occlusion(score, x, window, stride, value)
        got = occlusion(f, x, t, window=window, stride=stride, baseline_value=value,
                        batch_size=4)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(occlusion(f, x, t, window=3, stride=2, batch_size=None),
                               _naive_occlusion(score, x, (3, 3), (2, 2), 0.0),
                               rtol=1e-4, atol=1e-5)


@settings(max_examples=5, deadline=None)
@given(height=st.integers(2, 5), width=st.integers(2, 5), channels=st.integers(1, 2),
       window=st.integers(1, 3), stride=st.integers(1, 3), seed=st.integers(0, 50))
def test_occlusion_of_linear_model_is_closed_form(height, width, channels, window, stride,
                                                  seed):
    window = (min(window, height), min(window, width))
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(height * width * channels, 3)).astype(np.float32)
    x = rng.normal(size=(2, height, width, channels)).astype(np.float32)
    t = np.array([0, 2], np.int32)
    wt = w[:, t].T.reshape(x.shape)  # [B, H, W, C]

    def score(v):  # the linear model, in numpy
        return (np.asarray(v, np.float64) * wt).reshape(2, -1).sum(1)

    expected = _naive_occlusion(score, x, window, (stride, stride), 0.25)
    with jax.numpy_dtype_promotion("strict"):
        f = Partial(_linear_apply, jnp.asarray(w), jnp.zeros(3, jnp.float32))
        got = occlusion(f, x, t, window=window, stride=stride, baseline_value=0.25)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


# --- attention --------------------------------------------------------------------------------


def _softmax_weights(rng, layers, batch, heads, time):
    z = rng.normal(size=(layers, batch, heads, time, time))
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _np_rollout(weights, fusion, residual):
    rollout = None
    for w in weights:
        a = {"mean": np.mean, "max": np.max, "min": np.min}[fusion](w.astype(np.float64), 1)
        if residual:
            a = 0.5 * a + 0.5 * np.eye(a.shape[-1])
        a = a / a.sum(-1, keepdims=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


@pytest.mark.parametrize("fusion,residual", list(itertools.product(HEAD_FUSIONS, [True, False])))
def test_attention_rollout_matches_numpy_loop(fusion, residual):
    weights = _softmax_weights(np.random.default_rng(6), 3, 2, 4, 5)
    got = attention_rollout(list(weights), head_fusion=fusion, add_residual=residual)
    np.testing.assert_allclose(got, _np_rollout(weights, fusion, residual), rtol=1e-5,
                               atol=1e-7)


def test_rollout_of_identity_attention_is_identity():
    eye = np.broadcast_to(np.eye(6, dtype=np.float32), (4, 2, 3, 6, 6))  # [L, B, H, T, T]
    for residual in [True, False]:
        rollout = attention_rollout(jnp.asarray(eye), add_residual=residual)  # stacked input
        np.testing.assert_allclose(rollout, np.broadcast_to(np.eye(6), (2, 6, 6)), atol=1e-7)


def test_attention_map_picks_layer_and_head():
    weights = list(_softmax_weights(np.random.default_rng(7), 2, 2, 3, 4))
    np.testing.assert_allclose(attention_map(weights, 1, 2), weights[1][:, 2])
    np.testing.assert_allclose(attention_map(weights, -1, -1), weights[1][:, 2])
    np.testing.assert_allclose(attention_map(weights, 0), weights[0].mean(1), rtol=1e-6)


def test_collect_attention_weights_matches_encoder_return_weights():
    encoder = TransformerEncoder(num_layers=2, num_heads=2, mlp_dim=16, dropout_rate=0.0)
    x = jax.random.normal(jax.random.key(8), (2, 5, 8))
    variables = _jit_init(encoder, x)
    _, expected = jax.jit(lambda x: encoder.apply(variables, x, return_weights=True))(x)
    got = collect_attention_weights(Partial(encoder.apply, variables), x)
    assert len(got) == 2
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6)
    # A caller that already asks for the weights still gets them back.
    asked = collect_attention_weights(Partial(encoder.apply, variables, return_weights=True),
                                      x, include=r"block_1/attention$")
    assert len(asked) == 1
    np.testing.assert_allclose(asked[0], expected[1], rtol=1e-6)
    rollout = attention_rollout(got)
    np.testing.assert_allclose(rollout.sum(-1), np.ones((2, 5)), rtol=1e-5)


# --- model randomization check ------------------------------------------------------------


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(8)
    a = rng.integers(0, 4, size=(3, 5, 4)).astype(np.float32)  # many ties
    b = a + rng.normal(size=a.shape).astype(np.float32)
    got = spearman_rank_correlation(a, b)
    expected = [stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(3)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(spearman_rank_correlation(a, a), 1.0, rtol=1e-6)


def test_layer_names_are_bottom_to_top(cnn):
    _, variables, _ = cnn
    assert layer_names(variables["params"]) == (
        "block_0/conv", "block_1/conv", "head/dense_0", "head/output")
    ones = {"kernel": np.ones((1, 1))}
    params = {"dense_10": ones, "dense_2": ones, "output": ones, "scale": np.ones(1)}
    assert layer_names(params) == ("dense_2", "dense_10", "output", "scale")


def test_model_randomization_drops_correlation_of_trained_mlp(digits):
    model, params, x = digits

    def explain(p, x, t):
        return saliency(Partial(model.apply, {"params": p}), x, t)

    t = jnp.argmax(model.apply({"params": params}, x), axis=-1)
    same = model_randomization_check(explain, params, x, t, key=KEY,
                                     randomize_fn=lambda key, path, leaf: leaf)
    np.testing.assert_allclose(same.correlation, 1.0, rtol=1e-6)
    cascade = model_randomization_check(explain, params, x, t, key=KEY)
    assert cascade.stages == ("mlp/output", "mlp/dense_0")
    assert cascade.correlation.shape == (2, 16)
    assert np.all(np.mean(cascade.correlation, axis=1) < 0.5), cascade.correlation
    independent = model_randomization_check(explain, params, x, t, key=KEY,
                                            mode="independent", absolute=True)
    assert independent.stages == ("mlp/output", "mlp/dense_0")
    assert np.all(np.mean(independent.correlation, axis=1) < 0.5)
    everything = model_randomization_check(explain, params, x, t, key=KEY, mode="all")
    assert everything.stages == ("all",) and everything.correlation.shape == (1, 16)
    # Every layer at once is the last cascading stage: each layer's draw is keyed by it.
    np.testing.assert_allclose(everything.correlation[0], cascade.correlation[-1], rtol=1e-5)
    whole = model_randomization_check(explain, params, x, t, key=KEY, layers=["mlp"])
    assert whole.stages == ("mlp",) and np.mean(whole.correlation) < 0.5


def test_randomization_nested_layers_go_to_the_most_specific_prefix():
    # "head/dense_0" and, above it, the rest of "head": each leaf belongs to the
    # longest listed prefix, wherever the list puts it.
    rng = np.random.default_rng(12)
    w1, b1 = rng.normal(size=(5, 7)).astype(np.float32), np.zeros(7, np.float32)
    w2, b2 = rng.normal(size=(7, 3)).astype(np.float32), np.zeros(3, np.float32)
    params = {"head": {"dense_0": {"kernel": jnp.asarray(w1)},
                       "output": {"kernel": jnp.asarray(w2)}}}
    x = rng.normal(size=(4, 5)).astype(np.float32)
    t = np.array([0, 1, 2, 0], np.int32)

    def explain(p, x, t):
        head = p["head"]
        return saliency(Partial(_tanh_apply, head["dense_0"]["kernel"], jnp.asarray(b1),
                                head["output"]["kernel"], jnp.asarray(b2)), x, t)

    def reverse(key, path, leaf):  # deterministic, so the stages can be rebuilt by hand
        return leaf[::-1]

    x64 = x.astype(np.float64)
    original = np.abs(_np_tanh_grad((w1, b1, w2, b2), x64, t))
    expected = [np.abs(_np_tanh_grad((w1, b1, w2[::-1], b2), x64, t)),   # "head": output only
                np.abs(_np_tanh_grad((w1[::-1], b1, w2, b2), x64, t))]   # "head/dense_0"
    result = model_randomization_check(explain, params, x, t, key=KEY,
                                       layers=("head/dense_0", "head"), mode="independent",
                                       randomize_fn=reverse)
    assert result.stages == ("head", "head/dense_0")
    for stage, attributions in enumerate(expected):
        np.testing.assert_allclose(result.correlation[stage],
                                   spearman_rank_correlation(original, attributions), atol=1e-6)


# --- under jit ------------------------------------------------------------------------------


def test_methods_under_jit_match_eager(cnn):
    model, variables, x = cnn
    f = Partial(model.apply, variables)
    t = np.array([1, 2, 3], np.int32)

    def run(x, t):  # the eager calls hit programs compiled by the tests above
        return (integrated_gradients(f, x, t, steps=10, batch_size=3),
                grad_cam(f, x, t, layer="block_1"),
                occlusion(f, x, t, window=3, stride=2, batch_size=None))

    for got, expected in zip(jax.jit(run)(x, t), run(x, t), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# --- errors -----------------------------------------------------------------------------------


def _bad_calls(f, x, cnn_f):
    t = np.zeros(5, np.int32)
    return [
        (lambda: saliency(f, x, np.array([0, 12, 0, 0, 0])), ValueError,
         r"saliency got target class ids in \[0, 12\], outside \[0, 4\)"),
        (lambda: saliency(f, x, np.zeros(4, np.int32)), ShapeError,
         r"saliency expected target of shape \[batch\] = \[5\].*\(4,\)"),
        (lambda: gradient_x_input(f, x, np.zeros(5)), TypeError, r"integer class ids"),
        (lambda: saliency(lambda v: v[None], x, t), ShapeError,
         r"saliency expected f\(x\) to return logits of shape \[batch, classes\]"),
        (lambda: saliency(f, x.astype(np.int32), t), TypeError, r"floating-point x"),
        (lambda: integrated_gradients(f, x, t, baseline=np.zeros((5, 11))), ShapeError,
         r"integrated_gradients expected baseline of the shape of x.*\(5, 12\).*\(5, 11\)"),
        (lambda: integrated_gradients(f, x, t, steps=1), ValueError, r"steps to be an int >= 2"),
        (lambda: integrated_gradients(f, x, t, method="simpson"), ValueError, r"method in"),
        (lambda: integrated_gradients(f, x, t, batch_size=0), ValueError, r"batch_size"),
        (lambda: completeness_gap(f, x, np.zeros((5, 3))), ShapeError, r"attributions"),
        (lambda: smoothgrad(f, x, t), ValueError, r"smoothgrad needs a PRNG key"),
        (lambda: smoothgrad(f, x, t, KEY, noise_std=-1.0), ValueError, r"noise_std >= 0"),
        (lambda: occlusion(f, x, t, window=2), ShapeError, r"occlusion expected x of shape"),
        (lambda: occlusion(cnn_f, np.zeros((3, 8, 8, 1), np.float32), window=9), ShapeError,
         r"occlusion got window \(9, 9\) larger than the spatial size \(8, 8\)"),
        (lambda: occlusion(cnn_f, np.zeros((3, 8, 8, 1), np.float32), window=2, stride=(1,)),
         ValueError, r"stride to be a positive int or 2 positive ints"),
        (lambda: occlusion(cnn_f, np.zeros((3, 8, 8, 1), np.float32), window=2,
                           baseline_value=np.zeros(2)), ValueError, r"scalar baseline_value"),
        (lambda: grad_cam(cnn_f, np.zeros((3, 8, 8, 1), np.float32), layer="block_9"),
         ValueError, r"no submodule at layer='block_9'.*'block_0'.*'head/output'"),
        (lambda: grad_cam(cnn_f, np.zeros((3, 8, 8, 1), np.float32), layer="head"),
         ShapeError, r"layer 'head' to output a feature map \[batch, height, width, chan"),
        (lambda: grad_cam(f, x, layer="block_0"), ShapeError, r"upsample=False"),
        (lambda: grad_cam(cnn_f, np.zeros((3, 8, 8, 1), np.float32), layer="block_1",
                          resize_method="cubic"), ValueError, r"resize_method"),
        (lambda: grad_cam_from_split(lambda v: v.reshape(5, -1), f, x), ShapeError,
         r"features_fn\(x\) to return a feature map"),
        (lambda: spearman_rank_correlation(np.zeros((2, 3)), np.zeros((2, 4))), ShapeError,
         r"same shape"),
        (lambda: attention_rollout([]), TypeError, r"non-empty sequence"),
        (lambda: attention_rollout([np.ones((1, 2, 3, 4), np.float32)]), ShapeError,
         r"as many keys as queries"),
        (lambda: attention_rollout([np.ones((1, 2, 3, 3), np.float32),
                                    np.ones((1, 2, 4, 4), np.float32)]), ShapeError,
         r"weights\[1\] of shape \(1, 2, 4, 4\)"),
        (lambda: attention_rollout([np.ones((1, 2, 3, 3), np.float32)], head_fusion="sum"),
         ValueError, r"head_fusion"),
        (lambda: attention_map([np.ones((1, 2, 3, 3), np.float32)], 1), IndexError,
         r"layer=1 for weights of 1 layers"),
        (lambda: attention_map([np.ones((1, 2, 3, 3), np.float32)], 0, 2), IndexError,
         r"head=2 for weights with 2 heads"),
        (lambda: collect_attention_weights(f, x), ValueError, r"no nnlib MultiHeadAttention"),
    ]


class _SharedConv(nn.Module):
    """Calls one submodule twice: no single feature map to explain."""

    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(2, (1, 1), name="shared")
        return jnp.mean(conv(conv(x)), axis=(1, 2))  # [B, 2]


def test_grad_cam_rejects_a_layer_called_twice():
    model = _SharedConv()
    x = jnp.ones((2, 4, 4, 2))
    f = Partial(model.apply, _jit_init(model, x))
    with pytest.raises(ValueError, match=r"layer='shared' is called 2 times"):
        grad_cam(f, x, layer="shared")


def test_bad_inputs_raise_clear_errors(cnn):
    model, variables, _ = cnn
    f, _, _ = _linear()
    x = np.ones((5, 12), np.float32)
    for call, error, match in _bad_calls(f, x, Partial(model.apply, variables)):
        with pytest.raises(error, match=match):
            call()


def test_randomization_check_errors(digits):
    model, params, x = digits

    def explain(p, x, t):
        return saliency(Partial(model.apply, {"params": p}), x, t)

    t = np.zeros(16, np.int32)
    with pytest.raises(ValueError, match=r"mode in"):
        model_randomization_check(explain, params, x, t, key=KEY, mode="bottom_up")
    with pytest.raises(ValueError, match=r"no parameters under layers \['encoder'\]"):
        model_randomization_check(explain, params, x, t, key=KEY, layers=["mlp/output",
                                                                          "encoder"])
    with pytest.raises(ValueError, match=r"no layers to randomize"):
        model_randomization_check(explain, params, x, t, key=KEY, layers=[])
    with pytest.raises(ShapeError, match=r"randomize_fn changed the shape of 'mlp/"):
        model_randomization_check(explain, params, x, t, key=KEY,
                                  randomize_fn=lambda key, path, leaf: leaf[:1])
