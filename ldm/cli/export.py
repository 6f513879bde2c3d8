"""ldm-export: hand a trained latent diffusion model to diffusers (or ComfyUI / A1111) as a folder or a single file.

    ldm-export ckpt_path=runs/ldm/checkpoints/last.ckpt format=diffusers output_dir=exports/my_model
    ldm-export ckpt_path=runs/ldm/export format=single_file output_dir=exports/my_model   # -> .../model.safetensors
    ldm-export ckpt_path=runs/vae/export format=diffusers output_dir=exports/my_vae       # a stage-1 autoencoder

`ckpt_path` is anything `LatentDiffusionPipeline.from_pretrained` takes (a checkpoint, an export directory or a run
directory); a checkpoint gives its EMA weights unless `use_ema=false`. A diffusers folder holds unet/, vae/,
scheduler/ (DDIM over the model's own schedule) and, for a CLIP-conditioned model, text_encoder/ and tokenizer/;
`diffusers.StableDiffusionPipeline.from_pretrained(output_dir)` loads it. A model conditioned by this project's
byte-level encoder (or by class labels) exports its UNet and VAE; the conditioner is not portable, and the command
says so. A stage-1 autoencoder (checkpoint, export or run directory) goes out alone: a diffusers AutoencoderKL folder
(`AutoencoderKL.from_pretrained(output_dir)`) or a stand-alone VAE file in the original layout, as SD's fine-tuned
VAEs are published. Everything is written atomically; an existing output is refused unless `overwrite=true`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoints import CheckpointError, checkpoint_kind, load_checkpoint
from ldm.cli.common import CONF_DIR, cli_entry, run_cli
from ldm.config import ConfigError, check_choice, check_output_dir, expand_home, register_schemas, to_dataclass
from ldm.io import CONFIG_NAME, check_export_weights, export_dir, export_kind, read_json_object, trained_model_path

log = logging.getLogger(__name__)
FORMATS = ("diffusers", "single_file")
SINGLE_FILE_NAME = "model.safetensors"


@dataclass
class ExportConfig:
    """What `ldm-export` writes (conf/export.yaml documents every key)."""

    ckpt_path: str = ""          # required: a checkpoint, export directory or run directory (stage 2's or stage 1's)
    format: str = "diffusers"    # diffusers (a folder) | single_file (output_dir/model.safetensors, original layout)
    output_dir: str = ""         # required
    use_ema: bool = True         # a checkpoint's EMA weights (false: the raw ones); an export its own
    overwrite: bool = False      # replace an existing output

    def __post_init__(self) -> None:
        check_choice("format", self.format, FORMATS)
        if not self.ckpt_path:
            raise ConfigError("ckpt_path is required: a latent diffusion or autoencoder checkpoint, export or run "
                              "directory, e.g. ckpt_path=runs/ldm/export")
        if not self.output_dir:
            raise ConfigError("output_dir is required, e.g. output_dir=exports/my_model")
        self.output_dir = check_output_dir("output_dir", self.output_dir)
        self.ckpt_path = expand_home(self.ckpt_path)


register_schemas("export")  # conf/export.yaml extends ExportConfig: stored before Hydra composes


def export(cfg: DictConfig | dict[str, Any] | ExportConfig) -> Path:
    """Write the export `cfg` asks for; return the folder (diffusers) or the file (single_file)."""
    from ldm.convert import save_diffusers, save_single_file
    from ldm.convert.common import UnsupportedCheckpointError
    from ldm.convert.unet import unet_config_to_diffusers
    from ldm.pipeline import LatentDiffusionPipeline

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, dict):
        cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    config = to_dataclass(ExportConfig, cfg)
    config.ckpt_path = str(trained_model_path(config.ckpt_path))  # an export's model.safetensors: its folder
    out = Path(config.output_dir)
    target = out if config.format == "diffusers" else out / SINGLE_FILE_NAME
    if config.format == "single_file" and (out / CONFIG_NAME).is_file():
        held = f"whose weights are {SINGLE_FILE_NAME}: a single file there would replace them" if \
            (out / SINGLE_FILE_NAME).is_file() else "a single file beside it would be read as part of it"
        raise FileExistsError(f"output_dir={out} holds another export or model folder ({CONFIG_NAME}), {held}; choose "
                              f"another output_dir")
    if target.exists() and not config.overwrite:
        raise FileExistsError(f"output_dir={out}: {target} exists; choose another output_dir or set overwrite=true")

    if holds_autoencoder(Path(config.ckpt_path).expanduser()):
        return export_autoencoder(config, out if config.format == "diffusers" else target)
    pipeline = LatentDiffusionPipeline.from_pretrained(config.ckpt_path, use_ema=config.use_ema)
    encoder = getattr(pipeline.conditioner, "encoder", None)
    text_encoder = encoder if type(encoder).__name__ == "CLIPTextEncoder" else None
    common = {"unet": pipeline.unet, "autoencoder": pipeline.autoencoder, "latent_scale": pipeline.latent_scale,
              "schedule": pipeline.diffusion.schedule, "prediction": pipeline.diffusion.prediction,
              "text_encoder": text_encoder, "overwrite": config.overwrite}
    if config.format == "diffusers":
        written = save_diffusers(out, **common, image_size=pipeline.image_size)
    else:
        written = save_single_file(target, **common, image_size=pipeline.image_size)
    log.info("wrote %s (%s) from %s, step %s, %s weights", written, config.format, pipeline.provenance["source"],
             pipeline.provenance["step"], pipeline.provenance["weights"])
    if text_encoder is None:
        kind = pipeline.conditioner_config.kind
        log.warning("the UNet and VAE are exported; the conditioner (model.conditioner.kind=%s) is not portable to "
                    "Stable Diffusion tools: %s", kind,
                    "give diffusers your own text_encoder= and tokenizer= of width "
                    f"{pipeline.unet.config.context_dim}" if kind in ("byte", "hf") else
                    "its inputs are not CLIP prompts")
    elif config.format == "single_file" and text_encoder.max_length < 77:
        log.warning("prompts are %d tokens in this model (model.conditioner.max_length); A1111, ComfyUI and diffusers' "
                    "from_single_file pad them to 77, so their images differ from ours (ldm's loaders read %d from "
                    "the file; format=diffusers records it in tokenizer/ for diffusers)",
                    text_encoder.max_length, text_encoder.max_length)
    if config.format == "single_file":
        for caveat in single_file_caveats(pipeline, text_encoder):
            log.warning("%s: A1111, ComfyUI and diffusers' from_single_file cannot read it from the file (ldm's "
                        "loaders can); set it there by hand, or hand them format=diffusers, whose scheduler and "
                        "text encoder say it", caveat)
    missing = []  # what the original Stable Diffusion UNet always has
    if pipeline.unet.config.context_dim is None:
        missing.append("no cross-attention (model.unet.context_dim=null)")
    if not pipeline.unet.config.mid_attention:
        missing.append("no middle transformer (model.unet.mid_attention=false)")
    if config.format == "single_file" and missing:
        log.warning("this UNet has %s, a layout the original Stable Diffusion code does not build: A1111 and "
                    "ComfyUI cannot load the file (ldm's loaders can)", " and ".join(missing))
    if config.format == "single_file":
        try:  # diffusers' from_single_file converts to its UNet2DConditionModel, as format=diffusers does
            unet_config_to_diffusers(pipeline.unet.config)
        except UnsupportedCheckpointError as error:
            log.warning("diffusers' from_single_file cannot load the file (ldm's loaders can), for the reason "
                        "format=diffusers refuses this UNet: %s", error)
        for network, net_config, prefix in (("UNet", pipeline.unet.config, "model.unet"),
                                            ("autoencoder", pipeline.autoencoder.config, "model.net")):
            if unseen := unseen_in_single_file(net_config, prefix):
                warn_unseen(network, unseen)
    schedule = pipeline.diffusion.schedule
    if schedule.timestep_spacing == "leading" and schedule.steps_offset != 1:
        log.warning("the schedule has leading spacing with steps_offset=%d (model.diffusion.schedule.steps_offset): "
                    "diffusers' StableDiffusionPipeline rewrites it to 1 on load, which shifts every sampled "
                    "timestep by %d, so its images differ from ours; sample with ldm's loaders, or train with "
                    "steps_offset=1 (SD's) or trailing spacing", schedule.steps_offset, 1 - schedule.steps_offset)
    if pipeline.unet.config.pooled_dim is not None:
        log.warning("this UNet also takes the pooled prompt vector (model.unet.pooled_dim=%d), exported as diffusers' "
                    "class_embed_type=projection: StableDiffusionPipeline does not pass it (it stops asking for "
                    "class_labels); call the UNet yourself with class_labels=<pooled vectors (B, %d)>",
                    pipeline.unet.config.pooled_dim, pipeline.unet.config.pooled_dim)
    return written


def holds_autoencoder(path: Path) -> bool:
    """Whether `path` is stage 1's: an autoencoder export, a run directory holding one, or a checkpoint of
    ldm-train's autoencoder (anything else is left to the pipeline's loader, whose errors name the problem)."""
    if path.is_dir():
        config = export_dir(path) / CONFIG_NAME
        return config.is_file() and export_kind(read_json_object(config, "ckpt_path")).startswith("an autoencoder")
    try:
        return path.is_file() and checkpoint_kind(load_checkpoint(path, "ckpt_path"), path) == "autoencoder"
    except CheckpointError:
        return False


def export_autoencoder(config: ExportConfig, target: Path) -> Path:
    """A stage-1 autoencoder as a diffusers AutoencoderKL folder or a stand-alone VAE file, with its latent scale
    (the measured one, or the one a frozen encoder kept) as the scaling factor."""
    from ldm.convert import save_diffusers_vae, save_single_file_vae
    from ldm.nn.autoencoder import load_autoencoder

    check_export_weights(config.ckpt_path, config.use_ema)  # use_ema=false on an export: what it holds, said
    autoencoder, stats = load_autoencoder(config.ckpt_path, "ckpt_path", use_ema=config.use_ema)
    scale = (stats or {}).get("scale_factor")
    if config.format == "diffusers":
        written = save_diffusers_vae(target, autoencoder, scale, overwrite=config.overwrite)
    else:
        written = save_single_file_vae(target, autoencoder, scale, overwrite=config.overwrite)
    log.info("wrote %s (%s, an autoencoder) from %s, latent scale %s", written, config.format, config.ckpt_path,
             "unknown" if scale is None else f"{scale:.5g}")
    if scale is None and config.format == "single_file":  # (save_diffusers_vae warns of the stand-in it writes)
        log.warning("%s holds no latent statistics (they are measured at stage 1's validations): the file records "
                    "none, so ldm's stage 2 will need model.latent_scale", config.ckpt_path)
    if config.format == "single_file" and (unseen := unseen_in_single_file(autoencoder.config, "model.net")):
        warn_unseen("autoencoder", unseen)
    if config.format == "single_file":
        log.warning("A1111, ComfyUI and diffusers' from_single_file take SD's scaling factor 0.18215 for a VAE file "
                    "(ldm's loaders read its own, %s, from the file)", "none" if scale is None else f"{scale:.5g}")
    return written


def unseen_in_single_file(config: Any, prefix: str) -> list[str]:
    """Settings of a UNet or autoencoder config (under `prefix`) that other readers of a single file do not take from
    it: they build SD's GroupNorm of 32 groups, and SD's heads (8 per layer; 64 wide for SD 2's 1024-wide prompts)."""
    unseen = []
    if config.norm_groups != 32:
        unseen.append(f"GroupNorm over {config.norm_groups} groups ({prefix}.norm_groups; SD's: 32)")
    if hasattr(config, "num_heads"):
        sd2 = config.context_dim == 1024
        if (config.num_heads, config.head_dim) != ((None, 64) if sd2 else (8, None)):
            unseen.append(f"attention heads {prefix}.num_heads={config.num_heads}, {prefix}.head_dim="
                          f"{config.head_dim} (SD's: {'head_dim=64' if sd2 else 'num_heads=8'})")
    return unseen


def warn_unseen(network: str, unseen: list[str]) -> None:
    log.warning("this %s has %s, which A1111, ComfyUI and diffusers' from_single_file do not read from the file: "
                "they build SD's, which computes other images from these weights, or fails to load them where a "
                "width does not split into 32 groups or other shapes are not SD's (ldm's loaders read the file's "
                "config; format=diffusers records them)", network, " and ".join(unseen))


def single_file_caveats(pipeline: Any, text_encoder: Any | None) -> list[str]:
    """What other tools would get wrong about a single file of `pipeline`: they assume SD's schedule, eps for the SD 1
    layout and v for SD 2's (diffusers; A1111 probes), and read the whole text encoder of the SD 1 layout."""
    from ldm.convert.schedule import SD_SCHEDULE
    schedule, prediction = pipeline.diffusion.schedule, pipeline.diffusion.prediction
    openclip = text_encoder is not None and text_encoder.transformer.config.hidden_act == "gelu"
    caveats = []
    if prediction != ("v" if openclip else "eps"):
        caveats.append(f"the UNet predicts {prediction} (model.diffusion.prediction), where readers take "
                       f"{'v' if openclip else 'eps'} for this layout")
    if schedule.zero_terminal_snr:
        caveats.append("the schedule has zero terminal SNR (model.diffusion.schedule.zero_terminal_snr): readers need "
                       "rescale_betas_zero_snr and trailing timesteps")
    sd = {k: getattr(SD_SCHEDULE, k) for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")}
    other = {k: getattr(schedule, k) for k, v in sd.items() if getattr(schedule, k) != v}
    if other:
        caveats.append(f"the noise schedule is not SD's ({other}; SD: {sd})")
    if text_encoder is not None and not openclip and text_encoder.layer == "penultimate":
        caveats.append("the UNet reads the text encoder's penultimate layer (model.conditioner.layer): the file holds "
                       "the whole encoder; set CLIP skip 2 in A1111, CLIPSetLastLayer -2 in ComfyUI, clip_skip=1 in "
                       "diffusers (or load the format=diffusers export, whose text encoder is cut at that layer)")
    return caveats


@cli_entry
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    run_cli("ldm-export", lambda: export(cfg))


if __name__ == "__main__":
    main()
