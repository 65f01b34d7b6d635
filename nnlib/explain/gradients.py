"""Gradient attributions: saliency, gradient x input, integrated gradients, SmoothGrad.

Each method explains one logit per example, the *target* class, by scoring
every input feature:

* **Saliency** (Simonyan, Vedaldi & Zisserman 2014, "Deep Inside
  Convolutional Networks"): ``|d logit_t / d x|``, or the signed gradient.
* **Gradient x input** (Shrikumar et al. 2016, "Not Just a Black Box";
  the first-order Taylor term of ``logit_t`` around 0): ``x * d logit_t / d x``.
* **Integrated gradients** (Sundararajan, Taly & Yan 2017, "Axiomatic
  Attribution for Deep Networks"): ``(x - x') * integral_0^1 grad
  logit_t(x' + a (x - x')) da`` from a baseline ``x'`` (zeros by default).
  *Completeness*: the attributions sum to ``logit_t(x) - logit_t(x')``, up
  to the quadrature error of the integral; :func:`completeness_gap` measures
  it.
* **SmoothGrad** (Smilkov et al. 2017, "SmoothGrad: removing noise by adding
  noise"): the gradient averaged over ``x + N(0, noise_std^2)``; with
  ``squared=True`` the average of the squared gradients (SmoothGrad-SQ,
  Hooker et al. 2019).

Conventions (shared by the whole of ``nnlib.explain``):

* The model is a function ``f(x) -> logits [batch, classes]`` in evaluation
  mode (no dropout, running BatchNorm statistics), so that each example's
  logits depend on that example only: the gradient of the *sum* of the target
  logits over the batch is then every example's own gradient. Pass it as
  ``jax.tree_util.Partial(model.apply, variables)``: its arrays become traced
  arguments and one compiled program serves every parameter value (the model
  randomization check relies on this). A lambda or closure works too, but it
  is a static argument: its arrays are baked in as constants and each new
  function object compiles anew. Inside the caller's own ``jit`` everything
  inlines.
* ``target: [batch]`` integer class ids; ``None`` explains the predicted
  class, ``argmax f(x)``. Ids are range-checked when they are concrete
  (outside ``jit``).
* Integrated gradients and SmoothGrad evaluate the model on many points per
  example (path points, noisy samples). They are processed ``batch_size``
  points at a time inside a ``lax.scan`` that accumulates the weighted sum,
  so memory holds one chunk, ``batch_size * batch`` model inputs, whatever
  ``steps`` or ``num_samples`` is. The chunking does not change the result
  (beyond float summation order).

Shapes glossary: B batch, C classes, ``...`` the feature axes of one example
(``[64]`` for vectors, ``[H, W, channels]`` for images), S path points or
noise samples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from nnlib.layers._checks import ShapeError, check_input

ModelFn = Callable[[Array], Array]
IG_METHODS = ("riemann_trapezoid", "gauss_legendre")

# Keeps 0 / 0 out of relative gaps and normalizations.
_TINY = 1e-12


# --- shared by nnlib.explain: the model as a compiled-program argument ------------


def _split_model(model_fn: Any) -> tuple[Any, list[Array]]:
    """(static part, array leaves) of a callable pytree: a ``Partial(apply,
    variables)`` passes its arrays as traced arguments; functions and Python
    values stay static (hashed into the compilation cache key)."""
    leaves, treedef = jax.tree.flatten(model_fn)
    is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
    static = tuple(None if a else leaf for leaf, a in zip(leaves, is_array, strict=True))
    arrays = [leaf for leaf, a in zip(leaves, is_array, strict=True) if a]
    return (treedef, static), arrays


def _join_model(static: Any, arrays: list[Array]) -> Any:
    treedef, static_leaves = static
    it = iter(arrays)
    return jax.tree.unflatten(treedef, [next(it) if s is None else s for s in static_leaves])


# --- shared by nnlib.explain: validation ------------------------------------------


def _is_concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


def _check_model_input(fn: str, f: ModelFn, x: Any) -> tuple[Array, int]:
    """``x: [B, ...]`` floating and ``f(x): [B, C]``; returns ``(x, C)``.

    ``jax.eval_shape`` traces ``f`` without running it, so a model that does
    not return ``[batch, classes]`` logits fails here, in our words.
    """
    x = jnp.asarray(x)
    check_input(fn, x, layout="[batch, ...]", min_ndim=1, name="x")
    out = jax.eval_shape(f, x)
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != x.shape[0]:
        got = tuple(shape) if shape is not None else type(out).__name__
        raise ShapeError(
            f"{fn} expected f(x) to return logits of shape [batch, classes] with "
            f"batch={x.shape[0]} (x has shape {tuple(x.shape)}), got {got}"
        )
    return x, int(shape[1])


def _check_target(fn: str, target: Any, batch: int, num_classes: int) -> Array | None:
    """``target: [B]`` integer ids in ``[0, C)`` (values checked when concrete)."""
    if target is None:
        return None
    target = jnp.asarray(target)
    if not jnp.issubdtype(target.dtype, jnp.integer):
        raise TypeError(
            f"{fn} expected integer class ids target of shape [batch] = [{batch}], "
            f"got dtype {target.dtype}"
        )
    if target.shape != (batch,):
        raise ShapeError(
            f"{fn} expected target of shape [batch] = [{batch}] (one class id per "
            f"example), got shape {tuple(target.shape)}"
        )
    if _is_concrete(target) and batch:
        values = np.asarray(target)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{fn} got target class ids in [{low}, {high}], outside [0, {num_classes}) "
                f"for a model with {num_classes} classes"
            )
    return target


def _check_positive_int(fn: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{fn} expected {name} to be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_batch_size(fn: str, batch_size: Any, total: int) -> int:
    """``None`` means all ``total`` points in one chunk."""
    if batch_size is None:
        return max(total, 1)
    return min(_check_positive_int(fn, "batch_size", batch_size), max(total, 1))


# --- shared by nnlib.explain: scores and chunked loops ---------------------------------


def _target_logits(logits: Array, target: Array) -> Array:
    """``logits [N, C]``, ``target [N]`` -> ``[N]``."""
    return jnp.take_along_axis(logits, target[:, None].astype(jnp.int32), axis=1)[:, 0]


def _default_target(f: ModelFn, x: Array, target: Array | None) -> Array:
    if target is not None:
        return target
    return jnp.argmax(f(x), axis=-1).astype(jnp.int32)  # [B]


def _input_gradient(f: ModelFn, x: Array, target: Array) -> Array:
    """``d logit_target / d x`` for every row of ``x: [N, ...]`` (rows independent)."""
    return jax.grad(lambda v: jnp.sum(_target_logits(f(v), target)))(x)


def _chunked_input_gradients(f: ModelFn, points: Array, target: Array) -> Array:
    """Gradients at ``points: [c, B, ...]`` in one forward/backward pass of ``c * B`` rows."""
    c, b = points.shape[:2]
    flat = points.reshape((c * b,) + points.shape[2:])  # [c * B, ...]
    grads = _input_gradient(f, flat, jnp.tile(target, c))
    return grads.reshape(points.shape)  # [c, B, ...]


def _scan_chunks(body: Callable[..., Any], items: tuple[Array, ...], chunk: int,
                 init: Any) -> Any:
    """``carry = body(carry, *items[i:i + chunk])`` over all items, in a ``lax.scan``.

    The items (leading axis ``n``) are zero-padded to a multiple of ``chunk``;
    the caller gives padding rows no weight (a weight or validity item).
    Only one chunk's activations are alive at a time: that is the point.
    """
    n = items[0].shape[0]
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n

    def reshape(a: Array) -> Array:
        a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a
        return a.reshape((num_chunks, chunk) + a.shape[1:])  # [n_chunks, chunk, ...]

    def step(carry: Any, chunk_items: tuple[Array, ...]) -> tuple[Any, None]:
        return body(carry, *chunk_items), None

    carry, _ = jax.lax.scan(step, init, tuple(reshape(a) for a in items))
    return carry


# --- saliency and gradient x input -------------------------------------------------


@functools.partial(jax.jit, static_argnames=("static", "absolute", "times_input"))
def _saliency(static, arrays, x, target, *, absolute, times_input):
    f = _join_model(static, arrays)
    grads = _input_gradient(f, x, _default_target(f, x, target))  # [B, ...]
    if times_input:
        return x * grads
    return jnp.abs(grads) if absolute else grads


def saliency(
    f: ModelFn,
    x: Float[Array, "batch ..."],
    target: Int[Array, " batch"] | None = None,
    *,
    absolute: bool = True,
) -> Float[Array, "batch ..."]:
    """Vanilla gradient saliency (Simonyan et al. 2014).

    ``|d logit_target(x) / d x|``. Simonyan et al. further take the maximum
    over colour channels for an image, ``saliency(...).max(-1)``.

    Args:
      f: ``x [B, ...] -> logits [B, C]`` (see the module doc).
      x: ``[B, ...]`` inputs.
      target: ``[B]`` class ids to explain; ``None``: the predicted classes.
      absolute: return the magnitude (the paper's map); ``False`` keeps the
        sign (which way each feature pushes the logit).

    Returns:
      ``[B, ...]`` attributions, the shape of ``x``.
    """
    fn = "saliency"
    x, num_classes = _check_model_input(fn, f, x)
    target = _check_target(fn, target, x.shape[0], num_classes)
    static, arrays = _split_model(f)
    return _saliency(static, arrays, x, target, absolute=bool(absolute), times_input=False)


def gradient_x_input(
    f: ModelFn,
    x: Float[Array, "batch ..."],
    target: Int[Array, " batch"] | None = None,
) -> Float[Array, "batch ..."]:
    """Gradient times input (Shrikumar et al. 2016): ``x * d logit_target / d x``.

    For a linear model ``logit = x . w + b`` this is each feature's exact
    contribution ``x_i w_i``; integrated gradients from a zero baseline
    coincides with it there.

    Args:
      f: ``x [B, ...] -> logits [B, C]`` (see the module doc).
      x: ``[B, ...]`` inputs.
      target: ``[B]`` class ids to explain; ``None``: the predicted classes.

    Returns:
      ``[B, ...]`` signed attributions.
    """
    fn = "gradient_x_input"
    x, num_classes = _check_model_input(fn, f, x)
    target = _check_target(fn, target, x.shape[0], num_classes)
    static, arrays = _split_model(f)
    return _saliency(static, arrays, x, target, absolute=False, times_input=True)


# --- integrated gradients -----------------------------------------------------------


def _quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``alpha`` in [0, 1] and weights (summing to 1) of ``integral_0^1 g(a) da``.

    Trapezoid: ``steps`` equally spaced points including both ends, the end
    weights halved; error O(1/steps^2) on smooth paths. Gauss-Legendre:
    ``steps`` interior nodes, exact for polynomials of degree ``2 steps - 1``;
    ReLU networks have kinks along the path, where both rules lose order.
    """
    if method == "riemann_trapezoid":
        alphas = np.linspace(0.0, 1.0, steps)
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] *= 0.5
        return alphas, weights
    nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
    return (nodes + 1.0) / 2.0, weights / 2.0


@functools.partial(jax.jit, static_argnames=("static", "chunk"))
def _integrated_gradients(static, arrays, x, target, baseline, alphas, weights, *, chunk):
    f = _join_model(static, arrays)
    target = _default_target(f, x, target)
    diff = x - baseline  # [B, ...]
    expand = (slice(None),) + (None,) * x.ndim  # [c] -> [c, 1, ...]

    def body(total, alpha, weight):  # alpha, weight: [c]
        points = baseline[None] + alpha[expand] * diff[None]  # [c, B, ...]
        grads = _chunked_input_gradients(f, points, target)  # [c, B, ...]
        return total + jnp.tensordot(weight, grads, axes=1)  # [B, ...]

    path_integral = _scan_chunks(body, (alphas, weights), chunk, jnp.zeros_like(x))
    return diff * path_integral


def _check_baseline(fn: str, x: Array, baseline: Any) -> Array:
    if baseline is None:
        return jnp.zeros_like(x)
    baseline = jnp.asarray(baseline)
    if baseline.shape == x.shape[1:]:  # one baseline for every example
        baseline = jnp.broadcast_to(baseline, x.shape)
    if baseline.shape != x.shape:
        raise ShapeError(
            f"{fn} expected baseline of the shape of x [batch, ...] = {tuple(x.shape)} or "
            f"of one example {tuple(x.shape[1:])}, got shape {tuple(baseline.shape)}"
        )
    return baseline.astype(x.dtype)


def integrated_gradients(
    f: ModelFn,
    x: Float[Array, "batch ..."],
    target: Int[Array, " batch"] | None = None,
    baseline: Float[Array, "batch ..."] | None = None,
    steps: int = 50,
    method: str = "riemann_trapezoid",
    *,
    batch_size: int | None = 16,
) -> Float[Array, "batch ..."]:
    """Integrated gradients (Sundararajan et al. 2017).

    ``IG_i(x) = (x_i - x'_i) * sum_k w_k d logit_target / d x_i (x' + a_k (x - x'))``,
    a quadrature of the path integral of the gradient along the straight line
    from the baseline ``x'`` to ``x``. By the fundamental theorem of calculus
    ``sum_i IG_i = logit_target(x) - logit_target(x')`` (completeness) up to
    the quadrature error; check it with :func:`completeness_gap`.

    Args:
      f: ``x [B, ...] -> logits [B, C]`` (see the module doc).
      x: ``[B, ...]`` inputs.
      target: ``[B]`` class ids to explain; ``None``: the classes predicted at ``x``.
      baseline: ``[B, ...]`` or one example ``[...]``; ``None``: zeros (a
        black image). Pick a baseline the model scores as "no evidence".
      steps: number of path points (gradient evaluations per example);
        ``>= 2`` for the trapezoid rule. A ReLU network's gradient jumps at
        every kink the path crosses, so the error falls only like
        ``1/steps`` for either rule: nnlib's digits CNN needs ~128 steps for
        a 1% completeness gap; smooth activations (gelu, tanh) need far fewer.
      method: ``"riemann_trapezoid"`` (equally spaced, both ends) or
        ``"gauss_legendre"`` (interior nodes; fewer steps for the same
        accuracy on smooth models). A pitfall of the endpoints: at a zero
        baseline a ReLU network whose biases are 0 (freshly initialized, or
        ``use_bias=False``) has every pre-activation exactly 0, where JAX's
        ReLU gradient is 0, so the trapezoid's first node contributes
        nothing and completeness is off by its weight ``0.5 / (steps - 1)``.
        Gauss-Legendre never evaluates the endpoints.
      batch_size: path points per forward/backward pass (each pass sees
        ``batch_size * B`` rows); ``None``: all ``steps`` at once.

    Returns:
      ``[B, ...]`` signed attributions.
    """
    fn = "integrated_gradients"
    if method not in IG_METHODS:
        raise ValueError(f"{fn} expected method in {IG_METHODS}, got {method!r}")
    steps = _check_positive_int(fn, "steps", steps, 2 if method == "riemann_trapezoid" else 1)
    chunk = _check_batch_size(fn, batch_size, steps)
    x, num_classes = _check_model_input(fn, f, x)
    target = _check_target(fn, target, x.shape[0], num_classes)
    baseline = _check_baseline(fn, x, baseline)
    alphas, weights = _quadrature(method, steps)
    # Fill the last chunk here with copies of the last node at weight 0: _scan_chunks'
    # zero padding would be alpha = 0, the baseline, where the gradient may be NaN
    # (x / ||x|| at x' = 0) and 0 * NaN = NaN, although Gauss-Legendre never needs it.
    pad = -steps % chunk
    alphas, weights = np.pad(alphas, (0, pad), mode="edge"), np.pad(weights, (0, pad))
    static, arrays = _split_model(f)
    return _integrated_gradients(static, arrays, x, target, baseline,
                                 jnp.asarray(alphas, x.dtype), jnp.asarray(weights, x.dtype),
                                 chunk=chunk)


@functools.partial(jax.jit, static_argnames=("static",))
def _completeness_gap(static, arrays, x, attributions, target, baseline):
    f = _join_model(static, arrays)
    logits = f(x)  # [B, C]
    target = jnp.argmax(logits, axis=-1) if target is None else target
    # In float32 at least: float16 rounds _TINY to 0 (a zero difference gave 0 / 0 = NaN).
    acc = np.promote_types(x.dtype, np.float32)
    delta = _target_logits(logits, target) - _target_logits(f(baseline), target)  # [B]
    delta = delta.astype(np.promote_types(delta.dtype, acc))
    total = jnp.sum(attributions.reshape(x.shape[0], -1).astype(delta.dtype), axis=1)  # [B]
    return jnp.abs(total - delta) / jnp.maximum(jnp.abs(delta), _TINY)


def completeness_gap(
    f: ModelFn,
    x: Float[Array, "batch ..."],
    attributions: Float[Array, "batch ..."],
    target: Int[Array, " batch"] | None = None,
    baseline: Float[Array, "batch ..."] | None = None,
) -> Float[Array, " batch"]:
    """Relative violation of completeness, per example.

    ``|sum_i attributions_i - (logit_t(x) - logit_t(x'))| / |logit_t(x) -
    logit_t(x')|``. Integrated gradients drive it to 0 as ``steps`` grows
    (Sundararajan et al. suggest 20 to 300 steps to get within 5%).

    Args:
      f: ``x [B, ...] -> logits [B, C]``.
      x: ``[B, ...]`` inputs.
      attributions: ``[B, ...]``, e.g. from :func:`integrated_gradients`.
      target: ``[B]`` the explained classes; ``None``: ``argmax f(x)``.
      baseline: as given to :func:`integrated_gradients` (``None``: zeros).

    Returns:
      ``[B]`` relative gaps (a logit difference of 0 is divided by 1e-12).
    """
    fn = "completeness_gap"
    x, num_classes = _check_model_input(fn, f, x)
    target = _check_target(fn, target, x.shape[0], num_classes)
    baseline = _check_baseline(fn, x, baseline)
    attributions = jnp.asarray(attributions)
    if attributions.shape != x.shape:
        raise ShapeError(f"{fn} expected attributions of the shape of x {tuple(x.shape)}, "
                         f"got shape {tuple(attributions.shape)}")
    static, arrays = _split_model(f)
    return _completeness_gap(static, arrays, x, attributions.astype(x.dtype), target, baseline)


# --- SmoothGrad ------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("static", "num_samples", "squared", "chunk"))
def _smoothgrad(static, arrays, x, target, key, noise_std, *, num_samples, squared, chunk):
    f = _join_model(static, arrays)
    target = _default_target(f, x, target)
    noise_std = jnp.asarray(noise_std, x.dtype)
    indices = jnp.arange(num_samples, dtype=jnp.int32)
    weights = jnp.full((num_samples,), 1.0 / num_samples, x.dtype)

    def noise(i: Array) -> Array:
        # Sample i's noise depends on (key, i) only, never on the chunking.
        return noise_std * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)

    def body(total, index, weight):  # index, weight: [c]
        points = x[None] + jax.vmap(noise)(index)  # [c, B, ...]
        grads = _chunked_input_gradients(f, points, target)  # [c, B, ...]
        grads = grads * grads if squared else grads
        return total + jnp.tensordot(weight, grads, axes=1)  # [B, ...]

    return _scan_chunks(body, (indices, weights), chunk, jnp.zeros_like(x))


def smoothgrad(
    f: ModelFn,
    x: Float[Array, "batch ..."],
    target: Int[Array, " batch"] | None = None,
    key: Array | None = None,
    num_samples: int = 50,
    noise_std: float | Array = 0.15,
    *,
    squared: bool = False,
    batch_size: int | None = 16,
) -> Float[Array, "batch ..."]:
    """SmoothGrad (Smilkov et al. 2017): the gradient averaged over noisy copies of x.

    ``(1/n) sum_s d logit_t / d x (x + eps_s)``, ``eps_s ~ N(0, noise_std^2)``
    i.i.d. per feature, with ``target`` fixed from the clean ``x``. Averaging
    removes the high-frequency jitter of the raw gradient of a ReLU network.
    ``squared=True`` averages ``grad ** 2`` instead (SmoothGrad-SQ, Hooker et
    al. 2019, "A Benchmark for Interpretability Methods in Deep Neural
    Networks").

    Args:
      f: ``x [B, ...] -> logits [B, C]`` (see the module doc).
      x: ``[B, ...]`` inputs.
      target: ``[B]`` class ids to explain; ``None``: the classes predicted at ``x``.
      key: PRNG key for the noise (required). Sample ``s`` uses
        ``fold_in(key, s)``, so results do not depend on ``batch_size``.
      num_samples: ``n``, noisy copies per example.
      noise_std: absolute noise standard deviation; Smilkov et al. recommend
        10-20% of the input range ``x_max - x_min`` (0.15 for pixels in [0, 1]).
      squared: SmoothGrad-SQ.
      batch_size: noisy samples per forward/backward pass (each pass sees
        ``batch_size * B`` rows); ``None``: all at once.

    Returns:
      ``[B, ...]`` attributions (signed, or non-negative when ``squared``).
    """
    fn = "smoothgrad"
    if key is None:
        raise ValueError(f"{fn} needs a PRNG key for the noise, e.g. key=jax.random.key(0)")
    num_samples = _check_positive_int(fn, "num_samples", num_samples)
    chunk = _check_batch_size(fn, batch_size, num_samples)
    if _is_concrete(noise_std) and not (np.ndim(noise_std) == 0 and float(noise_std) >= 0):
        raise ValueError(f"{fn} expected a scalar noise_std >= 0, got {noise_std!r}")
    x, num_classes = _check_model_input(fn, f, x)
    target = _check_target(fn, target, x.shape[0], num_classes)
    static, arrays = _split_model(f)
    return _smoothgrad(static, arrays, x, target, key, noise_std, num_samples=num_samples,
                       squared=bool(squared), chunk=chunk)


__all__ = [
    "IG_METHODS",
    "completeness_gap",
    "gradient_x_input",
    "integrated_gradients",
    "saliency",
    "smoothgrad",
]
