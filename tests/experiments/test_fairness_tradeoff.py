"""experiments/fairness_tradeoff.py at tiny size: files, sane numbers, fairlearn, CSV input,
and the compute-cost reports (parameter counts and matmul FLOPs in closed form)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments import fairness_tradeoff as ft  # noqa: E402

pytest.importorskip("fairlearn")


def test_tiny_sweep_writes_files_and_the_penalty_narrows_the_gap(tmp_path):
    data = ft.planted_data(1000, bias_strength=1.5, seed=0)
    out = ft.run(tmp_path, data, weights=(0.0, 30.0), alphas=(1.0,),
                 penalties=("demographic_parity",), seeds=(0,), num_steps=150, verbose=False)
    for name in ("metrics.json", "results.md", "tradeoff.png"):
        assert (tmp_path / name).stat().st_size > 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == out["metrics"]
    for name in ("dp_penalty_0", "dp_penalty_30", "adversarial_1"):
        for key in ("accuracy", "dp_difference", "eo_difference", "unbiased_accuracy"):
            assert 0.0 <= metrics[f"{name}_{key}"] <= 1.0, (name, key)
        assert metrics[f"{name}_accuracy"] > 0.6  # learns the task, not a constant
    # The DP penalty and the adversary shrink the DP gap.
    assert "eo_penalty_0_accuracy" not in metrics
    assert metrics["adversarial_1_dp_difference"] < metrics["dp_penalty_0_dp_difference"]
    assert metrics["dp_penalty_0_dp_difference"] > 0.2
    assert metrics["dp_penalty_30_dp_difference"] < 0.5 * metrics["dp_penalty_0_dp_difference"]
    # The numbers agree with fairlearn on the checked point.
    assert metrics["fairlearn_checked"] == "dp_penalty_30_seed0"
    assert metrics["fairlearn_max_abs_difference"] < 1e-6
    assert metrics["dp_penalty_30_dp_difference"] == pytest.approx(
        metrics["fairlearn_dp_difference"], abs=1e-6)
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") == 1 + 2 + 1  # header, a sweep of two, one adversary
    # The cost of one full-batch training step: the penalized predictor, the debiasing pair.
    n, d = len(data.splits["train"]["labels"]), data.splits["train"]["inputs"].shape[1]
    predictor = d * 32 + 32 + 32 + 1  # MLP d -> 32 -> 1
    adversary = 1 * 16 + 16 + 16 * 2 + 2  # MLP (one DP feature: the output) -> 16 -> 2 groups
    assert metrics["cost_num_params"] == predictor
    assert metrics["adversarial_cost_num_params"] == predictor + adversary
    for prefix in ("", "adversarial_"):
        assert metrics[f"{prefix}cost_flops_per_step"] > 0
        assert metrics[f"{prefix}cost_energy_kwh"] > 0 and metrics[f"{prefix}cost_co2_g"] > 0
        assert metrics[f"{prefix}cost_num_steps"] == 150
    # The predictor's matmuls: forward 2*n*(d*32 + 32), the weight gradients as much
    # again, the hidden layer's input gradient 2*n*32 (the data's needs none).
    matmuls = 2 * n * (d * 32 + 32) * 2 + 2 * n * 32
    assert matmuls <= metrics["cost_flops_per_step"] <= 3 * matmuls
    assert metrics["adversarial_cost_flops_per_step"] > metrics["cost_flops_per_step"]


def test_evaluate_matches_numpy_by_hand():
    rng = np.random.default_rng(0)
    n = 200
    test = {"inputs": np.zeros((n, 1), np.float32),
            "labels": rng.integers(0, 2, n).astype(np.int32),
            "groups": rng.integers(0, 2, n).astype(np.int32)}
    data = ft.FairData("t", {"train": test, "val": test, "test": test}, 2, ("a", "b"))
    log_odds = rng.normal(size=n)
    pred = log_odds > 0
    m = ft.evaluate(log_odds, data)
    g, y = test["groups"], test["labels"]
    sel = [pred[g == k].mean() for k in (0, 1)]
    tpr = [pred[(g == k) & (y == 1)].mean() for k in (0, 1)]
    fpr = [pred[(g == k) & (y == 0)].mean() for k in (0, 1)]
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert m["dp_difference"] == pytest.approx(abs(sel[0] - sel[1]), abs=1e-6)
    assert m["eo_difference"] == pytest.approx(
        max(abs(tpr[0] - tpr[1]), abs(fpr[0] - fpr[1])), abs=1e-6)


def test_pareto_front_on_a_hand_example():
    # (unfairness, accuracy): point 2 is dominated by 1, point 4 by 3.
    unfair = [0.05, 0.10, 0.12, 0.20, 0.25]
    acc = [0.70, 0.80, 0.78, 0.85, 0.84]
    assert ft.pareto_front(unfair, acc) == [0, 1, 3]


def _write_csv(path: Path, n: int = 240, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    sex = rng.choice(["Female", "Male"], n)
    age = rng.integers(18, 70, n)
    job = rng.choice(["clerk", "driver", "?"], n)
    score = rng.normal(size=n) + (sex == "Male")
    income = np.where(score + 0.3 * rng.normal(size=n) > 0.5, ">50K", "<=50K")
    lines = ["age, job, sex, score, income"]
    for i in range(n):
        shown_age = "?" if i % 37 == 0 else str(age[i])  # a few missing numbers
        lines.append(f"{shown_age}, {job[i]}, {sex[i]}, {score[i]:.4f}, {income[i]}"
                     + ("." if i % 2 else ""))  # adult.test-style trailing dots
    path.write_text("\n".join(lines) + "\n")



def test_csv_loader_imputes_from_the_training_rows_only(tmp_path):
    """A missing number becomes the median of the *training* rows' values: here
    every val/test row is 1000, which would pull the median of all rows up."""
    from nnlib.data import split_indices

    n = 200
    income = np.where(np.arange(n) % 3 == 0, ">50K", "<=50K")
    train = np.zeros(n, bool)
    train[split_indices(n, seed=0, stratify=(income == ">50K").astype(np.int32))["train"]] = True
    age = np.where(train, 20 + np.arange(n) % 11, 1000).astype(float)
    missing = (np.arange(n) % 9 == 0) & train
    lines = ["age, sex, income"] + [
        f"{'?' if missing[i] else f'{age[i]:g}'}, {'FM'[i % 2]}, {income[i]}" for i in range(n)]
    path = tmp_path / "ages.csv"
    path.write_text("\n".join(lines) + "\n")
    z = ft.load_csv(path, label="income", sensitive="sex").splits["train"]["inputs"][:, 0]
    known, gaps = ~missing[train], missing[train]
    slope, intercept = np.polyfit(age[train][known], z[known], 1)  # the standardization
    imputed = (z[gaps] - intercept) / slope
    expected = np.median(age[train & ~missing])
    assert expected < np.median(age[~missing])  # the test would have moved it
    np.testing.assert_allclose(imputed, expected, atol=1e-3)

def test_csv_loader_encodes_columns(tmp_path):
    path = tmp_path / "people.csv"
    _write_csv(path)
    data = ft.load_csv(path, label="income", sensitive="sex")
    assert data.num_groups == 2 and data.group_names == ("Female", "Male")
    train = data.splits["train"]
    # age (numeric, median-imputed) + job one-hot (?, clerk, driver) + score; sex excluded.
    assert train["inputs"].shape[1] == 1 + 3 + 1
    assert np.isfinite(train["inputs"]).all()
    n = sum(len(s["labels"]) for s in data.splits.values())
    assert n == 240
    rows = (path.read_text().splitlines()[1:])
    positives = sum(r.rstrip(".").endswith(">50K") for r in rows)
    assert sum(int(s["labels"].sum()) for s in data.splits.values()) == positives
    males = sum(", Male," in r for r in rows)
    assert sum(int(s["groups"].sum()) for s in data.splits.values()) == males
    assert data.unbiased is None
    with pytest.raises(ValueError, match=r"load_csv: .* has no column 'gender' \(given as "
                       r"--sensitive\)"):
        ft.load_csv(path, label="income", sensitive="gender")
    with pytest.raises(ValueError, match=r"load_csv: label column 'job' has 3 distinct values"):
        ft.load_csv(path, label="job", sensitive="sex")


def test_main_runs_on_a_user_csv(tmp_path):
    path = tmp_path / "people.csv"
    _write_csv(path)
    out = ft.main(["--workdir", str(tmp_path / "run"), "--csv", str(path), "--label", "income",
                   "--sensitive", "sex", "--weights", "0", "10", "--alphas", "--penalties", "equalized_odds",
                   "--seeds", "0",
                   "--steps", "60"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_groups"] == 2 and metrics["num_seeds"] == 1
    assert "eo_penalty_10_unbiased_accuracy" not in metrics  # unknown for real data
    assert metrics["fairlearn_checked"] == "eo_penalty_0_seed0"  # no DP point: the first
    assert metrics["fairlearn_max_abs_difference"] < 1e-6
    assert 0.5 < metrics["eo_penalty_0_accuracy"] <= 1.0
    assert metrics["cost_flops_per_step"] > 0 and metrics["cost_energy_kwh"] > 0
    assert "adversarial_cost_flops_per_step" not in metrics  # no alphas, no adversary
    assert (tmp_path / "run" / "tradeoff.png").is_file()
    assert "people.csv: income by sex" in out["table"]
