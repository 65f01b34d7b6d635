"""nnlib.search: masked models against the narrow nnlib models they stand for,
evolution's population bookkeeping, and the Pareto front against brute force."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nnlib.search import (
    Architecture,
    Candidate,
    MaskedCNN,
    MaskedMLP,
    SearchSpace,
    evolution_cycle,
    make_evaluator,
    make_trainer,
    pareto_front,
    random_search,
    regularized_evolution,
)

ACTS = ("relu", "tanh", "gelu", "silu")


@pytest.mark.parametrize("depth", [1, 2])
def test_masked_mlp_computes_and_trains_like_the_narrow_mlp(depth):
    from nnlib.models import MLPClassifier

    width, max_width = 5, 12
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 1))
    masked = MaskedMLP(3, max_width, depth, width, 1, ACTS, num_classes=3)  # tanh
    mp = masked.init(jax.random.key(1), x)["params"]
    narrow = {"dense_0": {"kernel": mp["dense_0"]["kernel"][:, :width],
                          "bias": mp["dense_0"]["bias"][:width]},
              "output": {"kernel": mp["output"]["kernel"][:width],
                         "bias": mp["output"]["bias"]}}
    if depth == 2:
        narrow["dense_1"] = {"kernel": mp["dense_1"]["kernel"][:width, :width],
                             "bias": mp["dense_1"]["bias"][:width]}
    reference = MLPClassifier(hidden_sizes=(width,) * depth, num_classes=3, activation="tanh")
    apply = jax.jit(lambda p: masked.apply({"params": p}, x))
    np.testing.assert_allclose(apply(mp), reference.apply({"params": {"mlp": narrow}}, x),
                               rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(p) ** 2)))(mp)
    assert (grads["dense_0"]["kernel"][:, width:] == 0).all()
    assert (grads["output"]["kernel"][width:] == 0).all()
    assert (grads["dense_2"]["kernel"] == 0).all()  # past the depth: skipped
    if depth == 2:
        assert (grads["dense_1"]["kernel"][width:] == 0).all()
        assert (grads["dense_1"]["kernel"][:, width:] == 0).all()
        assert (grads["dense_1"]["kernel"][:width, :width] != 0).any()
    else:
        assert (grads["dense_1"]["kernel"] == 0).all()


def test_masked_cnn_computes_like_the_narrow_cnn():
    from nnlib.models import CNN

    width, max_width, k, k_max = 3, 8, 3, 5
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    masked = MaskedCNN(2, max_width, k_max, width, k, 0, ACTS, num_classes=4)
    mp = masked.init(jax.random.key(1), x)["params"]
    centre = slice(1, 4)  # the 3x3 centre of the 5x5 kernel
    # flatten order is (h, w, channel): keep the live channels of each position
    out_k = mp["output"]["kernel"].reshape(2, 2, max_width, 4)[:, :, :width].reshape(-1, 4)
    narrow = {"block_0": {"conv": {"kernel": mp["conv_0_kernel"][centre, centre, :, :width],
                                   "bias": mp["conv_0_bias"][:width]}},
              "block_1": {"conv": {"kernel": mp["conv_1_kernel"][centre, centre, :width, :width],
                                   "bias": mp["conv_1_bias"][:width]}},
              "head": {"output": {"kernel": out_k, "bias": mp["output"]["bias"]}}}
    reference = CNN(features=(width, width), kernel_size=k, hidden_sizes=(), num_classes=4)
    np.testing.assert_allclose(jax.jit(masked.apply)({"params": mp}, x),
                               reference.apply({"params": narrow}, x), rtol=1e-5, atol=1e-5)


def test_masked_init_has_the_narrow_lecun_variance():
    width, max_width = 64, 512
    mp = MaskedMLP(2, max_width, 2, width, 0, ACTS).init(jax.random.key(2), jnp.ones((1, 8)))
    live = np.asarray(mp["params"]["dense_1"]["kernel"][:width, :width])
    assert np.std(live) == pytest.approx(1 / np.sqrt(width), rel=0.05)
    cnn = MaskedCNN(1, 16, 5, 16, 3, 0, ACTS).init(jax.random.key(3), jnp.ones((1, 8, 8, 4)))
    taps = np.asarray(cnn["params"]["conv_0_kernel"][1:4, 1:4])  # fan-in 3 * 3 * 4
    assert np.std(taps) == pytest.approx(1 / np.sqrt(36), rel=0.1)


def test_search_space_sample_mutate_and_size():
    space = SearchSpace()
    archs = space.architectures()
    assert len(archs) == 3 * 5 * 4 + 2 * 3 * 4 * 2 == len(set(archs))
    rng = np.random.default_rng(0)
    for _ in range(200):
        arch = space.sample(rng)
        assert arch in archs
        child = space.mutate(arch, rng)
        assert child in archs and child != arch
        changed = [f.name for f in dataclasses.fields(arch)
                   if getattr(arch, f.name) != getattr(child, f.name)]
        assert len(changed) == 1 or "family" in changed


def _fake_evaluate(arch):
    # deterministic fitness: wider and deeper is better, FLOPs grow with width
    return {"accuracy": arch.width / 256 + arch.depth / 100, "flops": float(arch.width * arch.depth)}


def test_evolution_cycle_keeps_size_removes_oldest_mutates_best():
    space = SearchSpace()
    rng = np.random.default_rng(1)
    population = [Candidate(space.sample(rng), float(i) / 10, 1.0, i) for i in range(6)]
    best = max(population, key=lambda c: c.accuracy)
    new, child = evolution_cycle(population, space, _fake_evaluate, sample_size=6, rng=rng,
                                 index=6)
    assert len(new) == len(population)
    assert new[:-1] == population[1:] and new[-1] is child  # the oldest left, the child joined
    assert child.index == 6 and child.architecture != best.architecture
    differs = [f.name for f in dataclasses.fields(Architecture)
               if getattr(child.architecture, f.name) != getattr(best.architecture, f.name)]
    assert len(differs) == 1 or "family" in differs  # a one-step mutation of the best


def test_regularized_evolution_budget_and_lineage():
    space = SearchSpace()
    history = regularized_evolution(space, _fake_evaluate, budget=30, population_size=8,
                                    sample_size=3, seed=3)
    assert [c.index for c in history] == list(range(30))
    # every child is one mutation away from a member of the population it was born into
    for i in range(8, 30):
        population = history[i - 8:i]  # aging: exactly the 8 most recent
        parents = [p for p in population
                   if history[i].architecture in _neighbours(space, p.architecture)]
        assert parents
    assert history == regularized_evolution(space, _fake_evaluate, budget=30, population_size=8,
                                            sample_size=3, seed=3)
    assert max(c.accuracy for c in history[8:]) >= max(c.accuracy for c in history[:8])


def _neighbours(space, arch):
    rng = np.random.default_rng(0)
    return {space.mutate(arch, rng) for _ in range(400)}


def test_random_search_budget_and_seed():
    space = SearchSpace()
    a = random_search(space, _fake_evaluate, budget=12, seed=5)
    b = random_search(space, _fake_evaluate, budget=12, seed=5)
    assert len(a) == 12 and a == b
    assert all(c.cost == c.architecture.width * c.architecture.depth for c in a)


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 40
    acc = rng.integers(0, 8, n) / 8  # many ties on purpose
    cost = rng.integers(0, 10, n).astype(float)
    brute = {i for i in range(n)
             if not any(acc[j] >= acc[i] and cost[j] <= cost[i]
                        and (acc[j] > acc[i] or cost[j] < cost[i]) for j in range(n))}
    front = pareto_front(acc, cost)
    assert set(front) == brute and len(front) == len(brute)
    assert list(cost[front]) == sorted(cost[front])


def test_make_trainer_vmap_over_seeds_equals_separate_runs():
    from nnlib.models import MLPClassifier

    rng = np.random.default_rng(0)
    data = {"inputs": jnp.asarray(rng.normal(size=(40, 6)), jnp.float32),
            "labels": jnp.asarray(rng.integers(0, 3, 40), jnp.int32)}
    train = make_trainer(MLPClassifier(hidden_sizes=(8,), num_classes=3),
                         lambda hyper, total: optax.adam(hyper), num_epochs=2, batch_size=16)
    keys = jax.random.split(jax.random.key(0), 2)
    lr = jnp.float32(0.01)
    both, m = jax.jit(jax.vmap(train, in_axes=(0, None, None, None)))(keys, lr, data, data)
    one, m1 = jax.jit(train)(keys[1], lr, data, data)
    np.testing.assert_allclose(both["params"]["mlp"]["output"]["kernel"][1],
                               one["params"]["mlp"]["output"]["kernel"], rtol=1e-5, atol=1e-6)
    assert m["train_loss"].shape == (2, 2) and float(m["accuracy"][1]) == float(m1["accuracy"])


def test_evaluator_on_tiny_data_reports_real_flops():
    rng = np.random.default_rng(1)
    data = {"inputs": jnp.asarray(rng.normal(size=(48, 4, 4, 1)), jnp.float32),
            "labels": jnp.asarray(rng.integers(0, 3, 48), jnp.int32)}
    space = SearchSpace(depths={"mlp": (1,), "cnn": (1,)}, widths={"mlp": (4, 8), "cnn": (2,)},
                        activations=("relu", "tanh"), kernel_sizes=(3,))
    evaluate = make_evaluator(space, data, data, make_tx=lambda h, t: optax.adam(1e-2),
                              num_epochs=1, batch_size=16, num_seeds=2, test_data=data)
    for width in (4, 8):
        out = evaluate(Architecture("mlp", 1, width, "tanh"))
        matmuls = 2 * (16 * width + width * 3)
        assert matmuls <= out["flops"] < matmuls + 10 * (width + 3)
        assert out["num_params"] == 16 * width + width + width * 3 + 3
        assert len(out["accuracy_seeds"]) == 2 and 0 <= out["test_accuracy"] <= 1
    cnn = evaluate(Architecture("cnn", 1, 2, "relu", 3))  # seeds through lax.map
    conv = 2 * 4 * 4 * 2 * 9  # SAME 3x3 conv, 1 -> 2 channels, over 4x4 (the edge taps count less)
    assert 2 * 2 * 2 * 2 * 3 + conv / 2 < cnn["flops"] < 2 * (2 * 2 * 2 * 3 + conv)
    assert cnn["num_params"] == 9 * 2 + 2 + 8 * 3 + 3
