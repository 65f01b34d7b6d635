"""Tasks: a config's ``dataset`` name -> arrays, loss and metadata.

Each builder returns a ``Task`` whose splits are plain dicts of equally long
numpy arrays that ``nnlib.data.batch_iterator`` cuts into batches. Most tasks
store ``{"inputs", "labels"}`` and are batched as they are. Two hooks cover
the rest, so ``experiments/train.py`` stays generic:

* ``prepare(batch, seed) -> batch`` turns a stored batch into the one the
  model and loss read. Sequence-to-sequence stores ``source`` and
  ``target_in`` side by side (``batch_iterator`` takes flat arrays only) and
  ``prepare`` nests them as ``inputs = {"source", "target_in"}``; masked LM
  stores clean text and ``prepare`` masks it afresh for every batch (dynamic
  masking, RoBERTa), seeded by ``seed`` so a resumed run sees the same masks.
* ``evaluate(model, params, data, batch_size) -> {name: value}`` measures what
  the loss cannot: exact-match accuracy of greedy decoding for seq2seq.

Everything here composes ``nnlib.data``; nothing is downloaded.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_collections
import numpy as np

from nnlib.data.images import load_digits
from nnlib.data.sequences import BOS, EOS, PAD, addition_task, images_as_sequences
from nnlib.data.text import (
    mlm_mask,
    next_token_windows,
    python_stdlib_corpus,
    split_text,
    tiny_shakespeare,
)
from nnlib.data.tokenizers import BERT_SPECIAL_TOKENS, CharTokenizer
from nnlib.train import classification_loss

Arrays = dict[str, np.ndarray]


@dataclass
class Task:
    """What an experiment trains and evaluates on.

    Attributes:
      train, val, test: ``{name: [n, ...]}`` numpy arrays (``test`` may be
        ``None``); ``labels`` is always present.
      loss_fn: ``(outputs, batch) -> (loss, metrics)``.
      num_classes: size of the output layer (the vocabulary for token models).
      info: ``dataset`` name, and ``tokenizer``/``vocab_size`` for text.
      prepare: ``(batch, seed: Sequence[int]) -> batch`` applied to every
        batch ``batch_iterator`` yields; ``None`` uses the batch as stored.
      evaluate: ``(model, params, data, batch_size) -> {name: float}``,
        extra metrics computed after training on each split.
    """

    train: Arrays
    val: Arrays
    test: Arrays | None
    loss_fn: Any
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[Arrays, Sequence[int]], dict[str, Any]] | None = None
    evaluate: Callable[[Any, Any, Arrays, int], dict[str, float]] | None = None


def _digits(config: ml_collections.ConfigDict, layout: str) -> Task:
    ds = load_digits(seed=config.get("data_seed", 0), flatten=layout == "flat")
    splits = ds.splits
    if layout == "rows":  # [n, 8, 8, 1] -> [n, 8, 8]: eight time steps of eight pixels
        splits = {s: {**d, "inputs": images_as_sequences(d["inputs"])} for s, d in splits.items()}
    return Task(splits["train"], splits["val"], splits["test"],
                classification_loss(config.get("label_smoothing", 0.0)), 10,
                {"dataset": f"digits ({layout})"})


def _corpus_text(config: ml_collections.ConfigDict) -> str:
    if config.dataset in ("shakespeare_char", "shakespeare_mlm"):
        path = config.get("data_path") or os.environ.get("NNLIB_TINYSHAKESPEARE") or None
        text = tiny_shakespeare(path)
        max_chars = config.get("max_chars", None)
        return text[:max_chars] if max_chars else text
    return python_stdlib_corpus(max_chars=config.get("max_chars", 2_000_000))


def _char_corpus(config: ml_collections.ConfigDict) -> Task:
    text = _corpus_text(config)
    tokenizer = CharTokenizer.fit(text)
    train_text, val_text = split_text(text, 0.1)
    context = config.model.context_length
    # Training windows start at every `train_stride`-th token (stride 1 sees
    # every context, as nanoGPT's random sampling does in expectation);
    # validation windows do not overlap, so each token is scored once.
    train_x, train_y = next_token_windows(tokenizer.encode(train_text), context,
                                          stride=config.get("train_stride", 1))
    val_x, val_y = next_token_windows(tokenizer.encode(val_text), context)
    max_val = config.get("max_val_windows", None)
    if max_val:
        val_x, val_y = val_x[:max_val], val_y[:max_val]
    return Task({"inputs": train_x, "labels": train_y}, {"inputs": val_x, "labels": val_y},
                None, classification_loss(), tokenizer.vocab_size,
                {"dataset": config.dataset, "tokenizer": tokenizer,
                 "vocab_size": tokenizer.vocab_size})


# --- sequence to sequence: addition ------------------------------------------------


def _nest_seq2seq(batch: Arrays, seed: Sequence[int]) -> dict[str, Any]:
    """``{source, target_in, labels, label_mask, mask}`` -> the model's nested inputs."""
    del seed
    rest = {k: v for k, v in batch.items() if k not in ("source", "target_in")}
    return {"inputs": {"source": batch["source"], "target_in": batch["target_in"]}, **rest}


def _greedy_exact_match(model, params, data: Arrays, batch_size: int) -> dict[str, float]:
    """Share of examples whose greedily decoded target equals ``labels`` token for token.

    The labels are the sum's digits then EOS, so a match means the right
    answer *and* stopping in the right place.
    """
    target_len = data["labels"].shape[1]
    correct = 0
    for start in range(0, len(data["labels"]), batch_size):
        source = data["source"][start:start + batch_size]  # [B, S]
        decoded = np.asarray(model.greedy_decode(params, source, target_len, BOS, EOS))
        correct += int(np.all(decoded == data["labels"][start:start + batch_size], axis=1).sum())
    return {"exact_match": correct / len(data["labels"])}


def _addition_seq2seq(config: ml_collections.ConfigDict) -> Task:
    """``a + b`` -> ``c`` with an encoder-decoder; splits hold distinct ``(a, b)`` pairs."""
    sizes = {s: config.get(f"num_{s}") for s in ("train", "val", "test")}
    wanted = sum(sizes.values())
    num_digits = config.num_digits
    if wanted > 10 ** (2 * num_digits) // 2:
        raise ValueError(
            f"addition_seq2seq: {wanted} examples is too many distinct pairs for "
            f"{num_digits}-digit operands ({10 ** (2 * num_digits)} exist); lower "
            "num_train/num_val/num_test")
    # Draw extra pairs, keep the first occurrence of each, so that no test
    # pair (a, b) was seen in training (its mirror (b, a) may have been: the
    # held-out unit is the ordered pair, not the sum).
    drawn = addition_task(int(wanted * 1.2) + 64, num_digits, form="seq2seq",
                          reverse_answer=config.get("reverse_answer", False),
                          seed=config.get("data_seed", 0))
    _, first = np.unique(drawn["inputs"], axis=0, return_index=True)
    keep = np.sort(first)[:wanted]
    if len(keep) < wanted:
        raise ValueError(f"addition_seq2seq: only {len(keep)} distinct pairs drawn, "
                         f"{wanted} needed; lower the split sizes")
    labels = drawn["labels"][keep]
    arrays = {"source": drawn["inputs"][keep], "target_in": drawn["decoder_inputs"][keep],
              "labels": labels, "label_mask": (labels != PAD).astype(np.float32)}
    bounds = np.cumsum([0, sizes["train"], sizes["val"], sizes["test"]])
    splits = [{k: v[lo:hi] for k, v in arrays.items()} for lo, hi in itertools.pairwise(bounds)]
    return Task(*splits, classification_loss(config.get("label_smoothing", 0.0)),
                drawn.vocab_size,
                {"dataset": f"addition ({num_digits} digits, seq2seq)",
                 "vocab_size": drawn.vocab_size, "layout": drawn.layout},
                prepare=_nest_seq2seq, evaluate=_greedy_exact_match)


# --- masked language modelling (BERT) --------------------------------------------


def _mlm_loss(outputs, batch):
    """Cross-entropy on the chosen positions only; accuracy there is the MLM accuracy."""
    loss, metrics = classification_loss()(outputs, batch)
    return loss, {"loss": loss, "mlm_accuracy": metrics["accuracy"]}


def _shakespeare_mlm(config: ml_collections.ConfigDict) -> Task:
    """Tiny Shakespeare as ``[CLS] chars [SEP]`` rows, masked 15% per batch.

    Character tokens with BERT's five special tokens first (``[PAD]`` is 0):
    no tokenizer to train, and every row is full, so there is no padding.
    """
    text = _corpus_text(config)
    tokenizer = CharTokenizer.fit(text, special_tokens=BERT_SPECIAL_TOKENS)
    cls_id, sep_id, mask_id = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]"))
    body = config.seq_len - 2  # room for [CLS] and [SEP]

    def rows(part: str, stride: int) -> np.ndarray:
        windows, _ = next_token_windows(tokenizer.encode(part), body, stride=stride)
        n = len(windows)
        return np.concatenate([np.full((n, 1), cls_id, np.int32), windows,
                               np.full((n, 1), sep_id, np.int32)], axis=1)  # [n, max_len]

    train_text, val_text = split_text(text, 0.1)
    train = {"tokens": rows(train_text, config.get("train_stride", body))}
    val = {"tokens": rows(val_text, body)}
    max_val = config.get("max_val_windows", None)
    if max_val:
        val = {"tokens": val["tokens"][:max_val]}
    # batch_iterator and the loop need a "labels" array to count examples;
    # prepare replaces it with the masked-position labels.
    train["labels"], val["labels"] = train["tokens"], val["tokens"]
    specials = tokenizer.special_token_ids
    mask_prob = config.get("mask_prob", 0.15)

    def prepare(batch: Arrays, seed: Sequence[int]) -> dict[str, Any]:
        inputs, labels, weights = mlm_mask(
            batch["tokens"], list(seed), mask_token_id=mask_id,
            vocab_size=tokenizer.vocab_size, special_token_ids=specials, mask_prob=mask_prob)
        return {"inputs": inputs, "labels": labels, "label_mask": weights, "mask": batch["mask"]}

    return Task(train, val, None, _mlm_loss, tokenizer.vocab_size,
                {"dataset": config.dataset, "tokenizer": tokenizer,
                 "vocab_size": tokenizer.vocab_size},
                prepare=prepare)


def build_task(config: ml_collections.ConfigDict) -> Task:
    """The task named by ``config.dataset``."""
    builders = {
        "digits": lambda c: _digits(c, "image"),
        "digits_flat": lambda c: _digits(c, "flat"),
        "digits_rows": lambda c: _digits(c, "rows"),
        "shakespeare_char": _char_corpus,
        "python_code_char": _char_corpus,
        "addition_seq2seq": _addition_seq2seq,
        "shakespeare_mlm": _shakespeare_mlm,
    }
    if config.dataset not in builders:
        raise ValueError(f"unknown dataset {config.dataset!r}; known: {', '.join(builders)}")
    return builders[config.dataset](config)

