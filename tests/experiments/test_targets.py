"""The headline targets: each config at full size reaches the number its docstring states.

Minutes each on a 2-core CPU, so these run only with ``make test-slow``
(``pytest -m slow``); ``make test`` skips them. Every run trains from scratch
in a fresh workdir and checks the final metric in ``metrics.json``; the
Shakespeare target is skipped when the corpus is not on this machine (set
``NNLIB_TINYSHAKESPEARE`` to its ``input.txt``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.train import train_and_evaluate  # noqa: E402

pytestmark = pytest.mark.slow

SHAKESPEARE = Path(os.environ.get("NNLIB_TINYSHAKESPEARE")
                   or "/work/shared/data/tinyshakespeare/input.txt")

# config, metric, bound, direction: the claim each config's docstring makes.
TARGETS = [
    ("digits_mlp", "test_accuracy", 0.97, "min"),
    ("digits_cnn", "test_accuracy", 0.985, "min"),
    ("digits_lstm", "test_accuracy", 0.97, "min"),
    ("digits_transformer", "test_accuracy", 0.96, "min"),
    ("shakespeare_char_gpt", "val_loss", 1.90, "max"),
    ("seq2seq_addition", "test_exact_match", 0.99, "min"),
]


def load_config(name: str):
    path = ROOT / "experiments" / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize(("name", "metric", "bound", "direction"), TARGETS,
                         ids=[t[0] for t in TARGETS])
def test_config_reaches_its_target(name, metric, bound, direction, tmp_path):
    config = load_config(name)
    if config.dataset.startswith("shakespeare"):
        if not SHAKESPEARE.is_file():
            pytest.skip(f"Tiny Shakespeare not found at {SHAKESPEARE}; set "
                        "NNLIB_TINYSHAKESPEARE to its input.txt to run this target")
        config.data_path = str(SHAKESPEARE)

    metrics = train_and_evaluate(config, tmp_path, show_progress=False)

    value = metrics[metric]
    print(f"{name}: {metric} = {value:.4f} (target {'>=' if direction == 'min' else '<='} "
          f"{bound}), {metrics['train_time_s']:.0f} s of training, "
          f"{metrics['num_params']:,} parameters")
    if direction == "min":
        assert value >= bound, f"{name}: {metric} {value:.4f} < target {bound}"
    else:
        assert value <= bound, f"{name}: {metric} {value:.4f} > target {bound}"
