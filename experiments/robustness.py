"""Adversarial robustness of the digits CNN, before and after PGD adversarial training.

    python experiments/robustness.py --workdir=runs/robustness [--size=tiny]

Trains nnlib's CNN on the 8x8 digits from one initialization several times:
plainly, and with PGD adversarial training (Madry et al. 2018, "Towards Deep
Learning Models Resistant to Adversarial Attacks"; ``nnlib.robust.
make_adversarial_train_step``) at each training radius in
``train_epsilons``. Every model is then attacked on the test split with FGSM
(Goodfellow et al. 2015) and PGD under the L-infinity norm at several radii
``epsilon`` on [0, 1] pixels, and with L2 PGD. Two training radii show the
trade-off: the larger buys robustness at large epsilon and pays in clean
accuracy (Tsipras et al. 2019, "Robustness May Be at Odds with Accuracy").

An attack's number is only as good as the attack, so the run also checks each
adversarial batch for what any correct attack must satisfy, and reports it:

* every perturbation lies inside its epsilon-ball and every pixel in [0, 1];
* the loss goes up: mean adversarial loss >= mean clean loss, and PGD's
  mean loss at its last iterate >= at its random start;
* the iterative attack is at least as strong as the one-step attack
  (PGD accuracy <= FGSM accuracy, up to one example);
* accuracy does not rise with epsilon, and an unbounded L-infinity attack
  (epsilon = 1: the whole pixel range) drives accuracy to ~0. A defence whose
  accuracy stays up there is masking gradients, not robust (Athalye, Carlini
  & Wagner 2018, "Obfuscated Gradients Give a False Sense of Security").

What robustness costs is measured too: ``nnlib.compress.cost_report`` of one
real training step of the plain model (``cost_*`` keys) and of one PGD
adversarial training step (``adv_cost_*``): XLA's FLOPs and bytes, memory,
the median step time, and the energy of a whole training run. XLA counts a
loop body once, and PGD is a ``fori_loop``, so the adversarial step's FLOPs
are also reported with the loop counted in full
(``adv_cost_flops_per_step_with_loop``; see :func:`training_cost`).

Writes ``metrics.json`` (flat keys: ``plain_pgd_linf_0.1_accuracy``,
``adv_0.2_check_inside_ball``, ``cost_flops_per_step``, ...), ``results.md`` (the table) and
``robust_accuracy.png`` into the workdir and prints the table.
``run(config, workdir)`` and the pieces it calls are importable (the notebook
and the smoke test use them at tiny size).
"""

from __future__ import annotations

import dataclasses
import functools
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
from jax.tree_util import Partial

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments._cli import sized_main  # noqa: E402
from nnlib import losses  # noqa: E402
from nnlib.compress import cost_report, flops, format_cost  # noqa: E402
from nnlib.data import Dataset, load_digits  # noqa: E402
from nnlib.models import CNN  # noqa: E402
from nnlib.robust import fgsm, make_adversarial_train_step, pgd  # noqa: E402
from nnlib.train import TrainState, fit, make_train_step, num_params  # noqa: E402
from nnlib.train import jit as train_jit  # noqa: E402

# Slack for float32 rounding in the ball and range checks.
_TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True)
class RobustnessConfig:
    """What to train and how hard to attack it.

    Attributes:
      features, hidden_sizes: the CNN (conv widths, dense head widths).
      num_steps, batch_size, learning_rate: Adam training of both models.
      train_epsilons: L-infinity radii of adversarial training, one model each.
      train_pgd_steps: PGD steps per training batch (step 2.5 eps / steps).
      linf_epsilons: test radii of FGSM and L-infinity PGD.
      l2_epsilons: test radii of L2 PGD.
      pgd_steps: PGD steps at test time (step size 2.5 eps / steps, the Madry
        lab's ``robustness`` library's rule: long enough to cross the ball
        from any start).
      num_test: test examples attacked (``None``: the whole test split).
      seed: initialization, data order and attack keys.
    """

    features: tuple[int, ...] = (16, 32)
    hidden_sizes: tuple[int, ...] = (64,)
    num_steps: int = 800
    batch_size: int = 64
    learning_rate: float = 2e-3
    train_epsilons: tuple[float, ...] = (0.1, 0.2)
    train_pgd_steps: int = 5
    linf_epsilons: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3)
    l2_epsilons: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5)
    pgd_steps: int = 20
    num_test: int | None = None
    seed: int = 0

    @classmethod
    def tiny(cls) -> RobustnessConfig:
        """Seconds-scale run for smoke tests and notebooks (numbers are rough)."""
        return cls(features=(8, 16), hidden_sizes=(32,), num_steps=150, batch_size=64,
                   learning_rate=3e-3, train_epsilons=(0.1,), train_pgd_steps=2,
                   linf_epsilons=(0.0, 0.1, 0.3),
                   l2_epsilons=(0.5,), pgd_steps=5, num_test=128)


# --- training --------------------------------------------------------------------


def train_digits_cnn(
    data: Dataset,
    *,
    features: Sequence[int] = (16, 32),
    hidden_sizes: Sequence[int] = (64,),
    num_steps: int = 1000,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    adversarial: dict[str, Any] | None = None,
    model: CNN | None = None,
    state: TrainState | None = None,
) -> tuple[CNN, Any, dict[str, float]]:
    """Trains ``nnlib.models.CNN`` on ``data.train`` with Adam, plainly or adversarially.

    Args:
      data: ``load_digits()`` (inputs ``[n, 8, 8, 1]`` in [0, 1]).
      features, hidden_sizes: the CNN's conv and dense widths.
      num_steps, batch_size, learning_rate, seed: the run (same seed, same
        initialization and data order, whichever the step).
      adversarial: ``None`` for plain training, else keyword arguments of
        ``nnlib.robust.make_adversarial_train_step`` (``epsilon``,
        ``step_size``, ``num_steps``, ...).
      model, state: a model and its initial ``TrainState`` to start from
        instead of building them from the arguments above (to train several
        variants from one initialization, and to let jit reuse programs that
        take ``Partial(model.apply, ...)``: they are cached per model object).

    Returns:
      ``(model, params, info)``; ``info`` has ``num_params`` and the last
      logged train metrics (``train_accuracy``, and for adversarial training
      ``train_adversarial_accuracy`` ...).
    """
    if model is None:
        model = CNN(features=tuple(features), hidden_sizes=tuple(hidden_sizes),
                    num_classes=data.num_classes)
    if state is None:
        state = jax.jit(lambda key: TrainState.create(
            model=model, tx=optax.adam(learning_rate), key=key,
            example_input=data.train["inputs"][:1]))(jax.random.key(seed))
    step = make_train_step() if adversarial is None else make_adversarial_train_step(
        **adversarial)
    # Not donated: the caller may train another variant from the same state.
    state, summary = fit(state, data.train, batch_size=batch_size, num_steps=num_steps,
                         train_step=train_jit(step), seed=seed, log_every=min(50, num_steps),
                         workdir=None, plot=False, tensorboard=False, show_progress=False)
    info = {k: float(v) for k, v in summary.items()
            if k.startswith("train_") and np.isscalar(v)}
    info["num_params"] = float(num_params(state.params))
    return model, state.params, info


def training_cost(
    model: CNN,
    params: Any,
    data: Dataset,
    *,
    num_steps: int,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    adversarial: dict[str, Any] | None = None,
    repeats: int = 5,
) -> dict[str, Any]:
    """``nnlib.compress.cost_report`` of one real training step of ``model``.

    The step is the one :func:`train_digits_cnn` runs (Adam; plain, or PGD
    adversarial training with the keyword arguments ``adversarial``), on the
    first ``batch_size`` training digits, from ``params``; the energy is
    extrapolated to ``num_steps`` steps (a whole training run).

    XLA's cost analysis counts a ``while`` loop's body once, and PGD is a
    ``lax.fori_loop``: whatever its ``num_steps``, the adversarial step's
    ``cost_flops_per_step`` holds one PGD iteration. So for adversarial
    training the report adds ``cost_loop_body_flops`` (XLA's count of one
    PGD iteration on the attacked rows, compiled as ``cost_report``'s step
    is: ``nnlib.robust.pgd`` with ``num_steps=1`` and no random start), ``cost_loop_trip_count`` and
    ``cost_flops_per_step_with_loop = cost_flops_per_step + (trip_count - 1)
    * cost_loop_body_flops``. The measured time needs no correction.

    Returns:
      ``cost_report``'s flat ``cost_*`` dict (plus the loop keys above).
    """
    state = jax.jit(lambda key: TrainState.create(
        model=model, tx=optax.adam(learning_rate), key=key,
        example_input=data.train["inputs"][:1]))(jax.random.key(seed))
    state = state.replace(params=params)
    batch = {"inputs": data.train["inputs"][:batch_size],
             "labels": data.train["labels"][:batch_size]}
    step = make_train_step() if adversarial is None else make_adversarial_train_step(
        **adversarial)
    report = cost_report(step, state, batch, num_steps=num_steps, repeats=repeats, warmup=1)
    if adversarial is not None:
        n = batch_size
        rows = max(1, round(adversarial.get("mix", 1.0) * n))  # the attacked rows
        attack = {k: adversarial[k] for k in ("epsilon", "step_size", "norm", "clip_min",
                                               "clip_max") if k in adversarial}

        def one_iteration(variables, x, labels):
            return pgd(Partial(model.apply, variables), x, labels, num_steps=1,
                       random_start=False, **attack)

        body = flops(one_iteration, state.variables, batch["inputs"][:rows],
                     batch["labels"][:rows], compiled=True)  # as cost_report counts
        trips = int(adversarial["num_steps"])
        report["cost_loop_body_flops"] = body
        report["cost_loop_trip_count"] = trips
        report["cost_flops_per_step_with_loop"] = report["cost_flops_per_step"] + (
            trips - 1) * body
    return report


# --- attacks and their checks ----------------------------------------------------


@functools.partial(jax.jit, static_argnames=("attack", "norm", "num_steps"))
def _attack_and_measure(model_fn, x, labels, epsilon, key, *, attack, norm, num_steps):
    """Attacks the whole batch; returns the adversarial batch and per-example facts."""
    if attack == "fgsm":
        x_adv = fgsm(model_fn, x, labels, epsilon)
        start_loss = end_loss = jnp.zeros(())
    else:
        step_size = jnp.maximum(2.5 * epsilon / num_steps, 1e-6)  # eps = 0: a no-op attack
        x_adv, path = pgd(model_fn, x, labels, epsilon=epsilon, step_size=step_size,
                          num_steps=num_steps, norm=norm, key=key, return_losses=True)
        start_loss, end_loss = path[0], path[-1]
    delta = (x_adv - x).reshape(x.shape[0], -1)  # [B, D]
    clean_logits, adv_logits = model_fn(x), model_fn(x_adv)  # [B, C]
    return x_adv, {
        "clean_correct": jnp.argmax(clean_logits, -1) == labels,  # [B]
        "adversarial_correct": jnp.argmax(adv_logits, -1) == labels,  # [B]
        "clean_loss": losses.softmax_cross_entropy(clean_logits, labels, reduction="none"),
        "adversarial_loss": losses.softmax_cross_entropy(adv_logits, labels, reduction="none"),
        "linf": jnp.max(jnp.abs(delta), axis=1),  # [B]
        "l2": jnp.sqrt(jnp.sum(delta * delta, axis=1)),  # [B]
        "pixel_min": jnp.min(x_adv), "pixel_max": jnp.max(x_adv),
        "pgd_start_loss": start_loss, "pgd_end_loss": end_loss,
    }


def evaluate_attack(
    model_fn: Any,
    x: np.ndarray,
    labels: np.ndarray,
    *,
    attack: str,
    epsilon: float,
    norm: str = "linf",
    num_steps: int = 20,
    key: jax.Array | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """One attack at one radius on all of ``x``, with the checks every attack must pass.

    Args:
      model_fn: ``Partial(model.apply, variables)``: ``x [B, 8, 8, 1] -> logits [B, C]``.
      x: ``[B, 8, 8, 1]`` clean test images in [0, 1]; labels: ``[B]``.
      attack: ``"fgsm"`` (L-infinity only) or ``"pgd"``.
      epsilon: radius; norm: ``"linf"`` or ``"l2"``; num_steps: PGD steps.
      key: PGD's random start.

    Returns:
      ``x_adv: [B, 8, 8, 1]`` and a dict: ``accuracy`` (robust accuracy),
      ``clean_accuracy``, ``clean_loss``/``adversarial_loss`` (means),
      ``max_norm`` (largest perturbation in the attack's norm), and booleans
      as floats: ``inside_ball``, ``in_range``, ``loss_increased`` (mean
      loss), ``pgd_loss_increased`` (last iterate vs random start; 1 for FGSM).
    """
    if attack not in ("fgsm", "pgd") or (attack == "fgsm" and norm != "linf"):
        raise ValueError(f"evaluate_attack expected attack 'fgsm' (norm 'linf') or 'pgd', "
                         f"got attack={attack!r}, norm={norm!r}")
    key = jax.random.key(0) if key is None else key
    x_adv, m = _attack_and_measure(model_fn, jnp.asarray(x), jnp.asarray(labels),
                                   jnp.float32(epsilon), key, attack=attack, norm=norm,
                                   num_steps=num_steps)
    m = jax.device_get(m)
    max_norm = float(np.max(m[norm]))
    clean_loss, adv_loss = float(np.mean(m["clean_loss"])), float(np.mean(m["adversarial_loss"]))
    return np.asarray(x_adv), {
        "accuracy": float(np.mean(m["adversarial_correct"])),
        "clean_accuracy": float(np.mean(m["clean_correct"])),
        "clean_loss": clean_loss,
        "adversarial_loss": adv_loss,
        "max_norm": max_norm,
        "inside_ball": float(max_norm <= epsilon + _TOLERANCE),
        "in_range": float(m["pixel_min"] >= -_TOLERANCE and m["pixel_max"] <= 1 + _TOLERANCE),
        "loss_increased": float(adv_loss >= clean_loss - _TOLERANCE),
        "pgd_loss_increased": float(m["pgd_end_loss"] >= m["pgd_start_loss"] - _TOLERANCE),
    }


def attack_suite(
    model_fn: Any,
    x: np.ndarray,
    labels: np.ndarray,
    *,
    linf_epsilons: Sequence[float],
    l2_epsilons: Sequence[float],
    pgd_steps: int,
    key: jax.Array,
) -> dict[str, dict[str, float]]:
    """FGSM and PGD (L-infinity) at every ``linf_epsilons``, L2 PGD at every ``l2_epsilons``,
    plus the unbounded L-infinity PGD (epsilon = 1) of the gradient-masking check.

    Returns:
      ``{"fgsm_linf_0.1": evaluate_attack's dict, "pgd_linf_0.1": ..., "pgd_l2_0.5": ...,
      "pgd_linf_1.0": ...}``.
    """
    runs = [("fgsm", "linf", e) for e in linf_epsilons]
    runs += [("pgd", "linf", e) for e in (*linf_epsilons, 1.0)]
    runs += [("pgd", "l2", e) for e in l2_epsilons]
    results = {}
    for i, (attack, norm, epsilon) in enumerate(runs):
        _, results[f"{attack}_{norm}_{epsilon:g}"] = evaluate_attack(
            model_fn, x, labels, attack=attack, epsilon=epsilon, norm=norm,
            num_steps=pgd_steps, key=jax.random.fold_in(key, i))
    return results


def attack_checks(results: dict[str, dict[str, float]], linf_epsilons: Sequence[float],
                  num_examples: int) -> dict[str, float]:
    """Whole-suite checks (1.0 = passed): every attack inside its ball and the pixel
    range, losses up, PGD at least as strong as FGSM and non-increasing in epsilon
    (with one example's slack for PGD's random start), and the unbounded attack
    at <= 10% accuracy."""
    slack = 1.0 / num_examples + 1e-9
    per_attack = list(results.values())
    pgd_linf = [results[f"pgd_linf_{e:g}"]["accuracy"] for e in sorted(linf_epsilons)]
    return {
        "check_inside_ball": float(all(r["inside_ball"] for r in per_attack)),
        "check_in_pixel_range": float(all(r["in_range"] for r in per_attack)),
        "check_loss_increased": float(all(r["loss_increased"] for r in per_attack)),
        "check_pgd_loss_increased": float(all(r["pgd_loss_increased"] for r in per_attack)),
        "check_pgd_stronger_than_fgsm": float(all(
            results[f"pgd_linf_{e:g}"]["accuracy"] <= results[f"fgsm_linf_{e:g}"]["accuracy"]
            + slack for e in linf_epsilons)),
        "check_monotone_in_epsilon": float(all(
            b <= a + slack for a, b in zip(pgd_linf, pgd_linf[1:], strict=False))),
        "check_unbounded_attack_wins": float(results["pgd_linf_1"]["accuracy"] <= 0.1),
    }


# --- the experiment --------------------------------------------------------------


def model_names(config: RobustnessConfig) -> list[str]:
    """``["plain", "adv_0.1", ...]``: the metric-key prefix of each trained model."""
    return ["plain", *(f"adv_{e:g}" for e in config.train_epsilons)]


def _title(name: str) -> str:
    return "plain" if name == "plain" else f"adv. trained ε={name[len('adv_'):]}"


def _table(config: RobustnessConfig, metrics: dict[str, float]) -> str:
    names = model_names(config)
    rows = [("clean", "-", "clean")]
    rows += [("FGSM L∞", f"{e:g}", f"fgsm_linf_{e:g}") for e in config.linf_epsilons if e > 0]
    rows += [("PGD L∞", f"{e:g}", f"pgd_linf_{e:g}") for e in config.linf_epsilons if e > 0]
    rows += [("PGD L∞ (unbounded check)", "1", "pgd_linf_1")]
    rows += [("PGD L2", f"{e:g}", f"pgd_l2_{e:g}") for e in config.l2_epsilons]
    header = " | ".join(_title(n) for n in names)
    lines = [f"Digits CNN, test accuracy on {metrics['num_test']:.0f} test images. PGD: "
             f"{config.pgd_steps} steps of 2.5 ε/{config.pgd_steps}, random start. Adversarial "
             f"training: L∞ PGD, {config.train_pgd_steps} steps, {config.num_steps} Adam steps "
             f"(as the plain model).", "",
             f"| attack | ε | {header} |", "|---|---|" + "---|" * len(names)]
    for attack, eps, key in rows:
        lines.append(f"| {attack} | {eps} | " + " | ".join(
            f"{metrics[f'{n}_{key}_accuracy']:.3f}" for n in names) + " |")
    lines += ["", f"| attack check | {header} |", "|---|" + "---|" * len(names)]
    for check in sorted(k[len("plain_check_"):] for k in metrics
                        if k.startswith("plain_check_")):
        lines.append(f"| {check} | " + " | ".join(
            "pass" if metrics[f"{n}_check_{check}"] else "FAIL" for n in names) + " |")
    lines += ["", "Training time (s): " + ", ".join(
        f"{_title(n)} {metrics[f'{n}_train_time_s']:.1f}" for n in names)
        + f"; attack suites {metrics['attack_time_s']:.1f}."]
    if "adv_training_time_ratio" in metrics:
        lines += ["", f"One training step (batch {config.batch_size}): plain "
                  f"{metrics['cost_flops_per_step'] / 1e6:.2f} MFLOP, "
                  f"{1e3 * metrics['cost_step_time_s']:.2f} ms; PGD adversarial "
                  f"({config.train_pgd_steps} PGD steps) "
                  f"{metrics['adv_cost_flops_per_step_with_loop'] / 1e6:.2f} MFLOP (loop counted "
                  f"in full), {1e3 * metrics['adv_cost_step_time_s']:.2f} ms: "
                  f"{metrics['adv_training_flops_ratio']:.1f}x the FLOPs, "
                  f"{metrics['adv_training_time_ratio']:.1f}x the time (median of "
                  f"{metrics['cost_timing_repeats']} on {metrics['cost_device']})."]
    return "\n".join(lines)


def plot_robustness(config: RobustnessConfig, metrics: dict[str, float],
                    path: str | Path | None = None):
    """Accuracy vs epsilon for every model: L-infinity (FGSM dashed, PGD solid)
    and L2 PGD."""
    import matplotlib.pyplot as plt

    fig, (ax_inf, ax_2) = plt.subplots(1, 2, figsize=(11, 4.2))
    linf = sorted(config.linf_epsilons)
    l2 = [0.0, *sorted(config.l2_epsilons)]
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(model_names(config)):
        for attack, style in (("fgsm", "--"), ("pgd", "-")):
            acc = [metrics[f"{name}_{attack}_linf_{e:g}_accuracy"] for e in linf]
            ax_inf.plot(linf, acc, style, marker="o", ms=4, color=colours(i),
                        label=f"{_title(name)}, {attack.upper()}")
        acc = [metrics[f"{name}_clean_accuracy"]] + [
            metrics[f"{name}_pgd_l2_{e:g}_accuracy"] for e in l2[1:]]
        ax_2.plot(l2, acc, "-", marker="o", ms=4, color=colours(i), label=_title(name))
    for i, e in enumerate(config.train_epsilons, start=1):
        ax_inf.axvline(e, color=colours(i), lw=0.8, ls=":")
    ax_inf.set(xlabel="ε (L∞, pixels in [0, 1])", ylabel="test accuracy",
               title="L∞ attacks (dotted: training ε)", ylim=(-0.02, 1.02))
    ax_2.set(xlabel="ε (L2)", ylabel="test accuracy", title="L2 PGD", ylim=(-0.02, 1.02))
    for ax in (ax_inf, ax_2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def run(config: RobustnessConfig, workdir: str | Path | None = None,
        data: Dataset | None = None, *, cost_repeats: int = 5
        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains every model, attacks it, checks the attacks; writes the outputs if
    ``workdir`` is given.

    ``cost_repeats``: timed calls of the compute-cost report of one plain and
    one adversarial training step (:func:`training_cost`; printed, and merged
    into the metrics as ``cost_*`` and ``adv_cost_*``); 0 skips it.

    Returns:
      ``(metrics, models)``: flat metrics (``plain_pgd_linf_0.1_accuracy``,
      ``adv_0.1_check_inside_ball``, ...) and ``{"plain": (model, params),
      "adv_0.1": (model, params), ...}`` (one model object: the notebook and
      the tests reuse the compiled attacks).
    """
    data = data or load_digits()
    n = len(data.test["labels"]) if config.num_test is None else config.num_test
    x, y = data.test["inputs"][:n], data.test["labels"][:n]
    common = dict(num_steps=config.num_steps, batch_size=config.batch_size,
                  learning_rate=config.learning_rate, seed=config.seed)
    metrics: dict[str, Any] = {"num_test": float(n)}
    # One model object and one initial state for all: same initialization, and
    # the compiled attacks (keyed by Partial(model.apply, ...)) serve every model.
    model = CNN(features=config.features, hidden_sizes=config.hidden_sizes,
                num_classes=data.num_classes)
    initial = jax.jit(lambda key: TrainState.create(
        model=model, tx=optax.adam(config.learning_rate), key=key,
        example_input=data.train["inputs"][:1]))(jax.random.key(config.seed))
    variants = {"plain": None}
    for e in config.train_epsilons:
        variants[f"adv_{e:g}"] = dict(epsilon=e, step_size=2.5 * e / config.train_pgd_steps,
                                      num_steps=config.train_pgd_steps)
    models = {}
    attack_time = 0.0
    for name, adversarial in variants.items():
        start = time.perf_counter()
        _, params, info = train_digits_cnn(data, adversarial=adversarial, model=model,
                                           state=initial, **common)
        metrics[f"{name}_train_time_s"] = time.perf_counter() - start
        metrics["num_params"] = info["num_params"]
        for k in ("train_accuracy", "train_adversarial_accuracy"):
            if k in info:
                metrics[f"{name}_{k}"] = info[k]
        models[name] = (model, params)
        # What one training step costs: the plain step ("cost_*") and the first
        # adversarial one ("adv_cost_*"; every training epsilon costs the same).
        if cost_repeats > 0 and (name == "plain" or "adv_cost_flops_per_step" not in metrics):
            report = training_cost(model, params, data, adversarial=adversarial,
                                   repeats=cost_repeats, **common)
            what = ("plain training" if adversarial is None else
                    f"PGD adversarial training ({adversarial['num_steps']} PGD steps)")
            print(f"{what}, one step of batch {config.batch_size} (energy: "
                  f"{config.num_steps} steps):\n{format_cost(report)}", flush=True)
            prefix = "" if adversarial is None else "adv_"
            metrics |= {f"{prefix}{k}": v for k, v in report.items()}
        start = time.perf_counter()
        results = attack_suite(Partial(model.apply, {"params": params}), x, y,
                               linf_epsilons=config.linf_epsilons,
                               l2_epsilons=config.l2_epsilons, pgd_steps=config.pgd_steps,
                               key=jax.random.fold_in(jax.random.key(config.seed), 1))
        attack_time += time.perf_counter() - start
        metrics[f"{name}_clean_accuracy"] = next(iter(results.values()))["clean_accuracy"]
        for attack, r in results.items():
            metrics[f"{name}_{attack}_accuracy"] = r["accuracy"]
            metrics[f"{name}_{attack}_max_norm"] = r["max_norm"]
            metrics[f"{name}_{attack}_loss_gain"] = r["adversarial_loss"] - r["clean_loss"]
        for check, ok in attack_checks(results, config.linf_epsilons, n).items():
            metrics[f"{name}_{check}"] = ok
    metrics["attack_time_s"] = attack_time
    if "cost_step_time_s" in metrics and "adv_cost_step_time_s" in metrics:
        metrics["adv_training_time_ratio"] = (metrics["adv_cost_step_time_s"]
                                              / metrics["cost_step_time_s"])
        metrics["adv_training_flops_ratio"] = (metrics["adv_cost_flops_per_step_with_loop"]
                                               / metrics["cost_flops_per_step"])
        print(f"PGD adversarial training costs {metrics['adv_training_flops_ratio']:.1f}x the "
              f"FLOPs (PGD loop counted in full) and {metrics['adv_training_time_ratio']:.1f}x "
              f"the time of a plain training step", flush=True)

    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        table = _table(config, metrics)
        (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (workdir / "results.md").write_text(table + "\n")
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        plot_robustness(config, metrics, workdir / "robust_accuracy.png")
        print(table, flush=True)
    return metrics, models


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return sized_main(
        argv, description=__doc__.splitlines()[0],
        get_config=lambda size: RobustnessConfig() if size == "full" else RobustnessConfig.tiny(),
        run=run, outputs="robust_accuracy.png")


if __name__ == "__main__":
    main()
