"""``make demo``: the tour from MLP to Transformer on scikit-learn's 8x8 digits.

Trains four models with their experiment configs (no download needed), then
prints one table (model, parameters, test accuracy, train time, steps/s, and
what a training step costs: XLA's FLOPs, the median step time, the energy of
the whole run) and draws every model's validation curve into one plot. About
a minute on a 2-core CPU (44 s on an Intel Xeon). Each run's full output (metrics.json with its
``cost_*`` keys, history, TensorBoard events, checkpoints, its own learning
curves) is under ``runs/demo/<config>/``; ``runs/demo/metrics.json`` gathers
every run's metrics as ``<config>_<key>``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.train import train_and_evaluate  # noqa: E402
from nnlib.train import read_history  # noqa: E402

CONFIGS = ("digits_mlp", "digits_cnn", "digits_lstm", "digits_transformer")


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments/configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--epochs-scale", type=float, default=1.0,
                        help="multiply every config's epochs (e.g. 0.05 for a smoke run)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    rows = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in CONFIGS:
        config = load_config(name)
        config.num_epochs = max(1, round(config.num_epochs * args.epochs_scale))
        if args.epochs_scale < 1 and config.get("warmup_steps"):
            # The warm-up is a fraction of the run: a shortened run must not end in it.
            config.warmup_steps = max(1, round(config.warmup_steps * args.epochs_scale))
        run_dir = workdir / name
        shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains afresh
        print(f"\n== {name} ==", flush=True)
        metrics = train_and_evaluate(config, run_dir)
        rows.append((name, metrics))
        val = [r for r in read_history(run_dir) if r.get("split") == "val"]
        ax.plot([r["step"] for r in val], [r["accuracy"] for r in val], label=name)

    ax.set(xlabel="step", ylabel="validation accuracy", title="nnlib demo: 8x8 digits",
           ylim=(0.5, 1.0))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    plot = workdir / "learning_curves.png"
    fig.savefig(plot, dpi=120)

    # Every run's metrics in one flat file; each run also wrote its own.
    summary = {f"{name}_{k}": v for name, m in rows for k, v in m.items()}
    (workdir / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True))

    header = f"| {'model':<20} | {'parameters':>10} | {'test accuracy':>13} | " \
             f"{'train time (s)':>14} | {'steps/s':>8} | {'MFLOP/step':>10} | " \
             f"{'step (ms)':>9} | {'energy (Wh)':>11} |"
    print("\n" + header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, m in rows:
        # cost_* keys: one training step (experiments/train.py, nnlib.compress.cost_report);
        # the energy is an estimate for the whole run (assumptions in metrics.json).
        flops = m.get("cost_flops_per_step", float("nan")) / 1e6
        step_ms = m.get("cost_step_time_s", float("nan")) * 1e3
        energy_wh = m.get("cost_energy_kwh", float("nan")) * 1e3
        print(f"| {name:<20} | {m['num_params']:>10,} | {m['test_accuracy']:>13.4f} | "
              f"{m['train_time_s']:>14.1f} | {m.get('steps_per_s', 0):>8.1f} | "
              f"{flops:>10.3f} | {step_ms:>9.3f} | {energy_wh:>11.3g} |")
    if rows and "cost_energy_kwh" in rows[0][1]:
        m = rows[0][1]
        print(f"MFLOP/step: XLA's count for one training step, a scan/while loop body once "
              f"(the step's math: traced without nnlib's native CPU kernels, whose calls "
              f"XLA cannot count)."
              f"\nenergy: an estimate for the whole run "
              f"({m['cost_device_power_w']:g} W x utilization {m['cost_utilization']:g} x PUE "
              f"{m['cost_pue']:g} on {m['cost_device']}).")
    print(f"\nlearning curves: {plot}\nmetrics: {workdir / 'metrics.json'}\n"
          f"per-run outputs: {workdir}/<config>/")


if __name__ == "__main__":
    main()
