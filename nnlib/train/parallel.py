"""Data parallelism: the same train step from ``make_train_step`` on many devices.

Data parallelism keeps one copy of the ``TrainState`` on every device
(*replicated*), splits the global batch along axis 0 across the devices
(*sharded*), and averages the gradients so that every device applies the same
update. Done right, one data-parallel step on a global batch of ``B`` examples
equals the single-device step on those ``B`` examples (to float rounding).

Three ways to run it, all on the same step definition:

``method="jit"`` (recommended)
    ``jax.jit`` the plain step (``axis_name=None``) with the state replicated
    and the batch sharded via ``NamedSharding``. The program is written for
    the global batch; XLA partitions it and inserts the all-reduce itself.
    BatchNorm statistics, masked means and dropout masks are those of the
    global batch, exactly as on one device.
``method="shard_map"``
    ``jax.jit(jax.shard_map(step, in_specs=(P(), P("data")),
    out_specs=(P(), P())))``: the step is written *per device* and averages
    over the named axis explicitly (``make_train_step(axis_name="data",
    gradient_reduction="loss")``). Useful when you want to control the
    communication, or for code that must see its local shard.
``make_pmap_train_step``
    ``jax.pmap`` with ``gradient_reduction="gradients"``, for code migrating
    from pmap; the state carries a leading ``[devices, ...]`` axis.

Shapes (``D``: number of devices in the mesh, ``B``: global batch size,
``P``: number of processes)::

    state            replicated: every leaf has its usual shape on all D devices
    batch["inputs"]  [B, ...] sharded on axis 0; each device holds [B / D, ...]
    process-local    [B / P, ...] what one process feeds ``shard_batch``
    pmap state       [D, ...]  (``replicate_for_pmap``)
    pmap batch       [D, B / D, ...]  (``split_for_pmap``)

Pitfalls (each one silent unless noted):

1. **Gradients scaled by D under shard_map.** The pmap habit
   ``pmean(grad(local loss))`` is wrong inside ``jax.shard_map``: the
   transpose of the implicit broadcast of the replicated parameters already
   *sums* the per-device cotangents, so the gradients come out ``D`` times too
   large, with no error. ``shard_map`` needs ``pmean`` of the loss inside the
   differentiated function (``gradient_reduction="loss"``), pmap needs
   ``pmean`` of the gradients (``"gradients"``). The builders here choose for
   you; ``tests/train/test_parallel.py`` pins the factor D. (The whole
   ``make_train_step(gradient_reduction="gradients")`` under shard_map is
   refused by shard_map's replication check, because its metrics vary per
   device; do not silence that check with ``check_vma=False``: it changes the
   transpose rules and the ``"loss"`` step then returns wrong parameters.)
2. **Same dropout masks on every device.** Under shard_map/pmap every device
   sees the same replicated key, so device ``d``'s example ``i`` would get the
   same dropout mask as example ``i`` of every other device. The per-device
   builders here give device ``d`` the key ``fold_in(state.key, d)`` (then the
   step folds in ``state.step`` as usual) and hand back the original key, so
   the state stays replicated. The jit method needs nothing: the dropout mask
   is drawn for the global batch and matches the single-device step exactly.
3. **BatchNorm statistics per device.** Under shard_map/pmap a BatchNorm
   without ``axis_name`` normalizes with its device's ``B / D`` examples;
   use ``BatchNorm(axis_name="data")`` (the mesh axis, or pmap's axis name)
   for the global statistics. Under shard_map the unsynchronized running
   statistics differ per device and ``out_specs=P()`` rejects them (an error,
   not silent). Under ``method="jit"`` BatchNorm needs no ``axis_name``.
4. **Uneven padding under shard_map/pmap.** With a ``"mask"`` in the batch,
   each device averages over its own real examples and the devices are then
   averaged with equal weight, so when the padding is uneven across devices
   examples are weighted differently than on one device. ``method="jit"`` is
   exact; the eval steps are exact in every method (count-weighted).
5. **Batch size.** ``B`` must be divisible by ``D`` (``B / P`` by the
   process's local device count); the builders and ``shard_batch`` say so
   clearly instead of failing inside XLA.
6. **Multi-process.** Every process must run the same jitted functions in the
   same order (they meet in collectives; a process that skips a step hangs the
   others). Each process feeds only its own slice of the global batch: rows
   ``[p * B / P, (p + 1) * B / P)`` for process ``p``. Replicated outputs can
   be read on any process with ``np.asarray``; write files from
   ``jax.process_index() == 0`` only.
7. **Placement.** The jitted steps pin their input shardings, so a numpy
   batch is sharded automatically on one process, but jit rejects a batch
   committed elsewhere (say ``device_put`` on one device): place it with
   ``shard_batch`` (and the state with ``replicate``) first; placing an
   already placed array is a no-op. With ``donate=True`` the incoming state's
   buffers are reused; don't touch it after the call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import ArrayLike, Shaped

from nnlib.train.state import TrainState
from nnlib.train.step import Batch, LossFn, make_eval_step, make_train_step

StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
EvalFn = Callable[[TrainState, Batch], dict[str, jax.Array]]

# What a user's data loader yields: every entry with a leading batch axis.
HostBatch = Mapping[str, Shaped[ArrayLike, "batch ..."]]

METHODS = ("jit", "shard_map")


# --------------------------------------------------------------------------
# Processes, meshes and placement
# --------------------------------------------------------------------------


def initialize_distributed(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    cpu_collectives: str | None = "gloo",
    local_device_ids: int | Sequence[int] | None = None,
    initialization_timeout: int = 300,
) -> None:
    """Joins this process to a multi-process JAX run (one call per process).

    Call order, in every process:

    1. set ``XLA_FLAGS`` (e.g. ``--xla_force_host_platform_device_count=2``
       to simulate devices on CPU) *before* ``import jax``;
    2. ``initialize_distributed(...)`` before anything touches a device
       (``jax.devices()``, creating an array, ``TrainState.create``);
    3. ``make_mesh()`` over the global devices, ``replicate`` the state,
       ``shard_batch`` each process-local batch, run the step.

    Args:
      coordinator_address: ``"host:port"`` of process 0, reachable by all.
      num_processes: total number of processes ``P``.
      process_id: this process's index in ``[0, P)``.
      cpu_collectives: CPU all-reduce implementation (``"gloo"`` or
        ``"mpi"``); without one, CPU collectives across processes fail.
        ``None`` leaves the setting alone (GPU/TPU runs).
      local_device_ids: restrict this process to these local devices.
      initialization_timeout: seconds to wait for all processes to join.
    """
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"initialize_distributed: process_id must be in [0, {num_processes}), "
            f"got {process_id}")
    if cpu_collectives is not None:
        # Read when the CPU backend is created, i.e. at the first device use.
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )


def make_mesh(num_devices: int | None = None, axis_name: str = "data") -> Mesh:
    """A 1-D device mesh ``[num_devices]`` named ``axis_name``.

    The axis is ``AxisType.Auto`` (``jax.make_mesh`` defaults to Explicit), so
    sharding propagation inside ``jit`` is automatic and ``jax.shard_map``
    accepts inputs in any placement.

    Args:
      num_devices: the first ``num_devices`` of ``jax.devices()`` (global
        devices, all processes); ``None`` for all. With several processes the
        mesh must span every device, so only ``None`` or the total is allowed.
      axis_name: the mesh axis the batch is split along.
    """
    total = jax.device_count()
    n = total if num_devices is None else num_devices
    if not 1 <= n <= total:
        raise ValueError(
            f"make_mesh: num_devices must be in [1, {total}] (jax.device_count()), "
            f"got {num_devices}")
    if jax.process_count() > 1 and n != total:
        raise ValueError(
            f"make_mesh: with {jax.process_count()} processes the mesh must span all "
            f"{total} global devices, got num_devices={num_devices}")
    return Mesh(np.asarray(jax.devices()[:n]), (axis_name,),
                axis_types=(jax.sharding.AxisType.Auto,))


def _mesh_axis(mesh: Mesh, axis_name: str | None) -> str:
    if axis_name is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(
                f"a data-parallel mesh needs one axis or an explicit axis_name; "
                f"the mesh has axes {mesh.axis_names}")
        return mesh.axis_names[0]
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not a mesh axis; mesh axes: "
                         f"{mesh.axis_names}")
    return axis_name


def _check_batch(where: str, batch: Any, num_shards: int, what: str) -> None:
    """Every leaf needs a leading batch axis divisible by ``num_shards``."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        shape = np.shape(leaf)
        name = jax.tree_util.keystr(path) or "batch"
        if len(shape) == 0:
            raise ValueError(
                f"{where}: batch{name} is a scalar; every batch entry needs a leading "
                f"batch axis [batch, ...] to split across {what}")
        if shape[0] % num_shards:
            raise ValueError(
                f"{where}: batch size {shape[0]} (batch{name} of shape {shape}) is not "
                f"divisible by {what} ({num_shards}); use a batch size that is a "
                f"multiple of {num_shards}, or pad and pass a 'mask'")


def _to_sharding(tree: Any, sharding: NamedSharding) -> Any:
    """Places every leaf with ``sharding``; leaves already there are kept."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        # Each process holds the full value: global shape = local shape. Unlike
        # device_put, this runs no cross-process equality check.
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, x.shape)

    return jax.tree.map(put, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A copy of ``tree`` on every device of ``mesh`` (``PartitionSpec()``).

    With several processes each process must pass the same values (the same
    seed gives the same ``TrainState``); nothing checks it.
    """
    return _to_sharding(tree, NamedSharding(mesh, P()))


def shard_batch(batch: HostBatch, mesh: Mesh, axis_name: str | None = "data") -> Batch:
    """Splits every leaf's axis 0 across the mesh axis ``axis_name``.

    Args:
      batch: dict of arrays ``[B, ...]`` on one process, or of this process's
        slice ``[B / P, ...]`` when ``jax.process_count() > 1`` (each process
        passes its own rows; the global array is their concatenation in
        process order).
      mesh: from ``make_mesh``.
      axis_name: the mesh axis to split along; ``None`` for the mesh's only axis.

    Returns:
      The batch as global ``jax.Array`` s of shape ``[B, ...]``, each device
      holding ``[B / D, ...]``.
    """
    axis_name = _mesh_axis(mesh, axis_name)
    sharding = NamedSharding(mesh, P(axis_name))
    if jax.process_count() == 1:
        _check_batch("shard_batch", batch, mesh.shape[axis_name], "the number of devices")
        return jax.device_put(batch, sharding)
    local = len(mesh.local_devices)
    _check_batch(
        "shard_batch", batch, local,
        f"this process's local device count (process {jax.process_index()} of "
        f"{jax.process_count()}, {mesh.shape[axis_name]} devices in all)")
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


# --------------------------------------------------------------------------
# Mesh steps
# --------------------------------------------------------------------------


def _with_device_key(step: Callable[..., Any], axis_name: str) -> Callable[..., Any]:
    """Runs a per-device step with key ``fold_in(state.key, device index)``
    (pitfall 2) and returns the original, replicated key."""

    def per_device_step(state: TrainState, batch: Batch):
        device_key = jax.random.fold_in(state.rng, jax.lax.axis_index(axis_name))
        new_state, metrics = step(state.replace(key=jax.random.key_data(device_key)), batch)
        return new_state.replace(key=state.key), metrics

    return per_device_step


def make_data_parallel_train_step(
    loss_fn: LossFn | None = None,
    mesh: Mesh | None = None,
    *,
    method: str = "jit",
    axis_name: str | None = None,
    donate: bool = False,
    rng_streams: Sequence[str] = ("dropout",),
) -> StepFn:
    """The train step of ``make_train_step``, jitted to run data-parallel on ``mesh``.

    Args:
      loss_fn: as for ``make_train_step`` (default ``classification_loss()``).
      mesh: a device mesh (``make_mesh()``); required.
      method: ``"jit"`` (XLA partitions the global-batch step) or
        ``"shard_map"`` (the per-device step with ``pmean`` of the loss).
        See the module docstring for the trade-offs and pitfalls.
      axis_name: the mesh axis to split the batch along; defaults to the
        mesh's only axis. Under ``"shard_map"`` this is also the name for
        ``BatchNorm(axis_name=...)``.
      donate: donate the incoming state's buffers to the new state.
      rng_streams: as for ``make_train_step``.

    Returns:
      ``step(state, batch) -> (state, metrics)`` with ``state`` replicated and
      ``batch`` entries ``[B, ...]`` sharded on axis 0 (``B`` divisible by the
      number of devices); the new state and the metrics come back replicated.
      ``step.jitted`` is the underlying ``jax.jit`` function (``.lower`` etc.).
    """
    if mesh is None:
        raise ValueError("make_data_parallel_train_step needs a mesh, e.g. make_mesh()")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    axis = _mesh_axis(mesh, axis_name)
    num_devices = mesh.shape[axis]
    if method == "jit":
        inner = make_train_step(loss_fn, axis_name=None, rng_streams=rng_streams)
    else:
        per_device = make_train_step(
            loss_fn, axis_name=axis, gradient_reduction="loss", rng_streams=rng_streams)
        inner = jax.shard_map(_with_device_key(per_device, axis), mesh=mesh,
                              in_specs=(P(), P(axis)), out_specs=(P(), P()))

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(inner, in_shardings=(replicated, NamedSharding(mesh, P(axis))),
                     out_shardings=replicated, donate_argnums=(0,) if donate else ())

    def data_parallel_step(state: TrainState, batch: Batch):
        # jit checks the batch against its sharding before tracing, with an
        # XLA tiling message; say it in the user's terms first.
        _check_batch(f"data-parallel train step ({method})", batch, num_devices,
                     f"the number of devices on mesh axis {axis!r}")
        try:
            return jitted(state, batch)
        except ValueError as e:
            if method == "shard_map" and "out_specs" in str(e):
                raise ValueError(
                    f"data-parallel train step (shard_map): the new state differs across "
                    f"devices, so it cannot be returned replicated. Usually a BatchNorm "
                    f"without axis_name={axis!r} (its running statistics are per device); "
                    f"set it, or use method='jit'.") from e
            raise

    data_parallel_step.jitted = jitted  # for .lower(), cost analysis, etc.
    return data_parallel_step


def make_data_parallel_eval_step(
    loss_fn: LossFn | None = None,
    mesh: Mesh | None = None,
    *,
    method: str = "jit",
    axis_name: str | None = None,
) -> EvalFn:
    """The eval step of ``make_eval_step`` on ``mesh``: ``(state, batch) -> metrics``.

    Metrics are means over the real (unmasked) examples of the *global*
    batch in both methods, with ``metrics["count"]`` their number, so
    ``average_metrics`` combines batches exactly. Arguments as for
    ``make_data_parallel_train_step``.
    """
    if mesh is None:
        raise ValueError("make_data_parallel_eval_step needs a mesh, e.g. make_mesh()")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    axis = _mesh_axis(mesh, axis_name)
    num_devices = mesh.shape[axis]
    if method == "jit":
        inner = make_eval_step(loss_fn)
    else:
        inner = jax.shard_map(make_eval_step(loss_fn, axis_name=axis), mesh=mesh,
                              in_specs=(P(), P(axis)), out_specs=P())

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(inner, in_shardings=(replicated, NamedSharding(mesh, P(axis))),
                     out_shardings=replicated)

    def data_parallel_eval_step(state: TrainState, batch: Batch):
        _check_batch(f"data-parallel eval step ({method})", batch, num_devices,
                     f"the number of devices on mesh axis {axis!r}")
        return jitted(state, batch)

    data_parallel_eval_step.jitted = jitted
    return data_parallel_eval_step


# --------------------------------------------------------------------------
# pmap (legacy)
# --------------------------------------------------------------------------


def make_pmap_train_step(
    loss_fn: LossFn | None = None,
    *,
    axis_name: str = "batch",
    donate: bool = False,
    rng_streams: Sequence[str] = ("dropout",),
) -> StepFn:
    """The train step under ``jax.pmap``, for code migrating from pmap.

    Gradients are ``pmean``-ed after differentiation
    (``gradient_reduction="gradients"``, pmap's rule); device ``d`` draws its
    randomness from ``fold_in(state.key, d)``. New code should prefer
    ``make_data_parallel_train_step`` — pmap is in maintenance.

    Returns:
      ``step(state, batch) -> (state, metrics)`` with ``state`` from
      ``replicate_for_pmap`` (leaves ``[D, ...]``) and batch entries
      ``[D, B / D, ...]`` from ``split_for_pmap``; metrics come back ``[D]``
      (identical rows: take ``unreplicate(metrics)``).
    """
    step = make_train_step(loss_fn, axis_name=axis_name, gradient_reduction="gradients",
                           rng_streams=rng_streams)
    return jax.pmap(_with_device_key(step, axis_name), axis_name=axis_name,
                    donate_argnums=(0,) if donate else ())


def make_pmap_eval_step(loss_fn: LossFn | None = None, *, axis_name: str = "batch") -> EvalFn:
    """The eval step under ``jax.pmap``; metrics ``[D]`` are global-batch means."""
    return jax.pmap(make_eval_step(loss_fn, axis_name=axis_name), axis_name=axis_name)


def replicate_for_pmap(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Stacks ``tree`` along a new leading device axis: ``[...] -> [D, ...]``,
    row ``d`` on ``devices[d]`` (what ``jax.device_put_replicated`` did).

    Args:
      tree: e.g. a ``TrainState``.
      devices: defaults to ``jax.local_devices()``.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = NamedSharding(Mesh(np.asarray(devices), ("devices",)), P("devices"))

    def stack(x):
        x = np.asarray(x)
        return jax.device_put(np.broadcast_to(x[None], (len(devices),) + x.shape), sharding)

    return jax.tree.map(stack, tree)


def unreplicate(tree: Any) -> Any:
    """Row 0 of every leaf: ``[D, ...] -> [...]`` (pmap states and metrics)."""
    return jax.tree.map(lambda x: x[0], tree)


def split_for_pmap(batch: HostBatch, num_devices: int | None = None) -> dict[str, np.ndarray]:
    """Reshapes every leaf ``[B, ...] -> [D, B / D, ...]`` (host-side numpy).

    Args:
      batch: dict of arrays with a leading batch axis.
      num_devices: ``D``; defaults to ``jax.local_device_count()``.
    """
    n = jax.local_device_count() if num_devices is None else num_devices
    _check_batch("split_for_pmap", batch, n, "the number of devices")
    return jax.tree.map(
        lambda x: np.asarray(x).reshape((n, np.shape(x)[0] // n) + np.shape(x)[1:]), batch)


__all__ = [
    "METHODS",
    "initialize_distributed",
    "make_data_parallel_eval_step",
    "make_data_parallel_train_step",
    "make_mesh",
    "make_pmap_eval_step",
    "make_pmap_train_step",
    "replicate",
    "replicate_for_pmap",
    "shard_batch",
    "split_for_pmap",
    "unreplicate",
]
