"""The benchmark suite (experiments/bench): every workload runs in both
frameworks, the two builds are the same model, and the results are written.

No timing assertions: the machine is shared, and speed is what the benchmark
reports, not what a test can promise. Workloads run at tiny sizes (``TINY``)
for one or two steps; the parameter counts are also checked at the real sizes
(``SPECS``) without compiling anything. The PyTorch halves are skipped when
PyTorch is not installed. Same-architecture checks copy nnlib's weights into
the PyTorch module and compare outputs: a mismatch in layout, activation,
normalization or attention would show up as different numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.bench import run, runner, workloads_nnlib  # noqa: E402
from experiments.bench.runner import SPECS, interleaved_times, make_data  # noqa: E402

GPT_TINY = dict(vocab=11, context=8, layers=1, heads=2, width=16)
TINY = {
    "mlp": dict(SPECS["mlp"], batch=8, inputs=20, hidden=(16, 16)),
    "cnn": dict(SPECS["cnn"], batch=4, image=8, features=(4, 8), dense=16),
    "lstm": dict(SPECS["lstm"], batch=4, time=5, inputs=6, hidden=8),
    "gpt_b64": dict(SPECS["gpt_b64"], batch=4, **GPT_TINY),
    "gpt_b12": dict(SPECS["gpt_b12"], batch=2, **GPT_TINY),
    "minilm_infer": dict(SPECS["minilm_infer"], batch=2, length=8, vocab=50, layers=1,
                         heads=2, width=16, intermediate=32, max_positions=16),
    "gpt_generate": dict(SPECS["gpt_generate"], batch=2, prompt=3, new_tokens=4, **GPT_TINY),
}
VMAP_TINY = dict(batch=4, inputs=12, hidden=(8, 8), classes=3, members=2)
QUICK = argparse.Namespace(quick=True, repeats=1, block_seconds=0.0)


def _torch():
    return pytest.importorskip("torch")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models: one PyTorch thread is faster, and on a shared machine it
    never waits for a descheduled worker. Restored afterwards."""
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_workload_has_a_tiny_version():
    assert set(TINY) == set(SPECS)


def test_mlp_parameter_count_by_hand():
    # 784*512+512 + 512*512+512 + 512*10+10
    params = jax.eval_shape(workloads_nnlib.make_model("mlp", SPECS["mlp"]).init,
                            jax.random.key(0), jnp.zeros((1, 784)))
    assert sum(x.size for x in jax.tree.leaves(params)) == 669_706


def _nnlib_count(name: str, spec: dict) -> int:
    """Parameters of the nnlib model without allocating or compiling them."""
    data = make_data(name, dict(spec, batch=1))
    example = jnp.asarray(data["prompt"] if "prompt" in data else data["inputs"])
    shapes = jax.eval_shape(workloads_nnlib.make_model(name, spec).init, jax.random.key(0),
                            example)
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("name", list(SPECS))
def test_parameter_counts_match_at_full_size(name):
    torch = _torch()
    from experiments.bench import workloads_torch

    with torch.device("meta"):  # shapes only: MiniLM's 22M parameters are never allocated
        model = workloads_torch.make_model(name, SPECS[name])
    assert _nnlib_count(name, SPECS[name]) == workloads_torch.trainable_params(model)


@pytest.mark.parametrize("name", list(SPECS))
def test_workload_runs_in_both_frameworks(name):
    """Builds both runners at tiny size, checks the counts agree, takes a step
    or two each through the harness's own interleaved timer (no timing
    assertions)."""
    spec = TINY[name]
    data = make_data(name, spec)
    runners = [workloads_nnlib.build(name, data, spec)]
    try:
        from experiments.bench import workloads_torch
    except ImportError:
        workloads_torch = None
    if workloads_torch is not None:
        runners.append(workloads_torch.build(name, data, spec))
        assert runners[0].num_params == runners[1].num_params
    ours = runners[0]
    state = ours.handle.get("state")  # training workloads: the live TrainState
    before = None if state is None else np.array(jax.tree.leaves(state.params)[0])
    summaries = interleaved_times(runners, repeats=1, warmup_steps=1, fixed_steps=1,
                                  pause_s=0.0)
    if state is not None:
        # It really trains: the donated state was replaced at every call
        # (compile call + warm-up + timed step), and the parameters moved.
        state = ours.handle["state"]
        assert int(state.step) == 3
        assert not np.allclose(before, np.asarray(jax.tree.leaves(state.params)[0]))
    assert ours.compile_s is not None and ours.compile_s > 0
    assert ours.flops_per_step is not None and ours.flops_per_step > 0
    for summary in summaries:
        assert len(summary["seconds"]) == 1 and summary["block_steps"] == 1
        assert np.isfinite(summary["steps_per_s"])


def test_lstm_flops_are_the_analytic_count():
    spec = TINY["lstm"]
    b, t, f, h, c = 4, 5, 6, 8, 10
    assert workloads_nnlib.lstm_train_flops(spec) == 3 * (2 * b * t * (f + h) * 4 * h
                                                          + 2 * b * h * c)


# --------------------------------------------------------------------------- #
# Same architecture: nnlib's weights in the PyTorch module give the same outputs.
# --------------------------------------------------------------------------- #


def _t(x):
    torch = _torch()
    return torch.from_numpy(np.array(x, dtype=np.float32))


def _linear(sd: dict, prefix: str, dense: dict) -> None:
    sd[f"{prefix}.weight"] = _t(dense["kernel"]).T.contiguous()
    if "bias" in dense:
        sd[f"{prefix}.bias"] = _t(dense["bias"])


def _norm(sd: dict, prefix: str, norm: dict) -> None:
    sd[f"{prefix}.weight"] = _t(norm["scale"])
    sd[f"{prefix}.bias"] = _t(norm["bias"])


def _init(name: str, spec: dict, example):
    model = workloads_nnlib.make_model(name, spec)
    return model, model.init(jax.random.key(3), example)


def test_gpt_matches_pytorch_logits_and_greedy_generation():
    torch = _torch()
    from experiments.bench import workloads_torch

    spec = TINY["gpt_generate"]
    tokens = jnp.asarray(make_data("gpt_b64", dict(spec, batch=3))["inputs"])  # [3, 8]
    model, variables = _init("gpt_generate", spec, tokens)
    p = variables["params"]
    sd = {"wte.weight": _t(p["token_embedding"]), "wpe.weight": _t(p["position_embedding"]),
          "lm_head.weight": _t(p["token_embedding"])}
    for i in range(spec["layers"]):
        block = p[f"block_{i}"]
        _norm(sd, f"blocks.{i}.ln_1", block["attention_norm"])
        _linear(sd, f"blocks.{i}.attn.c_attn", block["attention"]["qkv"])
        _linear(sd, f"blocks.{i}.attn.c_proj", block["attention"]["out"])
        _norm(sd, f"blocks.{i}.ln_2", block["mlp_norm"])
        _linear(sd, f"blocks.{i}.c_fc", block["fc"])
        _linear(sd, f"blocks.{i}.c_proj", block["proj"])
    _norm(sd, "ln_f", p["final_norm"])
    torch_model = workloads_torch.make_model("gpt_generate", spec)
    torch_model.load_state_dict(sd)
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(np.array(tokens)).long()).numpy()
    ours = np.asarray(model.apply(variables, tokens))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)

    from nnlib.models import generate

    prompt = tokens[:, :3]
    generated = generate(model, variables, prompt, 5, key=jax.random.key(0), greedy=True)
    np.testing.assert_array_equal(
        np.asarray(generated),
        torch_model.generate(torch.from_numpy(np.array(prompt)).long(), 5).numpy())


def test_lstm_matches_pytorch_with_its_second_bias_frozen_at_zero():
    torch = _torch()
    from experiments.bench import workloads_torch

    spec = TINY["lstm"]
    x = jnp.asarray(make_data("lstm", spec)["inputs"])  # [4, 5, 6]
    model, variables = _init("lstm", spec, x)
    p = variables["params"]
    cell = p["layer_0"]["cell"]
    torch_model = workloads_torch.make_model("lstm", spec)
    assert not torch_model.lstm.bias_hh_l0.requires_grad
    sd = {"lstm.weight_ih_l0": _t(cell["input"]["kernel"]).T.contiguous(),
          "lstm.bias_ih_l0": _t(cell["input"]["bias"]),
          "lstm.weight_hh_l0": _t(cell["recurrent"]["kernel"]).T.contiguous(),
          "lstm.bias_hh_l0": torch.zeros(4 * spec["hidden"])}
    _linear(sd, "head", p["head"])
    torch_model.load_state_dict(sd)
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(np.array(x))).numpy()
    np.testing.assert_allclose(np.asarray(model.apply(variables, x)), theirs,
                               rtol=1e-4, atol=1e-5)


def test_cnn_matches_pytorch():
    torch = _torch()
    from experiments.bench import workloads_torch

    spec = TINY["cnn"]
    x = jnp.asarray(make_data("cnn", spec)["inputs"])  # [4, 8, 8, 1] NHWC
    model, variables = _init("cnn", spec, x)
    p = variables["params"]
    sd = {}
    for i, index in enumerate((0, 3)):  # Sequential positions of the two convs
        conv = p[f"block_{i}"]["conv"]
        sd[f"{index}.weight"] = _t(conv["kernel"]).permute(3, 2, 0, 1).contiguous()
        sd[f"{index}.bias"] = _t(conv["bias"])
    # The dense layer reads a flattened HWC map in nnlib and a CHW one in PyTorch.
    side, channels = spec["image"] // 4, spec["features"][-1]
    kernel = np.asarray(p["head"]["dense_0"]["kernel"]).reshape(side, side, channels, -1)
    kernel = kernel.transpose(2, 0, 1, 3).reshape(side * side * channels, -1)
    _linear(sd, "7", {"kernel": kernel, "bias": p["head"]["dense_0"]["bias"]})
    _linear(sd, "9", p["head"]["output"])
    torch_model = workloads_torch.make_model("cnn", spec)
    torch_model.load_state_dict(sd)
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(model.apply(variables, x)), theirs,
                               rtol=1e-4, atol=1e-5)


def test_minilm_bert_matches_pytorch_post_ln_transformer_encoder():
    torch = _torch()
    from experiments.bench import workloads_torch

    spec = TINY["minilm_infer"]
    tokens = jnp.asarray(make_data("minilm_infer", spec)["inputs"])  # [2, 8]
    model, variables = _init("minilm_infer", spec, tokens)
    p = variables["params"]
    embeddings = p["embeddings"]
    sd = {f"{name}.weight": _t(embeddings[name]["embedding"])
          for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    _norm(sd, "embedding_norm", embeddings["layer_norm"])
    for i in range(spec["layers"]):
        layer, prefix = p[f"layer_{i}"], f"encoder.layers.{i}"
        attention = layer["attention"]
        sd[f"{prefix}.self_attn.in_proj_weight"] = torch.cat(
            [_t(attention[n]["kernel"]).T for n in ("query", "key", "value")])
        sd[f"{prefix}.self_attn.in_proj_bias"] = torch.cat(
            [_t(attention[n]["bias"]) for n in ("query", "key", "value")])
        _linear(sd, f"{prefix}.self_attn.out_proj", attention["out"])
        _linear(sd, f"{prefix}.linear1", layer["intermediate"])
        _linear(sd, f"{prefix}.linear2", layer["output"])
        _norm(sd, f"{prefix}.norm1", layer["attention_layer_norm"])
        _norm(sd, f"{prefix}.norm2", layer["output_layer_norm"])
    _linear(sd, "pooler", p["pooler"])
    torch_model = workloads_torch.make_model("minilm_infer", spec).eval()
    torch_model.load_state_dict(sd)
    with torch.inference_mode():  # the fused fast path the benchmark times
        sequence, pooled = torch_model(torch.from_numpy(np.array(tokens)).long())
    ours = model.apply(variables, tokens)
    np.testing.assert_allclose(np.asarray(ours.sequence_output), sequence.numpy(),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours.pooled_output), pooled.numpy(),
                               rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- #
# The harness and its outputs.
# --------------------------------------------------------------------------- #


def test_vmap_figures_run_and_report_a_ratio():
    rows = run.run_vmap(QUICK, VMAP_TINY)
    assert [r["figure"] for r in rows] == ["per_example_gradients", "ensemble_8_seeds"]
    assert {"per_example_vmap", "per_example_loop"} <= set(rows[0]["runs"])
    assert set(rows[1]["runs"]) == {"ensemble_vmap", "ensemble_sequential"}
    for row in rows:
        assert row["vmap_speedup"] > 0


def test_per_example_vmap_and_loop_compute_the_same_gradients():
    """The loop calls per_example_gradients on batches of one with example i's
    key, so both sides of the figure compute the same numbers."""
    from experiments.bench import vmap_figures
    from nnlib.train import TrainState, per_example_gradients

    data = {k: jnp.asarray(v) for k, v in vmap_figures._data(VMAP_TINY).items()}
    state = TrainState.create(model=vmap_figures._model(VMAP_TINY),
                              tx=workloads_nnlib.optimizer(), key=jax.random.key(0),
                              example_input=data["inputs"][:1])
    key = jax.random.key(2)
    grads = jax.jit(lambda s, b, k: per_example_gradients(s, b, k, train=False))
    batched = grads(state, data, key)
    for i in range(VMAP_TINY["batch"]):
        one = jax.tree.map(lambda x, i=i: x[i:i + 1], data)
        single = grads(state, one, jax.random.fold_in(key, i))
        jax.tree.map(lambda b, s, i=i: np.testing.assert_allclose(b[i], s[0], rtol=1e-5,
                                                                   atol=1e-6),
                     batched, single)


def test_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench" / "results.json"
    results = run.main(["--quick", "--only", "mlp", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [w["name"] for w in saved["workloads"]] == ["mlp"]
    row = saved["workloads"][0]
    assert row["num_params"] == 669_706
    for key in ("compile_s", "flops_per_step", "nnlib_gflops", "nnlib_pct_peak"):
        assert row[key] > 0
    assert saved["meta"]["quick"] is True and saved["peak"]["start"]["jax_gflops"] > 0
    assert saved["vmap"] == [] and results["workloads"][0]["name"] == "mlp"
    table = out.with_suffix(".md").read_text()
    assert "| mlp | steps |" in table and "nnlib/PyTorch" in table and "% of peak" in table
    if "pytorch" in row:
        assert row["ratio"] > 0 and "torch.mm" in table


def test_markdown_lists_tokens_per_second_and_vmap_rows():
    summary = runner.summarize([0.5, 0.25, 0.4], block_steps=2)
    results = {
        "meta": {"date": "today", "machine": {"cpu": "cpu", "cores": 2, "torch_threads": 2},
                 "load_start": [1.0],
                 "load_end": [2.0], "quick": False},
        "peak": {"start": {"n": 8, "jax_gflops": 10.0, "torch_gflops": None},
                 "end": {"n": 8, "jax_gflops": 20.0, "torch_gflops": None}},
        "peak_gflops": 20.0,
        "workloads": [{"name": "gpt_generate", "about": "gen", "unit": "tokens",
                       "items_per_step": 10, "num_params": 5, "compile_s": 1.0,
                       "nnlib": summary, "nnlib_gflops": 5.0}],
        "vmap": [{"figure": "per_example_gradients", "batch": 4, "members": None,
                  "vmap_speedup": 2.0,
                  "runs": {"per_example_vmap": {**summary, "framework": "nnlib",
                                                "compile_s": 0.5}}}],
    }
    table = run.markdown(results)
    # median 0.4 s per step, 10 tokens per step: 25 tokens/s; 5 of 20 GFLOP/s is 25 %.
    assert "| gpt_generate | tokens | 25.00 (" in table
    assert "| 5.0 | 25.0 |" in table
    assert "| per_example_gradients | per_example_vmap (nnlib) | 400 (" in table
    assert "loop time / vmap time = 2.00" in table


def test_summaries_use_the_median_and_the_interquartile_range():
    summary = runner.summarize([1.0, 0.5, 0.25, 0.2, 2.0], block_steps=3)
    assert summary["median_s"] == 0.5 and summary["steps_per_s"] == 2.0
    # rates 1, 2, 4, 5, 0.5 -> quartiles 1 and 4
    assert summary["iqr_steps_per_s"] == pytest.approx(3.0)
    assert runner.quartiles([3.0]) == (3.0, 3.0, 3.0)


def test_unknown_workload_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        run.main(["--only", "resnet", "--quick"])
    assert "unknown workload(s) resnet" in capsys.readouterr().err


def test_time_cap_stops_after_the_minimum_rounds():
    calls = []
    fake = runner.Runner("fake", "nnlib", step=lambda: calls.append(1), sync=lambda: None,
                         num_params=0, items_per_step=1)
    (summary,) = interleaved_times([fake], repeats=9, warmup_steps=0, fixed_steps=2,
                                   pause_s=0.0, max_s=0.0, min_repeats=3)
    assert len(summary["seconds"]) == 3 and len(calls) == 6


def test_block_size_comes_from_the_steady_rate_not_one_slow_first_step(monkeypatch):
    clock = [0.0]
    costs = iter([0.02] + [0.002] * 1000)  # the first step slow, then 2 ms each

    def step():
        clock[0] += next(costs)

    monkeypatch.setattr(runner.time, "perf_counter", lambda: clock[0])
    fake = runner.Runner("fake", "nnlib", step=step, sync=lambda: None,
                         num_params=0, items_per_step=1)
    # 1 step (20 ms), then 2, 4, ... until a run takes 50 ms: 32 steps of 2 ms.
    assert runner.steps_per_block(fake, target_s=0.2) == 100


# --- the GPU section (experiments/bench/gpu.py), smoke-tested on the CPU ---------


def test_gpu_benchmark_runs_at_tiny_size_and_counts_flops_as_palm(tmp_path):
    from experiments.bench import gpu

    out = tmp_path / "gpu.json"
    report = gpu.main(["--tiny", "--steps", "2", "--batch", "2", "--dtype", "float32",
                       "--peak-tflops", "1.0", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    cfg = gpu.TINY
    d, layers, t, v = cfg["embed_dim"], cfg["num_layers"], cfg["context_length"], cfg["vocab_size"]
    # Tied embeddings, biases, two LayerNorms per block and a final one.
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    assert report["num_params"] == v * d + t * d + layers * per_block + 2 * d
    n_no_pos = report["num_params"] - t * d
    assert report["model_flops_per_token"] == 6 * n_no_pos + 12 * layers * t * d
    assert report["tokens_per_s"] == pytest.approx(2 * t / report["step_s_median"])
    assert report["mfu"] == pytest.approx(report["model_tflops_per_s"] / 1.0)
    assert np.isfinite(report["final_loss"]) and report["xla_flops_per_step"] > 0


def test_gpu_benchmark_knows_the_hopper_peak():
    from experiments.bench import gpu

    class Device:
        device_kind = "NVIDIA H100 80GB HBM3"

    assert gpu.peak_tflops(Device()) == 989.0
    Device.device_kind = "cpu"
    assert gpu.peak_tflops(Device()) is None


@pytest.mark.parametrize("isa, note", [
    (None, ""),
    (["avx2", "fma"], " (AVX2)"),
    (["avx2", "fma", "avx512f", "amx_tile", "amx_bf16"], " (AVX-512, AMX)"),
    ([], " (no AVX2)"),
])
def test_markdown_header_names_the_cpus_vector_units(isa, note):
    machine = {"cpu": "cpu"} if isa is None else {"cpu": "cpu", "cpu_isa": isa}
    assert run._isa(machine) == note


def test_cpuinfo_reads_the_first_processor():
    text = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon A\n"
            "flags\t\t: fpu avx2 avx512f amx_tile\n\n"
            "processor\t: 1\nvendor_id\t: Other\nmodel name\t: Xeon B\nflags\t\t: fpu\n")
    assert run.cpuinfo(text) == {"model": "Xeon A", "vendor": "GenuineIntel",
                                 "flags": {"fpu", "avx2", "avx512f", "amx_tile"}}
    # An aarch64 kernel names neither the model nor the vendor this way.
    assert run.cpuinfo("processor\t: 0\nFeatures\t: fp asimd\n\nprocessor\t: 1\n") == {
        "model": None, "vendor": None, "flags": set()}


def test_machine_records_vendor_and_known_isa_flags():
    meta = run.machine()
    assert meta["cpu"] and set(meta["cpu_isa"]) <= set(run.ISA_FLAGS)
    assert list(meta["cpu_isa"]) == [f for f in run.ISA_FLAGS if f in meta["cpu_isa"]]
