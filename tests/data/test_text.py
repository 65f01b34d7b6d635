"""Tests for nnlib.data.text: corpora, downloads, next-token windows, MLM masking."""

import functools
import hashlib
import http.server
import sysconfig
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnlib.data import ChecksumError
from nnlib.data import text as T

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt")
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(),
                                       reason="shared Tiny Shakespeare copy not present")


# --- load_corpus ---


def test_load_corpus_reads_one_file_exactly(tmp_path):
    f = tmp_path / "a.md"
    f.write_bytes("line one\r\nzweite Zeile ü\n".encode())
    assert T.load_corpus(f) == "line one\r\nzweite Zeile ü\n"


def test_load_corpus_folder_sorted_recursive_with_separator(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_text("B/X", encoding="utf-8")
    (tmp_path / "a.txt").write_text("A", encoding="utf-8")
    (tmp_path / "c.txt").write_text("C", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")  # skipped
    (tmp_path / "notes.md").write_text("MD", encoding="utf-8")  # wrong suffix
    (tmp_path / ".hidden.txt").write_text("H", encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "y.txt").write_text("G", encoding="utf-8")
    assert T.load_corpus(tmp_path) == "A\n\nB/X\n\nC"
    assert T.load_corpus(tmp_path, separator="|") == "A|B/X|C"
    assert T.load_corpus(tmp_path, suffixes=(".txt", ".md"), separator="") == "AB/XCMD"
    assert T.load_corpus(tmp_path, suffixes=".md") == "MD"


def test_load_corpus_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_corpus: no such file or folder: .*nope"):
        T.load_corpus(tmp_path / "nope")


def test_load_corpus_empty_file(tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match=r"load_corpus: .*e\.txt is empty"):
        T.load_corpus(tmp_path / "e.txt")


def test_load_corpus_folder_without_text_files(tmp_path):
    (tmp_path / "a.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"load_corpus: found no files ending in \.txt under"):
        T.load_corpus(tmp_path)


def test_load_corpus_folder_of_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(ValueError, match=r"load_corpus: all 2 files under .* are empty"):
        T.load_corpus(tmp_path)


def test_load_corpus_undecodable_file_is_named(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"load_corpus: .*latin1\.txt is not valid UTF-8 \(byte 3"):
        T.load_corpus(tmp_path)


# --- downloads and Tiny Shakespeare ---


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A folder served over HTTP on 127.0.0.1 (never the internet)."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # a proxy would not see 127.0.0.1
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# download_file itself (mirrors, temp files, digests) is tested once, in test_images.py;
# here: how tiny_shakespeare uses it.


def test_tiny_shakespeare_download_over_http(monkeypatch, http_root, tmp_path):
    root, base = http_root
    monkeypatch.delenv("NNLIB_DATA_DIR", raising=False)
    fake = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    (root / "input.txt").write_text(fake, encoding="utf-8")
    # Pretend the fake is the published file so the download path runs without it.
    monkeypatch.setattr(T, "TINY_SHAKESPEARE_SHA256", hashlib.sha256(fake.encode()).hexdigest())
    cache = tmp_path / "c"
    assert T.tiny_shakespeare(cache_dir=cache, download=True, url=f"{base}/input.txt") == fake
    assert [p.name for p in (cache / "tinyshakespeare").iterdir()] == ["input.txt"]  # no .part
    (root / "input.txt").unlink()  # a verified cache is not fetched again, even with download=True
    assert T.tiny_shakespeare(cache_dir=cache, download=True, url=f"{base}/input.txt") == fake


def test_tiny_shakespeare_download_unreachable_url(monkeypatch, http_root, tmp_path):
    _, base = http_root
    monkeypatch.delenv("NNLIB_DATA_DIR", raising=False)
    with pytest.raises(OSError, match=r"download_file: could not fetch http://127\.0\.0\.1:\d+/"
                                      r"missing\.txt: HTTP Error 404"):
        T.tiny_shakespeare(cache_dir=tmp_path / "c", download=True, url=f"{base}/missing.txt")
    assert list((tmp_path / "c" / "tinyshakespeare").iterdir()) == []


@needs_shakespeare
def test_tiny_shakespeare_from_path_matches_published_digest(tmp_path):
    text = T.tiny_shakespeare(SHAKESPEARE)
    assert len(text) == 1_115_394
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert hashlib.sha256(text.encode()).hexdigest() == T.TINY_SHAKESPEARE_SHA256
    assert T.tiny_shakespeare(SHAKESPEARE.parent) == text  # a folder holding input.txt
    assert T.tiny_shakespeare(SHAKESPEARE.parent.parent) == text  # .../tinyshakespeare/input.txt


@needs_shakespeare
def test_tiny_shakespeare_from_env_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NNLIB_DATA_DIR", str(SHAKESPEARE.parent.parent))
    assert len(T.tiny_shakespeare(cache_dir=tmp_path)) == 1_115_394


@needs_shakespeare
def test_tiny_shakespeare_download_into_cache_and_reuse(monkeypatch, tmp_path):
    monkeypatch.delenv("NNLIB_DATA_DIR", raising=False)
    monkeypatch.setenv("NNLIB_CACHE_DIR", str(tmp_path / "cache"))
    text = T.tiny_shakespeare(download=True, url=SHAKESPEARE.as_uri())
    cached = tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    assert cached.is_file() and text == SHAKESPEARE.read_text(encoding="utf-8")
    # Second call: served from the cache; a dead URL proves nothing is fetched.
    assert T.tiny_shakespeare(url=(tmp_path / "gone").as_uri()) == text
    # A corrupted cache is refused, then repaired by download=True.
    cached.write_text("not shakespeare")
    with pytest.raises(ChecksumError, match=r"tiny_shakespeare: cached copy .*input\.txt has "
                                         r"SHA-256 [0-9a-f]{64}, expected 86c4e6aa"):
        T.tiny_shakespeare()
    assert T.tiny_shakespeare(download=True, url=SHAKESPEARE.as_uri()) == text


def test_tiny_shakespeare_download_mismatch(monkeypatch, tmp_path):
    monkeypatch.delenv("NNLIB_DATA_DIR", raising=False)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("To be, or not to be")
    got = hashlib.sha256(b"To be, or not to be").hexdigest()
    with pytest.raises(ChecksumError, match=rf"download_file: checksum mismatch for input\.txt "
                       rf"downloaded from file://.*wrong\.txt: expected sha256 "
                       rf"{T.TINY_SHAKESPEARE_SHA256}, got {got} \(19 bytes\)"):
        T.tiny_shakespeare(cache_dir=tmp_path / "c", download=True, url=wrong.as_uri())
    assert list((tmp_path / "c" / "tinyshakespeare").iterdir()) == []  # no file, no .part


def test_tiny_shakespeare_no_local_copy_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("NNLIB_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match=r"tiny_shakespeare: no local copy; looked in "
                                                r".*data.*NNLIB_DATA_DIR.*cache.*download=True"):
        T.tiny_shakespeare(cache_dir=tmp_path / "c")


def test_tiny_shakespeare_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tiny_shakespeare: no such file or folder"):
        T.tiny_shakespeare(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match=r"tiny_shakespeare: folder .* holds neither"):
        T.tiny_shakespeare(tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NNLIB_CACHE_DIR", str(tmp_path))
    assert T.default_cache_dir() == tmp_path
    monkeypatch.delenv("NNLIB_CACHE_DIR")
    assert T.default_cache_dir() == Path.home() / ".cache" / "nnlib"


# --- python_stdlib_corpus ---


def test_python_stdlib_corpus_is_deterministic_code_without_tests():
    text = T.python_stdlib_corpus()
    assert len(text) > 1_000_000 and text == T.python_stdlib_corpus()
    assert "def " in text and "import " in text
    # The first file in sorted order is __future__.py, read independently here.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert T.python_stdlib_corpus(max_files=1) == (stdlib / "__future__.py").read_text("utf-8")
    # Nothing from the regression tests (e.g. test/test_grammar.py) is in it.
    grammar = (stdlib / "test" / "test_grammar.py")
    if grammar.is_file():
        assert grammar.read_text("utf-8")[:2000] not in text


def test_python_stdlib_corpus_limits():
    two = T.python_stdlib_corpus(max_files=2, separator="<SEP>")
    assert two.count("<SEP>") == 1
    short = T.python_stdlib_corpus(max_chars=1000)
    assert len(short) == 1000 and T.python_stdlib_corpus().startswith(short)
    with pytest.raises(ValueError, match=r"python_stdlib_corpus: max_files must be a positive "
                                         r"int or None, got 0"):
        T.python_stdlib_corpus(max_files=0)
    with pytest.raises(ValueError, match=r"python_stdlib_corpus: max_chars .* got -1"):
        T.python_stdlib_corpus(max_chars=-1)


# --- split_text ---


def test_split_text_is_nanogpt_split():
    text = "".join(chr(97 + i % 26) for i in range(1_115_394))
    train, val = T.split_text(text, 0.1)
    assert len(train) == int(len(text) * 0.9) == 1_003_854  # nanoGPT's n
    assert train + val == text
    tokens = np.arange(10)
    tr, va = T.split_text(tokens, 0.25)
    np.testing.assert_array_equal(np.concatenate([tr, va]), tokens)
    assert len(va) == 3
    assert T.split_text("abc", 0.0) == ("abc", "")


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_text_bad_fraction(fraction):
    with pytest.raises(ValueError, match=rf"split_text: val_fraction must be in \[0, 1\), "
                                         rf"got {fraction}"):
        T.split_text("abc", fraction)


# --- next_token_windows / random_windows ---


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 60), context=st.integers(1, 12), stride=st.integers(1, 7),
       default_stride=st.booleans())
def test_next_token_windows_equal_naive_loop(n, context, stride, default_stride):
    if n < context + 1:
        return
    tokens = np.random.default_rng(n).integers(0, 50, size=n).astype(np.int32)
    stride = context if default_stride else stride
    inputs, labels = T.next_token_windows(tokens, context,
                                          stride=None if default_stride else stride)
    naive_x, naive_y = [], []
    start = 0
    while start + context + 1 <= n:
        naive_x.append(tokens[start:start + context])
        naive_y.append(tokens[start + 1:start + context + 1])
        start += stride
    np.testing.assert_array_equal(inputs, np.array(naive_x))
    np.testing.assert_array_equal(labels, np.array(naive_y))
    assert inputs.shape == ((n - context - 1) // stride + 1, context)
    assert inputs.dtype == np.int32


def test_next_token_windows_are_views_not_copies():
    tokens = np.arange(1_000_000, dtype=np.uint16)
    inputs, labels = T.next_token_windows(tokens, 256, stride=1)
    assert inputs.shape == (1_000_000 - 256, 256)
    assert np.shares_memory(inputs, tokens) and np.shares_memory(labels, tokens)
    assert not inputs.flags.writeable
    np.testing.assert_array_equal(inputs[[0, 5]][:, 1:], labels[[0, 5]][:, :-1])


@pytest.mark.parametrize(
    ("tokens", "kwargs", "match"),
    [
        (np.zeros((2, 5), np.int32), {}, r"next_token_windows expected tokens of shape "
                                         r"\[num_tokens\], got shape \(2, 5\)"),
        (np.zeros(10, np.float32), {}, r"next_token_windows expected integer token ids, got "
                                       r"dtype float32"),
        (np.zeros(4, np.int32), {}, r"next_token_windows: a window of context=4 needs at least "
                                    r"5 tokens .*got 4"),
        (np.zeros(10, np.int32), {"stride": 0}, r"next_token_windows: stride must be a "
                                                r"positive int, got 0"),
    ],
)
def test_next_token_windows_errors(tokens, kwargs, match):
    with pytest.raises(ValueError, match=match):
        T.next_token_windows(tokens, 4, **kwargs)


def test_next_token_windows_bad_context():
    with pytest.raises(ValueError, match=r"next_token_windows: context must be a positive int, "
                                         r"got 0"):
        T.next_token_windows(np.arange(5), 0)


def _check_windows_are_corpus_slices(tokens, inputs, labels, context):
    """tokens = arange: each window is a slice iff it counts up by one from its start."""
    inputs, labels = np.asarray(inputs), np.asarray(labels)
    starts = inputs[:, 0]
    expected = starts[:, None] + np.arange(context)
    np.testing.assert_array_equal(inputs, expected)
    np.testing.assert_array_equal(labels, expected + 1)
    assert starts.min() >= 0 and starts.max() <= len(tokens) - context - 1
    return starts


def test_random_windows_numpy_seed():
    tokens = np.arange(100, dtype=np.int32)
    x, y = T.random_windows(tokens, 8, 2000, 0)
    assert isinstance(x, np.ndarray) and x.shape == y.shape == (2000, 8) and x.dtype == np.int32
    starts = _check_windows_are_corpus_slices(tokens, x, y, 8)
    assert set(starts.tolist()) == set(range(92))  # every start in [0, N - context) drawn
    x2, y2 = T.random_windows(tokens, 8, 2000, 0)
    np.testing.assert_array_equal(x, x2)
    x3, _ = T.random_windows(tokens, 8, 2000, [0, 1])
    assert not np.array_equal(x, x3)
    x4, _ = T.random_windows(tokens, 8, 2000, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x4)


def test_random_windows_jax_key_jit_matches_eager():
    tokens = jnp.arange(50, dtype=jnp.int32)
    key = jax.random.key(3)
    with jax.numpy_dtype_promotion("strict"):
        x, y = T.random_windows(tokens, 5, 64, key)
        sample = jax.jit(T.random_windows, static_argnums=(1, 2))
        xj, yj = sample(tokens, 5, 64, key)
        xr, _ = T.random_windows(np.arange(50, dtype=np.int32), 5, 64, jax.random.PRNGKey(3))
    assert isinstance(x, jax.Array) and x.shape == (64, 5)
    _check_windows_are_corpus_slices(np.asarray(tokens), x, y, 5)
    np.testing.assert_array_equal(x, xj)
    np.testing.assert_array_equal(y, yj)
    _check_windows_are_corpus_slices(np.arange(50), xr, _, 5)


def test_random_windows_bad_batch_size():
    with pytest.raises(ValueError, match=r"random_windows: batch_size must be a positive int, "
                                         r"got 0"):
        T.random_windows(np.arange(20), 4, 0, 0)


# --- mlm_mask ---

VOCAB, PAD, CLS, SEP, MASK = 1000, 0, 2, 3, 4
SPECIALS = (PAD, 1, CLS, SEP, MASK)


def _mlm_batch(batch=64, time=512, seed=0):
    """[CLS] words [SEP] [PAD]...: rows of random lengths, words drawn from non-special ids."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, VOCAB, size=(batch, time)).astype(np.int32)
    lengths = rng.integers(time // 2, time + 1, size=batch)
    pad = np.arange(time)[None, :] >= lengths[:, None]
    tokens[:, 0] = CLS
    tokens[np.arange(batch), lengths - 1] = SEP
    tokens[pad] = PAD
    return tokens, pad


def _check_mlm(tokens, pad, inputs, labels, weights):
    """BERT's 80/10/10 rule, checked from the outputs alone."""
    tokens, inputs = np.asarray(tokens), np.asarray(inputs)
    labels, weights = np.asarray(labels), np.asarray(weights)
    assert inputs.dtype == labels.dtype == np.int32 and weights.dtype == np.float32
    chosen = weights == 1.0
    assert np.all((weights == 0.0) | chosen)
    eligible = ~np.isin(tokens, SPECIALS) & ~pad
    assert not np.any(chosen & ~eligible)  # specials and pads never chosen
    np.testing.assert_array_equal(labels[chosen], tokens[chosen])
    assert np.all(labels[~chosen] == -100)
    np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])  # untouched elsewhere

    frac_chosen = chosen.sum() / eligible.sum()
    assert abs(frac_chosen - 0.15) < 0.01, frac_chosen
    n = chosen.sum()
    masked = (inputs == MASK) & chosen
    unchanged = (inputs == tokens) & chosen
    random = chosen & ~masked & ~unchanged
    # A random replacement equals the original with probability 1/995: ~0.01% of chosen.
    assert abs(masked.sum() / n - 0.8) < 0.015
    assert abs(random.sum() / n - 0.1) < 0.01
    assert abs(unchanged.sum() / n - 0.1) < 0.01
    assert not np.any(np.isin(inputs[random], SPECIALS))  # replacements are never special
    assert np.all((inputs >= 0) & (inputs < VOCAB))


def test_mlm_mask_numpy_statistics():
    tokens, pad = _mlm_batch()
    out = T.mlm_mask(tokens, 0, mask_token_id=MASK, vocab_size=VOCAB,
                     special_token_ids=SPECIALS, pad_mask=pad)
    assert all(isinstance(a, np.ndarray) for a in out)
    _check_mlm(tokens, pad, *out)


def test_mlm_mask_jax_statistics_and_jit():
    tokens, pad = _mlm_batch(seed=1)
    key = jax.random.key(0)
    fn = functools.partial(T.mlm_mask, mask_token_id=MASK, vocab_size=VOCAB,
                           special_token_ids=SPECIALS)
    with jax.numpy_dtype_promotion("strict"):
        eager = fn(jnp.asarray(tokens), key, pad_mask=jnp.asarray(pad))
        jitted = jax.jit(lambda t, k, p: fn(t, k, pad_mask=p))(jnp.asarray(tokens), key,
                                                                jnp.asarray(pad))
    assert all(isinstance(a, jax.Array) for a in eager)
    _check_mlm(tokens, pad, *eager)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_array_equal(a, b)


def test_mlm_mask_pad_mask_alone_excludes_padding():
    # Padding id 7 is not listed as special: pad_mask alone keeps it out.
    tokens = np.full((8, 200), 7, np.int32)
    tokens[:, :100] = 9
    pad = tokens == 7
    _, _, w = T.mlm_mask(tokens, 1, mask_token_id=MASK, vocab_size=VOCAB, pad_mask=pad,
                         mask_prob=0.5)
    assert w[pad].sum() == 0 and w[~pad].sum() > 0


def test_mlm_mask_is_deterministic_by_seed():
    tokens, pad = _mlm_batch(8, 64)
    kw = dict(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIALS, pad_mask=pad)
    a, b = T.mlm_mask(tokens, 5, **kw), T.mlm_mask(tokens, 5, **kw)
    c = T.mlm_mask(tokens, 6, **kw)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], c[2])
    ka, kb = T.mlm_mask(tokens, jax.random.key(5), **kw), T.mlm_mask(tokens, jax.random.key(5), **kw)
    np.testing.assert_array_equal(ka[0], kb[0])


def test_mlm_mask_all_replaced_by_mask_and_custom_ignore_label():
    tokens = np.arange(5, 105, dtype=np.int64).reshape(4, 25)
    inputs, labels, w = T.mlm_mask(tokens, 0, mask_token_id=MASK, vocab_size=VOCAB,
                                   mask_prob=1.0, mask_token_prob=1.0, random_token_prob=0.0,
                                   ignore_label=0)
    assert np.all(w == 1) and np.all(inputs == MASK)
    np.testing.assert_array_equal(labels, tokens)


@pytest.mark.parametrize(
    ("tokens", "kwargs", "match"),
    [
        (np.zeros((2, 3), np.float32), {}, r"mlm_mask expected integer token ids of shape "
                                           r"\[batch, time\], got dtype float32"),
        (np.zeros((2, 3), np.int32), {"mask_prob": 0.0}, r"mlm_mask: mask_prob must be in "
                                                         r"\(0, 1\], got 0\.0"),
        (np.zeros((2, 3), np.int32), {"mask_token_prob": 0.95}, r"mlm_mask: mask_token_prob and "
                                                                r"random_token_prob .* got 0\.95 "
                                                                r"and 0\.1"),
        (np.zeros((2, 3), np.int32), {"mask_token_id": 1000}, r"mlm_mask: mask_token_id must be "
                                                              r"in \[0, vocab_size=1000\), got "
                                                              r"1000"),
        (np.zeros((2, 3), np.int32), {"pad_mask": np.zeros((2, 4), bool)},
         r"mlm_mask expected pad_mask of the tokens' shape \(2, 3\), got shape \(2, 4\)"),
        (np.full((2, 3), 1000, np.int32), {}, r"mlm_mask: token ids must be in "
                                              r"\[0, vocab_size=1000\), got ids from 1000 to 1000"),
        (np.zeros((2, 3), np.int32), {"vocab_size": 5, "special_token_ids": (0, 1, 2, 3)},
         r"mlm_mask: every id in the vocabulary of size 5 is special"),
    ],
)
def test_mlm_mask_errors(tokens, kwargs, match):
    kw = dict(mask_token_id=MASK, vocab_size=VOCAB) | kwargs
    with pytest.raises(ValueError, match=match):
        T.mlm_mask(tokens, 0, **kw)


def test_windows_feed_batch_iterator_without_copying_the_corpus():
    from nnlib.data.batching import batch_iterator

    tokens = np.arange(10_000, dtype=np.int32)
    inputs, labels = T.next_token_windows(tokens, 16, stride=1)
    batch = next(batch_iterator({"inputs": inputs, "labels": labels}, 32, seed=0))
    starts = batch["inputs"][:, 0]
    np.testing.assert_array_equal(batch["inputs"], starts[:, None] + np.arange(16))
    np.testing.assert_array_equal(batch["labels"], batch["inputs"] + 1)
