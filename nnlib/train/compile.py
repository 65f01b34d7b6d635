"""``jax.jit`` plus the XLA compiler options that make a program faster on its backend.

jaxlib 0.10's XLA:CPU hands every convolution to YNNPACK (an ``__ynn_fusion``
in the compiled HLO) along with the matmuls. On this library's 2-core CPU
benchmark YNNPACK's convolutions, forward and backward, are about 3x slower
than XLA's own (Eigen) convolution: a 3x3, 32 -> 64 channel convolution at
batch 128 on 14x14 took 64 ms for forward + both gradients, 20 ms on the
Eigen path. Setting ``xla_cpu_experimental_ynn_fusion_type`` to
``LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE`` (jaxlib's
default set less ``INDIVIDUAL_CONVOLUTION``) keeps YNNPACK for the matmuls and
the reductions and leaves the convolutions to XLA; the benchmark's whole CNN
train step went from 10.6 to 17.3 steps/s with the convolutions moved. The
reductions must stay: without ``REDUCE`` XLA computes a convolution's bias
gradient (a sum over batch and space, e.g. ``[128, 28, 28, 32] -> [32]``) as a
generic ``reduce-window``, 2.9 ms against YNNPACK's 0.26 ms; keeping them made
the same step 26.6 -> 29.3-30.0 steps/s. ``compiler_options`` returns that
setting for CPU programs that contain a convolution and ``None`` (XLA's
defaults) for everything else. ``experiments/bench/NOTES.md`` has the
measurements.

Usage::

    train_step = nnlib.train.jit(make_train_step(), donate_argnums=0)
    state, metrics = train_step(state, batch)  # options chosen on the first call

``nnlib.train.fit``, ``nnlib.compress.cost_report`` and the experiment
scripts compile their steps this way. Set ``NNLIB_XLA_OPTIONS=0`` in the
environment to keep XLA's defaults everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from nnlib.runtime import env_enabled

#: Per-program options for CPU programs with convolutions: YNNPACK for dots and
#: reductions, XLA's own (Eigen) convolutions.
CPU_CONV_OPTIONS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}

_CONV_PRIMITIVES = frozenset({"conv_general_dilated"})


def _primitives(jaxpr: Any) -> Iterator[str]:
    """Every primitive name in ``jaxpr`` and the jaxprs nested in its equations."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
    for sub in jex_core.subjaxprs(jaxpr):
        yield from _primitives(sub)


def has_convolution(jaxpr: Any) -> bool:
    """Whether a (closed) jaxpr, at any depth of nesting, calls a convolution."""
    return any(name in _CONV_PRIMITIVES for name in _primitives(jaxpr))


@functools.cache
def _backend_accepts(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib's compiler knows the options (they are experimental)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options))(jnp.zeros(()))
    except Exception:  # an unknown flag or enum value: older/newer jaxlib
        return False
    return True


def compiler_options(jaxpr: Any, backend: str | None = None) -> dict[str, str] | None:
    """The XLA options nnlib picks for a program, or ``None`` for XLA's defaults.

    Args:
      jaxpr: the program, e.g. ``jax.jit(f).trace(*args).jaxpr``.
      backend: platform it compiles for; default ``jax.default_backend()``.

    Returns:
      ``CPU_CONV_OPTIONS`` for a CPU program containing a convolution when
      this jaxlib accepts them (and ``NNLIB_XLA_OPTIONS`` is not ``0``),
      else ``None``.
    """
    if not env_enabled("NNLIB_XLA_OPTIONS") or (backend or jax.default_backend()) != "cpu":
        return None
    if not has_convolution(jaxpr):
        return None
    options = tuple(sorted(CPU_CONV_OPTIONS.items()))
    return dict(options) if _backend_accepts(options) else None


class _Jit:
    """``jax.jit(fun, **kwargs)`` whose compiler options are chosen at the first call."""

    def __init__(self, fun: Callable[..., Any], kwargs: dict[str, Any]):
        self.fun = fun
        self.kwargs = kwargs
        self.options: dict[str, str] | None = None
        self._jitted: Any = None
        functools.update_wrapper(self, fun)

    def _resolve(self, *args: Any, **kwargs: Any) -> Any:
        if self._jitted is None:
            traced = jax.jit(self.fun, **self.kwargs).trace(*args, **kwargs)
            self.options = compiler_options(traced.jaxpr)
            self._jitted = jax.jit(self.fun, **self.kwargs, compiler_options=self.options)
        return self._jitted

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._resolve(*args, **kwargs)(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self._resolve(*args, **kwargs).lower(*args, **kwargs)

    def trace(self, *args: Any, **kwargs: Any) -> Any:
        return self._resolve(*args, **kwargs).trace(*args, **kwargs)

    def __repr__(self) -> str:
        name = getattr(self.fun, "__name__", self.fun)
        return f"nnlib.train.jit({name!r}, options={self.options})"


def jit(fun: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
    """``jax.jit(fun, **jit_kwargs)`` with nnlib's choice of XLA options.

    On the first call the function is traced once to see what it computes
    (``compiler_options``), then jitted with those options; later calls go
    straight to that ``jax.jit`` object (its cache, its fast dispatch). With
    ``compiler_options`` in ``jit_kwargs`` the caller's choice stands and this
    is plain ``jax.jit``.

    Args:
      fun: the function to compile.
      **jit_kwargs: anything ``jax.jit`` takes (``donate_argnums``, ...).

    Returns:
      a callable with ``jax.jit``'s ``lower`` and ``trace``; ``.options``
      holds the options chosen (``None`` before the first call or when XLA's
      defaults are kept).
    """
    if "compiler_options" in jit_kwargs:
        return jax.jit(fun, **jit_kwargs)
    return _Jit(fun, jit_kwargs)


__all__ = ["CPU_CONV_OPTIONS", "compiler_options", "has_convolution", "jit"]
