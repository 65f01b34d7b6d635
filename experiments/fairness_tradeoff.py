"""Accuracy against group fairness: a sweep of penalty strengths and adversarial debiasing.

    python experiments/fairness_tradeoff.py --workdir=runs/fairness_tradeoff
    python experiments/fairness_tradeoff.py --workdir=runs/adult \\
        --csv=adult.csv --label=income --sensitive=sex

A binary classifier (an MLP with one hidden layer of 32, full-batch Adam) is
trained on data with a sensitive attribute ``A`` in several ways:

* with the task loss plus ``lambda`` x a smooth demographic parity penalty
  (``nnlib.fairness.make_fair_loss(penalty="demographic_parity")``), for a
  sweep of ``lambda`` from 0 (the unconstrained baseline) upwards;
* the same with the equalized odds penalty;
* with adversarial debiasing (Zhang et al. 2018,
  ``nnlib.fairness.make_adversarial_debiasing_step``) at a few adversary
  weights ``alpha``.

For each, on the *test* split: accuracy, the demographic parity difference
``max_g P(h=1 | A=g) - min_g P(h=1 | A=g)`` and the equalized odds difference
(the larger of the TPR and FPR gaps), each the mean over ``--seeds``
initialisations. One point's metrics are recomputed with ``fairlearn.metrics``
and the largest disagreement is recorded (``fairlearn_max_abs_difference``).
The plot shows accuracy against each fairness gap with the Pareto front (the
points no other point beats on both).

Data. By default ``nnlib.fairness.planted_bias_dataset``: both groups are
equally qualified by construction and only the historical labels demand more
of group 1 (``--bias`` = the extra qualification). Because the truth is known
there, the experiment also reports ``unbiased_accuracy``: agreement with the
decision an unbiased process would make, ``1[q > 0]`` for the latent
qualification ``q``. Accuracy against the biased labels falls as the model is
made fairer; accuracy against the unbiased decision need not.

Real data: no data set with a sensitive attribute ships with the installed
packages (scikit-learn's bundled sets have none, and fairlearn's
``fetch_adult`` / ``fetch_acs_income`` download from OpenML at run time), so
nothing real runs by default. If you have one locally, e.g. UCI Adult as a
CSV with a header row, pass ``--csv`` with the ``--label`` and
``--sensitive`` column names (see :func:`load_csv` for how columns are
encoded); ``--positive`` names the positive label value when it is not
obvious.

Compute cost. ``nnlib.compress.cost_report`` of one real (full-batch)
training step of the main model, the predictor with the first penalty
(``cost_*`` keys), and of one adversarial-debiasing step (predictor and
adversary, ``adversarial_cost_*``) when ``alphas`` are given: XLA's FLOPs and
bytes, memory, the median step time and the energy of one model's training
run (``num_steps`` steps); printed and written to ``metrics.json``.

Writes ``metrics.json`` (flat keys such as ``dp_penalty_3_accuracy``,
``adversarial_1_dp_difference``, ``cost_flops_per_step``), ``results.md`` (the table) and
``tradeoff.png`` into ``--workdir`` and prints the table. One to three minutes
on a 2-core CPU with the defaults; ``run`` is importable (the notebook and the
smoke test call it small).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nnlib import fairness  # noqa: E402
from nnlib.compress import cost_report, format_cost  # noqa: E402
from nnlib.data import load_tabular, split_indices  # noqa: E402
from nnlib.data.tabular import SPLITS  # noqa: E402
from nnlib.layers import MLP  # noqa: E402
from nnlib.train import TrainState, make_train_step  # noqa: E402

DEFAULT_WEIGHTS = (0.0, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
DEFAULT_ALPHAS = (0.3, 1.0, 3.0)
PENALTIES = ("demographic_parity", "equalized_odds")


@dataclasses.dataclass
class FairData:
    """Splits ``{"inputs": float32 [n, features], "labels": int32 [n], "groups":
    int32 [n]}``; ``unbiased`` holds the test split's unbiased decisions
    ``[n_test]`` when they are known (planted bias), else ``None``."""

    name: str
    splits: dict[str, dict[str, np.ndarray]]
    num_groups: int
    group_names: tuple[str, ...]
    unbiased: np.ndarray | None = None


# --- data ---------------------------------------------------------------------------


def planted_data(n: int = 10000, *, bias_strength: float = 1.0, seed: int = 0) -> FairData:
    """``nnlib.fairness.planted_bias_dataset`` (the group is not an input; the
    proxy feature is), with the test split's unbiased decisions ``1[q > 0]``."""
    data = fairness.planted_bias_dataset(n, bias_strength=bias_strength, seed=seed)
    unbiased = (data.info["qualification"]["test"] > 0).astype(np.int32)
    return FairData(f"planted bias (b={bias_strength}, n={n})", data.splits, 2,
                    ("group 0", "group 1"), unbiased)


_MISSING = ("", "?", "na", "nan", "null", "none")


def load_csv(
    path: str | Path,
    *,
    label: str,
    sensitive: str,
    positive: str | None = None,
    exclude: Sequence[str] = (),
    seed: int = 0,
) -> FairData:
    """A CSV file with a header row as fairness data.

    * ``label``: the binary target. Values ``0``/``1`` are used as they are;
      otherwise ``positive`` names the positive value, or, when the column has
      exactly two distinct values, the larger in sort order is positive (UCI
      Adult's ``">50K"`` over ``"<=50K"``; a trailing ``"."`` as in
      ``adult.test`` is stripped).
    * ``sensitive``: any column; each distinct value is a group (ids in sorted
      order). It is *not* used as an input feature.
    * every other column not in ``exclude`` is a feature: numeric when every
      non-missing value parses as a number (missing values become the
      median of the training split's), otherwise categorical, one-hot encoded
      (missing is a category).
      Missing means empty, ``?``, ``NA``, ``nan``, ``null`` or ``none``.

    Splits 70/10/20, stratified by label, standardized with train statistics
    (``nnlib.data.load_tabular``).
    """
    fn = "load_csv"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{fn}: no file at {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [[(v or "").strip() for v in row.values()] for row in reader]
    for name, what in ((label, "--label"), (sensitive, "--sensitive")):
        if name not in columns:
            raise ValueError(f"{fn}: {path} has no column {name!r} (given as {what}); its "
                             f"columns are {columns}")
    if not rows:
        raise ValueError(f"{fn}: {path} has a header but no rows")
    table = {c: np.array([r[i] for r in rows], dtype=object) for i, c in enumerate(columns)}

    raw = np.array([v.rstrip(".") for v in table[label]])
    values = sorted(set(raw))
    if positive is None:
        if set(values) <= {"0", "1"}:
            positive = "1"
        elif len(values) == 2:
            positive = values[1]
        else:
            raise ValueError(f"{fn}: label column {label!r} has {len(values)} distinct values "
                             f"({values[:10]}); pass --positive to say which one is positive")
    elif positive not in values:
        raise ValueError(f"{fn}: --positive {positive!r} is not a value of column {label!r}; "
                         f"its values are {values[:10]}")
    y = (raw == positive).astype(np.int32)
    group_names, groups = np.unique(table[sensitive].astype(str), return_inverse=True)
    # The rows load_tabular will put in train (its stratified split of y and
    # seed): missing numbers are filled from them alone, not from val/test.
    train = np.zeros(len(y), bool)
    train[split_indices(len(y), seed=seed, stratify=y)["train"]] = True

    features, names = [], []
    for column in columns:
        if column in (label, sensitive) or column in exclude:
            continue
        col = table[column]
        missing = np.array([v.lower() in _MISSING for v in col])
        try:
            numbers = np.array([np.nan if m else float(v)
                                for v, m in zip(col, missing, strict=True)])
        except ValueError:
            numbers = None
        if numbers is not None and np.isfinite(numbers[~missing]).all() and (~missing).any():
            known = numbers[~missing & train]
            fill = np.median(known) if known.size else 0.0  # no train value: a constant
            features.append(np.where(missing, fill, numbers)[:, None])
            names.append(column)
        else:
            categories, codes = np.unique(col.astype(str), return_inverse=True)
            features.append(np.eye(len(categories))[codes])
            names += [f"{column}={c}" for c in categories]
    if not features:
        raise ValueError(f"{fn}: {path} has no feature columns besides the label and the "
                         "sensitive attribute")
    x = np.concatenate(features, axis=1)
    data = load_tabular(x, y, seed=seed, name=path.stem, feature_names=names)
    splits = {s: {**data[s], "groups": groups[data.indices[s]].astype(np.int32)}
              for s in SPLITS}
    return FairData(f"{path.name}: {label} by {sensitive}", splits, len(group_names),
                    tuple(str(g) for g in group_names))


# --- training ---------------------------------------------------------------------------


def _predictor(hidden: int):
    return MLP((hidden,), out_features=1)


def penalized_loss(unit: Any, weight: Any) -> Any:
    """Task loss + ``weight`` x penalty from ``unit``, a ``make_fair_loss(weight=1.0)``
    (whose metrics hold the two terms), so ``weight`` may be traced."""
    def loss_fn(outputs, batch):
        _, metrics = unit(outputs, batch)
        total = metrics["task_loss"] + weight * metrics["fairness_penalty"]
        return total, {**metrics, "loss": total}

    return loss_fn


def train_penalized(
    data: FairData,
    *,
    penalty: str,
    weights: Sequence[float],
    seeds: Sequence[int] = (0, 1, 2),
    num_steps: int = 300,
    learning_rate: float = 0.02,
    hidden: int = 32,
) -> np.ndarray:
    """Full-batch training with task loss + ``lambda`` x ``penalty`` (the penalty of
    ``make_fair_loss``), one model per (``lambda``, seed): both are ``vmap``ped,
    so the whole sweep is one compiled program. Returns the test log-odds
    ``[weights, seeds, n_test]``."""
    if any(not (math.isfinite(w) and w >= 0) for w in weights):
        raise ValueError(f"train_penalized expected finite weights >= 0, got {list(weights)}")
    # make_fair_loss takes a Python weight; with weight 1 its metrics hold the
    # two terms, so a traced lambda can recombine them and one program serves
    # every lambda.
    unit = fairness.make_fair_loss(penalty=penalty, weight=1.0, num_groups=data.num_groups)
    train = {k: jnp.asarray(v) for k, v in data.splits["train"].items()}
    x_test = jnp.asarray(data.splits["test"]["inputs"])

    def train_one(key, weight):
        step = make_train_step(penalized_loss(unit, weight))
        state = TrainState.create(model=_predictor(hidden), tx=optax.adam(learning_rate),
                                  key=key, example_input=train["inputs"][:1])
        state, _ = jax.lax.scan(lambda s, _: step(s, train), state, None, length=num_steps)
        return state.apply_fn(state.variables, x_test)[:, 0]  # [n_test]

    keys = jnp.stack([jax.random.key(s) for s in seeds])
    over_seeds = jax.vmap(train_one, in_axes=(0, None))
    sweep = jax.jit(jax.vmap(over_seeds, in_axes=(None, 0)))
    return np.asarray(sweep(keys, jnp.asarray(weights, jnp.float32)))


def train_adversarial(
    data: FairData,
    *,
    alpha: float,
    seeds: Sequence[int] = (0, 1, 2),
    num_steps: int = 300,
    learning_rate: float = 0.02,
    hidden: int = 32,
    criterion: str = "demographic_parity",
) -> np.ndarray:
    """Full-batch adversarial debiasing with adversary weight ``alpha`` (with the
    projection term); returns the predictor's test log-odds ``[seeds, n_test]``."""
    debias = fairness.make_adversarial_debiasing_step(
        _predictor(hidden), MLP((16,), out_features=data.num_groups),
        predictor_tx=optax.adam(learning_rate), adversary_tx=optax.adam(learning_rate),
        num_groups=data.num_groups, alpha=alpha, criterion=criterion)
    train = {k: jnp.asarray(v) for k, v in data.splits["train"].items()}
    x_test = jnp.asarray(data.splits["test"]["inputs"])

    def train_one(key):
        state = debias.init(key, train["inputs"][:1])
        state, _ = jax.lax.scan(lambda s, _: debias.step(s, train), state, None,
                                length=num_steps)
        pred = state.predictor
        return pred.apply_fn(pred.variables, x_test)[:, 0]

    keys = jnp.stack([jax.random.key(s) for s in seeds])
    return np.asarray(jax.jit(jax.vmap(train_one))(keys))


def training_cost(
    data: FairData,
    *,
    penalty: str | None = "demographic_parity",
    alpha: float = 1.0,
    weight: float = 1.0,
    seed: int = 0,
    num_steps: int = 300,
    learning_rate: float = 0.02,
    hidden: int = 32,
    criterion: str = "demographic_parity",
    repeats: int = 5,
) -> dict[str, Any]:
    """``nnlib.compress.cost_report`` of one full-batch training step on the train
    split, as :func:`train_penalized` (``penalty`` given, at ``weight``) or
    :func:`train_adversarial` (``penalty=None``, at ``alpha``) take it, for one
    model (the sweeps ``vmap`` many); energy extrapolated to ``num_steps``.

    The adversarial-debiasing report sizes the predictor and the adversary
    together (``cost_num_params``, ``cost_opt_state_bytes``)."""
    train = {k: jnp.asarray(v) for k, v in data.splits["train"].items()}
    key = jax.random.key(seed)
    if penalty is not None:
        unit = fairness.make_fair_loss(penalty=penalty, weight=1.0, num_groups=data.num_groups)
        step = make_train_step(penalized_loss(unit, jnp.float32(weight)))
        state = TrainState.create(model=_predictor(hidden), tx=optax.adam(learning_rate),
                                  key=key, example_input=train["inputs"][:1])
        return cost_report(step, state, train, num_steps=num_steps, repeats=repeats, warmup=1)
    debias = fairness.make_adversarial_debiasing_step(
        _predictor(hidden), MLP((16,), out_features=data.num_groups),
        predictor_tx=optax.adam(learning_rate), adversary_tx=optax.adam(learning_rate),
        num_groups=data.num_groups, alpha=alpha, criterion=criterion)
    state = debias.init(key, train["inputs"][:1])
    return cost_report(debias.step, state, train, num_steps=num_steps, repeats=repeats,
                       warmup=1,
                       params=(state.predictor.params, state.adversary.params),
                       opt_state=(state.predictor.opt_state, state.adversary.opt_state))


# --- evaluation ---------------------------------------------------------------------------


def evaluate(log_odds: np.ndarray, data: FairData) -> dict[str, float]:
    """Test metrics of one model's log-odds ``[n_test]`` (decision: log-odds > 0)."""
    test, g = data.splits["test"], data.num_groups
    y_pred = (np.asarray(log_odds) > 0).astype(np.int32)
    out = {
        "accuracy": float(np.mean(y_pred == test["labels"])),
        "dp_difference": float(fairness.demographic_parity_difference(
            y_pred, test["groups"], g)),
        "eo_difference": float(fairness.equalized_odds_difference(
            test["labels"], y_pred, test["groups"], g)),
    }
    if data.unbiased is not None:
        out["unbiased_accuracy"] = float(np.mean(y_pred == data.unbiased))
    return out


def fairlearn_check(log_odds: np.ndarray, data: FairData) -> dict[str, float]:
    """The same model's accuracy and gaps from ``fairlearn.metrics`` / scikit-learn,
    and the largest absolute disagreement with :func:`evaluate`."""
    from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
    from sklearn.metrics import accuracy_score

    test = data.splits["test"]
    y_pred = (np.asarray(log_odds) > 0).astype(np.int32)
    ref = {
        "accuracy": accuracy_score(test["labels"], y_pred),
        "dp_difference": demographic_parity_difference(
            test["labels"], y_pred, sensitive_features=test["groups"]),
        "eo_difference": equalized_odds_difference(
            test["labels"], y_pred, sensitive_features=test["groups"]),
    }
    ours = evaluate(log_odds, data)
    out = {f"fairlearn_{k}": float(v) for k, v in ref.items()}
    out["fairlearn_max_abs_difference"] = float(max(abs(ours[k] - ref[k]) for k in ref))
    return out


def pareto_front(unfairness: Sequence[float], accuracy: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower unfairness,
    higher accuracy), sorted by unfairness."""
    points = list(zip(unfairness, accuracy, strict=True))
    front = [i for i, (u, a) in enumerate(points)
             if not any((u2 <= u and a2 >= a) and (u2 < u or a2 > a) for u2, a2 in points)]
    return sorted(front, key=lambda i: points[i])


# --- the experiment -----------------------------------------------------------------------


def _key(value: float) -> str:
    return f"{value:g}".replace(".", "p")


def run(
    workdir: str | Path,
    data: FairData | None = None,
    *,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    penalties: Sequence[str] = PENALTIES,
    seeds: Sequence[int] = (0, 1, 2),
    num_steps: int = 300,
    learning_rate: float = 0.02,
    hidden: int = 32,
    verbose: bool = True,
    cost_repeats: int = 5,
) -> dict[str, Any]:
    """Runs the sweeps; writes ``metrics.json``, ``results.md`` and ``tradeoff.png``.

    ``cost_repeats``: timed calls of the compute-cost reports of one training
    step (:func:`training_cost`: the first penalty's, ``cost_*``, and
    adversarial debiasing's, ``adversarial_cost_*``; printed when
    ``verbose``); 0 skips them.

    ``weights`` are the penalty strengths ``lambda`` swept for each of
    ``penalties`` (``"demographic_parity"``, ``"equalized_odds"``); ``alphas``
    the adversary weights (empty: no adversarial debiasing).

    Returns ``{"metrics", "table", "points", "log_odds"}``; ``points`` is a list
    of dicts (``method``, ``strength``, ``name`` and the metrics of
    :func:`evaluate`, means over seeds); ``log_odds[name]`` is that
    configuration's test log-odds ``[seeds, n_test]``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = data or planted_data()
    start = time.perf_counter()
    common = dict(seeds=seeds, num_steps=num_steps, learning_rate=learning_rate, hidden=hidden)
    runs: list[tuple[str, float, np.ndarray]] = []
    for penalty in penalties:
        if penalty not in PENALTIES:
            raise ValueError(f"run expected penalties among {PENALTIES}, got {penalty!r}")
        method = {"demographic_parity": "dp_penalty", "equalized_odds": "eo_penalty"}[penalty]
        log_odds = train_penalized(data, penalty=penalty, weights=weights, **common)
        runs += [(method, w, lo) for w, lo in zip(weights, log_odds, strict=True)]
        if verbose:
            print(f"{method}: lambda = {', '.join(f'{w:g}' for w in weights)} done", flush=True)
    for alpha in alphas:
        runs.append(("adversarial", alpha, train_adversarial(data, alpha=alpha, **common)))
        if verbose:
            print(f"adversarial alpha={alpha:g} done", flush=True)

    points, metrics = [], {"num_train": len(data.splits["train"]["labels"]),
                           "num_test": len(data.splits["test"]["labels"]),
                           "num_groups": data.num_groups, "num_seeds": len(seeds)}
    for method, strength, log_odds in runs:
        per_seed = [evaluate(lo, data) for lo in log_odds]
        mean = {k: float(np.mean([m[k] for m in per_seed])) for k in per_seed[0]}
        name = f"{method}_{_key(strength)}"
        points.append({"method": method, "strength": strength, "name": name, **mean})
        metrics.update({f"{name}_{k}": v for k, v in mean.items()})
    test = data.splits["test"]
    metrics["test_base_rate_gap"] = float(np.ptp([test["labels"][test["groups"] == g].mean()
                                                  for g in range(data.num_groups)
                                                  if (test["groups"] == g).any()]))
    # One point, one seed: every number again from fairlearn / scikit-learn.
    check_method, check_strength, check_log_odds = next(
        (r for r in runs if r[0] == "dp_penalty" and r[1] > 0), runs[0])
    metrics["fairlearn_checked"] = f"{check_method}_{_key(check_strength)}_seed{seeds[0]}"
    metrics.update(fairlearn_check(check_log_odds[0], data))
    metrics["train_time_s"] = round(time.perf_counter() - start, 1)

    if cost_repeats > 0:
        # The main model: the predictor with the first penalty (at the largest
        # lambda; the weight changes no shape, so not the cost either).
        costs: dict[str, tuple[str, dict[str, Any]]] = {}
        if penalties:
            costs[""] = (f"the {penalties[0].replace('_', ' ')} penalty",
                         dict(penalty=penalties[0], weight=max(weights, default=0.0)))
        if alphas:
            costs["adversarial_"] = (f"adversarial debiasing (alpha={alphas[0]:g})",
                                     dict(penalty=None, alpha=alphas[0]))
        for prefix, (what, kwargs) in costs.items():
            report = training_cost(data, seed=seeds[0], num_steps=num_steps,
                                   learning_rate=learning_rate, hidden=hidden,
                                   repeats=cost_repeats, **kwargs)
            if verbose:
                print(f"\ntraining with {what}, one full-batch step "
                      f"({metrics['num_train']} examples; energy: {num_steps} steps, one "
                      f"model):\n{format_cost(report)}", flush=True)
            metrics |= {f"{prefix}{k}": v for k, v in report.items()}

    table = format_table(points, data, metrics)
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (workdir / "results.md").write_text(table + "\n")
    plot(points, workdir / "tradeoff.png", title=data.name)
    if verbose:
        print("\n" + table)
    log_odds = {f"{method}_{_key(strength)}": lo for method, strength, lo in runs}
    return {"metrics": metrics, "table": table, "points": points, "log_odds": log_odds}


def format_table(points: Sequence[dict[str, Any]], data: FairData,
                 metrics: dict[str, Any]) -> str:
    """A markdown table, one row per trained configuration (means over seeds)."""
    unbiased = data.unbiased is not None
    lines = [
        f"Fairness trade-off on {data.name}: test split (n={metrics['num_test']}), mean over "
        f"{metrics['num_seeds']} seeds; test base-rate gap {metrics['test_base_rate_gap']:.3f}",
        "",
        "| method | strength | accuracy | DP difference | EO difference |"
        + (" unbiased accuracy |" if unbiased else ""),
        "|---|---|---|---|---|" + ("---|" if unbiased else ""),
    ]
    for p in points:
        label = "λ" if p["method"].endswith("penalty") else "α"
        lines.append(f"| {p['method']} | {label}={p['strength']:g} | {p['accuracy']:.3f} | "
                     f"{p['dp_difference']:.3f} | {p['eo_difference']:.3f} |"
                     + (f" {p['unbiased_accuracy']:.3f} |" if unbiased else ""))
    lines += ["", f"fairlearn cross-check ({metrics['fairlearn_checked']}): accuracy "
                  f"{metrics['fairlearn_accuracy']:.4f}, DP difference "
                  f"{metrics['fairlearn_dp_difference']:.4f}, EO difference "
                  f"{metrics['fairlearn_eo_difference']:.4f}; largest disagreement with nnlib "
                  f"{metrics['fairlearn_max_abs_difference']:.1e}"]
    return "\n".join(lines)


_STYLE = {"dp_penalty": ("C0", "o", "DP penalty (λ sweep)"),
          "eo_penalty": ("C1", "s", "EO penalty (λ sweep)"),
          "adversarial": ("C2", "^", "adversarial debiasing (α)")}


def plot(points: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> None:
    """Accuracy against the DP and the EO difference (and, when known, unbiased
    accuracy against the DP difference), with each panel's Pareto front."""
    # A bare Figure, not pyplot: no backend switch, so a notebook's inline
    # plotting keeps working after this is called.
    from matplotlib.figure import Figure

    panels = [("dp_difference", "accuracy"), ("eo_difference", "accuracy")]
    if "unbiased_accuracy" in points[0]:
        panels.append(("dp_difference", "unbiased_accuracy"))
    fig = Figure(figsize=(5.2 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (x_key, y_key) in zip(axes, panels, strict=True):
        for method, (color, marker, label) in _STYLE.items():
            mine = [p for p in points if p["method"] == method]
            if not mine:
                continue
            ax.plot([p[x_key] for p in mine], [p[y_key] for p in mine], marker=marker,
                    color=color, label=label, lw=1, alpha=0.85)
            if method != "eo_penalty":
                for p in mine:
                    ax.annotate(f"{p['strength']:g}", (p[x_key], p[y_key]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points", color=color)
        front = pareto_front([p[x_key] for p in points], [p[y_key] for p in points])
        ax.step([points[i][x_key] for i in front], [points[i][y_key] for i in front],
                where="post", color="k", ls="--", lw=1, label="Pareto front")
        base = next((p for p in points if p["strength"] == 0), None)
        if base is not None:
            ax.plot(base[x_key], base[y_key], "k*", ms=12, label="unconstrained (λ=0)")
        ax.set(xlabel=x_key.replace("_", " ") + " (lower is fairer)",
               ylabel=y_key.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "fairness_tradeoff"))
    parser.add_argument("--n", type=int, default=10000, help="planted-bias examples")
    parser.add_argument("--bias", type=float, default=1.0,
                        help="planted bias: extra qualification asked of group 1")
    parser.add_argument("--csv", help="a local CSV with a sensitive attribute (e.g. UCI Adult)")
    parser.add_argument("--label", help="--csv: the binary target column")
    parser.add_argument("--sensitive", help="--csv: the sensitive attribute column")
    parser.add_argument("--positive", help="--csv: the positive label value")
    parser.add_argument("--exclude", nargs="*", default=[], help="--csv: columns to ignore")
    parser.add_argument("--weights", type=float, nargs="+", default=list(DEFAULT_WEIGHTS))
    parser.add_argument("--alphas", type=float, nargs="*", default=list(DEFAULT_ALPHAS))
    parser.add_argument("--penalties", nargs="+", choices=PENALTIES, default=list(PENALTIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="data sample and split")
    args = parser.parse_args(argv)
    if args.csv:
        if not (args.label and args.sensitive):
            parser.error("--csv needs --label and --sensitive (column names)")
        data = load_csv(args.csv, label=args.label, sensitive=args.sensitive,
                        positive=args.positive, exclude=args.exclude, seed=args.seed)
    else:
        data = planted_data(args.n, bias_strength=args.bias, seed=args.seed)
    if any(not (math.isfinite(w) and w >= 0) for w in args.weights + args.alphas):
        parser.error("--weights and --alphas must be finite and >= 0")
    return run(args.workdir, data, weights=args.weights, alphas=args.alphas,
               penalties=args.penalties, seeds=args.seeds, num_steps=args.steps)


if __name__ == "__main__":
    main()
