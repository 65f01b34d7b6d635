"""Child process for the resume tests: a small dropout MLP trained with ``fit``.

``python train_mlp.py WORKDIR [--sleep S]`` trains (resuming if WORKDIR holds a
checkpoint) and writes ``WORKDIR/result.npz`` (final params by path) and
``WORKDIR/summary.json``. The tests import ``train`` to make the uninterrupted
reference in-process. ``--sleep`` slows each batch (not the numerics) so the
parent can interrupt the run mid-way.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from nnlib.data import batch_iterator  # noqa: E402
from nnlib.layers import MLP  # noqa: E402
from nnlib.train.loop import fit  # noqa: E402
from nnlib.train.optim import make_optimizer, path_str  # noqa: E402
from nnlib.train.state import TrainState  # noqa: E402

NUM_EPOCHS = 5  # 8 batches per epoch (the last padded): 40 steps
CHECKPOINT_EVERY = 4


def make_data(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] + x[:, 2] > 0).astype(np.int32)
    return {"inputs": x, "labels": labels}


def train(workdir: str, sleep: float = 0.0):
    train_arrays, eval_arrays = make_data(120, 0), make_data(40, 1)
    state = TrainState.create(
        model=MLP((16,), 4, dropout_rate=0.3), tx=make_optimizer("momentum", 0.05),
        key=jax.random.key(0), example_input=train_arrays["inputs"][:1])

    def train_data(epoch):  # a callable source: fit skips the batches already done
        for batch in batch_iterator(train_arrays, 16, seed=3, epoch=epoch):
            time.sleep(sleep)
            yield batch

    return fit(state, train_data, eval_data=eval_arrays, eval_batch_size=40,
               num_epochs=NUM_EPOCHS, log_every=1, checkpoint_every=CHECKPOINT_EVERY, keep=2,
               workdir=workdir, seed=3, plot=False, tensorboard=False, show_progress=False)


def flat_params(params) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    state, summary = train(args.workdir, args.sleep)
    np.savez(os.path.join(args.workdir, "result.npz"), **flat_params(state.params))
    summary.pop("history")
    with open(os.path.join(args.workdir, "summary.json"), "w") as f:
        json.dump(summary, f)
    sys.exit(0)
