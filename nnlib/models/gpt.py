"""GPT: a decoder-only Transformer language model, with KV-cached generation.

The model (Radford et al. 2018, 2019; the layout of nanoGPT's ``model.py``)::

    x = token_embedding[tokens] + position_embedding[positions]   # [B, T, d]
    x = Dropout(x)
    for each block:                                               # pre-LN
        x = x + Dropout(CausalSelfAttention(LayerNorm(x)))
        x = x + Dropout(MLP(LayerNorm(x)))          # d -> mlp_ratio*d -> d, GELU
    logits = LayerNorm(x) @ token_embedding^T                     # [B, T, vocab]

The output head is *tied* to the token embedding by default (Press & Wolf
2017): there is no separate head parameter, and the embedding's gradient is
the sum of what reaches it through the input lookup and through the logits.

Initialisation follows GPT-2: every weight normal(0, 0.02), biases zero, and
the two projections that write into the residual stream (attention ``out``
and MLP ``proj``) normal(0, 0.02 / sqrt(2 * num_layers)), so the stream's
variance does not grow with depth.

Two ways to run the same parameters:

- **Full forward** (training, scoring): ``model.apply(variables, tokens)``
  attends with ``jax.nn.dot_product_attention(..., is_causal=True)``, which
  may use a fused kernel (on CPU in float32 with nnlib's native attention
  kernel, reading q, k and v from the fused projection in place; otherwise
  with ``nnlib.layers.dot_product_attention``, which is faster there).
  Dropout (embedding and residual branches) is active with ``train=True``;
  there is no attention-weight dropout, which the fused kernel cannot apply.
  The fused kernel never forms the attention weights;
  ``gpt_attention_weights(model, variables, tokens)`` (or ``apply`` with
  ``mutable=["intermediates"]``) computes and returns them as well.
- **Cached decoding** (generation): a ``KVCache`` holds every layer's keys and
  values for the positions seen so far. ``prefill`` runs a whole prompt in one
  pass and fills the cache; ``decode_step`` runs one new token against it.
  Shapes are static — the cache has ``max_len`` slots, new keys/values are
  written at ``cache.index`` with ``dynamic_update_slice`` and queries attend
  over all slots with a mask of ``slot <= query position`` — so a whole
  decoding loop compiles once. This path uses the explicit masked softmax of
  ``nnlib.layers.attention`` and gives the full forward's logits to float
  rounding.

``generate`` runs prefill plus the whole sampling loop (greedy, temperature,
top-k, nucleus/top-p) as one jitted program, compiled once per model, batch
size, prompt length, ``max_new_tokens`` and filtering choice.

Positions are absolute and learned, so a sequence can never be longer than
``context_length``: longer inputs, caches or generations are errors (no
sliding window).

Shapes (glossary): B batch, T time (tokens in this call), P prompt length,
S cache slots (max_len), V vocab_size, d embed_dim, H num_heads,
D = d / H head_dim, L num_layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Float, Int, PRNGKeyArray

from nnlib.layers._checks import ShapeError
from nnlib.layers._native import attention_qkv as native_attention_qkv
from nnlib.layers._native import available as native_available
from nnlib.layers.activations import get_activation
from nnlib.layers.attention import (
    causal_mask,
    dot_product_attention,
    dot_product_attention_weights,
)
from nnlib.layers.dense import Dense, matmul_last_axis
from nnlib.layers.normalization import Dropout, LayerNorm

_INIT_STDDEV = 0.02  # GPT-2's initializer range


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a ``GPT``; frozen, so it is hashable and can be a
    static argument of ``jax.jit``.

    Attributes:
      vocab_size: number of token ids V.
      context_length: longest sequence (GPT-2's "block size", n_ctx); the
        number of learned positions.
      num_layers: number of Transformer blocks L.
      num_heads: attention heads H; must divide ``embed_dim``.
      embed_dim: width d of the residual stream.
      mlp_ratio: hidden width of each MLP is ``mlp_ratio * embed_dim``.
      dropout_rate: dropout on the embeddings and on both residual branches
        (``train=True`` only).
      use_bias: biases in the Dense layers (LayerNorms always have one).
      tie_embeddings: the output head is the transposed token embedding
        (``False``: a separate bias-free ``head`` projection).
      dtype: computation dtype, e.g. ``jnp.bfloat16``; ``None`` is float32.
        Parameters are stored in float32 and logits returned in (at least)
        float32. ``jnp.float64`` (under ``jax.enable_x64``) takes the explicit
        attention path, for gradient checks.
      native_attention: on the CPU in float32, attend with nnlib's native
        kernel (``nnlib.layers._native.attention_qkv``: q, k and v read from
        the fused projection in place, each (batch, head) pair forward and
        backward in cache; every derivative). ``False``: the explicit path.
    """

    vocab_size: int
    context_length: int
    num_layers: int
    num_heads: int
    embed_dim: int
    mlp_ratio: int = 4
    dropout_rate: float = 0.0
    use_bias: bool = True
    tie_embeddings: bool = True
    dtype: Any = None
    native_attention: bool = True

    def __post_init__(self) -> None:
        for field in ("vocab_size", "context_length", "num_layers", "num_heads",
                      "embed_dim", "mlp_ratio"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{field} must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"GPTConfig needs num_heads to divide embed_dim, got "
                f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"GPTConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")

    @property
    def head_dim(self) -> int:
        """Size D of each attention head, ``embed_dim // num_heads``."""
        return self.embed_dim // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The dtype activations (and the KV cache) are computed in."""
        return jnp.dtype(self.dtype or jnp.float32)


@struct.dataclass
class KVCache:
    """Keys and values of every layer for the positions decoded so far.

    A pytree (passes through ``jit``, ``scan`` and ``fori_loop``). Slots
    ``[0, index)`` hold real keys/values; later slots are zeros that the
    attention mask never reads.

    Attributes:
      keys: ``[layers, batch, max_len, heads, head_dim]``.
      values: ``[layers, batch, max_len, heads, head_dim]``.
      index: int32 scalar, the number of filled slots = position of the next
        token.
    """

    keys: Float[Array, "layers batch max_len heads head_dim"]
    values: Float[Array, "layers batch max_len heads head_dim"]
    index: Int[Array, ""]

    @property
    def max_len(self) -> int:
        """Number of slots S."""
        return self.keys.shape[2]


def _normal(stddev: float) -> Any:
    return nn.initializers.normal(stddev=stddev)


class _Head(nn.Module):
    """The untied output head ``x @ kernel`` (``kernel: [d, V]``, no bias),
    accumulated and returned in ``logits_dtype`` as the tied head is: a bfloat16
    ``Dense`` would round every logit to 8 bits before the cast."""

    vocab_size: int
    dtype: Any
    logits_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", _normal(_INIT_STDDEV), (x.shape[-1], self.vocab_size),
                            jnp.float32)
        return matmul_last_axis(x.astype(self.dtype), kernel.astype(self.dtype),
                                preferred_element_type=self.logits_dtype)


class _CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, fused or against a KV cache.

    nnlib's ``MultiHeadAttention`` has no cache, and GPT-2 projects q, k and v
    with one fused ``qkv`` Dense (one matmul instead of three), so the block
    carries its own attention.

    Parameters: ``qkv`` (``kernel: [d, 3d]``, columns q | k | v, heads
    contiguous within each) and ``out`` (``kernel: [d, d]``).
    """

    config: GPTConfig

    @nn.compact
    def __call__(
        self, x: Array, *, cache: KVCache | None, layer: int
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        batch, time, width = x.shape
        dtype = c.compute_dtype
        qkv = Dense(3 * width, use_bias=c.use_bias, kernel_init=_normal(_INIT_STDDEV),
                    dtype=dtype, name="qkv")(x)  # [B, T, 3d]
        fused_native = (cache is None and c.native_attention and dtype == jnp.float32
                        and jax.default_backend() == "cpu" and native_available())
        query, key, value = (
            part.reshape(batch, time, c.num_heads, c.head_dim)  # [B, T, H, D]
            for part in jnp.split(qkv, 3, axis=-1)
        )
        if (cache is None and np.dtype(dtype).itemsize <= 4
                and jax.default_backend() != "cpu"):
            # JAX promotes bf16 logits to f32 internally by implicit promotion,
            # which a caller's strict-promotion mode would reject.
            with jax.numpy_dtype_promotion("standard"):
                attended = jax.nn.dot_product_attention(query, key, value, is_causal=True)
        elif fused_native:
            # nnlib's native CPU attention reads q, k and v from the fused
            # projection in place and writes their gradient the same way.
            attended = native_attention_qkv(
                qkv.reshape(batch, time, 3, c.num_heads, c.head_dim), causal_mask(time)
            )  # [B, T, H, D]
        elif cache is None:
            # On CPU nnlib's attention (softmax division after the product) is
            # faster: GPT b12 train step 24.6 -> 25.4 steps/s. JAX's fused
            # attention takes its softmax in float32; float64 runs (gradient
            # checks) need the explicit path to keep their digits.
            attended = dot_product_attention(
                query, key, value, causal_mask(time), implementation="explicit"
            )  # [B, T, H, D]
        else:
            start = (layer, 0, cache.index, 0, 0)
            cache = cache.replace(
                keys=jax.lax.dynamic_update_slice(
                    cache.keys, key[None].astype(cache.keys.dtype), start),
                values=jax.lax.dynamic_update_slice(
                    cache.values, value[None].astype(cache.values.dtype), start),
            )  # [L, B, S, H, D]
            # Query i sits at position index + i and may see slots 0..index+i;
            # later slots are empty (or stale) and are masked out.
            query_positions = cache.index + jnp.arange(time, dtype=jnp.int32)  # [T]
            slots = jnp.arange(cache.max_len, dtype=jnp.int32)  # [S]
            mask = (slots[None, :] <= query_positions[:, None])[None, None]  # [1, 1, T, S]
            attended = dot_product_attention(
                query, cache.keys[layer], cache.values[layer], mask,
                implementation="explicit",
            )  # [B, T, H, D]
        if cache is None and self.is_mutable_collection("intermediates"):
            # Asked for (gpt_attention_weights / mutable=["intermediates"]):
            # the fused kernel never forms the weights, so compute them once
            # more from the same q and k. Skipped entirely otherwise.
            weights = dot_product_attention_weights(query, key, causal_mask(time))
            self.sow("intermediates", "attention_weights", weights)  # [B, H, T, T]
        attended = attended.reshape(batch, time, width)  # [B, T, d]
        residual_init = _normal(_INIT_STDDEV / math.sqrt(2 * c.num_layers))
        out = Dense(width, use_bias=c.use_bias, kernel_init=residual_init, dtype=dtype,
                    name="out")(attended)  # [B, T, d]
        return out, cache


class _Block(nn.Module):
    """Pre-LN GPT block: ``x + attention(LN(x))``, then ``x + MLP(LN(x))``.

    Parameters: ``attention_norm``, ``attention``, ``mlp_norm``, and the MLP
    ``fc: [d, mlp_ratio*d]`` -> GELU (tanh form, as GPT-2) -> ``proj:
    [mlp_ratio*d, d]``.
    """

    config: GPTConfig

    @nn.compact
    def __call__(
        self, x: Array, *, train: bool, cache: KVCache | None, layer: int
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        dtype = c.compute_dtype
        h, cache = _CausalSelfAttention(c, name="attention")(
            LayerNorm(name="attention_norm")(x), cache=cache, layer=layer
        )
        x = x + Dropout(c.dropout_rate)(h, train=train)
        h = LayerNorm(name="mlp_norm")(x)
        h = Dense(c.mlp_ratio * c.embed_dim, use_bias=c.use_bias,
                  kernel_init=_normal(_INIT_STDDEV), dtype=dtype, name="fc")(h)
        h = get_activation("gelu")(h)  # [B, T, mlp_ratio*d]
        h = Dense(c.embed_dim, use_bias=c.use_bias, dtype=dtype, name="proj",
                  kernel_init=_normal(_INIT_STDDEV / math.sqrt(2 * c.num_layers)))(h)
        x = x + Dropout(c.dropout_rate)(h, train=train)
        return x, cache


def _check_tokens(layer: str, tokens: Any, limit: int, vocab_size: int, what: str) -> None:
    """tokens must be integer ids ``[batch, time]`` with ``1 <= time <= limit``."""
    shape = tuple(getattr(tokens, "shape", ()))
    dtype = getattr(tokens, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{layer} expected integer token ids of shape [batch, time], got dtype "
            f"{dtype} with shape {shape}; cast first, e.g. tokens.astype(jnp.int32)"
        )
    if len(shape) != 2:
        raise ShapeError(
            f"{layer} expected tokens of shape [batch, time] (rank 2), got shape "
            f"{shape} (rank {len(shape)})"
        )
    if shape[1] < 1:
        raise ShapeError(f"{layer} expected at least one token per row, got shape {shape}")
    if shape[1] > limit:
        raise ShapeError(
            f"{layer} got tokens of shape {shape}: time={shape[1]} is longer than "
            f"{what}={limit}"
        )
    # Only concrete ids can be checked (a gather would clamp or NaN-fill
    # silently); numpy, because jnp.min of a constant under a trace is a tracer.
    if not isinstance(tokens, jax.core.Tracer):
        host = np.asarray(tokens)
        low, high = int(host.min()), int(host.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{layer} got token ids in [{low}, {high}], outside "
                f"[0, vocab_size={vocab_size})"
            )


class GPT(nn.Module):
    """Decoder-only Transformer language model (GPT-2 architecture).

    Attributes:
      config: a ``GPTConfig``.

    Parameters: ``token_embedding: [V, d]``, ``position_embedding:
    [context_length, d]``, ``block_0`` .. ``block_{L-1}`` (see ``_Block``),
    ``final_norm``, and ``head`` (``kernel: [d, V]``) only when
    ``tie_embeddings=False``.

    Methods (all through ``model.apply(variables, ..., method=...)`` except
    ``init_cache``, which needs no parameters):

    - ``__call__(tokens [B, T], *, train=False) -> logits [B, T, V]``
    - ``init_cache(batch_size, max_len=None) -> KVCache`` (zeros)
    - ``prefill(tokens [B, P], cache) -> (logits [B, P, V], cache)``
    - ``decode_step(tokens [B, 1], cache) -> (logits [B, V], cache)``

    Example::

        model = GPT(GPTConfig(vocab_size=50, context_length=16, num_layers=2,
                              num_heads=2, embed_dim=32))
        variables = model.init(key, jnp.zeros((1, 16), jnp.int32))
        logits = model.apply(variables, tokens)                  # [B, T, V]
        cache = model.init_cache(batch_size=B, max_len=16)
        logits, cache = model.apply(variables, prompt, cache, method="prefill")
        next_logits, cache = model.apply(variables, nxt, cache, method="decode_step")
    """

    config: GPTConfig

    def __call__(
        self, tokens: Int[Array, "batch time"], *, train: bool = False
    ) -> Float[Array, "batch time vocab"]:
        """Logits for every position: ``tokens: [batch, time] -> [batch, time,
        vocab_size]`` (float32); position t sees tokens 0..t only."""
        c = self.config
        _check_tokens("GPT", tokens, c.context_length, c.vocab_size, "context_length")
        logits, _ = self._forward(tokens, train=train, cache=None)
        return logits

    def init_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache with ``max_len`` slots (default ``context_length``).

        ``keys``/``values``: zeros ``[num_layers, batch_size, max_len, heads,
        head_dim]`` in the compute dtype; ``index`` 0.
        """
        c = self.config
        max_len = c.context_length if max_len is None else max_len
        if not 1 <= max_len <= c.context_length:
            raise ValueError(
                f"GPT.init_cache max_len must be in [1, context_length="
                f"{c.context_length}], got {max_len}"
            )
        if batch_size < 1:
            raise ValueError(f"GPT.init_cache batch_size must be >= 1, got {batch_size}")
        shape = (c.num_layers, batch_size, max_len, c.num_heads, c.head_dim)
        zeros = jnp.zeros(shape, c.compute_dtype)
        return KVCache(keys=zeros, values=zeros, index=jnp.zeros((), jnp.int32))

    def prefill(
        self, tokens: Int[Array, "batch time"], cache: KVCache
    ) -> tuple[Float[Array, "batch time vocab"], KVCache]:
        """Runs ``tokens`` (a prompt, or any chunk) at positions ``cache.index
        ...`` in one pass and stores their keys/values.

        Returns ``(logits [batch, time, vocab_size], cache)`` with
        ``cache.index`` advanced by ``time``.
        """
        self._check_cache("GPT.prefill", tokens, cache)
        return self._forward(tokens, train=False, cache=cache)

    def decode_step(
        self, tokens: Int[Array, "batch 1"], cache: KVCache
    ) -> tuple[Float[Array, "batch vocab"], KVCache]:
        """One new token per row: ``tokens: [batch, 1] -> (logits [batch,
        vocab_size], cache)`` with ``cache.index`` advanced by one."""
        if getattr(tokens, "ndim", None) == 2 and tokens.shape[1] != 1:
            raise ShapeError(
                f"GPT.decode_step expected tokens of shape [batch, 1], got shape "
                f"{tuple(tokens.shape)}; use prefill for several tokens"
            )
        self._check_cache("GPT.decode_step", tokens, cache)
        logits, cache = self._forward(tokens, train=False, cache=cache)
        return logits[:, 0], cache

    def _check_cache(self, name: str, tokens: Any, cache: Any) -> None:
        c = self.config
        if not isinstance(cache, KVCache):
            raise TypeError(f"{name} expected a KVCache (GPT.init_cache), got "
                            f"{type(cache).__name__}")
        _check_tokens(name, tokens, cache.max_len, c.vocab_size, "cache max_len")
        expected = (c.num_layers, tokens.shape[0], cache.max_len, c.num_heads, c.head_dim)
        if tuple(cache.keys.shape) != expected or tuple(cache.values.shape) != expected:
            raise ShapeError(
                f"{name} expected cache keys/values of shape [layers, batch, max_len, "
                f"heads, head_dim] = {expected} for tokens of shape "
                f"{tuple(tokens.shape)}, got {tuple(cache.keys.shape)}"
            )
        # dynamic_update_slice would clamp an overflowing write silently.
        if not isinstance(cache.index, jax.core.Tracer):
            index = int(cache.index)
            if index + tokens.shape[1] > cache.max_len:
                raise ValueError(
                    f"{name}: cache has {cache.max_len - index} free slots "
                    f"(index={index}, max_len={cache.max_len}) but got "
                    f"{tokens.shape[1]} tokens"
                )

    @nn.compact
    def _forward(
        self, tokens: Array, *, train: bool, cache: KVCache | None
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        dtype = c.compute_dtype
        time = tokens.shape[1]
        token_table = self.param(
            "token_embedding", _normal(_INIT_STDDEV), (c.vocab_size, c.embed_dim), jnp.float32
        )
        position_table = self.param(
            "position_embedding", _normal(_INIT_STDDEV), (c.context_length, c.embed_dim),
            jnp.float32,
        )
        start = 0 if cache is None else cache.index
        positions = jax.lax.dynamic_slice_in_dim(position_table, start, time)  # [T, d]
        x = jnp.take(token_table, tokens, axis=0) + positions  # [B, T, d]
        x = Dropout(c.dropout_rate)(x.astype(dtype), train=train)
        for layer in range(c.num_layers):
            x, cache = _Block(c, name=f"block_{layer}")(
                x, train=train, cache=cache, layer=layer
            )
        x = LayerNorm(name="final_norm")(x)  # [B, T, d]
        # bf16 logits would round away the small differences sampling reads.
        logits_dtype = np.promote_types(dtype, np.float32)
        if c.tie_embeddings:
            logits = matmul_last_axis(
                x, token_table.astype(dtype).T, preferred_element_type=logits_dtype
            )  # [B, T, V]
        else:
            logits = _Head(c.vocab_size, dtype, logits_dtype, name="head")(x)  # [B, T, V]
        if cache is not None:
            cache = cache.replace(index=cache.index + time)
        return logits, cache


# --------------------------------------------------------------------------- #
# Sampling.
# --------------------------------------------------------------------------- #


def top_k_filter(logits: Float[Array, "*batch vocab"], k: int) -> Float[Array, "*batch vocab"]:
    """Keeps the ``k`` largest logits of each row, sets the rest to ``-inf``.

    Exactly ``k`` survive even with ties (the first ones by index win).
    """
    vocab = logits.shape[-1]
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"top_k must be a positive int, got {k!r}")
    if k >= vocab:
        return logits
    _, indices = jax.lax.top_k(logits, k)  # [..., k]
    keep = jnp.put_along_axis(
        jnp.zeros(logits.shape, jnp.bool_), indices, True, axis=-1, inplace=False
    )
    return jnp.where(keep, logits, -jnp.inf)


def top_p_filter(logits: Float[Array, "*batch vocab"], p: float) -> Float[Array, "*batch vocab"]:
    """Nucleus filtering (Holtzman et al. 2020): keeps the smallest set of most
    probable tokens whose probabilities sum to at least ``p``; the rest become
    ``-inf``. The most probable token is always kept; ``p=1`` keeps all.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    if p >= 1.0:
        # Outright, not by `mass_before < p`: in float32 the mass before a
        # token of probability below ~6e-8 rounds to 1.0, which would drop it.
        return logits
    order = jnp.argsort(-logits, axis=-1)  # most probable first
    # In float32 at least: a bfloat16 cumulative sum drifts by more than the mass of
    # the tokens near the threshold, so the kept set summed to less than p.
    acc = np.promote_types(logits.dtype, np.float32)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1).astype(acc), axis=-1)
    # A token is needed iff the more probable ones have not reached p yet.
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative sum
    keep_sorted = mass_before < p
    keep = jnp.put_along_axis(
        jnp.zeros(logits.shape, jnp.bool_), order, keep_sorted, axis=-1, inplace=False
    )
    return jnp.where(keep, logits, -jnp.inf)


def sample_next_token(
    logits: Float[Array, "batch vocab"],
    key: PRNGKeyArray,
    *,
    temperature: float | Float[Array, ""] = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
) -> Int[Array, " batch"]:
    """Draws one token id per row from ``softmax(logits / temperature)``.

    Order of operations: temperature, then top-k, then top-p (as Hugging Face
    transformers). ``greedy`` takes the argmax and ignores everything else.

    Returns:
      ``[batch]`` int32 token ids.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------- #
# Generation.
# --------------------------------------------------------------------------- #


def gpt_attention_weights(
    model: GPT, variables: Any, tokens: Int[Array, "batch time"]
) -> tuple[Float[Array, "batch time vocab"], Float[Array, "layers batch heads time time"]]:
    """The GPT's logits and every layer's attention weights on ``tokens``.

    The forward pass uses fused attention (``jax.nn.dot_product_attention``),
    which never materializes the weights; asked for them, each attention
    layer also computes ``softmax(q k^T / sqrt(head_dim))`` under the causal
    mask from the same ``q`` and ``k`` and sows it into the
    ``"intermediates"`` collection (``variables["intermediates"]
    ["block_{l}"]["attention"]["attention_weights"]``, what
    ``model.apply(variables, tokens, mutable=["intermediates"])`` returns).
    The logits are unchanged.

    Returns:
      ``(logits [B, T, V], weights [L, B, H, T, T])``; each row of weights
      sums to 1 and is zero above the diagonal.
    """
    params = {k: v for k, v in variables.items() if k != "intermediates"}
    logits, state = model.apply(params, tokens, mutable=["intermediates"])
    blocks = state["intermediates"]
    weights = jnp.stack([blocks[f"block_{layer}"]["attention"]["attention_weights"][0]
                         for layer in range(model.config.num_layers)])
    return logits, weights


def generate(
    model: GPT,
    params: Any,
    prompt: Int[Array, "batch prompt_len"],
    max_new_tokens: int,
    *,
    key: PRNGKeyArray,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
) -> Int[Array, "batch total_len"]:
    """Autoregressive sampling with a KV cache, the whole loop in one jit.

    The prompt is prefilled in one pass, then each step samples a token from
    the last logits (``sample_next_token``) and runs ``decode_step`` on it,
    inside a ``jax.lax.fori_loop``. The cache has exactly
    ``prompt_len + max_new_tokens`` slots. Step ``i`` samples with
    ``fold_in(key, i)``.

    Compiles once per (model config, batch, prompt_len, max_new_tokens,
    top_k, top_p, greedy); ``temperature`` and the values of ``params``,
    ``prompt`` and ``key`` can change without recompiling.

    Args:
      model: a ``GPT``.
      params: its ``"params"`` collection (or the whole ``{"params": ...}``
        variables dict).
      prompt: ``[batch, prompt_len]`` integer token ids, ``prompt_len >= 1``.
      max_new_tokens: tokens to append; ``prompt_len + max_new_tokens`` must
        not exceed ``context_length``.
      key: PRNG key (unused when ``greedy``).
      temperature: > 0; below 1 sharpens, above 1 flattens the distribution.
      top_k: sample only among the ``k`` most likely tokens.
      top_p: sample only from the nucleus of probability mass ``p``.
      greedy: always take the most likely token.

    Returns:
      ``[batch, prompt_len + max_new_tokens]`` int32: the prompt followed by
      the generated tokens.
    """
    c = model.config
    _check_tokens("generate", prompt, c.context_length, c.vocab_size, "context_length")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    prompt_len = prompt.shape[1]
    if prompt_len + max_new_tokens > c.context_length:
        raise ValueError(
            f"generate: prompt_len + max_new_tokens = {prompt_len} + {max_new_tokens} "
            f"= {prompt_len + max_new_tokens} exceeds context_length={c.context_length}; "
            f"the model has no positions beyond that (crop the prompt)"
        )
    if not greedy:
        if not temperature > 0:
            raise ValueError(
                f"generate temperature must be > 0 (use greedy=True for argmax), "
                f"got {temperature!r}"
            )
        if top_k is not None:
            top_k_filter(jnp.zeros((1,)), top_k)  # validates k
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"generate top_p must be in (0, 1], got {top_p!r}")
    prompt = jnp.asarray(prompt, jnp.int32)
    if max_new_tokens == 0:
        return prompt
    variables = params if "params" in params else {"params": params}
    if greedy:  # the filters do not change the argmax: one program for all
        top_k, top_p = None, None
    return _generate_loop(
        model, variables, prompt, key, jnp.asarray(temperature, jnp.float32),
        max_new_tokens=max_new_tokens, top_k=top_k, top_p=top_p, greedy=greedy,
    )


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "top_p", "greedy")
)
def _generate_loop(
    model: GPT,
    variables: Any,
    prompt: Array,
    key: Array,
    temperature: Array,
    *,
    max_new_tokens: int,
    top_k: int | None,
    top_p: float | None,
    greedy: bool,
) -> Array:
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt)  # [B, P+N]
    cache = model.init_cache(batch, total)
    logits, cache = model.apply(variables, prompt, cache, method="prefill")  # [B, P, V]

    def sample(step: Array, last_logits: Array) -> Array:
        return sample_next_token(
            last_logits, jax.random.fold_in(key, step), temperature=temperature,
            top_k=top_k, top_p=top_p, greedy=greedy,
        )  # [B]

    def step_fn(step: Array, carry: tuple[Array, KVCache, Array]) -> tuple[Array, KVCache, Array]:
        tokens, cache, last_logits = carry
        new = sample(step, last_logits)[:, None]  # [B, 1]
        tokens = jax.lax.dynamic_update_slice(tokens, new, (0, prompt_len + step))
        last_logits, cache = model.apply(variables, new, cache, method="decode_step")
        return tokens, cache, last_logits  # [B, P+N], cache, [B, V]

    # The last token needs sampling but no decode step after it.
    tokens, _, last_logits = jax.lax.fori_loop(
        0, max_new_tokens - 1, step_fn, (tokens, cache, logits[:, -1])
    )
    last = sample(jnp.int32(max_new_tokens - 1), last_logits)[:, None]
    return tokens.at[:, total - 1:].set(last)
