"""Smoke run of experiments/nas.py at tiny size: files written, numbers sane."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.nas import run  # noqa: E402
from nnlib.search import SearchSpace  # noqa: E402


def test_nas_experiment_tiny(tmp_path):
    space = SearchSpace(families=("mlp",), depths={"mlp": (1, 2)}, widths={"mlp": (8, 16)},
                        activations=("relu", "tanh"))
    metrics = run(tmp_path, budget=4, population_size=2, sample_size=2, num_epochs=1,
                  num_seeds=2, space=space, cost_repeats=2)
    names = {p.name for p in tmp_path.iterdir()}
    assert names >= {"metrics.json", "results.md", "candidates.json", "pareto.png"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    candidates = json.loads((tmp_path / "candidates.json").read_text())
    assert len(candidates) == 8 and metrics["space_size"] == 8
    assert all(len(c["accuracy_seeds"]) == 2 and c["flops"] > 0 for c in candidates)
    # MLP 64 -> w -> 10 on one image: 2 * (64 w + 10 w) FLOPs in its matmuls
    one_layer = [c for c in candidates if c["architecture"].startswith("mlp 1x")]
    assert all(c["flops"] >= 2 * 74 * int(c["architecture"].split("x")[1].split()[0])
               for c in one_layer)
    assert 1 <= metrics["pareto_size"] <= 8
    for name in ("random", "evolution"):
        assert 0.0 <= metrics[f"{name}_best_val_accuracy"] <= 1.0
    assert metrics["best_cost_flops_per_step"] > 0
    assert "Pareto front" in (tmp_path / "results.md").read_text()
