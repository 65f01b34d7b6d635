"""The one entry point for experiments (the Flax examples' convention).

    python experiments/train.py --config=experiments/configs/digits_cnn.py \
        --workdir=runs/digits_cnn [--config.num_epochs=5 ...]

A run writes into ``workdir``: ``metrics.json`` (final metrics with flat keys:
``test_accuracy``, ``val_loss``, ``train_time_s``, ``num_params`` ...),
``history.jsonl``, TensorBoard events, orbax checkpoints and
``learning_curves.png``. Running again with the same workdir resumes from its
last checkpoint. ``train_and_evaluate`` is importable (tests, notebooks, the
demo) and reads no flags.

After training, a GPT also writes ``samples.txt``: ``sample_chars`` tokens
(default 300) sampled after ``sample_prompt`` (default a newline) at
``sample_temperature`` (default 0.8). A task with an ``evaluate`` hook adds
its metrics for each split (seq2seq: ``val_exact_match``,
``test_exact_match``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.tasks import Task, build_task  # noqa: E402
from nnlib.compress.cost import cost_report, format_cost  # noqa: E402
from nnlib.data.batching import batch_iterator, num_batches  # noqa: E402
from nnlib.train import (  # noqa: E402
    TrainState,
    average_metrics,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    num_params,
)
from nnlib.train import jit as train_jit  # noqa: E402
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
        # An RNN has no learned positions: context_length only sets the
        # length of the training windows (tasks.py reads it from here).
        kwargs.pop("context_length", None)
        return RNNLanguageModel(vocab_size=num_classes, **kwargs)
    if name == "bert_mlm":
        from nnlib.models.bert import BertConfig, BertForMaskedLM
        return BertForMaskedLM(BertConfig(vocab_size=num_classes, **kwargs))
    if name == "seq2seq_transformer":
        from nnlib.models.transformer import Seq2SeqTransformer
        return Seq2SeqTransformer(vocab_size=num_classes, **kwargs)
    raise ValueError(f"unknown model {name!r}")


def _batches(task: Task, data: dict[str, np.ndarray], batch_size: int, *, seed: int = 0,
             epoch: int = 0, shuffle: bool = False, drop_remainder: bool = False,
             stream: int = 1) -> Iterator[dict[str, Any]]:
    """The batches of one epoch, passed through ``task.prepare`` when it has one.

    ``prepare`` gets the seed ``(seed, stream, epoch, index)``: stream 0 is
    training, 1 evaluation, so evaluation batches are the same every time.
    """
    batches = batch_iterator(data, batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                             drop_remainder=drop_remainder)
    if task.prepare is None:
        yield from batches
        return
    for index, batch in enumerate(batches):
        yield task.prepare(batch, (seed, stream, epoch, index))


def _evaluate(task, state, data, batch_size, eval_step, seed) -> dict[str, float]:
    batches = _batches(task, data, batch_size, seed=seed)
    return average_metrics([eval_step(state, b) for b in batches])


def sample_text(model, params, tokenizer, *, prompt: str, num_tokens: int, key: jax.Array,
                temperature: float = 1.0, top_k: int | None = None) -> str:
    """``prompt`` followed by ``num_tokens`` tokens sampled from a ``GPT``.

    ``generate`` stops at ``context_length`` (learned positions end there),
    so a longer sample is drawn in chunks, each conditioned on the last half
    context of what came before (a longer prompt is cut to its last half
    context too). Two compilations in all: the first chunk (prompt length)
    and every later one (half context).
    """
    from nnlib.models.gpt import generate

    context = model.config.context_length
    keep = max(1, context // 2)
    out = [int(i) for i in tokenizer.encode(prompt)][-keep:]
    if not out:
        raise ValueError(f"sample_text needs a non-empty prompt, got {prompt!r}")
    num_prompt = len(out)
    chunk = 0
    while len(out) - num_prompt < num_tokens:
        window = out[-keep:]
        tokens = generate(model, params, np.asarray([window], np.int32), context - len(window),
                          key=jax.random.fold_in(key, chunk), temperature=temperature,
                          top_k=top_k)  # [1, context]
        out += np.asarray(tokens[0, len(window):]).tolist()
        chunk += 1
    return tokenizer.decode(np.asarray(out[:num_prompt + num_tokens]))


def training_cost(task: Task, state: TrainState, config: ml_collections.ConfigDict,
                  batch_size: int, drop_remainder: bool, total_steps: int) -> dict[str, Any]:
    """``nnlib.compress.cost_report`` of one train step on a real training batch.

    The step is compiled apart from the one ``fit`` ran (no buffer donation,
    so it can be timed on the same state repeatedly); the energy estimate is
    extrapolated to ``total_steps`` from the median step time. Config fields:
    ``cost_repeats`` (timed calls, default 5), ``cost_device_power_w``,
    ``cost_utilization``, ``cost_pue``, ``cost_grid_gco2_per_kwh``.
    """
    batch = next(_batches(task, task.train, batch_size, seed=config.seed, shuffle=True,
                          drop_remainder=drop_remainder, stream=0))
    batch = jax.tree.map(jax.numpy.asarray, batch)  # on device once, not per timed call
    assumptions = {name: config[f"cost_{name}"]
                   for name in ("device_power_w", "utilization", "pue", "grid_gco2_per_kwh")
                   if f"cost_{name}" in config}
    return cost_report(jax.jit(make_train_step(task.loss_fn)), state, batch,
                       num_steps=total_steps, repeats=config.get("cost_repeats", 5), warmup=1,
                       **assumptions)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       *, show_progress: bool = True) -> dict[str, Any]:
    """Trains per ``config``, evaluates, writes ``workdir/metrics.json``; returns the metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    task = build_task(config)
    model = build_model(config, task.num_classes)
    batch_size = config.batch_size
    eval_batch_size = config.get("eval_batch_size", batch_size)
    drop_remainder = config.get("drop_remainder", False)
    n_train = len(task.train["labels"])
    steps_per_epoch = num_batches(n_train, batch_size, drop_remainder)
    total_steps = config.get("num_steps") or config.num_epochs * steps_per_epoch
    schedule = make_schedule(config.learning_rate, config.get("schedule", "constant"),
                             total_steps=total_steps, warmup_steps=config.get("warmup_steps", 0),
                             end_value=config.get("end_learning_rate", 0.0))
    tx = make_optimizer(config.optimizer, schedule, weight_decay=config.get("weight_decay", 0.0),
                        clip_norm=config.get("clip_norm", None), b2=config.get("b2", None))
    example = next(_batches(task, task.train, 2))["inputs"]
    # One compiled program instead of an eager dispatch per initializer op:
    # seconds faster for deep models.
    state = jax.jit(lambda key, x: TrainState.create(model=model, tx=tx, key=key,
                                                     example_input=x))(
        jax.random.key(config.seed), example)
    n_params = num_params(state.params)
    print(f"{config.model.name} on {task.info['dataset']}: {n_params:,} parameters, "
          f"{n_train:,} training examples, {total_steps:,} steps", flush=True)

    if task.prepare is None:  # arrays: fit batches them itself (and skips ahead on resume)
        train_data, eval_data = task.train, task.val
    else:
        def train_data(epoch: int):
            return _batches(task, task.train, batch_size, seed=config.seed, epoch=epoch,
                            shuffle=True, drop_remainder=drop_remainder, stream=0)

        def eval_data():
            return _batches(task, task.val, eval_batch_size, seed=config.seed)

    eval_step = train_jit(make_eval_step(task.loss_fn))
    state, summary = fit(
        state, train_data, batch_size=batch_size, loss_fn=task.loss_fn,
        eval_step=eval_step, eval_data=eval_data, eval_batch_size=eval_batch_size,
        num_epochs=config.get("num_epochs") if not config.get("num_steps") else None,
        num_steps=total_steps, eval_every=config.get("eval_every", None),
        log_every=config.get("log_every", 50), workdir=workdir,
        checkpoint_every=config.get("checkpoint_every", None), seed=config.seed,
        drop_remainder=drop_remainder, show_progress=show_progress,
        early_stopping_patience=config.get("early_stopping_patience", None),
        best_metric="val_loss",
    )
    metrics: dict[str, Any] = {"num_params": n_params, "steps": int(summary["step"]),
                               "train_time_s": round(summary["train_time_s"], 2)}
    steps_run = summary["step"] - (summary["resumed_from"] or 0)  # by this call
    if steps_run > 0 and summary["train_time_s"] > 0:
        metrics["steps_per_s"] = round(steps_run / summary["train_time_s"], 2)
    for split, data in (("val", task.val), ("test", task.test)):
        if data is None:
            continue
        for k, v in _evaluate(task, state, data, eval_batch_size, eval_step,
                              config.seed).items():
            if k != "count":
                metrics[f"{split}_{k}"] = float(v)
        if task.evaluate is not None:
            for k, v in task.evaluate(model, state.params, data, eval_batch_size).items():
                metrics[f"{split}_{k}"] = float(v)
    for k, v in summary.items():
        if k.startswith("train_") and k != "train_time_s" and np.isscalar(v):
            metrics[k] = float(v)
    if "val_loss" in metrics and "vocab_size" in task.info and task.prepare is None:
        metrics["val_perplexity"] = float(np.exp(metrics["val_loss"]))
    # What one training step costs (XLA's FLOPs and bytes, memory, measured
    # time) and an energy/carbon estimate for the whole run, whose assumptions
    # are config fields and land in metrics.json beside the result.
    if config.get("cost_report", True):
        cost = training_cost(task, state, config, batch_size, drop_remainder, total_steps)
        print(format_cost(cost), flush=True)
        metrics |= cost
    written = [workdir / "metrics.json", workdir / "history.jsonl",
               workdir / "learning_curves.png"]
    if config.model.name == "gpt" and "tokenizer" in task.info:
        text = sample_text(model, state.params, task.info["tokenizer"],
                           prompt=config.get("sample_prompt", "\n"),
                           num_tokens=config.get("sample_chars", 300),
                           key=jax.random.fold_in(jax.random.key(config.seed), 1),
                           temperature=config.get("sample_temperature", 0.8),
                           top_k=config.get("sample_top_k", 0) or None)
        (workdir / "samples.txt").write_text(text, encoding="utf-8")
        written.append(workdir / "samples.txt")
        print(f"--- sample ---\n{text}\n--------------", flush=True)
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    print(f"wrote {', '.join(str(p) for p in written)}, TensorBoard events in "
          f"{workdir / 'tensorboard'}, checkpoints in {workdir / 'checkpoints'}", flush=True)
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
