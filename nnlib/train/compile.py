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

Matmuls are the other choice. YNNPACK is the fastest of XLA:CPU's matmul
libraries for the small products of a 256-row batch or a recurrent loop, but
on products over thousands of rows (a transformer's tokens) the oneDNN matmul
that jaxlib also carries runs at the CPU's matmul peak where YNNPACK falls
10-30 % short (``[4096, 384] @ [384, 1536]``: 154 vs 182 GFLOP/s).
``compiler_options`` therefore sends a convolution-free x86-64 CPU program's
plain matmuls to oneDNN (``CPU_LARGE_MATMUL_OPTIONS``; reductions and the
matmuls fused with them stay in YNNPACK) when at least ``LARGE_MATMUL_SHARE``
of its matmul FLOPs are in products with ``LARGE_MATMUL_SIZE`` rows or more
(``large_matmul_share``): inference over large batches, MiniLM's 660 -> 630 ms.
Train steps keep XLA's defaults: their kernel gradients went slower in oneDNN
(an MLP step at batch 2048: 23.5 -> 20.3 steps/s), even where the whole step
gained (a GPT over 4096 tokens: 4.89 -> 5.22), and the rule does not try to
tell those apart. Small products lose most (an MLP at batch 256: 167 -> 114).

Usage::

    train_step = nnlib.train.jit(make_train_step(), donate_argnums=0)
    state, metrics = train_step(state, batch)  # options chosen on the first call

``nnlib.train.fit``, ``nnlib.compress.cost_report`` and the experiment
scripts compile their steps this way. Set ``NNLIB_XLA_OPTIONS=0`` in the
environment to keep XLA's defaults everywhere.
"""

from __future__ import annotations

import functools
import math
import platform
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

#: Per-program options for CPU programs whose matmuls are large (see
#: ``large_matmul_share``): oneDNN for the plain matmuls, YNNPACK for the
#: reductions and the matmuls fused with them (attention, LayerNorm epilogues).
CPU_LARGE_MATMUL_OPTIONS: dict[str, str] = {
    "xla_cpu_use_onednn": "True",
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
}

#: A matmul is "large" when its rows reach this size (the tokens of a batch in
#: ``[tokens, in] @ [in, out]``).
LARGE_MATMUL_SIZE = 2048

#: The share of matmul FLOPs in large matmuls above which oneDNN is chosen.
LARGE_MATMUL_SHARE = 0.8

_CONV_PRIMITIVES = frozenset({"conv_general_dilated"})

#: oneDNN's matmuls were measured on x86-64 (AVX2); elsewhere XLA's defaults stay.
_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


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
    """Whether this jaxlib's compiler takes the options (they are experimental)
    and still computes a small matmul program right with them."""
    # Evaluated now even when the first call comes from inside another trace
    # (an nnlib.train.jit function called in a jax.jit), so the cached answer
    # is about the compiler, never about tracing.
    with jax.ensure_compile_time_eval():
        a = jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32) / 1024
        b = jnp.arange(32 * 16, dtype=jnp.float32).reshape(32, 16) / 512
        try:
            got = jax.jit(lambda a, b: jnp.tanh(a @ b).sum(0),
                          compiler_options=dict(options))(a, b)
        except Exception:  # an unknown flag or enum value: older/newer jaxlib
            return False
        return bool(jnp.allclose(got, jnp.tanh(a @ b).sum(0), rtol=1e-5))


def _matmuls(jaxpr: Any, trips: int = 1) -> Iterator[tuple[int, int, int, int, int]]:
    """``(batch, rows, contraction, cols, times run)`` of every ``dot_general``.

    A ``scan`` body runs ``length`` times; other nested jaxprs (``while``,
    ``cond`` branches, ``custom_vjp`` rules, ...) are counted once each.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            size = lambda shape, axes: math.prod(shape[a] for a in axes)
            lfree = [a for a in range(len(lhs)) if a not in (*lc, *lb)]
            rfree = [a for a in range(len(rhs)) if a not in (*rc, *rb)]
            yield size(lhs, lb), size(lhs, lfree), size(lhs, lc), size(rhs, rfree), trips
        inner = trips * eqn.params["length"] if eqn.primitive.name == "scan" else trips
        for sub in jex_core.jaxprs_in_params(eqn.params):
            yield from _matmuls(sub, inner)


def large_matmul_share(jaxpr: Any) -> float:
    """The share of a program's unbatched matmul FLOPs in large matmuls.

    Large: ``>= LARGE_MATMUL_SIZE`` rows (the left operand's free axes), e.g.
    the tokens of a transformer's batch. A train step keeps about a third of
    its FLOPs in kernel gradients, whose rows are the layer's input features
    (``x^T @ dy`` contracts the tokens), so its share stays near 2/3: oneDNN
    ran those gradients slower than XLA's defaults, which overlap them with the
    rest of the backward pass (an MLP step at batch 2048: -14 %). Batched
    products (attention, ``vmap``) are left out: XLA:CPU keeps them in YNNPACK
    either way. Returns 0 for a program without unbatched matmuls.
    """
    total = large = 0
    for batch, rows, contraction, cols, trips in _matmuls(jaxpr):
        if batch != 1:
            continue
        flops = rows * contraction * cols * trips
        total += flops
        if rows >= LARGE_MATMUL_SIZE:
            large += flops
    return large / total if total else 0.0


def compiler_options(jaxpr: Any, backend: str | None = None) -> dict[str, str] | None:
    """The XLA options nnlib picks for a program, or ``None`` for XLA's defaults.

    Args:
      jaxpr: the program, e.g. ``jax.jit(f).trace(*args).jaxpr``.
      backend: platform it compiles for; default ``jax.default_backend()``.

    Returns:
      for a CPU program (when this jaxlib accepts the options and
      ``NNLIB_XLA_OPTIONS`` is not ``0``): ``CPU_CONV_OPTIONS`` if it contains a
      convolution, else ``CPU_LARGE_MATMUL_OPTIONS`` if at least
      ``LARGE_MATMUL_SHARE`` of its matmul FLOPs are in large matmuls
      (``large_matmul_share``); otherwise ``None``.
    """
    if not env_enabled("NNLIB_XLA_OPTIONS") or (backend or jax.default_backend()) != "cpu":
        return None
    if has_convolution(jaxpr):
        chosen = CPU_CONV_OPTIONS
    elif _X86_64 and large_matmul_share(jaxpr) >= LARGE_MATMUL_SHARE:
        chosen = CPU_LARGE_MATMUL_OPTIONS
    else:
        return None
    options = tuple(sorted(chosen.items()))
    return dict(options) if _backend_accepts(options) else None


class _Jit:
    """``jax.jit(fun, **kwargs)`` whose compiler options are chosen at the first call."""

    def __init__(self, fun: Callable[..., Any], kwargs: dict[str, Any]):
        self.fun = fun
        self.kwargs = kwargs
        self.options: dict[str, str] | None = None
        self._jitted: Any = None
        self._plain_jitted: Any = None
        functools.update_wrapper(self, fun)

    def _resolve(self, *args: Any, **kwargs: Any) -> Any:
        if self._jitted is None:
            traced = jax.jit(self.fun, **self.kwargs).trace(*args, **kwargs)
            self.options = compiler_options(traced.jaxpr)
            self._jitted = jax.jit(self.fun, **self.kwargs, compiler_options=self.options)
        return self._jitted

    def _plain(self) -> Any:
        if self._plain_jitted is None:
            self._plain_jitted = jax.jit(self.fun, **self.kwargs)
        return self._plain_jitted

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Inside another transformation (jit, vmap, grad) the program that
        # finally compiles is the outer one, and JAX takes compiler options only
        # on a top-level jit: such calls are plain jax.jit. The first call
        # looks for tracers (options are chosen on a top-level call only);
        # later calls go straight to the compiled function and fall back when
        # JAX refuses nested options, so the common path costs nothing extra.
        if self._jitted is None and any(
                isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
            return self._plain()(*args, **kwargs)
        try:
            return self._resolve(*args, **kwargs)(*args, **kwargs)
        except ValueError as error:
            if "compiler_options" not in str(error):
                raise
            return self._plain()(*args, **kwargs)

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


__all__ = [
    "CPU_CONV_OPTIONS",
    "CPU_LARGE_MATMUL_OPTIONS",
    "LARGE_MATMUL_SHARE",
    "LARGE_MATMUL_SIZE",
    "compiler_options",
    "has_convolution",
    "jit",
    "large_matmul_share",
]
