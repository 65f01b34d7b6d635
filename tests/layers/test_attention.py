"""Attention against a numpy reference and PyTorch; masks really mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from nnlib.layers._checks import ShapeError
from nnlib.layers.attention import (
    MultiHeadAttention,
    causal_mask,
    combine_masks,
    dot_product_attention,
    dot_product_attention_weights,
    padding_mask,
)

KEY = jax.random.key(0)


def normal(seed, shape, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def random_params(module, *args, seed=0, **kwargs):
    """Parameters of the right shapes drawn from numpy (no compile, nonzero biases)."""
    shapes = jax.eval_shape(module.init, KEY, *args, **kwargs)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


def jit_apply(module):
    """``module.apply`` compiled once per shape: far cheaper than op-by-op eager."""
    return jax.jit(module.apply, static_argnames=("causal", "return_weights", "train"))


# --------------------------------------------------------------------------- #
# Independent numpy reference: formulas and loops, float64.
# --------------------------------------------------------------------------- #


def np_softmax_rows(logits, allowed):
    """Softmax over allowed entries of each row; all-zero row if none allowed."""
    out = np.zeros_like(logits)
    for idx in np.ndindex(logits.shape[:-1]):
        ok = allowed[idx]
        if ok.any():
            z = np.exp(logits[idx][ok] - logits[idx][ok].max())
            out[idx][ok] = z / z.sum()
    return out


def np_mha(params, xq, xkv, heads, allowed=None):
    """Multi-head attention written out: returns (outputs, weights [B,H,Q,K])."""
    p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}
    xq, xkv = np.asarray(xq, np.float64), np.asarray(xkv, np.float64)
    q = xq @ p["query"]["kernel"] + p["query"]["bias"]
    k = xkv @ p["key"]["kernel"] + p["key"]["bias"]
    v = xkv @ p["value"]["kernel"] + p["value"]["bias"]
    batch, q_len, _ = q.shape
    kv_len = k.shape[1]
    d = q.shape[-1] // heads
    if allowed is None:
        allowed = np.ones((batch, heads, q_len, kv_len), bool)
    allowed = np.broadcast_to(allowed, (batch, heads, q_len, kv_len))
    logits = np.zeros((batch, heads, q_len, kv_len))
    for b in range(batch):
        for h in range(heads):
            qh, kh = q[b, :, h * d:(h + 1) * d], k[b, :, h * d:(h + 1) * d]
            logits[b, h] = qh @ kh.T / np.sqrt(d)
    weights = np_softmax_rows(logits, allowed)
    heads_out = np.zeros((batch, q_len, heads * d))
    for b in range(batch):
        for h in range(heads):
            heads_out[b, :, h * d:(h + 1) * d] = weights[b, h] @ v[b, :, h * d:(h + 1) * d]
    out = heads_out @ p["out"]["kernel"] + p["out"]["bias"]
    return out, weights


def assert_close(actual, desired, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- #
# Mask helpers.
# --------------------------------------------------------------------------- #


def test_causal_mask_is_lower_triangular():
    np.testing.assert_array_equal(causal_mask(4)[0, 0], np.tril(np.ones((4, 4), bool)))
    assert causal_mask(4).shape == (1, 1, 4, 4)
    # Queries are the last q_len positions: query i sees keys j <= i + kv - q.
    m = np.asarray(causal_mask(2, 5)[0, 0])
    ref = np.array([[j <= i + 3 for j in range(5)] for i in range(2)])
    np.testing.assert_array_equal(m, ref)


def test_causal_mask_rejects_more_queries_than_keys():
    with pytest.raises(ValueError, match=r"causal_mask needs kv_len >= q_len.*q_len=5, kv_len=3"):
        causal_mask(5, 3)


def test_padding_mask_and_combine():
    key_valid = np.array([[1, 1, 0], [1, 0, 0]], bool)
    query_valid = np.array([[1, 0], [1, 1]], bool)
    m = padding_mask(None, key_valid)
    assert m.shape == (2, 1, 1, 3)
    np.testing.assert_array_equal(m[:, 0, 0], key_valid)
    m2 = padding_mask(query_valid, key_valid.astype(np.int32))  # 0/1 ints accepted
    assert m2.shape == (2, 1, 2, 3)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                assert bool(m2[b, 0, i, j]) == (query_valid[b, i] and key_valid[b, j])
    assert combine_masks(None, None) is None
    both = combine_masks(causal_mask(3), None, padding_mask(None, key_valid))
    assert both.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(
        both[1, 0], np.tril(np.ones((3, 3), bool)) & key_valid[1][None, :]
    )


def test_padding_mask_bad_shapes():
    with pytest.raises(ShapeError, match=(
        r"padding_mask expected key_valid of shape \[batch, kv_len\]"
    )):
        padding_mask(None, np.ones((2, 3, 1), bool))
    with pytest.raises(ShapeError, match=r"padding_mask expected query_valid.*\(2, 4\).*\(3, 4\)"):
        padding_mask(np.ones((3, 4), bool), np.ones((2, 5), bool))
    with pytest.raises(TypeError, match=r"padding_mask expected key_valid to be boolean.*float32"):
        padding_mask(None, np.ones((2, 5), np.float32))


# --------------------------------------------------------------------------- #
# dot_product_attention: paths agree, fully masked rows, dropout.
# --------------------------------------------------------------------------- #


def _qkv(b=2, q=4, k=6, h=3, d=5, dtype=np.float32):
    q_shape, kv_shape = (b, q, h, d), (b, k, h, d)
    return normal(1, q_shape, dtype), normal(2, kv_shape, dtype), normal(3, kv_shape, dtype)


@pytest.mark.parametrize("masked", ["none", "causal", "padding+fully_masked_row"])
def test_jax_and_explicit_paths_agree(masked):
    q, k, v = _qkv(q=6, k=6)
    mask = {
        "none": None,
        "causal": causal_mask(6),
        "padding+fully_masked_row": padding_mask(
            np.array([[1, 1, 0, 1, 1, 1], [1] * 6], bool),
            np.array([[1, 1, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0]], bool),
        ),
    }[masked]
    fast = dot_product_attention(q, k, v, mask, implementation="jax")
    slow = dot_product_attention(q, k, v, mask, implementation="explicit")
    auto = dot_product_attention(q, k, v, mask)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)
    # "auto" is the explicit path on CPU (faster there), JAX's elsewhere.
    np.testing.assert_array_equal(auto, slow if jax.default_backend() == "cpu" else fast)


def test_fully_masked_rows_give_zero_weights_output_and_gradient():
    q, k, v = _qkv(b=1, q=3, k=4)
    mask = np.ones((1, 1, 3, 4), bool)
    mask[0, 0, 1] = False  # query 1 may attend to nothing
    out, w = dot_product_attention(q, k, v, mask, return_weights=True)
    assert np.isfinite(out).all() and np.isfinite(w).all()
    np.testing.assert_array_equal(w[0, :, 1], 0.0)
    np.testing.assert_array_equal(out[0, 1], 0.0)
    np.testing.assert_allclose(np.sum(w[0, :, [0, 2]], -1), 1.0, rtol=1e-6)
    for impl in ("jax", "explicit"):
        row_sum = lambda q, impl=impl: dot_product_attention(
            q, k, v, mask, implementation=impl
        )[0, 1].sum()
        g = jax.jit(jax.grad(row_sum))(q)
        assert np.isfinite(g).all()
        np.testing.assert_array_equal(g, 0.0)


def test_weights_match_softmax_formula():
    q, k, _ = _qkv()
    w = dot_product_attention_weights(q, k)
    logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) / np.sqrt(q.shape[-1])
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    assert_close(w, ref / ref.sum(-1, keepdims=True))


def test_bfloat16_inputs_softmax_in_float32():
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _qkv())
    out, w = dot_product_attention(q, k, v, causal_mask(4, 6), return_weights=True)
    assert out.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16
    ref = dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)), causal_mask(4, 6))
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=5e-2)


def test_function_dropout_is_deterministic_given_key():
    q, k, v = _qkv()
    # The expected keep-mask is drawn in the same compiled program: random
    # number generation is costly to compile on CPU.
    drop = jax.jit(lambda key: (dot_product_attention(
        q, k, v, dropout_rate=0.5, dropout_rng=key, deterministic=False, return_weights=True
    ), jax.random.bernoulli(key, 0.5, (2, 3, 4, 6))))
    (a, wa), keep = drop(jax.random.key(1))
    (b, _), _ = drop(jax.random.key(1))
    (c, _), _ = drop(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # Inverted dropout on the weights: kept weights scaled by 1 / (1 - rate).
    ref = np.einsum("bhqk,bkhd->bqhd", np.where(keep, wa / 0.5, 0.0), v)
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-6)
    # Returned weights are the pre-dropout ones.
    np.testing.assert_allclose(wa, dot_product_attention_weights(q, k), rtol=1e-6)
    # deterministic=True ignores the rate.
    np.testing.assert_array_equal(
        dot_product_attention(q, k, v, dropout_rate=0.5),
        dot_product_attention(q, k, v),
    )


def test_function_errors():
    q, k, v = _qkv()
    with pytest.raises(ShapeError, match=(
        r"dot_product_attention expected query of shape \[batch, q_len, heads, head_dim\]"
    )):
        dot_product_attention(q[0], k, v)
    with pytest.raises(ShapeError, match=(
        r"dot_product_attention expected key .*head_dim=5.*\(2, 6, 3, 4\)"
    )):
        dot_product_attention(q, k[..., :4], v)
    with pytest.raises(ShapeError, match=r"dot_product_attention expected value .*\(2, 5, 3, 5\)"):
        dot_product_attention(q, k, v[:, :5])
    with pytest.raises(ShapeError, match=(
        r"dot_product_attention expected mask broadcastable to \[batch, heads, q_len, kv_len\] = "
        r"\(2, 3, 4, 6\), got shape \(4, 6\)"
    )):
        dot_product_attention(q, k, v, np.ones((4, 6), bool))
    with pytest.raises(ValueError, match="needs dropout_rng"):
        dot_product_attention(q, k, v, dropout_rate=0.1, deterministic=False)
    with pytest.raises(ValueError, match="implementation must be"):
        dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="implementation='jax' cannot return weights"):
        dot_product_attention(q, k, v, implementation="jax", return_weights=True)


# --------------------------------------------------------------------------- #
# MultiHeadAttention vs numpy and PyTorch.
# --------------------------------------------------------------------------- #


def test_self_attention_matches_numpy():
    x = normal(0, (2, 5, 8))
    mha = MultiHeadAttention(num_heads=2)
    params = mha.init(KEY, x)["params"]
    assert params["query"]["kernel"].shape == (8, 8) and params["out"]["kernel"].shape == (8, 8)
    out, w = jit_apply(mha)({"params": params}, x, return_weights=True)
    ref_out, ref_w = np_mha(params, x, x, 2)
    assert_close(out, ref_out)
    assert_close(w, ref_w)


def test_masked_self_attention_matches_numpy_and_rows_sum_to_one():
    x = normal(1, (2, 6, 12))
    kpm = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    mha = MultiHeadAttention(num_heads=3, qkv_features=9, out_features=4)
    params = random_params(mha, x)["params"]
    apply = jit_apply(mha)
    out, w = apply({"params": params}, x, causal=True, key_padding_mask=kpm, return_weights=True)
    assert out.shape == (2, 6, 4) and w.shape == (2, 3, 6, 6)
    allowed = np.tril(np.ones((6, 6), bool))[None, None] & kpm[:, None, None, :]
    ref_out, ref_w = np_mha(params, x, x, 3, allowed)
    assert_close(out, ref_out)
    assert_close(w, ref_w)
    np.testing.assert_allclose(np.sum(w, -1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(w)[~np.broadcast_to(allowed, w.shape)], 0.0)
    # The fast path (no weights requested) gives the same outputs.
    fast = apply({"params": params}, x, causal=True, key_padding_mask=kpm)
    np.testing.assert_allclose(fast, out, rtol=1e-5, atol=1e-6)


def test_cross_attention_with_different_kv_length_matches_numpy():
    xq, xkv = normal(2, (3, 4, 6)), normal(3, (3, 7, 5))
    mask = np.random.default_rng(4).random((3, 1, 4, 7)) > 0.3
    mha = MultiHeadAttention(num_heads=2, qkv_features=8)
    params = random_params(mha, xq, xkv)["params"]
    assert params["key"]["kernel"].shape == (5, 8)
    out, w = jit_apply(mha)({"params": params}, xq, xkv, mask=mask, return_weights=True)
    assert out.shape == (3, 4, 6) and w.shape == (3, 2, 4, 7)
    ref_out, ref_w = np_mha(params, xq, xkv, 2, mask)
    assert_close(out, ref_out)
    assert_close(w, ref_w)


def _torch_mha(torch, params, embed, heads, kdim=None):
    m = torch.nn.MultiheadAttention(embed, heads, batch_first=True, kdim=kdim, vdim=kdim)
    t = lambda a: torch.from_numpy(np.asarray(a).T.copy())
    with torch.no_grad():
        if kdim is None:
            qkv = [t(params[n]["kernel"]) for n in ("query", "key", "value")]
            m.in_proj_weight.copy_(torch.cat(qkv))
        else:
            m.q_proj_weight.copy_(t(params["query"]["kernel"]))
            m.k_proj_weight.copy_(t(params["key"]["kernel"]))
            m.v_proj_weight.copy_(t(params["value"]["kernel"]))
        m.in_proj_bias.copy_(torch.from_numpy(np.concatenate(
            [np.asarray(params[n]["bias"]) for n in ("query", "key", "value")])))
        m.out_proj.weight.copy_(t(params["out"]["kernel"]))
        m.out_proj.bias.copy_(torch.from_numpy(np.array(params["out"]["bias"])))
    return m


def test_matches_torch_self_attention_with_key_padding_and_causal():
    torch = pytest.importorskip("torch")
    x = normal(5, (2, 5, 8))
    kpm = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    mha = MultiHeadAttention(num_heads=4)
    params = random_params(mha, x)["params"]
    out, w = jit_apply(mha)(
        {"params": params}, x, key_padding_mask=kpm, causal=True, return_weights=True
    )
    tm = _torch_mha(torch, params, 8, 4)
    tx = torch.from_numpy(x)
    with torch.no_grad():
        ref, ref_w = tm(
            tx, tx, tx,
            key_padding_mask=torch.from_numpy(~kpm),  # torch: True = ignore
            attn_mask=torch.from_numpy(~np.tril(np.ones((5, 5), bool))),
            average_attn_weights=False,
        )
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, ref_w.numpy(), rtol=1e-5, atol=1e-6)


def test_matches_torch_cross_attention():
    torch = pytest.importorskip("torch")
    xq, xkv = normal(6, (2, 3, 8)), normal(7, (2, 6, 5))
    kpm = np.array([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1]], bool)
    mha = MultiHeadAttention(num_heads=2)
    params = random_params(mha, xq, xkv)["params"]
    out = jit_apply(mha)({"params": params}, xq, xkv, key_padding_mask=kpm)
    tm = _torch_mha(torch, params, 8, 2, kdim=5)
    with torch.no_grad():
        ref, _ = tm(torch.from_numpy(xq), torch.from_numpy(xkv), torch.from_numpy(xkv),
                    key_padding_mask=torch.from_numpy(~kpm))
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# Masks really mask.
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def causal_setup():
    x = normal(8, (1, 6, 8))
    mha = MultiHeadAttention(num_heads=2)
    return mha, random_params(mha, x), x


def test_causal_attention_never_looks_ahead(causal_setup):
    mha, params, x = causal_setup
    apply = jit_apply(mha)
    y = apply(params, x, causal=True)
    x2 = x.copy()
    x2[:, 4:] += normal(9, (1, 2, 8)) * 10
    y2 = apply(params, x2, causal=True)
    np.testing.assert_array_equal(y[:, :4], y2[:, :4])
    assert not np.allclose(y[:, 4:], y2[:, 4:])


def test_causal_gradient_to_future_inputs_is_exactly_zero(causal_setup):
    mha, params, x = causal_setup
    jac = jax.jit(jax.jacrev(lambda x: mha.apply(params, x, causal=True)))(x)  # [1,6,8, 1,6,8]
    jac = np.asarray(jac)[0, :, :, 0]  # [t_out, f_out, t_in, f_in]
    for t in range(6):
        np.testing.assert_array_equal(jac[t, :, t + 1:], 0.0)
        assert np.abs(jac[t, :, : t + 1]).max() > 0


def test_padded_keys_do_not_matter():
    xq, xkv = normal(10, (2, 3, 8)), normal(11, (2, 5, 8))
    kpm = np.array([[1, 1, 0, 1, 0], [1, 1, 1, 1, 0]], bool)
    mha = MultiHeadAttention(num_heads=2)
    params = random_params(mha, xq, xkv)
    apply = jit_apply(mha)
    y = apply(params, xq, xkv, key_padding_mask=kpm)
    xkv2 = np.where(kpm[..., None], xkv, normal(12, xkv.shape) * 100).astype(np.float32)
    y2 = apply(params, xq, xkv2, key_padding_mask=kpm)
    np.testing.assert_allclose(y, y2, rtol=1e-6, atol=1e-6)
    # The same holds for self-attention at the real positions.
    y = apply(params, xkv, key_padding_mask=kpm)
    y2 = apply(params, xkv2, key_padding_mask=kpm)
    np.testing.assert_allclose(np.asarray(y)[kpm], np.asarray(y2)[kpm], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- #
# Shapes, gradients, transformations, dropout.
# --------------------------------------------------------------------------- #


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 3),
    q_len=st.integers(1, 6),
    kv_len=st.integers(1, 6),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 4),
    features=st.integers(1, 6),
)
def test_shapes_over_sizes(batch, q_len, kv_len, heads, head_dim, features):
    xq, xkv = normal(0, (batch, q_len, features)), normal(1, (batch, kv_len, features + 1))
    mha = MultiHeadAttention(heads, qkv_features=heads * head_dim, out_features=3)
    params = random_params(mha, xq, xkv)
    both = jax.jit(lambda p, xq, xkv: (
        mha.apply(p, xq, xkv, return_weights=True), mha.apply(p, xq, xkv)
    ))
    (out, w), fast = both(params, xq, xkv)
    assert out.shape == (batch, q_len, 3) and w.shape == (batch, heads, q_len, kv_len)
    np.testing.assert_allclose(np.sum(w, -1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(fast, out, rtol=1e-5, atol=1e-5)


def test_gradients_float64():
    with jax.enable_x64(True):
        x = jax.random.normal(KEY, (2, 4, 6), jnp.float64)
        mha = MultiHeadAttention(num_heads=2, param_dtype=jnp.float64)
        params = random_params(mha, x)
        kpm = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
        f = jax.jit(
            lambda p, x: jnp.sum(jnp.sin(mha.apply(p, x, causal=True, key_padding_mask=kpm)))
        )
        check_grads(f, (params, x), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_jit_and_vmap_match_eager():
    x = normal(13, (2, 5, 8))
    kpm = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    mha = MultiHeadAttention(num_heads=2)
    params = random_params(mha, x)
    f = lambda p, x, m: mha.apply(p, x, causal=True, key_padding_mask=m, return_weights=True)
    eager = f(params, x, kpm)
    jitted = jax.jit(f)(params, x, kpm)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # vmap over an extra leading axis (e.g. an ensemble of batches).
    xs = np.stack([x, 2 * x])
    mapped = jax.vmap(lambda x: f(params, x, kpm))(xs)
    for i in range(2):
        single = f(params, xs[i], kpm)
        np.testing.assert_allclose(mapped[0][i], single[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mapped[1][i], single[1], rtol=1e-5, atol=1e-6)


def test_dropout_only_with_train_and_deterministic_given_key():
    x = normal(14, (2, 5, 8))
    mha = MultiHeadAttention(num_heads=2, dropout_rate=0.5)
    params = random_params(mha, x)
    apply = jit_apply(mha)
    eval_out = apply(params, x)
    np.testing.assert_array_equal(eval_out, apply(params, x, rngs={"dropout": jax.random.key(1)}))
    a = apply(params, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = apply(params, x, train=True, rngs={"dropout": jax.random.key(1)})
    c = apply(params, x, train=True, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, eval_out)
    with pytest.raises(ValueError, match=(
        r"MultiHeadAttention with dropout_rate=0.5 and train=True needs a PRNG key"
    )):
        mha.apply(params, x, train=True)


# --------------------------------------------------------------------------- #
# Bad inputs.
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def built():
    x = normal(15, (2, 5, 8))
    mha = MultiHeadAttention(num_heads=2)
    return mha, random_params(mha, x), x


def test_error_wrong_rank(built):
    mha, params, x = built
    with pytest.raises(ShapeError, match=(
        r"MultiHeadAttention expected inputs_q of shape \[batch, q_len, features\] \(rank 3\), got "
        r"shape \(5, 8\)"
    )):
        mha.apply(params, x[0])
    with pytest.raises(ShapeError, match=(
        r"MultiHeadAttention expected inputs_kv of shape \[batch, kv_len, kv_features\] \(rank 3\)"
    )):
        mha.apply(params, x, x[0])


def test_error_integer_inputs(built):
    mha, params, x = built
    with pytest.raises(TypeError, match=(
        r"MultiHeadAttention expected floating-point inputs_q.*int32"
    )):
        mha.apply(params, x.astype(np.int32))


def test_error_features_mismatch(built):
    mha, params, x = built
    with pytest.raises(ShapeError, match=(
        r"MultiHeadAttention expected inputs_q .*features=8, got shape \(2, 5, 7\)"
    )):
        mha.apply(params, x[..., :7])
    with pytest.raises(ShapeError, match=(
        r"MultiHeadAttention expected inputs_kv .*features=8, got shape \(2, 5, 3\)"
    )):
        mha.apply(params, x, x[..., :3])


def test_error_cross_attention_params_without_inputs_kv():
    xq, xkv = normal(17, (2, 3, 8)), normal(18, (2, 4, 5))
    mha = MultiHeadAttention(num_heads=2)
    params = random_params(mha, xq, xkv)
    with pytest.raises(ShapeError, match=r"MultiHeadAttention was built for cross-attention with kv_features=5"):
        mha.apply(params, xq)


def test_error_kv_batch_mismatch(built):
    mha, params, x = built
    with pytest.raises(ShapeError, match=(
        r"MultiHeadAttention expected inputs_kv .*batch=2.*got shape \(1, 5, 8\)"
    )):
        mha.apply(params, x, x[:1])


def test_error_heads_must_divide_qkv_features():
    x = normal(16, (2, 5, 10))
    with pytest.raises(ValueError, match=(
        r"MultiHeadAttention needs num_heads to divide qkv_features.*qkv_features=10, num_heads=3"
    )):
        MultiHeadAttention(num_heads=3).init(KEY, x)


def test_error_mask_shape(built):
    mha, params, x = built
    with pytest.raises(ShapeError, match=(
        r"MultiHeadAttention expected mask broadcastable to \[batch, heads, q_len, kv_len\] = \(2, "
        r"2, 5, 5\), got shape \(2, 1, 5, 4\)"
    )):
        mha.apply(params, x, mask=np.ones((2, 1, 5, 4), bool))
    with pytest.raises(TypeError, match=r"MultiHeadAttention expected mask to be boolean.*float32"):
        mha.apply(params, x, mask=np.zeros((1, 1, 5, 5), np.float32))


def test_error_key_padding_mask_shape(built):
    mha, params, x = built
    with pytest.raises(ShapeError, match=(
        r"MultiHeadAttention expected key_padding_mask of shape \[batch, kv_len\] = \(2, 5\), got "
        r"shape \(2, 1, 5\)"
    )):
        mha.apply(params, x, key_padding_mask=np.ones((2, 1, 5), bool))
    with pytest.raises(TypeError, match=r"MultiHeadAttention expected key_padding_mask to be boolean"):
        mha.apply(params, x, key_padding_mask=np.ones((2, 5), np.float32))


def _masks():
    return {
        "none": None,
        "causal": causal_mask(6),
        "padding+fully_masked_row": padding_mask(
            np.array([[1, 1, 0, 1, 1, 1], [1] * 6], bool),
            np.array([[1, 1, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0]], bool),
        ),
    }


@pytest.mark.parametrize("masked", ["none", "causal", "padding+fully_masked_row"])
def test_deferred_softmax_matches_normalised_weights(masked):
    """Without weights returned, the softmax's division comes after the product."""
    q, k, v = _qkv(q=6, k=6)
    mask = _masks()[masked]
    out = dot_product_attention(q, k, v, mask, implementation="explicit")
    with_weights, w = dot_product_attention(
        q, k, v, mask, implementation="explicit", return_weights=True
    )
    np.testing.assert_allclose(out, with_weights, rtol=1e-6, atol=1e-6)
    ref = np.einsum("bhqk,bkhd->bqhd", np.asarray(w, np.float64), v.astype(np.float64))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def _division_shapes(jaxpr):
    """Output shapes of every ``div`` in a jaxpr, nested jaxprs included."""
    from jax.extend import core as jex_core

    shapes = [e.outvars[0].aval.shape for e in jaxpr.eqns if e.primitive.name == "div"]
    for sub in jex_core.subjaxprs(jaxpr):
        shapes += _division_shapes(sub)
    return shapes


def test_deferred_softmax_never_normalises_the_weights():
    """The only division is of the [B, H, q, d] output, not of [B, H, q, kv] weights."""
    q, k, v = _qkv(q=6, k=7, d=5)
    deferred = jax.make_jaxpr(lambda q, k, v: dot_product_attention(
        q, k, v, causal_mask(6, 7), implementation="explicit"))(q, k, v)
    shapes = _division_shapes(deferred.jaxpr)
    assert shapes and all(s[-1] == 5 for s in shapes), shapes
    # The weights themselves are normalised (the check can see a division).
    weights = jax.make_jaxpr(dot_product_attention_weights)(q, k)
    assert (2, 3, 6, 7) in _division_shapes(weights.jaxpr)


@pytest.mark.parametrize("masked", ["causal", "padding+fully_masked_row"])
def test_deferred_softmax_gradients_float64(masked):
    mask = _masks()[masked]
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(a, jnp.float64) for a in _qkv(q=6, k=6, h=2, d=3))
        f = jax.jit(lambda q, k, v: jnp.sin(
            dot_product_attention(q, k, v, mask, implementation="explicit")
        ).sum())
        check_grads(f, (q, k, v), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def test_deferred_softmax_dropout_equals_dropout_on_the_weights():
    q, k, v = _qkv()
    kw = dict(dropout_rate=0.3, deterministic=False, implementation="explicit")
    run = jax.jit(lambda key: (
        dot_product_attention(q, k, v, causal_mask(4, 6), dropout_rng=key, **kw),
        dot_product_attention(q, k, v, causal_mask(4, 6), dropout_rng=key,
                              return_weights=True, **kw)[0],
    ))
    deferred, normalised = run(jax.random.key(3))
    np.testing.assert_allclose(deferred, normalised, rtol=1e-5, atol=1e-6)
