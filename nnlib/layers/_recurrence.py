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


def _masked(update: Update) -> Callable[[Carry, Array, Array, Array | None], tuple[Carry, Array]]:
    """``update`` where padded steps (``valid`` False) keep the carry and output zeros."""

    def step(carry, projected, recurrent, valid):
        new, h = update(carry, projected, recurrent)
        if valid is None:
            return new, h
        valid = valid[:, None]  # [B, 1]
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
    reverse: bool = False,
    unroll: int = 1,
) -> tuple[Carry, Array]:
    """Runs ``update`` over time with the fused-weight-gradient backward pass.

    Args:
      update: pure ``(carry, projected_t, recurrent_t) -> (carry, h_t)``.
      hidden_of: pure ``carry -> h`` (the part multiplied by ``kernel``).
      kernel: ``[H, G*H]``; bias: ``[G*H]`` or ``None``.
      carry: the initial state (``hidden_of(carry): [B, H]``).
      projected: ``[T, B, G*H]``, the inputs' half of every gate.
      valid: optional ``[T, B]`` bool; padded steps hold the carry.
      reverse: scan from the last time step to the first.
      unroll: ``lax.scan``'s unroll, forward and backward.

    Returns:
      ``(final_carry, outputs)`` with ``outputs: [T, B, H]`` aligned with the
      input positions.
    """
    step = _masked(update)

    def recurrent_of(carry, kernel, bias):
        r = hidden_of(carry) @ kernel
        return r if bias is None else r + bias

    def forward(kernel, bias, carry, projected, valid, save):
        def body(carry, xs):
            p, v = xs
            r = recurrent_of(carry, kernel, bias)
            new, h = step(carry, p, r, v)
            return new, ((h, carry, r) if save else h)

        return jax.lax.scan(body, carry, (projected, valid), reverse=reverse, unroll=unroll)

    @jax.custom_vjp
    def run(kernel, bias, carry, projected, valid):
        return forward(kernel, bias, carry, projected, valid, save=False)

    def run_fwd(kernel, bias, carry, projected, valid):
        final, (hs, previous, recurrents) = forward(kernel, bias, carry, projected, valid,
                                                    save=True)
        return (final, hs), (kernel, bias, previous, recurrents, projected, valid)

    def run_bwd(residuals, cotangents):
        kernel, bias, previous, recurrents, projected, valid = residuals
        ct_final, ct_hs = cotangents
        # The kernel transposed once, in memory: a product with ``kernel.T``
        # inside the loop has the CPU matmul re-layout the kernel on every
        # step (LSTM 256x1024: 196 vs 166 us per step). The barrier keeps XLA
        # from folding the transpose back into the product.
        kernel_t = jax.lax.optimization_barrier(kernel.T)

        def body(ct_carry, xs):
            prev, r, p, v, ct_h = xs
            _, vjp = jax.vjp(lambda c, p, r: step(c, p, r, v), prev, p, r)
            ct_prev, ct_p, ct_r = vjp((ct_carry, ct_h))
            # r = hidden_of(prev) @ W + b also depends on prev.
            _, hidden_vjp = jax.vjp(hidden_of, prev)
            (ct_prev_from_r,) = hidden_vjp(ct_r @ kernel_t)
            ct_prev = jax.tree.map(jnp.add, ct_prev, ct_prev_from_r)
            return ct_prev, (ct_p, ct_r)

        ct_carry0, (ct_projected, ct_recurrents) = jax.lax.scan(
            body, ct_final, (previous, recurrents, projected, valid, ct_hs),
            reverse=not reverse, unroll=unroll,
        )
        h_previous = hidden_of(previous)  # [T, B, H]
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
        ct_valid = None if valid is None else jnp.zeros(valid.shape, jax.dtypes.float0)
        return ct_kernel, ct_bias, ct_carry0, ct_projected, ct_valid

    run.defvjp(run_fwd, run_bwd)
    # Inside shard_map the weights are replicated and the inputs per-device; a
    # custom VJP must return cotangents typed like its arguments, so the weights
    # enter it already varying and autodiff sums their gradients across devices
    # (the transpose of that cast) outside it.
    kernel, bias, carry = varying_like((kernel, bias, carry), projected)
    return run(kernel, bias, carry, projected, valid)
