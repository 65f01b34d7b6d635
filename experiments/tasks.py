"""Tasks: a config's ``dataset`` name -> arrays, loss and metadata.

Each builder returns a ``Task`` whose splits are plain dicts of numpy arrays
(``{"inputs", "labels"}``) that ``nnlib.train.fit`` batches itself. Everything
here composes ``nnlib.data``; nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import ml_collections
import numpy as np

from nnlib.data.images import load_digits
from nnlib.data.sequences import images_as_sequences
from nnlib.data.text import next_token_windows, python_stdlib_corpus, split_text, tiny_shakespeare
from nnlib.data.tokenizers import CharTokenizer
from nnlib.train import classification_loss


@dataclass
class Task:
    """What an experiment trains and evaluates on."""

    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    test: dict[str, np.ndarray] | None
    loss_fn: Any
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)


def _digits(config: ml_collections.ConfigDict, layout: str) -> Task:
    ds = load_digits(seed=config.get("data_seed", 0), flatten=layout == "flat")
    splits = ds.splits
    if layout == "rows":  # [n, 8, 8, 1] -> [n, 8, 8]: eight time steps of eight pixels
        splits = {s: {**d, "inputs": images_as_sequences(d["inputs"])} for s, d in splits.items()}
    return Task(splits["train"], splits["val"], splits["test"],
                classification_loss(config.get("label_smoothing", 0.0)), 10,
                {"dataset": f"digits ({layout})"})


def _char_corpus(config: ml_collections.ConfigDict) -> Task:
    if config.dataset == "shakespeare_char":
        path = config.get("data_path") or os.environ.get("NNLIB_TINYSHAKESPEARE") or None
        text = tiny_shakespeare(path)
    else:
        text = python_stdlib_corpus(max_chars=config.get("max_chars", 2_000_000))
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


def build_task(config: ml_collections.ConfigDict) -> Task:
    """The task named by ``config.dataset``."""
    builders = {
        "digits": lambda c: _digits(c, "image"),
        "digits_flat": lambda c: _digits(c, "flat"),
        "digits_rows": lambda c: _digits(c, "rows"),
        "shakespeare_char": _char_corpus,
        "python_code_char": _char_corpus,
    }
    if config.dataset not in builders:
        raise ValueError(f"unknown dataset {config.dataset!r}; known: {', '.join(builders)}")
    return builders[config.dataset](config)
