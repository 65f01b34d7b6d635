"""The native kernels (nnlib.layers._native) against XLA's programs.

The LSTM's reference is ``RNN(..., fused=False)``: a plain ``lax.scan`` of the
cell, differentiated by JAX's own autodiff, which test_recurrent.py checks
against PyTorch and finite differences; attention's is
``dot_product_attention(implementation="explicit")``, checked there the same way. Shapes are chosen to leave partial vectors and
partial register blocks in the kernel (hidden sizes that are not a multiple of
the 16- or 64-unit panels, batches that are not a multiple of the 6-row block).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnlib.layers import _native
from nnlib.layers.attention import causal_mask, dot_product_attention
from nnlib.layers.conv import Conv1D, Conv2D
from nnlib.layers.recurrent import RNN, Bidirectional, LSTMCell

HAS_COMPILER = shutil.which("c++") is not None


@pytest.fixture(scope="module")
def native():
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler: RNN runs XLA's recurrence (tested elsewhere)")
    # Where a compiler exists the kernel must build: a failure here is a bug.
    assert _native.available(), _native.reason()


def _value_and_grads(layer, params, x, carry=None):
    def loss(params, x, carry):
        (c, h), out = layer.apply(params, x, initial_carry=carry)
        w = jnp.cos(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
        return jnp.sum(out * w) + jnp.sum(jnp.sin(c)) + 0.5 * jnp.sum(h * h)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, x, carry)


def _close(a, b, tol=2e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "batch, time, hidden, reverse, features",
    [(5, 7, 20, False, 13), (5, 7, 20, True, 6), (13, 3, 70, False, 6), (1, 1, 3, True, 6),
     (8, 4, 128, False, 6), (4, 5, 20, False, 40)],
)
def test_matches_xla_recurrence(native, batch, time, hidden, reverse, features):
    """Outputs, final carry and every gradient (weights, inputs, initial carry),
    with the input projection inside the kernel (features <= hidden, ragged
    tiles of features) and beforehand (features > hidden)."""
    x = jax.random.normal(jax.random.key(0), (batch, time, features))
    cell = LSTMCell(hidden, forget_bias=1.0)
    fast = RNN(cell, reverse=reverse)
    plain = RNN(cell, reverse=reverse, fused=False)
    params = fast.init(jax.random.key(1), x)
    keys = jax.random.split(jax.random.key(2), 2)
    carry = tuple(jax.random.normal(k, (batch, hidden)) for k in keys)
    want = plain.apply(params, x, initial_carry=carry)
    got = jax.jit(lambda p, x, c: fast.apply(p, x, initial_carry=c))(params, x, carry)
    _close(got, want, 2e-6)
    _close(_value_and_grads(fast, params, x, carry), _value_and_grads(plain, params, x, carry))


@pytest.mark.parametrize("features", [6, 40])
def test_gradients_of_what_is_read(native, features):
    """Gradients where some outputs are unread (their cotangents are symbolic
    zeros the kernel never receives) and the inputs are data (no inputs
    gradient is formed): the last state alone, the outputs alone."""
    x = jax.random.normal(jax.random.key(0), (4, 6, features))
    cell = LSTMCell(20)
    fast, plain = RNN(cell), RNN(cell, fused=False)
    params = fast.init(jax.random.key(1), x)
    last_state = lambda layer: lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)[0][1]))
    outputs = lambda layer: lambda p, x: jnp.sum(layer.apply(p, x)[1] ** 3)
    for loss in (last_state, outputs):
        for argnums in (0, (0, 1)):
            got = jax.jit(jax.grad(loss(fast), argnums))(params, x)
            _close(got, jax.grad(loss(plain), argnums)(params, x))


def test_lstm_gradients_repeat_exactly(native):
    """The backward's weight gradient is summed by whichever threads are free
    while the loop runs; its order of summation must not depend on which
    thread took what: repeated calls give bit-identical gradients. (Summed
    per thread and merged in arrival order, ~1 call in 10 differed.)"""
    x = jax.random.normal(jax.random.key(1), (32, 64, 32))
    layer = RNN(LSTMCell(256))
    params = layer.init(jax.random.key(0), x)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x)[1] ** 2)))
    want = jax.tree.leaves(grad(params))
    for _ in range(60):
        for a, b in zip(want, jax.tree.leaves(grad(params)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_projected_and_inputs_together(native):
    """``lstm_recurrence`` with both halves of the inputs' gates, ``p_t`` and
    ``x_t W_in``, against a ``lax.scan`` of the cell's equations: values and
    the gradients of every argument."""
    batch, time, features, hidden = 3, 5, 7, 10
    keys = jax.random.split(jax.random.key(0), 7)
    kernel = 0.3 * jax.random.normal(keys[0], (hidden, 4 * hidden))
    in_kernel = 0.3 * jax.random.normal(keys[1], (features, 4 * hidden))
    bias = jax.random.normal(keys[2], (4 * hidden,))
    carry = tuple(jax.random.normal(k, (batch, hidden)) for k in keys[3:5])
    projected = jax.random.normal(keys[5], (time, batch, 4 * hidden))
    inputs = jax.random.normal(keys[6], (batch, time, features))

    def reference(kernel, in_kernel, bias, carry, projected, inputs):
        def step(carry, xs):
            c, h = carry
            p, x = xs
            i, f, g, o = jnp.split(p + x @ in_kernel + bias + h @ kernel, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (c, h), h
        return jax.lax.scan(step, carry, (projected, jnp.swapaxes(inputs, 0, 1)))

    def native_call(kernel, in_kernel, bias, carry, projected, inputs):
        return _native.lstm_recurrence(kernel, carry, projected, bias, inputs=inputs,
                                       input_kernel=in_kernel)

    args = (kernel, in_kernel, bias, carry, projected, inputs)
    _close(jax.jit(native_call)(*args), reference(*args), 2e-6)

    def loss(f):
        def value(*args):
            (c, h), out = f(*args)
            return jnp.sum(out * jnp.cos(out)) + jnp.sum(c) + jnp.sum(h ** 2)
        return jax.jit(jax.grad(value, argnums=tuple(range(6))))

    _close(loss(native_call)(*args), loss(reference)(*args))
    with pytest.raises(ValueError, match="together"):
        _native.lstm_recurrence(kernel, carry, projected, inputs=inputs)
    with pytest.raises(ValueError, match="give projected, or inputs"):
        _native.lstm_recurrence(kernel, carry)


def test_runs_the_native_call(native):
    """The fast path is really taken (an FFI call in the program), and not
    where it does not apply: a mask, float16, ``native=False``."""
    x = jnp.ones((2, 3, 4))
    layer = RNN(LSTMCell(8))
    params = layer.init(jax.random.key(0), x)

    def program(layer, x, **kw):
        return str(jax.make_jaxpr(lambda p: layer.apply(p, x, **kw))(params))

    assert "nnlib_lstm_forward" in program(layer, x)
    assert "nnlib_lstm_forward" not in program(layer, x, mask=jnp.ones((2, 3), bool))
    assert "nnlib_lstm_forward" not in program(RNN(LSTMCell(8), native=False), x)
    assert "nnlib_lstm_forward" not in program(RNN(LSTMCell(8, dtype=jnp.float16)),
                                                x.astype(jnp.float16))


def test_vmap_and_bidirectional(native):
    """Under ``vmap`` (an ensemble's parameters) the call runs per member; a
    bidirectional layer runs two calls, forward and reverse."""
    x = jax.random.normal(jax.random.key(0), (3, 5, 4))
    layer = Bidirectional(LSTMCell(9), LSTMCell(9))
    keys = jax.random.split(jax.random.key(1), 3)
    params = jax.vmap(lambda k: layer.init(k, x))(keys)
    got = jax.vmap(lambda p: layer.apply(p, x))(params)
    member = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
    for i in range(3):
        _close(member(got, i), layer.apply(member(params, i), x), 1e-6)
    # gradients under vmap against per-member gradients
    loss = lambda p: jnp.sum(layer.apply(p, x)[1] ** 2)
    grads = jax.vmap(jax.grad(loss))(params)
    for i in range(3):
        _close(member(grads, i), jax.grad(loss)(member(params, i)))


def test_zero_steps(native):
    x = jnp.ones((2, 0, 3))
    layer = RNN(LSTMCell(4))
    params = layer.init(jax.random.key(0), jnp.ones((2, 1, 3)))
    carry, out = layer.apply(params, x)
    assert out.shape == (2, 0, 4)
    _close(carry, (jnp.zeros((2, 4)), jnp.zeros((2, 4))))


def test_build_failures_are_reported(tmp_path):
    """No compiler, or one that fails: no library and the reason why."""
    library, why = _native.build(cxx="nnlib-no-such-compiler", cache_dir=tmp_path)
    assert library is None and "not found" in why
    library, why = _native.build(cxx="false", cache_dir=tmp_path)
    assert library is None and "failed" in why
    assert list(tmp_path.iterdir()) == []  # no partial library left behind


def test_the_package_ships_every_source():
    """An installed (non-editable) nnlib builds the kernels from the files its
    package data lists: every source and header the build reads must match
    it (the header was once left out of wheels)."""
    root = _native.NATIVE_DIR.parents[2]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["nnlib.layers"]
    layers = _native.NATIVE_DIR.parent
    for path in (*_native.SOURCES, *_native.HEADERS):
        relative = path.relative_to(layers).as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative


def test_build_is_cached(native, tmp_path):
    """A second build finds the first one's library (keyed by source, compiler, CPU)."""
    first, _ = _native.build(cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    second, _ = _native.build(cache_dir=tmp_path)
    assert second == first and second.stat().st_mtime_ns == stamp


def test_turned_off_by_environment():
    """``NNLIB_NATIVE=0``: no kernel, the XLA recurrence, and the reason."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from nnlib.layers import _native
        from nnlib.layers.recurrent import RNN, LSTMCell
        assert not _native.available()
        assert _native.reason() == "NNLIB_NATIVE=0"
        layer = RNN(LSTMCell(4))
        x = jnp.ones((2, 3, 5))
        params = layer.init(jax.random.key(0), x)
        assert "nnlib_lstm" not in str(jax.make_jaxpr(lambda p: layer.apply(p, x))(params))
    """)
    env = {"NNLIB_NATIVE": "0", "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


def test_unavailable_warns_once(monkeypatch):
    """A failed build warns once and RNN falls back to XLA's recurrence."""
    monkeypatch.setattr(_native, "_state", {"loaded": None, "reason": "not built yet"})
    monkeypatch.setattr(_native, "build", lambda: (None, "no C++ compiler (test)"))
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert not _native.available()
    assert not _native.available()  # no second build, no second warning
    assert _native.reason() == "no C++ compiler (test)"
    x = jnp.ones((2, 3, 5))
    layer = RNN(LSTMCell(4))
    params = layer.init(jax.random.key(0), x)
    assert "nnlib_lstm" not in str(jax.make_jaxpr(lambda p: layer.apply(p, x))(params))


# --- attention ---------------------------------------------------------------


def _qkv(batch=2, q_len=5, kv_len=7, heads=3, head_dim=4, v_dim=None, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (batch, q_len, heads, head_dim)),
            jax.random.normal(k2, (batch, kv_len, heads, head_dim)),
            jax.random.normal(k3, (batch, kv_len, heads, v_dim or head_dim)))


def _masks(batch, q_len, kv_len, heads):
    """None, causal, padding with an empty row, per-head random with an empty row."""
    causal = causal_mask(q_len, kv_len)
    lengths = jnp.array([kv_len, 3, 0][:batch])
    padding = (jnp.arange(kv_len)[None, :] < lengths[:, None])[:, None, None, :]
    per_head = jax.random.bernoulli(jax.random.key(9), 0.6, (batch, heads, q_len, kv_len))
    return [None, causal, padding, per_head.at[0, 1, 2].set(False)]


@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 4, None), (3, 9, 9, 2, 20, 6), (1, 1, 3, 1, 1, None)])
def test_attention_matches_explicit(native, shape):
    """Outputs and gradients against the explicit path for every kind of mask,
    fully masked query rows included (output and gradients 0)."""
    batch, q_len, kv_len, heads, head_dim, v_dim = shape
    q, k, v = _qkv(batch, q_len, kv_len, heads, head_dim, v_dim)
    w = jax.random.normal(jax.random.key(5), (batch, q_len, heads, v_dim or head_dim))
    for mask in _masks(batch, q_len, kv_len, heads):
        if mask is not None and mask.shape[0] not in (1, batch):
            continue
        fast = lambda q, k, v, m=mask: dot_product_attention(q, k, v, m, implementation="native")
        slow = lambda q, k, v, m=mask: dot_product_attention(q, k, v, m, implementation="explicit")
        _close(jax.jit(fast)(q, k, v), slow(q, k, v), 2e-6)
        loss = lambda f: (lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)) * w))
        _close(jax.jit(jax.grad(loss(fast), (0, 1, 2)))(q, k, v),
               jax.grad(loss(slow), (0, 1, 2))(q, k, v), 2e-5)


def test_attention_every_derivative(native):
    """Reverse mode runs the native backward; forward mode, forward-over-reverse
    and reverse-over-reverse (through XLA's operations) agree with the explicit path."""
    q, k, v = _qkv()
    mask = causal_mask(5, 7).at[..., 0, :].set(False)
    fast = lambda q, k, v: dot_product_attention(q, k, v, mask, implementation="native")
    slow = lambda q, k, v: dot_product_attention(q, k, v, mask, implementation="explicit")
    w = jax.random.normal(jax.random.key(3), q.shape[:3] + (v.shape[-1],))
    loss = lambda f: (lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)) * w))
    tangents = _qkv(seed=4)
    assert "nnlib_attention_backward" in str(jax.make_jaxpr(jax.grad(loss(fast)))(q, k, v))
    _close(jax.jvp(fast, (q, k, v), tangents), jax.jvp(slow, (q, k, v), tangents), 1e-5)
    hvp = lambda f: jax.jvp(jax.grad(loss(f), (0, 1, 2)), (q, k, v), tangents)[1]
    _close(hvp(fast), hvp(slow), 1e-5)
    rr = lambda f: jax.grad(lambda q: jnp.sum(jax.grad(loss(f), 1)(q, k, v) ** 2))(q)
    _close(rr(fast), rr(slow), 1e-4)
    qs = jnp.stack([q, 0.5 * q])
    _close(jax.vmap(lambda q: jax.grad(loss(fast))(q, k, v))(qs),
           jax.vmap(lambda q: jax.grad(loss(slow))(q, k, v))(qs), 1e-5)
    _close(jax.vmap(lambda q: jax.jvp(fast, (q, k, v), tangents)[1])(qs),
           jax.vmap(lambda q: jax.jvp(slow, (q, k, v), tangents)[1])(qs), 1e-5)


def test_attention_native_refuses_what_it_cannot_do(native):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="float32"):
        dot_product_attention(q.astype(jnp.float16), k.astype(jnp.float16),
                              v.astype(jnp.float16), implementation="native")
    with pytest.raises(ValueError, match="cannot return weights"):
        dot_product_attention(q, k, v, return_weights=True, implementation="native")
    # "auto" stays on the explicit path on CPU.
    jaxpr = str(jax.make_jaxpr(lambda q: dot_product_attention(q, k, v))(q))
    assert "nnlib_attention" not in jaxpr


def test_attention_native_needs_the_kernels(monkeypatch):
    monkeypatch.setattr(_native, "_state", {"loaded": False, "reason": "no C++ compiler (test)"})
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        dot_product_attention(q, k, v, implementation="native")
    with pytest.raises(RuntimeError, match="not available"):
        _native.lstm_recurrence(jnp.zeros((2, 8)), (jnp.zeros((1, 2)),) * 2, jnp.zeros((3, 1, 8)))


def test_attention_qkv_reads_the_fused_projection(native):
    """``attention_qkv`` on ``[B, T, 3, H, D]`` equals attention on its three
    slices, in value and every derivative; its gradient comes out fused."""
    qkv = jax.random.normal(jax.random.key(0), (2, 6, 3, 2, 5))
    mask = causal_mask(6).at[..., 1, :].set(False)
    fast = lambda x: _native.attention_qkv(x, mask)
    slow = lambda x: dot_product_attention(x[:, :, 0], x[:, :, 1], x[:, :, 2], mask,
                                           implementation="explicit")
    w = jax.random.normal(jax.random.key(1), (2, 6, 2, 5))
    loss = lambda f: (lambda x: jnp.sum(jnp.sin(f(x)) * w))
    tangent = jax.random.normal(jax.random.key(2), qkv.shape)
    _close(jax.jit(fast)(qkv), slow(qkv), 2e-6)
    _close(jax.jit(jax.grad(loss(fast)))(qkv), jax.grad(loss(slow))(qkv), 1e-5)
    assert "nnlib_attention_qkv_backward" in str(jax.make_jaxpr(jax.grad(loss(fast)))(qkv))
    _close(jax.jvp(fast, (qkv,), (tangent,)), jax.jvp(slow, (qkv,), (tangent,)), 1e-5)
    hvp = lambda f: jax.jvp(jax.grad(loss(f)), (qkv,), (tangent,))[1]
    _close(hvp(fast), hvp(slow), 1e-5)
    xs = jnp.stack([qkv, 0.5 * qkv])
    _close(jax.vmap(jax.grad(loss(fast)))(xs), jax.vmap(jax.grad(loss(slow)))(xs), 1e-5)


def test_gpt_attends_natively(native):
    """The GPT's float32 CPU attention runs the fused native kernel; its logits
    and gradients match ``native_attention=False`` (the explicit path)."""
    from nnlib.models.gpt import GPT, GPTConfig

    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 17)
    config = GPTConfig(vocab_size=17, context_length=9, num_layers=2, num_heads=2, embed_dim=8)
    fast, slow = GPT(config), GPT(dataclasses.replace(config, native_attention=False))
    params = fast.init(jax.random.key(1), tokens)
    assert "nnlib_attention_qkv_forward" in str(jax.make_jaxpr(fast.apply)(params, tokens))
    assert "nnlib_attention" not in str(jax.make_jaxpr(slow.apply)(params, tokens))
    loss = lambda model: (lambda p: jnp.mean(model.apply(p, tokens) ** 2))
    _close(fast.apply(params, tokens), slow.apply(params, tokens), 1e-5)
    _close(jax.grad(loss(fast))(params), jax.grad(loss(slow))(params), 1e-5)


# --- LayerNorm ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 5, 20), (7, 128), (2, 1, 3)])
def test_layer_norm_backward_matches_xla(native, shape):
    """Every derivative of ``LayerNorm`` (native backward) against ``native=False``,
    at feature counts that leave partial vectors and row counts that leave
    partial chunks; the forward is the same XLA program either way."""
    from nnlib.layers import LayerNorm

    x = jax.random.normal(jax.random.key(0), shape) * 2 + 1
    fast, slow = LayerNorm(), LayerNorm(native=False)
    params = fast.init(jax.random.key(1), x)
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape),
                          params)
    w = jax.random.normal(jax.random.key(3), shape)
    loss = lambda m: (lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)) * w))
    _close(fast.apply(params, x), slow.apply(params, x), 0.0)
    grad = jax.jit(jax.grad(loss(fast), (0, 1)))
    assert "nnlib_layer_norm_backward" in str(jax.make_jaxpr(grad)(params, x))
    _close(grad(params, x), jax.grad(loss(slow), (0, 1))(params, x), 1e-5)
    t = jax.random.normal(jax.random.key(4), shape)
    _close(jax.jvp(lambda x: fast.apply(params, x), (x,), (t,)),
           jax.jvp(lambda x: slow.apply(params, x), (x,), (t,)), 1e-5)
    hvp = lambda m: jax.jvp(lambda x: jax.grad(loss(m), 1)(params, x), (x,), (t,))[1]
    _close(hvp(fast), hvp(slow), 1e-4)
    rr = lambda m: jax.grad(lambda x: jnp.sum(jax.grad(loss(m), 1)(params, x) ** 2))(x)
    _close(rr(fast), rr(slow), 1e-4)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    _close(jax.vmap(lambda p: jax.grad(loss(fast))(p, x))(stacked),
           jax.vmap(lambda p: jax.grad(loss(slow))(p, x))(stacked), 1e-5)


def test_layer_norm_native_only_where_it_applies(native):
    """No scale or no bias, half precision, ``native=False``: XLA's backward."""
    from nnlib.layers import LayerNorm

    x = jnp.ones((2, 4))

    def program(layer, x):
        params = layer.init(jax.random.key(0), x)
        return str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(layer.apply(p, x))))(params))

    assert "nnlib_layer_norm" in program(LayerNorm(), x)
    for layer, inputs in ((LayerNorm(use_bias=False), x), (LayerNorm(use_scale=False), x),
                          (LayerNorm(native=False), x), (LayerNorm(), x.astype(jnp.bfloat16))):
        assert "nnlib_layer_norm" not in program(layer, inputs)


_SHARD_MAP_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from nnlib.layers import _native
    from nnlib.models import CNN, RNNClassifier
    from nnlib.models.gpt import GPT, GPTConfig
    from nnlib.train import TrainState, make_optimizer, make_train_step
    from nnlib.train import optim
    from nnlib.train import parallel as par

    optim.FUSED_ADAMW_MIN_SIZE = 1  # every array through the native AdamW

    assert _native.available() and jax.device_count() == 2
    mesh = par.make_mesh()
    rng = np.random.default_rng(0)
    cases = {
        # LSTM recurrence; GPT: LayerNorm's backward and the fused attention.
        "lstm": (RNNClassifier(num_classes=3, hidden_size=16),
                 rng.normal(size=(4, 5, 3)).astype(np.float32), 3),
        "gpt": (GPT(GPTConfig(vocab_size=11, context_length=6, num_layers=1, num_heads=2,
                              embed_dim=8)),
                rng.integers(0, 11, size=(4, 6)).astype(np.int32), 11),
        # The second convolution's kernel gradient (16 input channels), AdamW.
        "cnn": (CNN(features=(16, 16), hidden_sizes=(8,), num_classes=3),
                rng.normal(size=(4, 8, 8, 1)).astype(np.float32), 3),
    }
    for name, (model, inputs, classes) in cases.items():
        labels = rng.integers(0, classes, size=inputs.shape[:2 if name == "gpt" else 1])
        batch = {"inputs": inputs, "labels": labels.astype(np.int32)}
        tx = make_optimizer("adamw", 0.01) if name == "cnn" else make_optimizer("sgd", 0.1)
        state = TrainState.create(model=model, tx=tx,
                                  key=jax.random.key(0), example_input=inputs[:1])
        program = str(jax.make_jaxpr(make_train_step())(state, batch))
        assert "nnlib_" in program, name
        assert ("nnlib_adamw" in program) == (name == "cnn"), name
        assert "nnlib_sum_of_squares" in program, name  # the guard's norms
        # The 3-class heads, the GPT's width-8 projections: the narrow product.
        assert "nnlib_narrow_matmul" in program, name
        want, _ = jax.jit(make_train_step())(state, batch)
        step = par.make_data_parallel_train_step(mesh=mesh, method="shard_map")
        got, _ = step(par.replicate(state, mesh), par.shard_batch(batch, mesh=mesh))
        for a, b in zip(jax.tree.leaves(want.params), jax.tree.leaves(got.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    print("ok")
""")


def test_kernels_under_shard_map(native):
    """A data-parallel ``shard_map`` train step of an LSTM, a GPT and a CNN
    with AdamW (every kernel, with replicated weights and per-device data)
    equals one device's."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "-c", _SHARD_MAP_SCRIPT], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_saturated_gates_stay_finite(native):
    """Pre-activations far past the sigmoid's and tanh's range (|z| ~ 1e3): the
    kernels' exp saturates instead of overflowing (it reached inf at z = -88.7,
    and the sigmoid's reciprocal then turned 0 * inf into NaN)."""
    x = 300.0 * jax.random.normal(jax.random.key(0), (4, 6, 5))
    fast, plain = RNN(LSTMCell(20)), RNN(LSTMCell(20), fused=False)
    params = fast.init(jax.random.key(1), x)
    got, want = _value_and_grads(fast, params, x), _value_and_grads(plain, params, x)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(got))
    _close(got[0], want[0], 2e-5)
    q, k, v = _qkv()
    out = dot_product_attention(1e3 * q, k, v, causal_mask(5, 7), implementation="native")
    ref = dot_product_attention(1e3 * q, k, v, causal_mask(5, 7), implementation="explicit")
    _close(out, ref, 2e-5)


# --------------------------------------------------------------------------- #
# The convolution's kernel gradient.
# --------------------------------------------------------------------------- #


def _conv_reference(x, kernel, padding):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shape, kernel, padding", [
    ((128, 14, 14, 32), (3, 3, 32, 64), ((1, 1), (1, 1))),  # the benchmark's, 196 pixels
    ((2, 30, 11, 16), (3, 2, 16, 70), ((0, 2), (1, 0))),  # 330 pixels: two blocks
    ((3, 6, 6, 48), (1, 1, 48, 130), ((0, 0), (0, 0))),  # 1x1: rows 48, 3 panels
    ((5, 8, 8, 32), (5, 5, 32, 9), ((2, 2), (2, 2))),  # 800 rows, 9 features
    ((1, 4, 5, 16), (3, 3, 16, 5), ((3, 0), (0, 4))),  # padding beyond the kernel's reach
    # Few taps (KH * KW * C <= 49): the register-tile kernel.
    ((16, 12, 10, 1), (3, 3, 1, 32), ((1, 1), (1, 1))),  # an image's first layer
    ((9, 7, 6, 3), (3, 3, 3, 37), ((2, 0), (1, 1))),  # RGB, 3 tap blocks, a feature tail
    ((3, 10, 8, 1), (5, 5, 1, 40), ((2, 2), (0, 3))),  # 25 taps in unequal blocks
    ((2, 6, 6, 1), (7, 7, 1, 5), ((4, 4), (4, 4))),  # 49 taps, padding beyond the kernel
    ((4, 5, 9, 2), (1, 3, 2, 70), ((0, 0), (0, 0))),  # no padding, 70 features
])
def test_conv_weight_gradient_matches_xla(native, shape, kernel, padding):
    """``dW`` against XLA's transpose of the convolution, and bit-identical
    when repeated (fixed groups of images summed in order)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    out_shape = jax.eval_shape(lambda x, k: _conv_reference(x, k, padding), x,
                               jax.ShapeDtypeStruct(kernel, jnp.float32)).shape
    dy = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    want = jax.linear_transpose(lambda k: _conv_reference(x, k, padding),
                                jax.ShapeDtypeStruct(kernel, jnp.float32))(dy)[0]
    native_dw = jax.jit(lambda x, dy: _native.conv_weight_gradient(x, dy, kernel, padding))
    got = native_dw(x, dy)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale, rtol=0)
    np.testing.assert_array_equal(np.asarray(native_dw(x, dy)), np.asarray(got))


def test_few_tap_weight_gradient_rejects_an_output_gradient_of_the_wrong_size(native):
    """The few-tap kernel checks that ``dy`` is the convolution's output size."""
    x = jnp.ones((2, 6, 6, 1), jnp.float32)
    dy = jnp.ones((2, 5, 6, 4), jnp.float32)  # SAME padding gives 6 x 6
    with pytest.raises(Exception, match="sizes disagree"):
        jax.block_until_ready(_native.conv_weight_gradient(x, dy, (3, 3, 1, 4),
                                                           ((1, 1), (1, 1))))


def test_conv_every_derivative(native):
    """Values and gradients equal XLA's; forward mode and second order by
    finite differences; per-example (vmap over data) and ensemble (vmap over
    kernels) gradients."""
    from jax.test_util import check_grads

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 7, 6, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 2, 16, 5)) * 0.2, jnp.float32)
    padding = ((1, 1), (0, 1))

    def f(x, w):
        return _native.conv(x, w, padding)

    def r(x, w):
        return _conv_reference(x, w, padding)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))

    _close(f(x, w), r(x, w), tol=1e-5)
    _close(jax.grad(loss(f), (0, 1))(x, w), jax.grad(loss(r), (0, 1))(x, w), tol=1e-5)
    assert "nnlib_conv_weight_gradient" in str(jax.make_jaxpr(jax.grad(loss(f), 1))(x, w))
    check_grads(f, (x, w), order=2, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)
    per_example = jax.vmap(jax.grad(lambda w, xi: loss(f)(xi[None], w)), (None, 0))
    per_example_ref = jax.vmap(jax.grad(lambda w, xi: loss(r)(xi[None], w)), (None, 0))
    _close(per_example(w, x), per_example_ref(w, x), tol=1e-5)
    ensemble = jnp.stack([w, 2 * w])
    _close(jax.vmap(jax.grad(loss(f), 1), (None, 0))(x, ensemble),
           jax.vmap(jax.grad(loss(r), 1), (None, 0))(x, ensemble), tol=1e-5)


def test_conv_layers_take_the_native_gradient_where_it_applies(native):
    """``Conv2D``/``Conv1D`` with 16k input channels, stride 1: the kernel's
    gradient is the native call and equals ``native=False``'s; strided,
    dilated, grouped, 3-channel and bfloat16 convolutions stay XLA's."""
    rng = np.random.default_rng(2)

    def grads(layer, x):
        params = layer.init(jax.random.key(0), x)

        def loss(params):
            return jnp.sum(jnp.cos(layer.apply(params, x)))

        return params, jax.grad(loss)(params), str(jax.make_jaxpr(jax.grad(loss))(params))

    x2 = jnp.asarray(rng.standard_normal((2, 9, 7, 16)), jnp.float32)
    x1 = jnp.asarray(rng.standard_normal((3, 11, 32)), jnp.float32)
    x3 = jnp.asarray(rng.standard_normal((2, 9, 7, 3)), jnp.float32)
    x8 = jnp.asarray(rng.standard_normal((2, 9, 7, 8)), jnp.float32)
    for make, x, target in (
            (lambda **k: Conv2D(8, 3, **k), x2, "nnlib_conv_weight_gradient"),
            (lambda **k: Conv2D(8, (3, 1), padding=((2, 0), (0, 0)), **k), x2,
             "nnlib_conv_weight_gradient"),
            (lambda **k: Conv1D(5, 4, padding="SAME", **k), x1, "nnlib_conv_weight_gradient"),
            # Few taps (3 x 3 x 3, 1 x 5 x 2): the forward is shifted products.
            (lambda **k: Conv2D(8, 3, **k), x3, "nnlib_conv_weight_gradient_taps"),
            (lambda **k: Conv1D(5, 5, padding=((3, 1),), **k), x1[..., :2],
             "nnlib_conv_weight_gradient_taps")):
        _, got, program = grads(make(), x)
        assert set(re.findall(r"nnlib_\w+", program)) == {target}
        _, want, plain = grads(make(native=False), x)
        assert "nnlib_" not in plain
        _close(got, want, tol=1e-5)
    for layer, x in ((Conv2D(8, 3, strides=2), x2), (Conv2D(8, 3, dilation=2), x2),
                     (Conv2D(8, 3, groups=2), x2), (Conv2D(8, 3), x8),
                     (Conv2D(8, 3), x2.astype(jnp.bfloat16))):
        assert "nnlib_" not in grads(layer, x)[2]


def test_conv_kernel_tangent_applies_by_its_rule(native):
    """The kernel tangent (and ``conv``'s native path, which also needs 16k
    channels) applies to float32 inputs with 16k channels or at most 49 taps
    and non-negative padding, nothing else."""
    f32 = jax.ShapeDtypeStruct((2, 9, 7, 16), jnp.float32)
    few = jax.ShapeDtypeStruct((2, 9, 7, 3), jnp.float32)
    kernel16, kernel3 = jnp.zeros((3, 3, 16, 8)), jnp.zeros((3, 3, 3, 8))
    same, negative = ((1, 1), (1, 1)), ((1, 1), (-1, 1))
    applies = _native.conv_kernel_tangent_applies
    assert applies(f32, kernel16.shape, same) and applies(few, kernel3.shape, same)
    assert not applies(f32, kernel16.shape, negative)
    assert not applies(jax.ShapeDtypeStruct((2, 9, 7, 8), jnp.float32), (3, 3, 8, 8), same)
    assert not applies(jax.ShapeDtypeStruct((2, 9, 7, 16), jnp.bfloat16), kernel16.shape, same)
    assert _native.conv_applies(f32, kernel16, same)
    assert not _native.conv_applies(f32, kernel16, negative)
    assert not _native.conv_applies(few, kernel3, same)  # few taps: the shifted path's


# --------------------------------------------------------------------------- #
# materialize: an identity XLA cannot fuse through.
# --------------------------------------------------------------------------- #


def test_materialize_is_an_unfusable_identity(native):
    """Bit-exact for any dtype, a native call in the compiled program, linear
    (derivatives of every order and mode through it), batched by vmap."""
    from jax.test_util import check_grads

    for x in (jnp.arange(12.0).reshape(3, 4), jnp.arange(5, dtype=jnp.int32),
              jnp.linspace(-2, 2, 7, dtype=jnp.bfloat16)):
        got = jax.jit(_native.materialize)(x)
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(x))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)

    def f(x):
        return jnp.sin(_native.materialize(jnp.cos(x) * x))

    assert "nnlib_copy" in jax.jit(f).lower(x).compile().as_text()
    assert "nnlib_copy" in jax.jit(jax.grad(lambda x: f(x).sum())).lower(x).compile().as_text()
    check_grads(f, (x,), order=2, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)
    _close(jax.vmap(jax.grad(lambda r: f(r).sum()))(x), jax.grad(lambda x: f(x).sum())(x))


def test_per_example_dense_gradients_form_each_factor_once(native):
    """Per-example gradients of an MLP: the outer products read their factors
    through ``materialize`` (no activation derivative recomputed inside them)
    and equal the gradients taken one example at a time."""
    from nnlib.layers import MLP

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((5, 7)), jnp.float32)
    model = MLP((6,), out_features=3)
    params = model.init(jax.random.key(0), x[:1])

    def loss(p, xi):
        return jnp.sum(jnp.tanh(model.apply(p, xi[None])))

    per_example = jax.jit(jax.vmap(jax.grad(loss), (None, 0)))
    assert per_example.lower(params, x).compile().as_text().count("nnlib_copy") >= 4
    want = [jax.grad(loss)(params, xi) for xi in x]
    _close(per_example(params, x), jax.tree.map(lambda *a: jnp.stack(a), *want), tol=1e-5)


# --------------------------------------------------------------------------- #
# Products with a narrow side (a classifier head), a gradient's squared norm.
# --------------------------------------------------------------------------- #


def _exact(a, b, mode):
    """The product in float64 numpy (mode 0: a b, 1: a b^T, 2: a^T b)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return {0: lambda: a @ b, 1: lambda: a @ b.T, 2: lambda: a.T @ b}[mode]()


# Rows that leave partial 12-, 4- and 6-row tiles; widths of 1, 7 and 16
# (a whole vector); contractions that leave partial 64-column panels.
@pytest.mark.parametrize("m, k, n", [(37, 29, 16), (13, 70, 7), (5, 3, 1), (256, 130, 10)])
def test_narrow_matmul_matches_float64_in_every_mode(native, m, k, n):
    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    for mode, (a, b) in enumerate([(x, w), (dy, w), (x, dy)]):
        call = jax.jit(lambda a, b, mode=mode: _native._narrow_p.bind(a, b, mode=mode))
        assert "nnlib_narrow_matmul" in call.lower(a, b).compile().as_text()
        want = _exact(a, b, mode)
        np.testing.assert_allclose(np.asarray(call(a, b)), want, rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max())


def test_narrow_matmul_every_derivative_is_native(native):
    """Finite differences (first order, both modes); second order against the
    same function on ``jnp.matmul``; the gradient program computes each
    product natively and none in XLA's dots."""
    from jax.test_util import check_grads

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((9, 20)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((20, 5)), jnp.float32)

    def f(x, w, product=_native.narrow_matmul):
        return jnp.sum(jnp.sin(product(jnp.tanh(x), w)))

    check_grads(f, (x, w), order=1, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)
    grad = jax.jit(jax.grad(f, argnums=(0, 1)))
    program = grad.lower(x, w).compile().as_text()
    assert program.count("nnlib_narrow_matmul") >= 3 and " dot(" not in program
    gx, gw = grad(x, w)
    ct = np.cos(_exact(np.tanh(x), w, 0))
    np.testing.assert_allclose(np.asarray(gw), _exact(np.tanh(x), ct, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), _exact(ct, w, 1) * (1 - np.tanh(x) ** 2),
                               rtol=1e-5, atol=1e-5)
    dx, dw = jnp.cos(x), jnp.sin(w)  # a Hessian-vector product, forward over reverse

    def hvp(product):
        g = jax.grad(functools.partial(f, product=product), argnums=(0, 1))
        return jax.jit(lambda x, w: jax.jvp(g, (x, w), (dx, dw))[1])(x, w)

    _close(hvp(_native.narrow_matmul), hvp(jnp.matmul), tol=1e-4)


def test_narrow_matmul_under_vmap_is_the_unbatched_product(native):
    """A batch of inputs folds into the rows of one call; a batch of kernels
    (an ensemble) and per-example weight gradients run one call each: all
    equal the unbatched calls bit for bit."""
    rng = np.random.default_rng(2)
    xs = jnp.asarray(rng.standard_normal((3, 6, 11)), jnp.float32)
    ws = jnp.asarray(rng.standard_normal((3, 11, 4)), jnp.float32)
    one = jax.jit(_native.narrow_matmul)
    shared = jax.jit(jax.vmap(_native.narrow_matmul, (0, None)))
    assert shared.lower(xs, ws[0]).compile().as_text().count("nnlib_narrow_matmul") == 1
    np.testing.assert_array_equal(shared(xs, ws[0]), np.stack([one(x, ws[0]) for x in xs]))
    both = jax.jit(jax.vmap(_native.narrow_matmul))
    each = [one(x, w) for x, w in zip(xs, ws, strict=True)]
    np.testing.assert_array_equal(both(xs, ws), np.stack(each))

    def loss(w, x):
        return jnp.sum(_native.narrow_matmul(x, w) ** 2)

    per_example = jax.jit(jax.vmap(jax.grad(loss), (None, 0)))(ws[0], xs)
    for i in range(3):
        np.testing.assert_array_equal(per_example[i], jax.jit(jax.grad(loss))(ws[0], xs[i]))


def test_dense_takes_the_narrow_product_only_where_it_applies(native):
    """A float32 head of up to 16 outputs, not too large, on rows (not one row)."""
    from nnlib.layers import Dense

    def program(features, x, **kw):
        layer = Dense(features, **kw)
        params = layer.init(jax.random.key(0), x)
        return jax.jit(jax.grad(lambda p: layer.apply(p, x).sum())).lower(params).as_text()

    x = jnp.ones((8, 32), jnp.float32)
    assert "nnlib_narrow_matmul" in program(16, x)
    assert "nnlib_narrow_matmul" in program(3, jnp.ones((2, 4, 32)))  # leading axes flattened
    assert "nnlib_narrow_matmul" not in program(17, x)
    assert "nnlib_narrow_matmul" not in program(10, x.astype(jnp.bfloat16))
    assert "nnlib_narrow_matmul" not in program(10, x[:1])  # one row: its own rule
    assert _native.narrow_matmul_applies(256, 512, 16) and not _native.narrow_matmul_applies(
        257, 512, 16)  # more than NARROW_MAX_MACS multiply-adds: XLA's, on every thread
    with _native.turned_off():
        assert "nnlib_narrow_matmul" not in program(16, x)
    original = jax.lax.dot_general  # replaced, as qwix does while it quantizes a model
    try:
        jax.lax.dot_general = lambda *a, **k: original(*a, **k)
        assert "nnlib_narrow_matmul" not in program(16, x)
    finally:
        jax.lax.dot_general = original
    assert "nnlib_narrow_matmul" in program(16, x)


@pytest.mark.parametrize("shape", [(784, 512), (7,), (3, 5, 7), (0,), (1_200_000,)])
def test_sum_of_squares_matches_float64(native, shape):
    """Tails of partial vectors, several 65,536-element chunks, the threaded
    path above ~1M elements, an empty array."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal(shape), jnp.float32)
    got = jax.jit(_native.sum_of_squares)(x)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), np.sum(np.asarray(x, np.float64) ** 2), rtol=1e-6)
    assert "nnlib_sum_of_squares" in jax.jit(_native.sum_of_squares).lower(x).as_text()
    np.testing.assert_array_equal(jax.jit(_native.sum_of_squares)(x), got)  # repeats exactly


def test_sum_of_squares_differentiates_batches_and_falls_back(native):
    from jax.test_util import check_grads

    x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 30)), jnp.float32)
    check_grads(_native.sum_of_squares, (x,), order=1, modes=("fwd", "rev"), rtol=1e-2)
    v = jnp.cos(x)  # the Hessian is 2 I
    hvp = jax.jvp(jax.grad(_native.sum_of_squares), (x,), (v,))[1]
    np.testing.assert_allclose(np.asarray(hvp), 2 * np.asarray(v), rtol=1e-6)
    rows = jax.jit(jax.vmap(_native.sum_of_squares))(x)
    np.testing.assert_array_equal(rows, np.stack([jax.jit(_native.sum_of_squares)(r) for r in x]))
    half = x.astype(jnp.bfloat16)  # other dtypes: jnp.vdot, accumulated in float32
    assert "nnlib_sum_of_squares" not in jax.jit(_native.sum_of_squares).lower(half).as_text()
    np.testing.assert_allclose(float(_native.sum_of_squares(half)),
                               np.sum(np.asarray(half, np.float64) ** 2), rtol=1e-6)


def test_sums_of_squares_of_many_leaves_in_one_call(native):
    """A train step's leaves in one call (other dtypes through ``jnp.vdot``),
    each sum what the single-array call gives bit for bit, and under vmap
    every member's sums in that one call."""
    rng = np.random.default_rng(5)
    leaves = [jnp.asarray(rng.standard_normal(shape), dtype) for shape, dtype in
              [((784, 512), jnp.float32), ((7,), jnp.float32), ((5, 3), jnp.bfloat16),
               ((0,), jnp.float32), ((1_100_000,), jnp.float32)]]
    program = jax.jit(_native.sums_of_squares).lower(leaves).as_text()
    assert program.count("@nnlib_sum_of_squares") == 1
    got = np.asarray(jax.jit(_native.sums_of_squares)(leaves))
    want = [np.sum(np.asarray(x, np.float64) ** 2) for x in leaves]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for x, g in zip(leaves, got, strict=True):
        assert g == float(jax.jit(_native.sum_of_squares)(x))
    batch = jnp.asarray(rng.standard_normal((3, 40, 9)), jnp.float32)
    per_member = jax.jit(jax.vmap(lambda b: _native.sums_of_squares([b, b[:5]])))
    assert per_member.lower(batch).as_text().count("@nnlib_sum_of_squares") == 1
    np.testing.assert_array_equal(per_member(batch), np.stack(
        [jax.jit(_native.sums_of_squares)([b, b[:5]]) for b in batch]))


def test_sums_of_squares_keep_a_wider_dtype(native):
    """With float64 arrays (x64 on) the sums stay float64: the float32 leaves'
    in the native call, the float64 one through ``jnp.vdot``, all widened."""
    with jax.enable_x64(True):
        wide = jnp.asarray(np.linspace(0.0, 1.0, 5) + 1e-12, jnp.float64)
        narrow = jnp.ones(3, jnp.float32)
        got = jax.jit(_native.sums_of_squares)([wide, narrow])
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(float(got[0]), np.sum(np.asarray(wide) ** 2), rtol=1e-14)
        assert float(got[1]) == 3.0
