"""What both frameworks' workloads look like to the harness, and how it times them.

A workload is built once per framework (``workloads_nnlib.build`` and
``workloads_torch.build``) into a ``Runner``: ``step()`` runs one unit of work
(a training step, an inference batch, one whole generation call) and may
return before the work is done (JAX dispatches asynchronously); ``sync()``
waits for everything dispatched so far. The harness never looks inside.

``interleaved_times`` alternates the runners block by block — A B, B A, A B …
— so slow drifts of a shared, noisy machine (another process starting, the
CPU clocking down) land on both sides rather than on whichever ran last.

The sizes of every workload live in ``SPECS``, the one place both frameworks
read them from, so the two definitions cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# One entry per workload: the sizes both frameworks build, what one step is,
# and how many items (examples or generated tokens) one step processes.
SPECS: dict[str, dict[str, Any]] = {
    "mlp": dict(
        kind="train", batch=256, inputs=784, hidden=(512, 512), classes=10,
        about="MLP 784-512-512-10, batch 256, AdamW step",
    ),
    "cnn": dict(
        kind="train", batch=128, image=28, channels=1, features=(32, 64), dense=128,
        classes=10,
        about="CNN conv3x3(32)-pool-conv3x3(64)-pool-dense(128)-dense(10), 28x28x1, "
              "batch 128, AdamW step",
    ),
    "lstm": dict(
        kind="train", batch=32, time=64, inputs=32, hidden=256, classes=10,
        about="LSTM in 32, hidden 256, 64 steps, batch 32, head on last state, AdamW step",
    ),
    "gpt_b64": dict(
        kind="train", batch=64, vocab=65, context=64, layers=4, heads=4, width=128,
        about="GPT 4 layers, 4 heads, width 128, context 64, vocab 65, batch 64, AdamW step",
    ),
    "gpt_b12": dict(
        kind="train", batch=12, vocab=65, context=64, layers=4, heads=4, width=128,
        about="GPT as above at batch 12, AdamW step",
    ),
    "minilm_infer": dict(
        kind="inference", batch=32, length=128, vocab=30522, layers=6, heads=12,
        width=384, intermediate=1536, max_positions=512,
        about="BERT at MiniLM-L6 size (6x384, 12 heads, 1536, vocab 30522), batch 32, "
              "length 128, inference",
    ),
    "gpt_generate": dict(
        kind="generate", batch=8, prompt=16, new_tokens=48, vocab=65, context=64,
        layers=4, heads=4, width=128,
        about="GPT above, greedy KV-cached generation, batch 8, prompt 16 -> +48 tokens",
    ),
}

# AdamW hyperparameters shared by every training workload in both frameworks.
# Weight decay applies to matrices/kernels only (ndim >= 2), as
# nnlib.train.make_optimizer and nanoGPT do.
OPTIMIZER = dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


@dataclasses.dataclass
class Runner:
    """One framework's build of one workload, ready to time.

    Attributes:
      name: workload name (a ``SPECS`` key).
      framework: ``"nnlib"`` or ``"pytorch"``.
      step: runs one step (may return before the work is done).
      sync: blocks until every step dispatched so far has finished.
      num_params: trainable parameter count of the model.
      items_per_step: examples (training, inference) or generated tokens per step.
      unit: what ``items_per_step`` counts (``"examples"`` or ``"tokens"``).
      compile_s: seconds of the first jitted call (trace + compile + one run);
        ``None`` for eager PyTorch.
      flops_per_step: floating-point operations of one step, or ``None``.
      flops_source: where ``flops_per_step`` comes from.
      notes: anything a reader of the results should know about this build.
      handle: the live objects behind ``step`` (nnlib: ``{"state": TrainState}``
        or ``{"out": ...}``; PyTorch: the module), for inspection in tests.
    """

    name: str
    framework: str
    step: Callable[[], Any]
    sync: Callable[[], Any]
    num_params: int
    items_per_step: int
    unit: str = "examples"
    compile_s: float | None = None
    flops_per_step: float | None = None
    flops_source: str | None = None
    notes: str = ""
    handle: Any = None


def timed_call(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def seconds_per_step(runner: Runner, steps: int) -> float:
    """Runs ``steps`` steps, waits for them, returns the mean seconds per step."""
    start = time.perf_counter()
    for _ in range(steps):
        runner.step()
    runner.sync()
    return (time.perf_counter() - start) / steps


def steps_per_block(runner: Runner, target_s: float, max_steps: int = 1000,
                    probe_s: float | None = None) -> int:
    """How many steps make one timed block of about ``target_s`` seconds.

    The rate comes from runs of 1, 2, 4, … warm steps, the last of which
    takes at least ``probe_s`` (a quarter of ``target_s`` unless given): one
    step timed on its own overstates a fast step (its dispatch and wait are
    not overlapped, a step after a pause can run slow), which once made the
    MLP's blocks 0.1-0.2 s instead of 0.4, and one framework's blocks half
    the other's.
    """
    probe_s = target_s / 4 if probe_s is None else probe_s
    steps = 1
    while True:
        one = seconds_per_step(runner, steps)
        if one * steps >= probe_s or steps >= max_steps:
            break
        steps = min(2 * steps, max_steps)
    return max(1, min(max_steps, round(target_s / max(one, 1e-9))))


def interleaved_times(
    runners: Sequence[Runner],
    *,
    repeats: int,
    warmup_steps: int = 2,
    target_s: float = 0.3,
    fixed_steps: int | None = None,
    pause_s: float = 0.05,
    max_s: float | None = None,
    min_repeats: int = 3,
) -> list[dict[str, Any]]:
    """Times the runners in alternating blocks; returns one summary per runner.

    Each runner first takes ``warmup_steps`` untimed steps. Then each of the
    ``repeats`` rounds times one block per runner, the order reversed every
    other round. A block is ``fixed_steps`` steps, or as many as take about
    ``target_s`` (measured once after warm-up). A pause of ``pause_s`` before
    each block lets the other framework's worker threads, which spin for a
    while after their last task, go to sleep first. Once the timed blocks
    have taken ``max_s`` seconds, no further round starts after the first
    ``min_repeats``: on a loaded machine a slow workload then takes fewer
    rounds instead of the whole run overrunning its budget.

    Returns, per runner: ``seconds`` (per step, one entry per block, so its
    length is the number of rounds actually run),
    ``median_s``, ``steps_per_s`` (1 / median), ``iqr_steps_per_s`` (the
    interquartile range of the per-block rates), ``block_steps``.
    """
    for runner in runners:
        for _ in range(warmup_steps):
            runner.step()
        runner.sync()
    if fixed_steps is not None:
        blocks = [fixed_steps] * len(runners)
    else:
        blocks = [steps_per_block(r, target_s) for r in runners]
    times: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    start = time.perf_counter()
    for round_ in range(repeats):
        if (max_s is not None and round_ >= min_repeats
                and time.perf_counter() - start > max_s):
            break
        for i in order if round_ % 2 == 0 else order[::-1]:
            time.sleep(pause_s)
            times[i].append(seconds_per_step(runners[i], blocks[i]))
    return [summarize(t, steps) for t, steps in zip(times, blocks, strict=True)]


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th) percentiles, linear interpolation (numpy's default)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]

    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return at(0.25), at(0.5), at(0.75)


def summarize(seconds: Sequence[float], block_steps: int) -> dict[str, Any]:
    """Median and spread of per-step times from several blocks."""
    median = statistics.median(seconds)
    q1, _, q3 = quartiles([1.0 / s for s in seconds])
    return {
        "seconds": list(seconds),
        "median_s": median,
        "steps_per_s": 1.0 / median,
        "iqr_steps_per_s": q3 - q1,
        "block_steps": block_steps,
    }


def make_data(name: str, spec: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Random numpy arrays of the right shapes for workload ``name``.

    The benchmark measures speed, not accuracy, so the values are noise; both
    frameworks get the same arrays (images as NHWC, the PyTorch build
    transposes them to its NCHW).
    """
    rng = np.random.default_rng(seed)
    b = spec["batch"]
    if name == "mlp":
        inputs = rng.standard_normal((b, spec["inputs"]), np.float32)
        labels = rng.integers(0, spec["classes"], (b,))
    elif name == "cnn":
        inputs = rng.standard_normal((b, spec["image"], spec["image"], spec["channels"]),
                                     np.float32)
        labels = rng.integers(0, spec["classes"], (b,))
    elif name == "lstm":
        inputs = rng.standard_normal((b, spec["time"], spec["inputs"]), np.float32)
        labels = rng.integers(0, spec["classes"], (b,))
    elif name.startswith("gpt_b"):
        inputs = rng.integers(0, spec["vocab"], (b, spec["context"]))
        labels = rng.integers(0, spec["vocab"], (b, spec["context"]))
    elif name == "minilm_infer":
        return {"inputs": rng.integers(0, spec["vocab"], (b, spec["length"])).astype(np.int32)}
    elif name == "gpt_generate":
        return {"prompt": rng.integers(0, spec["vocab"], (b, spec["prompt"])).astype(np.int32)}
    else:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(SPECS)}")
    if inputs.dtype.kind == "i":
        inputs = inputs.astype(np.int32)
    return {"inputs": inputs, "labels": labels.astype(np.int32)}
