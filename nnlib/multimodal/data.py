"""Image–caption pairs from the 8x8 digits: a tiny, fully known multimodal data set.

CLIP learns from (image, text) pairs scraped from the web. Here the pairs are
generated, so every property of the text is known: each scikit-learn 8x8 digit
(``nnlib.data.load_digits``, the same fixed stratified split) gets a caption
drawn from a template and filled in with

* the class, as a word or a numeral: ``"seven"`` or ``"7"``;
* two *attributes measured on the image itself*, so that a caption says more
  than the label and image↔text retrieval is harder than classification:

  - stroke weight, ``"thin"`` or ``"thick"``: the image's ink mass (sum of
    pixel intensities) below or above the median ink mass *of its class*;
  - slant, ``"slanting left"`` / ``"upright"`` / ``"slanting right"``: the
    slope ``dx/dy`` of the ink's principal axis, ``cov(x, y) / var(y)`` under
    the pixel intensities, split at the terciles of its class (image rows
    grow downwards, so a stroke whose top leans right has ``cov(x, y) < 0``).

  Thresholds are per class and always computed on the *training* images, so
  an attribute is a within-class property (a thick one and a thick seven are
  thick relative to other ones and sevens) and test captions use the same
  cut points as training ones.

Templates. ``TRAIN_TEMPLATES`` are the phrasings seen during training;
``HELD_OUT_TEMPLATES`` use words and structures the training captions never
contain ("photo", "scan", "numeral", "picture"), for measuring whether
zero-shot prompts transfer to unseen wording. A template is a ``str.format``
pattern over ``{word}``, ``{digit}``, ``{weight}`` and ``{slant}``. Captions are
drawn with a seeded ``numpy`` generator: the same seed gives the same captions.

Tokens. ``caption_tokenizer("word")`` (the default) is a byte-level
``nnlib.data.BPETokenizer`` trained on every caption the *training* templates
can make, with enough merges to turn each of their words into one token
(about 12 tokens per caption instead of ~50 characters: the text tower costs
a quarter as much). Words only the held-out templates use are split into
pieces the model never saw in training, never into an unknown token.
``caption_tokenizer("char")`` is a ``nnlib.data.CharTokenizer`` over a fixed
lower-case alphabet. Both have ``[PAD]`` (id 0) and ``[EOS]``; ``tokenize``
appends ``[EOS]`` and pads to a fixed length (static shapes: one compile).

Retrieval. A caption rarely describes only its own image ("seven" fits every
seven), so ``caption_relevance`` marks caption ``j`` relevant to image ``i``
when the class and every attribute the caption mentions agree: the ground
truth for recall@k beside the strict one-pair-per-image diagonal.

Shapes: ``n`` examples, ``T`` tokens per caption (``max_len``).
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence

import numpy as np
from jaxtyping import Bool, Float, Int

from nnlib.data import BPETokenizer, CharTokenizer, load_digits

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WEIGHT_WORDS = ("thin", "thick")
SLANT_WORDS = ("slanting left", "upright", "slanting right")

TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "a sketch of the number {word}",
    "{digit}",
    "{word}",
    "a {weight} {word}",
    "a {weight} {digit}, {slant}",
    "the number {word} written {slant}",
    "a {weight}, {slant} handwritten {word}",
    "the handwritten digit {word} drawn with {weight} strokes",
)
HELD_OUT_TEMPLATES = (
    "a photo of the number {digit}",
    "a scan of a {weight} {word}",
    "an image showing the numeral {word}, {slant}",
    "a picture of a {word}",
)

PAD, EOS, UNK = "[PAD]", "[EOS]", "[UNK]"
ALPHABET = string.ascii_lowercase + string.digits + " ,-"


# --- attributes measured on the image --------------------------------------------


def ink_mass(images: Float[np.ndarray, "n height width 1"]) -> Float[np.ndarray, " n"]:
    """Total ink of each image: the sum of its pixel intensities."""
    images = np.asarray(images, np.float64)
    return images.reshape(len(images), -1).sum(axis=1)


def slant(images: Float[np.ndarray, "n height width 1"]) -> Float[np.ndarray, " n"]:
    """Slope ``dx/dy`` of each image's ink: ``cov(x, y) / var(y)`` weighted by
    intensity. Negative = the top leans right (rows grow downwards)."""
    images = np.asarray(images, np.float64)[..., 0]  # [n, H, W]
    _, h, w = images.shape
    y, x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                       indexing="ij")  # [H, W] each
    mass = np.maximum(images.sum(axis=(1, 2)), 1e-9)  # [n]
    mean_x = (images * x).sum(axis=(1, 2)) / mass
    mean_y = (images * y).sum(axis=(1, 2)) / mass
    dx, dy = x - mean_x[:, None, None], y - mean_y[:, None, None]  # [n, H, W]
    cov = (images * dx * dy).sum(axis=(1, 2)) / mass
    var_y = (images * dy * dy).sum(axis=(1, 2)) / mass
    return cov / np.maximum(var_y, 1e-9)


@dataclasses.dataclass(frozen=True)
class AttributeThresholds:
    """Per-class cut points, fitted on training images.

    Attributes:
      weight: ``[10]`` median ink mass of each class.
      slant: ``[10, 2]`` terciles of each class's ``dx/dy`` slope.
    """

    weight: Float[np.ndarray, " classes"]
    slant: Float[np.ndarray, "classes 2"]

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray,
            num_classes: int = 10) -> AttributeThresholds:
        mass, slope = ink_mass(images), slant(images)
        missing = [c for c in range(num_classes) if not np.any(labels == c)]
        if missing:
            raise ValueError(f"AttributeThresholds.fit needs images of every class, "
                             f"none of {missing}")
        weight = np.array([np.median(mass[labels == c]) for c in range(num_classes)])
        # Right-leaning is a negative slope: order the cut points so that
        # bin 0 = slanting left (largest dx/dy) ... bin 2 = slanting right.
        cuts = np.stack([np.quantile(-slope[labels == c], [1 / 3, 2 / 3])
                         for c in range(num_classes)])
        return cls(weight=weight, slant=cuts)

    def __call__(self, images: np.ndarray, labels: np.ndarray
                 ) -> tuple[Int[np.ndarray, " n"], Int[np.ndarray, " n"]]:
        """``(weight_id [n] in {0: thin, 1: thick}, slant_id [n] in {0: left,
        1: upright, 2: right})`` of each image relative to its class."""
        labels = np.asarray(labels)
        weight = (ink_mass(images) > self.weight[labels]).astype(np.int32)
        lean = -slant(images)  # [n], larger = more to the right
        cuts = self.slant[labels]  # [n, 2]
        slant_id = (lean > cuts[:, 0]).astype(np.int32) + (lean > cuts[:, 1])
        return weight, slant_id.astype(np.int32)


# --- captions ---------------------------------------------------------------------


def fill(template: str, label: int, weight: int = 0, slant_id: int = 1) -> str:
    """One caption: ``template`` with the class word/numeral and the attribute words."""
    return template.format(word=NUMBER_WORDS[label], digit=str(label),
                           weight=WEIGHT_WORDS[weight], slant=SLANT_WORDS[slant_id])


def make_captions(
    labels: Int[np.ndarray, " n"],
    weight: Int[np.ndarray, " n"],
    slant_id: Int[np.ndarray, " n"],
    templates: Sequence[str] = TRAIN_TEMPLATES,
    *,
    seed: int = 0,
) -> tuple[list[str], Int[np.ndarray, " n"]]:
    """A caption per image, its template drawn uniformly with ``seed``.

    Returns ``(captions, template_ids [n])`` (indices into ``templates``).
    """
    if not templates:
        raise ValueError("make_captions needs at least one template")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(templates), size=len(labels)).astype(np.int32)
    captions = [fill(templates[t], int(y), int(w), int(s))
                for t, y, w, s in zip(ids, labels, weight, slant_id, strict=True)]
    return captions, ids


def caption_relevance(
    labels: Int[np.ndarray, " n"],
    weight: Int[np.ndarray, " n"],
    slant_id: Int[np.ndarray, " n"],
    template_ids: Int[np.ndarray, " n"],
    templates: Sequence[str] = TRAIN_TEMPLATES,
) -> Bool[np.ndarray, "n n"]:
    """Which captions truly describe which images, for retrieval.

    Caption ``j`` was made for image ``j`` by ``templates[template_ids[j]]``;
    it also describes image ``i`` when the classes agree and so does every
    attribute the template *mentions* ("a thick seven" says nothing of slant).
    Equivalently: the template would have written the very same text for
    image ``i``.

    Returns:
      ``relevant [n images, n captions]`` bool, True on the diagonal.
    """
    labels, weight, slant_id = (np.asarray(a) for a in (labels, weight, slant_id))
    t = np.asarray(template_ids)
    says_weight = np.array(["{weight}" in x for x in templates])[t]  # [n]
    says_slant = np.array(["{slant}" in x for x in templates])[t]
    same = lambda a: a[:, None] == a[None, :]  # noqa: E731  [n, n]
    return (same(labels) & (same(weight) | ~says_weight[None, :])
            & (same(slant_id) | ~says_slant[None, :]))


def class_prompts(templates: Sequence[str], num_classes: int = 10) -> list[list[str]]:
    """For each class, every distinct caption the templates can make for it
    (all attribute fillings): the prompts a zero-shot classifier ensembles."""
    prompts = []
    for c in range(num_classes):
        filled = [fill(t, c, w, s) for t in templates for w in range(len(WEIGHT_WORDS))
                  for s in range(len(SLANT_WORDS))]
        prompts.append(list(dict.fromkeys(filled)))  # dedupe, keep order
    return prompts


# --- tokens -----------------------------------------------------------------------


Tokenizer = BPETokenizer | CharTokenizer


def caption_tokenizer(kind: str = "word", templates: Sequence[str] = TRAIN_TEMPLATES
                      ) -> Tokenizer:
    """The caption tokenizer, ``[PAD]`` id 0 and ``[EOS]`` id 1.

    ``"word"``: byte-level BPE trained on all captions of ``templates`` (each of
    their words becomes one token; anything else splits into known pieces).
    ``"char"``: one id per character of ``ALPHABET`` (plus ``[UNK]``).
    """
    if kind == "char":
        return CharTokenizer(ALPHABET, special_tokens=(PAD, EOS), unk_token=UNK)
    if kind != "word":
        raise ValueError(f"caption_tokenizer: kind must be 'word' or 'char', got {kind!r}")
    corpus = [p for prompts in class_prompts(templates) for p in prompts]
    # 256 bytes + 2 specials + room for every merge the corpus has (training
    # stops when no pair occurs twice, well below this size).
    return BPETokenizer.train(corpus, vocab_size=1024, special_tokens=(PAD, EOS),
                              min_frequency=2)


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], max_len: int
             ) -> Int[np.ndarray, "n max_len"]:
    """``texts`` as ids ``[n, max_len]`` int32: the tokens, ``[EOS]``, then
    ``[PAD]``. A text longer than ``max_len - 1`` tokens is an error."""
    pad, eos = tokenizer.token_to_id(PAD), tokenizer.token_to_id(EOS)
    out = np.full((len(texts), max_len), pad, np.int32)
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if len(ids) + 1 > max_len:
            raise ValueError(f"tokenize: {text!r} has {len(ids)} tokens; with [EOS] it "
                             f"needs max_len >= {len(ids) + 1}, got {max_len}")
        out[i, :len(ids)] = ids
        out[i, len(ids)] = eos
    return out


# --- the data set -------------------------------------------------------------------


@dataclasses.dataclass
class DigitCaptions:
    """Digit images with their measured attributes, ready to caption.

    Attributes:
      splits: ``{"train"|"val"|"test": {"images": float32 [n, 8, 8, 1],
        "labels": int32 [n], "weight": int32 [n], "slant": int32 [n]}}``.
      thresholds: the per-class cut points (fitted on train).
      tokenizer: the caption tokenizer.
      max_len: ``T``, token positions per caption (longest caption + [EOS]).
    """

    splits: dict[str, dict[str, np.ndarray]]
    thresholds: AttributeThresholds
    tokenizer: Tokenizer
    max_len: int

    def captions(self, split: str, templates: Sequence[str] = TRAIN_TEMPLATES, *,
                 seed: int = 0) -> tuple[list[str], Int[np.ndarray, "n max_len"]]:
        """Draws a caption per image of ``split``; returns ``(captions, tokens)``."""
        s = self.splits[split]
        texts, _ = make_captions(s["labels"], s["weight"], s["slant"], templates, seed=seed)
        return texts, tokenize(self.tokenizer, texts, self.max_len)

    def retrieval_set(self, split: str, templates: Sequence[str] = TRAIN_TEMPLATES, *,
                      seed: int = 0
                      ) -> tuple[list[str], Int[np.ndarray, "n max_len"], Bool[np.ndarray, "n n"]]:
        """One caption per image of ``split`` and which captions describe which
        images: ``(captions, tokens [n, T], relevant [n images, n captions])``
        (``caption_relevance``; the captions are those of ``captions(split,
        templates, seed=seed)``)."""
        s = self.splits[split]
        texts, ids = make_captions(s["labels"], s["weight"], s["slant"], templates, seed=seed)
        relevant = caption_relevance(s["labels"], s["weight"], s["slant"], ids, templates)
        return texts, tokenize(self.tokenizer, texts, self.max_len), relevant

    def tokens(self, texts: Sequence[str]) -> Int[np.ndarray, "n max_len"]:
        """Any texts (prompts) as ``[n, max_len]`` ids."""
        return tokenize(self.tokenizer, texts, self.max_len)


def longest_caption(tokenizer: Tokenizer, templates: Sequence[str]) -> int:
    """Tokens in the longest caption any of ``templates`` can produce."""
    return max(len(tokenizer.encode(p)) for prompts in class_prompts(templates)
               for p in prompts)


def load_digit_captions(*, seed: int = 0, tokenizer: str = "word",
                        max_len: int | None = None) -> DigitCaptions:
    """The digits (``load_digits`` split with ``seed``) with their attributes.

    Args:
      seed: of the stratified split.
      tokenizer: ``"word"`` or ``"char"`` (``caption_tokenizer``).
      max_len: token positions per caption; default the longest caption of
        all templates (held-out ones included) plus ``[EOS]``.
    """
    digits = load_digits(seed=seed)
    train = digits["train"]
    thresholds = AttributeThresholds.fit(train["inputs"], train["labels"])
    splits = {}
    for name in ("train", "val", "test"):
        s = digits[name]
        weight, slant_id = thresholds(s["inputs"], s["labels"])
        splits[name] = {"images": s["inputs"], "labels": s["labels"],
                        "weight": weight, "slant": slant_id}
    tok = caption_tokenizer(tokenizer)
    if max_len is None:
        max_len = longest_caption(tok, TRAIN_TEMPLATES + HELD_OUT_TEMPLATES) + 1
    return DigitCaptions(splits, thresholds, tok, max_len)
