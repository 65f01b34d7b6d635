"""Overfitting on purpose, then what each regulariser does to the train/validation gap.

    python experiments/overfitting.py --workdir=runs/overfitting

The setup makes overfitting easy: a few training digits (default 100, ten of
each class, drawn by seed from the train split of ``nnlib.data.load_digits``)
and a big MLP (two hidden layers of 256: ~85k parameters, ~850 per training
example). Within a few hundred steps it fits every training digit while a
tenth of the validation digits stay wrong: it has memorised the training
set rather than learnt what makes a digit.
Each regime below changes one thing about that baseline, with everything else
(data, model, optimizer, steps, seeds) equal:

* ``dropout``: ``MLPClassifier(dropout_rate=...)`` zeroes hidden units at
  random in training (Srivastava et al. 2014), so no unit can rely on another.
* ``weight_decay``: AdamW's decoupled decay of the weight matrices (Loshchilov
  & Hutter 2019) pulls the weights towards zero, a smaller function class.
* ``early_stopping``: ``nnlib.train.fit(early_stopping_patience=...)`` stops
  when the validation loss has not improved for that many evaluations, and the
  best checkpoint (by validation loss) is restored.
* ``augmentation``: every step trains on freshly transformed copies
  (``nnlib.data.augment.augment`` inside the jitted train step; by default
  rotations of up to ±10°, see :func:`default_regimes` for why not shifts),
  which teaches an invariance the 100 digits alone cannot.
* ``label_smoothing``: cross-entropy against ``(1 - eps) * one_hot + eps / K``
  (Szegedy et al. 2016), so the logits cannot grow without bound to make the
  training loss zero.
* ``all_combined``: all of the above at once.

Measured per regime (mean ± std over seeds; each seed draws its own training
subset and initialisation): accuracy on the (un-augmented) training digits,
on the validation split, their gap, on the test split, and the validation
loss. Validation losses are plain cross-entropy in every regime (no
smoothing), so they and the curves are comparable. Loss and accuracy measure
different things: label smoothing, for one, caps the model's confidence on
purpose, which cross-entropy charges for even when the answers are right.

The compute cost of one real training step of the baseline (the main model;
the other regimes add a dropout mask, a weight-decay term or the augmentation
to the same matmuls) is measured with ``nnlib.compress.cost_report`` and
printed: ``cost_*`` keys (XLA's FLOPs and bytes, memory, median step time,
the energy of one training run).

Writes ``metrics.json`` (flat keys ``<regime>_<metric>``,
``<regime>_<metric>_std`` and ``cost_*``), ``results.md`` (the table) and ``overfitting.png``
(validation-loss curves and accuracy bars) into ``--workdir``, and prints the
table. A few minutes on a 2-core CPU with the defaults; ``run`` is importable
(the notebook and the smoke test call it small).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nnlib.compress import cost_report, format_cost  # noqa: E402
from nnlib.data import batch_iterator, load_digits  # noqa: E402
from nnlib.data.augment import augment  # noqa: E402
from nnlib.data.tabular import SPLITS  # noqa: E402
from nnlib.models import MLPClassifier  # noqa: E402
from nnlib.train import (  # noqa: E402
    Checkpointer,
    TrainState,
    average_metrics,
    classification_loss,
    fit,
    make_eval_step,
    make_optimizer,
    make_train_step,
    num_params,
)

# fold_in constant naming the augmentation's key stream: the train step's own
# streams (dropout) are fold_in(step_key, 0, 1, ...), so this never collides.
_AUGMENT_STREAM = 0x41554745


@dataclasses.dataclass(frozen=True)
class Regime:
    """One training recipe: the baseline plus the regularisers switched on."""

    name: str
    dropout_rate: float = 0.0
    weight_decay: float = 0.0
    early_stopping_patience: int | None = None
    max_shift: int = 0
    max_degrees: float = 0.0
    max_scale: float = 0.0
    label_smoothing: float = 0.0

    @property
    def augments(self) -> bool:
        return bool(self.max_shift or self.max_degrees or self.max_scale)


def default_regimes(
    *,
    dropout_rate: float = 0.3,
    weight_decay: float = 1.0,
    early_stopping_patience: int = 5,
    max_shift: int = 0,
    max_degrees: float = 10.0,
    max_scale: float = 0.0,
    label_smoothing: float = 0.1,
) -> list[Regime]:
    """The baseline, each regulariser alone, and all of them together.

    The defaults are moderate strengths. Augmentation defaults to rotations
    only: scikit-learn's digits are already centred and size-normalised, so
    on 8x8 pixels a one-pixel shift (1/8 of the image) or a 10% zoom moves
    the training digits *away* from the validation digits, and in our runs
    both lowered validation accuracy. AdamW's decay is ``lr * weight_decay``
    per step, so with ``lr = 1e-3`` a conventional 0.01 does nothing in a
    thousand steps; 1.0 shrinks the weights by ``e^-1`` over them.
    """
    aug = dict(max_shift=max_shift, max_degrees=max_degrees, max_scale=max_scale)
    return [
        Regime("baseline"),
        Regime("dropout", dropout_rate=dropout_rate),
        Regime("weight_decay", weight_decay=weight_decay),
        Regime("early_stopping", early_stopping_patience=early_stopping_patience),
        Regime("augmentation", **aug),
        Regime("label_smoothing", label_smoothing=label_smoothing),
        Regime("all_combined", dropout_rate=dropout_rate, weight_decay=weight_decay,
               early_stopping_patience=early_stopping_patience, label_smoothing=label_smoothing,
               **aug),
    ]


def few_digits(num_train: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """``num_train // 10`` training images of each digit (drawn by ``seed`` from
    ``load_digits``' train split) and the full validation and test splits.

    Returns ``{"train", "val", "test"}``, each ``{"inputs": float32 [n, 8, 8, 1],
    "labels": int32 [n]}``.
    """
    if num_train < 10 or num_train % 10:
        raise ValueError(f"few_digits expected num_train to be a multiple of 10 (the same "
                         f"number of each digit) >= 10, got {num_train}")
    digits = load_digits()
    labels = digits.train["labels"]
    rng = np.random.default_rng(seed)
    picked = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(labels == c), num_train // 10, replace=False)
        for c in range(10)]))
    train = {k: v[picked] for k, v in digits.train.items()}
    return {"train": train, "val": digits.val, "test": digits.test}


def make_augmented_train_step(regime: Regime, loss_fn):
    """The standard train step on augmented inputs: a fresh transform per example
    and per step, from ``fold_in(fold_in(state.rng, state.step), _AUGMENT_STREAM)``
    (so a resumed run draws the same transforms)."""
    step = make_train_step(loss_fn)

    def augmented_step(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), _AUGMENT_STREAM)
        inputs = augment(key, batch["inputs"], max_shift=regime.max_shift,
                         max_degrees=regime.max_degrees, max_scale=regime.max_scale)
        return step(state, {**batch, "inputs": inputs})

    return augmented_step


# jit caches compiled programs by function and by the static fields of the
# state (the model's apply, the optimizer), so building each once and sharing
# it across seeds and regimes saves most of the compiles.


@functools.cache
def _model(hidden_sizes: tuple[int, ...], dropout_rate: float) -> MLPClassifier:
    return MLPClassifier(hidden_sizes=hidden_sizes, num_classes=10, dropout_rate=dropout_rate)


@functools.cache
def _optimizer(learning_rate: float, weight_decay: float):
    return make_optimizer("adamw", learning_rate, weight_decay=weight_decay)


@functools.cache
def _train_step(label_smoothing: float, max_shift: int, max_degrees: float, max_scale: float):
    regime = Regime("", max_shift=max_shift, max_degrees=max_degrees, max_scale=max_scale)
    loss_fn = classification_loss(label_smoothing)
    step = (make_augmented_train_step(regime, loss_fn) if regime.augments
            else make_train_step(loss_fn))
    return jax.jit(step, donate_argnums=0)


# Validation loss without smoothing in every regime: comparable across them,
# and what early stopping watches.
_eval_step = jax.jit(make_eval_step(classification_loss()))


def _evaluate(state: TrainState, split: dict[str, np.ndarray], batch_size: int) -> dict:
    """Metrics over a whole split, in the same padded batches as ``fit`` (one shape:
    one compile)."""
    batches = batch_iterator(split, batch_size, shuffle=False)
    return average_metrics([jax.device_get(_eval_step(state, b)) for b in batches])


def train_regime(
    regime: Regime,
    data: dict[str, dict[str, np.ndarray]],
    *,
    seed: int = 0,
    hidden_sizes: Sequence[int] = (256, 256),
    num_steps: int = 800,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    eval_every: int = 50,
) -> dict[str, Any]:
    """Trains one regime on ``data`` (from :func:`few_digits`); returns its
    ``train_accuracy``, ``val_accuracy``, ``gap``, ``test_accuracy``,
    ``val_loss`` (cross-entropy), ``steps`` (taken), ``best_step`` (of the
    weights kept), ``num_params``, ``curve`` (``[(step, val_loss,
    val_accuracy)]``) and the trained ``state``."""
    state = TrainState.create(model=_model(tuple(hidden_sizes), regime.dropout_rate),
                              tx=_optimizer(learning_rate, regime.weight_decay),
                              key=jax.random.key(seed), example_input=data["train"]["inputs"][:1])
    train_step = _train_step(regime.label_smoothing, regime.max_shift, regime.max_degrees,
                             regime.max_scale)
    common = dict(batch_size=batch_size, train_step=train_step,
                  eval_step=_eval_step, eval_data=data["val"], num_steps=num_steps,
                  eval_every=eval_every, seed=seed, show_progress=False, plot=False,
                  tensorboard=False)
    if regime.early_stopping_patience is None:
        state, summary = fit(state, data["train"], **common)
    else:
        # Early stopping returns the best weights seen, not the last ones: keep
        # the best checkpoint (by val_loss) in a scratch directory and restore it.
        with tempfile.TemporaryDirectory() as scratch:
            template = jax.tree.map(jnp.copy, state)  # fit donates (deletes) its input
            state, summary = fit(state, data["train"], workdir=scratch,
                                 checkpoint_every=num_steps, keep=1,
                                 early_stopping_patience=regime.early_stopping_patience,
                                 **common)
            with Checkpointer(Path(scratch) / "checkpoints", keep=1,
                              best_metric="val_loss") as checkpoints:
                state, _ = checkpoints.restore(checkpoints.best_step(), template)
    final = {split: _evaluate(state, data[split], batch_size) for split in SPLITS}
    accuracy = {split: float(m["accuracy"]) for split, m in final.items()}
    curve = [(r["step"], r["loss"], r["accuracy"]) for r in summary["history"]
             if r["split"] == "val"]
    return {"train_accuracy": accuracy["train"], "val_accuracy": accuracy["val"],
            "gap": accuracy["train"] - accuracy["val"], "test_accuracy": accuracy["test"],
            "val_loss": float(final["val"]["loss"]),
            "steps": int(summary["step"]), "best_step": int(state.step),
            "num_params": num_params(state.params), "curve": curve, "state": state}


METRICS = ("train_accuracy", "val_accuracy", "gap", "test_accuracy", "val_loss")


def training_cost(
    regime: Regime,
    state: TrainState,
    train: dict[str, np.ndarray],
    *,
    num_steps: int,
    batch_size: int = 32,
    seed: int = 0,
    repeats: int = 5,
) -> dict[str, Any]:
    """``nnlib.compress.cost_report`` of one training step of ``regime`` as
    :func:`train_regime` runs it: its (jitted) step, on the first batch
    ``fit`` draws from ``train`` (padded to ``batch_size`` when the split is
    smaller), from ``state``; the energy is extrapolated to ``num_steps``."""
    step = _train_step(regime.label_smoothing, regime.max_shift, regime.max_degrees,
                       regime.max_scale)
    batch = next(iter(batch_iterator(train, batch_size, seed=seed)))
    return cost_report(step, state, batch, num_steps=num_steps, repeats=repeats, warmup=1)


def run(
    workdir: str | Path,
    *,
    num_train: int = 100,
    seeds: Sequence[int] = (0, 1, 2),
    regimes: Sequence[Regime] | None = None,
    verbose: bool = True,
    cost_repeats: int = 5,
    **train_kwargs: Any,
) -> dict[str, Any]:
    """Trains every regime on every seed; writes ``metrics.json``, ``results.md``
    and ``overfitting.png`` into ``workdir``. ``train_kwargs`` go to
    :func:`train_regime`. ``cost_repeats``: timed calls of the compute-cost
    report of one training step of the main model (the ``baseline`` regime,
    else the first; :func:`training_cost`; ``cost_*`` keys, printed when
    ``verbose``); 0 skips it. Returns ``{"metrics", "table", "runs"}`` where
    ``runs[regime]`` is the list of per-seed results."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    regimes = list(regimes or default_regimes())
    start = time.perf_counter()
    datasets = {seed: few_digits(num_train, seed) for seed in seeds}
    runs: dict[str, list[dict[str, Any]]] = {}
    for regime in regimes:
        runs[regime.name] = [train_regime(regime, datasets[s], seed=s, **train_kwargs)
                             for s in seeds]
        if verbose:
            m = {k: np.mean([r[k] for r in runs[regime.name]]) for k in METRICS}
            print(f"{regime.name:>16}: train {m['train_accuracy']:.3f}  val "
                  f"{m['val_accuracy']:.3f}  gap {m['gap']:+.3f}  test {m['test_accuracy']:.3f}",
                  flush=True)

    first = next(iter(runs.values()))[0]
    metrics: dict[str, Any] = {"num_train": num_train, "num_seeds": len(seeds),
                               "num_params": first["num_params"]}
    for name, per_seed in runs.items():
        for key in (*METRICS, "steps"):
            values = np.array([r[key] for r in per_seed], float)
            metrics[f"{name}_{key}"] = float(values.mean())
            if key != "steps":
                metrics[f"{name}_{key}_std"] = float(values.std())
    metrics["train_time_s"] = round(time.perf_counter() - start, 1)

    if cost_repeats > 0:
        main_regime = next((r for r in regimes if r.name == "baseline"), regimes[0])
        trained = runs[main_regime.name][0]
        batch_size = train_kwargs.get("batch_size", 32)
        report = training_cost(main_regime, trained["state"], datasets[seeds[0]]["train"],
                               num_steps=trained["steps"], batch_size=batch_size,
                               seed=seeds[0], repeats=cost_repeats)
        if verbose:
            print(f"\n{main_regime.name} regime, one training step of batch {batch_size} (energy: "
                  f"{trained['steps']} steps, one run):\n{format_cost(report)}", flush=True)
        metrics |= report

    table = format_table(metrics, [r.name for r in regimes], num_train, len(seeds))
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (workdir / "results.md").write_text(table + "\n")
    plot(runs, workdir / "overfitting.png", title=(
        f"{num_train} training digits, MLP with {first['num_params']:,} parameters"))
    if verbose:
        print("\n" + table)
    return {"metrics": metrics, "table": table, "runs": runs}


def format_table(metrics: dict[str, Any], names: Sequence[str], num_train: int,
                 num_seeds: int) -> str:
    """A markdown table: one row per regime, mean ± std over seeds."""
    lines = [
        f"Overfitting {num_train} digits (mean ± std over {num_seeds} seeds; "
        f"gap = train − val accuracy)",
        "",
        "| regime | train acc | val acc | gap | test acc | val loss | steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        cells = [f"{metrics[f'{name}_{k}']:.3f} ± {metrics[f'{name}_{k}_std']:.3f}"
                 for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {metrics[f'{name}_steps']:.0f} |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict[str, Any]]], path: str | Path, *, title: str = "") -> None:
    """Left: validation loss against step (mean over seeds; early-stopped runs
    end early). Right: train / val / test accuracy per regime."""
    # A bare Figure, not pyplot: no backend switch, so a notebook's inline
    # plotting keeps working after this is called.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.2))
    left, right = fig.subplots(1, 2)
    for name, per_seed in runs.items():
        length = min(len(r["curve"]) for r in per_seed)
        steps = [c[0] for c in per_seed[0]["curve"][:length]]
        loss = np.mean([[c[1] for c in r["curve"][:length]] for r in per_seed], axis=0)
        left.plot(steps, loss, label=name, lw=2.2 if name == "baseline" else 1.4)
    left.set(xlabel="step", ylabel="validation loss (cross-entropy)",
             title="validation loss during training (mean over seeds)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    names = list(runs)
    x = np.arange(len(names))
    for i, (key, label) in enumerate((("train_accuracy", "train"), ("val_accuracy", "val"),
                                      ("test_accuracy", "test"))):
        means = [np.mean([r[key] for r in runs[n]]) for n in names]
        stds = [np.std([r[key] for r in runs[n]]) for n in names]
        right.bar(x + (i - 1) * 0.27, means, 0.27, yerr=stds, label=label, capsize=2)
    right.set_xticks(x, names, rotation=30, ha="right")
    lows = [np.mean([r["val_accuracy"] for r in runs[n]]) for n in names]
    right.set(ylim=(max(0.0, min(lows) - 0.1), 1.005), ylabel="accuracy",
              title="accuracy per regime (error bars: std over seeds)")
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "overfitting"))
    parser.add_argument("--num-train", type=int, default=100,
                        help="training digits (a multiple of 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    args = parser.parse_args(argv)
    return run(args.workdir, num_train=args.num_train, seeds=args.seeds,
               num_steps=args.steps, hidden_sizes=args.hidden)


if __name__ == "__main__":
    main()
