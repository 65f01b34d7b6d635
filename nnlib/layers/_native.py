"""Native CPU kernels, compiled on first use: the LSTM recurrence.

XLA runs a recurrent layer as a ``lax.scan`` of separate operations: every
step hands a small matmul to the CPU's matmul library and the gates to a
fused loop, and each hand-over costs more than the step's arithmetic at the
sizes recurrent nets use. PyTorch's LSTM on the CPU is one oneDNN call for the
whole sequence each way. ``native/lstm.cc`` is nnlib's such kernel, called from
XLA through its FFI (``jax.ffi``): the time loop, the recurrent products (the
weights laid out once per call) and the gates run in one call forward and
one backward, with the cores splitting every step by hidden unit. The
inputs' projection and the recurrent weight gradient (one product over all
steps) stay in XLA. On the 2-core benchmark machine the LSTM layer's forward
+ backward (batch 32, 64 steps, hidden 256) went from ~37 ms in XLA's scan to
~20 ms, PyTorch's oneDNN LSTM's time (``experiments/bench/NOTES.md``).

The kernel is C++ source shipped with the package. ``lstm_available()``
compiles it once per machine with the system's C++ compiler (``$CXX``, else
``c++``; ``-O3 -march=native``, ~3 s) into ``$NNLIB_CACHE_DIR/native`` (default
``~/.cache/nnlib/native``), keyed by the source, the compiler and the CPU,
and registers it with XLA. Where no compiler is found or the build fails,
``nnlib.layers.RNN`` runs its XLA recurrence instead, with a warning once.
``NNLIB_NATIVE=0`` in the environment turns the kernels off.

``lstm_recurrence`` has a custom VJP (reverse mode: ``grad``, ``vjp``); like
the rest of ``RNN``'s fused path it has no forward mode (``RNN(fused=False)``
for ``jax.jvp``). Under ``jax.vmap`` the call runs once per batch element.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from nnlib.runtime import env_enabled

SOURCE = Path(__file__).parent / "native" / "lstm.cc"
FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-fno-math-errno",
         "-pthread", "-w")
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
    """Compiles ``native/lstm.cc`` (or finds it compiled): ``(library path, "")``
    or ``(None, why not)``."""
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
        "\n".join([SOURCE.read_text(), cxx, version, " ".join(FLAGS), _cpu_signature(),
                   include, jax.__version__]).encode()
    ).hexdigest()[:16]
    directory = cache_dir or _cache_dir()
    library = directory / f"lstm-{key}.so"
    if library.exists():
        return library, ""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Compiled under a temporary name and renamed: processes that build
        # at once (pytest workers) each see a whole library or none.
        fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        result = subprocess.run(
            [cxx, *FLAGS, "-I", include, str(SOURCE), "-o", partial],
            capture_output=True, text=True, timeout=600,
        )
        if result.returncode != 0:
            os.unlink(partial)
            return None, f"{cxx} failed: {result.stderr.strip()[-2000:]}"
        os.replace(partial, library)
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"building {library} failed: {error}"
    return library, ""


def lstm_available() -> bool:
    """Whether the native LSTM kernel is built and registered with XLA (builds it
    on the first call; ``False`` with ``NNLIB_NATIVE=0`` or when it cannot be
    built, the reason in ``reason()``)."""
    if not env_enabled("NNLIB_NATIVE"):
        return False
    with _lock:
        if _state["loaded"] is None:
            library, why = build()
            if library is not None:
                try:
                    lib = ctypes.CDLL(str(library))
                    jax.ffi.register_ffi_target(
                        _FORWARD, jax.ffi.pycapsule(lib.NnlibLstmForward), platform="cpu")
                    jax.ffi.register_ffi_target(
                        _BACKWARD, jax.ffi.pycapsule(lib.NnlibLstmBackward), platform="cpu")
                    _state["library"] = lib  # keep it loaded
                except (OSError, AttributeError) as error:
                    library, why = None, f"loading {library} failed: {error}"
            _state.update(loaded=library is not None, reason=why)
            if library is None:
                warnings.warn(
                    f"nnlib's native LSTM kernel is not available ({why}); "
                    "nnlib.layers.RNN runs LSTMs with its XLA recurrence",
                    RuntimeWarning, stacklevel=2,
                )
        return bool(_state["loaded"])


def reason() -> str:
    """Why the native kernels are off (empty when they are built)."""
    if not env_enabled("NNLIB_NATIVE"):
        return "NNLIB_NATIVE=0"
    return _state["reason"]


def _forward_call(kernel, bias, c0, h0, projected, reverse):
    steps, batch, gates = projected.shape
    hidden = gates // 4
    f32 = jnp.float32
    return jax.ffi.ffi_call(
        _FORWARD,
        (jax.ShapeDtypeStruct((steps, batch, hidden), f32),
         jax.ShapeDtypeStruct((steps, batch, hidden), f32),
         jax.ShapeDtypeStruct((steps, batch, gates), f32)),
        vmap_method="sequential",
    )(projected, kernel, bias, c0, h0, reverse=np.int64(reverse))


def _backward_call(kernel, gates, cs, c0, ct_hs, ct_c, ct_h, reverse):
    f32 = jnp.float32
    return jax.ffi.ffi_call(
        _BACKWARD,
        (jax.ShapeDtypeStruct(gates.shape, f32),
         jax.ShapeDtypeStruct(c0.shape, f32),
         jax.ShapeDtypeStruct(c0.shape, f32)),
        vmap_method="sequential",
    )(kernel, gates, cs, c0, ct_hs, ct_c, ct_h, reverse=np.int64(reverse))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _recurrence(kernel, bias, c0, h0, projected, reverse):
    hs, cs, _ = _forward_call(kernel, bias, c0, h0, projected, reverse)
    last = 0 if reverse else -1
    return (cs[last], hs[last]), hs


def _recurrence_fwd(kernel, bias, c0, h0, projected, reverse):
    hs, cs, gates = _forward_call(kernel, bias, c0, h0, projected, reverse)
    last = 0 if reverse else -1
    return ((cs[last], hs[last]), hs), (kernel, c0, h0, hs, cs, gates)


def _recurrence_bwd(reverse, residuals, cotangents):
    kernel, c0, h0, hs, cs, gates = residuals
    (ct_c, ct_h), ct_hs = cotangents
    ct_z, ct_c0, ct_h0 = _backward_call(kernel, gates, cs, c0, ct_hs, ct_c, ct_h, reverse)
    # h_{t-1} of every step, in time order, for dW = sum_t h_{t-1}^T dz_t.
    if reverse:
        previous = jnp.concatenate([hs[1:], h0[None]], axis=0)
    else:
        previous = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    hidden = kernel.shape[0]
    # Transposed in memory first, as in _recurrence.recurrence: as a
    # transposed operand the product leaves the CPU's fast matmul library.
    previous_t = jax.lax.optimization_barrier(previous.reshape(-1, hidden).T)  # [H, T*B]
    ct_kernel = previous_t @ ct_z.reshape(-1, ct_z.shape[-1])  # [H, 4H]
    return ct_kernel, ct_z.sum(axis=(0, 1)), ct_c0, ct_h0, ct_z


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def lstm_recurrence(
    kernel: Array,
    carry: tuple[Array, Array],
    projected: Array,
    bias: Array | None = None,
    *,
    reverse: bool = False,
) -> tuple[tuple[Array, Array], Array]:
    """The LSTM recurrence ``z_t = p_t + b + h_{t-1} W``, gates ``i, f, g, o``, natively.

    Args:
      kernel: the recurrent kernel ``W: [H, 4H]``, float32.
      carry: ``(c, h)``, each ``[B, H]`` float32: the state before the first step.
      projected: ``[T, B, 4H]`` float32, the inputs' half of every gate, time
        major.
      bias: optional ``[4H]`` added to every step's gates (the input
        projection's bias, added inside the kernel: one pass over
        ``projected`` less than adding it beforehand).
      reverse: run from the last step to the first (outputs stay aligned
        with the inputs).

    Returns:
      ``((c, h), outputs)``: the state after the last step processed and
      ``outputs: [T, B, H]``. Needs ``lstm_available()``.
    """
    c0, h0 = carry
    if bias is None:
        bias = jnp.zeros(projected.shape[-1:], projected.dtype)
    if projected.shape[0] == 0:
        return carry, jnp.zeros((0, *h0.shape), h0.dtype)
    # Inside shard_map the weights are replicated and the inputs per device; a
    # custom VJP returns cotangents typed like its arguments, so everything
    # enters it varying like the inputs (as _recurrence.varying_like does).
    zero = jnp.zeros_like(projected, shape=())
    kernel, bias, c0, h0 = (x + zero for x in (kernel, bias, c0, h0))
    return _recurrence(kernel, bias, c0, h0, projected, bool(reverse))
