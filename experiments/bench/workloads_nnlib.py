"""The benchmark workloads in nnlib: models from ``nnlib.models``, the library's
own train step, jitted as ``nnlib.train.fit`` jits it.

Training workloads are ``nnlib.train.jit(make_train_step(), donate_argnums=0)``
(``jax.jit`` with the XLA options nnlib picks for the program) on a
``TrainState`` with ``make_optimizer("adamw", ...)`` — exactly the step
``nnlib.train.fit`` runs, including what it does besides the update (accuracy,
the global gradient norm, the non-finite guard that keeps the old state on
NaN). Inference is ``nnlib.train.jit(model.apply)`` on ``nnlib.models.bert.Bert``
(the same options choice: its matmuls are large, so oneDNN takes them);
generation is
``nnlib.models.generate`` (KV cache, the whole loop one jitted program).

Each builder returns a ``runner.Runner``. Its ``compile_s`` is the wall time of
the first call (trace + compile + one run); its FLOPs come from XLA's cost
analysis of the compiled step, traced with nnlib's native kernels off (the
same math; XLA cannot count inside a native call) — except where a
``scan``/``fori_loop`` hides the work, since XLA counts a loop body once, not
once per iteration (see each builder).

The sizes come from ``runner.SPECS``; the arrays (numpy, shared with the
PyTorch build) from ``runner.make_data``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.runner import OPTIMIZER, SPECS, Runner, timed_call
from nnlib.layers._native import turned_off
from nnlib.models import CNN, GPT, GPTConfig, MLPClassifier, RNNClassifier, generate
from nnlib.models.bert import Bert, BertConfig
from nnlib.train import TrainState, make_optimizer, make_train_step, num_params
from nnlib.train import jit as train_jit


def xla_flops(jitted: Callable[..., Any], *args: Any) -> float | None:
    """FLOPs of one call of ``jitted`` on ``args``, from XLA's cost analysis.

    Lowering again after the first call hits JAX's compilation cache, so this
    costs no second compile.
    """
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per device
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None else None


def xla_flops_of_the_math(make_step: Callable[[], Any], *args: Any) -> float | None:
    """FLOPs of ``make_step()``'s program traced with nnlib's native kernels
    off (``nnlib.layers._native.turned_off``): the same math as XLA programs,
    which its cost analysis counts; it cannot see inside a native call (the
    GPT's attention, the CNN's kernel gradients). Lowered and compiled, never run."""
    with turned_off():
        return xla_flops(train_jit(make_step()), *args)


def optimizer() -> Any:
    """AdamW with the shared hyperparameters (decay on ndim >= 2 only)."""
    o = OPTIMIZER
    return make_optimizer("adamw", o["learning_rate"], b1=o["b1"], b2=o["b2"], eps=o["eps"],
                          weight_decay=o["weight_decay"])


def _train_runner(
    name: str, model: nn.Module, data: dict[str, np.ndarray], *, flops: float | None = None,
    flops_source: str | None = None, notes: str = "",
) -> Runner:
    """Runner for one jitted, donating train step on a fixed batch."""
    batch = {"inputs": jnp.asarray(data["inputs"]), "labels": jnp.asarray(data["labels"])}
    state = TrainState.create(model=model, tx=optimizer(), key=jax.random.key(0),
                              example_input=batch["inputs"][:1])
    train_step = train_jit(make_train_step(), donate_argnums=0)
    holder = {"state": state}

    def step() -> None:
        # The old state is donated (its buffers reused), so only the new one is kept.
        holder["state"], _ = train_step(holder["state"], batch)

    def sync() -> None:
        jax.block_until_ready(holder["state"])

    _, compile_s = timed_call(lambda: (step(), sync()))
    if flops is None:
        flops = xla_flops_of_the_math(make_train_step, holder["state"], batch)
        flops_source = "XLA cost analysis of the step traced without native kernels"
    return Runner(name, "nnlib", step, sync, num_params(holder["state"].params),
                  items_per_step=int(batch["inputs"].shape[0]), compile_s=compile_s,
                  flops_per_step=flops, flops_source=flops_source, notes=notes,
                  handle=holder)


def gpt_config(spec: dict[str, Any]) -> GPTConfig:
    """The benchmark GPT (nanoGPT's layout: tied embeddings, biases, GELU-tanh)."""
    return GPTConfig(vocab_size=spec["vocab"], context_length=spec["context"],
                     num_layers=spec["layers"], num_heads=spec["heads"],
                     embed_dim=spec["width"], dropout_rate=0.0)


def lstm_train_flops(spec: dict[str, Any]) -> float:
    """Matmul FLOPs of one LSTM training step: 3 x forward (backward ~ 2 x forward).

    Forward: the input projection ``[B*T, F] @ [F, 4H]``, the recurrent one
    ``[B, H] @ [H, 4H]`` at each of T steps, the head ``[B, H] @ [H, C]``.
    """
    b, t, f, h, c = spec["batch"], spec["time"], spec["inputs"], spec["hidden"], spec["classes"]
    forward = 2 * b * t * (f + h) * 4 * h + 2 * b * h * c
    return 3.0 * forward


def build_lstm(name: str, spec: dict[str, Any], data: dict[str, np.ndarray]) -> Runner:
    # XLA's cost analysis counts the scan body once instead of T times (it
    # reports ~0.33 GFLOP for this step, about a tenth of the real work), so
    # the LSTM uses the analytic count.
    return _train_runner(name, make_model(name, spec), data, flops=lstm_train_flops(spec),
                         flops_source="analytic (3 x forward matmuls; XLA counts a "
                                      "scan body once)")


def bert_config(spec: dict[str, Any]) -> BertConfig:
    """``BertConfig.minilm_l6()``'s model at the spec's sizes, without dropout
    (inference): post-LN, erf GELU, LayerNorm epsilon 1e-12, with the pooler."""
    return BertConfig(vocab_size=spec["vocab"], hidden_size=spec["width"],
                      num_layers=spec["layers"], num_heads=spec["heads"],
                      intermediate_size=spec["intermediate"],
                      max_position_embeddings=spec["max_positions"],
                      dropout_rate=0.0, attention_dropout_rate=0.0)


def make_model(name: str, spec: dict[str, Any]) -> nn.Module:
    """The flax module of workload ``name`` at the sizes in ``spec``."""
    if name == "mlp":
        return MLPClassifier(hidden_sizes=tuple(spec["hidden"]), num_classes=spec["classes"])
    if name == "cnn":
        return CNN(features=tuple(spec["features"]), kernel_size=3,
                   hidden_sizes=(spec["dense"],), num_classes=spec["classes"])
    if name == "lstm":
        return RNNClassifier(num_classes=spec["classes"], hidden_size=spec["hidden"],
                             cell="lstm")
    if name.startswith("gpt"):
        return GPT(gpt_config(spec))
    if name == "minilm_infer":
        return Bert(bert_config(spec))
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(SPECS)}")


def build_train(name: str, spec: dict[str, Any], data: dict[str, np.ndarray]) -> Runner:
    return _train_runner(name, make_model(name, spec), data)


def build_minilm(name: str, spec: dict[str, Any], data: dict[str, np.ndarray]) -> Runner:
    model = make_model(name, spec)
    tokens = jnp.asarray(data["inputs"])
    variables = model.init(jax.random.key(0), tokens[:1])
    forward = train_jit(model.apply)
    holder: dict[str, Any] = {}

    def step() -> None:
        holder.pop("out", None)  # as PyTorch's runner, keep no result across calls
        holder["out"] = forward(variables, tokens)

    def sync() -> None:
        jax.block_until_ready(holder["out"])

    _, compile_s = timed_call(lambda: (step(), sync()))
    return Runner(name, "nnlib", step, sync, num_params(variables["params"]),
                  items_per_step=int(tokens.shape[0]), compile_s=compile_s,
                  flops_per_step=xla_flops(forward, variables, tokens),
                  flops_source="XLA cost analysis",
                  notes="nnlib.models.bert.Bert (post-LN, pooler), no attention_mask",
                  handle=holder)


def build_generate(name: str, spec: dict[str, Any], data: dict[str, np.ndarray]) -> Runner:
    model = make_model(name, spec)
    prompt = jnp.asarray(data["prompt"])
    batch, prompt_len = prompt.shape
    new = spec["new_tokens"]
    variables = model.init(jax.random.key(0), prompt[:1])
    key = jax.random.key(1)
    holder: dict[str, Any] = {}

    def step() -> None:
        holder.pop("out", None)  # as PyTorch's runner, keep no result across calls
        holder["out"] = generate(model, variables, prompt, new, key=key, greedy=True)

    def sync() -> None:
        jax.block_until_ready(holder["out"])

    _, compile_s = timed_call(lambda: (step(), sync()))
    # generate() runs its decode steps in a fori_loop, whose body XLA counts
    # once; so: the prefill, plus (new - 1) decode steps, each analysed alone.
    cache = model.init_cache(batch, prompt_len + new)
    prefill = jax.jit(lambda v, t, c: model.apply(v, t, c, method="prefill"))
    decode = jax.jit(lambda v, t, c: model.apply(v, t, c, method="decode_step"))
    flops = xla_flops(prefill, variables, prompt, cache)
    flops += (new - 1) * xla_flops(decode, variables, prompt[:, :1], cache)
    return Runner(name, "nnlib", step, sync, num_params(variables["params"]),
                  items_per_step=batch * new, unit="tokens", compile_s=compile_s,
                  flops_per_step=flops,
                  flops_source="XLA cost analysis: prefill + (new-1) x decode_step",
                  notes="nnlib.models.generate, greedy, static-shape KV cache",
                  handle=holder)


BUILDERS: dict[str, Callable[[str, dict[str, Any], dict[str, np.ndarray]], Runner]] = {
    "mlp": build_train,
    "cnn": build_train,
    "lstm": build_lstm,
    "gpt_b64": build_train,
    "gpt_b12": build_train,
    "minilm_infer": build_minilm,
    "gpt_generate": build_generate,
}


def build(name: str, data: dict[str, np.ndarray], spec: dict[str, Any] | None = None) -> Runner:
    """The nnlib runner of workload ``name`` (sizes from ``SPECS`` unless given)."""
    return BUILDERS[name](name, spec or SPECS[name], data)
