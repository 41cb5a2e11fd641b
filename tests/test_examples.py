"""Every example notebook runs end to end, as a user would run it, and saves at least one figure.

Each notebook in examples/ is executed in a fresh Python kernel with nbclient, in the repository root (so the
worktree's packages are the ones imported) and with EXAMPLES_OUT pointing at a temporary folder, the notebooks'
convention for where figures go. A cell that raises fails the test with the cell's traceback.
"""
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
# The examples promise well under a minute each on 2 cores; one cell may take most of that (model load + sampling).
CELL_TIMEOUT_S = 120


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_executes_and_saves_a_png(notebook, tmp_path, monkeypatch):
    monkeypatch.setenv("EXAMPLES_OUT", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports this checkout, wherever ldm is installed
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError (with the cell's source and traceback) on any error
    figures = sorted(tmp_path.rglob("*.png"))
    assert figures, f"{notebook.name} ran but wrote no PNG under EXAMPLES_OUT"
    assert all(path.stat().st_size > 0 for path in figures)


def test_examples_readme_lists_every_notebook():
    readme = (ROOT / "examples" / "README.md").read_text()
    missing = [path.name for path in NOTEBOOKS if path.name not in readme]
    assert not missing, f"examples/README.md does not mention {missing}"
