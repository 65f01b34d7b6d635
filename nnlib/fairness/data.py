"""A synthetic tabular data set with a planted, tunable historical bias.

Fairness methods need data where the truth is known: here every group is
equally qualified by construction, and only the *historical labels* are
skewed against one group, by an amount you choose. A model fit to those labels
learns the skew through a proxy feature; a mitigation should remove it. See
:func:`planted_bias_dataset` for the generative process.

Real data: no data set with a sensitive attribute ships inside the installed
packages. fairlearn's ``fetch_adult``, ``fetch_acs_income``,
``fetch_credit_card`` ... download from OpenML at run time, and scikit-learn's
bundled sets (iris, digits, breast cancer, diabetes, wine, linnerud) carry no
sensitive attribute (its OpenML "adult-census" test fixture is a truncated
stub of a few rows, not the data). So nnlib ships no real-data loader; with a
local copy of e.g. Adult, build one with ``nnlib.data.load_tabular`` and add
the ``groups`` arrays as :func:`planted_bias_dataset` does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from nnlib.data.tabular import SPLITS, Dataset, load_tabular

FEATURE_NAMES = ("score_1", "score_2", "proxy", "noise")


def planted_bias_dataset(
    n: int,
    *,
    bias_strength: float,
    seed: int = 0,
    group_fraction: float = 0.5,
    proxy_noise: float = 0.5,
    score_noise: float = 0.5,
    label_sharpness: float = 4.0,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    include_group_feature: bool = False,
) -> Dataset:
    """Synthetic hiring-style data whose labels are biased against group 1.

    Generative process, independently for each example ``i = 1..n``
    (``N`` normal, ``sigma`` the logistic sigmoid, ``b = bias_strength``)::

        a_i ~ Bernoulli(group_fraction)        sensitive attribute (group id)
        q_i ~ N(0, 1)                          latent qualification, independent of a
        x_i1 = q_i + score_noise * e_i1        two noisy measurements of q
        x_i2 = q_i + score_noise * e_i2
        x_i3 = a_i + proxy_noise * e_i3        a proxy of a (e.g. neighbourhood)
        x_i4 = e_i4                            irrelevant noise
        y_i ~ Bernoulli(sigma(k * (q_i - b * a_i)))   historical decision, k = label_sharpness

    with all ``e ~ N(0, 1)`` independent. Both groups are equally qualified,
    but the historical decisions demand ``b`` more qualification from group 1,
    so its base rate ``P(y = 1 | a = 1) = E[sigma(k (q - b))]`` falls below
    group 0's ``E[sigma(k q)] = 1/2`` as ``b`` grows; with ``b = 0`` both are
    1/2. A model trained on ``y`` reproduces the skew by reading ``a`` off
    the proxy ``x_3``; a fair model keeps the scores and ignores the proxy.

    Splits come from ``nnlib.data.load_tabular`` (stratified by label,
    inputs standardized with train statistics), so they are deterministic in
    ``seed``, which also seeds the sampling (``np.random.default_rng(seed)``).

    Args:
      n: number of examples (>= 20).
      bias_strength: ``b >= 0``, the extra qualification asked of group 1.
      seed: fixes the sample and the split.
      group_fraction: ``P(a = 1)``, in (0, 1).
      proxy_noise, score_noise: noise scales (>= 0) of the proxy and the scores.
      label_sharpness: ``k > 0``; large ``k`` makes labels nearly
        deterministic given ``q``.
      fractions: ``(train, val, test)``, summing to 1.
      include_group_feature: append ``a`` itself as a last input column
        (``"group"``), for models that are allowed to see it.

    Returns:
      A :class:`nnlib.data.Dataset` named ``"planted_bias"``, ``num_classes=2``;
      each split is ``{"inputs": float32 [n_split, 4 or 5], "labels": int32
      [n_split], "groups": int32 [n_split]}``. ``info`` holds the
      ``standardizer``, ``feature_names``, ``qualification`` (``{split: q}``)
      and ``params`` (the arguments above).
    """
    fn = "planted_bias_dataset"
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 20:
        raise ValueError(f"{fn} expected n to be an int >= 20, got {n!r}")
    if not (math.isfinite(bias_strength) and bias_strength >= 0):
        raise ValueError(f"{fn} expected bias_strength >= 0 (the extra qualification asked of "
                         f"group 1), got {bias_strength}")
    if not 0 < group_fraction < 1:
        raise ValueError(f"{fn} expected group_fraction in (0, 1), got {group_fraction}")
    if not (proxy_noise >= 0 and score_noise >= 0):
        raise ValueError(f"{fn} expected proxy_noise >= 0 and score_noise >= 0, got "
                         f"{proxy_noise} and {score_noise}")
    if not label_sharpness > 0:
        raise ValueError(f"{fn} expected label_sharpness > 0, got {label_sharpness}")

    rng = np.random.default_rng(seed)
    a = (rng.random(n) < group_fraction).astype(np.int32)  # [n]
    q = rng.standard_normal(n)  # [n]
    e = rng.standard_normal((n, 4))  # [n, 4]
    x = np.stack([q + score_noise * e[:, 0], q + score_noise * e[:, 1],
                  a + proxy_noise * e[:, 2], e[:, 3]], axis=1)  # [n, 4]
    names = FEATURE_NAMES
    if include_group_feature:
        x = np.concatenate([x, a[:, None].astype(np.float64)], axis=1)  # [n, 5]
        names = (*names, "group")
    p_positive = 1 / (1 + np.exp(-label_sharpness * (q - bias_strength * a)))
    y = (rng.random(n) < p_positive).astype(np.int32)  # [n]

    data = load_tabular(x, y, fractions=fractions, seed=seed, name="planted_bias",
                        feature_names=names)
    idx = data.indices
    splits = {s: {**data[s], "groups": a[idx[s]]} for s in SPLITS}
    params = dict(n=n, bias_strength=bias_strength, seed=seed, group_fraction=group_fraction,
                  proxy_noise=proxy_noise, score_noise=score_noise,
                  label_sharpness=label_sharpness, include_group_feature=include_group_feature)
    info = {**data.info, "qualification": {s: q[idx[s]] for s in SPLITS}, "params": params}
    return dataclasses.replace(data, **splits, num_classes=2, class_names=("negative", "positive"),
                               info=info)
