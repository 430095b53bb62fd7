"""OS failures while writing a cache folder or file (gere_plugin.cache.io).

A full disk (ENOSPC) or a refused permission (EACCES) is simulated by replacing the low-level call that
fails (a file write, ``os.replace``, ``os.mkdir``, ``os.fsync``): the tests run as root, so ``chmod``
cannot produce EACCES. Each failure must raise :class:`CacheWriteError` (a :class:`StateCacheError`,
hence a ``GeReConfigError``) whose message names the folder, what was written, the OS reason and the fix;
leave no temporary behind; and leave the folder as it was (absent, or the previous cache, byte for byte).
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from gere_plugin.cache import io as cache_io
from gere_plugin.cache import state_cache as state_cache_module
from gere_plugin.cache.folders import META, STATE_CACHE, CacheFolderError, CacheKind, StateCacheError
from gere_plugin.cache.io import CacheWriteError, os_failure, save_folder_atomically, write_file_atomically
from gere_plugin.cache.state_cache import StateCache, build_state_cache, ensure_state_cache
from gere_plugin.config import GeReConfigError
from gere_plugin.data.replay_set import ReplaySet

from .conftest import general_texts

DATA = "data.bin"
KIND = CacheKind(key="gere_test_cache", files=(META, DATA), identity=("x",), what="GeRe test cache", label="gere_test")
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
EACCES = PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def snapshot(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (folders as "dir")."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def write_data(payload: bytes = b"x" * 1000) -> Any:
    def write(tmp: Path) -> None:
        (tmp / DATA).write_bytes(payload)

    return write


def save(folder: Path, write: Any = None) -> None:
    save_folder_atomically(folder, KIND, write or write_data(), {"format_version": 1, "kind": "gere_test", "x": 1}, (DATA,))


def full_disk_write(tmp: Path) -> None:
    """Half of the data file reaches the disk, then the disk is full."""
    with open(tmp / DATA, "wb") as fh:
        fh.write(b"y" * 500)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---------------------------------------------------------------------------------------------
# save_folder_atomically
# ---------------------------------------------------------------------------------------------
def test_error_classes() -> None:
    import gere_plugin.states

    assert StateCacheError is CacheFolderError is gere_plugin.states.StateCacheError
    assert issubclass(CacheWriteError, StateCacheError) and issubclass(CacheWriteError, GeReConfigError)


def test_disk_full_while_writing_a_new_folder_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    with pytest.raises(CacheWriteError) as info:
        save(folder, full_disk_write)
    msg = str(info.value)
    assert f"gere_test_cache={str(folder)!r}" in msg
    assert "writing the GeRe test cache (data.bin)" in msg
    assert os.strerror(errno.ENOSPC) in msg
    assert "Nothing was left in the folder" in msg
    assert "Free space" in msg and "point gere_test_cache at a folder" in msg
    assert not folder.exists()
    assert temporaries(tmp_path) == []


def test_disk_full_into_an_empty_folder_leaves_it_empty(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    with pytest.raises(CacheWriteError, match="Nothing was left in the folder"):
        save(folder, full_disk_write)
    assert folder.is_dir() and not any(folder.iterdir())
    assert temporaries(tmp_path) == []


def test_disk_full_while_replacing_keeps_the_previous_folder(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    save(folder)
    before = snapshot(tmp_path)
    with pytest.raises(CacheWriteError) as info:
        save(folder, full_disk_write)
    assert "The previous GeRe test cache there is untouched" in str(info.value)
    assert snapshot(tmp_path) == before
    assert temporaries(tmp_path) == []


def test_disk_full_while_writing_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "c"
    real_fsync = os.fsync
    calls = []

    def fsync(fd: int) -> None:  # the data file is written by ``write``; the first fsync here is meta.json's
        calls.append(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_io.os, "fsync", fsync)
    with pytest.raises(CacheWriteError, match=f"writing the GeRe test cache's {META} failed"):
        save(folder)
    monkeypatch.setattr(cache_io.os, "fsync", real_fsync)
    assert calls and not folder.exists()
    assert temporaries(tmp_path) == []


def test_permission_denied_on_the_swap_restores_the_previous_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "c"
    save(folder)
    before = snapshot(tmp_path)
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:  # moving the old folder out works, moving the new one in is refused
        if Path(src).name.startswith(".c.tmp-"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        real_replace(src, dst)

    monkeypatch.setattr(cache_io.os, "replace", replace)
    with pytest.raises(CacheWriteError) as info:
        save(folder, write_data(b"new" * 10))
    monkeypatch.setattr(cache_io.os, "replace", real_replace)
    msg = str(info.value)
    assert "moving the new GeRe test cache into place failed" in msg and os.strerror(errno.EACCES) in msg
    assert "The previous GeRe test cache there is untouched" in msg
    assert "writable" in msg
    assert snapshot(tmp_path) == before
    assert temporaries(tmp_path) == []


def test_permission_denied_creating_the_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "c"

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(cache_io.os, "mkdir", mkdir)
    with pytest.raises(CacheWriteError) as info:
        save(folder)
    monkeypatch.undo()
    msg = str(info.value)
    assert "creating a temporary folder next to it" in msg and "Nothing was left in the folder" in msg
    assert "Make that folder writable" in msg
    assert list(tmp_path.iterdir()) == []


def test_safetensors_io_error_is_an_os_failure(tmp_path: Path) -> None:
    from safetensors import SafetensorError

    err = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert os_failure(err) == (28, "No space left on device")
    assert os_failure(SafetensorError("invalid header")) is None
    assert os_failure(ValueError("no")) is None

    def write(tmp: Path) -> None:
        (tmp / DATA).write_bytes(b"z" * 10)
        raise err

    with pytest.raises(CacheWriteError, match=r"\(data.bin\) failed: No space left on device\. Nothing was left"):
        save(tmp_path / "c", write)
    assert list(tmp_path.iterdir()) == []


def test_other_errors_propagate_unchanged_and_clean_up(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        (tmp / DATA).write_bytes(b"z")
        raise ValueError("a bug, not the disk")

    with pytest.raises(ValueError, match="a bug"):
        save(tmp_path / "c", write)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# write_file_atomically
# ---------------------------------------------------------------------------------------------
def test_write_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "rows.jsonl"
    write_file_atomically(path, '{"a": 1}\n', "the kept earlier-task rows")
    assert path.read_text() == '{"a": 1}\n'
    write_file_atomically(path, b"xyz", "the kept earlier-task rows")
    assert path.read_bytes() == b"xyz"
    assert temporaries(path.parent) == []


def test_write_file_disk_full_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("old\n")

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_io.os, "fsync", fsync)
    with pytest.raises(CacheWriteError) as info:
        write_file_atomically(path, "new\n", "the kept earlier-task rows", key="gere_task_replay_keep")
    monkeypatch.undo()
    msg = str(info.value)
    assert f"gere_task_replay_keep={str(path)!r}: writing the kept earlier-task rows failed" in msg
    assert os.strerror(errno.ENOSPC) in msg and "The previous rows.jsonl is untouched" in msg
    assert path.read_text() == "old\n"
    assert temporaries(tmp_path) == []


def test_write_file_permission_denied_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rows.jsonl"

    def replace(src: Any, dst: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(cache_io.os, "replace", replace)
    with pytest.raises(CacheWriteError) as info:
        write_file_atomically(path, "new\n", "the kept earlier-task rows")
    monkeypatch.undo()
    msg = str(info.value)
    assert f"Nothing was written to {str(path)!r}" in msg and "choose a folder that is writable" in msg
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# End to end: the state cache of a tiny model on a full disk
# ---------------------------------------------------------------------------------------------
class _FullDiskFile:
    """A binary file whose first write stores half of its data, then fails with ENOSPC."""

    def __init__(self, path: Any, mode: str) -> None:
        self._fh = builtins.open(path, mode)

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._fh.close()

    def write(self, data: bytes) -> int:
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_state_cache_on_a_full_disk(tmp_path: Path, tiny_model: Any, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    replay = ReplaySet.from_texts(general_texts(24, seed=5), tiny_tokenizer, size=20, max_length=24, seed=1)
    folder = tmp_path / "states"
    hidden = tiny_model.config.hidden_size

    def build() -> StateCache:
        return build_state_cache(tiny_model, replay, layers=[-1], sigma=1.0, progress=False)

    def ensure(force: bool = False) -> Any:
        return ensure_state_cache(folder, replay, hidden, [-1], 1.0, build, force=force)

    def fill_disk() -> None:
        def fake_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if "w" in mode:
                return _FullDiskFile(path, mode)
            return builtins.open(path, mode, *args, **kwargs)

        monkeypatch.setattr(state_cache_module, "open", fake_open, raising=False)

    fill_disk()
    with pytest.raises(CacheWriteError) as info:
        ensure()
    monkeypatch.undo()
    msg = str(info.value)
    assert f"gere_state_cache={str(folder)!r}" in msg and "labels.bin" in msg
    assert os.strerror(errno.ENOSPC) in msg and "Nothing was left in the folder" in msg
    assert "point gere_state_cache at a folder" in msg
    assert list(tmp_path.iterdir()) == []

    assert ensure().action == "build"  # with room on the disk the same call writes the cache
    before = snapshot(tmp_path)
    fill_disk()
    with pytest.raises(CacheWriteError, match="The previous GeRe cache there is untouched"):
        ensure(force=True)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert StateCache.load(folder).meta["replay_fingerprint"] == replay.fingerprint
    assert ensure().action == "reuse"
    assert STATE_CACHE.key == "gere_state_cache"


def test_kept_earlier_task_rows_disk_full_names_the_folder_and_leaves_nothing(
    tmp_path: Path, monkeypatch: Any, tiny_tokenizer: Any
) -> None:
    """The sequence runner's kept earlier-task rows go through the same atomic writer: a disk-full write
    stops with a CacheWriteError that names the file's folder, and no file or temporary is left."""
    from gere_plugin.continual import SequenceTask, TrainSettings
    from gere_plugin.continual.task_rows import keep_task_sample

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    rows = [{"prompt": f"review {i} was", "completion": " good"} for i in range(6)]
    task = SequenceTask(name="sst2", train=rows, test=[])
    folder = tmp_path / "task_replay"
    monkeypatch.setattr(cache_io.os, "fsync", full)
    with pytest.raises(CacheWriteError) as info:
        keep_task_sample(task, tiny_tokenizer, TrainSettings(completion_eos=False), seed=0, index=0, folder=folder)
    monkeypatch.undo()
    message = str(info.value)
    assert str(folder) in message and "No space left on device" in message and "Nothing was written" in message
    assert list(folder.iterdir()) == []
    # the same call without the failure writes the rows (the failure above was the only difference)
    path, kept = keep_task_sample(task, tiny_tokenizer, TrainSettings(completion_eos=False), seed=0, index=0,
                                  folder=folder)
    assert kept == min(TrainSettings().gere_task_replay_size, 6) and len(path.read_text().splitlines()) == kept
