"""What pybids indexes for a job: the top of each dataset and the selected subjects only.

A participant job indexes, in BIDS_DIR and in every ``-d`` dataset, only the files at the top of
the dataset and the folders of the selected subjects, never OUTPUT_DIR (as fMRIPrep does with
its indexer's ``ignore`` list), so its start-up does not grow with the number of subjects.
Top-level metadata (``dataset_description.json``, ``participants.tsv``, JSON sidecars) is read
from the files themselves, not from the index. The databases that keep such indexes are
:mod:`bids_fmristore.inputs.bids_database`'s.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from bids_fmristore.errors import InputError

__all__ = ["indexer_for", "open_layout", "relative_posix", "subject_labels", "has_subjects"]

_SUBJECT = re.compile(r"sub-([A-Za-z0-9]+)")
def relative_posix(path: Path, root: Path) -> str | None:
    """POSIX path of ``path`` relative to ``root`` without following symlinks; None if outside.

    Falls back to both resolved, for a root given through a symlink and a path given resolved.
    """
    for a, b in ((os.path.abspath(path), os.path.abspath(root)),
                 (os.path.realpath(path), os.path.realpath(root))):
        rel = os.path.relpath(a, b)
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            return Path(rel).as_posix()
    return None


def _subject_entries(root: Path) -> Iterator[str]:
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                found = _SUBJECT.fullmatch(entry.name)
                if found and entry.is_dir():
                    yield found.group(1)
    except OSError:
        return


def subject_labels(root: Path) -> list[str]:
    """Labels of the ``sub-<label>`` folders of a dataset (one listing of its top folder)."""
    return sorted(_subject_entries(Path(root)))


def has_subjects(root: Path) -> bool:
    """Whether the dataset has a ``sub-<label>`` folder (an atlas dataset has none)."""
    return next(_subject_entries(Path(root)), None) is not None


def _ignore(root: Path, exclude: Sequence[Path], subjects: Sequence[str] | None) -> list:
    """pybids ``ignore`` patterns, matched against ``/`` + the root-relative path.

    Top-level folders other than the selected subjects' are never entered (pybids prunes a
    folder that matches); a top-level name without a dot is taken for a folder, so README and
    CHANGES are skipped too, which nothing reads from the index. Other subjects' top-level
    files (fMRIPrep's ``sub-<label>.html``) are skipped as well.
    """
    from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE

    if subjects is None:
        kept = r"sub-[A-Za-z0-9]+"
    else:
        kept = "sub-(?:" + "|".join(re.escape(s) for s in sorted(set(subjects))) + ")"
    ignore = list(DEFAULT_LOCATIONS_TO_IGNORE)
    ignore.append(re.compile(rf"^/(?!{kept}$)[^/.]+$"))
    ignore.append(re.compile(r"^/sub-[^/]*\.[^/]*$"))
    for path in exclude:
        rel = relative_posix(Path(path), root)
        if rel is not None and rel != ".":
            ignore.append(re.compile("^/" + re.escape(rel) + "(/|$)"))
    return ignore


def indexer_for(root: Path, exclude: Sequence[Path], validate: bool,
                subjects: Sequence[str] | None):
    """A pybids indexer of ``subjects`` (None: all) that parses entities from root-relative
    paths and skips ``exclude``.

    pybids 0.22 matches entity patterns against absolute paths (pybids #1270, fixed upstream
    after 0.22 by parsing the root-relative path): a dataset under ``/x/perf/bids`` had every
    file indexed with ``datatype=perf``, so no BOLD was found. Metadata is not indexed (see
    :mod:`bids_fmristore.inputs.bids_metadata`).
    """
    from bids.layout.index import BIDSLayoutIndexer, _validate_path
    from bids.layout.models import Config, _create_tag_dict
    from bids.utils import make_bidsfile

    class _Relative:
        __slots__ = ("path",)

        def __init__(self, path: str) -> None:
            self.path = path

    class RootRelativeIndexer(BIDSLayoutIndexer):
        def _index_file(self, abs_fn, entities):
            bf = make_bidsfile(abs_fn)
            rel = relative_posix(Path(bf.path), root)
            probe = _Relative("/" + rel if rel is not None else bf.path)
            match_vals = {}
            for e in entities.values():
                m = e.match_file(probe)
                if m is None and e.mandatory:
                    break
                if m is not None:
                    match_vals[e.name] = (e, m)
            tags = [_create_tag_dict(bf, ent, val, ent._dtype) for ent, val in match_vals.values()]
            return bf, tags

        def _validate_file(self, f):
            # The validator's rules predate NIfTI-Zarr: judge a .nii.zarr by its .nii.gz name
            if str(f).endswith(".nii.zarr"):
                f = type(f)(str(f)[: -len(".zarr")] + ".gz")
            return super()._validate_file(f)

        def _index_dir(self, path, config, force=None):
            if subjects is None or os.path.abspath(path.path) != str(root):
                return super()._index_dir(path, config, force)
            return self._index_top(path, config)

        def _index_top(self, path, config):
            """The top of the dataset as pybids indexes it, but entering only the selected
            subjects' folders: pybids would test every entry (10,000 subjects: 2 s)."""
            config = list(config)
            if (root / self.config_filename).exists():
                config.append(Config.load(path / self.config_filename, session=self.session))
            entities = {}
            for c in config:
                entities.update(c.entities)
            with os.scandir(root) as listing:
                files = sorted(e.name for e in listing if not e.name.startswith(("sub-", "."))
                               and e.name != self.config_filename and not e.is_dir())
            bfs, tags = [], []
            for name in files:
                if self._validate_file(path / name):
                    bf, file_tags = self._index_file(path / name, entities)
                    bfs.append(bf)
                    tags += file_tags
            for s in sorted(set(subjects)):
                folder = path / f"sub-{s}"
                if not os.path.isdir(folder.path):
                    continue
                force = _validate_path(folder, incl_patt=self._include_patterns,
                                       excl_patt=self._exclude_patterns, root=self._layout._root)
                if force is not False:
                    more_bfs, more_tags = super()._index_dir(folder, config, force=force)
                    bfs += more_bfs
                    tags += more_tags
            return bfs, tags

    return RootRelativeIndexer(validate=validate, ignore=_ignore(root, exclude, subjects),
                               index_metadata=False)


def open_layout(root: Path, derivative: bool, validate: bool, indexer, sqlite_file=None):
    """pybids' ``BIDSLayout`` of ``root`` with ``indexer`` (None: read from ``sqlite_file``), its
    errors turned into one-line :class:`~bids_fmristore.errors.InputError`."""
    from bids import BIDSLayout
    from bids.exceptions import BIDSValidationError
    from sqlalchemy.exc import SQLAlchemyError

    kwargs = {"validate": validate}
    if indexer is not None:
        kwargs["indexer"] = indexer
    if derivative:
        kwargs["config"] = ["bids", "derivatives"]
    if sqlite_file is not None:
        kwargs["database_path"] = str(Path(sqlite_file).parent)
    try:
        return BIDSLayout(str(root), **kwargs)
    except (BIDSValidationError, ValueError) as err:
        raise InputError(f"{root}: {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise InputError(f"{root}: cannot index the dataset ({err})") from None
    except SQLAlchemyError as err:
        where = Path(sqlite_file).parent if sqlite_file is not None else root
        raise InputError(f"{where}: cannot use the pybids database "
                         f"({str(err).splitlines()[0]})") from None
