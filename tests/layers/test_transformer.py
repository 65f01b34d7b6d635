"""Transformer blocks and positional encodings against numpy and PyTorch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from nnlib.layers._checks import ShapeError
from nnlib.layers.transformer import (
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    TransformerDecoder,
    TransformerDecoderBlock,
    TransformerEncoder,
    TransformerEncoderBlock,
    sinusoidal_positions,
)

KEY = jax.random.key(0)
STATIC = ("return_weights", "train")


def normal(seed, shape, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def random_params(module, *args, seed=0, dtype=None, **kwargs):
    """Parameters of the right shapes drawn from numpy (no compile; LayerNorm
    scales and all biases random too, so every parameter is exercised)."""
    shapes = jax.eval_shape(module.init, KEY, *args, **kwargs)
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: (0.5 * rng.normal(size=s.shape)).astype(dtype or s.dtype), shapes
    )


def jit_apply(module):
    return jax.jit(module.apply, static_argnames=STATIC)


# --------------------------------------------------------------------------- #
# Independent numpy reference of a pre-LN block (float64).
# --------------------------------------------------------------------------- #


def np_layer_norm(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_mha(p, xq, xkv, heads, allowed):
    q = xq @ p["query"]["kernel"] + p["query"]["bias"]
    k = xkv @ p["key"]["kernel"] + p["key"]["bias"]
    v = xkv @ p["value"]["kernel"] + p["value"]["bias"]
    b, tq, f = q.shape
    d = f // heads
    q, k, v = (a.reshape(b, -1, heads, d) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    allowed = np.broadcast_to(allowed, logits.shape)
    logits = np.where(allowed, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, tq, f)
    return out @ p["out"]["kernel"] + p["out"]["bias"], w


def np_mlp(p, x):
    h = np_gelu_tanh(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
    return h @ p["output"]["kernel"] + p["output"]["bias"]


def np_encoder_block(p, x, heads, allowed):
    a, w = np_mha(p["attention"], *[np_layer_norm(x, p["attention_norm"])] * 2, heads, allowed)
    x = x + a
    return x + np_mlp(p["feed_forward"], np_layer_norm(x, p["mlp_norm"])), w


def np_decoder_block(p, x, heads, self_allowed, encoded=None, cross_allowed=None):
    h = np_layer_norm(x, p["attention_norm"])
    a, w_self = np_mha(p["attention"], h, h, heads, self_allowed)
    x = x + a
    w_cross = None
    if encoded is not None:
        h = np_layer_norm(x, p["cross_attention_norm"])
        a, w_cross = np_mha(p["cross_attention"], h, encoded, heads, cross_allowed)
        x = x + a
    return x + np_mlp(p["feed_forward"], np_layer_norm(x, p["mlp_norm"])), w_self, w_cross


def as64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def tril(t):
    return np.tril(np.ones((t, t), bool))[None, None]


def assert_close(actual, desired, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- #
# Positional encodings.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("features", [6, 7])
def test_sinusoidal_positions_match_formula(features):
    table = np.asarray(sinusoidal_positions(9, features))
    assert table.shape == (9, features) and table.dtype == np.float32
    for pos in range(9):
        for j in range(features):
            i = j // 2
            angle = pos / 10000 ** (2 * i / features)
            ref = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert abs(table[pos, j] - ref) < 1e-6


def test_sinusoidal_positions_bad_sizes():
    with pytest.raises(ValueError, match=r"sinusoidal_positions needs .*features=0"):
        sinusoidal_positions(4, 0)


def test_sinusoidal_encoding_adds_table_at_positions():
    x = normal(0, (2, 5, 6))
    pe = SinusoidalPositionalEncoding(max_len=12)
    table = np.asarray(sinusoidal_positions(12, 6))
    assert pe.init(KEY, x) == {}
    np.testing.assert_allclose(pe.apply({}, x), x + table[:5], rtol=1e-6)
    # Decoding from an offset, and per-example positions.
    np.testing.assert_allclose(
        pe.apply({}, x, positions=np.arange(5) + 7), x + table[7:12], rtol=1e-6
    )
    pos = np.array([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    np.testing.assert_allclose(pe.apply({}, x, positions=pos), x + table[pos], rtol=1e-6)


def test_learned_positional_embedding():
    x = normal(1, (2, 4, 6))
    le = LearnedPositionalEmbedding(max_len=10)
    params = le.init(KEY, x)
    emb = np.asarray(params["params"]["embedding"])
    assert emb.shape == (10, 6)
    assert 0.01 < emb.std() < 0.04  # GPT-2/BERT init, stddev 0.02
    np.testing.assert_allclose(le.apply(params, x), x + emb[:4], rtol=1e-6)
    np.testing.assert_allclose(
        le.apply(params, x, positions=np.arange(4) + 6), x + emb[6:10], rtol=1e-6
    )
    # Traced positions (e.g. a decoding step inside jit) work too.
    step = jax.jit(lambda p, x, offset: le.apply(p, x, positions=offset + jnp.arange(4)))
    np.testing.assert_allclose(step(params, x, 3), x + emb[3:7], rtol=1e-6)


@pytest.mark.parametrize("cls", [SinusoidalPositionalEncoding, LearnedPositionalEmbedding])
def test_positional_errors(cls):
    name = cls.__name__
    x = normal(2, (2, 5, 6))
    layer = cls(max_len=4)
    with pytest.raises(ShapeError, match=rf"{name} got a sequence of length 5 .*max_len=4"):
        layer.init(KEY, x)
    layer = cls(max_len=8)
    params = layer.init(KEY, x)
    with pytest.raises(ShapeError, match=(
        rf"{name} got positions up to 9, outside \[0, max_len=8\)"
    )):
        layer.apply(params, x, positions=np.arange(5) + 5)
    with pytest.raises(ShapeError, match=(
        rf"{name} expected positions of shape \[time\].*got shape \(4,\)"
    )):
        layer.apply(params, x, positions=np.arange(4))
    with pytest.raises(TypeError, match=rf"{name} expected integer positions, got dtype float32"):
        layer.apply(params, x, positions=np.arange(5, dtype=np.float32))
    with pytest.raises(ShapeError, match=(
        rf"{name} expected inputs of shape \[batch, time, features\] \(rank 3\)"
    )):
        layer.apply(params, x[0])


def test_learned_embedding_features_mismatch():
    x = normal(3, (2, 4, 6))
    le = LearnedPositionalEmbedding(max_len=8)
    params = le.init(KEY, x)
    with pytest.raises(ShapeError, match=(
        r"LearnedPositionalEmbedding expected inputs .*features=6, got shape \(2, 4, 5\)"
    )):
        le.apply(params, x[..., :5])


# --------------------------------------------------------------------------- #
# Blocks against numpy and PyTorch.
# --------------------------------------------------------------------------- #


def test_encoder_block_matches_numpy():
    x = normal(4, (2, 5, 8))
    kpm = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    mask = np.random.default_rng(5).random((2, 1, 5, 5)) > 0.2
    mask[..., 0] = True  # every query keeps at least one key
    block = TransformerEncoderBlock(num_heads=2, mlp_dim=16)
    params = random_params(block, x)
    assert set(params["params"]) == {"attention_norm", "attention", "mlp_norm", "feed_forward"}
    y, w = jit_apply(block)(params, x, mask=mask, key_padding_mask=kpm, return_weights=True)
    ref, ref_w = np_encoder_block(as64(params["params"]), as64(x), 2, mask & kpm[:, None, None])
    assert_close(y, ref)
    assert_close(w, ref_w)


@pytest.mark.parametrize("cross", [True, False])
def test_decoder_block_matches_numpy(cross):
    x, enc = normal(6, (2, 4, 8)), normal(7, (2, 6, 5))
    self_pad = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    enc_pad = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], bool)
    block = TransformerDecoderBlock(num_heads=2, mlp_dim=12)
    args = (x, enc) if cross else (x,)
    kwargs = dict(encoder_padding_mask=enc_pad) if cross else {}
    params = random_params(block, *args)
    assert ("cross_attention" in params["params"]) == cross
    y, w = jit_apply(block)(
        params, *args, self_padding_mask=self_pad, return_weights=True, **kwargs
    )
    ref, ref_self, ref_cross = np_decoder_block(
        as64(params["params"]), as64(x), 2, tril(4) & self_pad[:, None, None],
        as64(enc) if cross else None, enc_pad[:, None, None] if cross else None,
    )
    assert_close(y, ref)
    assert_close(w["self"], ref_self)
    if cross:
        assert_close(w["cross"], ref_cross)
    else:
        assert w["cross"] is None


def _copy_mha(torch, tm, p):
    t = lambda a: torch.from_numpy(np.array(a).T)
    tm.in_proj_weight.copy_(torch.cat([t(p[n]["kernel"]) for n in ("query", "key", "value")]))
    tm.in_proj_bias.copy_(torch.from_numpy(
        np.concatenate([np.array(p[n]["bias"]) for n in ("query", "key", "value")])))
    tm.out_proj.weight.copy_(t(p["out"]["kernel"]))
    tm.out_proj.bias.copy_(torch.from_numpy(np.array(p["out"]["bias"])))


def _copy_common(torch, layer, p, norms):
    t = lambda a: torch.from_numpy(np.array(a))
    _copy_mha(torch, layer.self_attn, p["attention"])
    for tn, name in norms:
        getattr(layer, tn).weight.copy_(t(p[name]["scale"]))
        getattr(layer, tn).bias.copy_(t(p[name]["bias"]))
    ff = p["feed_forward"]
    layer.linear1.weight.copy_(t(ff["dense_0"]["kernel"]).T)
    layer.linear1.bias.copy_(t(ff["dense_0"]["bias"]))
    layer.linear2.weight.copy_(t(ff["output"]["kernel"]).T)
    layer.linear2.bias.copy_(t(ff["output"]["bias"]))


def test_encoder_block_matches_torch():
    torch = pytest.importorskip("torch")
    x = normal(8, (2, 5, 8))
    kpm = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    # PyTorch's "gelu" is the erf form: our "gelu_exact".
    block = TransformerEncoderBlock(num_heads=2, mlp_dim=16, activation="gelu_exact")
    params = random_params(block, x)
    y = jit_apply(block)(params, x, key_padding_mask=kpm)
    layer = torch.nn.TransformerEncoderLayer(
        8, 2, 16, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    with torch.no_grad():
        _copy_common(torch, layer, params["params"],
                     [("norm1", "attention_norm"), ("norm2", "mlp_norm")])
        layer.train()  # the slow (reference) path; dropout is 0 anyway
        ref = layer(torch.from_numpy(x), src_key_padding_mask=torch.from_numpy(~kpm))
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_decoder_block_matches_torch():
    torch = pytest.importorskip("torch")
    x, enc = normal(9, (2, 4, 8)), normal(10, (2, 6, 8))
    enc_pad = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], bool)
    block = TransformerDecoderBlock(num_heads=4, mlp_dim=16, activation="gelu_exact")
    params = random_params(block, x, enc)
    y = jit_apply(block)(params, x, enc, encoder_padding_mask=enc_pad)
    layer = torch.nn.TransformerDecoderLayer(
        8, 4, 16, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    p = params["params"]
    with torch.no_grad():
        _copy_common(torch, layer, p, [
            ("norm1", "attention_norm"), ("norm2", "cross_attention_norm"), ("norm3", "mlp_norm"),
        ])
        _copy_mha(torch, layer.multihead_attn, p["cross_attention"])
        layer.train()
        ref = layer(
            torch.from_numpy(x), torch.from_numpy(enc),
            tgt_mask=torch.from_numpy(~np.tril(np.ones((4, 4), bool))),
            memory_key_padding_mask=torch.from_numpy(~enc_pad),
        )
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# Stacks.
# --------------------------------------------------------------------------- #


def test_encoder_stack_is_blocks_then_layer_norm():
    x = normal(11, (2, 5, 8))
    kpm = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    enc = TransformerEncoder(num_layers=3, num_heads=2, mlp_dim=16)
    params = random_params(enc, x)
    p = as64(params["params"])
    assert set(p) == {"block_0", "block_1", "block_2", "final_norm"}
    y, weights = jit_apply(enc)(params, x, key_padding_mask=kpm, return_weights=True)
    assert isinstance(weights, tuple) and len(weights) == 3
    ref, allowed = as64(x), kpm[:, None, None]
    for i in range(3):
        ref, ref_w = np_encoder_block(p[f"block_{i}"], ref, 2, allowed)
        assert_close(weights[i], ref_w)
    assert_close(y, np_layer_norm(ref, p["final_norm"]), rtol=1e-4, atol=1e-4)


def test_decoder_stack_is_blocks_then_layer_norm():
    x, src = normal(12, (2, 4, 8)), normal(13, (2, 3, 8))
    dec = TransformerDecoder(num_layers=2, num_heads=2, mlp_dim=16)
    params = random_params(dec, x, src)
    p = as64(params["params"])
    y, weights = jit_apply(dec)(params, x, src, return_weights=True)
    assert len(weights) == 2 and set(weights[0]) == {"self", "cross"}
    ref = as64(x)
    for i in range(2):
        ref, w_self, w_cross = np_decoder_block(
            p[f"block_{i}"], ref, 2, tril(4), as64(src), np.ones((1, 1, 1, 3), bool)
        )
        assert_close(weights[i]["self"], w_self)
        assert_close(weights[i]["cross"], w_cross)
    assert_close(y, np_layer_norm(ref, p["final_norm"]), rtol=1e-4, atol=1e-4)
    assert jit_apply(dec)(params, x, src).shape == (2, 4, 8)


# --------------------------------------------------------------------------- #
# Masks really mask.
# --------------------------------------------------------------------------- #


def test_decoder_never_looks_ahead():
    x = normal(14, (1, 6, 8))
    dec = TransformerDecoder(num_layers=2, num_heads=2, mlp_dim=16)
    params = random_params(dec, x)
    apply = jit_apply(dec)
    x2 = x.copy()
    x2[:, 3:] += 10 * normal(15, (1, 3, 8))
    y, y2 = apply(params, x), apply(params, x2)
    np.testing.assert_array_equal(y[:, :3], y2[:, :3])
    assert not np.allclose(y[:, 3:], y2[:, 3:])
    jac = np.asarray(jax.jit(jax.jacrev(lambda x: dec.apply(params, x)))(x))[0, :, :, 0]
    for t in range(6):
        np.testing.assert_array_equal(jac[t, :, t + 1:], 0.0)


def test_encoder_padding_positions_do_not_matter():
    x = normal(16, (2, 5, 8))
    kpm = np.array([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], bool)
    enc = TransformerEncoder(num_layers=2, num_heads=2, mlp_dim=16)
    params = random_params(enc, x)
    apply = jit_apply(enc)
    x2 = np.where(kpm[..., None], x, 100 * normal(17, x.shape)).astype(np.float32)
    y, y2 = apply(params, x, key_padding_mask=kpm), apply(params, x2, key_padding_mask=kpm)
    np.testing.assert_allclose(np.asarray(y)[kpm], np.asarray(y2)[kpm], rtol=1e-5, atol=1e-5)


def test_cross_attention_ignores_padded_source():
    x, src = normal(18, (2, 3, 8)), normal(19, (2, 5, 6))
    pad = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], bool)
    block = TransformerDecoderBlock(num_heads=2, mlp_dim=8)
    params = random_params(block, x, src)
    apply = jit_apply(block)
    src2 = np.where(pad[..., None], src, 100 * normal(20, src.shape)).astype(np.float32)
    np.testing.assert_allclose(
        apply(params, x, src, encoder_padding_mask=pad),
        apply(params, x, src2, encoder_padding_mask=pad), rtol=1e-5, atol=1e-5,
    )


# --------------------------------------------------------------------------- #
# Shapes, gradients, transformations, dropout.
# --------------------------------------------------------------------------- #


@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 3),
    time=st.integers(1, 5),
    src_len=st.integers(1, 4),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 3),
)
def test_block_shapes_over_sizes(batch, time, src_len, heads, head_dim):
    features = heads * head_dim
    x, src = normal(0, (batch, time, features)), normal(1, (batch, src_len, 3))
    block = TransformerDecoderBlock(num_heads=heads, mlp_dim=5)
    params = random_params(block, x, src)
    y, w = jit_apply(block)(params, x, src, return_weights=True)
    assert y.shape == x.shape and np.isfinite(y).all()
    assert w["self"].shape == (batch, heads, time, time)
    assert w["cross"].shape == (batch, heads, time, src_len)


def test_encoder_block_gradients_float64():
    x32 = normal(21, (2, 4, 6))
    kpm = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    block = TransformerEncoderBlock(num_heads=2, mlp_dim=8)
    with jax.enable_x64(True):
        params = random_params(block, x32, dtype=np.float64)
        x = jnp.asarray(x32, jnp.float64)
        f = jax.jit(lambda p, x: jnp.sum(jnp.sin(block.apply(p, x, key_padding_mask=kpm))))
        check_grads(f, (params, x), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_jit_and_vmap_match_eager():
    x = normal(22, (2, 4, 8))
    kpm = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    block = TransformerEncoderBlock(num_heads=2, mlp_dim=16)
    params = random_params(block, x)
    f = lambda p, x: block.apply(p, x, key_padding_mask=kpm, return_weights=True)
    eager = f(params, x)
    for a, b in zip(eager, jax.jit(f)(params, x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # vmap over an extra leading axis (e.g. ensemble members' batches).
    xs = np.stack([x, -x])
    mapped = jax.jit(jax.vmap(f, in_axes=(None, 0)))(params, xs)
    second = jax.jit(f)(params, xs[1])
    for a, b, c in zip(mapped, eager, second, strict=True):
        np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a[1], c, rtol=1e-5, atol=1e-6)


def test_dropout_only_with_train_and_deterministic_given_key():
    x = normal(24, (2, 5, 8))
    block = TransformerEncoderBlock(num_heads=2, mlp_dim=16, dropout_rate=0.3,
                                    attention_dropout_rate=0.3)
    params = random_params(block, x)
    run = jax.jit(lambda key: (
        block.apply(params, x), block.apply(params, x, train=True, rngs={"dropout": key})
    ))
    eval_out, a = run(jax.random.key(1))
    _, b = run(jax.random.key(1))
    _, c = run(jax.random.key(2))
    ref, _ = np_encoder_block(as64(params["params"]), as64(x), 2, True)
    assert_close(eval_out, ref)  # train=False: no dropout at all
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, eval_out)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        block.apply(params, x, train=True)


# --------------------------------------------------------------------------- #
# Bad inputs.
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def decoder():
    x, src = normal(25, (2, 4, 8)), normal(26, (2, 3, 6))
    block = TransformerDecoderBlock(num_heads=2, mlp_dim=8)
    return block, random_params(block, x, src), random_params(block, x), x, src


@pytest.mark.parametrize("cls", [TransformerEncoderBlock, TransformerDecoderBlock,
                                 TransformerEncoder, TransformerDecoder])
def test_error_wrong_rank(cls):
    kwargs = dict(num_heads=2, mlp_dim=8)
    if "Block" not in cls.__name__:
        kwargs["num_layers"] = 1
    with pytest.raises(ShapeError, match=(
        rf"{cls.__name__} expected x of shape \[batch, time, features\] \(rank 3\), got shape \(4, "
        rf"8\)"
    )):
        cls(**kwargs).init(KEY, normal(0, (4, 8)))


def test_error_features_mismatch():
    x = normal(27, (2, 4, 8))
    block = TransformerEncoderBlock(num_heads=2, mlp_dim=8)
    params = random_params(block, x)
    with pytest.raises(ShapeError, match=(
        r"TransformerEncoderBlock expected x .*features=8, got shape \(2, 4, 6\)"
    )):
        block.apply(params, x[..., :6])


def test_error_encoded_shapes(decoder):
    block, cross_params, _, x, src = decoder
    with pytest.raises(ShapeError, match=(
        r"TransformerDecoderBlock expected encoded of shape \[batch, src_len, src_features\] "
        r"\(rank 3\)"
    )):
        block.apply(cross_params, x, src[0])
    with pytest.raises(ShapeError, match=(
        r"TransformerDecoderBlock expected encoded .*batch=2 as in x, got shape \(1, 3, 6\)"
    )):
        block.apply(cross_params, x, src[:1])
    with pytest.raises(ShapeError, match=(
        r"TransformerDecoderBlock expected encoder_padding_mask of shape \[batch, src_len\] = \(2, "
        r"3\), got shape \(2, 4\)"
    )):
        block.apply(cross_params, x, src, encoder_padding_mask=np.ones((2, 4), bool))


def test_error_cross_attention_params_vs_encoded(decoder):
    block, cross_params, plain_params, x, src = decoder
    with pytest.raises(ValueError, match=(
        r"TransformerDecoderBlock was built with cross-attention .* called without encoded"
    )):
        block.apply(cross_params, x)
    with pytest.raises(ValueError, match=(
        r"TransformerDecoderBlock was built without cross-attention .*\(2, 3, 6\)"
    )):
        block.apply(plain_params, x, src)
    with pytest.raises(ValueError, match=(
        r"TransformerDecoderBlock got encoder_padding_mask but no encoded"
    )):
        block.apply(plain_params, x, encoder_padding_mask=np.ones((2, 3), bool))


def test_concrete_positions_captured_inside_jit_are_accepted():
    layer = LearnedPositionalEmbedding(8)
    x = jnp.ones((1, 3, 4))
    v = layer.init(jax.random.key(0), x)
    positions = jnp.array([2, 3, 4])
    y = jax.jit(lambda v, x: layer.apply(v, x, positions=positions))(v, x)
    np.testing.assert_allclose(y, layer.apply(v, x, positions=positions), rtol=1e-6)
