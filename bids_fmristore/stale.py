"""Removal of temporaries left by killed writers (SIGKILL, node failure, out of memory).

Only temporaries of :func:`bids_fmristore.atomic.atomic_path` and
:func:`~bids_fmristore.atomic.atomic_folder` are considered (their names contain
``PARTIAL_MARK`` and an owner token), and only when their writer is dead (a folder such a
writer had set aside to replace it is put back if its replacement never got there): a live
writer holds an exclusive ``flock`` on the temporary's lock file, so a cleaner that can take
that lock without blocking knows the owner has gone. Several jobs may share OUTPUT_DIR, on
several nodes, so this is the only safe test. Where the file system does not support flock,
a temporary is removed only if its token names this host and a pid that is not alive. Some
network mounts take flocks locally only (NFS ``local_lock``), where another node's lock looks
free: another host's temporary must also be untouched for :data:`OTHER_HOST_AGE` seconds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

from bids_fmristore.atomic import (
    ASIDE_SUFFIX,
    LOCK_SUFFIX,
    PARTIAL_MARK,
    final_of,
    owner_token,
    parse_token,
    remove_path,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["remove_stale"]

log = logging.getLogger(__name__)

#: Seconds without modification after which another host's unlocked temporary is stale.
OTHER_HOST_AGE = 600.0


def remove_stale(folders: Iterable[Path], *, recursive: bool = False) -> list[Path]:
    """Remove dead writers' temporaries (and their lock files) in ``folders``.

    Parameters
    ----------
    folders : iterable of Path
        Folders to scan (missing ones are ignored). Only their own entries are scanned,
        or everything below them with ``recursive``: pass the selected subjects' folders,
        not all of OUTPUT_DIR, so that a job's cost does not grow with the dataset.
    recursive : bool
        Also scan sub-folders.

    Returns
    -------
    list of Path
        The temporaries removed (one INFO line is logged for each).
    """
    removed = []
    for folder in folders:
        for tmp in _candidates(Path(folder), recursive):
            if _remove_if_dead(tmp):
                removed.append(tmp)
    return removed


def _candidates(folder: Path, recursive: bool) -> list[Path]:
    """Temporaries (named by their temporary path, even when only the lock file is left)."""
    try:
        entries = folder.rglob(f"*{PARTIAL_MARK}*") if recursive else folder.iterdir()
        names = sorted({_temp_of(p) for p in entries
                        if PARTIAL_MARK in p.name and parse_token(p.name) is not None})
    except (FileNotFoundError, NotADirectoryError):
        return []
    return names


def _temp_of(path: Path) -> Path:
    if path.name.endswith(LOCK_SUFFIX):
        return path.with_name(path.name[: -len(LOCK_SUFFIX)])
    return path


def _remove_if_dead(tmp: Path) -> bool:
    # a folder that atomic_folder set aside is covered by its temporary's lock
    owner = (tmp.with_name(tmp.name[: -len(ASIDE_SUFFIX)]) if tmp.name.endswith(ASIDE_SUFFIX)
             else tmp)
    lock = owner.with_name(owner.name + LOCK_SUFFIX)
    if lock.is_dir():  # not ours
        return False
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        # writers create the lock before the temporary and remove it after: a temporary
        # without a lock file has no live writer
        return _discard(tmp, None)
    except OSError:
        return False
    try:
        dead = _owner_dead(fd, tmp.name) and _quiet_long_enough(tmp)
        if dead:
            # removed while holding the lock: a writer that races for this name sees it go
            return _discard(tmp, lock)
        return False
    finally:
        os.close(fd)


def _owner_dead(fd: int, name: str) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:  # no flock on this file system
            pass
    owner = parse_token(name)
    return owner is not None and owner[0] == _host() and not _pid_alive(owner[1])


def _quiet_long_enough(tmp: Path) -> bool:
    owner = parse_token(tmp.name)
    if owner is None or owner[0] == _host():
        return True
    try:
        return time.time() - tmp.stat().st_mtime > OTHER_HOST_AGE
    except FileNotFoundError:
        return True


def _host() -> str:
    return owner_token().split(".")[0]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _discard(tmp: Path, lock: Path | None) -> bool:
    """Remove a dead writer's temporary (file or folder) and its lock; a folder it had set
    aside to replace it goes back to its name if the replacement never got there."""
    final = final_of(tmp)
    if tmp.name.endswith(ASIDE_SUFFIX) and tmp.is_dir() and not (
            final.exists() or final.is_symlink()):
        try:
            os.replace(tmp, final)
        except OSError:
            return False
        log.info("restored %s, which an interrupted run had set aside to replace it", final)
        done = True
    else:
        kind = "folder" if tmp.is_dir() and not tmp.is_symlink() else "file"
        done = remove_path(tmp)
        if done:
            log.info("removed %s, a temporary %s left by an interrupted run", tmp, kind)
    if lock is not None:
        remove_path(lock)
    return done
