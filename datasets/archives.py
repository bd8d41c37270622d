"""Safe, all-or-nothing downloads and extraction of dataset archives (ImageNet-R's .tar, CUB's .tgz)."""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

from utils import UserError


def _is_safe_member(member: tarfile.TarInfo, dest: Path) -> bool:
    """Fallback for Pythons without tarfile's `data` filter: regular files and folders inside `dest` only."""
    target = (dest / member.name).resolve()
    return (member.isfile() or member.isdir()) and (target == dest or dest in target.parents)


COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


def _check_end_marker(archive: Path, offset: int) -> None:
    """tarfile takes a plain tar cut exactly between two members for a complete, shorter archive; a complete one ends
    with two zero blocks where the member list ends. (Compressed archives cut short already fail to decompress.)"""
    with open(archive, "rb") as handle:
        if handle.read(6).startswith(COMPRESSED_MAGIC):
            return
        handle.seek(offset)
        marker = handle.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\x00"):
        raise tarfile.ReadError("the archive ends without its end-of-archive marker")


def extract_folder_from_tar(archive: Path, folder_name: str, root: Path, source: str) -> None:
    """Extract `archive` and move its top-level `folder_name/` to `root/folder_name`.

    Extraction goes to a temporary folder beside the target and is renamed into place only when complete, so an
    interrupted or failed extraction never leaves a half-filled folder that a later run would take for the data.
    Members that would land outside the folder (absolute paths, `..`, links, devices) are refused. The archive
    itself is left where it is.
    """
    final = root / folder_name
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.extracting-", dir=root))
    try:
        try:
            with tarfile.open(archive) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, filter="data")
                else:  # pragma: no cover - Python < 3.11.4
                    resolved = tmp.resolve()
                    members = tar.getmembers()
                    unsafe = [m.name for m in members if not _is_safe_member(m, resolved)]
                    if unsafe:
                        raise tarfile.TarError(f"unsafe member {unsafe[0]!r}")
                    tar.extractall(tmp, members=members)
                end_of_archive = tar.offset
            _check_end_marker(archive, end_of_archive)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise UserError(f"{archive} is not a readable archive ({type(err).__name__}: {err}); it is probably "
                            f"truncated or corrupt: delete it and download it again from {source}") from err
        extracted = tmp / folder_name
        if not extracted.is_dir():
            raise UserError(f"{archive} has no top-level {folder_name}/ folder; it is not the expected archive, "
                            f"get it from {source}")
        try:
            os.replace(extracted, final)
        except OSError as err:  # another process (a node sharing the folder) renamed its copy into place first: keep it
            if not final.is_dir():
                raise UserError(f"cannot move the extracted {folder_name}/ to {final} ({err.strerror or err}); "
                                f"remove what is there and run again") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _merge(source: Path, target: Path) -> None:
    """Move every entry of `source` into `target` (made if absent): folders are merged, files replace their
    namesakes (a fresh download over a damaged copy). Each entry is one rename, so a reader sees it whole or not."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        destination = target / entry.name
        if entry.is_dir() and destination.is_dir():
            _merge(entry, destination)
            continue
        try:
            os.replace(entry, destination)
        except OSError as err:
            if entry.is_dir() and destination.is_dir():  # another node moved its copy into place first: merge in
                _merge(entry, destination)
                continue
            raise UserError(f"cannot move the downloaded {entry.name} to {destination} ({err.strerror or err}); "
                            f"remove what is there and run again") from err


def download_into(root: Path, fetch: Callable[[Path], None]) -> None:
    """`fetch(folder)` downloads (and may extract) into an empty temporary folder; once it returns, what it left
    there is moved into `root`. If it raises, nothing new is left under `root`, nor `root` itself when it did not
    exist: a failed download on a machine without network leaves no half-made data tree.

    The temporary folder is a hidden one in `root`, or in the nearest existing folder above it, so that the moves are
    renames on one file system; it is removed whatever happens."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=".downloading-", dir=_nearest_existing(root)))
    except OSError as err:
        raise UserError(f"cannot download into {root} ({err.strerror or err}); choose a writable --data-path") from err
    try:
        fetch(staging)
        _merge(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
