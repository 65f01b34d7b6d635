"""Tests for nnlib.train.loop.fit: exact resume after SIGKILL and SIGTERM (real
child processes), the non-finite guard, compile-once epochs, early stopping,
best/last-k retention and the run's files (history, TensorBoard, PNG, progress).
"""

import importlib.util
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnlib.data import batch_iterator
from nnlib.layers import MLP
from nnlib.train.checkpoint import Checkpointer
from nnlib.train.logging import MetricLogger, plot_history, progress, read_history
from nnlib.train.loop import NonFiniteError, _nonfinite, fit
from nnlib.train.optim import make_optimizer
from nnlib.train.state import TrainState
from nnlib.train.step import make_train_step

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).parent / "_loop_scripts" / "train_mlp.py"
_spec = importlib.util.spec_from_file_location("_loop_train_mlp", SCRIPT)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)
TOTAL_STEPS = child.NUM_EPOCHS * 8


def _data(n=70, features=8, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    return {"inputs": x, "labels": rng.integers(0, classes, size=n).astype(np.int32)}


def _state(features=8, seed=0, dropout=0.0):
    return TrainState.create(model=MLP((8,), 4, dropout_rate=dropout),
                             tx=make_optimizer("sgd", 0.1), key=jax.random.key(seed),
                             example_input=jnp.zeros((1, features), jnp.float32))


def _comparable(history):
    """History records without wall-clock fields."""
    return [{k: v for k, v in r.items() if k != "steps_per_second"} for r in history]


# -- exact resume in real processes --------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in-process (same code and XLA program as the child)."""
    workdir = tmp_path_factory.mktemp("reference")
    state, summary = child.train(str(workdir))
    assert summary["step"] == TOTAL_STEPS and summary["stop_reason"] == "completed"
    return child.flat_params(state.params), _comparable(read_history(workdir))


def _start(workdir, sleep):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(workdir), "--sleep", str(sleep)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_step(proc, workdir, step, timeout=120.0):
    """Polls history.jsonl until a train record with ``step`` or more appears."""
    deadline = time.monotonic() + timeout
    history = Path(workdir) / "history.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        if history.exists():
            lines = history.read_text().splitlines()
            steps = [json.loads(line)["step"] for line in lines[:-1]]  # last may be partial
            if steps and max(steps) >= step:
                return
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"child did not reach step {step} in {timeout}s")


def _finish(workdir):
    """Runs the child to completion on ``workdir``; returns (params, summary)."""
    proc = _start(workdir, 0.0)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-3000:]
    summary = json.loads((Path(workdir) / "summary.json").read_text())
    with np.load(Path(workdir) / "result.npz") as f:
        return {k: f[k] for k in f.files}, summary


def test_sigkill_then_sigterm_then_resume_is_bitwise_exact(tmp_path, reference):
    """One workdir, three processes: killed (SIGKILL) after step 14, resumed and
    preempted (SIGTERM) after step 26, resumed to the end. The final parameters
    and the history must equal the uninterrupted run's exactly."""
    ref_params, ref_history = reference
    checkpoints = tmp_path / "checkpoints"

    # 1. SIGKILL: no chance to save; the newest complete checkpoint survives.
    proc = _start(tmp_path, 0.05)
    _wait_for_step(proc, tmp_path, 14)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "summary.json").exists()
    killed_at = Checkpointer(checkpoints).latest_step()
    assert killed_at is not None and killed_at < TOTAL_STEPS

    # 2. Resume, then SIGTERM: the step finishes, a checkpoint is saved, exit 0.
    proc = _start(tmp_path, 0.05)
    _wait_for_step(proc, tmp_path, 26)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    stopped = summary["step"]
    assert summary["resumed_from"] == killed_at
    assert summary["stop_reason"] == "sigterm" and 26 <= stopped < TOTAL_STEPS
    assert Checkpointer(checkpoints).latest_step() == stopped
    assert read_history(tmp_path)[-1]["step"] == stopped

    # 3. Resume to the end.
    params, summary = _finish(tmp_path)
    assert summary["resumed_from"] == stopped and summary["stop_reason"] == "completed"
    assert params.keys() == ref_params.keys()
    for k in ref_params:
        assert np.array_equal(params[k], ref_params[k]), f"param {k} differs from the reference"
    # Records the interrupted runs wrote after their checkpoints were dropped.
    assert _comparable(read_history(tmp_path)) == ref_history


def test_sigterm_in_process_saves_restores_the_handler_and_resumes(tmp_path):
    arrays = _data(70)
    sent = []

    def train_data(epoch):
        for i, batch in enumerate(batch_iterator(arrays, 16, seed=0, epoch=epoch)):
            if (epoch, i) == (0, 3) and not sent:
                # fit reads one batch ahead: this arrives while step 3 is prepared
                sent.append(os.kill(os.getpid(), signal.SIGTERM))
            yield batch

    before = signal.getsignal(signal.SIGTERM)
    kwargs = dict(num_epochs=2, workdir=tmp_path, eval_data=lambda: [_data(8, seed=1)],
                  plot=False, tensorboard=False, show_progress=False)
    _, summary = fit(_state(), train_data, **kwargs)
    assert signal.getsignal(signal.SIGTERM) is before
    assert summary["stop_reason"] == "sigterm" and summary["step"] == 3
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 3

    with pytest.warns(UserWarning, match="saved with seed=0 using seed=1"):
        _, summary = fit(_state(), train_data, seed=1, **kwargs)
    assert summary["resumed_from"] == 3 and summary["step"] == 10
    assert summary["stop_reason"] == "completed" and "val_loss" in summary


# -- non-finite guard --------------------------------------------------------------


class _GatedModel(nn.Module):
    """Logits plus ``where(poison, 0, sqrt(temperature - 2 * poison))``: the loss
    stays finite on a poisoned batch, but the masked branch's NaN derivative
    reaches only the ``temperature`` gradient (the classic where-NaN leak)."""

    @nn.compact
    def __call__(self, x, *, train=False):
        poison = x[:, -1:]  # [B, 1], 1.0 marks the poisoned batch
        temperature = self.param("temperature", nn.initializers.ones, (), jnp.float32)
        logits = nn.Dense(4, name="head")(x[:, :-1])
        return logits + jnp.where(poison > 0.5, 0.0, jnp.sqrt(temperature - 2.0 * poison))


def test_nonfinite_gradient_raises_naming_step_and_param_and_keeps_last_good(tmp_path):
    state = TrainState.create(model=_GatedModel(), tx=make_optimizer("sgd", 0.1),
                              key=jax.random.key(0), example_input=jnp.zeros((1, 5)))
    rng = np.random.default_rng(0)
    batches = [{"inputs": rng.normal(size=(8, 5)).astype(np.float32) * np.array(
        [1, 1, 1, 1, 0], np.float32), "labels": rng.integers(0, 4, 8).astype(np.int32)}
        for _ in range(4)]

    def train_data(epoch):  # 4 batches per epoch; the 6th batch overall is poisoned
        for i, b in enumerate(batches):
            poisoned = dict(b, inputs=b["inputs"].copy())
            poisoned["inputs"][:, -1] = float(epoch * 4 + i == 5)
            yield poisoned

    with pytest.raises(NonFiniteError, match=r"at step 5 .*params 'temperature'.*last good "
                       r"checkpoint \(step 4\)") as info:
        fit(state, train_data, num_epochs=3, checkpoint_every=2, log_every=1, workdir=tmp_path,
            plot=False, tensorboard=False, show_progress=False)
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert err.step == 5 and err.param_path == "temperature"
    assert int(err.state.step) == 5  # the step kept the last good state
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(err.state.params))
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 4]  # nothing saved at or after the failure
    assert max(r["step"] for r in read_history(tmp_path)) == 5


def test_nonfinite_loss_only_message():
    err = _nonfinite(3, -1, ["a/kernel"], state=None, checkpointer=None)
    assert err.param_path is None and "at step 3" in str(err)
    assert "loss itself was non-finite" in str(err)


# -- compile once ------------------------------------------------------------------


def test_whole_epochs_with_padded_last_batch_compile_the_step_once(caplog):
    traces = []
    step_fn = make_train_step()

    def counted(state, batch):
        traces.append(1)  # runs at trace time only
        return step_fn(state, batch)

    # 70 examples / 16 = 4 full batches + a padded one of 6 real rows.
    fit(_state(dropout=0.1), _data(70), batch_size=16, num_epochs=2,
        train_step=jax.jit(counted, donate_argnums=0), show_progress=False)
    assert len(traces) == 1

    # The default step, observed through jax's own compile log.
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        fit(_state(), _data(70), batch_size=16, num_epochs=2, show_progress=False)
    compiles = [r for r in caplog.records if "Compiling" in r.getMessage()
                and "train_step" in r.getMessage()]
    assert len(compiles) == 1, [r.getMessage() for r in compiles]


# -- early stopping and best checkpoint --------------------------------------------


def _scripted_eval(values):
    """An eval step returning ``values`` in turn (one batch per evaluation)."""
    calls = iter(values)
    return lambda state, batch: {"loss": np.float32(next(calls)), "count": np.float32(1.0)}


def test_early_stopping_and_best_plus_last_k_retention(tmp_path):
    # 5 batches per epoch; best at epoch 3, then 3 evaluations without improvement.
    losses = [5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 1.0, 0.5]
    kwargs = dict(batch_size=16, eval_data=[{}], num_epochs=8, keep=2,
                  early_stopping_patience=3, workdir=tmp_path, plot=False,
                  tensorboard=False, show_progress=False)
    state, summary = fit(_state(), _data(70), eval_step=_scripted_eval(losses), **kwargs)
    assert summary["stop_reason"] == "early_stopping"
    assert summary["epoch"] == 6 and summary["step"] == 30
    assert summary["best_step"] == 15 and summary["best_value"] == 3.0
    assert summary["val_loss"] == pytest.approx(3.1)
    with Checkpointer(tmp_path / "checkpoints", best_metric="val_loss") as ckpt:
        assert ckpt.all_steps() == [15, 25, 30]  # the best + the last two
        assert ckpt.best_step() == 15
    # Re-running a finished (early-stopped) run does no more training.
    state, again = fit(_state(), _data(70), eval_step=_scripted_eval([]), **kwargs)
    assert again["step"] == 30 and again["resumed_from"] == 30


def test_best_checkpoint_kept_when_later_evaluations_tie(tmp_path):
    # Equal values after the best (an accuracy plateau): the summary names the
    # first, and that checkpoint must be the one kept on disk.
    _, summary = fit(_state(), _data(70), eval_step=_scripted_eval([5.0, 3.0, 3.0, 3.0]),
                     batch_size=16, eval_data=[{}], num_epochs=4, keep=1, workdir=tmp_path,
                     plot=False, tensorboard=False, show_progress=False)
    assert summary["best_step"] == 10 and summary["best_value"] == 3.0
    with Checkpointer(tmp_path / "checkpoints", best_metric="val_loss") as ckpt:
        assert ckpt.all_steps() == [10, 20]
        assert ckpt.best_step() == 10


def test_early_stopping_min_delta_and_max_mode():
    accuracies = iter([0.5, 0.6, 0.605, 0.61, 0.9])
    _, summary = fit(_state(), _data(70), batch_size=16, eval_data=[{}], num_epochs=5,
                     eval_step=lambda s, b: {
                         "accuracy": np.float32(next(accuracies)), "count": np.float32(1.0)},
                     best_metric="val_accuracy", best_mode="max",
                     early_stopping_patience=2, early_stopping_min_delta=0.02,
                     show_progress=False)
    assert summary["stop_reason"] == "early_stopping" and summary["epoch"] == 4
    assert summary["best_value"] == pytest.approx(0.61)  # best keeps the exact max


# -- files: history, TensorBoard, plot, progress -------------------------------------


def _tensorboard_scalars(directory):
    from tensorboardX.proto import event_pb2

    scalars = []
    for path in Path(directory).glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                scalars.append((v.tag, event.step, v.simple_value))
    return scalars


def test_history_tensorboard_png_and_plain_progress(tmp_path):
    out = io.StringIO()  # not a terminal: plain lines, no tqdm
    state, summary = fit(_state(), _data(70), batch_size=16, eval_data=_data(20, seed=1),
                         num_epochs=2, log_every=2, workdir=tmp_path, progress_file=out)
    history = read_history(tmp_path)
    assert history == summary["history"]
    train = [r for r in history if r["split"] == "train"]
    val = [r for r in history if r["split"] == "val"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10]
    assert [r["step"] for r in val] == [5, 10] and [r["epoch"] for r in val] == [0, 1]
    assert {"loss", "accuracy", "grad_norm"} <= train[0].keys()
    assert summary["val_loss"] == val[-1]["loss"]

    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert ("train/loss", 2, pytest.approx(train[0]["loss"])) in scalars
    assert ("val/accuracy", 10, pytest.approx(val[-1]["accuracy"])) in scalars

    png = tmp_path / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert all(len(line) < 120 for line in lines), lines
    assert sum(line.startswith("train ") for line in lines) == 5
    assert any(line.startswith("train 4/10 (40%) ") and "loss " in line for line in lines)
    assert sum(line.startswith("step ") and " val: " in line for line in lines) == 2


# -- argument errors ---------------------------------------------------------------


@pytest.mark.parametrize("data, kwargs, error, match", [
    ("arrays", dict(batch_size=16), ValueError, "give num_epochs or num_steps"),
    ("arrays", dict(num_steps=2), ValueError, "batch_size is required"),
    ("arrays", dict(batch_size=16, num_steps=0), ValueError, "num_steps must be >= 1, got 0"),
    ("arrays", dict(batch_size=16, num_steps=2, eval_every=1), ValueError,
     "eval_every is set but"),
    ("arrays", dict(batch_size=16, num_steps=2, early_stopping_patience=2), ValueError,
     "early_stopping_patience needs eval_data"),
    ("callable", dict(num_steps=2, eval_data=_data(3)), ValueError, "eval_batch_size"),
    ("arrays", dict(batch_size=16, num_steps=2, eval_data=3), TypeError,
     "eval_data must be .* got int"),
    ("arrays", dict(batch_size=16, num_steps=2, eval_data=_data(3), best_mode="lowest"),
     ValueError, "mode for 'val_loss' must be 'min' or 'max', got 'lowest'"),
    ("arrays", dict(batch_size=16, num_steps=2, eval_data=_data(3), best_metric="val_f1"),
     ValueError, r"best_metric 'val_f1' is not among the evaluation metrics \['val_accuracy', "
     r"'val_loss'\]"),
    ("arrays", dict(batch_size=16, num_steps=2, eval_data=_data(3), best_metric=None,
                    early_stopping_patience=1), ValueError,
     "early_stopping_patience needs early_stopping_metric or best_metric"),
])
def test_fit_argument_errors(data, kwargs, error, match):
    train_data = _data() if data == "arrays" else (lambda epoch: [])
    with pytest.raises(error, match=match):
        fit(_state(), train_data, show_progress=False, **kwargs)


def test_fit_data_errors():
    with pytest.raises(TypeError, match="train_data must be a dict of arrays .* got list"):
        fit(_state(), [1, 2], num_steps=1)
    with pytest.raises(ValueError, match="train_data gave no batches for epoch 0"):
        fit(_state(), lambda epoch: [], num_steps=1, show_progress=False)
    with pytest.raises(ValueError, match=r"'inputs': 70, 'labels': 3"):
        fit(_state(), {"inputs": _data()["inputs"], "labels": np.zeros(3)}, batch_size=4,
            num_steps=1)


# -- logging pieces ----------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_uses_tqdm_on_a_terminal_and_can_be_silenced():
    term = _Terminal()
    with progress(4, desc="train", file=term) as bar:
        for _ in range(4):
            bar.update(1, loss=np.float32(0.5))
        bar.write("a message")
    text = term.getvalue()
    assert "\r" in text and "4/4" in text and "a message" in text

    quiet = io.StringIO()
    with progress(4, file=quiet, enabled=False) as bar:
        bar.update(4, loss=0.1)
        bar.write("hidden")
    assert quiet.getvalue() == ""

    plain = io.StringIO()
    bar = progress(None, file=plain, every=2)
    bar.update(2, step_name="x")
    assert plain.getvalue().startswith("train 2 step_name x | ")


def test_metric_logger_resume_truncates_history_and_plots_chosen_metrics(tmp_path):
    assert read_history(tmp_path / "missing.jsonl") == []
    with MetricLogger(tmp_path, tensorboard=False) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss": np.float32(1.0 / step)}, epoch=np.int64(0))
        logger.flush()
    with MetricLogger(tmp_path, tensorboard=False, resume_step=2) as logger:
        logger.log(3, {"loss": 0.25}, split="val")
    history = read_history(tmp_path)
    assert [(r["step"], r["split"]) for r in history] == [(1, "train"), (2, "train"), (3, "val")]
    assert history[0]["epoch"] == 0 and history[1]["loss"] == 0.5

    png = plot_history(tmp_path, tmp_path / "loss.png", metrics=("loss", "absent"))
    assert png.read_bytes()[:4] == b"\x89PNG"
