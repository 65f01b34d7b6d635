"""MAML against independent references, and the sinusoid task sampler against numpy.

* Linear model ``f(x) = x w`` with mean squared loss, where everything has a
  closed form (derived below and computed in numpy, float64):

      L_S(w) = (1/K) ||X_S w - y_S||^2,  grad L_S(w) = A_S w - b_S,
      A_S = (2/K) X_S^T X_S,  b_S = (2/K) X_S^T y_S.

  One inner step is affine in w:  w' = M w + alpha b_S,  M = I - alpha A_S,
  so after n steps  dw_n/dw = M^n  and the second-order meta-gradient is

      grad_w L_Q(w_n) = (M^n)^T (A_Q w_n - b_Q)      (M symmetric),

  while first-order MAML keeps only  A_Q w_n - b_Q  (it sets dw_n/dw = I).
  The meta-batch gradient is the mean over tasks.
* A small tanh MLP (smooth, so finite differences are meaningful): the
  second-order meta-gradient passes ``jax.test_util.check_grads`` (central
  finite differences, float64), and the first-order one measurably differs
  (the closed form above pins FOMAML's exact value).
* Inner adaptation lowers the support loss step by step.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from nnlib import losses
from nnlib.meta import (
    adaptation_curve,
    inner_adapt,
    make_maml_train_step,
    maml_loss,
    sample_sinusoid_tasks,
    task_loss,
)


def linear_apply(w, x):
    return x @ w  # [n, d] @ [d] -> [n]


def mse(pred, y):
    return jnp.mean((pred - y) ** 2)


def linear_tasks(rng, tasks=4, shots=5, queries=7, dim=3):
    xs, xq = rng.normal(size=(tasks, shots, dim)), rng.normal(size=(tasks, queries, dim))
    ys, yq = rng.normal(size=(tasks, shots)), rng.normal(size=(tasks, queries))
    return (xs, ys), (xq, yq)


def closed_form_meta_gradient(w, support, query, alpha, steps, first_order):
    """numpy, per the derivation in the module docstring."""
    grads, losses_ = [], []
    for xs, ys, xq, yq in zip(*support, *query, strict=True):
        a_s, b_s = 2 / len(ys) * xs.T @ xs, 2 / len(ys) * xs.T @ ys
        a_q, b_q = 2 / len(yq) * xq.T @ xq, 2 / len(yq) * xq.T @ yq
        m = np.eye(len(w)) - alpha * a_s
        wn = w.copy()
        for _ in range(steps):
            wn = m @ wn + alpha * b_s
        g = a_q @ wn - b_q
        grads.append(g if first_order else np.linalg.matrix_power(m, steps).T @ g)
        losses_.append(np.mean((xq @ wn - yq) ** 2))
    return np.mean(grads, axis=0), np.mean(losses_)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_linear_model_meta_gradient_matches_closed_form(steps, first_order):
    rng = np.random.default_rng(steps)
    support, query = linear_tasks(rng)
    w, alpha = rng.normal(size=3), 0.1
    want_grad, want_loss = closed_form_meta_gradient(w, support, query, alpha, steps,
                                                     first_order)
    with jax.enable_x64(True):
        objective = functools.partial(maml_loss, loss_fn=mse, apply_fn=linear_apply,
                                      inner_lr=alpha, inner_steps=steps,
                                      first_order=first_order)
        loss, grad = jax.value_and_grad(objective)(jnp.asarray(w), support, query)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-12)


def test_first_and_second_order_differ_on_the_linear_model():
    rng = np.random.default_rng(0)
    support, query = linear_tasks(rng)
    w = rng.normal(size=3)
    second, _ = closed_form_meta_gradient(w, support, query, 0.1, 1, first_order=False)
    first, _ = closed_form_meta_gradient(w, support, query, 0.1, 1, first_order=True)
    assert np.linalg.norm(second - first) > 0.05 * np.linalg.norm(second)


def tanh_mlp_params(key, hidden=6):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": jax.random.normal(k1, (1, hidden)), "b1": jax.random.normal(k2, (hidden,)),
            "w2": jax.random.normal(k3, (hidden, 1)) / math.sqrt(hidden), "b2": jnp.zeros(1)}


def tanh_mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def test_second_order_meta_gradient_passes_finite_differences_and_first_order_does_not():
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64),
                              tanh_mlp_params(jax.random.key(0)))
        tasks = sample_sinusoid_tasks(jax.random.key(1), 3, num_support=5, num_query=6)
        support, query = jax.tree.map(lambda a: a.astype(jnp.float64),
                                      (tasks.support, tasks.query))
        objective = functools.partial(maml_loss, support=support, query=query, loss_fn=mse,
                                      apply_fn=tanh_mlp, inner_lr=0.05, inner_steps=2)
        # Central differences vs jax's reverse mode through both inner grads.
        check_grads(jax.jit(objective), (params,), order=1, modes=("rev",), eps=1e-5,
                    atol=1e-6, rtol=1e-6)
        second = jax.jit(jax.grad(objective))(params)
        first = jax.jit(jax.grad(functools.partial(objective, first_order=True)))(params)
        diff = optax.tree.norm(jax.tree.map(jnp.subtract, second, first))
        assert diff > 1e-2 * optax.tree.norm(second)

        # FOMAML's meta-gradient is the query gradient taken at the adapted
        # parameters, treated as a point (no derivative through the inner loop):
        # computed here task by task, without maml_loss.
        def query_grad_at_adapted(s, q):
            adapted = inner_adapt(params, s, loss_fn=mse, apply_fn=tanh_mlp, inner_lr=0.05,
                                  inner_steps=2)
            return jax.grad(task_loss)(adapted, q, loss_fn=mse, apply_fn=tanh_mlp)

        per_task = [query_grad_at_adapted((support[0][t], support[1][t]),
                                          (query[0][t], query[1][t])) for t in range(3)]
        want = jax.tree.map(lambda *g: np.mean(g, axis=0), *per_task)
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_task_batching_by_map_equals_vmap():
    params = tanh_mlp_params(jax.random.key(4))
    tasks = sample_sinusoid_tasks(jax.random.key(5), 3, num_support=4, num_query=5)
    common = dict(loss_fn=mse, apply_fn=tanh_mlp, inner_lr=0.05, inner_steps=1)
    by_vmap = jax.value_and_grad(functools.partial(maml_loss, **common))(
        params, tasks.support, tasks.query)
    by_map = jax.value_and_grad(functools.partial(maml_loss, task_batching="map", **common))(
        params, tasks.support, tasks.query)
    for a, b in zip(jax.tree.leaves(by_map), jax.tree.leaves(by_vmap), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="task_batching 'vmap' or 'map'"):
        maml_loss(params, tasks.support, tasks.query, task_batching="pmap", **common)


def test_inner_adaptation_reduces_support_loss_and_matches_inner_adapt():
    params = tanh_mlp_params(jax.random.key(2), hidden=16)
    tasks = sample_sinusoid_tasks(jax.random.key(3), 1, num_support=10, num_query=20)
    support = (tasks.support[0][0], tasks.support[1][0])
    query = (tasks.query[0][0], tasks.query[1][0])
    common = dict(loss_fn=losses.mean_squared_error, apply_fn=tanh_mlp, inner_lr=0.02)
    curve = jax.jit(functools.partial(adaptation_curve, inner_steps=5, **common))(
        params, support, query)
    assert curve["support_loss"].shape == curve["query_loss"].shape == (6,)
    assert np.all(np.diff(np.asarray(curve["support_loss"])) < 0)
    assert curve["support_loss"][-1] < 0.9 * curve["support_loss"][0]
    # Entry s is the loss after s steps of inner_adapt; entry 0 the unadapted loss (numpy).
    x, y = map(np.asarray, support)
    h = np.tanh(x @ np.asarray(params["w1"]) + np.asarray(params["b1"]))
    pred = h @ np.asarray(params["w2"]) + np.asarray(params["b2"])
    np.testing.assert_allclose(curve["support_loss"][0], np.mean((pred - y) ** 2), rtol=1e-5)
    adapted = jax.jit(functools.partial(inner_adapt, inner_steps=3, **common))(params, support)
    np.testing.assert_allclose(curve["query_loss"][3], task_loss(adapted, query, **{
        k: common[k] for k in ("loss_fn", "apply_fn")}), rtol=1e-5)
    unadapted = inner_adapt(params, support, inner_steps=0, **common)
    for a, b in zip(jax.tree.leaves(unadapted), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_train_step_is_one_optimizer_update_with_the_meta_gradient():
    rng = np.random.default_rng(5)
    support, query = linear_tasks(rng)
    support, query = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), (support, query))
    w = rng.normal(size=3).astype(np.float32)
    want_grad, want_loss = closed_form_meta_gradient(
        w.astype(np.float64), jax.tree.map(np.float64, support),
        jax.tree.map(np.float64, query), 0.1, 1, first_order=False)
    tx = optax.sgd(0.5)
    step = make_maml_train_step(tx, loss_fn=mse, apply_fn=linear_apply, inner_lr=0.1)
    new_w, _, metrics = step(jnp.asarray(w), tx.init(jnp.asarray(w)), support, query)
    np.testing.assert_allclose(new_w, w - 0.5 * want_grad, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["meta_loss"], want_loss, rtol=1e-4)
    np.testing.assert_allclose(metrics["meta_grad_norm"], np.linalg.norm(want_grad), rtol=1e-4)
    before = np.mean([np.mean((xq @ w - yq) ** 2) for xq, yq in zip(*query, strict=True)])
    np.testing.assert_allclose(metrics["query_loss_before"], before, rtol=1e-4)


def test_sinusoid_tasks_follow_finn_et_al():
    tasks = sample_sinusoid_tasks(jax.random.key(0), 500, num_support=5, num_query=3)
    (xs, ys), (xq, yq) = jax.tree.map(np.asarray, (tasks.support, tasks.query))
    amp, phase = np.asarray(tasks.amplitude), np.asarray(tasks.phase)
    assert xs.shape == ys.shape == (500, 5, 1) and xq.shape == yq.shape == (500, 3, 1)
    assert 0.1 <= amp.min() and amp.max() <= 5.0 and amp.std() > 1.2  # U[0.1, 5]: std 1.41
    assert 0 <= phase.min() and phase.max() <= np.pi and phase.std() > 0.8  # U[0, pi]: 0.91
    x = np.concatenate([xs, xq], 1)
    assert -5 <= x.min() and x.max() <= 5 and abs(x.mean()) < 0.2
    np.testing.assert_allclose(ys, amp[:, None, None] * np.sin(xs - phase[:, None, None]),
                               atol=1e-5)
    np.testing.assert_allclose(yq, amp[:, None, None] * np.sin(xq - phase[:, None, None]),
                               atol=1e-5)
    again = sample_sinusoid_tasks(jax.random.key(0), 500, num_support=5, num_query=3)
    np.testing.assert_array_equal(again.support[0], xs)


def test_errors_speak_the_users_language():
    support = (jnp.ones((5, 1)), jnp.ones((5, 1)))
    common = dict(loss_fn=mse, apply_fn=tanh_mlp, inner_lr=0.1)
    params = tanh_mlp_params(jax.random.key(0))
    with pytest.raises(ValueError, match="inner_steps to be a Python int >= 0"):
        inner_adapt(params, support, inner_steps=-1, **common)
    with pytest.raises(ValueError, match="inner_steps"):
        inner_adapt(params, support, inner_steps=1.0, **common)
    with pytest.raises(TypeError, match=r"pair \(inputs, targets\)"):
        inner_adapt(params, jnp.ones((5, 1)), inner_steps=1, **common)
    with pytest.raises(ValueError, match=r"share their leading \[tasks, shots\] axes"):
        maml_loss(params, (jnp.ones((2, 5, 1)), jnp.ones((2, 4, 1))), (jnp.ones((2, 5, 1)),) * 2,
                  inner_steps=1, **common)
    with pytest.raises(ValueError, match="as many support sets as query sets"):
        maml_loss(params, (jnp.ones((2, 5, 1)),) * 2, (jnp.ones((3, 5, 1)),) * 2,
                  inner_steps=1, **common)
