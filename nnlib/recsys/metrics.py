"""Top-k ranking metrics for recommenders: recall@k and NDCG@k.

A recommender scores every item for a user; the user is shown the ``k``
highest-scoring items *they have not interacted with yet* — items seen in
training are masked out first, otherwise a model that merely memorised the
training set would fill its list with them and every metric would be
meaningless. Relevance is binary: an item is relevant if it is one of the
user's held-out interactions.

* recall@k = (relevant items in the top k) / (relevant items), the share of
  the held-out items the list recovers.
* NDCG@k = DCG@k / IDCG@k with DCG@k = sum over ranks r = 1..k of
  rel_r / log2(r + 1), and IDCG@k the DCG of the ideal list (all relevant
  items first): sum over r = 1..min(k, relevant items) of 1 / log2(r + 1).
  It rewards hits near the top of the list.

Both are computed per user and averaged over users with at least one relevant
item (the others have neither value: they get NaN and are left out). Everything
is vectorised over a ``[users, items]`` score matrix and jit-compatible (``k``
is static); for big catalogues, call it on chunks of users.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int


def _check(fn: str, scores, relevant, seen, k: int) -> None:
    if scores.ndim != 2:
        raise ValueError(f"{fn} expected scores of shape [users, items], got {scores.shape}")
    for name, mask in (("relevant", relevant), ("seen", seen)):
        if mask is not None and tuple(mask.shape) != tuple(scores.shape):
            raise ValueError(f"{fn} expected {name} with the scores' shape [users, items] = "
                             f"{tuple(scores.shape)}, got {tuple(mask.shape)}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"{fn} expected 1 <= k <= items = {scores.shape[1]}, got k={k}")


def top_k_items(
    scores: Float[Array, "users items"],
    k: int,
    seen: Bool[Array, "users items"] | None = None,
) -> Int[Array, "users k"]:
    """The ``k`` highest-scoring items per user, best first, never a ``seen`` one.

    Args:
      scores: ``[users, items]``.
      k: list length (static).
      seen: ``bool [users, items]``, items to exclude (the user's training
        interactions); ``None`` excludes nothing.

    Returns:
      ``int32 [users, k]`` item ids; ties go to the lower item id.
    """
    _check("top_k_items", scores, None, seen, k)
    if seen is not None:
        scores = jnp.where(seen, -jnp.inf, scores)
    return jax.lax.top_k(scores, k)[1]


def _hits(scores, relevant, seen, k):
    top = top_k_items(scores, k, seen)  # [users, k]
    return jnp.take_along_axis(relevant, top, axis=1).astype(jnp.float32)  # [users, k]


@partial(jax.jit, static_argnames="k")
def recall_at_k(
    scores: Float[Array, "users items"],
    relevant: Bool[Array, "users items"],
    seen: Bool[Array, "users items"] | None = None,
    *,
    k: int,
) -> Float[Array, " users"]:
    """Per-user recall@k: relevant items in the top ``k`` (after masking ``seen``)
    divided by the user's relevant items; NaN for users with none.

    Shapes: ``scores, relevant, seen: [users, items] -> [users]``.
    """
    _check("recall_at_k", scores, relevant, seen, k)
    hits = _hits(scores, relevant, seen, k).sum(axis=1)  # [users]
    num_relevant = relevant.sum(axis=1)  # [users]
    return jnp.where(num_relevant > 0, hits / jnp.maximum(num_relevant, 1), jnp.nan)


@partial(jax.jit, static_argnames="k")
def ndcg_at_k(
    scores: Float[Array, "users items"],
    relevant: Bool[Array, "users items"],
    seen: Bool[Array, "users items"] | None = None,
    *,
    k: int,
) -> Float[Array, " users"]:
    """Per-user NDCG@k with binary relevance (after masking ``seen``); NaN for
    users with no relevant item.

    Shapes: ``scores, relevant, seen: [users, items] -> [users]``.
    """
    _check("ndcg_at_k", scores, relevant, seen, k)
    # [k]: rank r = 1..k -> 1 / log2(r + 1)
    discounts = 1.0 / jnp.log2(jnp.arange(2, k + 2, dtype=jnp.float32))
    dcg = _hits(scores, relevant, seen, k) @ discounts  # [users]
    num_relevant = relevant.sum(axis=1)  # [users]
    ideal = jnp.cumsum(discounts)[jnp.clip(num_relevant, 1, k) - 1]  # [users]
    return jnp.where(num_relevant > 0, dcg / ideal, jnp.nan)


@partial(jax.jit, static_argnames="k")
def _hits_and_counts(scores, relevant, seen, k):
    return _hits(scores, relevant, seen, k), relevant.sum(axis=1)


def ranking_metrics(
    scores: Float[Array, "users items"],
    relevant: Bool[Array, "users items"],
    seen: Bool[Array, "users items"] | None = None,
    *,
    recall_ks: Sequence[int] = (10, 20),
    ndcg_ks: Sequence[int] = (10,),
) -> dict[str, float]:
    """Mean recall@k and NDCG@k over users with a relevant item, as
    ``{"recall@10": ..., "ndcg@10": ...}`` — the same values as
    :func:`recall_at_k` and :func:`ndcg_at_k`, from one top-``max(k)`` list (a
    top-k list's first ``k'`` entries are its top-``k'`` list), so one compile
    serves every ``k``."""
    ks = list(recall_ks) + list(ndcg_ks)
    if not ks:
        return {}
    _check("ranking_metrics", scores, relevant, seen, max(ks))
    if min(ks) < 1:
        raise ValueError(f"ranking_metrics expected every k >= 1, got {sorted(ks)}")
    hits, num_relevant = _hits_and_counts(scores, relevant, seen, max(ks))
    hits = np.asarray(hits, np.float64)  # [users, max k]
    num_relevant = np.asarray(num_relevant)  # [users]
    has = num_relevant > 0
    discounts = 1.0 / np.log2(np.arange(2, max(ks) + 2))  # [max k]
    out = {}
    for k in recall_ks:
        out[f"recall@{k}"] = float(np.mean(hits[has, :k].sum(1) / num_relevant[has]))
    for k in ndcg_ks:
        ideal = np.cumsum(discounts[:k])[np.minimum(num_relevant[has], k) - 1]
        out[f"ndcg@{k}"] = float(np.mean(hits[has, :k] @ discounts[:k] / ideal))
    return out
