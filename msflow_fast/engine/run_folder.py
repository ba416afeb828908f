"""The output folder of a run: one writer at a time (a lock), no stale temporary files, fresh result folders.

- :class:`RunLock`: ``<folder>/.msflow-fast.lock`` holds the writer's pid, host and start time.
  A second process is refused with a message naming the first; a lock whose process is gone
  (same host, pid not alive) is stale and taken over. Re-entrant within one process.
- :func:`remove_stale_temporaries`: the hidden ``.<name>.*.tmp`` files an atomic write leaves
  when its process is killed (``kill -9``); only the lock holder may remove them.
- :func:`fresh_folder`: writes a result folder (e.g. ``heatmaps/``) beside the old one and swaps
  it in when complete, so it never mixes two runs' files and is never half-written.
- :func:`previous_run`: what a folder already holds (``last.pt``, ``metrics.json``, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "RUN_FILES", "RunLock", "check_writable", "fresh_folder", "previous_run", "remove_stale_temporaries"]

LOCK_NAME = ".msflow-fast.lock"
RUN_FILES = ("last.pt", "metrics.json", "scores.csv", "heatmaps")
"""What a training run writes into its folder."""

_held: dict[str, int] = {}  # lock path -> depth, for this process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and check that files can be written there (a probe file).

    Raises:
        OSError: the folder cannot be created or written, with a message naming it.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe.", delete=True):
            pass
    except OSError as exc:
        raise OSError(f"cannot write to {folder}: {exc.strerror or exc}; choose another --out or fix its permissions") from None
    return folder


class RunLock:
    """Exclusive use of a run folder by this process (see the module docstring).

    Raises (on enter):
        RuntimeError: another live process holds the folder; the message names it.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "training") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def __enter__(self) -> "RunLock":
        key = str(self.path.resolve())
        if _held.get(key):
            _held[key] += 1
            return self
        check_writable(self.folder)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "what": self.what})
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:  # a lock being written this instant, or an unreadable one
                    time.sleep(0.05)
                    owner = self._owner()
                if owner is not None and owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                if owner is None:
                    raise RuntimeError(f"{self.folder} is locked by {self.path}, which cannot be read; delete it if no run is writing there")
                raise RuntimeError(
                    f"{self.folder} is in use by another {owner.get('what', 'run')} (pid {owner.get('pid')} on "
                    f"{owner.get('host')}, since {owner.get('started')}); wait for it to finish, use another --out, "
                    f"or delete {self.path} if that process is gone"
                )
            with os.fdopen(fd, "w") as f:
                f.write(record)
            _held[key] = 1
            return self
        raise RuntimeError(f"could not take the lock {self.path}; another process keeps replacing it")

    def __exit__(self, *exc) -> None:
        key = str(self.path.resolve())
        _held[key] -= 1
        if _held[key] == 0:
            del _held[key]
            owner = self._owner()
            if owner is not None and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the ``.<name>.*.tmp`` files left in ``folder`` (and ``heatmaps*``) by killed writers.

    Call it only while holding the folder's :class:`RunLock`: then no other process writes there.

    Returns:
        The files (and half-written folders) removed.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        name = path.name
        if name.startswith(".") and name.endswith(".tmp") and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
        elif name.startswith(".") and ".partial." in name and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    heatmaps = folder / "heatmaps"
    if heatmaps.is_dir():
        for path in heatmaps.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def fresh_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder to fill; on success it replaces ``final`` (the old one removed).

    On an error the partial folder is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial."))
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old.{os.getpid()}.partial.{time.time_ns()}"
        os.replace(final, old)
    os.replace(partial, final)
    os.chmod(final, 0o777 & ~_umask())
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def previous_run(folder: str | os.PathLike) -> list[str]:
    """The names of :data:`RUN_FILES` that ``folder`` already holds."""
    folder = Path(folder)
    return [name for name in RUN_FILES if (folder / name).exists()]
