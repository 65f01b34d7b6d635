"""Models, data and states shared by test_parallel.py and its child processes.

Imported by path (no package), after the caller has set ``XLA_FLAGS`` and,
for multi-process children, joined the distributed run.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np

from nnlib.layers import MLP, BatchNorm, Dense
from nnlib.train import TrainState, make_optimizer

GLOBAL_BATCH = 16
FEATURES = 5
CLASSES = 3


class BatchNormNet(nn.Module):
    """Dense -> BatchNorm -> relu -> Dense; ``axis_name`` syncs the statistics."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = Dense(16)(x)
        x = BatchNorm(axis_name=self.axis_name)(x, train=train)
        return Dense(CLASSES)(nn.relu(x))


def make_model(kind: str, axis_name: str | None = None) -> nn.Module:
    if kind == "mlp":
        return MLP((16,), CLASSES)
    if kind == "dropout":
        return MLP((16,), CLASSES, dropout_rate=0.5)
    if kind == "batchnorm":
        return BatchNormNet(axis_name=axis_name)
    raise ValueError(kind)


@functools.cache
def make_state(kind: str, axis_name: str | None = None, optimizer: str = "momentum"):
    """Same seed -> same parameters for every ``axis_name`` (it is no parameter).

    Cached: the optax transformation is a static field of the state, compared
    by identity, so a fresh one would make every jitted step compile again.
    """
    return TrainState.create(model=make_model(kind, axis_name),
                             tx=make_optimizer(optimizer, 0.1), key=jax.random.key(0),
                             example_input=batch_at(0)["inputs"][:2])


def batch_at(step: int, size: int = GLOBAL_BATCH, *, masked: bool = False):
    """The global batch of step ``step``: ``inputs [size, 5]``, ``labels [size]``.

    Rows of different devices differ, so per-device
    statistics would differ from the global ones. With ``masked``, the last
    5 rows are padding (uneven across devices).
    """
    rng = np.random.default_rng(100 + step)
    x = rng.normal(size=(size, FEATURES)).astype(np.float32)
    x = x + np.arange(size, dtype=np.float32)[:, None] / size  # a drift across shards
    y = (np.arange(size) + step) % CLASSES
    # Always a mask (all ones unless ``masked``), so that masked and unmasked
    # batches share one compiled step.
    mask = np.arange(size) < (size - 5 if masked else size)
    return {"inputs": x, "labels": y.astype(np.int32), "mask": mask.astype(np.float32)}


def flat(tree, prefix: str) -> dict[str, np.ndarray]:
    """``{prefix/path: array}`` of a pytree's leaves, on the host."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def record(state, metrics, prefix: str) -> dict[str, np.ndarray]:
    """What a parallel step must reproduce: params, optimizer state, collections,
    step and the float metrics."""
    out = flat(state.params, prefix + "/params")
    out |= flat(state.opt_state, prefix + "/opt_state")
    out |= flat(state.collections, prefix + "/collections")
    out[prefix + "/step"] = np.asarray(state.step)
    for k in ("loss", "accuracy", "grad_norm"):
        out[f"{prefix}/metrics/{k}"] = np.asarray(metrics[k])
    return out
