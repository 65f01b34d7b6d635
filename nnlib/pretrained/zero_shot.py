"""Zero-shot classification: the label whose description is nearest in meaning.

With a sentence encoder, a class needs no training examples, only words: embed
a short description of each class ("asynchronous programming with event
loops and coroutines"), embed the text, and predict the class whose
description has the highest cosine similarity (Yin et al., 2019, frame it as
"dataless" classification; CLIP does the same with images). Several
descriptions per class are averaged (unit vectors, mean, renormalized: CLIP's
prompt ensembling). Accuracy then measures how well the encoder's notion of
similarity matches the task's labels, with no label seen in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import Float, Int

from nnlib.pretrained.minilm import Pretrained, encode


def label_embeddings(
    pretrained: Pretrained, descriptions: Sequence[str | Sequence[str]], **encode_kwargs: Any
) -> Float[np.ndarray, "classes hidden"]:
    """One unit vector per class: the normalized mean of its descriptions'
    embeddings. ``descriptions[c]`` is a string or a list of strings."""
    groups = [[d] if isinstance(d, str) else list(d) for d in descriptions]
    if not groups or any(not g for g in groups):
        raise ValueError("label_embeddings: every class needs at least one description, got "
                         f"{[len(g) for g in groups]} descriptions per class")
    flat = encode(pretrained, [d for g in groups for d in g], **encode_kwargs)
    bounds = np.cumsum([0] + [len(g) for g in groups])
    means = np.stack([flat[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return means / np.maximum(np.linalg.norm(means, axis=-1, keepdims=True), 1e-12)


def zero_shot_classify(
    pretrained: Pretrained,
    sentences: Sequence[str],
    descriptions: Sequence[str | Sequence[str]],
    **encode_kwargs: Any,
) -> tuple[Int[np.ndarray, " n"], Float[np.ndarray, "n classes"]]:
    """Predicts, for each sentence, the class with the most similar description.

    Args:
      pretrained: a sentence encoder from ``load_minilm``.
      sentences: ``n`` texts.
      descriptions: one entry per class: a description, or several.
      **encode_kwargs: passed to ``encode`` (``batch_size``, ``max_length``).

    Returns:
      ``(predictions int [n], similarities float32 [n, classes])``, the
      similarities being cosines in [-1, 1].
    """
    labels = label_embeddings(pretrained, descriptions, **encode_kwargs)  # [C, H]
    similarities = encode(pretrained, sentences, **encode_kwargs) @ labels.T  # [n, C]
    return np.argmax(similarities, axis=-1), similarities
