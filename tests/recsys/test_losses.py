"""Recommendation losses against numpy closed forms, finite differences and the full softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from nnlib.recsys import (
    MatrixFactorization,
    accidental_hits,
    bpr_loss,
    in_batch_softmax_loss,
    make_bpr_loss,
    make_in_batch_softmax_loss,
    make_sampled_softmax_loss,
    sampled_softmax_loss,
    weighted_matrix_factorization_loss,
)

RNG = np.random.default_rng(0)


def np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("negative_shape", [(6,), (6, 4)], ids=["one", "several"])
def test_bpr_matches_closed_form_and_gradient(negative_shape):
    pos = RNG.standard_normal(6)
    neg = RNG.standard_normal(negative_shape) * 3
    diff = neg - pos.reshape(6, *([1] * (neg.ndim - 1)))
    want = np.mean(np.log1p(np.exp(diff)))  # -log sigmoid(pos - neg)
    assert float(bpr_loss(jnp.asarray(pos), jnp.asarray(neg))) == pytest.approx(want, rel=1e-6)
    # closed-form gradient: d/d neg = sigmoid(neg - pos) / pairs, d/d pos = -its row sum
    g_pos, g_neg = jax.grad(bpr_loss, argnums=(0, 1))(jnp.asarray(pos), jnp.asarray(neg))
    sig = 1 / (1 + np.exp(-diff)) / diff.size
    np.testing.assert_allclose(g_neg, sig, rtol=1e-5)
    np.testing.assert_allclose(g_pos, -sig.reshape(6, -1).sum(1), rtol=1e-5)
    with jax.enable_x64(True):
        check_grads(bpr_loss, (jnp.asarray(pos, jnp.float64), jnp.asarray(neg, jnp.float64)),
                    order=2, modes=["rev"])


def test_bpr_is_stable_for_large_margins():
    loss = bpr_loss(jnp.array([100.0, -100.0]), jnp.array([-100.0, 100.0]))
    assert float(loss) == pytest.approx(100.0, rel=1e-6)  # mean(0, 200)


def test_sampled_softmax_with_every_item_sampled_is_the_full_softmax():
    batch, items = 5, 9
    scores = RNG.standard_normal((batch, items)).astype(np.float32) * 2
    labels = RNG.integers(0, items, batch)
    full = -np.mean(np_log_softmax(scores)[np.arange(batch), labels])
    negatives = np.tile(np.arange(items), (batch, 1))  # every item, the positive too ...
    exclude = negatives == labels[:, None]  # ... removed as an accidental hit
    got = sampled_softmax_loss(jnp.asarray(scores[np.arange(batch), labels]),
                               jnp.asarray(scores), exclude=jnp.asarray(exclude))
    assert float(got) == pytest.approx(full, rel=1e-6)
    # a uniform sampler's log q shifts every logit equally: no change
    log_q = np.full((batch, items), np.log(1 / items), np.float32)
    shifted = sampled_softmax_loss(jnp.asarray(scores[np.arange(batch), labels]),
                                   jnp.asarray(scores), positive_log_q=jnp.asarray(log_q[:, 0]),
                                   negative_log_q=jnp.asarray(log_q), exclude=jnp.asarray(exclude))
    assert float(shifted) == pytest.approx(full, rel=1e-6)


def test_sampled_softmax_log_q_correction_and_gradient():
    pos, neg = RNG.standard_normal(4), RNG.standard_normal((4, 3))
    pos_q, neg_q = np.log(RNG.uniform(0.01, 0.5, 4)), np.log(RNG.uniform(0.01, 0.5, (4, 3)))
    logits = np.concatenate([(pos - pos_q)[:, None], neg - neg_q], axis=1)
    want = -np.mean(np_log_softmax(logits)[:, 0])
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (pos, neg, pos_q, neg_q)]
        f = lambda p, n: sampled_softmax_loss(p, n, positive_log_q=args[2],
                                              negative_log_q=args[3])
        assert float(f(*args[:2])) == pytest.approx(want, rel=1e-10)
        check_grads(f, tuple(args[:2]), order=2, modes=["rev"])


def test_accidental_hits_matches_loops():
    items = np.array([3, 5, 3, 7, 1])
    history = np.array([[5, -1], [1, 2], [9, 9], [3, 3], [-1, -1]])
    want = np.zeros((5, 5), bool)
    for b in range(5):
        for c in range(5):
            want[b, c] = c != b and (items[c] == items[b] or items[c] in history[b])
    np.testing.assert_array_equal(accidental_hits(jnp.asarray(items), jnp.asarray(history)), want)


def test_in_batch_softmax_matches_numpy():
    b, d = 6, 3
    u, v = RNG.standard_normal((b, d)), RNG.standard_normal((b, d))
    log_q = np.log(RNG.uniform(0.05, 0.5, b))
    exclude = RNG.random((b, b)) < 0.3
    logits = u @ v.T - log_q[None]
    logits[exclude & ~np.eye(b, dtype=bool)] = -np.inf
    want = -np.mean(np.diag(np_log_softmax(logits)))
    got = in_batch_softmax_loss(jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32),
                                item_log_q=jnp.asarray(log_q, jnp.float32),
                                exclude=jnp.asarray(exclude))
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_weighted_matrix_factorization_matches_dense_sum():
    users, items, d = 5, 7, 3
    u, v = RNG.standard_normal((users, d)), RNG.standard_normal((items, d))
    observed = RNG.random((users, items)) < 0.3
    pu, pi = np.nonzero(observed)
    s = u @ v.T
    want = np.sum(np.where(observed, 10.0 * (1 - s) ** 2, 0.5 * s**2)) / (users * items)
    with jax.enable_x64(True):
        f = lambda a, b: weighted_matrix_factorization_loss(
            a, b, jnp.asarray(pu), jnp.asarray(pi), positive_weight=10.0, unobserved_weight=0.5)
        args = (jnp.asarray(u, jnp.float64), jnp.asarray(v, jnp.float64))
        assert float(f(*args)) == pytest.approx(want, rel=1e-10)
        check_grads(f, args, order=1, modes=["rev"])


@pytest.fixture(scope="module")
def mf_outputs():
    model = MatrixFactorization(4, 10, dim=3)
    inputs = {"users": jnp.array([0, 1, 2, 3]), "items": jnp.array([1, 2, 3, 4]),
              "negatives": jnp.array([[5, 1, 6], [7, 8, 2], [3, 0, 9], [4, 4, 5]]),
              "history": jnp.array([[1, 6], [2, 0], [3, 9], [4, 1]])}
    params = model.init(jax.random.key(0), inputs)
    return model.apply(params, inputs), {"inputs": inputs}


def test_make_bpr_and_sampled_softmax_losses_score_by_dot_products(mf_outputs):
    outputs, batch = mf_outputs
    u, v, n = (np.asarray(outputs[k], np.float64) for k in ("users", "items", "negatives"))
    pos, neg = np.sum(u * v, -1), np.einsum("bd,bnd->bn", u, n)
    loss, metrics = make_bpr_loss()(outputs, batch)
    assert float(loss) == pytest.approx(np.mean(np.log1p(np.exp(neg - pos[:, None]))), rel=1e-5)
    assert float(metrics["pair_accuracy"]) == pytest.approx(np.mean(pos[:, None] > neg))
    # sampled softmax drops negatives equal to the positive or in the history
    negatives, history = np.asarray(batch["inputs"]["negatives"]), batch["inputs"]["history"]
    items = np.asarray(batch["inputs"]["items"])
    keep = np.array([[m != items[b] and m not in np.asarray(history[b]) for m in negatives[b]]
                     for b in range(4)])
    logits = np.concatenate([pos[:, None], np.where(keep, neg, -np.inf)], axis=1)
    loss, _ = make_sampled_softmax_loss()(outputs, batch)
    assert float(loss) == pytest.approx(-np.mean(np_log_softmax(logits)[:, 0]), rel=1e-5)
    # in-batch softmax: history hits of other rows' items are excluded too
    loss, _ = make_in_batch_softmax_loss(None)(outputs, batch)
    hits = np.asarray(accidental_hits(batch["inputs"]["items"], history))
    logits = np.where(hits, -np.inf, u @ v.T)
    assert float(loss) == pytest.approx(-np.mean(np.diag(np_log_softmax(logits))), rel=1e-5)
