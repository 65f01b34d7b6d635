"""nnlib.robust: adversarial attacks (FGSM, PGD), robust accuracy and
adversarial training, as pure jit-compiled functions with explicit PRNG keys."""

from nnlib.robust.attacks import NORMS, fgsm, pgd, project_onto_ball, robust_accuracy
from nnlib.robust.training import make_adversarial_train_step

__all__ = [
    "NORMS",
    "fgsm",
    "make_adversarial_train_step",
    "pgd",
    "project_onto_ball",
    "robust_accuracy",
]
