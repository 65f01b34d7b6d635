"""Every notebook in ``notebooks/`` runs top to bottom without an error.

Each one is executed afresh with nbclient on the ``python3`` kernel (the
committed outputs are not trusted), with ``JAX_PLATFORMS=cpu`` and the
repository on ``PYTHONPATH`` so ``import nnlib`` and ``import experiments``
work from the notebook's folder. A notebook that errors fails with the cell
source and the traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 300  # per cell; each notebook is meant to run in under 2 minutes


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for c in notebook.cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_every_notebook_is_committed_with_its_outputs():
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        code = [c for c in notebook.cells if c.cell_type == "code" and c.source.strip()]
        assert code, f"{path.name} has no code"
        assert all(c.get("execution_count") for c in code), (
            f"{path.name}: commit it executed (scripts/run_notebook.py), so it reads on a code host")
