"""CLIP: the loss against numpy and closed forms, recall@k against brute force,
gradients against finite differences, the temperature clip, the towers' masks."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from nnlib.layers import ShapeError
from nnlib.multimodal import (
    CLIP,
    INIT_LOG_SCALE,
    MAX_LOG_SCALE,
    chance_recall_at_k,
    clamp_log_scale,
    clip_loss,
    clip_loss_fn,
    l2_normalize,
    prompt_ensemble,
    retrieval_recall_at_k,
    zero_shot_classifier,
    zero_shot_predict,
)


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _numpy_clip_loss(img, txt, log_scale):
    """Symmetric InfoNCE written out with numpy, in float64."""
    logits = math.exp(log_scale) * img @ txt.T

    def ce(z):  # mean over rows of -log softmax(z)[i, i]
        z = z - z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(log_p))

    return 0.5 * (ce(logits) + ce(logits.T))


def test_l2_normalize_float16_zero_and_large_vectors():
    # float16: the 1e-12 floor rounds to 0 and a sum of squares past 65504 overflows.
    x = np.stack([np.zeros(1000), np.full(1000, 20.0)]).astype(np.float16)  # norms 0, 632
    unit = l2_normalize(jnp.asarray(x))
    assert unit.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(unit[0]), 0.0)  # finite, not 0 / 0
    np.testing.assert_allclose(np.asarray(unit[1], np.float64), 1000**-0.5, rtol=1e-3)


def test_clip_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    img, txt = _unit(rng, 12, 8), _unit(rng, 12, 8)
    for log_scale in (0.0, INIT_LOG_SCALE, 3.0):
        got = clip_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32),
                        log_scale)
        np.testing.assert_allclose(got, _numpy_clip_loss(img, txt, log_scale), rtol=1e-5)


def test_clip_loss_mask_equals_the_loss_on_the_kept_rows():
    rng = np.random.default_rng(1)
    img, txt = _unit(rng, 10, 6), _unit(rng, 10, 6)
    keep = np.array([1, 1, 0, 1, 1, 1, 0, 0, 1, 1], bool)
    got = clip_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), 2.0,
                    mask=jnp.asarray(keep))
    np.testing.assert_allclose(got, _numpy_clip_loss(img[keep], txt[keep], 2.0), rtol=1e-5)
    # Padding rows get no gradient and leave the others' gradients finite.
    grads = jax.grad(clip_loss, argnums=(0, 1))(
        jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), 2.0,
        mask=jnp.asarray(keep))
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_array_equal(np.asarray(g)[~keep], 0.0)


def test_clip_loss_closed_forms():
    n = 16
    # All similarities equal: both softmaxes are uniform, the loss is log N.
    same = jnp.tile(jnp.asarray(_unit(np.random.default_rng(2), 1, 8), jnp.float32), (n, 1))
    np.testing.assert_allclose(clip_loss(same, same, INIT_LOG_SCALE), math.log(n), rtol=1e-6)
    # Perfectly aligned orthonormal pairs at scale 100: loss = log(1 + (N-1) e^-100) ~ 0.
    eye = jnp.eye(n, 32, dtype=jnp.float32)
    assert float(clip_loss(eye, eye, MAX_LOG_SCALE)) < 1e-30
    # ... and at scale 1 the closed form log(e + N - 1) - 1.
    np.testing.assert_allclose(clip_loss(eye, eye, 0.0), math.log(math.e + n - 1) - 1,
                               rtol=1e-6)


def test_clip_loss_gradients_match_finite_differences():
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        img = jnp.asarray(_unit(rng, 6, 5), jnp.float64)
        txt = jnp.asarray(_unit(rng, 6, 5), jnp.float64)
        log_scale = jnp.asarray(1.3, jnp.float64)
        check_grads(jax.jit(clip_loss), (img, txt, log_scale), order=1, modes=["fwd", "rev"],
                    eps=1e-5, rtol=1e-5)
        mask = jnp.asarray([1, 0, 1, 1, 1, 0], bool)
        check_grads(jax.jit(lambda a, b, t: clip_loss(a, b, t, mask=mask)),
                    (img, txt, log_scale), order=1, modes=["rev"], eps=1e-5, rtol=1e-5)


def test_clip_loss_rejects_mismatched_shapes():
    with pytest.raises(ShapeError, match=r"clip_loss expected image and text embeddings of "
                       r"the same shape"):
        clip_loss(jnp.ones((4, 8)), jnp.ones((5, 8)), 0.0)


def _brute_force_recall(sim, relevant, k):
    """Sort each row by score, ties put irrelevant items first; hit if a relevant
    item is in the first k."""
    hits = []
    for s, r in zip(sim, relevant, strict=True):
        if not r.any():
            hits.append(False)
            continue
        order = sorted(range(len(s)), key=lambda j: (-s[j], bool(r[j])))
        hits.append(bool(r[order[:k]].any()))
    return float(np.mean(hits))


@pytest.mark.parametrize("seed", [0, 1])
def test_recall_at_k_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    q, n = 30, 25
    sim = rng.integers(0, 6, size=(q, n)).astype(np.float32)  # many ties on purpose
    relevant = rng.random((q, n)) < 0.08
    ks = [1, 2, 5, 10]
    got = retrieval_recall_at_k(jnp.asarray(sim), ks, jnp.asarray(relevant))
    want = [_brute_force_recall(sim, relevant, k) for k in ks]
    np.testing.assert_allclose(got, want, atol=1e-7)
    # Default relevance: the diagonal; continuous scores.
    sq = rng.normal(size=(n, n)).astype(np.float32)
    for k in (1, 3, 7):
        assert float(retrieval_recall_at_k(jnp.asarray(sq), k)) == pytest.approx(
            _brute_force_recall(sq, np.eye(n, dtype=bool), k))
    with pytest.raises(ShapeError, match="must be square"):
        retrieval_recall_at_k(jnp.asarray(sim), 1)
    with pytest.raises(ValueError, match="k must be integers >= 1"):
        retrieval_recall_at_k(jnp.asarray(sq), 0)


def test_chance_recall_equals_the_mean_over_all_rankings():
    relevant = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]],
                        bool)
    n = relevant.shape[1]
    for k in (1, 2, 3):
        recalls = []
        for perm in itertools.permutations(range(n)):  # every ranking, equally likely
            scores = -np.asarray(perm, np.float32)
            sim = np.tile(scores, (len(relevant), 1))
            recalls.append(_brute_force_recall(sim, relevant, k))
        assert chance_recall_at_k(relevant, k) == pytest.approx(np.mean(recalls))


def test_chance_recall_with_k_past_the_number_of_items():
    # every item is in the top k: each answerable query is recalled (was NaN)
    relevant = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], bool)
    np.testing.assert_allclose(chance_recall_at_k(relevant, [3, 5]), [2 / 3, 2 / 3])
    scores = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3)), jnp.float32)
    np.testing.assert_allclose(retrieval_recall_at_k(scores, [3, 5], jnp.asarray(relevant)),
                               [2 / 3, 2 / 3])


def _tiny_clip(**kw):
    return CLIP(vocab_size=11, max_len=7, embed_dim=8, image_features=(4,),
                image_hidden=(16,), text_width=16, text_layers=1, text_heads=2,
                text_mlp_dim=16, pad_id=0, eos_id=1, **kw)


def _tiny_batch(rng, n=7, t=7):
    images = rng.random((n, 8, 8, 1)).astype(np.float32)
    lengths = rng.integers(2, t - 1, size=n)
    tokens = np.zeros((n, t), np.int32)
    for i, length in enumerate(lengths):
        tokens[i, :length] = rng.integers(2, 11, size=length)
        tokens[i, length] = 1  # [EOS]
    return {"images": jnp.asarray(images), "tokens": jnp.asarray(tokens)}


@pytest.fixture(scope="module")
def tiny():
    """One tiny CLIP (its parameters do not depend on the pooling), initialised
    once under jit (flax's eager init of a Transformer is the slow part)."""
    batch = _tiny_batch(np.random.default_rng(4))
    model = _tiny_clip()
    variables = jax.jit(model.init)(jax.random.key(0), batch)
    return model, variables, batch


def test_temperature_is_initialised_clipped_and_clamped(tiny):
    model, variables, batch = tiny
    assert float(variables["params"]["log_scale"]) == pytest.approx(math.log(1 / 0.07))

    @jax.jit
    def probe(p):
        def loss(q):
            o = model.apply({"params": q}, batch)
            return clip_loss(o["image_embeddings"], o["text_embeddings"], o["log_scale"])

        used = model.apply({"params": p}, batch)["log_scale"]
        return used, model.apply({"params": p}, method=CLIP.logit_scale), jax.grad(loss)(p)

    # A parameter pushed above log 100 is used as log 100 ...
    params = {**variables["params"], "log_scale": jnp.asarray(7.0)}
    used, scale, grads = probe(params)
    assert float(used) == pytest.approx(math.log(100.0))
    assert float(scale) == pytest.approx(math.log(100.0))
    # ... gets no gradient through the clip ...
    assert float(grads["log_scale"]) == 0.0
    assert float(probe(variables["params"])[2]["log_scale"]) != 0.0
    # ... and is clamped back after an update, as Radford et al. do.
    clamped = clamp_log_scale(params)
    assert float(clamped["log_scale"]) == pytest.approx(math.log(100.0))
    assert float(clamp_log_scale(variables["params"])["log_scale"]) == pytest.approx(
        INIT_LOG_SCALE)


@pytest.mark.parametrize("pooling", ["mean", "eos"])
def test_towers_give_unit_vectors_independent_of_padding(tiny, pooling):
    _, variables, batch = tiny
    model = _tiny_clip(text_pooling=pooling)
    out = jax.jit(model.apply)(variables, batch)
    for name in ("image_embeddings", "text_embeddings"):
        assert out[name].shape == (7, 8)
        np.testing.assert_allclose(jnp.linalg.norm(out[name], axis=1), 1.0, rtol=1e-5)
    # What the padding holds (or how much there is) does not change a text's embedding.
    tokens = np.asarray(batch["tokens"])
    shorter = tokens[:, :6]
    assert (tokens[:, 6] == 0).all()
    a = jax.jit(lambda v, x: model.apply(v, x, method=CLIP.encode_text))(
        variables, jnp.asarray(shorter))
    np.testing.assert_allclose(a, out["text_embeddings"], atol=1e-5)
    # The loss function for make_train_step reports a finite loss and sane metrics.
    loss, metrics = clip_loss_fn()(out, {"mask": jnp.ones(7)})
    assert np.isfinite(float(loss)) and 0.0 <= float(metrics["accuracy"]) <= 1.0
    assert float(metrics["logit_scale"]) == pytest.approx(1 / 0.07, rel=1e-5)


def test_zero_shot_classifier_is_the_renormalised_mean_of_prompt_embeddings(tiny):
    model, variables, batch = tiny
    tokens = np.asarray(batch["tokens"])
    groups = [tokens[:3], tokens[3:4], tokens[4:]]  # 3 classes, 3 / 1 / 3 prompts
    classes = jax.jit(lambda v: zero_shot_classifier(model, v, groups))(variables)
    emb, images = jax.jit(lambda v: (model.apply(v, batch)["text_embeddings"],
                                     model.apply(v, batch)["image_embeddings"]))(variables)
    emb = np.asarray(emb)
    want = np.stack([emb[:3].mean(0), emb[3], emb[4:].mean(0)])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(classes, want, atol=1e-5)
    np.testing.assert_array_equal(zero_shot_predict(images, classes),
                                  np.argmax(np.asarray(images) @ want.T, axis=1))
    with pytest.raises(ShapeError, match="at least one prompt"):
        zero_shot_classifier(model, variables, [tokens[:2], tokens[:0]])


def test_prompt_ensemble_is_the_renormalised_mean_per_class():
    rng = np.random.default_rng(8)
    emb = _unit(rng, 9, 5)
    class_ids = np.array([2, 0, 0, 1, 2, 2, 0, 1, 1])
    got = prompt_ensemble(jnp.asarray(emb, jnp.float32), class_ids, 3)
    for c in range(3):
        mean = emb[class_ids == c].mean(0)
        np.testing.assert_allclose(got[c], mean / np.linalg.norm(mean), atol=1e-6)
    # Prediction is the argmax of cosines with the class embeddings.
    images = jnp.asarray(_unit(rng, 20, 5), jnp.float32)
    np.testing.assert_array_equal(zero_shot_predict(images, got),
                                  np.argmax(np.asarray(images) @ np.asarray(got).T, axis=1))
    with pytest.raises(ShapeError, match=r"at least one prompt per class in \[0, 4\)"):
        prompt_ensemble(jnp.asarray(emb, jnp.float32), class_ids, 4)


def test_clip_rejects_bad_inputs(tiny):
    model, variables, batch = tiny
    with pytest.raises(ShapeError, match="one caption per image"):
        model.apply(variables, {"images": batch["images"], "tokens": batch["tokens"][:3]})
    with pytest.raises(TypeError, match="CLIP expected inputs"):
        model.apply(variables, batch["images"])
    with pytest.raises(ShapeError, match="max_len=7"):
        model.apply(variables, jnp.zeros((2, 9), jnp.int32), method=CLIP.encode_text)
