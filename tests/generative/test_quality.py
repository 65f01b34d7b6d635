"""Sample-quality proxies against numpy/scipy and hand-counted answers.

* Fréchet distance: the FID formula with ``scipy.linalg.sqrtm`` on random
  covariances; the 1-D closed form ``(m_a - m_b)^2 + (s_a - s_b)^2``; zero for
  one set against itself.
* Confidence and class diversity: a numpy softmax, and entropies of
  histograms counted by hand.
* Penultimate features of nnlib's CNN: the captured head input times the last
  Dense kernel plus bias gives the logits.
* Text: distinct-n on hand-counted strings; ``sequence_nll`` of a bigram model
  against a numpy log-softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from nnlib.generative import (
    class_diversity,
    distinct_ngram_ratio,
    frechet_distance,
    frechet_distance_gaussians,
    mean_max_confidence,
    penultimate_features,
    predicted_class_counts,
    sample_quality,
    sequence_nll,
)
from nnlib.models import CNN


def test_frechet_distance_against_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 5, 5))
    cov_a, cov_b = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mean_a, mean_b = rng.normal(size=(2, 5))
    reference = (np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b)
                 - 2 * np.trace(linalg.sqrtm(cov_a @ cov_b).real))
    got = frechet_distance_gaussians(mean_a, cov_a, mean_b, cov_b)
    assert got == pytest.approx(reference, rel=1e-8)
    # 1-D: the squared 2-Wasserstein distance of two Gaussians.
    got = frechet_distance_gaussians(np.array([1.0]), np.array([[4.0]]), np.array([-0.5]),
                                     np.array([[0.25]]))
    assert got == pytest.approx(1.5**2 + (2.0 - 0.5) ** 2)

    x = rng.normal(size=(300, 4))
    y = 2.0 * rng.normal(size=(200, 4)) + 1.0
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    expected = frechet_distance_gaussians(x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
    assert frechet_distance(x, y) == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"frechet_distance expected two \[n, features\]"):
        frechet_distance(x, y[:, :3])



def test_frechet_distance_of_single_feature_sets():
    # F = 1 is still [n, features]: the 1-D closed form with unbiased std (ddof=1).
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 1)), 3.0 * rng.normal(size=(30, 1)) + 2.0
    expected = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)

def test_confidence_and_class_diversity():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(50, 10)).astype(np.float32)
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert mean_max_confidence(jnp.asarray(logits)) == pytest.approx(probs.max(1).mean(),
                                                                     rel=1e-5)
    one_hot = np.eye(10, dtype=np.float32)
    assert class_diversity(jnp.asarray(np.tile(one_hot, (3, 1)))) == pytest.approx(1.0)
    assert class_diversity(jnp.asarray(np.tile(one_hot[4], (7, 1)))) == 0.0
    # predictions 0, 0, 1, 2 over 4 classes: H = -(1/2 ln 1/2 + 2 * 1/4 ln 1/4) / ln 4 = 0.75
    four = np.eye(4, dtype=np.float32)[[0, 0, 1, 2]]
    assert class_diversity(jnp.asarray(four)) == pytest.approx(0.75)
    np.testing.assert_array_equal(predicted_class_counts(jnp.asarray(four)), [2, 1, 1, 0])
    for shape in [(5, 1), (0, 4)]:  # one class: 0 / 0; no examples: nothing to count
        with pytest.raises(ValueError, match="class_diversity expected"):
            class_diversity(jnp.zeros(shape))


def test_penultimate_features_of_the_cnn():
    model = CNN(features=(4,), hidden_sizes=(8,))
    x = jnp.asarray(np.random.default_rng(2).uniform(size=(6, 8, 8, 1)), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]
    features, logits = penultimate_features(model, params, x)
    assert features.shape == (6, 8) and logits.shape == (6, 10)
    head = params["head"]["output"]
    np.testing.assert_allclose(features @ head["kernel"] + head["bias"], logits, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(logits, model.apply({"params": params}, x), rtol=1e-6)
    reference = np.asarray(features[:3]) + 1.0
    scores = sample_quality(model, {"params": params}, x, reference)
    assert set(scores) == {"confidence", "class_diversity", "classes_covered",
                           "frechet_distance"}
    predicted = np.unique(np.argmax(np.asarray(logits), axis=1))
    assert scores["classes_covered"] == len(predicted)
    assert scores["frechet_distance"] == pytest.approx(frechet_distance(features, reference))
    with pytest.raises(ValueError, match="no submodule at path 'head/missing'"):
        penultimate_features(model, params, x, layer="head/missing")


def test_distinct_ngrams_and_sequence_nll():
    assert distinct_ngram_ratio(["abab"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert distinct_ngram_ratio(["aaaa", "ab"], 1) == pytest.approx(2 / 6)
    assert distinct_ngram_ratio([[1, 2, 3], [1, 2, 3]], 3) == pytest.approx(1 / 2)
    assert distinct_ngram_ratio(["a"], 2) == 0.0
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_ngram_ratio(["ab"], 0)

    rng = np.random.default_rng(3)
    table = rng.normal(size=(5, 5)).astype(np.float32)  # a bigram model: logits[prev]
    tokens = rng.integers(0, 5, size=(3, 7))

    def logits_fn(t):
        return jnp.asarray(table)[t]  # [B, T, V]

    log_probs = table - np.log(np.exp(table).sum(1, keepdims=True))
    picked = log_probs[tokens[:, :-1], tokens[:, 1:]]  # [B, T-1]
    assert sequence_nll(logits_fn, tokens) == pytest.approx(-picked.mean(), rel=1e-5)
    assert sequence_nll(logits_fn, tokens, prompt_len=3) == pytest.approx(
        -picked[:, 2:].mean(), rel=1e-5)
    with pytest.raises(ValueError, match="prompt_len must be in"):
        sequence_nll(logits_fn, tokens, prompt_len=7)
