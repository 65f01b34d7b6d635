"""nnlib.train.jit / compiler_options: per-program XLA options, same results as jax.jit."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from nnlib.compress import compile_fn
from nnlib.models import CNN, MLPClassifier
from nnlib.train import TrainState, compiler_options, jit, make_optimizer, make_train_step
from nnlib.train.compile import (
    _X86_64,
    CPU_CONV_OPTIONS,
    CPU_LARGE_MATMUL_OPTIONS,
    LARGE_MATMUL_SHARE,
    LARGE_MATMUL_SIZE,
    _backend_accepts,
    has_convolution,
    large_matmul_share,
)


def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


X = jnp.ones((2, 6, 6, 3))
W = jnp.ones((3, 3, 3, 4))


def jaxpr_of(f, *args):
    return jax.jit(f).trace(*args).jaxpr


def test_has_convolution_finds_convolutions_at_any_depth():
    assert has_convolution(jaxpr_of(conv, X, W))
    in_scan = lambda x, w: lax.scan(lambda c, _: (jnp.tanh(conv(c, w[..., :3])), None), x, None,
                                    length=2)[0]
    assert has_convolution(jaxpr_of(in_scan, X, W))
    in_grad = jax.grad(lambda x, w: conv(x, w).sum(), argnums=1)
    assert has_convolution(jaxpr_of(in_grad, X, W))
    in_checkpoint = jax.checkpoint(lambda x, w: conv(x, w).sum())
    assert has_convolution(jaxpr_of(in_checkpoint, X, W))
    assert not has_convolution(jaxpr_of(lambda a, b: jnp.tanh(a @ b), jnp.ones((3, 4)),
                                        jnp.ones((4, 2))))


def test_compiler_options_only_for_cpu_convolutions(monkeypatch):
    with_conv, without = jaxpr_of(conv, X, W), jaxpr_of(lambda a: a * 2, X)
    assert compiler_options(with_conv) == CPU_CONV_OPTIONS
    assert compiler_options(without) is None
    assert compiler_options(with_conv, backend="gpu") is None
    monkeypatch.setenv("NNLIB_XLA_OPTIONS", "0")
    assert compiler_options(with_conv) is None


def test_unknown_options_are_not_used():
    assert _backend_accepts(tuple(CPU_CONV_OPTIONS.items()))
    assert not _backend_accepts((("xla_cpu_experimental_ynn_fusion_type", "NOT_A_TYPE"),))


def _computations(hlo: str) -> dict[str, str]:
    """Compiled HLO text split into ``{computation name: its text}``."""
    blocks = re.split(r"\n(?=(?:ENTRY )?%\S+ \()", hlo)
    return {re.match(r"(?:ENTRY )?%(\S+)", b.strip()).group(1): b
            for b in blocks if re.match(r"(?:ENTRY )?%", b.strip())}


def _ynn_contents(hlo: str) -> str:
    """The text of every computation that a YNNPACK fusion calls."""
    comps = _computations(hlo)
    called = re.findall(r"calls=%([\w.\-]+)[^\n]*__ynn_fusion", hlo)
    return "\n".join(comps[name] for name in called)


def test_convolutions_leave_ynnpack_and_dots_keep_it():
    """What the option does to the compiled program: no convolution inside a
    YNNPACK fusion (the slow path here); matmul programs are compiled as before.
    (YNNPACK takes convolutions from 32 channels up, hence the sizes.)"""
    x, w = jnp.ones((4, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
    step = jit(jax.grad(lambda x, w: (conv(x, w) ** 2).sum(), argnums=(0, 1)))
    hlo = step.lower(x, w).compile().as_text()
    assert step.options == CPU_CONV_OPTIONS
    assert "convolution(" in hlo and "convolution(" not in _ynn_contents(hlo)
    default_hlo = jax.jit(step.fun).lower(x, w).compile().as_text()
    if "convolution(" not in _ynn_contents(default_hlo):
        pytest.skip("this jaxlib does not send convolutions to YNNPACK by default")
    matmul = jit(lambda a, b: jnp.tanh(a @ b))
    args = jnp.ones((64, 128)), jnp.ones((128, 64))
    assert matmul.lower(*args).compile().as_text() == jax.jit(matmul.fun).lower(
        *args).compile().as_text()
    assert matmul.options is None


def test_convolution_bias_gradient_stays_a_ynnpack_reduction():
    """The bias gradient of a convolution, a sum over batch and space, is a YNNPACK
    reduction in the compiled program, not the generic reduce-window that XLA
    makes of it without YNNPACK (11x slower at the benchmark CNN's size)."""
    x, w, b = jnp.ones((128, 28, 28, 1)), jnp.ones((3, 3, 1, 32)), jnp.ones((32,))
    bias_grad = jit(jax.grad(lambda x, w, b: jnp.sum(jnp.tanh(conv(x, w) + b)), argnums=2))
    hlo = bias_grad.lower(x, w, b).compile().as_text()
    assert bias_grad.options == CPU_CONV_OPTIONS
    assert "reduce-window(" not in hlo
    assert re.search(r"reduce\(", _ynn_contents(hlo))


@pytest.mark.parametrize("model,shape", [
    (CNN(features=(4, 8), kernel_size=3, hidden_sizes=(16,), num_classes=3), (8, 8, 8, 1)),
    (MLPClassifier(hidden_sizes=(16,), num_classes=3), (8, 12)),
])
def test_jit_trains_like_jax_jit_and_compiles_once(model, shape):
    x = jax.random.normal(jax.random.key(0), shape)
    batch = {"inputs": x, "labels": jnp.arange(shape[0]) % 3}
    states = [TrainState.create(model=model, tx=make_optimizer("adamw", 1e-2),
                                key=jax.random.key(1), example_input=x[:1]) for _ in range(2)]
    traces = []

    def counted_step(state, batch):
        traces.append(1)
        return make_train_step()(state, batch)

    ours = jit(counted_step, donate_argnums=0)
    reference = jax.jit(make_train_step())
    for _ in range(3):
        states[0], m0 = ours(states[0], batch)
        states[1], m1 = reference(states[1], batch)
        np.testing.assert_allclose(m0["loss"], m1["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(states[0].params), jax.tree.leaves(states[1].params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert len(traces) == 1  # choosing the options reuses jax's trace; no retrace later
    assert ours.options == (CPU_CONV_OPTIONS if isinstance(model, CNN) else None)
    assert "train_step" in repr(ours) or "counted_step" in repr(ours)


def test_explicit_compiler_options_are_plain_jax_jit():
    f = jit(lambda a: a + 1, compiler_options={})
    assert not hasattr(f, "options") and float(f(jnp.ones(()))) == 2.0


def test_cost_report_compiles_with_the_same_choice():
    step = jax.grad(lambda x, w: (conv(x, w) ** 2).sum(), argnums=1)
    x, w = jnp.ones((4, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
    assert "convolution(" in compile_fn(step, x, w).as_text()
    assert "__ynn_fusion" not in compile_fn(step, x, w).as_text()


def test_jit_composes_with_jit_vmap_and_grad():
    f = jit(lambda x: jnp.sin(x) * 2)
    x = jnp.linspace(0.0, 1.0, 6).reshape(2, 3)
    np.testing.assert_allclose(jax.jit(lambda x: jit(lambda y: jnp.sin(y) * 2)(x) + 1)(x),
                               jnp.sin(x) * 2 + 1, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(f)(x), jnp.sin(x) * 2, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: jit(lambda y: (y ** 2).sum())(x))(x), 2 * x)


def _sds(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_large_matmul_share_counts_flops_scan_trips_and_skips_batched_products():
    big, small = LARGE_MATMUL_SIZE, 256
    # One large product [big, 8] @ [8, 16] and one small [small, 8] @ [8, 16].
    two = jax.jit(lambda a, b, w: (a @ w, b @ w)).trace(
        _sds(big, 8), _sds(small, 8), _sds(8, 16)).jaxpr
    assert large_matmul_share(two) == pytest.approx(big / (big + small))
    # A kernel's gradient (x^T @ dy over `big` rows) has the features as rows:
    # not large, so a train step's share stays near 2/3.
    kernel_grad = lambda x, dy: lax.dot_general(x, dy, (((0,), (0,)), ((), ())))
    grad_like = jax.jit(kernel_grad).trace(_sds(big, 8), _sds(big, 16)).jaxpr
    assert large_matmul_share(grad_like) == 0.0
    dense_step = jax.jit(jax.value_and_grad(lambda w, x: jnp.sum(jnp.tanh(x @ w)))).trace(
        _sds(8, 16), _sds(big, 8)).jaxpr
    assert large_matmul_share(dense_step) == pytest.approx(0.5)
    # A long contraction with few rows (a wide layer, small batch) is not large.
    wide = jax.jit(lambda x, w: x @ w).trace(_sds(small, big), _sds(big, 16)).jaxpr
    assert large_matmul_share(wide) == 0.0
    # A scan body counts once per step: 10 small products against one large.
    def looped(h, w, a):
        h = lax.scan(lambda h, _: (jnp.tanh(h @ w), None), h, None, length=10)[0]
        return h, a @ w

    scanned = jax.jit(looped).trace(_sds(small, 8), _sds(8, 8), _sds(big, 8)).jaxpr
    assert large_matmul_share(scanned) == pytest.approx(big / (big + 10 * small))
    # Batched products (attention, vmap) are not counted; none at all gives 0.
    batched = jax.jit(lambda a, b: jnp.einsum("bik,bkj->bij", a, b)).trace(
        _sds(4, big, 8), _sds(4, 8, 8)).jaxpr
    assert large_matmul_share(batched) == 0.0
    assert large_matmul_share(jaxpr_of(lambda a: a * 2, X)) == 0.0
    # Through nested jits.
    nested = jax.jit(lambda w, x: jax.jit(jnp.matmul)(x, w)).trace(
        _sds(8, 16), _sds(big, 8)).jaxpr
    assert large_matmul_share(nested) == 1.0


@pytest.mark.skipif(not _X86_64, reason="oneDNN matmuls are chosen on x86-64 only")
def test_compiler_options_choose_onednn_for_large_matmul_programs(monkeypatch):
    large = jax.jit(lambda x, w: jnp.tanh(x @ w)).trace(_sds(LARGE_MATMUL_SIZE, 32),
                                                         _sds(32, 32)).jaxpr
    small = jax.jit(lambda x, w: jnp.tanh(x @ w)).trace(_sds(64, 32), _sds(32, 32)).jaxpr
    assert large_matmul_share(large) >= LARGE_MATMUL_SHARE
    assert compiler_options(large) == CPU_LARGE_MATMUL_OPTIONS
    assert compiler_options(small) is None
    assert compiler_options(large, backend="gpu") is None
    # A convolution decides first, whatever the matmuls.
    both = jax.jit(lambda x, w, a, b: (conv(x, w), a @ b)).trace(
        X, W, _sds(LARGE_MATMUL_SIZE, 32), _sds(32, 32)).jaxpr
    assert compiler_options(both) == CPU_CONV_OPTIONS
    monkeypatch.setenv("NNLIB_XLA_OPTIONS", "0")
    assert compiler_options(large) is None


@pytest.mark.skipif(not _X86_64, reason="oneDNN matmuls are chosen on x86-64 only")
def test_large_matmuls_compile_to_onednn_and_match_jax_jit():
    """What the option does: the plain matmuls of a large-matmul program leave
    YNNPACK for oneDNN; both results agree with a float64 reference to float32
    rounding. The train step of the same layer keeps XLA's defaults (kernel
    gradients)."""
    if not _backend_accepts(tuple(sorted(CPU_LARGE_MATMUL_OPTIONS.items()))):
        pytest.skip("this jaxlib has no oneDNN matmul fusion")
    x = jax.random.normal(jax.random.key(0), (LARGE_MATMUL_SIZE, 64))
    w1 = jax.random.normal(jax.random.key(1), (64, 32))
    w2 = jax.random.normal(jax.random.key(2), (32, 8))
    forward = jit(lambda x, w1, w2: jnp.tanh(jnp.tanh(x @ w1) @ w2))
    hlo = forward.lower(x, w1, w2).compile().as_text()
    assert forward.options == CPU_LARGE_MATMUL_OPTIONS
    default_hlo = jax.jit(forward.fun).lower(x, w1, w2).compile().as_text()
    assert "%onednn_fusion" in hlo and "%onednn_fusion" not in default_hlo
    # Each library sums in its own order: on an AVX-512 Xeon the two differ by
    # up to 7e-6, each as far from the float64 result (the second product sums
    # 32 terms of size ~1 into values of size ~5, where float32 is spaced 5e-7).
    x64, w1_64, w2_64 = (np.asarray(a, np.float64) for a in (x, w1, w2))
    exact = np.tanh(np.tanh(x64 @ w1_64) @ w2_64)
    for got in (forward(x, w1, w2), jax.jit(forward.fun)(x, w1, w2)):
        np.testing.assert_allclose(got, exact, rtol=0, atol=5e-5)
    step = jit(jax.value_and_grad(lambda w1, x: jnp.sum(jnp.tanh(x @ w1) ** 2)))
    step(w1, x)
    assert step.options is None


@pytest.mark.skipif(not _X86_64, reason="oneDNN matmuls are chosen on x86-64 only")
def test_large_matmul_gpt_forward_matches_jax_jit():
    """A GPT forward over 2048 tokens (oneDNN matmuls) gives jax.jit's (YNNPACK)
    logits to float32 rounding; its train step keeps XLA's defaults."""
    if not _backend_accepts(tuple(sorted(CPU_LARGE_MATMUL_OPTIONS.items()))):
        pytest.skip("this jaxlib has no oneDNN matmul fusion")
    from nnlib.models import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=16, context_length=64, num_layers=1, num_heads=2,
                          embed_dim=32))
    tokens = jax.random.randint(jax.random.key(0), (LARGE_MATMUL_SIZE // 64, 64), 0, 16)
    variables = model.init(jax.random.key(1), tokens[:1])
    forward = jit(model.apply)
    np.testing.assert_allclose(forward(variables, tokens),
                               jax.jit(model.apply)(variables, tokens), rtol=1e-4, atol=1e-5)
    assert forward.options == CPU_LARGE_MATMUL_OPTIONS
    state = TrainState.create(model=model, tx=make_optimizer("adamw", 1e-2),
                              key=jax.random.key(1), example_input=tokens[:1])
    step = jit(make_train_step())
    step(state, {"inputs": tokens, "labels": jnp.roll(tokens, -1, axis=1)})
    assert step.options is None


def test_jit_inside_other_transformations_takes_no_options():
    """Called inside jax.jit/vmap/grad, nnlib.train.jit is plain jax.jit (JAX takes
    compiler options on top-level jits only) and leaves the choice for later
    top-level calls intact."""
    x, w = jnp.ones((LARGE_MATMUL_SIZE, 8)), jnp.full((8, 4), 0.5)
    conv_grad = jit(lambda x, w: jnp.sum(conv(x, w) ** 2))
    matmul = jit(lambda x, w: jnp.tanh(x @ w).sum())
    ref = jnp.tanh(x @ w).sum()

    def call_inside_transformations():
        np.testing.assert_allclose(jax.jit(lambda x, w: matmul(x, w) + 1)(x, w), ref + 1,
                                   rtol=1e-4)
        np.testing.assert_allclose(jax.grad(matmul, argnums=1)(x, w),
                                   jax.grad(lambda w: jnp.tanh(x @ w).sum())(w), rtol=1e-4)
        np.testing.assert_allclose(jax.vmap(matmul, in_axes=(None, 0))(x, jnp.stack([w, w])),
                                   jnp.stack([ref, ref]), rtol=1e-4)
        jax.jit(jax.grad(conv_grad, argnums=1))(X, W)

    call_inside_transformations()
    assert matmul.options is None and conv_grad.options is None
    np.testing.assert_allclose(matmul(x, w), ref, rtol=1e-4)
    conv_grad(X, W)
    assert conv_grad.options == CPU_CONV_OPTIONS
    if _X86_64:
        assert matmul.options == CPU_LARGE_MATMUL_OPTIONS
    # Once chosen, calls inside other transformations still work.
    call_inside_transformations()
