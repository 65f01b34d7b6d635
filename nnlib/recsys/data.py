"""Synthetic implicit feedback with a known truth, and leave-k-out splits.

Implicit feedback is a set of (user, item) interactions — clicks, plays,
purchases — with no ratings and no explicit negatives: an item a user did not
touch may be disliked or merely unseen. Recommenders are judged by how well
they rank a user's *held-out* interactions among the items that user has not
interacted with yet.

:func:`synthetic_implicit_feedback` draws such data from a model whose truth is
known, so a learned recommender can be compared with the ranking the data was
actually drawn from (the *oracle*); :func:`leave_k_out` holds out ``k`` random
interactions per user for test (and validation).

Real data: no implicit-feedback data set ships inside the installed packages
(scikit-learn bundles iris, digits, wine, breast cancer, diabetes and
linnerud; nothing MovieLens-, Last.fm- or Amazon-like is on this machine), so
nnlib ships no real-data loader and nothing is downloaded. With a local copy
of e.g. MovieLens, turn each user's item ids into a row of an ``int32 [users,
n]`` array (equal ``n`` per user, e.g. each user's ``n`` most recent items) and
pass it to :func:`leave_k_out`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jaxtyping import Bool, Float, Int


@dataclasses.dataclass(frozen=True)
class ImplicitFeedback:
    """A synthetic implicit-feedback data set and the truth it was drawn from.

    Attributes:
      interactions: ``int32 [users, n]``, each user's ``n`` distinct items in
        the order they were drawn (the most preferred tend to come first).
      user_factors: ``float32 [users, dim]``, latent preference vectors ``u``.
      item_factors: ``float32 [items, dim]``, latent item vectors ``v``.
      item_popularity: ``float32 [items]``, the power-law popularity prior
        ``p`` (sums to 1).
      item_features: ``float32 [items, num_features]``, a noisy linear view of
        ``item_factors`` (what a content-aware model may see).
      preference_scale, temperature: the generator's constants (see
        :func:`synthetic_implicit_feedback`).
    """

    interactions: Int[np.ndarray, "users n"]
    user_factors: Float[np.ndarray, "users dim"]
    item_factors: Float[np.ndarray, "items dim"]
    item_popularity: Float[np.ndarray, " items"]
    item_features: Float[np.ndarray, "items num_features"]
    preference_scale: float
    temperature: float

    @property
    def num_users(self) -> int:
        return self.interactions.shape[0]

    @property
    def num_items(self) -> int:
        return self.item_factors.shape[0]

    def true_logits(self, users: Int[np.ndarray, " batch"] | None = None
                    ) -> Float[np.ndarray, "batch items"]:
        """The generator's logits ``(s u.v / sqrt(dim) + log p) / T`` for ``users``
        (default all): ``[batch, items]``. Ranking a user's unseen items by these
        is the oracle recommender."""
        u = self.user_factors if users is None else self.user_factors[np.asarray(users)]
        dim = self.user_factors.shape[1]
        preference = self.preference_scale * (u @ self.item_factors.T) / np.sqrt(dim)
        return ((preference + np.log(self.item_popularity)) / self.temperature).astype(np.float32)


def power_law_popularity(num_items: int, exponent: float, rng: np.random.Generator
                         ) -> Float[np.ndarray, " items"]:
    """Zipf-like popularity ``p_j ∝ rank_j ** -exponent`` with the ranks a random
    permutation of the items (so item id says nothing about popularity);
    ``[items]``, sums to 1."""
    ranks = rng.permutation(num_items) + 1
    weights = ranks.astype(np.float64) ** -exponent
    return (weights / weights.sum()).astype(np.float32)


def synthetic_implicit_feedback(
    num_users: int = 2000,
    num_items: int = 1000,
    *,
    dim: int = 16,
    interactions_per_user: int = 40,
    popularity_exponent: float = 1.0,
    preference_scale: float = 2.0,
    temperature: float = 0.75,
    num_item_features: int | None = None,
    feature_noise: float = 0.5,
    seed: int = 0,
) -> ImplicitFeedback:
    """Draws users' interactions from a latent-factor model with power-law popularity.

    Generative process (``rng = np.random.default_rng(seed)``)::

        u_i ~ N(0, I_dim)    for each user i       latent preferences
        v_j ~ N(0, I_dim)    for each item j       latent item vectors
        p_j ∝ rank_j ** -a                         popularity, ranks a random permutation
        logit_ij = (s * u_i.v_j / sqrt(dim) + log p_j) / T
        user i's items: n draws *without replacement* from softmax_j(logit_ij)
        x_j = v_j W / sqrt(dim) + sigma * e_j,  W ~ N(0, 1) [dim, f], e_j ~ N(0, I_f)

    with ``a = popularity_exponent``, ``s = preference_scale`` (the standard
    deviation of the preference term), ``T = temperature``, ``n =
    interactions_per_user``, ``sigma = feature_noise``. Sampling without
    replacement uses the Gumbel-top-k trick: the ``n`` largest of ``logit_ij +
    Gumbel`` are exactly a sequential softmax draw without replacement, in order.

    What a model can learn from it: a rank-``dim`` user-item affinity plus a
    per-item popularity offset — exactly matrix factorization with an item bias
    and embedding size >= ``dim`` — and, for a two-tower model, the user's
    vector from the bag of items they chose and an item's vector (partly) from
    its features ``x_j``. What it cannot: there is no time, context, session,
    repeat consumption, user-activity variation (every user has ``n`` items) or
    negative feedback; and held-out items are a random draw, so even the oracle
    (ranking by the true logits) misses some — its recall is the ceiling a
    learned model can approach, not 1. Small ``T`` makes users predictable
    (oracle recall near 1); large ``a`` makes popularity alone a strong baseline.

    Args:
      num_users, num_items: sizes (``interactions_per_user < num_items``).
      dim: latent dimension.
      interactions_per_user: ``n``, distinct items per user.
      popularity_exponent: ``a >= 0`` (0: uniform popularity).
      preference_scale: ``s >= 0`` (0: everyone follows popularity alone).
      temperature: ``T > 0``.
      num_item_features: ``f`` (default ``dim``).
      feature_noise: ``sigma >= 0``.
      seed: fixes everything.

    Returns:
      An :class:`ImplicitFeedback`.
    """
    fn = "synthetic_implicit_feedback"
    for name, value in (("num_users", num_users), ("num_items", num_items), ("dim", dim),
                        ("interactions_per_user", interactions_per_user)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{fn} expected {name} to be a positive int, got {value!r}")
    if interactions_per_user >= num_items:
        raise ValueError(f"{fn} expected interactions_per_user < num_items (distinct items per "
                         f"user), got {interactions_per_user} >= {num_items}")
    if not (temperature > 0 and preference_scale >= 0 and popularity_exponent >= 0
            and feature_noise >= 0):
        raise ValueError(f"{fn} expected temperature > 0 and preference_scale, "
                         f"popularity_exponent, feature_noise >= 0, got {temperature}, "
                         f"{preference_scale}, {popularity_exponent}, {feature_noise}")
    num_item_features = dim if num_item_features is None else num_item_features

    rng = np.random.default_rng(seed)
    user_factors = rng.standard_normal((num_users, dim)).astype(np.float32)
    item_factors = rng.standard_normal((num_items, dim)).astype(np.float32)
    popularity = power_law_popularity(num_items, popularity_exponent, rng)
    projection = rng.standard_normal((dim, num_item_features))
    features = (item_factors @ projection / np.sqrt(dim)
                + feature_noise * rng.standard_normal((num_items, num_item_features)))
    data = ImplicitFeedback(
        interactions=np.zeros((num_users, 0), np.int32), user_factors=user_factors,
        item_factors=item_factors, item_popularity=popularity,
        item_features=features.astype(np.float32), preference_scale=float(preference_scale),
        temperature=float(temperature))

    interactions = np.empty((num_users, interactions_per_user), np.int32)
    chunk = max(1, 2**22 // num_items)  # bounds the [chunk, items] logits in memory
    for start in range(0, num_users, chunk):
        users = np.arange(start, min(start + chunk, num_users))
        perturbed = data.true_logits(users) + rng.gumbel(size=(len(users), num_items))
        top = np.argpartition(-perturbed, interactions_per_user - 1, axis=1)
        top = top[:, :interactions_per_user]  # [chunk, n], unordered
        order = np.argsort(-np.take_along_axis(perturbed, top, axis=1), axis=1)
        interactions[users] = np.take_along_axis(top, order, axis=1)
    return dataclasses.replace(data, interactions=interactions)


@dataclasses.dataclass(frozen=True)
class LeaveOutSplit:
    """Per-user item ids of each split; every user has the same count per split.

    Attributes:
      train: ``int32 [users, n_train]``.
      val: ``int32 [users, num_val]`` (``num_val`` may be 0).
      test: ``int32 [users, num_test]``.
      num_items: size of the item catalogue.
    """

    train: Int[np.ndarray, "users n_train"]
    val: Int[np.ndarray, "users num_val"]
    test: Int[np.ndarray, "users num_test"]
    num_items: int

    @property
    def num_users(self) -> int:
        return self.train.shape[0]

    def train_pairs(self) -> Int[np.ndarray, "pairs 2"]:
        """Every training interaction as a ``(user, item)`` row: ``int32 [users * n_train, 2]``."""
        users = np.repeat(np.arange(self.num_users, dtype=np.int32), self.train.shape[1])
        return np.stack([users, self.train.reshape(-1)], axis=1)

    def item_counts(self) -> Int[np.ndarray, " items"]:
        """Training interactions per item, ``int [items]`` (the popularity baseline)."""
        return np.bincount(self.train.reshape(-1), minlength=self.num_items)


def leave_k_out(
    interactions: Int[np.ndarray, "users n"],
    num_items: int,
    *,
    num_test: int = 5,
    num_val: int = 5,
    seed: int = 0,
) -> LeaveOutSplit:
    """Holds out ``num_test`` (and ``num_val``) random interactions per user.

    Each user's items are shuffled independently (``np.random.default_rng(seed)``)
    and cut into test, validation and train, so every user appears in every
    split — the per-user protocol of recommender papers, unlike a global
    random split of interactions (which leaves some users without test items).

    Args:
      interactions: ``int [users, n]``, distinct item ids per row.
      num_items: catalogue size (ids in ``[0, num_items)``).
      num_test, num_val: held-out items per user (``num_test >= 1``, ``num_val
        >= 0``, leaving at least one for training).
      seed: fixes the split.

    Returns:
      A :class:`LeaveOutSplit`.
    """
    fn = "leave_k_out"
    interactions = np.asarray(interactions)
    if interactions.ndim != 2 or not np.issubdtype(interactions.dtype, np.integer):
        raise ValueError(f"{fn} expected interactions as an int array [users, n], got dtype "
                         f"{interactions.dtype} and shape {interactions.shape}")
    if interactions.size and (interactions.min() < 0 or interactions.max() >= num_items):
        raise ValueError(f"{fn} expected item ids in [0, {num_items}), got ids from "
                         f"{interactions.min()} to {interactions.max()}")
    n = interactions.shape[1]
    if num_test < 1 or num_val < 0 or num_test + num_val >= n:
        raise ValueError(f"{fn} expected num_test >= 1, num_val >= 0 and num_test + num_val < n "
                         f"= {n} (items per user), got num_test={num_test}, num_val={num_val}")
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random(interactions.shape), axis=1)  # a random permutation per row
    shuffled = np.take_along_axis(interactions, order, axis=1).astype(np.int32)
    return LeaveOutSplit(train=shuffled[:, num_test + num_val:],
                         val=shuffled[:, num_test:num_test + num_val],
                         test=shuffled[:, :num_test], num_items=int(num_items))


def interaction_mask(items: Int[np.ndarray, "users n"], num_items: int
                     ) -> Bool[np.ndarray, "users items"]:
    """``bool [users, items]``, True where the user's row of ``items`` holds the item."""
    items = np.asarray(items)
    mask = np.zeros((items.shape[0], num_items), bool)
    np.put_along_axis(mask, items, True, axis=1)
    return mask
