"""Distributed set-up, user-facing errors, seeding and atomic file writing.

Every helper here works the same with or without a process group, so single-process runs need no launcher.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix; `main.py` prints it as one line, without a traceback."""


class AbortedOnOtherRank(UserError):
    """Raised on ranks != 0 when rank 0 failed; rank 0 already printed the reason."""


# ----------------------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if "[" not in nodelist:
        return nodelist.split(",")[0] or "127.0.0.1"
    try:  # compressed host lists (node[01-04]) need SLURM's own expansion
        return subprocess.check_output(["scontrol", "show", "hostnames", nodelist], text=True).split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError) as err:
        raise UserError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} ({err}); set MASTER_ADDR") from err


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested} was asked for but CUDA is not available; use --device cpu")
    return torch.device(requested)


def init_distributed(device: str = "auto", dist_url: str = "env://", local_rank_arg: int | None = None,
                     timeout_minutes: float = 30.0) -> DistContext:
    """Initialise from torchrun / `torch.distributed.launch` (with or without --use_env) / SLURM, or run as one
    plain process when none of them set the environment. NCCL on GPU, gloo on CPU. A collective that waits longer
    than `timeout_minutes` for another process raises instead of hanging."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun and launch (both set these, --use_env or not)
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = int(env.get("SLURM_LOCALID", 0))
        if dist_url == "env://":
            env.setdefault("MASTER_ADDR", _slurm_master_addr())
            env.setdefault("MASTER_PORT", "29500")
            env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world_size), str(local_rank)
    else:
        return DistContext(device=resolve_device(device))

    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method=dist_url, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; the tensor itself in a single process."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (rank order); ranks may hold different numbers of rows, and nothing is padded
    into the result, so a sharded set is reassembled with each item exactly once."""
    if not is_dist():
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(get_world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    longest = int(max(int(s) for s in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(size)] for part, size in zip(parts, sizes, strict=True)])


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Make every rank hold rank `src`'s values (in place)."""
    if is_dist():
        for tensor in tensors:
            dist.broadcast(tensor, src=src)


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (picklable objects; a collective)."""
    if not is_dist():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: T, src: int = 0) -> T:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_on_main_only(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 alone (None elsewhere). If it fails, every rank stops (rank 0 with its error) instead of
    going on without it or waiting at a barrier forever."""
    error: UserError | None = None
    result: T | None = None
    if is_main_process():
        try:
            result = fn()
        except UserError as err:
            error = err
    failed = broadcast_object(error is not None)
    if failed:
        if error is not None:
            raise error
        raise AbortedOnOtherRank("rank 0 failed")
    return result


def run_on_main_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 first (downloads, split files), then on the other ranks, which then find its output on
    disk. If rank 0 fails, every rank stops instead of waiting at a barrier forever."""
    result = run_on_main_only(fn)
    if not is_main_process():
        result = fn()
    return result  # type: ignore[return-value]


def cleanup_distributed(peers_lost: bool = False) -> None:
    """Destroy the process group, also after another process was lost: left to the interpreter's exit, gloo's threads
    aborted the process now and then (2 of 8 hung-peer runs: "terminate called without an active exception", SIGABRT),
    while destroying returned at once in every run measured. Its own error is then dropped: the run already failed,
    in one line."""
    if not is_dist():
        return
    try:
        dist.destroy_process_group()
    except RuntimeError:
        if not peers_lost:
            raise


# How a collective says another process of the run died or stopped answering. gloo (torch 2.14) raises a plain
# RuntimeError whose message starts with its transport's source location, "[.../gloo/transport/tcp/pair.cc:545] Read
# error [127.0.0.1]:41234: Connection reset by peer. This is typically caused by ..." (a dead peer) or "[.../gloo/
# transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms for recv operation to complete" (a hung one, after
# --dist_timeout); NCCL's watchdog and the TCP store raise these DistError subclasses.
_GLOO_TRANSPORT = re.compile(r"\[[^\]]*gloo/transport/[^\]]*\] *")
_LOST_CONTACT = (dist.DistBackendError, dist.DistNetworkError, dist.DistStoreError)


def lost_contact_cause(err: BaseException) -> str | None:
    """The cause in a few words when `err` says another process of the run is gone or hung; None for any other
    error (a bug raises as it would)."""
    message = str(err)
    gloo = _GLOO_TRANSPORT.search(message) if isinstance(err, RuntimeError) else None
    if gloo is None and not isinstance(err, _LOST_CONTACT):
        return None
    cause = message[gloo.end():] if gloo else message
    cause = cause.strip().splitlines()[0] if cause.strip() else type(err).__name__
    cause = cause.split(". ")[0].rstrip(".")  # gloo's advice ("This is typically caused by ...") adds nothing
    return cause if len(cause) <= 160 else cause[:157] + "..."


def log(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def warn(message: str) -> None:
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Seeding and files
# ----------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_UMASK = os.umask(0)
os.umask(_UMASK)
# the temporary names `_atomic_write` gives (mkstemp's random part is [a-z0-9_]{8})
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """Write to a temporary file in the same folder, then rename. An OSError (no space, read-only, permission) is one
    line naming the file; the file it would replace is intact and no temporary file is left."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # what open() would give, not mkstemp's 0600
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise UserError(f"cannot write {path} ({err.strerror or err}); the files written before it are intact: "
                            f"free space or fix permissions, then --resume") from err
        raise


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files an interrupted atomic write left in `folder` (only names it makes)."""
    folder = Path(folder)
    stale = [p for p in folder.iterdir() if p.is_file() and _TEMPORARY.match(p.name)] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """A crash never leaves a truncated checkpoint. Serialised in memory first, so a failing disk raises the OSError
    of the write itself (torch's own writer turns it into an opaque RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic_write(Path(path), lambda handle: handle.write(buffer.getbuffer()), "wb")


def atomic_write_json(obj: Any, path: str | Path) -> None:
    _atomic_write(Path(path), lambda handle: json.dump(obj, handle, indent=2, sort_keys=False), "w")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them CPU bf16 is emulated and measured 10-20x slower than fp32 (AVX2 EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: str) -> str:
    """`auto`: bf16 where the hardware runs it natively (CUDA with bf16, or a bf16-capable CPU), else fp32."""
    if amp != "auto":
        return amp
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    return "bf16" if cpu_has_native_bf16() else "none"


@contextmanager
def maybe_autocast(device: torch.device, amp: str) -> Iterator[None]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
        yield
