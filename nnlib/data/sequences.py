"""Sequence data: images read row by row, and synthetic algorithmic tasks.

``images_as_sequences`` turns ``[n, H, W, C]`` images into ``[n, H, W*C]``
sequences (one row per time step), the classic "sequential MNIST by rows"
input for recurrent models.

The synthetic tasks probe memory and algorithmic ability with labels known
exactly. Each returns a :class:`SequenceTask`: ``task.arrays`` is a dict of
int32 token arrays ready for ``nnlib.data.batching.batch_iterator``, plus the
vocabulary. Everything is a pure function of its arguments: the same ``seed``
gives the same examples on every machine (numpy ``default_rng(seed)``).

Masks. ``"label_mask"`` (float32, the labels' shape) is 1 where a label is
scored and 0 where it is filler. It is deliberately not called ``"mask"``: in
an nnlib batch ``"mask"`` is the per-example ``[batch]`` padding mask that
``batch_iterator`` adds. To score only the answer, multiply the two.

Token layouts (``L`` = ``length``, ``D`` = ``delay``, ``_`` = BLANK,
``>`` = GO, ``x1..xL`` = random symbols)::

  copy / reverse / sort     time: 2L + D + 1
    inputs      x1 .. xL  _ * D  >  _ * L
    labels      _ * (L + D + 1)     y1 .. yL     y = x, reversed(x) or sorted(x)
    label_mask  0 * (L + D + 1)     1 * L

  vocabulary: BLANK = 0, GO = 1, symbols 2 .. vocab_size - 1

  addition (N = num_digits; a, b uniform in [0, 10**N); c = a + b, N + 1 digits;
  every number zero-padded to its fixed width, most significant digit first,
  or c least significant first with reverse_answer=True)
    form="prompt":   inputs  a + b =             [2N + 2]
                     labels  c                   [N + 1]
    form="lm":       the string s = a + b = c    [3N + 3], next-token targets:
                     inputs  s[:-1], labels s[1:], label_mask 1 on the N + 1
                     labels that are digits of c
    form="seq2seq":  inputs          a + b       [2N + 1]   (encoder source)
                     decoder_inputs  BOS c       [N + 2]    (teacher forcing)
                     labels          c EOS       [N + 2]

  vocabulary: PAD = 0, BOS = 1, EOS = 2, PLUS = 3, EQUALS = 4,
              digit d = 5 + d (vocab_size 15)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from jaxtyping import Int, Shaped

# Copy / reverse / sort vocabulary.
BLANK, GO = 0, 1
_NUM_RECALL_SPECIALS = 2
# Addition vocabulary.
PAD, BOS, EOS, PLUS, EQUALS = 0, 1, 2, 3, 4
DIGIT_0 = 5
ADDITION_VOCAB_SIZE = DIGIT_0 + 10
_MAX_DIGITS = 18  # c = a + b < 2 * 10**18 still fits int64


@dataclass(frozen=True, eq=False)
class SequenceTask:
    """Token arrays of a synthetic task plus its vocabulary.

    Attributes:
      arrays: ``{"inputs": int32 [n, T_in], "labels": int32 [n, T_out], ...}``
        (see the module docstring for each task's layout); ``task["inputs"]``
        works too.
      vocab_size: number of token ids, i.e. the embedding table size.
      special_tokens: name -> id of the non-symbol tokens.
      layout: one line describing the token layout.
    """

    arrays: dict[str, np.ndarray]
    vocab_size: int
    special_tokens: dict[str, int] = field(default_factory=dict)
    layout: str = ""

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={v.shape}" for k, v in self.arrays.items())
        return f"SequenceTask({shapes}, vocab_size={self.vocab_size}, layout={self.layout!r})"


def _check_int(fn: str, name: str, value: int, minimum: int, maximum: int | None = None) -> None:
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if not ok or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{fn}: {name} must be an integer {bound}, got {value!r}")


def images_as_sequences(
    images: Shaped[np.ndarray, "n height width channels"],
) -> Shaped[np.ndarray, "n height width_channels"]:
    """``[n, H, W, C]`` -> ``[n, H, W*C]``: each image row is one time step.

    Works on numpy and jax arrays alike (a reshape, no copy for contiguous
    numpy input).
    """
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(
            "images_as_sequences expected images [n, height, width, channels], got shape "
            f"{shape}; add a channel axis to grayscale [n, H, W] images with images[..., None]")
    n, h, w, c = shape
    return images.reshape(n, h, w * c)  # [n, T=H, W*C]


# --- copy / reverse / sort -------------------------------------------------------


def _recall_task(fn: str, n: int, length: int, vocab_size: int, delay: int, seed: int,
                 answer) -> SequenceTask:
    _check_int(fn, "n", n, 1)
    _check_int(fn, "length", length, 1)
    _check_int(fn, "vocab_size", vocab_size, _NUM_RECALL_SPECIALS + 1)
    _check_int(fn, "delay", delay, 0)
    rng = np.random.default_rng(seed)
    symbols = rng.integers(_NUM_RECALL_SPECIALS, vocab_size, size=(n, length))  # [n, L]
    go = length + delay  # position of the GO marker; answers follow it
    time = go + 1 + length
    inputs = np.full((n, time), BLANK, np.int32)
    inputs[:, :length] = symbols
    inputs[:, go] = GO
    labels = np.full((n, time), BLANK, np.int32)
    labels[:, go + 1:] = answer(symbols)
    label_mask = np.zeros((n, time), np.float32)
    label_mask[:, go + 1:] = 1.0
    layout = (f"inputs: {length} symbols, {delay} blanks, GO, {length} blanks; labels: blanks "
              f"then the {length} answer symbols after GO")
    return SequenceTask(arrays={"inputs": inputs, "labels": labels, "label_mask": label_mask},
                        vocab_size=vocab_size, special_tokens={"blank": BLANK, "go": GO},
                        layout=layout)


def copy_task(n: int, length: int, vocab_size: int, *, delay: int = 0, seed: int = 0
              ) -> SequenceTask:
    """Recall ``length`` random symbols, in order, after ``delay`` blank steps and GO.

    Args:
      n: number of examples.
      length: symbols to remember (L).
      vocab_size: total token ids including BLANK=0 and GO=1 (>= 3); the
        symbols are drawn uniformly from ``[2, vocab_size)``.
      delay: blank steps between the symbols and GO (D; the memory span).
      seed: fixes the symbols.

    Returns:
      ``inputs``, ``labels`` int32 ``[n, 2L + D + 1]``, ``label_mask`` float32.
    """
    return _recall_task("copy_task", n, length, vocab_size, delay, seed, lambda s: s)


def reverse_task(n: int, length: int, vocab_size: int, *, delay: int = 0, seed: int = 0
                 ) -> SequenceTask:
    """As :func:`copy_task`, but the answer is the symbols in reverse order."""
    return _recall_task("reverse_task", n, length, vocab_size, delay, seed,
                        lambda s: s[:, ::-1])


def sort_task(n: int, length: int, vocab_size: int, *, delay: int = 0, seed: int = 0
              ) -> SequenceTask:
    """As :func:`copy_task`, but the answer is the symbols sorted ascending by id."""
    return _recall_task("sort_task", n, length, vocab_size, delay, seed,
                        lambda s: np.sort(s, axis=1))


# --- multi-digit addition ---------------------------------------------------------


def encode_number(values: Int[np.ndarray, " n"], width: int, *, reverse: bool = False
                  ) -> Int[np.ndarray, "n width"]:
    """Non-negative integers -> zero-padded digit tokens ``[n, width]`` (int32).

    Most significant digit first, or least significant first with
    ``reverse=True``. Raises if a value needs more than ``width`` digits.
    """
    fn = "encode_number"
    _check_int(fn, "width", width, 1, _MAX_DIGITS + 1)
    values = np.asarray(values, dtype=np.int64)
    if values.size and (values.min() < 0 or int(values.max()) >= 10**width):
        raise ValueError(f"{fn}: values must be in [0, 10**{width}) to fit {width} digits, got "
                         f"range [{values.min()}, {values.max()}]")
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)  # [width], most significant first
    digits = (values[..., None] // powers) % 10  # [..., width]
    if reverse:
        digits = digits[..., ::-1]
    return (digits + DIGIT_0).astype(np.int32)


def decode_number(tokens: Int[np.ndarray, "*batch width"], *, reverse: bool = False
                  ) -> Int[np.ndarray, "*batch"]:
    """Digit tokens ``[..., width]`` -> int64 values ``[...]``.

    Reads each row's digit tokens in order (most significant first, or least
    significant first with ``reverse=True``): BOS and PAD are skipped and
    reading stops at the first EOS, so a decoder's raw output decodes as is.
    A row without digits decodes to -1 (never a valid sum).

    Raises:
      ValueError: a PLUS/EQUALS/unknown token before EOS, or a number too
        large for int64 (any sum of two 18-digit operands fits).
    """
    fn = "decode_number"
    tokens = np.asarray(tokens)
    if tokens.ndim < 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{fn} expected integer tokens [..., width], got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    before_eos = np.cumsum(tokens == EOS, axis=-1) == 0
    is_digit = (tokens >= DIGIT_0) & (tokens < DIGIT_0 + 10)
    bad = before_eos & ~is_digit & (tokens != BOS) & (tokens != PAD)
    if bad.any():
        raise ValueError(f"{fn}: expected digit tokens {DIGIT_0}..{DIGIT_0 + 9} (with optional "
                         f"BOS={BOS}, PAD={PAD}, EOS={EOS}), got token "
                         f"{tokens[bad][0]} at index {tuple(int(i) for i in np.argwhere(bad)[0])}")
    keep = before_eos & is_digit
    count = keep.sum(axis=-1)
    if count.size and count.max() > _MAX_DIGITS + 1:
        raise ValueError(f"{fn}: at most {_MAX_DIGITS + 1} digits fit int64, got {count.max()}")
    # Place value of each kept digit: how many kept digits follow it (or precede it, reversed).
    if reverse:
        place = np.cumsum(keep, axis=-1) - 1
    else:
        place = np.cumsum(keep[..., ::-1], axis=-1)[..., ::-1] - 1
    # uint64 holds any 19-digit number; int64 (the result) only those below 2**63.
    digit = np.where(keep, tokens - DIGIT_0, 0).astype(np.uint64)
    value = np.sum(digit * np.uint64(10) ** np.where(keep, place, 0).astype(np.uint64), axis=-1,
                   dtype=np.uint64)
    too_big = value > np.uint64(np.iinfo(np.int64).max)
    if np.any(too_big):
        raise ValueError(f"{fn}: the number {int(value[too_big].flat[0])} does not fit int64")
    return np.where(count > 0, value.astype(np.int64), -1)


def addition_task(
    n: int,
    num_digits: int,
    *,
    form: str = "prompt",
    reverse_answer: bool = False,
    seed: int = 0,
) -> SequenceTask:
    """``a + b = c`` for random ``num_digits``-digit operands, as tokens.

    Args:
      n: number of examples.
      num_digits: digits per operand (N, 1..18); the sum has N + 1 digits.
      form: ``"prompt"`` (prompt -> answer), ``"lm"`` (next-token prediction
        over the whole string) or ``"seq2seq"`` (source, decoder_inputs,
        labels with BOS/EOS); see the module docstring for the layouts.
      reverse_answer: write c least significant digit first, the order a
        carry is computed in (easier for left-to-right models).
      seed: fixes the operands.

    Returns:
      A :class:`SequenceTask` with ``vocab_size=15``; :func:`decode_number`
      turns answer tokens back into integers.
    """
    fn = "addition_task"
    _check_int(fn, "n", n, 1)
    _check_int(fn, "num_digits", num_digits, 1, _MAX_DIGITS)
    forms = ("prompt", "lm", "seq2seq")
    if form not in forms:
        raise ValueError(f"{fn}: form must be one of {forms}, got {form!r}")
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 10**num_digits, size=(2, n), dtype=np.int64)  # [n] each
    a_tok, b_tok = encode_number(a, num_digits), encode_number(b, num_digits)  # [n, N]
    c_tok = encode_number(a + b, num_digits + 1, reverse=reverse_answer)  # [n, N + 1]
    column = lambda token: np.full((n, 1), token, np.int32)
    if form == "prompt":
        arrays = {"inputs": np.concatenate([a_tok, column(PLUS), b_tok, column(EQUALS)], 1),
                  "labels": c_tok}
    elif form == "lm":
        s = np.concatenate([a_tok, column(PLUS), b_tok, column(EQUALS), c_tok], 1)  # [n, 3N+3]
        label_mask = np.zeros((n, s.shape[1] - 1), np.float32)
        label_mask[:, 2 * num_digits + 1:] = 1.0  # labels[j] = s[j + 1]; c starts at s[2N + 2]
        arrays = {"inputs": s[:, :-1], "labels": s[:, 1:], "label_mask": label_mask}
    else:
        target = np.concatenate([column(BOS), c_tok, column(EOS)], 1)  # [n, N + 3]
        arrays = {"inputs": np.concatenate([a_tok, column(PLUS), b_tok], 1),
                  "decoder_inputs": target[:, :-1], "labels": target[:, 1:]}
    order = "least" if reverse_answer else "most"
    layout = (f"addition ({form}): {num_digits}-digit operands, {num_digits + 1}-digit sum, "
              f"zero-padded, {order} significant digit first")
    specials = {"pad": PAD, "bos": BOS, "eos": EOS, "plus": PLUS, "equals": EQUALS,
                "digit_0": DIGIT_0}
    return SequenceTask(arrays=arrays, vocab_size=ADDITION_VOCAB_SIZE, special_tokens=specials,
                        layout=layout)
