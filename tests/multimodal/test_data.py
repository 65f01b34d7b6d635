"""Captioned digits: attributes against hand-made images, seeded captions, tokens."""

from __future__ import annotations

import numpy as np
import pytest

from nnlib.multimodal import data


def _stroke(points):
    img = np.zeros((1, 8, 8, 1), np.float32)
    for r, c in points:
        img[0, r, c, 0] = 1.0
    return img


def test_slant_and_ink_on_hand_drawn_strokes():
    upright = _stroke([(r, 4) for r in range(1, 7)])
    right = _stroke([(r, 7 - r) for r in range(8)])  # top at the right: leans right
    left = _stroke([(r, r) for r in range(8)])
    np.testing.assert_allclose(data.slant(upright), 0.0, atol=1e-12)
    np.testing.assert_allclose(data.slant(right), -1.0, rtol=1e-12)  # dx/dy = -1
    np.testing.assert_allclose(data.slant(left), 1.0, rtol=1e-12)
    np.testing.assert_allclose(data.ink_mass(np.concatenate([upright, right])), [6.0, 8.0])


def test_thresholds_are_per_class_and_fitted_on_train():
    d = data.load_digit_captions()
    train, test = d.splits["train"], d.splits["test"]
    for c in range(10):
        in_class = train["labels"] == c
        # Median split: about half of each class is "thick"; terciles for slant.
        assert abs(train["weight"][in_class].mean() - 0.5) < 0.05
        counts = np.bincount(train["slant"][in_class], minlength=3) / in_class.sum()
        np.testing.assert_allclose(counts, 1 / 3, atol=0.05)
        mass = data.ink_mass(train["images"][in_class])
        assert d.thresholds.weight[c] == pytest.approx(np.median(mass))
    # Test attributes use the train cut points (recomputed here by hand).
    mass = data.ink_mass(test["images"])
    np.testing.assert_array_equal(test["weight"],
                                  mass > d.thresholds.weight[test["labels"]])
    assert d.tokenizer.token_to_id(data.PAD) == 0


def test_captions_are_seeded_and_say_the_class_and_attributes():
    d = data.load_digit_captions()
    a, tok_a = d.captions("test", seed=3)
    b, tok_b = d.captions("test", seed=3)
    c, _ = d.captions("test", seed=4)
    assert a == b and a != c
    np.testing.assert_array_equal(tok_a, tok_b)
    s = d.splits["test"]
    for text, y, w, sl in zip(a, s["labels"], s["weight"], s["slant"], strict=True):
        words = text.replace(",", "").split()
        assert data.NUMBER_WORDS[y] in words or str(y) in words, text
        assert not any(other in text for other in data.WEIGHT_WORDS
                       if other != data.WEIGHT_WORDS[w])
        assert not any(other in text for other in data.SLANT_WORDS
                       if other != data.SLANT_WORDS[sl])
    # Every template is used; a held-out template's words never occur in training captions.
    _, ids = data.make_captions(s["labels"], s["weight"], s["slant"], seed=0)
    assert set(ids.tolist()) == set(range(len(data.TRAIN_TEMPLATES)))
    train_words = {w for p in data.class_prompts(data.TRAIN_TEMPLATES) for x in p
                   for w in x.replace(",", "").split()}
    for word in ("photo", "scan", "numeral", "picture", "image"):
        assert word not in train_words


def test_tokenize_appends_eos_and_pads():
    for kind in ("word", "char"):
        tok = data.caption_tokenizer(kind)
        pad, eos = tok.token_to_id(data.PAD), tok.token_to_id(data.EOS)
        ids = data.tokenize(tok, ["a handwritten seven", "7"], max_len=24)
        assert ids.shape == (2, 24) and ids.dtype == np.int32
        for row, text in zip(ids, ["a handwritten seven", "7"], strict=True):
            n = len(tok.encode(text))
            assert row[n] == eos and (row[n + 1:] == pad).all() and (row[:n] != pad).all()
            assert tok.decode(row[:n]) == text
        with pytest.raises(ValueError, match="needs max_len >= "):
            data.tokenize(tok, ["a handwritten seven"], max_len=2)
    # The word tokenizer makes each training word one token.
    tok = data.caption_tokenizer("word")
    assert len(tok.encode("a thick, upright handwritten seven")) == 6  # a thick , upright ...
    with pytest.raises(ValueError, match="kind must be 'word' or 'char'"):
        data.caption_tokenizer("bytes")


def test_class_prompts_cover_every_attribute_filling():
    prompts = data.class_prompts(("a {weight} {word}", "the digit {digit}"))
    assert len(prompts) == 10
    assert prompts[7] == ["a thin seven", "a thick seven", "the digit 7"]


def test_caption_relevance_is_what_the_template_would_say_of_each_image():
    d = data.load_digit_captions()
    s = d.splits["val"]
    n = 60
    templates = data.TRAIN_TEMPLATES + data.HELD_OUT_TEMPLATES
    texts, ids = data.make_captions(s["labels"][:n], s["weight"][:n], s["slant"][:n],
                                    templates, seed=5)
    got = data.caption_relevance(s["labels"][:n], s["weight"][:n], s["slant"][:n], ids,
                                 templates)
    # Independent definition: caption j describes image i iff its template, filled
    # in with image i's class and attributes, gives the same string.
    want = np.array([[data.fill(templates[ids[j]], int(s["labels"][i]), int(s["weight"][i]),
                                int(s["slant"][i])) == texts[j] for j in range(n)]
                     for i in range(n)])
    np.testing.assert_array_equal(got, want)
    assert got.diagonal().all() and 0 < got.mean() < 0.5
    # The data set's retrieval_set gives the same captions as captions(...).
    texts2, tokens, relevant = d.retrieval_set("val", data.HELD_OUT_TEMPLATES, seed=2)
    texts3, tokens3 = d.captions("val", data.HELD_OUT_TEMPLATES, seed=2)
    assert texts2 == texts3 and relevant.shape == (len(texts2),) * 2
    np.testing.assert_array_equal(tokens, tokens3)
