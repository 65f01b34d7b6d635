"""int8 quantization of the digits MLP and CNN: accuracy, size and CPU speed.

    python experiments/quantization.py --workdir=runs/quantization [--quick]

For each model: train it in float32, then compare

- ``float32``: the trained model;
- ``int8 PTQ (qwix)``: post-training quantization with qwix
  (``nnlib.compress.ptq_model``): int8 weights per output channel, int8
  activations per row (dynamic range), int8 x int8 -> int32 matmuls and
  convolutions;
- ``int8 weights, fake-quant (plain JAX)``: the plain-JAX fallback
  (``fake_quantize_params``), weight-only, computed in float — what int8
  *storage* costs in accuracy, independent of qwix;
- ``QAT -> int8 PTQ (qwix)``: the float model fine-tuned with qwix's fake
  quantization (``qat_model``, straight-through gradients), then converted
  to real int8 with ``ptq_model`` (the same numerics).

Sizes are the bytes of the parameter pytrees (int8 values + a float32 scale
per output channel + float32 biases). Speed is the wall time of the jitted
forward pass on the whole test set (359 images) and on one image: ``--repeats``
calls per variant in 10 rounds in which float32 and int8 take turns (warm-up
excluded), the median of the round medians; it is measured on this CPU
and says whatever it says — XLA's CPU backend may well run int8 slower than
float32 here (no int8 matrix kernels on this machine), and then the table
shows it.

Writes ``metrics.json``, ``results.md`` and ``quantization.png`` into the
workdir.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nnlib.compress import (  # noqa: E402
    cost_report,
    fake_quantize_params,
    format_cost,
    ptq_model,
    qat_model,
    time_fn,
    tree_bytes,
)
from nnlib.data import load_digits  # noqa: E402
from nnlib.models import CNN, MLPClassifier  # noqa: E402
from nnlib.search import make_trainer  # noqa: E402
from nnlib.train import make_optimizer, make_schedule  # noqa: E402


def model_configs(quick: bool = False) -> dict[str, dict[str, Any]]:
    """The digits MLP and CNN of ``experiments/configs/digits_{mlp,cnn}.py``."""
    if quick:
        return {"mlp": {"model": MLPClassifier(hidden_sizes=(32,)), "epochs": 2},
                "cnn": {"model": CNN(features=(4,), hidden_sizes=(16,)), "epochs": 2}}
    return {
        "mlp": {"model": MLPClassifier(hidden_sizes=(256, 256), dropout_rate=0.2), "epochs": 60},
        "cnn": {"model": CNN(features=(32, 64), hidden_sizes=(128,), dropout_rate=0.3),
                "epochs": 80},
    }


def make_tx(learning_rate: float, warmup_steps: int = 50):
    """``(hyper, total_steps) -> AdamW`` with warm-up + cosine (the digits configs')."""

    def tx(hyper, total_steps: int) -> optax.GradientTransformation:
        del hyper
        schedule = make_schedule(learning_rate, "warmup_cosine", total_steps=total_steps,
                                 warmup_steps=min(warmup_steps, total_steps - 1))
        return make_optimizer("adamw", schedule, weight_decay=1e-4)

    return tx


def _predict(apply, params, x) -> np.ndarray:
    return np.asarray(jnp.argmax(apply(params, x), -1))


def interleaved_times(fns: dict[str, tuple[Any, Any]], inputs: dict[str, Any], *,
                      repeats: int, rounds: int = 10) -> dict[str, dict[str, float]]:
    """Milliseconds per call of each ``apply(params, x)``: the median over
    ``rounds`` rounds of the median of ``repeats // rounds`` calls, the
    variants taking turns within each round, so that a busy spell of a shared
    machine slows all of them rather than whichever ran then."""
    per_round = max(1, repeats // rounds)
    samples: dict[str, dict[str, list[float]]] = {k: {m: [] for m in inputs} for k in fns}
    for _ in range(rounds):
        for label, (apply, params) in fns.items():
            for metric, x in inputs.items():
                t = time_fn(apply, params, x, repeats=per_round, warmup=1)["median_s"]
                samples[label][metric].append(1e3 * t)
    return {label: {m: float(np.median(v)) for m, v in by.items()}
            for label, by in samples.items()}


def run(
    workdir: str | Path,
    *,
    models: Sequence[str] = ("mlp", "cnn"),
    qat_epochs: int = 10,
    repeats: int = 50,
    batch_size: int = 64,
    seed: int = 0,
    quick: bool = False,
) -> dict[str, Any]:
    """Runs the experiment; writes the files; returns the metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = load_digits()
    train = {k: jnp.asarray(v) for k, v in data.train.items()}
    test = {k: jnp.asarray(v) for k, v in data.test.items()}
    x_all, x_one, labels = test["inputs"], test["inputs"][:1], np.asarray(test["labels"])
    configs = model_configs(quick)
    metrics: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name in models:
        model, epochs = configs[name]["model"], configs[name]["epochs"]
        key = jax.random.key(seed)
        trainer = jax.jit(make_trainer(model, make_tx(2e-3), num_epochs=epochs,
                                       batch_size=batch_size))
        params = trainer(key, None, train, test)[0]["params"]
        float_apply = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x))
        float_pred = _predict(float_apply, params, x_all)

        qmodel, qparams = ptq_model(model, params, x_all)
        int8_apply = jax.jit(lambda p, x, qmodel=qmodel: qmodel.apply({"params": p}, x))

        qat_trainer = jax.jit(make_trainer(qat_model(model), make_tx(5e-4, warmup_steps=0),
                                           num_epochs=qat_epochs, batch_size=batch_size))
        qat_params = qat_trainer(jax.random.fold_in(key, 1), None, train, test,
                                 init_params=params)[0]["params"]
        _, qat_qparams = ptq_model(model, qat_params, x_all)

        variants = [
            ("float32", float_apply, params, True),
            ("int8 PTQ (qwix)", int8_apply, qparams, True),
            ("int8 weights, fake-quant (plain JAX)", float_apply,
             fake_quantize_params(params), False),
            ("QAT -> int8 PTQ (qwix)", int8_apply, qat_qparams, False),
        ]
        timings = interleaved_times(
            {label: (apply, p) for label, apply, p, timed in variants if timed},
            {"ms_all": x_all, "ms_one": x_one}, repeats=repeats)
        for label, apply, p, timed in variants:
            pred = _predict(apply, p, x_all)
            row = {"model": name, "variant": label, "acc": float(np.mean(pred == labels)),
                   "agree": float(np.mean(pred == float_pred)), "bytes": tree_bytes(p)}
            if label.startswith("int8 weights, fake"):
                row["bytes"] = tree_bytes(qparams)  # what the int8 weights take stored
            if timed:
                row |= timings[label]
            rows.append(row)
            slug = {"float32": "float", "int8 PTQ (qwix)": "int8_ptq",
                    "int8 weights, fake-quant (plain JAX)": "int8_weights_fakequant",
                    "QAT -> int8 PTQ (qwix)": "qat_int8"}[label]
            metrics |= {f"{name}_{slug}_test_accuracy": row["acc"],
                        f"{name}_{slug}_agreement_with_float": row["agree"],
                        f"{name}_{slug}_bytes": row["bytes"]}
            if timed:
                metrics |= {f"{name}_{slug}_ms_test_set": row["ms_all"],
                            f"{name}_{slug}_ms_one_image": row["ms_one"]}
            print(f"{name} {label}: test accuracy {row['acc']:.4f}, {row['bytes']:,} bytes",
                  flush=True)
        # XLA's view of the two forward passes on the test set.
        for slug, apply, p in (("float", float_apply, params), ("int8_ptq", int8_apply, qparams)):
            report = cost_report(apply, p, x_all, repeats=repeats)
            print(f"{name} {slug} forward on {len(labels)} images:\n{format_cost(report)}",
                  flush=True)
            metrics |= {f"{name}_{slug}_{k}": v for k, v in report.items()}

    metrics["wall_time_s"] = time.perf_counter() - start
    table = results_table(rows)
    (workdir / "results.md").write_text(table + "\n")
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    plot(rows, workdir / "quantization.png")
    print(table, flush=True)
    print(f"wrote {workdir / 'metrics.json'}, {workdir / 'results.md'}, "
          f"{workdir / 'quantization.png'}", flush=True)
    return metrics


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: accuracy, agreement with float, bytes, time per forward pass."""
    floats = {r["model"]: r for r in rows if r["variant"] == "float32"}
    lines = ["| model | variant | test acc | same prediction as float | bytes | smaller "
             "| ms / 359 images | ms / 1 image |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = floats[r["model"]]
        timing = (f"{r['ms_all']:.3f} | {r['ms_one']:.3f}" if "ms_all" in r else "- | -")
        lines.append(f"| {r['model']} | {r['variant']} | {r['acc']:.4f} | {r['agree']:.4f} "
                     f"| {r['bytes']:,} | {f['bytes'] / r['bytes']:.2f}x | {timing} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy and forward time, float32 vs int8, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        accs = [next(r["acc"] for r in rows if r["model"] == m and r["variant"] == variant)
                for m in models]
        ax_acc.bar(np.arange(len(models)) + i * width, accs, width, label=variant)
    ax_acc.set(xticks=np.arange(len(models)) + 0.4 - width / 2, xticklabels=models,
               ylabel="test accuracy", ylim=(0.9, 1.0), title="accuracy")
    ax_acc.legend(fontsize=7)
    timed = [v for v in variants if any("ms_all" in r for r in rows if r["variant"] == v)]
    for i, variant in enumerate(timed):
        ms = [next(r["ms_all"] for r in rows if r["model"] == m and r["variant"] == variant)
              for m in models]
        ax_time.bar(np.arange(len(models)) + i * 0.4, ms, 0.4, label=variant)
    ax_time.set(xticks=np.arange(len(models)) + 0.2, xticklabels=models,
                ylabel="ms per forward pass (359 images, median)", title="CPU time")
    ax_time.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/quantization")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="tiny models, two epochs")
    args = parser.parse_args()
    run(args.workdir, repeats=args.repeats, quick=args.quick,
        qat_epochs=2 if args.quick else 10)


if __name__ == "__main__":
    main()
