"""One harness for every layer (haiku's integration test, STYLE.md #11).

Each descriptor says how to build a layer, what input it takes and how to call
it. For each one: ``init``/``apply`` are pure (same key, same result), and
``jit`` and ``vmap`` give the eager result. Layer-specific numerics live in the
per-family test files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import pytest

import nnlib.layers as L


class _LSTMStep(L.LSTMCell):
    """LSTMCell whose (c, h) carry arrives as two arrays, so it fits the harness."""

    hidden_size: int = 4

    def __call__(self, c, h, x):  # noqa: D102
        return super().__call__((c, h), x)


@dataclass(frozen=True)
class Case:
    name: str
    build: Any  # () -> module
    shapes: tuple[tuple[int, ...], ...]  # positional array inputs
    kwargs: dict[str, Any] = field(default_factory=dict)
    mutable: tuple[str, ...] = ()


CASES = [
    Case("Activation", lambda: L.Activation("gelu"), ((3, 4),)),
    Case("Dense", lambda: L.Dense(5), ((3, 4),)),
    Case("MLP", lambda: L.MLP((6, 6), out_features=2, normalization="layer"), ((3, 4),)),
    Case("MLP-batchnorm-train", lambda: L.MLP((6,), out_features=2, normalization="batch"),
         ((3, 4),), {"train": True}, ("batch_stats",)),
    Case("LayerNorm", lambda: L.LayerNorm(), ((3, 4),)),
    Case("BatchNorm-eval", lambda: L.BatchNorm(), ((3, 4),)),
    Case("BatchNorm-train", lambda: L.BatchNorm(), ((3, 4),), {"train": True}, ("batch_stats",)),
    Case("Dropout-eval", lambda: L.Dropout(0.5), ((3, 4),)),
    Case("Conv1D", lambda: L.Conv1D(4, 3), ((2, 7, 3),)),
    Case("Conv2D", lambda: L.Conv2D(4, 3, strides=2), ((2, 6, 6, 3),)),
    Case("ConvBlock2D", lambda: L.ConvBlock2D(4, normalization="batch", pooling="max"),
         ((2, 6, 6, 3),), {"train": True}, ("batch_stats",)),
    Case("ConvBlock1D", lambda: L.ConvBlock1D(4, activation="gelu", pooling="avg"),
         ((2, 8, 3),)),
    Case("MaxPool1D", lambda: L.MaxPool1D(3, strides=2), ((2, 7, 3),)),
    Case("MaxPool2D", lambda: L.MaxPool2D(2), ((2, 6, 6, 3),)),
    Case("AvgPool2D", lambda: L.AvgPool2D(2), ((2, 6, 6, 3),)),
    Case("AvgPool1D", lambda: L.AvgPool1D(3, strides=1, padding="SAME"), ((2, 7, 3),)),
    Case("GlobalAvgPool", lambda: L.GlobalAvgPool(), ((2, 5, 5, 3),)),
    Case("GlobalMaxPool", lambda: L.GlobalMaxPool(), ((2, 5, 5, 3),)),
    Case("Flatten", lambda: L.Flatten(), ((2, 5, 5, 3),)),
    Case("MultiHeadAttention", lambda: L.MultiHeadAttention(2), ((2, 5, 8),), {"causal": True}),
    Case("MultiHeadAttention-cross", lambda: L.MultiHeadAttention(2, out_features=6),
         ((2, 5, 8), (2, 7, 4)), {"return_weights": True}),
    Case("SinusoidalPositionalEncoding", lambda: L.SinusoidalPositionalEncoding(16), ((2, 5, 8),)),
    Case("LearnedPositionalEmbedding", lambda: L.LearnedPositionalEmbedding(16), ((2, 5, 8),)),
    Case("TransformerEncoderBlock", lambda: L.TransformerEncoderBlock(2, 16), ((2, 5, 8),)),
    Case("TransformerDecoderBlock", lambda: L.TransformerDecoderBlock(2, 16),
         ((2, 5, 8), (2, 7, 8))),
    Case("TransformerEncoder", lambda: L.TransformerEncoder(2, 2, 16), ((2, 5, 8),)),
    Case("TransformerDecoder", lambda: L.TransformerDecoder(2, 2, 16), ((2, 5, 8), (2, 7, 8)),
         {"return_weights": True}),
    Case("SimpleRNNCell", lambda: L.SimpleRNNCell(4), ((2, 4), (2, 3))),
    Case("LSTMCell", lambda: _LSTMStep(), ((2, 4), (2, 4), (2, 3))),
    Case("GRUCell", lambda: L.GRUCell(4), ((2, 4), (2, 3))),
    Case("RNN", lambda: L.RNN(L.LSTMCell(5)), ((2, 6, 3),)),
    Case("RNN-reverse", lambda: L.RNN(L.GRUCell(5), reverse=True), ((2, 6, 3),)),
    Case("Bidirectional", lambda: L.Bidirectional(L.LSTMCell(4), L.GRUCell(4)), ((2, 6, 3),)),
]


def _inputs(case: Case, lead: tuple[int, ...] = ()) -> list[jax.Array]:
    keys = jax.random.split(jax.random.key(1), len(case.shapes))
    return [jax.random.normal(k, lead + s) for k, s in zip(keys, case.shapes, strict=True)]


def _runner(case: Case, variables):
    module = case.build()

    def run(*xs):
        out = module.apply(variables, *xs, **case.kwargs, mutable=list(case.mutable))
        return out if case.mutable else (out, {})

    return run


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_eager_jit_vmap_agree(case: Case):
    xs = _inputs(case)
    module = case.build()
    variables = module.init(jax.random.key(0), *xs, **case.kwargs)
    again = module.init(jax.random.key(0), *xs, **case.kwargs)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)  # init is a pure function of the key

    run = _runner(case, variables)
    eager = run(*xs)
    jitted = jax.jit(run)(*xs)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # vmap over a new leading axis equals running each slice on its own.
    stacked = _inputs(case, lead=(3,))
    mapped = jax.vmap(run)(*stacked)
    for i in range(3):
        single = run(*[x[i] for x in stacked])
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(mapped), strict=True):
            np.testing.assert_allclose(a, b[i], rtol=1e-5, atol=1e-6)


def test_every_public_layer_is_in_the_harness():
    layer_classes = {n for n in L.__all__
                     if isinstance(getattr(L, n), type) and hasattr(getattr(L, n), "apply")}
    covered = {c.name.split("-")[0] for c in CASES} | {"RecurrentCell"}  # abstract base
    missing = layer_classes - covered
    assert not missing, f"layers without a harness case: {sorted(missing)}"
    assert len(layer_classes) >= 15
