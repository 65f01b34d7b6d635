"""How good are generated samples? Proxies scored by a trained classifier, and text diversity.

There is no likelihood to compare a VAE with a diffusion model on equal
terms, so sample quality is judged the way the Inception Score (Salimans et
al. 2016) and the FID (Heusel et al. 2017) judge images, with a classifier
trained on the real data standing in for Inception:

* **Confidence**: mean of the classifier's max softmax probability. A
  recognisable digit is classified confidently; a smudge is not.
* **Class diversity**: entropy of the histogram of predicted classes divided
  by ``log(num_classes)``; 1 when every class is generated equally often, 0
  when every sample is the same digit (mode collapse). ``classes_covered``
  counts the classes predicted at least once.
* **Fréchet distance** between Gaussians fitted to the classifier's
  *penultimate* features of the samples and of real held-out data::

      FD = ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^{1/2})

  Lower is better; it sees both quality and diversity, but it is biased
  upwards for small sample sizes, so compare only numbers computed with the
  same sample count (which is why real data and noise are scored too, as
  anchors).

For text, ``distinct_ngram_ratio`` (Li et al. 2016, "distinct-n") measures
repetition, and ``sequence_nll`` the model's own surprise at its samples:
low temperature gives low NLL and low diversity, high temperature the reverse.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

# --- classifier features ------------------------------------------------------------------


def penultimate_features(
    model: nn.Module, variables: Any, x: Float[Array, "batch ..."], layer: str = "head/output",
) -> tuple[Float[Array, "batch features"], Float[Array, "batch classes"]]:
    """The input of the classifier's last layer, and its logits, in one forward pass.

    Captures the first argument of the submodule at path ``layer`` with
    ``flax.linen.intercept_methods`` (no change to the model's code):
    ``"head/output"`` for ``nnlib.models.CNN``, ``"mlp/output"`` for
    ``MLPClassifier``.

    Returns:
      ``(features [B, F], logits [B, classes])``; features are flattened.
    """
    variables = variables if "params" in variables else {"params": variables}
    path = tuple(layer.split("/"))
    captured: list[Array] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.path == path:
            captured.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        logits = model.apply(variables, x)
    if not captured:
        raise ValueError(f"penultimate_features: no submodule at path {layer!r} was called; "
                         "pass the path of the classifier's last layer, e.g. 'head/output'")
    features = captured[-1]
    return features.reshape(features.shape[0], -1), logits


# --- scores ------------------------------------------------------------------------------


def mean_max_confidence(logits: Float[Array, "batch classes"]) -> float:
    """Mean over the batch of ``max_c softmax(logits)_c``."""
    return float(jnp.mean(jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)))


def predicted_class_counts(logits: Float[Array, "batch classes"]) -> np.ndarray:
    """How many examples the classifier assigns to each class: ``[classes]`` int
    (the histogram of ``argmax``; ``(counts > 0).sum()`` is the classes covered)."""
    return np.bincount(np.asarray(jnp.argmax(logits, axis=-1)), minlength=logits.shape[-1])


def class_diversity(logits: Float[Array, "batch classes"]) -> float:
    """Entropy of the predicted-class histogram over ``log(classes)``, in [0, 1].

    Needs at least one example and two classes (with one, the ratio is 0 / 0).
    """
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[-1] < 2:
        raise ValueError(f"class_diversity expected [batch >= 1, classes >= 2] logits, got "
                         f"shape {tuple(logits.shape)}")
    counts = predicted_class_counts(logits)
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)) / np.log(logits.shape[-1]))


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_gaussians(
    mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """``||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^{1/2})`` (float64).

    ``Tr (C_a C_b)^{1/2}`` is computed as ``Tr (S C_b S)^{1/2}`` with ``S =
    C_a^{1/2}``: the same eigenvalues, but a symmetric PSD matrix, so it needs
    only ``eigh`` and no complex square roots (the FID code's ``sqrtm`` can
    return imaginary parts from rounding).
    """
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)))
    diff = mean_a - mean_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def frechet_distance(
    features_a: Float[Any, "n_a features"], features_b: Float[Any, "n_b features"]
) -> float:
    """Fréchet distance between Gaussians fitted (mean, unbiased covariance) to two sets
    of feature vectors ``[n, F]``."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance expected two [n, features] arrays with the same "
                         f"features and n >= 2, got shapes {a.shape} and {b.shape}")
    # atleast_2d: np.cov of a single feature is a 0-d array, which eigh rejects.
    return frechet_distance_gaussians(a.mean(0), np.atleast_2d(np.cov(a, rowvar=False)),
                                      b.mean(0), np.atleast_2d(np.cov(b, rowvar=False)))


def quality_scores(
    features: Float[Any, "batch features"], logits: Float[Any, "batch classes"],
    reference_features: Float[Any, "n features"],
) -> dict[str, float]:
    """The proxies from a classifier's outputs on a batch of samples.

    Args:
      features: the samples' penultimate features ``[B, F]``.
      logits: the samples' logits ``[B, classes]``.
      reference_features: penultimate features of real held-out data, ``[n, F]``.

    Returns:
      ``{"confidence", "class_diversity", "classes_covered", "frechet_distance"}``
      (``classes_covered``: classes predicted at least once).
    """
    return {"confidence": mean_max_confidence(logits),
            "class_diversity": class_diversity(logits),
            "classes_covered": int(np.count_nonzero(predicted_class_counts(logits))),
            "frechet_distance": frechet_distance(features, reference_features)}


def sample_quality(
    model: nn.Module, variables: Any, samples: Float[Array, "batch ..."],
    reference_features: Float[Any, "n features"], *, layer: str = "head/output",
) -> dict[str, float]:
    """The proxies for a batch of samples (in the classifier's input format):
    ``quality_scores`` of ``penultimate_features(model, variables, samples, layer)``.

    Args:
      model, variables: a trained classifier (``model.apply(variables, x) -> logits``).
      samples: ``[B, ...]`` generated (or real, or noise) inputs.
      reference_features: penultimate features of real held-out data, ``[n, F]``
        (``penultimate_features(...)[0]``).
      layer: path of the classifier's last layer.

    Returns:
      ``{"confidence", "class_diversity", "classes_covered", "frechet_distance"}``.
    """
    features, logits = penultimate_features(model, variables, samples, layer)
    return quality_scores(features, logits, reference_features)


# --- text samples --------------------------------------------------------------------------


def distinct_ngram_ratio(sequences: Iterable[Sequence[Hashable]], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams over all ``sequences``
    (each a sequence of tokens: words, characters or ids). 0 when there are none."""
    if n < 1:
        raise ValueError(f"distinct_ngram_ratio: n must be >= 1, got {n}")
    grams = [tuple(s[i:i + n]) for s in map(list, sequences) for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sequence_nll(
    logits_fn: Callable[[Array], Array], tokens: Int[Array, "batch time"], prompt_len: int = 1,
) -> float:
    """Mean negative log-likelihood (nats per token) of ``tokens[:, prompt_len:]`` under a
    causal language model ``logits_fn(tokens [B, T]) -> logits [B, T, V]`` at
    temperature 1 with no filtering: how surprising a model finds a text."""
    tokens = jnp.asarray(tokens)
    if not 1 <= prompt_len < tokens.shape[1]:
        raise ValueError(f"sequence_nll: prompt_len must be in [1, time={tokens.shape[1]}), "
                         f"got {prompt_len}")
    log_probs = jax.nn.log_softmax(logits_fn(tokens[:, :-1]).astype(jnp.float32), axis=-1)
    targets = tokens[:, 1:]  # position t predicts token t + 1
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, T-1]
    return float(-jnp.mean(picked[:, prompt_len - 1:]))


__all__ = [
    "class_diversity",
    "distinct_ngram_ratio",
    "frechet_distance",
    "frechet_distance_gaussians",
    "mean_max_confidence",
    "penultimate_features",
    "predicted_class_counts",
    "quality_scores",
    "sample_quality",
    "sequence_nll",
]
