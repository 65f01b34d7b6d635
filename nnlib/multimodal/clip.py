"""CLIP: two towers trained so that matching images and texts point the same way.

Radford et al. 2021 ("Learning Transferable Visual Models From Natural
Language Supervision") train an image encoder and a text encoder *jointly*
from (image, caption) pairs. Each tower ends in a linear projection into one
shared space of size ``E``, and its output is L2-normalised, so the
similarity of an image and a text is a cosine. For a batch of ``N`` pairs the
``N x N`` matrix of cosines, times a learned scale ``exp(t)``, is read as
logits twice: each image must pick out its own caption among the ``N``
captions (softmax over a row), and each caption its own image (softmax over a
column). The loss, symmetric InfoNCE (van den Oord et al. 2018), is the mean
of the two cross-entropies::

    logits = exp(t) * I @ T^T                            # [N, N]
    loss   = (CE(logits, arange N) + CE(logits^T, arange N)) / 2

Every other pair in the batch serves as a negative, so nothing but the pairing
is supervised: no class labels.

The temperature. Cosines live in ``[-1, 1]``, so a softmax over them is
almost uniform; the learnable log scale ``t`` (initialised to
``log(1 / 0.07)``, scale ~14.3) lets the model sharpen it. Radford et al.
clip the scale at 100 "to prevent scaling the logits by more than 100, which
we found necessary to prevent training instability". Here the clip is applied
twice: in the forward pass (``min(t, log 100)``, so the scale in use never
exceeds 100) and, after each optimizer update, on the parameter itself
(``clamp_log_scale``, the paper's practice, so it cannot drift above the clip
where it would get no gradient).

Zero-shot classification. A class is a text: embed several prompts for it
("a handwritten seven", "the digit 7"), average the unit vectors and
renormalise (prompt ensembling, Radford et al. sec. 3.1.4), and classify an
image by the class embedding with the highest cosine. No classifier is
trained; the prompts are the classifier's weights.

Towers. ``ImageEncoder``: for 8x8 digits, conv blocks (``ConvBlock2D``, as
``nnlib.models.CNN``) or just pixels, then an MLP. ``TextEncoder``: token and
learned position embeddings, a pre-LN ``TransformerEncoder`` (bidirectional,
padding masked), pooled by the mean over real tokens or by the state at the
``[EOS]`` token (CLIP's choice, with a causal text transformer).

Shapes: ``B`` batch, ``H x W x C`` images, ``T`` text positions, ``D`` tower
width, ``E`` shared embedding size, ``C`` classes, ``P`` prompts per class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from nnlib.layers import (
    MLP,
    ConvBlock2D,
    Dense,
    Dropout,
    Flatten,
    LearnedPositionalEmbedding,
    TransformerEncoder,
    l2_normalize,
)
from nnlib.layers._checks import ShapeError, check_input

INIT_LOG_SCALE = math.log(1 / 0.07)  # Radford et al. 2021: temperature 0.07
MAX_LOG_SCALE = math.log(100.0)  # ... and the scale clipped at 100
_MASKED = -1e9  # logit of a padding column: exp() underflows to exactly 0


class ImageEncoder(nn.Module):
    """Images to features: ``[conv block] * k -> flatten -> MLP``.

    Attributes:
      features: output channels of each ``ConvBlock2D`` (3x3 conv, ReLU,
        2x2 max-pool); ``()`` makes it an MLP on the raw pixels.
      hidden_sizes: widths of the MLP after flattening; the last is ``D``.
      dropout_rate: dropout after each MLP layer (``train=True``).

    Shapes: ``images: [B, H, W, C] -> features [B, D]``.
    """

    features: Sequence[int] = (32, 64)
    hidden_sizes: Sequence[int] = (128,)
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, images: Float[Array, "batch height width channels"], *,
                 train: bool = False) -> Float[Array, "batch width"]:
        check_input("ImageEncoder", images, layout="[batch, height, width, channels]", ndim=4,
                    name="images")
        x = images
        for i, width in enumerate(self.features):
            x = ConvBlock2D(width, pooling="max", name=f"block_{i}")(x, train=train)
        x = Flatten()(x)  # [B, h * w * c]
        return MLP(self.hidden_sizes, dropout_rate=self.dropout_rate, name="mlp")(
            x, train=train)  # [B, D]


class TextEncoder(nn.Module):
    """Token ids to one feature vector per text: a Transformer encoder, pooled.

    Attributes:
      vocab_size: ids are in ``[0, vocab_size)``.
      max_len: longest text in tokens (learned positions).
      width: ``D``, the residual stream.
      num_layers, num_heads, mlp_dim: of the ``TransformerEncoder``.
      pooling: ``"mean"`` over the real (non-pad) tokens, or ``"eos"``: the
        final state at the first ``eos_id`` token (CLIP).
      pad_id: padding id (never attended to, never pooled).
      eos_id: end-of-text id, needed by ``pooling="eos"``.
      dropout_rate: on the embeddings and the residual branches.

    Shapes: ``tokens: [B, T] int -> features [B, D]``.
    """

    vocab_size: int
    max_len: int
    width: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    pooling: str = "mean"
    pad_id: int = 0
    eos_id: int | None = None
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, tokens: Int[Array, "batch time"], *, train: bool = False
                 ) -> Float[Array, "batch width"]:
        name = "TextEncoder"
        if self.pooling not in ("mean", "eos"):
            raise ValueError(f"{name} got pooling={self.pooling!r}; expected 'mean' or 'eos'")
        if self.pooling == "eos" and self.eos_id is None:
            raise ValueError(f"{name}: pooling='eos' needs eos_id")
        check_input(name, tokens, layout="[batch, time]", ndim=2, floating=False,
                    name="tokens")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"{name} expected integer token ids [batch, time], got dtype "
                            f"{tokens.dtype}")
        if tokens.shape[1] > self.max_len:
            raise ShapeError(f"{name} was built for at most max_len={self.max_len} tokens, "
                             f"got tokens of shape {tuple(tokens.shape)}")
        valid = tokens != self.pad_id  # [B, T]
        x = nn.Embed(self.vocab_size, self.width,
                     embedding_init=nn.initializers.normal(stddev=0.02),
                     name="token_embedding")(tokens)  # [B, T, D]
        x = LearnedPositionalEmbedding(self.max_len, name="position_embedding")(x)
        x = Dropout(self.dropout_rate)(x, train=train)
        x = TransformerEncoder(self.num_layers, self.num_heads, self.mlp_dim,
                               dropout_rate=self.dropout_rate, name="encoder")(
            x, key_padding_mask=valid, train=train)  # [B, T, D]
        if self.pooling == "eos":
            at = jnp.argmax(tokens == self.eos_id, axis=1)  # [B] first [EOS]
            return jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0]  # [B, D]
        weights = valid.astype(x.dtype)[..., None]  # [B, T, 1]
        return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


class CLIP(nn.Module):
    """Image and text towers projected into one space of unit vectors.

    Attributes:
      vocab_size, max_len: of the tokenized texts.
      embed_dim: ``E``, size of the shared space.
      image_features, image_hidden: ``ImageEncoder``'s conv channels (``()``
        for an MLP on pixels) and MLP widths.
      text_width, text_layers, text_heads, text_mlp_dim, text_pooling,
      pad_id, eos_id: the ``TextEncoder``.
      dropout_rate: in both towers (``train=True``).
      init_log_scale: initial log logit scale ``t`` (``log(1/0.07)``).
      max_log_scale: the clip on ``t`` (``log 100``).

    Parameters: ``image_encoder``, ``image_projection/kernel [D_img, E]``,
    ``text_encoder``, ``text_projection/kernel [D_txt, E]`` (no biases:
    CLIP's projections are plain matrices), ``log_scale []``.

    ``__call__({"images": [B, H, W, C], "tokens": [B, T]}, *, train=False)``
    returns ``{"image_embeddings": [B, E], "text_embeddings": [B, E],
    "log_scale": []}`` (unit rows; the clipped ``t``). ``encode_image``,
    ``encode_text`` and ``logit_scale`` are usable with
    ``model.apply(variables, x, method=...)``.
    """

    vocab_size: int
    max_len: int
    embed_dim: int = 64
    image_features: Sequence[int] = (32, 64)
    image_hidden: Sequence[int] = (128,)
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_mlp_dim: int = 128
    text_pooling: str = "mean"
    pad_id: int = 0
    eos_id: int | None = None
    dropout_rate: float = 0.0
    init_log_scale: float = INIT_LOG_SCALE
    max_log_scale: float = MAX_LOG_SCALE

    def setup(self) -> None:
        self.image_encoder = ImageEncoder(self.image_features, self.image_hidden,
                                          self.dropout_rate)
        self.text_encoder = TextEncoder(
            self.vocab_size, self.max_len, self.text_width, self.text_layers,
            self.text_heads, self.text_mlp_dim, self.text_pooling, self.pad_id,
            self.eos_id, self.dropout_rate)
        self.image_projection = Dense(self.embed_dim, use_bias=False)
        self.text_projection = Dense(self.embed_dim, use_bias=False)
        self.log_scale = self.param(
            "log_scale", nn.initializers.constant(self.init_log_scale), (), jnp.float32)

    def encode_image(self, images: Float[Array, "batch height width channels"], *,
                     train: bool = False) -> Float[Array, "batch embed"]:
        """Unit image embeddings ``[B, E]``."""
        return l2_normalize(self.image_projection(self.image_encoder(images, train=train)))

    def encode_text(self, tokens: Int[Array, "batch time"], *, train: bool = False
                    ) -> Float[Array, "batch embed"]:
        """Unit text embeddings ``[B, E]``."""
        return l2_normalize(self.text_projection(self.text_encoder(tokens, train=train)))

    def logit_scale(self) -> Float[Array, ""]:
        """The clipped log scale ``min(t, max_log_scale)``; logits are
        ``exp(.) * cosine``."""
        return jnp.minimum(self.log_scale, self.max_log_scale)

    def __call__(self, inputs: Mapping[str, Array], *, train: bool = False
                 ) -> dict[str, Array]:
        if not isinstance(inputs, Mapping) or not {"images", "tokens"} <= set(inputs):
            got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise TypeError(f"CLIP expected inputs {{'images': [B, H, W, C], 'tokens': "
                            f"[B, T]}}, got {got}")
        images, tokens = inputs["images"], inputs["tokens"]
        if images.shape[0] != tokens.shape[0]:
            raise ShapeError(f"CLIP expects one caption per image, got {images.shape[0]} "
                             f"images and {tokens.shape[0]} token rows")
        return {"image_embeddings": self.encode_image(images, train=train),
                "text_embeddings": self.encode_text(tokens, train=train),
                "log_scale": self.logit_scale()}


def clamp_log_scale(params: Any, max_log_scale: float = MAX_LOG_SCALE) -> Any:
    """``params`` with ``log_scale`` clipped to ``<= max_log_scale``: apply after
    each update, as Radford et al. clamp the parameter."""
    return {**params, "log_scale": jnp.minimum(params["log_scale"], max_log_scale)}


# --- the loss ---------------------------------------------------------------------


def clip_loss(
    image_embeddings: Float[Array, "batch embed"],
    text_embeddings: Float[Array, "batch embed"],
    log_scale: Float[Array, ""] | float,
    *,
    mask: Bool[Array, " batch"] | None = None,
) -> Float[Array, ""]:
    """Symmetric InfoNCE: pair ``i`` is the positive of row and column ``i``.

    Args:
      image_embeddings, text_embeddings: ``[B, E]``, row ``i`` of each a pair;
        normally unit vectors (not renormalised here).
      log_scale: ``t``; logits are ``exp(t) * image @ text^T``.
      mask: ``[B]``, False for padding rows: they are neither scored nor used
        as negatives.

    Returns:
      ``(mean_i CE(row i) + mean_i CE(column i)) / 2``, a scalar; ``log B`` when
      all similarities are equal, near 0 when each pair is far more similar
      than any mismatch.
    """
    fn = "clip_loss"
    for name, x in (("image_embeddings", image_embeddings), ("text_embeddings",
                                                            text_embeddings)):
        check_input(fn, x, layout="[batch, embed]", ndim=2, name=name)
    if image_embeddings.shape != text_embeddings.shape:
        raise ShapeError(f"{fn} expected image and text embeddings of the same shape "
                         f"[batch, embed], got {tuple(image_embeddings.shape)} and "
                         f"{tuple(text_embeddings.shape)}")
    n = image_embeddings.shape[0]
    logits = jnp.exp(log_scale) * image_embeddings @ text_embeddings.T  # [B, B]
    labels = jnp.arange(n)
    logits_t = logits.T  # [B texts, B images]
    if mask is None:
        weights = jnp.ones((n,), logits.dtype)
    else:
        weights = jnp.asarray(mask).astype(logits.dtype)  # [B]
        # Padding texts must not be negatives of an image, nor padding images
        # of a text: mask the columns of both directions. A large finite value,
        # not -inf: a padding row's own target would be -inf, its loss inf, and
        # inf * 0 in the backward pass is NaN.
        keep = weights[None, :] > 0  # [1, B]
        logits = jnp.where(keep, logits, _MASKED)
        logits_t = jnp.where(keep, logits_t, _MASKED)
    per_image = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [B]
    per_text = optax.softmax_cross_entropy_with_integer_labels(logits_t, labels)  # [B]
    count = jnp.maximum(jnp.sum(weights), 1.0)
    return (jnp.sum(per_image * weights) + jnp.sum(per_text * weights)) / (2 * count)


def clip_loss_fn():
    """``(outputs, batch) -> (loss, metrics)`` for ``nnlib.train.make_train_step``:
    ``clip_loss`` on a ``CLIP`` call's outputs, with the batch's ``"mask"``.

    Metrics: ``loss``, ``logit_scale`` (``exp(t)``) and ``accuracy``: the
    fraction of images whose own caption is the best match in the batch.
    """

    def loss_fn(outputs: Mapping[str, Array], batch: Mapping[str, Array]):
        img, txt = outputs["image_embeddings"], outputs["text_embeddings"]
        mask = batch.get("mask")
        loss = clip_loss(img, txt, outputs["log_scale"], mask=mask)
        sim = img @ txt.T  # [B, B]
        if mask is not None:
            sim = jnp.where(jnp.asarray(mask)[None, :] > 0, sim, -jnp.inf)
            weights = jnp.asarray(mask, jnp.float32)
        else:
            weights = jnp.ones((img.shape[0],), jnp.float32)
        hit = (jnp.argmax(sim, axis=1) == jnp.arange(img.shape[0])).astype(jnp.float32)
        accuracy = jnp.sum(hit * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        return loss, {"loss": loss, "logit_scale": jnp.exp(outputs["log_scale"]),
                      "accuracy": accuracy}

    return loss_fn


# --- zero-shot classification and retrieval ---------------------------------------------


def prompt_ensemble(
    prompt_embeddings: Float[Array, "prompts embed"],
    class_ids: Int[Array, " prompts"],
    num_classes: int,
) -> Float[Array, "classes embed"]:
    """Class embeddings from prompt embeddings: the mean of each class's unit
    prompt vectors, renormalised (Radford et al. 2021, sec. 3.1.4).

    Args:
      prompt_embeddings: ``[P, E]`` unit text embeddings of every prompt.
      class_ids: ``[P]`` the class each prompt names, in ``[0, C)``.
      num_classes: ``C``; every class needs at least one prompt.

    Returns:
      ``[C, E]`` unit vectors.
    """
    check_input("prompt_ensemble", prompt_embeddings, layout="[prompts, embed]", ndim=2,
                name="prompt_embeddings")
    if isinstance(class_ids, np.ndarray):  # known now: check that no class is empty
        counts = np.bincount(class_ids, minlength=num_classes)
        if len(counts) > num_classes or np.any(counts[:num_classes] == 0):
            raise ShapeError(f"prompt_ensemble needs at least one prompt per class in "
                             f"[0, {num_classes}), got prompts per class {counts.tolist()}")
    sums = jax.ops.segment_sum(prompt_embeddings, jnp.asarray(class_ids),
                               num_segments=num_classes)  # [C, E]
    return l2_normalize(sums)  # the mean's direction is the sum's


def zero_shot_classifier(
    model: CLIP,
    variables: Mapping[str, Any],
    prompt_tokens: Int[Array, "classes prompts time"] | Sequence[Int[Array, "prompts time"]],
) -> Float[Array, "classes embed"]:
    """Class embeddings from text prompts, with prompt ensembling.

    Args:
      model, variables: a trained ``CLIP``.
      prompt_tokens: for each class, the token ids of its prompts: an array
        ``[C, P, T]``, or a list of ``C`` arrays ``[P_c, T]`` (classes may have
        different numbers of prompts).

    Returns:
      ``[C, E]`` unit vectors: each class's mean prompt embedding,
      renormalised (``prompt_ensemble``). Logits for images are
      ``image_embeddings @ result.T`` (times the logit scale, which does not
      change the argmax).
    """
    groups = [jnp.asarray(g) for g in prompt_tokens]
    if not groups or any(g.ndim != 2 or g.shape[0] == 0 for g in groups):
        raise ShapeError("zero_shot_classifier expected, per class, prompt token ids "
                         f"[prompts, time] with at least one prompt, got shapes "
                         f"{[tuple(g.shape) for g in groups]}")
    flat = jnp.concatenate(groups, axis=0)  # [sum P_c, T]
    emb = model.apply(variables, flat, method=CLIP.encode_text)  # [sum P_c, E]
    class_ids = np.repeat(np.arange(len(groups)), [g.shape[0] for g in groups])
    return prompt_ensemble(emb, class_ids, len(groups))


def zero_shot_predict(
    image_embeddings: Float[Array, "batch embed"],
    class_embeddings: Float[Array, "classes embed"],
) -> Int[Array, " batch"]:
    """The class whose embedding has the highest cosine with each image."""
    return jnp.argmax(image_embeddings @ class_embeddings.T, axis=-1)


def retrieval_recall_at_k(
    similarity: Float[Array, "queries items"],
    k: int | Sequence[int],
    relevant: Bool[Array, "queries items"] | None = None,
) -> Float[Array, "*ks"]:
    """Recall@k: the fraction of queries with a relevant item among their top k.

    Args:
      similarity: ``[Q, N]`` scores of every item for every query (image->text:
        rows are images; text->image: pass ``similarity.T``).
      k: one ``k`` or several.
      relevant: ``[Q, N]``, True where item ``j`` answers query ``i``; default
        the identity (query ``i``'s own pair is item ``i``, ``Q == N``).

    The rank of a query's answer is the number of *irrelevant* items scoring at
    least as high as its best relevant item (ties count against the query:
    identical captions of other images do not make a retrieval correct).

    Returns:
      A scalar for one ``k``, ``[len(k)]`` for several.
    """
    fn = "retrieval_recall_at_k"
    check_input(fn, similarity, layout="[queries, items]", ndim=2, name="similarity")
    q, n = similarity.shape
    if relevant is None:
        if q != n:
            raise ShapeError(f"{fn}: with no relevant mask, query i's answer is item i, so "
                             f"similarity must be square; got shape {(q, n)}")
        relevant = jnp.eye(n, dtype=bool)
    relevant = jnp.asarray(relevant, bool)
    if relevant.shape != (q, n):
        raise ShapeError(f"{fn} expected relevant of shape [queries, items] = {(q, n)}, "
                         f"got {tuple(relevant.shape)}")
    best = jnp.max(jnp.where(relevant, similarity, -jnp.inf), axis=1, keepdims=True)  # [Q, 1]
    rank = jnp.sum((similarity >= best) & ~relevant, axis=1)  # [Q]
    answerable = jnp.any(relevant, axis=1)  # queries with no answer never count
    ks = np.atleast_1d(np.asarray(k))  # static: k is a Python int or list
    if ks.size == 0 or not np.issubdtype(ks.dtype, np.integer) or np.any(ks < 1):
        raise ValueError(f"{fn}: k must be integers >= 1, got {k!r}")
    hit = (rank[None, :] < jnp.asarray(ks)[:, None]) & answerable[None, :]  # [K, Q]
    recall = jnp.mean(hit.astype(jnp.float32), axis=1)
    return recall[0] if np.ndim(k) == 0 else recall


def chance_recall_at_k(
    relevant: Bool[Any, "queries items"], k: int | Sequence[int]
) -> Float[Any, "*ks"]:
    """Expected recall@k of a ranking drawn uniformly at random: for a query with
    ``r`` relevant items out of ``N``, ``1 - C(N - r, k) / C(N, k)``, averaged."""
    relevant = np.asarray(relevant, bool)
    n = relevant.shape[1]
    r = relevant.sum(axis=1)  # [Q]
    ks = np.atleast_1d(np.asarray(k))
    out = []
    for kk in ks:
        # C(N - r, k) / C(N, k) = prod_{i<k} (N - r - i) / (N - i), 0 once N - r - i <= 0
        # k > N lists every item (recall 1, as retrieval_recall_at_k); past N
        # the product's denominators would reach 0.
        i = np.arange(min(int(kk), n))[None, :]  # [1, k]
        miss = np.prod(np.clip(n - r[:, None] - i, 0, None) / (n - i), axis=1)  # [Q]
        out.append(float(np.mean(np.where(r > 0, 1.0 - miss, 0.0))))
    out = np.array(out)
    return out[0] if np.ndim(k) == 0 else out


def similarity_matrix(
    image_embeddings: Float[Array, "n embed"], text_embeddings: Float[Array, "m embed"]
) -> Float[Array, "n m"]:
    """Cosines of every image with every text (unit embeddings in)."""
    return image_embeddings @ text_embeddings.T


__all__ = [
    "CLIP",
    "INIT_LOG_SCALE",
    "MAX_LOG_SCALE",
    "ImageEncoder",
    "TextEncoder",
    "chance_recall_at_k",
    "clamp_log_scale",
    "clip_loss",
    "clip_loss_fn",
    "l2_normalize",
    "prompt_ensemble",
    "retrieval_recall_at_k",
    "similarity_matrix",
    "zero_shot_classifier",
    "zero_shot_predict",
]
