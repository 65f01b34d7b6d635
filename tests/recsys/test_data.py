"""The synthetic implicit-feedback generator's documented properties, and the splits."""

import itertools

import numpy as np
import pytest

from nnlib.recsys import (
    interaction_mask,
    leave_k_out,
    power_law_popularity,
    recall_at_k,
    synthetic_implicit_feedback,
)


@pytest.fixture(scope="module")
def data():
    return synthetic_implicit_feedback(300, 80, dim=4, interactions_per_user=10, seed=3)


def test_shapes_distinct_items_and_seed(data):
    assert data.interactions.shape == (300, 10) and data.interactions.dtype == np.int32
    assert data.user_factors.shape == (300, 4) and data.item_factors.shape == (80, 4)
    assert data.item_features.shape == (80, 4) and data.item_popularity.shape == (80,)
    assert all(len(set(row)) == 10 for row in data.interactions)
    assert data.interactions.min() >= 0 and data.interactions.max() < 80
    again = synthetic_implicit_feedback(300, 80, dim=4, interactions_per_user=10, seed=3)
    np.testing.assert_array_equal(again.interactions, data.interactions)
    other = synthetic_implicit_feedback(300, 80, dim=4, interactions_per_user=10, seed=4)
    assert not np.array_equal(other.interactions, data.interactions)


def test_power_law_popularity_is_zipf_over_a_random_order():
    p = power_law_popularity(50, 1.3, np.random.default_rng(0))
    assert p.sum() == pytest.approx(1.0, abs=1e-6)
    ranked = np.sort(p)[::-1]
    np.testing.assert_allclose(ranked / ranked[0], np.arange(1, 51) ** -1.3, rtol=1e-5)
    assert not np.all(np.diff(p) <= 0)  # item id says nothing about popularity


def test_true_logits_formula(data):
    u, v, p = data.user_factors, data.item_factors, data.item_popularity
    want = (data.preference_scale * u @ v.T / np.sqrt(4) + np.log(p)) / data.temperature
    np.testing.assert_allclose(data.true_logits(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data.true_logits([5, 2]), want[[5, 2]], rtol=1e-5, atol=1e-5)


def test_draws_follow_plackett_luce_without_replacement():
    # preference_scale=0: every user draws from softmax(log p / T), i.e. weights
    # w_j ∝ p_j ** (1/T). First draw: P(j) = w_j. In the first two draws:
    # P(j) = w_j + sum_{i != j} w_i w_j / (1 - w_i) (enumerated).
    users = 20000
    d = synthetic_implicit_feedback(users, 6, dim=2, interactions_per_user=2,
                                    popularity_exponent=1.5, preference_scale=0.0,
                                    temperature=0.8, seed=0)
    w = d.item_popularity.astype(np.float64) ** (1 / 0.8)
    w /= w.sum()
    pair = np.zeros(6)
    for i, j in itertools.permutations(range(6), 2):
        prob = w[i] * w[j] / (1 - w[i])
        pair[i] += prob
        pair[j] += prob
    first = np.bincount(d.interactions[:, 0], minlength=6) / users
    both = np.bincount(d.interactions.reshape(-1), minlength=6) / users
    for got, want in ((first, w), (both, pair)):
        se = np.sqrt(want * (1 - want) / users)  # each user holds j or not
        assert np.all(np.abs(got - want) < 5 * se), (got, want)


def test_popularity_skew_and_preferences_shape_the_draws():
    d = synthetic_implicit_feedback(1000, 200, dim=8, interactions_per_user=10,
                                    popularity_exponent=1.0, preference_scale=2.0, seed=1)
    counts = np.bincount(d.interactions.reshape(-1), minlength=200)
    # popular items are chosen more: the top decile by p holds far more than 10% of draws
    top = np.argsort(-d.item_popularity)[:20]
    assert counts[top].sum() / counts.sum() > 0.3
    # users choose items they prefer: chosen items' affinity u.v beats the catalogue's
    affinity = d.user_factors @ d.item_factors.T
    chosen = np.take_along_axis(affinity, d.interactions, axis=1)
    assert chosen.mean() > affinity.mean() + 1.0


def test_temperature_sets_how_predictable_users_are():
    # the oracle (true logits, training items masked) recovers almost every
    # held-out item at a low temperature and fewer at a high one
    recalls = []
    for temperature in (0.1, 2.0):
        d = synthetic_implicit_feedback(200, 100, dim=4, interactions_per_user=10,
                                        temperature=temperature, seed=2)
        split = leave_k_out(d.interactions, 100, num_test=2, num_val=0)
        recall = recall_at_k(d.true_logits(), interaction_mask(split.test, 100),
                             interaction_mask(split.train, 100), k=10)
        recalls.append(float(np.mean(recall)))
    assert recalls[0] > 0.9 and recalls[1] < 0.6, recalls


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_item_features_are_a_noisy_linear_view_of_item_factors(noise):
    d = synthetic_implicit_feedback(10, 400, dim=3, interactions_per_user=2,
                                    num_item_features=5, feature_noise=noise, seed=0)
    coef, *_ = np.linalg.lstsq(d.item_factors, d.item_features, rcond=None)
    residual = d.item_features - d.item_factors @ coef
    assert residual.std() == pytest.approx(noise, abs=0.05)


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="interactions_per_user < num_items"):
        synthetic_implicit_feedback(5, 4, interactions_per_user=4)
    with pytest.raises(ValueError, match="expected temperature > 0"):
        synthetic_implicit_feedback(5, 10, interactions_per_user=2, temperature=0.0)


def test_leave_k_out_partitions_each_users_items(data):
    split = leave_k_out(data.interactions, 80, num_test=2, num_val=3, seed=0)
    assert split.train.shape == (300, 5) and split.val.shape == (300, 3)
    assert split.test.shape == (300, 2) and split.num_users == 300
    joined = np.concatenate([split.test, split.val, split.train], axis=1)
    np.testing.assert_array_equal(np.sort(joined, 1), np.sort(data.interactions, 1))
    # held-out positions are random, not always the last draws
    position = np.argmax(data.interactions == split.test[:, :1], axis=1)
    assert len(np.unique(position)) == 10
    pairs = split.train_pairs()
    np.testing.assert_array_equal(pairs[:5], np.stack([np.zeros(5), split.train[0]], 1))
    np.testing.assert_array_equal(split.item_counts(),
                                  np.bincount(split.train.reshape(-1), minlength=80))
    with pytest.raises(ValueError, match="num_test \\+ num_val < n = 10"):
        leave_k_out(data.interactions, 80, num_test=5, num_val=5)


def test_interaction_mask_matches_loops():
    items = np.array([[0, 3], [2, 1]])
    want = np.zeros((2, 4), bool)
    for u, row in enumerate(items):
        for i in row:
            want[u, i] = True
    np.testing.assert_array_equal(interaction_mask(items, 4), want)
