"""nnlib.fairness against fairlearn, numpy references, finite differences and training.

Independent truths used here: ``fairlearn.metrics`` (selection_rate,
true_positive_rate, MetricFrame, demographic parity / equalized odds /
equal opportunity differences and ratios) on the same random predictions;
numpy loops for the penalties and for the cases where nnlib documents a
different convention (empty TPR groups); finite differences for gradients;
the closed-form base rates of the generator; and end-to-end training on the
planted-bias data, measuring the demographic parity difference with and
without each mitigation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from nnlib import fairness as fair
from nnlib.layers import MLP
from nnlib.layers._checks import ShapeError
from nnlib.train import TrainState, make_train_step

fm = pytest.importorskip("fairlearn.metrics")
skm = pytest.importorskip("sklearn.metrics")

ATOL = 1e-6


@pytest.fixture
def strict():
    # The library code must not rely on implicit promotion (training runs
    # outside this: optax's Adam does).
    with jax.numpy_dtype_promotion("strict"):
        yield


def _binary(seed, n=300, num_groups=2, weighted=False):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, num_groups, n).astype(np.int32)
    y_true = rng.integers(0, 2, n).astype(np.int32)
    # Predictions correlated with the group, so the gaps are not all ~0.
    scores = np.clip(rng.random(n) + 0.15 * groups - 0.1, 0, 1).astype(np.float32)
    y_pred = (scores > 0.5).astype(np.int32)
    weights = rng.uniform(0.1, 2.0, n).astype(np.float32) if weighted else None
    return y_true, y_pred, scores, groups, weights


CASES = [(2, False), (2, True), (3, True)]  # (num_groups, weighted)


# --- metrics against fairlearn ---------------------------------------------------------


@pytest.mark.parametrize("num_groups,weighted", CASES)
def test_rates_match_fairlearn_metric_frame(strict, num_groups, weighted):
    y_true, y_pred, scores, groups, w = _binary(num_groups * 10 + weighted, 300, num_groups,
                                                weighted)
    frame = fm.MetricFrame(
        metrics={"sel": fm.selection_rate, "tpr": fm.true_positive_rate,
                 "fpr": fm.false_positive_rate, "acc": skm.accuracy_score},
        y_true=y_true, y_pred=y_pred, sensitive_features=groups,
        sample_params={k: {"sample_weight": w} for k in ("sel", "tpr", "fpr", "acc")})
    ref = frame.by_group.sort_index()
    np.testing.assert_allclose(fair.selection_rate(y_pred, groups, num_groups, sample_weight=w),
                               ref["sel"], atol=ATOL)
    np.testing.assert_allclose(
        fair.true_positive_rate(y_true, y_pred, groups, num_groups, sample_weight=w),
        ref["tpr"], atol=ATOL)
    np.testing.assert_allclose(
        fair.false_positive_rate(y_true, y_pred, groups, num_groups, sample_weight=w),
        ref["fpr"], atol=ATOL)
    np.testing.assert_allclose(
        fair.group_accuracy(y_true, y_pred, groups, num_groups, sample_weight=w),
        ref["acc"], atol=ATOL)
    # Scores with a threshold give the same numbers as the hard labels they imply.
    np.testing.assert_allclose(
        fair.selection_rate(scores, groups, num_groups, sample_weight=w), ref["sel"], atol=ATOL)
    np.testing.assert_allclose(
        fair.group_accuracy(y_true, scores, groups, num_groups, sample_weight=w), ref["acc"],
        atol=ATOL)
    if num_groups == 2 and weighted:  # bool predictions: True is positive
        np.testing.assert_allclose(
            fair.selection_rate(y_pred.astype(bool), groups, num_groups, sample_weight=w),
            ref["sel"], atol=ATOL)


@pytest.mark.parametrize("num_groups,weighted", CASES)
@pytest.mark.parametrize("method", ["between_groups", "to_overall"])
def test_disparities_match_fairlearn(strict, num_groups, weighted, method):
    # n=300 as above: the compiled programs are shared (method and agg are not static).
    y_true, y_pred, scores, groups, w = _binary(num_groups * 7 + weighted, 300, num_groups,
                                                weighted)
    kw = dict(sensitive_features=groups, sample_weight=w, method=method)
    ours = dict(sample_weight=w, method=method)
    checks = [
        (fair.demographic_parity_difference(y_pred, groups, num_groups, **ours),
         fm.demographic_parity_difference(y_true, y_pred, **kw)),
        (fair.demographic_parity_ratio(y_pred, groups, num_groups, **ours),
         fm.demographic_parity_ratio(y_true, y_pred, **kw)),
        (fair.equal_opportunity_difference(y_true, y_pred, groups, num_groups, **ours),
         fm.equal_opportunity_difference(y_true, y_pred, **kw)),
        (fair.equal_opportunity_ratio(y_true, y_pred, groups, num_groups, **ours),
         fm.equal_opportunity_ratio(y_true, y_pred, **kw)),
    ]
    for agg in ("worst_case", "mean"):
        checks += [
            (fair.equalized_odds_difference(y_true, y_pred, groups, num_groups, agg=agg, **ours),
             fm.equalized_odds_difference(y_true, y_pred, agg=agg, **kw)),
            (fair.equalized_odds_ratio(y_true, y_pred, groups, num_groups, agg=agg, **ours),
             fm.equalized_odds_ratio(y_true, y_pred, agg=agg, **kw)),
        ]
    for got, want in checks:
        assert want > 1e-3  # a real disparity, not a trivial 0 = 0
        np.testing.assert_allclose(got, want, atol=ATOL)
    # Scores at a threshold: the same as the decisions they imply.
    np.testing.assert_allclose(
        fair.demographic_parity_difference(scores * 2, groups, num_groups, threshold=1.0, **ours),
        checks[0][1], atol=ATOL)


def test_float64_weights_give_float64_results_matching_fairlearn_tightly():
    y_true, y_pred, _, groups, _ = _binary(5, 200, 3)
    w = np.random.default_rng(0).uniform(0.1, 3.0, 200)
    with jax.enable_x64(True):
        got = fair.equalized_odds_difference(y_true, y_pred, groups, 3, sample_weight=w)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, fm.equalized_odds_difference(
            y_true, y_pred, sensitive_features=groups, sample_weight=w), atol=1e-12)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(n=st.sampled_from([8, 120]), num_groups=st.integers(1, 3),
       seed=st.integers(0, 10**6))
def test_demographic_parity_matches_fairlearn_over_sizes(n, num_groups, seed):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, num_groups, n).astype(np.int32)
    y_pred = rng.integers(0, 2, n).astype(np.int32)
    w = rng.uniform(0.1, 1.0, n).astype(np.float32)
    want = fm.demographic_parity_difference(y_pred, y_pred, sensitive_features=groups,
                                            sample_weight=w)
    got = fair.demographic_parity_difference(y_pred, groups, num_groups, sample_weight=w)
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_by_group_matches_metric_frame(strict):
    y_true, y_pred, _, groups, w = _binary(3, 250, 3, True)

    def weighted_accuracy(t, p, *, sample_weight):
        hits = jnp.where(t == p, sample_weight, 0)
        return jnp.sum(hits) / jnp.maximum(jnp.sum(sample_weight), 1e-12)

    got = jax.jit(lambda t, p, g, w: fair.by_group(weighted_accuracy, t, p, g, 3,
                                                   sample_weight=w))(y_true, y_pred, groups, w)
    frame = fm.MetricFrame(metrics=skm.accuracy_score, y_true=y_true, y_pred=y_pred,
                           sensitive_features=groups, sample_params={"sample_weight": w})
    np.testing.assert_allclose(got.by_group, frame.by_group.sort_index(), atol=ATOL)
    np.testing.assert_allclose(got.overall, frame.overall, atol=ATOL)
    np.testing.assert_allclose(got.group_min(), frame.group_min(), atol=ATOL)
    np.testing.assert_allclose(got.group_max(), frame.group_max(), atol=ATOL)
    for method in ("between_groups", "to_overall"):
        np.testing.assert_allclose(got.difference(method), frame.difference(method=method),
                                   atol=ATOL)
        np.testing.assert_allclose(got.ratio(method), frame.ratio(method=method), atol=ATOL)
    assert got.present.tolist() == [True, True, True]


def test_multiclass_one_vs_rest_matches_fairlearn_per_class(strict):
    rng = np.random.default_rng(4)
    n, num_classes = 300, 4
    groups = rng.integers(0, 3, n).astype(np.int32)
    scores = rng.normal(size=(n, num_classes)).astype(np.float32)
    scores[:, 0] += 0.5 * groups  # group-dependent class 0
    ids = scores.argmax(1).astype(np.int32)
    rates = fair.multiclass_selection_rate(scores, groups, 3)
    assert rates.shape == (3, num_classes)
    np.testing.assert_allclose(rates, fair.multiclass_selection_rate(ids, groups, 3,
                                                                     num_classes=num_classes))
    per_class = []
    for c in range(num_classes):
        frame = fm.MetricFrame(metrics=fm.selection_rate, y_true=ids, y_pred=ids,
                               sensitive_features=groups, sample_params={"pos_label": c})
        np.testing.assert_allclose(rates[:, c], frame.by_group.sort_index(), atol=ATOL)
        per_class.append(frame.difference())
    np.testing.assert_allclose(fair.multiclass_demographic_parity_difference(scores, groups, 3),
                               max(per_class), atol=ATOL)
    np.testing.assert_allclose(rates.sum(1), 1.0, atol=1e-6)
    # Two classes: the binary demographic parity difference of class 1.
    binary = ids % 2
    np.testing.assert_allclose(
        fair.multiclass_demographic_parity_difference(binary, groups, 3, num_classes=2),
        fair.demographic_parity_difference(binary, groups, 3), atol=ATOL)
    # Multiclass accuracy per group from scores.
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    frame = fm.MetricFrame(metrics=skm.accuracy_score, y_true=labels, y_pred=ids,
                           sensitive_features=groups)
    np.testing.assert_allclose(fair.group_accuracy(labels, scores, groups, 3),
                               frame.by_group.sort_index(), atol=ATOL)
    np.testing.assert_allclose(fair.group_accuracy(labels, ids, groups, 3),
                               frame.by_group.sort_index(), atol=ATOL)


# --- empty groups and edge cases -------------------------------------------------------


def test_empty_groups_are_excluded_not_nan(strict):
    y_true, y_pred, _, groups, _ = _binary(8, 200, 2)
    # num_groups=4: groups 2 and 3 never occur. fairlearn only sees the groups present.
    rates = fair.selection_rate(y_pred, groups, 4)
    assert rates[2] == 0 and rates[3] == 0
    kw = dict(sensitive_features=groups)
    np.testing.assert_allclose(fair.demographic_parity_difference(y_pred, groups, 4),
                               fm.demographic_parity_difference(y_true, y_pred, **kw), atol=ATOL)
    np.testing.assert_allclose(fair.demographic_parity_ratio(y_pred, groups, 4),
                               fm.demographic_parity_ratio(y_true, y_pred, **kw), atol=ATOL)
    np.testing.assert_allclose(fair.equalized_odds_difference(y_true, y_pred, groups, 4),
                               fm.equalized_odds_difference(y_true, y_pred, **kw), atol=ATOL)
    # A weight of 0 empties a group just as well.
    w = (groups == 0).astype(np.float32)
    assert float(fair.demographic_parity_difference(y_pred, groups, 2, sample_weight=w)) == 0
    assert float(fair.demographic_parity_ratio(y_pred, groups, 2, sample_weight=w)) == 1
    assert np.isfinite(np.asarray(fair.selection_rate(y_pred, groups, 2,
                                                      sample_weight=np.zeros(200)))).all()


def test_tpr_leaves_out_groups_without_positives():
    # Group 2 has no positive labels: its TPR is 0 but does not count as a 0 rate
    # (fairlearn would include TPR 0 and report a difference of max TPR).
    y_true = np.array([1, 1, 0, 1, 1, 0, 0, 0], np.int32)
    y_pred = np.array([1, 0, 1, 1, 1, 0, 1, 0], np.int32)
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2], np.int32)
    tpr = np.asarray(fair.true_positive_rate(y_true, y_pred, groups, 3))
    np.testing.assert_allclose(tpr, [0.5, 1.0, 0.0])
    fpr = [np.mean(y_pred[(groups == g) & (y_true == 0)]) for g in range(3)]
    np.testing.assert_allclose(fair.false_positive_rate(y_true, y_pred, groups, 3), fpr)
    np.testing.assert_allclose(fair.equal_opportunity_difference(y_true, y_pred, groups, 3), 0.5)
    np.testing.assert_allclose(  # bool labels and predictions: True is positive
        fair.true_positive_rate(y_true.astype(bool), y_pred.astype(bool), groups, 3), tpr)
    np.testing.assert_allclose(fair.equal_opportunity_ratio(y_true, y_pred, groups, 3), 0.5)
    np.testing.assert_allclose(fair.equalized_odds_difference(y_true, y_pred, groups, 3),
                               max(0.5, max(fpr) - min(fpr)))


def test_nobody_selected_gives_ratio_one_and_difference_zero():
    groups = np.array([0, 1, 1, 2], np.int32)
    zeros = np.zeros(4, np.int32)
    assert float(fair.demographic_parity_ratio(zeros, groups, 3)) == 1.0
    assert float(fair.demographic_parity_ratio(zeros, groups, 3, method="to_overall")) == 1.0
    assert float(fair.demographic_parity_difference(zeros, groups, 3)) == 0.0
    only = fair.by_group(lambda t, p, sample_weight: jnp.sum(sample_weight), zeros, zeros,
                         np.zeros(4, np.int32), 2)
    assert only.present.tolist() == [True, False]
    assert float(only.difference()) == 0.0 and float(only.ratio()) == 1.0
    # Float labels: positive from 0.5 up.
    np.testing.assert_allclose(
        fair.true_positive_rate(np.array([1.0, 0.7, 0.2, 1.0]), np.array([1, 0, 1, 1]),
                                groups, 3), [1.0, 0.0, 1.0])


def test_group_accuracy_float_labels_are_positive_from_one_half_with_class_ids():
    # Float binary labels against integer class ids: 0.9 and 0.7 are positive (a cast to
    # int truncated them to 0), the same as against scores and as in true_positive_rate.
    y_true = np.array([0.9, 0.2, 0.7, 1.0], np.float32)
    groups = np.array([0, 0, 1, 1], np.int32)
    ids = np.array([1, 0, 1, 0], np.int32)
    np.testing.assert_allclose(fair.group_accuracy(y_true, ids, groups, 2), [1.0, 0.5])
    np.testing.assert_allclose(fair.group_accuracy(y_true, ids.astype(np.float32), groups, 2),
                               [1.0, 0.5])


# --- jit, vmap --------------------------------------------------------------------------


def test_jit_and_vmap_agree_with_eager(strict):
    y_true, y_pred, scores, groups, w = _binary(9, 64, 3, True)
    fns = {
        "dp": lambda t, p, g, w: fair.demographic_parity_ratio(p, g, 3, sample_weight=w,
                                                               method="to_overall"),
        "eo": lambda t, p, g, w: fair.equalized_odds_difference(t, p, g, 3, sample_weight=w),
        "pen": lambda t, p, g, w: fair.equalized_odds_penalty(p, t, g, 3, sample_weight=w),
    }
    stack = np.stack([scores, scores[::-1], np.roll(scores, 5)])  # [3, n]
    for name, f in fns.items():
        eager = f(y_true, scores, groups, w)
        np.testing.assert_allclose(jax.jit(f)(y_true, scores, groups, w), eager, atol=1e-6,
                                   err_msg=name)
        batched = jax.vmap(f, in_axes=(None, 0, None, None))(y_true, stack, groups, w)
        looped = np.stack([f(y_true, s, groups, w) for s in stack])
        np.testing.assert_allclose(batched, looped, atol=1e-6, err_msg=name)
    multi = jax.vmap(lambda s: fair.multiclass_demographic_parity_difference(s, groups, 3))(
        np.stack([np.stack([scores, 1 - scores], 1)] * 2))
    np.testing.assert_allclose(multi, fair.demographic_parity_difference(
        (scores < 0.5).astype(np.int32), groups, 3), atol=1e-6)


# --- penalties ---------------------------------------------------------------------------


def _probs(seed, n=60, num_groups=3):
    rng = np.random.default_rng(seed)
    groups = np.arange(n, dtype=np.int32) % num_groups
    probs = rng.uniform(0.05, 0.95, n) + 0.05 * groups
    labels = rng.integers(0, 2, n).astype(np.int32)
    return probs, labels, groups


def _np_dp_penalty(probs, groups, num_groups, kind, weights=None):
    weights = np.ones_like(probs) if weights is None else weights
    means = [np.sum(probs * weights * (groups == g)) / np.sum(weights * (groups == g))
             for g in range(num_groups) if np.sum(weights * (groups == g)) > 0]
    if len(means) < 2:
        return 0.0
    if kind == "absolute":
        return max(means) - min(means)
    pairs = [(a - b) ** 2 for i, a in enumerate(means) for b in means[i + 1:]]
    return np.mean(pairs)


@pytest.mark.parametrize("kind", ["squared", "absolute"])
@pytest.mark.parametrize("num_groups", [2, 3])
def test_penalties_match_numpy(strict, kind, num_groups):
    probs, labels, groups = _probs(1, 60, num_groups)
    w = np.random.default_rng(2).uniform(0, 2, 60)
    with jax.enable_x64(True):
        got = fair.demographic_parity_penalty(probs, groups, num_groups, kind=kind,
                                              sample_weight=w)
        np.testing.assert_allclose(got, _np_dp_penalty(probs, groups, num_groups, kind, w),
                                   rtol=1e-12)
        eo = fair.equalized_odds_penalty(probs, labels, groups, num_groups, kind=kind,
                                         sample_weight=w)
        want = (_np_dp_penalty(probs, groups, num_groups, kind, w * (labels == 1))
                + _np_dp_penalty(probs, groups, num_groups, kind, w * (labels == 0)))
        np.testing.assert_allclose(eo, want, rtol=1e-12)
    # The absolute penalty of hard 0/1 "probabilities" is the metric itself.
    hard = (probs > 0.5).astype(np.float32)
    np.testing.assert_allclose(
        fair.demographic_parity_penalty(hard, groups, num_groups, kind="absolute"),
        fair.demographic_parity_difference(hard, groups, num_groups), atol=1e-6)


def test_penalties_vanish_for_identical_groups_and_are_positive_otherwise(strict):
    rng = np.random.default_rng(3)
    base = rng.uniform(0.1, 0.9, 20).astype(np.float32)
    labels = rng.integers(0, 2, 20).astype(np.int32)
    # Every group holds exactly the same (probability, label) pairs.
    probs, ys = np.tile(base, 3), np.tile(labels, 3)
    groups = np.repeat(np.arange(3, dtype=np.int32), 20)
    for kind in ("squared", "absolute"):
        # 0 up to float32 rounding: each group's sum runs over different positions.
        tol = 1e-12 if kind == "squared" else 1e-6
        assert float(fair.demographic_parity_penalty(probs, groups, 3, kind=kind)) < tol
        assert float(fair.equalized_odds_penalty(probs, ys, groups, 3, kind=kind)) < 2 * tol
        shifted = probs + 0.05 * (groups == 1)
        assert float(fair.demographic_parity_penalty(shifted, groups, 3, kind=kind)) > 0
        assert float(fair.equalized_odds_penalty(shifted, ys, groups, 3, kind=kind)) > 0
    # Fewer than two non-empty groups: nothing to compare.
    assert float(fair.demographic_parity_penalty(base, np.zeros(20, np.int32), 2)) == 0


@pytest.mark.parametrize("kind", ["squared", "absolute"])
def test_penalty_gradients_match_finite_differences(kind):
    probs, labels, groups = _probs(5, 30, 3)
    w = np.random.default_rng(6).uniform(0.5, 1.5, 30)
    with jax.enable_x64(True):
        probs, w = jnp.asarray(probs), jnp.asarray(w)
        dp = lambda p: fair.demographic_parity_penalty(p, groups, 4, kind=kind, sample_weight=w)
        eo = lambda p: fair.equalized_odds_penalty(p, labels, groups, 4, kind=kind,
                                                   sample_weight=w)
        # Group 3 is empty: it must not leak NaN into the gradient.
        for f in (dp, eo):
            check_grads(f, (probs,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
            assert np.isfinite(np.asarray(jax.grad(f)(probs))).all()
        if kind == "squared":
            check_grads(dp, (probs,), order=2, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_masked_examples_do_not_change_the_penalty(strict):
    probs, labels, groups = _probs(7, 40, 2)
    probs = probs.astype(np.float32)
    mask = (np.arange(40) < 30).astype(np.float32)
    changed = probs.copy()
    changed[30:] = 1 - changed[30:]
    for f in (lambda p: fair.demographic_parity_penalty(p, groups, 2, sample_weight=mask),
              lambda p: fair.equalized_odds_penalty(p, labels, groups, 2, sample_weight=mask)):
        np.testing.assert_allclose(f(probs), f(changed), rtol=1e-6)


# --- make_fair_loss ----------------------------------------------------------------------


def test_fair_loss_adds_the_penalty_for_one_and_two_logits(strict):
    rng = np.random.default_rng(8)
    logit = rng.normal(size=16).astype(np.float32)
    batch = {"labels": rng.integers(0, 2, 16).astype(np.int32),
             "groups": np.arange(16, dtype=np.int32) % 2,
             "mask": (np.arange(16) < 14).astype(np.float32)}
    probs = 1 / (1 + np.exp(-logit.astype(np.float64)))
    m = batch["mask"]
    y = batch["labels"]
    bce = -(y * np.log(probs) + (1 - y) * np.log1p(-probs))
    task = np.sum(bce * m) / m.sum()
    penalty = _np_dp_penalty(probs, batch["groups"], 2, "squared", m)
    loss_fn = fair.make_fair_loss(weight=3.0, num_groups=2)
    two = np.stack([np.zeros(16, np.float32), logit], 1)  # softmax(0, l)[1] = sigmoid(l)
    for outputs in (logit, logit[:, None], two):
        total, metrics = loss_fn(outputs, batch)
        np.testing.assert_allclose(metrics["task_loss"], task, rtol=1e-5)
        np.testing.assert_allclose(metrics["fairness_penalty"], penalty, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(total, task + 3.0 * penalty, rtol=1e-5)
        assert metrics["loss"] is total and "accuracy" in metrics
    # Penalty given as the function, as a name, or as a callable of (probs, batch).
    for penalty_arg in (fair.equalized_odds_penalty, "equalized_odds"):
        _, metrics = fair.make_fair_loss(penalty=penalty_arg, weight=1.0)(logit, batch)
        want = (_np_dp_penalty(probs, batch["groups"], 2, "squared", m * (y == 1))
                + _np_dp_penalty(probs, batch["groups"], 2, "squared", m * (y == 0)))
        np.testing.assert_allclose(metrics["fairness_penalty"], want, rtol=1e-4, atol=1e-7)
    custom = fair.make_fair_loss(penalty=lambda p, b: jnp.mean(p), weight=2.0)
    total, metrics = custom(logit, batch)
    np.testing.assert_allclose(metrics["fairness_penalty"], probs.mean(), rtol=1e-5)
    base = fair.make_fair_loss(lambda o, b: (jnp.sum(o), {"loss": jnp.sum(o)}), weight=0.0)
    np.testing.assert_allclose(base(logit, batch)[0], logit.sum(), rtol=1e-5)


# --- training with the mitigations --------------------------------------------------------


@pytest.fixture(scope="module")
def biased():
    data = fair.planted_bias_dataset(2000, bias_strength=1.5, seed=0)
    train = {k: jnp.asarray(v) for k, v in data.train.items()}
    return data, train


def _test_dp(data, log_odds):
    return float(fair.demographic_parity_difference(log_odds, data.test["groups"], 2,
                                                    threshold=0.0))


def test_penalty_training_reduces_demographic_parity_difference(biased):
    data, train = biased

    def fit(weight):
        step = make_train_step(fair.make_fair_loss(weight=weight, num_groups=2))

        @jax.jit
        def train_and_predict(key, train, x_test):
            state = TrainState.create(model=MLP((), out_features=1), tx=optax.adam(0.05),
                                      key=key, example_input=train["inputs"][:1])
            state, metrics = jax.lax.scan(lambda s, _: step(s, train), state, None, length=200)
            return state.apply_fn(state.variables, x_test)[:, 0], metrics

        log_odds, metrics = train_and_predict(jax.random.key(0), train, data.test["inputs"])
        assert bool(metrics["finite"].all())
        return _test_dp(data, log_odds), metrics

    dp_plain, m_plain = fit(0.0)
    dp_fair, m_fair = fit(10.0)
    print(f"logistic regression: test DP difference {dp_plain:.3f} without penalty, "
          f"{dp_fair:.3f} with demographic_parity_penalty (weight 10)")
    assert dp_plain > 0.1
    assert dp_fair < 0.5 * dp_plain
    assert float(m_fair["fairness_penalty"][-1]) < float(m_plain["fairness_penalty"][-1])


def test_adversarial_debiasing_hides_the_group(biased):
    data, train = biased

    def fit(alpha, projection):
        debias = fair.make_adversarial_debiasing_step(
            MLP((), out_features=1), MLP((), out_features=2),
            predictor_tx=optax.adam(0.05), adversary_tx=optax.adam(0.05), num_groups=2,
            alpha=alpha, projection=projection)

        @jax.jit
        def train_and_predict(key, train, x_test):
            state = debias.init(key, train["inputs"][:1])
            state, metrics = jax.lax.scan(lambda s, _: debias.step(s, train), state, None,
                                          length=200)
            pred = state.predictor
            return pred.apply_fn(pred.variables, x_test)[:, 0], metrics

        log_odds, metrics = train_and_predict(jax.random.key(0), train, data.test["inputs"])
        assert bool(metrics["finite"].all())
        return _test_dp(data, log_odds), metrics

    dp_plain, m_plain = fit(0.0, False)  # two independent models: the baseline
    dp_adv, m_adv = fit(1.0, True)
    acc_plain = float(m_plain["adversary_accuracy"][-1])
    acc_adv = float(m_adv["adversary_accuracy"][-1])
    print(f"adversarial debiasing: test DP difference {dp_plain:.3f} -> {dp_adv:.3f}, "
          f"adversary accuracy {acc_plain:.3f} -> {acc_adv:.3f}")
    majority = max(np.mean(data.train["groups"]), 1 - np.mean(data.train["groups"]))
    assert acc_plain > majority + 0.05  # the plain predictor's logit reveals the group
    assert acc_adv < acc_plain - 0.05
    assert dp_adv < 0.6 * dp_plain
    assert float(m_adv["accuracy"][-1]) > 0.7  # still learns the task


def test_adversarial_step_matches_the_update_rule_by_hand(strict):
    # One SGD step: the predictor moves by -lr * (gP - proj(gP on gA) - alpha * gA), the
    # adversary by -lr * gU, with the gradients of losses written out here.
    rng = np.random.default_rng(11)
    n, d, lr, alpha = 12, 3, 0.1, 0.7
    batch = {"inputs": rng.normal(size=(n, d)).astype(np.float32),
             "labels": rng.integers(0, 2, n).astype(np.int32),
             "groups": rng.integers(0, 2, n).astype(np.int32)}
    debias = fair.make_adversarial_debiasing_step(
        MLP((), out_features=1), MLP((), out_features=2), predictor_tx=optax.sgd(lr),
        adversary_tx=optax.sgd(lr), alpha=alpha, criterion="equalized_odds")
    state = jax.jit(debias.init)(jax.random.key(1), batch["inputs"][:1])
    new, metrics = jax.jit(debias.step)(state, batch)

    x, y, a = (jnp.asarray(batch[k]) for k in ("inputs", "labels", "groups"))
    yf = y.astype(jnp.float32)

    def flat(p):  # the linear model's parameters as one vector
        return jnp.concatenate([p["output"]["kernel"].ravel(), p["output"]["bias"]])

    def logit(w):
        return x @ w[:d] + w[d]

    def task(w):
        z = logit(w)
        return jnp.mean(jnp.logaddexp(0.0, z) - yf * z)

    def adversary(w, u):
        z = logit(w)
        feats = jnp.stack([z, yf, z * yf], 1)
        logits = feats @ u["output"]["kernel"] + u["output"]["bias"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(n), a])

    w0 = flat(state.predictor.params)
    u0 = state.adversary.params
    g_p = jax.jit(jax.grad(task))(w0)
    g_a, g_u = jax.jit(jax.grad(adversary, argnums=(0, 1)))(w0, u0)
    direction = g_p - (g_p @ g_a) / (g_a @ g_a) * g_a - alpha * g_a
    np.testing.assert_allclose(flat(new.predictor.params), w0 - lr * direction, rtol=1e-5,
                               atol=1e-6)
    for got, u, g in zip(jax.tree.leaves(new.adversary.params), jax.tree.leaves(u0),
                         jax.tree.leaves(g_u), strict=True):
        np.testing.assert_allclose(got, u - lr * g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], task(w0), rtol=1e-5)
    np.testing.assert_allclose(metrics["adversary_loss"], adversary(w0, u0), rtol=1e-5)
    assert int(new.predictor.step) == 1 and int(new.adversary.step) == 1


# --- the planted-bias generator -----------------------------------------------------------


def _base_rate(k, b):
    """E[sigmoid(k (q - b))] for q ~ N(0, 1), by quadrature on a fine grid."""
    q = np.linspace(-10, 10, 20001)
    density = np.exp(-q**2 / 2) / np.sqrt(2 * np.pi)
    return np.sum(density / (1 + np.exp(-k * (q - b)))) * (q[1] - q[0])


def test_generator_is_deterministic_and_documented():
    a = fair.planted_bias_dataset(500, bias_strength=1.0, seed=3)
    b = fair.planted_bias_dataset(500, bias_strength=1.0, seed=3)
    c = fair.planted_bias_dataset(500, bias_strength=1.0, seed=4)
    for split in ("train", "val", "test"):
        for key in ("inputs", "labels", "groups"):
            np.testing.assert_array_equal(a[split][key], b[split][key])
        assert a[split]["groups"].dtype == np.int32 and a[split]["labels"].dtype == np.int32
        assert a[split]["inputs"].shape == (len(a[split]["labels"]), 4)
    assert not np.array_equal(a.train["inputs"], c.train["inputs"])
    assert a.num_classes == 2 and a.input_shape == (4,)
    assert sum(len(a[s]["labels"]) for s in ("train", "val", "test")) == 500
    with_group = fair.planted_bias_dataset(500, bias_strength=1.0, seed=3,
                                           include_group_feature=True)
    assert with_group.input_shape == (5,)
    assert with_group.info["feature_names"][-1] == "group"
    # The appended column is the (standardized) group id itself.
    col = with_group.train["inputs"][:, -1]
    assert np.corrcoef(col, with_group.train["groups"])[0, 1] > 0.999


@pytest.mark.parametrize("bias", [0.0, 1.0])
def test_base_rates_follow_the_generative_process(bias):
    data = fair.planted_bias_dataset(20000, bias_strength=bias, seed=1,
                                     fractions=(0.8, 0.1, 0.1))
    labels = np.concatenate([data[s]["labels"] for s in ("train", "val", "test")])
    groups = np.concatenate([data[s]["groups"] for s in ("train", "val", "test")])
    for g, want in ((0, _base_rate(4.0, 0.0)), (1, _base_rate(4.0, bias))):
        rate = labels[groups == g].mean()
        se = np.sqrt(want * (1 - want) / np.sum(groups == g))
        assert abs(rate - want) < 4 * se, (g, rate, want)
    gap = labels[groups == 0].mean() - labels[groups == 1].mean()
    if bias == 0:
        assert abs(gap) < 0.03
    else:
        assert gap > 0.25


# --- errors --------------------------------------------------------------------------------


def test_errors_speak_the_users_language():
    yp = np.array([0, 1, 1, 0], np.int32)
    g = np.array([0, 1, 2, 1], np.int32)
    with pytest.raises(ValueError, match=r"selection_rate: group ids must lie in \[0, num_groups\) = \[0, 2\), got ids from 0 to 2"):
        fair.selection_rate(yp, g, 2)
    with pytest.raises(ShapeError, match=r"demographic_parity_difference expected groups of shape \[n\] = \(4,\).*got shape \(3,\)"):
        fair.demographic_parity_difference(yp, g[:3], 3)
    with pytest.raises(ShapeError, match=r"equalized_odds_difference expected y_true of shape \[n = \(4,\)\].*got shape \(5,\)"):
        fair.equalized_odds_difference(np.zeros(5, np.int32), yp, g, 3)
    with pytest.raises(ShapeError, match=r"selection_rate expected y_pred of shape \[n\].*got shape \(4, 2\)"):
        fair.selection_rate(np.zeros((4, 2), np.float32), g, 3)
    with pytest.raises(TypeError, match=r"selection_rate expected integer group ids.*got dtype float32"):
        fair.selection_rate(yp, g.astype(np.float32), 3)
    with pytest.raises(ValueError, match=r"num_groups to be a Python int >= 1.*got 0"):
        fair.selection_rate(yp, g, 0)
    with pytest.raises(ShapeError, match=r"sample_weight of shape \[n\] = \(4,\), got shape \(2,\)"):
        fair.selection_rate(yp, g, 3, sample_weight=np.ones(2))
    with pytest.raises(ValueError, match=r"non-negative sample_weight, got minimum -1"):
        fair.selection_rate(yp, g, 3, sample_weight=np.array([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"method 'between_groups' or 'to_overall', got 'max'"):
        fair.demographic_parity_ratio(yp, g, 3, method="max")
    with pytest.raises(ValueError, match=r"agg 'worst_case' or 'mean', got 'sum'"):
        fair.equalized_odds_ratio(yp, yp, g, 3, agg="sum")
    with pytest.raises(ShapeError, match=r"scalar threshold, got shape \(2,\)"):
        fair.selection_rate(yp.astype(np.float32), g, 3, threshold=np.ones(2))
    with pytest.raises(ValueError, match=r"multiclass_selection_rate needs num_classes"):
        fair.multiclass_selection_rate(yp, g, 3)
    with pytest.raises(ValueError, match=r"num_classes to be a Python int >= 1, got 0"):
        fair.multiclass_selection_rate(yp, g, 3, num_classes=0)
    with pytest.raises(ShapeError, match=r"scores of shape \[n, classes\] with classes=3, got shape \(4, 2\)"):
        fair.multiclass_selection_rate(np.zeros((4, 2), np.float32), g, 3, num_classes=3)
    with pytest.raises(ShapeError, match=r"integer class ids of shape \[n\] or float scores"):
        fair.multiclass_demographic_parity_difference(np.zeros((4, 2), np.int32), g, 3)
    with pytest.raises(ShapeError, match=r"group_accuracy expected y_pred of shape \[n\] or \[n, classes\] with n=4 \(the length of y_true\), got shape \(3, 2\)"):
        fair.group_accuracy(yp, np.zeros((3, 2), np.float32), g, 3)
    with pytest.raises(ShapeError, match=r"by_group expected y_true and y_pred with the same leading axis"):
        fair.by_group(lambda t, p, sample_weight: 0.0, yp, yp[:3], g, 3)
    with pytest.raises(ValueError, match=r"GroupedMetric.ratio expected method"):
        fair.by_group(lambda t, p, sample_weight: jnp.sum(sample_weight), yp, yp, g, 3).ratio("x")


def test_penalty_and_loss_errors():
    g = np.array([0, 1, 0, 1], np.int32)
    p = np.full(4, 0.5, np.float32)
    with pytest.raises(TypeError, match=r"demographic_parity_penalty expected floating-point probs"):
        fair.demographic_parity_penalty(g, g, 2)
    with pytest.raises(ShapeError, match=r"demographic_parity_penalty expected probs of shape \[n\]"):
        fair.demographic_parity_penalty(p[None], g, 2)
    with pytest.raises(ValueError, match=r"kind 'squared' or 'absolute', got 'l2'"):
        fair.demographic_parity_penalty(p, g, 2, kind="l2")
    with pytest.raises(ShapeError, match=r"equalized_odds_penalty expected labels of shape \[n = \(4,\)\]"):
        fair.equalized_odds_penalty(p, g[:2], g, 2)
    with pytest.raises(ValueError, match=r"group ids must lie in \[0, num_groups\) = \[0, 1\)"):
        fair.demographic_parity_penalty(p, g, 1)
    with pytest.raises(ValueError, match=r"make_fair_loss expected penalty 'demographic_parity'.*got 'parity'"):
        fair.make_fair_loss(penalty="parity")
    with pytest.raises(ValueError, match=r"make_fair_loss expected weight >= 0, got -1"):
        fair.make_fair_loss(weight=-1)
    loss_fn = fair.make_fair_loss()
    with pytest.raises(KeyError, match=r"make_fair_loss: the batch has no 'groups' entry"):
        loss_fn(p, {"labels": g})
    with pytest.raises(ShapeError, match=r"make_fair_loss expected binary classifier outputs: logits of shape \[batch, 2\], \[batch, 1\] or \[batch\], got float32 outputs of shape \(4, 3\)"):
        loss_fn(np.zeros((4, 3), np.float32), {"labels": g, "groups": g})
    with pytest.raises(ValueError, match=r"criterion 'demographic_parity' or 'equalized_odds'"):
        fair.adversary_features(p, g, "parity")
    kw = dict(predictor_tx=optax.sgd(0.1), adversary_tx=optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"make_adversarial_debiasing_step expected criterion"):
        fair.make_adversarial_debiasing_step(MLP((), 1), MLP((), 2), criterion="x", **kw)
    with pytest.raises(ValueError, match=r"expected alpha >= 0, got -1"):
        fair.make_adversarial_debiasing_step(MLP((), 1), MLP((), 2), alpha=-1, **kw)
    debias = fair.make_adversarial_debiasing_step(MLP((), 1), MLP((), 3), **kw)
    x = np.zeros((4, 2), np.float32)
    state = jax.jit(debias.init)(jax.random.key(0), x)
    with pytest.raises(ShapeError, match=r"adversary logits of shape \[batch, num_groups\] = \(4, 2\), got \(4, 3\)"):
        jax.jit(debias.step)(state, {"inputs": x, "labels": g, "groups": g})


def test_generator_errors():
    with pytest.raises(ValueError, match=r"planted_bias_dataset expected n to be an int >= 20, got 5"):
        fair.planted_bias_dataset(5, bias_strength=1.0)
    with pytest.raises(ValueError, match=r"bias_strength >= 0.*got -0.5"):
        fair.planted_bias_dataset(100, bias_strength=-0.5)
    with pytest.raises(ValueError, match=r"group_fraction in \(0, 1\), got 1.0"):
        fair.planted_bias_dataset(100, bias_strength=1.0, group_fraction=1.0)
    with pytest.raises(ValueError, match=r"proxy_noise >= 0 and score_noise >= 0"):
        fair.planted_bias_dataset(100, bias_strength=1.0, proxy_noise=-1.0)
    with pytest.raises(ValueError, match=r"label_sharpness > 0, got 0"):
        fair.planted_bias_dataset(100, bias_strength=1.0, label_sharpness=0)
