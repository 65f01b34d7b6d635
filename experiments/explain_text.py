"""Which words made MiniLM file a sentence under "cooking"? Integrated gradients over tokens.

    python experiments/explain_text.py --workdir=runs/explain_text [--size=tiny]

The model is zero-shot topic classification with a pretrained sentence
encoder (``nnlib.pretrained``: all-MiniLM-L6-v2 in nnlib's ``Bert``): embed the
sentence and one description per topic, and score each topic by the cosine
similarity of the two unit vectors. No topic was ever trained on, so which
words drive a score is a real question about the encoder.

The score explained is the predicted topic's *centred* similarity, its cosine
minus the mean cosine over all topics: what the argmax decides on. (The raw
cosine will not do: with MiniLM a blanked sentence is about as close to every
description, ~0.1-0.2, as a real sentence is to its own topic, so ``f(x) -
f(baseline)`` is tiny or negative; centring removes that common part.)
Attributions are integrated gradients (Sundararajan et al. 2017) of that score
with respect to the *word embeddings*
``[B, T, H]`` (the model's input is discrete ids, so the path runs through the
continuous vectors the ids look up), summed over ``H`` to one score per token.
The baseline replaces every word by the ``[PAD]`` embedding and keeps
``[CLS]``/``[SEP]``, positions and the attention mask: "the same sentence,
blanked". The word embeddings are replaced inside the unmodified model with
``flax.linen.intercept_methods``, as ``nnlib.explain.grad_cam`` reaches its
feature maps. MiniLM is smooth (GELU), so Gauss-Legendre quadrature converges
fast; the run reports the completeness gap.

A second, independent measure: **leave-one-out** — blank one word at a time
and record the drop in similarity. The run reports the Spearman correlation
between each sentence's IG scores and its leave-one-out drops (they need not
agree: leave-one-out misses words that only matter together).

Nothing is trained, so the compute cost reported (``cost_*`` keys,
``nnlib.compress.cost_report``) is that of the integrated-gradients call, the
experiment's one attribution call: XLA's FLOPs and bytes, memory, the median
time of a call and its energy. The path is evaluated in a ``lax.scan`` over
chunks of nodes, whose body XLA counts once; ``cost_flops_per_step_with_loop``
counts every chunk (see :func:`attribution_cost`).

Writes ``metrics.json``, ``results.md`` (per sentence: prediction, top
words) and ``text_attributions.png`` (each sentence's tokens coloured by
attribution) into the workdir and prints the table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments._cli import sized_main  # noqa: E402
from nnlib.compress import cost_report, flops, format_cost  # noqa: E402
from nnlib.explain import completeness_gap, integrated_gradients, saliency  # noqa: E402
from nnlib.explain.sanity import spearman_rank_correlation  # noqa: E402
from nnlib.pretrained import (  # noqa: E402
    Pretrained,
    encode,
    l2_normalize,
    label_embeddings,
    load_minilm,
    mean_pool,
    tokenize,
)

TOPICS = {
    "sports": "This text is about sports, athletes and competitions.",
    "cooking": "This text is about cooking, recipes and food.",
    "computing": "This text is about computers, software and the internet.",
    "weather": "This text is about the weather, rain, wind and temperature.",
    "finance": "This text is about money, banks, markets and the economy.",
}

# (sentence, acceptable topics). The last three mix two topics on purpose: which
# words tip the balance is the interesting part ("stock": broth, or shares?).
SENTENCES = (
    ("The goalkeeper saved a penalty in the last minute of the match.", ("sports",)),
    ("Whisk the eggs with sugar, then fold in the flour and bake for twenty minutes.",
     ("cooking",)),
    ("The new update fixes a memory leak in the database driver.", ("computing",)),
    ("Heavy rain and strong winds are expected along the coast tomorrow.", ("weather",)),
    ("Shares fell sharply after the bank reported lower quarterly profits.", ("finance",)),
    ("After the marathon she cooked a huge bowl of pasta.", ("sports", "cooking")),
    ("The stadium's ticket website crashed under the load.", ("sports", "computing")),
    ("The chef kept a close eye on the price of his stock.", ("finance", "cooking")),
)

_WORD_EMBEDDINGS = ("embeddings", "word_embeddings")  # module path inside Bert
IG_BATCH_SIZE = 8  # path nodes per forward/backward pass of integrated gradients


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Attributes:
      num_sentences: how many of ``SENTENCES`` to explain (first ones).
      ig_steps: Gauss-Legendre nodes of the integrated-gradients path.
      length: tokens per row (padded), a static shape for one compile.
    """

    num_sentences: int = len(SENTENCES)
    ig_steps: int = 64
    length: int = 24

    @classmethod
    def tiny(cls) -> TextConfig:
        return cls(num_sentences=3, ig_steps=16)


# --- the model as a function of its word embeddings --------------------------------


@functools.lru_cache(maxsize=4)
def similarity_fn(model: nn.Module):
    """``(params, ids, mask, topics, word_vectors [B, T, H]) -> scores [B, C]``,
    each topic's cosine similarity minus the mean over topics.

    Runs ``model`` (a ``Bert``) on ``ids`` with the output of its word
    embedding lookup replaced by ``word_vectors``; everything else (positions,
    token types, LayerNorm, attention mask) is the model's own.
    ``word_vectors`` may hold ``k`` stacked copies of the batch, ``[k * B, T,
    H]``, giving ``[k * B, C]``. One function object per model, so ``jax.jit``
    caches on it.
    """

    def similarities(params, ids, mask, topics, word_vectors):
        # nnlib.explain stacks k copies of the batch ([k * B, T, H], copy-major)
        # to evaluate k path points in one pass: the ids and mask follow.
        copies = word_vectors.shape[0] // ids.shape[0]
        ids, mask = jnp.tile(ids, (copies, 1)), jnp.tile(mask, (copies, 1))  # [k * B, T]

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and context.module.path == _WORD_EMBEDDINGS:
                return word_vectors
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            hidden = model.apply({"params": params}, ids, attention_mask=mask).sequence_output
        sentence = l2_normalize(mean_pool(hidden, mask))  # [B, H]
        cosines = sentence @ topics.T  # [B, C]
        return cosines - jnp.mean(cosines, axis=1, keepdims=True)

    return similarities


def word_vectors(pretrained: Pretrained, ids: np.ndarray) -> jax.Array:
    """``ids [B, T] -> [B, T, H]``: the word-embedding rows the model looks up."""
    table = pretrained.params["embeddings"]["word_embeddings"]["embedding"]  # [V, H]
    return jnp.take(table, jnp.asarray(ids), axis=0)


def blank_baseline(pretrained: Pretrained, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
    """The IG baseline: every real word replaced by the ``[PAD]`` vector;
    ``[CLS]``, ``[SEP]`` and padding keep their own vectors."""
    tokenizer = pretrained.tokenizer
    special = np.isin(ids, [tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")])
    blank = np.where((mask == 1) & ~special, tokenizer.token_to_id("[PAD]"), ids)
    return word_vectors(pretrained, blank)


@functools.partial(jax.jit, static_argnames=("fn",))
def _leave_one_out(fn, params, ids, mask, topics, vectors, baseline, target):
    """``[B, T]`` drop of the target score when token ``t`` alone is blanked."""
    b, t = ids.shape

    def one(position):  # -> [B]
        hide = (jnp.arange(t) == position)[None, :, None]  # [1, T, 1]
        scores = fn(params, ids, mask, topics, jnp.where(hide, baseline, vectors))
        return jnp.take_along_axis(scores, target[:, None], axis=1)[:, 0]

    clean = jnp.take_along_axis(fn(params, ids, mask, topics, vectors), target[:, None], 1)
    return clean - jax.lax.map(one, jnp.arange(t)).T  # [B, T]


def attribution_cost(
    f: Partial,
    vectors: jax.Array,
    target: jax.Array,
    baseline: jax.Array,
    *,
    ig_steps: int,
    batch_size: int = IG_BATCH_SIZE,
    num_calls: int = 1,
    repeats: int = 5,
    params: Any = None,
) -> dict[str, Any]:
    """``nnlib.compress.cost_report`` of one ``integrated_gradients`` call as
    :func:`explain_sentences` makes it (Gauss-Legendre, ``ig_steps`` nodes,
    ``batch_size`` nodes per pass); the energy is that of ``num_calls`` calls.

    ``f`` (a ``Partial`` holding the model's parameters) is an argument of
    the measured program, not a constant baked into it. The nodes are
    evaluated in a ``lax.scan`` over ``ceil(ig_steps / batch_size)`` chunks
    and XLA counts a loop body once, so the report adds
    ``cost_loop_body_flops`` (XLA's count of one chunk in the compiled
    program, as ``cost_report`` counts: the input gradient of ``f`` at
    ``batch_size`` stacked copies of the batch, measured as
    ``nnlib.explain.saliency`` there), ``cost_loop_trip_count`` and
    ``cost_flops_per_step_with_loop = cost_flops_per_step + (trips - 1) *
    body``. ``params`` (the model's) are sized in the report.
    """
    def attribute(f, vectors, target, baseline):  # -> [B, T, H]
        return integrated_gradients(f, vectors, target, baseline, steps=ig_steps,
                                    method="gauss_legendre", batch_size=batch_size)

    report = cost_report(attribute, f, vectors, target, baseline, params=params,
                         num_steps=num_calls, repeats=repeats, warmup=1)
    chunk = min(batch_size, ig_steps)
    trips = -(-ig_steps // chunk)
    copies = jnp.tile(vectors, (chunk,) + (1,) * (vectors.ndim - 1))  # [chunk * B, T, H]
    # Compiled, as cost_report counts: XLA's optimized program expands the exact
    # GELU's erf, and counts ~12% more FLOPs than the lowered one on a tiny BERT.
    body = flops(lambda f, x, t: saliency(f, x, t, absolute=False), f, copies,
                 jnp.tile(target, chunk), compiled=True)
    report["cost_loop_body_flops"] = body
    report["cost_loop_trip_count"] = trips
    report["cost_flops_per_step_with_loop"] = report["cost_flops_per_step"] + (trips - 1) * body
    return report


def explain_sentences(
    pretrained: Pretrained,
    sentences: Sequence[str],
    topic_descriptions: Sequence[str],
    *,
    ig_steps: int = 32,
    length: int = 24,
    cost_repeats: int = 0,
) -> dict[str, Any]:
    """Zero-shot scores and token attributions for ``sentences``.

    ``cost_repeats > 0`` also measures the integrated-gradients call
    (:func:`attribution_cost`, that many timed calls) into ``"cost"``.

    Returns:
      ``{"tokens": [[str]] (real tokens per sentence), "similarities": [B, C]
      (cosines from ``nnlib.pretrained.encode``), "scores": [B, C] (centred,
      through the intercepted model), "predicted": [B], "ig": [[float]] (per
      real token, summed over H),
      "leave_one_out": [[float]], "completeness_gap": [B],
      "spearman": [B] (IG vs leave-one-out over the real tokens)}``, and
      ``"cost"`` (the flat ``cost_*`` dict) when ``cost_repeats > 0``.
    """
    topics = jnp.asarray(label_embeddings(pretrained, list(topic_descriptions)))  # [C, H]
    batch = tokenize(pretrained.tokenizer, list(sentences), length=length)
    ids, mask = batch["input_ids"], batch["attention_mask"]  # [B, T]
    if np.any(mask[:, -1] == 1):
        raise ValueError(f"a sentence fills all {length} tokens and may be truncated; "
                         f"raise length")
    fn = similarity_fn(pretrained.model)
    f = Partial(fn, pretrained.params, jnp.asarray(ids), jnp.asarray(mask), topics)
    vectors = word_vectors(pretrained, ids)
    baseline = blank_baseline(pretrained, ids, mask)
    scores = np.asarray(jax.jit(f)(vectors))  # [B, C]
    predicted = scores.argmax(1).astype(np.int32)
    # The same cosines through the library's own encoder (no interception).
    similarities = encode(pretrained, list(sentences)) @ np.asarray(topics).T  # [B, C]
    if not np.allclose(scores, similarities - similarities.mean(1, keepdims=True), atol=1e-4):
        raise RuntimeError("the intercepted model disagrees with nnlib.pretrained.encode")
    ig = integrated_gradients(f, vectors, predicted, baseline, steps=ig_steps,
                              method="gauss_legendre", batch_size=IG_BATCH_SIZE)  # [B, T, H]
    gap = np.asarray(completeness_gap(f, vectors, ig, predicted, baseline))
    per_token = np.asarray(jnp.sum(ig, axis=-1))  # [B, T]
    loo = np.asarray(_leave_one_out(fn, pretrained.params, jnp.asarray(ids), jnp.asarray(mask),
                                     topics, vectors, baseline, jnp.asarray(predicted)))
    tokens, ig_rows, loo_rows, rho = [], [], [], []
    for i in range(len(sentences)):
        n = int(mask[i].sum())
        tokens.append([pretrained.tokenizer.id_to_token(int(t)) for t in ids[i, :n]])
        words = slice(1, n - 1)  # [CLS] and [SEP] are not in the comparison
        ig_rows.append(per_token[i, :n].tolist())
        loo_rows.append(loo[i, :n].tolist())
        rho.append(float(spearman_rank_correlation(per_token[i:i + 1, words],
                                                   loo[i:i + 1, words])[0]))
    result = {"tokens": tokens, "similarities": similarities, "scores": scores,
              "predicted": predicted,
              "ig": ig_rows, "leave_one_out": loo_rows, "completeness_gap": gap,
              "spearman": np.array(rho)}
    if cost_repeats > 0:
        # One attribution call is all the experiment makes (num_calls=1).
        result["cost"] = attribution_cost(f, vectors, jnp.asarray(predicted), baseline,
                                          ig_steps=ig_steps, repeats=cost_repeats,
                                          params=pretrained.params)
    return result


# --- plot ---------------------------------------------------------------------------


def plot_token_attributions(result: dict[str, Any], topic_names: Sequence[str],
                            path: str | Path | None = None, *, key: str = "ig"):
    """One line per sentence, each token's background red (for the predicted
    topic) or blue (against), intensity scaled per sentence."""
    import matplotlib.pyplot as plt

    rows = len(result["tokens"])
    fig, ax = plt.subplots(figsize=(13, 0.62 * rows + 0.4))
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(rows, 0)
    cmap = plt.get_cmap("bwr")
    renderer = fig.canvas.get_renderer()
    for i, (tokens, scores) in enumerate(zip(result["tokens"], result[key], strict=True)):
        peak = max(abs(s) for s in scores[1:-1]) or 1.0
        topic = topic_names[result["predicted"][i]]
        ax.text(0.0, i + 0.5, f"{topic} ({result['similarities'][i].max():.2f}):",
                va="center", fontsize=9, fontweight="bold")
        x = 0.16
        for token, score in zip(tokens, scores, strict=True):
            colour = cmap(0.5 + 0.5 * float(np.clip(score / peak, -1, 1)))
            text = ax.text(x, i + 0.5, token, va="center", fontsize=9, family="monospace",
                           bbox=dict(boxstyle="square,pad=0.15", fc=colour, ec="none"))
            width = text.get_window_extent(renderer).width / ax.get_window_extent(renderer).width
            x += width + 0.006
    ax.set_title("Integrated gradients of the predicted topic's centred cosine similarity "
                 "(red: for, blue: against)" if key == "ig" else key, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


# --- the experiment ------------------------------------------------------------------


def _top_words(tokens: list[str], scores: list[float], k: int = 3) -> str:
    words = [(s, t) for t, s in zip(tokens[1:-1], scores[1:-1], strict=True)]
    return ", ".join(f"{t} ({s:+.3f})" for s, t in sorted(words, reverse=True)[:k])


def run(config: TextConfig, workdir: str | Path | None = None,
        pretrained: Pretrained | None = None, *, cost_repeats: int = 5
        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Explains ``config.num_sentences`` sentences; writes the outputs when
    ``workdir`` is given. Returns ``(metrics, result of explain_sentences)``.

    ``cost_repeats``: timed calls of the compute-cost report of the
    integrated-gradients call (:func:`attribution_cost`; printed, and merged
    into the metrics as ``cost_*``); 0 skips it."""
    start = time.perf_counter()
    pretrained = pretrained or load_minilm()
    sentences = SENTENCES[:config.num_sentences]
    names = list(TOPICS)
    result = explain_sentences(pretrained, [s for s, _ in sentences], list(TOPICS.values()),
                               ig_steps=config.ig_steps, length=config.length,
                               cost_repeats=cost_repeats)
    hit = np.array([names[p] in topics for p, (_, topics) in
                    zip(result["predicted"], sentences, strict=True)])
    metrics = {
        "num_sentences": float(len(sentences)),
        "zero_shot_accuracy": float(np.mean(hit)),  # an acceptable topic predicted
        "ig_completeness_gap_mean": float(np.mean(result["completeness_gap"])),
        "ig_completeness_gap_max": float(np.max(result["completeness_gap"])),
        "ig_vs_leave_one_out_spearman_mean": float(np.mean(result["spearman"])),
        "time_s": time.perf_counter() - start,
    }
    if "cost" in result:
        print(f"integrated gradients ({config.ig_steps} nodes, {len(sentences)} sentences), "
              f"one call:\n{format_cost(result['cost'])}\n  FLOPs with the path loop counted "
              f"in full: {result['cost']['cost_flops_per_step_with_loop']:.3g}", flush=True)
        metrics |= result["cost"]
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        lines = [f"Zero-shot topics with all-MiniLM-L6-v2 (cosine to a description per topic); "
                 f"integrated gradients over word embeddings ({config.ig_steps} Gauss-Legendre "
                 f"nodes, blank baseline). Completeness gap mean "
                 f"{metrics['ig_completeness_gap_mean']:.1e}, max "
                 f"{metrics['ig_completeness_gap_max']:.1e}.", "",
                 "| sentence | acceptable | predicted (cos) | top words by IG | "
                 "ρ(IG, leave-one-out) |", "|---|---|---|---|---|"]
        for i, (sentence, topics) in enumerate(sentences):
            lines.append(
                f"| {sentence} | {' / '.join(topics)} | {names[result['predicted'][i]]} "
                f"({result['similarities'][i].max():.2f}) | "
                f"{_top_words(result['tokens'][i], result['ig'][i])} | "
                f"{result['spearman'][i]:.2f} |")
        lines += ["", f"Zero-shot accuracy {metrics['zero_shot_accuracy']:.2f} on "
                  f"{len(sentences)} sentences (an acceptable topic predicted; three mix two "
                  f"topics on purpose); mean "
                  f"Spearman ρ between IG and leave-one-out "
                  f"{metrics['ig_vs_leave_one_out_spearman_mean']:.2f}."]
        if "cost_step_time_s" in metrics:
            lines += ["", f"Cost of the integrated-gradients call: "
                      f"{metrics['cost_flops_per_step_with_loop'] / 1e9:.3g} GFLOP (XLA, the "
                      f"{metrics['cost_loop_trip_count']} path chunks counted), "
                      f"{metrics['cost_step_time_s']:.3g} s median of "
                      f"{metrics['cost_timing_repeats']} on {metrics['cost_device']}, "
                      f"{metrics['cost_energy_kwh']:.2g} kWh (estimate)."]
        table = "\n".join(lines)
        plot_token_attributions(result, names, workdir / "text_attributions.png")
        (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (workdir / "results.md").write_text(table + "\n")
        print(table, flush=True)
    return metrics, result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return sized_main(
        argv, description=__doc__.splitlines()[0],
        get_config=lambda size: TextConfig() if size == "full" else TextConfig.tiny(),
        run=run, outputs="text_attributions.png", seed=False)


if __name__ == "__main__":
    main()
