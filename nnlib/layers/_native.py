"""Native CPU kernels, compiled on first use: the LSTM recurrence, attention, LayerNorm,
a convolution's kernel gradient, AdamW's update, narrow products, sums of squares.

XLA runs a recurrent layer as a ``lax.scan`` of separate operations: every
step hands a small matmul to the CPU's matmul library and the gates to a
fused loop, and each hand-over costs more than the step's arithmetic at the
sizes recurrent nets use. PyTorch's LSTM on the CPU is one oneDNN call for the
whole sequence each way. ``native/lstm.cc`` is nnlib's such kernel, called from
XLA through its FFI (``jax.ffi``): the time loop, the recurrent products (the
weights laid out once per call) and the gates run in one call forward and
one backward, with the cores splitting every step by hidden unit; the
backward call also forms the weight and bias gradients, on the threads the
loop does not need, while the loop runs. Narrow inputs (``RNN``: up to half
the hidden width) are projected inside the loop too, with the recurrent
product; wider ones beforehand in XLA. On the 2-core benchmark machine the
LSTM layer's forward + backward (batch 32, 64 steps, input 32, hidden 256)
takes 15 ms, against 34 ms in XLA's scan and 15 ms in PyTorch's oneDNN LSTM
(``experiments/bench/NOTES.md``).

``native/attention.cc`` is softmax attention the same way, one (batch, head)
pair per task (``nnlib.layers.dot_product_attention(implementation="native")``,
and the GPT's attention straight from its fused qkv projection), and
``native/layernorm.cc`` LayerNorm's backward pass (``nnlib.layers.LayerNorm``
on the CPU in float32), each chunk of rows read once. Together they took the
benchmark GPT's train step from 0.80-0.84 of PyTorch's to 0.99-1.04.
``native/conv.cc`` is a convolution's kernel gradient (``Conv2D``/``Conv1D``,
stride 1, 16k input channels): a product over pixels with the patches
gathered as it goes, where XLA:CPU transposes its operands into a
convolution over the batch. ``native/adamw.cc`` is one AdamW step of an
array in one pass (``nnlib.train.optim.FusedAdamW``). ``native/narrow.cc``
runs the three products of a dense layer with a few outputs (a classifier
head) on the calling thread, and ``native/sumsq.cc`` a gradient's squared
norm (the train step's guard): work of tens of microseconds that XLA:CPU
splits over its pool and then waits on.
The kernels run on XLA's own intra-op thread pool (the FFI's ``ThreadPool``).

The kernels are C++ source shipped with the package. ``available()``
compiles them once per machine with the system's C++ compiler (``$CXX``, else
``c++``; ``-O3 -march=native``, a few seconds) into ``$NNLIB_CACHE_DIR/native``
(default ``~/.cache/nnlib/native``), keyed by the source, the compiler and the
CPU, and registers them with XLA. Where no compiler is found or the build
fails, nnlib runs XLA programs instead, with a warning once.
``NNLIB_NATIVE=0`` in the environment turns the kernels off.

``lstm_recurrence`` has a custom VJP (reverse mode: ``grad``, ``vjp``); like
the rest of ``RNN``'s fused path it has no forward mode (``RNN(fused=False)``
for ``jax.jvp``). ``attention``, ``layer_norm`` and ``conv`` have every derivative (see
below). Under ``jax.vmap`` a call runs once per element of the mapped axis.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.custom_derivatives import SymbolicZero
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from nnlib.runtime import env_enabled

NATIVE_DIR = Path(__file__).parent / "native"
SOURCES = (NATIVE_DIR / "lstm.cc", NATIVE_DIR / "attention.cc", NATIVE_DIR / "layernorm.cc",
           NATIVE_DIR / "conv.cc", NATIVE_DIR / "adamw.cc", NATIVE_DIR / "copy.cc",
           NATIVE_DIR / "narrow.cc", NATIVE_DIR / "sumsq.cc")
HEADERS = (NATIVE_DIR / "common.h",)
FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-fno-math-errno",
         "-pthread", "-w")
#: XLA FFI target name -> the library's handler symbol.
TARGETS = {
    "nnlib_lstm_forward": "NnlibLstmForward",
    "nnlib_lstm_backward": "NnlibLstmBackward",
    "nnlib_attention_forward": "NnlibAttentionForward",
    "nnlib_attention_backward": "NnlibAttentionBackward",
    "nnlib_attention_qkv_forward": "NnlibAttentionQkvForward",
    "nnlib_attention_qkv_backward": "NnlibAttentionQkvBackward",
    "nnlib_layer_norm_backward": "NnlibLayerNormBackward",
    "nnlib_conv_weight_gradient": "NnlibConvWeightGradient",
    "nnlib_conv_weight_gradient_taps": "NnlibConvWeightGradientTaps",
    "nnlib_adamw": "NnlibAdamW",
    "nnlib_copy": "NnlibCopy",
    "nnlib_narrow_matmul": "NnlibNarrowMatmul",
    "nnlib_sum_of_squares": "NnlibSumsOfSquares",
}
_FORWARD, _BACKWARD = "nnlib_lstm_forward", "nnlib_lstm_backward"
_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": None, "reason": "not built yet"}


def _cache_dir() -> Path:
    root = os.environ.get("NNLIB_CACHE_DIR") or Path.home() / ".cache" / "nnlib"
    return Path(root) / "native"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(keep) or platform.machine()


def build(cxx: str | None = None, cache_dir: Path | None = None) -> tuple[Path | None, str]:
    """Compiles the kernels in ``native/`` into one library (or finds it
    compiled): ``(library path, "")`` or ``(None, why not)``."""
    cxx = cxx or os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        return None, f"no C++ compiler ({cxx!r} not found)"
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"{cxx} --version failed: {error}"
    include = jax.ffi.include_dir()
    key = hashlib.sha256(
        "\n".join([*(f.read_text() for f in (*SOURCES, *HEADERS)), cxx, version,
                   " ".join(FLAGS), _cpu_signature(), include, jax.__version__]).encode()
    ).hexdigest()[:16]
    directory = cache_dir or _cache_dir()
    library = directory / f"nnlib-native-{key}.so"
    if library.exists():
        return library, ""
    partial = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Compiled under a temporary name and renamed: processes that build
        # at once (pytest workers) each see a whole library or none.
        fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        result = subprocess.run(
            [cxx, *FLAGS, "-I", include, "-I", str(NATIVE_DIR), *map(str, SOURCES),
             "-o", partial],
            capture_output=True, text=True, timeout=600,
        )
        if result.returncode != 0:
            return None, f"{cxx} failed: {result.stderr.strip()[-2000:]}"
        os.replace(partial, library)
        partial = None
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"building {library} failed: {error}"
    finally:
        if partial is not None and os.path.exists(partial):
            os.unlink(partial)
    return library, ""


def _trace_state() -> Any:
    """A JAX configuration state, part of the jit cache key and the trace
    context, that ``turned_off`` sets: a function traced with the kernels on
    is traced again inside the block, not taken from JAX's caches. (JAX has
    no public way to define one; where its private one is missing, a
    thread-local flag that the caches do not see.)"""
    try:
        from jax._src import config as jax_config

        return jax_config.bool_state(
            "nnlib_native_kernels", True,
            help="nnlib: trace nnlib's native CPU kernels (False inside "
                 "nnlib.layers._native.turned_off()).",
            include_in_jit_key=True, include_in_trace_context=True)
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other JAX versions
        return None


_TRACE_STATE = _trace_state()
_off = threading.local()  # where _TRACE_STATE is missing


@contextlib.contextmanager
def turned_off() -> Iterator[None]:
    """Within the block (on this thread) ``available()`` is ``False``: what is
    traced there is XLA's operations alone, the same math, even for a
    function traced before with the kernels. XLA's cost analysis counts no
    work inside a native call, so FLOP counts trace the program this way
    (``nnlib.compress.cost``)."""
    if _TRACE_STATE is not None:
        with _TRACE_STATE(False):
            yield
        return
    depth = getattr(_off, "depth", 0)
    _off.depth = depth + 1
    try:
        yield
    finally:
        _off.depth = depth


def _turned_off() -> bool:
    if _TRACE_STATE is not None:
        return not _TRACE_STATE.value
    return getattr(_off, "depth", 0) > 0


def available() -> bool:
    """Whether the native kernels are built and registered with XLA (builds them
    on the first call; ``False`` with ``NNLIB_NATIVE=0``, inside ``turned_off()``
    or when they cannot be built, the reason in ``reason()``)."""
    if not env_enabled("NNLIB_NATIVE") or _turned_off():
        return False
    with _lock:
        if _state["loaded"] is None:
            library, why = build()
            if library is not None:
                try:
                    lib = ctypes.CDLL(str(library))
                    for target, symbol in TARGETS.items():
                        jax.ffi.register_ffi_target(
                            target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                    _state["library"] = lib  # keep it loaded
                except (OSError, AttributeError) as error:
                    library, why = None, f"loading {library} failed: {error}"
            _state.update(loaded=library is not None, reason=why)
            if library is None:
                warnings.warn(
                    f"nnlib's native CPU kernels are not available ({why}); "
                    "nnlib runs its XLA programs instead",
                    RuntimeWarning, stacklevel=2,
                )
        return bool(_state["loaded"])


def _require() -> None:
    if not available():
        raise RuntimeError(f"nnlib's native kernels are not available ({reason()})")


def reason() -> str:
    """Why the native kernels are off (empty when they are built)."""
    if not env_enabled("NNLIB_NATIVE"):
        return "NNLIB_NATIVE=0"
    return _state["reason"]


def _forward_call(kernel, in_kernel, bias, c0, h0, inputs, projected, reverse):
    batch, steps, _ = inputs.shape
    hidden, gates = kernel.shape
    f32 = jnp.float32
    return jax.ffi.ffi_call(
        _FORWARD,
        (jax.ShapeDtypeStruct((steps, batch, hidden), f32),
         jax.ShapeDtypeStruct((steps, batch, hidden), f32),
         jax.ShapeDtypeStruct((steps, batch, gates), f32)),
        vmap_method="sequential",
    )(projected, inputs, in_kernel, kernel, bias, c0, h0, reverse=np.int64(reverse))


def _backward_call(kernel, in_kernel, gates, cs, c0, hs, h0, inputs, ct_hs, ct_c, ct_h,
                   reverse):
    f32 = jnp.float32
    return jax.ffi.ffi_call(
        _BACKWARD,
        (jax.ShapeDtypeStruct(gates.shape, f32),
         jax.ShapeDtypeStruct(c0.shape, f32),
         jax.ShapeDtypeStruct(c0.shape, f32),
         jax.ShapeDtypeStruct(in_kernel.shape, f32),
         jax.ShapeDtypeStruct(kernel.shape, f32),
         jax.ShapeDtypeStruct(kernel.shape[-1:], f32)),
        vmap_method="sequential",
    )(kernel, gates, cs, c0, hs, h0, inputs, ct_hs, ct_c, ct_h, reverse=np.int64(reverse))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _recurrence(kernel, in_kernel, bias, c0, h0, inputs, projected, reverse):
    hs, cs, _ = _forward_call(kernel, in_kernel, bias, c0, h0, inputs, projected, reverse)
    return _recurrence_out(hs, cs, (inputs, projected), reverse)


def _recurrence_out(hs, cs, data, reverse):
    hs, cs = _vary_as(data, hs), _vary_as(data, cs)
    last = 0 if reverse else -1
    return (cs[last], hs[last]), hs


# Symbolic zeros (``symbolic_zeros=True``): the backward skips what nobody
# differentiates: the inputs' gradient dz W_in^T where the inputs are data,
# and the all-zero cotangent of outputs nobody reads (a classifier reading
# the last state), which the kernel then neither receives nor reads.
def _recurrence_fwd(kernel, in_kernel, bias, c0, h0, inputs, projected, reverse):
    args = [a.value for a in (kernel, in_kernel, bias, c0, h0, inputs, projected)]
    kernel, in_kernel, bias, c0, h0, x, p = args
    hs, cs, gates = _forward_call(kernel, in_kernel, bias, c0, h0, x, p, reverse)
    out = _recurrence_out(hs, cs, (x, p), reverse)
    residuals = (kernel, in_kernel, c0, h0, x, inputs.perturbed, p.shape,
                 projected.perturbed, out[1], cs, gates)
    return out, residuals


def _recurrence_bwd(reverse, residuals, cotangents):
    (kernel, in_kernel, c0, h0, inputs, inputs_perturbed, projected_shape,
     projected_perturbed, hs, cs, gates) = residuals
    (ct_c, ct_h), ct_hs = cotangents

    def dense(ct, like):
        return jnp.zeros(like.shape, like.dtype) if isinstance(ct, SymbolicZero) else ct

    ct_c, ct_h = dense(ct_c, c0), dense(ct_h, h0)
    if isinstance(ct_hs, SymbolicZero):
        ct_hs = jnp.zeros((0,), jnp.float32)
    ct_z, ct_c0, ct_h0, ct_in_kernel, ct_kernel, ct_bias = _backward_call(
        kernel, in_kernel, gates, cs, c0, hs, h0, inputs, ct_hs, ct_c, ct_h, reverse)
    # Inside shard_map every argument entered varying (lstm_recurrence), and
    # its cotangent must too; an FFI call's results do not inherit it.
    vary = functools.partial(_vary_as, (hs,))
    ct_inputs = ct_projected = None
    if inputs_perturbed:
        # dz W_in^T: the product time major as dz is, then the small [T, B, F]
        # result batch major (a batch-major product output made XLA
        # transpose all of dz first: +3 ms on the benchmark's layer).
        ct_inputs = vary(jnp.swapaxes(jnp.einsum("tbg,fg->tbf", ct_z, in_kernel), 0, 1))
    if projected_perturbed:
        ct_projected = vary(ct_z if math.prod(projected_shape) else jnp.zeros(projected_shape))
    return (*(vary(g) for g in (ct_kernel, ct_in_kernel, ct_bias, ct_c0, ct_h0)),
            ct_inputs, ct_projected)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd, symbolic_zeros=True)


def lstm_recurrence(
    kernel: Array,
    carry: tuple[Array, Array],
    projected: Array | None = None,
    bias: Array | None = None,
    *,
    inputs: Array | None = None,
    input_kernel: Array | None = None,
    reverse: bool = False,
) -> tuple[tuple[Array, Array], Array]:
    """The LSTM recurrence ``z_t = p_t + x_t W_in + b + h_{t-1} W``, gates ``i, f, g, o``, natively.

    The inputs' half of the gates comes as ``projected`` (``p``, computed
    beforehand), as ``inputs`` with ``input_kernel`` (``x W_in``, computed
    inside the loop with the recurrent product, and its weight gradient with
    the recurrent one: no ``[T, B, 4H]`` array of projections is written or
    read), or both.

    Args:
      kernel: the recurrent kernel ``W: [H, 4H]``, float32.
      carry: ``(c, h)``, each ``[B, H]`` float32: the state before the first step.
      projected: optional ``[T, B, 4H]`` float32, time major.
      bias: optional ``[4H]`` added to every step's gates (added inside the
        kernel: one pass over the gates less than adding it beforehand).
      inputs: optional ``[B, T, F]`` float32, batch major (as ``RNN`` takes
        them), with ``input_kernel: [F, 4H]``.
      reverse: run from the last step to the first (outputs stay aligned
        with the inputs).

    Returns:
      ``((c, h), outputs)``: the state after the last step processed and
      ``outputs: [T, B, H]``. Needs ``available()``.
    """
    _require()
    c0, h0 = carry
    hidden, gates = kernel.shape
    if (inputs is None) != (input_kernel is None):
        raise ValueError("lstm_recurrence: give inputs and input_kernel together")
    if inputs is None and projected is None:
        raise ValueError("lstm_recurrence: give projected, or inputs and input_kernel")
    # The absent one is an empty array (varying like the other one inside
    # shard_map, as its cotangent will).
    if inputs is None:
        inputs = jnp.zeros((h0.shape[0], projected.shape[0], 0), jnp.float32)
        inputs = inputs + jnp.zeros_like(projected, shape=())
        input_kernel = jnp.zeros((0, gates), jnp.float32)
    if projected is None:
        projected = jnp.zeros((0,), jnp.float32) + jnp.zeros_like(inputs, shape=())
    steps = inputs.shape[1]
    if bias is None:
        bias = jnp.zeros((gates,), jnp.float32)
    if steps == 0:
        return carry, jnp.zeros((0, *h0.shape), h0.dtype)
    # Inside shard_map the weights are replicated and the inputs per device; a
    # custom VJP returns cotangents typed like its arguments, so everything
    # enters it varying like the inputs (as _recurrence.varying_like does).
    zero = jnp.zeros_like(inputs, shape=()) + jnp.zeros_like(projected, shape=())
    kernel, input_kernel, bias, c0, h0 = (
        x + zero for x in (kernel, input_kernel, bias, c0, h0))
    return _recurrence(kernel, input_kernel, bias, c0, h0, inputs, projected, bool(reverse))


# --------------------------------------------------------------------------- #
# Attention.
# --------------------------------------------------------------------------- #
#
# ``native/attention.cc`` computes softmax attention forward (saving each
# row's log-sum-exp) and backward, one (batch, head) pair per task. To keep
# forward-mode autodiff (``jax.jvp``, ``jax.hessian``) working, the native
# backward is reached as the *transpose* of a linear primitive rather than
# through a custom VJP:
#
# - ``_attention`` is a ``custom_jvp`` function: its primal is the native
#   forward call, its tangent the primitive ``_attention_tangent_p``, linear in
#   the tangents of q, k and v.
# - ``_attention_tangent_p`` is lowered, where it is evaluated (forward mode),
#   as plain XLA operations (``_reference_tangent``); reverse mode never
#   evaluates it but transposes it, and its transpose rule is the native
#   backward call.
# - The native backward is itself a ``custom_jvp`` function whose derivative
#   is that of the XLA reference backward, so second derivatives work too
#   (through XLA's operations).
#
# The log-sum-exp is an output with a real tangent (the backward reads it), so
# every derivative order stays exact.


def _probabilities(q, k, mask, lse, scale):
    """``P = exp(s q k^T - lse)`` where ``mask``, else 0: ``[B, H, q, kv]``."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return jnp.where(mask != 0, jnp.exp(logits - lse[..., None]), 0.0)


def _reference_tangent(q, k, v, mask, out, lse, dq, dk, dv, *, scale):
    """The tangent of ``(out, lse)`` (XLA operations; linear in dq, dk, dv)."""
    p = _probabilities(q, k, mask, lse, scale)
    ds = (jnp.einsum("bqhd,bkhd->bhqk", dq, k) + jnp.einsum("bqhd,bkhd->bhqk", q, dk)) * scale
    ds = jnp.where(mask != 0, ds, 0.0)
    dlse = jnp.sum(p * ds, axis=-1)  # [B, H, q]
    dp = p * (ds - dlse[..., None])
    dout = jnp.einsum("bhqk,bkhd->bqhd", dp, v) + jnp.einsum("bhqk,bkhd->bqhd", p, dv)
    return dout, dlse


def _reference_backward(q, k, v, mask, out, lse, ct_out, *, scale):
    """``(dq, dk, dv)`` from the output's cotangent (XLA operations)."""
    p = _probabilities(q, k, mask, lse, scale)
    dv = jnp.einsum("bhqk,bqhd->bkhd", p, ct_out)
    dp = jnp.einsum("bqhd,bkhd->bhqk", ct_out, v)
    row = jnp.swapaxes(jnp.sum(ct_out * out, axis=-1), 1, 2)  # [B, H, q]
    ds = p * (dp - row[..., None]) * scale
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k)
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q)
    return dq, dk, dv


def _unfuse(qkv):
    """``[B, T, 3, H, D]`` -> ``(q, k, v)``, each ``[B, T, H, D]``."""
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


# The functions below take the attention's operands in one of two layouts,
# named by ``fused``: separate ``(q, k, v)``, or one ``qkv: [B, T, 3, H, D]``
# (self-attention straight from a fused projection, which the native calls
# read and write in place: no copies of q, k and v for the call).


def _tangent_reference(*args, scale, fused):
    if fused:
        qkv, mask, out, lse, dqkv = args
        return _reference_tangent(*_unfuse(qkv), mask, out, lse, *_unfuse(dqkv), scale=scale)
    return _reference_tangent(*args, scale=scale)


def _backward_reference(*args, scale, fused):
    if fused:
        qkv, mask, out, lse, ct_out = args
        grads = _reference_backward(*_unfuse(qkv), mask, out, lse, ct_out, scale=scale)
        return jnp.stack(grads, axis=2)
    return _reference_backward(*args, scale=scale)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _native_backward(scale, fused, *args):
    """The native backward call: ``(dq, dk, dv)``, or ``dqkv`` when fused."""
    if fused:
        qkv = args[0]
        grad = jax.ffi.ffi_call(
            "nnlib_attention_qkv_backward", jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
            vmap_method="sequential",
        )(*args, scale=np.float32(scale))
        return _vary_as(args, grad)
    q, k, v = args[:3]
    grads = jax.ffi.ffi_call(
        "nnlib_attention_backward",
        (jax.ShapeDtypeStruct(q.shape, jnp.float32),
         jax.ShapeDtypeStruct(k.shape, jnp.float32),
         jax.ShapeDtypeStruct(v.shape, jnp.float32)),
        vmap_method="sequential",
    )(*args, scale=np.float32(scale))
    return tuple(_vary_as(args, g) for g in grads)


@_native_backward.defjvp
def _native_backward_jvp(scale, fused, primals, tangents):
    reference = functools.partial(_backward_reference, scale=scale, fused=fused)
    return _native_backward(scale, fused, *primals), jax.jvp(reference, primals, tangents)[1]


_attention_tangent_p = Primitive("nnlib_attention_tangent")
_attention_tangent_p.multiple_results = True


def _varying_like(base: Any, avals: Any) -> Any:
    """``base``'s aval, varying over every ``shard_map`` axis any of ``avals``
    varies over (a tangent varies wherever its primal or its inputs' tangents do)."""
    varying = frozenset().union(*(_varying_axes(a) for a in avals))
    out = base.update(weak_type=False)
    if varying != _varying_axes(out):
        out = out.update(manual_axis_type=out.manual_axis_type.update(varying=varying))
    return out


def _cast_varying(x: Array, axes: frozenset) -> Array:
    """``x`` typed as varying over ``axes`` too (the identity where it already is)."""
    missing = tuple(sorted(axes - _varying_axes(jax.typeof(x))))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _vary_as(inputs: Any, x: Array) -> Array:
    """``x`` typed as varying over the ``shard_map`` axes ``inputs`` vary over
    (an FFI call's results do not inherit them); the identity elsewhere."""
    return _cast_varying(x, frozenset().union(*(_varying_axes(jax.typeof(a)) for a in inputs)))


def _summed_like(aval: Any, g: Array) -> Array:
    """A cotangent ``g`` for an input of type ``aval``: summed over the
    ``shard_map`` axes it varies over and ``aval`` does not (a replicated
    weight's gradient from per-device data), cast to those ``aval`` varies over."""
    extra = tuple(sorted(_varying_axes(jax.typeof(g)) - _varying_axes(aval)))
    g = jax.lax.psum(g, extra) if extra else g
    return _cast_varying(g, _varying_axes(aval))


def _varying_axes(aval: Any) -> frozenset:
    return getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())


@_attention_tangent_p.def_abstract_eval
def _tangent_abstract_eval(*args, scale, fused):
    out, lse = (args[2], args[3]) if fused else (args[4], args[5])
    return _varying_like(out, args), _varying_like(lse, args)


def _tangent_transpose(cts, *args, scale, fused):
    ct_out, ct_lse = cts
    primal, linear = (args[:4], args[4:]) if fused else (args[:6], args[6:])
    if type(ct_out) is ad.Zero and type(ct_lse) is ad.Zero:
        return [None] * len(args)
    ct_out = ad.instantiate_zeros(ct_out)
    if type(ct_lse) is ad.Zero:
        grads = _native_backward(scale, fused, *primal, ct_out)
    else:  # the log-sum-exp is read (higher derivatives): XLA's transposition
        def tangent(*linear):
            return _tangent_reference(*primal, *linear, scale=scale, fused=fused)

        avals = [x.aval if ad.is_undefined_primal(x) else jax.typeof(x) for x in linear]
        zeros = tuple(jnp.zeros(a.shape, a.dtype) for a in avals)
        grads = jax.linear_transpose(tangent, *zeros)((ct_out, ad.instantiate_zeros(ct_lse)))
    grads = (grads,) if fused and not isinstance(grads, tuple) else tuple(grads)
    return [None] * len(primal) + [_summed_like(x.aval, g) if ad.is_undefined_primal(x) else None
                                   for g, x in zip(grads, linear, strict=True)]


def _map_batch(primitive: Primitive) -> Callable[..., Any]:
    """A batching rule that binds ``primitive`` once per element of the mapped
    axis (``lax.map``; the operands' layouts have no free axis to fold it into)."""

    def rule(args, dims, **params):
        mapped = [i for i, d in enumerate(dims) if d is not None]

        def one(xs):
            full = list(args)
            for i, x in zip(mapped, xs, strict=True):
                full[i] = x
            out = primitive.bind(*full, **params)
            return tuple(out) if primitive.multiple_results else out

        outs = jax.lax.map(one, [jnp.moveaxis(args[i], dims[i], 0) for i in mapped])
        if primitive.multiple_results:
            return list(outs), [0] * len(outs)
        return outs, 0

    return rule


def _register_tangent(
    primitive: Primitive, reference: Callable[..., Any], transpose: Callable[..., Any],
    batch: Callable[..., Any] | None = None,
) -> None:
    """Rules of a tangent primitive: evaluated (and differentiated again) as
    XLA's ``reference``, transposed by ``transpose`` (the native backward),
    batched by ``batch`` (default: once per element, ``_map_batch``)."""

    def jvp(primals, tangents, **params):
        tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
        return jax.jvp(functools.partial(reference, **params), primals, tangents)

    primitive.def_impl(reference)
    ad.primitive_jvps[primitive] = jvp
    ad.primitive_transposes[primitive] = transpose
    batching.primitive_batchers[primitive] = batch or _map_batch(primitive)
    mlir.register_lowering(
        primitive, mlir.lower_fun(reference, multiple_results=primitive.multiple_results)
    )


_register_tangent(_attention_tangent_p, _tangent_reference, _tangent_transpose)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _attention(scale, fused, *args):
    """The native forward call: ``(out, lse)``."""
    if fused:
        qkv = args[0]
        batch, time, _, heads, head_dim = qkv.shape
        target, out_shape = "nnlib_attention_qkv_forward", (batch, time, heads, head_dim)
    else:
        q, _, v = args[:3]
        batch, time, heads, _ = q.shape
        target, out_shape = "nnlib_attention_forward", (batch, time, heads, v.shape[-1])
    out, lse = jax.ffi.ffi_call(
        target,
        (jax.ShapeDtypeStruct(out_shape, jnp.float32),
         jax.ShapeDtypeStruct((batch, heads, time), jnp.float32)),
        vmap_method="sequential",
    )(*args, scale=np.float32(scale))
    return _vary_as(args, out), _vary_as(args, lse)


@_attention.defjvp
def _attention_jvp(scale, fused, primals, tangents):
    out, lse = _attention(scale, fused, *primals)
    # The mask (last primal) has no tangent.
    linear = tangents[:1] if fused else tangents[:3]
    dout, dlse = _attention_tangent_p.bind(*primals, out, lse, *linear, scale=scale, fused=fused)
    return (out, lse), (dout, dlse)


def _as_mask(mask: Array | None, q_len: int, kv_len: int) -> Array:
    """A boolean mask broadcastable to ``[B, H, q, kv]`` as the kernels' uint8
    ``[B or 1, H or 1, q, kv]``."""
    if mask is None:
        return jnp.ones((1, 1, q_len, kv_len), jnp.uint8)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    return jnp.broadcast_to(mask, (*mask.shape[:2], q_len, kv_len)).astype(jnp.uint8)


def attention(query: Array, key: Array, value: Array, mask: Array | None = None) -> Array:
    """``softmax(q k^T / sqrt(head_dim)) v`` per head, in the native kernel.

    Args:
      query: ``[batch, q_len, heads, head_dim]`` float32.
      key: ``[batch, kv_len, heads, head_dim]`` float32.
      value: ``[batch, kv_len, heads, v_head_dim]`` float32.
      mask: boolean, rank 4, broadcastable to ``[batch, heads, q_len,
        kv_len]`` (True = may attend); a query that may attend to no key
        gets an output of 0, as ``nnlib.layers.dot_product_attention``.

    Returns:
      ``[batch, q_len, heads, v_head_dim]``. Every derivative (reverse mode
      through the native backward, forward mode and higher orders through
      XLA's operations). Needs ``available()``.
    """
    _require()
    _, q_len, _, head_dim = query.shape
    scale = float(1.0 / np.sqrt(head_dim))
    out, _ = _attention(scale, False, query, key, value, _as_mask(mask, q_len, key.shape[1]))
    return out


def attention_qkv(qkv: Array, mask: Array | None = None) -> Array:
    """Self-attention from a fused projection, in the native kernel.

    Args:
      qkv: ``[batch, time, 3, heads, head_dim]`` float32: queries, keys and
        values stacked on axis 2 (a ``[batch, time, 3 * width]`` projection
        reshaped, with no copy). The kernels read q, k and v and write their
        gradient in this layout, so nothing is split or concatenated around
        the call.
      mask: as in :func:`attention`, with ``q_len = kv_len = time``.

    Returns:
      ``[batch, time, heads, head_dim]``, the same as
      ``attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask)``.
    """
    _require()
    _, time, _, _, head_dim = qkv.shape
    scale = float(1.0 / np.sqrt(head_dim))
    out, _ = _attention(scale, True, qkv, _as_mask(mask, time, time))
    return out


# --------------------------------------------------------------------------- #
# LayerNorm's backward.
# --------------------------------------------------------------------------- #
#
# The forward pass stays XLA's (``reference``, the caller's own formula, which
# XLA fuses with its neighbours); only reverse mode reaches the native kernel,
# as the transpose of the linear primitive ``_layer_norm_tangent_p``, the same
# construction as attention's above: forward mode and higher derivatives run
# XLA's operations.


def _layer_norm_tangent_reference(x, scale, bias, dx, dscale, dbias, *, epsilon, reference):
    def norm(x, scale, bias):
        return reference(x, scale, bias, epsilon)

    return jax.jvp(norm, (x, scale, bias), (dx, dscale, dbias))[1]


def _layer_norm_backward_reference(x, scale, bias, ct, *, epsilon, reference):
    return jax.vjp(lambda x, s, b: reference(x, s, b, epsilon), x, scale, bias)[1](ct)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _layer_norm_backward(epsilon, reference, x, scale, bias, ct):
    f32 = jnp.float32
    grads = jax.ffi.ffi_call(
        "nnlib_layer_norm_backward",
        (jax.ShapeDtypeStruct(x.shape, f32),
         jax.ShapeDtypeStruct(scale.shape, f32),
         jax.ShapeDtypeStruct(scale.shape, f32)),
        vmap_method="sequential",
    )(x, scale, ct, epsilon=np.float32(epsilon))
    # Per-device partial sums inside shard_map: typed varying like the inputs,
    # summed over devices by the transpose rule where a weight is replicated.
    return tuple(_vary_as((x, scale, bias, ct), g) for g in grads)


@_layer_norm_backward.defjvp
def _layer_norm_backward_jvp(epsilon, reference, primals, tangents):
    backward = functools.partial(_layer_norm_backward_reference, epsilon=epsilon,
                                 reference=reference)
    return (_layer_norm_backward(epsilon, reference, *primals),
            jax.jvp(backward, primals, tangents)[1])


_layer_norm_tangent_p = Primitive("nnlib_layer_norm_tangent")


@_layer_norm_tangent_p.def_abstract_eval
def _layer_norm_tangent_abstract_eval(x, scale, bias, dx, dscale, dbias, **params):
    return _varying_like(x, (x, scale, bias, dx, dscale, dbias))


def _layer_norm_tangent_transpose(ct, x, scale, bias, dx, dscale, dbias, *, epsilon,
                                  reference):
    if type(ct) is ad.Zero:
        return [None] * 6
    grads = _layer_norm_backward(epsilon, reference, x, scale, bias, ad.instantiate_zeros(ct))
    return [None] * 3 + [_summed_like(t.aval, g) if ad.is_undefined_primal(t) else None
                         for g, t in zip(grads, (dx, dscale, dbias), strict=True)]


_register_tangent(_layer_norm_tangent_p, _layer_norm_tangent_reference,
                  _layer_norm_tangent_transpose)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _layer_norm(epsilon, reference, x, scale, bias):
    return reference(x, scale, bias, epsilon)


@_layer_norm.defjvp
def _layer_norm_jvp(epsilon, reference, primals, tangents):
    out = reference(*primals, epsilon)
    tangent = _layer_norm_tangent_p.bind(*primals, *tangents, epsilon=epsilon,
                                         reference=reference)
    return out, tangent


def layer_norm(
    x: Array, scale: Array, bias: Array, epsilon: float,
    reference: Callable[[Array, Array, Array, float], Array],
) -> Array:
    """``reference(x, scale, bias, epsilon)``, a LayerNorm over the last axis
    in XLA's operations, with its reverse-mode derivative in the native kernel.

    Args:
      x: ``[..., features]`` float32.
      scale, bias: ``[features]`` float32.
      epsilon: added to the variance.
      reference: the normalisation itself, ``(x - mean) / sqrt(var + eps) *
        scale + bias`` with the two-pass variance (a module-level function:
        it is a static argument). The native backward computes exactly its
        derivative.

    Returns:
      ``reference(x, scale, bias, epsilon)``; every derivative (reverse mode
      through the native kernel, the others through XLA's operations).
    """
    _require()
    return _layer_norm(float(epsilon), reference, x, scale, bias)


# --------------------------------------------------------------------------- #
# A 2-D convolution's weight gradient.
# --------------------------------------------------------------------------- #
#
# The convolution itself and its input gradient stay XLA's; only the kernel's
# gradient reaches ``native/conv.cc``, as the transpose of the linear
# primitive ``_conv_kernel_tangent_p`` (``conv(x, dW)``, linear in ``dW``),
# the construction of attention's and LayerNorm's above: forward mode and
# higher derivatives run XLA's operations, and under ``jax.vmap`` (per-example
# gradients) the tangent is XLA's convolution again, batched as XLA batches it.

_CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def conv_reference(x: Array, kernel: Array, *, padding: Any) -> Array:
    """XLA's convolution, stride 1, no dilation, one group, channels last
    (``NHWC``/``HWIO``): what the native paths compute, and their derivatives'
    formulas."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                        dimension_numbers=_CONV_DIMENSIONS)


def conv_weight_gradient(x: Array, dy: Array, kernel_shape: tuple[int, ...],
                         padding: tuple[tuple[int, int], ...]) -> Array:
    """``dW`` of ``conv(x, W)`` (stride 1, channels last) for the output cotangent ``dy``.

    Args:
      x: ``[B, H, W, C]`` float32, ``C`` a multiple of ``CONV_CHANNEL_MULTIPLE``
        or at most ``CONV_FEW_TAPS`` taps ``KH * KW * C``
        (``conv_weight_gradient_applies``).
      dy: ``[B, OH, OW, F]`` float32.
      kernel_shape: ``(KH, KW, C, F)``.
      padding: ``((top, bottom), (left, right))``, each at least 0.

    Returns:
      ``[KH, KW, C, F]``: ``sum_{b,y,x} x[b, y+i-top, x+j-left, c] dy[b, y, x, o]``.
      Needs ``available()``.
    """
    return _conv_weight_gradient(x, dy, tuple(kernel_shape),
                                 tuple((int(lo), int(hi)) for lo, hi in padding))


def _conv_weight_gradient_reference(x, dy, kernel_shape, padding):
    kernel = jax.ShapeDtypeStruct(kernel_shape, x.dtype)
    return jax.linear_transpose(
        lambda k: conv_reference(x, k, padding=padding), kernel)(dy)[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv_weight_gradient(x, dy, kernel_shape, padding):
    (top, bottom), (left, right) = padding
    result = jax.ShapeDtypeStruct(kernel_shape, jnp.float32)
    if x.shape[-1] % CONV_CHANNEL_MULTIPLE == 0:
        out = jax.ffi.ffi_call("nnlib_conv_weight_gradient", result, vmap_method="sequential")(
            x, dy, pad_top=np.int64(top), pad_left=np.int64(left))
    else:  # few taps: the input padded by XLA (the kernel checks it spans dy exactly)
        x_pad = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        out = jax.ffi.ffi_call("nnlib_conv_weight_gradient_taps", result,
                               vmap_method="sequential")(x_pad, dy)
    return _vary_as((x, dy), out)


@_conv_weight_gradient.defjvp
def _conv_weight_gradient_jvp(kernel_shape, padding, primals, tangents):
    reference = functools.partial(_conv_weight_gradient_reference, kernel_shape=kernel_shape,
                                  padding=padding)
    return (_conv_weight_gradient(*primals, kernel_shape, padding),
            jax.jvp(reference, primals, tangents)[1])


_conv_kernel_tangent_p = Primitive("nnlib_conv_kernel_tangent")


@_conv_kernel_tangent_p.def_abstract_eval
def _conv_kernel_tangent_abstract_eval(x, dkernel, *, padding):
    shape = jax.eval_shape(functools.partial(conv_reference, padding=padding),
                           jax.ShapeDtypeStruct(x.shape, x.dtype),
                           jax.ShapeDtypeStruct(dkernel.shape, dkernel.dtype))
    # x's aval reshaped (its rank and sharding are the output's).
    return _varying_like(x.update(shape=shape.shape, dtype=shape.dtype), (x, dkernel))


def _conv_kernel_tangent_transpose(ct, x, dkernel, *, padding):
    if type(ct) is ad.Zero:
        return [None, None]
    ct = ad.instantiate_zeros(ct)
    if ad.is_undefined_primal(x):  # bilinear: x's transpose is XLA's
        grad = jax.linear_transpose(
            lambda x_: conv_reference(x_, dkernel, padding=padding), x.aval)(ct)[0]
        return [_summed_like(x.aval, grad), None]
    grad = conv_weight_gradient(x, ct, dkernel.aval.shape, padding)
    return [None, _summed_like(dkernel.aval, grad)]


def _conv_kernel_tangent_batch(args, dims, *, padding):
    """XLA's convolution, vmapped: per-example gradients batch it as before."""
    reference = functools.partial(conv_reference, padding=padding)
    return jax.vmap(reference, in_axes=tuple(dims))(*args), 0


_register_tangent(_conv_kernel_tangent_p, conv_reference, _conv_kernel_tangent_transpose,
                  _conv_kernel_tangent_batch)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv(x, kernel, padding):
    return conv_reference(x, kernel, padding=padding)


def conv_tangent(x: Array, kernel: Array, dx: Any, dkernel: Any,
                 padding: tuple[tuple[int, int], ...]) -> Array:
    """The tangent of a stride-1 convolution ``conv(x, kernel)`` (``NHWC``,
    ``HWIO``) at tangents ``dx``, ``dkernel`` (either may be a ``SymbolicZero``,
    not both): XLA's convolution of ``dx``, and ``conv_kernel_tangent``'s for
    ``dkernel`` where ``conv_kernel_tangent_applies`` (reverse mode then
    transposes it into the native weight gradient), else XLA's convolution of
    ``dkernel``. The derivative rule of
    ``conv`` and of ``nnlib.layers.conv.shifted_conv``."""
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(conv_reference(dx, kernel, padding=padding))
    if not isinstance(dkernel, SymbolicZero):
        terms.append(conv_kernel_tangent(x, dkernel, padding)
                     if conv_kernel_tangent_applies(x, kernel.shape, padding)
                     else conv_reference(x, dkernel, padding=padding))
    return functools.reduce(jnp.add, terms)


@functools.partial(_conv.defjvp, symbolic_zeros=True)
def _conv_jvp(padding, primals, tangents):
    x, kernel = primals
    return conv_reference(x, kernel, padding=padding), conv_tangent(x, kernel, *tangents, padding)


#: Input channels must be a multiple of this for the native weight gradient
#: as a product over pixels (whole vectors of channels in the patch gather; 16
#: covers AVX-512 and AVX2). Gathered a float at a time, the benchmark CNN's
#: first layer (1 channel) took 2.1 ms that way, 1.1-1.3 in XLA.
CONV_CHANNEL_MULTIPLE = 16

#: ... or the taps per output ``KH * KW * C`` at most this: the few-tap kernel
#: (an image's first layer), whose gradient is held in registers a block of
#: taps at a time.
CONV_FEW_TAPS = 49


def conv_weight_gradient_applies(x: Any, kernel_shape: tuple[int, ...]) -> bool:
    """Whether ``conv_weight_gradient`` takes float32 ``x`` with a kernel of
    ``kernel_shape``: input channels a multiple of ``CONV_CHANNEL_MULTIPLE``
    or at most ``CONV_FEW_TAPS`` taps, on the CPU with the kernels built."""
    kh, kw, c, _ = kernel_shape
    return (x.ndim == 4 and x.dtype == jnp.float32
            and (c % CONV_CHANNEL_MULTIPLE == 0 or kh * kw * c <= CONV_FEW_TAPS)
            and jax.default_backend() == "cpu" and available())


def conv_kernel_tangent_applies(x: Any, kernel_shape: tuple[int, ...], padding: Any) -> bool:
    """Whether ``conv_kernel_tangent`` takes these arguments:
    ``conv_weight_gradient_applies`` and non-negative ``padding``."""
    return (conv_weight_gradient_applies(x, kernel_shape)
            and all(p >= 0 for pair in padding for p in pair))


def conv_kernel_tangent(x: Array, dkernel: Array, padding: tuple[tuple[int, int], ...]) -> Array:
    """``conv(x, dkernel)`` (stride 1, ``NHWC``/``HWIO``) as a tangent linear in
    ``dkernel``: evaluated as XLA's convolution, transposed (reverse mode) by
    ``conv_weight_gradient``. Needs ``conv_kernel_tangent_applies``."""
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_kernel_tangent_p.bind(x, dkernel, padding=padding)


def conv_applies(x: Any, kernel: Any, padding: Any) -> bool:
    """Whether ``conv`` takes its native weight gradient for these arguments:
    float32 ``[B, H, W, C]`` with ``C`` a multiple of ``CONV_CHANNEL_MULTIPLE``
    (the product over pixels; ``conv_weight_gradient_applies`` otherwise),
    non-negative padding."""
    return (kernel.dtype == jnp.float32 and x.shape[-1] % CONV_CHANNEL_MULTIPLE == 0
            and conv_kernel_tangent_applies(x, kernel.shape, padding))


def conv(x: Array, kernel: Array, padding: tuple[tuple[int, int], ...]) -> Array:
    """``lax.conv_general_dilated(x, kernel, (1, 1), padding)``, channels last
    (``NHWC``, ``HWIO``), with the kernel's reverse-mode gradient in the native kernel.

    Args:
      x: ``[B, H, W, C]`` float32 (see ``conv_applies``).
      kernel: ``[KH, KW, C, F]`` float32.
      padding: ``((top, bottom), (left, right))``.

    Returns:
      ``[B, OH, OW, F]``, XLA's convolution; every derivative (the kernel's
      cotangent natively, the rest through XLA's operations).
    """
    _require()
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(x, kernel, padding)


# --------------------------------------------------------------------------- #
# AdamW's update of one array.
# --------------------------------------------------------------------------- #


def _adamw_reference(params, grads, mu, nu, scalars):
    """``native/adamw.cc``'s arithmetic in XLA's operations (optax's, in its
    order, the bias corrections multiplied by their reciprocals)."""
    neg_lr, a1, b1, a2, b2, eps, wd, c1, c2, keep = (scalars[i] for i in range(10))
    new_mu = a1 * grads + b1 * mu
    new_nu = a2 * (grads * grads) + b2 * nu
    update = (new_mu * (1 / c1)) / (jnp.sqrt(new_nu * (1 / c2)) + eps) + wd * params
    new_params = params + neg_lr * update
    kept = keep != 0
    return (jnp.where(kept, params, new_params), jnp.where(kept, mu, new_mu),
            jnp.where(kept, nu, new_nu))


@jax.custom_jvp
def _adamw(params, grads, mu, nu, scalars):
    f32 = jax.ShapeDtypeStruct(params.shape, jnp.float32)
    # Under vmap every operand gets the batch axis in front (the kernel reads
    # one row of scalars per member): one call for the whole ensemble.
    out = jax.ffi.ffi_call("nnlib_adamw", (f32, f32, f32), vmap_method="broadcast_all",
                           input_output_aliases={0: 0, 2: 1, 3: 2})(
        params, grads, mu, nu, scalars)
    return tuple(_vary_as((params, grads, mu, nu, scalars), x) for x in out)


@_adamw.defjvp
def _adamw_jvp(primals, tangents):
    return _adamw(*primals), jax.jvp(_adamw_reference, primals, tangents)[1]


def adamw_update(params: Array, grads: Array, mu: Array, nu: Array,
                 scalars: Array) -> tuple[Array, Array, Array]:
    """One AdamW step of one float32 array, in one pass (``native/adamw.cc``).

    Args:
      params, grads, mu, nu: the array, its gradient and its two moments, one shape.
      scalars: ``[10]`` float32: ``-lr, 1 - b1, b1, 1 - b2, b2, eps, wd, c1, c2,
        keep`` with the bias corrections ``c = 1 - b^t`` of this step; ``keep``
        non-zero returns ``(params, mu, nu)`` unchanged (a guarded step's
        skipped update, with no select over the arrays afterwards).

    Returns:
      ``(params', mu', nu')``; the inputs' buffers are reused where XLA can.
      Differentiable (through the same formula in XLA's operations); under
      ``jax.vmap`` one call updates every member. Needs ``available()``.
    """
    _require()
    return _adamw(params, grads, mu, nu, scalars)


# --------------------------------------------------------------------------- #
# Products with a narrow side: a classifier head's three matmuls.
# --------------------------------------------------------------------------- #
#
# ``native/narrow.cc`` runs, on the calling thread, the three products of a
# dense layer with at most ``NARROW_MAX_WIDTH`` outputs (``mode``: 0 the
# forward ``x W``, 1 the input gradient ``dy W^T``, 2 the weight gradient
# ``x^T dy``), where XLA:CPU's libraries split a few million multiply-adds
# over the thread pool and wait on it longer than the arithmetic takes.
# ``_narrow_p`` is bilinear and closed under transposition: each mode's
# transposes are the other two modes of the same sizes, so every derivative
# order stays native.

#: The widest narrow side (outputs of the layer) the kernel takes.
NARROW_MAX_WIDTH = 16
#: Products of more multiply-adds than this run in XLA, on every thread. On
#: the 2-core benchmark machine, in a loop of dependent calls (no waiting on
#: the pool as inside a train step), native against XLA at 256 x 512 x 10
#: (1.3M): forward 64 / 61 us, input gradient 20 / 44, weight gradient 68 /
#: 121; at 1024 x 512 x 10 (5.2M): 290 / 118, 106 / 82, 452 / 545.
NARROW_MAX_MACS = 1 << 21


def _narrow_shape(a_shape: tuple[int, ...], b_shape: tuple[int, ...], mode: int) -> tuple[int, int]:
    (m, a1), (b0, b1) = a_shape, b_shape
    if mode == 0 and a1 == b0:  # [m, k] @ [k, n]
        return m, b1
    if mode == 1 and a1 == b1:  # [m, n] @ [k, n]^T
        return m, b0
    if mode == 2 and m == b0:  # [m, k]^T @ [m, n]
        return a1, b1
    raise TypeError(f"nnlib_narrow_matmul mode {mode}: operand shapes {a_shape} and {b_shape} "
                    "do not match")


def _narrow_reference(a: Array, b: Array, *, mode: int) -> Array:
    """The product in XLA (one ``dot_general``, no transposes)."""
    contract = {0: ((1,), (0,)), 1: ((1,), (1,)), 2: ((0,), (0,))}[mode]
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _narrow_call(a: Array, b: Array, *, mode: int) -> Array:
    shape = _narrow_shape(a.shape, b.shape, mode)
    out = jax.ffi.ffi_call("nnlib_narrow_matmul", jax.ShapeDtypeStruct(shape, jnp.float32))(
        a, b, mode=np.int64(mode))
    return _vary_as((a, b), out)


_narrow_p = Primitive("nnlib_narrow_matmul")


@_narrow_p.def_abstract_eval
def _narrow_abstract_eval(a, b, *, mode):
    if a.ndim != 2 or b.ndim != 2 or a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise TypeError(f"nnlib_narrow_matmul: float32 matrices, got {a} and {b}")
    # a's aval reshaped (its rank and sharding are the output's).
    return _varying_like(a.update(shape=_narrow_shape(a.shape, b.shape, mode)), (a, b))


def _narrow_product(a: Array, b: Array, mode: int) -> Array:
    """Mode ``mode``'s product: natively where ``narrow_matmul_applies``, else XLA's."""
    (m, a1), (b0, b1) = a.shape, b.shape
    k, n = {0: (a1, b1), 1: (b0, a1), 2: (a1, b1)}[mode]
    if narrow_matmul_applies(m, k, n, a.dtype, b.dtype):
        return _narrow_p.bind(a, b, mode=mode)
    return _narrow_reference(a, b, mode=mode)


# C = A B: dA = ct B^T (1), dB = A^T ct (2). C = A B^T: dA = ct B (0), dB =
# ct^T A (2). C = A^T B: dA = B ct^T (1), dB = A ct (0).
def _narrow_transpose_a(ct, a, b, *, mode):
    ct = ad.instantiate_zeros(ct)
    grad = _narrow_product(b, ct, 1) if mode == 2 else _narrow_product(ct, b, 1 - mode)
    return _summed_like(a.aval, grad)


def _narrow_transpose_b(ct, a, b, *, mode):
    ct = ad.instantiate_zeros(ct)
    grad = {0: lambda: _narrow_product(a, ct, 2), 1: lambda: _narrow_product(ct, a, 2),
            2: lambda: _narrow_product(a, ct, 0)}[mode]()
    return _summed_like(b.aval, grad)


ad.defbilinear(_narrow_p, _narrow_transpose_a, _narrow_transpose_b)


def _narrow_batch(args, dims, *, mode):
    a, b = args
    da, db = dims
    if db is None and mode in (0, 1):
        # A batch of row blocks of A is one taller product.
        a = jnp.moveaxis(a, da, 0)
        batch, rows, width = a.shape
        out = _narrow_product(a.reshape(batch * rows, width), b, mode)
        return out.reshape(batch, rows, -1), 0
    # Otherwise one call per element (an ensemble's kernels, per-example
    # weight gradients): each the product the unbatched program computes.
    return _map_batch(_narrow_p)(args, dims, mode=mode)


batching.primitive_batchers[_narrow_p] = _narrow_batch
_narrow_p.def_impl(_narrow_call)
mlir.register_lowering(_narrow_p, mlir.lower_fun(_narrow_reference, multiple_results=False))
mlir.register_lowering(_narrow_p, mlir.lower_fun(_narrow_call, multiple_results=False),
                       platform="cpu")


def narrow_matmul_applies(m: int, k: int, n: int, a_dtype: Any = jnp.float32,
                          b_dtype: Any = jnp.float32) -> bool:
    """Whether ``[m, k] @ [k, n]`` (and its two transposed products) runs in
    ``native/narrow.cc``: float32, ``n <= NARROW_MAX_WIDTH``, at most
    ``NARROW_MAX_MACS`` multiply-adds, on the CPU with the kernels built."""
    return (a_dtype == jnp.float32 and b_dtype == jnp.float32 and 0 < n <= NARROW_MAX_WIDTH
            and m * k * n <= NARROW_MAX_MACS and jax.default_backend() == "cpu"
            and available())


def narrow_matmul(x: Array, kernel: Array) -> Array:
    """``x @ kernel`` for ``x: [m, k]`` and a narrow ``kernel: [k, n]``, natively
    where ``narrow_matmul_applies``, else XLA's product.

    Every derivative is a product of the same three (``x @ kernel``,
    ``dy @ kernel^T``, ``x^T @ dy``), natively too; under ``jax.vmap`` a
    batched ``x`` folds into the rows of one product, other batchings run one
    call per element, so a vmapped program computes what the unbatched one
    does, bit for bit.
    """
    return _narrow_product(x, kernel, 0)


# --------------------------------------------------------------------------- #
# A gradient's squared norm.
# --------------------------------------------------------------------------- #


@jax.custom_jvp
def _sums_of_squares(*xs: Array) -> Array:
    # Each as one row; under vmap the batch axes come in front of it: one call
    # sums every leaf of every member.
    out = jax.ffi.ffi_call("nnlib_sum_of_squares",
                           jax.ShapeDtypeStruct((1, len(xs)), jnp.float32),
                           vmap_method="broadcast_all")(*(x.reshape(1, -1) for x in xs))
    return _vary_as(xs, out[0])


@_sums_of_squares.defjvp
def _sums_of_squares_jvp(primals, tangents):
    return _sums_of_squares(*primals), jnp.stack(
        [2 * jnp.vdot(x, dx) for x, dx in zip(primals, tangents, strict=True)])


def _native_sums(x: Array) -> bool:
    return x.dtype == jnp.float32 and jax.default_backend() == "cpu" and available()


def sums_of_squares(xs: Any) -> Array:
    """``[sum(x ** 2) for x in xs]`` as a vector (each ``jnp.vdot(x, x)``
    accumulated in float32 at least; the vector in the widest of those dtypes,
    float32 unless an array is wider).

    The float32 arrays, on the CPU with the kernels built, in one call of
    ``native/sumsq.cc``: one pass over each, in chunks of 65,536 elements
    summed in order, on the calling thread below ~1M elements in all and
    shared with the pool above. XLA:CPU hands each such reduction to its
    YNNPACK library as a windowed sum spread over the thread pool: on the
    benchmark MLP's train step the first layer's gradient (784 x 512) took
    0.18-0.24 ms that way, the last thing its update waited for, and the
    leaves' separate reductions each waited on a thread to start. Other
    dtypes and platforms: ``jnp.vdot``. Differentiable; under ``jax.vmap``
    one call sums every member's leaves.
    """
    xs = list(xs)
    # Each sum in its array's dtype promoted with float32 (bfloat16's squares
    # are exact there), all of them in the widest of those.
    wide = [np.promote_types(x.dtype, np.float32) for x in xs]
    dtype = functools.reduce(np.promote_types, wide, np.dtype(np.float32))
    native = [i for i, x in enumerate(xs) if _native_sums(x)]
    out: list[Any] = [None] * len(xs)
    if native:
        sums = _sums_of_squares(*(xs[i] for i in native))
        for j, i in enumerate(native):
            out[i] = sums[j]
    for i, x in enumerate(xs):
        if out[i] is None:
            x = x.astype(wide[i])
            out[i] = jnp.vdot(x, x)
    return jnp.stack([o.astype(dtype) for o in out]) if out else jnp.zeros((0,), dtype)


def sum_of_squares(x: Array) -> Array:
    """``sum(x ** 2)`` as a scalar, float32 at least: ``sums_of_squares([x])[0]``."""
    return sums_of_squares([x])[0]


# --------------------------------------------------------------------------- #
# An identity XLA cannot fuse through.
# --------------------------------------------------------------------------- #

_materialize_p = Primitive("nnlib_materialize")
_materialize_p.def_impl(lambda x: x)
_materialize_p.def_abstract_eval(lambda x: x)
ad.deflinear2(_materialize_p, lambda ct, x: [materialize(ad.instantiate_zeros(ct))])
batching.primitive_batchers[_materialize_p] = lambda args, dims: (materialize(args[0]), dims[0])


def _materialize_lowering(ctx, x):
    if not available():  # nothing to call: the identity
        return [x]
    return mlir.lower_fun(
        lambda x: jax.ffi.ffi_call("nnlib_copy", jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   input_output_aliases={0: 0})(x),
        multiple_results=False)(ctx, x)


mlir.register_lowering(_materialize_p, lambda ctx, x: [x])
mlir.register_lowering(_materialize_p, _materialize_lowering, platform="cpu")


def materialize(x: Array) -> Array:
    """``x`` itself, formed once where XLA would otherwise fuse its producers
    into a larger consumer and recompute them per element of it (see
    ``native/copy.cc``).

    On the CPU with the kernels built it is a copy XLA cannot fuse through (an
    FFI call); elsewhere, and without the kernels, the identity. Linear: its
    derivative and its transpose are ``materialize`` again, so a cotangent
    passing back through it is formed once as well; under ``jax.vmap`` one
    call copies the batch.
    """
    return _materialize_p.bind(x)
