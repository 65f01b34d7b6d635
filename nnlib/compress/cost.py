"""What a step costs: FLOPs, bytes, memory, time, energy and carbon.

Three sources, each with its limits stated:

- **XLA's cost analysis** (``jax.jit(f).lower(*args).compile().cost_analysis()``)
  counts the floating-point operations and the bytes read and written by the
  *compiled* program, after XLA's fusions. A matmul ``[B, I] @ [I, O]`` counts
  ``2 * B * I * O`` FLOPs (a multiply and an add per term). In jax 0.10 the
  call returns one ``dict``; older versions returned a list of one dict per
  device, and both are accepted here.

  **A loop body is counted once.** XLA's ``HloCostAnalysis`` does not
  multiply a ``while`` loop's body by its trip count, and ``lax.scan``,
  ``lax.fori_loop``, ``nn.scan`` and scanned RNNs all lower to ``while``: a
  10-step scan of a matmul reports the FLOPs of one matmul (plus 2 for the
  loop counter). Multiply by the trip count yourself, or count an unrolled
  copy (``lax.scan(..., unroll=True)``) when you need the total.
- **Sizes** of parameter and optimizer-state pytrees (``leaf.nbytes``), and
  the compiled program's ``memory_analysis()`` (argument, output, temporary
  and code bytes, and the peak where the backend reports it).
- **Wall-clock time** of the compiled program: warm-up calls excluded (the
  first call may still allocate or page in code), then the median of
  ``repeats`` calls, each waited on with ``block_until_ready``. The median,
  not the mean, because a shared machine's hiccups land in the tail.

Energy and carbon are *estimates* in the manner of Strubell et al. (2019),
"Energy and Policy Considerations for Deep Learning in NLP", and Lacoste et
al. (2019), "Quantifying the Carbon Emissions of Machine Learning"::

    energy_kWh = power_W * utilization * PUE * time_s / 3.6e6
    CO2_g      = energy_kWh * grid_gCO2_per_kWh

Every assumption is an argument, and all of them land in the report:

- ``device_power_w``: board power of the device. Default by platform
  (``DEFAULT_DEVICE_POWER_W``): CPU 65 W (a typical desktop CPU's TDP; a few
  cores of a cloud VM draw less), GPU 400 W (A100 SXM's TDP), TPU 200 W (a
  TPU v4 chip's mean measured power is about 170-200 W).
- ``utilization``: the fraction of that power drawn while the step runs
  (default 1.0: TDP as an upper bound, as the ML CO2 calculator does).
- ``pue``: data-centre power usage effectiveness (default 1.58, the 2018
  industry average Strubell et al. use; hyperscalers report ~1.1).
- ``grid_gco2_per_kwh``: carbon intensity of the electricity (default 475 g,
  the IEA's 2019 world average; from ~20 g for hydro to ~800 g for coal).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jaxtyping import PyTree

from nnlib.layers._native import turned_off
from nnlib.train.compile import compiler_options

# Board power by jax platform, in watts; see the module docstring.
DEFAULT_DEVICE_POWER_W: dict[str, float] = {"cpu": 65.0, "gpu": 400.0, "tpu": 200.0}
DEFAULT_UTILIZATION = 1.0
DEFAULT_PUE = 1.58
DEFAULT_GRID_GCO2_PER_KWH = 475.0


def tree_bytes(tree: PyTree) -> int:
    """Bytes held by the array leaves of a pytree (``size * itemsize``)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                   for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def tree_size(tree: PyTree) -> int:
    """Number of scalars in the array leaves of a pytree (parameter count)."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def compile_fn(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``jax.jit(fn).lower(*args, **kwargs).compile()``: the compiled executable,
    with the XLA options ``nnlib.train.jit`` would pick for it.

    ``fn`` may already be jitted (even with ``donate_argnums``): jitting it
    again inlines it, and the outer program donates nothing, so the compiled
    function can be called repeatedly on the same arguments.
    """
    traced = jax.jit(fn).trace(*args, **kwargs)
    return traced.lower().compile(compiler_options=compiler_options(traced.jaxpr))


def _as_dict(analysis: Any) -> dict[str, float]:
    # jax 0.10 returns a dict; jax <= 0.4.30 returned [dict] (one per device).
    if analysis is None:
        return {}
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    return {str(k): float(v) for k, v in dict(analysis).items()}


def cost_analysis(fn: Callable[..., Any], *args: Any, compiled: Any = None,
                  **kwargs: Any) -> dict[str, float]:
    """FLOPs, transcendentals and bytes accessed of ``fn(*args)``, as XLA counts them.

    Args:
      fn: any function of arrays/pytrees (jitted or not).
      *args, **kwargs: example arguments with the real shapes and dtypes.
      compiled: an executable from ``compile_fn`` to reuse instead of
        compiling again.

    Returns:
      ``{"flops", "transcendentals", "bytes_accessed"}`` (floats; 0 when the
      backend does not report one). A ``while``/``scan`` body counts once.
      Compiled here, the program is traced without nnlib's native CPU kernels
      (``nnlib.layers._native.turned_off``): XLA counts no work inside their
      calls, so the figures are those of the same math in XLA's operations.
      A ``compiled`` executable is counted as it is.
    """
    if compiled is None:
        with turned_off():  # XLA counts nothing inside nnlib's native calls
            compiled = compile_fn(fn, *args, **kwargs)
    raw = _as_dict(compiled.cost_analysis())
    return {"flops": raw.get("flops", 0.0),
            "transcendentals": raw.get("transcendentals", 0.0),
            "bytes_accessed": raw.get("bytes accessed", 0.0)}


def flops(fn: Callable[..., Any], *args: Any, compiled: bool = False, **kwargs: Any) -> float:
    """XLA's FLOP count of ``fn(*args)``; a loop body counts once.

    By default the count is taken on the *lowered* program
    (``jax.jit(fn).lower(*args).cost_analysis()``), which skips the backend
    compile (~5x cheaper on CPU). XLA's fusions change the bytes accessed,
    not the FLOPs: on nnlib's MLPs and CNNs both counts agree exactly (the
    tests check a Dense layer both ways). ``compiled=True`` counts the
    compiled program instead. Either way ``fn`` is traced without nnlib's
    native CPU kernels, whose calls XLA counts as no work: the count is the
    math's.
    """
    if compiled:
        return cost_analysis(fn, *args, **kwargs)["flops"]
    with turned_off():
        lowered = jax.jit(fn).lower(*args, **kwargs)
    return _as_dict(lowered.cost_analysis()).get("flops", 0.0)


def memory_analysis(compiled: Any) -> dict[str, int]:
    """Argument, output, temporary, generated-code and peak bytes of a compiled
    program (``{}`` when the backend reports nothing; the peak only where it does)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    names = {"argument_bytes": "argument_size_in_bytes", "output_bytes": "output_size_in_bytes",
             "temp_bytes": "temp_size_in_bytes",
             "code_bytes": "generated_code_size_in_bytes",
             "peak_bytes": "peak_memory_in_bytes"}
    out = {}
    for key, attr in names.items():
        value = getattr(stats, attr, None)
        if value is not None and not (key == "peak_bytes" and value <= 0):
            out[key] = int(value)
    return out


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int = 20, warmup: int = 2,
            **kwargs: Any) -> dict[str, float]:
    """Wall-clock seconds of ``fn(*args)``: median and spread over ``repeats`` calls.

    Each call is waited on (``jax.block_until_ready``); ``warmup`` calls run
    first and are not timed. ``fn`` should be compiled already (``compile_fn``
    or ``jax.jit``), otherwise the first warm-up call includes compilation.

    Returns:
      ``{"median_s", "min_s", "p90_s", "repeats"}``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_fn needs repeats >= 1 and warmup >= 0, got repeats={repeats}, "
                         f"warmup={warmup}")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args, **kwargs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args, **kwargs))
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times),
            "p90_s": float(np.percentile(times, 90)), "repeats": float(repeats)}


def energy_estimate(
    seconds: float,
    *,
    device_power_w: float | None = None,
    utilization: float = DEFAULT_UTILIZATION,
    pue: float = DEFAULT_PUE,
    grid_gco2_per_kwh: float = DEFAULT_GRID_GCO2_PER_KWH,
    platform: str | None = None,
) -> dict[str, float]:
    """Energy (kWh) and carbon (g CO2e) of running a device for ``seconds``.

    ``energy_kWh = power_W * utilization * PUE * seconds / 3.6e6`` and
    ``CO2_g = energy_kWh * grid_gCO2_per_kWh``. ``device_power_w=None`` takes
    ``DEFAULT_DEVICE_POWER_W[platform]`` (platform: the default jax device's).

    Returns:
      ``{"energy_kwh", "co2_g", "device_power_w", "utilization", "pue",
      "grid_gco2_per_kwh"}`` (the assumptions travel with the numbers).
    """
    if device_power_w is None:
        platform = platform or jax.devices()[0].platform
        device_power_w = DEFAULT_DEVICE_POWER_W.get(platform, DEFAULT_DEVICE_POWER_W["gpu"])
    for name, value in (("seconds", seconds), ("device_power_w", device_power_w),
                        ("utilization", utilization), ("pue", pue),
                        ("grid_gco2_per_kwh", grid_gco2_per_kwh)):
        if value < 0:
            raise ValueError(f"energy_estimate: {name} must be >= 0, got {value}")
    if pue < 1:
        raise ValueError(f"energy_estimate: a PUE is >= 1 (total facility power over IT "
                         f"power), got {pue}")
    kwh = device_power_w * utilization * pue * seconds / 3.6e6
    return {"energy_kwh": kwh, "co2_g": kwh * grid_gco2_per_kwh,
            "device_power_w": float(device_power_w), "utilization": float(utilization),
            "pue": float(pue), "grid_gco2_per_kwh": float(grid_gco2_per_kwh)}


def cost_report(
    step_fn: Callable[..., Any],
    *args: Any,
    params: PyTree | None = None,
    opt_state: PyTree | None = None,
    num_steps: int = 1,
    repeats: int = 20,
    warmup: int = 2,
    time_it: bool = True,
    device_power_w: float | None = None,
    utilization: float = DEFAULT_UTILIZATION,
    pue: float = DEFAULT_PUE,
    grid_gco2_per_kwh: float = DEFAULT_GRID_GCO2_PER_KWH,
    **kwargs: Any,
) -> dict[str, Any]:
    """Everything one step of ``step_fn(*args, **kwargs)`` costs, as flat ``cost_*`` keys.

    Args:
      step_fn: a train step ``(state, batch) -> ...``, an ``apply`` or any
        function of arrays; jitted or not (it is compiled once here).
      *args, **kwargs: real arguments (they are run ``warmup + repeats`` times).
      params, opt_state: pytrees to size; by default ``args[0].params`` and
        ``args[0].opt_state`` when the first argument is a ``TrainState``.
      num_steps: steps the energy and carbon are extrapolated to (e.g. a whole
        training run); 1 gives the cost of one step.
      repeats, warmup: timing (see ``time_fn``); ``time_it=False`` skips it
        (and the energy, which needs a time).
      device_power_w, utilization, pue, grid_gco2_per_kwh: the energy
        assumptions (see ``energy_estimate`` and the module docstring).

    Returns:
      A flat dict: ``cost_flops_per_step``, ``cost_transcendentals_per_step``,
      ``cost_bytes_accessed``, ``cost_arithmetic_intensity`` (FLOPs/byte),
      ``cost_num_params``, ``cost_param_bytes``, ``cost_opt_state_bytes``,
      ``cost_compiled_{argument,output,temp,code,peak}_bytes`` (where
      reported), ``cost_step_time_s`` (median), ``cost_step_time_min_s``,
      ``cost_step_time_p90_s``, ``cost_timing_repeats``, ``cost_flops_per_s``,
      ``cost_num_steps``, ``cost_energy_kwh``, ``cost_co2_g``, the assumptions
      (``cost_device_power_w``, ``cost_utilization``, ``cost_pue``,
      ``cost_grid_gco2_per_kwh``) and ``cost_device``. FLOPs and bytes count a
      ``while``/``scan`` loop body once. FLOPs and transcendentals are the
      math's: the step traced without nnlib's native CPU kernels (the LSTM
      recurrence, attention, LayerNorm's backward, a convolution's kernel
      gradient, AdamW's update, narrow products), which XLA sees as opaque
      calls. Bytes and memory are the compiled program's as it runs, the
      native calls' own traffic not counted.
    """
    if num_steps < 1:
        raise ValueError(f"cost_report: num_steps must be >= 1, got {num_steps}")
    if params is None and args and hasattr(args[0], "params"):
        params = args[0].params
    if opt_state is None and args and hasattr(args[0], "opt_state"):
        opt_state = args[0].opt_state
    compiled = compile_fn(step_fn, *args, **kwargs)
    xla = cost_analysis(step_fn, *args, compiled=compiled, **kwargs)
    # The math's counts: the program compiled again without native calls
    # (cost_analysis does), where it has any.
    math = (cost_analysis(step_fn, *args, **kwargs)
            if 'custom_call_target="nnlib_' in compiled.as_text()
            else xla)
    device = jax.devices()[0]
    report: dict[str, Any] = {
        "cost_flops_per_step": math["flops"],
        "cost_transcendentals_per_step": math["transcendentals"],
        "cost_bytes_accessed": xla["bytes_accessed"],
        "cost_arithmetic_intensity": (math["flops"] / xla["bytes_accessed"]
                                      if xla["bytes_accessed"] else 0.0),
    }
    if params is not None:
        report["cost_num_params"] = tree_size(params)
        report["cost_param_bytes"] = tree_bytes(params)
    if opt_state is not None:
        report["cost_opt_state_bytes"] = tree_bytes(opt_state)
    for key, value in memory_analysis(compiled).items():
        report[f"cost_compiled_{key}"] = value
    report["cost_device"] = f"{device.platform}:{device.device_kind}"
    if time_it:
        timing = time_fn(compiled, *args, repeats=repeats, warmup=warmup, **kwargs)
        step_s = timing["median_s"]
        report |= {"cost_step_time_s": step_s, "cost_step_time_min_s": timing["min_s"],
                   "cost_step_time_p90_s": timing["p90_s"], "cost_timing_repeats": repeats,
                   "cost_flops_per_s": math["flops"] / step_s if step_s > 0 else 0.0}
        energy = energy_estimate(step_s * num_steps, device_power_w=device_power_w,
                                 utilization=utilization, pue=pue,
                                 grid_gco2_per_kwh=grid_gco2_per_kwh, platform=device.platform)
        report["cost_num_steps"] = num_steps
        report |= {f"cost_{k}": v for k, v in energy.items()}
    return report


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_cost(report: Mapping[str, Any]) -> str:
    """A short human-readable summary of a ``cost_report`` (missing keys are skipped)."""
    r = report
    lines = ["compute cost (XLA cost analysis; a while/scan loop body counts once)"]
    lines.append(f"  FLOPs / step        {_si(r['cost_flops_per_step'], 'FLOP')}"
                 f"  ({_si(r['cost_bytes_accessed'], 'B')} accessed, "
                 f"{r['cost_arithmetic_intensity']:.2f} FLOP/B)")
    if "cost_num_params" in r:
        line = (f"  parameters          {r['cost_num_params']:,} "
                f"({_si(r['cost_param_bytes'], 'B')})")
        if "cost_opt_state_bytes" in r:
            line += f", optimizer state {_si(r['cost_opt_state_bytes'], 'B')}"
        lines.append(line)
    mem = [f"{name} {_si(r[f'cost_compiled_{name}_bytes'], 'B')}"
           for name in ("argument", "output", "temp", "peak")
           if f"cost_compiled_{name}_bytes" in r]
    if mem:
        lines.append("  compiled memory     " + ", ".join(mem))
    if "cost_step_time_s" in r:
        lines.append(f"  step time           {r['cost_step_time_s'] * 1e3:.3f} ms median of "
                     f"{r['cost_timing_repeats']} (min {r['cost_step_time_min_s'] * 1e3:.3f} ms)"
                     f" -> {_si(r['cost_flops_per_s'], 'FLOP/s')} on {r['cost_device']}")
        lines.append(f"  energy, {r['cost_num_steps']:,} step(s)  {r['cost_energy_kwh']:.3g} kWh, "
                     f"{r['cost_co2_g']:.3g} g CO2e  (assumes {r['cost_device_power_w']:g} W x "
                     f"{r['cost_utilization']:g} utilization x PUE {r['cost_pue']:g}, "
                     f"{r['cost_grid_gco2_per_kwh']:g} gCO2/kWh)")
    return "\n".join(lines)
