"""nnlib.train: pure jit-compiled steps and the loop that drives them."""

from nnlib.train.optim import (
    OPTIMIZERS,
    SCHEDULES,
    make_optimizer,
    make_schedule,
    path_str,
)
from nnlib.train.state import TrainState, num_params
from nnlib.train.step import (
    average_metrics,
    classification_loss,
    make_eval_step,
    make_train_step,
    regression_loss,
)

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainState",
    "average_metrics",
    "classification_loss",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "num_params",
    "path_str",
    "regression_loss",
]
