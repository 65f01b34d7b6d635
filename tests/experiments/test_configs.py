"""Every experiment config, shrunk to seconds, through ``train_and_evaluate``.

The flax examples' ``train_test.py`` idea: the configs are code, so each one
is run — one or two layers of a few units, a handful of steps, a sliver of
data — and its outputs checked: ``metrics.json`` (parameter count, train
time, validation loss), ``history.jsonl``, ``learning_curves.png``, orbax
checkpoints and TensorBoard events; GPTs also write ``samples.txt``. Running
again on the same workdir must resume from the last checkpoint and take no
further step (checked for one config per way the data reaches ``fit``, to
stay within the time budget). One test drives ``experiments/train.py`` as a real command with
a ``--config.x=y`` override.

What a config *reaches* at full size is ``test_targets.py`` (``make
test-slow``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.tasks import build_task  # noqa: E402
from experiments.train import build_model, train_and_evaluate  # noqa: E402

CONFIG_DIR = ROOT / "experiments" / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt")
STEPS = 4
# Resuming is fit's job (tests/train/test_loop.py); here one config per way
# train_and_evaluate feeds fit: arrays, and batches made by a task's prepare
# (nested seq2seq inputs; MLM masks drawn per batch).
RESUME_CHECKED = ("digits_mlp", "seq2seq_addition", "bert_mlm")

# Per model family: the smallest sizes that still exercise every code path.
TINY_MODELS = {
    "mlp": {"hidden_sizes": (16,)},
    "cnn": {"features": (4, 8), "hidden_sizes": (16,)},
    "rnn": {"hidden_size": 8},
    "transformer": {"num_layers": 1, "num_heads": 2, "embed_dim": 16, "mlp_dim": 32},
    "gpt": {"num_layers": 1, "num_heads": 2, "embed_dim": 16, "context_length": 16},
    "rnn_lm": {"embed_dim": 8, "hidden_size": 16, "num_layers": 1, "context_length": 16},
    "seq2seq_transformer": {"num_layers": 1, "num_heads": 2, "embed_dim": 16, "mlp_dim": 32},
    "bert_mlm": {"num_layers": 1, "num_heads": 2, "hidden_size": 16, "intermediate_size": 32,
                 "max_position_embeddings": 16},
}


def load_config(name: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(name, CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory) -> str:
    """Tiny Shakespeare when this machine has it, else a stand-in text (a smoke
    run needs characters, not Shakespeare)."""
    if SHAKESPEARE.is_file():
        return str(SHAKESPEARE)
    path = tmp_path_factory.mktemp("corpus") / "input.txt"
    path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 400)
    return str(path)


def shrink(config: ml_collections.ConfigDict, corpus: str) -> ml_collections.ConfigDict:
    """The config at smoke-test size: tiny model, few steps, little data."""
    model = config.model.name
    assert model in TINY_MODELS, f"add {model!r} to TINY_MODELS to smoke-test its configs"
    config.model.update(TINY_MODELS[model])
    config.num_steps = STEPS
    config.batch_size = 8
    config.eval_batch_size = 16
    config.log_every = 2
    config.eval_every = STEPS
    config.checkpoint_every = STEPS
    config.warmup_steps = 1
    if config.dataset in ("shakespeare_char", "shakespeare_mlm"):
        config.data_path = corpus
    if config.dataset in ("shakespeare_char", "shakespeare_mlm", "python_code_char"):
        config.max_chars = 20_000
        config.max_val_windows = 16
        config.train_stride = 16
    if model == "gpt":
        # code_gpt samples past its 16-token context (the chunked path, two
        # compilations); the others stay within one context (one compilation).
        config.sample_chars = 24 if config.dataset == "python_code_char" else 8
    if config.dataset == "shakespeare_mlm":
        config.seq_len = 16
    if config.dataset == "addition_seq2seq":
        config.num_train, config.num_val, config.num_test = 64, 16, 16
    return config


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_writes_its_outputs_and_resumes(name, corpus_path, tmp_path):
    config = shrink(load_config(name), corpus_path)
    assert config.dataset and config.model.name and config.seed == 0
    assert (CONFIG_DIR / f"{name}.py").read_text().startswith('"""'), "docstring states the target"

    metrics = train_and_evaluate(config, tmp_path, show_progress=False)

    assert metrics["steps"] == STEPS
    assert metrics["num_params"] > 0 and metrics["train_time_s"] > 0
    assert np.isfinite(metrics["val_loss"]) and np.isfinite(metrics["train_loss"])
    # The cost summary of one train step rides along (nnlib.compress.cost_report).
    assert metrics["cost_flops_per_step"] > 0 and metrics["cost_step_time_s"] > 0
    assert metrics["cost_num_params"] == metrics["num_params"]
    assert metrics["cost_num_steps"] == STEPS and metrics["cost_co2_g"] > 0
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == metrics
    history = read_jsonl(tmp_path / "history.jsonl")
    assert [r["step"] for r in history if r["split"] == "train"] == [2, 4]
    assert [r["step"] for r in history if r["split"] == "val"] == [4]
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == STEPS
    if config.model.name == "gpt":
        sample = (tmp_path / "samples.txt").read_text()
        prompt = config.get("sample_prompt", "\n")
        assert sample.startswith(prompt) and len(sample) == len(prompt) + config.sample_chars
    if config.dataset == "shakespeare_mlm":
        config.seq_len = 16
    if config.dataset == "addition_seq2seq":
        assert 0.0 <= metrics["test_exact_match"] <= 1.0
    if config.dataset == "shakespeare_mlm":
        assert 0.0 <= metrics["val_mlm_accuracy"] <= 1.0

    if name not in RESUME_CHECKED:
        return
    again = train_and_evaluate(config, tmp_path, show_progress=False)

    assert again["steps"] == STEPS  # restored at the end: nothing left to train
    assert again["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)
    assert read_jsonl(tmp_path / "history.jsonl") == history


def test_command_line_run_with_a_config_override(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "train.py"),
         f"--config={CONFIG_DIR / 'digits_mlp.py'}", f"--workdir={tmp_path}",
         "--config.num_steps=3", "--config.batch_size=32", "--config.eval_every=3",
         "--config.warmup_steps=1",
         "--config.model.hidden_sizes=(8,)"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 3
    assert metrics["num_params"] == 64 * 8 + 8 + 8 * 10 + 10  # the override reached the model
    assert '"test_accuracy"' in result.stdout


# --- the pieces train_and_evaluate composes --------------------------------------


def test_addition_splits_hold_distinct_pairs_and_nest_inputs_for_the_model():
    config = load_config("seq2seq_addition")
    config.num_train, config.num_val, config.num_test = 500, 100, 100
    task = build_task(config)
    pairs = {s: {tuple(r) for r in d["source"]} for s, d in
             (("train", task.train), ("val", task.val), ("test", task.test))}
    assert [len(p) for p in pairs.values()] == [500, 100, 100]
    assert not (pairs["train"] & pairs["test"]) and not (pairs["train"] & pairs["val"])
    batch = task.prepare({k: v[:4] for k, v in task.train.items()} | {"mask": np.ones(4)}, (0,))
    assert set(batch["inputs"]) == {"source", "target_in"}
    assert batch["inputs"]["source"].shape == (4, 7) and batch["labels"].shape == (4, 5)
    # target_in is labels shifted right behind BOS (teacher forcing).
    np.testing.assert_array_equal(batch["inputs"]["target_in"][:, 1:], batch["labels"][:, :-1])


def test_unknown_names_are_errors_that_list_the_known_ones():
    config = load_config("digits_mlp")
    config.dataset = "mnist"
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; known: digits, "):
        build_task(config)
    config.model.name = "resnet"
    with pytest.raises(ValueError, match=r"unknown model 'resnet'"):
        build_model(config, 10)
