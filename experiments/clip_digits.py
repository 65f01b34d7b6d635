"""CLIP on captioned 8x8 digits: zero-shot classification and image<->text retrieval.

    python experiments/clip_digits.py --workdir=runs/clip_digits [--size=tiny]
        [--config.num_steps=2000 ...]

Data (``nnlib.multimodal.data``): every 8x8 digit gets a generated caption —
its class as a word or numeral, and, depending on the template, two
attributes measured on the image (stroke weight: thin/thick; slant: left,
upright, right; both relative to the digit's class). Training draws a fresh
caption per image every epoch from the ten *training* templates ("a
handwritten seven", "a thick 7, slanting left", ...). Four *held-out*
templates ("a photo of the number 7", "a scan of a thick seven", ...) use
words the training captions never contain.

Model and training: ``nnlib.multimodal.CLIP`` — a small CNN image tower and
a two-layer Transformer text tower over a word-level BPE vocabulary, each
projected to unit vectors in one space — trained with the symmetric InfoNCE
loss and a learnable temperature (clipped at 100, Radford et al. 2021). No
class label is ever used in training: only which caption goes with which
image.

Evaluation, on the 359 held-out test images (never seen in training):

* **zero-shot accuracy**: classify each image by the class whose prompts'
  mean embedding is the most similar (prompt ensembling over every attribute
  filling of a set of templates), with the training templates' prompts and —
  the real zero-shot test — the held-out templates' prompts; and per
  template. A logistic-regression *linear probe* on the frozen image
  embeddings (trained with labels) is the supervised reference.
* **retrieval recall@k** (k = 1, 5, 10), image->text and text->image, among
  one caption per test image (drawn from the training templates, and again
  from the held-out ones). A caption is *relevant* to an image when it is a
  true description of it (``caption_relevance``: same class and every
  attribute it mentions), since "seven" describes every seven; the strict
  protocol, where only the image's own caption counts and identical captions
  tie against the query, is reported too (``*_pair_recall@k``). Chance
  levels are given for both (``chance_recall_at_k``).

Compute cost: ``nnlib.compress.cost_report`` of one real training step
(``cost_*`` keys).

Writes ``metrics.json``, ``results.md``, ``history.jsonl``, ``config.json``,
``zero_shot_curve.png``, ``similarity.png`` and ``templates.png`` into the
workdir and prints the table. ``run(config, workdir)`` and its pieces are
importable (the notebook and the smoke test use them at tiny size).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nnlib.compress import cost_report, format_cost  # noqa: E402
from nnlib.data import epoch_order  # noqa: E402
from nnlib.multimodal import (  # noqa: E402
    CLIP,
    MAX_LOG_SCALE,
    DigitCaptions,
    chance_recall_at_k,
    clamp_log_scale,
    clip_loss_fn,
    load_digit_captions,
    prompt_ensemble,
    retrieval_recall_at_k,
    similarity_matrix,
    zero_shot_classifier,
    zero_shot_predict,
)
from nnlib.multimodal.data import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, class_prompts  # noqa: E402
from nnlib.train import TrainState, fit, make_optimizer, make_schedule, make_train_step  # noqa: E402
from nnlib.train import jit as train_jit  # noqa: E402
from nnlib.train import num_params as count_params  # noqa: E402

CAPTION_SETS = {"seen": TRAIN_TEMPLATES, "unseen": HELD_OUT_TEMPLATES}


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    """The run's settings; ``size="tiny"`` shrinks everything for a smoke test."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.tokenizer = "word"  # or "char"
    c.embed_dim = 64
    c.image_features = (16, 32)
    c.image_hidden = (128,)
    c.text_width = 64
    c.text_layers = 2
    c.text_heads = 4
    c.text_mlp_dim = 128
    c.text_pooling = "mean"
    c.dropout_rate = 0.0
    c.batch_size = 128
    c.num_steps = 1500
    c.learning_rate = 2e-3
    c.warmup_steps = 100
    c.weight_decay = 1e-4
    c.eval_every = 100
    c.ks = (1, 5, 10)
    c.caption_seed = 12345  # the test captions' draw (the same for every run)
    c.cost_repeats = 10
    if size == "tiny":
        c.embed_dim, c.image_features, c.image_hidden = 16, (4,), (16,)
        c.text_width, c.text_layers, c.text_heads, c.text_mlp_dim = 16, 1, 2, 16
        c.batch_size, c.num_steps, c.warmup_steps, c.eval_every = 32, 12, 2, 6
        c.cost_repeats = 2
    elif size != "default":
        raise ValueError(f"get_config: size must be 'default' or 'tiny', got {size!r}")
    return c


def build_model(config: ml_collections.ConfigDict, data: DigitCaptions) -> CLIP:
    """The ``CLIP`` of ``config`` for ``data``'s tokenizer."""
    tok = data.tokenizer
    return CLIP(vocab_size=tok.vocab_size, max_len=data.max_len, embed_dim=config.embed_dim,
                image_features=tuple(config.image_features),
                image_hidden=tuple(config.image_hidden), text_width=config.text_width,
                text_layers=config.text_layers, text_heads=config.text_heads,
                text_mlp_dim=config.text_mlp_dim, text_pooling=config.text_pooling,
                pad_id=tok.token_to_id("[PAD]"), eos_id=tok.token_to_id("[EOS]"),
                dropout_rate=config.dropout_rate)


def make_clip_train_step(max_log_scale: float = MAX_LOG_SCALE) -> Callable:
    """``nnlib.train.make_train_step(clip_loss_fn())`` followed by the clamp of
    the log temperature (Radford et al. clip the parameter after each update)."""
    step = make_train_step(clip_loss_fn())

    def train_step(state: TrainState, batch: dict[str, Any]):
        state, metrics = step(state, batch)
        return state.replace(params=clamp_log_scale(state.params, max_log_scale)), metrics

    return train_step


def train_batches(data: DigitCaptions, config: ml_collections.ConfigDict
                  ) -> Callable[[int], Iterator[dict[str, Any]]]:
    """``epoch -> batches``: each epoch draws a new caption for every training
    image (training templates, seed ``[seed, epoch]``) and shuffles; full
    batches only (the contrastive loss depends on the batch size)."""
    images = data.splits["train"]["images"]
    n, b = len(images), config.batch_size

    def epoch_batches(epoch: int) -> Iterator[dict[str, Any]]:
        _, tokens = data.captions("train", TRAIN_TEMPLATES,
                                  seed=int(np.random.SeedSequence([config.seed, epoch])
                                           .generate_state(1)[0]))
        order = epoch_order(n, seed=config.seed, epoch=epoch)
        for start in range(0, n - b + 1, b):
            idx = order[start:start + b]
            yield {"inputs": {"images": images[idx], "tokens": tokens[idx]},
                   "labels": data.splits["train"]["labels"][idx]}

    return epoch_batches


def prompt_tokens(data: DigitCaptions, templates: Sequence[str]) -> list[np.ndarray]:
    """For each class, the tokens ``[P_c, T]`` of every prompt ``templates`` make."""
    return [data.tokens(p) for p in class_prompts(templates)]


def make_eval_step(model: CLIP, data: DigitCaptions) -> Callable:
    """``(state, batch) -> metrics`` on a batch of captioned images with labels:
    the CLIP loss and in-batch pair accuracy, and zero-shot accuracy with the
    seen (training) and unseen (held-out) templates' prompts."""
    loss_fn = clip_loss_fn()
    prompts = {name: prompt_tokens(data, t) for name, t in CAPTION_SETS.items()}

    @jax.jit
    def eval_step(state: TrainState, batch: dict[str, Any]) -> dict[str, jax.Array]:
        variables = {"params": state.params}
        out = model.apply(variables, batch["inputs"])
        _, metrics = loss_fn(out, batch)
        for name, groups in prompts.items():
            classes = zero_shot_classifier(model, variables, groups)  # [C, E]
            pred = zero_shot_predict(out["image_embeddings"], classes)
            metrics[f"zero_shot_accuracy_{name}"] = jnp.mean(pred == batch["labels"])
        return {**metrics, "count": jnp.asarray(batch["labels"].shape[0], jnp.float32)}

    return eval_step


def train(config: ml_collections.ConfigDict, data: DigitCaptions
          ) -> tuple[CLIP, TrainState, dict[str, Any]]:
    """Trains the CLIP of ``config`` on ``data``'s training images; returns
    ``(model, state, summary)`` (``nnlib.train.fit``'s summary, its
    ``history`` holding validation zero-shot accuracy every ``eval_every``
    steps)."""
    model = build_model(config, data)
    schedule = make_schedule(config.learning_rate, "warmup_cosine", total_steps=config.num_steps,
                             warmup_steps=config.warmup_steps)
    tx = make_optimizer("adamw", schedule, weight_decay=config.weight_decay)
    batches = train_batches(data, config)
    example = next(batches(0))["inputs"]
    example = {k: v[:1] for k, v in example.items()}
    # Jitted: flax's eager init of a Transformer costs more than compiling it.
    state = jax.jit(lambda key: TrainState.create(model=model, tx=tx, key=key,
                                                  example_input=example))(
        jax.random.key(config.seed))
    val = data.splits["val"]
    _, val_tokens = data.captions("val", TRAIN_TEMPLATES, seed=config.caption_seed)
    val_batch = {"inputs": {"images": val["images"], "tokens": val_tokens},
                 "labels": val["labels"]}
    state, summary = fit(state, batches, num_steps=config.num_steps,
                         train_step=train_jit(make_clip_train_step(model.max_log_scale),
                                              donate_argnums=0),
                         eval_step=make_eval_step(model, data), eval_data=[val_batch],
                         eval_every=config.eval_every, log_every=min(50, config.num_steps),
                         best_metric=None, workdir=None, plot=False, tensorboard=False,
                         seed=config.seed)
    return model, state, summary


# --- evaluation -------------------------------------------------------------------


def embed(model: CLIP, params: Any, images: np.ndarray | None = None,
          tokens: np.ndarray | None = None) -> np.ndarray:
    """Unit image embeddings ``[n, E]`` of ``images`` or text embeddings of
    ``tokens`` (one jitted call: batch everything you need into one array)."""
    if images is not None:
        return np.asarray(_encode(model, CLIP.encode_image, params, jnp.asarray(images)))
    return np.asarray(_encode(model, CLIP.encode_text, params, jnp.asarray(tokens)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _encode(model: CLIP, method: Callable, params: Any, x: jax.Array) -> jax.Array:
    return model.apply({"params": params}, x, method=method)


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                          test_y: np.ndarray) -> float:
    """Test accuracy of a logistic regression on frozen embeddings (labels used)."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=10.0, max_iter=2000).fit(train_x, train_y)
    return float(np.mean(probe.predict(test_x) == test_y))


def evaluate(model: CLIP, params: Any, data: DigitCaptions, config: ml_collections.ConfigDict
             ) -> tuple[dict[str, float], dict[str, Any]]:
    """Zero-shot accuracy, linear probe and retrieval recall@k on the test split.

    Returns ``(metrics, artifacts)`` with artifacts ``{"image_embeddings": [n, E],
    "class_embeddings": {name: [C, E]}, "retrieval": {name: (captions,
    similarity [n, n], relevant [n, n])}, "template_accuracy": {template: acc}}``.
    """
    test, train_split = data.splits["test"], data.splits["train"]
    labels, ks = test["labels"], list(config.ks)
    n_test = len(labels)
    both = embed(model, params, images=np.concatenate([test["images"], train_split["images"]]))
    img, train_img = both[:n_test], both[n_test:]  # [n, E], [n_train, E]

    # Every text at once: each template's prompts (all attribute fillings, per
    # class), then the retrieval captions.
    texts, class_ids, template_of = [], [], []
    for templates in CAPTION_SETS.values():
        for template in templates:
            for c, prompts in enumerate(class_prompts([template])):
                texts += prompts
                class_ids += [c] * len(prompts)
                template_of += [template] * len(prompts)
    captions = {name: data.retrieval_set("test", templates, seed=config.caption_seed)
                for name, templates in CAPTION_SETS.items()}
    tokens = np.concatenate([data.tokens(texts)] + [tok for _, tok, _ in captions.values()])
    txt = embed(model, params, tokens=tokens)  # [texts + 2 n, E]
    prompt_emb, caption_emb = txt[:len(texts)], txt[len(texts):]
    class_ids, template_of = np.asarray(class_ids), np.asarray(template_of)

    def accuracy(classes: np.ndarray) -> float:
        return float(np.mean(np.asarray(zero_shot_predict(img, classes)) == labels))

    metrics: dict[str, float] = {"chance_accuracy": 0.1}
    classes, per_template = {}, {}
    for name, templates in CAPTION_SETS.items():
        use = np.isin(template_of, templates)
        classes[name] = np.asarray(prompt_ensemble(prompt_emb[use], class_ids[use], 10))
        metrics[f"test_zero_shot_accuracy_{name}"] = accuracy(classes[name])
        for i, template in enumerate(templates):
            use = template_of == template
            acc = accuracy(np.asarray(prompt_ensemble(prompt_emb[use], class_ids[use], 10)))
            metrics[f"test_zero_shot_accuracy_{name}_template_{i}"] = acc
            per_template[template] = acc
    metrics["test_linear_probe_accuracy"] = linear_probe_accuracy(
        train_img, train_split["labels"], img, labels)

    retrieval = {}
    for i, (name, (texts_, _, relevant)) in enumerate(captions.items()):
        sim = np.asarray(similarity_matrix(img, caption_emb[i * n_test:(i + 1) * n_test]))
        retrieval[name] = (texts_, sim, relevant)
        pair = np.eye(n_test, dtype=bool)
        for direction, s, rel, pr in (("i2t", sim, relevant, pair),
                                      ("t2i", sim.T, relevant.T, pair)):
            for kind, r in (("", rel), ("pair_", pr)):
                recall = np.atleast_1d(retrieval_recall_at_k(jnp.asarray(s), ks, jnp.asarray(r)))
                chance = np.atleast_1d(chance_recall_at_k(r, ks))
                for k, v, c in zip(ks, recall, chance, strict=True):
                    metrics[f"retrieval_{name}_{direction}_{kind}recall@{k}"] = float(v)
                    metrics[f"retrieval_{name}_{direction}_{kind}chance@{k}"] = float(c)
        metrics[f"retrieval_{name}_relevant_per_image"] = float(relevant.sum(1).mean())
    artifacts = {"image_embeddings": img, "class_embeddings": classes,
                 "retrieval": retrieval, "template_accuracy": per_template}
    return metrics, artifacts


# --- the experiment ---------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str | Path | None = None,
        data: DigitCaptions | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains CLIP, evaluates it, measures one step's cost; writes the outputs
    if ``workdir`` is given. Returns ``(metrics, artifacts)`` (``evaluate``'s
    artifacts plus ``"model"``, ``"params"``, ``"history"``, ``"data"``)."""
    start = time.perf_counter()
    data = data or load_digit_captions(seed=0, tokenizer=config.tokenizer)
    model, state, summary = train(config, data)
    metrics: dict[str, Any] = {
        "num_train": len(data.splits["train"]["labels"]),
        "num_test": len(data.splits["test"]["labels"]), "num_steps": config.num_steps,
        "batch_size": config.batch_size, "vocab_size": data.tokenizer.vocab_size,
        "max_len": data.max_len, "num_params": count_params(state.params),
        "train_time_s": float(summary["train_time_s"]),
        "train_loss": float(summary["train_loss"]),
        "logit_scale": float(np.exp(min(float(state.params["log_scale"]),
                                        model.max_log_scale))),
    }
    metrics |= {k: float(v) for k, v in summary.items()
                if k.startswith("val_") and np.isscalar(v)}
    params = state.params
    evaluation, artifacts = evaluate(model, params, data, config)
    metrics |= evaluation

    # One real training step: the trained state on the first batch (the step
    # is not donated here, so cost_report can call it repeatedly).
    batch = next(train_batches(data, config)(0))
    report = cost_report(jax.jit(make_clip_train_step(model.max_log_scale)), state, batch,
                         num_steps=config.num_steps, repeats=config.cost_repeats, warmup=1)
    print(f"CLIP, one training step (batch {config.batch_size}, {config.num_steps} steps):\n"
          f"{format_cost(report)}", flush=True)
    metrics |= report
    metrics["wall_time_s"] = time.perf_counter() - start
    artifacts |= {"model": model, "params": params, "history": summary["history"],
                  "data": data}

    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        table = results_table(metrics, artifacts, config)
        (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (workdir / "results.md").write_text(table + "\n")
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        (workdir / "history.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in summary["history"]))
        plot_zero_shot_curve(summary["history"], workdir / "zero_shot_curve.png")
        plot_similarity(artifacts, data, workdir / "similarity.png")
        plot_templates(artifacts["template_accuracy"], metrics, workdir / "templates.png")
        print(table, flush=True)
    return metrics, artifacts


# --- reporting --------------------------------------------------------------------


def results_table(metrics: dict[str, Any], artifacts: dict[str, Any],
                  config: ml_collections.ConfigDict) -> str:
    """The markdown tables of the run."""
    m = metrics
    lines = [
        f"CLIP on captioned 8x8 digits: {m['num_train']} training images, a fresh caption "
        f"each epoch; {m['num_steps']} steps of batch {m['batch_size']} "
        f"({m['train_time_s']:.0f} s); {m['num_params']:,} parameters; final logit scale "
        f"{m['logit_scale']:.1f}. Evaluated on {m['num_test']} held-out test images.", "",
        "| zero-shot classification (test) | accuracy |", "|---|---:|",
        f"| prompts from the 10 training templates | "
        f"{m['test_zero_shot_accuracy_seen']:.3f} |",
        f"| prompts from the 4 held-out templates (unseen words) | "
        f"{m['test_zero_shot_accuracy_unseen']:.3f} |",
        f"| linear probe on the image embeddings (uses labels) | "
        f"{m['test_linear_probe_accuracy']:.3f} |",
        f"| chance | {m['chance_accuracy']:.3f} |", "",
        "| template (prompt ensemble over its attribute fillings) | seen in training "
        "| accuracy |", "|---|---|---:|"]
    for name, templates in CAPTION_SETS.items():
        for i, t in enumerate(templates):
            lines.append(f"| `{t}` | {'yes' if name == 'seen' else 'no'} | "
                         f"{m[f'test_zero_shot_accuracy_{name}_template_{i}']:.3f} |")
    ks = list(config.ks)
    lines += ["", "Retrieval among one caption per test image; relevant = a true description "
              "of the image (strict: only its own caption). Recall@k, chance in brackets.", "",
              "| captions | direction | relevant | " + " | ".join(f"R@{k}" for k in ks) + " |",
              "|---|---|---|" + "---:|" * len(ks)]
    for name in CAPTION_SETS:
        for direction in ("i2t", "t2i"):
            for kind, label in (("", "true description"), ("pair_", "own caption only")):
                cells = [f"{m[f'retrieval_{name}_{direction}_{kind}recall@{k}']:.3f} "
                         f"({m[f'retrieval_{name}_{direction}_{kind}chance@{k}']:.3f})"
                         for k in ks]
                lines.append(f"| {name} templates | {direction.replace('2', '->')} | {label} | "
                             + " | ".join(cells) + " |")
    lines += ["", "Relevant captions per test image: " + ", ".join(
        f"{name} {m[f'retrieval_{name}_relevant_per_image']:.1f}" for name in CAPTION_SETS)
        + "."]
    return "\n".join(lines)


def plot_zero_shot_curve(history: Sequence[dict[str, Any]], path: str | Path | None = None):
    """Validation zero-shot accuracy (seen / unseen prompts) and the losses over training."""
    import matplotlib.pyplot as plt

    evals = [r for r in history if r["split"] == "val"]
    trains = [r for r in history if r["split"] == "train"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [r["step"] for r in evals]
    ax1.plot(steps, [r["zero_shot_accuracy_seen"] for r in evals], marker="o",
             label="zero-shot, training-template prompts")
    ax1.plot(steps, [r["zero_shot_accuracy_unseen"] for r in evals], marker="s",
             label="zero-shot, held-out-template prompts")
    ax1.plot(steps, [r["accuracy"] for r in evals], marker=".", ls="--",
             label="image -> its own caption among all val captions")
    ax1.axhline(0.1, color="gray", ls=":", label="chance (classes)")
    ax1.set(xlabel="step", ylabel="validation accuracy", ylim=(0, 1.02),
            title="zero-shot accuracy while training")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.plot([r["step"] for r in trains], [r["loss"] for r in trains], label="train")
    ax2.plot(steps, [r["loss"] for r in evals], marker="o", label="validation (all 180 pairs)")
    ax2.set(xlabel="step", ylabel="symmetric InfoNCE", title="contrastive loss")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def plot_similarity(artifacts: dict[str, Any], data: DigitCaptions,
                    path: str | Path | None = None, num: int = 20):
    """Left: cosine of ``num`` test images (two per class) with their held-out
    captions, true descriptions outlined. Right: every test image (sorted by
    class) against the ten held-out-prompt class embeddings."""
    import matplotlib.pyplot as plt

    labels = data.splits["test"]["labels"]
    texts, sim, relevant = artifacts["retrieval"]["unseen"]
    per = max(1, num // 10)
    pick = np.concatenate([np.flatnonzero(labels == c)[:per] for c in range(10)])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.4),
                                   gridspec_kw={"width_ratios": [1.5, 1]})
    ax1.imshow(sim[np.ix_(pick, pick)].T, cmap="viridis", vmin=-1, vmax=1)
    for i, row in enumerate(pick):
        for j, col in enumerate(pick):
            if relevant[row, col]:
                ax1.add_patch(plt.Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, ec="red",
                                            lw=0.8))
    ax1.set_yticks(range(len(pick)), [texts[j] for j in pick], fontsize=6)
    ax1.set_xticks(range(len(pick)), [str(labels[i]) for i in pick], fontsize=7)
    ax1.set(xlabel="test image (its class)", title="cosine: test images x held-out captions "
                                                   "(red: true description)")
    order = np.argsort(labels, kind="stable")
    img = artifacts["image_embeddings"][order]
    im = ax2.imshow(img @ artifacts["class_embeddings"]["unseen"].T, aspect="auto",
                    cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ax2.set_xticks(range(10), [str(c) for c in range(10)])
    bounds = np.searchsorted(labels[order], np.arange(10))
    ax2.set_yticks(bounds + np.diff(np.append(bounds, len(order))) / 2,
                   [str(c) for c in range(10)], fontsize=7)
    ax2.set(xlabel="class prompt ensemble (held-out templates)", ylabel="test image (class)",
            title="cosine: test images x class embeddings")
    fig.colorbar(im, ax=ax2, fraction=0.05)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def plot_templates(template_accuracy: dict[str, float], metrics: dict[str, Any],
                   path: str | Path | None = None):
    """Zero-shot test accuracy of each template alone, seen vs held-out."""
    import matplotlib.pyplot as plt

    names = list(template_accuracy)
    colors = ["tab:blue" if t in TRAIN_TEMPLATES else "tab:orange" for t in names]
    fig, ax = plt.subplots(figsize=(8.5, 5))
    ax.barh(range(len(names)), [template_accuracy[t] for t in names], color=colors)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(metrics["test_zero_shot_accuracy_seen"], color="tab:blue", ls="--",
               label="ensemble of training templates")
    ax.axvline(metrics["test_zero_shot_accuracy_unseen"], color="tab:orange", ls="--",
               label="ensemble of held-out templates")
    ax.axvline(0.1, color="gray", ls=":", label="chance")
    ax.set(xlabel="zero-shot test accuracy", xlim=(0, 1),
           title="one template per classifier\n(blue: seen in training, orange: held out)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.4, -0.13), ncol=3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def main(argv: Sequence[str]) -> None:
    del argv
    import matplotlib
    from absl import flags

    matplotlib.use("Agg")  # files only; a notebook keeps its inline backend
    config = flags.FLAGS.config
    if flags.FLAGS.size == "tiny":
        overrides = {k: v for k, v in config.items() if v != get_config()[k]}
        config = get_config("tiny")
        config.update(overrides)
    run(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_dict("config", get_config())
    flags.DEFINE_string("workdir", "runs/clip_digits", "where results go")
    flags.DEFINE_enum("size", "default", ["default", "tiny"], "tiny: a smoke run")
    app.run(main)
