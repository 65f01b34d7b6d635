"""Checkpoints of a ``TrainState`` with orbax: keep the last k and the best.

A checkpoint of step ``s`` is the directory ``<dir>/<s>/`` holding two items:

* ``state``: the state's pytree leaves — ``step``, ``params``, ``opt_state``,
  ``key`` and ``collections`` (the static ``apply_fn``/``tx`` are code, not
  data: restoring takes them from a *template* state built the same way);
* ``meta``: small JSON metadata from the loop — epoch, batches done in that
  epoch, the data seed, best-metric and early-stopping bookkeeping — whatever
  a resumed run needs to continue exactly.

Retention: the ``keep`` most recent checkpoints are kept, plus (with
``best_metric``) the one with the best value of that metric among the
checkpoints saved with metrics.

Crash safety: orbax writes each checkpoint to ``<s>.orbax-checkpoint-tmp*``
and renames it to ``<s>`` only when complete, so a process killed mid-save
leaves a temp directory that is never listed as a checkpoint (and is removed
when a ``Checkpointer`` next opens the directory). Saves are synchronous: when
``save`` returns, the checkpoint is on disk. ``restore_latest`` also falls
back to the previous checkpoint if the newest one cannot be read (a damaged or
hand-edited directory).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from nnlib.train.state import TrainState

log = logging.getLogger(__name__)

# Orbax names a checkpoint in progress "<step>.orbax-checkpoint-tmp[-<time>]".
_TMP_MARK = ".orbax-checkpoint-tmp"
_STATE_FIELDS = ("step", "params", "opt_state", "key", "collections")


def state_tree(state: TrainState) -> dict[str, Any]:
    """The array part of a ``TrainState`` as a plain dict (what is saved)."""
    return {name: getattr(state, name) for name in _STATE_FIELDS}


class Checkpointer:
    """Saves and restores ``TrainState`` checkpoints in one directory.

    Args:
      directory: where step directories go (created if missing).
      keep: number of most recent checkpoints to keep (>= 1).
      best_metric: a metric name (e.g. ``"val_loss"``); the checkpoint with
        its best value is kept in addition to the last ``keep``. ``None``
        keeps only the most recent ones.
      best_mode: ``"min"`` or ``"max"``: which value of ``best_metric`` is best.

    Use as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
    ):
        if keep < 1:
            raise ValueError(f"Checkpointer: keep must be >= 1, got {keep}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"Checkpointer: best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.best_metric = best_metric
        self.best_mode = best_mode
        retained: list[policies.PreservationPolicy] = [policies.LatestN(n=keep)]
        best_fn = None
        if best_metric is not None:
            worst = math.inf if best_mode == "min" else -math.inf
            # Checkpoints saved between evaluations carry {} and rank worst.
            best_fn = lambda metrics: float(metrics.get(best_metric, worst))
            # BestN sorts ascending and keeps the tail: reverse for "min".
            retained.append(policies.BestN(
                get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            # best_fn also makes orbax write each step's metrics to disk, so a
            # later process still knows which checkpoint was best.
            best_fn=best_fn,
            best_mode=best_mode,
            preservation_policy=policies.AnyPreservationPolicy(retained),
            enable_async_checkpointing=False,
            # Our own synchronous cleanup below: orbax's runs in the background
            # and can race a save that reuses the same temp name.
            cleanup_tmp_directories=False,
            create=True,
        )
        self._remove_partial_saves()
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta"))

    def _remove_partial_saves(self, step: int | None = None) -> None:
        """Deletes temp directories left by interrupted saves (of ``step``, or all)."""
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            stem, sep, _ = name.partition(_TMP_MARK)
            if sep and (step is None or stem == str(step)):
                log.info("removing the partial checkpoint %s/%s", self.directory, name)
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    # -- queries -----------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """Step of the best checkpoint by ``best_metric`` (``None`` if none
        was saved with that metric)."""
        if self.best_metric is None:
            return None
        scored = [(s, self._manager.metrics(s)) for s in self.all_steps()]
        scored = [(s, float(m[self.best_metric])) for s, m in scored
                  if m and self.best_metric in m]
        if not scored:
            return None
        pick = min if self.best_mode == "min" else max
        return pick(scored, key=lambda sv: sv[1])[0]

    # -- save / restore ----------------------------------------------------

    def save(
        self,
        state: TrainState,
        *,
        metadata: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> bool:
        """Saves ``state`` under its step; returns False if that step exists.

        Args:
          state: the state to save (its ``step`` names the checkpoint).
          metadata: JSON-serialisable dict stored beside the state.
          metrics: evaluation metrics *of this state*, e.g. ``{"val_loss": 0.3}``;
            the best-checkpoint retention ranks checkpoints by them.
        """
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return False
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        self._remove_partial_saves(step)  # a failed earlier save of this step
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state_tree(state)),
                meta=ocp.args.JsonSave(dict(metadata or {})),
            ),
            metrics=metrics,
            force=True,
        )
        self._manager.wait_until_finished()
        return True

    def restore(self, step: int, template: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Restores checkpoint ``step`` into the structure of ``template``.

        Returns ``(state, metadata)``; ``state`` has the template's static
        ``apply_fn`` and ``tx`` and the saved arrays.
        """
        target = state_tree(template)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
        )
        return template.replace(**restored["state"]), dict(restored["meta"] or {})

    def restore_latest(self, template: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
        """Restores the newest readable checkpoint; ``None`` if there is none.

        Temp directories of interrupted saves are never candidates. If the
        newest complete-looking checkpoint fails to load, the one before it is
        tried (with a warning); if every one fails, the newest error is raised
        (typically a template that does not match the saved model).
        """
        first_error: Exception | None = None
        for step in reversed(self.all_steps()):
            try:
                return self.restore(step, template)
            except Exception as e:  # noqa: BLE001 -- fall back, re-raised below if all fail
                log.warning("checkpoint %s/%d is unreadable (%s); trying an older one",
                            self.directory, step, e)
                first_error = first_error or e
        if first_error is not None:
            raise ValueError(
                f"Checkpointer: no checkpoint in {self.directory} could be restored into the "
                f"given template state (steps {self.all_steps()}); the newest failed with: "
                f"{first_error}"
            ) from first_error
        return None

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
