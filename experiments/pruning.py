"""Pruning the digits MLP and CNN: test accuracy against sparsity, and the bytes saved.

    python experiments/pruning.py --workdir=runs/pruning [--quick]

For each model and each target sparsity, a model is trained from scratch
while Zhu & Gupta's gradual schedule (``nnlib.compress.polynomial_sparsity``)
raises its sparsity from 0 to the target between 5% and 40% of training
(35 mask updates, about one per epoch for the MLP), by one of three masks:

- ``layer``: magnitude pruning, the same fraction of every kernel;
- ``global``: magnitude pruning ranked across all kernels;
- ``channel``: structured — whole neurons / conv filters of smallest L1 norm
  (the output layer excluded), the target being the fraction of channels.

``oneshot`` prunes the trained dense model by global magnitude with no
retraining, for contrast. Every run is one compiled program
(``nnlib.search.make_trainer``); the target sparsity and the method are
traced arguments, so each model compiles once. Accuracies are means over
``--seeds`` seeds (359 test images: one image is 0.28%).

Storage is counted for the first seed's weights in three sparse formats
(``nnlib.compress.storage_bytes``: COO, CSR, bitmask + values, with the
smallest unsigned index type that fits) against dense float32. XLA's FLOPs
are those of the *dense* matmuls: unstructured zeros save bytes, not time,
unless a sparse kernel runs them.

Writes ``metrics.json``, ``results.md`` and ``pruning.png`` into the workdir.
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
    apply_masks,
    channel_masks,
    cost_report,
    format_cost,
    magnitude_masks,
    polynomial_sparsity,
    prune,
    sparsity,
    storage_bytes,
)
from nnlib.data import load_digits  # noqa: E402
from nnlib.metrics import accuracy  # noqa: E402
from nnlib.models import CNN, MLPClassifier  # noqa: E402
from nnlib.search import make_trainer  # noqa: E402
from nnlib.train import TrainState, make_optimizer, make_schedule, make_train_step  # noqa: E402

METHODS = ("layer", "global", "channel")


def _not_output(path: str, leaf: Any) -> bool:
    return leaf.ndim >= 2 and "output" not in path


# Each method is a branch of one lax.switch, so the method is a traced value.
MASK_FNS = (
    lambda p, s: magnitude_masks(p, s, scope="layer"),
    lambda p, s: magnitude_masks(p, s, scope="global"),
    lambda p, s: channel_masks(p, s, prunable=_not_output),
)


def model_configs(quick: bool = False) -> dict[str, dict[str, Any]]:
    """The digits MLP and CNN of ``experiments/configs/digits_{mlp,cnn}.py``
    (``quick``: tiny widths, two epochs)."""
    if quick:
        return {"mlp": {"model": MLPClassifier(hidden_sizes=(32,)), "epochs": 2},
                "cnn": {"model": CNN(features=(4,), hidden_sizes=(16,)), "epochs": 2}}
    return {
        "mlp": {"model": MLPClassifier(hidden_sizes=(256, 256), dropout_rate=0.2), "epochs": 100},
        "cnn": {"model": CNN(features=(32, 64), hidden_sizes=(128,), dropout_rate=0.3),
                "epochs": 40},
    }


def make_pruning_tx(methods: Sequence[str] = METHODS, *, learning_rate: float = 2e-3,
                    warmup_steps: int = 50, weight_decay: float = 1e-4, begin: float = 0.05,
                    end: float = 0.4, num_updates: int = 35):
    """``(hyper=(target sparsity, index into methods), total_steps) -> tx``: AdamW with
    warm-up + cosine, then ``prune`` on the polynomial schedule, whose
    ``num_updates`` mask updates run evenly from ``begin`` to ``end`` (fractions
    of training), the last one reaching the target."""

    branches = [MASK_FNS[METHODS.index(m)] for m in methods]

    def make_tx(hyper, total_steps: int) -> optax.GradientTransformation:
        target, method = hyper
        begin_step = int(begin * total_steps)
        span = max(int(end * total_steps) - begin_step, 1)
        updates = min(num_updates, span)
        every = span // updates
        end_step = begin_step + every * updates  # a pruning step, at the target sparsity
        lr = make_schedule(learning_rate, "warmup_cosine", total_steps=total_steps,
                           warmup_steps=min(warmup_steps, total_steps - 1))
        schedule = polynomial_sparsity(target, begin_step, end_step, frequency=every)
        return optax.chain(
            make_optimizer("adamw", lr, weight_decay=weight_decay),
            prune(schedule, mask_fn=lambda p, s: jax.lax.switch(method, branches, p, s),
                  update_every=every, begin_step=begin_step, end_step=end_step))

    return make_tx


def run(
    workdir: str | Path,
    *,
    models: Sequence[str] = ("mlp", "cnn"),
    sparsities: Sequence[float] = (0.5, 0.8, 0.9, 0.95, 0.98),
    methods: Sequence[str] = METHODS,
    num_seeds: int = 2,
    batch_size: int = 64,
    quick: bool = False,
    cost_repeats: int = 20,
) -> dict[str, Any]:
    """Runs the experiment; writes the files; returns the metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = load_digits()
    train = {k: jnp.asarray(v) for k, v in data.train.items()}
    test = {k: jnp.asarray(v) for k, v in data.test.items()}
    configs = model_configs(quick)
    metrics: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    start = time.perf_counter()
    for name in models:
        model, epochs = configs[name]["model"], configs[name]["epochs"]
        trainer = jax.jit(make_trainer(model, make_pruning_tx(methods), num_epochs=epochs,
                                       batch_size=batch_size))

        def fit(target: float, method: str, seed: int, trainer=trainer):
            hyper = (jnp.float32(target), jnp.int32(methods.index(method)))
            variables, m = trainer(jax.random.key(seed), hyper, train, test)
            return variables, float(m["accuracy"])

        # sparsity 0 prunes nothing, whatever the method
        dense = [fit(0.0, methods[0], seed) for seed in range(num_seeds)]
        dense_params = dense[0][0]["params"]
        dense_acc = float(np.mean([a for _, a in dense]))
        dense_bytes = storage_bytes(dense_params)["dense"]
        metrics[f"{name}_dense_test_accuracy"] = dense_acc
        metrics[f"{name}_dense_bytes"] = dense_bytes
        rows.append({"model": name, "method": "dense", "target": 0.0, "sparsity": 0.0,
                     "acc": dense_acc, "csr": dense_bytes, "bitmask": dense_bytes,
                     "dense": dense_bytes})
        curves[name] = {"oneshot": [], **{m: [] for m in methods}}

        @jax.jit
        def oneshot(params, target, x, model=model):
            pruned = apply_masks(params, magnitude_masks(params, target, scope="global"))
            return model.apply({"params": pruned}, x)

        for target in sparsities:  # one-shot: prune each seed's trained model, no retraining
            acc = float(np.mean([accuracy(oneshot(v["params"], jnp.float32(target),
                                                  test["inputs"]), test["labels"])
                                 for v, _ in dense]))
            curves[name]["oneshot"].append((target, acc))
            metrics[f"{name}_oneshot_s{round(100 * target)}_test_accuracy"] = acc

        for method in methods:
            for target in sparsities:
                runs = [fit(target, method, seed) for seed in range(num_seeds)]
                acc = float(np.mean([a for _, a in runs]))
                params = runs[0][0]["params"]
                measured = sparsity(params)
                sizes = storage_bytes(params)
                key = f"{name}_{method}_s{round(100 * target)}"
                metrics |= {f"{key}_test_accuracy": acc,
                            f"{key}_test_accuracy_seeds": [a for _, a in runs],
                            f"{key}_sparsity": measured, f"{key}_csr_bytes": sizes["csr"],
                            f"{key}_coo_bytes": sizes["coo"],
                            f"{key}_bitmask_bytes": sizes["bitmask"]}
                curves[name][method].append((measured, acc))
                rows.append({"model": name, "method": method, "target": target,
                             "sparsity": measured, "acc": acc, "csr": sizes["csr"],
                             "bitmask": sizes["bitmask"], "dense": sizes["dense"]})
                print(f"{name} {method:8s} target {target:.2f}: sparsity {measured:.3f}, "
                      f"test accuracy {acc:.4f}, CSR {sizes['csr']:,} B of "
                      f"{sizes['dense']:,} B dense", flush=True)

        # The cost of one dense training step (unstructured zeros do not change it).
        state = TrainState.create(model=model, tx=optax.adamw(1e-3), key=jax.random.key(0),
                                  example_input=train["inputs"][:1])
        batch = {"inputs": train["inputs"][:batch_size], "labels": train["labels"][:batch_size]}
        steps = epochs * (len(train["labels"]) // batch_size)
        report = cost_report(make_train_step(), state, batch, num_steps=steps,
                             repeats=cost_repeats)
        print(f"{name}, one training step:\n{format_cost(report)}", flush=True)
        metrics |= {f"{name}_{k}": v for k, v in report.items()}

    metrics["wall_time_s"] = time.perf_counter() - start
    table = results_table(rows)
    (workdir / "results.md").write_text(table + "\n")
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    plot(curves, {m: metrics[f"{m}_dense_test_accuracy"] for m in models},
         workdir / "pruning.png")
    print(table, flush=True)
    print(f"wrote {workdir / 'metrics.json'}, {workdir / 'results.md'}, "
          f"{workdir / 'pruning.png'}", flush=True)
    return metrics


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: model, method, target, measured sparsity, accuracy, bytes."""
    lines = ["| model | method | target | sparsity | test acc | CSR bytes | bitmask bytes "
             "| dense bytes | dense / best sparse |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        best = min(r["csr"], r["bitmask"], r["dense"])
        lines.append(f"| {r['model']} | {r['method']} | {r['target']:.2f} | {r['sparsity']:.3f} "
                     f"| {r['acc']:.4f} | {r['csr']:,} | {r['bitmask']:,} | {r['dense']:,} "
                     f"| {r['dense'] / best:.2f}x |")
    return "\n".join(lines)


def plot(curves: dict[str, dict[str, list[tuple[float, float]]]],
         dense: dict[str, float], path: Path) -> None:
    """Test accuracy against sparsity, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (name, by_method) in zip(axes[0], curves.items(), strict=True):
        for method, points in by_method.items():
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, "o-" if method != "oneshot" else "x--", label=method)
        ax.axhline(dense[name], color="gray", ls=":", label="dense")
        if name == "mlp":
            ax.axhline(0.97, color="red", lw=0.8, ls="--", label="97%")
        ax.set(title=f"digits {name.upper()}", xlabel="sparsity of the kernels",
               ylabel="test accuracy", ylim=(max(0.0, min(0.8, dense[name] - 0.2)), 1.0))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/pruning")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny models, two epochs")
    args = parser.parse_args()
    run(args.workdir, num_seeds=args.seeds, quick=args.quick)


if __name__ == "__main__":
    main()
