"""Prototypical networks against numpy, and the N-way K-shot episode sampler.

* Prototypes, squared distances, the episode loss and accuracy recomputed in
  numpy (float64) from the same embeddings.
* Snell et al.'s observation, as an independent check of the logits: with
  squared Euclidean distance the classifier is linear in the embedding,
  ``softmax(-||f - c_k||^2) = softmax(2 c_k·f - ||c_k||^2)``.
* The gradient of the episode loss passes central finite differences.
* The sampler: every sampled image really belongs to the class its label
  names (inputs that encode their own row number), no image twice in an
  episode, only the requested classes, class-major labels, same key same
  episodes; the digits split keeps held-out classes out of meta-training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from nnlib.data import load_digits
from nnlib.meta import (
    DIGITS_TEST_CLASSES,
    DIGITS_TRAIN_CLASSES,
    EpisodeSampler,
    class_prototypes,
    digits_episode_samplers,
    make_protonet_train_step,
    prototypical_logits,
    prototypical_loss,
    rotated_classes,
    squared_euclidean_distances,
)


def linear_embed(params, x):
    return x @ params["w"] + params["b"]  # [n, in] -> [n, D]


def numpy_episode(params, support, query, ways):
    w, b = (np.asarray(params[k], np.float64) for k in ("w", "b"))
    (xs, ys), (xq, yq) = support, query
    es, eq = np.asarray(xs, np.float64) @ w + b, np.asarray(xq, np.float64) @ w + b
    protos = np.stack([es[np.asarray(ys) == k].mean(0) for k in range(ways)])
    dist = np.array([[np.sum((q - c) ** 2) for c in protos] for q in eq])
    logits = -dist
    z = logits - logits.max(1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(1, keepdims=True))
    loss = -log_probs[np.arange(len(yq)), np.asarray(yq)].mean()
    return protos, dist, loss, np.mean(logits.argmax(1) == np.asarray(yq))


def random_episode(rng, ways=4, shots=3, queries=5, features=6, dim=5):
    ys = np.repeat(np.arange(ways), shots)
    yq = np.repeat(np.arange(ways), queries)
    centers = rng.normal(size=(ways, features)) * 2
    xs = (centers[ys] + rng.normal(size=(len(ys), features))).astype(np.float32)
    xq = (centers[yq] + rng.normal(size=(len(yq), features))).astype(np.float32)
    params = {"w": rng.normal(size=(features, dim)).astype(np.float32) / 2,
              "b": rng.normal(size=dim).astype(np.float32)}
    return params, (xs, ys.astype(np.int32)), (xq, yq.astype(np.int32))


def test_prototypes_distances_loss_and_accuracy_match_numpy():
    rng = np.random.default_rng(0)
    params, support, query = random_episode(rng)
    protos, dist, loss, accuracy = numpy_episode(params, support, query, 4)
    got = class_prototypes(linear_embed(params, support[0]), support[1], 4)
    np.testing.assert_allclose(got, protos, rtol=1e-5, atol=1e-5)
    got_dist = squared_euclidean_distances(linear_embed(params, query[0]), got)
    np.testing.assert_allclose(got_dist, dist, rtol=1e-4, atol=1e-4)
    # The logits are minus the squared distances to the numpy class means.
    np.testing.assert_allclose(prototypical_logits(linear_embed(params, query[0]), got), -dist,
                               rtol=1e-4, atol=1e-4)
    got_loss, got_acc = prototypical_loss(params, support, query, embed_fn=linear_embed,
                                          num_classes=4)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-4)
    assert float(got_acc) == pytest.approx(accuracy)


def test_prototype_of_an_absent_class_is_zero_and_counts_are_per_class():
    emb = jnp.asarray([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    got = class_prototypes(emb, jnp.asarray([0, 0, 2]), 3)
    np.testing.assert_allclose(got, [[2.0, 3.0], [0.0, 0.0], [10.0, 0.0]])


def test_squared_distance_is_a_linear_classifier_on_the_embedding():
    rng = np.random.default_rng(1)
    f, c = rng.normal(size=(7, 4)), rng.normal(size=(3, 4))
    logits = np.asarray(prototypical_logits(jnp.asarray(f, jnp.float32),
                                            jnp.asarray(c, jnp.float32)))
    linear = 2 * f @ c.T - np.sum(c ** 2, 1)  # weights 2 c_k, bias -||c_k||^2
    np.testing.assert_allclose(jax.nn.softmax(logits, -1), jax.nn.softmax(linear, -1),
                               rtol=1e-4, atol=1e-6)


def test_episode_loss_gradient_passes_finite_differences():
    rng = np.random.default_rng(2)
    params, support, query = random_episode(rng, ways=3, shots=2, queries=2, features=3, dim=2)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        support, query = ((jnp.asarray(x, jnp.float64), y) for x, y in (support, query))
        objective = jax.jit(lambda p: prototypical_loss(p, support, query, embed_fn=linear_embed,
                                                        num_classes=3)[0])
        check_grads(objective, (params,), order=1, modes=("rev",), eps=1e-6, atol=1e-6,
                    rtol=1e-6)


def test_train_step_improves_a_linear_embedding_on_synthetic_episodes():
    rng = np.random.default_rng(3)
    ways, shots, queries, features = 3, 2, 4, 6
    pool_labels = np.repeat(np.arange(8), 20)
    centers = rng.normal(size=(8, features)) * 1.5
    pool = (centers[pool_labels] + rng.normal(size=(len(pool_labels), features))
            ).astype(np.float32)
    # Nuisance dimensions with large noise: the embedding must learn to ignore them.
    pool = np.concatenate([pool, 4 * rng.normal(size=(len(pool), 10)).astype(np.float32)], 1)
    sampler = EpisodeSampler.from_arrays(pool, pool_labels, classes=range(8), num_ways=ways,
                                         num_shots=shots, num_queries=queries)
    params = {"w": jnp.eye(16, 8), "b": jnp.zeros(8)}
    tx = optax.adam(0.02)
    step = make_protonet_train_step(tx, embed_fn=linear_embed, num_classes=ways)
    opt_state = tx.init(params)
    held_out = sampler(jax.random.key(99), 32)  # one batch size: one compiled step
    before = float(step(params, opt_state, held_out.support, held_out.query)[2]["loss"])
    for i in range(40):
        episodes = sampler(jax.random.key(i), 32)
        params, opt_state, _ = step(params, opt_state, episodes.support, episodes.query)
    after = step(params, opt_state, held_out.support, held_out.query)[2]
    assert float(after["loss"]) < 0.7 * before
    assert float(after["accuracy"]) > 0.6


def test_episode_sampler_draws_the_right_examples():
    labels = np.array([0] * 6 + [1] * 9 + [2] * 5 + [3] * 7 + [4] * 8)
    rows = np.arange(len(labels), dtype=np.float32)[:, None]  # each input knows its row
    sampler = EpisodeSampler.from_arrays(rows, labels, classes=(1, 2, 3, 4), num_ways=3,
                                         num_shots=2, num_queries=3)
    ep = sampler(jax.random.key(0), 50)
    (xs, ys), (xq, yq), classes = jax.tree.map(np.asarray, (ep.support, ep.query, ep.classes))
    assert xs.shape == (50, 6, 1) and ys.shape == (50, 6) and xq.shape == (50, 9, 1)
    np.testing.assert_array_equal(ys, np.tile(np.repeat(np.arange(3), 2), (50, 1)))
    np.testing.assert_array_equal(yq, np.tile(np.repeat(np.arange(3), 3), (50, 1)))
    seen = set()
    for e in range(50):
        assert len(set(classes[e])) == 3 and set(classes[e]) <= {1, 2, 3, 4}
        support_rows, query_rows = xs[e, :, 0].astype(int), xq[e, :, 0].astype(int)
        np.testing.assert_array_equal(labels[support_rows], classes[e][ys[e]])
        np.testing.assert_array_equal(labels[query_rows], classes[e][yq[e]])
        assert len(set(support_rows) | set(query_rows)) == 15  # no image twice
        seen |= set(support_rows) | set(query_rows)
    assert seen == set(np.flatnonzero(labels != 0))  # class 2's 5 images all reachable
    assert len({tuple(c) for c in classes}) > 4  # labels map to different classes
    again = sampler(jax.random.key(0), 50)
    np.testing.assert_array_equal(again.support[0], xs)


def test_digits_split_keeps_held_out_classes_unseen():
    samplers = digits_episode_samplers(num_shots=1, num_queries=2, train_ways=5, test_ways=3)
    train, test, seen = samplers
    assert train.classes == DIGITS_TRAIN_CLASSES and test.classes == DIGITS_TEST_CLASSES
    assert seen.classes == DIGITS_TRAIN_CLASSES and seen.num_ways == 3
    episodes = train(jax.random.key(0), 20)
    assert episodes.support[0].shape == (20, 5, 8, 8, 1)
    assert set(np.asarray(episodes.classes).ravel()) <= set(DIGITS_TRAIN_CLASSES)
    assert set(np.asarray(test(jax.random.key(0), 20).classes).ravel()) == {7, 8, 9}
    # Every image of the held-out classes (all splits of load_digits) is in the test pool;
    # the training classes' images split between meta-training and the seen-class test.
    np.testing.assert_array_equal(test.counts, [179, 174, 180])
    all_counts = np.array([178, 182, 177, 183, 181, 182, 181])
    np.testing.assert_array_equal(train.counts + seen.counts, all_counts)
    data = load_digits()
    test_split = np.asarray(data["test"]["inputs"]).reshape(len(data["test"]["inputs"]), -1)
    train_rows = {r.tobytes() for r in np.asarray(train.inputs).reshape(len(train.inputs), -1)}
    labels = np.asarray(data["test"]["labels"])
    assert not any(r.tobytes() in train_rows for r in test_split[labels <= 6]
                   if r.any())  # no seen-class test image is a meta-training image


def test_rotated_classes_are_new_classes_and_avoid_held_out_look_alikes():
    rng = np.random.default_rng(4)
    images = rng.uniform(size=(12, 4, 4, 1)).astype(np.float32)
    labels = np.repeat([0, 1, 2], 4)
    x, y, ids = rotated_classes(images, labels, (0, 1))
    assert ids == (0, 1, 3, 4, 6, 7, 9, 10)  # c + r * 3, r = 0..3
    np.testing.assert_array_equal(x[y == 4], np.rot90(images[labels == 1], 1, axes=(1, 2)))
    np.testing.assert_array_equal(x[y == 6][:, ::-1, ::-1], images[labels == 0])  # 180 degrees
    # A turn nearer to an avoided mean image than to every training mean is dropped.
    ell = np.zeros((5, 5, 1), np.float32)
    ell[:, 0] = 1.0
    ell[4, :3] = 1.0  # an L: none of its turns is itself
    avoid = np.rot90(ell, 1)[None]
    _, _, kept = rotated_classes(ell[None], np.array([0]), (0,), avoid=avoid)
    want = [0] + [r for r in (1, 2, 3)
                  if np.sum((np.rot90(ell, r) - ell) ** 2) <= np.sum((np.rot90(ell, r) - avoid[0]) ** 2)]
    assert kept == tuple(want) and 1 not in kept  # ids c + r * 1


def test_digits_rotations_add_classes_but_never_a_held_out_look_alike():
    plain, rotated = (digits_episode_samplers(num_shots=1, num_queries=2, train_ways=5,
                                              rotations=r).train for r in (False, True))
    assert set(plain.classes) < set(rotated.classes)
    assert 7 < len(rotated.classes) < 28
    assert 6 + 2 * 10 not in rotated.classes  # an upside-down 6 is a 9


def test_errors_speak_the_users_language():
    x, y = np.zeros((10, 2), np.float32), np.array([0] * 5 + [1] * 5)
    with pytest.raises(ValueError, match="a 3-way episode needs at least 3 classes"):
        EpisodeSampler.from_arrays(x, y, classes=(0, 1), num_ways=3, num_shots=1,
                                   num_queries=1)
    with pytest.raises(ValueError, match="exceed the smallest class"):
        EpisodeSampler.from_arrays(x, y, classes=(0, 1), num_ways=2, num_shots=3,
                                   num_queries=3)
    with pytest.raises(ValueError, match="disjoint"):
        digits_episode_samplers(num_shots=1, num_queries=1, train_ways=2,
                                train_classes=(0, 1, 7), test_classes=(7, 8, 9))
    with pytest.raises(ValueError, match="one label per embedding"):
        class_prototypes(jnp.ones((4, 2)), jnp.zeros(3, jnp.int32), 2)
