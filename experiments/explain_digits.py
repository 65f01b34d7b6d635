"""Which pixels made the digits CNN say "7"? Six attribution methods, measured.

    python experiments/explain_digits.py --workdir=runs/explain_digits [--size=tiny]

Trains nnlib's CNN on the 8x8 digits (seconds), then explains its predicted
class on test digits with every method of ``nnlib.explain``: saliency,
gradient x input, integrated gradients, SmoothGrad, Grad-CAM and occlusion.
A heatmap is a claim about the model; three measurements test the claims:

* **Completeness of integrated gradients** (Sundararajan et al. 2017): the
  attributions must sum to ``logit(x) - logit(baseline)``; the run reports the
  relative gap per example (target: within 1%).
* **Faithfulness: deletion and insertion curves** (Petsiuk et al. 2018,
  RISE; Samek et al. 2017). Delete pixels (set them to 0, the black
  background) most-attributed first and track the probability of the
  explained class; a faithful map makes it fall fast, so the area under the
  deletion curve is *small*. Insertion starts from a black image and restores
  the most-attributed pixels first; its area should be *large*. Each method is
  compared with the same curves for random pixel orders.
* **Model randomization** (Adebayo et al. 2018, "Sanity Checks for Saliency
  Maps"): re-initialize the trained weights top layer first and measure the
  Spearman rank correlation between the original and the new maps. A method
  whose maps stay put when the model is destroyed explains the input, not
  the model.

The run also reports what the model cost to train: ``nnlib.compress.
cost_report`` of one real training step of the CNN (``cost_*`` keys: XLA's
FLOPs and bytes, memory, median step time, the energy of the whole run).

Writes ``metrics.json`` (flat keys), ``results.md`` (the table),
``attributions.png`` (digit x method grid), ``faithfulness.png`` (deletion
and insertion curves) and ``sanity_check.png`` into the workdir, and prints
the table. ``run(config, workdir)`` and the pieces it calls are importable.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments._cli import sized_main  # noqa: E402
from experiments.robustness import train_digits_cnn, training_cost  # noqa: E402
from nnlib.compress import format_cost  # noqa: E402
from nnlib.data import Dataset, load_digits  # noqa: E402
from nnlib.explain import (  # noqa: E402
    completeness_gap,
    grad_cam,
    gradient_x_input,
    integrated_gradients,
    model_randomization_check,
    occlusion,
    saliency,
    smoothgrad,
)

# name -> (title in plots, signed?): signed maps say which way a pixel pushes.
METHODS = {
    "saliency": ("saliency", False),
    "gradient_x_input": ("gradient × input", True),
    "integrated_gradients": ("integrated gradients", True),
    "smoothgrad": ("SmoothGrad", False),
    "grad_cam": ("Grad-CAM", False),
    "occlusion": ("occlusion", True),
}

ExplainFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ExplainConfig:
    """What to train and how to explain it.

    Attributes:
      features, hidden_sizes, num_steps, batch_size, learning_rate: the CNN
        and its Adam training (``experiments.robustness.train_digits_cnn``).
      num_explain: test digits explained (the first ones of the test split);
        the grid shows the first of each class among them.
      ig_steps: integrated-gradients path points (trapezoid rule).
      smoothgrad_samples, noise_std: SmoothGrad's noisy copies and their
        standard deviation (15% of the [0, 1] pixel range, Smilkov et al.).
      grad_cam_layer: the CNN block whose feature map Grad-CAM reads.
      occlusion_window: square occluding patch, moved one pixel at a time.
      pixels_per_step: pixels deleted (inserted) between two points of a curve.
      random_orders: random pixel orders averaged for the curves' baseline.
      methods: which of ``METHODS`` to run (all by default).
      seed: training, SmoothGrad noise, randomization, tie-breaking.
    """

    features: tuple[int, ...] = (16, 32)
    hidden_sizes: tuple[int, ...] = (64,)
    num_steps: int = 800
    batch_size: int = 64
    learning_rate: float = 2e-3
    num_explain: int = 200
    ig_steps: int = 256
    smoothgrad_samples: int = 50
    noise_std: float = 0.15
    grad_cam_layer: str = "block_0"
    occlusion_window: int = 2
    pixels_per_step: int = 2
    random_orders: int = 20
    methods: tuple[str, ...] = tuple(METHODS)
    seed: int = 0

    @classmethod
    def tiny(cls) -> ExplainConfig:
        """Seconds-scale run for smoke tests and notebooks."""
        return cls(features=(8, 16), hidden_sizes=(32,), num_steps=200, learning_rate=3e-3,
                   num_explain=24, ig_steps=64, smoothgrad_samples=8, pixels_per_step=4,
                   random_orders=4)


# --- the methods, as (params, x, target) -> [B, H, W] ----------------------------------


def _check_methods(methods: Sequence[str]) -> None:
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown attribution methods {unknown}; choose from {list(METHODS)}")


def make_explainers(model: Any, config: ExplainConfig) -> dict[str, ExplainFn]:
    """One ``(params, x [B, H, W, 1], target [B]) -> [B, H, W]`` function per method.

    The same function objects serve the maps and the randomization check, so
    ``jax.jit`` compiles each method once (its cache is keyed by the function).
    """
    _check_methods(config.methods)
    key = jax.random.fold_in(jax.random.key(config.seed), 7)  # SmoothGrad's noise

    def f(params):
        return Partial(model.apply, {"params": params})

    def per_pixel(a):  # [B, H, W, C] -> [B, H, W]: a pixel's total over channels
        return jnp.sum(a, axis=-1)

    explainers = {
        "saliency": lambda p, x, t: per_pixel(saliency(f(p), x, t)),
        "gradient_x_input": lambda p, x, t: per_pixel(gradient_x_input(f(p), x, t)),
        "integrated_gradients": lambda p, x, t: per_pixel(integrated_gradients(
            f(p), x, t, steps=config.ig_steps, batch_size=32)),
        # The magnitude of the averaged gradient, as Smilkov et al. display it.
        "smoothgrad": lambda p, x, t: per_pixel(jnp.abs(smoothgrad(
            f(p), x, t, key, num_samples=config.smoothgrad_samples,
            noise_std=config.noise_std))),
        "grad_cam": lambda p, x, t: grad_cam(f(p), x, t, layer=config.grad_cam_layer),
        "occlusion": lambda p, x, t: occlusion(f(p), x, t, window=config.occlusion_window,
                                               stride=1),
    }
    return {name: explainers[name] for name in config.methods}


# --- faithfulness: deletion and insertion curves ---------------------------------------


def pixel_order(attributions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[B, H, W] -> [B, H * W]`` pixel indices, most-attributed first.

    Ties (e.g. the many exact zeros of gradient x input on the black
    background) are broken at random rather than by index, which would
    otherwise delete the top-left corner first.
    """
    flat = attributions.reshape(attributions.shape[0], -1)  # [B, P]
    orders = []
    for row in flat:
        shuffle = rng.permutation(row.size)
        orders.append(shuffle[np.argsort(-row[shuffle], kind="stable")])
    return np.stack(orders)


@functools.partial(jax.jit, static_argnames=("pixels_per_step",))
def _perturbation_curves(model_fn, x, target, order, insertion, *, pixels_per_step):
    """``x: [B, H, W, C]``, ``order: [B, P]`` -> ``p(target): [B, K]`` after hiding
    (or, for insertion, showing only) the first ``0, s, 2s, ..., P`` pixels."""
    b, p = order.shape
    counts = jnp.arange(0, p + 1, pixels_per_step)  # [K]
    rank = jnp.argsort(order, axis=1)  # [B, P]: position of each pixel in the order
    chosen = rank[:, None, :] < counts[None, :, None]  # [B, K, P]
    visible = jnp.where(insertion, chosen, ~chosen)
    pixels = x.reshape(b, 1, p, x.shape[-1])  # [B, 1, P, C]
    images = jnp.where(visible[..., None], pixels, 0.0)  # [B, K, P, C]
    images = images.reshape((b * counts.size,) + x.shape[1:])  # [B * K, H, W, C]
    probs = jax.nn.softmax(model_fn(images), axis=-1).reshape(b, counts.size, -1)
    return jnp.take_along_axis(probs, target[:, None, None], axis=2)[..., 0]  # [B, K]


def perturbation_curves(
    model_fn: Any, x: np.ndarray, target: np.ndarray, order: np.ndarray, *,
    pixels_per_step: int, insertion: bool = False,
) -> np.ndarray:
    """Deletion (or insertion) curves: ``[B, K]`` probabilities of ``target``,
    ``K = H * W / pixels_per_step + 1`` points from 0 to all pixels changed."""
    if order.shape[1] % pixels_per_step:
        raise ValueError(f"pixels_per_step={pixels_per_step} must divide the "
                         f"{order.shape[1]} pixels of an image")
    return np.asarray(_perturbation_curves(model_fn, jnp.asarray(x), jnp.asarray(target),
                                           jnp.asarray(order), jnp.asarray(bool(insertion)),
                                           pixels_per_step=pixels_per_step))


def area_under_curve(curves: np.ndarray) -> float:
    """Mean over examples of the trapezoid area of ``[B, K]`` curves on [0, 1]."""
    return float(np.mean(np.trapezoid(curves, dx=1.0 / (curves.shape[1] - 1), axis=1)))


# --- plots -----------------------------------------------------------------------------


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def plot_attribution_grid(x: np.ndarray, maps: dict[str, np.ndarray], labels: np.ndarray,
                          predicted: np.ndarray, path: str | Path | None = None):
    """Rows: digits; columns: the input, then one heatmap per method. Signed maps
    use a diverging colour map centred at 0 (red: evidence for the class)."""
    plt = _pyplot()
    rows, cols = x.shape[0], len(maps) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.5 * rows), squeeze=False)
    for i in range(rows):
        axes[i, 0].imshow(x[i, ..., 0], cmap="gray_r", vmin=0, vmax=1)
        axes[i, 0].set_ylabel(f"{labels[i]} → {predicted[i]}", fontsize=9)
        for j, (name, m) in enumerate(maps.items(), start=1):
            signed = METHODS[name][1]
            peak = float(np.max(np.abs(m[i]))) or 1.0
            axes[i, j].imshow(m[i], cmap="bwr" if signed else "magma",
                              vmin=-peak if signed else 0.0, vmax=peak)
    for j, name in enumerate(["input", *maps], start=0):
        axes[0, j].set_title(METHODS[name][0] if name in METHODS else name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def plot_curves(curves: dict[str, dict[str, np.ndarray]], path: str | Path | None = None):
    """Mean deletion and insertion curves per method and for random orders."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        for name, c in curves[kind].items():
            mean = c.mean(axis=0)
            frac = np.linspace(0, 1, mean.size)
            style = dict(color="black", ls="--") if name == "random" else {}
            label = METHODS[name][0] if name in METHODS else "random order"
            ax.plot(frac, mean, label=f"{label} (AUC {area_under_curve(c):.2f})", **style)
        better = "lower" if kind == "deletion" else "higher"
        ax.set(xlabel=f"fraction of pixels {'deleted' if kind == 'deletion' else 'inserted'}",
               ylabel="p(explained class)", title=f"{kind} ({better} AUC is more faithful)",
               ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def plot_sanity(stages: Sequence[str], correlation: dict[str, np.ndarray],
                path: str | Path | None = None):
    """Mean rank correlation vs how many layers (top first) are re-initialized."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = np.arange(len(stages) + 1)
    for (name, c), marker in zip(correlation.items(), "osD^vP", strict=False):
        style = "--" if METHODS[name][1] else "-"  # signed methods dashed
        ax.plot(xs, [1.0, *c], style, marker=marker, label=METHODS[name][0])
    ax.set_xticks(xs, ["trained", *[f"+{s}" for s in stages]], rotation=20, fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(ylabel="Spearman ρ with the trained map (|·|)",
           title="Cascading randomization (Adebayo et al. 2018)", ylim=(-0.3, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


# --- the experiment --------------------------------------------------------------------


def grid_indices(labels: np.ndarray, limit: int = 10) -> np.ndarray:
    """The first example of each class present, in class order (at most ``limit``)."""
    first = {}
    for i, c in enumerate(labels):
        first.setdefault(int(c), i)
    return np.array([first[c] for c in sorted(first)][:limit])


def _slug(stage: str) -> str:
    return stage.replace("/", "_")


def _table(config: ExplainConfig, metrics: dict[str, float], stages: Sequence[str]) -> str:
    lines = [f"Digits CNN (test accuracy {metrics['test_accuracy']:.3f}), "
             f"{metrics['num_explain']:.0f} test digits explained (predicted class). "
             f"Deletion: lower AUC is more faithful; insertion: higher. Randomization: "
             f"Spearman ρ of |map| with every layer re-initialized (lower passes).", "",
             "| method | deletion AUC | insertion AUC | ρ(\\|map\\|) randomized | "
             "ρ(map) randomized | time (s) |", "|---|---|---|---|---|---|"]
    for name in config.methods:
        lines.append(
            f"| {METHODS[name][0]} | {metrics[f'deletion_auc_{name}']:.3f} | "
            f"{metrics[f'insertion_auc_{name}']:.3f} | "
            f"{metrics[f'randomization_rho_{name}_all_layers']:.3f} | "
            f"{metrics[f'randomization_rho_signed_{name}_all_layers']:.3f} | "
            f"{metrics[f'time_s_{name}']:.2f} |")
    lines.append(f"| random order | {metrics['deletion_auc_random']:.3f} | "
                 f"{metrics['insertion_auc_random']:.3f} | - | - | - |")
    lines += ["", "Cascading randomization, mean Spearman ρ (|map|), top layer first:", "",
              "| method | " + " | ".join(f"+{s}" for s in stages) + " |",
              "|---|" + "---|" * len(stages)]
    for name in config.methods:
        lines.append(f"| {METHODS[name][0]} | " + " | ".join(
            f"{metrics[f'randomization_rho_{name}_{_slug(s)}']:.3f}" for s in stages) + " |")
    if "ig_completeness_gap_max" in metrics:
        lines += ["", f"Integrated gradients ({config.ig_steps} trapezoid steps, zero "
                  f"baseline): completeness gap |Σ attributions − (f(x) − f(0))| / "
                  f"|f(x) − f(0)| mean {metrics['ig_completeness_gap_mean']:.2e}, max "
                  f"{metrics['ig_completeness_gap_max']:.2e}; "
                  f"{100 * metrics['ig_completeness_within_1pct']:.1f}% of digits within 1%."]
    if "cost_step_time_s" in metrics:
        lines += ["", f"Training cost: one step of batch {config.batch_size} "
                  f"{metrics['cost_flops_per_step'] / 1e6:.2f} MFLOP (XLA), "
                  f"{1e3 * metrics['cost_step_time_s']:.2f} ms median on "
                  f"{metrics['cost_device']}; {config.num_steps} steps "
                  f"{metrics['cost_energy_kwh']:.2g} kWh, {metrics['cost_co2_g']:.2g} g CO2e "
                  f"(estimate)."]
    return "\n".join(lines)


def run(config: ExplainConfig, workdir: str | Path | None = None,
        data: Dataset | None = None, *, cost_repeats: int = 5
        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains the CNN, explains ``config.num_explain`` test digits with every method,
    measures completeness, faithfulness and the randomization check; writes the
    outputs when ``workdir`` is given.

    ``cost_repeats``: timed calls of the compute-cost report of one training
    step (``experiments.robustness.training_cost``; printed, and merged into
    the metrics as ``cost_*``); 0 skips it.

    Returns:
      ``(metrics, artifacts)``: flat metrics and ``{"model", "params", "x",
      "labels", "predicted", "maps" {method: [B, H, W]}, "curves", "stages",
      "randomization" {method: [stages]}}`` for the notebook.
    """
    _check_methods(config.methods)
    data = data or load_digits()
    start = time.perf_counter()
    model, params, info = train_digits_cnn(
        data, features=config.features, hidden_sizes=config.hidden_sizes,
        num_steps=config.num_steps, batch_size=config.batch_size,
        learning_rate=config.learning_rate, seed=config.seed)
    f = Partial(model.apply, {"params": params})
    metrics: dict[str, Any] = {"train_time_s": time.perf_counter() - start,
                               "num_params": info["num_params"]}
    if cost_repeats > 0:
        report = training_cost(model, params, data, num_steps=config.num_steps,
                               batch_size=config.batch_size,
                               learning_rate=config.learning_rate, seed=config.seed,
                               repeats=cost_repeats)
        print(f"training the digits CNN, one step of batch {config.batch_size} (energy: "
              f"{config.num_steps} steps):\n{format_cost(report)}", flush=True)
        metrics |= report
    test_pred = np.asarray(jax.jit(f)(data.test["inputs"])).argmax(-1)
    metrics["test_accuracy"] = float(np.mean(test_pred == data.test["labels"]))

    x = data.test["inputs"][:config.num_explain]  # [B, 8, 8, 1]
    labels = data.test["labels"][:config.num_explain]
    target = test_pred[:config.num_explain].astype(np.int32)  # explain what it predicted
    metrics["num_explain"] = float(len(x))

    explainers = make_explainers(model, config)
    maps: dict[str, np.ndarray] = {}
    for name, explain in explainers.items():
        start = time.perf_counter()
        maps[name] = np.asarray(jax.jit(explain)(params, x, target))  # [B, 8, 8]
        metrics[f"time_s_{name}"] = time.perf_counter() - start  # compile included

    if "integrated_gradients" in maps:
        # Completeness is about the raw [B, H, W, C] attributions; C = 1 here.
        ig = maps["integrated_gradients"][..., None]
        gap = np.asarray(completeness_gap(f, x, ig, target))  # [B]
        metrics["ig_completeness_gap_mean"] = float(np.mean(gap))
        metrics["ig_completeness_gap_max"] = float(np.max(gap))
        metrics["ig_completeness_within_1pct"] = float(np.mean(gap <= 0.01))

    rng = np.random.default_rng(config.seed)
    curves: dict[str, dict[str, np.ndarray]] = {"deletion": {}, "insertion": {}}
    orders = {name: pixel_order(m, rng) for name, m in maps.items()}
    random_orders = [np.stack([rng.permutation(x[0].size) for _ in range(len(x))])
                     for _ in range(config.random_orders)]
    for kind in curves:
        insertion = kind == "insertion"
        for name, order in orders.items():
            curves[kind][name] = perturbation_curves(
                f, x, target, order, pixels_per_step=config.pixels_per_step,
                insertion=insertion)
        curves[kind]["random"] = np.mean([perturbation_curves(
            f, x, target, order, pixels_per_step=config.pixels_per_step,
            insertion=insertion) for order in random_orders], axis=0)
        for name, c in curves[kind].items():
            metrics[f"{kind}_auc_{name}"] = area_under_curve(c)

    key = jax.random.fold_in(jax.random.key(config.seed), 11)
    randomization: dict[str, np.ndarray] = {}
    stages: tuple[str, ...] = ()
    for name, explain in explainers.items():
        result = model_randomization_check(explain, params, x, target, key=key,
                                           mode="cascading", absolute=True)
        stages = result.stages
        # A map that is all zeros has no ranks (NaN); count it as uncorrelated.
        rho = np.nanmean(np.asarray(result.correlation), axis=1)  # [stages]
        randomization[name] = rho
        for stage, r in zip(stages, rho, strict=True):
            metrics[f"randomization_rho_{name}_{_slug(stage)}"] = float(r)
        metrics[f"randomization_rho_{name}_all_layers"] = float(rho[-1])
        # Signed maps too (Adebayo et al. report both): every layer at once.
        signed = model_randomization_check(explain, params, x, target, key=key, mode="all")
        metrics[f"randomization_rho_signed_{name}_all_layers"] = float(
            np.nanmean(np.asarray(signed.correlation)))

    artifacts = {"model": model, "params": params, "x": x, "labels": labels,
                 "predicted": target, "maps": maps, "curves": curves, "stages": stages,
                 "randomization": randomization}
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = grid_indices(labels)
        plot_attribution_grid(x[rows], {k: m[rows] for k, m in maps.items()}, labels[rows],
                              target[rows], workdir / "attributions.png")
        plot_curves(curves, workdir / "faithfulness.png")
        plot_sanity(stages, randomization, workdir / "sanity_check.png")
        table = _table(config, metrics, stages)
        (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (workdir / "results.md").write_text(table + "\n")
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        print(table, flush=True)
    return metrics, artifacts


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return sized_main(
        argv, description=__doc__.splitlines()[0],
        get_config=lambda size: ExplainConfig() if size == "full" else ExplainConfig.tiny(),
        run=run, outputs="attributions.png, faithfulness.png, sanity_check.png")


if __name__ == "__main__":
    main()
