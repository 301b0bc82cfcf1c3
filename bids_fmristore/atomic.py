"""Atomic file creation: write a temporary sibling, then rename it onto the final name.

fmristore's readers cannot tell a truncated file from a complete one, so nothing is ever written
in place. The temporary file lives in the destination folder so that :func:`os.replace` is a
rename within one file system (atomic on POSIX).

Temporary names embed the writer's owner token (host, pid, random) and each temporary has a
sibling lock file (``<temporary>.lock``) that the writer holds an exclusive :func:`fcntl.flock`
on for the temporary's whole life. :func:`atomic_folder` does the same for a folder (a
``.nii.zarr`` store); the folder it replaces waits under ``<temporary>.old``, covered by the
same lock, until the new one is in place. Several jobs (a SLURM array, possibly on several nodes)
share OUTPUT_DIR, so :mod:`bids_fmristore.stale` removes a leftover only when it can take that
lock, i.e. when its writer is dead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from bids_fmristore import interrupt

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["atomic_folder", "atomic_path", "atomic_write_text", "unreserve", "PARTIAL_MARK",
           "LOCK_SUFFIX", "ASIDE_SUFFIX", "final_of", "owner_token", "parse_token",
           "remove_own_temporaries", "remove_path", "write_once", "WrittenTwice", "errno_of"]

#: Substring of every temporary name, so that leftovers of a killed process are recognisable.
PARTIAL_MARK = ".partial-"
#: Suffix of a temporary's lock file (``<temporary name>.lock``).
LOCK_SUFFIX = ".lock"
#: Suffix of the folder :func:`atomic_folder` replaces, while it does (``<temporary>.old``).
ASIDE_SUFFIX = ".old"

#: Final paths claimed in the current invocation (None: no invocation is being checked).
_claimed: set[Path] | None = None
#: This process's live temporaries → their lock files, for signal handlers that cannot unwind.
_live: dict[Path, Path] = {}
_token: tuple[int, str] | None = None


class WrittenTwice(RuntimeError):
    """A bug: one invocation was about to write the same output path twice."""


@contextlib.contextmanager
def write_once() -> Iterator[None]:
    """Within the block, writing the same final path twice raises :class:`WrittenTwice`.

    The command line wraps each invocation in it: two outputs that map to one name would
    otherwise silently replace each other (e.g. two grids under one file name).
    """
    global _claimed
    saved, _claimed = _claimed, set()
    try:
        yield
    finally:
        _claimed = saved


def _claim(final: Path) -> None:
    if _claimed is None:
        return
    key = Path(os.path.abspath(final))
    if key in _claimed:
        raise WrittenTwice(f"{final} would be written twice in one invocation")
    _claimed.add(key)


def owner_token() -> str:
    """``<host>.<pid>.<random>`` of this process (recomputed in a forked child)."""
    global _token
    if _token is None or _token[0] != os.getpid():
        host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
        _token = (os.getpid(), f"{host}.{os.getpid()}.{secrets.token_hex(3)}")
    return _token[1]


def parse_token(name: str) -> tuple[str, int] | None:
    """(host, pid) of the writer of a temporary (or lock) file name; None if not ours."""
    _, mark, rest = name.rpartition(PARTIAL_MARK)
    parts = rest.split(".")
    if not mark or len(parts) < 4 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _lock(fd: int) -> bool:
    """Take the exclusive lock; False where the file system does not support flock."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError:  # e.g. ENOLCK on some network file systems: owner pid check instead
        return False
    return True


def final_of(temporary: Path) -> Path:
    """The final path a temporary (or its lock file, or a folder set aside) was made for."""
    name = temporary.name
    return temporary.with_name(name[1 : name.rindex(PARTIAL_MARK)])


def _create_temp(final: Path, *, folder: bool = False) -> tuple[Path, Path, int]:
    """Create lock file (locked) then temporary (an empty file, or a folder); return
    (temporary, lock, lock fd)."""
    for _ in range(100):
        name = f".{final.name}{PARTIAL_MARK}{owner_token()}.{secrets.token_hex(4)}{final.suffix}"
        tmp = final.parent / name
        lock = final.parent / (name + LOCK_SUFFIX)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            continue
        try:
            try:
                _lock(fd)
            except BlockingIOError:  # a cleaner holds it: it is about to remove the lock file
                _release(lock, fd, unlink=False)
                continue
            # a cleaner may have removed our lock file between its creation and the flock
            if os.fstat(fd).st_ino != os.stat(lock).st_ino:
                raise FileNotFoundError(lock)
            _live[tmp] = lock
            if folder:
                os.mkdir(tmp)
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except (FileExistsError, FileNotFoundError):
            _live.pop(tmp, None)
            _release(lock, fd)
            continue
        except BaseException:
            _live.pop(tmp, None)
            _release(lock, fd)
            raise
        return tmp, lock, fd
    raise FileExistsError(f"cannot create a temporary file next to {final}")


def _release(lock: Path, fd: int, *, unlink: bool = True) -> None:
    if unlink:  # before closing: once unlocked, a cleaner could take a stale-looking lock
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
    with contextlib.suppress(OSError):
        os.close(fd)


def remove_own_temporaries() -> list[Path]:
    """Unlink this process's live temporaries and their lock files; return the temporaries.

    For signal handlers of worker processes, which exit at once instead of unwinding (the
    files may still be open: unlinking them is fine on POSIX).
    """
    removed = []
    for tmp, lock in list(_live.items()):
        aside = tmp.with_name(tmp.name + ASIDE_SUFFIX)
        if aside.is_dir() and not final_of(tmp).exists():  # between atomic_folder's renames
            with contextlib.suppress(OSError):
                os.replace(aside, final_of(tmp))
        for path in (tmp, aside, lock):
            remove_path(path)
        _live.pop(tmp, None)
        removed.append(tmp)
    return removed


def remove_path(path: Path) -> bool:
    """Remove a file or a folder tree if it is there; True if it was."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return True
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _owned(final: Path, *, folder: bool) -> Iterator[Path]:
    """This writer's temporary (file or folder) of ``final``, made with its lock file; if the
    body raises, it is removed with the folders made for it. The lock goes last either way."""
    _claim(final)
    created = [p for p in (final.parent, *final.parent.parents) if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp, lock, fd = _create_temp(final, folder=folder)
    except BaseException:
        _remove_folders(created)
        raise
    try:
        yield tmp
    except BaseException as exc:
        remove_path(tmp)
        _release(lock, fd)
        _live.pop(tmp, None)  # last: if interrupted before, remove_own_temporaries() can
        _remove_folders(created)
        named = _naming(exc, final)
        if named is not None:
            raise named from exc
        raise
    _release(lock, fd)
    _live.pop(tmp, None)


def errno_of(err: OSError) -> int | None:
    """The errno, also from HDF5's messages (h5py leaves ``errno`` unset: "errno = 28")."""
    if err.errno is not None:
        return err.errno
    found = re.search(r"errno = (\d+)", str(err))
    return int(found.group(1)) if found else None


#: errno values that mean the file system refused the bytes (full, a quota, a size limit)
_REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _naming(exc: BaseException, final: Path) -> OSError | None:
    """An OSError that names ``final`` for a refused write of its temporary that names no
    file (``os.write``, ``Path.write_bytes``) or the temporary (HDF5's messages, several lines
    long): ``<final>: cannot be written (No space left on device)``."""
    if not isinstance(exc, OSError) or errno_of(exc) not in _REFUSED:
        return None
    if exc.filename is not None and PARTIAL_MARK not in Path(str(exc.filename)).name:
        return None
    code = errno_of(exc)
    return OSError(code, f"cannot be written ({os.strerror(code)})", str(final))


def _refuse_after_signal() -> None:
    # The signal's exception may have been swallowed inside C code (h5py) while the file was
    # written: after a signal, nothing is published under a final name.
    signum = interrupt.received()
    if signum is not None:
        raise interrupt.Terminated(signum)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success rename it to ``final``.

    If the body raises (including ``KeyboardInterrupt`` and other ``BaseException``), the
    temporary file is removed and ``final`` is left untouched.

    Raises
    ------
    FileExistsError
        If ``final`` exists and ``overwrite`` is false (checked before and after writing).
    """
    final = Path(final)
    if not overwrite and final.exists():
        raise FileExistsError(final)
    with _owned(final, folder=False) as tmp:
        yield tmp
        _refuse_after_signal()
        if not overwrite and final.exists():
            raise FileExistsError(final)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside ``final``; on success it replaces ``final``.

    As :func:`atomic_path` (owner token, lock file, nothing published after a signal), for a
    folder: if the body raises, the temporary folder is removed and ``final`` is left as it
    was. A replaced ``final`` is first renamed aside (``<temporary>.old``), then removed once
    the new folder is in place, so its name never shows a partial image; a writer killed in
    between leaves the old folder aside, which :mod:`bids_fmristore.stale` puts back.

    Raises
    ------
    FileExistsError
        ``final`` exists and ``overwrite`` is false (checked before and after writing).
    """
    final = Path(final)
    if not overwrite and (final.exists() or final.is_symlink()):
        raise FileExistsError(final)
    with _owned(final, folder=True) as tmp:
        yield tmp
        _refuse_after_signal()
        if not (final.exists() or final.is_symlink()):
            os.replace(tmp, final)
            return
        if not overwrite:
            raise FileExistsError(final)
        aside = tmp.with_name(tmp.name + ASIDE_SUFFIX)
        os.replace(final, aside)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(aside, final)
            raise
        remove_path(aside)


def unreserve(tmp: Path) -> Path:
    """Remove :func:`atomic_path`'s empty placeholder ``tmp`` (and return it) for a writer
    that then creates the file itself (exclusive mode ``"x"``).

    The placeholder reserves the name; a writer that truncates it instead (mode ``"w"``) makes
    ext4 write the whole file out when it is closed (``auto_da_alloc``): 1.1-1.3 s per GB in
    the writer's thread, where a new file is left to the kernel's writeback.
    """
    tmp.unlink()
    return tmp


def _remove_folders(created: list[Path]) -> None:
    for folder in created:  # innermost first; leave no empty folders behind either
        with contextlib.suppress(OSError):
            folder.rmdir()


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _umask() -> int:
    # os.umask can only be read by setting it; done once per write, cheap.
    mask = os.umask(0)
    os.umask(mask)
    return mask
