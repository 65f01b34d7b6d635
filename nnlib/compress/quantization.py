"""Quantization: int8 weights and activations, after training (PTQ) or during it (QAT).

**Symmetric per-channel int8.** Each output channel ``j`` of a kernel
``W: [..., out]`` gets its own scale ``s_j = max|W[..., j]| / 127`` and is
stored as ``q = clip(round(W / s_j), -127, 127)`` (int8) plus ``s_j``
(float32): 4x smaller than float32, up to one scale per channel. Reading it
back, ``q * s_j`` is within ``s_j / 2`` of ``W`` (round-to-nearest). Per
channel rather than per tensor because one channel of large weights would
otherwise spend the whole int8 range and crush the others.

**PTQ** (post-training quantization) quantizes a trained model's weights —
and, with ``act_qtype``, its activations, here *dynamically*: each matmul
input row gets its own scale at run time — and runs the matmuls as int8 x
int8 -> int32. **QAT** (quantization-aware training) trains through the
same rounding ("fake quantization": quantize then dequantize in float, so
the forward pass sees int8's errors) with the straight-through estimator
(the rounding's gradient is taken as 1), so the weights learn to sit where
rounding hurts least.

Both run through **qwix** (0.1.8), which intercepts ``jax.lax.dot_general``,
``jax.numpy.dot``/``einsum`` and ``jax.lax.conv_general_dilated`` inside a
linen module. Three things fail on nnlib's layers as they are, and
``ptq_model`` / ``qat_model`` add a small adapter (subclasses of qwix's
providers, relying on qwix 0.1.8 internals) for each:

1. nnlib's ``Dense`` computes ``jnp.matmul(x, kernel.astype(dtype))``.
   qwix does not intercept ``jnp.matmul``, and the ``lax.dot_general`` inside
   it is traced inside ``jnp.matmul``'s own ``jit`` and never seen: without
   the adapter a qwix QAT model runs its Dense layers **unquantized, with no
   error** (only convolutions are quantized). The adapter routes
   ``jnp.matmul(x, W)`` with a 2-D ``W`` to qwix's ``dot_general``.
2. PTQ parameters are ``WithAux`` wrappers of qwix ``QArray``s, and
   ``WithAux.astype`` raises ``ValueError: Unsupported type: <class
   'qwix._src.core.qarray.QArray'>`` (``flax_util.update_boxed`` does not
   know ``QArray``), so ``kernel.astype(float32)`` in ``Dense`` and ``Conv``
   fails at ``apply``. The adapter wraps them in a ``WithAux`` whose
   ``astype`` to the stored dtype is the identity (what the cast means).
3. qwix's QAT decides whether a matmul operand is a weight partly by
   *shape* (``flax_util.find_param``): an activation with a layer's kernel
   shape (batch size == fan-in == fan-out, e.g. a batch of 256 through a
   256x256 layer) is taken for a weight and fails with ``AssertionError: lhs
   and rhs cannot be both weights``. The adapter's ``x @ W`` path tells qwix
   that ``x`` is the activation.

qwix's convolution PTQ requires ``act_qtype == weight_qtype``; weight-only
int8 convolutions are not supported there.

**Plain-JAX fallback** (``quantize_per_channel``, ``dequantize``,
``fake_quantize``, ``fake_quantize_params``): the same symmetric per-channel
int8 weights written out in a few lines of ``jnp``, independent of qwix —
weight-only fake quantization that works on any model, and the reference the
tests hold qwix to. (qwix's own int8 grid differs by half a step: it maps
``max|W|`` to 127.5 and clips to [-128, 127].)
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from jaxtyping import Array, Float, Int8, PyTree
from qwix._src.providers import ptq as _qwix_ptq  # WithAux is not re-exported

from nnlib.compress.pruning import Prunable, default_prunable
from nnlib.train.optim import path_str

# --- plain-JAX fallback: symmetric per-channel int8 ------------------------------


def _qmax(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"quantization: bits must be in [2, 8] (stored as int8), got {bits}")
    return 2 ** (bits - 1) - 1


def quantize_per_channel(
    w: Float[Array, "... out"], *, bits: int = 8
) -> tuple[Int8[Array, "... out"], Float[Array, " out"]]:
    """Symmetric per-output-channel quantization (plain JAX).

    ``scale[j] = max|w[..., j]| / (2^(bits-1) - 1)`` (1 for an all-zero
    channel); ``q = clip(round(w / scale), -qmax, qmax)`` as int8.

    Returns:
      ``(q [..., out] int8, scale [out] float32)``; ``|q * scale - w| <= scale / 2``.
    """
    qmax = _qmax(bits)
    w = jnp.asarray(w, jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)))  # [out]
    scale = jnp.where(absmax > 0, absmax / qmax, 1.0)
    q = jnp.clip(jnp.round(w / scale), -qmax, qmax).astype(jnp.int8)
    return q, scale


def dequantize(q: Int8[Array, "... out"], scale: Float[Array, " out"]
               ) -> Float[Array, "... out"]:
    """``q * scale`` in float32 (the inverse of ``quantize_per_channel``, up to rounding)."""
    return q.astype(jnp.float32) * scale


def fake_quantize(w: Float[Array, "... out"], *, bits: int = 8) -> Float[Array, "... out"]:
    """Quantize-dequantize ``w`` in float with a straight-through gradient (plain JAX).

    Forward: ``dequantize(*quantize_per_channel(w))``; backward: identity
    (``w + stop_gradient(wq - w)``), so it trains.
    """
    wq = dequantize(*quantize_per_channel(w, bits=bits)).astype(w.dtype)
    return w + jax.lax.stop_gradient(wq - w)


def fake_quantize_params(params: PyTree, *, bits: int = 8,
                         quantizable: Prunable = default_prunable) -> PyTree:
    """Weight-only fake quantization of every kernel (``ndim >= 2`` by default)
    of a parameter tree (plain JAX): the float model that int8 weights compute."""
    return jax.tree_util.tree_map_with_path(
        lambda p, w: fake_quantize(w, bits=bits) if quantizable(path_str(p), w) else w, params)


def quantized_size_bytes(params: PyTree, *, bits: int = 8,
                         quantizable: Prunable = default_prunable) -> dict[str, int]:
    """Storage of ``params`` as float32 vs per-channel ``bits``-bit kernels.

    A quantized kernel costs ``ceil(size * bits / 8)`` bytes plus a float32
    scale per output channel; other leaves keep their bytes.

    Returns:
      ``{"float_bytes", "quantized_bytes"}``.
    """
    float_bytes = quantized = 0
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        nbytes = int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize
        float_bytes += nbytes
        if quantizable(path_str(path), w):
            quantized += -(-int(np.prod(w.shape)) * bits // 8) + 4 * w.shape[-1]
        else:
            quantized += nbytes
    return {"float_bytes": float_bytes, "quantized_bytes": quantized}


# --- qwix: PTQ and QAT on nnlib models ------------------------------------------


@flax.struct.dataclass
class _CastableWithAux(_qwix_ptq.WithAux):
    """qwix's PTQ weight wrapper with a working ``astype`` to its own dtype
    (nnlib layers cast their kernel to the compute dtype; see the module
    docstring, failure 2)."""

    def astype(self, dtype: Any) -> _CastableWithAux:
        if jnp.dtype(dtype) == jnp.dtype(self.dtype):
            return self
        raise TypeError(f"a qwix int8 weight cannot be cast to {jnp.dtype(dtype)}; the "
                        f"model's compute dtype must match the weights' ({self.dtype})")


def _matmul_as_dot_general(provider: Any, a: Any, b: Any, *args: Any,
                           preferred_element_type: Any = None, **kwargs: Any) -> Any:
    # x[..., in] @ W[in, out]: the dot_general qwix knows how to quantize.
    if getattr(b, "ndim", 0) == 2 and not args and not kwargs:
        return provider.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())),
                                    preferred_element_type=preferred_element_type)
    return jnp.matmul(a, b, *args, preferred_element_type=preferred_element_type, **kwargs)


class NnlibPtqProvider(qwix.PtqProvider):
    """``qwix.PtqProvider`` that also quantizes ``jnp.matmul`` (nnlib's Dense)."""

    def matmul(self, a, b, *args, **kwargs):
        return _matmul_as_dot_general(self, a, b, *args, **kwargs)

    def get_intercept_map(self):
        return super().get_intercept_map() | {"jax.numpy.matmul": self.matmul}


class _NotAParameter:
    """Stands in for a matmul's activation operand when qwix asks whether it
    is a weight: no parameter has a negative dimension (see failure 3)."""

    shape = (-1,)


class NnlibQtProvider(qwix.QtProvider):
    """``qwix.QtProvider`` that also quantizes ``jnp.matmul`` (nnlib's Dense),
    whose left operand it knows to be the activation."""

    _in_matmul = False

    def matmul(self, a, b, *args, **kwargs):
        self._in_matmul = True
        try:
            return _matmul_as_dot_general(self, a, b, *args, **kwargs)
        finally:
            self._in_matmul = False

    def _create_dot_general_qt_config(self, rule, op_id, lhs, rhs):
        if self._in_matmul:  # x @ W: x is never a weight, whatever its shape
            lhs = _NotAParameter()
        return super()._create_dot_general_qt_config(rule, op_id, lhs, rhs)

    def get_intercept_map(self):
        return super().get_intercept_map() | {"jax.numpy.matmul": self.matmul}


def int8_rules(*, weights: bool = True, activations: bool = True, module_path: str = ".*",
               qat: bool = False) -> list[qwix.QuantizationRule]:
    """One qwix rule: int8 weights and/or (dynamic-range) int8 activations for
    every matmul and convolution under ``module_path`` (a regex on the module
    path, e.g. ``"mlp/.*"``)."""
    rule = qwix.QtRule if qat else qwix.QuantizationRule
    return [rule(module_path=module_path, weight_qtype=jnp.int8 if weights else None,
                 act_qtype=jnp.int8 if activations else None)]


def _castable(tree: PyTree) -> PyTree:
    is_aux = lambda x: isinstance(x, _qwix_ptq.WithAux)  # noqa: E731
    return jax.tree.map(lambda x: _CastableWithAux(x.array, x.how) if is_aux(x) else x,
                        tree, is_leaf=is_aux)


def ptq_model(
    model: nn.Module,
    params: PyTree,
    example_input: Any,
    *,
    rules: list[qwix.QuantizationRule] | None = None,
) -> tuple[nn.Module, PyTree]:
    """Post-training quantization of a trained linen model with qwix.

    Args:
      model: the float model (e.g. ``MLPClassifier``, ``CNN``).
      params: its trained ``"params"`` collection.
      example_input: a batch with the real shapes and dtypes (traced only).
      rules: qwix rules; default ``int8_rules()`` (int8 weights, per output
        channel, and dynamic int8 activations).

    Returns:
      ``(qmodel, qparams)``: call ``qmodel.apply({"params": qparams}, x)``.
      Kernels in ``qparams`` are int8 ``qvalue`` + float32 ``scale``; the
      matmuls and convolutions run in int8 with int32 accumulation.
    """
    rules = rules if rules is not None else int8_rules()
    qmodel = qwix.quantize_model(model, NnlibPtqProvider(rules))
    abstract = jax.eval_shape(qmodel.init, jax.random.key(0), example_input)
    qparams = qwix.quantize_params(params, abstract["params"])
    return qmodel, _castable(qparams)


def qat_model(model: nn.Module, *, rules: list[qwix.QuantizationRule] | None = None
              ) -> nn.Module:
    """The model with qwix fake quantization in every matmul and convolution.

    Same parameters as ``model`` (train it with ``TrainState.create`` as
    usual); the forward pass rounds weights (per channel) and activations (per
    row, dynamic) to int8 and back, the backward pass is straight-through.
    Convert the trained parameters with ``ptq_model`` for int8 inference:
    the numerics are the same.

    Default rules: ``int8_rules(qat=True)``.
    """
    rules = rules if rules is not None else int8_rules(qat=True)
    return qwix.quantize_model(model, NnlibQtProvider(rules))
