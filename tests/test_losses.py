"""Losses against numpy formulas and PyTorch; masking, reductions, jit/vmap, gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from nnlib import losses
from nnlib.layers import ShapeError

RTOL = 1e-5


def _rng(seed=0):
    return np.random.default_rng(seed)


# --- independent numpy references -------------------------------------------------


def np_log_softmax(x):
    x = x.astype(np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_softmax_ce(logits, labels, eps=0.0):
    classes = logits.shape[-1]
    target = (1 - eps) * np.eye(classes)[labels] + eps / classes
    return -(target * np_log_softmax(logits)).sum(-1)


def np_bce_logits(x, y):
    x = x.astype(np.float64)
    return np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))


def np_huber(p, t, delta):
    r = np.abs(p.astype(np.float64) - t)
    return np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta))


def np_reduce(values, weights, reduction):
    weights = np.broadcast_to(
        weights.reshape(weights.shape + (1,) * (values.ndim - weights.ndim)), values.shape
    ).astype(np.float64)
    if reduction == "none":
        return values * weights
    if reduction == "sum":
        return (values * weights).sum()
    return (values * weights).sum() / weights.sum() if weights.sum() > 0 else 0.0


# --- one descriptor per loss: how to call it on random inputs -----------------------
# Each entry: make(rng, dtype) -> (args, kwargs, per_example_shape). The first arg is the
# prediction-like input (floating) that masking tests perturb.


def _class_inputs(rng, dtype, shape=(3, 4), classes=5):
    logits = rng.normal(size=shape + (classes,)).astype(dtype)
    labels = rng.integers(0, classes, shape).astype(np.int32)
    return logits, labels


def _ce(rng, dtype):
    logits, labels = _class_inputs(rng, dtype)
    return (logits, labels), {"label_smoothing": 0.1}, labels.shape


def _ce_probs(rng, dtype):
    logits, _ = _class_inputs(rng, dtype)
    target = np.exp(np_log_softmax(rng.normal(size=logits.shape))).astype(dtype)
    return (logits, target), {}, logits.shape[:-1]


def _bce(rng, dtype):
    x = rng.normal(size=(3, 4)).astype(dtype)
    return (x, (rng.random((3, 4)) > 0.5).astype(dtype)), {}, x.shape


def _bce_probs(rng, dtype):
    p = rng.uniform(0.05, 0.95, (3, 4)).astype(dtype)
    return (p, (rng.random((3, 4)) > 0.5).astype(dtype)), {}, p.shape


def _regression(rng, dtype):
    p = rng.normal(size=(3, 4)).astype(dtype)
    return (p, (p + rng.normal(size=(3, 4)) * 2).astype(dtype)), {}, p.shape


LOSSES = {
    "softmax_cross_entropy": (losses.softmax_cross_entropy, _ce),
    "softmax_cross_entropy_with_probs": (losses.softmax_cross_entropy_with_probs, _ce_probs),
    "binary_cross_entropy": (losses.binary_cross_entropy, _bce),
    "binary_cross_entropy_with_probs": (losses.binary_cross_entropy_with_probs, _bce_probs),
    "mean_squared_error": (losses.mean_squared_error, _regression),
    "huber_loss": (losses.huber_loss, _regression),
}
ALL = pytest.mark.parametrize("name", sorted(LOSSES))


# --- parity with numpy ------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_softmax_cross_entropy_matches_numpy(reduction, eps):
    logits, labels = _class_inputs(_rng(), np.float32)
    weights = _rng(1).random(labels.shape).astype(np.float32)  # float weights, not just 0/1
    got = losses.softmax_cross_entropy(
        logits, labels, label_smoothing=eps, mask=weights, reduction=reduction
    )
    ref = np_reduce(np_softmax_ce(logits, labels, eps), weights, reduction)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=1e-6)


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 4), time=st.integers(0, 3), classes=st.integers(1, 9),
       eps=st.sampled_from([0.0, 0.1, 1.0]), prefix_mask=st.booleans())
def test_softmax_cross_entropy_shapes(batch, time, classes, eps, prefix_mask):
    shape = (batch,) + ((time,) if time else ())
    logits, labels = _class_inputs(_rng(batch * 10 + time), np.float32, shape, classes)
    mask = _rng(2).random(shape[:1] if prefix_mask else shape) > 0.3
    # jit: one compile per shape is far cheaper than eager op-by-op dispatch.
    got = jax.jit(losses.softmax_cross_entropy, static_argnames=("label_smoothing", "reduction"))(
        logits, labels, label_smoothing=eps, mask=mask, reduction="none"
    )
    assert got.shape == shape
    ref = np_reduce(np_softmax_ce(logits, labels, eps), mask, "none")
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=1e-6)


def test_elementwise_losses_match_numpy_with_prefix_mask():
    rng = _rng(3)
    p = rng.normal(size=(4, 3)).astype(np.float32)
    t = rng.normal(size=(4, 3)).astype(np.float32)
    mask = np.array([True, False, True, True])  # [batch] mask on a [batch, features] loss
    refs = {
        losses.mean_squared_error: (p.astype(np.float64) - t) ** 2,
        functools.partial(losses.huber_loss, delta=0.7): np_huber(p, t, 0.7),
        losses.binary_cross_entropy: np_bce_logits(p, (t > 0).astype(np.float32)),
    }
    for fn, ref in refs.items():
        target = (t > 0).astype(np.float32) if fn is losses.binary_cross_entropy else t
        for reduction in ["mean", "sum", "none"]:
            got = fn(p, target, mask=mask, reduction=reduction)
            np.testing.assert_allclose(got, np_reduce(ref, mask, reduction), rtol=RTOL, atol=1e-6)


def test_float16_masked_mean_over_more_than_65504_examples_is_finite():
    # The mask's count (70000) exceeds float16's largest value: summed in float16 it was
    # inf and the masked mean NaN, where the unmasked mean is fine.
    rng = _rng(4)
    logits = rng.normal(size=(35, 2000, 2)).astype(np.float16)
    labels = rng.integers(0, 2, (35, 2000)).astype(np.int32)
    mask = np.ones((35, 2000), bool)
    mask[:, -1] = False
    ref = np_softmax_ce(logits, labels)[mask].mean()
    got = losses.softmax_cross_entropy(jnp.asarray(logits), labels, mask=mask)
    assert got.dtype == jnp.float16
    np.testing.assert_allclose(float(got), ref, rtol=1e-3)
    p = logits[..., 0]
    got = losses.mean_squared_error(jnp.asarray(p), np.zeros_like(p), mask=mask)
    np.testing.assert_allclose(float(got), np.square(p.astype(np.float64))[mask].mean(),
                               rtol=1e-3)


def test_half_precision_masked_mean_under_strict_dtype_promotion():
    # The masked mean widens half precision to float32 itself; under strict promotion
    # (no implicit bf16 -> f32) it must still run, as the unmasked mean does.
    logits = jnp.asarray(_rng(5).normal(size=(3, 4)), jnp.bfloat16)
    labels, mask = jnp.array([0, 1, 2]), jnp.array([1.0, 1.0, 0.0])
    with jax.numpy_dtype_promotion("strict"):
        got = losses.softmax_cross_entropy(logits, labels, mask=mask)
    assert got.dtype == jnp.bfloat16
    ref = np_softmax_ce(np.asarray(logits, np.float32), np.asarray(labels))[:2].mean()
    np.testing.assert_allclose(float(got), ref, rtol=1e-2)


def test_binary_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([-200.0, -30.0, 0.0, 30.0, 200.0], np.float32)
    labels = np.array([1.0, 0.0, 1.0, 1.0, 0.0], np.float32)
    got = losses.binary_cross_entropy(logits, labels, reduction="none")
    np.testing.assert_allclose(got, np_bce_logits(logits, labels), rtol=RTOL)
    probs = losses.binary_cross_entropy_with_probs(
        np.array([0.0, 1.0], np.float32), np.array([1.0, 0.0], np.float32), reduction="none"
    )
    assert np.all(np.isfinite(probs)) and np.all(probs > 15)  # clipped, not inf


def test_l2_regularization_matches_numpy():
    params = {
        "Dense_0": {"kernel": np.arange(6.0, dtype=np.float32).reshape(2, 3),
                    "bias": np.ones(3, np.float32)},
        "LayerNorm_0": {"scale": np.full(3, 2.0, np.float32)},
        "step": np.int32(7),  # integer leaves are skipped
        "blocks": [{"kernel": np.full((2, 2), 0.5, np.float32)}],
    }
    kernel_sq = np.sum(np.arange(6.0) ** 2) + 4 * 0.25
    np.testing.assert_allclose(losses.l2_regularization(params), kernel_sq + 3 + 12, rtol=RTOL)
    np.testing.assert_allclose(
        losses.l2_regularization(params, kernels_only=True), kernel_sq, rtol=RTOL
    )
    assert losses.l2_regularization({}) == 0
    assert losses.l2_regularization(np.ones(3, np.float32), kernels_only=True) == 0  # unnamed
    assert losses.l2_regularization({"w": jnp.ones(4, jnp.bfloat16)}).dtype == jnp.float32
    with jax.enable_x64(True):
        assert losses.l2_regularization({"w": jnp.ones(2, jnp.float64)}).dtype == jnp.float64


# --- parity with PyTorch ------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_softmax_cross_entropy_matches_torch_ignore_index(reduction, eps):
    torch = pytest.importorskip("torch")
    logits, labels = _class_inputs(_rng(4), np.float32, (3, 6), 7)  # [batch, time, classes]
    labels[0, 4:] = -100  # padding, PyTorch's ignore_index
    labels[2, 1] = -100
    got = losses.softmax_cross_entropy(
        logits, labels, label_smoothing=eps, mask=labels != -100, reduction=reduction
    )
    ref = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).permute(0, 2, 1),  # torch wants [batch, classes, time]
        torch.from_numpy(labels).long(),
        ignore_index=-100, label_smoothing=eps, reduction=reduction,
    )
    np.testing.assert_allclose(got, ref.numpy(), rtol=RTOL, atol=1e-6)


def test_softmax_cross_entropy_with_probs_matches_torch():
    torch = pytest.importorskip("torch")
    (logits, target), _, _ = _ce_probs(_rng(5), np.float32)
    for reduction in ["mean", "sum", "none"]:
        got = losses.softmax_cross_entropy_with_probs(logits, target, reduction=reduction)
        ref = torch.nn.functional.cross_entropy(
            torch.from_numpy(logits).permute(0, 2, 1), torch.from_numpy(target).permute(0, 2, 1),
            reduction=reduction,
        )
        np.testing.assert_allclose(got, ref.numpy(), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_and_regression_losses_match_torch(reduction):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = _rng(6)
    x = (rng.normal(size=(5, 3)) * 4).astype(np.float32)
    y = (rng.random((5, 3)) > 0.5).astype(np.float32)
    t = (x + rng.normal(size=(5, 3)) * 3).astype(np.float32)
    p = rng.uniform(0.01, 0.99, (5, 3)).astype(np.float32)
    tx, ty, tt, tp = (torch.from_numpy(a) for a in (x, y, t, p))
    pairs = [
        (losses.binary_cross_entropy(x, y, reduction=reduction),
         F.binary_cross_entropy_with_logits(tx, ty, reduction=reduction)),
        (losses.binary_cross_entropy_with_probs(p, y, reduction=reduction),
         F.binary_cross_entropy(tp, ty, reduction=reduction)),
        (losses.mean_squared_error(x, t, reduction=reduction),
         F.mse_loss(tx, tt, reduction=reduction)),
        (losses.huber_loss(x, t, reduction=reduction),
         F.huber_loss(tx, tt, reduction=reduction)),
        (losses.huber_loss(x, t, 2.5, reduction=reduction),
         F.huber_loss(tx, tt, delta=2.5, reduction=reduction)),
    ]
    for got, ref in pairs:
        np.testing.assert_allclose(got, ref.numpy(), rtol=RTOL, atol=1e-6)


# --- masking, reductions, transformations: every loss ---------------------------------


@ALL
def test_masked_entries_change_nothing(name):
    fn, make = LOSSES[name]
    args, kwargs, shape = make(_rng(7), np.float32)
    mask = _rng(8).random(shape) > 0.4
    mask.flat[0], mask.flat[-1] = True, False
    garbage = np.array(args[0], copy=True)
    garbage[~mask] = 1e3 * _rng(9).normal(size=garbage[~mask].shape)  # masked inputs only
    for reduction in ["mean", "none"]:  # "sum" is the sum of "none"
        clean = fn(*args, mask=mask, reduction=reduction, **kwargs)
        dirty = fn(garbage, *args[1:], mask=mask, reduction=reduction, **kwargs)
        np.testing.assert_array_equal(clean, dirty)
    per_example = fn(*args, reduction="none", **kwargs)
    np.testing.assert_allclose(
        fn(*args, mask=mask, **kwargs), np.asarray(per_example)[mask].mean(), rtol=RTOL
    )


def test_masked_padding_labels_are_never_used_as_indices():
    logits, labels = _class_inputs(_rng(10), np.float32)
    mask = np.ones(labels.shape, bool)
    mask[:, -1] = False
    padded = labels.copy()
    padded[:, -1] = -100
    np.testing.assert_array_equal(
        losses.softmax_cross_entropy(logits, padded, mask=mask, label_smoothing=0.1),
        losses.softmax_cross_entropy(logits, labels, mask=mask, label_smoothing=0.1),
    )
    grads = jax.jit(jax.grad(losses.softmax_cross_entropy))(jnp.asarray(logits), padded, mask=mask)
    assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads)[:, -1] == 0)


@ALL
def test_fully_masked_is_zero_not_nan(name):
    fn, make = LOSSES[name]
    args, kwargs, shape = make(_rng(11), np.float32)
    mask = np.zeros(shape, bool)
    assert fn(*args, mask=mask, **kwargs) == 0
    np.testing.assert_array_equal(fn(*args, mask=mask, reduction="none", **kwargs), 0)
    grads = jax.grad(lambda x: fn(x, *args[1:], mask=mask, **kwargs))(jnp.asarray(args[0]))
    np.testing.assert_array_equal(grads, 0)


@ALL
def test_jit_and_vmap_match_eager(name):
    fn, make = LOSSES[name]
    args, kwargs, shape = make(_rng(12), np.float32)
    mask = _rng(13).random(shape) > 0.3
    call = functools.partial(fn, **kwargs)
    eager = call(*args, mask=mask)
    np.testing.assert_allclose(jax.jit(call)(*args, mask=mask), eager, rtol=RTOL, atol=1e-7)
    # vmap over the leading axis: one loss per row equals the per-row eager losses.
    per_row = jax.vmap(lambda *a: fn(*a[:-1], mask=a[-1], **kwargs))(*args, mask)
    rows = [fn(*(a[i] for a in args), mask=mask[i], **kwargs) for i in range(shape[0])]
    np.testing.assert_allclose(per_row, np.stack(rows), rtol=RTOL, atol=1e-7)


@ALL
def test_gradients(name):
    fn, make = LOSSES[name]
    with jax.enable_x64(True):
        args, kwargs, shape = make(_rng(14), np.float64)
        weights = _rng(15).random(shape)
        weights.flat[0] = 0.0
        floats = [i for i, a in enumerate(args) if a.dtype == np.float64]

        def f(*xs):
            full = list(args)
            for i, x in zip(floats, xs, strict=True):
                full[i] = x
            return fn(*full, mask=weights, **kwargs)

        check_grads(jax.jit(f), tuple(jnp.asarray(args[i]) for i in floats), order=1,
                    modes=("rev",), atol=1e-6, rtol=1e-6)


def test_l2_regularization_gradient():
    with jax.enable_x64(True):
        params = {"a": {"kernel": jnp.arange(4.0, dtype=jnp.float64), "bias": jnp.ones(2)}}
        check_grads(losses.l2_regularization, (params["a"]["kernel"],), order=1, modes=("rev",))
        grads = jax.grad(functools.partial(losses.l2_regularization, kernels_only=True))(params)
        np.testing.assert_allclose(grads["a"]["kernel"], 2 * np.arange(4.0))
        np.testing.assert_array_equal(grads["a"]["bias"], 0)


# --- bad inputs: one test per error ---------------------------------------------------


def test_error_unknown_reduction():
    with pytest.raises(ValueError, match=r"mean_squared_error expected reduction .* got 'avg'"):
        losses.mean_squared_error(np.ones(3, np.float32), np.ones(3), reduction="avg")


def test_error_integer_logits():
    with pytest.raises(TypeError, match=r"softmax_cross_entropy expected floating-point logits "
                                        r"of shape \[\.\.\., classes\], got dtype int32 with "
                                        r"shape \(2, 3\)"):
        losses.softmax_cross_entropy(np.ones((2, 3), np.int32), np.zeros(2, np.int32))


def test_error_scalar_logits():
    with pytest.raises(ShapeError, match=r"softmax_cross_entropy expected logits .* got shape "
                                         r"\(\) \(rank 0\)"):
        losses.softmax_cross_entropy(np.float32(1.0), np.int32(0))


def test_error_float_labels():
    with pytest.raises(TypeError, match=r"softmax_cross_entropy expected integer class labels "
                                        r"of shape \[\.\.\.\] = \(2,\), got dtype float32"):
        losses.softmax_cross_entropy(np.ones((2, 3), np.float32), np.zeros(2, np.float32))


def test_error_labels_do_not_match_logits():
    with pytest.raises(ShapeError, match=r"softmax_cross_entropy expected labels of shape "
                                         r"\[\.\.\.\] = \(2, 4\) to match logits \[\.\.\., "
                                         r"classes\] = \(2, 4, 3\), got shape \(2, 3\)"):
        losses.softmax_cross_entropy(np.ones((2, 4, 3), np.float32), np.zeros((2, 3), np.int32))


def test_error_mask_wrong_shape():
    with pytest.raises(ShapeError, match=r"binary_cross_entropy expected mask of the "
                                         r"per-example shape \(2, 4\) .* got shape \(4,\)"):
        losses.binary_cross_entropy(np.ones((2, 4), np.float32), np.ones((2, 4)),
                                    mask=np.ones(4, bool))


def test_error_scalar_mask_on_batch():
    with pytest.raises(ShapeError, match=r"huber_loss expected mask .* got shape \(\)"):
        losses.huber_loss(np.ones(3, np.float32), np.ones(3), mask=np.bool_(True))


def test_error_target_probs_shape():
    with pytest.raises(ShapeError, match=r"softmax_cross_entropy_with_probs expected "
                                         r"target_probs of the same shape as logits \(2, 3\), "
                                         r"got shape \(2, 4\)"):
        losses.softmax_cross_entropy_with_probs(np.ones((2, 3), np.float32), np.ones((2, 4)))


def test_error_integer_target_probs():
    with pytest.raises(TypeError, match=r"softmax_cross_entropy_with_probs expected "
                                        r"floating-point target_probs"):
        losses.softmax_cross_entropy_with_probs(np.ones((2, 3), np.float32),
                                                np.ones((2, 3), np.int32))


def test_error_targets_shape():
    with pytest.raises(ShapeError, match=r"mean_squared_error expected targets of the same "
                                         r"shape as predictions \(3, 2\), got shape \(3,\)"):
        losses.mean_squared_error(np.ones((3, 2), np.float32), np.ones(3, np.float32))


def test_error_integer_probs():
    with pytest.raises(TypeError, match=r"binary_cross_entropy_with_probs expected "
                                        r"floating-point probs"):
        losses.binary_cross_entropy_with_probs(np.ones(3, np.int32), np.ones(3))


def test_error_label_smoothing_out_of_range():
    with pytest.raises(ValueError, match=r"softmax_cross_entropy expected label_smoothing in "
                                         r"\[0, 1\], got 1.5"):
        losses.softmax_cross_entropy(np.ones((2, 3), np.float32), np.zeros(2, np.int32),
                                     label_smoothing=1.5)


def test_error_nonpositive_delta():
    with pytest.raises(ValueError, match=r"huber_loss expected delta > 0, got 0"):
        losses.huber_loss(np.ones(3, np.float32), np.ones(3, np.float32), 0.0)
