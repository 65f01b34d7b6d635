"""The machine's float32 matmul peak, as each framework reaches it.

A large square matmul (``2 n^3`` FLOPs) is about the best case for a CPU's
vector units, so its rate is the practical ceiling the workloads' achieved
GFLOP/s are divided by. Both frameworks are timed in alternation, ``repeats``
calls each, and the median taken; the harness runs this at the start and at
the end of a benchmark, and a large difference between the two says the
machine's load changed in between.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp


def _median_gflops(seconds: list[float], n: int) -> float:
    return 2.0 * n**3 / statistics.median(seconds) / 1e9


def matmul_peak(n: int = 2048, repeats: int = 7) -> dict[str, Any]:
    """Median GFLOP/s of an ``[n, n] @ [n, n]`` float32 matmul.

    Returns ``{"n", "repeats", "jax_gflops", "torch_gflops"}`` (the torch
    figure is ``None`` when PyTorch is not installed).
    """
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()  # compile and warm up
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        ta, tb = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(ta, tb, out=out)
    jax_s, torch_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        jax_s.append(time.perf_counter() - start)
        if torch is not None:
            start = time.perf_counter()
            torch.mm(ta, tb, out=out)
            torch_s.append(time.perf_counter() - start)
    return {
        "n": n,
        "repeats": repeats,
        "jax_gflops": _median_gflops(jax_s, n),
        "torch_gflops": _median_gflops(torch_s, n) if torch_s else None,
    }
