"""``fit``: the training loop — steps, evaluation, logging, checkpoints, resume.

One call drives a pure ``(state, batch) -> (state, metrics)`` step (by default
``nnlib.train.jit(make_train_step(loss_fn), donate_argnums=0)``: ``jax.jit`` with
the XLA options nnlib picks for the program) over the data:

* **Data** is either a dict of arrays plus ``batch_size`` (batched by
  ``nnlib.data.batch_iterator``: shuffled by ``(seed, epoch)``, last batch
  padded and masked so the step compiles once) or a callable
  ``epoch -> iterable of batches`` that returns the same batches for the same
  epoch every time it is called.
* **Order of work after each step**: non-finite check, train log (every
  ``log_every`` steps, the mean over the window), evaluation (every
  ``eval_every`` steps or at each epoch end), checkpoint (every
  ``checkpoint_every`` steps or at each epoch end, on a new best, and when
  stopping). A checkpoint at step ``s`` therefore follows everything logged
  for ``s``.
* **Exact resume.** With a ``workdir`` that already holds a checkpoint, the
  state is restored and the run continues where it stopped: the epoch is
  re-created from ``(seed, epoch)``, the batches it had done are skipped, and
  each step's key is ``fold_in(state.key, state.step)``. An interrupted run
  restarted with the same arguments ends with bitwise the same parameters as
  an uninterrupted one. History records after the checkpoint are dropped.
* **SIGTERM** (a preempted job): the current step finishes, a checkpoint is
  saved, and ``fit`` returns with ``summary["stop_reason"] == "sigterm"``; the
  previous handler is restored.
* **Non-finite guard.** The step keeps the last good state when the loss or a
  gradient is NaN/Inf; ``fit`` then raises ``NonFiniteError`` naming the step
  and the first non-finite parameter, saving nothing new, so the newest
  checkpoint on disk is the last good one.
* **Outputs** in ``workdir``: ``history.jsonl``, TensorBoard events in
  ``tensorboard/``, orbax checkpoints in ``checkpoints/``, and
  ``learning_curves.png``. Progress: a tqdm bar on a terminal, short plain
  lines otherwise.

The state passed in is donated to the jitted step: use the returned one.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nnlib.data.batching import batch_iterator, num_batches
from nnlib.train.checkpoint import Checkpointer
from nnlib.train.compile import jit
from nnlib.train.logging import (
    MetricLogger,
    format_metrics,
    plot_history,
    progress,
    read_history,
)
from nnlib.train.optim import path_str
from nnlib.train.state import TrainState
from nnlib.train.step import LossFn, average_metrics, make_eval_step, make_train_step

Batch = Mapping[str, Any]
# Step outputs that are guard bookkeeping, not quantities to average and log.
_NOT_LOGGED = ("finite", "nonfinite_leaf")


class NonFiniteError(FloatingPointError):
    """Training produced NaN/Inf.

    Attributes:
      step: the step whose update was rejected (the state stays at this step).
      param_path: path of the first parameter with a non-finite gradient, e.g.
        ``"dense_0/kernel"``; ``None`` when only the loss was non-finite.
      state: the last good ``TrainState``.
    """

    def __init__(self, message: str, *, step: int, param_path: str | None,
                 state: TrainState | None = None):
        super().__init__(message)
        self.step, self.param_path, self.state = step, param_path, state


def _with_last_flag(batches: Iterable[Batch]) -> Iterator[tuple[Batch, bool]]:
    """Yields ``(batch, is_last)``; one batch of look-ahead tells the loop an
    epoch ends *with* this step, so epoch-end work precedes the checkpoint."""
    it = iter(batches)
    try:
        current = next(it)
    except StopIteration:
        return
    for upcoming in it:
        yield current, False
        current = upcoming
    yield current, True


def _train_batches(train_data, batch_size, *, seed, shuffle, drop_remainder):
    """Returns ``(epoch, start_batch) -> iterable`` and the batches per epoch."""
    if isinstance(train_data, Mapping):
        if batch_size is None:
            raise ValueError("fit: train_data is a dict of arrays, so batch_size is required")
        n = len(next(iter(train_data.values()))) if train_data else 0
        # Validate now (empty / mismatched arrays) rather than at the first step.
        batch_iterator(train_data, batch_size, drop_remainder=drop_remainder, shuffle=False)

        def make(epoch: int, start: int) -> Iterable[Batch]:
            return batch_iterator(train_data, batch_size, seed=seed, epoch=epoch,
                                  shuffle=shuffle, drop_remainder=drop_remainder,
                                  start_batch=start)

        return make, num_batches(n, batch_size, drop_remainder)
    if callable(train_data):
        return (lambda epoch, start: itertools.islice(train_data(epoch), start, None)), None
    raise TypeError(
        "fit: train_data must be a dict of arrays (with batch_size) or a callable "
        f"epoch -> iterable of batches, got {type(train_data).__name__}"
    )


def _eval_batches(eval_data, batch_size) -> Callable[[], Iterable[Batch]]:
    if isinstance(eval_data, Mapping):
        if batch_size is None:
            raise ValueError(
                "fit: eval_data is a dict of arrays; pass eval_batch_size (or batch_size)")
        batch_iterator(eval_data, batch_size, shuffle=False)  # validate now
        return lambda: batch_iterator(eval_data, batch_size, shuffle=False)
    if callable(eval_data):
        return eval_data
    if isinstance(eval_data, Sequence):
        return lambda: eval_data
    raise TypeError(
        "fit: eval_data must be a dict of arrays, a callable () -> iterable of batches "
        f"or a list of batches, got {type(eval_data).__name__}"
    )


class _Tracker:
    """Best value of one metric and the evaluations since it last improved."""

    def __init__(self, role: str, metric: str | None, mode: str, min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"fit: mode for {metric!r} must be 'min' or 'max', got {mode!r}")
        self.role, self.metric, self.mode, self.min_delta = role, metric, mode, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def update(self, metrics: Mapping[str, float], step: int) -> bool:
        """Records an evaluation; True if it improved on the best."""
        if self.metric is None:
            return False
        if self.metric not in metrics:
            raise ValueError(
                f"fit: {self.role} {self.metric!r} is not among the evaluation metrics "
                f"{sorted(metrics)}; pass one of those")
        value = float(metrics[self.metric])
        sign = 1.0 if self.mode == "min" else -1.0
        if self.best is None or sign * (self.best - value) > self.min_delta:
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load(self, d: Mapping[str, Any] | None) -> None:
        if d:
            self.best, self.best_step, self.bad_evals = d["best"], d["best_step"], d["bad_evals"]


class _SigtermFlag:
    """Installs a SIGTERM handler that only sets a flag (main thread only)."""

    def __init__(self, enabled: bool):
        self.raised = False
        self._previous = None
        self._installed = enabled and threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


def fit(
    state: TrainState,
    train_data: Mapping[str, np.ndarray] | Callable[[int], Iterable[Batch]],
    *,
    batch_size: int | None = None,
    loss_fn: LossFn | None = None,
    train_step: Callable[[TrainState, Batch], tuple[TrainState, dict]] | None = None,
    eval_step: Callable[[TrainState, Batch], dict] | None = None,
    eval_data: Any = None,
    eval_batch_size: int | None = None,
    eval_name: str = "val",
    num_epochs: int | None = None,
    num_steps: int | None = None,
    eval_every: int | None = None,
    log_every: int = 50,
    workdir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep: int = 3,
    best_metric: str | None = "val_loss",
    best_mode: str = "min",
    early_stopping_patience: int | None = None,
    early_stopping_metric: str | None = None,
    early_stopping_mode: str | None = None,
    early_stopping_min_delta: float = 0.0,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = False,
    handle_sigterm: bool = True,
    plot: bool = True,
    tensorboard: bool = True,
    show_progress: bool = True,
    progress_file: Any = None,
) -> tuple[TrainState, dict[str, Any]]:
    """Trains ``state`` on ``train_data``; returns ``(state, summary)``.

    Args:
      state: the initial ``TrainState`` (donated; also the template a
        checkpoint is restored into).
      train_data: ``{"inputs": [N, ...], "labels": [N, ...]}`` arrays (with
        ``batch_size``), or a callable ``epoch -> iterable of batch dicts``
        that is deterministic per epoch (needed for exact resume).
      batch_size: batch size for array data.
      loss_fn: ``(outputs, batch) -> (loss, metrics)`` for the default train
        and eval steps (default: classification cross-entropy).
      train_step, eval_step: replace the default jitted steps.
      eval_data: arrays dict, callable ``() -> iterable`` or list of batches.
      eval_batch_size: batch size for array eval data (default ``batch_size``).
      eval_name: prefix of evaluation metrics (``"val"`` -> ``"val_loss"``).
      num_epochs, num_steps: stop after this many epochs / total steps (at
        least one is required; the first reached wins).
      eval_every: evaluate every this many steps; ``None``: at each epoch's
        end. A final evaluation follows the last step if it had none.
      log_every: log the train metrics' mean every this many steps.
      workdir: where history, TensorBoard events, checkpoints and the plot
        go; ``None`` writes nothing (and cannot resume).
      checkpoint_dir: override for the checkpoints' directory
        (default ``workdir/checkpoints``).
      checkpoint_every: save every this many steps; ``None``: each epoch end.
      keep: number of recent checkpoints to keep.
      best_metric, best_mode: the checkpoint with the best value of this
        evaluation metric is kept too, and saved when it improves.
      early_stopping_patience: stop after this many evaluations without an
        improvement of ``early_stopping_metric`` (default ``best_metric``)
        by more than ``early_stopping_min_delta``.
      seed, shuffle, drop_remainder: batching of array data (see
        ``nnlib.data.batch_iterator``).
      handle_sigterm: on SIGTERM, finish the step, checkpoint and return.
      plot: write ``workdir/learning_curves.png`` at the end.
      tensorboard: write TensorBoard event files.
      show_progress, progress_file: progress display (default stream stderr).

    Returns:
      ``state``: the final state. ``summary``: ``step``, ``epoch`` (epochs
      completed), ``stop_reason`` (``"completed"``, ``"early_stopping"`` or
      ``"sigterm"``), ``best_step``/``best_value`` of ``best_metric``, the last
      train metrics as ``train_*``, the last evaluation as ``val_*``,
      ``train_time_s`` and ``history`` (the records of ``history.jsonl``).

    Raises:
      NonFiniteError: the loss or a gradient became NaN/Inf.
    """
    if num_epochs is None and num_steps is None:
        raise ValueError("fit: give num_epochs or num_steps (or both) to say when to stop")
    for name, value in (("num_epochs", num_epochs), ("num_steps", num_steps),
                        ("eval_every", eval_every), ("checkpoint_every", checkpoint_every),
                        ("log_every", log_every), ("early_stopping_patience",
                                                   early_stopping_patience)):
        if value is not None and value < 1:
            raise ValueError(f"fit: {name} must be >= 1, got {value}")
    if early_stopping_patience is not None and eval_data is None:
        raise ValueError("fit: early_stopping_patience needs eval_data to evaluate on")
    if eval_every is not None and eval_data is None:
        raise ValueError("fit: eval_every is set but there is no eval_data")

    make_batches, steps_per_epoch = _train_batches(
        train_data, batch_size, seed=seed, shuffle=shuffle, drop_remainder=drop_remainder)
    evaluate_batches = None if eval_data is None else _eval_batches(
        eval_data, eval_batch_size or batch_size)
    if train_step is None:
        train_step = jit(make_train_step(loss_fn), donate_argnums=0)
    if eval_step is None and eval_data is not None:
        eval_step = jit(make_eval_step(loss_fn))
    if eval_data is None:
        best_metric = None
    best = _Tracker("best_metric", best_metric, best_mode)
    stopper = _Tracker("early_stopping_metric", early_stopping_metric or best_metric,
                       early_stopping_mode or best_mode, early_stopping_min_delta)
    if early_stopping_patience is not None and stopper.metric is None:
        raise ValueError("fit: early_stopping_patience needs early_stopping_metric or best_metric")

    # -- restore ---------------------------------------------------------------
    checkpointer = None
    epoch, batch_in_epoch = 0, 0
    window: dict[str, Any] = {"sums": {}, "count": 0}
    resumed_from = None
    if workdir is not None or checkpoint_dir is not None:
        ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else (
            Path(workdir) / "checkpoints")
        checkpointer = Checkpointer(ckpt_dir, keep=keep, best_metric=best_metric,
                                    best_mode=best_mode)
        restored = checkpointer.restore_latest(state)
        if restored is not None:
            state, meta = restored
            resumed_from = int(state.step)
            epoch, batch_in_epoch = int(meta.get("epoch", 0)), int(meta.get("batch", 0))
            if meta.get("seed", seed) != seed:
                warnings.warn(
                    f"fit: resuming a run saved with seed={meta['seed']} using seed={seed}; "
                    "the data order will differ from an uninterrupted run", stacklevel=2)
            best.load(meta.get("best"))
            stopper.load(meta.get("early_stopping"))
            window = meta.get("window", window)
            if meta.get("stop_reason") == "early_stopping":
                num_steps = resumed_from  # that run had finished: nothing left to do
    step = int(state.step)
    logger = None
    if workdir is not None and jax.process_index() == 0:  # one writer per run
        logger = MetricLogger(workdir, tensorboard=tensorboard, resume_step=step)
    history: list[dict[str, Any]] = []

    def log(step_, metrics, split, **extra):
        record = (logger.log(step_, metrics, split=split, **extra) if logger is not None
                  else {"step": step_, "split": split, **extra, **metrics})
        history.append(record)

    total = num_steps
    if num_epochs is not None and steps_per_epoch is not None:
        total = min(total or math.inf, num_epochs * steps_per_epoch)
    bar = progress(None if total is None else int(total), desc="train", every=log_every,
                   file=progress_file, initial=step, enabled=show_progress)
    sigterm = _SigtermFlag(handle_sigterm)
    leaf_paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]

    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    stop_reason = None
    last_saved = resumed_from
    t_start = t_window = time.perf_counter()
    steps_since_log = 0

    def evaluate(at_epoch: int) -> dict[str, float]:
        per_batch = [jax.device_get(eval_step(state, b)) for b in evaluate_batches()]
        metrics = {k: v for k, v in average_metrics(per_batch).items() if k != "count"}
        log(step, metrics, eval_name, epoch=at_epoch)
        bar.write(f"step {step} {eval_name}: {format_metrics(metrics)}")
        return {f"{eval_name}_{k}": v for k, v in metrics.items()}

    def flush_window(at_epoch: int) -> dict[str, float]:
        nonlocal t_window, steps_since_log, last_train
        if not window["count"]:
            return {}
        means = {k: s / window["count"] for k, s in window["sums"].items()}
        elapsed = time.perf_counter() - t_window
        rate = steps_since_log / elapsed if elapsed > 0 and steps_since_log else 0.0
        log(step, means, "train", epoch=at_epoch, steps_per_second=round(rate, 3))
        last_train = {f"train_{k}": v for k, v in means.items()}
        window["sums"], window["count"] = {}, 0
        t_window, steps_since_log = time.perf_counter(), 0
        return means

    def done() -> bool:
        return (num_steps is not None and step >= num_steps) or (
            num_epochs is not None and epoch >= num_epochs)

    try:
        while not done() and stop_reason is None:
            batches = _with_last_flag(make_batches(epoch, batch_in_epoch))
            any_batch = False
            for batch, last_in_epoch in batches:
                any_batch = True
                state, metrics = train_step(state, batch)
                # The guard needs "finite" before the next step can donate this
                # state: one small device-to-host copy per step.
                metrics = jax.device_get(metrics)
                if not bool(metrics.get("finite", True)):
                    raise _nonfinite(step, int(metrics.get("nonfinite_leaf", -1)), leaf_paths,
                                     state, checkpointer)
                batch_epoch = epoch
                step += 1
                steps_since_log += 1
                batch_in_epoch += 1
                if last_in_epoch:
                    epoch, batch_in_epoch = epoch + 1, 0
                for k, v in metrics.items():
                    if k not in _NOT_LOGGED:
                        window["sums"][k] = window["sums"].get(k, 0.0) + float(v)
                window["count"] += 1
                means = flush_window(batch_epoch) if step % log_every == 0 else {}
                bar.update(1, **means)

                if sigterm.raised:
                    stop_reason = "sigterm"
                elif done():
                    stop_reason = "completed"
                # A scheduled evaluation runs even on SIGTERM: the resumed run
                # starts after this step, so skipping it would lose it for good.
                evaluated, new_best = {}, False
                if evaluate_batches is not None and (
                        (eval_every is not None and step % eval_every == 0)
                        or (eval_every is None and last_in_epoch)
                        or stop_reason == "completed"):
                    evaluated = last_eval = evaluate(batch_epoch)
                    new_best = best.update(evaluated, step)
                    stopper.update(evaluated, step)
                    if (early_stopping_patience is not None
                            and stopper.bad_evals >= early_stopping_patience):
                        stop_reason = "early_stopping"
                if stop_reason in ("completed", "early_stopping"):
                    flush_window(batch_epoch)

                if checkpointer is not None and (
                        stop_reason is not None or new_best
                        or (checkpoint_every is not None and step % checkpoint_every == 0)
                        or (checkpoint_every is None and last_in_epoch)):
                    # Metrics go with new bests only: orbax ranks the checkpoints
                    # that carry them and keeps the later of two equal values, which
                    # would delete the (earlier) step the summary names as best.
                    checkpointer.save(state, metrics=evaluated if new_best else None, metadata={
                        "epoch": epoch, "batch": batch_in_epoch, "seed": seed,
                        "best": best.state_dict(), "early_stopping": stopper.state_dict(),
                        "window": window, "stop_reason": stop_reason,
                    })
                    last_saved = step
                if stop_reason is not None:
                    break
            if not any_batch:
                if batch_in_epoch == 0:
                    raise ValueError(f"fit: train_data gave no batches for epoch {epoch}")
                epoch, batch_in_epoch = epoch + 1, 0  # resumed at an epoch's very end
    finally:
        sigterm.restore()
        bar.close()
        if logger is not None:
            logger.close()
        if checkpointer is not None:
            checkpointer.close()

    if logger is not None:
        history = read_history(workdir)
        if plot:
            plot_history(Path(workdir) / "history.jsonl", Path(workdir) / "learning_curves.png")
    summary: dict[str, Any] = {
        "step": step,
        "epoch": epoch,
        "stop_reason": stop_reason or "completed",
        "resumed_from": resumed_from,
        "last_checkpoint": last_saved,
        "best_metric": best.metric,
        "best_step": best.best_step,
        "best_value": best.best,
        "train_time_s": time.perf_counter() - t_start,
        **last_train,
        **last_eval,
        "history": history,
    }
    return state, summary


def _nonfinite(step: int, leaf: int, leaf_paths: list[str], state: TrainState,
               checkpointer: Checkpointer | None) -> NonFiniteError:
    path = leaf_paths[leaf] if 0 <= leaf < len(leaf_paths) else None
    where = (f"first non-finite gradient in params '{path}'" if path is not None
             else "the loss itself was non-finite, all gradients finite")
    kept = ""
    if checkpointer is not None:
        latest = checkpointer.latest_step()
        kept = (f"; the last good checkpoint (step {latest}) is in {checkpointer.directory}"
                if latest is not None else "; no checkpoint had been saved yet")
    return NonFiniteError(
        f"fit: non-finite loss or gradients (NaN/Inf) at step {step} ({where}); the update "
        f"was skipped and training stopped with the state at step {step}{kept}",
        step=step, param_path=path, state=state)
