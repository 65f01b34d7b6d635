"""FGSM, PGD, robust accuracy and adversarial training against closed forms,
numpy references and properties every correct attack has.

Independent truths used here: the input gradient of a linear softmax model in
closed form (so FGSM and one L2 PGD step are computed by hand in numpy), the
Euclidean projections onto the L-inf / L2 balls written in numpy, the
distribution of a uniform point in a ball (radius CDF r**d), and the
definitions themselves (inside the ball, inside the pixel range, loss goes up;
robust accuracy is at most clean accuracy and falls as epsilon grows). The
adversarial train step is checked against its documented composition: public
``pgd`` with the documented key, then ``make_train_step``'s step.

Speed: one small digits MLP is trained once for the file (jitted init and
steps); attacks take ``jax.tree_util.Partial(apply, variables)`` so a compiled
attack is reused across parameter values.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.tree_util import Partial

from nnlib.data import load_digits
from nnlib.layers import MLP
from nnlib.layers._checks import ShapeError
from nnlib.robust import (
    fgsm,
    make_adversarial_train_step,
    pgd,
    project_onto_ball,
    robust_accuracy,
)
from nnlib.train import TrainState, make_train_step

KEY = jax.random.key(0)


@pytest.fixture
def strict():
    # Attacks must not rely on implicit promotion (optax's Adam does, so
    # training runs outside this).
    with jax.numpy_dtype_promotion("strict"):
        yield


# --- shared models -----------------------------------------------------------------


def _create_state(model, x, tx, seed=0):
    return jax.jit(lambda k: TrainState.create(model=model, tx=tx, key=k, example_input=x[:1]))(
        jax.random.key(seed))


@pytest.fixture(scope="module")
def digits():
    """A 64-32-10 MLP trained ~99% train accuracy on the 8x8 digits."""
    ds = load_digits(flatten=True)
    x, y = ds.train["inputs"], ds.train["labels"]
    state = _create_state(MLP((32,), 10), x, optax.adam(1e-2))
    step = jax.jit(make_train_step())
    rng = np.random.default_rng(0)
    for _ in range(250):
        idx = rng.choice(len(x), 128, replace=False)
        state, _ = step(state, {"inputs": x[idx], "labels": y[idx]})
    model_fn = Partial(state.apply_fn, state.variables)
    return model_fn, ds.test["inputs"], ds.test["labels"]


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_cross_entropy(logits, labels):
    return -_np_log_softmax(np.asarray(logits, np.float64))[np.arange(len(labels)), labels]


def _linear(w, b):
    """logits = x @ w + b as a Partial, so its arrays are traced arguments."""
    return Partial(lambda w, b, x: x.reshape(x.shape[0], -1) @ w + b, jnp.asarray(w),
                   jnp.asarray(b))


# --- the epsilon-ball and the pixel range --------------------------------------


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 5), features=st.sampled_from([(3,), (7,), (2, 3, 2)]),
       norm=st.sampled_from(["linf", "l2"]), epsilon=st.sampled_from([0.0, 0.05, 0.3, 2.0]),
       seed=st.integers(0, 100))
def test_pgd_stays_in_ball_and_pixel_range(batch, features, norm, epsilon, seed):
    with jax.numpy_dtype_promotion("strict"):
        _check_ball_and_range(batch, features, norm, epsilon, seed)


def _check_ball_and_range(batch, features, norm, epsilon, seed):
    rng = np.random.default_rng(seed)
    d = int(np.prod(features))
    # Pixels at the range's edges too, so clipping is exercised.
    x = rng.choice([0.0, 0.02, 0.5, 0.97, 1.0], size=(batch, *features)).astype(np.float32)
    labels = rng.integers(0, 3, batch).astype(np.int32)
    model_fn = _linear(rng.normal(size=(d, 3)).astype(np.float32), np.zeros(3, np.float32))
    x_adv = np.asarray(pgd(model_fn, x, labels, epsilon=epsilon, step_size=0.1, num_steps=3,
                           norm=norm, key=jax.random.key(seed)))
    delta = (x_adv - x).reshape(batch, -1)
    if norm == "linf":
        assert np.abs(delta).max() <= epsilon + 1e-6
    else:
        assert np.all(np.sqrt((delta.astype(np.float64) ** 2).sum(1)) <= epsilon + 1e-5)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    x_fgsm = np.asarray(fgsm(model_fn, x, labels, epsilon))
    assert np.abs(x_fgsm - x).max() <= epsilon + 1e-6
    assert x_fgsm.min() >= 0.0 and x_fgsm.max() <= 1.0


def test_unbounded_range_is_not_clipped(strict):
    x = np.array([[-3.0, 5.0]], np.float32)
    w = np.array([[1.0, -1.0], [-1.0, 1.0]], np.float32)
    x_adv = fgsm(_linear(w, np.zeros(2, np.float32)), x, np.array([0], np.int32), 0.5,
                 clip_min=None, clip_max=None)
    # Label 0, wrong class 1: direction sign(w[:, 1] - w[:, 0]) = (-1, +1).
    np.testing.assert_allclose(x_adv, [[-3.5, 5.5]])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_project_onto_ball_matches_numpy(strict, norm):
    rng = np.random.default_rng(1)
    delta = (rng.normal(size=(6, 2, 3)) * rng.choice([0.01, 1.0], size=(6, 1, 1))).astype(
        np.float32)
    eps = 0.4
    if norm == "linf":
        expected = np.minimum(np.maximum(delta, -eps), eps)
    else:
        expected = np.empty_like(delta)
        for i, row in enumerate(delta):
            r = np.sqrt(np.sum(row.astype(np.float64) ** 2))
            expected[i] = row if r <= eps else row * (eps / r)
    np.testing.assert_allclose(project_onto_ball(delta, eps, norm=norm), expected, rtol=1e-6,
                               atol=1e-7)


# --- closed forms on a linear softmax model ------------------------------------


def _binary_linear(seed=0, n=5, d=4):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, 2)).astype(np.float32)
    b = rng.normal(size=2).astype(np.float32)
    x = rng.uniform(0.2, 0.8, size=(n, d)).astype(np.float32)
    y = rng.integers(0, 2, n).astype(np.int32)
    return w, b, x, y


def test_fgsm_on_logistic_model_matches_closed_form(strict):
    # d CE / dx = W (softmax - onehot(y)) = p_wrong * (w_wrong - w_true) for two
    # classes, so the sign step is sign(w_wrong - w_true) whatever p is.
    w, b, x, y = _binary_linear()
    eps = 0.1
    direction = np.sign(w[:, 1 - y].T - w[:, y].T)  # [n, d]
    expected = np.clip(x + eps * direction, 0, 1)
    model_fn = _linear(w, b)
    np.testing.assert_allclose(fgsm(model_fn, x, y, eps), expected, atol=1e-7)
    # Targeting the wrong class descends its loss: the same direction.
    np.testing.assert_allclose(fgsm(model_fn, x, 1 - y, eps, targeted=True), expected, atol=1e-7)


def test_fgsm_multiclass_linear_matches_closed_form(strict):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 4)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    x = rng.uniform(0, 1, size=(7, 6)).astype(np.float32)
    y = rng.integers(0, 4, 7).astype(np.int32)
    logits = x.astype(np.float64) @ w + b
    p = np.exp(_np_log_softmax(logits))
    grad = (p - np.eye(4)[y]) @ w.T.astype(np.float64)  # [n, d]
    np.testing.assert_allclose(fgsm(_linear(w, b), x, y, 0.07),
                               np.clip(x + 0.07 * np.sign(grad), 0, 1), atol=1e-7)


def test_one_l2_pgd_step_on_linear_model_matches_numpy(strict):
    rng = np.random.default_rng(4)
    w = rng.normal(size=(5, 3)).astype(np.float32)
    b = np.zeros(3, np.float32)
    x = rng.uniform(0.3, 0.7, size=(4, 5)).astype(np.float32)
    y = rng.integers(0, 3, 4).astype(np.int32)
    p = np.exp(_np_log_softmax(x.astype(np.float64) @ w))
    grad = (p - np.eye(3)[y]) @ w.T.astype(np.float64)
    unit = grad / np.linalg.norm(grad, axis=1, keepdims=True)
    # A step of 0.5 overshoots the ball of radius 0.2: projection brings it back to 0.2 * unit.
    for step_size, eps in [(0.1, 0.2), (0.5, 0.2)]:
        expected = np.clip(x + min(step_size, eps) * unit, 0, 1)
        x_adv = pgd(_linear(w, b), x, y, epsilon=eps, step_size=step_size, num_steps=1,
                    norm="l2", random_start=False)
        np.testing.assert_allclose(x_adv, expected, rtol=1e-5, atol=1e-6)


def test_l2_geometry_in_float16_matches_numpy(strict):
    # float16 flushes squares under 6e-8 to 0 and overflows sums past 65504: the norms
    # must be taken wider, or a small gradient's direction is inf and a large delta's 0.
    rng = np.random.default_rng(5)
    w = (rng.normal(size=(64, 3)) * 1e-4).astype(np.float32)  # input gradients ~1e-4
    x = rng.uniform(0.3, 0.7, size=(2, 64)).astype(np.float16)
    y = np.array([0, 1], np.int32)
    x64 = x.astype(np.float64)
    p = np.exp(_np_log_softmax(x64 @ w))
    grad = (p - np.eye(3)[y]) @ w.T.astype(np.float64)
    expected = x64 + 0.1 * grad / np.linalg.norm(grad, axis=1, keepdims=True)
    model = lambda v: v.astype(jnp.float32) @ jnp.asarray(w)  # noqa: E731
    x_adv = pgd(model, jnp.asarray(x), y, epsilon=0.5, step_size=0.1, num_steps=1,
                norm="l2", random_start=False)
    assert x_adv.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(x_adv, np.float64), expected, atol=2e-3)
    delta = np.full((1, 1000), 20.0, np.float16)  # norm 632, sum of squares 4e5
    projected = project_onto_ball(jnp.asarray(delta), 1.0, norm="l2")
    np.testing.assert_allclose(np.asarray(projected, np.float64), 1000**-0.5, rtol=1e-3)
    big = jnp.full((1, 3, 224, 224), 0.5, jnp.float16)  # a unit Gaussian's squares sum to 1.5e5
    x_start = pgd(lambda v: v.reshape(1, -1)[:, :3].astype(jnp.float32), big,
                  np.array([0], np.int32), epsilon=0.5, step_size=0.1, num_steps=0,
                  norm="l2", random_start=True, key=KEY, clip_min=None, clip_max=None)
    # (x + delta is rounded to float16 steps of 2.4e-4 near 0.5: the norm is near, not <=, 0.5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(x_start - big, np.float64)), 0.5,
                               rtol=0.02)


# --- random start ------------------------------------------------------------------


def test_random_start_is_uniform_in_the_ball(strict):
    n, eps = 4000, 0.3
    x = np.full((n, 2), 0.5, np.float32)
    labels = np.zeros(n, np.int32)
    model_fn = _linear(np.ones((2, 2), np.float32), np.zeros(2, np.float32))
    start = functools.partial(pgd, model_fn, x, labels, epsilon=eps, step_size=0.1, num_steps=0,
                              key=jax.random.key(5))
    d_inf = np.asarray(start(norm="linf")) - x
    # Uniform on [-eps, eps]: mean 0, variance eps^2 / 3.
    assert abs(d_inf.mean()) < 0.01
    np.testing.assert_allclose(d_inf.var(), eps**2 / 3, rtol=0.05)
    assert np.abs(d_inf).max() <= eps + 1e-6
    # Uniform in the 2-d disc: P(r <= eps * s) = s^2, E[r] = eps * 2/3, angle uniform.
    d_2 = np.asarray(start(norm="l2")) - x
    r = np.linalg.norm(d_2, axis=1)
    assert r.max() <= eps + 1e-5
    np.testing.assert_allclose(np.mean(r <= eps / 2), 0.25, atol=0.03)
    np.testing.assert_allclose(r.mean(), eps * 2 / 3, rtol=0.03)
    np.testing.assert_allclose(np.mean(d_2[:, 0] > 0), 0.5, atol=0.03)


# --- on a trained digits MLP ------------------------------------------------------


def test_pgd_raises_loss_and_targeted_lowers_target_loss(strict, digits):
    model_fn, x, y = digits
    x, y = x[:64], y[:64]
    clean = _np_cross_entropy(model_fn(x), y)
    for norm, eps, alpha in [("linf", 0.1, 0.03), ("l2", 1.0, 0.3)]:
        x_adv, losses = pgd(model_fn, x, y, epsilon=eps, step_size=alpha, num_steps=5, norm=norm,
                            random_start=False, return_losses=True)
        adv = _np_cross_entropy(model_fn(x_adv), y)
        assert adv.mean() > clean.mean() + 1.0
        assert np.mean(adv >= clean - 1e-5) > 0.95
        # losses[0] is the clean point's mean loss; later iterates climb.
        np.testing.assert_allclose(losses[0], clean.mean(), rtol=1e-5)
        assert losses[-1] > losses[0]
    target = (y + 1) % 10
    x_t = pgd(model_fn, x, target, epsilon=0.2, step_size=0.05, num_steps=8, targeted=True,
              key=KEY)
    before = _np_cross_entropy(model_fn(x), target)
    after = _np_cross_entropy(model_fn(x_t), target)
    assert after.mean() < before.mean() - 1.0
    assert np.mean(np.argmax(model_fn(x_t), -1) == target) > 0.3


def test_one_step_pgd_without_random_start_is_fgsm(strict, digits):
    model_fn, x, y = digits
    x, y = x[:32], y[:32]
    for targeted in (False, True):
        a = pgd(model_fn, x, y, epsilon=0.07, step_size=0.07, num_steps=1, random_start=False,
                targeted=targeted)
        np.testing.assert_array_equal(a, fgsm(model_fn, x, y, 0.07, targeted=targeted))


def test_pgd_is_a_deterministic_function_of_the_key(strict, digits):
    model_fn, x, y = digits
    x, y = x[:16], y[:16]
    attack = functools.partial(pgd, model_fn, x, y, epsilon=0.1, step_size=0.03, num_steps=3)
    a, b = attack(key=jax.random.key(1)), attack(key=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, attack(key=jax.random.key(2)))
    # Without a random start the key is not used.
    np.testing.assert_array_equal(attack(random_start=False, key=jax.random.key(1)),
                                  attack(random_start=False))


def test_closure_model_jit_and_traced_epsilon_agree(strict, digits):
    model_fn, x, y = digits
    x, y = x[:16], y[:16]
    eager = pgd(model_fn, x, y, epsilon=0.1, step_size=0.03, num_steps=3, key=KEY)
    closure = pgd(lambda v: model_fn(v), x, y, epsilon=0.1, step_size=0.03, num_steps=3, key=KEY)
    jitted = jax.jit(lambda e: pgd(model_fn, x, y, epsilon=e, step_size=0.03, num_steps=3,
                                   key=KEY))(jnp.float32(0.1))
    np.testing.assert_array_equal(eager, closure)
    np.testing.assert_allclose(eager, jitted, atol=1e-6)


def test_robust_accuracy_below_clean_and_falls_with_epsilon(digits):
    model_fn, x, y = digits
    clean_np = np.mean(np.argmax(np.asarray(model_fn(x)), -1) == y)
    clean = robust_accuracy(model_fn, x, y, None, 128)
    np.testing.assert_allclose(clean, clean_np)
    assert clean > 0.9
    accs = [clean]
    for eps in (0.03, 0.1, 0.2):
        attack = functools.partial(pgd, epsilon=eps, step_size=eps / 4, num_steps=10)
        accs.append(robust_accuracy(model_fn, x, y, attack, 128, key=KEY))
    assert all(a >= b for a, b in zip(accs, accs[1:], strict=False)), accs
    assert accs[-1] < 0.2 < accs[1], accs
    # Padding the last batch changes nothing: 359 = 2 * 128 + 103 vs one batch of 359.
    fgsm_attack = functools.partial(fgsm, epsilon=0.1)
    by_batches = robust_accuracy(model_fn, x, y, fgsm_attack, 128)
    fgsm_np = np.mean(np.argmax(np.asarray(model_fn(fgsm(model_fn, x, y, 0.1))), -1) == y)
    np.testing.assert_allclose(by_batches, fgsm_np)
    assert by_batches <= clean


def test_robust_accuracy_compiles_once_per_model_attack_and_shape(strict, digits):
    """A second call with the same shapes traces (so compiles) nothing new: not for a
    rebuilt ``functools.partial`` attack, not for new parameter values; a new
    Python-valued epsilon does compile anew, a traced (array) epsilon does not."""
    model_fn, x, y = digits
    x, y = x[:40], y[:40]
    traces = []

    def counting_apply(variables, inputs):  # its body runs only while jax traces
        traces.append(inputs.shape)
        return model_fn.func(variables, inputs)

    def attack(epsilon):  # rebuilt on every call, as a user would
        return functools.partial(pgd, epsilon=epsilon, step_size=0.05, num_steps=2)

    def reference(variables, epsilon):  # the public pgd, batch by batch, no padding
        f = Partial(model_fn.func, variables)
        hits = [np.argmax(np.asarray(f(pgd(f, x[i:i + 20], y[i:i + 20], epsilon=epsilon,
                                            step_size=0.05, num_steps=2,
                                            key=jax.random.fold_in(KEY, i // 20)))), -1)
                == y[i:i + 20] for i in (0, 20)]
        return np.mean(np.concatenate(hits))

    variables = model_fn.args[0]
    first = robust_accuracy(Partial(counting_apply, variables), x, y, attack(0.1), 20, key=KEY)
    compiled = len(traces)
    assert compiled > 0
    assert first == reference(variables, 0.1)
    moved = jax.tree.map(lambda v: 1.5 * v, variables)  # new values, same shapes
    again = robust_accuracy(Partial(counting_apply, moved), x, y, attack(0.1), 20, key=KEY)
    assert len(traces) == compiled
    assert again == reference(moved, 0.1)
    # The attack's Python arguments are part of the program: epsilon 0.2 compiles anew
    # (reusing epsilon 0.1's program would be a silent bug).
    wider = robust_accuracy(Partial(counting_apply, variables), x, y, attack(0.2), 20, key=KEY)
    assert len(traces) > compiled
    assert wider == reference(variables, 0.2)
    # Array arguments are traced: one program for every radius.
    traced = robust_accuracy(Partial(counting_apply, variables), x, y,
                             attack(jnp.float32(0.1)), 20, key=KEY)
    compiled = len(traces)
    traced_wider = robust_accuracy(Partial(counting_apply, variables), x, y,
                                   attack(jnp.float32(0.2)), 20, key=KEY)
    assert len(traces) == compiled
    assert (traced, traced_wider) == (first, wider)
    # Clean accuracy, and a lambda attack (keyed by identity), compile once too.
    one_step = lambda f, xb, yb: fgsm(f, xb, yb, 0.1)  # noqa: E731
    runs = [(robust_accuracy(Partial(counting_apply, variables), x, y, None, 20),
             robust_accuracy(Partial(counting_apply, variables), x, y, one_step, 20))]
    compiled = len(traces)
    runs.append((robust_accuracy(Partial(counting_apply, variables), x, y, None, 20),
                 robust_accuracy(Partial(counting_apply, variables), x, y, one_step, 20)))
    assert len(traces) == compiled
    clean = np.mean(np.argmax(np.asarray(model_fn(x)), -1) == y)
    fgsm_acc = np.mean(np.argmax(np.asarray(model_fn(fgsm(model_fn, x, y, 0.1))), -1) == y)
    assert runs == [(clean, fgsm_acc)] * 2


# --- adversarial training ------------------------------------------------------------


@pytest.fixture(scope="module")
def small_state():
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, size=(12, 6)).astype(np.float32)
    y = rng.integers(0, 3, 12).astype(np.int32)
    # Dropout checks that the train step's dropout key is make_train_step's.
    state = _create_state(MLP((16,), 3, dropout_rate=0.3), x, optax.adam(1e-2), seed=3)
    return state.replace(step=jnp.asarray(5, jnp.int32)), {"inputs": x, "labels": y}


@pytest.mark.parametrize(("norm", "mix"), [("linf", 1.0), ("l2", 0.5)])
def test_adversarial_step_is_pgd_then_train_step(small_state, norm, mix):
    state, batch = small_state
    eps, alpha, steps = (0.1, 0.04, 4) if norm == "linf" else (0.5, 0.2, 4)
    step = jax.jit(make_adversarial_train_step(epsilon=eps, step_size=alpha, num_steps=steps,
                                               norm=norm, mix=mix))
    new, metrics = step(state, batch)

    # The documented composition: attack key = fold_in(step_key, len(rng_streams)).
    k = round(mix * 12)
    step_key = jax.random.fold_in(state.rng, state.step)
    model_fn = Partial(state.apply_fn, state.variables, train=False)
    x_adv = pgd(model_fn, batch["inputs"][:k], batch["labels"][:k], epsilon=eps,
                step_size=alpha, num_steps=steps, norm=norm,
                key=jax.random.fold_in(step_key, 1))
    mixed = np.concatenate([np.asarray(x_adv), batch["inputs"][k:]])
    ref, ref_metrics = jax.jit(make_train_step())(state, {**batch, "inputs": mixed})

    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert int(new.step) == 6
    for name in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-6)
    clean_logits = np.asarray(model_fn(batch["inputs"]))
    adv_logits = np.asarray(model_fn(x_adv))
    np.testing.assert_allclose(metrics["clean_loss"],
                               _np_cross_entropy(clean_logits, batch["labels"]).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["clean_accuracy"],
                               np.mean(clean_logits.argmax(-1) == batch["labels"]))
    np.testing.assert_allclose(metrics["adversarial_loss"],
                               _np_cross_entropy(adv_logits, batch["labels"][:k]).mean(),
                               rtol=1e-5)
    assert metrics["adversarial_loss"] > metrics["clean_loss"]
    assert bool(metrics["finite"])


@pytest.fixture(scope="module")
def plain_state(small_state):
    # No dropout (with no random start below): both would draw numbers per row,
    # so a batch's layout would change them.
    _, batch = small_state
    return _create_state(MLP((16,), 3), batch["inputs"], optax.adam(1e-2), seed=3), batch


def test_adversarial_step_ignores_masked_rows(plain_state):
    state, batch = plain_state
    step = jax.jit(make_adversarial_train_step(epsilon=0.1, step_size=0.04, num_steps=3,
                                               random_start=False))
    real = {k: v[:8] for k, v in batch.items()}
    full, m_full = step(state, real)
    padded = {"inputs": np.concatenate([real["inputs"], 1 - batch["inputs"][8:]]),
              "labels": np.concatenate([real["labels"], (batch["labels"][8:] + 1) % 3]),
              "mask": np.array([1.0] * 8 + [0.0] * 4, np.float32)}
    pad, m_pad = step(state, padded)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(pad.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for name in ("loss", "clean_loss", "adversarial_loss", "adversarial_accuracy"):
        np.testing.assert_allclose(m_full[name], m_pad[name], rtol=1e-5)


def test_adversarial_step_over_a_device_axis_equals_the_whole_batch(plain_state):
    state, batch = plain_state
    kwargs = dict(epsilon=0.1, step_size=0.04, num_steps=3, random_start=False)
    whole, m_whole = jax.jit(make_adversarial_train_step(**kwargs))(state, batch)
    per_device = make_adversarial_train_step(**kwargs, axis_name="devices",
                                             gradient_reduction="gradients")
    shards = jax.tree.map(lambda a: a.reshape(2, 6, *a.shape[1:]), batch)  # [devices, B/2, ...]
    new, m = jax.jit(jax.vmap(per_device, in_axes=(None, 0), axis_name="devices"))(state, shards)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(whole.params), strict=True):
        np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a[1], b, rtol=1e-5, atol=1e-7)
    for name in ("loss", "clean_loss", "clean_accuracy", "adversarial_loss"):
        np.testing.assert_allclose(m[name][0], m_whole[name], rtol=1e-5)


def test_adversarial_training_buys_robustness(digits):
    # Madry et al.'s claim in miniature: same model, same budget, PGD training
    # leaves far more test digits correct under a PGD attack than plain training.
    ds = load_digits(flatten=True)
    x, y = ds.train["inputs"], ds.train["labels"]
    state = _create_state(MLP((32,), 10), x, optax.adam(1e-2))
    step = jax.jit(make_adversarial_train_step(epsilon=0.1, step_size=0.04, num_steps=3))
    rng = np.random.default_rng(0)
    for _ in range(250):
        idx = rng.choice(len(x), 128, replace=False)
        state, metrics = step(state, {"inputs": x[idx], "labels": y[idx]})
    assert metrics["adversarial_accuracy"] <= metrics["clean_accuracy"]
    plain_fn, x_test, y_test = digits
    attack = functools.partial(pgd, epsilon=0.1, step_size=0.025, num_steps=10)
    robust_fn = Partial(state.apply_fn, state.variables)
    plain = robust_accuracy(plain_fn, x_test, y_test, attack, 359, key=KEY)
    robust = robust_accuracy(robust_fn, x_test, y_test, attack, 359, key=KEY)
    assert robust > plain + 0.2, (robust, plain)


# --- errors ------------------------------------------------------------------------


def _tiny():
    x = np.full((2, 3), 0.5, np.float32)
    return _linear(np.ones((3, 2), np.float32), np.zeros(2, np.float32)), x, np.zeros(2, np.int32)


def test_negative_epsilon_raises():
    f, x, y = _tiny()
    with pytest.raises(ValueError, match=r"fgsm expected epsilon >= 0, got -0.1"):
        fgsm(f, x, y, -0.1)
    with pytest.raises(ValueError, match=r"pgd expected epsilon >= 0, got -1.0"):
        pgd(f, x, y, epsilon=-1.0, step_size=0.1, num_steps=1, key=KEY)
    with pytest.raises(ValueError, match=r"project_onto_ball expected epsilon >= 0"):
        project_onto_ball(x, -1.0)
    with pytest.raises(ValueError, match=r"make_adversarial_train_step expected epsilon >= 0"):
        make_adversarial_train_step(epsilon=-0.1, step_size=0.1, num_steps=1)


def test_unknown_norm_raises():
    f, x, y = _tiny()
    with pytest.raises(ValueError, match=r"pgd expected norm 'linf' or 'l2', got 'l1'"):
        pgd(f, x, y, epsilon=0.1, step_size=0.1, num_steps=1, norm="l1", key=KEY)
    with pytest.raises(ValueError, match=r"expected norm 'linf' or 'l2', got 'inf'"):
        make_adversarial_train_step(epsilon=0.1, step_size=0.1, num_steps=1, norm="inf")
    with pytest.raises(ValueError, match=r"project_onto_ball expected norm"):
        project_onto_ball(x, 0.1, norm="l0")


@pytest.mark.parametrize("step_size", [0.0, -0.1, float("nan")])
def test_nonpositive_step_size_raises(step_size):
    f, x, y = _tiny()
    with pytest.raises(ValueError, match=r"pgd expected step_size > 0, got"):
        pgd(f, x, y, epsilon=0.1, step_size=step_size, num_steps=1, key=KEY)
    with pytest.raises(ValueError, match=r"make_adversarial_train_step expected step_size > 0"):
        make_adversarial_train_step(epsilon=0.1, step_size=step_size, num_steps=1)


def test_other_bad_arguments_raise():
    f, x, y = _tiny()
    attack = functools.partial(pgd, f, x, y, epsilon=0.1, step_size=0.1)
    with pytest.raises(ValueError, match=r"random_start=True needs a PRNG key"):
        attack(num_steps=1)
    with pytest.raises(ValueError, match=r"pgd expected num_steps to be an int >= 0, got -1"):
        attack(num_steps=-1, key=KEY)
    with pytest.raises(ValueError, match=r"pgd expected num_steps to be an int >= 0, got 2.5"):
        attack(num_steps=2.5, key=KEY)
    with pytest.raises(ValueError, match=r"pgd expected clip_min <= clip_max, got 1.0 > 0.0"):
        attack(num_steps=1, key=KEY, clip_min=1.0, clip_max=0.0)
    with pytest.raises(ValueError, match=r"pgd expected epsilon to be a scalar, got shape \(2,\)"):
        pgd(f, x, y, epsilon=np.ones(2), step_size=0.1, num_steps=1, key=KEY)
    with pytest.raises(ShapeError, match=r"fgsm expected labels with the batch size of x "
                                         r"\[batch, \.\.\.\] = \(2, 3\), i.e. shape \[2\], got "
                                         r"shape \(3,\)"):
        fgsm(f, x, np.zeros(3, np.int32), 0.1)
    with pytest.raises(TypeError, match=r"fgsm expected floating-point x of shape \[batch, \.\.\.\], got dtype int32"):
        fgsm(f, x.astype(np.int32), y, 0.1)
    with pytest.raises(ValueError, match=r"robust_accuracy expected batch_size to be an int > 0"):
        robust_accuracy(f, x, y, None, 0)
    with pytest.raises(ValueError, match=r"robust_accuracy got no examples"):
        robust_accuracy(f, x[:0], y[:0], None, 4)
    with pytest.raises(ValueError, match=r"expected mix in \(0, 1\] .* got 0.0; for mix=0 use"):
        make_adversarial_train_step(epsilon=0.1, step_size=0.1, num_steps=1, mix=0.0)
    with pytest.raises(ValueError, match=r"make_adversarial_train_step expected num_steps to be "
                                         r"an int >= 1, got 0"):
        make_adversarial_train_step(epsilon=0.1, step_size=0.1, num_steps=0)
