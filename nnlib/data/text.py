"""Text for language models: corpora, next-token windows and BERT masking.

Three steps, each a plain function on strings or token arrays:

1. **A corpus is one string.** ``load_corpus`` reads a UTF-8 file, or every
   text file under a folder; ``tiny_shakespeare`` finds (or downloads, with a
   SHA-256 check) karpathy's char-rnn ``input.txt``; ``python_stdlib_corpus``
   joins the Python standard library's own ``.py`` sources, a code corpus that
   ships with every Python and needs no download. Files are always read in
   sorted order and joined with a documented ``separator`` (``"\\n\\n"``), so
   the same inputs give the same string on every machine. ``split_text`` cuts
   it into a contiguous train / validation pair (nanoGPT's 90/10).
2. **Causal LM (GPT).** A tokenizer (``nnlib.data.tokenizers``) turns the text
   into ``tokens: [num_tokens]``; ``next_token_windows`` views it as
   ``inputs, labels: [num_windows, context]`` with ``labels[i, t] ==
   inputs[i, t + 1]`` (strided views, no copy), ``random_windows`` samples a
   batch of windows at random starts as nanoGPT's ``get_batch`` does.
3. **Masked LM (BERT).** ``mlm_mask`` chooses ``mask_prob`` (15%) of the
   positions that are neither special tokens nor padding; of those 80% become
   ``[MASK]``, 10% a random token, 10% stay as they are (Devlin et al., 2019,
   section 3.1). The loss reads ``labels`` only where ``weights`` is 1.

Randomness: functions that sample take ``key_or_seed``. A JAX PRNG key gives
JAX arrays and works inside ``jax.jit``; an int seed (or a sequence of ints
such as ``[seed, step]``, or a ``numpy.random.Generator``) gives numpy arrays
for a host-side input pipeline. The same seed always gives the same batch.

Where files come from (the library reads no path it was not given, except the
two documented environment variables): ``NNLIB_DATA_DIR`` (a folder laid out
as ``<dir>/tinyshakespeare/input.txt``) and ``NNLIB_CACHE_DIR`` (where
downloads go; default ``~/.cache/nnlib``).

Shapes glossary: ``num_tokens`` is the corpus length in tokens, ``context``
the window (block) length, ``batch`` the number of sequences, ``time`` the
sequence length.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from nnlib.data._download import ChecksumError, download_file, file_digest

Tokens = np.ndarray | Array
KeyOrSeed = Any  # a jax PRNG key, an int, a sequence of ints, or a numpy Generator

DEFAULT_SEPARATOR = "\n\n"

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
# 1,115,394 bytes; the same digest is published by many nanoGPT / char-rnn ports.
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# Folders never read by python_stdlib_corpus: the regression tests (huge and full of
# deliberately odd encodings) and third-party packages that differ between machines.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)


# --- corpora: one string from files ---


def _read_utf8(fn: str, path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{fn}: {path} is not valid UTF-8 (byte {e.start}: {e.reason}); "
            "convert it to UTF-8 or leave it out of the corpus"
        ) from None


def _walk_files(root: Path, suffixes: tuple[str, ...], excluded_dirs: Iterable[str] = ()
                ) -> list[Path]:
    """Files under ``root`` ending in ``suffixes``, sorted by relative path.

    Hidden files and folders (names starting with ".") and ``excluded_dirs``
    are skipped. Pruning during the walk (not filtering afterwards) keeps a
    large ``site-packages`` beside the stdlib from costing seconds.
    """
    excluded = set(excluded_dirs)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in excluded and not d.startswith(".")]
        found += [Path(folder, f) for f in files
                  if f.endswith(suffixes) and not f.startswith(".")]
    # Sort by the relative path as a tuple of parts: the same order on every OS.
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def load_corpus(
    path: str | os.PathLike,
    *,
    suffixes: str | Sequence[str] = (".txt",),
    separator: str = DEFAULT_SEPARATOR,
) -> str:
    """Reads a text corpus: one UTF-8 file, or every text file under a folder.

    Args:
      path: a file (read whatever its name), or a folder searched recursively
        for files whose names end in one of ``suffixes``. Hidden files and
        folders are skipped.
      suffixes: file-name endings that count as text inside a folder.
      separator: placed between files, which are concatenated in sorted order
        of their relative paths. Empty files are skipped. Pass e.g.
        ``"<|endoftext|>"`` to mark document boundaries for a GPT tokenizer.

    Returns:
      The corpus as one string, exactly the files' characters (line endings
      are not changed).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the corpus is empty (no matching files, or only empty ones),
        or a file is not valid UTF-8 (the error names the file and byte).
    """
    fn = "load_corpus"
    root = Path(path)
    suffixes = (suffixes,) if isinstance(suffixes, str) else tuple(suffixes)
    if not root.exists():
        raise FileNotFoundError(f"{fn}: no such file or folder: {root}")
    if root.is_file():
        text = _read_utf8(fn, root)
        if not text:
            raise ValueError(f"{fn}: {root} is empty; a corpus needs at least one character")
        return text
    files = _walk_files(root, suffixes)
    if not files:
        raise ValueError(
            f"{fn}: found no files ending in {' or '.join(suffixes)} under {root} "
            "(pass suffixes=... to read other extensions)"
        )
    texts = [t for t in (_read_utf8(fn, f) for f in files) if t]
    if not texts:
        raise ValueError(f"{fn}: all {len(files)} files under {root} are empty")
    return separator.join(texts)


def default_cache_dir() -> Path:
    """Where downloads are cached: ``$NNLIB_CACHE_DIR``, else ``~/.cache/nnlib``."""
    return Path(os.environ.get("NNLIB_CACHE_DIR") or Path.home() / ".cache" / "nnlib")


def tiny_shakespeare(
    path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    url: str = TINY_SHAKESPEARE_URL,
) -> str:
    """Tiny Shakespeare (karpathy's char-rnn ``input.txt``, 1,115,394 characters).

    Looks in this order and reads the first file found:

    1. ``path``: the file itself, or a folder holding ``input.txt`` or
       ``tinyshakespeare/input.txt``. Read as given (no checksum: it may be
       your own edited copy). A ``path`` that does not exist is an error.
    2. ``$NNLIB_DATA_DIR/tinyshakespeare/input.txt`` (read as given).
    3. ``<cache_dir>/tinyshakespeare/input.txt``, checked against
       ``TINY_SHAKESPEARE_SHA256``.
    4. With ``download=True``: fetches ``url`` into the cache, verifying the
       SHA-256 before keeping it.

    Args:
      path: an explicit file or folder.
      cache_dir: the download cache; default ``default_cache_dir()``.
      download: allow fetching from the network when no local copy exists
        (off by default: nothing is fetched unless you ask).
      url: where to download from (a mirror, or a ``file://`` URL).

    Returns:
      The text, decoded as UTF-8.

    Raises:
      FileNotFoundError: no local copy and ``download=False`` (the message
        lists where it looked), or ``path`` does not exist.
      ChecksumError: (a ``ValueError``) a cached or downloaded copy fails the
        checksum; a failed download keeps nothing.
      OSError: ``url`` could not be fetched.
    """
    fn = "tiny_shakespeare"
    if path is not None:
        given = Path(path)
        if given.is_dir():
            candidates = [given / "input.txt", given / "tinyshakespeare" / "input.txt"]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise FileNotFoundError(
                    f"{fn}: folder {given} holds neither input.txt nor tinyshakespeare/input.txt"
                )
            return _read_utf8(fn, found)
        if not given.is_file():
            raise FileNotFoundError(f"{fn}: no such file or folder: {given}")
        return _read_utf8(fn, given)

    looked = []
    if data_dir := os.environ.get("NNLIB_DATA_DIR"):
        candidate = Path(data_dir) / "tinyshakespeare" / "input.txt"
        if candidate.is_file():
            return _read_utf8(fn, candidate)
        looked.append(f"{candidate} (from NNLIB_DATA_DIR)")

    cached = Path(cache_dir if cache_dir is not None else default_cache_dir())
    cached = cached / "tinyshakespeare" / "input.txt"
    if download:
        # Returns at once when the cache already holds the verified file; otherwise
        # (missing or corrupted) fetches, checks and only then replaces it.
        download_file(url, cached, sha256=TINY_SHAKESPEARE_SHA256)
        return _read_utf8(fn, cached)
    if cached.is_file():
        got = file_digest(cached, "sha256")
        if got != TINY_SHAKESPEARE_SHA256:
            raise ChecksumError(
                f"{fn}: cached copy {cached} has SHA-256 {got}, expected "
                f"{TINY_SHAKESPEARE_SHA256}; delete it or pass download=True to fetch it again"
            )
        return _read_utf8(fn, cached)
    looked.append(f"{cached} (cache)")
    raise FileNotFoundError(
        f"{fn}: no local copy; looked in {', '.join(looked)}. Pass path=..., set "
        f"NNLIB_DATA_DIR, or pass download=True to fetch {url}"
    )


def python_stdlib_corpus(
    max_files: int | None = None,
    max_chars: int | None = None,
    *,
    separator: str = DEFAULT_SEPARATOR,
) -> str:
    """The running Python's standard library sources as one code corpus.

    Every ``.py`` file under ``sysconfig.get_paths()["stdlib"]``, in sorted
    order of relative path, skipping the test suites (``test``, ``tests``,
    ``idle_test``), third-party packages (``site-packages``,
    ``dist-packages``) and the machine-generated ``_sysconfigdata_*.py``.
    About 12 M characters in 730 files for CPython 3.11: deterministic for a
    given Python version, and nothing to download.

    Args:
      max_files: read only the first ``max_files`` files (in sorted order).
      max_chars: cut the joined text to at most this many characters (files
        past the limit are not read).
      separator: placed between files.

    Returns:
      The sources joined by ``separator``.
    """
    fn = "python_stdlib_corpus"
    for name, value in (("max_files", max_files), ("max_chars", max_chars)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"{fn}: {name} must be a positive int or None, got {value!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in _walk_files(root, (".py",), _STDLIB_EXCLUDED_DIRS)
             if not f.name.startswith("_sysconfigdata")]
    if not files:
        raise ValueError(f"{fn}: found no .py files under the stdlib folder {root}")
    files = files[:max_files]
    texts, total = [], 0
    for f in files:
        text = _read_utf8(fn, f)
        if not text:
            continue
        texts.append(text)
        total += len(text) + len(separator)
        if max_chars is not None and total >= max_chars:
            break
    return separator.join(texts)[:max_chars]


def split_text(text: Sequence, val_fraction: float = 0.1) -> tuple[Sequence, Sequence]:
    """Contiguous train / validation split: the last ``val_fraction`` is validation.

    As nanoGPT does (``n = int(0.9 * len(data))``): no shuffling, so no
    validation window overlaps training text. Works on strings and on token
    arrays (anything sliceable).

    Args:
      text: a string or ``tokens: [num_tokens]``.
      val_fraction: in ``[0, 1)``.

    Returns:
      ``(train, val)`` with ``train + val == text``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"split_text: val_fraction must be in [0, 1), got {val_fraction!r}")
    n_train = int(len(text) * (1.0 - val_fraction))
    return text[:n_train], text[n_train:]


# --- causal language modelling: next-token windows ---


def _check_tokens_1d(fn: str, tokens: Any, context: int) -> None:
    if not isinstance(context, int | np.integer) or context <= 0:
        raise ValueError(f"{fn}: context must be a positive int, got {context!r}")
    shape, dtype = np.shape(tokens), getattr(tokens, "dtype", None)
    if len(shape) != 1:
        raise ValueError(f"{fn} expected tokens of shape [num_tokens], got shape {shape}")
    if dtype is not None and not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{fn} expected integer token ids, got dtype {dtype}")
    if shape[0] < context + 1:
        raise ValueError(
            f"{fn}: a window of context={context} needs at least {context + 1} tokens "
            f"(inputs plus the next token), got {shape[0]}"
        )


def next_token_windows(
    tokens: Int[np.ndarray, " num_tokens"], context: int, *, stride: int | None = None
) -> tuple[Int[np.ndarray, "num_windows context"], Int[np.ndarray, "num_windows context"]]:
    """Every ``stride``-th window of ``context`` tokens and its next-token labels.

    Window ``i`` starts at ``i * stride``: ``inputs[i] = tokens[s : s +
    context]`` and ``labels[i] = tokens[s + 1 : s + context + 1]``. Both are
    read-only strided *views* of ``tokens`` (no copy, whatever the size of the
    corpus): indexing a batch (``inputs[idx]``) copies only that batch, which
    is what ``nnlib.data.batch_iterator`` does. Use ``np.ascontiguousarray``
    if you need an owned array.

    Args:
      tokens: ``[num_tokens]`` integer ids (numpy, or anything ``np.asarray``
        accepts; device arrays are copied to the host).
      context: window length (nanoGPT's ``block_size``).
      stride: distance between window starts; default ``context``
        (non-overlapping windows, each token predicted once).

    Returns:
      ``(inputs, labels)``, each ``[num_windows, context]`` with
      ``num_windows = (num_tokens - context - 1) // stride + 1``, in the
      dtype of ``tokens``.
    """
    fn = "next_token_windows"
    tokens = np.asarray(tokens)
    _check_tokens_1d(fn, tokens, context)
    stride = context if stride is None else stride
    if not isinstance(stride, int | np.integer) or stride <= 0:
        raise ValueError(f"{fn}: stride must be a positive int, got {stride!r}")
    # Windows of context + 1 share their storage with tokens; slicing keeps them views.
    windows = np.lib.stride_tricks.sliding_window_view(tokens, context + 1)[::stride]  # [M, C+1]
    return windows[:, :-1], windows[:, 1:]


def _is_key(key_or_seed: Any) -> bool:
    return isinstance(key_or_seed, jax.Array)


def _generator(key_or_seed: Any) -> np.random.Generator:
    if isinstance(key_or_seed, np.random.Generator):
        return key_or_seed
    return np.random.default_rng(key_or_seed)


def random_windows(
    tokens: Int[Tokens, " num_tokens"], context: int, batch_size: int, key_or_seed: KeyOrSeed
) -> tuple[Int[Tokens, "batch context"], Int[Tokens, "batch context"]]:
    """A batch of windows at uniformly random starts (nanoGPT's ``get_batch``).

    Starts are drawn with replacement from ``[0, num_tokens - context)``, so
    every window has its ``context`` inputs and the next token.

    Args:
      tokens: ``[num_tokens]`` integer ids, numpy or JAX.
      context: window length.
      batch_size: number of windows.
      key_or_seed: a JAX PRNG key (JAX outputs; jittable with ``context``
        and ``batch_size`` static: put a large corpus on the device once with
        ``jnp.asarray`` rather than closing over a numpy array), or an int /
        ``[seed, step]`` / numpy ``Generator`` (numpy outputs, host side).

    Returns:
      ``(inputs, labels)``, each ``[batch, context]`` in the dtype of
      ``tokens``, ``labels[b, t] == inputs[b, t + 1]``.
    """
    fn = "random_windows"
    _check_tokens_1d(fn, tokens, context)
    if not isinstance(batch_size, int | np.integer) or batch_size <= 0:
        raise ValueError(f"{fn}: batch_size must be a positive int, got {batch_size!r}")
    num_starts = np.shape(tokens)[0] - context
    if _is_key(key_or_seed):
        return _random_windows_jax(jnp.asarray(tokens), key_or_seed, int(context),
                                   int(batch_size))
    starts = _generator(key_or_seed).integers(0, num_starts, size=batch_size)  # [B]
    windows = np.asarray(tokens)[starts[:, None] + np.arange(context + 1)]  # [B, C+1]
    return windows[:, :-1], windows[:, 1:]


@functools.partial(jax.jit, static_argnums=(2, 3))
def _random_windows_jax(tokens, key, context, batch_size):
    starts = jax.random.randint(key, (batch_size,), 0, tokens.shape[0] - context)  # [B]
    offsets = jnp.arange(context + 1, dtype=starts.dtype)  # [C+1]
    windows = tokens[starts[:, None] + offsets]  # [B, C+1]
    return windows[:, :-1], windows[:, 1:]


# --- masked language modelling (BERT) ---


def _mlm_replacement_ids(fn: str, vocab_size: int, excluded: Sequence[int]) -> np.ndarray:
    """The ids a "random token" replacement may take: the vocabulary minus specials."""
    allowed = np.setdiff1d(np.arange(vocab_size, dtype=np.int32),
                           np.asarray(excluded, dtype=np.int32))
    if allowed.size == 0:
        raise ValueError(f"{fn}: every id in the vocabulary of size {vocab_size} is special")
    return allowed.astype(np.int32)


def mlm_mask(
    tokens: Int[Tokens, "batch time"],
    key_or_seed: KeyOrSeed,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Sequence[int] = (),
    pad_mask: Bool[Tokens, "batch time"] | None = None,
    mask_prob: float = 0.15,
    mask_token_prob: float = 0.8,
    random_token_prob: float = 0.1,
    ignore_label: int = -100,
) -> tuple[Int[Tokens, "batch time"], Int[Tokens, "batch time"], Float[Tokens, "batch time"]]:
    """BERT's masked-LM corruption: choose 15% of positions, 80/10/10 replace them.

    Each position that is not special and not padding is chosen independently
    with probability ``mask_prob`` (as Hugging Face's
    ``DataCollatorForLanguageModeling`` does, rather than an exact count per
    row; a row may get none). A chosen position becomes ``mask_token_id``
    with probability ``mask_token_prob``, a uniformly random *non-special* id
    with probability ``random_token_prob`` (it may equal the original), and
    stays unchanged otherwise. The model must predict the original id at every
    chosen position, including the unchanged ones.

    Args:
      tokens: ``[batch, time]`` integer ids (any shape works).
      key_or_seed: a JAX PRNG key (JAX outputs; jittable, all other arguments
        static), or an int / ``[seed, step]`` / numpy ``Generator`` (numpy).
      mask_token_id: the ``[MASK]`` id.
      vocab_size: ids are in ``[0, vocab_size)``; random replacements too.
      special_token_ids: ids never chosen and never used as replacements
        ([CLS], [SEP], [PAD], ...). ``mask_token_id`` is always treated as
        special.
      pad_mask: ``[batch, time]`` bool, **True at padding** positions, which
        are never chosen. (From an ``EncodedBatch`` pass ``~batch.valid``;
        padding ids listed in ``special_token_ids`` are excluded anyway.)
      mask_prob: probability that an eligible position is chosen.
      mask_token_prob, random_token_prob: how chosen positions are replaced.
      ignore_label: the label at positions that are not chosen. PyTorch's
        ``ignore_index`` convention; ``nnlib.losses`` never indexes with a
        label whose ``mask`` weight is 0, so pass ``mask=weights``.

    Returns:
      ``(inputs, labels, weights)``, all ``[batch, time]``: the corrupted
      ``inputs`` (int32), ``labels`` (int32; the original id at chosen
      positions, ``ignore_label`` elsewhere) and ``weights`` (float32; 1.0 at
      chosen positions, 0.0 elsewhere).
    """
    fn = "mlm_mask"
    shape, dtype = np.shape(tokens), getattr(tokens, "dtype", None)
    if dtype is None or not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{fn} expected integer token ids of shape [batch, time], got dtype "
                         f"{dtype}")
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"{fn}: mask_prob must be in (0, 1], got {mask_prob!r}")
    if mask_token_prob < 0 or random_token_prob < 0 or mask_token_prob + random_token_prob > 1:
        raise ValueError(
            f"{fn}: mask_token_prob and random_token_prob must be >= 0 and sum to at most 1, "
            f"got {mask_token_prob!r} and {random_token_prob!r}"
        )
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"{fn}: mask_token_id must be in [0, vocab_size={vocab_size}), "
                         f"got {mask_token_id}")
    if pad_mask is not None and np.shape(pad_mask) != shape:
        raise ValueError(f"{fn} expected pad_mask of the tokens' shape {shape}, got shape "
                         f"{np.shape(pad_mask)}")
    excluded = sorted({int(i) for i in special_token_ids} | {int(mask_token_id)})
    replacements = _mlm_replacement_ids(fn, vocab_size, excluded)  # [R]

    rule = dict(excluded=tuple(excluded), mask_token_id=int(mask_token_id),
                mask_prob=float(mask_prob), mask_token_prob=float(mask_token_prob),
                random_token_prob=float(random_token_prob), ignore_label=int(ignore_label))
    if _is_key(key_or_seed):
        return _mlm_mask_jax(jnp.asarray(tokens), key_or_seed, pad_mask, replacements, **rule)
    rng = _generator(key_or_seed)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{fn}: token ids must be in [0, vocab_size={vocab_size}), got "
                         f"ids from {tokens.min()} to {tokens.max()}")
    u_choose, u_kind = rng.random(shape), rng.random(shape)
    random_ids = replacements[rng.integers(0, replacements.size, size=shape)]
    return _mlm_corrupt(np, tokens, pad_mask, u_choose, u_kind, random_ids, **rule)


def _mlm_corrupt(xp, tokens, pad_mask, u_choose, u_kind, random_ids, *, excluded,
                 mask_token_id, mask_prob, mask_token_prob, random_token_prob, ignore_label):
    """The 80/10/10 rule given the random draws; ``xp`` is numpy or jax.numpy."""
    tokens = tokens.astype(np.int32)
    eligible = ~xp.isin(tokens, xp.asarray(excluded, dtype=np.int32))
    if pad_mask is not None:
        eligible = eligible & ~xp.asarray(pad_mask).astype(bool)
    chosen = eligible & (u_choose < mask_prob)
    # One uniform per position splits the chosen ones into [MASK] / random / unchanged.
    to_mask = chosen & (u_kind < mask_token_prob)
    to_random = chosen & (u_kind >= mask_token_prob) & (
        u_kind < mask_token_prob + random_token_prob)
    inputs = xp.where(to_mask, np.int32(mask_token_id), xp.where(to_random, random_ids, tokens))
    labels = xp.where(chosen, tokens, np.int32(ignore_label))
    return inputs, labels, chosen.astype(np.float32)


# One compiled program instead of ~20 op-by-op dispatches when called eagerly; inside a
# caller's jit it is simply inlined.
@functools.partial(jax.jit, static_argnames=(
    "excluded", "mask_token_id", "mask_prob", "mask_token_prob", "random_token_prob",
    "ignore_label"))
def _mlm_mask_jax(tokens, key, pad_mask, replacements, **rule):
    choose_key, kind_key, token_key = jax.random.split(key, 3)
    u_choose = jax.random.uniform(choose_key, tokens.shape)
    u_kind = jax.random.uniform(kind_key, tokens.shape)
    random_ids = replacements[jax.random.randint(token_key, tokens.shape, 0,
                                                 replacements.shape[0])]
    return _mlm_corrupt(jnp, tokens, pad_mask, u_choose, u_kind, random_ids, **rule)
