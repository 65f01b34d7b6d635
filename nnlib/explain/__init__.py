"""nnlib.explain: attribution methods for any model given as ``f(x) -> logits``.

Gradients (saliency, gradient x input, integrated gradients, SmoothGrad),
Grad-CAM, occlusion, attention maps and rollout, and the model-randomization
sanity check. Pure functions with explicit PRNG keys; the many-evaluation
methods run in bounded-memory chunks. Conventions (the model function, the
``target`` classes) are in ``nnlib.explain.gradients``.
"""

from nnlib.explain.attention import (
    HEAD_FUSIONS,
    attention_map,
    attention_rollout,
    collect_attention_weights,
)
from nnlib.explain.gradcam import RESIZE_METHODS, grad_cam, grad_cam_from_split
from nnlib.explain.gradients import (
    IG_METHODS,
    completeness_gap,
    gradient_x_input,
    integrated_gradients,
    saliency,
    smoothgrad,
)
from nnlib.explain.occlusion import occlusion
from nnlib.explain.sanity import (
    MODES,
    RandomizationResult,
    layer_names,
    model_randomization_check,
    reinitialize,
    spearman_rank_correlation,
)

__all__ = [
    "HEAD_FUSIONS",
    "IG_METHODS",
    "MODES",
    "RESIZE_METHODS",
    "RandomizationResult",
    "attention_map",
    "attention_rollout",
    "collect_attention_weights",
    "completeness_gap",
    "grad_cam",
    "grad_cam_from_split",
    "gradient_x_input",
    "integrated_gradients",
    "layer_names",
    "model_randomization_check",
    "occlusion",
    "reinitialize",
    "saliency",
    "smoothgrad",
    "spearman_rank_correlation",
]
