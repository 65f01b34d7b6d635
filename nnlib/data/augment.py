"""Image augmentation: random shifts, rotations and scalings, on the device, per example.

Data augmentation fights overfitting by training on transformed copies of the
examples — transforms that change the pixels but not the label (a digit moved
a pixel or tilted ten degrees is still the same digit). Drawing a fresh
transform for every example at every step means the network never sees the
same input twice, which is a prior about invariance the data alone cannot
teach from a few hundred images.

Everything here is a pure function of a PRNG key and a batch
``images: [batch, height, width, channels]`` (channels last, as
``nnlib.data.load_digits`` and flax convolutions use), traceable under
``jax.jit``, so it runs *inside* the jitted train step::

    def augmented_step(state, batch):
        key = jax.random.fold_in(augment_key, state.step)
        inputs = augment(key, batch["inputs"], max_shift=1, max_degrees=15.0)
        return train_step(state, {**batch, "inputs": inputs})

Each example gets its own transform (parameters drawn with shape ``[batch]``
and applied with ``jax.vmap``); the same key gives the same output.

Two families, with their geometry:

* **Translation** (:func:`translate`, :func:`random_shift`) by whole pixels
  ``(dy, dx)``: ``out[i, j] = image[i - dy, j - dx]``, i.e. ``np.roll`` along
  height and width but with the vacated border filled (``fill="zero"``: zeros;
  ``fill="edge"``: the nearest edge pixel) instead of wrapped around. Exact:
  no interpolation.
* **Rotation and scaling** (:func:`rotate`, :func:`scale`,
  :func:`random_rotation`, :func:`random_scale`) about the image centre
  ``((height - 1) / 2, (width - 1) / 2)``, resampled bilinearly with
  ``jax.scipy.ndimage.map_coordinates`` (``order=1``). A positive angle turns
  the picture counter-clockwise as displayed (row 0 on top), so 90° equals
  ``np.rot90`` and any angle equals ``scipy.ndimage.rotate(image, degrees,
  reshape=False, order=1, mode="grid-constant")``. A scale factor ``s > 1``
  enlarges the content (zoom in), ``s < 1`` shrinks it. Output pixel ``p``
  reads the input at ``c + R(-theta) (p - c) / s``. Samples that fall outside
  the image read 0 (``fill="zero"``) or the nearest edge pixel
  (``fill="edge"``).

:func:`augment` chains them: rotation and scaling in *one* resampling (two
bilinear passes would blur twice), then the integer shift.

Dtypes are kept: floating images come back in their dtype (interpolation runs
in float32 for half precision); integer images (e.g. uint8) are rounded and
clipped to their range.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates
from jaxtyping import Array, Float, Int, Num

from nnlib.layers._checks import ShapeError

# Shape aliases, defined outside annotations (where linters would read a lone
# "batch" as a forward reference).
Images = Num[Array, "batch height width channels"]
PerImage = Float[Array, "batch"]  # one angle or scale factor per image
Shifts = Int[Array, "batch 2"]  # (dy, dx) per image
PRNGKey = Any  # a typed key (jax.random.key) or raw uint32 key data

_FILLS = {"zero": "constant", "edge": "nearest"}  # our name -> map_coordinates mode
_LAYOUT = "[batch, height, width, channels]"


# --- validation ------------------------------------------------------------------


def _check_images(fn: str, images: Any) -> jax.Array:
    shape = getattr(images, "shape", None)
    if shape is None or getattr(images, "dtype", None) is None:
        raise TypeError(f"{fn} expected images to be an array of shape {_LAYOUT}, got "
                        f"{type(images).__name__}")
    images = jnp.asarray(images)
    if images.ndim != 4:
        hint = (" (add a channels axis: images[..., None])" if images.ndim == 3 else "")
        raise ShapeError(f"{fn} expected images of shape {_LAYOUT}, got shape "
                         f"{tuple(images.shape)}{hint}")
    if not (jnp.issubdtype(images.dtype, jnp.floating)
            or jnp.issubdtype(images.dtype, jnp.integer)):
        raise TypeError(f"{fn} expected float or integer images, got dtype {images.dtype}")
    return images


def _check_fill(fn: str, fill: str) -> str:
    if fill not in _FILLS:
        raise ValueError(f"{fn} expected fill 'zero' or 'edge', got {fill!r}")
    return fill


def _check_max(fn: str, name: str, value: Any, *, integer: bool = False) -> None:
    """A Python number >= 0 (static: it decides shapes and whether to resample)."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds) or not (
            math.isfinite(value) and value >= 0):
        what = "a Python int" if integer else "a Python number"
        raise ValueError(f"{fn} expected {name} to be {what} >= 0, got {value!r}")


def _check_per_example(fn: str, name: str, values: Any, batch: int, trailing=()) -> jax.Array:
    values = jnp.asarray(values)
    want = (batch, *trailing)
    if values.shape != want:
        layout = "[batch]" if not trailing else "[batch, 2] (dy, dx)"
        raise ShapeError(f"{fn} expected {name} of shape {layout} = {want} (one per image), "
                         f"got shape {tuple(values.shape)}")
    return values


def _cast_back(out: jax.Array, dtype: Any) -> jax.Array:
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        return jnp.clip(jnp.round(out), info.min, info.max).astype(dtype)
    return out.astype(dtype)


# --- translation --------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("fill",))
def _translate(images: jax.Array, shifts: jax.Array, fill: str) -> jax.Array:
    _, height, width, _ = images.shape
    mode = "constant" if fill == "zero" else "edge"
    # Pad by the full image size so any shift reads padding, never wraps.
    padded = jnp.pad(images, ((0, 0), (height, height), (width, width), (0, 0)), mode=mode)

    def one(image, shift):  # image: [H + 2H, W + 2W, C], shift: [2]
        dy = jnp.clip(shift[0], -height, height)
        dx = jnp.clip(shift[1], -width, width)
        # out[i] = image[i - dy] = padded[i - dy + height]
        return jax.lax.dynamic_slice(image, (height - dy, width - dx, 0),
                                     (height, width, image.shape[-1]))

    return jax.vmap(one)(padded, shifts.astype(jnp.int32))


def translate(
    images: Images, shifts: Shifts, *, fill: str = "zero"
) -> Images:
    """Moves each image by whole pixels: ``out[b, i, j] = images[b, i - dy_b, j - dx_b]``.

    Args:
      images: ``[batch, height, width, channels]``.
      shifts: ``[batch, 2]`` integer ``(dy, dx)`` per image; positive ``dy``
        moves the content down, positive ``dx`` to the right. Shifts beyond the
        image size act as the image size (all fill).
      fill: ``"zero"`` or ``"edge"`` (repeat the nearest border pixel) for the
        uncovered border.

    Returns:
      ``[batch, height, width, channels]`` in the dtype of ``images``.
    """
    fn = "translate"
    images = _check_images(fn, images)
    shifts = _check_per_example(fn, "shifts", shifts, images.shape[0], trailing=(2,))
    if not jnp.issubdtype(shifts.dtype, jnp.integer):
        raise TypeError(f"{fn} expected integer shifts (whole pixels), got dtype {shifts.dtype}")
    return _translate(images, shifts, _check_fill(fn, fill))


def random_shift(
    key: PRNGKey, images: Images, max_shift: int, *, fill: str = "zero"
) -> Images:
    """Shifts each image by its own random ``(dy, dx)``, each uniform on
    ``{-max_shift, ..., max_shift}``; see :func:`translate`.

    Args:
      key: PRNG key.
      images: ``[batch, height, width, channels]``.
      max_shift: largest shift in pixels (a Python int >= 0; 0 is the identity).
      fill: ``"zero"`` or ``"edge"``.

    Returns:
      ``[batch, height, width, channels]`` in the dtype of ``images``.
    """
    fn = "random_shift"
    images = _check_images(fn, images)
    _check_max(fn, "max_shift", max_shift, integer=True)
    shifts = jax.random.randint(key, (images.shape[0], 2), -max_shift, max_shift + 1)
    return _translate(images, shifts, _check_fill(fn, fill))


# --- rotation and scaling --------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("fill",))
def _resample(images: jax.Array, degrees: jax.Array, factors: jax.Array,
              fill: str) -> jax.Array:
    """Rotates by ``degrees`` [batch] and scales by ``factors`` [batch] in one pass."""
    _, height, width, _ = images.shape
    dtype = images.dtype
    work = images if dtype in (jnp.float32, jnp.float64) else images.astype(jnp.float32)
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=work.dtype),
                              jnp.arange(width, dtype=work.dtype), indexing="ij")  # [H, W]
    y = rows - (height - 1) / 2  # offsets from the centre, rows pointing down
    x = cols - (width - 1) / 2

    def one(image, angle, factor):  # image: [H, W, C]
        theta = jnp.deg2rad(angle).astype(work.dtype)
        cos, sin = jnp.cos(theta) / factor, jnp.sin(theta) / factor
        # Inverse map: where in the input each output pixel comes from.
        src_rows = (height - 1) / 2 + cos * y + sin * x  # [H, W]
        src_cols = (width - 1) / 2 + cos * x - sin * y
        channel = functools.partial(map_coordinates, coordinates=[src_rows, src_cols], order=1,
                                    mode=_FILLS[fill])
        return jax.vmap(lambda c: channel(c), in_axes=-1, out_axes=-1)(image)  # [H, W, C]

    out = jax.vmap(one)(work, degrees.astype(work.dtype), factors.astype(work.dtype))
    return _cast_back(out, dtype)


def rotate(
    images: Images, degrees: PerImage, *, fill: str = "zero"
) -> Images:
    """Rotates each image about its centre, bilinearly (see the module doc).

    Args:
      images: ``[batch, height, width, channels]``.
      degrees: ``[batch]`` angle per image; positive is counter-clockwise as
        displayed (90 equals ``np.rot90``).
      fill: ``"zero"`` or ``"edge"`` for samples from outside the image.

    Returns:
      ``[batch, height, width, channels]`` in the dtype of ``images``.
    """
    fn = "rotate"
    images = _check_images(fn, images)
    degrees = _check_per_example(fn, "degrees", degrees, images.shape[0])
    return _resample(images, degrees, jnp.ones_like(degrees, jnp.float32),
                     _check_fill(fn, fill))


def scale(
    images: Images, factors: PerImage, *, fill: str = "zero"
) -> Images:
    """Scales each image about its centre by ``factors`` (``> 1`` zooms in), bilinearly.

    Args:
      images: ``[batch, height, width, channels]``.
      factors: ``[batch]`` positive scale factor per image.
      fill: ``"zero"`` or ``"edge"`` for samples from outside the image.

    Returns:
      ``[batch, height, width, channels]`` in the dtype of ``images``.
    """
    fn = "scale"
    images = _check_images(fn, images)
    factors = _check_per_example(fn, "factors", factors, images.shape[0])
    return _resample(images, jnp.zeros_like(factors, jnp.float32), factors,
                     _check_fill(fn, fill))


def _draw_degrees(key: PRNGKey, batch: int, max_degrees: float) -> jax.Array:
    return jax.random.uniform(key, (batch,), minval=-max_degrees, maxval=max_degrees)


def _draw_factors(key: PRNGKey, batch: int, max_scale: float) -> jax.Array:
    # Uniform in log-scale, so zooming in by s and out by s are equally likely.
    log_max = math.log1p(max_scale)
    return jnp.exp(jax.random.uniform(key, (batch,), minval=-log_max, maxval=log_max))


def random_rotation(
    key: PRNGKey, images: Images, max_degrees: float, *, fill: str = "zero"
) -> Images:
    """Rotates each image by its own random angle, ``degrees = jax.random.uniform(key,
    [batch], minval=-max_degrees, maxval=max_degrees)``; see :func:`rotate`.

    Args:
      key: PRNG key.
      images: ``[batch, height, width, channels]``.
      max_degrees: largest angle (a Python number >= 0; 0 is the identity).
      fill: ``"zero"`` or ``"edge"``.

    Returns:
      ``[batch, height, width, channels]`` in the dtype of ``images``.
    """
    fn = "random_rotation"
    images = _check_images(fn, images)
    _check_max(fn, "max_degrees", max_degrees)
    degrees = _draw_degrees(key, images.shape[0], float(max_degrees))
    return _resample(images, degrees, jnp.ones_like(degrees), _check_fill(fn, fill))


def random_scale(
    key: PRNGKey, images: Images, max_scale: float, *, fill: str = "zero"
) -> Images:
    """Scales each image by its own random factor ``s`` with ``log s`` uniform on
    ``[-log(1 + max_scale), log(1 + max_scale)]`` (``max_scale=0.1``: between
    1/1.1 and 1.1); see :func:`scale`.

    Args:
      key: PRNG key.
      images: ``[batch, height, width, channels]``.
      max_scale: largest relative size change (a Python number >= 0; 0 is the
        identity).
      fill: ``"zero"`` or ``"edge"``.

    Returns:
      ``[batch, height, width, channels]`` in the dtype of ``images``.
    """
    fn = "random_scale"
    images = _check_images(fn, images)
    _check_max(fn, "max_scale", max_scale)
    factors = _draw_factors(key, images.shape[0], float(max_scale))
    return _resample(images, jnp.zeros_like(factors), factors, _check_fill(fn, fill))


def augment(
    key: PRNGKey,
    images: Images,
    *,
    max_shift: int = 0,
    max_degrees: float = 0.0,
    max_scale: float = 0.0,
    fill: str = "zero",
) -> Images:
    """A random rotation and scaling (one bilinear resampling), then a random shift.

    Every image gets its own angle, factor and shift, drawn as in
    :func:`random_rotation`, :func:`random_scale` and :func:`random_shift`
    from three keys split off ``key``. Transforms whose limit is 0 are skipped
    (they would be the identity), so ``augment(key, x)`` returns ``x``.

    Args:
      key: PRNG key; use a new one every step (``fold_in(key, step)``).
      images: ``[batch, height, width, channels]``.
      max_shift: largest shift in whole pixels (Python int >= 0).
      max_degrees: largest rotation angle in degrees (>= 0).
      max_scale: largest relative size change (>= 0), e.g. 0.1.
      fill: ``"zero"`` or ``"edge"`` for the uncovered border.

    Returns:
      ``[batch, height, width, channels]`` in the dtype of ``images``.
    """
    fn = "augment"
    images = _check_images(fn, images)
    _check_max(fn, "max_shift", max_shift, integer=True)
    _check_max(fn, "max_degrees", max_degrees)
    _check_max(fn, "max_scale", max_scale)
    fill = _check_fill(fn, fill)
    rotation_key, scale_key, shift_key = jax.random.split(key, 3)
    batch = images.shape[0]
    if max_degrees > 0 or max_scale > 0:
        degrees = (_draw_degrees(rotation_key, batch, float(max_degrees)) if max_degrees > 0
                   else jnp.zeros((batch,)))
        factors = (_draw_factors(scale_key, batch, float(max_scale)) if max_scale > 0
                   else jnp.ones((batch,)))
        images = _resample(images, degrees, factors, fill)
    if max_shift > 0:
        shifts = jax.random.randint(shift_key, (batch, 2), -max_shift, max_shift + 1)
        images = _translate(images, shifts, fill)
    return images
