"""Two-process DDP on CPU (trainer=ddp_cpu, gloo) of the contrastive stage through the real CLI: every caption is
scored against the images of both ranks, the ranks stay in step, and rank 0 exports the text encoder."""

from __future__ import annotations

import pytest
import torch
from scale_helpers import load_json, run_cli, tiny_overrides


def test_ddp_cpu_contrastive_gathers_the_global_batch(shapes_shards, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(shapes_shards, out, max_steps=3, every=3, trainer="ddp_cpu")
    result = run_cli(overrides + [
        "experiment=quickstart_clip", "data.batch_size=4", "data.val_batch_size=4",
        "model.text.num_layers=1",
        "+callbacks.gather._target_=scale_helpers.GatherProbe", f"+callbacks.gather.dirpath={out}/record",
        "+callbacks.recorder._target_=scale_helpers.StepRecorder", f"+callbacks.recorder.dirpath={out}/record",
    ], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch size 8 = data.batch_size 4 x 2 processes (1 nodes)" in result.stdout + result.stderr

    for rank in (0, 1):
        probe = load_json(out / "record" / f"gather-rank{rank}.json")
        assert probe["gathered"] == [0.0, 0.0, 1.0, 1.0]  # rank order, both ranks' rows
        # Each rank's sum() puts 1 on every gathered row; both ranks' gradients come back to the rows' owner (summed,
        # as torch.distributed.nn.all_gather does for open_clip; DDP then averages the parameter gradients).
        assert probe["grad"] == [2.0, 2.0]
    ranks = [load_json(out / "record" / f"steps-rank{r}.json")["weights"] for r in (0, 1)]
    assert ranks[0] == ranks[1]
    # The logged loss is the global batch's (the mean of the ranks' shares, which differ), the same on both ranks.
    local = [load_json(out / "record" / f"gather-rank{r}.json")["losses"] for r in (0, 1)]
    logged = [load_json(out / "record" / f"steps-rank{r}.json")["steps"] for r in (0, 1)]
    for step in ("1", "2", "3"):
        assert local[0][step] != local[1][step]
        assert logged[0][step]["train/loss"] == logged[1][step]["train/loss"]
        assert logged[0][step]["train/loss"] == pytest.approx((local[0][step] + local[1][step]) / 2, rel=1e-6)
    exported = out / "export" / "model.safetensors"
    assert exported.is_file() and not (out / "export" / "rank1").exists()
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
