"""What every Hydra entry point shares: where the configs live, printing and saving the resolved config.

Lightning and rich are imported inside the functions that need them, so that `ldm-data` starts in a second or two.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

# conf/ sits beside the package in the repository; LDM_CONF_DIR points elsewhere (e.g. a copy of conf/).
CONF_DIR = os.environ.get("LDM_CONF_DIR", str(Path(__file__).resolve().parents[2] / "conf"))


def run_id(output_dir: str) -> str:
    """A stable id for the run in `output_dir` (the W&B run id): the directory's name plus a hash of its path.

    The same directory always gives the same id, so a resumed or requeued run continues its W&B run.
    """
    path = str(Path(output_dir).absolute())
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(path).name)[-48:]
    return f"{name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


OmegaConf.register_new_resolver("run_id", run_id, replace=True)


def resolve_output_dir(cfg: DictConfig) -> Path:
    """Fix `paths.output_dir` for this process and create it.

    A multirun job writes to its sweep subdirectory. A DDP worker process that Lightning started (LOCAL_RANK > 0)
    receives the parent's run directory as `hydra.run.dir`, so it reuses it instead of a new timestamp.
    """
    out = cfg.paths.output_dir
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN or int(os.environ.get("LOCAL_RANK", 0)) > 0:
            out = hc.runtime.output_dir
    out = Path(out).absolute()
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0


def print_config_tree(cfg: DictConfig, order: tuple[str, ...] = ()) -> None:
    """Print the resolved config as a rich tree on rank 0, groups in `order` first."""
    if not _is_rank_zero():
        return
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="bold", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        node = cfg[key]
        branch = tree.add(str(key), style="bold")
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    rich.print(tree)


def save_config(cfg: DictConfig, output_dir: Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into the run directory (rank 0 writes; every rank gets the path)."""
    path = Path(output_dir) / name
    if _is_rank_zero():
        OmegaConf.save(cfg, path, resolve=True)
    return path
