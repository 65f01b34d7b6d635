"""Transformer blocks and positional encodings (Vaswani et al. 2017).

Blocks are **pre-LN** (Xiong et al. 2020; GPT-2, ViT): each sub-layer reads a
normalized copy of the residual stream and adds its result back,

    x = x + Dropout(MultiHeadAttention(LayerNorm(x)))
    x = x + Dropout(MLP(LayerNorm(x)))

so the stream itself is never normalized until the stack's final LayerNorm.
Pre-LN trains without the learning-rate warm-up that post-LN needs. Dropout
sits on the residual branches only (GPT-2/nanoGPT); attention dropout, on the
attention weights, is separate and off by default.

Attention has no notion of order, so a model adds position information to the
token embeddings before the first block: ``SinusoidalPositionalEncoding``
(fixed) or ``LearnedPositionalEmbedding`` (BERT/GPT). Embedding dropout and the
output head belong to the model (``nnlib.models``), not to these stacks.

Masks follow ``nnlib.layers.attention``: boolean, True = may attend;
``*_padding_mask`` arguments are ``[batch, length]`` with True = real token.

Shapes: ``x: [batch, time, features]``; ``encoded: [batch, src_len,
src_features]``; attention weights ``[batch, heads, q_len, kv_len]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from nnlib.layers._checks import ShapeError, check_input, check_mask, param_shape
from nnlib.layers.attention import MultiHeadAttention
from nnlib.layers.dense import MLP
from nnlib.layers.normalization import Dropout, LayerNorm

Activation = str | Callable[[Array], Array]
Stream = Float[Array, "batch time features"]
AttentionWeights = Float[Array, "batch heads q_len kv_len"]


# --------------------------------------------------------------------------- #
# Positional encodings.
# --------------------------------------------------------------------------- #


def sinusoidal_positions(length: int, features: int) -> Float[Array, "length features"]:
    """The fixed encodings of Vaswani et al. (2017), section 3.5.

    ``PE[pos, 2i] = sin(pos / 10000^(2i / features))`` and
    ``PE[pos, 2i+1] = cos(pos / 10000^(2i / features))``: each pair of
    features is a rotation at its own wavelength, so a fixed offset between
    positions is a linear map of the encodings. An odd ``features`` ends on a
    sine column.

    Returns:
      ``[length, features]`` float32.
    """
    if length < 0 or features < 1:
        raise ValueError(
            f"sinusoidal_positions needs length >= 0 and features >= 1, got "
            f"length={length}, features={features}"
        )
    # float64 in numpy: positions up to ~1e5 times 1/10000^x lose digits in f32.
    pos = np.arange(length, dtype=np.float64)[:, None]  # [T, 1]
    two_i = np.arange(0, features, 2, dtype=np.float64)  # [ceil(F/2)]
    angles = pos / np.power(10000.0, two_i / features)  # [T, ceil(F/2)]
    table = np.zeros((length, features), dtype=np.float64)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles[:, : features // 2])
    return jnp.asarray(table, dtype=jnp.float32)


def _positions_or_range(
    layer: str, x: Array, positions: Array | None, max_len: int
) -> Array:
    """Integer positions ``[time]`` or ``[batch, time]``, checked against max_len."""
    time = x.shape[1]
    if positions is None:
        if time > max_len:
            raise ShapeError(
                f"{layer} got a sequence of length {time} in inputs of shape "
                f"{tuple(x.shape)} [batch, time, features], longer than "
                f"max_len={max_len}"
            )
        return jnp.arange(time)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(
            f"{layer} expected integer positions, got dtype {positions.dtype}"
        )
    if positions.shape not in ((time,), (x.shape[0], time)):
        raise ShapeError(
            f"{layer} expected positions of shape [time] = ({time},) or "
            f"[batch, time] = ({x.shape[0]}, {time}), got shape "
            f"{tuple(positions.shape)}"
        )
    # Only concrete positions can be checked; under jit out-of-range indices
    # would be clamped silently by the gather, so check before jitting.
    # numpy, not jnp: a concrete array captured inside a jit trace would turn
    # into a tracer under jnp.max.
    if not isinstance(positions, jax.core.Tracer) and positions.size:
        concrete = np.asarray(positions)
        top = int(concrete.max())
        if top >= max_len or int(concrete.min()) < 0:
            raise ShapeError(
                f"{layer} got positions up to {top}, outside [0, max_len={max_len})"
            )
    return positions


class SinusoidalPositionalEncoding(nn.Module):
    """Adds ``sinusoidal_positions`` to the inputs (no parameters).

    Attributes:
      max_len: longest sequence (largest position + 1) accepted.

    ``__call__(x, *, positions=None)``: ``x: [batch, time, features] -> same``.
    ``positions: [time]`` or ``[batch, time]`` integers select the encodings
    (default ``0..time-1``; for decoding step by step pass
    ``offset + jnp.arange(time)``).
    """

    max_len: int

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "batch time features"],
        *,
        positions: Int[Array, "*batch time"] | None = None,
    ) -> Float[Array, "batch time features"]:
        name = "SinusoidalPositionalEncoding"
        check_input(name, x, layout="[batch, time, features]", ndim=3)
        positions = _positions_or_range(name, x, positions, self.max_len)
        table = sinusoidal_positions(self.max_len, x.shape[-1]).astype(x.dtype)
        return x + jnp.take(table, positions, axis=0)  # [(B,) T, F] broadcasts


class LearnedPositionalEmbedding(nn.Module):
    """Adds a learned vector per position (BERT, GPT-2).

    Attributes:
      max_len: number of positions with an embedding.
      embedding_init: initializer of ``embedding: [max_len, features]``
        (default normal with stddev 0.02, as GPT-2 and BERT).

    ``__call__(x, *, positions=None)``: ``x: [batch, time, features] -> same``;
    ``positions`` as in ``SinusoidalPositionalEncoding``.
    """

    max_len: int
    embedding_init: Callable[..., Array] = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "batch time features"],
        *,
        positions: Int[Array, "*batch time"] | None = None,
    ) -> Float[Array, "batch time features"]:
        name = "LearnedPositionalEmbedding"
        known = param_shape(self.variables, "params", "embedding")
        check_input(
            name, x, layout="[batch, time, features]", ndim=3,
            features=known[1] if known else None,
        )
        positions = _positions_or_range(name, x, positions, self.max_len)
        table = self.param(
            "embedding", self.embedding_init, (self.max_len, x.shape[-1]), jnp.float32
        )
        return x + jnp.take(table.astype(x.dtype), positions, axis=0)


# --------------------------------------------------------------------------- #
# Blocks.
# --------------------------------------------------------------------------- #


def _check_stream(layer: str, module: nn.Module, x: Any) -> None:
    """x must be [batch, time, features] with the features the block was built for."""
    known = param_shape(module.variables, "params", "attention_norm", "scale")
    check_input(
        layer, x, layout="[batch, time, features]", ndim=3,
        features=known[0] if known else None, name="x",
    )


def _call_with_weights(
    layer: nn.Module, *args: Any, return_weights: bool, **kwargs: Any
) -> tuple[Array, Array | None]:
    """Calls ``layer`` and always returns ``(outputs, weights or None)``;
    weights are only materialised when asked for (the fast path otherwise)."""
    result = layer(*args, return_weights=return_weights, **kwargs)
    return result if return_weights else (result, None)


class TransformerEncoderBlock(nn.Module):
    """Pre-LN encoder block: bidirectional self-attention, then an MLP.

    Attributes:
      num_heads: attention heads (must divide the features).
      mlp_dim: hidden width of the MLP (commonly 4 * features).
      dropout_rate: dropout on both residual branches (``train=True``).
      attention_dropout_rate: dropout on the attention weights.
      activation: MLP nonlinearity, a name or a callable (default ``"gelu"``).

    Parameters: ``attention_norm``, ``attention`` (``MultiHeadAttention``),
    ``mlp_norm``, ``feed_forward`` (an ``MLP``: ``dense_0`` to ``mlp_dim``,
    activation, ``output`` back to the features).
    """

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    activation: Activation = "gelu"

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "batch time features"],
        *,
        mask: Bool[Array, "#batch #heads #time #time"] | None = None,
        key_padding_mask: Bool[Array, "batch time"] | None = None,
        train: bool = False,
        return_weights: bool = False,
    ) -> Stream | tuple[Stream, AttentionWeights]:
        """``x: [batch, time, features] -> same`` (and weights
        ``[batch, heads, time, time]`` when ``return_weights``).

        ``mask`` broadcasts to ``[batch, heads, time, time]``;
        ``key_padding_mask: [batch, time]``, True = real token.
        """
        _check_stream("TransformerEncoderBlock", self, x)
        h = LayerNorm(name="attention_norm")(x)
        h, weights = _call_with_weights(
            MultiHeadAttention(
                self.num_heads, dropout_rate=self.attention_dropout_rate, name="attention"
            ),
            h, mask=mask, key_padding_mask=key_padding_mask, train=train,
            return_weights=return_weights,
        )
        x = x + Dropout(self.dropout_rate)(h, train=train)
        h = LayerNorm(name="mlp_norm")(x)
        h = MLP((self.mlp_dim,), out_features=x.shape[-1], activation=self.activation,
                name="feed_forward")(h)
        x = x + Dropout(self.dropout_rate)(h, train=train)
        return (x, weights) if return_weights else x


class TransformerDecoderBlock(nn.Module):
    """Pre-LN decoder block: causal self-attention, optional cross-attention to
    an encoder's output, then an MLP.

    Without ``encoded`` (at init and at every call) it is a GPT block; with
    it, an encoder-decoder (original Transformer, T5) block. Which one is fixed
    by the parameters: calling a block with cross-attention parameters without
    ``encoded``, or the other way round, is an error.

    Attributes: as ``TransformerEncoderBlock``.

    Parameters: as the encoder block's (``attention`` is the causal
    self-attention), plus ``cross_attention_norm`` and ``cross_attention``
    when built with ``encoded``.
    """

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    activation: Activation = "gelu"

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "batch time features"],
        encoded: Float[Array, "batch src_len src_features"] | None = None,
        *,
        self_padding_mask: Bool[Array, "batch time"] | None = None,
        encoder_padding_mask: Bool[Array, "batch src_len"] | None = None,
        train: bool = False,
        return_weights: bool = False,
    ) -> Stream | tuple[Stream, dict[str, AttentionWeights | None]]:
        """``x: [batch, time, features] -> same``.

        Args:
          x: the target-side stream.
          encoded: encoder output ``[batch, src_len, src_features]`` or None.
          self_padding_mask: ``[batch, time]``, True = real target token.
          encoder_padding_mask: ``[batch, src_len]``, True = real source token.
          train: enable dropout.
          return_weights: also return ``{"self": [batch, heads, time, time],
            "cross": [batch, heads, time, src_len] or None}``.
        """
        name = "TransformerDecoderBlock"
        _check_stream(name, self, x)
        self._check_encoded(name, x, encoded, encoder_padding_mask)

        h = LayerNorm(name="attention_norm")(x)
        h, self_weights = _call_with_weights(
            MultiHeadAttention(
                self.num_heads, dropout_rate=self.attention_dropout_rate, name="attention"
            ),
            h, causal=True, key_padding_mask=self_padding_mask, train=train,
            return_weights=return_weights,
        )
        x = x + Dropout(self.dropout_rate)(h, train=train)

        cross_weights = None
        if encoded is not None:
            h = LayerNorm(name="cross_attention_norm")(x)
            h, cross_weights = _call_with_weights(
                MultiHeadAttention(
                    self.num_heads, dropout_rate=self.attention_dropout_rate,
                    name="cross_attention",
                ),
                h, encoded, key_padding_mask=encoder_padding_mask, train=train,
                return_weights=return_weights,
            )
            x = x + Dropout(self.dropout_rate)(h, train=train)

        h = LayerNorm(name="mlp_norm")(x)
        h = MLP((self.mlp_dim,), out_features=x.shape[-1], activation=self.activation,
                name="feed_forward")(h)
        x = x + Dropout(self.dropout_rate)(h, train=train)
        if return_weights:
            return x, {"self": self_weights, "cross": cross_weights}
        return x

    def _check_encoded(
        self, name: str, x: Array, encoded: Array | None, encoder_padding_mask: Array | None
    ) -> None:
        if encoded is None:
            if encoder_padding_mask is not None:
                raise ValueError(f"{name} got encoder_padding_mask but no encoded")
        else:
            check_input(
                name, encoded, layout="[batch, src_len, src_features]", ndim=3,
                name="encoded",
            )
            if encoded.shape[0] != x.shape[0]:
                raise ShapeError(
                    f"{name} expected encoded of shape [batch, src_len, "
                    f"src_features] with batch={x.shape[0]} as in x, got shape "
                    f"{tuple(encoded.shape)}"
                )
            check_mask(
                name, encoder_padding_mask, encoded.shape[:2],
                layout="[batch, src_len]", name="encoder_padding_mask",
            )
        if self.is_initializing() or "params" not in self.variables:
            return
        has_cross = "cross_attention" in self.variables["params"]
        if has_cross and encoded is None:
            raise ValueError(
                f"{name} was built with cross-attention (initialised with "
                f"encoded) but was called without encoded"
            )
        if encoded is not None and not has_cross:
            raise ValueError(
                f"{name} was built without cross-attention (initialised without "
                f"encoded) but was called with encoded of shape "
                f"{tuple(encoded.shape)}; pass encoded to init too"
            )


# --------------------------------------------------------------------------- #
# Stacks.
# --------------------------------------------------------------------------- #


class TransformerEncoder(nn.Module):
    """``num_layers`` pre-LN encoder blocks and a final LayerNorm (BERT/ViT body).

    Attributes: ``num_layers`` and those of ``TransformerEncoderBlock``.

    ``__call__(x, *, mask=None, key_padding_mask=None, train=False,
    return_weights=False)``: ``x: [batch, time, features] -> same``; with
    ``return_weights`` also a tuple of ``num_layers`` weight arrays
    ``[batch, heads, time, time]``, first layer first (for attention rollout).
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    activation: Activation = "gelu"

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "batch time features"],
        *,
        mask: Bool[Array, "#batch #heads #time #time"] | None = None,
        key_padding_mask: Bool[Array, "batch time"] | None = None,
        train: bool = False,
        return_weights: bool = False,
    ) -> Stream | tuple[Stream, tuple[AttentionWeights, ...]]:
        check_input("TransformerEncoder", x, layout="[batch, time, features]", ndim=3, name="x")
        all_weights = []
        for i in range(self.num_layers):
            block = TransformerEncoderBlock(
                self.num_heads, self.mlp_dim, self.dropout_rate,
                self.attention_dropout_rate, self.activation, name=f"block_{i}",
            )
            x, weights = _call_with_weights(
                block, x, mask=mask, key_padding_mask=key_padding_mask, train=train,
                return_weights=return_weights,
            )
            all_weights.append(weights)
        x = LayerNorm(name="final_norm")(x)
        return (x, tuple(all_weights)) if return_weights else x


class TransformerDecoder(nn.Module):
    """``num_layers`` pre-LN decoder blocks and a final LayerNorm (GPT body, or
    the decoder of an encoder-decoder model when called with ``encoded``).

    Attributes: ``num_layers`` and those of ``TransformerDecoderBlock``.

    ``__call__(x, encoded=None, *, self_padding_mask=None,
    encoder_padding_mask=None, train=False, return_weights=False)``:
    ``x: [batch, time, features] -> same``; with ``return_weights`` also a
    tuple of ``num_layers`` dicts ``{"self": ..., "cross": ...}``.
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    activation: Activation = "gelu"

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "batch time features"],
        encoded: Float[Array, "batch src_len src_features"] | None = None,
        *,
        self_padding_mask: Bool[Array, "batch time"] | None = None,
        encoder_padding_mask: Bool[Array, "batch src_len"] | None = None,
        train: bool = False,
        return_weights: bool = False,
    ) -> Stream | tuple[Stream, tuple[dict[str, AttentionWeights | None], ...]]:
        check_input("TransformerDecoder", x, layout="[batch, time, features]", ndim=3, name="x")
        all_weights = []
        for i in range(self.num_layers):
            block = TransformerDecoderBlock(
                self.num_heads, self.mlp_dim, self.dropout_rate,
                self.attention_dropout_rate, self.activation, name=f"block_{i}",
            )
            x, weights = _call_with_weights(
                block, x, encoded, self_padding_mask=self_padding_mask,
                encoder_padding_mask=encoder_padding_mask, train=train,
                return_weights=return_weights,
            )
            all_weights.append(weights)
        x = LayerNorm(name="final_norm")(x)
        return (x, tuple(all_weights)) if return_weights else x
