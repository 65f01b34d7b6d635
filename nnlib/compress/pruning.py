"""Pruning: zero the weights that matter least, and keep them zero while training.

A **mask** is a pytree of booleans shaped like the parameters (``True`` =
keep). Three ways to choose one:

- **Magnitude, per layer** (``magnitude_masks(..., scope="layer")``): in each
  prunable tensor, zero exactly ``round(sparsity * size)`` entries of smallest
  ``|w|`` (Han et al. 2015, "Learning both Weights and Connections").
- **Magnitude, global** (``scope="global"``): rank all prunable weights of the
  model together, so layers with many small weights lose more of them. The
  overall fraction is exact; per-layer fractions float.
- **Structured, by channel** (``channel_masks``): zero whole output channels
  (a Dense layer's neurons, a convolution's filters) with the smallest L1 norm
  ``sum |W[..., j]|`` (Li et al. 2017, "Pruning Filters for Efficient
  ConvNets"), and the matching bias entries. Unlike unstructured sparsity, a
  zeroed channel can be sliced out of the dense tensors for a real speed-up.

By default the prunable tensors are those with ``ndim >= 2`` (Dense and conv
kernels); biases and normalization scales are few and sensitive, and stay.

**Gradual pruning** (Zhu & Gupta 2017, "To prune, or not to prune") raises
the sparsity from ``s_i`` to ``s_f`` over ``n`` pruning steps of ``Δt``
training steps each, starting at ``t0``::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n Δt)) ** 3

pruning fast while there are many redundant weights and slowly near the end
(``polynomial_sparsity``).

**Keeping pruned weights zero** is an optax transformation, placed last in
the chain (``optax.chain(optax.adamw(...), prune(...))``): at the scheduled
steps it recomputes the mask from the current parameters, and at every step
it replaces the update of each masked weight by ``-w``, so ``w + update`` is
exactly 0 — a freshly pruned weight drops to zero and a pruned one never
moves, whatever the optimizer's momentum or weight decay would do. Once
zero, a weight has the smallest magnitude, so a rising sparsity keeps every
weight pruned before.

**Storage**: a sparse tensor is only smaller in a sparse format.
``storage_bytes`` counts COO (value + row and column index per nonzero),
CSR (value + column index per nonzero, one pointer per row) and bitmask
(one bit per entry + the nonzero values) against dense.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, PyTree

from nnlib.train.optim import path_str

Prunable = Callable[[str, Any], bool]
MaskFn = Callable[[PyTree, Any], PyTree]
Schedule = Callable[[Array], Array]


def default_prunable(path: str, leaf: Any) -> bool:
    """Kernels (``ndim >= 2``) are pruned; biases and norm scales are not."""
    del path
    return getattr(leaf, "ndim", 0) >= 2


def _flat(params: PyTree) -> tuple[list[tuple[Any, Any]], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    return leaves, treedef


def _check_fraction(fn: str, name: str, value: Any) -> None:
    if isinstance(value, int | float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{fn}: {name} must be in [0, 1], got {value}")


def _num_pruned(fraction: Any, n: int) -> Any:
    # A Python fraction gives a Python count (exact); a traced one a traced count.
    if isinstance(fraction, int | float):
        return int(round(fraction * n))
    return jnp.round(jnp.asarray(fraction, jnp.float32) * n).astype(jnp.int32)


def _keep_largest(scores: Float[Array, " n"], num_pruned: Any) -> Bool[Array, " n"]:
    """True for all but the ``num_pruned`` smallest of non-negative ``scores``;
    ties are pruned in index order, so exactly ``num_pruned`` are False.

    No sort: the ``num_pruned``-th smallest value is found by bisection on
    the float32 bit patterns (ordered like the values for non-negative
    floats), 32 counting passes over the scores. Sorting 65k weights took
    ~70 ms on a 2-core CPU; this takes a few.
    """
    bits = jax.lax.bitcast_convert_type(jnp.abs(scores).astype(jnp.float32), jnp.int32)
    k = jnp.asarray(num_pruned, jnp.int32)

    def halve(_, bounds):
        lo, hi = bounds  # invariant: count(bits <= lo) < k <= count(bits <= hi)
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits <= mid) >= k
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

    inf_bits = jnp.int32(0x7F800000)
    _, kth = jax.lax.fori_loop(0, 32, halve, (jnp.int32(-1), inf_bits))  # k-th smallest
    below = bits < kth
    ties = bits == kth
    tie_rank = jnp.cumsum(ties.astype(jnp.int32))  # 1, 2, ... along the ties
    pruned = below | (ties & (tie_rank <= k - jnp.sum(below)))
    return ~(pruned & (k > 0))


def magnitude_masks(
    params: PyTree,
    sparsity: float | Array,
    *,
    scope: str = "layer",
    prunable: Prunable = default_prunable,
) -> PyTree:
    """Keep-masks that zero the smallest-magnitude weights.

    Args:
      params: parameter pytree (e.g. ``state.params``).
      sparsity: fraction to zero, in [0, 1]; may be traced (under ``jit``).
      scope: ``"layer"`` zeroes ``round(sparsity * size)`` entries of each
        prunable tensor; ``"global"`` zeroes ``round(sparsity * total)`` of all
        prunable entries ranked together.
      prunable: ``(path, leaf) -> bool``; path like ``"mlp/dense_0/kernel"``.

    Returns:
      A pytree of bool arrays shaped like ``params``; non-prunable leaves are
      all ``True``.
    """
    _check_fraction("magnitude_masks", "sparsity", sparsity)
    if scope not in ("layer", "global"):
        raise ValueError(f"magnitude_masks: scope must be 'layer' or 'global', got {scope!r}")
    leaves, treedef = _flat(params)
    chosen = [prunable(path_str(p), x) for p, x in leaves]
    masks = [jnp.ones(jnp.shape(x), bool) for _, x in leaves]
    if not any(chosen):
        return jax.tree.unflatten(treedef, masks)
    if scope == "layer":
        for i, ((_, x), take) in enumerate(zip(leaves, chosen, strict=True)):
            if take:
                flat = jnp.abs(jnp.ravel(x))
                masks[i] = _keep_largest(flat, _num_pruned(sparsity, flat.size)).reshape(x.shape)
        return jax.tree.unflatten(treedef, masks)
    picked = [(i, x) for i, ((_, x), take) in enumerate(zip(leaves, chosen, strict=True))
              if take]
    scores = jnp.concatenate([jnp.abs(jnp.ravel(x)).astype(jnp.float32) for _, x in picked])
    keep = _keep_largest(scores, _num_pruned(sparsity, scores.size))
    offset = 0
    for i, x in picked:
        masks[i] = keep[offset:offset + x.size].reshape(x.shape)
        offset += x.size
    return jax.tree.unflatten(treedef, masks)


def channel_masks(
    params: PyTree,
    fraction: float | Array,
    *,
    prunable: Prunable = default_prunable,
) -> PyTree:
    """Keep-masks that zero whole output channels of smallest L1 norm.

    For each prunable kernel ``W: [..., in, out]`` (Dense ``[in, out]``, conv
    ``[kh, kw, in, out]``) the channel norms are ``sum(|W|, all axes but the
    last)``: ``[out]``; the ``round(fraction * out)`` smallest channels are
    zeroed in the kernel (``W[..., j] = 0``) and in the sibling ``bias[j]``
    (same parent, name ``"bias"``), so the channel outputs ``act(0)``.

    Exclude the classifier's output layer through ``prunable`` (zeroing a
    class's logit is not compression), e.g.
    ``lambda path, x: x.ndim >= 2 and "output" not in path``.

    Returns:
      A pytree of bool arrays shaped like ``params``.
    """
    _check_fraction("channel_masks", "fraction", fraction)
    leaves, treedef = _flat(params)
    index = {tuple(p): i for i, (p, _) in enumerate(leaves)}
    masks = [jnp.ones(jnp.shape(x), bool) for _, x in leaves]
    for i, (path, x) in enumerate(leaves):
        if not prunable(path_str(path), x):
            continue
        norms = jnp.sum(jnp.abs(x), axis=tuple(range(x.ndim - 1)))  # [out]
        keep = _keep_largest(norms, _num_pruned(fraction, norms.size))  # [out]
        masks[i] = jnp.broadcast_to(keep, x.shape)
        last = path[-1]
        if getattr(last, "key", None) is not None:
            sibling = index.get((*path[:-1], type(last)("bias")))
            if sibling is not None and jnp.shape(leaves[sibling][1]) == keep.shape:
                masks[sibling] = keep
    return jax.tree.unflatten(treedef, masks)


def polynomial_sparsity(
    final_sparsity: float | Array,
    begin_step: int,
    end_step: int,
    *,
    initial_sparsity: float = 0.0,
    frequency: int = 1,
    power: float = 3.0,
) -> Schedule:
    """Zhu & Gupta's gradual schedule ``step -> sparsity``.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power`` for
    ``t0 <= t <= t1``, with ``t`` rounded down to ``t0 + k * frequency`` (the
    sparsity changes only on pruning steps); ``s_i`` before ``t0`` and ``s_f``
    after ``t1``. ``final_sparsity`` may be a traced array (one compiled
    program for many targets).
    """
    if end_step <= begin_step:
        raise ValueError(f"polynomial_sparsity: end_step must be > begin_step, got "
                         f"begin_step={begin_step}, end_step={end_step}")
    if frequency < 1:
        raise ValueError(f"polynomial_sparsity: frequency must be >= 1, got {frequency}")
    _check_fraction("polynomial_sparsity", "final_sparsity", final_sparsity)
    _check_fraction("polynomial_sparsity", "initial_sparsity", initial_sparsity)

    def schedule(step: Array) -> Array:
        step = jnp.asarray(step, jnp.float32)
        t = jnp.clip(step, begin_step, end_step)
        t = begin_step + jnp.floor((t - begin_step) / frequency) * frequency
        progress = jnp.minimum((t - begin_step) / (end_step - begin_step), 1.0)
        # Past t1 the target holds even when t1 - t0 is not a multiple of frequency
        # (rounding down alone would stop one pruning step short of s_f forever).
        progress = jnp.where(step > end_step, 1.0, progress)
        s_f = jnp.asarray(final_sparsity, jnp.float32)
        return s_f + (initial_sparsity - s_f) * (1.0 - progress) ** power

    return schedule


class PruningState(NamedTuple):
    """``count``: updates seen (int32); ``masks``: the current keep-masks."""

    count: Array
    masks: PyTree


def _resolve_mask_fn(mask_fn: MaskFn | str, prunable: Prunable) -> MaskFn:
    if callable(mask_fn):
        return mask_fn
    if mask_fn in ("layer", "global"):
        return lambda p, s: magnitude_masks(p, s, scope=mask_fn, prunable=prunable)
    if mask_fn == "channel":
        return lambda p, s: channel_masks(p, s, prunable=prunable)
    raise ValueError(f"prune: mask_fn must be 'layer', 'global', 'channel' or a function "
                     f"(params, sparsity) -> masks, got {mask_fn!r}")


def _mask_updates(updates: PyTree, params: PyTree, masks: PyTree) -> PyTree:
    # -w, not 0: the update that lands a freshly masked weight on exactly zero.
    return jax.tree.map(lambda u, p, m: jnp.where(m, u, -p).astype(u.dtype),
                        updates, params, masks)


def prune(
    sparsity: float | Schedule,
    *,
    mask_fn: MaskFn | str = "layer",
    prunable: Prunable = default_prunable,
    update_every: int = 1,
    begin_step: int = 0,
    end_step: int | None = None,
) -> optax.GradientTransformation:
    """An optax transformation that prunes on a schedule and keeps pruned weights zero.

    Put it last: ``optax.chain(optax.adamw(lr), prune(schedule, ...))``.

    Args:
      sparsity: a constant or a schedule ``step -> sparsity`` (e.g.
        ``polynomial_sparsity``), read at the update's step.
      mask_fn: ``"layer"`` / ``"global"`` magnitude pruning, ``"channel"``
        (structured, L1 of output channels), or ``(params, sparsity) -> masks``.
      prunable: which tensors the named mask functions prune.
      update_every: recompute the masks every this many steps (Zhu & Gupta's
        ``Δt``); between updates the masks are held.
      begin_step, end_step: masks are recomputed only at steps ``t`` with
        ``begin_step <= t <= end_step`` (``None``: no end) and
        ``(t - begin_step) % update_every == 0``; before the first update
        nothing is masked.

    Requires ``params`` in ``tx.update(grads, state, params)``. The masks live
    in the optimizer state (``pruning_masks(opt_state)`` finds them).
    """
    if update_every < 1:
        raise ValueError(f"prune: update_every must be >= 1, got {update_every}")
    schedule = sparsity if callable(sparsity) else (lambda step: jnp.float32(sparsity))
    if not callable(sparsity):
        _check_fraction("prune", "sparsity", sparsity)
    compute_masks = _resolve_mask_fn(mask_fn, prunable)

    def init(params: PyTree) -> PruningState:
        return PruningState(count=jnp.zeros((), jnp.int32),
                            masks=jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params))

    def update(updates: PyTree, state: PruningState, params: PyTree | None = None
               ) -> tuple[PyTree, PruningState]:
        if params is None:
            raise ValueError("prune needs the parameters: call tx.update(grads, opt_state, "
                             "params)")
        count = state.count
        due = (count >= begin_step) & ((count - begin_step) % update_every == 0)
        if end_step is not None:
            due &= count <= end_step
        # cond, not where: the ranking sorts every weight, so only do it when due.
        masks = jax.lax.cond(due, lambda: compute_masks(params, schedule(count)),
                             lambda: state.masks)
        return _mask_updates(updates, params, masks), PruningState(count + 1, masks)

    return optax.GradientTransformation(init, update)


def keep_masked(masks: PyTree) -> optax.GradientTransformation:
    """Fixed masks (e.g. after one-shot pruning): masked weights are set to and
    kept at exactly zero during fine-tuning. Put it last in the chain."""

    def init(params: PyTree) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("keep_masked needs the parameters: call tx.update(grads, "
                             "opt_state, params)")
        return _mask_updates(updates, params, masks), state

    return optax.GradientTransformation(init, update)


def pruning_masks(opt_state: Any) -> PyTree:
    """The masks of the (first) ``prune`` transformation inside an optimizer state."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, PruningState))
             if isinstance(s, PruningState)]
    if not found:
        raise ValueError("pruning_masks: no prune(...) state in this optimizer state; build "
                         "the optimizer with optax.chain(..., prune(...))")
    return found[0].masks


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """``params`` with masked entries set to zero."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def sparsity(params: PyTree, *, prunable: Prunable = default_prunable) -> float:
    """Fraction of exact zeros among the prunable entries."""
    leaves, _ = _flat(params)
    picked = [np.asarray(x) for p, x in leaves if prunable(path_str(p), x)]
    total = sum(x.size for x in picked)
    return float(sum(int(np.sum(x == 0)) for x in picked) / total) if total else 0.0


def layer_sparsity(params: PyTree, *, prunable: Prunable = default_prunable
                   ) -> dict[str, float]:
    """``{path: fraction of zeros}`` for every prunable tensor."""
    return {path_str(p): float(np.mean(np.asarray(x) == 0))
            for p, x in _flat(params)[0] if prunable(path_str(p), x)}


def _index_bytes(max_value: int) -> int:
    for nbytes in (1, 2, 4):
        if max_value < 256 ** nbytes:
            return nbytes
    return 8


def storage_bytes(
    params: PyTree,
    *,
    prunable: Prunable = default_prunable,
    index_bytes: int | None = None,
) -> dict[str, int]:
    """Bytes to store ``params`` dense and in three sparse formats.

    Each prunable tensor is viewed as a matrix ``[prod(shape[:-1]),
    shape[-1]]`` (rows x columns) holding ``nnz`` nonzeros of ``v`` bytes:

    - dense: ``size * v``
    - COO: ``nnz * (v + 2 * i)`` (a row and a column index per nonzero)
    - CSR: ``nnz * (v + i) + (rows + 1) * i`` (column indices, row pointers)
    - bitmask: ``ceil(size / 8) + nnz * v``

    ``i`` is ``index_bytes`` (4 for int32 indices, as scipy uses) or, when
    ``None``, the smallest unsigned integer width that holds the largest index
    of that tensor (1, 2, 4 or 8 bytes). Non-prunable leaves count dense in
    every format.

    Returns:
      ``{"dense", "coo", "csr", "bitmask", "nonzeros", "entries"}``.
    """
    out = {"dense": 0, "coo": 0, "csr": 0, "bitmask": 0, "nonzeros": 0, "entries": 0}
    for path, x in _flat(params)[0]:
        x = np.asarray(x)
        v = x.dtype.itemsize
        out["dense"] += x.size * v
        out["entries"] += x.size
        if not prunable(path_str(path), x):
            nnz = x.size
            out["nonzeros"] += nnz
            for fmt in ("coo", "csr", "bitmask"):
                out[fmt] += x.size * v
            continue
        rows, cols = int(np.prod(x.shape[:-1])), x.shape[-1]
        nnz = int(np.count_nonzero(x))
        out["nonzeros"] += nnz
        i_row = index_bytes or _index_bytes(rows - 1)
        i_col = index_bytes or _index_bytes(cols - 1)
        i_ptr = index_bytes or _index_bytes(nnz)
        out["coo"] += nnz * (v + i_row + i_col)
        out["csr"] += nnz * (v + i_col) + (rows + 1) * i_ptr
        out["bitmask"] += math.ceil(x.size / 8) + nnz * v
    return out
