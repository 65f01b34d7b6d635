"""nnlib.compress.cost against closed forms: FLOPs of a Dense layer and a
convolution, byte counts, the energy formula, Adam's state size."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nnlib.compress import (
    cost_analysis,
    cost_report,
    energy_estimate,
    flops,
    format_cost,
    time_fn,
    tree_bytes,
    tree_size,
)
from nnlib.layers import Conv2D, Dense
from nnlib.models import MLPClassifier
from nnlib.train import TrainState, make_train_step


@pytest.mark.parametrize("batch,fan_in,fan_out", [(1, 3, 5), (8, 16, 4), (32, 64, 10)])
def test_dense_flops_are_two_in_out_batch(batch, fan_in, fan_out):
    layer = Dense(fan_out, use_bias=False)
    x = jnp.ones((batch, fan_in))
    params = layer.init(jax.random.key(0), x)
    assert flops(layer.apply, params, x) == 2 * fan_in * fan_out * batch
    assert flops(layer.apply, params, x, compiled=True) == 2 * fan_in * fan_out * batch


def test_flops_count_the_math_of_a_native_product_traced_before():
    """A 4-output head runs as a native call on the CPU, which XLA counts as no
    work; ``flops`` traces the math instead, also for a function jitted and
    run with the kernel before (JAX would otherwise reuse that trace)."""
    layer = Dense(4, use_bias=False)
    x = jnp.ones((8, 16))
    params = layer.init(jax.random.key(0), x)
    applied = jax.jit(layer.apply)
    applied(params, x)
    want = 2 * 16 * 4 * 8
    assert flops(applied, params, x) == want == flops(applied, params, x, compiled=True)
    report = cost_report(applied, params, x, time_it=False)
    assert report["cost_flops_per_step"] == want


def test_conv_flops_valid_padding():
    """XLA counts a convolution as a multiply and an add per tap and output;
    the CPU's shifted products for few channels (``Conv2D``'s default here)
    as what they compute: the first tap's product is not added to anything."""
    b, h, w, c, f, k = 2, 8, 8, 3, 4, 3
    x = jnp.ones((b, h, w, c))
    outputs, taps = b * (h - k + 1) * (w - k + 1) * f, k * k * c
    for native, per_output in ((False, 2 * taps), (True, 2 * taps - 1)):
        layer = Conv2D(f, kernel_size=k, padding="VALID", use_bias=False, native=native)
        params = layer.init(jax.random.key(0), x)
        assert flops(layer.apply, params, x) == per_output * outputs


def test_loop_body_counts_once_as_documented():
    w, x = jnp.ones((16, 16)), jnp.ones((8, 16))

    def scanned(x, w, unroll):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=10, unroll=unroll)[0]

    one = 2 * 8 * 16 * 16
    rolled = cost_analysis(lambda x, w: scanned(x, w, 1), x, w)["flops"]
    unrolled = cost_analysis(lambda x, w: scanned(x, w, True), x, w)["flops"]
    assert one <= rolled < 2 * one  # body once (+ the loop counter)
    assert unrolled == 10 * one


def test_bytes_accessed_of_a_matmul():
    x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
    # reads x and w, writes the [8, 4] result, float32
    assert cost_analysis(lambda x, w: x @ w, x, w)["bytes_accessed"] == 4 * (8 * 16 + 16 * 4 + 8 * 4)


def test_tree_bytes_and_size():
    tree = {"a": np.zeros((3, 4), np.float32), "b": [np.zeros(5, np.int8), jnp.zeros(2, jnp.bfloat16)]}
    assert tree_size(tree) == 12 + 5 + 2
    assert tree_bytes(tree) == 12 * 4 + 5 * 1 + 2 * 2


def test_energy_closed_form():
    e = energy_estimate(3600.0, device_power_w=100.0, utilization=0.5, pue=1.5,
                        grid_gco2_per_kwh=400.0)
    assert e["energy_kwh"] == pytest.approx(100 * 0.5 * 1.5 / 1000)  # 0.075 kWh
    assert e["co2_g"] == pytest.approx(0.075 * 400)
    assert e["device_power_w"] == 100.0 and e["pue"] == 1.5


def test_energy_rejects_impossible_pue():
    with pytest.raises(ValueError, match="PUE"):
        energy_estimate(1.0, device_power_w=10.0, pue=0.9)


def test_time_fn_counts_repeats_and_is_ordered():
    t = time_fn(jax.jit(lambda x: x + 1), jnp.ones(3), repeats=5, warmup=1)
    assert t["repeats"] == 5 and 0 < t["min_s"] <= t["median_s"] <= t["p90_s"]


def test_cost_report_on_a_train_step():
    model = MLPClassifier(hidden_sizes=(8,), num_classes=3)
    x = jnp.ones((4, 5))
    state = TrainState.create(model=model, tx=optax.adam(1e-3), key=jax.random.key(0),
                              example_input=x)
    batch = {"inputs": x, "labels": jnp.zeros((4,), jnp.int32)}
    report = cost_report(jax.jit(make_train_step()), state, batch, num_steps=100, repeats=3,
                         device_power_w=50.0, pue=1.2, grid_gco2_per_kwh=300.0)
    n = 5 * 8 + 8 + 8 * 3 + 3
    assert report["cost_num_params"] == n
    assert report["cost_param_bytes"] == 4 * n
    # Adam keeps two moments per parameter and an int32 step count.
    assert report["cost_opt_state_bytes"] == 2 * 4 * n + 4
    # The forward's matmuls alone are 2 * 4 * (5 * 8 + 8 * 3); backward adds more.
    assert report["cost_flops_per_step"] > 2 * 4 * (5 * 8 + 8 * 3)
    t = report["cost_step_time_s"]
    assert report["cost_energy_kwh"] == pytest.approx(50.0 * 1.2 * t * 100 / 3.6e6)
    assert report["cost_co2_g"] == pytest.approx(report["cost_energy_kwh"] * 300.0)
    assert all(k.startswith("cost_") for k in report)
    text = format_cost(report)
    assert "FLOPs / step" in text and "100 step(s)" in text and "50 W" in text


def test_cost_report_of_a_donating_step_can_repeat():
    step = jax.jit(lambda x: x * 2, donate_argnums=0)
    report = cost_report(step, jnp.ones(16), repeats=3)
    assert report["cost_flops_per_step"] == 16
