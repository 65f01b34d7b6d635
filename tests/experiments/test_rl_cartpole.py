"""Smoke run of experiments/rl_cartpole.py at tiny size: files written, keys there, numbers sane."""

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.rl_cartpole import run, smooth, tiny_config  # noqa: E402


def test_rl_cartpole_experiment_tiny(tmp_path):
    config = tiny_config()
    metrics = run(config, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert names >= {"metrics.json", "results.md", "learning_curves.png"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    for name, steps in (("ppo", 3 * 64), ("dqn", 400)):
        assert metrics[f"{name}_env_steps_per_seed"] == steps
        assert metrics[f"{name}_env_steps_total"] == 2 * steps
        # Every CartPole step pays 1 and an episode lasts at most 500 steps.
        for i in range(2):
            assert 1.0 <= metrics[f"{name}_eval_return_seed{i}"] <= 500.0
        np.testing.assert_allclose(
            metrics[f"{name}_eval_return_mean"],
            np.mean([metrics[f"{name}_eval_return_seed{i}"] for i in range(2)]), rtol=1e-5)
        assert metrics[f"{name}_eval_return_min_seed"] <= metrics[f"{name}_eval_return_mean"]
        assert 0 <= metrics[f"{name}_seeds_solved"] <= 2
        assert metrics[f"{name}_compile_time_s"] > 0 and metrics[f"{name}_train_time_s"] > 0
        np.testing.assert_allclose(
            metrics[f"{name}_env_steps_per_s"],
            2 * steps / metrics[f"{name}_train_time_s"], rtol=1e-6)
        assert metrics[f"{name}_cost_flops_per_step"] > 0
        assert metrics[f"{name}_cost_step_time_s"] > 0
    # One PPO step is one update; one DQN step is one iteration of num_envs=4 env steps.
    assert metrics["ppo_cost_num_steps"] == 3 and metrics["dqn_cost_num_steps"] == 100
    # ActorCritic (16, 16) on 4 observations, 2 actions: two towers + heads.
    assert metrics["ppo_cost_num_params"] == 2 * (4 * 16 + 16 + 16 * 16 + 16) + (16 * 2 + 2) + 17
    assert metrics["dqn_cost_num_params"] == 4 * 16 + 16 + 16 * 2 + 2
    assert "eval_stochastic_return_mean" in " ".join(metrics)
    assert "| PPO |" in (tmp_path / "results.md").read_text()


def test_smooth_is_a_trailing_moving_average():
    values = np.random.default_rng(0).normal(size=23)
    expected = [values[max(0, i - 4):i + 1].mean() for i in range(23)]
    np.testing.assert_allclose(smooth(values, 5), expected, rtol=1e-12)
