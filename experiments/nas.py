"""Architecture search on the 8x8 digits: the Pareto front of accuracy against FLOPs.

    python experiments/nas.py --workdir=runs/nas [--budget=16] [--quick]

Search space (``nnlib.search.SearchSpace``): MLPs of 1-3 hidden layers of
16-256 units and CNNs of 1-2 conv blocks of 8-32 channels with 3x3 or 5x5
kernels, each with relu, tanh, gelu or silu — 108 architectures. Two searches
with the same budget of trained candidates: random search, and regularized
evolution (population 8, tournament 3, aging). Every candidate trains for
``--epochs`` epochs (a proxy of full training), 2 seeds at once; fitness is
the mean validation accuracy (180 images), and the test accuracy (359
images) is reported for the front. FLOPs are XLA's count for one image
through the real nnlib model (``nnlib.compress.flops``).

Training is cheap because compiling is shared: every MLP trains in one
compiled program and every CNN of a depth in another (``MaskedMLP``,
``MaskedCNN``: widths masked, depth skipped, kernels tap-masked, activation
switched), and seeds run under ``vmap`` (MLP) or ``lax.map`` (CNN; see
``nnlib.search.nas``).

Writes ``metrics.json``, ``results.md``, ``candidates.json`` and
``pareto.png`` into the workdir.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nnlib.compress import cost_report, format_cost  # noqa: E402
from nnlib.data import load_digits  # noqa: E402
from nnlib.search import (  # noqa: E402
    Candidate,
    SearchSpace,
    make_evaluator,
    pareto_front,
    random_search,
    regularized_evolution,
)
from nnlib.train import TrainState, make_optimizer, make_schedule, make_train_step  # noqa: E402


def make_tx(hyper, total_steps: int) -> optax.GradientTransformation:
    """AdamW 2e-3 with a short warm-up and cosine decay (the digits configs')."""
    del hyper
    schedule = make_schedule(2e-3, "warmup_cosine", total_steps=total_steps,
                             warmup_steps=min(20, total_steps - 1))
    return make_optimizer("adamw", schedule, weight_decay=1e-4)


def quick_space() -> SearchSpace:
    """A tiny space for smoke runs: a few MLPs and one CNN shape."""
    return SearchSpace(depths={"mlp": (1, 2), "cnn": (1,)}, widths={"mlp": (8, 16),
                       "cnn": (4,)}, activations=("relu", "tanh"), kernel_sizes=(3,))


def run(
    workdir: str | Path,
    *,
    budget: int = 16,
    population_size: int = 8,
    sample_size: int = 3,
    num_epochs: int = 10,
    num_seeds: int = 2,
    batch_size: int = 64,
    seed: int = 0,
    space: SearchSpace | None = None,
    cost_repeats: int = 20,
) -> dict[str, Any]:
    """Runs both searches; writes the files; returns the metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    space = space or SearchSpace()
    data = load_digits()
    train, val, test = ({k: jnp.asarray(v) for k, v in split.items()}
                        for split in (data.train, data.val, data.test))
    evaluate = make_evaluator(space, train, val, make_tx=make_tx, num_epochs=num_epochs,
                              batch_size=batch_size, num_seeds=num_seeds, seed=seed,
                              test_data=test)
    start = time.perf_counter()

    def log(name):
        def callback(c: Candidate) -> None:
            print(f"[{name} {c.index + 1:2d}/{budget}] {str(c.architecture):24s} "
                  f"val {c.accuracy:.4f}  FLOPs {c.cost:10,.0f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        return callback

    searches = {
        "random": random_search(space, evaluate, budget=budget, seed=seed,
                                callback=log("random")),
        "evolution": regularized_evolution(space, evaluate, budget=budget,
                                           population_size=min(population_size, budget),
                                           sample_size=min(sample_size, population_size, budget),
                                           seed=seed + 1, callback=log("evolution")),
    }
    search_time = time.perf_counter() - start
    everyone = [(name, c) for name, history in searches.items() for c in history]
    # An architecture both searches (or one search twice) trained sits on the
    # front once; "found by" lists every time it was drawn.
    front: list[tuple[str, Candidate]] = []
    for i in pareto_front([c.accuracy for _, c in everyone], [c.cost for _, c in everyone]):
        name, c = everyone[i]
        seen = [k for k, (_, d) in enumerate(front) if d.architecture == c.architecture]
        if seen:
            first_name, first = front[seen[0]]
            front[seen[0]] = (f"{first_name}, {name} #{c.index}", first)
        else:
            front.append((f"{name} #{c.index}", c))

    metrics: dict[str, Any] = {
        "search_time_s": search_time, "budget_per_search": budget,
        "num_epochs_per_candidate": num_epochs, "num_seeds": num_seeds,
        "space_size": len(space.architectures()),
        "distinct_architectures_trained": len({c.architecture for _, c in everyone}),
        "pareto_size": len(front),
    }
    for name, history in searches.items():
        best = max(history, key=lambda c: c.accuracy)
        own = pareto_front([c.accuracy for c in history], [c.cost for c in history])
        metrics |= {f"{name}_best_val_accuracy": best.accuracy,
                    f"{name}_best_test_accuracy": best.metrics["test_accuracy"],
                    f"{name}_best_architecture": str(best.architecture),
                    f"{name}_best_flops": best.cost, f"{name}_pareto_size": len(own),
                    f"{name}_mean_val_accuracy": float(np.mean([c.accuracy for c in history]))}

    # The cost of one training step of the most accurate architecture found.
    best_name, best = max(everyone, key=lambda nc: (nc[1].accuracy, -nc[1].cost))
    model = space.build(best.architecture, 10)
    state = TrainState.create(model=model, tx=optax.adamw(1e-3), key=jax.random.key(seed),
                              example_input=train["inputs"][:1])
    batch = {"inputs": train["inputs"][:batch_size], "labels": train["labels"][:batch_size]}
    report = cost_report(make_train_step(), state, batch,
                         num_steps=num_epochs * (len(train["labels"]) // batch_size),
                         repeats=cost_repeats)
    print(f"best architecture {best.architecture} (found by {best_name}), one training step:\n"
          f"{format_cost(report)}", flush=True)
    metrics |= {f"best_{k}": v for k, v in report.items()}
    metrics["wall_time_s"] = time.perf_counter() - start

    table = results_table(front)
    summary = summary_table(metrics)
    (workdir / "results.md").write_text(summary + "\n\nPareto front (all candidates of both "
                                        "searches, validation accuracy vs FLOPs):\n\n"
                                        + table + "\n")
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (workdir / "candidates.json").write_text(json.dumps(
        [{"search": n, "index": c.index, "architecture": str(c.architecture),
          "val_accuracy": c.accuracy, "flops": c.cost, **c.metrics} for n, c in everyone],
        indent=1))
    plot(searches, front, workdir / "pareto.png")
    print(summary + "\n\n" + table, flush=True)
    print(f"wrote {workdir / 'metrics.json'}, {workdir / 'results.md'}, "
          f"{workdir / 'candidates.json'}, {workdir / 'pareto.png'}", flush=True)
    return metrics


def summary_table(metrics: dict[str, Any]) -> str:
    lines = ["| search | candidates | best val acc | its test acc | its FLOPs | best architecture "
             "| mean val acc | own front |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for name in ("random", "evolution"):
        m = {k[len(name) + 1:]: v for k, v in metrics.items() if k.startswith(name + "_")}
        lines.append(f"| {name} | {metrics['budget_per_search']} | {m['best_val_accuracy']:.4f} "
                     f"| {m['best_test_accuracy']:.4f} | {m['best_flops']:,.0f} "
                     f"| {m['best_architecture']} | {m['mean_val_accuracy']:.4f} "
                     f"| {m['pareto_size']} |")
    return "\n".join(lines)


def results_table(front: list[tuple[str, Candidate]]) -> str:
    lines = ["| architecture | FLOPs / image | parameters | val acc (mean of seeds) | test acc "
             "| found by |", "|---|---:|---:|---:|---:|---|"]
    for name, c in front:
        lines.append(f"| {c.architecture} | {c.cost:,.0f} | {c.metrics['num_params']:,} "
                     f"| {c.accuracy:.4f} | {c.metrics['test_accuracy']:.4f} | {name} |")
    return "\n".join(lines)


def plot(searches: dict[str, list[Candidate]], front: list[tuple[str, Candidate]],
         path: Path) -> None:
    """Validation accuracy against FLOPs for every candidate, and the front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (name, history), marker in zip(searches.items(), ("o", "^"), strict=True):
        for family, color in (("mlp", "tab:blue"), ("cnn", "tab:orange")):
            pts = [c for c in history if c.architecture.family == family]
            if pts:
                ax.scatter([c.cost for c in pts], [c.accuracy for c in pts], marker=marker,
                           color=color, alpha=0.6, label=f"{name}, {family}")
    xs, ys = [c.cost for _, c in front], [c.accuracy for _, c in front]
    ax.step(xs, ys, where="post", color="k", lw=1, label="Pareto front")
    for _, c in front:
        ax.annotate(str(c.architecture), (c.cost, c.accuracy), fontsize=6,
                    xytext=(3, -8), textcoords="offset points")
    ax.set(xscale="log", xlabel="FLOPs per image (XLA)", ylabel="validation accuracy",
           title="architecture search on 8x8 digits")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/nas")
    parser.add_argument("--budget", type=int, default=16, help="trained candidates per search")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny space and budget")
    args = parser.parse_args()
    if args.quick:
        run(args.workdir, budget=4, population_size=2, sample_size=2, num_epochs=1,
            num_seeds=1, space=quick_space(), cost_repeats=2)
    else:
        run(args.workdir, budget=args.budget, num_epochs=args.epochs)


if __name__ == "__main__":
    main()
