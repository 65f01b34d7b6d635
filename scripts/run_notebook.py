"""Execute notebooks in place, so they are committed with their outputs.

    python scripts/run_notebook.py notebooks/01_neuron.ipynb [more.ipynb ...]

Runs each notebook top to bottom on the ``python3`` kernel from its own
folder, with the repository on ``PYTHONPATH`` and ``JAX_PLATFORMS=cpu``,
writes the outputs into the file and prints how long it took.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]


def main(paths: list[str]) -> None:
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in paths:
        path = Path(name).resolve()
        notebook = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
        nbformat.write(notebook, path)
        print(f"{path.name}: executed in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
