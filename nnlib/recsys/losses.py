"""Losses for learning to recommend from implicit feedback.

Implicit feedback has positives only, so every loss needs a stand-in for the
negatives:

* **BPR** (Rendle et al. 2009, "BPR: Bayesian Personalized Ranking from
  Implicit Feedback"): for a user ``u``, an interacted item ``i`` and a sampled
  item ``j``, maximise ``log sigmoid(s_ui - s_uj)`` — a pairwise ranking loss,
  the negative log-likelihood of "u prefers i to j".
* **Sampled softmax** (Bengio & Senécal 2008; Jean et al. 2015): a softmax over
  the positive and ``N`` sampled items, each logit corrected by ``- log q`` of
  its sampling probability so the sampled loss estimates the full softmax
  over the catalogue without bias towards what the sampler favours.
* **In-batch softmax** (the two-tower standard): the other items of the batch
  are the negatives, so negatives are drawn in proportion to popularity and
  cost nothing. Without correction the model learns ``log p(i | u) - log
  q_i`` and under-recommends popular items; Yi et al. 2019 ("Sampling-Bias-
  Corrected Neural Modeling for Large Corpus Item Recommendations") subtract
  ``log q_i`` from every logit (the *logQ correction*). Items of the batch
  that the row's user has also interacted with are "accidental hits", not
  negatives, and are removed from that row.
* **Weighted matrix factorization** (Hu, Koren & Volinsky 2008, "Collaborative
  Filtering for Implicit Feedback Datasets"): squared error to 1 on observed
  pairs (weight ``c``) and to 0 on *every* unobserved pair (weight ``w0``). The
  sum over all ``users x items`` pairs never materialises: ``sum_ui s_ui^2 =
  sum((U^T U) * (V^T V))`` (the Gramian trick of implicit ALS).

The ``make_*_loss`` builders adapt these to ``nnlib.train.make_train_step``'s
``(outputs, batch) -> (loss, metrics)`` for the models of
:mod:`nnlib.recsys.models`, whose outputs are ``{"users": [batch, dim],
"items": [batch, dim], "negatives": [batch, dim] or [batch, N, dim]}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

LossFn = Callable[[Any, Mapping[str, Any]], tuple[jax.Array, dict[str, jax.Array]]]


def bpr_loss(
    positive_scores: Float[Array, " batch"],
    negative_scores: Float[Array, " batch *negatives"],
) -> Float[Array, ""]:
    """Bayesian Personalized Ranking: mean of ``-log sigmoid(s_pos - s_neg)``.

    Args:
      positive_scores: ``[batch]``, scores of interacted items.
      negative_scores: ``[batch]`` or ``[batch, negatives]``, scores of sampled
        items for the same users (each pair is one term).

    Returns:
      The scalar mean over pairs.
    """
    if negative_scores.shape[:1] != positive_scores.shape or positive_scores.ndim != 1:
        raise ValueError(f"bpr_loss expected positive_scores [batch] and negative_scores "
                         f"[batch] or [batch, negatives], got {positive_scores.shape} and "
                         f"{negative_scores.shape}")
    positive = positive_scores.reshape(positive_scores.shape + (1,) * (negative_scores.ndim - 1))
    # -log sigmoid(x) = softplus(-x), stable for large |x|.
    return jnp.mean(jax.nn.softplus(negative_scores - positive))


def sampled_softmax_loss(
    positive_scores: Float[Array, " batch"],
    negative_scores: Float[Array, "batch negatives"],
    *,
    positive_log_q: Float[Array, " batch"] | None = None,
    negative_log_q: Float[Array, "batch negatives"] | None = None,
    exclude: Bool[Array, "batch negatives"] | None = None,
) -> Float[Array, ""]:
    """Softmax cross-entropy of the positive against ``N`` sampled negatives.

    ``logit = score - log q`` for each candidate when its sampling log-probability
    ``log q`` is given (``None``: no correction, right for uniform sampling,
    where it would subtract the same constant from every logit). Negatives
    marked in ``exclude`` (accidental hits: the positive itself, or another item
    the user interacted with) are dropped from the softmax. With every other
    item of the catalogue as the negatives, this is exactly the full softmax.

    Shapes: ``positive_scores: [batch]``, ``negative_scores: [batch, negatives]``,
    ``*_log_q`` the same (or broadcastable), ``exclude: bool [batch, negatives]``
    -> scalar mean over the batch.
    """
    if positive_scores.ndim != 1 or negative_scores.ndim != 2 or (
            negative_scores.shape[0] != positive_scores.shape[0]):
        raise ValueError(f"sampled_softmax_loss expected positive_scores [batch] and "
                         f"negative_scores [batch, negatives], got {positive_scores.shape} "
                         f"and {negative_scores.shape}")
    if positive_log_q is not None:
        positive_scores = positive_scores - positive_log_q
    if negative_log_q is not None:
        negative_scores = negative_scores - negative_log_q
    if exclude is not None:
        negative_scores = jnp.where(exclude, -jnp.inf, negative_scores)
    logits = jnp.concatenate([positive_scores[:, None], negative_scores], axis=1)
    return -jnp.mean(jax.nn.log_softmax(logits, axis=1)[:, 0])


def accidental_hits(
    items: Int[Array, " batch"],
    history: Int[Array, "batch n"] | None = None,
) -> Bool[Array, "batch batch"]:
    """Which in-batch negatives are not negatives: ``[b, c]`` is True when
    ``c != b`` and item ``items[c]`` is row ``b``'s own positive or one of its
    ``history`` items (ids < 0 in ``history`` are padding).

    Shapes: ``items: [batch]``, ``history: [batch, n]`` -> ``bool [batch, batch]``.
    """
    hits = items[None, :] == items[:, None]  # [batch, batch]
    if history is not None:
        hits = hits | jnp.any(history[:, :, None] == items[None, None, :], axis=1)
    return hits & ~jnp.eye(items.shape[0], dtype=bool)


def in_batch_softmax_loss(
    user_vectors: Float[Array, "batch dim"],
    item_vectors: Float[Array, "batch dim"],
    *,
    item_log_q: Float[Array, " batch"] | None = None,
    exclude: Bool[Array, "batch batch"] | None = None,
) -> Float[Array, ""]:
    """Softmax over the batch's items, row ``b``'s positive being item ``b``.

    ``logits[b, c] = user_vectors[b] . item_vectors[c] - item_log_q[c]`` (the
    logQ correction of Yi et al. 2019 when ``item_log_q`` — the log of each
    item's probability of being in a batch — is given), with ``exclude[b, c]``
    (accidental hits, see :func:`accidental_hits`) removed from the softmax.

    Shapes: ``user_vectors, item_vectors: [batch, dim]``, ``item_log_q: [batch]``,
    ``exclude: bool [batch, batch]`` (diagonal ignored) -> scalar mean over rows.
    """
    if user_vectors.ndim != 2 or user_vectors.shape != item_vectors.shape:
        raise ValueError(f"in_batch_softmax_loss expected user_vectors and item_vectors of the "
                         f"same shape [batch, dim], got {user_vectors.shape} and "
                         f"{item_vectors.shape}")
    logits = user_vectors @ item_vectors.T  # [batch, batch]
    if item_log_q is not None:
        logits = logits - item_log_q[None, :]
    if exclude is not None:
        exclude = exclude & ~jnp.eye(logits.shape[0], dtype=bool)
        logits = jnp.where(exclude, -jnp.inf, logits)
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))


def weighted_matrix_factorization_loss(
    user_vectors: Float[Array, "users dim"],
    item_vectors: Float[Array, "items dim"],
    users: Int[Array, " pairs"],
    items: Int[Array, " pairs"],
    *,
    positive_weight: float = 10.0,
    unobserved_weight: float = 1.0,
) -> Float[Array, ""]:
    """Hu et al. 2008's weighted squared loss over every (user, item) cell, as a mean.

    ``L = [sum_(u,i) observed c (1 - s_ui)^2 + sum_(u,i) unobserved w0 s_ui^2] /
    (users * items)`` with ``s = user_vectors @ item_vectors.T``, ``c =
    positive_weight``, ``w0 = unobserved_weight``. Computed without the
    ``[users, items]`` matrix: all cells at weight ``w0`` via the Gramians, then
    each observed cell corrected to weight ``c`` and target 1.

    Args:
      user_vectors: ``[users, dim]`` (all users, or a batch of them).
      item_vectors: ``[items, dim]``, the whole catalogue.
      users, items: ``int [pairs]``, the observed cells (rows of
        ``user_vectors``, rows of ``item_vectors``); each cell at most once.
      positive_weight, unobserved_weight: ``c`` and ``w0``.
    """
    if user_vectors.ndim != 2 or item_vectors.ndim != 2 or (
            user_vectors.shape[1] != item_vectors.shape[1]):
        raise ValueError(f"weighted_matrix_factorization_loss expected user_vectors [users, "
                         f"dim] and item_vectors [items, dim], got {user_vectors.shape} and "
                         f"{item_vectors.shape}")
    all_cells = jnp.sum((user_vectors.T @ user_vectors) * (item_vectors.T @ item_vectors))
    observed = jnp.sum(user_vectors[users] * item_vectors[items], axis=1)  # [pairs]
    correction = jnp.sum(positive_weight * (1.0 - observed) ** 2
                         - unobserved_weight * observed**2)
    total = unobserved_weight * all_cells + correction
    return total / (user_vectors.shape[0] * item_vectors.shape[0])


def _l2(outputs: Mapping[str, Array]) -> Array:
    return sum(jnp.mean(jnp.sum(v**2, axis=-1)) for v in outputs.values())


def _negative_scores(users: Array, negatives: Array) -> Array:
    """``[batch, dim]`` . ``[batch(, N), dim]`` -> ``[batch(, N)]``."""
    return jnp.einsum("bd,b...d->b...", users, negatives)


def make_bpr_loss(embedding_l2: float = 0.0) -> LossFn:
    """BPR for ``nnlib.train.make_train_step``: ``outputs`` has ``"users"`` and
    ``"items"`` (positives), each ``[batch, dim]``, and ``"negatives"``, ``[batch,
    dim]`` or ``[batch, N, dim]`` (every (positive, negative) pair is one term);
    ``embedding_l2`` adds ``lambda * mean squared norm`` of the vectors used
    (the BPR paper's regulariser, applied to the sampled rows)."""

    def loss_fn(outputs, batch):
        del batch
        u = outputs["users"]
        positive = jnp.sum(u * outputs["items"], axis=-1)  # [batch]
        negative = _negative_scores(u, outputs["negatives"])  # [batch(, N)]
        ranking = bpr_loss(positive, negative)
        loss = ranking + embedding_l2 * _l2(outputs)
        positive = positive.reshape(positive.shape + (1,) * (negative.ndim - 1))
        return loss, {"loss": loss, "bpr": ranking,
                      "pair_accuracy": jnp.mean((positive > negative).astype(jnp.float32))}

    return loss_fn


def make_sampled_softmax_loss(
    item_log_q: Float[Array, " items"] | None = None,
    *,
    remove_accidental_hits: bool = True,
    embedding_l2: float = 0.0,
) -> LossFn:
    """Sampled softmax for ``nnlib.train.make_train_step``.

    ``outputs``: ``{"users": [batch, dim], "items": [batch, dim], "negatives":
    [batch, N, dim]}``; ``batch["inputs"]``: ``"items"`` (``int [batch]``, the
    positives), ``"negatives"`` (``int [batch, N]``, the sampled ids) and,
    optionally, ``"history"`` (``int [batch, n]``, the users' training items).
    ``item_log_q``: ``[items]``, log of each item's probability under the
    negative sampler (``None`` for uniform sampling: no correction).
    ``remove_accidental_hits`` drops negatives equal to the positive or in the
    history (for uniform negatives and a history of ``n`` items out of ``I``,
    about ``n / I`` of them would otherwise push down items the user chose).
    """

    def loss_fn(outputs, batch):
        inputs = batch["inputs"]
        items, negatives = inputs["items"], inputs["negatives"]  # [batch], [batch, N]
        if negatives.ndim != 2:
            raise ValueError(f"make_sampled_softmax_loss expected inputs['negatives'] of shape "
                             f"[batch, N], got {negatives.shape}")
        u = outputs["users"]
        positive = jnp.sum(u * outputs["items"], axis=-1)  # [batch]
        negative = _negative_scores(u, outputs["negatives"])  # [batch, N]
        exclude = None
        if remove_accidental_hits:
            exclude = negatives == items[:, None]
            history = inputs.get("history")
            if history is not None:
                exclude = exclude | jnp.any(history[:, :, None] == negatives[:, None, :], axis=1)
        pos_q = neg_q = None
        if item_log_q is not None:
            pos_q, neg_q = item_log_q[items], item_log_q[negatives]
        softmax = sampled_softmax_loss(positive, negative, positive_log_q=pos_q,
                                       negative_log_q=neg_q, exclude=exclude)
        loss = softmax + embedding_l2 * _l2(outputs)
        return loss, {"loss": loss, "softmax": softmax}

    return loss_fn


def make_in_batch_softmax_loss(
    item_log_q: Float[Array, " items"] | None = None,
    *,
    remove_accidental_hits: bool = True,
    embedding_l2: float = 0.0,
) -> LossFn:
    """In-batch softmax for ``nnlib.train.make_train_step``.

    ``outputs``: ``{"users": [batch, dim], "items": [batch, dim]}``;
    ``batch["inputs"]["items"]``: ``int [batch]`` positive item ids, and
    ``batch["inputs"]["history"]``: ``int [batch, n]`` the users' training items
    (used to find accidental hits). ``item_log_q``: ``[items]``, log probability
    of each item appearing as a batch positive (``log(count_i / total)``) —
    the logQ correction; ``None`` for none.
    """

    def loss_fn(outputs, batch):
        inputs = batch["inputs"]
        items = inputs["items"]
        exclude = None
        if remove_accidental_hits:
            exclude = accidental_hits(items, inputs.get("history"))
        log_q = None if item_log_q is None else item_log_q[items]
        softmax = in_batch_softmax_loss(outputs["users"], outputs["items"], item_log_q=log_q,
                                        exclude=exclude)
        loss = softmax + embedding_l2 * _l2(outputs)
        return loss, {"loss": loss, "softmax": softmax}

    return loss_fn
