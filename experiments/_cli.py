"""The command line the sized experiment scripts share.

    python experiments/<script>.py --workdir=runs/<name> [--size=tiny] [--seed=0]

``--size`` picks the script's default run (``full``) or its seconds-scale one
(``tiny``, what the tests run); ``--seed`` replaces the config's ``seed``
field. Figures go to files (matplotlib's Agg backend: a notebook that imports
the script keeps its inline backend).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any


def sized_main(
    argv: Sequence[str] | None,
    *,
    description: str,
    get_config: Callable[[str], Any],
    run: Callable[[Any, str], tuple[dict[str, Any], Any]],
    outputs: str,
    seed: bool = True,
) -> dict[str, Any]:
    """Parses ``--workdir``, ``--size`` (and ``--seed``), runs, prints what was written.

    Args:
      argv: the arguments (``None``: ``sys.argv[1:]``).
      description: the ``--help`` text (the script's first docstring line).
      get_config: ``size -> config`` for ``"full"`` and ``"tiny"``.
      run: ``(config, workdir) -> (metrics, anything)``.
      outputs: the files besides ``metrics.json`` and ``results.md``, for the
        closing line.
      seed: offer ``--seed`` (a frozen dataclass config with a ``seed`` field).

    Returns:
      ``run``'s metrics.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", required=True, help="where results go")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # files only; a notebook keeps its inline backend
    config = get_config(args.size)
    if seed:
        config = dataclasses.replace(config, seed=args.seed)
    start = time.perf_counter()
    metrics, _ = run(config, args.workdir)
    print(f"wrote {args.workdir}/metrics.json, results.md, {outputs} in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return metrics
