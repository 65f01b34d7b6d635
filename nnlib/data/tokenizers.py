"""Tokenizers: characters (nanoGPT's Shakespeare) and byte-level BPE (GPT-2, BERT-style).

Both turn a string into ``ids: [time]`` int32 numpy arrays and back, and save
to / load from one JSON file.

* ``CharTokenizer``: one id per character. The vocabulary is the optional
  special tokens first (ids ``0 .. k-1``, so ``[PAD]`` can be 0), then the
  sorted unique characters of the fitted text; with no special tokens the ids
  are exactly nanoGPT's ``stoi``. A character outside the vocabulary is an
  error naming it, unless an ``unk_token`` was set, which it then maps to.
  Special tokens are never parsed out of text: ``encode("[MASK]")`` is six
  characters. ``decode(encode(x)) == x`` for every ``x`` made of known
  characters.
* ``BPETokenizer``: wraps a Hugging Face ``tokenizers.Tokenizer`` (the
  optional ``tokenizers`` package, in the ``data`` extra) trained as GPT-2's
  byte-level BPE: text is split GPT-2's way, each piece's UTF-8 bytes are
  merged by learnt rules, and all 256 bytes are in the vocabulary, so there
  are no unknown tokens and ``decode(encode(x)) == x`` for every string. Add
  BERT's ``[PAD] [UNK] [CLS] [SEP] [MASK]`` or GPT's ``<|endoftext|>`` as
  special tokens (they get the first ids). Unlike characters, special tokens
  written in the text *are* recognised (``"[MASK]"`` -> the mask id), as
  Hugging Face does. Padding and truncation are done here, in numpy, by
  ``encode_batch`` (any padding or truncation stored in a loaded
  ``tokenizer.json`` is switched off), so shapes are always what you asked.

Shapes glossary: ``time`` is a sequence length in tokens, ``batch`` the number
of sequences.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from jaxtyping import Bool, Int

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
GPT_SPECIAL_TOKENS = ("<|endoftext|>",)

_CHAR_FORMAT = "nnlib.CharTokenizer"


def _check_ids(fn: str, ids: Any, vocab_size: int) -> np.ndarray:
    """``ids`` as a 1-D int array, every id in ``[0, vocab_size)``."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"{fn} expected ids of shape [time], got shape {ids.shape}")
    if ids.size == 0:
        return ids.astype(np.int64)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{fn} expected integer ids, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise ValueError(
            f"{fn}: ids must be in [0, vocab_size={vocab_size}), got {bad[:5].tolist()}"
        )
    return ids


class CharTokenizer:
    """Character-level tokenizer: one id per Unicode character.

    Build it with ``CharTokenizer.fit(text)``, or directly from characters.

    Args:
      chars: the characters of the vocabulary (deduplicated and sorted by
        code point; each must be a single character).
      special_tokens: strings given the first ids, in this order.
      unk_token: if set, unknown characters map to this token's id (it is
        appended to ``special_tokens`` if missing); if ``None`` they raise.
    """

    def __init__(self, chars: Iterable[str], *, special_tokens: Sequence[str] = (),
                 unk_token: str | None = None):
        chars = sorted(set(chars))
        not_chars = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if not_chars:
            raise ValueError(f"CharTokenizer: chars must be single characters, got "
                             f"{not_chars[:5]!r}")
        specials = list(dict.fromkeys(special_tokens))
        if unk_token is not None and unk_token not in specials:
            specials.append(unk_token)
        clash = [s for s in specials if s in set(chars)]
        if clash:
            raise ValueError(
                f"CharTokenizer: special tokens {clash!r} are also ordinary characters of the "
                "text; pick special tokens that do not occur in it, such as '[PAD]'"
            )
        if not chars and not specials:
            raise ValueError("CharTokenizer: the vocabulary is empty (no characters, no "
                             "special tokens)")
        self.chars: tuple[str, ...] = tuple(chars)
        self.special_tokens: tuple[str, ...] = tuple(specials)
        self.unk_token = unk_token
        self._itos = list(self.special_tokens) + list(self.chars)
        self._stoi = {s: i for i, s in enumerate(self._itos)}
        # Sorted code points: encode maps a whole string with one searchsorted.
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)  # [chars]

    @classmethod
    def fit(cls, text: str, *, special_tokens: Sequence[str] = (),
            unk_token: str | None = None) -> CharTokenizer:
        """The tokenizer whose characters are the sorted unique characters of ``text``."""
        if not isinstance(text, str) or not text:
            raise ValueError(f"CharTokenizer.fit expected a non-empty string, got {text!r:.40}")
        return cls(set(text), special_tokens=special_tokens, unk_token=unk_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids: special tokens plus characters."""
        return len(self._itos)

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        """Ids of the special tokens, ``0 .. len(special_tokens) - 1``."""
        return tuple(range(len(self.special_tokens)))

    def token_to_id(self, token: str) -> int:
        """The id of a character or special token."""
        if token not in self._stoi:
            raise KeyError(f"CharTokenizer: {token!r} is not in the vocabulary")
        return self._stoi[token]

    def id_to_token(self, token_id: int) -> str:
        """The character or special token with this id."""
        return self._itos[int(_check_ids("CharTokenizer.id_to_token", [token_id],
                                         self.vocab_size)[0])]

    def encode(self, text: str) -> Int[np.ndarray, " time"]:
        """``text`` as ``ids: [len(text)]`` int32, one per character."""
        fn = "CharTokenizer.encode"
        if not isinstance(text, str):
            raise TypeError(f"{fn} expected a str, got {type(text).__name__}")
        # surrogatepass: lone surrogates (from surrogateescape decoding) stay one code point.
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")  # [T]
        positions = np.searchsorted(self._codepoints, points)  # [T]
        in_range = np.minimum(positions, max(len(self._codepoints) - 1, 0))
        known = (positions < len(self._codepoints)) & (
            self._codepoints[in_range] == points if len(self._codepoints) else False)
        ids = (positions + len(self.special_tokens)).astype(np.int32)
        if not np.all(known):
            if self.unk_token is None:
                unknown = sorted({chr(p) for p in points[~known]})
                first = int(np.argmin(known))
                raise ValueError(
                    f"{fn}: {len(unknown)} character(s) not in the vocabulary: "
                    f"{''.join(unknown[:10])!r} (first at position {first}); fit on text that "
                    "contains them, or set unk_token='[UNK]'"
                )
            ids[~known] = self._stoi[self.unk_token]
        return ids

    def decode(self, ids: Int[Any, " time"], *, skip_special_tokens: bool = False) -> str:
        """The string for ``ids: [time]``; special tokens are written out unless skipped."""
        ids = _check_ids("CharTokenizer.decode", ids, self.vocab_size)
        num_special = len(self.special_tokens)
        is_special = ids < num_special
        if skip_special_tokens:
            ids, is_special = ids[~is_special], is_special[~is_special]
        if not np.any(is_special):
            # All characters: one vectorised code-point gather instead of a Python loop.
            points = self._codepoints[ids - num_special].astype("<u4")
            return points.tobytes().decode("utf-32-le", "surrogatepass")
        return "".join(self._itos[i] for i in ids.tolist())

    def save(self, path: str | os.PathLike) -> None:
        """Writes the vocabulary to a JSON file."""
        state = {"format": _CHAR_FORMAT, "version": 1, "chars": list(self.chars),
                 "special_tokens": list(self.special_tokens), "unk_token": self.unk_token}
        Path(path).write_text(json.dumps(state, ensure_ascii=True, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        """Reads a tokenizer written by ``save``."""
        try:
            state = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"CharTokenizer.load: {path} is not JSON ({e})") from None
        if not isinstance(state, dict) or state.get("format") != _CHAR_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"CharTokenizer.load: {path} is not a saved CharTokenizer (format {got!r}, "
                f"expected {_CHAR_FORMAT!r})"
            )
        return cls(state["chars"], special_tokens=state["special_tokens"],
                   unk_token=state["unk_token"])

    def __repr__(self) -> str:
        return (f"CharTokenizer(vocab_size={self.vocab_size}, "
                f"special_tokens={self.special_tokens!r})")


# --- byte-level BPE (Hugging Face tokenizers) ---


class EncodedBatch(NamedTuple):
    """A padded batch of token ids.

    Attributes:
      ids: ``[batch, time]`` int32, padded with the pad id.
      valid: ``[batch, time]`` bool, True at real tokens and False at padding
        (pass it as ``key_valid`` to ``nnlib.layers.attention.padding_mask``,
        or ``pad_mask=~valid`` to ``nnlib.data.text.mlm_mask``).
    """

    ids: Int[np.ndarray, "batch time"]
    valid: Bool[np.ndarray, "batch time"]


def _hf_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "BPETokenizer needs the Hugging Face 'tokenizers' package: "
            "pip install 'nnlib[data]' (or pip install tokenizers)"
        ) from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE tokenizer (GPT-2's scheme) around a Hugging Face ``Tokenizer``.

    Train one with ``BPETokenizer.train(texts, vocab_size)``, load one with
    ``BPETokenizer.load(path)`` (any ``tokenizer.json``), or wrap an existing
    ``tokenizers.Tokenizer``.

    Args:
      tokenizer: a ``tokenizers.Tokenizer``. Its own padding and truncation
        are switched off: ``encode_batch`` pads and truncates.
    """

    def __init__(self, tokenizer: Any):
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        special_tokens: Sequence[str] = BERT_SPECIAL_TOKENS,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> BPETokenizer:
        """Learns byte-level BPE merges from ``texts``.

        Args:
          texts: an iterable of strings (documents, lines, or chunks of a corpus).
          vocab_size: the final vocabulary size, including the 256 byte tokens
            and the special tokens; training stops earlier if no pair occurs
            ``min_frequency`` times.
          special_tokens: given ids ``0 .. k-1`` in this order
            (``BERT_SPECIAL_TOKENS`` or ``GPT_SPECIAL_TOKENS``).
          min_frequency: the fewest occurrences of a pair for it to be merged.
          show_progress: show the Rust progress bar.
        """
        tk = _hf_tokenizers()
        special_tokens = list(dict.fromkeys(special_tokens))
        minimum = 256 + len(special_tokens)
        if not isinstance(vocab_size, int) or vocab_size < minimum:
            raise ValueError(
                f"BPETokenizer.train: vocab_size must be at least {minimum} (256 bytes plus "
                f"{len(special_tokens)} special tokens), got {vocab_size!r}"
            )
        if isinstance(texts, str):
            raise TypeError("BPETokenizer.train expected an iterable of strings, got one str "
                            "(wrap it in a list)")
        tokenizer = tk.Tokenizer(tk.models.BPE())
        # add_prefix_space=False: a leading space would break decode(encode(x)) == x.
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_tokens,
            # All 256 bytes, seen in training or not: nothing is ever unknown.
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The special tokens, in id order."""
        added = self.tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
        return tuple(added[i].content for i in sorted(added) if added[i].special)

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        """Ids of the special tokens (for ``mlm_mask``'s ``special_token_ids``)."""
        return tuple(self.token_to_id(t) for t in self.special_tokens)

    @property
    def pad_id(self) -> int:
        """Id of ``[PAD]``, else of ``<|endoftext|>`` (GPT-2 pads with it)."""
        for token in ("[PAD]", "<|endoftext|>"):
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        raise ValueError("BPETokenizer: no [PAD] or <|endoftext|> token to pad with; pass "
                         "pad_id=... to encode_batch")

    def token_to_id(self, token: str) -> int:
        """The id of a token (e.g. ``"[MASK]"``)."""
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"BPETokenizer: {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str) -> Int[np.ndarray, " time"]:
        """``text`` as ``ids: [time]`` int32 (no special tokens added)."""
        if not isinstance(text, str):
            raise TypeError(f"BPETokenizer.encode expected a str, got {type(text).__name__}")
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids,
                          dtype=np.int32)

    def _wrap(self) -> tuple[list[int], list[int]]:
        """Ids put before and after each sequence by ``add_special_tokens=True``."""
        cls_id, sep_id = self.tokenizer.token_to_id("[CLS]"), self.tokenizer.token_to_id("[SEP]")
        if cls_id is not None and sep_id is not None:
            return [cls_id], [sep_id]  # BERT: [CLS] text [SEP]
        eos_id = self.tokenizer.token_to_id("<|endoftext|>")
        if eos_id is not None:
            return [], [eos_id]  # GPT: text <|endoftext|>
        raise ValueError("BPETokenizer.encode_batch: add_special_tokens=True needs [CLS] and "
                         "[SEP], or <|endoftext|>, in the vocabulary")

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        padding: Literal["longest", "max_length"] = "longest",
        truncation: bool = True,
        add_special_tokens: bool = False,
        pad_id: int | None = None,
    ) -> EncodedBatch:
        """Encodes many texts (in parallel, in Rust) into one padded array.

        Args:
          texts: the strings.
          max_length: the longest sequence kept, special tokens included.
          padding: ``"longest"`` pads to the longest sequence in the batch;
            ``"max_length"`` pads to ``max_length`` (fixed shapes, so a jitted
            step compiles once).
          truncation: cut sequences longer than ``max_length`` (their end is
            dropped, added special tokens are kept); if False they are an error.
          add_special_tokens: wrap each text as ``[CLS] text [SEP]`` (BERT
            vocabularies) or ``text <|endoftext|>`` (GPT).
          pad_id: the padding id; default ``self.pad_id``.

        Returns:
          An ``EncodedBatch`` with ``ids, valid: [len(texts), time]``.
        """
        fn = "BPETokenizer.encode_batch"
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"{fn} expected a list of strings, got {type(texts).__name__}")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"{fn}: padding must be 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError(f"{fn}: padding='max_length' needs max_length")
        before, after = self._wrap() if add_special_tokens else ([], [])
        if max_length is not None and max_length < len(before) + len(after) + 1:
            raise ValueError(f"{fn}: max_length must leave room for at least one token besides "
                             f"the {len(before) + len(after)} special ones, got {max_length}")
        pad_id = self.pad_id if pad_id is None else pad_id
        room = None if max_length is None else max_length - len(before) - len(after)
        sequences = []
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts),
                                                            add_special_tokens=False)):
            ids = enc.ids
            if room is not None and len(ids) > room:
                if not truncation:
                    raise ValueError(
                        f"{fn}: text {i} has {len(ids) + len(before) + len(after)} tokens, more "
                        f"than max_length={max_length}, and truncation=False"
                    )
                ids = ids[:room]
            sequences.append(before + ids + after)
        longest = max((len(s) for s in sequences), default=0)
        time = max_length if padding == "max_length" else longest
        ids = np.full((len(sequences), time), pad_id, dtype=np.int32)  # [B, T]
        valid = np.zeros((len(sequences), time), dtype=bool)  # [B, T]
        for row, seq in enumerate(sequences):
            ids[row, :len(seq)] = seq
            valid[row, :len(seq)] = True
        return EncodedBatch(ids, valid)

    def decode(self, ids: Int[Any, " time"], *, skip_special_tokens: bool = False) -> str:
        """The string for ``ids: [time]``; special tokens are written out unless skipped."""
        ids = _check_ids("BPETokenizer.decode", ids, self.vocab_size)
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, ids: Int[Any, "batch time"], valid: Bool[Any, "batch time"] | None
                     = None, *, skip_special_tokens: bool = False) -> list[str]:
        """Decodes each row of ``ids: [batch, time]``, keeping only ``valid`` positions."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"BPETokenizer.decode_batch expected ids of shape [batch, time], "
                             f"got shape {ids.shape}")
        if valid is not None and np.shape(valid) != ids.shape:
            raise ValueError(f"BPETokenizer.decode_batch expected valid of shape {ids.shape}, "
                             f"got shape {np.shape(valid)}")
        rows = [row if valid is None else row[np.asarray(valid[i], dtype=bool)]
                for i, row in enumerate(ids)]
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    def save(self, path: str | os.PathLike) -> None:
        """Writes the Hugging Face ``tokenizer.json`` (readable without nnlib)."""
        self.tokenizer.save(str(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Reads any ``tokenizer.json`` (ours, or e.g. a Hugging Face model's)."""
        tk = _hf_tokenizers()
        if not Path(path).is_file():
            raise FileNotFoundError(f"BPETokenizer.load: no such file: {path}")
        try:
            return cls(tk.Tokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises a bare Exception for bad JSON
            raise ValueError(f"BPETokenizer.load: {path} is not a tokenizer.json ({e})") from None

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, "
                f"special_tokens={self.special_tokens!r})")
