"""nnlib.runtime: freed host memory is kept for the next call (glibc only)."""

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
# when freed memory is reused. The program runs on the main thread (no async
# dispatch): glibc's other threads' heaps cannot hold such a block (see
# nnlib.runtime).
_FAULTS = textwrap.dedent("""
    import json, resource
    import nnlib, nnlib.runtime
    import jax, jax.numpy as jnp
    jax.config.update("jax_cpu_enable_async_dispatch", False)

    def faults(fn, repeats=10):
        for _ in range(2):
            fn()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(repeats):
            fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeats

    f = jax.jit(lambda x: x * 2.0)
    x = jnp.ones((4096, 4096))
    out = {"jax": faults(lambda: jax.block_until_ready(f(x))),
           "allocator": nnlib.runtime.ALLOCATOR}
    print(json.dumps(out))
""")
PAGES = (1 << 26) // 4096


def _run(env_value: str | None) -> dict:
    import json

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("NNLIB_RETAIN_MEMORY", None)
    if env_value is not None:
        env["NNLIB_RETAIN_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


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
