"""BERT and its heads against independent references:

- a plain numpy forward pass written here from the post-LN formulas (the
  embeddings, one encoder layer, the whole encoder with pooler and MLM head),
  and the tied decoder's share of the embedding gradient in closed form;
- finite differences (float64 ``check_grads``);
- PyTorch: ``nn.TransformerEncoderLayer`` (post-LN, erf GELU) plus embeddings,
  pooler and MLM head, exported under Hugging Face's parameter names and
  loaded through the name table of ``nnlib.models.bert``; and Hugging Face's
  own ``BertModel`` / ``BertForMaskedLM`` when ``transformers`` is installed;
- closed forms (parameter counts, the published 22,713,216 of MiniLM-L6) and
  invariances (padding, jit / vmap / eager).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

from nnlib.layers._checks import ShapeError
from nnlib.models.bert import (
    Bert,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertOutput,
    _Embeddings,
    _Layer,
)
from nnlib.pretrained.checkpoint import bert_params_from_hf as _params_from_hf
from nnlib.train import TrainState, classification_loss, make_optimizer, make_train_step, num_params

CFG = BertConfig(vocab_size=23, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24,
                 max_position_embeddings=12, type_vocab_size=2, dropout_rate=0.0,
                 attention_dropout_rate=0.0)


@pytest.fixture(autouse=True)
def strict_dtype_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


# Everything runs jitted: the time of this file is compiling, and op-by-op
# flax compiles every small op of every shape separately.
@functools.lru_cache
def _apply(model):
    return jax.jit(model.apply, static_argnames=("train", "return_weights"))


def _random_variables(model, seed=0, scale=0.3):
    """Random parameters of ``model``'s structure without compiling its init:
    LayerNorm scales near 1, everything else normal(0, scale) (non-zero biases
    and non-uniform attention, so the parity tests see every term)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        center = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(center + scale * rng.normal(size=leaf.shape).astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def bert_vars():
    return _random_variables(Bert(CFG))


@pytest.fixture(scope="module")
def mlm_vars():
    return _random_variables(BertForMaskedLM(CFG), seed=1)


def _batch(batch=3, time=7, lengths=(7, 4, 1), seed=0, vocab=CFG.vocab_size):
    """Ids, token types (second half 1) and a right-padding mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, time)).astype(np.int32)
    types = (np.arange(time)[None] >= time // 2).astype(np.int32).repeat(batch, 0)
    mask = (np.arange(time)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return ids, types, mask


def _numpy64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# --------------------------------------------------------------------------- #
# Independent reference: BERT from its formulas, in float64 numpy.
# --------------------------------------------------------------------------- #

_erf = np.vectorize(math.erf)


def _layer_norm(x, p, eps=CFG.layer_norm_eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def reference_embeddings(p, ids, types):
    x = (p["word_embeddings"]["embedding"][ids] + p["token_type_embeddings"]["embedding"][types]
         + p["position_embeddings"]["embedding"][: ids.shape[1]])
    return _layer_norm(x, p["layer_norm"])


def reference_layer(p, x, valid, heads):
    """One post-LN layer; returns (x, attention weights [B, N, T, T])."""
    batch, time, hidden = x.shape
    d = hidden // heads
    q, k, v = (_dense(x, p["attention"][n]).reshape(batch, time, heads, d)
               for n in ("query", "key", "value"))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    scores = np.where(valid[:, None, None, :], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    context = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, time, hidden)
    x = _layer_norm(x + _dense(context, p["attention"]["out"]), p["attention_layer_norm"])
    h = _gelu(_dense(x, p["intermediate"]))
    x = _layer_norm(x + _dense(h, p["output"]), p["output_layer_norm"])
    return x, weights


def reference_bert(p, ids, types, valid, cfg=CFG):
    """(sequence [B, T, H], pooled [B, H] or None, weights per layer)."""
    x = reference_embeddings(p["embeddings"], ids, types)
    all_weights = []
    for i in range(cfg.num_layers):
        x, w = reference_layer(p[f"layer_{i}"], x, valid, cfg.num_heads)
        all_weights.append(w)
    pooled = np.tanh(_dense(x[:, 0], p["pooler"])) if "pooler" in p else None
    return x, pooled, all_weights


def reference_mlm_hidden(p, ids, types, valid, cfg=CFG):
    """The transformed states h [B, T, H] that meet the tied decoder."""
    x, _, _ = reference_bert(p["bert"], ids, types, valid, cfg)
    return _layer_norm(_gelu(_dense(x, p["transform"])), p["transform_layer_norm"])


def reference_mlm(p, ids, types, valid, cfg=CFG):
    h = reference_mlm_hidden(p, ids, types, valid, cfg)
    return h @ p["bert"]["embeddings"]["word_embeddings"]["embedding"].T + p["output_bias"]


# --------------------------------------------------------------------------- #
# Parity with the numpy reference.
# --------------------------------------------------------------------------- #


def test_embeddings_match_numpy_reference(bert_vars):
    ids, types, _ = _batch()
    p = bert_vars["params"]["embeddings"]
    got = jax.jit(_Embeddings(CFG).apply, static_argnames="train")(
        {"params": p}, ids, types, train=False)
    np.testing.assert_allclose(got, reference_embeddings(_numpy64(p), ids, types),
                               rtol=1e-5, atol=1e-5)


def test_one_encoder_layer_matches_numpy_reference(bert_vars):
    x = np.random.default_rng(3).normal(size=(3, 7, CFG.hidden_size)).astype(np.float32)
    _, _, mask = _batch()
    p = bert_vars["params"]["layer_1"]
    got, weights = jax.jit(_Layer(CFG).apply, static_argnames=("train", "return_weights"))(
        {"params": p}, x, mask.astype(bool), train=False, return_weights=True)
    expected, expected_weights = reference_layer(_numpy64(p), x.astype(np.float64),
                                                 mask.astype(bool), CFG.num_heads)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-5, atol=1e-6)


def test_encoder_and_pooler_match_numpy_reference(bert_vars):
    ids, types, mask = _batch()
    out = _apply(Bert(CFG))(bert_vars, ids, token_type_ids=types, attention_mask=mask,
                            return_weights=True)
    assert isinstance(out, BertOutput)
    seq, pooled, weights = reference_bert(_numpy64(bert_vars["params"]), ids, types,
                                          mask.astype(bool))
    np.testing.assert_allclose(out.sequence_output, seq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.pooled_output, pooled, rtol=1e-5, atol=1e-5)
    assert len(out.attention_weights) == CFG.num_layers
    for got, expected in zip(out.attention_weights, weights, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_masked_lm_matches_numpy_reference(mlm_vars):
    ids, types, mask = _batch()
    logits = _apply(BertForMaskedLM(CFG))(mlm_vars, ids, token_type_ids=types,
                                          attention_mask=mask)
    assert logits.shape == (3, 7, CFG.vocab_size) and logits.dtype == jnp.float32
    expected = reference_mlm(_numpy64(mlm_vars["params"]), ids, types, mask.astype(bool))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# Parity with PyTorch, through Hugging Face's parameter names.
# --------------------------------------------------------------------------- #


def _mlm_params_from_hf(state_dict, cfg):
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    head = "cls.predictions"
    return {
        "bert": _params_from_hf(sd, cfg, prefix="bert."),
        "transform": {"kernel": jnp.asarray(sd[f"{head}.transform.dense.weight"].T),
                      "bias": jnp.asarray(sd[f"{head}.transform.dense.bias"])},
        "transform_layer_norm": {"scale": jnp.asarray(sd[f"{head}.transform.LayerNorm.weight"]),
                                 "bias": jnp.asarray(sd[f"{head}.transform.LayerNorm.bias"])},
        "output_bias": jnp.asarray(sd[f"{head}.bias"]),
    }


def _torch_bert(torch, cfg):
    """BERT from PyTorch building blocks; returns (modules, forward, HF state_dict)."""
    nn = torch.nn
    torch.manual_seed(0)
    h = cfg.hidden_size
    m = nn.ModuleDict({
        "word": nn.Embedding(cfg.vocab_size, h),
        "position": nn.Embedding(cfg.max_position_embeddings, h),
        "token_type": nn.Embedding(cfg.type_vocab_size, h),
        "norm": nn.LayerNorm(h, eps=cfg.layer_norm_eps),
        "layers": nn.ModuleList([
            nn.TransformerEncoderLayer(h, cfg.num_heads, cfg.intermediate_size, dropout=0.0,
                                       activation="gelu", layer_norm_eps=cfg.layer_norm_eps,
                                       batch_first=True, norm_first=False)
            for _ in range(cfg.num_layers)]),
        "pooler": nn.Linear(h, h),
        "transform": nn.Linear(h, h),
        "transform_norm": nn.LayerNorm(h, eps=cfg.layer_norm_eps),
    })
    m.output_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
    with torch.no_grad():  # no parameter left at a symmetric 0 / 1 init
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))

    def forward(ids, types, mask):
        # Grad mode on: keeps PyTorch off its fused inference fast path.
        ids, types = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(types, dtype=torch.long)
        positions = torch.arange(ids.shape[1])
        x = m["norm"](m["word"](ids) + m["token_type"](types) + m["position"](positions)[None])
        for layer in m["layers"]:
            x = layer(x, src_key_padding_mask=~torch.as_tensor(mask, dtype=torch.bool))
        pooled = torch.tanh(m["pooler"](x[:, 0]))
        hid = m["transform_norm"](torch.nn.functional.gelu(m["transform"](x)))
        logits = hid @ m["word"].weight.T + m.output_bias
        return [t.detach().numpy() for t in (x, pooled, logits)]

    def t(p):
        return p.detach().numpy()

    sd = {
        "bert.embeddings.word_embeddings.weight": t(m["word"].weight),
        "bert.embeddings.position_embeddings.weight": t(m["position"].weight),
        "bert.embeddings.token_type_embeddings.weight": t(m["token_type"].weight),
        "bert.embeddings.LayerNorm.weight": t(m["norm"].weight),
        "bert.embeddings.LayerNorm.bias": t(m["norm"].bias),
        "bert.pooler.dense.weight": t(m["pooler"].weight),
        "bert.pooler.dense.bias": t(m["pooler"].bias),
        "cls.predictions.transform.dense.weight": t(m["transform"].weight),
        "cls.predictions.transform.dense.bias": t(m["transform"].bias),
        "cls.predictions.transform.LayerNorm.weight": t(m["transform_norm"].weight),
        "cls.predictions.transform.LayerNorm.bias": t(m["transform_norm"].bias),
        "cls.predictions.bias": t(m.output_bias),
    }
    for i, layer in enumerate(m["layers"]):
        hf = f"bert.encoder.layer.{i}"
        # PyTorch packs q | k | v row blocks into one in_proj matrix.
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * h, (j + 1) * h)
            sd[f"{hf}.attention.self.{name}.weight"] = t(layer.self_attn.in_proj_weight[rows])
            sd[f"{hf}.attention.self.{name}.bias"] = t(layer.self_attn.in_proj_bias[rows])
        for ours, theirs in [("attention.output.dense", layer.self_attn.out_proj),
                             ("attention.output.LayerNorm", layer.norm1),
                             ("intermediate.dense", layer.linear1),
                             ("output.dense", layer.linear2),
                             ("output.LayerNorm", layer.norm2)]:
            sd[f"{hf}.{ours}.weight"] = t(theirs.weight)
            sd[f"{hf}.{ours}.bias"] = t(theirs.bias)
    return forward, sd


def test_matches_pytorch_post_ln_encoder_through_hf_names():
    torch = pytest.importorskip("torch")
    forward, sd = _torch_bert(torch, CFG)
    ids, types, mask = _batch()
    seq, pooled, logits = forward(ids, types, mask)
    out = _apply(Bert(CFG))({"params": _params_from_hf(sd, CFG, prefix="bert.")}, ids,
                            token_type_ids=types, attention_mask=mask, return_weights=True)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.sequence_output)[real], seq[real],
                               rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(out.pooled_output, pooled, rtol=1e-5, atol=2e-5)
    got = _apply(BertForMaskedLM(CFG))({"params": _mlm_params_from_hf(sd, CFG)}, ids,
                                       token_type_ids=types, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(got)[real], logits[real], rtol=1e-5, atol=2e-5)


def test_matches_hugging_face_bert():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.BertConfig(
        vocab_size=CFG.vocab_size, hidden_size=CFG.hidden_size,
        num_hidden_layers=CFG.num_layers, num_attention_heads=CFG.num_heads,
        intermediate_size=CFG.intermediate_size,
        max_position_embeddings=CFG.max_position_embeddings,
        type_vocab_size=CFG.type_vocab_size, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=CFG.layer_norm_eps, hidden_act="gelu")
    torch.manual_seed(0)
    models = [transformers.BertModel(hf_config), transformers.BertForMaskedLM(hf_config)]
    ids, types, mask = _batch()
    real = mask.astype(bool)
    inputs = {"input_ids": torch.as_tensor(ids, dtype=torch.long),
              "token_type_ids": torch.as_tensor(types, dtype=torch.long),
              "attention_mask": torch.as_tensor(mask, dtype=torch.long)}
    for model in models:
        model.eval()
        with torch.no_grad():
            for p in model.parameters():  # away from the zero-bias, unit-scale init
                p.add_(0.2 * torch.randn_like(p))
            hf_out = model(**inputs)
        sd = {k: v.numpy() for k, v in model.state_dict().items()}
        if isinstance(model, transformers.BertModel):
            out = _apply(Bert(CFG))({"params": _params_from_hf(sd, CFG)}, ids,
                                    token_type_ids=types, attention_mask=mask)
            np.testing.assert_allclose(np.asarray(out.sequence_output)[real],
                                       hf_out.last_hidden_state.numpy()[real],
                                       rtol=1e-5, atol=2e-5)
            np.testing.assert_allclose(out.pooled_output, hf_out.pooler_output.numpy(),
                                       rtol=1e-5, atol=2e-5)
        else:
            logits = _apply(BertForMaskedLM(CFG))({"params": _mlm_params_from_hf(sd, CFG)},
                                                  ids, token_type_ids=types, attention_mask=mask)
            np.testing.assert_allclose(np.asarray(logits)[real], hf_out.logits.numpy()[real],
                                       rtol=1e-5, atol=2e-5)


# --------------------------------------------------------------------------- #
# Padding, shapes, transformations.
# --------------------------------------------------------------------------- #


def test_padding_invariance_and_zero_weights_on_padded_keys(bert_vars, mlm_vars):
    ids, types, mask = _batch()
    real = mask.astype(bool)
    rng = np.random.default_rng(5)
    # Other tokens and token types in the padding ...
    ids2 = np.where(real, ids, rng.integers(0, CFG.vocab_size, ids.shape)).astype(np.int32)
    types2 = np.where(real, types, 1 - types).astype(np.int32)
    # ... and three more padded positions.
    extra = ((0, 0), (0, 3))
    ids3, types3, mask3 = (np.pad(a, extra, constant_values=v) for a, v in
                           [(ids2, 5), (types2, 1), (mask, 0)])
    apply = _apply(Bert(CFG))
    base = apply(bert_vars, ids, token_type_ids=types, attention_mask=mask, return_weights=True)
    for i2, t2, m2 in [(ids2, types2, mask), (ids3, types3, mask3)]:
        out = apply(bert_vars, i2, token_type_ids=t2, attention_mask=m2, return_weights=True)
        seq = np.asarray(out.sequence_output)[:, :7]
        np.testing.assert_allclose(seq[real], np.asarray(base.sequence_output)[real],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.pooled_output, base.pooled_output, rtol=1e-5, atol=1e-6)
        for w, w0 in zip(out.attention_weights, base.attention_weights, strict=True):
            w = np.asarray(w)
            # Exactly zero on padded keys, for every query (padded ones too).
            assert np.all(w[np.broadcast_to(~m2.astype(bool)[:, None, None, :], w.shape)] == 0.0)
            np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
            # Real queries attend as before (padded queries' rows mean nothing).
            real_rows = np.broadcast_to(real[:, None, :, None], w0.shape)
            np.testing.assert_allclose(w[:, :, :7, :7][real_rows], np.asarray(w0)[real_rows],
                                       rtol=1e-5, atol=1e-6)
    mlm = _apply(BertForMaskedLM(CFG))
    logits = mlm(mlm_vars, ids, token_type_ids=types, attention_mask=mask)
    logits2 = mlm(mlm_vars, ids2, token_type_ids=types2, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(logits2)[real], np.asarray(logits)[real],
                               rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 4), time=st.integers(1, 12), layers=st.integers(1, 2),
       heads=st.sampled_from([1, 2, 4]), classes=st.integers(1, 5),
       kind=st.sampled_from(["bert", "no_pooler", "masked_lm", "classifier"]))
def test_output_shapes(batch, time, layers, heads, classes, kind):
    # eval_shape: traced, never compiled.
    cfg = BertConfig(vocab_size=11, hidden_size=8, num_layers=layers, num_heads=heads,
                     intermediate_size=12, max_position_embeddings=12)
    model = {"bert": Bert(cfg), "no_pooler": Bert(cfg, add_pooling_layer=False),
             "masked_lm": BertForMaskedLM(cfg),
             "classifier": BertForSequenceClassification(cfg, classes)}[kind]
    kwargs = {"return_weights": True} if kind == "bert" else {}
    out, _ = jax.eval_shape(functools.partial(model.init_with_output, **kwargs),
                            jax.random.key(0), jax.ShapeDtypeStruct((batch, time), jnp.int32))
    if kind == "masked_lm":
        assert out.shape == (batch, time, 11)
    elif kind == "classifier":
        assert out.shape == (batch, classes)
    else:
        assert out.sequence_output.shape == (batch, time, 8)
        if kind == "bert":
            assert out.pooled_output.shape == (batch, 8)
            assert [w.shape for w in out.attention_weights] == [(batch, heads, time, time)] * layers
        else:
            assert out.pooled_output is None and out.attention_weights is None


def test_jit_vmap_eager_and_dict_inputs_agree(mlm_vars):
    ids, types, mask = _batch()
    model = BertForMaskedLM(CFG)
    jitted = _apply(model)(mlm_vars, ids, token_type_ids=types, attention_mask=mask)
    # Eagerly, with the inputs as one tokenizer-style dict (make_train_step's form).
    eager = model.apply(mlm_vars, {"input_ids": ids, "token_type_ids": types,
                                   "attention_mask": mask.astype(bool)})
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)
    # vmap over a leading axis of one-row batches: each row on its own.
    mapped = jax.jit(jax.vmap(lambda i, t, m: model.apply(
        mlm_vars, i[None], token_type_ids=t[None], attention_mask=m[None])[0]))(ids, types, mask)
    np.testing.assert_allclose(mapped, jitted, rtol=1e-5, atol=1e-5)


CLS_CFG = BertConfig(vocab_size=20, hidden_size=32, num_layers=1, num_heads=2,
                     intermediate_size=64, max_position_embeddings=12)  # dropout 0.1 on
# Dropout's random bits double the train step's compile time; the overfit run
# does without (dropout has its own test).
CLS_CFG_NO_DROPOUT = dataclasses.replace(CLS_CFG, dropout_rate=0.0, attention_dropout_rate=0.0)


def _classifier_batch():
    ids, _, mask = _batch(8, 6, (6, 3, 5, 6, 2, 4, 6, 1), seed=10, vocab=19)
    inputs = {"input_ids": (ids + 1) * mask, "attention_mask": mask}  # pad id 0
    labels = np.random.default_rng(11).integers(0, 3, 8).astype(np.int32)
    return inputs, labels


def test_dropout_only_when_training():
    model = BertForSequenceClassification(CLS_CFG, 3)
    variables = _random_variables(model)
    inputs, _ = _classifier_batch()
    apply = _apply(model)
    run = lambda seed: apply(variables, inputs, train=True,  # noqa: E731
                             rngs={"dropout": jax.random.key(seed)})
    np.testing.assert_array_equal(run(0), run(0))
    assert not np.allclose(run(0), run(1))
    assert not np.allclose(run(0), apply(variables, inputs))
    with pytest.raises(ValueError, match="PRNG key"):
        apply(variables, inputs, train=True)


# --------------------------------------------------------------------------- #
# Structure: parameters, tying, init, gradients.
# --------------------------------------------------------------------------- #


def _closed_form(v, h, layers, inter, positions, types, pooler=True):
    embeddings = (v + positions + types) * h + 2 * h
    layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * (2 * h)
    return embeddings + layers * layer + (h * h + h if pooler else 0)


def test_parameter_counts_closed_form():
    cfg = BertConfig(vocab_size=37, hidden_size=12, num_layers=3, num_heads=3,
                     intermediate_size=20, max_position_embeddings=9, type_vocab_size=3,
                     pad_token_id=None)
    count = lambda m: num_params(jax.eval_shape(  # noqa: E731
        m.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    bert = _closed_form(37, 12, 3, 20, 9, 3)
    assert count(Bert(cfg)) == bert
    assert count(Bert(cfg, add_pooling_layer=False)) == bert - (12 * 12 + 12)
    # MLM head: transform + its LayerNorm + output bias; the decoder is the embedding.
    assert count(BertForMaskedLM(cfg)) == bert - (12 * 12 + 12) + (12 * 12 + 12) + 2 * 12 + 37
    assert count(BertForSequenceClassification(cfg, 5)) == bert + 12 * 5 + 5
    # The published size of all-MiniLM-L6-v2 (BertModel with pooler).
    assert count(Bert(BertConfig.minilm_l6())) == 22_713_216


def test_masked_lm_decoder_is_tied_to_word_embeddings(mlm_vars):
    params = mlm_vars["params"]
    assert set(params) == {"bert", "transform", "transform_layer_norm", "output_bias"}
    assert "pooler" not in params["bert"]
    vocab_sized = [path for path, a in jax.tree_util.tree_leaves_with_path(params)
                   if a.ndim == 2 and CFG.vocab_size in a.shape]
    assert len(vocab_sized) == 1  # word_embeddings only: no decoder kernel


F64 = BertConfig(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=12,
                 max_position_embeddings=6, dropout_rate=0.0, attention_dropout_rate=0.0)


def _float64_setup(model):
    """Call inside jax.enable_x64: float64 params, a padded batch, loss weights."""
    params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)),
                          _random_variables(model, seed=4)["params"])
    ids, types, mask = _batch(2, 5, (5, 3), seed=6, vocab=6)  # ids 6..10 never appear
    return params, ids, types, mask


def test_gradients_float64_finite_differences_and_tied_embedding():
    model = BertForMaskedLM(F64)
    with jax.enable_x64(True):
        params, ids, types, mask = _float64_setup(model)
        flat, unravel = ravel_pytree(params)  # one leaf: few small eager ops in check_grads
        weights = np.random.default_rng(8).normal(size=(2, 5, 11))

        @jax.jit
        def loss(flat):
            logits = model.apply({"params": unravel(flat)}, ids, token_type_ids=types,
                                 attention_mask=mask)
            return jnp.sum(logits * jnp.asarray(weights))

        value, vjp = jax.vjp(loss, flat)  # compiled once, reused by check_grads
        assert value.dtype == jnp.float64
        grads = unravel(vjp(jnp.ones((), jnp.float64))[0])
        check_grads(loss, (flat,), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)

    # Tying: d loss / d table = (through the lookup) + (through the decoder).
    # The decoder part in closed form: logits = h @ table^T + b, so it is
    # sum over [b, t] of weights[b, t, v] * h[b, t, :].
    h = reference_mlm_hidden(_numpy64(params), ids, types, mask.astype(bool), F64)
    grad_out = np.einsum("btv,bth->vh", weights, h)  # [V, H]
    grad = np.asarray(grads["bert"]["embeddings"]["word_embeddings"]["embedding"])
    # Ids 6..10 never occur in the input: the decoder is their only path.
    np.testing.assert_allclose(grad[6:], grad_out[6:], rtol=1e-7, atol=1e-10)
    assert np.all(np.abs(grad[6:]).sum(-1) > 1e-3)
    # Ids that occur get more than the decoder's share: the lookup's too.
    used = np.unique(ids)
    assert np.all(np.abs(grad[used] - grad_out[used]).sum(-1) > 1e-6)


# --------------------------------------------------------------------------- #
# Training through nnlib.train.make_train_step (inputs as a dict).
# --------------------------------------------------------------------------- #


MASK_ID = 1  # the [MASK] token of the MLM test; ids 2.. are "words"


@pytest.fixture(scope="module")
def mlm_state():
    cfg = BertConfig(vocab_size=20, hidden_size=32, num_layers=1, num_heads=2,
                     intermediate_size=64, max_position_embeddings=12, dropout_rate=0.0,
                     attention_dropout_rate=0.0)
    ids, types, mask = _batch(4, 10, (10, 8, 10, 6), seed=9, vocab=18)
    ids = (ids + 2) * mask  # words 2..19, pad id 0
    masked = np.zeros_like(mask)
    masked[:, [1, 4, 5]] = 1  # a fixed set of masked positions, all real
    inputs = {"input_ids": np.where(masked == 1, MASK_ID, ids).astype(np.int32),
              "token_type_ids": types, "attention_mask": mask}
    batch = {"inputs": inputs, "labels": ids, "label_mask": masked.astype(np.float32)}
    with jax.numpy_dtype_promotion("standard"):  # optax's update rules promote
        create = jax.jit(lambda key, x: TrainState.create(
            model=BertForMaskedLM(cfg), tx=make_optimizer("adam", 3e-3), key=key,
            example_input=x))
        return cfg, create(jax.random.key(0), inputs), batch


def test_initialisation_follows_hugging_face(mlm_state):
    cfg, state, _ = mlm_state
    params = state.params
    word = np.asarray(params["bert"]["embeddings"]["word_embeddings"]["embedding"])
    np.testing.assert_array_equal(word[cfg.pad_token_id], 0.0)  # padding_idx row
    kernel = np.asarray(params["bert"]["layer_0"]["intermediate"]["kernel"])
    assert abs(kernel.std() - 0.02) < 0.003 and abs(word[1:].std() - 0.02) < 0.003
    layer = params["bert"]["layer_0"]
    np.testing.assert_array_equal(layer["attention"]["query"]["bias"], 0.0)
    np.testing.assert_array_equal(layer["output_layer_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(params["output_bias"], 0.0)


def test_masked_lm_overfits_a_fixed_masked_batch(mlm_state):
    _, state, batch = mlm_state
    with jax.numpy_dtype_promotion("standard"):
        step = jax.jit(make_train_step(classification_loss()))
        for _ in range(300):
            state, metrics = step(state, batch)
            if float(metrics["loss"]) < 0.02:
                break
    # accuracy is over the label_mask-ed positions only; no dropout in this config.
    assert float(metrics["loss"]) < 0.02 and float(metrics["accuracy"]) == 1.0


def test_classifier_overfits_a_tiny_batch():
    model = BertForSequenceClassification(CLS_CFG_NO_DROPOUT, 3)
    inputs, labels = _classifier_batch()
    # HF-like random init without compiling model.init (TrainState.create is
    # exercised by the masked-LM test).
    params = _random_variables(model, seed=12, scale=0.02)["params"]
    with jax.numpy_dtype_promotion("standard"):
        tx = make_optimizer("adam", 3e-3)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), key=jax.random.key_data(jax.random.key(1)),
                           collections={}, apply_fn=model.apply, tx=tx)
        step = jax.jit(make_train_step(classification_loss()))
        for _ in range(150):
            state, metrics = step(state, {"inputs": inputs, "labels": labels})
            if float(metrics["loss"]) < 0.02:
                break
    assert float(metrics["loss"]) < 0.02
    # Evaluation (train=False) through the dropout-configured twin: same
    # parameters, same function, and its program is already compiled.
    logits = _apply(BertForSequenceClassification(CLS_CFG, 3))({"params": state.params}, inputs)
    np.testing.assert_array_equal(np.argmax(logits, -1), labels)


# --------------------------------------------------------------------------- #
# Errors that speak the user's language (raised before any computation).
# --------------------------------------------------------------------------- #


def test_error_float_ids(bert_vars):
    with pytest.raises(TypeError, match=r"Bert expected integer input_ids of shape "
                                        r"\[batch, time\], got dtype float32"):
        Bert(CFG).apply(bert_vars, jnp.zeros((2, 5), jnp.float32))


def test_error_sequence_longer_than_positions(bert_vars, mlm_vars):
    with pytest.raises(ShapeError, match=r"Bert got input_ids of shape \(1, 13\): time=13 is "
                                         r"longer than max_position_embeddings=12"):
        Bert(CFG).apply(bert_vars, jnp.zeros((1, 13), jnp.int32))
    with pytest.raises(ShapeError, match=r"BertForMaskedLM got input_ids of shape \(1, 13\)"):
        BertForMaskedLM(CFG).apply(mlm_vars, jnp.zeros((1, 13), jnp.int32))


def test_error_mask_of_wrong_shape_or_dtype(bert_vars):
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ShapeError, match=r"Bert expected attention_mask of shape \[batch, time\] "
                                         r"= \(2, 5\), got shape \(2, 4\)"):
        Bert(CFG).apply(bert_vars, ids, attention_mask=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(TypeError, match=r"Bert expected attention_mask of 1 .* got dtype float32"):
        Bert(CFG).apply(bert_vars, ids, attention_mask=jnp.zeros((2, 5), jnp.float32))


def test_error_token_types(bert_vars):
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ShapeError, match=r"Bert expected token_type_ids of shape \[batch, time\] "
                                         r"= \(2, 5\), got shape \(5,\)"):
        Bert(CFG).apply(bert_vars, ids, token_type_ids=jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match=r"Bert got token_type_ids in \[2, 2\], outside "
                                         r"\[0, type_vocab_size=2\)"):
        Bert(CFG).apply(bert_vars, ids, token_type_ids=jnp.full((2, 5), 2, jnp.int32))


def test_error_id_rank_length_and_range(bert_vars):
    with pytest.raises(ShapeError, match=r"Bert expected input_ids of shape \[batch, time\] "
                                         r"\(rank 2\), got shape \(5,\)"):
        Bert(CFG).apply(bert_vars, jnp.zeros((5,), jnp.int32))
    with pytest.raises(ShapeError, match="at least one token"):
        Bert(CFG).apply(bert_vars, jnp.zeros((2, 0), jnp.int32))
    with pytest.raises(ValueError, match=r"input_ids in \[0, 23\], outside \[0, vocab_size=23\)"):
        Bert(CFG).apply(bert_vars, jnp.array([[0, 23]], jnp.int32))


def test_error_dict_inputs(mlm_vars):
    model = BertForMaskedLM(CFG)
    ids = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="BertForMaskedLM got inputs as a dict and also"):
        model.apply(mlm_vars, {"input_ids": ids}, attention_mask=ids)
    with pytest.raises(ValueError, match=r"expected a dict with 'input_ids'.*\['ids'\]"):
        model.apply(mlm_vars, {"ids": ids})
    with pytest.raises(ValueError, match=r"got keys \['input_ids', 'labels'\]"):
        model.apply(mlm_vars, {"input_ids": ids, "labels": ids})


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden_size": 15}, "num_heads to divide hidden_size"),
    ({"num_layers": 0}, "num_layers must be a positive int"),
    ({"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\)"),
    ({"attention_dropout_rate": -0.1}, r"attention_dropout_rate must be in \[0, 1\)"),
    ({"layer_norm_eps": 0.0}, "layer_norm_eps must be > 0"),
    ({"pad_token_id": 23}, r"pad_token_id must be in \[0, vocab_size=23\)"),
    ({"activation": "gelu_approximately"}, "unknown activation"),
])
def test_error_bad_config(kwargs, match):
    base = {"vocab_size": 23, "hidden_size": 16, "num_layers": 2, "num_heads": 2,
            "intermediate_size": 24}
    with pytest.raises(ValueError, match=match):
        BertConfig(**{**base, **kwargs})


def test_error_bad_num_classes():
    with pytest.raises(ValueError, match="positive int num_classes, got 0"):
        BertForSequenceClassification(CFG, 0).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))


def test_minilm_config():
    c = BertConfig.minilm_l6(dropout_rate=0.0)
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size,
            c.max_position_embeddings, c.type_vocab_size, c.head_dim) == (
        30522, 384, 6, 12, 1536, 512, 2, 32)
    assert c.dropout_rate == 0.0 and c.layer_norm_eps == 1e-12 and c.activation == "gelu_exact"
