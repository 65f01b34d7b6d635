"""nnlib.search: neural architecture search — a search space over depth,
width, activation and kernel size; random search and regularized evolution
under a budget of trained candidates; the accuracy/FLOPs Pareto front; and
the one-program trainer (masked widths, seeds under ``vmap``) that makes
training many small candidates cheap."""

from nnlib.search.nas import (
    Architecture,
    Candidate,
    MaskedCNN,
    MaskedMLP,
    SearchSpace,
    evolution_cycle,
    make_evaluator,
    make_trainer,
    pareto_front,
    random_search,
    regularized_evolution,
)

__all__ = [
    "Architecture",
    "Candidate",
    "MaskedCNN",
    "MaskedMLP",
    "SearchSpace",
    "evolution_cycle",
    "make_evaluator",
    "make_trainer",
    "pareto_front",
    "random_search",
    "regularized_evolution",
]
