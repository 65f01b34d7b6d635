"""GPT, its KV cache and generation, against independent references:

- a plain numpy forward pass written here from the formulas (and a jnp twin
  of it with the two uses of the tied embedding separated, for gradients);
- full recomputation (greedy decoding by re-running the whole sequence);
- closed forms (parameter count, GPT-2 init scales, top-k / top-p sets on
  hand-made logits, sampling frequencies).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

from nnlib.layers._checks import ShapeError
from nnlib.models.gpt import (
    GPT,
    GPTConfig,
    KVCache,
    generate,
    gpt_attention_weights,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)
from nnlib.train import TrainState, make_optimizer, make_train_step, num_params

CFG = GPTConfig(vocab_size=50, context_length=16, num_layers=2, num_heads=2, embed_dim=32)


@pytest.fixture(autouse=True)
def strict_dtype_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


# Everything runs jitted: the suite's time is compiling, and op-by-op flax
# compiles every small op of every shape separately.
@functools.lru_cache
def _apply(cfg=CFG):
    """jit of ``GPT(cfg).apply``; ``method`` and ``train`` are static."""
    return jax.jit(GPT(cfg).apply, static_argnames=("method", "train"))


@functools.lru_cache
def _init(cfg=CFG):
    init = jax.jit(GPT(cfg).init)
    return init(jax.random.key(0), jnp.zeros((1, cfg.context_length), jnp.int32))


def _perturbed(variables, seed=1, scale=0.1):
    """Random init has LayerNorm scale 1 / bias 0 and zero biases, and nearly
    uniform attention; perturbing every parameter makes the parity tests see
    every term of the formula."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a) + scale * rng.normal(size=a.shape).astype(a.dtype)),
        variables)


def _random_variables(cfg, seed=2, scale=0.1):
    """Random parameters of ``GPT(cfg)``'s structure without compiling its init:
    LayerNorm scales near 1, everything else normal(0, scale)."""
    shapes = jax.eval_shape(GPT(cfg).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        center = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(center + scale * rng.normal(size=leaf.shape).astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def variables():
    return _init()


@pytest.fixture(scope="module")
def perturbed(variables):
    return _perturbed(variables)


def _tokens(shape, seed=0, vocab=CFG.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


# --------------------------------------------------------------------------- #
# Independent reference: the GPT-2 forward pass from its formulas.
# --------------------------------------------------------------------------- #


def _layer_norm(x, p, xp):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / xp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _gelu_tanh(x, xp):
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def reference_logits(params, tokens, cfg, xp=np, embed_in=None, embed_out=None,
                     weights_out=None):
    """logits [B, T, V]; embed_in / embed_out override the two uses of the
    token embedding (both default to params["token_embedding"]); each layer's
    attention weights [B, H, T, T] are appended to the list weights_out."""
    table = params["token_embedding"]
    embed_in = table if embed_in is None else embed_in
    embed_out = table if embed_out is None else embed_out
    batch, time = tokens.shape
    heads, head_dim = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    x = embed_in[tokens] + params["position_embedding"][:time]
    allowed = np.tril(np.ones((time, time), bool))
    for layer in range(cfg.num_layers):
        p = params[f"block_{layer}"]
        h = _layer_norm(x, p["attention_norm"], xp)
        qkv = h @ p["attention"]["qkv"]["kernel"] + p["attention"]["qkv"]["bias"]
        q, k, v = (a.reshape(batch, time, heads, head_dim) for a in xp.split(qkv, 3, axis=-1))
        scores = xp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        scores = xp.where(allowed, scores, -np.inf)
        weights = xp.exp(scores - scores.max(-1, keepdims=True))
        weights = weights / weights.sum(-1, keepdims=True)
        if weights_out is not None:
            weights_out.append(weights)
        attended = xp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, time, -1)
        x = x + attended @ p["attention"]["out"]["kernel"] + p["attention"]["out"]["bias"]
        h = _layer_norm(x, p["mlp_norm"], xp)
        h = _gelu_tanh(h @ p["fc"]["kernel"] + p["fc"]["bias"], xp)
        x = x + h @ p["proj"]["kernel"] + p["proj"]["bias"]
    x = _layer_norm(x, params["final_norm"], xp)
    return x @ embed_out.T


def _numpy64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def test_forward_matches_numpy_reference(perturbed):
    tokens = _tokens((3, 12))
    logits = _apply()(perturbed, tokens)
    assert logits.shape == (3, 12, CFG.vocab_size) and logits.dtype == jnp.float32
    expected = reference_logits(_numpy64(perturbed["params"]), np.asarray(tokens), CFG)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_attention_weights_match_numpy_reference(perturbed):
    """gpt_attention_weights: every layer's softmax(q k^T / sqrt(d)) under the
    causal mask, equal to the reference; the logits are the plain forward's."""
    tokens = _tokens((2, 10), seed=4)
    logits, weights = jax.jit(functools.partial(gpt_attention_weights, GPT(CFG)))(
        perturbed, tokens)
    expected = []
    expected_logits = reference_logits(_numpy64(perturbed["params"]), np.asarray(tokens), CFG,
                                       weights_out=expected)
    assert weights.shape == (CFG.num_layers, 2, CFG.num_heads, 10, 10)
    np.testing.assert_allclose(weights, np.stack(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(weights)[..., np.triu_indices(10, 1)[0], np.triu_indices(10, 1)[1]]
                  == 0)
    # Not asked for, nothing is sown and no weights are computed.
    _, state = GPT(CFG).apply(perturbed, tokens, mutable=["intermediates"])
    assert "attention_weights" in state["intermediates"]["block_0"]["attention"]
    plain = jax.make_jaxpr(lambda v, t: GPT(CFG).apply(v, t))(perturbed, tokens)
    sown = jax.make_jaxpr(lambda v, t: gpt_attention_weights(GPT(CFG), v, t))(perturbed, tokens)
    assert str(plain).count("exp") < str(sown).count("exp")


def test_untied_head_matches_reference_and_cache_path():
    cfg = GPTConfig(vocab_size=50, context_length=16, num_layers=2, num_heads=2,
                    embed_dim=32, tie_embeddings=False)
    variables = _random_variables(cfg)
    params = variables["params"]
    assert params["head"]["kernel"].shape == (32, 50) and "bias" not in params["head"]
    tokens = _tokens((2, 9))
    logits = _apply(cfg)(variables, tokens)
    p64 = _numpy64(params)
    expected = reference_logits(p64, np.asarray(tokens), cfg, embed_out=p64["head"]["kernel"].T)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    cached, _ = _apply(cfg)(variables, tokens, GPT(cfg).init_cache(2, 9), method="prefill")
    np.testing.assert_allclose(cached, logits, rtol=1e-5, atol=1e-5)


def test_fused_path_matches_explicit_masked_softmax(perturbed):
    # prefill into an empty cache of exactly T slots is the explicit path with
    # the plain causal mask; __call__ is jax.nn.dot_product_attention(is_causal).
    tokens = _tokens((2, 16), seed=3)
    fused = _apply()(perturbed, tokens)
    explicit, cache = _apply()(perturbed, tokens, GPT(CFG).init_cache(2, 16), method="prefill")
    np.testing.assert_allclose(explicit, fused, rtol=1e-5, atol=1e-5)
    assert int(cache.index) == 16


def test_vmap_matches_one_call_per_example(perturbed):
    tokens = _tokens((3, 2, 12), seed=4)  # [N, B, T]
    each = np.stack([_apply()(perturbed, t) for t in tokens])
    mapped = jax.jit(jax.vmap(lambda t: GPT(CFG).apply(perturbed, t)))(tokens)
    np.testing.assert_allclose(mapped, each, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- #
# Structure: parameters, tying, init, causality.
# --------------------------------------------------------------------------- #


def _closed_form_num_params(v, c, layers, d, ratio, tied):
    attention = (d * 3 * d + 3 * d) + (d * d + d)  # qkv, out
    mlp = (d * ratio * d + ratio * d) + (ratio * d * d + d)  # fc, proj
    norms = 2 * (2 * d)  # attention_norm, mlp_norm
    head = 0 if tied else d * v
    return v * d + c * d + layers * (attention + mlp + norms) + 2 * d + head


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_closed_form(tied):
    cfg = GPTConfig(vocab_size=37, context_length=11, num_layers=3, num_heads=4,
                    embed_dim=24, mlp_ratio=3, tie_embeddings=tied)
    shapes = jax.eval_shape(GPT(cfg).init, jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
    # mlp_ratio=4 would give the familiar 12 L d^2 + 13 L d; here 10 L d^2 + 11 L d.
    assert num_params(shapes["params"]) == _closed_form_num_params(37, 11, 3, 24, 3, tied)
    assert ("head" in shapes["params"]) == (not tied)


F64 = GPTConfig(vocab_size=11, context_length=6, num_layers=1, num_heads=2, embed_dim=8,
                mlp_ratio=2, dtype=jnp.float64)


def _float64_setup():
    """Call inside jax.enable_x64: float64 params, tokens, loss weights."""
    params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)),
                          _random_variables(F64, scale=0.3)["params"])
    tokens = _tokens((2, 5), vocab=11)
    weights = jnp.asarray(np.random.default_rng(7).normal(size=(2, 5, 11)))
    return params, tokens, weights


def test_weight_tying_gradient_flows_through_both_uses():
    with jax.enable_x64(True):
        params, tokens, weights = _float64_setup()
        assert "head" not in params  # the head is the embedding, no parameter of its own

        def model_loss(table):
            p = {**params, "token_embedding": table}
            return jnp.sum(GPT(F64).apply({"params": p}, tokens) * weights)

        def reference_loss(embed_in, embed_out):
            logits = reference_logits(params, tokens, F64, jnp, embed_in, embed_out)
            return jnp.sum(logits * weights)

        table = params["token_embedding"]
        grad = jax.jit(jax.grad(model_loss))(table)
        grad_in, grad_out = jax.jit(jax.grad(reference_loss, argnums=(0, 1)))(table, table)
    assert grad.dtype == jnp.float64
    np.testing.assert_allclose(grad, grad_in + grad_out, rtol=1e-10, atol=1e-12)
    # Rows of tokens absent from the input are reached through the head only.
    unused = np.setdiff1d(np.arange(F64.vocab_size), np.asarray(tokens))
    assert unused.size and np.all(np.abs(grad[unused]).sum(-1) > 0)
    np.testing.assert_array_equal(grad_in[unused], 0.0)
    assert np.abs(grad_in).sum() > 0


def test_gradients_match_finite_differences_float64():
    with jax.enable_x64(True):
        params, tokens, weights = _float64_setup()

        flat, unravel = ravel_pytree(params)  # one leaf: few small eager ops in check_grads

        @jax.jit
        def loss(flat):
            return jnp.sum(GPT(F64).apply({"params": unravel(flat)}, tokens) * weights)

        assert loss(flat).dtype == jnp.float64
        check_grads(loss, (flat,), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


def test_gpt2_initialisation_scales(variables):
    params = variables["params"]
    block = params["block_1"]
    residual = 0.02 / math.sqrt(2 * CFG.num_layers)
    for array, std in [(params["token_embedding"], 0.02), (params["position_embedding"], 0.02),
                       (block["attention"]["qkv"]["kernel"], 0.02), (block["fc"]["kernel"], 0.02),
                       (block["attention"]["out"]["kernel"], residual),
                       (block["proj"]["kernel"], residual)]:
        assert abs(float(np.std(array)) / std - 1.0) < 0.1
    np.testing.assert_array_equal(block["fc"]["bias"], 0.0)
    np.testing.assert_array_equal(block["mlp_norm"]["scale"], 1.0)


def test_causal_masking(perturbed):
    tokens = _tokens((1, 12), seed=8)
    base = _apply()(perturbed, tokens)
    for t in (0, 5, 11):
        changed = _apply()(perturbed, tokens.at[0, t].set((tokens[0, t] + 1) % CFG.vocab_size))
        np.testing.assert_array_equal(changed[:, :t], base[:, :t])
        assert np.abs(changed[:, t] - base[:, t]).max() > 1e-4


def test_dropout_only_when_training(variables):
    cfg = dataclasses.replace(CFG, dropout_rate=0.5)  # same parameters as CFG
    tokens = _tokens((2, 6))
    apply = _apply(cfg)
    evaluated = apply(variables, tokens)
    train_a = apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(2)})
    assert np.abs(train_a - evaluated).max() > 1e-3 and np.abs(train_a - train_b).max() > 1e-3
    with pytest.raises(ValueError, match="Dropout with train=True needs a PRNG key"):
        apply(variables, tokens, train=True)


def test_bfloat16_compute(perturbed):
    cfg = dataclasses.replace(CFG, dtype=jnp.bfloat16)  # same float32 parameters as CFG
    variables = perturbed
    shapes = jax.eval_shape(GPT(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))
    tokens = _tokens((2, 10))
    logits = _apply(cfg)(variables, tokens)
    assert logits.dtype == jnp.float32
    reference = _apply()(variables, tokens)
    assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()
    cache = GPT(cfg).init_cache(2, 10)
    assert cache.keys.dtype == jnp.bfloat16
    cached, _ = _apply(cfg)(variables, tokens, cache, method="prefill")
    assert np.abs(cached - reference).max() < 0.05 * np.abs(reference).max()


# --------------------------------------------------------------------------- #
# KV cache and generation vs full recomputation.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_cached_logits_equal_full_forward_at_every_position(perturbed, prompt_len):
    tokens = _tokens((2, 12), seed=9)
    full = _apply()(perturbed, tokens)  # [B, T, V]
    cache = GPT(CFG).init_cache(2, 12)
    assert isinstance(cache, KVCache) and cache.max_len == 12
    assert cache.keys.shape == (2, 2, 12, 2, 16) and int(cache.index) == 0
    logits, cache = _apply()(perturbed, tokens[:, :prompt_len], cache, method="prefill")
    np.testing.assert_allclose(logits, full[:, :prompt_len], rtol=1e-5, atol=1e-5)
    for t in range(prompt_len, 12):
        logits, cache = _apply()(perturbed, tokens[:, t:t + 1], cache, method="decode_step")
        assert logits.shape == (2, CFG.vocab_size) and int(cache.index) == t + 1
        np.testing.assert_allclose(logits, full[:, t], rtol=1e-5, atol=1e-5)


def test_prefill_in_chunks(perturbed):
    tokens = _tokens((2, 12), seed=10)
    cache = GPT(CFG).init_cache(2, 12)
    chunks = []
    for start, stop in [(0, 5), (5, 6), (6, 11), (11, 12)]:
        logits, cache = _apply()(perturbed, tokens[:, start:stop], cache, method="prefill")
        chunks.append(logits)
    np.testing.assert_allclose(np.concatenate(chunks, 1), _apply()(perturbed, tokens),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_greedy_generation_equals_full_recomputation(variables, prompt_len):
    prompt = _tokens((2, prompt_len), seed=11)
    new = CFG.context_length - prompt_len
    generated = generate(GPT(CFG), variables["params"], prompt, new, key=jax.random.key(0),
                         greedy=True)
    assert generated.shape == (2, CFG.context_length) and generated.dtype == jnp.int32
    np.testing.assert_array_equal(generated[:, :prompt_len], prompt)

    # Recompute the whole sequence every step; padding to a fixed length keeps
    # one compiled program (causality, tested above, makes padding invisible).
    sequence = np.zeros((2, CFG.context_length), np.int32)
    sequence[:, :prompt_len] = prompt
    for t in range(prompt_len, CFG.context_length):
        logits = _apply()(variables, jnp.asarray(sequence))
        sequence[:, t] = np.argmax(logits[:, t - 1], axis=-1)
    np.testing.assert_array_equal(generated, sequence)


def test_generation_compiles_once_per_shape(variables):
    events = []

    def listener(event, duration, **kwargs):
        if event in ("/jax/core/compile/jaxpr_trace_duration",
                     "/jax/core/compile/backend_compile_duration"):
            events.append(event)

    params = variables["params"]
    prompts = [_tokens((2, 4), seed=s) for s in range(4)]
    keys = [jax.random.key(s) for s in range(4)]
    increment = jax.jit(lambda x: x + 1)
    generate(GPT(CFG), params, prompts[0], 5, key=keys[0], top_p=0.9)  # compiles
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for prompt, key, temperature in zip(prompts[1:], keys[1:], (0.5, 1.0, 2.0),
                                            strict=True):
            # a fresh but equal model, new values, new temperature: no retrace
            out = generate(GPT(CFG), params, prompt, 5, key=key, top_p=0.9,
                           temperature=temperature)
            out.block_until_ready()
        assert events == []
        increment(jnp.zeros(3)).block_until_ready()
        assert events  # the listener does see a new program
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_generate_edge_cases(variables):
    prompt = _tokens((2, 4))
    same = generate(GPT(CFG), variables, prompt, 0, key=jax.random.key(0))
    np.testing.assert_array_equal(same, prompt)
    # whole variables or the params collection; same key, same tokens
    a = generate(GPT(CFG), variables, prompt, 5, key=jax.random.key(1), top_p=0.9)
    b = generate(GPT(CFG), variables["params"], prompt, 5, key=jax.random.key(1), top_p=0.9)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 9) and int(a.min()) >= 0 and int(a.max()) < CFG.vocab_size


# --------------------------------------------------------------------------- #
# Sampling filters on hand-made logits.
# --------------------------------------------------------------------------- #


def test_top_k_filter_keeps_exactly_k():
    logits = jnp.array([[1.0, 5.0, 3.0, -2.0, 4.0], [2.0, 2.0, 2.0, 0.0, 1.0]])
    filtered = top_k_filter(logits, 2)
    np.testing.assert_array_equal(np.isfinite(filtered),
                                  [[0, 1, 0, 0, 1], [1, 1, 0, 0, 0]])  # ties: first by index
    np.testing.assert_array_equal(filtered[0, [1, 4]], [5.0, 4.0])
    np.testing.assert_array_equal(top_k_filter(logits, 5), logits)


def test_top_k_sampling_never_leaves_the_top_k():
    logits = jnp.log(jnp.array([0.05, 0.3, 0.02, 0.25, 0.08, 0.2, 0.1]))
    draws = sample_next_token(jnp.broadcast_to(logits, (4000, 7)), jax.random.key(0),
                              top_k=3)
    counts = np.bincount(np.asarray(draws), minlength=7)
    assert set(np.flatnonzero(counts)) == {1, 3, 5}
    # renormalised over the survivors: 0.3, 0.25, 0.2 out of 0.75
    np.testing.assert_allclose(counts[[1, 3, 5]] / 4000, [0.4, 1 / 3, 0.8 / 3], atol=0.03)


@pytest.mark.parametrize("p, kept", [(0.4, {0}), (0.6, {0, 1}), (0.9, {0, 1, 2}),
                                     (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_set_reaching_p(p, kept):
    probs = np.array([0.15, 0.05, 0.5, 0.3])  # sorted: 2 (0.5), 3 (0.3), 0 (0.15), 1
    rank_to_index = [2, 3, 0, 1]
    filtered = top_p_filter(jnp.log(jnp.asarray(probs, jnp.float32))[None], p)
    assert set(np.flatnonzero(np.isfinite(filtered[0]))) == {rank_to_index[r] for r in kept}


def test_top_p_one_keeps_every_token_even_improbable_ones():
    # probabilities ~2e-9 beside one ~1: the float32 mass before them rounds to 1.0
    logits = jnp.array([[20.0, 0.0, 0.0, -3.0], [0.0, 1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(top_p_filter(logits, 1.0), logits)


def test_top_p_matches_numpy_reference():
    rng = np.random.default_rng(12)
    logits = rng.normal(size=(20, 30)).astype(np.float32) * 2
    for p in (0.3, 0.7, 0.95):
        filtered = np.isfinite(top_p_filter(jnp.asarray(logits), p))
        for row, keep in zip(logits, filtered, strict=True):
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            order = np.argsort(-probs)
            n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # first with cum >= p
            assert set(np.flatnonzero(keep)) == set(order[:n])


def test_top_p_bfloat16_logits_keep_mass_p():
    # A bfloat16 cumulative sum over 4000 probabilities drifted: 3112 tokens kept, 3136 needed.
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(1, 4000)) * 0.5, jnp.bfloat16)
    row = np.asarray(logits[0], np.float64)
    probs = np.sort(np.exp(row - row.max()) / np.exp(row - row.max()).sum())[::-1]
    needed = int(np.sum(np.cumsum(probs) - probs < 0.9))
    filtered = top_p_filter(logits, 0.9)
    assert filtered.dtype == jnp.bfloat16
    assert int(np.isfinite(np.asarray(filtered, np.float32)).sum()) == needed


def test_temperature():
    logits = jnp.array([[0.0, 1.0, 0.5, 0.9]])
    many = jnp.broadcast_to(logits, (5000, 4))
    cold = sample_next_token(many, jax.random.key(0), temperature=1e-3)
    np.testing.assert_array_equal(cold, 1)  # temperature -> 0 is greedy
    np.testing.assert_array_equal(sample_next_token(logits, jax.random.key(0), greedy=True), [1])
    warm = np.bincount(np.asarray(sample_next_token(many, jax.random.key(1))), minlength=4)
    np.testing.assert_allclose(warm / 5000, jax.nn.softmax(logits[0]), atol=0.025)
    hot = np.bincount(np.asarray(sample_next_token(many, jax.random.key(2), temperature=100.0)),
                      minlength=4)
    np.testing.assert_allclose(hot / 5000, 0.25, atol=0.025)


# --------------------------------------------------------------------------- #
# Training: a tiny GPT memorises one sequence.
# --------------------------------------------------------------------------- #


def test_overfits_one_sequence():
    cfg = GPTConfig(vocab_size=50, context_length=16, num_layers=1, num_heads=2, embed_dim=32)
    sequence = _tokens((1, 17), seed=13)
    batch = {"inputs": sequence[:, :-1], "labels": sequence[:, 1:]}
    with jax.numpy_dtype_promotion("standard"):  # optax's update rules promote
        create = jax.jit(lambda key, x: TrainState.create(
            model=GPT(cfg), tx=make_optimizer("adam", 1e-2), key=key, example_input=x))
        state = create(jax.random.key(0), batch["inputs"])
        step = jax.jit(make_train_step())
        for _ in range(200):
            state, metrics = step(state, batch)
            if float(metrics["loss"]) < 0.1:
                break
    assert float(metrics["loss"]) < 0.1
    logits = _apply(cfg)({"params": state.params}, batch["inputs"])
    np.testing.assert_array_equal(jnp.argmax(logits, -1), batch["labels"])


# --------------------------------------------------------------------------- #
# Errors that speak the user's language (raised before any computation).
# --------------------------------------------------------------------------- #


def test_error_sequence_too_long(variables):
    with pytest.raises(ShapeError, match=r"GPT got tokens of shape \(1, 17\).*context_length=16"):
        _apply()(variables, jnp.zeros((1, 17), jnp.int32))


def test_error_float_tokens(variables):
    with pytest.raises(TypeError, match=r"GPT expected integer token ids .*float32"):
        _apply()(variables, jnp.zeros((1, 4), jnp.float32))


def test_error_token_rank_and_range(variables):
    with pytest.raises(ShapeError, match=r"GPT expected tokens of shape \[batch, time\]"):
        _apply()(variables, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ShapeError, match="at least one token"):
        _apply()(variables, jnp.zeros((2, 0), jnp.int32))
    with pytest.raises(ValueError, match=r"token ids in \[0, 50\], outside \[0, vocab_size=50\)"):
        GPT(CFG).apply(variables, jnp.array([[0, 50]], jnp.int32))  # values: eager only


def test_error_generation_past_context(variables):
    with pytest.raises(ValueError, match=r"5 \+ 12 = 17 exceeds context_length=16"):
        generate(GPT(CFG), variables["params"], _tokens((1, 5)), 12, key=jax.random.key(0))


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"top_k": 0}, "top_k must be a positive int"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"max_new_tokens": -1}, "max_new_tokens must be an int >= 0"),
])
def test_error_bad_sampling_arguments(variables, kwargs, match):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(GPT(CFG), variables["params"], _tokens((1, 2)), key=jax.random.key(0), **kwargs)


def test_error_cache_misuse(variables):
    model = GPT(CFG)
    cache = model.init_cache(2, 4)
    with pytest.raises(ShapeError, match=r"longer than cache max_len=4"):
        model.apply(variables, _tokens((2, 5)), cache, method="prefill")
    cache = cache.replace(index=jnp.int32(3))
    with pytest.raises(ValueError, match=r"1 free slots \(index=3, max_len=4\) but got 2"):
        model.apply(variables, _tokens((2, 2)), cache, method="prefill")
    with pytest.raises(ShapeError, match=r"decode_step expected tokens of shape \[batch, 1\]"):
        model.apply(variables, _tokens((2, 2)), cache, method="decode_step")
    with pytest.raises(ShapeError, match=r"cache keys/values of shape .*\(2, 3, 4, 2, 16\)"):
        model.apply(variables, _tokens((3, 1)), cache, method="decode_step")
    with pytest.raises(TypeError, match="expected a KVCache"):
        model.apply(variables, _tokens((2, 1)), {"keys": 0}, method="decode_step")
    with pytest.raises(ValueError, match=r"max_len must be in \[1, context_length=16\]"):
        model.init_cache(1, 17)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        model.init_cache(0)


@pytest.mark.parametrize("kwargs, match", [
    ({"embed_dim": 30, "num_heads": 4}, "num_heads to divide embed_dim"),
    ({"num_layers": 0}, "num_layers must be a positive int"),
    ({"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\)"),
])
def test_error_bad_config(kwargs, match):
    base = {"vocab_size": 50, "context_length": 16, "num_layers": 2, "num_heads": 2,
            "embed_dim": 32}
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**base, **kwargs})


def test_error_filter_arguments():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        top_p_filter(jnp.zeros((1, 3)), 0.0)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        top_k_filter(jnp.zeros((1, 3)), 1.5)


def test_untied_bfloat16_head_accumulates_logits_in_float32():
    # Like the tied head: bfloat16 inputs, float32 products and result. A bf16
    # Dense would put every logit on the bfloat16 grid before the cast.
    cfg = GPTConfig(vocab_size=50, context_length=16, num_layers=1, num_heads=2,
                    embed_dim=32, tie_embeddings=False, dtype=jnp.bfloat16)
    variables = _random_variables(dataclasses.replace(cfg, dtype=None))
    logits = _apply(cfg)(variables, _tokens((2, 9)))
    assert logits.dtype == jnp.float32
    on_grid = np.asarray(logits.astype(jnp.bfloat16).astype(jnp.float32) == logits)
    assert on_grid.mean() < 0.5
