"""Adversarial training (Madry et al. 2018): train on PGD examples of the current model.

Madry et al. ("Towards Deep Learning Models Resistant to Adversarial Attacks")
minimize the robust loss ``E[max_{||delta|| <= eps} L(theta, x + delta, y)]``:
each step approximates the inner maximum with PGD against the current
parameters, then takes an ordinary gradient step on the loss at the
adversarial points (by Danskin's theorem that is a descent direction of the
robust loss; no gradient flows through the attack).

The step is ``nnlib.train.make_train_step``'s step applied to the attacked
batch, so everything that step does — optimizer, mutable collections, dropout
keys, the non-finite guard, device-axis averaging — holds unchanged:

* **Keys.** The step key is ``fold_in(state.rng, state.step)`` as in
  ``make_train_step``; the model's rng streams use ``fold_in(step_key, i)``
  for ``i < len(rng_streams)``, and the attack's random start uses the next
  index, ``fold_in(step_key, len(rng_streams))``, so no key is reused.
* **Attack mode.** The attack runs the model in evaluation mode
  (``train=False``: no dropout, running BatchNorm statistics, no collection
  updates): each example's gradient depends on that example only, and the
  attack is a deterministic function of the parameters and the key.
* **Loss.** The attack ascends the train loss ``loss_fn(outputs, batch)``; its
  mean over examples scales every example's gradient by the same positive
  factor, which neither the sign (L-infinity) nor the per-example
  normalization (L2) sees. Masked (padding) rows get zero gradient and stay at
  their random start; they are not counted anywhere.
* **mix.** The first ``max(1, round(mix * batch))`` rows are replaced by their
  adversarial versions and the rest stay clean (batches are shuffled
  upstream); ``mix=1`` is Madry et al.'s training, ``mix=0.5`` Goodfellow et
  al.'s (2015) half-clean objective. Plain training is ``make_train_step``.

Shapes glossary: B batch; ``batch["inputs"]: [B, ...]`` floating,
``batch["labels"]: [B]``; every batch entry has a leading ``[B]`` axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from nnlib.layers._checks import check_input
from nnlib.robust.attacks import _check_clip, _check_norm, _check_positive, _pgd_loop
from nnlib.train.state import TrainState
from nnlib.train.step import Batch, LossFn, _forward, classification_loss, make_train_step


def make_adversarial_train_step(
    loss_fn: LossFn | None = None,
    *,
    epsilon: float,
    step_size: float,
    num_steps: int,
    norm: str = "linf",
    mix: float = 1.0,
    random_start: bool = True,
    clip_min: float | None = 0.0,
    clip_max: float | None = 1.0,
    axis_name: str | None = None,
    gradient_reduction: str = "loss",
    rng_streams: Sequence[str] = ("dropout",),
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the pure adversarial train step ``(state, batch) -> (state, metrics)``.

    Args:
      loss_fn: ``(outputs, batch) -> (loss, metrics)``, attacked and trained
        on; ``classification_loss()`` if ``None``.
      epsilon, step_size, num_steps, norm, random_start, clip_min, clip_max:
        the PGD attack, as in :func:`nnlib.robust.pgd` (``num_steps >= 1``).
      mix: fraction of each batch replaced by adversarial examples, in (0, 1].
      axis_name, gradient_reduction, rng_streams: as in
        ``nnlib.train.make_train_step``.

    Returns:
      An unjitted step. ``metrics`` holds ``make_train_step``'s metrics for
      the trained-on (mixed) batch in training mode (``loss``, ``accuracy``,
      ``grad_norm``, ``finite``, ``nonfinite_leaf``) plus, in evaluation mode
      with the parameters before the update, ``clean_*`` (the whole clean
      batch) and ``adversarial_*`` (the attacked rows) versions of
      ``loss_fn``'s metrics, e.g. ``clean_accuracy`` and
      ``adversarial_accuracy``.
    """
    fn = "make_adversarial_train_step"
    _check_norm(fn, norm)
    _check_positive(fn, "epsilon", epsilon, allow_zero=True)
    _check_positive(fn, "step_size", step_size, allow_zero=False)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"{fn} expected num_steps to be an int >= 1, got {num_steps!r}")
    if not 0 < mix <= 1:
        raise ValueError(f"{fn} expected mix in (0, 1] (the fraction of the batch attacked), "
                         f"got {mix}; for mix=0 use nnlib.train.make_train_step")
    _check_clip(fn, clip_min, clip_max)
    loss_fn = loss_fn or classification_loss()
    train_step = make_train_step(loss_fn, axis_name=axis_name,
                                 gradient_reduction=gradient_reduction, rng_streams=rng_streams)

    def evaluate(state: TrainState, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        outputs, _ = _forward(state, state.params, batch, train=False, key=None, rng_streams=())
        return loss_fn(outputs, batch)

    def adversarial_train_step(
        state: TrainState, batch: Batch
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        x = batch["inputs"]
        check_input(fn, x, layout="[batch, ...]", min_ndim=1, name='batch["inputs"]')
        n = x.shape[0]
        k = max(1, round(mix * n))  # rows attacked
        attacked = batch if k == n else jax.tree.map(lambda a: a[:k], batch)

        def objective(x_adv: jax.Array) -> jax.Array:
            return evaluate(state, {**attacked, "inputs": x_adv})[0]

        step_key = jax.random.fold_in(state.rng, state.step)
        attack_key = jax.random.fold_in(step_key, len(rng_streams))
        x_adv, _ = _pgd_loop(
            objective, attacked["inputs"], epsilon=epsilon, step_size=step_size,
            num_steps=num_steps, norm=norm, random_start=random_start, key=attack_key,
            targeted=False, clip_min=clip_min, clip_max=clip_max)  # [k, ...]

        _, clean_metrics = evaluate(state, batch)
        _, adversarial_metrics = evaluate(state, {**attacked, "inputs": x_adv})
        inputs = x_adv if k == n else jnp.concatenate([x_adv, x[k:]])  # [B, ...]
        new_state, metrics = train_step(state, {**batch, "inputs": inputs})

        extra = {f"clean_{name}": v for name, v in clean_metrics.items()}
        extra |= {f"adversarial_{name}": v for name, v in adversarial_metrics.items()}
        if axis_name is not None:
            extra = jax.lax.pmean(extra, axis_name)
        return new_state, {**metrics, **extra}

    return adversarial_train_step
