"""nnlib.fairness: group fairness metrics and differentiable mitigations.

* :mod:`~nnlib.fairness.metrics`: selection rates, demographic parity,
  equalized odds and equal opportunity per group and as differences/ratios,
  matching ``fairlearn.metrics``; a ``MetricFrame``-like :func:`by_group`.
  Groups are int ids ``[n]`` with a static ``num_groups``, so everything
  works under ``jit`` and ``vmap``.
* :mod:`~nnlib.fairness.penalties`: smooth demographic parity / equalized
  odds penalties, :func:`make_fair_loss` for ``nnlib.train.make_train_step``,
  and adversarial debiasing (Zhang et al. 2018).
* :mod:`~nnlib.fairness.data`: :func:`planted_bias_dataset`, synthetic data
  with a known, tunable historical bias.
"""

from nnlib.fairness.data import planted_bias_dataset
from nnlib.fairness.metrics import (
    GroupedMetric,
    by_group,
    demographic_parity_difference,
    demographic_parity_ratio,
    equal_opportunity_difference,
    equal_opportunity_ratio,
    equalized_odds_difference,
    equalized_odds_ratio,
    false_positive_rate,
    group_accuracy,
    multiclass_demographic_parity_difference,
    multiclass_selection_rate,
    selection_rate,
    true_positive_rate,
)
from nnlib.fairness.penalties import (
    AdversarialDebiasing,
    AdversarialDebiasingState,
    adversary_features,
    demographic_parity_penalty,
    equalized_odds_penalty,
    make_adversarial_debiasing_step,
    make_fair_loss,
)

__all__ = [
    "AdversarialDebiasing",
    "AdversarialDebiasingState",
    "GroupedMetric",
    "adversary_features",
    "by_group",
    "demographic_parity_difference",
    "demographic_parity_penalty",
    "demographic_parity_ratio",
    "equal_opportunity_difference",
    "equal_opportunity_ratio",
    "equalized_odds_difference",
    "equalized_odds_penalty",
    "equalized_odds_ratio",
    "false_positive_rate",
    "group_accuracy",
    "make_adversarial_debiasing_step",
    "make_fair_loss",
    "multiclass_demographic_parity_difference",
    "multiclass_selection_rate",
    "planted_bias_dataset",
    "selection_rate",
    "true_positive_rate",
]
