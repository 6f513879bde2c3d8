"""One run per output directory: a lock file in `paths.output_dir`, held for the whole of `ldm-train` (and in
`output_dir` for the whole of `ldm-encode` and `ldm-data`).

Two runs writing into one directory would interleave their checkpoints, configs, exports and metrics (two encodes or
two `ldm-data`s: each removes the other's temp files as an interrupted run's). The lock file (`train.lock`,
`encode.lock`, `data.lock`; JSON: pid, host, SLURM job id, start time) is created with an exclusive hard link (an
exclusive create where the file system has none: exFAT, FAT32), so of two runs starting at once exactly one wins. A
second run stops at start with `RunDirectoryLocked` naming the directory, the holder and the fix. A lock left behind
by a run that was killed (SIGKILL, a node failure) is stale when its process is dead on this host, or when it was
written for an earlier run of this same SLURM job (a requeued job keeps its id, may land on another node or the same
one, and counts its restarts): it is taken over with a message.

Only the launching process takes the lock (global rank 0: RANK, LOCAL_RANK, NODE_RANK and SLURM_PROCID all 0 or
unset); the other ranks of the same run, which Lightning or srun start with those set, never touch it. The lock names
the torchrun launch it was taken for, and the other ranks of a torchrun `ldm-encode` wait until the lock is their
launch's (or absent) before they touch the folder (`wait_for_launch_lock`): where rank 0 is refused, they wrote into
a folder another run held, until torchrun stopped them.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ldm.config import ConfigError

LOCK_NAME = "train.lock"  # ldm-train's; LOCKS names every command's
LOCKS = {"ldm-train": ("paths.output_dir", LOCK_NAME), "ldm-encode": ("output_dir", "encode.lock"),
         "ldm-data": ("output_dir", "data.lock")}  # command: (its config key for the directory, its lock file)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


class RunDirectoryLocked(ConfigError):
    """Another live run (of ldm-train, ldm-encode or ldm-data) holds the output directory."""


def is_launching_process() -> bool:
    """True in the process that owns the run (rank 0 of node 0, before or without any DDP launch)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def read_lock(path: Path) -> dict[str, Any] | None:
    """The holder recorded in a lock file; None when the file is gone. A torn or foreign file reads as {}."""
    return _read(path)[0]


def _read(path: Path) -> tuple[dict[str, Any] | None, tuple[int, int, int] | None]:
    """`read_lock`, and the identity (inode, size, modification time) of the file it read (None when unreadable)."""
    try:
        with open(path, "rb") as f:
            stat, text = os.fstat(f.fileno()), f.read()
    except FileNotFoundError:
        return None, None
    except OSError:
        return {}, None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}, _identity(stat)
    return holder if isinstance(holder, dict) else {}, _identity(stat)


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    """What tells one lock file from another written in its place: inode, size and modification time."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def stale_reason(holder: dict[str, Any]) -> str | None:
    """Why a recorded holder cannot be running any more, or None when it may be."""
    if not holder:
        return "the lock file is empty or unreadable"
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job:  # SLURM runs one instance of a job at a time
        restart = holder.get("slurm_restart_count")
        if restart is not None and str(restart) != slurm_restart_count():  # on any host, its pid perhaps reused
            return f"it belongs to an earlier run (restart {restart}) of this SLURM job {job}"
        # note: the same restart is the same run of the job, whose steps may run side by side on several nodes
        # (two srun steps of one allocation into one directory): only a lock of older code, without the count, is
        # told stale by its host
        if restart is None and holder.get("host") != socket.gethostname():
            return f"it belongs to an earlier run of this SLURM job {job} on {holder.get('host')}"
    # note: a live pid on this host may be another process's now, or in another container's pid namespace: it is
    # taken for the holder (a run refused, with the fix, rather than two runs in one directory)
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not _pid_alive(holder["pid"]):
        return f"its process {holder['pid']} is no longer running on this host"
    return None


def slurm_restart_count() -> str:
    """How many times SLURM has requeued this job (SLURM_RESTART_COUNT; unset: 0)."""
    return os.environ.get("SLURM_RESTART_COUNT") or "0"


def _try_create(path: Path, record: dict[str, Any]) -> bool:
    """Create `path` holding `record` if it does not exist yet, atomically (write a temp file, hard-link it); on a
    file system without hard links (exFAT, FAT32, some network shares) by an exclusive create, empty until the record
    is written (`_holder` waits for it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    try:
        os.link(tmp, path)  # fails if path exists: the exclusive step
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (EPERM, ENOTSUP, ...)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        return True
    finally:
        tmp.unlink(missing_ok=True)


WRITING_S = 5.0  # an empty lock file younger than this is one being written (`_try_create` without hard links)


def _holder(path: Path) -> tuple[dict[str, Any] | None, tuple[int, int, int] | None]:
    """`_read`, waiting up to `WRITING_S` while the lock file is empty and new: another starter's exclusive create on
    a file system without hard links is empty until its record is written (taken for a torn lock, it was taken over:
    two runs)."""
    deadline = time.monotonic() + WRITING_S  # (a clock skewed on a network share: no longer than that)
    while True:
        holder, identity = _read(path)
        if holder or identity is None or time.monotonic() > deadline or \
                time.time() - identity[2] / 1e9 > WRITING_S:
            return holder, identity
        time.sleep(0.05)


def _take_over(path: Path, identity: tuple[int, int, int] | None) -> None:
    """Remove the stale lock file (`identity` as `_holder` read it) while holding the takeover guard beside it, so
    that of starters taking over at once one removes it and the others, which then find another file (or none),
    leave that alone (each removed the file, a later one the first one's new lock, and both ran). A guard older than
    `WRITING_S` is a killed starter's and is removed."""
    guard = path.with_name(f".{path.name}.takeover")
    deadline = time.monotonic() + WRITING_S
    while not _try_create(guard, {"pid": os.getpid(), "host": socket.gethostname()}):
        try:
            if time.time() - guard.stat().st_mtime > WRITING_S:
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    try:
        if _identity(path.stat()) == identity:
            path.unlink()
    except FileNotFoundError:
        pass
    finally:
        guard.unlink(missing_ok=True)


def acquire(output_dir: Path, command: str = "ldm-train") -> Path:
    """Take `command`'s lock of `output_dir` for this process (see the module docstring); returns the lock file's path.

    Raises:
        RunDirectoryLocked: a live run of `command` holds the directory.
    """
    key, name = LOCKS[command]
    path = Path(output_dir) / name
    record = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "slurm_restart_count": slurm_restart_count() if os.environ.get("SLURM_JOB_ID") else None,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "launch": launch_id()}
    for _ in range(3):  # another starter may take over or release the lock between our attempts
        if _try_create(path, record):
            return path
        holder, identity = _holder(path)
        if holder is None:
            continue  # released meanwhile: try again
        reason = stale_reason(holder)
        if reason is None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            raise RunDirectoryLocked(
                f"{key}={output_dir} holds a lock ({path}) that names this process's own pid {os.getpid()} "
                f"on this host: left by a container restarted with the same pid, or held by another container that "
                f"shares this hostname; delete the lock file if no other run uses the directory, or choose another "
                f"{key}")
        if reason is None:
            raise RunDirectoryLocked(
                f"{key}={output_dir} is in use by another {command} (pid {holder.get('pid')} on host "
                f"{holder.get('host')}, started {holder.get('started')}; lock file {path}); wait for that run to "
                f"finish or stop it, or choose another {key} (delete the lock file only if that run is gone)")
        whose = f" from pid {holder.get('pid')} on {holder.get('host')}" if holder else ""
        print(f"run lock: taking over {path}{whose}: {reason}", flush=True)
        _take_over(path, identity)
    raise RunDirectoryLocked(f"{key}={output_dir}: could not take the lock file {path} (other runs keep starting in "
                             f"this directory); start one run per {key}")


def launch_id() -> str | None:
    """What every process of one torchrun launch shares (its run id, rendezvous address and restart, the SLURM job
    step around it), None outside torchrun. A loopback address (a static single-node launch, whose run id is `none`
    unless --rdzv-id is given) is this host's alone: the host name joins it."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return None
    address = os.environ.get("MASTER_ADDR", "")
    if address in ("", "localhost", "::1") or address.startswith("127."):
        address = f"{address}@{socket.gethostname()}"
    return ":".join([os.environ["TORCHELASTIC_RUN_ID"], address, os.environ.get("MASTER_PORT", ""),
                     os.environ.get("TORCHELASTIC_RESTART_COUNT", ""), os.environ.get("SLURM_JOB_ID", ""),
                     os.environ.get("SLURM_STEP_ID", "")])


def wait_for_launch_lock(output_dir: Path, command: str, timeout_s: float = 600.0) -> None:
    """In a torchrun rank other than the launching one: return once `command`'s lock of `output_dir` is this
    launch's (rank 0 took it) or absent (none held, or rank 0 done); while another run's is there, wait for rank 0,
    which takes over a stale one or is refused (and torchrun then stops every rank). Outside torchrun: at once."""
    launch = launch_id()
    if launch is None:
        return
    key, name = LOCKS[command]
    path = Path(output_dir) / name
    deadline = time.monotonic() + timeout_s
    while (holder := read_lock(path)) is not None and holder.get("launch") != launch:
        if time.monotonic() > deadline:
            raise RunDirectoryLocked(f"{key}={output_dir} is in use by another {command} (pid {holder.get('pid')} on "
                                     f"host {holder.get('host')}; lock file {path}), and rank 0 of this launch did "
                                     f"not take it over within {timeout_s:.0f} s; wait for that run to finish or "
                                     f"choose another {key}")
        time.sleep(0.2)


def release(path: Path) -> None:
    """Remove the lock file if it is still ours."""
    holder = read_lock(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextmanager
def run_lock(output_dir: Path, command: str = "ldm-train") -> Iterator[Path | None]:
    """Hold `command`'s lock of `output_dir` for the block in the launching process; other ranks get None and wait
    for nothing."""
    if not is_launching_process():
        yield None
        return
    path = acquire(output_dir, command)
    try:
        yield path
    finally:
        release(path)
