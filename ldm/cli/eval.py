"""ldm-eval: score checkpoints (FID, KID, CLIP score, shapes adherence; rFID, PSNR, SSIM, LPIPS for autoencoders).

    ldm-eval ckpt_path='runs/ldm/checkpoints/step*.ckpt' output_dir=runs/eval val_shards=data/shapes \
             num_samples=1000 guidance_scales=[1.0,3.0] metrics=[fid,clip_score,shapes_color_accuracy]
    torchrun --nproc_per_node=4 -m ldm.cli.eval ...   # samples split over processes, metric states synced

Rows with metrics and protocol are appended to `<output_dir>/results.jsonl` and `results.csv`; each metric is also
printed as `name: value`.
"""

from __future__ import annotations

import os

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from ldm.cli.common import CONF_DIR, cli_entry, run_cli
from ldm.config import register_schemas
from ldm.eval.evaluator import evaluate

register_schemas("eval")  # conf/eval.yaml extends it: stored before Hydra composes


def init_distributed() -> bool:
    """Join the process group that torchrun (or a SLURM launcher exporting its variables) describes; True if started."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True


@cli_entry
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    def run() -> None:
        started = init_distributed()
        try:
            evaluate(cfg)
        finally:
            if started:
                dist.destroy_process_group()

    run_cli("ldm-eval", run, kept="the points scored are in results.jsonl; the same command scores the rest",
            sigterm=True)


if __name__ == "__main__":
    main()
