"""Smoke run of experiments/clip_digits.py at tiny size: files written, keys present,
numbers sane and consistent with an independent recomputation."""

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.clip_digits import CAPTION_SETS, get_config, run  # noqa: E402


def test_clip_digits_experiment_tiny(tmp_path):
    config = get_config("tiny")
    metrics, artifacts = run(config, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert names >= {"metrics.json", "results.md", "history.jsonl", "config.json",
                     "zero_shot_curve.png", "similarity.png", "templates.png"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(
        json.dumps(metrics))
    assert metrics["num_steps"] == config.num_steps == int(metrics["cost_num_steps"])
    assert metrics["num_params"] == metrics["cost_num_params"] > 0
    assert metrics["cost_flops_per_step"] > 0 and metrics["cost_step_time_s"] > 0
    # Every accuracy and recall is a fraction; recall grows with k.
    for name in CAPTION_SETS:
        assert 0.0 <= metrics[f"test_zero_shot_accuracy_{name}"] <= 1.0
        for direction in ("i2t", "t2i"):
            for kind in ("", "pair_"):
                r = [metrics[f"retrieval_{name}_{direction}_{kind}recall@{k}"] for k in config.ks]
                assert all(0.0 <= x <= 1.0 for x in r) and r == sorted(r)
    assert 0.0 <= metrics["test_linear_probe_accuracy"] <= 1.0
    # Validation evaluations every eval_every steps, logged with zero-shot accuracy.
    evals = [r for r in artifacts["history"] if r["split"] == "val"]
    assert [r["step"] for r in evals] == list(range(config.eval_every, config.num_steps + 1,
                                                    config.eval_every))
    assert all(0.0 <= r["zero_shot_accuracy_unseen"] <= 1.0 for r in evals)
    # The reported zero-shot accuracy is the argmax of cosines with the class
    # embeddings, recomputed here with numpy.
    labels = artifacts["data"].splits["test"]["labels"]
    img = artifacts["image_embeddings"]
    for name, classes in artifacts["class_embeddings"].items():
        np.testing.assert_allclose(np.linalg.norm(classes, axis=1), 1.0, rtol=1e-5)
        acc = np.mean(np.argmax(img @ classes.T, axis=1) == labels)
        assert metrics[f"test_zero_shot_accuracy_{name}"] == acc
    # The logit scale stayed within CLIP's clip.
    assert 1.0 < metrics["logit_scale"] <= 100.0 + 1e-4
    assert "zero-shot classification" in (tmp_path / "results.md").read_text()
