"""Smoke run of experiments/quantization.py at tiny size: files written, numbers sane."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.quantization import run  # noqa: E402


def test_quantization_experiment_tiny(tmp_path):
    metrics = run(tmp_path, models=("mlp",), qat_epochs=1, repeats=2, quick=True)
    assert {p.name for p in tmp_path.iterdir()} >= {"metrics.json", "results.md",
                                                     "quantization.png"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    # MLP 64 -> 32 -> 10: kernels 2368 int8 values + one float32 scale per output
    # channel (42), biases 42 float32.
    assert metrics["mlp_float_bytes"] == 4 * (64 * 32 + 32 + 32 * 10 + 10)
    assert metrics["mlp_int8_ptq_bytes"] == (64 * 32 + 32 * 10) + 4 * 42 + 4 * 42
    for slug in ("float", "int8_ptq", "int8_weights_fakequant", "qat_int8"):
        assert 0.0 <= metrics[f"mlp_{slug}_test_accuracy"] <= 1.0
    assert metrics["mlp_int8_ptq_agreement_with_float"] > 0.8
    assert metrics["mlp_float_ms_test_set"] > 0 and metrics["mlp_int8_ptq_ms_one_image"] > 0
    assert metrics["mlp_float_cost_flops_per_step"] > 2 * 359 * (64 * 32 + 32 * 10) - 1
    assert "| mlp | int8 PTQ (qwix) |" in (tmp_path / "results.md").read_text()
