"""Smoke run of experiments/pruning.py at tiny size: files written, numbers sane."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.pruning import run  # noqa: E402


def test_pruning_experiment_tiny(tmp_path):
    metrics = run(tmp_path, models=("mlp",), methods=("layer",), sparsities=(0.9,),
                  num_seeds=1, quick=True, cost_repeats=2)
    assert {p.name for p in tmp_path.iterdir()} >= {"metrics.json", "results.md", "pruning.png"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    # round(0.9 * size) zeros in each kernel: 0.9 overall up to rounding
    assert abs(metrics["mlp_layer_s90_sparsity"] - 0.9) < 1e-3
    for key in ("mlp_dense_test_accuracy", "mlp_layer_s90_test_accuracy",
                "mlp_oneshot_s90_test_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["mlp_layer_s90_csr_bytes"] < metrics["mlp_dense_bytes"]
    assert metrics["mlp_cost_flops_per_step"] > 0 and metrics["mlp_cost_num_params"] == 2410
    assert "| mlp | layer | 0.90 |" in (tmp_path / "results.md").read_text()
