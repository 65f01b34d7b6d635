"""nnlib.meta: few-shot learning by meta-learning.

* ``maml``: Model-Agnostic Meta-Learning (Finn et al. 2017), second order
  through the inner ``jax.grad`` or first order (FOMAML), over any
  ``apply_fn(params, x)`` and loss.
* ``protonet``: prototypical networks (Snell et al. 2017): class means of an
  embedding, logits = minus squared Euclidean distance.
* ``tasks``: task distributions: Finn et al.'s sinusoid regression and N-way
  K-shot episodes (the 8x8 digits split by class into meta-train 0-6 and
  held-out 7-9, optionally with rotated training classes).
"""

from nnlib.meta.maml import (
    adaptation_curve,
    inner_adapt,
    make_maml_train_step,
    maml_loss,
    task_loss,
)
from nnlib.meta.protonet import (
    class_prototypes,
    episodes_loss,
    make_protonet_train_step,
    prototypical_logits,
    prototypical_loss,
    squared_euclidean_distances,
)
from nnlib.meta.tasks import (
    DIGITS_TEST_CLASSES,
    DIGITS_TRAIN_CLASSES,
    DigitsSamplers,
    Episode,
    EpisodeSampler,
    SinusoidTasks,
    digits_episode_samplers,
    rotated_classes,
    sample_sinusoid_tasks,
    sinusoid,
)

__all__ = [
    "DIGITS_TEST_CLASSES",
    "DIGITS_TRAIN_CLASSES",
    "DigitsSamplers",
    "Episode",
    "EpisodeSampler",
    "SinusoidTasks",
    "adaptation_curve",
    "class_prototypes",
    "digits_episode_samplers",
    "episodes_loss",
    "inner_adapt",
    "maml_loss",
    "make_maml_train_step",
    "make_protonet_train_step",
    "prototypical_logits",
    "prototypical_loss",
    "rotated_classes",
    "sample_sinusoid_tasks",
    "sinusoid",
    "squared_euclidean_distances",
    "task_loss",
]
