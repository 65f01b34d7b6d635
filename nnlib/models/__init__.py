"""nnlib.models: whole networks built from ``nnlib.layers``."""

from nnlib.models.bert import (
    Bert,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertOutput,
)
from nnlib.models.cnn import CNN
from nnlib.models.gpt import (
    GPT,
    GPTConfig,
    KVCache,
    generate,
    gpt_attention_weights,
    sample_next_token,
)
from nnlib.models.mlp import MLPClassifier
from nnlib.models.rnn import RNNClassifier, RNNLanguageModel
from nnlib.models.transformer import Seq2SeqTransformer, TransformerClassifier

__all__ = [
    "Bert",
    "BertConfig",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertOutput",
    "CNN",
    "GPT",
    "GPTConfig",
    "KVCache",
    "MLPClassifier",
    "RNNClassifier",
    "RNNLanguageModel",
    "Seq2SeqTransformer",
    "TransformerClassifier",
    "generate",
    "gpt_attention_weights",
    "sample_next_token",
]
