"""nnlib.data: datasets and input pipelines.

Datasets are plain numpy arrays in dicts (``{"inputs", "labels"}``) so they
batch with ``batch_iterator`` (deterministic by seed and epoch, fixed shapes,
resumable) and feed ``nnlib.train.fit`` directly. Nothing here touches the
network unless a loader is asked to ``download=True``.
"""

from nnlib.data._download import ChecksumError

# ``nnlib.data.augment`` stays the module (its combinator is
# ``nnlib.data.augment.augment``); the single transforms are re-exported.
from nnlib.data.augment import (
    random_rotation,
    random_scale,
    random_shift,
    rotate,
    scale,
    translate,
)
from nnlib.data.batching import batch_iterator, epoch_order, num_batches, prefetch
from nnlib.data.images import load_digits, load_mnist, read_idx, write_idx
from nnlib.data.sequences import (
    SequenceTask,
    addition_task,
    copy_task,
    decode_number,
    encode_number,
    images_as_sequences,
    reverse_task,
    sort_task,
)
from nnlib.data.tabular import (
    Dataset,
    Standardizer,
    load_tabular,
    split_indices,
    train_val_test_split,
)
from nnlib.data.text import (
    load_corpus,
    mlm_mask,
    next_token_windows,
    python_stdlib_corpus,
    random_windows,
    split_text,
    tiny_shakespeare,
)
from nnlib.data.tokenizers import BPETokenizer, CharTokenizer

__all__ = [
    "BPETokenizer",
    "CharTokenizer",
    "ChecksumError",
    "Dataset",
    "SequenceTask",
    "Standardizer",
    "addition_task",
    "batch_iterator",
    "copy_task",
    "decode_number",
    "encode_number",
    "epoch_order",
    "images_as_sequences",
    "load_corpus",
    "load_digits",
    "load_mnist",
    "load_tabular",
    "mlm_mask",
    "next_token_windows",
    "num_batches",
    "prefetch",
    "python_stdlib_corpus",
    "random_rotation",
    "random_scale",
    "random_shift",
    "random_windows",
    "read_idx",
    "reverse_task",
    "rotate",
    "scale",
    "sort_task",
    "split_indices",
    "split_text",
    "tiny_shakespeare",
    "train_val_test_split",
    "translate",
    "write_idx",
]
