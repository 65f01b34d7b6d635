"""Convolutions (1-D and 2-D) and the conv -> norm -> activation -> pool block.

Layout is channels last: ``x: [batch, width, channels]`` for ``Conv1D`` and
``x: [batch, height, width, channels]`` for ``Conv2D``. The batch axis is
required (add one with ``x[None]``). Parameters use flax's layout, so flax
checkpoints load unchanged::

    kernel: [*kernel_size, in_channels // groups, features]
    bias:   [features]

PyTorch stores ``Conv2d.weight`` as ``[features, in_channels // groups, kh,
kw]``; ``weight.permute(2, 3, 1, 0)`` gives nnlib's kernel.

The convolution is ``jax.lax.conv_general_dilated`` called directly, as a
cross-correlation (the kernel is not flipped, as in every deep learning
library). Lowering it to patches + matmul ("im2col") was measured 4x slower on
CPU, so XLA's convolution is used as is for the input's gradient and, mostly,
forward. On the CPU (``native``, default on) two float32 cases of stride-1,
undilated, single-group convolutions take other paths, the same math:

- over 16k input channels, the kernel's gradient is nnlib's native kernel:
  XLA:CPU forms it as a convolution over the batch after transposing the input
  and the output gradient, 6.5-7.0 ms for the benchmark CNN's second layer
  (batch 128, 14x14, 32 -> 64 channels), the native product over pixels
  4.2-4.4 ms;
- over few input channels (an image's first layer: at most
  ``SHIFTED_CONV_MAX_TAPS`` products ``KH * KW * C`` per output), the forward
  pass is a sum of shifted elementwise products (``shifted_conv``), which XLA
  fuses into one pass over the output: the benchmark CNN's first layer (1
  channel, 28x28, batch 128, 32 features) 2.6-2.9 -> 0.51-0.54 ms. Its
  derivatives are XLA's convolution's, except the kernel's gradient, which is
  the native few-tap kernel where the kernels are built (the same layer
  1.0-1.2 -> 0.39-0.41 ms; a 3-channel 32x32 layer to 64 features 4.4 ->
  2.1 ms).

Both step aside while ``lax.conv_general_dilated`` is replaced by something
that must see the convolution (``nnlib.compress``'s qwix quantization patches
it; ``conv_intercepted``). ``experiments/bench/NOTES.md`` has the
measurements.

Options, per spatial axis (an int means the same on every axis):

- ``strides``: step between output positions.
- ``dilation``: gap between kernel taps (atrous convolution); a kernel of size
  ``k`` and dilation ``d`` spans ``(k - 1) * d + 1`` inputs.
- ``padding``: ``"SAME"`` (default; ``ceil(size / stride)`` outputs, the extra
  cell of odd padding goes after, as in TensorFlow/flax), ``"VALID"`` (no
  padding), an int ``p`` (``p`` zeros each side, PyTorch's ``padding=p``) or
  one ``(low, high)`` pair per spatial axis.
- ``groups``: split channels into ``groups`` independent convolutions
  (``groups == in_channels`` is a depthwise convolution); both the input
  channels and ``features`` must be divisible by it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from nnlib.layers._checks import ShapeError, check_input, param_shape
from nnlib.layers._native import conv as native_conv
from nnlib.layers._native import conv_applies as _native_conv_applies
from nnlib.layers._native import conv_tangent as native_conv_tangent
from nnlib.layers.activations import get_activation
from nnlib.layers.normalization import BatchNorm, Dropout, LayerNorm
from nnlib.layers.pooling import (
    AvgPool1D,
    AvgPool2D,
    MaxPool1D,
    MaxPool2D,
    Padding,
    _as_tuple,
    _padding_pairs,
)

Initializer = Callable[..., Array]


def _check_conv_input(
    layer: str, x: Any, layout: str, ndim: int, channels: int | None
) -> None:
    """Rank, dtype and (once initialised) channel count of a conv input."""
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) == ndim - 1:
        raise ShapeError(
            f"{layer} expected inputs of shape {layout} (rank {ndim}), got shape "
            f"{tuple(shape)} (rank {len(shape)}); the batch axis is required: for a "
            "single example, add one with x[None]"
        )
    check_input(layer, x, layout=layout, ndim=ndim)
    if channels is not None and x.shape[-1] != channels:
        raise ShapeError(
            f"{layer} expected inputs of shape {layout} with channels={channels} "
            f"(the size its kernel was initialised for), got shape {tuple(x.shape)}"
        )


#: Largest number of taps per output (``KH * KW * C``) that ``shifted_conv``
#: takes. XLA:CPU's convolution runs an image's first layer slowly: a 3x3
#: convolution of a 1-channel 28x28 batch of 128 to 32 features took 2.6-2.9 ms,
#: its shifted products 0.51-0.54 ms. The gain shrinks with the taps (measured
#: at 32 features: 9 taps 5.5x, 18 3.5x, 25 2.7x, 27 2.0x, 36 1.4x, 45 1.1x,
#: 49 (7x7, 1 channel) 2.2x, 50 1.0x, 72 0.4x; ``experiments/bench/NOTES.md``).
SHIFTED_CONV_MAX_TAPS = 49


_LAX_CONV = lax.conv_general_dilated
_LAX_CONV_CODE = _LAX_CONV.__code__


def conv_intercepted() -> bool:
    """Whether something has replaced ``lax.conv_general_dilated`` for now (a
    quantization library such as qwix patches it while it transforms a
    model): a convolution it is meant to see stays that call, not one of the
    CPU paths."""
    current = lax.conv_general_dilated
    return current is not _LAX_CONV or getattr(current, "__code__", None) is not _LAX_CONV_CODE


def shifted_conv_applies(x: Any, kernel: Any, pads: Any) -> bool:
    """Whether ``shifted_conv`` takes a stride-1, undilated, single-group 2-D
    convolution: float32 ``[B, H, W, C]`` on the CPU, at most
    ``SHIFTED_CONV_MAX_TAPS`` taps per output, non-negative padding."""
    kh, kw, c, _ = kernel.shape
    return (x.ndim == 4 and x.dtype == kernel.dtype == jnp.float32
            and kh * kw * c <= SHIFTED_CONV_MAX_TAPS
            and all(p >= 0 for pair in pads for p in pair)
            and jax.default_backend() == "cpu")


def _shifted_products(x: Array, kernel: Array, pads: Any) -> Array:
    """``sum_{i,j,c} x_pad[:, i:i+OH, j:j+OW, c, None] * kernel[i, j, c]``: one
    elementwise pass over the output, which XLA fuses with the padding."""
    kh, kw, c, _ = kernel.shape
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    oh, ow = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    y = None
    for i in range(kh):
        for j in range(kw):
            for ch in range(c):
                term = xp[:, i:i + oh, j:j + ow, ch:ch + 1] * kernel[i, j, ch]
                y = term if y is None else y + term
    return y


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _shifted_conv(x: Array, kernel: Array, pads: Any) -> Array:
    return _shifted_products(x, kernel, pads)


@functools.partial(_shifted_conv.defjvp, symbolic_zeros=True)
def _shifted_conv_jvp(pads, primals, tangents):
    # The tangent (linear in each argument) is XLA's convolution: reverse mode
    # transposes it into XLA's input gradient and into the kernel's gradient,
    # native where the kernels are built (``_native.conv_weight_gradient``'s
    # few-tap kernel), else XLA's. The shifted products' own transposes (a
    # reduction over the batch per tap) ran 3-4x slower than XLA's.
    # (JAX calls the rule with at least one perturbed input.)
    x, kernel = primals
    return _shifted_conv(x, kernel, pads), native_conv_tangent(x, kernel, *tangents, pads)


def shifted_conv(x: Array, kernel: Array, pads: Any) -> Array:
    """``lax.conv_general_dilated(x, kernel, (1, 1), pads)`` (``NHWC``, ``HWIO``)
    computed as ``KH * KW * C`` shifted elementwise products, for convolutions
    over few input channels (``shifted_conv_applies``).

    The tangent is ``lax.conv_general_dilated``'s, so gradients, forward mode,
    higher orders and ``vmap`` are those of the plain convolution up to
    rounding; the kernel's reverse-mode gradient is nnlib's native few-tap
    kernel where ``nnlib.layers._native.conv_weight_gradient_applies``.
    """
    return _shifted_conv(x, kernel, tuple((int(lo), int(hi)) for lo, hi in pads))


class _Conv(nn.Module):
    """Shared body of ``Conv1D`` and ``Conv2D``; see their docstrings."""

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    dilation: int | Sequence[int] = 1
    groups: int = 1
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32
    native: bool = True

    # Fixed per subclass: error-message name, layout, and lax dimension numbers.
    _layer: ClassVar[str]
    _layout: ClassVar[str]
    _ndim: ClassVar[int]  # rank of the input, batch and channels included
    _dimension_numbers: ClassVar[tuple[str, str, str]]

    def _convolve(self, x: Array) -> Array:
        layer, n = self._layer, self._ndim - 2
        known = param_shape(self.variables, "params", "kernel")
        _check_conv_input(
            layer, x, self._layout, self._ndim, known[-2] * self.groups if known else None
        )
        kernel_size = _as_tuple(self.kernel_size, n, "kernel_size", layer)
        strides = _as_tuple(self.strides, n, "strides", layer)
        dilation = _as_tuple(self.dilation, n, "dilation", layer)
        channels = x.shape[-1]
        if self.groups < 1 or channels % self.groups or self.features % self.groups:
            raise ValueError(
                f"{layer} groups={self.groups} must divide both the input channels "
                f"and features={self.features}; got inputs of shape {tuple(x.shape)} "
                f"for {self._layout} (channels={channels})"
            )
        spatial = x.shape[1:-1]
        # A kernel of size k with dilation d covers (k - 1) * d + 1 inputs.
        span = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=True))
        pads = _padding_pairs(self.padding, spatial, span, strides, layer)
        for size, s, (lo, hi) in zip(spatial, span, pads, strict=True):
            if size + lo + hi < s:
                raise ShapeError(
                    f"{layer} kernel_size={kernel_size} with dilation={dilation} spans "
                    f"{span} inputs, more than the padded input: got shape "
                    f"{tuple(x.shape)} for {self._layout} with padding {pads}"
                )

        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*kernel_size, channels // self.groups, self.features),
            self.param_dtype,
        )  # [*kernel_size, C / groups, F]
        dtype = self.dtype or x.dtype
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        plain = (self.groups == 1 and set(strides) == {1} and set(dilation) == {1}
                 and not conv_intercepted())
        # Both CPU paths see a 2-D convolution (a 1-D one over rows of height 1).
        x2 = x if n == 2 else x[:, None]
        kernel2 = kernel if n == 2 else kernel[None]
        pads2 = tuple(pads) if n == 2 else ((0, 0), tuple(pads[0]))
        if self.native and plain and _native_conv_applies(x2, kernel2, pads2):
            y = native_conv(x2, kernel2, pads2)
            y = y if n == 2 else y[:, 0]  # [B, *out_spatial, F]
        elif self.native and plain and shifted_conv_applies(x2, kernel2, pads2):
            y = shifted_conv(x2, kernel2, pads2)
            y = y if n == 2 else y[:, 0]
        else:
            y = lax.conv_general_dilated(
                x,
                kernel,
                window_strides=strides,
                padding=pads,
                rhs_dilation=dilation,
                dimension_numbers=self._dimension_numbers,
                feature_group_count=self.groups,
            )  # [B, *out_spatial, F]
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y


class Conv1D(_Conv):
    """1-D convolution over width (sequences, audio, time series).

    Attributes:
      features: output channels F.
      kernel_size: kernel width K (int or 1-tuple).
      strides: step between outputs (default 1).
      padding: ``"SAME"`` (default), ``"VALID"``, int, or ``[(low, high)]``.
      dilation: gap between kernel taps (default 1).
      groups: number of channel groups (default 1; ``C`` for depthwise).
      use_bias: add a learned bias.
      kernel_init, bias_init: initializers (LeCun normal, zeros).
      dtype: computation dtype; ``None`` keeps the input's.
      param_dtype: storage dtype of the parameters.
      native: on the CPU in float32, for a stride-1, undilated, single-group
        convolution: with input channels a multiple of 16, form the kernel's
        gradient in nnlib's native kernel (``nnlib.layers._native.conv``; the
        convolution itself and the input's gradient stay XLA's); with at most
        ``SHIFTED_CONV_MAX_TAPS`` taps ``K * C``, compute the forward pass as
        shifted products (``shifted_conv``). ``False``: XLA's convolution
        throughout.

    Shapes (B batch, W width, C channels, F features)::

      x: [B, W, C] -> [B, W_out, F]
      kernel: [K, C / groups, F],  bias: [F]
    """

    _layer = "Conv1D"
    _layout = "[batch, width, channels]"
    _ndim = 3
    _dimension_numbers = ("NWC", "WIO", "NWC")

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch width channels"]
    ) -> Float[Array, "batch out_width features"]:
        return self._convolve(x)


class Conv2D(_Conv):
    """2-D convolution over height and width (images).

    Attributes:
      features: output channels F.
      kernel_size: ``(KH, KW)`` or an int for a square kernel.
      strides: step between outputs, int or pair (default 1).
      padding: ``"SAME"`` (default), ``"VALID"``, int, or two ``(low, high)`` pairs.
      dilation: gap between kernel taps, int or pair (default 1).
      groups: number of channel groups (default 1; ``C`` for depthwise).
      use_bias: add a learned bias.
      kernel_init, bias_init: initializers (LeCun normal, zeros).
      dtype: computation dtype; ``None`` keeps the input's.
      param_dtype: storage dtype of the parameters.
      native: on the CPU in float32, for a stride-1, undilated, single-group
        convolution: with input channels a multiple of 16, form the kernel's
        gradient in nnlib's native kernel (``nnlib.layers._native.conv``; the
        convolution itself and the input's gradient stay XLA's); with at most
        ``SHIFTED_CONV_MAX_TAPS`` taps ``KH * KW * C``, compute the forward pass as
        shifted products (``shifted_conv``). ``False``: XLA's convolution
        throughout.

    Shapes (B batch, H height, W width, C channels, F features)::

      x: [B, H, W, C] -> [B, H_out, W_out, F]
      kernel: [KH, KW, C / groups, F],  bias: [F]
    """

    _layer = "Conv2D"
    _layout = "[batch, height, width, channels]"
    _ndim = 4
    _dimension_numbers = ("NHWC", "HWIO", "NHWC")

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch height width channels"]
    ) -> Float[Array, "batch out_height out_width features"]:
        return self._convolve(x)


class _ConvBlock(nn.Module):
    """Shared body of ``ConvBlock1D`` and ``ConvBlock2D``; see their docstrings."""

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    dilation: int | Sequence[int] = 1
    groups: int = 1
    use_bias: bool = True
    normalization: str | None = None
    activation: str | Callable[[Array], Array] | None = "relu"
    pooling: str | None = None
    pool_window: int | Sequence[int] = 2
    pool_strides: int | Sequence[int] | None = None
    dropout_rate: float = 0.0

    _layer: ClassVar[str]
    _conv: ClassVar[type[_Conv]]
    _pools: ClassVar[dict[str, type[nn.Module]]]

    def _block(self, x: Array, train: bool) -> Array:
        layer, conv = self._layer, self._conv
        if self.normalization not in (None, "batch", "layer"):
            raise ValueError(
                f"{layer} normalization must be None, 'batch' or 'layer', "
                f"got {self.normalization!r}"
            )
        if self.pooling not in (None, *self._pools):
            raise ValueError(
                f"{layer} pooling must be None, 'max' or 'avg', got {self.pooling!r}"
            )
        # Checked here too so that errors name the block the user built.
        known = param_shape(self.variables, "params", "conv", "kernel")
        _check_conv_input(
            layer, x, conv._layout, conv._ndim, known[-2] * self.groups if known else None
        )
        x = conv(
            self.features, self.kernel_size, self.strides, self.padding, self.dilation,
            self.groups, self.use_bias, name="conv",
        )(x)  # [B, *out_spatial, F]
        if self.normalization == "batch":
            x = BatchNorm(name="norm")(x, train=train)
        elif self.normalization == "layer":
            x = LayerNorm(name="norm")(x)
        x = get_activation(self.activation or "identity")(x)
        if self.pooling is not None:
            pool = self._pools[self.pooling](self.pool_window, self.pool_strides)
            x = pool(x)  # [B, *pooled_spatial, F]
        return Dropout(self.dropout_rate, name="dropout")(x, train=train)


class ConvBlock1D(_ConvBlock):
    """1-D convolution block: conv -> normalization -> activation -> pooling -> dropout.

    Same attributes as ``ConvBlock2D``, with ``Conv1D``, ``MaxPool1D`` and
    ``AvgPool1D`` inside.

    Shapes: ``x: [batch, width, channels] -> [batch, out_width, features]``.
    """

    _layer = "ConvBlock1D"
    _conv = Conv1D
    _pools = {"max": MaxPool1D, "avg": AvgPool1D}

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch width channels"], *, train: bool = False
    ) -> Float[Array, "batch out_width features"]:
        return self._block(x, train)


class ConvBlock2D(_ConvBlock):
    """2-D convolution block: conv -> normalization -> activation -> pooling -> dropout.

    Attributes:
      features, kernel_size, strides, padding, dilation, groups, use_bias: of
        the convolution, as in ``Conv2D`` (``kernel_size`` defaults to 3).
        With ``normalization="batch"`` the conv bias is redundant (the batch
        mean removes it); ``use_bias=False`` saves the parameters.
      normalization: ``None`` (default), ``"batch"`` (``BatchNorm``; running
        statistics in the mutable ``"batch_stats"`` collection, updated only
        with ``train=True``) or ``"layer"`` (``LayerNorm`` over channels).
      activation: a name from ``nnlib.layers.activations`` (default ``"relu"``),
        a callable, or ``None`` for none.
      pooling: ``None`` (default), ``"max"`` or ``"avg"``, with ``pool_window``
        (default 2) and ``pool_strides`` (default the window), VALID padding.
      dropout_rate: dropout at the end, active only with ``train=True`` (needs
        the ``"dropout"`` rng).

    Submodules are named ``conv``, ``norm`` and ``dropout``.

    Shapes: ``x: [batch, height, width, channels] ->
    [batch, out_height, out_width, features]``.
    """

    _layer = "ConvBlock2D"
    _conv = Conv2D
    _pools = {"max": MaxPool2D, "avg": AvgPool2D}

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch height width channels"], *, train: bool = False
    ) -> Float[Array, "batch out_height out_width features"]:
        return self._block(x, train)
