"""The one entry point for experiments (the Flax examples' convention).

    python experiments/train.py --config=experiments/configs/digits_cnn.py \
        --workdir=runs/digits_cnn [--config.num_epochs=5 ...]

A run writes into ``workdir``: ``metrics.json`` (final metrics with flat keys:
``test_accuracy``, ``val_loss``, ``train_time_s``, ``num_params`` ...),
``history.jsonl``, TensorBoard events, orbax checkpoints and
``learning_curves.png``. Running again with the same workdir resumes from its
last checkpoint. ``train_and_evaluate`` is importable (tests, notebooks, the
demo) and reads no flags.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.tasks import build_task  # noqa: E402
from nnlib.data.batching import batch_iterator  # noqa: E402
from nnlib.train import (  # noqa: E402
    TrainState,
    average_metrics,
    make_eval_step,
    make_optimizer,
    make_schedule,
    num_params,
)
from nnlib.train.loop import fit  # noqa: E402


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The model named by ``config.model.name`` with the remaining fields as arguments."""
    kwargs = config.model.to_dict()
    name = kwargs.pop("name")
    if name == "mlp":
        from nnlib.models.mlp import MLPClassifier
        return MLPClassifier(num_classes=num_classes, **kwargs)
    if name == "cnn":
        from nnlib.models.cnn import CNN
        return CNN(num_classes=num_classes, **kwargs)
    if name == "rnn":
        from nnlib.models.rnn import RNNClassifier
        return RNNClassifier(num_classes=num_classes, **kwargs)
    if name == "transformer":
        from nnlib.models.transformer import TransformerClassifier
        return TransformerClassifier(num_classes=num_classes, **kwargs)
    if name == "gpt":
        from nnlib.models.gpt import GPT, GPTConfig
        return GPT(GPTConfig(vocab_size=num_classes, **kwargs))
    if name == "rnn_lm":
        from nnlib.models.rnn import RNNLanguageModel
        return RNNLanguageModel(vocab_size=num_classes, **kwargs)
    raise ValueError(f"unknown model {name!r}")


def _evaluate(state, data, batch_size, eval_step) -> dict[str, float]:
    batches = batch_iterator(data, batch_size, shuffle=False)
    return average_metrics([eval_step(state, b) for b in batches])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       *, show_progress: bool = True) -> dict[str, Any]:
    """Trains per ``config``, evaluates, writes ``workdir/metrics.json``; returns the metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    task = build_task(config)
    model = build_model(config, task.num_classes)
    n_train = len(task.train["labels"])
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_steps = config.get("num_steps") or config.num_epochs * steps_per_epoch
    schedule = make_schedule(config.learning_rate, config.get("schedule", "constant"),
                             total_steps=total_steps, warmup_steps=config.get("warmup_steps", 0),
                             end_value=config.get("end_learning_rate", 0.0))
    tx = make_optimizer(config.optimizer, schedule, weight_decay=config.get("weight_decay", 0.0),
                        clip_norm=config.get("clip_norm", None))
    state = TrainState.create(model=model, tx=tx, key=jax.random.key(config.seed),
                              example_input=task.train["inputs"][:2])
    n_params = num_params(state.params)
    print(f"{config.model.name} on {task.info['dataset']}: {n_params:,} parameters, "
          f"{n_train:,} training examples, {total_steps:,} steps", flush=True)

    state, summary = fit(
        state, task.train, batch_size=config.batch_size, loss_fn=task.loss_fn,
        eval_data=task.val, eval_batch_size=config.get("eval_batch_size", config.batch_size),
        num_epochs=config.get("num_epochs") if not config.get("num_steps") else None,
        num_steps=config.get("num_steps") or None, eval_every=config.get("eval_every", None),
        log_every=config.get("log_every", 50), workdir=workdir,
        checkpoint_every=config.get("checkpoint_every", None), seed=config.seed,
        drop_remainder=config.get("drop_remainder", False), show_progress=show_progress,
        early_stopping_patience=config.get("early_stopping_patience", None),
        best_metric="val_loss",
    )
    eval_step = jax.jit(make_eval_step(task.loss_fn))
    metrics: dict[str, Any] = {"num_params": n_params, "steps": int(summary["step"]),
                               "train_time_s": round(summary["train_time_s"], 2)}
    if summary["train_time_s"] > 0:
        metrics["steps_per_s"] = round(summary["step"] / summary["train_time_s"], 2)
    for split, data in (("val", task.val), ("test", task.test)):
        if data is None:
            continue
        for k, v in _evaluate(state, data, config.get("eval_batch_size", config.batch_size),
                              eval_step).items():
            if k != "count":
                metrics[f"{split}_{k}"] = float(v)
    for k, v in summary.items():
        if k.startswith("train_") and k != "train_time_s" and np.isscalar(v):
            metrics[k] = float(v)
    if "val_loss" in metrics and "vocab_size" in task.info:
        metrics["val_perplexity"] = float(np.exp(metrics["val_loss"]))
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    print(f"wrote {workdir / 'metrics.json'}, {workdir / 'history.jsonl'}, "
          f"{workdir / 'learning_curves.png'}, TensorBoard events in {workdir / 'tensorboard'}, "
          f"checkpoints in {workdir / 'checkpoints'}", flush=True)
    return metrics


def main(argv: list[str]) -> None:
    del argv
    from absl import flags, logging

    logging.set_verbosity(logging.WARNING)  # orbax narrates every save at INFO
    metrics = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    print(json.dumps(metrics, indent=2, sort_keys=True))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "where results and checkpoints go")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
