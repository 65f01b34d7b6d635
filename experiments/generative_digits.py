"""Generative models: a VAE and a DDPM on the 8x8 digits, judged by a classifier; and
text sampled from a character GPT at several temperatures.

    python experiments/generative_digits.py --workdir=runs/generative
        [--config=experiments/generative_digits.py:tiny] [--config.ddpm.num_steps=4000]

Four parts, each composed from ``nnlib``:

1. **A judge.** nnlib's ``CNN`` trained on the digits' training split. Its
   softmax and its penultimate features score generated images
   (``nnlib.generative.sample_quality``): mean max-softmax *confidence*,
   *class diversity* (entropy of the predicted-class histogram / log 10) and
   *classes covered*, and the *Fréchet distance* of the features to those of
   the training images (an FID with the judge in place of Inception). The same
   numbers for real test digits and for uniform noise, with the same number of
   images, are the scale's two ends.
2. **VAE** (Kingma & Welling 2014; ``nnlib.generative.VAE``): MLP encoder and
   decoder, 16-d Gaussian latent, Binomial(16) pixel likelihood (the digits
   have 17 grey levels), so the ELBO is a bound in nats on the probability of
   the actual discrete test image. Reported: test ELBO, its KL and
   reconstruction terms, the IWAE bound (Burda et al. 2016), samples
   ``E[x | z], z ~ N(0, I)`` and straight-line latent interpolations between
   test digits of different classes.
3. **DDPM** (Ho et al. 2020; ``nnlib.generative.MLPDenoiser``): a residual
   MLP noise predictor on [-1, 1] pixels, cosine schedule (Nichol & Dhariwal
   2021), an exponential moving average of the weights for sampling, ancestral
   sampling through all T steps and DDIM (Song et al. 2021) in fewer.
4. **Text.** A small character GPT (``nnlib.models.GPT``) on Tiny Shakespeare
   (the Python standard library's sources when no copy is found), sampled
   with ``nnlib.models.generate`` at several temperatures and with top-k. Each
   setting is measured by the model's own per-character NLL of its samples
   (``sequence_nll``, at temperature 1) and by distinct-n (Li et al. 2016),
   beside the same numbers for real held-out text: low temperature gives
   text the model finds likely and repetitive, high temperature the reverse.

Every model trains with random minibatches inside one ``lax.scan`` per chunk
of steps. The compute cost of one training step of each (``nnlib.compress.
cost_report``) is printed and merged into ``metrics.json`` as
``vae_cost_*``, ``ddpm_cost_*`` and ``gpt_cost_*``.

Writes ``metrics.json`` (flat keys), ``results.md``, ``samples.txt`` and PNGs
(``vae_samples.png``, ``vae_interpolation.png``, ``ddpm_samples.png``,
``ddpm_denoising.png``, ``quality.png``, ``text_sampling.png``) into the workdir.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nnlib.compress import cost_report, format_cost  # noqa: E402
from nnlib.data import (  # noqa: E402
    CharTokenizer,
    load_digits,
    next_token_windows,
    python_stdlib_corpus,
    random_windows,
    split_text,
    tiny_shakespeare,
)
from nnlib.generative import (  # noqa: E402
    VAE,
    MLPDenoiser,
    ddim_sample,
    ddpm_sample,
    distinct_ngram_ratio,
    elbo,
    interpolate,
    iwae_bound,
    make_ddpm_train_step,
    noise_schedule,
    penultimate_features,
    quality_scores,
    sample,
    sequence_nll,
    vae_loss,
)
from nnlib.models import CNN, GPT, GPTConfig, generate  # noqa: E402
from nnlib.train import (  # noqa: E402
    TrainState,
    make_optimizer,
    make_schedule,
    make_train_step,
    num_params,
)

ROOT = Path(__file__).resolve().parent.parent
QUALITY_SOURCES = ("real_test", "vae", "ddpm", "ddim", "noise")


def get_config(size: str = "full") -> ml_collections.ConfigDict:
    """The experiment's settings; ``size="tiny"`` shrinks everything for a smoke run
    (seconds; numbers meaningless)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 128
    c.chunk_steps = 250  # training steps per compiled lax.scan (and per progress line)
    c.cost_repeats = 10  # timed calls of each cost report; 0 skips the reports
    c.num_quality_samples = 0  # 0: as many as the test split (359)
    c.classifier = ml_collections.ConfigDict(
        {"features": (16, 32), "hidden_sizes": (64,), "num_steps": 750,
         "learning_rate": 2e-3})
    c.vae = ml_collections.ConfigDict(
        {"latent_dim": 16, "hidden_sizes": (256, 128), "num_steps": 3000,
         "learning_rate": 1e-3, "elbo_samples": 16, "iwae_samples": 1000,
         "interpolation_points": 10})
    c.ddpm = ml_collections.ConfigDict(
        {"schedule": "cosine", "timesteps": 200, "hidden_size": 256, "num_blocks": 3,
         "time_embedding_dim": 64, "num_steps": 8000, "learning_rate": 1e-3,
         "ema_decay": 0.999, "ddim_steps": 50})
    c.text = ml_collections.ConfigDict(
        {"data_path": "", "max_chars": 0, "context_length": 64, "num_layers": 2,
         "num_heads": 4, "embed_dim": 128, "num_steps": 1000, "batch_size": 16,
         "learning_rate": 2e-3, "val_windows": 256, "num_samples": 32, "prompt_len": 16,
         "temperatures": (0.5, 0.8, 1.0, 1.5), "top_k": 5})
    if size == "tiny":
        c.batch_size = 32
        c.chunk_steps = 10
        c.cost_repeats = 1
        c.num_quality_samples = 64
        c.classifier.update(features=(4,), hidden_sizes=(16,), num_steps=30)
        c.vae.update(hidden_sizes=(32,), latent_dim=2, num_steps=20, elbo_samples=2,
                     iwae_samples=8, interpolation_points=5)
        c.ddpm.update(timesteps=10, hidden_size=32, num_blocks=1, time_embedding_dim=8,
                      num_steps=20, ddim_steps=4)
        c.text.update(max_chars=20_000, context_length=16, num_layers=1, num_heads=2,
                      embed_dim=16, num_steps=20, batch_size=8, val_windows=16,
                      num_samples=4, prompt_len=4, temperatures=(0.5, 1.0), top_k=0)
    elif size != "full":
        raise ValueError(f"get_config: size must be 'full' or 'tiny', got {size!r}")
    return c


# --- training: chunks of steps in one lax.scan --------------------------------------------


def train_steps(
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]],
    state: TrainState,
    draw_batch: Callable[[jax.Array], Any],
    num_steps: int,
    *,
    chunk_steps: int,
    key: jax.Array,
    name: str,
    ema_decay: float = 0.0,
) -> tuple[TrainState, Any, list[float]]:
    """Runs ``ceil(num_steps / chunk_steps) * chunk_steps`` steps of ``step_fn``,
    ``chunk_steps`` per compiled ``lax.scan``, on batches ``draw_batch(fold_in(key,
    step))``; prints one line per chunk.

    With ``ema_decay > 0`` also keeps an exponential moving average of the
    parameters (the copy diffusion models sample from): after step ``s``,
    ``ema <- d ema + (1 - d) params`` with ``d = min(ema_decay, (1 + s) / (10 + s))``.

    Returns:
      ``(state, ema_params or None, losses)``, ``losses`` the mean loss per chunk.
    """
    chunk = max(1, min(chunk_steps, num_steps))

    @jax.jit
    def run_chunk(state, ema):
        def body(carry, _):
            state, ema = carry
            state, metrics = step_fn(state, draw_batch(jax.random.fold_in(key, state.step)))
            # The decay warms up (as in Ho et al.'s code base): early averages do not
            # drag the random initialisation along for thousands of steps.
            step = state.step.astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
            ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, state.params)
            return (state, ema), metrics["loss"]

        (state, ema), losses = jax.lax.scan(body, (state, ema), None, length=chunk)
        return state, ema, jnp.mean(losses)

    ema = state.params
    losses = []
    start = time.perf_counter()
    for _ in range(math.ceil(num_steps / chunk)):
        state, ema, loss = run_chunk(state, ema)
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{name}: loss {losses[-1]} at step {int(state.step)}")
        print(f"[{name}] step {int(state.step):5d}/{num_steps}  loss {losses[-1]:.4f}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return state, (ema if ema_decay > 0 else None), losses


def _draw_rows(arrays: dict[str, jax.Array], batch_size: int) -> Callable[[jax.Array], Any]:
    """``key -> batch``: ``batch_size`` rows drawn uniformly with replacement."""
    n = len(next(iter(arrays.values())))

    def draw(key):
        idx = jax.random.randint(key, (batch_size,), 0, n)
        return {k: v[idx] for k, v in arrays.items()}

    return draw


def _adam(learning_rate: float, total_steps: int) -> optax.GradientTransformation:
    """Adam with a short warm-up and cosine decay to a tenth."""
    schedule = make_schedule(learning_rate, "warmup_cosine", total_steps=total_steps,
                             warmup_steps=min(100, total_steps // 10),
                             end_value=learning_rate / 10)
    return make_optimizer("adam", schedule, clip_norm=1.0)


def _cost(name: str, step_fn, state, batch, num_steps: int, repeats: int) -> dict[str, Any]:
    """``cost_report`` of one step as ``{name}_cost_*`` keys; ``repeats=0`` skips it."""
    if repeats <= 0:
        return {}
    report = cost_report(step_fn, state, batch, num_steps=num_steps, repeats=repeats,
                         warmup=1)
    print(f"{name}, one training step of batch {len(jax.tree.leaves(batch)[0])}:\n"
          f"{format_cost(report)}", flush=True)
    return {f"{name}_{k}": v for k, v in report.items()}


# --- the parts --------------------------------------------------------------------------------


def train_classifier(config, train, test) -> tuple[CNN, Any, float]:
    """The judge: nnlib's CNN on the digits. Returns ``(model, params, test accuracy)``."""
    c = config.classifier
    model = CNN(features=tuple(c.features), hidden_sizes=tuple(c.hidden_sizes))
    state = jax.jit(lambda key: TrainState.create(
        model=model, tx=_adam(c.learning_rate, c.num_steps), key=key,
        example_input=train["inputs"][:1]))(jax.random.key(config.seed))
    state, _, _ = train_steps(make_train_step(), state, _draw_rows(train, config.batch_size),
                              c.num_steps, chunk_steps=config.chunk_steps, name="judge",
                              key=jax.random.key(config.seed + 1))
    logits = jax.jit(model.apply)({"params": state.params}, test["inputs"])
    return model, state.params, float(jnp.mean(jnp.argmax(logits, -1) == test["labels"]))


def train_vae(config, train) -> tuple[VAE, TrainState, list[float], dict[str, Any]]:
    """Trains the VAE on ``train["inputs"]`` in [0, 1]; returns the model, the state,
    the per-chunk losses (negative ELBO) and the cost report."""
    c = config.vae
    model = VAE(latent_dim=c.latent_dim, hidden_sizes=tuple(c.hidden_sizes),
                data_shape=tuple(train["inputs"].shape[1:]), likelihood="binomial",
                num_trials=16)
    state = jax.jit(lambda key: TrainState.create(
        model=model, tx=_adam(c.learning_rate, c.num_steps), key=key,
        example_input=train["inputs"][:1]))(jax.random.key(config.seed + 2))
    step = make_train_step(vae_loss(), rng_streams=("latent",))
    draw = _draw_rows({"inputs": train["inputs"]}, config.batch_size)
    cost = _cost("vae", step, state, draw(jax.random.key(0)), c.num_steps,
                 config.cost_repeats)
    state, _, losses = train_steps(step, state, draw, c.num_steps,
                                   chunk_steps=config.chunk_steps, name="vae",
                                   key=jax.random.key(config.seed + 3))
    return model, state, losses, cost


def evaluate_vae(config, model, params, splits: dict[str, jax.Array]) -> dict[str, float]:
    """Per split: mean ELBO (``elbo_samples`` draws of z), its two terms and the IWAE
    bound, in nats per image, and the ELBO in bits per pixel. All splits go through
    one compiled program (concatenated)."""
    c = config.vae
    x = jnp.concatenate(list(splits.values()))
    key = jax.random.key(config.seed + 4)

    @jax.jit
    def per_example(params, x):
        terms = elbo(model, params, x, key, num_samples=c.elbo_samples)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(x))
        # one example at a time: K decoder passes of the whole batch would not fit a cache
        iwae = jax.lax.map(lambda a: iwae_bound(model, params, a[0][None], a[1],
                                                num_samples=c.iwae_samples)[0], (x, keys))
        return {"elbo": terms.elbo, "kl": terms.kl, "log_likelihood": terms.log_likelihood,
                "iwae": iwae}

    values = {k: np.asarray(v) for k, v in per_example(params, x).items()}
    pixels = math.prod(x.shape[1:])
    out, start = {}, 0
    for split, xs in splits.items():
        part = {k: float(v[start:start + len(xs)].mean()) for k, v in values.items()}
        part["elbo_bits_per_pixel"] = -part["elbo"] / pixels / math.log(2)
        out |= {f"{split}_{k}": v for k, v in part.items()}
        start += len(xs)
    return out


def train_ddpm(config, x) -> tuple[MLPDenoiser, Any, Any, TrainState, list[float],
                                   dict[str, Any]]:
    """Trains the noise predictor on ``x`` in [-1, 1]; returns the model, the EMA
    parameters, the schedule, the state, the per-chunk losses and the cost report."""
    c = config.ddpm
    schedule = noise_schedule(c.schedule, c.timesteps)
    model = MLPDenoiser(num_timesteps=c.timesteps, hidden_size=c.hidden_size,
                        num_blocks=c.num_blocks, time_embedding_dim=c.time_embedding_dim)
    state = jax.jit(lambda key: TrainState.create(
        model=model, tx=_adam(c.learning_rate, c.num_steps), key=key, example_input=x[:1],
        t=jnp.zeros((1,), jnp.int32)))(jax.random.key(config.seed + 5))
    step = make_ddpm_train_step(schedule)
    draw = _draw_rows({"inputs": x}, config.batch_size)
    cost = _cost("ddpm", step, state, draw(jax.random.key(0)), c.num_steps,
                 config.cost_repeats)
    state, ema, losses = train_steps(step, state, draw, c.num_steps,
                                     chunk_steps=config.chunk_steps, name="ddpm",
                                     key=jax.random.key(config.seed + 6),
                                     ema_decay=c.ema_decay)
    return model, (state.params if ema is None else ema), schedule, state, losses, cost


def load_text(config) -> tuple[str, str]:
    """``(text, corpus name)``: Tiny Shakespeare from ``text.data_path``,
    ``$NNLIB_TINYSHAKESPEARE``, ``$NNLIB_DATA_DIR``/the download cache, or the
    repository's sibling ``shared/data``; else the Python standard library's sources."""
    c = config.text
    candidates = [c.data_path, os.environ.get("NNLIB_TINYSHAKESPEARE")]
    text, name = None, "tiny_shakespeare"
    for path in filter(None, candidates):
        text = tiny_shakespeare(path)
        break
    if text is None:
        try:
            text = tiny_shakespeare()
        except FileNotFoundError:
            sibling = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
            if sibling.is_file():
                text = tiny_shakespeare(sibling)
    if text is None:
        text, name = python_stdlib_corpus(max_chars=c.max_chars or 2_000_000), "python_stdlib"
    return (text[:c.max_chars] if c.max_chars else text), name


def train_char_gpt(config, text: str) -> dict[str, Any]:
    """A character GPT on ``text`` (90/10 contiguous split). Returns a dict with the
    model, params, tokenizer, validation windows, validation loss, losses and cost."""
    c = config.text
    tokenizer = CharTokenizer.fit(text)
    train_text, val_text = split_text(text, 0.1)
    train_tokens = jnp.asarray(tokenizer.encode(train_text))
    val_x, val_y = next_token_windows(tokenizer.encode(val_text), c.context_length)
    val_x, val_y = jnp.asarray(val_x[:c.val_windows]), jnp.asarray(val_y[:c.val_windows])
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=c.context_length,
                          num_layers=c.num_layers, num_heads=c.num_heads,
                          embed_dim=c.embed_dim))
    state = jax.jit(lambda key: TrainState.create(
        model=model, tx=_adam(c.learning_rate, c.num_steps), key=key,
        example_input=val_x[:1]))(jax.random.key(config.seed + 7))

    def draw(key):
        inputs, labels = random_windows(train_tokens, c.context_length, c.batch_size, key)
        return {"inputs": inputs, "labels": labels}

    step = make_train_step()
    cost = _cost("gpt", step, state, draw(jax.random.key(0)), c.num_steps, config.cost_repeats)
    state, _, losses = train_steps(step, state, draw, c.num_steps,
                                   chunk_steps=config.chunk_steps, name="gpt",
                                   key=jax.random.key(config.seed + 8))
    logits = jax.jit(model.apply)({"params": state.params}, val_x)
    val_loss = float(jnp.mean(-jnp.take_along_axis(
        jax.nn.log_softmax(logits), val_y[..., None], axis=-1)))
    return {"model": model, "params": state.params, "tokenizer": tokenizer, "val_x": val_x,
            "val_loss": val_loss, "losses": losses, "cost": cost}


def sample_text_settings(config, lm: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Samples ``num_samples`` continuations of held-out prompts for each setting
    (each temperature, then top-k at temperature 1) and measures them; the real
    continuations are measured the same way (setting ``"real"``).

    Returns ``{setting: {"texts", "nll", "distinct_1", "distinct_2", "distinct_3"}}``:
    ``nll`` is the model's mean per-character NLL (nats) of the generated part at
    temperature 1, distinct-n over the generated parts.
    """
    c = config.text
    model, params, tokenizer = lm["model"], lm["params"], lm["tokenizer"]
    n = min(c.num_samples, len(lm["val_x"]))
    real = jnp.asarray(lm["val_x"][:n])  # [n, context]: prompt + real continuation
    prompt = real[:, :c.prompt_len]
    logits_fn = jax.jit(lambda t: model.apply({"params": params}, t))
    settings: dict[str, dict[str, Any]] = {"real": {"tokens": real}}
    key = jax.random.key(config.seed + 9)
    new = c.context_length - c.prompt_len
    for i, temperature in enumerate(c.temperatures):
        settings[f"T={temperature:g}"] = {"tokens": generate(
            model, params, prompt, new, key=jax.random.fold_in(key, i), temperature=temperature)}
    if c.top_k:
        settings[f"T=1 top-{c.top_k}"] = {"tokens": generate(
            model, params, prompt, new, key=jax.random.fold_in(key, 99), temperature=1.0,
            top_k=c.top_k)}
    for s in settings.values():
        tokens = s.pop("tokens")
        generated = [tokenizer.decode(np.asarray(row[c.prompt_len:])) for row in tokens]
        s["prompts"] = [tokenizer.decode(np.asarray(row[:c.prompt_len])) for row in tokens]
        s["texts"] = generated
        s["nll"] = sequence_nll(logits_fn, tokens, prompt_len=c.prompt_len)
        for k in (1, 2, 3):
            s[f"distinct_{k}"] = distinct_ngram_ratio(generated, k)
    return settings


# --- plots --------------------------------------------------------------------------------------


def _plt():
    import matplotlib.pyplot as plt

    return plt


def plot_grid(images: np.ndarray, path: Path | None, *, nrow: int, title: str,
              labels: Sequence[str] | None = None):
    """``images: [n, H, W, 1]`` in [0, 1] as one mosaic with ``nrow`` rows, one-pixel
    gaps, and an optional label above each image."""
    plt = _plt()
    images = np.clip(np.asarray(images, np.float32)[..., 0], 0, 1)  # [n, H, W]
    n, h, w = images.shape
    ncol = math.ceil(n / nrow)
    gap = 4 if labels else 1  # rows above each image (room for its label)
    mosaic = np.full((nrow * (h + gap), ncol * (w + 1) + 1), np.nan, np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        top = r * (h + gap) + gap
        mosaic[top:top + h, 1 + c * (w + 1):(c + 1) * (w + 1)] = image
    fig, ax = plt.subplots(figsize=(0.55 * ncol + 0.3, 0.55 * nrow * (h + gap) / (h + 1) + 0.6))
    cmap = plt.get_cmap("gray_r").with_extremes(bad="white")
    ax.imshow(mosaic, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    for i, label in enumerate(labels or ()):
        r, c = divmod(i, ncol)
        ax.text(c * (w + 1) + (w + 2) / 2, r * (h + gap) + gap - 0.7, label, ha="center",
                va="bottom", fontsize=6, color="tab:red")
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path):
    if path is not None:
        fig.savefig(path, dpi=110)
        _plt().close(fig)
    return fig


def plot_quality(quality: dict[str, dict[str, float]], path: Path | None):
    """Confidence, class diversity and Fréchet distance per image source."""
    plt = _plt()
    names = list(quality)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, (key, label) in zip(axes, (("confidence", "mean max-softmax confidence"),
                                       ("class_diversity", "class diversity (H / log 10)"),
                                       ("frechet_distance", "Fréchet distance (judge's "
                                                            "features)")), strict=True):
        values = [quality[n][key] for n in names]
        ax.bar(names, values, color=["tab:green", "tab:blue", "tab:orange", "tab:orange",
                                     "tab:gray"][:len(names)])
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        if key == "frechet_distance":
            ax.set_yscale("log")
    fig.tight_layout()
    return _save(fig, path)


def plot_text(settings: dict[str, dict[str, Any]], path: Path | None):
    """Per-character NLL against distinct-2 for each sampling setting."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, s in settings.items():
        ax.scatter(s["nll"], s["distinct_2"], color="k" if name == "real" else "tab:blue")
        ax.annotate(name, (s["nll"], s["distinct_2"]), fontsize=8, xytext=(4, 2),
                    textcoords="offset points")
    ax.set(xlabel="model's NLL of the sample (nats / char)", ylabel="distinct-2",
           title="character GPT: temperature trades likelihood for diversity")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    return _save(fig, path)


# --- the run --------------------------------------------------------------------------------


def interpolation_pairs(labels: np.ndarray,
                        pairs: Sequence[tuple[int, int]] = ((0, 6), (1, 7), (3, 8), (4, 9))
                        ) -> list[tuple[int, int]]:
    """Indices of the first test digit of each class in ``pairs`` (skipping missing)."""
    first = {int(c): int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)}
    return [(first[a], first[b]) for a, b in pairs if a in first and b in first]


def run(config: ml_collections.ConfigDict, workdir: str | Path | None = None
        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains the judge, the VAE, the DDPM and the character GPT, measures them, and
    writes the outputs if ``workdir`` is given.

    Returns:
      ``(metrics, artifacts)``: flat metrics (``vae_test_elbo``,
      ``ddpm_confidence``, ``text_T=0.5_nll``, ``ddpm_cost_flops_per_step``, ...)
      and the trained models, samples and text settings (for the notebook).
    """
    start = time.perf_counter()
    data = load_digits(seed=0)
    train = {k: jnp.asarray(v) for k, v in data.train.items()}
    test = {k: jnp.asarray(v) for k, v in data.test.items()}
    n = config.num_quality_samples or len(test["labels"])
    metrics: dict[str, Any] = {"num_quality_samples": n}
    key = jax.random.key(config.seed + 10)

    clock = time.perf_counter()
    judge, judge_params, judge_acc = train_classifier(config, train, test)
    metrics["judge_test_accuracy"] = judge_acc
    judge_features = jax.jit(lambda x: penultimate_features(judge, judge_params, x))
    reference, _ = judge_features(train["inputs"])
    metrics["judge_time_s"], clock = time.perf_counter() - clock, time.perf_counter()

    model_vae, state_vae, vae_losses, vae_cost = train_vae(config, train)
    metrics |= vae_cost
    metrics |= {f"vae_{k}": v for k, v in evaluate_vae(
        config, model_vae, state_vae.params,
        {"test": test["inputs"], "train": train["inputs"][:len(test["labels"])]}).items()}
    metrics["vae_num_params"] = num_params(state_vae.params)
    pairs = interpolation_pairs(np.asarray(test["labels"]))
    ends = jnp.asarray(pairs).T  # [2, P]

    @jax.jit
    def vae_outputs(params, key):
        means, _ = model_vae.apply({"params": params}, test["inputs"][ends.reshape(-1)],
                                   method="encode")
        z0, z1 = means.reshape(2, len(pairs), -1)
        paths = jax.vmap(lambda a, b: interpolate(model_vae, params, a, b,
                                                  config.vae.interpolation_points))(z0, z1)
        return sample(model_vae, params, key, n), paths  # [n, 8, 8, 1], [P, N, 8, 8, 1]

    vae_images, paths = vae_outputs(state_vae.params, jax.random.fold_in(key, 1))
    metrics["vae_time_s"], clock = time.perf_counter() - clock, time.perf_counter()

    x_ddpm = 2.0 * train["inputs"] - 1.0
    model_ddpm, ema, schedule, state_ddpm, ddpm_losses, ddpm_cost = train_ddpm(config, x_ddpm)
    metrics |= ddpm_cost
    metrics["ddpm_num_params"] = num_params(state_ddpm.params)
    shape = (n, *x_ddpm.shape[1:])
    sample_start = time.perf_counter()
    ddpm_images, trajectory = ddpm_sample(model_ddpm, ema, schedule, jax.random.fold_in(key, 2),
                                          shape, return_trajectory=True)
    ddpm_images.block_until_ready()
    metrics["ddpm_sampling_time_s"] = time.perf_counter() - sample_start
    sample_start = time.perf_counter()
    ddim_images = ddim_sample(model_ddpm, ema, schedule, jax.random.fold_in(key, 3), shape,
                              num_sampling_steps=config.ddpm.ddim_steps).block_until_ready()
    metrics["ddim_sampling_time_s"] = time.perf_counter() - sample_start
    ddpm_images, ddim_images = ((x + 1.0) / 2.0 for x in (ddpm_images, ddim_images))
    metrics["ddpm_time_s"], clock = time.perf_counter() - clock, time.perf_counter()

    real = test["inputs"][:n]
    noise = jax.random.uniform(jax.random.fold_in(key, 4), real.shape)
    images = {"real_test": real, "vae": vae_images, "ddpm": ddpm_images, "ddim": ddim_images,
              "noise": noise}
    # One pass of the judge over every source and every interpolation point.
    sizes = [len(x) for x in images.values()]
    features, logits = judge_features(jnp.concatenate([*images.values(),
                                                       paths.reshape(-1, *real.shape[1:])]))
    bounds = np.cumsum([0, *sizes])
    quality = {name: quality_scores(features[a:b], logits[a:b], reference)
               for name, a, b in zip(images, bounds[:-1], bounds[1:], strict=True)}
    for name, q in quality.items():
        metrics |= {f"{name}_{k}": v for k, v in q.items()}
    path_labels = np.asarray(jnp.argmax(logits[bounds[-1]:], -1)).reshape(len(pairs), -1)
    path_labels = [[int(c) for c in row] for row in path_labels]
    metrics["quality_time_s"], clock = time.perf_counter() - clock, time.perf_counter()

    text, corpus = load_text(config)
    lm = train_char_gpt(config, text)
    metrics |= lm["cost"]
    metrics |= {"text_corpus": corpus, "text_corpus_chars": len(text),
                "gpt_num_params": num_params(lm["params"]), "gpt_val_loss": lm["val_loss"],
                "gpt_train_loss_last": lm["losses"][-1]}
    settings = sample_text_settings(config, lm)
    for name, s in settings.items():
        metrics |= {f"text_{name}_{k}": s[k] for k in ("nll", "distinct_1", "distinct_2",
                                                       "distinct_3")}
    metrics["text_time_s"] = time.perf_counter() - clock
    metrics["wall_time_s"] = time.perf_counter() - start

    artifacts = {"data": data, "judge": (judge, judge_params), "reference": reference,
                 "vae": (model_vae, state_vae.params), "ddpm": (model_ddpm, ema, schedule),
                 "images": images, "trajectory": trajectory, "paths": paths,
                 "pairs": pairs, "path_labels": path_labels, "quality": quality,
                 "text": settings, "lm": lm,
                 "losses": {"vae": vae_losses, "ddpm": ddpm_losses, "gpt": lm["losses"]}}
    if workdir is not None:
        write_outputs(config, metrics, artifacts, Path(workdir))
    return metrics, artifacts


def write_outputs(config, metrics: dict[str, Any], artifacts: dict[str, Any],
                  workdir: Path) -> None:
    """metrics.json, results.md, samples.txt and the PNGs."""
    workdir.mkdir(parents=True, exist_ok=True)
    images, test = artifacts["images"], artifacts["data"].test
    grid = min(100, len(images["vae"]))
    rows = max(1, round(math.sqrt(grid)))
    plot_grid(images["vae"][:grid], workdir / "vae_samples.png", nrow=rows,
              title="VAE: E[x | z], z ~ N(0, I)")
    plot_grid(images["ddpm"][:grid], workdir / "ddpm_samples.png", nrow=rows,
              title=f"DDPM: ancestral sampling, T = {config.ddpm.timesteps}")
    ends = [(test["inputs"][a], test["inputs"][b]) for a, b in artifacts["pairs"]]
    strip = np.concatenate([np.concatenate([a[None], np.asarray(p), b[None]])
                            for (a, b), p in zip(ends, artifacts["paths"], strict=True)])
    labels = [str(c) for (a, b), p in zip(artifacts["pairs"], artifacts["path_labels"],
                                          strict=True)
              for c in ["real", *p, "real"]]
    plot_grid(strip, workdir / "vae_interpolation.png", nrow=len(ends), labels=labels,
              title="VAE latent interpolation between test digits (judge's label above)")
    trajectory = np.asarray(artifacts["trajectory"])  # [T + 1, n, 8, 8, 1], x_T first
    t_index = np.linspace(0, len(trajectory) - 1, 8).round().astype(int)
    frames = (trajectory[t_index][:, :6] + 1.0) / 2.0  # [8 times, 6 samples, ...]
    plot_grid(frames.transpose(1, 0, 2, 3, 4).reshape(-1, *frames.shape[2:]),
              workdir / "ddpm_denoising.png", nrow=6,
              title="DDPM reverse process, x_T (left) to x_0 (right)")
    plot_quality(artifacts["quality"], workdir / "quality.png")
    plot_text(artifacts["text"], workdir / "text_sampling.png")
    table = results_table(config, metrics, artifacts)
    samples = "\n\n".join(
        f"=== {name} ===\n" + "\n---\n".join(f"[{p!r}] {t}" for p, t in zip(
            s["prompts"][:4], s["texts"][:4], strict=True))
        for name, s in artifacts["text"].items())
    (workdir / "samples.txt").write_text(samples + "\n", encoding="utf-8")
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (workdir / "results.md").write_text(table + "\n", encoding="utf-8")
    print(table, flush=True)
    print(f"wrote metrics.json, results.md, samples.txt and 6 PNGs to {workdir}", flush=True)


def results_table(config, metrics: dict[str, Any], artifacts: dict[str, Any]) -> str:
    """The markdown report: VAE bounds, the quality table, the text table, costs."""
    m = metrics
    lines = [
        f"## Digits (8x8, 17 grey levels); judge: CNN, test accuracy "
        f"{m['judge_test_accuracy']:.4f}",
        "",
        f"VAE (latent {config.vae.latent_dim}, Binomial(16) pixels, {m['vae_num_params']:,} "
        f"parameters, {config.vae.num_steps} steps), nats per image (higher is better):",
        "",
        "| split | ELBO | reconstruction log p(x|z) | KL | IWAE bound "
        f"(K={config.vae.iwae_samples}) | ELBO bits/pixel |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for split in ("train", "test"):
        v = {k[len(f"vae_{split}_"):]: x for k, x in m.items()
             if k.startswith(f"vae_{split}_")}
        lines.append(f"| {split} | {v['elbo']:.2f} | {v['log_likelihood']:.2f} | {v['kl']:.2f} "
                     f"| {v['iwae']:.2f} | {v['elbo_bits_per_pixel']:.3f} |")
    lines += [
        "",
        f"Sample quality, {m['num_quality_samples']} images per source; Fréchet distance to "
        "the judge's features of the training images (lower is better):",
        "",
        "| source | confidence | class diversity | classes covered | Fréchet distance |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"real_test": "real test digits", "vae": "VAE samples",
             "ddpm": f"DDPM ({config.ddpm.timesteps} steps, EMA)",
             "ddim": f"DDIM ({config.ddpm.ddim_steps} steps)", "noise": "uniform noise"}
    for key, name in names.items():
        lines.append(f"| {name} | {m[f'{key}_confidence']:.3f} "
                     f"| {m[f'{key}_class_diversity']:.3f} | {m[f'{key}_classes_covered']} "
                     f"| {m[f'{key}_frechet_distance']:.2f} |")
    lines += ["", "VAE interpolations, judge's label at each point: " + "; ".join(
        " ".join(map(str, p)) for p in artifacts["path_labels"]), ""]
    c = config.text
    lines += [
        f"## Text: character GPT on {m['text_corpus']} ({m['gpt_num_params']:,} parameters, "
        f"{c.num_steps} steps, validation loss {m['gpt_val_loss']:.3f} nats/char)",
        "",
        f"{c.num_samples} continuations of {c.context_length - c.prompt_len} characters "
        f"after {c.prompt_len}-character held-out prompts; NLL is the model's own, at "
        "temperature 1:",
        "",
        "| setting | NLL (nats/char) | distinct-1 | distinct-2 | distinct-3 | first sample |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, s in artifacts["text"].items():
        first = s["texts"][0].replace("\n", "⏎").replace("|", "\\|")
        lines.append(f"| {name} | {s['nll']:.3f} | {s['distinct_1']:.3f} "
                     f"| {s['distinct_2']:.3f} | {s['distinct_3']:.3f} | `{first}` |")
    lines += ["", "## One training step", "", "| model | FLOPs / step | parameters "
              "| step time (ms) | energy, whole run (kWh) |", "|---|---:|---:|---:|---:|"]
    for model in (k for k in ("vae", "ddpm", "gpt") if f"{k}_cost_flops_per_step" in m):
        lines.append(f"| {model} | {m[f'{model}_cost_flops_per_step']:,.0f} "
                     f"| {m[f'{model}_cost_num_params']:,} "
                     f"| {1e3 * m.get(f'{model}_cost_step_time_s', float('nan')):.2f} "
                     f"| {m.get(f'{model}_cost_energy_kwh', float('nan')):.2g} |")
    lines += ["", f"Wall time {m['wall_time_s']:.0f} s."]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    del argv
    import matplotlib
    from absl import flags

    matplotlib.use("Agg")  # files only; a notebook keeps its inline backend
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", f"{Path(__file__).resolve()}:full",
                                    "settings: this file's get_config(size)")
    flags.DEFINE_string("workdir", "runs/generative_digits", "where results go")
    app.run(main)
