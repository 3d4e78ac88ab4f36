"""notebooks/quickstart.ipynb runs end to end (tiny sizes through its environment parameters)."""

import os

import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), os.pardir, "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_executes(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("QUICKSTART_STEPS", "12")
    monkeypatch.setenv("QUICKSTART_BATCH", "8")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert "parameters" in nb.cells[2].metadata.get("tags", [])
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": os.getcwd()}}
    )
    client.execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    assert "step 12: loss" in outputs  # the training loop ran its (overridden) 12 steps
    assert "real experts per patch: shape" in outputs  # the heatmap cell ran
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # routing matrix, loss / null ratio, heatmap
