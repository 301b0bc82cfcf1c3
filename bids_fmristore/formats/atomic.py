"""Atomic file creation: write a temporary sibling, then rename it onto the final name.

fmristore's readers cannot tell a truncated file from a complete one, so nothing is ever written
in place. The temporary file lives in the destination folder so that :func:`os.replace` is a
rename within one file system (atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "PARTIAL_MARK", "write_once", "WrittenTwice"]

#: Substring of every temporary name, so that leftovers of a killed process are recognisable.
PARTIAL_MARK = ".partial-"

#: Final paths claimed in the current invocation (None: no invocation is being checked).
_claimed: set[Path] | None = None


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


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success rename it to ``final``.

    If the body raises (including ``KeyboardInterrupt``), the temporary file is removed and
    ``final`` is left untouched.

    Raises
    ------
    FileExistsError
        If ``final`` exists and ``overwrite`` is false (checked before and after writing).
    """
    final = Path(final)
    if not overwrite and final.exists():
        raise FileExistsError(final)
    _claim(final)
    created = [p for p in (final.parent, *final.parent.parents) if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{final.name}{PARTIAL_MARK}", suffix=final.suffix, dir=final.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if not overwrite and final.exists():
            raise FileExistsError(final)
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        for folder in created:  # innermost first; leave no empty folders behind either
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _umask() -> int:
    # os.umask can only be read by setting it; done once per write, cheap.
    mask = os.umask(0)
    os.umask(mask)
    return mask
