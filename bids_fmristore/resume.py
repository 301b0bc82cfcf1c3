"""When an existing output counts as done (a resubmitted job keeps it) and when it is rebuilt.

An output is done only if its ``.h5`` and its JSON sidecar both exist, the ``.h5`` has the
size the sidecar recorded when it was written (``FileSize``: a file truncated by a full disk or
a partial copy, or replaced, is rebuilt), no run failed when it was written (``FailedRuns``),
and the sidecar's ``Inputs`` equal what this invocation would write from: the same runs, masks
and atlas files (by BIDS URI, size and modification time) and the same content options (store
mode, coverage threshold). Anything else is rebuilt, with a WARNING giving the reason;
``--overwrite`` rebuilds regardless.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["file_stamp", "inputs_record", "why_rebuild", "sidecar_of", "should_build",
           "with_size", "read_sidecar", "changed_inputs", "short_uris"]

#: The sidecar's record of the size (bytes) of the file it describes, when that was written.
SIZE_KEY = "FileSize"


def sidecar_of(output: Path) -> Path:
    """The JSON sidecar beside an ``.h5`` (or fmristore's latent ``.lv.h5``) output."""
    suffix = ".lv.h5" if output.name.endswith(".lv.h5") else ".h5"
    return output.with_name(output.name[: -len(suffix)] + ".json")


def file_stamp(path: Path) -> dict[str, int]:
    """Size (bytes) and modification time (ns) of a file, following symlinks."""
    st = os.stat(path)
    return {"Size": int(st.st_size), "MTime": int(st.st_mtime_ns)}


def with_size(output: Path, content: Mapping) -> dict:
    """A sidecar's ``content`` with :data:`SIZE_KEY`, the size of ``output`` as it is now: call
    it once ``output`` is complete and in place, for the sidecar written after it."""
    return {**content, SIZE_KEY: int(os.stat(output).st_size)}


def inputs_record(files: Mapping[str, Path], options: Mapping[str, object]) -> dict:
    """The sidecar's ``Inputs``: each input file (BIDS URI → stamp) and the content options."""
    return {"Files": {uri: file_stamp(path) for uri, path in sorted(files.items())},
            "Options": dict(sorted(options.items()))}


def read_sidecar(output: Path) -> tuple[dict | None, str | None]:
    """The sidecar of a finished ``output`` and None, or None and why ``output`` is not
    finished: missing, without a readable sidecar, or not of the size it was written with."""
    if not output.exists():
        return None, "missing"
    sidecar = sidecar_of(output)
    try:
        content = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"it has no sidecar {sidecar.name} (an interrupted job?)"
    except (OSError, ValueError) as err:
        return None, f"its sidecar {sidecar.name} is unreadable ({err.__class__.__name__})"
    if not isinstance(content, dict):
        return None, f"its sidecar {sidecar.name} is not a JSON object"
    written = content.get(SIZE_KEY)  # None in the sidecars of versions before it
    if written is not None and (size := output.stat().st_size) != written:
        return None, (f"it holds {size} bytes, {written} when it was written (truncated or "
                      "replaced since)")
    return content, None


def changed_inputs(recorded: Mapping, roots: Mapping[str, Path]) -> list[str]:
    """The input files of ``recorded`` (a sidecar's ``Inputs``) that changed since: those whose
    BIDS URI ``bids:<dataset>:<path>`` resolves under ``roots`` (dataset name → folder, ``""``
    for the output dataset itself) to a file of another size or modification time. Files not
    found are not counted: the datasets may be mounted elsewhere (a container, another node)."""
    changed = []
    for uri, stamp in (recorded.get("Files") or {}).items():
        scheme, _, rest = str(uri).partition(":")
        name, _, rel = rest.partition(":")
        if scheme != "bids" or name not in roots or not rel:
            continue
        try:
            if file_stamp(Path(roots[name]) / rel) != stamp:
                changed.append(uri)
        except OSError:
            continue
    return changed


def why_rebuild(output: Path, expected: Mapping) -> str | None:
    """None when ``output`` is done for ``expected`` (an :func:`inputs_record`), else why not.

    A missing ``.h5`` gives ``"missing"``.
    """
    content, reason = read_sidecar(output)
    if content is None:
        return reason
    failed = content.get("FailedRuns") or []
    if failed:
        names = ", ".join(Path(str(f.get("Source", "?"))).name for f in failed)
        return f"{len(failed)} run(s) failed when it was written ({names})"
    recorded = content.get("Inputs")
    if not isinstance(recorded, dict):
        return "its sidecar does not record its inputs (written by an older version)"
    return _difference(recorded, expected)


def should_build(output: Path, expected: Mapping, *, overwrite: bool, kept: str,
                 check: Callable[[], str | None] | None = None) -> bool:
    """Whether to (re)build ``output``, saying so: a WARNING for each kept file (``kept``
    tells what it holds, e.g. ``"3 run(s)"``) and for each rebuilt one, with the reason.

    ``check`` may give one more reason to rebuild a file that is otherwise done. Before a
    rebuild the old sidecar is removed, so that an interrupted rebuild never leaves a new
    ``.h5`` beside an old sidecar.
    """
    reason = "--overwrite" if overwrite else why_rebuild(output, expected)
    if reason is None and check is not None:
        reason = check()
    if reason is None:
        log.warning("kept %s: complete and up to date (%s, same inputs and options); "
                    "--overwrite rebuilds it", output, kept)
        return False
    if reason not in ("missing", "--overwrite"):
        log.warning("rebuilding %s: %s", output, reason)
    with contextlib.suppress(FileNotFoundError):
        sidecar_of(output).unlink()
    return True


def _difference(recorded: Mapping, expected: Mapping) -> str | None:
    old_opts, new_opts = recorded.get("Options", {}), expected["Options"]
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key) != new_opts.get(key):
            return f"it was written with {key}={old_opts.get(key)!r}, now {new_opts.get(key)!r}"
    old, new = recorded.get("Files", {}), expected["Files"]
    added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    if added or removed:
        parts = [f"new {short_uris(added)}"] * bool(added)
        parts += [f"no longer used (absent, or failed now) {short_uris(removed)}"] * bool(removed)
        return "its inputs changed: " + "; ".join(parts)
    changed = sorted(uri for uri in new if old[uri] != new[uri])
    if changed:
        return f"{short_uris(changed)} changed since it was written"
    return None


def short_uris(uris: Iterable[str]) -> str:
    """The file names of BIDS URIs, for a message: the first three and how many more."""
    uris = [u.replace(":", "/").rsplit("/", 1)[-1] for u in uris]  # the file names
    return ", ".join(uris[:3]) + (f" and {len(uris) - 3} more" if len(uris) > 3 else "")
