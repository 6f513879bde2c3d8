"""The notebooks run: their code cells execute top to bottom against a tiny checkpoint built here."""

import json
from pathlib import Path

import pytest
from test_eval_helpers import tiny_ldm_checkpoint

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_code_cells_run(notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LDM_CKPT", str(tiny_ldm_checkpoint(tmp_path, perturbed=True)))
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


def test_explore_checkpoint_grid_and_adherence_are_what_it_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """On a model whose images depend on their prompts: the grid's row r, column j is prompt r with seed j alone
    (its noise depends on that seed only), and the printed accuracy is ShapesAdherence's on the notebook's samples."""
    import torch

    from ldm.eval.shapes_adherence import ShapesAdherence
    from ldm.images import to_uint8

    monkeypatch.setenv("LDM_CKPT", str(tiny_ldm_checkpoint(tmp_path, perturbed=True)))
    monkeypatch.setenv("LDM_NUM_STEPS", "3")
    notebook = Path(__file__).parents[1] / "notebooks" / "explore_checkpoint.ipynb"
    namespace: dict = {}
    for i, cell in enumerate(c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"):
        exec(compile("".join(cell["source"]), f"{notebook.name}[{i}]", "exec"), namespace)
    pipeline, prompts, seeds, images = (namespace[k] for k in ("pipeline", "prompts", "seeds", "images"))
    options = {"sampler": namespace["SAMPLER"], "num_steps": 3, "guidance_scale": namespace["GUIDANCE"]}
    assert (images[0] - images[len(seeds)]).abs().max() > 0.01  # row 0 and row 1 at seed 0: other prompts
    alone = pipeline.generate([prompts[1]], [seeds[2]], **options)[0]
    torch.testing.assert_close(images[len(seeds) + 2], alone, atol=1e-4, rtol=0)  # (batched: other rounding)
    metric = ShapesAdherence()
    metric.update(to_uint8(pipeline.generate(namespace["captions"], list(range(len(namespace["captions"]))),
                                             **options)), namespace["captions"])
    assert metric.compute()["shapes_color_accuracy"] == namespace["accuracy"]


def test_explore_checkpoint_before_the_quickstart_names_its_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run before `make quickstart` (no export at the default path), it named `ckpt_path`, a key the notebook lacks."""
    from ldm.checkpoints import MissingCheckpointError

    monkeypatch.chdir(tmp_path)  # ../runs/quickstart/ldm/export lies nowhere
    monkeypatch.delenv("LDM_CKPT", raising=False)
    notebook = Path(__file__).parents[1] / "notebooks" / "explore_checkpoint.ipynb"
    first = next(c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code")
    with pytest.raises(MissingCheckpointError, match=r"^LDM_CKPT=\.\./runs/quickstart/ldm/export does not exist"):
        exec(compile("".join(first["source"]), notebook.name, "exec"), {})
