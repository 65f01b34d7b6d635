"""Data parallelism (``nnlib.train.parallel``) against the single-device step.

The truth is ``jax.jit(make_train_step())`` on one device with the whole
global batch: every parallel method must reproduce its parameters, optimizer
state, BatchNorm statistics and metrics to 1e-5.

Multi-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count``
set before jax starts, so they run in child processes (scripts in
``_parallel_scripts/``): one process with 8 simulated CPU devices runs every
8-device check and saves its arrays, and two processes with 2 devices each
form one 4-device run over gloo. All three start together when the first test
needs them (jax start-up and compiles dominate the time); the tests here only
compare arrays. The pytest process itself has one CPU device, which serves
for argument errors and for a 1-device mesh.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from nnlib.layers import MLP
from nnlib.train import TrainState, make_eval_step, make_optimizer, make_train_step
from nnlib.train import parallel as par

SCRIPTS = Path(__file__).parent / "_parallel_scripts"
REPO = Path(__file__).parents[2]
# Children compile a few dozen small programs; LLVM's optimizations are most
# of that time and change nothing the comparisons look at.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
MULTI_DEVICE_TIMEOUT_S = 240  # slow, not hung: no collectives across processes
# A hang across processes (a missed collective, a coordinator that never
# answers) fails in this time; generous because the 2-core test machine is
# often shared with other test runs.
MULTI_PROCESS_TIMEOUT_S = 90
NUM_PROCESSES = 2
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _load_common():
    spec = importlib.util.spec_from_file_location(
        "parallel_common", SCRIPTS / "parallel_common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["parallel_common"] = module  # flax dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


common = _load_common()


# --------------------------------------------------------------------------
# Children: started together, awaited by the fixtures that need them
# --------------------------------------------------------------------------


def _env(devices_per_process: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process} " + \
        FAST_COMPILE
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Children:
    """The three child processes, started at once; ``wait`` enforces deadlines."""

    def __init__(self, tmp: Path):
        self.tmp, self.started, self.logs = tmp, time.monotonic(), {}
        (tmp / "md").mkdir()
        (tmp / "mp").mkdir()
        self.multi_device = self._start(
            [SCRIPTS / "multi_device.py", tmp / "md"], _env(8), "md.log")
        port = _free_port()
        self.multi_process = [
            self._start([SCRIPTS / "multi_process.py", i, NUM_PROCESSES, port, tmp / "mp"],
                        _env(2), f"mp{i}.log")
            for i in range(NUM_PROCESSES)]

    def _start(self, args, env, log_name) -> subprocess.Popen:
        log = self.tmp / log_name
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env,
                                    stdout=f, stderr=subprocess.STDOUT, text=True)
        self.logs[proc] = log
        return proc

    def wait(self, procs, timeout_s: float) -> list[str]:
        """Waits for ``procs`` until ``timeout_s`` after the start, killing them
        (only them) on a hang. Returns their logs."""
        try:
            for p in procs:
                p.wait(timeout=max(1.0, self.started + timeout_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill(procs)
            pytest.fail(f"child processes still running {timeout_s} s after their start "
                        f"(hung?); logs:\n" + "\n---\n".join(self._logs(procs)))
        return self._logs(procs)

    def _logs(self, procs) -> list[str]:
        return [self.logs[p].read_text() for p in procs]

    def kill(self, procs):
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module", autouse=True)
def children(tmp_path_factory):
    """Autouse, so the children start before this process's own tests run."""
    kids = _Children(tmp_path_factory.mktemp("parallel"))
    yield kids
    kids.kill([kids.multi_device, *kids.multi_process])


@pytest.fixture(scope="module")
def eight_devices(children):
    """``(arrays, info)`` from the 8-device child."""
    (log,) = children.wait([children.multi_device], MULTI_DEVICE_TIMEOUT_S)
    if children.multi_device.returncode != 0:
        pytest.fail(f"8-device child failed:\n{log}")
    info = json.loads(log.strip().splitlines()[-1])
    assert info["devices"] == 8
    return dict(np.load(children.tmp / "md" / "arrays.npz")), info


@pytest.fixture(scope="module")
def two_processes(children):
    """The two processes' saved arrays."""
    logs = children.wait(children.multi_process, MULTI_PROCESS_TIMEOUT_S)
    codes = [p.returncode for p in children.multi_process]
    if any(codes):
        text = "\n".join(logs)
        if re.search(r"gloo[^\n]*(not (available|supported|built|linked)|unknown|unsupported)",
                     text, re.IGNORECASE):
            pytest.skip(f"gloo CPU collectives unavailable in this jaxlib:\n{text[-2000:]}")
        pytest.fail(f"multi-process children exited with {codes}:\n" + "\n---\n".join(logs))
    return [dict(np.load(children.tmp / "mp" / f"process_{i}.npz"))
            for i in range(NUM_PROCESSES)]


def _assert_same(arrays, got_prefix, want_prefix, want=None):
    """Every array under ``want_prefix`` (in ``want`` or ``arrays``) equals the
    one under ``got_prefix``; returns how many were compared."""
    want = arrays if want is None else want
    keys = [k for k in want if k.startswith(want_prefix + "/")]
    assert keys, f"nothing recorded under {want_prefix}"
    for k in keys:
        got = arrays[got_prefix + k[len(want_prefix):]]
        np.testing.assert_allclose(got, want[k], err_msg=k, **TOL)
    return len(keys)


# --------------------------------------------------------------------------
# In this process (one device): mesh, placement, pmap helpers, argument errors
# --------------------------------------------------------------------------


def _mlp_state():
    return TrainState.create(model=MLP((4,), 3), tx=make_optimizer("sgd", 0.1),
                             key=jax.random.key(1), example_input=np.zeros((1, 5), np.float32))


def test_make_mesh_is_one_dimensional_with_auto_axis():
    mesh = par.make_mesh(axis_name="batch")
    assert mesh.axis_names == ("batch",) and mesh.shape["batch"] == jax.device_count()
    assert mesh.axis_types == (AxisType.Auto,)
    for bad in (0, jax.device_count() + 1):
        with pytest.raises(ValueError,
                           match=rf"num_devices must be in \[1, {jax.device_count()}\].*got {bad}"):
            par.make_mesh(bad)


def test_one_device_mesh_and_pmap_steps_equal_plain_step():
    state, batch = _mlp_state(), common.batch_at(1, size=4)
    want, want_metrics = jax.jit(make_train_step())(state, batch)
    want_eval = jax.jit(make_eval_step())(state, batch)
    mesh = par.make_mesh(1)
    for method in par.METHODS:
        fresh = jax.tree.map(np.array, state)  # donate=True consumes the placed copy
        got, metrics = par.make_data_parallel_train_step(mesh=mesh, method=method, donate=True)(
            par.replicate(fresh, mesh), par.shard_batch(batch, mesh))
        np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], **TOL)
        for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
            np.testing.assert_allclose(a, b, **TOL)
        assert got.key.dtype == state.key.dtype and np.array_equal(got.key, state.key)
        metrics = par.make_data_parallel_eval_step(mesh=mesh, method=method)(
            par.replicate(state, mesh), par.shard_batch(batch, mesh))
        np.testing.assert_allclose(metrics["loss"], want_eval["loss"], **TOL)
    got, _ = par.make_pmap_train_step(axis_name="devices")(
        par.replicate_for_pmap(state), par.split_for_pmap(batch))
    for a, b in zip(jax.tree.leaves(par.unreplicate(got.params)), jax.tree.leaves(want.params),
                    strict=True):
        np.testing.assert_allclose(a, b, **TOL)
    metrics = par.make_pmap_eval_step(axis_name="devices")(
        par.replicate_for_pmap(state), par.split_for_pmap(batch))
    np.testing.assert_allclose(par.unreplicate(metrics)["loss"], want_eval["loss"], **TOL)


def test_unsynchronized_batchnorm_under_shard_map_is_a_clear_error():
    # shard_map's replication check is static, so one device shows it too.
    mesh = par.make_mesh(1)
    step = par.make_data_parallel_train_step(mesh=mesh, method="shard_map")
    state = par.replicate(common.make_state("batchnorm", None), mesh)
    with pytest.raises(ValueError, match=r"shard_map\): the new state differs across devices.*"
                                         r"BatchNorm without axis_name='data'"):
        step(state, par.shard_batch(common.batch_at(1), mesh))


def test_pmap_helpers_shapes():
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    split = par.split_for_pmap({"inputs": x, "labels": np.arange(8)}, num_devices=4)
    assert split["inputs"].shape == (4, 2, 3) and split["labels"].shape == (4, 2)
    np.testing.assert_array_equal(split["inputs"][1], x[2:4])  # device 1: rows 2, 3
    stacked = par.replicate_for_pmap({"w": x, "step": np.int32(3)})
    assert stacked["w"].shape == (jax.local_device_count(), 8, 3)
    assert stacked["step"].shape == (jax.local_device_count(),)
    np.testing.assert_array_equal(par.unreplicate(stacked)["w"], x)


def test_argument_errors_name_the_problem():
    mesh = par.make_mesh()
    with pytest.raises(ValueError, match="needs a mesh"):
        par.make_data_parallel_train_step()
    with pytest.raises(ValueError, match="needs a mesh"):
        par.make_data_parallel_eval_step()
    with pytest.raises(ValueError, match=r"method must be one of \('jit', 'shard_map'\), got 'pmap'"):
        par.make_data_parallel_train_step(mesh=mesh, method="pmap")
    with pytest.raises(ValueError, match="method must be one of"):
        par.make_data_parallel_eval_step(mesh=mesh, method="pjit")
    with pytest.raises(ValueError, match=r"axis_name 'batch' is not a mesh axis; mesh axes: \('data',\)"):
        par.make_data_parallel_train_step(mesh=mesh, axis_name="batch")
    mesh_2d = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    with pytest.raises(ValueError, match=r"one axis or an explicit axis_name.*\('data', 'model'\)"):
        par.shard_batch({"inputs": np.zeros((2, 3))}, mesh_2d, axis_name=None)
    with pytest.raises(ValueError, match=r"batch\['step'\] is a scalar.*leading batch axis"):
        par.shard_batch({"inputs": np.zeros((2, 3)), "step": np.float32(1)}, mesh)
    with pytest.raises(ValueError, match=r"split_for_pmap: batch size 6 .* not divisible by the number of devices \(4\)"):
        par.split_for_pmap({"inputs": np.zeros((6, 3))}, num_devices=4)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\), got 2"):
        par.initialize_distributed("127.0.0.1:1", 2, 2)


# --------------------------------------------------------------------------
# 8 simulated devices vs one device, same global batch
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["jit", "shard_map", "pmap"])
@pytest.mark.parametrize("kind", ["mlp", "batchnorm"])
@pytest.mark.parametrize("when", ["s1", "s3"])
def test_data_parallel_step_equals_single_device_step(eight_devices, kind, method, when):
    # params, momentum, step, BatchNorm running statistics, loss/accuracy/grad_norm;
    # BatchNorm is synchronized via axis_name under shard_map/pmap and needs
    # nothing under jit.
    arrays, _ = eight_devices
    compared = _assert_same(arrays, f"{kind}/{method}/{when}", f"{kind}/single/{when}")
    assert compared == (18 if kind == "batchnorm" else 12)
    # Not trivially equal: training moved the parameters between steps 1 and 3.
    kernel = f"{kind}/single/{{}}/params['{'Dense_0' if kind == 'batchnorm' else 'dense_0'}']['kernel']"
    assert np.abs(arrays[kernel.format("s3")] - arrays[kernel.format("s1")]).max() > 1e-3
    if kind == "batchnorm":
        # The statistics really moved (not both still at their init values).
        mean = arrays[f"{kind}/{method}/{when}/collections['batch_stats']['BatchNorm_0']['mean']"]
        assert np.abs(mean).max() > 1e-3


def test_uneven_padding_is_exact_under_jit_but_not_under_shard_map(eight_devices):
    # Rows 11..15 are padding: devices 6 and 7 hold none but padding. jit
    # computes the global masked mean; shard_map averages per-device means.
    arrays, _ = eight_devices
    _assert_same(arrays, "masked/jit/s1", "masked/single/s1")
    single = arrays["masked/single/s1/metrics/loss"]
    assert abs(arrays["masked/shard_map/s1/metrics/loss"] - single) > 1e-2 * abs(single)


@pytest.mark.parametrize("method", ["jit", "shard_map", "pmap"])
def test_eval_step_gives_global_masked_means(eight_devices, method):
    arrays, _ = eight_devices
    for k in ("loss", "accuracy", "count"):
        np.testing.assert_allclose(arrays[f"eval/{method}/{k}"], arrays[f"eval/single/{k}"],
                                   **TOL)
    assert arrays["eval/single/count"] == common.GLOBAL_BATCH - 5


def test_dropout_under_jit_draws_the_single_device_masks(eight_devices):
    arrays, _ = eight_devices
    _assert_same(arrays, "dropout/jit/s1", "dropout/single/s1")


def test_dropout_under_shard_map_draws_a_key_per_device(eight_devices):
    # Device d uses fold_in(key, d): the SGD update is the mean of the
    # single-device updates on each 2-example shard with those keys. (Identical
    # keys on every device would repeat one mask pattern across shards.)
    arrays, _ = eight_devices
    _assert_same(arrays, "dropout/shard_map/s1", "dropout/per_device_mean/s1")
    kernel = "/params['dense_0']['kernel']"
    assert not np.allclose(arrays["dropout/shard_map/s1" + kernel],
                           arrays["dropout/single/s1" + kernel], **TOL)


def test_pmap_gradient_pattern_under_shard_map_scales_gradients_by_device_count(
        eight_devices):
    # The silent bug, pinned: grad of the local loss then pmean of the gradients
    # inside jax.shard_map returns 8 x the true gradient on 8 devices, no error.
    arrays, info = eight_devices
    keys = [k for k in arrays if k.startswith("pitfall/single")]
    assert len(keys) == 4
    for k in keys:
        wrong = arrays[k.replace("pitfall/single", "pitfall/pmap_pattern")]
        np.testing.assert_allclose(wrong, 8.0 * arrays[k], err_msg=k, **TOL)
    # The engine's whole step with gradient_reduction="gradients" is refused
    # instead, by shard_map's replication check (its metrics vary per device).
    assert "out_specs" in info["errors"]["gradients_under_shard_map"]
    # And switching that check off (check_vma=False) makes the right rule,
    # pmean of the loss, silently wrong: the parameters leave the true step's.
    kernel = "/s1/params['dense_0']['kernel']"
    assert not np.allclose(arrays["pitfall/unchecked_loss" + kernel],
                           arrays["mlp/single" + kernel], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("where", ["shard_batch", "split_for_pmap", "train_jit",
                                   "train_shard_map", "eval_shard_map"])
def test_batch_not_divisible_by_device_count_is_a_clear_error(eight_devices, where):
    _, info = eight_devices
    message = info["errors"][where]
    assert message is not None, f"{where} accepted 12 examples on 8 devices"
    assert re.search(r"batch size 12 \(batch\['inputs'\] of shape \(12, 5\)\) is not "
                     r"divisible by the number of devices.* \(8\)", message), message


# --------------------------------------------------------------------------
# Two processes (gloo) vs one process
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process_reference():
    """3 single-device steps on the full global batches, then the eval step."""
    out = {}
    for kind in ("mlp", "batchnorm"):
        state = common.make_state(kind, None)
        step = jax.jit(make_train_step())
        for i in range(1, 4):
            state, metrics = step(state, common.batch_at(i))
        out |= common.record(state, metrics, f"{kind}/s3")
        metrics = jax.jit(make_eval_step())(state, common.batch_at(4, masked=True))
        out |= {f"{kind}/eval/{k}": np.asarray(v) for k, v in metrics.items()}
    return out


@pytest.mark.parametrize("kind, method", [("mlp", "jit"), ("batchnorm", "shard_map")])
def test_two_processes_each_feeding_half_equal_one_process(
        two_processes, one_process_reference, kind, method):
    for process, arrays in enumerate(two_processes):
        # A global mesh of 4 devices, 2 of them this process's.
        assert len(arrays["devices"]) == 4 and len(arrays["local_devices"]) == 2, process
        _assert_same(arrays, f"{kind}/{method}/s3", f"{kind}/s3", one_process_reference)
        _assert_same(arrays, f"{kind}/{method}/eval", f"{kind}/eval", one_process_reference)
    assert set(two_processes[0]["local_devices"]).isdisjoint(two_processes[1]["local_devices"])
    # The global batch is the processes' slices in process order (the means
    # compared above would not notice a permutation).
    rows = common.GLOBAL_BATCH // NUM_PROCESSES
    assert [int(a["first_local_row"]) for a in two_processes] == [0, rows]
