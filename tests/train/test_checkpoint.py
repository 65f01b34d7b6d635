"""Tests for nnlib.train.checkpoint: exact round trips, last-k and best
retention, and that an interrupted save never costs the newest good checkpoint."""

import gc
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnlib.layers import MLP
from nnlib.train.checkpoint import Checkpointer, state_tree
from nnlib.train.optim import make_optimizer
from nnlib.train.state import TrainState

REPO = Path(__file__).resolve().parents[2]
KILL_SCRIPT = Path(__file__).parent / "_loop_scripts" / "kill_mid_save.py"


def _state(seed=0, normalization=None):
    return TrainState.create(
        model=MLP((8,), 3, normalization=normalization), tx=make_optimizer("momentum", 0.1),
        key=jax.random.key(seed), example_input=jnp.zeros((2, 4), jnp.float32))


def _at(state, step):
    return state.replace(step=jnp.asarray(step, jnp.int32))


def _assert_same(a, b):
    la, lb = jax.tree.leaves(state_tree(a)), jax.tree.leaves(state_tree(b))
    assert jax.tree.structure(state_tree(a)) == jax.tree.structure(state_tree(b))
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_with_template_static_fields(tmp_path):
    # BatchNorm gives a non-empty "batch_stats" collection; momentum a real opt_state.
    saved = _state(seed=1, normalization="batch")
    saved = saved.replace(
        step=jnp.int32(7),
        params=jax.tree.map(lambda p: p + 0.5, saved.params),
        opt_state=jax.tree.map(lambda s: s + 0.25, saved.opt_state),
        collections=jax.tree.map(lambda s: s + 2.0, saved.collections))
    template = _state(seed=2, normalization="batch")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(saved, metadata={"epoch": 3, "batch": 2, "seed": 5})
        assert ckpt.latest_step() == 7
        restored, meta = ckpt.restore_latest(template)
    _assert_same(restored, saved)
    assert meta == {"epoch": 3, "batch": 2, "seed": 5}
    assert restored.apply_fn is template.apply_fn and restored.tx is template.tx
    assert restored.collections["batch_stats"]  # the collection survived


def test_empty_directory_restores_nothing_and_repeat_save_is_refused(tmp_path):
    state = _state()
    with Checkpointer(tmp_path / "new") as ckpt:
        assert ckpt.restore_latest(state) is None
        assert ckpt.latest_step() is None and ckpt.best_step() is None
        assert ckpt.save(_at(state, 3))
        assert not ckpt.save(_at(state, 3))  # that step exists already
        assert ckpt.all_steps() == [3]


def test_keeps_only_the_last_k(tmp_path):
    state = _state()
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in range(1, 6):
            ckpt.save(_at(state, step))
        assert ckpt.all_steps() == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]


@pytest.mark.parametrize("mode, values", [
    ("min", [0.9, 0.3, 0.5, 0.6, 0.7, 0.8]),
    ("max", [0.1, 0.9, 0.5, 0.6, 0.2, 0.3]),
])
def test_keeps_the_best_besides_the_last_k(tmp_path, mode, values):
    state = _state()
    best = 4  # the second evaluation, at step 4
    with Checkpointer(tmp_path, keep=2, best_metric="val_loss", best_mode=mode) as ckpt:
        for i, value in enumerate(values):
            ckpt.save(_at(state, 2 * i + 2), metrics={"val_loss": value, "val_accuracy": 0.5})
            # a checkpoint between evaluations carries no metric and ranks worst
            ckpt.save(_at(state, 2 * i + 3))
        assert ckpt.all_steps() == [best, 12, 13]
        assert ckpt.best_step() == best
    # A new process (a new Checkpointer) still knows which one is best.
    with Checkpointer(tmp_path, keep=2, best_metric="val_loss", best_mode=mode) as ckpt:
        assert ckpt.best_step() == best
        ckpt.save(_at(state, 20))
        assert ckpt.all_steps() == [best, 13, 20]


def test_killed_mid_save_leaves_the_latest_complete_checkpoint(tmp_path):
    """A real SIGKILL just before orbax's atomic rename of checkpoint 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(KILL_SCRIPT), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-3000:]
    partial = [n for n in os.listdir(tmp_path) if n.startswith("2.orbax-checkpoint-tmp")]
    assert partial, os.listdir(tmp_path)  # the interrupted save's files are there

    state = _state()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1]
        restored, meta = ckpt.restore_latest(state)
        assert int(restored.step) == 1 and meta == {"epoch": 1}
        assert not [n for n in os.listdir(tmp_path) if "tmp" in n]  # cleaned up
        assert ckpt.save(_at(state, 2))  # the step can be saved again
        assert ckpt.all_steps() == [1, 2]


# A failed orbax restore leaves un-awaited coroutines behind; collect them here
# so their warnings stay with the test that caused them.
_orbax_failed_restore = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


@_orbax_failed_restore
def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    state = _state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(_at(state, 1), metadata={"epoch": 1})
        ckpt.save(_at(state, 2), metadata={"epoch": 2})
    shutil.rmtree(tmp_path / "2" / "state")  # damaged after it was committed
    with Checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING):
        restored, meta = ckpt.restore_latest(state)
    assert int(restored.step) == 1 and meta == {"epoch": 1}
    assert any("2 is unreadable" in r.getMessage() for r in caplog.records)
    gc.collect()


@_orbax_failed_restore
def test_template_that_matches_no_checkpoint_is_a_clear_error(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(_at(_state(), 1))
        other = TrainState.create(model=MLP((5,), 3), tx=make_optimizer("momentum", 0.1),
                                  key=jax.random.key(0), example_input=jnp.zeros((2, 4)))
        with pytest.raises(ValueError, match=r"no checkpoint in .* could be restored into the "
                           r"given template state \(steps \[1\]\)"):
            ckpt.restore_latest(other)
    gc.collect()


def test_metrics_file_is_plain_json(tmp_path):
    with Checkpointer(tmp_path, best_metric="val_loss") as ckpt:
        ckpt.save(_at(_state(), 4), metrics={"val_loss": np.float32(0.25)})
    found = [p for p in (tmp_path / "4").rglob("*") if p.is_file() and "metric" in p.name]
    assert found and json.loads(found[0].read_text()) == {"val_loss": 0.25}


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep=0), "keep must be >= 1, got 0"),
    (dict(best_mode="lowest"), "best_mode must be 'min' or 'max', got 'lowest'"),
])
def test_argument_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Checkpointer(tmp_path, **kwargs)
