"""Gradient attacks on classifiers: FGSM, PGD (L-infinity and L2), robust accuracy.

An adversarial example is ``x + delta`` with ``delta`` in the epsilon-ball
``{||delta|| <= epsilon}`` that changes the model's answer. The attacks here
follow the gradient of the classification loss with respect to the input:

* **FGSM** (Goodfellow, Shlens & Szegedy 2015, "Explaining and Harnessing
  Adversarial Examples"): one step ``x + epsilon * sign(grad)``.
* **PGD** (Madry et al. 2018, "Towards Deep Learning Models Resistant to
  Adversarial Attacks"): ``num_steps`` steps of size ``step_size`` from a
  random point of the ball, each followed by the projection back onto the ball
  and the valid pixel range. L-infinity steps along ``sign(grad)``; L2 steps
  along ``grad / ||grad||_2`` (per example).

Conventions:

* The model is a function ``model_fn(x) -> logits [batch, classes]`` in
  evaluation mode (no dropout, running BatchNorm statistics), so that each
  example's gradient depends on that example only. Pass it as
  ``jax.tree_util.Partial(model.apply, variables)``: its arrays are then traced
  arguments and one compiled attack serves every parameter value. Any other
  callable (a closure, a lambda) is a static argument of the compiled program:
  its captured arrays are baked in as constants and a new function object
  compiles anew. Inside the caller's own ``jit`` the attack simply inlines.
* The per-example loss is ``loss_fn(logits [B, C], labels [B]) -> [B]``,
  softmax cross-entropy by default. The attack ascends its sum over the batch
  (examples do not interact, and the sum keeps each example's gradient free of
  a 1/batch factor). Untargeted, ``labels`` are the true classes and the loss
  goes up; ``targeted=True``, ``labels`` are the classes to reach and the loss
  goes down.
* ``x`` should already lie in ``[clip_min, clip_max]``; every iterate is
  clipped to that range (``None`` disables either side). Clipping a point of
  the ball moves each coordinate towards ``x``, so it never leaves the ball.
* The result carries no gradient (``lax.stop_gradient``): adversarial training
  differentiates the loss *at* the adversarial point (Danskin's theorem, as in
  Madry et al.), not through the attack.
* ``jnp.sign(0) = 0``: a coordinate with exactly zero gradient is not moved.

Shapes glossary: B batch, C classes, ``...`` the feature axes of one example
(``[64]`` for vectors, ``[H, W, channels]`` for images); norms are taken over
all of them, per example.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from nnlib import losses
from nnlib.layers._checks import ShapeError, check_input

ModelFn = Callable[[Array], Array]
PerExampleLoss = Callable[[Array, Array], Array]
NORMS = ("linf", "l2")

# Keeps 0 / 0 out of the L2 normalizations (a zero gradient or a zero delta).
_TINY = 1e-12


# --- validation ------------------------------------------------------------------


def _is_concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


def _check_positive(fn: str, name: str, value: Any, *, allow_zero: bool) -> None:
    """Checks a scalar hyperparameter when it is known (not traced under jit)."""
    if value is None or not _is_concrete(value):
        return
    if np.ndim(value) != 0:
        raise ValueError(f"{fn} expected {name} to be a scalar, got shape {np.shape(value)}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{fn} expected {name} {bound}, got {v}")


def _check_norm(fn: str, norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"{fn} expected norm 'linf' or 'l2', got {norm!r}")


def _check_clip(fn: str, clip_min: Any, clip_max: Any) -> None:
    if clip_min is None or clip_max is None:
        return
    if _is_concrete(clip_min) and _is_concrete(clip_max) and float(clip_min) > float(clip_max):
        raise ValueError(f"{fn} expected clip_min <= clip_max, got {clip_min} > {clip_max}")


def _check_batch(fn: str, x: Any, labels: Any) -> tuple[Array, Array]:
    x, labels = jnp.asarray(x), jnp.asarray(labels)
    check_input(fn, x, layout="[batch, ...]", min_ndim=1, name="x")
    if labels.ndim < 1 or labels.shape[0] != x.shape[0]:
        raise ShapeError(f"{fn} expected labels with the batch size of x [batch, ...] = "
                         f"{x.shape}, i.e. shape [{x.shape[0]}], got shape {labels.shape}")
    return x, labels


def _check_num_steps(fn: str, num_steps: Any) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or (
            num_steps < 0):
        raise ValueError(f"{fn} expected num_steps to be an int >= 0, got {num_steps!r}")


# --- the model as a compiled-program argument -----------------------------------


def _split_model(model_fn: ModelFn) -> tuple[Any, list[Array]]:
    """(static part, array leaves): a ``Partial(apply, variables)`` passes its
    arrays as traced arguments; functions and Python values stay static."""
    leaves, treedef = jax.tree.flatten(model_fn)
    is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
    static = tuple(None if a else leaf for leaf, a in zip(leaves, is_array, strict=True))
    arrays = [leaf for leaf, a in zip(leaves, is_array, strict=True) if a]
    return (treedef, static), arrays


def _join_model(static: Any, arrays: list[Array]) -> ModelFn:
    treedef, static_leaves = static
    it = iter(arrays)
    return jax.tree.unflatten(treedef, [next(it) if s is None else s for s in static_leaves])


def _cross_entropy(logits: Array, labels: Array) -> Array:
    return losses.softmax_cross_entropy(logits, labels, reduction="none")  # [B]


def _attack_objective(model_fn: ModelFn, loss_fn: PerExampleLoss | None, labels: Array
                      ) -> Callable[[Array], Array]:
    loss_fn = loss_fn or _cross_entropy
    return lambda x_adv: jnp.sum(loss_fn(model_fn(x_adv), labels))


# --- geometry of the epsilon-balls ------------------------------------------------


def _per_example_l2(v: Array) -> Array:
    """``[B, ...] -> [B, 1, ...]`` L2 norms over the feature axes, ready to broadcast.

    In float32 at least (callers cast back): in float16 squares under 6e-8 flush
    to 0, a sum of squares past 65504 overflows, and _TINY itself rounds to 0.
    """
    v = v.astype(np.promote_types(v.dtype, np.float32))  # numpy: no strict-mode error
    return jnp.sqrt(jnp.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))


def project_onto_ball(
    delta: Float[Array, "batch ..."], epsilon: float | Array, *, norm: str = "linf"
) -> Float[Array, "batch ..."]:
    """Euclidean projection of each example's perturbation onto its epsilon-ball.

    L-infinity clips every coordinate to ``[-epsilon, epsilon]``; L2 rescales
    ``delta`` by ``min(1, epsilon / ||delta||_2)`` per example.

    Args:
      delta: ``[B, ...]`` perturbations.
      epsilon: the radius (>= 0).
      norm: ``"linf"`` or ``"l2"``.

    Returns:
      ``[B, ...]``, ``delta`` where it was already inside the ball.
    """
    fn = "project_onto_ball"
    _check_norm(fn, norm)
    _check_positive(fn, "epsilon", epsilon, allow_zero=True)
    delta = jnp.asarray(delta)
    check_input(fn, delta, layout="[batch, ...]", min_ndim=1, name="delta")
    return _project(delta, jnp.asarray(epsilon, delta.dtype), norm)


def _project(delta: Array, epsilon: Array, norm: str) -> Array:
    if norm == "linf":
        return jnp.clip(delta, -epsilon, epsilon)
    length = _per_example_l2(delta)  # [B, 1, ...]
    scale = jnp.minimum(1.0, epsilon.astype(length.dtype) / jnp.maximum(length, _TINY))
    return delta * scale.astype(delta.dtype)


def _steepest_ascent(grad: Array, norm: str) -> Array:
    """The unit-norm direction maximizing ``<grad, d>``: sign for L-inf, normalized for L2."""
    if norm == "linf":
        return jnp.sign(grad)
    length = _per_example_l2(grad)
    return (grad.astype(length.dtype) / jnp.maximum(length, _TINY)).astype(grad.dtype)


def _random_start(key: Array, x: Array, epsilon: Array, norm: str) -> Array:
    """A point drawn uniformly from the ball around each example.

    L-infinity: each coordinate uniform in ``[-epsilon, epsilon]`` (Madry et
    al.). L2 (d = features per example): a direction uniform on the sphere (a
    normalized standard Gaussian) times the radius ``epsilon * U**(1/d)``,
    ``U ~ Uniform(0, 1)``, because the volume within radius r grows as r**d —
    so the point is uniform in the ball, not concentrated at its centre.
    """
    if norm == "linf":
        return jax.random.uniform(key, x.shape, x.dtype, -epsilon, epsilon)
    direction_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(direction_key, x.shape, x.dtype)
    length = _per_example_l2(direction)
    direction = (direction.astype(length.dtype) / jnp.maximum(length, _TINY)).astype(x.dtype)
    d = math.prod(x.shape[1:])
    u = jax.random.uniform(radius_key, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
    return direction * (epsilon * u ** (1.0 / d))


def _clip_range(x: Array, clip_min: Any, clip_max: Any) -> Array:
    if clip_min is None and clip_max is None:
        return x
    # In x's dtype: a float64 bound must not promote float32 inputs.
    lo, hi = (None if v is None else jnp.asarray(v, x.dtype) for v in (clip_min, clip_max))
    return jnp.clip(x, lo, hi)


# --- the attacks -----------------------------------------------------------------


def _pgd_loop(
    objective: Callable[[Array], Array],
    x: Array,
    *,
    epsilon: Any,
    step_size: Any,
    num_steps: int,
    norm: str,
    random_start: bool,
    key: Array | None,
    targeted: bool,
    clip_min: Any,
    clip_max: Any,
) -> tuple[Array, Array]:
    """PGD on any scalar ``objective(x_adv)`` (ascended; descended if ``targeted``).

    The traceable core shared by :func:`pgd` and the adversarial train step;
    arguments are as in :func:`pgd`, already validated. Returns ``(x_adv,
    objective values [num_steps])``, value ``t`` taken at iterate ``t`` (the
    start is iterate 0).
    """
    epsilon = jnp.asarray(epsilon, x.dtype)
    step_size = jnp.asarray(step_size, x.dtype)
    x_adv = x
    if random_start:
        x_adv = _clip_range(x + _random_start(key, x, epsilon, norm), clip_min, clip_max)
    value_and_grad = jax.value_and_grad(objective)

    def step(t, carry):
        x_adv, values = carry
        value, grad = value_and_grad(x_adv)
        direction = _steepest_ascent(grad, norm)
        x_adv = x_adv - step_size * direction if targeted else x_adv + step_size * direction
        x_adv = x + _project(x_adv - x, epsilon, norm)
        x_adv = _clip_range(x_adv, clip_min, clip_max)
        return x_adv, values.at[t].set(value)

    values = jnp.zeros((num_steps,), jax.eval_shape(objective, x_adv).dtype)
    if num_steps > 0:  # the body is traced even for 0 steps, and values[0] would not exist
        x_adv, values = jax.lax.fori_loop(0, num_steps, step, (x_adv, values))
    return jax.lax.stop_gradient(x_adv), values


@functools.partial(jax.jit, static_argnames=("static", "loss_fn", "targeted"))
def _fgsm(static, arrays, x, labels, epsilon, clip_min, clip_max, *, loss_fn, targeted):
    objective = _attack_objective(_join_model(static, arrays), loss_fn, labels)
    direction = jnp.sign(jax.grad(objective)(x))
    step = jnp.asarray(epsilon, x.dtype) * direction
    x_adv = _clip_range(x - step if targeted else x + step, clip_min, clip_max)
    return jax.lax.stop_gradient(x_adv)


def fgsm(
    model_fn: ModelFn,
    x: Float[Array, "batch ..."],
    labels: Int[Array, " batch"],
    epsilon: float | Array,
    *,
    clip_min: float | None = 0.0,
    clip_max: float | None = 1.0,
    targeted: bool = False,
    loss_fn: PerExampleLoss | None = None,
) -> Float[Array, "batch ..."]:
    """Fast gradient sign method (Goodfellow et al. 2015).

    ``x_adv = clip(x + epsilon * sign(grad_x loss), clip_min, clip_max)``;
    targeted: ``x - epsilon * sign(grad_x loss(target))``.

    Args:
      model_fn: ``x [B, ...] -> logits [B, C]`` (see the module doc).
      x: ``[B, ...]`` clean inputs in ``[clip_min, clip_max]``.
      labels: ``[B]`` true classes (targeted: the target classes).
      epsilon: L-infinity radius (>= 0).
      clip_min, clip_max: valid input range (``None``: unbounded).
      targeted: descend the loss of ``labels`` instead of ascending it.
      loss_fn: ``(logits [B, C], labels [B]) -> [B]``; cross-entropy if ``None``.

    Returns:
      ``x_adv: [B, ...]`` with ``max |x_adv - x| <= epsilon``.
    """
    fn = "fgsm"
    x, labels = _check_batch(fn, x, labels)
    _check_positive(fn, "epsilon", epsilon, allow_zero=True)
    _check_clip(fn, clip_min, clip_max)
    static, arrays = _split_model(model_fn)
    return _fgsm(static, arrays, x, labels, epsilon, clip_min, clip_max, loss_fn=loss_fn,
                 targeted=targeted)


@functools.partial(jax.jit, static_argnames=(
    "static", "loss_fn", "num_steps", "norm", "random_start", "targeted"))
def _pgd(static, arrays, x, labels, epsilon, step_size, key, clip_min, clip_max, *, loss_fn,
         num_steps, norm, random_start, targeted):
    objective = _attack_objective(_join_model(static, arrays), loss_fn, labels)
    x_adv, sums = _pgd_loop(objective, x, epsilon=epsilon, step_size=step_size,
                           num_steps=num_steps, norm=norm, random_start=random_start, key=key,
                           targeted=targeted, clip_min=clip_min, clip_max=clip_max)
    return x_adv, sums / x.shape[0]  # summed losses -> mean per example


def pgd(
    model_fn: ModelFn,
    x: Float[Array, "batch ..."],
    labels: Int[Array, " batch"],
    *,
    epsilon: float | Array,
    step_size: float | Array,
    num_steps: int,
    norm: str = "linf",
    random_start: bool = True,
    key: Array | None = None,
    targeted: bool = False,
    clip_min: float | None = 0.0,
    clip_max: float | None = 1.0,
    loss_fn: PerExampleLoss | None = None,
    return_losses: bool = False,
) -> Float[Array, "batch ..."] | tuple[Float[Array, "batch ..."], Float[Array, " num_steps"]]:
    """Projected gradient descent attack (Madry et al. 2018).

    From ``x_0`` (``x``, or a uniform random point of the ball when
    ``random_start``), each of ``num_steps`` steps is::

        x_{t+1} = clip(x + project(x_t + step_size * d_t - x), clip_min, clip_max)

    with ``d_t = sign(g_t)`` (``"linf"``) or ``g_t / ||g_t||_2`` per example
    (``"l2"``), ``g_t`` the loss gradient at ``x_t`` (negated when
    ``targeted``). The loop is one ``lax.fori_loop``. With ``num_steps=1``,
    ``random_start=False`` and ``step_size=epsilon``, L-infinity PGD is FGSM.

    Args:
      model_fn: ``x [B, ...] -> logits [B, C]`` (see the module doc).
      x: ``[B, ...]`` clean inputs in ``[clip_min, clip_max]``.
      labels: ``[B]`` true classes (targeted: the target classes).
      epsilon: radius of the ball (>= 0) in the chosen norm.
      step_size: step length ``alpha`` (> 0) in the chosen norm; a common
        choice is ``2.5 * epsilon / num_steps``, long enough for a path to
        cross the ball from any start.
      num_steps: number of gradient steps (static; 0 returns the start).
      norm: ``"linf"`` or ``"l2"``.
      random_start: start from a uniform random point of the ball.
      key: PRNG key for the random start (required when ``random_start``).
      targeted: descend the loss of ``labels`` instead of ascending it.
      clip_min, clip_max: valid input range (``None``: unbounded).
      loss_fn: ``(logits [B, C], labels [B]) -> [B]``; cross-entropy if ``None``.
      return_losses: also return the mean loss of each iterate.

    Returns:
      ``x_adv: [B, ...]`` inside the ball and the range; with
      ``return_losses`` also ``losses: [num_steps]``, ``losses[t]`` the mean
      per-example loss at iterate ``t`` (the start is iterate 0).
    """
    fn = "pgd"
    x, labels = _check_batch(fn, x, labels)
    _check_norm(fn, norm)
    _check_positive(fn, "epsilon", epsilon, allow_zero=True)
    _check_positive(fn, "step_size", step_size, allow_zero=False)
    _check_num_steps(fn, num_steps)
    _check_clip(fn, clip_min, clip_max)
    if random_start and key is None:
        raise ValueError(f"{fn} with random_start=True needs a PRNG key (key=jax.random.key(0)), "
                         f"or pass random_start=False")
    static, arrays = _split_model(model_fn)
    x_adv, mean_losses = _pgd(static, arrays, x, labels, epsilon, step_size,
                              key if random_start else None, clip_min, clip_max, loss_fn=loss_fn,
                              num_steps=int(num_steps), norm=norm,
                              random_start=bool(random_start), targeted=bool(targeted))
    return (x_adv, mean_losses) if return_losses else x_adv


# --- evaluation ------------------------------------------------------------------


class _ByIdentity:
    """A static-argument key for an unhashable callable: equal only to itself."""

    def __init__(self, value: Any):
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.value is self.value


def _split_callable(fn: Callable[..., Any] | None) -> tuple[Any, list[Array]]:
    """(hashable static part, array leaves) of a model or an attack, for a jit cache key.

    A plain ``functools.partial`` is not a pytree and hashes by identity, so a
    new ``partial(pgd, epsilon=0.1, ...)`` per call would compile anew; it is
    rebuilt as a ``jax.tree_util.Partial``, whose Python arguments
    (``epsilon=0.1``, ``num_steps=10``, ``norm="linf"``) join the key by value
    and whose array arguments are traced (:func:`_split_model`). A callable
    whose static part is unhashable is keyed by identity.
    """
    if fn is None:
        return None, []
    if type(fn) is functools.partial:
        fn = jax.tree_util.Partial(fn.func, *fn.args, **fn.keywords)
    static, arrays = _split_model(fn)
    try:
        hash(static)
    except TypeError:
        return _ByIdentity(fn), []
    return static, arrays


def _join_callable(static: Any, arrays: list[Array]) -> Callable[..., Any]:
    return static.value if isinstance(static, _ByIdentity) else _join_model(static, arrays)


@functools.partial(jax.jit, static_argnames=("model_static", "attack_static"))
def _count_correct(model_static, model_arrays, attack_static, attack_arrays, x, labels, valid,
                   key):
    """Number of ``valid`` rows of ``x [B, ...]`` still classified as ``labels [B]``
    after the attack; one compiled program per (model, attack, shapes), kept by
    jit's cache across :func:`robust_accuracy` calls."""
    model = _join_callable(model_static, model_arrays)
    if attack_static is not None:
        attack = _join_callable(attack_static, attack_arrays)
        x = attack(model, x, labels) if key is None else attack(model, x, labels, key=key)
    hit = jnp.argmax(model(x), axis=-1) == labels  # [B]
    return jnp.sum(jnp.where(valid, hit, False).astype(jnp.int32))


def robust_accuracy(
    model_fn: ModelFn,
    x: Float[Array, "n ..."],
    labels: Int[Array, " n"],
    attack_fn: Callable[..., Array] | None,
    batch_size: int,
    *,
    key: Array | None = None,
) -> float:
    """Accuracy on adversarial examples, attacking ``batch_size`` examples at a time.

    The last partial batch is padded (with copies of its first example) to the
    full size, so every batch runs the same compiled program; padding rows are
    not counted.

    The program is compiled once per model structure, attack and batch shape
    and reused by later calls: pass ``model_fn`` as ``Partial(model.apply,
    variables)`` (new parameter values reuse it) and ``attack_fn`` as a
    ``functools.partial`` or ``jax.tree_util.Partial`` of :func:`pgd` /
    :func:`fgsm`. The attack's Python arguments are part of the cache key by
    value (``epsilon=0.1`` and ``epsilon=0.2`` compile twice; a rebuilt
    ``partial(pgd, epsilon=0.1, ...)`` does not), its array arguments are
    traced (``epsilon=jnp.float32(0.1)``: one program for every radius). A
    lambda or other callable is keyed by identity: a new one compiles anew.

    Args:
      model_fn: ``x [B, ...] -> logits [B, C]``.
      x: ``[n, ...]`` inputs; labels: ``[n]`` true classes.
      attack_fn: ``attack_fn(model_fn, x_batch, labels_batch) -> x_adv``, e.g.
        ``functools.partial(pgd, epsilon=0.1, step_size=0.025, num_steps=10)``;
        called with ``key=fold_in(key, batch_index)`` as well when ``key`` is
        given. ``None`` measures clean accuracy.
      batch_size: examples per attacked batch (> 0).
      key: PRNG key for randomized attacks (PGD's random start).

    Returns:
      The fraction of the ``n`` examples still classified correctly.
    """
    fn = "robust_accuracy"
    x, labels = _check_batch(fn, x, labels)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
            batch_size <= 0):
        raise ValueError(f"{fn} expected batch_size to be an int > 0, got {batch_size!r}")
    n = x.shape[0]
    if n == 0:
        raise ValueError(f"{fn} got no examples (x has shape {x.shape})")
    model_static, model_arrays = _split_callable(model_fn)
    attack_static, attack_arrays = _split_callable(attack_fn)
    total = 0
    for i, start in enumerate(range(0, n, batch_size)):
        rows = np.arange(start, start + batch_size)
        valid = rows < n
        rows = np.where(valid, rows, start)  # pad with the batch's first example
        k = None if key is None else jax.random.fold_in(key, i)
        total += int(_count_correct(model_static, model_arrays, attack_static, attack_arrays,
                                    x[rows], labels[rows], jnp.asarray(valid), k))
    return total / n
