"""GPT-2 (124M) training throughput on an accelerator: tokens/s and model-FLOPs utilization.

    python experiments/bench/gpu.py [--out runs/bench/gpu.json] [--dtype bfloat16]
        [--batch 16] [--steps 20] [--peak-tflops 989]

The model is ``nnlib.models.GPT`` at GPT-2 small's size (12 layers, 12
heads, width 768, context 1024, vocabulary 50,257 padded to 50,304 as nanoGPT
does so the head's matmul tiles evenly; 124M parameters with tied
embeddings), computing in ``--dtype`` with float32 parameters and AdamW
state, trained by the library's ``make_train_step`` under ``jax.jit`` with
the state donated. Attention goes through ``jax.nn.dot_product_attention``
(nnlib's ``implementation="auto"``), which picks a fused kernel where the
backend has one.

Reported: compile time (the first step), the median step time over
``--steps`` timed steps after two warm-up steps, tokens/s, and the
model-FLOPs utilization (MFU) of PaLM (Chowdhery et al. 2022, appendix B):

    flops per token = 6 N + 12 L T d        (N parameters without the
                                             position embedding, L layers,
                                             T context, d width)
    MFU = tokens/s x flops per token / peak

``--peak-tflops`` is the device's dense bf16 peak: 989 for an H100 SXM
(and an H200), 312 for an A100; left out, the script reads the device kind
and picks from ``PEAK_TFLOPS`` (no MFU when the device is unknown, e.g. a
CPU). XLA's own count of the compiled step is reported beside the formula.

A CPU has no business running this at full size; the tests run it at
``--tiny`` size to check it works.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nnlib.models import GPT, GPTConfig  # noqa: E402
from nnlib.train import TrainState, make_optimizer, make_train_step, num_params  # noqa: E402

# Dense bf16 peak, TFLOP/s, by jax's ``device_kind`` (first match wins).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "TPU v5": 197.0}

GPT2_SMALL = dict(vocab_size=50_304, context_length=1024, num_layers=12, num_heads=12,
                  embed_dim=768)
TINY = dict(vocab_size=128, context_length=32, num_layers=2, num_heads=2, embed_dim=32)


def peak_tflops(device: jax.Device) -> float | None:
    """The dense bf16 peak of ``device`` from ``PEAK_TFLOPS``, or None if unknown."""
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


def flops_per_token(n_params: int, config: GPTConfig) -> float:
    """PaLM's count: 6N for the matmuls with weights (forward + backward),
    plus 12 L T d for the attention scores and their weighted sum."""
    return 6.0 * n_params + 12.0 * config.num_layers * config.context_length * config.embed_dim


def run(*, dtype: str = "bfloat16", batch: int = 16, steps: int = 20, tiny: bool = False,
        peak: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Builds the model, times ``steps`` train steps, returns the report (a flat dict)."""
    sizes = TINY if tiny else GPT2_SMALL
    config = GPTConfig(**sizes, dropout_rate=0.0, dtype=jnp.dtype(dtype))
    model = GPT(config)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (batch, config.context_length + 1), np.int32)
    batch_arrays = {"inputs": jnp.asarray(tokens[:, :-1]), "labels": jnp.asarray(tokens[:, 1:])}
    tx = make_optimizer("adamw", 6e-4, b2=0.95, weight_decay=0.1)
    state = jax.jit(lambda key, x: TrainState.create(model=model, tx=tx, key=key,
                                                     example_input=x))(
        jax.random.key(seed), batch_arrays["inputs"][:1])
    step = jax.jit(make_train_step(), donate_argnums=0)

    start = time.perf_counter()
    state, metrics = step(state, batch_arrays)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    for _ in range(2):
        state, metrics = step(state, batch_arrays)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch_arrays)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)

    n = num_params(state.params)
    n_no_pos = n - config.context_length * config.embed_dim  # PaLM leaves positions out
    step_s = statistics.median(times)
    tokens_per_s = batch * config.context_length / step_s
    per_token = flops_per_token(n_no_pos, config)
    device = jax.devices()[0]
    peak = peak if peak is not None else peak_tflops(device)
    analysis = step.lower(state, batch_arrays).compile().cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    xla_flops = float((analysis or {}).get("flops", float("nan")))
    report = {
        "device": f"{device.platform}: {getattr(device, 'device_kind', '?')}",
        "dtype": dtype, "batch": batch, "context": config.context_length,
        "num_params": n, "compile_s": round(compile_s, 2), "step_s_median": step_s,
        "step_s_iqr": float(np.subtract(*np.percentile(times, [75, 25]))),
        "tokens_per_s": tokens_per_s, "model_flops_per_token": per_token,
        "model_tflops_per_s": tokens_per_s * per_token / 1e12,
        "xla_flops_per_step": xla_flops, "final_loss": float(metrics["loss"]),
        "peak_tflops": peak,
        "mfu": (tokens_per_s * per_token / 1e12 / peak) if peak else None,
    }
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/gpu.json")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--tiny", action="store_true", help="a smoke run at toy size")
    args = parser.parse_args(argv)
    report = run(dtype=args.dtype, batch=args.batch, steps=args.steps, tiny=args.tiny,
                 peak=args.peak_tflops)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    mfu = f"{100 * report['mfu']:.1f} %" if report["mfu"] is not None else "n/a (unknown peak)"
    print(f"GPT {report['num_params'] / 1e6:.1f}M on {report['device']}, {args.dtype}, batch "
          f"{args.batch} x {report['context']}: {report['step_s_median'] * 1e3:.1f} ms/step, "
          f"{report['tokens_per_s']:,.0f} tokens/s, {report['model_tflops_per_s']:.1f} model "
          f"TFLOP/s, MFU {mfu}, compile {report['compile_s']:.1f} s -> {out}")
    return report


if __name__ == "__main__":
    main()
