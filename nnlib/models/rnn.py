"""Recurrent networks: a sequence classifier and a character/word language model.

Both stack ``num_layers`` recurrent layers (``nnlib.layers.RNN``, or
``Bidirectional`` for the classifier), each reading the previous layer's
outputs, with dropout on the *non-recurrent* connections only — between
layers and before the output head, never on the carry (Zaremba et al. 2014,
"Recurrent Neural Network Regularization"; PyTorch's ``nn.LSTM(dropout=)``).

Cells by name: ``"lstm"`` (``LSTMCell``), ``"gru"`` (``GRUCell``), ``"rnn"``
(``SimpleRNNCell``, tanh). Weights follow PyTorch's gate layout, see
``nnlib.layers.recurrent``.

Padding masks: ``mask: [batch, time]`` is ``True`` on valid steps. Padded
steps hold the carry and output zeros, so with a mask the classifier's logits
do not depend on what the padded positions contain.

Shapes: B batch, T time, F input features, H hidden size, V vocabulary, E
embedding size, C classes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from nnlib.layers import (
    RNN,
    Bidirectional,
    Dense,
    Dropout,
    GRUCell,
    LSTMCell,
    RecurrentCell,
    SimpleRNNCell,
)
from nnlib.layers._checks import check_input, check_mask

CELLS: dict[str, type[RecurrentCell]] = {
    "lstm": LSTMCell,
    "gru": GRUCell,
    "rnn": SimpleRNNCell,
}


def _make_cell(model: str, cell: str, hidden_size: int) -> RecurrentCell:
    if cell not in CELLS:
        raise ValueError(
            f"{model} got cell={cell!r}; expected one of {', '.join(map(repr, CELLS))}"
        )
    # parent=None: the cell is adopted by the RNN layer it is handed to, so
    # its parameters live under that layer ("layer_0/cell"), not under us.
    return CELLS[cell](hidden_size, parent=None)


def _last_hidden(carry: Any) -> Array:
    """``h`` from a cell's carry: LSTM carries ``(c, h)``, the others ``h``."""
    return carry[1] if isinstance(carry, tuple) else carry


def _check_token_range(model: str, tokens: Array, vocab_size: int) -> None:
    """Raises on ids outside ``[0, vocab_size)``, which the embedding lookup
    would otherwise clamp silently. Concrete arrays only: under ``jit`` the
    values are unknown, so check a batch before jitting."""
    if isinstance(tokens, jax.core.Tracer) or not tokens.size:
        return
    values = np.asarray(tokens)  # on the host: no device ops, works while tracing
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{model} got token ids in [{low}, {high}], outside [0, vocab_size={vocab_size})"
        )


def _check_sizes(model: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{model} expected a positive integer {name}, got {value!r}")


class RNNClassifier(nn.Module):
    """Stacked (optionally bidirectional) RNN/LSTM/GRU, pooled, then a linear head.

    Attributes:
      num_classes: C, number of logits.
      hidden_size: H, hidden size of every recurrent layer (and direction).
      cell: ``"lstm"``, ``"gru"`` or ``"rnn"``.
      num_layers: recurrent layers stacked.
      bidirectional: each layer reads the sequence both ways and concatenates
        the two outputs (``2H`` features), as PyTorch's ``bidirectional=True``.
      dropout_rate: dropout between layers and on the pooled features
        (``train=True``).
      pooling: how the last layer's sequence becomes one vector:
        ``"last"`` — the hidden state after each sequence's last valid step
        (bidirectional: forward state after the last step concatenated with
        the backward state after the first step, PyTorch's ``h_n``);
        ``"mean"`` — the mean of the outputs over the valid steps.
      unroll: time steps per scan iteration (``jax.lax.scan``'s ``unroll``;
        ``None``: ``nnlib.layers.RNN``'s default); the same function, fewer
        loop trips.
      native: ``nnlib.layers.RNN``'s ``native``: LSTM layers run nnlib's native
        CPU kernel where it applies (``False``: XLA's recurrence, e.g. for
        XLA's FLOP count of the whole loop).

    Parameters: ``layer_{i}/cell`` (unidirectional) or
    ``layer_{i}/forward_cell`` and ``layer_{i}/backward_cell``, then
    ``head`` (``kernel: [H or 2H, C]``).

    Shapes: ``x: [batch, time, features]`` float (e.g. 8x8 digit images read
    row by row: ``[B, 8, 8]``), ``mask: [batch, time]`` ->
    ``logits: [batch, num_classes]``.
    """

    num_classes: int
    hidden_size: int
    cell: str = "lstm"
    num_layers: int = 1
    bidirectional: bool = False
    dropout_rate: float = 0.0
    pooling: str = "last"
    unroll: int | None = None
    native: bool = True

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "batch time features"],
        *,
        mask: Bool[Array, "batch time"] | None = None,
        train: bool = False,
    ) -> Float[Array, "batch num_classes"]:
        """Classifies each sequence.

        Args:
          x: ``[batch, time, features]``, floating point.
          mask: optional ``[batch, time]``, ``True`` on valid steps (any
            padding pattern; a row with no valid step pools to zeros).
          train: enable dropout (needs ``rngs={"dropout": key}``).

        Returns:
          ``logits: [batch, num_classes]``.
        """
        name = "RNNClassifier"
        _check_sizes(name, num_classes=self.num_classes, hidden_size=self.hidden_size,
                     num_layers=self.num_layers)
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"{name} got pooling={self.pooling!r}; expected 'last' or 'mean'")
        check_input(name, x, layout="[batch, time, features]", ndim=3, name="x")
        check_mask(name, mask, x.shape[:2], layout="[batch, time]")
        if mask is not None:
            mask = mask.astype(bool)

        h = x
        for i in range(self.num_layers):
            if i > 0:
                h = Dropout(self.dropout_rate)(h, train=train)
            if self.bidirectional:
                layer = Bidirectional(
                    _make_cell(name, self.cell, self.hidden_size),
                    _make_cell(name, self.cell, self.hidden_size),
                    unroll=self.unroll,
                    native=self.native,
                    name=f"layer_{i}",
                )
                (carry_f, carry_b), h = layer(h, mask=mask)  # h: [B, T, 2H]
                last = jnp.concatenate(
                    [_last_hidden(carry_f), _last_hidden(carry_b)], axis=-1
                )  # [B, 2H]
            else:
                layer = RNN(_make_cell(name, self.cell, self.hidden_size), unroll=self.unroll,
                            native=self.native, name=f"layer_{i}")
                carry, h = layer(h, mask=mask)  # h: [B, T, H]
                last = _last_hidden(carry)  # [B, H]

        if self.pooling == "last":
            pooled = last
        elif mask is None:
            pooled = jnp.mean(h, axis=1)  # [B, H or 2H]
        else:
            # Padded outputs are already zero; divide by the valid count only.
            count = jnp.sum(mask, axis=1, keepdims=True).astype(h.dtype)  # [B, 1]
            pooled = jnp.sum(h, axis=1) / jnp.maximum(count, 1.0)
        pooled = Dropout(self.dropout_rate)(pooled, train=train)
        return Dense(self.num_classes, name="head")(pooled)  # [B, C]


class RNNLanguageModel(nn.Module):
    """Next-token model: embedding, stacked RNN/LSTM/GRU, linear head over the vocabulary.

    Reads left to right only, so the logits at position ``t`` depend on
    ``tokens[:, :t+1]`` alone; train it on ``labels = tokens shifted by one``.

    Attributes:
      vocab_size: V, number of token ids (inputs must lie in ``[0, V)``).
      embed_dim: E, size of the token embeddings.
      hidden_size: H, hidden size of every recurrent layer.
      num_layers: recurrent layers stacked.
      cell: ``"lstm"`` (default), ``"gru"`` or ``"rnn"``.
      dropout_rate: dropout on the embeddings, between layers and before the
        head (``train=True``).
      unroll: time steps per scan iteration, as in :class:`RNNClassifier`.
      native: the native LSTM kernel where it applies, as in :class:`RNNClassifier`.

    Parameters: ``embedding/embedding [V, E]``, ``layer_{i}/cell``,
    ``head`` (``kernel: [H, V]``). For an LSTM the count is
    ``V*E + 4H(E + H + 1) + (L-1) * 4H(2H + 1) + (H + 1)V``; e.g. V=65, E=64,
    H=256, L=2 gives 874,881, the size of a ~0.8M-parameter character GPT.

    Shapes: ``tokens: [batch, time]`` integer -> ``logits: [batch, time,
    vocab_size]``.
    """

    vocab_size: int
    embed_dim: int
    hidden_size: int
    num_layers: int = 1
    cell: str = "lstm"
    dropout_rate: float = 0.0
    unroll: int | None = None
    native: bool = True

    @nn.compact
    def __call__(
        self, tokens: Int[Array, "batch time"], *, train: bool = False
    ) -> Float[Array, "batch time vocab"]:
        """Logits for the next token at every position.

        Args:
          tokens: ``[batch, time]`` integer token ids in ``[0, vocab_size)``.
          train: enable dropout (needs ``rngs={"dropout": key}``).

        Returns:
          ``logits: [batch, time, vocab_size]``.
        """
        name = "RNNLanguageModel"
        _check_sizes(name, vocab_size=self.vocab_size, embed_dim=self.embed_dim,
                     hidden_size=self.hidden_size, num_layers=self.num_layers)
        check_input(name, tokens, layout="[batch, time]", ndim=2, floating=False,
                    name="tokens")
        if not jnp.issubdtype(np.dtype(tokens.dtype), jnp.integer):
            raise TypeError(
                f"{name} expected integer token ids of shape [batch, time], got dtype "
                f"{tokens.dtype} with shape {tuple(tokens.shape)}; for float features "
                f"[batch, time, features] use RNNClassifier or an RNN layer"
            )
        _check_token_range(name, tokens, self.vocab_size)

        h = nn.Embed(self.vocab_size, self.embed_dim, name="embedding")(tokens)  # [B, T, E]
        h = Dropout(self.dropout_rate)(h, train=train)
        for i in range(self.num_layers):
            layer = RNN(_make_cell(name, self.cell, self.hidden_size), unroll=self.unroll,
                        native=self.native, name=f"layer_{i}")
            _, h = layer(h)  # [B, T, H]
            h = Dropout(self.dropout_rate)(h, train=train)
        return Dense(self.vocab_size, name="head")(h)  # [B, T, V]
