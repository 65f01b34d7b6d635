"""experiments/overfitting.py at tiny size: files, sane numbers, the augmented step, and
the compute-cost report of a training step against the MLP's matmul FLOPs in closed form."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments import overfitting as ov  # noqa: E402
from nnlib.data.augment import augment  # noqa: E402
from nnlib.models import MLPClassifier  # noqa: E402
from nnlib.train import TrainState, classification_loss, make_optimizer, make_train_step  # noqa: E402,E501


def test_few_digits_is_balanced_and_disjoint_from_val_and_test():
    data = ov.few_digits(30, seed=1)
    assert data["train"]["inputs"].shape == (30, 8, 8, 1)
    np.testing.assert_array_equal(np.bincount(data["train"]["labels"]), np.full(10, 3))
    train_rows = {x.tobytes() for x in data["train"]["inputs"]}
    assert len(data["val"]["labels"]) == 180 and len(data["test"]["labels"]) == 359
    with pytest.raises(ValueError, match=r"few_digits expected num_train to be a multiple of 10"):
        ov.few_digits(25, seed=0)
    # Another seed draws other digits.
    other = {x.tobytes() for x in ov.few_digits(30, seed=2)["train"]["inputs"]}
    assert train_rows != other


def test_tiny_run_writes_files_and_sane_numbers(tmp_path):
    regimes = [ov.Regime("baseline"),
               ov.Regime("all_combined", dropout_rate=0.5, weight_decay=1.0,
                         early_stopping_patience=1, max_shift=1, max_degrees=10.0,
                         max_scale=0.1, label_smoothing=0.1)]
    out = ov.run(tmp_path, num_train=20, seeds=(0,), regimes=regimes, num_steps=80,
                 hidden_sizes=(64,), eval_every=20, verbose=False)
    for name in ("metrics.json", "results.md", "overfitting.png"):
        assert (tmp_path / name).stat().st_size > 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == out["metrics"]
    assert metrics["num_params"] == 64 * 64 + 64 + 64 * 10 + 10
    for name in ("baseline", "all_combined"):
        for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
            assert 0.0 <= metrics[f"{name}_{key}"] <= 1.0
        assert metrics[f"{name}_gap"] == pytest.approx(
            metrics[f"{name}_train_accuracy"] - metrics[f"{name}_val_accuracy"])
        assert metrics[f"{name}_test_accuracy"] > 0.3  # well above chance (0.1)
    # 20 digits, 80 steps: the baseline fits its training set better than new digits.
    assert metrics["baseline_train_accuracy"] > metrics["baseline_val_accuracy"]
    assert metrics["baseline_steps"] == 80
    # Early stopping restores the best checkpoint: at or before where it stopped.
    runs = out["runs"]["all_combined"][0]
    assert runs["best_step"] <= runs["steps"] <= 80
    assert "| all_combined |" in out["table"]
    # The cost of one baseline training step (batch 32: 20 digits, padded) is in metrics.json.
    assert metrics["cost_flops_per_step"] > 0
    assert metrics["cost_energy_kwh"] > 0 and metrics["cost_co2_g"] > 0
    assert metrics["cost_num_params"] == metrics["num_params"]
    assert metrics["cost_num_steps"] == 80
    # Its matmuls in closed form: forward 2*B*(64*64 + 64*10), the weight gradients as
    # much again, and the input gradient of the second layer only (the first layer's
    # input needs none). Bias, activation, loss and AdamW add a little on top.
    b = 32
    matmuls = 2 * b * (64 * 64 + 64 * 10) * 2 + 2 * b * 64 * 10
    assert matmuls <= metrics["cost_flops_per_step"] <= 1.5 * matmuls


def test_augmented_step_is_the_plain_step_on_augmented_inputs():
    regime = ov.Regime("aug", max_shift=1, max_degrees=10.0)
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.random((8, 8, 8, 1)).astype(np.float32),
             "labels": rng.integers(0, 10, 8).astype(np.int32)}
    state = TrainState.create(model=MLPClassifier((16,)), tx=make_optimizer("sgd", 0.1),
                              key=jax.random.key(0), example_input=batch["inputs"][:1])
    loss_fn = classification_loss()
    new, _ = jax.jit(ov.make_augmented_train_step(regime, loss_fn))(state, batch)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, 0), ov._AUGMENT_STREAM)
    by_hand = {**batch, "inputs": augment(key, batch["inputs"], max_shift=1, max_degrees=10.0)}
    expected, _ = jax.jit(make_train_step(loss_fn))(state, by_hand)
    plain, _ = jax.jit(make_train_step(loss_fn))(state, batch)
    new, expected, plain = (jax.tree.leaves(s.params) for s in (new, expected, plain))
    for a, b in zip(new, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert any(not np.allclose(a, c) for a, c in zip(new, plain, strict=True))
