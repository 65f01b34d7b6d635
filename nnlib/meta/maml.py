"""Model-Agnostic Meta-Learning (MAML) as pure functions over any model.

MAML (Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks") learns an *initialization* ``theta`` from which a
few gradient steps on a new task's small support set give a good model for that
task. Each task ``T`` has a support set ``S`` (to adapt on) and a query set
``Q`` (to judge the adapted model on)::

    inner loop (adaptation):   phi_0 = theta
                               phi_{s+1} = phi_s - alpha * grad L_S(phi_s)
    outer loop (meta-update):  theta <- theta - beta * grad_theta  mean_T L_Q(phi_n(theta))

The meta-gradient runs *through* the inner loop. For one inner step,
``d phi / d theta = I - alpha * Hessian L_S(theta)``, so

    grad_theta L_Q(phi) = (I - alpha * H_S(theta)) grad L_Q(phi),

a Hessian-vector product that ``jax.grad`` of a function containing
``jax.grad`` computes exactly (second-order MAML). First-order MAML (FOMAML,
same paper, Section 5.2) drops the Hessian term by treating the inner gradients
as constants (``jax.lax.stop_gradient``): the meta-gradient is then just
``grad L_Q`` evaluated at the adapted parameters. It is cheaper and, on many
problems, nearly as good; the two differ whenever the support loss is curved.

Conventions:

* ``apply_fn(params, x) -> predictions`` is any pure model function, e.g.
  ``lambda p, x: model.apply({"params": p}, x)`` for a linen module (no
  mutable collections: MAML's inner loop has no place for running statistics).
* ``loss_fn(predictions, targets) -> scalar`` is the mean loss over a set, e.g.
  ``nnlib.losses.mean_squared_error`` or ``nnlib.losses.softmax_cross_entropy``.
* A set is a pair ``(inputs, targets)``: one task's support ``x: [shots, ...]``,
  ``y: [shots, ...]``; a batch of tasks adds a leading task axis,
  ``x: [tasks, shots, ...]``.
* Inner steps are full-batch gradient descent on the support set with a fixed
  step size ``inner_lr`` (the paper's ``alpha``); the number of steps is a
  Python int (it fixes the length of the ``lax.scan`` that unrolls them).

Shapes glossary: T tasks (the meta-batch), K support examples per task,
M query examples per task.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

Params = Any
Set = tuple[Array, Array]  # (inputs [n, ...], targets [n, ...])
ApplyFn = Callable[[Params, Array], Array]
LossFn = Callable[[Array, Array], Array]


# --- validation ------------------------------------------------------------------


def _check_steps(fn: str, inner_steps: Any) -> None:
    if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 0:
        raise ValueError(f"{fn} expected inner_steps to be a Python int >= 0 (the number of "
                         f"gradient steps on the support set), got {inner_steps!r}")


def _check_set(fn: str, name: str, data: Any, *, task_axis: bool) -> None:
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise TypeError(f"{fn} expected {name} to be a pair (inputs, targets), "
                        f"got {type(data).__name__}")
    x, y = data
    layout = "[tasks, shots, ...]" if task_axis else "[shots, ...]"
    rank = 2 if task_axis else 1
    for part, value in (("inputs", x), ("targets", y)):
        if getattr(value, "ndim", 0) < rank:
            raise ValueError(f"{fn} expected {name} {part} of shape {layout}, got shape "
                             f"{getattr(value, 'shape', None)}")
    leading, axes = (2, "[tasks, shots]") if task_axis else (1, "[shots]")
    if x.shape[:leading] != y.shape[:leading]:
        raise ValueError(f"{fn} expected {name} inputs and targets to share their leading "
                         f"{axes} axes, got shapes {x.shape} and {y.shape}")


# --- one task --------------------------------------------------------------------


def task_loss(params: Params, data: Set, *, loss_fn: LossFn, apply_fn: ApplyFn
              ) -> Float[Array, ""]:
    """``loss_fn(apply_fn(params, x), y)`` on one set ``data = (x [n, ...], y [n, ...])``."""
    x, y = data
    return loss_fn(apply_fn(params, x), y)


def _sgd_step(params: Params, support: Set, *, loss_fn: LossFn, apply_fn: ApplyFn,
              inner_lr: Any, first_order: bool) -> Params:
    grads = jax.grad(task_loss)(params, support, loss_fn=loss_fn, apply_fn=apply_fn)
    if first_order:
        # FOMAML: the inner gradient is a constant to the outer derivative, so
        # d phi / d theta = I and the Hessian-vector product disappears.
        grads = jax.lax.stop_gradient(grads)
    return jax.tree.map(lambda p, g: p - inner_lr * g, params, grads)


def inner_adapt(
    params: Params,
    support: Set,
    *,
    loss_fn: LossFn,
    apply_fn: ApplyFn,
    inner_lr: float | Float[Array, ""],
    inner_steps: int,
    first_order: bool = False,
) -> Params:
    """Adapts ``params`` to one task: ``inner_steps`` of gradient descent on its support set.

    Differentiable in ``params``: ``jax.grad`` of a function of the result
    differentiates through every inner step, Hessian terms included (second-
    order MAML), unless ``first_order=True``, which stops the gradient of each
    inner gradient (FOMAML).

    Args:
      params: the initialization ``theta`` (any pytree ``apply_fn`` accepts).
      support: ``(x [K, ...], y [K, ...])``, one task's support set.
      loss_fn: ``(predictions, targets) -> scalar`` mean loss.
      apply_fn: ``(params, x) -> predictions``.
      inner_lr: the inner step size ``alpha`` (a float or a scalar array).
      inner_steps: number of gradient steps (a Python int; 0 returns ``params``).
      first_order: drop the second-order terms from the meta-gradient.

    Returns:
      The adapted parameters ``phi``, same pytree structure as ``params``.
    """
    _check_steps("inner_adapt", inner_steps)
    _check_set("inner_adapt", "support", support, task_axis=False)
    step = functools.partial(_sgd_step, support=support, loss_fn=loss_fn, apply_fn=apply_fn,
                             inner_lr=inner_lr, first_order=first_order)
    # scan, not a Python loop: one traced step whatever inner_steps is, so
    # compile time stays flat when evaluating with many steps.
    adapted, _ = jax.lax.scan(lambda p, _: (step(p), None), params, None, length=inner_steps)
    return adapted


def adaptation_curve(
    params: Params,
    support: Set,
    query: Set,
    *,
    loss_fn: LossFn,
    apply_fn: ApplyFn,
    inner_lr: float | Float[Array, ""],
    inner_steps: int,
    metric_fn: LossFn | None = None,
) -> dict[str, Float[Array, " steps_plus_one"]]:
    """Support and query loss of one task after 0, 1, ..., ``inner_steps`` inner steps.

    For evaluation (no meta-gradient is needed, so no second-order work is
    kept). ``jax.vmap`` it over a task axis to evaluate many tasks at once.

    Args:
      params: the initialization.
      support: ``(x [K, ...], y [K, ...])`` to adapt on.
      query: ``(x [M, ...], y [M, ...])`` to evaluate on.
      loss_fn, apply_fn, inner_lr, inner_steps: as in ``inner_adapt``.
      metric_fn: optional ``(predictions, targets) -> scalar`` also reported on
        the query set (e.g. accuracy).

    Returns:
      ``{"support_loss": [inner_steps + 1], "query_loss": [inner_steps + 1]}``
      (entry ``s`` after ``s`` steps), plus ``"query_metric"`` with ``metric_fn``.
    """
    _check_steps("adaptation_curve", inner_steps)
    _check_set("adaptation_curve", "support", support, task_axis=False)
    _check_set("adaptation_curve", "query", query, task_axis=False)

    def measure(p):
        out = {"support_loss": task_loss(p, support, loss_fn=loss_fn, apply_fn=apply_fn),
               "query_loss": task_loss(p, query, loss_fn=loss_fn, apply_fn=apply_fn)}
        if metric_fn is not None:
            out["query_metric"] = task_loss(p, query, loss_fn=metric_fn, apply_fn=apply_fn)
        return out

    def step(p, _):
        p = _sgd_step(p, support, loss_fn=loss_fn, apply_fn=apply_fn, inner_lr=inner_lr,
                      first_order=True)
        return p, measure(p)

    _, after = jax.lax.scan(step, params, None, length=inner_steps)
    before = measure(params)
    return jax.tree.map(lambda b, a: jnp.concatenate([b[None], a]), before, after)


# --- a batch of tasks ------------------------------------------------------------


def maml_loss(
    params: Params,
    support: Set,
    query: Set,
    *,
    loss_fn: LossFn,
    apply_fn: ApplyFn,
    inner_lr: float | Float[Array, ""],
    inner_steps: int,
    first_order: bool = False,
    task_batching: str = "vmap",
) -> Float[Array, ""]:
    """The MAML objective: mean over tasks of the query loss after adapting on the support.

    ``jax.grad`` of it with respect to ``params`` is the meta-gradient
    (second order by default; FOMAML's with ``first_order=True``).

    Args:
      params: the initialization ``theta``.
      support: ``(x [T, K, ...], y [T, K, ...])``, one support set per task.
      query: ``(x [T, M, ...], y [T, M, ...])``, one query set per task.
      loss_fn, apply_fn, inner_lr, inner_steps, first_order: as in ``inner_adapt``.
      task_batching: ``"vmap"`` (all tasks at once) or ``"map"`` (``lax.map``,
        one task after another; same value and gradient). After the inner
        step every task has its own parameters, and ``vmap`` of a convolution
        with per-task kernels becomes a grouped convolution, which XLA's CPU
        backend runs several times slower than a loop of ordinary ones
        (measured: 5x for a 2-block CNN on 8x8 digits). Dense layers batch
        well; keep ``"vmap"`` for MLPs and on accelerators.

    Returns:
      Scalar ``mean_T L_Q(phi_T)``.
    """
    _check_steps("maml_loss", inner_steps)
    if task_batching not in ("vmap", "map"):
        raise ValueError(f"maml_loss expected task_batching 'vmap' or 'map', "
                         f"got {task_batching!r}")
    _check_set("maml_loss", "support", support, task_axis=True)
    _check_set("maml_loss", "query", query, task_axis=True)
    if support[0].shape[0] != query[0].shape[0]:
        raise ValueError(f"maml_loss expected as many support sets as query sets, got "
                         f"{support[0].shape[0]} and {query[0].shape[0]} tasks")

    def one_task(s, q):
        adapted = inner_adapt(params, s, loss_fn=loss_fn, apply_fn=apply_fn, inner_lr=inner_lr,
                              inner_steps=inner_steps, first_order=first_order)
        return task_loss(adapted, q, loss_fn=loss_fn, apply_fn=apply_fn)

    if task_batching == "map":
        return jnp.mean(jax.lax.map(lambda sq: one_task(*sq), (support, query)))  # mean of [T]
    return jnp.mean(jax.vmap(one_task)(support, query))  # mean of [T]


def make_maml_train_step(
    tx: optax.GradientTransformation,
    *,
    loss_fn: LossFn,
    apply_fn: ApplyFn,
    inner_lr: float,
    inner_steps: int = 1,
    first_order: bool = False,
    task_batching: str = "vmap",
) -> Callable[[Params, Any, Set, Set], tuple[Params, Any, dict[str, Array]]]:
    """A jit-compiled meta-training step: one optax update of the initialization.

    Args:
      tx: the outer (meta) optimizer, e.g. ``optax.adam(1e-3)`` as in Finn et al.
      loss_fn, apply_fn, inner_lr, inner_steps, first_order: as in ``inner_adapt``.
      task_batching: as in ``maml_loss``.

    Returns:
      ``step(params, opt_state, support, query) -> (params, opt_state, metrics)``
      with ``support``/``query`` batched over tasks (``[T, K, ...]``) and
      ``metrics = {"meta_loss": mean post-adaptation query loss,
      "query_loss_before": mean query loss of the unadapted initialization,
      "meta_grad_norm": global norm of the meta-gradient}``.
    """
    _check_steps("make_maml_train_step", inner_steps)
    objective = functools.partial(maml_loss, loss_fn=loss_fn, apply_fn=apply_fn,
                                  inner_lr=inner_lr, inner_steps=inner_steps,
                                  first_order=first_order, task_batching=task_batching)

    @jax.jit
    def step(params, opt_state, support, query):
        meta_loss, grads = jax.value_and_grad(objective)(params, support, query)
        before = jnp.mean(jax.vmap(lambda q: task_loss(params, q, loss_fn=loss_fn,
                                                       apply_fn=apply_fn))(query))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"meta_loss": meta_loss, "query_loss_before": before,
                                   "meta_grad_norm": optax.tree.norm(grads)}

    return step
