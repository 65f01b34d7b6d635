"""experiments/generative_digits.py: its helpers (fast), and a whole run at tiny size (slow:
it compiles about twenty programs — four models' steps, cost reports, samplers).

* ``train_steps``: the step count rounds up to whole chunks, and the EMA of the
  parameters matches the recurrence ``e <- d e + (1 - d) p`` computed in numpy.
* ``plot_grid`` and ``interpolation_pairs`` against hand-made inputs.
* The tiny run: every file and key, metrics.json equal to the returned metrics,
  values in their ranges, generated pixels in [0, 1], the VAE's ELBO equal to
  reconstruction minus KL and below its IWAE bound (Burda et al. 2016), and the
  text table's NLL recomputed in numpy from the decoded samples.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.generative_digits import (  # noqa: E402
    get_config,
    interpolation_pairs,
    load_text,
    plot_grid,
    run,
    train_steps,
)
from nnlib.train import TrainState  # noqa: E402


def test_train_steps_chunks_and_ema():
    # A "step" that adds 1 to a scalar parameter and reports the batch mean as loss.
    state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(())},
                       opt_state=(), key=jax.random.key_data(jax.random.key(0)),
                       collections={}, apply_fn=None, tx=None)

    def step(state, batch):
        return (state.replace(step=state.step + 1, params={"w": state.params["w"] + 1.0}),
                {"loss": jnp.mean(batch)})

    data = jnp.arange(10.0)

    def draw(key):
        return data[jax.random.randint(key, (4,), 0, 10)]

    state, ema, losses = train_steps(step, state, draw, 7, chunk_steps=3,
                                     key=jax.random.key(1), name="toy", ema_decay=0.9)
    assert int(state.step) == 9 and len(losses) == 3  # 7 steps round up to 3 chunks of 3
    e = 0.0
    for k in range(1, 10):  # the parameter after step k is k; the decay warms up
        d = min(0.9, (1 + k) / (10 + k))
        e = d * e + (1 - d) * k
    assert float(ema["w"]) == pytest.approx(e, rel=1e-5)
    assert all(0.0 <= loss <= 9.0 for loss in losses)
    _, no_ema, _ = train_steps(step, state, draw, 2, chunk_steps=5, key=jax.random.key(1),
                               name="toy")
    assert no_ema is None


def test_helpers(tmp_path):
    labels = np.array([3, 0, 6, 0, 1, 7, 4, 9, 8])
    assert interpolation_pairs(labels) == [(1, 2), (4, 5), (0, 8), (6, 7)]
    assert interpolation_pairs(labels, ((2, 5), (0, 3))) == [(1, 0)]
    images = np.random.default_rng(0).uniform(size=(7, 8, 8, 1))
    plot_grid(images, tmp_path / "grid.png", nrow=2, title="seven", labels=list("abcdefg"))
    assert (tmp_path / "grid.png").stat().st_size > 1000
    (tmp_path / "corpus.txt").write_text("to be or not to be\n" * 3)
    config = get_config("tiny")
    config.text.data_path = str(tmp_path / "corpus.txt")
    text, name = load_text(config)
    assert name == "tiny_shakespeare" and text.startswith("to be or not")
    with pytest.raises(ValueError, match="size must be 'full' or 'tiny'"):
        get_config("huge")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("generative")
    config = get_config("tiny")
    metrics, artifacts = run(config, workdir)
    return workdir, config, metrics, artifacts


@pytest.mark.slow
def test_tiny_run_writes_every_output(tiny_run):
    workdir, config, metrics, _ = tiny_run
    for name in ("metrics.json", "results.md", "samples.txt", "vae_samples.png",
                 "vae_interpolation.png", "ddpm_samples.png", "ddpm_denoising.png",
                 "quality.png", "text_sampling.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert json.loads((workdir / "metrics.json").read_text()) == pytest.approx(metrics)
    results = (workdir / "results.md").read_text()
    assert "| real test digits |" in results and "| T=0.5 |" in results
    for model in ("vae", "ddpm", "gpt"):
        assert metrics[f"{model}_cost_flops_per_step"] > 0
        assert metrics[f"{model}_cost_num_params"] == metrics[f"{model}_num_params"]
    assert metrics["vae_cost_num_steps"] == config.vae.num_steps


@pytest.mark.slow
def test_tiny_run_numbers_are_sane(tiny_run):
    _, config, metrics, artifacts = tiny_run
    n = config.num_quality_samples
    assert metrics["num_quality_samples"] == n
    for source in ("real_test", "vae", "ddpm", "ddim", "noise"):
        assert 0.1 <= metrics[f"{source}_confidence"] <= 1.0  # max of 10 probabilities
        assert 0.0 <= metrics[f"{source}_class_diversity"] <= 1.0
        assert 1 <= metrics[f"{source}_classes_covered"] <= 10
        assert metrics[f"{source}_frechet_distance"] >= -1e-6
        assert artifacts["images"][source].shape == (n, 8, 8, 1)
    for source in ("vae", "ddpm", "ddim"):  # generated images are pixels in [0, 1]
        x = np.asarray(artifacts["images"][source])
        assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6
    for split in ("train", "test"):
        assert metrics[f"vae_{split}_kl"] >= 0.0
        assert metrics[f"vae_{split}_elbo"] == pytest.approx(
            metrics[f"vae_{split}_log_likelihood"] - metrics[f"vae_{split}_kl"], rel=1e-5)
        assert metrics[f"vae_{split}_elbo"] < metrics[f"vae_{split}_iwae"] < 0.0
        assert metrics[f"vae_{split}_elbo_bits_per_pixel"] == pytest.approx(
            -metrics[f"vae_{split}_elbo"] / 64 / math.log(2))
    paths = np.asarray(artifacts["paths"])
    assert paths.shape == (4, config.vae.interpolation_points, 8, 8, 1)
    assert len(artifacts["path_labels"]) == 4
    # The text settings: the NLL recomputed from the decoded samples with the model.
    lm, settings = artifacts["lm"], artifacts["text"]
    assert set(settings) == {"real", "T=0.5", "T=1"}
    tokenizer, model = lm["tokenizer"], lm["model"]
    s = settings["T=1"]
    tokens = np.stack([tokenizer.encode(p + t) for p, t in zip(s["prompts"], s["texts"],
                                                                  strict=True)])
    assert tokens.shape == (config.text.num_samples, config.text.context_length)
    logits = np.asarray(model.apply({"params": lm["params"]}, jnp.asarray(tokens[:, :-1])),
                        np.float64)
    z = logits - logits.max(-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, tokens[:, 1:, None], -1)[..., 0]
    p = config.text.prompt_len
    assert metrics["text_T=1_nll"] == pytest.approx(-picked[:, p - 1:].mean(), rel=1e-4)
    for name in settings:
        for k in (1, 2, 3):
            assert 0.0 < metrics[f"text_{name}_distinct_{k}"] <= 1.0
