"""Distributed set-up, user-facing errors, seeding and atomic file writing.

Every helper here works the same with or without a process group, so single-process runs need no launcher.
"""
from __future__ import annotations

import datetime
import fcntl
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
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
        """A process group exists (a launcher started this process, even as the only one)."""
        return is_dist()


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


def launcher_ranks(local_rank_arg: int | None = None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) as torchrun, `torch.distributed.launch` (with or without --use_env) or `srun`
    set them; None for a plain process. Only srun sets SLURM_STEP_NUM_TASKS: a plain `python main.py` inside an
    sbatch/salloc allocation of several tasks sees SLURM_NTASKS and SLURM_PROCID too, and runs as one process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        local = env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0)
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(local)
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return None


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """This process's GPU: the local rank modulo the GPUs it sees, as with one GPU per task (`--gpus-per-task=1`)
    each of a node's tasks sees its own GPU as cuda:0."""
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", gpu_of_local_rank(local_rank))


def gpu_of_local_rank(local_rank: int) -> int:
    return local_rank % max(torch.cuda.device_count(), 1)


# How long the ranks wait for data preparation (downloads of several GB, extraction, split files) before they give
# up: it has its own process group, so the collectives' --dist_timeout need not cover a first run's downloads.
PREPARATION_TIMEOUT = datetime.timedelta(hours=6)


@dataclass
class _ProcessGroups:
    local_rank: int = 0
    preparation: Any = None  # a gloo group with PREPARATION_TIMEOUT


_groups = _ProcessGroups()


def init_distributed(device: str = "auto", dist_url: str = "env://", local_rank_arg: int | None = None,
                     timeout_minutes: float = 30.0) -> DistContext:
    """Initialise from torchrun / `torch.distributed.launch` / srun, or run as one plain process when none of them
    set the environment. NCCL on GPU, gloo on CPU; a launcher's single process gets a process group too, so it runs
    the code of N processes. A collective that waits longer than `timeout_minutes` for another process raises
    instead of hanging."""
    ranks = launcher_ranks(local_rank_arg)
    if ranks is None:
        return DistContext(device=resolve_device(device))
    rank, world_size, local_rank = ranks
    if "RANK" not in os.environ and dist_url == "env://":  # srun: torch's env:// reads these
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    dev = rank_device(resolve_device(device), local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method=dist_url, rank=rank,
                            world_size=world_size, timeout=timeout)
    _groups.local_rank = local_rank
    _groups.preparation = dist.new_group(backend="gloo", timeout=max(PREPARATION_TIMEOUT, timeout))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


MAX_DEFAULT_THREADS = 8


def set_cpu_threads(requested: int | None, device: torch.device, local_processes: int) -> int:
    """The threads this process computes with: `requested`, else OMP_NUM_THREADS when set, else on CPU the cores
    this process may use divided among the node's processes (at most MAX_DEFAULT_THREADS), else torch's default.
    Returns the number in effect."""
    if requested is None and "OMP_NUM_THREADS" not in os.environ and device.type == "cpu":
        requested = max(1, min(len(os.sched_getaffinity(0)) // max(local_processes, 1), MAX_DEFAULT_THREADS))
    if requested is not None:
        torch.set_num_threads(requested)
    return torch.get_num_threads()


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


def all_gather_objects(obj: T, group: Any = None) -> list[T]:
    """Every rank's `obj`, in rank order (picklable objects; a collective of `group`, by default every rank)."""
    if not is_dist():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj, group=group)
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


@contextmanager
def _preparation_lock(folder: Path, create: bool) -> Iterator[None]:
    """An exclusive lock on `folder` (made first when `create`), so that the nodes that share a data folder take
    turns and the later ones find the data in place. No lock where the folder is absent and not to be made, is
    read-only or has no flock: the preparation then runs unlocked, as it would on a single node.

    A preparation that fails leaves neither the lock file nor the folders it made for it, so a failed download adds
    nothing to the data folder. Another node may still hold that deleted file: at worst two nodes then prepare at
    once, which the downloads and extractions survive (each builds its copy apart and renames it into place)."""
    lock_path = folder / PREPARATION_LOCK
    made = [path for path in (folder, *folder.parents) if not path.exists()] if create else []  # deepest first
    made_lock = not lock_path.exists()
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path, "a")  # noqa: SIM115 (held across the yield)
    except OSError:
        yield
        return
    succeeded = False
    try:
        with lock:
            with suppress(OSError):  # no flock on this file system
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        succeeded = True
    finally:
        if not succeeded:
            _remove_made(lock_path if made_lock else None, made)


def _remove_made(lock_path: Path | None, folders: list[Path]) -> None:
    """The lock file a failed preparation made, then each folder it made that is empty (deepest first): what another
    process put there meanwhile stays."""
    if lock_path is not None:
        with suppress(OSError):
            lock_path.unlink(missing_ok=True)
    for path in folders:
        with suppress(OSError):
            path.rmdir()


def _prepare(fn: Callable[[], T], folder: Path, create: bool) -> tuple[T | None, str | None]:
    """`fn`'s result, or the message of its UserError."""
    try:
        with _preparation_lock(folder, create):
            return fn(), None
    except UserError as err:
        return None, str(err)


def _stop_if_any_failed(errors: list[str | None]) -> None:
    """Every rank stops when one failed; rank 0 says which one and why."""
    failed = [(rank, error) for rank, error in enumerate(errors) if error is not None]
    if not failed:
        return
    rank, error = failed[0]
    if is_main_process():
        raise UserError(error if rank == 0 else f"{error} (on rank {rank})")
    raise AbortedOnOtherRank(f"rank {rank} failed")


# the file in a data folder locked while a process downloads or extracts into it
PREPARATION_LOCK = ".prepare.lock"


def prepare_once_per_node(folder: str | Path, fn: Callable[[], T], create: bool = False) -> T:
    """Run `fn` (downloads, extraction, split files into `folder`; `create`: it may make the folder) on the first
    process of each node, then on the others, which find its output on disk. The others wait in a process group of
    their own with a timeout of hours, so a first run's downloads never trip --dist_timeout; if any process fails,
    every one stops."""
    if not is_dist():
        return fn()
    local_first = _groups.local_rank == 0
    result, error = _prepare(fn, Path(folder), create) if local_first else (None, None)
    _stop_if_any_failed(all_gather_objects(error, group=_groups.preparation))
    if not local_first:
        result, error = _prepare(fn, Path(folder), create)
    _stop_if_any_failed(all_gather_objects(error, group=_groups.preparation))
    return result  # type: ignore[return-value]


def cleanup_distributed(peers_lost: bool = False) -> None:
    """Destroy the process group, also after another process was lost: left to the interpreter's exit, gloo's threads
    aborted the process now and then (2 of 8 hung-peer runs: "terminate called without an active exception", SIGABRT),
    while destroying returned at once in every run measured. Its own error is then dropped: the run already failed,
    in one line."""
    if not is_dist():
        return
    global _groups
    _groups = _ProcessGroups()  # its preparation group goes with the process group
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


def seed_rank_streams(seed: int, *keys: int) -> None:
    """Give each rank its own random streams for what must differ between ranks: augmentation, dropout, drop-path,
    and the DataLoader workers' seeds, which the loader draws from them each epoch. Rank 0 keeps its streams, so a
    single process draws what it always did; rank r > 0 reseeds from (seed, *keys, r). Call it after what must agree
    across ranks (initialisation) is drawn."""
    rank = get_rank()
    if rank:
        seed_everything(int(np.random.SeedSequence([seed, *keys, rank]).generate_state(1)[0]))


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
    atomic_write_bytes(buffer, path)


def atomic_write_bytes(buffer: io.BytesIO, path: str | Path) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(buffer.getbuffer()), "wb")


def atomic_write_json(obj: Any, path: str | Path) -> None:
    _atomic_write(Path(path), lambda handle: json.dump(obj, handle, indent=2, sort_keys=False), "w")


def atomic_write_text(text: str, path: str | Path) -> None:
    """UTF-8 whatever the locale: generated docs hold characters (—, ±) an ASCII locale cannot encode."""
    _atomic_write(Path(path), lambda handle: handle.write(text.encode("utf-8")), "wb")


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bf16 features (AVX512-BF16, AMX) that /proc/cpuinfo lists."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them CPU bf16 is emulated and measured 10-20x slower than fp32 (AVX2 EPYC)."""
    return bool(cpu_bf16_flags())


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_amp(amp: str, device: str, local_rank_arg: int | None = None) -> str:
    """`auto`: bf16 where the hardware runs it natively (a GPU of compute capability 8.0 or later, or a CPU with
    AVX512-BF16/AMX), else fp32. Called at parse time, before the process picks its GPU, so it asks about the GPU
    this rank will use and creates no CUDA context (`torch.cuda.is_bf16_supported()` makes a tensor on the current
    device, a context of ~0.5 GB on cuda:0 in every rank, and counts emulated bf16 as supported)."""
    if amp != "auto":
        return amp
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        if not torch.cuda.is_available():
            return "none"  # the run stops with its own error when it asks for the device
        major, _ = torch.cuda.get_device_capability(rank_cuda_index(device, local_rank_arg))
        return "bf16" if major >= 8 else "none"
    return "bf16" if cpu_has_native_bf16() else "none"


# --amp -> the dtype autocast computes in (none: fp32, no autocast)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextmanager
def maybe_autocast(device: torch.device, amp: str) -> Iterator[None]:
    dtype = AMP_DTYPES.get(amp)
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
        yield


def rank_cuda_index(device: str, local_rank_arg: int | None = None) -> int:
    """The index of the GPU this process will run on, from the flag and the launcher's environment alone: `cuda:N`
    as given, else the one `rank_device` picks (local rank modulo the visible GPUs; 0 for a plain process)."""
    explicit = re.fullmatch(r"cuda:(\d+)", device)
    if explicit:
        return int(explicit.group(1))
    ranks = launcher_ranks(local_rank_arg)
    return gpu_of_local_rank(ranks[2]) if ranks else 0


# cuBLAS reads it when it creates its first handle: a workspace of this configuration makes its reductions repeatable
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def use_deterministic_algorithms(enabled: bool) -> None:
    """With `enabled`, every kernel torch picks from here on is deterministic, or raises naming the op that has none
    (warn_only=False: a silently non-deterministic run would defeat the flag). Call it before any CUDA work:
    CUBLAS_WORKSPACE_CONFIG is read when cuBLAS is first used, so in a process that already ran a matmul on the GPU
    setting it may come too late, without an error (exporting it before the launch always works). A value already
    set is kept: `:16:8` is deterministic too, with a smaller workspace."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
