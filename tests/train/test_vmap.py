"""Per-example gradients, DP-SGD and ensembles against plain loops and numpy.

The references are independent of ``nnlib.train.vmap``: a Python loop of
``jax.grad`` on each example alone (with the key the module documents for
that example), numpy clipping and averaging, and separate
``make_train_step`` calls on each ensemble member.

Speed: models, states, batches (always with a "mask", so every batch has the
same pytree structure) and jitted functions are shared between tests, so XLA
compiles each program once for the whole file.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnlib.layers import MLP
from nnlib.layers import _native as native
from nnlib.layers.conv import Conv2D
from nnlib.train.state import TrainState
from nnlib.train.step import classification_loss, make_train_step
from nnlib.train.vmap import (
    create_ensemble,
    dp_sgd_gradients,
    ensemble_predict,
    make_dp_sgd_train_step,
    make_ensemble_train_step,
    per_example_grad_norms,
    per_example_gradients,
    stack_ensemble,
    unstack_ensemble,
    weighted_sum_over_batch,
)

KEY = jax.random.key(0)
CLASSES = 3
LOSS = classification_loss()


class SmallConvNet(nn.Module):
    """Conv2D -> relu -> global mean pool -> Dense: needs its batch axis."""

    @nn.compact
    def __call__(self, x, *, train=False):
        del train
        x = jax.nn.relu(Conv2D(4, 3)(x))  # [B, H, W, 4]
        return nn.Dense(CLASSES)(jnp.mean(x, axis=(1, 2)))  # [B, classes]


MODELS = {
    "mlp": (lambda: MLP((8,), CLASSES, activation="tanh"), (5,)),
    "conv": (lambda: SmallConvNet(), (6, 6, 2)),
    "dropout": (lambda: MLP((16,), CLASSES, activation="relu", dropout_rate=0.5), (5,)),
    "batchnorm": (lambda: MLP((8,), CLASSES, normalization="batch"), (5,)),
}


@functools.cache
def shared_state(name):
    """One state per model for the whole file (jit caches key on apply_fn)."""
    build, in_shape = MODELS[name]
    return TrainState.create(model=build(), tx=optax.sgd(0.1), key=KEY,
                             example_input=jnp.ones((1, *in_shape), jnp.float32))


def make_batch(n=6, in_shape=(5,), *, seed=0, mask=None):
    rng = np.random.default_rng(seed)
    return {
        "inputs": jnp.asarray(rng.normal(size=(n, *in_shape)), jnp.float32),
        "labels": jnp.asarray(rng.integers(0, CLASSES, size=(n,)), jnp.int32),
        "mask": jnp.asarray(np.ones(n) if mask is None else mask, jnp.float32),
    }


@functools.cache
def _grad_one(apply_fn, loss_fn, train):
    def loss(params, collections, one, example_key):
        rngs = {"dropout": jax.random.fold_in(example_key, 0)}
        outputs = apply_fn({"params": params, **collections}, one["inputs"], train=train,
                           rngs=rngs)
        return loss_fn(outputs, one)[0]

    return jax.jit(jax.grad(loss))


def loop_gradients(state, batch, key, loss_fn=LOSS, *, train=True):
    """Reference: jax.grad on each example alone, as a batch of one, with the
    documented key: example j -> fold_in(key, j), stream "dropout" -> fold_in(., 0)."""
    grad_one = _grad_one(state.apply_fn, loss_fn, train)
    n = batch["inputs"].shape[0]
    return [grad_one(state.params, state.collections,
                     {k: v[j:j + 1] for k, v in batch.items()}, jax.random.fold_in(key, j))
            for j in range(n)]


# Jitted entry points (the library functions are unjitted, like the train step).
STATIC = ("loss_fn", "train", "rng_streams")
per_example_gradients_jit = jax.jit(per_example_gradients, static_argnames=STATIC)
dp_sgd_gradients_jit = jax.jit(dp_sgd_gradients, static_argnames=STATIC)


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def example(tree, j):
    return jax.tree.map(lambda x: x[j], tree)


# --------------------------------------------------------------------------
# Per-example gradients.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "conv", "dropout"])
def test_per_example_gradients_equal_loop(name):
    state = shared_state(name)
    batch = make_batch(6, MODELS[name][1])
    key = jax.random.key(7)
    grads = per_example_gradients_jit(state, batch, key, loss_fn=LOSS)
    reference = loop_gradients(state, batch, key)
    for leaf, params_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(state.params),
                                 strict=True):
        assert leaf.shape == (6, *params_leaf.shape)
    for j, ref in enumerate(reference):
        np.testing.assert_allclose(flat(example(grads, j)), flat(ref), atol=1e-6, rtol=1e-5)
    # Per-example norms equal the norms of the loop's gradients.
    norms = per_example_grad_norms(grads)
    assert norms.shape == (6,)
    np.testing.assert_allclose(
        norms, [np.linalg.norm(flat(ref)) for ref in reference], rtol=1e-5, atol=1e-6)


def test_per_example_gradients_eager_equals_jit():
    state, batch = shared_state("mlp"), make_batch()
    np.testing.assert_allclose(
        flat(per_example_gradients(state, batch, KEY)),
        flat(per_example_gradients_jit(state, batch, KEY)), atol=1e-6)


def test_dropout_examples_get_different_masks_and_default_key():
    state = shared_state("dropout")
    batch = make_batch(6)
    batch["inputs"] = jnp.broadcast_to(batch["inputs"][:1], (6, 5))  # identical examples
    grads = per_example_gradients_jit(state, batch)
    # Identical examples, different dropout masks -> different gradients.
    assert not np.allclose(flat(example(grads, 0)), flat(example(grads, 1)))
    # key=None is the train step's key fold_in(state.rng, state.step).
    explicit = per_example_gradients_jit(state, batch, jax.random.fold_in(state.rng, state.step))
    np.testing.assert_array_equal(flat(grads), flat(explicit))
    # train=False turns dropout off: identical examples, identical gradients.
    evaluation = per_example_gradients_jit(state, batch, train=False)
    np.testing.assert_allclose(flat(example(evaluation, 0)), flat(example(evaluation, 1)))


def test_per_example_gradients_float64_and_mean_is_batch_gradient():
    def loss_fn(outputs, batch):  # dtype-consistent squared error for float64
        loss = jnp.mean(jnp.square(outputs - batch["labels"]))
        return loss, {"loss": loss}

    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        batch = {"inputs": jnp.asarray(rng.normal(size=(5, 5))),
                 "labels": jnp.asarray(rng.normal(size=(5, CLASSES)))}
        state = shared_state("mlp")
        params = jax.tree.map(lambda p: p.astype(jnp.float64), state.params)
        state = state.replace(params=params, opt_state=state.tx.init(params))
        grads = per_example_gradients_jit(state, batch, loss_fn=loss_fn)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(grads))
        reference = loop_gradients(state, batch, KEY, loss_fn)
        for j, ref in enumerate(reference):
            np.testing.assert_allclose(flat(example(grads, j)), flat(ref), atol=1e-12)

        def batch_loss(params):
            outputs = state.apply_fn({"params": params}, batch["inputs"])
            return loss_fn(outputs, batch)[0]

        full = jax.grad(batch_loss)(state.params)
        mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
        np.testing.assert_allclose(flat(mean), flat(full), atol=1e-12)


@settings(max_examples=3, deadline=None)
@given(n=st.integers(1, 5))
def test_per_example_gradients_batch_sizes(n):
    state, batch = shared_state("mlp"), make_batch(n, seed=n)
    grads = per_example_gradients_jit(state, batch, KEY, loss_fn=LOSS)
    for j, ref in enumerate(loop_gradients(state, batch, KEY)):
        np.testing.assert_allclose(flat(example(grads, j)), flat(ref), atol=1e-6, rtol=1e-5)


def test_masked_examples_get_zero_gradient():
    batch = make_batch(6, mask=[1, 0, 1, 0, 1, 1])
    batch["inputs"] = batch["inputs"].at[1].set(jnp.nan)  # garbage padding row
    grads = per_example_gradients_jit(shared_state("mlp"), batch)
    assert np.all(flat(example(grads, 1)) == 0.0) and np.all(flat(example(grads, 3)) == 0.0)
    assert np.all(np.isfinite(flat(grads)))
    assert np.any(flat(example(grads, 0)) != 0.0)


# --------------------------------------------------------------------------
# DP-SGD.
# --------------------------------------------------------------------------


def numpy_dp_reference(reference_grads, clip, keep):
    """Clip each real example to norm <= clip, sum, divide by their count."""
    total, count = 0.0, 0
    for g, k in zip(reference_grads, keep, strict=True):
        if k:
            v = flat(g)
            total = total + v * min(1.0, clip / np.linalg.norm(v))
            count += 1
    return total / count


def test_dp_sgd_without_noise_is_clipped_mean():
    state, batch, key = shared_state("mlp"), make_batch(), jax.random.key(3)
    reference = loop_gradients(state, batch, jax.random.fold_in(key, 0))
    norms = np.array([np.linalg.norm(flat(g)) for g in reference])
    clip = float(np.median(norms))  # about half the examples get clipped
    grads, metrics = dp_sgd_gradients_jit(
        state, batch, key, l2_norm_clip=clip, noise_multiplier=0.0)
    np.testing.assert_allclose(
        flat(grads), numpy_dp_reference(reference, clip, [True] * 6), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(metrics["per_example_grad_norm"], norms.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["clipped_fraction"], np.mean(norms > clip))
    assert set(metrics) >= {"loss", "accuracy"}


def _outer_products(hlo_text, shape):
    """The multiplies of two different operands with result ``f32[shape]`` in a
    compiled program: each is one formation of a per-example kernel gradient
    (its outer product); squares (``x * x``, the norms) are not counted."""
    pattern = r"= f32\[" + ",".join(map(str, shape)) + r"\]\{[\d,]*\} multiply\((%[\w.\-]+), (%[\w.\-]+)\)"
    return [m for m in re.findall(pattern, hlo_text) if m[0] != m[1]]


@pytest.mark.skipif(not native.available() or jax.default_backend() != "cpu",
                    reason="materialize is the identity without the CPU kernels")
def test_dp_sgd_forms_each_per_example_gradient_once():
    """The norms and the weighted sum read one formed array: XLA:CPU formed the
    outer products once for each consumer (two multiplies per kernel) before
    the per-example gradients were materialized."""
    state, batch, key = shared_state("mlp"), make_batch(), jax.random.key(3)
    text = dp_sgd_gradients_jit.lower(
        state, batch, key, l2_norm_clip=0.5, noise_multiplier=0.0).compile().as_text()
    for shape in ((6, 5, 8), (6, 8, CLASSES)):  # the two kernels' per-example gradients
        assert len(_outer_products(text, shape)) == 1, shape


@pytest.mark.parametrize("shape", [(5,), (5, 3), (5, 4, 3), (5, 2, 3, 2)])
def test_weighted_sum_over_batch_is_a_matrix_vector_product(shape):
    """Equal to sum_j w_j x_j in float64, for any rank; bf16 comes back bf16,
    accumulated in float32; lowered to one dot, not a reduction."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.random(shape[0]).astype(np.float32)
    want = np.tensordot(w.astype(np.float64), x.astype(np.float64), axes=1)
    got = weighted_sum_over_batch(jnp.asarray(x), jnp.asarray(w))
    assert got.shape == shape[1:] and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    low = weighted_sum_over_batch(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w))
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), want, rtol=2e-2, atol=2e-2)
    jaxpr = str(jax.make_jaxpr(weighted_sum_over_batch)(jnp.asarray(x), jnp.asarray(w)))
    assert "dot_general" in jaxpr and "reduce_sum" not in jaxpr


def test_dp_sgd_each_clipped_gradient_within_norm():
    state, batch = shared_state("mlp"), make_batch()
    clip = 0.05  # smaller than every example's norm
    assert np.all(np.asarray(per_example_grad_norms(per_example_gradients_jit(state, batch)))
                  > clip)
    for j in range(6):
        only_j = {**batch, "mask": jnp.asarray(np.eye(6)[j], jnp.float32)}
        grads, _ = dp_sgd_gradients_jit(
            state, only_j, KEY, l2_norm_clip=clip, noise_multiplier=0.0)
        norm = np.linalg.norm(flat(grads))  # the one clipped gradient, divided by 1
        assert norm <= clip * (1 + 1e-6)
        np.testing.assert_allclose(norm, clip, rtol=1e-5)


def test_dp_sgd_noise_has_the_right_scale():
    # A linear model with 4 * 2000 + 2000 = 10000 parameters.
    batch = make_batch(8, (4,))
    state = TrainState.create(model=MLP((), 2000), tx=optax.sgd(0.1), key=KEY,
                              example_input=batch["inputs"][:1])
    clip, sigma = 0.5, 1.3
    key = jax.random.key(11)
    noiseless, _ = dp_sgd_gradients_jit(
        state, batch, key, l2_norm_clip=clip, noise_multiplier=0.0)
    noisy, _ = dp_sgd_gradients_jit(state, batch, key, l2_norm_clip=clip, noise_multiplier=sigma)
    noise = (flat(noisy) - flat(noiseless)) * 8
    assert noise.size == 10000
    assert abs(noise.std() / (sigma * clip) - 1.0) < 0.03
    assert abs(noise.mean()) < 4 * sigma * clip / np.sqrt(noise.size)
    # Deterministic given the key; another key, other noise.
    again, _ = dp_sgd_gradients_jit(state, batch, key, l2_norm_clip=clip, noise_multiplier=sigma)
    np.testing.assert_array_equal(flat(again), flat(noisy))
    other, _ = dp_sgd_gradients_jit(
        state, batch, jax.random.key(12), l2_norm_clip=clip, noise_multiplier=sigma)
    assert not np.allclose(flat(other), flat(noisy))


def test_dp_sgd_masked_examples_excluded():
    keep = [1, 1, 0, 1, 0, 1]
    state, batch, clip = shared_state("mlp"), make_batch(mask=keep), 0.3
    reference = loop_gradients(state, batch, jax.random.fold_in(KEY, 0))
    grads, metrics = dp_sgd_gradients_jit(
        state, batch, KEY, l2_norm_clip=clip, noise_multiplier=0.0)
    np.testing.assert_allclose(
        flat(grads), numpy_dp_reference(reference, clip, keep), atol=1e-6, rtol=1e-5)
    real_norms = [np.linalg.norm(flat(g)) for g, k in zip(reference, keep, strict=True) if k]
    np.testing.assert_allclose(metrics["per_example_grad_norm"], np.mean(real_norms), rtol=1e-5)
    # Changing the masked rows (even to NaN) changes nothing.
    changed = {**batch, "inputs": batch["inputs"].at[np.array([2, 4])].set(jnp.nan)}
    again, _ = dp_sgd_gradients_jit(state, changed, KEY, l2_norm_clip=clip, noise_multiplier=0.0)
    np.testing.assert_array_equal(flat(again), flat(grads))


DP_STEP = jax.jit(make_dp_sgd_train_step(l2_norm_clip=0.2, noise_multiplier=0.7))


def test_dp_sgd_train_step():
    state, batch = shared_state("dropout"), make_batch(mask=[1, 1, 1, 1, 1, 0])
    new_state, metrics = DP_STEP(state, batch)
    key = jax.random.fold_in(state.rng, state.step)
    grads, expected = dp_sgd_gradients_jit(
        state, batch, key, l2_norm_clip=0.2, noise_multiplier=0.7)
    np.testing.assert_allclose(  # sgd(0.1)
        flat(new_state.params), flat(state.params) - 0.1 * flat(grads), atol=1e-6)
    assert int(new_state.step) == 1 and bool(metrics["finite"])
    assert int(metrics["nonfinite_leaf"]) == -1
    for name in ("loss", "accuracy", "per_example_grad_norm", "clipped_fraction"):
        np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], np.linalg.norm(flat(grads)), rtol=1e-5)
    # The next step draws new dropout masks and new noise.
    _, metrics2 = DP_STEP(new_state, batch)
    assert float(metrics2["grad_norm"]) != float(metrics["grad_norm"])


def test_dp_sgd_train_step_keeps_state_on_nan():
    state, batch = shared_state("dropout"), make_batch()
    batch["inputs"] = batch["inputs"].at[0].set(jnp.nan)
    new_state, metrics = DP_STEP(state, batch)
    assert not bool(metrics["finite"]) and int(metrics["nonfinite_leaf"]) >= 0
    np.testing.assert_array_equal(flat(new_state.params), flat(state.params))
    assert int(new_state.step) == 0


# --------------------------------------------------------------------------
# Ensembles.
# --------------------------------------------------------------------------

# Momentum, not adam: optax 0.2.8 adam computes float ** int32 count, which
# fails under strict dtype promotion.
ENSEMBLE_MODEL, ENSEMBLE_TX = MODELS["dropout"][0](), optax.sgd(0.1, momentum=0.9)
ENSEMBLE_KEYS = jax.random.split(jax.random.key(5), 4)
SINGLE_STEP = jax.jit(make_train_step(LOSS))


@functools.cache
def shared_ensemble():
    return create_ensemble(ENSEMBLE_MODEL, ENSEMBLE_TX, ENSEMBLE_KEYS, jnp.ones((1, 5)))


def test_create_ensemble_stacks_independent_members():
    ensemble = shared_ensemble()
    assert all(leaf.shape[0] == 4 for leaf in jax.tree.leaves(ensemble))
    members = [unstack_ensemble(ensemble, k) for k in range(4)]
    for a in range(4):
        single = TrainState.create(model=ENSEMBLE_MODEL, tx=ENSEMBLE_TX, key=ENSEMBLE_KEYS[a],
                                   example_input=jnp.ones((1, 5)))
        np.testing.assert_allclose(flat(members[a].params), flat(single.params), atol=1e-6)
        np.testing.assert_array_equal(members[a].key, single.key)
        for b in range(a):
            assert not np.allclose(flat(members[a].params), flat(members[b].params))
            assert not np.array_equal(members[a].key, members[b].key)
    # Raw uint32 keys work too, and stack_ensemble inverts unstack_ensemble.
    raw = create_ensemble(ENSEMBLE_MODEL, ENSEMBLE_TX, jax.random.key_data(ENSEMBLE_KEYS),
                          jnp.ones((1, 5)))
    np.testing.assert_array_equal(flat(raw.params), flat(ensemble.params))
    np.testing.assert_array_equal(flat(stack_ensemble(members)), flat(ensemble))


def test_ensemble_step_equals_separate_steps_and_compiles_once():
    traces = []

    def loss_fn(outputs, batch):
        traces.append(1)  # runs only while tracing
        return LOSS(outputs, batch)

    ensemble, batch = shared_ensemble(), make_batch()
    step = jax.jit(make_ensemble_train_step(loss_fn))
    new, metrics = step(ensemble, batch)
    assert metrics["loss"].shape == (4,)
    for k in range(4):
        member, member_metrics = SINGLE_STEP(unstack_ensemble(ensemble, k), batch)
        np.testing.assert_allclose(flat(unstack_ensemble(new, k)), flat(member), atol=1e-6)
        np.testing.assert_allclose(metrics["loss"][k], member_metrics["loss"], rtol=1e-6)
    for _ in range(3):
        new, _ = step(new, batch)
    assert len(traces) == 1
    assert np.all(np.asarray(new.step) == 4)


def test_ensemble_step_with_a_batch_per_member():
    batches = [make_batch(seed=s) for s in range(4)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)  # [K, B, ...]
    ensemble = shared_ensemble()
    new, _ = jax.jit(make_ensemble_train_step(LOSS, same_batch=False))(ensemble, stacked)
    for k in range(4):
        member, _ = SINGLE_STEP(unstack_ensemble(ensemble, k), batches[k])
        np.testing.assert_allclose(flat(unstack_ensemble(new, k)), flat(member), atol=1e-6)


def test_ensemble_member_with_a_nonfinite_step_keeps_its_state():
    """The step's guard is a cond; under vmap it becomes a per-member select."""
    batches = [make_batch(seed=s) for s in range(4)]
    batches[2]["inputs"] = np.full_like(batches[2]["inputs"], np.nan)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
    ensemble = shared_ensemble()
    new, metrics = jax.jit(make_ensemble_train_step(LOSS, same_batch=False))(ensemble, stacked)
    np.testing.assert_array_equal(np.asarray(metrics["finite"]), [True, True, False, True])
    np.testing.assert_array_equal(np.asarray(new.step), [1, 1, 0, 1])
    np.testing.assert_array_equal(flat(unstack_ensemble(new, 2)),
                                  flat(unstack_ensemble(ensemble, 2)))
    member, _ = SINGLE_STEP(unstack_ensemble(ensemble, 0), batches[0])
    np.testing.assert_allclose(flat(unstack_ensemble(new, 0)), flat(member), atol=1e-6)


def test_ensemble_predict():
    ensemble, inputs = shared_ensemble(), make_batch()["inputs"]
    per_member, mean = ensemble_predict(ensemble, inputs)
    assert per_member.shape == (4, 6, CLASSES) and mean.shape == (6, CLASSES)
    for k in range(4):
        member = unstack_ensemble(ensemble, k)
        expected = member.apply_fn(member.variables, inputs, train=False)
        np.testing.assert_allclose(per_member[k], expected, atol=1e-6)
    np.testing.assert_allclose(mean, np.mean(np.asarray(per_member), axis=0), atol=1e-6)
    probs, mean_probs = ensemble_predict(ensemble, inputs, transform=jax.nn.softmax)
    logits = np.asarray(per_member, np.float64)
    ref = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, ref, rtol=1e-5)
    np.testing.assert_allclose(mean_probs, ref.mean(0), rtol=1e-5)


# --------------------------------------------------------------------------
# Bad inputs.
# --------------------------------------------------------------------------


def test_batchnorm_in_train_mode_has_no_per_example_gradient():
    state, batch = shared_state("batchnorm"), make_batch()
    with pytest.raises(ValueError, match=r"per_example_gradients.*BatchNorm.*train=False"):
        per_example_gradients(state, batch)
    with pytest.raises(ValueError, match=r"dp_sgd_gradients.*BatchNorm"):
        dp_sgd_gradients(state, batch, KEY, l2_norm_clip=1.0, noise_multiplier=1.0)
    # Eval mode (running statistics) is well defined and matches the loop.
    grads = per_example_gradients_jit(state, batch, KEY, train=False)
    for j, ref in enumerate(loop_gradients(state, batch, KEY, train=False)):
        np.testing.assert_allclose(flat(example(grads, j)), flat(ref), atol=1e-6, rtol=1e-5)


def test_bad_batches():
    state, batch = shared_state("mlp"), make_batch()
    with pytest.raises(ValueError, match=r"per_example_gradients expected a batch dict "
                                         r"with 'inputs'.*\['labels', 'x'\]"):
        per_example_gradients(state, {"x": batch["inputs"], "labels": batch["labels"]})
    with pytest.raises(ValueError, match=r"leading batch axis.*'labels'\]: \(3,\)"):
        per_example_gradients(state, {**batch, "labels": batch["labels"][:3]})


def test_bad_dp_hyperparameters():
    state, batch = shared_state("mlp"), make_batch()
    with pytest.raises(ValueError, match=r"make_dp_sgd_train_step expected l2_norm_clip > 0, "
                                         r"got 0"):
        make_dp_sgd_train_step(l2_norm_clip=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"noise_multiplier >= 0, got -1"):
        make_dp_sgd_train_step(l2_norm_clip=1.0, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match=r"dp_sgd_gradients expected l2_norm_clip > 0"):
        dp_sgd_gradients(state, batch, KEY, l2_norm_clip=-1.0, noise_multiplier=1.0)


def test_bad_norm_inputs():
    with pytest.raises(ValueError, match=r"leading \[batch\] axis, got leaf shapes \[\(\)\]"):
        per_example_grad_norms({"w": jnp.ones(())})
    with pytest.raises(ValueError, match=r"share the leading \[batch\] axis.*\(3, 2\), \(2,\)"):
        per_example_grad_norms({"a": jnp.ones((3, 2)), "b": jnp.ones((2,))})


def test_bad_ensemble_keys():
    x, tx = jnp.ones((1, 5)), ENSEMBLE_TX
    with pytest.raises(ValueError, match=r"create_ensemble expected keys of shape \[members\] "
                                         r"typed keys, got shape \(\).*split"):
        create_ensemble(ENSEMBLE_MODEL, tx, jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"\[members, 2\] raw uint32 keys, got shape \(2,\)"):
        create_ensemble(ENSEMBLE_MODEL, tx, jax.random.key_data(jax.random.key(0)), x)
    with pytest.raises(ValueError, match=r"got shape \(3, 2\) with dtype int32"):
        create_ensemble(ENSEMBLE_MODEL, tx, jnp.zeros((3, 2), jnp.int32), x)
    with pytest.raises(ValueError, match=r"typed keys, got shape \(2, 2\)"):
        create_ensemble(ENSEMBLE_MODEL, tx, jax.random.split(KEY, (2, 2)), x)


def test_bad_ensemble_usage():
    single, ensemble, batch = shared_state("mlp"), shared_ensemble(), make_batch()
    with pytest.raises(ValueError, match=r"unstack_ensemble expected an ensemble TrainState.*"
                                         r"step of shape \(\)"):
        unstack_ensemble(single, 0)
    with pytest.raises(IndexError, match=r"member 4 out of range for an ensemble of 4"):
        unstack_ensemble(ensemble, 4)
    with pytest.raises(ValueError, match=r"ensemble_predict expected an ensemble"):
        ensemble_predict(single, batch["inputs"])
    with pytest.raises(ValueError, match=r"make_ensemble_train_step expected an ensemble"):
        make_ensemble_train_step()(single, batch)
    with pytest.raises(ValueError, match=r"same_batch=False\) expected batch arrays of shape "
                                         r"\[members=4, batch, \.\.\.\], got shapes \[\(6, 5\)"):
        make_ensemble_train_step(same_batch=False)(ensemble, batch)
    with pytest.raises(ValueError, match=r"stack_ensemble expected at least one"):
        stack_ensemble([])
