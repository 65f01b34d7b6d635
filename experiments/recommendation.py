"""Recommenders on synthetic implicit feedback: popularity, MF (BPR, softmaxes, WMF), two-tower.

    python experiments/recommendation.py --workdir=runs/recommendation
    python experiments/recommendation.py --workdir=/tmp/rec \\
        --config=experiments/recommendation.py:tiny --config.steps=200

Data: ``nnlib.recsys.synthetic_implicit_feedback`` (default 2,000 users x
1,000 items, 40 interactions each, drawn without replacement from a softmax
over a rank-16 latent affinity plus a power-law popularity log-weight), split
per user by ``nnlib.recsys.leave_k_out`` into 30 train / 5 validation / 5 test
items held out at random (the generator has no time, so there is no "last"
interaction to leave out). Because the generator's truth is known, the
*oracle* — ranking each user's unseen items by the true logits, which orders
them by their chance of being a held-out item — is the ceiling a learned
model can approach. Real data: no implicit-feedback data set ships with the
installed packages (scikit-learn bundles none; ``/work/shared/data`` holds
only Tiny Shakespeare) and nothing is downloaded, so only synthetic data runs.

Methods (``config.methods``), each ranking the items a user has not
interacted with in train (validation) or train + validation (test):

* ``popularity``: training interaction counts, the same list for everyone.
* ``mf_bpr``: matrix factorization (dim 32, item bias) with BPR (Rendle et
  al. 2009), one uniform negative per positive.
* ``mf_sampled_softmax``: the same model, softmax over the positive and
  ``num_negatives`` uniform negatives (accidental hits removed).
* ``mf_softmax`` / ``mf_softmax_logq``: in-batch softmax (the batch's other
  items are the negatives, so they are popularity-sampled), without and with
  the logQ correction of Yi et al. 2019.
* ``mf_wmf``: weighted MF (Hu et al. 2008), full batch, every unobserved cell
  a weighted zero (via the Gramian trick).
* ``two_tower``: ``nnlib.recsys.TwoTower`` (user tower: the bag of the
  user's training items, no user-id embedding by default — with one it
  overfits within ~1,000 steps and scores lower; item tower: item id + the
  generator's noisy item features; one hidden layer of 64), in-batch softmax
  with logQ.
* ``oracle``: the generator's true logits.

Every learned model is trained for ``steps`` Adam steps, with validation
recall@20 measured every ``eval_every`` steps; the parameters with the best
validation recall are kept (early stopping; the test items are never looked
at). Reported on the test items: recall@k for k in 1..50 (plotted), recall@10,
recall@20 and NDCG@10 (binary relevance) in the table. Compute cost: XLA's
FLOPs, memory and the measured time of one real training step of each
learned method (``nnlib.compress.cost_report``), ``{method}_cost_*`` keys, and
the two-tower's (or the last learned method's) as the top-level ``cost_*``.

Writes ``metrics.json`` (flat keys such as ``mf_bpr_test_recall@10``),
``results.md``, ``config.json`` and ``recommendation.png`` (test recall@k;
validation recall during training) into ``--workdir`` and prints the table.
The default run takes about 80 s of CPU time (4 minutes of wall time on a
busy 2-core machine); ``get_config("tiny")`` takes seconds.

Importable API (notebook 16 and the smoke test use it)::

    config = get_config()                 # or get_config("tiny"): seconds
    problem = make_data(config)           # Problem: data + truth, split, masks
    model = train_model("mf_bpr", problem, config)   # TrainedModel
    metrics = evaluate(model.scores, problem)         # {"test_recall@10": ...}
    result = run(config, workdir)         # every method, files, table

``TrainedModel`` holds ``scores`` (``[users, items]``), the best ``state``
(``nnlib.train.TrainState``, ``None`` for popularity/oracle), ``num_params``,
the validation curve (``val_steps``, ``val_recall``), ``best_step``,
``time_s`` and the ``cost`` report; :func:`score_all`, :func:`plot` and
:func:`format_table` are public too.
"""

from __future__ import annotations

import dataclasses
import json
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nnlib import recsys  # noqa: E402
from nnlib.compress import cost_report, format_cost  # noqa: E402
from nnlib.train import TrainState, make_train_step, num_params  # noqa: E402

METHODS = ("popularity", "mf_bpr", "mf_sampled_softmax", "mf_softmax", "mf_softmax_logq",
           "mf_wmf", "two_tower", "oracle")
LEARNED = tuple(m for m in METHODS if m not in ("popularity", "oracle"))
TABLE_KS = (10, 20)
CURVE_KS = (1, 2, 5, 10, 15, 20, 30, 40, 50)
VAL_K = 20
REAL_DATA_NOTE = ("no implicit-feedback data set ships with the installed packages or in "
                  "/work/shared/data; synthetic data only (nothing downloaded)")


def get_config(size: str = "full") -> ml_collections.ConfigDict:
    """The experiment's settings; ``size="tiny"`` shrinks everything to seconds."""
    if size not in ("full", "tiny"):
        raise ValueError(f"get_config expected size 'full' or 'tiny', got {size!r}")
    c = ml_collections.ConfigDict()
    # data: synthetic_implicit_feedback + leave_k_out
    c.num_users = 2000
    c.num_items = 1000
    c.latent_dim = 16
    c.interactions_per_user = 40
    c.popularity_exponent = 1.0
    c.preference_scale = 2.0
    c.temperature = 0.75
    c.feature_noise = 0.5
    c.num_test = 5
    c.num_val = 5
    c.seed = 0
    # models and training
    c.methods = METHODS
    c.dim = 32
    c.hidden_sizes = (64,)
    c.use_user_id = False  # two_tower: True adds a user-id embedding to the bag
    c.steps = 3000  # sampled-batch Adam steps (WMF: wmf_steps full-batch steps)
    c.wmf_steps = 300
    c.eval_every = 250  # validation recall@20 every this many steps; the best is kept
    c.batch_size = 512
    c.num_negatives = 64  # mf_sampled_softmax
    c.learning_rate = ml_collections.ConfigDict({
        "mf_bpr": 1e-2, "mf_sampled_softmax": 3e-3, "mf_softmax": 3e-3,
        "mf_softmax_logq": 3e-3, "mf_wmf": 5e-2, "two_tower": 1e-3})
    c.embedding_l2 = ml_collections.ConfigDict({
        "mf_bpr": 3e-3, "mf_sampled_softmax": 1e-3, "mf_softmax": 1e-4,
        "mf_softmax_logq": 1e-4, "mf_wmf": 1e-2, "two_tower": 1e-4})
    c.wmf_positive_weight = 10.0
    c.cost_repeats = 5
    if size == "tiny":
        c.num_users, c.num_items, c.latent_dim = 120, 80, 4
        c.interactions_per_user, c.num_test, c.num_val = 12, 2, 2
        c.dim, c.hidden_sizes = 8, (16,)
        c.steps, c.wmf_steps, c.eval_every = 40, 40, 20
        c.batch_size, c.num_negatives, c.cost_repeats = 64, 8, 1
    return c


# --- data ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """The data set with its truth, its split and the evaluation masks.

    Attributes:
      data: the generator's output (``data.true_logits()`` is the oracle).
      split: per-user train / val / test item ids.
      train_seen: ``bool [users, items]``, train items (masked when ranking
        validation items).
      test_seen: ``bool [users, items]``, train + validation items (masked when
        ranking test items).
      val_relevant, test_relevant: ``bool [users, items]``, the held-out items.
    """

    data: recsys.ImplicitFeedback
    split: recsys.LeaveOutSplit
    train_seen: np.ndarray
    test_seen: np.ndarray
    val_relevant: np.ndarray
    test_relevant: np.ndarray


def make_data(config: ml_collections.ConfigDict) -> Problem:
    """Draws the synthetic data of ``config`` and splits it per user."""
    n_items = config.num_items
    data = recsys.synthetic_implicit_feedback(
        config.num_users, n_items, dim=config.latent_dim,
        interactions_per_user=config.interactions_per_user,
        popularity_exponent=config.popularity_exponent,
        preference_scale=config.preference_scale, temperature=config.temperature,
        feature_noise=config.feature_noise, seed=config.seed)
    split = recsys.leave_k_out(data.interactions, n_items, num_test=config.num_test,
                               num_val=config.num_val, seed=config.seed + 1)
    mask = recsys.interaction_mask
    return Problem(data, split, train_seen=mask(split.train, n_items),
                   test_seen=mask(np.concatenate([split.train, split.val], 1), n_items),
                   val_relevant=mask(split.val, n_items), test_relevant=mask(split.test, n_items))


# --- models, losses, batches -----------------------------------------------------------


def make_sampler(problem: Problem, batch_size: int, num_negatives: int = 1
                 ) -> Callable[[jax.Array], dict[str, Any]]:
    """A pure ``key -> batch``: ``batch_size`` training (user, item) pairs drawn
    uniformly with replacement, ``num_negatives`` uniform negative items each
    (``int [batch, N]``; none for 0, as in-batch softmax needs none), the user's
    training items as history with the positive hidden from it, and the items'
    features."""
    pairs = jnp.asarray(problem.split.train_pairs())  # [pairs, 2]
    train = jnp.asarray(problem.split.train)  # [users, n_train]
    features = jnp.asarray(problem.data.item_features)  # [items, f]
    num_items = problem.split.num_items

    def sample(key):
        pair_key, negative_key = jax.random.split(key)
        rows = pairs[jax.random.randint(pair_key, (batch_size,), 0, pairs.shape[0])]
        users, items = rows[:, 0], rows[:, 1]
        # Uniform negatives are occasionally items the user did interact with
        # (n_train / items of them); BPR accepts that noise (Rendle et al.),
        # the sampled softmax removes them as accidental hits.
        history = train[users]  # [batch, n_train]
        inputs = {"users": users, "items": items, "history": history,
                  "history_mask": history != items[:, None], "item_features": features[items]}
        if num_negatives:
            negatives = jax.random.randint(negative_key, (batch_size, num_negatives), 0,
                                           num_items)
            inputs |= {"negatives": negatives, "negative_features": features[negatives]}
        return {"inputs": inputs, "labels": items}

    return sample


def _item_log_q(problem: Problem) -> jax.Array:
    """``[items]``: log of each item's chance of being a batch positive."""
    counts = problem.split.item_counts()
    return jnp.log(jnp.maximum(counts, 1) / counts.sum())


def build_method(method: str, problem: Problem, config: ml_collections.ConfigDict):
    """``(model, loss_fn, num_negatives)`` of a sampled-batch method."""
    split = problem.split
    l2 = config.embedding_l2[method]
    mf = recsys.MatrixFactorization(split.num_users, split.num_items, dim=config.dim)
    if method == "mf_bpr":
        return mf, recsys.make_bpr_loss(embedding_l2=l2), 1
    if method == "mf_sampled_softmax":
        # uniform negatives: the logQ correction is a constant, so none is applied
        return mf, recsys.make_sampled_softmax_loss(None, embedding_l2=l2), config.num_negatives
    if method == "mf_softmax":
        return mf, recsys.make_in_batch_softmax_loss(None, embedding_l2=l2), 0
    if method == "mf_softmax_logq":
        return mf, recsys.make_in_batch_softmax_loss(_item_log_q(problem), embedding_l2=l2), 0
    if method == "two_tower":
        tower = recsys.TwoTower(split.num_users, split.num_items, dim=config.dim,
                                hidden_sizes=tuple(config.hidden_sizes),
                                use_user_id=config.use_user_id)
        return tower, recsys.make_in_batch_softmax_loss(_item_log_q(problem),
                                                        embedding_l2=l2), 0
    raise ValueError(f"build_method expected one of "
                     f"{tuple(m for m in LEARNED if m != 'mf_wmf')} (mf_wmf trains full-batch), "
                     f"got {method!r}")


def _wmf_step(problem: Problem, config: ml_collections.ConfigDict):
    """``(model, example_input, step)``: weighted MF's full-batch step (no item
    bias, as in Hu et al.), ``O((users + items) dim^2)`` by the Gramian trick."""
    split = problem.split
    model = recsys.MatrixFactorization(split.num_users, split.num_items, dim=config.dim,
                                       use_item_bias=False)
    pairs = jnp.asarray(split.train_pairs())
    users, items = jnp.arange(split.num_users), jnp.arange(split.num_items)
    l2 = config.embedding_l2["mf_wmf"]

    def loss(params):
        variables = {"params": params}
        u = model.apply(variables, users, method="user_vectors")  # [users, dim]
        v = model.apply(variables, items, method="item_vectors")  # [items, dim]
        fit = recsys.weighted_matrix_factorization_loss(
            u, v, pairs[:, 0], pairs[:, 1], positive_weight=config.wmf_positive_weight)
        return fit + l2 * (jnp.mean(jnp.sum(u**2, 1)) + jnp.mean(jnp.sum(v**2, 1)))

    def step(state, batch=None):
        del batch
        value, grads = jax.value_and_grad(loss)(state.params)
        return state.apply_gradients(grads), {"loss": value}

    return model, {"users": pairs[:1, 0], "items": pairs[:1, 1]}, step


# --- training and scoring --------------------------------------------------------------


@dataclasses.dataclass
class TrainedModel:
    """One method's result: ``scores`` ``[users, items]`` (the best validation
    checkpoint's), its ``state`` (``None`` without parameters), ``num_params``,
    the validation curve ``val_steps``/``val_recall`` (recall@20), ``best_step``,
    ``time_s`` (training + validation) and the ``cost`` report of one step."""

    method: str
    scores: np.ndarray
    state: TrainState | None = None
    num_params: int = 0
    val_steps: list[int] = dataclasses.field(default_factory=list)
    val_recall: list[float] = dataclasses.field(default_factory=list)
    best_step: int = 0
    time_s: float = 0.0
    cost: dict[str, Any] = dataclasses.field(default_factory=dict)


def score_all(state: TrainState, problem: Problem) -> np.ndarray:
    """Scores ``[users, items]`` of a trained model: user vectors from the
    users' training items, item vectors from ids and features."""
    split = problem.split
    history = jnp.asarray(split.train)
    u = state.apply_fn(state.variables, jnp.arange(split.num_users), history,
                       jnp.ones(history.shape, bool), method="user_vectors")
    v = state.apply_fn(state.variables, jnp.arange(split.num_items),
                       jnp.asarray(problem.data.item_features), method="item_vectors")
    return np.asarray(u @ v.T)


def _val_recall(scores: np.ndarray, problem: Problem) -> float:
    recall = recsys.recall_at_k(jnp.asarray(scores), problem.val_relevant, problem.train_seen,
                                k=min(VAL_K, problem.split.num_items))
    return float(jnp.nanmean(recall))


def train_model(method: str, problem: Problem, config: ml_collections.ConfigDict, *,
                measure_cost: bool = True) -> TrainedModel:
    """Trains ``method`` (or scores it, for ``popularity`` and ``oracle``).

    Learned methods take Adam steps in jitted ``lax.scan`` chunks of
    ``config.eval_every``; after each chunk the validation recall@20 is
    measured and the best state kept. ``measure_cost`` adds
    ``nnlib.compress.cost_report`` of one training step (``num_steps`` = the
    run's steps)."""
    split = problem.split
    if method == "popularity":
        pop = np.asarray(recsys.popularity_scores(split.item_counts()))
        return TrainedModel(method, np.broadcast_to(pop, (split.num_users, split.num_items)))
    if method == "oracle":
        return TrainedModel(method, problem.data.true_logits())
    if method not in LEARNED:
        raise ValueError(f"train_model expected a method in {METHODS}, got {method!r}")

    start = time.perf_counter()
    init_key, data_key, cost_key = jax.random.split(jax.random.key(config.seed), 3)
    tx = optax.adam(config.learning_rate[method])
    if method == "mf_wmf":
        model, example, step = _wmf_step(problem, config)
        steps = config.wmf_steps
        cost_batch = None
    else:
        model, loss_fn, num_negatives = build_method(method, problem, config)
        sample = make_sampler(problem, config.batch_size, num_negatives)
        train_step = make_train_step(loss_fn)
        step = lambda state, key: train_step(state, sample(key))
        example = sample(data_key)["inputs"]
        steps = config.steps
        cost_batch = sample(cost_key)
    state = TrainState.create(model=model, tx=tx, key=init_key, example_input=example)

    @jax.jit
    def chunk(state, keys):  # keys: [eval_every] (sampled) or a dummy [eval_every]
        state, metrics = jax.lax.scan(step, state, keys)
        return state, metrics["loss"]

    trained = TrainedModel(method, np.zeros(0), num_params=num_params(state.params))
    best_recall, best_state, done = -1.0, state, 0
    while done < steps:
        n = min(config.eval_every, steps - done)
        keys = jax.random.split(jax.random.fold_in(data_key, done), n)
        state, losses = chunk(state, keys)
        done += n
        if not np.isfinite(np.asarray(losses)[-1]):
            raise FloatingPointError(f"train_model({method!r}): loss {losses[-1]} at step {done}")
        recall = _val_recall(score_all(state, problem), problem)
        trained.val_steps.append(done)
        trained.val_recall.append(recall)
        if recall > best_recall:
            best_recall, best_state, trained.best_step = recall, state, done
    trained.state = best_state
    trained.scores = score_all(best_state, problem)
    trained.time_s = time.perf_counter() - start
    if measure_cost:
        if cost_batch is None:
            trained.cost = cost_report(step, state, num_steps=steps,
                                       repeats=config.cost_repeats, warmup=1)
        else:
            trained.cost = cost_report(train_step, state, cost_batch, num_steps=steps,
                                       repeats=config.cost_repeats, warmup=1)
    return trained


# --- evaluation ------------------------------------------------------------------------


def evaluate(scores: np.ndarray, problem: Problem, *, ks: Sequence[int] = CURVE_KS
             ) -> dict[str, float]:
    """Test recall@k for each of ``ks`` (and 10, 20), test NDCG@10, and validation
    recall@20; train + validation items are masked for the test, train items for
    validation. ``scores: [users, items]``."""
    n_items = problem.split.num_items
    scores = jnp.asarray(scores, jnp.float32)
    recall_ks = sorted(k for k in set(ks) | set(TABLE_KS) if k <= n_items)
    out = recsys.ranking_metrics(scores, problem.test_relevant, problem.test_seen,
                                 recall_ks=recall_ks, ndcg_ks=(min(10, n_items),))
    out = {f"test_{k}": v for k, v in out.items()}
    out[f"val_recall@{VAL_K}"] = _val_recall(np.asarray(scores), problem)
    return out


# --- the experiment --------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str | Path | None = None, *,
        verbose: bool = True) -> dict[str, Any]:
    """Trains and evaluates ``config.methods``; with a ``workdir``, writes
    ``metrics.json``, ``results.md``, ``config.json`` and ``recommendation.png``.
    Returns ``{"metrics": flat dict, "table": markdown, "results": {method:
    evaluate dict + num_params, best_step, time_s}, "models": {method:
    TrainedModel}, "problem": Problem}``."""
    for method in config.methods:
        if method not in METHODS:
            raise ValueError(f"run expected config.methods among {METHODS}, got {method!r}")
    start = time.perf_counter()
    problem = make_data(config)
    results, models = {}, {}
    for method in config.methods:
        model = train_model(method, problem, config)
        models[method] = model
        results[method] = {**evaluate(model.scores, problem), "num_params": model.num_params,
                           "best_step": model.best_step, "time_s": round(model.time_s, 1)}
        if model.cost:
            results[method]["cost_flops_per_step"] = model.cost["cost_flops_per_step"]
            results[method]["cost_step_time_s"] = model.cost["cost_step_time_s"]
        if verbose:
            r = results[method]
            print(f"{method}: test recall@10 {r['test_recall@10']:.3f}, NDCG@10 "
                  f"{r['test_ndcg@10']:.3f}, best step {r['best_step']} "
                  f"({r['time_s']:.1f} s)", flush=True)

    split = problem.split
    metrics: dict[str, Any] = {
        "num_users": split.num_users, "num_items": split.num_items,
        "train_per_user": split.train.shape[1], "val_per_user": split.val.shape[1],
        "test_per_user": split.test.shape[1], "steps": config.steps, "dim": config.dim,
        "real_data": REAL_DATA_NOTE,
    }
    for method, r in results.items():
        metrics |= {f"{method}_{k}": v for k, v in r.items() if not k.startswith("cost_")}
        metrics |= {f"{method}_{k}": v for k, v in models[method].cost.items()}
    learned = [m for m in config.methods if models[m].cost]
    if learned:
        headline = "two_tower" if "two_tower" in learned else learned[-1]
        metrics["cost_method"] = headline
        metrics |= models[headline].cost
        if verbose:
            print(f"{headline}, one training step:\n{format_cost(models[headline].cost)}",
                  flush=True)
    metrics["total_time_s"] = round(time.perf_counter() - start, 1)
    table = format_table(results, metrics)
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (workdir / "results.md").write_text(table + "\n")
        (workdir / "config.json").write_text(config.to_json(indent=2) + "\n")
        plot(results, models, workdir / "recommendation.png",
             title=f"{split.num_users} users x {split.num_items} items, "
                   f"{split.test.shape[1]} held-out items per user")
    if verbose:
        print("\n" + table, flush=True)
    return {"metrics": metrics, "table": table, "results": results, "models": models,
            "problem": problem}


def format_table(results: dict[str, dict[str, Any]], metrics: dict[str, Any]) -> str:
    """A markdown table, one row per method, in ``results`` order."""
    lines = [
        f"Recommendation on synthetic implicit feedback: {metrics['num_users']} users x "
        f"{metrics['num_items']} items, {metrics['train_per_user']} train / "
        f"{metrics['val_per_user']} val / {metrics['test_per_user']} test items per user "
        f"(held out at random); train and val items masked when ranking test items. "
        f"Real data: {metrics['real_data']}.",
        "",
        "| method | test recall@10 | test recall@20 | test NDCG@10 | val recall@20 | params | "
        "best step | FLOPs/step | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        flops = f"{r['cost_flops_per_step']:.3g}" if "cost_flops_per_step" in r else "-"
        lines.append(f"| {method} | {r['test_recall@10']:.3f} | {r['test_recall@20']:.3f} | "
                     f"{r['test_ndcg@10']:.3f} | {r['val_recall@20']:.3f} | "
                     f"{r['num_params']:,} | {r['best_step']} | {flops} | {r['time_s']:.1f} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], models: dict[str, TrainedModel] | None,
         path: str | Path | None = None, *, title: str = ""):
    """Left: test recall@k against k, one line per method (the oracle dashed,
    popularity dotted). Right: validation recall@20 during training. Returns
    the ``matplotlib.figure.Figure`` (saved to ``path`` when given)."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    for i, (method, r) in enumerate(results.items()):
        ks = sorted(int(k.split("@")[1]) for k in r if k.startswith("test_recall@"))
        style = {"oracle": dict(color="k", ls="--"), "popularity": dict(color="gray", ls=":")}
        kw = style.get(method, dict(color=f"C{i}"))
        left.plot(ks, [r[f"test_recall@{k}"] for k in ks], marker=".", label=method, **kw)
        if models and models[method].val_steps:
            right.plot(models[method].val_steps, models[method].val_recall, marker=".",
                       label=method, **kw)
        elif f"val_recall@{VAL_K}" in r and method in ("oracle", "popularity"):
            right.axhline(r[f"val_recall@{VAL_K}"], label=method, **kw)
    left.set(xlabel="k (list length)", ylabel="test recall@k", ylim=(0, 1))
    right.set(xlabel="training step (WMF: full-batch step)",
              ylabel=f"validation recall@{VAL_K}", ylim=(0, None))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags

    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", str(Path(__file__).resolve()), "this file (get_config) or FILE:tiny; "
        "override fields with --config.steps=500", lock_config=True)
    flags.DEFINE_string("workdir", str(ROOT / "runs" / "recommendation"), "where results go")
    app.run(main)
