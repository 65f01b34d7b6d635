"""Smoke run of experiments/recommendation.py at tiny size: files written, numbers sane."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.recommendation import CURVE_KS, get_config, run  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = get_config("tiny")
    config.methods = ("popularity", "mf_bpr", "two_tower", "oracle")
    workdir = tmp_path_factory.mktemp("recommendation")
    return config, workdir, run(config, workdir, verbose=False)


def test_files_and_keys(tiny_run):
    config, workdir, result = tiny_run
    assert {p.name for p in workdir.iterdir()} >= {"metrics.json", "results.md", "config.json",
                                                  "recommendation.png"}
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics == result["metrics"]
    for method in config.methods:
        for key in ("test_recall@10", "test_recall@20", "test_ndcg@10", "val_recall@20"):
            assert 0.0 <= metrics[f"{method}_{key}"] <= 1.0
        assert f"| {method} |" in (workdir / "results.md").read_text()
    # compute cost: the two-tower's step as the headline, every learned method's own
    assert metrics["cost_method"] == "two_tower" and metrics["cost_flops_per_step"] > 0
    assert metrics["mf_bpr_cost_flops_per_step"] > 0 and "popularity_cost_flops_per_step" not in metrics
    assert json.loads((workdir / "config.json").read_text())["steps"] == config.steps


def test_values_are_sane(tiny_run):
    config, _, result = tiny_run
    metrics, problem = result["metrics"], result["problem"]
    # MF: a user and an item table of dim entries, plus one bias per item
    assert metrics["mf_bpr_num_params"] == (config.num_users + config.num_items) * config.dim \
        + config.num_items
    for method in config.methods:
        curve = [metrics[f"{method}_test_recall@{k}"] for k in CURVE_KS if k <= config.num_items]
        assert np.all(np.diff(curve) >= 0), (method, curve)  # recall@k grows with k
    assert metrics["oracle_test_recall@10"] > metrics["popularity_test_recall@10"]
    model = result["models"]["mf_bpr"]
    assert model.best_step in model.val_steps and model.val_steps[-1] == config.steps
    assert model.scores.shape == (config.num_users, config.num_items)
    # test ranking masks train + val items, validation ranking masks train items
    per_user = config.interactions_per_user
    np.testing.assert_array_equal(problem.test_seen.sum(1), per_user - config.num_test)
    np.testing.assert_array_equal(problem.train_seen.sum(1),
                                  per_user - config.num_test - config.num_val)
    assert not np.any(problem.test_seen & problem.test_relevant)


def test_unknown_method_is_rejected():
    config = get_config("tiny")
    config.methods = ("popularity", "svd")
    with pytest.raises(ValueError, match="run expected config.methods among"):
        run(config, None, verbose=False)
