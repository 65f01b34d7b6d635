"""Grad-CAM: where in a convolutional feature map the evidence for a class lies.

Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep
Networks via Gradient-based Localization") weighs each channel ``k`` of a
feature map ``A: [B, h, w, K]`` by the spatially averaged gradient of the
target logit, and keeps the positive part::

    alpha_k = mean_{i,j} d logit_t / d A_{ijk}          # [B, K]
    cam     = ReLU(sum_k alpha_k A_{..k})               # [B, h, w]

then upsamples ``cam`` to the input's ``H x W`` and scales each map to
``[0, 1]``. With a global-average-pooled linear head it is exactly CAM (Zhou
et al. 2016): ``alpha_k = W[k, t] / (h w)``.

Getting at the feature map. Grad-CAM needs the *gradient* with respect to an
intermediate activation, which ``capture_intermediates`` (values only) cannot
give, and ``nn.Module.perturb`` would need the model's code to call
``self.perturb`` at that layer. :func:`grad_cam` instead uses
``flax.linen.intercept_methods``: while the unmodified model runs, the output
of the submodule at path ``layer`` (e.g. ``"block_1"`` for
``nnlib.models.CNN``, ``"encoder/block_0"`` deeper down) gets a zero tensor
``delta`` added to it; the gradient with respect to ``delta`` at 0 is the
gradient with respect to the feature map. So any linen model given as the same
``f(x) -> logits`` as every other method in ``nnlib.explain`` works, with no
change to its code. For a model that is not a linen module (or to cut it by
hand), :func:`grad_cam_from_split` takes ``features_fn(x) -> A`` and
``head_fn(A) -> logits``.

Conventions: the model function as in ``nnlib.explain.gradients`` (evaluation
mode, ``Partial(model.apply, variables)`` preferred, ``target: [B]`` or
``None`` for the predicted class). Shapes: B batch, H x W the input's spatial
size, h x w the feature map's, K its channels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nnlib.explain.gradients import (
    _TINY,
    ModelFn,
    _check_model_input,
    _check_target,
    _join_model,
    _split_model,
    _target_logits,
)
from nnlib.layers._checks import ShapeError

RESIZE_METHODS = ("nearest", "linear", "bilinear")


def _path_str(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _run_with_delta(f: ModelFn, x: Array, layer: str, delta: Array | None
                    ) -> tuple[Array, list[Any]]:
    """Runs ``f(x)``, adding ``delta`` to the output of the module at ``layer``.

    Returns the logits and the (shifted) outputs of every ``__call__`` of that
    module, in call order.
    """
    found: list[Any] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and _path_str(context.module.path) == layer:
            if delta is not None:
                out = out + delta
            found.append(out)
        return out

    with nn.intercept_methods(interceptor):
        logits = f(x)
    return logits, found


def _feature_map_shape(fn: str, f: ModelFn, x: Array, layer: str) -> jax.ShapeDtypeStruct:
    """Traces ``f`` (no FLOPs) to learn the shape of ``layer``'s output, or to say
    which module paths exist when there is no such layer."""
    paths: list[str] = []
    outputs: list[Any] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            path = _path_str(context.module.path)
            paths.append(path)
            if path == layer:
                outputs.append(jax.ShapeDtypeStruct(out.shape, out.dtype)
                               if hasattr(out, "shape") else type(out).__name__)
        return out

    def run(v):
        with nn.intercept_methods(interceptor):
            return f(v)

    jax.eval_shape(run, x)
    if not outputs:
        known = ", ".join(repr(p) for p in dict.fromkeys(paths) if p) or "none (not a linen model?)"
        raise ValueError(f"{fn} found no submodule at layer={layer!r}; the model's submodule "
                         f"paths are: {known}")
    if len(outputs) > 1:
        raise ValueError(f"{fn}: the module at layer={layer!r} is called {len(outputs)} times "
                         f"per forward pass (shared weights?); Grad-CAM needs one feature map")
    out = outputs[0]
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 4 or out.shape[0] != x.shape[0]:
        got = f"shape {out.shape}" if isinstance(out, jax.ShapeDtypeStruct) else out
        raise ShapeError(f"{fn} expected layer {layer!r} to output a feature map "
                         f"[batch, height, width, channels] with batch={x.shape[0]}, got {got}")
    return out


def _cam(maps: Array, grads: Array, out_hw: tuple[int, int] | None, normalize: bool,
         method: str) -> Array:
    """``maps, grads: [B, h, w, K]`` -> ``[B, H, W]`` (or ``[B, h, w]``)."""
    alpha = jnp.mean(grads, axis=(1, 2))  # [B, K]
    cam = jax.nn.relu(jnp.einsum("bhwk,bk->bhw", maps, alpha))  # [B, h, w]
    if out_hw is not None:
        # Linear interpolation is a convex combination: the map stays >= 0.
        cam = jax.image.resize(cam, (cam.shape[0], *out_hw), method=method)  # [B, H, W]
    if normalize:
        peak = jnp.max(cam, axis=(1, 2), keepdims=True)  # [B, 1, 1]
        cam = jnp.where(peak > _TINY, cam / jnp.maximum(peak, _TINY), jnp.zeros_like(cam))
    return cam


def _check_options(fn: str, x: Array, upsample: bool, method: str) -> tuple[int, int] | None:
    if method not in RESIZE_METHODS:
        raise ValueError(f"{fn} expected resize_method in {RESIZE_METHODS}, got {method!r}")
    if not upsample:
        return None
    if x.ndim != 4:
        raise ShapeError(f"{fn} upsamples to the input's resolution, so it expected x of shape "
                         f"[batch, height, width, channels], got shape {tuple(x.shape)}; "
                         f"pass upsample=False for other inputs")
    return int(x.shape[1]), int(x.shape[2])


@functools.partial(jax.jit, static_argnames=(
    "static", "layer", "map_shape", "out_hw", "normalize", "method"))
def _grad_cam(static, arrays, x, target, *, layer, map_shape, out_hw, normalize, method):
    f = _join_model(static, arrays)

    def score(delta):
        logits, found = _run_with_delta(f, x, layer, delta)
        t = jnp.argmax(logits, axis=-1) if target is None else target
        return jnp.sum(_target_logits(logits, t)), found[0]

    delta = jnp.zeros(map_shape.shape, map_shape.dtype)  # [B, h, w, K]
    grads, maps = jax.grad(score, has_aux=True)(delta)
    return _cam(maps, grads, out_hw, normalize, method)


def grad_cam(
    f: ModelFn,
    x: Float[Array, "batch height width channels"],
    target: Int[Array, " batch"] | None = None,
    *,
    layer: str,
    upsample: bool = True,
    normalize: bool = True,
    resize_method: str = "bilinear",
) -> Float[Array, "batch height width"]:
    """Grad-CAM heatmaps of a linen model, read at the submodule ``layer``.

    Args:
      f: ``x [B, H, W, C] -> logits [B, classes]`` that calls a linen model's
        ``apply`` (e.g. ``Partial(model.apply, variables)``).
      x: ``[B, H, W, C]`` images.
      target: ``[B]`` class ids to explain; ``None``: the predicted classes.
      layer: path of the submodule whose output is the feature map, names
        joined by ``"/"``: ``"block_1"`` for ``nnlib.models.CNN(features=(a,
        b))`` (the last conv block, after its pooling), ``"block_1/conv"``
        for the convolution before activation and pooling. The last conv
        block is the paper's choice: high-level semantics, some space left.
      upsample: resize the map to ``H x W`` (``False``: ``[B, h, w]``).
      normalize: divide each map by its maximum (all-zero maps stay 0).
      resize_method: ``jax.image.resize`` method: "bilinear", "linear" or
        "nearest" (cubic kernels overshoot below 0).

    Returns:
      ``[B, H, W]`` non-negative heatmaps, each in ``[0, 1]`` when ``normalize``.
    """
    fn = "grad_cam"
    x, num_classes = _check_model_input(fn, f, x)
    target = _check_target(fn, target, x.shape[0], num_classes)
    out_hw = _check_options(fn, x, upsample, resize_method)
    map_shape = _feature_map_shape(fn, f, x, layer)
    static, arrays = _split_model(f)
    return _grad_cam(static, arrays, x, target, layer=layer, map_shape=map_shape,
                     out_hw=out_hw, normalize=bool(normalize), method=resize_method)


@functools.partial(jax.jit, static_argnames=("static", "out_hw", "normalize", "method"))
def _grad_cam_split(static, arrays, x, target, *, out_hw, normalize, method):
    features_fn, head_fn = _join_model(static, arrays)
    maps = features_fn(x)  # [B, h, w, K]
    t = jnp.argmax(head_fn(maps), axis=-1) if target is None else target
    grads = jax.grad(lambda a: jnp.sum(_target_logits(head_fn(a), t)))(maps)
    return _cam(maps, grads, out_hw, normalize, method)


def grad_cam_from_split(
    features_fn: Callable[[Array], Array],
    head_fn: Callable[[Array], Array],
    x: Float[Array, "batch height width channels"],
    target: Int[Array, " batch"] | None = None,
    *,
    upsample: bool = True,
    normalize: bool = True,
    resize_method: str = "bilinear",
) -> Float[Array, "batch height width"]:
    """Grad-CAM for a model cut by hand: ``head_fn(features_fn(x))`` are the logits.

    Args:
      features_fn: ``x [B, H, W, C] -> A [B, h, w, K]``, the feature map.
      head_fn: ``A [B, h, w, K] -> logits [B, classes]``.
      x, target, upsample, normalize, resize_method: as in :func:`grad_cam`.

    Returns:
      ``[B, H, W]`` heatmaps (``[B, h, w]`` without ``upsample``).
    """
    fn = "grad_cam_from_split"
    x, num_classes = _check_model_input(fn, lambda v: head_fn(features_fn(v)), x)
    maps = jax.eval_shape(features_fn, x)
    if getattr(maps, "ndim", None) != 4 or maps.shape[0] != x.shape[0]:
        raise ShapeError(f"{fn} expected features_fn(x) to return a feature map "
                         f"[batch, height, width, channels] with batch={x.shape[0]}, got "
                         f"{getattr(maps, 'shape', type(maps).__name__)}")
    target = _check_target(fn, target, x.shape[0], num_classes)
    out_hw = _check_options(fn, x, upsample, resize_method)
    static, arrays = _split_model((features_fn, head_fn))
    return _grad_cam_split(static, arrays, x, target, out_hw=out_hw,
                           normalize=bool(normalize), method=resize_method)


__all__ = ["RESIZE_METHODS", "grad_cam", "grad_cam_from_split"]
