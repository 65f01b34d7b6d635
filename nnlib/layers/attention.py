"""Scaled dot-product and multi-head attention (Vaswani et al. 2017).

Each query position takes a weighted average of value vectors, weighted by how
well its query matches each key::

    weights = softmax(q @ k^T / sqrt(head_dim))   # [batch, heads, q_len, kv_len]
    outputs = weights @ v                          # [batch, q_len, heads, head_dim]

Multi-head attention projects the inputs into ``heads`` smaller query/key/value
spaces, attends in each, and projects the concatenated results back.

Layout. Per-head arrays use JAX's ``jax.nn.dot_product_attention`` layout,
``[batch, length, heads, head_dim]``; attention weights and masks use
``[batch, heads, q_len, kv_len]``.

Masks. A mask is boolean and **True means "may attend"**. It need only be
broadcastable to ``[batch, heads, q_len, kv_len]`` (rank 4, size-1 axes
allowed): ``causal_mask`` gives ``[1, 1, q_len, kv_len]``, ``padding_mask``
gives ``[batch, 1, q_len or 1, kv_len]``, ``combine_masks`` ands any of them.
Masked logits are replaced by a large negative *finite* number before the
softmax (never ``-inf``, whose gradients are NaN).

Fully masked rows. A query that may attend to no key at all (e.g. a padded
query under ``padding_mask(query_valid, key_valid)``) gets **all-zero
weights and an all-zero output**, not NaN and not an average of everything:
"nothing to look at" reads as "nothing seen". Its gradient is zero too.

Precision. Logits are accumulated and the softmax is taken in float32 (float64
for float64 inputs), also for bfloat16/float16 inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from nnlib.layers._checks import ShapeError, check_input, check_mask, param_shape
from nnlib.layers._native import attention as native_attention
from nnlib.layers._native import available as native_available
from nnlib.layers._native import reason as native_reason
from nnlib.layers.dense import Dense
from nnlib.layers.normalization import dropout

Initializer = Callable[..., Array]

# Same value as jax.nn.dot_product_attention: finite in float32 (so
# exp(neg - max) underflows to exactly 0) and far below any real logit.
_LARGE_NEGATIVE = -0.7 * float(np.finfo(np.float32).max)

_ATTENTION_LAYOUT = "[batch, heads, q_len, kv_len]"


# --------------------------------------------------------------------------- #
# Masks: boolean, True = may attend, broadcastable to [batch, heads, q, kv].
# --------------------------------------------------------------------------- #


def causal_mask(q_len: int, kv_len: int | None = None) -> Bool[Array, "1 1 q_len kv_len"]:
    """Lower-triangular mask: a query never attends to a later position.

    The queries are the *last* ``q_len`` of the ``kv_len`` positions (as when
    new tokens attend to a KV cache of earlier ones), so query ``i`` may attend
    to keys ``j <= i + kv_len - q_len``. With ``kv_len == q_len`` this is the
    usual ``j <= i``.

    Args:
      q_len: number of query positions.
      kv_len: number of key positions; defaults to ``q_len``.

    Returns:
      ``mask: [1, 1, q_len, kv_len]``, True where attending is allowed.
    """
    kv_len = q_len if kv_len is None else kv_len
    if q_len > kv_len:
        raise ValueError(
            f"causal_mask needs kv_len >= q_len (queries are the last q_len of "
            f"the kv_len positions), got q_len={q_len}, kv_len={kv_len}"
        )
    offset = kv_len - q_len
    rows = jnp.arange(q_len)[:, None] + offset  # [q, 1]: each query's position
    cols = jnp.arange(kv_len)[None, :]  # [1, kv]
    return (cols <= rows)[None, None]  # [1, 1, q, kv]


def padding_mask(
    query_valid: Bool[Array, "batch q_len"] | None,
    key_valid: Bool[Array, "batch kv_len"],
) -> Bool[Array, "batch 1 q_len kv_len"]:
    """Mask from per-token validity flags (True = real token, False = padding).

    Args:
      query_valid: ``[batch, q_len]`` or ``None``. When given, padded queries
        attend to nothing (their output is zero, see the module docstring).
      key_valid: ``[batch, kv_len]``; padded keys are never attended to.

    Returns:
      ``mask: [batch, 1, q_len, kv_len]``, or ``[batch, 1, 1, kv_len]`` when
      ``query_valid`` is ``None``.
    """
    check_mask("padding_mask", key_valid, (_dim(key_valid, 0), _dim(key_valid, 1)),
               layout="[batch, kv_len]", name="key_valid")
    key_valid = _as_bool("padding_mask", key_valid, "key_valid")
    mask = key_valid[:, None, None, :]  # [B, 1, 1, kv]
    if query_valid is None:
        return mask
    check_mask("padding_mask", query_valid, (key_valid.shape[0], _dim(query_valid, 1)),
               layout="[batch, q_len]", name="query_valid")
    query_valid = _as_bool("padding_mask", query_valid, "query_valid")
    return jnp.logical_and(mask, query_valid[:, None, :, None])  # [B, 1, q, kv]


def combine_masks(*masks: Bool[Array, "*dims"] | None) -> Bool[Array, "*dims"] | None:
    """Logical AND of the given masks, skipping ``None``; ``None`` if all are.

    Shapes broadcast against each other, e.g. ``[1, 1, q, kv]`` and
    ``[batch, 1, 1, kv]`` combine to ``[batch, 1, q, kv]``.
    """
    present = [_as_bool("combine_masks", m, "mask") for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


def _dim(x: Any, axis: int) -> int:
    """Size of ``x`` along ``axis``, or -1 when ``x`` has no such axis (so the
    shape check that follows reports the bad rank)."""
    shape = getattr(x, "shape", ())
    return shape[axis] if len(shape) > axis else -1


def _as_bool(layer: str, mask: Any, name: str) -> Array:
    """Boolean view of a mask; 0/1 integers are accepted, floats are not (an
    additive ``-inf`` mask would silently turn into "attend everywhere")."""
    dtype = np.dtype(getattr(mask, "dtype", np.float64))
    if dtype == np.bool_:
        return jnp.asarray(mask)
    if np.issubdtype(dtype, np.integer):
        return jnp.asarray(mask).astype(jnp.bool_)
    raise TypeError(
        f"{layer} expected {name} to be boolean (True = may attend), got dtype "
        f"{dtype} with shape {getattr(mask, 'shape', None)}; additive float masks "
        f"are not supported, use e.g. mask == 0"
    )


# --------------------------------------------------------------------------- #
# Scaled dot-product attention on per-head arrays.
# --------------------------------------------------------------------------- #


def _check_qkv(query: Any, key: Any, value: Any | None) -> None:
    name = "dot_product_attention"
    layout = "[batch, {}, heads, head_dim]"
    check_input(name, query, layout=layout.format("q_len"), ndim=4, name="query")
    check_input(name, key, layout=layout.format("kv_len"), ndim=4, name="key")
    batch, _, heads, head_dim = query.shape
    if key.shape[0] != batch or key.shape[2:] != (heads, head_dim):
        raise ShapeError(
            f"{name} expected key of shape [batch={batch}, kv_len, heads={heads}, "
            f"head_dim={head_dim}] to match query {tuple(query.shape)}, "
            f"got shape {tuple(key.shape)}"
        )
    if value is not None:
        check_input(name, value, layout=layout.format("kv_len"), ndim=4, name="value")
        if value.shape[:3] != key.shape[:3]:
            raise ShapeError(
                f"{name} expected value of shape [batch, kv_len, heads, head_dim] "
                f"with [batch, kv_len, heads] = {tuple(key.shape[:3])} as in key, "
                f"got shape {tuple(value.shape)}"
            )


def _check_attention_mask(layer: str, mask: Any, expected: tuple[int, ...]) -> Array | None:
    if mask is None:
        return None
    check_mask(layer, mask, expected, layout=_ATTENTION_LAYOUT, broadcast=True)
    return _as_bool(layer, mask, "mask")


def _attention_logits(query: Array, key: Array, mask: Array | None) -> Array:
    """Scaled, masked logits ``[B, H, q, kv]`` in at least float32."""
    # Accumulate and normalise in (at least) float32 whatever the input dtype:
    # bf16 logits lose the small differences the softmax amplifies.
    logits_dtype = np.promote_types(query.dtype, np.float32)  # numpy: no strict-mode error
    # The query is scaled, not the logits: a quarter of the work at kv_len =
    # 4 * head_dim, and on CPU XLA otherwise materialised the scale as a
    # [B, H, q, kv] array for the fused attention (MiniLM: 25 MB per call).
    query = query * jnp.asarray(1.0 / np.sqrt(query.shape[-1]), query.dtype)
    logits = jnp.einsum(
        "bqhd,bkhd->bhqk", query, key, preferred_element_type=logits_dtype
    )  # [B, H, q, kv]
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.asarray(_LARGE_NEGATIVE, logits_dtype))
    return logits


def dot_product_attention_weights(
    query: Float[Array, "batch q_len heads head_dim"],
    key: Float[Array, "batch kv_len heads head_dim"],
    mask: Bool[Array, "#batch #heads #q_len #kv_len"] | None = None,
) -> Float[Array, "batch heads q_len kv_len"]:
    """Attention weights ``softmax(q k^T / sqrt(head_dim))`` over the keys.

    Args:
      query: ``[batch, q_len, heads, head_dim]``.
      key: ``[batch, kv_len, heads, head_dim]``.
      mask: boolean, broadcastable to ``[batch, heads, q_len, kv_len]``, True =
        may attend.

    Returns:
      ``weights: [batch, heads, q_len, kv_len]`` in the query's dtype. Each row
      sums to 1 and is exactly 0 on masked keys; a fully masked row is all 0.
    """
    _check_qkv(query, key, None)
    batch, q_len, heads, _ = query.shape
    mask = _check_attention_mask(
        "dot_product_attention", mask, (batch, heads, q_len, key.shape[1])
    )
    weights = jax.nn.softmax(_attention_logits(query, key, mask), axis=-1)
    if mask is not None:
        # A row with every key masked would otherwise be uniform over them all.
        weights = jnp.where(mask.any(axis=-1, keepdims=True), weights, 0.0)
    return weights.astype(query.dtype)


def dot_product_attention(
    query: Float[Array, "batch q_len heads head_dim"],
    key: Float[Array, "batch kv_len heads head_dim"],
    value: Float[Array, "batch kv_len heads v_head_dim"],
    mask: Bool[Array, "#batch #heads #q_len #kv_len"] | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: PRNGKeyArray | None = None,
    deterministic: bool = True,
    return_weights: bool = False,
    implementation: Literal["auto", "native", "jax", "explicit"] = "auto",
) -> (
    Float[Array, "batch q_len heads v_head_dim"]
    | tuple[Float[Array, "batch q_len heads v_head_dim"], Float[Array, "batch heads q_len kv_len"]]
):
    """Scaled dot-product attention, ``softmax(q k^T / sqrt(d)) v``, per head.

    Args:
      query: ``[batch, q_len, heads, head_dim]``.
      key: ``[batch, kv_len, heads, head_dim]``.
      value: ``[batch, kv_len, heads, v_head_dim]``.
      mask: boolean, broadcastable to ``[batch, heads, q_len, kv_len]``, True =
        may attend.
      dropout_rate: dropout on the attention weights (after the softmax, as in
        the original Transformer), active only when ``deterministic=False``.
      dropout_rng: PRNG key for that dropout.
      deterministic: turn dropout off.
      return_weights: also return the attention weights (before dropout).
      implementation: ``"explicit"`` materialises the weights;
        ``"jax"`` calls ``jax.nn.dot_product_attention`` (which may use a fused
        kernel, but cannot return weights or apply dropout); ``"native"`` runs
        nnlib's CPU kernel (``nnlib.layers._native``: each (batch, head) pair
        forward and backward in cache, as PyTorch's CPU flash attention;
        float32 only, no weights or dropout; every derivative, forward mode
        included). Alone it is faster than the explicit path (the GPT
        benchmark's attention, forward + backward: 6.2 -> 2.9 ms; MiniLM's
        forward: 12.0 -> 5.5 ms, 2-core Xeon), but inside MiniLM's inference
        it is not (~300 ms either way): XLA must then write q, k and v out
        for the call instead of fusing their bias and head split into its
        own products. (The GPT reads them natively from its fused qkv
        projection, ``GPTConfig.native_attention``.) ``"auto"`` picks ``"jax"``
        whenever it can on accelerators and ``"explicit"`` on CPU, where XLA
        compiles JAX's formulation with a transposing copy of the weights
        (MiniLM inference 714 -> 686 ms). float64 inputs take the explicit
        path under ``"auto"`` because JAX's softmax there runs in float32.

    Returns:
      ``outputs: [batch, q_len, heads, v_head_dim]``, or ``(outputs, weights)``
      with ``weights: [batch, heads, q_len, kv_len]`` when ``return_weights``.
    """
    _check_qkv(query, key, value)
    batch, q_len, heads, _ = query.shape
    mask = _check_attention_mask(
        "dot_product_attention", mask, (batch, heads, q_len, key.shape[1])
    )
    use_dropout = not deterministic and dropout_rate > 0.0
    if use_dropout and dropout_rng is None:
        raise ValueError(
            "dot_product_attention with dropout_rate > 0 and deterministic=False "
            "needs dropout_rng"
        )
    if implementation not in ("auto", "native", "jax", "explicit"):
        raise ValueError(
            f"dot_product_attention implementation must be 'auto', 'native', 'jax' "
            f"or 'explicit', got {implementation!r}"
        )
    if implementation in ("jax", "native") and (use_dropout or return_weights):
        raise ValueError(
            f"dot_product_attention implementation={implementation!r} cannot return "
            f"weights or apply attention dropout; use 'explicit' or 'auto'"
        )
    float32 = all(x.dtype == jnp.float32 for x in (query, key, value))
    if implementation == "native":
        if not float32:
            raise ValueError(
                "dot_product_attention implementation='native' takes float32 query, key "
                f"and value, got {query.dtype}, {key.dtype}, {value.dtype}"
            )
        if not native_available():
            raise RuntimeError(
                "dot_product_attention implementation='native': nnlib's native kernels "
                f"are not available ({native_reason()})"
            )
        return native_attention(query, key, value, mask)
    use_jax = implementation == "jax" or (
        implementation == "auto"
        and not (use_dropout or return_weights)
        and np.dtype(query.dtype).itemsize <= 4
        and jax.default_backend() != "cpu"
    )
    if use_jax:
        return _jax_attention(query, key, value, mask)

    if return_weights:
        weights = dot_product_attention_weights(query, key, mask)  # [B, H, q, kv]
        attended = dropout(dropout_rng, weights, dropout_rate) if use_dropout else weights
        out_dtype = jnp.result_type(query.dtype, value.dtype)
        return _weighted_values(attended, value, out_dtype), weights
    return _deferred_softmax_attention(
        query, key, value, mask, dropout_rng if use_dropout else None, dropout_rate
    )


def _weighted_values(
    weights: Array, value: Array, out_dtype: Any, denominator: Array | None = None
) -> Array:
    """``weights @ value`` per head, divided per row by ``denominator`` if given.

    ``weights: [B, H, q, kv]``, ``value: [B, kv, H, d]``; returns ``[B, q, H, d]``
    in ``out_dtype``. With a denominator the product accumulates in its dtype
    (at least float32) and is divided before the cast.
    """
    preferred = None if denominator is None else denominator.dtype
    # Heads-major product, then one transpose of the (small) result: written
    # straight to [B, q, H, d], XLA:CPU transposed every weight matrix instead.
    outputs = jnp.einsum(
        "bhqk,bhkd->bhqd", weights.astype(value.dtype), jnp.swapaxes(value, 1, 2),
        preferred_element_type=preferred,
    )
    if denominator is not None:
        outputs = outputs / denominator[..., None]
    return jnp.swapaxes(outputs, 1, 2).astype(out_dtype)  # [B, q, H, d]


def _deferred_softmax_attention(
    query: Array, key: Array, value: Array, mask: Array | None,
    dropout_rng: Array | None, dropout_rate: float,
) -> Array:
    """``softmax(logits) @ v`` with the softmax's division moved after the product.

    ``exp(logits - max)`` is multiplied by the values first and the ``[B, H,
    q, d]`` result divided by each row's sum, as flash attention does: the same
    mathematics without writing (and re-reading) the normalised ``[B, H, q,
    kv]`` weights. On CPU that halves the attention's time (MiniLM's ``[32,
    12, 128, 32]`` attention: 20.7 -> 10.1 ms). The maximum is a constant to
    differentiation (the softmax does not depend on it), so the backward pass
    does not trace through it. Dropout, elementwise and linear, commutes with
    the division: the kept unnormalised weights are scaled as before.
    """
    logits = _attention_logits(query, key, mask)  # [B, H, q, kv]
    shift = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    unnormalised = jnp.exp(logits - shift)
    denominator = unnormalised.sum(axis=-1)  # [B, H, q], >= 1
    if dropout_rng is not None:
        unnormalised = dropout(dropout_rng, unnormalised, dropout_rate)
    out_dtype = jnp.result_type(query.dtype, value.dtype)
    outputs = _weighted_values(unnormalised, value, out_dtype, denominator)  # [B, q, H, d]
    if mask is not None:
        # A row with every key masked would otherwise average all the values.
        outputs = jnp.where(_query_sees_a_key(mask), outputs, jnp.zeros((), outputs.dtype))
    return outputs


def _query_sees_a_key(mask: Array) -> Array:
    """``[B|1, q|1, H|1, 1]``: whether each query may attend to any key, laid out
    like the ``[B, q, H, d]`` outputs (``mask``: rank 4, ``[B|1, H|1, q|1, kv]``)."""
    return jnp.swapaxes(mask.any(axis=-1), 1, 2)[..., None]


def _jax_attention(query: Array, key: Array, value: Array, mask: Array | None) -> Array:
    """``jax.nn.dot_product_attention`` with this module's fully-masked rule."""
    if mask is None:
        return jax.nn.dot_product_attention(query, key, value)
    batch, q_len, heads, _ = query.shape
    # JAX wants a rank-4 boolean mask whose batch/heads axes are full or 1.
    mask = jnp.broadcast_to(
        mask, (batch, mask.shape[1], q_len, key.shape[1])
    )  # [B, 1 or H, q, kv]
    outputs = jax.nn.dot_product_attention(query, key, value, mask=mask)
    # JAX averages all values for a fully masked row; we return zeros instead.
    return jnp.where(_query_sees_a_key(mask), outputs, jnp.zeros((), outputs.dtype))


# --------------------------------------------------------------------------- #
# The layer.
# --------------------------------------------------------------------------- #


class MultiHeadAttention(nn.Module):
    """Multi-head attention with learned query/key/value/output projections.

    Self-attention when ``inputs_kv`` is ``None``, cross-attention otherwise.

    Shapes (glossary): B batch, Q q_len, K kv_len, F features of ``inputs_q``,
    Fkv features of ``inputs_kv``, H heads, D = qkv_features / H head_dim.

    Attributes:
      num_heads: number of heads H; must divide ``qkv_features``.
      qkv_features: total size of the query/key/value projections (H * D);
        defaults to the features of ``inputs_q``.
      out_features: size of the output; defaults to the features of
        ``inputs_q``.
      dropout_rate: dropout on the attention weights, active with
        ``train=True`` (needs ``rngs={"dropout": key}``).
      use_bias: biases in the four projections.
      kernel_init, bias_init: initializers of the projections.
      dtype: computation dtype (``None`` keeps the inputs' dtype).
      param_dtype: storage dtype of the parameters.

    Parameters: ``query``, ``key``, ``value`` (each a ``Dense`` with
    ``kernel: [F or Fkv, H*D]``) and ``out`` (``kernel: [H*D, out_features]``).
    Heads are contiguous column blocks of those kernels, as in PyTorch's
    ``nn.MultiheadAttention``.
    """

    num_heads: int
    qkv_features: int | None = None
    out_features: int | None = None
    dropout_rate: float = 0.0
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        inputs_q: Float[Array, "batch q_len features"],
        inputs_kv: Float[Array, "batch kv_len kv_features"] | None = None,
        *,
        mask: Bool[Array, "#batch #heads #q_len #kv_len"] | None = None,
        causal: bool = False,
        key_padding_mask: Bool[Array, "batch kv_len"] | None = None,
        return_weights: bool = False,
        train: bool = False,
    ) -> (
        Float[Array, "batch q_len out_features"]
        | tuple[Float[Array, "batch q_len out_features"], Float[Array, "batch heads q_len kv_len"]]
    ):
        """Attends from ``inputs_q`` to ``inputs_kv`` (or to itself).

        Args:
          inputs_q: ``[batch, q_len, features]``.
          inputs_kv: ``[batch, kv_len, kv_features]``, or ``None`` for
            self-attention.
          mask: boolean, broadcastable to ``[batch, heads, q_len, kv_len]``,
            True = may attend.
          causal: also forbid attending to later positions (``causal_mask``).
          key_padding_mask: ``[batch, kv_len]``, True = real token, False =
            padding (never attended to).
          return_weights: also return the attention weights (before dropout).
          train: enable attention dropout.

        Returns:
          ``outputs: [batch, q_len, out_features]``, or ``(outputs, weights)``
          with ``weights: [batch, heads, q_len, kv_len]`` when
          ``return_weights``. All masks are combined with a logical and.
        """
        name = "MultiHeadAttention"
        known_q = param_shape(self.variables, "params", "query", "kernel")
        known_kv = param_shape(self.variables, "params", "key", "kernel")
        check_input(
            name, inputs_q, layout="[batch, q_len, features]", ndim=3,
            features=known_q[0] if known_q else None, name="inputs_q",
        )
        if inputs_kv is None:
            if known_kv and known_q and known_kv[0] != known_q[0]:
                raise ShapeError(
                    f"{name} was built for cross-attention with kv_features="
                    f"{known_kv[0]}; pass inputs_kv of shape [batch, kv_len, "
                    f"{known_kv[0]}]"
                )
            inputs_kv = inputs_q
        else:
            check_input(
                name, inputs_kv, layout="[batch, kv_len, kv_features]", ndim=3,
                features=known_kv[0] if known_kv else None, name="inputs_kv",
            )
            if inputs_kv.shape[0] != inputs_q.shape[0]:
                raise ShapeError(
                    f"{name} expected inputs_kv of shape [batch, kv_len, "
                    f"kv_features] with batch={inputs_q.shape[0]} as in inputs_q, "
                    f"got shape {tuple(inputs_kv.shape)}"
                )
        batch, q_len, features = inputs_q.shape
        kv_len = inputs_kv.shape[1]
        heads = self.num_heads
        qkv_features = self.qkv_features or features
        if heads < 1 or qkv_features % heads:
            raise ValueError(
                f"{name} needs num_heads to divide qkv_features, got "
                f"qkv_features={qkv_features}, num_heads={heads}"
            )
        head_dim = qkv_features // heads
        mask = _check_attention_mask(name, mask, (batch, heads, q_len, kv_len))
        if key_padding_mask is not None:
            check_mask(
                name, key_padding_mask, (batch, kv_len), layout="[batch, kv_len]",
                name="key_padding_mask",
            )
            key_padding_mask = _as_bool(name, key_padding_mask, "key_padding_mask")

        def dense(size: int, label: str) -> Dense:
            return Dense(
                size, use_bias=self.use_bias, kernel_init=self.kernel_init,
                bias_init=self.bias_init, dtype=self.dtype,
                param_dtype=self.param_dtype, name=label,
            )

        query = dense(qkv_features, "query")(inputs_q).reshape(batch, q_len, heads, head_dim)
        key = dense(qkv_features, "key")(inputs_kv).reshape(batch, kv_len, heads, head_dim)
        value = dense(qkv_features, "value")(inputs_kv).reshape(batch, kv_len, heads, head_dim)
        # [B, Q, H, D], [B, K, H, D], [B, K, H, D]
        # A KV cache for autoregressive decoding goes here: append key/value to
        # the cached ones (a "cache" collection); the masks below are built from
        # key.shape[1], and causal_mask already aligns queries to the end.

        full_mask = combine_masks(
            mask,
            causal_mask(q_len, key.shape[1]) if causal else None,
            padding_mask(None, key_padding_mask) if key_padding_mask is not None else None,
        )  # broadcastable to [B, H, Q, K]
        use_dropout = train and self.dropout_rate > 0.0
        if use_dropout and not self.has_rng("dropout"):
            raise ValueError(
                f"{name} with dropout_rate={self.dropout_rate} and train=True needs "
                f"a PRNG key: pass rngs={{'dropout': key}} to apply"
            )
        result = dot_product_attention(
            query, key, value, full_mask,
            dropout_rate=self.dropout_rate,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            deterministic=not use_dropout,
            return_weights=return_weights,
        )
        attended, weights = result if return_weights else (result, None)
        attended = attended.reshape(batch, q_len, qkv_features)  # [B, Q, H*D]
        outputs = dense(self.out_features or features, "out")(attended)  # [B, Q, F_out]
        return (outputs, weights) if return_weights else outputs
