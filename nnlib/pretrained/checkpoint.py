"""Hugging Face BERT checkpoints -> nnlib ``Bert`` parameters, by renaming alone.

A Hugging Face BERT checkpoint is a flat dict of named tensors
(``encoder.layer.0.attention.self.query.weight: [384, 384]``, ...), stored in a
``model.safetensors`` file beside a ``config.json``. nnlib's ``Bert`` holds
the same numbers in a nested tree (``layer_0/attention/query/kernel``); the
table in ``nnlib.models.bert``'s docstring pairs every nnlib module with its
Hugging Face module. Converting is therefore renaming plus one transpose:

- a ``Dense``'s ``kernel [in, out]`` is ``nn.Linear``'s ``weight.T`` (PyTorch
  stores ``[out, in]``), its ``bias`` is ``bias``;
- a ``LayerNorm``'s ``scale`` / ``bias`` are ``weight`` / ``bias``;
- an embedding's ``embedding`` is ``weight``.

Every tensor the model needs is checked before anything is returned: a
missing one, or one whose shape disagrees with the ``BertConfig``, raises
``CheckpointError`` naming the tensor, the expected and the found shape
(in the checkpoint's own ``[out, in]`` layout, as ``safetensors`` would print
it). Tensors the model does not use (``embeddings.position_ids``, a masked-LM
head, ...) are ignored, as Hugging Face's ``from_pretrained`` ignores them.

Files are read with ``safetensors.numpy`` (no PyTorch); ``config.json`` is
turned into a ``BertConfig`` by ``bert_config_from_hf``. The way back,
``save_bert_checkpoint``, writes nnlib parameters in the same layout, so a
Hugging Face ``BertModel.from_pretrained(folder)`` reads them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnlib.models.bert import Bert, BertConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# Hugging Face ``hidden_act`` -> nnlib activation name. HF's "gelu" is the
# exact erf form; "gelu_new" / "gelu_pytorch_tanh" are the tanh approximation.
_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                "gelu_fast": "gelu", "relu": "relu", "silu": "silu", "swish": "silu",
                "tanh": "tanh"}


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: a tensor is missing or has the
    wrong shape, or the folder or its ``config.json`` is not a BERT's."""


def _name_table(config: BertConfig, pooler: bool) -> Iterator[tuple[tuple[str, ...], str, bool]]:
    """Yields ``(nnlib path, Hugging Face tensor name, transpose)`` for every
    parameter of ``Bert(config)``: the table of ``nnlib.models.bert``, leaf by leaf."""

    def dense(ours: tuple[str, ...], theirs: str):
        yield ours + ("kernel",), f"{theirs}.weight", True
        yield ours + ("bias",), f"{theirs}.bias", False

    def norm(ours: tuple[str, ...], theirs: str):
        yield ours + ("scale",), f"{theirs}.weight", False
        yield ours + ("bias",), f"{theirs}.bias", False

    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        yield ("embeddings", name, "embedding"), f"embeddings.{name}.weight", False
    yield from norm(("embeddings", "layer_norm"), "embeddings.LayerNorm")
    for i in range(config.num_layers):
        ours, hf = f"layer_{i}", f"encoder.layer.{i}"
        for head in ("query", "key", "value"):
            yield from dense((ours, "attention", head), f"{hf}.attention.self.{head}")
        yield from dense((ours, "attention", "out"), f"{hf}.attention.output.dense")
        yield from norm((ours, "attention_layer_norm"), f"{hf}.attention.output.LayerNorm")
        yield from dense((ours, "intermediate"), f"{hf}.intermediate.dense")
        yield from dense((ours, "output"), f"{hf}.output.dense")
        yield from norm((ours, "output_layer_norm"), f"{hf}.output.LayerNorm")
    if pooler:
        yield from dense(("pooler",), "pooler.dense")


def _expected_shapes(config: BertConfig, pooler: bool) -> dict[tuple[str, ...], tuple[int, ...]]:
    """nnlib path -> shape, from the model itself (``eval_shape``: no compute)."""
    shapes = jax.eval_shape(Bert(config, add_pooling_layer=pooler).init, jax.random.key(0),
                            jnp.zeros((1, 1), jnp.int32))["params"]
    return {tuple(k.key for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}


def _config_summary(config: BertConfig) -> str:
    return (f"BertConfig(vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, "
            f"num_layers={config.num_layers}, intermediate_size={config.intermediate_size}, "
            f"max_position_embeddings={config.max_position_embeddings}, "
            f"type_vocab_size={config.type_vocab_size})")


def _layers_hint(names: Any) -> str:
    layers = {int(m.group(1)) for n in names if (m := re.match(r"encoder\.layer\.(\d+)\.", n))}
    return f" The checkpoint has {len(layers)} encoder layers." if layers else ""


def bert_params_from_hf(
    tensors: Mapping[str, Any],
    config: BertConfig,
    *,
    prefix: str = "",
    pooler: bool | None = None,
    source: str = "checkpoint",
) -> dict[str, Any]:
    """Hugging Face ``BertModel`` tensors -> the ``params`` of ``Bert(config)``.

    Args:
      tensors: name -> array (numpy, or anything ``np.asarray`` reads, e.g. a
        PyTorch ``state_dict`` converted with ``.numpy()``), in Hugging Face's
        names and ``[out, in]`` layout.
      config: the ``BertConfig`` the parameters are for; every shape is
        checked against it.
      prefix: prepended to every Hugging Face name, e.g. ``"bert."`` for the
        encoder inside a ``BertForMaskedLM`` or ``BertForSequenceClassification``.
      pooler: ``True`` requires ``pooler.dense``, ``False`` leaves it out,
        ``None`` takes it when the checkpoint has it (then build
        ``Bert(config, add_pooling_layer="pooler" in params)``).
      source: how errors name the checkpoint (a file name).

    Returns:
      A nested dict of float32 ``jax.Array``s with the structure of
      ``Bert(config, add_pooling_layer=...).init(...)["params"]``.

    Raises:
      CheckpointError: a needed tensor is missing, or its shape is not the
        one ``config`` implies (all problems are listed at once).
    """
    if pooler is None:
        pooler = f"{prefix}pooler.dense.weight" in tensors
    expected = _expected_shapes(config, pooler)
    missing, wrong, found = [], [], {}
    for path, name, transpose in _name_table(config, pooler):
        shape = expected[path][::-1] if transpose else expected[path]
        where = f"{prefix}{name}"
        if where not in tensors and ".LayerNorm." in where:
            # Checkpoints converted from the original TensorFlow BERT (e.g.
            # bert-base-uncased's own model.safetensors) call these gamma / beta;
            # Hugging Face's from_pretrained renames them on load.
            legacy = re.sub(r"\.weight$", ".gamma", re.sub(r"\.bias$", ".beta", where))
            where = legacy if legacy in tensors else where
        if where not in tensors:
            missing.append(f"'{where}' (expected shape {shape}, nnlib {'/'.join(path)})")
            continue
        value = np.asarray(tensors[where])
        if value.shape != shape:
            wrong.append(f"'{where}' has shape {value.shape}, expected {shape}")
            continue
        found[path] = value.T if transpose else value
    if missing or wrong:
        problems = [f"missing tensor {m}" for m in missing] + [f"tensor {w}" for w in wrong]
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more"
                                          if len(problems) > 6 else "")
        hint = ""
        if f"{prefix}embeddings.word_embeddings.weight" not in tensors:
            # Nothing where a BERT keeps its first tensor: a wrong prefix or not a BERT.
            hint = (f" With prefix={prefix!r} not even the word embeddings were found; "
                    f"the checkpoint's names look like {sorted(tensors)[:3]}.")
        raise CheckpointError(
            f"{source} does not fit Bert({_config_summary(config)}): {shown}. "
            f"Shapes are in Hugging Face's layout (nn.Linear weight [out, in])."
            f"{_layers_hint(tensors) if missing else ''}{hint}"
        )
    params: dict[str, Any] = {}
    for path, value in found.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value, jnp.float32)
    return params


def _weights_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        file = path / WEIGHTS_NAME
        if not file.is_file():
            others = sorted(p.name for p in path.iterdir()
                            if p.suffix in (".bin", ".safetensors", ".pt", ".h5", ".msgpack"))
            raise CheckpointError(
                f"load_bert_checkpoint: no {WEIGHTS_NAME} in {path}"
                + (f" (found {others}; nnlib reads safetensors only: convert with "
                   f"safetensors.torch.save_file)" if others else "")
            )
        return file
    if not path.is_file():
        raise CheckpointError(f"load_bert_checkpoint: {path} is neither a checkpoint folder "
                              f"nor a .safetensors file")
    return path


def load_bert_checkpoint(
    path: str | os.PathLike,
    config: BertConfig,
    *,
    prefix: str | None = None,
    pooler: bool | None = None,
) -> dict[str, Any]:
    """Reads a Hugging Face BERT checkpoint into the ``params`` of ``Bert(config)``.

    Args:
      path: a checkpoint folder holding ``model.safetensors`` (as saved by
        ``save_pretrained``), or the ``.safetensors`` file itself.
      config: the model's ``BertConfig`` (``bert_config_from_hf`` reads one
        from the folder's ``config.json``).
      prefix: the encoder's name prefix in the file; ``None`` finds it:
        ``""`` for a ``BertModel`` checkpoint, ``"bert."`` for one saved from
        ``BertForMaskedLM`` / ``BertForSequenceClassification``.
      pooler: as in ``bert_params_from_hf`` (``None``: when present).

    Returns:
      ``params`` for ``Bert(config, add_pooling_layer="pooler" in params)``.

    Example::

        config = bert_config_from_hf(folder / "config.json")
        params = load_bert_checkpoint(folder, config)
        out = Bert(config).apply({"params": params}, ids, attention_mask=mask)
    """
    from safetensors.numpy import load_file  # optional dependency: nnlib[pretrained]

    file = _weights_file(path)
    tensors = load_file(str(file))
    if prefix is None:
        prefix = next((p for p in ("", "bert.")
                       if f"{p}embeddings.word_embeddings.weight" in tensors), "")
    return bert_params_from_hf(tensors, config, prefix=prefix, pooler=pooler, source=str(file))


def bert_config_from_hf(config: Mapping[str, Any] | str | os.PathLike) -> BertConfig:
    """A Hugging Face BERT ``config.json`` (a path or its parsed dict) -> ``BertConfig``.

    Renames ``num_hidden_layers`` -> ``num_layers``, ``num_attention_heads`` ->
    ``num_heads``, ``hidden_dropout_prob`` -> ``dropout_rate``,
    ``attention_probs_dropout_prob`` -> ``attention_dropout_rate`` and
    ``hidden_act`` to nnlib's activation names (HF ``"gelu"`` is the exact
    erf GELU, nnlib's ``"gelu_exact"``). Only absolute position embeddings
    (BERT's own) have an nnlib equivalent.
    """
    source = "config"
    if not isinstance(config, Mapping):
        source = str(config)
        try:
            config = json.loads(Path(config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"bert_config_from_hf: no config file at {source}") from None
    model_type = config.get("model_type", "bert")
    if model_type != "bert":
        raise CheckpointError(f"{source}: model_type {model_type!r} is not 'bert'; nnlib's "
                              f"Bert holds BERT-layout checkpoints only")
    positions = config.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise CheckpointError(f"{source}: position_embedding_type {positions!r} is not "
                              f"supported; nnlib's Bert learns absolute positions")
    act = config.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"{source}: hidden_act {act!r} has no nnlib equivalent; known: "
                              f"{', '.join(sorted(_ACTIVATIONS))}")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
    absent = [k for k in required if k not in config]
    if absent:
        raise CheckpointError(f"{source}: missing {absent}; is this a BERT config.json?")
    return BertConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        max_position_embeddings=config.get("max_position_embeddings", 512),
        type_vocab_size=config.get("type_vocab_size", 2),
        dropout_rate=config.get("hidden_dropout_prob", 0.1),
        attention_dropout_rate=config.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        activation=_ACTIVATIONS[act],
        pad_token_id=config.get("pad_token_id", 0),
    )


def bert_config_to_hf(config: BertConfig) -> dict[str, Any]:
    """The ``config.json`` dict of a Hugging Face ``BertModel`` with ``config``'s sizes."""
    act = next((hf for hf, ours in _ACTIVATIONS.items() if ours == config.activation), None)
    if act is None:
        raise CheckpointError(f"bert_config_to_hf: activation {config.activation!r} has no "
                              f"Hugging Face name")
    return {
        "architectures": ["BertModel"], "model_type": "bert",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "hidden_dropout_prob": config.dropout_rate,
        "attention_probs_dropout_prob": config.attention_dropout_rate,
        "layer_norm_eps": config.layer_norm_eps, "hidden_act": act,
        "pad_token_id": config.pad_token_id, "position_embedding_type": "absolute",
    }


def save_bert_checkpoint(
    folder: str | os.PathLike, params: Mapping[str, Any], config: BertConfig
) -> Path:
    """Writes ``Bert`` params as a Hugging Face checkpoint folder.

    ``folder/model.safetensors`` holds the tensors under Hugging Face's names
    (kernels transposed to ``[out, in]``), ``folder/config.json`` the config;
    ``load_bert_checkpoint`` and ``BertModel.from_pretrained`` read it back.
    A tokenizer is not written: copy its ``tokenizer.json`` beside them.

    Args:
      folder: created if needed.
      params: ``Bert(config)`` parameters (with or without ``pooler``).
      config: their ``BertConfig``.

    Returns:
      The folder's ``Path``.
    """
    from safetensors.numpy import save_file  # optional dependency: nnlib[pretrained]

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, name, transpose in _name_table(config, pooler="pooler" in params):
        value = params
        try:
            for key in path:
                value = value[key]
        except (KeyError, TypeError):
            raise CheckpointError(
                f"save_bert_checkpoint: params have no {'/'.join(path)}, which "
                f"Bert({_config_summary(config)}) has") from None
        value = np.asarray(value, np.float32)
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    # Check before writing: the tree must be the config's, shape for shape.
    bert_params_from_hf(tensors, config, source="save_bert_checkpoint")
    save_file(tensors, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(bert_config_to_hf(config), indent=2) + "\n",
                                      encoding="utf-8")
    return folder
