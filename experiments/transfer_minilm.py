"""Transfer learning and zero-shot classification with pretrained MiniLM.

    python experiments/transfer_minilm.py --workdir=runs/transfer_minilm [--quick]

The task: which part of the Python standard library does a sentence of
documentation come from? Each example is the first sentence of a docstring
(module, class or function) in the standard library's own sources, read with
``ast`` from this interpreter's installation (no import, no network); its
label is the top-level package the file lives in, grouped into eight topics
(``TOPICS``: tkinter, asyncio, email, logging, xml, unittest,
multiprocessing + concurrent, http + urllib). Test folders are skipped,
sentences of 4 to 40 words kept, and a sentence found under two topics is
dropped (it cannot be labelled). The labels are therefore noisy in an honest
way: "Return the value of the option." could sit in several packages, and
some sentences name their package outright. Per topic a fixed-seed sample is
split into train / val / test (default 40 / 10 / 40 sentences).

Five classifiers, one split (test accuracy reported; chance is 1/8):

- **zero-shot**: no training example at all. Each topic is a one-line
  description written by hand (``TOPICS``; written once, not tuned on any
  split); a sentence gets the topic whose description's MiniLM embedding is
  most cosine-similar to its own (``nnlib.pretrained.zero_shot_classify``).
- **nearest centroid**: the mean MiniLM embedding of each topic's training
  sentences as its prototype; no gradient step.
- **frozen**: MiniLM frozen, a new linear head trained on its unit-length
  sentence embedding. Freezing is optax masking
  (``make_optimizer(frozen=("bert/.*",))``: zero updates, no optimizer
  state), and ``SentenceClassifier(train_encoder=False)`` skips the
  backward pass through the encoder. The experiment checks that the encoder
  is bit-for-bit unchanged after training.
- **fine-tuned**: the whole of MiniLM and the head trained (AdamW).
- **from scratch** (baseline): the same ``SentenceClassifier`` design
  (WordPiece ids, mean pooling, linear head, MiniLM's dropout rates) on a
  small BERT (2 layers, width 64) initialised at random and trained on the
  same split, longer.

What each costs to train is measured on one real training step (the first
batch of the training split) with ``nnlib.compress.cost_report``: XLA's FLOPs
and bytes, parameter and optimizer-state bytes, compiled memory, the median
step time and the energy of the whole run, printed with ``format_cost``. The
fine-tuned MiniLM is the main model (``cost_*`` keys); the frozen encoder's
step (``frozen_cost_*``: no backward pass through the encoder, no optimizer
state for it) and the from-scratch baseline's (``baseline_cost_*``) are
reported beside it.

Writes ``metrics.json`` (flat keys), ``results.md`` (the table) and
``transfer_minilm.png`` (test accuracies; validation accuracy per epoch)
into the workdir, and prints the table. ``--quick`` runs a tiny version.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import platform
import re
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nnlib.compress import cost_report, format_cost  # noqa: E402
from nnlib.data.batching import batch_iterator  # noqa: E402
from nnlib.models.bert import BertConfig  # noqa: E402
from nnlib.pretrained import (  # noqa: E402
    Pretrained,
    SentenceClassifier,
    encode,
    load_minilm,
    sentence_classifier_params,
    tokenize,
    zero_shot_classify,
)
from nnlib.train import (  # noqa: E402
    TrainState,
    average_metrics,
    fit,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    num_params,
)

# (label, standard-library packages, description used by zero-shot only)
TOPICS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("tkinter", ("tkinter",),
     "graphical user interfaces: windows, widgets, buttons, menus and drawing on a canvas"),
    ("asyncio", ("asyncio",),
     "asynchronous programming with an event loop, coroutines, tasks and transports"),
    ("email", ("email",),
     "email messages: MIME parts, headers, addresses, charsets and encodings"),
    ("logging", ("logging",),
     "logging: loggers, handlers, formatters, log records and log levels"),
    ("xml", ("xml",),
     "XML documents: parsing, elements, attributes, DOM nodes and SAX events"),
    ("unittest", ("unittest",),
     "unit testing: test cases, assertions, test suites, test runners and mock objects"),
    ("multiprocessing", ("multiprocessing", "concurrent"),
     "parallel processes: process pools, queues, locks, shared memory and workers"),
    ("http", ("http", "urllib"),
     "the web: HTTP requests and responses, web servers, URLs and cookies"),
)


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """Every knob of the experiment; ``quick()`` is the seconds-long version."""

    num_topics: int = len(TOPICS)
    train_per_topic: int = 40
    val_per_topic: int = 10
    test_per_topic: int = 40
    max_length: int = 32  # tokens; 95% of the sentences have <= 28
    batch_size: int = 16
    frozen_epochs: int = 4
    frozen_learning_rate: float = 1e-2
    finetune_epochs: int = 3
    finetune_learning_rate: float = 1e-4
    baseline_epochs: int = 20  # validation accuracy is flat after ~12
    baseline_learning_rate: float = 1e-3
    baseline_hidden: int = 64
    baseline_layers: int = 2
    head_dropout: float = 0.1  # on the sentence embedding, before each linear head
    seed: int = 0

    @classmethod
    def quick(cls) -> TransferConfig:
        return cls(num_topics=3, train_per_topic=6, val_per_topic=2, test_per_topic=4,
                   max_length=16, batch_size=8, frozen_epochs=2, finetune_epochs=1,
                   baseline_epochs=2, baseline_hidden=16, baseline_layers=1,
                   head_dropout=0.0)  # dropout's random bits double compile times


# --------------------------------------------------------------------------- #
# Data: first sentences of standard-library docstrings, labelled by package.
# --------------------------------------------------------------------------- #


def _first_sentence(docstring: str) -> str:
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    end = re.search(r"(?<=[.!?])\s", paragraph)
    return paragraph[: end.start()] if end else paragraph


@functools.lru_cache(maxsize=32)
def docstring_sentences(package: str, stdlib: str | None = None) -> frozenset[str]:
    """First sentences (4-40 words) of every docstring under ``stdlib/package``,
    test folders excluded; read with ``ast``, nothing is imported."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"]) / package
    found = set()
    for file in sorted(root.rglob("*.py")):
        if any(p in ("test", "tests", "idle_test") for p in file.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef |
                          ast.AsyncFunctionDef) and (doc := ast.get_docstring(node)):
                sentence = _first_sentence(doc)
                if 4 <= len(sentence.split()) <= 40 and ">>>" not in sentence:
                    found.add(sentence)
    return frozenset(found)


def stdlib_topic_dataset(config: TransferConfig) -> dict[str, dict[str, Any]]:
    """``{"train"|"val"|"test": {"sentences": [n] str, "labels": int32 [n]}}``,
    stratified: each topic contributes exactly ``*_per_topic`` sentences."""
    topics = TOPICS[: config.num_topics]
    pools = [set().union(*(docstring_sentences(p) for p in packages))
             for _, packages, _ in topics]
    counts: dict[str, int] = {}
    for pool in pools:
        for s in pool:
            counts[s] = counts.get(s, 0) + 1
    rng = np.random.default_rng(config.seed)
    sizes = (config.train_per_topic, config.val_per_topic, config.test_per_topic)
    splits: dict[str, dict[str, list]] = {s: {"sentences": [], "labels": []}
                                          for s in ("train", "val", "test")}
    for label, pool in enumerate(pools):
        unique = sorted(s for s in pool if counts[s] == 1)  # ambiguous ones dropped
        if len(unique) < sum(sizes):
            raise ValueError(f"topic {topics[label][0]!r} has {len(unique)} sentences, "
                             f"fewer than the {sum(sizes)} the split needs")
        chosen = [unique[i] for i in rng.permutation(len(unique))[: sum(sizes)]]
        start = 0
        for split, size in zip(splits, sizes, strict=True):
            splits[split]["sentences"] += chosen[start:start + size]
            splits[split]["labels"] += [label] * size
            start += size
    return {k: {"sentences": v["sentences"], "labels": np.asarray(v["labels"], np.int32)}
            for k, v in splits.items()}


# --------------------------------------------------------------------------- #
# Training one SentenceClassifier with nnlib.train.fit.
# --------------------------------------------------------------------------- #


def _arrays(pretrained: Pretrained, split: dict[str, Any], max_length: int) -> dict:
    tokens = tokenize(pretrained.tokenizer, split["sentences"], length=max_length)
    return {**tokens, "labels": split["labels"]}


def _batches(arrays: dict, batch_size: int, *, seed: int = 0, epoch: int = 0,
             shuffle: bool) -> list[dict]:
    """``batch_iterator``'s flat batches regrouped as the model's dict inputs."""
    return [{"inputs": {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]},
             "labels": b["labels"], "mask": b["mask"]}
            for b in batch_iterator(arrays, batch_size, seed=seed, epoch=epoch, shuffle=shuffle)]


def train_classifier(
    model: SentenceClassifier,
    params: Any,
    tx: Any,
    data: dict[str, dict],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    show_progress: bool,
    cost_repeats: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """Fits ``model`` from ``params``; returns final params and test / val metrics
    plus the validation accuracy after each epoch.

    ``cost_repeats > 0`` also returns ``"cost"``: ``nnlib.compress.cost_report``
    of one training step (the first training batch, from the trained state;
    that many timed calls), its energy extrapolated to the steps taken."""
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       key=jax.random.key_data(jax.random.key(seed)), collections={},
                       apply_fn=model.apply, tx=tx)
    eval_step = jax.jit(make_eval_step())
    # Not donated (fit's default would): the state's first params are the
    # pretrained arrays, which the next run starts from again.
    train_step = jax.jit(make_train_step())
    start = time.perf_counter()
    state, summary = fit(
        state, lambda epoch: _batches(data["train"], batch_size, seed=seed, epoch=epoch,
                                      shuffle=True),
        eval_data=_batches(data["val"], batch_size, shuffle=False), eval_step=eval_step,
        train_step=train_step,
        num_epochs=epochs, log_every=10_000, show_progress=show_progress, seed=seed)
    train_time = time.perf_counter() - start
    test = average_metrics([eval_step(state, b) for b in
                            _batches(data["test"], batch_size, shuffle=False)])
    curve = [r["accuracy"] for r in summary["history"] if r["split"] == "val"]
    result = {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
              "val_accuracy": curve[-1], "val_curve": curve, "train_time_s": train_time}
    if cost_repeats > 0:
        batch = _batches(data["train"], batch_size, seed=seed, shuffle=True)[0]
        result["cost"] = cost_report(train_step, state, batch, num_steps=int(state.step),
                                     repeats=cost_repeats, warmup=1)
    return state.params, result


# --------------------------------------------------------------------------- #
# The experiment.
# --------------------------------------------------------------------------- #


def run(
    config: TransferConfig,
    workdir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    show_progress: bool = True,
    cost_repeats: int = 5,
) -> dict[str, Any]:
    """Runs all five classifiers; writes metrics.json, results.md and the plot.

    Args:
      config: sizes and hyperparameters.
      workdir: output folder (created).
      checkpoint: a BERT checkpoint folder for ``load_minilm(path=...)``;
        ``None``: the installed all-MiniLM-L6-v2.
      show_progress: progress bars in ``fit``.
      cost_repeats: timed calls of each trained classifier's compute-cost
        report (one training step; printed, and written as ``cost_*`` for the
        fine-tuned MiniLM, ``frozen_cost_*`` and ``baseline_cost_*``); 0 skips
        them.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    splits = stdlib_topic_dataset(config)
    topics = TOPICS[: config.num_topics]
    num_classes = len(topics)
    pretrained = load_minilm(checkpoint)
    data = {k: _arrays(pretrained, v, config.max_length) for k, v in splits.items()}
    test_labels = splits["test"]["labels"]
    metrics: dict[str, Any] = {
        "num_topics": num_classes, "num_train": len(splits["train"]["labels"]),
        "num_val": len(splits["val"]["labels"]),
        "num_test": len(test_labels), "chance_accuracy": 1.0 / num_classes,
        "truncated_fraction": float(np.mean(
            [data[s]["attention_mask"][:, -1].mean() for s in data])),
        "python_version": platform.python_version(), "data_time_s": time.perf_counter() - t0,
    }

    # Zero-shot: descriptions only.
    start = time.perf_counter()
    predictions, _ = zero_shot_classify(pretrained, splits["test"]["sentences"],
                                        [d for _, _, d in topics], max_length=config.max_length)
    metrics["zero_shot_test_accuracy"] = float(np.mean(predictions == test_labels))
    # Nearest centroid: the train embeddings' class means, no gradient step.
    train_vectors = encode(pretrained, splits["train"]["sentences"],
                           max_length=config.max_length)
    centroids = np.stack([train_vectors[splits["train"]["labels"] == c].mean(0)
                          for c in range(num_classes)])
    test_vectors = encode(pretrained, splits["test"]["sentences"], max_length=config.max_length)
    metrics["nearest_centroid_test_accuracy"] = float(np.mean(
        np.argmax(test_vectors @ centroids.T, -1) == test_labels))
    metrics["zero_shot_time_s"] = time.perf_counter() - start

    curves: dict[str, list[float]] = {}
    key_frozen, key_finetune, key_baseline = jax.random.split(jax.random.key(config.seed), 3)
    fit_args = dict(batch_size=config.batch_size, seed=config.seed,
                    show_progress=show_progress, cost_repeats=cost_repeats)

    def record(name: str, prefix: str, result: dict[str, Any]) -> None:
        """Stores a run's metrics as ``prefix_*``; prints its cost report and stores
        it as ``prefix_cost_*`` (the fine-tuned main model's as plain ``cost_*``)."""
        curves[name] = result.pop("val_curve")
        cost = result.pop("cost", None)
        metrics.update({f"{prefix}_{k}": v for k, v in result.items()})
        if cost is not None:
            print(f"{name}, one training step of batch {config.batch_size} (energy: "
                  f"{cost['cost_num_steps']} steps):\n{format_cost(cost)}", flush=True)
            cost_prefix = "" if prefix == "finetune" else f"{prefix}_"
            metrics.update({f"{cost_prefix}{k}": v for k, v in cost.items()})
    steps = lambda epochs: epochs * -(-len(splits["train"]["labels"]) // config.batch_size)  # noqa: E731

    # Frozen encoder, new head: optax masking + no backward through the encoder.
    frozen = SentenceClassifier(pretrained.config, num_classes, train_encoder=False,
                                dropout_rate=config.head_dropout)
    params = sentence_classifier_params(frozen, pretrained.params, key_frozen)
    tx = make_optimizer("adam", config.frozen_learning_rate, frozen=("bert/.*",))
    trained, result = train_classifier(frozen, params, tx, data, epochs=config.frozen_epochs,
                                       **fit_args)
    metrics["frozen_encoder_max_abs_change"] = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in
        zip(jax.tree.leaves(trained["bert"]), jax.tree.leaves(params["bert"]), strict=True))
    metrics["frozen_trainable_params"] = num_params(trained["classifier"])
    record("frozen", "frozen", result)

    # Whole model fine-tuned, AdamW with warm-up and cosine decay.
    finetune = SentenceClassifier(pretrained.config, num_classes,
                                  dropout_rate=config.head_dropout)
    params = sentence_classifier_params(finetune, pretrained.params, key_finetune)
    total = steps(config.finetune_epochs)
    schedule = make_schedule(config.finetune_learning_rate, "warmup_cosine",
                             total_steps=total, warmup_steps=max(1, total // 10))
    tx = make_optimizer("adamw", schedule, weight_decay=0.01)
    _, result = train_classifier(finetune, params, tx, data, epochs=config.finetune_epochs,
                                 **fit_args)
    metrics["finetune_trainable_params"] = num_params(params)
    record("fine-tuned", "finetune", result)

    # Baseline: the same design on a small BERT from random initialisation.
    small = BertConfig(vocab_size=pretrained.config.vocab_size,
                       hidden_size=config.baseline_hidden, num_layers=config.baseline_layers,
                       num_heads=2, intermediate_size=2 * config.baseline_hidden,
                       max_position_embeddings=config.max_length,
                       dropout_rate=pretrained.config.dropout_rate,
                       attention_dropout_rate=pretrained.config.attention_dropout_rate)
    baseline = SentenceClassifier(small, num_classes, dropout_rate=config.head_dropout)
    params = jax.jit(baseline.init)(key_baseline, data["train"]["input_ids"][:1])["params"]
    total = steps(config.baseline_epochs)
    schedule = make_schedule(config.baseline_learning_rate, "warmup_cosine",
                             total_steps=total, warmup_steps=max(1, total // 10))
    tx = make_optimizer("adamw", schedule, weight_decay=0.01)
    _, result = train_classifier(baseline, params, tx, data, epochs=config.baseline_epochs,
                                 **fit_args)
    metrics["baseline_trainable_params"] = num_params(params)
    record("from scratch", "baseline", result)

    metrics["total_time_s"] = time.perf_counter() - t0
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    table = results_table(metrics)
    (workdir / "results.md").write_text(table + "\n")
    plot_results(metrics, curves, workdir / "transfer_minilm.png")
    print(table)
    return metrics


ROWS = (
    ("zero-shot (label descriptions)", "zero_shot", None),
    ("nearest centroid (frozen MiniLM)", "nearest_centroid", None),
    ("frozen MiniLM + linear head", "frozen", "frozen_trainable_params"),
    ("fine-tuned MiniLM", "finetune", "finetune_trainable_params"),
    ("small BERT from scratch (baseline)", "baseline", "baseline_trainable_params"),
)


def results_table(metrics: dict[str, Any]) -> str:
    """The markdown table of test accuracies (and, where measured, XLA's FLOPs of
    one training step of batch ``batch_size``)."""
    lines = [
        f"Topic of a Python stdlib docstring sentence: {metrics['num_topics']} topics, "
        f"{metrics['num_train']} train / {metrics['num_val']} val / {metrics['num_test']} "
        f"test sentences (chance {metrics['chance_accuracy']:.3f}).",
        "",
        "| method | test accuracy | 95% interval | trained parameters | train time (s) "
        "| MFLOP / train step |",
        "|---|---|---|---|---|---|",
    ]
    for name, key, count in ROWS:
        accuracy = metrics[f"{key}_test_accuracy"]
        # Normal approximation to the binomial: how far n test sentences pin it down.
        half = 1.96 * np.sqrt(accuracy * (1 - accuracy) / metrics["num_test"])
        trained = f"{metrics[count]:,}" if count else "0"
        seconds = metrics.get(f"{key}_train_time_s")
        flops = metrics.get("cost_flops_per_step" if key == "finetune" else
                            f"{key}_cost_flops_per_step")
        lines.append(f"| {name} | {accuracy:.3f} | ±{half:.3f} | {trained} | "
                     f"{'-' if seconds is None else f'{seconds:.1f}'} | "
                     f"{'-' if flops is None else f'{flops / 1e6:,.1f}'} |")
    return "\n".join(lines)


def plot_results(metrics: dict[str, Any], curves: dict[str, Sequence[float]], path: Path
                 ) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [n.split(" (")[0] for n, _, _ in ROWS]
    values = [metrics[f"{k}_test_accuracy"] for _, k, _ in ROWS]
    left.barh(names[::-1], values[::-1], color="tab:blue")
    left.axvline(metrics["chance_accuracy"], color="gray", ls="--", label="chance")
    for i, v in enumerate(values[::-1]):
        left.text(v + 0.01, i, f"{v:.3f}", va="center")
    left.set(xlim=(0, 1.1), xlabel="test accuracy", title="Stdlib docstring topic")
    left.legend(loc="lower right")
    for name, curve in curves.items():
        right.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
    right.set(xlabel="epoch", ylabel="validation accuracy", ylim=(0, 1),
              title="Validation accuracy during training")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/transfer_minilm")
    parser.add_argument("--checkpoint", default=None,
                        help="a local BERT checkpoint folder (default: the installed MiniLM)")
    parser.add_argument("--quick", action="store_true", help="a tiny run, for a smoke test")
    args = parser.parse_args(argv)
    config = TransferConfig.quick() if args.quick else TransferConfig()
    return run(config, args.workdir, checkpoint=args.checkpoint,
               show_progress=sys.stderr.isatty(), cost_repeats=2 if args.quick else 5)


if __name__ == "__main__":
    main()
