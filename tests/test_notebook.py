"""notebooks/tinystories.ipynb runs top to bottom (the small setting), and its committed copy has outputs."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "tinystories.ipynb"


def test_notebook_is_committed_with_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("outputs") for c in code), "run the notebook and commit it with its outputs"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)


def test_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("STORYGPT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("STORYGPT_NOTEBOOK_WORK", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)
    assert "layer 3, neuron" in text and "head 0:" in text
    assert os.path.isdir(tmp_path / "tiny_run")
