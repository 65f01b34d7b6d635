"""Smoke test of experiments/keywords.py at tiny size, with its numbers recomputed.

* Every output file is written and metrics.json holds what ``run`` returned.
* Splits: sizes as configured, speakers disjoint between train/val/test,
  every word present in every split, labels matching the words.
* Each reported test accuracy equals the trace of its confusion matrix over
  the test size, and the accuracy recomputed here from the models' logits;
  the clean point of the SNR curve equals accuracy on the clean speech
  recomputed here; the curve's noisy mixtures have the SNR they claim.
* The band standardizer uses training statistics only (mean 0 / std 1 on
  train, not on test).
* Cost reports: the LSTM's parameter count in closed form, FLOPs at least one
  multiply per weight and example, and the unrolled LSTM step at least the
  recurrent matmuls of every frame above XLA's once-counted scan body.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.keywords import (  # noqa: E402
    MODELS,
    _logits,
    get_config,
    log_mel_features,
    run,
)
from nnlib.audio import measure_snr, mix_at_snr  # noqa: E402

CONFIG = get_config("tiny")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("keywords")
    metrics, artifacts = run(CONFIG, workdir, verbose=False)
    return workdir, metrics, artifacts


def test_writes_every_output(result):
    workdir, metrics, _ = result
    for name in ("metrics.json", "results.md", "config.json", "confusion.png",
                 "accuracy_vs_snr.png", "examples.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert json.loads((workdir / "metrics.json").read_text()) == pytest.approx(metrics)
    assert json.loads((workdir / "config.json").read_text()) == json.loads(CONFIG.to_json())
    table = (workdir / "results.md").read_text()
    assert "| CNN |" in table and "| LSTM |" in table and "clean" in table


def test_cost_reports_and_parameter_counts(result):
    _, metrics, _ = result
    frames = 1 + CONFIG.sample_rate // CONFIG.hop_length
    batch, hidden, mels = CONFIG.batch_size, CONFIG.lstm_hidden, CONFIG.n_mels
    # LSTM: 4 gates, each with input and recurrent kernels and a bias; a linear head.
    assert metrics["lstm_num_params"] == 4 * (mels * hidden + hidden * hidden + hidden) + (
        hidden * 10 + 10)
    for kind, prefix in (("cnn", ""), ("lstm", "lstm_")):
        cost = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix + "cost_")}
        assert cost["cost_num_params"] == metrics[f"{kind}_num_params"]
        assert cost["cost_step_time_s"] > 0 and cost["cost_num_steps"] == CONFIG.num_steps
        # Every weight takes part in at least one multiply per example.
        assert cost["cost_flops_per_step"] >= batch * cost["cost_num_params"]
        assert cost["cost_flops_per_step_with_loop"] >= cost["cost_flops_per_step"]
    # XLA counts the LSTM's scan body once; unrolled, the recurrent matmul
    # [batch, H] x [H, 4H] of the forward pass alone adds 2 B H 4H FLOPs per extra frame.
    extra = metrics["lstm_cost_flops_per_step_with_loop"] - metrics["lstm_cost_flops_per_step"]
    assert extra >= (frames - 1) * 2 * batch * hidden * 4 * hidden
    assert metrics["cost_flops_per_step_with_loop"] == metrics["cost_flops_per_step"]


def test_splits_have_disjoint_speakers_and_every_word(result):
    _, metrics, artifacts = result
    data = artifacts["data"]
    words = len(CONFIG.words)
    assert len(data["train"]["labels"]) == CONFIG.train_speakers * CONFIG.train_repeats * words
    assert len(data["test"]["labels"]) == CONFIG.test_speakers * CONFIG.eval_repeats * words
    speakers = {split: set(d["speaker"].tolist()) for split, d in data.items()}
    assert not speakers["train"] & speakers["val"] and not speakers["train"] & speakers["test"]
    assert not speakers["val"] & speakers["test"]
    for d in data.values():
        assert sorted(set(d["labels"].tolist())) == list(range(words))
        assert d["audio"].shape[1] == CONFIG.sample_rate
        lo, hi = CONFIG.snr_db
        assert (d["snr_db"] >= lo).all() and (d["snr_db"] <= hi).all()
    assert metrics["num_train_speakers"] == CONFIG.train_speakers
    features = artifacts["features"]
    assert features["train"].shape[1:] == (1 + CONFIG.sample_rate // CONFIG.hop_length,
                                           CONFIG.n_mels)
    np.testing.assert_allclose(features["train"].mean((0, 1)), 0.0, atol=1e-3)
    np.testing.assert_allclose(features["train"].std((0, 1)), 1.0, atol=1e-3)


def test_accuracies_agree_with_logits_and_confusion(result):
    _, metrics, artifacts = result
    test = artifacts["data"]["test"]
    labels = test["labels"]
    clean = artifacts["standardizer"](log_mel_features(test["speech"], CONFIG))
    for kind in MODELS:
        model, params = artifacts["models"][kind]
        logits = np.asarray(_logits(model, params, artifacts["features"]["test"]))
        accuracy = np.mean(logits.argmax(1) == labels)
        assert metrics[f"{kind}_test_accuracy"] == pytest.approx(accuracy)
        confusion = artifacts["confusion"][kind]
        assert confusion.sum() == len(labels)
        np.testing.assert_array_equal(confusion.sum(1), np.bincount(labels, minlength=10))
        assert np.trace(confusion) / len(labels) == pytest.approx(accuracy)
        clean_accuracy = np.mean(np.asarray(_logits(model, params, clean)).argmax(1) == labels)
        assert metrics[f"{kind}_accuracy_snr_clean"] == pytest.approx(clean_accuracy)
        for snr in CONFIG.snr_curve_db:
            assert 0.0 <= metrics[f"{kind}_accuracy_snr_{snr:g}"] <= 1.0
        assert metrics[f"{kind}_num_params"] > 1000
        assert np.isfinite(metrics[f"{kind}_train_loss"])
    # The curve's mixtures: the test noise re-scaled to each SNR.
    _, noise = mix_at_snr(test["speech"], test["noise"], -10.0)
    np.testing.assert_allclose(measure_snr(test["speech"], noise), -10.0, atol=1e-3)


def test_configs():
    full = get_config()
    assert set(full.keys()) == set(CONFIG.keys())
    assert full.train_speakers > CONFIG.train_speakers and full.num_steps > CONFIG.num_steps
    with pytest.raises(ValueError, match="size 'full' or 'tiny'"):
        get_config("huge")



def test_utterances_do_not_reuse_the_speakers_random_stream(monkeypatch):
    """Speakers and each split's utterances are independent draws. (With the
    utterance seed ``seed * 1000 + split``, seed 0's training utterances reran
    the speakers' generator: utterance j's seed was speaker j's idiolect seed
    and its SNR speaker j's open quotient, rescaled.) Synthesis is stubbed:
    only the sampled parameters matter here."""
    import experiments.keywords as keywords

    drawn = []

    def fake_synthesize(utterances, **kwargs):
        drawn.extend(utterances)
        zeros = np.zeros((len(utterances), 4), np.float32)
        return {"audio": zeros, "speech": zeros, "noise": zeros}

    monkeypatch.setattr(keywords, "synthesize", fake_synthesize)
    for seed in (0, 1):
        config = CONFIG.copy_and_resolve_references()
        config.seed = seed
        drawn.clear()
        keywords.make_keyword_data(config)
        speakers = list(dict.fromkeys(u.speaker for u in drawn))  # in sampling order
        assert not {s.idiolect_seed for s in speakers} & {u.seed for u in drawn}, seed
        same = [np.isclose((s.open_quotient - 0.5) / 0.2, (u.snr_db - config.snr_db[0])
                           / (config.snr_db[1] - config.snr_db[0]))
                for s, u in zip(speakers, drawn, strict=False)]
        assert not any(same), seed
