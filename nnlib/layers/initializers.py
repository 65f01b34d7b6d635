"""Weight initializers that nnlib's layers use beyond flax's set.

``orthogonal`` draws the same matrices as ``jax.nn.initializers.orthogonal``
(Saxe et al. 2014; Mezzadri 2007: the Q of a Gaussian matrix's QR, signs
fixed so ``diag(R) > 0``, which makes it Haar-distributed) but computes the
QR with Householder reflections written in ``jax.numpy`` instead of LAPACK's
``geqrf``. Why it matters: on CPU, jaxlib 0.10's batched LAPACK kernels split
their batch over XLA's intra-op thread pool and wait for it. When two such
kernels run at once — two layers initialised inside one ``jax.vmap``ped
program, e.g. an ensemble or PPO over several seeds — both pool threads can
end up waiting for work that sits queued behind them, and the program never
returns (about one run in three of ``jit(vmap(make_ppo_train(...)))`` on a
2-core machine, idle CPU, stuck in ``block_until_ready``). Householder QR
lowers to plain XLA loops and matmuls, so it cannot take part in that
deadlock, and it is exact to float rounding: the reflections produce the
unique QR with positive ``diag(R)``, the same factor LAPACK's gives after
the sign fix.

Usage::

    from nnlib.layers.initializers import orthogonal
    Dense(64, kernel_init=orthogonal(jnp.sqrt(2.0)))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

Initializer = Callable[..., jax.Array]


def householder_orthonormal(z: Float[Array, "n m"]) -> Float[Array, "n m"]:
    """The Q factor of ``z = Q R`` with ``diag(R) >= 0``, by Householder reflections.

    Args:
      z: a tall or square matrix, ``n >= m``.

    Returns:
      ``Q [n, m]`` with orthonormal columns; columns whose ``R`` diagonal is
      zero (rank-deficient ``z``) keep the reflection's sign.
    """
    n, m = z.shape
    if n < m:
        raise ValueError(f"householder_orthonormal expects n >= m, got shape {z.shape}")
    rows = jnp.arange(n)

    def reflect(j, carry):
        r, reflectors = carry
        # Column j below the diagonal; its reflection maps it onto alpha * e_j.
        x = jnp.where(rows >= j, jax.lax.dynamic_index_in_dim(r, j, 1, keepdims=False), 0.0)
        x_j = x[j]
        alpha = -jnp.where(x_j >= 0, 1.0, -1.0).astype(z.dtype) * jnp.linalg.norm(x)
        v = x - alpha * (rows == j).astype(z.dtype)
        v_norm = jnp.linalg.norm(v)
        v = jnp.where(v_norm > 0, v / jnp.where(v_norm > 0, v_norm, 1.0), 0.0)
        r = r - 2.0 * jnp.outer(v, v @ r)  # H_j r, H_j = I - 2 v v^T
        return r, reflectors.at[j].set(v)

    r, reflectors = jax.lax.fori_loop(0, m, reflect, (z, jnp.zeros((m, n), z.dtype)))

    def apply(i, q):  # Q = H_0 H_1 ... H_{m-1} I[:, :m], applied right to left
        v = reflectors[m - 1 - i]
        return q - 2.0 * jnp.outer(v, v @ q)

    q = jax.lax.fori_loop(0, m, apply, jnp.eye(n, m, dtype=z.dtype))
    signs = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(z.dtype)
    return q * signs


def orthogonal(scale: float = 1.0, column_axis: int = -1, dtype: Any = jnp.float32) -> Initializer:
    """An orthogonal initializer, drop-in for ``jax.nn.initializers.orthogonal``.

    It reads the same normal draw from the key and returns the same matrix
    (to float rounding), but without a LAPACK call, so it is safe inside
    ``jax.vmap`` on CPU (see the module docstring).

    Args:
      scale: multiplies the orthogonal matrix (a "gain", e.g. ``sqrt(2)`` before ReLU/tanh).
      column_axis: the axis holding the columns; the other axes are flattened
        into rows. Rows or columns are orthonormal, whichever side is smaller.
      dtype: default parameter dtype.

    Returns:
      ``init(key, shape, dtype=dtype) -> Array``.
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = dtype,
             out_sharding: Any = None) -> jax.Array:
        if out_sharding is not None:
            raise NotImplementedError("orthogonal: out_sharding is not supported")
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(f"orthogonal initializer needs at least a 2D shape, got {shape}")
        if any(dim == 0 for dim in shape):
            return jnp.zeros(shape, dtype)
        n_cols = shape[column_axis]
        n_rows = math.prod(shape) // n_cols
        # Half-precision parameters are drawn and orthogonalised in float32.
        compute_dtype = dtype if jnp.finfo(dtype).bits >= 32 else jnp.float32
        z = jax.random.normal(key, (max(n_rows, n_cols), min(n_rows, n_cols)), compute_dtype)
        q = householder_orthonormal(z)
        if n_rows < n_cols:
            q = q.T  # [n_rows, n_cols] with orthonormal rows
        q = jnp.reshape(q, tuple(np.delete(np.array(shape), column_axis)) + (n_cols,))
        q = jnp.moveaxis(q, -1, column_axis)
        return (scale * q).astype(dtype)

    return init


__all__ = ["householder_orthonormal", "orthogonal"]
