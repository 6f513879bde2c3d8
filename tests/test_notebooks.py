"""The notebooks run: their code cells execute top to bottom against a tiny checkpoint built here."""

import json
from pathlib import Path

import pytest
from test_eval_helpers import tiny_ldm_checkpoint

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_code_cells_run(notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LDM_CKPT", str(tiny_ldm_checkpoint(tmp_path)))
    monkeypatch.setenv("LDM_NUM_STEPS", "3")
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells, f"{notebook} has no code cells"
    namespace: dict = {}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{notebook.name}[{i}]", "exec"), namespace)
    if "accuracy" in namespace:
        assert 0.0 <= namespace["accuracy"] <= 1.0
    if "grid_image" in namespace:
        assert namespace["grid_image"].size[0] > 0


def test_explore_checkpoint_before_the_quickstart_names_its_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run before `make quickstart` (no export at the default path), it named `ckpt_path`, a key the notebook lacks."""
    from ldm.checkpoints import MissingCheckpointError

    monkeypatch.chdir(tmp_path)  # ../runs/quickstart/ldm/export lies nowhere
    monkeypatch.delenv("LDM_CKPT", raising=False)
    notebook = Path(__file__).parents[1] / "notebooks" / "explore_checkpoint.ipynb"
    first = next(c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code")
    with pytest.raises(MissingCheckpointError, match=r"^LDM_CKPT=\.\./runs/quickstart/ldm/export does not exist"):
        exec(compile("".join(first["source"]), notebook.name, "exec"), {})
