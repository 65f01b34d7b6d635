"""nnlib.multimodal: models that embed images and text in one space.

``CLIP`` (Radford et al. 2021): an image tower and a text tower trained with a
symmetric contrastive loss (``clip_loss``) on (image, caption) pairs, then used
for zero-shot classification from text prompts (``zero_shot_classifier``) and
image<->text retrieval (``retrieval_recall_at_k``). ``nnlib.multimodal.data``
generates captioned 8x8 digits to train it on.
"""

from nnlib.multimodal import data
from nnlib.multimodal.clip import (
    CLIP,
    INIT_LOG_SCALE,
    MAX_LOG_SCALE,
    ImageEncoder,
    TextEncoder,
    chance_recall_at_k,
    clamp_log_scale,
    clip_loss,
    clip_loss_fn,
    l2_normalize,
    prompt_ensemble,
    retrieval_recall_at_k,
    similarity_matrix,
    zero_shot_classifier,
    zero_shot_predict,
)
from nnlib.multimodal.data import DigitCaptions, load_digit_captions

__all__ = [
    "CLIP",
    "INIT_LOG_SCALE",
    "MAX_LOG_SCALE",
    "DigitCaptions",
    "ImageEncoder",
    "TextEncoder",
    "chance_recall_at_k",
    "clamp_log_scale",
    "clip_loss",
    "clip_loss_fn",
    "data",
    "l2_normalize",
    "load_digit_captions",
    "prompt_ensemble",
    "retrieval_recall_at_k",
    "similarity_matrix",
    "zero_shot_classifier",
    "zero_shot_predict",
]
