"""The notebooks run top to bottom in their small mode (`make notebooks` runs all of them;
`make docs` runs every one on every build)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, tmp_path: Path) -> nbformat.NotebookNode:
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    os.environ["BAYESNOISE_SMALL"] = "1"
    client = NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    return book


def test_notebooks_are_stored_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        book = nbformat.read(path, as_version=4)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


# slow: `make docs` runs every notebook on every build (a failing cell fails it), and
# `make test-slow` runs these two
@pytest.mark.slow
@pytest.mark.parametrize("name", ["01_gsm_zoo.ipynb", "04_inference_rules.ipynb"])
def test_notebook_runs(name, tmp_path):
    book = execute(name, tmp_path)
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "stream" for o in outputs)  # its checks printed their result
