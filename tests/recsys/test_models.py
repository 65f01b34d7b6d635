"""Dot-product recommenders: scores from their tables, masking of the history bag, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnlib.recsys import MatrixFactorization, TwoTower, popularity_scores


def test_matrix_factorization_score_is_embedding_dot_plus_item_bias():
    model = MatrixFactorization(5, 7, dim=3)
    inputs = {"users": jnp.array([0, 4]), "items": jnp.array([6, 2])}
    params = model.init(jax.random.key(0), inputs)["params"]
    # give the biases non-zero values to see them in the score
    params = {**params, "item_bias": {"embedding": jnp.arange(7.0)[:, None]}}
    out = model.apply({"params": params}, inputs)
    p = np.asarray(params["user_embedding"]["embedding"])
    q = np.asarray(params["item_embedding"]["embedding"])
    want = np.sum(p[[0, 4]] * q[[6, 2]], axis=1) + np.array([6.0, 2.0])
    np.testing.assert_allclose(np.sum(out["users"] * out["items"], 1), want, rtol=1e-6)
    assert out["users"].shape == (2, 4)  # dim + 1: the constant 1 that picks up the bias


@pytest.fixture(scope="module")
def tower():
    model = TwoTower(6, 9, dim=4, hidden_sizes=(8,))
    features = jax.random.normal(jax.random.key(1), (9, 3))
    inputs = {"users": jnp.array([0, 5]), "items": jnp.array([1, 2]),
              "history": jnp.array([[3, 4, 0], [7, 8, 8]]),
              "history_mask": jnp.array([[True, True, False], [True, True, True]]),
              "item_features": features[jnp.array([1, 2])],
              "negatives": jnp.array([[4, 5], [0, 1]]), "negative_features": features[
                  jnp.array([[4, 5], [0, 1]])]}
    variables = model.init(jax.random.key(0), inputs)
    return model, variables, inputs, features


def test_two_tower_masked_history_entries_are_ignored(tower):
    model, variables, inputs, _ = tower
    u = model.apply(variables, inputs["users"], inputs["history"], inputs["history_mask"],
                    method="user_vectors")
    # the masked slot (item 0 for user 0) can hold anything: same vector as without it
    other = inputs["history"].at[0, 2].set(7)
    u2 = model.apply(variables, inputs["users"], other, inputs["history_mask"],
                     method="user_vectors")
    np.testing.assert_allclose(u, u2, rtol=1e-6)
    # a mean bag: a history of [a, b] equals [a, b, a, b]
    u3 = model.apply(variables, inputs["users"][:1], jnp.array([[3, 4, 3, 4]]),
                     method="user_vectors")
    np.testing.assert_allclose(u[:1], u3, rtol=1e-5, atol=1e-6)


def test_two_tower_call_matches_towers_and_jit(tower):
    model, variables, inputs, features = tower
    out = model.apply(variables, inputs)
    assert out["users"].shape == (2, 5) and out["negatives"].shape == (2, 2, 5)
    v = model.apply(variables, jnp.arange(9), features, method="item_vectors")  # [9, 5]
    np.testing.assert_allclose(out["items"], v[jnp.array([1, 2])], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["negatives"], v[inputs["negatives"]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(model.apply)(variables, inputs)["users"], out["users"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["users"][:, -1], 1.0)  # the item bias' partner


def test_two_tower_errors_name_the_missing_input(tower):
    model, variables, inputs, _ = tower
    with pytest.raises(ValueError, match="TwoTower.user_vectors expected history"):
        model.apply(variables, inputs["users"], method="user_vectors")
    with pytest.raises(ValueError, match="TwoTower.item_vectors expected features"):
        model.apply(variables, inputs["items"], method="item_vectors")
    with pytest.raises(TypeError, match="TwoTower expected users as int ids"):
        model.apply(variables, jnp.array([0.0, 1.0]), inputs["history"], method="user_vectors")
    with pytest.raises(KeyError, match="missing \\['users'\\]"):
        model.apply(variables, {"items": inputs["items"]})


def test_popularity_scores_rank_by_count():
    scores = popularity_scores(np.array([3, 0, 7]))
    assert scores.dtype == jnp.float32
    np.testing.assert_array_equal(np.argsort(-np.asarray(scores)), [2, 0, 1])
