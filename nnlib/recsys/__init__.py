"""nnlib.recsys: recommendation from implicit feedback.

* :mod:`~nnlib.recsys.data`: :func:`synthetic_implicit_feedback` (latent
  preferences + power-law popularity, sampled without replacement; the truth
  is kept, so an oracle ranking is available) and :func:`leave_k_out` per-user
  test/validation splits. No real implicit-feedback data set ships with the
  installed packages, and nothing is downloaded.
* :mod:`~nnlib.recsys.models`: :class:`MatrixFactorization` and the neural
  :class:`TwoTower` (user id + history bag, item id + item features), both
  scoring by a dot product; :func:`popularity_scores`, the baseline.
* :mod:`~nnlib.recsys.losses`: BPR, sampled softmax, in-batch softmax with
  the logQ correction and accidental-hit removal, weighted MF; ``make_*_loss``
  builders for ``nnlib.train.make_train_step``.
* :mod:`~nnlib.recsys.metrics`: recall@k and NDCG@k with the user's
  training items masked, vectorised in JAX.
"""

from nnlib.recsys.data import (
    ImplicitFeedback,
    LeaveOutSplit,
    interaction_mask,
    leave_k_out,
    power_law_popularity,
    synthetic_implicit_feedback,
)
from nnlib.recsys.losses import (
    accidental_hits,
    bpr_loss,
    in_batch_softmax_loss,
    make_bpr_loss,
    make_in_batch_softmax_loss,
    make_sampled_softmax_loss,
    sampled_softmax_loss,
    weighted_matrix_factorization_loss,
)
from nnlib.recsys.metrics import ndcg_at_k, ranking_metrics, recall_at_k, top_k_items
from nnlib.recsys.models import MatrixFactorization, TwoTower, popularity_scores

__all__ = [
    "ImplicitFeedback",
    "LeaveOutSplit",
    "MatrixFactorization",
    "TwoTower",
    "accidental_hits",
    "bpr_loss",
    "in_batch_softmax_loss",
    "interaction_mask",
    "leave_k_out",
    "make_bpr_loss",
    "make_in_batch_softmax_loss",
    "make_sampled_softmax_loss",
    "ndcg_at_k",
    "popularity_scores",
    "power_law_popularity",
    "ranking_metrics",
    "recall_at_k",
    "sampled_softmax_loss",
    "synthetic_implicit_feedback",
    "top_k_items",
    "weighted_matrix_factorization_loss",
]
