"""nnlib.train: pure jit-compiled steps, their vmap and mesh compositions, and
the loop that drives them (progress, logging, checkpoints, exact resume)."""

from nnlib.train import parallel
from nnlib.train.checkpoint import Checkpointer
from nnlib.train.compile import compiler_options, jit
from nnlib.train.logging import MetricLogger, plot_history, progress, read_history
from nnlib.train.loop import NonFiniteError, fit
from nnlib.train.optim import (
    OPTIMIZERS,
    SCHEDULES,
    FusedAdamW,
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
from nnlib.train.vmap import (
    create_ensemble,
    dp_sgd_gradients,
    ensemble_predict,
    make_dp_sgd_train_step,
    make_ensemble_train_step,
    per_example_grad_norms,
    per_example_gradients,
    stack_ensemble,
    unstack_ensemble,
)

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "Checkpointer",
    "MetricLogger",
    "NonFiniteError",
    "TrainState",
    "average_metrics",
    "classification_loss",
    "compiler_options",
    "create_ensemble",
    "dp_sgd_gradients",
    "ensemble_predict",
    "fit",
    "jit",
    "make_dp_sgd_train_step",
    "make_ensemble_train_step",
    "make_eval_step",
    "FusedAdamW",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "num_params",
    "parallel",
    "path_str",
    "per_example_grad_norms",
    "per_example_gradients",
    "plot_history",
    "progress",
    "read_history",
    "regression_loss",
    "stack_ensemble",
    "unstack_ensemble",
]
