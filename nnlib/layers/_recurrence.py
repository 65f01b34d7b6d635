"""The recurrence of a gated RNN with a hand-written backward pass.

A recurrent layer computes, for t = 1..T (inputs already projected)::

    r_t = h_{t-1} W + b                       # [B, G*H], the recurrent matmul
    carry_t, h_t = update(carry_{t-1}, p_t, r_t)

Reverse-mode autodiff of that ``lax.scan`` differentiates each step on its
own, so the weight gradient ``dW = sum_t h_{t-1}^T dr_t`` is accumulated one
``[H, G*H]`` outer product per step inside the backward loop, carried through
every iteration. That is T small matmuls in a serial chain. Here the backward
loop only carries the state's gradient and emits ``dr_t``; ``dW`` is then ONE
matmul over all time steps and the batch (``[H, T*B] @ [T*B, G*H]``), which
the CPU runs at matmul speed, and ``db`` one sum. This is what cuDNN's and
PyTorch's fused RNN kernels do. The math is unchanged (equal to plain
autodiff to float rounding).

With ``features_first=True`` every per-step array is laid out ``[features,
batch]``: the carry ``[H, B]``, the recurrent product ``W^T h_{t-1}^T``
(``[G*H, H] @ [H, B]``) and its backward ``W dr_t^T``. XLA:CPU's matmul
library runs these tall products faster than the wide ``[B, H] @ [H, G*H]``
ones at a small batch (LSTM 256x1024 at batch 32: ~120 vs ~155 us per step).
The stacked inputs and cotangents then need one transpose each between
``[T, G*H, B]`` and the ``[T*B, G*H]`` rows of the weight gradients; an
``input_bias`` added inside the loop (instead of to ``projected``) keeps the
inputs' transpose a plain copy, which XLA:CPU runs ~4x faster than a
transpose fused with an addition.

The function is a ``jax.custom_vjp``: reverse mode (``grad``, ``vjp``, and
reverse-over-reverse) works, forward mode (``jvp``, ``jacfwd``, ``hessian``)
does not — ``nnlib.layers.RNN(fused=False)`` uses the plain scan for that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

Carry = Any
Update = Callable[[Carry, Array, Array], tuple[Carry, Array]]


def varying_like(carry: Any, inputs: Array) -> Any:
    """``carry`` (any pytree) typed as varying over ``inputs``' ``shard_map`` axes.

    Inside ``jax.shard_map`` (e.g. ``make_data_parallel_train_step(method=
    "shard_map")``) the per-device inputs vary across devices while a zero
    initial carry does not, and ``lax.scan`` requires the carry it is given and
    the carry the step returns to have the same type. Adding a zero made from
    ``inputs`` (``zeros_like`` keeps their varying axes) casts the carry; outside
    ``shard_map`` it is the identity and XLA folds the addition away.
    """
    zero = jnp.zeros_like(inputs, shape=())
    return jax.tree.map(lambda c: c + zero.astype(c.dtype), carry)


def _masked(
    update: Update, features_first: bool
) -> Callable[[Carry, Array, Array, Array | None], tuple[Carry, Array]]:
    """``update`` where padded steps (``valid`` False) keep the carry and output zeros."""

    def step(carry, projected, recurrent, valid):
        new, h = update(carry, projected, recurrent)
        if valid is None:
            return new, h
        valid = valid[None, :] if features_first else valid[:, None]  # [1, B] or [B, 1]
        new = jax.tree.map(lambda n, o: jnp.where(valid, n, o), new, carry)
        return new, jnp.where(valid, h, jnp.zeros_like(h))

    return step


def recurrence(
    update: Update,
    hidden_of: Callable[[Carry], Array],
    kernel: Array,
    bias: Array | None,
    carry: Carry,
    projected: Array,
    valid: Array | None = None,
    *,
    input_bias: Array | None = None,
    reverse: bool = False,
    unroll: int = 1,
    features_first: bool = False,
) -> tuple[Carry, Array]:
    """Runs ``update`` over time with the fused-weight-gradient backward pass.

    Args:
      update: pure ``(carry, projected_t, recurrent_t) -> (carry, h_t)``, its
        arrays laid out as ``carry`` and ``projected`` below.
      hidden_of: pure ``carry -> h`` (the part multiplied by ``kernel``).
      kernel: ``[H, G*H]``; bias: ``[G*H]`` or ``None``.
      carry: the initial state (``hidden_of(carry): [B, H]``, or ``[H, B]``
        with ``features_first``).
      projected: ``[T, B, G*H]`` (``[T, G*H, B]`` with ``features_first``),
        the inputs' half of every gate.
      valid: optional ``[T, B]`` bool; padded steps hold the carry.
      input_bias: optional ``[G*H]`` added to every step of ``projected``
        inside the loop (the same as adding it beforehand).
      reverse: scan from the last time step to the first.
      unroll: ``lax.scan``'s unroll, forward and backward.
      features_first: every per-step array ``[features, batch]`` (see the
        module docstring).

    Returns:
      ``(final_carry, outputs)`` with ``outputs: [T, B, H]`` (``[T, H, B]``
      with ``features_first``) aligned with the input positions.
    """
    step = _masked(update, features_first)

    def with_bias(x, bias):  # x: [B, G*H], or [G*H, B] features first
        if bias is None:
            return x
        return x + (bias[:, None] if features_first else bias)

    def forward(kernel, bias, input_bias, carry, projected, valid, save):
        # Features first, the loop multiplies by the kernel transposed, laid
        # out once in memory (the barrier keeps XLA from folding it back).
        weights = jax.lax.optimization_barrier(kernel.T) if features_first else kernel

        def body(carry, xs):
            p, v = xs
            h = hidden_of(carry)
            r = with_bias(weights @ h if features_first else h @ weights, bias)
            new, h = step(carry, with_bias(p, input_bias), r, v)
            return new, ((h, carry, r) if save else h)

        return jax.lax.scan(body, carry, (projected, valid), reverse=reverse, unroll=unroll)

    @jax.custom_vjp
    def run(kernel, bias, input_bias, carry, projected, valid):
        return forward(kernel, bias, input_bias, carry, projected, valid, save=False)

    def run_fwd(kernel, bias, input_bias, carry, projected, valid):
        final, (hs, previous, recurrents) = forward(
            kernel, bias, input_bias, carry, projected, valid, save=True
        )
        return (final, hs), (kernel, bias, input_bias, previous, recurrents, projected, valid)

    def run_bwd(residuals, cotangents):
        kernel, bias, input_bias, previous, recurrents, projected, valid = residuals
        ct_final, ct_hs = cotangents
        # Batch first, the loop multiplies by the kernel transposed once, in
        # memory: a product with ``kernel.T`` inside the loop has the CPU
        # matmul re-layout the kernel on every step (LSTM 256x1024: 196 vs
        # 166 us per step). The barrier keeps XLA from folding the transpose
        # back into the product. Features first, ``kernel`` itself is the
        # operand.
        weights = kernel if features_first else jax.lax.optimization_barrier(kernel.T)
        shared = []  # whether the cotangents of p_t and r_t are one array

        def body(ct_carry, xs):
            prev, r, p, v, ct_h = xs
            _, vjp = jax.vjp(lambda c, p, r: step(c, p, r, v), prev, with_bias(p, input_bias), r)
            ct_prev, ct_p, ct_r = vjp((ct_carry, ct_h))
            # r = hidden_of(prev) @ W + b also depends on prev.
            _, hidden_vjp = jax.vjp(hidden_of, prev)
            (ct_prev_from_r,) = hidden_vjp(weights @ ct_r if features_first else ct_r @ weights)
            ct_prev = jax.tree.map(jnp.add, ct_prev, ct_prev_from_r)
            # Where the cell adds p_t and r_t first (SimpleRNN, LSTM) their
            # cotangents are the same array: one stack for both.
            shared.append(ct_p is ct_r)
            return ct_prev, ((ct_r,) if shared[-1] else (ct_p, ct_r))

        ct_carry0, ct_stacks = jax.lax.scan(
            body, ct_final, (previous, recurrents, projected, valid, ct_hs),
            reverse=not reverse, unroll=unroll,
        )
        ct_recurrents = ct_stacks[-1]  # [T, B, G*H] (features first: [T, G*H, B])
        h_previous = hidden_of(previous)  # [T, B, H] (features first: [T, H, B])
        if features_first:
            # Batch first for the weight gradient's rows: one plain transpose.
            ct_recurrents = jnp.swapaxes(ct_recurrents, 1, 2)
            h_previous = jnp.swapaxes(h_previous, 1, 2)
        # One [H, T*B] @ [T*B, G*H] product over a flattened axis (contracting
        # T and B as two axes makes XLA:CPU copy ct_recurrents transposed
        # first). The hidden states are transposed in memory first: as a
        # transposed operand the product left the CPU's fast matmul library
        # (LSTM 256x2048x1024: 8.2 ms; transpose + product: 6.8 ms).
        h_previous_t = jax.lax.optimization_barrier(
            h_previous.reshape(-1, h_previous.shape[-1]).T
        )  # [H, T*B]
        ct_kernel = h_previous_t @ ct_recurrents.reshape(-1, ct_recurrents.shape[-1])  # [H, G*H]
        ct_bias = None if bias is None else ct_recurrents.sum(axis=(0, 1))
        if len(ct_stacks) == 1:
            # The input projection's backward then reads the same batch-first
            # rows (XLA cancels the two transposes).
            ct_projected = jnp.swapaxes(ct_recurrents, 1, 2) if features_first else ct_recurrents
        else:
            ct_projected = ct_stacks[0]
        batch_axis = 2 if features_first else 1
        ct_input_bias = None if input_bias is None else ct_projected.sum(axis=(0, batch_axis))
        ct_valid = None if valid is None else jnp.zeros(valid.shape, jax.dtypes.float0)
        return ct_kernel, ct_bias, ct_input_bias, ct_carry0, ct_projected, ct_valid

    run.defvjp(run_fwd, run_bwd)
    # Inside shard_map the weights are replicated and the inputs per-device; a
    # custom VJP must return cotangents typed like its arguments, so the weights
    # enter it already varying and autodiff sums their gradients across devices
    # (the transpose of that cast) outside it.
    kernel, bias, input_bias, carry = varying_like((kernel, bias, input_bias, carry), projected)
    return run(kernel, bias, input_bias, carry, projected, valid)
