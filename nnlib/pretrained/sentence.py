"""Sentence embeddings from a BERT: mean pooling, and a classifier on top.

Sentence-BERT (Reimers & Gurevych, 2019) turns a BERT's token states into one
vector per sentence by averaging the states of the real tokens (padding left
out), then scales it to unit length so that cosine similarity is a dot
product::

    e = sum_t mask[t] * h[t] / max(sum_t mask[t], 1e-9)     # [B, H]
    e = e / max(||e||, 1e-12)                               # [B, H], unit norm

(the two epsilons are sentence-transformers' ``Pooling`` and PyTorch's
``F.normalize``). ``all-MiniLM-L6-v2`` was trained for exactly this readout,
so the [CLS] ``pooler`` of the checkpoint is not used.

``SentenceClassifier`` is that readout plus a linear head, the model for
transfer learning: start its ``bert`` from a checkpoint
(``sentence_classifier_params``) and either fine-tune everything or freeze the
encoder with ``nnlib.train.make_optimizer(frozen=("bert/.*",))`` (optax
masking: the encoder gets exactly zero updates and no optimizer state) plus
``train_encoder=False`` (which skips the encoder's backward pass, the bulk
of a step's cost, since its gradients would be thrown away).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from nnlib.layers.dense import Dense
from nnlib.layers.normalization import Dropout, l2_normalize
from nnlib.models.bert import Bert, BertConfig

_HEAD_STDDEV = 0.02  # BERT's initializer_range, as BertForSequenceClassification


def mean_pool(
    hidden: Float[Array, "batch time hidden"],
    mask: Int[Array, "batch time"] | Bool[Array, "batch time"],
) -> Float[Array, "batch hidden"]:
    """Mean of ``hidden`` over the real tokens (``mask`` 1/True); padding is left
    out. A row with no real token gives zeros (the denominator is clamped at
    1e-9, as sentence-transformers does)."""
    # In float32 at least: float16 rounds the 1e-9 floor to 0 (0 / 0 on a row with no
    # real token) and overflows past 65504 (a sum over many tokens).
    acc = np.promote_types(hidden.dtype, np.float32)
    weights = jnp.asarray(mask).astype(acc)[..., None]  # [B, T, 1]
    total = jnp.sum(hidden.astype(acc) * weights, axis=1)  # [B, H]
    return (total / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)).astype(hidden.dtype)


class SentenceClassifier(nn.Module):
    """BERT -> mean pooling (-> unit length) -> dropout -> linear head.

    Attributes:
      config: the encoder's ``BertConfig`` (its dropout applies inside the
        encoder when ``train=True``).
      num_classes: number of logits C.
      normalize: classify the unit-length sentence embedding (what
        ``nnlib.pretrained.encode`` returns) rather than the raw mean.
      dropout_rate: dropout on the sentence embedding before the head.
      train_encoder: ``False`` makes the encoder a fixed feature extractor: it
        runs in inference mode (no dropout) and ``stop_gradient`` cuts the
        backward pass through it, so a step costs a forward pass plus the
        head. Its gradients are then exact zeros, but weight decay would
        still shrink it: pair with ``make_optimizer(frozen=("bert/.*",))``.

    Parameters: ``bert`` (a ``Bert`` without pooler), ``classifier``
    (``kernel: [H, C]``).

    Shapes: ``inputs``: ``input_ids [batch, time]`` or a dict
    ``{"input_ids", "attention_mask"}`` -> ``logits: [batch, num_classes]``.
    """

    config: BertConfig
    num_classes: int
    normalize: bool = True
    dropout_rate: float = 0.1
    train_encoder: bool = True

    @nn.compact
    def __call__(
        self,
        inputs: Int[Array, "batch time"] | Mapping[str, Array],
        *,
        attention_mask: Int[Array, "batch time"] | None = None,
        train: bool = False,
    ) -> Float[Array, "batch num_classes"]:
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"SentenceClassifier needs a positive int num_classes, "
                             f"got {self.num_classes!r}")
        if isinstance(inputs, Mapping):
            if attention_mask is not None:
                raise ValueError("SentenceClassifier got inputs as a dict and also "
                                 "attention_mask as a keyword; put it in the dict")
            mask = inputs.get("attention_mask")
        else:
            inputs, mask = {"input_ids": inputs, "attention_mask": attention_mask}, attention_mask
        if mask is None:
            mask = jnp.ones(jnp.shape(inputs["input_ids"]), jnp.int32)
        hidden = Bert(self.config, add_pooling_layer=False, name="bert")(
            inputs, train=train and self.train_encoder).sequence_output  # [B, T, H]
        e = mean_pool(hidden, mask)  # [B, H]
        if not self.train_encoder:
            e = jax.lax.stop_gradient(e)
        if self.normalize:
            e = l2_normalize(e)
        e = Dropout(self.dropout_rate)(e, train=train)
        return Dense(self.num_classes, kernel_init=nn.initializers.normal(_HEAD_STDDEV),
                     name="classifier")(e)  # [B, C]


def sentence_classifier_params(
    model: SentenceClassifier, bert_params: Mapping[str, Any], key: jax.Array
) -> dict[str, Any]:
    """Parameters of ``model`` with its encoder taken from ``bert_params`` (e.g.
    ``load_minilm().params``; a ``pooler`` there is dropped) and a fresh
    classifier: kernel normal(0, 0.02), bias 0. Nothing else is initialised,
    so no 22M-parameter random init is computed and thrown away.

    Raises ``ValueError`` when ``bert_params`` does not have the structure and
    shapes ``model.config`` implies."""
    bert = {k: v for k, v in bert_params.items() if k != "pooler"}
    shapes = jax.eval_shape(model.init, key, jnp.zeros((1, 1), jnp.int32))["params"]
    want = jax.tree.map(lambda s: s.shape, shapes["bert"])
    got = jax.tree.map(lambda a: tuple(jnp.shape(a)), bert)
    if want != got:
        raise ValueError(
            "sentence_classifier_params: bert_params do not match SentenceClassifier's "
            f"config (hidden_size={model.config.hidden_size}, "
            f"num_layers={model.config.num_layers}); load them with the same BertConfig"
        )
    hidden, classes = shapes["classifier"]["kernel"].shape
    head = {"kernel": _HEAD_STDDEV * jax.random.normal(key, (hidden, classes), jnp.float32),
            "bias": jnp.zeros((classes,), jnp.float32)}
    return {"bert": dict(bert), "classifier": head}
