"""The committed notebooks execute without a cell error, so they cannot rot.

Kernel: the test writes its own kernelspec, ``belm-test-python``, whose argv is *this*
interpreter (``sys.executable -m ipykernel_launcher``), into a private directory put first on
``JUPYTER_PATH``. So the notebook always runs in the venv that runs pytest (with belm
installed), whatever kernelspecs a user or the system has installed, and on a fresh
``pip install -e .[dev]`` (which brings ipykernel, nbclient and nbformat) nothing else is
needed. Runtime and connection files also go to temporary directories (read-only HOME is fine).
"""

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "belm-test-python"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "data" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "belm tests (this interpreter)",
        "language": "python",
    }))
    env = {"JUPYTER_PATH": str(root / "data"), "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
           "IPYTHONDIR": str(root / "ipython")}
    old = {k: os.environ.get(k) for k in env}
    if old["JUPYTER_PATH"]:
        env["JUPYTER_PATH"] += os.pathsep + old["JUPYTER_PATH"]
    os.environ.update(env)
    try:
        yield KERNEL
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_notebooks_exist():
    assert "lte_order.ipynb" in [p.name for p in NOTEBOOKS]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_without_errors(path, kernel_name):
    committed = nbformat.read(path, as_version=4)
    # Committed with its outputs (plots embedded) so that readers see them.
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code), f"{path.name}: commit it executed"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), f"{path.name}: no plots"
    assert not any(o.output_type == "error" for c in code for o in c.outputs)

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=600,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()   # raises CellExecutionError (with the traceback) on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
