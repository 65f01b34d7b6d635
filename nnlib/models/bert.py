"""BERT: a bidirectional, post-LN Transformer encoder (Devlin et al. 2019).

The model, laid out as Hugging Face's ``BertModel`` so that published
checkpoints (``bert-base-uncased``, ``sentence-transformers/all-MiniLM-L6-v2``)
load by renaming alone::

    x = word[input_ids] + position[0..T-1] + token_type[token_type_ids]  # [B, T, H]
    x = Dropout(LayerNorm(x))
    for each layer:                                                      # post-LN
        x = LayerNorm(x + Dropout(SelfAttention(x, padding mask)))
        x = LayerNorm(x + Dropout(output(GELU(intermediate(x)))))        # H -> I -> H
    sequence_output = x                                                  # [B, T, H]
    pooled_output = tanh(pooler(x[:, 0]))                                # [B, H], [CLS]

Post-LN, not pre-LN. The LayerNorm comes *after* each residual sum, as in
the original Transformer and BERT, so nnlib's pre-LN
``TransformerEncoderBlock`` cannot hold these weights; the block here is its
own (``_Layer``), built from nnlib's ``MultiHeadAttention``, ``Dense`` and
``LayerNorm``. GELU is the exact (erf) form, LayerNorm epsilon 1e-12.

Padding. ``attention_mask: [batch, time]`` is 1 (or True) on real tokens and 0
on padding; it defaults to all ones, as in Hugging Face (it is *not* derived
from ``pad_token_id``). Padded keys are never attended to (their attention
weights are exactly 0), so the outputs at real positions do not depend on
what the padding holds or on how much of it there is. Padded *queries* are
still computed (they attend to the real tokens, as Hugging Face does); their
outputs mean nothing, so leave them out of losses and pooling.

Inputs as one dict. ``nnlib.train.make_train_step`` passes only
``batch["inputs"]`` to the model, so every ``__call__`` here also accepts
``input_ids`` as a dict ``{"input_ids": [B, T], "attention_mask": [B, T]
(optional), "token_type_ids": [B, T] (optional)}`` (a tokenizer's output);
the keyword arguments must then be left out.

Parameter names and their Hugging Face names. Each nnlib module maps to one
HF module, and its leaves map by kind: a ``Dense``'s ``kernel`` / ``bias`` are
HF ``nn.Linear``'s ``weight.T`` / ``bias`` (HF stores ``[out, in]``, nnlib
``[in, out]``); a ``LayerNorm``'s ``scale`` / ``bias`` are ``weight`` /
``bias``; an embedding's ``embedding`` is ``weight``. ``{i}`` is the layer::

    nnlib module (Bert params)          Hugging Face module (BertModel state_dict)
    embeddings/word_embeddings          embeddings.word_embeddings
    embeddings/position_embeddings      embeddings.position_embeddings
    embeddings/token_type_embeddings    embeddings.token_type_embeddings
    embeddings/layer_norm               embeddings.LayerNorm
    layer_{i}/attention/query           encoder.layer.{i}.attention.self.query
    layer_{i}/attention/key             encoder.layer.{i}.attention.self.key
    layer_{i}/attention/value           encoder.layer.{i}.attention.self.value
    layer_{i}/attention/out             encoder.layer.{i}.attention.output.dense
    layer_{i}/attention_layer_norm      encoder.layer.{i}.attention.output.LayerNorm
    layer_{i}/intermediate              encoder.layer.{i}.intermediate.dense
    layer_{i}/output                    encoder.layer.{i}.output.dense
    layer_{i}/output_layer_norm         encoder.layer.{i}.output.LayerNorm
    pooler                              pooler.dense

    BertForMaskedLM                     BertForMaskedLM
    bert/... (as above, no pooler)      bert.... (as above; no pooler)
    transform                           cls.predictions.transform.dense
    transform_layer_norm                cls.predictions.transform.LayerNorm
    output_bias  (a [V] array)          cls.predictions.bias (= decoder.bias)
    (none: tied to word_embeddings)     cls.predictions.decoder.weight

    BertForSequenceClassification       BertForSequenceClassification
    bert/... (as above, with pooler)    bert....
    classifier                          classifier

(``embeddings.position_ids`` in some HF checkpoints is a buffer, not a weight.)
Attention heads are contiguous column blocks of the query/key/value kernels in
both libraries, so no reshuffling is needed.

Initialisation follows Hugging Face's ``BertPreTrainedModel``: every kernel and
embedding normal(0, 0.02), biases zero, LayerNorm scale 1 and bias 0, and the
``pad_token_id`` row of the word embeddings zero.

Shapes (glossary): B batch, T time (tokens), H hidden_size, I
intermediate_size, V vocab_size, N num_heads, C classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from nnlib.layers._checks import ShapeError, check_mask
from nnlib.layers.activations import get_activation
from nnlib.layers.attention import MultiHeadAttention
from nnlib.layers.dense import Dense, matmul_last_axis
from nnlib.layers.normalization import Dropout, LayerNorm

_INIT_STDDEV = 0.02  # BERT's initializer_range

Ids = Int[Array, "batch time"]
Inputs = Ids | Mapping[str, Array]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyperparameters of a BERT; frozen, so hashable (a valid static argument
    of ``jax.jit``). Field names follow Hugging Face's ``BertConfig`` where
    they can (``num_layers`` = ``num_hidden_layers``, ``num_heads`` =
    ``num_attention_heads``, ``dropout_rate`` = ``hidden_dropout_prob``).

    Attributes:
      vocab_size: number of token ids V.
      hidden_size: width H of the residual stream.
      num_layers: number of encoder layers.
      num_heads: attention heads N; must divide ``hidden_size``.
      intermediate_size: hidden width I of each feed-forward block.
      max_position_embeddings: number of learned positions (longest input).
      type_vocab_size: number of segment (token type) ids.
      dropout_rate: dropout on the embeddings, both residual branches, and
        before the classifier (``train=True`` only).
      attention_dropout_rate: dropout on the attention weights.
      layer_norm_eps: epsilon of every LayerNorm (BERT: 1e-12).
      activation: feed-forward (and MLM transform) nonlinearity, a name from
        ``nnlib.layers.activations`` or a callable; ``"gelu_exact"`` is the erf
        GELU that Hugging Face's ``"gelu"`` means.
      pad_token_id: row of the word embeddings initialised to zero (``None``:
        none). It does not mask anything: pass ``attention_mask``.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-12
    activation: str | Callable[[Array], Array] = "gelu_exact"
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                      "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig.{field} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig needs num_heads to divide hidden_size, got "
                f"hidden_size={self.hidden_size}, num_heads={self.num_heads}"
            )
        for field in ("dropout_rate", "attention_dropout_rate"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"BertConfig.{field} must be in [0, 1), got {value}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"BertConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"BertConfig.pad_token_id must be in [0, vocab_size={self.vocab_size}) "
                f"or None, got {self.pad_token_id}"
            )
        get_activation(self.activation)  # unknown names fail here, not mid-trace

    @classmethod
    def minilm_l6(cls, **overrides: Any) -> BertConfig:
        """The sizes of ``sentence-transformers/all-MiniLM-L6-v2`` (22,713,216
        parameters with the pooler): V=30522, H=384, 6 layers, 12 heads,
        I=1536, 512 positions, 2 token types. ``overrides`` replace any field,
        e.g. ``dropout_rate=0.0``."""
        sizes = dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                     intermediate_size=1536)
        return cls(**{**sizes, **overrides})

    @property
    def head_dim(self) -> int:
        """Size of each attention head, ``hidden_size // num_heads``."""
        return self.hidden_size // self.num_heads


@struct.dataclass
class BertOutput:
    """What ``Bert`` returns; a pytree, so it passes through ``jit``.

    Attributes:
      sequence_output: ``[batch, time, hidden]``, the last layer's states.
      pooled_output: ``[batch, hidden]``, ``tanh(pooler(sequence_output[:, 0]))``
        (the [CLS] token); ``None`` when built without the pooling layer.
      attention_weights: with ``return_weights``, one ``[batch, heads, time,
        time]`` array per layer, first layer first (before attention
        dropout); else ``None``.
    """

    sequence_output: Float[Array, "batch time hidden"]
    pooled_output: Float[Array, "batch hidden"] | None = None
    attention_weights: tuple[Float[Array, "batch heads time time"], ...] | None = None


# --------------------------------------------------------------------------- #
# Input validation: ids, token types, mask (concrete values checked eagerly).
# --------------------------------------------------------------------------- #

_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _unpack(
    model: str, input_ids: Any, token_type_ids: Any, attention_mask: Any
) -> tuple[Any, Any, Any]:
    """Splits a tokenizer-style dict into its three arrays."""
    if not isinstance(input_ids, Mapping):
        return input_ids, token_type_ids, attention_mask
    if token_type_ids is not None or attention_mask is not None:
        raise ValueError(
            f"{model} got inputs as a dict and also token_type_ids/attention_mask "
            f"as keywords; put them all in the dict"
        )
    unknown = sorted(set(input_ids) - set(_INPUT_KEYS))
    if "input_ids" not in input_ids or unknown:
        raise ValueError(
            f"{model} expected a dict with 'input_ids' and optionally "
            f"'attention_mask', 'token_type_ids'; got keys {sorted(input_ids)}"
        )
    return input_ids["input_ids"], input_ids.get("token_type_ids"), input_ids.get(
        "attention_mask")


def _check_ids(model: str, ids: Any, name: str, limit: int, limit_name: str) -> None:
    """Integer ids in ``[0, limit)``; the values only when they are concrete
    (inside ``jit`` an out-of-range id would be NaN-filled silently)."""
    shape, dtype = tuple(getattr(ids, "shape", ())), getattr(ids, "dtype", None)
    if dtype is None or not jnp.issubdtype(np.dtype(dtype), jnp.integer):
        raise TypeError(
            f"{model} expected integer {name} of shape [batch, time], got dtype "
            f"{dtype} with shape {shape}; cast first, e.g. {name}.astype(jnp.int32)"
        )
    if not isinstance(ids, jax.core.Tracer) and ids.size:
        host = np.asarray(ids)  # numpy: jnp.min of a constant under a trace is a tracer
        low, high = int(host.min()), int(host.max())
        if low < 0 or high >= limit:
            raise ValueError(
                f"{model} got {name} in [{low}, {high}], outside [0, {limit_name}={limit})"
            )


def _prepare(
    model: str, config: BertConfig, input_ids: Any, token_type_ids: Any, attention_mask: Any
) -> tuple[Array, Array, Array | None]:
    """Validated ``(input_ids, token_type_ids, valid)``; ``valid: [B, T]`` bool,
    or ``None`` when no ``attention_mask`` was given (every token is real, and
    the attention then runs without a mask instead of with an all-true one)."""
    input_ids, token_type_ids, attention_mask = _unpack(
        model, input_ids, token_type_ids, attention_mask)
    _check_ids(model, input_ids, "input_ids", config.vocab_size, "vocab_size")
    shape = tuple(input_ids.shape)
    if len(shape) != 2:
        raise ShapeError(
            f"{model} expected input_ids of shape [batch, time] (rank 2), got shape "
            f"{shape} (rank {len(shape)})"
        )
    if shape[1] < 1:
        raise ShapeError(f"{model} expected at least one token per row, got shape {shape}")
    if shape[1] > config.max_position_embeddings:
        raise ShapeError(
            f"{model} got input_ids of shape {shape}: time={shape[1]} is longer than "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
    if token_type_ids is None:
        token_type_ids = jnp.zeros(shape, jnp.int32)
    else:
        check_mask(model, token_type_ids, shape, layout="[batch, time]",
                   name="token_type_ids")
        _check_ids(model, token_type_ids, "token_type_ids", config.type_vocab_size,
                   "type_vocab_size")
    if attention_mask is None:
        return input_ids, token_type_ids, None
    check_mask(model, attention_mask, shape, layout="[batch, time]", name="attention_mask")
    dtype = np.dtype(attention_mask.dtype)
    if dtype != np.bool_ and not np.issubdtype(dtype, np.integer):
        # An additive float mask (0 / -inf) would read as "all real" here.
        raise TypeError(
            f"{model} expected attention_mask of 1 (real token) / 0 (padding) as "
            f"integers or booleans, got dtype {dtype} with shape {tuple(attention_mask.shape)}"
        )
    valid = jnp.asarray(attention_mask)
    return input_ids, token_type_ids, valid if dtype == np.bool_ else valid != 0


# --------------------------------------------------------------------------- #
# The encoder.
# --------------------------------------------------------------------------- #


def _normal() -> Callable[..., Array]:
    return nn.initializers.normal(stddev=_INIT_STDDEV)


def _word_embedding_init(pad_token_id: int | None) -> Callable[..., Array]:
    normal = _normal()
    if pad_token_id is None:
        return normal

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return normal(key, shape, dtype).at[pad_token_id].set(0.0)

    return init


class _Embeddings(nn.Module):
    """``Dropout(LayerNorm(word[ids] + position[0..T-1] + token_type[types]))``.

    Parameters: ``word_embeddings/embedding [V, H]``,
    ``position_embeddings/embedding [max_position_embeddings, H]``,
    ``token_type_embeddings/embedding [type_vocab_size, H]``, ``layer_norm``.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, *, train: bool) -> Array:
        c = self.config

        def embed(size: int, name: str, init: Callable[..., Array] | None = None) -> nn.Embed:
            return nn.Embed(size, c.hidden_size, embedding_init=init or _normal(), name=name)

        positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None]  # [1, T]
        x = embed(c.vocab_size, "word_embeddings", _word_embedding_init(c.pad_token_id))(
            input_ids)  # [B, T, H]
        x = x + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = x + embed(c.max_position_embeddings, "position_embeddings")(positions)
        x = LayerNorm(c.layer_norm_eps, name="layer_norm")(x)
        return Dropout(c.dropout_rate)(x, train=train)


class _Layer(nn.Module):
    """Post-LN encoder layer (BERT's ``BertLayer``)::

        x = LayerNorm(x + Dropout(attention(x)))
        x = LayerNorm(x + Dropout(output(activation(intermediate(x)))))

    Parameters: ``attention`` (``MultiHeadAttention``: ``query``, ``key``,
    ``value``, ``out``, each ``[H, H]``), ``attention_layer_norm``,
    ``intermediate [H, I]``, ``output [I, H]``, ``output_layer_norm``.
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self, x: Array, valid: Array | None, *, train: bool, return_weights: bool
    ) -> tuple[Array, Array | None]:
        c = self.config
        result = MultiHeadAttention(
            c.num_heads, dropout_rate=c.attention_dropout_rate, kernel_init=_normal(),
            name="attention",
        )(x, key_padding_mask=valid, train=train, return_weights=return_weights)
        h, weights = result if return_weights else (result, None)  # [B, T, H]
        x = LayerNorm(c.layer_norm_eps, name="attention_layer_norm")(
            x + Dropout(c.dropout_rate)(h, train=train))
        h = Dense(c.intermediate_size, kernel_init=_normal(), name="intermediate")(x)
        h = get_activation(c.activation)(h)  # [B, T, I]
        h = Dense(c.hidden_size, kernel_init=_normal(), name="output")(h)  # [B, T, H]
        x = LayerNorm(c.layer_norm_eps, name="output_layer_norm")(
            x + Dropout(c.dropout_rate)(h, train=train))
        return x, weights


class Bert(nn.Module):
    """The BERT encoder (Hugging Face's ``BertModel``).

    Attributes:
      config: a ``BertConfig``.
      add_pooling_layer: build the ``pooler`` (``tanh`` Dense on the [CLS]
        state); the masked-LM model leaves it out, as Hugging Face does.

    Parameters: ``embeddings``, ``layer_0`` .. ``layer_{L-1}``, ``pooler``
    (``kernel: [H, H]``); see the module docstring for their Hugging Face
    names.

    Example::

        model = Bert(BertConfig.minilm_l6())
        variables = jax.jit(model.init)(key, jnp.zeros((1, 8), jnp.int32))
        out = model.apply(variables, ids, attention_mask=mask)
        out.sequence_output  # [B, T, 384]
    """

    config: BertConfig
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(
        self,
        input_ids: Inputs,
        *,
        token_type_ids: Int[Array, "batch time"] | None = None,
        attention_mask: Int[Array, "batch time"] | Bool[Array, "batch time"] | None = None,
        train: bool = False,
        return_weights: bool = False,
    ) -> BertOutput:
        """Encodes a batch of token sequences.

        Args:
          input_ids: ``[batch, time]`` integer ids in ``[0, vocab_size)``,
            ``time <= max_position_embeddings``; or a dict holding them (see
            the module docstring).
          token_type_ids: ``[batch, time]`` segment ids in ``[0,
            type_vocab_size)``; default all 0.
          attention_mask: ``[batch, time]``, 1/True on real tokens, 0/False on
            padding; default all real.
          train: enable dropout (needs ``rngs={"dropout": key}``).
          return_weights: also return every layer's attention weights.

        Returns:
          A ``BertOutput``: ``sequence_output [B, T, H]``, ``pooled_output
          [B, H]`` (or ``None``), ``attention_weights`` (or ``None``).
        """
        c = self.config
        input_ids, token_type_ids, valid = _prepare(
            "Bert", c, input_ids, token_type_ids, attention_mask)
        x = _Embeddings(c, name="embeddings")(input_ids, token_type_ids, train=train)
        all_weights = []
        for i in range(c.num_layers):
            x, weights = _Layer(c, name=f"layer_{i}")(
                x, valid, train=train, return_weights=return_weights)  # [B, T, H]
            all_weights.append(weights)
        pooled = None
        if self.add_pooling_layer:
            pooled = jnp.tanh(Dense(c.hidden_size, kernel_init=_normal(), name="pooler")(
                x[:, 0]))  # [B, H]
        return BertOutput(
            sequence_output=x, pooled_output=pooled,
            attention_weights=tuple(all_weights) if return_weights else None,
        )


# --------------------------------------------------------------------------- #
# Task heads.
# --------------------------------------------------------------------------- #


class BertForMaskedLM(nn.Module):
    """BERT with its masked-language-model head (Hugging Face's ``BertForMaskedLM``)::

        h = LayerNorm(activation(transform(sequence_output)))   # [B, T, H]
        logits = h @ word_embeddings^T + output_bias            # [B, T, V]

    The decoder is *tied* to the input word embeddings: there is no decoder
    kernel, and the embedding's gradient is the sum of what reaches it
    through the lookup and through the logits.

    Attributes:
      config: a ``BertConfig``.

    Parameters: ``bert`` (a ``Bert`` without pooler), ``transform [H, H]``,
    ``transform_layer_norm``, ``output_bias [V]``.

    Train it with ``nnlib.train.make_train_step(classification_loss())`` on
    ``{"inputs": {"input_ids", "attention_mask"}, "labels": [B, T] original
    ids, "label_mask": [B, T] 1 at the masked positions}``.
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Inputs,
        *,
        token_type_ids: Int[Array, "batch time"] | None = None,
        attention_mask: Int[Array, "batch time"] | Bool[Array, "batch time"] | None = None,
        train: bool = False,
    ) -> Float[Array, "batch time vocab"]:
        """``input_ids: [batch, time]`` (or a dict, see ``Bert``) ->
        ``logits: [batch, time, vocab_size]`` at every position."""
        c = self.config
        input_ids, token_type_ids, valid = _prepare(
            "BertForMaskedLM", c, input_ids, token_type_ids, attention_mask)
        bert = Bert(c, add_pooling_layer=False, name="bert")
        x = bert(input_ids, token_type_ids=token_type_ids, attention_mask=valid,
                 train=train).sequence_output  # [B, T, H]
        h = Dense(c.hidden_size, kernel_init=_normal(), name="transform")(x)
        h = LayerNorm(c.layer_norm_eps, name="transform_layer_norm")(
            get_activation(c.activation)(h))  # [B, T, H]
        table = bert.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
        bias = self.param("output_bias", nn.initializers.zeros, (c.vocab_size,), jnp.float32)
        return matmul_last_axis(h, table.T.astype(h.dtype)) + bias.astype(h.dtype)  # [B, T, V]


class BertForSequenceClassification(nn.Module):
    """BERT with a linear classifier on the pooled [CLS] state (Hugging Face's
    ``BertForSequenceClassification``): ``logits = classifier(Dropout(pooled))``.

    Attributes:
      config: a ``BertConfig``.
      num_classes: number of logits C.

    Parameters: ``bert`` (a ``Bert`` with pooler), ``classifier [H, C]``.
    """

    config: BertConfig
    num_classes: int

    @nn.compact
    def __call__(
        self,
        input_ids: Inputs,
        *,
        token_type_ids: Int[Array, "batch time"] | None = None,
        attention_mask: Int[Array, "batch time"] | Bool[Array, "batch time"] | None = None,
        train: bool = False,
    ) -> Float[Array, "batch num_classes"]:
        """``input_ids: [batch, time]`` (or a dict, see ``Bert``) ->
        ``logits: [batch, num_classes]``."""
        c = self.config
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(
                f"BertForSequenceClassification needs a positive int num_classes, "
                f"got {self.num_classes!r}"
            )
        input_ids, token_type_ids, valid = _prepare(
            "BertForSequenceClassification", c, input_ids, token_type_ids, attention_mask)
        pooled = Bert(c, name="bert")(
            input_ids, token_type_ids=token_type_ids, attention_mask=valid, train=train,
        ).pooled_output  # [B, H]
        pooled = Dropout(c.dropout_rate)(pooled, train=train)
        return Dense(self.num_classes, kernel_init=_normal(), name="classifier")(pooled)
