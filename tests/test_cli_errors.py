"""Bad inputs to every CLI, run as the installed console scripts: each ends with one message naming the key or file,
exit status 2 (a user's mistake) and no Python traceback; ldm-train says so before printing its config tree.

The cases run two at a time in threads (each is a subprocess that mostly waits on imports, 2 to 10 s). The fast set
keeps the reproductions of issue 16 for every CLI and a few more (24 cases, about 50 s on an idle 2-core machine);
the other 62 are marked slow (`make test-all`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ldm.cli.data import write_dataset

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Case:
    """One bad command line: `{name}` placeholders in `args` are files of the `files` fixture."""

    id: str
    command: str
    args: tuple[str, ...]
    named: tuple[str, ...]  # what stdout + stderr must mention: the key or the file, the fix
    status: int = 2
    slow: bool = False


TRAIN = ("experiment=quickstart_vae", "data.train_shards={shards}", "data.val_shards={shards}", "logger=csv",
         "paths.output_dir={tmp}/run", "data.num_workers=0")
SAMPLE = ("output_dir={tmp}/samples", "prompts=[a red circle]")
EVAL = ("output_dir={tmp}/eval", "val_shards={shards}")


def data_folder(out: str) -> tuple[str, ...]:  # an output folder each: two cases run at once, and ldm-data locks it
    return ("source=folder", f"output_dir={{tmp}}/{out}")


CASES = [
    # ldm-data: starts in about two seconds, all in the fast set
    Case("data-bad-source", "ldm-data", ("source=bad", "output_dir={tmp}/d1"), ("source='bad'", "shapes")),
    Case("data-no-output-dir", "ldm-data", ("source=shapes",), ("output_dir",), slow=True),
    Case("data-unknown-key", "ldm-data", ("output_dir={tmp}/d2", "num_sample=3"), ("num_sample",), slow=True),
    Case("data-bad-type", "ldm-data", ("output_dir={tmp}/d3", "num_samples=abc"), ("num_samples",), slow=True),
    Case("data-folder-no-input", "ldm-data", data_folder("f1"), ("input_dir",), slow=True),
    Case("data-folder-missing-input", "ldm-data", (*data_folder("f2"), "input_dir={tmp}/nowhere"), ("input_dir=",)),
    Case("data-small-resolution", "ldm-data", ("output_dir={tmp}/d4", "resolution=4"), ("resolution=4",), slow=True),
    Case("data-zero-per-shard", "ldm-data", ("output_dir={tmp}/d5", "samples_per_shard=0"),
         ("samples_per_shard",), slow=True),
    Case("data-bad-size-word", "ldm-data", ("output_dir={tmp}/d6", "sizes=[huge]"), ("sizes=['huge']",), slow=True),
    Case("data-existing-shards", "ldm-data", ("output_dir={shards}", "num_samples=8", "val_samples=0"),
         ("overwrite=true",), slow=True),
    Case("data-output-is-file", "ldm-data", ("output_dir={a_file}", "num_samples=8"), ("a_file.txt",), slow=True),
    Case("data-scale-zero", "ldm-data", ("output_dir={tmp}/d7", "scale=0"), ("scale=0", "(0, "), slow=True),
    Case("data-missing-manifest", "ldm-data", (*data_folder("f3"), "input_dir={folder}", "captions={tmp}/none.csv"),
         ("captions=", "none.csv"), slow=True),
    Case("data-manifest-not-utf8", "ldm-data", (*data_folder("f4"), "input_dir={folder}", "captions={latin1_csv}"),
         ("latin1.csv", "UTF-8")),
    Case("data-uncaptioned-folder", "ldm-data", (*data_folder("f5"), "input_dir={folder}", "val_samples=1"),
         ("no caption", "allow_missing_captions=true")),
    Case("data-path-beyond-ascii", "ldm-data", ("output_dir={tmp}/Données",),  # Hydra's lexer exception
         ("Hydra cannot read this override (token recognition error at: 'é')", """/Données"'""")),
    Case("data-holdout-everything", "ldm-data", ("source=shapes", "output_dir={tmp}/d_holdout", "num_samples=8",
                                                 "holdout=[a]"), ("holdout=['a']", "nothing left")),
    # ldm-train: about five seconds each (torch and Lightning imports)
    Case("train-list-item-by-name", "ldm-train", (*TRAIN, "tags.x=1"),
         ("ldm-train: error: tags.x=1: tags is a list, whose items are named by their index (tags.0=",), slow=True),
    Case("train-paths-slurm-outside-slurm", "ldm-train",  # the run directory is named after $SLURM_JOB_ID; first
         (*(a for a in TRAIN if not a.startswith("paths.")), "paths=slurm", "paths.runs_dir={tmp}/runs", "seed=abc"),
         ("paths=slurm", "SLURM_JOB_ID", "paths=default")),
    Case("train-negative-val-guidance", "ldm-train", (*TRAIN, "experiment=quickstart_ldm",
                                                      "model.val_guidance_scale=-1"),
         ("val_guidance_scale=-1",), slow=True),
    Case("train-max-steps-abc", "ldm-train", (*TRAIN, "trainer.max_steps=abc"), ("trainer.max_steps='abc'",)),
    Case("train-own-experiment-without-its-header", "ldm-train",  # "reads no top-level key 'experiment' (added
         ("--config-dir", "{confdir}", *(a for a in TRAIN if not a.startswith("experiment=")),  # with +experiment)",
          "experiment=mine"), ("experiment=mine", "experiment/mine.yaml", "`# @package _global_`")),  # none added
    Case("train-own-experiment-with-defaults-without-its-header", "ldm-train",  # Hydra's "Could not override
         ("--config-dir", "{confdir}", *(a for a in TRAIN if not a.startswith("experiment=")),  # 'model@experiment.
          "experiment=mine_tiny"),                                                                   # model'"
         ("experiment=mine_tiny: experiment/mine_tiny.yaml overrides other groups", "`# @package _global_`")),
    Case("train-multirun-last-in-a-new-sweep", "ldm-train",  # the default hydra.sweep.dir is timestamped too: each
         ("-m", *(a for a in TRAIN if not a.startswith("paths.")), "ckpt_path=last", "seed=1,2"),  # rerun started
         ("ckpt_path=last resumes the run in hydra.sweep.dir", "hydra.sweep.dir=")),               # from scratch
    Case("train-logger-null", "ldm-train", (*(a for a in TRAIN if a != "logger=csv"), "logger=null"),  # a page of
         ("logger=null: logger is a config group", "logger=none: without one")),           # Hydra's traceback
    Case("train-output-dir-under-a-file", "ldm-train",  # Hydra made the run directory, failed, printed a traceback
         (*(a for a in TRAIN if not a.startswith("paths.output_dir=")), "paths.output_dir={a_file}/run"),
         ("paths.output_dir=", "a_file.txt/run", "Not a directory")),
    Case("train-multirun-sweep-dir-under-a-file", "ldm-train", ("-m", *TRAIN, "hydra.sweep.dir={a_file}/sweep",
                                                                "seed=1,2"),
         ("hydra.sweep.dir=", "a_file.txt/sweep", "Not a directory"), slow=True),
    Case("train-unknown-trainer-key", "ldm-train", (*TRAIN, "trainer.max_stepz=3"),
         ("trainer.max_stepz is no key of this config: did you mean trainer.max_steps?",), slow=True),
    # Hydra's hint (+trainer.max_stepz) led to Lightning's TypeError after the config tree; into the default,
    # timestamped run directory, which the refusal left behind
    Case("train-added-trainer-key-typo", "ldm-train",
         (*(a for a in TRAIN if not a.startswith("paths.")), "paths.runs_dir={tmp}/refused", "+trainer.max_stepz=3"),
         ("trainer.max_stepz is not an argument of Lightning's Trainer: did you mean trainer.max_steps?",)),
    Case("train-missing-shards-into-a-new-directory", "ldm-train",  # a missing shard is no ConfigError: its folder
         (*(a for a in TRAIN if not a.startswith(("paths.", "data.train_shards"))),  # stayed
          "paths.runs_dir={tmp}/refused2", "data.train_shards={tmp}/nowhere/train-*.tar"),
         ("data.train_shards=", "nowhere")),
    Case("train-added-callback-typo", "ldm-train", (*TRAIN, "+callbacks.chekpoint.save_top_k=2"),
         ("callbacks.chekpoint has no _target_", "did you mean callbacks.checkpoint?"), slow=True),
    Case("train-auto-resume-off", "ldm-train", (*TRAIN, "auto_resume=off"),  # a string: taken as true, resumed
         ("auto_resume='off' must be true or false",), slow=True),
    Case("train-batch-size-zero", "ldm-train", (*TRAIN, "data.batch_size=0"), ("data.batch_size=0",), slow=True),
    Case("train-missing-ckpt", "ldm-train", (*TRAIN, "ckpt_path={tmp}/none.ckpt"), ("ckpt_path=", "none.ckpt")),
    Case("train-missing-shards", "ldm-train", (*TRAIN, "data.train_shards={tmp}/nowhere/train-*.tar"),
         ("data.train_shards=", "nowhere"), slow=True),
    # a Trainer argument the config leaves out: Hydra's own fix, the + (kept when its five lines became one)
    Case("train-trainer-argument-without-plus", "ldm-train", (*TRAIN, "trainer.enable_model_summary=false"),
         ("trainer.enable_model_summary is no key of this config: Trainer takes it, and the config leaves it out: "
          "add it with +trainer.enable_model_summary=false",)),
    Case("train-trainer-argument-typo-without-plus", "ldm-train", (*TRAIN, "trainer.enable_model_sumary=false"),
         ("did you mean trainer.enable_model_summary? (Trainer takes it, and the config leaves it out: add it with "
          "+trainer.enable_model_summary=VALUE)",)),
    # Hydra's five lines, whose "To append to your config use +model.lrr=1" was then refused: the closest key
    Case("train-unknown-model-key", "ldm-train", (*TRAIN, "model.lrr=1"),
         ("ldm-train: error: model.lrr is no key of this config: did you mean model.lr? (--cfg job prints",)),
    Case("train-bad-model-type", "ldm-train", (*TRAIN, "model.lr=abc"), ("model.lr",), slow=True),
    Case("train-unknown-experiment", "ldm-train", (*TRAIN, "experiment=nope"), ("experiment", "nope"), slow=True),
    Case("train-seed-abc", "ldm-train", (*TRAIN, "seed=abc"), ("seed",), slow=True),
    Case("train-seed-negative", "ldm-train", (*TRAIN, "seed=-1"), ("seed=-1", "[0, 2**32)"), slow=True),
    Case("train-zero-steps", "ldm-train", (*TRAIN, "trainer.max_steps=0"), ("trainer.max_steps=0",), slow=True),
    Case("train-zero-devices", "ldm-train", (*TRAIN, "trainer.devices=0"), ("trainer.devices=0",), slow=True),
    Case("train-bad-precision", "ldm-train", (*TRAIN, "trainer.precision=17"), ("trainer.precision=17",), slow=True),
    Case("train-negative-samples-per-shard", "ldm-train", (*TRAIN, "data.samples_per_shard=-5"),
         ("data.samples_per_shard=-5",), slow=True),
    Case("train-negative-interval", "ldm-train", (*TRAIN, "trainer.val_check_interval=-1"),
         ("trainer.val_check_interval=-1",), slow=True),
    Case("train-accumulate-zero", "ldm-train", (*TRAIN, "trainer.accumulate_grad_batches=0"),
         ("trainer.accumulate_grad_batches=0",), slow=True),
    Case("train-unknown-logger", "ldm-train", (*TRAIN, "logger=nope"), ("logger", "nope"), slow=True),
    Case("train-logger-key-typo", "ldm-train", (*(a for a in TRAIN if a != "logger=csv"), "logger=wandb",
                                                "+logger.wandb.projct=x"),
         ("logger.wandb.projct", "did you mean logger.wandb.project?"), slow=True),
    Case("train-ddp-spawn", "ldm-train", (*TRAIN, "trainer=ddp_cpu", "trainer.strategy=ddp_spawn"),
         ("trainer.strategy=ddp_spawn", "starts the ranks from ldm-train's own process", "use trainer=ddp_cpu"),
         slow=True),
    Case("train-nccl-on-cpu", "ldm-train", (*TRAIN, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"),
         ("trainer.strategy.process_group_backend=nccl", "trainer=ddp_cpu"), slow=True),
    Case("train-multirun-with-cfg", "ldm-train", (*TRAIN, "-m", "--cfg", "job"), ("Only one of --run, --multirun",),
         slow=True),
    Case("train-corrupt-ckpt", "ldm-train", (*TRAIN, "ckpt_path={corrupt}"), ("ckpt_path=", "corrupt.ckpt"),
         slow=True),
    Case("train-truncated-ckpt", "ldm-train", (*TRAIN, "ckpt_path={truncated}"), ("ckpt_path=", "truncated.ckpt"),
         slow=True),
    Case("train-multirun-missing-ckpt", "ldm-train", ("-m", *TRAIN, "ckpt_path={tmp}/none.ckpt", "seed=1,2"),
         ("ckpt_path=", "none.ckpt"), slow=True),  # stops the sweep (every trial had been recorded as failed)
    Case("train-multirun-config-error", "ldm-train", ("-m", *TRAIN, "trainer.max_steps=abc", "seed=1,2"),
         ("trainer.max_steps='abc'",), slow=True),  # a ConfigError of no swept key stops the sweep at its first job
    # (a swept value's, `trainer.max_steps=abc,2`, fails its job alone: tests/test_scale_sweep.py)
    Case("train-no-train-shards", "ldm-train", (*TRAIN, "data.train_shards=null"), ("data.train_shards",), slow=True),
    Case("train-zero-interval", "ldm-train", (*TRAIN, "trainer.val_check_interval=0"),
         ("trainer.val_check_interval=0",), slow=True),
    # Lightning's own error suggested a 'DD:HH:MM:SS' duration, which the type check refuses, not the key to set
    Case("train-fraction-interval-in-steps", "ldm-train", (*TRAIN, "trainer.val_check_interval=0.5"),
         ("trainer.val_check_interval=0.5 is a fraction of an epoch", "trainer.check_val_every_n_epoch=1"),
         slow=True),
    Case("train-last-in-a-new-directory", "ldm-train",  # the default paths.output_dir is a new timestamped directory
         (*(a for a in TRAIN if not a.startswith("paths.")), "ckpt_path=last"), ("ckpt_path=last", "paths.output_dir")),
    # ldm-sample
    Case("sample-logger-null", "ldm-sample", (*SAMPLE, "ckpt_path={corrupt}", "logger=null"),  # ldm-train's group
         ("logger=null: ldm-sample has no key logger",), slow=True),
    Case("sample-negative-guidance", "ldm-sample", (*SAMPLE, "ckpt_path={corrupt}", "guidance_scale=-3"),
         ("guidance_scale=-3",)),
    Case("sample-bad-sampler", "ldm-sample", (*SAMPLE, "ckpt_path={corrupt}", "sampler=foo"),
         ("sampler='foo'",), slow=True),
    Case("sample-corrupt-ckpt", "ldm-sample", (*SAMPLE, "ckpt_path={corrupt}"), ("ckpt_path=", "corrupt.ckpt")),
    Case("sample-list-for-a-string", "ldm-sample", (*SAMPLE, "ckpt_path={corrupt}", "negative_prompt=[a,b]"),
         ("error: Error merging override negative_prompt=[a,b]: Cannot convert 'list' to string",  # one line, not
          "full_key: negative_prompt")),                                                              # Hydra's three
    Case("sample-no-ckpt", "ldm-sample", SAMPLE, ("ckpt_path",), slow=True),
    Case("sample-missing-ckpt", "ldm-sample", (*SAMPLE, "ckpt_path={tmp}/none.ckpt"),
         ("ckpt_path=", "none.ckpt"), slow=True),
    Case("sample-wrong-kind-ckpt", "ldm-sample", (*SAMPLE, "ckpt_path={wrong_kind}"), ("wrong_kind.ckpt",), slow=True),
    Case("sample-truncated-ckpt", "ldm-sample", (*SAMPLE, "ckpt_path={truncated}"), ("ckpt_path=", "truncated.ckpt"),
         slow=True),
    Case("sample-zero-steps", "ldm-sample", (*SAMPLE, "ckpt_path={corrupt}", "num_steps=0"),
         ("num_steps=0",), slow=True),
    Case("sample-missing-prompts-file", "ldm-sample",
         ("output_dir={tmp}/samples", "ckpt_path={corrupt}", "prompts_file={tmp}/none.txt"),
         ("prompts_file=", "none.txt"), slow=True),
    Case("sample-output-is-file", "ldm-sample", ("output_dir={a_file}", "prompts=[a]", "ckpt_path={corrupt}"),
         ("output_dir=", "a_file.txt is a file"), slow=True),
    Case("sample-bad-batch-type", "ldm-sample", (*SAMPLE, "ckpt_path={corrupt}", "batch_size=abc"),
         ("batch_size",), slow=True),
    # ldm-eval: about ten seconds each (torchmetrics imports); options are checked before any checkpoint is read
    Case("eval-bad-sampler", "ldm-eval", (*EVAL, "ckpt_path={corrupt}", "samplers=[foo]"),
         ("samplers[]='foo'",), slow=True),
    Case("eval-negative-guidance", "ldm-eval", (*EVAL, "ckpt_path={corrupt}", "guidance_scales=[-1]"),
         ("guidance_scales=[-1.0]",)),
    Case("eval-zero-steps", "ldm-eval", (*EVAL, "ckpt_path={corrupt}", "num_steps=[0]"), ("num_steps=[0]",), slow=True),
    Case("eval-no-ckpt", "ldm-eval", EVAL, ("ckpt_path is required",), slow=True),
    Case("eval-bad-metric", "ldm-eval", (*EVAL, "ckpt_path={corrupt}", "metrics=[fd]"), ("metrics[]='fd'",), slow=True),
    Case("eval-autoencoder-metric-as-metrics", "ldm-eval", (*EVAL, "ckpt_path={corrupt}", "metrics=[psnr,ssim]"),
         ("metrics[]='psnr'", "reconstruction_metrics="), slow=True),
    Case("eval-zero-kid-subsets", "ldm-eval", (*EVAL, "ckpt_path={corrupt}", "metrics=[kid]", "kid_subsets=0"),
         ("kid_subsets=0",), slow=True),
    Case("eval-zero-resolution", "ldm-eval", (*EVAL, "ckpt_path={corrupt}", "resolution=0"), ("resolution=0",),
         slow=True),
    Case("eval-one-reference-sample", "ldm-eval", (*EVAL, "ckpt_path={corrupt}", "reference_num_samples=1"),
         ("reference_num_samples=1",), slow=True),
    Case("eval-output-is-file", "ldm-eval", ("output_dir={a_file}", "val_shards={shards}", "ckpt_path={corrupt}"),
         ("a_file.txt is a file",), slow=True),
    Case("eval-missing-ckpt", "ldm-eval", (*EVAL, "ckpt_path={tmp}/none.ckpt"), ("ckpt_path=", "none.ckpt"), slow=True),
    Case("eval-corrupt-ckpt", "ldm-eval", (*EVAL, "ckpt_path={corrupt}"), ("ckpt_path=", "corrupt.ckpt"), slow=True),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The files the cases name: shards, a corrupt and a wrong-kind checkpoint, a Latin-1 manifest, a folder."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    shards = tmp / "shards"
    write_dataset({"source": "shapes", "output_dir": str(shards), "num_samples": 16, "val_samples": 8,
                   "resolution": 32, "samples_per_shard": 8})
    corrupt = tmp / "corrupt.ckpt"
    corrupt.write_bytes(bytes(range(256)) * 16)  # not a zip, not a pickle
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}, "epoch": 0}, tmp / "wrong_kind.ckpt")
    whole = (tmp / "wrong_kind.ckpt").read_bytes()
    (tmp / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])  # a copy cut short: torch.load's EOF errors
    (tmp / "a_file.txt").write_text("a file, not a directory\n")
    folder = tmp / "folder"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(folder / f"{i}.png")
    (tmp / "latin1.csv").write_bytes("file,caption\n0.png,caf\xe9 cr\xe8me\n".encode("latin-1"))
    (tmp / "confdir" / "experiment").mkdir(parents=True)  # a researcher's own experiment, without the header
    (tmp / "confdir" / "experiment" / "mine.yaml").write_text("trainer:\n  max_steps: 2\n")
    (tmp / "confdir" / "experiment" / "mine_tiny.yaml").write_text(  # shaped as the shipped ones, but the header
        "defaults:\n  - override /model: ldm/tiny\nmodel:\n  lr: 1.0e-4\n")
    return {"tmp": str(tmp), "shards": str(shards), "corrupt": str(corrupt), "wrong_kind": str(tmp / "wrong_kind.ckpt"),
            "truncated": str(tmp / "truncated.ckpt"),
            "a_file": str(tmp / "a_file.txt"), "folder": str(folder), "latin1_csv": str(tmp / "latin1.csv"),
            "confdir": str(tmp / "confdir")}


def cli_env(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}  # the tests may run inside a SLURM job
    return {**environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", **extra}


def run_case(case: Case, files: dict[str, str]) -> subprocess.CompletedProcess:
    args = [arg.format(**files) for arg in case.args]
    return subprocess.run([str(BIN / case.command), *args], cwd=files["tmp"], env=cli_env(), capture_output=True,
                          text=True, timeout=300)


def run_all(cases: list[Case], files: dict[str, str]) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: the machine has two cores
        return dict(zip([c.id for c in cases], pool.map(lambda c: run_case(c, files), cases)))


@pytest.fixture(scope="module")
def fast_results(files: dict[str, str]) -> dict[str, subprocess.CompletedProcess]:
    return run_all([c for c in CASES if not c.slow], files)


@pytest.fixture(scope="module")
def slow_results(files: dict[str, str]) -> dict[str, subprocess.CompletedProcess]:
    return run_all([c for c in CASES if c.slow], files)


def test_the_table_covers_every_cli_with_at_least_30_inputs():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert {c.command for c in CASES} == {"ldm-data", "ldm-train", "ldm-sample", "ldm-eval"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_bad_input_ends_with_one_message(case: Case, request: pytest.FixtureRequest):
    result = request.getfixturevalue("slow_results" if case.slow else "fast_results")[case.id]
    output = result.stdout + result.stderr
    assert result.returncode == case.status, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for text in case.named:
        assert text in output, output[-3000:]
    assert "Unsupported operand" not in output and "EOFError" not in output
    if case.command == "ldm-train":
        assert "CONFIG" not in result.stdout, "the mistake is reported before the config tree is printed"


def test_paths_slurm_outside_slurm_leaves_no_run_directory(fast_results, files: dict[str, str]):
    """Hydra makes the run directory before ldm-train can refuse it; the refusal takes it away again (any refusal:
    each mistake left a timestamped folder of Hydra's record and the log)."""
    assert fast_results["train-paths-slurm-outside-slurm"].returncode == 2
    assert not list((Path(files["tmp"]) / "runs").glob("*/slurm-*"))
    for case, runs in (("train-added-trainer-key-typo", "refused"),
                       ("train-missing-shards-into-a-new-directory", "refused2")):
        assert fast_results[case].returncode == 2
        assert not list((Path(files["tmp"]) / runs).glob("*/*")), case


def test_data_of_another_size_than_the_model_is_refused_before_anything_is_written(files: dict[str, str]):
    """The size check ran when the fit started: config.yaml, train.log and the logger's files were written by then,
    and with the default paths each attempt left a timestamped run directory behind."""
    args = [arg.format(**files) for arg in TRAIN if not arg.startswith("paths.")]
    result = subprocess.run([str(BIN / "ldm-train"), *args, f"paths.runs_dir={files['tmp']}/refused_size",
                             "model.net.resolution=64"], cwd=files["tmp"], env=cli_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "ldm-train: error: model.net.resolution=64 but data.resolution=32: " in result.stderr
    assert "Traceback" not in result.stderr and not list((Path(files["tmp"]) / "refused_size").glob("*/*"))


def test_train_help_lists_every_option_in_a_form_the_command_line_takes(files: dict[str, str]):
    """Hydra's default help listed `model/ldm: sd15, tiny`, `unet: ...` and `schema/...`, which overrides cannot
    take (`model/ldm=tiny` is refused), and no `model` group."""
    from ldm.cli.common import CONF_DIR
    from ldm.nn.unet import UNET_CONFIGS

    result = subprocess.run([str(BIN / "ldm-train"), "--help"], cwd=files["tmp"], env=cli_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    listed = {line.split(":")[0].split(" ")[0]: line.split(":", 1)[1].split(", ")
              for line in result.stdout.split("== Config ==")[0].splitlines()[3:] if ":" in line}
    conf = Path(CONF_DIR)
    for group in ("experiment", "trainer", "logger", "callbacks", "paths", "debug", "data", "hparams_search"):
        assert [o.strip() for o in listed[group]] == sorted(p.stem for p in (conf / group).glob("*.yaml")), group
    assert [o.strip() for o in listed["model"]] == sorted(str(p.relative_to(conf / "model").with_suffix(""))
                                                          for p in (conf / "model").glob("*/*.yaml"))
    assert [o.strip() for o in listed["unet@model.unet"]] == sorted(UNET_CONFIGS)
    assert "schema" not in result.stdout and "model/ldm" not in result.stdout


def test_traceback_on_request(files: dict[str, str]):
    """HYDRA_FULL_ERROR=1 adds the traceback; the status and the message stay."""
    result = subprocess.run([str(BIN / "ldm-data"), "source=folder", f"output_dir={files['tmp']}/tb",
                             f"input_dir={files['tmp']}/nowhere"], cwd=files["tmp"],
                            env=cli_env(HYDRA_FULL_ERROR="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "ldm-data: error: input_dir=" in result.stderr
    composing = subprocess.run([str(BIN / "ldm-data"), "no_such_key=1"], cwd=files["tmp"],
                               env=cli_env(HYDRA_FULL_ERROR="1"), capture_output=True, text=True, timeout=300)
    assert composing.returncode == 2 and "Traceback" in composing.stderr and "no_such_key" in composing.stderr


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare to mount a small tmpfs")
def test_full_disk_names_the_file(files: dict[str, str], tmp_path: Path):
    """ldm-data into a 64 KiB tmpfs (a private mount namespace): one message naming the shard being written."""
    full = tmp_path / "full"
    full.mkdir()
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -rm is not permitted here: {probe.stderr.decode()[:200]}")
    command = (f"mount -t tmpfs -o size=64k tmpfs {full} && {BIN / 'ldm-data'} output_dir={full}/shards "
               f"num_samples=2000 val_samples=0 resolution=32 samples_per_shard=10000")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", command], cwd=files["tmp"], env=cli_env(),
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert "no space left on the device while writing" in output and "train-000000.tar" in output, output[-3000:]



@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare to mount a small tmpfs")
def test_full_disk_during_a_checkpoint_write_names_the_checkpoint(tmp_path: Path):
    """Lightning's checkpoint plugin (AtomicCheckpointIO) into a full 64 KiB tmpfs: torch.save's error chain becomes
    one message naming the checkpoint, and no temp file is left behind."""
    full = tmp_path / "full"
    full.mkdir()
    script = ("import torch\n"
              "from ldm.callbacks.checkpoint import AtomicCheckpointIO\n"
              "from ldm.cli.common import describe_error\n"
              "try:\n"
              f"    AtomicCheckpointIO().save_checkpoint({{'w': torch.zeros(100000)}}, '{full}/last.ckpt')\n"
              "except Exception as err:\n"
              "    print(describe_error(err))\n"
              "import os\n"
              f"print('left:', os.listdir('{full}'))\n")
    command = f"mount -t tmpfs -o size=64k tmpfs {full} && {sys.executable} -c \"{script}\""
    result = subprocess.run(["unshare", "-rm", "sh", "-c", command], env=cli_env(), capture_output=True, text=True,
                            timeout=300)
    if result.returncode != 0 and "mount" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr[:200]}")
    assert f"(2, 'no space left on the device while writing {full}/last.ckpt;" in result.stdout, result.stderr
    assert "left: []" in result.stdout


def test_a_refusal_that_another_error_replaced_is_still_reported():
    """A ConfigError raised while Lightning iterates the data (a mid-epoch resume under another batch size) reached
    the user as the RuntimeError of Lightning's teardown ("Please call `iter(combined_loader)` first", exit 1)."""
    from ldm.cli.common import EXIT_FAILURE, EXIT_USER_ERROR, describe_error
    from ldm.config import ConfigError

    try:
        try:
            raise ConfigError("the checkpoint stopped 10 batches into epoch 0 under another data order")
        except ConfigError:
            raise RuntimeError("Please call `iter(combined_loader)` first.")  # noqa: B904 -- as Lightning's teardown
    except RuntimeError as err:
        assert describe_error(err) == (
            EXIT_USER_ERROR, "the checkpoint stopped 10 batches into epoch 0 under another data order")
    assert describe_error(RuntimeError("boom")) == (EXIT_FAILURE, "RuntimeError: boom")
    try:  # a real failure raised `from None` while handling a ConfigError stays the failure it is
        try:
            raise ConfigError("optional key x is unset")
        except ConfigError:
            raise RuntimeError("boom") from None
    except RuntimeError as err:
        assert describe_error(err) == (EXIT_FAILURE, "RuntimeError: boom")


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_ctrl_c_ends_with_one_line(signum: str, tmp_path: Path):
    """Ctrl-C in ldm-data (ldm-encode, ldm-eval, ldm-sample alike) printed a page of traceback and exited -2, without
    saying what was kept: one line, status 130. A SIGTERM (`timeout`, a scheduler) to ldm-data left its staging
    folder of partial shards, its lock and the folder it created, silently: it is taken as Ctrl-C is, status 143."""
    import signal
    import time

    out = tmp_path / "data"
    process = subprocess.Popen([str(BIN / "ldm-data"), f"output_dir={out}", "num_samples=200000", "resolution=32"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".ldm-data-*")) and time.monotonic() < deadline:  # writing its shards
        time.sleep(0.1)
    process.send_signal(getattr(signal, signum))
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + getattr(signal, signum), stderr[-2000:]
    by = " by SIGTERM" if signum == "SIGTERM" else ""
    assert stderr.strip().splitlines()[-1] == (f"ldm-data: interrupted{by}; output_dir is as it was (shards go into "
                                               f"place only once both splits are written)")
    assert "Traceback" not in stdout + stderr and not out.exists()

