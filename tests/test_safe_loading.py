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


@pytest.mark.parametrize("payload", ["code", "truncated", "truncated safetensors", "protocol 4", "code, protocol 5"])
def test_pipeline_loader_refuses_code_and_names_a_torn_file(tmp_path: Path, payload: str):
    from safetensors.torch import save_file

    from ldm.checkpoints import CheckpointError, load_checkpoint

    path = tmp_path / ("x.safetensors" if "safetensors" in payload else "x.ckpt")
    if payload.startswith(("protocol", "code, protocol")):  # the weights-only reader stops at the protocol's opcodes,
        # before it meets any global: the file was called damaged (an intact one too)
        import pickle

        with open(path, "wb") as f:
            obj = {"payload": _CreatesFile(tmp_path / "ran")} if payload.startswith("code") else {"w": torch.zeros(3)}
            pickle.dump(obj, f, protocol=int(payload[-1]))
        match = (r"its pickle is in a form torch\.load\(weights_only=True\) does not read \(pickle protocol 4 or 5, or "
                 r"not a torch file\) and may carry code; nothing was run or loaded")
    elif payload == "truncated safetensors":  # torch.load hands it to safetensors, whose error was not caught
        save_file({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
        match = "not a readable checkpoint"
    elif payload == "code":
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
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file: give a \.ckpt \(it holds none\)"):
        load_checkpoint(tmp_path)
    # the example named is a file that exists (it appended checkpoints/last.ckpt to whatever folder was given)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for name in ("step0000002.ckpt", "last.ckpt"):
        (tmp_path / "run" / "checkpoints" / name).write_bytes(b"")
    for folder in (tmp_path / "run", tmp_path / "run" / "checkpoints"):
        with pytest.raises(CheckpointError, match=rf"inside it, e\.g\. ckpt_path={tmp_path / 'run'}/checkpoints/"
                                                  rf"last\.ckpt$"):
            load_checkpoint(folder)


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


def test_clip_score_weights_carrying_code_are_refused_without_torchs_advice(tmp_path: Path):
    """`clip_model` (ldm-eval, callbacks.fid): a pickle with code is refused naming it, not with torch's advice to
    load it with weights_only=False and a fix that sent the user to the folder they had given."""
    from test_eval_helpers import tiny_clip

    from ldm.checkpoints import CheckpointError
    from ldm.eval.feature_extractors import clip_loader

    folder = tiny_clip(tmp_path / "clip")
    (folder / "model.safetensors").unlink()
    torch.save({"payload": _CreatesFile(tmp_path / "ran")}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"^clip_model={folder}: the weights' pickle needs code outside plain "
                                              r"tensors \(global [\w.]+\); nothing was run or loaded: give "
                                              r"safetensors weights$") as err:
        clip_loader(str(folder))()
    assert not (tmp_path / "ran").exists() and "safe_globals" not in str(err.value)  # torch's advice to allow it
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02garbage" * 5)  # damaged: said so, not "needs code"
    with pytest.raises(CheckpointError, match=r"the weights' pickle is damaged \(not data torch\.load reads\)"):
        clip_loader(str(folder))()


def test_transformers_folders_never_run_their_code_and_damaged_files_are_named(tmp_path: Path):
    """model.conditioner.name_or_path: a config.json whose auto_map points at the folder's own Python is refused
    without asking (transformers would prompt in a terminal), a pickle with code is refused without torch's advice to
    load it unsafely, and damaged weights or tokenizer files are one ConfigError naming the key."""
    import json
    import shutil

    from convert_helpers import tiny_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.conditioning import build_conditioner
    from ldm.config import ConfigError

    marker = tmp_path / "PWNED"
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    good = tmp_path / "clip"
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(good)
    tokenizer.save_pretrained(good)

    def variant(name: str, change) -> str:
        folder = shutil.copytree(good, tmp_path / name)
        change(folder)
        return str(folder)

    def remote_code(folder: Path) -> None:
        (folder / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="evilmodel", auto_map={"AutoConfig": "evilmod.EvilConfig",
                                                        "AutoModel": "evilmod.EvilModel"})
        (folder / "config.json").write_text(json.dumps(config))

    def pickled(folder: Path) -> None:
        (folder / "model.safetensors").unlink()
        torch.save({"payload": _CreatesFile(marker)}, folder / "pytorch_model.bin")

    def truncated(folder: Path) -> None:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])

    def bad_vocabulary(folder: Path) -> None:
        (folder / "tokenizer.json").write_text("{bad")

    cases = [("hf", variant("remote", remote_code), "custom code"),
             ("clip", variant("pickled", pickled), r"pickle needs code outside plain tensors .* nothing was run"),
             ("clip", variant("truncated", truncated), "cannot load CLIPTextModel, a file there is damaged"),
             ("clip", variant("vocab", bad_vocabulary), "cannot load CLIPTokenizer.*Expecting property name")]
    for kind, folder, message in cases:
        with pytest.raises(ConfigError, match=rf"^model\.conditioner\.name_or_path='{folder}'.*{message}") as err:
            build_conditioner({"kind": kind, "name_or_path": folder})
        assert "weights_only" not in str(err.value)
    assert not marker.exists()


def test_damaged_exports_manifests_and_side_files_are_named(tmp_path: Path):
    """Our exports' config.json, model.safetensors and latent_stats.json, a diffusers folder's JSON files, the LDM
    YAML beside a single file and a prompts file that is not UTF-8: one ConfigError naming the key or the file."""
    import json

    from convert_helpers import tiny_sd_pipeline
    from scale_helpers import tiny_autoencoder_export

    from ldm.config import ConfigError
    from ldm.convert import load_components
    from ldm.convert.load import load_autoencoder_any
    from ldm.io import read_lines

    autoencoder = tiny_autoencoder_export(tmp_path / "ae")
    (autoencoder / "latent_stats.json").write_text(json.dumps({"scale_factor": "abc"}))
    with pytest.raises(ConfigError, match=r"^model\.autoencoder_path: .*latent_stats\.json has scale_factor='abc'"):
        load_autoencoder_any(autoencoder)
    (autoencoder / "latent_stats.json").write_text('{"scale_factor": NaN}')  # json reads NaN and Infinity
    with pytest.raises(ConfigError, match=r"latent_stats\.json has scale_factor=nan, not a positive finite number"):
        load_autoencoder_any(autoencoder)
    (autoencoder / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"^model\.autoencoder_path: .*config\.json holds a JSON list"):
        load_autoencoder_any(autoencoder)
    (autoencoder / "config.json").write_text("{}")
    (autoencoder / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(ConfigError, match=r"^model\.autoencoder_path: .*model\.safetensors is not a readable"):
        load_autoencoder_any(autoencoder)

    tiny_sd_pipeline(tmp_path, "sd1")
    (tmp_path / "sd1" / "model_index.json").write_text(json.dumps({"unet": 5}))
    with pytest.raises(ConfigError, match=r"^model\.init_from=.*unet=5 is not a \[library, class\] pair"):
        load_components(tmp_path / "sd1", key="model.init_from")

    single = tmp_path / "model.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(single))
    (tmp_path / "model.yaml").write_text("model:\n  params:\n    beta0: 0.00085\n"
                                         "    linear_start: ${model.params.beta0}\n")
    from ldm.convert.single_file import _sidecar_yaml
    assert _sidecar_yaml(single)["linear_start"] == 0.00085  # interpolations resolved, as OmegaConf configs are
    (tmp_path / "model.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {tmp_path}/PWNED']\n")
    with pytest.raises(ConfigError, match=r"model\.yaml \(the LDM config beside the file\) is not plain YAML"):
        load_components(single, key="model.init_from")
    assert not (tmp_path / "PWNED").exists()

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red \xff circle\n")
    with pytest.raises(ConfigError, match=r"^prompts_file=.* is not UTF-8 text"):
        read_lines(prompts, "prompts_file")


def test_an_export_whose_weights_come_from_another_export_is_named(tmp_path: Path):
    """config.json of one export beside model.safetensors of another (a folder assembled by hand): torch's
    load_state_dict printed a page of missing keys and size mismatches naming neither the key nor the folder."""
    import shutil
    from dataclasses import asdict

    from scale_helpers import tiny_autoencoder_export

    from ldm.conditioning.byte import ByteTextEncoder
    from ldm.config import ConfigError
    from ldm.modules.latent_diffusion import LatentDiffusionModule
    from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm.nn.unet import unet_config
    from ldm.pipeline import LatentDiffusionPipeline

    def mixed(config_from: Path, weights_from: Path, name: str) -> Path:
        shutil.copytree(config_from, tmp_path / name)
        shutil.copy(weights_from / "model.safetensors", tmp_path / name / "model.safetensors")
        return tmp_path / name

    text = [ByteTextEncoder(width=w, num_layers=1, num_heads=2, max_length=16).save_pretrained(tmp_path / f"text{w}")
            for w in (32, 64)]
    with pytest.raises(ConfigError, match=r"^model\.conditioner\.name_or_path=.*text_mixed: the weights in "
                                          r"model\.safetensors do not fit the network its config\.json describes \(.* "
                                          r"of another shape, e\.g\. .*\(config\.json: \(.*\); the two files come "
                                          r"from different exports: copy the whole export folder$"):
        ByteTextEncoder.from_pretrained(mixed(text[1], text[0], "text_mixed"),
                                        config_key="model.conditioner.name_or_path")

    autoencoder = tiny_autoencoder_export(tmp_path / "ae")
    deeper = AutoencoderKL(AutoencoderConfig(resolution=32, ch=16, ch_mult=[1, 2, 2], num_res_blocks=2,
                                             norm_groups=8)).save_pretrained(tmp_path / "ae2")
    with pytest.raises(ConfigError, match=r"^model\.autoencoder_path=.*ae_mixed: the weights in model\.safetensors do "
                                          r"not fit .*\(\d+ missing, e\.g\. encoder\.down"):
        AutoencoderKL.from_pretrained(mixed(deeper, autoencoder, "ae_mixed"), key="model.autoencoder_path")

    pipelines = [LatentDiffusionModule({
        "autoencoder_path": str(autoencoder), "unet": asdict(unet_config("tiny", model_channels=channels)),
        "conditioner": {"kind": "byte", "width": 64, "num_layers": 1, "num_heads": 2}, "ema_decay": None,
    }).pipeline.save_pretrained(tmp_path / f"ldm{channels}") for channels in (16, 32)]
    with pytest.raises(ConfigError, match=r"^ckpt_path=.*ldm_mixed: the weights in model\.safetensors do not fit .* "
                                          r"of another shape, e\.g\. unet\."):
        LatentDiffusionPipeline.from_pretrained(mixed(pipelines[0], pipelines[1], "ldm_mixed"))
    assert LatentDiffusionPipeline.from_pretrained(pipelines[0]).unet.config.model_channels == 16  # (whole: loads)
