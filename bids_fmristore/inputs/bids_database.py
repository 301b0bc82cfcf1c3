"""The pybids databases of ``--bids-database-dir`` (shared) and ``-w`` (private).

* **shared** (``--bids-database-dir DIR``): one index per dataset of **all** its subjects,
  built once (by ``--index-only`` or by the first job that finds none, under a lock that makes
  concurrent jobs wait for it), then opened read-only by any number of jobs at once, whatever
  their ``--participant-label``: the selection happens in the queries. The database is built in
  a temporary folder and renamed into place, so a job sees a complete file or none, and it is
  never written again. It records the modification time of every folder of every subject it
  indexed: a job whose subjects were added or changed on disk since then stops with one error
  line instead of silently missing them (delete the database to rebuild it).
* **private** (``-w WORK`` without ``--bids-database-dir``): an index of the job's selection,
  rebuilt by every job in ``WORK/bids_db`` (indexing one subject is quick).

What is indexed is :mod:`bids_fmristore.inputs.indexing`'s choice.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import sqlite3
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path

from bids_fmristore.atomic import PARTIAL_MARK, owner_token
from bids_fmristore.errors import InputError
from bids_fmristore.inputs.indexing import (
    indexer_for,
    open_layout,
    relative_posix,
    subject_labels,
)

__all__ = ["DB_FILE", "INDEX_VERSION", "database_file", "load_layout"]

log = logging.getLogger(__name__)

#: bump when the way files are indexed changes, so databases built by older code are not reused
INDEX_VERSION = "4"
#: the file pybids keeps its index in, inside the database folder
DB_FILE = "layout_index.sqlite"
_FOLDERS_TABLE = "bids_fmristore_folders"




def database_file(database: Path, root: Path, *, derivative: bool, validate: bool,
                  exclude: Sequence[Path] = (), subjects: Sequence[str] | None = None) -> Path:
    """Where the index of ``root`` lives in the database folder ``database``.

    Keyed by what changes the index: the root, its kind, validation, the excluded folders
    inside it, the indexing code and (private databases) the selected subjects. Folders
    excluded outside the root (a per-job ``-w``) do not change the key.
    """
    root = Path(os.path.abspath(root))
    inside = sorted(rel for rel in (relative_posix(Path(p), root) for p in exclude)
                    if rel is not None and rel != ".")
    parts = [INDEX_VERSION, str(root), str(derivative), str(validate), *inside]
    if subjects is not None:
        parts.append("subjects:" + ",".join(sorted(set(subjects))))
    return Path(database) / hashlib.sha1("\n".join(parts).encode()).hexdigest()[:12] / DB_FILE


def load_layout(root: Path, *, derivative: bool, validate: bool,
                subjects: Sequence[str] | None = None, exclude: Sequence[Path] = (),
                database: Path | None = None, shared: bool = False, refresh: bool = False):
    """A pybids ``BIDSLayout`` of the files a job reads, with our errors instead of pybids'.

    Parameters
    ----------
    root
        The dataset.
    derivative, validate
        Its kind (pybids' derivatives configuration) and whether raw files are validated.
    subjects
        Labels to index (None: all subjects). A shared database always holds all subjects.
    exclude
        Folders (e.g. OUTPUT_DIR) not to index when they are inside ``root``.
    database, shared
        The folder of this dataset's pybids databases; ``shared`` for ``--bids-database-dir``
        (see the module's description), else a private database of ``subjects``.
    refresh
        Rebuild a shared database that is out of date instead of refusing it (``--index-only``:
        the command that builds it, run before the jobs that read it).

    Raises
    ------
    InputError
        pybids rejects the dataset, it cannot be read, or a shared database is out of date or
        unusable.
    """
    root = Path(os.path.abspath(root))
    validate = validate and not derivative
    if database is None:
        return open_layout(root, derivative, validate,
                           indexer_for(root, exclude, validate, subjects))
    sqlite_file = database_file(database, root, derivative=derivative, validate=validate,
                                exclude=exclude, subjects=None if shared else subjects)
    def stale() -> bool:
        return refresh and sqlite_file.is_file() and _out_of_date(sqlite_file, root,
                                                                  None) is not None

    if not shared or not sqlite_file.is_file() or stale():
        with _build_lock(sqlite_file) as locked:
            # another job may have built it while this one waited for the lock
            if not shared or not sqlite_file.is_file() or stale():
                indexed = None if shared else subjects
                _build(sqlite_file, root, derivative, validate,
                       indexer_for(root, exclude, validate, indexed), indexed, locked)
                if shared:
                    log.info("%s: pybids index of %s built (all subjects); later jobs reuse "
                             "it", sqlite_file.parent, root)
    if shared:
        reason = _out_of_date(sqlite_file, root, subjects)
        if reason is not None:
            raise InputError(f"{sqlite_file.parent}: the pybids index of {root} in "
                             f"--bids-database-dir is out of date ({reason}); rebuild it with "
                             f"--index-only (or delete {sqlite_file.parent})")
    layout = open_layout(root, derivative, validate, None, sqlite_file)
    _read_only(layout, sqlite_file)
    return layout


@contextlib.contextmanager
def _build_lock(sqlite_file: Path) -> Iterator[bool]:
    """Exclusive lock of one index's builders; others wait. Yields whether it is held (False
    where the file system has no flock)."""
    folder = sqlite_file.parent
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = open(folder.parent / f"{folder.name}.lock", "a+")  # noqa: SIM115
    except OSError as err:
        raise InputError(f"{folder.parent}: cannot use it as a pybids database folder "
                         f"({err.strerror or err})") from None
    with handle:
        try:
            import fcntl

            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("%s: waiting for another job to finish building this pybids index",
                         folder)
                fcntl.flock(handle, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock here: the rename below is still atomic
            yield False
        else:
            yield True


def _build(sqlite_file: Path, root: Path, derivative: bool, validate: bool, indexer,
           subjects: Sequence[str] | None, locked: bool) -> None:
    """Index into a temporary folder, then rename the complete file onto ``sqlite_file``."""
    parent = sqlite_file.parent.parent
    prefix = f".{sqlite_file.parent.name}{PARTIAL_MARK}"
    if locked:  # live builders hold the lock: these are dead ones
        for leftover in parent.glob(prefix + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = parent / f"{prefix}{owner_token()}"
    # folder times first: a folder changed while it is indexed looks out of date later
    folders = {s: _subject_folders(root, s) for s in (subjects or subject_labels(root))}
    try:
        layout = open_layout(root, derivative, validate, indexer, tmp / DB_FILE)
        layout.connection_manager.engine.dispose()
        with contextlib.closing(sqlite3.connect(tmp / DB_FILE)) as con, con:
            con.execute(f"CREATE TABLE {_FOLDERS_TABLE} (subject TEXT NOT NULL, "
                        "folder TEXT NOT NULL, mtime_ns INTEGER NOT NULL, "
                        "PRIMARY KEY (subject, folder))")
            con.executemany(f"INSERT INTO {_FOLDERS_TABLE} VALUES (?, ?, ?)",
                            [(s, f, t) for s, found in folders.items()
                             for f, t in found.items()])
            # pybids filters by entity value: without it every query scans all tags
            con.execute("CREATE INDEX IF NOT EXISTS ix_bids_fmristore_tags "
                        "ON tags (entity_name, _value)")
        sqlite_file.parent.mkdir(exist_ok=True)
        os.replace(tmp / DB_FILE, sqlite_file)
    except (sqlite3.Error, OSError) as err:
        raise InputError(f"{sqlite_file.parent}: cannot write the pybids database "
                         f"({err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _subject_folders(root: Path, subject: str) -> dict[str, int]:
    """Root-relative folder → modification time (ns) of a subject's folders, as pybids walks
    them (dot folders skipped, symlinked folders followed)."""
    found = {}
    top = root / f"sub-{subject}"
    for here, dirs, _ in os.walk(top, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        with contextlib.suppress(OSError):
            found[Path(here).relative_to(root).as_posix()] = os.stat(here).st_mtime_ns
    return found


def _connect_read_only(sqlite_file: Path) -> sqlite3.Connection:
    # immutable: the file is never written after its rename into place, so no locking is
    # needed (network file systems often lack it)
    uri = f"file:{urllib.parse.quote(str(sqlite_file))}?mode=ro&immutable=1"
    return sqlite3.connect(uri, uri=True, check_same_thread=False)


def _out_of_date(sqlite_file: Path, root: Path, subjects: Sequence[str] | None) -> str | None:
    """Why the shared index no longer matches the subjects' folders on disk; None if it does."""
    try:
        with contextlib.closing(_connect_read_only(sqlite_file)) as con:
            recorded = set(s for (s,) in con.execute(
                f"SELECT DISTINCT subject FROM {_FOLDERS_TABLE}"))
            if subjects is None:
                on_disk = set(subject_labels(root))
                added = sorted(on_disk - recorded)
                if added:
                    return f"sub-{added[0]} was added since it was built"
                removed = sorted(recorded - on_disk)
                if removed:
                    return f"sub-{removed[0]} was removed since it was built"
            for s in sorted(set(subjects if subjects is not None else recorded)):
                now = _subject_folders(root, s) if (root / f"sub-{s}").is_dir() else {}
                then = dict(con.execute(f"SELECT folder, mtime_ns FROM {_FOLDERS_TABLE} "
                                        "WHERE subject = ?", (s,)))
                if now and s not in recorded:
                    return f"sub-{s} was added since it was built"
                if now != then:
                    changed = sorted(set(now.items()) ^ set(then.items()))
                    return f"{changed[0][0]} changed since it was built"
    except sqlite3.Error as err:
        return f"not a database of this version ({err})"
    return None


def _read_only(layout, sqlite_file: Path) -> None:
    """Point the layout's queries at a read-only, immutable connection to its database, so that
    no job can ever write a shared database."""
    import sqlalchemy as sa
    import sqlalchemy.orm
    from sqlalchemy.pool import NullPool

    manager = getattr(layout, "connection_manager", None)
    if manager is None or not hasattr(manager, "sessionmaker"):  # another pybids: keep its own
        return
    engine = sa.create_engine("sqlite://", creator=lambda: _connect_read_only(sqlite_file),
                              poolclass=NullPool)

    @sa.event.listens_for(engine, "begin")
    def _regexp(conn):  # pybids' REGEXP function, as its own engines register it
        conn.connection.create_function(
            "regexp", 2,
            lambda expr, item: isinstance(item, str)
            and re.search(expr, item, re.I) is not None)

    manager.engine.dispose()
    manager.engine = engine
    manager.sessionmaker = sqlalchemy.orm.sessionmaker(bind=engine)
    manager._session = None
