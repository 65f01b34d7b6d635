"""Deep RL on CartPole-v1: PPO and DQN, each one compiled program, against the bar of 475.

    python experiments/rl_cartpole.py --workdir=runs/rl_cartpole [--config.num_seeds=1]
        [--config.ppo.num_envs=8] [--config.algorithms=ppo] ...

CartPole-v1 (gymnax 1.0) pays 1 per step the pole stays up, up to a
500-step time limit; Gym calls it solved at a mean return of 475. Each
algorithm trains ``num_seeds`` seeds side by side in one ``jax.jit`` program
(``jax.vmap`` over seeds of ``nnlib.rl.make_ppo_train`` /
``make_dqn_train``: rollouts are ``lax.scan`` over time and ``vmap`` over
environments, the whole run a ``lax.scan`` over updates), so no Python runs
between environment steps. Defaults are PureJaxRL's CartPole settings (Lu et
al. 2022) except PPO's rollout shape: PPO with 16 environments x 64 steps
(PureJaxRL: 4 x 128, which left one seed in eight below 480 here), 4 epochs
of 4 minibatches, Adam 2.5e-4 annealed, 500k steps; Double DQN with 10 environments, a 10k
replay buffer, one batch of 128 every 10 steps, a hard target copy every 500
steps, epsilon 1 -> 0.05 over half of its 500k steps.

The trained policies are then evaluated on ``eval_episodes`` fresh episodes
per seed, acting deterministically (the argmax of PPO's logits, the greedy
action of DQN's Q-values; PPO's sampled policy is reported too).

Times are wall-clock on whatever this runs on: compile time apart from
training time, and environment steps per second = all seeds' environment
steps / training time (acting, environment physics and learning together).
The machine's load average is recorded beside them, because on a shared CPU
the same program runs several times slower.

Writes ``metrics.json`` (flat keys, ``{ppo,dqn}_*`` and ``{ppo,dqn}_cost_*``),
``results.md`` and ``learning_curves.png`` into the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nnlib.compress import cost_report, format_cost  # noqa: E402
from nnlib.rl import (  # noqa: E402
    DQNConfig,
    PPOConfig,
    categorical_policy,
    evaluate_policy,
    greedy_q_policy,
    make_dqn_train,
    make_dqn_update,
    make_ppo_train,
    make_ppo_update,
)

ALGORITHMS = ("ppo", "dqn")


def get_config() -> ml_collections.ConfigDict:
    """Both algorithms at PureJaxRL's CartPole-v1 settings, 3 seeds each, except
    PPO's rollout: 16 environments x 64 steps (1,024 samples per update)
    instead of 4 x 128 (512), so half as many, less noisy updates over the same
    500k steps. Over 8 seeds every PPO seed then ended at >= 496; at 4 x 128
    one seed in eight collapsed mid-run and ended at 476.8."""
    c = ml_collections.ConfigDict()
    c.algorithms = ALGORITHMS
    c.seed = 0
    c.num_seeds = 3
    c.eval_episodes = 100
    c.solved_return = 475.0
    c.cost_repeats = 10
    c.ppo = ml_collections.ConfigDict(dataclasses.asdict(PPOConfig()))
    c.ppo.update(num_envs=16, num_steps=64)
    c.dqn = ml_collections.ConfigDict(dataclasses.asdict(DQNConfig()))
    return c


def tiny_config() -> ml_collections.ConfigDict:
    """A smoke-test size: a few updates of each algorithm, 2 seeds, 8 evaluation episodes."""
    c = get_config()
    c.num_seeds, c.eval_episodes, c.cost_repeats = 2, 8, 1
    c.ppo.update(num_envs=4, num_steps=16, total_timesteps=3 * 64, num_minibatches=2,
                 update_epochs=1, hidden_sizes=(16, 16))
    c.dqn.update(num_envs=4, total_timesteps=400, buffer_size=200, batch_size=16,
                 learning_starts=100, train_frequency=4, target_update_interval=40,
                 log_every=100, hidden_sizes=(16,))
    return c


def algorithm_config(name: str, c: ml_collections.ConfigDict) -> PPOConfig | DQNConfig:
    """The ``PPOConfig`` or ``DQNConfig`` a config section describes (lists become tuples)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in c.to_dict().items()}
    return PPOConfig(**fields) if name == "ppo" else DQNConfig(**fields)


def steps_to_reach(timesteps: np.ndarray, returns: np.ndarray, bar: float) -> float | None:
    """The first logged environment step at which the training return is ``>= bar``
    (one noisy log entry suffices: a first sign, not a solve), or ``None``.

    ``timesteps: [logs]``, ``returns: [logs]`` (one seed's training curve).
    """
    hit = np.flatnonzero(returns >= bar)
    return float(timesteps[hit[0]]) if len(hit) else None


def train_and_evaluate(name: str, algo, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Trains ``num_seeds`` seeds of one algorithm in one program, evaluates and costs them.

    Returns flat ``{name}_*`` metrics plus ``"curves"`` (timesteps ``[logs]``,
    training returns ``[seeds, logs]``) for the plot.
    """
    import gymnax

    make_train, make_update = ((make_ppo_train, make_ppo_update) if name == "ppo"
                               else (make_dqn_train, make_dqn_update))
    seeds = jax.random.split(jax.random.key(config.seed), config.num_seeds)
    program = jax.jit(jax.vmap(make_train(algo)))
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    compiled = program.lower(seeds).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    states, curves = jax.block_until_ready(compiled(seeds))
    train_s = time.perf_counter() - start
    load_end = os.getloadavg()[0]

    env, env_params = gymnax.make(algo.env_name)

    @jax.jit
    @jax.vmap
    def evaluate(params, key):  # one seed's parameters -> its returns [eval_episodes]
        policies = ({"deterministic": categorical_policy(states.apply_fn, params,
                                                         deterministic=True),
                     "stochastic": categorical_policy(states.apply_fn, params)}
                    if name == "ppo" else {"deterministic": greedy_q_policy(states.apply_fn,
                                                                            params)})
        return {mode: evaluate_policy(env, env_params, policy, key,
                                      config.eval_episodes)["return"]
                for mode, policy in policies.items()}

    start = time.perf_counter()
    eval_keys = jax.random.split(jax.random.key(config.seed + 1), config.num_seeds)
    returns = jax.tree.map(np.asarray, evaluate(states.params, eval_keys))  # [seeds, episodes]
    eval_s = time.perf_counter() - start

    timesteps = np.asarray(curves["timesteps"][0])
    train_returns = np.asarray(curves["episode_return"])  # [seeds, logs]
    env_steps = int(timesteps[-1])
    per_seed = returns["deterministic"].mean(1)
    to_solve = [steps_to_reach(timesteps, r, config.solved_return) for r in train_returns]
    reached = [s for s in to_solve if s is not None]
    m: dict[str, Any] = {
        "eval_return_mean": float(returns["deterministic"].mean()),
        "eval_return_std": float(returns["deterministic"].std()),
        "eval_return_min_seed": float(per_seed.min()),
        "seeds_solved": int((per_seed >= config.solved_return).sum()),
        "solved": bool((per_seed >= config.solved_return).all()),
        "final_train_return": float(train_returns[:, -1].mean()),
        "train_steps_to_first_solved_mean": float(np.mean(reached)) if reached else None,
        "train_seeds_reaching_solved": len(reached),
        "env_steps_per_seed": env_steps,
        "env_steps_total": env_steps * config.num_seeds,
        "compile_time_s": compile_s,
        "train_time_s": train_s,
        "eval_time_s": eval_s,
        "time_to_trained_s": compile_s + train_s,
        "env_steps_per_s": env_steps * config.num_seeds / train_s,
        "load_avg_1min_start": load_start,
        "load_avg_1min_end": load_end,
    }
    for i, r in enumerate(per_seed):
        m[f"eval_return_seed{i}"] = float(r)
    if name == "ppo":
        m["eval_stochastic_return_mean"] = float(returns["stochastic"].mean())
        m["eval_stochastic_return_std"] = float(returns["stochastic"].std())

    # The cost of one real training step: a PPO update (rollout + epochs), or a
    # DQN iteration that takes a gradient step (so its state is past learning_starts).
    init, update = make_update(algo)
    runner = jax.jit(init)(jax.random.key(config.seed))
    if name == "ppo":
        num_steps = algo.num_updates
    else:
        learns_at = -(-algo.learning_starts // algo.train_frequency) * algo.train_frequency
        runner = runner._replace(timesteps=jnp.int32(max(learns_at, algo.num_envs)
                                                     - algo.num_envs))
        num_steps = algo.total_timesteps // algo.num_envs
    report = cost_report(jax.jit(update), runner, jax.random.key(1),
                         params=runner.train_state.params,
                         opt_state=runner.train_state.opt_state, num_steps=num_steps,
                         repeats=config.cost_repeats, warmup=1)
    print(f"{name}: one training step ({'update' if name == 'ppo' else 'iteration'}), one seed:"
          f"\n{format_cost(report)}", flush=True)
    m |= report
    out = {f"{name}_{k}": v for k, v in m.items()}
    out["curves"] = (timesteps, train_returns)
    return out


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains, evaluates and costs every algorithm in ``config.algorithms``;
    writes ``metrics.json``, ``results.md`` and ``learning_curves.png``; returns the metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    unknown = set(config.algorithms) - set(ALGORITHMS)
    if unknown:
        raise ValueError(f"rl_cartpole: algorithms must be among {ALGORITHMS}, got {unknown}")
    start = time.perf_counter()
    metrics: dict[str, Any] = {"num_seeds": config.num_seeds,
                               "eval_episodes_per_seed": config.eval_episodes,
                               "solved_return": config.solved_return,
                               "cpu_count": os.cpu_count(),
                               "device": str(jax.devices()[0])}
    curves = {}
    for name in config.algorithms:
        algo = algorithm_config(name, config[name])
        print(f"{name}: training {config.num_seeds} seed(s) x {algo.total_timesteps:,} "
              f"environment steps in one program ...", flush=True)
        result = train_and_evaluate(name, algo, config)
        curves[name] = result.pop("curves")
        metrics |= result
        print(f"{name}: compile {result[f'{name}_compile_time_s']:.1f} s, train "
              f"{result[f'{name}_train_time_s']:.1f} s "
              f"({result[f'{name}_env_steps_per_s']:,.0f} env steps/s), evaluation return "
              f"{result[f'{name}_eval_return_mean']:.1f} +/- "
              f"{result[f'{name}_eval_return_std']:.1f}", flush=True)
    metrics["wall_time_s"] = time.perf_counter() - start

    table = results_table(metrics, config)
    (workdir / "results.md").write_text(table + "\n")
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    plot(curves, config.solved_return, workdir / "learning_curves.png")
    print(table, flush=True)
    print(f"wrote {workdir / 'metrics.json'}, {workdir / 'results.md'}, "
          f"{workdir / 'learning_curves.png'}", flush=True)
    return metrics


def results_table(metrics: dict[str, Any], config: ml_collections.ConfigDict) -> str:
    n, episodes = config.num_seeds, config.eval_episodes
    lines = [
        f"CartPole-v1, {n} seed(s) per algorithm trained in one program; evaluation: "
        f"{episodes} episodes per seed, deterministic policy (solved: mean >= "
        f"{config.solved_return:g}). {metrics['device']}, {metrics['cpu_count']} CPU core(s).",
        "",
        "| algorithm | env steps / seed | compile (s) | train (s) | env steps / s (all seeds) "
        "| eval return | worst seed | seeds solved | first train return >= 475 (steps) "
        "| CPU load (1 min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in config.algorithms:
        m = {k[len(name) + 1:]: v for k, v in metrics.items() if k.startswith(name + "_")}
        first = m["train_steps_to_first_solved_mean"]
        to_solve = (f"{first:,.0f} ({m['train_seeds_reaching_solved']}/{n})"
                    if first is not None else f"never (0/{n})")
        lines.append(
            f"| {name.upper()} | {m['env_steps_per_seed']:,} | {m['compile_time_s']:.1f} "
            f"| {m['train_time_s']:.1f} | {m['env_steps_per_s']:,.0f} "
            f"| {m['eval_return_mean']:.1f} +/- {m['eval_return_std']:.1f} "
            f"| {m['eval_return_min_seed']:.1f} | {m['seeds_solved']}/{n} | {to_solve} "
            f"| {m['load_avg_1min_start']:.1f} -> {m['load_avg_1min_end']:.1f} |")
    if "ppo_eval_stochastic_return_mean" in metrics:
        lines += ["", f"PPO's sampled (stochastic) policy: "
                  f"{metrics['ppo_eval_stochastic_return_mean']:.1f} +/- "
                  f"{metrics['ppo_eval_stochastic_return_std']:.1f}."]
    lines += ["", "Per-seed evaluation returns: " + "; ".join(
        f"{name.upper()} " + ", ".join(f"{metrics[f'{name}_eval_return_seed{i}']:.1f}"
                                       for i in range(n)) for name in config.algorithms) + "."]
    return "\n".join(lines)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` entries (shorter at the start);
    ``values: [n] -> [n]``."""
    sums = np.cumsum(np.insert(np.asarray(values, np.float64), 0, 0.0))  # sums[k] = sum(v[:k])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - window, 0)
    return (sums[end] - sums[start]) / (end - start)


def plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], solved: float, path: Path) -> None:
    """Training-episode return against environment steps, one line per seed
    (faint: as logged; solid: a moving average over ~2% of the run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for (name, (steps, returns)), color in zip(curves.items(), ("tab:blue", "tab:orange"),
                                               strict=False):
        window = max(1, round(len(steps) / 50))
        for i, r in enumerate(returns):
            ax.plot(steps, r, color=color, alpha=0.15, lw=0.6)
            ax.plot(steps, smooth(r, window), color=color, lw=1.3,
                    label=f"{name.upper()} (moving average of {window})" if i == 0 else None)
    ax.axhline(solved, color="k", ls="--", lw=0.8, label=f"solved ({solved:g})")
    ax.set(xlabel="environment steps (per seed)", ylabel="mean return of finished episodes",
           title="CartPole-v1: training curves (exploring policy), one line per seed")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    from absl import flags

    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_dict("config", get_config())
    flags.DEFINE_string("workdir", "runs/rl_cartpole", "where results go")
    app.run(main)
