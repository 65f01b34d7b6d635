"""Smoke test of experiments/robustness.py at tiny size, with the attacks'
required properties recomputed independently.

* Each adversarial batch is re-examined here in numpy: perturbations inside
  the epsilon-ball (L-infinity and L2 norms computed by hand), pixels in
  [0, 1], robust accuracy and cross-entropy recomputed from ``model.apply``
  logits with a numpy log-softmax, and the loss higher than on clean inputs.
* epsilon = 0 is the identity attack: its accuracy is the clean accuracy.
* The run: every output file, every reported check passed, accuracy falling
  with epsilon, and the adversarially trained model more robust than the
  plain one at its training radius (Madry et al. 2018).
* The compute-cost report of a plain and an adversarial training step lands
  in metrics.json; the parameter count matches the model's, and one PGD
  iteration (a forward and an input-gradient pass) costs 2-4 forward passes,
  each forward counted here separately by XLA.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.tree_util import Partial

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.robustness import RobustnessConfig, evaluate_attack, main, run  # noqa: E402
from nnlib.compress import flops  # noqa: E402
from nnlib.data import load_digits  # noqa: E402

CONFIG = dataclasses.replace(RobustnessConfig.tiny(), num_steps=120, num_test=96)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("robustness")
    data = load_digits()
    metrics, models = run(CONFIG, workdir, data)
    return workdir, metrics, models, data


def test_writes_every_output_and_passes_its_checks(result):
    workdir, metrics, _, _ = result
    for name in ("metrics.json", "results.md", "robust_accuracy.png", "config.json"):
        assert (workdir / name).stat().st_size > 0, name
    assert json.loads((workdir / "metrics.json").read_text()) == pytest.approx(metrics)
    assert "| PGD L∞ | 0.1 |" in (workdir / "results.md").read_text()
    checks = {k: v for k, v in metrics.items() if "_check_" in k}
    assert len(checks) == 14 and all(v == 1.0 for v in checks.values()), checks


def test_reports_the_cost_of_plain_and_adversarial_training(result):
    workdir, metrics, models, data = result
    saved = json.loads((workdir / "metrics.json").read_text())
    for prefix in ("", "adv_"):
        assert saved[f"{prefix}cost_flops_per_step"] > 0
        assert saved[f"{prefix}cost_energy_kwh"] > 0 and saved[f"{prefix}cost_co2_g"] > 0
        assert saved[f"{prefix}cost_num_params"] == metrics["num_params"]
        assert saved[f"{prefix}cost_num_steps"] == CONFIG.num_steps
    # One PGD iteration on the attacked batch vs a forward pass on it, counted apart.
    model, params = models["plain"]
    x = data.train["inputs"][:CONFIG.batch_size]
    forward = flops(lambda p, x: model.apply({"params": p}, x), params, x, compiled=True)
    assert 2.0 * forward <= saved["adv_cost_loop_body_flops"] <= 4.0 * forward
    k = CONFIG.train_pgd_steps
    assert saved["adv_cost_loop_trip_count"] == k
    assert saved["adv_cost_flops_per_step_with_loop"] == pytest.approx(
        saved["adv_cost_flops_per_step"] + (k - 1) * saved["adv_cost_loop_body_flops"])
    # The adversarial step is the plain one plus k attack iterations (and two
    # evaluation passes): at least k forward passes more.
    assert (saved["adv_cost_flops_per_step_with_loop"]
            >= saved["cost_flops_per_step"] + k * forward)
    assert saved["adv_training_flops_ratio"] > 1.0
    assert "One training step" in (workdir / "results.md").read_text()


def test_accuracies_are_sane(result):
    _, metrics, _, _ = result
    for model in ("plain", "adv_0.1"):
        clean = metrics[f"{model}_clean_accuracy"]
        assert clean > 0.7
        # The identity attack changes nothing.
        assert metrics[f"{model}_fgsm_linf_0_accuracy"] == clean
        assert metrics[f"{model}_pgd_linf_0_accuracy"] == clean
        assert metrics[f"{model}_pgd_linf_0.3_accuracy"] < metrics[f"{model}_pgd_linf_0.1_accuracy"]
        assert metrics[f"{model}_pgd_linf_0.1_accuracy"] < clean
    # Adversarial training buys robustness at its own radius.
    assert (metrics["adv_0.1_pgd_linf_0.1_accuracy"]
            > metrics["plain_pgd_linf_0.1_accuracy"] + 0.1)


@pytest.mark.parametrize("attack,norm,epsilon", [("fgsm", "linf", 0.1), ("pgd", "linf", 0.1),
                                                 ("pgd", "l2", 0.5)])
def test_attack_properties_recomputed_in_numpy(result, attack, norm, epsilon):
    _, _, models, data = result
    model, params = models["plain"]
    x, y = data.test["inputs"][:CONFIG.num_test], data.test["labels"][:CONFIG.num_test]
    x_adv, report = evaluate_attack(Partial(model.apply, {"params": params}), x, y,
                                    attack=attack, epsilon=epsilon, norm=norm,
                                    num_steps=CONFIG.pgd_steps, key=jax.random.key(3))
    delta = (x_adv - x).reshape(len(x), -1).astype(np.float64)
    norms = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta ** 2).sum(1))
    assert norms.max() <= epsilon + 1e-5 and norms.max() > 0.5 * epsilon
    assert report["max_norm"] == pytest.approx(norms.max(), rel=1e-5)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0

    def cross_entropy_and_accuracy(images):
        logits = np.asarray(model.apply({"params": params}, images), np.float64)
        z = logits - logits.max(1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -log_probs[np.arange(len(y)), y].mean(), np.mean(logits.argmax(1) == y)

    clean_loss, clean_acc = cross_entropy_and_accuracy(x)
    adv_loss, adv_acc = cross_entropy_and_accuracy(x_adv)
    assert report["accuracy"] == pytest.approx(adv_acc)
    assert report["clean_accuracy"] == pytest.approx(clean_acc)
    assert report["adversarial_loss"] == pytest.approx(adv_loss, rel=1e-4)
    assert adv_loss > clean_loss + 0.1 and adv_acc < clean_acc


def test_rejects_fgsm_under_l2_and_bad_flags(result, tmp_path):
    _, _, models, data = result
    model, params = models["plain"]
    with pytest.raises(ValueError, match="attack 'fgsm'"):
        evaluate_attack(Partial(model.apply, {"params": params}), data.test["inputs"][:4],
                        data.test["labels"][:4], attack="fgsm", epsilon=0.1, norm="l2")
    with pytest.raises(SystemExit):
        main(["--size=huge", f"--workdir={tmp_path}"])
