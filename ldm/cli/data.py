"""ldm-data: write WebDataset shards from the built-in `shapes` generator or a folder of captioned images.

    ldm-data source=shapes output_dir=data/shapes num_samples=50000 val_samples=1000 resolution=32
    ldm-data source=folder input_dir=my_images output_dir=data/mine resolution=256 val_samples=500
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ldm.cli.common import CONF_DIR, cli_entry, run_cli
from ldm.config import ConfigError, register_schemas, to_dataclass
from ldm.data.shards import WriteConfig, write_shards

log = logging.getLogger(__name__)
register_schemas("data")  # conf/data.yaml extends it: stored before Hydra composes



def write_dataset(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Validate `cfg` against WriteConfig, write the shards and summary.json, and return the summary."""
    if isinstance(cfg, DictConfig):
        if OmegaConf.is_missing(cfg, "output_dir"):
            raise ConfigError("output_dir is required: the directory to write shards into, e.g. output_dir=data/shapes")
        cfg = OmegaConf.to_container(cfg, resolve=True)
    config = to_dataclass(WriteConfig, {k: v for k, v in dict(cfg).items() if k != "hydra"})
    summary = write_shards(config)  # (it logs the splits' counts)
    log.info("summary: %s/summary.json", config.output_dir)
    return summary


@cli_entry
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="data")
def main(cfg: DictConfig) -> None:
    run_cli("ldm-data", lambda: write_dataset(cfg), kept="output_dir is as it was (shards go into place only once "
                                                          "both splits are written)", sigterm=True)


if __name__ == "__main__":
    main()
