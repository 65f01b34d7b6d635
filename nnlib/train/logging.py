"""Where a run's numbers go: JSON lines, TensorBoard, PNG curves, progress.

* ``MetricLogger`` appends one JSON object per logged step or evaluation to
  ``<workdir>/history.jsonl`` — ``{"step": 100, "split": "train", "loss": ...}``
  — flushed line by line, so a killed run loses nothing it logged. The same
  scalars go to TensorBoard event files in ``<workdir>/tensorboard`` (tag
  ``"<split>/<name>"``) via tensorboardX, which needs no TensorFlow. On resume
  from a checkpoint at step ``s``, records after ``s`` (written by the run that
  crashed) are dropped from both, so the history reads as one run.
* ``plot_history`` draws learning curves (each metric vs step, one line per
  split) into a PNG with matplotlib's Agg backend (no display needed).
* ``progress`` shows a tqdm bar on a terminal; elsewhere (CI logs, files) it
  prints a short plain line every few steps, because tqdm off a terminal
  writes one ever-growing line of carriage-return updates.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

HISTORY_FILE = "history.jsonl"


def _plain(value: Any) -> Any:
    """numpy / jax scalars -> Python numbers (JSON and TensorBoard want them)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``history.jsonl`` file (a directory means its history file)."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricLogger:
    """Appends metrics to ``history.jsonl`` and TensorBoard event files.

    Args:
      workdir: the run's directory (created if missing).
      tensorboard: also write TensorBoard scalars to ``workdir/tensorboard``.
      resume_step: the step the run (re)starts from; records with a larger
        step, left by an interrupted earlier run, are removed.
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.history_path = self.workdir / HISTORY_FILE
        if resume_step is not None and self.history_path.exists():
            kept = [r for r in read_history(self.history_path) if r["step"] <= resume_step]
            tmp = self.history_path.with_suffix(".jsonl.tmp")
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.history_path)
        self._file = open(self.history_path, "a")  # noqa: SIM115 -- closed in close()
        self._writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # lazy: slow import, optional output

            purge = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: Mapping[str, Any], *, split: str = "train",
            **extra: Any) -> dict[str, Any]:
        """Writes one record ``{"step", "split", **extra, **metrics}`` and returns it.

        ``metrics`` are scalars (sent to TensorBoard as ``split/name``);
        ``extra`` is bookkeeping such as ``epoch`` (JSON only).
        """
        record = {"step": int(step), "split": split}
        record.update({k: _plain(v) for k, v in extra.items()})
        scalars = {k: float(_plain(v)) for k, v in metrics.items()}
        record.update(scalars)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(f"{split}/{name}", value, int(step))
        return record

    def flush(self) -> None:
        self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_BOOKKEEPING = {"step", "split", "epoch", "steps_per_second", "count", "time_s"}


def plot_history(history_path: str | os.PathLike, out_png: str | os.PathLike,
                 *, metrics: tuple[str, ...] | None = None) -> Path:
    """Learning curves from a ``history.jsonl``: one panel per metric (loss,
    accuracy, ...), one line per split (train, val), metric vs step.

    Args:
      history_path: the ``history.jsonl`` file, or the workdir holding it.
      out_png: where to write the PNG.
      metrics: metric names to draw; default every numeric metric logged for
        more than one split or named ``loss``/``accuracy``.
    Returns the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    records = read_history(history_path)
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for r in records:
        for name, value in r.items():
            if name in _BOOKKEEPING or not isinstance(value, int | float) or isinstance(
                    value, bool):
                continue
            xs, ys = series.setdefault(name, {}).setdefault(r["split"], ([], []))
            xs.append(r["step"])
            ys.append(float(value))
    if metrics is None:
        metrics = tuple(n for n in ("loss", "accuracy") if n in series) or tuple(sorted(series))
    metrics = tuple(m for m in metrics if m in series) or ("loss",)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, name in zip(axes[0], metrics, strict=True):
        for split, (xs, ys) in sorted(series.get(name, {}).items()):
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=split)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if series.get(name):
            ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def format_metrics(metrics: Mapping[str, Any], digits: int = 4) -> str:
    """``{"loss": 0.12345, "accuracy": 0.9}`` -> ``"loss 0.1235 accuracy 0.9000"``."""
    parts = []
    for k, v in metrics.items():
        v = _plain(v)
        parts.append(f"{k} {v:.{digits}f}" if isinstance(v, float) else f"{k} {v}")
    return " ".join(parts)


class Progress:
    """A progress display; see ``progress``."""

    def __init__(self, total: int | None, *, desc: str, every: int, file: IO[str],
                 initial: int, use_bar: bool, enabled: bool):
        self.total, self.desc, self.every, self.file = total, desc, max(1, every), file
        self.n = initial
        self.enabled = enabled
        self.postfix: dict[str, Any] = {}
        self._bar = None
        self._t0, self._n0 = time.perf_counter(), initial
        if enabled and use_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, file=file,
                             dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advances by ``n``; ``postfix`` metrics are shown with the count."""
        self.n += n
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix_str(format_metrics(self.postfix), refresh=False)
        elif self.n % self.every == 0 or self.n == self.total:
            self.file.write(self.line() + "\n")
            self.file.flush()

    def line(self) -> str:
        """The plain status line: ``train 50/200 (25%) loss 0.1234 | 31.2 it/s``."""
        count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total \
            else f"{self.n}"
        elapsed = time.perf_counter() - self._t0
        rate = (self.n - self._n0) / elapsed if elapsed > 0 else math.nan
        metrics = format_metrics(self.postfix)
        return f"{self.desc} {count}" + (f" {metrics}" if metrics else "") + f" | {rate:.1f} it/s"

    def write(self, message: str) -> None:
        """Prints a message without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.file)
        else:
            self.file.write(message + "\n")
            self.file.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None, *, desc: str = "train", every: int | None = None,
             file: IO[str] | None = None, initial: int = 0, enabled: bool = True) -> Progress:
    """A tqdm bar when ``file`` (default stderr) is a terminal, else plain lines.

    Args:
      total: number of updates expected (``None`` if unknown).
      desc: label in front of the count.
      every: off a terminal, print a line every this many updates (default:
        about 10 lines over ``total``, or every 100 if ``total`` is unknown).
      file: stream to write to; default ``sys.stderr``.
      initial: starting count (a resumed run).
      enabled: ``False`` shows nothing.
    """
    file = sys.stderr if file is None else file
    if every is None:
        every = max(1, total // 10) if total else 100
    is_tty = bool(getattr(file, "isatty", lambda: False)())
    return Progress(total, desc=desc, every=every, file=file, initial=initial,
                    use_bar=is_tty, enabled=enabled)
