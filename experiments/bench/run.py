"""``make bench``: nnlib against eager PyTorch on the same models, on this CPU.

    python experiments/bench/run.py [--out runs/bench/results.json]
        [--quick] [--only mlp,gpt_b64,vmap] [--repeats 9]

For every workload in ``runner.SPECS`` (MLP, CNN, LSTM, GPT at two batch
sizes, MiniLM-size inference, KV-cached generation) both frameworks build the
same architecture (the parameter counts are asserted equal) and are timed in
alternating blocks, warm-up excluded; the table gives the median rate, its
interquartile range, the ratio nnlib / PyTorch (> 1: nnlib faster), nnlib's
compile time (its first jitted call, kept out of the rates), and the GFLOP/s
nnlib achieves as a share of the float32 matmul peak measured in the same run.
Then the vmap figures (``vmap_figures``). Results go to ``--out`` (JSON) and a
markdown table beside it (same name, ``.md``), which is also printed.

``--quick`` runs one or two steps per workload (a smoke test, not a
measurement). A full run takes 3 to 6 minutes on a 2-core CPU, by its load.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

# A CPU benchmark against CPU PyTorch: keep JAX off any accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

import nnlib.runtime  # noqa: E402
from experiments.bench import peak, vmap_figures  # noqa: E402
from experiments.bench import workloads_nnlib as nnlib_workloads  # noqa: E402
from experiments.bench.runner import SPECS, interleaved_times, make_data  # noqa: E402

try:
    import torch

    from experiments.bench import workloads_torch as torch_workloads
except ImportError:  # the nnlib half still runs
    torch = None
    torch_workloads = None

VMAP = "vmap"
NAMES = (*SPECS, VMAP)


def core_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: The /proc/cpuinfo flags recorded with the results (vector and matrix units).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpuinfo(text: str) -> dict[str, Any]:
    """Model name, vendor and flags of the first processor in ``/proc/cpuinfo`` text.

    Keys absent from the text (other architectures name them differently)
    come back as ``None`` (model, vendor) or an empty set (flags).
    """
    info: dict[str, Any] = {"model": None, "vendor": None, "flags": set()}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not key and any(v for v in info.values()):
            break  # the blank line that ends the first processor's block
        if key == "model name":
            info["model"] = value
        elif key == "vendor_id":
            info["vendor"] = value
        elif key == "flags":
            info["flags"] = set(value.split())
    return info


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        info = cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        info = cpuinfo("")
    cpu = info["model"] or platform.processor() or platform.machine()
    vendor, flags = info["vendor"], info["flags"]
    import flax
    import numpy

    return {
        "cpu": cpu,
        "cpu_vendor": vendor,
        # The vector units the matmul libraries can use: the ratios to PyTorch
        # differ most between CPUs with and without AVX-512 (see NOTES.md).
        "cpu_isa": [f for f in ISA_FLAGS if f in flags],
        "cores": core_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": numpy.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        # nnlib.runtime's malloc settings, applied on import to the whole
        # process, so to both frameworks alike.
        "host_allocator": dict(nnlib.runtime.ALLOCATOR),
        # JAX's CPU dispatch as nnlib left it (nnlib.runtime.sync_cpu_dispatch).
        "jax_cpu_async_dispatch": bool(jax.config.read("jax_cpu_enable_async_dispatch")),
    }


def load() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_workload(name: str, args: argparse.Namespace, spec: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Builds both frameworks' runners for ``name``, times them interleaved."""
    spec = spec or SPECS[name]
    data = make_data(name, spec)
    runners = [nnlib_workloads.build(name, data, spec)]
    if torch_workloads is not None:
        runners.append(torch_workloads.build(name, data, spec))
        counts = {r.framework: r.num_params for r in runners}
        assert len(set(counts.values())) == 1, f"{name}: parameter counts differ: {counts}"
    times = interleaved_times(runners, **timing(args))
    ours = runners[0]
    row: dict[str, Any] = {
        "name": name,
        "about": spec["about"] if "about" in spec else name,
        "kind": spec["kind"],
        "unit": ours.unit,
        "items_per_step": ours.items_per_step,
        "num_params": ours.num_params,
        "compile_s": ours.compile_s,
        "flops_per_step": ours.flops_per_step,
        "flops_source": ours.flops_source,
    }
    for runner, summary in zip(runners, times, strict=True):
        row[runner.framework] = {**summary, "notes": runner.notes}
    if ours.flops_per_step:
        row["nnlib_gflops"] = ours.flops_per_step * row["nnlib"]["steps_per_s"] / 1e9
        if "pytorch" in row:
            row["pytorch_gflops"] = ours.flops_per_step * row["pytorch"]["steps_per_s"] / 1e9
    if "pytorch" in row:
        row["ratio"] = row["nnlib"]["steps_per_s"] / row["pytorch"]["steps_per_s"]
    return row


def run_vmap(args: argparse.Namespace, spec: dict[str, Any] | None = None
             ) -> list[dict[str, Any]]:
    """The two vmap comparisons, each a list of interleaved runners."""
    spec = spec or vmap_figures.SPEC
    rows = []
    for figure, build in (("per_example_gradients", vmap_figures.per_example_runners),
                          ("ensemble_8_seeds", vmap_figures.ensemble_runners)):
        runners = build(spec)
        times = interleaved_times(runners, **timing(args))
        entries = {r.name: {**t, "framework": r.framework, "compile_s": r.compile_s}
                   for r, t in zip(runners, times, strict=True)}
        names = [r.name for r in runners]
        rows.append({
            "figure": figure,
            "batch": spec["batch"],
            "members": spec["members"] if figure.startswith("ensemble") else None,
            "runs": entries,
            # loop time / vmap time: how many times faster the vmapped program is.
            "vmap_speedup": entries[names[1]]["median_s"] / entries[names[0]]["median_s"],
        })
        del runners
        gc.collect()
    return rows


def timing(args: argparse.Namespace) -> dict[str, Any]:
    """``interleaved_times`` settings: a smoke run or a measurement."""
    if args.quick:
        return {"repeats": 1, "warmup_steps": 0, "fixed_steps": 1, "pause_s": 0.0}
    return {"repeats": args.repeats, "warmup_steps": 2, "target_s": args.block_seconds,
            "max_s": args.max_seconds}


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _isa(machine_meta: dict[str, Any]) -> str:
    """`` (AVX-512, AMX)``-style note of the vector units, empty for older results."""
    isa = machine_meta.get("cpu_isa")
    if isa is None:
        return ""
    units = ["AVX-512" if "avx512f" in isa else "AVX2" if "avx2" in isa else "no AVX2"]
    if "amx_tile" in isa:
        units.append("AMX")
    return f" ({', '.join(units)})"


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables."""
    meta, peaks = results["meta"], results["peak"]
    peak_gflops = results["peak_gflops"]
    lines = [
        f"nnlib vs PyTorch (eager), {meta['date']}, {meta['machine']['cpu']}"
        f"{_isa(meta['machine'])}, "
        f"{meta['machine']['cores']} cores, load average {meta['load_start']} -> "
        f"{meta['load_end']}, PyTorch threads {meta['machine']['torch_threads']}, "
        f"freed host memory kept (nnlib.runtime, both frameworks): "
        f"{'yes' if meta['machine'].get('host_allocator', {}).get('applied') else 'no'}, "
        f"JAX async CPU dispatch: "
        f"{'on' if meta['machine'].get('jax_cpu_async_dispatch', True) else 'off'}"
        f"{' (QUICK: not a measurement)' if meta['quick'] else ''}",
        "",
        f"float32 matmul peak ({peaks['start']['n']}^3): jax.numpy.dot "
        f"{_fmt(peaks['start']['jax_gflops'])} GFLOP/s at the start, "
        f"{_fmt(peaks['end']['jax_gflops'])} at the end; torch.mm "
        f"{_fmt(peaks['start']['torch_gflops'])} / {_fmt(peaks['end']['torch_gflops'])}. "
        f"% of peak uses {_fmt(peak_gflops)} GFLOP/s.",
        "",
        "| workload | unit | nnlib /s (± IQR/2) | PyTorch /s (± IQR/2) | nnlib/PyTorch | compile s "
        "| GFLOP/s | % of peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["workloads"]:
        scale = row["items_per_step"] if row["unit"] == "tokens" else 1
        unit = "tokens" if row["unit"] == "tokens" else "steps"

        def rate(fw: str, row: dict[str, Any] = row, scale: int = scale) -> str:
            if fw not in row:
                return "–"
            r = row[fw]
            return f"{_fmt(r['steps_per_s'] * scale)} (±{_fmt(r['iqr_steps_per_s'] * scale / 2)})"

        gflops = row.get("nnlib_gflops")
        share = 100 * gflops / peak_gflops if gflops and peak_gflops else None
        lines.append(
            f"| {row['name']} | {unit} | {rate('nnlib')} | {rate('pytorch')} | "
            f"{_fmt(row.get('ratio'))} | {_fmt(row['compile_s'], 1)} | {_fmt(gflops, 1)} | "
            f"{_fmt(share, 1)} |"
        )
    lines += ["", "Workloads: " + "; ".join(
        f"**{r['name']}** {r['about']} ({r['num_params']:,} params)"
        for r in results["workloads"]), ""]
    if results.get("vmap"):
        lines += ["| vmap figure | run | ms per job (± IQR/2) | compile s |", "|---|---|---|---|"]
        for fig in results["vmap"]:
            for run_name, r in fig["runs"].items():
                iqr = 1e3 * r["iqr_steps_per_s"] * r["median_s"] ** 2 / 2
                lines.append(f"| {fig['figure']} | {run_name} ({r['framework']}) | "
                             f"{_fmt(1e3 * r['median_s'], 1)} (±{_fmt(iqr, 1)}) | "
                             f"{_fmt(r['compile_s'], 1)} |")
        lines += [""] + [
            f"{fig['figure']}: loop time / vmap time = {_fmt(fig['vmap_speedup'])} "
            f"(batch {fig['batch']}" + (f", {fig['members']} members" if fig["members"] else "")
            + ")." for fig in results["vmap"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "results.json"),
                        help="JSON output; the markdown table goes beside it (.md)")
    parser.add_argument("--quick", action="store_true",
                        help="one or two steps per workload: a smoke test, not a measurement")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of: {', '.join(NAMES)}")
    parser.add_argument("--repeats", type=int, default=9,
                        help="timed blocks per framework and workload (median taken)")
    parser.add_argument("--block-seconds", type=float, default=0.4,
                        help="target length of one timed block")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads (default: the core count); 1 is far "
                             "faster for PyTorch when other processes hold a core")
    parser.add_argument("--max-seconds", type=float, default=25.0,
                        help="timed seconds per workload after which no new round starts "
                             "(beyond the first 3): keeps a loaded machine under 10 minutes")
    args = parser.parse_args(argv)
    names = NAMES if args.only is None else tuple(n.strip() for n in args.only.split(","))
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(NAMES)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    if torch is not None:
        torch.set_num_threads(args.torch_threads or core_count())
    start = time.perf_counter()
    results: dict[str, Any] = {"meta": {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "load_start": load(),
        "quick": args.quick,
        "repeats": 1 if args.quick else args.repeats,
        "block_seconds": args.block_seconds,
        "max_seconds": args.max_seconds,
        "argv": sys.argv[1:] if argv is None else argv,
    }}
    peak_size, peak_repeats = (256, 1) if args.quick else (2048, 7)
    results["peak"] = {"start": peak.matmul_peak(peak_size, peak_repeats)}
    print(f"matmul peak: {results['peak']['start']}", flush=True)

    results["workloads"] = []
    for name in names:
        if name == VMAP:
            continue
        row = run_workload(name, args)
        results["workloads"].append(row)
        print(f"{name}: nnlib {row['nnlib']['steps_per_s']:.2f}/s"
              + (f", pytorch {row['pytorch']['steps_per_s']:.2f}/s, ratio {row['ratio']:.2f}"
                 if "pytorch" in row else "") + f", compile {row['compile_s']:.1f}s",
              flush=True)
        gc.collect()
    results["vmap"] = run_vmap(args) if VMAP in names else []

    results["peak"]["end"] = peak.matmul_peak(peak_size, peak_repeats)
    results["peak_gflops"] = max(results["peak"]["start"]["jax_gflops"],
                                 results["peak"]["end"]["jax_gflops"])
    for row in results["workloads"]:
        if row.get("nnlib_gflops"):
            row["nnlib_pct_peak"] = 100 * row["nnlib_gflops"] / results["peak_gflops"]
    results["meta"]["load_end"] = load()
    results["meta"]["wall_s"] = time.perf_counter() - start

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    print("\n" + table)
    print(f"wrote {out} and {out.with_suffix('.md')} ({results['meta']['wall_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
