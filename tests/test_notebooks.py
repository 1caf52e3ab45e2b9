"""The notebooks in notebooks/: stored without outputs, and each runs top to bottom (small mode)."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
  names = [p.name for p in NOTEBOOKS]
  assert names == ["01_memory_layer.ipynb", "02_train_and_probe.ipynb", "03_scale_and_cost.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_stripped(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs"
      assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
  # The kernel inherits this process's environment.
  monkeypatch.setenv("MEMJAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("MEMJAX_REPO", str(REPO))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MEMJAX_DATA_DIR", str(tmp_path / "data"))
  monkeypatch.chdir(tmp_path)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors
  assert not any((REPO / "notebooks").glob("*.png"))
