"""nnlib.data.augment against numpy and scipy.

Independent truths: ``np.roll`` with the wrapped border zeroed (or edge
repeated) for shifts; ``np.rot90`` for quarter turns; ``scipy.ndimage.rotate``
and ``scipy.ndimage.affine_transform`` (bilinear, ``order=1``) for any angle
and scale; the closed form of a linear ramp under scaling (bilinear
interpolation is exact on linear functions).
"""

import jax
import numpy as np
import pytest
from scipy import ndimage

from nnlib.data.augment import (
    augment,
    random_rotation,
    random_scale,
    random_shift,
    rotate,
    scale,
    translate,
)
from nnlib.layers._checks import ShapeError


def _images(seed=0, batch=6, height=8, width=8, channels=2, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return rng.random((batch, height, width, channels)).astype(dtype)


def _roll_fill(image, dy, dx, fill="zero"):
    """``np.roll`` along height and width with the wrapped part replaced by the fill."""
    h, w = image.shape[:2]
    if fill == "edge":
        rows = np.clip(np.arange(h) - dy, 0, h - 1)
        cols = np.clip(np.arange(w) - dx, 0, w - 1)
        return image[rows][:, cols]
    out = np.roll(image, (dy, dx), axis=(0, 1))
    if dy > 0:
        out[:dy] = 0
    elif dy < 0:
        out[dy:] = 0
    if dx > 0:
        out[:, :dx] = 0
    elif dx < 0:
        out[:, dx:] = 0
    return out


# --- deterministic transforms ---------------------------------------------------------


@pytest.mark.parametrize("fill", ["zero", "edge"])
def test_translate_equals_np_roll_with_fill(fill):
    x = _images(1, batch=5, height=7, width=9)
    shifts = np.array([[0, 0], [2, -3], [-1, 4], [6, 0], [-7, -9]], np.int32)
    out = np.asarray(translate(x, shifts, fill=fill))
    for b, (dy, dx) in enumerate(shifts):
        np.testing.assert_array_equal(out[b], _roll_fill(x[b], dy, dx, fill))


def test_rotate_quarter_turns_equal_np_rot90():
    x = _images(2, batch=4, height=6, width=6)
    out = np.asarray(rotate(x, np.array([90.0, 180.0, 270.0, -90.0])))
    for b, k in enumerate([1, 2, 3, -1]):
        np.testing.assert_allclose(out[b], np.rot90(x[b], k, axes=(0, 1)), atol=1e-5)


@pytest.mark.parametrize("fill,mode", [("zero", "grid-constant"), ("edge", "nearest")])
def test_rotate_matches_scipy_at_any_angle(fill, mode):
    x = _images(3, batch=4, height=9, width=7, channels=1)
    degrees = np.array([12.5, -33.0, 71.0, 145.0], np.float32)
    out = np.asarray(rotate(x, degrees, fill=fill))
    for b, angle in enumerate(degrees):
        ref = ndimage.rotate(x[b, :, :, 0].astype(np.float64), float(angle), reshape=False,
                             order=1, mode=mode)
        np.testing.assert_allclose(out[b, :, :, 0], ref, atol=2e-5)


@pytest.mark.parametrize("factor", [0.8, 1.25, 2.0])
def test_scale_matches_scipy_affine_transform(factor):
    x = _images(4, batch=1, height=8, width=10, channels=1)
    centre = (np.array([8, 10]) - 1) / 2
    # out[p] = in[c + (p - c) / s]  <=>  affine_transform(matrix=I/s, offset=c - c/s)
    ref = ndimage.affine_transform(x[0, :, :, 0].astype(np.float64), np.eye(2) / factor,
                                   offset=centre - centre / factor, order=1,
                                   mode="grid-constant")
    out = np.asarray(scale(x, np.array([factor])))
    np.testing.assert_allclose(out[0, :, :, 0], ref, atol=2e-5)


def test_scale_of_a_linear_ramp_is_the_closed_form():
    h, w, s = 9, 9, 1.5
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ramp = (0.3 * rows + 0.7 * cols).astype(np.float32)[None, :, :, None]
    out = np.asarray(scale(ramp, np.array([s]), fill="edge"))[0, :, :, 0]
    c = (h - 1) / 2
    expected = 0.3 * (c + (rows - c) / s) + 0.7 * (c + (cols - c) / s)
    np.testing.assert_allclose(out, expected, atol=1e-5)  # zoom in: every sample is inside


# --- identities, shapes, dtypes ------------------------------------------------------


def test_zero_limits_are_the_identity():
    x = _images(5)
    key = jax.random.key(0)
    np.testing.assert_array_equal(random_shift(key, x, 0), x)
    np.testing.assert_allclose(random_rotation(key, x, 0.0), x, atol=1e-6)
    np.testing.assert_allclose(random_scale(key, x, 0.0), x, atol=1e-6)
    np.testing.assert_array_equal(augment(key, x), x)
    np.testing.assert_allclose(rotate(x, np.zeros(6)), x, atol=1e-6)
    np.testing.assert_array_equal(translate(x, np.zeros((6, 2), np.int32)), x)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8])
def test_shapes_and_dtypes_are_kept(dtype):
    x = (_images(6, batch=3, height=8, width=6, channels=3) * 200).astype(dtype)
    key = jax.random.key(1)
    for out in (random_shift(key, x, 2), random_rotation(key, x, 20.0),
                random_scale(key, x, 0.2),
                augment(key, x, max_shift=1, max_degrees=10.0, max_scale=0.1)):
        assert out.shape == x.shape and out.dtype == x.dtype
    if dtype == np.uint8:  # rounded, not truncated: a quarter turn is exact
        np.testing.assert_array_equal(rotate(x, np.full(3, 180.0)),
                                      np.rot90(x, 2, axes=(1, 2)))


# --- randomness ---------------------------------------------------------------------


def test_random_shift_gives_each_example_its_own_in_range_shift():
    # One image repeated: each output must be the image shifted by some (dy, dx) in range,
    # found by trying every candidate with the numpy reference.
    batch, k = 16, 2
    image = _images(7, batch=1, height=8, width=8, channels=1)[0]
    x = np.repeat(image[None], batch, axis=0)
    out = np.asarray(random_shift(jax.random.key(3), x, k))
    found = []
    for b in range(batch):
        matches = [(dy, dx) for dy in range(-k, k + 1) for dx in range(-k, k + 1)
                   if np.array_equal(out[b], _roll_fill(image, dy, dx))]
        assert len(matches) == 1, f"example {b} is no shift of the input within {k} pixels"
        found.append(matches[0])
    assert len(set(found)) >= 8  # 25 possible shifts, 16 draws: not all the same


def test_random_rotation_uses_the_documented_angles():
    batch, max_degrees = 5, 30.0
    key = jax.random.key(4)
    x = _images(8, batch=batch, height=8, width=8, channels=1)
    out = np.asarray(random_rotation(key, x, max_degrees))
    angles = np.asarray(jax.random.uniform(key, (batch,), minval=-max_degrees,
                                           maxval=max_degrees))
    assert len(np.unique(angles)) == batch
    for b in range(batch):
        ref = ndimage.rotate(x[b, :, :, 0].astype(np.float64), float(angles[b]), reshape=False,
                             order=1, mode="grid-constant")
        np.testing.assert_allclose(out[b, :, :, 0], ref, atol=2e-5)


def test_same_key_same_output_and_different_examples_differ():
    image = _images(9, batch=1)[0]
    x = np.repeat(image[None], 8, axis=0)
    kwargs = dict(max_shift=1, max_degrees=15.0, max_scale=0.1)
    a = np.asarray(augment(jax.random.key(5), x, **kwargs))
    b = np.asarray(augment(jax.random.key(5), x, **kwargs))
    c = np.asarray(augment(jax.random.key(6), x, **kwargs))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    distinct = {a[i].tobytes() for i in range(8)}
    assert len(distinct) == 8  # every copy of the same image got its own transform


def test_jit_equals_eager_and_runs_inside_a_step():
    x = _images(10)
    key = jax.random.key(7)
    kwargs = dict(max_shift=2, max_degrees=20.0, max_scale=0.2, fill="edge")
    eager = augment(key, x, **kwargs)
    jitted = jax.jit(lambda k, im: augment(k, im, **kwargs))(key, x)
    np.testing.assert_allclose(eager, jitted, atol=1e-6)

    @jax.jit
    def step(step_index, images):  # the pattern a train step uses
        return random_shift(jax.random.fold_in(key, step_index), images, 1)

    first, second = step(0, x), step(1, x)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, random_shift(jax.random.fold_in(key, 0), x, 1))


# --- errors -----------------------------------------------------------------------------


def test_bad_inputs_raise_readable_errors():
    key = jax.random.key(0)
    x = _images(11)
    with pytest.raises(ShapeError, match=r"random_shift expected images of shape \[batch, "
                       r"height, width, channels\], got shape \(8, 8, 2\).*images\[\.\.\., None\]"):
        random_shift(key, x[0], 1)
    with pytest.raises(ValueError, match=r"random_shift expected max_shift to be a Python int "
                       r">= 0, got -1"):
        random_shift(key, x, -1)
    with pytest.raises(ValueError, match=r"random_shift expected max_shift to be a Python int "
                       r">= 0, got 1.5"):
        random_shift(key, x, 1.5)
    with pytest.raises(ValueError, match=r"random_rotation expected max_degrees to be a Python "
                       r"number >= 0, got nan"):
        random_rotation(key, x, float("nan"))
    with pytest.raises(ValueError, match=r"augment expected fill 'zero' or 'edge', got 'wrap'"):
        augment(key, x, max_shift=1, fill="wrap")
    with pytest.raises(ShapeError, match=r"rotate expected degrees of shape \[batch\] = \(6,\)"
                       r" \(one per image\), got shape \(3,\)"):
        rotate(x, np.zeros(3))
    with pytest.raises(TypeError, match=r"translate expected integer shifts"):
        translate(x, np.zeros((6, 2), np.float32))
    with pytest.raises(TypeError, match=r"augment expected float or integer images, got dtype "
                       r"bool"):
        augment(key, x > 0.5)
    with pytest.raises(TypeError, match=r"scale expected images to be an array"):
        scale([[1.0]], np.ones(1))
