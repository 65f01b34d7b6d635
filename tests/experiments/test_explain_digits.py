"""Smoke test of experiments/explain_digits.py at tiny size, plus its pieces
against independent truths.

* The deletion / insertion curves at their endpoints are the model's
  probability of the explained class on the clean image and on the all-black
  image, recomputed here with ``model.apply`` and a numpy softmax.
* The area under a straight line from 1 to 0 is 1/2.
* ``pixel_order`` sorts by attribution, largest first, and breaks ties at
  random (a constant map gives a permutation that is not the index order).
* The run itself: every output file, finite metrics in their ranges, IG
  within a few percent of completeness at 64 steps, integrated gradients
  more faithful than a random pixel order (deletion and insertion), and
  saliency failing to survive weight randomization (Adebayo et al. 2018
  find gradients do change), while gradient x input keeps the shape of the
  digit (its zeros on the black background do not move).
* The compute-cost report of one training step lands in metrics.json, with
  the CNN's parameter count (explain_text has its own test file).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.tree_util import Partial

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.explain_digits import (  # noqa: E402
    ExplainConfig,
    area_under_curve,
    grid_indices,
    main,
    perturbation_curves,
    pixel_order,
    run,
)

# Three methods keep the compile count (and the test) small; the rest share
# the same code path.
CONFIG = dataclasses.replace(ExplainConfig.tiny(), num_steps=120, num_explain=16,
                             methods=("saliency", "gradient_x_input", "integrated_gradients"))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("explain_digits")
    metrics, artifacts = run(CONFIG, workdir)
    return workdir, metrics, artifacts


def test_writes_every_output(result):
    workdir, metrics, _ = result
    for name in ("metrics.json", "results.md", "attributions.png", "faithfulness.png",
                 "sanity_check.png", "config.json"):
        assert (workdir / name).stat().st_size > 0, name
    saved = json.loads((workdir / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    table = (workdir / "results.md").read_text()
    assert "integrated gradients" in table and "random order" in table
    assert saved["cost_flops_per_step"] > 0
    assert saved["cost_energy_kwh"] > 0 and saved["cost_co2_g"] > 0
    assert saved["cost_num_params"] == metrics["num_params"]
    assert saved["cost_num_steps"] == CONFIG.num_steps
    assert "Training cost: one step" in table


def test_metrics_are_sane(result):
    _, metrics, artifacts = result
    assert all(np.isfinite(v) for v in metrics.values() if not isinstance(v, str))
    assert metrics["test_accuracy"] > 0.7
    for kind in ("deletion", "insertion"):
        for name in (*CONFIG.methods, "random"):
            assert 0.0 <= metrics[f"{kind}_auc_{name}"] <= 1.0
    # Completeness, recomputed: sum of IG vs the logit difference from model.apply.
    model, params, x = artifacts["model"], artifacts["params"], artifacts["x"]
    rows, t = np.arange(len(x)), artifacts["predicted"]
    logit = np.asarray(model.apply({"params": params}, x), np.float64)[rows, t]
    black = np.asarray(model.apply({"params": params}, np.zeros_like(x)), np.float64)[rows, t]
    total = artifacts["maps"]["integrated_gradients"].reshape(len(x), -1).sum(1)
    gap = np.abs(total - (logit - black)) / np.abs(logit - black)
    assert metrics["ig_completeness_gap_max"] == pytest.approx(gap.max(), rel=1e-3, abs=1e-5)
    # 64 path points on a ReLU net: the typical digit within 1% (the full run uses 256).
    assert np.median(gap) < 0.01
    # Faithfulness: the most-attributed pixels matter more than random ones.
    assert metrics["deletion_auc_integrated_gradients"] < metrics["deletion_auc_random"] - 0.1
    assert metrics["insertion_auc_integrated_gradients"] > metrics["insertion_auc_random"] + 0.1
    # Sanity check: saliency depends on the weights; gradient x input keeps the digit.
    assert metrics["randomization_rho_saliency_all_layers"] < 0.5
    assert metrics["randomization_rho_gradient_x_input_all_layers"] > 0.5
    assert artifacts["stages"] == ("head/output", "head/dense_0", "block_1/conv",
                                   "block_0/conv")
    for name in CONFIG.methods:
        assert artifacts["maps"][name].shape == (CONFIG.num_explain, 8, 8)


def test_curve_endpoints_are_clean_and_black_image_probabilities(result):
    _, _, artifacts = result
    model, params = artifacts["model"], artifacts["params"]
    x, target = artifacts["x"][:5], artifacts["predicted"][:5]
    rows = np.arange(5)

    def probs(images):
        logits = np.asarray(model.apply({"params": params}, images), np.float64)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True))[rows, target]

    order = pixel_order(artifacts["maps"]["saliency"][:5], np.random.default_rng(0))
    f = Partial(model.apply, {"params": params})
    deletion = perturbation_curves(f, x, target, order, pixels_per_step=4)
    insertion = perturbation_curves(f, x, target, order, pixels_per_step=4, insertion=True)
    assert deletion.shape == insertion.shape == (5, 17)
    np.testing.assert_allclose(deletion[:, 0], probs(x), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(deletion[:, -1], probs(np.zeros_like(x)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(insertion[:, 0], deletion[:, -1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(insertion[:, -1], deletion[:, 0], rtol=1e-5, atol=1e-7)
    # Deleting the first k pixels by hand.
    hidden = x.reshape(5, 64).copy()
    hidden[rows[:, None], order[:, :12]] = 0.0
    np.testing.assert_allclose(deletion[:, 3], probs(hidden.reshape(x.shape)), rtol=1e-4,
                               atol=1e-6)


def test_pixel_order_and_area():
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(3, 4, 4))
    order = pixel_order(maps, rng)
    np.testing.assert_array_equal(order, np.argsort(-maps.reshape(3, 16), axis=1))
    flat = pixel_order(np.zeros((1, 8, 8)), np.random.default_rng(2))[0]
    assert sorted(flat) == list(range(64)) and list(flat) != list(range(64))
    assert area_under_curve(np.linspace(1.0, 0.0, 9)[None]) == pytest.approx(0.5)
    np.testing.assert_array_equal(grid_indices(np.array([3, 1, 3, 0, 1])), [3, 1, 0])


def test_unknown_method_and_main_flags(tmp_path):
    with pytest.raises(ValueError, match="unknown attribution methods"):
        run(dataclasses.replace(CONFIG, methods=("lime",)), None)
    with pytest.raises(SystemExit):
        main(["--size=huge", f"--workdir={tmp_path}"])

