"""Task distributions for meta-learning: sinusoid regression and N-way K-shot episodes.

Meta-learning trains on *tasks*, not examples: each draw is a small learning
problem with a support set (to learn from) and a query set (to be judged on).

* **Sinusoid regression** exactly as in Finn, Abbeel & Levine 2017 (Section
  5.1, and their reference code ``cbfinn/maml``): a task is
  ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5.0]``, phase
  ``phi ~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``; K support points, and the
  query points are fresh draws of the same task.
* **N-way K-shot classification episodes** (Vinyals et al. 2016, "Matching
  Networks"; the protocol of Finn et al. and Snell et al.): pick N classes at
  random, K support and Q query examples of each, and relabel the classes
  ``0 .. N-1`` in the random order drawn, so that a label means "the k-th class
  of this episode" and nothing can be memorized across episodes. Meta-test
  episodes come from classes never seen in meta-training.

``digits_episode_samplers`` builds them from scikit-learn's 8x8 digits
(``nnlib.data.load_digits``): meta-train classes 0-6, held-out classes 7-9
(so meta-test is 3-way; ``DIGITS_TRAIN_CLASSES``/``DIGITS_TEST_CLASSES``),
optionally with rotated copies of the training classes as extra classes
(``rotated_classes``), plus a test on unseen images of the training classes.
That split keeps 7 training classes, enough that training episodes differ in
*which* classes they hold (35 different 3-class sets, 21 5-class sets), not
only in their labelling; a 0-4 / 5-9 split would allow 5-way testing but every
5-way training episode would then contain the same five classes.

Everything samples with an explicit PRNG key inside ``jit``: the same key gives
the same tasks on every machine.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

# --- sinusoid regression (Finn et al. 2017, Section 5.1) --------------------------

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)


class SinusoidTasks(NamedTuple):
    """A batch of sinusoid tasks ``y = amplitude * sin(x - phase)``.

    Attributes:
      support: ``(x [T, K, 1], y [T, K, 1])``.
      query: ``(x [T, M, 1], y [T, M, 1])``.
      amplitude: ``[T]``; phase: ``[T]``.
    """

    support: tuple[Array, Array]
    query: tuple[Array, Array]
    amplitude: Array
    phase: Array


def sinusoid(x: Float[Array, "*shape"], amplitude: Float[Array, "*shape"],
             phase: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """``amplitude * sin(x - phase)`` (broadcasting), the sign convention of ``cbfinn/maml``."""
    return amplitude * jnp.sin(x - phase)


@functools.partial(jax.jit, static_argnames=("num_tasks", "num_support", "num_query",
                                             "amplitude_range", "phase_range", "input_range"))
def sample_sinusoid_tasks(
    key: Array,
    num_tasks: int,
    *,
    num_support: int,
    num_query: int,
    amplitude_range: tuple[float, float] = AMPLITUDE_RANGE,
    phase_range: tuple[float, float] = PHASE_RANGE,
    input_range: tuple[float, float] = INPUT_RANGE,
) -> SinusoidTasks:
    """Draws ``num_tasks`` sinusoid tasks with K support and M query points each.

    Args:
      key: PRNG key.
      num_tasks: T (the meta-batch: 25 in Finn et al.).
      num_support: K, the shots (5 or 10 in the paper).
      num_query: M, query points per task (K during meta-training in Finn et
        al.; use many, e.g. 100, to measure a task's error at test time).
      amplitude_range, phase_range, input_range: uniform ranges.

    Returns:
      ``SinusoidTasks`` with float32 ``[T, K, 1]`` / ``[T, M, 1]`` sets.
    """
    k_amp, k_phase, k_x = jax.random.split(key, 3)
    amplitude = jax.random.uniform(k_amp, (num_tasks,), minval=amplitude_range[0],
                                   maxval=amplitude_range[1])  # [T]
    phase = jax.random.uniform(k_phase, (num_tasks,), minval=phase_range[0],
                               maxval=phase_range[1])  # [T]
    x = jax.random.uniform(k_x, (num_tasks, num_support + num_query, 1),
                           minval=input_range[0], maxval=input_range[1])  # [T, K+M, 1]
    y = sinusoid(x, amplitude[:, None, None], phase[:, None, None])
    return SinusoidTasks(support=(x[:, :num_support], y[:, :num_support]),
                         query=(x[:, num_support:], y[:, num_support:]),
                         amplitude=amplitude, phase=phase)


# --- N-way K-shot episodes ---------------------------------------------------------

DIGITS_TRAIN_CLASSES = (0, 1, 2, 3, 4, 5, 6)
DIGITS_TEST_CLASSES = (7, 8, 9)


class Episode(NamedTuple):
    """A batch of N-way K-shot episodes (labels are positions ``0 .. N-1``).

    Attributes:
      support: ``(x [E, N*K, ...], y [E, N*K])``, class-major (K of class 0, ...).
      query: ``(x [E, N*Q, ...], y [E, N*Q])``.
      classes: ``[E, N]`` the original class id behind each episode label.
    """

    support: tuple[Array, Array]
    query: tuple[Array, Array]
    classes: Array


@functools.partial(jax.jit, static_argnames=("num_episodes", "num_ways", "num_shots",
                                             "num_queries"))
def _sample_episodes(key, inputs, table, counts, class_ids, *, num_episodes, num_ways,
                     num_shots, num_queries):
    per_class = num_shots + num_queries
    num_classes, max_count = table.shape

    def one(key):
        k_classes, k_examples = jax.random.split(key)
        chosen = jax.random.permutation(k_classes, num_classes)[:num_ways]  # [N]
        # Sampling without replacement from classes of unequal size: random
        # scores, +inf on the padding, take the K+Q smallest.
        scores = jax.random.uniform(k_examples, (num_ways, max_count))
        valid = jnp.arange(max_count)[None, :] < counts[chosen][:, None]  # [N, max_count]
        order = jnp.argsort(jnp.where(valid, scores, jnp.inf), axis=1)[:, :per_class]
        rows = jnp.take_along_axis(table[chosen], order, axis=1)  # [N, K+Q]
        labels = jnp.broadcast_to(jnp.arange(num_ways, dtype=jnp.int32)[:, None],
                                  (num_ways, per_class))
        xs = inputs[rows[:, :num_shots].reshape(-1)]  # [N*K, ...]
        xq = inputs[rows[:, num_shots:].reshape(-1)]  # [N*Q, ...]
        return ((xs, labels[:, :num_shots].reshape(-1)),
                (xq, labels[:, num_shots:].reshape(-1)), class_ids[chosen])

    support, query, classes = jax.vmap(one)(jax.random.split(key, num_episodes))
    return Episode(support=support, query=query, classes=classes)


@dataclasses.dataclass(frozen=True)
class EpisodeSampler:
    """Samples N-way K-shot episodes from a labelled pool restricted to ``classes``.

    Build it with ``EpisodeSampler.from_arrays``; call it with a key.

    Attributes:
      inputs: ``[n, ...]`` the pool's inputs (a device array).
      table: ``[C, max_count]`` int32 row indices of each class's examples in
        ``inputs``, padded with -1 (classes may differ in size).
      counts: ``[C]`` examples per class.
      classes: the C original class ids, in ``table`` order.
      num_ways, num_shots, num_queries: N, K, Q.
    """

    inputs: Array
    table: Array
    counts: Array
    classes: tuple[int, ...]
    num_ways: int
    num_shots: int
    num_queries: int

    @classmethod
    def from_arrays(cls, inputs: np.ndarray, labels: np.ndarray, *, classes: Sequence[int],
                    num_ways: int, num_shots: int, num_queries: int) -> EpisodeSampler:
        """Args: ``inputs [n, ...]``, integer ``labels [n]``, the ``classes`` to draw
        from, and N ways, K shots, Q queries per class."""
        fn = "EpisodeSampler"
        labels = np.asarray(labels)
        if len(inputs) != len(labels):
            raise ValueError(f"{fn} expected one label per input, got {len(labels)} labels "
                             f"for {len(inputs)} inputs")
        classes = tuple(int(c) for c in classes)
        if len(set(classes)) != len(classes):
            raise ValueError(f"{fn} expected distinct classes, got {classes}")
        for name, value in (("num_ways", num_ways), ("num_shots", num_shots),
                            ("num_queries", num_queries)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{fn} expected {name} to be an int >= 1, got {value!r}")
        if num_ways > len(classes):
            raise ValueError(f"{fn}: a {num_ways}-way episode needs at least {num_ways} "
                             f"classes, got {len(classes)}: {classes}")
        rows = [np.flatnonzero(labels == c) for c in classes]
        smallest = min(len(r) for r in rows)
        if num_shots + num_queries > smallest:
            raise ValueError(f"{fn}: {num_shots} shots + {num_queries} queries per class "
                             f"exceed the smallest class ({smallest} examples)")
        table = np.full((len(classes), max(len(r) for r in rows)), -1, np.int32)
        for i, r in enumerate(rows):
            table[i, :len(r)] = r
        return cls(inputs=jnp.asarray(inputs), table=jnp.asarray(table),
                   counts=jnp.asarray([len(r) for r in rows], jnp.int32), classes=classes,
                   num_ways=num_ways, num_shots=num_shots, num_queries=num_queries)

    def __call__(self, key: Array, num_episodes: int) -> Episode:
        """``num_episodes`` episodes; the same key gives the same episodes."""
        return _sample_episodes(key, self.inputs, self.table, self.counts,
                                jnp.asarray(self.classes, jnp.int32), num_episodes=num_episodes,
                                num_ways=self.num_ways, num_shots=self.num_shots,
                                num_queries=self.num_queries)


class DigitsSamplers(NamedTuple):
    """The three episode samplers of the digits benchmark (see ``digits_episode_samplers``).

    Attributes:
      train: meta-training episodes: the training classes (and, with
        ``rotations=True``, their rotated copies as extra classes), images of
        the ``train`` and ``val`` splits only.
      test: held-out classes, every image: the few-shot test.
      seen: training classes, unrotated, images of the ``test`` split (never
        used in meta-training): the same test on classes the learner knows,
        to separate "new images" from "new classes".
    """

    train: EpisodeSampler
    test: EpisodeSampler
    seen: EpisodeSampler


def rotated_classes(
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[int],
    *,
    avoid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """More training classes from fewer: each class rotated by 90, 180 and 270 degrees.

    A rotated digit is a new class (the Omniglot practice of Santoro et al.
    2016 and Vinyals et al. 2016), with id ``c + r * stride`` for a rotation
    of ``r`` quarter turns (``stride = labels.max() + 1``). A rotated class
    whose mean image is nearest to one of the ``avoid`` mean images (nearest
    among those and the unrotated training means) is dropped: a 6 turned
    upside down is a 9, and would leak a held-out class into meta-training.

    Args:
      images: ``[n, H, W, C]`` (square images).
      labels: ``[n]`` integer classes.
      classes: the classes to rotate (others are left out of the result).
      avoid: ``[a, H, W, C]`` mean images of classes that must not be imitated.

    Returns:
      ``(images [m, H, W, C], labels [m], class_ids)``: the unrotated classes
      and the kept rotations.
    """
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"rotated_classes expected square images [n, H, W, C], got shape "
                         f"{images.shape}")
    stride = int(labels.max()) + 1
    means = np.stack([images[labels == c].mean(0) for c in classes])  # [C, H, W, C]
    references = means if avoid is None else np.concatenate([means, avoid])
    out_x, out_y, ids = [], [], []
    for r in range(4):
        for c in classes:
            x = np.rot90(images[labels == c], r, axes=(1, 2))
            if r and avoid is not None:
                nearest = np.argmin(((references - x.mean(0)) ** 2).sum(axis=(1, 2, 3)))
                if nearest >= len(classes):
                    continue
            out_x.append(x)
            out_y.append(np.full(len(x), c + r * stride))
            ids.append(c + r * stride)
    return np.concatenate(out_x), np.concatenate(out_y), tuple(ids)


def digits_episode_samplers(
    *,
    num_shots: int,
    num_queries: int,
    train_ways: int,
    test_ways: int = 3,
    train_classes: Sequence[int] = DIGITS_TRAIN_CLASSES,
    test_classes: Sequence[int] = DIGITS_TEST_CLASSES,
    rotations: bool = False,
    flatten: bool = False,
) -> DigitsSamplers:
    """Meta-train, held-out and seen-class episode samplers over the 8x8 digits.

    Classes separate meta-training from the few-shot test: the ``test``
    sampler draws from all 1797 images (every split of
    ``nnlib.data.load_digits``, pixels in [0, 1]) of the held-out classes,
    which meta-training never sees. Meta-training draws the training classes
    from the ``train`` and ``val`` splits only, so that their ``test``-split
    images give a second test (``seen``) on known classes.

    Args:
      num_shots, num_queries: K and Q per class (every sampler).
      train_ways, test_ways: N of meta-training and test episodes (the
        ``seen`` sampler uses ``test_ways`` too, so both tests are alike);
        prototypical networks may train with more ways than they test;
        MAML's output layer needs the same N for both.
      train_classes, test_classes: disjoint class ids (defaults 0-6 and 7-9).
      rotations: add the training classes rotated by 90/180/270 degrees as
        extra training classes (``rotated_classes``; rotations that look like
        a held-out digit are dropped).
      flatten: inputs ``[64]`` instead of ``[8, 8, 1]``.

    Returns:
      ``DigitsSamplers(train, test, seen)``.
    """
    from nnlib.data import load_digits

    if set(train_classes) & set(test_classes):
        raise ValueError(f"digits_episode_samplers expected disjoint train and test classes, "
                         f"got {tuple(train_classes)} and {tuple(test_classes)}")
    data = load_digits()  # images [n, 8, 8, 1]
    fit_x = np.concatenate([data[s]["inputs"] for s in ("train", "val")])
    fit_y = np.concatenate([data[s]["labels"] for s in ("train", "val")])
    all_x = np.concatenate([fit_x, data["test"]["inputs"]])
    all_y = np.concatenate([fit_y, data["test"]["labels"]])
    train_ids = tuple(train_classes)
    if rotations:
        avoid = np.stack([all_x[all_y == c].mean(0) for c in test_classes])
        fit_x, fit_y, train_ids = rotated_classes(fit_x, fit_y, train_classes, avoid=avoid)

    def flat(x):
        return x.reshape(len(x), -1) if flatten else x

    common = dict(num_shots=num_shots, num_queries=num_queries)
    return DigitsSamplers(
        train=EpisodeSampler.from_arrays(flat(fit_x), fit_y, classes=train_ids,
                                         num_ways=train_ways, **common),
        test=EpisodeSampler.from_arrays(flat(all_x), all_y, classes=test_classes,
                                        num_ways=test_ways, **common),
        seen=EpisodeSampler.from_arrays(flat(data["test"]["inputs"]), data["test"]["labels"],
                                        classes=train_classes, num_ways=test_ways, **common))
