"""Sanity check for attributions: do they depend on what the model learned?

Adebayo et al. (2018, "Sanity Checks for Saliency Maps") re-initialize a
trained network's weights and compare the explanations before and after. A
method whose maps barely change when the weights become random is explaining
the input (edges, intensity), not the model. Two protocols:

* **cascading**: randomize the top layer, then the top two, ... down to the
  first (stage ``k`` randomizes the ``k`` topmost layers);
* **independent**: randomize one layer at a time, the others trained;
* **all**: every layer at once (one stage).

The similarity is Spearman's rank correlation between the original and the
randomized attributions of each example, with tied values given their average
rank (so the many exact zeros of, e.g., gradient x input on a black
background do not count as agreement by index order). It is ~1 for the same
model and should fall well below 1 once layers are random.

Layers. A "layer" is a group of parameter leaves named by a path prefix
(``"head/output"``, ``"block_0"``). By default it is each leaf's parent path
(``block_0/conv``, ``head/dense_0``, ``head/output`` for
``nnlib.models.CNN``), ordered bottom to top by sorting the paths with numeric
parts compared as numbers (``block_2`` before ``block_10``). That is the
forward order for nnlib's sequential models (``block_*``, then ``head``;
``dense_*`` then ``output``); when names do not sort in forward order (e.g.
``TransformerClassifier``: ``cls_token``, ``encoder``, ``head``,
``input_projection``), pass ``layers`` yourself, bottom to top.

Randomization. By default a leaf of rank >= 2 (a Dense or Conv kernel) is
redrawn from LeCun normal (flax's default kernel initializer: variance
1/fan_in, fan_in the product of all axes but the last); leaves of rank < 2
(biases, normalization scales) keep their values: at initialization they are
constants (0, 1), and the kernels carry what was learned. ``randomize_fn``
replaces this rule.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from nnlib.layers._checks import ShapeError

MODES = ("cascading", "independent", "all")
ExplainFn = Callable[[Any, Array, Array], Array]
RandomizeFn = Callable[[Array, str, Array], Array]


class RandomizationResult(NamedTuple):
    """What :func:`model_randomization_check` found.

    Attributes:
      stages: one name per stage: for ``"cascading"`` the layer randomized
        last (stage ``k`` has that layer and every layer above it random),
        for ``"independent"`` the only layer randomized, for ``"all"``
        ``("all",)``. Top layer first.
      correlation: ``[num_stages, B]`` Spearman correlation between the
        original and the randomized attributions, per stage and example.
    """

    stages: tuple[str, ...]
    correlation: Float[Array, "stages batch"]


# --- Spearman's rank correlation -------------------------------------------------------


def _average_ranks(v: Array) -> Array:
    """``[n] -> [n]`` 1-based ranks, ties sharing the mean of their ranks.

    A value with ``lo`` smaller values and ``hi`` values <= itself occupies
    ranks ``lo + 1 .. hi``, whose mean is ``(lo + 1 + hi) / 2``.
    """
    s = jnp.sort(v)
    lo = jnp.searchsorted(s, v, side="left")
    hi = jnp.searchsorted(s, v, side="right")
    return (lo + hi + 1).astype(jnp.float32) / 2.0


def _pearson(a: Array, b: Array) -> Array:
    a = a - jnp.mean(a)
    b = b - jnp.mean(b)
    return jnp.sum(a * b) / jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b))


@jax.jit
def _spearman(a: Array, b: Array) -> Array:
    a = a.reshape(a.shape[0], -1)  # [B, D]
    b = b.reshape(b.shape[0], -1)
    rank = jax.vmap(_average_ranks)
    return jax.vmap(_pearson)(rank(a), rank(b))  # [B]


def spearman_rank_correlation(
    a: Float[Array, "batch ..."], b: Float[Array, "batch ..."]
) -> Float[Array, " batch"]:
    """Spearman's rho between ``a[i]`` and ``b[i]`` (all features flattened), per example.

    The Pearson correlation of the average ranks (ties averaged, as
    ``scipy.stats.spearmanr``). NaN when an example's values are all equal.

    Args:
      a, b: ``[B, ...]`` arrays of the same shape.

    Returns:
      ``[B]`` correlations in ``[-1, 1]``.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape or a.ndim < 1:
        raise ShapeError(f"spearman_rank_correlation expected a and b of the same shape "
                         f"[batch, ...], got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return _spearman(a, b)


# --- layers and their randomization ----------------------------------------------------


def _leaf_name(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.split(r"(\d+)", name) if part)


def layer_names(params: Any) -> tuple[str, ...]:
    """Default layers of a parameter tree, bottom to top (see the module doc).

    Args:
      params: a parameter pytree (e.g. ``variables["params"]``).

    Returns:
      Each leaf's parent path (the leaf's own path for a top-level leaf),
      deduplicated, naturally sorted: ``("block_0/conv", "block_1/conv",
      "head/dense_0", "head/output")`` for ``nnlib.models.CNN``.
    """
    names = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _leaf_name(path)
        names.add(name.rsplit("/", 1)[0] if "/" in name else name)
    return tuple(sorted(names, key=_natural_key))


def _in_layer(leaf: str, layer: str) -> bool:
    return leaf == layer or leaf.startswith(layer + "/")


def reinitialize(key: Array, path: str, leaf: Array) -> Array:
    """Default ``randomize_fn``: LeCun normal for rank >= 2 leaves, others unchanged.

    Args:
      key: PRNG key for this leaf.
      path: the leaf's path, e.g. ``"head/output/kernel"`` (unused here;
        a custom rule may use it).
      leaf: the trained value.

    Returns:
      The new value, same shape and dtype.
    """
    del path
    if leaf.ndim < 2:
        return leaf
    return jax.nn.initializers.lecun_normal()(key, leaf.shape, leaf.dtype)


@functools.partial(jax.jit, static_argnames=("randomize_fn", "names", "owner"))
def _draw(key: Array, leaves: list[Array], *, randomize_fn: RandomizeFn,
          names: tuple[str, ...], owner: tuple[int | None, ...]) -> dict[int, Array]:
    """``{leaf index: new value}`` for every leaf that belongs to a layer (one program,
    not one dispatch per leaf)."""
    return {j: randomize_fn(jax.random.fold_in(jax.random.fold_in(key, i), j), name, leaf)
            for j, (leaf, name, i) in enumerate(zip(leaves, names, owner, strict=True))
            if i is not None}


def model_randomization_check(
    explain_fn: ExplainFn,
    params: Any,
    x: Float[Array, "batch ..."],
    target: Any,
    *,
    key: Array,
    mode: str = "cascading",
    layers: Sequence[str] | None = None,
    randomize_fn: RandomizeFn | None = None,
    absolute: bool = False,
) -> RandomizationResult:
    """Model parameter randomization test (Adebayo et al. 2018).

    Args:
      explain_fn: ``(params, x, target) -> attributions [B, ...]``, e.g.
        ``lambda p, x, t: saliency(Partial(model.apply, {"params": p}), x, t)``.
        It is jit-compiled once and called with every randomized tree.
      params: the trained parameter pytree.
      x: ``[B, ...]`` inputs to explain.
      target: ``[B]`` classes to explain, passed unchanged to ``explain_fn``;
        use the trained model's predictions so that every stage explains the
        same classes.
      key: PRNG key; layer ``i`` (bottom-up index) uses ``fold_in(key, i)``
        and its ``j``-th leaf ``fold_in(that, j)``, so a layer gets the same
        random values in every stage.
      mode: ``"cascading"`` (top-down, cumulative), ``"independent"`` (one
        layer at a time) or ``"all"`` (every layer at once).
      layers: path prefixes naming the layers, bottom to top; leaves under
        none of them are never randomized. ``None``: :func:`layer_names`.
      randomize_fn: ``(key, leaf_path, leaf) -> new leaf``; default
        :func:`reinitialize`.
      absolute: compare ``|attributions|`` (for methods whose sign is
        arbitrary, as Adebayo et al. also report).

    Returns:
      :class:`RandomizationResult`: stage names (top layer first) and the
      ``[num_stages, B]`` rank correlations.
    """
    fn = "model_randomization_check"
    if mode not in MODES:
        raise ValueError(f"{fn} expected mode in {MODES}, got {mode!r}")
    randomize_fn = randomize_fn or reinitialize
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [_leaf_name(path) for path, _ in flat]
    layers = layer_names(params) if layers is None else tuple(layers)
    if not layers:
        raise ValueError(f"{fn} got no layers to randomize")
    owner: list[int | None] = []  # index into layers of each leaf, None: never randomized
    for name in names:
        matches = [i for i, layer in enumerate(layers) if _in_layer(name, layer)]
        # the most specific listed layer (longest prefix), wherever it is listed
        owner.append(max(matches, key=lambda i: len(layers[i])) if matches else None)
    empty = [layer for i, layer in enumerate(layers) if i not in owner]
    if empty:
        raise ValueError(f"{fn}: no parameters under layers {empty}; parameter paths are "
                         f"{names}")

    # Every randomized leaf is drawn once, so the stages are nested.
    leaves = [leaf for _, leaf in flat]
    random_leaves = _draw(key, leaves, randomize_fn=randomize_fn, names=tuple(names),
                          owner=tuple(owner))
    for j, new in random_leaves.items():
        if jnp.shape(new) != jnp.shape(leaves[j]):
            raise ShapeError(f"{fn}: randomize_fn changed the shape of {names[j]!r} from "
                             f"{jnp.shape(leaves[j])} to {jnp.shape(new)}")

    top_down = list(range(len(layers)))[::-1]
    if mode == "cascading":
        stages = [(layers[i], set(top_down[:k + 1])) for k, i in enumerate(top_down)]
    elif mode == "independent":
        stages = [(layers[i], {i}) for i in top_down]
    else:
        stages = [("all", set(top_down))]

    explain = jax.jit(explain_fn)
    original = explain(params, x, target)
    if absolute:
        original = jnp.abs(original)
    correlations = []
    for _, randomized in stages:
        mixed = [random_leaves[j] if i in randomized else leaf
                 for j, (leaf, i) in enumerate(zip(leaves, owner, strict=True))]
        attributions = explain(jax.tree.unflatten(treedef, mixed), x, target)
        if absolute:
            attributions = jnp.abs(attributions)
        correlations.append(spearman_rank_correlation(original, attributions))
    return RandomizationResult(tuple(name for name, _ in stages), jnp.stack(correlations))


__all__ = [
    "MODES",
    "RandomizationResult",
    "layer_names",
    "model_randomization_check",
    "reinitialize",
    "spearman_rank_correlation",
]
