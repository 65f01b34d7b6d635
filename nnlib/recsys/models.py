"""Recommenders that score a user-item pair by a dot product of two vectors.

Every model here is a *two-tower* model in the broad sense: a user vector
``[batch, dim]`` and an item vector ``[items, dim]`` whose dot product is the
score, so recommending is a matrix product plus a top-k, and items can be
indexed for nearest-neighbour search.

* :class:`MatrixFactorization`: both towers are lookup tables (Koren et al.
  2009), plus an optional per-item bias that captures popularity. A per-user
  bias would shift all of one user's scores equally, changing no ranking and
  no per-user loss here, so there is none.
* :class:`TwoTower`: the neural version (Covington et al. 2016; Yi et al.
  2019). The user tower reads the user id *and* the bag of items the user
  interacted with (mean of their embeddings); the item tower reads the item id
  *and* the item's content features; each is an MLP. The history bag lets the
  model describe a user by what they did rather than only by a memorised id.

Both expose the same interface, so training and evaluation code is shared:

* ``user_vectors(users, history, history_mask) -> [batch, dim']``
* ``item_vectors(items, features) -> [n, dim']``
* ``__call__(inputs, *, train=False)`` on a dict with ``"users"``, ``"items"``,
  optional ``"negatives"`` (item ids), ``"history"``, ``"history_mask"``,
  ``"item_features"``, ``"negative_features"``, returning ``{"users",
  "items"[, "negatives"]}`` vectors — the form ``nnlib.train.make_train_step``
  and :mod:`nnlib.recsys.losses` expect.

``dim' = dim + 1`` with an item bias: the user vector ends in a constant 1 and
the item vector in the bias, so the dot product adds the bias.

:func:`popularity_scores` is the non-personalised baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from nnlib.layers import MLP


def _append(vectors: Array, last: Array) -> Array:
    """``[..., dim]``, ``[..., 1]`` -> ``[..., dim + 1]``."""
    return jnp.concatenate([vectors, last.astype(vectors.dtype)], axis=-1)


def _append_one(vectors: Array) -> Array:
    """The user side of an item bias: a constant 1 last, ``[..., dim + 1]``."""
    return _append(vectors, jnp.ones(vectors.shape[:-1] + (1,), vectors.dtype))


def _check_ids(model: str, name: str, ids: Any, layout: str) -> None:
    if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
        raise TypeError(f"{model} expected {name} as int ids {layout}, got dtype "
                        f"{jnp.asarray(ids).dtype}")


def _outputs(model: nn.Module, inputs: Mapping[str, Array]) -> dict[str, Array]:
    missing = {"users", "items"} - set(inputs)
    if missing:
        raise KeyError(f"{type(model).__name__} expected inputs with keys 'users' and 'items' "
                       f"(plus optional 'negatives', 'history', 'history_mask', "
                       f"'item_features'), missing {sorted(missing)}")
    out = {"users": model.user_vectors(inputs["users"], inputs.get("history"),
                                       inputs.get("history_mask")),
           "items": model.item_vectors(inputs["items"], inputs.get("item_features"))}
    if "negatives" in inputs:
        out["negatives"] = model.item_vectors(inputs["negatives"],
                                              inputs.get("negative_features"))
    return out


class MatrixFactorization(nn.Module):
    """Score ``s_ui = p_u . q_i + b_i`` from learned tables.

    Attributes:
      num_users, num_items: table sizes.
      dim: embedding size.
      use_item_bias: learn ``b_i`` (popularity); vectors then have ``dim + 1``
        entries.
      init_scale: standard deviation of the initial embeddings (small, so
        initial scores are near 0 and the softmax starts near uniform).

    Shapes: ``users: int [batch] -> [batch, dim']``; ``items: int [n] -> [n, dim']``.
    """

    num_users: int
    num_items: int
    dim: int = 32
    use_item_bias: bool = True
    init_scale: float = 0.1

    def setup(self):
        init = nn.initializers.normal(self.init_scale)
        self.user_embedding = nn.Embed(self.num_users, self.dim, embedding_init=init)
        self.item_embedding = nn.Embed(self.num_items, self.dim, embedding_init=init)
        if self.use_item_bias:
            self.item_bias = nn.Embed(self.num_items, 1, embedding_init=nn.initializers.zeros)

    def user_vectors(
        self,
        users: Int[Array, " batch"],
        history: Int[Array, "batch n"] | None = None,
        history_mask: Bool[Array, "batch n"] | None = None,
    ) -> Float[Array, "batch dim_out"]:
        """The user tower: a table lookup (``history`` is ignored)."""
        del history, history_mask
        _check_ids("MatrixFactorization", "users", users, "[batch]")
        u = self.user_embedding(users)  # [batch, dim]
        return _append_one(u) if self.use_item_bias else u

    def item_vectors(
        self,
        items: Int[Array, " n"],
        features: Float[Array, "n features"] | None = None,
    ) -> Float[Array, "n dim_out"]:
        """The item tower: a table lookup, bias last (``features`` are ignored)."""
        del features
        _check_ids("MatrixFactorization", "items", items, "[n]")
        v = self.item_embedding(items)  # [n, dim]
        return _append(v, self.item_bias(items)) if self.use_item_bias else v

    def __call__(self, inputs: Mapping[str, Array], *, train: bool = False
                 ) -> dict[str, Array]:
        del train
        return _outputs(self, inputs)


class TwoTower(nn.Module):
    """Neural two-tower recommender: MLP(user id, history bag) . MLP(item id, features).

    User tower: ``[id_embedding(u), mean of history_embedding(i) over the user's
    items] -> MLP(hidden_sizes) -> dim``. Item tower: ``[id_embedding(i),
    features_i] -> MLP(hidden_sizes) -> dim``, plus an item bias when
    ``use_item_bias``. The history table is separate from the item tower's id
    table: an item "as something a user chose" and "as a candidate" play
    different roles (as in YouTube's candidate generator, Covington et al. 2016).

    When training on a user's own interaction ``(u, i)``, pass a
    ``history_mask`` that hides ``i`` from ``u``'s history: otherwise the tower
    learns to find the target in its input, which it cannot do at test time.

    Attributes:
      num_users, num_items: table sizes.
      dim: output (and embedding) size.
      hidden_sizes: hidden widths of both MLPs.
      use_item_bias: add a learned per-item bias (vectors get ``dim + 1``).
      use_user_id: include the user id embedding (``False``: users are known
        only by their history, so unseen users can be scored).
      init_scale: standard deviation of the initial embeddings.

    Shapes: ``users: int [batch]``, ``history: int [batch, n]`` (ids; padding
    any id with ``history_mask`` False), ``history_mask: bool [batch, n]`` ->
    ``[batch, dim']``; ``items: int [n]``, ``features: [n, f]`` -> ``[n, dim']``.
    """

    num_users: int
    num_items: int
    dim: int = 32
    hidden_sizes: Sequence[int] = (64,)
    use_item_bias: bool = True
    use_user_id: bool = True
    init_scale: float = 0.1

    def setup(self):
        init = nn.initializers.normal(self.init_scale)
        if self.use_user_id:
            self.user_id_embedding = nn.Embed(self.num_users, self.dim, embedding_init=init)
        self.history_embedding = nn.Embed(self.num_items, self.dim, embedding_init=init)
        self.item_id_embedding = nn.Embed(self.num_items, self.dim, embedding_init=init)
        self.user_mlp = MLP(tuple(self.hidden_sizes), out_features=self.dim)
        self.item_mlp = MLP(tuple(self.hidden_sizes), out_features=self.dim)
        if self.use_item_bias:
            self.item_bias = nn.Embed(self.num_items, 1, embedding_init=nn.initializers.zeros)

    def user_vectors(
        self,
        users: Int[Array, " batch"],
        history: Int[Array, "batch n"] | None = None,
        history_mask: Bool[Array, "batch n"] | None = None,
    ) -> Float[Array, "batch dim_out"]:
        """The user tower (see the class docstring)."""
        _check_ids("TwoTower", "users", users, "[batch]")
        if history is None:
            raise ValueError("TwoTower.user_vectors expected history: int [batch, n], the "
                             "users' interacted items (the user tower reads them)")
        if history.ndim != 2 or history.shape[0] != users.shape[0]:
            raise ValueError(f"TwoTower expected history of shape [batch, n] with batch = "
                             f"{users.shape[0]}, got {history.shape}")
        if history_mask is None:
            history_mask = jnp.ones(history.shape, bool)
        weights = history_mask.astype(jnp.float32)[..., None]  # [batch, n, 1]
        bag = jnp.sum(self.history_embedding(history) * weights, axis=1) / jnp.maximum(
            jnp.sum(weights, axis=1), 1.0)  # [batch, dim]
        parts = [bag]
        if self.use_user_id:
            parts.insert(0, self.user_id_embedding(users))  # [batch, dim]
        x = self.user_mlp(jnp.concatenate(parts, axis=-1))  # [batch, dim]
        return _append_one(x) if self.use_item_bias else x

    def item_vectors(
        self,
        items: Int[Array, " n"],
        features: Float[Array, "n features"] | None = None,
    ) -> Float[Array, "n dim_out"]:
        """The item tower (see the class docstring)."""
        _check_ids("TwoTower", "items", items, "[n]")
        if features is None:
            raise ValueError("TwoTower.item_vectors expected features: [n, f], the items' "
                             "content features (the item tower reads them)")
        if features.shape[:-1] != items.shape:
            raise ValueError(f"TwoTower expected item features [n, f] with n = {items.shape}, "
                             f"got {features.shape}")
        x = jnp.concatenate([self.item_id_embedding(items), features], axis=-1)
        x = self.item_mlp(x)  # [n, dim]
        return _append(x, self.item_bias(items)) if self.use_item_bias else x

    def __call__(self, inputs: Mapping[str, Array], *, train: bool = False
                 ) -> dict[str, Array]:
        del train
        return _outputs(self, inputs)


def popularity_scores(item_counts: Int[np.ndarray, " items"]) -> Float[Array, " items"]:
    """The most-popular baseline: every user gets the same score per item, its
    training interaction count. ``[items] -> float32 [items]`` (broadcast it to
    ``[users, items]`` for the metrics)."""
    return jnp.asarray(item_counts, jnp.float32)
