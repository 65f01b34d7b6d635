"""Child of test_parallel.py: every 8-device check in one process.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``:
``python multi_device.py OUT_DIR``. Writes ``OUT_DIR/arrays.npz`` (the
single-device step's results and each parallel method's, keyed
``case/method/when/...``) and prints one JSON line with error messages; the
parent asserts on both. Compiles dominate the run time, so every step function
is built once and reused.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import numpy as np
import parallel_common as common  # beside this script, first on sys.path
from jax.sharding import PartitionSpec as P

from nnlib.train import classification_loss, make_eval_step, make_train_step
from nnlib.train import parallel as par

STEPS = 3
RECORDED = (1, 3)  # after one step and after a few
MESH = None  # set in main


@functools.cache
def step_fn(kind, method, optimizer):
    """One compiled step per (model, method, optimizer)."""
    del kind, optimizer  # part of the cache key only: each has its own state
    if method == "single":
        return jax.jit(make_train_step())
    if method == "pmap":
        return par.make_pmap_train_step()
    return par.make_data_parallel_train_step(mesh=MESH, method=method)


def run(kind, method, out, *, optimizer="momentum", masked=False, steps=STEPS, name=None):
    """``steps`` steps of ``method`` on the global batches 1..steps; records
    ``{name}/{method}/s{i}/...`` after the steps in ``RECORDED``."""
    axis = {"single": None, "jit": None, "shard_map": "data", "pmap": "batch"}[method]
    state = common.make_state(kind, axis, optimizer)
    if method == "pmap":
        state, place = par.replicate_for_pmap(state), par.split_for_pmap
    elif method != "single":
        state, place = par.replicate(state, MESH), functools.partial(par.shard_batch, mesh=MESH)
    else:
        place = lambda batch: batch  # noqa: E731
    step = step_fn(kind, method, optimizer)
    for i in range(1, steps + 1):
        state, metrics = step(state, place(common.batch_at(i, masked=masked)))
        if i in RECORDED:
            if method == "pmap":
                state_i, metrics_i = par.unreplicate(state), par.unreplicate(metrics)
            else:
                state_i, metrics_i = state, metrics
            out |= common.record(state_i, metrics_i, f"{name or kind}/{method}/s{i}")


def error_of(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def main(out_dir):
    global MESH
    assert jax.device_count() == 8, jax.devices()
    MESH = par.make_mesh()
    out, errors = {}, {}

    # The same step, three compositions, against one device on the same global batches.
    for kind in ("mlp", "batchnorm"):
        for method in ("single", "jit", "shard_map", "pmap"):
            run(kind, method, out)

    # Padding uneven across devices: exact under jit; per-device means under shard_map.
    for method in ("single", "jit", "shard_map"):
        run("mlp", method, out, masked=True, steps=1, name="masked")

    # Eval: count-weighted global means in every method, padding included.
    state = common.make_state("batchnorm", None)
    batch = common.batch_at(5, masked=True)
    evals = {
        "single": jax.jit(make_eval_step())(state, batch),
        "jit": par.make_data_parallel_eval_step(mesh=MESH)(
            par.replicate(state, MESH), par.shard_batch(batch, MESH)),
        "shard_map": par.make_data_parallel_eval_step(mesh=MESH, method="shard_map")(
            par.replicate(state, MESH), par.shard_batch(batch, MESH)),
        "pmap": par.unreplicate(par.make_pmap_eval_step()(
            par.replicate_for_pmap(state), par.split_for_pmap(batch))),
    }
    for method, metrics in evals.items():
        out |= {f"eval/{method}/{k}": np.asarray(v) for k, v in metrics.items()}

    # Dropout. jit: the mask of the global batch, as on one device. shard_map:
    # device d draws with fold_in(key, d); with plain SGD the update is the mean
    # of the single-device updates on each shard with those keys.
    for method in ("single", "jit", "shard_map"):
        run("dropout", method, out, optimizer="sgd", steps=1)
    state = common.make_state("dropout", None, "sgd")
    batch = common.batch_at(1)
    single = step_fn("dropout", "single", "sgd")
    per_device = []
    for d in range(8):
        key = jax.random.key_data(jax.random.fold_in(state.rng, d))
        shard = jax.tree.map(lambda x, d=d: x[2 * d:2 * d + 2], batch)
        per_device.append(common.record(*single(state.replace(key=key), shard), ""))
    out |= {f"dropout/per_device_mean/s1{k}": np.mean([r[k] for r in per_device], 0)
            for k in per_device[0] if "/params" in k or k.endswith("loss")}

    # The pitfall. pmap's pattern, grad of the local loss then pmean of the
    # gradients, under shard_map: every gradient comes out 8x, with no error.
    state = common.make_state("mlp", None)
    loss_fn = classification_loss()

    def grads_of(params, b):
        return jax.grad(lambda p: loss_fn(state.apply_fn({"params": p}, b["inputs"]), b)[0])(
            params)

    pmap_pattern = jax.jit(jax.shard_map(
        lambda p, b: jax.lax.pmean(grads_of(p, b), "data"),
        mesh=MESH, in_specs=(P(), P("data")), out_specs=P()))
    placed = par.replicate(state, MESH), par.shard_batch(batch, MESH)
    out |= common.flat(pmap_pattern(placed[0].params, placed[1]), "pitfall/pmap_pattern")
    out |= common.flat(jax.jit(grads_of)(state.params, batch), "pitfall/single")
    # The whole step with gradient_reduction="gradients" is rejected instead:
    # its metrics (so its non-finite guard, so its state) differ across devices.
    gradients_step = jax.jit(jax.shard_map(
        make_train_step(axis_name="data", gradient_reduction="gradients"),
        mesh=MESH, in_specs=(P(), P("data")), out_specs=(P(), P())))
    errors["gradients_under_shard_map"] = error_of(lambda: gradients_step(*placed))
    # Silencing that check (check_vma=False, as JAX's message suggests) breaks
    # the right rule too: the "loss" step then returns wrong parameters.
    unchecked = jax.jit(jax.shard_map(
        make_train_step(axis_name="data", gradient_reduction="loss"),
        mesh=MESH, in_specs=(P(), P("data")), out_specs=(P(), P()), check_vma=False))
    out |= common.record(*unchecked(*placed), "pitfall/unchecked_loss/s1")

    # Bad input: 12 examples on 8 devices.
    bad = common.batch_at(1, size=12)
    replicated = placed[0]
    errors |= {
        "shard_batch": error_of(lambda: par.shard_batch(bad, MESH)),
        "split_for_pmap": error_of(lambda: par.split_for_pmap(bad)),
        "train_jit": error_of(lambda: step_fn("mlp", "jit", "momentum")(replicated, bad)),
        "train_shard_map": error_of(
            lambda: step_fn("mlp", "shard_map", "momentum")(replicated, bad)),
        "eval_shard_map": error_of(lambda: par.make_data_parallel_eval_step(
            mesh=MESH, method="shard_map")(replicated, bad)),
    }

    np.savez(os.path.join(out_dir, "arrays.npz"), **out)
    print(json.dumps({"devices": jax.device_count(), "errors": errors}))


if __name__ == "__main__":
    main(sys.argv[1])
