"""Stage 1b: pretrain the byte-level text encoder contrastively on the shards' image-caption pairs (a small CLIP,
Radford et al. 2021), as Stable Diffusion's text encoder was pretrained before the UNet ever saw it.

Trained from scratch together with the UNet, a byte-level encoder learns what dominates the denoising loss (on
`shapes`: colour and background) and nearly nothing else; the quickstart's samples ignored shape and position words.
The contrastive loss instead rewards every word that tells one image from another. This stage trains the encoder with
a small convolutional image tower (`ldm.nn.image_encoder`) on the symmetric InfoNCE loss, each caption against every
image of the global batch (gathered over ranks), and exports the text encoder to `<run>/export` at the end of fit;
stage 2 loads it with `model.conditioner.name_or_path=<run>/export`, frozen by default.

    ldm-train experiment=quickstart_clip paths.output_dir=runs/clip
    ldm-train experiment=quickstart_ldm model.conditioner.name_or_path=runs/clip/export ...
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import nn

from ldm.callbacks.checkpoint import stopped_without_export
from ldm.conditioning.byte import ByteEncoderConfig, ByteTextEncoder, bytes_read
from ldm.config import ConfigError, asdict, batch_entry, check_min, pasteable, to_dataclass
from ldm.data.latents import require_images, require_resolution
from ldm.distributed import mean_over_ranks
from ldm.modules.optim import adam, check_optimizer_config, clip_gradients, lr_scheduler
from ldm.nn.image_encoder import ImageEncoder, ImageEncoderConfig
from ldm.nn.linear import Linear

# The two AdamW groups (`ContrastiveModule._param_groups`), named as the LR monitor logs them: lr/decay, lr/no_decay.
PARAM_GROUPS = ("decay", "no_decay")


@dataclass
class Config:
    text: ByteEncoderConfig = field(default_factory=ByteEncoderConfig)     # the encoder stage 2 loads
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)  # used here only
    embed_dim: int = 64                    # joint embedding width of both projections
    init_temperature: float = 0.07         # softmax temperature at the start (CLIP); learned, kept >= 0.01
    lr: float = 1.0e-3                     # AdamW, used as given (never rescaled by batch size)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.0
    warmup_steps: int = 50
    lr_schedule: str = "constant"          # after warmup: constant | cosine | linear (to 0 at the last step) | wsd
    lr_decay_steps: int = 0                # wsd: a linear decay to 0 over the last lr_decay_steps
    image_key: str = "image"               # batch keys: images (B, 3, H, W) in [-1, 1] and their captions
    caption_key: str = "caption"

    def __post_init__(self) -> None:
        check_optimizer_config(self)
        check_min(1, embed_dim=self.embed_dim)
        if not 0.01 <= self.init_temperature <= 1.0:
            raise ConfigError(f"init_temperature={self.init_temperature} must lie in [0.01, 1]")


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, all_image: torch.Tensor, all_text: torch.Tensor,
                     offset: int, logit_scale: torch.Tensor, caption_ids: torch.Tensor | None = None,
                     all_caption_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's symmetric InfoNCE loss of one rank's pairs against the global batch, and its caption -> image top-1
    accuracy.

    As CLIP's, the loss counts every other image as a negative, those of a repeated caption too: on data whose captions
    repeat within a batch it has a floor above 0. The accuracy counts a hit when the chosen image has the caption
    (`caption_ids`: equal ids, equal captions), else only its own image.

    Args:
        image, text: this rank's unit-norm embeddings (B, E); pair i is (image[i], text[i]).
        all_image, all_text: the global batch's (N, E), this rank's rows at offset .. offset + B.
        offset: where this rank's rows start in the global batch.
        logit_scale: 1 / temperature.
        caption_ids, all_caption_ids: an id per caption (B,), and the global batch's (N,).
    """
    targets = torch.arange(len(image), device=image.device) + offset          # (B,)
    text_logits = logit_scale * text @ all_image.T                              # (B, N)
    image_logits = logit_scale * image @ all_text.T                             # (B, N)
    loss = (F.cross_entropy(text_logits, targets) + F.cross_entropy(image_logits, targets)) / 2
    chosen = text_logits.argmax(dim=1)                                          # (B,)
    hit = chosen == targets if caption_ids is None else all_caption_ids[chosen] == caption_ids
    return loss, hit.float().mean()


def retrieval_scores(image: torch.Tensor, text: torch.Tensor, caption_ids: torch.Tensor, logit_scale: torch.Tensor,
                     rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """`contrastive_loss` and its accuracy over a whole set of N pairs (N, E) at once, every pair against all N:
    what validation reports, the same for any batch size or number of ranks. Scored `rows` captions at a time, so
    that the (rows, N) logits, not an (N, N) matrix, are held."""
    loss, accuracy = torch.zeros((), device=image.device), torch.zeros((), device=image.device)  # (NCCL reduces
    for start in range(0, len(image), rows):                                                      # device tensors)
        part = slice(start, start + rows)
        part_loss, part_accuracy = contrastive_loss(image[part], text[part], image, text, start, logit_scale,
                                                    caption_ids[part], caption_ids)
        share = len(image[part]) / len(image)
        loss, accuracy = loss + part_loss.float() * share, accuracy + part_accuracy * share
    return loss, accuracy


class ContrastiveModule(L.LightningModule):
    """Wires the byte text encoder, the image tower, their projections and the learned temperature.

    Args:
        config: see `Config`; built from `model.*` by `ldm.config.instantiate`.
    """

    Config = Config
    MAX_LOGIT_SCALE = 100.0  # CLIP clips the learned logit scale (1 / temperature) here
    # What `ldm-train` refuses before anything is built (trainer key -> what to do instead).
    unsupported_trainer_args = {
        "accumulate_grad_batches": "InfoNCE scores each caption against the images of its own batch, so accumulated "
                                   "micro-batches are not one larger batch; raise data.batch_size (or trainer.devices: "
                                   "the ranks' batches are gathered)",
    }

    def __init__(self, config: Config | dict[str, Any]):
        super().__init__()
        config = to_dataclass(Config, config, "model")  # a dict when rebuilt by `load_from_checkpoint`
        self.config = config
        self.save_hyperparameters({"config": asdict(config)}, logger=False)
        self.text_encoder = ByteTextEncoder(**asdict(config.text))
        self.image_encoder = ImageEncoder(config.image)
        self.text_proj = Linear(config.text.width, config.embed_dim, bias=False)
        self.image_proj = Linear(self.image_encoder.out_dim, config.embed_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    def embed(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm embeddings of images (B, 3, R, R) and of their captions: (B, embed_dim) each."""
        _, pooled = self.text_encoder(captions)                                 # (B, width)
        text = F.normalize(self.text_proj(pooled), dim=-1)                      # (B, E)
        image = F.normalize(self.image_proj(self.image_encoder(images)), dim=-1)  # (B, E)
        return image, text

    @property
    def logit_scale(self) -> torch.Tensor:
        """1 / temperature, learned; at most MAX_LOGIT_SCALE (`on_train_batch_end` clamps the parameter)."""
        return self.log_logit_scale.exp()

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (world * B, ...), rank order; gradients flow back to this rank's rows."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return x  # one process, or no trainer at all
        return self.all_gather(x, sync_grads=True).flatten(0, 1)

    def _embed_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's image and caption embeddings (B, E) and an id per caption (B,), equal for equal captions."""
        captions = list(batch_entry(batch, self.config.caption_key, "model.caption_key"))
        image, text = self.embed(batch_entry(batch, self.config.image_key, "model.image_key"), captions)
        length = self.text_encoder.max_length  # captions equal in the bytes the encoder reads are equal
        ids = torch.tensor([zlib.crc32(bytes_read(c, length)) for c in captions], device=image.device)
        return image, text, ids

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss and accuracy against the global batch (`contrastive_loss`)."""
        image, text, ids = self._embed_batch(batch)
        return contrastive_loss(image, text, self._gather(image), self._gather(text), self.global_rank * len(image),
                                self.logit_scale, ids, self._gather(ids))

    def check_data(self, datamodule: Any) -> None:
        """Refuse images of another size than the image tower takes, and shards of class folders without captions
        (`ldm-train` calls it before anything is written; `on_fit_start` for any fit)."""
        require_resolution(datamodule, "model.image.resolution", self.config.image.resolution,
                           "the image tower takes the images at the size the data gives them; set data.resolution "
                           "(which model.image.resolution follows in conf/model/contrastive)")
        classes = datamodule.uncaptioned_classes() if hasattr(datamodule, "uncaptioned_classes") else None
        if classes:
            raise ConfigError(f"data.train_shards hold class-labelled images without any caption (ldm-data "
                              f"labels=folders, {len(classes)} classes): every caption is empty, so the text encoder "
                              f"learns nothing (and its accuracy is 1 by construction); train it on shards with "
                              f"captions")

    def on_fit_start(self) -> None:
        require_images(self.trainer.datamodule, "the contrastive text-image model")
        if self.config.image.in_channels != 3:
            raise ConfigError(f"model.image.in_channels={self.config.image.in_channels}, but the data are RGB images: "
                              f"set model.image.in_channels=3")
        self.check_data(self.trainer.datamodule)
        data = getattr(self.trainer.datamodule, "config", None)
        if data is not None and data.batch_size * self.trainer.world_size < 2:
            raise ConfigError(f"data.batch_size={data.batch_size} on one process: every caption is scored against "
                              f"the other images of the global batch, and with none the loss is 0 and nothing trains; "
                              f"raise data.batch_size (the quickstart's: 256)")
        limit = self.trainer.limit_val_batches
        if data is not None and data.val_shards is not None and isinstance(limit, int) and 0 < limit \
                and limit * (data.val_batch_size or data.batch_size) * self.trainer.world_size < 2:
            raise ConfigError(self._one_pair_validation())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, accuracy = self._loss(batch)
        size = len(batch[self.config.image_key])
        logged = mean_over_ranks(self.trainer, {"loss": loss, "accuracy": accuracy})  # the global batch's
        self.log("train/loss", logged["loss"], prog_bar=True, on_step=True, on_epoch=False, batch_size=size)
        self.log("train/accuracy", logged["accuracy"], on_step=True, on_epoch=False, batch_size=size)
        self.log("train/temperature", 1.0 / self.logit_scale, on_step=True, on_epoch=False, batch_size=size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # note: as CLIP, the parameter is clamped after the step, not its exp() in the forward: a clamped exp() has
        # no gradient above the cap, so a scale that overshot it could never come back down.
        with torch.no_grad():
            self.log_logit_scale.clamp_(max=math.log(self.MAX_LOGIT_SCALE))

    def _one_pair_validation(self) -> str:
        data = getattr(self.trainer.datamodule, "config", None)
        size = "" if data is None else f"data.batch_size={data.batch_size}, " if data.val_batch_size is None else \
            f"data.val_batch_size={data.val_batch_size}, "
        return (f"validation scores one image-caption pair ({size}trainer.limit_val_batches="
                f"{self.trainer.limit_val_batches}): a caption among one image always finds it; raise "
                f"data.val_batch_size or trainer.limit_val_batches")

    def on_validation_epoch_start(self) -> None:
        self._validation_pairs: list[tuple[torch.Tensor, ...]] = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # every rank keeps every rank's embeddings: the set is scored as a whole at the end
        self._validation_pairs.append(tuple(self._gather(x) for x in self._embed_batch(batch)))

    def on_validation_epoch_end(self) -> None:
        """`val/loss` and `val/accuracy`: each validation caption against every validation image (of all ranks), not
        against its batch's: the same numbers for any `data.val_batch_size` or number of processes."""
        image, text, ids = (torch.cat(parts) for parts in zip(*self._validation_pairs, strict=True))
        self._validation_pairs = []
        if len(image) < 2:
            raise ConfigError(self._one_pair_validation())
        loss, accuracy = retrieval_scores(image, text, ids, self.logit_scale)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)  # (the same on every rank)
        self.log("val/accuracy", accuracy, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        c = self.config
        optimizer = adam(torch.optim.AdamW, self._param_groups(), self.trainer.precision, lr=c.lr,
                         betas=tuple(c.betas), weight_decay=c.weight_decay)
        schedule = lr_scheduler(optimizer, c.lr_schedule, c.warmup_steps, self.trainer.estimated_stepping_batches,
                                c.lr_decay_steps)
        scheduler = {"scheduler": schedule, "interval": "step", "name": "lr"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def _param_groups(self) -> list[dict[str, Any]]:
        """CLIP's two groups (open_clip's `exclude`): the temperature, gains and biases (tensors of fewer than 2
        dimensions) are not decayed, or `weight_decay` would pull the logit scale towards 1 and shrink the LayerNorms;
        matrices and embeddings are. Two groups whatever the decay, so that a resume may change it; their names are
        the learning-rate monitor's (`lr/decay`, `lr/no_decay`)."""
        params = list(self.parameters())
        return [{"params": [p for p in params if p.ndim >= 2], "name": PARAM_GROUPS[0]},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "name": PARAM_GROUPS[1]}]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of older code holds one param group of every parameter: split into `_param_groups`' two (the
        same parameters in the same order within each), and the scheduler's per-group lists with it; or two groups
        without names (the restored groups replace the new ones', names too: `lr/pg1` was logged)."""
        states = checkpoint.get("optimizer_states") or []
        params = list(self.parameters())
        if len(states) == 1 and len(states[0]["param_groups"]) == 1 and \
                len(states[0]["param_groups"][0]["params"]) == len(params):
            group = states[0]["param_groups"][0]
            states[0]["param_groups"] = [
                {**group, "params": [i for i, p in zip(group["params"], params) if p.ndim >= 2],
                 "name": PARAM_GROUPS[0]},
                {**group, "params": [i for i, p in zip(group["params"], params) if p.ndim < 2], "weight_decay": 0.0,
                 "name": PARAM_GROUPS[1]}]
            for scheduler in checkpoint.get("lr_schedulers") or []:
                for key, value in scheduler.items():
                    if isinstance(value, list) and len(value) == 1:  # base_lrs, _last_lr, lr_lambdas: one per group
                        scheduler[key] = value * 2
        for state in states:
            if len(state["param_groups"]) == len(PARAM_GROUPS):
                for group, name in zip(state["param_groups"], PARAM_GROUPS):
                    group.setdefault("name", name)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """`trainer.gradient_clip_val` (and `_algorithm`) in every strategy and precision (`clip_gradients`)."""
        if gradient_clip_val:
            clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def compile_networks(self) -> None:
        """`compile: true`: both towers (of the text tower, what follows its tokenizer: `ByteTextEncoder.compile`)."""
        self.text_encoder.compile()
        self.image_encoder.compile()

    @rank_zero_only
    def on_fit_end(self) -> None:
        if stopped_without_export(self.trainer):
            return
        export_dir = Path(self.trainer.default_root_dir) / "export"
        self.text_encoder.save_pretrained(export_dir)
        stage_2 = pasteable({"model.conditioner.kind": "byte", "model.conditioner.name_or_path": str(export_dir)})
        rank_zero_info(f"text encoder exported to {export_dir} (stage 2: {stage_2})")
