"""nnlib.layers.initializers.orthogonal: the same matrices as jax's, without LAPACK."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnlib.layers import LSTMCell
from nnlib.layers.initializers import householder_orthonormal, orthogonal

SHAPES = [((16, 16), -1), ((4, 24), -1), ((24, 4), -1), ((3, 3, 4, 8), -1), ((3, 3, 4, 8), -2),
          ((5, 7, 3), 0), ((1, 1), -1)]


@pytest.mark.parametrize("shape,column_axis", SHAPES)
def test_orthogonal_draws_the_matrix_jax_draws(shape, column_axis):
    """Same key, same normal draw, same QR factor (LAPACK's, sign-fixed) to float rounding."""
    key = jax.random.key(7)
    ours = orthogonal(1.7, column_axis)(key, shape)
    reference = jax.nn.initializers.orthogonal(1.7, column_axis)(key, shape)
    assert ours.shape == shape and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, reference, atol=2e-6)


@pytest.mark.parametrize("shape,column_axis", SHAPES)
def test_orthogonal_rows_or_columns_are_orthonormal(shape, column_axis):
    q = np.asarray(orthogonal(1.0, column_axis)(jax.random.key(1), shape), np.float64)
    q = np.moveaxis(q, column_axis, -1).reshape(-1, shape[column_axis])  # [rows, columns]
    gram = q.T @ q if q.shape[0] >= q.shape[1] else q @ q.T
    np.testing.assert_allclose(gram, np.eye(len(gram)), atol=1e-5)


def test_householder_matches_numpy_qr_with_positive_diagonal():
    z = np.random.default_rng(0).normal(size=(9, 5))
    q_np, r_np = np.linalg.qr(z)
    q_np = q_np * np.sign(np.diag(r_np))
    with jax.enable_x64(True):
        q = householder_orthonormal(jnp.asarray(z))
    np.testing.assert_allclose(q, q_np, atol=1e-12)


def test_householder_keeps_orthonormal_columns_for_rank_deficient_input():
    z = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    z[:, 2] = 0.0  # a zero column
    z[:, 3] = z[:, 0]  # a repeated one
    q = np.asarray(householder_orthonormal(jnp.asarray(z)), np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-5)
    # The columns that carry rank still span z's.
    np.testing.assert_allclose(q[:, :2] @ (q[:, :2].T @ z[:, :2]), z[:, :2], atol=1e-5)


def test_orthogonal_errors_and_edge_cases():
    with pytest.raises(ValueError, match="at least a 2D shape"):
        orthogonal()(jax.random.key(0), (5,))
    with pytest.raises(ValueError, match="n >= m"):
        householder_orthonormal(jnp.zeros((2, 3)))
    assert orthogonal()(jax.random.key(0), (0, 4)).shape == (0, 4)
    assert orthogonal(dtype=jnp.bfloat16)(jax.random.key(0), (4, 4)).dtype == jnp.bfloat16


def test_vmapped_initialisation_lowers_without_lapack():
    """The deadlock-prone piece is LAPACK's batched geqrf custom call; none is left."""
    init = orthogonal()
    program = jax.jit(jax.vmap(lambda k: [init(key, (8, 8)) for key in jax.random.split(k, 3)]))
    keys = jax.random.split(jax.random.key(0), 2)
    assert "custom_call" not in program.lower(keys).as_text()
    reference = jax.jit(jax.vmap(lambda k: jax.nn.initializers.orthogonal()(k, (8, 8))))
    assert "lapack" in reference.lower(keys).as_text()  # the check above can tell


def test_many_concurrent_vmapped_initialisations_finish():
    """Four orthogonal matrices per seed, two seeds, 500 times: with LAPACK's QR this
    program stalls for ever within seconds on a 2-core CPU; here it must finish."""
    script = textwrap.dedent("""
        import jax
        from nnlib.layers.initializers import orthogonal
        init = orthogonal()
        program = jax.jit(jax.vmap(lambda k: [init(key, (32, 32))
                                               for key in jax.random.split(k, 4)]))
        keys = jax.random.split(jax.random.key(0), 2)
        for _ in range(500):
            jax.block_until_ready(program(keys))
        print("finished")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "finished" in result.stdout, result.stderr[-2000:]


def test_recurrent_cells_start_with_an_orthogonal_recurrent_kernel():
    cell = LSTMCell(8)
    variables = cell.init(jax.random.key(0), cell.initialize_carry(2),
                          jnp.zeros((2, 3)))
    kernel = np.asarray(variables["params"]["recurrent"]["kernel"], np.float64)  # [8, 32]
    np.testing.assert_allclose(kernel @ kernel.T, np.eye(8), atol=1e-5)
