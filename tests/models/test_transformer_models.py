"""TransformerClassifier and Seq2SeqTransformer: shapes, padding invariance,
decoder causality, hand-counted parameters, tiny overfit runs through
``make_train_step``, a seq2seq model that learns to reverse sequences, greedy
decoding against a token-by-token Python loop, and the error messages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnlib.layers import ShapeError
from nnlib.models.transformer import Seq2SeqTransformer, TransformerClassifier
from nnlib.train import TrainState, classification_loss, make_train_step, num_params

KEY = jax.random.key(0)
PAD, BOS, EOS = 0, 1, 2  # special ids of the seq2seq tests; symbols are 3..VOCAB-1
VOCAB = 9


@pytest.fixture(autouse=True)
def strict_dtype_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


def _normal(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _tokens(shape, seed=0, low=3, high=VOCAB):
    return np.random.default_rng(seed).integers(low, high, shape).astype(np.int32)


def _mask(lengths, time):
    return np.arange(time)[None, :] < np.asarray(lengths)[:, None]  # [B, T]


def _seq2seq(**overrides):
    config = dict(vocab_size=VOCAB, num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32,
                  max_len=8)
    return Seq2SeqTransformer(**{**config, **overrides})


def _init(model, *args):
    return jax.jit(model.init)(KEY, *args)


# --------------------------------------------------------------------------- #
# Shapes (eval_shape: traced, never compiled).
# --------------------------------------------------------------------------- #


@settings(max_examples=10, deadline=None)
@given(
    tokens=st.booleans(),
    pooling=st.sampled_from(["cls", "mean"]),
    num_layers=st.integers(1, 2),
    num_heads=st.sampled_from([1, 2]),
    batch=st.integers(1, 3),
    time=st.integers(1, 6),
    features=st.integers(1, 5),
    classes=st.integers(1, 4),
)
def test_classifier_shapes(tokens, pooling, num_layers, num_heads, batch, time, features,
                           classes):
    model = TransformerClassifier(
        num_layers=num_layers, num_heads=num_heads, embed_dim=4, mlp_dim=8,
        num_classes=classes, max_len=6, pooling=pooling, vocab_size=7 if tokens else None)
    x = jax.ShapeDtypeStruct((batch, time), jnp.int32) if tokens else jax.ShapeDtypeStruct(
        (batch, time, features), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch, time), jnp.bool_)
    variables = jax.eval_shape(model.init, KEY, x)
    logits = jax.eval_shape(lambda v, x, m: model.apply(v, x, key_padding_mask=m),
                            variables, x, mask)
    assert logits.shape == (batch, classes) and logits.dtype == jnp.float32


@settings(max_examples=6, deadline=None)
@given(num_layers=st.integers(1, 2), batch=st.integers(1, 3), source_len=st.integers(1, 8),
       target_len=st.integers(1, 8))
def test_seq2seq_shapes(num_layers, batch, source_len, target_len):
    model = _seq2seq(num_layers=num_layers)
    inputs = {"source": jax.ShapeDtypeStruct((batch, source_len), jnp.int32),
              "target_in": jax.ShapeDtypeStruct((batch, target_len), jnp.int32)}
    variables = jax.eval_shape(model.init, KEY, inputs)
    assert jax.eval_shape(model.apply, variables, inputs).shape == (batch, target_len, VOCAB)


# --------------------------------------------------------------------------- #
# Padding invariance and causality.
# --------------------------------------------------------------------------- #


def test_classifier_ignores_padded_positions():
    # [CLS] pooling here (the mask gains a column); mean pooling in the next test.
    model = TransformerClassifier(num_layers=2, num_heads=2, embed_dim=8, mlp_dim=16,
                                  num_classes=3, max_len=6, pooling="cls")
    lengths = [6, 4, 1]
    mask = _mask(lengths, 6)
    x = _normal((3, 6, 5))
    noisy = np.where(mask[..., None], x, _normal(x.shape, seed=1) * 100)
    variables = _init(model, x)
    apply = jax.jit(lambda v, x, m=None: model.apply(v, x, key_padding_mask=m))
    logits = apply(variables, x, mask)
    np.testing.assert_allclose(apply(variables, noisy, mask), logits, rtol=1e-5, atol=1e-6)
    # Right padding: each row equals the sequence cut to its length, unpadded.
    alone = apply(variables, x[2:3, :1])
    np.testing.assert_allclose(alone[0], logits[2], rtol=1e-5, atol=1e-5)


def test_token_classifier_masks_pad_ids_and_explicit_masks():
    model = TransformerClassifier(num_layers=1, num_heads=2, embed_dim=8, mlp_dim=16,
                                  num_classes=3, max_len=8, pooling="mean", vocab_size=VOCAB,
                                  pad_id=PAD)
    tokens = _tokens((2, 5))
    tokens[1, 3:] = PAD
    variables = _init(model, tokens)
    apply = jax.jit(lambda v, x, m: model.apply(v, x, key_padding_mask=m))
    logits = apply(variables, tokens, np.ones((2, 5), bool))
    longer = np.concatenate([tokens, np.full((2, 3), PAD, np.int32)], axis=1)  # more padding
    np.testing.assert_allclose(apply(variables, longer, np.ones((2, 8), bool))[1], logits[1],
                               rtol=1e-5, atol=1e-6)
    # An explicit mask is anded with the pad ids: masked tokens may be anything.
    mask = np.ones((2, 5), bool)
    mask[0, 1] = False
    changed = tokens.copy()
    changed[0, 1] = 3 + (tokens[0, 1] - 2) % 6
    np.testing.assert_allclose(apply(variables, changed, mask), apply(variables, tokens, mask),
                               rtol=1e-6, atol=1e-6)


def test_seq2seq_ignores_source_padding_and_is_causal():
    model = _seq2seq()
    source = _tokens((2, 5), seed=2)
    source[0, 3:] = PAD
    target_in = _tokens((2, 6), seed=3)
    variables = _init(model, {"source": source, "target_in": target_in})
    apply = jax.jit(lambda v, s, t: model.apply(v, {"source": s, "target_in": t}))
    logits = apply(variables, source, target_in)

    # Source padding changes nothing: row 0 equals its 3-token source unpadded.
    alone = apply(variables, source[:1, :3], target_in[:1])
    np.testing.assert_allclose(alone[0], logits[0], rtol=1e-5, atol=1e-5)

    # Changing target token t leaves every earlier position's logits as they were.
    for t in (1, 4):
        changed = target_in.copy()
        changed[:, t] = 3 + (target_in[:, t] - 2) % 6
        other = apply(variables, source, changed)
        np.testing.assert_allclose(other[:, :t], logits[:, :t], rtol=1e-6, atol=1e-6)
        assert np.all(np.abs(other[:, t] - logits[:, t]).max(-1) > 1e-4)


# --------------------------------------------------------------------------- #
# Parameter counts by hand.
# --------------------------------------------------------------------------- #


def _encoder_block(d, m):
    # two LayerNorms, q/k/v/out projections with biases, MLP d -> m -> d
    return 2 * 2 * d + 4 * (d * d + d) + (d * m + m + m * d + d)


def test_parameter_counts_match_formulas():
    f, d, m, c, t, v = 5, 8, 16, 3, 6, 11
    for layers in (1, 2):
        body = layers * _encoder_block(d, m) + 2 * d  # + final LayerNorm
        head = d * c + c
        float_model = TransformerClassifier(num_layers=layers, num_heads=2, embed_dim=d,
                                            mlp_dim=m, num_classes=c, max_len=t)
        params = jax.eval_shape(float_model.init, KEY, _normal((1, 2, f)))["params"]
        # input projection, learned positions, [CLS], body, head
        assert num_params(params) == (f * d + d) + t * d + d + body + head
        token_model = float_model.clone(vocab_size=v, pooling="mean")
        params = jax.eval_shape(token_model.init, KEY, np.zeros((1, 2), np.int32))["params"]
        assert num_params(params) == v * d + t * d + body + head

        seq2seq = _seq2seq(num_layers=layers, embed_dim=d, mlp_dim=m, vocab_size=v)
        inputs = {"source": np.zeros((1, 2), np.int32), "target_in": np.zeros((1, 3), np.int32)}
        params = jax.eval_shape(seq2seq.init, KEY, inputs)["params"]
        decoder_block = _encoder_block(d, m) + 2 * d + 4 * (d * d + d)  # + cross-attention
        # shared (tied) embedding, encoder, decoder; sinusoidal positions are free
        assert num_params(params) == v * d + body + layers * decoder_block + 2 * d


# --------------------------------------------------------------------------- #
# Gradients flow: tiny problems are learned through the real train step.
# --------------------------------------------------------------------------- #


def _train(model, inputs, labels, steps, learning_rate):
    batch = {"inputs": inputs, "labels": labels}
    # optax's Adam relies on standard dtype promotion (bias correction).
    with jax.numpy_dtype_promotion("standard"):
        state = jax.jit(lambda k: TrainState.create(
            model=model, tx=optax.adam(learning_rate), key=k, example_input=inputs))(KEY)
        step = jax.jit(make_train_step(classification_loss()), donate_argnums=0)
        for _ in range(steps):
            state, _ = step(state, batch)
    return state.params


def test_classifier_memorises_a_tiny_batch():
    # Float features, [CLS] pooling, dropout on. The token-embedding path learns
    # in the seq2seq test below (one compile fewer here).
    model = TransformerClassifier(num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32,
                                  num_classes=3, max_len=6, dropout_rate=0.1)
    inputs = _normal((16, 6, 4), seed=4)
    labels = np.random.default_rng(5).integers(0, 3, 16).astype(np.int32)  # random labels
    params = _train(model, inputs, labels, steps=100, learning_rate=1e-2)
    logits = jax.jit(model.apply)({"params": params}, inputs)
    np.testing.assert_array_equal(np.argmax(logits, -1), labels)


def _reverse_task(n, length, seed):
    """Source: random symbols; target: the source reversed, then EOS."""
    source = _tokens((n, length), seed=seed)
    reversed_ = source[:, ::-1]
    target_out = np.concatenate([reversed_, np.full((n, 1), EOS, np.int32)], axis=1)
    target_in = np.concatenate([np.full((n, 1), BOS, np.int32), reversed_], axis=1)
    return source, target_in, target_out


@pytest.fixture(scope="module")
def trained_reverser():
    """A small seq2seq model trained (teacher forcing) to reverse 32 sequences."""
    model = _seq2seq()
    source, target_in, target_out = _reverse_task(32, 4, seed=6)
    params = _train(model, {"source": source, "target_in": target_in}, target_out,
                    steps=100, learning_rate=1e-2)
    return model, params, source, target_out


def test_seq2seq_learns_to_reverse(trained_reverser):
    model, params, source, target_out = trained_reverser
    decoded = model.greedy_decode(params, source, max_len=5, bos_id=BOS, eos_id=EOS)
    assert decoded.shape == target_out.shape and decoded.dtype == jnp.int32
    exact_match = np.mean(np.all(np.asarray(decoded) == target_out, axis=1))
    assert exact_match >= 0.9


def test_greedy_decode_matches_token_by_token_forward_passes(trained_reverser):
    model, params, source, _ = trained_reverser
    source = np.concatenate([source[:3], _tokens((1, 4), seed=7)])  # one unseen
    source[1, 2:] = PAD  # and one padded source
    max_len = 6
    decoded = np.asarray(model.greedy_decode({"params": params}, source, max_len, BOS, EOS))

    # A full forward pass per step. The prefix sits in a fixed-length buffer
    # (one compile) whose unwritten tail is random symbols: the decoder is
    # causal (tested above), so position t only sees the prefix.
    apply = jax.jit(lambda p, s, t: model.apply({"params": p}, {"source": s, "target_in": t}))
    target_in = _tokens((4, max_len), seed=8)
    target_in[:, 0] = BOS
    finished = np.zeros(4, bool)
    expected = []
    for t in range(max_len):
        next_token = np.argmax(np.asarray(apply(params, source, target_in))[:, t], -1)
        next_token = np.where(finished, PAD, next_token).astype(np.int32)
        finished |= next_token == EOS
        expected.append(next_token)
        if t + 1 < max_len:
            target_in[:, t + 1] = next_token
    np.testing.assert_array_equal(decoded, np.stack(expected, axis=1))
    assert np.all(np.any(decoded == EOS, axis=1))  # the trained model does stop

    # Without an EOS id nothing stops early (shapes only: traced, not compiled).
    unstopped = jax.eval_shape(lambda p, s: model.greedy_decode(p, s, 3, BOS, None),
                               params, source)
    assert unstopped.shape == (4, 3) and unstopped.dtype == jnp.int32


# --------------------------------------------------------------------------- #
# Errors in the user's words.
# --------------------------------------------------------------------------- #


def _classifier(**overrides):
    config = dict(num_layers=1, num_heads=2, embed_dim=4, mlp_dim=8, num_classes=2, max_len=5)
    return TransformerClassifier(**{**config, **overrides})


def test_classifier_rejects_wrong_rank():
    with pytest.raises(ShapeError, match=r"TransformerClassifier expected inputs of shape "
                       r"\[batch, time, features\] \(rank 3\), got shape \(2, 3, 4, 1\)"):
        _classifier().init(KEY, np.zeros((2, 3, 4, 1), np.float32))


def test_classifier_rejects_tokens_without_vocab_and_floats_with_vocab():
    with pytest.raises(TypeError, match=r"TransformerClassifier got integer inputs of shape "
                       r"\(2, 3\) but was built for float features .* set vocab_size"):
        _classifier().init(KEY, np.zeros((2, 3), np.int32))
    with pytest.raises(TypeError, match=r"TransformerClassifier expected integer token ids "
                       r"inputs of shape \[batch, time\], got dtype float32"):
        _classifier(vocab_size=5).init(KEY, np.zeros((2, 3), np.float32))


def test_classifier_rejects_feature_size_change():
    model = _classifier()
    variables = jax.eval_shape(model.init, KEY, np.zeros((1, 3, 4), np.float32))
    with pytest.raises(ShapeError, match=r"features=4, got shape \(1, 3, 6\)"):
        jax.eval_shape(model.apply, variables, np.zeros((1, 3, 6), np.float32))


def test_classifier_rejects_too_long_sequences():
    with pytest.raises(ShapeError, match=r"TransformerClassifier was built for sequences of at "
                       r"most max_len=5 positions, got inputs of length 6"):
        _classifier().init(KEY, np.zeros((1, 6, 2), np.float32))


def test_classifier_rejects_bad_mask_and_options():
    with pytest.raises(ShapeError, match=r"TransformerClassifier expected key_padding_mask of "
                       r"shape \[batch, time\] = \(2, 3\), got shape \(2, 4\)"):
        jax.eval_shape(lambda x, m: _classifier().init(KEY, x, key_padding_mask=m),
                       np.zeros((2, 3, 1), np.float32), np.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"TransformerClassifier got pooling='max'; expected "
                       r"'cls' or 'mean'"):
        _classifier(pooling="max").init(KEY, np.zeros((2, 3, 1), np.float32))
    with pytest.raises(ValueError, match=r"TransformerClassifier expected a positive integer "
                       r"embed_dim, got 0"):
        _classifier(embed_dim=0).init(KEY, np.zeros((2, 3, 1), np.float32))


def test_seq2seq_rejects_bad_inputs():
    model = _seq2seq()
    source, target_in = np.ones((2, 3), np.int32), np.ones((2, 4), np.int32)
    with pytest.raises(TypeError, match=r"Seq2SeqTransformer expected inputs as a dict "
                       r"\{'source': \[batch, src_len\], 'target_in': \[batch, time\]\} of "
                       r"integer ids, got ndarray"):
        model.init(KEY, source)
    with pytest.raises(TypeError, match=r"got \['source', 'target'\]"):
        model.init(KEY, {"source": source, "target": target_in})
    with pytest.raises(TypeError, match=r"Seq2SeqTransformer expected integer token ids source "
                       r"of shape \[batch, time\], got dtype float32"):
        model.init(KEY, {"source": source.astype(np.float32), "target_in": target_in})
    with pytest.raises(ShapeError, match=r"Seq2SeqTransformer expected source \[batch, src_len\] "
                       r"and target_in \[batch, time\] with the same batch, got shapes \(2, 3\) "
                       r"and \(1, 4\)"):
        model.init(KEY, {"source": source, "target_in": target_in[:1]})
    with pytest.raises(ValueError, match=r"Seq2SeqTransformer got target_in ids in \[1, 9\], "
                       r"outside \[0, vocab_size=9\)"):
        model.init(KEY, {"source": source, "target_in": np.where(np.eye(2, 4) > 0, 9, target_in)})
    with pytest.raises(ShapeError, match=r"max_len=8 positions, got source of length 9"):
        model.init(KEY, {"source": np.ones((2, 9), np.int32), "target_in": target_in})


def test_greedy_decode_rejects_bad_arguments():
    model = _seq2seq()
    with pytest.raises(ValueError, match=r"Seq2SeqTransformer.greedy_decode expected max_len in "
                       r"\[1, 8\] \(the model's max_len\), got 9"):
        model.greedy_decode({}, np.ones((1, 3), np.int32), 9, BOS, EOS)
    with pytest.raises(ShapeError, match=r"Seq2SeqTransformer.greedy_decode expected source of "
                       r"shape \[batch, time\] \(rank 2\), got shape \(3,\)"):
        model.greedy_decode({}, np.ones((3,), np.int32), 4, BOS, EOS)
