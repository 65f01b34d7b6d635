"""Tests for nnlib.data.tokenizers: CharTokenizer and byte-level BPETokenizer."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnlib.data.tokenizers import (
    BERT_SPECIAL_TOKENS,
    GPT_SPECIAL_TOKENS,
    BPETokenizer,
    CharTokenizer,
    EncodedBatch,
)

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt")
ALPHABET = "abcdefgh \n\tüé語🤖"

# --- CharTokenizer ---


@settings(max_examples=10, deadline=None)
@given(text=st.text(alphabet=ALPHABET, min_size=1, max_size=200))
def test_char_round_trip_and_nanogpt_ids(text):
    tok = CharTokenizer.fit(text)
    ids = tok.encode(text)
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}  # nanoGPT's vocabulary
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    np.testing.assert_array_equal(ids, [stoi[c] for c in text])
    assert tok.decode(ids) == text
    assert tok.vocab_size == len(stoi)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="shared Tiny Shakespeare copy not present")
def test_char_tiny_shakespeare_matches_nanogpt():
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tok = CharTokenizer.fit(text)
    assert tok.vocab_size == 65  # nanoGPT's shakespeare_char vocab
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    np.testing.assert_array_equal(tok.encode("First"), [18, 47, 56, 57, 58])


def test_char_special_tokens_come_first_and_decode():
    tok = CharTokenizer.fit("hello", special_tokens=["[PAD]", "[MASK]"])
    assert tok.special_tokens == ("[PAD]", "[MASK]") and tok.special_token_ids == (0, 1)
    assert tok.vocab_size == 2 + 4
    assert tok.token_to_id("[MASK]") == 1 and tok.token_to_id("e") == 2
    assert tok.id_to_token(0) == "[PAD]" and tok.id_to_token(5) == "o"
    ids = np.concatenate([[1], tok.encode("hello"), [0, 0]])
    assert tok.decode(ids) == "[MASK]hello[PAD][PAD]"
    assert tok.decode(ids, skip_special_tokens=True) == "hello"
    # Special tokens are not parsed out of text: these are characters, all unknown here.
    with pytest.raises(ValueError, match=r"not in the vocabulary"):
        tok.encode("[PAD]")


def test_char_unknown_character_error_names_it():
    tok = CharTokenizer.fit("abc")
    with pytest.raises(ValueError, match=r"CharTokenizer.encode: 2 character\(s\) not in the "
                                         r"vocabulary: 'xz' \(first at position 1\)"):
        tok.encode("axbz")


def test_char_unk_token_maps_unknown_characters():
    tok = CharTokenizer.fit("abc", unk_token="<unk>")
    assert tok.special_tokens == ("<unk>",)
    np.testing.assert_array_equal(tok.encode("a?c😀"), [1, 0, 3, 0])
    assert tok.decode(tok.encode("a?c")) == "a<unk>c"
    np.testing.assert_array_equal(tok.encode(""), np.zeros(0, np.int32))
    assert tok.decode([]) == ""


def test_char_save_load_round_trip(tmp_path):
    tok = CharTokenizer.fit("a\"b\\\n\u2028😀", special_tokens=["[PAD]"], unk_token="[UNK]")
    tok.save(tmp_path / "char.json")
    loaded = CharTokenizer.load(tmp_path / "char.json")
    assert loaded.chars == tok.chars and loaded.special_tokens == tok.special_tokens
    assert loaded.unk_token == "[UNK]"
    text = "b😀\n\u2028a\"\\?"
    np.testing.assert_array_equal(loaded.encode(text), tok.encode(text))
    assert repr(loaded) == "CharTokenizer(vocab_size=9, special_tokens=('[PAD]', '[UNK]'))"


def test_char_load_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"CharTokenizer.load: .*bad\.json is not JSON"):
        CharTokenizer.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match=r"CharTokenizer.load: .*other\.json is not a saved "
                                         r"CharTokenizer \(format 'something', expected "
                                         r"'nnlib.CharTokenizer'\)"):
        CharTokenizer.load(tmp_path / "other.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"format 'list'"):
        CharTokenizer.load(tmp_path / "list.json")


def test_char_construction_errors():
    with pytest.raises(ValueError, match=r"CharTokenizer.fit expected a non-empty string, got ''"):
        CharTokenizer.fit("")
    with pytest.raises(ValueError, match=r"CharTokenizer: chars must be single characters, got "
                                         r"\['ab'\]"):
        CharTokenizer(["ab", "c"])
    with pytest.raises(ValueError, match=r"CharTokenizer: special tokens \['a'\] are also "
                                         r"ordinary characters"):
        CharTokenizer.fit("abc", special_tokens=["a"])
    with pytest.raises(ValueError, match=r"CharTokenizer: the vocabulary is empty"):
        CharTokenizer([])
    only_specials = CharTokenizer([], special_tokens=["[PAD]"], unk_token="[UNK]")
    np.testing.assert_array_equal(only_specials.encode("xy"), [1, 1])


def test_char_bad_ids_and_inputs():
    tok = CharTokenizer.fit("abc")
    with pytest.raises(ValueError, match=r"CharTokenizer.decode expected ids of shape \[time\], "
                                         r"got shape \(1, 2\)"):
        tok.decode([[0, 1]])
    with pytest.raises(ValueError, match=r"CharTokenizer.decode: ids must be in "
                                         r"\[0, vocab_size=3\), got \[3, -1\]"):
        tok.decode([0, 3, -1])
    with pytest.raises(ValueError, match=r"CharTokenizer.decode expected integer ids, got dtype "
                                         r"float64"):
        tok.decode([0.0, 1.0])
    with pytest.raises(TypeError, match=r"CharTokenizer.encode expected a str, got bytes"):
        tok.encode(b"abc")
    with pytest.raises(KeyError, match=r"'z' is not in the vocabulary"):
        tok.token_to_id("z")


# --- BPETokenizer (needs the optional Hugging Face tokenizers package) ---


@pytest.fixture(scope="module")
def corpus():
    from nnlib.data.text import python_stdlib_corpus

    return python_stdlib_corpus(max_chars=150_000).split("\n\n")


@pytest.fixture(scope="module")
def bert_bpe(corpus):
    pytest.importorskip("tokenizers")
    return BPETokenizer.train(corpus, 600)


ROUND_TRIP = [
    "def f(x):\n    return x  # comment\n",
    "  leading spaces, trailing space ",
    "\t\ttabs\r\nCRLF\n\n\nblank lines",
    "unicode: é ü 語 🤖 \u200b zero-width; combining e\u0301",
    "",
    "[MASK] and [CLS] written in text",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_bpe_round_trip(bert_bpe, text):
    ids = bert_bpe.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert bert_bpe.decode(ids) == text


def test_bpe_trained_vocabulary(bert_bpe):
    assert bert_bpe.vocab_size == 600
    assert bert_bpe.special_tokens == BERT_SPECIAL_TOKENS
    assert bert_bpe.special_token_ids == (0, 1, 2, 3, 4)
    assert bert_bpe.pad_id == 0
    # Merges were learnt: common code is shorter than its byte count.
    text = "def __init__(self):\n        return self\n"
    assert len(bert_bpe.encode(text)) < len(text.encode()) / 2
    # Special tokens written in text are recognised (Hugging Face behaviour).
    ids = bert_bpe.encode("a [MASK] b")
    assert bert_bpe.token_to_id("[MASK]") in ids.tolist()
    assert bert_bpe.decode(ids, skip_special_tokens=True) == "a  b"
    assert repr(bert_bpe).startswith("BPETokenizer(vocab_size=600, special_tokens=('[PAD]'")


def test_bpe_encode_batch_padding_and_truncation(bert_bpe):
    texts = ["short", "a somewhat longer line of text, with more tokens", "mid length"]
    singles = [bert_bpe.encode(t) for t in texts]
    batch = bert_bpe.encode_batch(texts)
    assert isinstance(batch, EncodedBatch)
    longest = max(len(s) for s in singles)
    assert batch.ids.shape == batch.valid.shape == (3, longest)
    assert batch.ids.dtype == np.int32 and batch.valid.dtype == bool
    for row, single in enumerate(singles):
        np.testing.assert_array_equal(batch.ids[row, :len(single)], single)
        assert np.all(batch.ids[row, len(single):] == 0)  # [PAD]
        assert batch.valid[row].sum() == len(single)
    assert bert_bpe.decode_batch(batch.ids, batch.valid) == texts

    fixed = bert_bpe.encode_batch(texts, max_length=32, padding="max_length")
    assert fixed.ids.shape == (3, 32)

    cut = bert_bpe.encode_batch(texts, max_length=4, add_special_tokens=True)
    assert cut.ids.shape == (3, 4)
    cls_id, sep_id = bert_bpe.token_to_id("[CLS]"), bert_bpe.token_to_id("[SEP]")
    for row, single in enumerate(singles):
        body = single[:2]
        expected = [cls_id, *body.tolist(), sep_id]
        np.testing.assert_array_equal(cut.ids[row, :len(expected)], expected)
    short = bert_bpe.decode(singles[0][:2])
    assert bert_bpe.decode_batch(cut.ids, cut.valid, skip_special_tokens=True)[0] == short
    assert bert_bpe.decode_batch(cut.ids)[0].startswith("[CLS]")


def test_bpe_encode_batch_errors(bert_bpe):
    fn = r"BPETokenizer.encode_batch"
    long = "many tokens " * 20
    with pytest.raises(ValueError, match=fn + r": text 1 has \d+ tokens, more than "
                                              r"max_length=8, and truncation=False"):
        bert_bpe.encode_batch(["ok", long], max_length=8, truncation=False)
    with pytest.raises(ValueError, match=fn + r": padding='max_length' needs max_length"):
        bert_bpe.encode_batch(["ok"], padding="max_length")
    with pytest.raises(ValueError, match=fn + r": padding must be 'longest' or 'max_length', "
                                              r"got 'left'"):
        bert_bpe.encode_batch(["ok"], padding="left")
    with pytest.raises(ValueError, match=fn + r": max_length must leave room .* 2 special "
                                              r"ones, got 2"):
        bert_bpe.encode_batch(["ok"], max_length=2, add_special_tokens=True)
    with pytest.raises(TypeError, match=fn + r" expected a list of strings, got str"):
        bert_bpe.encode_batch("ok")
    with pytest.raises(ValueError, match=r"BPETokenizer.decode: ids must be in "
                                         r"\[0, vocab_size=600\), got \[600\]"):
        bert_bpe.decode([600])
    with pytest.raises(ValueError, match=r"BPETokenizer.decode_batch expected ids of shape "
                                         r"\[batch, time\], got shape \(3,\)"):
        bert_bpe.decode_batch([1, 2, 3])
    with pytest.raises(ValueError, match=r"BPETokenizer.decode_batch expected valid of shape "
                                         r"\(1, 3\), got shape \(1, 2\)"):
        bert_bpe.decode_batch([[1, 2, 3]], [[True, True]])
    with pytest.raises(TypeError, match=r"BPETokenizer.encode expected a str, got list"):
        bert_bpe.encode(["ok"])
    with pytest.raises(KeyError, match=r"'<\|endoftext\|>' is not in the vocabulary"):
        bert_bpe.token_to_id("<|endoftext|>")


def test_bpe_gpt_special_tokens(corpus):
    pytest.importorskip("tokenizers")
    gpt = BPETokenizer.train(corpus[:200], 300, special_tokens=GPT_SPECIAL_TOKENS)
    eos = gpt.token_to_id("<|endoftext|>")
    assert eos == 0 and gpt.pad_id == eos and gpt.vocab_size <= 300
    batch = gpt.encode_batch(["x = 1", "y"], add_special_tokens=True)
    assert batch.ids[0, batch.valid[0].sum() - 1] == eos
    np.testing.assert_array_equal(batch.ids[0, :-1], gpt.encode("x = 1"))
    assert gpt.decode(gpt.encode("x = 1 🤖")) == "x = 1 🤖"


def test_bpe_without_pad_or_wrapping_tokens(corpus):
    pytest.importorskip("tokenizers")
    bare = BPETokenizer.train(corpus[:50], 270, special_tokens=())
    with pytest.raises(ValueError, match=r"BPETokenizer: no \[PAD\] or <\|endoftext\|> token"):
        bare.encode_batch(["a"])
    assert bare.encode_batch(["a", "bb"], pad_id=7).ids[0, -1] == 7
    with pytest.raises(ValueError, match=r"add_special_tokens=True needs \[CLS\] and \[SEP\]"):
        bare.encode_batch(["a"], add_special_tokens=True, pad_id=0)


def test_bpe_train_errors(corpus):
    pytest.importorskip("tokenizers")
    with pytest.raises(ValueError, match=r"BPETokenizer.train: vocab_size must be at least 261 "
                                         r"\(256 bytes plus 5 special tokens\), got 100"):
        BPETokenizer.train(corpus, 100)
    with pytest.raises(TypeError, match=r"BPETokenizer.train expected an iterable of strings, "
                                        r"got one str"):
        BPETokenizer.train("one long string", 300)


def test_bpe_save_load(bert_bpe, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    bert_bpe.save(path)
    loaded = BPETokenizer.load(path)
    text = ROUND_TRIP[0] + ROUND_TRIP[3]
    np.testing.assert_array_equal(loaded.encode(text), bert_bpe.encode(text))
    assert loaded.special_tokens == BERT_SPECIAL_TOKENS
    # A tokenizer.json that pads and truncates by itself (as MiniLM's does) is tamed.
    raw = tokenizers.Tokenizer.from_file(str(path))
    raw.enable_padding(pad_id=0, pad_token="[PAD]", length=128)
    raw.enable_truncation(max_length=3)
    raw.save(str(tmp_path / "padded.json"))
    tamed = BPETokenizer.load(tmp_path / "padded.json")
    np.testing.assert_array_equal(tamed.encode(text), bert_bpe.encode(text))


def test_bpe_load_errors(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(FileNotFoundError, match=r"BPETokenizer.load: no such file: .*none\.json"):
        BPETokenizer.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match=r"BPETokenizer.load: .*bad\.json is not a "
                                         r"tokenizer\.json"):
        BPETokenizer.load(tmp_path / "bad.json")


def test_bpe_without_tokenizers_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # import now fails
    with pytest.raises(ImportError, match=r"BPETokenizer needs the Hugging Face 'tokenizers' "
                                          r"package: pip install 'nnlib\[data\]'"):
        BPETokenizer.train(["abc"], 300)
