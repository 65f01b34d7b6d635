"""Tests for nnlib.layers.recurrent against numpy loops and PyTorch.

The numpy references below restate the gate equations with explicit loops
over batch and time and run each sequence over its valid steps only, so they
are independent of the scan, the hoisted input projection and the masking.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.extend import core as jex_core
from jax.test_util import check_grads

from nnlib.layers._checks import ShapeError
from nnlib.layers.recurrent import RNN, Bidirectional, GRUCell, LSTMCell, SimpleRNNCell

KINDS = ("rnn", "lstm", "gru")
RTOL, ATOL = 1e-5, 1e-6


def make_cell(kind: str, hidden: int, **kw):
    return {"rnn": SimpleRNNCell, "lstm": LSTMCell, "gru": GRUCell}[kind](hidden, **kw)


def random_params(kind: str, features: int, hidden: int, seed: int = 0, dtype=np.float32):
    """Random params in the documented layout (checked by ``test_init_layout``).

    Built in numpy rather than by ``init``: every bias is non-zero, so every
    bias path is exercised, and no initializer has to be compiled.
    """
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[kind] * hidden
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return (0.5 * rng.normal(size=shape)).astype(dtype)

    params = {
        "input": {"kernel": normal(features, gates), "bias": normal(gates)},
        "recurrent": {"kernel": normal(hidden, gates)},
    }
    if kind == "gru":
        params["recurrent"]["bias"] = normal(gates)
    return {"params": params}


def rnn_params(cell_params):
    return {"params": {"cell": cell_params["params"]}}


def bidirectional_params(forward, backward):
    return {"params": {"forward_cell": forward["params"], "backward_cell": backward["params"]}}


@partial(jax.jit, static_argnums=0, static_argnames="method")
def apply(model, params, *args, method=None, **kwargs):
    """``model.apply`` compiled once per (model, shapes) and reused across tests.

    Eager ``apply`` retraces the scan on every call; only
    ``test_jit_and_vmap_match_eager`` needs the eager path.
    """
    return model.apply(params, *args, method=method, **kwargs)


# ----------------------------------------------------------------------------
# numpy references: one sequence, one step at a time
# ----------------------------------------------------------------------------


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def np_step(kind, p, carry, x, activation=np.tanh):
    """One step for one example. x: [F]; carry: h [H] or (c, h)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p["params"])
    w_in, b_in, w_rec = p["input"]["kernel"], p["input"]["bias"], p["recurrent"]["kernel"]
    hidden = w_rec.shape[0]
    if kind == "rnn":
        h_new = np.zeros(hidden)
        for j in range(hidden):
            pre = b_in[j] + sum(x[k] * w_in[k, j] for k in range(len(x)))
            pre += sum(carry[k] * w_rec[k, j] for k in range(hidden))
            h_new[j] = activation(pre)
        return h_new, h_new
    gates_x = x @ w_in + b_in
    if kind == "lstm":
        c, h = carry
        gates = gates_x + h @ w_rec
        i, f, g, o = (gates[n * hidden:(n + 1) * hidden] for n in range(4))
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        return (c, h), h
    h = carry
    gates_h = h @ w_rec + p["recurrent"]["bias"]
    x_r, x_z, x_n = (gates_x[n * hidden:(n + 1) * hidden] for n in range(3))
    h_r, h_z, h_n = (gates_h[n * hidden:(n + 1) * hidden] for n in range(3))
    r, z = sigmoid(x_r + h_r), sigmoid(x_z + h_z)
    n = np.tanh(x_n + r * h_n)
    h = (1 - z) * n + z * h
    return h, h


def np_zero_carry(kind, hidden):
    return (np.zeros(hidden), np.zeros(hidden)) if kind == "lstm" else np.zeros(hidden)


def np_sequence(kind, p, x, mask=None, reverse=False, carry=None):
    """x: [T, F] one sequence; runs only the valid steps, in (reversed) order."""
    time = x.shape[0]
    hidden = p["params"]["recurrent"]["kernel"].shape[0]
    valid = [t for t in range(time) if mask is None or mask[t]]
    if reverse:
        valid = valid[::-1]
    carry = np_zero_carry(kind, hidden) if carry is None else carry
    out = np.zeros((time, hidden))
    for t in valid:
        carry, out[t] = np_step(kind, p, carry, np.asarray(x[t], np.float64))
    return carry, out


def np_batch(kind, p, x, mask=None, reverse=False):
    """x: [B, T, F]; returns (carries per example, outputs [B, T, H])."""
    results = [
        np_sequence(kind, p, x[b], None if mask is None else mask[b], reverse)
        for b in range(x.shape[0])
    ]
    carries = [r[0] for r in results]
    if kind == "lstm":
        carries = (np.stack([c for c, _ in carries]), np.stack([h for _, h in carries]))
    else:
        carries = np.stack(carries)
    return carries, np.stack([r[1] for r in results])


def take(tree, index, dtype=None):
    """``tree[index]`` for every array in a carry (one example of a batch)."""
    return jax.tree_util.tree_map(lambda c: np.asarray(c[index], dtype), tree)


def assert_tree_close(actual, expected, rtol=RTOL, atol=ATOL):
    jax.tree_util.tree_map(
        lambda a, e: np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol),
        actual, expected,
    )


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 6, 4)).astype(np.float32)
    # right padding, no padding, left padding with a hole
    mask = np.array(
        [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1]], dtype=bool
    )
    return x, mask


def random_carry(cell, batch, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda z: rng.normal(size=z.shape).astype(np.float32), cell.initialize_carry(batch)
    )


# ----------------------------------------------------------------------------
# parameters and numpy parity
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_init_layout(kind):
    """``init`` makes exactly the documented layout that ``random_params`` builds."""
    model = RNN(make_cell(kind, 5))
    x = jnp.zeros((2, 3, 4))
    got = jax.eval_shape(model.init, jax.random.key(0), x)
    want = rnn_params(random_params(kind, 4, 5))
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), got) == (
        jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), want)
    )


def test_lstm_forget_bias_initialisation():
    cell = LSTMCell(3, forget_bias=1.0, recurrent_kernel_init=nn.initializers.zeros_init())
    p = jax.jit(cell.init)(jax.random.key(0), cell.initialize_carry(1), jnp.zeros((1, 2)))
    bias = np.asarray(p["params"]["input"]["bias"])
    np.testing.assert_array_equal(bias, np.r_[np.zeros(3), np.ones(3), np.zeros(6)])


@pytest.mark.parametrize("kind", KINDS)
def test_cell_step_matches_numpy(kind):
    cell = make_cell(kind, 5)
    p = random_params(kind, 4, 5)
    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    carry = random_carry(cell, 2, seed=2)
    new_carry, h = apply(cell, p, carry, x)
    for b in range(2):
        np_carry = take(carry, b, np.float64)
        want_carry, want_h = np_step(kind, p, np_carry, x[b])
        np.testing.assert_allclose(h[b], want_h, rtol=RTOL, atol=ATOL)
        assert_tree_close(take(new_carry, b), want_carry)


def test_lstm_gate_activations_equal_sigmoid_and_tanh():
    """The LSTM's one-tanh gate nonlinearity, against jax.nn.sigmoid / tanh."""
    from nnlib.layers.recurrent import _gate_activations

    z = np.linspace(-30.0, 30.0, 4 * 3001, dtype=np.float32).reshape(3001, 4)
    z = np.tile(z, (1, 3))  # [N, 12]: four gates of width H = 3
    act = np.asarray(_gate_activations(jnp.asarray(z), "ssts"))
    i, f, g, o = np.split(act, 4, axis=-1)
    zi, zf, zg, zo = np.split(z, 4, axis=-1)
    for got, pre in ((i, zi), (f, zf), (o, zo)):
        np.testing.assert_allclose(got, 1.0 / (1.0 + np.exp(-pre.astype(np.float64))),
                                   rtol=0, atol=2.5e-7)
    np.testing.assert_allclose(g, np.tanh(zg.astype(np.float64)), rtol=0, atol=2.5e-7)
    assert np.all((i >= 0) & (i <= 1)) and np.all((g >= -1) & (g <= 1))
    # bfloat16 keeps the dtype.
    assert _gate_activations(jnp.asarray(z, jnp.bfloat16), "ssts").dtype == jnp.bfloat16


@pytest.mark.parametrize("kind", KINDS)
def test_project_then_step_equals_call(kind):
    """The hoisted split computes the same step as the single-step API."""
    cell = make_cell(kind, 5)
    p = random_params(kind, 4, 5)
    x = np.random.default_rng(3).normal(size=(2, 4)).astype(np.float32)
    carry = random_carry(cell, 2, seed=4)
    projected = apply(cell, p, x, method="project_inputs")
    assert projected.shape == (2, cell.num_gates * 5)
    stepped = apply(cell, p, carry, projected, method="step")
    assert_tree_close(stepped, apply(cell, p, carry, x))


def test_simple_rnn_relu_matches_numpy():
    p = random_params("rnn", 2, 3)
    x = np.random.default_rng(5).normal(size=(1, 5, 2)).astype(np.float32)
    _, out = apply(RNN(SimpleRNNCell(3, activation="relu")), rnn_params(p), x)
    want = np.zeros(3)
    for t in range(5):
        want, _ = np_step("rnn", p, want, x[0, t], activation=lambda v: np.maximum(v, 0))
        np.testing.assert_allclose(out[0, t], want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_rnn_with_mask_matches_numpy(kind, reverse, data):
    x, mask = data
    p = random_params(kind, 4, 5)
    carry, out = apply(RNN(make_cell(kind, 5), reverse=reverse), rnn_params(p), x, mask=mask)
    want_carry, want_out = np_batch(kind, p, x, mask, reverse)
    np.testing.assert_allclose(out, want_out, rtol=RTOL, atol=ATOL)
    assert_tree_close(carry, want_carry)


@pytest.mark.parametrize("kind", KINDS)
def test_initial_carry_is_used(kind, data):
    x, _ = data
    cell = make_cell(kind, 5)
    p = random_params(kind, 4, 5)
    init = random_carry(cell, 3, seed=6)
    carry, out = apply(RNN(cell), rnn_params(p), x, initial_carry=init)
    for b in range(3):
        start = take(init, b, np.float64)
        want_carry, want_out = np_sequence(kind, p, x[b], carry=start)
        np.testing.assert_allclose(out[b], want_out, rtol=RTOL, atol=ATOL)
        assert_tree_close(take(carry, b), want_carry)


def test_unroll_gives_same_result(data):
    x, mask = data
    p = rnn_params(random_params("lstm", 4, 5))
    want = apply(RNN(LSTMCell(5)), p, x, mask=mask)
    assert_tree_close(apply(RNN(LSTMCell(5), unroll=3), p, x, mask=mask), want)


# ----------------------------------------------------------------------------
# PyTorch parity
# ----------------------------------------------------------------------------


def torch_module(kind, features, hidden, bidirectional=False, nonlinearity="tanh"):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    kw = dict(batch_first=True, bidirectional=bidirectional)
    if kind == "rnn":
        return torch.nn.RNN(features, hidden, nonlinearity=nonlinearity, **kw)
    return {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](features, hidden, **kw)


def params_from_torch(kind, module, suffix=""):
    """PyTorch's [out, in] weights -> nnlib's [in, out] kernels (module docstring table)."""
    def get(name):
        return getattr(module, name + suffix).detach().numpy()

    w_ih, w_hh = get("weight_ih_l0"), get("weight_hh_l0")
    b_ih, b_hh = get("bias_ih_l0"), get("bias_hh_l0")
    if kind == "gru":
        return {"params": {
            "input": {"kernel": w_ih.T, "bias": b_ih},
            "recurrent": {"kernel": w_hh.T, "bias": b_hh},
        }}
    return {"params": {
        "input": {"kernel": w_ih.T, "bias": b_ih + b_hh},
        "recurrent": {"kernel": w_hh.T},
    }}


@pytest.mark.parametrize(
    "kind,nonlinearity", [("rnn", "tanh"), ("rnn", "relu"), ("lstm", None), ("gru", None)]
)
def test_matches_pytorch(kind, nonlinearity):
    torch = pytest.importorskip("torch")
    batch, time, features, hidden = 3, 7, 4, 5
    module = torch_module(kind, features, hidden, nonlinearity=nonlinearity)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(batch, time, features)).astype(np.float32)
    h0 = rng.normal(size=(1, batch, hidden)).astype(np.float32)
    c0 = rng.normal(size=(1, batch, hidden)).astype(np.float32)
    with torch.no_grad():
        if kind == "lstm":
            state = (torch.from_numpy(h0), torch.from_numpy(c0))
            want_out, (want_h, want_c) = module(torch.from_numpy(x), state)
            init = (c0[0], h0[0])  # nnlib's LSTM carry is (c, h)
        else:
            want_out, want_h = module(torch.from_numpy(x), torch.from_numpy(h0))
            init = h0[0]
    if kind == "rnn":
        cell = SimpleRNNCell(hidden, activation=nonlinearity)
    else:
        cell = make_cell(kind, hidden)
    p = params_from_torch(kind, module)
    carry, out = apply(RNN(cell), rnn_params(p), x, initial_carry=init)
    np.testing.assert_allclose(out, want_out.numpy(), rtol=RTOL, atol=ATOL)
    if kind == "lstm":
        np.testing.assert_allclose(carry[1], want_h[0].numpy(), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(carry[0], want_c[0].numpy(), rtol=RTOL, atol=ATOL)
    else:
        np.testing.assert_allclose(carry, want_h[0].numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", KINDS)
def test_bidirectional_matches_pytorch(kind):
    torch = pytest.importorskip("torch")
    batch, time, features, hidden = 2, 6, 3, 4
    module = torch_module(kind, features, hidden, bidirectional=True)
    x = np.random.default_rng(8).normal(size=(batch, time, features)).astype(np.float32)
    with torch.no_grad():
        want_out, want_state = module(torch.from_numpy(x))
    want_h = want_state[0] if kind == "lstm" else want_state  # [2, B, H]
    params = bidirectional_params(
        params_from_torch(kind, module), params_from_torch(kind, module, "_reverse")
    )
    layer = Bidirectional(make_cell(kind, hidden), make_cell(kind, hidden))
    (carry_f, carry_b), out = apply(layer, params, x)
    assert out.shape == (batch, time, 2 * hidden)
    np.testing.assert_allclose(out, want_out.numpy(), rtol=RTOL, atol=ATOL)
    h_f, h_b = (carry_f[1], carry_b[1]) if kind == "lstm" else (carry_f, carry_b)
    np.testing.assert_allclose(h_f, want_h[0].numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(h_b, want_h[1].numpy(), rtol=RTOL, atol=ATOL)


def test_bidirectional_padded_matches_pytorch_packed():
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    module = torch_module("gru", 3, 4, bidirectional=True)
    x = np.random.default_rng(9).normal(size=(3, 5, 3)).astype(np.float32)
    lengths = np.array([5, 2, 3])
    mask = np.arange(5)[None, :] < lengths[:, None]
    with torch.no_grad():
        packed = pack_padded_sequence(
            torch.from_numpy(x), torch.from_numpy(lengths), batch_first=True,
            enforce_sorted=False,
        )
        want_out, want_h = module(packed)
        want_out, _ = pad_packed_sequence(want_out, batch_first=True, total_length=5)
    params = bidirectional_params(
        params_from_torch("gru", module), params_from_torch("gru", module, "_reverse")
    )
    (h_f, h_b), out = apply(Bidirectional(GRUCell(4), GRUCell(4)), params, x, mask=mask)
    np.testing.assert_allclose(out, want_out.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(h_f, want_h[0].numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(h_b, want_h[1].numpy(), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------
# padding semantics
# ----------------------------------------------------------------------------


def run_layer(kind, mode, p, x, mask=None):
    """mode: forward | reverse | bidirectional; p: one cell's params, used both ways."""
    if mode == "bidirectional":
        layer = Bidirectional(make_cell(kind, 5), make_cell(kind, 5))
        return apply(layer, bidirectional_params(p, p), x, mask=mask)
    model = RNN(make_cell(kind, 5), reverse=mode == "reverse")
    return apply(model, rnn_params(p), x, mask=mask)


PADDING_CASES = [
    (kind, mode) for kind in ("lstm", "gru") for mode in ("forward", "reverse", "bidirectional")
]


# LSTM's tuple carry in every mode; GRU (and SimpleRNN) masking is covered by the
# numpy comparison above, so one GRU case keeps the compile count down.
@pytest.mark.parametrize("kind,mode", PADDING_CASES[:3] + [("gru", "reverse")])
def test_padded_batch_equals_each_sequence_alone(kind, mode):
    lengths = [2, 4]
    x = np.random.default_rng(10).normal(size=(2, 4, 4)).astype(np.float32)
    mask = np.arange(4)[None, :] < np.array(lengths)[:, None]
    p = random_params(kind, 4, 5)
    carry, out = run_layer(kind, mode, p, x, mask)
    for b, length in enumerate(lengths):
        alone_carry, alone_out = run_layer(kind, mode, p, x[b:b + 1, :length])
        np.testing.assert_allclose(out[b, :length], alone_out[0], rtol=RTOL, atol=ATOL)
        np.testing.assert_array_equal(out[b, length:], 0.0)
        # final carry = carry after the last valid step (the first, going backward)
        assert_tree_close(take(carry, slice(b, b + 1)), alone_carry)


@pytest.mark.parametrize("kind,mode", PADDING_CASES)
def test_padded_values_change_nothing(kind, mode, data):
    x, mask = data
    p = random_params(kind, 4, 5)
    garbage = np.where(mask[..., None], x, np.float32(1e3))
    assert_tree_close(
        run_layer(kind, mode, p, garbage, mask), run_layer(kind, mode, p, x, mask),
        rtol=0, atol=0,
    )


def test_all_true_mask_equals_no_mask(data):
    x, _ = data
    p = random_params("lstm", 4, 5)
    mask = np.ones(x.shape[:2], bool)
    assert_tree_close(run_layer("lstm", "forward", p, x, mask), run_layer("lstm", "forward", p, x))


def test_integer_mask_is_accepted(data):
    x, mask = data
    p = random_params("gru", 4, 5)
    assert_tree_close(
        run_layer("gru", "reverse", p, x, mask.astype(np.int32)),
        run_layer("gru", "reverse", p, x, mask),
    )


@pytest.mark.parametrize("merge", ["sum", "mean", "mul"])
def test_bidirectional_merges(merge, data):
    x, mask = data
    p = random_params("lstm", 4, 5)
    _, concat = run_layer("lstm", "bidirectional", p, x, mask)
    fwd, bwd = np.asarray(concat[..., :5]), np.asarray(concat[..., 5:])
    want = {"sum": fwd + bwd, "mean": (fwd + bwd) / 2, "mul": fwd * bwd}[merge]
    layer = Bidirectional(LSTMCell(5), LSTMCell(5), merge=merge)
    _, out = apply(layer, bidirectional_params(p, p), x, mask=mask)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)


def test_bidirectional_initial_carry_and_mixed_cells(data):
    x, _ = data
    p_f, p_b = random_params("lstm", 4, 3), random_params("gru", 4, 2, seed=1)
    init = (random_carry(LSTMCell(3), 3, seed=11), random_carry(GRUCell(2), 3, seed=12))
    layer = Bidirectional(LSTMCell(3), GRUCell(2))
    (carry_f, carry_b), out = apply(layer, bidirectional_params(p_f, p_b), x, initial_carry=init)
    assert out.shape == (3, 6, 5)
    for b in range(3):
        start = take(init, b, np.float64)
        f_carry, f_out = np_sequence("lstm", p_f, x[b], carry=start[0])
        b_carry, b_out = np_sequence("gru", p_b, x[b], reverse=True, carry=start[1])
        np.testing.assert_allclose(out[b], np.c_[f_out, b_out], rtol=RTOL, atol=ATOL)
        assert_tree_close(take(carry_f, b), f_carry)
        np.testing.assert_allclose(carry_b[b], b_carry, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------
# shapes, gradients, transformations
# ----------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    batch=st.integers(1, 4),
    time=st.integers(1, 6),
    features=st.integers(1, 5),
    hidden=st.integers(1, 6),
    reverse=st.booleans(),
)
def test_shapes(kind, batch, time, features, hidden, reverse):
    cell = make_cell(kind, hidden)
    x = jax.ShapeDtypeStruct((batch, time, features), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch, time), jnp.bool_)
    model = RNN(cell, reverse=reverse)

    def run(x, mask):
        return model.apply(model.init(jax.random.key(0), x), x, mask=mask)

    carry, out = jax.eval_shape(run, x, mask)  # traces only: no compile, no FLOPs
    assert out.shape == (batch, time, hidden)
    assert jax.tree_util.tree_map(lambda c: c.shape, carry) == (
        jax.tree_util.tree_map(lambda c: c.shape, cell.initialize_carry(batch))
    )
    bidi = Bidirectional(make_cell(kind, hidden), make_cell(kind, hidden))
    p = random_params(kind, features, hidden)
    _, out = jax.eval_shape(
        lambda p, x, m: bidi.apply(p, x, mask=m), bidirectional_params(p, p), x, mask
    )
    assert out.shape == (batch, time, 2 * hidden)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_float64(kind):
    with jax.enable_x64(True):
        model = RNN(make_cell(kind, 3))
        params = jax.tree_util.tree_map(jnp.asarray, rnn_params(random_params(kind, 2, 3, dtype=np.float64)))
        x = jnp.asarray(np.random.default_rng(13).normal(size=(2, 3, 2)))
        mask = jnp.array([[True, True, False], [True, True, True]])

        @jax.jit
        def loss(params, x):
            carry, out = model.apply(params, x, mask=mask)
            h = carry[1] if kind == "lstm" else carry
            return jnp.sum(out**2) + jnp.sum(jnp.sin(h))

        check_grads(loss, (params, x), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_jit_and_vmap_match_eager(data):
    """One model covering a tuple carry (LSTM), a reverse scan and a mask."""
    x, mask = data
    model = Bidirectional(LSTMCell(4), GRUCell(4))
    params = bidirectional_params(random_params("lstm", 4, 4), random_params("gru", 4, 4))
    eager = model.apply(params, x, mask=mask)
    jitted = jax.jit(lambda p, x, m: model.apply(p, x, mask=m))(params, x, mask)
    assert_tree_close(jitted, eager)
    # vmap over an extra leading axis (groups of batches); group 1 is batch-reversed
    xs, masks = np.stack([x, x[::-1]]), np.stack([mask, mask[::-1]])
    vmapped = jax.jit(jax.vmap(lambda x, m: model.apply(params, x, mask=m)))(xs, masks)
    assert_tree_close(jax.tree_util.tree_map(lambda a: a[0], vmapped), eager)
    assert_tree_close(
        jax.tree_util.tree_map(lambda a: a[1], vmapped),
        jax.tree_util.tree_map(lambda a: a[::-1], eager),
    )


# ----------------------------------------------------------------------------
# the fused recurrence (custom VJP) against plain autodiff of the scan
# ----------------------------------------------------------------------------


def _fused_and_plain_losses(kind, reverse, use_mask, features_first=None):
    mask = jnp.array([[True, True, False, True], [False, True, True, True]])

    def make(fused):
        model = RNN(make_cell(kind, 3), reverse=reverse, fused=fused,
                    features_first=features_first)

        def loss(params, x, carry):
            final, out = model.apply(params, x, mask=mask if use_mask else None,
                                     initial_carry=carry)
            h = final[1] if kind == "lstm" else final
            return jnp.sum(jnp.sin(out) * out) + jnp.sum(jnp.cos(h))

        return loss

    return make(True), make(False)


def _float64_inputs(kind):
    params = jax.tree_util.tree_map(
        jnp.asarray, rnn_params(random_params(kind, 2, 3, dtype=np.float64)))
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 4, 2)))
    carry = jax.tree_util.tree_map(
        lambda z: jnp.asarray(rng.normal(size=z.shape)), make_cell(kind, 3).initialize_carry(2))
    return params, x, carry


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("features_first", [True, False])
def test_fused_equals_plain_scan(kind, reverse, use_mask, features_first):
    """Values and gradients (params, inputs, initial carry) agree to float64 rounding,
    with the per-step arrays laid out features first or batch first."""
    with jax.enable_x64(True):
        fused, plain = _fused_and_plain_losses(kind, reverse, use_mask, features_first)
        args = _float64_inputs(kind)
        value_f, grads_f = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(*args)
        value_p, grads_p = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2)))(*args)
        np.testing.assert_allclose(value_f, value_p, rtol=1e-12)
        assert_tree_close(grads_f, grads_p, rtol=1e-10, atol=1e-12)


def test_fused_second_order_gradients():
    """Reverse-over-reverse through the custom VJP, checked by finite differences."""
    with jax.enable_x64(True):
        fused, _ = _fused_and_plain_losses("lstm", reverse=False, use_mask=True)
        params, x, carry = _float64_inputs("lstm")
        check_grads(jax.jit(lambda p, x: fused(p, x, carry)), (params, x), order=2,
                    modes=("rev",), atol=1e-5, rtol=1e-5)


def test_forward_mode_needs_fused_false():
    """jvp through the custom VJP fails loudly; fused=False supports it."""
    with jax.enable_x64(True):
        fused, plain = _fused_and_plain_losses("lstm", reverse=False, use_mask=False)
        params, x, carry = _float64_inputs("lstm")
        with pytest.raises(TypeError, match="custom_vjp"):
            jax.jvp(lambda x: fused(params, x, carry), (x,), (jnp.ones_like(x),))
        check_grads(lambda x: plain(params, x, carry), (x,), order=1, modes=("fwd",))


@pytest.mark.parametrize("kind,features_first", [("gru", None), ("lstm", True), ("lstm", False)])
def test_fused_per_example_gradients_under_vmap(kind, features_first):
    """vmap of grad (per-example gradients) through the fused path equals a loop."""
    fused, _ = _fused_and_plain_losses(kind, reverse=False, use_mask=False,
                                       features_first=features_first)
    params = rnn_params(random_params(kind, 2, 3))
    rng = np.random.default_rng(2)
    xs = rng.normal(size=(4, 2, 4, 2)).astype(np.float32)
    carry = make_cell(kind, 3).initialize_carry(2)
    grad = jax.grad(fused)
    batched = jax.jit(jax.vmap(grad, in_axes=(None, 0, None)))(params, xs, carry)
    for i in range(len(xs)):
        assert_tree_close(jax.tree_util.tree_map(lambda g, i=i: g[i], batched),
                          grad(params, xs[i], carry), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused,features_first", [(True, True), (True, False), (False, None)])
@pytest.mark.parametrize("given_carry", [False, True])
def test_rnn_inside_shard_map(fused, features_first, given_carry):
    """Data-parallel training runs the layer inside ``jax.shard_map``, where the
    batch varies per device and the weights and a zero (or given) initial carry
    do not. Values and weight gradients equal the layer outside it. The type
    check is static, so a one-device mesh shows it."""
    mesh = jax.make_mesh((1,), ("data",))
    model = RNN(make_cell("lstm", 3), fused=fused, features_first=features_first)
    params = rnn_params(random_params("lstm", 2, 3))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 2)), jnp.float32)
    mask = jnp.array([[True, True, False, True], [False, True, True, True]])
    carry = make_cell("lstm", 3).initialize_carry(2) if given_carry else None

    def loss(params, x, mask):
        final, out = model.apply(params, x, mask=mask, initial_carry=carry)
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(final[1]))

    spec = jax.sharding.PartitionSpec
    sharded = jax.shard_map(lambda p, x, m: jax.lax.psum(loss(p, x, m), "data"), mesh=mesh,
                            in_specs=(spec(), spec("data"), spec("data")), out_specs=spec())
    on_devices = jax.sharding.NamedSharding(mesh, spec("data"))
    got = jax.jit(jax.value_and_grad(sharded))(
        params, jax.device_put(x, on_devices), jax.device_put(mask, on_devices))
    want = jax.value_and_grad(loss)(params, x, mask)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert_tree_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def _recurrent_product_shapes(model, x):
    """Output shapes of the products inside the scan's loop (the recurrent matmul)."""
    params = model.init(jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda p: model.apply(p, x))(params).jaxpr
    return [tuple(eqn.outvars[0].aval.shape) for eqn in _eqns(jaxpr, in_scan=False)
            if eqn.primitive.name == "dot_general"]


def _eqns(jaxpr, in_scan):
    """The equations of ``jaxpr`` and its sub-jaxprs that run inside a scan."""
    for eqn in jaxpr.eqns:
        if in_scan:
            yield eqn
        for sub in jex_core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub, in_scan or eqn.primitive.name == "scan")


def test_features_first_default_rule(monkeypatch):
    """``features_first=None`` lays the loop out [features, batch] (the recurrent
    product [G*H, B]) only on the CPU, for a SimpleRNN or LSTM, a batch of at
    most ``FEATURES_FIRST_MAX_BATCH`` and a hidden size of at least
    ``FEATURES_FIRST_MIN_HIDDEN``; otherwise [B, G*H]. (The LSTMs run XLA's
    recurrence here, ``native=False``: the native kernel has no scan.)"""
    import nnlib.layers.recurrent as recurrent

    monkeypatch.setattr(recurrent, "FEATURES_FIRST_MAX_BATCH", 2)
    monkeypatch.setattr(recurrent, "FEATURES_FIRST_MIN_HIDDEN", 5)
    x = jnp.ones((2, 4, 3))
    assert _recurrent_product_shapes(RNN(LSTMCell(5), native=False), x) == [(20, 2)]
    assert _recurrent_product_shapes(RNN(SimpleRNNCell(5)), x) == [(5, 2)]
    assert _recurrent_product_shapes(RNN(GRUCell(5)), x) == [(2, 15)]
    assert _recurrent_product_shapes(RNN(LSTMCell(4), native=False), x) == [(2, 16)]
    assert _recurrent_product_shapes(RNN(LSTMCell(5), native=False), jnp.ones((3, 4, 3))) == [(3, 20)]
    assert _recurrent_product_shapes(RNN(LSTMCell(5), features_first=False, native=False), x) == [(2, 20)]
    assert _recurrent_product_shapes(RNN(GRUCell(5), features_first=True), x) == [(15, 2)]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _recurrent_product_shapes(RNN(LSTMCell(5), native=False), x) == [(2, 20)]


def test_takes_axis():
    """Which update functions the features-first recurrence may call with ``axis=0``."""
    from nnlib.layers.recurrent import _takes_axis

    assert _takes_axis(LSTMCell(3).update_fn())
    assert _takes_axis(GRUCell(3).update_fn())
    assert _takes_axis(SimpleRNNCell(3).update_fn())
    assert not _takes_axis(lambda carry, projected, recurrent: (carry, carry))
    assert not _takes_axis(max)  # a callable without a signature


def test_cell_update_without_axis_runs_batch_first():
    """A user cell whose update function takes no ``axis=`` keeps the fused
    batch-first recurrence, and equals the plain scan."""

    class HalfStepCell(SimpleRNNCell):
        @nn.nowrap
        def update_fn(self):
            def update(h, projected, recurrent):
                h = 0.5 * h + 0.5 * jnp.tanh(projected + recurrent)
                return h, h
            return update

    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 3)), jnp.float32)
    fused, plain = RNN(HalfStepCell(4)), RNN(HalfStepCell(4), fused=False)
    assert _recurrent_product_shapes(fused, x) == [(2, 4)]
    params = fused.init(jax.random.key(0), x)

    def loss(model):
        return lambda p: jnp.sum(jnp.sin(model.apply(p, x)[1]))

    assert_tree_close(jax.grad(loss(fused))(params), jax.grad(loss(plain))(params),
                      rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss(fused)(params), loss(plain)(params), rtol=1e-6)


def test_cell_overriding_step_uses_the_plain_scan():
    """A user cell that defines ``step`` (not ``update_fn``) still runs, fused or not."""

    class LeakyCell(SimpleRNNCell):
        def step(self, carry, projected):
            h = 0.5 * carry + 0.5 * jnp.tanh(projected + self.recurrent(carry))
            return h, h

    x = np.random.default_rng(3).normal(size=(2, 5, 3)).astype(np.float32)
    model = RNN(LeakyCell(4))
    params = model.init(jax.random.key(0), x)
    carry, out = model.apply(params, x)
    p = params["params"]["cell"]
    h = np.zeros((2, 4), np.float32)
    for t in range(5):
        r = h @ np.asarray(p["recurrent"]["kernel"])
        proj = x[:, t] @ np.asarray(p["input"]["kernel"]) + np.asarray(p["input"]["bias"])
        h = 0.5 * h + 0.5 * np.tanh(proj + r)
        np.testing.assert_allclose(out[:, t], h, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------


@pytest.fixture
def lstm_rnn():
    return RNN(LSTMCell(4)), rnn_params(random_params("lstm", 5, 4))


def test_error_wrong_rank(lstm_rnn):
    model, params = lstm_rnn
    with pytest.raises(
        ShapeError,
        match=r"RNN\(LSTMCell\) expected inputs of shape \[batch, time, features\] "
        r"\(rank 3\), got shape \(3, 5\)",
    ):
        model.apply(params, jnp.zeros((3, 5)))


def test_error_integer_inputs(lstm_rnn):
    model, params = lstm_rnn
    with pytest.raises(TypeError, match=r"RNN\(LSTMCell\) expected floating-point inputs.*int32"):
        model.apply(params, jnp.zeros((2, 3, 5), jnp.int32))


def test_error_feature_mismatch(lstm_rnn):
    model, params = lstm_rnn
    with pytest.raises(
        ShapeError, match=r"RNN\(LSTMCell\) expected .* features=5, got shape \(2, 3, 6\)"
    ):
        model.apply(params, jnp.zeros((2, 3, 6)))


def test_error_mask_shape(lstm_rnn):
    model, params = lstm_rnn
    with pytest.raises(
        ShapeError,
        match=r"RNN\(LSTMCell\) expected mask of shape \[batch, time\] = \(2, 3\), "
        r"got shape \(2, 3, 1\)",
    ):
        model.apply(params, jnp.zeros((2, 3, 5)), mask=jnp.ones((2, 3, 1), bool))


def test_error_initial_carry_shape(lstm_rnn):
    model, params = lstm_rnn
    bad = (jnp.zeros((2, 4)), jnp.zeros((2, 3)))
    with pytest.raises(
        ShapeError,
        match=r"RNN\(LSTMCell\) expected a carry \(c, h\) .*\(\(2, 4\), \(2, 4\)\), "
        r"got 2 array\(s\) with shapes \(\(2, 4\), \(2, 3\)\)",
    ):
        model.apply(params, jnp.zeros((2, 3, 5)), initial_carry=bad)


def test_error_initial_carry_structure(lstm_rnn):
    model, params = lstm_rnn
    with pytest.raises(ShapeError, match=r"RNN\(LSTMCell\) expected a carry \(c, h\).*got 1 array"):
        model.apply(params, jnp.zeros((2, 3, 5)), initial_carry=jnp.zeros((2, 4)))


def test_error_cell_feature_mismatch():
    cell, params = GRUCell(3), random_params("gru", 4, 3)
    with pytest.raises(
        ShapeError,
        match=r"GRUCell expected inputs of shape \[batch, features\] with features=4, "
        r"got shape \(2, 5\)",
    ):
        cell.apply(params, cell.initialize_carry(2), jnp.zeros((2, 5)))
    with pytest.raises(
        ShapeError, match=r"GRUCell expected inputs of shape \[\.\.\., features\] with features=4"
    ):
        cell.apply(params, jnp.zeros((2, 5)), method="project_inputs")


def test_error_cell_carry_shape():
    cell, params = SimpleRNNCell(3), random_params("rnn", 4, 3)
    with pytest.raises(
        ShapeError, match=r"SimpleRNNCell expected a carry h: \[batch, hidden\] with shapes \(\(2, 3\),\)"
    ):
        cell.apply(params, jnp.zeros((2, 4)), jnp.zeros((2, 4)))


def init_shapes(model, x_shape, **kwargs):
    """Runs ``init`` abstractly: validation errors surface, nothing is compiled."""
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kwargs), x)


@pytest.mark.parametrize("hidden", [0, -2, 2.5])
def test_error_hidden_size(hidden):
    with pytest.raises(ValueError, match=r"LSTMCell expected a positive integer hidden_size"):
        init_shapes(RNN(LSTMCell(hidden)), (1, 2, 3))


def test_error_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'tahn'"):
        init_shapes(RNN(SimpleRNNCell(2, activation="tahn")), (1, 2, 3))


def test_error_bidirectional_merge():
    with pytest.raises(
        ValueError, match=r"Bidirectional got merge='avg'; expected one of concat, sum, mean, mul"
    ):
        init_shapes(Bidirectional(GRUCell(2), GRUCell(2), merge="avg"), (1, 2, 3))


def test_error_bidirectional_unequal_hidden():
    with pytest.raises(
        ValueError,
        match=r"Bidirectional merge='sum' needs equal hidden sizes, got forward 2 and backward 3",
    ):
        init_shapes(Bidirectional(GRUCell(2), GRUCell(3), merge="sum"), (1, 2, 3))


def test_error_bidirectional_initial_carry_not_pair():
    with pytest.raises(ShapeError, match=r"Bidirectional expected initial_carry as a pair"):
        init_shapes(
            Bidirectional(GRUCell(2), GRUCell(2)), (1, 2, 3), initial_carry=jnp.zeros((1, 2))
        )
