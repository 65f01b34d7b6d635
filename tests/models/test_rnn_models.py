"""RNNClassifier and RNNLanguageModel: shapes, PyTorch parity (incl. packed
padded sequences), padding invariance, causality, hand-counted parameters,
a tiny overfit run through ``make_train_step``, and the error messages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnlib.layers import ShapeError
from nnlib.models.rnn import RNNClassifier, RNNLanguageModel
from nnlib.train import TrainState, classification_loss, make_train_step, num_params

KEY = jax.random.key(0)


@pytest.fixture(autouse=True)
def strict_dtype_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


def _normal(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _mask(lengths, time):
    return np.arange(time)[None, :] < np.asarray(lengths)[:, None]  # [B, T]


# Compiling whole models once is much cheaper than dispatching their many small
# ops eagerly (each of which compiles on first use), so tests jit init/apply.
def _init(model, *args, **kwargs):
    return jax.jit(lambda key, *a: model.init(key, *a, **kwargs))(KEY, *args)


def _apply(model, variables, *args, **arrays):
    return jax.jit(lambda v, a, kw: model.apply(v, *a, **kw))(variables, args, arrays)


# --------------------------------------------------------------------------- #
# Shapes.
# --------------------------------------------------------------------------- #


@settings(max_examples=10, deadline=None)
@given(
    cell=st.sampled_from(["lstm", "gru", "rnn"]),
    num_layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    pooling=st.sampled_from(["last", "mean"]),
    batch=st.integers(1, 3),
    time=st.integers(1, 5),
    features=st.integers(1, 4),
    hidden=st.integers(1, 5),
    classes=st.integers(1, 4),
)
def test_classifier_shapes(cell, num_layers, bidirectional, pooling, batch, time, features,
                           hidden, classes):
    model = RNNClassifier(num_classes=classes, hidden_size=hidden, cell=cell,
                          num_layers=num_layers, bidirectional=bidirectional, pooling=pooling)
    x = jax.ShapeDtypeStruct((batch, time, features), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch, time), jnp.bool_)
    # Shapes only: eval_shape traces init and apply without compiling.
    variables = jax.eval_shape(model.init, KEY, x)
    assert jax.eval_shape(model.apply, variables, x).shape == (batch, classes)
    assert jax.eval_shape(
        lambda v, x, m: model.apply(v, x, mask=m), variables, x, mask).shape == (batch, classes)


@settings(max_examples=10, deadline=None)
@given(cell=st.sampled_from(["lstm", "gru", "rnn"]), num_layers=st.integers(1, 2),
       batch=st.integers(1, 3), time=st.integers(1, 6), vocab=st.integers(2, 9))
def test_language_model_shapes(cell, num_layers, batch, time, vocab):
    model = RNNLanguageModel(vocab_size=vocab, embed_dim=3, hidden_size=4,
                             num_layers=num_layers, cell=cell)
    tokens = jax.ShapeDtypeStruct((batch, time), jnp.int32)
    variables = jax.eval_shape(model.init, KEY, tokens)
    assert jax.eval_shape(model.apply, variables, tokens).shape == (batch, time, vocab)


# --------------------------------------------------------------------------- #
# Against PyTorch (independent implementation, packed sequences for padding).
# --------------------------------------------------------------------------- #


def _copy_torch_rnn(torch_rnn, params, cell, bidirectional):
    """nnlib parameters from a torch nn.LSTM/GRU/RNN (kernels transposed)."""
    out = {}
    for layer in range(torch_rnn.num_layers):
        directions = [("", "forward_cell"), ("_reverse", "backward_cell")]
        for suffix, name in directions if bidirectional else directions[:1]:
            def w(kind, s=suffix, i=layer):
                return getattr(torch_rnn, f"{kind}_l{i}{s}").detach().numpy()
            p = {"input": {"kernel": w("weight_ih").T}, "recurrent": {"kernel": w("weight_hh").T}}
            if cell == "gru":  # the reset gate scales the recurrent bias separately
                p["input"]["bias"] = w("bias_ih")
                p["recurrent"]["bias"] = w("bias_hh")
            else:
                p["input"]["bias"] = w("bias_ih") + w("bias_hh")
            if bidirectional:
                out.setdefault(f"layer_{layer}", {})[name] = p
            else:
                out[f"layer_{layer}"] = {"cell": p}
    assert jax.tree.structure(out) == jax.tree.structure(
        {k: v for k, v in params.items() if k.startswith("layer_")})
    return out


@pytest.mark.parametrize("cell,bidirectional,pooling", [
    ("lstm", True, "last"), ("gru", False, "mean"), ("rnn", True, "mean"), ("gru", True, "last"),
])
def test_classifier_matches_torch_packed_sequences(cell, bidirectional, pooling):
    torch = pytest.importorskip("torch")
    batch, time, features, hidden, classes = 3, 5, 4, 6, 3
    lengths = [5, 2, 4]
    x = _normal((batch, time, features), seed=1)
    torch.manual_seed(0)
    rnn_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell]
    t_rnn = rnn_cls(features, hidden, num_layers=2, bidirectional=bidirectional,
                    batch_first=True)
    width = hidden * (2 if bidirectional else 1)
    t_head = torch.nn.Linear(width, classes)

    packed = torch.nn.utils.rnn.pack_padded_sequence(
        torch.from_numpy(x), torch.tensor(lengths), batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        out, h_n = t_rnn(packed)
        h_n = h_n[0] if cell == "lstm" else h_n  # LSTM returns (h_n, c_n)
        if pooling == "last":  # last layer's final state(s): PyTorch's h_n
            pooled = torch.cat([h_n[-2], h_n[-1]], -1) if bidirectional else h_n[-1]
        else:
            out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)  # zeros at pads
            pooled = out.sum(1) / torch.tensor(lengths, dtype=torch.float32)[:, None]
        expected = t_head(pooled).numpy()

    model = RNNClassifier(num_classes=classes, hidden_size=hidden, cell=cell, num_layers=2,
                          bidirectional=bidirectional, pooling=pooling)
    params = jax.eval_shape(model.init, KEY, x)["params"]
    params = {**_copy_torch_rnn(t_rnn, params, cell, bidirectional),
              "head": {"kernel": t_head.weight.detach().numpy().T,
                       "bias": t_head.bias.detach().numpy()}}
    got = _apply(model, {"params": params}, x, mask=_mask(lengths, time))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_language_model_matches_torch():
    torch = pytest.importorskip("torch")
    vocab, embed, hidden = 7, 3, 5
    tokens = np.random.default_rng(2).integers(0, vocab, (2, 6)).astype(np.int32)
    torch.manual_seed(1)
    t_embed = torch.nn.Embedding(vocab, embed)
    t_rnn = torch.nn.LSTM(embed, hidden, num_layers=2, batch_first=True)
    t_head = torch.nn.Linear(hidden, vocab)
    with torch.no_grad():
        out, _ = t_rnn(t_embed(torch.from_numpy(tokens).long()))
        expected = t_head(out).numpy()

    model = RNNLanguageModel(vocab_size=vocab, embed_dim=embed, hidden_size=hidden, num_layers=2)
    params = jax.eval_shape(model.init, KEY, tokens)["params"]
    params = {**_copy_torch_rnn(t_rnn, params, "lstm", False),
              "embedding": {"embedding": t_embed.weight.detach().numpy()},
              "head": {"kernel": t_head.weight.detach().numpy().T,
                       "bias": t_head.bias.detach().numpy()}}
    got = _apply(model, {"params": params}, tokens)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# Masks, causality, jit.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("bidirectional,pooling", [(False, "last"), (True, "mean")])
def test_classifier_ignores_padded_positions(bidirectional, pooling):
    model = RNNClassifier(num_classes=3, hidden_size=4, cell="gru", num_layers=2,
                          bidirectional=bidirectional, pooling=pooling)
    lengths = np.array([6, 3, 1])
    mask = _mask(lengths, 6)
    x = _normal((3, 6, 2))
    noisy = np.where(mask[..., None], x, _normal(x.shape, seed=9) * 100)
    variables = _init(model, x)
    apply = jax.jit(lambda v, x, m=None: model.apply(v, x, mask=m))
    logits = apply(variables, x, mask)
    np.testing.assert_allclose(apply(variables, noisy, mask), logits, rtol=1e-6, atol=1e-6)
    # And each row equals running the sequence cut to its length, unpadded.
    for row, length in enumerate(lengths):
        alone = apply(variables, x[row : row + 1, :length])
        np.testing.assert_allclose(alone[0], logits[row], rtol=1e-5, atol=1e-6)


def test_language_model_is_causal():
    model = RNNLanguageModel(vocab_size=9, embed_dim=4, hidden_size=5, num_layers=2, cell="gru")
    tokens = np.random.default_rng(3).integers(0, 9, (2, 7)).astype(np.int32)
    variables = _init(model, tokens)
    apply = jax.jit(model.apply)
    logits = apply(variables, tokens)
    changed = tokens.copy()
    changed[:, 4] = (changed[:, 4] + 1) % 9
    other = apply(variables, changed)
    np.testing.assert_array_equal(other[:, :4], logits[:, :4])
    assert np.all(np.abs(other[:, 4:] - logits[:, 4:]).max(axis=-1) > 0)


def test_jit_matches_eager_and_dropout_only_in_training():
    model = RNNClassifier(num_classes=2, hidden_size=8, dropout_rate=0.5)
    x = _normal((4, 5, 3))
    mask = _mask([5, 2, 4, 1], 5)
    variables = _init(model, x)
    eager = model.apply(variables, x, mask=mask)
    jitted = _apply(model, variables, x, mask=mask)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
    trained = jax.jit(lambda v, x, m, k: model.apply(v, x, mask=m, train=True,
                                                     rngs={"dropout": k}))(
        variables, x, mask, jax.random.key(1))
    assert not np.allclose(trained, eager)
    with pytest.raises(ValueError, match="Dropout with train=True needs a PRNG key"):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, x)


# --------------------------------------------------------------------------- #
# Parameter counts by hand.
# --------------------------------------------------------------------------- #


def test_parameter_counts_match_formulas():
    f, h, c, g = 3, 5, 4, 4  # LSTM: g = 4 gates, one bias per gate (PyTorch's two summed)
    model = RNNClassifier(num_classes=c, hidden_size=h, num_layers=2, bidirectional=True)
    params = jax.eval_shape(model.init, KEY, _normal((1, 2, f)))["params"]
    layer0 = 2 * (g * h * (f + h) + g * h)  # two directions
    layer1 = 2 * (g * h * (2 * h + h) + g * h)  # reads [forward, backward] = 2h
    assert num_params(params) == layer0 + layer1 + (2 * h * c + c)

    # GRU keeps its recurrent bias: 3 gates, two biases.
    gru = RNNClassifier(num_classes=c, hidden_size=h, cell="gru")
    assert num_params(jax.eval_shape(gru.init, KEY, _normal((1, 2, f)))["params"]) == (
        3 * h * (f + h) + 2 * 3 * h + h * c + c)

    # The shakespeare_char_lstm size quoted in the docstring.
    v, e, h, layers = 65, 64, 256, 2
    lm = RNNLanguageModel(vocab_size=v, embed_dim=e, hidden_size=h, num_layers=layers)
    shapes = jax.eval_shape(lm.init, KEY, jnp.zeros((1, 3), jnp.int32))["params"]
    expected = v * e + 4 * h * (e + h + 1) + (layers - 1) * 4 * h * (2 * h + 1) + (h + 1) * v
    assert num_params(shapes) == expected == 874_881


# --------------------------------------------------------------------------- #
# Gradients flow: a tiny batch is memorised through the real train step.
# --------------------------------------------------------------------------- #


def _fit(model, x, y, steps, learning_rate):
    """Creates the state, runs ``steps`` full-batch train steps and returns the
    trained model's logits, all in one jit."""
    step = make_train_step(classification_loss())
    batch = {"inputs": x, "labels": y}

    @jax.jit
    def run(key):
        state = TrainState.create(model=model, tx=optax.adam(learning_rate), key=key,
                                  example_input=x)
        state = jax.lax.fori_loop(0, steps, lambda _, s: step(s, batch)[0], state)
        return model.apply({"params": state.params}, x)  # evaluation mode


    # optax's Adam relies on standard dtype promotion (bias correction).
    with jax.numpy_dtype_promotion("standard"):
        return run(KEY)


@pytest.mark.parametrize("model", [
    RNNClassifier(num_classes=3, hidden_size=16, dropout_rate=0.1),
    RNNClassifier(num_classes=3, hidden_size=8, cell="gru", bidirectional=True, pooling="mean"),
], ids=["lstm-last", "bigru-mean"])
def test_classifier_memorises_a_tiny_batch(model):
    x = _normal((16, 6, 4), seed=4)
    y = np.random.default_rng(5).integers(0, 3, 16).astype(np.int32)  # random labels
    logits = _fit(model, x, y, steps=100, learning_rate=3e-2)
    np.testing.assert_array_equal(np.argmax(logits, -1), y)


def test_language_model_memorises_a_sequence():
    tokens = np.random.default_rng(6).integers(0, 11, (4, 9)).astype(np.int32)
    tokens[:, 0] = np.arange(4)  # distinct first tokens: every next token is predictable
    model = RNNLanguageModel(vocab_size=11, embed_dim=8, hidden_size=32)
    logits = _fit(model, tokens[:, :-1], tokens[:, 1:], steps=100, learning_rate=3e-2)
    np.testing.assert_array_equal(np.argmax(logits, -1), tokens[:, 1:])


# --------------------------------------------------------------------------- #
# Errors in the user's words.
# --------------------------------------------------------------------------- #


def test_classifier_rejects_wrong_rank():
    with pytest.raises(ShapeError, match=r"RNNClassifier expected x of shape \[batch, time, "
                       r"features\] \(rank 3\), got shape \(2, 8\)"):
        RNNClassifier(num_classes=2, hidden_size=3).init(KEY, np.zeros((2, 8), np.float32))


def test_classifier_rejects_integer_inputs():
    with pytest.raises(TypeError, match=r"RNNClassifier expected floating-point x .* dtype int32"):
        RNNClassifier(num_classes=2, hidden_size=3).init(KEY, np.zeros((2, 8, 1), np.int32))


def test_classifier_rejects_feature_size_change():
    model = RNNClassifier(num_classes=2, hidden_size=3)
    variables = jax.eval_shape(model.init, KEY, np.zeros((2, 4, 5), np.float32))
    with pytest.raises(ShapeError, match=r"features=5, got shape \(2, 4, 6\)"):
        jax.eval_shape(model.apply, variables, np.zeros((2, 4, 6), np.float32))


def test_classifier_rejects_bad_mask():
    with pytest.raises(ShapeError, match=r"RNNClassifier expected mask of shape \[batch, time\] "
                       r"= \(2, 4\), got shape \(2, 5\)"):
        RNNClassifier(num_classes=2, hidden_size=3).init(
            KEY, np.zeros((2, 4, 1), np.float32), mask=np.ones((2, 5), bool))


@pytest.mark.parametrize("kwargs,match", [
    ({"cell": "transformer"}, r"RNNClassifier got cell='transformer'; expected one of 'lstm', "
                              r"'gru', 'rnn'"),
    ({"pooling": "max"}, r"RNNClassifier got pooling='max'; expected 'last' or 'mean'"),
    ({"hidden_size": 0}, r"RNNClassifier expected a positive integer hidden_size, got 0"),
])
def test_classifier_rejects_bad_options(kwargs, match):
    model = RNNClassifier(**{"num_classes": 2, "hidden_size": 3, **kwargs})
    with pytest.raises(ValueError, match=match):
        model.init(KEY, np.zeros((1, 2, 1), np.float32))


def test_language_model_rejects_float_tokens():
    with pytest.raises(TypeError, match=r"RNNLanguageModel expected integer token ids of shape "
                       r"\[batch, time\], got dtype float32 with shape \(2, 3\)"):
        RNNLanguageModel(vocab_size=5, embed_dim=2, hidden_size=3).init(
            KEY, np.zeros((2, 3), np.float32))


def test_language_model_rejects_wrong_rank_and_out_of_range_ids():
    model = RNNLanguageModel(vocab_size=5, embed_dim=2, hidden_size=3)
    with pytest.raises(ShapeError, match=r"RNNLanguageModel expected tokens of shape "
                       r"\[batch, time\] \(rank 2\), got shape \(2, 3, 1\)"):
        model.init(KEY, np.zeros((2, 3, 1), np.int32))
    with pytest.raises(ValueError, match=r"RNNLanguageModel got token ids in \[0, 5\], outside "
                       r"\[0, vocab_size=5\)"):
        model.init(KEY, np.array([[0, 5]], np.int32))
