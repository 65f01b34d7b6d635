"""nnlib.compress.pruning against numpy and scipy: exact mask fractions, the
Zhu & Gupta formula, weights that stay exactly zero through optax steps,
whole-channel removal, and sparse storage sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.sparse

from nnlib.compress import (
    apply_masks,
    keep_masked,
    layer_sparsity,
    polynomial_sparsity,
    prune,
    pruning_masks,
    sparsity,
    storage_bytes,
)
from nnlib.compress import channel_masks as _channel_masks
from nnlib.compress import magnitude_masks as _magnitude_masks

# jit: one compiled program per call site instead of hundreds of eager ops.
magnitude_masks = jax.jit(_magnitude_masks, static_argnames=("scope", "prunable"))
channel_masks = jax.jit(_channel_masks, static_argnames=("prunable",))


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "dense_0": {"kernel": jnp.asarray(rng.normal(size=(12, 20)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=20), jnp.float32)},
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 8)), jnp.float32),
                 "bias": jnp.asarray(rng.normal(size=8), jnp.float32)},
        "output": {"kernel": jnp.asarray(rng.normal(size=(20, 5)), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=5), jnp.float32)},
    }


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_layer_masks_prune_exactly_the_smallest(s):
    params = _params()
    masks = magnitude_masks(params, s, scope="layer")
    for name in params:
        w, m = np.abs(np.asarray(params[name]["kernel"])), np.asarray(masks[name]["kernel"])
        assert (~m).sum() == round(s * w.size)
        if 0 < (~m).sum() < w.size:
            assert w[~m].max() <= w[m].min()
        assert np.asarray(masks[name]["bias"]).all()  # biases are not pruned


@pytest.mark.parametrize("s", [0.25, 0.8])
def test_global_masks_prune_exact_total_below_one_threshold(s):
    params = _params(1)
    params["conv"]["kernel"] = 0.3 * params["conv"]["kernel"]  # a layer of smaller weights
    masks = magnitude_masks(params, s, scope="global")
    w = np.concatenate([np.abs(np.asarray(params[n]["kernel"])).ravel() for n in params])
    m = np.concatenate([np.asarray(masks[n]["kernel"]).ravel() for n in params])
    assert (~m).sum() == round(s * w.size)
    assert w[~m].max() <= w[m].min()
    fractions = [1 - np.asarray(masks[n]["kernel"]).mean() for n in params]
    assert fractions[1] > max(fractions[0], fractions[2]) + 0.1  # the small layer loses more


def test_masks_with_traced_sparsity_match_python_sparsity():
    params = _params(2)
    for scope in ("layer", "global"):
        static = jax.jit(_magnitude_masks, static_argnames=("sparsity", "scope"))
        eager = static(params, sparsity=0.6, scope=scope)  # Python count
        traced = magnitude_masks(params, jnp.float32(0.6), scope=scope)
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), eager, traced))


def test_polynomial_schedule_matches_the_formula():
    s_i, s_f, t0, t1, dt = 0.1, 0.9, 10, 110, 20
    schedule = polynomial_sparsity(s_f, t0, t1, initial_sparsity=s_i, frequency=dt)
    for t in [0, 5, 10, 15, 29, 30, 50, 95, 109, 110, 200]:
        tq = min(max(t, t0), t1)
        tq = t0 + ((tq - t0) // dt) * dt
        expected = s_f + (s_i - s_f) * (1 - (tq - t0) / (t1 - t0)) ** 3
        assert float(schedule(t)) == pytest.approx(expected, abs=1e-6), t



def test_polynomial_schedule_reaches_the_target_after_an_unaligned_end():
    # t1 - t0 = 10 is not a multiple of frequency 3: the grid stops at 9, but the
    # docstring promises s_f after t1.
    schedule = polynomial_sparsity(0.9, 0, 10, frequency=3)
    assert float(schedule(9)) == pytest.approx(0.9 - 0.9 * 0.1**3, abs=1e-6)
    for t in (11, 12, 100):
        assert float(schedule(t)) == pytest.approx(0.9, abs=1e-7), t

def test_prune_keeps_pruned_weights_exactly_zero_through_adamw():
    params = _params(3)
    schedule = polynomial_sparsity(0.8, 0, 8, frequency=2)
    tx = optax.chain(optax.adamw(0.05, weight_decay=0.1), prune(schedule, update_every=2,
                                                                  end_step=8))
    state = tx.init(params)
    key = jax.random.key(0)

    @jax.jit
    def step(params, state, key):
        grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)  # dense noise
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    previous = None
    for t in range(14):
        params, state = step(params, state, jax.random.fold_in(key, t))
        masks = pruning_masks(state)
        zeros = {n: np.asarray(params[n]["kernel"]) == 0 for n in params}
        for n in params:
            m = np.asarray(masks[n]["kernel"])
            assert (zeros[n] == ~m).all()  # pruned <=> exactly zero (noise never hits 0)
            assert (~m).sum() == round(float(schedule(2 * (t // 2))) * m.size)
            if previous is not None:
                assert (zeros[n] | previous[n]).all()  # once pruned, stays pruned
        previous = {n: np.asarray(masks[n]["kernel"]) for n in params}
    assert sparsity(params) == pytest.approx(0.8, abs=0.005)
    assert all(v == pytest.approx(0.8, abs=0.01) for v in layer_sparsity(params).values())


def test_prune_requires_params():
    tx = prune(0.5)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update({"w": jnp.ones((2, 2))}, tx.init({"w": jnp.ones((2, 2))}))


def test_channel_masks_remove_whole_lowest_l1_channels():
    params = _params(4)
    not_output = lambda path, x: x.ndim >= 2 and "output" not in path  # noqa: E731
    masks = channel_masks(params, 0.25, prunable=not_output)
    for name, n_out in (("dense_0", 20), ("conv", 8)):
        w = np.asarray(params[name]["kernel"])
        m = np.asarray(masks[name]["kernel"])
        keep = m.reshape(-1, n_out)
        assert (keep == keep[:1]).all()  # a column is all kept or all pruned
        pruned = np.where(~keep[0])[0]
        norms = np.abs(w).reshape(-1, n_out).sum(0)
        assert len(pruned) == round(0.25 * n_out)
        assert set(pruned) == set(np.argsort(norms)[:len(pruned)])
        assert (np.asarray(masks[name]["bias"]) == keep[0]).all()
    assert np.asarray(masks["output"]["kernel"]).all()
    pruned_params = apply_masks(params, masks)
    x = jnp.ones((3, 12))
    hidden = jax.nn.relu(x @ pruned_params["dense_0"]["kernel"] + pruned_params["dense_0"]["bias"])
    dead = ~np.asarray(masks["dense_0"]["bias"])
    assert (np.asarray(hidden)[:, dead] == 0).all()


def test_keep_masked_fine_tuning_stays_sparse():
    params = _params(5)
    masks = magnitude_masks(params, 0.7)
    params = apply_masks(params, masks)
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), keep_masked(masks))
    state = tx.init(params)

    @jax.jit
    def step(params, state, t):
        grads = jax.tree.map(lambda p: jnp.full(p.shape, 1.0 + t), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(3):
        params, state = step(params, state, t)
    assert sparsity(params) == pytest.approx(0.7, abs=0.005)


def test_storage_bytes_match_scipy_with_int32_indices():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(30, 17)).astype(np.float32)
    w[rng.random(w.shape) < 0.85] = 0
    b = np.ones(17, np.float32)
    sizes = storage_bytes({"k": w, "b": b}, index_bytes=4)
    csr, coo = scipy.sparse.csr_matrix(w), scipy.sparse.coo_matrix(w)
    assert csr.indices.dtype == np.int32 and coo.row.dtype == np.int32
    dense_b = b.nbytes
    assert sizes["dense"] == w.nbytes + dense_b
    assert sizes["csr"] == csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes + dense_b
    assert sizes["coo"] == coo.data.nbytes + coo.row.nbytes + coo.col.nbytes + dense_b
    assert sizes["bitmask"] == int(np.ceil(w.size / 8)) + csr.data.nbytes + dense_b
    assert sizes["nonzeros"] == np.count_nonzero(w) + 17
    smallest = storage_bytes({"k": w})  # 30 rows, 17 columns: uint8 indices
    assert smallest["coo"] == np.count_nonzero(w) * (4 + 1 + 1)


def test_masks_exact_under_ties_prune_in_index_order():
    w = jnp.asarray([[0.0, 0.5, 0.0, 0.5], [0.5, 0.0, 2.0, 0.5]])  # three zeros, four 0.5s
    m = np.asarray(magnitude_masks({"k": w}, 5 / 8)["k"]).ravel()
    # the 3 zeros, then the first two 0.5s in row-major order
    assert m.tolist() == [False, False, False, False, True, False, True, True]
