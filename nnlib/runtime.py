"""Process settings nnlib applies for speed: freed host memory kept, CPU programs run inline.

XLA:CPU gives every call of a compiled program fresh host buffers for its
temporaries and outputs — for a train step, tens of MB of activations,
gradients and ``scan`` buffers, allocated at the start of the call and freed at
its end. glibc's ``malloc`` serves large blocks (above its mmap threshold,
dynamic up to 32 MiB) with fresh pages from ``mmap`` and unmaps them on
``free``, and returns the top of its heap to the OS once more than its trim
threshold is free. Either way the next call writes to pages the kernel has to
fault in and zero-fill again, 4 KiB at a time. On the 2-core benchmark machine
that was a third of the LSTM train step (15.4 -> 22.4 steps/s once freed
memory is kept) and of the CNN's (16.7 -> 25.5); see
``experiments/bench/NOTES.md``.

``retain_freed_memory()`` raises both thresholds with ``mallopt`` so freed
blocks stay in the process and the next call reuses them. The cost is memory
held, not used: the process keeps its peak heap instead of handing freed pages
back to the OS between calls — what a training or serving loop, which
allocates the same sizes every step, wants anyway.

Programs above 64 MiB of temporaries need one more setting. JAX runs CPU
programs on a dispatch thread by default, and glibc's heaps for threads other
than the main one cannot hold a block above 64 MiB, so such a program (the
benchmark's GPT at batch 64, ~280 MB; MiniLM inference at batch 32, ~120 MB)
maps its temporaries afresh on every call whatever the thresholds.
``sync_cpu_dispatch()`` turns JAX's asynchronous CPU dispatch off
(``jax_cpu_enable_async_dispatch=False``): each program then runs on the
thread that calls it, whose heap keeps the block. That GPT step went 3.6 ->
5.0 steps/s, MiniLM 1.30 -> 1.41 calls/s, per-example gradients by ``vmap``
120 -> 35 ms; the other benchmark workloads did not change. (Upstream reports
the same setting restoring up to 2x on CPU inference: openxla/xla#18608.)
What it changes: a call returns when its result is computed, so Python no
longer runs ahead of the CPU — on CPU both compete for the same cores anyway;
programs spanning several devices stay asynchronous (JAX applies the setting
to single-device programs only). JAX reads it when its CPU backend starts, so
nnlib applies it only if imported before JAX's first computation.

nnlib applies both when it is first imported: ``retain_freed_memory()`` on
Linux with glibc, ``sync_cpu_dispatch()`` if JAX has not started yet. Set
``NNLIB_RETAIN_MEMORY=0`` or ``NNLIB_SYNC_CPU_DISPATCH=0`` in the environment
before importing nnlib to leave ``malloc`` or JAX's dispatch as they are.
``ALLOCATOR`` and ``DISPATCH`` record what was applied (the benchmark writes
them into its results).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Defaults: blocks up to 1 GiB come from the heap (larger ones are still
#: mapped and unmapped per call), and up to 2 GiB of free heap stays mapped.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes a C int

#: What ``retain_freed_memory`` last applied: ``{"applied": bool, ...}``.
ALLOCATOR: dict[str, Any] = {"applied": False, "reason": "not called"}

#: What ``sync_cpu_dispatch`` last did: ``{"applied": bool, "reason": str,
#: "async_dispatch": bool}`` (the last, JAX's setting afterwards).
DISPATCH: dict[str, Any] = {"applied": False, "reason": "not called"}


def _libc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # glibc only (musl has no such symbol)
        return libc
    except (OSError, AttributeError):
        return None


def retain_freed_memory(
    mmap_threshold: int = MMAP_THRESHOLD,
    trim_threshold: int = TRIM_THRESHOLD,
    *,
    single_arena: bool = False,
) -> bool:
    """Keep freed host memory in the process so the next call reuses it.

    Args:
      mmap_threshold: blocks at least this large are still served by ``mmap``
        (and returned to the OS on ``free``); glibc's default is dynamic, at
        most 32 MiB.
      trim_threshold: free heap kept mapped before ``malloc`` returns it to
        the OS (at most ``2**31 - 1``).
      single_arena: also make every thread allocate from the main heap
        (``M_ARENA_MAX=1``). Other threads' heaps cannot hold a block above
        64 MiB, so a program needing more temporaries than that per call still
        maps and faults them in each call (the GPT at batch 64: ~72,000 page
        faults per step). One arena keeps those too (that step 3.4 -> 4.5
        steps/s) but costs lock contention on small allocations (MLP and CNN
        steps 7-8 % slower) and about twice the resident memory, so it is
        off by default. Call it before JAX starts its threads for it to cover
        them.

    Returns:
      Whether both settings were applied: ``False`` off glibc (macOS, musl,
      Windows), where nothing is changed. The settings are process-wide and
      last until changed again.
    """
    libc = _libc()
    if libc is None:
        ALLOCATOR.clear()
        ALLOCATOR.update(applied=False, reason="not glibc")
        return False
    mmap_ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
    trim_ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    arena_ok = bool(libc.mallopt(_M_ARENA_MAX, 1)) if single_arena else True
    applied = mmap_ok and trim_ok and arena_ok
    ALLOCATOR.clear()
    ALLOCATOR.update(
        applied=applied, reason="mallopt",
        glibc=libc.gnu_get_libc_version().decode(),
        mmap_threshold=int(mmap_threshold) if mmap_ok else None,
        trim_threshold=int(trim_threshold) if trim_ok else None,
        single_arena=bool(single_arena and arena_ok),
    )
    return applied


def _jax_backends_started() -> bool:
    """Whether JAX has created its backends (after which dispatch is fixed)."""
    try:
        from jax._src import xla_bridge  # no public query in jax 0.10
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a jax without it: assume not started
        return False


def sync_cpu_dispatch(enabled: bool = True) -> bool:
    """Run each single-device CPU program on the thread that calls it.

    Sets JAX's ``jax_cpu_enable_async_dispatch`` to ``not enabled``; see the
    module docstring for why (programs with more than 64 MiB of temporaries
    fault their memory in on every call under asynchronous dispatch) and what
    it changes.

    Args:
      enabled: ``True`` for inline (synchronous) execution, ``False`` for
        JAX's default asynchronous dispatch.

    Returns:
      Whether the setting takes effect: ``False`` when JAX's backends have
      already started (JAX reads it once, when its CPU backend starts), in
      which case nothing is changed.
    """
    import jax

    if _jax_backends_started():
        DISPATCH.clear()
        DISPATCH.update(applied=False, reason="JAX had already started its backends",
                        async_dispatch=bool(jax.config.read("jax_cpu_enable_async_dispatch")))
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", not enabled)
    DISPATCH.clear()
    DISPATCH.update(applied=True, reason="jax.config", async_dispatch=not enabled)
    return True


def env_enabled(name: str) -> bool:
    """Whether the environment leaves nnlib's setting ``name`` on: anything but
    ``0``/``false``/``no``/``off`` (any case), unset included."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def _apply_on_import() -> None:
    if env_enabled("NNLIB_RETAIN_MEMORY"):
        retain_freed_memory()
    else:
        ALLOCATOR.update(applied=False, reason="NNLIB_RETAIN_MEMORY=0")
    if env_enabled("NNLIB_SYNC_CPU_DISPATCH"):
        sync_cpu_dispatch()
    else:
        DISPATCH.update(applied=False, reason="NNLIB_SYNC_CPU_DISPATCH=0")
