"""Attention maps and attention rollout for Transformer encoders.

A single layer's attention weights say where each position reads from in
*that* layer; after a few layers every position has mixed with every other,
so raw weights of a deep layer say little about the *input* tokens.
Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in
Transformers") composes the layers instead. Per layer, the heads are fused
(mean, max or min), the residual connection is modelled by averaging with
the identity, and rows are renormalized to sum to 1::

    A_l = normalize_rows(0.5 * fuse_heads(W_l) + 0.5 * I)      # [B, T, T]
    rollout = A_L @ A_{L-1} @ ... @ A_1                         # [B, T, T]

``rollout[b, i, j]`` is how much input token ``j`` flows into position ``i``
of the last layer; for a ``[CLS]``-pooled classifier row 0 explains the
prediction.

Where the weights come from. ``nnlib.layers.TransformerEncoder(...,
return_weights=True)`` returns one ``[B, heads, T, T]`` array per layer,
first layer first. For a whole model that does not expose them (e.g.
``nnlib.models.TransformerClassifier``), :func:`collect_attention_weights`
runs it with every nnlib ``MultiHeadAttention`` asked for its weights (via
``flax.linen.intercept_methods``, so the model's code is unchanged).

Shapes: B batch, H heads, T time (query = key positions), L layers. Padded
key positions have weight 0 in every row, so they receive no rollout mass.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from nnlib.explain.gradients import _TINY, _join_model, _split_model
from nnlib.layers._checks import ShapeError, check_input

HEAD_FUSIONS = ("mean", "max", "min")
AttentionWeights = Float[Array, "batch heads time time"]


def _check_weights(fn: str, weights: Any) -> list[Array]:
    """A non-empty sequence of same-shaped ``[B, H, T, T]`` float arrays."""
    if hasattr(weights, "ndim") and weights.ndim == 5:  # stacked [L, B, H, T, T]
        weights = list(weights)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or not weights:
        raise TypeError(f"{fn} expected a non-empty sequence of attention weights, one "
                        f"[batch, heads, time, time] array per layer, got "
                        f"{type(weights).__name__}")
    layout = "[batch, heads, time, time]"
    weights = [jnp.asarray(w) for w in weights]
    for i, w in enumerate(weights):
        check_input(fn, w, layout=layout, ndim=4, name=f"weights[{i}]")
        if w.shape[-1] != w.shape[-2]:
            raise ShapeError(f"{fn} expected self-attention weights {layout} with as many "
                             f"keys as queries, got weights[{i}] of shape {tuple(w.shape)}")
        if w.shape != weights[0].shape:
            raise ShapeError(f"{fn} expected every layer's weights to have the shape of "
                             f"weights[0] {tuple(weights[0].shape)}, got weights[{i}] of "
                             f"shape {tuple(w.shape)}")
    return weights


def attention_map(
    weights: Sequence[AttentionWeights],
    layer: int,
    head: int | None = None,
) -> Float[Array, "batch time time"]:
    """One layer's attention weights: one head, or the mean over heads.

    Args:
      weights: per-layer ``[B, H, T, T]`` arrays (first layer first).
      layer: index into ``weights`` (negative counts from the end).
      head: head index (negative counts from the end); ``None``: mean over heads.

    Returns:
      ``[B, T, T]``; row ``i`` is where query ``i`` reads from.
    """
    fn = "attention_map"
    weights = _check_weights(fn, weights)
    num_layers, num_heads = len(weights), weights[0].shape[1]
    if not -num_layers <= layer < num_layers:
        raise IndexError(f"{fn} got layer={layer} for weights of {num_layers} layers")
    w = weights[layer]  # [B, H, T, T]
    if head is None:
        return jnp.mean(w, axis=1)
    if not -num_heads <= head < num_heads:
        raise IndexError(f"{fn} got head={head} for weights with {num_heads} heads "
                         f"(shape {tuple(w.shape)})")
    return w[:, head]


@functools.partial(jax.jit, static_argnames=("head_fusion", "add_residual"))
def _rollout(weights: tuple[Array, ...], *, head_fusion: str, add_residual: bool) -> Array:
    fuse = {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}[head_fusion]
    time = weights[0].shape[-1]
    eye = jnp.eye(time, dtype=weights[0].dtype)
    rollout = None
    for w in weights:  # first layer first
        a = fuse(w, axis=1)  # [B, T, T]
        if add_residual:
            a = 0.5 * a + 0.5 * eye
        a = a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), _TINY)
        rollout = a if rollout is None else jnp.matmul(a, rollout)  # [B, T, T]
    return rollout


def attention_rollout(
    weights: Sequence[AttentionWeights],
    *,
    head_fusion: str = "mean",
    add_residual: bool = True,
) -> Float[Array, "batch time time"]:
    """Attention rollout (Abnar & Zuidema 2020).

    Args:
      weights: per-layer ``[B, H, T, T]`` attention weights, first layer first
        (a list, or one stacked ``[L, B, H, T, T]`` array).
      head_fusion: how heads combine per layer: ``"mean"`` (the paper),
        ``"max"`` or ``"min"``.
      add_residual: average each layer with the identity (the residual
        stream); without it the rollout of a deep stack tends to a rank-one
        matrix where every position looks the same.

    Returns:
      ``[B, T, T]`` rollout, rows summing to 1 (for rows of real queries).
    """
    fn = "attention_rollout"
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"{fn} expected head_fusion in {HEAD_FUSIONS}, got {head_fusion!r}")
    weights = _check_weights(fn, weights)
    return _rollout(tuple(weights), head_fusion=head_fusion, add_residual=bool(add_residual))


@functools.partial(jax.jit, static_argnames=("static", "include"))
def _collect(static, arrays, x, *, include):
    from nnlib.layers.attention import MultiHeadAttention

    f = _join_model(static, arrays)
    found: list[Array] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module,
                                                                MultiHeadAttention):
            return next_fun(*args, **kwargs)
        if include is not None and not re.search(include, "/".join(context.module.path)):
            return next_fun(*args, **kwargs)
        asked = kwargs.get("return_weights", False)
        outputs, weights = next_fun(*args, **{**kwargs, "return_weights": True})
        found.append(weights)
        return (outputs, weights) if asked else outputs

    with nn.intercept_methods(interceptor):
        f(x)
    return tuple(found)


def collect_attention_weights(
    f: Callable[[Any], Any],
    x: Any,
    *,
    include: str | None = None,
) -> tuple[Float[Array, "batch heads q_len kv_len"], ...]:
    """Runs ``f(x)`` and returns the weights of every nnlib ``MultiHeadAttention``.

    Args:
      f: a function that applies a linen model built from
        ``nnlib.layers.MultiHeadAttention`` (e.g. ``Partial(model.apply,
        variables)`` of a ``TransformerClassifier``), in evaluation mode.
      x: its input.
      include: a regular expression searched in each attention module's path
        (``"encoder/block_0/attention"``); only matches are collected, e.g.
        ``r"encoder/.*/attention$"`` to skip a decoder's cross-attention.
        ``None``: all.

    Returns:
      ``[B, H, Q, K]`` arrays in call order (first layer first for an
      encoder): ready for :func:`attention_rollout`.
    """
    fn = "collect_attention_weights"
    static, arrays = _split_model(f)
    weights = _collect(static, arrays, x, include=include)
    if not weights:
        raise ValueError(f"{fn} found no nnlib MultiHeadAttention call in f(x)"
                         + (f" with a path matching include={include!r}" if include else ""))
    return weights


__all__ = ["HEAD_FUSIONS", "attention_map", "attention_rollout", "collect_attention_weights"]
