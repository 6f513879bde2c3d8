"""ldm-encode: image shards + a frozen autoencoder (and optionally a frozen text encoder) -> latent shards.

    ldm-encode shards='data/shapes/train-*.tar' autoencoder_path=runs/vae/export output_dir=data/latents/train
    ldm-encode shards='data/shapes/val-*.tar' autoencoder_path=runs/vae/export output_dir=data/latents/val \
               text_encoder='{kind: byte, name_or_path: runs/clip/export}' flips=true devices=2

Each input shard becomes a latent shard of the same name (as .tar) under output_dir (`ldm.data.latents` describes the
format), written atomically, followed by its `NAME_stats.json`; a shard with both is finished and skipped when the
command is run again, any other is (re)written. `devices=N` starts N processes (one per GPU, or N CPU processes), each
encoding its own shards; under torchrun (RANK / WORLD_SIZE in the environment) each rank takes its share instead.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.cli.common import CONF_DIR, cli_entry, run_cli
from ldm.cli.run_lock import run_lock, wait_for_launch_lock
from ldm.config import ConfigError, register_schemas, to_dataclass
from ldm.data import latents
from ldm.data.encoding import (
    EncodeConfig,
    Encoders,
    build_manifest,
    changed_keys,
    check_inputs_kept,
    check_outputs_have_a_manifest,
    encode_shard,
    image_shards_in,
    is_finished,
    load_encoders,
    predates_identity,
    prepare_output,
    read_output_manifest,
)
from ldm.distributed import choose_device, rank_and_world

log = logging.getLogger(__name__)

register_schemas("encode")  # conf/encode.yaml extends EncodeConfig: stored before Hydra composes


# ----------------------------------------------------------------------------------------------------------------------
# Processes and progress.


def _device(config: EncodeConfig, index: int) -> torch.device:
    return choose_device(config.accelerator, "accelerator", index)


def _encode_shards(config: EncodeConfig, tasks: list[tuple[str, str, int]], device: torch.device,
                   progress: Callable[[int], None], encoders: Encoders | None = None) -> list[dict[str, Any]]:
    if not tasks:
        return []
    encoders = encoders or load_encoders(config, device)
    return [encode_shard(url, Path(output), encoders, config, device, progress, expected)
            for url, output, expected in tasks]


def _child(index: int, config: dict[str, Any], tasks: list[tuple[str, str, int]], threads: int,
           messages: Any) -> None:
    """A spawned process: encode `tasks` on device `index`, reporting progress and the result through `messages`;
    it ends itself when the parent is gone (killed by a signal it cannot catch), not to race a rerun's processes."""
    parent = os.getppid()

    def leave_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)  # at once, as the parent it reported to is gone

    threading.Thread(target=leave_with_parent, daemon=True).start()
    try:
        torch.set_num_threads(threads)
        cfg = EncodeConfig(**config)
        results = _encode_shards(cfg, tasks, _device(cfg, index), lambda n: messages.put(("samples", index, n)))
        messages.put(("done", index, results))
    except BaseException as err:  # noqa: BLE001 -- reported to the parent, which raises it (a full disk, a config
        # mistake: told as one process would tell it, not as a page of the child's traceback)
        try:
            if hasattr(err, "add_note"):  # Python 3.11 on (HYDRA_FULL_ERROR=1 shows the note)
                err.add_note(f"in ldm-encode process {index}:\n{traceback.format_exc()}")
            pickle.dumps(err)
        except Exception:  # noqa: BLE001 -- an error that does not cross processes: its traceback, as text
            err = RuntimeError(f"ldm-encode process {index} failed:\n{traceback.format_exc()}")
        messages.put(("error", index, err))


def _progress_bar(total: int, enabled: bool) -> Any:
    """tqdm over samples: shows samples/s and the time left."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="samples", desc="ldm-encode", disable=not enabled, dynamic_ncols=True,
                mininterval=1.0, smoothing=0.1)


def _spawn(config: EncodeConfig, tasks: list[tuple[str, str, int]], total: int) -> list[dict[str, Any]]:
    """Encode `tasks` in `config.devices` spawned processes, each its own shards; one progress bar here."""
    context = torch.multiprocessing.get_context("spawn")
    messages = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // config.devices)
    shares = [tasks[i:: config.devices] for i in range(config.devices)]
    processes = [context.Process(target=_child, args=(i, asdict(config), share, threads, messages), daemon=True)
                 for i, share in enumerate(shares) if share]
    for process in processes:
        process.start()
    results: list[dict[str, Any]] = []
    running = len(processes)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # through the `finally` below, which stops the children

    previous = signal.signal(signal.SIGTERM, stop)  # `kill PID` of this process (its default would skip `finally`)
    with _progress_bar(total, config.progress) as bar:
        try:
            while running:
                try:
                    kind, index, payload = messages.get(timeout=1.0)
                except queue.Empty:
                    dead = [p for p in processes if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"an ldm-encode process died (exit code {dead[0].exitcode}) without "
                                           f"reporting; shards it finished are kept, rerun to continue") from None
                    continue
                if kind == "samples":
                    bar.update(payload)
                elif kind == "done":
                    results += payload
                    running -= 1
                else:
                    raise payload  # (the child's traceback in its notes)
        finally:
            signal.signal(signal.SIGTERM, previous)
            for process in processes:
                if process.is_alive() and running:
                    process.terminate()
                process.join()
    return results


def _world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (*rank_and_world(), int(os.environ.get("LOCAL_RANK", 0)))


def _wait_for_manifest(path: Path, manifest: dict[str, Any], urls: list[str], timeout_s: float = 600.0) -> None:
    """Ranks other than 0 start once rank 0 has checked and written the manifest, and check it describes them (and
    that their shards replace no other input's: rank 0 refuses that for its own)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 wrote no {path} within {timeout_s:.0f} s")
        time.sleep(0.5)
    old = read_output_manifest(path)
    changed = changed_keys(old, manifest)
    if changed:
        raise ConfigError(f"{path} describes other encoder settings ({changed}) than this rank's")
    check_inputs_kept(path.parent, old, urls)


def encode(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Validate `cfg` against EncodeConfig and encode every input shard not finished yet; return a summary."""
    from ldm.data.datamodule import shard_counts
    from ldm.data.shardlist import REMOTE_PREFIXES, expand_shards, shard_name

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    config = to_dataclass(EncodeConfig, {k: v for k, v in dict(cfg).items() if k != "hydra"})
    urls = expand_shards(config.shards, "shards", split=None)
    remote = [u for u in urls if u.startswith(REMOTE_PREFIXES)]
    if remote:
        raise ConfigError(f"shards: ldm-encode reads local shards only, got {remote[0]!r}; copy them locally first")
    from ldm.data.latents import find_manifest

    encoded = find_manifest(urls, "shards", to_read=False)
    if encoded is not None:
        raise ConfigError(f"shards={config.shards} are latent shards (written by ldm-encode: {encoded.path}); "
                          f"ldm-encode reads image shards: point shards at those the latents were encoded from")
    names = [shard_name(u) for u in urls]
    shared = sorted(name for name, count in Counter(names).items() if count > 1)
    if shared:
        fixes = {}  # what each way of sharing a name asks for, over every shared name
        for name in shared:
            folders = Counter(os.path.dirname(os.path.realpath(u)) for u in urls if shard_name(u) == name)
            if max(folders.values()) > 1:
                fixes["rename or leave out one of the shards whose names differ only in the tar suffix"] = None
            if len(folders) > 1:
                fixes["encode each folder into its own output_dir"] = None
        inputs = [u for u in urls if shard_name(u) == shared[0]]
        raise ConfigError(f"shards: {len(shared)} output name{'s are' if len(shared) > 1 else ' is'} shared by "
                          f"several input shards (outputs keep the names, as .tar), e.g. {shared[0]} by {inputs}; "
                          f"{'; '.join(fixes)}")
    rank, world, local_rank = _world()
    if world > 1 and config.overwrite:
        raise ConfigError("overwrite=true under torchrun would race with the other ranks: delete output_dir, or run "
                          "the overwrite with one process")
    out = Path(config.output_dir)
    inputs = [u for u, n in zip(urls, names) if Path(u).resolve() == (out / n).resolve()]
    if inputs:
        raise ConfigError(f"output_dir={config.output_dir} holds the input shards themselves (e.g. {inputs[0]}): the "
                          f"latent shards keep the input names and would replace the images; choose another "
                          f"output_dir")
    if not (out / latents.MANIFEST_NAME).exists() and (images := image_shards_in(out)) is not None:
        raise ConfigError(f"output_dir={config.output_dir} holds image shards ({images.name}): a "
                          f"{latents.MANIFEST_NAME} beside them would have every reader take them for latents; "
                          f"choose another output_dir")

    spawn = world == 1 and config.devices > 1
    device = torch.device("cpu") if spawn else _device(config, local_rank)  # spawned processes load their own
    encoders = load_encoders(config, device)
    manifest = build_manifest(config, encoders)
    out.mkdir(parents=True, exist_ok=True)  # once the encoders load: a refused run leaves no folder behind
    with run_lock(out, "ldm-encode"):  # a second encode into out would remove this one's temp files
        if rank == 0:
            prepare_output(config, manifest, urls)
        else:
            wait_for_launch_lock(out, "ldm-encode")  # not into a folder another run holds (rank 0 is refused there)
            check_outputs_have_a_manifest(out, urls)  # what rank 0 refuses, refused here too, not waited on
            _wait_for_manifest(out / latents.MANIFEST_NAME, manifest, urls)

        counts = shard_counts(urls, "shards", None)
        tasks, total, finished, older = [], 0, 0, 0
        mine = {latents.MANIFEST_NAME} if rank == 0 else set()
        mine |= {name for i in range(rank, len(urls), world)
                 for name in (names[i], latents.stats_path(out / names[i]).name)}
        for stale in out.glob(".*.tmp"):  # `.NAME.*.tmp`: a shard, stats or manifest file of this rank's that was being
            middle = stale.name[1:-4]    # written when the run was interrupted (the folder listed once: per shard,
            if any(middle[:i] in mine for i, c in enumerate(middle) if c == "."):  # quadratic in the shards)
                stale.unlink()
        for i in range(rank, len(urls), world):  # this rank's shards
            output = out / names[i]
            if is_finished(urls[i], output):
                finished += 1
                continue
            older += predates_identity(output)
            tasks.append((urls[i], str(output), counts[i]))
            total += counts[i]
        log.info("ldm-encode: %d of %d shards to encode (%d finished earlier%s), %d samples, %s", len(tasks),
                 len(urls) if world == 1 else len(range(rank, len(urls), world)), finished,
                 f"; {older} written by an older ldm-encode, which recorded no input size and time to tell them "
                 f"current, encoded again" if older else "", total,
                 f"{config.devices} processes" if world == 1 and config.devices > 1 else f"rank {rank} of {world}")
        start = time.perf_counter()
        if spawn and len(tasks) > 1:
            del encoders
            results = _spawn(config, tasks, total)
        else:
            if spawn:  # one shard or none left: no processes to start; encode here, on the first device
                device, encoders = _device(config, 0), None
            with _progress_bar(total, config.progress and rank == 0) as bar:
                results = _encode_shards(config, tasks, device, bar.update, encoders)
        seconds = time.perf_counter() - start
        samples = sum(r["successes"] for r in results)
        summary = {"output_dir": str(out), "shards_encoded": len(results), "shards_finished_before": finished,
                   "samples": samples, "failed": sum(r["failed"] for r in results), "seconds": seconds,
                   "samples_per_sec": samples / seconds if seconds > 0 else 0.0}
        log.info("ldm-encode: %d samples in %d shards in %.1f s (%.1f samples/s) -> %s/%s", samples, len(results),
                 seconds, summary["samples_per_sec"], out, latents.MANIFEST_NAME)
    return summary


@cli_entry
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="encode")
def main(cfg: DictConfig) -> None:
    run_cli("ldm-encode", lambda: encode(cfg), kept="finished shards are kept; the same command encodes the rest")


if __name__ == "__main__":
    main()
