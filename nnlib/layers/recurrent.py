"""Recurrent layers: SimpleRNN, LSTM and GRU cells, and the layers that scan them.

A *cell* advances one time step, ``(carry, x_t) -> (new_carry, h_t)``. A
*sequence layer* (``RNN``, ``Bidirectional``) runs a cell over the time axis of
``inputs: [batch, time, features]`` with ``jax.lax.scan`` (via ``nn.scan``, so
parameters are created once and shared by every step).

Every cell splits its step in two, because the input half does not depend on
the carry::

    projected = cell.project_inputs(x)        # x: [..., features] -> [..., gates*hidden]
    carry, h_t = cell.step(carry, projected_t)

``RNN`` projects *all* time steps before the scan in one large matmul,
``[time*batch, features] @ [features, gates*hidden]``, leaving only the small
``[batch, hidden] @ [hidden, gates*hidden]`` recurrent matmul inside the loop.
On CPU this is a large speed-up (cuDNN batches the input GEMM the same way).

The gate equations, gate order and therefore the weights are PyTorch's
(``nn.RNN``, ``nn.LSTM``, ``nn.GRU``), transposed to nnlib's ``[in, out]``
kernel layout, so trained PyTorch weights can be copied across:

========  =============================  ==================================
cell      nnlib parameter                PyTorch (single layer)
========  =============================  ==================================
all       ``input/kernel [F, G*H]``      ``weight_ih_l0.T``
all       ``recurrent/kernel [H, G*H]``  ``weight_hh_l0.T``
RNN/LSTM  ``input/bias [G*H]``           ``bias_ih_l0 + bias_hh_l0``
GRU       ``input/bias [3H]``            ``bias_ih_l0``
GRU       ``recurrent/bias [3H]``        ``bias_hh_l0`` (``r`` scales it)
========  =============================  ==================================

Padding masks: ``mask: [batch, time]`` is ``True`` on valid steps. On a
padded step the carry is held unchanged and the output is zero, so the final
carry is the carry after the last valid step, whatever the padding (right,
left or holes). With ``reverse=True`` the scan runs from the last time index
to the first; padded steps still hold the carry, so a right-padded sequence is
read from its last *valid* step back to its first — the same as reversing
each sequence within its length (flax's ``flip_sequences``) — and the outputs
stay aligned with the input positions.

Shapes: B batch, T time, F input features, H hidden size, G gates
(1 SimpleRNN, 4 LSTM, 3 GRU).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from nnlib.layers._checks import ShapeError, check_input, check_mask, param_shape
from nnlib.layers._native import available, lstm_recurrence
from nnlib.layers._recurrence import recurrence, varying_like
from nnlib.layers.activations import get_activation
from nnlib.layers.dense import Dense, matmul_last_axis
from nnlib.layers.initializers import orthogonal

Carry = Any  # one array [*batch, H], or a tuple of them (LSTM: (c, h))
Initializer = Callable[..., Array]

#: The automatic ``RNN.features_first`` rule's bounds, measured on a 2-core AMD
#: EPYC (AVX2) with an LSTM layer's value and gradient (time 64, input 32;
#: features-first / batch-first time): batch 8 / 32 / 64 / 128 at hidden 256: 0.96 / 0.95 /
#: 1.04 / 1.08; hidden 64 / 128 / 256 / 512 at batch 32: 1.10 / 1.01 /
#: 0.95 / 0.91; batch 16: hidden 128 1.17, hidden 512 0.87.
FEATURES_FIRST_MAX_BATCH = 32
FEATURES_FIRST_MIN_HIDDEN = 256

#: The native LSTM computes the input projection ``x_t W_in`` inside its time
#: loop, with the recurrent product (and ``dW_in`` with ``dW``), when the
#: inputs have at most this many features per hidden unit; wider inputs are
#: projected beforehand in one XLA product. Measured on a 2-core Xeon (AVX-512),
#: an LSTM layer's value and gradients (parameters and inputs), batch 32, time
#: 64, hidden 256, in the loop / beforehand, ms: features 32: 20.9 / 22.7; 128:
#: 25.6 / 26.8; 256: 32.0 / 32.2; 512: 44.4 / 41.8 (gradients of the parameters
#: only, features 32: 19.0 / 22.5).
NATIVE_PROJECTION_MAX_FEATURES = 0.5


def _takes_axis(update: Callable[..., Any]) -> bool:
    """Whether a cell's update function takes ``axis=`` (the features' axis)."""
    try:
        return "axis" in inspect.signature(update).parameters
    except (TypeError, ValueError):  # a callable without a signature
        return False


def _check_carry(layer: str, carry: Carry, expected: Carry, layout: str) -> None:
    """Raises if ``carry`` does not have the structure and shapes of ``expected``."""
    got_leaves, got_tree = jax.tree_util.tree_flatten(carry)
    want_leaves, want_tree = jax.tree_util.tree_flatten(expected)
    got = tuple(tuple(getattr(x, "shape", ())) for x in got_leaves)
    want = tuple(x.shape for x in want_leaves)
    if got_tree != want_tree or got != want:
        raise ShapeError(
            f"{layer} expected a carry {layout} with shapes {want}, got "
            f"{got_tree.num_leaves} array(s) with shapes {got}"
        )


class RecurrentCell(nn.Module):
    """Shared machinery of the cells: parameters, input projection, validation.

    Subclasses set ``num_gates`` (G) and ``recurrent_bias`` and implement
    ``step``. Parameters: ``input/kernel [F, G*H]``, ``input/bias [G*H]``,
    ``recurrent/kernel [H, G*H]`` and, if ``recurrent_bias``,
    ``recurrent/bias [G*H]``.

    Attributes:
      hidden_size: H, the size of the hidden state and of each output.
      kernel_init: initializer of the input kernel (flax's LeCun normal).
      recurrent_kernel_init: initializer of the recurrent kernel (orthogonal,
        as Keras and flax; keeps the repeated ``h @ W`` from exploding early;
        ``nnlib.layers.initializers.orthogonal``, safe under ``jax.vmap`` on CPU).
      bias_init: initializer of the biases (zeros).
      dtype: computation dtype (``None``: from inputs and params).
      param_dtype: dtype of the parameters.
    """

    num_gates: ClassVar[int] = 1
    recurrent_bias: ClassVar[bool] = False
    carry_layout: ClassVar[str] = "h: [batch, hidden]"
    #: Whether the update starts from ``projected + recurrent`` (SimpleRNN,
    #: LSTM): the two then share one cotangent, and the features-first
    #: recurrence one transposed stack of them (see ``RNN.features_first``).
    sums_gate_inputs: ClassVar[bool] = False

    hidden_size: int
    _: dataclasses.KW_ONLY
    kernel_init: Initializer = nn.initializers.lecun_normal()
    recurrent_kernel_init: Initializer = orthogonal()
    bias_init: Initializer = nn.initializers.zeros_init()
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        if not isinstance(self.hidden_size, int) or self.hidden_size <= 0:
            raise ValueError(
                f"{type(self).__name__} expected a positive integer hidden_size, "
                f"got {self.hidden_size!r}"
            )
        gates = self.num_gates * self.hidden_size
        self.input = Dense(
            gates,
            kernel_init=self.kernel_init,
            bias_init=self._input_bias_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="input",
        )
        self.recurrent = Dense(
            gates,
            use_bias=self.recurrent_bias,
            kernel_init=self.recurrent_kernel_init,
            bias_init=self.bias_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="recurrent",
        )

    def _input_bias_init(self, key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
        return self.bias_init(key, shape, dtype)

    def input_features(self) -> int | None:
        """F of the initialised input kernel, or ``None`` before ``init``."""
        kernel = param_shape(self.variables, "params", "input", "kernel")
        return None if kernel is None else kernel[0]

    def project_inputs(
        self, x: Float[Array, "*batch features"]
    ) -> Float[Array, "*batch gates_hidden"]:
        """The input half of every gate, ``x @ W_in + b_in``, for any leading axes.

        Args:
          x: ``[..., features]``, e.g. a whole sequence ``[time, batch, features]``.

        Returns:
          ``[..., G*H]``, to be fed one time step at a time to ``step``.
        """
        check_input(
            type(self).__name__, x, layout="[..., features]", min_ndim=1,
            features=self.input_features(),
        )
        return self.input(x)

    @nn.nowrap
    def update_fn(self) -> Callable[[Carry, Array, Array], tuple[Carry, Array]]:
        """The cell's math as a pure function ``(carry, projected, recurrent) -> (carry, h)``.

        ``projected = x W_in + b_in`` and ``recurrent = h W_rec (+ b_rec)``,
        both ``[*batch, G*H]``; it touches no parameters, which lets ``RNN``
        run the recurrence with a fused backward pass. A cell that overrides
        ``step`` instead is scanned by plain autodiff. The function may take
        a keyword ``axis`` (default ``-1``), the features' axis of every
        array it gets: ``RNN``'s features-first recurrence calls it with
        ``axis=0`` on ``[G*H, B]`` and ``[H, B]`` arrays.
        """
        raise NotImplementedError(
            f"{type(self).__name__} defines neither update_fn nor step"
        )

    @staticmethod
    def hidden_of(carry: Carry) -> Array:
        """The part of the carry the recurrent kernel multiplies (``h``)."""
        return carry

    def step(
        self, carry: Carry, projected: Float[Array, "*batch gates_hidden"]
    ) -> tuple[Carry, Float[Array, "*batch hidden"]]:
        """One time step from the already projected input ``[*batch, G*H]``."""
        return self.update_fn()(carry, projected, self.recurrent(self.hidden_of(carry)))

    def input_weights(self, dtype: Any) -> tuple[Array, Array]:
        """``(W_in [F, G*H], b_in [G*H])`` cast to ``dtype``; call after ``project_inputs``."""
        params = self.input.variables["params"]
        return params["kernel"].astype(dtype), params["bias"].astype(dtype)

    def recurrent_weights(self, carry: Carry) -> tuple[Array, Array | None]:
        """``(W_rec [H, G*H], b_rec [G*H] or None)`` in the computation dtype.

        Calls the recurrent projection once on ``carry``'s hidden part so that
        ``init`` creates its parameters (the unused product is dead code that
        XLA removes).
        """
        h = self.hidden_of(carry)
        self.recurrent(h)
        params = self.recurrent.variables["params"]
        dtype = self.dtype or h.dtype
        bias = params["bias"].astype(dtype) if self.recurrent_bias else None
        return params["kernel"].astype(dtype), bias

    def __call__(
        self, carry: Carry, x: Float[Array, "*batch features"]
    ) -> tuple[Carry, Float[Array, "*batch hidden"]]:
        """One time step on raw inputs: ``project_inputs`` then ``step``.

        Args:
          carry: the state, as ``initialize_carry(batch_shape)`` makes it.
          x: ``[*batch, features]``, one time step.

        Returns:
          ``(new_carry, h)`` with ``h: [*batch, hidden]``.
        """
        name = type(self).__name__
        check_input(
            name, x, layout="[batch, features]", min_ndim=1,
            features=self.input_features(),
        )
        expected = self.initialize_carry(x.shape[:-1], x.dtype)
        _check_carry(name, carry, expected, self.carry_layout)
        return self.step(carry, self.project_inputs(x))

    @nn.nowrap
    def initialize_carry(
        self, batch_shape: int | tuple[int, ...], dtype: Any = jnp.float32
    ) -> Carry:
        """The zero state, ``h: [*batch_shape, hidden]``."""
        if isinstance(batch_shape, int):
            batch_shape = (batch_shape,)
        return jnp.zeros((*batch_shape, self.hidden_size), dtype)


class SimpleRNNCell(RecurrentCell):
    """Elman RNN cell, as PyTorch's ``nn.RNN``: ``h' = act(x W_in + b + h W_rec)``.

    Args:
      hidden_size: H.
      activation: ``"tanh"`` (default, as PyTorch and Keras), ``"relu"``, or
        any name/callable ``nnlib.layers.activations.get_activation`` accepts.
      (keyword-only initializers and dtypes: see ``RecurrentCell``.)

    Shapes: ``x: [batch, features]``, carry ``h: [batch, hidden]``, output
    ``h: [batch, hidden]``.
    """

    sums_gate_inputs: ClassVar[bool] = True

    activation: str | Callable[[Array], Array] = "tanh"

    @nn.nowrap
    def update_fn(self) -> Callable[[Array, Array, Array], tuple[Array, Array]]:
        activation = get_activation(self.activation)

        def update(
            h: Array, projected: Array, recurrent: Array, *, axis: int = -1
        ) -> tuple[Array, Array]:
            del axis  # elementwise
            h = activation(projected + recurrent)
            return h, h

        return update


def _gate_constants(hidden: int, gates: str, dtype: Any) -> tuple[Array, Array]:
    """Per-column ``(scale, shift)`` with ``tanh(z * scale) * scale + shift`` =
    ``sigmoid(z)`` on the ``"s"`` gates and ``tanh(z)`` on the ``"t"`` gates."""
    scale = np.repeat([0.5 if g == "s" else 1.0 for g in gates], hidden)
    shift = np.repeat([0.5 if g == "s" else 0.0 for g in gates], hidden)
    return jnp.asarray(scale, dtype), jnp.asarray(shift, dtype)


def _gate_activations(z: Array, gates: str, axis: int = -1) -> Array:
    """Every gate's nonlinearity over ``z``, whose ``axis`` is ``len(gates) * H`` long.

    ``sigmoid(x) = (1 + tanh(x / 2)) / 2``, so one ``tanh`` over the whole
    array, scaled per column, gives the sigmoid gates and the tanh gate alike.
    Inside a recurrence XLA:CPU then emits one vectorised loop over the gate
    row; slicing the gates first and applying ``sigmoid``/``tanh`` to each
    slice made it a scalar loop (the slices read a dynamic slice of the
    stacked inputs), 4.6x slower for the LSTM cell alone. The identity is
    exact; in float32 a sigmoid gate differs from ``jax.nn.sigmoid`` by at
    most 2e-7 (absolute, the rounding of values near 1) and is exactly 0 below
    z = -16, where the sigmoid is under 1.2e-7.
    """
    scale, shift = _gate_constants(z.shape[axis] // len(gates), gates, z.dtype)
    shape = [1] * z.ndim
    shape[axis] = z.shape[axis]
    scale, shift = scale.reshape(shape), shift.reshape(shape)
    return jnp.tanh(z * scale) * scale + shift


def _lstm_update(
    carry: tuple[Array, Array], projected: Array, recurrent: Array, *, axis: int = -1
) -> tuple[tuple[Array, Array], Array]:
    c, _ = carry
    gates = _gate_activations(projected + recurrent, "ssts", axis)
    i, f, g, o = jnp.split(gates, 4, axis=axis)  # each [B, H] (or [H, B]), activated
    c = f * c + i * g
    h = o * jnp.tanh(c)
    return (c, h), h


class LSTMCell(RecurrentCell):
    """Long short-term memory cell (Hochreiter & Schmidhuber 1997), PyTorch gates::

        i, f, g, o = split(x W_in + b + h W_rec, 4)      # gate order i, f, g, o
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(c')

    The carry is the tuple ``(c, h)`` — cell state first, as flax does;
    PyTorch returns ``(h_n, c_n)`` the other way round.

    Args:
      hidden_size: H.
      forget_bias: added to the forget-gate slice of the bias *at
        initialisation* (a trainable starting value, not a constant). The
        default 0 matches PyTorch (no special forget bias); 1.0 is Keras'
        ``unit_forget_bias=True`` (Jozefowicz et al. 2015), which keeps the
        memory open early in training. TF1's ``LSTMCell(forget_bias=1)`` added
        it at run time instead; to import such weights, add it to the bias.
      (keyword-only initializers and dtypes: see ``RecurrentCell``.)

    Shapes: ``x: [batch, features]``, carry ``(c, h)`` each ``[batch, hidden]``,
    output ``h: [batch, hidden]``.
    """

    num_gates: ClassVar[int] = 4
    carry_layout: ClassVar[str] = "(c, h) each [batch, hidden]"
    sums_gate_inputs: ClassVar[bool] = True

    forget_bias: float = 0.0

    def _input_bias_init(self, key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
        hidden = self.hidden_size
        bias = self.bias_init(key, shape, dtype)
        return bias.at[hidden : 2 * hidden].add(self.forget_bias)

    @staticmethod
    def hidden_of(carry: tuple[Array, Array]) -> Array:
        return carry[1]

    @nn.nowrap
    def update_fn(self) -> Callable[[tuple[Array, Array], Array, Array],
                                    tuple[tuple[Array, Array], Array]]:
        return _lstm_update

    @nn.nowrap
    def initialize_carry(
        self, batch_shape: int | tuple[int, ...], dtype: Any = jnp.float32
    ) -> tuple[Array, Array]:
        """The zero state ``(c, h)``, each ``[*batch_shape, hidden]``."""
        zeros = super().initialize_carry(batch_shape, dtype)
        return zeros, zeros


class GRUCell(RecurrentCell):
    """Gated recurrent unit (Cho et al. 2014), PyTorch's variant::

        r = sigmoid(x W_ir + b_ir + h W_hr + b_hr)
        z = sigmoid(x W_iz + b_iz + h W_hz + b_hz)
        n = tanh(x W_in + b_in + r * (h W_hn + b_hn))
        h' = (1 - z) * n + z * h

    The reset gate multiplies ``h W_hn + b_hn`` (after the matmul, Keras'
    ``reset_after=True``), which is why the recurrent projection has its own
    bias. Gate order in the kernels: r, z, n.

    Args:
      hidden_size: H.
      (keyword-only initializers and dtypes: see ``RecurrentCell``.)

    Shapes: ``x: [batch, features]``, carry ``h: [batch, hidden]``, output
    ``h: [batch, hidden]``.
    """

    num_gates: ClassVar[int] = 3
    recurrent_bias: ClassVar[bool] = True

    @nn.nowrap
    def update_fn(self) -> Callable[[Array, Array, Array], tuple[Array, Array]]:
        return _gru_update


def _gru_update(
    h: Array, projected: Array, recurrent: Array, *, axis: int = -1
) -> tuple[Array, Array]:
    x_r, x_z, x_n = jnp.split(projected, 3, axis=axis)  # each [B, H] (or [H, B])
    h_r, h_z, h_n = jnp.split(recurrent, 3, axis=axis)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    h = (1 - z) * n + z * h
    return h, h


class RNN(nn.Module):
    """Runs a cell over the time axis of a batch of sequences.

    Args:
      cell: a ``SimpleRNNCell``, ``LSTMCell`` or ``GRUCell`` (or any
        ``RecurrentCell``); its parameters live under ``params/cell``.
      reverse: process each sequence from its last valid step back to its
        first; outputs are still returned aligned with the input positions.
      unroll: time steps per scan iteration (``jax.lax.scan``'s ``unroll``);
        larger trades compile time for less loop overhead. ``None``
        (default): 2 for the features-first recurrence, 4 otherwise. Batch
        first, 4 made the LSTM and GRU train steps of the CPU benchmark
        1.14-1.18x faster than 1, for ~0.3 s more compile time, and 8 and 16
        were slower again (a GRU at batch 32, hidden 256: 27.5 steps/s at 4,
        22.6 at 2); features first, 2 beat 4 (LSTM at batch 32 / 8 / 16,
        hidden 256 / 256 / 512: +4 % / +14 % / +1 %).
      fused: run the built-in cells' recurrence with a hand-written backward
        pass (``nnlib.layers._recurrence``) that computes the recurrent
        weight's gradient as one matmul over all steps after the loop instead
        of one per step inside it (as cuDNN does); same math, faster on CPU.
        Reverse-mode only: set ``False`` to take ``jax.jvp``/``jax.hessian``
        through the layer. Cells that override ``step`` always use the plain
        scan.
      features_first: with ``fused``, run the recurrence with every per-step
        array laid out ``[features, batch]`` (the carry ``[hidden, batch]``,
        the product ``W_rec^T h^T``) when the cell's update function takes
        ``axis=`` (the built-in cells' do). The same math, which XLA:CPU's
        matmul library runs faster for a small batch and a wide layer (the
        LSTM train step of the CPU benchmark, batch 32, hidden 256: 6-11 %
        less time), and slower otherwise (the layer's value and gradient at
        batch 128: +8 %; at hidden 64: +10 %; a GRU, whose two gate-input
        cotangents need two transposes: +7 %). ``None``
        (default): on for a ``sums_gate_inputs`` cell (SimpleRNN, LSTM) on the
        CPU with batch <= ``FEATURES_FIRST_MAX_BATCH`` and hidden >=
        ``FEATURES_FIRST_MIN_HIDDEN``. Inputs, outputs and carries keep their
        batch-first layouts either way.
      native: with ``fused``, run an ``LSTMCell``'s recurrence in nnlib's native
        CPU kernel (``nnlib.layers._native``: the whole time loop, products
        and gates, as one call forward and one backward, as PyTorch's oneDNN
        LSTM does) where it applies: float32, on the CPU, no ``mask``, and the
        kernel built (it compiles on first use with the system's C++
        compiler; ``NNLIB_NATIVE=0`` turns it off). The same math to float
        rounding; the benchmark's LSTM layer (batch 32, 64 steps, input 32,
        hidden 256), forward + backward on 2 Xeon cores: 34 ms in XLA's loop,
        15 ms here (PyTorch's oneDNN LSTM: 15). ``features_first`` does not
        apply to it. ``False``: always XLA.

    Shapes: ``inputs: [batch, time, features]``, ``mask: [batch, time]``,
    ``outputs: [batch, time, hidden]``; the carry is the cell's, with
    ``batch_shape = (batch,)``.
    """

    cell: RecurrentCell
    reverse: bool = False
    unroll: int | None = None
    fused: bool = True
    features_first: bool | None = None
    native: bool = True

    @nn.nowrap
    def _runs_features_first(self, batch: int, update: Callable[..., Any]) -> bool:
        """The ``features_first`` attribute resolved for this call (see the class docstring)."""
        if not _takes_axis(update):
            return False
        if self.features_first is not None:
            return self.features_first
        return (
            jax.default_backend() == "cpu"
            and self.cell.sums_gate_inputs
            and batch <= FEATURES_FIRST_MAX_BATCH
            and self.cell.hidden_size >= FEATURES_FIRST_MIN_HIDDEN
        )

    @nn.nowrap
    def _runs_native(
        self, update: Callable[..., Any], mask: Array | None, projected: Array, carry: Carry
    ) -> bool:
        """Whether this call runs the native LSTM kernel (see ``native``)."""
        return (
            self.native
            and update is _lstm_update
            and mask is None
            and jax.default_backend() == "cpu"
            and projected.dtype == jnp.float32
            and all(c.dtype == jnp.float32 for c in jax.tree.leaves(carry))
            and jnp.dtype(self.cell.param_dtype) == jnp.float32
            and available()
        )

    @nn.compact
    def __call__(
        self,
        inputs: Float[Array, "batch time features"],
        *,
        mask: Bool[Array, "batch time"] | None = None,
        initial_carry: Carry | None = None,
    ) -> tuple[Carry, Float[Array, "batch time hidden"]]:
        """Scans the cell over ``inputs``.

        Args:
          inputs: ``[batch, time, features]``, floating point.
          mask: optional ``[batch, time]``, ``True`` on valid steps. Padded
            steps hold the carry and output zeros.
          initial_carry: optional starting state (default zeros), shaped as
            ``cell.initialize_carry(batch)``.

        Returns:
          ``(final_carry, outputs)``: the carry after the last valid step and
          ``outputs: [batch, time, hidden]``.
        """
        name = f"RNN({type(self.cell).__name__})"
        check_input(
            name, inputs, layout="[batch, time, features]", ndim=3,
            features=self.cell.input_features(),
        )
        batch, time, _ = inputs.shape
        check_mask(name, mask, (batch, time), layout="[batch, time]")

        # Time-major before projecting: the transpose then moves F, not G*H, columns.
        x = jnp.swapaxes(inputs, 0, 1)  # [T, B, F]
        projected = self.cell.project_inputs(x)  # [T, B, G*H], one big matmul
        if initial_carry is None:
            carry = self.cell.initialize_carry((batch,), projected.dtype)
        else:
            expected = self.cell.initialize_carry((batch,), projected.dtype)
            _check_carry(name, initial_carry, expected, self.cell.carry_layout)
            carry = initial_carry

        fused = self.fused and type(self.cell).step is RecurrentCell.step
        update = self.cell.update_fn() if fused else None
        features_first = fused and self._runs_features_first(batch, update)
        unroll = self.unroll if self.unroll is not None else (2 if features_first else 4)
        if fused and self._runs_native(update, mask, projected, carry):
            kernel, _ = self.cell.recurrent_weights(carry)
            in_kernel, in_bias = self.cell.input_weights(projected.dtype)
            # The bias is added per step inside the kernel; the input
            # projection runs there too (see NATIVE_PROJECTION_MAX_FEATURES).
            x_in = inputs.astype(projected.dtype)
            if x_in.shape[-1] <= NATIVE_PROJECTION_MAX_FEATURES * self.cell.hidden_size:
                carry, outputs = lstm_recurrence(
                    kernel, carry, bias=in_bias, inputs=x_in, input_kernel=in_kernel,
                    reverse=self.reverse,
                )
            else:
                projected = matmul_last_axis(x.astype(projected.dtype), in_kernel)
                carry, outputs = lstm_recurrence(
                    kernel, carry, projected, in_bias, reverse=self.reverse
                )
            return carry, jnp.swapaxes(outputs, 0, 1)  # [B, T, H]
        if fused:
            kernel, bias = self.cell.recurrent_weights(carry)
            valid = None if mask is None else jnp.swapaxes(mask.astype(bool), 0, 1)  # [T, B]
            if features_first:
                in_kernel, in_bias = self.cell.input_weights(projected.dtype)
                # The product without its bias, then a plain transpose (the
                # bias is added inside the loop; fused with the transpose,
                # XLA:CPU runs the addition ~4x slower).
                projected = matmul_last_axis(x.astype(projected.dtype), in_kernel)
                transposed = functools.partial(jax.tree.map, jnp.transpose)
                carry, outputs = recurrence(
                    functools.partial(update, axis=0), self.cell.hidden_of, kernel, bias,
                    transposed(carry), jnp.swapaxes(projected, 1, 2), valid,
                    input_bias=in_bias, reverse=self.reverse, unroll=unroll,
                    features_first=True,
                )  # carry [H, B], outputs [T, H, B]
                return transposed(carry), jnp.transpose(outputs, (2, 0, 1))  # [B, T, H]
            carry, outputs = recurrence(
                update, self.cell.hidden_of, kernel, bias, carry, projected,
                valid, reverse=self.reverse, unroll=unroll,
            )
            return carry, jnp.swapaxes(outputs, 0, 1)  # [B, T, H]

        # (recurrence() casts its own carry; the plain scan needs it here.)
        carry = varying_like(carry, projected)
        if mask is None:
            def body(cell, carry, xs):
                return cell.step(carry, xs)

            xs = projected
        else:
            def body(cell, carry, xs):
                projected_t, valid = xs  # [B, G*H], [B]
                new_carry, h = cell.step(carry, projected_t)
                valid = valid[:, None]  # [B, 1]
                # Padded steps keep the old carry, so the final carry is the
                # one after each sequence's last valid step.
                carry = jax.tree_util.tree_map(
                    lambda new, old: jnp.where(valid, new, old), new_carry, carry
                )
                return carry, jnp.where(valid, h, jnp.zeros_like(h))

            xs = (projected, jnp.swapaxes(mask.astype(bool), 0, 1))  # mask [T, B]

        scan = nn.scan(
            body,
            variable_broadcast="params",
            split_rngs={"params": False},
            reverse=self.reverse,
            unroll=unroll,
        )
        carry, outputs = scan(self.cell, carry, xs)  # outputs [T, B, H]
        return carry, jnp.swapaxes(outputs, 0, 1)  # [B, T, H]


_MERGES: dict[str, Callable[[Array, Array], Array]] = {
    "concat": lambda f, b: jnp.concatenate([f, b], axis=-1),
    "sum": lambda f, b: f + b,
    "mean": lambda f, b: (f + b) / 2,
    "mul": lambda f, b: f * b,
}


class Bidirectional(nn.Module):
    """A forward and a backward ``RNN`` over the same sequences, outputs merged.

    Each output position sees the whole sequence: the forward cell has read
    ``x[:t+1]``, the backward cell ``x[t:]`` (within the valid length when a
    mask is given). With ``merge="concat"`` the output equals PyTorch's
    ``bidirectional=True`` output ``[forward, backward]``.

    Args:
      forward_cell: cell run first-to-last; parameters under
        ``params/forward_cell``.
      backward_cell: cell run last-to-first; parameters under
        ``params/backward_cell``.
      merge: ``"concat"`` (``[..., H_f + H_b]``), ``"sum"``, ``"mean"`` or
        ``"mul"`` (these need ``H_f == H_b``).
      unroll: passed to both scans (``None``: ``RNN``'s default).
      native: passed to both ``RNN``s (the native LSTM kernel where it applies).

    Shapes: ``inputs: [batch, time, features]``, ``mask: [batch, time]``,
    ``outputs: [batch, time, 2*hidden]`` for concat, else
    ``[batch, time, hidden]``.
    """

    forward_cell: RecurrentCell
    backward_cell: RecurrentCell
    merge: str = "concat"
    unroll: int | None = None
    native: bool = True

    @nn.compact
    def __call__(
        self,
        inputs: Float[Array, "batch time features"],
        *,
        mask: Bool[Array, "batch time"] | None = None,
        initial_carry: tuple[Carry, Carry] | None = None,
    ) -> tuple[tuple[Carry, Carry], Float[Array, "batch time out"]]:
        """Runs both directions.

        Args:
          inputs: ``[batch, time, features]``, floating point.
          mask: optional ``[batch, time]``, ``True`` on valid steps.
          initial_carry: optional ``(forward_carry, backward_carry)``.

        Returns:
          ``((forward_carry, backward_carry), outputs)``; the backward carry is
          the state after reading each sequence's *first* valid step.
        """
        if self.merge not in _MERGES:
            raise ValueError(
                f"Bidirectional got merge={self.merge!r}; expected one of "
                f"{', '.join(_MERGES)}"
            )
        sizes = (self.forward_cell.hidden_size, self.backward_cell.hidden_size)
        if self.merge != "concat" and sizes[0] != sizes[1]:
            raise ValueError(
                f"Bidirectional merge={self.merge!r} needs equal hidden sizes, got "
                f"forward {sizes[0]} and backward {sizes[1]}; use merge='concat'"
            )
        if initial_carry is None:
            initial_carry = (None, None)
        elif not (isinstance(initial_carry, tuple) and len(initial_carry) == 2):
            raise ShapeError(
                "Bidirectional expected initial_carry as a pair "
                f"(forward_carry, backward_carry), got {type(initial_carry).__name__}"
            )
        forward = RNN(self.forward_cell, unroll=self.unroll, native=self.native, name="forward")
        backward = RNN(self.backward_cell, reverse=True, unroll=self.unroll, native=self.native,
                       name="backward")
        carry_f, out_f = forward(inputs, mask=mask, initial_carry=initial_carry[0])
        carry_b, out_b = backward(inputs, mask=mask, initial_carry=initial_carry[1])
        return (carry_f, carry_b), _MERGES[self.merge](out_f, out_b)  # [B, T, *]
