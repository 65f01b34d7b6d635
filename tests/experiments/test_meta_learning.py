"""Smoke run of experiments/meta_learning.py at tiny size, with its numbers rechecked.

* Every output file and metric key is written; metrics.json holds what
  ``run`` returned; the tables name every method.
* The pipeline is recomputed independently where that is cheap: the
  raw-pixel nearest-class-mean accuracy in numpy on the same test episodes,
  and the unadapted (step 0) query MSE of the MAML initialization in numpy
  from the same held-out tasks.
* The baseline's tuned step is the argmin of the recorded validation errors;
  ``pretrained`` and ``pretrained_tuned`` share their initialization, so their
  step-0 errors are equal.
* The compute-cost report: the sinusoid network's parameter count
  (1-40-40-1: 1761), and first-order MAML costing fewer FLOPs than second-order.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.meta_learning import (  # noqa: E402
    DIGITS_METHODS,
    SINUSOID_METHODS,
    digits_samplers,
    get_config,
    main,
    run,
)
from nnlib.meta import sample_sinusoid_tasks  # noqa: E402

CONFIG = dataclasses.replace(get_config("tiny"), eval_inner_steps=2, eval_tasks=50, eval_query=20,
                             eval_episodes=40, cost_repeats=1)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("meta_learning")
    metrics, artifacts = run(CONFIG, workdir)
    return workdir, metrics, artifacts


def test_writes_every_output_and_key(result):
    workdir, metrics, _ = result
    for name in ("metrics.json", "results.md", "meta_learning.png", "config.json"):
        assert (workdir / name).stat().st_size > 0, name
    saved = json.loads((workdir / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    table = (workdir / "results.md").read_text()
    for m in (*SINUSOID_METHODS, *DIGITS_METHODS):
        assert f" {m} " in table, m
    assert "Li et al. 2017" in table and "unverified" in table
    s = CONFIG.eval_inner_steps
    for m in SINUSOID_METHODS:
        for t in (0, 1, s):
            assert np.isfinite(metrics[f"sinusoid_k5_{m}_mse_step{t}_mean"])
            assert metrics[f"sinusoid_k5_{m}_mse_step{t}_ci95"] > 0
    for m in DIGITS_METHODS:
        for split in ("", "_seen"):
            assert 0.0 <= metrics[f"digits_1shot_{m}{split}_accuracy_mean"] <= 1.0


def test_pixel_baseline_matches_numpy_on_the_same_episodes(result):
    _, metrics, _ = result
    test = digits_samplers(1, CONFIG, CONFIG.test_ways).test
    episodes = test(jax.random.fold_in(jax.random.key(CONFIG.seed), 5), CONFIG.eval_episodes)
    (xs, ys), (xq, yq) = jax.tree.map(np.asarray, (episodes.support, episodes.query))
    correct = []
    for e in range(len(xs)):
        s = xs[e].reshape(len(xs[e]), -1).astype(np.float64)
        q = xq[e].reshape(len(xq[e]), -1).astype(np.float64)
        means = np.stack([s[ys[e] == c].mean(0) for c in range(CONFIG.test_ways)])
        dist = ((q[:, None, :] - means[None]) ** 2).sum(-1)
        correct.append(np.mean(dist.argmin(1) == yq[e]))
    assert metrics["digits_1shot_pixels_accuracy_mean"] == pytest.approx(np.mean(correct),
                                                                          abs=1e-6)
    assert metrics["digits_1shot_pixels_accuracy_mean"] > 0.6  # far above chance (1/3)
    assert metrics["digits_1shot_protonet_accuracy_mean"] > 0.45


def test_step_zero_error_matches_numpy_and_tuning_is_an_argmin(result):
    _, metrics, artifacts = result
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), artifacts["sinusoid"][(5, "maml")])
    tasks = sample_sinusoid_tasks(jax.random.fold_in(jax.random.key(CONFIG.seed), 2),
                                  CONFIG.eval_tasks, num_support=5, num_query=CONFIG.eval_query)
    x, y = (np.asarray(a, np.float64) for a in tasks.query)
    h = x
    for i in range(len(CONFIG.hidden_sizes) + 1):
        layer = params[f"dense_{i}"] if f"dense_{i}" in params else params["output"]
        h = h @ layer["kernel"] + layer["bias"]
        if i < len(CONFIG.hidden_sizes):
            h = np.maximum(h, 0.0)
    per_task = ((h - y) ** 2).mean(axis=(1, 2))
    assert metrics["sinusoid_k5_maml_mse_step0_mean"] == pytest.approx(per_task.mean(), rel=1e-4)
    assert (metrics["sinusoid_k5_pretrained_mse_step0_mean"]
            == metrics["sinusoid_k5_pretrained_tuned_mse_step0_mean"])
    scores = {lr: metrics[f"sinusoid_k5_pretrained_tuned_val_mse_lr{lr:g}"]
              for lr in CONFIG.baseline_lrs}
    assert metrics["sinusoid_k5_pretrained_tuned_lr"] == min(scores, key=scores.get)
    assert metrics["digits_1shot_scratch_lr"] in CONFIG.scratch_lrs
    assert 1 <= metrics["digits_1shot_scratch_test_steps"] <= CONFIG.scratch_steps
    assert 1 <= metrics["digits_1shot_maml_test_steps"] <= CONFIG.digits_test_inner_steps
    steps = int(metrics["digits_1shot_maml_test_steps"])
    assert (metrics["digits_1shot_maml_accuracy_mean"]
            == pytest.approx(metrics[f"digits_1shot_maml_accuracy_step{steps}"]))


def test_reports_the_cost_of_each_meta_step(result):
    _, metrics, _ = result
    assert metrics["cost_num_params"] == 1 * 40 + 40 + 40 * 40 + 40 + 40 * 1 + 1
    assert metrics["cost_num_steps"] == CONFIG.sinusoid_steps
    for prefix in ("", "fomaml_", "digits_protonet_", "digits_maml_"):
        assert metrics[f"{prefix}cost_flops_per_step"] > 0
        assert metrics[f"{prefix}cost_energy_kwh"] > 0
    # No Hessian-vector products: first-order MAML does strictly less work.
    assert 0 < metrics["fomaml_flops_ratio"] < 1


def test_rejects_bad_flags(tmp_path):
    with pytest.raises(SystemExit):
        main(["--size=huge", f"--workdir={tmp_path}"])
    with pytest.raises(ValueError, match="size 'full' or 'tiny'"):
        get_config("huge")
