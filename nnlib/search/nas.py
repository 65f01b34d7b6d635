"""Neural architecture search: which small network is worth its FLOPs?

A **search space** (``SearchSpace``) names the choices — the family (MLP or
CNN), the depth, the width of every hidden layer / conv block, the
activation and, for CNNs, the kernel size — and an ``Architecture`` is one
pick. A **search** spends a fixed budget of trained candidates:

- **Random search** samples the space uniformly. It is the baseline any NAS
  method must beat (Li & Talwalkar 2019, "Random Search and Reproducibility
  for Neural Architecture Search").
- **Regularized evolution** (Real et al. 2019, "Regularized Evolution for
  Image Classifier Architecture Search"): a population (a queue) starts with
  random candidates; each cycle samples ``sample_size`` of them (tournament
  selection), mutates the fittest into a child (one choice changed), trains
  it, appends it and removes the *oldest* member (aging), not the worst, so
  an architecture survives only by having good children, and a lucky
  evaluation cannot sit in the population for ever.

Each candidate reports an accuracy and a cost (here XLA's FLOPs of one
forward pass, ``nnlib.compress.flops``); ``pareto_front`` picks the
candidates no other beats on both.

**Training candidates fast** (``make_trainer``, ``MaskedMLP``/``MaskedCNN``,
``make_evaluator``). On a CPU, compiling a candidate's training program
costs more than running it, so the evaluator compiles one program for all
MLPs and one per CNN depth, at the largest width (and depth, kernel), and
feeds the candidate's choices in as traced integers:

- **Width by masking**: hidden units (conv channels) at index >= ``width``
  are multiplied by 0 after the activation. They then get zero gradients in
  and out (their outputs are 0, so are the gradients of the weights reading
  them; their own inputs' gradients are multiplied by 0), so with Adam their
  weights never move and never matter: the network computes — and trains —
  exactly like the narrow one (tested against ``MLPClassifier`` and ``CNN``
  on sliced weights). Initialisation is rescaled by ``sqrt(max_width /
  width)`` so that the active weights have the narrow network's LeCun
  variance ``1 / fan_in``.
- **MLP depth by skipping**: hidden layers past ``depth`` pass their input
  through (``where(i < depth, layer(x), x)``), with zero gradients.
- **Kernel size by tap masking**: a 3x3 kernel is the centre of a 5x5 one
  whose outer ring is multiplied by 0 (same output under SAME padding).
- **Activation by ``lax.switch``** over the space's activations.
- **Seeds in parallel**: ``jax.vmap`` over PRNG keys trains several seeds
  of a candidate in one program (batched matmuls) for MLPs; for CNNs,
  ``vmap`` turns every convolution into a grouped convolution, which XLA's
  CPU backend ran ~1.7x *slower* than the same seeds one after another
  (52 ms vs 2 x 15.7 ms per step measured), so CNN seeds run through
  ``lax.map`` (sequential, still one program).

The price: a small candidate computes at the largest size while training.
Its *reported* FLOPs are those of the real small nnlib model. (Masks could
also batch *different* widths under one ``vmap``; searches here propose one
candidate at a time, so the seeds are what is batched.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from nnlib import metrics as metrics_lib
from nnlib.layers import Dense, Flatten, MaxPool2D
from nnlib.layers.activations import get_activation
from nnlib.models import CNN, MLPClassifier
from nnlib.train.state import TrainState
from nnlib.train.step import LossFn, make_train_step

Data = Mapping[str, jax.Array]

# --- search space ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One point of a ``SearchSpace``.

    Attributes:
      family: ``"mlp"`` or ``"cnn"``.
      depth: hidden layers (MLP) or conv blocks (CNN).
      width: units per hidden layer / channels per conv block.
      activation: a name from ``nnlib.layers.activations``.
      kernel_size: square conv kernel (CNN); ``None`` for an MLP.
    """

    family: str
    depth: int
    width: int
    activation: str
    kernel_size: int | None = None

    def __str__(self) -> str:
        kernel = f" k{self.kernel_size}" if self.family == "cnn" else ""
        return f"{self.family} {self.depth}x{self.width} {self.activation}{kernel}"


def _default_widths() -> dict[str, tuple[int, ...]]:
    return {"mlp": (16, 32, 64, 128, 256), "cnn": (8, 16, 32)}


@dataclasses.dataclass
class SearchSpace:
    """Choices per family; an MLP ignores kernel sizes.

    CNN blocks are ``conv (SAME) -> activation -> 2x2 max-pool``, so the
    depth is bounded by the image size (8x8 digits: 3 blocks at most).
    """

    families: tuple[str, ...] = ("mlp", "cnn")
    depths: dict[str, tuple[int, ...]] = dataclasses.field(
        default_factory=lambda: {"mlp": (1, 2, 3), "cnn": (1, 2)})
    widths: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=_default_widths)
    activations: tuple[str, ...] = ("relu", "tanh", "gelu", "silu")
    kernel_sizes: tuple[int, ...] = (3, 5)

    def __post_init__(self) -> None:
        for family in self.families:
            if family not in ("mlp", "cnn"):
                raise ValueError(f"SearchSpace families are 'mlp' and 'cnn', got {family!r}")
            if not self.depths.get(family) or not self.widths.get(family):
                raise ValueError(f"SearchSpace needs depths and widths for {family!r}")
        for name in self.activations:
            get_activation(name)  # unknown names fail here, not mid-search
        if "cnn" in self.families and any(k % 2 == 0 or k < 1 for k in self.kernel_sizes):
            raise ValueError(f"SearchSpace kernel_sizes must be odd (a small kernel is the "
                             f"centre of the largest), got {self.kernel_sizes}")
        if any(d < 1 for f in self.families for d in self.depths[f]):
            raise ValueError(f"SearchSpace depths must be >= 1, got {self.depths}")

    def architectures(self) -> list[Architecture]:
        """Every architecture of the space (for brute force and its size)."""
        out = []
        for f in self.families:
            kernels = self.kernel_sizes if f == "cnn" else (None,)
            out += [Architecture(f, d, w, a, k) for d in self.depths[f] for w in self.widths[f]
                    for a in self.activations for k in kernels]
        return out

    def sample(self, rng: np.random.Generator) -> Architecture:
        """A family uniformly, then each choice uniformly."""
        family = self.families[rng.integers(len(self.families))]
        pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
        return Architecture(family, pick(self.depths[family]), pick(self.widths[family]),
                            pick(self.activations),
                            pick(self.kernel_sizes) if family == "cnn" else None)

    def mutate(self, arch: Architecture, rng: np.random.Generator) -> Architecture:
        """Changes exactly one choice (with more than one option) to another value.

        Changing the family keeps the depth and width when the new family
        allows them, else takes the nearest allowed value.
        """
        fields = [name for name, options in (
            ("family", self.families), ("depth", self.depths[arch.family]),
            ("width", self.widths[arch.family]), ("activation", self.activations),
            ("kernel_size", self.kernel_sizes if arch.family == "cnn" else ()))
            if len(options) > 1]
        if not fields:
            raise ValueError("SearchSpace.mutate: every choice has a single option")
        name = fields[rng.integers(len(fields))]
        if name == "family":
            family = [f for f in self.families if f != arch.family][
                rng.integers(len(self.families) - 1)]
            nearest = lambda v, options: min(options, key=lambda o: (abs(o - v), o))  # noqa: E731
            return Architecture(
                family, nearest(arch.depth, self.depths[family]),
                nearest(arch.width, self.widths[family]), arch.activation,
                self.kernel_sizes[rng.integers(len(self.kernel_sizes))]
                if family == "cnn" else None)
        options = {"depth": self.depths[arch.family], "width": self.widths[arch.family],
                   "activation": self.activations, "kernel_size": self.kernel_sizes}[name]
        others = [o for o in options if o != getattr(arch, name)]
        return dataclasses.replace(arch, **{name: others[rng.integers(len(others))]})

    def build(self, arch: Architecture, num_classes: int = 10) -> nn.Module:
        """The real nnlib model of ``arch`` (what its FLOPs are counted on)."""
        if arch.family == "mlp":
            return MLPClassifier(hidden_sizes=(arch.width,) * arch.depth,
                                 num_classes=num_classes, activation=arch.activation)
        return CNN(features=(arch.width,) * arch.depth, kernel_size=arch.kernel_size,
                   hidden_sizes=(), num_classes=num_classes, activation=arch.activation)


# --- masked models: one compiled program for every width and activation --------


def _rescaled_lecun(factor: Any) -> Callable[..., Array]:
    base = nn.initializers.lecun_normal()
    return lambda key, shape, dtype=jnp.float32: base(key, shape, dtype) * factor


def _switch_activation(index: Any, names: Sequence[str], x: Array) -> Array:
    return jax.lax.switch(index, [get_activation(n) for n in names], x)


class MaskedMLP(nn.Module):
    """An MLP at ``max_depth`` x ``max_width`` that computes like a narrower,
    shallower one: the first ``width`` units of each hidden layer are live,
    and hidden layers past ``depth`` pass their input through unchanged.

    Attributes:
      max_depth, max_width, num_classes: the static shape.
      depth: hidden layers in use, 1..max_depth (int or traced int32).
      width: live units per hidden layer (int or traced int32).
      activation: index into ``activations`` (int or traced).
      activations: the names ``activation`` selects from.

    Parameters ``dense_i`` and ``output`` hold ``MLPClassifier``'s
    ``mlp/dense_i`` and ``mlp/output`` in their first ``width`` rows/columns;
    skipped layers and dead units get exactly zero gradients.
    Shapes: ``x: [batch, ...] -> logits [batch, num_classes]``.
    """

    max_depth: int
    max_width: int
    depth: Any
    width: Any
    activation: Any
    activations: tuple[str, ...]
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Float[Array, "batch ..."], *, train: bool = False
                 ) -> Float[Array, "batch num_classes"]:
        del train
        x = Flatten()(x)  # [B, D]
        live = (jnp.arange(self.max_width) < self.width).astype(x.dtype)  # [W]
        narrow = jnp.sqrt(self.max_width / jnp.asarray(self.width, jnp.float32))
        for i in range(self.max_depth):
            scale = 1.0 if i == 0 else narrow  # layer 0 reads the unpadded input
            h = Dense(self.max_width, kernel_init=_rescaled_lecun(scale), name=f"dense_{i}")(x)
            h = _switch_activation(self.activation, self.activations, h) * live  # [B, W]
            x = h if i == 0 else jnp.where(i < self.depth, h, x)
        return Dense(self.num_classes, kernel_init=_rescaled_lecun(narrow), name="output")(x)


class MaskedCNN(nn.Module):
    """``CNN(features=(max_width,) * depth, kernel_size=max_kernel_size,
    hidden_sizes=())`` computing like a narrower one with a smaller kernel:
    the first ``width`` channels of every block are live and only the
    central ``kernel_size x kernel_size`` taps of each kernel (odd sizes;
    with SAME padding a zero-ringed 5x5 kernel is a 3x3 one).

    Each block: conv (SAME) -> activation -> mask -> 2x2 max-pool; then
    flatten -> output Dense. Parameters ``conv_i`` and ``output`` hold
    ``CNN``'s ``block_i/conv`` and ``head/output`` in their live entries.
    Shapes: ``x: [batch, H, W, C] -> logits [batch, num_classes]``.
    """

    depth: int
    max_width: int
    max_kernel_size: int
    width: Any
    kernel_size: Any
    activation: Any
    activations: tuple[str, ...]
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Float[Array, "batch height width channels"], *, train: bool = False
                 ) -> Float[Array, "batch num_classes"]:
        del train
        k_max = self.max_kernel_size
        live = (jnp.arange(self.max_width) < self.width).astype(x.dtype)  # [W]
        near = jnp.abs(jnp.arange(k_max) - k_max // 2) <= self.kernel_size // 2  # [K]
        taps = (near[:, None] & near[None, :]).astype(x.dtype)[:, :, None, None]  # [K, K, 1, 1]
        k = jnp.asarray(self.kernel_size, jnp.float32)
        narrow = jnp.sqrt(self.max_width / jnp.asarray(self.width, jnp.float32))
        for i in range(self.depth):
            # LeCun variance 1 / (k * k * live inputs), not of the padded kernel
            scale = (k_max / k) * (1.0 if i == 0 else narrow)
            kernel = self.param(f"conv_{i}_kernel", _rescaled_lecun(scale),
                                (k_max, k_max, x.shape[-1], self.max_width))
            bias = self.param(f"conv_{i}_bias", nn.initializers.zeros, (self.max_width,))
            x = jax.lax.conv_general_dilated(
                x, kernel * taps, (1, 1), "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias  # [B, H_i, W_i, max_width]
            x = _switch_activation(self.activation, self.activations, x) * live
            x = MaxPool2D(2)(x)  # [B, H_i / 2, W_i / 2, max_width]
        x = Flatten()(x)
        return Dense(self.num_classes, kernel_init=_rescaled_lecun(narrow if self.depth else 1.0),
                     name="output")(x)


# --- one training run as one program ----------------------------------------------


def make_trainer(
    model: nn.Module | Callable[[Any], nn.Module],
    make_tx: Callable[[Any, int], optax.GradientTransformation],
    *,
    num_epochs: int,
    batch_size: int,
    loss_fn: LossFn | None = None,
) -> Callable[..., tuple[dict[str, Any], dict[str, jax.Array]]]:
    """A whole training run as one pure function, to ``jit``, ``vmap`` or ``lax.map``.

    ``train(key, hyper, train_data, eval_data, init_params=None) ->
    (variables, metrics)`` builds the model (``model(hyper)`` when ``model``
    is a function of ``hyper``), initialises it from ``key`` (or starts from
    ``init_params``), trains it for ``num_epochs`` epochs of shuffled full
    batches (each epoch's last partial batch is dropped) with ``make_tx(hyper,
    total_steps)``, and scores it on ``eval_data``.

    Epochs and steps are ``lax.scan`` loops: the run compiles once and
    dispatches once. ``hyper`` (any pytree of arrays: a target sparsity, a
    width, ...) is traced, so one compilation serves every value, and
    ``jax.vmap(train, in_axes=(0, None, None, None))`` trains one model per
    key in a single program.

    Args:
      model: a linen classifier ``(inputs, *, train) -> logits``, or
        ``hyper -> classifier``.
      make_tx: ``(hyper, total_steps) -> optax transformation``.
      num_epochs, batch_size: the schedule.
      loss_fn: as for ``make_train_step`` (default: cross-entropy).

    Data: ``{"inputs": [n, ...], "labels": [n]}`` (jax or numpy arrays).

    Returns (of ``train``): the trained ``variables`` (``{"params": ...,
    **collections}``) and ``{"accuracy": [], "train_loss": [num_epochs]}``
    (accuracy on ``eval_data``; mean training loss of each epoch).
    """
    if num_epochs < 1 or batch_size < 1:
        raise ValueError(f"make_trainer needs num_epochs >= 1 and batch_size >= 1, got "
                         f"num_epochs={num_epochs}, batch_size={batch_size}")
    step_fn = make_train_step(loss_fn)

    def train(key: jax.Array, hyper: Any, train_data: Data, eval_data: Data,
              init_params: Any = None) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        n = train_data["labels"].shape[0]
        steps_per_epoch = n // batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"make_trainer: batch_size={batch_size} is larger than the "
                             f"{n} training examples")
        init_key, shuffle_key = jax.random.split(key)
        module = model if isinstance(model, nn.Module) else model(hyper)
        tx = make_tx(hyper, num_epochs * steps_per_epoch)
        state = TrainState.create(model=module, tx=tx, key=init_key,
                                  example_input=train_data["inputs"][:1])
        if init_params is not None:  # fine-tune: start from given weights
            state = state.replace(params=init_params, opt_state=tx.init(init_params))

        def epoch(state: TrainState, epoch_key: jax.Array):
            order = jax.random.permutation(epoch_key, n)[:steps_per_epoch * batch_size]
            order = order.reshape(steps_per_epoch, batch_size)  # [steps, B]

            def step(state: TrainState, idx: jax.Array):
                batch = {"inputs": train_data["inputs"][idx], "labels": train_data["labels"][idx]}
                state, m = step_fn(state, batch)
                return state, m["loss"]

            state, losses = jax.lax.scan(step, state, order)
            return state, jnp.mean(losses)

        state, epoch_losses = jax.lax.scan(epoch, state, jax.random.split(shuffle_key, num_epochs))
        logits = state.apply_fn(state.variables, eval_data["inputs"], train=False)
        accuracy = metrics_lib.accuracy(logits, jnp.asarray(eval_data["labels"]))
        return state.variables, {"accuracy": accuracy, "train_loss": epoch_losses}

    return train


def make_evaluator(
    space: SearchSpace,
    train_data: Data,
    eval_data: Data,
    *,
    make_tx: Callable[[Any, int], optax.GradientTransformation],
    num_epochs: int,
    batch_size: int,
    num_seeds: int = 2,
    seed: int = 0,
    test_data: Data | None = None,
) -> Callable[[Architecture], dict[str, Any]]:
    """``evaluate(arch) -> metrics`` for a search on image/vector classification data.

    Trains ``num_seeds`` seeds of the candidate (masked model, one compiled
    program per (family, depth, kernel size), cached; seeds by ``vmap`` for
    MLPs, ``lax.map`` for CNNs) and returns ``{"accuracy"`` (mean over seeds
    on ``eval_data``), ``"accuracy_seeds"``, ``"flops"`` (XLA's count for one
    example through ``space.build(arch)``), ``"num_params"`` (of that real
    model) and, with ``test_data``, ``"test_accuracy"`` (mean over seeds)``}``.
    """
    from nnlib.compress.cost import flops as xla_flops
    from nnlib.compress.cost import tree_size

    num_classes = int(np.max(np.asarray(train_data["labels"]))) + 1
    programs: dict[tuple[Any, ...], Callable[..., Any]] = {}
    costs: dict[Architecture, tuple[float, int]] = {}
    example = jnp.asarray(train_data["inputs"][:1])
    keys = jax.random.split(jax.random.key(seed), num_seeds)

    def program(arch: Architecture) -> Callable[..., Any]:
        # MLPs of every depth share a program; CNNs share one per depth.
        shape = (arch.family, arch.depth if arch.family == "cnn" else None)
        if shape not in programs:
            max_width = max(space.widths[arch.family])
            if arch.family == "mlp":
                build = lambda h: MaskedMLP(  # noqa: E731
                    max(space.depths["mlp"]), max_width, h["depth"], h["width"],
                    h["activation"], space.activations, num_classes)
            else:
                build = lambda h: MaskedCNN(  # noqa: E731
                    arch.depth, max_width, max(space.kernel_sizes), h["width"],
                    h["kernel_size"], h["activation"], space.activations, num_classes)
            train = make_trainer(build, make_tx, num_epochs=num_epochs, batch_size=batch_size)

            def run(keys, hyper, train_data, eval_data, test_inputs, train=train, build=build):
                def one(key):
                    variables, m = train(key, hyper, train_data, eval_data)
                    if test_inputs is None:
                        return m["accuracy"], m["accuracy"]
                    logits = build(hyper).apply(variables, test_inputs)
                    return m["accuracy"], jnp.argmax(logits, -1)

                if arch.family == "mlp":
                    return jax.vmap(one)(keys)
                return jax.lax.map(one, keys)  # see the module docstring

            programs[shape] = jax.jit(run)
        return programs[shape]

    def evaluate(arch: Architecture) -> dict[str, Any]:
        hyper = {"depth": jnp.int32(arch.depth), "width": jnp.int32(arch.width),
                 "kernel_size": jnp.int32(arch.kernel_size or 1),
                 "activation": jnp.int32(space.activations.index(arch.activation))}
        test_inputs = None if test_data is None else test_data["inputs"]
        accs, preds = program(arch)(keys, hyper, train_data, eval_data, test_inputs)
        if arch not in costs:
            real = space.build(arch, num_classes)
            shapes = jax.eval_shape(real.init, jax.random.key(0), example)
            params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            costs[arch] = (xla_flops(real.apply, params, example), tree_size(params))
        out = {"accuracy": float(jnp.mean(accs)), "accuracy_seeds": [float(a) for a in accs],
               "flops": costs[arch][0], "num_params": costs[arch][1]}
        if test_data is not None:
            labels = np.asarray(test_data["labels"])
            out["test_accuracy"] = float(np.mean(np.asarray(preds) == labels[None]))
        return out

    return evaluate


# --- searches --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A trained architecture: its fitness (``accuracy``), ``cost`` (FLOPs),
    the order it was trained in (``index``, also its age) and the rest of
    what ``evaluate`` returned."""

    architecture: Architecture
    accuracy: float
    cost: float
    index: int
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)


Evaluate = Callable[[Architecture], Mapping[str, Any]]


def _train(evaluate: Evaluate, arch: Architecture, index: int) -> Candidate:
    result = dict(evaluate(arch))
    if "accuracy" not in result or "flops" not in result:
        raise ValueError(f"evaluate({arch}) must return 'accuracy' and 'flops', got keys "
                         f"{sorted(result)}")
    return Candidate(arch, float(result.pop("accuracy")), float(result.pop("flops")), index,
                     result)


def random_search(space: SearchSpace, evaluate: Evaluate, *, budget: int, seed: int = 0,
                  callback: Callable[[Candidate], None] | None = None) -> list[Candidate]:
    """``budget`` uniformly sampled candidates, trained in order."""
    if budget < 1:
        raise ValueError(f"random_search: budget must be >= 1, got {budget}")
    rng = np.random.default_rng(seed)
    history = []
    for i in range(budget):
        history.append(_train(evaluate, space.sample(rng), i))
        if callback:
            callback(history[-1])
    return history


def evolution_cycle(
    population: Sequence[Candidate],
    space: SearchSpace,
    evaluate: Evaluate,
    *,
    sample_size: int,
    rng: np.random.Generator,
    index: int,
) -> tuple[list[Candidate], Candidate]:
    """One cycle of regularized evolution.

    Args:
      population: oldest first.
      sample_size: tournament size S (``1 <= S <= len(population)``).
      index: the child's index (its birth order).

    Returns:
      ``(new population, child)``: the child, a mutation of the most
      accurate of S members sampled without replacement, is appended and the
      oldest member (``population[0]``) removed; the size is unchanged.
    """
    if not 1 <= sample_size <= len(population):
        raise ValueError(f"evolution_cycle: sample_size must be in [1, {len(population)}] "
                         f"(the population size), got {sample_size}")
    picks = rng.choice(len(population), size=sample_size, replace=False)
    parent = max((population[i] for i in picks), key=lambda c: c.accuracy)
    child = _train(evaluate, space.mutate(parent.architecture, rng), index)
    return [*population[1:], child], child


def regularized_evolution(
    space: SearchSpace,
    evaluate: Evaluate,
    *,
    budget: int,
    population_size: int = 10,
    sample_size: int = 3,
    seed: int = 0,
    callback: Callable[[Candidate], None] | None = None,
) -> list[Candidate]:
    """Real et al.'s aging evolution with ``budget`` trained candidates in all.

    The first ``population_size`` are random; each later one is a child
    (``evolution_cycle``). Returns every candidate trained, in order.
    """
    if not 1 <= population_size <= budget:
        raise ValueError(f"regularized_evolution: need 1 <= population_size <= budget, got "
                         f"population_size={population_size}, budget={budget}")
    rng = np.random.default_rng(seed)
    history: list[Candidate] = []
    for i in range(population_size):
        history.append(_train(evaluate, space.sample(rng), i))
        if callback:
            callback(history[-1])
    population = list(history)
    for i in range(population_size, budget):
        population, child = evolution_cycle(population, space, evaluate,
                                            sample_size=sample_size, rng=rng, index=i)
        history.append(child)
        if callback:
            callback(child)
    return history


def pareto_front(accuracy: Sequence[float], cost: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates, by increasing cost.

    ``j`` dominates ``i`` when ``accuracy[j] >= accuracy[i]`` and ``cost[j]
    <= cost[i]`` with one of them strict (higher accuracy and lower cost are
    better). Identical points do not dominate each other: both are kept.
    """
    acc, c = np.asarray(accuracy, np.float64), np.asarray(cost, np.float64)
    if acc.shape != c.shape or acc.ndim != 1:
        raise ValueError(f"pareto_front needs two 1-D sequences of one length, got shapes "
                         f"{acc.shape} and {c.shape}")
    order = np.lexsort((-acc, c))  # by cost, then best accuracy first
    front, best = [], -math.inf
    for i in order:
        # Sweep by cost: a point is on the front when it beats the best
        # accuracy of every cheaper point (or ties one of equal cost and accuracy).
        if acc[i] > best:
            front.append(int(i))
            best = acc[i]
        elif front and acc[i] == acc[front[-1]] and c[i] == c[front[-1]]:
            front.append(int(i))
    return front
