"""Child of test_parallel.py: one of several processes in one data-parallel run.

``python multi_process.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR``, with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (local devices per
process). Each process feeds only its own rows of every global batch; the
mesh spans all processes' devices. Writes ``OUT_DIR/process_{id}.npz`` with the
state after the steps of each (model, method) and the eval metrics; the parent
compares them with the single-process step on the full batches.
"""

from __future__ import annotations

import os
import sys

process_id, num_processes, port, out_dir = (
    int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

import jax  # noqa: E402  (after argv; XLA_FLAGS comes from the parent's env)

from nnlib.train import parallel as par  # noqa: E402

# Before anything touches a device: the CPU backend reads the collectives
# setting when it is created.
par.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id,
                           initialization_timeout=45)

import numpy as np  # noqa: E402
import parallel_common as common  # noqa: E402  beside this script

STEPS = 3
CASES = (("mlp", "jit"), ("batchnorm", "shard_map"))


def local_rows(batch):
    """This process's slice of the global batch: rows [p * B / P, (p + 1) * B / P)."""
    n = common.GLOBAL_BATCH // num_processes
    return jax.tree.map(lambda x: x[process_id * n:(process_id + 1) * n], batch)


def main():
    assert jax.process_count() == num_processes
    mesh = par.make_mesh()
    out = {"devices": np.asarray([d.id for d in mesh.devices.flat]),
           "local_devices": np.asarray([d.id for d in mesh.local_devices])}
    # Which rows of the global batch this process's devices hold.
    batch = par.shard_batch(local_rows(common.batch_at(1)), mesh)
    out["first_local_row"] = np.asarray(
        min(shard.index[0].start or 0 for shard in batch["inputs"].addressable_shards))
    for kind, method in CASES:
        axis = "data" if method == "shard_map" else None
        state = par.replicate(common.make_state(kind, axis), mesh)
        step = par.make_data_parallel_train_step(mesh=mesh, method=method)
        for i in range(1, STEPS + 1):
            state, metrics = step(state, par.shard_batch(local_rows(common.batch_at(i)), mesh))
        # Replicated outputs: every process holds the whole value.
        out |= common.record(state, metrics, f"{kind}/{method}/s{STEPS}")
        evaluate = par.make_data_parallel_eval_step(mesh=mesh, method=method)
        metrics = evaluate(state, par.shard_batch(
            local_rows(common.batch_at(STEPS + 1, masked=True)), mesh))
        out |= {f"{kind}/{method}/eval/{k}": np.asarray(v) for k, v in metrics.items()}
    np.savez(os.path.join(out_dir, f"process_{process_id}.npz"), **out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
