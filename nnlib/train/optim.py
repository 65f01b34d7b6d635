"""Optimizers and schedules, all optax, chosen by name from plain config values.

``make_optimizer`` builds the chain every experiment needs::

    clip_by_global_norm -> optimizer (with weight decay) -> freeze mask
    -> gradient accumulation (optax.MultiSteps)

Weight decay applies to weight matrices and kernels only (``ndim >= 2``); biases
and normalization scales are not decayed (the AdamW paper's practice, and
nanoGPT's). Frozen parameters are selected by regular expressions on their
path, ``"encoder/layers_0/.*"``, and receive exactly zero updates.

A plain ``"adamw"`` (no clipping, freezing or accumulation) comes as a
``FusedAdamW``: optax's ``adamw`` (its ``init`` and ``update``, its state)
plus ``apply``, which ``TrainState.apply_gradients`` calls to update the
parameters and both moments of each large float32 array in one native pass
on the CPU (``nnlib.layers._native.adamw_update``), where optax's program is
three dependent loops per array. The arithmetic is optax's, in its order,
except that the bias corrections multiply by their reciprocals instead of
dividing (one division per element instead of three: the kernel ran at the
divider's pace); parameters agree with optax's to a few float32 roundings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nnlib.layers import _native

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad", "lion")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear", "warmup_linear")


def path_str(path: Sequence[Any]) -> str:
    """``(DictKey('dense_0'), DictKey('kernel'))`` -> ``"dense_0/kernel"``."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    return "/".join(parts)


def make_schedule(
    learning_rate: float,
    schedule: str = "constant",
    *,
    total_steps: int | None = None,
    warmup_steps: int = 0,
    end_value: float = 0.0,
) -> optax.Schedule:
    """A learning-rate schedule by name.

    Args:
      learning_rate: peak learning rate.
      schedule: one of ``SCHEDULES``. ``warmup_*`` ramp linearly from 0 over
        ``warmup_steps`` then decay to ``end_value`` at ``total_steps``.
      total_steps: length of the decay (needed by all but ``"constant"``).
      warmup_steps: linear warm-up length.
      end_value: final learning rate.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if schedule == "constant":
        if warmup_steps:
            return optax.join_schedules(
                [optax.linear_schedule(0.0, learning_rate, warmup_steps),
                 optax.constant_schedule(learning_rate)], [warmup_steps])
        return optax.constant_schedule(learning_rate)
    if total_steps is None or total_steps <= warmup_steps:
        raise ValueError(
            f"schedule {schedule!r} needs total_steps > warmup_steps, got "
            f"total_steps={total_steps}, warmup_steps={warmup_steps}"
        )
    if schedule in ("cosine", "warmup_cosine"):
        return optax.warmup_cosine_decay_schedule(
            0.0 if warmup_steps else learning_rate, learning_rate,
            warmup_steps, total_steps, end_value)
    decay = optax.linear_schedule(learning_rate, end_value, total_steps - warmup_steps)
    if not warmup_steps:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for kernels and weight matrices (``ndim >= 2``), False otherwise."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def frozen_labels(params: Any, frozen: Sequence[str]) -> Any:
    """``"frozen"`` for parameters whose path matches any pattern, else ``"train"``."""
    patterns = [re.compile(p) for p in frozen]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen"
        if any(p.fullmatch(path_str(path)) for p in patterns) else "train",
        params,
    )


#: Arrays with fewer elements take optax's update in ``FusedAdamW.apply``
#: (a native call's fixed cost, ~10-20 us, outweighs the pass it saves).
FUSED_ADAMW_MIN_SIZE = 16384


class FusedAdamW(NamedTuple):
    """optax's ``adamw`` with a one-pass ``apply`` (see the module docstring).

    ``init`` and ``update`` are optax's own (so it composes as any optax
    transformation, with its state); ``apply(grads, opt_state, params,
    keep=None)`` returns ``(new_params, new_opt_state)``, equal to ``update``
    followed by ``optax.apply_updates`` — or, where the boolean ``keep`` is
    true (a guarded step that skips a non-finite gradient; per member under
    ``vmap``), ``(params, opt_state)`` unchanged, the native arrays left as
    they are by the kernel itself instead of selected afterwards.
    """

    init: Callable[..., Any]
    update: Callable[..., Any]
    apply: Callable[..., Any]


def kept_where(keep: jax.Array, old: Any, new: Any) -> Any:
    """``old`` where ``keep``, else ``new``, leaf by leaf (a skipped update)."""
    return jax.tree.map(lambda o, n: jnp.where(keep, o, n), old, new)


def _fused_adamw(opt: Any, learning_rate: float | optax.Schedule, b1: float, b2: float,
                 eps: float, weight_decay: float) -> FusedAdamW:
    def apply(grads: Any, opt_state: Any, params: Any,
              keep: jax.Array | None = None) -> tuple[Any, Any]:
        # optax's update for every array; XLA drops what the native calls replace.
        updates, new_state = opt.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        adam, _, lr_state = opt_state
        # The step's scalars as optax computes them (its bias corrections from
        # the incremented count, the learning rate from the schedule's count);
        # the count is read before a kept step selects the old state back.
        count = new_state[0].count
        if keep is not None:
            new_params, new_state = kept_where(keep, (params, opt_state), (new_params, new_state))
        if not (jax.default_backend() == "cpu" and _native.available()):
            return new_params, new_state
        c1, c2 = (1 - b1 ** count).astype(jnp.float32), (1 - b2 ** count).astype(jnp.float32)
        lr = learning_rate(lr_state.count) if callable(learning_rate) else learning_rate
        kept = 0.0 if keep is None else keep
        treedef = jax.tree.structure(params)
        flat = treedef.flatten_up_to
        out_p, out_mu, out_nu = flat(new_params), flat(new_state[0].mu), flat(new_state[0].nu)
        inputs = zip(flat(params), flat(grads), flat(adam.mu), flat(adam.nu),
                     flat(decay_mask(params)), strict=True)
        for i, (p, g, mu, nu, decayed) in enumerate(inputs):
            if not (p.size >= FUSED_ADAMW_MIN_SIZE
                    and all(a.dtype == jnp.float32 for a in (p, g, mu, nu))):
                continue
            scalars = jnp.stack([jnp.asarray(x, jnp.float32) for x in (
                -lr, 1 - b1, b1, 1 - b2, b2, eps, weight_decay if decayed else 0.0, c1, c2,
                kept)])
            out_p[i], out_mu[i], out_nu[i] = _native.adamw_update(p, g, mu, nu, scalars)
        adam_new = new_state[0]._replace(mu=treedef.unflatten(out_mu),
                                         nu=treedef.unflatten(out_nu))
        return treedef.unflatten(out_p), (adam_new, *new_state[1:])

    return FusedAdamW(opt.init, opt.update, apply)


def make_optimizer(
    name: str = "adamw",
    learning_rate: float | optax.Schedule = 1e-3,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    b1: float = 0.9,
    b2: float | None = None,
    eps: float = 1e-8,
    clip_norm: float | None = None,
    accumulate_steps: int = 1,
    frozen: Sequence[str] = (),
) -> optax.GradientTransformation | FusedAdamW:
    """An optax optimizer by name, with clipping, decay, freezing and accumulation.

    A plain ``"adamw"`` comes as a ``FusedAdamW`` (optax's, plus a one-pass
    ``apply``; see the module docstring).

    Args:
      name: one of ``OPTIMIZERS``.
      learning_rate: a float or an optax schedule (``make_schedule``).
      weight_decay: decoupled weight decay (AdamW-style for ``"adamw"`` and
        ``"lion"``; added to the gradient, i.e. L2, for the others), applied to
        ``ndim >= 2`` parameters only.
      momentum: for ``"momentum"``, ``"nesterov"`` and ``"rmsprop"``.
      b1, b2, eps: Adam-family and Lion moments; ``b2=None`` is each one's
        published default, 0.999 for Adam(W), 0.99 for Lion (as optax).
      clip_norm: clip the global gradient norm to this value first.
      accumulate_steps: average gradients over this many calls before one
        update (``optax.MultiSteps``); between updates, parameters don't move.
      frozen: regular expressions (full match) on parameter paths such as
        ``"encoder/.*"``; matching parameters get zero updates and no
        optimizer state.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    if accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be >= 1, got {accumulate_steps}")
    lr = learning_rate
    if b2 is None:
        b2 = 0.99 if name == "lion" else 0.999
    if name == "adamw":
        opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
        if clip_norm is None and not frozen and accumulate_steps == 1:
            return _fused_adamw(opt, lr, b1, b2, eps, weight_decay)
    elif name == "lion":
        opt = optax.lion(lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
    else:
        base = {
            "sgd": lambda: optax.sgd(lr),
            "momentum": lambda: optax.sgd(lr, momentum=momentum),
            "nesterov": lambda: optax.sgd(lr, momentum=momentum, nesterov=True),
            "adam": lambda: optax.adam(lr, b1=b1, b2=b2, eps=eps),
            "rmsprop": lambda: optax.rmsprop(lr, momentum=momentum, eps=eps),
            "adagrad": lambda: optax.adagrad(lr, eps=eps),
        }[name]()
        opt = base
        if weight_decay:
            opt = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask), base)
    if clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
    if frozen:
        frozen = tuple(frozen)
        opt = optax.multi_transform(
            {"train": opt, "frozen": optax.set_to_zero()},
            lambda params: frozen_labels(params, frozen),
        )
    if accumulate_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=accumulate_steps)
    return opt
