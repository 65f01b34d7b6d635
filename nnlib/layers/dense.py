"""Dense (fully connected) layers and the multilayer perceptron.

A ``Dense`` layer is the neuron of the field vectorized: ``y = x @ W + b`` with
``W: [in_features, features]``. An ``MLP`` stacks them with a named
activation between layers, optional normalization and dropout.

``matmul_last_axis(x, kernel)`` is the product every ``Dense`` computes:
``x @ kernel`` over the last axis, with the leading axes of ``x`` flattened
into one first. The values are those of ``jnp.matmul``; the difference is the
gradient. For ``x: [B, T, in]`` the weight gradient is ``sum_{b,t} x[b,t]^T
g[b,t]``; written over two contracted axes, XLA:CPU copies the output gradient
``g`` into a transposed layout before every such product, while over one
flattened axis it is a single ``[B*T, in]^T @ [B*T, out]`` product that reads
``g`` where it lies. On the benchmark GPT (4 layers, width 128, batch 12 x 64
tokens) that copy was ~20 % of the train step: 13.2 -> 16.2 steps/s.

A single row (``x`` with one example, as every example is inside
``jax.vmap`` of a per-example gradient) takes its own derivative rule: JAX
transposes ``x @ kernel`` into a ``[out, in]`` product and a transpose, which
for one row XLA:CPU turns into an outer product written in transposed order
and copied. The rule writes the kernel's tangent as a sum of ``x[:, None] *
dkernel`` over ``in``, whose transpose is the outer product in ``[in, out]``
order: per-example gradients of the benchmark MLP (784-512-512-10, batch 64)
34.5 -> 9.2 ms, the same values bit for bit. Both factors of that outer
product pass through ``nnlib.layers._native.materialize``, an identity XLA
cannot fuse through: XLA:CPU had folded the activations and their derivatives
into the outer products, recomputing them for each of the 784 or 512 rows
(the same program on the 2-core Xeon: 11.9 -> 10.7 ms).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float

from nnlib.layers._checks import check_input, param_shape
from nnlib.layers._native import materialize, narrow_matmul, narrow_matmul_applies
from nnlib.layers.activations import get_activation
from nnlib.layers.normalization import BatchNorm, Dropout, LayerNorm

Initializer = Callable[..., Array]


_LAX_DOT = lax.dot_general
_LAX_DOT_CODE = _LAX_DOT.__code__


def dot_intercepted() -> bool:
    """Whether something has replaced ``lax.dot_general`` for now (a
    quantization library such as qwix patches it while it transforms a
    model): a product it is meant to see stays XLA's, not the native one."""
    current = lax.dot_general
    return current is not _LAX_DOT or getattr(current, "__code__", None) is not _LAX_DOT_CODE


def matmul_last_axis(
    x: Float[Array, "... in_features"],
    kernel: Float[Array, "in_features features"],
    *,
    preferred_element_type: Any = None,
) -> Float[Array, "... features"]:
    """``x @ kernel`` over the last axis of ``x``, as one 2-D product.

    Args:
      x: ``[..., in_features]``.
      kernel: ``[in_features, features]``.
      preferred_element_type: accumulation / result dtype (``None``: the
        promoted input dtype), as in ``jnp.matmul``.

    Returns:
      ``[..., features]``, equal to ``jnp.matmul(x, kernel)``.

    The leading axes are flattened (a free reshape) so that the product, and
    its transpose for the kernel gradient, is a plain ``[N, in] @ [in, out]``
    matrix product; a single row (``N = 1``) differentiates through its own
    rule, and a narrow float32 kernel (a classifier head) runs, with its
    derivatives, in ``nnlib.layers._native.narrow_matmul`` on the CPU. See the
    module docstring for why all three are faster.
    """
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 1:
        y = _row_matmul(rows, kernel, preferred_element_type)
    elif (preferred_element_type in (None, jnp.float32) and not dot_intercepted()
          and narrow_matmul_applies(*rows.shape, kernel.shape[1], rows.dtype, kernel.dtype)):
        y = narrow_matmul(rows, kernel)
    else:
        y = jnp.matmul(rows, kernel, preferred_element_type=preferred_element_type)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _row_matmul(row: Array, kernel: Array, preferred_element_type: Any) -> Array:
    """``[1, in] @ [in, out]``, whose kernel derivative is an outer product
    in ``[in, out]`` order (see the module docstring)."""
    return jnp.matmul(row, kernel, preferred_element_type=preferred_element_type)


@functools.partial(_row_matmul.defjvp, symbolic_zeros=True)
def _row_matmul_jvp(preferred_element_type, primals, tangents):
    row, kernel = primals
    d_row, d_kernel = tangents
    y = _row_matmul(row, kernel, preferred_element_type)
    # JAX calls the rule only with at least one perturbed input.
    row_term = (None if isinstance(d_row, SymbolicZero)
                else jnp.matmul(d_row, kernel, preferred_element_type=y.dtype))
    if isinstance(d_kernel, SymbolicZero):
        return y, row_term
    # Multiplied and accumulated as wide as the product would be (float32 for
    # bf16): bf16 products would round every term before the float32 sum.
    acc = np.promote_types(y.dtype, np.float32)
    # Both factors of the transposed term (the outer product of the row and
    # the output gradient) pass through ``materialize``: each is formed once
    # before the outer product reads it, where XLA:CPU fused their producers
    # (the activations before and after the layer and their derivatives) into
    # the outer product, recomputing them for every element of it.
    kernel_term = jnp.sum(materialize(row[0].astype(acc))[:, None] * d_kernel.astype(acc), axis=0)
    kernel_term = materialize(kernel_term[None].astype(y.dtype))
    return y, kernel_term if row_term is None else row_term + kernel_term


class Dense(nn.Module):
    """``y = x @ kernel + bias`` over the last axis.

    Attributes:
      features: output size.
      use_bias: add a learned bias.
      kernel_init: initializer for ``kernel: [in_features, features]``
        (default LeCun normal, flax's and JAX's convention).
      bias_init: initializer for ``bias: [features]``.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); ``None`` keeps the
        input's dtype.
      param_dtype: storage dtype of the parameters.

    Shapes: ``x: [..., in_features] -> [..., features]``.
    """

    features: int
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... in_features"]) -> Float[Array, "... features"]:
        known = param_shape(self.variables, "params", "kernel")
        check_input(
            "Dense", x, layout="[..., in_features]", min_ndim=1,
            features=known[0] if known else None,
        )
        kernel = self.param(
            "kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype
        )
        dtype = self.dtype or x.dtype
        y = matmul_last_axis(x.astype(dtype), kernel.astype(dtype))  # [..., features]
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y


class MLP(nn.Module):
    """Multilayer perceptron: ``[Dense -> norm -> activation -> dropout] * n -> Dense``.

    Attributes:
      hidden_sizes: widths of the hidden layers, e.g. ``(512, 512)``.
      out_features: size of the final linear layer (no activation after it);
        ``None`` ends on the last hidden layer's activation.
      activation: name (see ``nnlib.layers.activations``) or callable.
      dropout_rate: dropout after each hidden activation (active when
        ``train=True``; needs the ``"dropout"`` rng).
      normalization: ``None``, ``"layer"`` or ``"batch"``, applied before each
        hidden activation. ``"batch"`` keeps running statistics in the mutable
        ``"batch_stats"`` collection.
      use_bias: biases in every Dense layer.

    Shapes: ``x: [..., in_features] -> [..., out_features]`` (the batch is any
    number of leading axes; ``"batch"`` normalization needs at least one).
    """

    hidden_sizes: Sequence[int]
    out_features: int | None = None
    activation: str | Callable[[Array], Array] = "relu"
    dropout_rate: float = 0.0
    normalization: str | None = None
    use_bias: bool = True

    @nn.compact
    def __call__(
        self, x: Float[Array, "... in_features"], *, train: bool = False
    ) -> Float[Array, "... out_features"]:
        check_input("MLP", x, layout="[..., in_features]", min_ndim=1)
        if self.normalization not in (None, "layer", "batch"):
            raise ValueError(
                f"MLP normalization must be None, 'layer' or 'batch', "
                f"got {self.normalization!r}"
            )
        act = get_activation(self.activation)
        for i, width in enumerate(self.hidden_sizes):
            x = Dense(width, use_bias=self.use_bias, name=f"dense_{i}")(x)
            if self.normalization == "layer":
                x = LayerNorm(name=f"norm_{i}")(x)
            elif self.normalization == "batch":
                x = BatchNorm(name=f"norm_{i}")(x, train=train)
            x = act(x)
            x = Dropout(self.dropout_rate, name=f"dropout_{i}")(x, train=train)
        if self.out_features is not None:
            x = Dense(self.out_features, use_bias=self.use_bias, name="output")(x)
        return x
