"""nnlib.compress: what a model costs, and making it cost less.

- ``cost``: FLOPs and bytes from XLA's cost analysis, parameter and
  optimizer-state bytes, compiled memory, measured step time, and an energy
  and carbon estimate with explicit assumptions (``cost_report``).
- ``pruning``: magnitude (per layer, global) and structured (channel) masks,
  Zhu & Gupta's gradual schedule, and the optax transformation that keeps
  pruned weights at exactly zero (``prune``); sparse storage sizes.
- ``quantization``: int8 post-training quantization and quantization-aware
  training of nnlib models through qwix (``ptq_model``, ``qat_model``), and
  a plain-JAX symmetric per-channel int8 fallback (``quantize_per_channel``,
  ``fake_quantize``).
"""

from nnlib.compress.cost import (
    DEFAULT_DEVICE_POWER_W,
    DEFAULT_GRID_GCO2_PER_KWH,
    DEFAULT_PUE,
    DEFAULT_UTILIZATION,
    compile_fn,
    cost_analysis,
    cost_report,
    energy_estimate,
    flops,
    format_cost,
    memory_analysis,
    time_fn,
    tree_bytes,
    tree_size,
)
from nnlib.compress.pruning import (
    PruningState,
    apply_masks,
    channel_masks,
    default_prunable,
    keep_masked,
    layer_sparsity,
    magnitude_masks,
    polynomial_sparsity,
    prune,
    pruning_masks,
    sparsity,
    storage_bytes,
)

# Quantization needs qwix (the ``compress`` extra); it is imported on first
# use, so cost reports and pruning work without it.
_QUANTIZATION = (
    "NnlibPtqProvider",
    "NnlibQtProvider",
    "dequantize",
    "fake_quantize",
    "fake_quantize_params",
    "int8_rules",
    "ptq_model",
    "qat_model",
    "quantize_per_channel",
    "quantized_size_bytes",
)


def __getattr__(name: str):
    if name in _QUANTIZATION:
        try:
            from nnlib.compress import quantization
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"nnlib.compress.{name} needs qwix: pip install 'nnlib[compress]' ({e})"
            ) from e
        return getattr(quantization, name)
    raise AttributeError(f"module 'nnlib.compress' has no attribute {name!r}")

__all__ = [
    "DEFAULT_DEVICE_POWER_W",
    "DEFAULT_GRID_GCO2_PER_KWH",
    "DEFAULT_PUE",
    "DEFAULT_UTILIZATION",
    "NnlibPtqProvider",
    "NnlibQtProvider",
    "PruningState",
    "apply_masks",
    "channel_masks",
    "compile_fn",
    "cost_analysis",
    "cost_report",
    "default_prunable",
    "dequantize",
    "energy_estimate",
    "fake_quantize",
    "fake_quantize_params",
    "flops",
    "format_cost",
    "int8_rules",
    "keep_masked",
    "layer_sparsity",
    "magnitude_masks",
    "memory_analysis",
    "polynomial_sparsity",
    "prune",
    "ptq_model",
    "pruning_masks",
    "qat_model",
    "quantize_per_channel",
    "quantized_size_bytes",
    "sparsity",
    "storage_bytes",
    "time_fn",
    "tree_bytes",
    "tree_size",
]
