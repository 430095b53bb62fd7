"""Atomic, checksummed I/O of the folders GeRe writes (state cache, FLOW's base losses, an EWC state) and the
reuse / build / refuse decision for such a folder (standard library only).

Writing (:func:`save_folder_atomically`): a temporary sibling folder ``.<name>.tmp-<host>-<pid>-<random>`` is
filled, the size and sha256 of its data files go into ``meta.json`` (written last), it is fsynced and renamed
into place; a folder of the same kind already there is swapped out first and removed afterwards. Reading
(:func:`load_verified_meta`) checks the format version and every size and checksum before any data is used.

A write the operating system refuses (disk full, quota, permission denied, read-only file system) removes
what it wrote and raises :class:`CacheWriteError`, naming the folder, what was being written, the OS reason
and the fix; the folder is then as it was before (absent, empty, or the previous cache, untouched).
:func:`write_file_atomically` does the same for one file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .folders import (
    META,
    CacheFolderError,
    CacheKind,
    check_replaceable,
    folder_entries,
    foreign_error,
    read_meta,
)

logger = logging.getLogger(__name__)


class CacheWriteError(CacheFolderError):
    """Writing a cache folder or file failed in the operating system (disk full, permission denied, ...).

    What was written is removed again; the message names the folder, what was being written, the OS
    reason and the fix."""


# ---------------------------------------------------------------------------------------------
# Temporaries: named after their owner, removed when that owner is gone
# ---------------------------------------------------------------------------------------------
def owner_tag() -> str:
    """``<host>-<pid>`` of this process, for the names of temporary cache folders and files."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """A fresh ``.<name>.<kind>-<host>-<pid>-<random>`` path next to ``path`` (see :func:`remove_stale_temporaries`)."""
    return path.parent / f".{path.name}.{kind}-{owner_tag()}-{uuid.uuid4().hex[:8]}"


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete ``.<name>.tmp-*`` / ``.old-*`` siblings of ``folder`` left by a killed save.

    Only folders (or files) written by a process of this host that no longer runs are removed (the name
    carries host and pid); a save in progress elsewhere, or on another node of a shared file system, is
    left alone. Returns the removed paths.
    """
    folder = Path(folder)
    host = owner_tag().rsplit("-", 1)[0]
    removed: list[Path] = []
    if not folder.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for path in folder.parent.glob(f".{folder.name}.{kind}-{host}-*-*"):
            pid_text = path.name[len(f".{folder.name}.{kind}-{host}-"):].split("-", 1)[0]
            if pid_text.isdigit() and not pid_alive(int(pid_text)):
                _remove(path)
                removed.append(path)
    if removed:
        logger.info("gere: removed %d temporary cache folder(s) left by killed saves: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


def _remove(path: Path) -> None:
    """Remove a folder or a file, ignoring errors (what is left is reported by the caller)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


# ---------------------------------------------------------------------------------------------
# Checksums and fsync
# ---------------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fsync_folder(path: Path) -> None:
    """fsync a folder (its entries), where the file system allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# OS failures while writing
# ---------------------------------------------------------------------------------------------
_OS_ERROR_CODE = re.compile(r"\s*\(os error (\d+)\)\s*$")


def os_failure(err: BaseException) -> Optional[tuple[Optional[int], str]]:
    """``(errno, reason)`` when ``err`` is the operating system refusing a write, else ``None``.

    An :class:`OSError`, or the I/O error safetensors wraps in its own exception type (``Error while
    serializing: I/O error: No space left on device (os error 28)``), which is not an ``OSError``.
    """
    if isinstance(err, OSError):
        return err.errno, err.strerror or str(err)
    if type(err).__name__ == "SafetensorError":
        text = str(err)
        if "I/O error:" in text:
            reason = text.split("I/O error:", 1)[1].strip()
        else:
            found = re.search(r'Os \{ code: (\d+),.*?message: "([^"]*)"', text)
            if found is None:
                return None
            return int(found.group(1)), found.group(2)
        code = _OS_ERROR_CODE.search(reason)
        return (int(code.group(1)) if code else None), _OS_ERROR_CODE.sub("", reason)
    return None


def _fix(code: Optional[int], key: Optional[str]) -> str:
    elsewhere = f"point {key} at a folder" if key else "choose a folder"
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG):
        return f"Free space (or quota) on that file system, or {elsewhere} on a disk with room."
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Make that folder writable by this user, or {elsewhere} that is writable."
    return f"Check that file system (free space, permissions), or {elsewhere} on another disk."


def _write_error(where: str, doing: str, failure: tuple[Optional[int], str], left: str, key: Optional[str]) -> CacheWriteError:
    code, reason = failure
    return CacheWriteError(f"{where}: {doing} failed: {reason}. {left} {_fix(code, key)}")


def _being_written(err: BaseException, tmp: Path) -> Optional[str]:
    """The name of the file a failed write was writing inside ``tmp``: the error's file name, else the
    newest file there."""
    name = getattr(err, "filename", None)
    if isinstance(name, str) and Path(name).parent == tmp:
        return Path(name).name
    with contextlib.suppress(OSError):
        files = [p for p in tmp.iterdir() if p.is_file()]
        if files:
            return max(files, key=lambda p: p.stat().st_mtime_ns).name
    return None


# ---------------------------------------------------------------------------------------------
# Writing and reading a folder
# ---------------------------------------------------------------------------------------------
def save_folder_atomically(
    folder: str | os.PathLike,
    kind: CacheKind,
    write: Callable[[Path], None],
    meta: dict,
    data_files: Sequence[str],
) -> None:
    """The one way GeRe writes a folder of any ``kind`` (state cache, FLOW losses, EWC state).

    Refuses a folder that is not absent, empty or of this ``kind`` (:func:`check_replaceable`), before
    anything is written and again before the swap. ``write(tmp)`` fills a temporary sibling folder with
    ``data_files``; their sizes and sha256 go into ``meta["files"]``, ``meta.json`` is written last, the
    folder is fsynced and renamed into place (an existing folder of this kind is swapped out and removed).

    An OS failure on the way (disk full, permission denied; also inside ``write``) removes the temporary
    folder, puts a swapped-out previous folder back, and raises :class:`CacheWriteError`.
    """
    folder = Path(folder)
    check_replaceable(folder, kind)  # before anything is written: never replace what GeRe did not create
    had_previous = folder.is_dir() and any(folder.iterdir())
    tmp = temporary_sibling(folder)
    moved_out: Optional[Path] = None
    doing, in_write = f"creating a temporary folder next to it ({tmp.name})", False
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        tmp.mkdir()
        doing, in_write = f"writing the {kind.what}", True
        write(tmp)
        in_write = False
        meta = dict(meta)
        meta["files"] = {name: {"size": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)} for name in data_files}
        doing = f"writing the {kind.what}'s {META}"
        with open(tmp / META, "w") as fh:
            json.dump(meta, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_folder(tmp)
        check_replaceable(folder, kind)  # again: the folder may have changed during the build
        doing = f"moving the new {kind.what} into place"
        if folder.is_dir() and not any(folder.iterdir()):
            os.replace(tmp, folder)  # onto an empty folder (rename allows it)
        elif folder.exists():
            old = temporary_sibling(folder, "old")
            os.replace(folder, old)
            moved_out = old
            os.replace(tmp, folder)
            moved_out = None
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        fsync_folder(folder.parent)
    except BaseException as err:
        failure = os_failure(err)
        if failure is not None and in_write:
            name = _being_written(err, tmp)
            doing += f" ({name})" if name else f" ({', '.join(data_files)})"
        _remove(tmp)
        left = []
        if moved_out is not None:
            try:
                os.replace(moved_out, folder)
            except OSError:
                left.append(f"The previous {kind.what} was moved to {str(moved_out)!r}: move it back to {str(folder)!r}.")
        if not left:
            left.append(f"The previous {kind.what} there is untouched." if had_previous else "Nothing was left in the folder.")
        if tmp.exists():
            left.append(f"The temporary folder {str(tmp)!r} could not be removed: delete it.")
        if failure is None:
            raise
        raise _write_error(f"{kind.key}={str(folder)!r}", doing, failure, " ".join(left), kind.key) from None


def write_file_atomically(path: str | os.PathLike, data: bytes | str, what: str, *, key: Optional[str] = None) -> None:
    """Write one file atomically: a temporary file in the same folder, fsynced, renamed onto ``path``.

    ``what`` names the file in messages ("the kept earlier-task rows"); ``key`` is the setting that chose
    the path, named in the fix. ``str`` data is written as UTF-8. An OS failure (disk full, permission
    denied) removes the temporary file, leaves an existing ``path`` untouched, and raises
    :class:`CacheWriteError`.
    """
    path = Path(path)
    existed = path.exists()
    tmp = temporary_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        failure = os_failure(err)
        if failure is None:
            raise
        left = f"The previous {path.name} is untouched." if existed else f"Nothing was written to {str(path)!r}."
        if tmp.exists():
            left += f" The temporary file {str(tmp)!r} could not be removed: delete it."
        where = f"{key}={str(path)!r}" if key else str(path)
        raise _write_error(where, f"writing {what}", failure, left, key) from None
    fsync_folder(path.parent)


def load_verified_meta(folder: str | os.PathLike, kind: CacheKind, format_version: int, advice: str) -> dict:
    """``meta.json`` of a GeRe folder of ``kind`` after checking its format version and the size and sha256
    of every data file it lists; :class:`CacheFolderError` naming ``kind.key`` and ``advice`` otherwise."""
    folder = Path(folder)
    where = f"{kind.key}={str(folder)!r}"
    meta = read_meta(folder)
    if not kind.owns(meta):
        raise CacheFolderError(f"{where} holds no readable {kind.what} ({META} missing or damaged). {advice}")
    assert meta is not None
    if meta.get("format_version") != format_version:
        raise CacheFolderError(
            f"{where} has format version {meta.get('format_version')}, this gere-plugin reads {format_version}. {advice}"
        )
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise CacheFolderError(f"{where}: {META} lists no data files. {advice}")
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            raise CacheFolderError(f"{where}: {name} is missing. {advice}")
        if path.stat().st_size != info.get("size") or file_sha256(path) != info.get("sha256"):
            raise CacheFolderError(f"{where}: {name} is truncated or corrupted (size or checksum differs). {advice}")
    return meta


# ---------------------------------------------------------------------------------------------
# Reuse, build or refuse: decided before any forward pass
# ---------------------------------------------------------------------------------------------
@dataclass
class CachePlan:
    """What :func:`plan_folder` (or :func:`~gere_plugin.cache.state_cache.plan_state_cache`) decided for a
    folder: ``reuse`` (``cache`` is loaded), ``build`` (absent or empty folder) or ``rebuild`` (replace a GeRe
    cache, only with ``force``)."""

    folder: Path
    action: str
    cache: Optional[Any] = None  # a StateCache for the state cache; the loaded object for other kinds
    reason: str = ""


def plan_folder(folder: str | os.PathLike, kind: CacheKind, load: Callable[[], Any], *, force: bool = False) -> CachePlan:
    """The reuse / build / refuse decision for a folder of any ``kind``.

    * absent or empty folder: ``build``;
    * a folder of this kind that ``load()`` accepts: ``reuse`` (``rebuild`` with ``force``);
    * one that ``load()`` rejects (damaged, or not fitting the run): its :class:`CacheFolderError`
      (``rebuild`` with ``force``);
    * anything else (a file, user files, a model folder, a cache mixed with other files): always
      :class:`CacheFolderError`, with or without ``force``.

    ``load()`` loads the folder and raises :class:`CacheFolderError` when it is damaged or does not fit
    the run; its result is the plan's ``cache`` on ``reuse``.
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return CachePlan(folder, "build")
    if not folder.is_dir():
        raise foreign_error(folder, kind)
    names = set(folder_entries(folder))
    if not names:
        return CachePlan(folder, "build")
    meta = read_meta(folder)
    # A folder is read as a cache only when its meta.json is GeRe's, or when it holds nothing but
    # cache files (then a damaged meta.json is reported as damage, not as a foreign folder).
    if META not in names or not (kind.owns(meta) or names <= set(kind.files)):
        raise foreign_error(folder, kind)
    try:
        cache = load()
    except CacheFolderError as e:
        if not force:
            raise
        check_replaceable(folder, kind)  # force replaces only a folder that IS a GeRe cache
        return CachePlan(folder, "rebuild", reason=str(e))
    if force:
        check_replaceable(folder, kind)
        return CachePlan(folder, "rebuild", cache=None, reason="forced")
    return CachePlan(folder, "reuse", cache=cache)
