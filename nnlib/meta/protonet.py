"""Prototypical networks: few-shot classification by distance to class means.

Snell, Swersky & Zemel 2017 ("Prototypical Networks for Few-shot Learning")
learn an embedding ``f`` in which each class is represented by one point, its
*prototype*: the mean of its embedded support examples,

    c_k = (1 / |S_k|) sum_{x in S_k} f(x).

A query ``x`` is classified by a softmax over negative squared Euclidean
distances to the prototypes, ``p(y = k | x) ∝ exp(-||f(x) - c_k||^2)``, and
the embedding is trained end to end on episodes (N-way K-shot tasks sampled
from the training classes) with the cross-entropy of the query labels.

Why the squared Euclidean distance: it is a Bregman divergence, for which the
class mean is the point minimizing the summed divergence to the class's
examples; and ``-||f - c_k||^2 = 2 c_k·f - ||c_k||^2 - ||f||^2`` is a *linear*
classifier in ``f`` (the ``||f||^2`` term is the same for every class), with
weights ``2 c_k`` and bias ``-||c_k||^2`` read off the support set: a new class
costs no training at all, only a mean.

Conventions: ``embed_fn(params, x) -> embeddings [n, dim]`` is any pure model
function (e.g. ``lambda p, x: model.apply({"params": p}, x)``). Episode labels
are the positions ``0 .. N-1`` of the episode's classes (see
``nnlib.meta.tasks.EpisodeSampler``), so a ``num_classes = N`` one-hot
suffices.

Shapes glossary: N ways (classes per episode), K shots (support examples per
class), Q queries, D embedding size, E episodes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from nnlib import losses
from nnlib.layers._checks import check_input

Params = Any
EmbedFn = Callable[[Params, Array], Array]


def class_prototypes(
    embeddings: Float[Array, "support dim"],
    labels: Int[Array, " support"],
    num_classes: int,
) -> Float[Array, "classes dim"]:
    """Mean embedding of each class: ``c_k = mean{f(x_i) : y_i = k}``.

    A class without support examples gets the zero vector (no division by 0).

    Args:
      embeddings: ``[N*K, D]`` embedded support examples.
      labels: ``[N*K]`` integer classes in ``[0, num_classes)``.
      num_classes: N (a Python int: the output shape).

    Returns:
      ``[num_classes, D]`` prototypes.
    """
    check_input("class_prototypes", embeddings, layout="[support, dim]", ndim=2,
                name="embeddings")
    check_input("class_prototypes", labels, layout="[support]", ndim=1, floating=False,
                name="labels")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"class_prototypes expected one label per embedding, got "
                         f"{labels.shape[0]} labels for {embeddings.shape[0]} embeddings")
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=embeddings.dtype)  # [N*K, N]
    sums = one_hot.T @ embeddings  # [N, D]
    counts = one_hot.sum(axis=0)  # [N]
    return sums / jnp.maximum(counts, 1.0)[:, None]


def squared_euclidean_distances(
    a: Float[Array, "n dim"], b: Float[Array, "m dim"]
) -> Float[Array, "n m"]:
    """``d[i, j] = ||a_i - b_j||^2``.

    Computed from the differences rather than as ``|a|^2 - 2 a·b + |b|^2``,
    whose cancellation can go slightly negative in float32 for nearby points;
    episodes are small, so the ``[n, m, dim]`` intermediate is cheap.
    """
    check_input("squared_euclidean_distances", a, layout="[n, dim]", ndim=2, name="a")
    check_input("squared_euclidean_distances", b, layout="[m, dim]", ndim=2, name="b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"squared_euclidean_distances expected a and b with the same dim, "
                         f"got {a.shape} and {b.shape}")
    diff = a[:, None, :] - b[None, :, :]  # [n, m, D]
    return jnp.sum(diff * diff, axis=-1)


def prototypical_logits(
    query_embeddings: Float[Array, "query dim"], prototypes: Float[Array, "classes dim"]
) -> Float[Array, "query classes"]:
    """Class logits ``-||f(x) - c_k||^2`` (the softmax of these is Snell et al.'s eq. 2)."""
    return -squared_euclidean_distances(query_embeddings, prototypes)


def prototypical_loss(
    params: Params,
    support: tuple[Array, Array],
    query: tuple[Array, Array],
    *,
    embed_fn: EmbedFn,
    num_classes: int,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Cross-entropy and accuracy of one episode's queries under the prototype classifier.

    Args:
      params: the embedding network's parameters.
      support: ``(x [N*K, ...], y [N*K])`` with labels in ``[0, num_classes)``.
      query: ``(x [N*Q, ...], y [N*Q])``.
      embed_fn: ``(params, x [n, ...]) -> [n, D]``.
      num_classes: N.

    Returns:
      ``(loss, accuracy)`` scalars; ``jax.grad(..., has_aux=True)`` trains on it.
    """
    (xs, ys), (xq, yq) = support, query
    prototypes = class_prototypes(embed_fn(params, xs), ys, num_classes)  # [N, D]
    logits = prototypical_logits(embed_fn(params, xq), prototypes)  # [N*Q, N]
    loss = losses.softmax_cross_entropy(logits, yq)
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == yq).astype(logits.dtype))
    return loss, accuracy


def episodes_loss(
    params: Params,
    support: tuple[Array, Array],
    query: tuple[Array, Array],
    *,
    embed_fn: EmbedFn,
    num_classes: int,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """``prototypical_loss`` averaged over a batch of episodes (``x: [E, N*K, ...]``)."""
    per_episode = functools.partial(prototypical_loss, embed_fn=embed_fn,
                                    num_classes=num_classes)
    loss, accuracy = jax.vmap(per_episode, in_axes=(None, 0, 0))(params, support, query)
    return jnp.mean(loss), jnp.mean(accuracy)


def make_protonet_train_step(
    tx: optax.GradientTransformation, *, embed_fn: EmbedFn, num_classes: int
) -> Callable[[Params, Any, Any, Any], tuple[Params, Any, dict[str, Array]]]:
    """A jit-compiled training step on a batch of episodes.

    Returns:
      ``step(params, opt_state, support, query) -> (params, opt_state, metrics)``
      with ``support = (x [E, N*K, ...], y [E, N*K])``, ``query`` likewise and
      ``metrics = {"loss", "accuracy"}`` (means over the episodes).
    """
    objective = functools.partial(episodes_loss, embed_fn=embed_fn, num_classes=num_classes)

    @jax.jit
    def step(params, opt_state, support, query):
        (loss, accuracy), grads = jax.value_and_grad(objective, has_aux=True)(
            params, support, query)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss,
                                                                  "accuracy": accuracy}

    return step
