"""nnlib.runtime: freed host memory is kept for the next call (glibc only), and CPU
programs run on the calling thread, whose heap keeps blocks above 64 MiB."""

import os
import subprocess
import sys
import textwrap

import pytest

import nnlib.runtime as runtime

GLIBC = runtime._libc() is not None
needs_glibc = pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")

# Page faults per call of a program whose 64 MiB output (16,384 pages) is freed
# before the next call: all of them when every call maps fresh pages, a fraction
# when freed memory is reused. The program runs on the main thread (nnlib turns
# JAX's async CPU dispatch off): glibc's other threads' heaps cannot hold such a
# block (see nnlib.runtime).
_FAULTS = textwrap.dedent("""
    import json, resource
    import nnlib, nnlib.runtime
    import jax, jax.numpy as jnp

    def faults(fn, repeats=10):
        for _ in range(2):
            fn()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(repeats):
            fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeats

    f = jax.jit(lambda x: x * 2.0)
    x = jnp.ones(SHAPE)
    out = {"jax": faults(lambda: jax.block_until_ready(f(x))),
           "allocator": nnlib.runtime.ALLOCATOR, "dispatch": nnlib.runtime.DISPATCH,
           "async": jax.config.read("jax_cpu_enable_async_dispatch")}
    print(json.dumps(out))
""")
PAGES = (1 << 26) // 4096  # the 64 MiB output of SHAPE = (4096, 4096)

# The same for a 96 MiB output under nnlib's defaults: glibc's heaps for threads
# other than the main one cannot hold it, so only running the program on the
# calling thread (sync_cpu_dispatch) lets the next call reuse it.
BIG_SHAPE = (4096, 6144)
BIG_PAGES = 96 * (1 << 20) // 4096

_AFTER_JAX_STARTED = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp
    jnp.ones(3).block_until_ready()
    import nnlib.runtime
    print(json.dumps({"dispatch": nnlib.runtime.DISPATCH,
                      "async": jax.config.read("jax_cpu_enable_async_dispatch")}))
""")


def _run(env_value: str | None, script: str | None = None,
         name: str = "NNLIB_RETAIN_MEMORY", shape: tuple[int, int] = (4096, 4096)) -> dict:
    import json

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("NNLIB_RETAIN_MEMORY", None)
    env.pop("NNLIB_SYNC_CPU_DISPATCH", None)
    if env_value is not None:
        env[name] = env_value
    script = script or _FAULTS.replace("SHAPE", repr(shape))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_import_runs_cpu_programs_inline_so_big_blocks_are_reused():
    result = _run(None, shape=BIG_SHAPE)
    assert result["dispatch"] == {"applied": True, "reason": "jax.config",
                                  "async_dispatch": False}
    assert result["async"] is False
    assert result["jax"] < 0.5 * BIG_PAGES, result


@needs_glibc
def test_dispatch_opt_out_keeps_async_dispatch_and_its_page_faults():
    result = _run("0", name="NNLIB_SYNC_CPU_DISPATCH", shape=BIG_SHAPE)
    assert result["dispatch"] == {"applied": False, "reason": "NNLIB_SYNC_CPU_DISPATCH=0"}
    assert result["async"] is True
    assert result["jax"] > 0.9 * BIG_PAGES, result


def test_dispatch_is_left_alone_once_jax_has_started():
    result = _run(None, _AFTER_JAX_STARTED)
    assert result["dispatch"] == {"applied": False,
                                  "reason": "JAX had already started its backends",
                                  "async_dispatch": True}
    assert result["async"] is True


@needs_glibc
def test_import_applies_it_and_the_next_call_reuses_freed_pages():
    result = _run(None)
    assert result["allocator"]["applied"] is True
    assert result["allocator"]["mmap_threshold"] == runtime.MMAP_THRESHOLD
    assert result["allocator"]["trim_threshold"] == runtime.TRIM_THRESHOLD
    assert result["jax"] < 0.5 * PAGES, result


@needs_glibc
def test_opt_out_leaves_malloc_alone():
    result = _run("0")
    assert result["allocator"] == {"applied": False, "reason": "NNLIB_RETAIN_MEMORY=0"}
    # glibc's default maps every block above 32 MiB afresh: what nnlib undoes.
    assert result["jax"] > 0.9 * PAGES, result


def test_off_glibc_it_changes_nothing(monkeypatch):
    monkeypatch.setattr(runtime, "_libc", lambda: None)
    saved = dict(runtime.ALLOCATOR)
    try:
        assert runtime.retain_freed_memory() is False
        assert runtime.ALLOCATOR == {"applied": False, "reason": "not glibc"}
    finally:
        runtime.ALLOCATOR.clear()
        runtime.ALLOCATOR.update(saved)


@needs_glibc
def test_explicit_call_records_settings():
    saved = dict(runtime.ALLOCATOR)
    try:
        assert runtime.retain_freed_memory() is True
        assert runtime.ALLOCATOR["single_arena"] is False
        assert runtime.ALLOCATOR["glibc"]
    finally:
        runtime.ALLOCATOR.clear()
        runtime.ALLOCATOR.update(saved)


@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("yes", True), ("0", False),
                                      ("false", False), (" OFF ", False), ("No", False)])
def test_env_enabled(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("NNLIB_SOME_SETTING", raising=False)
    else:
        monkeypatch.setenv("NNLIB_SOME_SETTING", value)
    assert runtime.env_enabled("NNLIB_SOME_SETTING") is on
