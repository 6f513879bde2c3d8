"""End to end through the entry points: shapes shards -> tiny autoencoder and text encoder -> a few diffusion steps
-> ldm-sample."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from ldm.cli.common import CONF_DIR
from ldm.cli.sample import sample
from ldm.cli.train import train
from ldm.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a large red circle in the center on a white background",
           "a small blue square in the top left on a black background"]


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def short_run(shards: Path, output_dir: Path) -> list[str]:
    return [f"paths.output_dir={output_dir}", f"data.train_shards={shards}/train-*.tar",
            f"data.val_shards={shards}/val-*.tar", "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=2",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
            "+trainer.enable_model_summary=false", "callbacks.progress=null", "logger=csv"]


@pytest.fixture(scope="module")
def ldm_checkpoint(shapes_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart experiments shortened to 2 steps each: autoencoder, text encoder, then latent diffusion."""
    root = tmp_path_factory.mktemp("e2e")
    train(compose_config("train", ["experiment=quickstart_vae", *short_run(shapes_shards, root / "vae")]))
    assert (root / "vae" / "export" / "latent_stats.json").is_file()
    metrics = train(compose_config("train", ["experiment=quickstart_clip", *short_run(shapes_shards, root / "clip"),
                                             "data.val_batch_size=4"]))
    assert 0.0 <= metrics["val/accuracy"] <= 1.0 and metrics["val/loss"] > 0
    exported = load_file(root / "clip" / "export" / "model.safetensors")
    trained = torch.load(root / "clip" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert exported and all(torch.equal(trained[f"text_encoder.{k}"], v) for k, v in exported.items())
    train(compose_config("train", ["experiment=quickstart_ldm", f"model.autoencoder_path={root / 'vae' / 'export'}",
                                   f"model.conditioner.name_or_path={root / 'clip'}", "model.val_num_steps=2",
                                   *short_run(shapes_shards, root / "ldm")]))
    assert list((root / "ldm" / "images" / "val").glob("samples_step*.png"))
    return root / "ldm" / "checkpoints" / "last.ckpt"


def test_ldm_sample_cli_writes_images_grid_and_record(ldm_checkpoint: Path, tmp_path: Path):
    out = tmp_path / "samples"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [f"ckpt_path={ldm_checkpoint}", f"prompts=[{PROMPTS[0]}, {PROMPTS[1]}]", "sampler=dpmpp_2m",
            "num_steps=3", "guidance_scale=2.0", "seed=7", "num_images_per_prompt=2", "batch_size=3",
            f"output_dir={out}", "device=cpu"]
    result = subprocess.run([sys.executable, "-m", "ldm.cli.sample", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in out.glob("prompt*.png"))
    assert names == ["prompt000_seed000007.png", "prompt000_seed000008.png", "prompt001_seed000009.png",
                     "prompt001_seed000010.png"]
    grid = torchvision.io.read_image(str(out / "grid.png"))
    assert grid.shape == (3, 2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # rows = prompts, columns = images per prompt
    record = json.loads((out / "sample.json").read_text())
    assert record["prompts"] == PROMPTS and record["seeds"] == [7, 8, 9, 10]


def test_ldm_sample_from_the_export_equals_the_checkpoints_ema(ldm_checkpoint: Path, tmp_path: Path):
    """The run exported its EMA pipeline at the end of fit; ldm-sample takes it as it takes the checkpoint."""
    export = ldm_checkpoint.parents[1] / "export"
    base = {"prompts": PROMPTS, "sampler": "ddim", "num_steps": 2, "guidance_scale": 2.0, "device": "cpu"}
    from_ckpt = sample({**base, "ckpt_path": str(ldm_checkpoint), "output_dir": str(tmp_path / "ckpt")})
    from_export = sample({**base, "ckpt_path": str(export), "output_dir": str(tmp_path / "export")})
    for a, b in zip(from_ckpt, from_export):
        assert torch.equal(torchvision.io.read_image(str(a)), torchvision.io.read_image(str(b)))
    assert json.loads((tmp_path / "export" / "sample.json").read_text())["weights"] == "ema"
    # the weights file inside the export: read with its folder ("not a latent diffusion checkpoint (no UNet config in
    # its hyper_parameters)"); one prompt given bare (Hydra's "str is not a ListConfig" before)
    weights = sample({**base, "prompts": PROMPTS[0], "ckpt_path": str(export / "model.safetensors"),
                      "output_dir": str(tmp_path / "weights")})
    assert len(weights) == 1 and torch.equal(torchvision.io.read_image(str(weights[0])),
                                             torchvision.io.read_image(str(from_export[0])))
    with pytest.raises(ConfigError, match=r"prompts=\[None\] must be a list of prompts, e.g. prompts='\[a red "
                                          r"circle, a blue square\]' \(or one: prompts='a red circle'\)"):
        sample({**base, "prompts": [None], "ckpt_path": str(export), "output_dir": str(tmp_path / "none")})
    from ldm.cli.export import export as ldm_export

    folder = ldm_export({"ckpt_path": str(export / "model.safetensors"), "output_dir": str(tmp_path / "hf")})
    assert (folder / "model_index.json").is_file()
    from ldm.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match=rf"ckpt_path={folder} is a diffusers pipeline folder: this reads ldm's "
                                              rf"own checkpoints and exports; a Stable Diffusion model goes in "
                                              rf"through ldm-train's model.init_from"):
        sample({**base, "ckpt_path": str(folder), "output_dir": str(tmp_path / "diffusers")})


def test_each_file_is_its_prompts_and_seeds_image_from_the_weights_asked_for(tmp_path: Path):
    """3 prompts x 2 images in batches of 4, use_ema=false, on a model that reads its prompts (perturbed): every file
    is the raw weights' image of its own prompt and seed, generated alone; grid.png has a row per prompt and a column
    per copy; the EMA's images differ."""
    from test_eval_helpers import tiny_ldm_checkpoint

    from ldm.images import to_uint8
    from ldm.pipeline import LatentDiffusionPipeline

    ckpt = tiny_ldm_checkpoint(tmp_path / "ldm", perturbed=True)  # 16 px
    prompts = [*PROMPTS, "a small green star in the bottom right on a gray background"]
    base = {"ckpt_path": str(ckpt), "prompts": prompts, "sampler": "ddim", "num_steps": 2, "guidance_scale": 2.0,
            "seed": 5, "num_images_per_prompt": 2, "batch_size": 4, "device": "cpu"}
    paths = sample({**base, "use_ema": False, "output_dir": str(tmp_path / "raw")})
    raw = LatentDiffusionPipeline.from_pretrained(ckpt, use_ema=False)
    read = torchvision.io.read_image
    grid = read(str(tmp_path / "raw" / "grid.png"))
    assert grid.shape == (3, 3 * 16 + 4 * 2, 2 * 16 + 3 * 2)  # (make_grid's padding: 2)
    for n, path in enumerate(paths):
        row, copy = divmod(n, 2)
        assert path.name == f"prompt{row:03d}_seed{5 + n:06d}.png"
        alone = to_uint8(raw.generate([prompts[row]], [5 + n], sampler="ddim", num_steps=2, guidance_scale=2.0))[0]
        assert (read(str(path)).int() - alone.int()).abs().max() <= 1
        assert torch.equal(grid[:, 2 + 18 * row: 18 * (row + 1), 2 + 18 * copy: 18 * (copy + 1)], read(str(path)))
    assert json.loads((tmp_path / "raw" / "sample.json").read_text())["weights"] == "raw"
    ema = sample({**base, "output_dir": str(tmp_path / "ema")})
    assert not torch.equal(read(str(ema[0])), read(str(paths[0])))
    # generate's image_size is the output's side, its eta DDIM's noise; pixels outside [-1, 1] are clipped, not
    # wrapped around
    assert raw.generate([prompts[0]], [0], num_steps=2, image_size=32).shape == (1, 3, 32, 32)
    assert not torch.equal(raw.generate([prompts[0]], [0], num_steps=2, eta=1.0),
                           raw.generate([prompts[0]], [0], num_steps=2))
    assert to_uint8(torch.tensor([-1.2, -1.0, 0.0, 1.0, 1.2])).tolist() == [0, 0, 128, 255, 255]


def test_ldm_export_writes_the_weights_use_ema_names(tmp_path: Path):
    from test_eval_helpers import tiny_ldm_checkpoint

    from ldm.cli.export import export as ldm_export
    from ldm.convert import load_components
    from ldm.pipeline import LatentDiffusionPipeline

    ckpt = tiny_ldm_checkpoint(tmp_path / "ldm", perturbed=True)
    for use_ema in (True, False):
        folder = ldm_export({"ckpt_path": str(ckpt), "output_dir": str(tmp_path / f"ema_{use_ema}"),
                             "use_ema": use_ema})
        exported = load_components(folder).unet_state
        expected = LatentDiffusionPipeline.from_pretrained(ckpt, use_ema=use_ema).unet.state_dict()
        assert exported.keys() == expected.keys() and all(torch.equal(exported[k], v) for k, v in expected.items())


def test_images_depend_on_their_seed_not_the_batch_size(ldm_checkpoint: Path, tmp_path: Path):
    base = {"ckpt_path": str(ldm_checkpoint), "prompts": PROMPTS, "sampler": "ddpm", "num_steps": 3,
            "guidance_scale": 3.0, "seed": 0, "num_images_per_prompt": 2, "device": "cpu"}
    one = sample({**base, "batch_size": 1, "output_dir": str(tmp_path / "one")})
    four = sample({**base, "batch_size": 4, "output_dir": str(tmp_path / "four")})
    for a, b in zip(one, four):
        assert a.name == b.name
        diff = (torchvision.io.read_image(str(a)).int() - torchvision.io.read_image(str(b)).int()).abs().max()
        assert diff <= 1  # uint8 rounding of float noise at most
    assert not torch.equal(torchvision.io.read_image(str(one[0])), torchvision.io.read_image(str(one[1])))


def test_a_negative_prompt_replaces_the_empty_prompt_in_guidance(ldm_checkpoint: Path, tmp_path: Path):
    """`negative_prompt` is what guidance steers away from: the empty one gives the images of no negative prompt; the
    record keeps it."""
    base = {"ckpt_path": str(ldm_checkpoint), "prompts": PROMPTS, "sampler": "ddim", "num_steps": 2,
            "guidance_scale": 3.0, "device": "cpu"}
    plain = sample({**base, "output_dir": str(tmp_path / "plain")})
    empty = sample({**base, "output_dir": str(tmp_path / "empty"), "negative_prompt": ""})
    read = torchvision.io.read_image
    assert all(torch.equal(read(str(a)), read(str(b))) for a, b in zip(plain, empty))
    assert json.loads((tmp_path / "empty" / "sample.json").read_text())["config"]["negative_prompt"] == ""
    # this 2-step model's zero-initialised attention outputs ignore the text: perturbed, it reads it, and the guidance
    # scale and a negative prompt must reach its images (the numbers themselves: tests/test_sd_finetune.py, against
    # diffusers' guidance_scale and negative_prompt)
    from convert_helpers import perturb

    from ldm.pipeline import LatentDiffusionPipeline

    pipeline = LatentDiffusionPipeline.from_pretrained(ldm_checkpoint.parents[1] / "export")
    perturbed = pipeline.replace(unet=perturb(pipeline.unet, seed=0, scale=0.2)).save_pretrained(tmp_path / "pert")
    runs = {name: sample({**base, "ckpt_path": str(perturbed), "output_dir": str(tmp_path / name), **extra})
            for name, extra in (("g3", {}), ("g1", {"guidance_scale": 1.0}), ("neg", {"negative_prompt": "a dog"}))}
    differ = lambda a, b: not torch.equal(read(str(a[0])), read(str(b[0])))  # noqa: E731
    assert differ(runs["g3"], runs["g1"]) and differ(runs["g3"], runs["neg"])


def test_prompts_file_and_clear_errors(ldm_checkpoint: Path, tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(f"\ufeff{PROMPTS[0]}\r\n\r\n{PROMPTS[1]}\r\n".encode())  # Notepad: a BOM, CRLF
    base = {"ckpt_path": str(ldm_checkpoint), "num_steps": 2, "sampler": "ddim", "device": "cpu"}
    paths = sample({**base, "prompts_file": str(prompts), "output_dir": str(tmp_path / "f")})
    assert [p.name for p in paths] == ["prompt000_seed000000.png", "prompt001_seed000001.png"]
    assert json.loads((tmp_path / "f" / "sample.json").read_text())["prompts"] == PROMPTS
    # An output_dir with an earlier run's samples: refused (they would mix), replaced with overwrite=true.
    with pytest.raises(ConfigError, match=r"holds the samples of an earlier run \(4 files.*overwrite=true"):
        sample({**base, "prompts": PROMPTS[:1], "output_dir": str(tmp_path / "f")})
    paths = sample({**base, "prompts": PROMPTS[:1], "output_dir": str(tmp_path / "f"), "overwrite": True})
    assert sorted(p.name for p in (tmp_path / "f").glob("prompt*.png")) == [p.name for p in paths]
    # A bad num_steps is refused before the earlier samples are replaced.
    with pytest.raises(ConfigError, match=r"num_steps=5000 must lie in \[1, 1000\]"):
        sample({**base, "prompts": PROMPTS[:1], "output_dir": str(tmp_path / "f"), "overwrite": True,
                "num_steps": 5000})
    assert sorted(p.name for p in (tmp_path / "f").glob("prompt*.png")) == [p.name for p in paths]
    # A seed whose last image would pass 2**63 - 1: refused before anything is written (the first images were
    # written, then a TypeError, and the next run refused the half-written folder).
    with pytest.raises(ConfigError, match=r"seed=9223372036854775807: the seeds .*\.\.9223372036854775808 "):
        sample({**base, "prompts": PROMPTS, "output_dir": str(tmp_path / "f"), "overwrite": True,
                "seed": 2**63 - 1})
    assert sorted(p.name for p in (tmp_path / "f").glob("prompt*.png")) == [p.name for p in paths]
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        sample({"ckpt_path": str(tmp_path / "missing.ckpt"), "prompts": PROMPTS, "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="sampler"):
        sample({"ckpt_path": str(ldm_checkpoint), "prompts": PROMPTS, "output_dir": str(tmp_path),
                "sampler": "euler"})
    # (ran, ignoring it, and sample.json recorded it as if the images had DDIM's noise)
    with pytest.raises(ConfigError, match=r"eta=1.0 is DDIM's noise scale, which sampler=dpmpp_2m does not take .*"
                                          r"set sampler=ddim or leave eta at 0"):
        sample({**base, "prompts": PROMPTS, "sampler": "dpmpp_2m", "eta": 1.0, "output_dir": str(tmp_path / "eta")})
    assert not (tmp_path / "eta").exists()
    with pytest.raises(ConfigError, match="prompts"):
        sample({"ckpt_path": str(ldm_checkpoint), "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="prompts"):  # prompts="$UNSET": no prompt, not one empty prompt sampled
        sample({"ckpt_path": str(ldm_checkpoint), "output_dir": str(tmp_path), "prompts": ""})
    with pytest.raises(FileNotFoundError, match=r"prompts_file=.* is a folder; give a text file"):  # "does not exist"
        sample({**base, "prompts": [], "prompts_file": str(tmp_path), "output_dir": str(tmp_path / "g")})
    # ldm-export into a file: "exists; set overwrite=true", which then refused it as a file
    from ldm.cli.export import export

    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match=r"output_dir=.*notes\.txt is a file"):
        export({"ckpt_path": str(ldm_checkpoint), "output_dir": str(tmp_path / "notes.txt")})
    assert (tmp_path / "notes.txt").read_text() == "keep"
    # a folder inside a file: ldm-export said "File exists" (a bare errno), ldm-sample failed after sampling
    inside = str(tmp_path / "notes.txt" / "x")
    for run, config in ((export, {"ckpt_path": str(ldm_checkpoint)}), (sample, {**base, "prompts": PROMPTS})):
        with pytest.raises(ConfigError, match=r"output_dir=.*notes\.txt/x cannot be written \(Not a directory: "
                                              r".*notes\.txt\): give a folder you can write"):
            run({**config, "output_dir": inside})


def test_a_home_path_is_expanded_and_the_record_names_the_checkpoint(ldm_checkpoint: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    """A quoted "~/..." (as Hydra's quoting advice writes it) reached ckpt_path / prompts_file as it was: "does not
    exist"; sample.json recorded the checkpoint as typed (relative or with ~)."""
    from ldm.cli.export import export

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "prompts.txt").write_text(PROMPTS[0] + "\n")
    link = tmp_path / "model.ckpt"
    link.symlink_to(ldm_checkpoint)
    sample({"ckpt_path": "~/model.ckpt", "prompts_file": "~/prompts.txt", "num_steps": 2, "device": "cpu",
            "output_dir": "~/out"})
    record = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert record["checkpoint"] == str(link) and record["prompts"] == PROMPTS[:1]
    assert (export({"ckpt_path": "~/model.ckpt", "output_dir": "~/exported"}) / "model_index.json").is_file()


def test_class_labels_are_checked_against_the_model(ldm_checkpoint: Path, tmp_path: Path, monkeypatch):
    """A class-conditional model needs one label per prompt within its classes; any other model takes none: each
    mistake is a ConfigError naming class_labels, before anything is generated."""
    from scale_helpers import tiny_class_model_export

    base = {"prompts": PROMPTS, "num_steps": 2, "output_dir": str(tmp_path / "out"), "device": "cpu"}
    with pytest.raises(ConfigError, match=r"class_labels=\[1, 2\] given, but .* is not class-conditional"):
        sample({**base, "ckpt_path": str(ldm_checkpoint), "class_labels": [1, 2]})
    export = tiny_class_model_export(tmp_path)
    with pytest.raises(ConfigError, match=r"class-conditional \(3 classes\): give class_labels=\[...\]"):
        sample({**base, "ckpt_path": str(export)})
    with pytest.raises(ConfigError, match=r"class_labels=\[1, 4\]: \[4\] outside \[0, 3\]"):
        sample({**base, "ckpt_path": str(export), "class_labels": [1, 4]})
    with pytest.raises(ConfigError, match=r"class_labels has 3 entries for 2 prompts \(the prompts name"):
        sample({**base, "ckpt_path": str(export), "class_labels": [0, 1, 2]})
    assert len(sample({**base, "ckpt_path": str(export), "class_labels": [0, 3]})) == 2  # 3: the null class
    # one label given bare (Hydra's "int is not a ListConfig" before); a label that is no integer, named
    del base["prompts"]
    assert len(sample({**base, "ckpt_path": str(export), "class_labels": 2, "overwrite": True})) == 1
    for bad in (["a"], True, [1, True]):
        with pytest.raises(ConfigError, match=rf"class_labels={re.escape(repr(bad))} must be a list of class "
                                              rf"indices, e.g. class_labels='\[0, 3\]' \(or one: class_labels=2\)"):
            sample({**base, "ckpt_path": str(export), "class_labels": bad})
    # the labels alone give the rows (prompts were required, and then ignored)
    paths = sample({**base, "ckpt_path": str(export), "class_labels": [2, 0, 1], "overwrite": True})
    assert [p.name for p in paths] == ["prompt000_seed000000.png", "prompt001_seed000001.png",
                                       "prompt002_seed000002.png"]
    assert json.loads((tmp_path / "out" / "sample.json").read_text())["prompts"] == ["class 2", "class 0", "class 1"]
    # each image is generated from its row's label (2 copies of each row, in batches of 3)
    from ldm.pipeline import LatentDiffusionPipeline

    calls, generate = [], LatentDiffusionPipeline.generate
    monkeypatch.setattr(LatentDiffusionPipeline, "generate", lambda self, prompts, seeds, **kwargs: calls.append(
        (list(seeds), list(kwargs["class_labels"]))) or generate(self, prompts, seeds, **kwargs))
    sample({**base, "ckpt_path": str(export), "class_labels": [1, 2], "num_images_per_prompt": 2, "batch_size": 3,
            "overwrite": True})
    assert calls == [([0, 1, 2], [1, 1, 2]), ([3], [2])]


def test_a_sigterm_ends_sampling_with_one_line(tmp_path: Path):
    """A SIGTERM (`timeout`, a scheduler's end of job) killed ldm-sample silently (status -15), leaving part of the
    images without a word: it is taken as Ctrl-C is, one line saying what is kept, status 143 (ldm-eval alike)."""
    import time

    from test_eval_helpers import tiny_ldm_checkpoint

    out = tmp_path / "samples"
    process = subprocess.Popen([sys.executable, "-m", "ldm.cli.sample", f"ckpt_path={tiny_ldm_checkpoint(tmp_path)}",
                                "prompts=a red circle", "num_images_per_prompt=1000", "batch_size=1", "num_steps=2",
                                f"output_dir={out}", "device=cpu"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("prompt*.png")) and time.monotonic() < deadline:  # sampling
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == ("ldm-sample: interrupted by SIGTERM; the finished batches' images are "
                                               "in output_dir, without grid.png and sample.json; the same command "
                                               "with overwrite=true starts again")
    assert "Traceback" not in stdout + stderr and not (out / "sample.json").exists()


def test_an_unconditional_model_samples_without_prompts_and_without_guidance(tmp_path: Path, caplog):
    """An unconditional model: prompts were required (and ignored); guidance ran the same UNet pass twice per step
    and recorded a scale that had no effect."""
    from dataclasses import asdict

    from scale_helpers import tiny_autoencoder_export

    from ldm.modules.latent_diffusion import LatentDiffusionModule
    from ldm.nn.unet import unet_config

    module = LatentDiffusionModule({"autoencoder_path": str(tiny_autoencoder_export(tmp_path / "ae")),
                                    "unet": asdict(unet_config("tiny", context_dim=None)),
                                    "conditioner": {"kind": "none"}, "ema_decay": None})
    export = module.pipeline.save_pretrained(tmp_path / "unconditional")
    base = {"ckpt_path": str(export), "num_steps": 3, "device": "cpu", "num_images_per_prompt": 2}
    with pytest.raises(ConfigError, match=r"is unconditional: it reads no prompts; leave prompts and prompts_file "
                                          r"out \(it generates num_images_per_prompt=2 images\)"):
        sample({**base, "prompts": PROMPTS, "output_dir": str(tmp_path / "a")})
    plain = sample({**base, "guidance_scale": 1.0, "output_dir": str(tmp_path / "a")})
    guided = sample({**base, "guidance_scale": 5.0, "output_dir": str(tmp_path / "b")})
    assert "guidance has nothing to steer by" in caplog.text
    assert json.loads((tmp_path / "b" / "sample.json").read_text())["config"]["guidance_scale"] == 1.0
    for a, b in zip(plain, guided, strict=True):
        assert torch.equal(torchvision.io.read_image(str(a)), torchvision.io.read_image(str(b)))
    batches = []
    module.pipeline.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    module.pipeline.generate(None, [0, 1, 2], num_steps=2, guidance_scale=5.0)
    assert batches == [3, 3], "one pass per step, not a conditional and an unconditional one"
