"""Few-shot learning by meta-learning: MAML on sinusoids, protonets and MAML on digits.

    python experiments/meta_learning.py --workdir=runs/meta_learning [--size=tiny]

**Sinusoid regression** (Finn, Abbeel & Levine 2017, Section 5.1): tasks
``y = A sin(x - phi)``, ``A ~ U[0.1, 5]``, ``phi ~ U[0, pi]``, ``x ~ U[-5, 5]``;
network 1-40-40-1 ReLU; inner step size 0.01, one inner step in training;
Adam meta-learning rate 1e-3; 25 tasks per meta-batch; K support and K query
points per training task. Three ways to get an initialization, at K = 5 and
K = 10:

* ``maml``: second-order MAML (differentiates through the inner ``jax.grad``);
* ``fomaml``: first-order MAML (inner gradients treated as constants);
* ``pretrained``: the paper's baseline, one network regressed on all tasks
  pooled (same tasks, same Adam, no inner loop); it learns the *average*
  function and is then fine-tuned like the others. With MAML's step 0.01 its
  fine-tuning diverges (its loss surface is far more curved than MAML's
  initialization's), so it is also reported as ``pretrained_tuned``: the step
  size from ``baseline_lrs`` with the lowest query error after
  ``eval_inner_steps`` steps on separate validation tasks.

Each is evaluated on the same held-out tasks: K support points, gradient
descent, mean squared error on 100 fresh query points of the task after 0, 1,
..., 10 steps; mean ± 95% CI over tasks. Finn et al. report this experiment
as plots (their Figure 2); the table puts beside MAML's row the numbers
Li et al. 2017 (Meta-SGD, Table 1) give for MAML on the same task family
after one step, 5-shot 1.13 ± 0.18 and 10-shot 0.85 ± 0.14. Those are quoted
as recalled and could not be checked against the paper's text from this
machine, and Li et al.'s training and test protocol may differ in details
(e.g. meta-training length). Finn et al. meta-train for 70,000 iterations; the
default run here does ``sinusoid_steps`` to stay within minutes on a CPU.

**N-way K-shot digits** (scikit-learn 8x8 digits, ``nnlib.meta.tasks``): the
classes are split, meta-train 0-6, held-out 7-9, so test episodes are 3-way
over digits never seen in meta-training. Meta-training also sees the training
classes turned by 90/180/270 degrees as extra classes (``rotations``; a turn
that looks like a held-out digit, such as an upside-down 6, is dropped), and
only the train/val-split images; the test-split images of classes 0-6 give a
second, "seen classes" test. Methods, all on the same small CNN:

* ``protonet``: prototypical network (Snell et al. 2017), trained on 5-way
  episodes (Snell et al. found training with more ways than testing helps);
* ``maml``: second-order MAML with a 3-way output layer (Finn et al.'s
  Omniglot recipe: inner step 0.4, one step in training, three at test);
* ``scratch``: no meta-learning: the same CNN from its random
  initialization, trained on the support set alone by up to
  ``scratch_steps`` gradient steps (the number of steps and the step size,
  from ``scratch_lrs``, chosen on meta-training episodes);
* ``pixels``: nearest class mean on raw pixels (a prototype classifier with
  no learned embedding; for 1-shot, the nearest neighbour).

Accuracy on the query images, mean ± 95% CI over test episodes.

Compute cost: ``nnlib.compress.cost_report`` of one real meta-training step
of second-order MAML on sinusoids (``cost_*``), of first-order MAML
(``fomaml_cost_*``), and of the digits protonet and MAML steps
(``digits_protonet_cost_*``, ``digits_maml_cost_*``), printed and merged into
the metrics (see ``meta_step_costs`` for how the FLOPs of loops are counted).

Writes ``metrics.json`` (flat keys such as ``sinusoid_k5_maml_mse_step1_mean``,
``digits_1shot_protonet_accuracy_mean``), ``results.md`` (the tables),
``meta_learning.png`` (sinusoid fits before/after adaptation, error vs
gradient steps, digits accuracy bars) and ``config.json``; prints the tables.
``run(config, workdir)`` and the pieces it calls are importable (the notebook
and the smoke test use them at tiny size).
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
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments._cli import sized_main  # noqa: E402
from nnlib import losses  # noqa: E402
from nnlib.compress import cost_report, flops, format_cost  # noqa: E402
from nnlib.layers import MLP  # noqa: E402
from nnlib.meta import (  # noqa: E402
    adaptation_curve,
    digits_episode_samplers,
    inner_adapt,
    make_maml_train_step,
    make_protonet_train_step,
    prototypical_loss,
    sample_sinusoid_tasks,
    sinusoid,
)
from nnlib.models import CNN  # noqa: E402
from nnlib.train import num_params  # noqa: E402

SINUSOID_METHODS = ("maml", "fomaml", "pretrained", "pretrained_tuned")
DIGITS_METHODS = ("protonet", "maml", "scratch", "pixels")
# Li et al. 2017 (Meta-SGD), Table 1, MAML row after one step, as recalled and
# not checked against the paper's text: K -> (mean, ± 95% interval).
PUBLISHED_MAML_SINUSOID = {5: (1.13, 0.18), 10: (0.85, 0.14)}
PUBLISHED_NOTE = "Li et al. 2017, Table 1 (as recalled, unverified)"


@dataclasses.dataclass(frozen=True)
class MetaLearningConfig:
    """Every size and hyperparameter of the run.

    Attributes:
      sinusoid_shots: K values (support points per task).
      hidden_sizes: the regression MLP (Finn et al.: 40, 40, ReLU).
      meta_batch_size: tasks per meta-update (25).
      inner_lr: inner (and test-time fine-tuning) step size (0.01).
      train_inner_steps: inner steps during meta-training (1).
      meta_lr: Adam learning rate of the outer loop (1e-3), also used to
        pretrain the baseline.
      sinusoid_steps: meta-updates per method (Finn et al.: 70,000).
      chunk: meta-updates per compiled ``lax.scan`` (divides ``sinusoid_steps``).
      eval_tasks: held-out tasks (and as many validation tasks to choose the
        baseline's step); eval_query: query points per held-out task;
      eval_inner_steps: fine-tuning steps evaluated (0 .. this).
      baseline_lrs: step sizes tried for ``pretrained_tuned``.
      digits_shots: K of the digits episodes; test_ways: N at test (3 held-out
        classes); protonet_train_ways: N of protonet training episodes;
        digits_queries: query images per class; rotations: rotated training
        classes (``nnlib.meta.rotated_classes``).
      conv_features, embedding_dim: the digits CNN (protonet embedding size).
      protonet_steps, maml_steps: training steps on digits; digits_batch:
        episodes per step; digits_lr: Adam.
      digits_inner_lr, digits_train_inner_steps, digits_test_inner_steps: MAML
        on digits (Finn et al. used 0.4, one step in training, three at test,
        on Omniglot, with batch normalization; this CNN has none, and a step
        of 0.4 taken more often than in training can overshoot, so the number
        of test steps, 1 .. ``digits_test_inner_steps``, is chosen on
        meta-training episodes); digits_task_batching: ``maml_loss``'s ``task_batching``
        (``"map"``: 5x faster than ``"vmap"`` for this CNN on a CPU; but XLA's
        CPU backend at ``--xla_backend_optimization_level=0``, the test
        suite's setting, returns NaN meta-gradients through max-pooling inside
        ``lax.map``, so the tiny config uses ``"vmap"``).
      scratch_steps, scratch_lrs: the from-scratch baseline's largest number
        of gradient steps on the support set, and the step sizes tried (both
        chosen on meta-training episodes).
      eval_episodes: test episodes (held-out and seen classes each).
      cost_repeats: timed calls of each compute-cost report (0 skips them).
      seed: initialization, task and episode draws.
    """

    sinusoid_shots: tuple[int, ...] = (5, 10)
    hidden_sizes: tuple[int, ...] = (40, 40)
    meta_batch_size: int = 25
    inner_lr: float = 0.01
    train_inner_steps: int = 1
    meta_lr: float = 1e-3
    sinusoid_steps: int = 20000
    chunk: int = 1000
    eval_tasks: int = 600
    eval_query: int = 100
    eval_inner_steps: int = 10
    baseline_lrs: tuple[float, ...] = (0.01, 0.003, 0.001, 0.0003)
    digits_shots: tuple[int, ...] = (1, 5)
    test_ways: int = 3
    protonet_train_ways: int = 5
    digits_queries: int = 5
    rotations: bool = True
    conv_features: tuple[int, ...] = (32, 32)
    embedding_dim: int = 64
    protonet_steps: int = 1000
    maml_steps: int = 600
    digits_batch: int = 16
    digits_lr: float = 1e-3
    digits_inner_lr: float = 0.4
    digits_train_inner_steps: int = 1
    digits_test_inner_steps: int = 3
    digits_task_batching: str = "map"
    scratch_steps: int = 10
    scratch_lrs: tuple[float, ...] = (0.1, 0.3, 1.0)
    eval_episodes: int = 600
    cost_repeats: int = 5
    seed: int = 0

    @classmethod
    def tiny(cls) -> MetaLearningConfig:
        """Seconds-scale run for smoke tests and notebooks (numbers are rough)."""
        return cls(sinusoid_shots=(5,), sinusoid_steps=300, chunk=300, eval_tasks=100,
                   eval_query=50, eval_inner_steps=5, baseline_lrs=(0.01, 0.001),
                   digits_shots=(1,), conv_features=(8,), embedding_dim=16,
                   protonet_steps=40, maml_steps=10, digits_batch=4,
                   digits_task_batching="vmap", scratch_steps=3,
                   scratch_lrs=(0.3,), eval_episodes=60, cost_repeats=2)

    def __post_init__(self):
        if self.sinusoid_steps % self.chunk:
            raise ValueError(f"MetaLearningConfig: chunk={self.chunk} must divide "
                             f"sinusoid_steps={self.sinusoid_steps}")


def get_config(size: str = "full") -> MetaLearningConfig:
    """The default run (``"full"``) or the seconds-scale one (``"tiny"``)."""
    if size not in ("full", "tiny"):
        raise ValueError(f"get_config expected size 'full' or 'tiny', got {size!r}")
    return MetaLearningConfig() if size == "full" else MetaLearningConfig.tiny()


def confidence_interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% interval, ``1.96 sd / sqrt(n)``."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))


def _check_finite(what: str, values: jax.Array, first_step: int) -> None:
    """Stops training at the first non-finite loss, naming its step."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(values)))
    if bad.size:
        raise FloatingPointError(f"{what}: non-finite training loss at step "
                                 f"{first_step + int(bad[0])}")


# --- sinusoid regression ---------------------------------------------------------


def sinusoid_model(config: MetaLearningConfig) -> tuple[MLP, Any]:
    """The 1 -> 40 -> 40 -> 1 ReLU regressor and its ``apply_fn(params, x)``."""
    model = MLP(hidden_sizes=config.hidden_sizes, out_features=1, activation="relu")
    return model, lambda params, x: model.apply({"params": params}, x)


def _pretrain_step(tx, apply_fn):
    """Plain regression on the pooled points of every task (no inner loop)."""

    def step(params, opt_state, support, query):
        x = jnp.concatenate([support[0], query[0]], axis=1)  # [T, 2K, 1]
        y = jnp.concatenate([support[1], query[1]], axis=1)
        loss, grads = jax.value_and_grad(lambda p: losses.mean_squared_error(
            apply_fn(p, x.reshape(-1, 1)), y.reshape(-1, 1)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"meta_loss": loss}

    return step


def sinusoid_step(method: str, config: MetaLearningConfig):
    """``(init_params, tx, step)`` for ``"maml"``, ``"fomaml"`` or ``"pretrained"``;
    ``step(params, opt_state, support [T, K, 1] x2, query [T, K, 1] x2)``."""
    model, apply_fn = sinusoid_model(config)
    params = model.init(jax.random.fold_in(jax.random.key(config.seed), 0),
                        jnp.zeros((1, 1)))["params"]
    tx = optax.adam(config.meta_lr)
    if method == "pretrained":
        return params, tx, _pretrain_step(tx, apply_fn)
    return params, tx, make_maml_train_step(
        tx, loss_fn=losses.mean_squared_error, apply_fn=apply_fn, inner_lr=config.inner_lr,
        inner_steps=config.train_inner_steps, first_order=method == "fomaml")


def train_sinusoid(method: str, shots: int, config: MetaLearningConfig
                   ) -> tuple[Any, dict[str, float]]:
    """Meta-trains (or pretrains) the sinusoid regressor.

    Args:
      method: ``"maml"``, ``"fomaml"`` or ``"pretrained"``.
      shots: K support (and K query) points per training task.

    Returns:
      ``(params, info)`` with ``train_time_s``, ``final_train_loss`` (mean of
      the last chunk's losses: post-adaptation query loss for MAML) and
      ``num_params``.
    """
    if method not in ("maml", "fomaml", "pretrained"):
        raise ValueError(f"train_sinusoid expected method 'maml', 'fomaml' or 'pretrained', "
                         f"got {method!r}")
    params, tx, step = sinusoid_step(method, config)

    @jax.jit
    def chunk(params, opt_state, keys):  # many steps per dispatch: the steps are tiny
        def body(carry, k):
            tasks = sample_sinusoid_tasks(k, config.meta_batch_size, num_support=shots,
                                          num_query=shots)
            params, opt_state, metrics = step(*carry, tasks.support, tasks.query)
            return (params, opt_state), metrics["meta_loss"]

        (params, opt_state), chunk_losses = jax.lax.scan(body, (params, opt_state), keys)
        return params, opt_state, chunk_losses

    opt_state = tx.init(params)
    train_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    start = time.perf_counter()
    for i in range(config.sinusoid_steps // config.chunk):
        keys = jax.random.split(jax.random.fold_in(train_key, i), config.chunk)
        params, opt_state, chunk_losses = chunk(params, opt_state, keys)
        _check_finite(f"sinusoid {method}", chunk_losses, i * config.chunk)
    final = float(jnp.mean(chunk_losses))
    return params, {"train_time_s": time.perf_counter() - start, "final_train_loss": final,
                    "num_params": float(num_params(params))}


def evaluate_sinusoid(params: Any, shots: int, config: MetaLearningConfig, *,
                      inner_lr: float | None = None, key: jax.Array | None = None
                      ) -> dict[str, np.ndarray]:
    """Fine-tunes ``params`` on each of ``eval_tasks`` held-out tasks and measures it.

    Args:
      inner_lr: the fine-tuning step (default ``config.inner_lr``).
      key: the tasks' key (default: the held-out test tasks).

    Returns:
      ``{"query_mse": [tasks, eval_inner_steps + 1], "support_mse": [...]}``
      (column s: after s gradient steps on the K support points).
    """
    key = jax.random.fold_in(jax.random.key(config.seed), 2) if key is None else key
    tasks = sample_sinusoid_tasks(key, config.eval_tasks, num_support=shots,
                                  num_query=config.eval_query)
    curve = _sinusoid_curve(config)(
        params, tasks.support, tasks.query, config.inner_lr if inner_lr is None else inner_lr)
    return {"query_mse": np.asarray(curve["query_loss"]),
            "support_mse": np.asarray(curve["support_loss"])}


@functools.lru_cache(maxsize=8)
def _sinusoid_curve(config: MetaLearningConfig):
    # One compiled evaluation per config (hashable); the step size is traced.
    _, apply_fn = sinusoid_model(config)

    def curve(params, support, query, lr):
        return jax.vmap(lambda s, q: adaptation_curve(
            params, s, q, loss_fn=losses.mean_squared_error, apply_fn=apply_fn, inner_lr=lr,
            inner_steps=config.eval_inner_steps))(support, query)

    return jax.jit(curve)


def tune_fine_tuning_lr(params: Any, shots: int, config: MetaLearningConfig
                        ) -> tuple[float, dict[float, float]]:
    """The step size in ``baseline_lrs`` with the lowest mean query MSE after
    ``eval_inner_steps`` steps, on validation tasks (not the test tasks).

    Returns:
      ``(best_lr, {lr: validation MSE})``.
    """
    key = jax.random.fold_in(jax.random.key(config.seed), 6)
    scores = {}
    for lr in config.baseline_lrs:
        mse = evaluate_sinusoid(params, shots, config, inner_lr=lr, key=key)["query_mse"]
        scores[lr] = float(np.nan_to_num(mse[:, -1].mean(), nan=np.inf))
    return min(scores, key=scores.get), scores


def sinusoid_fit(params: Any, config: MetaLearningConfig, *, shots: int, steps: Sequence[int],
                 task_index: int = 0, inner_lr: float | None = None) -> dict[str, np.ndarray]:
    """Predictions on a grid for one held-out task after each of ``steps`` fine-tuning steps
    (for the plot): ``{"x": [200], "truth": [200], "support_x": [K], "support_y": [K],
    "steps_<s>": [200] ...}``."""
    _, apply_fn = sinusoid_model(config)
    tasks = sample_sinusoid_tasks(jax.random.fold_in(jax.random.key(config.seed), 2),
                                  config.eval_tasks, num_support=shots,
                                  num_query=config.eval_query)
    support = (tasks.support[0][task_index], tasks.support[1][task_index])
    grid = jnp.linspace(-5, 5, 200)[:, None]
    out = {"x": np.asarray(grid[:, 0]),
           "truth": np.asarray(sinusoid(grid[:, 0], tasks.amplitude[task_index],
                                        tasks.phase[task_index])),
           "support_x": np.asarray(support[0][:, 0]), "support_y": np.asarray(support[1][:, 0])}
    for s in steps:
        adapted = inner_adapt(params, support, loss_fn=losses.mean_squared_error,
                              apply_fn=apply_fn, inner_steps=s,
                              inner_lr=config.inner_lr if inner_lr is None else inner_lr)
        out[f"steps_{s}"] = np.asarray(apply_fn(adapted, grid)[:, 0])
    return out


# --- digits N-way K-shot ----------------------------------------------------------


def digits_cnn(config: MetaLearningConfig, outputs: int) -> tuple[CNN, Any]:
    """The digits CNN (conv blocks, 2x2 max-pool, one linear layer) and ``apply_fn``."""
    model = CNN(features=config.conv_features, hidden_sizes=(), num_classes=outputs)
    return model, lambda params, x: model.apply({"params": params}, x)


@functools.lru_cache(maxsize=16)
def digits_samplers(shots: int, config: MetaLearningConfig, train_ways: int):
    """``nnlib.meta.DigitsSamplers`` (train, test, seen) for K = ``shots``."""
    return digits_episode_samplers(num_shots=shots, num_queries=config.digits_queries,
                                   train_ways=train_ways, test_ways=config.test_ways,
                                   rotations=config.rotations)


def _accuracy(logits, labels):
    return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def digits_step(method: str, shots: int, config: MetaLearningConfig):
    """``(init_params, tx, step, train_sampler)`` for ``"protonet"`` or ``"maml"``."""
    ways = config.protonet_train_ways if method == "protonet" else config.test_ways
    train_sampler = digits_samplers(shots, config, ways).train
    outputs = config.embedding_dim if method == "protonet" else config.test_ways
    model, apply_fn = digits_cnn(config, outputs)
    params = model.init(jax.random.fold_in(jax.random.key(config.seed), 3),
                        jnp.zeros((1, 8, 8, 1)))["params"]
    tx = optax.adam(config.digits_lr)
    if method == "protonet":
        step = make_protonet_train_step(tx, embed_fn=apply_fn, num_classes=ways)
    else:
        step = make_maml_train_step(tx, loss_fn=losses.softmax_cross_entropy, apply_fn=apply_fn,
                                    inner_lr=config.digits_inner_lr,
                                    inner_steps=config.digits_train_inner_steps,
                                    task_batching=config.digits_task_batching)
    return params, tx, step, train_sampler


def train_digits(method: str, shots: int, config: MetaLearningConfig
                 ) -> tuple[Any, dict[str, float]]:
    """Trains a protonet embedding or a MAML initialization on the meta-training classes.

    Returns:
      ``(params, info)`` (``train_time_s``, ``final_train_loss``, ``num_params``).
      ``"scratch"`` returns the untrained initialization (the same one MAML
      starts from) and ``"pixels"`` returns ``None``.
    """
    if method not in DIGITS_METHODS:
        raise ValueError(f"train_digits expected method in {DIGITS_METHODS}, got {method!r}")
    if method == "pixels":
        return None, {"train_time_s": 0.0, "num_params": 0.0}
    params, tx, step, train_sampler = digits_step("maml" if method == "scratch" else method,
                                                  shots, config)
    if method == "scratch":
        return params, {"train_time_s": 0.0, "num_params": float(num_params(params))}
    name = "loss" if method == "protonet" else "meta_loss"
    num_steps = config.protonet_steps if method == "protonet" else config.maml_steps
    opt_state = tx.init(params)
    train_key = jax.random.fold_in(jax.random.key(config.seed), 4)
    start, recent = time.perf_counter(), []
    for i in range(num_steps):
        episodes = train_sampler(jax.random.fold_in(train_key, i), config.digits_batch)
        params, opt_state, metrics = step(params, opt_state, episodes.support, episodes.query)
        recent = [*recent[-19:], metrics[name]]
        if i % 50 == 49 or i == num_steps - 1:
            _check_finite(f"digits {method}", jnp.stack(recent), i + 1 - len(recent))
    return params, {"train_time_s": time.perf_counter() - start,
                    "final_train_loss": float(np.mean(jax.device_get(recent))),
                    "num_params": float(num_params(params))}


@functools.lru_cache(maxsize=16)
def _episode_accuracy(config: MetaLearningConfig, method: str):
    """Compiled ``(params, support, query, lr) -> accuracy`` of one method: ``[episodes]``
    for the prototype classifiers, ``[episodes, steps + 1]`` (after 0 .. steps
    fine-tuning steps) for ``"maml"`` and ``"scratch"``."""
    if method in ("protonet", "pixels"):
        if method == "protonet":
            _, embed_fn = digits_cnn(config, config.embedding_dim)
        else:
            def embed_fn(_, x):
                return x.reshape(x.shape[0], -1)  # raw pixels [n, 64]
        per_episode = functools.partial(prototypical_loss, embed_fn=embed_fn,
                                        num_classes=config.test_ways)

        def accuracy(params, support, query, lr):
            del lr
            return jax.vmap(per_episode, in_axes=(None, 0, 0))(params, support, query)[1]

        return jax.jit(accuracy)
    _, apply_fn = digits_cnn(config, config.test_ways)
    steps = config.digits_test_inner_steps if method == "maml" else config.scratch_steps

    # lax.map over episodes, not vmap: per-episode conv kernels (see maml_loss).
    def accuracy(params, support, query, lr):
        def one(sq):
            return adaptation_curve(params, sq[0], sq[1], loss_fn=losses.softmax_cross_entropy,
                                    apply_fn=apply_fn, inner_lr=lr, inner_steps=steps,
                                    metric_fn=_accuracy)["query_metric"]  # [steps + 1]

        return jax.lax.map(one, (support, query))

    return jax.jit(accuracy)


def evaluate_digits(method: str, params: Any, shots: int, config: MetaLearningConfig, *,
                    split: str = "test", inner_lr: float | None = None) -> np.ndarray:
    """Per-episode query accuracy, ``test_ways``-way.

    Args:
      split: ``"test"`` (held-out classes 7-9), ``"seen"`` (classes 0-6,
        images never used in meta-training) or ``"train"`` (meta-training
        episodes; to choose the baselines' and MAML's test-time settings).
      inner_lr: fine-tuning step of ``"maml"``/``"scratch"`` (defaults:
        ``digits_inner_lr``; the scratch baseline's must be given).

    Returns:
      ``[eval_episodes]`` for ``"protonet"``/``"pixels"``; ``[eval_episodes,
      steps + 1]`` (accuracy after 0 .. steps fine-tuning steps) for
      ``"maml"`` (``digits_test_inner_steps``) and ``"scratch"``
      (``scratch_steps``). The episodes of a split are the same for every
      method (same key).
    """
    samplers = digits_samplers(shots, config, config.test_ways)
    sampler = getattr(samplers, split)
    episodes = sampler(jax.random.fold_in(jax.random.key(config.seed), 5),
                       config.eval_episodes)
    if method == "scratch" and inner_lr is None:
        raise ValueError("evaluate_digits: the scratch baseline needs inner_lr")
    lr = config.digits_inner_lr if inner_lr is None else inner_lr
    return np.asarray(_episode_accuracy(config, method)(
        params, episodes.support, episodes.query, lr))


# --- compute cost ----------------------------------------------------------------


def meta_step_costs(config: MetaLearningConfig) -> dict[str, Any]:
    """``cost_report`` of one real meta-training step of each kind, as flat keys.

    ``cost_*``: second-order MAML on sinusoids (K = the largest shots, energy
    for ``sinusoid_steps`` steps); ``fomaml_cost_*``: first-order MAML, same
    batch; ``digits_protonet_cost_*`` and ``digits_maml_cost_*``: one digits
    step at K = the largest digits shots. Parameters and optimizer state
    are those of the freshly initialized models (sizes do not change).

    XLA counts a ``while`` loop's body once. The inner loop is a ``lax.scan``
    of one step in training, so that is complete; but digits MAML maps over
    its tasks with ``lax.map`` (a loop), so its ``cost_flops_per_step`` is
    XLA's count of the same step batched with ``vmap`` instead, and
    ``digits_maml_cost_flops_per_step_one_task_counted`` keeps the loop's
    count. The time is that of the real (mapped) step.
    """
    out: dict[str, Any] = {}
    k = max(config.sinusoid_shots)
    tasks = sample_sinusoid_tasks(jax.random.key(config.seed + 7), config.meta_batch_size,
                                  num_support=k, num_query=k)
    for prefix, method in (("", "maml"), ("fomaml_", "fomaml")):
        params, tx, step = sinusoid_step(method, config)
        opt_state = tx.init(params)
        report = cost_report(step, params, opt_state, tasks.support, tasks.query,
                             params=params, opt_state=opt_state,
                             num_steps=config.sinusoid_steps, repeats=config.cost_repeats,
                             warmup=1)
        print(f"sinusoid {method}, one meta-step ({config.meta_batch_size} tasks, K={k}):\n"
              f"{format_cost(report)}", flush=True)
        out |= {f"{prefix}{name}": v for name, v in report.items()}
    shots = max(config.digits_shots)
    for method in ("protonet", "maml"):
        params, tx, step, sampler = digits_step(method, shots, config)
        opt_state = tx.init(params)
        episodes = sampler(jax.random.key(config.seed + 8), config.digits_batch)
        num_steps = config.protonet_steps if method == "protonet" else config.maml_steps
        report = cost_report(step, params, opt_state, episodes.support, episodes.query,
                             params=params, opt_state=opt_state, num_steps=num_steps,
                             repeats=config.cost_repeats, warmup=1)
        if method == "maml" and config.digits_task_batching == "map":
            # lax.map is a while loop, whose body (one task) XLA counts once:
            # count the same step batched with vmap instead (lowered, not run).
            vmapped = make_maml_train_step(
                tx, loss_fn=losses.softmax_cross_entropy,
                apply_fn=digits_cnn(config, config.test_ways)[1],
                inner_lr=config.digits_inner_lr, inner_steps=config.digits_train_inner_steps)
            report["cost_flops_per_step_one_task_counted"] = report["cost_flops_per_step"]
            report["cost_flops_per_step"] = flops(vmapped, params, opt_state, episodes.support,
                                                  episodes.query)
        print(f"digits {method}, one step ({config.digits_batch} episodes, {shots}-shot):\n"
              f"{format_cost(report)}", flush=True)
        out |= {f"digits_{method}_{name}": v for name, v in report.items()}
    return out


# --- the experiment --------------------------------------------------------------


def _cell(metrics, key):
    return f"{metrics[f'{key}_mean']:.3f} ± {metrics[f'{key}_ci95']:.3f}"


def _table(config: MetaLearningConfig, metrics: dict[str, Any]) -> str:
    s = config.eval_inner_steps
    lines = [f"Sinusoid regression (Finn et al. 2017 setup), {config.sinusoid_steps} meta-steps "
             f"per method; query MSE on {config.eval_tasks} held-out tasks after 0, 1 and {s} "
             f"gradient steps on K points (step {config.inner_lr}, except pretrained_tuned); "
             f"mean ± 95% CI.", "",
             f"| K | method | step size | 0 steps | 1 step | {s} steps | published, 1 step |",
             "|---|---|---|---|---|---|---|"]
    for k in config.sinusoid_shots:
        for m in SINUSOID_METHODS:
            prefix = f"sinusoid_k{k}_{m}"
            cells = [_cell(metrics, f"{prefix}_mse_step{i}") for i in (0, 1, s)]
            published = "-"
            if m == "maml" and k in PUBLISHED_MAML_SINUSOID:
                mean, pm = PUBLISHED_MAML_SINUSOID[k]
                published = f"{mean} ± {pm} ({PUBLISHED_NOTE})"
            lines.append(f"| {k} | {m} | {metrics[f'{prefix}_lr']:g} | " + " | ".join(cells)
                         + f" | {published} |")
    lines += ["", f"Digits, {config.test_ways}-way; accuracy over {config.eval_episodes} "
              f"episodes with {config.digits_queries} queries per class, mean ± 95% CI. "
              f"Held-out: classes 7-9, never seen in meta-training (classes 0-6"
              f"{', plus rotations' if config.rotations else ''}). Seen: classes 0-6, "
              f"test-split images not used in meta-training. Protonet trained "
              f"{config.protonet_train_ways}-way for {config.protonet_steps} steps; MAML "
              f"{config.test_ways}-way for {config.maml_steps} steps, "
              f"{config.digits_train_inner_steps} inner step(s) in training, 1 to "
              f"{config.digits_test_inner_steps} at test (chosen on meta-training episodes; "
              f"step {config.digits_inner_lr}); "
              f"scratch: up to {config.scratch_steps} steps from the random initialization "
              f"(steps and step size chosen on meta-training episodes).", "",
              "| K | test classes | " + " | ".join(DIGITS_METHODS) + " |",
              "|---|---|" + "---|" * len(DIGITS_METHODS)]
    for k in config.digits_shots:
        for split, name in (("", "held-out 7-9"), ("_seen", "seen 0-6")):
            lines.append(f"| {k} | {name} | " + " | ".join(
                _cell(metrics, f"digits_{k}shot_{m}{split}_accuracy")
                for m in DIGITS_METHODS) + " |")
    times = ", ".join(f"{k[:-len('_train_time_s')]} {v:.0f}" for k, v in sorted(metrics.items())
                      if k.endswith("_train_time_s") and v > 0)
    lines += ["", f"Training time (s, wall clock): {times}."]
    if "cost_flops_per_step" in metrics:
        lines += ["", "One meta-training step (XLA cost analysis; median wall time):", "",
                  "| step | FLOPs | time (ms) |", "|---|---|---|"]
        for prefix, what in (("", "sinusoid, second-order MAML"),
                             ("fomaml_", "sinusoid, first-order MAML"),
                             ("digits_protonet_", "digits, protonet"),
                             ("digits_maml_", "digits, second-order MAML")):
            lines.append(f"| {what} | {metrics[f'{prefix}cost_flops_per_step']:,.0f} | "
                         f"{metrics[f'{prefix}cost_step_time_s'] * 1e3:.2f} |")
    return "\n".join(lines)


def plot_meta_learning(config: MetaLearningConfig, metrics: dict[str, Any],
                       fits: dict[str, dict[str, np.ndarray]], path: str | Path | None = None):
    """Three panels: one held-out sinusoid fitted from MAML's and the pretrained
    initialization; query MSE vs fine-tuning steps; digits accuracy bars."""
    import matplotlib.pyplot as plt

    fig, (ax_fit, ax_curve, ax_bar) = plt.subplots(1, 3, figsize=(15, 4.2))
    s = config.eval_inner_steps
    k = max(config.sinusoid_shots)
    ref = fits["maml"]
    ax_fit.plot(ref["x"], ref["truth"], "k-", lw=2, label="true task")
    ax_fit.plot(ref["support_x"], ref["support_y"], "k^", ms=8, label=f"{k} support points")
    for method, colour in (("maml", "tab:blue"), ("pretrained_tuned", "tab:red")):
        fit = fits[method]
        ax_fit.plot(fit["x"], fit["steps_0"], ":", color=colour, label=f"{method}, before")
        ax_fit.plot(fit["x"], fit["steps_1"], "--", color=colour, label=f"{method}, 1 step")
        ax_fit.plot(fit["x"], fit[f"steps_{s}"], "-", color=colour, label=f"{method}, {s} steps")
    ax_fit.set(xlabel="x", ylabel="y", title=f"A held-out sinusoid, K={k}")
    ax_fit.legend(fontsize=7)
    colours = plt.get_cmap("tab10")
    steps = np.arange(s + 1)
    for i, k in enumerate(config.sinusoid_shots):
        for j, m in enumerate(SINUSOID_METHODS):
            mean = [metrics[f"sinusoid_k{k}_{m}_mse_curve_{t}"] for t in steps]
            ax_curve.plot(steps, mean, ["-", "--"][i % 2], marker="o", ms=3, color=colours(j),
                          label=f"{m}, K={k}")
    ax_curve.set(xlabel="gradient steps at test", ylabel="query MSE", yscale="log",
                 title="Error vs fine-tuning steps (held-out tasks)")
    ax_curve.legend(fontsize=7)
    width = 0.8 / len(DIGITS_METHODS)
    for j, m in enumerate(DIGITS_METHODS):
        xs = np.arange(len(config.digits_shots)) + (j - (len(DIGITS_METHODS) - 1) / 2) * width
        ax_bar.bar(xs, [metrics[f"digits_{k}shot_{m}_accuracy_mean"] for k in config.digits_shots],
                   width, yerr=[metrics[f"digits_{k}shot_{m}_accuracy_ci95"]
                                for k in config.digits_shots], capsize=3, label=m,
                   color=colours(j))
        ax_bar.plot(xs, [metrics[f"digits_{k}shot_{m}_seen_accuracy_mean"]
                         for k in config.digits_shots], "k_", ms=14, mew=2,
                    label="seen classes 0-6" if j == 0 else None)
    ax_bar.axhline(1 / config.test_ways, color="gray", ls=":", label="chance")
    ax_bar.set_xticks(np.arange(len(config.digits_shots)),
                      [f"{k}-shot" for k in config.digits_shots])
    ax_bar.set(ylabel="test accuracy", ylim=(0, 1.3), yticks=np.linspace(0, 1, 6),
               title=f"Digits {config.test_ways}-way, held-out classes 7-9")
    ax_bar.legend(fontsize=7, loc="upper center", ncol=3)
    for ax in (ax_fit, ax_curve, ax_bar):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def run_sinusoid(config: MetaLearningConfig, metrics: dict[str, Any],
                 artifacts: dict[str, Any]) -> None:
    """Trains and evaluates every sinusoid method; fills ``metrics`` and ``artifacts``."""
    s = config.eval_inner_steps
    for k in config.sinusoid_shots:
        for m in SINUSOID_METHODS:
            prefix = f"sinusoid_k{k}_{m}"
            if m == "pretrained_tuned":
                params = artifacts["sinusoid"][(k, "pretrained")]
                lr, scores = tune_fine_tuning_lr(params, k, config)
                for candidate, score in scores.items():
                    metrics[f"{prefix}_val_mse_lr{candidate:g}"] = score
            else:
                params, info = train_sinusoid(m, k, config)
                artifacts["sinusoid"][(k, m)] = params
                metrics |= {f"{prefix}_{name}": v for name, v in info.items()}
                lr = config.inner_lr
            metrics[f"{prefix}_lr"] = lr
            result = evaluate_sinusoid(params, k, config, inner_lr=lr)
            for t in sorted({0, 1, s}):
                (metrics[f"{prefix}_mse_step{t}_mean"],
                 metrics[f"{prefix}_mse_step{t}_ci95"]) = confidence_interval(
                    result["query_mse"][:, t])
            for t in range(s + 1):
                metrics[f"{prefix}_mse_curve_{t}"] = float(result["query_mse"][:, t].mean())
            if k == max(config.sinusoid_shots):
                artifacts["fits"][m] = sinusoid_fit(params, config, shots=k, steps=(0, 1, s),
                                                    inner_lr=lr)
            print(f"sinusoid K={k} {m:16s} query MSE after 1 step "
                  f"{metrics[f'{prefix}_mse_step1_mean']:.3f}, after {s} "
                  f"{metrics[f'{prefix}_mse_step{s}_mean']:.3f} (step {lr:g})", flush=True)


def run_digits(config: MetaLearningConfig, metrics: dict[str, Any],
               artifacts: dict[str, Any]) -> None:
    """Trains and evaluates every digits method; fills ``metrics`` and ``artifacts``."""
    for k in config.digits_shots:
        for m in DIGITS_METHODS:
            params, info = train_digits(m, k, config)
            artifacts["digits"][(k, m)] = params
            prefix = f"digits_{k}shot_{m}"
            metrics |= {f"{prefix}_{name}": v for name, v in info.items()}
            lr, steps = None, None
            if m in ("maml", "scratch"):
                # Test-time step size and number of steps (1 .. the evaluated
                # maximum) are chosen on meta-training episodes, never on the
                # test episodes.
                candidates = config.scratch_lrs if m == "scratch" else (config.digits_inner_lr,)
                scores = {c: evaluate_digits(m, params, k, config, split="train",
                                             inner_lr=c).mean(0)[1:] for c in candidates}
                lr = max(scores, key=lambda c: scores[c].max())
                steps = 1 + int(np.argmax(scores[lr]))
                metrics[f"{prefix}_lr"] = lr
                metrics[f"{prefix}_test_steps"] = float(steps)
            for split, suffix in (("test", ""), ("seen", "_seen")):
                accuracy = evaluate_digits(m, params, k, config, split=split, inner_lr=lr)
                if accuracy.ndim == 2:
                    for t in range(accuracy.shape[1]):
                        metrics[f"{prefix}{suffix}_accuracy_step{t}"] = float(
                            accuracy[:, t].mean())
                    accuracy = accuracy[:, steps]
                (metrics[f"{prefix}{suffix}_accuracy_mean"],
                 metrics[f"{prefix}{suffix}_accuracy_ci95"]) = confidence_interval(accuracy)
            print(f"digits {k}-shot {m:8s} accuracy held-out "
                  f"{metrics[f'{prefix}_accuracy_mean']:.3f}, seen classes "
                  f"{metrics[f'{prefix}_seen_accuracy_mean']:.3f}", flush=True)


def run(config: MetaLearningConfig, workdir: str | Path | None = None
        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains and evaluates every method; writes the outputs if ``workdir`` is given.

    Returns:
      ``(metrics, artifacts)``: flat metrics and ``{"sinusoid": {(K, method):
      params}, "digits": {(K, method): params}, "fits": {method: sinusoid_fit}}``.
    """
    start = time.perf_counter()
    metrics: dict[str, Any] = {}
    artifacts: dict[str, Any] = {"sinusoid": {}, "digits": {}, "fits": {}}
    run_sinusoid(config, metrics, artifacts)
    run_digits(config, metrics, artifacts)
    metrics["eval_tasks"] = float(config.eval_tasks)
    metrics["eval_episodes"] = float(config.eval_episodes)
    if config.cost_repeats > 0:
        metrics |= meta_step_costs(config)
        metrics["fomaml_flops_ratio"] = (metrics["fomaml_cost_flops_per_step"]
                                         / metrics["cost_flops_per_step"])
    metrics["wall_time_s"] = time.perf_counter() - start

    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        table = _table(config, metrics)
        (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (workdir / "results.md").write_text(table + "\n")
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        plot_meta_learning(config, metrics, artifacts["fits"], workdir / "meta_learning.png")
        print(table, flush=True)
    return metrics, artifacts


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return sized_main(argv, description=__doc__.splitlines()[0], get_config=get_config,
                      run=run, outputs="meta_learning.png")


if __name__ == "__main__":
    main()
