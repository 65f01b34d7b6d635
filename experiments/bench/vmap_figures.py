"""What ``jax.vmap`` buys: one program for many small computations.

Two comparisons on the benchmark MLP (784-512-512-10):

- **Per-example gradients**, batch 64: ``nnlib.train.per_example_gradients``
  (one vmapped, jitted program) against a Python loop calling the *same*
  jitted function on a batch of one, 64 times. The loop keeps the 64 results
  as separate pytrees (no stacking), so it does no extra copy. For reference,
  PyTorch's ``torch.func.vmap(grad(...))`` on the same architecture.
- **Ensemble of 8 seeds**, batch 64: ``make_ensemble_train_step`` on a
  ``create_ensemble`` state (every member's AdamW step in one program)
  against 8 sequential calls of the ordinary jitted train step, one per
  member's own state.

Each side is a ``runner.Runner`` whose ``step`` is the whole job (64 gradients;
one step of all 8 members), timed interleaved like the workloads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.runner import Runner, timed_call
from experiments.bench.workloads_nnlib import optimizer
from nnlib.models import MLPClassifier
from nnlib.train import (
    TrainState,
    create_ensemble,
    make_ensemble_train_step,
    make_train_step,
    num_params,
    per_example_gradients,
)

SPEC = dict(batch=64, inputs=784, hidden=(512, 512), classes=10, members=8)


def _data(spec: dict[str, Any]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "inputs": rng.standard_normal((spec["batch"], spec["inputs"]), np.float32),
        "labels": rng.integers(0, spec["classes"], (spec["batch"],)).astype(np.int32),
    }


def _model(spec: dict[str, Any]) -> MLPClassifier:
    return MLPClassifier(hidden_sizes=spec["hidden"], num_classes=spec["classes"])


def _holder_runner(name: str, framework: str, fn: Any, params: int, items: int) -> Runner:
    """A runner whose step stores ``fn()``'s result, and whose sync waits on it.

    The previous result is dropped before the next call, as the PyTorch
    runners keep none: held across the call, the 64 per-example gradients'
    170 MB were written to other memory than the last call's every time
    (11.5 against 11.2 ms, interleaved)."""
    holder: dict[str, Any] = {}

    def step() -> None:
        holder.pop("out", None)
        holder["out"] = fn()

    def sync() -> None:
        jax.block_until_ready(holder.get("out"))

    runner = Runner(name, framework, step, sync, params, items_per_step=items)
    _, runner.compile_s = timed_call(lambda: (step(), sync()))
    return runner


def per_example_runners(spec: dict[str, Any] = SPEC) -> list[Runner]:
    """[vmap, Python loop] (and torch.func.vmap when PyTorch is installed)."""
    data = _data(spec)
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    model = _model(spec)
    state = TrainState.create(model=model, tx=optimizer(), key=jax.random.key(0),
                              example_input=batch["inputs"][:1])
    key = jax.random.key(2)
    grads = jax.jit(lambda s, b, k: per_example_gradients(s, b, k, train=False))
    n = spec["batch"]
    params = num_params(state.params)
    # Sliced once, outside the timed loop: the loop times the gradients only.
    examples = [jax.tree.map(lambda x, i=i: x[i:i + 1], batch) for i in range(n)]
    example_keys = [jax.random.fold_in(key, i) for i in range(n)]
    runners = [
        _holder_runner("per_example_vmap", "nnlib", lambda: grads(state, batch, key), params, n),
        _holder_runner("per_example_loop", "nnlib",
                       lambda: [grads(state, e, k) for e, k in zip(examples, example_keys,
                                                                   strict=True)],
                       params, n),
    ]
    try:
        import torch
    except ImportError:
        return runners
    from torch.func import functional_call, grad, vmap

    from experiments.bench.workloads_torch import mlp_model

    torch_model = mlp_model(spec)
    torch_params = {k: v.detach() for k, v in torch_model.named_parameters()}
    inputs = torch.from_numpy(data["inputs"])
    labels = torch.from_numpy(data["labels"]).long()

    def loss(p: dict[str, Any], x: Any, y: Any) -> Any:
        logits = functional_call(torch_model, p, (x[None],))
        return torch.nn.functional.cross_entropy(logits, y[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    runners.append(Runner("per_example_torch_func_vmap", "pytorch",
                          lambda: per_example(torch_params, inputs, labels), lambda: None,
                          sum(p.numel() for p in torch_params.values()), items_per_step=n))
    return runners


def ensemble_runners(spec: dict[str, Any] = SPEC) -> list[Runner]:
    """[one vmapped step of all members, the members' steps one after another]."""
    data = _data(spec)
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    model = _model(spec)
    keys = jax.random.split(jax.random.key(0), spec["members"])
    example = batch["inputs"][:1]
    # One optimizer object for all: it is a static field of TrainState, and
    # distinct (unequal) objects would make each member compile its own step.
    tx = optimizer()
    ensemble = {"state": create_ensemble(model, tx, keys, example)}
    members = [TrainState.create(model=model, tx=tx, key=k, example_input=example)
               for k in keys]
    vmapped = jax.jit(make_ensemble_train_step(), donate_argnums=0)
    single = jax.jit(make_train_step(), donate_argnums=0)

    def vmapped_step() -> Any:
        ensemble["state"], _ = vmapped(ensemble["state"], batch)
        return ensemble["state"]

    def sequential_step() -> Any:
        for i, member in enumerate(members):
            members[i], _ = single(member, batch)
        return members

    params = num_params(members[0].params)
    count = spec["members"]
    return [
        _holder_runner("ensemble_vmap", "nnlib", vmapped_step, params, count),
        _holder_runner("ensemble_sequential", "nnlib", sequential_step, params, count),
    ]
