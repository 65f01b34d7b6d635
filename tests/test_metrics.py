"""Metrics against scikit-learn, PyTorch and numpy; masking, jit/vmap, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnlib import metrics
from nnlib.layers import ShapeError

sk = pytest.importorskip("sklearn.metrics")

RTOL = 1e-5


def _class_inputs(seed=0, shape=(6, 5), classes=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape + (classes,)).astype(np.float32)
    labels = rng.integers(0, classes, shape).astype(np.int32)
    return logits, labels


# --- parity with scikit-learn -----------------------------------------------------------


def test_accuracy_matches_sklearn():
    logits, labels = _class_inputs(1, (30,), 4)
    predicted = logits.argmax(-1)
    weights = np.random.default_rng(2).random(30).astype(np.float32)
    ref = sk.accuracy_score(labels, predicted, sample_weight=weights)
    np.testing.assert_allclose(metrics.accuracy(logits, labels, mask=weights), ref, rtol=RTOL)
    # integer class predictions are taken as they are
    np.testing.assert_allclose(
        metrics.accuracy(predicted.astype(np.int32), labels), sk.accuracy_score(labels, predicted),
        rtol=RTOL,
    )


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_accuracy_matches_sklearn(k):
    logits, labels = _class_inputs(3, (40,), 5)  # distinct scores: no ties to break
    ref = sk.top_k_accuracy_score(labels, logits, k=k, labels=np.arange(5))
    np.testing.assert_allclose(metrics.top_k_accuracy(logits, labels, k), ref, rtol=RTOL)


def test_top_k_accuracy_breaks_ties_toward_lower_index():
    logits = np.array([[1.0, 1.0, 1.0, 0.0]] * 4, np.float32)  # classes 0, 1, 2 tie
    labels = np.array([0, 1, 2, 3], np.int32)
    # ranks: class 0 -> 0, class 1 -> 1, class 2 -> 2, class 3 -> 3
    for k, ref in [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]:
        assert metrics.top_k_accuracy(logits, labels, k) == ref
    # k=1 always agrees with accuracy (argmax also takes the first maximum)
    assert metrics.top_k_accuracy(logits, labels, 1) == metrics.accuracy(logits, labels)


@pytest.mark.filterwarnings("ignore:A single label was found")
@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 12), classes=st.integers(1, 6), seed=st.integers(0, 99))
def test_confusion_matrix_and_f1_match_sklearn(batch, classes, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, batch).astype(np.int32)
    predicted = rng.integers(0, classes, batch).astype(np.int32)
    mask = rng.random(batch) > 0.25
    confusion = jax.jit(metrics.confusion_matrix, static_argnums=2)(
        predicted, labels, classes, mask=mask
    )
    assert confusion.dtype == jnp.int32
    every = np.arange(classes)
    ref = sk.confusion_matrix(labels[mask], predicted[mask], labels=every) if mask.any() else 0
    np.testing.assert_array_equal(confusion, np.broadcast_to(ref, (classes, classes)))
    if not mask.any():
        return
    scores = jax.jit(metrics.precision_recall_f1)(confusion)
    p, r, f, _ = sk.precision_recall_fscore_support(
        labels[mask], predicted[mask], labels=every, zero_division=0
    )
    mp, mr, mf, _ = sk.precision_recall_fscore_support(
        labels[mask], predicted[mask], labels=every, average="macro", zero_division=0
    )
    for got, want in zip(scores, [p, r, f, mp, mr, mf], strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-7)


def test_confusion_matrix_from_logits_rows_are_true_classes():
    logits, labels = _class_inputs(4, (5, 6), 3)  # [batch, time, classes]
    got = metrics.confusion_matrix(logits, labels, 3)
    ref = sk.confusion_matrix(labels.ravel(), logits.argmax(-1).ravel(), labels=[0, 1, 2])
    np.testing.assert_array_equal(got, ref)
    # one example, true class 2 predicted as 0: the count sits in row 2, column 0
    one = metrics.confusion_matrix(np.array([0], np.int32), np.array([2], np.int32), 3)
    assert one[2, 0] == 1 and one.sum() == 1


def test_confusion_matrix_skips_out_of_range_labels():
    labels = np.array([-1, 0, 3, 1], np.int32)  # -1 must not wrap to the last class
    predicted = np.array([2, 0, 1, 1], np.int32)
    np.testing.assert_array_equal(
        metrics.confusion_matrix(predicted, labels, 3), [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    )


def test_binary_accuracy_matches_sklearn():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(8, 3)).astype(np.float32)
    logits[0, 0] = 0.0  # logit 0 = probability 0.5 predicts negative
    labels = rng.random((8, 3)) > 0.5
    ref = sk.accuracy_score(labels.ravel(), (logits > 0).ravel())
    for as_type in [bool, np.int32, np.float32]:
        np.testing.assert_allclose(
            metrics.binary_accuracy(logits, labels.astype(as_type)), ref, rtol=RTOL
        )
    row_mask = np.array([True] * 5 + [False] * 3)  # [batch] mask on [batch, labels]
    ref = sk.accuracy_score(labels[:5].ravel(), (logits[:5] > 0).ravel())
    np.testing.assert_allclose(metrics.binary_accuracy(logits, labels, mask=row_mask), ref,
                               rtol=RTOL)


# --- perplexity against numpy and PyTorch ---------------------------------------------


def test_perplexity_matches_numpy_and_torch():
    logits, labels = _class_inputs(6, (3, 7), 11)  # [batch, time, vocab]
    mask = np.ones(labels.shape, bool)
    mask[0, 5:] = mask[2, 3:] = False
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    token_ce = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    got = metrics.perplexity(logits, labels, mask=mask)
    np.testing.assert_allclose(got, np.exp(token_ce[mask].mean()), rtol=RTOL)
    torch = pytest.importorskip("torch")
    padded = np.where(mask, labels, -100)
    ce = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).permute(0, 2, 1), torch.from_numpy(padded).long(),
        ignore_index=-100,
    )
    np.testing.assert_allclose(got, torch.exp(ce).numpy(), rtol=RTOL)


# --- masking, transformations: every metric ---------------------------------------------

# name -> (call(predictions, labels, mask), make inputs); predictions are what masking perturbs.
METRICS = {
    "accuracy": (metrics.accuracy, _class_inputs),
    "top_k_accuracy": (lambda x, y, mask=None: metrics.top_k_accuracy(x, y, 2, mask=mask),
                       _class_inputs),
    "perplexity": (metrics.perplexity, _class_inputs),
    "confusion_matrix": (lambda x, y, mask=None: metrics.confusion_matrix(x, y, 4, mask=mask),
                         _class_inputs),
    "binary_accuracy": (
        metrics.binary_accuracy,
        lambda seed: (lambda x: (x, (x + np.float32(0.7) > 0).astype(np.float32)))(
            np.random.default_rng(seed).normal(size=(6, 5)).astype(np.float32)
        ),
    ),
}
ALL = pytest.mark.parametrize("name", sorted(METRICS))


@ALL
def test_masked_entries_change_nothing(name):
    fn, make = METRICS[name]
    x, y = make(7)
    mask = np.random.default_rng(8).random(y.shape) > 0.4
    mask[0, 0], mask[-1, -1] = True, False
    garbage = x.copy()
    garbage[~mask] = 50 * np.random.default_rng(9).normal(size=garbage[~mask].shape)
    np.testing.assert_array_equal(fn(x, y, mask=mask), fn(garbage, y, mask=mask))
    # masking equals dropping the masked examples
    np.testing.assert_allclose(fn(x, y, mask=mask), fn(x[mask], y[mask]), rtol=RTOL)


@ALL
def test_fully_masked(name):
    fn, make = METRICS[name]
    x, y = make(10)
    got = fn(x, y, mask=np.zeros(y.shape, bool))
    # a mean over nothing is 0; perplexity is exp(0) = 1
    np.testing.assert_array_equal(got, 1 if name == "perplexity" else 0)


@ALL
def test_jit_and_vmap_match_eager(name):
    fn, make = METRICS[name]
    x, y = make(11)
    mask = np.random.default_rng(12).random(y.shape) > 0.3
    eager = fn(x, y, mask=mask)
    np.testing.assert_allclose(jax.jit(fn)(x, y, mask=mask), eager, rtol=RTOL)
    per_row = jax.vmap(lambda x, y, m: fn(x, y, mask=m))(x, y, mask)
    rows = np.stack([fn(x[i], y[i], mask=mask[i]) for i in range(len(y))])
    np.testing.assert_allclose(per_row, rows, rtol=RTOL)


def test_out_of_range_labels_count_as_wrong():
    logits = np.eye(3, dtype=np.float32)  # predicts 0, 1, 2
    labels = np.array([0, 7, -1], np.int32)
    assert metrics.accuracy(logits, labels) == pytest.approx(1 / 3)
    assert metrics.top_k_accuracy(logits, labels, 3) == pytest.approx(1 / 3)


# --- bad inputs: one test per error -----------------------------------------------------


def test_error_float_labels():
    with pytest.raises(TypeError, match=r"accuracy expected integer class labels, got dtype "
                                        r"float32 with shape \(4,\)"):
        metrics.accuracy(np.ones((4, 3), np.float32), np.zeros(4, np.float32))


def test_error_predictions_wrong_shape():
    with pytest.raises(ShapeError, match=r"accuracy expected logits of shape \[\.\.\., classes\] "
                                         r"= \[4, classes\] or integer class predictions of the "
                                         r"labels' shape \(4,\), got int32 predictions of shape "
                                         r"\(5,\)"):
        metrics.accuracy(np.zeros(5, np.int32), np.zeros(4, np.int32))


def test_error_single_logit_points_to_binary_accuracy():
    with pytest.raises(ShapeError, match=r"accuracy .* got float32 predictions of shape \(4,\); "
                                         r"for one logit per example use binary_accuracy"):
        metrics.accuracy(np.zeros(4, np.float32), np.zeros(4, np.int32))


def test_error_logits_labels_mismatch():
    with pytest.raises(ShapeError, match=r"top_k_accuracy expected labels of shape \[\.\.\.\] = "
                                         r"\(4,\) to match logits \[\.\.\., classes\] = \(4, 3\), "
                                         r"got shape \(5,\)"):
        metrics.top_k_accuracy(np.ones((4, 3), np.float32), np.zeros(5, np.int32), 1)


def test_error_integer_logits_for_perplexity():
    with pytest.raises(TypeError, match=r"perplexity expected floating-point logits of shape "
                                        r"\[\.\.\., classes\], got dtype int32"):
        metrics.perplexity(np.ones((4, 3), np.int32), np.zeros(4, np.int32))


def test_error_bad_k():
    with pytest.raises(ValueError, match=r"top_k_accuracy expected an int k in \[1, classes=3\], "
                                         r"got 4"):
        metrics.top_k_accuracy(np.ones((4, 3), np.float32), np.zeros(4, np.int32), 4)


def test_error_mask_wrong_shape():
    with pytest.raises(ShapeError, match=r"perplexity expected mask of the per-example shape "
                                         r"\(2, 5\) .* got shape \(5,\)"):
        metrics.perplexity(np.ones((2, 5, 3), np.float32), np.zeros((2, 5), np.int32),
                           mask=np.ones(5, bool))


def test_error_logits_width_differs_from_num_classes():
    with pytest.raises(ShapeError, match=r"confusion_matrix expected logits of shape \[\.\.\., "
                                         r"classes\] with classes=4, got shape \(6, 3\)"):
        metrics.confusion_matrix(np.ones((6, 3), np.float32), np.zeros(6, np.int32), 4)


def test_error_bad_num_classes():
    with pytest.raises(ValueError, match=r"confusion_matrix expected a positive int "
                                         r"num_classes, got 0"):
        metrics.confusion_matrix(np.zeros(6, np.int32), np.zeros(6, np.int32), 0)


def test_error_confusion_not_square():
    with pytest.raises(ShapeError, match=r"precision_recall_f1 expected a square confusion "
                                         r"matrix \[classes, classes\], got shape \(3, 4\)"):
        metrics.precision_recall_f1(np.zeros((3, 4), np.int32))


def test_error_confusion_wrong_rank():
    with pytest.raises(ShapeError, match=r"precision_recall_f1 expected confusion of shape "
                                         r"\[classes, classes\] \(rank 2\), got shape \(9,\)"):
        metrics.precision_recall_f1(np.zeros(9, np.int32))


def test_error_binary_labels_shape():
    with pytest.raises(ShapeError, match=r"binary_accuracy expected labels of the same shape as "
                                         r"logits \(4, 2\), got shape \(4,\)"):
        metrics.binary_accuracy(np.ones((4, 2), np.float32), np.ones(4, np.float32))


def test_error_binary_integer_logits():
    with pytest.raises(TypeError, match=r"binary_accuracy expected floating-point logits"):
        metrics.binary_accuracy(np.ones(4, np.int32), np.ones(4, np.int32))

