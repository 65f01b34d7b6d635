"""TrainState, optimizers, schedules and the pure train/eval steps against
closed forms and hand-computed updates."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nnlib.layers import MLP, Dense
from nnlib.train import (
    TrainState,
    average_metrics,
    classification_loss,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    num_params,
    path_str,
    regression_loss,
)
from nnlib.train.step import guarded_update

KEY = jax.random.key(0)


def _data(n=16, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    return x, y


def test_create_splits_params_and_collections():
    x, _ = _data()
    state = TrainState.create(model=MLP((4,), out_features=2, normalization="batch"),
                              tx=optax.sgd(0.1), key=KEY, example_input=x[:2])
    assert set(state.collections) == {"batch_stats"}
    assert state.key.dtype == jnp.uint32 and int(state.step) == 0
    assert num_params(state.params) == 5 * 4 + 4 + 4 + 4 + 4 * 2 + 2
    raw = TrainState.create(model=Dense(2), tx=optax.sgd(0.1), key=jax.random.PRNGKey(0),
                            example_input=x[:1])
    assert set(raw.params) == {"kernel", "bias"}
    assert raw.collections == {}


def test_sgd_step_on_linear_regression_matches_closed_form_gradient():
    # Loss = mean((x w + b - y)^2); dL/dw = 2/n x^T r, dL/db = 2/n sum r.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y = rng.normal(size=(8, 1)).astype(np.float32)
    # An MLP without hidden layers is the linear model x @ w + b.
    state = TrainState.create(model=MLP((), out_features=1), tx=optax.sgd(0.1), key=KEY,
                              example_input=x)
    w = np.asarray(state.params["output"]["kernel"])
    b = np.asarray(state.params["output"]["bias"])
    r = x @ w + b - y
    new, metrics = jax.jit(make_train_step(regression_loss()))(state, {"inputs": x, "labels": y})
    np.testing.assert_allclose(new.params["output"]["kernel"], w - 0.1 * 2 / 8 * x.T @ r, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(new.params["output"]["bias"], b - 0.1 * 2 / 8 * r.sum(0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], np.mean(r**2), rtol=1e-5)
    assert int(new.step) == 1 and bool(metrics["finite"])


def test_masked_rows_do_not_change_the_step():
    x, y = _data(12)
    state = TrainState.create(model=MLP((8,), out_features=2), tx=optax.sgd(0.1), key=KEY,
                              example_input=x[:1])
    step = jax.jit(make_train_step())
    full, m_full = step(state, {"inputs": x[:8], "labels": y[:8]})
    padded_x = np.concatenate([x[:8], 100 * x[8:]])
    padded_y = np.concatenate([y[:8], 1 - y[8:]])
    mask = np.array([1.0] * 8 + [0.0] * 4, np.float32)
    padded, m_pad = step(state, {"inputs": padded_x, "labels": padded_y, "mask": mask})
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(padded.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m_full["loss"], m_pad["loss"], rtol=1e-6)


def test_classification_loss_with_label_smoothing_matches_formula():
    logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = jnp.array([0, 2])
    eps = 0.1
    loss, metrics = classification_loss(eps)(logits, {"labels": labels})
    logp = np.asarray(jax.nn.log_softmax(logits))
    target = np.full((2, 3), eps / 3)
    target[[0, 1], [0, 2]] += 1 - eps
    np.testing.assert_allclose(loss, -(target * logp).sum(-1).mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 1.0)


def test_sequence_classification_loss_masks_per_example():
    logits = jax.random.normal(KEY, (2, 3, 4))
    labels = jnp.array([[0, 1, 2], [3, 3, 3]])
    loss, _ = classification_loss()(logits, {"labels": labels, "mask": jnp.array([1.0, 0.0])})
    ref, _ = classification_loss()(logits[:1], {"labels": labels[:1]})
    np.testing.assert_allclose(loss, ref, rtol=1e-6)


def test_dropout_key_depends_on_step_and_is_reproducible():
    x, y = _data()
    state = TrainState.create(model=MLP((16,), out_features=2, dropout_rate=0.5),
                              tx=optax.sgd(0.1), key=KEY, example_input=x[:1])
    step = jax.jit(make_train_step())
    a, _ = step(state, {"inputs": x, "labels": y})
    b, _ = step(state, {"inputs": x, "labels": y})
    np.testing.assert_array_equal(a.params["output"]["kernel"], b.params["output"]["kernel"])
    c, _ = step(state.replace(step=jnp.int32(5)), {"inputs": x, "labels": y})
    assert not np.array_equal(a.params["output"]["kernel"], c.params["output"]["kernel"])


def test_batch_stats_are_updated_by_the_step_and_used_by_eval():
    x, y = _data()
    state = TrainState.create(model=MLP((4,), out_features=2, normalization="batch"),
                              tx=optax.sgd(0.0), key=KEY, example_input=x[:2])
    new, _ = jax.jit(make_train_step())(state, {"inputs": x + 3.0, "labels": y})
    mean = np.asarray(new.collections["batch_stats"]["norm_0"]["mean"])
    assert not np.allclose(mean, 0.0)
    metrics = make_eval_step()(new, {"inputs": x, "labels": y})
    assert float(metrics["count"]) == 16


def test_nonfinite_step_returns_incoming_state_and_names_the_leaf():
    x, y = _data()
    state = TrainState.create(model=MLP((4,), out_features=2), tx=optax.sgd(0.1), key=KEY,
                              example_input=x[:1])
    bad_x = x.copy()
    bad_x[0, 0] = np.nan
    new, metrics = jax.jit(make_train_step())(state, {"inputs": bad_x, "labels": y})
    assert not bool(metrics["finite"])
    assert int(new.step) == 0
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    # relu'(NaN) is 0, so the bias gradient stays finite; the kernel's, x^T delta,
    # multiplies the NaN input and is the first non-finite leaf.
    assert paths[int(metrics["nonfinite_leaf"])] == "dense_0/kernel"


def test_grad_norm_is_the_norm_of_the_gradients():
    x, y = _data()
    state = TrainState.create(model=MLP((4,), out_features=2), tx=optax.sgd(0.1), key=KEY,
                              example_input=x[:1])
    _, metrics = jax.jit(make_train_step())(state, {"inputs": x, "labels": y})

    def loss(params):
        logits = state.apply_fn({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss)(state.params)
    want = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(metrics["grad_norm"], want, rtol=1e-5)


def test_gradient_whose_square_overflows_counts_as_nonfinite():
    """Inputs of 1e20: every value stays finite (the loss too), but the first
    kernel's gradient squared overflows float32, as Adam's second moment would."""
    x, y = _data()
    state = TrainState.create(model=MLP((4,), out_features=2), tx=optax.sgd(0.1), key=KEY,
                              example_input=x[:1])
    new, metrics = jax.jit(make_train_step())(state, {"inputs": x * 1e20, "labels": y})
    assert np.isfinite(float(metrics["loss"])) and not bool(metrics["finite"])
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    assert paths[int(metrics["nonfinite_leaf"])] == "dense_0/kernel"
    assert int(new.step) == 0


@pytest.mark.parametrize("use_cond", [True, False])
def test_guarded_update(use_cond):
    """Both forms of the guard: the update when everything is finite, the
    incoming state (and the first bad leaf) otherwise."""
    x, _ = _data()
    state = TrainState.create(model=MLP((4,), out_features=2), tx=optax.adam(0.1), key=KEY,
                              example_input=x[:1])
    grads = jax.tree.map(jnp.ones_like, state.params)
    update = jax.jit(lambda s, g, loss: guarded_update(s, g, loss, use_cond=use_cond))
    new, m = update(state, grads, jnp.float32(1.0))
    want = state.apply_gradients(grads)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    n = sum(g.size for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(m["grad_norm"], np.sqrt(n), rtol=1e-6)
    assert bool(m["finite"]) and int(m["nonfinite_leaf"]) == -1

    leaves, treedef = jax.tree.flatten(grads)
    leaves[2] = leaves[2].at[0].set(jnp.inf)
    for bad_grads, loss, leaf in [(jax.tree.unflatten(treedef, leaves), 1.0, 2),
                                  (grads, np.nan, -1)]:
        new, m = update(state, bad_grads, jnp.float32(loss))
        assert not bool(m["finite"]) and int(m["nonfinite_leaf"]) == leaf
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("guard", ["cond", "where"])
def test_make_train_step_guard_forms_agree(guard):
    """Either guard: the same update on a finite batch, the incoming state on a
    NaN one, alone and under vmap (where a cond becomes a select)."""
    x, y = _data()
    state = TrainState.create(model=MLP((4,), out_features=2), tx=optax.adam(0.1), key=KEY,
                              example_input=x[:1])
    batch = {"inputs": x, "labels": y}
    want, _ = jax.jit(make_train_step())(state, batch)
    step = make_train_step(guard=guard)
    got, _ = jax.jit(step)(state, batch)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    bad = x.copy()
    bad[0, 0] = np.nan
    pair = jax.tree.map(lambda a: jnp.stack([a, a]), state)
    batches = {"inputs": jnp.stack([x, bad]), "labels": jnp.stack([y, y])}
    new, m = jax.jit(jax.vmap(step))(pair, batches)
    assert [bool(f) for f in m["finite"]] == [True, False]
    for a, b, c in zip(jax.tree.leaves(new), jax.tree.leaves(want), jax.tree.leaves(state),
                       strict=True):
        np.testing.assert_allclose(a[0], b, rtol=1e-6)
        np.testing.assert_array_equal(a[1], c)


class _Shift(nn.Module):
    """logits = inputs + bias: a gradient that stays finite whatever the logits."""

    @nn.compact
    def __call__(self, x, train=False):
        return x + self.param("bias", nn.initializers.zeros, (x.shape[-1],))


def test_pmap_style_guard_decides_alike_on_every_device():
    """gradient_reduction="gradients" (pmap's rule), run per device under a
    named vmap axis: device 1's cross-entropy overflows to inf while the averaged
    gradients stay finite. Every device must keep the incoming state, as one
    device does on the whole batch, or the replicas of the state split apart."""
    x = np.array([[0.5, -0.5], [3e38, -3e38]], np.float32)
    y = np.array([0, 1], np.int32)
    state = TrainState.create(model=_Shift(), tx=optax.sgd(0.1), key=KEY,
                              example_input=x[:1])
    step = make_train_step(axis_name="devices", gradient_reduction="gradients")
    per_device = jax.jit(jax.vmap(step, in_axes=(None, 0), axis_name="devices"))
    new, m = per_device(state, {"inputs": x[:, None], "labels": y[:, None]})
    assert [bool(f) for f in m["finite"]] == [False, False]
    np.testing.assert_array_equal(new.step, [0, 0])
    np.testing.assert_array_equal(new.params["bias"], np.zeros((2, 2), np.float32))


def test_make_train_step_rejects_unknown_guard():
    with pytest.raises(ValueError, match="guard must be"):
        make_train_step(guard="select")


def test_eval_metrics_average_exactly_over_uneven_batches():
    x, y = _data(10)
    state = TrainState.create(model=MLP((8,), out_features=2), tx=optax.sgd(0.1), key=KEY,
                              example_input=x[:1])
    eval_step = jax.jit(make_eval_step())
    whole = eval_step(state, {"inputs": x, "labels": y})
    pad_x = np.concatenate([x[6:], np.zeros((2, 5), np.float32)])
    pad_y = np.concatenate([y[6:], np.zeros(2, np.int32)])
    parts = [eval_step(state, {"inputs": x[:6], "labels": y[:6]}),
             eval_step(state, {"inputs": pad_x, "labels": pad_y,
                               "mask": np.array([1, 1, 1, 1, 0, 0], np.float32)})]
    avg = average_metrics(parts)
    np.testing.assert_allclose(avg["loss"], whole["loss"], rtol=1e-6)
    np.testing.assert_allclose(avg["accuracy"], whole["accuracy"], rtol=1e-6)
    assert avg["count"] == 10 and average_metrics([{"loss": 1.0, "count": 0.0}]) == {}


def _grads_and_params():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
              "head": {"kernel": jnp.ones((2, 1))}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    return params, grads


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop",
                                  "adagrad", "lion"])
def test_every_optimizer_moves_against_the_gradient(name):
    params, grads = _grads_and_params()
    tx = make_optimizer(name, 0.01)
    updates, _ = tx.update(grads, tx.init(params), params)
    for u in jax.tree.leaves(updates):
        assert bool(jnp.all(u < 0))


def test_sgd_and_adam_first_updates_match_formulas():
    params, grads = _grads_and_params()
    sgd = make_optimizer("sgd", 0.1)
    u, _ = sgd.update(grads, sgd.init(params), params)
    np.testing.assert_allclose(u["dense"]["kernel"], -0.05)
    adam = make_optimizer("adam", 0.1)
    u, _ = adam.update(grads, adam.init(params), params)
    # First Adam step: m_hat = g, v_hat = g^2, update = -lr * g / (|g| + eps).
    # float32 bias correction (1 - 0.999 ** 1) costs ~7e-6 relative.
    np.testing.assert_allclose(u["dense"]["kernel"], -0.1 * 0.5 / (0.5 + 1e-8), rtol=2e-5)


def test_lion_defaults_to_its_published_b2():
    # Lion's b2 is 0.99 (Chen et al. 2023, optax.lion), not Adam's 0.999. The second
    # update's sign depends on it: b1 mu_1 + (1 - b1) g_2 with mu_1 = (1 - b2) g_1.
    params = {"w": jnp.zeros((3,))}
    steps = [jnp.ones((3,)), jnp.full((3,), -0.05)]
    ours, reference = make_optimizer("lion", 0.1), optax.lion(0.1)
    s_ours, s_ref = ours.init(params), reference.init(params)
    for g in steps:
        u_ours, s_ours = ours.update({"w": g}, s_ours, params)
        u_ref, s_ref = reference.update({"w": g}, s_ref, params)
        np.testing.assert_allclose(u_ours["w"], u_ref["w"])
    np.testing.assert_allclose(u_ours["w"], -0.1)  # with b2 = 0.999 it would be +0.1


def test_weight_decay_skips_biases():
    params, _ = _grads_and_params()
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = make_optimizer("sgd", 1.0, weight_decay=0.1)
    u, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(u["dense"]["kernel"], -0.1)
    np.testing.assert_allclose(u["dense"]["bias"], 0.0)
    tx = make_optimizer("adamw", 1.0, weight_decay=0.1)
    u, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(u["head"]["kernel"], -0.1)
    np.testing.assert_allclose(u["dense"]["bias"], 0.0)


def test_clipping_and_freezing():
    params, grads = _grads_and_params()
    tx = make_optimizer("sgd", 1.0, clip_norm=0.1)
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(u), 0.1, rtol=1e-6)
    tx = make_optimizer("adam", 1.0, frozen=("dense/.*",))
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(u["dense"]["kernel"], 0.0)
    np.testing.assert_array_equal(u["dense"]["bias"], 0.0)
    assert bool(jnp.all(u["head"]["kernel"] < 0))


def test_gradient_accumulation_equals_the_big_batch_step():
    x, y = _data(16)
    model = MLP((8,), out_features=2)
    big = TrainState.create(model=model, tx=make_optimizer("sgd", 0.1), key=KEY,
                            example_input=x[:1])
    acc = TrainState.create(model=model, tx=make_optimizer("sgd", 0.1, accumulate_steps=2),
                            key=KEY, example_input=x[:1])
    step = jax.jit(make_train_step())
    big, _ = step(big, {"inputs": x, "labels": y})
    acc, _ = step(acc, {"inputs": x[:8], "labels": y[:8]})
    # Between accumulation boundaries the parameters do not move.
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(
            TrainState.create(model=model, tx=optax.sgd(0.1), key=KEY,
                              example_input=x[:1]).params), strict=True):
        np.testing.assert_array_equal(a, b)
    acc, _ = step(acc, {"inputs": x[8:], "labels": y[8:]})
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_schedules():
    s = make_schedule(1.0, "warmup_cosine", total_steps=110, warmup_steps=10)
    np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(s(60), 0.5 * (1 + np.cos(np.pi * 50 / 100)), atol=1e-6)
    np.testing.assert_allclose(s(110), 0.0, atol=1e-6)
    c = make_schedule(1.0, "cosine", total_steps=100)
    np.testing.assert_allclose([c(0), c(50)], [1.0, 0.5], atol=1e-6)
    lin = make_schedule(1.0, "warmup_linear", total_steps=20, warmup_steps=10, end_value=0.5)
    np.testing.assert_allclose([lin(5), lin(10), lin(20)], [0.5, 1.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(make_schedule(1.0, "linear", total_steps=10)(5), 0.5)
    np.testing.assert_allclose(make_schedule(2.0, "constant", warmup_steps=4)(2), 1.0)
    assert float(make_schedule(2.0)(1000)) == 2.0


def test_configuration_errors():
    with pytest.raises(ValueError, match="unknown optimizer 'adamax'; known: sgd"):
        make_optimizer("adamax")
    with pytest.raises(ValueError, match="accumulate_steps must be >= 1, got 0"):
        make_optimizer("sgd", accumulate_steps=0)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        make_schedule(1.0, "step")
    with pytest.raises(ValueError, match="needs total_steps > warmup_steps"):
        make_schedule(1.0, "cosine", total_steps=5, warmup_steps=10)
    with pytest.raises(ValueError, match="gradient_reduction must be 'loss' or 'gradients'"):
        make_train_step(gradient_reduction="mean")


def test_label_mask_scores_only_the_chosen_tokens():
    logits = jax.random.normal(KEY, (2, 4, 5))
    labels = jnp.array([[0, 1, 2, 3], [4, 3, 2, 1]])
    label_mask = jnp.array([[0, 0, 1, 1], [0, 1, 1, 1]], jnp.float32)
    loss, metrics = classification_loss()(
        logits, {"labels": labels, "label_mask": label_mask, "mask": jnp.array([1.0, 0.0])})
    logp = np.asarray(jax.nn.log_softmax(logits))
    want = -(logp[0, 2, 2] + logp[0, 3, 3]) / 2  # row 1 is padding: only row 0's tokens 2, 3
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    pred = np.asarray(logits).argmax(-1)
    np.testing.assert_allclose(metrics["accuracy"], ((pred[0, 2] == 2) + (pred[0, 3] == 3)) / 2)


def test_eval_metrics_with_label_mask_average_over_tokens_across_batches():
    # Batches with different numbers of scored labels: the combined loss must be
    # the mean over every scored token, as on the whole set at once.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 6, 3)).astype(np.float32)
    labels = rng.integers(0, 5, size=(4, 6)).astype(np.int32)
    label_mask = np.zeros((4, 6), np.float32)
    label_mask[:2, :1] = 1.0  # batch 1: 2 scored tokens
    label_mask[2:, :] = 1.0  # batch 2: 12 scored tokens
    state = TrainState.create(model=MLP((), out_features=5), tx=optax.sgd(0.1), key=KEY,
                              example_input=x[:1])
    step = jax.jit(make_eval_step())
    avg = average_metrics([
        jax.device_get(step(state, {"inputs": x[s], "labels": labels[s],
                                    "label_mask": label_mask[s]}))
        for s in (slice(0, 2), slice(2, 4))])
    logits = np.asarray(state.apply_fn({"params": state.params}, x, train=False))
    logp = np.asarray(jax.nn.log_softmax(logits))
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(avg["loss"], (nll * label_mask).sum() / label_mask.sum(),
                               rtol=1e-5)
    assert avg["count"] == 14


# --------------------------------------------------------------------------- #
# FusedAdamW: optax's adamw with a one-pass native apply.
# --------------------------------------------------------------------------- #

needs_native = pytest.mark.skipif(
    not __import__("shutil").which("c++"), reason="no C++ compiler: apply is optax's")


def _fused_case(seed=0):
    rng = np.random.default_rng(seed)
    # A decayed matrix and an undecayed vector above the native threshold, and
    # a small one below it; sizes not a multiple of the vector width.
    params = {"w": rng.normal(size=(173, 101)), "v": rng.normal(size=(20011,)),
              "b": rng.normal(size=(7,))}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    grads = [jax.tree.map(lambda a, i=i: jnp.asarray(
        np.random.default_rng(seed + 10 + i).normal(size=a.shape), jnp.float32), params)
        for i in range(4)]
    return params, grads


@needs_native
@pytest.mark.parametrize("learning_rate", [3e-3, optax.warmup_cosine_decay_schedule(
    0.0, 1e-2, 2, 10)])
def test_fused_adamw_equals_optax(learning_rate):
    """Four steps of ``apply`` against optax's ``adamw`` + ``apply_updates``
    (weight decay on matrices only, a schedule's count): parameters and
    moments to a few float32 roundings, the state's structure and count equal."""
    from nnlib.train.optim import FusedAdamW, decay_mask

    params, grads = _fused_case()
    tx = make_optimizer("adamw", learning_rate, weight_decay=0.1, b1=0.8, b2=0.95, eps=1e-6)
    assert isinstance(tx, FusedAdamW)
    assert "nnlib_adamw" in str(jax.make_jaxpr(tx.apply)(grads[0], tx.init(params), params))
    ref = optax.adamw(learning_rate, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1,
                      mask=decay_mask)

    @jax.jit
    def ref_step(p, s, g):
        u, s = ref.update(g, s, p)
        return optax.apply_updates(p, u), s

    p1, s1, p2, s2 = params, tx.init(params), params, ref.init(params)
    apply = jax.jit(tx.apply)
    for g in grads:
        p1, s1 = apply(g, s1, p1)
        p2, s2 = ref_step(p2, s2, g)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), p1, params)
    assert min(jax.tree.leaves(moved)) > 1e-3


@needs_native
def test_fused_adamw_kernel_is_its_reference_formula():
    """The kernel computes ``_adamw_reference``'s arithmetic (the formula its
    forward-mode derivative differentiates): optax's, the bias corrections
    multiplied by their reciprocals; to a rounding, on any vector width."""
    from nnlib.layers import _native

    keys = jax.random.split(jax.random.key(5), 4)
    shape = (300, 70)  # not a whole number of vectors or chunks
    params, grads, mu = (jax.random.normal(k, shape) for k in keys[:3])
    nu = jnp.abs(jax.random.normal(keys[3], shape))
    scalars = jnp.array([-1e-2, 0.1, 0.9, 1e-3, 0.999, 1e-8, 0.01, 0.19, 0.002997, 0.0],
                        jnp.float32)
    got = jax.jit(_native.adamw_update)(params, grads, mu, nu, scalars)
    want = jax.jit(_native._adamw_reference)(params, grads, mu, nu, scalars)
    for a, b in zip(got, want, strict=True):
        # atol: a rounding of the inputs (normals, |x| < 8), where a fused
        # multiply-add in one of them and not the other changes the last bit.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=3e-7, atol=5e-7)


@needs_native
def test_fused_adamw_in_the_train_step_under_vmap_and_grad():
    """``TrainState.apply_gradients`` takes ``apply``; a vmapped ensemble of
    states and a gradient through the update equal optax's."""
    from nnlib.train.optim import decay_mask

    params, grads = _fused_case(1)
    tx = make_optimizer("adamw", 1e-2, weight_decay=0.05)
    ref = optax.adamw(1e-2, weight_decay=0.05, mask=decay_mask)

    def step(tx, p, g):
        if hasattr(tx, "apply"):
            return tx.apply(g, tx.init(p), p)[0]
        u, _ = tx.update(g, tx.init(p), p)
        return optax.apply_updates(p, u)

    members = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    member_grads = jax.tree.map(lambda a: jnp.stack([a, -a]), grads[0])
    got = jax.jit(jax.vmap(lambda p, g: step(tx, p, g)))(members, member_grads)
    want = jax.jit(jax.vmap(lambda p, g: step(ref, p, g)))(members, member_grads)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)

    def loss(tx):
        return lambda p: sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(step(tx, p, grads[0])))

    for a, b in zip(jax.tree.leaves(jax.grad(loss(tx))(params)),
                    jax.tree.leaves(jax.grad(loss(ref))(params)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    x, y = _data(n=8, d=100)  # a 100 x 200 kernel: above the native threshold
    state = TrainState.create(model=MLP((200,), out_features=2), tx=tx, key=KEY,
                              example_input=x[:1])
    program = str(jax.make_jaxpr(make_train_step())(state, {"inputs": x, "labels": y}))
    assert "nnlib_adamw" in program


@needs_native
def test_fused_adamw_keep_leaves_the_state_as_it_was():
    """``apply(keep=True)`` returns the parameters and state bit for bit (the
    native arrays left alone by the kernel, the rest selected), ``keep=False``
    the update; per member under ``vmap``; differentiable either way."""
    params, grads = _fused_case(2)
    tx = make_optimizer("adamw", 1e-2, weight_decay=0.05)
    state = tx.init(params)
    apply = jax.jit(tx.apply)
    updated = apply(grads[0], state, params)
    for keep, want in ((True, (params, state)), (False, updated)):
        got = apply(grads[0], state, params, keep=jnp.bool_(keep))
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    pair = jax.tree.map(lambda a: jnp.stack([a, a]), (grads[0], state, params))
    got = jax.jit(jax.vmap(tx.apply))(*pair, jnp.array([False, True]))
    for a, new, old in zip(jax.tree.leaves(got), jax.tree.leaves(updated),
                           jax.tree.leaves((params, state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(new))
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(old))

    def loss(p, keep):
        new_params, _ = tx.apply(grads[0], state, p, keep=keep)
        return sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(new_params))

    kept = jax.grad(loss)(params, jnp.bool_(True))
    for a, p in zip(jax.tree.leaves(kept), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.cos(np.asarray(p)), rtol=1e-6)


@needs_native
def test_where_guard_skips_with_the_fused_adamw_and_selects_nothing_large():
    """The "where" guard (an ensemble's, shard_map's) with ``FusedAdamW``: a NaN
    member keeps its state exactly, the other takes the update, and the program
    selects no array the native update covers (the kernel keeps it)."""
    x, y = _data(n=8, d=100)  # a 100 x 200 kernel: above the native threshold
    tx = make_optimizer("adamw", 1e-2, weight_decay=0.05)
    state = TrainState.create(model=MLP((200,), out_features=2), tx=tx, key=KEY,
                              example_input=x[:1])
    batch = {"inputs": x, "labels": y}
    want, _ = jax.jit(make_train_step())(state, batch)
    bad = x.copy()
    bad[0, 0] = np.nan
    pair = jax.tree.map(lambda a: jnp.stack([a, a]), state)
    batches = {"inputs": jnp.stack([x, bad]), "labels": jnp.stack([y, y])}
    step = jax.vmap(make_train_step(guard="where"))
    new, m = jax.jit(step)(pair, batches)
    assert [bool(f) for f in m["finite"]] == [True, False]
    for a, b, c in zip(jax.tree.leaves(new), jax.tree.leaves(want), jax.tree.leaves(state),
                       strict=True):
        np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-7)  # vmapped roundings
        np.testing.assert_array_equal(a[1], c)
    compiled = jax.jit(step).lower(pair, batches).compile().as_text()
    assert "nnlib_adamw" in compiled
    selects = [line for line in compiled.splitlines() if " select(" in line]
    assert selects and not any("[2,100,200]" in line for line in selects)


def test_wrapped_adamw_is_plain_optax():
    """With clipping, freezing or accumulation the chain is optax's own."""
    from nnlib.train.optim import FusedAdamW

    assert isinstance(make_optimizer("adamw"), FusedAdamW)
    for kwargs in ({"clip_norm": 1.0}, {"frozen": ("a/.*",)}, {"accumulate_steps": 2}):
        assert not hasattr(make_optimizer("adamw", **kwargs), "apply")
