"""Transformer models: an encoder classifier and an encoder-decoder for seq2seq.

Both are built from the pre-LN stacks of ``nnlib.layers.transformer``
(``TransformerEncoder``, ``TransformerDecoder``, each ending in a LayerNorm).

``TransformerClassifier`` is BERT/ViT-shaped: embed each position (token ids
through an embedding table, or float features through a ``Dense``, e.g. image
rows or patches), add learned positions, optionally prepend a learned
``[CLS]`` vector, encode bidirectionally, pool (``[CLS]`` or a mean over the
real positions) and classify.

``Seq2SeqTransformer`` is the original encoder-decoder (Vaswani et al. 2017)
with pre-LN blocks, as flax's WMT example builds it: one token embedding
shared by source, target and the output projection (logits are
``decoded @ embedding^T / sqrt(embed_dim)``), sinusoidal positions, teacher
forcing in ``__call__`` and ``greedy_decode`` for generation.

Masks. ``key_padding_mask: [batch, time]`` is ``True`` on real tokens; padded
positions are never attended to and never pooled, so outputs at real positions
do not depend on what the padding holds. In ``Seq2SeqTransformer`` source
padding is read from the ids: every ``source == pad_id`` is masked. The
target needs no padding mask: the decoder is causal, so right-padding of
``target_in`` cannot reach earlier positions (mask the loss there instead).

Shapes: B batch, T (target) time, S source length, F input features, D
embed_dim, V vocabulary, C classes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from nnlib.layers import (
    Dense,
    Dropout,
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    TransformerDecoder,
    TransformerEncoder,
)
from nnlib.layers._checks import ShapeError, check_input, check_mask, param_shape


def _check_tokens(
    model: str, tokens: Any, vocab_size: int, max_len: int, *, name: str = "tokens"
) -> None:
    """Integer ``[batch, time]`` ids, ``time <= max_len``, ids in ``[0, vocab_size)``."""
    layout = "[batch, time]"
    check_input(model, tokens, layout=layout, ndim=2, floating=False, name=name)
    if not jnp.issubdtype(np.dtype(tokens.dtype), jnp.integer):
        raise TypeError(
            f"{model} expected integer token ids {name} of shape {layout}, got dtype "
            f"{tokens.dtype} with shape {tuple(tokens.shape)}"
        )
    _check_length(model, tokens.shape[1], max_len, name)
    # Out-of-range ids would be clamped silently by the embedding gather; the
    # values are only known outside jit, so check them when we can.
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        values = np.asarray(tokens)  # on the host: no device ops, works while tracing
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{model} got {name} ids in [{low}, {high}], outside "
                f"[0, vocab_size={vocab_size})"
            )


def _check_length(model: str, length: int, max_len: int, name: str) -> None:
    if length > max_len:
        raise ShapeError(
            f"{model} was built for sequences of at most max_len={max_len} positions, "
            f"got {name} of length {length}"
        )


def _check_options(model: str, pooling: str | None = None, **sizes: int) -> None:
    for key, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{model} expected a positive integer {key}, got {value!r}")
    if pooling is not None and pooling not in ("cls", "mean"):
        raise ValueError(f"{model} got pooling={pooling!r}; expected 'cls' or 'mean'")


class TransformerClassifier(nn.Module):
    """Transformer encoder over a sequence, pooled, then a linear head.

    Attributes:
      num_layers: encoder blocks.
      num_heads: attention heads (must divide ``embed_dim``).
      embed_dim: D, width of the residual stream.
      mlp_dim: hidden width of each block's MLP.
      num_classes: C, number of logits.
      max_len: longest input sequence (positions with a learned embedding).
      dropout_rate: dropout on the embeddings and the residual branches
        (``train=True``).
      pooling: ``"cls"`` (a learned vector prepended to the sequence; its
        final state is classified, BERT/ViT) or ``"mean"`` (mean over the real
        positions).
      vocab_size: ``None`` for float inputs ``[batch, time, features]``
        (projected by ``input_projection``); an integer V for token ids
        ``[batch, time]`` (looked up in ``token_embedding``).
      pad_id: with ``vocab_size``, tokens equal to ``pad_id`` are treated as
        padding (anded with any ``key_padding_mask``); ``None`` turns this off.

    Parameters: ``input_projection`` (``kernel: [F, D]``) or
    ``token_embedding/embedding [V, D]``; ``position_embedding/embedding
    [max_len, D]``; ``cls_token [D]`` (``"cls"`` pooling); ``encoder``;
    ``head`` (``kernel: [D, C]``).

    Shapes: ``inputs: [batch, time, features]`` float or ``[batch, time]``
    int, ``key_padding_mask: [batch, time]`` -> ``logits: [batch, num_classes]``.
    """

    num_layers: int
    num_heads: int
    embed_dim: int
    mlp_dim: int
    num_classes: int
    max_len: int
    dropout_rate: float = 0.0
    pooling: str = "cls"
    vocab_size: int | None = None
    pad_id: int | None = None

    @nn.compact
    def __call__(
        self,
        inputs: Float[Array, "batch time features"] | Int[Array, "batch time"],
        *,
        key_padding_mask: Bool[Array, "batch time"] | None = None,
        train: bool = False,
    ) -> Float[Array, "batch num_classes"]:
        """Classifies each sequence.

        Args:
          inputs: float ``[batch, time, features]`` (``vocab_size=None``) or
            integer ids ``[batch, time]`` (``vocab_size`` set).
          key_padding_mask: optional ``[batch, time]``, ``True`` on real
            positions.
          train: enable dropout (needs ``rngs={"dropout": key}``).

        Returns:
          ``logits: [batch, num_classes]``.
        """
        name = "TransformerClassifier"
        _check_options(
            name, self.pooling, num_layers=self.num_layers, num_heads=self.num_heads,
            embed_dim=self.embed_dim, mlp_dim=self.mlp_dim,
            num_classes=self.num_classes, max_len=self.max_len,
        )
        init = nn.initializers.normal(stddev=0.02)  # BERT/GPT-2 embedding scale
        if self.vocab_size is None:
            known = param_shape(self.variables, "params", "input_projection", "kernel")
            if getattr(inputs, "ndim", None) == 2 and jnp.issubdtype(
                np.dtype(inputs.dtype), jnp.integer
            ):
                raise TypeError(
                    f"{name} got integer inputs of shape {tuple(inputs.shape)} but was "
                    f"built for float features [batch, time, features]; set vocab_size "
                    f"to embed token ids"
                )
            check_input(
                name, inputs, layout="[batch, time, features]", ndim=3,
                features=known[0] if known else None,
            )
            _check_length(name, inputs.shape[1], self.max_len, "inputs")
            x = Dense(self.embed_dim, name="input_projection")(inputs)  # [B, T, D]
        else:
            _check_tokens(name, inputs, self.vocab_size, self.max_len, name="inputs")
            x = nn.Embed(
                self.vocab_size, self.embed_dim, embedding_init=init, name="token_embedding"
            )(inputs)  # [B, T, D]
            if self.pad_id is not None:
                valid = inputs != self.pad_id
                check_mask(name, key_padding_mask, valid.shape, layout="[batch, time]",
                           name="key_padding_mask")
                key_padding_mask = valid if key_padding_mask is None else (
                    valid & key_padding_mask.astype(bool))
        batch, time = x.shape[:2]
        check_mask(name, key_padding_mask, (batch, time), layout="[batch, time]",
                   name="key_padding_mask")
        mask = None if key_padding_mask is None else key_padding_mask.astype(bool)

        x = LearnedPositionalEmbedding(self.max_len, name="position_embedding")(x)
        if self.pooling == "cls":
            # The [CLS] vector carries no position: it is learned as a whole.
            cls = self.param("cls_token", init, (self.embed_dim,), jnp.float32)
            cls = jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.embed_dim))
            x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + T, D]
            if mask is not None:
                mask = jnp.concatenate([jnp.ones((batch, 1), bool), mask], axis=1)
        x = Dropout(self.dropout_rate)(x, train=train)
        x = TransformerEncoder(
            num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate, name="encoder",
        )(x, key_padding_mask=mask, train=train)  # [B, (1 +) T, D]

        if self.pooling == "cls":
            pooled = x[:, 0]  # [B, D]
        elif mask is None:
            pooled = jnp.mean(x, axis=1)
        else:
            weights = mask.astype(x.dtype)[..., None]  # [B, T, 1]
            count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)  # [B, 1]
            pooled = jnp.sum(x * weights, axis=1) / count  # [B, D]
        return Dense(self.num_classes, name="head")(pooled)  # [B, C]


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer with a shared embedding and tied output layer.

    Attributes:
      vocab_size: V, shared by source and target (ids in ``[0, V)``).
      num_layers: blocks in the encoder and in the decoder (each).
      num_heads: attention heads (must divide ``embed_dim``).
      embed_dim: D, width of the residual streams.
      mlp_dim: hidden width of each block's MLP.
      max_len: longest source and target sequence.
      dropout_rate: dropout on the embeddings and the residual branches.
      pad_id: source positions holding this id are padding (never attended
        to); ``greedy_decode`` also fills finished sequences with it.

    Parameters: ``embedding/embedding [V, D]`` (normal, stddev 1: flax WMT),
    ``encoder`` (``TransformerEncoder``), ``decoder`` (``TransformerDecoder``
    with cross-attention). No separate output kernel: it is the embedding.

    ``__call__(inputs, *, train=False)`` takes ``inputs = {"source": [B, S]
    int, "target_in": [B, T] int}`` (the target shifted right, starting with a
    BOS id) and returns ``logits: [B, T, V]`` for the next target token at
    every position (teacher forcing). ``encode`` and ``decode`` are the two
    halves, for use with ``apply(..., method=...)``.
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    embed_dim: int
    mlp_dim: int
    max_len: int
    dropout_rate: float = 0.0
    pad_id: int = 0

    def setup(self) -> None:
        _check_options(
            "Seq2SeqTransformer", vocab_size=self.vocab_size, num_layers=self.num_layers,
            num_heads=self.num_heads, embed_dim=self.embed_dim, mlp_dim=self.mlp_dim,
            max_len=self.max_len,
        )
        self.embedding = nn.Embed(
            self.vocab_size, self.embed_dim,
            embedding_init=nn.initializers.normal(stddev=1.0),
        )
        self.positions = SinusoidalPositionalEncoding(self.max_len)
        self.dropout = Dropout(self.dropout_rate)
        stack = dict(num_layers=self.num_layers, num_heads=self.num_heads,
                     mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate)
        self.encoder = TransformerEncoder(**stack)
        self.decoder = TransformerDecoder(**stack)

    def _embed(self, tokens: Array, train: bool) -> Array:
        x = self.positions(self.embedding(tokens))  # [B, L, D]
        return self.dropout(x, train=train)

    def _encode(self, source: Array, train: bool) -> tuple[Array, Array]:
        valid = source != self.pad_id  # [B, S]
        encoded = self.encoder(self._embed(source, train), key_padding_mask=valid,
                               train=train)  # [B, S, D]
        return encoded, valid

    def _decode(
        self, encoded: Array, source_valid: Array, target_in: Array, train: bool
    ) -> Array:
        x = self._embed(target_in, train)  # [B, T, D]
        y = self.decoder(x, encoded, encoder_padding_mask=source_valid, train=train)
        # Tied output layer; dividing by sqrt(D) keeps the initial logits O(1)
        # with a stddev-1 embedding and a LayerNorm-ed decoder output.
        return self.embedding.attend(y) / math.sqrt(self.embed_dim)  # [B, T, V]

    def encode(
        self, source: Int[Array, "batch src_len"], *, train: bool = False
    ) -> tuple[Float[Array, "batch src_len dim"], Bool[Array, "batch src_len"]]:
        """``source: [B, S]`` ids -> ``(encoded [B, S, D], source_valid [B, S])``."""
        _check_tokens("Seq2SeqTransformer.encode", source, self.vocab_size, self.max_len,
                      name="source")
        return self._encode(source, train)

    def decode(
        self,
        encoded: Float[Array, "batch src_len dim"],
        source_valid: Bool[Array, "batch src_len"],
        target_in: Int[Array, "batch time"],
        *,
        train: bool = False,
    ) -> Float[Array, "batch time vocab"]:
        """Next-token logits ``[B, T, V]`` for ``target_in: [B, T]``, attending
        causally to the target and to the valid positions of ``encoded``
        (``encoded``/``source_valid`` as ``encode`` returns them)."""
        _check_tokens("Seq2SeqTransformer.decode", target_in, self.vocab_size,
                      self.max_len, name="target_in")
        return self._decode(encoded, source_valid, target_in, train)

    def __call__(
        self, inputs: Mapping[str, Int[Array, "batch length"]], *, train: bool = False
    ) -> Float[Array, "batch time vocab"]:
        """Teacher-forced logits.

        Args:
          inputs: ``{"source": [batch, src_len], "target_in": [batch, time]}``
            integer ids; ``target_in`` is the target shifted right by one
            (BOS first).
          train: enable dropout (needs ``rngs={"dropout": key}``).

        Returns:
          ``logits: [batch, time, vocab_size]``; position ``t`` predicts the
          target token after ``target_in[:, :t+1]``.
        """
        name = "Seq2SeqTransformer"
        if not isinstance(inputs, Mapping) or not {"source", "target_in"} <= set(inputs):
            got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise TypeError(
                f"{name} expected inputs as a dict {{'source': [batch, src_len], "
                f"'target_in': [batch, time]}} of integer ids, got {got}"
            )
        source, target_in = inputs["source"], inputs["target_in"]
        _check_tokens(name, source, self.vocab_size, self.max_len, name="source")
        _check_tokens(name, target_in, self.vocab_size, self.max_len, name="target_in")
        if source.shape[0] != target_in.shape[0]:
            raise ShapeError(
                f"{name} expected source [batch, src_len] and target_in [batch, time] "
                f"with the same batch, got shapes {tuple(source.shape)} and "
                f"{tuple(target_in.shape)}"
            )
        encoded, valid = self._encode(source, train)
        return self._decode(encoded, valid, target_in, train)

    @nn.nowrap
    def greedy_decode(
        self,
        params: Any,
        source: Int[Array, "batch src_len"],
        max_len: int,
        bos_id: int,
        eos_id: int | None,
    ) -> Int[Array, "batch max_len"]:
        """Generates targets by picking the most likely token at each step.

        Runs under ``jax.jit`` with static shapes: the source is encoded once,
        then a ``lax.fori_loop`` runs the decoder ``max_len`` times over a
        fixed ``[batch, max_len]`` buffer (BOS, the tokens so far, then
        ``pad_id``; causality makes the trailing filler harmless). No KV
        cache: each step recomputes the whole prefix, ``O(max_len^2)``, fine
        for evaluating short sequences.

        Args:
          params: the model's ``"params"`` collection (or ``{"params": ...}``).
          source: ``[batch, src_len]`` ids, padded with ``pad_id``.
          max_len: tokens to generate (at most the model's ``max_len``).
          bos_id: the id that starts every target.
          eos_id: the end id; after a sequence emits it, the rest of its row
            is ``pad_id``. ``None`` never stops early.

        Returns:
          ``tokens: [batch, max_len]`` int32, BOS not included, EOS included.
        """
        name = "Seq2SeqTransformer.greedy_decode"
        if not isinstance(max_len, int) or not 1 <= max_len <= self.max_len:
            raise ValueError(
                f"{name} expected max_len in [1, {self.max_len}] (the model's max_len), "
                f"got {max_len!r}"
            )
        _check_tokens(name, source, self.vocab_size, self.max_len, name="source")
        if isinstance(params, Mapping) and set(params) == {"params"}:
            params = params["params"]
        return _greedy_decode(self, params, source, max_len, bos_id, eos_id)


@functools.partial(jax.jit, static_argnames=("model", "max_len", "bos_id", "eos_id"))
def _greedy_decode(
    model: Seq2SeqTransformer,
    params: Any,
    source: Array,
    max_len: int,
    bos_id: int,
    eos_id: int | None,
) -> Array:
    variables = {"params": params}
    encoded, valid = model.apply(variables, source, method=model.encode)  # [B, S, D]
    batch = source.shape[0]
    pad = jnp.int32(model.pad_id)
    # Column 0 is BOS; step t reads columns [0, max_len) and writes column t + 1.
    tokens = jnp.full((batch, max_len + 1), pad).at[:, 0].set(bos_id)
    done = jnp.zeros((batch,), bool)

    def step(t: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        tokens, done = carry
        logits = model.apply(
            variables, encoded, valid, tokens[:, :-1], method=model.decode
        )  # [B, max_len, V]
        next_token = jnp.argmax(logits[:, t], axis=-1).astype(jnp.int32)  # [B]
        next_token = jnp.where(done, pad, next_token)
        if eos_id is not None:
            done = done | (next_token == eos_id)
        return tokens.at[:, t + 1].set(next_token), done

    tokens, _ = jax.lax.fori_loop(0, max_len, step, (tokens, done))
    return tokens[:, 1:]  # [B, max_len]
