"""Keyword spotting on synthetic speech: a CNN over log-mel images vs an LSTM over frames.

    python experiments/keywords.py --workdir=runs/keywords
    python experiments/keywords.py --workdir=/tmp/keywords \\
        --config=experiments/keywords.py:tiny --config.num_steps=100

The task of "Hey Siri" and of the Speech Commands benchmark (Warden 2018):
which of ten words ("yes", "no", "up", "down", "left", "right", "on", "off",
"stop", "go") does a one-second clip hold? The clips come from
``nnlib.audio.synthesize``, a formant synthesizer (no speech corpus or TTS
engine is installed here): every speaker has their own pitch, vocal-tract
length and accent, every clip its own rate, time shift, loudness and
background noise at a random SNR. Train, validation and test speakers are
disjoint, so the test measures generalisation to *new voices*, as Speech
Commands' speaker-disjoint split does.

Pipeline: waveform -> ``nnlib.audio.log_mel_spectrogram`` (40 mel bands,
32 ms windows every 20 ms: ``[frames, mel]``) -> standardise each band with
the training set's mean and std -> two classifiers trained with Adam through
``nnlib.train.fit``:

* **CNN** (``nnlib.models.CNN``): the spectrogram as a one-channel image,
  2-D convolutions over time x mel, the small-footprint KWS design of
  Sainath & Parada (2015);
* **LSTM** (``nnlib.models.RNNClassifier``): the frames as a sequence,
  classified from the mean of its outputs.

Reported on the test speakers: accuracy at the training SNR distribution,
each model's confusion matrix, and accuracy vs SNR (the same test utterances
re-mixed with their noise at fixed SNRs from -15 dB to clean). SNR is over
the whole clip (see ``nnlib.audio.synth``).

What each model costs is measured too: ``nnlib.compress.cost_report`` of
one real training step (XLA's FLOPs and bytes, memory, median step time,
energy extrapolated to the whole run): the CNN's as ``cost_*``, the LSTM's as
``lstm_cost_*``, with ``cost_flops_per_step_with_loop`` counting the LSTM's
scan over frames in full (see :func:`training_cost`).

Writes ``metrics.json`` (flat keys: ``cnn_test_accuracy``,
``lstm_accuracy_snr_0``, ``cost_flops_per_step``, ...), ``results.md`` (the
table), ``config.json``, ``confusion.png``, ``accuracy_vs_snr.png`` and
``examples.png`` into the workdir and prints the table. ``get_config`` and
``run(config, workdir)`` and the pieces it calls are importable (notebook 16
and the smoke test use them at small size).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nnlib import metrics as nn_metrics  # noqa: E402
from nnlib.audio import (  # noqa: E402
    KEYWORDS,
    log_mel_spectrogram,
    mix_at_snr,
    sample_speakers,
    sample_utterances,
    synthesize,
)
from nnlib.compress import cost_report, flops, format_cost  # noqa: E402
from nnlib.models import CNN, RNNClassifier  # noqa: E402
from nnlib.train import TrainState, fit, make_train_step, num_params  # noqa: E402
from nnlib.train import jit as train_jit  # noqa: E402

MODELS = ("cnn", "lstm")
Config = ml_collections.ConfigDict  # see get_config


def get_config(size: str = "full") -> ml_collections.ConfigDict:
    """Data, features, models and training of the keyword-spotting run.

    ``size="tiny"``: seconds-scale, for smoke tests and notebooks (its
    accuracies are rough).

    Fields:
      words: the keywords (classes), keys of ``nnlib.audio.LEXICON``.
      train_speakers, val_speakers, test_speakers: disjoint voices per split.
      train_repeats, eval_repeats: clips per word per speaker.
      snr_db: range of the random background-noise SNR of every split.
      snr_curve_db: fixed SNRs of the accuracy-vs-SNR curve (plus clean).
      sample_rate, n_fft, hop_length, n_mels: the log-mel front end.
      cnn_features, cnn_hidden: conv widths and dense head of the CNN.
      lstm_hidden: LSTM hidden size.
      num_steps, batch_size, learning_rate: Adam training of each model.
      synth_batch: clips rendered per synthesizer call.
      eval_batch: clips per feature / prediction call.
      cost_repeats: timed calls of each model's training step in its compute-cost
        report (:func:`training_cost`); 0 skips the report.
      seed: speakers, utterances, initialisation and data order.
    """
    if size not in ("full", "tiny"):
        raise ValueError(f"get_config expected size 'full' or 'tiny', got {size!r}")
    c = ml_collections.ConfigDict()
    c.words = KEYWORDS
    c.train_speakers, c.val_speakers, c.test_speakers = 48, 8, 16
    c.train_repeats, c.eval_repeats = 4, 3
    c.snr_db = (0.0, 30.0)
    c.snr_curve_db = (-15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 20.0, 30.0)
    # 32 ms windows every 20 ms, 40 bands: 51 frames x 40 mels per 1 s clip.
    c.sample_rate, c.n_fft, c.hop_length, c.n_mels = 16_000, 512, 320, 40
    c.cnn_features, c.cnn_hidden = (16, 32), (64,)
    c.lstm_hidden = 64
    c.num_steps, c.batch_size, c.learning_rate = 800, 64, 2e-3
    c.synth_batch, c.eval_batch = 64, 128
    c.cost_repeats = 5
    c.seed = 0
    if size == "tiny":
        c.train_speakers, c.val_speakers, c.test_speakers = 4, 1, 2
        c.train_repeats, c.eval_repeats = 1, 1
        c.snr_curve_db = (-10.0, 10.0)
        c.n_fft, c.hop_length, c.n_mels = 1024, 640, 20  # 26 frames x 20 mels
        c.cnn_features, c.cnn_hidden, c.lstm_hidden = (8,), (32,), 24
        c.num_steps, c.batch_size, c.learning_rate = 40, 20, 3e-3
        c.synth_batch, c.eval_batch, c.cost_repeats = 20, 20, 2
    return c


# --- data -------------------------------------------------------------------------


def make_keyword_data(config: Config) -> dict[str, dict[str, np.ndarray]]:
    """Synthesises the three splits, each from its own speakers.

    Returns:
      ``{"train" | "val" | "test": {"audio": [n, samples], "speech": [n,
      samples], "noise": [n, samples], "labels": [n], "speaker": [n], "snr_db":
      [n]}}``; speaker ids are global (disjoint across splits).
    """
    counts = {"train": config.train_speakers, "val": config.val_speakers,
              "test": config.test_speakers}
    speakers = sample_speakers(sum(counts.values()), seed=config.seed)
    label_of = {w: i for i, w in enumerate(config.words)}
    data, first = {}, 0
    for i, (split, count) in enumerate(counts.items()):
        ids = list(range(first, first + count))
        first += count
        repeats = config.train_repeats if split == "train" else config.eval_repeats
        # A stream of its own per split: with seed * 1000 + i, seed 0's training
        # utterances drew the very numbers the speakers were drawn from.
        utterance_seed = int(np.random.SeedSequence([config.seed, 1 + i]).generate_state(1)[0])
        utterances = sample_utterances(config.words, [speakers[j] for j in ids], repeats,
                                       snr_db=config.snr_db, seed=utterance_seed)
        parts = synthesize(utterances, sample_rate=config.sample_rate,
                           batch_size=config.synth_batch, return_parts=True)
        per_speaker = repeats * len(config.words)
        data[split] = {
            "audio": parts["audio"], "speech": parts["speech"], "noise": parts["noise"],
            "labels": np.array([label_of[u.word] for u in utterances], np.int32),
            "speaker": np.repeat(np.array(ids, np.int32), per_speaker),
            "snr_db": np.array([np.nan if u.snr_db is None else u.snr_db
                                for u in utterances], np.float32),
        }
    return data


def _batched(fn, x: np.ndarray, batch: int) -> np.ndarray:
    """``fn`` over ``x`` in batches of exactly ``batch`` rows (the last one
    zero-padded), so jit compiles one program whatever ``len(x)``."""
    out = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        pad = np.zeros((batch - len(chunk), *x.shape[1:]), x.dtype)
        out.append(np.asarray(fn(jnp.asarray(np.concatenate([chunk, pad]))))[:len(chunk)])
    return np.concatenate(out)


def log_mel_features(audio: np.ndarray, config: Config) -> np.ndarray:
    """``audio: [n, samples] -> [n, frames, n_mels]`` log-mel spectrograms (jitted,
    ``config.eval_batch`` clips at a time)."""
    fn = jax.jit(lambda x: log_mel_spectrogram(
        x, config.sample_rate, n_fft=config.n_fft, hop_length=config.hop_length,
        n_mels=config.n_mels))
    return _batched(fn, audio, config.eval_batch)


@dataclasses.dataclass(frozen=True)
class BandStandardizer:
    """Per-mel-band z-score fitted on the training spectrograms only.

    ``mean, std: [n_mels]``; ``__call__`` maps ``[..., frames, mel]`` to the
    same shape."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> BandStandardizer:
        flat = features.reshape(-1, features.shape[-1]).astype(np.float64)
        return cls(flat.mean(0).astype(np.float32), (flat.std(0) + 1e-6).astype(np.float32))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.std).astype(np.float32)


# --- models -----------------------------------------------------------------------


def build_model(kind: str, config: Config):
    """``"cnn"``: ``CNN`` on ``[batch, frames, mel, 1]``; ``"lstm"``:
    ``RNNClassifier`` (mean-pooled LSTM outputs) on ``[batch, frames, mel]``.
    Returns ``(model, to_inputs)`` with ``to_inputs: [n, frames, mel] -> the
    model's input layout``."""
    if kind == "cnn":
        model = CNN(features=tuple(config.cnn_features), hidden_sizes=tuple(config.cnn_hidden),
                    num_classes=len(config.words), dropout_rate=0.2)
        return model, lambda f: f[..., None]
    if kind == "lstm":
        model = RNNClassifier(num_classes=len(config.words), hidden_size=config.lstm_hidden,
                              cell="lstm", pooling="mean")
        return model, lambda f: f
    raise ValueError(f"build_model got kind={kind!r}; expected one of {MODELS}")


def _optimizer(config: Config) -> optax.GradientTransformation:
    """Adam with the gradient norm clipped at 1 (LSTMs need it early on)."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(config.learning_rate))


def train_classifier(
    kind: str,
    train: dict[str, np.ndarray],
    config: Config,
    val: dict[str, np.ndarray] | None = None,
) -> tuple[Any, TrainState, dict[str, float]]:
    """Trains one model on standardised features with Adam (gradient norm clipped
    at 1: LSTMs need it early on).

    Args:
      kind: ``"cnn"`` or ``"lstm"``.
      train, val: ``{"inputs": [n, frames, mel], "labels": [n]}``.

    Returns:
      ``(model, state, info)``: the final ``TrainState`` (``state.params``);
      ``info`` has ``num_params``, ``train_time_s``,
      the last ``train_loss``/``train_accuracy`` and, with ``val``,
      ``val_accuracy``.
    """
    model, to_inputs = build_model(kind, config)
    train = {"inputs": to_inputs(train["inputs"]), "labels": train["labels"]}
    state = _create_state(model, config, train["inputs"][:1])
    start = time.perf_counter()
    state, summary = fit(state, train, batch_size=config.batch_size, num_steps=config.num_steps,
                         train_step=train_jit(make_train_step(), donate_argnums=0),
                         seed=config.seed, log_every=min(50, config.num_steps), workdir=None,
                         plot=False, tensorboard=False, show_progress=False)
    info = {k: float(summary[k]) for k in ("train_loss", "train_accuracy") if k in summary}
    info["train_time_s"] = time.perf_counter() - start  # compiling included
    if val is not None:
        logits = predict(model, state.params, val["inputs"], config)
        info["val_accuracy"] = float(np.mean(logits.argmax(1) == val["labels"]))
    info["num_params"] = float(num_params(state.params))
    return model, state, info


def _create_state(model: Any, config: Config, example_input: np.ndarray) -> TrainState:
    """``TrainState.create`` under one ``jit``: initialising eagerly compiles
    every initializer op on its own, seconds of compiling for a tiny model."""
    return jax.jit(lambda key: TrainState.create(
        model=model, tx=_optimizer(config), key=key, example_input=example_input))(
            jax.random.key(config.seed))


def training_cost(
    kind: str,
    model: Any,
    state: TrainState,
    features: np.ndarray,
    labels: np.ndarray,
    config: Config,
    *,
    repeats: int = 5,
) -> dict[str, Any]:
    """``nnlib.compress.cost_report`` of one real training step of ``model``.

    The step :func:`train_classifier` runs (Adam, clipped), from its final
    ``state``, on the first ``config.batch_size`` training spectrograms;
    energy extrapolated to ``config.num_steps`` steps.

    XLA's cost analysis counts a ``scan`` body once, and the LSTM scans its
    cell over the frames (only the input projection runs outside the loop).
    On the CPU the LSTM's loop runs in nnlib's native kernel, which XLA does
    not count at all. So the report adds ``cost_flops_per_step_with_loop``:
    XLA's count for the same step with XLA's recurrence fully unrolled
    (``RNNClassifier(unroll=frames, native=False)``, the same function and
    parameters, no loop), equal to
    ``cost_flops_per_step`` for the CNN, which has no loop. The measured time
    needs no correction.

    Args:
      features: ``[n, frames, mel]`` standardised training spectrograms.
      labels: ``[n]``.

    Returns:
      ``cost_report``'s flat ``cost_*`` dict plus ``cost_flops_per_step_with_loop``.
    """
    _, to_inputs = build_model(kind, config)
    batch = {"inputs": jnp.asarray(to_inputs(features[:config.batch_size])),
             "labels": jnp.asarray(labels[:config.batch_size])}

    report = cost_report(make_train_step(), state, batch, num_steps=config.num_steps,
                         repeats=repeats, warmup=1)
    if kind == "lstm":
        # XLA's recurrence (the native kernel's FLOPs are invisible to XLA).
        unrolled = model.clone(unroll=int(features.shape[1]), native=False)
        report["cost_flops_per_step_with_loop"] = flops(
            make_train_step(), state.replace(apply_fn=unrolled.apply), batch)
    else:
        report["cost_flops_per_step_with_loop"] = report["cost_flops_per_step"]
    return report


@functools.partial(jax.jit, static_argnames=("model",))
def _logits(model: Any, params: Any, features: jax.Array) -> jax.Array:
    inputs = features[..., None] if isinstance(model, CNN) else features  # CNN: one channel
    return model.apply({"params": params}, inputs)


def predict(model: Any, params: Any, features: np.ndarray, config: Config) -> np.ndarray:
    """``features: [n, frames, mel]`` (standardised) -> ``logits: [n, classes]``
    (one compiled program per model, whatever ``n``)."""
    return _batched(lambda x: _logits(model, params, x), features, config.eval_batch)


# --- the experiment ---------------------------------------------------------------


def cost_prefix(kind: str) -> str:
    """Where a model's ``cost_*`` keys go in the metrics: the CNN's are plain
    ``cost_*``, the LSTM's ``lstm_cost_*``."""
    return "" if kind == MODELS[0] else f"{kind}_"


def snr_name(snr: float) -> str:
    """Metric-key suffix of an SNR: ``"-5"``, ``"10"``, ``"clean"``."""
    return "clean" if np.isinf(snr) else f"{snr:g}"


def run(config: Config, workdir: str | Path | None = None,
        data: dict[str, dict[str, np.ndarray]] | None = None, *, verbose: bool = True
        ) -> tuple[dict[str, float], dict[str, Any]]:
    """Synthesises the data (unless ``data``, as :func:`make_keyword_data`
    returns it, is given), trains both models, evaluates them; writes the
    outputs if ``workdir`` is given; ``verbose`` prints progress lines, each
    model's cost report and the table.

    Returns:
      ``(metrics, artifacts)``: flat metrics, and ``{"data", "standardizer",
      "features": {split: [n, frames, mel]}, "models": {kind: (model,
      params)}, "confusion": {kind: [C, C]}, "snr_curve": {kind: {snr:
      accuracy}}, "table": the markdown of results.md}``.
    """
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    data = data or make_keyword_data(config)
    metrics["data_time_s"] = time.perf_counter() - start
    start = time.perf_counter()
    raw = {split: log_mel_features(d["audio"], config) for split, d in data.items()}
    standardizer = BandStandardizer.fit(raw["train"])
    features = {split: standardizer(f) for split, f in raw.items()}
    metrics["feature_time_s"] = time.perf_counter() - start
    for split, d in data.items():
        metrics[f"num_{split}"] = float(len(d["labels"]))
        metrics[f"num_{split}_speakers"] = float(len(np.unique(d["speaker"])))
    metrics["num_frames"], metrics["num_mels"] = map(float, features["train"].shape[1:])
    if verbose:
        print(f"data: {' / '.join(str(len(d['labels'])) for d in data.values())} train / val / "
              f"test clips synthesised in {metrics['data_time_s']:.1f} s, log-mel features "
              f"{features['train'].shape[1:]} in {metrics['feature_time_s']:.1f} s", flush=True)

    # The SNR curve: the test speech re-mixed with its own noise at fixed SNRs.
    test = data["test"]
    curve_snrs = [*config.snr_curve_db, np.inf]
    curve_features = {}
    for snr in curve_snrs:
        noisy = test["speech"] if np.isinf(snr) else mix_at_snr(
            test["speech"], test["noise"], snr)[0]
        curve_features[snr] = standardizer(log_mel_features(noisy, config))

    models, confusion, curves = {}, {}, {}
    num_classes = len(config.words)
    for kind in MODELS:
        model, state, info = train_classifier(
            kind, {"inputs": features["train"], "labels": data["train"]["labels"]}, config,
            val={"inputs": features["val"], "labels": data["val"]["labels"]})
        params = state.params
        models[kind] = (model, params)
        for k, v in info.items():
            metrics[f"{kind}_{k}"] = v
        if verbose:
            print(f"{kind}: {config.num_steps} steps in {info['train_time_s']:.1f} s, train "
                  f"accuracy {info.get('train_accuracy', float('nan')):.3f}, validation "
                  f"accuracy {info['val_accuracy']:.3f}", flush=True)
        if config.cost_repeats > 0:
            report = training_cost(kind, model, state, features["train"],
                                   data["train"]["labels"], config, repeats=config.cost_repeats)
            if verbose:
                print(f"{kind.upper()}, one training step of batch {config.batch_size} (energy: "
                      f"{config.num_steps} steps):\n{format_cost(report)}\n  FLOPs / step with "
                      f"the loop counted in full: {report['cost_flops_per_step_with_loop']:,.0f}",
                      flush=True)
            metrics |= {cost_prefix(kind) + k: v for k, v in report.items()}
        logits = predict(model, params, features["test"], config)
        metrics[f"{kind}_test_accuracy"] = float(np.mean(logits.argmax(1) == test["labels"]))
        confusion[kind] = np.asarray(nn_metrics.confusion_matrix(
            jnp.asarray(logits), jnp.asarray(test["labels"]), num_classes))
        curves[kind] = {}
        for snr, f in curve_features.items():
            acc = float(np.mean(predict(model, params, f, config).argmax(1)
                                == test["labels"]))
            curves[kind][snr] = acc
            metrics[f"{kind}_accuracy_snr_{snr_name(snr)}"] = acc
    metrics["chance_accuracy"] = 1.0 / num_classes

    artifacts = {"data": data, "standardizer": standardizer, "features": features,
                 "models": models, "confusion": confusion, "snr_curve": curves}
    table = results_table(config, metrics)
    artifacts["table"] = table
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (workdir / "results.md").write_text(table + "\n")
        (workdir / "config.json").write_text(config.to_json(indent=2) + "\n")
        plot_confusion(confusion, config.words, workdir / "confusion.png")
        plot_accuracy_vs_snr(curves, workdir / "accuracy_vs_snr.png")
        plot_examples(data["test"], raw["test"], config, workdir / "examples.png")
    if verbose:
        print(table, flush=True)
    return metrics, artifacts


# --- reporting --------------------------------------------------------------------


def results_table(config: Config, metrics: dict[str, float]) -> str:
    """The markdown table of the run."""
    lines = [
        f"Keyword spotting, {len(config.words)} synthetic words; "
        f"{metrics['num_train']:.0f} train / {metrics['num_val']:.0f} val / "
        f"{metrics['num_test']:.0f} test clips from {metrics['num_train_speakers']:.0f} / "
        f"{metrics['num_val_speakers']:.0f} / {metrics['num_test_speakers']:.0f} disjoint "
        f"speakers, SNR uniform in [{config.snr_db[0]:g}, {config.snr_db[1]:g}] dB; "
        f"log-mel {metrics['num_frames']:.0f} frames x {metrics['num_mels']:.0f} bands; "
        f"chance {metrics['chance_accuracy']:.2f}.", "",
        "| model | params | MFLOP / step | ms / step | train s | val acc | test acc |",
        "|---|---|---|---|---|---|---|"]
    for kind in MODELS:
        cost = {k[len(cost_prefix(kind)):]: v for k, v in metrics.items()
                if k.startswith(cost_prefix(kind) + "cost_")}
        flop = cost.get("cost_flops_per_step_with_loop", float("nan")) / 1e6
        step_ms = cost.get("cost_step_time_s", float("nan")) * 1e3
        lines.append(f"| {kind.upper()} | {metrics[f'{kind}_num_params']:,.0f} | "
                     f"{flop:.1f} | {step_ms:.2f} | {metrics[f'{kind}_train_time_s']:.1f} | "
                     f"{metrics.get(f'{kind}_val_accuracy', float('nan')):.3f} | "
                     f"{metrics[f'{kind}_test_accuracy']:.3f} |")
    snrs = [*config.snr_curve_db, np.inf]
    lines += ["", "Test accuracy vs SNR (dB, whole clip):", "",
              "| model | " + " | ".join(snr_name(s) for s in snrs) + " |",
              "|---|" + "---|" * len(snrs)]
    for kind in MODELS:
        lines.append(f"| {kind.upper()} | " + " | ".join(
            f"{metrics[f'{kind}_accuracy_snr_{snr_name(s)}']:.3f}" for s in snrs) + " |")
    lines += ["", f"Data synthesis {metrics['data_time_s']:.1f} s, features "
              f"{metrics['feature_time_s']:.1f} s."]
    if "cost_device" in metrics:
        lines[-1] += (f" One training step of batch {config.batch_size}: XLA's FLOPs (the "
                      f"LSTM's scan counted in full) and the median time of "
                      f"{metrics['cost_timing_repeats']} on {metrics['cost_device']}.")
    return "\n".join(lines)


def plot_confusion(confusion: dict[str, np.ndarray], words: Sequence[str],
                   path: str | Path | None = None):
    """Row-normalised confusion matrices side by side (rows: true word)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(confusion), figsize=(5.2 * len(confusion), 4.6))
    for ax, (kind, matrix) in zip(np.atleast_1d(axes), confusion.items(), strict=True):
        rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(words)):
            for j in range(len(words)):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(words)), words, rotation=60, fontsize=8)
        ax.set_yticks(range(len(words)), words, fontsize=8)
        acc = np.trace(matrix) / max(matrix.sum(), 1)
        ax.set(xlabel="predicted", ylabel="true", title=f"{kind.upper()}: accuracy {acc:.3f}")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def plot_accuracy_vs_snr(curves: dict[str, dict[float, float]], path: str | Path | None = None):
    """Test accuracy against the clip SNR; clean speech drawn at the right edge."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, curve in curves.items():
        finite = sorted(s for s in curve if np.isfinite(s))
        clean_x = finite[-1] + 10
        xs = [*finite, clean_x]
        ax.plot(xs, [curve[s] for s in finite] + [curve[np.inf]], marker="o", label=kind.upper())
    ax.set_xticks(xs, [f"{s:g}" for s in finite] + ["clean"])
    ax.axhline(1 / 10, color="gray", ls=":", label="chance")
    ax.set(xlabel="SNR (dB, whole clip)", ylabel="test accuracy", ylim=(0, 1.02),
           title="Keyword accuracy vs background noise")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def plot_examples(split: dict[str, np.ndarray], log_mel: np.ndarray, config: Config,
                  path: str | Path | None = None):
    """One log-mel spectrogram per word (the first clip of each), time x mel."""
    import matplotlib.pyplot as plt

    words = config.words
    cols = min(5, len(words))
    rows = -(-len(words) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, word) in enumerate(zip(axes.flat, words, strict=False)):
        index = int(np.flatnonzero(split["labels"] == i)[0])
        ax.imshow(log_mel[index].T, origin="lower", aspect="auto", cmap="magma")
        ax.set_title(f"{word} ({split['snr_db'][index]:.0f} dB)", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def main(argv: Sequence[str]) -> None:
    del argv
    import matplotlib
    from absl import flags

    matplotlib.use("Agg")  # files only; a notebook keeps its inline backend
    start = time.perf_counter()
    workdir = flags.FLAGS.workdir
    run(flags.FLAGS.config, workdir)
    print(f"wrote {workdir}/metrics.json, results.md, config.json, confusion.png, "
          f"accuracy_vs_snr.png, examples.png in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", str(Path(__file__).resolve()), "this file (get_config) or FILE:tiny; "
        "override fields with --config.num_steps=400", lock_config=True)
    flags.DEFINE_string("workdir", str(ROOT / "runs" / "keywords"), "where results go")
    app.run(main)
