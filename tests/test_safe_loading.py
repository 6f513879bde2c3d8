"""Nothing executed: a checkpoint whose pickle runs code, handed to every command-line entry point that opens a file
by path, is refused before any of its code runs; the command ends with one line naming the file and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent


class _CreatesFile:
    """Unpickling this calls os.system, as a malicious checkpoint would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def entry_points(evil: Path, shards: Path, tmp: Path) -> dict[str, list[str]]:
    """Every CLI option that opens a checkpoint by path, each given `evil`."""
    train = ["data.num_workers=0", "logger=csv", f"data.train_shards={shards}/train-*.tar",
             f"data.val_shards={shards}/val-*.tar"]
    return {
        "ldm-train ckpt_path": ["ldm-train", "experiment=quickstart_vae", f"ckpt_path={evil}",
                               f"paths.output_dir={tmp}/run1", *train],
        "ldm-train model.autoencoder_path": ["ldm-train", "experiment=quickstart_ldm",
                                             f"model.autoencoder_path={evil}", f"paths.output_dir={tmp}/run2", *train],
        "ldm-train model.init_from": ["ldm-train", "model=ldm/tiny", f"model.init_from={evil}",
                                      f"paths.output_dir={tmp}/run3", *train],
        "ldm-sample ckpt_path": ["ldm-sample", f"ckpt_path={evil}", "prompts=[a red circle]",
                                 f"output_dir={tmp}/samples"],
        "ldm-eval ckpt_path": ["ldm-eval", f"ckpt_path={evil}", f"output_dir={tmp}/eval", f"val_shards={shards}",
                               "metrics=[shapes_color_accuracy]"],
        "ldm-export ckpt_path": ["ldm-export", f"ckpt_path={evil}", f"output_dir={tmp}/export"],
        "ldm-encode autoencoder_path": ["ldm-encode", f"shards={shards}/train-*.tar", f"autoencoder_path={evil}",
                                        f"output_dir={tmp}/latents"],
    }


def test_no_entry_point_runs_code_from_a_checkpoint(tmp_path: Path, shapes_shards: Path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"payload": _CreatesFile(marker)}}, evil)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    cases = entry_points(evil, shapes_shards, tmp_path)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(run, cases.values())))
    for name, result in results.items():
        output = result.stdout + result.stderr
        assert result.returncode == 2, f"{name}: exit {result.returncode}\n{output[-2000:]}"
        assert str(evil) in result.stderr and "Traceback" not in output, f"{name}:\n{output[-2000:]}"
    assert not marker.exists(), "a checkpoint's pickled code ran"


@pytest.mark.parametrize("payload", ["code", "truncated"])
def test_pipeline_loader_refuses_code_and_names_a_torn_file(tmp_path: Path, payload: str):
    from ldm.checkpoints import CheckpointError, load_checkpoint

    path = tmp_path / "x.ckpt"
    if payload == "code":
        torch.save({"payload": _CreatesFile(tmp_path / "ran")}, path)
        match = "refused to load"
    else:
        torch.save({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
        match = "not a readable checkpoint"
    with pytest.raises(CheckpointError, match=f"ckpt_path={path}.*{match}"):
        load_checkpoint(path)
    assert not (tmp_path / "ran").exists()


def test_a_missing_checkpoint_or_a_folder_given_as_one_is_named(tmp_path: Path):
    from ldm.checkpoints import CheckpointError, load_checkpoint

    with pytest.raises(CheckpointError, match=r"ckpt_path=.*missing\.ckpt does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file: .* ckpt_path=.*last\.ckpt"):
        load_checkpoint(tmp_path)


def test_inception_weights_are_read_without_running_code_and_checked_key_by_key(tmp_path: Path):
    """`feature_extractor_weights_path` (ldm-eval, callbacks.fid): torch-fidelity would unpickle the file with
    weights_only=False; ours reads it safely first, and a state dict of another network is named in one line."""
    from ldm.checkpoints import CheckpointError
    from ldm.eval.feature_extractors import InceptionFeatures

    marker = tmp_path / "code_ran"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "payload": _CreatesFile(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"feature_extractor_weights_path=.*evil\.pth: refused to load"):
        InceptionFeatures(64, str(tmp_path / "evil.pth"))
    assert not marker.exists(), "the weights file's pickled code ran"
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other\.pth is not torch-fidelity's InceptionV3 state dict \(565 of its "
                                              r"566 tensors missing, 0 unexpected, 1 of another shape"):
        InceptionFeatures(64, str(tmp_path / "other.pth"))
